//! Service state with optimistic concurrency: guests read committed rows (recording versions),
//! and [`apply`] writes their effects only if nothing they read has changed since.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Conn, Db, Error};
use crate::wasm::bindings::Write;
use crate::wasm::{ReadSet, StateReader, Versioned};

/// Read one key's value and version (version 0: never written).
pub async fn get(db: &Db, service: &str, key: &str) -> Result<Versioned, Error> {
    let row = super::query("SELECT value, version FROM state WHERE service = $1 AND key = $2")
        .bind(service)
        .bind(key)
        .fetch_optional(db.pool())
        .await?;
    Ok(match row {
        Some(row) => Versioned {
            value: row.try_get("value")?,
            version: row.try_get("version")?,
        },
        None => Versioned {
            value: None,
            version: 0,
        },
    })
}

/// Live keys with `prefix` (and after `after`, exclusive, if given), in key order.
pub async fn scan(
    db: &Db,
    service: &str,
    prefix: &str,
    after: Option<&str>,
    limit: u32,
) -> Result<Vec<(String, Versioned)>, Error> {
    // A range instead of LIKE: no escaping of '%' and '_' in keys, and it uses the primary key.
    // A cursor before the prefix starts at the prefix.
    let (from, inclusive) = match after {
        Some(after) if after >= prefix => (after, false),
        _ => (prefix, true),
    };
    let sql = if inclusive {
        "SELECT key, value, version FROM state \
         WHERE service = $1 AND key >= $2 AND key < $3 AND value IS NOT NULL \
         ORDER BY key LIMIT $4"
    } else {
        "SELECT key, value, version FROM state \
         WHERE service = $1 AND key > $2 AND key < $3 AND value IS NOT NULL \
         ORDER BY key LIMIT $4"
    };
    let rows = super::query(sql)
        .bind(service)
        .bind(from)
        .bind(prefix_end(prefix))
        .bind(limit as i64)
        .fetch_all(db.pool())
        .await?;
    rows.into_iter()
        .map(|row| {
            Ok((
                row.try_get("key")?,
                Versioned {
                    value: row.try_get("value")?,
                    version: row.try_get("version")?,
                },
            ))
        })
        .collect()
}

/// The smallest string greater than every string starting with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    end.push(char::MAX);
    end
}

/// Apply a handler's writes, checking every key it read (or wrote after reading) still has
/// the version it saw. Returns [`Error::Conflict`] otherwise; the caller rolls back to its
/// savepoint and re-runs the handler. Several writes to one key collapse to the last.
///
/// Keys only read are validated so that write skew cannot commit. SQLite serialises writers,
/// so a check inside the write transaction is enough. PostgreSQL runs writers side by side
/// under READ COMMITTED: there a read-only key is locked `FOR SHARE` until the commit, so a
/// concurrent writer of it waits and then fails its own check; a key read while absent first
/// gets a placeholder row (no value, version 0, what "never written" reads as) to lock. Lock
/// waits that end in a deadlock count as conflicts. Scans are checked for the keys they
/// returned; a key a concurrent commit adds under the prefix is not detected (see the WIT).
pub async fn apply(
    conn: &mut Conn,
    service: &str,
    reads: &ReadSet,
    writes: &[Write],
    now_ms: i64,
) -> Result<(), Error> {
    let postgres = conn.dialect() == super::Dialect::Postgres;
    let last: BTreeMap<&str, Option<&[u8]>> = writes
        .iter()
        .map(|w| (w.key.as_str(), w.value.as_deref()))
        .collect();
    let conflict = |key: &str| Error::Conflict {
        service: service.to_string(),
        key: key.to_string(),
    };
    let failed = |key: &str, e: Error| {
        if lock_conflict(&e) {
            conflict(key)
        } else {
            e
        }
    };
    for (key, &seen) in &reads.0 {
        if last.contains_key(key.as_str()) {
            continue;
        }
        if postgres && seen == 0 {
            super::query(
                "INSERT INTO state (service, key, value, version, valueless_ms) \
                 VALUES ($1, $2, NULL, 0, $3) ON CONFLICT (service, key) DO NOTHING",
            )
            .bind(service)
            .bind(key)
            .bind(now_ms)
            .execute(&mut *conn)
            .await
            .map_err(|e| failed(key, e))?;
        }
        let check = if postgres {
            "SELECT version FROM state WHERE service = $1 AND key = $2 FOR SHARE"
        } else {
            "SELECT version FROM state WHERE service = $1 AND key = $2"
        };
        let current: Option<i64> = super::query_scalar(check)
            .bind(service)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| failed(key, e))?;
        if current.unwrap_or(0) != seen {
            return Err(conflict(key));
        }
    }
    for (key, value) in last {
        // Since when the key holds no value (retention of tombstones), NULL while it holds
        // one: a write of a value then changes no indexed column (`migrations/*/0021`).
        let valueless = value.is_none().then_some(now_ms);
        let value = value.map(<[u8]>::to_vec);
        let affected = match reads.0.get(key) {
            // Read as never written: there may be no row, or a placeholder of version 0.
            Some(0) => super::query(
                "INSERT INTO state (service, key, value, version, valueless_ms) \
                 VALUES ($1, $2, $3, 1, $4) ON CONFLICT (service, key) DO UPDATE \
                 SET value = excluded.value, version = 1, valueless_ms = excluded.valueless_ms \
                 WHERE state.version = 0",
            )
            .bind(service)
            .bind(key)
            .bind(value)
            .bind(valueless)
            .execute(&mut *conn)
            .await
            .map_err(|e| failed(key, e))?
            .rows_affected(),
            Some(&seen) => super::query(
                "UPDATE state SET value = $3, version = version + 1, valueless_ms = $5 \
                 WHERE service = $1 AND key = $2 AND version = $4",
            )
            .bind(service)
            .bind(key)
            .bind(value)
            .bind(seen)
            .bind(valueless)
            .execute(&mut *conn)
            .await
            .map_err(|e| failed(key, e))?
            .rows_affected(),
            // A blind write (never read) cannot conflict; it just bumps the version.
            None => super::query(
                "INSERT INTO state (service, key, value, version, valueless_ms) \
                 VALUES ($1, $2, $3, 1, $4) ON CONFLICT (service, key) DO UPDATE \
                 SET value = excluded.value, version = state.version + 1, \
                 valueless_ms = excluded.valueless_ms",
            )
            .bind(service)
            .bind(key)
            .bind(value)
            .bind(valueless)
            .execute(&mut *conn)
            .await
            .map_err(|e| failed(key, e))?
            .rows_affected(),
        };
        if affected != 1 {
            return Err(conflict(key));
        }
    }
    Ok(())
}

/// Lock the existing rows of `keys` (sorted) for update, in key order (PostgreSQL). Two
/// transactions that lock their keys so before touching them never wait for each other in a
/// circle over those rows.
pub async fn lock(conn: &mut Conn, service: &str, keys: &[&str]) -> Result<(), Error> {
    if keys.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "SELECT key FROM state WHERE service = $1 AND key IN ({}) ORDER BY key \
         FOR NO KEY UPDATE",
        super::placeholders(2, keys.len())
    );
    let mut query = super::query(&sql).bind(service);
    for key in keys {
        query = query.bind(*key);
    }
    query.fetch_all(&mut *conn).await?;
    Ok(())
}

/// Whether a statement failed because of a lock another transaction holds (PostgreSQL's
/// deadlock detection or a serialisation failure): a conflict, re-run like any other.
fn lock_conflict(e: &Error) -> bool {
    let Error::Sql(sqlx::Error::Database(db)) = e else {
        return false;
    };
    matches!(db.code().as_deref(), Some("40P01" | "40001" | "55P03"))
}

/// Guests' reads, straight from the database (on the calling task: guest calls are async).
pub struct DbReader {
    db: Db,
}

impl DbReader {
    pub fn new(db: Db) -> Arc<Self> {
        Arc::new(DbReader { db })
    }
}

#[async_trait::async_trait]
impl StateReader for DbReader {
    async fn get(&self, service: &str, key: &str) -> Result<Versioned, String> {
        get(&self.db, service, key).await.map_err(|e| e.to_string())
    }

    async fn scan(
        &self,
        service: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Versioned)>, String> {
        scan(&self.db, service, prefix, after, limit)
            .await
            .map_err(|e| e.to_string())
    }
}
