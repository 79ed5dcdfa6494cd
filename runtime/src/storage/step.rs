//! A forward step's in-commit statements in one: the saga's expiry row (`sagas::step`), the
//! compensation ledger (`ledger::forward`) and the inbox record (`inbox::record`), as one
//! PostgreSQL statement with data-modifying `WITH` parts — one round trip where there were
//! three. SQLite, in-process, runs them one by one (it has no such statement, and a statement
//! costs no round trip there).
//!
//! The record is written as applied before the fences' answers are known: the caller undoes
//! the statement (its transaction or savepoint) unless [`Stepped::applies`]. The door check
//! has already read the same answers, so that happens only when a firing deadline, a
//! compensation or another instance committed in between.

use super::{inbox, Conn, Error};

/// What a step's statement found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stepped {
    /// When the saga expired, if its row says so.
    pub expired_ms: Option<i64>,
    /// The compensation that closed the saga at this service, if one did.
    pub closed_by: Option<String>,
    /// Whether the inbox took the record (`false`: the event is a duplicate).
    pub recorded: bool,
}

impl Stepped {
    /// Whether the step is applied as recorded: not expired, not closed, not a duplicate.
    pub fn applies(&self) -> bool {
        self.expired_ms.is_none() && self.closed_by.is_none() && self.recorded
    }
}

/// Record forward step `entry` (its outcome as given) of saga `entry.saga`: on the expiry row
/// if `timed` (the event carries a deadline), in the ledger if `ledger` (the service keeps
/// one), in the inbox always. PostgreSQL only.
pub async fn forward(
    conn: &mut Conn,
    entry: &inbox::Entry<'_>,
    timed: bool,
    ledger: bool,
) -> Result<Stepped, Error> {
    let sql = match (timed, ledger) {
        (true, true) => BOTH,
        (true, false) => TIMED,
        (false, true) => LEDGER,
        (false, false) => NEITHER,
    };
    let row = inbox::bind(super::query(sql), entry)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Stepped {
        expired_ms: row.try_get("expired_ms")?,
        closed_by: row.try_get("closed_by")?,
        recorded: row.try_get::<i64, _>("recorded")? == 1,
    })
}

/// The parts, with `$1` service, `$2` event id, `$3` saga, `$9` now (the rest: the record).
macro_rules! step_sql {
    (step: $step:expr, closing: $closing:expr) => {
        concat!(
            "WITH step AS (",
            $step,
            "), closing AS (",
            $closing,
            "), entry AS (\
             INSERT INTO inbox (service, event_id, saga, event_type, topic, outcome, detail, \
             version, handled_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (service, event_id) DO NOTHING RETURNING 1) \
             SELECT (SELECT expired_ms FROM step) AS expired_ms, \
             (SELECT compensated_by FROM closing) AS closed_by, \
             CAST((SELECT COUNT(*) FROM entry) AS BIGINT) AS recorded"
        )
    };
}

macro_rules! step_part {
    () => {
        concat!(
            "UPDATE sagas SET steps = steps + 1, ",
            touch!("sagas", "$9"),
            " WHERE saga = $3 RETURNING expired_ms"
        )
    };
}

macro_rules! closing_part {
    () => {
        concat!(
            "INSERT INTO saga_ledger (service, saga, forward_steps, touched_ms) \
             VALUES ($1, $3, 1, $9) ON CONFLICT (service, saga) DO UPDATE SET \
             forward_steps = saga_ledger.forward_steps + 1, ",
            touch!("saga_ledger", "$9"),
            " RETURNING compensated_by"
        )
    };
}

/// A part that writes nothing: the same columns, no rows.
macro_rules! no_step {
    () => {
        "SELECT CAST(NULL AS BIGINT) AS expired_ms WHERE false"
    };
}

macro_rules! no_closing {
    () => {
        "SELECT CAST(NULL AS TEXT) AS compensated_by WHERE false"
    };
}

const BOTH: &str = step_sql!(step: step_part!(), closing: closing_part!());
const TIMED: &str = step_sql!(step: step_part!(), closing: no_closing!());
const LEDGER: &str = step_sql!(step: no_step!(), closing: closing_part!());
const NEITHER: &str = step_sql!(step: no_step!(), closing: no_closing!());
