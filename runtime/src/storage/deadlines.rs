//! Deadlines set and cancelled by handlers, stored in the same transaction as their other
//! effects.

use super::{Conn, Error};

pub async fn set(
    conn: &mut Conn,
    service: &str,
    saga: &str,
    name: &str,
    due_ms: i64,
    set_by: &str,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO deadlines (service, saga, name, due_ms, status, set_by) \
         VALUES ($1, $2, $3, $4, 'PENDING', $5) \
         ON CONFLICT (service, saga, name) DO UPDATE SET due_ms = excluded.due_ms, \
         status = 'PENDING', set_by = excluded.set_by",
    )
    .bind(service)
    .bind(saga)
    .bind(name)
    .bind(due_ms)
    .bind(set_by)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub async fn cancel(conn: &mut Conn, service: &str, saga: &str, name: &str) -> Result<(), Error> {
    sqlx::query(
        "UPDATE deadlines SET status = 'CANCELLED' \
         WHERE service = $1 AND saga = $2 AND name = $3 AND status = 'PENDING'",
    )
    .bind(service)
    .bind(saga)
    .bind(name)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
