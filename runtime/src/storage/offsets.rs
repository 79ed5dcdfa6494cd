//! Consumer positions, kept in the database with the effects they cover (see
//! `crate::ownership`): the next offset per (service, topic, partition).

use std::collections::HashMap;

use sqlx::Row as _;

use super::{Conn, Db, Error};

/// Move the position of `service` on `topic`/`partition` forward to `next` (never back).
pub async fn advance(
    conn: &mut Conn,
    service: &str,
    topic: &str,
    partition: i32,
    next: i64,
) -> Result<(), Error> {
    sqlx::query(
        "INSERT INTO consumer_offsets (service, topic, partition, next_offset) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (service, topic, partition) DO UPDATE SET \
         next_offset = CASE WHEN excluded.next_offset > consumer_offsets.next_offset \
         THEN excluded.next_offset ELSE consumer_offsets.next_offset END",
    )
    .bind(service)
    .bind(topic)
    .bind(partition)
    .bind(next)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Every stored position of `service`.
pub async fn load(db: &Db, service: &str) -> Result<HashMap<(String, i32), i64>, Error> {
    let rows = sqlx::query(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE service = $1",
    )
    .bind(service)
    .fetch_all(db.pool())
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok((
                (r.try_get("topic")?, r.try_get::<i32, _>("partition")?),
                r.try_get("next_offset")?,
            ))
        })
        .collect()
}
