//! Retention: what the runtime keeps only for a while, and the background clean-up that
//! deletes it. Each table that grows per request, event or saga gets a documented age here;
//! the cleaner deletes in small batches (`batch` rows per statement, then a yield), so it costs
//! little under load and never holds long locks.
//!
//! Kept so far: replies of commands sent with an `Idempotency-Key` (a retry within the age is
//! answered from the store; after it, the key starts a new command).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::storage::{idempotency, Db};

/// `[retention]` in the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// How long the reply of a command sent with an `Idempotency-Key` is replayed, ms.
    /// Default 86400000 (24 h).
    pub idempotency_keys_ms: u64,
    /// How often the cleaner runs, ms. Default 60000.
    pub interval_ms: u64,
    /// Rows deleted per statement. Default 1000.
    pub batch: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            idempotency_keys_ms: 24 * 3600 * 1000,
            interval_ms: 60_000,
            batch: 1000,
        }
    }
}

impl Settings {
    /// The oldest creation time of an idempotency reply still replayed at `now_ms`.
    pub fn idempotency_since(&self, now_ms: i64) -> i64 {
        now_ms.saturating_sub(self.idempotency_keys_ms.min(i64::MAX as u64) as i64)
    }
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
        let now = self.clock.now_ms();
        let before = self.settings.idempotency_since(now);
        let batch = self.settings.batch.max(1);
        let mut total = 0;
        loop {
            let n = idempotency::expire(&self.db, before, batch).await?;
            total += n;
            (self.deleted)(n);
            if n < batch as u64 || self.stop.is_cancelled() {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }
}
