//! A retried request starts nothing twice (issue 11, item 9): a command sent with an
//! `Idempotency-Key` stores its first reply with its effects, and a retry with the same key
//! and request gets that reply back, on any instance, for `retention.idempotency_keys_ms`;
//! the same key with another request gets `422`.

mod common;

use common::{eventually, Backend, TestRuntime};
use saga_runtime::clock::ManualClock;
use serde_json::{json, Value};

/// `POST /orders` with `key`: (status, reply, whether it was marked replayed).
async fn order(base: &str, key: &str, amount: i64) -> (u16, Value, bool) {
    let resp = common::http_client()
        .post(format!("{base}/orders"))
        .header("idempotency-key", key)
        .json(&json!({"holderId": "ida", "currencyId": 1, "amount": amount}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").is_some();
    (status, resp.json().await.unwrap_or(Value::Null), replayed)
}

async fn orders(rt: &TestRuntime) -> usize {
    rt.get("/orders").await.as_array().unwrap().len()
}

async fn a_retry_with_the_same_key_gets_the_first_reply_and_starts_nothing(backend: Backend) {
    let rt = TestRuntime::start(backend, &["order"]).await;
    let (status, first, replayed) = order(&rt.base, "key-1", 500).await;
    assert_eq!(status, 201, "{first}");
    assert!(!replayed);
    let (status, again, replayed) = order(&rt.base, "key-1", 500).await;
    assert_eq!(status, 201, "{again}");
    assert!(replayed, "the retry must be marked as a replay");
    assert_eq!(again["id"], first["id"], "the retry started another saga");
    assert_eq!(orders(&rt).await, 1);

    let (status, refused, _) = order(&rt.base, "key-1", 501).await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused["error"]
        .as_str()
        .unwrap()
        .contains("different request"));

    let (status, other, replayed) = order(&rt.base, "key-2", 500).await;
    assert_eq!(status, 201);
    assert!(!replayed);
    assert_ne!(other["id"], first["id"]);
    assert_eq!(orders(&rt).await, 2);

    let resp = rt
        .http
        .post(format!("{}/orders", rt.base))
        .header("idempotency-key", "bad\tkey")
        .json(&json!({"holderId": "ida", "currencyId": 1, "amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400, "a malformed key is refused");
    rt.stop().await;
}

/// Retries that race (the client gave up and sent again while the first was still running),
/// some of them on another instance: one saga, one reply for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_on_two_instances_start_one_saga() {
    let rt = TestRuntime::start(Backend::Postgres, &["order"]).await;
    let sibling = rt.sibling(|_| {}).await;
    let other = format!("http://{}", sibling.http_addr());
    let calls = (0..12).map(|i| {
        let base = if i % 2 == 0 {
            rt.base.clone()
        } else {
            other.clone()
        };
        async move { order(&base, "racing-key", 700).await }
    });
    let answers = futures::future::join_all(calls).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(status, reply, _)| {
            assert_eq!(*status, 201, "{reply}");
            reply["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(orders(&rt).await, 1);
    sibling.shutdown().await;
    rt.stop().await;
}

/// A key is replayed for its retention, then forgotten (a retry after it starts a new
/// command), and the cleaner deletes expired replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_replayed_for_its_retention_then_forgotten() {
    let clock = ManualClock::starting_at(1_800_000_000_000);
    let hour = 3_600_000;
    let rt = TestRuntime::start_with(Backend::Sqlite, &["order"], |o| {
        o.clock = clock.clone();
        o.config.retention.interval_ms = 20;
    })
    .await;
    let (_, first, _) = order(&rt.base, "day-key", 500).await;
    let (_, _, _) = order(&rt.base, "never-retried", 500).await;
    clock.advance(23 * hour);
    let (_, again, replayed) = order(&rt.base, "day-key", 500).await;
    assert!(replayed);
    assert_eq!(again["id"], first["id"]);
    clock.advance(2 * hour);
    let (status, later, replayed) = order(&rt.base, "day-key", 500).await;
    assert_eq!(status, 201);
    assert!(!replayed, "a key past its retention starts a new command");
    assert_ne!(later["id"], first["id"]);
    eventually("the cleaner to delete the expired reply", || async {
        let deleted = rt
            .handle
            .stats()
            .retention_deleted
            .load(std::sync::atomic::Ordering::Relaxed);
        if deleted >= 1 {
            Ok(())
        } else {
            Err(format!("{deleted} deleted"))
        }
    })
    .await;
    rt.stop().await;
}

on_both_backends!(a_retry_with_the_same_key_gets_the_first_reply_and_starts_nothing);
