//! Nothing a client sends can stop the runtime (issue 11, items 1–2): requests over a limit get
//! `413`/`422` naming it, effects over a limit never reach the outbox, a consumed event the
//! database refuses is set aside, and an outbox row the broker refuses is parked while the
//! rows behind it flow. Each test places a normal order afterwards and waits for it to be
//! approved: the old runtime stopped every saga after one such input.

mod common;

use common::{consume_n, header, order_status, produce_raw, run_cli, Backend, TestRuntime};
use saga_runtime::kafka::dead_letter::headers as dlt_headers;
use saga_runtime::storage::outbox;
use serde_json::{json, Value};

const SERVICES: &[&str] = &["order", "point", "exchange"];

/// Seed a user and place an order; wait until it is approved.
async fn an_order_is_still_approved(rt: &TestRuntime, user: &str) {
    let (status, _) = rt
        .post("/points", json!({"userId": user, "point": 10000}))
        .await;
    assert_eq!(status, 200);
    let (status, order) = rt
        .post(
            "/orders",
            json!({"holderId": user, "currencyId": 1, "amount": 500}),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    order_status(rt, order["id"].as_str().unwrap(), "APPROVED").await;
}

/// `POST` a body as is: the status, the headers and the JSON reply (`null` if none).
async fn post_raw(
    rt: &TestRuntime,
    path: &str,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = rt
        .http
        .post(format!("{}{path}", rt.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

/// The outage of issue 11: a 1.5 MB `holderId` was accepted and then stopped the relay for
/// every service. Now the request is refused at the door and nothing else notices.
async fn an_oversized_request_is_refused_with_413_and_sagas_keep_going(backend: Backend) {
    let rt = TestRuntime::start(backend, SERVICES).await;
    let body = json!({"holderId": "h".repeat(1_500_000), "currencyId": 1, "amount": 500});
    let (status, headers, reply) =
        post_raw(&rt, "/orders", serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(status, 413, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("limits.request_body_bytes"), "{error}");
    // The body was left unread: the client must not send another request on this connection
    // (the next one, pooled onto it, sometimes met a broken pipe).
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    assert_eq!(outbox::len(rt.handle.db()).await.unwrap(), 0);
    an_order_is_still_approved(&rt, "after-413").await;
    rt.stop().await;
}

/// A request within the body limit whose handler emits an event over the event limit: `422`
/// naming that limit, and nothing of it stored.
async fn effects_over_a_limit_get_422_and_reach_no_outbox(backend: Backend) {
    let rt = TestRuntime::start_with(backend, SERVICES, |o| {
        o.config.limits.event_data_bytes = 64 << 10;
    })
    .await;
    rt.post("/points", json!({"userId": "big", "point": 10000}))
        .await;
    let holder = "b".repeat(100_000);
    let (status, reply) = rt
        .post(
            "/orders",
            json!({"holderId": holder, "currencyId": 1, "amount": 500}),
        )
        .await;
    assert_eq!(status, 422, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("limits.event_data_bytes"), "{error}");
    assert_eq!(outbox::len(rt.handle.db()).await.unwrap(), 0);
    assert_eq!(rt.get("/orders").await, json!([]), "no order was stored");
    an_order_is_still_approved(&rt, "after-422").await;
    rt.stop().await;
}

/// A record whose saga id holds a NUL (PostgreSQL refuses it in any text column) is
/// dead-lettered as malformed, naming the limit; the partition moves on.
async fn an_event_with_a_nul_in_its_saga_id_is_dead_lettered_and_the_rest_flows(backend: Backend) {
    let rt = TestRuntime::start(backend, SERVICES).await;
    let p = rt.prefix().to_string();
    produce_raw(
        &p,
        "order",
        "evil",
        &[
            ("ce_specversion", "1.0"),
            ("ce_id", "nul-subject"),
            ("ce_type", "OrderCreated"),
            ("ce_source", "/test"),
            ("ce_subject", "sa\0ga"),
            ("content-type", "application/json"),
        ],
        b"{}",
    )
    .await;
    let dead = consume_n(&p, "order.dlt", 1).await;
    let reason = header(&dead[0], dlt_headers::REASON).unwrap();
    assert!(reason.contains("control character"), "{reason}");
    an_order_is_still_approved(&rt, "after-nul").await;
    rt.stop().await;
}

/// The safety net behind the limits: with the id limit raised far past what PostgreSQL can
/// index, an event whose saga id the database refuses is set aside as a dead letter with the
/// database's reason, instead of failing its batch for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_database_refuses_is_set_aside_and_the_rest_flows() {
    let rt = TestRuntime::start_with(Backend::Postgres, SERVICES, |o| {
        o.config.limits.id_bytes = 64 << 10;
        o.config.limits.event_headers_bytes = 64 << 10;
        o.config.limits.broker_message_bytes = 4 << 20;
    })
    .await;
    let p = rt.prefix().to_string();
    // Random hex does not compress below PostgreSQL's index row limit (~2.7 KB).
    let subject: String = (0..500)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    produce_raw(
        &p,
        "order",
        "long",
        &[
            ("ce_specversion", "1.0"),
            ("ce_id", "long-subject"),
            ("ce_type", "OrderCreated"),
            ("ce_source", "/test"),
            ("ce_subject", &subject),
            ("content-type", "application/json"),
        ],
        br#"{"id":"x","holderId":"nobody","currencyId":1,"amount":1}"#,
    )
    .await;
    let dead = consume_n(&p, "order.dlt", 1).await;
    let reason = header(&dead[0], dlt_headers::REASON).unwrap();
    assert!(reason.contains("database refused"), "{reason}");
    assert!(
        rt.handle
            .stats()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    an_order_is_still_approved(&rt, "after-refusal").await;
    rt.stop().await;
}

/// An outbox row larger than the broker takes (written before a limit was lowered, or by a
/// broker with a smaller limit than configured) is parked with the reason, listed by
/// `runtime outbox parked`, and the rows behind it are published. A re-drive puts it back.
async fn an_outbox_row_the_broker_refuses_is_parked_and_the_rest_flows(backend: Backend) {
    let token = "limits-token";
    let rt = TestRuntime::start_with(backend, SERVICES, |o| {
        o.config.admin_token = Some(token.into());
    })
    .await;
    let message = outbox::Message {
        event_id: "too-big".into(),
        topic: format!("{}order", rt.prefix()),
        key: "too-big".into(),
        headers: vec![("ce_id".into(), "too-big".into())],
        payload: vec![b'x'; 1_500_000],
    };
    let mut conn = rt.handle.db().pool().acquire().await.unwrap();
    outbox::insert(&mut conn, &message, 0).await.unwrap();
    drop(conn);
    an_order_is_still_approved(&rt, "behind-a-parked-row").await;

    let parked = rt.get("/_saga/outbox/parked").await;
    let rows = parked["parked"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{parked}");
    assert_eq!(rows[0]["eventId"], "too-big");
    let reason = rows[0]["reason"].as_str().unwrap();
    assert!(reason.contains("limits.broker_message_bytes"), "{reason}");

    let url = rt.base.clone();
    let env = [("SAGA_RUNTIME_URL", url.as_str())];
    let (ok, out, err) = run_cli(&["outbox", "parked"], &env).await;
    assert!(ok, "{err}");
    assert!(out.contains("too-big"), "{out}");
    let (ok, out, err) = run_cli(
        &[
            "outbox",
            "redrive",
            "--all",
            "--token",
            token,
            "--runtime",
            &url,
        ],
        &[],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("1 row(s)"), "{out}");
    // Still too large: the relay parks it again, under a new id.
    common::eventually("the re-driven row to be parked again", || async {
        let parked = rt.get("/_saga/outbox/parked").await;
        match parked["parked"].as_array().map(|r| r.len()) {
            Some(1) if parked["parked"][0]["id"] != rows[0]["id"] => Ok(()),
            _ => Err(parked.to_string()),
        }
    })
    .await;
    rt.stop().await;
}

/// The admin API checks its token before it reads a body: a caller without the token who
/// announces 50 MB and sends a few bytes is answered `401` at once, not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_a_wrong_token_before_reading_the_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = TestRuntime::start_with(Backend::Sqlite, &[], |o| {
        o.config.admin_token = Some("right".into());
    })
    .await;
    let mut conn = tokio::net::TcpStream::connect(rt.handle.http_addr())
        .await
        .unwrap();
    let head = "POST /_saga/admin/deploy HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong\r\n\
                content-length: 52428800\r\n\r\n";
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&[0u8; 1024]).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut answer))
        .await
        .expect("no answer while the body was still being sent")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // The body is left unread: the connection carries no other request.
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer}"
    );
    rt.stop().await;
}

on_both_backends!(
    an_oversized_request_is_refused_with_413_and_sagas_keep_going,
    effects_over_a_limit_get_422_and_reach_no_outbox,
    an_event_with_a_nul_in_its_saga_id_is_dead_lettered_and_the_rest_flows,
    an_outbox_row_the_broker_refuses_is_parked_and_the_rest_flows,
);
