//! One consumer group per service, reading committed records only (`read_committed`), so an
//! aborted or still-open relay transaction is never seen.
//!
//! Offsets: the worker stores a record's offset only after the record's outcome is committed
//! to the database, and librdkafka commits stored offsets in the background. A crash in between
//! redelivers records whose effects are already committed; the inbox absorbs them.

use futures::FutureExt;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Headers, Message as _};

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
}

impl Consumer {
    /// Join the consumer group of `service` and subscribe to the physical `topics`.
    pub fn subscribe(settings: &Settings, service: &str, topics: &[String]) -> Result<Self, Error> {
        let inner: StreamConsumer = settings
            .client()
            .set("group.id", settings.topic(service))
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "200")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", "10000")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        inner.subscribe(&names)?;
        Ok(Consumer { inner })
    }

    /// Wait for at least one record, then take whatever else is already buffered, up to `max`.
    pub async fn next_batch(&self, max: usize) -> Result<Vec<Record>, Error> {
        let first = self.inner.recv().await?;
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
        Ok(batch)
    }

    /// Mark `record` done: its offset is committed with the next auto-commit.
    pub fn done(&self, record: &Record) -> Result<(), Error> {
        self.inner
            .store_offset(&record.topic, record.partition, record.offset + 1)?;
        Ok(())
    }
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
