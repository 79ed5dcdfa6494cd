//! Deployed components and their history (migrations 0005, 0006): what `runtime deploy` stored,
//! and which digest is active per service (its latest deployment, unless that is an undeploy).
//! Rollback and undeploy append rows too: the history is never rewritten.

use super::{Db, Error};

/// What a row of the history did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A component was uploaded and made active.
    Deploy,
    /// An earlier digest was made active again.
    Rollback,
    /// The service was stopped (`digest` is the version that was stopped).
    Undeploy,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Rollback => "rollback",
            Action::Undeploy => "undeploy",
        }
    }

    fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "deploy" => Ok(Action::Deploy),
            "rollback" => Ok(Action::Rollback),
            "undeploy" => Ok(Action::Undeploy),
            other => Err(Error::Corrupt(format!(
                "unknown deployment action {other:?}"
            ))),
        }
    }
}

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
    pub action: Action,
}

/// Append `d` to the history, storing the component first (once per digest) if given; a
/// rollback or undeploy names a digest that is already stored.
pub async fn record(db: &Db, d: &Deployment, wasm: Option<&[u8]>) -> Result<(), Error> {
    let mut tx = db.begin().await?;
    if let Some(wasm) = wasm {
        super::query(
            "INSERT INTO components (digest, wasm, stored_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (digest) DO NOTHING",
        )
        .bind(&d.digest)
        .bind(wasm)
        .bind(d.deployed_ms)
        .execute(&mut *tx)
        .await?;
    }
    super::query(
        "INSERT INTO deployments (service, version, digest, deployed_by, deployed_ms, action) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&d.service)
    .bind(&d.version)
    .bind(&d.digest)
    .bind(&d.deployed_by)
    .bind(d.deployed_ms)
    .bind(d.action.as_str())
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
        action: Action::parse(&r.try_get::<String, _>("action")?)?,
    })
}

const COLUMNS: &str = "id, service, version, digest, deployed_by, deployed_ms, action";

/// The latest deployment of every service ever deployed: what should run, unless it is an
/// undeploy.
pub async fn active(db: &Db) -> Result<Vec<Deployment>, Error> {
    let rows = super::query(&format!(
        "SELECT {COLUMNS} FROM deployments d WHERE id = \
         (SELECT MAX(id) FROM deployments WHERE service = d.service) ORDER BY service"
    ))
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// Every deployment of `service`, newest first.
pub async fn history(db: &Db, service: &str) -> Result<Vec<Deployment>, Error> {
    let rows = super::query(&format!(
        "SELECT {COLUMNS} FROM deployments WHERE service = $1 ORDER BY id DESC"
    ))
    .bind(service)
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(from_row).collect()
}

/// What `runtime rollback <service> [version]` makes active again: the newest deployment of
/// `version` if given, else the newest whose digest differs from the latest row's (after an
/// undeploy: the version that was stopped). `None` if there is no such deployment.
pub async fn rollback_target(
    db: &Db,
    service: &str,
    version: Option<&str>,
) -> Result<Option<Deployment>, Error> {
    let history = history(db, service).await?;
    let latest = history.first();
    let target = history.iter().find(|d| match version {
        Some(v) => d.version == v && d.action != Action::Undeploy,
        None => match latest {
            Some(l) if l.action == Action::Undeploy => true,
            Some(l) => d.digest != l.digest,
            None => false,
        },
    });
    Ok(target.cloned())
}

/// The bytes of a stored component.
pub async fn component(db: &Db, digest: &str) -> Result<Option<Vec<u8>>, Error> {
    super::query_scalar("SELECT wasm FROM components WHERE digest = $1")
        .bind(digest)
        .fetch_optional(db.pool())
        .await
}
