//! Host-owned deadlines (SPEC B1, B3, B7.3, B8) on the real runtime, broker and both databases.

mod common;

use std::sync::Arc;

use common::{eventually, guest, Backend, TestRuntime};
use saga_runtime::clock::ManualClock;
use serde_json::{json, Value};

async fn order_status(rt: &TestRuntime, id: &str, want: &str) -> Value {
    eventually(&format!("order {id} to be {want}"), || async {
        let order = rt.get(&format!("/orders/{id}")).await;
        if order["status"] == want {
            Ok(order)
        } else {
            Err(order.to_string())
        }
    })
    .await
}

async fn deadline_of(rt: &TestRuntime, saga: &str) -> Value {
    let all = rt.get("/deadlines").await;
    all.as_array()
        .unwrap()
        .iter()
        .find(|d| d["saga"] == saga)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn place(rt: &TestRuntime, user: &str, amount: i64) -> String {
    rt.post("/points", json!({"userId": user, "point": 10000}))
        .await;
    let (status, order) = rt
        .post(
            "/orders",
            json!({"holderId": user, "currencyId": 1, "amount": amount}),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    order["id"].as_str().unwrap().to_string()
}

/// B7.3: exchange is down while an order is placed → the deadline rejects the order; when
/// exchange comes back, the chain compensates: points back where they were, no exchange left.
async fn an_order_is_rejected_by_its_deadline_and_compensated_when_exchange_returns(
    backend: Backend,
) {
    let rt = TestRuntime::start_with(backend, &["order", "point"], |o| {
        o.config.saga_deadlines.insert("order".into(), 500);
    })
    .await;
    let id = place(&rt, "gus", 500).await;
    assert_eq!(deadline_of(&rt, &id).await["status"], "PENDING");
    let order = order_status(&rt, &id, "REJECTED").await;
    assert_eq!(order["reason"], "deadline exceeded", "{order}");
    assert_eq!(deadline_of(&rt, &id).await["status"], "FIRED");
    assert_eq!(rt.get("/points/gus").await["point"], 10000);

    // Exchange comes back and works through the backlog: OrderCreated, then OrderRejected.
    rt.handle.install(guest("exchange")).await.unwrap();
    eventually("point to refund the late deduction", || async {
        let txs = rt.get("/transactions").await;
        if txs
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["status"] == "REFUNDED")
        {
            Ok(())
        } else {
            Err(txs.to_string())
        }
    })
    .await;
    assert_eq!(rt.get("/points/gus").await["point"], 10000);
    assert_eq!(rt.get("/exchanges").await, json!([]));
    assert_eq!(
        order_status(&rt, &id, "REJECTED").await["reason"],
        "deadline exceeded"
    );
    // B9: the saga's timeline across services, over HTTP and through `runtime trace`.
    let timeline = rt.get(&format!("/sagas/{id}")).await;
    let steps: Vec<(String, String, String)> = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_string();
            (s("service"), s("eventType"), s("outcome"))
        })
        .collect();
    for step in [
        ("order", "DeadlineExpired"),
        ("exchange", "OrderCreated"),
        ("exchange", "OrderRejected"),
        ("point", "ExchangeSucceeded"),
        ("point", "ExchangeCancelled"),
    ] {
        let found = steps
            .iter()
            .any(|(svc, ty, outcome)| (svc.as_str(), ty.as_str()) == step && outcome == "applied");
        assert!(found, "{step:?} missing from {steps:?}");
    }
    assert_eq!(timeline["deadlines"][0]["status"], "FIRED");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["trace", &id, "--runtime", &rt.base])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("DeadlineExpired") && printed.contains("ExchangeCancelled"),
        "{printed}"
    );
    assert!(
        printed.contains("deadline order/approval") && printed.contains("FIRED"),
        "{printed}"
    );
    rt.stop().await;
}

/// An order approved in time cancels its deadline, which then never fires.
async fn an_approved_order_cancels_its_deadline(backend: Backend) {
    let rt = TestRuntime::start(backend, &["order", "point", "exchange"]).await;
    let id = place(&rt, "hal", 500).await;
    order_status(&rt, &id, "APPROVED").await;
    let deadline = deadline_of(&rt, &id).await;
    assert_eq!(deadline["status"], "CANCELLED", "{deadline}");
    assert_eq!(deadline["name"], "approval");
    assert_eq!(deadline["service"], "order");
    rt.stop().await;
}

/// B8: a deadline that fell due while the runtime was down fires at once after the restart,
/// with no poke from outside. Time is a manual clock: no test waits ten seconds.
async fn a_deadline_due_during_downtime_fires_after_restart(backend: Backend) {
    let start = saga_runtime::storage::millis(std::time::SystemTime::now());
    let rt = TestRuntime::start_with(backend, &["order", "point"], |o| {
        o.clock = ManualClock::starting_at(start);
    })
    .await;
    let id = place(&rt, "ivy", 500).await;
    let deadline = deadline_of(&rt, &id).await;
    assert_eq!(deadline["status"], "PENDING");
    assert_eq!(
        deadline["dueMs"],
        start + 10_000,
        "the order service's 10 s default"
    );

    let later: Arc<ManualClock> = ManualClock::starting_at(start + 60_000);
    let rt = rt.restart(|o| o.clock = later.clone()).await;
    let order = order_status(&rt, &id, "REJECTED").await;
    assert_eq!(order["reason"], "deadline exceeded");
    assert_eq!(deadline_of(&rt, &id).await["status"], "FIRED");
    rt.stop().await;
}

on_both_backends!(
    an_order_is_rejected_by_its_deadline_and_compensated_when_exchange_returns,
    an_approved_order_cancels_its_deadline,
    a_deadline_due_during_downtime_fires_after_restart,
);
