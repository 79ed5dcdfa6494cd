//! The wire format: CloudEvents 1.0, Kafka protocol binding, binary mode. Attributes travel as
//! `ce_*` headers, the data as the record value with its media type in `content-type`, and the
//! saga id (`ce_subject`) is the record key, so all events of one saga share a partition.
//!
//! Extensions: distributed tracing (`ce_traceparent`, `ce_tracestate`, see `crate::telemetry`)
//! and one of ours, `ce_sagadeadline` (RFC 3339), the saga's deadline, carried from each event
//! to the events its handler emits.

use std::time::{Duration, UNIX_EPOCH};

use crate::storage::outbox::Message;
use crate::wasm::bindings::{Emit, Event, Payload};

pub const SPEC_VERSION: &str = "1.0";
pub const ID: &str = "ce_id";
pub const TYPE: &str = "ce_type";
pub const SOURCE: &str = "ce_source";
pub const SUBJECT: &str = "ce_subject";
pub const TIME: &str = "ce_time";
pub const SPECVERSION: &str = "ce_specversion";
pub const CONTENT_TYPE: &str = "content-type";
pub const SAGA_DEADLINE: &str = "ce_sagadeadline";

/// Why a record is not a usable event; it is dead-lettered with this reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Malformed {
    #[error("missing CloudEvents header {0}")]
    Missing(&'static str),
    #[error("header {0} is not valid UTF-8")]
    NotUtf8(String),
    #[error("header {header} is not an RFC 3339 time: {value:?}")]
    BadTime { header: &'static str, value: String },
    #[error("unsupported CloudEvents specversion {0:?}")]
    SpecVersion(String),
    #[error(transparent)]
    Limit(#[from] crate::limits::Error),
}

/// The source attribute of events a service emits.
pub fn source_of(service: &str) -> String {
    format!("/saga/{service}")
}

fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn parse_time(header: &'static str, value: &str) -> Result<i64, Malformed> {
    humantime::parse_rfc3339_weak(value)
        .map(crate::storage::millis)
        .map_err(|_| Malformed::BadTime {
            header,
            value: value.to_string(),
        })
}

/// The outbox message of an event a handler of `service` emitted at `now_ms`, a child of the
/// trace context `trace` (`telemetry::carried`).
pub fn encode(
    service: &str,
    physical_topic: String,
    event_id: String,
    emit: &Emit,
    now_ms: i64,
    deadline_ms: Option<i64>,
    trace: &[(String, String)],
) -> Message {
    let mut headers = vec![
        (SPECVERSION.to_string(), SPEC_VERSION.to_string()),
        (ID.to_string(), event_id.clone()),
        (TYPE.to_string(), emit.type_.clone()),
        (SOURCE.to_string(), source_of(service)),
        (SUBJECT.to_string(), emit.subject.clone()),
        (TIME.to_string(), rfc3339(now_ms)),
        (CONTENT_TYPE.to_string(), emit.data.content_type.clone()),
    ];
    if let Some(deadline) = deadline_ms {
        headers.push((SAGA_DEADLINE.to_string(), rfc3339(deadline)));
    }
    headers.extend(trace.iter().cloned());
    Message {
        event_id,
        topic: physical_topic,
        key: emit.subject.clone(),
        headers,
        payload: emit.data.data.clone(),
    }
}

/// Read an event from a record's headers and value.
pub fn decode(
    logical_topic: &str,
    headers: &[(String, Vec<u8>)],
    payload: &[u8],
) -> Result<Event, Malformed> {
    let text = |name: &'static str| -> Result<Option<String>, Malformed> {
        match headers.iter().rev().find(|(k, _)| k == name) {
            None => Ok(None),
            Some((_, v)) => String::from_utf8(v.clone())
                .map(Some)
                .map_err(|_| Malformed::NotUtf8(name.to_string())),
        }
    };
    let required = |name: &'static str| text(name)?.ok_or(Malformed::Missing(name));
    let spec = required(SPECVERSION)?;
    if spec != SPEC_VERSION {
        return Err(Malformed::SpecVersion(spec));
    }
    let time_ms = match text(TIME)? {
        Some(t) => parse_time(TIME, &t)?,
        None => 0,
    };
    let deadline_ms = text(SAGA_DEADLINE)?
        .map(|t| parse_time(SAGA_DEADLINE, &t))
        .transpose()?;
    Ok(Event {
        id: required(ID)?,
        type_: required(TYPE)?,
        source: required(SOURCE)?,
        subject: text(SUBJECT)?.unwrap_or_default(),
        topic: logical_topic.to_string(),
        time_ms,
        deadline_ms,
        dead_letter: super::dead_letter::info(|name| text(name).ok().flatten()),
        data: Payload {
            content_type: text(CONTENT_TYPE)?.unwrap_or_else(|| "application/octet-stream".into()),
            data: payload.to_vec(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emit() -> Emit {
        Emit {
            topic: "order".into(),
            type_: "OrderCreated".into(),
            subject: "saga-1".into(),
            data: Payload {
                content_type: "application/json".into(),
                data: br#"{"a":1}"#.to_vec(),
            },
        }
    }

    fn as_record(m: &Message) -> Vec<(String, Vec<u8>)> {
        m.headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
            .collect()
    }

    #[test]
    fn an_encoded_event_decodes_to_the_same_attributes() {
        let m = encode(
            "order",
            "t.order".into(),
            "id-1".into(),
            &emit(),
            1_700_000_000_123,
            Some(1_700_000_010_123),
            &[],
        );
        assert_eq!(m.key, "saga-1");
        let e = decode("order", &as_record(&m), &m.payload).unwrap();
        assert_eq!(e.id, "id-1");
        assert_eq!(e.type_, "OrderCreated");
        assert_eq!(e.source, "/saga/order");
        assert_eq!(e.subject, "saga-1");
        assert_eq!(e.time_ms, 1_700_000_000_123);
        assert_eq!(e.deadline_ms, Some(1_700_000_010_123));
        assert_eq!(e.data.content_type, "application/json");
        assert_eq!(e.data.data, br#"{"a":1}"#);
    }

    #[test]
    fn a_record_without_an_id_is_malformed_with_the_reason() {
        let m = encode(
            "order",
            "order".into(),
            "id-1".into(),
            &emit(),
            0,
            None,
            &[],
        );
        let headers: Vec<_> = as_record(&m).into_iter().filter(|(k, _)| k != ID).collect();
        assert_eq!(decode("order", &headers, b""), Err(Malformed::Missing(ID)));
    }

    #[test]
    fn a_record_with_a_bad_time_is_malformed() {
        let mut headers = as_record(&encode(
            "order",
            "order".into(),
            "i".into(),
            &emit(),
            0,
            None,
            &[],
        ));
        headers.push((TIME.into(), b"yesterday".to_vec()));
        assert!(matches!(
            decode("order", &headers, b""),
            Err(Malformed::BadTime { .. })
        ));
    }
}
