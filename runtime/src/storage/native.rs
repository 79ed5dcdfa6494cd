//! SQLite in-process: a statement runs on the calling task, on a connection taken from a small
//! pool, instead of travelling to a connection thread and back (sqlx's SQLite driver: two
//! thread switches per statement, measured as the runtime's main cost under load).
//!
//! Design choice: statements block the calling thread for as long as SQLite takes, which is
//! microseconds for the runtime's indexed statements on a WAL database (no sync at commit
//! with `synchronous = NORMAL`). What could block for long is waiting for SQLite's write lock
//! while another process holds it, so connections have no busy timeout: a `SQLITE_BUSY` outside
//! a transaction (the transaction's `BEGIN IMMEDIATE`, a single-statement write) is waited
//! out here, asynchronously, up to [`BUSY_WAIT`]. Writers of this process never meet each
//! other there: they take turns at [`super::Db::write_gate`].

use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{ErrorCode, OpenFlags};

use super::slots::{Permit, Slots};
use super::sql::{Out, Row, Value, Want};
use super::Error;

/// How long a statement waits for another process's write lock before it fails.
const BUSY_WAIT: Duration = Duration::from_secs(30);
/// Prepared statements kept per connection (the runtime sends a few dozen distinct ones, and a
/// multi-row insert one per row count).
const STATEMENT_CACHE: usize = 256;

/// Up to `max` connections to one SQLite file, opened as needed; cheap to clone.
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

struct Shared {
    /// The file, as an SQLite URI.
    uri: String,
    slots: Slots<rusqlite::Connection>,
}

impl Pool {
    /// A pool for the database at an `sqlite:` URL (the file must exist: sqlx created and
    /// migrated it). One connection is opened now, so a bad path fails here.
    pub fn open(url: &str, max: u32) -> Result<Self, Error> {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        let path = path.strip_prefix("//").unwrap_or(path);
        let shared = Shared {
            uri: format!("file:{path}"),
            slots: Slots::new(max),
        };
        let first = shared.connect()?;
        shared.slots.give_back(first);
        Ok(Pool(Arc::new(shared)))
    }

    /// Close the idle connections, and the others as they come back.
    pub fn close(&self) {
        self.0.slots.close();
    }

    /// A connection of its own, waiting for one to be free.
    pub async fn acquire(&self) -> Result<Conn, Error> {
        let (idle, permit) = self.0.slots.take().await?;
        let conn = match idle {
            Some(conn) => conn,
            None => self.0.connect()?,
        };
        Ok(Conn {
            conn: Some(conn),
            pool: self.0.clone(),
            _permit: permit,
        })
    }
}

impl Shared {
    fn connect(&self) -> Result<rusqlite::Connection, Error> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = rusqlite::Connection::open_with_flags(&self.uri, flags)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 0;",
        )?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }
}

/// A connection taken from the pool; back to it when dropped (an open transaction rolled
/// back first).
pub struct Conn {
    conn: Option<rusqlite::Connection>,
    pool: Arc<Shared>,
    _permit: Permit,
}

impl Conn {
    fn conn(&self) -> &rusqlite::Connection {
        self.conn.as_ref().expect("taken only on drop")
    }

    /// Run one statement, waiting out another process's write lock (see the module doc).
    pub(super) async fn run(
        &mut self,
        sql: &str,
        args: &[Value],
        want: Want,
    ) -> Result<Out, Error> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            match run(self.conn(), sql, args, want) {
                Err(e)
                    if busy(&e) && self.conn().is_autocommit() && started.elapsed() < BUSY_WAIT =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                result => return result.map_err(Error::from),
            }
        }
    }

    /// End the transaction with `COMMIT` or `ROLLBACK`.
    pub async fn finish(&mut self, sql: &str) -> Result<(), Error> {
        self.run(sql, &[], Want::Done).await.map(|_| ())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if !conn.is_autocommit() && conn.execute_batch("ROLLBACK").is_err() {
            return; // closed with it: a connection in an unknown state is not reused
        }
        self.pool.slots.give_back(conn);
    }
}

fn busy(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
}

/// One statement: `$n` parameters bound to `args[n - 1]` (SQLite numbers `$n` parameters in
/// order of appearance, not by their digits), rows read as asked.
fn run(
    conn: &rusqlite::Connection,
    sql: &str,
    args: &[Value],
    want: Want,
) -> Result<Out, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(sql)?;
    for i in 1..=stmt.parameter_count() {
        let n = stmt
            .parameter_name(i)
            .and_then(|name| name.strip_prefix('$'))
            .and_then(|digits| digits.parse::<usize>().ok())
            .unwrap_or(i);
        match args.get(n.wrapping_sub(1)) {
            Some(v) => stmt.raw_bind_parameter(i, Bound(v))?,
            None => stmt.raw_bind_parameter(i, rusqlite::types::Null)?,
        }
    }
    let names: Arc<[String]> = match want {
        Want::Done => Arc::from([]),
        _ => stmt.column_names().into_iter().map(String::from).collect(),
    };
    let columns = names.len();
    let mut rows = Vec::new();
    let mut cursor = stmt.raw_query();
    while let Some(row) = cursor.next()? {
        if want == Want::Done {
            continue;
        }
        let values = (0..columns)
            .map(|i| row.get_ref(i).map(value))
            .collect::<Result<Vec<_>, _>>()?;
        rows.push(Row::new(names.clone(), values));
        if want == Want::First {
            break;
        }
    }
    drop(cursor);
    Ok(Out {
        rows,
        changed: conn.changes(),
    })
}

fn value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null(super::sql::Kind::Int),
        ValueRef::Integer(n) => Value::Int(n),
        ValueRef::Real(x) => Value::Real(x),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

/// A [`Value`] bound to an SQLite parameter, without a copy.
struct Bound<'a>(&'a Value);

impl rusqlite::ToSql for Bound<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null(_) => ValueRef::Null,
            Value::Int(n) => ValueRef::Integer(*n),
            Value::Int32(n) => ValueRef::Integer(i64::from(*n)),
            Value::Real(x) => ValueRef::Real(*x),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{query, Db, Pool as AnyPool};

    async fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let db = Db::connect(&url, 2).await.unwrap();
        (dir, db)
    }

    fn native(db: &Db) -> &Pool {
        match db.pool() {
            AnyPool::Native(p) => p,
            AnyPool::Pg(_) => panic!("SQLite is reached in-process"),
        }
    }

    #[tokio::test]
    async fn parameters_are_bound_by_their_number_not_their_place() {
        let (_dir, db) = db().await;
        let row = query("SELECT $2 || $1 AS swapped, $1 AS again")
            .bind("a")
            .bind("b")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(row.try_get::<String, _>("swapped").unwrap(), "ba");
        assert_eq!(row.try_get::<String, _>("again").unwrap(), "a");
    }

    #[tokio::test]
    async fn a_write_waits_for_another_connections_write_lock_instead_of_failing() {
        let (_dir, db) = db().await;
        let mut other = native(&db).acquire().await.unwrap();
        other.finish("BEGIN IMMEDIATE").await.unwrap();
        let write = query("INSERT INTO leases (name, holder, expires_ms) VALUES ('w', 'me', 1)")
            .execute(db.pool());
        tokio::pin!(write);
        assert!(
            futures::poll!(&mut write).is_pending(),
            "the write must wait while the lock is held"
        );
        other.finish("COMMIT").await.unwrap();
        assert_eq!(write.await.unwrap().rows_affected(), 1);
    }

    #[tokio::test]
    async fn a_connection_dropped_inside_a_transaction_rolls_it_back_and_is_reused() {
        let (_dir, db) = db().await;
        let tx = {
            let mut tx = db.begin().await.unwrap();
            query("INSERT INTO leases (name, holder, expires_ms) VALUES ('gone', 'me', 1)")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx
        };
        drop(tx);
        let n: i64 = crate::storage::query_scalar("SELECT COUNT(*) FROM leases")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(n, 0);
        let mut tx = db.begin().await.unwrap();
        query("INSERT INTO leases (name, holder, expires_ms) VALUES ('kept', 'me', 1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn a_transaction_with_a_savepoint_left_open_does_not_commit() {
        let (_dir, db) = db().await;
        let mut tx = db.begin().await.unwrap();
        {
            let mut sp = tx.savepoint().await.unwrap();
            query("INSERT INTO leases (name, holder, expires_ms) VALUES ('torn', 'me', 1)")
                .execute(&mut *sp)
                .await
                .unwrap();
        }
        assert!(matches!(tx.commit().await, Err(Error::Torn)));
        let n: i64 = crate::storage::query_scalar("SELECT COUNT(*) FROM leases")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(n, 0);
    }
}
