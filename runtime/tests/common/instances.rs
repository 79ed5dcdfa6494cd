//! `runtime run` processes for tests that kill them (SIGKILL) and start them again, and a small
//! seeded generator for randomised loads.

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
            .stderr(Stdio::inherit());
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
