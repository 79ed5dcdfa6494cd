//! One consumer per service and instance, reading committed records only (`read_committed`), so
//! an aborted or still-open relay transaction is never seen.
//!
//! Assignment and offsets are ours, not the broker's group coordinator's: `crate::ownership`
//! decides which partitions this instance reads (database leases) and [`Consumer::assign`]s them
//! at the positions stored in the database, which the worker advances in the same transaction
//! as the events' effects. So a crash resumes exactly after what was committed, and a crashed
//! instance's partitions move when its leases expire, whatever the broker does with dead group
//! members.
//!
//! Stall watchdog: with noida-db (the test broker), a `read_committed` consumer that is waiting
//! behind an open transaction which is then *aborted* never fetches again, while a seek to its
//! own position un-sticks it at once (see `integration_broker_conformance`). So after
//! `stall_reseek` without records the consumer re-seeks its partitions to where it already is;
//! on a correct broker that is a harmless re-fetch.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::Offset;

use super::{Error, Settings};

/// A record, detached from the consumer.
#[derive(Debug, Clone)]
pub struct Record {
    /// Physical topic name.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
}

pub struct Consumer {
    inner: StreamConsumer,
    stall_reseek: Option<Duration>,
    /// Next offset per (topic, partition), from the records handed out: librdkafka reports a
    /// position as invalid right after a seek, so the watchdog keeps its own.
    next: Mutex<HashMap<(String, i32), i64>>,
}

impl Consumer {
    /// A consumer for `service` with nothing assigned yet.
    pub fn new(settings: &Settings, service: &str) -> Result<Self, Error> {
        let inner: StreamConsumer = settings
            .client()
            .set("group.id", settings.topic(service))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        Ok(Consumer {
            inner,
            next: Mutex::new(HashMap::new()),
            stall_reseek: (settings.stall_reseek_ms > 0)
                .then(|| Duration::from_millis(settings.stall_reseek_ms)),
        })
    }

    /// Wait for at least one record, then take whatever else is already buffered, up to `max`.
    /// With nothing assigned it waits (the stall watchdog keeps it cheap).
    pub async fn next_batch(&self, max: usize) -> Result<Vec<Record>, Error> {
        let first = loop {
            let Some(quiet) = self.stall_reseek else {
                break self.inner.recv().await?;
            };
            match tokio::time::timeout(quiet, self.inner.recv()).await {
                Ok(message) => break message?,
                Err(_) => self.reseek_in_place(),
            }
        };
        let mut batch = vec![detach(&first)];
        drop(first);
        while batch.len() < max {
            match self.inner.recv().now_or_never() {
                Some(Ok(m)) => batch.push(detach(&m)),
                Some(Err(e)) => {
                    tracing::warn!("kafka consumer error while draining a batch: {e}");
                    break;
                }
                None => break,
            }
        }
        let mut next = self.next.lock().expect("offsets lock");
        for r in &batch {
            next.insert((r.topic.clone(), r.partition), r.offset + 1);
        }
        Ok(batch)
    }

    /// Seek every assigned partition to where it already is (the stall watchdog).
    fn reseek_in_place(&self) {
        let assignment = match self.inner.assignment() {
            Ok(assignment) => assignment,
            Err(e) => {
                tracing::debug!("consumer assignment unavailable: {e}");
                return;
            }
        };
        let assigned: Vec<(String, i32)> = assignment
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        // Lists from the consumer must not outlive it (field notes): drop it now.
        drop(assignment);
        let targets: Vec<(String, i32, i64)> = {
            let next = self.next.lock().expect("offsets lock");
            assigned
                .into_iter()
                .filter_map(|(t, p)| next.get(&(t.clone(), p)).map(|&o| (t, p, o)))
                .collect()
        };
        for (topic, partition, offset) in targets {
            // A zero timeout makes librdkafka seek asynchronously: never block a tokio worker.
            let seek = self
                .inner
                .seek(&topic, partition, Offset::Offset(offset), Duration::ZERO);
            if let Err(e) = seek {
                tracing::debug!(%topic, partition, "re-seek failed: {e}");
            }
        }
    }

    /// Stop fetching a partition and move its position back to `offset` (a blocking
    /// subscription's event that must be retried later); [`Consumer::release`] resumes it
    /// there. Records of it fetched before the hold may still arrive: the caller drops them.
    pub fn hold(&self, topic: &str, partition: i32, offset: i64) -> Result<(), Error> {
        self.inner.pause(&one(topic, partition))?;
        self.rewind(topic, partition, offset);
        Ok(())
    }

    /// Fetch a held partition again, from `offset`.
    pub fn release(&self, topic: &str, partition: i32, offset: i64) -> Result<(), Error> {
        self.inner.resume(&one(topic, partition))?;
        self.rewind(topic, partition, offset);
        Ok(())
    }

    /// Make `offset` the partition's next record, for the broker and for the watchdog.
    fn rewind(&self, topic: &str, partition: i32, offset: i64) {
        self.next
            .lock()
            .expect("offsets lock")
            .insert((topic.to_string(), partition), offset);
        // Asynchronous (zero timeout), like the watchdog's: never block a tokio worker.
        let seek = self
            .inner
            .seek(topic, partition, Offset::Offset(offset), Duration::ZERO);
        if let Err(e) = seek {
            tracing::debug!(%topic, partition, "rewind failed: {e}");
        }
    }

    /// Read exactly `parts` (physical topic, partition, stored position): each from the later
    /// of its stored position and where this consumer already is, or from the beginning.
    pub fn assign(&self, parts: &[(String, i32, Option<i64>)]) -> Result<(), Error> {
        let mut list = rdkafka::TopicPartitionList::new();
        {
            let mut next = self.next.lock().expect("offsets lock");
            next.retain(|(t, p), _| parts.iter().any(|(pt, pp, _)| pt == t && pp == p));
            for (topic, partition, stored) in parts {
                let here = next.get(&(topic.clone(), *partition)).copied();
                // 0 is "the beginning": below the low watermark, `auto.offset.reset` applies.
                let at = here.max(*stored).unwrap_or(0);
                // The watchdog re-seeks here too, before any record of the partition arrived.
                next.insert((topic.clone(), *partition), at);
                list.add_partition_offset(topic, *partition, Offset::Offset(at))?;
            }
        }
        self.inner.assign(&list)?;
        Ok(())
    }

    /// Partitions of a physical topic, from the broker's metadata.
    pub fn partitions(&self, topic: &str) -> Result<Vec<i32>, Error> {
        let metadata = self
            .inner
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect())
    }
}

/// A list of one partition, for a call and dropped right after it (field notes: lists must not
/// outlive the consumer).
fn one(topic: &str, partition: i32) -> rdkafka::TopicPartitionList {
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, partition);
    list
}

fn detach(m: &rdkafka::message::BorrowedMessage<'_>) -> Record {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Record {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        headers,
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}
