//! The door check's reads of one batch, in one statement (on PostgreSQL each is a round trip):
//! which events the service handled before (`inbox`), which
//! sagas it closed by a compensation (`saga_ledger`), which have a step held (`held_steps`),
//! and what the sagas' expiry is (`sagas`, `deadlines`); and the state keys the batch's
//! handlers are expected to read (`state`, the worker's read-ahead). A part whose list is
//! empty is left out. The authoritative checks are the writes in the commit (`inbox::record`,
//! `ledger::forward`, `sagas::step`); this lets the worker skip or refuse before a guest call.

use std::collections::HashMap;
use std::sync::Arc;

use super::{json_probes, keyed, Conn, Dialect, Error, Keys};
use crate::wasm::Versioned;

/// What to look up for one service at `now_ms`.
#[derive(Debug, Default)]
pub struct Ask<'a> {
    pub service: &'a str,
    pub now_ms: i64,
    /// Inbox ids of the batch's events.
    pub events: &'a [&'a str],
    /// Sagas whose closing compensation at this service matters.
    pub ledger: &'a [&'a str],
    /// Sagas of the batch's compensations: is a step of theirs held (on any instance)?
    pub held: &'a [&'a str],
    /// Sagas of forward events that carry a deadline: their expiry.
    pub timed: &'a [&'a str],
    /// State keys of the service to read ahead (distinct).
    pub state: &'a [&'a str],
}

/// The answers, per part.
#[derive(Debug, Default)]
pub struct Found {
    /// Events handled before, with the outcome recorded.
    pub seen: HashMap<String, String>,
    /// Sagas closed here, and by which compensation.
    pub closed: HashMap<String, String>,
    /// Sagas with a step held, and until when.
    pub held: HashMap<String, i64>,
    /// Of the timed sagas, `Some(at)` for those expired at `now_ms` (a firing marked them, or
    /// one of their pending deadlines is due, since `at`) and `None` for those whose deadlines
    /// are cancelled or moved later. A saga without a row (no deadline was ever set for it
    /// here) is absent: the caller falls back to the deadline its event carries.
    pub expiry: HashMap<String, Option<i64>>,
    /// The state keys read ahead, as a state read finds them (a key never written: no value,
    /// version 0).
    pub state: Arc<HashMap<String, Versioned>>,
}

/// One statement: the parts of `ask` with a non-empty list, as `(kind, key, text, num, bytes)`
/// rows.
pub async fn read(conn: &mut Conn, ask: &Ask<'_>) -> Result<Found, Error> {
    let mut found = Found::default();
    let Some((sql, binds)) = statement(conn.dialect(), ask) else {
        return Ok(found);
    };
    let mut query = super::query(&sql);
    for bind in binds.0 {
        query = match bind {
            Bind::Text(t) => query.bind(t),
            Bind::Int(n) => query.bind(n),
            Bind::Json(j) => query.bind(j),
        };
    }
    let mut state: HashMap<String, Versioned> = ask
        .state
        .iter()
        .map(|k| (k.to_string(), Versioned::never_written()))
        .collect();
    for row in query.fetch_all(&mut *conn).await? {
        let kind: String = row.try_get(0)?;
        let key: String = row.try_get(1)?;
        let text: Option<String> = row.try_get(2)?;
        let num: Option<i64> = row.try_get(3)?;
        match kind.as_str() {
            "state" => {
                let value: Option<Vec<u8>> = row.try_get(4)?;
                let version = num.unwrap_or(0);
                state.insert(key, Versioned { value, version });
            }
            "seen" => {
                found.seen.insert(key, text.unwrap_or_default());
            }
            "closed" => {
                found.closed.insert(key, text.unwrap_or_default());
            }
            "held" => {
                if let Some(until) = num {
                    found.held.insert(key, until);
                }
            }
            _ => {
                let at = found.expiry.entry(key).or_insert(None);
                if let Some(t) = num {
                    *at = Some(at.map_or(t, |a| a.min(t)));
                }
            }
        }
    }
    found.state = Arc::new(state);
    Ok(found)
}

/// The statement of `ask` and its values; `None` if every list is empty.
fn statement<'a>(dialect: Dialect, ask: &Ask<'a>) -> Option<(String, Binds<'a>)> {
    let mut parts: Vec<String> = Vec::new();
    let mut binds = Binds::default();
    if !ask.events.is_empty() {
        let service = binds.one(Bind::Text(ask.service));
        let ids = binds.keys(dialect, ask.events);
        let found = keyed(
            ("inbox", "event_id, outcome"),
            (&service, "event_id"),
            ids,
            "",
        );
        parts.push(format!(
            "SELECT 'seen' AS kind, found.event_id AS key, found.outcome AS text, \
             CAST(NULL AS BIGINT) AS num, CAST(NULL AS BYTEA) AS bytes FROM {found}"
        ));
    }
    if !ask.ledger.is_empty() {
        let service = binds.one(Bind::Text(ask.service));
        let sagas = binds.keys(dialect, ask.ledger);
        let table = ("saga_ledger", "saga, compensated_by");
        let filter = "AND compensated_by IS NOT NULL";
        let found = keyed(table, (&service, "saga"), sagas, filter);
        parts.push(format!(
            "SELECT 'closed', found.saga, found.compensated_by, CAST(NULL AS BIGINT), \
             CAST(NULL AS BYTEA) FROM {found}"
        ));
    }
    if !ask.held.is_empty() {
        let service = binds.one(Bind::Text(ask.service));
        let now = binds.one(Bind::Int(ask.now_ms));
        let sagas = binds.keys(dialect, ask.held);
        let table = ("held_steps", "saga, until_ms");
        let filter = format!("AND until_ms > {now}");
        let found = keyed(table, (&service, "saga"), sagas, &filter);
        parts.push(format!(
            "SELECT 'held', found.saga, CAST(NULL AS TEXT), found.until_ms, \
             CAST(NULL AS BYTEA) FROM {found}"
        ));
    }
    if !ask.timed.is_empty() {
        let now = binds.one(Bind::Int(ask.now_ms));
        // Each saga looked up on its own (`super::probes`) on PostgreSQL.
        let (expired, due) = match binds.keys(dialect, ask.timed) {
            Keys::Json(sagas) => {
                let probes = json_probes(&sagas);
                (
                    format!(
                        "{probes}, LATERAL (SELECT saga, expired_ms FROM sagas \
                         WHERE saga = probe.v OFFSET 0) AS found"
                    ),
                    format!(
                        "{probes}, LATERAL (SELECT saga, due_ms FROM deadlines \
                         WHERE saga = probe.v AND status = 'PENDING' AND due_ms <= {now} \
                         OFFSET 0) AS found"
                    ),
                )
            }
            Keys::JsonEach(sagas) => {
                let sagas = super::json_each(&sagas);
                (
                    format!(
                        "(SELECT saga, expired_ms FROM sagas WHERE saga IN ({sagas})) AS found"
                    ),
                    format!(
                        "(SELECT saga, due_ms FROM deadlines WHERE status = 'PENDING' \
                         AND due_ms <= {now} AND saga IN ({sagas})) AS found"
                    ),
                )
            }
        };
        parts.push(format!(
            "SELECT 'expired', found.saga, CAST(NULL AS TEXT), found.expired_ms, \
             CAST(NULL AS BYTEA) FROM {expired}"
        ));
        parts.push(format!(
            "SELECT 'due', found.saga, CAST(NULL AS TEXT), MIN(found.due_ms), \
             CAST(NULL AS BYTEA) FROM {due} GROUP BY found.saga"
        ));
    }
    if !ask.state.is_empty() {
        let service = binds.one(Bind::Text(ask.service));
        let state = binds.keys(dialect, ask.state);
        let table = ("state", "key, value, version");
        let found = keyed(table, (&service, "key"), state, "");
        parts.push(format!(
            "SELECT 'state', found.key, CAST(NULL AS TEXT), found.version, found.value \
             FROM {found}"
        ));
    }
    if parts.is_empty() {
        return None;
    }
    Some((parts.join(" UNION ALL "), binds))
}

/// A value bound to the statement.
enum Bind<'a> {
    Text(&'a str),
    Int(i64),
    /// A list, as a JSON array.
    Json(String),
}

/// The values bound to the statement, in the order of their `$n`.
#[derive(Default)]
struct Binds<'a>(Vec<Bind<'a>>);

impl<'a> Binds<'a> {
    /// Bind `value`; its placeholder.
    fn one(&mut self, value: Bind<'a>) -> String {
        self.0.push(value);
        format!("${}", self.0.len())
    }

    /// Bind `keys` as a lookup takes them: as one JSON parameter, so that the statement has
    /// one shape per combination of parts whatever their counts.
    fn keys(&mut self, dialect: Dialect, keys: &[&'a str]) -> Keys {
        let param = self.one(Bind::Json(super::joint::json(keys)));
        match dialect {
            Dialect::Postgres => Keys::Json(param),
            Dialect::Sqlite => Keys::JsonEach(param),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One statement shape per combination of parts, whatever their counts: each shape is
    /// prepared once per connection. (On SQLite each key had a placeholder of its own, and the
    /// shapes of a busy service's batches outgrew the connection's statement cache.)
    #[test]
    fn the_statement_is_the_same_for_any_number_of_keys() {
        let ask = |keys: &'static [&'static str]| Ask {
            service: "svc",
            now_ms: 5,
            events: keys,
            ledger: keys,
            held: keys,
            timed: keys,
            state: keys,
        };
        for dialect in [Dialect::Sqlite, Dialect::Postgres] {
            let (small, _) = statement(dialect, &ask(&["a"])).unwrap();
            let (large, binds) = statement(dialect, &ask(&["a", "b", "c"])).unwrap();
            assert_eq!(small, large, "{dialect:?}");
            assert_eq!(
                binds.0.len(),
                11,
                "{dialect:?}: a list per part, its service and time"
            );
        }
        assert!(statement(Dialect::Sqlite, &Ask::default()).is_none());
    }
}
