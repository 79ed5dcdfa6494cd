//! SPEC B7.1–2 on the real runtime, broker, guests and both databases: the order → exchange →
//! point → order saga over Kafka, driven through the HTTP routes a user would curl.

mod common;

use common::{eventually, Backend, TestRuntime};
use serde_json::{json, Value};

const SERVICES: &[&str] = &["order", "point", "exchange"];

async fn settled_order(rt: &TestRuntime, id: &str) -> Value {
    eventually("the order to settle", || async {
        let order = rt.get(&format!("/orders/{id}")).await;
        match order["status"].as_str() {
            Some("PENDING") | None => Err(order.to_string()),
            Some(_) => Ok(order),
        }
    })
    .await
}

/// B7.1: a user with 10000 points orders 500 → APPROVED, 9500 points, one exchange.
async fn happy_path_approves_and_deducts_once(backend: Backend) {
    let rt = TestRuntime::start(backend, SERVICES).await;
    let (status, _) = rt
        .post("/points", json!({"userId": "alice", "point": 10000}))
        .await;
    assert_eq!(status, 200);
    let (status, order) = rt
        .post(
            "/orders",
            json!({"holderId": "alice", "currencyId": 1, "amount": 500}),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    assert_eq!(order["status"], "PENDING");
    let id = order["id"].as_str().unwrap().to_string();

    let order = settled_order(&rt, &id).await;
    assert_eq!(order["status"], "APPROVED", "{order}");
    assert_eq!(rt.get("/points/alice").await["point"], 9500);
    let exchanges = rt.get("/exchanges").await;
    assert_eq!(exchanges.as_array().unwrap().len(), 1, "{exchanges}");
    assert_eq!(exchanges[0]["orderId"], id.as_str());
    let listed = rt.get("/orders").await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    rt.stop().await;
}

/// B7.2: ordering 50000 with 10000 points → REJECTED for the point limit, points unchanged,
/// and the exchange made for it is compensated.
async fn point_limit_rejects_and_leaves_points_alone(backend: Backend) {
    let rt = TestRuntime::start(backend, SERVICES).await;
    rt.post("/points", json!({"userId": "bob", "point": 10000}))
        .await;
    let (status, order) = rt
        .post(
            "/orders",
            json!({"holderId": "bob", "currencyId": 1, "amount": 50000}),
        )
        .await;
    assert_eq!(status, 201);
    let id = order["id"].as_str().unwrap().to_string();

    let order = settled_order(&rt, &id).await;
    assert_eq!(order["status"], "REJECTED", "{order}");
    assert!(
        order["reason"].as_str().unwrap().contains("point limit"),
        "{order}"
    );
    assert_eq!(rt.get("/points/bob").await["point"], 10000);
    eventually("the exchange to be compensated", || async {
        let exchanges = rt.get("/exchanges").await;
        if exchanges.as_array().is_some_and(|a| a.is_empty()) {
            Ok(())
        } else {
            Err(exchanges.to_string())
        }
    })
    .await;
    assert_eq!(rt.get("/transactions").await, json!([]));
    rt.stop().await;
}

/// Concurrent sagas of one user touch the same balance from different partitions: the
/// optimistic check re-runs the loser, so no deduction is lost.
async fn concurrent_orders_of_one_user_lose_no_update(backend: Backend) {
    let rt = TestRuntime::start(backend, SERVICES).await;
    rt.post("/points", json!({"userId": "carol", "point": 10000}))
        .await;
    let orders = futures::future::join_all((0..20).map(|_| {
        rt.post(
            "/orders",
            json!({"holderId": "carol", "currencyId": 1, "amount": 100}),
        )
    }))
    .await;
    for (_, order) in &orders {
        let order = settled_order(&rt, order["id"].as_str().unwrap()).await;
        assert_eq!(order["status"], "APPROVED", "{order}");
    }
    eprintln!(
        "conflicts re-run: {}",
        saga_runtime::stats::Stats::get(&rt.handle.stats().conflicts)
    );
    assert_eq!(rt.get("/points/carol").await["point"], 8000);
    assert_eq!(rt.get("/transactions").await.as_array().unwrap().len(), 20);
    rt.stop().await;
}

/// The relay is woken by commits: with its polling interval set to an hour the saga still
/// completes, which it could not if the relay only polled.
async fn the_relay_is_woken_by_commits_not_by_polling(backend: Backend) {
    let rt = TestRuntime::start_with(backend, SERVICES, |o| {
        o.config.relay.poll_interval_ms = 3_600_000;
    })
    .await;
    rt.post("/points", json!({"userId": "fay", "point": 1000}))
        .await;
    let (_, order) = rt
        .post(
            "/orders",
            json!({"holderId": "fay", "currencyId": 1, "amount": 10}),
        )
        .await;
    let order = settled_order(&rt, order["id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "APPROVED", "{order}");
    rt.stop().await;
}

/// Bad input to a route is refused with the reason and changes nothing.
async fn a_malformed_command_is_refused_with_the_reason(backend: Backend) {
    let rt = TestRuntime::start(backend, SERVICES).await;
    let resp = rt
        .http
        .post(format!("{}/orders", rt.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("malformed JSON"),
        "{body}"
    );
    assert_eq!(rt.get("/orders").await, json!([]));
    let missing = rt
        .http
        .get(format!("{}/nowhere", rt.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    rt.stop().await;
}

on_both_backends!(
    happy_path_approves_and_deducts_once,
    point_limit_rejects_and_leaves_points_alone,
    concurrent_orders_of_one_user_lose_no_update,
    a_malformed_command_is_refused_with_the_reason,
    the_relay_is_woken_by_commits_not_by_polling,
);

/// PostgreSQL: once a handler read keys named after its event's saga (`exchange/<id>`,
/// `tx/<id>`, `order/<id>`), the next events of its type have those keys read ahead by the
/// door check's statement, and their calls read them from its answer (`worker::ahead`) — the
/// same values a read would have found: approvals, compensations and points come out as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_named_after_the_saga_are_read_ahead_with_the_door_check() {
    let rt = TestRuntime::start(Backend::Postgres, SERVICES).await;
    rt.post("/points", json!({"userId": "carol", "point": 10000}))
        .await;
    // Placed one after another: each saga's handlers ran before the next one's.
    for amount in [500, 500, 50000, 500, 500] {
        let (status, order) = rt
            .post(
                "/orders",
                json!({"holderId": "carol", "currencyId": 1, "amount": amount}),
            )
            .await;
        assert_eq!(status, 201, "{order}");
        let order = settled_order(&rt, order["id"].as_str().unwrap()).await;
        let expected = if amount == 50000 {
            "REJECTED"
        } else {
            "APPROVED"
        };
        assert_eq!(order["status"], expected, "{order}");
    }
    assert_eq!(rt.get("/points/carol").await["point"], 8000);
    eventually(
        "the rejected order's exchange to be compensated",
        || async {
            let exchanges = rt.get("/exchanges").await;
            match exchanges.as_array().map(Vec::len) {
                Some(4) => Ok(()),
                _ => Err(exchanges.to_string()),
            }
        },
    )
    .await;
    let stats = rt.get("/_saga/stats").await;
    let ahead = stats["reads_ahead"].as_u64().unwrap_or(0);
    assert!(
        ahead >= 4,
        "reads answered from the door's read-ahead: {stats}"
    );
    rt.stop().await;
}
