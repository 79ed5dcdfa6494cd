//! SPEC C3 (first slice): `runtime deploy` to a running runtime through the token-gated admin
//! API. A component is validated before it runs; a bad one is refused with the reason and the
//! running services go on; a new service joins a saga in flight; a running one is swapped.

mod common;

use common::{eventually, guest, guest_path, order_status, Backend, TestRuntime};
use serde_json::{json, Value};

const TOKEN: &str = "t0k-for-tests";

async fn post_wasm(rt: &TestRuntime, token: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req = rt
        .http
        .post(format!("{}/_saga/admin/deploy", rt.base))
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn the_admin_api_is_off_without_a_configured_token(backend: Backend) {
    let rt = TestRuntime::start(backend, &["point"]).await;
    let (status, body) = post_wasm(&rt, Some("anything"), guest("exchange")).await;
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
        let (status, body) = post_wasm(&rt, token, guest("exchange")).await;
        assert_eq!(status, 401, "{token:?}: {body}");
    }
    let (status, body) = post_wasm(&rt, Some(TOKEN), b"not a component".to_vec()).await;
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
        .arg("deploy")
        .arg(guest_path("exchange"))
        .args(["--runtime", &rt.base, "--token", TOKEN])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{printed}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("deployed exchange 0.1.0 sha256:") && printed.contains("(new service)"),
        "{printed}"
    );
    order_status(&rt, &id, "APPROVED").await;
    assert_eq!(rt.get("/points/ivy").await["point"], 9500);

    // Deploying a running service swaps it in place; sagas go on.
    let (status, body) = post_wasm(&rt, Some(TOKEN), guest("point")).await;
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
    let runtime = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = runtime(&["services", "--runtime", &other_base]);
    assert!(!before.contains("exchange"), "{before}");

    let (status, body) = post_wasm(&rt, Some(TOKEN), guest("exchange")).await;
    assert_eq!(status, 200, "{body}");
    let digest = body["digest"].as_str().unwrap().to_string();
    eventually("the other instance to run exchange", || async {
        let listed = runtime(&["services", "--runtime", &other_base]);
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
    let versions = runtime(&["versions", "exchange", "--runtime", &other_base]);
    assert!(
        versions.starts_with(&format!("* 0.1.0      sha256:{digest}"))
            && versions.contains("by admin API"),
        "{versions}"
    );
    other.shutdown().await;
    rt.stop().await;
}

on_both_backends!(
    the_admin_api_is_off_without_a_configured_token,
    a_deployed_service_joins_a_running_saga_and_bad_components_are_refused,
);
