//! Guarded deploy (`runtime deploy --verify`): replay what the active version was given
//! through a new version in the sandbox and show where the effects differ, before activating.
//!
//! Recording: every handler call of the worker reads state through a [`Recorder`], which keeps
//! what each `get` and `scan` returned. The event, its context, those reads and the effects the
//! handler produced form a [`Recording`]. [`Recordings`] buffers them in memory (the newest
//! `worker.verify_recent` per service) and [`flush`] writes the buffer to the database every
//! [`FLUSH_EVERY`], off the event path, where `storage::recordings` keeps the newest per
//! service across all instances and restarts; an event re-run after a conflict replaces its
//! earlier record. The cost on the event path is the recording itself (a copy of the event,
//! the values read and the effects), no I/O.
//!
//! Replay: the new version's `on-event` runs with the recorded context (same `now-ms`,
//! `new-id`) against a [`Replay`] reader that answers only from the recorded reads, so the
//! inputs are exactly what the active version saw. A read the recorded run did not make
//! fails the call (reported as such). Effects are compared and thrown away: nothing replayed
//! touches the database or Kafka.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::storage::{self, recordings::Recorded, Db};
use crate::wasm::bindings::{Context, Effects, Event};
use crate::wasm::{Guest, StateReader, Versioned};

/// How often an instance writes its new recordings to the database.
/// Each flush writes at most `keep` rows per service, so this bounds the write load the
/// recordings add (measured: flushing every second with 200 kept cut a SQLite instance's
/// throughput by a third under 400 events/s).
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// What one handler call read.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Tape {
    gets: BTreeMap<String, Versioned>,
    /// Keyed by (prefix, cursor, limit): a scan from elsewhere or with another limit is
    /// another read.
    #[serde(with = "scans_as_list")]
    scans: BTreeMap<ScanKey, Vec<(String, Versioned)>>,
}

/// What a scan asked for: prefix, the key it continued after, limit.
type ScanKey = (String, Option<String>, u32);

/// JSON objects need string keys: scans are stored as `[prefix, limit, rows, after]` lists
/// (`after` is absent in recordings made before scans had a cursor).
mod scans_as_list {
    use super::*;
    type Rows = Vec<(String, Versioned)>;
    type Scans = BTreeMap<ScanKey, Rows>;

    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Paged(String, u32, Rows, Option<String>),
        Whole(String, u32, Rows),
    }

    pub fn serialize<S: serde::Serializer>(scans: &Scans, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(scans.iter().map(|((p, a, l), rows)| (p, l, rows, a)))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Scans, D::Error> {
        let list: Vec<Entry> = serde::Deserialize::deserialize(d)?;
        Ok(list
            .into_iter()
            .map(|entry| match entry {
                Entry::Paged(p, l, rows, a) => ((p, a, l), rows),
                Entry::Whole(p, l, rows) => ((p, None, l), rows),
            })
            .collect())
    }
}

/// A reader that keeps what it returned.
pub struct Recorder {
    inner: Arc<dyn StateReader>,
    tape: Mutex<Tape>,
}

impl Recorder {
    pub fn new(inner: Arc<dyn StateReader>) -> Self {
        Recorder {
            inner,
            tape: Mutex::new(Tape::default()),
        }
    }

    pub fn take(&self) -> Tape {
        std::mem::take(&mut self.tape.lock().expect("tape lock"))
    }
}

#[async_trait::async_trait]
impl StateReader for Recorder {
    async fn get(&self, service: &str, key: &str) -> Result<Versioned, String> {
        let found = self.inner.get(service, key).await?;
        let mut tape = self.tape.lock().expect("tape lock");
        tape.gets.insert(key.to_string(), found.clone());
        Ok(found)
    }

    async fn scan(
        &self,
        service: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Versioned)>, String> {
        let rows = self.inner.scan(service, prefix, after, limit).await?;
        let mut tape = self.tape.lock().expect("tape lock");
        let key = (prefix.to_string(), after.map(str::to_string), limit);
        tape.scans.insert(key, rows.clone());
        Ok(rows)
    }
}

/// Answers only what a recorded call read.
pub struct Replay(Tape);

#[async_trait::async_trait]
impl StateReader for Replay {
    async fn get(&self, _: &str, key: &str) -> Result<Versioned, String> {
        if let Some(v) = self.0.gets.get(key) {
            return Ok(v.clone());
        }
        let scanned = self.0.scans.values().flatten().find(|(k, _)| k == key);
        match scanned {
            Some((_, v)) => Ok(v.clone()),
            None => Err(format!(
                "the active version did not read {key:?} for this event, so its value is not recorded"
            )),
        }
    }

    async fn scan(
        &self,
        _: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Versioned)>, String> {
        let key = (prefix.to_string(), after.map(str::to_string), limit);
        self.0.scans.get(&key).cloned().ok_or_else(|| {
            format!(
                "the active version did not scan {prefix:?} (after {after:?}, limit {limit}) \
                 for this event, so the result is not recorded"
            )
        })
    }
}

/// One handled event with its inputs and what the version that handled it produced.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Recording {
    pub event: Event,
    pub ctx: Context,
    pub tape: Tape,
    pub effects: Effects,
    pub version: String,
}

/// Recordings not yet written to the database, the newest `keep` per service.
pub struct Recordings {
    keep: usize,
    pending: Mutex<HashMap<String, VecDeque<Recording>>>,
}

impl Recordings {
    pub fn new(keep: usize) -> Self {
        Recordings {
            keep,
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.keep > 0
    }

    pub fn add(&self, service: &str, recording: Recording) {
        if self.keep == 0 {
            return;
        }
        let mut all = self.pending.lock().expect("recordings lock");
        // Called per event: the service's key is allocated once, not on every call.
        if !all.contains_key(service) {
            all.insert(service.to_string(), VecDeque::new());
        }
        let recent = all.get_mut(service).expect("inserted above");
        recent.retain(|r| r.event.id != recording.event.id);
        if recent.len() >= self.keep {
            recent.pop_front();
        }
        recent.push_back(recording);
    }

    /// Everything pending, as rows for `storage::recordings`; the buffer is left empty.
    fn take(&self, instance: &str) -> Vec<Recorded> {
        let all = std::mem::take(&mut *self.pending.lock().expect("recordings lock"));
        let mut rows = Vec::new();
        for (service, recent) in all {
            for r in recent {
                match serde_json::to_string(&r) {
                    Ok(body) => rows.push(Recorded {
                        service: service.clone(),
                        event_id: r.event.id.clone(),
                        recorded_ms: r.ctx.now_ms,
                        instance: instance.to_string(),
                        version: r.version.clone(),
                        body,
                    }),
                    Err(e) => {
                        tracing::warn!(%service, event = %r.event.id, "recording not kept: {e}")
                    }
                }
            }
        }
        rows
    }

    /// Write what is pending to the database (serialised on a blocking thread: it is
    /// hundreds of JSON documents at a time).
    pub async fn save(self: &Arc<Self>, db: &Db, instance: &str) -> Result<(), storage::Error> {
        let (me, instance) = (self.clone(), instance.to_string());
        let rows = tokio::task::spawn_blocking(move || me.take(&instance))
            .await
            .unwrap_or_default();
        storage::recordings::save(db, &rows, self.keep).await
    }

    /// The newest recordings of `service` on every instance (this one's saved first), oldest
    /// first. Rows this runtime cannot read (written by another version of it) are skipped.
    pub async fn of(
        self: &Arc<Self>,
        db: &Db,
        instance: &str,
        service: &str,
    ) -> Result<Vec<Recording>, storage::Error> {
        self.save(db, instance).await?;
        let rows = storage::recordings::recent(db, service, self.keep).await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| match serde_json::from_str(&row.body) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(service, event = %row.event_id, "unreadable recording skipped: {e}");
                    None
                }
            })
            .collect())
    }
}

/// Write new recordings to the database every [`FLUSH_EVERY`] until the instance stops (and
/// once more then). A failed write loses that batch of samples, nothing else.
pub async fn flush(recordings: Arc<Recordings>, db: Db, instance: String, stop: CancellationToken) {
    if !recordings.enabled() {
        return;
    }
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(FLUSH_EVERY) => false,
        };
        if let Err(e) = recordings.save(&db, &instance).await {
            tracing::warn!("could not save recordings for deploy --verify: {e}");
        }
        if stopping {
            return;
        }
    }
}

/// What replaying one recording through a new version gave.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replayed {
    pub event_id: String,
    pub event_type: String,
    pub saga: String,
    /// The version whose effects were recorded.
    pub recorded_version: String,
    /// `same`, `differs` or `failed`.
    pub result: &'static str,
    /// For `differs`: `- effect` only the recorded version produced, `+ effect` only the new.
    /// For `failed`: why the new version's call failed.
    pub detail: Vec<String>,
}

/// Replay `recording` through `guest`.
pub async fn replay(guest: &Guest, recording: &Recording) -> Replayed {
    let reader = Arc::new(Replay(recording.tape.clone()));
    let called = match guest.slots().admit().await {
        Ok(slot) => {
            guest
                .on_event(&slot, reader, &recording.ctx, &recording.event)
                .await
        }
        Err(busy) => Err(busy),
    };
    let (result, detail) = match called {
        Ok(called) => {
            let diff = diff(&lines(&recording.effects), &lines(&called.output));
            if diff.is_empty() {
                ("same", diff)
            } else {
                ("differs", diff)
            }
        }
        Err(failure) => ("failed", vec![failure.to_string()]),
    };
    Replayed {
        event_id: recording.event.id.clone(),
        event_type: recording.event.type_.clone(),
        saga: recording.event.subject.clone(),
        recorded_version: recording.version.clone(),
        result,
        detail,
    }
}

fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => format!("<{} bytes>", bytes.len()),
    }
}

/// Effects as comparable lines.
fn lines(fx: &Effects) -> Vec<String> {
    let writes = fx.writes.iter().map(|w| match &w.value {
        Some(v) => format!("put {} = {}", w.key, show(v)),
        None => format!("delete {}", w.key),
    });
    let emits = fx.emits.iter().map(|e| {
        format!(
            "emit {} {} subject={} {}",
            e.topic,
            e.type_,
            e.subject,
            show(&e.data.data)
        )
    });
    let set = fx.set_deadlines.iter().map(|d| {
        let after = d
            .after_ms
            .map(|ms| format!("{ms} ms"))
            .unwrap_or_else(|| "the saga deadline".into());
        format!("set deadline {}/{} after {after}", d.subject, d.name)
    });
    let cancel = fx
        .cancel_deadlines
        .iter()
        .map(|d| format!("cancel deadline {}/{}", d.subject, d.name));
    writes.chain(emits).chain(set).chain(cancel).collect()
}

/// `- line` for what only `old` has, `+ line` for what only `new` has (as multisets).
fn diff(old: &[String], new: &[String]) -> Vec<String> {
    let mut unmatched: Vec<&String> = new.iter().collect();
    let mut out = Vec::new();
    for line in old {
        match unmatched.iter().position(|n| *n == line) {
            Some(i) => {
                unmatched.remove(i);
            }
            None => out.push(format!("- {line}")),
        }
    }
    out.extend(unmatched.into_iter().map(|l| format!("+ {l}")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_shows_what_each_side_alone_has() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(diff(&s(&["a", "b", "b"]), &s(&["b", "a", "b"])).is_empty());
        assert_eq!(
            diff(&s(&["a", "b", "b"]), &s(&["b", "c"])),
            s(&["- a", "- b", "+ c"])
        );
    }

    #[test]
    fn a_tape_survives_its_json_form() {
        let mut tape = Tape::default();
        let v = Versioned {
            value: Some(b"{}".to_vec()),
            version: 2,
        };
        tape.gets.insert("a".into(), v.clone());
        tape.scans
            .insert(("p/".into(), None, 5), vec![("p/x".into(), v.clone())]);
        tape.scans
            .insert(("p/".into(), Some("p/x".into()), 9), vec![]);
        let json = serde_json::to_string(&tape).unwrap();
        let back: Tape = serde_json::from_str(&json).unwrap();
        assert_eq!((back.gets, back.scans), (tape.gets, tape.scans), "{json}");
        // A recording made before scans had a cursor: `[prefix, limit, rows]`.
        let old = r#"{"gets":{},"scans":[["p/",5,[["p/x",{"value":[123,125],"version":2}]]]]}"#;
        let back: Tape = serde_json::from_str(old).unwrap();
        assert_eq!(
            back.scans[&("p/".to_string(), None, 5)],
            [("p/x".to_string(), v)]
        );
    }

    #[tokio::test]
    async fn a_replay_answers_only_recorded_reads() {
        let mut tape = Tape::default();
        let v = |x: &[u8]| Versioned {
            value: Some(x.to_vec()),
            version: 3,
        };
        tape.gets.insert("a".into(), v(b"1"));
        tape.scans
            .insert(("p/".into(), None, 10), vec![("p/x".into(), v(b"2"))]);
        let r = Replay(tape);
        assert_eq!(r.get("s", "a").await.unwrap(), v(b"1"));
        assert_eq!(
            r.get("s", "p/x").await.unwrap(),
            v(b"2"),
            "a key a recorded scan returned"
        );
        assert!(r
            .get("s", "b")
            .await
            .unwrap_err()
            .contains("did not read \"b\""));
        assert_eq!(r.scan("s", "p/", None, 10).await.unwrap().len(), 1);
        assert!(
            r.scan("s", "p/", None, 5).await.is_err(),
            "another limit is another read"
        );
        assert!(
            r.scan("s", "p/", Some("p/x"), 10).await.is_err(),
            "another cursor is another read"
        );
    }
}
