//! Blocking subscriptions hold their partition, not their service. An event whose handler
//! fails under a blocking policy is not retried inside its batch (that would stop every
//! partition of the service until it succeeds): the batch commits everything else, the
//! event's partition is paused and rewound to it (`Consumer::hold`), and after the backoff the
//! partition is resumed there (`Consumer::release`) and the event is handled again with the
//! next attempt number. Events behind it in its partition wait, so per-saga order holds;
//! the service's other partitions flow meanwhile. The position stored in the database never
//! passes a held event, so an instance that takes the partition over (or this one after a
//! restart) starts at it too, from attempt 1.
//!
//! One order across partitions is kept: a compensation never overtakes a step of its saga
//! that this worker is still retrying. It waits (its own partition held, without counting as
//! a failure) until that step has been handled, so a step that finishes late is compensated
//! after it finished (SPEC A9's late rows), not ignored because the compensation came first.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::{Item, Verdict};
use crate::kafka::consumer::Record;
use crate::registry::{Service, Step};

/// A partition waiting to retry the event at `offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct Hold {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The attempt that failed (0: a compensation waiting behind its saga's step).
    pub attempt: u32,
    pub until: Instant,
    /// The saga of the held event.
    pub saga: Option<String>,
}

/// A hold that ended: its event is to be handled again.
#[derive(Debug)]
struct Released {
    offset: i64,
    attempt: u32,
    saga: Option<String>,
    at: Instant,
}

/// How long a released event may take to come back before it no longer makes its saga's
/// compensations wait (its partition may have moved to another instance).
pub(super) const RELEASED_FOR: Duration = Duration::from_secs(10);

/// The held partitions of one worker, and the attempts of events released from a hold.
#[derive(Debug, Default)]
pub struct Holds {
    held: HashMap<(String, i32), Hold>,
    /// Released holds, until their event is seen again.
    released: HashMap<(String, i32), Released>,
}

impl Holds {
    pub fn insert(&mut self, hold: Hold) {
        let lane = (hold.topic.clone(), hold.partition);
        self.released.remove(&lane);
        self.held.insert(lane, hold);
    }

    pub fn is_held(&self, topic: &str, partition: i32) -> bool {
        lane(&self.held, topic, partition).is_some()
    }

    /// The holds whose time has come, removed; their partitions are to be released.
    pub fn due(&mut self, now: Instant) -> Vec<Hold> {
        let lanes: Vec<(String, i32)> = self
            .held
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(lane, _)| lane.clone())
            .collect();
        let mut due = Vec::with_capacity(lanes.len());
        for lane in lanes {
            if let Some(h) = self.held.remove(&lane) {
                let released = Released {
                    offset: h.offset,
                    attempt: h.attempt,
                    saga: h.saga.clone(),
                    at: now,
                };
                self.released.insert(lane, released);
                due.push(h);
            }
        }
        self.released
            .retain(|_, r| now.duration_since(r.at) < RELEASED_FOR);
        due
    }

    /// If a step of `saga` is being retried here (held, or released and not handled yet):
    /// when it is next tried. A compensation of the saga waits until then.
    pub fn step_pending(&self, saga: &str, now: Instant) -> Option<Instant> {
        let held = self
            .held
            .values()
            .filter(|h| h.attempt > 0 && h.saga.as_deref() == Some(saga))
            .map(|h| h.until)
            .min();
        let released = self
            .released
            .values()
            .any(|r| r.attempt > 0 && r.saga.as_deref() == Some(saga))
            .then_some(now);
        held.or(released)
    }

    /// Resolves when the earliest hold is due; never if nothing is held.
    pub async fn next_due(&self) {
        match self.held.values().map(|h| h.until).min() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    /// The attempt a record's handling starts at: the one after the attempt that failed if
    /// it is an event released from a hold, else 1.
    pub fn first_attempt(&self, record: &Record) -> u32 {
        match self.released_at(record) {
            Some(r) if r.offset == record.offset => r.attempt.saturating_add(1),
            _ => 1,
        }
    }

    /// If `record` comes after an event released from a hold on its partition that has not
    /// come back yet: that event's offset. The record must not be handled before it (the
    /// stored position would pass the event); the partition is to be rewound to it.
    pub fn ahead_of_released(&self, record: &Record) -> Option<i64> {
        self.released_at(record)
            .filter(|r| record.offset > r.offset)
            .map(|r| r.offset)
    }

    /// A record was handled to the end (committed, not held again): if it was released from
    /// a hold, its saga's compensations no longer wait for it.
    pub fn handled(&mut self, record: &Record) {
        if self
            .released_at(record)
            .is_some_and(|r| r.offset == record.offset)
        {
            self.released
                .remove(&(record.topic.clone(), record.partition));
        }
    }

    fn released_at(&self, record: &Record) -> Option<&Released> {
        lane(&self.released, &record.topic, record.partition)
    }
}

/// The entry of a partition. These maps hold the few partitions held or just released, and
/// are asked about every event: a scan, with no key to allocate (usually of an empty map).
fn lane<'a, V>(map: &'a HashMap<(String, i32), V>, topic: &str, partition: i32) -> Option<&'a V> {
    map.iter()
        .find(|((t, p), _)| t == topic && *p == partition)
        .map(|(_, v)| v)
}

/// A hold of `item`'s partition at it, after its `attempt` failed.
pub(super) fn hold(item: &Item<'_>, attempt: u32, retry_in: Duration) -> Hold {
    Hold {
        topic: item.record.topic.clone(),
        partition: item.record.partition,
        offset: item.record.offset,
        attempt,
        until: tokio::time::Instant::now() + retry_in,
        saga: item.saga().map(str::to_string),
    }
}

/// Within one batch: a compensation whose saga has a step held in another partition waits
/// for it (see the module docs), and so does the rest of the compensation's partition. Verdicts
/// are data until the commit, so turning one into a wait discards nothing but its effects.
pub(super) fn compensations_wait_for_held_steps(
    service: &Service,
    items: &[Item<'_>],
    verdicts: &mut [Verdict],
) {
    let mut held_steps: HashMap<&str, Duration> = HashMap::new();
    for (item, verdict) in items.iter().zip(verdicts.iter()) {
        if let (Verdict::Held { attempt, retry_in }, Some(saga)) = (verdict, item.saga()) {
            if *attempt > 0 {
                held_steps.insert(saga, *retry_in);
            }
        }
    }
    if held_steps.is_empty() {
        return;
    }
    let mut waiting: HashSet<(&str, i32)> = HashSet::new();
    for (item, verdict) in items.iter().zip(verdicts.iter_mut()) {
        let lane = (item.record.topic.as_str(), item.record.partition);
        if waiting.contains(&lane) {
            *verdict = Verdict::Behind;
            continue;
        }
        let compensation = item
            .event
            .as_ref()
            .is_ok_and(|e| service.step(&e.topic, &e.type_) == Step::Compensation);
        let step_held = item.saga().and_then(|saga| held_steps.get(saga)).copied();
        if let Some(retry_in) = step_held.filter(|_| compensation) {
            if matches!(verdict, Verdict::Apply(..)) {
                *verdict = Verdict::Held {
                    attempt: 0,
                    retry_in,
                };
            }
        }
        if verdict.waits() {
            waiting.insert(lane);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32, offset: i64) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            key: None,
            headers: Vec::new(),
            payload: Vec::new(),
        }
    }

    #[test]
    fn a_released_event_continues_its_attempts_and_others_start_at_one() {
        let start = Instant::now();
        let mut holds = Holds::default();
        holds.insert(Hold {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            attempt: 3,
            until: start + Duration::from_millis(100),
            saga: Some("s1".into()),
        });
        let at = start + Duration::from_millis(100);
        assert_eq!(holds.step_pending("s1", start), Some(at));
        assert_eq!(holds.step_pending("s2", start), None);
        assert!(holds.is_held("t", 0) && !holds.is_held("t", 1));
        assert!(holds.due(start).is_empty(), "not yet");
        let due = holds.due(start + Duration::from_millis(100));
        assert_eq!(due.len(), 1);
        assert!(!holds.is_held("t", 0));
        let later = start + Duration::from_millis(150);
        assert_eq!(
            holds.step_pending("s1", later),
            Some(later),
            "released, not handled yet"
        );
        assert_eq!(holds.first_attempt(&record(1, 7)), 1, "another partition");
        assert_eq!(holds.first_attempt(&record(0, 8)), 1, "another offset");
        assert_eq!(holds.ahead_of_released(&record(0, 9)), Some(7));
        assert_eq!(holds.ahead_of_released(&record(0, 7)), None);
        assert_eq!(holds.ahead_of_released(&record(1, 9)), None);
        assert_eq!(holds.first_attempt(&record(0, 7)), 4);
        holds.handled(&record(0, 8));
        assert!(holds.step_pending("s1", later).is_some(), "another record");
        holds.handled(&record(0, 7));
        assert_eq!(
            holds.first_attempt(&record(0, 7)),
            1,
            "handled: a new start"
        );
        assert_eq!(holds.step_pending("s1", later), None, "handled");
    }

    #[test]
    fn a_waiting_compensation_does_not_make_others_wait() {
        let start = Instant::now();
        let mut holds = Holds::default();
        holds.insert(Hold {
            topic: "c".into(),
            partition: 0,
            offset: 1,
            attempt: 0,
            until: start,
            saga: Some("s1".into()),
        });
        assert_eq!(holds.step_pending("s1", start), None);
    }
}
