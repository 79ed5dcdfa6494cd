//! Storage on SQLite (embedded default) or PostgreSQL (production, several instances), chosen
//! by the database URL.
//!
//! Design choice: one code path ([`sql`]: `query(sql).bind(v).execute(on)`), with SQL both
//! databases accept (`$n` placeholders, `ON CONFLICT`, savepoints) and a [`Dialect`] only
//! where they differ (how a write transaction begins). PostgreSQL is reached through sqlx's
//! driver on a pool of the runtime's own ([`pg`]); SQLite in-process ([`native`]), each
//! statement on the calling task, because a round trip per statement to a connection thread
//! (sqlx's SQLite driver) was the runtime's main cost.
//! Each table has one small module. Migrations for both live in `migrations/<dialect>/` and
//! sqlx runs them at connect.

/// `touched_ms = …` in an update of a row that retention ages by its `touched_ms` (`sagas`,
/// `saga_ledger`), `$now` being the statement's parameter for the time: moved only once it is a
/// minute behind, so most updates leave every indexed column as it was and PostgreSQL updates
/// the row in place (a HOT update: no new index entries). Retention counts in hours and days.
macro_rules! touch {
    ($table:literal, $now:literal) => {
        concat!(
            "touched_ms = CASE WHEN ",
            $table,
            ".touched_ms < ",
            $now,
            " - 60000 THEN ",
            $now,
            " ELSE ",
            $table,
            ".touched_ms END"
        )
    };
}

pub mod deadlines;
pub mod deployments;
pub mod door;
pub mod end;
pub mod generations;
pub mod held;
pub mod idempotency;
pub mod inbox;
pub mod joint;
pub mod lease;
pub mod ledger;
pub mod offsets;
pub mod outbox;
pub mod recordings;
pub mod sagas;
pub mod state;
pub mod statistics;
pub mod step;

mod native;
mod pg;
mod slots;
mod sql;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection as _;

pub use sql::{
    Bind, Column, Conn, Decode, Done, Kind, On, Pool, Query, Row, Savepoint, Scalar, Value,
};

/// A write transaction, holding this process's SQLite write gate (see [`Db::begin`]) until it
/// commits or rolls back (dropped, it rolls back). Derefs to its connection.
pub struct Tx {
    conn: Conn,
    _gate: Option<WriteGuard>,
}

impl std::ops::Deref for Tx {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

impl Tx {
    /// A transaction that is not one: its connection refuses every statement
    /// ([`Conn::detached`]), and its commit does nothing.
    pub fn detached(dialect: Dialect) -> Self {
        Tx {
            conn: Conn::detached(dialect),
            _gate: None,
        }
    }

    pub async fn commit(self) -> Result<(), Error> {
        self.conn.commit().await
    }

    pub async fn rollback(self) -> Result<(), Error> {
        self.conn.rollback().await
    }
}

/// This process's turn to write to SQLite (see [`Db::write_gate`]), held until dropped; the
/// time it was held is added to [`write_gate_held_us`].
pub struct WriteGuard {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    since: std::time::Instant,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let held = self.since.elapsed().as_micros() as u64;
        GATE_HELD_US.fetch_add(held, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database URL {0:?} is neither sqlite:… nor postgres:…")]
    UnknownUrl(String),
    #[error(
        "database URL {0:?} names an in-memory SQLite database, which the runtime cannot use: \
         each of its connections would open a database of its own, and nothing would survive \
         a restart; give a file (e.g. sqlite://saga.db)"
    )]
    InMemorySqlite(String),
    #[error("could not connect to the database at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A savepoint was left neither released nor rolled back (an error on the way), so the
    /// transaction around it must not commit.
    #[error("a savepoint was left open: the transaction is rolled back")]
    Torn,
    /// State a handler read changed before its effects committed; re-run the handler.
    #[error("state key {key:?} of service {service:?} changed concurrently")]
    Conflict { service: String, key: String },
    /// The connection failed during `COMMIT`: whether the transaction committed is unknown.
    /// Told to each command of a group commit (`crate::commands`).
    #[error("the commit's outcome is unknown: {0}")]
    CommitUnknown(String),
    /// A loop the statement was handed to has stopped (the instance is shutting down).
    #[error("{0} has stopped")]
    Stopped(&'static str),
    /// A statement on a detached connection ([`Conn::detached`]): the work was to write
    /// nothing before its one statement.
    #[error("a statement where none may run (the work was to end in one statement)")]
    Detached,
    /// A row holds what this version of the runtime cannot read.
    #[error("unreadable row: {0}")]
    Corrupt(String),
}

impl Error {
    /// Whether the database answered the statement with an error (one that does not end the
    /// session): a statement outside a transaction then wrote nothing. Any other failure (the
    /// connection broke, the server ended the session) may have come after it committed.
    pub fn refused_by_database(&self) -> bool {
        let Error::Sql(sqlx::Error::Database(db)) = self else {
            return false;
        };
        !pg::ends_session(&**db)
    }

    /// Whether the database refused the data itself (its encoding, its size, a constraint), so
    /// that running the same statements again gives the same error; as opposed to a database
    /// that is unreachable, busy, or in a conflict, where a retry can succeed.
    pub fn refuses_data(&self) -> bool {
        match self {
            Error::Sql(sqlx::Error::Encode(_)) => true,
            Error::Sql(sqlx::Error::Database(db)) => {
                if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    // SQLSTATE classes 22 data exception (e.g. a NUL byte), 23 integrity
                    // violation, 54 program limit exceeded (e.g. an index row too large).
                    let code = pg.code();
                    return ["22", "23", "54"].iter().any(|c| code.starts_with(c));
                }
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    // Primary result codes TOOBIG, CONSTRAINT, MISMATCH, RANGE.
                    let primary = db
                        .code()
                        .and_then(|c| c.parse::<i32>().ok())
                        .map(|c| c & 0xff);
                    return matches!(primary, Some(18 | 19 | 20 | 25));
                }
                false
            }
            Error::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::TooBig
                    | rusqlite::ErrorCode::ConstraintViolation
                    | rusqlite::ErrorCode::TypeMismatch
                    | rusqlite::ErrorCode::ParameterOutOfRange
            ),
            Error::Sqlite(rusqlite::Error::ToSqlConversionFailure(_)) => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub fn of_url(url: &str) -> Result<Self, Error> {
        if url.starts_with("sqlite:") {
            Ok(Dialect::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Dialect::Postgres)
        } else {
            Err(Error::UnknownUrl(url.to_string()))
        }
    }
}

/// Prepared statements kept per PostgreSQL connection, unless the URL says otherwise
/// (`statement-cache-capacity`). sqlx keeps 100 by default; the runtime's statement shapes
/// (padded row counts of each multi-row statement, the door's combinations of parts) are more:
/// at 128 clients one connection prepared ~240 statements in a 3000-saga run, so one execution
/// in eight first waited for a `Parse` round trip and a fresh plan.
pub const STATEMENT_CACHE: usize = 1024;

/// Every prepared statement of a PostgreSQL connection planned once, for any parameters, and
/// that plan reused. By default PostgreSQL plans the first five executions for their
/// parameters and keeps doing so while that looks cheaper; the runtime's statements are
/// lookups and writes by key, whose plan does not depend on the values, and a batch's end in one
/// statement (`joint`) took 0.7 ms to plan on each execution (its `Bind` in the server log, at 8
/// bench clients) against 0.3 ms to run.
const GENERIC_PLANS: &str = "SET plan_cache_mode = force_generic_plan";

/// A connection pool and its dialect; cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    dialect: Dialect,
    /// SQLite: one writer at a time inside this process, in arrival order (see
    /// [`Db::write_gate`]).
    gate: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Db {
    /// Connect, create the SQLite file if needed, and run the migrations. SQLite is then
    /// reached in-process ([`native`]); sqlx only creates and migrates its file. PostgreSQL
    /// through sqlx's driver on a pool of the runtime's own ([`pg`]).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, Error> {
        let dialect = Dialect::of_url(url)?;
        let pool = match dialect {
            Dialect::Sqlite => {
                if url.contains(":memory:") || url.contains("mode=memory") {
                    return Err(Error::InMemorySqlite(url.to_string()));
                }
                migrate_sqlite(url).await?;
                Pool::Native(native::Pool::open(url, max_connections)?)
            }
            Dialect::Postgres => {
                let (pool, mut first) =
                    pg::Pool::open(url, max_connections, STATEMENT_CACHE, GENERIC_PLANS).await?;
                sqlx::migrate!("../migrations/postgres")
                    .run(first.raw())
                    .await?;
                Pool::Pg(pool)
            }
        };
        let gate = (dialect == Dialect::Sqlite).then(|| Arc::new(tokio::sync::Mutex::new(())));
        Ok(Db {
            pool,
            dialect,
            gate,
        })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Begin a write transaction. SQLite takes the write lock up front (`BEGIN IMMEDIATE`), so
    /// two writers never fail on a lock upgrade; and the transaction holds this process's
    /// write gate, so it never meets another writer of the process at all.
    pub async fn begin(&self) -> Result<Tx, Error> {
        count(2);
        let gate = self.write_gate().await;
        let conn = match &self.pool {
            Pool::Native(pool) => {
                let mut conn = pool.acquire().await?;
                conn.finish("BEGIN IMMEDIATE").await?;
                Conn::new(sql::Inner::Native(conn))
            }
            Pool::Pg(pool) => {
                let mut conn = pool.acquire().await?;
                conn.begin().await?;
                Conn::new(sql::Inner::Pg(conn))
            }
        };
        Ok(Tx { conn, _gate: gate })
    }

    /// Wait for this process's turn to write to SQLite; hold the guard over a write made
    /// outside [`Db::begin`] (a single statement on the pool). SQLite has one writer at a
    /// time, and a writer that finds another sleeps in SQLite's busy handler — 1, 2, 5, 10,
    /// … 100 ms, and it tries again only when the sleep ends. Measured under the saga
    /// benchmark (8 clients) before the gate: ~10 s of such sleeps per 6 s of wall time over
    /// the four connections. Queued here instead, a writer starts the moment the one before
    /// it ends. A writer of another process (a `runtime` command) still meets the busy
    /// handler. After [`GATE_WAIT`] a writer goes on without its turn (and meets the busy
    /// handler): a gate held far longer than any transaction means a bug, not a queue.
    /// PostgreSQL: no gate (`None` at once).
    pub async fn write_gate(&self) -> Option<WriteGuard> {
        let gate = self.gate.clone()?;
        match tokio::time::timeout(GATE_WAIT, gate.lock_owned()).await {
            Ok(guard) => Some(WriteGuard {
                _guard: guard,
                since: std::time::Instant::now(),
            }),
            Err(_) => {
                tracing::warn!(
                    "waited {} s for the SQLite write gate: writing without it",
                    GATE_WAIT.as_secs()
                );
                None
            }
        }
    }
}

/// Create the SQLite file at `url` if there is none, and run the migrations on it.
async fn migrate_sqlite(url: &str) -> Result<(), Error> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use std::str::FromStr as _;
    let connect_error = |source| Error::Connect {
        url: url.to_string(),
        source,
    };
    let options = SqliteConnectOptions::from_str(url)
        .map_err(connect_error)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    let mut conn = sqlx::SqliteConnection::connect_with(&options)
        .await
        .map_err(connect_error)?;
    sqlx::migrate!("../migrations/sqlite")
        .run(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// How long a writer waits for the SQLite write gate before it writes without (see
/// [`Db::write_gate`]).
const GATE_WAIT: Duration = Duration::from_secs(10);

/// SQL statements this process sent: every query made through [`query`] or [`query_scalar`],
/// and each write transaction's begin and its commit or rollback (savepoints and the
/// migrations not counted). `GET /_saga/stats` and `/metrics` report it; the benchmark divides
/// it by the events handled. One relaxed atomic add per statement.
static STATEMENTS: AtomicU64 = AtomicU64::new(0);

/// The statements this process sent so far (see `STATEMENTS`).
pub fn statements() -> u64 {
    STATEMENTS.load(Ordering::Relaxed)
}

/// Microseconds this process held its SQLite write gate (see [`Db::write_gate`]); over wall
/// time, how busy its single writer is (near 1: writes are the bottleneck). 0 on PostgreSQL.
static GATE_HELD_US: AtomicU64 = AtomicU64::new(0);

/// The microseconds this process held the SQLite write gate so far (see `GATE_HELD_US`).
pub fn write_gate_held_us() -> u64 {
    GATE_HELD_US.load(Ordering::Relaxed)
}

fn count(n: u64) {
    STATEMENTS.fetch_add(n, Ordering::Relaxed);
}

/// A statement, counted (see [`sql`]).
pub fn query(sql: &str) -> Query<'_> {
    count(1);
    Query::new(sql)
}

/// A statement whose rows are one column, read as `O`; counted.
pub fn query_scalar<O: Decode>(sql: &str) -> Scalar<'_, O> {
    count(1);
    Scalar::new(sql)
}

/// Milliseconds since the Unix epoch of a [`std::time::SystemTime`].
pub fn millis(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `(VALUES ($a), ($b), …) AS probe(v)`: values bound at the placeholders `params`, as rows
/// for a `LATERAL (SELECT … WHERE service = … AND key = probe.v OFFSET 0)` beside them, which
/// looks each value up through the primary key on its own.
///
/// A plain `WHERE service = $1 AND key IN (…)` leaves PostgreSQL free to read every row of the
/// service through the key's prefix and filter them by the list, and it chooses that whenever
/// its statistics lag the table's growth — on a new database under load, whose tables grow
/// tenfold between two `ANALYZE`s (the saga benchmark: statements reading 1,000–10,000 rows to
/// return 30, most of the database's CPU). The `OFFSET 0` keeps the planner from flattening
/// the lookup into a join it could plan the same way.
fn probes(params: impl IntoIterator<Item = String>) -> String {
    let rows: Vec<String> = params.into_iter().map(|p| format!("({p})")).collect();
    format!("(VALUES {}) AS probe(v)", rows.join(", "))
}

/// The values a [`keyed`] lookup looks for, bound as its database takes them.
enum Keys {
    /// PostgreSQL: all in one JSON array bound at this placeholder, each looked up on its own
    /// ([`probes`]).
    Json(String),
    /// SQLite: all in one JSON array bound at this placeholder, for an
    /// `IN (SELECT value FROM json_each(…))`, which SQLite's planner takes through the primary
    /// key as it does an `IN (…)` of placeholders.
    JsonEach(String),
}

/// A `FROM` item `found`: `columns` of the rows of `table` of `service` whose `column` is one
/// of `values`, and that pass `filter` (`AND …`, or empty). The values are one JSON parameter
/// on either database, so that a statement made of several such lookups has one shape per
/// combination of lookups whatever their counts: it is parsed and planned once per connection,
/// not once per combination of counts (SQLite: the door's statement had so many shapes at 128
/// bench clients that preparing it again took 2 % of the runtime's CPU).
fn keyed(
    (table, columns): (&str, &str),
    (service, column): (&str, &str),
    values: Keys,
    filter: &str,
) -> String {
    match values {
        Keys::Json(param) => format!(
            "{}, LATERAL (SELECT {columns} FROM {table} WHERE service = {service} \
             AND {column} = probe.v {filter} OFFSET 0) AS found",
            json_probes(&param)
        ),
        Keys::JsonEach(param) => format!(
            "(SELECT {columns} FROM {table} WHERE service = {service} \
             AND {column} IN ({}) {filter}) AS found",
            json_each(&param)
        ),
    }
}

/// `AS probe(v)` rows ([`probes`]) from a JSON array bound at `param`.
fn json_probes(param: &str) -> String {
    format!("json_array_elements_text(CAST({param} AS json)) AS probe(v)")
}

/// SQLite: the values of the JSON array bound at `param`, for an `IN (…)`.
fn json_each(param: &str) -> String {
    format!("SELECT value FROM json_each({param})")
}

/// `$from, $from+1, …` for `n` values: the parameter list of an `IN (…)`.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
