//! Issue 13, item 1: `GET /metrics` on a running runtime. After a saga (shop → payment +
//! stock) the counters, histograms and gauges it should move have moved, and the exposition
//! passes `promtool check metrics` (Debian's `prometheus` package; `scripts/test.sh` installs
//! it).

mod common;

use std::io::Write as _;

use common::shop::{Shop, SERVICES};
use common::{eventually, Backend, TestRuntime};

async fn scrape(rt: &TestRuntime) -> String {
    let resp = rt
        .http
        .get(format!("{}/metrics", rt.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    resp.text().await.unwrap()
}

/// The value of the first sample whose line starts with `series` (name and labels as
/// written, up to the value), if any.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (apt-get install prometheus; scripts/test.sh does)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_moves_the_metrics_and_the_exposition_is_valid() {
    let rt = TestRuntime::start(Backend::Sqlite, SERVICES).await;
    let before = scrape(&rt).await;
    let applied = r#"saga_events_total{outcome="applied"}"#;
    let applied_before = sample(&before, applied).unwrap_or(0.0);

    let shop = Shop::of(&rt);
    shop.fund("metered", 1_000).await;
    shop.stock("gauge", 10).await;
    let id = shop.order("metered", "gauge", 1, 100).await;
    eventually("the order to succeed", || async {
        let order = shop.get(&format!("/shop/orders/{id}")).await;
        if order["status"] == "SUCCESS" {
            Ok(())
        } else {
            Err(order.to_string())
        }
    })
    .await;

    // The relay's counters are read at scrape time; the consumer lag gauges are set by the
    // ownership tick: wait until both show.
    let after = eventually("the saga's metrics", || async {
        let text = scrape(&rt).await;
        let lag = text.contains(
            r#"saga_consumer_lag_records{service="payment",topic="payment",partition="0"}"#,
        );
        let relayed = sample(&text, "saga_relay_transactions_total").unwrap_or(0.0) > 0.0;
        if lag && relayed {
            Ok(text)
        } else {
            Err(format!("lag gauge {lag}, relayed {relayed}"))
        }
    })
    .await;
    assert!(
        sample(&after, applied).unwrap() >= applied_before + 3.0,
        "the order, payment and stock steps at least:\n{after}"
    );
    let handled = sample(
        &after,
        r#"saga_handler_duration_seconds_count{service="payment",version="#,
    );
    assert!(handled.is_some(), "{after}");
    let paid = after
        .lines()
        .filter(|l| l.starts_with("saga_handler_duration_seconds_count{service=\"payment\""))
        .filter(|l| l.contains("outcome=\"applied\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(paid >= 1.0, "payment's applied handler durations:\n{after}");
    assert!(sample(&after, "saga_relay_transaction_rows_count").unwrap() >= 1.0);
    // Rows relayed are timed from their commit, events taken from their emission.
    let delayed = sample(&after, "saga_relay_delay_seconds_count");
    assert!(delayed.unwrap_or(0.0) >= 1.0, "{after}");
    let delivered = sample(
        &after,
        r#"saga_event_delivery_seconds_count{service="payment"}"#,
    );
    assert!(delivered.unwrap_or(0.0) >= 1.0, "{after}");
    assert!(sample(&after, "saga_guest_instance_wait_seconds_count").unwrap() >= 3.0);
    assert!(
        sample(&after, "saga_ingress_wait_seconds_count").unwrap() >= 3.0,
        "the fund, stock and order requests waited for their turns (if only 0 s)"
    );
    assert_eq!(sample(&after, "saga_relay_slots_held"), Some(1.0));
    // Each applied event wrote at least its inbox entry in a transaction of its own batch.
    let statements = |text: &str| sample(text, "saga_db_statements_total").unwrap_or(0.0);
    assert!(
        statements(&after) >= statements(&before) + 3.0 * 3.0,
        "statements {} -> {}",
        statements(&before),
        statements(&after)
    );
    assert!(sample(&after, "saga_outbox_rows").is_some());
    assert!(after.contains("# TYPE saga_handler_duration_seconds histogram"));
    assert!(after.contains("# TYPE saga_events_total counter"));
    promtool_check(&after);
    rt.stop().await;
}

/// The sagas with `end` of `service` in the saga-duration histogram.
fn sagas_ended(text: &str, service: &str, end: &str) -> f64 {
    let labels = [format!("service=\"{service}\""), format!("end=\"{end}\"")];
    text.lines()
        .filter(|l| l.starts_with("saga_duration_seconds_count{"))
        .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The exposition once it shows one order saga that ended `end` (recorded right after the
/// commit that the order's status shows).
async fn one_saga_ended(rt: &TestRuntime, end: &str) -> String {
    eventually(&format!("the {end} saga in the metrics"), || async {
        let text = scrape(rt).await;
        match sagas_ended(&text, "order", end) {
            1.0 => Ok(text),
            n => Err(format!("{n} {end}")),
        }
    })
    .await
}

/// Saga durations: an approved order's saga ends `settled` (its handler cancelled the
/// deadline), one whose point step never answers ends `expired` (the deadline fired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_that_settle_or_expire_are_timed_to_their_end() {
    use serde_json::json;
    let rt = TestRuntime::start(Backend::Sqlite, &["order", "point", "exchange"]).await;
    assert_eq!(sagas_ended(&scrape(&rt).await, "order", "settled"), 0.0);
    rt.post("/points", json!({"userId": "tim", "point": 1000}))
        .await;
    let (status, order) = rt
        .post(
            "/orders",
            json!({"holderId": "tim", "currencyId": 1, "amount": 10}),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    common::order_status(&rt, order["id"].as_str().unwrap(), "APPROVED").await;
    let text = one_saga_ended(&rt, "settled").await;
    assert_eq!(sagas_ended(&text, "order", "expired"), 0.0);
    promtool_check(&text);
    rt.stop().await;

    // No point service: the exchange step answers nobody and the deadline fires.
    let rt = TestRuntime::start_with(Backend::Sqlite, &["order", "exchange"], |o| {
        o.config.saga_deadlines.insert("order".into(), 300);
    })
    .await;
    let (status, order) = rt
        .post(
            "/orders",
            json!({"holderId": "una", "currencyId": 1, "amount": 10}),
        )
        .await;
    assert_eq!(status, 201, "{order}");
    common::order_status(&rt, order["id"].as_str().unwrap(), "REJECTED").await;
    let text = one_saga_ended(&rt, "expired").await;
    assert_eq!(sagas_ended(&text, "order", "settled"), 0.0, "{text}");
    rt.stop().await;
}
