//! Which events of a partition wait behind the ones a conflict deferred in a batch, and which
//! commit now (`worker::commit`).

use std::collections::HashSet;

use super::{Item, Verdict};

/// What a partition's deferred events hold back of the events behind them in a batch: the
/// events of their sagas (per-saga order), those that touch a state key they touched (their
/// re-runs must not see, or be seen by, a later event out of order), every event if one of
/// them has no saga, and an event that would hold the partition ([`Blocked::holds_back`]).
/// Any other event behind them commits now: it is independent of them, as if it were in
/// another partition.
pub(super) struct Blocked<'a> {
    /// The offset of the first deferred event: the partition's position stays there.
    pub(super) first: i64,
    all: bool,
    sagas: HashSet<&'a str>,
    keys: HashSet<&'a str>,
}

impl<'a> Blocked<'a> {
    pub(super) fn at(first: i64) -> Self {
        Blocked {
            first,
            all: false,
            sagas: HashSet::new(),
            keys: HashSet::new(),
        }
    }

    /// Whether `item` (with `verdict`) must wait for the deferred events. One that would hold
    /// its partition (a failed attempt under a blocking policy, or behind one) waits too: a
    /// hold rewinds the partition to its event, which would skip the deferred ones before it.
    pub(super) fn holds_back(&self, item: &Item<'_>, verdict: &Verdict) -> bool {
        let Some(saga) = item.saga() else {
            return true;
        };
        self.all
            || verdict.waits()
            || self.sagas.contains(saga)
            || verdict.keys().any(|k| self.keys.contains(k))
    }

    /// `item` (with `verdict`) is deferred too: what follows waits for it as well.
    pub(super) fn add(&mut self, item: &'a Item<'_>, verdict: &'a Verdict) {
        match item.saga() {
            Some(saga) => {
                self.sagas.insert(saga);
            }
            None => self.all = true,
        }
        self.keys.extend(verdict.keys());
    }
}
