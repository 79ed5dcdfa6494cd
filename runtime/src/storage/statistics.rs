//! PostgreSQL's statistics of the runtime's tables, kept current while they grow.
//!
//! Each connection plans a prepared statement once ([`super::GENERIC_PLANS`]), for the table
//! sizes of that moment, and keeps the plan until the table is analyzed. A database starts
//! empty, so the first plans scan small tables whole; as the tables grow those scans stay.
//! Autovacuum analyzes a table only after 10 % of it changed and at most once a minute per
//! database, so a new database (a new deployment, every benchmark run) ran them for its first
//! minutes: the relay's marking of published rows (`UPDATE outbox … WHERE id IN (…)`) read the
//! whole outbox, 1.4–2.2 ms per statement at 8 bench clients, a fifth of the database's time.
//!
//! [`Keeper`] analyzes a table once it changed by more rows than it had when last analyzed
//! (at least [`FLOOR`]): `ANALYZE` invalidates the plans that read the table, and each
//! connection plans them again for its size now. A table is analyzed again after as many
//! changes as it has rows, so a large one rarely. SQLite plans each statement when prepared,
//! with no statistics to keep; the keeper does nothing there.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Db, Dialect, Error};

/// The tables the runtime writes on its hot path (a `CREATE TABLE` of its migrations each).
pub const TABLES: &[&str] = &[
    "consumer_offsets",
    "deadlines",
    "held_steps",
    "idempotency_keys",
    "inbox",
    "outbox",
    "outbox_parked",
    "saga_attempts",
    "saga_ledger",
    "sagas",
    "state",
];

/// Changes a table takes at least before it is analyzed again: small tables are planned well
/// enough by their size alone.
pub const FLOOR: i64 = 1000;

/// How often the keeper looks.
const EVERY: Duration = Duration::from_secs(5);

/// Analyze the [`TABLES`] that changed by more rows than they had when last analyzed (at least
/// `floor`); the ones found so. A table another session is analyzing at that moment (another
/// instance's keeper, autovacuum) is skipped, its statistics being made anyway.
pub async fn refresh(db: &Db, floor: i64) -> Result<Vec<String>, Error> {
    if db.dialect() != Dialect::Postgres {
        return Ok(Vec::new());
    }
    let tables = serde_json::to_string(TABLES).expect("names serialise");
    let stale: Vec<String> = super::query_scalar(
        "SELECT CAST(s.relname AS TEXT) FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid \
         WHERE s.schemaname = current_schema() \
         AND s.relname IN (SELECT json_array_elements_text(CAST($1 AS json))) \
         AND s.n_mod_since_analyze >= GREATEST(c.reltuples, 0) + CAST($2 AS BIGINT) ORDER BY 1",
    )
    .bind(tables)
    .bind(floor)
    .fetch_all(db.pool())
    .await?;
    for table in &stale {
        // One of TABLES: a name of ours, not input.
        let sql = format!("ANALYZE (SKIP_LOCKED) {table}");
        super::query(&sql).execute(db.pool()).await?;
    }
    Ok(stale)
}

/// The loop that keeps the statistics current (module docs), until `stop`.
pub struct Keeper {
    pub db: Db,
    pub stop: CancellationToken,
}

impl Keeper {
    pub async fn run(self) {
        if self.db.dialect() != Dialect::Postgres {
            return;
        }
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            match refresh(&self.db, FLOOR).await {
                Ok(tables) if !tables.is_empty() => {
                    tracing::debug!(?tables, "analyzed tables that grew");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("could not analyze the tables that grew: {e}"),
            }
        }
    }
}
