//! Steps held for a retry (blocking subscriptions), shared by every instance, so that a
//! compensation waits for a held step of its saga wherever the step is retried
//! (`worker::holds` keeps the same for its own partitions, in memory).

use std::collections::HashMap;

use sqlx::Row as _;

use super::{Conn, Db, Error};

/// `service` is retrying a step of `saga`: a compensation of it waits until `until_ms` at most.
pub async fn hold(db: &Db, service: &str, saga: &str, until_ms: i64) -> Result<(), Error> {
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

/// Of `sagas`, those with a step of `service` held at `now_ms`, and until when.
pub async fn pending(
    db: &Db,
    service: &str,
    sagas: &[&str],
    now_ms: i64,
) -> Result<HashMap<String, i64>, Error> {
    if sagas.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT saga, until_ms FROM held_steps \
         WHERE service = $1 AND until_ms > $2 AND saga IN ({})",
        super::placeholders(3, sagas.len())
    );
    let mut query = super::query(&sql).bind(service).bind(now_ms);
    for saga in sagas {
        query = query.bind(*saga);
    }
    query
        .fetch_all(db.pool())
        .await?
        .iter()
        .map(|r| Ok((r.try_get("saga")?, r.try_get("until_ms")?)))
        .collect()
}
