//! One consumer per service and instance, reading committed records only (`read_committed`), so
//! an aborted or still-open relay transaction is never seen.
//!
//! Assignment and offsets are ours, not the broker's group coordinator's: `crate::ownership`
//! decides which partitions this instance reads (database leases) and [`Consumer::assign`]s them
//! at the positions stored in the database, which the worker advances in the same transaction
//! as the events' effects. So a crash resumes exactly after what was committed, and a crashed
//! instance's partitions move when its leases expire, whatever the broker does with dead group
//! members.
//!
//! Stall watchdog: two defects of noida-db 0.2.3 (the test broker) can stop a `read_committed`
//! partition for good, and the watchdog gets every partition moving again on it (on a correct
//! broker it costs a re-fetch now and then). See `integration_broker_conformance`, which pins
//! both so the workaround can go when the broker is fixed.
//! - A consumer waiting behind an open transaction that is then aborted never fetches again; a
//!   seek to its own position un-sticks it.
//! - A consumer whose first fetch starts *after* an aborted transaction's abort marker receives
//!   nothing on that partition, ever (every failover or restart at a stored position past a
//!   relay abort); one starting at or before the marker sees everything.
//!
//! So each partition that has delivered nothing for `stall_reseek` while the broker reports
//! committed data beyond its position is re-sought, first in place, then further and further
//! back (256, 512, … records); what is read again below its position was handled already and
//! is dropped here, never handed out. Once a re-read delivered, the fetch is known to work and
//! the partition is left alone until its end moves (then what lies beyond is aborted or open).
//!
//! Reading again after a connection loss: noida-db can lose records it acknowledged when it
//! restarts and give their offsets to new records (the relay's copies of its recent rows among
//! them), which a consumer already past those offsets would never see. So after its broker
//! connections dropped a consumer reads every partition again from where it was
//! `reread_after_loss_ms` before (each lane notes where it is about once a second); what was
//! handled already the worker finds in its inbox. A partition this consumer is assigned soon
//! after a loss that any instance saw (taken over from an instance killed around the broker
//! restart, or at a restart) has no such history here: `crate::ownership` starts it at the
//! first record stamped `reread_after_loss_ms` before that loss ([`Consumer::offsets_since`])
//! when that lies below its stored position.
//!
//! Resting: noida-db answers an empty fetch at once, where Kafka holds it, so an idle
//! librdkafka consumer asks thousands of times a second (see `kafka::doorbell`). A consumer
//! that has read everything the local relay announced, as soon as a fetch told the end of
//! every partition it resumed (else after `rest_after_ms` with nothing), pauses its
//! partitions until the relay announces more for one of them, or `rest_ms` passed; it also
//! rests while the worker handles a batch. librdkafka resumes at the last record
//! handed out (prefetched records are dropped and fetched again). Two librdkafka facts shape
//! it: a resume leaves the broker thread asleep (up to 1 s), so the rest seeks after resuming,
//! which wakes it; and a pause drops the fetch under way, so a consumer rests again only after
//! `enable.partition.eof` reported the end of every partition it resumed. A third: a pause
//! outlives the assignment, so every assignment resumes (or pauses, in a rest) each partition
//! not held. On by default
//! (`kafka.rest_ms = 25`); set 0 on Kafka, which holds fetches itself (README, "Fetches
//! answered at once").

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message as _};
use rdkafka::Offset;

use super::doorbell::Doorbell;
use super::links::Links;
use super::{Error, Settings};

/// A record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Record {
    /// Physical topic name.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
}

pub struct Consumer {
    inner: StreamConsumer<Links>,
    stall_reseek: Option<Duration>,
    /// Per assigned (physical topic, partition): where it is and what the watchdog knows.
    lanes: Mutex<HashMap<(String, i32), Lane>>,
    /// When the watchdog last looked at the lanes.
    watched: Mutex<Instant>,
    rest: Option<Rest>,
    /// What the local relay committed, also without rests: the watchdog's sign of records
    /// waiting for a partition that gets nothing.
    doorbell: Option<Doorbell>,
    /// Its partitions are paused for a rest (changed under the lanes lock).
    resting: AtomicBool,
    /// Partitions resumed (or assigned) whose end no fetch has reported since, and when that
    /// was: a rest before they are answered would drop the fetch under way, again and again.
    unanswered: AtomicUsize,
    resumed: Mutex<Instant>,
    /// Whether a fetch answered (a record or a partition's end) since the last assignment:
    /// the consumer is not only assigned but reading (`/readyz`).
    fetched: Arc<AtomicBool>,
    /// When the current rest began.
    rest_began: Mutex<Instant>,
    /// When a fetch last answered (a record or a partition's end), partitions were
    /// assigned, or the worker asked for a batch; and when it last warned that none had for
    /// long.
    answered_at: Mutex<Instant>,
    warned: Mutex<Option<Instant>>,
    /// How far back a consumer reads again after its broker connections dropped (0: not).
    reread_after_loss: Duration,
    /// The connection loss (`Links::lost_ms`) last answered with a re-read; 0: none yet.
    reread_for: AtomicI64,
}

/// When and how long an idle consumer rests (see the module docs).
struct Rest {
    after: Duration,
    at_most: Duration,
    doorbell: Doorbell,
}

/// One assigned partition, as the consumer and its watchdog see it.
#[derive(Debug)]
struct Lane {
    /// The next offset to hand out. librdkafka reports a position as invalid right after a
    /// seek, so the consumer keeps its own.
    next: i64,
    /// Records below this were handed out before a re-read (the watchdog's): dropped.
    skip_below: i64,
    /// The last time a record arrived or the lane was positioned.
    progress: Instant,
    /// Re-seeks since the last record handed out: 1 in place, then ever further back.
    step: u32,
    /// The partition's end when a re-read last delivered: the fetch works up to there.
    proven_end: Option<i64>,
    /// Held by the worker (paused): silence is expected.
    paused: bool,
    /// When a record of it last arrived (handed out or dropped), or it was made: unlike
    /// `progress`, not moved by the watchdog's re-seeks.
    heard: Instant,
    /// Where librdkafka fetches next: after the last record received (handed out or
    /// dropped), or where it was last sought.
    fetch_from: i64,
    /// Where it was lately (`next`, sampled about once a second, the oldest at or before
    /// `reread_after_loss` ago): what to read again after a broker connection loss.
    history: VecDeque<(Instant, i64)>,
    /// Held (paused) when the broker connections dropped: it reads again from its history
    /// when released, as the others did at once.
    reread_owed: bool,
}

impl Lane {
    fn at(offset: i64) -> Self {
        Lane {
            next: offset,
            skip_below: offset,
            progress: Instant::now(),
            step: 0,
            proven_end: None,
            paused: false,
            heard: Instant::now(),
            fetch_from: offset,
            history: VecDeque::from([(Instant::now(), offset)]),
            reread_owed: false,
        }
    }

    /// This lane made anew at `offset` (a hold, a release, an assignment), keeping where the
    /// old one was in the last `window`.
    fn replacing(old: Option<Lane>, offset: i64, paused: bool, window: Duration) -> Self {
        let mut lane = Lane {
            paused,
            ..Lane::at(offset)
        };
        if let Some(old) = old.filter(|_| !window.is_zero()) {
            lane.history = old.history;
            lane.reread_owed = old.reread_owed;
            lane.remember(Instant::now(), window);
        }
        lane
    }

    /// Note where the lane is now, and forget where it was more than `window` ago (but the
    /// last position before that).
    fn remember(&mut self, now: Instant, window: Duration) {
        let last = self.history.back().copied();
        if last.is_none_or(|(at, was)| was > self.next || now.duration_since(at) >= HISTORY_STEP) {
            self.history.push_back((now, self.next));
        }
        while self.history.len() > 1
            && self
                .history
                .get(1)
                .is_some_and(|(at, _)| now.duration_since(*at) >= window)
        {
            self.history.pop_front();
        }
    }

    /// Read again from the lowest position it had within the window: hand out everything
    /// from there (the worker's inbox drops what was handled). Where it went, if back.
    fn reread(&mut self) -> Option<i64> {
        self.reread_owed = false;
        let from = self.history.iter().map(|(_, at)| *at).min()?;
        if from >= self.fetch_from.max(self.next) {
            return None;
        }
        self.next = from;
        self.skip_below = from;
        self.fetch_from = from;
        self.step = 0;
        self.proven_end = None;
        self.progress = Instant::now();
        Some(from)
    }

    /// Where to seek if this lane looks stuck, given the partition's end (`None` if unknown),
    /// or `None` to leave it be.
    fn reseek(&mut self, end: Option<i64>, quiet: Duration, now: Instant) -> Option<i64> {
        if self.paused || now.duration_since(self.progress) < quiet {
            return None;
        }
        // At most the commit marker of the last transaction lies beyond: nothing to deliver.
        if end.is_some_and(|end| end <= self.next + 1) {
            self.step = 0;
            return None;
        }
        // A re-read delivered and nothing was added since: the rest is aborted or still open.
        if self.proven_end.is_some() && (end.is_none() || end == self.proven_end) {
            return None;
        }
        self.step += 1;
        self.progress = now;
        self.proven_end = None;
        self.skip_below = self.skip_below.max(self.next);
        let back = match self.step {
            1 => 0,
            n => 256i64 << (n - 2).min(40),
        };
        Some((self.next - back).max(0))
    }
}

impl Consumer {
    /// A consumer for `service` with nothing assigned yet; it rests when idle if `doorbell`
    /// tells it what the local relay commits (and `kafka.rest_ms` is not 0).
    pub fn new(
        settings: &Settings,
        service: &str,
        doorbell: Option<Doorbell>,
    ) -> Result<Self, Error> {
        let rest = doorbell
            .clone()
            .filter(|_| settings.rest_ms > 0)
            .map(|doorbell| Rest {
                after: Duration::from_millis(settings.rest_after_ms.max(1)),
                at_most: Duration::from_millis(settings.rest_ms),
                doorbell,
            });
        let mut config = settings.client();
        config
            .set("group.id", settings.topic(service))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", settings.fetch_wait_ms.to_string())
            // A fetch reaching a partition's end tells a rest may begin, and that an idle
            // consumer is reading (`Consumer::fetched`).
            .set("enable.partition.eof", "true");
        for (key, value) in &settings.consumer_properties {
            config.set(key, value);
        }
        let inner: StreamConsumer<Links> = config.create_with_context(Links::new("consumer"))?;
        Ok(Consumer {
            inner,
            lanes: Mutex::new(HashMap::new()),
            watched: Mutex::new(Instant::now()),
            stall_reseek: (settings.stall_reseek_ms > 0)
                .then(|| Duration::from_millis(settings.stall_reseek_ms)),
            rest,
            doorbell,
            resting: AtomicBool::new(false),
            unanswered: AtomicUsize::new(0),
            resumed: Mutex::new(Instant::now()),
            fetched: Arc::new(AtomicBool::new(true)),
            rest_began: Mutex::new(Instant::now()),
            answered_at: Mutex::new(Instant::now()),
            warned: Mutex::new(None),
            reread_after_loss: Duration::from_millis(settings.reread_after_loss_ms),
            reread_for: AtomicI64::new(0),
        })
    }

    /// Wait for at least one record, then take whatever else is already buffered, up to `max`.
    /// With nothing assigned it waits (the stall watchdog keeps it cheap).
    pub async fn next_batch(&self, max: usize) -> Result<Vec<Record>, Error> {
        // Silence counts from here: a worker busy elsewhere (the database away) reads nothing.
        self.silence_from_now();
        let mut heard = self.rest.as_ref().map(|r| r.doorbell.listen());
        loop {
            let _ = self.reread_after_loss();
            if let (Some(rest), Some(heard)) = (&self.rest, heard.as_mut()) {
                if self.resting() {
                    self.rest(rest, heard).await;
                }
            }
            let quiet = match &self.rest {
                Some(rest) => Some(rest.after),
                None => self.stall_reseek,
            };
            let first = match quiet {
                None => self.inner.recv().await,
                Some(quiet) => match tokio::time::timeout(quiet, self.inner.recv()).await {
                    Ok(message) => message,
                    Err(_) => {
                        if let Some(rest) = &self.rest {
                            self.maybe_rest(rest);
                        }
                        self.watch();
                        continue;
                    }
                },
            };
            let first = match first {
                Err(KafkaError::PartitionEOF(_)) => {
                    self.reached_end();
                    // Once every partition resumed told its end, nothing is left to find.
                    if let Some(rest) = &self.rest {
                        self.maybe_rest(rest);
                    }
                    continue;
                }
                other => other?,
            };
            self.heard();
            let mut batch = vec![detach(&first)];
            drop(first);
            while batch.len() < max {
                let Some(got) = self.inner.recv().now_or_never() else {
                    break;
                };
                if !self.took(got, &mut batch) {
                    break;
                }
            }
            if let Some(rest) = &self.rest {
                self.await_ends(rest, &mut batch, max).await;
            }
            if self.reread_after_loss() {
                continue; // these come again, after what they follow
            }
            self.arrived(&mut batch);
            self.watch();
            if !batch.is_empty() {
                // While the worker handles this batch, fetching would mostly find nothing.
                if let Some(rest) = &self.rest {
                    self.maybe_rest(rest);
                }
                return Ok(batch);
            }
        }
    }

    /// Before a batch goes to the worker, wait briefly (at most [`ENDS_WAIT`]) for the fetch
    /// that brought it to report the end of every partition resumed, taking what else arrives:
    /// the consumer may rest only once they are answered, and one that cannot goes on fetching
    /// the whole time the worker handles the batch (noida-db answers every fetch at once).
    async fn await_ends(&self, rest: &Rest, batch: &mut Vec<Record>, max: usize) {
        let until = tokio::time::Instant::now() + ENDS_WAIT;
        while !self.answered(rest) && batch.len() < max {
            let Ok(got) = tokio::time::timeout_at(until, self.inner.recv()).await else {
                break;
            };
            if !self.took(got, batch) {
                break;
            }
        }
    }

    /// Add what a receive got to a batch being drained: a record, or a partition's end noted;
    /// `false` on an error, which ends the draining.
    fn took(
        &self,
        got: Result<rdkafka::message::BorrowedMessage<'_>, KafkaError>,
        batch: &mut Vec<Record>,
    ) -> bool {
        match got {
            Ok(m) => batch.push(detach(&m)),
            Err(KafkaError::PartitionEOF(_)) => self.reached_end(),
            Err(e) => {
                tracing::warn!("kafka consumer error while draining a batch: {e}");
                return false;
            }
        }
        true
    }

    /// Begin a rest (pause every partition not held) if every partition answered since the
    /// last one, the local relay announced nothing this consumer has not read, and the
    /// broker connections have not dropped lately: noida-db can lose acknowledged records
    /// when it restarts and reuse their offsets, and a consumer that looks again only after
    /// the relay refilled past its position would skip what was written there (one that keeps
    /// fetching finds its position out of range and reads the partition again).
    fn maybe_rest(&self, rest: &Rest) {
        if self.resting()
            || !self.answered(rest)
            || self.announced_unread(&rest.doorbell)
            || self.inner.context().lost_within(CALM_AFTER_LOSS)
        {
            return;
        }
        let lanes = self.lanes.lock().expect("lanes lock");
        *self.rest_began.lock().expect("rest lock") = Instant::now();
        self.resting.store(true, Ordering::Relaxed);
        self.rest_all(&lanes, true);
    }

    /// Wait out the rest begun: until the local relay announces a record this consumer has
    /// not read, or `rest_ms` after it began; then resume. Cancelled, the rest goes on and
    /// the next call waits for the rest of it.
    async fn rest(&self, rest: &Rest, heard: &mut tokio::sync::watch::Receiver<u64>) {
        let began = *self.rest_began.lock().expect("rest lock");
        let over = tokio::time::sleep_until((began + rest.at_most).into());
        tokio::pin!(over);
        loop {
            heard.borrow_and_update();
            if self.announced_unread(&rest.doorbell) {
                break;
            }
            tokio::select! {
                _ = &mut over => break,
                rung = heard.changed() => {
                    if rung.is_err() {
                        break;
                    }
                }
            }
        }
        let lanes = self.lanes.lock().expect("lanes lock");
        self.resting.store(false, Ordering::Relaxed);
        self.rest_all(&lanes, false);
    }

    /// Whether a fetch has answered since the partitions were last assigned (true with none
    /// assigned), as a flag that stays current: `/readyz` waits for it, so a caller that
    /// gates on readiness knows its first event is not waiting for a consumer to start.
    pub fn fetched(&self) -> Arc<AtomicBool> {
        self.fetched.clone()
    }

    /// Whether a loss of the broker connections was answered (partitions read again or owed
    /// a re-read), for tests that must know it happened.
    pub fn loss_answered(&self) -> bool {
        self.reread_for.load(Ordering::Relaxed) != 0
    }

    /// Whether its partitions are paused for a rest now.
    pub fn resting(&self) -> bool {
        self.resting.load(Ordering::Relaxed)
    }

    /// A fetch reached the end of a partition (which topic's, librdkafka does not say).
    fn reached_end(&self) {
        self.heard();
        let _ = self
            .unanswered
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// A fetch answered: a record or a partition's end.
    fn heard(&self) {
        self.fetched.store(true, Ordering::Relaxed);
        self.silence_from_now();
    }

    /// The silence [`Consumer::silent`] measures starts now.
    fn silence_from_now(&self) {
        *self.answered_at.lock().expect("answer lock") = Instant::now();
    }

    /// How long no fetch has answered (since assigned, or since the worker last asked).
    fn silent(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.answered_at.lock().expect("answer lock"))
    }

    /// Whether every partition resumed by the last rest (or assigned) has had a fetch reach
    /// its end since; a partition that never does (the broker's stalls) waits four rests.
    fn answered(&self, rest: &Rest) -> bool {
        self.unanswered.load(Ordering::Relaxed) == 0
            || self.resumed.lock().expect("resumed lock").elapsed() >= rest.at_most * 4
    }

    /// Partitions were resumed or assigned: count them as unanswered from now.
    fn started(&self, lanes: usize) {
        *self.resumed.lock().expect("resumed lock") = Instant::now();
        self.unanswered.store(lanes, Ordering::Relaxed);
    }

    /// Whether the local relay committed a record to a partition this consumer reads (and
    /// does not hold) that it has not handed out yet.
    fn announced_unread(&self, doorbell: &Doorbell) -> bool {
        let lanes = self.lanes.lock().expect("lanes lock");
        doorbell.beyond(
            lanes
                .iter()
                .filter(|(_, lane)| !lane.paused)
                .map(|((topic, partition), lane)| (topic.as_str(), *partition, lane.next)),
        )
    }

    /// Pause or resume, for a rest, every partition not held. Called under the lanes lock.
    fn rest_all(&self, lanes: &HashMap<(String, i32), Lane>, pause: bool) {
        let mut list = rdkafka::TopicPartitionList::new();
        for ((topic, partition), lane) in lanes {
            if !lane.paused {
                list.add_partition(topic, *partition);
            }
        }
        if list.count() == 0 {
            return;
        }
        if pause {
            if let Err(e) = self.inner.pause(&list) {
                tracing::debug!("pausing for a rest failed: {e}");
            }
            return;
        }
        if let Err(e) = self.inner.resume(&list) {
            tracing::debug!("resuming after a rest failed: {e}");
        }
        self.started(list.count());
        // librdkafka does not wake its broker thread on a resume, which then starts fetching
        // only when its sleep ends (up to a second, ~0.5 s per hop measured); seeking to where
        // each partition is does wake it.
        let resumed = lanes.iter().filter(|(_, lane)| !lane.paused);
        let seeks =
            resumed.map(|((topic, partition), lane)| (topic.as_str(), *partition, lane.fetch_from));
        self.seek_and_wake(seeks, "after a rest");
    }

    /// Seek one partition, asynchronously (a zero timeout: never block a tokio worker).
    fn seek(&self, topic: &str, partition: i32, offset: i64, why: &str) {
        let seek = self
            .inner
            .seek(topic, partition, Offset::Offset(offset), Duration::ZERO);
        if let Err(e) = seek {
            tracing::debug!(%topic, partition, offset, "seek {why} failed: {e}");
        }
    }

    /// Seek partitions to fetch from there at once. A seek wakes librdkafka's broker thread
    /// (one woken thread fetches every partition), except a seek to offset 0: librdkafka takes
    /// that as the next position without the validation that wakes the thread. So when every
    /// seek is to 0, a request to the broker wakes it (the zero timeout sends the offsets query
    /// and returns at once; its answer is dropped). Without it a consumer whose partitions all
    /// rested at 0 — a service that had had no event yet — fetched again only when the thread's
    /// sleep ended: ~1 s per hop, ~2.6 s for the first sagas after a start.
    fn seek_and_wake<'a>(&self, seeks: impl IntoIterator<Item = (&'a str, i32, i64)>, why: &str) {
        let (mut first, mut woken) = (None, false);
        for (topic, partition, offset) in seeks {
            self.seek(topic, partition, offset, why);
            woken |= offset > 0;
            first = first.or(Some((topic, partition)));
        }
        if let Some((topic, partition)) = first.filter(|_| !woken) {
            let _ = self
                .inner
                .fetch_watermarks(topic, partition, Duration::ZERO);
        }
    }

    /// Account for records that arrived, dropping those a re-read delivered again.
    fn arrived(&self, batch: &mut Vec<Record>) {
        let now = Instant::now();
        let mut lanes = self.lanes.lock().expect("lanes lock");
        batch.retain(|r| {
            let Some(lane) = lanes.get_mut(&(r.topic.clone(), r.partition)) else {
                return true;
            };
            lane.progress = now;
            lane.heard = now;
            lane.fetch_from = r.offset + 1;
            if r.offset < lane.skip_below {
                if lane.step > 0 && lane.proven_end.is_none() {
                    lane.proven_end = end_offset(&self.inner, &r.topic, r.partition);
                    tracing::debug!(topic = %r.topic, partition = r.partition, from = r.offset, "re-read delivers again");
                }
                return false;
            }
            lane.next = r.offset + 1;
            lane.step = 0;
            if !self.reread_after_loss.is_zero() {
                lane.remember(now, self.reread_after_loss);
            }
            true
        });
    }

    /// Once per broker connection loss: read every partition not held again from where it
    /// was `reread_after_loss` before (noida-db can lose acknowledged records when it
    /// restarts and reuse their offsets; the relay publishes its recent rows again, and they
    /// may land below this consumer's position). Seeks while the broker is away take effect
    /// when it is back. Whether any partition went back.
    fn reread_after_loss(&self) -> bool {
        if self.reread_after_loss.is_zero() {
            return false;
        }
        let lost = self.inner.context().lost_ms();
        if lost == 0 || self.reread_for.swap(lost, Ordering::Relaxed) == lost {
            return false;
        }
        let mut lanes = self.lanes.lock().expect("lanes lock");
        let mut again = 0;
        let mut seeks = Vec::new();
        for ((topic, partition), lane) in lanes.iter_mut() {
            if lane.paused {
                lane.reread_owed = true;
                continue;
            }
            let was = lane.next;
            let Some(from) = lane.reread() else {
                continue;
            };
            again += was - from;
            seeks.push((topic.as_str(), *partition, from));
        }
        self.seek_and_wake(seeks, "to read again");
        if again > 0 {
            tracing::info!(
                records = again,
                "broker connections dropped: reading the last {} s again",
                self.reread_after_loss.as_secs()
            );
        }
        again > 0
    }

    /// The stall watchdog (see the module docs): at most once per quiet period, re-seek the
    /// lanes that look stuck.
    fn watch(&self) {
        let Some(quiet) = self.stall_reseek else {
            return;
        };
        let now = Instant::now();
        {
            let mut watched = self.watched.lock().expect("watch lock");
            if now.duration_since(*watched) < quiet {
                return;
            }
            *watched = now;
        }
        let mut lanes = self.lanes.lock().expect("lanes lock");
        self.warn_if_unanswered(&lanes, now);
        let wedged = self.wedged(&lanes, now);
        let mut seeks = Vec::new();
        for ((topic, partition), lane) in lanes.iter_mut() {
            let end = end_offset(&self.inner, topic, *partition);
            if let Some(to) = lane.reseek(end, quiet, now) {
                lane.fetch_from = to;
                tracing::debug!(%topic, partition, next = lane.next, to, step = lane.step, ?end, "partition quiet with data beyond it: re-seeking");
                seeks.push((topic.as_str(), *partition, to));
            }
        }
        self.seek_and_wake(seeks, "of a quiet partition");
        drop(lanes);
        if !wedged.is_empty() {
            self.reassign(&wedged);
        }
    }

    /// The partitions that look wedged inside librdkafka: not held, nothing of theirs arrived
    /// for [`REASSIGN_AFTER`], and either no fetch answer ever told their end or the local
    /// relay committed a record at or after their position. None unless the whole consumer
    /// heard nothing for that long while its worker asked: a worker away (the database
    /// restarting) leaves records waiting in librdkafka's queue, not wedged.
    fn wedged(&self, lanes: &HashMap<(String, i32), Lane>, now: Instant) -> Vec<String> {
        if self.silent(now) < REASSIGN_AFTER {
            return Vec::new();
        }
        let doorbell = self.doorbell.as_ref();
        lanes
            .iter()
            .filter(|(_, lane)| {
                !lane.paused && now.saturating_duration_since(lane.heard) >= REASSIGN_AFTER
            })
            .filter_map(|((topic, partition), lane)| {
                let end = end_offset(&self.inner, topic, *partition);
                let announced = doorbell
                    .is_some_and(|bell| bell.beyond([(topic.as_str(), *partition, lane.next)]));
                (end.is_none() || announced).then(|| describe(topic, *partition, lane, end))
            })
            .collect()
    }

    /// Assign again everything this consumer reads, each partition where librdkafka fetches
    /// it, the watchdog's state kept (a re-read under way goes on): librdkafka starts each
    /// fetch anew, and what is not held is resumed (or paused, in a rest) as in
    /// [`Consumer::assign`]. The remedy for a partition that got nothing while records waited
    /// for it, whatever state inside librdkafka held it: seen once in CI, a partition taken
    /// over from a killed instance was never fetched and the sagas on it stayed pending (a
    /// pause kept across assignments was such a state before). Repeated, if need be, every
    /// [`REASSIGN_AFTER`].
    fn reassign(&self, wedged: &[String]) {
        tracing::warn!(
            ?wedged,
            "kafka consumer: partitions got nothing for {} s while records waited for them \
             (or never heard their end): assigning them again",
            REASSIGN_AFTER.as_secs()
        );
        let now = Instant::now();
        let mut lanes = self.lanes.lock().expect("lanes lock");
        let mut list = rdkafka::TopicPartitionList::new();
        for ((topic, partition), lane) in lanes.iter_mut() {
            lane.heard = now;
            let at = Offset::Offset(lane.fetch_from);
            if let Err(e) = list.add_partition_offset(topic, *partition, at) {
                tracing::warn!("kafka consumer: cannot assign {topic}/{partition} again: {e}");
                return;
            }
        }
        if let Err(e) = self.inner.assign(&list) {
            tracing::warn!("kafka consumer: assigning its partitions again failed: {e}");
            return;
        }
        self.silence_from_now();
        self.started(lanes.len());
        self.rest_all(&lanes, self.resting());
    }

    /// Say so (at most every [`UNANSWERED_WARN`]) when the partitions this consumer fetches
    /// have had no answer at all — no record, no partition end — for that long: the broker
    /// is away, or librdkafka is not fetching them, which the watchdog's re-seeks (they go by
    /// the partition's end as last heard) may not notice. This is how partitions taken back
    /// still paused inside librdkafka showed (see [`Consumer::assign`]).
    fn warn_if_unanswered(&self, lanes: &HashMap<(String, i32), Lane>, now: Instant) {
        let silent = self.silent(now);
        if silent < UNANSWERED_WARN {
            return;
        }
        let fetching: Vec<_> = lanes.iter().filter(|(_, l)| !l.paused).collect();
        if fetching.is_empty() {
            return;
        }
        let mut warned = self.warned.lock().expect("warned lock");
        if warned.is_some_and(|at| now.duration_since(at) < UNANSWERED_WARN) {
            return;
        }
        *warned = Some(now);
        let lanes: Vec<String> = fetching
            .iter()
            .map(|((topic, partition), lane)| {
                describe(
                    topic,
                    *partition,
                    lane,
                    end_offset(&self.inner, topic, *partition),
                )
            })
            .collect();
        tracing::warn!(
            silent_s = silent.as_secs(),
            resting = self.resting(),
            ?lanes,
            "kafka consumer: no answer from the broker for its partitions"
        );
    }

    /// Pause a partition inside librdkafka behind this consumer's back, as a fetch wedged
    /// inside the client would stop it: a seam for tests of the watchdog's re-assignment.
    #[doc(hidden)]
    pub fn wedge_for_test(&self, topic: &str, partition: i32) -> Result<(), Error> {
        Ok(self.inner.pause(&one(topic, partition))?)
    }

    /// Stop fetching a partition and move its position back to `offset` (a blocking
    /// subscription's event that must be retried later); [`Consumer::release`] resumes it
    /// there. Records of it fetched before the hold may still arrive: the caller drops them.
    pub fn hold(&self, topic: &str, partition: i32, offset: i64) -> Result<(), Error> {
        // Under the lanes lock, so a rest never resumes a partition being held.
        let mut lanes = self.lanes.lock().expect("lanes lock");
        if !lanes.contains_key(&(topic.to_string(), partition)) {
            return Ok(()); // given away meanwhile: a pause would outlive it (module docs)
        }
        self.inner.pause(&one(topic, partition))?;
        let at = self.rewind(&mut lanes, topic, partition, offset, true);
        self.seek(topic, partition, at, "to hold");
        Ok(())
    }

    /// Fetch a held partition again, from `offset` (after the rest, if resting).
    pub fn release(&self, topic: &str, partition: i32, offset: i64) -> Result<(), Error> {
        let mut lanes = self.lanes.lock().expect("lanes lock");
        if !lanes.contains_key(&(topic.to_string(), partition)) {
            return Ok(()); // given away meanwhile; an assignment resumes it if taken back
        }
        let resting = self.resting();
        if !resting {
            self.inner.resume(&one(topic, partition))?;
        }
        let at = self.rewind(&mut lanes, topic, partition, offset, false);
        // Resting, it stays paused until the rest ends, which seeks it and wakes the thread.
        if resting {
            self.seek(topic, partition, at, "to release");
        } else {
            self.seek_and_wake([(topic, partition, at)], "to release");
        }
        Ok(())
    }

    /// Make `offset` the partition's next record for the watchdog (or an earlier one, when it
    /// owes a re-read): where the caller is to seek it. Only for a partition assigned here (a
    /// lane made for another would be one the watchdog assigns again).
    fn rewind(
        &self,
        lanes: &mut HashMap<(String, i32), Lane>,
        topic: &str,
        partition: i32,
        offset: i64,
        paused: bool,
    ) -> i64 {
        let key = (topic.to_string(), partition);
        let old = lanes.remove(&key);
        let mut lane = Lane::replacing(old, offset, paused, self.reread_after_loss);
        // Released after a connection loss it was held through: read again what the others
        // read again then.
        let offset = if lane.reread_owed && !paused {
            lane.reread().unwrap_or(offset)
        } else {
            offset
        };
        lanes.insert(key, lane);
        offset
    }

    /// Read exactly `parts` (physical topic, partition, stored position): each from the later
    /// of its stored position and where this consumer already is, or from the beginning.
    pub fn assign(&self, parts: &[(String, i32, Option<i64>)]) -> Result<(), Error> {
        let mut list = rdkafka::TopicPartitionList::new();
        {
            let mut lanes = self.lanes.lock().expect("lanes lock");
            lanes.retain(|(t, p), _| parts.iter().any(|(pt, pp, _)| pt == t && pp == p));
            for (topic, partition, stored) in parts {
                let key = (topic.clone(), *partition);
                let here = lanes.get(&key).map(|l| l.next);
                // 0 is "the beginning": below the low watermark, `auto.offset.reset` applies.
                let at = here.max(*stored).unwrap_or(0);
                let old = lanes.remove(&key);
                let paused = old.as_ref().is_some_and(|l| l.paused);
                lanes.insert(
                    key,
                    Lane::replacing(old, at, paused, self.reread_after_loss),
                );
                list.add_partition_offset(topic, *partition, Offset::Offset(at))?;
            }
        }
        self.inner.assign(&list)?;
        self.silence_from_now();
        let lanes = self.lanes.lock().expect("lanes lock");
        self.fetched.store(lanes.is_empty(), Ordering::Relaxed);
        self.started(lanes.len());
        // librdkafka keeps a partition's pause across assignments: one given up while paused
        // (in a rest, or held) came back paused and was never fetched again. So each
        // assignment pauses or resumes every partition not held as this consumer has it.
        self.rest_all(&lanes, self.resting());
        Ok(())
    }

    /// How long ago this consumer's broker connections last dropped; `None` if never.
    pub fn lost_ago(&self) -> Option<Duration> {
        let links = self.inner.context();
        let lost = links.lost_ms();
        (lost != 0).then(|| Duration::from_millis((links.now_ms() - lost).max(0) as u64))
    }

    /// Until this consumer's broker connections drop (or dropped unnoticed since last asked).
    pub async fn next_loss(&self) {
        self.inner.context().next_loss().await
    }

    /// How far back a consumer reads again after a broker loss (zero: it does not).
    pub fn reread_window(&self) -> Duration {
        self.reread_after_loss
    }

    /// Per partition of `parts`, the first offset of a record stamped at or after `since_ms`
    /// (wall clock, the records' create time), from the broker; a partition with none is left
    /// out. Blocks for up to `timeout`.
    pub fn offsets_since(
        &self,
        parts: &[(String, i32)],
        since_ms: i64,
        timeout: Duration,
    ) -> Result<HashMap<(String, i32), i64>, Error> {
        let mut list = rdkafka::TopicPartitionList::new();
        for (topic, partition) in parts {
            list.add_partition_offset(topic, *partition, Offset::Offset(since_ms))?;
        }
        let found = self.inner.offsets_for_times(list, timeout)?;
        Ok(found
            .elements()
            .iter()
            .filter_map(|e| match (e.error(), e.offset()) {
                (Ok(()), Offset::Offset(at)) if at >= 0 => {
                    Some(((e.topic().to_string(), e.partition()), at))
                }
                _ => None,
            })
            .collect())
    }

    /// Per assigned (physical topic, partition): what lies between this consumer's position
    /// and the partition's end as the last fetch reported it — records and transaction
    /// markers, so a partition caught up after a transaction shows 1; 0 while unknown.
    pub fn lag(&self) -> Vec<(String, i32, i64)> {
        let lanes = self.lanes.lock().expect("lanes lock");
        lanes
            .iter()
            .map(|((topic, partition), lane)| {
                let end = end_offset(&self.inner, topic, *partition);
                let lag = end.map_or(0, |end| (end - lane.next).max(0));
                (topic.clone(), *partition, lag)
            })
            .collect()
    }

    /// Partitions of a physical topic, from the broker's metadata.
    pub fn partitions(&self, topic: &str) -> Result<Vec<i32>, Error> {
        let metadata = self
            .inner
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect())
    }
}

/// How often a lane notes where it is, for reading again after a connection loss.
const HISTORY_STEP: Duration = Duration::from_secs(1);

/// How long a batch waits for its partitions' ends before it goes to the worker.
const ENDS_WAIT: Duration = Duration::from_millis(1);

/// How long a consumer's partitions may go without any answer before it says so.
const UNANSWERED_WARN: Duration = Duration::from_secs(10);

/// How long a partition may get nothing while records wait for it, and the consumer hear
/// nothing at all, before [`Consumer::reassign`] starts its fetch anew.
const REASSIGN_AFTER: Duration = Duration::from_secs(5);

/// How long after its broker connections dropped a consumer does not rest.
const CALM_AFTER_LOSS: Duration = Duration::from_secs(10);

/// The end of a partition as this client last heard it from the broker (its high watermark,
/// updated by every fetch response; no request is made), if known.
fn end_offset(consumer: &StreamConsumer<Links>, topic: &str, partition: i32) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the handle is alive (we hold the consumer), the topic is a valid C string for
    // the call, and librdkafka only writes the two offsets.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

/// A lane as the consumer's warnings name it: where it is, and its end as last heard.
fn describe(topic: &str, partition: i32, lane: &Lane, end: Option<i64>) -> String {
    format!("{topic}/{partition} at {} (end {end:?})", lane.next)
}

/// A list of one partition, for a call and dropped right after it (field notes: lists must not
/// outlive the consumer).
fn one(topic: &str, partition: i32) -> rdkafka::TopicPartitionList {
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, partition);
    list
}

fn detach(m: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        headers,
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}
