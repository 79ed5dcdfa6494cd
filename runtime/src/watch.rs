//! Waiting for an outcome without polling: conditional and held queries.
//!
//! Every `GET` reply of a service route carries a strong `ETag` (a hash of its status, content
//! type and body). A client that sends it back in `If-None-Match` gets `304 Not Modified` if
//! nothing changed; with `Prefer: wait=N` (RFC 7240) as well, the host holds the request until
//! the answer changes, then answers `200` with the new reply, or `304` after N seconds
//! (at most `ingress.max_wait_s`). No guest code is involved: the host knows which keys a query
//! read and which prefixes it scanned ([`Reads`]), and every commit tells [`Changes`] which keys
//! of which service it wrote; a held query runs again only when one of those matches. Commits
//! of *other* instances are not seen that way: a held query also runs again every
//! `ingress.wait_recheck_ms` (1000), so behind several instances an answer is at most that late.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::Notify;

/// What a query read: point reads and scanned prefixes.
#[derive(Debug, Default, Clone)]
pub struct Reads {
    pub keys: Vec<String>,
    pub prefixes: Vec<String>,
}

impl Reads {
    fn touched_by(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key) || self.prefixes.iter().any(|p| key.starts_with(p))
    }
}

struct Waiter {
    id: u64,
    reads: Reads,
    wake: Arc<Notify>,
}

/// Held queries, per service, woken by the commits that change what they read.
#[derive(Default)]
pub struct Changes {
    waiters: Mutex<HashMap<String, Vec<Waiter>>>,
    next_id: AtomicU64,
    held: AtomicUsize,
}

/// A registration; removed when dropped.
struct Watch<'a> {
    changes: &'a Changes,
    service: String,
    id: u64,
    wake: Arc<Notify>,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut all = self.changes.waiters.lock().expect("waiters lock");
        if let Some(list) = all.get_mut(&self.service) {
            list.retain(|w| w.id != self.id);
            if list.is_empty() {
                all.remove(&self.service);
            }
        }
    }
}

impl Changes {
    /// A commit of `service` wrote `keys`: wake the held queries that read one of them.
    pub fn committed<'k>(&self, service: &str, keys: impl IntoIterator<Item = &'k str>) {
        let all = self.waiters.lock().expect("waiters lock");
        let Some(list) = all.get(service) else {
            return;
        };
        for key in keys {
            for w in list.iter().filter(|w| w.reads.touched_by(key)) {
                w.wake.notify_one();
            }
        }
    }

    /// Queries held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    fn watch(&self, service: &str, reads: Reads) -> Watch<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let wake = Arc::new(Notify::new());
        self.waiters
            .lock()
            .expect("waiters lock")
            .entry(service.to_string())
            .or_default()
            .push(Waiter {
                id,
                reads,
                wake: wake.clone(),
            });
        Watch {
            changes: self,
            service: service.to_string(),
            id,
            wake,
        }
    }
}

/// How held queries behave (from `[ingress]`).
#[derive(Debug, Clone, Copy)]
pub struct Holding {
    pub max_wait: Duration,
    pub recheck: Duration,
    pub max_held: usize,
}

/// A query's reply as the host sends it: status, content type, body.
pub struct Answer {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Answer {
    /// A strong validator of exactly this reply.
    pub fn etag(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(self.status.to_be_bytes());
        hash.update(self.content_type.as_bytes());
        hash.update([0]);
        hash.update(&self.body);
        format!("\"{}\"", &crate::wasm::hex(&hash.finalize())[..32])
    }

    fn into_response(self, etag: &str) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (
            status,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response();
        if status.is_success() {
            set(&mut response, header::ETAG, etag);
        }
        response
    }
}

fn set(response: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, v);
    }
}

/// Whether `If-None-Match` names `etag` (or is `*`); weak comparison, as RFC 9110 asks.
fn matches(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

/// The seconds of a `Prefer: wait=N`, if asked.
fn wait_asked(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .find_map(|p| {
            let (k, v) = p.split_once('=')?;
            (k.trim().eq_ignore_ascii_case("wait"))
                .then(|| v.trim().trim_matches('"').parse().ok())
                .flatten()
        })
}

fn not_modified(etag: &str, waited: Option<u64>) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    set(&mut response, header::ETAG, etag);
    if let Some(s) = waited {
        set(
            &mut response,
            "preference-applied".parse().expect("name"),
            &format!("wait={s}"),
        );
    }
    response
}

/// Answer a `GET` of `service`: run `query` (the guest call: its answer and what it read, or
/// an error response), then honour `If-None-Match` and `Prefer: wait` (see the module docs).
pub async fn answer<F, Fut>(
    changes: &Changes,
    holding: Holding,
    service: &str,
    headers: &HeaderMap,
    mut query: F,
) -> Response
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Answer, Reads), Response>>,
{
    let (first, reads) = match query().await {
        Ok(done) => done,
        Err(response) => return response,
    };
    let etag = first.etag();
    if !matches(headers, &etag) || !(200..300).contains(&first.status) {
        return first.into_response(&etag);
    }
    let Some(asked) = wait_asked(headers) else {
        return not_modified(&etag, None);
    };
    let wait = Duration::from_secs(asked).min(holding.max_wait);
    let (held, _held) = crate::admission::Occupant::enter(&changes.held);
    if held >= holding.max_held {
        // Too many held already: answer now rather than hold without bound.
        return not_modified(&etag, None);
    }
    let until = tokio::time::Instant::now() + wait;
    let mut reads = reads;
    loop {
        let watch = changes.watch(service, reads);
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return not_modified(&etag, Some(wait.as_secs()));
        }
        let _ = tokio::time::timeout(left.min(holding.recheck), watch.wake.notified()).await;
        drop(watch);
        let (now, read) = match query().await {
            Ok(done) => done,
            Err(response) => return response,
        };
        let tag = now.etag();
        if tag != etag {
            return now.into_response(&tag);
        }
        reads = read;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn prefer_wait_and_if_none_match_are_read_as_the_rfcs_write_them() {
        assert_eq!(wait_asked(&headers(&[("prefer", "wait=10")])), Some(10));
        assert_eq!(
            wait_asked(&headers(&[("prefer", "respond-async, wait=5")])),
            Some(5)
        );
        assert_eq!(wait_asked(&headers(&[("prefer", "return=minimal")])), None);
        assert!(matches(
            &headers(&[("if-none-match", "\"a\", \"b\"")]),
            "\"b\""
        ));
        assert!(matches(&headers(&[("if-none-match", "W/\"b\"")]), "\"b\""));
        assert!(matches(&headers(&[("if-none-match", "*")]), "\"b\""));
        assert!(!matches(&headers(&[("if-none-match", "\"a\"")]), "\"b\""));
    }

    #[test]
    fn a_commit_wakes_only_the_queries_that_read_what_it_wrote() {
        let changes = Changes::default();
        let point = changes.watch(
            "order",
            Reads {
                keys: vec!["order/1".into()],
                prefixes: vec![],
            },
        );
        let listing = changes.watch(
            "order",
            Reads {
                keys: vec![],
                prefixes: vec!["order/".into()],
            },
        );
        changes.committed("order", ["order/2"]);
        changes.committed("point", ["order/1"]);
        let woke = |w: &Watch<'_>| futures::FutureExt::now_or_never(w.wake.notified()).is_some();
        assert!(!woke(&point), "another key, or another service's key");
        assert!(woke(&listing), "a new key under a scanned prefix");
        changes.committed("order", ["order/1"]);
        assert!(woke(&point));
        drop((point, listing));
        assert!(changes.waiters.lock().unwrap().is_empty());
    }
}
