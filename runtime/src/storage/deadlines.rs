//! Deadlines set and cancelled by handlers, stored in the same transaction as their other
//! effects.

use super::joint::{Answer, Joint};
use super::sql::Query;
use super::{Conn, Error};

/// Cancel pending deadlines (`$1`, [`cancels_json`]), answering when each one's saga was
/// opened (`opened_ms`): each row found through the primary key on its own (`super::probes`),
/// then updated where it was found, if still pending.
macro_rules! cancel {
    () => {
        "UPDATE deadlines SET status = 'CANCELLED' FROM (SELECT found.at \
         FROM json_to_recordset(CAST($1 AS json)) AS v(service text, saga text, name text), \
         LATERAL (SELECT ctid AS at FROM deadlines \
         WHERE service = v.service AND saga = v.saga AND name = v.name \
         AND status = 'PENDING' OFFSET 0) AS found) AS v \
         WHERE deadlines.ctid = v.at AND deadlines.status = 'PENDING' \
         RETURNING (SELECT opened_ms FROM sagas WHERE sagas.saga = deadlines.saga) AS opened_ms"
    };
}

/// The deadline's row, `$1`–`$6`.
macro_rules! deadline_row {
    () => {
        "INSERT INTO deadlines (service, saga, name, due_ms, status, set_by, traceparent) \
         VALUES ($1, $2, $3, $4, 'PENDING', $5, $6) \
         ON CONFLICT (service, saga, name) DO UPDATE SET due_ms = excluded.due_ms, \
         status = 'PENDING', set_by = excluded.set_by, traceparent = excluded.traceparent"
    };
}

/// A deadline a handler sets: pending, replacing one of the same name of the saga.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub service: String,
    pub saga: String,
    pub name: String,
    pub due_ms: i64,
    /// The event or request whose handler set it.
    pub set_by: String,
    pub traceparent: Option<String>,
}

impl Set {
    /// `query` with this deadline's six columns bound next: service, saga, name, due time,
    /// set by, trace context.
    fn bound<'q>(&self, query: super::Query<'q>) -> super::Query<'q> {
        query
            .bind(self.service.as_str())
            .bind(self.saga.as_str())
            .bind(self.name.as_str())
            .bind(self.due_ms)
            .bind(self.set_by.as_str())
            .bind(self.traceparent.as_deref())
    }
}

/// Store deadline `d`, and make sure its saga has an expiry row (`sagas::open`, opened at
/// `now_ms` if it is new): one statement on PostgreSQL (each is a round trip there, and a
/// request that starts a saga made six), two on SQLite.
pub async fn set(conn: &mut Conn, d: &Set, now_ms: i64) -> Result<(), Error> {
    let sql = match conn.dialect() {
        super::Dialect::Postgres => concat!(
            "WITH opened AS (INSERT INTO sagas (saga, expired_ms, steps, touched_ms, opened_ms) \
             VALUES ($2, NULL, 0, $7, $7) ON CONFLICT (saga) DO UPDATE SET ",
            touch!("sagas", "$7"),
            ") ",
            deadline_row!()
        ),
        super::Dialect::Sqlite => {
            super::sagas::open(conn, &d.saga, now_ms).await?;
            deadline_row!()
        }
    };
    let query = d.bound(super::query(sql));
    let query = match conn.dialect() {
        super::Dialect::Postgres => query.bind(now_ms), // `$7`: the saga's row
        super::Dialect::Sqlite => query,
    };
    query.execute(&mut *conn).await?;
    Ok(())
}

/// Deadlines per statement, at most ([`set_all`]).
const SET_ROWS: usize = 64;

/// Store deadlines `all` as [`set`] does each, the last of any two of the same name of a saga
/// winning: one statement per [`SET_ROWS`] on PostgreSQL (a group of commands' deadlines, see
/// `crate::commands`), one by one on SQLite.
pub async fn set_all(conn: &mut Conn, all: &[Set], now_ms: i64) -> Result<(), Error> {
    if conn.dialect() == super::Dialect::Sqlite {
        for d in all {
            set(conn, d, now_ms).await?;
        }
        return Ok(());
    }
    // The last of each name of a saga: one statement may not update a row twice.
    let mut last: std::collections::HashMap<(&str, &str, &str), &Set> = Default::default();
    let mut order = Vec::new();
    for d in all {
        let key = (d.service.as_str(), d.saga.as_str(), d.name.as_str());
        if last.insert(key, d).is_none() {
            order.push(key);
        }
    }
    let rows: Vec<&Set> = order.into_iter().map(|k| last[&k]).collect();
    set_distinct(conn, &rows, now_ms).await
}

/// [`set_all`] on PostgreSQL for deadlines of which no two share a name of a saga.
async fn set_distinct(conn: &mut Conn, rows: &[&Set], now_ms: i64) -> Result<(), Error> {
    for chunk in rows.chunks(SET_ROWS) {
        let query = super::query(&SETS).bind(now_ms).bind(sets_json(chunk));
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// The deadlines of [`set_all`]'s statement: `$2`, [`sets_json`] (`DISTINCT`: no two alike).
const SET_INPUT: &str = "set_input AS (SELECT DISTINCT * FROM json_to_recordset(CAST($2 AS json)) \
     AS v(service text, saga text, name text, due_ms bigint, set_by text, traceparent text))";

/// Each saga of `set_input` gets its expiry row (`sagas::open`), opened at `$1` if new.
const SET_OPENED: &str = concat!(
    "set_opened AS (INSERT INTO sagas (saga, expired_ms, steps, touched_ms, opened_ms) \
     SELECT DISTINCT saga, CAST(NULL AS BIGINT), 0, $1, $1 FROM set_input \
     ON CONFLICT (saga) DO UPDATE SET ",
    touch!("sagas", "$1"),
    ")"
);

/// [`set_all`]'s statement: one shape for any count.
static SETS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("WITH {SET_INPUT}, {SET_OPENED} {SET_INSERT}"));

/// [`SETS`] as [`join_all`]'s entries.
static JOINED_SETS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("{SET_INPUT}, {SET_OPENED}, deadlines_set AS ({SET_INSERT})")
});

/// [`cancel!`] as [`join_all`]'s entry.
const JOINED_CANCELS: &str = concat!("deadlines_cancelled AS (", cancel!(), ")");

/// A deadline as [`join_all`] sends it, one object of a JSON parameter.
#[derive(serde::Serialize)]
struct JsonDeadline<'d> {
    service: &'d str,
    saga: &'d str,
    name: &'d str,
    due_ms: Option<i64>,
    set_by: Option<&'d str>,
    traceparent: Option<&'d str>,
}

/// [`set_all`]'s deadlines, over [`SET_INPUT`].
const SET_INSERT: &str = "INSERT INTO deadlines (service, saga, name, due_ms, status, set_by, \
     traceparent) SELECT service, saga, name, due_ms, 'PENDING', set_by, traceparent \
     FROM set_input ON CONFLICT (service, saga, name) DO UPDATE SET \
     due_ms = excluded.due_ms, status = 'PENDING', set_by = excluded.set_by, \
     traceparent = excluded.traceparent";

/// What a handler's effects do to a deadline, left to the end of its transaction
/// ([`apply_all`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Set(Set),
    Cancel {
        service: String,
        saga: String,
        name: String,
    },
}

impl Op {
    fn key(&self) -> (&str, &str, &str) {
        match self {
            Op::Set(d) => (&d.service, &d.saga, &d.name),
            Op::Cancel {
                service,
                saga,
                name,
            } => (service, saga, name),
        }
    }
}

/// Carry out `ops` (in the order the handlers asked for them) with what they leave: per
/// deadline, the last set (if any) and then a cancel if one came after it — a cancel followed
/// by a set leaves only the set. When each cancelled saga was opened (for the sagas it
/// settled), as [`cancel`] answers. On PostgreSQL one statement for the sets ([`set_all`]) and
/// one for the cancels, per 64; on SQLite each in turn.
pub async fn apply_all(conn: &mut Conn, ops: &[Op], now_ms: i64) -> Result<Vec<i64>, Error> {
    let mut opened = Vec::new();
    if conn.dialect() == super::Dialect::Sqlite {
        for op in ops {
            match op {
                Op::Set(d) => set(conn, d, now_ms).await?,
                Op::Cancel {
                    service,
                    saga,
                    name,
                } => {
                    if let Some(at) = cancel(conn, service, saga, name).await? {
                        opened.extend(at);
                    }
                }
            }
        }
        return Ok(opened);
    }
    let (sets, cancels) = collapse(ops);
    set_distinct(conn, &sets, now_ms).await?;
    for chunk in cancels.chunks(SET_ROWS) {
        let query = super::query(cancel!()).bind(cancels_json(chunk));
        for row in query.fetch_all(&mut *conn).await? {
            opened.extend(row.try_get::<Option<i64>, _>("opened_ms")?);
        }
    }
    Ok(opened)
}

/// Join what [`apply_all`] does on PostgreSQL to `joint` (`set_input`, `set_opened`,
/// `deadlines_set`, `deadlines_cancelled`), with an answer that yields when each cancelled
/// saga was opened. `None` (nothing joined): too many for one statement, a deadline both set
/// and cancelled, or one set for a saga whose expiry row `busy` says another part of the
/// joint writes (the parts of a joint must not write one row twice).
pub fn join_all(
    joint: &mut Joint,
    ops: &[Op],
    now_ms: i64,
    busy: impl Fn(&str) -> bool,
) -> Option<Answer> {
    let (sets, cancels) = collapse(ops);
    let crossed = || {
        let set: std::collections::HashSet<_> = sets
            .iter()
            .map(|d| (&*d.service, &*d.saga, &*d.name))
            .collect();
        cancels.iter().any(|k| set.contains(k))
    };
    if sets.len() > SET_ROWS
        || cancels.len() > SET_ROWS
        || sets.iter().any(|d| busy(&d.saga))
        || crossed()
    {
        return None;
    }
    if !sets.is_empty() {
        let query = Query::new(&JOINED_SETS).bind(now_ms);
        joint.with(query.bind(sets_json(&sets)));
    }
    if cancels.is_empty() {
        return Some(joint.answer("SELECT CAST(NULL AS BIGINT) WHERE FALSE"));
    }
    joint.with(Query::new(JOINED_CANCELS).bind(cancels_json(&cancels)));
    Some(joint.answer("SELECT opened_ms FROM deadlines_cancelled"))
}

/// What `ops` leave per deadline, in the order first named: the sets (the last of each), and
/// the deadlines cancelled after their last set.
fn collapse(ops: &[Op]) -> (Vec<&Set>, Vec<(&str, &str, &str)>) {
    // Per deadline: its last set, and whether a cancel came after it.
    let mut last: std::collections::HashMap<(&str, &str, &str), (Option<&Set>, bool)> =
        Default::default();
    let mut order = Vec::new();
    for op in ops {
        let entry = last.entry(op.key()).or_insert_with(|| {
            order.push(op.key());
            (None, false)
        });
        *entry = match op {
            Op::Set(d) => (Some(d), false),
            Op::Cancel { .. } => (entry.0, true),
        };
    }
    let sets = order.iter().filter_map(|k| last[k].0).collect();
    let cancels = order.into_iter().filter(|k| last[k].1).collect();
    (sets, cancels)
}

/// Deadlines to set as one JSON parameter ([`SET_INPUT`]): one statement shape for any count.
fn sets_json(rows: &[&Set]) -> String {
    let rows: Vec<JsonDeadline<'_>> = rows
        .iter()
        .map(|d| JsonDeadline {
            service: &d.service,
            saga: &d.saga,
            name: &d.name,
            due_ms: Some(d.due_ms),
            set_by: Some(&d.set_by),
            traceparent: d.traceparent.as_deref(),
        })
        .collect();
    super::joint::json(&rows)
}

/// Deadlines to cancel as one JSON parameter ([`cancel!`]).
fn cancels_json(rows: &[(&str, &str, &str)]) -> String {
    let rows: Vec<JsonDeadline<'_>> = rows
        .iter()
        .map(|&(service, saga, name)| JsonDeadline {
            service,
            saga,
            name,
            due_ms: None,
            set_by: None,
            traceparent: None,
        })
        .collect();
    super::joint::json(&rows)
}

/// Cancel a pending deadline: `None` if there was none pending, else when its saga was opened
/// (if the database knows).
pub async fn cancel(
    conn: &mut Conn,
    service: &str,
    saga: &str,
    name: &str,
) -> Result<Option<Option<i64>>, Error> {
    // When the saga was opened comes back in the same statement (the settled-saga metric).
    let cancelled: Option<Option<i64>> = super::query_scalar(
        "UPDATE deadlines SET status = 'CANCELLED' \
         WHERE service = $1 AND saga = $2 AND name = $3 AND status = 'PENDING' \
         RETURNING (SELECT opened_ms FROM sagas WHERE sagas.saga = deadlines.saga)",
    )
    .bind(service)
    .bind(saga)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(cancelled)
}

/// A stored deadline.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deadline {
    pub service: String,
    pub saga: String,
    pub name: String,
    pub due_ms: i64,
    /// `PENDING`, `CANCELLED` or `FIRED`.
    pub status: String,
    /// The event or request whose handler set it.
    pub set_by: String,
    /// The W3C trace context of the span that set it: the fired event continues that trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

fn from_row(row: &super::Row) -> Result<Deadline, Error> {
    Ok(Deadline {
        service: row.try_get("service")?,
        saga: row.try_get("saga")?,
        name: row.try_get("name")?,
        due_ms: row.try_get("due_ms")?,
        status: row.try_get("status")?,
        set_by: row.try_get("set_by")?,
        traceparent: row.try_get("traceparent")?,
    })
}

const COLUMNS: &str = "service, saga, name, due_ms, status, set_by, traceparent";

/// When the earliest pending deadline falls due, if any.
pub async fn next_due(db: &super::Db) -> Result<Option<i64>, Error> {
    super::query_scalar("SELECT MIN(due_ms) FROM deadlines WHERE status = 'PENDING'")
        .fetch_one(db.pool())
        .await
}

/// Pending deadlines due at `now_ms`, earliest first.
pub async fn due(db: &super::Db, now_ms: i64, limit: u32) -> Result<Vec<Deadline>, Error> {
    let rows = super::query(&format!(
        "SELECT {COLUMNS} FROM deadlines WHERE status = 'PENDING' AND due_ms <= $1 \
         ORDER BY due_ms LIMIT $2"
    ))
    .bind(now_ms)
    .bind(limit as i64)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Mark a due deadline fired. Exactly one caller wins, across instances: the others see
/// `false` (it was fired, cancelled or moved meanwhile).
pub async fn claim(conn: &mut Conn, d: &Deadline) -> Result<bool, Error> {
    let affected = super::query(
        "UPDATE deadlines SET status = 'FIRED' \
         WHERE service = $1 AND saga = $2 AND name = $3 AND status = 'PENDING' AND due_ms = $4",
    )
    .bind(&d.service)
    .bind(&d.saga)
    .bind(&d.name)
    .bind(d.due_ms)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(affected == 1)
}

/// The first `limit` deadlines, earliest first.
pub async fn list(db: &super::Db, limit: u32) -> Result<Vec<Deadline>, Error> {
    page(db, None, None, limit).await
}

/// Where a page of deadlines starts: after this one, in (due, service, saga, name) order.
pub type Cursor = (i64, String, String, String);

/// A page of deadlines in (due, service, saga, name) order, after `after`, at most `limit`,
/// only those with `status` if given (for `GET /deadlines`).
pub async fn page(
    db: &super::Db,
    status: Option<&str>,
    after: Option<&Cursor>,
    limit: u32,
) -> Result<Vec<Deadline>, Error> {
    let mut conditions = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        format!("${n}")
    };
    if status.is_some() {
        conditions.push(format!("status = {}", next()));
    }
    if after.is_some() {
        let (a, b, c, d) = (next(), next(), next(), next());
        conditions.push(format!(
            "(due_ms, service, saga, name) > ({a}, {b}, {c}, {d})"
        ));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM deadlines {filter} \
         ORDER BY due_ms, service, saga, name LIMIT {}",
        next()
    );
    let mut query = super::query(&sql);
    if let Some(status) = status {
        query = query.bind(status);
    }
    if let Some((due, service, saga, name)) = after {
        query = query.bind(*due).bind(service).bind(saga).bind(name);
    }
    let rows = query.bind(limit as i64).fetch_all(db.pool()).await?;
    rows.iter().map(from_row).collect()
}

/// The deadlines of one saga.
pub async fn for_saga(db: &super::Db, saga: &str) -> Result<Vec<Deadline>, Error> {
    let rows = super::query(&format!(
        "SELECT {COLUMNS} FROM deadlines WHERE saga = $1 ORDER BY due_ms"
    ))
    .bind(saga)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}
