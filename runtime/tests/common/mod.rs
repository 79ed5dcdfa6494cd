//! Shared test harness: real broker, real databases, real guests.
//!
//! - Broker: `SAGA_TEST_BROKERS` (scripts/test.sh starts noida-db and sets it). Required: a test
//!   that needs Kafka fails loudly without it rather than skipping.
//! - PostgreSQL: `SAGA_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`); each test
//!   gets a fresh database, dropped at the end.
//! - Guests: built from `guests/` once per test binary (cargo skips the work if up to date).
//! - Isolation: each runtime gets its own topic prefix, so tests share one broker safely.

#![allow(dead_code)]

pub mod instances;
pub mod orders;
pub mod shop;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use saga_runtime::config::Config;
use saga_runtime::node::{self, Handle, Options};
use serde_json::Value;
use sqlx::Connection;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generate one `#[tokio::test]` per storage backend for an `async fn(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            }
        )*
    };
}

/// The broker a test binary talks to instead of `SAGA_TEST_BROKERS`, set once (a test that
/// stops and restarts a broker of its own: `instances::Broker`).
static BROKERS: OnceLock<String> = OnceLock::new();

/// Point every helper of this test binary at `brokers` (before anything uses [`brokers`]).
pub fn use_brokers(brokers: &str) {
    BROKERS
        .set(brokers.to_string())
        .expect("use_brokers is called once per test binary");
}

pub fn brokers() -> String {
    if let Some(own) = BROKERS.get() {
        return own.clone();
    }
    std::env::var("SAGA_TEST_BROKERS").expect(
        "SAGA_TEST_BROKERS must name a Kafka-protocol broker (run the tests with scripts/test.sh, \
         which starts one)",
    )
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of a built guest component, building the guests on first use.
pub fn guest_path(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let target = root().join("guests/target");
        let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .current_dir(root())
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(root().join("guests/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .status()
            .expect("run cargo to build the guests");
        assert!(
            status.success(),
            "building the guests failed (the wasm32-wasip2 target is needed: scripts/test.sh installs it)"
        );
        target.join("wasm32-wasip2/release")
    });
    dir.join(format!("{name}.wasm"))
}

pub fn guest(name: &str) -> Vec<u8> {
    std::fs::read(guest_path(name)).expect("read guest component")
}

fn unique(tag: &str) -> String {
    format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A database for one test: a SQLite file in a temp dir or a fresh PostgreSQL database.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

fn pg_server() -> String {
    std::env::var("SAGA_TEST_POSTGRES").unwrap_or("postgres://postgres@127.0.0.1:5432".into())
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("saga.db").display());
                TestDb {
                    url,
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let name = unique("saga_test_");
                let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", pg_server()))
                    .await
                    .expect("connect to PostgreSQL (SAGA_TEST_POSTGRES)");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut admin)
                    .await
                    .unwrap();
                TestDb {
                    url: format!("{}/{name}", pg_server()),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
        }
    }

    pub async fn drop_db(&self) {
        if let Some(name) = &self.pg_name {
            if let Ok(mut admin) =
                sqlx::PgConnection::connect(&format!("{}/postgres", pg_server())).await
            {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await;
            }
        }
    }
}

/// A test configuration: fast retries, a free HTTP port, a private topic namespace.
pub fn config(db: &TestDb, services: &[&str]) -> Config {
    let mut config = Config {
        database_url: db.url.clone(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        instance_id: unique("test-"),
        services: services.iter().map(|s| guest_path(s)).collect(),
        cache_dir: Some(root().join("guests/target/cwasm-cache")),
        ..Config::default()
    };
    config.kafka.brokers = brokers();
    config.kafka.topic_prefix = format!("{}.", unique("t"));
    config.kafka.partitions = 2;
    config.worker.retry_backoff_ms = 10;
    config.worker.max_backoff_ms = 100;
    config.relay.poll_interval_ms = 50;
    // The first consumer-group joins on a freshly started broker can take seconds; tests that
    // are not about deadlines must not race the order service's 10 s one. Deadline tests set
    // their own.
    config.saga_deadlines.insert("order".into(), 60_000);
    config
}

/// A stopped [`TestRuntime`]: its database, and its configuration for a successor.
pub struct Stopped {
    pub db: TestDb,
    config: Config,
}

impl Stopped {
    /// Start a new instance on the same database and topics.
    pub async fn start(self, tweak: impl FnOnce(&mut Options)) -> TestRuntime {
        let mut config = self.config;
        config.http_listen = "127.0.0.1:0".parse().unwrap();
        TestRuntime::launch(self.db, config, tweak).await
    }
}

/// A running runtime plus an HTTP client pointed at it.
pub struct TestRuntime {
    pub handle: Handle,
    pub db: TestDb,
    config: Config,
    pub base: String,
    pub http: reqwest::Client,
}

impl TestRuntime {
    pub async fn start(backend: Backend, services: &[&str]) -> Self {
        Self::start_with(backend, services, |_| {}).await
    }

    pub async fn start_with(
        backend: Backend,
        services: &[&str],
        tweak: impl FnOnce(&mut Options),
    ) -> Self {
        let db = TestDb::new(backend).await;
        let config = config(&db, services);
        Self::launch(db, config, tweak).await
    }

    async fn launch(db: TestDb, config: Config, tweak: impl FnOnce(&mut Options)) -> Self {
        let mut options = Options::new(config);
        tweak(&mut options);
        let config = options.config.clone();
        let handle = node::start(options).await.expect("runtime starts");
        let base = format!("http://{}", handle.http_addr());
        TestRuntime {
            handle,
            db,
            config,
            base,
            http: http_client(),
        }
    }

    /// Stop this instance and start a new one on the same database and topics.
    pub async fn restart(self, tweak: impl FnOnce(&mut Options)) -> Self {
        self.halt().await.start(tweak).await
    }

    /// Stop this instance, keeping its database and topics for [`Stopped::start`].
    pub async fn halt(self) -> Stopped {
        self.handle.shutdown().await;
        Stopped {
            db: self.db,
            config: self.config,
        }
    }

    /// Start another instance on the same database and topics (as a second process would):
    /// its own instance id and HTTP port. Stop it with `Handle::shutdown` before `stop`.
    pub async fn sibling(&self, tweak: impl FnOnce(&mut Options)) -> Handle {
        let mut config = self.config.clone();
        config.http_listen = "127.0.0.1:0".parse().unwrap();
        config.instance_id = unique("test-");
        let mut options = Options::new(config);
        tweak(&mut options);
        node::start(options).await.expect("sibling starts")
    }

    pub fn prefix(&self) -> &str {
        &self.handle.config().kafka.topic_prefix
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        post_json(&self.http, &self.base, path, body).await
    }

    pub async fn get(&self, path: &str) -> Value {
        get_json(&self.http, &self.base, path).await
    }

    /// `GET` with the status: (status, JSON reply or `null`).
    pub async fn get_status(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Wait until `GET /readyz` answers `200` (see [`wait_ready`]); its detail.
    pub async fn ready(&self) -> Value {
        wait_ready(&self.http, &self.base).await
    }

    /// `POST /_saga/admin/deploy` with `token` (if any), meaning to replace a deployed service
    /// of the same name: (status, JSON reply or `null`).
    pub async fn deploy(&self, token: Option<&str>, wasm: Vec<u8>) -> (u16, Value) {
        let mut req = self
            .http
            .post(format!("{}/_saga/admin/deploy", self.base))
            .header("x-saga-replace", "true")
            .body(wasm);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn stop(self) {
        self.handle.shutdown().await;
        self.db.drop_db().await;
    }
}

/// Run the `runtime` CLI with `envs` set: whether it succeeded, its stdout and its stderr. It
/// runs beside the test's own runtime (no blocked worker thread) and is killed after two
/// minutes, which fails the test instead of hanging it.
pub async fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(args)
        .envs(envs.iter().copied())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap_or_else(|_| panic!("runtime {args:?} did not finish within 120 s"))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An HTTP client for tests: a request the runtime never answers fails the test instead of
/// hanging it.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// `POST base+path` with a JSON body: the status and the JSON reply (`null` if none).
pub async fn post_json(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let resp = http
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `GET base+path`: the JSON reply (`null` if none).
pub async fn get_json(http: &reqwest::Client, base: &str, path: &str) -> Value {
    let resp = http.get(format!("{base}{path}")).send().await.unwrap();
    resp.json().await.unwrap_or(Value::Null)
}

/// Wait until `GET {base}/readyz` answers `200` — every service's partitions assigned and its
/// consumer reading, the relay's slots known — and return its detail.
pub async fn wait_ready(http: &reqwest::Client, base: &str) -> Value {
    eventually("the runtime to be ready", || async {
        let resp = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let detail = resp.json().await.unwrap_or(Value::Null);
        match status {
            200 => Ok(detail),
            _ => Err(format!("{status} {detail}")),
        }
    })
    .await
}

/// Every item of a listing route, page by page (`?after=` the value of `cursor` in the last
/// item of the previous page).
pub async fn get_all(http: &reqwest::Client, base: &str, path: &str, cursor: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let page_path = match all.last() {
            None => path.to_string(),
            Some(last) => format!("{path}?after={}", last[cursor].as_str().unwrap()),
        };
        let page = get_json(http, base, &page_path).await;
        let items = page
            .as_array()
            .unwrap_or_else(|| panic!("GET {page_path}: {page}"))
            .clone();
        if items.is_empty() {
            return all;
        }
        all.extend(items);
    }
}

/// One handled event of a saga's timeline (`GET /sagas/{id}`).
#[derive(Debug)]
pub struct Handled {
    pub service: String,
    /// The version of the service that handled it.
    pub version: String,
    pub event_type: String,
    pub outcome: String,
    pub handled_ms: i64,
}

impl Handled {
    /// A failed attempt or a duplicate delivery, not how the service finished with the event.
    pub fn is_attempt(&self) -> bool {
        self.outcome == "failed" || self.outcome == "duplicate"
    }
}

/// Every event of a saga any service handled, in the order handled.
pub async fn timeline(rt: &TestRuntime, saga: &str) -> Vec<Handled> {
    let t = rt.get(&format!("/sagas/{saga}")).await;
    t["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_string();
            Handled {
                service: s("service"),
                version: s("version"),
                event_type: s("eventType"),
                outcome: s("outcome"),
                handled_ms: e["handledMs"].as_i64().unwrap(),
            }
        })
        .collect()
}

/// Wait until the saga's timeline has every one of `want` (service, event type, outcome); an
/// outcome of `"*"` matches any final one (not a failed attempt or a duplicate). Returns the
/// timeline.
pub async fn timeline_has(
    rt: &TestRuntime,
    saga: &str,
    want: &[(&str, &str, &str)],
) -> Vec<Handled> {
    eventually("the saga's timeline", || async {
        let t = timeline(rt, saga).await;
        let has = |(s, ty, o): &(&str, &str, &str)| {
            t.iter().any(|h| {
                h.service == *s
                    && h.event_type == *ty
                    && (h.outcome == *o || (*o == "*" && !h.is_attempt()))
            })
        };
        if want.iter().all(has) {
            Ok(t)
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await
}

/// Wait until the hostile fixture has handled event `id`: its inbox outcome and detail.
pub async fn hostile_outcome(rt: &TestRuntime, id: &str) -> (String, String) {
    eventually(&format!("an outcome for {id}"), || async {
        let found = saga_runtime::storage::inbox::outcome(rt.handle.db(), "hostile", id)
            .await
            .unwrap();
        match found {
            Some((outcome, detail)) => Ok((outcome, detail.unwrap_or_default())),
            None => Err("not handled yet".into()),
        }
    })
    .await
}

/// Wait until the deadline saga's order `id` has status `want`; returns it.
pub async fn order_status(rt: &TestRuntime, id: &str, want: &str) -> Value {
    eventually(&format!("order {id} to be {want}"), || async {
        let order = rt.get(&format!("/orders/{id}")).await;
        if order["status"] == want {
            Ok(order)
        } else {
            Err(order.to_string())
        }
    })
    .await
}

/// Wait until `probe` returns `Some`, polling an observable outcome; panics after 30 s with
/// the last thing seen.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        match probe().await {
            Ok(v) => return v,
            Err(seen) => last = seen,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}; last seen: {last}");
}

/// Produce one CloudEvent straight to a topic, bypassing the outbox (for redelivery tests).
pub async fn produce_event(
    prefix: &str,
    topic: &str,
    id: &str,
    event_type: &str,
    subject: &str,
    data: &Value,
) {
    produce_raw(
        prefix,
        topic,
        subject,
        &cloudevent_headers(id, event_type, subject),
        &serde_json::to_vec(data).unwrap(),
    )
    .await
}

/// The CloudEvents headers of a JSON event from the tests.
pub fn cloudevent_headers<'a>(
    id: &'a str,
    event_type: &'a str,
    subject: &'a str,
) -> [(&'static str, &'a str); 6] {
    [
        ("ce_specversion", "1.0"),
        ("ce_id", id),
        ("ce_type", event_type),
        ("ce_source", "/test"),
        ("ce_subject", subject),
        ("content-type", "application/json"),
    ]
}

/// `headers` as a Kafka record's.
pub fn owned_headers(headers: &[(&str, &str)]) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    headers.iter().fold(OwnedHeaders::new(), |hs, (k, v)| {
        hs.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        })
    })
}

pub async fn produce_raw(
    prefix: &str,
    topic: &str,
    key: &str,
    headers: &[(&str, &str)],
    payload: &[u8],
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    static PRODUCER: OnceLock<FutureProducer> = OnceLock::new();
    let producer = PRODUCER.get_or_init(|| {
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .create()
            .unwrap()
    });
    let headers = owned_headers(headers);
    let topic = format!("{prefix}{topic}");
    producer
        .send(
            FutureRecord::to(&topic)
                .key(key)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce test event");
}

/// Read every record of a topic (read_committed) until `n` have arrived.
pub async fn consume_n(prefix: &str, topic: &str, n: usize) -> Vec<rdkafka::message::OwnedMessage> {
    read_matching(&brokers(), &format!("{prefix}{topic}"), n, |_| true).await
}

/// The first `n` records of (physical) `topic` on the broker at `brokers` that are `wanted`,
/// read_committed from the start; panics after 30 s without them.
pub async fn read_matching(
    brokers: &str,
    topic: &str,
    n: usize,
    wanted: impl Fn(&rdkafka::message::OwnedMessage) -> bool,
) -> Vec<rdkafka::message::OwnedMessage> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader-"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => {
                let m = m.detach();
                if wanted(&m) {
                    out.push(m);
                }
            }
            Ok(Err(e)) => panic!("consuming {topic}: {e}"),
            Err(_) => panic!("only {} of {n} records arrived on {topic}", out.len()),
        }
    }
    out
}

/// A `read_committed` reader of partition 0 of `topic` from `offset`, without a group.
pub fn committed_reader_at(topic: &str, offset: i64) -> rdkafka::consumer::StreamConsumer {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let c: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition_offset(topic, 0, rdkafka::Offset::Offset(offset))
        .unwrap();
    c.assign(&list).unwrap();
    c
}

pub fn header(m: &rdkafka::message::OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::{Headers, Message};
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn shared<T>(v: T) -> Arc<T> {
    Arc::new(v)
}
