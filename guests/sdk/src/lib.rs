//! The guest SDK: write a saga handler as plain Rust, compile it to `wasm32-wasip2`, deploy
//! the `.wasm` to the runtime.
//!
//! A handler is a type implementing [`Service`]; export it with
//! `saga_sdk::export_service!(MyService);`. Handlers build their result with [`Effects`]
//! (state writes, events, deadlines) and read their own state with [`get_json`] and
//! [`scan_json`]. JSON is only a convention of these helpers: the contract itself carries bytes
//! with a content type.

pub mod bindings {
    wit_bindgen::generate!({
        world: "service",
        path: "../../wit/saga-runtime@0.1.1",
        pub_export_macro: true,
        export_macro_name: "export_service",
        default_bindings_module: "saga_sdk::bindings",
    });
}

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use bindings::export_service;
pub use bindings::exports::saga::runtime::handler::Guest as Service;
pub use bindings::saga::runtime::log::Level;
pub use bindings::saga::runtime::types::{
    Context, DeadLetter, Deadline, DeadlineRef, Emit, Error, Event, FailurePolicy, Manifest,
    Payload, Reply, Request, Response, Route, Subscription, Write,
};

/// The content type the JSON helpers write and expect.
pub const JSON: &str = "application/json";

/// Effects under construction; finish with [`Effects::build`] or [`Effects::reply`].
pub struct Effects {
    inner: bindings::saga::runtime::types::Effects,
}

impl Default for Effects {
    fn default() -> Self {
        Self {
            inner: bindings::saga::runtime::types::Effects {
                writes: Vec::new(),
                emits: Vec::new(),
                set_deadlines: Vec::new(),
                cancel_deadlines: Vec::new(),
            },
        }
    }
}

impl Effects {
    pub fn new() -> Self {
        Self::default()
    }

    /// Write `value` as JSON under `key`.
    pub fn put_json<T: Serialize>(&mut self, key: impl Into<String>, value: &T) -> &mut Self {
        let data = serde_json::to_vec(value).expect("state values serialise to JSON");
        self.inner.writes.push(Write {
            key: key.into(),
            value: Some(data),
        });
        self
    }

    pub fn delete(&mut self, key: impl Into<String>) -> &mut Self {
        self.inner.writes.push(Write {
            key: key.into(),
            value: None,
        });
        self
    }

    /// Emit an event with a JSON body to `topic`, keyed by the saga id `subject`.
    pub fn emit_json<T: Serialize>(
        &mut self,
        topic: &str,
        event_type: &str,
        subject: &str,
        data: &T,
    ) -> &mut Self {
        self.inner.emits.push(Emit {
            topic: topic.to_string(),
            type_: event_type.to_string(),
            subject: subject.to_string(),
            data: json_payload(data),
        });
        self
    }

    /// Set the saga deadline `name`; `after_ms: None` takes the service default.
    pub fn set_deadline(&mut self, subject: &str, name: &str, after_ms: Option<u64>) -> &mut Self {
        self.inner.set_deadlines.push(Deadline {
            subject: subject.to_string(),
            name: name.to_string(),
            after_ms,
        });
        self
    }

    pub fn cancel_deadline(&mut self, subject: &str, name: &str) -> &mut Self {
        self.inner.cancel_deadlines.push(DeadlineRef {
            subject: subject.to_string(),
            name: name.to_string(),
        });
        self
    }

    /// Finish a request handler: these effects plus a JSON reply.
    pub fn reply<T: Serialize>(self, status: u16, body: &T) -> Response {
        Response {
            effects: self.inner,
            reply: json_reply(status, body),
        }
    }

    pub fn build(self) -> bindings::saga::runtime::types::Effects {
        self.inner
    }
}

impl From<Effects> for bindings::saga::runtime::types::Effects {
    fn from(fx: Effects) -> Self {
        fx.inner
    }
}

/// A reply with no effects: what a query returns.
pub fn query_reply<T: Serialize>(status: u16, body: &T) -> Response {
    Effects::new().reply(status, body)
}

pub fn json_payload<T: Serialize>(value: &T) -> Payload {
    Payload {
        content_type: JSON.to_string(),
        data: serde_json::to_vec(value).expect("payloads serialise to JSON"),
    }
}

pub fn json_reply<T: Serialize>(status: u16, body: &T) -> Reply {
    Reply {
        status,
        body: json_payload(body),
    }
}

/// Decode a JSON payload; a payload that does not parse is a permanent error (`reject`),
/// so the host dead-letters the event or answers `422` instead of retrying.
pub fn parse_json<T: DeserializeOwned>(payload: &Payload) -> Result<T, Error> {
    serde_json::from_slice(&payload.data)
        .map_err(|e| Error::Reject(format!("malformed JSON payload: {e}")))
}

/// Read the JSON value stored under `key` in this service's state.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    match bindings::saga::runtime::state::get(key) {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Retry(format!("state value {key} is not valid JSON: {e}"))),
    }
}

/// Every JSON value whose key starts with `prefix`, in key order.
pub fn scan_json<T: DeserializeOwned>(prefix: &str, limit: u32) -> Result<Vec<(String, T)>, Error> {
    bindings::saga::runtime::state::scan(prefix, limit)
        .into_iter()
        .map(|(key, bytes)| {
            serde_json::from_slice(&bytes)
                .map(|v| (key.clone(), v))
                .map_err(|e| Error::Retry(format!("state value {key} is not valid JSON: {e}")))
        })
        .collect()
}

/// The page size of [`list_json`] when a request names none, and the most it returns (the
/// host's default `limits.scan_rows`).
pub const PAGE: u32 = 1000;

/// One page of a listing route: the JSON values under `prefix`, in key order, for
/// `GET /things?limit=N&after=ID`. `after` is the id (the key without `prefix`) of the last item
/// of the previous page; `limit` defaults to and is capped at [`PAGE`]. A page shorter than
/// `limit` is the last.
pub fn list_json<T: DeserializeOwned>(request: &Request, prefix: &str) -> Result<Vec<T>, Error> {
    let limit = match query(request, "limit") {
        None => PAGE,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if n >= 1 => n.min(PAGE),
            _ => {
                return Err(Error::Reject(format!(
                    "limit must be a number from 1 to {PAGE}, not {v:?}"
                )))
            }
        },
    };
    let after = query(request, "after").map(|id| format!("{prefix}{id}"));
    bindings::saga::runtime::state::scan_after(prefix, after.as_deref(), limit)
        .into_iter()
        .map(|(key, bytes)| {
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::Retry(format!("state value {key} is not valid JSON: {e}")))
        })
        .collect()
}

/// The value of query parameter `name`, if given.
pub fn query<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request
        .query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

pub fn log(level: Level, message: &str) {
    bindings::saga::runtime::log::log(level, message);
}

/// A `dead-letter(3)` subscription with no compensation events: the default for most handlers.
pub fn subscribe(topic: &str) -> Subscription {
    Subscription {
        topic: topic.to_string(),
        on_failure: FailurePolicy::DeadLetter(3),
        compensations: Vec::new(),
    }
}

/// Declare event types of a subscription that are compensations (never dropped as expired).
pub fn compensating(mut subscription: Subscription, types: &[&str]) -> Subscription {
    subscription.compensations = types.iter().map(|t| t.to_string()).collect();
    subscription
}

/// Make a subscription blocking: a failing event is retried in place until it succeeds.
pub fn blocking(mut subscription: Subscription) -> Subscription {
    subscription.on_failure = FailurePolicy::Blocking;
    subscription
}

pub fn route(method: &str, path: &str) -> Route {
    Route {
        method: method.to_string(),
        path: path.to_string(),
    }
}

/// The value of the route parameter `name` of a request.
pub fn param<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request
        .params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}
