//! The deadline scheduler: host-owned saga deadlines (SPEC B1, B3, B8).
//!
//! A handler sets a deadline as an effect; it is stored in the same transaction as the rest.
//! The scheduler sleeps until the earliest pending deadline (re-armed whenever a local commit
//! sets one, and re-checked every `relay.poll_interval_ms` for deadlines set by other instances),
//! so it never "falls asleep": after a restart it finds every pending deadline in the table and
//! fires the overdue ones at once.
//!
//! Firing = one transaction that claims the deadline (`PENDING` → `FIRED`, so exactly one
//! instance wins) and writes a `DeadlineExpired` event to the outbox, addressed to the owning
//! service's topic `<service>.deadline`. From there it travels like any event: relay, Kafka,
//! the service's consumer and inbox. A service that is down when its deadline fires gets the
//! event when it comes back. The event id is derived from the deadline, so even a deadline
//! fired twice would be handled once.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::kafka::{self, cloudevents};
use crate::metrics::Metrics;
use crate::relay;
use crate::stats::Stats;
use crate::storage::{self, deadlines, outbox, Db};
use crate::wasm::bindings::{Emit, Payload};

/// `ce_type` of the event a fired deadline delivers.
pub const EXPIRED: &str = "DeadlineExpired";

/// The topic on which `service` receives its fired deadlines.
pub fn topic(service: &str) -> String {
    format!("{service}.deadline")
}

/// Whether a logical topic is some service's deadline topic.
pub fn is_deadline_topic(logical: &str) -> bool {
    logical.ends_with(".deadline")
}

/// The scheduler's handle: commits that set deadlines tell it when the earliest is due, and it
/// is woken only if that is before the time it already sleeps until (every commit of a saga
/// start sets one; most are due long after the scheduler's next look anyway).
pub struct Alarm {
    /// Until when the scheduler sleeps (Unix ms); `i64::MAX` while it looks (every deadline
    /// set meanwhile wakes it again, so none is missed between its query and its sleep).
    armed: AtomicI64,
    wake: Notify,
}

impl Default for Alarm {
    fn default() -> Self {
        Alarm {
            armed: AtomicI64::new(i64::MAX),
            wake: Notify::new(),
        }
    }
}

impl Alarm {
    /// A commit set deadlines, the earliest due at `due_ms`.
    pub fn set(&self, due_ms: i64) {
        if due_ms < self.armed.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// The scheduler is about to look for due deadlines.
    fn looking(&self) {
        self.armed.store(i64::MAX, Ordering::SeqCst);
    }

    /// The scheduler sleeps until `until_ms` unless a deadline due earlier is set.
    async fn sleep(&self, until_ms: i64) {
        self.armed.store(until_ms, Ordering::SeqCst);
        self.wake.notified().await;
    }
}

/// The scheduler's loop and what it reaches: the database, its alarm, and the relay it wakes.
pub struct Scheduler {
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    /// Where fired deadlines are published (the topic names).
    pub kafka: kafka::Settings,
    /// How often it looks for deadlines set by other instances.
    pub poll: Duration,
    pub alarm: Arc<Alarm>,
    pub relay: relay::Handle,
    pub metrics: Arc<Metrics>,
    pub stats: Arc<Stats>,
    pub stop: CancellationToken,
}

impl Scheduler {
    pub async fn run(self) {
        let poll = self.poll.max(Duration::from_millis(1));
        let alarm = &self.alarm;
        while !self.stop.is_cancelled() {
            alarm.looking();
            let wait = match self.fire_due().await {
                Ok(next) => {
                    let now = self.clock.now_ms();
                    next.map_or(poll, |due| {
                        Duration::from_millis(due.saturating_sub(now).max(0) as u64).min(poll)
                    })
                }
                Err(e) => {
                    tracing::warn!("deadline scheduler: {e}");
                    poll
                }
            };
            let until = self.clock.now_ms() + wait.as_millis() as i64;
            tokio::select! {
                _ = self.stop.cancelled() => {}
                _ = alarm.sleep(until) => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Fire everything due now; return when the next pending deadline is due.
    async fn fire_due(&self) -> Result<Option<i64>, storage::Error> {
        let db = &self.db;
        loop {
            let now = self.clock.now_ms();
            let due = deadlines::due(db, now, 100).await?;
            if due.is_empty() {
                return deadlines::next_due(db).await;
            }
            for d in &due {
                // Saga row first, deadline row second: the same lock order as a step that
                // settles a saga and cancels its deadline, so the two cannot deadlock.
                let mut tx = db.begin().await?;
                let opened = storage::sagas::expire(&mut tx, &d.saga, now).await?;
                if !deadlines::claim(&mut tx, d).await? {
                    tx.rollback().await?; // cancelled, moved or fired meanwhile
                    continue;
                }
                // A child of the span that set it, so the saga's trace goes on through it.
                let span = tracing::info_span!(
                    "deadline fired",
                    otel.kind = "producer",
                    saga.service = %d.service,
                    saga.id = %d.saga,
                    saga.deadline = %d.name,
                    trace_id = tracing::field::Empty,
                );
                crate::telemetry::follow_traceparent(&span, d.traceparent.as_deref());
                let trace = crate::telemetry::carried(&span);
                outbox::insert(&mut tx, &self.message(d, now, &trace), now).await?;
                tx.commit().await?;
                drop(span);
                let ran = opened.map(|opened| now - opened);
                let metrics = &self.metrics;
                metrics.sagas_ended(&d.service, "expired", ran.as_slice());
                Stats::add(&self.stats.deadlines_fired, 1);
                let lag = (now - d.due_ms).max(0) as f64 / 1000.0;
                metrics.deadline_lag.record(lag);
                tracing::info!(service = %d.service, saga = %d.saga, name = %d.name, lag_ms = now - d.due_ms, "deadline fired");
            }
            self.relay.wake();
        }
    }

    fn message(
        &self,
        d: &deadlines::Deadline,
        now_ms: i64,
        trace: &[(String, String)],
    ) -> outbox::Message {
        let data = serde_json::json!({
            "saga": d.saga, "name": d.name, "dueMs": d.due_ms, "firedMs": now_ms,
        });
        let emit = Emit {
            topic: topic(&d.service),
            type_: EXPIRED.to_string(),
            subject: d.saga.clone(),
            data: Payload {
                content_type: "application/json".into(),
                data: serde_json::to_vec(&data).expect("JSON"),
            },
        };
        let kafka = &self.kafka;
        cloudevents::encode(
            "deadlines",
            kafka.topic(&emit.topic),
            format!("deadline:{}:{}:{}:{}", d.service, d.saga, d.name, d.due_ms),
            &emit,
            now_ms,
            Some(d.due_ms),
            trace,
        )
    }
}
