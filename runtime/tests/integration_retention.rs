//! Retention (issue 11, item 7): what grows per event or saga is deleted by the background
//! clean-up once older than its `[retention]` age — inbox entries, saga expiry and ledger rows,
//! fired and cancelled deadlines, attempts on timelines, idempotency replies, the leases of
//! stopped instances, state tombstones — while recent rows and the services' own state stay.
//! Manual clock.

mod common;

use common::{eventually, order_status, Backend, TestRuntime};
use saga_runtime::clock::ManualClock;
use saga_runtime::storage::Db;
use serde_json::json;

const DAY: i64 = 24 * 3600 * 1000;

async fn count(db: &Db, table: &str) -> i64 {
    saga_runtime::storage::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(db.pool())
        .await
        .unwrap()
}

const GROWING: &[&str] = &[
    "inbox",
    "sagas",
    "saga_ledger",
    "deadlines",
    "idempotency_keys",
];

async fn old_rows_are_cleaned_up_and_recent_ones_kept(backend: Backend) {
    let clock = ManualClock::starting_at(1_800_000_000_000);
    let rt = TestRuntime::start_with(backend, &["order", "point", "exchange"], |o| {
        o.clock = clock.clone();
        o.config.retention.interval_ms = 20;
    })
    .await;
    let db = rt.handle.db().clone();
    rt.post("/points", json!({"userId": "old", "point": 10000}))
        .await;
    let resp = rt
        .http
        .post(format!("{}/orders", rt.base))
        .header("idempotency-key", "old-order")
        .json(&json!({"holderId": "old", "currencyId": 1, "amount": 500}))
        .send()
        .await
        .unwrap();
    let order: serde_json::Value = resp.json().await.unwrap();
    let id = order["id"].as_str().unwrap();
    order_status(&rt, id, "APPROVED").await;
    // The saga's last event, so nothing of it is written after the clock moves.
    common::timeline_has(&rt, id, &[("exchange", "OrderApproved", "*")]).await;
    for table in GROWING {
        assert!(count(&db, table).await > 0, "{table} has rows to clean");
    }
    saga_runtime::storage::query(
        "INSERT INTO leases (name, holder, expires_ms) VALUES ('member/gone', 'gone', 0)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    // A deleted key's tombstone written now, and one written just before the clock's new time.
    for (key, touched) in [("user/deleted", 0), ("user/deleted-late", 9 * DAY - 1000)] {
        saga_runtime::storage::query(
            "INSERT INTO state (service, key, value, version, valueless_ms) \
             VALUES ('point', $1, NULL, 4, $2)",
        )
        .bind(key)
        .bind(1_800_000_000_000 + touched)
        .execute(db.pool())
        .await
        .unwrap();
    }

    clock.advance(9 * DAY);
    eventually("the old rows to be deleted", || async {
        let mut left = Vec::new();
        for table in GROWING {
            let n = count(&db, table).await;
            if n > 0 {
                left.push(format!("{table}: {n}"));
            }
        }
        let gone: i64 = saga_runtime::storage::query_scalar(
            "SELECT COUNT(*) FROM leases WHERE name = 'member/gone'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if gone > 0 {
            left.push("the stopped instance's lease".into());
        }
        let tombstone: i64 = saga_runtime::storage::query_scalar(
            "SELECT COUNT(*) FROM state WHERE key = 'user/deleted'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if tombstone > 0 {
            left.push("the old tombstone".into());
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join(", "))
        }
    })
    .await;
    assert_eq!(rt.get("/points/old").await["point"], 9500, "state is kept");
    let late: i64 = saga_runtime::storage::query_scalar(
        "SELECT COUNT(*) FROM state WHERE key = 'user/deleted-late'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(late, 1, "a recent tombstone is kept");
    assert!(
        count(&db, "leases").await > 0,
        "live leases are kept (this instance's)"
    );

    // A saga after the clean-up is kept, and works as before.
    rt.post("/points", json!({"userId": "new", "point": 10000}))
        .await;
    let (_, order) = rt
        .post(
            "/orders",
            json!({"holderId": "new", "currencyId": 1, "amount": 100}),
        )
        .await;
    order_status(&rt, order["id"].as_str().unwrap(), "APPROVED").await;
    assert!(count(&db, "inbox").await > 0, "recent inbox entries stay");
    rt.stop().await;
}

on_both_backends!(old_rows_are_cleaned_up_and_recent_ones_kept);
