//! Flow control at the door: how many HTTP requests run handlers at once, how many may wait
//! for that, and when new commands are shed because the event path is behind.
//!
//! - In flight: at most `ingress.max_in_flight` requests are past the door (by default half
//!   the guest instances, so HTTP can never take every instance from the events).
//! - Queue: up to `ingress.max_queued` more wait, each at most `ingress.queue_wait_ms`; a
//!   request beyond the queue, or one that waited too long, gets `503` with `Retry-After`.
//!   Waiters are served in arrival order (tokio's semaphore is fair).
//! - Shedding: a worker that takes a full batch (it has a backlog) reports how late it takes
//!   its events (their CloudEvents time → the batch starts; duplicates and re-drives left
//!   out), and the relay, on a full batch, how old the oldest outbox row it publishes is; a
//!   smaller batch means it drained what there was, and it reports itself caught up. So a
//!   partition released from a hold, late by design, sheds nothing. While one of them is later than `ingress.shed_lag_ms`,
//!   commands (anything but `GET`) are refused with `503` instead of being admitted, so the
//!   sagas already running finish within their deadlines; queries are still served. A
//!   report older than a second is ignored (an idle part is not behind).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clock::Clock;

/// `[ingress]` in the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Requests running handlers at once; 0: half of `sandbox.max_instances`. Default 0.
    pub max_in_flight: usize,
    /// Requests that may wait for that beyond it. Default 1024.
    pub max_queued: usize,
    /// How long one may wait, ms. Default 2000.
    pub queue_wait_ms: u64,
    /// Commands are refused while a service handles its events later than this, ms; 0 never
    /// sheds. Default 2000.
    pub shed_lag_ms: u64,
    /// The longest `Prefer: wait` honoured, seconds (`crate::watch`). Default 60.
    pub max_wait_s: u64,
    /// A held query runs again at least this often (commits of other instances), ms.
    /// Default 1000.
    pub wait_recheck_ms: u64,
    /// Queries held at once; beyond, one is answered at once. Default 4096.
    pub max_held: usize,
}

impl Settings {
    pub fn holding(&self) -> crate::watch::Holding {
        crate::watch::Holding {
            max_wait: Duration::from_secs(self.max_wait_s),
            recheck: Duration::from_millis(self.wait_recheck_ms.max(10)),
            max_held: self.max_held,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_in_flight: 0,
            max_queued: 1024,
            queue_wait_ms: 2000,
            shed_lag_ms: 2000,
            max_wait_s: 60,
            wait_recheck_ms: 1000,
            max_held: 4096,
        }
    }
}

/// Why a request was not let in; each becomes a `503` with `Retry-After`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refused {
    #[error("the runtime is busy: {0} requests are already waiting (ingress.max_queued)")]
    QueueFull(usize),
    #[error("the runtime is busy: no turn within {0} ms (ingress.queue_wait_ms)")]
    Waited(u64),
    #[error(
        "the runtime is behind: service {service} handles its events {lag_ms} ms late \
         (over ingress.shed_lag_ms); new commands are refused until it catches up"
    )]
    Behind { service: String, lag_ms: i64 },
}

/// How late each service handles its events; written by the workers (and the relay, for the
/// outbox), read by the door. Lags are in host-clock ms (event time → handled); whether a
/// report is fresh is judged on a monotonic clock of its own, so a test's pinned host clock
/// cannot make one last for ever.
struct Lag {
    /// service → (lag ms, when reported).
    by_service: Mutex<HashMap<String, (i64, Instant)>>,
    monotonic: Monotonic,
}

/// A report older than this says nothing about now.
const FRESH: Duration = Duration::from_secs(1);

/// The monotonic clock the door judges freshness by (a seam for tests).
pub type Monotonic = Arc<dyn Fn() -> Instant + Send + Sync>;

impl Lag {
    fn report(&self, service: &str, lag_ms: i64) {
        let now = (self.monotonic)();
        let mut map = self.by_service.lock().expect("lag lock");
        match map.get_mut(service) {
            Some(entry) => *entry = (lag_ms, now),
            None => {
                map.insert(service.to_string(), (lag_ms, now));
            }
        }
    }

    /// The latest service, if one is later than `limit_ms` by a fresh report.
    fn behind(&self, limit_ms: i64) -> Option<(String, i64)> {
        let now = (self.monotonic)();
        let map = self.by_service.lock().expect("lag lock");
        map.iter()
            .filter(|(_, (lag, at))| *lag > limit_ms && now.duration_since(*at) <= FRESH)
            .max_by_key(|(_, (lag, _))| *lag)
            .map(|(s, (lag, _))| (s.clone(), *lag))
    }
}

/// The door of the HTTP ingress.
pub struct Door {
    turns: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_queued: usize,
    wait: Duration,
    shed_lag_ms: i64,
    lag: Lag,
    clock: Arc<dyn Clock>,
}

/// Held while a request runs.
pub struct Turn(#[allow(dead_code)] OwnedSemaphorePermit);

impl Door {
    pub fn new(settings: &Settings, max_instances: u32, clock: Arc<dyn Clock>) -> Self {
        Self::with_monotonic(settings, max_instances, clock, Arc::new(Instant::now))
    }

    pub fn with_monotonic(
        settings: &Settings,
        max_instances: u32,
        clock: Arc<dyn Clock>,
        monotonic: Monotonic,
    ) -> Self {
        let in_flight = match settings.max_in_flight {
            0 => (max_instances as usize / 2).max(1),
            n => n,
        };
        Door {
            turns: Arc::new(Semaphore::new(in_flight)),
            waiting: AtomicUsize::new(0),
            max_queued: settings.max_queued,
            wait: Duration::from_millis(settings.queue_wait_ms),
            shed_lag_ms: settings.shed_lag_ms as i64,
            lag: Lag {
                by_service: Mutex::new(HashMap::new()),
                monotonic,
            },
            clock,
        }
    }

    /// `part` (a service's worker, or the relay) is now handling what was stamped at
    /// `oldest_ms` (host clock).
    pub fn report(&self, part: &str, oldest_ms: i64) {
        self.lag
            .report(part, (self.clock.now_ms() - oldest_ms).max(0));
    }

    /// `part` took all there was to take: it is not behind, whatever it last reported.
    pub fn caught_up(&self, part: &str) {
        self.lag.report(part, 0);
    }

    /// Let a request in (a `command` is anything but a query), or say why not.
    pub async fn enter(&self, command: bool) -> Result<Turn, Refused> {
        if command && self.shed_lag_ms > 0 {
            if let Some((service, lag_ms)) = self.lag.behind(self.shed_lag_ms) {
                return Err(Refused::Behind { service, lag_ms });
            }
        }
        if let Ok(permit) = self.turns.clone().try_acquire_owned() {
            return Ok(Turn(permit));
        }
        let (waiting, _leave) = Occupant::enter(&self.waiting);
        if waiting >= self.max_queued {
            return Err(Refused::QueueFull(waiting));
        }
        match tokio::time::timeout(self.wait, self.turns.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Turn(permit)),
            _ => Err(Refused::Waited(self.wait.as_millis() as u64)),
        }
    }

    /// Requests waiting for a turn now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

/// One of those counted in a gauge (waiting requests, held queries) for as long as it lives,
/// however its wait ends.
pub(crate) struct Occupant<'a>(&'a AtomicUsize);

impl<'a> Occupant<'a> {
    /// Count one more in `gauge`: how many there were before, and the occupant.
    pub(crate) fn enter(gauge: &'a AtomicUsize) -> (usize, Self) {
        (gauge.fetch_add(1, Ordering::AcqRel), Occupant(gauge))
    }
}

impl Drop for Occupant<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    /// A door whose host clock stands at 10 s, and a monotonic clock moved by the test.
    fn door(in_flight: usize, queued: usize, wait_ms: u64) -> (Door, Arc<Mutex<Instant>>) {
        let clock = ManualClock::starting_at(10_000);
        let now = Arc::new(Mutex::new(Instant::now()));
        let monotonic = {
            let now = now.clone();
            Arc::new(move || *now.lock().unwrap())
        };
        let settings = Settings {
            max_in_flight: in_flight,
            max_queued: queued,
            queue_wait_ms: wait_ms,
            shed_lag_ms: 500,
            ..Settings::default()
        };
        (Door::with_monotonic(&settings, 64, clock, monotonic), now)
    }

    #[tokio::test]
    async fn beyond_the_queue_a_request_is_refused_at_once_and_a_freed_turn_goes_to_the_first_waiter(
    ) {
        let (door, _) = door(1, 1, 60_000);
        let door = Arc::new(door);
        let first = door.enter(false).await.unwrap();
        let waiter = {
            let door = door.clone();
            tokio::spawn(async move { door.enter(false).await.map(|_| ()) })
        };
        while door.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(door.enter(false).await.err(), Some(Refused::QueueFull(1)));
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(door.queued(), 0);
    }

    #[tokio::test]
    async fn a_request_that_waits_too_long_is_refused() {
        let (door, _) = door(1, 10, 50);
        let _held = door.enter(false).await.unwrap();
        assert_eq!(door.enter(false).await.err(), Some(Refused::Waited(50)));
        assert_eq!(door.queued(), 0);
    }

    #[tokio::test]
    async fn commands_are_shed_while_a_service_is_behind_and_queries_are_not() {
        let (door, now) = door(4, 4, 1000);
        door.report("order", 10_000 - 800);
        let refused = door.enter(true).await.err().unwrap();
        assert_eq!(
            refused,
            Refused::Behind {
                service: "order".into(),
                lag_ms: 800
            }
        );
        assert!(door.enter(false).await.is_ok(), "queries still served");
        // Caught up, or no word for over a second: commands are admitted again.
        door.report("order", 10_000 - 100);
        assert!(door.enter(true).await.is_ok());
        door.report("order", 10_000 - 800);
        assert!(door.enter(true).await.is_err());
        *now.lock().unwrap() += Duration::from_millis(1001);
        assert!(door.enter(true).await.is_ok());
        door.report("order", 10_000 - 800);
        door.caught_up("order");
        assert!(
            door.enter(true).await.is_ok(),
            "it drained what it was behind on"
        );
    }
}
