//! The operator commands of the `runtime` binary that talk to a running runtime (admin API,
//! read-only views) or to Kafka: `outbox`, `dlt`, `deploy`, `trace` and their arguments. Part
//! of the binary, not of the `saga_runtime` library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
use saga_runtime::config::Config;

#[derive(Subcommand)]
pub(crate) enum OutboxCommand {
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
pub(crate) enum DltCommand {
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
pub(crate) struct AdminArgs {
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
    pub(crate) async fn post(
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
pub(crate) struct KafkaArgs {
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

pub(crate) async fn outbox(command: OutboxCommand) -> anyhow::Result<()> {
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

pub(crate) async fn dlt(command: DltCommand) -> anyhow::Result<()> {
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
pub(crate) fn print_verified(report: &serde_json::Value) -> usize {
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

pub(crate) async fn deploy(
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
pub(crate) fn print_activated(reply: &serde_json::Value) {
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

pub(crate) async fn get_json(url: &str) -> anyhow::Result<serde_json::Value> {
    Ok(http()?
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?
        .json()
        .await?)
}

pub(crate) async fn trace(runtime: &str, saga: &str) -> anyhow::Result<()> {
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
