//! A batch's saga steps' in-commit statements in one: for a forward step, its saga's expiry
//! row (`sagas::step`), the compensation ledger (`ledger::forward`) and its inbox record; for
//! a compensation, the ledger's closing (`ledger::compensate`) and its inbox record
//! (`inbox::record`) — as one PostgreSQL statement with data-modifying `WITH` parts: one round
//! trip for a batch's steps where each took two or three. SQLite, in-process, runs them one by
//! one (it has no such statement, and a statement costs no round trip there).
//!
//! The records are written as applied (compensated) before the fences' answers are known: the
//! caller undoes the statement (its transaction) unless every step [`Stepped::applies`]. The
//! door check has already read the same answers, so that happens only when a firing deadline,
//! a compensation or another instance committed in between.

use super::joint::Joint;
use super::sql::Query;
use super::{Conn, Error};

/// Which kind of saga step ([`Step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Recorded as `applied`; counted on the expiry row if `timed`, in the ledger if `ledger`.
    Forward,
    /// Recorded as `compensated`; closes the saga in the ledger, or finds it closed by an
    /// earlier compensation (then it does not apply). With no forward step before it, its
    /// record says it is a tombstone ([`super::ledger::TOMBSTONE`]).
    Compensation,
}

/// A step of a saga to record ([`record_all`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub kind: Kind,
    pub event_id: String,
    pub saga: String,
    pub event_type: String,
    /// The topic it came from (logical).
    pub topic: String,
    /// The version of the service that handled it.
    pub version: String,
    pub handled_ms: i64,
    /// Counted on the saga's expiry row (a forward step whose event carries a deadline).
    pub timed: bool,
    /// Counted in the ledger (the service keeps one; a compensation always is).
    pub ledger: bool,
}

/// What a step's statement found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stepped {
    /// When the saga expired, if its row says so (forward steps that are timed).
    pub expired_ms: Option<i64>,
    /// The compensation that closed the saga at this service, if another event did.
    pub closed_by: Option<String>,
    /// Whether the inbox took the record (`false`: the event is a duplicate).
    pub recorded: bool,
}

impl Stepped {
    /// Whether the step is applied as recorded: not expired, not closed (by another
    /// compensation), not a duplicate.
    pub fn applies(&self) -> bool {
        self.expired_ms.is_none() && self.closed_by.is_none() && self.recorded
    }
}

/// Steps per statement, at most.
const STEPS: usize = 64;

/// Record saga steps `steps` of `service` at `now_ms`, each as its [`Kind`] says; what each
/// found, in order. Distinct event ids (two copies of one event in one statement would both
/// read as recorded), and a compensation's saga in no other step (one statement cannot write
/// a ledger row twice). PostgreSQL only.
pub async fn record_all(
    conn: &mut Conn,
    service: &str,
    now_ms: i64,
    steps: &[Step],
) -> Result<Vec<Stepped>, Error> {
    let mut found = Vec::with_capacity(steps.len());
    for chunk in steps.chunks(STEPS) {
        let query = bound(super::query(&ALONE), service, now_ms, chunk);
        let mut stepped: Vec<(i64, Stepped)> = query
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(|row| {
                Ok((
                    row.try_get("n")?,
                    Stepped {
                        expired_ms: row.try_get("expired_ms")?,
                        closed_by: row.try_get("closed_by")?,
                        recorded: row.try_get::<i64, _>("recorded")? == 1,
                    },
                ))
            })
            .collect::<Result<_, Error>>()?;
        stepped.sort_by_key(|(n, _)| *n);
        if stepped.len() != chunk.len() {
            return Err(Error::Corrupt(format!(
                "{} saga steps recorded, {} answers",
                chunk.len(),
                stepped.len()
            )));
        }
        found.extend(stepped.into_iter().map(|(_, s)| s));
    }
    Ok(found)
}

/// Join the recording of `steps` (at most [`STEPS`]) to `joint`, as [`record_all`] would
/// record them, with the check that every step applies ([`Stepped::applies`]). `false`: too
/// many for one statement (nothing joined).
pub fn join(joint: &mut Joint, service: &str, now_ms: i64, steps: &[Step]) -> bool {
    if steps.is_empty() || steps.len() > STEPS {
        return steps.is_empty();
    }
    joint.with(bound(Query::new(&JOINED), service, now_ms, steps));
    joint.expect(
        "SELECT COUNT(*) FROM stepped WHERE expired_ms IS NULL AND closed_by IS NULL \
         AND recorded = 1",
        steps.len(),
    );
    true
}

/// `query` with the parameters of [`INPUT`] for `steps` bound: the steps as one JSON
/// parameter, one statement shape for any count.
fn bound<'q>(query: Query<'q>, service: &str, now_ms: i64, steps: &[Step]) -> Query<'q> {
    let rows: Vec<JsonStep<'_>> = steps
        .iter()
        .enumerate()
        .map(|(n, s)| JsonStep {
            n: n as i64,
            event_id: &s.event_id,
            saga: &s.saga,
            event_type: &s.event_type,
            topic: &s.topic,
            version: &s.version,
            handled_ms: s.handled_ms,
            timed: i64::from(s.timed),
            ledger: i64::from(s.ledger),
            compensation: i64::from(s.kind == Kind::Compensation),
        })
        .collect();
    query
        .bind(service)
        .bind(now_ms)
        .bind(super::ledger::TOMBSTONE)
        .bind(super::joint::json(&rows))
}

/// `$1` service, `$2` now, `$3` a tombstone's record detail, `$4` the steps (JSON, each
/// `{n, event_id, saga, event_type, topic, version, handled_ms, timed, ledger, compensation}`).
const INPUT: &str = "step_input AS (SELECT * FROM json_to_recordset(CAST($4 AS json)) AS \
     v(n bigint, event_id text, saga text, event_type text, topic text, version text, \
     handled_ms bigint, timed bigint, ledger bigint, compensation bigint))";

macro_rules! ctes {
    () => {
        concat!(
            ", steps AS (SELECT * FROM step_input), \
             step AS (UPDATE sagas SET steps = sagas.steps + c.steps, ",
            touch!("sagas", "$2"),
            " FROM (SELECT saga, COUNT(*) AS steps FROM steps WHERE timed = 1 GROUP BY saga) AS c \
             WHERE sagas.saga = c.saga RETURNING sagas.saga, sagas.expired_ms), \
             closing AS (INSERT INTO saga_ledger (service, saga, forward_steps, touched_ms) \
             SELECT $1, saga, COUNT(*), $2 FROM steps \
             WHERE ledger = 1 AND compensation = 0 GROUP BY saga \
             ON CONFLICT (service, saga) DO UPDATE SET \
             forward_steps = saga_ledger.forward_steps + excluded.forward_steps, ",
            touch!("saga_ledger", "$2"),
            " RETURNING saga, compensated_by), \
             undoing AS (INSERT INTO saga_ledger \
             (service, saga, forward_steps, compensated_by, compensated_ms, touched_ms) \
             SELECT $1, saga, 0, event_id, $2, $2 FROM steps WHERE compensation = 1 \
             ON CONFLICT (service, saga) DO UPDATE SET \
             compensated_by = COALESCE(saga_ledger.compensated_by, excluded.compensated_by), \
             compensated_ms = COALESCE(saga_ledger.compensated_ms, excluded.compensated_ms), ",
            touch!("saga_ledger", "$2"),
            " RETURNING saga, compensated_by, forward_steps), \
             entry AS (INSERT INTO inbox (service, event_id, saga, event_type, topic, outcome, \
             detail, version, handled_ms) SELECT $1, steps.event_id, steps.saga, event_type, \
             topic, CASE WHEN compensation = 1 THEN 'compensated' ELSE 'applied' END, \
             CASE WHEN undoing.forward_steps = 0 THEN CAST($3 AS TEXT) END, version, handled_ms \
             FROM steps LEFT JOIN undoing ON steps.compensation = 1 AND undoing.saga = steps.saga \
             ON CONFLICT (service, event_id) DO NOTHING RETURNING event_id)"
        )
    };
}

/// What each step found, over the entries of [`CTES`].
const FINAL: &str = "SELECT steps.n, step.expired_ms, \
             CASE WHEN steps.compensation = 1 \
             THEN NULLIF(undoing.compensated_by, steps.event_id) \
             ELSE closing.compensated_by END AS closed_by, \
             CAST(CASE WHEN entry.event_id IS NULL THEN 0 ELSE 1 END AS BIGINT) AS recorded \
             FROM steps \
             LEFT JOIN step ON steps.timed = 1 AND step.saga = steps.saga \
             LEFT JOIN closing ON steps.ledger = 1 AND steps.compensation = 0 \
             AND closing.saga = steps.saga \
             LEFT JOIN undoing ON steps.compensation = 1 AND undoing.saga = steps.saga \
             LEFT JOIN entry ON entry.event_id = steps.event_id";

const CTES: &str = ctes!();

/// [`record_all`]'s statement.
static ALONE: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("WITH {INPUT}{CTES} {FINAL}"));

/// [`join`]'s entries: [`record_all`]'s, what each step found as `stepped`.
static JOINED: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{INPUT}{CTES}, stepped AS ({FINAL})"));

/// A step as [`join`] sends it, one object of its JSON parameter.
#[derive(serde::Serialize)]
struct JsonStep<'s> {
    n: i64,
    event_id: &'s str,
    saga: &'s str,
    event_type: &'s str,
    topic: &'s str,
    version: &'s str,
    handled_ms: i64,
    timed: i64,
    ledger: i64,
    compensation: i64,
}
