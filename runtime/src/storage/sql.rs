//! The statements storage code sends and the rows it reads back, the same for both databases:
//! `query(sql).bind(v).execute(on)`, rows read by column name. PostgreSQL runs them through
//! sqlx's driver ([`super::pg`]); SQLite in-process on the calling task ([`super::native`]).
//!
//! Design choice: a query builder shaped like sqlx's, so each table's module is written once,
//! with values converted once at the edge (binds into sqlx or SQLite, result columns into
//! [`Value`]s). On PostgreSQL that conversion is the cost, small against a network round trip;
//! on SQLite it buys statements without a round trip to a connection thread (sqlx's SQLite
//! driver runs each connection on a thread of its own: two thread switches per statement).

use std::sync::Arc;

use super::{native, pg, Dialect, Error};

/// A value bound to a statement or read from a row. Integers bound as 32-bit stay so on
/// PostgreSQL (an `INTEGER` column takes no 64-bit parameter); SQLite stores every integer
/// as 64-bit.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A `NULL` of a type (PostgreSQL types its parameters).
    Null(Kind),
    Int(i64),
    Int32(i32),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// The type of a [`Value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Int32,
    Real,
    Text,
    Blob,
}

/// What can be bound to a statement's next parameter.
pub trait Bind {
    const KIND: Kind;
    fn value(self) -> Value;
}

macro_rules! bind {
    ($($t:ty => $kind:ident, |$v:ident| $e:expr;)*) => {$(
        impl Bind for $t {
            const KIND: Kind = Kind::$kind;
            fn value(self) -> Value {
                let $v = self;
                $e
            }
        }
    )*};
}

bind! {
    i64 => Int, |v| Value::Int(v);
    i32 => Int32, |v| Value::Int32(v);
    f64 => Real, |v| Value::Real(v);
    String => Text, |v| Value::Text(v);
    &str => Text, |v| Value::Text(v.to_string());
    &String => Text, |v| Value::Text(v.clone());
    Vec<u8> => Blob, |v| Value::Blob(v);
    &[u8] => Blob, |v| Value::Blob(v.to_vec());
    &Vec<u8> => Blob, |v| Value::Blob(v.clone());
}

impl<T: Bind> Bind for Option<T> {
    const KIND: Kind = T::KIND;
    fn value(self) -> Value {
        match self {
            Some(v) => v.value(),
            None => Value::Null(T::KIND),
        }
    }
}

/// What a column can be read as (`None`: it holds something else).
pub trait Decode: Sized {
    fn decode(v: &Value) -> Option<Self>;
}

impl Decode for i64 {
    fn decode(v: &Value) -> Option<Self> {
        match v {
            Value::Int(n) => Some(*n),
            Value::Int32(n) => Some(i64::from(*n)),
            _ => None,
        }
    }
}

impl Decode for i32 {
    fn decode(v: &Value) -> Option<Self> {
        match v {
            Value::Int32(n) => Some(*n),
            Value::Int(n) => i32::try_from(*n).ok(),
            _ => None,
        }
    }
}

impl Decode for f64 {
    fn decode(v: &Value) -> Option<Self> {
        match v {
            Value::Real(x) => Some(*x),
            Value::Int(n) => Some(*n as f64),
            Value::Int32(n) => Some(f64::from(*n)),
            _ => None,
        }
    }
}

impl Decode for String {
    fn decode(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl Decode for Vec<u8> {
    fn decode(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            Value::Text(s) => Some(s.as_bytes().to_vec()),
            _ => None,
        }
    }
}

impl<T: Decode> Decode for Option<T> {
    fn decode(v: &Value) -> Option<Self> {
        match v {
            Value::Null(_) => Some(None),
            v => T::decode(v).map(Some),
        }
    }
}

/// How a row's column is named: by name or by position.
pub trait Column: std::fmt::Debug {
    fn find(&self, names: &[String]) -> Option<usize>;
}

impl Column for &str {
    fn find(&self, names: &[String]) -> Option<usize> {
        names.iter().position(|n| n == self)
    }
}

impl Column for usize {
    fn find(&self, names: &[String]) -> Option<usize> {
        (*self < names.len()).then_some(*self)
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row {
    names: Arc<[String]>,
    values: Vec<Value>,
}

impl Row {
    pub(super) fn new(names: Arc<[String]>, values: Vec<Value>) -> Self {
        Row { names, values }
    }

    /// Column `col` as a `T`, or [`Error::Corrupt`] naming what it holds instead.
    pub fn try_get<T: Decode, C: Column>(&self, col: C) -> Result<T, Error> {
        let i = col
            .find(&self.names)
            .ok_or_else(|| Error::Corrupt(format!("no column {col:?} in the result")))?;
        T::decode(&self.values[i]).ok_or_else(|| {
            Error::Corrupt(format!(
                "column {col:?} holds {:?}, not a {}",
                self.values[i],
                std::any::type_name::<T>()
            ))
        })
    }
}

/// What a statement is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    /// Run it; how many rows it changed.
    Done,
    /// Every row.
    All,
    /// The first row, if any.
    First,
}

/// What a statement came to: its rows (as asked) and the rows it changed.
pub(super) struct Out {
    pub rows: Vec<Row>,
    pub changed: u64,
}

/// What a statement ran to completion reports.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    changed: u64,
}

impl Done {
    pub fn rows_affected(&self) -> u64 {
        self.changed
    }
}

/// A statement and its parameters (`$1`, `$2`, … in bind order).
#[must_use = "a query does nothing until it is executed or fetched"]
pub struct Query<'q> {
    sql: &'q str,
    args: Vec<Value>,
}

impl<'q> Query<'q> {
    pub(super) fn new(sql: &'q str) -> Self {
        Query {
            sql,
            args: Vec::new(),
        }
    }

    pub fn bind<T: Bind>(mut self, v: T) -> Self {
        self.args.push(v.value());
        self
    }

    /// Bind a value as it is.
    pub(super) fn bind_value(mut self, v: Value) -> Self {
        self.args.push(v);
        self
    }

    /// Its text and its parameters (`super::joint`).
    pub(super) fn into_parts(self) -> (&'q str, Vec<Value>) {
        (self.sql, self.args)
    }

    pub async fn execute<'c>(self, on: impl Into<On<'c>>) -> Result<Done, Error> {
        let out = self.run(on.into(), Want::Done).await?;
        Ok(Done {
            changed: out.changed,
        })
    }

    pub async fn fetch_all<'c>(self, on: impl Into<On<'c>>) -> Result<Vec<Row>, Error> {
        Ok(self.run(on.into(), Want::All).await?.rows)
    }

    pub async fn fetch_optional<'c>(self, on: impl Into<On<'c>>) -> Result<Option<Row>, Error> {
        Ok(self
            .run(on.into(), Want::First)
            .await?
            .rows
            .into_iter()
            .next())
    }

    pub async fn fetch_one<'c>(self, on: impl Into<On<'c>>) -> Result<Row, Error> {
        self.fetch_optional(on)
            .await?
            .ok_or(Error::Sql(sqlx::Error::RowNotFound))
    }

    async fn run(self, on: On<'_>, want: Want) -> Result<Out, Error> {
        match on {
            On::Pool(Pool::Pg(pool)) => pool.acquire().await?.run(self.sql, self.args, want).await,
            On::Pool(Pool::Native(pool)) => {
                pool.acquire().await?.run(self.sql, &self.args, want).await
            }
            On::Conn(conn) => match &mut conn.inner {
                Inner::Pg(c) => c.run(self.sql, self.args, want).await,
                Inner::Native(c) => c.run(self.sql, &self.args, want).await,
                Inner::Detached(_) => Err(Error::Detached),
            },
        }
    }
}

/// A query whose rows are one column, read as `O`.
#[must_use = "a query does nothing until it is fetched"]
pub struct Scalar<'q, O> {
    query: Query<'q>,
    _o: std::marker::PhantomData<O>,
}

impl<'q, O: Decode> Scalar<'q, O> {
    pub(super) fn new(sql: &'q str) -> Self {
        Scalar {
            query: Query::new(sql),
            _o: std::marker::PhantomData,
        }
    }

    pub fn bind<T: Bind>(mut self, v: T) -> Self {
        self.query = self.query.bind(v);
        self
    }

    pub async fn fetch_all<'c>(self, on: impl Into<On<'c>>) -> Result<Vec<O>, Error> {
        let rows = self.query.fetch_all(on).await?;
        rows.iter().map(|r| r.try_get(0)).collect()
    }

    pub async fn fetch_optional<'c>(self, on: impl Into<On<'c>>) -> Result<Option<O>, Error> {
        let row = self.query.fetch_optional(on).await?;
        row.map(|r| r.try_get(0)).transpose()
    }

    pub async fn fetch_one<'c>(self, on: impl Into<On<'c>>) -> Result<O, Error> {
        self.query.fetch_one(on).await?.try_get(0)
    }
}

/// Where a statement runs: on a connection of the pool, or on one already held (inside a
/// transaction or savepoint).
pub enum On<'c> {
    Pool(&'c Pool),
    Conn(&'c mut Conn),
}

impl<'c> From<&'c Pool> for On<'c> {
    fn from(p: &'c Pool) -> Self {
        On::Pool(p)
    }
}

impl<'c> From<&'c mut Conn> for On<'c> {
    fn from(c: &'c mut Conn) -> Self {
        On::Conn(c)
    }
}

/// The connections of one database.
#[derive(Clone)]
pub enum Pool {
    Pg(pg::Pool),
    Native(native::Pool),
}

impl Pool {
    /// A connection of its own, for several statements in a row (not a transaction).
    pub async fn acquire(&self) -> Result<Conn, Error> {
        let inner = match self {
            Pool::Pg(p) => Inner::Pg(p.acquire().await?),
            Pool::Native(p) => Inner::Native(p.acquire().await?),
        };
        Ok(Conn::new(inner))
    }

    /// Close its connections: those in use as they come back.
    pub async fn close(&self) {
        match self {
            Pool::Pg(p) => p.close(),
            Pool::Native(p) => p.close(),
        }
    }
}

/// A connection held by its user: outside a transaction, or inside one ([`super::Tx`]).
pub struct Conn {
    inner: Inner,
    /// Savepoints open on it.
    savepoints: u32,
    /// A savepoint was dropped without being released or rolled back: what it did cannot be
    /// told apart any more, so the transaction must not commit.
    torn: bool,
}

pub(super) enum Inner {
    /// Inside a transaction or not ([`pg::Conn::in_transaction`]).
    Pg(pg::Conn),
    Native(native::Conn),
    /// No connection: work whose writes all go into one statement at its end, run on a
    /// connection of its own ([`Conn::detached`]). Any statement before is refused.
    Detached(super::Dialect),
}

impl Conn {
    pub(super) fn new(inner: Inner) -> Self {
        Conn {
            inner,
            savepoints: 0,
            torn: false,
        }
    }

    /// Stands for a connection where no statement may run ([`Error::Detached`]): the work
    /// before a single statement that is its only write, which must not run any of its own
    /// outside the transaction that statement replaces.
    pub fn detached(dialect: Dialect) -> Self {
        Conn::new(Inner::Detached(dialect))
    }

    pub fn dialect(&self) -> Dialect {
        match &self.inner {
            Inner::Native(_) => Dialect::Sqlite,
            Inner::Pg(_) => Dialect::Postgres,
            Inner::Detached(dialect) => *dialect,
        }
    }

    /// Open a savepoint: what runs on it until [`Savepoint::rollback`] can be undone without
    /// undoing the rest of the transaction.
    pub async fn savepoint(&mut self) -> Result<Savepoint<'_>, Error> {
        let depth = self.savepoints + 1;
        self.plain(&format!("SAVEPOINT sp{depth}")).await?;
        self.savepoints = depth;
        Ok(Savepoint {
            conn: self,
            depth,
            open: true,
        })
    }

    /// Commit the transaction it holds.
    pub(super) async fn commit(self) -> Result<(), Error> {
        if self.torn {
            return Err(Error::Torn);
        }
        match self.inner {
            Inner::Pg(mut c) if c.in_transaction() => c.finish("COMMIT").await,
            Inner::Native(mut c) => c.finish("COMMIT").await,
            Inner::Pg(_) | Inner::Detached(_) => Ok(()),
        }
    }

    pub(super) async fn rollback(self) -> Result<(), Error> {
        match self.inner {
            Inner::Pg(mut c) if c.in_transaction() => c.finish("ROLLBACK").await,
            Inner::Native(mut c) => c.finish("ROLLBACK").await,
            Inner::Pg(_) | Inner::Detached(_) => Ok(()),
        }
    }

    /// A statement without parameters or rows, not counted (savepoints).
    async fn plain(&mut self, sql: &str) -> Result<(), Error> {
        Query::new(sql).run(On::Conn(self), Want::Done).await?;
        Ok(())
    }
}

/// A savepoint inside a transaction; derefs to its connection. Dropped without
/// [`Savepoint::commit`] or [`Savepoint::rollback`] (an error on the way), it tears the
/// transaction: its commit then fails.
pub struct Savepoint<'c> {
    conn: &'c mut Conn,
    depth: u32,
    open: bool,
}

impl Savepoint<'_> {
    /// Keep what ran on it, as part of the transaction.
    pub async fn commit(self) -> Result<(), Error> {
        self.close(false).await
    }

    /// Undo what ran on it.
    pub async fn rollback(self) -> Result<(), Error> {
        self.close(true).await
    }

    /// Release it, after rolling back to it if `undo`.
    async fn close(mut self, undo: bool) -> Result<(), Error> {
        self.open = false;
        let depth = self.depth;
        if undo {
            let rollback = format!("ROLLBACK TO SAVEPOINT sp{depth}");
            self.conn.plain(&rollback).await?;
        }
        let release = format!("RELEASE SAVEPOINT sp{depth}");
        self.conn.plain(&release).await?;
        self.conn.savepoints = depth - 1;
        Ok(())
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if self.open {
            self.conn.torn = true;
        }
    }
}

impl std::ops::Deref for Savepoint<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
    }
}

impl std::ops::DerefMut for Savepoint<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn
    }
}
