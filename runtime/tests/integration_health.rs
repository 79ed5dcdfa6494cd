//! `GET /healthz` and `GET /readyz` (issue 13, item 3): ready once the database answers, every
//! service's partitions are settled and read by its consumer, and the relay knows its slot; not ready, with the reason,
//! while the database is down, and ready again when it is back.

mod common;

use common::instances::postgres;
use common::{Backend, TestRuntime};

async fn readyz(rt: &TestRuntime) -> (u16, serde_json::Value) {
    rt.get_status("/readyz").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_with_detail_not_ready_while_the_database_is_down() {
    let rt = TestRuntime::start(Backend::Postgres, &["order", "point"]).await;
    let (status, health) = rt.get_status("/healthz").await;
    assert_eq!((status, &health["status"]), (200, &"ok".into()));
    let detail = rt.ready().await;
    assert_eq!(detail["database"]["ok"], true);
    assert_eq!(detail["migrations"], "applied");
    // Alone, the instance reads every partition of what each service consumes (its topics
    // and its deadline topic, two partitions each in tests).
    for service in ["order", "point"] {
        let s = &detail["services"][service];
        assert_eq!(s["partitions"], s["of"], "{detail}");
        assert!(s["of"].as_u64() >= Some(2), "{detail}");
        assert_eq!(
            s["reading"], true,
            "ready before {service}'s consumer read: {detail}"
        );
    }
    assert!(detail["relay"]["held"].is_array(), "{detail}");
    // Each slot held has its producer before the instance says it is ready: the first events
    // do not wait for librdkafka to connect it.
    assert_eq!(
        detail["relay"]["publishing"], detail["relay"]["held"],
        "{detail}"
    );

    tokio::task::spawn_blocking(|| postgres("stop"))
        .await
        .unwrap();
    let (status, detail) = readyz(&rt).await;
    tokio::task::spawn_blocking(|| postgres("start"))
        .await
        .unwrap();
    assert_eq!(status, 503, "{detail}");
    assert_eq!(detail["database"]["ok"], false, "{detail}");
    let (status, _) = rt.get_status("/healthz").await;
    assert_eq!(status, 200, "alive, only not ready");
    rt.ready().await;
    rt.stop().await;
}
