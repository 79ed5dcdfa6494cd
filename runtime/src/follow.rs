//! Every instance follows the deployments recorded in the database (`storage::deployments`):
//! a few times a second it compares each service's active digest with what it runs and installs
//! the difference (`node::install`: a new service starts, a running one is swapped in place;
//! `node::undeploy` for a service whose latest deployment is an undeploy). The database is the
//! authority once a service has been deployed: it overrides a component given at start-up.
//! So `runtime deploy` against any instance reaches all instances on the same database within
//! about a second, and an instance that starts later picks up what was deployed before it.
//!
//! A version that cannot run here (e.g. it changes subscriptions) is logged once and skipped
//! until a newer deployment of the service arrives.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::node::{self, Shared};
use crate::storage::deployments::{self, Action};

/// How often the database is asked for the active deployments.
pub const EVERY: Duration = Duration::from_millis(250);

pub async fn run(shared: Arc<Shared>) {
    let mut refused: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let _applying = shared.lifecycle.lock().await;
        let active = match deployments::active(&shared.db).await {
            Ok(active) => active,
            Err(e) => {
                tracing::warn!("could not read deployments: {e}");
                continue;
            }
        };
        for d in active {
            let running = shared.registry.get(&d.service);
            if d.action == Action::Undeploy {
                if running.is_some() {
                    node::undeploy(&shared, &d.service).await;
                    tracing::info!(service = %d.service, "following undeploy");
                }
                continue;
            }
            if running.is_some_and(|s| s.guest.digest == d.digest) || refused.contains(&d.digest) {
                continue;
            }
            let wasm = match deployments::component(&shared.db, &d.digest).await {
                Ok(Some(wasm)) => wasm,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!("could not read component {}: {e}", d.digest);
                    continue;
                }
            };
            match node::install(&shared, wasm).await {
                Ok(_) => tracing::info!(
                    service = %d.service, version = %d.version, digest = %d.digest,
                    "following deployment"
                ),
                Err(e) => {
                    tracing::warn!(service = %d.service, digest = %d.digest, "cannot run this deployment here: {e}");
                    refused.insert(d.digest);
                }
            }
        }
    }
}
