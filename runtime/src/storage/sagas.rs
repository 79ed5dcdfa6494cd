//! Saga expiry rows: the in-commit half of the expiry check (SPEC B5).
//!
//! The row of a saga is created when a deadline is set for it. The deadline firing marks it
//! expired, and every forward step of the saga updates it in its own commit, reading the expiry
//! back. In PostgreSQL both are row writes, so they serialise on the row lock: whichever
//! commits second sees the other. (SQLite serialises all writers.)

use super::{Conn, Error};

/// Make sure `saga` has a row (when a deadline is set for it).
pub async fn open(conn: &mut Conn, saga: &str, now_ms: i64) -> Result<(), Error> {
    super::query(concat!(
        "INSERT INTO sagas (saga, expired_ms, steps, touched_ms, opened_ms) \
         VALUES ($1, NULL, 0, $2, $2) ON CONFLICT (saga) DO UPDATE SET ",
        touch!("sagas", "$2")
    ))
    .bind(saga)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Mark `saga` expired at `now_ms` (the first expiry wins); when it was opened, if known.
pub async fn expire(conn: &mut Conn, saga: &str, now_ms: i64) -> Result<Option<i64>, Error> {
    let opened: Option<i64> = super::query_scalar(
        "INSERT INTO sagas (saga, expired_ms, steps, touched_ms) VALUES ($1, $2, 0, $2) \
         ON CONFLICT (saga) DO UPDATE SET \
         expired_ms = COALESCE(sagas.expired_ms, excluded.expired_ms), touched_ms = $2 \
         RETURNING opened_ms",
    )
    .bind(saga)
    .bind(now_ms)
    .fetch_one(&mut *conn)
    .await?;
    Ok(opened)
}

/// Record a forward step of `saga` and return when it expired, if it has.
pub async fn step(conn: &mut Conn, saga: &str, now_ms: i64) -> Result<Option<i64>, Error> {
    let expired: Option<Option<i64>> = super::query_scalar(concat!(
        "UPDATE sagas SET steps = steps + 1, ",
        touch!("sagas", "$2"),
        " WHERE saga = $1 RETURNING expired_ms"
    ))
    .bind(saga)
    .bind(now_ms)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(expired.flatten())
}
