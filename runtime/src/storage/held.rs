//! Steps held for a retry (blocking subscriptions), shared by every instance, so that a
//! compensation waits for a held step of its saga wherever the step is retried
//! (`worker::holds` keeps the same for its own partitions, in memory).

use super::{Conn, Db, Error};

/// `service` is retrying a step of `saga`: a compensation of it waits until `until_ms` at most.
pub async fn hold(db: &Db, service: &str, saga: &str, until_ms: i64) -> Result<(), Error> {
    let _gate = db.write_gate().await;
    super::query(
        "INSERT INTO held_steps (service, saga, until_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (service, saga) DO UPDATE SET until_ms = excluded.until_ms",
    )
    .bind(service)
    .bind(saga)
    .bind(until_ms)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// The held step of `saga` was handled (in the transaction that records it).
pub async fn release(conn: &mut Conn, service: &str, saga: &str) -> Result<(), Error> {
    super::query("DELETE FROM held_steps WHERE service = $1 AND saga = $2")
        .bind(service)
        .bind(saga)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
