//! The outbox relay: publishes committed outbox rows to Kafka, one Kafka transaction per batch,
//! then deletes them.
//!
//! - All-or-nothing across topics (A4): a batch that fails anywhere is aborted, nothing of it is
//!   visible to `read_committed` consumers, and its rows stay for the next attempt.
//! - Order (A6): rows go out in `id` order, which is commit order for the rows of one saga (a
//!   saga's steps are committed one after another by its partition's worker).
//! - One relay at a time (A5): the relay runs only while this instance holds the lease
//!   `relay/0`. Its `transactional.id` belongs to the slot, not the instance, so a successor's
//!   `init_transactions` fences the old producer and aborts whatever it left open; we never
//!   depend on the broker expiring a transaction.
//! - Generations: every new producer (a successor, or this relay after any failure) first
//!   re-initialises the previous generation's id `saga-relay-0-g<N>` — fencing a zombie and
//!   aborting what it left open — then records generation N+1 and produces under its own id.
//!   So the producer id of an aborted transaction is never used again. noida-db (the test
//!   broker) keeps reporting an aborted transaction to `read_committed` readers after its abort
//!   marker, and librdkafka then drops every later record of that producer id as aborted:
//!   committed events were silently skipped (the fault suite found sagas whose fired deadline
//!   no consumer ever saw). With a new producer id after every abort nothing committed is hidden.
//! - A crash after the Kafka commit but before the delete republishes the batch; consumers'
//!   inboxes absorb the duplicates (the event ids are stored in the rows, so they are stable).
//! - Latency: local commits wake the relay at once; `poll_interval_ms` only bounds how late it
//!   sees rows committed by other instances.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

use crate::node::Shared;
use crate::stats::Stats;
use crate::storage::{generations, lease, outbox};

/// Points where a test can make the relay fail as if it crashed there.
pub trait Faults: Send + Sync {
    /// Before sending row `index` of a batch; an error aborts the Kafka transaction.
    fn before_send(&self, _index: usize) -> Result<(), String> {
        Ok(())
    }
    /// After the Kafka transaction committed, before the rows are deleted; an error leaves
    /// them in the outbox, to be published again.
    fn after_commit(&self, _ids: &[i64]) -> Result<(), String> {
        Ok(())
    }
}

/// Production: no faults.
pub struct NoFaults;
impl Faults for NoFaults {}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The broker (or the client, before sending) refused row `index` of the batch itself:
    /// sending it again cannot succeed.
    #[error("row {index} refused: {error}")]
    Refused {
        index: usize,
        error: rdkafka::error::KafkaError,
    },
    #[error("injected fault: {0}")]
    Injected(String),
    #[error("delivery was cancelled")]
    Cancelled,
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
}

const SLOT: &str = "relay/0";
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Relay {
    shared: Arc<Shared>,
    faults: Arc<dyn Faults>,
}

impl Relay {
    pub fn new(shared: Arc<Shared>, faults: Arc<dyn Faults>) -> Self {
        Relay { shared, faults }
    }

    pub async fn run(self) {
        let cfg = &self.shared.config.relay;
        let ttl = cfg.lease_ttl_ms as i64;
        let poll = Duration::from_millis(cfg.poll_interval_ms);
        let me = &self.shared.config.instance_id;
        let db = &self.shared.db;
        let mut producer: Option<FutureProducer> = None;
        let mut renew_at = i64::MIN;
        let mut failures = 0u32;
        while !self.shared.shutdown.is_cancelled() {
            let now = self.shared.clock.now_ms();
            if now >= renew_at {
                match lease::acquire(db, SLOT, me, now, ttl).await {
                    Ok(true) => renew_at = now + ttl / 3,
                    Ok(false) => {
                        producer = None;
                        self.idle(poll).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("relay lease check failed: {e}");
                        renew_at = i64::MIN;
                        self.idle(poll).await;
                        continue;
                    }
                }
            }
            let rows = match outbox::fetch(db, cfg.batch_size).await {
                Ok(rows) => Ok(self.park_oversized(rows).await),
                Err(e) => Err(e),
            };
            let rows = match rows {
                Ok(rows) if rows.is_empty() => {
                    self.idle(poll).await;
                    continue;
                }
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!("relay could not read the outbox: {e}");
                    self.idle(poll).await;
                    continue;
                }
            };
            let result = match &producer {
                Some(p) => self.publish(p, &rows).await,
                None => match self.producer().await {
                    Ok(p) => {
                        let r = self.publish(&p, &rows).await;
                        producer = Some(p);
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(()) => {
                    failures = 0;
                    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                    if let Err(e) = outbox::delete(db, &ids).await {
                        // They will be published again; consumers' inboxes absorb that.
                        tracing::warn!("relay could not delete published rows: {e}");
                    }
                }
                Err(Error::Refused { index, error }) => {
                    // One bad row must not hold up the others: set it aside, go on at once.
                    producer = None;
                    let reason = format!("the broker refused it: {error}");
                    self.park(&rows[index], &reason).await;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(rows = rows.len(), "relay batch failed, will retry: {e}");
                    // A fresh producer re-runs init_transactions, which aborts anything open.
                    producer = None;
                    let backoff = Duration::from_millis((50u64 << failures.min(6)).min(5_000));
                    self.idle(backoff).await;
                }
            }
        }
        if let Err(e) = lease::release(db, SLOT, me).await {
            tracing::debug!("relay lease release failed: {e}");
        }
    }

    /// Park the rows larger than the broker takes (`limits.broker_message_bytes`) before
    /// they are sent: a refused send would abort the whole transaction. Nothing the runtime
    /// lets in is that large; rows from before a limit was lowered can be.
    async fn park_oversized(&self, rows: Vec<outbox::Row>) -> Vec<outbox::Row> {
        let max = self.shared.config.limits.broker_message_bytes;
        let (fit, over): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| r.message.size() <= max);
        for row in &over {
            let reason = format!(
                "message of {} bytes is over the broker's limit of {max} (limits.broker_message_bytes)",
                row.message.size()
            );
            self.park(row, &reason).await;
        }
        // Rows behind a parked one may go now; per-saga order among those sent holds.
        fit
    }

    /// Set a row aside with why (`runtime outbox parked`), so the rows behind it flow.
    async fn park(&self, row: &outbox::Row, reason: &str) {
        let m = &row.message;
        tracing::error!(
            id = row.id, event = %m.event_id, topic = %m.topic, size = m.size(),
            "outbox row parked: {reason}"
        );
        let now = self.shared.clock.now_ms();
        match outbox::park(&self.shared.db, row.id, reason, now).await {
            Ok(()) => Stats::add(&self.shared.stats.parked, 1),
            // It stays in the outbox and is tried (and parked) again.
            Err(e) => tracing::warn!(id = row.id, "could not park an outbox row: {e}"),
        }
    }

    /// A transactional producer of a new generation (see the module docs): the previous
    /// generation's id fenced and its open transaction aborted first.
    async fn producer(&self) -> Result<FutureProducer, Error> {
        let db = &self.shared.db;
        loop {
            let previous = generations::current(db, SLOT).await?;
            if previous > 0 {
                let old = self.transactional(previous)?;
                blocking(move || old.init_transactions(KAFKA_TIMEOUT)).await?;
            }
            if !generations::advance(db, SLOT, previous).await? {
                continue; // another holder moved it meanwhile: fence that one too
            }
            let producer = self.transactional(previous + 1)?;
            let p = producer.clone();
            blocking(move || p.init_transactions(KAFKA_TIMEOUT)).await?;
            tracing::info!(generation = previous + 1, "relay producer ready");
            return Ok(producer);
        }
    }

    fn transactional(&self, generation: i64) -> Result<FutureProducer, Error> {
        let kafka = &self.shared.config.kafka;
        let max = self.shared.config.limits.broker_message_bytes;
        let id = kafka.topic(&format!("saga-relay-0-g{generation}"));
        Ok(kafka
            .client()
            .set("message.max.bytes", max.to_string())
            .set("transactional.id", id)
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .set("transaction.timeout.ms", "60000")
            .create()?)
    }

    async fn publish(&self, producer: &FutureProducer, rows: &[outbox::Row]) -> Result<(), Error> {
        producer.begin_transaction()?;
        match self.send_all(producer, rows).await {
            Ok(()) => {
                let p = producer.clone();
                blocking(move || p.commit_transaction(KAFKA_TIMEOUT)).await?;
            }
            Err(e) => {
                let p = producer.clone();
                if let Err(abort) = blocking(move || p.abort_transaction(KAFKA_TIMEOUT)).await {
                    tracing::warn!("relay could not abort its transaction: {abort}");
                }
                return Err(e);
            }
        }
        let stats = &self.shared.stats;
        Stats::add(&stats.published, rows.len() as u64);
        Stats::add(&stats.relay_batches, 1);
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        self.faults.after_commit(&ids).map_err(Error::Injected)
    }

    /// Send every row, then wait for every delivery report before the commit: committing right
    /// after `send` makes librdkafka flush inside the commit, ~100 ms per transaction.
    async fn send_all(&self, producer: &FutureProducer, rows: &[outbox::Row]) -> Result<(), Error> {
        let mut deliveries = Vec::with_capacity(rows.len());
        for (index, row) in rows.iter().enumerate() {
            self.faults.before_send(index).map_err(Error::Injected)?;
            let m = &row.message;
            let headers = m.headers.iter().fold(
                OwnedHeaders::new_with_capacity(m.headers.len()),
                |hs, (k, v)| {
                    hs.insert(Header {
                        key: k,
                        value: Some(v.as_bytes()),
                    })
                },
            );
            let record = FutureRecord::to(&m.topic)
                .key(&m.key)
                .payload(&m.payload)
                .headers(headers);
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| refused(index, e))?;
            deliveries.push(delivery);
        }
        for (index, delivery) in deliveries.into_iter().enumerate() {
            delivery
                .await
                .map_err(|_| Error::Cancelled)?
                .map_err(|(e, _)| refused(index, e))?;
        }
        Ok(())
    }

    async fn idle(&self, d: Duration) {
        tokio::select! {
            _ = self.shared.shutdown.cancelled() => {}
            _ = self.shared.relay_wake.notified() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// A send error, as [`Error::Refused`] if it is about the row itself (retrying cannot help),
/// else as a transient Kafka error.
fn refused(index: usize, error: rdkafka::error::KafkaError) -> Error {
    use rdkafka::types::RDKafkaErrorCode as Code;
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::InvalidMessageSize
                | Code::InvalidMessage
                | Code::InvalidRecord
                | Code::BadMessage
        )
    );
    if permanent {
        Error::Refused { index, error }
    } else {
        Error::Kafka(error)
    }
}

/// rdkafka's transactional calls block; keep them off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, rdkafka::error::KafkaError> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Cancelled)?
        .map_err(Error::from)
}
