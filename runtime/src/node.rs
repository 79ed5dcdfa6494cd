//! One runtime instance: wires storage, the sandbox, the service registry, one worker per
//! service, the relay and the HTTP ingress together. `Options` → [`start`] → a cheap
//! [`Handle`] to inspect, extend and stop it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::kafka::{self, consumer::Consumer};
use crate::ownership::Ownership;
use crate::registry::{self, Registry, Service};
use crate::relay::{self, Relay};
use crate::stats::Stats;
use crate::storage::{self, state::BlockingReader, Db};
use crate::wasm::{self, Sandbox, StateReader};
use crate::worker::Worker;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] storage::Error),
    #[error(transparent)]
    Sandbox(#[from] wasm::LoadError),
    #[error("could not read component {path}: {source}")]
    ReadComponent {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("component {path} refused: {source}")]
    Component {
        path: PathBuf,
        source: wasm::LoadError,
    },
    #[error(transparent)]
    Registry(#[from] registry::Error),
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    #[error(
        "service {service} would change what it consumes ({old:?} → {new:?}); \
         deploying that to a running instance is not supported yet: restart with the new component"
    )]
    SubscriptionsChanged {
        service: String,
        old: Vec<String>,
        new: Vec<String>,
    },
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by the tasks of one instance.
pub struct Shared {
    pub config: Config,
    pub db: Db,
    pub sandbox: Sandbox,
    pub registry: Registry,
    pub reader: Arc<dyn StateReader>,
    pub clock: Arc<dyn Clock>,
    pub stats: Stats,
    /// Notified after every commit that wrote outbox rows.
    pub relay_wake: Notify,
    /// Notified after every commit that set a deadline.
    pub deadline_wake: Notify,
    pub shutdown: CancellationToken,
    /// The instance's tasks; installing a service adds its worker and partition ownership.
    tasks: Arc<tokio::sync::Mutex<JoinSet<()>>>,
}

impl Shared {
    /// The saga deadline of `service` for `after-ms: none`: the config's per-service value,
    /// else what the service declares, else the config default.
    pub fn saga_deadline_ms(&self, service: &Service) -> u64 {
        self.config
            .saga_deadlines
            .get(service.name())
            .copied()
            .or(service.guest.manifest.saga_deadline_ms)
            .unwrap_or(self.config.worker.default_saga_deadline_ms)
    }
}

/// What to start: the config plus the seams tests replace.
pub struct Options {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub relay_faults: Arc<dyn relay::Faults>,
}

impl Options {
    pub fn new(config: Config) -> Self {
        Options {
            config,
            clock: Arc::new(SystemClock),
            relay_faults: Arc::new(relay::NoFaults),
        }
    }
}

/// Start an instance: connect, load the configured services, start consuming, relaying and
/// serving HTTP.
pub async fn start(options: Options) -> Result<Handle, Error> {
    let config = options.config;
    let db = Db::connect(&config.database_url, config.database_connections).await?;
    let sandbox = Sandbox::new(config.limits(), config.cache_dir.clone())?;
    let reader = BlockingReader::new(db.clone(), tokio::runtime::Handle::current());
    let listen = config.http_listen;
    let shared = Arc::new(Shared {
        config,
        db,
        sandbox,
        registry: Registry::default(),
        reader,
        clock: options.clock,
        stats: Stats::default(),
        relay_wake: Notify::new(),
        deadline_wake: Notify::new(),
        shutdown: CancellationToken::new(),
        tasks: Arc::new(tokio::sync::Mutex::new(JoinSet::new())),
    });
    let handle = Handle {
        shared: shared.clone(),
        http_addr: listen,
    };
    for path in shared.config.services.clone() {
        let wasm = tokio::fs::read(&path)
            .await
            .map_err(|source| Error::ReadComponent {
                path: path.clone(),
                source,
            })?;
        handle.install(wasm).await.map_err(|e| match e {
            Error::Sandbox(source) => Error::Component { path, source },
            other => other,
        })?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Listen {
            addr: listen,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: listen,
        source,
    })?;
    let mut tasks = shared.tasks.lock().await;
    tasks.spawn(Relay::new(shared.clone(), options.relay_faults).run());
    tasks.spawn(crate::deadline::Scheduler::new(shared.clone()).run());
    tasks.spawn(crate::follow::run(shared.clone()));
    let router = crate::ingress::router(shared.clone());
    let stop = shared.shutdown.clone();
    tasks.spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("HTTP ingress stopped: {e}");
        }
    });
    drop(tasks);
    tracing::info!(%http_addr, instance = %shared.config.instance_id, "runtime started");
    Ok(Handle {
        http_addr,
        ..handle
    })
}

/// A running instance. Cloning is cheap.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
}

impl Handle {
    /// Where the HTTP ingress listens (the real port if the config asked for port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn db(&self) -> &Db {
        &self.shared.db
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Load a component, create its topics and start consuming for it; see [`install`].
    pub async fn install(&self, wasm: Vec<u8>) -> Result<Arc<Service>, Error> {
        install(&self.shared, wasm).await.map(|d| d.service)
    }

    /// Stop consuming, relaying and serving, and wait for the tasks to finish.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let mut tasks = self.shared.tasks.lock().await;
        while tasks.join_next().await.is_some() {}
    }

    /// Resolves when the instance is asked to stop.
    pub async fn stopped(&self) {
        self.shared.shutdown.cancelled().await
    }
}

/// What an install did.
pub struct Installed {
    pub service: Arc<Service>,
    /// The version it replaced on this instance, if the service was running.
    pub replaced: Option<Arc<Service>>,
}

/// Load a component and run it: compile, link against our world, `describe` (any failure is
/// a refusal with the reason, and nothing changes). A new service gets its topics, a consumer
/// and its partition ownership; a running one is swapped in place: the event or request in
/// flight finishes on the old version, the next one runs the new. A new version may not change
/// what the service consumes yet (that needs a restart).
pub async fn install(shared: &Arc<Shared>, wasm: Vec<u8>) -> Result<Installed, Error> {
    let sandbox = shared.sandbox.clone();
    let guest = tokio::task::spawn_blocking(move || sandbox.load(&wasm))
        .await
        .map_err(|e| wasm::LoadError::Engine(e.to_string()))??;
    let service = Service::new(guest)?;
    if let Some(old) = shared.registry.get(service.name()) {
        if old.subscribed_topics() != service.subscribed_topics() {
            return Err(Error::SubscriptionsChanged {
                service: service.name().to_string(),
                old: old.subscribed_topics(),
                new: service.subscribed_topics(),
            });
        }
        kafka::topics::ensure(&shared.config.kafka, &service.topics()).await?;
        let service = shared.registry.install(service)?;
        tracing::info!(
            service = service.name(), version = service.version(),
            digest = %service.guest.digest, replaced = %old.guest.digest, "service swapped"
        );
        return Ok(Installed {
            service,
            replaced: Some(old),
        });
    }
    let kafka = &shared.config.kafka;
    kafka::topics::ensure(kafka, &service.topics()).await?;
    let subscribed: Vec<String> = service
        .subscribed_topics()
        .iter()
        .map(|t| kafka.topic(t))
        .collect();
    let consumer = Arc::new(Consumer::new(kafka, service.name())?);
    let partitions = {
        let consumer = consumer.clone();
        tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            for topic in subscribed {
                for p in consumer.partitions(&topic)? {
                    all.push((topic.clone(), p));
                }
            }
            Ok::<_, kafka::Error>(all)
        })
        .await
        .map_err(|e| wasm::LoadError::Engine(e.to_string()))??
    };
    let mut ownership =
        Ownership::new(shared.clone(), service.name(), consumer.clone(), partitions);
    ownership.tick().await?;
    let service = shared.registry.install(service)?;
    tracing::info!(
        service = service.name(),
        version = service.version(),
        digest = %service.guest.digest,
        "service installed"
    );
    let worker = Worker::new(shared.clone(), service.name());
    let mut tasks = shared.tasks.lock().await;
    tasks.spawn(worker.run(consumer));
    tasks.spawn(ownership.run());
    Ok(Installed {
        service,
        replaced: None,
    })
}
