//! The runtime's configuration: one typed struct, read from a TOML file, then overridden by
//! `SAGA_*` environment variables. Every field has a default, so an empty file is a valid
//! config that runs on an embedded SQLite database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::kafka;
use crate::limits;
use crate::wasm::Limits;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("could not read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid value {value:?} of {var}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0} is set by the runtime itself (its transactions, reads and positions rest on it) and cannot be configured")]
    Protected(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `sqlite://<file>` (embedded, the default: `sqlite://saga.db`) or
    /// `postgres://user@host/db` (several instances). Env `SAGA_DATABASE_URL`.
    pub database_url: String,
    /// Database connections per instance. Default 4 on SQLite, 8 on PostgreSQL
    /// ([`Config::connections`]).
    pub database_connections: Option<u32>,
    /// Address of the HTTP ingress serving the services' routes. Default `127.0.0.1:8088`;
    /// env `SAGA_HTTP_LISTEN`. Port 0 picks a free port.
    pub http_listen: SocketAddr,
    /// Name of this instance in leases and logs. Default: host name and process id.
    pub instance_id: String,
    /// Components to load at start-up (`.wasm` files). Env `SAGA_SERVICES`, comma-separated.
    pub services: Vec<PathBuf>,
    /// Directory of precompiled components. Default `.saga-cache`; env `SAGA_CACHE_DIR`.
    pub cache_dir: Option<PathBuf>,
    /// Saga deadline per service (ms) for deadlines set with `after-ms: none`; overrides what
    /// the service declares. `[saga_deadlines] order = 10000`. Default: none.
    pub saga_deadlines: std::collections::BTreeMap<String, u64>,
    /// Bearer token of the admin API (`runtime deploy`). Without one the admin API is off:
    /// it is never open without a token. Default none; env `SAGA_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
    pub kafka: kafka::Settings,
    /// Limits on requests, events and effects (`[limits]`, see `crate::limits`).
    pub limits: limits::Settings,
    pub sandbox: Sandbox,
    pub worker: Worker,
    pub relay: Relay,
    /// Flow control of the HTTP ingress (`[ingress]`, see `crate::admission`).
    pub ingress: crate::admission::Settings,
    /// How long what grows per request, event or saga is kept (`[retention]`).
    pub retention: crate::retention::Settings,
    /// Traces: sampling and their OTLP export (`[telemetry]`, see `crate::telemetry`).
    pub telemetry: crate::telemetry::Settings,
}

/// Limits of guest calls (`[sandbox]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sandbox {
    /// Linear memory one guest instance may use, MiB. Default 64.
    pub memory_mib: u64,
    /// Wall time one handler call may take before it is interrupted, ms. Default 2000.
    pub call_timeout_ms: u64,
    /// Guest instances alive at once. Default 64.
    pub max_instances: u32,
    /// How long a call waits for a free guest instance when all are in use, ms. Past it the
    /// call fails as a host fault: an event is retried without counting an attempt, a request
    /// gets `503` with `Retry-After`. Default 5000.
    pub instance_wait_ms: u64,
}

/// Event processing (`[worker]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Worker {
    /// Most events committed in one database transaction. Default 256.
    pub max_batch: usize,
    /// First retry delay after a handler failure, ms; doubles per attempt. Default 100.
    pub retry_backoff_ms: u64,
    /// Longest retry delay, ms. Default 10000.
    pub max_backoff_ms: u64,
    /// Saga deadline for services that declare none, ms. Default 10000.
    pub default_saga_deadline_ms: u64,
    /// How long this instance owns a topic partition of a service without renewing, ms: the
    /// partitions of an instance that died move to the others after this. Default 10000.
    pub partition_lease_ms: u64,
    /// How many recent events per service are kept with their inputs (the state the handler
    /// read) and effects, in the database, for `runtime deploy --verify` to replay; 0 records
    /// nothing. Default 50.
    pub verify_recent: usize,
    /// PostgreSQL: how many transactions a batch is committed in side by side, at most (one
    /// per 16 events), its partitions shared out between them (a partition's events stay in
    /// one, in order). SQLite has one writer: always 1 there. Default 2.
    pub commit_lanes: usize,
    /// An event that read a state key an event before it in its batch (and commit lane)
    /// writes is run again before the commit, reading those writes, instead of conflicting at
    /// the commit and waiting for the batch's next round (`worker::chain`). Off only to compare
    /// or to test the rounds. Default true.
    pub chain: bool,
}

/// The outbox relay (`[relay]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Relay {
    /// Most outbox rows per Kafka transaction. Default 500.
    pub batch_size: u32,
    /// Relay slots: the outbox is divided among this many publishing loops by message key
    /// (so one saga's events go out through one slot, in order), each leased like a
    /// partition, so relaying spreads over the instances. The same on every instance; at most
    /// 1024. Default 1: on one instance more slots mean more, smaller Kafka transactions
    /// (measured: 2.6 instead of 1.1 per saga with 4), which the test broker pays for.
    pub slots: u32,
    /// How often the relay looks for rows committed by other instances, ms. Commits of this
    /// instance wake it at once. Default 100.
    pub poll_interval_ms: u64,
    /// How long the relay lease lasts without renewal, ms. Default 10000.
    pub lease_ttl_ms: u64,
    /// What the relay published in this long before its broker connections dropped is
    /// published again once they are back (a restarting broker may lose a transaction it had
    /// just acknowledged; duplicates are absorbed by the consumers' inboxes). Published rows
    /// stay in the outbox, marked, this long. 0 turns it off (rows are deleted once
    /// published). Default 30000.
    pub republish_window_ms: u64,
    /// A record the broker has not acknowledged within this long fails its batch, which is
    /// then tried again (the rows stay): a broker that is down shows as relay retries instead
    /// of a relay that waits in silence. Default 10000.
    pub send_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "sqlite://saga.db".into(),
            database_connections: None,
            http_listen: ([127, 0, 0, 1], 8088).into(),
            instance_id: default_instance_id(),
            services: Vec::new(),
            cache_dir: Some(PathBuf::from(".saga-cache")),
            saga_deadlines: Default::default(),
            admin_token: None,
            kafka: kafka::Settings::default(),
            limits: limits::Settings::default(),
            sandbox: Sandbox::default(),
            worker: Worker::default(),
            relay: Relay::default(),
            ingress: Default::default(),
            retention: Default::default(),
            telemetry: Default::default(),
        }
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            memory_mib: 64,
            call_timeout_ms: 2000,
            max_instances: 64,
            instance_wait_ms: 5000,
        }
    }
}

impl Default for Worker {
    fn default() -> Self {
        Worker {
            max_batch: 256,
            retry_backoff_ms: 100,
            max_backoff_ms: 10_000,
            default_saga_deadline_ms: 10_000,
            partition_lease_ms: 10_000,
            verify_recent: 50,
            commit_lanes: 2,
            chain: true,
        }
    }
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            batch_size: 500,
            slots: 1,
            poll_interval_ms: 100,
            lease_ttl_ms: 10_000,
            republish_window_ms: 30_000,
            send_timeout_ms: 10_000,
        }
    }
}

fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}-{}", std::process::id())
}

impl Config {
    /// Read `path` (if given), then apply overrides from `env` (normally `std::env::var`).
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        let mut config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| Error::Parse {
                    path: path.to_path_buf(),
                    source,
                })?
            }
        };
        config.apply_env(env)?;
        if let Some(property) = config.kafka.protected_property() {
            return Err(Error::Protected(property));
        }
        Ok(config)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), Error> {
        if let Some(v) = env("SAGA_DATABASE_URL") {
            self.database_url = v;
        }
        if let Some(v) = env("SAGA_HTTP_LISTEN") {
            self.http_listen = v
                .parse()
                .map_err(|e: std::net::AddrParseError| Error::Env {
                    var: "SAGA_HTTP_LISTEN",
                    value: v.clone(),
                    reason: e.to_string(),
                })?;
        }
        if let Some(v) = env("SAGA_KAFKA_BROKERS") {
            self.kafka.brokers = v;
        }
        if let Some(v) = env("SAGA_KAFKA_TOPIC_PREFIX") {
            self.kafka.topic_prefix = v;
        }
        if let Some(v) = env("SAGA_SERVICES") {
            self.services = v
                .split(',')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect();
        }
        if let Some(v) = env("SAGA_CACHE_DIR") {
            self.cache_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = env("SAGA_INSTANCE_ID") {
            self.instance_id = v;
        }
        if let Some(v) = env("SAGA_ADMIN_TOKEN") {
            self.admin_token = Some(v).filter(|t| !t.is_empty());
        }
        if let Some(v) = env("SAGA_KAFKA_REST_MS") {
            self.kafka.rest_ms = number("SAGA_KAFKA_REST_MS", v)?;
        }
        if let Some(v) = env("SAGA_OTLP_ENDPOINT") {
            self.telemetry.otlp_endpoint = Some(v).filter(|e| !e.is_empty());
        }
        if let Some(v) = env("SAGA_RELAY_SLOTS") {
            self.relay.slots = number("SAGA_RELAY_SLOTS", v)?;
        }
        Ok(())
    }

    /// Database connections per instance: the configured number, else 4 on SQLite and 8 on
    /// PostgreSQL. SQLite lets one writer in at a time (the process's writers take turns at
    /// its write gate, `storage::Db::write_gate`); its connections serve reads meanwhile, and
    /// a statement holds one only while it runs.
    pub fn connections(&self) -> u32 {
        self.database_connections.unwrap_or(
            match crate::storage::Dialect::of_url(&self.database_url) {
                Ok(crate::storage::Dialect::Sqlite) => 4,
                _ => 8,
            },
        )
    }

    pub fn sandbox_limits(&self) -> Limits {
        Limits {
            memory_bytes: self.sandbox.memory_mib << 20,
            call_timeout: Duration::from_millis(self.sandbox.call_timeout_ms),
            max_instances: self.sandbox.max_instances,
            instance_wait: Duration::from_millis(self.sandbox.instance_wait_ms),
            scan_rows: self.limits.scan_rows.max(1),
        }
    }
}

/// A number from an environment variable, or the error naming it.
fn number<T: std::str::FromStr<Err = std::num::ParseIntError>>(
    var: &'static str,
    value: String,
) -> Result<T, Error> {
    value
        .parse()
        .map_err(|e: std::num::ParseIntError| Error::Env {
            var,
            reason: e.to_string(),
            value,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!(config.database_url, "sqlite://saga.db");
        assert_eq!(config.http_listen.port(), 8088);
        assert_eq!(config.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(config.sandbox.memory_mib, 64);
        assert_eq!(config.worker.default_saga_deadline_ms, 10_000);
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |k: &str| match k {
            "SAGA_DATABASE_URL" => Some("postgres://postgres@127.0.0.1/saga".to_string()),
            "SAGA_SERVICES" => Some("a.wasm,b.wasm".to_string()),
            _ => None,
        };
        let config = Config::load(None, env).unwrap();
        assert_eq!(config.database_url, "postgres://postgres@127.0.0.1/saga");
        assert_eq!(
            config.services,
            vec![PathBuf::from("a.wasm"), PathBuf::from("b.wasm")]
        );
    }

    /// `text` as a config file, loaded without environment overrides.
    fn load_text(text: &str) -> Result<Config, Error> {
        let path = std::env::temp_dir().join(format!("saga-config-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, text).unwrap();
        let loaded = Config::load(Some(&path), |_| None);
        std::fs::remove_file(&path).unwrap();
        loaded
    }

    #[test]
    fn librdkafka_properties_reach_every_client_and_consumers_get_their_own() {
        let config = load_text(
            "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\
             [kafka.consumer_properties]\n\"queued.min.messages\" = \"1000\"\n",
        )
        .unwrap();
        let client = config.kafka.client();
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(client.get("queued.min.messages"), None);
        assert_eq!(
            config.kafka.consumer_properties.get("queued.min.messages"),
            Some(&"1000".to_string())
        );
    }

    #[test]
    fn a_property_the_runtime_depends_on_is_refused_by_name() {
        for (section, key) in [
            ("properties", "transactional.id"),
            ("consumer_properties", "isolation.level"),
            ("consumer_properties", "enable.auto.commit"),
        ] {
            let err = load_text(&format!("[kafka.{section}]\n\"{key}\" = \"x\"\n")).unwrap_err();
            assert!(
                matches!(&err, Error::Protected(p) if p == &format!("kafka.{section}.\"{key}\"")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_bad_listen_address_names_the_variable() {
        let err = Config::load(None, |k| {
            (k == "SAGA_HTTP_LISTEN").then(|| "nowhere".into())
        })
        .unwrap_err();
        assert!(err.to_string().contains("SAGA_HTTP_LISTEN"), "{err}");
    }

    #[test]
    fn the_example_config_parses() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/runtime.toml");
        let config = Config::load(Some(&path), |_| None).unwrap();
        assert_eq!(config.services.len(), 3);
        assert_eq!(config.kafka.stall_reseek_ms, 1000);
        assert_eq!(config.connections(), 4, "SQLite's default");
    }

    #[test]
    fn connections_default_by_database_unless_configured() {
        let mut config = Config::default();
        assert_eq!(config.connections(), 4);
        config.database_url = "postgres://postgres@127.0.0.1/saga".into();
        assert_eq!(config.connections(), 8);
        config.database_connections = Some(2);
        assert_eq!(config.connections(), 2);
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<Config>("databse_url = 'x'").is_err());
    }
}
