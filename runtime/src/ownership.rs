//! Which instance reads which partition: database leases, not the broker's group coordinator.
//!
//! Each instance heartbeats a `member/<instance>` lease and, per service, holds one
//! `partition/<service>/<topic>/<partition>` lease for every partition it reads. Every tick
//! (a third of `worker.partition_lease_ms`) it renews what it holds, gives back what exceeds its
//! fair share (partitions ÷ live members, rounded up) so a newcomer gets some, and takes free or
//! expired ones up to that share. The consumer is then assigned exactly the held partitions, at
//! the positions stored in the database with the effects (`storage::offsets`).
//!
//! Trade-off: a handover costs up to one tick, and a dead instance's partitions wait for its
//! leases to expire; in exchange failover needs nothing from the broker but fetches (the test
//! broker never evicts a dead group member), and positions commit atomically with effects. Two
//! instances may briefly read the same partition around a handover; the inbox makes the second
//! handling of any event a duplicate.
//!
//! After a broker loss: noida-db can lose records it acknowledged when it restarts and give
//! their offsets to new ones (the relay's copies among them), and a consumer reads its recent
//! records again (`crate::kafka::consumer`). A partition taken over from an instance that died
//! before it did so has nothing of that history here. So every instance notes the losses it
//! sees in the database (`storage::offsets::note_broker_loss`), and a partition taken within
//! `kafka.reread_after_loss_ms` of the last one starts at the first record stamped that long
//! before the loss, when that lies below its stored position; the inbox drops what was handled.
//! If the broker cannot answer that lookup within `LOOKUP_TIMEOUT`, the partition starts at its
//! stored position (logged) rather than wait unread.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::health::Board;
use crate::kafka::{self, consumer::Consumer};
use crate::metrics::Metrics;
use crate::storage::{self, lease, offsets, Db};

/// How long ownership waits for the broker to say where a partition taken soon after a
/// broker loss should start.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The prefix of the instances' membership leases, heartbeated by ownership.
pub const MEMBERS: &str = "member/";

/// What ownership reaches of its instance (built in `node.rs` for each service).
pub struct Context {
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    pub instance_id: String,
    /// `worker.partition_lease_ms`: how long a partition lease lasts unrenewed.
    pub lease_ms: u64,
    /// Topic names, for the lag metric's labels.
    pub kafka: kafka::Settings,
    pub health: Arc<Board>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the whole instance shuts down: its membership is given back then.
    pub shutdown: CancellationToken,
}

/// The partition leases of one service on this instance.
pub struct Ownership {
    ctx: Context,
    service: String,
    consumer: Arc<Consumer>,
    /// (physical topic, partition) of every topic the service consumes.
    partitions: Vec<(String, i32)>,
    held: BTreeSet<(String, i32)>,
    /// The broker loss this instance noted last (wall clock ms).
    noted_loss: Option<i64>,
    /// Cancelled when this service stops on this instance.
    stop: CancellationToken,
}

impl Ownership {
    pub fn new(
        ctx: Context,
        service: &str,
        consumer: Arc<Consumer>,
        mut partitions: Vec<(String, i32)>,
        stop: CancellationToken,
    ) -> Self {
        // Start the search for free partitions at a different place on each instance, so that
        // instances starting together do not all contend for the same first ones.
        let spin = ctx
            .instance_id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        if !partitions.is_empty() {
            let n = spin % partitions.len();
            partitions.rotate_left(n);
        }
        Ownership {
            ctx,
            service: service.to_string(),
            consumer,
            partitions,
            held: BTreeSet::new(),
            noted_loss: None,
            stop,
        }
    }

    fn lease_name(&self, (topic, partition): &(String, i32)) -> String {
        format!("partition/{}/{topic}/{partition}", self.service)
    }

    /// One round of renew, give back, take; re-assigns the consumer if the set changed.
    pub async fn tick(&mut self) -> Result<(), storage::Error> {
        self.note_loss().await?;
        let db = &self.ctx.db;
        let me = &self.ctx.instance_id;
        let ttl = self.ctx.lease_ms as i64;
        let now = self.ctx.clock.now_ms();
        lease::acquire(db, &format!("{MEMBERS}{me}"), me, now, ttl).await?;
        let members = lease::count_held(db, MEMBERS, now).await?.max(1) as usize;
        let share = self.partitions.len().div_ceil(members);
        let mut held = BTreeSet::new();
        for p in &self.held {
            if lease::acquire(db, &self.lease_name(p), me, now, ttl).await? {
                held.insert(p.clone());
            }
        }
        while held.len() > share {
            let p = held.pop_last().expect("more than share");
            lease::release(db, &self.lease_name(&p), me).await?;
        }
        for p in &self.partitions {
            if held.len() >= share {
                break;
            }
            if !held.contains(p) && lease::acquire(db, &self.lease_name(p), me, now, ttl).await? {
                held.insert(p.clone());
            }
        }
        if held != self.held {
            let mut stored = offsets::load(db, &self.service).await?;
            self.start_before_loss(&held, &mut stored).await?;
            let parts: Vec<(String, i32, Option<i64>)> = held
                .iter()
                .map(|(t, p)| (t.clone(), *p, stored.get(&(t.clone(), *p)).copied()))
                .collect();
            match self.consumer.assign(&parts) {
                Ok(()) => {
                    tracing::info!(
                        service = %self.service, partitions = held.len(), members,
                        "partition ownership changed"
                    );
                    self.held = held;
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, "could not assign partitions: {e}")
                }
            }
        }
        let health = &self.ctx.health;
        health.assigned(&self.service, self.held.len(), self.partitions.len());
        self.report_lag();
        Ok(())
    }

    /// Note a loss of this instance's broker connections for every instance, once per loss.
    async fn note_loss(&mut self) -> Result<(), storage::Error> {
        let Some(ago) = self.consumer.lost_ago() else {
            return Ok(());
        };
        let at = self.ctx.clock.now_ms() - ago.as_millis() as i64;
        // The same loss, computed again a tick later, may differ by a millisecond or two.
        if self.noted_loss.is_some_and(|noted| at < noted + 1000) {
            return Ok(());
        }
        offsets::note_broker_loss(&self.ctx.db, at).await?;
        self.noted_loss = Some(at);
        Ok(())
    }

    /// Move the stored positions of the partitions `held` adds, if taken soon after a broker
    /// loss, back to the first record stamped `reread_after_loss_ms` before it (module docs).
    /// If the broker cannot say where that is within [`LOOKUP_TIMEOUT`], they start at their
    /// stored positions (logged): a lookup retried tick after tick held them unread while
    /// their leases kept anyone else off (a short fault-suite run stalled for 15 s so).
    async fn start_before_loss(
        &self,
        held: &BTreeSet<(String, i32)>,
        stored: &mut HashMap<(String, i32), i64>,
    ) -> Result<(), storage::Error> {
        let window = self.consumer.reread_window().as_millis() as i64;
        let taken: Vec<(String, i32)> = held
            .difference(&self.held)
            .filter(|p| stored.contains_key(*p))
            .cloned()
            .collect();
        if window == 0 || taken.is_empty() {
            return Ok(());
        }
        let Some(lost) = offsets::broker_lost_ms(&self.ctx.db).await? else {
            return Ok(());
        };
        if self.ctx.clock.now_ms() - lost >= window {
            return Ok(());
        }
        let consumer = self.consumer.clone();
        let found = tokio::task::spawn_blocking(move || {
            consumer.offsets_since(&taken, lost - window, LOOKUP_TIMEOUT)
        })
        .await;
        let found = match found {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!(
                    service = %self.service,
                    "partitions taken after a broker loss start at their stored positions: \
                     where to read again from: {e}"
                );
                return Ok(());
            }
            Err(_) => return Ok(()),
        };
        for (part, from) in found {
            if let Some(at) = stored.get_mut(&part).filter(|at| from < **at) {
                tracing::info!(
                    service = %self.service, topic = %part.0, partition = part.1,
                    stored = *at, from,
                    "partition taken after a broker loss: reading again from before it"
                );
                *at = from;
            }
        }
        Ok(())
    }

    /// Consumer lag per partition of the service, for `GET /metrics`: what it reads here, 0
    /// for the rest (another instance reports those).
    fn report_lag(&self) {
        let lag = self.consumer.lag();
        let kafka = &self.ctx.kafka;
        for (topic, partition) in &self.partitions {
            let here = lag
                .iter()
                .find(|(t, p, _)| t == topic && p == partition)
                .filter(|_| self.held.contains(&(topic.clone(), *partition)))
                .map_or(0, |(_, _, lag)| *lag);
            self.ctx
                .metrics
                .consumer_lag(&self.service, kafka.logical(topic), *partition)
                .set(here as f64);
        }
    }

    /// Tick until the service stops, then give its leases back so the others take over at
    /// once (and the instance's membership too if the whole instance is shutting down).
    pub async fn run(mut self) {
        self.ctx
            .health
            .consuming(&self.service, self.consumer.fetched());
        let every = Duration::from_millis((self.ctx.lease_ms / 3).max(10));
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
                // Noted at once: this instance may be killed next.
                _ = self.consumer.next_loss() => {}
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(service = %self.service, "partition ownership: {e}");
            }
        }
        self.ctx.health.stopped(&self.service);
        let me = &self.ctx.instance_id;
        for p in &self.held {
            let _ = lease::release(&self.ctx.db, &self.lease_name(p), me).await;
        }
        if self.ctx.shutdown.is_cancelled() {
            let _ = lease::release(&self.ctx.db, &format!("{MEMBERS}{me}"), me).await;
        }
    }
}
