//! HTTP ingress: the routes services declare, served by the host. A request becomes a call of
//! the owning guest's `on-request`; its effects commit in one transaction (state and outbox),
//! and the guest's reply is sent only after that commit. `GET` routes are queries: they read
//! state and must return no effects; their replies carry an `ETag`, and a client may wait for
//! a change with `If-None-Match` and `Prefer: wait` (`crate::watch`).

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tracing::Instrument as _;

use crate::commands::{Command, Committed};
use crate::effects;
use crate::node::Shared;
use crate::registry::{percent_decode, Service};
use crate::storage::idempotency;
use crate::wasm::bindings::{self, Context, Payload, Reply, Request};
use crate::wasm::{Called, Failure};
use crate::watch;
/// `GET /metrics`: the Prometheus exposition (`crate::metrics`). Open without the admin token,
/// like the other read-only views. The database aggregates are left out (and logged) if the
/// database does not answer, so a scrape still shows the rest.
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    use crate::storage::{inbox, outbox};
    let db = &shared.db;
    let (outbox_rows, oldest) = outbox::depth(db).await.unwrap_or_else(|e| {
        tracing::debug!("metrics: outbox depth: {e}");
        (0, None)
    });
    let dead_letters = inbox::dead_letters(db).await.unwrap_or_else(|e| {
        tracing::debug!("metrics: dead letters: {e}");
        Vec::new()
    });
    let now = shared.clock.now_ms();
    let max = shared.config.sandbox.max_instances as usize;
    let scraped = crate::metrics::Scraped {
        queued_requests: shared.door.queued(),
        held_queries: shared.changes.held(),
        guest_instances_in_use: shared.sandbox.slots().in_use(max),
        guest_instances_max: max,
        outbox_rows,
        outbox_oldest_ms: oldest.map_or(0, |t| (now - t).max(0)),
        dead_letters,
    };
    let text = shared.metrics.render(&shared.stats, &scraped);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/_saga/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/readyz", axum::routing::get(readyz))
        .route("/metrics", axum::routing::get(metrics))
        .route(
            "/_saga/stats",
            axum::routing::get(|State(shared): State<Arc<Shared>>| async move {
                let mut stats = serde_json::to_value(shared.stats.refreshed()).unwrap_or_default();
                // Gauges of now, beside the counters.
                stats["held_queries"] = shared.changes.held().into();
                stats["queued_requests"] = shared.door.queued().into();
                axum::Json(stats)
            }),
        )
        .route(
            "/_saga/admin/deploy",
            axum::routing::post(crate::admin::deploy),
        )
        .route(
            "/_saga/admin/verify",
            axum::routing::post(crate::admin::verify),
        )
        .route(
            "/_saga/admin/rollback",
            axum::routing::post(crate::admin::rollback),
        )
        .route(
            "/_saga/admin/undeploy",
            axum::routing::post(crate::admin::undeploy),
        )
        .route(
            "/_saga/outbox/parked",
            axum::routing::get(crate::admin::parked),
        )
        .route(
            "/_saga/admin/outbox/redrive",
            axum::routing::post(crate::admin::redrive_parked),
        )
        .route(
            "/_saga/admin/dlt/{topic}/redrive",
            axum::routing::post(crate::admin::redrive_dead_letters),
        )
        .route(
            "/_saga/services",
            axum::routing::get(crate::admin::services),
        )
        .route(
            "/_saga/services/{name}/versions",
            axum::routing::get(crate::admin::versions),
        )
        .route("/deadlines", axum::routing::get(list_deadlines))
        .route("/sagas/{id}", axum::routing::get(saga_timeline))
        .route("/ui", axum::routing::get(crate::ui::page))
        .route("/_saga/sagas", axum::routing::get(crate::ui::sagas))
        .fallback(handle)
        .with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let (database, took) = crate::health::ping(&shared.db).await;
    let installed: Vec<String> = shared.registry.snapshot().keys().cloned().collect();
    let (ready, detail) = shared.health.ready(&installed, database, took);
    let status = match ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, axum::Json(detail)).into_response()
}

pub(crate) fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() });
    (status, axum::Json(body)).into_response()
}

/// `503` with `Retry-After`: the host is busy or a dependency is down; the client may retry.
fn unavailable(message: impl Into<String>) -> Response {
    let mut response = json_error(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
}

/// `response` with `Connection: close`, for a request whose body is left unread: the
/// connection cannot carry another request, and without it a client that pooled the connection
/// sent its next request into a socket the server was closing, and got a broken pipe.
pub(crate) fn closing(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// Read a request body of at most `limit` bytes (`limits.<key>`): a declared length over it is
/// refused before anything is read, a body that turns out longer as soon as it passes it.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    key: &str,
) -> Result<Bytes, Response> {
    let too_large = |size: &str| {
        closing(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is {size} bytes, over the limit of {limit} (limits.{key})"),
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|&n| n > limit as u64) {
        return Err(too_large(&n.to_string()));
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large(&format!("more than {limit}")))
}

/// A turn at the door (`crate::admission`), its wait measured.
async fn admitted(
    shared: &Shared,
    command: bool,
) -> Result<crate::admission::Turn, crate::admission::Refused> {
    let waited = std::time::Instant::now();
    let turn = shared.door.enter(command).await?;
    let waited = waited.elapsed().as_secs_f64();
    shared.metrics.ingress_wait.record(waited);
    Ok(turn)
}

/// A service's route, in an `ingress` span that continues the caller's trace (`traceparent`).
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::info_span!(
        "ingress",
        otel.kind = "server",
        http.request.method = %method,
        url.path = %uri.path(),
        http.response.status_code = tracing::field::Empty,
        saga.service = tracing::field::Empty,
        saga.version = tracing::field::Empty,
        saga.id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::follow(&span, &headers);
    let response = serve(shared, method, uri, headers, body)
        .instrument(span.clone())
        .await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

async fn serve(
    shared: Arc<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path();
    let Some((service, params)) = shared.registry.route(method.as_str(), path) else {
        return json_error(
            StatusCode::NOT_FOUND,
            format!("no service serves {method} {path}"),
        );
    };
    let span = tracing::Span::current();
    span.record("saga.service", service.name());
    span.record("saga.version", service.version());
    // Flow control before anything is read or run (`crate::admission`); a query takes its
    // turn for each run of it (`query`).
    let command = method != Method::GET && method != Method::HEAD;
    let _turn = match command {
        false => None,
        true => match admitted(&shared, true).await {
            Ok(turn) => Some(turn),
            Err(refused) => {
                crate::stats::Stats::add(&shared.stats.shed, 1);
                return unavailable(refused.to_string());
            }
        },
    };
    let limits = &shared.config.limits;
    let body = match read_body(
        &headers,
        body,
        limits.request_body_bytes,
        "request_body_bytes",
    )
    .await
    {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let retry = match Retry::of(&shared, &method, &uri, &headers, &body) {
        Ok(retry) => retry,
        Err(refused) => return json_error(StatusCode::BAD_REQUEST, refused),
    };
    if let Some(retry) = &retry {
        match retry.stored(&shared, service.name()).await {
            Ok(Some(answer)) => return answer,
            Ok(None) => {}
            Err(e) => return unavailable(format!("could not read the Idempotency-Key: {e}")),
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream");
    let request = Request {
        method: method.as_str().to_string(),
        path: path.to_string(),
        params,
        query: parse_query(uri.query().unwrap_or("")),
        body: Payload {
            content_type: content_type.to_string(),
            data: body.to_vec(),
        },
    };
    if !command {
        let holding = shared.config.ingress.holding();
        let name = service.name();
        return watch::answer(&shared.changes, holding, name, &headers, || {
            query(&shared, &service, &request)
        })
        .await;
    }
    let new_id = uuid::Uuid::now_v7().to_string();
    // The saga a command may start is named by its `context.new-id`.
    tracing::Span::current().record("saga.id", new_id.as_str());
    for rerun in 1..=crate::backoff::CONFLICT_RERUNS {
        match run(&shared, &service, &request, &new_id, retry.as_ref()).await {
            Outcome::Reply(reply) => return to_response(reply),
            Outcome::Error(response) => return response,
            Outcome::Conflict => {
                crate::stats::Stats::add(&shared.stats.conflicts, 1);
                // Back off a little, growing and jittered: the writers it collides with
                // get to finish.
                tokio::time::sleep(crate::backoff::conflict(rerun.min(6), 64)).await;
            }
            Outcome::Answered => {
                let retry = retry
                    .as_ref()
                    .expect("only commands with a key are answered");
                match retry.stored(&shared, service.name()).await {
                    Ok(Some(answer)) => return answer,
                    Ok(None) => {} // expired meanwhile: run it as new
                    Err(e) => {
                        return unavailable(format!("could not read the Idempotency-Key: {e}"))
                    }
                }
            }
        }
    }
    unavailable("the state this request reads kept changing; try again")
}

enum Outcome {
    Reply(Reply),
    Error(Response),
    Conflict,
    /// Another request with the same `Idempotency-Key` committed first: answer with its reply.
    Answered,
}

/// A command sent with an `Idempotency-Key` (as in the IETF draft and Restate): its first reply
/// is stored with its effects, in the same transaction, and replayed to a retry with the same
/// key and request for `retention.idempotency_keys_ms`, on any instance; the same key with
/// another request is refused with `422`.
struct Retry {
    key: String,
    fingerprint: String,
}

/// The request header naming a command's idempotency key.
const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The response header marking a replayed reply.
const REPLAYED: &str = "idempotent-replayed";

impl Retry {
    /// The key of a command (not of a `GET`), checked like an id; `None` without one.
    fn of(
        shared: &Shared,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Option<Retry>, String> {
        let Some(value) = headers
            .get(IDEMPOTENCY_KEY)
            .filter(|_| method != Method::GET)
        else {
            return Ok(None);
        };
        let key = value
            .to_str()
            .map_err(|_| "Idempotency-Key must be visible ASCII".to_string())?;
        shared
            .config
            .limits
            .id("Idempotency-Key", key)
            .map_err(|e| e.to_string())?;
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for part in [method.as_str(), uri.path(), uri.query().unwrap_or("")] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        hash.update(body);
        let fingerprint = crate::wasm::hex(&hash.finalize());
        Ok(Some(Retry {
            key: key.to_string(),
            fingerprint,
        }))
    }

    /// The answer to this retry if a reply is stored for its key: the reply (marked replayed),
    /// or `422` if the key was used for another request.
    async fn stored(
        &self,
        shared: &Shared,
        service: &str,
    ) -> Result<Option<Response>, crate::storage::Error> {
        let since = shared
            .config
            .retention
            .idempotency_since(shared.clock.now_ms());
        let Some(stored) = idempotency::lookup(&shared.db, service, &self.key, since).await? else {
            return Ok(None);
        };
        if stored.fingerprint != self.fingerprint {
            return Ok(Some(json_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "Idempotency-Key {:?} was used for a different request; use a new key",
                    self.key
                ),
            )));
        }
        crate::stats::Stats::add(&shared.stats.replayed, 1);
        let mut answer = to_response(Reply {
            status: stored.status,
            body: Payload {
                content_type: stored.content_type,
                data: stored.body,
            },
        });
        answer
            .headers_mut()
            .insert(REPLAYED, header::HeaderValue::from_static("true"));
        Ok(Some(answer))
    }
}

/// Call the service's request handler on a free instance; a failure as the response it gets.
async fn call_guest(
    shared: &Arc<Shared>,
    service: &Arc<Service>,
    request: &Request,
    ctx: Context,
) -> Result<Called<bindings::Response>, Response> {
    let span = crate::telemetry::guest_span(
        &tracing::Span::current(),
        service.name(),
        service.version(),
        1,
    );
    let called = match service.guest.slots().admit().await {
        Ok(slot) => {
            let reader = shared.reader.clone();
            service
                .guest
                .on_request(&slot, reader, &ctx, request)
                .instrument(span)
                .await
        }
        Err(busy) => Err(busy),
    };
    match called {
        Ok(called) => Ok(called),
        Err(Failure::Reject(msg)) => Err(json_error(StatusCode::UNPROCESSABLE_ENTITY, msg)),
        Err(f @ (Failure::Retry(_) | Failure::Host(_))) => Err(unavailable(f.to_string())),
        Err(f) => {
            tracing::warn!(service = service.name(), "request handler failed: {f}");
            Err(json_error(StatusCode::INTERNAL_SERVER_ERROR, f.to_string()))
        }
    }
}

/// Run a query (`GET`): its answer and what it read, for `crate::watch`. It takes a turn at
/// the door for the call only, so a held query does not hold one while it waits.
async fn query(
    shared: &Arc<Shared>,
    service: &Arc<Service>,
    request: &Request,
) -> Result<(watch::Answer, watch::Reads), Response> {
    let _turn = admitted(shared, false).await.map_err(|refused| {
        crate::stats::Stats::add(&shared.stats.shed, 1);
        unavailable(refused.to_string())
    })?;
    let ctx = Context {
        now_ms: shared.clock.now_ms(),
        attempt: 1,
        new_id: uuid::Uuid::now_v7().to_string(),
    };
    let called = call_guest(shared, service, request, ctx).await?;
    let response = called.output;
    if !response.effects.is_empty() {
        return Err(json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "GET {} of service {} returned effects; queries must not change anything",
                request.path,
                service.name()
            ),
        ));
    }
    let reply = response.reply;
    let answer = watch::Answer {
        status: reply.status,
        content_type: reply.body.content_type,
        body: reply.body.data,
    };
    let reads = watch::Reads {
        keys: called.reads.0.into_keys().collect(),
        prefixes: called.scanned,
    };
    Ok((answer, reads))
}

async fn run(
    shared: &Arc<Shared>,
    service: &Arc<Service>,
    request: &Request,
    new_id: &str,
    retry: Option<&Retry>,
) -> Outcome {
    let now_ms = shared.clock.now_ms();
    let ctx = Context {
        now_ms,
        attempt: 1,
        new_id: new_id.to_string(),
    };
    let called = match call_guest(shared, service, request, ctx).await {
        Ok(called) => called,
        Err(response) => return Outcome::Error(response),
    };
    let response = called.output;
    if response.effects.is_empty() && retry.is_none() {
        return Outcome::Reply(response.reply);
    }
    let scope = effects::Scope { saga: None, new_id };
    if let Err(reason) = effects::validate(&shared.config.limits, service, scope, &response.effects)
    {
        return Outcome::Error(json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the handler's effects were refused: {reason}"),
        ));
    }
    let retry = retry.map(|retry| {
        let reply = idempotency::Stored {
            fingerprint: retry.fingerprint.clone(),
            status: response.reply.status,
            content_type: response.reply.body.content_type.clone(),
            body: response.reply.body.data.clone(),
        };
        (retry.key.clone(), reply)
    });
    let command = Command {
        service: service.clone(),
        reads: called.reads,
        effects: response.effects,
        new_id: new_id.to_string(),
        now_ms,
        trace: crate::telemetry::carried(&tracing::Span::current()),
        retry,
    };
    let committed = shared
        .commands
        .commit(command)
        .instrument(tracing::info_span!("commit"))
        .await;
    match committed {
        Ok(Committed::Done) => Outcome::Reply(response.reply),
        Ok(Committed::Answered) => Outcome::Answered,
        Ok(Committed::Refused(reason)) => Outcome::Error(json_error(StatusCode::CONFLICT, reason)),
        Err(crate::storage::Error::Conflict { .. }) => Outcome::Conflict,
        Err(e) => Outcome::Error(unavailable(format!("could not commit: {e}"))),
    }
}

/// Which deadlines `GET /deadlines` lists.
#[derive(serde::Deserialize)]
struct DeadlinePage {
    /// `PENDING`, `CANCELLED` or `FIRED`; all if absent.
    status: Option<String>,
    /// The cursor of the page before (from the `Link` header).
    after: Option<String>,
    limit: Option<u32>,
}

/// `GET /deadlines[?status=&limit=&after=]` (SPEC B6): deadlines with their state, earliest
/// first, a page at a time (default 1000, at most 10000). The body stays a JSON array; a full
/// page carries `Link: </deadlines?…&after=CURSOR>; rel="next"` (RFC 8288) to the next one.
async fn list_deadlines(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(page): axum::extract::Query<DeadlinePage>,
) -> Response {
    use crate::storage::deadlines;
    let limit = page.limit.unwrap_or(1000).clamp(1, 10_000);
    let after: Option<deadlines::Cursor> = match page.after.as_deref().map(decode_cursor) {
        None => None,
        Some(Some(cursor)) => Some(cursor),
        Some(None) => return json_error(StatusCode::BAD_REQUEST, "invalid cursor in `after`"),
    };
    let status = page.status.as_deref();
    match deadlines::page(&shared.db, status, after.as_ref(), limit).await {
        Ok(list) => {
            let next = (list.len() == limit as usize)
                .then(|| list.last())
                .flatten()
                .map(|d| {
                    encode_cursor(&(d.due_ms, d.service.clone(), d.saga.clone(), d.name.clone()))
                });
            let mut response = axum::Json(list).into_response();
            if let Some(cursor) = next {
                let status = status.map(|s| format!("status={s}&")).unwrap_or_default();
                let link =
                    format!("</deadlines?{status}limit={limit}&after={cursor}>; rel=\"next\"");
                if let Ok(value) = header::HeaderValue::from_str(&link) {
                    response.headers_mut().insert(header::LINK, value);
                }
            }
            response
        }
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// A page cursor as URL-safe text: the hex of its JSON.
fn encode_cursor(cursor: &crate::storage::deadlines::Cursor) -> String {
    let json = serde_json::to_vec(cursor).expect("a tuple of strings and a number");
    crate::wasm::hex(&json)
}

fn decode_cursor(text: &str) -> Option<crate::storage::deadlines::Cursor> {
    if !text.len().is_multiple_of(2) || text.len() > 8192 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    serde_json::from_slice(&bytes?).ok()
}

/// `GET /sagas/{id}` (SPEC B9): every event of the saga each service handled — when, by which
/// handler version, with what outcome — and the saga's deadlines.
async fn saga_timeline(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    use crate::storage::{deadlines, inbox};
    let timeline = async {
        Ok::<_, crate::storage::Error>(serde_json::json!({
            "saga": id,
            "events": inbox::for_saga(&shared.db, &id).await?,
            "deadlines": deadlines::for_saga(&shared.db, &id).await?,
        }))
    };
    match timeline.await {
        Ok(t) => axum::Json(t).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

fn to_response(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, reply.body.content_type)],
        reply.body.data,
    )
        .into_response()
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_into_pairs() {
        assert_eq!(
            parse_query("a=1&b=x+y&c=%2F&flag"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("c".into(), "/".into()),
                ("flag".into(), "".into())
            ]
        );
    }
}
