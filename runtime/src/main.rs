//! `runtime`: the saga runtime's command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use saga_runtime::config::Config;
use saga_runtime::node::{self, Options};

mod ops;
use ops::{deploy, dlt, get_json, outbox, print_activated, print_verified, trace};
use ops::{AdminArgs, DltCommand, OutboxCommand};

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

/// mimalloc instead of glibc's malloc: the hot path allocates on many threads (tokio
/// workers, SQLite's, librdkafka's callbacks), where glibc's arenas spent ~12 % of the
/// runtime's CPU in a profile at 128 bench clients.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        saga_runtime::telemetry::init_logs();
    }
    match cli.command {
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
            let traces = saga_runtime::telemetry::init(&config.telemetry, &config.instance_id)?;
            let handle = node::start(Options::new(config)).await?;
            println!("runtime listening on http://{}", handle.http_addr());
            wait_for_signal().await?;
            tracing::info!("shutting down");
            handle.shutdown().await;
            traces.shutdown().await;
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
            let guest = sandbox.load(bytes).await?;
            println!("{}", serde_json::to_string_pretty(&guest.manifest)?);
            println!("sha256: {}", guest.digest);
            Ok(())
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
