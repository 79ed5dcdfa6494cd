//! The transactional-id generation of each relay slot: the last generation that may have
//! produced, advanced only after it was fenced (see `crate::relay`).

use super::{Db, Error};

/// The slot's current generation (0 if it never produced).
pub async fn current(db: &Db, slot: &str) -> Result<i64, Error> {
    let g: Option<i64> =
        super::query_scalar("SELECT generation FROM relay_generations WHERE slot = $1")
            .bind(slot)
            .fetch_optional(db.pool())
            .await?;
    Ok(g.unwrap_or(0))
}

/// Move the slot from generation `from` to `from + 1`; `false` if someone else moved it first.
pub async fn advance(db: &Db, slot: &str, from: i64) -> Result<bool, Error> {
    let _gate = db.write_gate().await;
    let done = super::query(
        "INSERT INTO relay_generations (slot, generation) VALUES ($1, $2 + 1) \
         ON CONFLICT (slot) DO UPDATE SET generation = excluded.generation \
         WHERE relay_generations.generation = $2",
    )
    .bind(slot)
    .bind(from)
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected() == 1)
}
