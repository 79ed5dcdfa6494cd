//! One runtime instance: wires storage, the sandbox, the service registry, one worker per
//! service, the relay and the HTTP ingress together. `Options` → [`start`] → a cheap
//! [`Handle`] to inspect, extend and stop it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::kafka::{self, consumer::Consumer};
use crate::ownership::Ownership;
use crate::registry::{self, Registry, Service};
use crate::relay::{self, Relays};
use crate::stats::Stats;
use crate::storage::{self, deployments, state::DbReader, Db};
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
    #[error(transparent)]
    Limits(#[from] crate::limits::Error),
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl Error {
    /// Whether trying again later can succeed: the database or the broker failed, not the
    /// component (which is refused the same way every time).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Storage(_) | Error::Kafka(_))
    }
}

/// State shared by the tasks of one instance.
pub struct Shared {
    pub config: Arc<Config>,
    pub db: Db,
    pub sandbox: Sandbox,
    pub registry: Arc<Registry>,
    pub reader: Arc<dyn StateReader>,
    pub clock: Arc<dyn Clock>,
    pub stats: Arc<Stats>,
    /// The HTTP ingress's flow control; workers report their lag to it.
    pub door: Arc<crate::admission::Door>,
    /// Held queries (`Prefer: wait`), woken by the commits that change what they read.
    pub changes: Arc<crate::watch::Changes>,
    /// What `GET /readyz` reports; ownership and the relay write their lines.
    pub health: Arc<crate::health::Board>,
    /// Recent events with their inputs and effects, per service, for `deploy --verify`,
    /// until `verify::flush` writes them to the database.
    pub recordings: Arc<crate::verify::Recordings>,
    /// Woken after every commit that wrote outbox rows.
    pub relay: relay::Handle,
    /// Commits HTTP commands' effects, grouped.
    pub commands: crate::commands::Handle,
    /// Prometheus metrics (`GET /metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Told by every commit that set a deadline (the scheduler's handle).
    pub deadline_alarm: Arc<crate::deadline::Alarm>,
    pub shutdown: CancellationToken,
    /// The instance's tasks; installing a service adds its worker and partition ownership.
    tasks: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    /// The services consuming here. Held while one is installed or stopped, so lifecycle
    /// changes (admin API, following deployments) happen one at a time.
    runs: tokio::sync::Mutex<HashMap<String, Run>>,
    /// Held by the admin API from running a change here to recording it, and by `follow` from
    /// reading the recorded deployments to applying them: otherwise `follow` could read the
    /// history just before a change is recorded and undo the change it has not seen yet.
    pub lifecycle: tokio::sync::Mutex<()>,
}

/// Wraps the state reader guests read through (a test's fault seam).
pub type WrapReader = Box<dyn FnOnce(Arc<dyn StateReader>) -> Arc<dyn StateReader> + Send>;

/// What to start: the config plus the seams tests replace.
pub struct Options {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub relay_faults: Arc<dyn relay::Faults>,
    /// Applied to the database's state reader; production leaves it as it is.
    pub wrap_reader: WrapReader,
}

impl Options {
    pub fn new(config: Config) -> Self {
        Options {
            config,
            clock: Arc::new(SystemClock),
            relay_faults: Arc::new(relay::NoFaults),
            wrap_reader: Box::new(|reader| reader),
        }
    }
}

/// Start an instance: connect, load the configured services, start consuming, relaying and
/// serving HTTP.
pub async fn start(options: Options) -> Result<Handle, Error> {
    let config = options.config;
    config.limits.check()?;
    let db = Db::connect(&config.database_url, config.connections()).await?;
    let sandbox = Sandbox::new(config.sandbox_limits(), config.cache_dir.clone())?;
    let reader = (options.wrap_reader)(DbReader::new(db.clone()));
    let listen = config.http_listen;
    let recordings = Arc::new(crate::verify::Recordings::new(config.worker.verify_recent));
    let door = crate::admission::Door::new(
        &config.ingress,
        config.sandbox.max_instances,
        options.clock.clone(),
    );
    let relay = relay::Handle::new(config.relay.slots);
    let config = Arc::new(config);
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let changes: Arc<crate::watch::Changes> = Arc::default();
    let deadline_alarm: Arc<crate::deadline::Alarm> = Arc::default();
    let stats: Arc<Stats> = Arc::default();
    let commands = crate::commands::Handle::start(crate::commands::Context {
        db: db.clone(),
        clock: options.clock.clone(),
        config: config.clone(),
        changes: changes.clone(),
        metrics: metrics.clone(),
        deadline_alarm: deadline_alarm.clone(),
        relay: relay.clone(),
        stats: stats.clone(),
    });
    let shared = Arc::new(Shared {
        door: Arc::new(door),
        changes,
        health: Arc::default(),
        config,
        db,
        sandbox,
        registry: Arc::default(),
        reader,
        clock: options.clock,
        stats,
        recordings,
        relay,
        commands,
        metrics,
        deadline_alarm,
        shutdown: CancellationToken::new(),
        tasks: Arc::new(tokio::sync::Mutex::new(JoinSet::new())),
        runs: tokio::sync::Mutex::new(HashMap::new()),
        lifecycle: tokio::sync::Mutex::new(()),
    });
    let handle = Handle {
        shared: shared.clone(),
        http_addr: listen,
    };
    // The database is the authority for every service it has a history of: apply that
    // history before anything consumes, then start the configured components of services it
    // has never seen.
    let mut memory = crate::follow::Memory::default();
    crate::follow::apply(&shared, &mut memory).await?;
    for path in shared.config.services.clone() {
        let wasm = tokio::fs::read(&path)
            .await
            .map_err(|source| Error::ReadComponent {
                path: path.clone(),
                source,
            })?;
        let service = validate(&shared, wasm.clone()).await.map_err(|e| match e {
            Error::Sandbox(source) => Error::Component { path, source },
            other => other,
        })?;
        if !deployments::history(&shared.db, service.name())
            .await?
            .is_empty()
        {
            tracing::info!(
                service = service.name(),
                "the database has a deployment history for this service: it runs the active \
                 version from there, not the configured component"
            );
            continue;
        }
        let installed = install_validated(&shared, service).await?;
        record_first(&shared, &installed.service, &wasm).await?;
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
    let relay = relay::Context {
        config: shared.config.clone(),
        db: shared.db.clone(),
        clock: shared.clock.clone(),
        handle: shared.relay.clone(),
        door: shared.door.clone(),
        health: shared.health.clone(),
        metrics: shared.metrics.clone(),
        stats: shared.stats.clone(),
        shutdown: shared.shutdown.clone(),
    };
    tasks.spawn(Relays::new(Arc::new(relay), options.relay_faults).run());
    let scheduler = crate::deadline::Scheduler {
        db: shared.db.clone(),
        clock: shared.clock.clone(),
        kafka: shared.config.kafka.clone(),
        poll: Duration::from_millis(shared.config.relay.poll_interval_ms),
        alarm: shared.deadline_alarm.clone(),
        relay: shared.relay.clone(),
        metrics: shared.metrics.clone(),
        stats: shared.stats.clone(),
        stop: shared.shutdown.clone(),
    };
    tasks.spawn(scheduler.run());
    tasks.spawn(crate::follow::run(shared.clone(), memory));
    tasks.spawn(crate::verify::flush(
        shared.recordings.clone(),
        shared.db.clone(),
        shared.config.instance_id.clone(),
        shared.shutdown.clone(),
    ));
    let cleaner = crate::retention::Cleaner {
        db: shared.db.clone(),
        clock: shared.clock.clone(),
        settings: shared.config.retention.clone(),
        stop: shared.shutdown.clone(),
        deleted: {
            let stats = shared.stats.clone();
            Box::new(move |n| Stats::add(&stats.retention_deleted, n))
        },
    };
    tasks.spawn(cleaner.run());
    let keeper = crate::storage::statistics::Keeper {
        db: shared.db.clone(),
        stop: shared.shutdown.clone(),
    };
    tasks.spawn(keeper.run());
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

/// A service given at start-up that was never deployed enters the history as deployed by this
/// instance's configuration, so it can be rolled back to and undeployed like any other. Once
/// a service has a history, the database is its authority: start-up and `follow` run its
/// active version whatever the configuration gave.
async fn record_first(shared: &Shared, service: &Service, wasm: &[u8]) -> Result<(), Error> {
    let d = deployments::Deployment {
        id: 0,
        service: service.name().to_string(),
        version: service.version().to_string(),
        digest: service.guest.digest.clone(),
        deployed_by: format!("config of {}", shared.config.instance_id),
        deployed_ms: shared.clock.now_ms(),
        action: deployments::Action::Deploy,
    };
    Ok(deployments::record(&shared.db, &d, Some(wasm)).await?)
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
        // The set is taken out of its lock before joining: a task finishing an install (e.g.
        // `follow`) adds its service's tasks under that lock, and must not wait for us while
        // we wait for it. What it adds is joined on the next round.
        loop {
            let mut tasks = std::mem::take(&mut *self.shared.tasks.lock().await);
            if tasks.is_empty() {
                break;
            }
            while tasks.join_next().await.is_some() {}
        }
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

/// A service consuming on this instance: its worker and partition ownership, stopped together.
pub(crate) struct Run {
    stop: CancellationToken,
    /// Fails (its sender dropped) once both tasks have finished.
    done: oneshot::Receiver<()>,
}

impl Run {
    /// Stop consuming and wait: the batch in flight commits on the version it started with,
    /// the service's partition leases are given back, nothing later is taken from Kafka.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }
}

/// Compile, link and describe a component, then make one smoke call (see
/// [`wasm::Sandbox::load`]): any failure is the refusal, with the reason.
pub async fn validate(shared: &Arc<Shared>, wasm: Vec<u8>) -> Result<Service, Error> {
    let guest = shared.sandbox.load(wasm).await?;
    Ok(Service::new(guest)?)
}

/// Load a component and run it: [`validate`] (a refusal changes nothing), then
/// - a new service gets its topics, a consumer and its partition ownership;
/// - a new version that consumes the same topics is swapped in place: the event or request in
///   flight finishes on the old version, the next one runs the new;
/// - a new version that consumes other topics restarts the service's consumer here: the batch
///   in flight commits on the old version, then the new one consumes its topics from the
///   positions stored for them (a topic it no longer consumes keeps its stored position and is
///   picked up there by any later version that consumes it again).
pub async fn install(shared: &Arc<Shared>, wasm: Vec<u8>) -> Result<Installed, Error> {
    let service = validate(shared, wasm).await?;
    install_validated(shared, service).await
}

/// [`install`] of a component already validated.
pub async fn install_validated(
    shared: &Arc<Shared>,
    mut service: Service,
) -> Result<Installed, Error> {
    if !service.compensates() && storage::ledger::used(&shared.db, service.name()).await? {
        service.inherit_ledger();
    }
    let mut runs = shared.runs.lock().await;
    shared.registry.check(&service)?;
    let old = shared.registry.get(service.name());
    if old.as_ref().map(|o| o.topics()) != Some(service.topics()) {
        kafka::topics::ensure(&shared.config.kafka, &service.topics()).await?;
    }
    if let Some(old) = old.as_ref() {
        if old.subscribed_topics() == service.subscribed_topics() {
            let service = shared.registry.install(service)?;
            tracing::info!(
                service = service.name(), version = service.version(),
                digest = %service.guest.digest, replaced = %old.guest.digest, "service swapped"
            );
            return Ok(Installed {
                service,
                replaced: Some(old.clone()),
            });
        }
    }
    let (consumer, partitions) = prepare(shared, &service).await?;
    if let Some(run) = runs.remove(service.name()) {
        run.stop().await;
    }
    let service = shared.registry.install(service)?;
    let stop = shared.shutdown.child_token();
    let mut ownership = Ownership::new(
        ownership_context(shared),
        service.name(),
        consumer.clone(),
        partitions,
        stop.clone(),
    );
    if let Err(e) = ownership.tick().await {
        tracing::warn!(service = service.name(), "partition ownership: {e}");
    }
    let worker = Worker::new(worker_context(shared), service.name(), stop.clone());
    let (finished, done) = oneshot::channel();
    shared.tasks.lock().await.spawn(async move {
        tokio::join!(worker.run(consumer.clone()), ownership.run());
        // Closing a librdkafka consumer blocks: not on a tokio worker thread.
        let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
        drop(finished);
    });
    runs.insert(service.name().to_string(), Run { stop, done });
    tracing::info!(
        service = service.name(),
        version = service.version(),
        digest = %service.guest.digest,
        replaced = old.as_ref().map(|o| o.guest.digest.as_str()).unwrap_or("-"),
        "service started"
    );
    Ok(Installed {
        service,
        replaced: old,
    })
}

/// What a service's worker reaches of the instance.
fn worker_context(shared: &Shared) -> Arc<crate::worker::Context> {
    Arc::new(crate::worker::Context {
        config: shared.config.clone(),
        db: shared.db.clone(),
        clock: shared.clock.clone(),
        registry: shared.registry.clone(),
        reader: shared.reader.clone(),
        stats: shared.stats.clone(),
        metrics: shared.metrics.clone(),
        door: shared.door.clone(),
        changes: shared.changes.clone(),
        recordings: shared.recordings.clone(),
        relay: shared.relay.clone(),
        deadline_alarm: shared.deadline_alarm.clone(),
    })
}

/// What a service's partition ownership reaches of the instance.
fn ownership_context(shared: &Shared) -> crate::ownership::Context {
    crate::ownership::Context {
        db: shared.db.clone(),
        clock: shared.clock.clone(),
        instance_id: shared.config.instance_id.clone(),
        lease_ms: shared.config.worker.partition_lease_ms,
        kafka: shared.config.kafka.clone(),
        health: shared.health.clone(),
        metrics: shared.metrics.clone(),
        shutdown: shared.shutdown.clone(),
    }
}

/// A consumer for the topics `service` consumes, and their partitions.
async fn prepare(
    shared: &Arc<Shared>,
    service: &Service,
) -> Result<(Arc<Consumer>, Vec<(String, i32)>), Error> {
    let kafka = &shared.config.kafka;
    let subscribed: Vec<String> = service
        .subscribed_topics()
        .iter()
        .map(|t| kafka.topic(t))
        .collect();
    let consumer = Arc::new(Consumer::new(
        kafka,
        service.name(),
        Some(shared.relay.doorbell().clone()),
    )?);
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
    Ok((consumer, partitions))
}

/// Stop a service on this instance: it consumes nothing more (the batch in flight commits
/// first), its routes answer 404, its partition leases are given back. Events keep arriving
/// on its topics and wait there, at the stored positions, for a later deployment. Its
/// outbox rows still go out and its deadlines still fire (onto its deadline topic, where they
/// wait likewise). `None` if it was not running here.
pub async fn undeploy(shared: &Arc<Shared>, name: &str) -> Option<Arc<Service>> {
    let mut runs = shared.runs.lock().await;
    if let Some(run) = runs.remove(name) {
        run.stop().await;
    }
    let removed = shared.registry.remove(name);
    if let Some(s) = &removed {
        tracing::info!(service = name, version = s.version(), digest = %s.guest.digest, "service undeployed");
    }
    removed
}
