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
//! - A broker that drops its connections (a restart) may lose a transaction it acknowledged just
//!   before: noida-db 0.2.3 does, it saves its state while still acknowledging commits (see
//!   `integration_broker_restart`). The relay keeps what it published in the last
//!   `relay.republish_window_ms` (at most `relay.republish_window_bytes`) in memory and, once its
//!   producer saw every broker connection go down, publishes that again before anything new.
//!   Consumers' inboxes absorb the copies of what was not lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer as _};

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

type FutureProducer = rdkafka::producer::FutureProducer<Links>;

/// The producers' view of their broker connections: when one last saw them go down
/// (librdkafka's `__ALL_BROKERS_DOWN`, or a transport failure), in ms since the relay started
/// (a monotonic clock of the relay's own: this is about the broker, not about saga time).
#[derive(Clone)]
struct Links {
    started: std::time::Instant,
    /// 0: never.
    lost_ms: Arc<AtomicI64>,
}

impl Links {
    fn new() -> Self {
        Links {
            started: std::time::Instant::now(),
            lost_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    fn now_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64 + 1
    }
}

impl ClientContext for Links {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        if matches!(
            error.rdkafka_error_code(),
            Some(Code::AllBrokersDown | Code::BrokerTransportFailure)
        ) {
            self.lost_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        tracing::debug!("relay producer: {error}: {reason}");
    }
}

/// What the relay published lately, to publish again after the broker dropped its
/// connections (see the module docs). Bounded by age and bytes.
struct Recent {
    rows: VecDeque<(i64, outbox::Row)>,
    bytes: usize,
    window_ms: i64,
    max_bytes: usize,
    /// The connection loss last handled.
    handled: i64,
}

impl Recent {
    fn keep(&mut self, rows: Vec<outbox::Row>, now: i64) {
        if self.window_ms <= 0 {
            return;
        }
        for row in rows {
            self.bytes += row.message.size();
            self.rows.push_back((now, row));
        }
        while let Some((at, row)) = self.rows.front() {
            if *at >= now - self.window_ms && self.bytes <= self.max_bytes {
                break;
            }
            self.bytes -= row.message.size();
            self.rows.pop_front();
        }
    }

    /// If the broker dropped every connection since the last look: the rows published from
    /// `window_ms` before that moment on, oldest first.
    fn after_loss(&mut self, links: &Links) -> Option<VecDeque<outbox::Row>> {
        let lost = links.lost_ms.load(Ordering::Relaxed);
        if lost == self.handled {
            return None;
        }
        self.handled = lost;
        let since = lost - self.window_ms;
        let rows: VecDeque<outbox::Row> = self
            .rows
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, r)| r.clone())
            .collect();
        (!rows.is_empty()).then_some(rows)
    }
}

pub struct Relay {
    shared: Arc<Shared>,
    faults: Arc<dyn Faults>,
    links: Links,
}

impl Relay {
    pub fn new(shared: Arc<Shared>, faults: Arc<dyn Faults>) -> Self {
        Relay {
            shared,
            faults,
            links: Links::new(),
        }
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
        let mut recent = Recent {
            rows: VecDeque::new(),
            bytes: 0,
            window_ms: cfg.republish_window_ms as i64,
            max_bytes: cfg.republish_window_bytes,
            handled: 0,
        };
        // Rows published before the broker dropped its connections, to publish again first.
        let mut again: VecDeque<outbox::Row> = VecDeque::new();
        while !self.shared.shutdown.is_cancelled() {
            let now = self.shared.clock.now_ms();
            if now >= renew_at {
                let acquired = lease::acquire(db, SLOT, me, now, ttl).await;
                if let Ok(holding) = acquired {
                    self.shared.health.relay(holding);
                }
                match acquired {
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
            if let Some(rows) = recent.after_loss(&self.links) {
                tracing::warn!(
                    rows = rows.len(),
                    "the broker dropped its connections: publishing the last rows again"
                );
                again = rows;
            }
            let republishing = !again.is_empty();
            let rows = if republishing {
                let n = again.len().min(cfg.batch_size.max(1) as usize);
                Ok(again.drain(..n).collect())
            } else {
                match outbox::fetch(db, cfg.batch_size).await {
                    Ok(rows) => {
                        // Behind only with a backlog: a full batch.
                        let oldest = rows.iter().map(|r| r.created_ms).min();
                        if let Some(oldest) =
                            oldest.filter(|_| rows.len() >= cfg.batch_size as usize)
                        {
                            self.shared.door.report("relay", oldest);
                        }
                        Ok(self.park_oversized(rows).await)
                    }
                    Err(e) => Err(e),
                }
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
                    if !republishing && rows.len() < cfg.batch_size as usize {
                        self.shared.door.caught_up("relay");
                    }
                    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                    recent.keep(rows, self.links.now_ms());
                    if republishing {
                        // Deleted when first published.
                    } else if let Err(e) = outbox::delete(db, &ids).await {
                        // They will be published again; consumers' inboxes absorb that.
                        tracing::warn!("relay could not delete published rows: {e}");
                    }
                }
                Err(Error::Refused { index, error }) if republishing => {
                    // It went out once already; the broker will not take it now.
                    producer = None;
                    let mut rows = rows;
                    let refused = rows.remove(index);
                    let event = &refused.message.event_id;
                    tracing::error!(%event, "a row published again was refused: {error}");
                    for row in rows.into_iter().rev() {
                        again.push_front(row);
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
                    Stats::add(&self.shared.stats.relay_retries, 1);
                    tracing::warn!(rows = rows.len(), "relay batch failed, will retry: {e}");
                    if republishing {
                        for row in rows.into_iter().rev() {
                            again.push_front(row);
                        }
                    }
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
        let send_timeout = self.shared.config.relay.send_timeout_ms.clamp(1, 60_000);
        let id = kafka.topic(&format!("saga-relay-0-g{generation}"));
        Ok(kafka
            .client()
            .set("message.max.bytes", max.to_string())
            .set("transactional.id", id)
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .set("transaction.timeout.ms", "60000")
            .set("message.timeout.ms", send_timeout.to_string())
            .create_with_context(self.links.clone())?)
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
                // Briefly: if the broker is away the next producer generation aborts it anyway.
                let wait = Duration::from_millis(self.shared.config.relay.send_timeout_ms.max(100));
                let wait = wait.min(KAFKA_TIMEOUT);
                if let Err(abort) = blocking(move || p.abort_transaction(wait)).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::outbox::Message;

    fn row(id: i64, bytes: usize) -> outbox::Row {
        outbox::Row {
            id,
            message: Message {
                event_id: format!("e{id}"),
                topic: "t".into(),
                key: String::new(),
                headers: Vec::new(),
                payload: vec![0; bytes],
            },
            created_ms: 0,
        }
    }

    fn recent(window_ms: i64, max_bytes: usize) -> Recent {
        Recent {
            rows: VecDeque::new(),
            bytes: 0,
            window_ms,
            max_bytes,
            handled: 0,
        }
    }

    fn ids(rows: Option<VecDeque<outbox::Row>>) -> Vec<i64> {
        rows.map(|r| r.iter().map(|r| r.id).collect())
            .unwrap_or_default()
    }

    #[test]
    fn after_a_connection_loss_the_rows_published_just_before_it_go_out_again_once() {
        let links = Links::new();
        let mut r = recent(1000, 1 << 20);
        r.keep(vec![row(1, 10)], 100);
        r.keep(vec![row(2, 10), row(3, 10)], 1500);
        assert_eq!(ids(r.after_loss(&links)), Vec::<i64>::new(), "no loss yet");
        links.lost_ms.store(2000, Ordering::Relaxed);
        // Row 1 went out 1.9 s before the loss, outside the 1 s window.
        assert_eq!(ids(r.after_loss(&links)), [2, 3]);
        assert_eq!(ids(r.after_loss(&links)), Vec::<i64>::new(), "handled");
    }

    #[test]
    fn what_is_kept_is_bounded_by_age_and_bytes() {
        let links = Links::new();
        let mut r = recent(1000, 25);
        r.keep(vec![row(1, 10)], 0);
        r.keep(vec![row(2, 10), row(3, 10)], 10);
        assert_eq!(r.bytes, 20, "row 1 dropped to stay under 25 bytes");
        r.keep(vec![row(4, 1)], 1500);
        assert_eq!(r.rows.len(), 1, "rows 2 and 3 aged out");
        links.lost_ms.store(1600, Ordering::Relaxed);
        assert_eq!(ids(r.after_loss(&links)), [4]);
        let mut off = recent(0, 1 << 20);
        off.keep(vec![row(5, 1)], 0);
        links.lost_ms.store(1700, Ordering::Relaxed);
        assert_eq!(
            ids(off.after_loss(&links)),
            Vec::<i64>::new(),
            "window 0 is off"
        );
    }
}
