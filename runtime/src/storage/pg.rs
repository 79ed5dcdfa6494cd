//! PostgreSQL through sqlx's driver, on connections of a pool of the runtime's own, values bound
//! and read as PostgreSQL's types.
//!
//! Design choice: sqlx's pool tests every connection given back with a `Sync` round trip before
//! anyone else may take it (sqlx-core 0.8, `return_to_pool`), on a task spawned for it — for the
//! runtime, whose statements are mostly one per connection taken, a second round trip per
//! statement, and a wake-up of the server's backend and of a task here. Here a connection goes
//! back the moment its user drops it. Instead of the test: one whose statement failed other
//! than by the database's answer (I/O, protocol) is closed, not given back; one given back
//! inside a transaction is rolled back by a task of its own before anyone else can take it; one
//! that broke while idle fails its next statement, a transient error its caller retries (as
//! with sqlx's pool, which the runtime asked not to test before handing out). And no
//! `sqlx::Any` in between, which copied every parameter and every column once more.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgDatabaseError, PgRow, PgSeverity, PgValueRef, Postgres,
};
use sqlx::{Connection as _, Executor as _, Row as _, TypeInfo as _, ValueRef as _};

use super::slots::{Permit, Slots};
use super::sql::{Kind, Out, Row, Value, Want};
use super::Error;

/// Up to `max` connections to one PostgreSQL database, opened as needed; cheap to clone.
#[derive(Clone)]
pub struct Pool(Arc<Shared>);

struct Shared {
    options: PgConnectOptions,
    /// Run on each new connection.
    setup: &'static str,
    slots: Slots<PgConnection>,
}

impl Pool {
    /// A pool for the database at `url`, each new connection keeping `statements` prepared
    /// statements (unless the URL says `statement-cache-capacity`) and running `setup`. One
    /// connection is opened now, so a bad URL fails here; it is returned too, for the
    /// migrations, and joins the pool when dropped.
    pub async fn open(
        url: &str,
        max: u32,
        statements: usize,
        setup: &'static str,
    ) -> Result<(Self, Conn), Error> {
        let connect_error = |source| Error::Connect {
            url: url.to_string(),
            source,
        };
        let mut options = PgConnectOptions::from_str(url).map_err(connect_error)?;
        if !url.contains("statement-cache-capacity") {
            options = options.statement_cache_capacity(statements);
        }
        let shared = Arc::new(Shared {
            options,
            setup,
            slots: Slots::new(max),
        });
        let first = shared.connect().await.map_err(|e| match e {
            Error::Sql(source) => connect_error(source),
            other => other,
        })?;
        let pool = Pool(shared);
        let (_, permit) = pool.0.slots.take().await?;
        Ok((pool.clone(), pool.hold(first, permit)))
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
            None => self.0.connect().await?,
        };
        Ok(self.hold(conn, permit))
    }

    fn hold(&self, conn: PgConnection, permit: Permit) -> Conn {
        Conn {
            conn: Some(conn),
            pool: self.0.clone(),
            permit: Some(permit),
            in_transaction: false,
            broken: false,
        }
    }
}

impl Shared {
    async fn connect(&self) -> Result<PgConnection, Error> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        conn.execute(self.setup).await?;
        Ok(conn)
    }
}

/// A connection taken from the pool; back to it when dropped (see the module doc).
pub struct Conn {
    conn: Option<PgConnection>,
    pool: Arc<Shared>,
    /// Dropped only once the connection is back (or closed).
    permit: Option<Permit>,
    /// A `BEGIN` was sent and no `COMMIT` or `ROLLBACK` succeeded since.
    in_transaction: bool,
    /// A statement failed in a way that leaves the connection unusable.
    broken: bool,
}

impl Conn {
    /// The connection itself (the migrations).
    pub(super) fn raw(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("taken only on drop")
    }

    /// Run one statement (prepared, and kept prepared on this connection).
    pub(super) async fn run(
        &mut self,
        sql: &str,
        args: Vec<Value>,
        want: Want,
    ) -> Result<Out, Error> {
        let result = run(self.raw(), sql, args, want).await;
        self.note(result)
    }

    /// Begin a transaction; it ends with [`Conn::finish`], or is rolled back when dropped.
    /// Marked open before the `BEGIN` is sent: a caller that gives up while it is on its way
    /// (a timeout, a cancelled task) drops a connection the server may have begun a
    /// transaction on, and every later user of it would write inside that transaction. The
    /// `ROLLBACK` on drop ends it (one that began nothing only draws a warning).
    pub(super) async fn begin(&mut self) -> Result<(), Error> {
        self.in_transaction = true;
        self.simple("BEGIN").await
    }

    /// End the transaction with `COMMIT` or `ROLLBACK`.
    pub(super) async fn finish(&mut self, sql: &str) -> Result<(), Error> {
        self.simple(sql).await?;
        self.in_transaction = false;
        Ok(())
    }

    pub(super) fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// A statement without parameters or rows, unprepared.
    async fn simple(&mut self, sql: &str) -> Result<(), Error> {
        let result = self.raw().execute(sql).await.map(|_| ());
        self.note(result)
    }

    /// Mark the connection broken if `result` says so.
    fn note<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, Error> {
        if let Err(e) = &result {
            self.broken |= breaks(e);
        }
        Ok(result?)
    }
}

/// Whether an error leaves its connection unusable: anything but the database's answer to the
/// statement, or a value that did not convert — and of the database's answers, those that end
/// the session (severity `FATAL` or `PANIC`: the backend was terminated, the server is
/// shutting down, …), which arrive as the answer to the next statement sent.
fn breaks(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => ends_session(&**db),
        sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Encode(_)
        | sqlx::Error::Decode(_) => false,
        _ => true,
    }
}

/// Whether the database's error answer ended the session (severity `FATAL` or `PANIC`).
pub(super) fn ends_session(e: &dyn sqlx::error::DatabaseError) -> bool {
    e.try_downcast_ref::<PgDatabaseError>()
        .is_some_and(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic))
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Closed with it: a broken connection, or one of a closed pool (which also ends a
        // transaction left open: the server rolls it back when the session ends).
        if self.broken || self.pool.slots.is_closed() {
            return;
        }
        if !self.in_transaction {
            self.pool.slots.give_back(conn);
            return; // the permit after it
        }
        let (pool, permit) = (self.pool.clone(), self.permit.take());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if conn.execute("ROLLBACK").await.is_ok() {
                pool.slots.give_back(conn);
            }
            drop(permit);
        });
    }
}

/// One statement through sqlx, its values bound and its rows converted.
async fn run(
    conn: &mut PgConnection,
    sql: &str,
    args: Vec<Value>,
    want: Want,
) -> Result<Out, sqlx::Error> {
    let mut q = sqlx::query::<Postgres>(sql);
    for v in args {
        q = match v {
            Value::Null(Kind::Int) => q.bind(None::<i64>),
            Value::Null(Kind::Int32) => q.bind(None::<i32>),
            Value::Null(Kind::Real) => q.bind(None::<f64>),
            Value::Null(Kind::Text) => q.bind(None::<String>),
            Value::Null(Kind::Blob) => q.bind(None::<Vec<u8>>),
            Value::Int(n) => q.bind(n),
            Value::Int32(n) => q.bind(n),
            Value::Real(x) => q.bind(x),
            Value::Text(s) => q.bind(s),
            Value::Blob(b) => q.bind(b),
        };
    }
    let rows = match want {
        Want::Done => {
            let done = q.execute(conn).await?;
            return Ok(Out {
                rows: Vec::new(),
                changed: done.rows_affected(),
            });
        }
        Want::All => q.fetch_all(conn).await?,
        Want::First => q.fetch_optional(conn).await?.into_iter().collect(),
    };
    let Some(first) = rows.first() else {
        return Ok(Out {
            rows: Vec::new(),
            changed: 0,
        });
    };
    let columns = first.columns();
    let names: Arc<[String]> = columns
        .iter()
        .map(|c| sqlx::Column::name(c).to_string())
        .collect();
    // Each column's type once per statement, not once per row.
    let types = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = sqlx::Column::type_info(c).name();
            Type::of(name).ok_or_else(|| sqlx::Error::ColumnDecode {
                index: i.to_string(),
                source: format!("a column of type {name}, which the runtime does not read").into(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rows = rows
        .iter()
        .map(|r| Ok(Row::new(names.clone(), values(r, &types)?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Out { rows, changed: 0 })
}

/// The columns of a row as [`Value`]s, by their PostgreSQL types `types` (those the
/// runtime's statements return).
fn values(row: &PgRow, types: &[Type]) -> Result<Vec<Value>, sqlx::Error> {
    types
        .iter()
        .enumerate()
        .map(|(i, &ty)| {
            let raw = row.try_get_raw(i)?;
            let decoded = |source| sqlx::Error::ColumnDecode {
                index: i.to_string(),
                source,
            };
            if raw.is_null() {
                return Ok(Value::Null(match ty {
                    Type::Int4 => Kind::Int32,
                    Type::Float4 | Type::Float8 => Kind::Real,
                    Type::Text => Kind::Text,
                    Type::Bytea => Kind::Blob,
                    Type::Bool | Type::Int2 | Type::Int8 | Type::Void => Kind::Int,
                }));
            }
            fn decode<'r, T: sqlx::Decode<'r, Postgres>>(
                raw: PgValueRef<'r>,
            ) -> Result<T, sqlx::error::BoxDynError> {
                T::decode(raw)
            }
            let value = match ty {
                Type::Bool => decode::<bool>(raw).map(|b| Value::Int(i64::from(b))),
                Type::Int2 => decode::<i16>(raw).map(|n| Value::Int(i64::from(n))),
                Type::Int4 => decode(raw).map(Value::Int32),
                Type::Int8 => decode(raw).map(Value::Int),
                Type::Float4 => decode::<f32>(raw).map(|x| Value::Real(f64::from(x))),
                Type::Float8 => decode(raw).map(Value::Real),
                Type::Text => decode(raw).map(Value::Text),
                Type::Bytea => decode(raw).map(Value::Blob),
                Type::Void => Ok(Value::Null(Kind::Int)),
            };
            value.map_err(decoded)
        })
        .collect()
}

/// The column types the runtime reads.
#[derive(Clone, Copy)]
enum Type {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Text,
    Bytea,
    Void,
}

impl Type {
    /// By sqlx's name of the type.
    fn of(name: &str) -> Option<Self> {
        Some(match name {
            "BOOL" => Type::Bool,
            "INT2" => Type::Int2,
            "INT4" => Type::Int4,
            "INT8" => Type::Int8,
            "FLOAT4" => Type::Float4,
            "FLOAT8" => Type::Float8,
            "TEXT" | "VARCHAR" => Type::Text,
            "BYTEA" => Type::Bytea,
            "VOID" => Type::Void,
            _ => return None,
        })
    }
}
