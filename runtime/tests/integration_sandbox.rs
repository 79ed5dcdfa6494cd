//! Loading components: real guests describe themselves; bad components are refused with the
//! reason; compiled components are cached on disk by content and engine. Calling them: a guest
//! that spins yields to the other tasks and is stopped at its time limit.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use saga_runtime::wasm::bindings::{Context, Event, Payload};
use saga_runtime::wasm::{Failure, Limits, LoadError, Sandbox, StateReader, Versioned};

fn sandbox(cache: Option<std::path::PathBuf>) -> Sandbox {
    Sandbox::new(Limits::default(), cache).unwrap()
}

#[tokio::test]
async fn every_example_guest_describes_itself() {
    let s = sandbox(None);
    for (name, subscribed, publishes) in [
        ("order", "point", "order"),
        ("point", "exchange", "point"),
        ("exchange", "order", "exchange"),
        ("payment", "payment", "payment.success"),
        ("stock", "stock", "stock.success"),
    ] {
        let guest = s.load(common::guest(name)).await.unwrap();
        let m = &guest.manifest;
        assert_eq!(m.name, name);
        assert_eq!(m.subscriptions[0].topic, subscribed);
        assert_eq!(m.publishes, [publishes]);
        assert_eq!(guest.digest.len(), 64);
    }
}

#[tokio::test]
async fn garbage_bytes_are_refused_as_not_a_component() {
    let err = sandbox(None)
        .load(b"definitely not wasm".to_vec())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::Compile(_)), "{err}");
    assert!(
        err.to_string()
            .contains("not a valid WebAssembly component"),
        "{err}"
    );
}

#[tokio::test]
async fn a_core_module_is_refused() {
    // The smallest core module: magic + version 1. A component has a different layer.
    let err = sandbox(None)
        .load(b"\0asm\x01\0\0\0".to_vec())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::Compile(_)), "{err}");
}

#[tokio::test]
async fn compiled_components_are_cached_by_content_and_engine() {
    let dir = tempfile::tempdir().unwrap();
    let s = sandbox(Some(dir.path().to_path_buf()));
    let wasm = common::guest("point");
    let first = s.load(wasm.clone()).await.unwrap();
    let cached: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(
        cached[0].starts_with(&first.digest) && cached[0].ends_with(".cwasm"),
        "{cached:?}"
    );
    // Loading again uses the cached file; a corrupt cache entry is recompiled, not fatal.
    assert_eq!(s.load(wasm.clone()).await.unwrap().manifest.name, "point");
    std::fs::write(dir.path().join(&cached[0]), b"corrupt").unwrap();
    assert_eq!(s.load(wasm.clone()).await.unwrap().manifest.name, "point");
}

/// No state at all: what the loop below never reads.
struct NoReads;

#[async_trait::async_trait]
impl StateReader for NoReads {
    async fn get(&self, _: &str, key: &str) -> Result<Versioned, String> {
        Err(format!("unexpected read of {key}"))
    }
    async fn scan(
        &self,
        _: &str,
        prefix: &str,
        _: Option<&str>,
        _: u32,
    ) -> Result<Vec<(String, Versioned)>, String> {
        Err(format!("unexpected scan of {prefix}"))
    }
}

/// Guest calls run on the caller's task: a guest that spins must give the thread back to the
/// other tasks at every epoch tick (and stop at its time limit), or on a one-thread runtime
/// nothing else would run until it ended. A ticker task counts 10 ms sleeps meanwhile.
#[tokio::test(flavor = "current_thread")]
async fn a_spinning_guest_does_not_starve_other_tasks_and_stops_at_its_time_limit() {
    let limits = Limits {
        call_timeout: Duration::from_millis(800),
        ..Limits::default()
    };
    let guest = Sandbox::new(limits, None)
        .unwrap()
        .load(common::guest("hostile"))
        .await
        .unwrap();
    let ticks = Arc::new(AtomicU32::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let event = Event {
        id: "spin".into(),
        type_: "Loop".into(),
        source: "/test".into(),
        subject: "s".into(),
        topic: "hostile".into(),
        time_ms: 0,
        deadline_ms: None,
        dead_letter: None,
        data: Payload {
            content_type: "application/json".into(),
            data: b"{}".to_vec(),
        },
    };
    let ctx = Context {
        now_ms: 0,
        attempt: 1,
        new_id: "n".into(),
    };
    let slot = guest.slots().admit().await.unwrap();
    let started = std::time::Instant::now();
    let failed = guest
        .on_event(&slot, Arc::new(NoReads), &ctx, &event)
        .await
        .err()
        .unwrap();
    let took = started.elapsed();
    let during = ticks.load(Ordering::Relaxed);
    ticker.abort();
    assert!(matches!(failed, Failure::TimeLimit(_)), "{failed}");
    assert!(
        took >= Duration::from_millis(800),
        "stopped early: {took:?}"
    );
    // 80 ticks fit in the call; a guest that held the thread would let none run.
    assert!(
        during >= 20,
        "only {during} ticks of 10 ms ran during a {took:?} call: the guest held the thread"
    );
}
