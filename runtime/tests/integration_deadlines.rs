//! Host-owned deadlines (SPEC B1, B3, B7.3, B8) on the real runtime, broker and both databases.

mod common;

use std::sync::Arc;

use common::{guest, order_status, timeline, timeline_has, Backend, TestRuntime};
use saga_runtime::clock::ManualClock;
use saga_runtime::stats::Stats;
use serde_json::{json, Value};

async fn deadline_of(rt: &TestRuntime, saga: &str) -> Value {
    let all = rt.get("/deadlines").await;
    all.as_array()
        .unwrap()
        .iter()
        .find(|d| d["saga"] == saga)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn place(rt: &TestRuntime, user: &str, amount: i64, currency: i64) -> String {
    rt.post("/points", json!({"userId": user, "point": 10000}))
        .await;
    let (status, order) = rt
        .post(
            "/orders",
            json!({"holderId": user, "currencyId": currency, "amount": amount}),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    order["id"].as_str().unwrap().to_string()
}

/// What a saga rejected by its deadline shows once exchange has seen it: the deadline applied
/// by order, the step expired at exchange, the compensation applied there (a tombstone: its
/// step never applied, so a later copy of the step would be ignored).
const REJECTED_BY_DEADLINE: &[(&str, &str, &str)] = &[
    ("order", "DeadlineExpired", "applied"),
    ("exchange", "OrderCreated", "expired"),
    ("exchange", "OrderRejected", "compensated"),
];

/// The end state every rejected-by-deadline scenario must reach: REJECTED for the deadline,
/// points where they were, no exchange, no deduction left standing.
async fn assert_rejected_by_deadline_and_untouched(rt: &TestRuntime, id: &str, user: &str) {
    let order = order_status(rt, id, "REJECTED").await;
    assert_eq!(order["reason"], "deadline exceeded", "{order}");
    assert_eq!(rt.get(&format!("/points/{user}")).await["point"], 10000);
    let exchanges = rt.get("/exchanges").await;
    assert!(
        !exchanges
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["orderId"] == id),
        "{exchanges}"
    );
    // Points are where they were, so nothing was refunded twice; a deduction, if the late step
    // got through, was refunded.
    let txs = rt.get("/transactions").await;
    let unrefunded = txs
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["orderId"] == id && t["status"] != "REFUNDED")
        .count();
    assert_eq!(unrefunded, 0, "{txs}");
    assert_eq!(deadline_of(rt, id).await["status"], "FIRED");
}

/// B7.3: exchange is down while an order is placed → the deadline rejects the order. When
/// exchange comes back, the expired OrderCreated is not applied and the OrderRejected
/// compensation finds nothing to undo: points where they were, no exchange.
async fn an_order_is_rejected_by_its_deadline_while_exchange_is_down(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["order", "point"], |o| {
        o.config.saga_deadlines.insert("order".into(), 500);
    })
    .await;
    let id = place(&rt, "gus", 500, 1).await;
    assert_eq!(deadline_of(&rt, &id).await["status"], "PENDING");
    let order = order_status(&rt, &id, "REJECTED").await;
    assert_eq!(order["reason"], "deadline exceeded", "{order}");

    // Exchange comes back and works through the backlog.
    rt.handle.install(guest("exchange")).await.unwrap();
    timeline_has(&rt, &id, REJECTED_BY_DEADLINE).await;
    assert_rejected_by_deadline_and_untouched(&rt, &id, "gus").await;

    // B9 through the CLI: `runtime trace` against the running instance.
    let (ok, printed, stderr) = common::run_cli(&["trace", &id, "--runtime", &rt.base], &[]).await;
    assert!(ok, "{stderr}");
    assert!(
        printed.contains("DeadlineExpired") && printed.contains("expired"),
        "{printed}"
    );
    assert!(
        printed.contains("deadline order/approval") && printed.contains("FIRED"),
        "{printed}"
    );
    rt.stop().await;
}

/// B7.4 (`currencyId=100`): the exchange step takes longer than the deadline. The order is
/// rejected by the deadline and the late step is ignored.
async fn a_step_slower_than_the_deadline_is_ignored(backend: Backend) {
    slow_step_scenario(backend, 100, "hank").await
}

/// B7.5 (`currencyId=200`): the step passes the expiry check at the door, then commits after
/// the deadline fired. The in-commit check stops it; the end state is consistent.
async fn a_step_that_slips_past_the_door_check_cannot_commit(backend: Backend) {
    slow_step_scenario(backend, 200, "iris").await
}

async fn slow_step_scenario(backend: Backend, currency: i64, user: &str) {
    // Ample for a step to reach a live consumer; the injected delays are relative to it.
    let rt = TestRuntime::start_with(backend, &["order", "point", "exchange"], |o| {
        o.config.saga_deadlines.insert("order".into(), 3_000);
    })
    .await;
    // Ready means exchange's consumer reads its partitions, so the slow order's OrderCreated
    // reaches exchange before its deadline and passes the door check.
    rt.ready().await;
    let id = place(&rt, user, 500, currency).await;
    // Both compensations done: order took the deadline, exchange handled OrderRejected (which
    // follows OrderCreated in its partition).
    timeline_has(
        &rt,
        &id,
        &[
            ("order", "DeadlineExpired", "applied"),
            ("exchange", "OrderRejected", "compensated"),
        ],
    )
    .await;
    // Normally the in-commit check stops the late step (`expired`). If the deadline fired late
    // on a loaded machine the step may have committed first; then it is compensated, and the
    // end state must be the same. Wait for point to finish that path too.
    let path = timeline(&rt, &id).await;
    let created = path
        .iter()
        .find(|h| h.service == "exchange" && h.event_type == "OrderCreated" && !h.is_attempt())
        .map(|h| h.outcome.clone())
        .unwrap();
    if created == "applied" {
        timeline_has(&rt, &id, &[("point", "ExchangeCancelled", "compensated")]).await;
    }
    eprintln!("exchange's late step was {created}: {path:?}");
    // B9: the retries of the slow step are on the timeline, counted.
    assert!(
        path.iter().any(|h| h.service == "exchange"
            && h.event_type == "OrderCreated"
            && h.outcome == "failed"),
        "{path:?}"
    );
    assert_rejected_by_deadline_and_untouched(&rt, &id, user).await;
    rt.stop().await;
}

/// An order approved in time cancels its deadline, which then never fires.
async fn an_approved_order_cancels_its_deadline(backend: Backend) {
    let rt = TestRuntime::start(backend, &["order", "point", "exchange"]).await;
    let id = place(&rt, "hal", 500, 1).await;
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
        o.config.saga_deadlines.clear(); // the service's own default
    })
    .await;
    let id = place(&rt, "ivy", 500, 1).await;
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

/// With two instances on one database, both schedulers see every deadline and race for it;
/// each deadline is claimed, and fired, exactly once.
async fn each_deadline_fires_once_across_two_instances(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["order"], |o| {
        o.config.saga_deadlines.insert("order".into(), 300);
    })
    .await;
    let other = rt.sibling(|_| {}).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (status, order) = rt
            .post(
                "/orders",
                json!({"holderId": "jo", "currencyId": 1, "amount": 5}),
            )
            .await;
        assert_eq!(status, 201, "{order}");
        ids.push(order["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let order = order_status(&rt, id, "REJECTED").await;
        assert_eq!(order["reason"], "deadline exceeded", "{order}");
        assert_eq!(deadline_of(&rt, id).await["status"], "FIRED");
    }
    let fired = [&rt.handle, &other].map(|h| Stats::get(&h.stats().deadlines_fired));
    assert_eq!(
        fired.iter().sum::<u64>(),
        20,
        "fired per instance: {fired:?}"
    );
    for id in &ids {
        let expiries = timeline(&rt, id)
            .await
            .into_iter()
            .filter(|h| h.event_type == "DeadlineExpired" && !h.is_attempt())
            .count();
        assert_eq!(expiries, 1, "saga {id}");
    }
    other.shutdown().await;
    rt.stop().await;
}

/// A7 (blocking strategy): exchange's subscription is blocking, and a `currencyId=100` step
/// keeps failing until past its deadline. That holds its partition only: orders whose events
/// are on exchange's other partition are approved meanwhile, those behind it wait (and here
/// are rejected by their deadlines), and every saga ends consistent.
async fn a_blocked_step_holds_its_partition_not_its_service(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["order", "point", "exchange"], |o| {
        o.config.saga_deadlines.insert("order".into(), 5_000);
    })
    .await;
    rt.ready().await;
    let slow = place(&rt, "slow", 500, 100).await;
    common::eventually("exchange to fail the slow step", || async {
        match Stats::get(&rt.handle.stats().failures) {
            0 => Err("no failure yet".to_string()),
            _ => Ok(()),
        }
    })
    .await;
    rt.post("/points", json!({"userId": "busy", "point": 10000}))
        .await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let body = json!({"holderId": "busy", "currencyId": 1, "amount": 10});
        let (status, order) = rt.post("/orders", body).await;
        assert_eq!(status, 201, "{order}");
        ids.push(order["id"].as_str().unwrap().to_string());
    }
    let status = |order: &Value| order["status"].as_str().unwrap_or("").to_string();
    common::eventually("an order on the free partition to be approved", || async {
        for id in &ids {
            if status(&rt.get(&format!("/orders/{id}")).await) == "APPROVED" {
                return Ok(());
            }
        }
        Err("none approved".to_string())
    })
    .await;
    let still = rt.get(&format!("/orders/{slow}")).await;
    assert_eq!(
        status(&still),
        "PENDING",
        "the slow step is still being retried: {still}"
    );

    // The end: the slow saga rejected by its deadline, untouched; every other one approved or
    // rejected by its deadline, and only the approved ones spent points.
    assert_rejected_by_deadline_and_untouched(&rt, &slow, "slow").await;
    let mut approved = 0;
    for id in &ids {
        let order = common::eventually("each order to settle", || async {
            let order = rt.get(&format!("/orders/{id}")).await;
            match status(&order).as_str() {
                "APPROVED" | "REJECTED" => Ok(order),
                _ => Err(order.to_string()),
            }
        })
        .await;
        if status(&order) == "APPROVED" {
            approved += 1;
        } else {
            assert_eq!(order["reason"], "deadline exceeded", "{order}");
        }
    }
    // A rejected saga whose step got through before its deadline is compensated along the
    // chain (exchange, then point): wait for the refunds to arrive.
    let want = 10000 - 10 * approved;
    common::eventually("only approved orders to have spent points", || async {
        match rt.get("/points/busy").await["point"].as_i64() {
            Some(p) if p == want => Ok(()),
            other => Err(format!("{other:?}, want {want}")),
        }
    })
    .await;
    let txs = rt.get("/transactions").await;
    let used = txs
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["userId"] == "busy" && t["status"] == "USED")
        .count();
    assert_eq!(used, approved as usize, "{txs}");
    rt.stop().await;
}

on_both_backends!(
    a_blocked_step_holds_its_partition_not_its_service,
    each_deadline_fires_once_across_two_instances,
    an_order_is_rejected_by_its_deadline_while_exchange_is_down,
    a_step_slower_than_the_deadline_is_ignored,
    a_step_that_slips_past_the_door_check_cannot_commit,
    an_approved_order_cancels_its_deadline,
    a_deadline_due_during_downtime_fires_after_restart,
);
