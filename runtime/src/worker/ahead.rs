//! Read-ahead: the state keys a batch's handlers are about to read, fetched with the door
//! check's statement instead of one gathered read each during the calls (PostgreSQL, where a
//! read is a round trip on the event's path).
//!
//! Handlers read keys named after their event's saga (`exchange/<saga>`, `tx/<saga>`). After
//! each call the worker learns, per event topic and type, the keys it read that contain the
//! event's subject, as a prefix and a suffix around it ([`ReadAhead::learn`]); for the next
//! batch it asks the door for those keys of each event's subject ([`ReadAhead::keys`]), and
//! the calls read them from the door's answer ([`Ahead`]). A guess that no call reads costs a
//! probe in a statement that runs anyway; a key not guessed is read as before.
//!
//! Design choice: what a call reads is unchanged in kind — committed state, as of a moment
//! before the call (the door's statement instead of the read's) — and the commit checks every
//! read version under its lock as before, so a value that changed in between is a conflict and
//! the event runs again in the next round, whose door reads afresh. Bounded: at most
//! [`TEMPLATES`] templates per event type, [`TYPES`] event types per service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::stats::Stats;
use crate::wasm::{StateReader, Versioned};

/// Templates kept per event topic and type.
const TEMPLATES: usize = 4;
/// Event topics and types learned per service (types come from outside; a record of any
/// type may arrive).
const TYPES: usize = 64;
/// Subjects shorter than this are not looked for in keys: they would match by chance.
const MIN_SUBJECT: usize = 8;

/// A key a handler read, as the text before and after its event's subject.
type Template = (String, String);

/// What one service's handlers read, per event topic, then type: templates around the event's
/// subject. Looked up by `&str` (no allocation per event).
#[derive(Default)]
pub(super) struct ReadAhead {
    learned: Mutex<HashMap<String, HashMap<String, Vec<Template>>>>,
}

/// Whether `key` is `template` around some subject.
fn fits((prefix, suffix): &Template, key: &str) -> bool {
    key.len() > prefix.len() + suffix.len() && key.starts_with(prefix) && key.ends_with(suffix)
}

impl ReadAhead {
    /// The keys a handler of `(topic, type)` read last time, for an event of `subject`.
    pub(super) fn keys(&self, topic: &str, event_type: &str, subject: &str) -> Vec<String> {
        if subject.len() < MIN_SUBJECT {
            return Vec::new();
        }
        let learned = self.learned.lock().expect("read-ahead lock");
        let Some(templates) = learned.get(topic).and_then(|types| types.get(event_type)) else {
            return Vec::new();
        };
        templates
            .iter()
            .map(|(prefix, suffix)| format!("{prefix}{subject}{suffix}"))
            .collect()
    }

    /// A handler of `(topic, type)` for an event of `subject` read `keys`. Once a type's
    /// templates are known this only looks: nothing is allocated.
    pub(super) fn learn<'k>(
        &self,
        topic: &str,
        event_type: &str,
        subject: &str,
        keys: impl IntoIterator<Item = &'k str>,
    ) {
        if subject.len() < MIN_SUBJECT {
            return;
        }
        let mut learned = self.learned.lock().expect("read-ahead lock");
        let known = learned.get(topic).and_then(|types| types.get(event_type));
        let new: Vec<Template> = keys
            .into_iter()
            .filter(|key| known.is_none_or(|t| !t.iter().any(|t| fits(t, key))))
            .filter_map(|key| {
                let at = key.find(subject)?;
                Some((key[..at].to_string(), key[at + subject.len()..].to_string()))
            })
            .collect();
        if new.is_empty() {
            return;
        }
        let types: usize = learned.values().map(HashMap::len).sum();
        if known.is_none() && types >= TYPES {
            return;
        }
        let templates = learned
            .entry(topic.to_string())
            .or_default()
            .entry(event_type.to_string())
            .or_default();
        for template in new {
            if !templates.contains(&template) && templates.len() < TEMPLATES {
                templates.push(template);
            }
        }
    }
}

/// A call's reads of its service's state: the keys the door read ahead from its answer, any
/// other through the state reader.
pub(super) struct Ahead {
    pub service: String,
    pub read: Arc<HashMap<String, Versioned>>,
    pub inner: Arc<dyn StateReader>,
    /// Counts the reads answered so (`reads_ahead`).
    pub stats: Arc<Stats>,
}

#[async_trait::async_trait]
impl StateReader for Ahead {
    async fn get(&self, service: &str, key: &str) -> Result<Versioned, String> {
        match self.read.get(key).filter(|_| service == self.service) {
            Some(found) => {
                Stats::add(&self.stats.reads_ahead, 1);
                Ok(found.clone())
            }
            None => self.inner.get(service, key).await,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_named_after_the_subject_are_learned_and_guessed() {
        let ahead = ReadAhead::default();
        let saga = "0192f3a4-aaaa";
        ahead.learn(
            "order",
            "OrderCreated",
            saga,
            [
                &*format!("exchange/{saga}"),
                "points/u17",
                &*format!("tx/{saga}/x"),
            ],
        );
        let next = "0192f3a4-bbbb";
        assert_eq!(
            ahead.keys("order", "OrderCreated", next),
            vec![format!("exchange/{next}"), format!("tx/{next}/x")],
            "the key not named after the subject is not guessed"
        );
        assert!(ahead.keys("order", "OrderApproved", next).is_empty());
        assert!(
            ahead.keys("order", "OrderCreated", "short").is_empty(),
            "short subjects match keys by chance"
        );
        for i in 0..10 {
            ahead.learn("order", "OrderCreated", next, [&*format!("k{i}/{next}")]);
        }
        assert_eq!(ahead.keys("order", "OrderCreated", saga).len(), TEMPLATES);
    }
}
