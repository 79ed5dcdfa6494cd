//! The admin API: `POST /_saga/admin/deploy` with a component's bytes (what `runtime deploy`
//! sends), `POST /_saga/admin/rollback` and `POST /_saga/admin/undeploy`. It is never open without a token: with no `admin_token` configured every admin
//! call is refused (403), and a call without the right `Authorization: Bearer <token>` gets 401.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::node::{self, Shared};
use crate::registry::Service;
use crate::storage::deployments::{self, Action};

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() });
    (status, axum::Json(body)).into_response()
}

/// Equal in time whatever the first differing byte (the token is a secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `None` if the caller may use the admin API, else the refusal.
fn refuse(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = shared.config.admin_token.as_deref() else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "the admin API is off: configure admin_token (SAGA_ADMIN_TOKEN) to enable it",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same(g.as_bytes(), token.as_bytes()) => None,
        _ => Some(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer <token>)",
        )),
    }
}

fn describe(s: &Service) -> serde_json::Value {
    serde_json::json!({
        "version": s.version(),
        "digest": s.guest.digest,
        "subscriptions": s.guest.manifest.subscriptions.iter().map(|x| &x.topic).collect::<Vec<_>>(),
        "routes": s.guest.manifest.routes.iter().map(|r| format!("{} {}", r.method, r.path)).collect::<Vec<_>>(),
    })
}

/// The body of an admin call, read only once the token was checked (so nobody without it can
/// make the runtime read 64 MB), within `limits.admin_body_bytes`.
async fn authorised_body(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, Response> {
    if let Some(refused) = refuse(shared, headers) {
        let read = discard(headers, body).await;
        return Err(if read {
            refused
        } else {
            crate::ingress::closing(refused)
        });
    }
    let limit = shared.config.limits.admin_body_bytes;
    crate::ingress::read_body(headers, body, limit, "admin_body_bytes").await
}

/// Most of a refused call's body that is read (and thrown away) before the refusal is sent,
/// so that a client still sending it gets the answer instead of a reset connection.
const DISCARD_BYTES: usize = 1 << 20;

/// Read and drop a refused call's body if it is small (at most [`DISCARD_BYTES`], for at most
/// two seconds); a larger one is not read at all and its connection is closed. Whether all of
/// it was read.
async fn discard(headers: &HeaderMap, body: Body) -> bool {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > DISCARD_BYTES) {
        return false;
    }
    let read = axum::body::to_bytes(body, DISCARD_BYTES);
    let read = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
    matches!(read, Ok(Ok(_)))
}

/// An admin call's JSON body, after the token (see [`authorised_body`]).
async fn authorised_json<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, Response> {
    let bytes = authorised_body(shared, headers, body).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid request: {e}"),
        )
    })
}

/// Whether a deploy says it means to replace a running service of the same name (`runtime
/// deploy --replace` sends `x-saga-replace: true`): without it, a component cannot take over a
/// deployed service's name by accident.
fn replacing(headers: &HeaderMap) -> bool {
    headers
        .get("x-saga-replace")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "true")
}

/// Who is acting: what `runtime` sends in `x-saga-deployed-by`.
fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-saga-deployed-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("admin API")
        .to_string()
}

/// Run `wasm` here, then record it as `action` (with the bytes if `store`): recorded after it
/// runs here, so what the other instances follow was validated.
async fn activate(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    wasm: Vec<u8>,
    action: Action,
    store: bool,
) -> Response {
    let service = match node::validate(shared, wasm.clone()).await {
        Ok(service) => service,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("refused: {e}")),
    };
    if action == Action::Deploy && !replacing(headers) {
        match deployments::history(&shared.db, service.name()).await {
            Ok(h) => {
                if let Some(d) = h.first().filter(|d| d.action != Action::Undeploy) {
                    return error(
                        StatusCode::CONFLICT,
                        format!(
                            "service {} is already deployed ({} sha256:{}); deploy with \
                             --replace to replace it",
                            d.service, d.version, d.digest
                        ),
                    );
                }
            }
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }
    let installed = match node::install_validated(shared, service).await {
        Ok(installed) => installed,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("refused: {e}")),
    };
    let s = &installed.service;
    let record = deployments::Deployment {
        id: 0,
        service: s.name().to_string(),
        version: s.version().to_string(),
        digest: s.guest.digest.clone(),
        deployed_by: actor(headers),
        deployed_ms: shared.clock.now_ms(),
        action,
    };
    if let Err(e) = deployments::record(&shared.db, &record, store.then_some(&wasm[..])).await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("running here, but not recorded for other instances: {e}"),
        );
    }
    let mut reply = describe(s);
    reply["service"] = s.name().into();
    reply["action"] = action.as_str().into();
    reply["replaced"] = installed
        .replaced
        .as_deref()
        .map(describe)
        .unwrap_or_default();
    axum::Json(reply).into_response()
}

/// `POST /_saga/admin/deploy`: validate and run a component; 422 with the reason if refused.
pub async fn deploy(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let body = match authorised_body(&shared, &headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let _changing = shared.lifecycle.lock().await;
    activate(&shared, &headers, body.to_vec(), Action::Deploy, true).await
}

/// `POST /_saga/admin/verify` with a component's bytes: validate it (as deploy would) and
/// replay the recent events recorded for its service (by every instance on the database)
/// through it in the sandbox (see `crate::verify`). Activates nothing, writes nothing.
pub async fn verify(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let body = match authorised_body(&shared, &headers, body).await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    let service = match node::validate(&shared, body.to_vec()).await {
        Ok(service) => Arc::new(service),
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("refused: {e}")),
    };
    let recordings = match shared
        .recordings
        .of(&shared.db, &shared.config.instance_id, service.name())
        .await
    {
        Ok(recordings) => recordings,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let mut replayed = Vec::with_capacity(recordings.len());
    for recording in &recordings {
        replayed.push(crate::verify::replay(&service.guest, recording).await);
    }
    let count = |what: &str| replayed.iter().filter(|r| r.result == what).count();
    let mut reply = describe(&service);
    reply["service"] = service.name().into();
    reply["active"] = shared
        .registry
        .get(service.name())
        .as_deref()
        .map(describe)
        .unwrap_or_default();
    reply["replayed"] = replayed.len().into();
    reply["same"] = count("same").into();
    reply["differs"] = count("differs").into();
    reply["failed"] = count("failed").into();
    reply["events"] = serde_json::to_value(&replayed).unwrap_or_default();
    axum::Json(reply).into_response()
}

/// What `rollback` and `undeploy` name.
#[derive(serde::Deserialize)]
pub struct Target {
    service: String,
    /// For a rollback: the version to reactivate (default: the one before the active).
    version: Option<String>,
}

/// `POST /_saga/admin/rollback` `{"service", "version"?}`: make an earlier deployment active
/// again (see `deployments::rollback_target`); 404 if there is none.
pub async fn rollback(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target: Target = match authorised_json(&shared, &headers, body).await {
        Ok(target) => target,
        Err(refused) => return refused,
    };
    let _changing = shared.lifecycle.lock().await;
    let found =
        deployments::rollback_target(&shared.db, &target.service, target.version.as_deref()).await;
    let d = match found {
        Ok(Some(d)) => d,
        Ok(None) => {
            let which = match &target.version {
                Some(v) => format!("version {v}"),
                None => "an earlier version".to_string(),
            };
            return error(
                StatusCode::NOT_FOUND,
                format!("service {} has no {which} to roll back to", target.service),
            );
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let wasm = match deployments::component(&shared.db, &d.digest).await {
        Ok(Some(wasm)) => wasm,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("component sha256:{} is not stored", d.digest),
            )
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    activate(&shared, &headers, wasm, Action::Rollback, false).await
}

/// `POST /_saga/admin/undeploy` `{"service"}`: stop the service on every instance (see
/// `node::undeploy`); 404 if it runs nowhere.
pub async fn undeploy(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target: Target = match authorised_json(&shared, &headers, body).await {
        Ok(target) => target,
        Err(refused) => return refused,
    };
    let _changing = shared.lifecycle.lock().await;
    let latest = match deployments::history(&shared.db, &target.service).await {
        Ok(h) => h.into_iter().next(),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let stopped = node::undeploy(&shared, &target.service).await;
    let (version, digest) = match (&stopped, &latest) {
        (Some(s), _) => (s.version().to_string(), s.guest.digest.clone()),
        (None, Some(d)) if d.action != Action::Undeploy => (d.version.clone(), d.digest.clone()),
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("service {} is not deployed", target.service),
            )
        }
    };
    let record = deployments::Deployment {
        id: 0,
        service: target.service.clone(),
        version: version.clone(),
        digest: digest.clone(),
        deployed_by: actor(&headers),
        deployed_ms: shared.clock.now_ms(),
        action: Action::Undeploy,
    };
    if let Err(e) = deployments::record(&shared.db, &record, None).await {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stopped here, but not recorded for other instances: {e}"),
        );
    }
    axum::Json(serde_json::json!({
        "service": target.service, "action": "undeploy", "version": version, "digest": digest,
    }))
    .into_response()
}

/// Which parked outbox rows to list: a page of `limit` after the id `after`.
#[derive(serde::Deserialize)]
pub struct Page {
    #[serde(default)]
    after: i64,
    limit: Option<u32>,
}

/// `GET /_saga/outbox/parked?after=&limit=`: outbox rows the broker refused for good, with the
/// reason (no payloads: this view is open). Pages of at most 1000; `next` is the cursor.
pub async fn parked(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Response {
    let limit = page.limit.unwrap_or(100).clamp(1, 1000);
    match crate::storage::outbox::parked(&shared.db, page.after, limit).await {
        Ok(rows) => {
            let next = (rows.len() == limit as usize).then(|| rows.last().map(|r| r.id));
            axum::Json(serde_json::json!({ "parked": rows, "next": next.flatten() }))
                .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// What `outbox redrive` names: some parked rows, or all.
#[derive(serde::Deserialize)]
pub struct Redrive {
    #[serde(default)]
    ids: Vec<i64>,
    #[serde(default)]
    all: bool,
}

/// `POST /_saga/admin/outbox/redrive` `{"ids": [...]}` or `{"all": true}`: put parked rows
/// back at the end of the outbox for the relay to try again.
pub async fn redrive_parked(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let which: Redrive = match authorised_json(&shared, &headers, body).await {
        Ok(which) => which,
        Err(refused) => return refused,
    };
    if which.ids.is_empty() && !which.all {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "name ids, or all: true");
    }
    let ids = (!which.all).then_some(&which.ids[..]);
    let now = shared.clock.now_ms();
    match crate::storage::outbox::unpark(&shared.db, ids, now).await {
        Ok(moved) => {
            shared.relay.wake();
            axum::Json(serde_json::json!({ "redriven": moved })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// What a dead-letter re-drive names: some events of the topic, or all.
#[derive(serde::Deserialize)]
pub struct DltRedrive {
    #[serde(default)]
    events: Vec<String>,
    #[serde(default)]
    all: bool,
}

/// `POST /_saga/admin/dlt/{topic}/redrive` `{"events": [...]}` or `{"all": true}`: publish
/// dead-lettered events of `topic` back to it, as `runtime dlt redrive` does (the `/ui` page's
/// re-drive button). The token is checked before the body is read.
pub async fn redrive_dead_letters(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(topic): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let which: DltRedrive = match authorised_json(&shared, &headers, body).await {
        Ok(which) => which,
        Err(refused) => return refused,
    };
    if which.events.is_empty() && !which.all {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name events, or all: true",
        );
    }
    if let Err(e) = shared.config.limits.id("topic", &topic) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string());
    }
    let selection = crate::dlt::Selection {
        event_ids: if which.all { Vec::new() } else { which.events },
        offsets: Vec::new(),
    };
    match crate::dlt::redrive(&shared.config.kafka, &topic, &selection).await {
        Ok(done) => {
            let ids: Vec<_> = done.iter().map(|e| e.event_id.clone()).collect();
            axum::Json(serde_json::json!({ "redriven": ids })).into_response()
        }
        Err(e @ crate::dlt::Error::NoSuchTopic(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `GET /_saga/services`: what this instance runs.
pub async fn services(State(shared): State<Arc<Shared>>) -> Response {
    let list: Vec<serde_json::Value> = shared
        .registry
        .snapshot()
        .values()
        .map(|s| {
            let mut v = describe(s);
            v["service"] = s.name().into();
            v
        })
        .collect();
    axum::Json(list).into_response()
}

/// `GET /_saga/services/{name}/versions`: the deployment history of a service, newest first.
pub async fn versions(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    match deployments::history(&shared.db, &name).await {
        Ok(h) => axum::Json(h).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_by_content_and_length() {
        assert!(super::same(b"s3cret", b"s3cret"));
        assert!(!super::same(b"s3cret", b"s3creT"));
        assert!(!super::same(b"s3cret", b"s3cret!"));
    }
}
