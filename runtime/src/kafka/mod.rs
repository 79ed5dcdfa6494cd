//! Everything that speaks Kafka: client settings, topic creation, the CloudEvents wire format
//! and the per-service consumer. The relay (`crate::relay`) is the only producer.

pub mod cloudevents;
pub mod consumer;
pub mod dead_letter;
pub mod doorbell;
pub mod links;
pub mod topics;

use std::collections::BTreeMap;

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
    /// A consumer that has read everything the local relay announced, once a fetch told the
    /// end of every partition it resumed (or it got nothing for `rest_after_ms`), stops
    /// fetching for up to this long, woken at once when the local relay
    /// commits records to its partitions: for brokers that answer an empty fetch at once
    /// instead of holding it (noida-db 0.2.3; an idle consumer there asks thousands of times a
    /// second). Bounds how late records other instances publish are seen. 0 disables (right
    /// for Kafka, which holds fetches). Default 25 (README, "Fetches answered at once"). Env
    /// `SAGA_KAFKA_REST_MS`.
    pub rest_ms: u64,
    /// How long a consumer looks for records before it rests (see `rest_ms`) when not every
    /// partition it resumed has told its end: longer than a fetch takes. Default 2 ms.
    pub rest_after_ms: u64,
    /// After its broker connections dropped, a consumer reads again what it read in this
    /// long before (the inboxes drop what was handled): noida-db can lose records it
    /// acknowledged when it restarts and give their offsets to new ones, which a consumer past
    /// them would never see (README, "Known broker quirks"). Longer than the relay's
    /// `republish_window_ms`, whose copies refill that range. 0 disables (right for Kafka).
    /// Default 35000 ms.
    pub reread_after_loss_ms: u64,
    /// librdkafka properties for every client the runtime makes (its consumers, producers and
    /// admin clients), e.g. `"security.protocol" = "SASL_SSL"`, `"sasl.mechanisms"`, `"ssl.ca.location"`.
    /// The properties the runtime's guarantees rest on ([`PROTECTED`]) are refused. Default none.
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumers only, applied after the runtime's own consumer
    /// settings (so `fetch.wait.max.ms`, `queued.min.messages`, … can be tuned here). Default none.
    pub consumer_properties: BTreeMap<String, String>,
}

/// Properties of `kafka.properties` and `kafka.consumer_properties` the runtime sets itself
/// and depends on: transactions, read-committed reads, positions kept in the database.
pub const PROTECTED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "enable.partition.eof",
    "auto.offset.reset",
    "transactional.id",
    "enable.idempotence",
    "message.max.bytes",
];

impl Default for Settings {
    fn default() -> Self {
        Settings {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            partitions: 4,
            replication: 1,
            stall_reseek_ms: 1000,
            fetch_wait_ms: 10,
            rest_ms: 25,
            rest_after_ms: 2,
            reread_after_loss_ms: 35_000,
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
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
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// The first property of `properties` or `consumer_properties` the runtime must set
    /// itself ([`PROTECTED`]), as `section.key`.
    pub fn protected_property(&self) -> Option<String> {
        let sections = [
            ("properties", &self.properties),
            ("consumer_properties", &self.consumer_properties),
        ];
        sections.into_iter().find_map(|(section, map)| {
            map.keys()
                .find(|key| PROTECTED.contains(&key.as_str()))
                .map(|key| format!("kafka.{section}.\"{key}\""))
        })
    }
}
