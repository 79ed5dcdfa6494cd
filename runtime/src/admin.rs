//! The admin API: `POST /_saga/admin/deploy` with a component's bytes (what `runtime deploy`
//! sends). It is never open without a token: with no `admin_token` configured every admin
//! call is refused (403), and a call without the right `Authorization: Bearer <token>` gets 401.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::node::{self, Shared};
use crate::registry::Service;
use crate::storage::deployments;

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

/// `POST /_saga/admin/deploy`: validate and run a component; 422 with the reason if refused.
pub async fn deploy(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse(&shared, &headers) {
        return refused;
    }
    match node::install(&shared, body.to_vec()).await {
        Ok(installed) => {
            let s = &installed.service;
            let by = headers
                .get("x-saga-deployed-by")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("admin API");
            let record = deployments::Deployment {
                id: 0,
                service: s.name().to_string(),
                version: s.version().to_string(),
                digest: s.guest.digest.clone(),
                deployed_by: by.to_string(),
                deployed_ms: shared.clock.now_ms(),
            };
            // Recorded after it runs here, so what other instances follow was validated.
            if let Err(e) = deployments::record(&shared.db, &record, &body).await {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("running here, but not recorded for other instances: {e}"),
                );
            }
            let mut reply = describe(s);
            reply["service"] = s.name().into();
            reply["replaced"] = installed
                .replaced
                .as_deref()
                .map(describe)
                .unwrap_or_default();
            axum::Json(reply).into_response()
        }
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("refused: {e}")),
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
