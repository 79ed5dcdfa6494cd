//! Limits on everything that enters the runtime: request bodies, consumed events, and the
//! effects a handler returns. Each has a config key (`[limits]`), a default, and a named error
//! ([`Error`]) that says which limit was hit and how to raise it.
//!
//! Why at the edge: a value the database or the broker refuses later (a NUL in a saga id, an
//! event larger than the broker's message limit) would fail a whole batch again and again. So
//! nothing over a limit is let in: a request gets `413`/`422`, a consumed event is
//! dead-lettered as malformed, a handler's effects fail the event as a `reject`, and nothing
//! over a limit ever reaches the outbox.

use serde::{Deserialize, Serialize};

use crate::wasm::bindings::{Effects, Event, Payload};

/// `[limits]` in the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Largest body of a request to a service's route, bytes. Default 262144 (256 KiB).
    pub request_body_bytes: usize,
    /// Largest body of an admin call (a component to deploy or verify), bytes; read only after
    /// the token was checked. Default 67108864 (64 MiB).
    pub admin_body_bytes: usize,
    /// Largest data of one event, emitted or consumed, bytes. Default 262144 (256 KiB).
    pub event_data_bytes: usize,
    /// Largest id: saga ids (event subjects, the Kafka key), event ids and types, deadline
    /// names, content types. Default 256.
    pub id_bytes: usize,
    /// Largest total size of a consumed record's headers, bytes. Default 16384.
    pub event_headers_bytes: usize,
    /// Largest state key, bytes. Default 512.
    pub state_key_bytes: usize,
    /// Largest state value, bytes. Default 1048576 (1 MiB).
    pub state_value_bytes: usize,
    /// Most state writes in one handler's effects. Default 1000.
    pub writes_per_effect: usize,
    /// Most events emitted by one handler call. Default 100.
    pub emits_per_effect: usize,
    /// Most deadlines set plus cancelled by one handler call. Default 100.
    pub deadlines_per_effect: usize,
    /// Longest delay of a deadline a handler sets, ms. Default 2678400000 (31 days).
    pub deadline_after_ms: u64,
    /// Most rows one `state.scan-after` returns (a guest asking for more gets this many and
    /// pages on). Default 1000.
    pub scan_rows: u32,
    /// Largest Kafka message the broker accepts (its `message.max.bytes`), bytes; also the
    /// relay producer's limit. An emitted event (data, key and headers) must fit in it, and
    /// start-up refuses limits that would not. Default 1000000 (librdkafka's default).
    pub broker_message_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            request_body_bytes: 256 << 10,
            admin_body_bytes: 64 << 20,
            event_data_bytes: 256 << 10,
            id_bytes: 256,
            event_headers_bytes: 16 << 10,
            state_key_bytes: 512,
            state_value_bytes: 1 << 20,
            writes_per_effect: 1000,
            emits_per_effect: 100,
            deadlines_per_effect: 100,
            deadline_after_ms: 31 * 24 * 3600 * 1000,
            scan_rows: 1000,
            broker_message_bytes: 1_000_000,
        }
    }
}

/// Room in a Kafka message for what the host adds to an event: the CloudEvents headers it
/// writes itself and, on a dead letter, the `saga_dlt_*` headers (the reason is cut to fit).
pub const HOST_HEADERS_BYTES: usize = 8 << 10;

/// Longest reason the host writes into a dead-letter header or a parked row.
pub const REASON_BYTES: usize = 2 << 10;

/// Which limit an input broke; the message names the config key that sets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{what} is {size} bytes, over the limit of {limit} (limits.{key})")]
    TooLarge {
        what: String,
        size: usize,
        limit: usize,
        key: &'static str,
    },
    #[error("{what}: {count}, over the limit of {limit} (limits.{key})")]
    TooMany {
        what: String,
        count: usize,
        limit: usize,
        key: &'static str,
    },
    #[error("{what} must not be empty")]
    Empty { what: String },
    #[error("{what} contains a control character (such as NUL) at byte {at}")]
    Control { what: String, at: usize },
    #[error("{what} is {value} ms, over the limit of {limit} (limits.deadline_after_ms)")]
    TooLate {
        what: String,
        value: u64,
        limit: u64,
    },
    #[error("invalid limits: {0}")]
    Config(String),
}

impl Settings {
    /// Refuse limits that let in what the broker would refuse: an event of the largest data,
    /// key and headers, plus what the host adds, must fit in one broker message.
    pub fn check(&self) -> Result<(), Error> {
        let largest =
            self.event_data_bytes + self.id_bytes + self.event_headers_bytes + HOST_HEADERS_BYTES;
        if largest > self.broker_message_bytes {
            return Err(Error::Config(format!(
                "event_data_bytes ({}) + id_bytes ({}) + event_headers_bytes ({}) + {} bytes \
                 of host headers is {largest}, more than broker_message_bytes ({}): the \
                 broker would refuse the largest event the runtime lets in",
                self.event_data_bytes,
                self.id_bytes,
                self.event_headers_bytes,
                HOST_HEADERS_BYTES,
                self.broker_message_bytes
            )));
        }
        Ok(())
    }

    /// An id: not empty, at most `id_bytes`, no control characters.
    pub fn id(&self, what: &str, value: &str) -> Result<(), Error> {
        if value.is_empty() {
            return Err(Error::Empty { what: what.into() });
        }
        self.text(what, value, self.id_bytes, "id_bytes")
    }

    /// Text stored or sent as is: at most `limit` bytes, no control characters.
    fn text(&self, what: &str, value: &str, limit: usize, key: &'static str) -> Result<(), Error> {
        size(what, value.len(), limit, key)?;
        match value.char_indices().find(|(_, c)| c.is_control()) {
            Some((at, _)) => Err(Error::Control {
                what: what.into(),
                at,
            }),
            None => Ok(()),
        }
    }

    fn payload(&self, what: &str, p: &Payload) -> Result<(), Error> {
        self.id(&format!("{what} content type"), &p.content_type)?;
        size(
            &format!("{what} data"),
            p.data.len(),
            self.event_data_bytes,
            "event_data_bytes",
        )
    }

    /// A consumed event, after decoding: ids, headers and data within the limits. A saga id
    /// may be absent (events outside any saga) but not malformed.
    pub fn event(&self, event: &Event, headers_bytes: usize) -> Result<(), Error> {
        self.id("event id", &event.id)?;
        self.id("event type", &event.type_)?;
        self.id("event source", &event.source)?;
        if !event.subject.is_empty() {
            self.id("event subject (saga id)", &event.subject)?;
        }
        size(
            "event headers",
            headers_bytes,
            self.event_headers_bytes,
            "event_headers_bytes",
        )?;
        self.payload("event", &event.data)
    }

    /// A handler's effects: counts, sizes and syntax of everything it asks for. (Which topics
    /// and sagas it may touch is `effects::validate`'s business.)
    pub fn effects(&self, fx: &Effects) -> Result<(), Error> {
        count(
            "state writes",
            fx.writes.len(),
            self.writes_per_effect,
            "writes_per_effect",
        )?;
        count(
            "emitted events",
            fx.emits.len(),
            self.emits_per_effect,
            "emits_per_effect",
        )?;
        count(
            "deadlines set and cancelled",
            fx.set_deadlines.len() + fx.cancel_deadlines.len(),
            self.deadlines_per_effect,
            "deadlines_per_effect",
        )?;
        for w in &fx.writes {
            if w.key.is_empty() {
                return Err(Error::Empty {
                    what: "state key".into(),
                });
            }
            self.text("state key", &w.key, self.state_key_bytes, "state_key_bytes")?;
            if let Some(value) = &w.value {
                size(
                    &format!("state value of {:?}", short(&w.key)),
                    value.len(),
                    self.state_value_bytes,
                    "state_value_bytes",
                )?;
            }
        }
        for e in &fx.emits {
            self.id("emitted event type", &e.type_)?;
            self.id("emitted event subject (saga id)", &e.subject)?;
            self.payload(&format!("emitted {}", short(&e.type_)), &e.data)?;
        }
        for d in &fx.set_deadlines {
            self.id("deadline subject (saga id)", &d.subject)?;
            self.id("deadline name", &d.name)?;
            if let Some(after) = d.after_ms.filter(|&a| a > self.deadline_after_ms) {
                return Err(Error::TooLate {
                    what: format!("deadline {:?} delay", short(&d.name)),
                    value: after,
                    limit: self.deadline_after_ms,
                });
            }
        }
        for d in &fx.cancel_deadlines {
            self.id("cancelled deadline subject (saga id)", &d.subject)?;
            self.id("cancelled deadline name", &d.name)?;
        }
        Ok(())
    }
}

fn size(what: &str, size: usize, limit: usize, key: &'static str) -> Result<(), Error> {
    if size > limit {
        return Err(Error::TooLarge {
            what: what.into(),
            size,
            limit,
            key,
        });
    }
    Ok(())
}

fn count(what: &str, count: usize, limit: usize, key: &'static str) -> Result<(), Error> {
    if count > limit {
        return Err(Error::TooMany {
            what: what.into(),
            count,
            limit,
            key,
        });
    }
    Ok(())
}

/// At most 64 characters of a value the guest chose, for an error message.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(64).filter(|c| !c.is_control()).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// Text that the database and the broker accept whatever came in: control characters replaced,
/// cut to at most `max` bytes on a character boundary. For what the host must store about a
/// bad input (a dead letter's headers, a reason) without failing on the input's own badness.
pub fn sanitize(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars() {
        let c = if c.is_control() && c != '\n' && c != '\t' {
            '\u{FFFD}'
        } else {
            c
        };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm::bindings::{Deadline, Emit, Write};

    fn fx() -> Effects {
        Effects {
            writes: Vec::new(),
            emits: Vec::new(),
            set_deadlines: Vec::new(),
            cancel_deadlines: Vec::new(),
        }
    }

    fn emit(subject: &str, data: usize) -> Emit {
        Emit {
            topic: "t".into(),
            type_: "Happened".into(),
            subject: subject.into(),
            data: Payload {
                content_type: "application/json".into(),
                data: vec![b'x'; data],
            },
        }
    }

    #[test]
    fn the_defaults_fit_in_one_broker_message() {
        Settings::default().check().unwrap();
        let too_big = Settings {
            event_data_bytes: 1_000_000,
            ..Settings::default()
        };
        let err = too_big.check().unwrap_err().to_string();
        assert!(err.contains("broker_message_bytes"), "{err}");
    }

    #[test]
    fn an_id_with_a_nul_or_over_the_limit_is_refused_by_name() {
        let l = Settings::default();
        assert_eq!(
            l.id("saga id", "a\0b"),
            Err(Error::Control {
                what: "saga id".into(),
                at: 1
            })
        );
        let err = l.id("saga id", &"x".repeat(257)).unwrap_err().to_string();
        assert_eq!(
            err,
            "saga id is 257 bytes, over the limit of 256 (limits.id_bytes)"
        );
        assert!(l.id("saga id", "").is_err());
        l.id("saga id", "0190c7e0-order").unwrap();
    }

    #[test]
    fn effects_over_a_limit_name_it() {
        let l = Settings::default();
        let mut big = fx();
        big.emits.push(emit("s", 300 << 10));
        let err = l.effects(&big).unwrap_err().to_string();
        assert!(err.contains("limits.event_data_bytes"), "{err}");

        let mut many = fx();
        many.writes = (0..1001)
            .map(|i| Write {
                key: format!("k{i}"),
                value: None,
            })
            .collect();
        let err = l.effects(&many).unwrap_err().to_string();
        assert!(err.contains("limits.writes_per_effect"), "{err}");

        let mut nul_key = fx();
        nul_key.writes.push(Write {
            key: "a\0".into(),
            value: Some(vec![]),
        });
        assert!(matches!(l.effects(&nul_key), Err(Error::Control { .. })));

        let mut late = fx();
        late.set_deadlines.push(Deadline {
            subject: "s".into(),
            name: "n".into(),
            after_ms: Some(u64::MAX),
        });
        let err = l.effects(&late).unwrap_err().to_string();
        assert!(err.contains("limits.deadline_after_ms"), "{err}");

        let mut fine = fx();
        fine.emits.push(emit("s", 1000));
        l.effects(&fine).unwrap();
    }

    #[test]
    fn sanitize_replaces_control_characters_and_cuts_on_a_character_boundary() {
        assert_eq!(sanitize("a\0b", 10), "a\u{FFFD}b");
        assert_eq!(sanitize("ééé", 5), "éé");
    }
}
