//! `runtime run` processes for tests that kill them (SIGKILL) and start them again, a broker
//! and a PostgreSQL server a test may stop and start again, and a small seeded generator for
//! randomised loads.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::{brokers, guest_path};

/// One `runtime run` process.
pub struct Instance {
    pub id: String,
    child: Child,
    pub base: String,
}

impl Instance {
    /// Start `runtime run --config CONFIG` on `database_url` with `services` (guest names) and
    /// wait until it serves.
    pub fn start(
        id: &str,
        database_url: &str,
        prefix: &str,
        config: &Path,
        services: &[&str],
    ) -> Self {
        Self::start_on(id, database_url, &brokers(), prefix, config, services)
    }

    /// [`Instance::start`] against the broker at `brokers`.
    pub fn start_on(
        id: &str,
        database_url: &str,
        brokers: &str,
        prefix: &str,
        config: &Path,
        services: &[&str],
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runtime"));
        cmd.args(["run", "--config"])
            .arg(config)
            .args(["--http", "127.0.0.1:0"])
            .env("SAGA_DATABASE_URL", database_url)
            .env("SAGA_KAFKA_BROKERS", brokers)
            .env("SAGA_KAFKA_TOPIC_PREFIX", prefix)
            .env("SAGA_INSTANCE_ID", id)
            .env(
                "SAGA_LOG",
                std::env::var("SAGA_TEST_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log_to(id));
        for s in services {
            cmd.arg("--service").arg(guest_path(s));
        }
        let mut child = cmd.spawn().expect("start the runtime binary");
        // It prints `runtime listening on http://ADDR` once it serves.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("runtime listening on ")
            .unwrap_or_else(|| panic!("instance {id} did not start: {line:?}"))
            .to_string();
        Instance {
            id: id.into(),
            child,
            base,
        }
    }

    /// The process id (for its CPU time in /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown, no lease released, a batch and a Kafka transaction maybe half done.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write a `runtime.toml` into `dir`: the tests' cache of precompiled components, then `rest`.
pub fn config_file(dir: &Path, rest: &str) -> std::path::PathBuf {
    let cache = guest_path("order")
        .parent()
        .unwrap()
        .join("../../cwasm-cache");
    let path = dir.join("runtime.toml");
    std::fs::write(&path, format!("cache_dir = {cache:?}\n{rest}")).unwrap();
    path
}

/// A small deterministic generator: the same seed gives the same load.
pub struct Rng(pub u64);

impl Rng {
    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// The seed of a randomised test: `TEST_SEED` if given, else the clock; printed either way.
pub fn seed() -> u64 {
    let seed = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("TEST_SEED={seed}");
    seed
}

/// A noida-db broker of one test's own (`scripts/broker.sh` on a free port), which the test may
/// stop and start again on the data it saved, as a broker restart does. Stopped, and its data
/// deleted, when dropped.
pub struct Broker {
    pub port: u16,
}

impl Broker {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let broker = Broker { port };
        broker.script("start", false);
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop it (its state is saved in its data directory).
    pub fn stop(&self) {
        self.script("stop", false);
    }

    /// Start it again on the state the stop saved.
    pub fn resume(&self) {
        self.script("start", true);
    }

    fn script(&self, action: &str, keep: bool) {
        let out = Command::new(super::root().join("scripts/broker.sh"))
            .arg(action)
            .env("SAGA_BROKER_PORT", self.port.to_string())
            .env("SAGA_BROKER_KEEP", if keep { "1" } else { "0" })
            .output()
            .expect("run scripts/broker.sh");
        assert!(
            out.status.success(),
            "scripts/broker.sh {action} on port {} failed: {}",
            self.port,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.script("clean", false);
    }
}

/// Stop the machine's PostgreSQL cluster (the one the tests use), wait `down`, start it again
/// and wait until it accepts connections: what a database restart looks like to the runtime.
/// Needs Debian's `pg_ctlcluster` (as on these machines); a test that asks for it fails
/// without it rather than skipping.
pub fn restart_postgres(down: std::time::Duration) {
    postgres("stop");
    std::thread::sleep(down);
    postgres("start");
}

/// `pg_ctlcluster … main <action>` of the machine's cluster; after `start`, wait until it
/// accepts connections.
pub fn postgres(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("restarting PostgreSQL needs Debian's /etc/postgresql (or FAULT_PG_RESTART=0)")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("a PostgreSQL cluster under /etc/postgresql");
    let out = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", action])
        .output()
        .expect("run pg_ctlcluster");
    assert!(
        out.status.success(),
        "pg_ctlcluster {action} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if action != "start" {
        return;
    }
    for _ in 0..100 {
        let ready = Command::new("pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", "5432"])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("PostgreSQL did not come back within 10 s of its start");
}

/// Where instance `id` logs: the test's stderr, or `$SAGA_TEST_LOG_DIR/<id>.log` (appended
/// to across restarts) when that is set, so the instances of a fault run can be told apart.
fn log_to(id: &str) -> Stdio {
    let Ok(dir) = std::env::var("SAGA_TEST_LOG_DIR") else {
        return Stdio::inherit();
    };
    std::fs::create_dir_all(&dir).expect("create SAGA_TEST_LOG_DIR");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(&dir).join(format!("{id}.log")))
        .map(Stdio::from)
        .expect("open the instance's log file")
}
