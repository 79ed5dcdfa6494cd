//! `GET /healthz` (the process serves) and `GET /readyz` (it can do its job): the database
//! answers (migrations run at connect, before anything serves), every installed service has
//! its partition ownership settled at least once and its consumer has had a fetch answered
//! since (it reads, not only holds, its partitions), and the relay knows which of its slots
//! it holds and has a producer for each (connected: a new one takes up to ~0.5 s, which the
//! first events would otherwise wait for). `503` with the same JSON detail while not ready.
//! Open without the admin token, like the other read-only views.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

/// What the moving parts last said about themselves; each writes its own line.
#[derive(Default)]
pub struct Board {
    /// service → (partitions held here, partitions in all).
    services: Mutex<BTreeMap<String, (usize, usize)>>,
    /// service → whether its consumer has had a fetch answered since its last assignment
    /// (`kafka::consumer::Consumer::fetched`).
    fetched: Mutex<BTreeMap<String, Arc<AtomicBool>>>,
    /// The relay slots held here and how many there are; `None` until the relay first looked.
    relay: Mutex<Option<(Vec<u32>, u32)>>,
    /// The relay slots whose loop has made its producer since the slot was taken.
    publishing: Mutex<BTreeSet<u32>>,
}

impl Board {
    /// `service`'s ownership settled: it reads `held` of `of` partitions here.
    pub fn assigned(&self, service: &str, held: usize, of: usize) {
        self.services
            .lock()
            .expect("board lock")
            .insert(service.to_string(), (held, of));
    }

    /// `service` consumes here: `fetched` tells whether its consumer reads.
    pub fn consuming(&self, service: &str, fetched: Arc<AtomicBool>) {
        self.fetched
            .lock()
            .expect("board lock")
            .insert(service.to_string(), fetched);
    }

    /// `service` stopped consuming here.
    pub fn stopped(&self, service: &str) {
        self.services.lock().expect("board lock").remove(service);
        self.fetched.lock().expect("board lock").remove(service);
    }

    /// The relay checked its slot leases: it holds `held` of `of` slots.
    pub fn relay(&self, held: Vec<u32>, of: u32) {
        *self.relay.lock().expect("board lock") = Some((held, of));
    }

    /// Relay slot `slot` has made its producer (`true`), or was taken anew (`false`).
    pub fn publishing(&self, slot: u32, ready: bool) {
        let mut publishing = self.publishing.lock().expect("board lock");
        if ready {
            publishing.insert(slot);
        } else {
            publishing.remove(&slot);
        }
    }

    /// Readiness with its detail, given the installed services and a database check (its
    /// error, if any, and how long it took).
    pub fn ready(
        &self,
        installed: &[String],
        database: Result<(), String>,
        took: std::time::Duration,
    ) -> (bool, Value) {
        let mut waiting: Vec<String> = Vec::new();
        let db = match &database {
            Ok(()) => json!({"ok": true, "ms": took.as_secs_f64() * 1000.0}),
            Err(e) => {
                waiting.push(format!("the database does not answer: {e}"));
                json!({"ok": false, "error": e})
            }
        };
        let assigned = self.services.lock().expect("board lock").clone();
        let fetched = self.fetched.lock().expect("board lock");
        let mut services = serde_json::Map::new();
        for name in installed {
            match assigned.get(name) {
                Some((held, of)) => {
                    let reading = fetched.get(name).is_none_or(|f| f.load(Ordering::Relaxed));
                    if !reading {
                        waiting.push(format!(
                            "service {name}'s consumer has had no fetch answered yet"
                        ));
                    }
                    services.insert(
                        name.clone(),
                        json!({"partitions": held, "of": of, "reading": reading}),
                    );
                }
                None => {
                    waiting.push(format!("service {name} has no partition ownership yet"));
                    services.insert(name.clone(), json!({"partitions": null}));
                }
            }
        }
        let relay = self.relay.lock().expect("board lock").clone();
        let publishing = self.publishing.lock().expect("board lock").clone();
        let relay = match relay {
            Some((held, of)) => {
                if let Some(slot) = held.iter().find(|s| !publishing.contains(s)) {
                    waiting.push(format!("relay slot {slot} has no producer yet"));
                }
                let publishing: Vec<u32> = held
                    .iter()
                    .copied()
                    .filter(|s| publishing.contains(s))
                    .collect();
                json!({"slots": of, "held": held, "publishing": publishing})
            }
            None => {
                waiting.push("the relay has not checked its slot leases yet".into());
                json!({"slots": null, "held": null})
            }
        };
        let ready = waiting.is_empty();
        let detail = json!({
            "ready": ready,
            "database": db,
            "migrations": if database.is_ok() { "applied" } else { "unknown" },
            "services": services,
            "relay": relay,
            "waiting": waiting,
        });
        (ready, detail)
    }
}

/// Time a database round trip.
pub async fn ping(db: &crate::storage::Db) -> (Result<(), String>, std::time::Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        crate::storage::query("SELECT 1").execute(db.pool()),
    )
    .await;
    let result = match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s".into()),
    };
    (result, started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_part_has_reported_and_the_database_answers() {
        let board = Board::default();
        let services = vec!["order".to_string()];
        let took = std::time::Duration::from_millis(1);
        let (ready, detail) = board.ready(&services, Ok(()), took);
        assert!(!ready);
        assert_eq!(detail["waiting"].as_array().unwrap().len(), 2, "{detail}");
        board.assigned("order", 2, 4);
        board.relay(vec![1], 2);
        let fetched = Arc::new(AtomicBool::new(false));
        board.consuming("order", fetched.clone());
        let (ready, detail) = board.ready(&services, Ok(()), took);
        assert!(!ready, "assigned but not reading yet: {detail}");
        assert_eq!(detail["services"]["order"]["reading"], false);
        fetched.store(true, Ordering::Relaxed);
        let (ready, detail) = board.ready(&services, Ok(()), took);
        assert!(
            !ready,
            "reading but the relay slot has no producer yet: {detail}"
        );
        assert_eq!(detail["relay"]["publishing"], serde_json::json!([]));
        board.publishing(1, true);
        let (ready, detail) = board.ready(&services, Ok(()), took);
        assert!(ready, "{detail}");
        assert_eq!(detail["relay"]["publishing"], serde_json::json!([1]));
        assert_eq!(detail["services"]["order"]["partitions"], 2);
        assert_eq!(detail["relay"]["held"], serde_json::json!([1]));
        let (ready, detail) = board.ready(&services, Err("refused".into()), took);
        assert!(!ready);
        assert_eq!(detail["database"]["ok"], false);
    }
}
