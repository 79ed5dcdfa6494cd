//! A librdkafka client's view of its broker connections: when it last saw them go down
//! (`__ALL_BROKERS_DOWN`, or a transport failure), in ms since the client was made (a
//! monotonic clock of its own: this is about the broker, not about saga time). The relay
//! publishes its recent rows again after a loss; a consumer does not rest for a while after one.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

#[derive(Clone)]
pub struct Links {
    /// Whose connections, for the log.
    client: &'static str,
    started: Instant,
    /// 0: never.
    lost_ms: Arc<AtomicI64>,
    /// Notified at every loss, for whoever must act at once.
    lost: Arc<tokio::sync::Notify>,
}

impl Links {
    pub fn new(client: &'static str) -> Self {
        Links {
            client,
            started: Instant::now(),
            lost_ms: Arc::new(AtomicI64::new(0)),
            lost: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Now on this client's clock (never 0).
    pub fn now_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64 + 1
    }

    /// When the connections were last lost on this client's clock; 0 if never.
    pub fn lost_ms(&self) -> i64 {
        self.lost_ms.load(Ordering::Relaxed)
    }

    /// Whether the connections were lost less than `d` ago.
    pub fn lost_within(&self, d: Duration) -> bool {
        let lost = self.lost_ms();
        lost != 0 && self.now_ms() - lost < d.as_millis() as i64
    }

    /// Record a loss at `ms` (the error callback does; tests may).
    pub fn lost_at(&self, ms: i64) {
        self.lost_ms.store(ms, Ordering::Relaxed);
        self.lost.notify_one();
    }

    /// Until the next loss (or one not waited for yet).
    pub async fn next_loss(&self) {
        self.lost.notified().await;
    }
}

impl ClientContext for Links {
    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        if matches!(
            error.rdkafka_error_code(),
            Some(Code::AllBrokersDown | Code::BrokerTransportFailure)
        ) {
            self.lost_at(self.now_ms());
        }
        tracing::debug!("{}: {error}: {reason}", self.client);
    }
}

impl ConsumerContext for Links {}
