//! Consumer positions, kept in the database with the effects they cover (see
//! `crate::ownership`): the next offset per (service, topic, partition).

use std::collections::HashMap;

use super::joint::Joint;
use super::{Conn, Db, Error};

/// Move the positions of `service` forward (never back), each `(topic, partition, next)`,
/// in one statement.
pub async fn advance(
    conn: &mut Conn,
    service: &str,
    positions: &[(&str, i32, i64)],
) -> Result<(), Error> {
    for chunk in positions.chunks(CHUNK) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("($1, ${}, ${}, ${})", 3 * i + 2, 3 * i + 3, 3 * i + 4))
            .collect();
        let sql = format!(
            "INSERT INTO consumer_offsets (service, topic, partition, next_offset) VALUES {} \
             {UPSERT}",
            values.join(", ")
        );
        let mut query = super::query(&sql).bind(service);
        for (topic, partition, next) in chunk {
            query = query.bind(*topic).bind(*partition).bind(*next);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Join what [`advance`] writes to `joint` (`positions_advanced`). `false`: too many
/// positions for one statement (nothing joined).
pub fn join(joint: &mut Joint, service: &str, positions: &[(&str, i32, i64)]) -> bool {
    if positions.len() > CHUNK {
        return false;
    }
    if positions.is_empty() {
        return true;
    }
    // As one JSON parameter: one statement shape for any count.
    let rows: Vec<JsonPosition<'_>> = positions
        .iter()
        .map(|&(topic, partition, next_offset)| JsonPosition {
            topic,
            partition,
            next_offset,
        })
        .collect();
    let query = super::sql::Query::new(&JOINED).bind(service);
    joint.with(query.bind(super::joint::json(&rows)));
    true
}

/// [`join`]'s entry: the positions from one JSON parameter (`$2`).
static JOINED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "positions_advanced AS (INSERT INTO consumer_offsets (service, topic, partition, \
         next_offset) SELECT $1, v.topic, v.partition, v.next_offset FROM \
         json_to_recordset(CAST($2 AS json)) AS v(topic text, partition integer, \
         next_offset bigint) {UPSERT})"
    )
});

/// A position as [`join`] sends it, one object of its JSON parameter.
#[derive(serde::Serialize)]
struct JsonPosition<'p> {
    topic: &'p str,
    partition: i32,
    next_offset: i64,
}

/// A position stored over an older one, never over a newer one.
const UPSERT: &str = "ON CONFLICT (service, topic, partition) DO UPDATE SET \
     next_offset = CASE WHEN excluded.next_offset > consumer_offsets.next_offset \
     THEN excluded.next_offset ELSE consumer_offsets.next_offset END";

/// Positions per statement: 3 parameters each and the service, well inside every database's
/// limit.
const CHUNK: usize = 1000;

/// Every stored position of `service`.
pub async fn load(db: &Db, service: &str) -> Result<HashMap<(String, i32), i64>, Error> {
    let rows = super::query(
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

/// Note that the broker's connections dropped at `lost_ms` (wall clock), unless a later loss
/// is noted already: one row for the cluster, whichever instance saw it.
pub async fn note_broker_loss(db: &Db, lost_ms: i64) -> Result<(), Error> {
    let _gate = db.write_gate().await;
    super::query(
        "INSERT INTO broker_losses (broker, lost_ms) VALUES ('kafka', $1) \
         ON CONFLICT (broker) DO UPDATE SET lost_ms = excluded.lost_ms \
         WHERE excluded.lost_ms > broker_losses.lost_ms",
    )
    .bind(lost_ms)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// When any instance last noted the broker's connections dropping (wall clock), if ever.
pub async fn broker_lost_ms(db: &Db) -> Result<Option<i64>, Error> {
    super::query_scalar("SELECT lost_ms FROM broker_losses WHERE broker = 'kafka'")
        .fetch_optional(db.pool())
        .await
}
