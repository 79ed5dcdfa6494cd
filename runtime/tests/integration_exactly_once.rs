//! At-least-once delivery, exactly-once effects: a redelivered event and a relay that crashes
//! between the Kafka commit and deleting its outbox rows are both absorbed by the inbox; a
//! compensation delivered twice, or ahead of its step, is settled by the compensation ledger.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use common::{eventually, order_status, produce_event, Backend, TestRuntime};
use saga_runtime::relay::Faults;
use saga_runtime::stats::Stats;
use saga_runtime::storage::inbox;
use serde_json::json;

/// The same event (same `ce_id`) delivered twice deducts points once.
async fn a_redelivered_event_is_applied_once(backend: Backend) {
    let rt = TestRuntime::start(backend, &["point"]).await;
    rt.post("/points", json!({"userId": "dave", "point": 1000}))
        .await;
    let step = json!({"orderId": "o-1", "holderId": "dave", "point": 300});
    for _ in 0..2 {
        produce_event(
            rt.prefix(),
            "exchange",
            "evt-1",
            "ExchangeSucceeded",
            "o-1",
            &step,
        )
        .await;
    }
    // A later, different event of the same partition (same key) proves both copies were handled.
    let marker = json!({"orderId": "o-1", "holderId": "nobody", "point": 1});
    produce_event(
        rt.prefix(),
        "exchange",
        "evt-2",
        "Unrelated",
        "o-1",
        &marker,
    )
    .await;
    handled(&rt, 2, |s| &s.duplicates, 1).await;
    assert_eq!(rt.get("/points/dave").await["point"], 700);
    assert_eq!(rt.get("/transactions").await.as_array().unwrap().len(), 1);
    let (outcome, _) = inbox::outcome(rt.handle.db(), "point", "evt-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, "applied");
    // B9: the timeline shows the second delivery as a duplicate of the applied one.
    let t = common::timeline(&rt, "o-1").await;
    let mut seen: Vec<(&str, &str)> = t
        .iter()
        .filter(|h| h.event_type == "ExchangeSucceeded")
        .map(|h| (h.outcome.as_str(), h.service.as_str()))
        .collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        [("applied", "point"), ("duplicate", "point")],
        "{t:?}"
    );
    rt.stop().await;
}

/// Two copies of one event and a later event of its saga, published in one Kafka transaction
/// so that the consumer sees them at once and the worker takes them as one batch: the first
/// copy and the later event applied, the second a duplicate. The batch is first committed
/// without a savepoint per event. On SQLite the second copy is found a duplicate only when its
/// inbox row is written, so that attempt is undone and the batch committed again with a
/// savepoint per event. On PostgreSQL the batch checks reads in memory first
/// (`state::Staged`): the copy read what the first copy wrote, so it is deferred with nothing
/// written for it, and the next round's door finds it a duplicate; the first round, all saga
/// steps, ends in one statement without a transaction (the worker's `Isolation::Alone`), and
/// no such end had to be undone.
async fn copies_of_an_event_in_one_batch_are_applied_once(backend: Backend) {
    let rt = TestRuntime::start(backend, &["point"]).await;
    rt.post("/points", json!({"userId": "frank", "point": 1000}))
        .await;
    let step = json!({"orderId": "o-3", "holderId": "frank", "point": 300});
    let marker = json!({"orderId": "o-3", "holderId": "nobody", "point": 1});
    let events = [
        ("evt-1", "ExchangeSucceeded", "o-3", &step),
        ("evt-1", "ExchangeSucceeded", "o-3", &step),
        ("evt-2", "Unrelated", "o-3", &marker),
    ];
    produce_in_one_transaction(rt.prefix(), "exchange", &events).await;
    handled(&rt, 2, |s| &s.duplicates, 1).await;
    assert_eq!(rt.get("/points/frank").await["point"], 700);
    assert_eq!(rt.get("/transactions").await.as_array().unwrap().len(), 1);
    let stats = rt.handle.stats();
    let (recommits, conflicts) = (Stats::get(&stats.recommits), Stats::get(&stats.conflicts));
    match backend {
        Backend::Sqlite => assert_eq!(
            recommits, 1,
            "the batch was committed again with savepoints once"
        ),
        Backend::Postgres => {
            assert_eq!(
                (recommits, conflicts),
                (0, 1),
                "the copy was deferred by its reads, nothing undone"
            );
            let alone = Stats::get(&stats.ends_alone);
            assert!(alone >= 1, "{alone} batches ended in one statement");
            assert_eq!(Stats::get(&stats.ends_undone), 0);
        }
    }
    rt.stop().await;
}

/// A conflict defers only what depends on it. Four events of one partition in one batch: a
/// deduction from gus for o-a; a second one from gus for o-b, which read the balance the first
/// wrote (a conflict: deferred, run again on fresh state); one from hal for o-c, which shares
/// no saga and no state key with it and commits in the first round; and a later event of
/// o-b's saga, which waits for it (per-saga order). Before, every event behind a conflict in
/// its partition was deferred: three instead of two. Chaining is off: it would run o-b's
/// deduction again before the commit (the next test); the rounds remain for conflicts with
/// other instances and for re-runs that fail.
async fn a_conflict_defers_only_what_depends_on_it(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["point"], unchained).await;
    two_deductions_of_gus_one_of_hal(&rt).await;
    handled(&rt, 4, |s| &s.conflicts, 1).await;
    assert_eq!(rt.get("/points/gus").await["point"], 700);
    assert_eq!(rt.get("/points/hal").await["point"], 700);
    let deferred = Stats::get(&rt.handle.stats().deferred);
    assert_eq!(
        deferred, 2,
        "the conflicting event and the later event of its saga, not hal's"
    );
    rt.stop().await;
}

/// The same four events with chaining on (the default): o-b's deduction, which read the
/// balance o-a's writes, is run again before the commit on that write, so the whole batch
/// commits in its first round — no conflict, nothing deferred, and on SQLite no second
/// attempt with savepoints. Before, o-b's deduction and the later event of its saga waited
/// for a second round.
async fn an_event_reading_an_earlier_ones_write_is_chained_on_it(backend: Backend) {
    let rt = TestRuntime::start(backend, &["point"]).await;
    two_deductions_of_gus_one_of_hal(&rt).await;
    handled(&rt, 4, |s| &s.chained, 1).await;
    assert_eq!(rt.get("/points/gus").await["point"], 700);
    assert_eq!(rt.get("/points/hal").await["point"], 700);
    let stats = rt.handle.stats();
    let counts = [&stats.conflicts, &stats.deferred, &stats.recommits].map(Stats::get);
    assert_eq!(counts, [0, 0, 0], "conflicts, deferred, recommits");
    rt.stop().await;
}

/// Chaining across partitions: 48 deductions in one batch, two per user, each user's two in
/// different partitions of four. On PostgreSQL a batch this size is committed in two
/// transactions side by side; partitions whose events touch a key in common now share one, so
/// the second deduction of each user is chained on the first wherever it was consumed. Before,
/// the second met the first as a conflict (within a transaction or across the two).
async fn deductions_of_one_user_across_partitions_meet_no_conflict(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["point"], |o| o.config.kafka.partitions = 4).await;
    let users: Vec<String> = (0..24).map(|u| format!("user-{u:02}")).collect();
    for user in &users {
        rt.post("/points", json!({"userId": user, "point": 1000}))
            .await;
    }
    let steps: Vec<(i32, String, String, serde_json::Value)> = (0..48)
        .map(|i| {
            let (u, round) = (i % 24, i / 24);
            let order = format!("o-{i:02}");
            let data = json!({"orderId": order, "holderId": users[u], "point": 100});
            (
                (u as i32 + round as i32) % 4,
                format!("e-{i:02}"),
                order,
                data,
            )
        })
        .collect();
    let events: Vec<_> = steps
        .iter()
        .map(|(p, id, order, data)| (*p, id.as_str(), "ExchangeSucceeded", order.as_str(), data))
        .collect();
    produce_to_partitions(rt.prefix(), "exchange", &events).await;
    eventually("every deduction to be applied", || async {
        match Stats::get(&rt.handle.stats().applied) {
            48 => Ok(()),
            n => Err(format!("{n} applied")),
        }
    })
    .await;
    for user in &users {
        assert_eq!(
            rt.get(&format!("/points/{user}")).await["point"],
            800,
            "{user}"
        );
    }
    assert_eq!(Stats::get(&rt.handle.stats().conflicts), 0);
    rt.stop().await;
}

/// The four events of the two tests before, in one batch (one Kafka transaction, one
/// partition): gus (1000 points) gives 100 for o-a and 200 for o-b, hal (1000) 300 for o-c,
/// then a later event of o-b's saga that deducts nothing.
async fn two_deductions_of_gus_one_of_hal(rt: &TestRuntime) {
    for user in ["gus", "hal"] {
        rt.post("/points", json!({"userId": user, "point": 1000}))
            .await;
    }
    let step = |order: &str, user: &str, point: i64| json!({"orderId": order, "holderId": user, "point": point});
    let (a, b, c) = (
        step("o-a", "gus", 100),
        step("o-b", "gus", 200),
        step("o-c", "hal", 300),
    );
    let marker = step("o-b", "nobody", 1);
    let events = [
        ("e-a", "ExchangeSucceeded", "o-a", &a),
        ("e-b", "ExchangeSucceeded", "o-b", &b),
        ("e-c", "ExchangeSucceeded", "o-c", &c),
        ("e-d", "Unrelated", "o-b", &marker),
    ];
    produce_in_one_transaction(rt.prefix(), "exchange", &events).await;
}

/// The worker's chaining off (`worker.chain`), for the tests of the rounds it spares.
fn unchained(o: &mut saga_runtime::node::Options) {
    o.config.worker.chain = false;
}

/// A conflict in front of an event that holds its partition: three charges of one partition in
/// one batch — ann's for o-a; ann's for o-b, which read the balance o-a's wrote (a conflict:
/// deferred); and slow-bob's for o-c, independent of it but asking to be retried (the payment
/// subscription is blocking), which holds the partition and rewinds it to itself. The charge
/// behind the conflict waits for the deferred one instead of holding the partition ahead of
/// it: o-b's charge is not skipped, and o-c's is made once its retries succeed. Chaining is
/// off, as in the test before.
async fn a_hold_never_skips_an_event_deferred_before_it(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["payment"], unchained).await;
    let shop = common::shop::Shop::of(&rt);
    shop.fund("ann", 1000).await;
    shop.fund("slow-bob", 1000).await;
    let charge = |order: &str, customer: &str, amount: i64| json!({"orderId": order, "customerId": customer, "amount": amount});
    let (a, b, c) = (
        charge("o-a", "ann", 100),
        charge("o-b", "ann", 200),
        charge("o-c", "slow-bob", 300),
    );
    let events = [
        ("p-a", "PaymentRequested", "o-a", &a),
        ("p-b", "PaymentRequested", "o-b", &b),
        ("p-c", "PaymentRequested", "o-c", &c),
    ];
    produce_in_one_transaction(rt.prefix(), "payment", &events).await;
    eventually("every charge to be made", || async {
        let balances = (shop.balance("ann").await, shop.balance("slow-bob").await);
        if balances == (700, 700) {
            Ok(())
        } else {
            Err(format!("ann and slow-bob have {balances:?}"))
        }
    })
    .await;
    let conflicts = Stats::get(&rt.handle.stats().conflicts);
    assert!(conflicts >= 1, "o-b's charge met o-a's write");
    rt.stop().await;
}

/// CloudEvents `(id, type, saga, data)`, each with subject and key its saga, emitted now, to
/// partition 0 of `topic` in one Kafka transaction.
async fn produce_in_one_transaction(
    prefix: &str,
    topic: &str,
    events: &[(&str, &str, &str, &serde_json::Value)],
) {
    let events: Vec<_> = events
        .iter()
        .map(|&(id, t, saga, data)| (0, id, t, saga, data))
        .collect();
    produce_to_partitions(prefix, topic, &events).await;
}

/// CloudEvents `(partition, id, type, saga, data)`, each with subject and key its saga, emitted
/// now, to `topic` in one Kafka transaction.
async fn produce_to_partitions(
    prefix: &str,
    topic: &str,
    events: &[(i32, &str, &str, &str, &serde_json::Value)],
) {
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
    use std::time::Duration;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("transactional.id", format!("test-{}", uuid::Uuid::new_v4()))
        .create()
        .unwrap();
    let wait = Duration::from_secs(10);
    producer.init_transactions(wait).unwrap();
    producer.begin_transaction().unwrap();
    let topic = format!("{prefix}{topic}");
    // Emitted now (a `slow-` payment account asks to be retried until 1.5 s after this).
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    for (partition, id, event_type, saga, data) in events {
        let mut headers = common::cloudevent_headers(id, event_type, saga).to_vec();
        headers.push(("ce_time", &now));
        let headers = common::owned_headers(&headers);
        let payload = serde_json::to_vec(data).unwrap();
        let record = FutureRecord::to(&topic)
            .key(*saga)
            .partition(*partition)
            .payload(&payload)
            .headers(headers);
        producer.send(record, wait).await.unwrap();
    }
    producer.commit_transaction(wait).unwrap();
}

/// B4: a compensation delivered twice as two distinct events (different ids, so the inbox
/// cannot tell) refunds once: the host's compensation ledger applies the first and records the
/// second as ignored. (The point guest has no "already refunded?" check of its own.)
async fn a_compensation_delivered_twice_refunds_once(backend: Backend) {
    let rt = TestRuntime::start(backend, &["point"]).await;
    rt.post("/points", json!({"userId": "kim", "point": 1000}))
        .await;
    let step = json!({"orderId": "o-9", "holderId": "kim", "point": 300});
    let events = [
        ("use-1", "ExchangeSucceeded"),
        ("undo-1", "ExchangeCancelled"),
        ("undo-2", "ExchangeCancelled"),
    ];
    for (id, kind) in events {
        produce_event(rt.prefix(), "exchange", id, kind, "o-9", &step).await;
    }
    handled(&rt, 2, |s| &s.ignored, 1).await;
    assert_eq!(
        rt.get("/points/kim").await["point"],
        1000,
        "refunded exactly once"
    );
    assert_outcome(&rt, "undo-1", "compensated", None).await;
    assert_outcome(
        &rt,
        "undo-2",
        "ignored",
        Some("already compensated here by event undo-1"),
    )
    .await;
    rt.stop().await;
}

/// B2: a compensation that arrives before its forward step leaves a tombstone; the late step is
/// recorded as ignored and deducts nothing.
async fn a_step_after_its_compensation_is_ignored(backend: Backend) {
    let rt = TestRuntime::start(backend, &["point"]).await;
    rt.post("/points", json!({"userId": "lou", "point": 1000}))
        .await;
    let step = json!({"orderId": "o-7", "holderId": "lou", "point": 300});
    for (id, kind) in [
        ("undo-7", "ExchangeCancelled"),
        ("use-7", "ExchangeSucceeded"),
    ] {
        produce_event(rt.prefix(), "exchange", id, kind, "o-7", &step).await;
    }
    handled(&rt, 1, |s| &s.ignored, 1).await;
    assert_eq!(
        rt.get("/points/lou").await["point"],
        1000,
        "nothing deducted"
    );
    assert_eq!(rt.get("/transactions").await, json!([]));
    assert_outcome(&rt, "undo-7", "compensated", Some("tombstone")).await;
    assert_outcome(
        &rt,
        "use-7",
        "ignored",
        Some("compensated here by event undo-7"),
    )
    .await;
    rt.stop().await;
}

/// Wait until the runtime has applied `applied` events and counted `n` in `other` (ignored,
/// duplicates, …).
async fn handled(
    rt: &TestRuntime,
    applied: u64,
    other: fn(&Stats) -> &std::sync::atomic::AtomicU64,
    n: u64,
) {
    eventually("the events to be handled", || async {
        let stats = rt.handle.stats();
        let seen = (Stats::get(&stats.applied), Stats::get(other(stats)));
        if seen == (applied, n) {
            Ok(())
        } else {
            Err(format!("applied and the other count = {seen:?}"))
        }
    })
    .await;
}

/// The point service's recorded outcome of `event_id`, with a detail containing `detail`.
async fn assert_outcome(rt: &TestRuntime, event_id: &str, want: &str, detail: Option<&str>) {
    let (outcome, got) = inbox::outcome(rt.handle.db(), "point", event_id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{event_id} not in the inbox"));
    assert_eq!(outcome, want, "{event_id}: {got:?}");
    match detail {
        Some(d) => assert!(
            got.as_deref().is_some_and(|g| g.contains(d)),
            "{event_id}: detail {got:?} lacks {d:?}"
        ),
        None => assert_eq!(got, None, "{event_id}"),
    }
}

/// "Crashes" every batch right after its Kafka commit the first time any of its rows is
/// published, as if the process died before deleting them: every row goes out at least twice.
#[derive(Default)]
struct CrashAfterFirstCommit {
    crashed: Mutex<HashSet<i64>>,
}

impl Faults for CrashAfterFirstCommit {
    fn after_commit(&self, ids: &[i64]) -> Result<(), String> {
        let mut crashed = self.crashed.lock().unwrap();
        if ids.iter().all(|id| crashed.contains(id)) {
            return Ok(());
        }
        crashed.extend(ids);
        Err(format!("simulated crash after committing rows {ids:?}"))
    }
}

/// A relay that dies between the Kafka commit and marking rows sent republishes them; the
/// consumers' inboxes absorb the copies and the saga ends exactly as without the crash.
async fn a_relay_crash_after_commit_republishes_and_the_inbox_absorbs_it(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["order", "point", "exchange"], |o| {
        o.relay_faults = Arc::new(CrashAfterFirstCommit::default());
    })
    .await;
    rt.post("/points", json!({"userId": "erin", "point": 10000}))
        .await;
    let (_, order) = rt
        .post(
            "/orders",
            json!({"holderId": "erin", "currencyId": 1, "amount": 500}),
        )
        .await;
    let id = order["id"].as_str().unwrap().to_string();
    order_status(&rt, &id, "APPROVED").await;
    let stats = rt.handle.stats();
    // OrderCreated, ExchangeSucceeded, PointUsed, OrderApproved: 4 events, each consumed by
    // one service, each published (at least) twice.
    eventually("every republished copy to be absorbed", || async {
        let dups = Stats::get(&stats.duplicates);
        if dups >= 4 {
            Ok(())
        } else {
            Err(format!("duplicates absorbed: {dups}"))
        }
    })
    .await;
    // The relay counts a batch as published after it rings the consumers' doorbell, so the
    // count can trail the copies absorbed for a moment.
    eventually(
        "every row to be counted published, copies included",
        || async {
            let published = Stats::get(&stats.published);
            if published >= 7 {
                Ok(())
            } else {
                Err(format!("published {published}"))
            }
        },
    )
    .await;
    assert_eq!(rt.get("/points/erin").await["point"], 9500);
    assert_eq!(rt.get("/exchanges").await.as_array().unwrap().len(), 1);
    assert_eq!(rt.get("/transactions").await.as_array().unwrap().len(), 1);
    eventually("the outbox to drain", || async {
        let left = saga_runtime::storage::outbox::len(rt.handle.db())
            .await
            .unwrap();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} rows left"))
        }
    })
    .await;
    rt.stop().await;
}

on_both_backends!(
    a_step_after_its_compensation_is_ignored,
    a_redelivered_event_is_applied_once,
    copies_of_an_event_in_one_batch_are_applied_once,
    a_conflict_defers_only_what_depends_on_it,
    an_event_reading_an_earlier_ones_write_is_chained_on_it,
    deductions_of_one_user_across_partitions_meet_no_conflict,
    a_hold_never_skips_an_event_deferred_before_it,
    a_compensation_delivered_twice_refunds_once,
    a_relay_crash_after_commit_republishes_and_the_inbox_absorbs_it,
);
