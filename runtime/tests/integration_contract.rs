//! Versions of the contract (issue 11, item 7): the host implements `saga:runtime@0.1.1`,
//! whose `state.scan-after` lets listings page instead of stopping at a fixed count, and keeps
//! serving components built against 0.1.0 unchanged.

mod common;

use common::{Backend, TestRuntime};
use serde_json::{json, Value};

/// A component built against 0.1.0 (its own bindings, not the SDK) deploys, writes and scans
/// on the 0.1.1 host.
async fn a_component_built_against_0_1_0_still_runs(backend: Backend) {
    let rt = TestRuntime::start(backend, &["fixture_contract_0_1_0"]).await;
    for text in ["first", "second"] {
        let (status, _) = rt.post("/notes", json!({ "text": text })).await;
        assert_eq!(status, 201);
    }
    let notes = rt.get("/notes").await;
    let mut texts: Vec<&str> = notes
        .as_array()
        .unwrap_or_else(|| panic!("{notes}"))
        .iter()
        .map(|n| n["text"].as_str().unwrap())
        .collect();
    texts.sort();
    assert_eq!(texts, ["first", "second"]);
    rt.stop().await;
}

/// `GET /orders?limit=N&after=ID` pages through every order once, in id order, and the host
/// caps a page at `limits.scan_rows` however many the guest asks for (before, a listing
/// silently stopped at the first 10,000 orders).
async fn a_listing_pages_with_a_cursor_and_the_host_caps_a_page(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["order"], |o| o.config.limits.scan_rows = 3).await;
    let mut placed = Vec::new();
    for i in 0..7 {
        let body = json!({"holderId": format!("u{i}"), "currencyId": 1, "amount": 1});
        let (status, order) = rt.post("/orders", body).await;
        assert_eq!(status, 201, "{order}");
        placed.push(order["id"].as_str().unwrap().to_string());
    }
    placed.sort();
    let ids = |page: &Value| -> Vec<String> {
        page.as_array()
            .unwrap_or_else(|| panic!("{page}"))
            .iter()
            .map(|o| o["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(&rt.get("/orders").await),
        placed[..3],
        "the SDK asks for 1000; the host returns limits.scan_rows"
    );
    assert_eq!(ids(&rt.get("/orders?limit=2").await), placed[..2]);
    let mut seen = Vec::new();
    let mut path = "/orders?limit=2".to_string();
    loop {
        let page = ids(&rt.get(&path).await);
        seen.extend(page.iter().cloned());
        match page.last() {
            Some(last) if page.len() == 2 => path = format!("/orders?limit=2&after={last}"),
            _ => break,
        }
    }
    assert_eq!(seen, placed, "every order once, in order");
    let (status, reply) = rt.get_status("/orders?limit=0").await;
    assert_eq!(status, 422, "{reply}");
    assert!(
        reply.to_string().contains("limit must be a number"),
        "{reply}"
    );
    rt.stop().await;
}

on_both_backends!(
    a_component_built_against_0_1_0_still_runs,
    a_listing_pages_with_a_cursor_and_the_host_caps_a_page,
);
