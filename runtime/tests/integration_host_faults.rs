//! Host faults are not handler faults, and guests reach only what is theirs (issue 11, items 3
//! and 4): a state read the database refuses or a sandbox with every instance busy is retried
//! without counting an attempt and never dead-letters; a guest cannot emit onto host topics,
//! touch another saga's deadlines or return effects over a limit; a component that declares a
//! host topic is refused at deploy.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use common::{
    consume_n, eventually, guest, header, hostile_outcome, produce_event, Backend, TestRuntime,
};
use saga_runtime::kafka::dead_letter::headers as dlt_headers;
use saga_runtime::storage::outbox;
use saga_runtime::wasm::{StateReader, Versioned};
use serde_json::json;

/// Fails the next `left` state reads of `service`, as a database that blinks would.
struct Blinking {
    inner: Arc<dyn StateReader>,
    service: &'static str,
    left: Arc<AtomicU32>,
}

impl Blinking {
    fn fail(&self, service: &str) -> bool {
        service == self.service
            && self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    }
}

#[async_trait::async_trait]
impl StateReader for Blinking {
    async fn get(&self, service: &str, key: &str) -> Result<Versioned, String> {
        if self.fail(service) {
            return Err("connection reset by peer (injected)".into());
        }
        self.inner.get(service, key).await
    }
    async fn scan(
        &self,
        service: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, Versioned)>, String> {
        if self.fail(service) {
            return Err("connection reset by peer (injected)".into());
        }
        self.inner.scan(service, prefix, after, limit).await
    }
}

/// Once the user is seeded, the point service's next 12 state reads fail. Its subscription
/// dead-letters after 3 handler attempts, so counting host faults as attempts dead-lettered
/// the step (and stranded the saga) before.
async fn a_state_read_that_fails_is_retried_without_counting_an_attempt(backend: Backend) {
    let left = Arc::new(AtomicU32::new(0));
    let armed = left.clone();
    let rt = TestRuntime::start_with(backend, &["order", "point", "exchange"], |o| {
        o.wrap_reader = Box::new(move |inner| {
            Arc::new(Blinking {
                inner,
                service: "point",
                left: armed,
            })
        });
    })
    .await;
    let (status, _) = rt
        .post("/points", json!({"userId": "u", "point": 10000}))
        .await;
    assert_eq!(status, 200);
    left.store(1, Ordering::SeqCst);
    let (status, reply) = rt.get_status("/points/u").await;
    assert_eq!(
        status, 503,
        "a query whose read fails is a retryable 503: {reply}"
    );
    left.store(12, Ordering::SeqCst);
    let (status, order) = rt
        .post(
            "/orders",
            json!({"holderId": "u", "currencyId": 1, "amount": 500}),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    let id = order["id"].as_str().unwrap();
    common::order_status(&rt, id, "APPROVED").await;
    assert_eq!(rt.get("/points/u").await["point"], 9500);
    assert_eq!(
        left.load(Ordering::SeqCst),
        0,
        "every injected fault was hit"
    );
    let stats = rt.handle.stats();
    assert!(stats.host_faults.load(Ordering::Relaxed) > 0);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 0);
    assert_eq!(
        stats.failures.load(Ordering::Relaxed),
        0,
        "no handler attempt failed"
    );
    rt.stop().await;
}

/// With two guest instances and forty concurrent requests, requests wait for an instance:
/// none fails (the old runtime answered `500 … maximum concurrent limit … reached`).
async fn more_concurrent_calls_than_instances_wait_instead_of_failing(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["point"], |o| {
        o.config.sandbox.max_instances = 2;
    })
    .await;
    let calls = (0..40).map(|i| {
        let (http, base) = (rt.http.clone(), rt.base.clone());
        async move {
            let body = json!({"userId": format!("u{i}"), "point": i});
            common::post_json(&http, &base, "/points", body).await
        }
    });
    let answers = futures::future::join_all(calls).await;
    let failed: Vec<_> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(rt.get("/points/u39").await["point"], 39);
    rt.stop().await;
}

/// Each forgery is rejected with the reason (dead-lettered at once, nothing of it in the
/// outbox or the deadline table), and a well-behaved event behind them is applied.
async fn a_guest_cannot_forge_host_topics_other_sagas_or_huge_effects(backend: Backend) {
    let rt = TestRuntime::start(backend, &["hostile"]).await;
    let p = rt.prefix().to_string();
    let cases = [
        ("forge-deadline", "ForgeDeadline", "only the host writes"),
        ("forge-dlt", "ForgeDeadLetter", "only the host writes"),
        ("other-saga", "OtherSaga", "someone-elses-saga"),
        ("forever", "Forever", "limits.deadline_after_ms"),
        ("flood", "Flood", "limits.writes_per_effect"),
        ("giant", "Giant", "limits.event_data_bytes"),
    ];
    for (id, kind, _) in cases {
        produce_event(&p, "hostile", id, kind, &format!("saga-{id}"), &json!({})).await;
    }
    produce_event(&p, "hostile", "fine", "Fine", "saga-fine", &json!({})).await;
    for (id, _, why) in cases {
        let (outcome, detail) = hostile_outcome(&rt, id).await;
        assert_eq!(outcome, "dead-lettered", "{id}: {detail}");
        assert!(detail.contains(why), "{id}: {detail}");
    }
    assert_eq!(hostile_outcome(&rt, "fine").await.0, "applied");
    let dead = consume_n(&p, "hostile.dlt", cases.len()).await;
    assert!(dead
        .iter()
        .all(|m| header(m, dlt_headers::ATTEMPTS).as_deref() == Some("1")));
    let deadlines = rt.get("/deadlines").await;
    assert_eq!(deadlines, json!([]), "no deadline was set");
    eventually("the outbox to drain (dead letters only)", || async {
        match outbox::len(rt.handle.db()).await.unwrap() {
            0 => Ok(()),
            n => Err(format!("{n} rows")),
        }
    })
    .await;
    rt.stop().await;
}

/// A component whose manifest publishes onto a host topic is refused at deploy, with the
/// reason, and nothing of it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_declares_a_host_topic_is_refused_at_deploy() {
    let rt = TestRuntime::start(Backend::Sqlite, &[]).await;
    let refused = match rt.handle.install(guest("hostile_forger")).await {
        Ok(_) => panic!("a component publishing to order.deadline was deployed"),
        Err(e) => e.to_string(),
    };
    assert!(refused.contains("order.deadline"), "{refused}");
    assert!(refused.contains("only the host writes"), "{refused}");
    assert!(rt
        .get("/_saga/services")
        .await
        .as_array()
        .unwrap()
        .is_empty());
    rt.stop().await;
}

on_both_backends!(
    a_state_read_that_fails_is_retried_without_counting_an_attempt,
    more_concurrent_calls_than_instances_wait_instead_of_failing,
    a_guest_cannot_forge_host_topics_other_sagas_or_huge_effects,
);
