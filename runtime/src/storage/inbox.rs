//! The inbox: which events each service has finished with, and how. A row is written in the
//! same transaction as the event's effects; its primary key (service, event id) is what makes a
//! redelivered event a no-op.

use super::{Conn, Db, Error};

/// How a service finished with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler's effects were committed.
    Applied,
    /// A compensation: the handler's effects were committed and closed the saga here.
    Compensated,
    /// Not applied: the saga was already compensated at this service (see `ledger`).
    Ignored,
    /// The handler kept failing (or rejected the event); it went to `<topic>.dlt`.
    DeadLettered,
    /// A forward event of a saga whose deadline had passed: not applied.
    Expired,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Compensated => "compensated",
            Outcome::Ignored => "ignored",
            Outcome::DeadLettered => "dead-lettered",
            Outcome::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub service: &'a str,
    pub event_id: &'a str,
    pub saga: &'a str,
    pub event_type: &'a str,
    pub topic: &'a str,
    pub outcome: Outcome,
    pub detail: Option<&'a str>,
    /// Version of the handler that handled it.
    pub version: &'a str,
    pub handled_ms: i64,
}

/// Record that `entry.service` has handled `entry.event_id`. Returns `false` if it already had:
/// the caller must then discard the effects, the event is a duplicate.
///
/// A re-driven event (`redrive`) replaces an earlier `dead-lettered` record of the same id, and
/// only that: once a re-drive is applied, a second re-drive of it is a duplicate too.
pub async fn record(conn: &mut Conn, entry: &Entry<'_>, redrive: bool) -> Result<bool, Error> {
    let on_conflict = if redrive {
        "DO UPDATE SET outcome = excluded.outcome, detail = excluded.detail, \
         version = excluded.version, handled_ms = excluded.handled_ms \
         WHERE inbox.outcome = 'dead-lettered'"
    } else {
        "DO NOTHING"
    };
    let sql = format!(
        "INSERT INTO inbox (service, event_id, saga, event_type, topic, outcome, detail, version, handled_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (service, event_id) {on_conflict}",
    );
    let inserted = bind(super::query(&sql), entry)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(inserted == 1)
}

/// `entry` bound as `$1`…`$9`, in the order of the inbox's columns `service, event_id, saga,
/// event_type, topic, outcome, detail, version, handled_ms`.
pub(super) fn bind<'q>(query: super::Query<'q>, entry: &Entry<'_>) -> super::Query<'q> {
    query
        .bind(entry.service)
        .bind(entry.event_id)
        .bind(entry.saga)
        .bind(entry.event_type)
        .bind(entry.topic)
        .bind(entry.outcome.as_str())
        .bind(entry.detail)
        .bind(entry.version)
        .bind(entry.handled_ms)
}

/// Dead-lettered events not re-driven since, per (logical) topic.
pub async fn dead_letters(db: &Db) -> Result<Vec<(String, i64)>, Error> {
    let rows = super::query(
        "SELECT topic, COUNT(*) AS n FROM inbox WHERE outcome = $1 GROUP BY topic ORDER BY topic",
    )
    .bind(Outcome::DeadLettered.as_str())
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("topic")?, row.try_get("n")?)))
        .collect()
}

/// The outcome recorded for one event, if any.
pub async fn outcome(
    db: &Db,
    service: &str,
    event_id: &str,
) -> Result<Option<(String, Option<String>)>, Error> {
    let row =
        super::query("SELECT outcome, detail FROM inbox WHERE service = $1 AND event_id = $2")
            .bind(service)
            .bind(event_id)
            .fetch_optional(db.pool())
            .await?;
    row.map(|row| Ok((row.try_get("outcome")?, row.try_get("detail")?)))
        .transpose()
}

/// What the timeline shows besides final outcomes (migration 0008): a handler attempt that
/// failed, or a delivery found to be a duplicate. Counted per service, event and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Failed,
    Duplicate,
}

impl Attempt {
    pub fn as_str(self) -> &'static str {
        match self {
            Attempt::Failed => "failed",
            Attempt::Duplicate => "duplicate",
        }
    }
}

/// Count one more `kind` for `entry`'s event (its outcome field is ignored); `detail` is the
/// last reason.
pub async fn note(conn: &mut Conn, entry: &Entry<'_>, kind: Attempt) -> Result<(), Error> {
    super::query(
        "INSERT INTO saga_attempts (service, event_id, outcome, saga, event_type, topic, version,          times, last_ms, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $9)          ON CONFLICT (service, event_id, outcome) DO UPDATE SET times = saga_attempts.times + 1,          last_ms = excluded.last_ms, version = excluded.version, detail = excluded.detail",
    )
    .bind(entry.service)
    .bind(entry.event_id)
    .bind(kind.as_str())
    .bind(entry.saga)
    .bind(entry.event_type)
    .bind(entry.topic)
    .bind(entry.version)
    .bind(entry.handled_ms)
    .bind(entry.detail)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A saga as the recent-sagas listing shows it: what the inboxes recorded of it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SagaSummary {
    pub saga: String,
    pub first_ms: i64,
    pub last_ms: i64,
    pub events: i64,
    /// `compensated` (a compensation was applied), `failed` (an event was dead-lettered and
    /// nothing compensated), `expired` (a step arrived after the deadline) or `ok`.
    pub status: String,
}

/// Which sagas [`recent`] lists.
#[derive(Debug, Clone, Default)]
pub struct SagaFilter<'a> {
    /// Only those one of whose events this service handled.
    pub service: Option<&'a str>,
    /// Only those with this status (see [`SagaSummary::status`]).
    pub status: Option<&'a str>,
    /// Only those with an event handled at or after this time.
    pub since_ms: i64,
    pub limit: u32,
}

/// The statuses [`recent`] knows, for checking a filter.
pub const SAGA_STATUSES: [&str; 4] = ["ok", "compensated", "failed", "expired"];

/// The sagas whose events were handled most recently, newest first.
pub async fn recent(db: &Db, filter: &SagaFilter<'_>) -> Result<Vec<SagaSummary>, Error> {
    let compensated = "SUM(CASE WHEN outcome = 'compensated' THEN 1 ELSE 0 END)";
    let dead = "SUM(CASE WHEN outcome = 'dead-lettered' THEN 1 ELSE 0 END)";
    let expired = "SUM(CASE WHEN outcome = 'expired' THEN 1 ELSE 0 END)";
    let having = match filter.status {
        Some("compensated") => format!("HAVING {compensated} > 0"),
        Some("failed") => format!("HAVING {compensated} = 0 AND {dead} > 0"),
        Some("expired") => format!("HAVING {compensated} = 0 AND {dead} = 0 AND {expired} > 0"),
        Some(_) => format!("HAVING {compensated} = 0 AND {dead} = 0 AND {expired} = 0"),
        None => String::new(),
    };
    let by_service = if filter.service.is_some() {
        "AND saga IN (SELECT saga FROM inbox WHERE service = $3 AND handled_ms >= $1)"
    } else {
        ""
    };
    let sql = format!(
        "SELECT saga, MIN(handled_ms) AS first_ms, MAX(handled_ms) AS last_ms, \
         COUNT(*) AS events, {compensated} AS compensated, {dead} AS dead, \
         {expired} AS expired FROM inbox WHERE saga <> '' AND handled_ms >= $1 {by_service} \
         GROUP BY saga {having} ORDER BY last_ms DESC LIMIT $2"
    );
    let mut query = super::query(&sql)
        .bind(filter.since_ms)
        .bind(filter.limit as i64);
    if let Some(service) = filter.service {
        query = query.bind(service);
    }
    let rows = query.fetch_all(db.pool()).await?;
    rows.iter()
        .map(|row| {
            let count = |name: &str| row.try_get::<i64, _>(name);
            let status = if count("compensated")? > 0 {
                "compensated"
            } else if count("dead")? > 0 {
                "failed"
            } else if count("expired")? > 0 {
                "expired"
            } else {
                "ok"
            };
            Ok(SagaSummary {
                saga: row.try_get("saga")?,
                first_ms: row.try_get("first_ms")?,
                last_ms: row.try_get("last_ms")?,
                events: count("events")?,
                status: status.to_string(),
            })
        })
        .collect()
}

/// One handled event of a saga, for its timeline.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Handled {
    pub handled_ms: i64,
    pub service: String,
    pub version: String,
    pub event_id: String,
    pub event_type: String,
    pub topic: String,
    pub outcome: String,
    pub detail: Option<String>,
    /// For `failed` and `duplicate`: how often (the time is the last one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub times: Option<i64>,
}

/// Every event of `saga` any service handled, in the order they were handled, with the failed
/// attempts and duplicate deliveries.
pub async fn for_saga(db: &Db, saga: &str) -> Result<Vec<Handled>, Error> {
    let rows = super::query(
        "SELECT handled_ms, service, version, event_id, event_type, topic, outcome, detail, \
         NULL AS times FROM inbox WHERE saga = $1 \
         UNION ALL SELECT last_ms, service, version, event_id, event_type, topic, outcome, \
         detail, times FROM saga_attempts WHERE saga = $2 \
         ORDER BY 1, 2, 4",
    )
    .bind(saga)
    .bind(saga)
    .fetch_all(db.pool())
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(Handled {
                times: row.try_get("times")?,
                handled_ms: row.try_get("handled_ms")?,
                service: row.try_get("service")?,
                version: row.try_get("version")?,
                event_id: row.try_get("event_id")?,
                event_type: row.try_get("event_type")?,
                topic: row.try_get("topic")?,
                outcome: row.try_get("outcome")?,
                detail: row.try_get("detail")?,
            })
        })
        .collect()
}
