//! What the local relay has committed to Kafka, told to the local consumers.
//!
//! A broker that holds an empty fetch for `fetch.wait.max.ms` (Kafka does) keeps an idle
//! consumer cheap. noida-db 0.2.3 answers an empty fetch at once, and librdkafka asks again at
//! once: thousands of fetches a second per consumer, about a core of runtime and broker CPU for
//! three idle services. So a consumer that has read everything announced here rests (stops
//! fetching, see `kafka::consumer`) until the next announcement or for `kafka.rest_ms` at
//! most, which bounds how late it sees records other instances publish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// A cheap handle: the relay rings it, consumers listen.
#[derive(Clone)]
pub struct Doorbell {
    inner: Arc<Inner>,
}

struct Inner {
    /// Per physical topic and partition: the offset of the last record committed there.
    last: Mutex<HashMap<String, HashMap<i32, i64>>>,
    rung: watch::Sender<u64>,
}

impl Default for Doorbell {
    fn default() -> Self {
        Doorbell {
            inner: Arc::new(Inner {
                last: Mutex::new(HashMap::new()),
                rung: watch::Sender::new(0),
            }),
        }
    }
}

impl Doorbell {
    /// Records were committed: (physical topic, partition, offset of a record).
    pub fn ring<'a>(&self, records: impl IntoIterator<Item = (&'a str, i32, i64)>) {
        {
            let mut last = self.inner.last.lock().expect("doorbell lock");
            for (topic, partition, offset) in records {
                let at = match last.get_mut(topic) {
                    Some(parts) => parts.entry(partition).or_insert(offset),
                    None => last
                        .entry(topic.to_string())
                        .or_default()
                        .entry(partition)
                        .or_insert(offset),
                };
                *at = (*at).max(offset);
            }
        }
        self.inner.rung.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether a record was announced at or after `next` on any of these (physical topic,
    /// partition, next).
    pub fn beyond<'a>(&self, positions: impl IntoIterator<Item = (&'a str, i32, i64)>) -> bool {
        let last = self.inner.last.lock().expect("doorbell lock");
        positions.into_iter().any(|(topic, partition, next)| {
            last.get(topic)
                .and_then(|parts| parts.get(&partition))
                .is_some_and(|&at| at >= next)
        })
    }

    /// Changes with every ring.
    pub fn listen(&self) -> watch::Receiver<u64> {
        self.inner.rung.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_beyond_a_position_only_up_to_its_last_announced_record() {
        let bell = Doorbell::default();
        let mut heard = bell.listen();
        assert!(!bell.beyond([("t", 0, 0)]));
        bell.ring([("t", 0, 7), ("t", 0, 5), ("t", 1, 2)]);
        assert!(heard.has_changed().unwrap());
        heard.borrow_and_update();
        assert!(bell.beyond([("t", 0, 7)]));
        assert!(
            !bell.beyond([("t", 0, 8)]),
            "the later, lower offset does not move it back"
        );
        assert!(bell.beyond([("t", 0, 8), ("t", 1, 0)]), "any of them");
        assert!(!bell.beyond([("u", 0, 0)]));
        assert!(!heard.has_changed().unwrap());
    }
}
