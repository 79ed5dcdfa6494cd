//! Counters of what the runtime did; read by tests and, later, exported as metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Served as JSON at `GET /_saga/stats` (this instance's counters since it started).
#[derive(Debug, Default, serde::Serialize)]
pub struct Stats {
    /// Events whose effects were committed.
    pub applied: AtomicU64,
    /// Events recognised by the inbox as already handled and skipped.
    pub duplicates: AtomicU64,
    /// Forward events not applied because their saga's deadline had passed.
    pub expired: AtomicU64,
    /// Events not applied because their saga was already compensated at the service.
    pub ignored: AtomicU64,
    /// Events sent to a dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Handler runs discarded because state they read changed before commit.
    pub conflicts: AtomicU64,
    /// Events handled again in a later round of their batch: those whose reads a conflict
    /// made stale, and the events behind them in their partition that depend on them
    /// (`worker::blocked`).
    pub deferred: AtomicU64,
    /// Events run again before their batch's commit on the writes of events before them in
    /// their commit lane, which they had read stale (`worker::chain`).
    pub chained: AtomicU64,
    /// Batches committed a second time, with a savepoint per event, because the first
    /// attempt (without) met a conflict, a late duplicate or a refusal.
    pub recommits: AtomicU64,
    /// Batches committed as one statement without a transaction (PostgreSQL; `worker`'s
    /// `Isolation::Alone`).
    pub ends_alone: AtomicU64,
    /// Batch ends tried as one statement without a transaction (PostgreSQL) that failed —
    /// a state version not as read, a step that no longer applied, an end too large for one
    /// statement — and were committed again in a transaction.
    pub ends_undone: AtomicU64,
    /// Handlers' state reads answered from what the door check read ahead (PostgreSQL).
    pub reads_ahead: AtomicU64,
    /// Failed handler attempts (errors, traps, time and memory limits).
    pub failures: AtomicU64,
    /// Handler calls that failed on the host's side (a state read the database refused, no
    /// free guest instance) and were run again without counting an attempt.
    pub host_faults: AtomicU64,
    /// Events the database refused to store deterministically, set aside as dead letters.
    pub refused: AtomicU64,
    /// Outbox rows the broker refused for good, parked (`runtime outbox parked`).
    pub parked: AtomicU64,
    /// HTTP requests refused at the door with `503` (queue full, waited too long, or a
    /// command while the event path is behind: `crate::admission`).
    pub shed: AtomicU64,
    /// Transactions that committed several HTTP commands together (`crate::commands`).
    pub command_groups: AtomicU64,
    /// HTTP commands committed in those transactions.
    pub grouped_commands: AtomicU64,
    /// Groups of HTTP commands (one command, or several) committed as one statement without a
    /// transaction (PostgreSQL; `crate::commands`).
    pub command_ends_alone: AtomicU64,
    /// Such statements that failed on a version not as read (or a key created meanwhile),
    /// nothing of them written, their group committed in a transaction instead.
    pub command_ends_undone: AtomicU64,
    /// Commands answered from a stored reply (`Idempotency-Key`), without running the handler.
    pub replayed: AtomicU64,
    /// Rows the retention clean-up deleted.
    pub retention_deleted: AtomicU64,
    /// Deadlines this instance claimed and fired (each deadline is claimed by one instance).
    pub deadlines_fired: AtomicU64,
    /// Outbox rows the relay published (a republish after a crash counts again).
    pub published: AtomicU64,
    /// Kafka transactions the relay committed.
    pub relay_batches: AtomicU64,
    /// Relay batches that failed for a transient reason (broker down, a timeout) and were
    /// tried again, their rows kept.
    pub relay_retries: AtomicU64,
    /// SQL statements this process sent (`crate::storage::statements`), as of the last read
    /// through [`Stats::refreshed`].
    pub db_statements: AtomicU64,
    /// Microseconds the SQLite write gate was held (`crate::storage::write_gate_held_us`), as
    /// of the last read through [`Stats::refreshed`].
    pub db_write_gate_held_us: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// These counters, with those kept elsewhere copied in first.
    pub fn refreshed(&self) -> &Self {
        self.db_statements
            .store(crate::storage::statements(), Ordering::Relaxed);
        self.db_write_gate_held_us
            .store(crate::storage::write_gate_held_us(), Ordering::Relaxed);
        self
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
