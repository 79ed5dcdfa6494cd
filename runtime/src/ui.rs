//! `GET /ui`: a page a person looks at. One HTML file embedded in the binary (no front-end
//! build, nothing from a CDN) that reads the runtime's open, read-only JSON views: the services
//! with their active versions (`/_saga/services`), consumer lag and dead letters (`/metrics`),
//! recent sagas (`GET /_saga/sagas`, here) and one saga's timeline (`/sagas/{id}`), which it
//! draws as lanes per service on a time axis. It changes nothing, so it needs no token.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::ingress::json_error;
use crate::node::Shared;
use crate::storage::inbox;

const PAGE: &str = include_str!("ui/index.html");

/// The page, with a policy that lets it load nothing from elsewhere.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src 'self' data:; frame-ancestors 'none'",
            ),
        ],
        PAGE,
    )
        .into_response()
}

#[derive(Debug, serde::Deserialize)]
pub struct SagaQuery {
    status: Option<String>,
    service: Option<String>,
    /// How far back, ms. Default and at most a day.
    within_ms: Option<i64>,
    /// Default 50, at most 500.
    limit: Option<u32>,
}

/// How far back the listing looks at most: it groups the inbox rows of that window.
const WITHIN_MS: i64 = 86_400_000;

/// `GET /_saga/sagas?status=&service=&within_ms=&limit=`: recent sagas, newest first.
pub async fn sagas(State(shared): State<Arc<Shared>>, Query(q): Query<SagaQuery>) -> Response {
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    if let Some(s) = status.filter(|s| !inbox::SAGA_STATUSES.contains(s)) {
        return json_error(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown status {s:?}: one of {}",
                inbox::SAGA_STATUSES.join(", ")
            ),
        );
    }
    let service = q.service.as_deref().filter(|s| !s.is_empty());
    if service.is_some_and(|s| s.len() > shared.config.limits.id_bytes) {
        return json_error(StatusCode::BAD_REQUEST, "service name too long");
    }
    let within = q.within_ms.unwrap_or(WITHIN_MS).clamp(0, WITHIN_MS);
    let filter = inbox::SagaFilter {
        service,
        status,
        since_ms: shared.clock.now_ms() - within,
        limit: q.limit.unwrap_or(50).clamp(1, 500),
    };
    match inbox::recent(&shared.db, &filter).await {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
