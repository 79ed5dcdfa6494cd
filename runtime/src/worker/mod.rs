//! The event path of one service: Kafka batch → decode → inbox pre-check → guest (with its
//! failure policy) → one database transaction for the whole batch → offsets stored.
//!
//! Design choices:
//! - Batching: a batch of records shares one transaction; each event gets a savepoint, so one
//!   event's conflict or duplicate does not undo the others.
//! - Concurrency: guests of different partitions run at the same time; events of one partition
//!   run in order. An event that read a key an earlier event of its batch writes is run again
//!   on that write before the commit ([`chain`]). State conflicts (two events touching the
//!   same keys on two instances, or a re-run that could not be made) are found at commit by
//!   the optimistic check; the conflicting event and the later events of its partition that
//!   depend on it (its saga, a state key in common) are deferred and re-run in order on fresh
//!   state, so neither an update nor the per-saga order of emitted events is lost; the
//!   independent ones commit (`blocked::Blocked`).
//! - Failures: a handler that errors or traps is retried with exponential backoff; after the
//!   subscription's attempts it is dead-lettered (`<topic>.dlt`, through the outbox, with the
//!   reason in headers). A non-blocking subscription retries in place (its attempts are
//!   bounded); a blocking one retries until it succeeds and holds only its partition meanwhile
//!   ([`holds`]).

mod ahead;
mod blocked;
mod chain;
mod commit;
mod decide;
mod holds;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::admission::Door as Admission;
use crate::clock::Clock;
use crate::config::Config;
use crate::deadline::Alarm;
use crate::effects;
use crate::kafka::cloudevents::{self, Malformed};
use crate::kafka::consumer::{Consumer, Record};
use crate::kafka::dead_letter::headers as dlt_headers;
use crate::metrics::Metrics;
use crate::registry::{Registry, Service, Step};
use crate::relay;
use crate::stats::Stats;
use crate::storage::{self, inbox, Db};
use crate::verify::{Recorder, Recording, Recordings};
use crate::wasm::bindings::{self, Effects, Event, FailurePolicy};
use crate::wasm::{Called, Failure, StateReader};
use crate::watch::Changes;
use holds::{compensations_wait_for_held_steps, hold, Hold, Holds};

/// One record of a batch and what became of it.
struct Item<'a> {
    record: &'a Record,
    /// The decoded event, or why it could not be decoded.
    event: Result<Event, Malformed>,
    /// `context.new-id` for this event: stable across re-runs.
    new_id: String,
    /// A re-drive from a dead-letter topic (`runtime dlt redrive`): handled again if this
    /// service dead-lettered it, a duplicate if it has since been handled otherwise.
    redrive: bool,
    /// The attempt its handling starts at (higher for an event released from a hold).
    first_attempt: u32,
    /// When the worker took it from the consumer (the handler-duration metric).
    taken: std::time::Instant,
    /// Its `consume` span, a child of the trace context it carries; it ends with the batch.
    span: tracing::Span,
}

impl Item<'_> {
    /// The saga the event belongs to (its CloudEvents `subject`), if it has one.
    fn saga(&self) -> Option<&str> {
        self.event
            .as_ref()
            .ok()
            .map(|e| e.subject.as_str())
            .filter(|s| !s.is_empty())
    }

    /// Whether the inbox outcome `recorded` makes this event a duplicate.
    fn duplicate(&self, recorded: Option<&String>) -> bool {
        match recorded {
            None => false,
            Some(outcome) => !(self.redrive && outcome == inbox::Outcome::DeadLettered.as_str()),
        }
    }

    /// The inbox key: the event id, or the record's coordinates if it has none.
    fn inbox_id(&self) -> String {
        match &self.event {
            Ok(e) => e.id.clone(),
            Err(_) => format!(
                "kafka:{}:{}:{}",
                self.record.topic, self.record.partition, self.record.offset
            ),
        }
    }
}

enum Verdict {
    /// Already in the inbox; nothing to do.
    Duplicate,
    /// The handler's effects, and the attempt that made them.
    Apply(Called<Effects>, u32),
    DeadLetter {
        reason: String,
        attempts: u32,
    },
    /// A forward event of a saga past its deadline: recorded, not applied.
    Expired {
        reason: String,
    },
    /// The saga was already compensated at this service: recorded, not applied.
    Ignored {
        reason: String,
    },
    /// A blocking subscription's handler failed: retry after `retry_in`, holding the
    /// partition. Nothing is recorded.
    Held {
        attempt: u32,
        retry_in: Duration,
    },
    /// Behind a held event of its partition: not handled yet, nothing recorded.
    Behind,
}

impl Verdict {
    /// Held, or waiting behind a held event: stays in Kafka, uncommitted.
    fn waits(&self) -> bool {
        matches!(self, Verdict::Held { .. } | Verdict::Behind)
    }

    /// The state keys its handler read or writes (none unless it applies).
    fn keys(&self) -> impl Iterator<Item = &str> {
        let called = match self {
            Verdict::Apply(c, _) => Some(c),
            _ => None,
        };
        called.into_iter().flat_map(|c| {
            let read = c.reads.0.keys().map(String::as_str);
            read.chain(c.output.writes.iter().map(|w| w.key.as_str()))
        })
    }
}

/// What the batch reads before any guest runs (`storage::door`): events already handled, sagas
/// closed by a compensation at this service, steps held, sagas expired.
use storage::door::Found as Door;

/// Why the ledger refuses an event of a saga compensated at this service by `by`.
fn closed_reason(step: Step, by: &str) -> String {
    match step {
        Step::Compensation => format!("saga already compensated here by event {by}"),
        _ => format!("saga compensated here by event {by} before this step"),
    }
}

/// What a worker reaches of its instance (built in `node.rs` for each service's worker).
pub struct Context {
    pub config: Arc<Config>,
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    /// The services loaded here: a batch runs the version installed when it starts.
    pub registry: Arc<Registry>,
    /// What guests read their state through.
    pub reader: Arc<dyn StateReader>,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    /// The ingress's flow control, told how far behind the worker is.
    pub door: Arc<Admission>,
    /// Held queries, woken by the keys a commit wrote.
    pub changes: Arc<Changes>,
    /// Recent events with their inputs and effects, for `deploy --verify`.
    pub recordings: Arc<Recordings>,
    /// Woken by a commit that wrote outbox rows.
    pub relay: relay::Handle,
    /// Told by a commit that set a deadline.
    pub deadline_alarm: Arc<Alarm>,
}

pub struct Worker {
    ctx: Arc<Context>,
    service: String,
    /// Cancelled when this service stops on this instance (undeploy, a new version that
    /// consumes other topics, or the instance's shutdown).
    stop: CancellationToken,
    /// The keys its handlers read, learned to be read ahead at the door; PostgreSQL only (on
    /// SQLite a read is no round trip).
    ahead: Option<ahead::ReadAhead>,
}

impl Worker {
    pub fn new(ctx: Arc<Context>, service: &str, stop: CancellationToken) -> Self {
        let reads_ahead = ctx.db.dialect() == storage::Dialect::Postgres;
        Worker {
            ctx,
            service: service.to_string(),
            stop,
            ahead: reads_ahead.then(Default::default),
        }
    }

    pub async fn run(self, consumer: Arc<Consumer>) {
        let max = self.ctx.config.worker.max_batch.max(1);
        let mut holds = Holds::default();
        loop {
            for h in holds.due(tokio::time::Instant::now()) {
                if let Err(e) = consumer.release(&h.topic, h.partition, h.offset) {
                    tracing::warn!(service = %self.service, topic = %h.topic, partition = h.partition, "could not resume a held partition: {e}");
                }
            }
            let batch = tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = holds.next_due() => continue,
                batch = consumer.next_batch(max) => batch,
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(service = %self.service, "kafka consume failed: {e}");
                    self.pause(Duration::from_millis(200)).await;
                    continue;
                }
            };
            // Fetched before their partition was held, or (should the broker deliver them)
            // after a released event that has not come back: they come again in order.
            let mut rewind: Vec<(String, i32, i64)> = Vec::new();
            let batch: Vec<Record> = batch
                .into_iter()
                .filter(|r| {
                    if let Some(at) = holds.ahead_of_released(r) {
                        rewind.push((r.topic.clone(), r.partition, at));
                        return false;
                    }
                    !holds.is_held(&r.topic, r.partition)
                })
                .collect();
            rewind.dedup();
            for (topic, partition, at) in rewind {
                tracing::debug!(service = %self.service, %topic, partition, at, "records ahead of a released event: rewinding");
                if let Err(e) = consumer.release(&topic, partition, at) {
                    tracing::warn!(service = %self.service, "could not rewind a partition: {e}");
                }
            }
            if batch.is_empty() {
                continue;
            }
            let Some(service) = self.ctx.registry.get(&self.service) else {
                break;
            };
            let Some(held) = self.process(&service, &batch, &mut holds).await else {
                break; // stopping; nothing was stored, the records will be redelivered
            };
            if batch.len() < max {
                // It took all there was: however late that was, nothing waits behind it.
                self.ctx.door.caught_up(&self.service);
            }
            for h in held {
                tracing::info!(service = %self.service, topic = %h.topic, partition = h.partition, offset = h.offset, attempt = h.attempt, "partition held for a retry");
                if let Err(e) = consumer.hold(&h.topic, h.partition, h.offset) {
                    tracing::warn!(service = %self.service, "could not hold a partition: {e}");
                }
                self.share_hold(&h).await;
                holds.insert(h);
            }
        }
    }

    /// Handle a batch to the end: the partitions to hold for a retry, `None` only if
    /// stopping interrupted it.
    ///
    /// Events deferred by a conflict (and those behind them in their partitions that depend
    /// on them) are handled again together, in rounds, each on fresh state, until none is
    /// left: every round commits at least the first of them unless another instance's
    /// commit got in between, and a round that commits nothing backs off (jittered, growing for
    /// `backoff::CONFLICT_RERUNS` rounds, then at the retry cap) so that writers contending
    /// for the same keys take turns instead of spinning. An event cannot be given up, so none
    /// is ever dropped here. (Re-run one by one, the deferred half of a batch of the saga
    /// benchmark's point service — its users' balances shared by many sagas — took longer than
    /// the rest of the batch.)
    async fn process(
        &self,
        service: &Arc<Service>,
        batch: &[Record],
        holds: &mut Holds,
    ) -> Option<Vec<Hold>> {
        let (mut held, mut deferred) = self.round(service, batch, holds, true).await?;
        let mut tried = batch.len();
        let mut fruitless = 0;
        while !deferred.is_empty() {
            if deferred.len() == tried {
                fruitless += 1;
                if fruitless == crate::backoff::CONFLICT_RERUNS {
                    tracing::warn!(service = %self.service, events = deferred.len(), "events keep conflicting; re-running them at the capped pause");
                }
                let cap = self.ctx.config.worker.max_backoff_ms;
                if !self.pause(crate::backoff::conflict(fruitless, cap)).await {
                    return None;
                }
            } else {
                fruitless = 0;
            }
            let records = std::mem::take(&mut deferred);
            tried = records.len();
            let (round_held, left) = self.round(service, &records, holds, false).await?;
            held.extend(round_held);
            deferred = left;
        }
        Some(held)
    }

    /// One round of [`Worker::process`]: the partitions to hold and the records deferred by a
    /// conflict (not those behind a hold), `None` only if stopping interrupted it. `first`:
    /// the batch as taken from the consumer (its delivery is measured and reported once).
    async fn round(
        &self,
        service: &Arc<Service>,
        batch: &[Record],
        holds: &mut Holds,
        first: bool,
    ) -> Option<(Vec<Hold>, Vec<Record>)> {
        let taken = std::time::Instant::now();
        let taken_ms = self.ctx.clock.now_ms();
        let items: Vec<Item<'_>> = batch
            .iter()
            .map(|record| Item {
                taken,
                span: self.consume_span(service, record),
                event: self.decode(record),
                redrive: record
                    .headers
                    .iter()
                    .any(|(k, _)| k == dlt_headers::REDRIVEN_FROM),
                first_attempt: holds.first_attempt(record),
                record,
                new_id: uuid::Uuid::now_v7().to_string(),
            })
            .collect();
        let door = self.retry_db(|| self.door(service, &items)).await?;
        // When the batch's new events were emitted: duplicates and re-drives are old by nature.
        let emitted: Vec<i64> = items
            .iter()
            .filter(|i| !i.redrive && !door.seen.contains_key(&i.inbox_id()))
            .filter_map(|i| i.event.as_ref().ok().map(|e| e.time_ms))
            .filter(|&t| t > 0) // no `time` attribute
            .collect();
        let delivered = self.ctx.metrics.delivered(&self.service);
        for at in emitted.iter().filter(|_| first) {
            delivered.record((taken_ms - at).max(0) as f64 / 1000.0);
        }
        // How late this service takes its events, for the ingress's shedding, when it has a
        // backlog (a full batch; a smaller one is reported caught up after it); a partition
        // released from a hold is late by design, in a batch of its own size.
        if first && items.len() >= self.ctx.config.worker.max_batch.max(1) {
            if let Some(&oldest) = emitted.iter().min() {
                self.ctx.door.report(&self.service, oldest);
            }
        }
        let mut verdicts = self.decide_all(service, &items, &door, holds).await?;
        compensations_wait_for_held_steps(service, &items, &mut verdicts);
        let lanes = commit_lanes(&items, &verdicts, self.lanes(items.len()));
        self.chain(service, &items, &door, &lanes, &mut verdicts)
            .await;
        let commits = lanes
            .iter()
            .map(|lane| self.retry_db(|| self.commit(service, &items, &verdicts, lane)));
        let mut deferred = Vec::new();
        for lane in futures::future::join_all(commits).await {
            deferred.extend(lane?);
        }
        deferred.sort_unstable();
        let mut held: Vec<Hold> = Vec::new();
        for (i, (item, verdict)) in items.iter().zip(&verdicts).enumerate() {
            if let Verdict::Held { attempt, retry_in } = verdict {
                if !deferred.contains(&i) {
                    held.push(hold(item, *attempt, *retry_in));
                }
            }
        }
        let held_lane = |held: &[Hold], item: &Item<'_>| {
            held.iter()
                .any(|h| h.topic == item.record.topic && h.partition == item.record.partition)
        };
        // Not those behind a held event of their partition: they come again after it.
        let deferred: std::collections::BTreeSet<usize> = deferred
            .into_iter()
            .filter(|&i| !held_lane(&held, &items[i]))
            .collect();
        for (i, item) in items.iter().enumerate() {
            if !held_lane(&held, item) && !deferred.contains(&i) {
                holds.handled(item.record);
            }
        }
        Stats::add(&self.ctx.stats.deferred, deferred.len() as u64);
        let deferred = deferred.into_iter().map(|i| items[i].record.clone());
        Some((held, deferred.collect()))
    }

    /// Tell every instance that a step of this saga is held (a failing step, not a waiting
    /// compensation), so its compensations wait for it wherever they arrive. Best effort: a
    /// database that is down now fails the next commit, which is retried anyway.
    async fn share_hold(&self, h: &Hold) {
        let Some(saga) = h.saga.as_deref().filter(|_| h.attempt > 0) else {
            return;
        };
        let left = h
            .until
            .saturating_duration_since(tokio::time::Instant::now())
            + holds::RELEASED_FOR;
        let until = self.ctx.clock.now_ms() + left.as_millis() as i64;
        if let Err(e) = storage::held::hold(&self.ctx.db, &self.service, saga, until).await {
            tracing::debug!(service = %self.service, "held step not shared: {e}");
        }
    }

    /// The span of handling `record`, a child of the trace context it carries (a record with
    /// none, or a malformed one, begins a trace).
    fn consume_span(&self, service: &Service, record: &Record) -> tracing::Span {
        use crate::telemetry::Carrier as _;
        let header = |name: &str| record.headers.as_slice().header(name).unwrap_or_default();
        let span = tracing::info_span!(
            "consume",
            otel.kind = "consumer",
            saga.service = %self.service,
            saga.version = %service.version(),
            saga.id = %header(cloudevents::SUBJECT),
            cloudevents.event_id = %header(cloudevents::ID),
            cloudevents.event_type = %header(cloudevents::TYPE),
            messaging.destination.name = %self.ctx.config.kafka.logical(&record.topic),
            messaging.destination.partition.id = record.partition,
            messaging.kafka.offset = record.offset,
            trace_id = tracing::field::Empty,
        );
        crate::telemetry::follow(&span, record.headers.as_slice());
        span
    }

    /// The event a record carries, within the limits (`crate::limits`), or why not.
    fn decode(&self, record: &Record) -> Result<Event, Malformed> {
        let config = &self.ctx.config;
        let event = cloudevents::decode(
            config.kafka.logical(&record.topic),
            &record.headers,
            &record.payload,
        )?;
        let headers: usize = record.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        config.limits.event(&event, headers)?;
        Ok(event)
    }

    async fn door(&self, service: &Service, items: &[Item<'_>]) -> Result<Door, storage::Error> {
        let ids: Vec<String> = items.iter().map(Item::inbox_id).collect();
        let events: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut sagas: Vec<&str> = items.iter().filter_map(Item::saga).collect();
        sagas.sort_unstable();
        sagas.dedup();
        if !service.keeps_ledger() {
            sagas.clear();
        }
        // Sagas of forward events that carry a deadline: their expiry, as stored.
        let mut timed: Vec<&str> = items
            .iter()
            .filter(|i| {
                i.event.as_ref().is_ok_and(|e| {
                    e.deadline_ms.is_some() && service.step(&e.topic, &e.type_) == Step::Forward
                })
            })
            .filter_map(Item::saga)
            .collect();
        timed.sort_unstable();
        timed.dedup();
        let mut compensated: Vec<&str> = items
            .iter()
            .filter(|i| {
                i.event
                    .as_ref()
                    .is_ok_and(|e| service.step(&e.topic, &e.type_) == Step::Compensation)
            })
            .filter_map(Item::saga)
            .collect();
        compensated.sort_unstable();
        compensated.dedup();
        // The keys the handlers read last time for events of these types and subjects.
        let mut ahead: Vec<String> = Vec::new();
        if let Some(learned) = &self.ahead {
            for event in items.iter().filter_map(|i| i.event.as_ref().ok()) {
                ahead.extend(learned.keys(&event.topic, &event.type_, &event.subject));
            }
            ahead.sort_unstable();
            ahead.dedup();
        }
        let ahead: Vec<&str> = ahead.iter().map(String::as_str).collect();
        let ask = storage::door::Ask {
            service: &self.service,
            now_ms: self.ctx.clock.now_ms(),
            events: &events,
            ledger: &sagas,
            held: &compensated,
            timed: &timed,
            state: &ahead,
        };
        let mut conn = self.ctx.db.pool().acquire().await?;
        storage::door::read(&mut conn, &ask).await
    }

    /// The inbox entry of `item` as handled by `service` now: outcome `applied`, no detail;
    /// callers set what differs. (A malformed event has no saga or type.)
    fn entry<'a>(
        &'a self,
        service: &'a Service,
        item: &'a Item<'_>,
        id: &'a str,
        now_ms: i64,
    ) -> inbox::Entry<'a> {
        let (saga, event_type, topic) = match &item.event {
            Ok(e) => (e.subject.as_str(), e.type_.as_str(), e.topic.as_str()),
            Err(_) => ("", "", self.ctx.config.kafka.logical(&item.record.topic)),
        };
        inbox::Entry {
            service: service.name(),
            event_id: id,
            saga,
            event_type,
            topic,
            outcome: inbox::Outcome::Applied,
            detail: None,
            version: service.version(),
            handled_ms: now_ms,
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        backoff(&self.ctx.config.worker, attempt)
    }

    /// How many transactions a batch of `events` is committed in (`worker.commit_lanes`): one
    /// per [`LANE_EVENTS`] events at most. A small batch's commit is a few round trips, which a
    /// second transaction would double (measured at 8 clients: more statements and Kafka
    /// transactions per saga, fewer sagas/s). One on SQLite, whose writers take turns anyway.
    fn lanes(&self, events: usize) -> usize {
        match self.ctx.db.dialect() {
            storage::Dialect::Sqlite => 1,
            storage::Dialect::Postgres => {
                let most = self.ctx.config.worker.commit_lanes;
                (events / LANE_EVENTS).clamp(1, most.max(1))
            }
        }
    }

    /// Retry a database step with backoff until it succeeds; `None` when stopping.
    async fn retry_db<T, F, Fut>(&self, mut step: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, storage::Error>>,
    {
        let mut attempt = 1;
        loop {
            match step().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    tracing::warn!(service = %self.service, attempt, "database step failed, retrying: {e}");
                    if !self.pause(self.backoff(attempt)).await {
                        return None;
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// Sleep unless stopping; `false` if the stop came first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Events per commit lane, at least (see `Worker::lanes`).
const LANE_EVENTS: usize = 16;

/// A batch's events shared out between at most `lanes` transactions: whole partitions, in
/// turn as they first appear, each lane's events in batch order. A partition's events in one
/// transaction keep their order. Partitions whose events touch a state key in common (a
/// user's points) share a lane, where the later event is chained on the earlier (`chain`)
/// instead of meeting it as a conflict across two transactions.
fn commit_lanes(items: &[Item<'_>], verdicts: &[Verdict], lanes: usize) -> Vec<Vec<usize>> {
    let partitions = items
        .iter()
        .map(|i| (i.record.topic.as_str(), i.record.partition));
    // With one lane there is nothing to join.
    let touched = verdicts.iter().map(|verdict| match lanes {
        0 | 1 => Vec::new(),
        _ => verdict.keys().collect(),
    });
    share_out(joined(partitions.zip(touched)).into_iter(), lanes)
}

/// For each event (its partition and the state keys it touches), a number for its group:
/// partitions joined when their events touch a key in common, numbered as they first appear.
fn joined<'k, P: std::hash::Hash + Eq>(
    events: impl Iterator<Item = (P, Vec<&'k str>)>,
) -> Vec<usize> {
    let mut number: HashMap<P, usize> = HashMap::new();
    let mut parent: Vec<usize> = Vec::new();
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut of_event = Vec::new();
    fn root(parent: &mut [usize], mut p: usize) -> usize {
        while parent[p] != p {
            parent[p] = parent[parent[p]];
            p = parent[p];
        }
        p
    }
    for (partition, keys) in events {
        let next = number.len();
        let p = *number.entry(partition).or_insert(next);
        if p == parent.len() {
            parent.push(p);
        }
        for key in keys {
            let (a, b) = (
                root(&mut parent, p),
                root(&mut parent, *first.entry(key).or_insert(p)),
            );
            parent[a.max(b)] = a.min(b);
        }
        of_event.push(p);
    }
    of_event.into_iter().map(|p| root(&mut parent, p)).collect()
}

/// Indices of `keys` in at most `lanes` groups: equal keys in one group, keys dealt out in
/// turn as they first appear, indices in order within a group.
fn share_out<K: std::hash::Hash + Eq>(
    keys: impl Iterator<Item = K>,
    lanes: usize,
) -> Vec<Vec<usize>> {
    let mut lane_of: HashMap<K, usize> = HashMap::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for (i, key) in keys.enumerate() {
        let next = lane_of.len() % lanes.max(1);
        let lane = *lane_of.entry(key).or_insert(next);
        if out.len() <= lane {
            out.resize_with(lane + 1, Vec::new);
        }
        out[lane].push(i);
    }
    out
}

/// The pause before retry `attempt + 1`: `retry_backoff_ms` doubling per attempt, capped at
/// `max_backoff_ms`.
fn backoff(cfg: &crate::config::Worker, attempt: u32) -> Duration {
    crate::backoff::exponential(cfg.retry_backoff_ms, attempt, cfg.max_backoff_ms)
}

#[cfg(test)]
mod tests {
    use super::{joined, share_out};

    #[test]
    fn partitions_touching_a_key_in_common_share_a_lane() {
        let events = [
            ("p0", vec!["user/gus", "tx/o1"]),
            ("p1", vec!["user/hal"]),
            ("p2", vec!["user/ida"]),
            ("p3", vec!["user/gus", "user/ida"]),
            ("p0", vec![]),
            ("p4", vec!["user/jo"]),
        ];
        let groups = joined(events.into_iter());
        assert_eq!(
            groups,
            vec![0, 1, 0, 0, 0, 4],
            "p0, p2 and p3 joined through p3"
        );
        assert_eq!(
            share_out(groups.into_iter(), 2),
            vec![vec![0, 2, 3, 4, 5], vec![1]]
        );
    }

    #[test]
    fn partitions_are_dealt_out_whole_and_in_order() {
        let keys = ["a", "b", "a", "c", "b", "d", "a"];
        assert_eq!(
            share_out(keys.iter(), 2),
            vec![vec![0, 2, 3, 6], vec![1, 4, 5]]
        );
        assert_eq!(share_out(keys.iter(), 1), vec![vec![0, 1, 2, 3, 4, 5, 6]]);
        assert_eq!(share_out(keys.iter(), 0), vec![vec![0, 1, 2, 3, 4, 5, 6]]);
        assert!(share_out(std::iter::empty::<&str>(), 2).is_empty());
    }
}
