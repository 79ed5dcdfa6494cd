//! The services loaded in this runtime: each a described guest plus what the host derives from
//! its manifest (route patterns, failure policies). Lookups take a snapshot (`Arc`), so an
//! event or request that started on one version finishes on it even if another is installed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::wasm::bindings::FailurePolicy;
use crate::wasm::Guest;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("route {method} {path} of service {service} is already served by {other}")]
    RouteTaken {
        method: String,
        path: String,
        service: String,
        other: String,
    },
    #[error("route {0:?} must start with '/'")]
    BadRoute(String),
    #[error("service {service} declares it publishes to {topic:?}, a topic only the host writes (deadlines and dead letters)")]
    HostTopic { service: String, topic: String },
}

/// Topics the host writes and guests never may: fired deadlines (`<service>.deadline`) and
/// dead letters (`<topic>.dlt`). A guest that could emit there could forge a deadline or a
/// failure of another service.
pub fn is_host_topic(topic: &str) -> bool {
    crate::kafka::dead_letter::is_dead_letter_topic(topic)
        || crate::deadline::is_deadline_topic(topic)
}

/// What part an event plays in its saga at the service that receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A step forward: dropped as expired after the saga deadline, and not applied once the
    /// saga was compensated at this service (see `storage::ledger`).
    Forward,
    /// A declared compensation type of its subscription: never dropped as expired, applied
    /// once per saga.
    Compensation,
    /// A fired deadline, on the host's deadline topic: always delivered.
    Deadline,
}

/// One service version, ready to run.
pub struct Service {
    pub guest: Guest,
    routes: Vec<Pattern>,
    policies: HashMap<String, FailurePolicy>,
    compensations: HashMap<String, Vec<String>>,
    /// `<name>.deadline`, where this service receives its fired deadlines.
    deadline_topic: String,
    /// The compensation ledger stays on although this version declares no compensations:
    /// an earlier one did, and its sagas are still guarded (see [`Service::keeps_ledger`]).
    inherited_ledger: bool,
}

impl Service {
    /// The saga deadline for `after-ms: none`: the config's value for this service, else what
    /// the service declares, else the config default.
    pub fn saga_deadline_ms(&self, config: &Config) -> u64 {
        config
            .saga_deadlines
            .get(self.name())
            .copied()
            .or(self.guest.manifest.saga_deadline_ms)
            .unwrap_or(config.worker.default_saga_deadline_ms)
    }

    pub fn new(guest: Guest) -> Result<Self, Error> {
        if let Some(topic) = guest.manifest.publishes.iter().find(|t| is_host_topic(t)) {
            return Err(Error::HostTopic {
                service: guest.manifest.name.clone(),
                topic: topic.clone(),
            });
        }
        let routes = guest
            .manifest
            .routes
            .iter()
            .map(|r| Pattern::parse(&r.method, &r.path))
            .collect::<Result<_, _>>()?;
        let policies = guest
            .manifest
            .subscriptions
            .iter()
            .map(|s| (s.topic.clone(), s.on_failure))
            .collect();
        let compensations = guest
            .manifest
            .subscriptions
            .iter()
            .map(|s| (s.topic.clone(), s.compensations.clone()))
            .collect();
        let deadline_topic = crate::deadline::topic(&guest.manifest.name);
        Ok(Service {
            guest,
            routes,
            policies,
            compensations,
            deadline_topic,
            inherited_ledger: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.guest.manifest.name
    }

    pub fn version(&self) -> &str {
        &self.guest.manifest.version
    }

    /// The failure policy of the subscription to `topic` (dead-letter after 3 by default).
    pub fn policy(&self, topic: &str) -> FailurePolicy {
        self.policies
            .get(topic)
            .copied()
            .unwrap_or(FailurePolicy::DeadLetter(3))
    }

    /// What part an event plays in its saga at this service.
    pub fn step(&self, topic: &str, event_type: &str) -> Step {
        if topic == self.deadline_topic {
            Step::Deadline
        } else if self
            .compensations
            .get(topic)
            .is_some_and(|types| types.iter().any(|t| t == event_type))
        {
            Step::Compensation
        } else {
            Step::Forward
        }
    }

    /// Whether any subscription declares compensation types: only then can the ledger close a
    /// saga at this service.
    pub fn compensates(&self) -> bool {
        self.compensations.values().any(|types| !types.is_empty())
    }

    /// Whether events of this service go through the compensation ledger: it compensates, or
    /// an earlier version did (its ledger has rows), so that a hot swap to a version without
    /// compensation types cannot let a late step into a saga compensated under the old one.
    pub fn keeps_ledger(&self) -> bool {
        self.inherited_ledger || self.compensates()
    }

    /// Keep the ledger on for this version (see [`Service::keeps_ledger`]).
    pub fn inherit_ledger(&mut self) {
        self.inherited_ledger = true;
    }

    /// Whether the service declared that it emits to `topic`.
    pub fn publishes(&self, topic: &str) -> bool {
        self.guest.manifest.publishes.iter().any(|t| t == topic)
    }

    /// The logical topics this service consumes: its subscriptions and its deadline topic.
    pub fn subscribed_topics(&self) -> Vec<String> {
        self.guest
            .manifest
            .subscriptions
            .iter()
            .map(|s| s.topic.clone())
            .chain([self.deadline_topic.clone()])
            .collect()
    }

    /// Every logical topic this service needs: what it consumes, their dead-letter topics,
    /// and the topics it emits to.
    pub fn topics(&self) -> Vec<String> {
        self.subscribed_topics()
            .into_iter()
            .flat_map(|t| [crate::kafka::dead_letter::topic(&t), t])
            .chain(self.guest.manifest.publishes.iter().cloned())
            .collect()
    }
}

/// `GET /orders/{id}` as literal and parameter segments.
#[derive(Debug, Clone, PartialEq)]
struct Pattern {
    method: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Param(String),
}

impl Pattern {
    fn parse(method: &str, path: &str) -> Result<Self, Error> {
        let rest = path
            .strip_prefix('/')
            .ok_or_else(|| Error::BadRoute(path.to_string()))?;
        let segments = rest
            .split('/')
            .filter(|s| !s.is_empty())
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Param(name.to_string()),
                    None => Segment::Literal(s.to_string()),
                },
            )
            .collect();
        Ok(Pattern {
            method: method.to_ascii_uppercase(),
            segments,
        })
    }

    fn matches(&self, method: &str, path: &str) -> Option<Vec<(String, String)>> {
        if !self.method.eq_ignore_ascii_case(method) {
            return None;
        }
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if parts.len() != self.segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (segment, part) in self.segments.iter().zip(parts) {
            match segment {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => params.push((name.clone(), percent_decode(part))),
            }
        }
        Some(params)
    }

    /// Two patterns overlap if some request could match both.
    fn overlaps(&self, other: &Pattern) -> bool {
        self.method == other.method
            && self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|(a, b)| match (a, b) {
                    (Segment::Literal(x), Segment::Literal(y)) => x == y,
                    _ => true,
                })
    }

    fn render(&self) -> String {
        let path: Vec<String> = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.clone(),
                Segment::Param(p) => format!("{{{p}}}"),
            })
            .collect();
        format!("/{}", path.join("/"))
    }
}

/// Decode `%XX` escapes (and `+` is left alone: this is a path, not a form).
pub fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Route parameters, in the order of the pattern.
pub type Params = Vec<(String, String)>;

fn check_routes(services: &BTreeMap<String, Arc<Service>>, service: &Service) -> Result<(), Error> {
    for other in services.values().filter(|o| o.name() != service.name()) {
        for mine in &service.routes {
            if let Some(theirs) = other.routes.iter().find(|r| r.overlaps(mine)) {
                return Err(Error::RouteTaken {
                    method: mine.method.clone(),
                    path: theirs.render(),
                    service: service.name().to_string(),
                    other: other.name().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// All loaded services by name.
#[derive(Default)]
pub struct Registry {
    services: RwLock<Arc<BTreeMap<String, Arc<Service>>>>,
}

impl Registry {
    /// Whether `service` could be installed: its routes must not overlap another service's.
    pub fn check(&self, service: &Service) -> Result<(), Error> {
        let guard = self.services.read().expect("registry lock");
        check_routes(&guard, service)
    }

    /// Install `service`, replacing an earlier version of the same name.
    pub fn install(&self, service: Service) -> Result<Arc<Service>, Error> {
        let mut guard = self.services.write().expect("registry lock");
        check_routes(&guard, &service)?;
        let service = Arc::new(service);
        let mut next = (**guard).clone();
        next.insert(service.name().to_string(), service.clone());
        *guard = Arc::new(next);
        Ok(service)
    }

    /// Take a service out: its routes and events find nothing from now on.
    pub fn remove(&self, name: &str) -> Option<Arc<Service>> {
        let mut guard = self.services.write().expect("registry lock");
        let mut next = (**guard).clone();
        let removed = next.remove(name);
        *guard = Arc::new(next);
        removed
    }

    pub fn get(&self, name: &str) -> Option<Arc<Service>> {
        self.snapshot().get(name).cloned()
    }

    pub fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Service>>> {
        self.services.read().expect("registry lock").clone()
    }

    /// The service serving `method path`, with the route's parameters.
    pub fn route(&self, method: &str, path: &str) -> Option<(Arc<Service>, Params)> {
        self.snapshot().values().find_map(|s| {
            s.routes
                .iter()
                .find_map(|r| r.matches(method, path))
                .map(|params| (s.clone(), params))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_extracts_its_parameters() {
        let p = Pattern::parse("GET", "/orders/{id}").unwrap();
        assert_eq!(
            p.matches("GET", "/orders/42"),
            Some(vec![("id".into(), "42".into())])
        );
        assert_eq!(
            p.matches("get", "/orders/a%20b/"),
            Some(vec![("id".into(), "a b".into())])
        );
        assert_eq!(p.matches("POST", "/orders/42"), None);
        assert_eq!(p.matches("GET", "/orders"), None);
        assert_eq!(p.matches("GET", "/orders/42/items"), None);
    }

    #[test]
    fn overlapping_routes_are_detected() {
        let a = Pattern::parse("GET", "/orders/{id}").unwrap();
        assert!(a.overlaps(&Pattern::parse("GET", "/orders/latest").unwrap()));
        assert!(!a.overlaps(&Pattern::parse("POST", "/orders/latest").unwrap()));
        assert!(!a.overlaps(&Pattern::parse("GET", "/points/{id}").unwrap()));
    }

    #[test]
    fn percent_decoding_leaves_bad_escapes_alone() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
