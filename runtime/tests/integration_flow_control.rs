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

/// An event an hour late reaches the order service, which takes one event at a time (so a
/// batch never shows it drained its queue): until it has caught up (a second without a late
/// report), `POST /orders` is refused with the reason and `GET` is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_service_is_behind_commands_are_shed_and_queries_served() {
    let rt = TestRuntime::start_with(Backend::Sqlite, &["order"], |o| {
        o.config.worker.max_batch = 1;
    })
    .await;
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

/// `GET` with `If-None-Match` and `Prefer: wait=N`.
async fn held_get(
    rt: &TestRuntime,
    path: &str,
    etag: &str,
    wait_s: u64,
) -> (u16, reqwest::header::HeaderMap, String, std::time::Duration) {
    let started = std::time::Instant::now();
    let resp = rt
        .http
        .get(format!("{}{path}", rt.base))
        .header("if-none-match", etag)
        .header("prefer", format!("wait={wait_s}"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (
        status,
        headers,
        resp.text().await.unwrap(),
        started.elapsed(),
    )
}

/// Until a query is held.
async fn held_now(rt: &TestRuntime) {
    common::eventually("a query to be held", || async {
        let stats = rt.get("/_saga/stats").await;
        if stats["held_queries"].as_u64() >= Some(1) {
            Ok(())
        } else {
            Err(stats.to_string())
        }
    })
    .await;
}

async fn etag_of(rt: &TestRuntime, path: &str) -> String {
    let resp = rt
        .http
        .get(format!("{}{path}", rt.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let etag = resp
        .headers()
        .get("etag")
        .expect("a GET reply carries an ETag");
    etag.to_str().unwrap().to_string()
}

/// A client waits for its order to leave `PENDING` without polling: the held `GET` is answered
/// as soon as the commit that approves it lands, and an unchanged answer is `304` after the
/// wait, with `Preference-Applied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_get_answers_when_a_commit_changes_what_it_read() {
    let rt = TestRuntime::start(Backend::Sqlite, &["order"]).await;
    let order = json!({"holderId": "u", "currencyId": 1, "amount": 5});
    let (_, placed) = rt.post("/orders", order.clone()).await;
    let id = placed["id"].as_str().unwrap().to_string();
    let path = format!("/orders/{id}");
    let pending = etag_of(&rt, &path).await;
    // Unchanged: 304 at once without Prefer, after the wait with it.
    let resp = rt
        .http
        .get(format!("{}{path}", rt.base))
        .header("if-none-match", &pending)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);
    let (status, headers, _, took) = held_get(&rt, &path, &pending, 1).await;
    assert_eq!(status, 304);
    assert!(took >= std::time::Duration::from_secs(1), "{took:?}");
    assert_eq!(headers["preference-applied"], "wait=1");
    assert_eq!(headers["etag"].to_str().unwrap(), pending);

    // Changed while held: answered with the new state long before the wait is over.
    let held = {
        let (rt, path, pending) = (&rt, path.clone(), pending.clone());
        async move { held_get(rt, &path, &pending, 30).await }
    };
    let approve = async {
        held_now(&rt).await;
        let data = json!({"orderId": id});
        common::produce_event(rt.prefix(), "point", "used-1", "PointUsed", &id, &data).await;
    };
    let ((status, headers, body, took), ()) = tokio::join!(held, approve);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("APPROVED"), "{body}");
    assert_ne!(headers["etag"].to_str().unwrap(), pending);
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");

    // A listing is held on the prefix it scanned: a new order wakes it.
    let listing = etag_of(&rt, "/orders").await;
    let held = async { held_get(&rt, "/orders", &listing, 30).await };
    let place = async {
        held_now(&rt).await;
        rt.post("/orders", order.clone()).await
    };
    let ((status, _, body, took), (placed, _)) = tokio::join!(held, place);
    assert_eq!(placed, 201);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&body)
            .unwrap()
            .len(),
        2
    );
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    rt.stop().await;
}
