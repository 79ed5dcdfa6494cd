//! Saga expiry rows: the in-commit half of the expiry check (SPEC B5).
//!
//! The row of a saga is created when a deadline is set for it. The deadline firing marks it
//! expired, and every forward step of the saga updates it in its own commit, reading the expiry
//! back. In PostgreSQL both are row writes, so they serialise on the row lock: whichever
//! commits second sees the other. (SQLite serialises all writers.)

use super::{Conn, Error};

/// Make sure `saga` has a row (when a deadline is set for it).
pub async fn open(conn: &mut Conn, saga: &str) -> Result<(), Error> {
    sqlx::query("INSERT INTO sagas (saga, expired_ms, steps) VALUES ($1, NULL, 0) ON CONFLICT (saga) DO NOTHING")
        .bind(saga)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Mark `saga` expired at `now_ms` (the first expiry wins).
pub async fn expire(conn: &mut Conn, saga: &str, now_ms: i64) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO sagas (saga, expired_ms, steps) VALUES ($1, $2, 0) \
         ON CONFLICT (saga) DO UPDATE SET expired_ms = COALESCE(sagas.expired_ms, excluded.expired_ms)",
    )
    .bind(saga)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Record a forward step of `saga` and return when it expired, if it has.
pub async fn step(conn: &mut Conn, saga: &str) -> Result<Option<i64>, Error> {
    let expired: Option<Option<i64>> = sqlx::query_scalar(
        "UPDATE sagas SET steps = steps + 1 WHERE saga = $1 RETURNING expired_ms",
    )
    .bind(saga)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(expired.flatten())
}
