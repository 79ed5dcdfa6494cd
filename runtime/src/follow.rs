//! Every instance follows the deployments recorded in the database (`storage::deployments`):
//! a few times a second it compares each service's active digest with what it runs and installs
//! the difference (`node::install`: a new service starts, a running one is swapped in place;
//! `node::undeploy` for a service whose latest deployment is an undeploy). The database is the
//! authority once a service has been deployed: it overrides a component given at start-up.
//! So `runtime deploy` against any instance reaches all instances on the same database within
//! about a second, and an instance that starts later picks up what was deployed before it.
//!
//! A version that cannot run here (its component is refused, e.g. a route another service
//! serves) is logged once and skipped until a newer deployment of the service arrives. An
//! install that failed for a passing reason (the database or the broker) is tried again, with
//! a growing pause, until it succeeds.
//!
//! Start-up runs one pass ([`apply`]) before anything consumes, so an instance never handles
//! events on a version the history has replaced.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::node::{self, Shared};
use crate::storage::deployments::{self, Action};

/// How often the database is asked for the active deployments.
pub const EVERY: Duration = Duration::from_millis(250);

/// What a pass remembers for the next: refused components, and installs to try again.
#[derive(Debug, Default)]
pub struct Memory {
    refused: HashSet<String>,
    /// Digest → (failed installs, not before).
    retry: HashMap<String, (u32, Instant)>,
}

impl Memory {
    /// Whether `digest` is waiting: refused for good, or its retry is not due yet.
    fn waits(&self, digest: &str, now: Instant) -> bool {
        self.refused.contains(digest) || self.retry.get(digest).is_some_and(|(_, at)| *at > now)
    }

    fn failed(&mut self, digest: &str, error: &node::Error, now: Instant) {
        if error.is_transient() {
            let tries = self.retry.get(digest).map_or(1, |(n, _)| n + 1);
            let pause = Duration::from_millis((250u64 << tries.min(6)).min(10_000));
            self.retry.insert(digest.to_string(), (tries, now + pause));
        } else {
            self.refused.insert(digest.to_string());
        }
    }
}

pub async fn run(shared: Arc<Shared>, mut memory: Memory) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let _applying = shared.lifecycle.lock().await;
        if let Err(e) = apply(&shared, &mut memory).await {
            tracing::warn!("could not read deployments: {e}");
        }
    }
}

/// One pass: make this instance run what the history says is active.
pub async fn apply(shared: &Arc<Shared>, memory: &mut Memory) -> Result<(), crate::storage::Error> {
    for d in deployments::active(&shared.db).await? {
        let running = shared.registry.get(&d.service);
        if d.action == Action::Undeploy {
            if running.is_some() {
                node::undeploy(shared, &d.service).await;
                tracing::info!(service = %d.service, "following undeploy");
            }
            continue;
        }
        let now = Instant::now();
        if running.is_some_and(|s| s.guest.digest == d.digest) || memory.waits(&d.digest, now) {
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
        match node::install(shared, wasm).await {
            Ok(_) => {
                memory.retry.remove(&d.digest);
                tracing::info!(
                    service = %d.service, version = %d.version, digest = %d.digest,
                    "following deployment"
                )
            }
            Err(e) => {
                tracing::warn!(service = %d.service, digest = %d.digest, transient = e.is_transient(), "cannot run this deployment here: {e}");
                memory.failed(&d.digest, &e, now);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_install_is_tried_again_unless_the_component_was_refused() {
        let mut memory = Memory::default();
        let now = Instant::now();
        let db_down = node::Error::Storage(crate::storage::Error::Corrupt("blink".into()));
        memory.failed("transient", &db_down, now);
        assert!(memory.waits("transient", now), "not at once");
        assert!(
            !memory.waits("transient", now + Duration::from_secs(11)),
            "but later"
        );
        let refused = node::Error::Registry(crate::registry::Error::BadRoute("x".into()));
        memory.failed("refused", &refused, now);
        assert!(memory.waits("refused", now + Duration::from_secs(3600)));
    }
}
