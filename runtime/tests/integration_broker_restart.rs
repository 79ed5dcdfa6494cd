//! A broker restart: what it keeps (every committed record at its offset, for
//! `read_committed` readers), and the relay riding it out (rows kept and retried while the
//! broker is down, nothing parked). Each test runs against a broker of its own
//! (`scripts/broker.sh` on a free port), stopped and started again on the state it saved.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::instances::Broker;
use common::{Backend, TestRuntime};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Message};
use saga_runtime::kafka::{topics, Settings};

const T: Duration = Duration::from_secs(10);

fn transactional(brokers: &str, id: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("transactional.id", id)
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

/// (offset, value) of every record a read_committed reader gets from offset 0.
async fn read_all(topic: &str) -> Vec<(i64, String)> {
    let c = common::committed_reader_at(topic, 0);
    let mut seen = Vec::new();
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(3), c.recv()).await {
        let value = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        seen.push((m.offset(), value));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_keeps_committed_records_at_their_offsets() {
    let broker = Broker::start();
    let brokers = broker.address();
    common::use_brokers(&brokers);
    let settings = Settings {
        brokers: brokers.clone(),
        topic_prefix: "restart.".into(),
        partitions: 1,
        replication: 1,
        stall_reseek_ms: 1000,
        ..Settings::default()
    };
    topics::ensure(&settings, &["t".to_string()]).await.unwrap();
    let topic = settings.topic("t");
    let producer = transactional(&brokers, "restart-relay");
    producer.init_transactions(T).unwrap();
    for (values, commit) in [(&["a", "b"][..], true), (&["x"], false), (&["c"], true)] {
        producer.begin_transaction().unwrap();
        for v in values {
            producer
                .send(FutureRecord::to(&topic).key("k").payload(*v), T)
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
        if commit {
            producer.commit_transaction(T).unwrap();
        } else {
            producer.abort_transaction(T).unwrap();
        }
    }
    drop(producer);
    let before = read_all(&topic).await;
    let values: Vec<&str> = before.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(values, ["a", "b", "c"], "{before:?}");
    broker.stop();
    broker.resume();
    let after = read_all(&topic).await;
    assert_eq!(
        after, before,
        "records moved or went missing across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_broker_is_down_the_relay_keeps_its_rows_and_parks_none() {
    let broker = Broker::start();
    let brokers = broker.address();
    let rt = TestRuntime::start_with(Backend::Sqlite, &["order", "point", "exchange"], |o| {
        o.config.kafka.brokers = brokers.clone();
        o.config.relay.send_timeout_ms = 500;
    })
    .await;
    let (status, _) = rt
        .post("/points", serde_json::json!({"userId": "u", "point": 1000}))
        .await;
    assert_eq!(status, 200);
    let order =
        |amount: i64| serde_json::json!({"holderId": "u", "currencyId": 1, "amount": amount});
    let (_, first) = rt.post("/orders", order(100)).await;
    common::order_status(&rt, first["id"].as_str().unwrap(), "APPROVED").await;

    broker.stop();
    // Commands need only the database: the order is stored, its events wait in the outbox.
    let (status, second) = rt.post("/orders", order(200)).await;
    assert_eq!(status, 201, "{second}");
    common::eventually(
        "a relay batch to fail against the stopped broker",
        || async {
            let stats = rt.get("/_saga/stats").await;
            if stats["relay_retries"].as_u64() >= Some(1) {
                Ok(())
            } else {
                Err(stats.to_string())
            }
        },
    )
    .await;
    broker.resume();
    common::order_status(&rt, second["id"].as_str().unwrap(), "APPROVED").await;
    // The loss is noted for every instance (a partition taken over soon reads from before it).
    let noted = saga_runtime::storage::offsets::broker_lost_ms(rt.handle.db()).await;
    assert!(
        noted.unwrap().is_some(),
        "the broker's connections dropped and no instance noted it"
    );
    let stats = rt.get("/_saga/stats").await;
    assert_eq!(
        stats["parked"], 0,
        "a transient broker error parked a row: {stats}"
    );
    assert_eq!(rt.get("/points/u").await["point"], 700);
}

/// noida-db can lose records it acknowledged when it restarts and give their offsets to new
/// ones, so a consumer whose broker connections dropped reads the last
/// `reread_after_loss_ms` again (the worker's inbox drops what it handled): a consumer that
/// handed out `a b c` hands them out again after the restart, then what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_a_consumer_reads_its_recent_records_again() {
    reads_recent_records_again_after_a_restart(false).await;
}

/// The same for a partition the worker held (paused) while the connections were down: it
/// reads them again once released, not only from where it was held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_held_through_a_broker_restart_reads_its_recent_records_again() {
    reads_recent_records_again_after_a_restart(true).await;
}

async fn reads_recent_records_again_after_a_restart(held: bool) {
    use saga_runtime::kafka::consumer::Consumer;
    let broker = Broker::start();
    let brokers = broker.address();
    let settings = Settings {
        brokers: brokers.clone(),
        topic_prefix: format!("reread{}.", held as u8),
        partitions: 1,
        // The consumer looks up at least this often: a held partition delivers nothing.
        stall_reseek_ms: 200,
        ..Settings::default()
    };
    topics::ensure(&settings, &["t".to_string()]).await.unwrap();
    let topic = settings.topic("t");
    let commit = |id: &'static str, values: &'static [&'static str]| {
        let (brokers, topic) = (&brokers, &topic);
        async move {
            let producer = transactional(brokers, id);
            producer.init_transactions(T).unwrap();
            producer.begin_transaction().unwrap();
            for v in values {
                producer
                    .send(FutureRecord::to(topic).key("k").payload(*v), T)
                    .await
                    .map_err(|(e, _)| e)
                    .unwrap();
            }
            producer.commit_transaction(T).unwrap();
        }
    };
    commit("reread-before", &["a", "b", "c"]).await;
    let consumer = Consumer::new(&settings, "svc", None).unwrap();
    consumer.assign(&[(topic.clone(), 0, Some(0))]).unwrap();
    // Handed out until `got` ends with `want`, or 30 s passed.
    let take_until = |want: &'static [&'static str]| {
        let consumer = &consumer;
        async move {
            let mut got: Vec<String> = Vec::new();
            let until = tokio::time::Instant::now() + Duration::from_secs(30);
            while !got.ends_with(&want.iter().map(|v| v.to_string()).collect::<Vec<_>>()) {
                let Ok(batch) = tokio::time::timeout_at(until, consumer.next_batch(10)).await
                else {
                    break;
                };
                // While the broker is away the consumer says so, as the worker sees it.
                let Ok(batch) = batch else {
                    continue;
                };
                got.extend(
                    batch
                        .into_iter()
                        .map(|r| String::from_utf8(r.payload).unwrap()),
                );
            }
            got
        }
    };
    assert_eq!(take_until(&["a", "b", "c"]).await, ["a", "b", "c"]);
    if held {
        consumer.hold(&topic, 0, 3).unwrap();
    }
    broker.stop();
    broker.resume();
    commit("reread-after", &["d"]).await;
    if held {
        // The loss is answered while the partition is still held, and nothing comes.
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while !consumer.loss_answered() && tokio::time::Instant::now() < until {
            if let Ok(Ok(batch)) =
                tokio::time::timeout(Duration::from_millis(500), consumer.next_batch(10)).await
            {
                panic!("a held partition handed out {} records", batch.len());
            }
        }
        assert!(
            consumer.loss_answered(),
            "the connection loss was never seen"
        );
        consumer.release(&topic, 0, 3).unwrap();
    }
    let again = take_until(&["a", "b", "c", "d"]).await;
    assert!(
        again.ends_with(&["a", "b", "c", "d"].map(String::from)),
        "after the connection loss the consumer reads its recent records again: {again:?}"
    );
}

/// Fails every send while switched on: a relay that cannot publish.
struct FailWhen(Arc<AtomicBool>);

impl saga_runtime::relay::Faults for FailWhen {
    fn before_send(&self, _index: usize) -> Result<(), String> {
        match self.0.load(Ordering::Relaxed) {
            true => Err("sends switched off".into()),
            false => Ok(()),
        }
    }
}

/// A relay whose broker connections dropped marks what it published in the republish window
/// waiting again in the database, not in its memory: when it cannot publish them itself (here
/// every send fails from the restart on, as if it died), the next holder of its slot does,
/// with the same event ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_published_before_a_broker_restart_go_out_again_even_through_a_successor() {
    use saga_runtime::storage::outbox;
    let broker = Broker::start();
    let brokers = broker.address();
    let failing = Arc::new(AtomicBool::new(false));
    let rt = TestRuntime::start_with(Backend::Sqlite, &["order", "point", "exchange"], |o| {
        o.config.kafka.brokers = brokers.clone();
        o.config.relay.send_timeout_ms = 500;
        o.relay_faults = Arc::new(FailWhen(failing.clone()));
    })
    .await;
    let order = serde_json::json!({"holderId": "u", "currencyId": 1, "amount": 5});
    let (status, placed) = rt.post("/orders", order).await;
    assert_eq!(status, 201, "{placed}");
    let topic = format!("{}order", rt.prefix());
    let first = common::read_matching(&brokers, &topic, 1, |_| true).await;
    let created = common::header(&first[0], "ce_id").unwrap();
    assert_eq!(outbox::len(rt.handle.db()).await.unwrap(), 0);

    failing.store(true, Ordering::Relaxed);
    broker.stop();
    broker.resume();
    common::eventually("the published rows to wait again", || async {
        match outbox::len(rt.handle.db()).await.unwrap() {
            0 => Err("none waiting".to_string()),
            n => Ok(n),
        }
    })
    .await;
    // Its successor on the same database (no faults) publishes them.
    let rt = rt.restart(|_| {}).await;
    // The saga goes on meanwhile (other events follow on the topic): wait for the copy.
    let copies = common::read_matching(&brokers, &topic, 2, |m| {
        common::header(m, "ce_id").as_deref() == Some(created.as_str())
    })
    .await;
    assert_eq!(copies.len(), 2, "the first event, published again");
    rt.stop().await;
}

/// A partition taken soon after a broker loss that some instance noted starts from before the
/// loss, not at its stored position: a restarted noida-db can put new records (the relay's
/// copies of ones it lost) on offsets below where the previous reader stopped, and that reader
/// may have died before it read them. Here the loss is noted as another instance would have,
/// and a record below the stored position that nobody handled stands in for such a copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_taken_soon_after_a_broker_loss_reads_from_before_it() {
    use saga_runtime::storage::{offsets, Db};
    let broker = Broker::start();
    let brokers = broker.address();
    let rt = TestRuntime::start_with(Backend::Sqlite, &["hostile"], |o| {
        o.config.kafka.brokers = brokers.clone();
    })
    .await;
    let prefix = rt.prefix().to_string();
    let topic = format!("{prefix}hostile");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let hello = |id: &'static str| {
        let (producer, topic) = (&producer, &topic);
        async move {
            let headers = common::owned_headers(&common::cloudevent_headers(id, "Hello", id));
            let record = FutureRecord::to(topic)
                .key(id)
                .payload("{}")
                .headers(headers);
            producer.send(record, T).await.map_err(|(e, _)| e).unwrap();
        }
    };
    hello("before").await;
    hostile_saw(&rt, "before").await;
    let stopped = rt.halt().await;

    hello("copy").await;
    let copy = common::read_matching(&brokers, &topic, 1, |m| {
        common::header(m, "ce_id").as_deref() == Some("copy")
    })
    .await;
    let db = Db::connect(&stopped.db.url, 1).await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    // The previous reader stopped past the copy.
    let stop_at = (topic.as_str(), copy[0].partition(), copy[0].offset() + 1);
    offsets::advance(&mut conn, "hostile", &[stop_at])
        .await
        .unwrap();
    drop(conn);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    offsets::note_broker_loss(&db, now).await.unwrap();
    db.pool().close().await;

    let rt = stopped.start(|_| {}).await;
    hostile_saw(&rt, "copy").await;
    rt.stop().await;
}

/// Wait until the hostile service has recorded the event with `subject`.
async fn hostile_saw(rt: &TestRuntime, subject: &str) {
    common::eventually(&format!("hostile to see {subject}"), || async {
        let seen = rt.get("/hostile/seen").await;
        match seen.as_array().unwrap().iter().any(|s| s == subject) {
            true => Ok(()),
            false => Err(seen.to_string()),
        }
    })
    .await;
}
