//! Inspecting and re-driving dead-lettered events (SPEC A7): `runtime dlt list <topic>` and
//! `runtime dlt redrive <topic>`.
//!
//! Both read the dead-letter topic itself (the record as it arrived, plus `saga_dlt_*`
//! headers), from its first offset to its end, `read_committed`, without a consumer group, so
//! looking never moves anything. A re-drive publishes the original record back to the topic it
//! failed on, with the original CloudEvents headers (so the same event id) and a
//! `saga_redriven_from` header naming the dead-letter record. The failed service's inbox then
//! handles it again exactly once: a re-drive replaces its `dead-lettered` record, and once that
//! is applied, re-driving the same record again is a duplicate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::kafka::dead_letter::{self, headers};
use crate::kafka::{cloudevents, Settings};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kafka error: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {0} does not exist (is the topic prefix right?)")]
    NoSuchTopic(String),
    #[error("timed out reading {0}: is the broker reachable?")]
    Timeout(String),
    #[error(
        "dead-letter record {0} does not say which topic it failed on (no saga_dlt_topic header)"
    )]
    NoOrigin(String),
}

/// One dead-lettered event.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Where it sits: logical dead-letter topic, partition, offset.
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub saga: Option<String>,
    pub reason: Option<String>,
    pub attempts: Option<u32>,
    pub service: Option<String>,
    /// The logical topic it failed on, and its coordinates there.
    pub origin_topic: Option<String>,
    pub origin_partition: Option<i32>,
    pub origin_offset: Option<i64>,
    /// Whether it is itself a re-drive that failed again.
    pub redriven_from: Option<String>,
    #[serde(skip)]
    key: Option<Vec<u8>>,
    #[serde(skip)]
    raw_headers: Vec<(String, Vec<u8>)>,
    #[serde(skip)]
    payload: Vec<u8>,
}

impl Entry {
    fn header(&self, name: &str) -> Option<String> {
        self.raw_headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// `topic/partition/offset` of this dead-letter record.
    pub fn coordinates(&self, dlt_topic: &str) -> String {
        format!("{dlt_topic}/{}/{}", self.partition, self.offset)
    }
}

/// The logical dead-letter topic for what the user typed: `payment` or `payment.dlt`.
pub fn dlt_topic(topic: &str) -> String {
    if dead_letter::is_dead_letter_topic(topic) {
        topic.to_string()
    } else {
        dead_letter::topic(topic)
    }
}

const TIMEOUT: Duration = Duration::from_secs(15);

/// Every record of the dead-letter topic of `topic`, in partition and offset order.
pub fn list(settings: &Settings, topic: &str) -> Result<Vec<Entry>, Error> {
    let physical = settings.topic(&dlt_topic(topic));
    let consumer: BaseConsumer = settings
        .client()
        .set("group.id", settings.topic("saga-dlt-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&physical), TIMEOUT)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == physical && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(Error::NoSuchTopic(physical));
    }
    let mut assignment = TopicPartitionList::new();
    let mut pending: HashMap<i32, i64> = HashMap::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(&physical, p, TIMEOUT)?;
        if high > low {
            assignment.add_partition_offset(&physical, p, Offset::Beginning)?;
            pending.insert(p, high);
        }
    }
    let mut entries = Vec::new();
    if pending.is_empty() {
        return Ok(entries);
    }
    consumer.assign(&assignment)?;
    drop(assignment);
    let started = Instant::now();
    while !pending.is_empty() {
        if started.elapsed() > TIMEOUT {
            return Err(Error::Timeout(physical));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                if pending
                    .get(&m.partition())
                    .is_some_and(|&high| m.offset() + 1 >= high)
                {
                    pending.remove(&m.partition());
                }
                entries.push(entry(settings, &m));
            }
        }
    }
    entries.sort_by_key(|e| (e.partition, e.offset));
    Ok(entries)
}

fn entry(settings: &Settings, m: &rdkafka::message::BorrowedMessage<'_>) -> Entry {
    let raw_headers: Vec<(String, Vec<u8>)> = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    let mut e = Entry {
        partition: m.partition(),
        offset: m.offset(),
        event_id: None,
        event_type: None,
        saga: None,
        reason: None,
        attempts: None,
        service: None,
        origin_topic: None,
        origin_partition: None,
        origin_offset: None,
        redriven_from: None,
        key: m.key().map(<[u8]>::to_vec),
        raw_headers,
        payload: m.payload().unwrap_or_default().to_vec(),
    };
    e.event_id = e.header(cloudevents::ID);
    e.event_type = e.header(cloudevents::TYPE);
    e.saga = e.header(cloudevents::SUBJECT);
    e.reason = e.header(headers::REASON);
    e.attempts = e.header(headers::ATTEMPTS).and_then(|a| a.parse().ok());
    e.service = e.header(headers::SERVICE);
    e.origin_topic = e
        .header(headers::TOPIC)
        .map(|t| settings.logical(&t).to_string());
    e.origin_partition = e.header(headers::PARTITION).and_then(|p| p.parse().ok());
    e.origin_offset = e.header(headers::OFFSET).and_then(|o| o.parse().ok());
    e.redriven_from = e.header(headers::REDRIVEN_FROM);
    e
}

/// Which dead-lettered events to re-drive.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these event ids (empty: no filter).
    pub event_ids: Vec<String>,
    /// Only these offsets (empty: no filter).
    pub offsets: Vec<(i32, i64)>,
}

impl Selection {
    fn matches(&self, e: &Entry) -> bool {
        (self.event_ids.is_empty()
            || e.event_id
                .as_ref()
                .is_some_and(|id| self.event_ids.contains(id)))
            && (self.offsets.is_empty() || self.offsets.contains(&(e.partition, e.offset)))
    }
}

/// Publish the selected dead-lettered events of `topic` back to the topics they failed on.
/// Returns what was re-driven.
pub async fn redrive(
    settings: &Settings,
    topic: &str,
    selection: &Selection,
) -> Result<Vec<Entry>, Error> {
    let dlt = dlt_topic(topic);
    let listed = {
        let settings = settings.clone();
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || list(&settings, &topic))
            .await
            .map_err(|_| Error::Timeout(dlt.clone()))??
    };
    let chosen: Vec<Entry> = listed
        .into_iter()
        .filter(|e| selection.matches(e))
        .collect();
    let producer: FutureProducer = settings
        .client()
        .set("enable.idempotence", "true")
        .create()?;
    for e in &chosen {
        let origin = e
            .origin_topic
            .as_ref()
            .ok_or_else(|| Error::NoOrigin(e.coordinates(&dlt)))?;
        let from = e.coordinates(&dlt);
        let kept = e
            .raw_headers
            .iter()
            .filter(|(k, _)| !headers::ALL.contains(&k.as_str()) && k != headers::REDRIVEN_FROM)
            .fold(OwnedHeaders::new(), |hs, (k, v)| {
                hs.insert(Header {
                    key: k,
                    value: Some(v.as_slice()),
                })
            })
            .insert(Header {
                key: headers::REDRIVEN_FROM,
                value: Some(from.as_bytes()),
            });
        let physical = settings.topic(origin);
        let mut record = FutureRecord::to(&physical)
            .payload(&e.payload)
            .headers(kept);
        if let Some(key) = &e.key {
            record = record.key(key);
        }
        producer
            .send(record, TIMEOUT)
            .await
            .map_err(|(err, _)| err)?;
    }
    Ok(chosen)
}
