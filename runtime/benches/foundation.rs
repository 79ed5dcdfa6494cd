//! Foundation numbers: the per-event cost of a guest call, and the time of one happy-path
//! saga end to end. Run with `scripts/bench.sh` (needs the broker it starts); prints numbers,
//! asserts nothing about them.
//!
//! - guest call: `point`'s ExchangeSucceeded handler on a fresh instance per call (what the
//!   worker does), state served from memory so only the sandbox is measured.
//! - saga: POST /orders → order APPROVED through Kafka and three guests, on SQLite, measured
//!   by the host clock stamps the order guest records (created → approved).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_runtime::config::Config;
use saga_runtime::node::{self, Options};
use saga_runtime::wasm::bindings::{Context, Event, Payload};
use saga_runtime::wasm::{Sandbox, StateReader, Versioned};

struct MemoryState(HashMap<String, Vec<u8>>);

impl StateReader for MemoryState {
    fn get(&self, _: &str, key: &str) -> Result<Versioned, String> {
        Ok(match self.0.get(key) {
            Some(v) => Versioned {
                value: Some(v.clone()),
                version: 1,
            },
            None => Versioned {
                value: None,
                version: 0,
            },
        })
    }
    fn scan(&self, _: &str, _: &str, _: u32) -> Result<Vec<(String, Versioned)>, String> {
        Ok(Vec::new())
    }
}

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn guest_file(name: &str) -> std::path::PathBuf {
    root().join(format!("guests/target/wasm32-wasip2/release/{name}.wasm"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{what}: n={} mean={:?} p50={:?} p99={:?} max={:?}",
        samples.len(),
        mean,
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().unwrap()
    );
}

fn bench_guest_call() {
    let sandbox = Sandbox::new(Default::default(), None).unwrap();
    let started = Instant::now();
    let guest = sandbox
        .load(&std::fs::read(guest_file("point")).unwrap())
        .unwrap();
    println!(
        "load (compile + link + describe) point.wasm: {:?}",
        started.elapsed()
    );
    let state: Arc<dyn StateReader> = Arc::new(MemoryState(HashMap::from([(
        "user/u1".to_string(),
        br#"{"userId":"u1","point":1000000000}"#.to_vec(),
    )])));
    let event = Event {
        id: "e".into(),
        type_: "ExchangeSucceeded".into(),
        source: "/saga/exchange".into(),
        subject: "o1".into(),
        topic: "exchange".into(),
        time_ms: 0,
        deadline_ms: None,
        data: Payload {
            content_type: "application/json".into(),
            data: br#"{"orderId":"o1","holderId":"u1","point":500}"#.to_vec(),
        },
    };
    let ctx = Context {
        now_ms: 0,
        attempt: 1,
        new_id: "n".into(),
    };
    let mut samples = Vec::with_capacity(20_000);
    for i in 0..22_000 {
        let t = Instant::now();
        let called = guest.on_event(state.clone(), &ctx, &event).unwrap();
        let took = t.elapsed();
        assert_eq!(called.output.emits.len(), 1);
        if i >= 2_000 {
            samples.push(took); // the first 2000 warm the pool and caches
        }
    }
    report(
        "guest call (fresh instance + on-event, point.ExchangeSucceeded)",
        samples,
    );
}

async fn bench_saga() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        database_url: format!("sqlite://{}", dir.path().join("bench.db").display()),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        services: ["order", "point", "exchange"]
            .iter()
            .map(|s| guest_file(s))
            .collect(),
        cache_dir: Some(dir.path().join("cache")),
        ..Config::default()
    };
    config.kafka.brokers =
        std::env::var("SAGA_TEST_BROKERS").expect("SAGA_TEST_BROKERS (scripts/bench.sh sets it)");
    config.kafka.topic_prefix = format!("bench{}.", std::process::id());
    let rt = node::start(Options::new(config)).await.unwrap();
    let base = format!("http://{}", rt.http_addr());
    let http = reqwest::Client::new();
    let post =
        |path: &str, body: serde_json::Value| http.post(format!("{base}{path}")).json(&body).send();
    post(
        "/points",
        serde_json::json!({"userId": "u", "point": 1_000_000_000}),
    )
    .await
    .unwrap();
    let mut samples = Vec::new();
    for i in 0..60 {
        let order: serde_json::Value = post(
            "/orders",
            serde_json::json!({"holderId": "u", "currencyId": 1, "amount": 5}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        let id = order["id"].as_str().unwrap().to_string();
        let settled = loop {
            let o: serde_json::Value = http
                .get(format!("{base}/orders/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if o["status"] != "PENDING" {
                break o;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert_eq!(settled["status"], "APPROVED");
        let ms = settled["updatedMs"].as_i64().unwrap() - settled["createdMs"].as_i64().unwrap();
        if i >= 10 {
            samples.push(Duration::from_millis(ms as u64)); // the first sagas include group joins
        }
    }
    report(
        "happy-path saga (order created -> approved, 4 events, 3 guests, SQLite)",
        samples,
    );
    rt.shutdown().await;
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing
    }
    bench_guest_call();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(bench_saga());
}
