//! Storage semantics the event path relies on, on SQLite and PostgreSQL: optimistic
//! concurrency (including delete-and-recreate and write skew), inbox dedup, outbox order, leases, saga expiry
//! and the compensation ledger.

mod common;

use common::{Backend, TestDb};
use std::time::Duration;

use saga_runtime::storage::ledger::{self, Verdict};
use saga_runtime::storage::recordings::{self, Recorded};
use saga_runtime::storage::{inbox, lease, outbox, sagas, state, Db, Error};
use saga_runtime::wasm::bindings::Write;
use saga_runtime::wasm::read_set;

async fn open(backend: Backend) -> (TestDb, Db) {
    let test_db = TestDb::new(backend).await;
    let db = Db::connect(&test_db.url, 4)
        .await
        .expect("connect and migrate");
    (test_db, db)
}

fn put(key: &str, value: &str) -> Write {
    Write {
        key: key.into(),
        value: Some(value.as_bytes().to_vec()),
    }
}

fn delete(key: &str) -> Write {
    Write {
        key: key.into(),
        value: None,
    }
}

async fn write(db: &Db, reads: &[(&str, i64)], writes: &[Write]) -> Result<(), Error> {
    let reads = read_set(reads.iter().map(|(k, v)| (k.to_string(), *v)));
    let mut tx = db.begin().await?;
    state::apply(&mut tx, "svc", &reads, writes, 0).await?;
    tx.commit().await?;
    Ok(())
}

/// Key `key` of service `svc` as stored: its value as text, and its version.
async fn stored(db: &Db, key: &str) -> (Option<String>, i64) {
    let v = state::get(db, "svc", key).await.unwrap();
    (v.value.map(|v| String::from_utf8(v).unwrap()), v.version)
}

/// Wait until exactly one connection to this test's database waits for a lock (`what`).
async fn one_waits_for_a_lock(db: &Db, what: &str) {
    common::eventually(what, || async {
        match lock_waiters(db).await {
            1 => Ok(()),
            n => Err(format!("{n} waiting")),
        }
    })
    .await;
}

/// Connections to this test's PostgreSQL database waiting for a lock now.
async fn lock_waiters(db: &Db) -> i64 {
    saga_runtime::storage::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap()
}

async fn a_write_based_on_a_stale_read_is_a_conflict(backend: Backend) {
    let (t, db) = open(backend).await;
    write(&db, &[("k", 0)], &[put("k", "1")]).await.unwrap();
    let seen = state::get(&db, "svc", "k").await.unwrap();
    assert_eq!((seen.value.as_deref(), seen.version), (Some(&b"1"[..]), 1));
    // Someone else writes after our read...
    write(&db, &[("k", 1)], &[put("k", "2")]).await.unwrap();
    // ...so our write, based on version 1, must not apply.
    let err = write(&db, &[("k", 1)], &[put("k", "mine")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    assert_eq!(
        state::get(&db, "svc", "k").await.unwrap().value.unwrap(),
        b"2"
    );
    // Two creators of one key: the second sees a conflict, not an overwrite.
    write(&db, &[("new", 0)], &[put("new", "a")]).await.unwrap();
    let err = write(&db, &[("new", 0)], &[put("new", "b")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }));
    t.drop_db().await;
}

async fn a_changed_key_that_was_only_read_is_a_conflict_too(backend: Backend) {
    let (t, db) = open(backend).await;
    write(&db, &[], &[put("balance", "10")]).await.unwrap();
    write(&db, &[], &[put("balance", "5")]).await.unwrap(); // version 2 now
    let err = write(&db, &[("balance", 1)], &[put("other", "x")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { ref key, .. } if key == "balance"));
    assert_eq!(
        state::get(&db, "svc", "other").await.unwrap().version,
        0,
        "nothing applied"
    );
    t.drop_db().await;
}

async fn a_deleted_and_recreated_key_still_conflicts(backend: Backend) {
    let (t, db) = open(backend).await;
    write(&db, &[], &[put("k", "v")]).await.unwrap();
    write(&db, &[("k", 1)], &[delete("k")]).await.unwrap();
    let gone = state::get(&db, "svc", "k").await.unwrap();
    assert_eq!((gone.value, gone.version), (None, 2));
    write(&db, &[("k", 2)], &[put("k", "again")]).await.unwrap();
    // A reader that saw the first incarnation (version 1) must not win.
    let err = write(&db, &[("k", 1)], &[put("k", "stale")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }));
    let listed = state::scan(&db, "svc", "k", None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    t.drop_db().await;
}

/// Retention deletes a tombstone (`retention.tombstones_ms`); a handler that read the deleted
/// key before that still conflicts, and the key reads as never written.
async fn a_handler_that_read_a_cleaned_tombstone_conflicts(backend: Backend) {
    let (t, db) = open(backend).await;
    write(&db, &[], &[put("k", "v")]).await.unwrap();
    write(&db, &[("k", 1)], &[delete("k")]).await.unwrap();
    saga_runtime::storage::query("DELETE FROM state WHERE key = 'k' AND value IS NULL")
        .execute(db.pool())
        .await
        .unwrap();
    let err = write(&db, &[("k", 2)], &[put("k", "stale")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err}");
    let fresh = state::get(&db, "svc", "k").await.unwrap();
    assert_eq!((fresh.value, fresh.version), (None, 0));
    write(&db, &[("k", 0)], &[put("k", "new")]).await.unwrap();
    t.drop_db().await;
}

async fn scan_lists_live_keys_of_a_prefix_in_order(backend: Backend) {
    let (t, db) = open(backend).await;
    let writes = [
        put("o/2", "b"),
        put("o/1", "a"),
        put("o/10", "c"),
        put("p/1", "x"),
        put("o_", "y"),
    ];
    write(&db, &[], &writes).await.unwrap();
    write(&db, &[], &[delete("o/10")]).await.unwrap();
    let keys: Vec<String> = state::scan(&db, "svc", "o/", None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["o/1", "o/2"]);
    assert_eq!(
        state::scan(&db, "other", "o/", None, 10)
            .await
            .unwrap()
            .len(),
        0,
        "services are apart"
    );
    t.drop_db().await;
}

/// A listing pages with the last key of one page as the cursor of the next: every live key
/// once, in order, however the pages fall (a deleted key and keys around the prefix included).
async fn a_scan_pages_from_a_cursor(backend: Backend) {
    let (t, db) = open(backend).await;
    let mut writes: Vec<_> = (0..25).map(|i| put(&format!("o/{i:02}"), "v")).collect();
    writes.extend([put("o", "before"), put("o0", "after"), put("n/9", "x")]);
    write(&db, &[], &writes).await.unwrap();
    write(&db, &[], &[delete("o/13")]).await.unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = state::scan(&db, "svc", "o/", after.as_deref(), 4)
            .await
            .unwrap();
        assert!(page.len() <= 4);
        seen.extend(page.iter().map(|(k, _)| k.clone()));
        match page.last() {
            Some((last, _)) if page.len() == 4 => after = Some(last.clone()),
            _ => break,
        }
    }
    let expected: Vec<String> = (0..25)
        .filter(|i| *i != 13)
        .map(|i| format!("o/{i:02}"))
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(
        state::scan(&db, "svc", "o/", Some("a"), 2).await.unwrap()[0].0,
        "o/00",
        "a cursor before the prefix starts at the prefix"
    );
    assert!(state::scan(&db, "svc", "o/", Some("o/24"), 10)
        .await
        .unwrap()
        .is_empty());
    t.drop_db().await;
}

async fn the_inbox_records_an_event_once(backend: Backend) {
    let (t, db) = open(backend).await;
    let entry = inbox::Entry {
        service: "svc",
        event_id: "e1",
        saga: "s",
        event_type: "T",
        topic: "t",
        outcome: inbox::Outcome::Applied,
        detail: None,
        version: "1",
        handled_ms: 1,
    };
    let mut tx = db.begin().await.unwrap();
    assert!(inbox::record(&mut tx, &entry, false).await.unwrap());
    assert!(!inbox::record(&mut tx, &entry, false).await.unwrap());
    assert!(
        !inbox::record(&mut tx, &entry, true).await.unwrap(),
        "a re-drive only replaces a dead-lettered record"
    );
    tx.commit().await.unwrap();
    let other_service = inbox::Entry {
        service: "svc2",
        ..entry.clone()
    };
    let mut tx = db.begin().await.unwrap();
    assert!(
        inbox::record(&mut tx, &other_service, false).await.unwrap(),
        "dedup is per service"
    );
    tx.commit().await.unwrap();
    let seen = door(&db, "svc", |ask| ask.events = &["e1", "e2"])
        .await
        .seen;
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [("e1".to_string(), "applied".to_string())]
    );
    t.drop_db().await;
}

/// A re-driven event replaces its dead-lettered record once; after that it is a duplicate.
async fn a_redrive_replaces_a_dead_letter_record_once(backend: Backend) {
    let (t, db) = open(backend).await;
    let dead = inbox::Entry {
        service: "svc",
        event_id: "e1",
        saga: "s",
        event_type: "T",
        topic: "t",
        outcome: inbox::Outcome::DeadLettered,
        detail: Some("insufficient funds"),
        version: "1",
        handled_ms: 1,
    };
    let applied = inbox::Entry {
        outcome: inbox::Outcome::Applied,
        detail: None,
        version: "2",
        handled_ms: 2,
        ..dead.clone()
    };
    let mut tx = db.begin().await.unwrap();
    assert!(inbox::record(&mut tx, &dead, false).await.unwrap());
    assert!(
        !inbox::record(&mut tx, &applied, false).await.unwrap(),
        "a plain redelivery of a dead-lettered event stays a duplicate"
    );
    assert!(inbox::record(&mut tx, &applied, true).await.unwrap());
    assert!(
        !inbox::record(&mut tx, &applied, true).await.unwrap(),
        "a second re-drive is a duplicate"
    );
    tx.commit().await.unwrap();
    let (outcome, _) = inbox::outcome(&db, "svc", "e1").await.unwrap().unwrap();
    assert_eq!(outcome, "applied");
    t.drop_db().await;
}

/// Relay slots: slot s of N gets exactly the rows whose key's bucket is s modulo N, in storage
/// order, so the slots together cover the outbox once and one key stays in one slot.
async fn each_relay_slot_gets_the_rows_of_its_keys(backend: Backend) {
    let (t, db) = open(backend).await;
    let mut tx = db.begin().await.unwrap();
    for i in 0..40 {
        let m = outbox::Message {
            event_id: format!("e{i}"),
            topic: "t".into(),
            key: format!("saga-{}", i % 10),
            headers: vec![],
            payload: vec![],
        };
        outbox::insert(&mut tx, &m, 0).await.unwrap();
    }
    tx.commit().await.unwrap();
    let mut seen = Vec::new();
    for slot in 0..3 {
        let rows = outbox::fetch(&db, slot, 3, 100).await.unwrap();
        assert!(rows.windows(2).all(|w| w[0].id < w[1].id), "storage order");
        for r in &rows {
            assert_eq!(
                outbox::bucket(&r.message.key) % 3,
                slot,
                "{}",
                r.message.key
            );
        }
        seen.extend(rows.into_iter().map(|r| r.message.event_id));
    }
    seen.sort();
    let mut all: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
    all.sort();
    assert_eq!(seen, all, "every row in exactly one slot");
    t.drop_db().await;
}

async fn the_outbox_returns_rows_in_storage_order(backend: Backend) {
    let (t, db) = open(backend).await;
    let mut tx = db.begin().await.unwrap();
    for i in 0..5 {
        let m = outbox::Message {
            event_id: format!("e{i}"),
            topic: "t".into(),
            key: "saga".into(),
            headers: vec![("ce_id".into(), format!("e{i}"))],
            payload: vec![i as u8],
        };
        outbox::insert(&mut tx, &m, 0).await.unwrap();
    }
    tx.commit().await.unwrap();
    let rows = outbox::fetch(&db, 0, 1, 3).await.unwrap();
    let ids: Vec<String> = rows.iter().map(|r| r.message.event_id.clone()).collect();
    assert_eq!(ids, ["e0", "e1", "e2"]);
    assert_eq!(
        rows[1].message.headers,
        vec![("ce_id".to_string(), "e1".to_string())]
    );
    outbox::delete(&db, &rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(outbox::len(&db).await.unwrap(), 2);
    t.drop_db().await;
}

/// The relay's round: the rows it last sent are marked (kept as published, or deleted with no
/// republish window) and the next waiting rows read, without the marked ones; other slots'
/// rows are neither marked nor read.
async fn the_relay_marks_its_last_batch_as_it_reads_the_next(backend: Backend) {
    let (t, db) = open(backend).await;
    let mut tx = db.begin().await.unwrap();
    let (mine, other) = ("saga-a", "saga-b");
    assert_ne!(
        outbox::bucket(mine) % 2,
        outbox::bucket(other) % 2,
        "two slots"
    );
    for i in 0..6 {
        let m = outbox::Message {
            event_id: format!("e{i}"),
            topic: "t".into(),
            key: if i == 5 { other } else { mine }.into(),
            headers: Vec::new(),
            payload: vec![i as u8],
        };
        outbox::insert(&mut tx, &m, 0).await.unwrap();
    }
    tx.commit().await.unwrap();
    let slot = (outbox::bucket(mine) % 2, 2);
    let names = |rows: &[outbox::Row]| -> Vec<String> {
        rows.iter().map(|r| r.message.event_id.clone()).collect()
    };
    let first = outbox::mark_and_fetch(&db, &[], Some(100), slot, 2)
        .await
        .unwrap();
    assert_eq!(names(&first), ["e0", "e1"]);
    let sent: Vec<i64> = first.iter().map(|r| r.id).collect();
    let second = outbox::mark_and_fetch(&db, &sent, Some(100), slot, 2)
        .await
        .unwrap();
    assert_eq!(
        names(&second),
        ["e2", "e3"],
        "the marked rows are not read again"
    );
    assert_eq!(
        outbox::len(&db).await.unwrap(),
        4,
        "e2–e5 wait; e0, e1 are kept, published"
    );
    let sent: Vec<i64> = second.iter().map(|r| r.id).collect();
    let third = outbox::mark_and_fetch(&db, &sent, None, slot, 2)
        .await
        .unwrap();
    assert_eq!(names(&third), ["e4"]);
    assert_eq!(
        outbox::len(&db).await.unwrap(),
        2,
        "e4 and the other slot's e5 wait"
    );
    assert_eq!(
        outbox::sweep(&db, slot.0, 2, 1_000).await.unwrap(),
        2,
        "e0 and e1 were kept as published; e2 and e3 were deleted"
    );
    let others = outbox::fetch(&db, (slot.0 + 1) % 2, 2, 10).await.unwrap();
    assert_eq!(names(&others), ["e5"]);
    t.drop_db().await;
}

/// Published rows stay, marked, until swept; `unpublish` puts those published since a moment
/// back in line (in their places: the relay takes them before newer rows), `sweep` deletes
/// the older ones.
async fn published_rows_wait_again_after_a_loss_and_are_swept_after_the_window(backend: Backend) {
    let (t, db) = open(backend).await;
    let mut tx = db.begin().await.unwrap();
    for i in 0..4 {
        let m = outbox::Message {
            event_id: format!("e{i}"),
            topic: "t".into(),
            key: "saga".into(),
            headers: Vec::new(),
            payload: Vec::new(),
        };
        outbox::insert(&mut tx, &m, 0).await.unwrap();
    }
    tx.commit().await.unwrap();
    let rows = outbox::fetch(&db, 0, 1, 10).await.unwrap();
    let id = |i: usize| rows[i].id;
    outbox::published(&db, &[id(0)], 100).await.unwrap();
    outbox::published(&db, &[id(1), id(2)], 200).await.unwrap();
    let waiting = |db: Db| async move {
        let rows = outbox::fetch(&db, 0, 1, 10).await.unwrap();
        rows.into_iter()
            .map(|r| r.message.event_id)
            .collect::<Vec<_>>()
    };
    assert_eq!(waiting(db.clone()).await, ["e3"]);
    assert_eq!(outbox::len(&db).await.unwrap(), 1);
    let other = (outbox::bucket("saga") + 1) % 2;
    assert_eq!(
        outbox::unpublish(&db, other, 2, 150).await.unwrap(),
        0,
        "another slot's"
    );
    assert_eq!(outbox::unpublish(&db, 0, 1, 150).await.unwrap(), 2);
    assert_eq!(
        waiting(db.clone()).await,
        ["e1", "e2", "e3"],
        "in their places"
    );
    assert_eq!(
        outbox::sweep(&db, 0, 1, 150).await.unwrap(),
        1,
        "e0, published at 100"
    );
    assert_eq!(
        outbox::sweep(&db, 0, 1, 1_000).await.unwrap(),
        0,
        "waiting rows stay"
    );
    assert_eq!(outbox::len(&db).await.unwrap(), 3);
    t.drop_db().await;
}

/// The relay's marking commits without waiting for the WAL flush (a lost mark only republishes
/// rows, which the inboxes absorb), and only the transaction that marks: with nothing to mark
/// the call changes nothing, and the setting ends with the transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_relays_marking_skips_the_wal_flush() {
    let (t, db) = open(Backend::Postgres).await;
    let mut tx = db.begin().await.unwrap();
    let m = outbox::Message {
        event_id: "e0".into(),
        topic: "t".into(),
        key: "saga-0".into(),
        headers: Vec::new(),
        payload: vec![1],
    };
    outbox::insert(&mut tx, &m, 0).await.unwrap();
    tx.commit().await.unwrap();
    let id = outbox::fetch(&db, 0, 1, 10).await.unwrap()[0].id;
    let mut conn = db.pool().acquire().await.unwrap();
    let call = |sent: &str| {
        format!("SELECT event_id FROM outbox_mark_and_fetch(CAST('{sent}' AS json), 5, 1, 0, 10)")
    };
    let setting = "SHOW synchronous_commit";
    one(&mut conn, "BEGIN").await;
    assert_eq!(one(&mut conn, &call("[]")).await.as_deref(), Some("e0"));
    assert_eq!(
        one(&mut conn, setting).await.as_deref(),
        Some("on"),
        "nothing marked"
    );
    assert_eq!(
        one(&mut conn, &call(&format!("[{id}]"))).await,
        None,
        "e0 marked"
    );
    assert_eq!(
        one(&mut conn, setting).await.as_deref(),
        Some("off"),
        "a marking"
    );
    one(&mut conn, "COMMIT").await;
    assert_eq!(
        one(&mut conn, setting).await.as_deref(),
        Some("on"),
        "for its transaction only"
    );
    drop(conn);
    t.drop_db().await;
}

/// Run `sql` on the pool, which must succeed.
async fn execute(db: &Db, sql: &str) {
    saga_runtime::storage::query(sql)
        .execute(db.pool())
        .await
        .unwrap();
}

/// The text in the first column of the first row `sql` returns on `conn`, if any.
async fn one(conn: &mut saga_runtime::storage::Conn, sql: &str) -> Option<String> {
    let query = saga_runtime::storage::query_scalar::<String>(sql);
    query.fetch_optional(conn).await.unwrap()
}

/// PostgreSQL keeps an index entry for every published row until VACUUM. The relay's fetch
/// walks the waiting rows' index with a plain index scan, which marks the entries of dead rows
/// as it passes them: the next fetch does not visit those rows again. (A bitmap scan, which the
/// planner picks for this query on its own, visits every one of them on every fetch: under
/// load the fetch grew from under 1 ms to 35 ms within a minute.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_fetch_skips_published_rows_after_passing_them_once() {
    let (t, db) = open(Backend::Postgres).await;
    let message = |i: usize| outbox::Message {
        event_id: format!("e{i}"),
        topic: "t".into(),
        key: format!("saga-{i}"),
        headers: Vec::new(),
        payload: vec![7; 300],
    };
    let rows: Vec<_> = (0..3000).map(|i| (message(i), 0)).collect();
    let mut tx = db.begin().await.unwrap();
    outbox::insert_all(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();
    let all = outbox::fetch(&db, 0, 1, 5000).await.unwrap();
    let published: Vec<i64> = all[..2997].iter().map(|r| r.id).collect();
    outbox::published(&db, &published, 100).await.unwrap();
    let first = outbox::fetch(&db, 0, 1, 256).await.unwrap();
    assert_eq!(first.len(), 3, "only the waiting rows");
    let explain = format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        outbox::fetch_sql(saga_runtime::storage::Dialect::Postgres)
    );
    let heap_pages: i64 = saga_runtime::storage::query_scalar(
        "SELECT pg_relation_size('outbox') / current_setting('block_size')::bigint",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    // A dead row's entry is marked only once no transaction can see the row any more, and
    // transactions of other tests (other databases of this server) may hold that back for a
    // moment: fetch again until then. A fetch that visits dead rows every time never gets
    // below the bound.
    common::eventually("a fetch that skips the published rows", || async {
        let plan: Vec<String> = saga_runtime::storage::query(&explain)
            .bind(1i64)
            .bind(0i64)
            .bind(256i64)
            .fetch_all(db.pool())
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get::<String, _>(0).unwrap())
            .collect();
        // The top node's buffers count everything the fetch touched.
        let buffers: u64 = plan
            .iter()
            .find_map(|line| line.trim().strip_prefix("Buffers: "))
            .unwrap_or_else(|| panic!("no buffers in {plan:#?}"))
            .split([' ', ','])
            .filter_map(|part| {
                part.split_once('=')
                    .and_then(|(_, n)| n.parse::<u64>().ok())
            })
            .sum();
        if (buffers as i64) < heap_pages / 4 {
            return Ok(());
        }
        Err(format!(
            "the fetch touched {buffers} buffers, at least a quarter of the table's \
             {heap_pages} pages: it visited the published rows again\n{}",
            plan.join("\n")
        ))
    })
    .await;
    t.drop_db().await;
}

/// The relay's marking finds the rows it marks by their key, however many published rows the
/// outbox keeps for the republish window. Its statement is planned once per connection for any
/// list of ids; PostgreSQL chose to scan the whole outbox for them (measured under load:
/// 700-860 rows read to mark 3-7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_marking_finds_its_rows_by_key() {
    let (t, db) = open(Backend::Postgres).await;
    // Statistics taken while the outbox was small, as on a new database.
    execute(&db, "ALTER TABLE outbox SET (autovacuum_enabled = false)").await;
    let message = |i: usize| outbox::Message {
        event_id: format!("e{i}"),
        topic: "t".into(),
        key: format!("saga-{i}"),
        headers: Vec::new(),
        payload: vec![7],
    };
    let add = |from: usize, to: usize| {
        let db = db.clone();
        async move {
            let rows: Vec<_> = (from..to).map(|i| (message(i), 0)).collect();
            let mut tx = db.begin().await.unwrap();
            outbox::insert_all(&mut tx, &rows).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    add(0, 10).await;
    execute(&db, "ANALYZE outbox").await;
    add(10, 800).await;
    let all = outbox::fetch(&db, 0, 1, 1000).await.unwrap();
    let ids: Vec<i64> = all.iter().map(|r| r.id).collect();
    outbox::published(&db, &ids[..780], 100).await.unwrap();
    // Two rows at a time on one connection, with the plan for any list of ids that PostgreSQL
    // keeps after a few calls (made at once here).
    let mut conn = db.pool().acquire().await.unwrap();
    one(&mut conn, "SET plan_cache_mode = force_generic_plan").await;
    for (n, marked) in ids[780..].chunks(2).enumerate() {
        // In one transaction, where the counters stay the backend's own.
        one(&mut conn, "BEGIN").await;
        let before = scanned(&mut conn, "outbox").await;
        let call = format!(
            "SELECT count(*)::text FROM outbox_mark_and_fetch(CAST('{marked:?}' AS json), 5, 1, 0, 100)"
        );
        let left = 20 - 2 * (n + 1);
        assert_eq!(one(&mut conn, &call).await, Some(left.to_string()));
        let read = scanned(&mut conn, "outbox").await - before;
        one(&mut conn, "COMMIT").await;
        assert_eq!(read, 0, "marking {marked:?} (call {n}) scanned the outbox");
    }
    drop(conn);
    t.drop_db().await;
}

/// Rows of `table` read by sequential scans on this connection's backend, as far as its own
/// counters (`pg_stat_xact_user_tables`) have them: compare two readings in one transaction.
async fn scanned(conn: &mut saga_runtime::storage::Conn, table: &str) -> i64 {
    saga_runtime::storage::query_scalar(
        "SELECT COALESCE(seq_tup_read, 0) FROM pg_stat_xact_user_tables WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn a_lease_has_one_holder_until_it_expires(backend: Backend) {
    let (t, db) = open(backend).await;
    assert!(lease::acquire(&db, "relay/0", "a", 1_000, 100)
        .await
        .unwrap());
    assert!(!lease::acquire(&db, "relay/0", "b", 1_050, 100)
        .await
        .unwrap());
    assert!(
        lease::acquire(&db, "relay/0", "a", 1_050, 100)
            .await
            .unwrap(),
        "renewal"
    );
    assert!(!lease::acquire(&db, "relay/0", "b", 1_149, 100)
        .await
        .unwrap());
    assert!(
        lease::acquire(&db, "relay/0", "b", 1_151, 100)
            .await
            .unwrap(),
        "taken over after expiry"
    );
    lease::release(&db, "relay/0", "b").await.unwrap();
    assert!(
        lease::acquire(&db, "relay/0", "a", 1_152, 100)
            .await
            .unwrap(),
        "free after release"
    );
    t.drop_db().await;
}

async fn a_saga_step_sees_the_expiry_of_its_saga(backend: Backend) {
    let (t, db) = open(backend).await;
    let mut tx = db.begin().await.unwrap();
    assert_eq!(
        sagas::step(&mut tx, "s1", 1).await.unwrap(),
        None,
        "no deadline, no row"
    );
    sagas::open(&mut tx, "s1", 1).await.unwrap();
    assert_eq!(
        sagas::step(&mut tx, "s1", 1).await.unwrap(),
        None,
        "open, not expired"
    );
    sagas::expire(&mut tx, "s1", 500).await.unwrap();
    sagas::expire(&mut tx, "s1", 900).await.unwrap();
    sagas::open(&mut tx, "s1", 1).await.unwrap();
    assert_eq!(
        sagas::step(&mut tx, "s1", 1).await.unwrap(),
        Some(500),
        "first expiry wins"
    );
    tx.commit().await.unwrap();
    t.drop_db().await;
}

async fn the_ledger_applies_one_compensation_and_no_step_after_it(backend: Backend) {
    let (t, db) = open(backend).await;
    let mut tx = db.begin().await.unwrap();
    let applied = Verdict::Apply { tombstone: false };
    let closed = |by: &str| Verdict::Closed { by: by.into() };
    // A saga with a forward step: its first compensation applies, a second one does not.
    assert_eq!(
        ledger::forward(&mut tx, "point", "s1", 1).await.unwrap(),
        applied
    );
    assert_eq!(
        ledger::forward(&mut tx, "point", "s1", 1).await.unwrap(),
        applied
    );
    assert_eq!(
        ledger::compensate(&mut tx, "point", "s1", "undo-1", 10)
            .await
            .unwrap(),
        applied
    );
    assert_eq!(
        ledger::compensate(&mut tx, "point", "s1", "undo-2", 20)
            .await
            .unwrap(),
        closed("undo-1")
    );
    assert_eq!(
        ledger::forward(&mut tx, "point", "s1", 1).await.unwrap(),
        closed("undo-1")
    );
    // A compensation before any forward step leaves a tombstone that refuses the step.
    assert_eq!(
        ledger::compensate(&mut tx, "point", "s2", "undo-3", 30)
            .await
            .unwrap(),
        Verdict::Apply { tombstone: true }
    );
    assert_eq!(
        ledger::forward(&mut tx, "point", "s2", 1).await.unwrap(),
        closed("undo-3")
    );
    // Ledgers are per service: another service's step of the same saga is unaffected.
    assert_eq!(
        ledger::forward(&mut tx, "order", "s2", 1).await.unwrap(),
        applied
    );
    tx.commit().await.unwrap();
    let closed_now = door(&db, "point", |ask| ask.ledger = &["s1", "s2", "s3"])
        .await
        .closed;
    assert_eq!(closed_now.len(), 2, "{closed_now:?}");
    assert_eq!(closed_now["s2"], "undo-3");
    assert!(door(&db, "order", |ask| ask.ledger = &["s2"])
        .await
        .closed
        .is_empty());
    t.drop_db().await;
}

/// The in-commit half of the ledger: a forward step that commits while its compensation's
/// transaction is open waits for it and then sees it (two connections, as on two instances).
async fn a_step_racing_its_compensation_serialises_on_the_ledger_row(backend: Backend) {
    let (t, db) = open(backend).await;
    let mut compensation = db.begin().await.unwrap();
    assert_eq!(
        ledger::compensate(&mut compensation, "stock", "s1", "undo", 10)
            .await
            .unwrap(),
        Verdict::Apply { tombstone: true }
    );
    let other = db.clone();
    let mut step = tokio::spawn(async move {
        let mut tx = other.begin().await?;
        let verdict = ledger::forward(&mut tx, "stock", "s1", 1).await?;
        tx.commit().await?;
        Ok::<_, Error>(verdict)
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut step)
            .await
            .is_err(),
        "the step must wait for the open compensation"
    );
    compensation.commit().await.unwrap();
    assert_eq!(
        step.await.unwrap().unwrap(),
        Verdict::Closed { by: "undo".into() }
    );
    t.drop_db().await;
}

/// `deploy --verify`'s recordings: a re-recorded event replaces its row, each service keeps
/// only its newest `keep`, rows of every instance are read together, oldest first.
async fn recordings_keep_the_newest_per_service_across_instances(backend: Backend) {
    let (t, db) = open(backend).await;
    let row = |service: &str, event: &str, ms: i64, instance: &str| Recorded {
        service: service.into(),
        event_id: event.into(),
        recorded_ms: ms,
        instance: instance.into(),
        version: "0.1.0".into(),
        body: format!("{event}@{ms}"),
    };
    let first: Vec<Recorded> = (1..=4)
        .map(|i| row("a", &format!("e{i}"), i, "x"))
        .collect();
    recordings::save(&db, &first, 3).await.unwrap();
    recordings::save(&db, &[row("a", "e2", 9, "y"), row("b", "f1", 5, "y")], 3)
        .await
        .unwrap();
    let a = recordings::recent(&db, "a", 10).await.unwrap();
    let got: Vec<(&str, &str)> = a
        .iter()
        .map(|r| (r.body.as_str(), r.instance.as_str()))
        .collect();
    assert_eq!(got, [("e3@3", "x"), ("e4@4", "x"), ("e2@9", "y")]);
    let newest = recordings::recent(&db, "a", 1).await.unwrap();
    assert_eq!(newest, vec![row("a", "e2", 9, "y")]);
    assert_eq!(recordings::recent(&db, "b", 10).await.unwrap().len(), 1);
    t.drop_db().await;
}

/// Two handlers that each read keys `a` and `b` and write one of them must not both commit
/// (write skew): the second sees the first's write as a conflict. `initial` is the version
/// both read (0: neither key written yet). T1 applies and stays open; T2 runs until it waits
/// for T1 (or finishes, which the old plain re-check under READ COMMITTED let it do); then T1
/// commits.
async fn write_skew(backend: Backend, initial: i64) {
    let (t, db) = open(backend).await;
    if initial > 0 {
        write(&db, &[], &[put("a", "0"), put("b", "0")])
            .await
            .unwrap();
    }
    let both = [("a", initial), ("b", initial)];
    let mut t1 = db.begin().await.unwrap();
    let reads = read_set(both.iter().map(|(k, v)| (k.to_string(), *v)));
    state::apply(&mut t1, "svc", &reads, &[put("a", "t1")], 0)
        .await
        .unwrap();
    let t2 = tokio::spawn({
        let db = db.clone();
        async move { write(&db, &both, &[put("b", "t2")]).await }
    });
    if backend == Backend::Postgres {
        common::eventually("T2 to wait for T1's locks or to finish", || async {
            if lock_waiters(&db).await > 0 || t2.is_finished() {
                Ok(())
            } else {
                Err("T2 neither waits nor finished".into())
            }
        })
        .await;
    }
    t1.commit().await.unwrap();
    let second = t2.await.unwrap();
    assert!(
        matches!(second, Err(Error::Conflict { .. })),
        "both handlers committed: write skew ({second:?})"
    );
    t.drop_db().await;
}

async fn two_handlers_reading_what_the_other_writes_cannot_both_commit(backend: Backend) {
    write_skew(backend, 1).await;
}

async fn two_handlers_reading_absent_keys_the_other_creates_cannot_both_commit(backend: Backend) {
    write_skew(backend, 0).await;
}

/// What the WIT promises for scans: the keys a scan returned are checked like reads, but a key
/// another commit adds under the prefix is not (no phantom protection). A handler that must
/// see every key of a prefix keeps a key it reads and writes with them (a counter, an index).
async fn a_scan_checks_the_keys_it_returned_but_not_keys_added_under_its_prefix(backend: Backend) {
    let (t, db) = open(backend).await;
    write(&db, &[], &[put("p/1", "x")]).await.unwrap();
    let scanned = state::scan(&db, "svc", "p/", None, 10).await.unwrap();
    let reads: Vec<(&str, i64)> = scanned
        .iter()
        .map(|(k, v)| (k.as_str(), v.version))
        .collect();
    write(&db, &[], &[put("p/2", "added")]).await.unwrap();
    write(&db, &reads, &[put("count", "1")])
        .await
        .expect("a key added under the prefix is not a conflict");
    write(&db, &[], &[put("p/1", "changed")]).await.unwrap();
    let err = write(&db, &reads, &[put("count", "2")]).await.unwrap_err();
    assert!(
        matches!(err, Error::Conflict { ref key, .. } if key == "p/1"),
        "{err}"
    );
    t.drop_db().await;
}

/// Setting a deadline opens its saga's expiry row (one statement on PostgreSQL): opened when
/// first set, kept when set again, reported when the deadline is cancelled, and a step of the
/// saga counts on it.
async fn setting_a_deadline_opens_its_sagas_row_once(backend: Backend) {
    use saga_runtime::storage::deadlines;
    let (t, db) = open(backend).await;
    let set = |name: &str, due_ms: i64| deadlines::Set {
        service: "order".into(),
        saga: "s1".into(),
        name: name.into(),
        due_ms,
        set_by: "req-1".into(),
        traceparent: None,
    };
    let mut tx = db.begin().await.unwrap();
    deadlines::set(&mut tx, &set("approval", 10_000), 1_000)
        .await
        .unwrap();
    deadlines::set(&mut tx, &set("reminder", 20_000), 5_000)
        .await
        .unwrap();
    assert_eq!(sagas::step(&mut tx, "s1", 6_000).await.unwrap(), None);
    let opened = deadlines::cancel(&mut tx, "order", "s1", "approval")
        .await
        .unwrap();
    assert_eq!(opened, Some(Some(1_000)), "opened when first set");
    tx.commit().await.unwrap();
    let stored = deadlines::for_saga(&db, "s1").await.unwrap();
    let pending: Vec<(&str, i64, &str)> = stored
        .iter()
        .map(|d| (d.name.as_str(), d.due_ms, d.status.as_str()))
        .collect();
    assert!(
        pending.contains(&("reminder", 20_000, "PENDING"))
            && pending.contains(&("approval", 10_000, "CANCELLED")),
        "{pending:?}"
    );
    t.drop_db().await;
}

/// Deadline `name` of saga `saga` of service `order`, due at `due_ms`, set by `req-{saga}`
/// with trace context `tp-{saga}`.
fn deadline(saga: &str, name: &str, due_ms: i64) -> saga_runtime::storage::deadlines::Set {
    saga_runtime::storage::deadlines::Set {
        service: "order".into(),
        saga: saga.into(),
        name: name.into(),
        due_ms,
        set_by: format!("req-{saga}"),
        traceparent: Some(format!("tp-{saga}")),
    }
}

/// A group's deadlines in one statement (`deadlines::set_all`): each saga's row opened once,
/// a deadline set again replaced, the last of two of the same name in the group winning.
async fn a_groups_deadlines_are_set_together(backend: Backend) {
    use saga_runtime::storage::deadlines;
    let (t, db) = open(backend).await;
    let set = deadline;
    let mut tx = db.begin().await.unwrap();
    deadlines::set(&mut tx, &set("s0", "order", 5_000), 100)
        .await
        .unwrap();
    let mut all: Vec<deadlines::Set> = (0..5)
        .map(|i| set(&format!("s{i}"), "order", 9_000))
        .collect();
    all.push(set("s1", "order", 7_000)); // the same name again: this one wins
    all.push(set("s1", "reminder", 8_000));
    deadlines::set_all(&mut tx, &all, 1_000).await.unwrap();
    tx.commit().await.unwrap();
    let mut found = Vec::new();
    for i in 0..5 {
        for d in deadlines::for_saga(&db, &format!("s{i}")).await.unwrap() {
            let tp = d.traceparent.clone().unwrap_or_default();
            found.push((d.saga, d.name, d.due_ms, d.status, tp));
        }
    }
    found.sort();
    let row = |saga: &str, name: &str, due: i64| {
        let tp = format!("tp-{saga}");
        (
            saga.to_string(),
            name.to_string(),
            due,
            "PENDING".to_string(),
            tp,
        )
    };
    assert_eq!(
        found,
        [
            row("s0", "order", 9_000),
            row("s1", "order", 7_000),
            row("s1", "reminder", 8_000),
            row("s2", "order", 9_000),
            row("s3", "order", 9_000),
            row("s4", "order", 9_000),
        ]
    );
    // Each saga's expiry row: opened once, when first set (s0 before the group).
    let mut tx = db.begin().await.unwrap();
    let opened = deadlines::cancel(&mut tx, "order", "s0", "order")
        .await
        .unwrap();
    assert_eq!(opened, Some(Some(100)));
    let opened = deadlines::cancel(&mut tx, "order", "s3", "order")
        .await
        .unwrap();
    assert_eq!(opened, Some(Some(1_000)));
    tx.commit().await.unwrap();
    t.drop_db().await;
}

/// A batch's deadline effects at its end (`deadlines::apply_all`): what they leave is what
/// running them one by one leaves — set then cancelled is cancelled, cancelled then set is
/// pending with the new time — and the sagas they settled are reported when opened.
async fn a_batchs_deadline_effects_leave_what_one_by_one_would(backend: Backend) {
    use saga_runtime::storage::deadlines::{self, Op};
    let (t, db) = open(backend).await;
    let set = deadline;
    let cancel = |saga: &str, name: &str| Op::Cancel {
        service: "order".into(),
        saga: saga.into(),
        name: name.into(),
    };
    let mut tx = db.begin().await.unwrap();
    for d in [set("s1", "a", 5_000), set("s2", "b", 5_000)] {
        deadlines::set(&mut tx, &d, 100).await.unwrap();
    }
    let ops = [
        Op::Set(set("s4", "d", 7_000)),
        cancel("s4", "d"),
        cancel("s2", "b"),
        Op::Set(set("s2", "b", 9_000)),
        cancel("s1", "a"),
        cancel("s5", "never-set"),
    ];
    let mut opened = deadlines::apply_all(&mut tx, &ops, 1_000).await.unwrap();
    tx.commit().await.unwrap();
    opened.sort_unstable();
    // One by one (SQLite), s2's cancel settles it before it is set again; PostgreSQL leaves
    // out a cancel that a set follows.
    match backend {
        Backend::Sqlite => assert_eq!(opened, [100, 100, 1_000]),
        Backend::Postgres => assert_eq!(opened, [100, 1_000]),
    }
    let mut found = Vec::new();
    for saga in ["s1", "s2", "s4", "s5"] {
        for d in deadlines::for_saga(&db, saga).await.unwrap() {
            found.push((d.saga, d.name, d.due_ms, d.status));
        }
    }
    found.sort();
    let row = |saga: &str, name: &str, due: i64, status: &str| {
        (saga.to_string(), name.to_string(), due, status.to_string())
    };
    assert_eq!(
        found,
        [
            row("s1", "a", 5_000, "CANCELLED"),
            row("s2", "b", 9_000, "PENDING"),
            row("s4", "d", 7_000, "CANCELLED"),
        ]
    );
    t.drop_db().await;
}

on_both_backends!(
    a_batchs_deadline_effects_leave_what_one_by_one_would,
    a_groups_deadlines_are_set_together,
    setting_a_deadline_opens_its_sagas_row_once,
    two_handlers_reading_what_the_other_writes_cannot_both_commit,
    two_handlers_reading_absent_keys_the_other_creates_cannot_both_commit,
    a_scan_checks_the_keys_it_returned_but_not_keys_added_under_its_prefix,
    recordings_keep_the_newest_per_service_across_instances,
    a_redrive_replaces_a_dead_letter_record_once,
    the_ledger_applies_one_compensation_and_no_step_after_it,
    a_step_racing_its_compensation_serialises_on_the_ledger_row,
    a_saga_step_sees_the_expiry_of_its_saga,
    a_write_based_on_a_stale_read_is_a_conflict,
    a_changed_key_that_was_only_read_is_a_conflict_too,
    a_deleted_and_recreated_key_still_conflicts,
    scan_lists_live_keys_of_a_prefix_in_order,
    a_handler_that_read_a_cleaned_tombstone_conflicts,
    a_scan_pages_from_a_cursor,
    the_inbox_records_an_event_once,
    the_outbox_returns_rows_in_storage_order,
    each_relay_slot_gets_the_rows_of_its_keys,
    published_rows_wait_again_after_a_loss_and_are_swept_after_the_window,
    the_relay_marks_its_last_batch_as_it_reads_the_next,
    a_lease_has_one_holder_until_it_expires,
);

/// The door check's one statement, asking only what `ask` sets for `service`.
async fn door(
    db: &Db,
    service: &'static str,
    ask: impl FnOnce(&mut saga_runtime::storage::door::Ask<'static>),
) -> saga_runtime::storage::door::Found {
    let mut asked = saga_runtime::storage::door::Ask::default();
    ask(&mut asked);
    asked.service = service;
    let mut conn = db.pool().acquire().await.unwrap();
    saga_runtime::storage::door::read(&mut conn, &asked)
        .await
        .unwrap()
}

/// On PostgreSQL the rows written on every step — a state key written again and again, a
/// saga's expiry row, its ledger row — are updated in place (HOT updates: no new entry in any
/// of the table's indexes). Before, the tombstone index's predicate (`value IS NULL`) made every
/// state write a full update, and `touched_ms`, indexed for retention and moved by every step,
/// did the same to saga and ledger rows: each update added an entry to every index of the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_on_every_step_are_updated_in_place() {
    let (t, db) = open(Backend::Postgres).await;
    let mut tx = db.begin().await.unwrap();
    let writes = 20;
    for i in 0..writes {
        let reads = read_set([("user/1".to_string(), i)]);
        let value = format!("{{\"point\": {}}}", 10_000 - i);
        state::apply(
            &mut tx,
            "point",
            &reads,
            &[put("user/1", &value)],
            1_000 + i,
        )
        .await
        .unwrap();
    }
    sagas::open(&mut tx, "saga-1", 1_000).await.unwrap();
    for i in 0..writes {
        sagas::step(&mut tx, "saga-1", 1_001 + i).await.unwrap();
        ledger::forward(&mut tx, "point", "saga-1", 1_001 + i)
            .await
            .unwrap();
    }
    for table in ["state", "sagas", "saga_ledger"] {
        let row = saga_runtime::storage::query(
            "SELECT pg_stat_get_xact_tuples_updated(CAST($1 AS TEXT)::regclass) AS updated, \
             pg_stat_get_xact_tuples_hot_updated(CAST($1 AS TEXT)::regclass) AS hot",
        )
        .bind(table)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let updated: i64 = row.try_get("updated").unwrap();
        let hot: i64 = row.try_get("hot").unwrap();
        assert!(updated >= writes - 1, "{table}: {updated} updates");
        assert_eq!(hot, updated, "{table}: every update in place");
    }
    tx.rollback().await.unwrap();
    t.drop_db().await;
}

/// A batch's forward steps' fences and inbox records in one statement (`storage::step`,
/// PostgreSQL): it writes what the three statements per step write (the expiry row's step
/// count, the ledger's forward steps, the inbox record) and reports, per step and in order,
/// what they would have found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_forward_steps_in_one_statement_write_and_find_what_each_would() {
    use saga_runtime::storage::step::{self, Kind, Step};
    let (t, db) = open(Backend::Postgres).await;
    let step = |id: &str, saga: &str, timed: bool, ledger: bool| Step {
        kind: Kind::Forward,
        event_id: id.into(),
        saga: saga.into(),
        event_type: "ExchangeSucceeded".into(),
        topic: "exchange".into(),
        version: "0.1.0".into(),
        handled_ms: 1_000,
        timed,
        ledger,
    };
    let scalar = |sql: &'static str| saga_runtime::storage::query_scalar::<i64>(sql);
    let mut tx = db.begin().await.unwrap();
    sagas::open(&mut tx, "s1", 500).await.unwrap();
    // Three steps: two of one saga, one of another.
    let three = [
        step("e1", "s1", true, true),
        step("e4", "s1", true, true),
        step("e5", "s3", false, true),
    ];
    let found = step::record_all(&mut tx, "point", 1_000, &three)
        .await
        .unwrap();
    assert_eq!(found.len(), 3);
    assert!(found.iter().all(step::Stepped::applies), "{found:?}");
    let again = step::record_all(&mut tx, "point", 1_000, &three[..1])
        .await
        .unwrap();
    assert!(!again[0].recorded, "the same event again is a duplicate");
    let steps = scalar("SELECT steps FROM sagas WHERE saga = 's1'")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(steps, 3, "each step counts, as sagas::step counts it");
    let forward = scalar("SELECT forward_steps FROM saga_ledger WHERE saga = 's1'")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(forward, 3);
    let other = scalar("SELECT forward_steps FROM saga_ledger WHERE saga = 's3'")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(other, 1);
    let records = scalar("SELECT COUNT(*) FROM inbox")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(records, 3, "each step recorded once");
    assert_eq!(
        inbox::outcome(&db, "point", "e1").await.unwrap(),
        None,
        "not visible before the commit"
    );
    // Expired since the door check, next to a step that applies: each reported in order, for
    // the caller to undo.
    sagas::expire(&mut tx, "s1", 900).await.unwrap();
    let mixed = [step("e2", "s1", true, false), step("e6", "s4", true, true)];
    let found = step::record_all(&mut tx, "point", 1_000, &mixed)
        .await
        .unwrap();
    assert_eq!(found[0].expired_ms, Some(900));
    assert!(!found[0].applies());
    assert!(found[1].applies(), "{found:?}");
    // Closed by a compensation at this service: reported with the compensation's id.
    ledger::compensate(&mut tx, "point", "s2", "undo-s2", 950)
        .await
        .unwrap();
    let closed = step::record_all(&mut tx, "point", 1_000, &[step("e3", "s2", false, true)])
        .await
        .unwrap();
    assert_eq!(closed[0].closed_by.as_deref(), Some("undo-s2"));
    assert_eq!(
        closed[0].expired_ms, None,
        "not timed: the expiry row is not read"
    );
    assert!(!closed[0].applies());
    tx.commit().await.unwrap();
    let recorded = inbox::outcome(&db, "point", "e1").await.unwrap();
    assert_eq!(recorded, Some(("applied".to_string(), None)));
    t.drop_db().await;
}

/// A batch's compensations recorded in the same statement (`storage::step`, PostgreSQL): each
/// closes its saga in the ledger as `ledger::compensate` would, its record says `compensated`
/// (a tombstone when no forward step came before it), and one that finds its saga closed by
/// another compensation, or a forward step of a saga a compensation closed, does not apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_compensations_in_one_statement_close_the_ledger_as_each_would() {
    use saga_runtime::storage::step::{self, Kind, Step};
    let (t, db) = open(Backend::Postgres).await;
    let step = |kind: Kind, id: &str, saga: &str| Step {
        kind,
        event_id: id.into(),
        saga: saga.into(),
        event_type: "OrderRejected".into(),
        topic: "order".into(),
        version: "0.1.0".into(),
        handled_ms: 1_000,
        timed: false,
        ledger: true,
    };
    let scalar = |sql: &'static str| saga_runtime::storage::query_scalar::<i64>(sql);
    let mut tx = db.begin().await.unwrap();
    // s1 had a forward step here; s2 had none (its compensation is a tombstone).
    ledger::forward(&mut tx, "exchange", "s1", 900)
        .await
        .unwrap();
    let batch = [
        step(Kind::Compensation, "undo-1", "s1"),
        step(Kind::Forward, "f-3", "s3"),
        step(Kind::Compensation, "undo-2", "s2"),
    ];
    let found = step::record_all(&mut tx, "exchange", 1_000, &batch)
        .await
        .unwrap();
    assert!(found.iter().all(step::Stepped::applies), "{found:?}");
    // A second compensation of s1 (another event), and a forward step of s2 after its
    // compensation: neither applies, each names the compensation that closed the saga.
    let late = [
        step(Kind::Compensation, "undo-1b", "s1"),
        step(Kind::Forward, "f-2", "s2"),
    ];
    let found = step::record_all(&mut tx, "exchange", 1_000, &late)
        .await
        .unwrap();
    assert_eq!(found[0].closed_by.as_deref(), Some("undo-1"), "{found:?}");
    assert_eq!(found[1].closed_by.as_deref(), Some("undo-2"), "{found:?}");
    assert!(!found[0].applies() && !found[1].applies());
    let closed = scalar(
        "SELECT COUNT(*) FROM saga_ledger WHERE service = 'exchange' \
         AND compensated_by IS NOT NULL AND compensated_ms = 1000",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(closed, 2, "s1 and s2 closed, at the step's time");
    tx.commit().await.unwrap();
    let recorded = |id: &'static str| inbox::outcome(&db, "exchange", id);
    assert_eq!(
        recorded("undo-1").await.unwrap(),
        Some(("compensated".to_string(), None))
    );
    assert_eq!(
        recorded("undo-2").await.unwrap(),
        Some((
            "compensated".to_string(),
            Some(ledger::TOMBSTONE.to_string())
        ))
    );
    assert_eq!(
        recorded("f-3").await.unwrap(),
        Some(("applied".to_string(), None))
    );
    t.drop_db().await;
}

/// A PostgreSQL connection keeps more prepared statements than sqlx's default of 100
/// (`storage::STATEMENT_CACHE`): the runtime's statement shapes outnumber it, and each one
/// evicted is prepared again (a round trip and a plan) the next time it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_connection_keeps_every_statement_shape_prepared() {
    let (t, db) = open(Backend::Postgres).await;
    let mut tx = db.begin().await.unwrap();
    let shapes = 300;
    for k in 0..shapes {
        let sql = format!("SELECT CAST($1 AS BIGINT) + {k} AS n");
        let n = saga_runtime::storage::query_scalar::<i64>(&sql)
            .bind(1_i64)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 1 + k);
    }
    let prepared = saga_runtime::storage::query_scalar::<i64>(
        "SELECT COUNT(*) FROM pg_prepared_statements WHERE statement LIKE 'SELECT CAST($1%'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        prepared, shapes,
        "every shape still prepared on the connection"
    );
    tx.rollback().await.unwrap();
    t.drop_db().await;
}

/// A PostgreSQL connection given back inside a transaction (its user dropped it, on an error)
/// is rolled back before anyone takes it again: its writes are undone and its row locks freed
/// at once, though nobody uses the pool after it. The runtime's pool gives connections back
/// without a round trip (`storage::pg`); this one is the exception.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_connection_dropped_inside_a_transaction_is_rolled_back_at_once() {
    let t = TestDb::new(Backend::Postgres).await;
    let db = Db::connect(&t.url, 1).await.unwrap();
    write(&db, &[], &[put("user/a", "0")]).await.unwrap();
    {
        let mut tx = db.begin().await.unwrap();
        state::lock(&mut tx, "svc", &["user/a"]).await.unwrap();
        let reads = read_set([("user/a".to_string(), 1)]);
        state::apply(&mut tx, "svc", &reads, &[put("user/a", "dropped")], 0)
            .await
            .unwrap();
    }
    // Another instance's pool writes the locked row: it waits only until the rollback.
    let other = Db::connect(&t.url, 1).await.unwrap();
    let written = [put("user/a", "2")];
    tokio::time::timeout(
        Duration::from_secs(20),
        write(&other, &[("user/a", 1)], &written),
    )
    .await
    .expect("the dropped transaction's lock was freed")
    .expect("the write saw the value before the dropped transaction");
    assert_eq!(stored(&db, "user/a").await, (Some("2".to_string()), 2));
    let open: i64 = saga_runtime::storage::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(other.pool())
    .await
    .unwrap();
    assert_eq!(open, 0, "no session left inside a transaction");
    t.drop_db().await;
}

/// A PostgreSQL `BEGIN` whose caller gave up before its answer (a timeout, a cancelled task):
/// the server may have begun the transaction, so the connection is rolled back before its
/// next use. Given back as it was, the next users' statements would run inside that
/// transaction, uncommitted, and go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_begin_given_up_on_its_way_leaves_no_transaction_open() {
    let t = TestDb::new(Backend::Postgres).await;
    let db = Db::connect(&t.url, 1).await.unwrap();
    {
        let begin = db.begin();
        tokio::pin!(begin);
        // Polled once: the `BEGIN` sent, its answer not read.
        let _ = futures::poll!(&mut begin);
    }
    saga_runtime::storage::query(
        "INSERT INTO leases (name, holder, expires_ms) VALUES ('after', 'me', 1)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let other = Db::connect(&t.url, 1).await.unwrap();
    let seen: i64 =
        saga_runtime::storage::query_scalar("SELECT COUNT(*) FROM leases WHERE name = 'after'")
            .fetch_one(other.pool())
            .await
            .unwrap();
    assert_eq!(
        seen, 1,
        "the insert committed, not inside a leftover transaction"
    );
    t.drop_db().await;
}

/// A PostgreSQL connection the server ended (its backend terminated, as when the server
/// restarts) fails the one statement that finds out, and is closed instead of given back: the
/// next statement runs on a new connection. Given back, every statement after would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_connection_the_server_ended_fails_once_and_is_replaced() {
    let t = TestDb::new(Backend::Postgres).await;
    let db = Db::connect(&t.url, 1).await.unwrap();
    let backend = || saga_runtime::storage::query_scalar::<i32>("SELECT pg_backend_pid()");
    let pid = backend().fetch_one(db.pool()).await.unwrap();
    let other = Db::connect(&t.url, 1).await.unwrap();
    saga_runtime::storage::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(other.pool())
        .await
        .unwrap();
    common::eventually("the backend ended", || async {
        let left: i64 = saga_runtime::storage::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE pid = $1",
        )
        .bind(pid)
        .fetch_one(other.pool())
        .await
        .unwrap();
        if left == 0 {
            Ok(())
        } else {
            Err("still there".to_string())
        }
    })
    .await;
    let found_out = backend().fetch_one(db.pool()).await;
    assert!(
        found_out.is_err(),
        "a statement on the ended session: {found_out:?}"
    );
    let next = backend()
        .fetch_one(db.pool())
        .await
        .expect("a new connection");
    assert_ne!(next, pid);
    assert_eq!(backend().fetch_one(db.pool()).await.unwrap(), next, "kept");
    t.drop_db().await;
}

/// An in-memory SQLite database is refused at connect, naming why: each connection of the
/// runtime's pool would open an empty database of its own (it used to connect, and then fail
/// on the first statement of a second connection with "no such table").
#[tokio::test]
async fn an_in_memory_sqlite_database_is_refused_with_the_reason() {
    for url in ["sqlite::memory:", "sqlite://saga.db?mode=memory"] {
        let refused = Db::connect(url, 4).await.err().expect("refused");
        assert!(
            matches!(refused, Error::InMemorySqlite(_)),
            "{url}: {refused}"
        );
        assert!(refused.to_string().contains("give a file"), "{refused}");
    }
}

/// On PostgreSQL a batch's transaction locks the state rows its events touch first, in key
/// order (`state::lock`), as the worker does. Two transactions writing the same keys in opposite
/// orders then wait for each other in turn; without the locks first, each holds the key the
/// other writes next and PostgreSQL breaks the deadlock after a second (`deadlock_timeout`),
/// failing one of them — seen 35 times in 70 s of the saga benchmark with two commit lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_that_lock_their_keys_first_wait_instead_of_deadlocking() {
    let (t, db) = open(Backend::Postgres).await;
    write(&db, &[], &[put("user/a", "0"), put("user/b", "0")])
        .await
        .unwrap();
    let keys = ["user/a", "user/b"];
    let mut first = db.begin().await.unwrap();
    state::lock(&mut first, "svc", &keys).await.unwrap();
    let second = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut tx = db.begin().await.unwrap();
            state::lock(&mut tx, "svc", &keys).await?;
            let none = read_set([]);
            for key in ["user/a", "user/b"] {
                state::apply(&mut tx, "svc", &none, &[put(key, "2")], 2).await?;
            }
            tx.commit().await
        })
    };
    one_waits_for_a_lock(&db, "the second transaction to wait for the first's locks").await;
    let none = read_set([]);
    for key in ["user/b", "user/a"] {
        state::apply(&mut first, "svc", &none, &[put(key, "1")], 1)
            .await
            .unwrap();
    }
    first.commit().await.unwrap();
    second
        .await
        .unwrap()
        .expect("the second commits after the first");
    let a = state::get(&db, "svc", "user/a").await.unwrap();
    assert_eq!((a.value.as_deref(), a.version), (Some(&b"2"[..]), 3));
    t.drop_db().await;
}

/// A batch's transaction on PostgreSQL checks its events' reads in memory against the versions
/// `state::lock` returned and the writes staged before them, and writes all of it at its end
/// (`state::Staged`): what it leaves is what statement-by-statement writes would leave.
#[tokio::test]
async fn a_batch_checks_reads_in_memory_and_writes_state_at_its_end() {
    let (t, db) = open(Backend::Postgres).await;
    write(&db, &[], &[put("k1", "a"), put("k2", "b")])
        .await
        .unwrap();
    let mut tx = db.begin().await.unwrap();
    let keys = ["ghost", "k1", "k2", "new"];
    let locked = state::lock(&mut tx, "svc", &keys).await.unwrap();
    assert_eq!(
        locked.clone().into_iter().collect::<Vec<_>>(),
        [("k1".to_string(), 1), ("k2".to_string(), 1)]
    );
    let mut staged = state::Staged::new("svc", locked, 7);
    let first = read_set([("k1".to_string(), 1), ("ghost".to_string(), 0)]);
    staged.check(&first).expect("nothing moved yet");
    staged.stage(&first, &[put("k1", "a2"), put("new", "n")]);
    // Read before the first event's write: a conflict, found without a statement.
    let stale = read_set([("k1".to_string(), 1)]);
    let conflict = staged.check(&stale).unwrap_err();
    assert!(
        matches!(&conflict, Error::Conflict { key, .. } if key == "k1"),
        "{conflict}"
    );
    let after = read_set([("k1".to_string(), 2), ("k2".to_string(), 1)]);
    staged.check(&after).expect("read after the first event");
    staged.stage(&after, &[delete("k2")]);
    staged.flush(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    let got = |key: &'static str| stored(&db, key);
    assert_eq!(got("k1").await, (Some("a2".into()), 2));
    assert_eq!(got("k2").await, (None, 2));
    assert_eq!(got("new").await, (Some("n".into()), 1));
    // The key only read as never written got a placeholder row, as `state::apply` gives it.
    let rows: Vec<(String, i64, Option<i64>)> = saga_runtime::storage::query(
        "SELECT key, version, valueless_ms FROM state WHERE service = 'svc' ORDER BY key",
    )
    .fetch_all(db.pool())
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        (
            r.try_get("key").unwrap(),
            r.try_get("version").unwrap(),
            r.try_get("valueless_ms").unwrap(),
        )
    })
    .collect();
    assert_eq!(
        rows,
        [
            ("ghost".to_string(), 0, Some(7)),
            ("k1".to_string(), 2, None),
            ("k2".to_string(), 2, Some(7)),
            ("new".to_string(), 1, None),
        ]
    );

    // A key without a row when locked, inserted by another transaction before the flush: the
    // flush finds it and answers a conflict instead of overwriting it.
    let mut tx = db.begin().await.unwrap();
    let locked = state::lock(&mut tx, "svc", &["late"]).await.unwrap();
    assert!(locked.is_empty());
    let mut staged = state::Staged::new("svc", locked, 8);
    let reads = read_set([("late".to_string(), 0)]);
    staged.check(&reads).unwrap();
    staged.stage(&reads, &[put("late", "mine")]);
    write(&db, &[("late", 0)], &[put("late", "theirs")])
        .await
        .unwrap();
    let conflict = staged.flush(&mut tx).await.unwrap_err();
    assert!(matches!(conflict, Error::Conflict { .. }), "{conflict}");
    tx.rollback().await.unwrap();
    assert_eq!(got("late").await, (Some("theirs".into()), 1));
    t.drop_db().await;
}

/// A batch's end on PostgreSQL in one statement (`storage::joint`): its saga steps, staged
/// state, deadlines, outbox rows and consumer positions write what their statements one by one
/// write, the cancelled deadlines' sagas' opening times come back with it, and a step that no
/// longer applies comes back as unexpected, for the caller to roll back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_end_in_one_statement_writes_what_its_statements_would() {
    use saga_runtime::storage::deadlines::{self, Op};
    use saga_runtime::storage::joint::Joint;
    use saga_runtime::storage::offsets;
    use saga_runtime::storage::step::{self, Kind, Step};
    let (t, db) = open(Backend::Postgres).await;
    write(&db, &[], &[put("k1", "a")]).await.unwrap();
    let mut tx = db.begin().await.unwrap();
    sagas::open(&mut tx, "s1", 500).await.unwrap();
    deadlines::set(&mut tx, &deadline("s9", "order", 9_000), 300)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let forward = |id: &str| Step {
        kind: Kind::Forward,
        event_id: id.into(),
        saga: "s1".into(),
        event_type: "ExchangeSucceeded".into(),
        topic: "exchange".into(),
        version: "0.1.0".into(),
        handled_ms: 1_000,
        timed: true,
        ledger: true,
    };
    let message = |id: &str| outbox::Message {
        event_id: id.into(),
        topic: "order".into(),
        key: "s1".into(),
        headers: vec![("ce_type".into(), "PointUsed".into())],
        payload: b"{}".to_vec(),
    };
    let ops = [
        Op::Cancel {
            service: "order".into(),
            saga: "s9".into(),
            name: "order".into(),
        },
        Op::Set(deadline("s5", "order", 20_000)),
    ];
    let mut tx = db.begin().await.unwrap();
    let locked = state::lock(&mut tx, "svc", &["k1", "new"]).await.unwrap();
    let mut staged = state::Staged::new("svc", locked, 1_000);
    let reads = read_set([("k1".to_string(), 1), ("new".to_string(), 0)]);
    staged.check(&reads).unwrap();
    staged.stage(&reads, &[put("k1", "a2"), put("new", "n")]);
    let mut joint = Joint::new();
    assert!(step::join(&mut joint, "point", 1_000, &[forward("e1")]));
    assert!(staged.join(&mut joint));
    // Three rows and three positions, each part's rows one JSON parameter.
    let emitted = ["out-1", "out-2", "out-3"].map(|id| (message(id), 1_000));
    assert!(outbox::join_all(&mut joint, &emitted));
    let positions = [("exchange", 0, 42), ("exchange", 1, 7), ("order", 0, 3)];
    assert!(offsets::join(&mut joint, "point", &positions));
    // A deadline set for a saga another part's step moves is left to its own statement.
    let mut other = Joint::new();
    assert!(deadlines::join_all(&mut other, &ops, 1_000, |saga| saga == "s5").is_none());
    let cancelled = deadlines::join_all(&mut joint, &ops, 1_000, |saga| saga == "s1").unwrap();
    let answers = joint.run(&mut tx).await.unwrap().unwrap();
    assert_eq!(answers.get(cancelled), [Some(300)], "s9 was opened at 300");
    tx.commit().await.unwrap();

    let got = |key: &'static str| stored(&db, key);
    assert_eq!(got("k1").await, (Some("a2".into()), 2));
    assert_eq!(got("new").await, (Some("n".into()), 1));
    let scalar = |sql: &'static str| saga_runtime::storage::query_scalar::<i64>(sql);
    let steps = scalar("SELECT steps FROM sagas WHERE saga = 's1'");
    assert_eq!(steps.fetch_one(db.pool()).await.unwrap(), 1);
    let forward_steps = scalar("SELECT forward_steps FROM saga_ledger WHERE saga = 's1'");
    assert_eq!(forward_steps.fetch_one(db.pool()).await.unwrap(), 1);
    assert_eq!(
        inbox::outcome(&db, "point", "e1").await.unwrap(),
        Some(("applied".to_string(), None))
    );
    let status = |saga: &'static str| {
        let db = db.clone();
        async move {
            let all = deadlines::for_saga(&db, saga).await.unwrap();
            all.iter().map(|d| d.status.clone()).collect::<Vec<_>>()
        }
    };
    assert_eq!(status("s9").await, ["CANCELLED"]);
    assert_eq!(status("s5").await, ["PENDING"]);
    let opened = scalar("SELECT opened_ms FROM sagas WHERE saga = 's5'");
    assert_eq!(opened.fetch_one(db.pool()).await.unwrap(), 1_000);
    let rows = outbox::fetch(&db, 0, 1, 10).await.unwrap();
    let stored: Vec<_> = rows.into_iter().map(|r| r.message).collect();
    assert_eq!(stored, emitted.map(|(m, _)| m), "each row once, in order");
    let stored = offsets::load(&db, "point").await.unwrap();
    assert_eq!(stored.len(), 3, "{stored:?}");
    for (topic, partition, next) in positions {
        assert_eq!(stored[&(topic.to_string(), partition)], next);
    }

    // The same step again (a duplicate) beside another outbox row: unexpected, and rolled
    // back, nothing of it stays.
    let mut tx = db.begin().await.unwrap();
    let mut joint = Joint::new();
    assert!(step::join(&mut joint, "point", 1_000, &[forward("e1")]));
    assert!(outbox::join_all(&mut joint, &[(message("out-4"), 1_000)]));
    let unexpected = joint.run(&mut tx).await.unwrap();
    assert!(unexpected.is_err(), "a duplicate step must not pass");
    tx.rollback().await.unwrap();
    assert_eq!(outbox::fetch(&db, 0, 1, 10).await.unwrap().len(), 3);
    t.drop_db().await;
}

/// What cannot share a batch's one statement is written apart, with the same result
/// (`storage::end`): a deadline set for a saga whose expiry row a step of the batch moves goes
/// in its own statement after it, and a batch with more steps than one statement takes is
/// written kind by kind — where a step that no longer applies is unexpected too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_end_sets_apart_what_cannot_share_its_statement() {
    use saga_runtime::storage::deadlines::Op;
    use saga_runtime::storage::end::{self, End};
    use saga_runtime::storage::step::{Kind, Step};
    let (t, db) = open(Backend::Postgres).await;
    let mut tx = db.begin().await.unwrap();
    sagas::open(&mut tx, "s1", 500).await.unwrap();
    tx.commit().await.unwrap();
    let step = |id: String, saga: &str| Step {
        kind: Kind::Forward,
        event_id: id,
        saga: saga.into(),
        event_type: "ExchangeSucceeded".into(),
        topic: "exchange".into(),
        version: "0.1.0".into(),
        handled_ms: 1_000,
        timed: saga == "s1",
        ledger: true,
    };
    let message = |id: &str| outbox::Message {
        event_id: id.into(),
        topic: "order".into(),
        key: "s1".into(),
        headers: vec![],
        payload: b"{}".to_vec(),
    };
    let staged = |key: &str, tx_locked| {
        let mut staged = state::Staged::new("svc", tx_locked, 1_000);
        let reads = read_set([(key.to_string(), 0)]);
        staged.stage(&reads, &[put(key, "v")]);
        staged
    };
    let scalar = |sql: &'static str| saga_runtime::storage::query_scalar::<i64>(sql);

    // A deadline set for s1, whose expiry row the batch's timed step moves.
    let mut tx = db.begin().await.unwrap();
    let locked = state::lock(&mut tx, "svc", &["a"]).await.unwrap();
    let ops = [Op::Set(deadline("s1", "reminder", 20_000))];
    let emitted = [(message("out-a"), 1_000)];
    let written = end::write(
        &mut tx,
        End {
            service: "point",
            steps: &[step("e1".into(), "s1")],
            state: staged("a", locked),
            deadlines: &ops,
            emitted: &emitted,
            consumer: "point",
            positions: &[("exchange", 0, 5)],
            replies: &[],
            replies_since_ms: 0,
        },
    )
    .await
    .unwrap();
    assert!(written.is_ok(), "{written:?}");
    tx.commit().await.unwrap();
    let steps = scalar("SELECT steps FROM sagas WHERE saga = 's1'");
    assert_eq!(steps.fetch_one(db.pool()).await.unwrap(), 1);
    let set = saga_runtime::storage::deadlines::for_saga(&db, "s1")
        .await
        .unwrap();
    assert_eq!(set.len(), 1);
    assert_eq!(
        (set[0].name.as_str(), set[0].status.as_str()),
        ("reminder", "PENDING")
    );
    assert_eq!(stored(&db, "a").await, (Some("v".into()), 1));

    // 65 steps, more than one statement takes: written kind by kind.
    let many: Vec<Step> = (0..65).map(|i| step(format!("m{i}"), "s2")).collect();
    let mut tx = db.begin().await.unwrap();
    let locked = state::lock(&mut tx, "svc", &["b"]).await.unwrap();
    let emitted = [(message("out-b"), 1_000)];
    let written = end::write(
        &mut tx,
        End {
            service: "point",
            steps: &many,
            state: staged("b", locked),
            deadlines: &[],
            emitted: &emitted,
            consumer: "point",
            positions: &[("exchange", 0, 70)],
            replies: &[],
            replies_since_ms: 0,
        },
    )
    .await
    .unwrap();
    assert!(written.is_ok(), "{written:?}");
    tx.commit().await.unwrap();
    let records = scalar("SELECT COUNT(*) FROM inbox");
    assert_eq!(records.fetch_one(db.pool()).await.unwrap(), 66);
    assert_eq!(stored(&db, "b").await, (Some("v".into()), 1));
    assert_eq!(outbox::fetch(&db, 0, 1, 10).await.unwrap().len(), 2);
    let positions = saga_runtime::storage::offsets::load(&db, "point")
        .await
        .unwrap();
    assert_eq!(positions[&("exchange".to_string(), 0)], 70);

    // The same 65 again: every step a duplicate, unexpected, and nothing of it stays.
    let mut tx = db.begin().await.unwrap();
    let locked = state::lock(&mut tx, "svc", &["c"]).await.unwrap();
    let written = end::write(
        &mut tx,
        End {
            service: "point",
            steps: &many,
            state: staged("c", locked),
            deadlines: &[],
            emitted: &[],
            consumer: "point",
            positions: &[],
            replies: &[],
            replies_since_ms: 0,
        },
    )
    .await
    .unwrap();
    assert!(written.is_err(), "duplicates must not pass");
    tx.rollback().await.unwrap();
    assert_eq!(stored(&db, "c").await, (None, 0));
    t.drop_db().await;
}

/// A batch's end as one statement without a transaction (`storage::end::write_alone`, the
/// worker's `Isolation::Alone`) takes each key's version from the first handler that read it
/// (`state::Staged::assuming`) and checks them in the statement: at the versions read it
/// writes all of the batch; a key written or only read that moved — before the statement, or
/// while it waits for a writer's lock and that writer then commits — or a key created since it
/// was read as absent fails the statement whole, nothing of the batch written; and a key
/// written without being read (its version unknown) is written over whatever version it has,
/// one more, as in a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batchs_end_alone_writes_all_of_it_at_the_versions_read_or_nothing() {
    let (t, db) = open(Backend::Postgres).await;
    write(&db, &[], &[put("k1", "a"), put("k2", "b")])
        .await
        .unwrap();
    let reads = [("k1", 1), ("k2", 1), ("ghost", 0), ("new", 0)];
    let ended = end_alone(&db, 1, &reads, &[put("k1", "a2"), put("new", "n")]).await;
    assert_eq!(ended, Ok(()));
    assert_eq!(stored(&db, "k1").await, (Some("a2".into()), 2));
    assert_eq!(stored(&db, "k2").await, (Some("b".into()), 1), "only read");
    assert_eq!(stored(&db, "new").await, (Some("n".into()), 1));
    assert_eq!(stored(&db, "ghost").await, (None, 0), "a placeholder row");
    let after_first = batch_ends(&db).await;
    assert_eq!(after_first, (1, 1, Some(1)), "inbox, outbox, position");

    // Moved before the statement: a key written, a key only read, a key read as absent.
    let stale_write = end_alone(&db, 2, &[("k1", 1)], &[put("k1", "x")]).await;
    assert!(stale_write.unwrap_err().contains("state_updated"));
    write(&db, &[("k2", 1)], &[put("k2", "b2")]).await.unwrap();
    let stale_read = end_alone(&db, 3, &[("k1", 2), ("k2", 1)], &[put("k1", "y")]).await;
    assert!(stale_read.unwrap_err().contains("state_read"));
    write(&db, &[("late", 0)], &[put("late", "theirs")])
        .await
        .unwrap();
    let created = end_alone(&db, 4, &[("late", 0)], &[put("late", "mine")]).await;
    assert!(created.unwrap_err().contains("state_inserted"));
    assert_eq!(stored(&db, "late").await, (Some("theirs".into()), 1));

    // Moved while the statement waits for the lock of a writer that then commits: k2 only
    // read (locked `FOR SHARE`), then k1 written.
    for (moved, reads) in [
        ("k2", [("k1", 2), ("k2", 2)]),
        ("k1", [("k1", 2), ("k2", 3)]),
    ] {
        let mut writer = db.begin().await.unwrap();
        let seen = read_set([(moved.to_string(), 2)]);
        state::apply(&mut writer, "svc", &seen, &[put(moved, "theirs")], 5)
            .await
            .unwrap();
        let waiting = {
            let db = db.clone();
            tokio::spawn(async move { end_alone(&db, 5, &reads, &[put("k1", "z")]).await })
        };
        one_waits_for_a_lock(&db, "the end to wait for the writer's lock").await;
        writer.commit().await.unwrap();
        let ended = waiting.await.unwrap();
        assert!(ended.is_err(), "{moved} moved while the end waited");
    }
    assert_eq!(stored(&db, "k1").await, (Some("theirs".into()), 3));

    assert_eq!(
        batch_ends(&db).await,
        after_first,
        "none of them wrote anything"
    );

    let reads = [("k1", 3), ("k2", 3)];
    let ended = end_alone(&db, 7, &reads, &[put("k1", "last")]).await;
    assert_eq!(ended, Ok(()));
    assert_eq!(stored(&db, "k1").await, (Some("last".into()), 4));
    assert_eq!(batch_ends(&db).await, (2, 2, Some(7)));

    // Keys written without being read: over whatever version each has, one more.
    let blind = end_alone(&db, 8, &[], &[put("k1", "blind"), put("k9", "q")]).await;
    assert_eq!(blind, Ok(()));
    assert_eq!(stored(&db, "k1").await, (Some("blind".into()), 5));
    assert_eq!(stored(&db, "k9").await, (Some("q".into()), 1));
    assert_eq!(batch_ends(&db).await, (3, 3, Some(8)));
    t.drop_db().await;
}

/// Batch `n`'s end as one statement (`storage::end::write_alone`): its event `e<n>`, a forward
/// step of saga `saga-<n>`, read `reads` and wrote `writes`; it emits `out-<n>` and moves the
/// position of partition 0 to `n`. `Err`: why it was not written.
async fn end_alone(db: &Db, n: i64, reads: &[(&str, i64)], writes: &[Write]) -> Result<(), String> {
    use saga_runtime::storage::end::{self, End};
    use saga_runtime::storage::step::{Kind, Step};
    let mut staged = state::Staged::assuming("svc", 1_000);
    let reads = read_set(reads.iter().map(|(k, v)| (k.to_string(), *v)));
    staged.check(&reads).map_err(|e| e.to_string())?;
    staged.stage(&reads, writes);
    let steps = [Step {
        kind: Kind::Forward,
        event_id: format!("e{n}"),
        saga: format!("saga-{n}"),
        event_type: "ExchangeSucceeded".into(),
        topic: "exchange".into(),
        version: "0.1.0".into(),
        handled_ms: 1_000,
        timed: false,
        ledger: true,
    }];
    let message = outbox::Message {
        event_id: format!("out-{n}"),
        topic: "order".into(),
        key: format!("saga-{n}"),
        headers: vec![],
        payload: b"{}".to_vec(),
    };
    let end = End {
        service: "point",
        steps: &steps,
        state: staged,
        deadlines: &[],
        emitted: &[(message, 1_000)],
        consumer: "point",
        positions: &[("exchange", 0, n)],
        replies: &[],
        replies_since_ms: 0,
    };
    let mut conn = db.pool().acquire().await.unwrap();
    let written = end::write_alone(&mut conn, end).await.unwrap();
    written.map(|_| ()).map_err(|unexpected| unexpected.0)
}

/// What batch ends wrote: inbox records, outbox rows, and the position of `point` on partition
/// 0 of `exchange`.
async fn batch_ends(db: &Db) -> (i64, usize, Option<i64>) {
    let records = saga_runtime::storage::query_scalar::<i64>("SELECT COUNT(*) FROM inbox")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let rows = outbox::fetch(db, 0, 1, 10).await.unwrap().len();
    let positions = saga_runtime::storage::offsets::load(db, "point")
        .await
        .unwrap();
    (
        records,
        rows,
        positions.get(&("exchange".to_string(), 0)).copied(),
    )
}

/// Each PostgreSQL connection plans a prepared statement once, for the table's size then
/// (`storage::GENERIC_PLANS`): the relay's marking of published rows, first run on a nearly
/// empty outbox (analyzed so, as autovacuum does a new table after its first 50 changes), kept
/// reading the whole table as it grew. Once the table changed by more rows
/// than it had when last analyzed, `storage::statistics::refresh` analyzes it, and the same
/// statement on the same connection is planned again: it reads its row by the primary key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_made_while_a_table_was_small_is_made_again_once_it_grew() {
    use saga_runtime::storage::statistics;
    let test_db = TestDb::new(Backend::Postgres).await;
    // One connection: the plan looked at is the one the statements before made.
    let db = Db::connect(&test_db.url, 1).await.unwrap();
    // Autovacuum must not analyze it first.
    execute(&db, "ALTER TABLE outbox SET (autovacuum_enabled = false)").await;
    let insert = "INSERT INTO outbox (event_id, topic, msg_key, headers, payload, created_ms) \
                  SELECT 'e' || i, 'order', 'k' || i, '[]', '', 0 FROM generate_series(1, $1) AS i";
    let rows = |n: i64| saga_runtime::storage::query(insert).bind(n);
    rows(4).execute(db.pool()).await.unwrap();
    execute(&db, "ANALYZE outbox").await;
    assert!(statistics::refresh(&db, statistics::FLOOR)
        .await
        .unwrap()
        .is_empty());
    // The relay's marking of four rows, in a transaction so that its reads can be counted: how
    // many rows of the outbox it read.
    let mark = |id: i64| {
        let db = db.clone();
        async move {
            let mut tx = db.begin().await.unwrap();
            let sql = "UPDATE outbox SET published_ms = $1 WHERE id IN ($2, $3, $4, $5)";
            (id..id + 4)
                .fold(saga_runtime::storage::query(sql).bind(1_000i64), |q, id| {
                    q.bind(id)
                })
                .execute(&mut *tx)
                .await
                .unwrap();
            let read = rows_read(&mut tx, "outbox").await;
            tx.commit().await.unwrap();
            read
        }
    };
    assert!(mark(1).await <= 4);
    rows(20_000).execute(db.pool()).await.unwrap();
    let before = mark(100).await;
    assert!(
        before > 20_000,
        "the plan made at 3 rows reads them all: {before}"
    );
    // Once PostgreSQL's counters have the changes (a backend reports them at most once a
    // second).
    common::eventually("the outbox to be analyzed", || async {
        match statistics::refresh(&db, statistics::FLOOR).await.unwrap() {
            analyzed if analyzed.is_empty() => Err("not yet".to_string()),
            analyzed if analyzed == ["outbox"] => Ok(()),
            analyzed => panic!("only the outbox changed: {analyzed:?}"),
        }
    })
    .await;
    let after = mark(200).await;
    assert!(
        after <= 4,
        "planned again, by the primary key: {after} rows read"
    );
    assert!(statistics::refresh(&db, statistics::FLOOR)
        .await
        .unwrap()
        .is_empty());
    test_db.drop_db().await;
}

/// Rows of `table` this transaction has read so far, by any scan (PostgreSQL's own counters
/// of the transaction, `pg_stat_xact_user_tables`).
async fn rows_read(tx: &mut saga_runtime::storage::Tx, table: &str) -> i64 {
    saga_runtime::storage::query_scalar(
        "SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0) \
         FROM pg_stat_xact_user_tables WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(&mut **tx)
    .await
    .unwrap()
}

/// A new database under load: its statistics were taken when a service had 100 keys, and it
/// has thousands since. Looking up 64 keys (locking them, updating them, the door's inbox
/// check) reads those rows, not every row of the service — with `service = $1 AND key IN
/// (…)` PostgreSQL chose to scan the whole table here (measured: 4,600 rows for 64 keys).
#[tokio::test]
async fn keyed_lookups_read_only_their_rows_when_statistics_lag() {
    use saga_runtime::storage::door;
    let (t, db) = open(Backend::Postgres).await;
    let fill = |from: i64, to: i64| {
        format!(
            "INSERT INTO state (service, key, value, version) \
             SELECT 'svc', 'user/u' || i, 'x', 1 FROM generate_series({from}, {to}) AS i; \
             INSERT INTO inbox (service, event_id, saga, event_type, topic, outcome, version, \
             handled_ms) SELECT 'svc', 'e' || i, 's', 't', 't', 'applied', 'v', 0 \
             FROM generate_series({from}, {to}) AS i"
        )
    };
    for sql in [
        fill(1, 100),
        "ANALYZE state; ANALYZE inbox".into(),
        fill(101, 4600),
    ] {
        for statement in sql.split("; ") {
            saga_runtime::storage::query(statement)
                .execute(db.pool())
                .await
                .unwrap();
        }
    }
    let keys: Vec<String> = (1..=64).map(|i| format!("user/u{}", i * 70)).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut tx = db.begin().await.unwrap();
    let locked = state::lock(&mut tx, "svc", &keys).await.unwrap();
    assert_eq!(locked.len(), 64);
    let read = rows_read(&mut tx, "state").await;
    assert!(read <= 2 * 64, "locking 64 keys read {read} rows");

    let mut staged = state::Staged::new("svc", locked.clone(), 9);
    let reads = read_set(locked.clone());
    staged.check(&reads).unwrap();
    let writes: Vec<Write> = keys.iter().map(|k| put(k, "y")).collect();
    staged.stage(&reads, &writes);
    staged.flush(&mut tx).await.unwrap();
    let updated = rows_read(&mut tx, "state").await - read;
    assert!(updated <= 3 * 64, "updating 64 keys read {updated} rows");

    let events: Vec<String> = (1..=64).map(|i| format!("e{}", i * 70)).collect();
    let events: Vec<&str> = events.iter().map(String::as_str).collect();
    let ask = door::Ask {
        service: "svc",
        events: &events,
        ..door::Ask::default()
    };
    let found = door::read(&mut tx, &ask).await.unwrap();
    assert_eq!(found.seen.len(), 64);
    let read = rows_read(&mut tx, "inbox").await;
    assert!(
        read <= 2 * 64,
        "the door's check of 64 events read {read} rows"
    );
    tx.commit().await.unwrap();
    let v = state::get(&db, "svc", "user/u70").await.unwrap();
    assert_eq!((v.value.as_deref(), v.version), (Some(&b"y"[..]), 2));
    t.drop_db().await;
}
