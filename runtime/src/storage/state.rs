//! Service state with optimistic concurrency: guests read committed rows (recording versions),
//! and [`apply`] writes their effects only if nothing they read has changed since.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::joint::Joint;
use super::sql::Query;
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
        None => Versioned::never_written(),
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
    rows.iter().map(keyed).collect()
}

/// A row of `key, value, version`.
fn keyed(row: &super::Row) -> Result<(String, Versioned), Error> {
    let versioned = Versioned {
        value: row.try_get("value")?,
        version: row.try_get("version")?,
    };
    Ok((row.try_get("key")?, versioned))
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

/// The keys the handler calls `calls` (what each read, what each writes) touch, sorted, each
/// once: what a transaction committing them locks first ([`lock`]).
pub fn touched<'c>(calls: impl IntoIterator<Item = (&'c ReadSet, &'c [Write])>) -> Vec<&'c str> {
    let mut keys: Vec<&str> = calls
        .into_iter()
        .flat_map(|(reads, writes)| {
            let read = reads.0.keys().map(String::as_str);
            read.chain(writes.iter().map(|w| w.key.as_str()))
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Lock the existing rows of `keys` (sorted) for update, in key order (PostgreSQL), and return
/// their versions. Two transactions that lock their keys so before touching them never wait
/// for each other in a circle over those rows.
pub async fn lock(
    conn: &mut Conn,
    service: &str,
    keys: &[&str],
) -> Result<BTreeMap<String, i64>, Error> {
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let keys = padded(keys);
    // Each key looked up (and locked) on its own, in the list's order (`super::probes`).
    let sql = format!(
        "SELECT found.key, found.version FROM {}, LATERAL (SELECT key, version FROM state \
         WHERE service = $1 AND key = probe.v OFFSET 0 FOR NO KEY UPDATE) AS found",
        probes(keys.len())
    );
    let mut query = super::query(&sql).bind(service);
    for key in keys.iter() {
        query = query.bind(*key);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    rows.into_iter()
        .map(|row| Ok((row.try_get("key")?, row.try_get("version")?)))
        .collect()
}

/// A batch transaction's state writes on PostgreSQL, checked and gathered in memory, written
/// in two statements at its end ([`Staged::flush`]) instead of one or two per key.
///
/// It starts from the versions [`lock`] returned ([`Staged::new`]): rows locked until the
/// commit, so nothing but this transaction changes them, and a handler's reads are checked
/// against them (and against the writes staged before it) without a statement. Keys without
/// a row when locked are inserted at the flush, with placeholder rows (no value, version 0)
/// for keys only read as never written, so that a writer of such a key meets this
/// transaction's row as it would a `FOR SHARE` lock. Another transaction may write such a
/// key first: the flush then finds fewer rows inserted and answers [`Error::Conflict`], and
/// the caller commits again the statement-by-statement way ([`apply`]); a placeholder it left
/// (version 0) is taken over.
///
/// Or it starts from nothing ([`Staged::assuming`]) and takes each key's version from the
/// first handler that read it: the end's one statement ([`Staged::join`]) then checks those
/// versions itself — each write updates the row only at the version assumed, each key only
/// read is locked `FOR SHARE` and its version compared — so the end needs no transaction
/// around it and no lock taken before; a version not as assumed fails the statement. A key
/// written without being read first ("blind", as a command creating a record writes it) has
/// no version to assume: it is written over whatever version its row has, one more per write,
/// as [`apply`] writes it; a handler after that reads it is a conflict.
#[derive(Debug, Default)]
pub struct Staged {
    service: String,
    /// Rows that existed when locked (or as first read), with their versions.
    locked: BTreeMap<String, i64>,
    /// Every key's version as this transaction leaves it so far (absent: 0).
    now: BTreeMap<String, i64>,
    /// The last value written to each key (its version is in `now`).
    writes: BTreeMap<String, Option<Vec<u8>>>,
    /// Keys without a row, read as never written and not written.
    placeholders: std::collections::BTreeSet<String>,
    now_ms: i64,
    /// Versions are taken from the reads (`assuming`), not from locked rows.
    assumed: bool,
    /// Keys written without being read first while `assumed`: their versions are unknown
    /// (`now` holds how many writes each adds).
    blind: std::collections::BTreeSet<String>,
}

impl Staged {
    pub fn new(service: &str, locked: BTreeMap<String, i64>, now_ms: i64) -> Self {
        Staged {
            service: service.to_string(),
            now: locked.clone(),
            locked,
            now_ms,
            ..Staged::default()
        }
    }

    /// Staged writes whose keys' versions are the ones their first readers saw, checked by
    /// the end's statement ([`Staged::join`]) instead of locked before.
    pub fn assuming(service: &str, now_ms: i64) -> Self {
        Staged {
            service: service.to_string(),
            now_ms,
            assumed: true,
            ..Staged::default()
        }
    }

    /// The time its writes are stamped with (a tombstone's age, a placeholder's).
    pub fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// Whether a handler that read `reads` could commit now: [`Error::Conflict`] naming the
    /// first key whose version moved since it was read. A key no handler before touched
    /// passes while `assumed` (the end's statement checks it).
    pub fn check(&self, reads: &ReadSet) -> Result<(), Error> {
        let moved = |key: &str, seen: i64| match self.now.get(key) {
            _ if self.blind.contains(key) => true,
            Some(&now) => now != seen,
            None => !self.assumed && seen != 0,
        };
        match reads.0.iter().find(|(key, &seen)| moved(key, seen)) {
            Some((key, _)) => Err(Error::Conflict {
                service: self.service.clone(),
                key: key.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Stage a handler's writes, after [`Staged::check`] passed for its reads. Several
    /// writes to one key collapse to the last.
    pub fn stage(&mut self, reads: &ReadSet, writes: &[Write]) {
        if self.assumed {
            for (key, &seen) in &reads.0 {
                if !self.now.contains_key(key) {
                    self.now.insert(key.clone(), seen);
                    if seen != 0 {
                        self.locked.insert(key.clone(), seen);
                    }
                }
            }
        }
        let last: BTreeMap<&str, Option<&[u8]>> = writes
            .iter()
            .map(|w| (w.key.as_str(), w.value.as_deref()))
            .collect();
        for (key, &seen) in &reads.0 {
            if seen == 0 && !last.contains_key(key.as_str()) && !self.locked.contains_key(key) {
                self.placeholders.insert(key.clone());
            }
        }
        for (key, value) in last {
            if self.assumed && !self.now.contains_key(key) {
                self.blind.insert(key.to_string());
            }
            let version = self.now.get(key).copied().unwrap_or(0) + 1;
            self.now.insert(key.to_string(), version);
            self.writes
                .insert(key.to_string(), value.map(<[u8]>::to_vec));
        }
    }

    /// Write what was staged: rows that existed updated in one statement, new rows and
    /// placeholders inserted in another (per [`GATHER_KEYS`]). Inside the transaction that
    /// locked the rows ([`Staged::new`]).
    pub async fn flush(self, conn: &mut Conn) -> Result<(), Error> {
        let rows = self.rows();
        for chunk in rows.updates.chunks(GATHER_KEYS) {
            let query = super::query(UPDATE).bind(self.service.as_str());
            query
                .bind(super::joint::json(chunk))
                .execute(&mut *conn)
                .await?;
        }
        for chunk in rows.inserts.chunks(GATHER_KEYS) {
            let query = super::query(INSERT).bind(self.service.as_str());
            let inserted = query
                .bind(super::joint::json(chunk))
                .execute(&mut *conn)
                .await?
                .rows_affected();
            if inserted != chunk.len() as u64 {
                // Inserted by another transaction since this one locked its keys.
                return Err(Error::Conflict {
                    service: self.service.clone(),
                    key: chunk[0].key.to_string(),
                });
            }
        }
        for chunk in rows.blind.chunks(GATHER_KEYS) {
            let query = super::query(UPSERT).bind(self.service.as_str());
            query
                .bind(super::joint::json(chunk))
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// Join what [`Staged::flush`] writes to `joint` (`state_updated`, `state_inserted`,
    /// `state_blind`), with the checks that every row was updated at the version it had and
    /// every new row was inserted; when `assumed`, also the keys only read, locked and compared
    /// (`state_read`). `false` (nothing joined): too many keys for one statement.
    pub fn join(&self, joint: &mut Joint) -> bool {
        let rows = self.rows();
        let read: Vec<JsonRead<'_>> = match self.assumed {
            true => self
                .locked
                .iter()
                .filter(|(key, _)| !self.writes.contains_key(*key))
                .map(|(key, &version)| JsonRead { key, version })
                .collect(),
            false => Vec::new(),
        };
        let counts = [
            rows.updates.len(),
            rows.inserts.len(),
            rows.blind.len(),
            read.len(),
        ];
        if counts.iter().any(|&n| n > GATHER_KEYS) {
            return false;
        }
        let service = self.service.as_str();
        if !rows.updates.is_empty() {
            let query = Query::new(JOINED_UPDATE).bind(service);
            joint.with(query.bind(super::joint::json(&rows.updates)));
            joint.expect("SELECT COUNT(*) FROM state_updated", rows.updates.len());
        }
        if !rows.inserts.is_empty() {
            let query = Query::new(JOINED_INSERT).bind(service);
            joint.with(query.bind(super::joint::json(&rows.inserts)));
            joint.expect("SELECT COUNT(*) FROM state_inserted", rows.inserts.len());
        }
        if !rows.blind.is_empty() {
            let query = Query::new(JOINED_UPSERT).bind(service);
            joint.with(query.bind(super::joint::json(&rows.blind)));
        }
        if !read.is_empty() {
            let query = Query::new(JOINED_READ).bind(service);
            joint.with(query.bind(super::joint::json(&read)));
            joint.expect("SELECT COUNT(*) FROM state_read", read.len());
        }
        true
    }

    /// The staged rows by how they are written.
    fn rows(&self) -> Rows<'_> {
        let mut rows = Rows::default();
        for (key, value) in &self.writes {
            let before = self.locked.get(key).copied();
            let row = StagedRow {
                key,
                value: value.as_deref().map(super::joint::hex),
                version: self.now[key],
                // Since when the key holds no value: NULL while it holds one.
                valueless_ms: value.is_none().then_some(self.now_ms),
                before: before.unwrap_or(0),
            };
            match before {
                _ if self.blind.contains(key) => rows.blind.push(row),
                Some(_) => rows.updates.push(row),
                None => rows.inserts.push(row),
            }
        }
        for key in self
            .placeholders
            .iter()
            .filter(|k| !self.writes.contains_key(*k))
        {
            rows.inserts.push(StagedRow {
                key,
                value: None,
                version: 0,
                valueless_ms: Some(self.now_ms),
                before: 0,
            });
        }
        rows
    }
}

/// [`Staged`]'s rows by how they are written.
#[derive(Default)]
struct Rows<'r> {
    /// Rows that existed, updated at the version staged against.
    updates: Vec<StagedRow<'r>>,
    /// New rows (and placeholders).
    inserts: Vec<StagedRow<'r>>,
    /// Rows written without being read (`version`: how many writes to add).
    blind: Vec<StagedRow<'r>>,
}

/// A key only read, at the version read ([`JOINED_READ`]).
#[derive(serde::Serialize)]
struct JsonRead<'r> {
    key: &'r str,
    version: i64,
}

/// Update existing rows (`$1` the service, `$2` the rows, [`StagedRow`]s): each found through the
/// primary key on its own (`super::probes`), then updated where it was found if its version is
/// still the one it was staged against (`before`).
macro_rules! update {
    () => {
        "UPDATE state SET value = v.value, version = v.version, \
         valueless_ms = v.valueless_ms FROM (SELECT v.key, decode(v.value, 'hex') AS value, \
         v.version, v.valueless_ms, v.before, found.at \
         FROM json_to_recordset(CAST($2 AS json)) \
         AS v(key text, value text, version bigint, valueless_ms bigint, before bigint), \
         LATERAL (SELECT ctid AS at FROM state WHERE service = $1 AND key = v.key OFFSET 0) \
         AS found) AS v WHERE state.ctid = v.at AND state.version = v.before"
    };
}

/// Rows (`$1` the service, `$2` the rows, [`StagedRow`]s) inserted, or on a key that has a
/// row, its value set and (the rest of the statement) its version.
macro_rules! insert_or_set {
    () => {
        "INSERT INTO state (service, key, value, version, valueless_ms) \
         SELECT $1, v.key, decode(v.value, 'hex'), v.version, v.valueless_ms \
         FROM json_to_recordset(CAST($2 AS json)) \
         AS v(key text, value text, version bigint, valueless_ms bigint) \
         ON CONFLICT (service, key) DO UPDATE SET value = excluded.value, \
         valueless_ms = excluded.valueless_ms, "
    };
}

/// Insert new rows ([`insert_or_set`]): keys read as never written, none over a row that was
/// written since. A placeholder row (version 0, what "never written" reads as: another
/// transaction's, or one left by a handler that only read the key) is taken over, as
/// [`apply`] takes it over; a version-0 row is still updated, so it stays locked until the
/// commit.
macro_rules! insert {
    () => {
        concat!(
            insert_or_set!(),
            "version = excluded.version WHERE state.version = 0"
        )
    };
}

/// Write rows whatever their versions ([`insert_or_set`], each row's `version` how many
/// writes to add): keys written without being read, as [`apply`] writes such a key.
macro_rules! upsert {
    () => {
        concat!(
            insert_or_set!(),
            "version = state.version + excluded.version"
        )
    };
}

const UPDATE: &str = update!();
const INSERT: &str = insert!();
const UPSERT: &str = upsert!();
/// [`UPDATE`] as [`Staged::join`]'s entry, a row per key updated.
const JOINED_UPDATE: &str = concat!("state_updated AS (", update!(), " RETURNING 1)");
/// [`INSERT`] as [`Staged::join`]'s entry, a row per key inserted.
const JOINED_INSERT: &str = concat!("state_inserted AS (", insert!(), " RETURNING 1)");
/// [`UPSERT`] as [`Staged::join`]'s entry.
const JOINED_UPSERT: &str = concat!("state_blind AS (", upsert!(), " RETURNING 1)");
/// Keys only read (`$1` the service, `$2` [`JsonRead`]s), each locked `FOR SHARE` until the
/// end commits and yielding a row if its version is the one read: a writer of the key waits,
/// and then its own check finds the version this end leaves.
const JOINED_READ: &str = "state_read AS (SELECT 1 FROM json_to_recordset(CAST($2 AS json)) \
     AS v(key text, version bigint), LATERAL (SELECT version FROM state \
     WHERE service = $1 AND key = v.key OFFSET 0 FOR SHARE) AS found \
     WHERE found.version = v.version)";

/// A staged row as [`Staged::join`] sends it, one object of a JSON parameter: its key's value (in hex)
/// and version as the end leaves them, since when it holds no value, and (an update) the
/// version it is staged against.
#[derive(serde::Serialize)]
struct StagedRow<'r> {
    key: &'r str,
    value: Option<String>,
    version: i64,
    valueless_ms: Option<i64>,
    before: i64,
}

/// The keys bound from `$2` on, one row each (`super::probes`).
fn probes(keys: usize) -> String {
    super::probes((2..2 + keys).map(|i| format!("${i}")))
}

/// `rows` padded to a power of two with copies of its last (a lookup, an update or an insert
/// that meets a row twice does nothing more): a few statement shapes serve every count and
/// stay prepared on each connection.
fn padded<T: Clone>(rows: &[T]) -> std::borrow::Cow<'_, [T]> {
    let n = rows.len().next_power_of_two();
    match rows.last() {
        Some(last) if n > rows.len() => {
            let mut all = rows.to_vec();
            all.resize(n, last.clone());
            std::borrow::Cow::Owned(all)
        }
        _ => std::borrow::Cow::Borrowed(rows),
    }
}

/// Whether a statement failed because of a lock another transaction holds (PostgreSQL's
/// deadlock detection or a serialisation failure): a conflict, re-run like any other.
fn lock_conflict(e: &Error) -> bool {
    let Error::Sql(sqlx::Error::Database(db)) = e else {
        return false;
    };
    matches!(db.code().as_deref(), Some("40P01" | "40001" | "55P03"))
}

/// Guests' reads. On SQLite each goes straight to the database, on the calling task. On
/// PostgreSQL single-key reads are gathered ([`Gatherer`]): one statement answers the reads
/// asked for while earlier ones were on their way.
pub struct DbReader {
    db: Db,
    gathered: Option<Gatherer>,
}

impl DbReader {
    /// Starts the gatherer's task on PostgreSQL (call inside the runtime).
    pub fn new(db: Db) -> Arc<Self> {
        let gathered = (db.dialect() == super::Dialect::Postgres).then(|| Gatherer::start(&db));
        Arc::new(DbReader { db, gathered })
    }
}

#[async_trait::async_trait]
impl StateReader for DbReader {
    async fn get(&self, service: &str, key: &str) -> Result<Versioned, String> {
        match &self.gathered {
            Some(gathered) => gathered.get(service, key).await,
            None => get(&self.db, service, key).await.map_err(|e| e.to_string()),
        }
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

/// Statements of gathered reads on their way at once: while all are, new reads wait and go
/// together in the next.
const GATHER_IN_FLIGHT: usize = 2;
/// Reads queued at most; a reader waits for room (each waits for its answer anyway).
const GATHER_QUEUED: usize = 4096;
/// Keys one gathered statement asks for, at most.
const GATHER_KEYS: usize = 64;

/// Single-key reads gathered into one statement, whichever services they read (PostgreSQL,
/// where each statement is a round trip and most of a saga step's statements were such reads:
/// 8.8 of ~41 per saga in the saga benchmark at 128 clients; one statement per service among
/// the gathered reads still made 2.4 per saga). A read asked for while a slot is free goes alone,
/// at once; under load reads queue behind the [`GATHER_IN_FLIGHT`] statements on their way
/// and the next statement takes up to [`GATHER_KEYS`] of them. The queue holds at most one
/// read per waiting caller (each waits for its answer).
///
/// Design choice: no timer gathers reads (that would delay every read at low load); the
/// statements on their way are the only wait.
pub struct Gatherer {
    asks: tokio::sync::mpsc::Sender<Ask>,
}

struct Ask {
    service: String,
    key: String,
    answer: tokio::sync::oneshot::Sender<Result<Versioned, String>>,
}

impl Gatherer {
    /// Start the task that gathers reads; it ends when the gatherer is dropped.
    pub fn start(db: &Db) -> Self {
        let (asks, queue) = tokio::sync::mpsc::channel(GATHER_QUEUED);
        let db = db.clone();
        tokio::spawn(crate::grouped::serve(
            queue,
            GATHER_IN_FLIGHT,
            GATHER_KEYS,
            move |asks| {
                let db = db.clone();
                async move { answer(&db, asks).await }
            },
        ));
        Gatherer { asks }
    }

    pub async fn get(&self, service: &str, key: &str) -> Result<Versioned, String> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let ask = Ask {
            service: service.to_string(),
            key: key.to_string(),
            answer,
        };
        self.asks
            .send(ask)
            .await
            .map_err(|_| "state reads have stopped".to_string())?;
        answered
            .await
            .map_err(|_| "a state read was dropped unanswered".to_string())?
    }
}

/// Answer `asks` with one statement, whichever services they read.
async fn answer(db: &Db, asks: Vec<Ask>) {
    let mut keys: Vec<(&str, &str)> = asks
        .iter()
        .map(|a| (a.service.as_str(), a.key.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let read = get_many(db, &keys).await.map_err(|e| e.to_string());
    let answers: Vec<Result<Versioned, String>> = asks
        .iter()
        .map(|ask| match &read {
            Ok(rows) => Ok(rows
                .get(&(ask.service.clone(), ask.key.clone()))
                .cloned()
                .unwrap_or_else(Versioned::never_written)),
            Err(e) => Err(e.clone()),
        })
        .collect();
    for (ask, versioned) in asks.into_iter().zip(answers) {
        let _ = ask.answer.send(versioned); // a caller that gave up needs no answer
    }
}

/// The stored rows of `keys` (distinct `(service, key)` pairs), in one statement, each looked
/// up on its own (`super::probes`).
pub async fn get_many(
    db: &Db,
    keys: &[(&str, &str)],
) -> Result<BTreeMap<(String, String), Versioned>, Error> {
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let keys = padded(keys);
    let pairs = (0..keys.len()).map(|i| format!("${}, ${}", 2 * i + 1, 2 * i + 2));
    let sql = format!(
        "SELECT probe.s AS service, found.key, found.value, found.version \
         FROM (VALUES {}) AS probe(s, v), LATERAL (SELECT key, value, version FROM state \
         WHERE service = probe.s AND key = probe.v OFFSET 0) AS found",
        pairs
            .map(|p| format!("({p})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut query = super::query(&sql);
    for (service, key) in keys.iter() {
        query = query.bind(*service).bind(*key);
    }
    let rows = query.fetch_all(db.pool()).await?;
    rows.iter()
        .map(|row| {
            let (key, versioned) = keyed(row)?;
            Ok(((row.try_get("service")?, key), versioned))
        })
        .collect()
}
