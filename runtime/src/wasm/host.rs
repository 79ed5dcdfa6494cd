//! What a guest's imports reach: its own service's state (read-only, versions recorded) and
//! the host log. Plus the store's WASI context with nothing granted, and the memory limiter.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::{MemoryOutputPipe, SinkOutputStream};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use super::bindings::saga::runtime::{log, state};

/// A stored value and its version. Version 0 means the key has never been written; a deleted
/// key keeps its row (value `None`) and a growing version, so a delete-and-recreate between a
/// read and a commit is still seen as a conflict.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Versioned {
    pub value: Option<Vec<u8>>,
    pub version: i64,
}

impl Versioned {
    /// What a read finds for a key never written: no value, version 0.
    pub fn never_written() -> Self {
        Versioned {
            value: None,
            version: 0,
        }
    }
}

/// The seam between guests and storage: reads of one service's committed state. Served on the
/// calling task: a guest waiting for a read yields its thread to other tasks.
#[async_trait::async_trait]
pub trait StateReader: Send + Sync {
    async fn get(&self, service: &str, key: &str) -> Result<Versioned, String>;
    /// Live (non-deleted) keys with `prefix` and after `after` (exclusive) if given, in key
    /// order, at most `limit`.
    async fn scan(
        &self,
        service: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Versioned)>, String>;
}

/// The version of every key a call read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReadSet(pub BTreeMap<String, i64>);

/// Used while describing a component: state is not available then.
pub(super) struct NoState;

#[async_trait::async_trait]
impl StateReader for NoState {
    async fn get(&self, _: &str, _: &str) -> Result<Versioned, String> {
        Err("state is not available in describe()".into())
    }
    async fn scan(
        &self,
        _: &str,
        _: &str,
        _: Option<&str>,
        _: u32,
    ) -> Result<Vec<(String, Versioned)>, String> {
        Err("state is not available in describe()".into())
    }
}

/// Used for the smoke call at load: a service with nothing stored yet.
pub(super) struct EmptyState;

#[async_trait::async_trait]
impl StateReader for EmptyState {
    async fn get(&self, _: &str, _: &str) -> Result<Versioned, String> {
        Ok(Versioned::never_written())
    }
    async fn scan(
        &self,
        _: &str,
        _: &str,
        _: Option<&str>,
        _: u32,
    ) -> Result<Vec<(String, Versioned)>, String> {
        Ok(Vec::new())
    }
}

pub(super) struct Limiter {
    max_memory: u64,
    /// Set when the guest tried to grow past the limit: the size it asked for.
    pub exceeded: Option<u64>,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.max_memory {
            self.exceeded = Some(desired as u64);
            wasmtime::bail!(
                "memory limit of {} bytes exceeded (asked for {desired})",
                self.max_memory
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A clock stopped at the Unix epoch: guests have no time of their own.
struct Frozen;

impl HostWallClock for Frozen {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for Frozen {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Per-call store data.
pub(crate) struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: Limiter,
    pub(super) stderr: MemoryOutputPipe,
    pub(super) reads: ReadSet,
    /// Prefixes the call scanned (what a held query waits on, `crate::watch`).
    pub(super) scanned: Vec<String>,
    /// Set when a host import failed on the host's side (a state read the database refused):
    /// the call then fails as a host fault, not as the guest's trap.
    pub(super) host_fault: Option<String>,
    service: Arc<str>,
    reader: Arc<dyn StateReader>,
    scan_rows: u32,
}

const STDERR_CAPACITY: usize = 16 * 1024;

impl Host {
    pub(super) fn new(service: &str, reader: Arc<dyn StateReader>, limits: &super::Limits) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtx::builder()
            .stdout(SinkOutputStream)
            .stderr(stderr.clone())
            .wall_clock(Frozen)
            .monotonic_clock(Frozen)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Host {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                max_memory: limits.memory_bytes,
                exceeded: None,
            },
            stderr,
            reads: ReadSet::default(),
            scanned: Vec::new(),
            host_fault: None,
            service: service.into(),
            reader,
            scan_rows: limits.scan_rows,
        }
    }
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Host {
    /// Remember a host-side failure and end the call with it (a trap the guest cannot catch).
    fn fault(&mut self, reason: String) -> wasmtime::Error {
        let e = wasmtime::format_err!("{reason}");
        self.host_fault = Some(reason);
        e
    }
}

impl state::Host for Host {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let found = match self.reader.get(&self.service, &key).await {
            Ok(found) => found,
            Err(e) => return Err(self.fault(format!("state read of {key:?} failed: {e}"))),
        };
        self.reads.0.insert(key, found.version);
        Ok(found.value)
    }

    /// The 0.1.0 scan: as many rows as asked for (its contract has no cap).
    async fn scan(
        &mut self,
        prefix: String,
        limit: u32,
    ) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
        self.scan_from(prefix, None, limit).await
    }

    async fn scan_after(
        &mut self,
        prefix: String,
        after: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
        let limit = limit.min(self.scan_rows);
        self.scan_from(prefix, after, limit).await
    }
}

impl Host {
    async fn scan_from(
        &mut self,
        prefix: String,
        after: Option<String>,
        limit: u32,
    ) -> wasmtime::Result<Vec<(String, Vec<u8>)>> {
        let rows = match self
            .reader
            .scan(&self.service, &prefix, after.as_deref(), limit)
            .await
        {
            Ok(rows) => rows,
            Err(e) => return Err(self.fault(format!("state scan of {prefix:?} failed: {e}"))),
        };
        if !self.scanned.contains(&prefix) {
            self.scanned.push(prefix);
        }
        Ok(rows
            .into_iter()
            .filter_map(|(key, v)| {
                self.reads.0.insert(key.clone(), v.version);
                v.value.map(|value| (key, value))
            })
            .collect())
    }
}

impl log::Host for Host {
    async fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let service = &*self.service;
        match level {
            log::Level::Trace => tracing::trace!(service, "{message}"),
            log::Level::Debug => tracing::debug!(service, "{message}"),
            log::Level::Info => tracing::info!(service, "{message}"),
            log::Level::Warn => tracing::warn!(service, "{message}"),
            log::Level::Error => tracing::error!(service, "{message}"),
        }
        Ok(())
    }
}

impl super::bindings::saga::runtime::types::Host for Host {}
