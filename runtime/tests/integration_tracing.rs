//! Issue 13, item 2: one saga is one trace. A compensated saga of the outbox example (shop on
//! one instance, payment and stock on another, PostgreSQL, the broker) started by a request that
//! carries a W3C `traceparent` yields spans, exported over OTLP to an in-process collector,
//! that all belong to the caller's trace and hang together: every span's parent is the
//! caller's span or another span of the trace. The Kafka records carry the context as the
//! CloudEvents tracing extension (`ce_traceparent`).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::instances::Instance;
use common::shop::Shop;
use common::{Backend, TestDb};
use fake_opentelemetry_collector::{ExportedSpan, FakeCollectorServer};

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER: &str = "b7ad6b7169203331";

/// Spans of `TRACE` whose parent is neither the caller nor a span of the trace.
fn orphans(spans: &[ExportedSpan]) -> Vec<String> {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    spans
        .iter()
        .filter(|s| s.parent_span_id != CALLER && !ids.contains(s.parent_span_id.as_str()))
        .map(|s| format!("{} (parent {})", s.name, s.parent_span_id))
        .collect()
}

/// An attribute's value; the collector renders them as `Some(AnyValue { value:
/// Some(StringValue("x")) })`.
fn attr<'a>(span: &'a ExportedSpan, key: &str) -> &'a str {
    let rendered = span.attributes.get(key).map_or("", String::as_str);
    let inner = rendered
        .split_once("Value(")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map_or("", |(value, _)| value);
    inner.trim_matches('"')
}

/// Whether `service` committed a compensation among `spans` (its `commit` span, whose parent
/// is the service's `consume` span).
fn compensated_at(spans: &[ExportedSpan], service: &str) -> bool {
    spans.iter().any(|s| {
        s.name == "commit"
            && attr(s, "saga.outcome") == "compensated"
            && spans
                .iter()
                .any(|p| p.span_id == s.parent_span_id && attr(p, "saga.service") == service)
    })
}

/// The spans of `trace` exported so far, once `done` holds for them and none lacks its parent
/// (panics after 30 s with what arrived).
async fn whole_trace(
    collector: &mut FakeCollectorServer,
    trace: &str,
    done: impl Fn(&[ExportedSpan]) -> bool,
) -> Vec<ExportedSpan> {
    let mut spans: Vec<ExportedSpan> = Vec::new();
    let started = Instant::now();
    loop {
        let more = collector
            .exported_spans(1, Duration::from_millis(200))
            .await;
        spans.extend(more.into_iter().filter(|s| s.trace_id == trace));
        if done(&spans) && orphans(&spans).is_empty() {
            return spans;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no whole trace after 30 s: done {}, orphans {:?}, spans {:#?}",
            done(&spans),
            orphans(&spans),
            spans
                .iter()
                .map(|s| format!("{} {:?}", s.name, s.attributes))
                .collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensated_saga_across_three_services_and_two_instances_is_one_connected_trace() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    // Export every 100 ms instead of every 5 s (the SDK's standard variable, inherited).
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::instances::config_file(
        dir.path(),
        &format!(
            "[worker]\nretry_backoff_ms = 10\nmax_backoff_ms = 100\n\
             [relay]\npoll_interval_ms = 50\n\
             [telemetry]\notlp_endpoint = {:?}\n",
            collector.endpoint()
        ),
    );
    let prefix = format!("tr{}.", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let front = Instance::start("front", &db.url, &prefix, &config, &["shop"]);
    let back = Instance::start("back", &db.url, &prefix, &config, &["payment", "stock"]);
    let http = common::http_client();
    let (shop, steps) = (
        Shop {
            base: &front.base,
            http: &http,
        },
        Shop {
            base: &back.base,
            http: &http,
        },
    );
    steps.fund("dave", 100).await;
    steps.stock("kettle", 10).await;

    // Too dear for dave: payment rejects it, the shop fails the order and the reservation is
    // compensated.
    let placed = http
        .post(format!("{}/shop/orders", front.base))
        .header("traceparent", format!("00-{TRACE}-{CALLER}-01"))
        .json(&serde_json::json!({
            "customerId": "dave", "productId": "kettle", "quantity": 1, "amount": 300
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 201);
    let order: serde_json::Value = placed.json().await.unwrap();
    let id = order["id"].as_str().unwrap().to_string();
    assert_eq!(shop.settled(&id).await["status"], "FAILED");
    common::eventually("the reservation to be compensated", || async {
        match steps.record("/reservations", &id).await {
            Some(r) if r["status"] == "COMPENSATED" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Wait for the trace to be whole: the stock service's compensation committed, and every
    // span's parent exported.
    let spans = whole_trace(&mut collector, TRACE, |spans| {
        compensated_at(spans, "stock")
    })
    .await;

    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for name in [
        "ingress",
        "consume",
        "guest call",
        "commit",
        "relay publish",
    ] {
        assert!(names.contains(name), "no {name} span in {names:?}");
    }
    let consumed: HashMap<&str, Vec<&ExportedSpan>> = spans
        .iter()
        .filter(|s| s.name == "consume")
        .fold(HashMap::new(), |mut by, s| {
            by.entry(attr(s, "saga.service")).or_default().push(s);
            by
        });
    for service in ["shop", "payment", "stock"] {
        let Some(of) = consumed.get(service) else {
            panic!("no consume span of {service}: {:?}", consumed.keys());
        };
        for s in of {
            assert_eq!(attr(s, "saga.id"), id, "{service}: {:?}", s.attributes);
            assert!(!attr(s, "cloudevents.event_id").is_empty());
            assert!(!attr(s, "saga.version").is_empty());
            assert_eq!(attr(s, "trace_id"), TRACE, "the log lines' trace id");
        }
    }
    let ingress = spans.iter().find(|s| s.name == "ingress").unwrap();
    assert_eq!(
        ingress.parent_span_id, CALLER,
        "the caller's span is the root"
    );
    assert_eq!(attr(ingress, "url.path"), "/shop/orders");
    assert_eq!(attr(ingress, "saga.service"), "shop");
    assert_eq!(
        attr(ingress, "saga.id"),
        id,
        "the order's id is the request's new-id"
    );

    // On the wire: the extension attribute, in the saga's trace.
    let records = common::consume_n(&prefix, "stock", 1).await;
    let traceparent = common::header(&records[0], "ce_traceparent").expect("ce_traceparent");
    assert!(
        traceparent.starts_with(&format!("00-{TRACE}-")),
        "{traceparent}"
    );
    drop(front);
    drop(back);
    db.drop_db().await;
}

/// A deadline continues the trace of the span that set it: the order service sets one when
/// the order is placed, no point service answers, the deadline fires, the order is rejected
/// and the exchange compensated, all in the caller's trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fired_deadline_and_its_compensation_stay_in_the_trace_that_set_it() {
    const ORDER_TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4736";
    let mut collector = FakeCollectorServer::start().await.unwrap();
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::instances::config_file(
        dir.path(),
        &format!(
            "[saga_deadlines]\norder = 800\n\
             [relay]\npoll_interval_ms = 50\n\
             [telemetry]\notlp_endpoint = {:?}\n",
            collector.endpoint()
        ),
    );
    let prefix = format!("td{}.", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let rt = Instance::start("solo", &db.url, &prefix, &config, &["order", "exchange"]);
    let http = common::http_client();
    let placed = http
        .post(format!("{}/orders", rt.base))
        .header("traceparent", format!("00-{ORDER_TRACE}-{CALLER}-01"))
        .json(&serde_json::json!({"holderId": "erin", "currencyId": 1, "amount": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), 201);
    let spans = whole_trace(&mut collector, ORDER_TRACE, |spans| {
        compensated_at(spans, "exchange")
    })
    .await;
    let fired = spans
        .iter()
        .find(|s| s.name == "deadline fired")
        .expect("a deadline fired span in the trace");
    assert_eq!(attr(fired, "saga.deadline"), "approval");
    let expired = spans
        .iter()
        .find(|s| s.name == "consume" && attr(s, "cloudevents.event_type") == "DeadlineExpired")
        .expect("the order service's DeadlineExpired in the trace");
    assert_eq!(attr(expired, "saga.service"), "order");
    drop(rt);
    db.drop_db().await;
}
