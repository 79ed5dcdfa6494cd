//! Recent handler calls per service for `runtime deploy --verify` (migration 0007), shared by
//! every instance on the database and kept across restarts. The rows are opaque JSON here;
//! `crate::verify` gives them meaning.

use super::{Db, Error};

/// One recorded handler call.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub service: String,
    pub event_id: String,
    pub recorded_ms: i64,
    pub instance: String,
    pub version: String,
    pub body: String,
}

/// Store `rows` (a row of the same service and event replaces the older one), then keep only
/// the newest `keep` of each service they touch. One transaction.
pub async fn save(db: &Db, rows: &[Recorded], keep: usize) -> Result<(), Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut tx = db.begin().await?;
    for r in rows {
        super::query(
            "INSERT INTO recordings (service, event_id, recorded_ms, instance, version, body) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (service, event_id) DO UPDATE SET recorded_ms = excluded.recorded_ms, \
             instance = excluded.instance, version = excluded.version, body = excluded.body",
        )
        .bind(&r.service)
        .bind(&r.event_id)
        .bind(r.recorded_ms)
        .bind(&r.instance)
        .bind(&r.version)
        .bind(&r.body)
        .execute(&mut *tx)
        .await?;
    }
    let mut services: Vec<&str> = rows.iter().map(|r| r.service.as_str()).collect();
    services.sort_unstable();
    services.dedup();
    for service in services {
        super::query(
            "DELETE FROM recordings WHERE service = $1 AND event_id NOT IN \
             (SELECT event_id FROM recordings WHERE service = $2 \
              ORDER BY recorded_ms DESC, event_id DESC LIMIT $3)",
        )
        .bind(service)
        .bind(service)
        .bind(keep as i64)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The newest `limit` recordings of `service`, oldest first.
pub async fn recent(db: &Db, service: &str, limit: usize) -> Result<Vec<Recorded>, Error> {
    let rows = super::query(
        "SELECT service, event_id, recorded_ms, instance, version, body FROM recordings \
         WHERE service = $1 ORDER BY recorded_ms DESC, event_id DESC LIMIT $2",
    )
    .bind(service)
    .bind(limit as i64)
    .fetch_all(db.pool())
    .await?;
    let mut out = rows
        .iter()
        .map(|r| {
            Ok(Recorded {
                service: r.try_get("service")?,
                event_id: r.try_get("event_id")?,
                recorded_ms: r.try_get("recorded_ms")?,
                instance: r.try_get("instance")?,
                version: r.try_get("version")?,
                body: r.try_get("body")?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    out.reverse();
    Ok(out)
}
