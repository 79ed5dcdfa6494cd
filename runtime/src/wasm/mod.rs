//! The sandbox that runs guests: one wasmtime [`Engine`] per runtime, components compiled once
//! (and cached on disk as precompiled `.cwasm`, keyed by the engine's compatibility hash), and a
//! fresh instance per call from a pre-instantiated [`ServicePre`].
//!
//! Design choice: calls are asynchronous and run on the calling task (wasmtime runs the guest
//! on a fiber of its own): a state read the guest makes awaits the database like any other
//! task instead of blocking a thread, and no call hops to a blocking thread and back. A guest
//! still running at an epoch tick (every [`TICK`]) yields to tokio, so a CPU-bound guest never
//! starves the other tasks or the timers, and is interrupted once its call's time is up. A
//! fresh instance per call costs ~13 µs with the pooling allocator (its memory reset in place,
//! not handed back to the kernel: [`KEEP_RESIDENT`]) and buys isolation: no guest global
//! survives a call, a trap poisons nothing.
//!
//! Guests get WASI with nothing granted: no env, args, files, sockets; stdout is discarded,
//! stderr is captured (to keep panic messages), and both clocks are frozen at the Unix epoch —
//! the host's time reaches a guest only as `context.now-ms`.

pub mod bindings;
mod host;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use bindings::{Context, Effects, Event, GuestError, Manifest, Request, Response, ServicePre};
use host::{EmptyState, Host, NoState};
pub use host::{ReadSet, StateReader, Versioned};

/// Limits and knobs of the sandbox.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Linear memory a guest may grow to, in bytes.
    pub memory_bytes: u64,
    /// Wall time a single call may take before it is interrupted.
    pub call_timeout: Duration,
    /// How many instances may be alive at once (pooling allocator slots).
    pub max_instances: u32,
    /// How long a call waits for a free instance before it fails as a host fault.
    pub instance_wait: Duration,
    /// Most rows one `state.scan-after` returns (`limits.scan_rows`).
    pub scan_rows: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            call_timeout: Duration::from_secs(2),
            max_instances: 64,
            instance_wait: Duration::from_secs(5),
            scan_rows: 1000,
        }
    }
}

/// Why loading a component failed: the reason a deploy is refused with.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not a valid WebAssembly component: {0}")]
    Compile(String),
    #[error("component does not fit the saga:runtime/service world: {0}")]
    World(String),
    #[error("component imports {import}, which guests may not use: {why}")]
    ForbiddenImport { import: String, why: &'static str },
    #[error("describe() failed: {0}")]
    Describe(String),
    #[error("smoke call (on-request GET {SMOKE_PATH} with empty state) failed: {0}")]
    Smoke(String),
    #[error("the sandbox could not be set up: {0}")]
    Engine(String),
}

/// Why one call of a guest failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    /// The guest returned `error::retry`.
    #[error("handler failed: {0}")]
    Retry(String),
    /// The guest returned `error::reject`: retrying cannot help.
    #[error("handler rejected the input: {0}")]
    Reject(String),
    #[error("guest exceeded its time limit of {0:?} and was interrupted")]
    TimeLimit(Duration),
    #[error("guest exceeded its memory limit of {limit} bytes (asked for {asked})")]
    MemoryLimit { limit: u64, asked: u64 },
    #[error("guest trapped: {0}")]
    Trap(String),
    /// The host, not the handler, failed: a state read the database refused, no free guest
    /// instance. Retried without counting an attempt; never dead-letters anything.
    #[error("host fault (not the handler's): {0}")]
    Host(String),
}

impl Failure {
    /// Permanent failures skip the retries and go to the dead-letter topic at once.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Failure::Reject(_))
    }

    /// Whether the host failed rather than the handler (see [`Failure::Host`]).
    pub fn is_host(&self) -> bool {
        matches!(self, Failure::Host(_))
    }
}

/// A free guest instance, held for one call: at most `max_instances` exist at once, so the
/// pooling allocator is never asked for more than it has (it fails at once rather than wait).
/// Waiting callers are served in arrival order (tokio's semaphore is fair).
pub struct Slot(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

/// The instance slots of one sandbox; cheap to clone.
#[derive(Clone)]
pub struct Slots {
    free: Arc<tokio::sync::Semaphore>,
    wait: Duration,
}

impl Slots {
    fn new(limits: &Limits) -> Self {
        Slots {
            free: Arc::new(tokio::sync::Semaphore::new(
                limits.max_instances.max(1) as usize
            )),
            wait: limits.instance_wait,
        }
    }

    /// Wait for a free instance, up to the configured wait; past it, a host fault.
    pub async fn admit(&self) -> Result<Slot, Failure> {
        match tokio::time::timeout(self.wait, self.free.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Slot(permit)),
            _ => Err(self.busy()),
        }
    }

    /// How many instances are in use now, of `max`.
    pub fn in_use(&self, max: usize) -> usize {
        max.saturating_sub(self.free.available_permits())
    }

    fn busy(&self) -> Failure {
        Failure::Host(format!(
            "no free guest instance within {:?} (sandbox.max_instances are all in use)",
            self.wait
        ))
    }
}

/// The result of a successful call, with the state versions the guest read (for the
/// optimistic concurrency check at commit).
#[derive(Debug)]
pub struct Called<T> {
    pub output: T,
    pub reads: ReadSet,
    /// Prefixes the call scanned.
    pub scanned: Vec<String>,
}

/// The export a service must have: the handler of any 0.1.x version of the contract (the
/// host implements the newest, 0.1.1, which serves components built against 0.1.0 as well).
pub const HANDLER_EXPORT: &str = "saga:runtime/handler@0.1";

/// What the smoke call at load asks for: a path no service routes, so any reply will do.
pub const SMOKE_PATH: &str = "/_saga/smoke";

/// Import prefixes a guest may have: our host interfaces, and the WASI parts Rust's standard
/// library links to, which the sandbox grants nothing through (no preopened directories, no
/// environment or arguments, clocks frozen, stdout discarded).
const ALLOWED_IMPORTS: &[&str] = &[
    "saga:runtime/",
    "wasi:io/",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
];

/// Why an import is refused, or `None` if it is allowed.
fn forbidden(import: &str) -> Option<&'static str> {
    if ALLOWED_IMPORTS.iter().any(|p| import.starts_with(p)) {
        None
    } else if import.starts_with("wasi:sockets/") || import.starts_with("wasi:http/") {
        Some("guests get no network; emit an event and let another service act on it")
    } else {
        Some("the runtime provides only saga:runtime and the WASI parts the standard library needs")
    }
}

/// Refuse a component whose imports or exports do not fit a saga service, with the reason.
fn check_shape(engine: &Engine, component: &Component) -> Result<(), LoadError> {
    let ty = component.component_type();
    for (import, _) in ty.imports(engine) {
        if let Some(why) = forbidden(import) {
            return Err(LoadError::ForbiddenImport {
                import: import.to_string(),
                why,
            });
        }
    }
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    let handler = |name: &&str| {
        name.strip_prefix(HANDLER_EXPORT)
            .is_some_and(|patch| patch.starts_with('.'))
    };
    if !exports.iter().any(handler) {
        let has = if exports.is_empty() {
            "nothing".to_string()
        } else {
            exports.join(", ")
        };
        return Err(LoadError::World(format!(
            "it must export {HANDLER_EXPORT}.x (the saga:runtime/service world) but exports {has}"
        )));
    }
    Ok(())
}

/// Owns the engine; cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linker: Arc<Linker<Host>>,
    limits: Limits,
    slots: Slots,
    cache_dir: Option<PathBuf>,
    compat: String,
}

impl Sandbox {
    pub fn new(limits: Limits, cache_dir: Option<PathBuf>) -> Result<Self, LoadError> {
        let engine = build_engine(&limits).map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<Host>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|_| bindings::Service::add_to_linker::<_, HasSelf<Host>>(&mut linker, |h| h))
            .map_err(|e| LoadError::Engine(format!("{e:#}")))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compat = format!("{:016x}", hasher.finish());
        start_epoch_ticker(&engine);
        Ok(Sandbox {
            engine,
            linker: Arc::new(linker),
            slots: Slots::new(&limits),
            limits,
            cache_dir,
            compat,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// Compile (or load from the cache), check its imports and exports, link it, describe it
    /// and make one smoke call: a `GET /_saga/smoke` request against empty state, which must
    /// come back (any status, or an error result) without a trap or a limit hit. Whatever it
    /// returns is thrown away.
    pub async fn load(&self, wasm: Vec<u8>) -> Result<Guest, LoadError> {
        let digest = hex(&Sha256::digest(&wasm));
        // Compiling takes tens of milliseconds (a second in a debug build): off the async
        // threads.
        let (me, key) = (self.clone(), digest.clone());
        let component = tokio::task::spawn_blocking(move || me.compile(&wasm, &key))
            .await
            .map_err(|e| LoadError::Engine(format!("compiling stopped: {e}")))??;
        check_shape(&self.engine, &component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::World(format!("{e:#}")))?;
        let pre = ServicePre::new(pre).map_err(|e| LoadError::World(format!("{e:#}")))?;
        let mut guest = Guest {
            manifest: Manifest {
                name: String::new(),
                version: String::new(),
                subscriptions: Vec::new(),
                routes: Vec::new(),
                publishes: Vec::new(),
                saga_deadline_ms: None,
            },
            digest,
            pre,
            engine: self.engine.clone(),
            limits: self.limits.clone(),
            slots: self.slots.clone(),
        };
        let slot = self
            .slots
            .admit()
            .await
            .map_err(|e| LoadError::Describe(e.to_string()))?;
        let manifest = guest
            .describe(&slot)
            .await
            .map_err(|e| LoadError::Describe(e.to_string()))?;
        if manifest.name.is_empty()
            || !manifest
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(LoadError::Describe(format!(
                "service name {:?} must be non-empty ASCII letters, digits, '-' or '_'",
                manifest.name
            )));
        }
        guest.manifest = manifest;
        let smoke = Request {
            method: "GET".into(),
            path: SMOKE_PATH.into(),
            params: Vec::new(),
            query: Vec::new(),
            body: bindings::Payload {
                content_type: "application/json".into(),
                data: Vec::new(),
            },
        };
        let ctx = Context {
            now_ms: 0,
            attempt: 1,
            new_id: "smoke".into(),
        };
        match guest
            .on_request(&slot, Arc::new(EmptyState), &ctx, &smoke)
            .await
        {
            Ok(_) | Err(Failure::Retry(_) | Failure::Reject(_)) => Ok(guest),
            Err(e) => Err(LoadError::Smoke(e.to_string())),
        }
    }

    fn compile(&self, wasm: &[u8], digest: &str) -> Result<Component, LoadError> {
        let cached = self
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{digest}-{}.cwasm", self.compat)));
        if let Some(path) = cached.as_ref().filter(|p| p.exists()) {
            // SAFETY: the file was written by `Component::serialize` of an engine with the same
            // compatibility hash (it is in the name) into our own cache directory.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok(component),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring unusable cached component: {e:#}")
                }
            }
        }
        let component =
            Component::new(&self.engine, wasm).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        if let Some(path) = cached {
            if let Err(e) = write_cache(&component, &path) {
                tracing::warn!(path = %path.display(), "could not cache the compiled component: {e:#}");
            }
        }
        Ok(component)
    }
}

fn write_cache(component: &Component, path: &std::path::Path) -> wasmtime::Result<()> {
    let bytes = component.serialize()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Unique per write, not per process: two loads of one component can race (two instances
    // in one process, a deploy and a follower), and a shared temp file could publish a torn one.
    let tmp = path.with_extension(format!(
        "tmp{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// How much of a guest's memory and tables is reset in place when its instance ends, instead of
/// handed back to the kernel: an `madvise` per call costs TLB shootdowns on every core
/// (~5 % of the runtime's CPU in a profile at 128 clients). With `PAGEMAP_SCAN` (Linux 6.7+)
/// only the pages a call touched are reset.
const KEEP_RESIDENT: usize = 4 << 20;

fn build_engine(limits: &Limits) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    let n = limits.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(n)
        .total_stacks(n)
        .total_core_instances(n * 8)
        .total_memories(n * 2)
        .total_tables(n * 4)
        .max_memory_size(limits.memory_bytes as usize)
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(wasmtime::Enabled::Auto);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    match Engine::new(&config) {
        Ok(engine) => Ok(engine),
        Err(e) => {
            // A machine that refuses the pool's address-space reservation still runs guests,
            // just with a slower instantiation.
            tracing::warn!("pooling allocator unavailable ({e:#}); instantiating on demand");
            config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
            Engine::new(&config)
        }
    }
}

/// One tick every `TICK`; a call's deadline is a number of ticks. The ticker stops when the
/// engine is dropped.
const TICK: Duration = Duration::from_millis(5);

fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(TICK);
            }
        })
        .expect("spawn the epoch ticker thread");
}

/// A loaded, described component: what a service version is at run time.
pub struct Guest {
    pub manifest: Manifest,
    /// SHA-256 of the component bytes.
    pub digest: String,
    pre: ServicePre<Host>,
    engine: Engine,
    limits: Limits,
    slots: Slots,
}

impl Guest {
    /// The instance slots calls of this guest take (shared by every guest of the sandbox).
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    pub async fn on_event(
        &self,
        slot: &Slot,
        reader: Arc<dyn StateReader>,
        ctx: &Context,
        event: &Event,
    ) -> Result<Called<Effects>, Failure> {
        let (mut store, svc) = self.instantiate(slot, reader).await?;
        let output = svc
            .saga_runtime_handler()
            .call_on_event(&mut store, ctx, event)
            .await;
        fallible(self.finish(store, output))
    }

    pub async fn on_request(
        &self,
        slot: &Slot,
        reader: Arc<dyn StateReader>,
        ctx: &Context,
        request: &Request,
    ) -> Result<Called<Response>, Failure> {
        let (mut store, svc) = self.instantiate(slot, reader).await?;
        let output = svc
            .saga_runtime_handler()
            .call_on_request(&mut store, ctx, request)
            .await;
        fallible(self.finish(store, output))
    }

    async fn describe(&self, slot: &Slot) -> Result<Manifest, Failure> {
        let (mut store, svc) = self.instantiate(slot, Arc::new(NoState)).await?;
        let output = svc.saga_runtime_handler().call_describe(&mut store).await;
        Ok(self.finish(store, output)?.output)
    }

    /// A fresh instance under the time and memory limits. The slot proves an instance is
    /// free; it is only borrowed, so the caller decides how long it is held.
    async fn instantiate(
        &self,
        _slot: &Slot,
        reader: Arc<dyn StateReader>,
    ) -> Result<(Store<Host>, bindings::Service), Failure> {
        let host = Host::new(&self.manifest.name, reader, &self.limits);
        let mut store = Store::new(&self.engine, host);
        store.limiter(|h| &mut h.limiter);
        // At every tick the guest is still running: yield to tokio, or stop it once its time
        // is up. Calls that end within a tick (nearly all) never get here.
        let deadline = std::time::Instant::now() + self.limits.call_timeout;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if std::time::Instant::now() >= deadline {
                return Ok(wasmtime::UpdateDeadline::Interrupt);
            }
            Ok(wasmtime::UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        });
        match self.pre.instantiate_async(&mut store).await {
            Ok(svc) => Ok((store, svc)),
            // The guest's code has not run yet: the host could not make an instance.
            Err(e) if store.data().limiter.exceeded.is_none() => {
                Err(Failure::Host(format!("could not instantiate: {e:#}")))
            }
            Err(e) => Err(self.classify(e, &store)),
        }
    }

    /// What a call came to: its output with what it read, or why it failed.
    fn finish<T>(
        &self,
        mut store: Store<Host>,
        output: wasmtime::Result<T>,
    ) -> Result<Called<T>, Failure> {
        match output {
            Ok(output) => Ok(Called {
                output,
                reads: std::mem::take(&mut store.data_mut().reads),
                scanned: std::mem::take(&mut store.data_mut().scanned),
            }),
            Err(e) => Err(self.classify(e, &store)),
        }
    }

    fn classify(&self, e: wasmtime::Error, store: &Store<Host>) -> Failure {
        if let Some(fault) = &store.data().host_fault {
            return Failure::Host(fault.clone());
        }
        if let Some(asked) = store.data().limiter.exceeded {
            return Failure::MemoryLimit {
                limit: self.limits.memory_bytes,
                asked,
            };
        }
        if let Some(wasmtime::Trap::Interrupt) = e.downcast_ref::<wasmtime::Trap>() {
            return Failure::TimeLimit(self.limits.call_timeout);
        }
        let output = String::from_utf8_lossy(&store.data().stderr.contents())
            .trim()
            .to_string();
        let root = e.root_cause().to_string();
        if output.is_empty() {
            Failure::Trap(root)
        } else {
            Failure::Trap(format!("{root}; guest stderr: {output}"))
        }
    }
}

/// A handler's own error as the call's failure.
fn fallible<T>(
    called: Result<Called<Result<T, GuestError>>, Failure>,
) -> Result<Called<T>, Failure> {
    let called = called?;
    match called.output {
        Ok(output) => Ok(Called {
            output,
            reads: called.reads,
            scanned: called.scanned,
        }),
        Err(GuestError::Retry(msg)) => Err(Failure::Retry(msg)),
        Err(GuestError::Reject(msg)) => Err(Failure::Reject(msg)),
    }
}

/// Lower-case hex of `bytes` (digests, cursors).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The versions a call observed, keyed by state key; exposed for tests of the commit path.
pub fn read_set(entries: impl IntoIterator<Item = (String, i64)>) -> ReadSet {
    ReadSet(entries.into_iter().collect::<BTreeMap<_, _>>())
}
