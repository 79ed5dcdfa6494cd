//! SPEC C3 (first slice): `runtime deploy` to a running runtime through the token-gated admin
//! API. A component is validated before it runs; a bad one is refused with the reason and the
//! running services go on; a new service joins a saga in flight; a running one is swapped.

mod common;

use common::{eventually, guest, guest_path, Backend, TestRuntime};
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
    let approved = |id: String| {
        let rt = &rt;
        async move {
            eventually("the order to be approved", || async {
                let order = rt.get(&format!("/orders/{id}")).await;
                if order["status"] == "APPROVED" {
                    Ok(())
                } else {
                    Err(order.to_string())
                }
            })
            .await
        }
    };
    approved(id).await;
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
    approved(order["id"].as_str().unwrap().to_string()).await;
    assert_eq!(rt.get("/points/ivy").await["point"], 9400);
    rt.stop().await;
}

on_both_backends!(
    the_admin_api_is_off_without_a_configured_token,
    a_deployed_service_joins_a_running_saga_and_bad_components_are_refused,
);
