//! The saga benchmark: the deadline saga (order → exchange → point, SPEC B) driven over HTTP as
//! a web front end drives it, against one `runtime run` process (release build) on SQLite or
//! PostgreSQL and the test broker. Run with `scripts/bench.sh saga [options]`; prints numbers
//! and one `RESULT_JSON` line, asserts nothing about speed; exits non-zero only if an
//! invariant broke (points not conserved, an exchange for an order that was not approved…).
//!
//! Each saga: `POST /orders` (a random one of 100 users, each seeded with 10000 points; 1 in 20
//! orders is over the limit and is rejected by the point step; a `503` is waited out as its
//! `Retry-After` says and counted as shed), then `GET /orders/{id}` until it leaves `PENDING`:
//! held with `If-None-Match` and `Prefer: wait=30`, or with `--poll` polled with a 2 ms back-off
//! doubling to 16 ms (how the figures were taken); a `GET` answered `503` is waited out
//! the same way and counted as shed, not as an error. With `--keys` each `POST` carries an
//! `Idempotency-Key` of its own (the same on each try of one order), as a client that retries
//! safely sends it.
//! - closed loop (`--clients 8,128`): that many clients, each one saga after the other, until
//!   `--sagas` (3000) ended;
//! - open loop (`--rate R`): sagas started at R per second for `--seconds` (10), whatever
//!   is still running; `--find-rate` raises R by a quarter from `--rate` until p99 passes 1 s
//!   or a request fails, and reports the highest rate that stayed under.
//!
//! Reported per run: sagas/s; client-side latency (POST → seen settled) and host-side latency
//! (the order guest's `createdMs` → `updatedMs`, host clock) p50/p95/p99; HTTP errors by
//! status; CPU of the runtime, of the broker and (PostgreSQL) of the database server per saga
//! (/proc, user + system), how busy the whole machine was (`/proc/stat`) and how fast it was
//! just before the run (`machine_probe`, for comparing runs taken minutes apart); Kafka
//! transactions and events handled per saga (the runtime's `/_saga/stats`); on PostgreSQL the
//! database transactions per event (`pg_stat_database`). `--backend sqlite,postgres` (both by
//! default), `--short` for CI's quick form. Each backend's runs start on a freshly started,
//! empty broker ([`fresh_broker`]).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::instances::{config_file, Instance, Rng};
use common::orders::{self, Placed};
use common::{Backend, TestDb};
use serde_json::{json, Value};
use sqlx::Connection;

const USERS: usize = 100;
const POINTS: i64 = 10_000;
const SERVICES: &[&str] = &["order", "point", "exchange"];
/// The open-loop pass mark.
const P99_LIMIT_MS: f64 = 1000.0;
/// `--config TOML`: more of the runtime's configuration (e.g. "[kafka]\nfetch_wait_ms = 100").
static EXTRA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// `--poll`: clients poll for the outcome instead of holding a GET.
static POLL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// `--keys`: each order is posted with an `Idempotency-Key` of its own.
static KEYS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Debug, Clone)]
enum Load {
    Closed { clients: usize, sagas: usize },
    Open { rate: f64, seconds: f64 },
}

impl Load {
    fn name(&self) -> String {
        match self {
            Load::Closed { clients, sagas } => format!("closed {clients} clients, {sagas} sagas"),
            Load::Open { rate, seconds } => format!("open {rate:.0}/s for {seconds:.0} s"),
        }
    }
}

struct Args {
    backends: Vec<Backend>,
    clients: Vec<usize>,
    sagas: usize,
    rate: Option<f64>,
    find_rate: bool,
    seconds: f64,
}

fn args() -> Args {
    let mut a = Args {
        backends: vec![Backend::Sqlite, Backend::Postgres],
        clients: vec![8, 128],
        sagas: 3000,
        rate: None,
        find_rate: false,
        seconds: 10.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--bench" => {}
            "--backend" => {
                a.backends = value()
                    .split(',')
                    .map(|b| match b {
                        "sqlite" => Backend::Sqlite,
                        "postgres" => Backend::Postgres,
                        other => panic!("unknown backend {other} (sqlite, postgres)"),
                    })
                    .collect()
            }
            "--clients" => {
                a.clients = value()
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|c| c.parse().expect("--clients N[,N…]"))
                    .collect()
            }
            "--sagas" => a.sagas = value().parse().expect("--sagas N"),
            "--rate" => a.rate = Some(value().parse().expect("--rate R")),
            "--seconds" => a.seconds = value().parse().expect("--seconds S"),
            "--find-rate" => a.find_rate = true,
            "--poll" => POLL.store(true, Ordering::Relaxed),
            "--keys" => KEYS.store(true, Ordering::Relaxed),
            "--config" => {
                let _ = EXTRA.set(value().replace("\\n", "\n"));
            }
            "--short" => {
                a.backends = vec![Backend::Sqlite];
                a.clients = vec![8];
                a.sagas = 200;
                a.rate = Some(50.0);
                a.seconds = 2.0;
            }
            other => panic!(
                "unknown option {other}; options: --backend sqlite,postgres --clients 8,128 \
                 --sagas N --rate R --seconds S --find-rate --poll --keys --config TOML \
                 --short"
            ),
        }
    }
    a
}

/// What one saga looked like from the client.
struct Sample {
    client_ms: f64,
    host_ms: f64,
    /// The order's id and when the host created it (its `createdMs`), for the hops.
    id: String,
    created_ms: i64,
}

#[derive(Default)]
struct Tally {
    samples: Vec<Sample>,
    placed: Vec<Placed>,
    /// HTTP status (0: no answer) → how many requests got it.
    errors: HashMap<u16, usize>,
    /// `503`s (shed at the door) waited out and retried.
    shed: usize,
}

/// A running runtime with the saga's services on a fresh database, its users seeded.
struct Target {
    instance: Instance,
    db: TestDb,
    http: reqwest::Client,
    /// Every order placed over all runs, for the invariants at the end.
    placed: Mutex<Vec<Placed>>,
    _dir: tempfile::TempDir,
}

impl Target {
    async fn start(backend: Backend) -> Self {
        tokio::task::spawn_blocking(fresh_broker).await.unwrap();
        let db = TestDb::new(backend).await;
        let dir = tempfile::tempdir().unwrap();
        let config = config_file(dir.path(), &EXTRA.get().cloned().unwrap_or_default());
        let prefix = format!("bench{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let (url, p, c) = (db.url.clone(), prefix.clone(), config.clone());
        let instance =
            tokio::task::spawn_blocking(move || Instance::start("bench", &url, &p, &c, SERVICES))
                .await
                .unwrap();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(512)
            .build()
            .unwrap();
        let target = Target {
            instance,
            db,
            http,
            placed: Mutex::new(Vec::new()),
            _dir: dir,
        };
        for u in 0..USERS {
            let (status, reply) = common::post_json(
                &target.http,
                &target.instance.base,
                "/points",
                json!({"userId": format!("u{u}"), "point": POINTS}),
            )
            .await;
            assert_eq!(status, 200, "seeding points: {reply}");
        }
        // Before measuring: every consumer reads its partitions, the relay knows its slots.
        common::wait_ready(&target.http, &target.instance.base).await;
        target
    }

    async fn stats(&self) -> Value {
        common::get_json(&self.http, &self.instance.base, "/_saga/stats").await
    }

    /// The runtime's Prometheus exposition (`GET /metrics`).
    async fn metrics(&self) -> String {
        let url = format!("{}/metrics", self.instance.base);
        match self.http.get(url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

/// One saga: place an order, then look until it settled.
async fn saga(target: &Target, rng: &mut Rng, tally: &mut Tally) {
    let base = &target.instance.base;
    let user = format!("u{}", rng.below(USERS as u64));
    let amount = if rng.below(20) == 0 {
        20_000
    } else {
        1 + rng.below(1500) as i64
    };
    let started = Instant::now();
    let body = json!({"holderId": user, "currencyId": 1, "amount": amount});
    // A `503` is the runtime shedding load: wait as its `Retry-After` says, then try again,
    // as a well-behaved client does (the wait counts in the client-side latency).
    let mut shed = 0;
    let key = KEYS
        .load(Ordering::Relaxed)
        .then(|| uuid::Uuid::new_v4().simple().to_string());
    let order: Value = loop {
        let mut post = target.http.post(format!("{base}/orders")).json(&body);
        if let Some(key) = &key {
            post = post.header("idempotency-key", key);
        }
        let sent = post.send().await;
        match sent {
            Ok(r) if r.status().as_u16() == 201 => break r.json().await.unwrap_or(Value::Null),
            Ok(r) if r.status().as_u16() == 503 && shed < 30 => {
                shed += 1;
                tally.shed += 1;
                tokio::time::sleep(retry_after(&r)).await;
            }
            Ok(r) => {
                *tally.errors.entry(r.status().as_u16()).or_default() += 1;
                return;
            }
            Err(_) => {
                *tally.errors.entry(0).or_default() += 1;
                return;
            }
        }
    };
    let id = order["id"].as_str().unwrap_or_default().to_string();
    // Wait for the outcome with a held GET (If-None-Match + Prefer: wait), or poll it with
    // --poll (2 ms back-off doubling to 16 ms).
    let poll = POLL.load(Ordering::Relaxed);
    let mut pause = Duration::from_millis(2);
    let mut etag: Option<String> = None;
    let settled = loop {
        let mut get = target.http.get(format!("{base}/orders/{id}"));
        match (&etag, poll) {
            (Some(tag), false) => {
                get = get.header("if-none-match", tag).header("prefer", "wait=30")
            }
            (None, false) => {}
            (_, true) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(16));
            }
        }
        match get.send().await {
            Ok(r) if r.status().as_u16() == 304 => {}
            Ok(r) if r.status().is_success() => {
                etag = r
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                let o: Value = r.json().await.unwrap_or(Value::Null);
                if o["status"] != "PENDING" {
                    break o;
                }
            }
            // The door shedding a query too: waited out and asked again, not an error.
            Ok(r) if r.status().as_u16() == 503 => {
                tally.shed += 1;
                tokio::time::sleep(retry_after(&r)).await;
            }
            Ok(r) => *tally.errors.entry(r.status().as_u16()).or_default() += 1,
            Err(_) => *tally.errors.entry(0).or_default() += 1,
        }
        if started.elapsed() > Duration::from_secs(60) {
            *tally.errors.entry(0).or_default() += 1;
            return;
        }
    };
    let host =
        settled["updatedMs"].as_i64().unwrap_or(0) - settled["createdMs"].as_i64().unwrap_or(0);
    tally.samples.push(Sample {
        client_ms: started.elapsed().as_secs_f64() * 1000.0,
        host_ms: host as f64,
        id: id.clone(),
        created_ms: settled["createdMs"].as_i64().unwrap_or(0),
    });
    tally.placed.push(Placed { id, user, amount });
}

/// How long a `503` asks the client to wait (`Retry-After`, seconds; 1 if it does not say).
fn retry_after(r: &reqwest::Response) -> Duration {
    let secs = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1);
    Duration::from_secs(secs)
}

/// user + system CPU seconds of the processes `pids`.
fn cpu_seconds(pids: &[u32]) -> f64 {
    cpu_by_pid(pids).values().sum()
}

/// user + system CPU seconds of each of the processes `pids` that still runs.
fn cpu_by_pid(pids: &[u32]) -> HashMap<u32, f64> {
    let ticks = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|&pid| {
            Some((
                pid,
                std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?,
            ))
        })
        .map(|(pid, stat)| {
            // The fields after the command (which may hold spaces) in parentheses.
            let rest = &stat[stat.rfind(')').unwrap_or(0) + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            let cpu = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
            (pid, cpu / ticks)
        })
        .collect()
}

/// Context switches (voluntary and not) of the threads of `pid` alive now: the hand-offs
/// between threads that the runtime's CPU profile is dominated by. Threads that ended
/// meanwhile are not counted.
fn context_switches(pid: u32) -> i64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Restart the test broker on empty data (`scripts/broker.sh`): noida-db keeps every topic of
/// every earlier run in its state and grows slower with it (its CPU per saga at 8 clients on
/// PostgreSQL was 5.35 ms after a session of runs against 0.58–0.88 ms fresh), so each backend's
/// runs start on a fresh one.
fn fresh_broker() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/broker.sh");
    for step in ["stop", "start"] {
        let status = std::process::Command::new("bash")
            .args([script, step])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run scripts/broker.sh");
        assert!(status.success(), "scripts/broker.sh {step} failed");
    }
}

/// The broker's processes (the launcher and its server), by the port in their command line.
fn broker_pids() -> Vec<u32> {
    let port = common::brokers()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_string();
    let out = std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!("noida-db start --only kafka --kafka-port {port} "),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The processes of the machine's PostgreSQL server (postmaster and backends), when the run is
/// on PostgreSQL: their CPU is the database's share of the work. Backends that start and end
/// within the run are missed (the runtime's pool keeps its connections); those that start in
/// it count from their start.
fn postgres_pids(db: &TestDb) -> Vec<u32> {
    if !db.url.starts_with("postgres") {
        return Vec::new();
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .collect()
}

/// Busy and total CPU time of the whole machine so far (`/proc/stat`, in ticks): how close to
/// saturation a run was, whatever process did the work.
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: idle and iowait are not busy.
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// How fast this machine is right now, measured while nothing of the benchmark runs: random
/// 8-byte updates in a 32 MiB table on one thread for 300 ms, in millions per second. The
/// machine's speed swings by up to 2× within minutes (its neighbours): compare runs at similar
/// probes (it tracks their speed loosely, README).
fn machine_probe() -> f64 {
    const SLOTS: usize = 1 << 22;
    let mut table: Vec<u64> = (0..SLOTS as u64).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let (started, mut updates) = (Instant::now(), 0u64);
    while started.elapsed() < Duration::from_millis(300) {
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x as usize) & (SLOTS - 1);
            table[i] = table[i].wrapping_add(x);
        }
        updates += 10_000;
    }
    std::hint::black_box(&table);
    updates as f64 / started.elapsed().as_secs_f64() / 1e6
}

async fn pg_transactions(db: &TestDb) -> Option<i64> {
    if !db.url.starts_with("postgres") {
        return None;
    }
    let mut conn = sqlx::PgConnection::connect(&db.url).await.ok()?;
    // Counters of this database only; flushed by the backends at least every second or so.
    sqlx::query_scalar(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await
    .ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// `x` rounded to `digits` decimals.
fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn round1(x: f64) -> f64 {
    round(x, 1)
}

/// Run one load against `target` and report it.
async fn run(target: &Arc<Target>, load: &Load, seed: u64) -> Value {
    let probe = tokio::task::spawn_blocking(machine_probe)
        .await
        .unwrap_or(f64::NAN);
    let stats_before = target.stats().await;
    let metrics_before = target.metrics().await;
    let pg_before = pg_transactions(&target.db).await;
    let brokers = broker_pids();
    let database_before = cpu_by_pid(&postgres_pids(&target.db));
    let cpu_before = (cpu_seconds(&[target.instance.pid()]), cpu_seconds(&brokers));
    let machine_before = machine_ticks();
    let switches_before = context_switches(target.instance.pid());
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    match load {
        Load::Closed { clients, sagas } => {
            let next = Arc::new(AtomicUsize::new(0));
            for c in 0..*clients {
                let (target, tally, next, sagas) =
                    (target.clone(), tally.clone(), next.clone(), *sagas);
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let mut mine = Tally::default();
                    while next.fetch_add(1, Ordering::Relaxed) < sagas {
                        saga(&target, &mut rng, &mut mine).await;
                    }
                    merge(&tally, mine);
                }));
            }
        }
        Load::Open { rate, seconds } => {
            let n = (rate * seconds).round() as u64;
            let every = Duration::from_secs_f64(1.0 / rate);
            for i in 0..n {
                tokio::time::sleep_until((started + every.mul_f64(i as f64)).into()).await;
                let (target, tally) = (target.clone(), tally.clone());
                tasks.push(tokio::spawn(async move {
                    let mut rng = Rng(seed ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let mut mine = Tally::default();
                    saga(&target, &mut rng, &mut mine).await;
                    merge(&tally, mine);
                }));
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu_runtime = cpu_seconds(&[target.instance.pid()]) - cpu_before.0;
    let cpu_broker = cpu_seconds(&brokers) - cpu_before.1;
    // Backends the runtime's pool opened during the run count from their start.
    let cpu_database: f64 = cpu_by_pid(&postgres_pids(&target.db))
        .into_iter()
        .map(|(pid, cpu)| cpu - database_before.get(&pid).copied().unwrap_or(0.0))
        .sum();
    let machine_after = machine_ticks();
    let machine_busy = {
        let total = machine_after.1 - machine_before.1;
        if total > 0.0 {
            (machine_after.0 - machine_before.0) / total
        } else {
            f64::NAN
        }
    };
    let switches = context_switches(target.instance.pid()) - switches_before;
    let stats_after = target.stats().await;
    let metrics_after = target.metrics().await;
    // Mean time per stage over this run: exact (sum ÷ count of the histograms), not bucketed.
    let stage = |name: &str, only: &str| {
        let (sum, count) = histogram_totals(&metrics_after, name, only);
        let (sum0, count0) = histogram_totals(&metrics_before, name, only);
        let n = count - count0;
        if n > 0.0 {
            json!(round((sum - sum0) / n * 1000.0, 2))
        } else {
            Value::Null
        }
    };
    let pg_after = pg_transactions(&target.db).await;
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let done = tally.samples.len();
    let mut client: Vec<f64> = tally.samples.iter().map(|s| s.client_ms).collect();
    let mut host: Vec<f64> = tally.samples.iter().map(|s| s.host_ms).collect();
    client.sort_by(f64::total_cmp);
    host.sort_by(f64::total_cmp);
    let delta =
        |k: &str| stats_after[k].as_f64().unwrap_or(0.0) - stats_before[k].as_f64().unwrap_or(0.0);
    let per_saga = |x: f64| if done > 0 { x / done as f64 } else { f64::NAN };
    let events = delta("applied");
    let latency = |v: &[f64]| {
        json!({
            "p50": round1(percentile(v, 0.50)),
            "p95": round1(percentile(v, 0.95)),
            "p99": round1(percentile(v, 0.99)),
        })
    };
    let report = json!({
        "load": load.name(),
        "sagas": done,
        "seconds": round1(secs),
        "sagasPerSecond": round1(done as f64 / secs),
        "clientMs": latency(&client),
        "hostMs": latency(&host),
        "shedAndRetried": tally.shed,
        "errors": tally.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect::<HashMap<_, _>>(),
        "runtimeCpuMsPerSaga": round(per_saga(cpu_runtime * 1000.0), 2),
        "brokerCpuMsPerSaga": round(per_saga(cpu_broker * 1000.0), 2),
        // PostgreSQL's server processes (null on SQLite, which runs inside the runtime).
        "databaseCpuMsPerSaga": if database_before.is_empty() {
            Value::Null
        } else {
            json!(round(per_saga(cpu_database * 1000.0), 2))
        },
        // The share of the machine's CPU time in use during the run, by any process.
        "machineBusy": round(machine_busy, 2),
        "machineProbeMops": round1(probe),
        "kafkaTransactionsPerSaga": round(per_saga(delta("relay_batches")), 2),
        "eventsPerSaga": round(per_saga(events), 2),
        "conflictRerunsPerSaga": round(per_saga(delta("conflicts")), 2),
        // Events run again before their batch's commit on earlier events' writes
        // (`worker::chain`), instead of conflicting.
        "chainedPerSaga": round(per_saga(delta("chained")), 2),
        // Batches committed again with a savepoint per event (`Isolation::PerEvent`).
        "recommitsPerSaga": round(per_saga(delta("recommits")), 3),
        // Batch ends tried as one statement without a transaction (PostgreSQL) and committed
        // again in one (`Isolation::Alone`).
        "endsUndonePerSaga": round(per_saga(delta("ends_undone")), 3),
        // Groups of HTTP commands committed as one statement without a transaction
        // (PostgreSQL), and those committed again in one.
        "commandEndsAlonePerSaga": round(per_saga(delta("command_ends_alone")), 3),
        "commandEndsUndonePerSaga": round(per_saga(delta("command_ends_undone")), 3),
        "runtimeContextSwitchesPerSaga": round(per_saga(switches as f64), 1),
        "stageMeanMs": {
            "ingressWait": stage("saga_ingress_wait_seconds", ""),
            "relay": stage("saga_relay_delay_seconds", ""),
            "delivery": stage("saga_event_delivery_seconds", ""),
            "handling": stage("saga_handler_duration_seconds", "outcome=\"applied\""),
        },
        // Every statement the runtime sent (HTTP reads and the relay's too) per event applied.
        "dbStatementsPerEvent": if events > 0.0 {
            json!(round(delta("db_statements") / events, 2))
        } else {
            Value::Null
        },
        // The share of the run's wall time the SQLite write gate was held: near 1, the
        // single writer is the bound (0 on PostgreSQL, which has no gate).
        "writeGateBusy": round(delta("db_write_gate_held_us") / 1e6 / secs, 2),
        "dbTransactionsPerEvent": match (pg_before, pg_after) {
            (Some(a), Some(b)) if events > 0.0 => json!(round((b - a) as f64 / events, 2)),
            _ => Value::Null,
        },
    });
    let mut report = report;
    report["hopsP50Ms"] = hops(target, &tally.samples).await;
    report["slowest"] = slowest(target, &tally.samples).await;
    target.placed.lock().unwrap().extend(tally.placed);
    report
}

/// Sagas sampled for the hops.
const HOP_SAMPLES: usize = 100;

/// Where a saga's host-side time goes: from the order's creation, each step one service
/// handled (`service:type`, in the order they were handled) after the step before, p50 over
/// the sagas that took the most common path, among up to `HOP_SAMPLES` of the run's sagas
/// spread over it (their timelines, `GET /sagas/{id}`, read after the run).
async fn hops(target: &Target, samples: &[Sample]) -> Value {
    let every = samples.len().div_ceil(HOP_SAMPLES).max(1);
    let mut paths: HashMap<Vec<String>, Vec<Vec<f64>>> = HashMap::new();
    for s in samples.iter().step_by(every) {
        if let Some((names, times)) = steps(target, s).await {
            paths.entry(names).or_default().push(times);
        }
    }
    let sampled: usize = paths.values().map(Vec::len).sum();
    let Some((names, sagas)) = paths.into_iter().max_by_key(|(_, sagas)| sagas.len()) else {
        return Value::Null;
    };
    let hops: Vec<Value> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut v: Vec<f64> = sagas.iter().map(|t| t[i]).collect();
            v.sort_by(f64::total_cmp);
            json!([name, round1(percentile(&v, 0.50))])
        })
        .collect();
    json!({"sagas": sagas.len(), "of": sampled, "hops": hops})
}

/// Sagas shown by `slowest`.
const SLOWEST: usize = 5;

/// Where the time of the run's slowest sagas (host side) went: each one's host-side time and
/// its steps as `hops` reads them, slowest first. A tail the p50 path does not show.
async fn slowest(target: &Target, samples: &[Sample]) -> Value {
    let mut by_time: Vec<&Sample> = samples.iter().collect();
    by_time.sort_by(|a, b| b.host_ms.total_cmp(&a.host_ms));
    let mut shown = Vec::new();
    for s in by_time.into_iter().take(SLOWEST) {
        let Some((names, times)) = steps(target, s).await else {
            continue;
        };
        let steps: Vec<Value> = names
            .iter()
            .zip(&times)
            .map(|(n, t)| json!([n, t]))
            .collect();
        shown.push(json!({"hostMs": s.host_ms, "steps": steps}));
    }
    json!(shown)
}

/// One saga's steps from its timeline (`GET /sagas/{id}`): each step a service handled
/// (`service:type`, in the order handled) and the milliseconds since the step before (the first:
/// since the order's creation). Duplicates and failed attempts left out.
async fn steps(target: &Target, s: &Sample) -> Option<(Vec<String>, Vec<f64>)> {
    let url = format!("/sagas/{}", s.id);
    let timeline = common::get_json(&target.http, &target.instance.base, &url).await;
    let events = timeline["events"].as_array()?;
    let (mut names, mut times, mut before) = (Vec::new(), Vec::new(), s.created_ms);
    for e in events
        .iter()
        .filter(|e| e["outcome"] != "duplicate" && e["outcome"] != "failed")
    {
        let at = e["handledMs"].as_i64().unwrap_or(before);
        names.push(format!(
            "{}:{}",
            e["service"].as_str().unwrap_or(""),
            e["eventType"].as_str().unwrap_or("")
        ));
        times.push((at - before) as f64);
        before = at;
    }
    Some((names, times))
}

/// The `_sum` and `_count` of histogram `name` in a Prometheus exposition, added over its
/// series whose labels contain `only`.
fn histogram_totals(text: &str, name: &str, only: &str) -> (f64, f64) {
    let (sum_name, count_name) = (format!("{name}_sum"), format!("{name}_count"));
    let (mut sum, mut count) = (0.0, 0.0);
    for line in text.lines().filter(|l| l.contains(only)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let base = series.split('{').next().unwrap_or(series);
        if base == sum_name {
            sum += value;
        } else if base == count_name {
            count += value;
        }
    }
    (sum, count)
}

fn merge(into: &Mutex<Tally>, mine: Tally) {
    let mut t = into.lock().unwrap();
    t.samples.extend(mine.samples);
    t.placed.extend(mine.placed);
    t.shed += mine.shed;
    for (k, v) in mine.errors {
        *t.errors.entry(k).or_default() += v;
    }
}

fn print(backend: Backend, r: &Value) {
    println!(
        "{:<9} {:<32} {:>6} sagas {:>7.1}/s  client p50/p95/p99 {}/{}/{} ms  host {}/{}/{} ms  \
         shed {}  errors {}  cpu/saga runtime {} ms broker {} ms database {} ms  machine busy {} probe {}  txn/saga {}  events/saga {}  db statements/event {}  db txn/event {}  write gate busy {}  \
         conflicts/saga {}  chained/saga {}  recommits/saga {}  ends undone/saga {}  command ends alone/undone per saga {}/{}  switches/saga {}  stage means ms: ingress wait {} relay {} delivery {} handling {}  hops p50 ms {}",
        format!("{backend:?}"),
        r["load"].as_str().unwrap_or(""),
        r["sagas"],
        r["sagasPerSecond"].as_f64().unwrap_or(0.0),
        r["clientMs"]["p50"], r["clientMs"]["p95"], r["clientMs"]["p99"],
        r["hostMs"]["p50"], r["hostMs"]["p95"], r["hostMs"]["p99"],
        r["shedAndRetried"],
        r["errors"],
        r["runtimeCpuMsPerSaga"], r["brokerCpuMsPerSaga"], r["databaseCpuMsPerSaga"],
        r["machineBusy"], r["machineProbeMops"],
        r["kafkaTransactionsPerSaga"], r["eventsPerSaga"], r["dbStatementsPerEvent"],
        r["dbTransactionsPerEvent"], r["writeGateBusy"],
        r["conflictRerunsPerSaga"], r["chainedPerSaga"], r["recommitsPerSaga"],
        r["endsUndonePerSaga"], r["commandEndsAlonePerSaga"], r["commandEndsUndonePerSaga"],
        r["runtimeContextSwitchesPerSaga"],
        r["stageMeanMs"]["ingressWait"], r["stageMeanMs"]["relay"],
        r["stageMeanMs"]["delivery"], r["stageMeanMs"]["handling"],
        r["hopsP50Ms"],
    );
    let slowest: Vec<String> = r["slowest"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|saga| {
            let steps: Vec<String> = saga["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|step| format!("{} {}", step[0].as_str().unwrap_or(""), step[1]))
                .collect();
            format!("{} ({})", saga["hostMs"], steps.join(", "))
        })
        .collect();
    println!(
        "{:<9} slowest sagas, host ms (steps ms): {}",
        format!("{backend:?}"),
        slowest.join("; ")
    );
}

/// The invariants once every saga's compensations ran (a few seconds of grace for the last).
async fn check(target: &Target) -> Vec<String> {
    let placed = target.placed.lock().unwrap().clone();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let by_id = orders::stored(&target.http, &target.instance.base).await;
        let v = orders::verdict(
            &target.http,
            &target.instance.base,
            &placed,
            &by_id,
            USERS,
            POINTS,
        )
        .await
        .violations;
        if v.is_empty() || Instant::now() > until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let seed = common::instances::seed();
    let mut results = Vec::new();
    let mut broken = Vec::new();
    for &backend in &args.backends {
        let target = Arc::new(Target::start(backend).await);
        let mut loads: Vec<Load> = args
            .clients
            .iter()
            .map(|&clients| Load::Closed {
                clients,
                sagas: args.sagas,
            })
            .collect();
        if let Some(rate) = args.rate.filter(|_| !args.find_rate) {
            loads.push(Load::Open {
                rate,
                seconds: args.seconds,
            });
        }
        for load in &loads {
            let r = run(&target, load, seed).await;
            print(backend, &r);
            results.push(json!({"backend": format!("{backend:?}").to_lowercase(), "run": r}));
        }
        if args.find_rate {
            let mut rate = args.rate.unwrap_or(250.0);
            let mut best = Value::Null;
            loop {
                let load = Load::Open {
                    rate,
                    seconds: args.seconds,
                };
                let r = run(&target, &load, seed).await;
                print(backend, &r);
                let p99 = r["clientMs"]["p99"].as_f64().unwrap_or(f64::INFINITY);
                let failed = r["errors"].as_object().is_some_and(|e| !e.is_empty());
                results.push(json!({"backend": format!("{backend:?}").to_lowercase(), "run": r}));
                if failed || p99 > P99_LIMIT_MS {
                    break;
                }
                best = json!(rate);
                rate = (rate * 1.25).round();
            }
            println!("{backend:?}: highest offered rate with client p99 under {P99_LIMIT_MS} ms: {best} sagas/s");
            results.push(
                json!({"backend": format!("{backend:?}").to_lowercase(), "openLoopCapacity": best}),
            );
        }
        let violations = check(&target).await;
        if !violations.is_empty() {
            println!("{backend:?}: INVARIANTS BROKEN: {violations:#?}");
        } else {
            println!("{backend:?}: invariants hold (points conserved, exchanges exactly for approved orders)");
        }
        broken.extend(violations);
        target.db.drop_db().await;
    }
    println!(
        "RESULT_JSON {}",
        json!({"bench": "saga", "seed": seed, "results": results, "violations": broken.len()})
    );
    if !broken.is_empty() {
        std::process::exit(1);
    }
}
