//! Leases: a named singleton role held by one instance until it expires. The relay holds
//! `relay/<slot>`; its Kafka `transactional.id` is derived from the slot, not the instance, so
//! whoever takes the lease over also fences (and aborts) what a crashed holder left open.

use super::{Db, Error};

/// Take or renew `name` for `holder` until `now_ms + ttl_ms`. Succeeds if the lease is free,
/// expired, or already ours.
pub async fn acquire(
    db: &Db,
    name: &str,
    holder: &str,
    now_ms: i64,
    ttl_ms: i64,
) -> Result<bool, Error> {
    let _gate = db.write_gate().await;
    let affected = super::query(
        "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms \
         WHERE leases.holder = excluded.holder OR leases.expires_ms < $4",
    )
    .bind(name)
    .bind(holder)
    .bind(now_ms + ttl_ms)
    .bind(now_ms)
    .execute(db.pool())
    .await?
    .rows_affected();
    Ok(affected == 1)
}

/// Give the lease up so a successor need not wait for it to expire.
pub async fn release(db: &Db, name: &str, holder: &str) -> Result<(), Error> {
    let _gate = db.write_gate().await;
    super::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
        .bind(name)
        .bind(holder)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// How many leases starting with `prefix` are held (unexpired) at `now_ms`.
pub async fn count_held(db: &Db, prefix: &str, now_ms: i64) -> Result<i64, Error> {
    super::query_scalar("SELECT COUNT(*) FROM leases WHERE name LIKE $1 AND expires_ms >= $2")
        .bind(format!("{prefix}%"))
        .bind(now_ms)
        .fetch_one(db.pool())
        .await
}
