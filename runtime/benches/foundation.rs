//! Foundation numbers: the per-event cost of a guest call, and the time of one happy-path
//! saga end to end. Run with `scripts/bench.sh` (needs the broker it starts); prints numbers,
//! asserts nothing about them.
//!
//! - guest call: `point`'s ExchangeSucceeded handler on a fresh instance per call (what the
//!   worker does), state served from memory so only the sandbox is measured.
//! - saga: POST /orders → order APPROVED through Kafka and three guests, on SQLite, measured
//!   by the host clock stamps the order guest records (created → approved).
//! - deadline lag: many concurrent orders that nobody approves (only the order service runs),
//!   each with a 1 s saga deadline; lag = the deadline's due time → the order handler running
//!   on its `DeadlineExpired` (the order's `updatedMs`, host clock), while new orders keep
//!   arriving and other deadlines keep falling due.
//! - hot swap: a steady stream of 100 sagas/s (open loop, 50 users); in the middle, `point` is
//!   deployed six times through the admin API, alternating 0.2.0 and 0.1.0. Swap latency =
//!   deploy accepted (the admin API answered) → the first event handled by the new version
//!   (inbox `handled_ms`, host clock); throughput = sagas approved per second before the
//!   swaps, over the swapping period, and in the 500 ms after each deploy was sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use saga_runtime::config::Config;
use saga_runtime::node::{self, Handle, Options};
use saga_runtime::storage::deadlines;
use saga_runtime::wasm::bindings::{Context, Event, Payload};
use saga_runtime::wasm::{Sandbox, StateReader, Versioned};

struct MemoryState(HashMap<String, Vec<u8>>);

#[async_trait::async_trait]
impl StateReader for MemoryState {
    async fn get(&self, _: &str, key: &str) -> Result<Versioned, String> {
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
    async fn scan(
        &self,
        _: &str,
        _: &str,
        _: Option<&str>,
        _: u32,
    ) -> Result<Vec<(String, Versioned)>, String> {
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

async fn bench_guest_call() {
    let sandbox = Sandbox::new(Default::default(), None).unwrap();
    let started = Instant::now();
    let guest = sandbox
        .load(std::fs::read(guest_file("point")).unwrap())
        .await
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
        dead_letter: None,
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
    let slot = guest.slots().admit().await.unwrap();
    for i in 0..22_000 {
        let t = Instant::now();
        let called = guest
            .on_event(&slot, state.clone(), &ctx, &event)
            .await
            .unwrap();
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

/// A runtime of `services` on a fresh SQLite file and a private topic namespace.
async fn start(
    dir: &std::path::Path,
    services: &[&str],
    tweak: impl FnOnce(&mut Config),
) -> Handle {
    let mut config = Config {
        database_url: format!("sqlite://{}", dir.join("bench.db").display()),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        services: services.iter().map(|s| guest_file(s)).collect(),
        cache_dir: Some(dir.join("cache")),
        ..Config::default()
    };
    config.kafka.brokers =
        std::env::var("SAGA_TEST_BROKERS").expect("SAGA_TEST_BROKERS (scripts/bench.sh sets it)");
    let tag = dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace(['.', '_'], "");
    config.kafka.topic_prefix = format!("bench{}{tag}.", std::process::id());
    tweak(&mut config);
    node::start(Options::new(config)).await.unwrap()
}

/// `GET /orders` once no order is PENDING any more (polled every 50 ms).
async fn settled_orders(http: &reqwest::Client, base: &str) -> Vec<serde_json::Value> {
    loop {
        let orders: Vec<serde_json::Value> = http
            .get(format!("{base}/orders"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if orders.iter().all(|o| o["status"] != "PENDING") {
            return orders;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn bench_saga() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(dir.path(), &["order", "point", "exchange"], |_| {}).await;
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

async fn bench_deadline_lag() {
    const ORDERS: usize = 600;
    const CLIENTS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let rt = start(dir.path(), &["order"], |c| {
        c.saga_deadlines.insert("order".into(), 1_000);
    })
    .await;
    let base = format!("http://{}", rt.http_addr());
    let http = reqwest::Client::new();
    let place = |http: reqwest::Client, base: String, n: usize| async move {
        for _ in 0..n {
            let resp = http
                .post(format!("{base}/orders"))
                .json(&serde_json::json!({"holderId": "u", "currencyId": 1, "amount": 5}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 201);
        }
    };
    // Warm up the consumer group: one order through its deadline first.
    place(http.clone(), base.clone(), 1).await;
    settled_orders(&http, &base).await;
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(place(http.clone(), base.clone(), ORDERS / CLIENTS)))
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let placing = started.elapsed();
    let orders = settled_orders(&http, &base).await;
    assert!(orders.iter().all(|o| o["status"] == "REJECTED"));
    let due: HashMap<String, i64> = deadlines::list(rt.db(), 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.saga, d.due_ms))
        .collect();
    let samples: Vec<Duration> = orders
        .iter()
        .skip(1)
        .map(|o| {
            let lag = o["updatedMs"].as_i64().unwrap() - due[o["id"].as_str().unwrap()];
            Duration::from_millis(lag.max(0) as u64)
        })
        .collect();
    println!(
        "deadline lag: {} orders placed by {CLIENTS} clients in {placing:?} ({:.0}/s), 1 s deadline each",
        ORDERS,
        ORDERS as f64 / placing.as_secs_f64()
    );
    report(
        "deadline lag (due -> order's DeadlineExpired handler ran, SQLite)",
        samples,
    );
    rt.shutdown().await;
}

async fn bench_hot_swap() {
    // Open loop, below what the machine sustains, so the numbers show the swap, not a backlog.
    const RATE: u64 = 100; // sagas per second
    const USERS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let rt = start(dir.path(), &["order", "point", "exchange"], |c| {
        c.admin_token = Some("bench".into());
        c.saga_deadlines.insert("order".into(), 120_000);
    })
    .await;
    let base = format!("http://{}", rt.http_addr());
    let http = reqwest::Client::new();
    for u in 0..USERS {
        http.post(format!("{base}/points"))
            .json(&serde_json::json!({"userId": format!("u{u}"), "point": 1_000_000_000}))
            .send()
            .await
            .unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let placer = {
        let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            let mut placed = Vec::new();
            for i in 0.. {
                tick.tick().await;
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (http, base) = (http.clone(), base.clone());
                placed.push(tokio::spawn(async move {
                    let body = serde_json::json!({
                        "holderId": format!("u{}", i % USERS), "currencyId": 1, "amount": 1
                    });
                    let resp = http.post(format!("{base}/orders")).json(&body).send().await;
                    assert_eq!(resp.unwrap().status(), 201);
                }));
            }
            for p in placed {
                p.await.unwrap();
            }
        })
    };
    // Let the stream settle (consumer start-up, warm caches), then swap back and forth in the
    // middle of it.
    const SWAPS: usize = 6;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let builds = [
        ("0.2.0", std::fs::read(guest_file("point_v2")).unwrap()),
        ("0.1.0", std::fs::read(guest_file("point")).unwrap()),
    ];
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    // (version, deploy sent, deploy accepted), host clock ms.
    let mut swaps = Vec::new();
    for k in 0..SWAPS {
        let (version, wasm) = &builds[k % 2];
        let sent_ms = now_ms();
        let resp = http
            .post(format!("{base}/_saga/admin/deploy"))
            .bearer_auth("bench")
            .header("x-saga-replace", "true")
            .body(wasm.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status();
        assert_eq!(status, 200, "{}", resp.text().await.unwrap_or_default());
        swaps.push((*version, sent_ms, now_ms()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    placer.await.unwrap();
    let orders = settled_orders(&http, &base).await;
    let approved = orders.iter().filter(|o| o["status"] == "APPROVED").count();
    assert_eq!(
        approved,
        orders.len(),
        "every saga of the stream is approved"
    );
    let mut call = Vec::new();
    let mut to_first = Vec::new();
    for (version, sent_ms, accepted_ms) in &swaps {
        let first: Option<i64> = saga_runtime::storage::query_scalar(
            "SELECT MIN(handled_ms) FROM inbox \
             WHERE service = 'point' AND version = $1 AND handled_ms >= $2",
        )
        .bind(*version)
        .bind(*sent_ms)
        .fetch_one(rt.db().pool())
        .await
        .unwrap();
        let first = first.expect("an event handled by the new version");
        call.push(Duration::from_millis((accepted_ms - sent_ms) as u64));
        to_first.push(Duration::from_millis((first - accepted_ms).max(0) as u64));
    }
    println!(
        "hot swap of point under load: {RATE} sagas/s offered, {} sagas, {SWAPS} deploys alternating 0.2.0 and 0.1.0, SQLite",
        orders.len()
    );
    report(
        "hot swap: deploy call (upload, compile, validate, smoke call, swap, record)",
        call,
    );
    report(
        "hot swap: deploy accepted -> first event handled by the new version",
        to_first,
    );
    let approved_in = |from: i64, to: i64| {
        orders
            .iter()
            .filter(|o| (from..to).contains(&o["updatedMs"].as_i64().unwrap()))
            .count() as f64
            * 1000.0
            / (to - from) as f64
    };
    let (start, end) = (swaps[0].1 - 2000, swaps[SWAPS - 1].1 + 1500);
    let during: Vec<String> = swaps
        .iter()
        .map(|(_, sent, _)| format!("{:.0}", approved_in(*sent, sent + 500)))
        .collect();
    println!(
        "hot swap throughput: {:.0} sagas/s approved in the 2 s before the first deploy, \
         {:.0}/s over the whole swapping period; in the 500 ms after each deploy was sent: {}",
        approved_in(start, swaps[0].1),
        approved_in(swaps[0].1, end),
        during.join(", ")
    );
    rt.shutdown().await;
}

/// `scripts/bench.sh [NAME…]`: run the benchmarks whose name contains a NAME (all if none):
/// `guest-call`, `saga`, `deadline-lag`, `hot-swap`.
fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing
    }
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| name.contains(o.as_str()));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        if wanted("guest-call") {
            bench_guest_call().await;
        }
        if wanted("saga") {
            bench_saga().await;
        }
        if wanted("deadline-lag") {
            bench_deadline_lag().await;
        }
        if wanted("hot-swap") {
            bench_hot_swap().await;
        }
    });
}
