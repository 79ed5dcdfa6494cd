//! The deadline saga (order → exchange → point) as a client sees it after a load: the
//! invariants that must hold once every saga ended and its compensations ran. Shared by the
//! fault suite and the saga benchmark.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// One placed order, as the client knows it.
#[derive(Debug, Clone)]
pub struct Placed {
    pub id: String,
    pub user: String,
    pub amount: i64,
}

/// What the checks found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub violations: Vec<String>,
    pub approved: usize,
    /// The slowest saga, host clock: order created → settled.
    pub slowest_ms: i64,
    /// The sagas that took longest, slowest first (at most 3), with how long each took.
    pub slowest: Vec<(i64, String)>,
    /// Why orders were rejected (the reason's first word), with how many.
    pub rejected_for: HashMap<String, usize>,
}

/// Check that every placed order is stored once, each user has `points` less exactly what
/// their approved orders spent, and exactly the approved orders have one exchange. `users`
/// are named `u0`, `u1`, … ; `by_id` is every stored order (`GET /orders`, all pages).
pub async fn verdict(
    http: &reqwest::Client,
    base: &str,
    placed: &[Placed],
    by_id: &HashMap<String, Value>,
    users: usize,
    points: i64,
) -> Verdict {
    let mut v = Verdict::default();
    let ids: HashSet<&str> = placed.iter().map(|p| p.id.as_str()).collect();
    if ids.len() != placed.len() {
        v.violations
            .push(format!("{} orders share an id", placed.len() - ids.len()));
    }
    if by_id.len() != placed.len() {
        v.violations.push(format!(
            "{} orders stored for {} placed (a retry started a second saga?)",
            by_id.len(),
            placed.len()
        ));
    }
    let mut approved: HashSet<&str> = HashSet::new();
    let mut spent: HashMap<&str, i64> = HashMap::new();
    for p in placed {
        let Some(o) = by_id.get(&p.id) else {
            v.violations.push(format!("order {} was not stored", p.id));
            continue;
        };
        let took = o["updatedMs"].as_i64().unwrap_or(0) - o["createdMs"].as_i64().unwrap_or(0);
        v.slowest_ms = v.slowest_ms.max(took);
        v.slowest.push((took, p.id.clone()));
        v.slowest.sort_by(|a, b| b.cmp(a));
        v.slowest.truncate(3);
        if o["status"] == "APPROVED" {
            approved.insert(&p.id);
            *spent.entry(&p.user).or_default() += p.amount;
        } else {
            let reason = o["reason"].as_str().unwrap_or("none");
            let reason = reason.split(':').next().unwrap_or(reason).to_string();
            *v.rejected_for.entry(reason).or_default() += 1;
        }
    }
    for u in 0..users {
        let user = format!("u{u}");
        let have = super::get_json(http, base, &format!("/points/{user}")).await;
        let want = points - spent.get(user.as_str()).copied().unwrap_or(0);
        if have["point"] != want {
            v.violations.push(format!(
                "{user} has {} points, expected {want}",
                have["point"]
            ));
        }
    }
    let exchanges = super::get_all(http, base, "/exchanges", "orderId").await;
    let mut exchanged: HashMap<String, usize> = HashMap::new();
    for e in &exchanges {
        *exchanged
            .entry(e["orderId"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    for id in &approved {
        if exchanged.get(*id) != Some(&1) {
            v.violations.push(format!(
                "approved order {id} has {:?} exchanges",
                exchanged.get(*id)
            ));
        }
    }
    for (id, n) in &exchanged {
        if !approved.contains(id.as_str()) && ids.contains(id.as_str()) {
            v.violations.push(format!(
                "order {id} is not approved but has {n} exchange(s)"
            ));
        }
    }
    v.approved = approved.len();
    v
}

/// Every stored order by id (`GET /orders`, all pages).
pub async fn stored(http: &reqwest::Client, base: &str) -> HashMap<String, Value> {
    super::get_all(http, base, "/orders", "id")
        .await
        .into_iter()
        .map(|o| (o["id"].as_str().unwrap_or_default().to_string(), o))
        .collect()
}
