//! SPEC C3/C4: `runtime deploy` to a running runtime through the token-gated admin API. A
//! component is validated before it runs; a bad one is refused with the reason and the running
//! services go on; a new service joins a saga in flight; a running one is swapped, also with
//! other subscriptions and routes; rollback and undeploy; every instance follows.

mod common;

use common::{eventually, guest, guest_path, order_status, produce_event, Backend, TestRuntime};
use serde_json::{json, Value};

const TOKEN: &str = "t0k-for-tests";

/// Run the `runtime` CLI with the admin token: whether it succeeded, its stdout and stderr.
async fn cli(args: &[&str]) -> (bool, String, String) {
    common::run_cli(args, &[("SAGA_ADMIN_TOKEN", TOKEN)]).await
}

/// `runtime deploy --replace WASM --runtime BASE`, which must succeed; its stdout.
async fn deploy_replacing(wasm: &std::path::Path, base: &str) -> String {
    cli_ok(&[
        "deploy",
        "--replace",
        wasm.to_str().unwrap(),
        "--runtime",
        base,
    ])
    .await
}

/// Run the `runtime` CLI, which must succeed; its stdout.
async fn cli_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = cli(args).await;
    assert!(ok, "runtime {args:?} failed: {stderr}{stdout}");
    stdout
}

async fn the_admin_api_is_off_without_a_configured_token(backend: Backend) {
    let rt = TestRuntime::start(backend, &["point"]).await;
    let (status, body) = rt.deploy(Some("anything"), guest("exchange")).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("admin_token"),
        "{body}"
    );
    rt.stop().await;
}

async fn a_deployed_service_joins_a_running_saga_and_bad_components_are_refused(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["order", "point"], |o| {
        o.config.admin_token = Some(TOKEN.into());
    })
    .await;
    for token in [None, Some("wrong")] {
        let (status, body) = rt.deploy(token, guest("exchange")).await;
        assert_eq!(status, 401, "{token:?}: {body}");
    }
    let (status, body) = rt.deploy(Some(TOKEN), b"not a component".to_vec()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a valid WebAssembly component"),
        "{body}"
    );

    // An order placed while exchange is not deployed waits for it.
    rt.post("/points", json!({"userId": "ivy", "point": 10000}))
        .await;
    let (_, order) = rt
        .post(
            "/orders",
            json!({"holderId": "ivy", "currencyId": 1, "amount": 500}),
        )
        .await;
    let id = order["id"].as_str().unwrap().to_string();
    let exchange = guest_path("exchange");
    let printed = cli_ok(&["deploy", exchange.to_str().unwrap(), "--runtime", &rt.base]).await;
    assert!(
        printed.contains("deployed exchange 0.1.0 sha256:") && printed.contains("(new service)"),
        "{printed}"
    );
    order_status(&rt, &id, "APPROVED").await;
    assert_eq!(rt.get("/points/ivy").await["point"], 9500);

    // Deploying a running service swaps it in place; sagas go on.
    let (status, body) = rt.deploy(Some(TOKEN), guest("point")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["service"], "point");
    assert_eq!(body["replaced"]["digest"], body["digest"], "same build");
    let (_, order) = rt
        .post(
            "/orders",
            json!({"holderId": "ivy", "currencyId": 1, "amount": 100}),
        )
        .await;
    order_status(&rt, order["id"].as_str().unwrap(), "APPROVED").await;
    assert_eq!(rt.get("/points/ivy").await["point"], 9400);
    rt.stop().await;
}

/// C4 (first slice): a deploy to one instance is recorded in the database (content-addressed,
/// with who and when) and every instance on that database follows it. PostgreSQL only: two
/// instances need a shared server database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_on_the_database_follows_a_deploy() {
    let rt = TestRuntime::start_with(Backend::Postgres, &["order", "point"], |o| {
        o.config.admin_token = Some(TOKEN.into());
    })
    .await;
    let other = rt.sibling(|_| {}).await;
    let other_base = format!("http://{}", other.http_addr());
    let before = cli_ok(&["services", "--runtime", &other_base]).await;
    assert!(!before.contains("exchange"), "{before}");

    let (status, body) = rt.deploy(Some(TOKEN), guest("exchange")).await;
    assert_eq!(status, 200, "{body}");
    let digest = body["digest"].as_str().unwrap().to_string();
    eventually("the other instance to run exchange", || async {
        let listed = cli_ok(&["services", "--runtime", &other_base]).await;
        if listed.contains(&format!("exchange     0.1.0      sha256:{digest}")) {
            Ok(())
        } else {
            Err(listed)
        }
    })
    .await;
    let exchanges = rt
        .http
        .get(format!("{other_base}/exchanges"))
        .send()
        .await
        .unwrap();
    let status = exchanges.status();
    assert_eq!(
        status,
        200,
        "the other instance serves exchange's routes: {}",
        exchanges.text().await.unwrap_or_default()
    );
    let versions = cli_ok(&["versions", "exchange", "--runtime", &other_base]).await;
    assert!(
        versions.starts_with(&format!("* 0.1.0      sha256:{digest}"))
            && versions.contains("by admin API"),
        "{versions}"
    );
    other.shutdown().await;
    rt.stop().await;
}

/// C3: each reason a component is refused, from a fixture built for it; the reply names the
/// reason, nothing is recorded, and the running version keeps handling events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_component_is_refused_with_its_reason() {
    let rt = TestRuntime::start_with(Backend::Sqlite, &["hostile"], |o| {
        o.config.admin_token = Some(TOKEN.into());
    })
    .await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage bytes", b"not a component".to_vec(), "not a valid WebAssembly component"),
        (
            "a core module",
            b"\0asm\x01\0\0\0".to_vec(),
            "not a valid WebAssembly component",
        ),
        (
            "wrong world",
            guest("fixture_wrong_world"),
            "must export saga:runtime/handler@0.1.x (the saga:runtime/service world) but exports run",
        ),
        (
            "missing export",
            guest("fixture_no_exports"),
            "but exports nothing",
        ),
        (
            "forbidden import",
            guest("fixture_network"),
            "imports wasi:sockets/instance-network@0.2.6, which guests may not use: guests get no network",
        ),
        (
            "trap in describe",
            guest("fixture_describe_trap"),
            "describe() failed: guest trapped",
        ),
        (
            "trap in the smoke call",
            guest("fixture_smoke_trap"),
            "smoke call (on-request GET /_saga/smoke with empty state) failed",
        ),
    ];
    let history_before = rt.get("/_saga/services/hostile/versions").await;
    for (what, wasm, reason) in cases {
        let (status, body) = rt.deploy(Some(TOKEN), wasm).await;
        assert_eq!(status, 422, "{what}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(reason), "{what}: {error}");
    }
    // The CLI says why, and that nothing changed.
    let network = guest_path("fixture_network");
    let (ok, _, stderr) = cli(&["deploy", network.to_str().unwrap(), "--runtime", &rt.base]).await;
    assert!(!ok);
    assert!(
        stderr.contains("the running version stays") && stderr.contains("guests get no network"),
        "{stderr}"
    );
    assert_eq!(
        rt.get("/_saga/services/hostile/versions").await,
        history_before,
        "a refused component is not recorded"
    );
    for name in ["network", "smoke-trap"] {
        let services = cli_ok(&["services", "--runtime", &rt.base]).await;
        assert!(!services.contains(name), "{services}");
    }
    produce_event(
        rt.prefix(),
        "hostile",
        "still-1",
        "Hello",
        "still",
        &json!({}),
    )
    .await;
    hostile_saw(&rt, "still").await; // the running version goes on handling events
    rt.stop().await;
}

/// Wait until the hostile service (either version) has recorded the event with `subject`.
async fn hostile_saw(rt: &TestRuntime, subject: &str) {
    eventually(&format!("hostile to see {subject}"), || async {
        let seen = rt.get("/hostile/seen").await;
        match seen.as_array().unwrap().iter().any(|s| s == subject) {
            true => Ok(()),
            false => Err(seen.to_string()),
        }
    })
    .await;
}

async fn status_of(rt: &TestRuntime, path: &str) -> u16 {
    let resp = rt.http.get(format!("{}{path}", rt.base)).send().await;
    resp.unwrap().status().as_u16()
}

/// C3/C4: a new version that consumes another topic and serves other routes takes effect on the
/// running instance; events of the topic it stops consuming wait at their stored position and
/// are handled by a later version that consumes it again (here a rollback); undeploy stops the
/// service and its events wait likewise; the history records every step.
async fn versions_change_subscriptions_and_routes_and_roll_back(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["hostile"], |o| {
        o.config.admin_token = Some(TOKEN.into());
    })
    .await;
    let p = rt.prefix().to_string();
    produce_event(&p, "hostile", "a1", "Hello", "a1", &json!({})).await;
    hostile_saw(&rt, "a1").await;

    let v2 = guest_path("hostile_v2");
    let printed = deploy_replacing(&v2, &rt.base).await;
    assert!(
        printed.contains("deployed hostile 0.2.0 sha256:")
            && printed.contains("(replaced 0.1.0, sha256:")
            && printed.contains("  subscriptions: +hostile-v2, -hostile\n")
            && printed.contains(
                "  routes: GET /hostile/seen, POST /hostile/start, POST /hostile/continue/{id}, \
                 GET /hostile/calls, +GET /hostile/v2/seen, -GET /hostile/probe/{id}\n"
            ),
        "{printed}"
    );
    assert_eq!(status_of(&rt, "/hostile/v2/seen").await, 200);
    assert_eq!(status_of(&rt, "/hostile/probe/x").await, 404);
    // v2 consumes hostile-v2; what arrives on hostile now waits.
    produce_event(&p, "hostile", "a2", "Hello", "a2", &json!({})).await;
    produce_event(&p, "hostile-v2", "b1", "Hello", "b1", &json!({})).await;
    hostile_saw(&rt, "b1").await;
    let seen = rt.get("/hostile/seen").await;
    assert!(
        !seen.as_array().unwrap().iter().any(|s| s == "a2"),
        "no version consumes hostile now: {seen}"
    );

    let printed = cli_ok(&["rollback", "hostile", "--runtime", &rt.base]).await;
    assert!(
        printed.contains("rolled back hostile 0.1.0")
            && printed.contains("(replaced 0.2.0")
            && printed.contains("  subscriptions: +hostile, -hostile-v2\n"),
        "{printed}"
    );
    hostile_saw(&rt, "a2").await;
    assert_eq!(status_of(&rt, "/hostile/v2/seen").await, 404);

    let printed = cli_ok(&["undeploy", "hostile", "--runtime", &rt.base]).await;
    assert!(
        printed.contains("undeployed hostile 0.1.0 sha256:"),
        "{printed}"
    );
    assert_eq!(status_of(&rt, "/hostile/seen").await, 404);
    let services = cli_ok(&["services", "--runtime", &rt.base]).await;
    assert!(!services.contains("hostile"), "{services}");
    produce_event(&p, "hostile", "a3", "Hello", "a3", &json!({})).await;
    // Nothing to roll back to by that version; a bad request changes nothing.
    let (ok, _, stderr) = cli(&["rollback", "hostile", "9.9.9", "--runtime", &rt.base]).await;
    assert!(!ok && stderr.contains("has no version 9.9.9"), "{stderr}");
    // After an undeploy, rollback brings back the version that was stopped.
    let printed = cli_ok(&["rollback", "hostile", "--runtime", &rt.base]).await;
    assert!(printed.contains("rolled back hostile 0.1.0"), "{printed}");
    hostile_saw(&rt, "a3").await;
    // And an explicit version.
    let printed = cli_ok(&["rollback", "hostile", "0.2.0", "--runtime", &rt.base]).await;
    assert!(printed.contains("rolled back hostile 0.2.0"), "{printed}");

    let history = rt.get("/_saga/services/hostile/versions").await;
    let steps: Vec<(String, String)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["action"].as_str().unwrap().to_string(),
                d["version"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("rollback", "0.2.0"),
        ("rollback", "0.1.0"),
        ("undeploy", "0.1.0"),
        ("rollback", "0.1.0"),
        ("deploy", "0.2.0"),
        ("deploy", "0.1.0"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(a, v)| (a.to_string(), v.to_string()))
        .collect();
    assert_eq!(steps, want, "{history}");
    let listed = cli_ok(&["versions", "hostile", "--runtime", &rt.base]).await;
    assert!(listed.starts_with("* 0.2.0 "), "{listed}");
    assert!(listed.contains("by config of test-"), "{listed}");
    // Every event was handled once, by the version that consumed its topic.
    for (id, version) in [
        ("a1", "0.1.0"),
        ("b1", "0.2.0"),
        ("a2", "0.1.0"),
        ("a3", "0.1.0"),
    ] {
        let t = common::timeline(&rt, id).await;
        let applied: Vec<&str> = t
            .iter()
            .filter(|h| h.outcome == "applied")
            .map(|h| h.version.as_str())
            .collect();
        assert_eq!(applied, [version], "{id}: {t:?}");
    }
    rt.stop().await;
}

on_both_backends!(
    the_admin_api_is_off_without_a_configured_token,
    a_deployed_service_joins_a_running_saga_and_bad_components_are_refused,
    versions_change_subscriptions_and_routes_and_roll_back,
);

/// C4: a new version deployed in the middle of a stream of sagas, two instances on one
/// database, orders placed through both. No saga is lost or fails, nothing is applied twice,
/// each step is handled by exactly one version, the timelines show both versions, and every
/// saga started after both instances report the new version runs on it. Then an undeploy and a
/// rollback sent to one instance reach the other, and a saga waits across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_under_load_loses_and_repeats_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let rt = TestRuntime::start_with(Backend::Postgres, &["order", "point", "exchange"], |o| {
        o.config.admin_token = Some(TOKEN.into());
    })
    .await;
    let other = rt.sibling(|_| {}).await;
    let other_base = format!("http://{}", other.http_addr());
    const FUNDS: i64 = 1_000_000;
    rt.post("/points", json!({"userId": "load", "point": FUNDS}))
        .await;

    // Phase 0: before the deploy; 1: deploy under way; 2: both instances run 0.2.0.
    let phase = Arc::new(AtomicUsize::new(0));
    let placed_in_phase2 = Arc::new(AtomicUsize::new(0));
    let placer = {
        let (http, bases) = (rt.http.clone(), [rt.base.clone(), other_base.clone()]);
        let (phase, placed_in_phase2) = (phase.clone(), placed_in_phase2.clone());
        tokio::spawn(async move {
            let mut orders = Vec::new();
            for i in 0.. {
                let now = phase.load(Ordering::SeqCst);
                if now == 2 && placed_in_phase2.load(Ordering::SeqCst) >= 10 {
                    break;
                }
                let amount = 1 + (i % 7) as i64;
                let body = json!({"holderId": "load", "currencyId": 1, "amount": amount});
                let (status, order) =
                    common::post_json(&http, &bases[i % 2], "/orders", body).await;
                assert_eq!(status, 201, "{order}");
                orders.push((order["id"].as_str().unwrap().to_string(), amount, now));
                if now == 2 {
                    placed_in_phase2.fetch_add(1, Ordering::SeqCst);
                }
                // Pacing of the load, not synchronisation: a steady stream of sagas.
                tokio::time::sleep(std::time::Duration::from_millis(15)).await;
            }
            orders
        })
    };
    // Let some sagas finish on 0.1.0 while the stream goes on.
    eventually("three sagas to finish on 0.1.0", || async {
        let list = rt.get("/orders").await;
        let approved = list
            .as_array()
            .map(|l| l.iter().filter(|o| o["status"] == "APPROVED").count())
            .unwrap_or(0);
        if approved >= 3 {
            Ok(())
        } else {
            Err(list.to_string())
        }
    })
    .await;
    phase.store(1, Ordering::SeqCst);
    let v2 = guest_path("point_v2");
    let printed = deploy_replacing(&v2, &other_base).await;
    assert!(printed.contains("deployed point 0.2.0"), "{printed}");
    for base in [&rt.base, &other_base] {
        eventually("both instances to run point 0.2.0", || async {
            let listed = cli_ok(&["services", "--runtime", base]).await;
            match listed
                .lines()
                .any(|l| l.starts_with("point") && l.contains(" 0.2.0 "))
            {
                true => Ok(()),
                false => Err(listed),
            }
        })
        .await;
    }
    phase.store(2, Ordering::SeqCst);
    let orders = placer.await.unwrap();

    let mut versions_seen = std::collections::BTreeSet::new();
    for (id, _, placed_in) in &orders {
        order_status(&rt, id, "APPROVED").await;
        let t = common::timeline_has(&rt, id, &[("point", "ExchangeSucceeded", "applied")]).await;
        let mut steps = std::collections::BTreeMap::new();
        for h in &t {
            assert!(
                h.outcome == "applied" || h.outcome == "duplicate",
                "saga {id}: {h:?}"
            );
            if h.outcome == "applied" {
                *steps.entry((&h.service, &h.event_type)).or_insert(0) += 1;
            }
        }
        assert!(
            steps.values().all(|n| *n == 1),
            "saga {id} applied a step twice: {t:?}"
        );
        let point: Vec<&str> = t
            .iter()
            .filter(|h| h.service == "point" && h.outcome == "applied")
            .map(|h| h.version.as_str())
            .collect();
        if *placed_in == 2 {
            assert!(point.iter().all(|v| *v == "0.2.0"), "saga {id}: {t:?}");
        }
        versions_seen.extend(point.into_iter().map(str::to_string));
    }
    assert_eq!(
        versions_seen.into_iter().collect::<Vec<_>>(),
        ["0.1.0", "0.2.0"],
        "the stream spanned the swap"
    );
    let spent: i64 = orders.iter().map(|(_, amount, _)| amount).sum();
    assert_eq!(rt.get("/points/load").await["point"], FUNDS - spent);
    for stats in [
        rt.get("/_saga/stats").await,
        common::get_json(&rt.http, &other_base, "/_saga/stats").await,
    ] {
        assert_eq!(stats["failures"], 0, "{stats}");
        assert_eq!(stats["dead_lettered"], 0, "{stats}");
    }

    // Undeploy through one instance stops exchange on both; a saga placed meanwhile waits on
    // the topic and finishes after a rollback sent to the other instance.
    let printed = cli_ok(&["undeploy", "exchange", "--runtime", &rt.base]).await;
    assert!(printed.contains("undeployed exchange 0.1.0"), "{printed}");
    eventually("the other instance to stop exchange", || async {
        let listed = cli_ok(&["services", "--runtime", &other_base]).await;
        match listed.contains("exchange") {
            false => Ok(()),
            true => Err(listed),
        }
    })
    .await;
    let (_, order) = rt
        .post(
            "/orders",
            json!({"holderId": "load", "currencyId": 1, "amount": 1}),
        )
        .await;
    let id = order["id"].as_str().unwrap().to_string();
    let printed = cli_ok(&["rollback", "exchange", "--runtime", &other_base]).await;
    assert!(printed.contains("rolled back exchange 0.1.0"), "{printed}");
    order_status(&rt, &id, "APPROVED").await;
    other.shutdown().await;
    rt.stop().await;
}

/// The guarded deploy: `runtime deploy --verify` replays the events the active version handled
/// (recorded in the database, so also after a restart) through the new version in the sandbox
/// and prints where the effects differ; a version that differs is not deployed without
/// `--yes`, and nothing replayed touches state or Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_verify_replays_recent_events_and_shows_what_differs() {
    let rt = TestRuntime::start_with(Backend::Sqlite, &["order", "point", "exchange"], |o| {
        o.config.admin_token = Some(TOKEN.into());
    })
    .await;
    rt.post("/points", json!({"userId": "vera", "point": 1000}))
        .await;
    for amount in [10, 20, 30] {
        let (_, order) = rt
            .post(
                "/orders",
                json!({"holderId": "vera", "currencyId": 1, "amount": amount}),
            )
            .await;
        let id = order["id"].as_str().unwrap();
        order_status(&rt, id, "APPROVED").await;
        // The saga's last event: exchange sees the approval. After it nothing moves.
        common::timeline_has(&rt, id, &[("exchange", "OrderApproved", "*")]).await;
    }
    // Recordings are kept in the database: a restarted instance still replays them.
    let rt = rt.restart(|_| {}).await;
    let before = (
        rt.get("/points/vera").await,
        rt.get("/transactions").await,
        rt.get("/_saga/stats").await["published"].clone(),
    );

    // The same build replays identically.
    let resp = rt
        .http
        .post(format!("{}/_saga/admin/verify", rt.base))
        .bearer_auth(TOKEN)
        .body(guest("point"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: Value = resp.json().await.unwrap();
    assert!(report["replayed"].as_u64().unwrap() >= 3, "{report}");
    assert_eq!(report["same"], report["replayed"], "{report}");

    // 0.2.0 stamps its transactions: every deduction differs, so it is not deployed.
    let v2 = guest_path("point_v2");
    let (ok, printed, stderr) = cli(&[
        "deploy",
        "--verify",
        v2.to_str().unwrap(),
        "--runtime",
        &rt.base,
    ])
    .await;
    assert!(!ok, "{printed}");
    assert!(stderr.contains("not deployed"), "{stderr}");
    assert!(
        printed.contains("verify point 0.2.0 against active 0.1.0")
            && printed.contains("ExchangeSucceeded")
            && printed.contains("differs")
            && printed.contains("- put ")
            && printed.contains("+ put ")
            && printed.contains(r#""handledBy":"point 0.2.0""#)
            && printed.contains("+ emit point PointUsed"),
        "{printed}"
    );
    let services = cli_ok(&["services", "--runtime", &rt.base]).await;
    assert!(
        services
            .lines()
            .any(|l| l.starts_with("point") && l.contains(" 0.1.0 ")),
        "{services}"
    );
    let after = (
        rt.get("/points/vera").await,
        rt.get("/transactions").await,
        rt.get("/_saga/stats").await["published"].clone(),
    );
    assert_eq!(before, after, "replaying wrote nothing and sent nothing");

    // Accepting the differences deploys it, and the next saga shows them.
    let printed = cli_ok(&[
        "deploy",
        "--verify",
        "--yes",
        "--replace",
        v2.to_str().unwrap(),
        "--runtime",
        &rt.base,
    ])
    .await;
    assert!(printed.contains("deployed point 0.2.0"), "{printed}");
    let (_, order) = rt
        .post(
            "/orders",
            json!({"holderId": "vera", "currencyId": 1, "amount": 5}),
        )
        .await;
    let id = order["id"].as_str().unwrap();
    order_status(&rt, id, "APPROVED").await;
    let transactions = rt.get("/transactions").await;
    let stamped = transactions
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["handledBy"] == "point 0.2.0")
        .count();
    assert_eq!(stamped, 1, "{transactions}");
    rt.stop().await;
}

/// Start-up applies the stored deployment history before anything consumes: an instance
/// restarted with point 0.1.0 in its configuration, after 0.2.0 was deployed, runs 0.2.0
/// from its first moment (it used to consume on 0.1.0 until `follow` caught up).
async fn a_restart_runs_the_deployed_version_not_the_configured_one(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["point"], |o| {
        o.config.admin_token = Some(TOKEN.into());
    })
    .await;
    let (status, reply) = rt.deploy(Some(TOKEN), guest("point_v2")).await;
    assert_eq!(status, 200, "{reply}");
    let rt = rt.restart(|_| {}).await;
    let services = rt.get("/_saga/services").await;
    assert_eq!(services[0]["service"], "point", "{services}");
    assert_eq!(services[0]["version"], "0.2.0", "{services}");
    rt.stop().await;
}

/// A component cannot take over a deployed service's name by accident: without `--replace`
/// the deploy is refused with the reason and the running version stays; with it, it swaps.
async fn deploying_over_a_deployed_service_needs_replace(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["point"], |o| {
        o.config.admin_token = Some(TOKEN.into());
    })
    .await;
    let v2 = guest_path("point_v2");
    let (ok, printed, stderr) = cli(&["deploy", v2.to_str().unwrap(), "--runtime", &rt.base]).await;
    assert!(!ok, "{printed}");
    assert!(
        stderr.contains("already deployed") && stderr.contains("--replace"),
        "{stderr}"
    );
    assert_eq!(rt.get("/_saga/services").await[0]["version"], "0.1.0");
    let printed = deploy_replacing(&v2, &rt.base).await;
    assert!(printed.contains("deployed point 0.2.0"), "{printed}");
    rt.stop().await;
}

on_both_backends!(
    a_restart_runs_the_deployed_version_not_the_configured_one,
    deploying_over_a_deployed_service_needs_replace,
);
