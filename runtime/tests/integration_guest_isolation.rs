//! A guest that loops, exhausts memory, panics or rejects fails that one event — retried, then
//! dead-lettered with the reason — while other events keep flowing. And a guest sees no clock,
//! environment or files of the host.

mod common;

use common::{
    consume_n, eventually, header, hostile_outcome, produce_event, produce_raw, Backend,
    TestRuntime,
};
use saga_runtime::kafka::dead_letter::headers as dlt_headers;
use serde_json::{json, Value};

async fn start(backend: Backend) -> TestRuntime {
    TestRuntime::start_with(backend, &["hostile"], |o| {
        o.config.sandbox.call_timeout_ms = 1_000;
        o.config.sandbox.memory_mib = 32;
    })
    .await
}

async fn hostile_guests_are_stopped_and_dead_lettered_while_others_flow(backend: Backend) {
    let rt = start(backend).await;
    let p = rt.prefix().to_string();
    let cases = [
        ("loop", "Loop", "time limit"),
        ("hog", "Hog", "memory limit"),
        ("panic", "Panic", "panics on purpose"),
        ("reject", "Reject", "rejects this event"),
    ];
    for (i, (id, kind, _)) in cases.iter().enumerate() {
        produce_event(&p, "hostile", id, kind, &format!("s{i}"), &json!({})).await;
        produce_event(
            &p,
            "hostile",
            &format!("ok-{id}"),
            "Fine",
            &format!("s{i}"),
            &json!({}),
        )
        .await;
    }
    let seen: Value = eventually("the well-behaved events to be applied", || async {
        let seen = rt.get("/hostile/seen").await;
        if seen.as_array().is_some_and(|a| a.len() == 4) {
            Ok(seen)
        } else {
            Err(seen.to_string())
        }
    })
    .await;
    assert_eq!(seen, json!(["s0", "s1", "s2", "s3"]));
    for (id, _, reason) in cases {
        let (outcome, detail) = hostile_outcome(&rt, id).await;
        assert_eq!(outcome, "dead-lettered", "{id}: {detail}");
        assert!(
            detail.contains(reason),
            "{id}: {detail:?} should mention {reason:?}"
        );
    }
    // Retryable failures used all 3 attempts; a reject goes to the DLT at once.
    let dead = consume_n(&p, "hostile.dlt", 4).await;
    for m in &dead {
        let id = header(m, "ce_id").unwrap();
        let attempts = header(m, dlt_headers::ATTEMPTS).unwrap();
        assert_eq!(attempts, if id == "reject" { "1" } else { "3" }, "{id}");
        assert_eq!(header(m, dlt_headers::TOPIC).as_deref(), Some("hostile"));
        assert_eq!(header(m, dlt_headers::SERVICE).as_deref(), Some("hostile"));
        assert!(header(m, dlt_headers::REASON).is_some());
        assert!(header(m, dlt_headers::OFFSET).is_some());
    }
    rt.stop().await;
}

async fn a_malformed_record_goes_to_the_dead_letter_topic_with_the_reason(backend: Backend) {
    let rt = start(backend).await;
    let p = rt.prefix().to_string();
    produce_raw(
        &p,
        "hostile",
        "k",
        &[("ce_specversion", "1.0"), ("ce_type", "Fine")],
        b"{}",
    )
    .await;
    let dead = consume_n(&p, "hostile.dlt", 1).await;
    let reason = header(&dead[0], dlt_headers::REASON).unwrap();
    assert!(
        reason.contains("missing CloudEvents header ce_id"),
        "{reason}"
    );
    assert_eq!(
        header(&dead[0], dlt_headers::ATTEMPTS).as_deref(),
        Some("0")
    );
    rt.stop().await;
}

async fn a_guest_sees_no_clock_environment_or_files(backend: Backend) {
    let rt = start(backend).await;
    produce_event(rt.prefix(), "hostile", "probe-1", "Probe", "p1", &json!({})).await;
    let probe = eventually("the probe to run", || async {
        let probe = rt.get("/hostile/probe/p1").await;
        if probe.is_null() {
            Err("no probe yet".into())
        } else {
            Ok(probe)
        }
    })
    .await;
    assert_eq!(probe["clockSecs"], 0, "{probe}");
    assert_eq!(probe["envVars"], 0, "{probe}");
    assert_eq!(probe["args"], 0, "{probe}");
    assert_eq!(probe["rootReadable"], false, "{probe}");
    assert_eq!(probe["cwdReadable"], false, "{probe}");
    rt.stop().await;
}

/// Every call starts on a fresh instance whose memory is reset (pages kept resident are reset
/// in place, `wasm::KEEP_RESIDENT`): a guest global counting calls reads 1 every time, also
/// when many calls run at once on a handful of reused instance slots.
async fn no_guest_memory_survives_a_call(backend: Backend) {
    let rt = TestRuntime::start_with(backend, &["hostile"], |o| {
        o.config.sandbox.max_instances = 2;
    })
    .await;
    let calls = (0..40).map(|_| rt.get("/hostile/calls"));
    for seen in futures::future::join_all(calls).await {
        assert_eq!(seen, 1, "a call saw what an earlier call left in memory");
    }
    rt.stop().await;
}

on_both_backends!(
    no_guest_memory_survives_a_call,
    hostile_guests_are_stopped_and_dead_lettered_while_others_flow,
    a_malformed_record_goes_to_the_dead_letter_topic_with_the_reason,
    a_guest_sees_no_clock_environment_or_files,
);
