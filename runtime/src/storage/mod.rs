//! Storage through sqlx on SQLite (embedded default) or PostgreSQL (production, several
//! instances), chosen by the database URL.
//!
//! Design choice: one code path over `sqlx::Any`, with SQL both databases accept (`$n`
//! placeholders, `ON CONFLICT`, savepoints) and a [`Dialect`] only where they differ (how a
//! write transaction begins). Each table has one small module. Migrations for both live in
//! `migrations/<dialect>/` and run at connect.

pub mod deadlines;
pub mod deployments;
pub mod door;
pub mod generations;
pub mod held;
pub mod idempotency;
pub mod inbox;
pub mod lease;
pub mod ledger;
pub mod offsets;
pub mod outbox;
pub mod recordings;
pub mod sagas;
pub mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::any::{AnyArguments, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Transaction};

pub type Tx = Transaction<'static, Any>;
pub type Row = AnyRow;
/// A connection inside a transaction or savepoint (`&mut *tx`).
pub type Conn = sqlx::AnyConnection;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database URL {0:?} is neither sqlite:… nor postgres:…")]
    UnknownUrl(String),
    #[error("could not connect to the database at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// State a handler read changed before its effects committed; re-run the handler.
    #[error("state key {key:?} of service {service:?} changed concurrently")]
    Conflict { service: String, key: String },
    /// A row holds what this version of the runtime cannot read.
    #[error("unreadable row: {0}")]
    Corrupt(String),
}

impl Error {
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

/// A connection pool and its dialect; cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    dialect: Dialect,
}

impl Db {
    /// Connect, create the SQLite file if needed, and run the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::of_url(url)?;
        let url_with_options = match dialect {
            Dialect::Sqlite if !url.contains('?') && !url.contains(":memory:") => {
                format!("{url}?mode=rwc")
            }
            _ => url.to_string(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            // No ping before a pooled connection is handed out: a round trip (to SQLite's
            // worker thread, or to PostgreSQL) on every acquire, and most acquires run one
            // statement. A connection that broke while idle fails its statement instead, a
            // transient error every caller retries (and sqlx drops it on release).
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        use sqlx::Executor;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 30000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&url_with_options)
            .await
            .map_err(|source| Error::Connect {
                url: url.to_string(),
                source,
            })?;
        let db = Db { pool, dialect };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), Error> {
        match self.dialect {
            Dialect::Sqlite => {
                sqlx::migrate!("../migrations/sqlite")
                    .run(&self.pool)
                    .await?
            }
            Dialect::Postgres => {
                sqlx::migrate!("../migrations/postgres")
                    .run(&self.pool)
                    .await?
            }
        }
        Ok(())
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Begin a write transaction. SQLite takes the write lock up front (`BEGIN IMMEDIATE`), so
    /// two writers queue on the busy timeout instead of failing on a lock upgrade.
    pub async fn begin(&self) -> Result<Tx, Error> {
        count(2);
        Ok(match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        })
    }
}

/// SQL statements this process sent: every query made through [`query`] or [`query_scalar`],
/// and each write transaction's begin and its commit or rollback (savepoints and the
/// migrations not counted). `GET /_saga/stats` and `/metrics` report it; the benchmark divides
/// it by the events handled. One relaxed atomic add per statement.
static STATEMENTS: AtomicU64 = AtomicU64::new(0);

/// The statements this process sent so far (see `STATEMENTS`).
pub fn statements() -> u64 {
    STATEMENTS.load(Ordering::Relaxed)
}

fn count(n: u64) {
    STATEMENTS.fetch_add(n, Ordering::Relaxed);
}

/// `sqlx::query`, counted.
pub fn query(sql: &str) -> sqlx::query::Query<'_, Any, AnyArguments<'_>> {
    count(1);
    sqlx::query(sql)
}

/// `sqlx::query_scalar`, counted.
pub fn query_scalar<'q, O>(sql: &'q str) -> sqlx::query::QueryScalar<'q, Any, O, AnyArguments<'q>>
where
    (O,): for<'r> sqlx::FromRow<'r, AnyRow>,
{
    count(1);
    sqlx::query_scalar(sql)
}

/// Milliseconds since the Unix epoch of a [`std::time::SystemTime`].
pub fn millis(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `$from, $from+1, …` for `n` values: the parameter list of an `IN (…)`.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
