//! HTTP commands' commits, grouped (`saga_runtime::commands`), on SQLite and PostgreSQL: the
//! commands queued while the commits before them ran share one transaction; one whose reads
//! an earlier command of its group changed is answered a conflict while the rest commit; a
//! command only its own transaction can tell apart (a reused `Idempotency-Key`) makes the group
//! commit each alone, with the same answers a command alone gets. On PostgreSQL a group that
//! starts sagas (its commands' replies under distinct `Idempotency-Key`s with it) ends in one
//! statement without a transaction, and in a transaction after all if that statement finds a
//! version not as read or a key answered meanwhile.

mod common;

use std::sync::Arc;

use common::{Backend, TestDb};
use saga_runtime::clock::{Clock, SystemClock};
use saga_runtime::commands::{Command, Committed, Context, Handle};
use saga_runtime::registry::Service;
use saga_runtime::stats::Stats;
use saga_runtime::storage::{idempotency, state, Db, Error};
use saga_runtime::wasm::bindings::{Deadline, Effects, Emit, Payload, Write};
use saga_runtime::wasm::{read_set, Sandbox};

struct Setup {
    test_db: TestDb,
    db: Db,
    service: Arc<Service>,
    stats: Arc<Stats>,
    handle: Handle,
}

async fn setup(backend: Backend) -> Setup {
    let test_db = TestDb::new(backend).await;
    let db = Db::connect(&test_db.url, 4).await.expect("connect");
    let sandbox = Sandbox::new(Default::default(), None).unwrap();
    let guest = sandbox.load(common::guest("order")).await.unwrap();
    let service = Arc::new(Service::new(guest).unwrap());
    let config = common::config(&test_db, &[]);
    let stats: Arc<Stats> = Arc::default();
    let handle = Handle::start(Context {
        db: db.clone(),
        clock: Arc::new(SystemClock),
        relay: saga_runtime::relay::Handle::new(config.relay.slots),
        config: Arc::new(config),
        changes: Arc::default(),
        metrics: Arc::new(saga_runtime::metrics::Metrics::new()),
        deadline_alarm: Arc::default(),
        stats: stats.clone(),
    });
    Setup {
        test_db,
        db,
        service,
        stats,
        handle,
    }
}

/// A command as `POST /orders` makes one: order `id` written, its deadline set, an event
/// emitted; having read `reads`.
fn place(s: &Setup, id: &str, reads: &[(&str, i64)]) -> Command {
    let effects = Effects {
        writes: vec![Write {
            key: format!("order/{id}"),
            value: Some(id.as_bytes().to_vec()),
        }],
        emits: vec![Emit {
            topic: "order".into(),
            type_: "OrderCreated".into(),
            subject: id.into(),
            data: Payload {
                content_type: "application/json".into(),
                data: b"{}".to_vec(),
            },
        }],
        set_deadlines: vec![Deadline {
            subject: id.into(),
            name: "order".into(),
            after_ms: Some(60_000),
        }],
        cancel_deadlines: vec![],
    };
    Command {
        service: s.service.clone(),
        reads: read_set(reads.iter().map(|(k, v)| (k.to_string(), *v))),
        effects,
        new_id: id.into(),
        now_ms: SystemClock.now_ms(),
        trace: vec![],
        retry: None,
    }
}

/// Queue every command before any is committed (on this test's single thread, the commit
/// loop runs only once all are queued), and wait for all answers.
async fn commit_queued(s: &Setup, commands: Vec<Command>) -> Vec<Result<Committed, Error>> {
    let commits = commands.into_iter().map(|c| s.handle.commit(c));
    futures::future::join_all(commits).await
}

async fn outbox_subjects(db: &Db) -> Vec<String> {
    let keys: Vec<String> = saga_runtime::storage::query("SELECT msg_key FROM outbox ORDER BY id")
        .fetch_all(db.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.try_get("msg_key").unwrap())
        .collect();
    keys
}

async fn version(db: &Db, key: &str) -> i64 {
    state::get(db, "order", key).await.unwrap().version
}

/// Eight commands queued together commit in one transaction (on PostgreSQL, in one statement
/// without one); a ninth that read `order/c0` as absent — which the first of them writes — is
/// answered a conflict, and nothing of it is written.
async fn commands_queued_together_share_one_transaction(backend: Backend) {
    let s = setup(backend).await;
    let mut commands: Vec<Command> = (0..8).map(|i| place(&s, &format!("c{i}"), &[])).collect();
    commands.push(place(&s, "late", &[("order/c0", 0)]));
    let answers = commit_queued(&s, commands).await;
    for (i, answer) in answers[..8].iter().enumerate() {
        assert!(matches!(answer, Ok(Committed::Done)), "c{i}: {answer:?}");
    }
    assert!(
        matches!(&answers[8], Err(Error::Conflict { key, .. }) if key == "order/c0"),
        "{:?}",
        answers[8]
    );
    assert_eq!(Stats::get(&s.stats.command_groups), 1);
    assert_eq!(Stats::get(&s.stats.grouped_commands), 8);
    let alone = u64::from(backend == Backend::Postgres);
    assert_eq!(Stats::get(&s.stats.command_ends_alone), alone);
    assert_eq!(Stats::get(&s.stats.command_ends_undone), 0);
    for i in 0..8 {
        assert_eq!(version(&s.db, &format!("order/c{i}")).await, 1, "c{i}");
    }
    assert_eq!(version(&s.db, "order/late").await, 0);
    let expected: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    assert_eq!(outbox_subjects(&s.db).await, expected);
    let deadlines: i64 = saga_runtime::storage::query_scalar(
        "SELECT COUNT(*) FROM deadlines WHERE status = 'PENDING'",
    )
    .fetch_one(s.db.pool())
    .await
    .unwrap();
    assert_eq!(deadlines, 8);
    s.test_db.drop_db().await;
}

/// A reply to store under an `Idempotency-Key`.
fn reply(body: &str) -> idempotency::Stored {
    idempotency::Stored {
        fingerprint: "same-request".into(),
        status: 201,
        content_type: "application/json".into(),
        body: body.as_bytes().to_vec(),
    }
}

/// The body of the reply stored under `key` of the order service, if any.
async fn stored_body(db: &Db, key: &str) -> Option<String> {
    let stored = idempotency::lookup(db, "order", key, 0).await.unwrap();
    stored.map(|r| String::from_utf8(r.body).unwrap())
}

/// Commands carrying distinct `Idempotency-Key`s (and one carrying none) commit together, each
/// reply stored with its command's effects; on PostgreSQL in one statement without a
/// transaction, as commands without keys do.
async fn commands_with_distinct_keys_commit_together_with_their_replies(backend: Backend) {
    let s = setup(backend).await;
    let mut commands: Vec<Command> = (0..4).map(|i| place(&s, &format!("r{i}"), &[])).collect();
    for i in [0, 1, 3] {
        commands[i].retry = Some((format!("key-{i}"), reply(&format!("reply {i}"))));
    }
    let answers = commit_queued(&s, commands).await;
    for (i, answer) in answers.iter().enumerate() {
        assert!(matches!(answer, Ok(Committed::Done)), "r{i}: {answer:?}");
    }
    assert_eq!(Stats::get(&s.stats.command_groups), 1);
    assert_eq!(Stats::get(&s.stats.grouped_commands), 4);
    let alone = u64::from(backend == Backend::Postgres);
    assert_eq!(Stats::get(&s.stats.command_ends_alone), alone);
    assert_eq!(Stats::get(&s.stats.command_ends_undone), 0);
    for i in [0, 1, 3] {
        let body = stored_body(&s.db, &format!("key-{i}")).await;
        assert_eq!(
            body.as_deref(),
            Some(format!("reply {i}").as_str()),
            "key-{i}"
        );
    }
    assert_eq!(stored_body(&s.db, "key-2").await, None);
    for i in 0..4 {
        assert_eq!(version(&s.db, &format!("order/r{i}")).await, 1, "r{i}");
    }
    assert_eq!(outbox_subjects(&s.db).await, ["r0", "r1", "r2", "r3"]);
    s.test_db.drop_db().await;
}

/// On PostgreSQL, a command whose `Idempotency-Key` another request answered after its
/// handler ran: the group's one statement finds the live reply and writes nothing of the
/// group; committed again, the command is answered (its request replays the stored reply) and
/// writes nothing, and the others commit.
#[tokio::test(flavor = "current_thread")]
async fn a_key_answered_meanwhile_undoes_the_groups_one_statement() {
    let s = setup(Backend::Postgres).await;
    let mut tx = s.db.begin().await.unwrap();
    let now = SystemClock.now_ms();
    let first = idempotency::store(&mut tx, "order", "key-0", &reply("earlier"), now, 0).await;
    assert!(first.unwrap(), "stored by the other request");
    tx.commit().await.unwrap();

    let mut commands: Vec<Command> = (0..3).map(|i| place(&s, &format!("a{i}"), &[])).collect();
    commands[0].retry = Some(("key-0".into(), reply("late")));
    commands[1].retry = Some(("key-1".into(), reply("reply 1")));
    let answers = commit_queued(&s, commands).await;
    assert!(
        matches!(answers[0], Ok(Committed::Answered)),
        "{:?}",
        answers[0]
    );
    for i in [1, 2] {
        assert!(
            matches!(answers[i], Ok(Committed::Done)),
            "a{i}: {:?}",
            answers[i]
        );
    }
    assert_eq!(Stats::get(&s.stats.command_ends_undone), 1);
    assert_eq!(Stats::get(&s.stats.command_ends_alone), 0);
    assert_eq!(version(&s.db, "order/a0").await, 0, "nothing of it written");
    assert_eq!(outbox_subjects(&s.db).await, ["a1", "a2"]);
    assert_eq!(
        stored_body(&s.db, "key-0").await.as_deref(),
        Some("earlier")
    );
    assert_eq!(
        stored_body(&s.db, "key-1").await.as_deref(),
        Some("reply 1")
    );
    s.test_db.drop_db().await;
}

/// Two commands of one group carry the same `Idempotency-Key`: only its own transaction could
/// tell the second apart, so the group is committed command by command — the first stores its
/// reply, the second is answered with it and writes nothing, the others commit.
async fn a_reused_key_in_a_group_commits_each_alone(backend: Backend) {
    let s = setup(backend).await;
    let mut commands: Vec<Command> = (0..4).map(|i| place(&s, &format!("k{i}"), &[])).collect();
    commands[1].retry = Some(("key-1".into(), reply("first")));
    commands[3].retry = Some(("key-1".into(), reply("second")));
    let answers = commit_queued(&s, commands).await;
    for i in [0, 1, 2] {
        assert!(
            matches!(answers[i], Ok(Committed::Done)),
            "k{i}: {:?}",
            answers[i]
        );
    }
    assert!(
        matches!(answers[3], Ok(Committed::Answered)),
        "{:?}",
        answers[3]
    );
    assert_eq!(Stats::get(&s.stats.command_groups), 0);
    assert_eq!(
        Stats::get(&s.stats.command_ends_alone),
        0,
        "a reply to store"
    );
    assert_eq!(version(&s.db, "order/k3").await, 0);
    assert_eq!(outbox_subjects(&s.db).await, ["k0", "k1", "k2"]);
    let stored = idempotency::lookup(&s.db, "order", "key-1", 0)
        .await
        .unwrap()
        .expect("the first reply is stored");
    assert_eq!(stored.body, b"first");
    s.test_db.drop_db().await;
}

/// On PostgreSQL, a command whose handler read a key that changed before its commit: its one
/// statement without a transaction finds the version moved and writes nothing, and the
/// command, committed again in a transaction, is answered the conflict. A blind write (a key
/// written without being read) over a key that exists adds a version to it, as in a
/// transaction.
#[tokio::test(flavor = "current_thread")]
async fn a_command_ending_alone_on_a_moved_read_is_answered_a_conflict() {
    let s = setup(Backend::Postgres).await;
    let committed = s.handle.commit(place(&s, "first", &[])).await;
    assert!(matches!(committed, Ok(Committed::Done)), "{committed:?}");
    assert_eq!(Stats::get(&s.stats.command_ends_alone), 1);
    // Read `order/first` at version 1, which another commit then moves to 2.
    let stale = place(&s, "second", &[("order/first", 1)]);
    let mut tx = s.db.begin().await.unwrap();
    let moved = Write {
        key: "order/first".into(),
        value: Some(b"moved".to_vec()),
    };
    let seen = read_set([("order/first".to_string(), 1)]);
    state::apply(&mut tx, "order", &seen, &[moved], 0)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let answer = s.handle.commit(stale).await;
    assert!(
        matches!(&answer, Err(Error::Conflict { key, .. }) if key == "order/first"),
        "{answer:?}"
    );
    assert_eq!(Stats::get(&s.stats.command_ends_alone), 1);
    assert_eq!(Stats::get(&s.stats.command_ends_undone), 1);
    assert_eq!(
        version(&s.db, "order/second").await,
        0,
        "nothing of it written"
    );

    let mut over = place(&s, "third", &[]);
    over.effects.writes.push(Write {
        key: "order/first".into(),
        value: Some(b"over".to_vec()),
    });
    let committed = s.handle.commit(over).await;
    assert!(matches!(committed, Ok(Committed::Done)), "{committed:?}");
    assert_eq!(Stats::get(&s.stats.command_ends_alone), 2);
    assert_eq!(
        version(&s.db, "order/first").await,
        3,
        "written over version 2"
    );
    assert_eq!(version(&s.db, "order/third").await, 1);
    assert_eq!(outbox_subjects(&s.db).await, ["first", "third"]);
    s.test_db.drop_db().await;
}

/// Single-threaded, so that every command is queued before the commit loop runs.
macro_rules! on_both_backends_single_threaded {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "current_thread")]
                async fn sqlite() {
                    super::$name(super::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "current_thread")]
                async fn postgres() {
                    super::$name(super::Backend::Postgres).await
                }
            }
        )*
    };
}

on_both_backends_single_threaded!(
    commands_queued_together_share_one_transaction,
    commands_with_distinct_keys_commit_together_with_their_replies,
    a_reused_key_in_a_group_commits_each_alone
);
