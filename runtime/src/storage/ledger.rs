//! The compensation ledger (SPEC B2, B4): per service and saga, the forward steps applied and
//! the compensation that closed them.
//!
//! Rules, enforced by the worker for every event with a saga (its CloudEvents `subject`):
//! - the first compensation of a saga at a service is applied and closes the service's part in
//!   that saga; if no forward step came before it, the row is a *tombstone*;
//! - a later compensation of the same saga (a distinct event, e.g. emitted twice) is not
//!   applied: compensation is applied once, however often it is delivered;
//! - a forward step of a closed saga is not applied: a step that arrives after its compensation
//!   cannot resurrect what was compensated.
//!
//! Like the saga expiry row, the check is done twice: at the door from a batch read (to skip
//! the guest call) and inside the commit as a row write, so that a forward step and its
//! compensation committing concurrently (on two instances) serialise on the row.

use super::{Conn, Db, Error};

/// The inbox record's detail of a compensation applied as a tombstone.
pub const TOMBSTONE: &str = "tombstone: no forward step of this saga before it";

/// What the ledger says about an event about to be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it. `tombstone`: a compensation with no forward step before it.
    Apply { tombstone: bool },
    /// Do not apply: the saga was already compensated here, by this event id.
    Closed { by: String },
}

/// Record a forward step of `saga` at `service`, unless the saga is closed there.
pub async fn forward(
    conn: &mut Conn,
    service: &str,
    saga: &str,
    now_ms: i64,
) -> Result<Verdict, Error> {
    let row = super::query(concat!(
        "INSERT INTO saga_ledger (service, saga, forward_steps, touched_ms) VALUES ($1, $2, 1, $3) \
         ON CONFLICT (service, saga) DO UPDATE SET forward_steps = saga_ledger.forward_steps + 1, ",
        touch!("saga_ledger", "$3"),
        " RETURNING compensated_by"
    ))
    .bind(service)
    .bind(saga)
    .bind(now_ms)
    .fetch_one(&mut *conn)
    .await?;
    Ok(match row.try_get::<Option<String>, _>("compensated_by")? {
        Some(by) => Verdict::Closed { by },
        None => Verdict::Apply { tombstone: false },
    })
}

/// Record compensation `event_id` of `saga` at `service`; the first one wins.
pub async fn compensate(
    conn: &mut Conn,
    service: &str,
    saga: &str,
    event_id: &str,
    now_ms: i64,
) -> Result<Verdict, Error> {
    let row = super::query(concat!(
        "INSERT INTO saga_ledger \
         (service, saga, forward_steps, compensated_by, compensated_ms, touched_ms) \
         VALUES ($1, $2, 0, $3, $4, $4) \
         ON CONFLICT (service, saga) DO UPDATE SET \
           compensated_by = COALESCE(saga_ledger.compensated_by, excluded.compensated_by), \
           compensated_ms = COALESCE(saga_ledger.compensated_ms, excluded.compensated_ms), ",
        touch!("saga_ledger", "$4"),
        " RETURNING compensated_by, forward_steps"
    ))
    .bind(service)
    .bind(saga)
    .bind(event_id)
    .bind(now_ms)
    .fetch_one(&mut *conn)
    .await?;
    let by: String = row.try_get("compensated_by")?;
    if by != event_id {
        return Ok(Verdict::Closed { by });
    }
    let forward_steps: i64 = row.try_get("forward_steps")?;
    Ok(Verdict::Apply {
        tombstone: forward_steps == 0,
    })
}

/// Whether `service` has ever used the ledger (a version of it declared compensations).
pub async fn used(db: &Db, service: &str) -> Result<bool, Error> {
    let row = super::query("SELECT 1 FROM saga_ledger WHERE service = $1 LIMIT 1")
        .bind(service)
        .fetch_optional(db.pool())
        .await?;
    Ok(row.is_some())
}
