//! Everything that speaks Kafka: client settings, topic creation, the CloudEvents wire format
//! and the per-service consumer. The relay (`crate::relay`) is the only producer.

pub mod cloudevents;
pub mod consumer;
pub mod dead_letter;
pub mod topics;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kafka error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("could not create topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
}

/// Kafka settings (`[kafka]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Bootstrap servers, comma-separated. Default `127.0.0.1:9092`; env `SAGA_KAFKA_BROKERS`.
    pub brokers: String,
    /// Prefix of every topic and consumer group name, to share one cluster between
    /// environments (or tests). Default empty; env `SAGA_KAFKA_TOPIC_PREFIX`.
    pub topic_prefix: String,
    /// Partitions of the topics the runtime creates. Default 4.
    pub partitions: i32,
    /// Replication factor of the topics the runtime creates. Default 1.
    pub replication: i32,
    /// A partition that delivered nothing for this long while the broker reports committed
    /// data beyond it is re-sought, in place first, then further back (what is read again is
    /// dropped): works around brokers that stall around aborted transactions (noida-db does,
    /// see `kafka::consumer`). 0 disables. Default 1000 ms.
    pub stall_reseek_ms: u64,
    /// How long the broker may hold a consumer's fetch when it has nothing new
    /// (`fetch.wait.max.ms`): the idle hop latency against the fetch rate. Default 10.
    pub fetch_wait_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            partitions: 4,
            replication: 1,
            stall_reseek_ms: 1000,
            fetch_wait_ms: 10,
        }
    }
}

impl Settings {
    /// The physical name of a service-level topic.
    pub fn topic(&self, logical: &str) -> String {
        format!("{}{logical}", self.topic_prefix)
    }

    /// The service-level name of a physical topic.
    pub fn logical<'a>(&self, physical: &'a str) -> &'a str {
        physical
            .strip_prefix(&self.topic_prefix)
            .unwrap_or(physical)
    }

    pub fn client(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", "saga-runtime");
        config
    }
}
