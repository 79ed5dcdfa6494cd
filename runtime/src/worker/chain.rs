//! Chaining: an event that read a state key which an event before it in its commit lane writes
//! is run again before the commit, reading those writes, so that it commits in the batch's
//! first round instead of failing the commit's check and waiting for the next.
//!
//! Guests run side by side on committed state (`Worker::decide_all`), so two events of one
//! batch that update one key — two orders of one user at the point service — used to meet at
//! the commit: the later one conflicted, was deferred with the events that depend on it, and
//! was handled in a second round after the first committed (on SQLite the whole first attempt
//! was also rolled back and committed again with a savepoint per event). Now the lane's events
//! are walked in commit order, keeping what the events so far write ([`Overlay`]); a later
//! event that read one of those keys is called again on the same committed state with the
//! overlay on top, seeing each key's value as the lane leaves it and the version its commit
//! will have written (each event that writes a key bumps its version by one).
//!
//! Design choice: the commit's checks are unchanged and remain the proof. A re-run reads the
//! versions the commit will find only if everything before it in the lane commits as expected;
//! if not (an earlier event conflicts with another instance, is deferred, or turns out
//! compensated), the check fails and the event is deferred as before. A re-run that fails,
//! finds no free instance, or scanned a prefix the overlay writes under (a scan's answer would
//! not show those writes) is dropped, and a second copy of an event (a duplicate) is not run
//! again: the event keeps its first run's effects and meets the conflict at the commit, where
//! the rounds, with their failure policy and the inbox, take over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Item, Verdict, Worker};
use crate::effects;
use crate::registry::Service;
use crate::stats::Stats;
use crate::storage::door::Found as Door;
use crate::wasm::bindings::{Effects, Write};
use crate::wasm::{Called, StateReader, Versioned};

/// A key as the lane's events so far leave it: the last value written, and how many of them
/// wrote it.
struct Written {
    value: Option<Vec<u8>>,
    bumps: i64,
}

/// What the events of a lane walked so far write, for the re-runs of the events after them.
#[derive(Clone, Default)]
pub(super) struct Overlay(Arc<Mutex<HashMap<String, Written>>>);

impl Overlay {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Written>> {
        self.0.lock().expect("overlay lock")
    }

    /// Whether a call read a key written before it in the lane: its commit would conflict.
    fn stale(&self, called: &Called<Effects>) -> bool {
        let written = self.lock();
        called.reads.0.keys().any(|key| written.contains_key(key))
    }

    /// Whether a call scanned a prefix that a key written before it falls under.
    fn scanned_over(&self, called: &Called<Effects>) -> bool {
        let written = self.lock();
        called
            .scanned
            .iter()
            .any(|prefix| written.keys().any(|key| key.starts_with(prefix.as_str())))
    }

    /// An event's writes, which commit after those before it (several writes to one key
    /// collapse to the last and bump its version once, as in `storage::state`).
    fn add(&self, writes: &[Write]) {
        let last: HashMap<&str, &Option<Vec<u8>>> =
            writes.iter().map(|w| (w.key.as_str(), &w.value)).collect();
        let mut written = self.lock();
        for (key, value) in last {
            let entry = written.entry(key.to_string()).or_insert(Written {
                value: None,
                bumps: 0,
            });
            entry.value.clone_from(value);
            entry.bumps += 1;
        }
    }
}

/// A re-run's state reads: committed state (`inner`) with the lane's earlier writes on top.
pub(super) struct Chained {
    pub service: String,
    pub overlay: Overlay,
    pub inner: Arc<dyn StateReader>,
}

#[async_trait::async_trait]
impl StateReader for Chained {
    async fn get(&self, service: &str, key: &str) -> Result<Versioned, String> {
        let found = self.inner.get(service, key).await?;
        if service != self.service {
            return Ok(found);
        }
        Ok(match self.overlay.lock().get(key) {
            Some(written) => Versioned {
                value: written.value.clone(),
                version: found.version + written.bumps,
            },
            None => found,
        })
    }

    /// Committed state only: a re-run that scanned under a key the overlay holds is dropped.
    async fn scan(
        &self,
        service: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Versioned)>, String> {
        self.inner.scan(service, prefix, after, limit).await
    }
}

impl Worker {
    /// Chain each commit lane's events (see the module doc): the lanes side by side, each in
    /// its commit order. Replaces the verdicts of the events run again.
    pub(super) async fn chain(
        &self,
        service: &Arc<Service>,
        items: &[Item<'_>],
        door: &Door,
        lanes: &[Vec<usize>],
        verdicts: &mut [Verdict],
    ) {
        if !self.ctx.config.worker.chain {
            return;
        }
        let walked = lanes
            .iter()
            .map(|lane| self.chain_lane(service, items, door, lane, verdicts));
        let again: Vec<(usize, Verdict)> = futures::future::join_all(walked)
            .await
            .into_iter()
            .flatten()
            .collect();
        Stats::add(&self.ctx.stats.chained, again.len() as u64);
        for (i, verdict) in again {
            verdicts[i] = verdict;
        }
    }

    async fn chain_lane(
        &self,
        service: &Arc<Service>,
        items: &[Item<'_>],
        door: &Door,
        lane: &[usize],
        verdicts: &[Verdict],
    ) -> Vec<(usize, Verdict)> {
        let overlay = Overlay::default();
        let mut again = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for &i in lane {
            let Verdict::Apply(called, attempt) = &verdicts[i] else {
                continue; // writes nothing
            };
            // A second copy of an event in the batch is a duplicate: found so by the next
            // round's door if its reads conflict, rather than late in the commit (which
            // would undo the first attempt).
            let copy = items[i]
                .event
                .as_ref()
                .is_ok_and(|e| !ids.insert(e.id.as_str()));
            if !overlay.stale(called) {
                overlay.add(&called.output.writes);
                continue;
            }
            // Stale and not run again: it conflicts at the commit, writing nothing.
            if copy || overlay.scanned_over(called) {
                continue;
            }
            if let Some(rerun) = self
                .rerun(service, &items[i], *attempt, door, &overlay)
                .await
            {
                overlay.add(&rerun.output.writes);
                again.push((i, Verdict::Apply(rerun, *attempt)));
            }
        }
        again
    }

    /// An event's call again, on the overlay: its effects if it succeeded, passed validation
    /// and scanned nothing the overlay writes under.
    async fn rerun(
        &self,
        service: &Arc<Service>,
        item: &Item<'_>,
        attempt: u32,
        door: &Door,
        overlay: &Overlay,
    ) -> Option<Called<Effects>> {
        let Ok(event) = &item.event else {
            return None;
        };
        let called = self
            .call(service, item, event, attempt, Some(door), Some(overlay))
            .await
            .ok()?;
        if overlay.scanned_over(&called) {
            return None;
        }
        let scope = effects::Scope {
            saga: item.saga(),
            new_id: &item.new_id,
        };
        let limits = &self.ctx.config.limits;
        effects::validate(limits, service, scope, &called.output).ok()?;
        Some(called)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader of fixed committed state.
    struct Committed(HashMap<String, Versioned>);

    #[async_trait::async_trait]
    impl StateReader for Committed {
        async fn get(&self, _: &str, key: &str) -> Result<Versioned, String> {
            Ok(self
                .0
                .get(key)
                .cloned()
                .unwrap_or_else(Versioned::never_written))
        }
        async fn scan(
            &self,
            _: &str,
            _: &str,
            _: Option<&str>,
            _: u32,
        ) -> Result<Vec<(String, Versioned)>, String> {
            Ok(Vec::new())
        }
    }

    fn write(key: &str, value: &str) -> Write {
        Write {
            key: key.into(),
            value: Some(value.as_bytes().to_vec()),
        }
    }

    #[tokio::test]
    async fn a_rerun_reads_the_lanes_writes_at_the_versions_its_commit_will_find() {
        let committed = HashMap::from([(
            "user/gus".to_string(),
            Versioned {
                value: Some(b"1000".to_vec()),
                version: 7,
            },
        )]);
        let overlay = Overlay::default();
        overlay.add(&[write("user/gus", "950"), write("user/gus", "900")]);
        overlay.add(&[write("user/gus", "700"), write("tx/o-b", "used")]);
        let reader = Chained {
            service: "point".into(),
            overlay: overlay.clone(),
            inner: Arc::new(Committed(committed)),
        };
        let gus = reader.get("point", "user/gus").await.unwrap();
        assert_eq!(gus.value.as_deref(), Some(&b"700"[..]));
        assert_eq!(gus.version, 9, "two events wrote it: one bump each");
        let tx = reader.get("point", "tx/o-b").await.unwrap();
        assert_eq!((tx.value.as_deref(), tx.version), (Some(&b"used"[..]), 1));
        let hal = reader.get("point", "user/hal").await.unwrap();
        assert_eq!(hal, Versioned::never_written());
        let other = reader.get("order", "user/gus").await.unwrap();
        assert_eq!(
            other.version, 7,
            "another service's key of that name is not overlaid"
        );
    }

    #[test]
    fn a_call_is_stale_if_it_read_a_key_written_before_it() {
        let overlay = Overlay::default();
        overlay.add(&[write("user/gus", "900")]);
        let called = |reads: &[&str], scanned: &[&str]| Called {
            output: Effects::none(),
            reads: crate::wasm::ReadSet(reads.iter().map(|k| (k.to_string(), 1)).collect()),
            scanned: scanned.iter().map(|p| p.to_string()).collect(),
        };
        assert!(overlay.stale(&called(&["tx/o-a", "user/gus"], &[])));
        assert!(!overlay.stale(&called(&["user/hal"], &["user/"])));
        assert!(overlay.scanned_over(&called(&[], &["user/"])));
        assert!(!overlay.scanned_over(&called(&[], &["tx/"])));
    }
}
