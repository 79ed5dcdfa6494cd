//! `runtime`: the saga runtime's command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use saga_runtime::config::Config;
use saga_runtime::node::{self, Options};

#[derive(Parser)]
#[command(
    name = "runtime",
    version,
    about = "WebAssembly-pluggable saga runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an instance: consume, relay, serve HTTP, until Ctrl-C or SIGTERM.
    ///
    /// Configuration comes from the TOML file (every field optional, see README), then from
    /// SAGA_* environment variables, then from these flags.
    Run {
        /// TOML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Database URL: sqlite://FILE (default sqlite://saga.db) or postgres://…
        #[arg(long)]
        database_url: Option<String>,
        /// Kafka bootstrap servers (default 127.0.0.1:9092).
        #[arg(long)]
        brokers: Option<String>,
        /// HTTP listen address (default 127.0.0.1:8088).
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// A component to load at start-up; repeat for several.
        #[arg(long = "service", value_name = "WASM")]
        services: Vec<PathBuf>,
    },
    /// Compile a component and print what it declares (name, version, subscriptions, routes).
    Describe { wasm: PathBuf },
    /// Deploy a component to a running runtime: it is validated (compiles, matches our world,
    /// `describe` answers) and then runs; a running version of the service is swapped in place.
    Deploy {
        wasm: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
        /// First replay the recent events the runtime recorded for this service through the new
        /// version in a sandbox (no state or Kafka touched) and print, per event, where its
        /// effects differ from what the active version produced. Deploys only if none differ
        /// or fail, unless --yes.
        #[arg(long)]
        verify: bool,
        /// With --verify: deploy even if some replayed events differ or fail.
        #[arg(long, requires = "verify")]
        yes: bool,
        /// Replace the deployed service of the same name (a new version). Without it, deploying
        /// a component whose service is already deployed is refused.
        #[arg(long)]
        replace: bool,
    },
    /// Make an earlier version of a service active again on every instance (default: the one
    /// before the active version; after an undeploy, the version that was stopped).
    Rollback {
        service: String,
        /// The version to reactivate.
        version: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop a service on every instance. Its events wait on their topics for a later deploy.
    Undeploy {
        service: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the services a runtime runs: name, version, digest, subscriptions, routes.
    Services {
        #[arg(
            long,
            default_value = "http://127.0.0.1:8088",
            env = "SAGA_RUNTIME_URL"
        )]
        runtime: String,
    },
    /// The deployment history of a service, newest first; `*` marks the active version.
    Versions {
        service: String,
        #[arg(
            long,
            default_value = "http://127.0.0.1:8088",
            env = "SAGA_RUNTIME_URL"
        )]
        runtime: String,
    },
    /// Dead-lettered events: list them, or send them back to the topic they failed on.
    #[command(subcommand)]
    Dlt(DltCommand),
    /// Outbox rows the broker refused for good (parked by the relay so the rest flows): list
    /// them, or put them back for the relay to try again.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Print the timeline of one saga: every event each service handled, and its deadlines.
    Trace {
        saga: String,
        /// Base URL of a running runtime.
        #[arg(
            long,
            default_value = "http://127.0.0.1:8088",
            env = "SAGA_RUNTIME_URL"
        )]
        runtime: String,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Print the parked rows: id, event, topic, size and the broker's reason.
    Parked {
        #[arg(
            long,
            default_value = "http://127.0.0.1:8088",
            env = "SAGA_RUNTIME_URL"
        )]
        runtime: String,
    },
    /// Put parked rows back at the end of the outbox.
    Redrive {
        /// The parked row with this id (repeatable).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<i64>,
        /// Every parked row.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum DltCommand {
    /// Print the dead-lettered events of a topic (`payment` or `payment.dlt`): event, saga,
    /// reason, attempts, and where it failed.
    List {
        topic: String,
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead-lettered events back to the topic they failed on (e.g. after deploying a
    /// fixed handler). The failed service handles each once more; re-driving an event that has
    /// since been applied is a no-op.
    Redrive {
        topic: String,
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Re-drive the events with this id (repeatable).
        #[arg(long = "event", value_name = "ID")]
        events: Vec<String>,
        /// Re-drive the record at PARTITION:OFFSET of the dead-letter topic (repeatable).
        #[arg(long = "offset", value_name = "PARTITION:OFFSET", value_parser = partition_offset)]
        offsets: Vec<(i32, i64)>,
        /// Re-drive every dead-lettered event of the topic.
        #[arg(long, conflicts_with_all = ["events", "offsets"])]
        all: bool,
    },
}

/// A running runtime and its admin token.
#[derive(clap::Args)]
struct AdminArgs {
    /// Base URL of a running runtime.
    #[arg(
        long,
        default_value = "http://127.0.0.1:8088",
        env = "SAGA_RUNTIME_URL"
    )]
    runtime: String,
    /// The runtime's admin token.
    #[arg(long, env = "SAGA_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
}

impl AdminArgs {
    /// POST to the admin API; the reply, or the refusal's reason as the error.
    async fn post(
        &self,
        path: &str,
        body: reqwest::Body,
        content_type: &str,
    ) -> anyhow::Result<serde_json::Value> {
        self.post_with(path, body, content_type, &[]).await
    }

    /// [`AdminArgs::post`] with extra headers.
    async fn post_with(
        &self,
        path: &str,
        body: reqwest::Body,
        content_type: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}/_saga/admin/{path}", self.runtime.trim_end_matches('/'));
        let mut request = http()?.post(&url);
        for (k, v) in extra {
            request = request.header(*k, *v);
        }
        let resp = request
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .header(
                "x-saga-deployed-by",
                std::env::var("USER").unwrap_or_else(|_| "runtime cli".into()),
            )
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!(
                "{status}: {}",
                body["error"].as_str().unwrap_or("no reason given")
            );
        }
        Ok(body)
    }
}

/// Where Kafka is, for commands that talk to it directly.
#[derive(clap::Args)]
struct KafkaArgs {
    /// TOML config file (its `[kafka]` section is used).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (default: config, SAGA_KAFKA_BROKERS, 127.0.0.1:9092).
    #[arg(long)]
    brokers: Option<String>,
    /// Topic prefix (default: config, SAGA_KAFKA_TOPIC_PREFIX, none).
    #[arg(long)]
    topic_prefix: Option<String>,
}

impl KafkaArgs {
    fn settings(self) -> anyhow::Result<saga_runtime::kafka::Settings> {
        let config = Config::load(self.config.as_deref(), |k| std::env::var(k).ok())?;
        let mut kafka = config.kafka;
        if let Some(brokers) = self.brokers {
            kafka.brokers = brokers;
        }
        if let Some(prefix) = self.topic_prefix {
            kafka.topic_prefix = prefix;
        }
        Ok(kafka)
    }
}

fn partition_offset(s: &str) -> Result<(i32, i64), String> {
    let (p, o) = s
        .split_once(':')
        .ok_or_else(|| format!("expected PARTITION:OFFSET, got {s:?}"))?;
    Ok((
        p.parse().map_err(|e| format!("partition {p:?}: {e}"))?,
        o.parse().map_err(|e| format!("offset {o:?}: {e}"))?,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SAGA_LOG")
                .unwrap_or_else(|_| "info,rdkafka=warn,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            config,
            database_url,
            brokers,
            http,
            services,
        } => {
            let mut config = Config::load(config.as_deref(), |k| std::env::var(k).ok())?;
            if let Some(url) = database_url {
                config.database_url = url;
            }
            if let Some(brokers) = brokers {
                config.kafka.brokers = brokers;
            }
            if let Some(http) = http {
                config.http_listen = http;
            }
            config.services.extend(services);
            let handle = node::start(Options::new(config)).await?;
            println!("runtime listening on http://{}", handle.http_addr());
            wait_for_signal().await?;
            tracing::info!("shutting down");
            handle.shutdown().await;
            Ok(())
        }
        Command::Trace { saga, runtime } => trace(&runtime, &saga).await,
        Command::Dlt(command) => dlt(command).await,
        Command::Outbox(command) => outbox(command).await,
        Command::Services { runtime } => {
            let list =
                get_json(&format!("{}/_saga/services", runtime.trim_end_matches('/'))).await?;
            for s in list.as_array().into_iter().flatten() {
                println!(
                    "{:<12} {:<10} sha256:{}",
                    s["service"].as_str().unwrap_or(""),
                    s["version"].as_str().unwrap_or(""),
                    s["digest"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Command::Versions { service, runtime } => {
            let url = format!(
                "{}/_saga/services/{service}/versions",
                runtime.trim_end_matches('/')
            );
            let list = get_json(&url).await?;
            for (i, d) in list.as_array().into_iter().flatten().enumerate() {
                let when = std::time::UNIX_EPOCH
                    + std::time::Duration::from_millis(d["deployedMs"].as_i64().unwrap_or(0) as u64);
                let action = d["action"].as_str().unwrap_or("");
                let active = i == 0 && action != "undeploy";
                println!(
                    "{} {:<10} sha256:{}  {}  {:<8} by {}",
                    if active { "*" } else { " " },
                    d["version"].as_str().unwrap_or(""),
                    d["digest"].as_str().unwrap_or(""),
                    humantime::format_rfc3339_seconds(when),
                    action,
                    d["deployedBy"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Command::Deploy {
            wasm,
            admin,
            verify,
            yes,
            replace,
        } => {
            let bytes =
                std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
            if verify {
                let report = admin
                    .post("verify", bytes.clone().into(), "application/wasm")
                    .await
                    .context("verify refused the component; nothing was deployed")?;
                let differing = print_verified(&report);
                if differing > 0 && !yes {
                    anyhow::bail!(
                        "not deployed: {differing} replayed event(s) differ or fail \
                         (deploy with --yes to accept the differences)"
                    );
                }
            }
            deploy(&wasm, bytes, &admin, replace).await
        }
        Command::Rollback {
            service,
            version,
            admin,
        } => {
            let body = serde_json::json!({ "service": service, "version": version });
            let reply = admin
                .post("rollback", body.to_string().into(), "application/json")
                .await?;
            print_activated(&reply);
            Ok(())
        }
        Command::Undeploy { service, admin } => {
            let body = serde_json::json!({ "service": service });
            let reply = admin
                .post("undeploy", body.to_string().into(), "application/json")
                .await?;
            println!(
                "undeployed {} {} sha256:{}",
                reply["service"].as_str().unwrap_or(""),
                reply["version"].as_str().unwrap_or(""),
                reply["digest"].as_str().unwrap_or("")
            );
            Ok(())
        }
        Command::Describe { wasm } => {
            let bytes =
                std::fs::read(&wasm).with_context(|| format!("reading {}", wasm.display()))?;
            let config = Config::default();
            let sandbox = saga_runtime::wasm::Sandbox::new(config.sandbox_limits(), None)?;
            // Off the async runtime: WASI calls of the guest block.
            let guest = tokio::task::spawn_blocking(move || sandbox.load(&bytes)).await??;
            println!("{}", serde_json::to_string_pretty(&guest.manifest)?);
            println!("sha256: {}", guest.digest);
            Ok(())
        }
    }
}

async fn outbox(command: OutboxCommand) -> anyhow::Result<()> {
    match command {
        OutboxCommand::Parked { runtime } => {
            let base = runtime.trim_end_matches('/');
            let mut after = 0;
            loop {
                let url = format!("{base}/_saga/outbox/parked?after={after}&limit=1000");
                let page = get_json(&url).await?;
                for p in page["parked"].as_array().into_iter().flatten() {
                    println!(
                        "{:<8} {:<38} {:<24} {:>9} B  {}",
                        p["id"],
                        p["eventId"].as_str().unwrap_or(""),
                        p["topic"].as_str().unwrap_or(""),
                        p["size"],
                        p["reason"].as_str().unwrap_or("")
                    );
                }
                match page["next"].as_i64() {
                    Some(next) => after = next,
                    None => return Ok(()),
                }
            }
        }
        OutboxCommand::Redrive { ids, all, admin } => {
            if ids.is_empty() && !all {
                anyhow::bail!("name rows with --id, or --all");
            }
            let body = serde_json::json!({ "ids": ids, "all": all });
            let reply = admin
                .post(
                    "outbox/redrive",
                    body.to_string().into(),
                    "application/json",
                )
                .await?;
            println!("{} row(s) back in the outbox", reply["redriven"]);
            Ok(())
        }
    }
}

async fn dlt(command: DltCommand) -> anyhow::Result<()> {
    use saga_runtime::dlt;
    match command {
        DltCommand::List { topic, kafka, json } => {
            let settings = kafka.settings()?;
            let dlt_topic = dlt::dlt_topic(&topic);
            let entries =
                tokio::task::spawn_blocking(move || dlt::list(&settings, &topic)).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(());
            }
            println!("{} dead-lettered event(s) on {dlt_topic}", entries.len());
            for e in &entries {
                let s = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                println!(
                    "  {}:{}  event {}  {}  saga {}  failed in {} on {} after {} attempt(s): {}{}",
                    e.partition,
                    e.offset,
                    s(&e.event_id),
                    s(&e.event_type),
                    s(&e.saga),
                    s(&e.service),
                    s(&e.origin_topic),
                    e.attempts.unwrap_or(0),
                    s(&e.reason),
                    e.redriven_from
                        .as_ref()
                        .map(|f| format!("  (re-driven from {f})"))
                        .unwrap_or_default(),
                );
            }
            Ok(())
        }
        DltCommand::Redrive {
            topic,
            kafka,
            events,
            offsets,
            all,
        } => {
            if !all && events.is_empty() && offsets.is_empty() {
                anyhow::bail!("say which events to re-drive: --event ID, --offset P:O, or --all");
            }
            let settings = kafka.settings()?;
            let selection = dlt::Selection {
                event_ids: events,
                offsets,
            };
            let sent = dlt::redrive(&settings, &topic, &selection).await?;
            let dlt_topic = dlt::dlt_topic(&topic);
            for e in &sent {
                println!(
                    "re-drove {} (event {}) to {}",
                    e.coordinates(&dlt_topic),
                    e.event_id.as_deref().unwrap_or("-"),
                    e.origin_topic.as_deref().unwrap_or("-"),
                );
            }
            println!("{} event(s) re-driven", sent.len());
            Ok(())
        }
    }
}

/// Print a verify report; the number of events that differ or failed.
fn print_verified(report: &serde_json::Value) -> usize {
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    println!(
        "verify {} {} against {}: {} recent event(s) replayed: {} same, {} differ, {} failed",
        report["service"].as_str().unwrap_or(""),
        report["version"].as_str().unwrap_or(""),
        report["active"]["version"]
            .as_str()
            .map(|v| format!("active {v}"))
            .unwrap_or_else(|| "no active version here".into()),
        n("replayed"),
        n("same"),
        n("differs"),
        n("failed"),
    );
    for e in report["events"].as_array().into_iter().flatten() {
        if e["result"] == "same" {
            continue;
        }
        println!(
            "  {} {} (saga {}, recorded on {}): {}",
            e["eventId"].as_str().unwrap_or(""),
            e["eventType"].as_str().unwrap_or(""),
            e["saga"].as_str().unwrap_or(""),
            e["recordedVersion"].as_str().unwrap_or(""),
            e["result"].as_str().unwrap_or(""),
        );
        for line in e["detail"].as_array().into_iter().flatten() {
            println!("      {}", line.as_str().unwrap_or(""));
        }
    }
    (n("differs") + n("failed")) as usize
}

async fn deploy(
    wasm: &std::path::Path,
    bytes: Vec<u8>,
    admin: &AdminArgs,
    replace: bool,
) -> anyhow::Result<()> {
    eprintln!(
        "deploying {} ({} bytes) to {}: uploading, then the runtime compiles, links, \
         describes and smoke-tests it before it runs …",
        wasm.display(),
        bytes.len(),
        admin.runtime
    );
    let extra: &[(&str, &str)] = if replace {
        &[("x-saga-replace", "true")]
    } else {
        &[]
    };
    let reply = admin
        .post_with("deploy", bytes.into(), "application/wasm", extra)
        .await
        .context("deploy refused; the running version stays")?;
    print_activated(&reply);
    Ok(())
}

/// The result of a deploy or rollback: what runs now, what it replaced, and what changed in
/// subscriptions and routes.
fn print_activated(reply: &serde_json::Value) {
    let verb = match reply["action"].as_str() {
        Some("rollback") => "rolled back",
        _ => "deployed",
    };
    let was = match reply["replaced"]["version"].as_str() {
        Some(v) => format!(
            " (replaced {v}, sha256:{})",
            reply["replaced"]["digest"].as_str().unwrap_or("")
        ),
        None => " (new service)".to_string(),
    };
    println!(
        "{verb} {} {} sha256:{}{was}",
        reply["service"].as_str().unwrap_or(""),
        reply["version"].as_str().unwrap_or(""),
        reply["digest"].as_str().unwrap_or(""),
    );
    for field in ["subscriptions", "routes"] {
        let list = |v: &serde_json::Value| -> Vec<String> {
            v[field]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        };
        let now = list(reply);
        let before = list(&reply["replaced"]);
        let mut line: Vec<String> = now
            .iter()
            .map(|x| {
                if before.contains(x) || reply["replaced"].is_null() {
                    x.clone()
                } else {
                    format!("+{x}")
                }
            })
            .collect();
        line.extend(
            before
                .iter()
                .filter(|x| !now.contains(x))
                .map(|x| format!("-{x}")),
        );
        println!("  {field}: {}", line.join(", "));
    }
}

/// The CLI's HTTP client: a runtime that does not answer is an error, not a hang. A deploy
/// waits for the runtime to compile, link and smoke-test the component, hence the minutes.
fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .timeout(std::time::Duration::from_secs(300))
        .build()?)
}

async fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    Ok(http()?
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?
        .json()
        .await?)
}

async fn trace(runtime: &str, saga: &str) -> anyhow::Result<()> {
    let url = format!("{}/sagas/{saga}", runtime.trim_end_matches('/'));
    let t = get_json(&url).await?;
    let time = |ms: &serde_json::Value| {
        let ms = ms.as_i64().unwrap_or(0).max(0) as u64;
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string()
    };
    println!("saga {saga}");
    for e in t["events"].as_array().into_iter().flatten() {
        let detail = e["detail"]
            .as_str()
            .map(|d| format!("  ({d})"))
            .unwrap_or_default();
        // Failed attempts and duplicates are counted: the time is the last one.
        let times = match e["times"].as_i64() {
            Some(n) if n > 1 => format!("  ×{n}, last"),
            _ => String::new(),
        };
        println!(
            "  {}  {:<10} {:<8} {:<22} {:<14} {}{detail}{times}",
            time(&e["handledMs"]),
            e["service"].as_str().unwrap_or(""),
            e["version"].as_str().unwrap_or(""),
            e["eventType"].as_str().unwrap_or(""),
            e["outcome"].as_str().unwrap_or(""),
            e["topic"].as_str().unwrap_or(""),
        );
    }
    for d in t["deadlines"].as_array().into_iter().flatten() {
        println!(
            "  deadline {}/{} due {} {}",
            d["service"].as_str().unwrap_or(""),
            d["name"].as_str().unwrap_or(""),
            time(&d["dueMs"]),
            d["status"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
