//! Retention: what the runtime keeps only for a while, and the background clean-up that
//! deletes it. Each table that grows per request, event or saga gets a documented age here;
//! the cleaner deletes in small batches (`batch` rows per statement, then a yield), so it costs
//! little under load and never holds long locks.
//!
//! What is kept how long (each a `[retention]` key, defaults below):
//! - `inbox_ms` (8 days): the inbox, which deduplicates redeliveries. It must outlive any
//!   redelivery: keep it above the topics' retention (Kafka's default is 7 days), since a
//!   record older than its inbox entry would be applied again.
//! - `sagas_ms` (8 days): a saga's expiry row and its compensation-ledger rows, once nothing
//!   wrote them for this long; a step or compensation arriving later is no longer fenced.
//! - `deadlines_ms` (8 days): fired and cancelled deadlines, this long after they were due.
//! - `attempts_ms` (8 days): failed attempts and duplicates on saga timelines.
//! - `idempotency_keys_ms` (24 h): replies of commands sent with an `Idempotency-Key` (a retry
//!   within the age is answered from the store; after it, the key starts a new command).
//! - `leases_ms` (1 day): member leases of instances that stopped (every start has its own id).
//! - `tombstones_ms` (1 h): state rows without a value — tombstones of deleted keys, and
//!   placeholders of keys read while absent (PostgreSQL locks them). A tombstone's growing
//!   version lets a handler that read the key before a delete-and-recreate see the change; that
//!   window is one call (at most `sandbox.call_timeout_ms`) plus its commit, far below an hour.
//!   Once the tombstone is gone the key reads as never written, and a handler holding its old
//!   version conflicts (no row has it).
//!
//! Not cleaned: stored components and the deployment history (small, and what rollback needs),
//! parked outbox rows (kept until re-driven). Recordings for `deploy --verify` are bounded by
//! count (`worker.verify_recent`).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::storage::Db;

/// `[retention]` in the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How long an inbox entry (the dedup of redeliveries) is kept, ms; keep it above the
    /// topics' retention. Default 691200000 (8 days).
    pub inbox_ms: u64,
    /// How long a saga's expiry and compensation-ledger rows are kept after their last write,
    /// ms. Default 691200000 (8 days).
    pub sagas_ms: u64,
    /// How long fired and cancelled deadlines are kept after they were due, ms. Default
    /// 691200000 (8 days).
    pub deadlines_ms: u64,
    /// How long failed attempts and duplicates stay on saga timelines, ms. Default 691200000.
    pub attempts_ms: u64,
    /// How long the reply of a command sent with an `Idempotency-Key` is replayed, ms.
    /// Default 86400000 (24 h).
    pub idempotency_keys_ms: u64,
    /// How long the expired member lease of a stopped instance is kept, ms. Default 86400000.
    pub leases_ms: u64,
    /// How long a state row without a value (a deleted key's tombstone, a placeholder of a key
    /// read while absent) is kept after its last write, ms. Keep it far above
    /// `sandbox.call_timeout_ms`. Default 3600000 (1 h).
    pub tombstones_ms: u64,
    /// How often the cleaner runs, ms. Default 60000.
    pub interval_ms: u64,
    /// Rows deleted per statement. Default 1000.
    pub batch: u32,
}

impl Default for Settings {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600 * 1000;
        Settings {
            inbox_ms: 8 * DAY,
            sagas_ms: 8 * DAY,
            deadlines_ms: 8 * DAY,
            attempts_ms: 8 * DAY,
            leases_ms: DAY,
            idempotency_keys_ms: DAY,
            tombstones_ms: 3600 * 1000,
            interval_ms: 60_000,
            batch: 1000,
        }
    }
}

impl Settings {
    /// The oldest creation time of an idempotency reply still replayed at `now_ms`.
    pub fn idempotency_since(&self, now_ms: i64) -> i64 {
        before(now_ms, self.idempotency_keys_ms)
    }

    /// Each kept kind of row with the time before which it goes, at `now_ms`.
    fn cutoffs(&self, now_ms: i64) -> [(Kept, i64); 8] {
        [
            (Kept::Inbox, before(now_ms, self.inbox_ms)),
            (Kept::Sagas, before(now_ms, self.sagas_ms)),
            (Kept::Ledger, before(now_ms, self.sagas_ms)),
            (Kept::Deadlines, before(now_ms, self.deadlines_ms)),
            (Kept::Attempts, before(now_ms, self.attempts_ms)),
            (Kept::IdempotencyKeys, self.idempotency_since(now_ms)),
            (Kept::MemberLeases, before(now_ms, self.leases_ms)),
            (Kept::Tombstones, before(now_ms, self.tombstones_ms)),
        ]
    }
}

fn before(now_ms: i64, age_ms: u64) -> i64 {
    now_ms.saturating_sub(age_ms.min(i64::MAX as u64) as i64)
}

/// The background clean-up of one instance (every instance runs one; deletes are idempotent).
pub struct Cleaner {
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    pub settings: Settings,
    pub stop: CancellationToken,
    /// Told how many rows each statement deleted (the instance's stats).
    pub deleted: Box<dyn Fn(u64) + Send + Sync>,
}

impl Cleaner {
    pub async fn run(self) {
        let every = Duration::from_millis(self.settings.interval_ms.max(10));
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.once().await {
                tracing::warn!("retention clean-up failed, will try again: {e}");
            }
        }
    }

    /// One round over every kept table; the number of rows deleted.
    pub async fn once(&self) -> Result<u64, crate::storage::Error> {
        let batch = self.settings.batch.max(1);
        let mut total = 0;
        for (kept, before) in self.settings.cutoffs(self.clock.now_ms()) {
            loop {
                let n = expire(&self.db, kept, before, batch).await?;
                total += n;
                (self.deleted)(n);
                if n < batch as u64 || self.stop.is_cancelled() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        Ok(total)
    }
}

/// A kind of row the cleaner deletes.
#[derive(Debug, Clone, Copy)]
enum Kept {
    Inbox,
    Sagas,
    Ledger,
    Deadlines,
    Attempts,
    IdempotencyKeys,
    MemberLeases,
    Tombstones,
}

impl Kept {
    /// (table, its key columns, the condition of a row to delete with `$1` the cutoff).
    fn sql(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kept::Inbox => ("inbox", "service, event_id", "handled_ms < $1"),
            Kept::Sagas => ("sagas", "saga", "touched_ms < $1"),
            Kept::Ledger => ("saga_ledger", "service, saga", "touched_ms < $1"),
            Kept::Deadlines => (
                "deadlines",
                "service, saga, name",
                "status IN ('FIRED', 'CANCELLED') AND due_ms < $1",
            ),
            Kept::Attempts => (
                "saga_attempts",
                "service, event_id, outcome",
                "last_ms < $1",
            ),
            Kept::IdempotencyKeys => ("idempotency_keys", "service, key", "created_ms < $1"),
            Kept::MemberLeases => ("leases", "name", "name LIKE 'member/%' AND expires_ms < $1"),
            Kept::Tombstones => (
                "state",
                "service, key",
                "valueless_ms IS NOT NULL AND valueless_ms < $1",
            ),
        }
    }
}

/// Delete up to `limit` rows of `kept` older than `before_ms`; how many went.
async fn expire(
    db: &Db,
    kept: Kept,
    before_ms: i64,
    limit: u32,
) -> Result<u64, crate::storage::Error> {
    let _gate = db.write_gate().await;
    let (table, key, condition) = kept.sql();
    // The condition again on the deleted rows themselves: a row written since the inner
    // select read it (a tombstone given a value again) is checked anew and kept (PostgreSQL
    // re-evaluates only the outer conditions on a row changed under it).
    let sql = format!(
        "DELETE FROM {table} WHERE ({key}) IN \
         (SELECT {key} FROM {table} WHERE {condition} LIMIT $2) AND {condition}"
    );
    let done = crate::storage::query(&sql)
        .bind(before_ms)
        .bind(limit as i64)
        .execute(db.pool())
        .await?;
    Ok(done.rows_affected())
}
