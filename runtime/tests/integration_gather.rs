//! Guests' single-key state reads on PostgreSQL, gathered (`state::Gatherer`): reads queued
//! together are answered by one statement, whichever services they read. Alone in its test
//! binary, so that the process's statement counter sees only this test's statements.

mod common;

use common::{Backend, TestDb};
use saga_runtime::storage::{self, state, Db};
use saga_runtime::wasm::bindings::Write;
use saga_runtime::wasm::read_set;

#[tokio::test(flavor = "current_thread")]
async fn reads_queued_together_take_one_statement_across_services() {
    let test_db = TestDb::new(Backend::Postgres).await;
    let db = Db::connect(&test_db.url, 4).await.expect("connect");
    for (service, key, value) in [("a", "k1", "a1"), ("b", "k1", "b1"), ("b", "k2", "b2")] {
        let mut tx = db.begin().await.unwrap();
        let write = Write {
            key: key.into(),
            value: Some(value.as_bytes().to_vec()),
        };
        state::apply(&mut tx, service, &read_set([]), &[write], 1)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let gatherer = state::Gatherer::start(&db);
    let before = storage::statements();
    // On this single thread every read is queued before the gathering task runs.
    let asked = [
        ("a", "k1"),
        ("b", "k1"),
        ("b", "k2"),
        ("b", "absent"),
        ("a", "k1"),
    ];
    let reads = asked.map(|(service, key)| gatherer.get(service, key));
    let answers = futures::future::join_all(reads).await;
    assert_eq!(storage::statements() - before, 1, "statements for 5 reads");
    let got: Vec<(Option<String>, i64)> = answers
        .into_iter()
        .map(|a| {
            let v = a.unwrap();
            (v.value.map(|v| String::from_utf8(v).unwrap()), v.version)
        })
        .collect();
    let some = |v: &str| (Some(v.to_string()), 1);
    assert_eq!(
        got,
        [some("a1"), some("b1"), some("b2"), (None, 0), some("a1")]
    );
    test_db.drop_db().await;
}
