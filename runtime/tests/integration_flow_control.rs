//! Flow control at the door (issue 12, item 1): past capacity a request gets `503` with
//! `Retry-After`, never `500`; while the event path is behind, new commands are shed and
//! queries still served.

mod common;

use common::{Backend, TestRuntime};
use serde_json::json;

/// One request at a time and two waiting: of forty at once, some are turned away with `503`
/// and `Retry-After`, every other one succeeds, none fails otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_capacity_requests_get_503_with_retry_after_never_500() {
    let rt = TestRuntime::start_with(Backend::Sqlite, &["point"], |o| {
        o.config.ingress.max_in_flight = 1;
        o.config.ingress.max_queued = 2;
        o.config.ingress.queue_wait_ms = 5_000;
    })
    .await;
    let calls = (0..40).map(|i| {
        let (http, base) = (rt.http.clone(), rt.base.clone());
        async move {
            let resp = http
                .post(format!("{base}/points"))
                .json(&json!({"userId": format!("u{i}"), "point": i}))
                .send()
                .await
                .unwrap();
            let retry_after = resp.headers().get("retry-after").is_some();
            (
                resp.status().as_u16(),
                retry_after,
                resp.text().await.unwrap(),
            )
        }
    });
    let answers = futures::future::join_all(calls).await;
    let shed: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
    let other: Vec<_> = answers
        .iter()
        .filter(|(s, _, _)| *s != 503 && *s != 200)
        .collect();
    assert!(other.is_empty(), "{other:?}");
    assert!(!shed.is_empty(), "nothing was turned away: {answers:?}");
    assert!(shed
        .iter()
        .all(|(_, retry_after, body)| *retry_after && body.contains("ingress.max_queued")));
    let stats = rt.get("/_saga/stats").await;
    assert_eq!(stats["shed"], shed.len());
    rt.stop().await;
}

/// An event an hour late reaches the order service: until it has caught up (a second without
/// a late report), `POST /orders` is refused with the reason and `GET` is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_service_is_behind_commands_are_shed_and_queries_served() {
    let rt = TestRuntime::start(Backend::Sqlite, &["order"]).await;
    let order = json!({"holderId": "u", "currencyId": 1, "amount": 5});
    let (status, _) = rt.post("/orders", order.clone()).await;
    assert_eq!(status, 201, "admitted before anything is late");
    let late = humantime::format_rfc3339_millis(
        std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
    )
    .to_string();
    common::produce_raw(
        rt.prefix(),
        "point",
        "late-order",
        &[
            ("ce_specversion", "1.0"),
            ("ce_id", "late-1"),
            ("ce_type", "PointUsed"),
            ("ce_source", "/test"),
            ("ce_subject", "late-order"),
            ("ce_time", &late),
            ("content-type", "application/json"),
        ],
        br#"{"orderId":"late-order"}"#,
    )
    .await;
    let refused = common::eventually("POST /orders to be shed", || async {
        let resp = rt
            .http
            .post(format!("{}/orders", rt.base))
            .json(&order)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            503 => Ok((
                resp.headers().contains_key("retry-after"),
                resp.text().await.unwrap(),
            )),
            s => Err(format!("{s}")),
        }
    })
    .await;
    assert!(refused.0, "503 without Retry-After");
    assert!(
        refused.1.contains("service order") && refused.1.contains("ingress.shed_lag_ms"),
        "{}",
        refused.1
    );
    let (status, _) = rt.get_status("/orders").await;
    assert_eq!(status, 200, "queries are served while commands are shed");
    // Caught up: nothing late since, so commands are admitted again.
    common::eventually("POST /orders to be admitted again", || async {
        match rt.post("/orders", order.clone()).await {
            (201, _) => Ok(()),
            (s, body) => Err(format!("{s} {body}")),
        }
    })
    .await;
    rt.stop().await;
}
