//! The outbox relay: publishes committed outbox rows to Kafka, one Kafka transaction per batch,
//! then deletes them.
//!
//! - All-or-nothing across topics (A4): a batch that fails anywhere is aborted, nothing of it is
//!   visible to `read_committed` consumers, and its rows stay for the next attempt.
//! - Order (A6): rows go out in `id` order within their slot, which is commit order for the
//!   rows of one saga (a saga's steps are committed one after another by its partition's
//!   worker, and all its rows carry its key, so the same bucket and slot).
//! - Slots (issue 12): the outbox is divided among `relay.slots` publishing loops by the
//!   bucket of each row's key (`outbox::bucket`, modulo the slot count), each leased as
//!   `relay/<slot>` and spread over the instances like partitions ([`Relays`]: a fair share of
//!   slots ÷ live members), so relaying grows with instances. One slot runs on one instance
//!   at a time (A5); its `transactional.id` belongs to the slot, not the instance, so a
//!   successor's `init_transactions` fences the old producer and aborts whatever it left
//!   open; we never depend on the broker expiring a transaction. A loop publishes only while
//!   its lease was renewed within two thirds of `relay.lease_ttl_ms`.
//! - Generations: every new producer (a successor, or this relay after any failure) first
//!   re-initialises the previous generation's id `saga-relay-<slot>-g<N>` — fencing a zombie and
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
//!   `integration_broker_restart`). Published rows stay in the outbox, marked, for
//!   `relay.republish_window_ms`; once its producer saw the broker connections go down, the
//!   slot marks the rows it published in the window before that waiting again, in one
//!   statement, and they go out again in their order before anything newer. Being in the
//!   database, they go out even if this relay dies right after (a kill storm's next kill
//!   often follows a broker restart at once: with the window kept in memory those rows were
//!   lost). Consumers' inboxes absorb the copies of what was not lost.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer as _, PurgeConfig};

use crate::admission::Door;
use crate::clock::Clock;
use crate::config::Config;
use crate::health::Board;
use crate::kafka::doorbell::Doorbell;
use crate::kafka::links::Links;
use crate::metrics::Metrics;
use crate::stats::Stats;
use crate::storage::{generations, lease, outbox, Db};

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

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a slot deletes the rows it published more than `relay.republish_window_ms` ago.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

type FutureProducer = rdkafka::producer::FutureProducer<Links>;

/// How the instance reaches its relay: a commit that wrote outbox rows wakes the slot loops
/// running here. Cloning is cheap.
#[derive(Clone)]
pub struct Handle {
    wakes: Arc<[Notify]>,
    doorbell: Doorbell,
}

impl Handle {
    /// A handle for `slots` relay slots (1 to [`outbox::BUCKETS`]).
    pub fn new(slots: u32) -> Self {
        let slots = slots.clamp(1, outbox::BUCKETS);
        Handle {
            wakes: (0..slots).map(|_| Notify::new()).collect(),
            doorbell: Doorbell::default(),
        }
    }

    /// Rung after every Kafka commit with where the records went, for local consumers.
    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }

    /// Rows were committed: every slot loop here looks at the outbox at once.
    pub fn wake(&self) {
        for wake in self.wakes.iter() {
            wake.notify_one();
        }
    }

    pub fn slots(&self) -> u32 {
        self.wakes.len() as u32
    }

    fn woken(&self, slot: u32) -> &Notify {
        &self.wakes[slot as usize % self.wakes.len()]
    }
}

fn lease_name(slot: u32) -> String {
    format!("relay/{slot}")
}

/// What the relay reaches of its instance.
pub struct Context {
    pub config: Arc<Config>,
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    /// Its own handle: what commits wake, and the doorbell it rings.
    pub handle: Handle,
    /// The ingress's flow control, told how far behind the relay is.
    pub door: Arc<Door>,
    pub health: Arc<Board>,
    pub metrics: Arc<Metrics>,
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
}

/// The relay slots of this instance (see the module docs): every tick (a third of
/// `relay.lease_ttl_ms`) it renews the slot leases it holds, gives back what exceeds its fair
/// share (slots ÷ live members, rounded up) and takes free or expired ones up to it, running
/// one publishing loop per slot held.
pub struct Relays {
    ctx: Arc<Context>,
    faults: Arc<dyn Faults>,
    running: BTreeMap<u32, Running>,
    /// The order this instance tries free slots in: rotated by its id, so instances starting
    /// together do not contend for the same first slots.
    order: Vec<u32>,
}

/// A slot loop running here.
struct Running {
    stop: CancellationToken,
    lease: Arc<Lease>,
    task: tokio::task::JoinHandle<()>,
}

/// Until when a slot loop may publish: a little less than the lease it was last renewed for,
/// on the monotonic clock (the lease itself is on the saga clock, which tests move).
struct Lease(std::sync::Mutex<Instant>);

impl Lease {
    /// Renewed by a statement sent at `asked`: the lease runs from then, not from when the
    /// answer came (a slow database must not stretch it past the stored expiry).
    fn renewed(&self, asked: Instant, ttl_ms: i64) {
        let margin = Duration::from_millis((ttl_ms - ttl_ms / 3).max(0) as u64);
        *self.0.lock().expect("lease lock") = asked + margin;
    }

    fn valid(&self) -> bool {
        Instant::now() < *self.0.lock().expect("lease lock")
    }
}

impl Relays {
    pub fn new(ctx: Arc<Context>, faults: Arc<dyn Faults>) -> Self {
        let slots = ctx.handle.slots();
        let spin = ctx
            .config
            .instance_id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let mut order: Vec<u32> = (0..slots).collect();
        order.rotate_left((spin % slots) as usize);
        Relays {
            ctx,
            faults,
            running: BTreeMap::new(),
            order,
        }
    }

    pub async fn run(mut self) {
        let ttl = self.ctx.config.relay.lease_ttl_ms;
        let every = Duration::from_millis((ttl / 3).max(10));
        while !self.ctx.shutdown.is_cancelled() {
            if let Err(e) = self.tick().await {
                // Loops whose lease is not renewed in time stop publishing on their own.
                tracing::warn!("relay slot leases: {e}");
            }
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
        let slots: Vec<u32> = self.running.keys().copied().collect();
        for slot in slots {
            self.give_back(slot).await;
        }
    }

    /// One round of renew, give back, take.
    async fn tick(&mut self) -> Result<(), crate::storage::Error> {
        let ctx = self.ctx.clone();
        let (db, me) = (&ctx.db, &ctx.config.instance_id);
        let ttl = self.ctx.config.relay.lease_ttl_ms as i64;
        let asked = Instant::now();
        let now = self.ctx.clock.now_ms();
        let slots = self.ctx.handle.slots();
        let members = lease::count_held(db, crate::ownership::MEMBERS, now)
            .await?
            .max(1) as u32;
        let share = slots.div_ceil(members) as usize;
        let mine: Vec<u32> = self.running.keys().copied().collect();
        for slot in mine {
            if lease::acquire(db, &lease_name(slot), me, now, ttl).await? {
                self.running[&slot].lease.renewed(asked, ttl);
            } else if let Some(lost) = self.running.remove(&slot) {
                tracing::warn!(slot, "relay slot lease lost: another instance holds it");
                lost.stop.cancel();
            }
        }
        while self.running.len() > share {
            let last = *self.running.keys().next_back().expect("more than share");
            self.give_back(last).await;
        }
        for slot in self.order.clone() {
            if self.running.len() >= share {
                break;
            }
            if !self.running.contains_key(&slot)
                && lease::acquire(db, &lease_name(slot), me, now, ttl).await?
            {
                self.start(slot, asked, ttl);
            }
        }
        let held: Vec<u32> = self.running.keys().copied().collect();
        self.ctx.metrics.relay_slots().set(held.len() as f64);
        self.ctx.health.relay(held, slots);
        Ok(())
    }

    fn start(&mut self, slot: u32, asked: Instant, ttl_ms: i64) {
        tracing::info!(slot, "relay slot taken");
        self.ctx.health.publishing(slot, false);
        let stop = self.ctx.shutdown.child_token();
        let lease = Arc::new(Lease(std::sync::Mutex::new(Instant::now())));
        lease.renewed(asked, ttl_ms);
        let relay = Relay {
            ctx: self.ctx.clone(),
            faults: self.faults.clone(),
            links: Links::new("relay producer"),
            slot,
            name: lease_name(slot),
            stop: stop.clone(),
            lease: lease.clone(),
        };
        let task = tokio::spawn(relay.run());
        self.running.insert(slot, Running { stop, lease, task });
    }

    /// Stop the slot's loop, then release its lease so a successor need not wait for it to
    /// expire. A loop that does not stop within a tick keeps the lease until it expires: no
    /// successor publishes beside it (and one that did would fence it).
    async fn give_back(&mut self, slot: u32) {
        let Some(running) = self.running.remove(&slot) else {
            return;
        };
        running.stop.cancel();
        let wait = Duration::from_millis((self.ctx.config.relay.lease_ttl_ms / 3).max(10));
        if tokio::time::timeout(wait, running.task).await.is_err() {
            tracing::warn!(
                slot,
                "relay slot loop did not stop in time: its lease expires"
            );
            return;
        }
        let me = &self.ctx.config.instance_id;
        if let Err(e) = lease::release(&self.ctx.db, &lease_name(slot), me).await {
            tracing::debug!(slot, "relay lease release failed: {e}");
        }
        tracing::info!(slot, "relay slot given back");
    }
}

/// Marking the rows of the last batch sent published (deleting them, with no republish
/// window), as the dialect does it best:
/// - SQLite: while the next batch is read and sent. The statement queues for the write lock
///   behind the workers' commits (3.3 ms on average, 8 ms at p90, at 8 bench clients), which
///   the next batch need not wait for. One marking at a time; its rows are left out of
///   fetches meanwhile.
/// - PostgreSQL: by the statement that reads the next batch (`outbox::mark_and_fetch`): there
///   is no lock to wait for, and it is a statement fewer per batch.
struct Marking {
    ctx: Arc<Context>,
    /// Deleted rather than kept when `relay.republish_window_ms` is 0.
    window: i64,
    folded: bool,
    /// SQLite: the rows whose marking is under way. PostgreSQL: the rows sent and not yet
    /// marked.
    ids: HashSet<i64>,
    task: Option<tokio::task::JoinHandle<Result<(), crate::storage::Error>>>,
}

impl Marking {
    fn new(ctx: &Arc<Context>, window: i64) -> Self {
        Marking {
            ctx: ctx.clone(),
            window,
            folded: ctx.db.dialect() == crate::storage::Dialect::Postgres,
            ids: HashSet::new(),
            task: None,
        }
    }

    /// When the rows are marked: now (host clock), or `None` to delete them.
    fn stamp(ctx: &Context, window: i64) -> Option<i64> {
        (window > 0).then(|| ctx.clock.now_ms())
    }

    /// Mark `ids` in a statement of their own.
    async fn mark(ctx: &Context, window: i64, ids: &[i64]) -> Result<(), crate::storage::Error> {
        outbox::mark(&ctx.db, ids, Marking::stamp(ctx, window)).await
    }

    /// The rows of a batch Kafka committed are to be marked.
    fn start(&mut self, ids: Vec<i64>) {
        self.ids.extend(&ids);
        if self.folded {
            return;
        }
        let (ctx, window) = (self.ctx.clone(), self.window);
        self.task = Some(tokio::spawn(async move {
            Marking::mark(&ctx, window, &ids).await
        }));
    }

    /// The oldest `limit` waiting rows of `slot` of `slots`, none of them among the rows
    /// being marked.
    async fn fetch(
        &mut self,
        slot: u32,
        slots: u32,
        limit: u32,
    ) -> Result<Vec<outbox::Row>, crate::storage::Error> {
        if self.folded {
            let sent: Vec<i64> = self.ids.iter().copied().collect();
            let at = Marking::stamp(&self.ctx, self.window);
            let rows =
                outbox::mark_and_fetch(&self.ctx.db, &sent, at, (slot, slots), limit).await?;
            self.ids.clear();
            return Ok(rows);
        }
        // Rows whose marking is under way come back from the fetch: leave them out.
        let more = limit + self.ids.len() as u32;
        let mut rows = outbox::fetch(&self.ctx.db, slot, slots, more).await?;
        rows.retain(|r| !self.ids.contains(&r.id));
        rows.truncate(limit as usize);
        Ok(rows)
    }

    /// Wait until the rows sent are marked. Rows it failed to mark are fetched and published
    /// again; consumers' inboxes absorb the copies.
    async fn finish(&mut self) {
        let marked = match self.task.take() {
            Some(task) => match task.await {
                Ok(marked) => marked.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            None if self.folded && !self.ids.is_empty() => {
                let sent = Vec::from_iter(self.ids.iter().copied());
                Marking::mark(&self.ctx, self.window, &sent)
                    .await
                    .map_err(|e| e.to_string())
            }
            None => Ok(()),
        };
        if let Err(e) = marked {
            tracing::warn!("relay could not mark rows published: {e}");
        }
        self.ids.clear();
    }
}

/// The publishing loop of one relay slot, while this instance holds its lease.
struct Relay {
    ctx: Arc<Context>,
    faults: Arc<dyn Faults>,
    links: Links,
    slot: u32,
    /// `relay/<slot>`: its lease, its generations and its part at the door.
    name: String,
    stop: CancellationToken,
    lease: Arc<Lease>,
}

impl Relay {
    async fn run(self) {
        let cfg = &self.ctx.config.relay;
        let poll = Duration::from_millis(cfg.poll_interval_ms);
        let db = &self.ctx.db;
        let slots = self.ctx.handle.slots();
        let mut failures = 0u32;
        let window = cfg.republish_window_ms as i64;
        // The connection loss last answered (`Links::lost_ms`), and when published rows past
        // the window were last deleted.
        let mut answered = 0i64;
        let mut swept: Option<Instant> = None;
        let mut marking = Marking::new(&self.ctx, window);
        // The slot's producer, made when first needed; the loss watcher drops it too.
        let producer: Arc<std::sync::Mutex<Option<FutureProducer>>> = Arc::default();
        // When the connections drop, at once (not when this loop next comes round: it may be
        // waiting for deliveries, and be killed before it does): the producer's queued and
        // in-flight records are purged, so that it sends nothing to a broker that restarted
        // and may have forgotten its producer id (noida-db then took part of a transaction
        // that nothing could ever end, and `read_committed` readers of that partition saw
        // nothing after it again); and the recent rows are marked waiting again.
        let _watch = {
            let (links, stop) = (self.links.clone(), self.stop.clone());
            let (ctx, slot, producer) = (self.ctx.clone(), self.slot, producer.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = links.next_loss() => {}
                    }
                    let stale = producer.lock().expect("producer lock").take();
                    if let Some(stale) = stale {
                        stale.purge(PurgeConfig::default().queue().inflight().non_blocking());
                    }
                    if window == 0 {
                        continue;
                    }
                    let lost = links.lost_ms();
                    if let Err(e) = publish_again(&ctx, &links, slot, lost, window).await {
                        tracing::warn!("relay could not mark its recent rows waiting again: {e}");
                    }
                }
            })
        };
        while !self.stop.is_cancelled() {
            if !self.lease.valid() {
                // Not renewed in time (the database is slow or away): publish nothing until
                // it is. The producer stays: a new one costs two `init_transactions` and an
                // abort marker, and if another instance took the slot meanwhile, this loop is
                // stopped (and its producer fenced) anyway.
                self.idle(poll).await;
                continue;
            }
            let lost = self.links.lost_ms();
            if lost != answered {
                // Recent rows are to be marked waiting again: after they were marked sent.
                marking.finish().await;
                // A producer from before the loss may not be known to the broker any more.
                forget(&producer);
                // Again here: a batch committed just before the loss may have been marked
                // published after the watcher marked the window waiting.
                if window > 0 {
                    let again = publish_again(&self.ctx, &self.links, self.slot, lost, window);
                    if let Err(e) = again.await {
                        tracing::warn!("relay could not mark its recent rows waiting again: {e}");
                        self.idle(poll).await;
                        continue;
                    }
                }
                answered = lost;
            }
            if window > 0 && swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
                let before = self.ctx.clock.now_ms() - window;
                match outbox::sweep(db, self.slot, slots, before).await {
                    Ok(_) => swept = Some(Instant::now()),
                    Err(e) => tracing::warn!("relay could not delete its old published rows: {e}"),
                }
            }
            // The producer first, before there is anything to publish: a new one waits for
            // librdkafka to connect to the broker its metadata named (50–550 ms on the test
            // broker), which the first events after a start or a loss would otherwise wait for.
            let made = producer.lock().expect("producer lock").clone();
            let p = match made {
                Some(p) => p,
                None => match self.producer().await {
                    Ok(p) => {
                        *producer.lock().expect("producer lock") = Some(p.clone());
                        self.ctx.health.publishing(self.slot, true);
                        p
                    }
                    Err(e) => {
                        failures += 1;
                        Stats::add(&self.ctx.stats.relay_retries, 1);
                        tracing::warn!("relay could not make its producer, will retry: {e}");
                        self.idle(backoff(failures)).await;
                        continue;
                    }
                },
            };
            // Making a producer takes a while: the slot may have moved meanwhile.
            if self.stop.is_cancelled() || !self.lease.valid() {
                continue;
            }
            let rows = match self.next_batch(&mut marking).await {
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
            match self.publish(&p, &rows).await {
                Ok(()) => {
                    failures = 0;
                    if rows.len() < cfg.batch_size as usize {
                        self.ctx.door.caught_up(&self.name);
                    }
                    marking.finish().await;
                    marking.start(rows.iter().map(|r| r.id).collect());
                }
                Err(Error::Refused { index, error }) => {
                    // One bad row must not hold up the others: set it aside, go on at once.
                    forget(&producer);
                    let reason = format!("the broker refused it: {error}");
                    self.park(&rows[index], &reason).await;
                }
                Err(e) => {
                    failures += 1;
                    Stats::add(&self.ctx.stats.relay_retries, 1);
                    tracing::warn!(rows = rows.len(), "relay batch failed, will retry: {e}");
                    // A fresh producer re-runs init_transactions, which aborts anything open.
                    forget(&producer);
                    self.idle(backoff(failures)).await;
                }
            }
        }
        marking.finish().await;
    }

    /// Park the rows larger than the broker takes (`limits.broker_message_bytes`) before
    /// they are sent: a refused send would abort the whole transaction. Nothing the runtime
    /// lets in is that large; rows from before a limit was lowered can be.
    async fn park_oversized(&self, rows: Vec<outbox::Row>) -> Vec<outbox::Row> {
        let max = self.ctx.config.limits.broker_message_bytes;
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
        let now = self.ctx.clock.now_ms();
        match outbox::park(&self.ctx.db, row.id, reason, now).await {
            Ok(()) => Stats::add(&self.ctx.stats.parked, 1),
            // It stays in the outbox and is tried (and parked) again.
            Err(e) => tracing::warn!(id = row.id, "could not park an outbox row: {e}"),
        }
    }

    /// A transactional producer of a new generation (see the module docs): the previous
    /// generation's id fenced and its open transaction aborted first.
    async fn producer(&self) -> Result<FutureProducer, Error> {
        let db = &self.ctx.db;
        // As long as a send may take: with the broker away (a producer is made anew after
        // every connection loss) this fails, and is retried, as a batch would.
        let ms = self.ctx.config.relay.send_timeout_ms;
        let wait = Duration::from_millis(ms).clamp(Duration::from_millis(100), KAFKA_TIMEOUT);
        loop {
            let previous = generations::current(db, &self.name).await?;
            if previous > 0 {
                let old = self.transactional(previous)?;
                blocking(move || old.init_transactions(wait)).await?;
            }
            if !generations::advance(db, &self.name, previous).await? {
                continue; // another holder moved it meanwhile: fence that one too
            }
            let producer = self.transactional(previous + 1)?;
            let p = producer.clone();
            blocking(move || p.init_transactions(wait)).await?;
            tracing::info!(
                slot = self.slot,
                generation = previous + 1,
                "relay producer ready"
            );
            return Ok(producer);
        }
    }

    fn transactional(&self, generation: i64) -> Result<FutureProducer, Error> {
        let kafka = &self.ctx.config.kafka;
        let max = self.ctx.config.limits.broker_message_bytes;
        let send_timeout = self.ctx.config.relay.send_timeout_ms.clamp(1, 60_000);
        let id = kafka.topic(&format!("saga-relay-{}-g{generation}", self.slot));
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

    /// The next batch of the slot: its oldest waiting rows, oversized ones parked.
    async fn next_batch(
        &self,
        marking: &mut Marking,
    ) -> Result<Vec<outbox::Row>, crate::storage::Error> {
        let limit = self.ctx.config.relay.batch_size;
        let slots = self.ctx.handle.slots();
        let rows = marking.fetch(self.slot, slots, limit).await?;
        // Behind only with a backlog: a full batch.
        let oldest = rows.iter().map(|r| r.created_ms).min();
        if let Some(oldest) = oldest.filter(|_| rows.len() >= limit as usize) {
            self.ctx.door.report(&self.name, oldest);
        }
        Ok(self.park_oversized(rows).await)
    }

    async fn publish(&self, producer: &FutureProducer, rows: &[outbox::Row]) -> Result<(), Error> {
        // A `relay publish` span per row, a child of the span that emitted it, ending with the
        // transaction; the record carries the relay span's context on.
        let spans: Vec<tracing::Span> = rows.iter().map(publish_span).collect();
        let traces: Vec<Vec<(String, String)>> =
            spans.iter().map(crate::telemetry::carried).collect();
        producer.begin_transaction()?;
        match self.send_all(producer, rows, &traces).await {
            Ok(delivered) => {
                let p = producer.clone();
                blocking(move || {
                    settle(&p);
                    p.commit_transaction(KAFKA_TIMEOUT)
                })
                .await?;
                self.ctx
                    .handle
                    .doorbell()
                    .ring(
                        rows.iter()
                            .zip(&delivered)
                            .map(|(row, &(partition, offset))| {
                                (row.message.topic.as_str(), partition, offset)
                            }),
                    );
            }
            Err(e) => {
                let p = producer.clone();
                // Briefly: if the broker is away the next producer generation aborts it anyway.
                let wait = Duration::from_millis(self.ctx.config.relay.send_timeout_ms.max(100));
                let wait = wait.min(KAFKA_TIMEOUT);
                if let Err(abort) = blocking(move || p.abort_transaction(wait)).await {
                    tracing::warn!("relay could not abort its transaction: {abort}");
                }
                return Err(e);
            }
        }
        let stats = &self.ctx.stats;
        Stats::add(&stats.published, rows.len() as u64);
        Stats::add(&stats.relay_batches, 1);
        self.ctx.metrics.relay_rows.record(rows.len() as f64);
        let now = self.ctx.clock.now_ms();
        for row in rows {
            let waited = (now - row.created_ms).max(0);
            self.ctx.metrics.relay_delay.record(waited as f64 / 1000.0);
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        self.faults.after_commit(&ids).map_err(Error::Injected)
    }

    /// Send every row, then wait for every delivery report before the commit: committing right
    /// after `send` makes librdkafka flush inside the commit, ~100 ms per transaction.
    /// Where each row went: (partition, offset).
    async fn send_all(
        &self,
        producer: &FutureProducer,
        rows: &[outbox::Row],
        traces: &[Vec<(String, String)>],
    ) -> Result<Vec<(i32, i64)>, Error> {
        let mut deliveries = Vec::with_capacity(rows.len());
        for (index, (row, trace)) in rows.iter().zip(traces).enumerate() {
            self.faults.before_send(index).map_err(Error::Injected)?;
            let m = &row.message;
            // The stored trace context gives way to the relay span's, when there is one.
            let stored = m
                .headers
                .iter()
                .filter(|(k, _)| trace.is_empty() || !crate::telemetry::is_trace_header(k));
            let headers = stored.chain(trace).fold(
                OwnedHeaders::new_with_capacity(m.headers.len() + trace.len()),
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
        let mut delivered = Vec::with_capacity(rows.len());
        for (index, delivery) in deliveries.into_iter().enumerate() {
            let d = delivery
                .await
                .map_err(|_| Error::Cancelled)?
                .map_err(|(e, _)| refused(index, e))?;
            delivered.push((d.partition, d.offset));
        }
        Ok(delivered)
    }

    async fn idle(&self, d: Duration) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.ctx.handle.woken(self.slot).notified() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }
}

/// The span of publishing one outbox row, a child of the trace context it carries.
fn publish_span(row: &outbox::Row) -> tracing::Span {
    let m = &row.message;
    let span = tracing::info_span!(
        "relay publish",
        otel.kind = "producer",
        messaging.destination.name = %m.topic,
        cloudevents.event_id = %m.event_id,
        saga.id = %m.key,
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::follow(&span, m.headers.as_slice());
    span
}

/// Drop the slot's producer (outside the lock: dropping one may wait for librdkafka).
fn forget(producer: &std::sync::Mutex<Option<FutureProducer>>) {
    let old = producer.lock().expect("producer lock").take();
    drop(old);
}

/// The broker dropped the connections of slot `slot`'s producer at `lost` (`links`' clock):
/// mark the rows the slot published from `window` ms before then waiting again (see the
/// module docs).
async fn publish_again(
    ctx: &Context,
    links: &Links,
    slot: u32,
    lost: i64,
    window: i64,
) -> Result<(), Error> {
    let ago = links.now_ms() - lost;
    let since = ctx.clock.now_ms() - ago - window;
    let rows = outbox::unpublish(&ctx.db, slot, ctx.handle.slots(), since).await?;
    if rows > 0 {
        tracing::warn!(
            slot,
            rows,
            "the broker dropped its connections: publishing the last rows again"
        );
    }
    Ok(())
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

/// Wait until librdkafka counts every message of the transaction done, briefly.
///
/// rust-rdkafka's `commit_transaction` flushes first, and its flush, finding a message still
/// counted, polls the producer's queue for up to 100 ms — the queue librdkafka's thread serves
/// for the delivery futures, so nothing arrives and it waits the whole 100 ms. Every delivery
/// has been reported when this runs, but its count drops only after the report was handed
/// over: about one commit in a hundred came in that window and took 100 ms (an outlier in
/// every relay hop's p99).
fn settle(producer: &FutureProducer) {
    let until = Instant::now() + Duration::from_millis(50);
    while producer.in_flight_count() > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// How long a slot waits after its `failures`-th failure in a row: 100 ms, doubling, at most 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis((50u64 << failures.min(6)).min(5_000))
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
