//! Fencing without holes (issue 11, item 5): the door check of expiry honours a deadline that
//! was cancelled or moved since an event was emitted; a command that continues an expired or
//! compensated saga is refused like an event would be; and a hot swap to a version without
//! compensation types keeps the ledger for sagas compensated under the old one.

mod common;

use common::{eventually, guest, produce_event, produce_raw, Backend, TestRuntime};
use serde_json::{json, Value};

/// The inbox outcome of hostile event `id`.
async fn outcome(rt: &TestRuntime, id: &str) -> String {
    common::hostile_outcome(rt, id).await.0
}

/// Start a hostile saga whose deadline `d` falls due after `after_ms`; its id.
async fn start_saga(rt: &TestRuntime, after_ms: u64) -> String {
    let (status, reply) = rt
        .post(&format!("/hostile/start?after={after_ms}"), json!({}))
        .await;
    assert_eq!(status, 201, "{reply}");
    reply["id"].as_str().unwrap().to_string()
}

/// A forward event of `saga` that carries a saga deadline an hour in the past.
async fn late_event(rt: &TestRuntime, id: &str, saga: &str) {
    let past = humantime::format_rfc3339_millis(
        std::time::SystemTime::now() - std::time::Duration::from_secs(3600),
    )
    .to_string();
    produce_raw(
        rt.prefix(),
        "hostile",
        saga,
        &[
            ("ce_specversion", "1.0"),
            ("ce_id", id),
            ("ce_type", "Fine"),
            ("ce_source", "/test"),
            ("ce_subject", saga),
            ("ce_sagadeadline", &past),
            ("content-type", "application/json"),
        ],
        b"{}",
    )
    .await;
}

async fn a_cancelled_or_moved_deadline_is_honoured_at_the_door(backend: Backend) {
    let rt = TestRuntime::start(backend, &["hostile"]).await;
    let p = rt.prefix().to_string();
    let cancelled = start_saga(&rt, 60_000).await;
    produce_event(&p, "hostile", "cancel", "Cancel", &cancelled, &json!({})).await;
    assert_eq!(outcome(&rt, "cancel").await, "applied");
    let moved = start_saga(&rt, 60_000).await;
    produce_event(&p, "hostile", "move", "Move", &moved, &json!({})).await;
    assert_eq!(outcome(&rt, "move").await, "applied");
    let due = start_saga(&rt, 1).await;

    late_event(&rt, "after-cancel", &cancelled).await;
    late_event(&rt, "after-move", &moved).await;
    late_event(&rt, "after-due", &due).await;
    assert_eq!(
        outcome(&rt, "after-cancel").await,
        "applied",
        "the deadline was cancelled"
    );
    assert_eq!(
        outcome(&rt, "after-move").await,
        "applied",
        "the deadline was moved an hour out"
    );
    assert_eq!(outcome(&rt, "after-due").await, "expired");
    rt.stop().await;
}

async fn continue_saga(rt: &TestRuntime, saga: &str) -> (u16, Value) {
    rt.post(&format!("/hostile/continue/{saga}"), json!({}))
        .await
}

async fn a_command_continuing_an_expired_or_compensated_saga_is_refused(backend: Backend) {
    let rt = TestRuntime::start(backend, &["hostile"]).await;
    let p = rt.prefix().to_string();
    let live = start_saga(&rt, 60_000).await;
    let (status, reply) = continue_saga(&rt, &live).await;
    assert_eq!(status, 200, "a live saga goes on: {reply}");

    let expired = start_saga(&rt, 1).await;
    eventually("the deadline to fire", || async {
        let deadlines = rt.get("/deadlines").await;
        let fired = deadlines
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["saga"] == expired.as_str() && d["status"] == "FIRED");
        if fired {
            Ok(())
        } else {
            Err(deadlines.to_string())
        }
    })
    .await;
    let (status, reply) = continue_saga(&rt, &expired).await;
    assert_eq!(status, 409, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("expired"),
        "{reply}"
    );

    let compensated = start_saga(&rt, 60_000).await;
    produce_event(&p, "hostile", "undo", "Undo", &compensated, &json!({})).await;
    assert_eq!(outcome(&rt, "undo").await, "compensated");
    let (status, reply) = continue_saga(&rt, &compensated).await;
    assert_eq!(status, 409, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("compensated"),
        "{reply}"
    );
    rt.stop().await;
}

/// hostile 0.1.0 declares `Undo` a compensation; 0.2.0 (other topic) declares none. A saga
/// compensated under 0.1.0 stays closed under 0.2.0: its late step is ignored.
async fn a_hot_swap_keeps_the_ledger_for_sagas_compensated_before(backend: Backend) {
    const TOKEN: &str = "fencing-token";
    let rt = TestRuntime::start_with(backend, &["hostile"], |o| {
        o.config.admin_token = Some(TOKEN.into());
    })
    .await;
    let p = rt.prefix().to_string();
    produce_event(&p, "hostile", "undo-s", "Undo", "saga-s", &json!({})).await;
    assert_eq!(outcome(&rt, "undo-s").await, "compensated");
    // Deployed as a user does (recorded in the history), so the instance's deployment
    // follower keeps 0.2.0 instead of putting the recorded 0.1.0 back.
    let (status, reply) = rt.deploy(Some(TOKEN), guest("hostile_v2")).await;
    assert_eq!(status, 200, "{reply}");
    produce_event(&p, "hostile-v2", "late-s", "Fine", "saga-s", &json!({})).await;
    produce_event(&p, "hostile-v2", "fresh-t", "Fine", "saga-t", &json!({})).await;
    assert_eq!(outcome(&rt, "fresh-t").await, "applied");
    assert_eq!(
        outcome(&rt, "late-s").await,
        "ignored",
        "the ledger was switched off by the swap"
    );
    rt.stop().await;
}

on_both_backends!(
    a_cancelled_or_moved_deadline_is_honoured_at_the_door,
    a_command_continuing_an_expired_or_compensated_saga_is_refused,
    a_hot_swap_keeps_the_ledger_for_sagas_compensated_before,
);

/// `GET /deadlines` pages instead of truncating: a full page links to the next (RFC 8288
/// `Link`), following the links lists every deadline once, and `status=` filters (pending ones
/// used to disappear behind the 10,000 oldest).
async fn deadlines_are_listed_in_pages(backend: Backend) {
    let rt = TestRuntime::start(backend, &["hostile"]).await;
    let mut started = Vec::new();
    for _ in 0..5 {
        started.push(start_saga(&rt, 3_600_000).await);
    }
    let mut seen = Vec::new();
    let mut next = Some(format!("{}/deadlines?limit=2", rt.base));
    let mut pages = 0;
    while let Some(url) = next.take() {
        let resp = rt.http.get(&url).send().await.unwrap();
        next = resp
            .headers()
            .get("link")
            .and_then(|l| l.to_str().ok())
            .and_then(|l| l.strip_prefix('<'))
            .and_then(|l| l.split_once('>'))
            .map(|(path, _)| format!("{}{path}", rt.base));
        let page: Value = resp.json().await.unwrap();
        seen.extend(
            page.as_array()
                .unwrap()
                .iter()
                .map(|d| d["saga"].as_str().unwrap().to_string()),
        );
        pages += 1;
        assert!(pages <= 4, "the links do not end");
    }
    assert_eq!(pages, 3, "5 deadlines in pages of 2");
    seen.sort();
    started.sort();
    assert_eq!(seen, started);
    let pending = rt.get("/deadlines?status=PENDING&limit=10").await;
    assert_eq!(pending.as_array().unwrap().len(), 5);
    assert_eq!(rt.get("/deadlines?status=FIRED").await, json!([]));
    rt.stop().await;
}

on_both_backends!(deadlines_are_listed_in_pages);
