//! Deployed components and their history (see migration 0005): what `runtime deploy` stored,
//! and which digest is active per service (its latest deployment).

use sqlx::Row as _;

use super::{Db, Error};

/// One deployment of a service.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub id: i64,
    pub service: String,
    pub version: String,
    pub digest: String,
    pub deployed_by: String,
    pub deployed_ms: i64,
}

/// Store the component (once per digest) and make it the active version of `service`.
pub async fn record(db: &Db, d: &Deployment, wasm: &[u8]) -> Result<(), Error> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO components (digest, wasm, stored_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (digest) DO NOTHING",
    )
    .bind(&d.digest)
    .bind(wasm)
    .bind(d.deployed_ms)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO deployments (service, version, digest, deployed_by, deployed_ms) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&d.service)
    .bind(&d.version)
    .bind(&d.digest)
    .bind(&d.deployed_by)
    .bind(d.deployed_ms)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

fn from_row(r: &super::Row) -> Result<Deployment, Error> {
    Ok(Deployment {
        id: r.try_get("id")?,
        service: r.try_get("service")?,
        version: r.try_get("version")?,
        digest: r.try_get("digest")?,
        deployed_by: r.try_get("deployed_by")?,
        deployed_ms: r.try_get("deployed_ms")?,
    })
}

const COLUMNS: &str = "id, service, version, digest, deployed_by, deployed_ms";

/// The active (latest) deployment of every deployed service.
pub async fn active(db: &Db) -> Result<Vec<Deployment>, Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM deployments d WHERE id = \
         (SELECT MAX(id) FROM deployments WHERE service = d.service) ORDER BY service"
    ))
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Every deployment of `service`, newest first.
pub async fn history(db: &Db, service: &str) -> Result<Vec<Deployment>, Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM deployments WHERE service = $1 ORDER BY id DESC"
    ))
    .bind(service)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// The bytes of a stored component.
pub async fn component(db: &Db, digest: &str) -> Result<Option<Vec<u8>>, Error> {
    Ok(
        sqlx::query_scalar("SELECT wasm FROM components WHERE digest = $1")
            .bind(digest)
            .fetch_optional(db.pool())
            .await?,
    )
}
