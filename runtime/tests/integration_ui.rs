//! Issue 13, item 5: the `/ui` page in a real browser. After a compensated shop saga (payment
//! rejects, stock is compensated) headless Chromium (Debian's `chromium`; `scripts/test.sh`
//! installs it) loads the page, runs its script against the running runtime and the test reads
//! what it shows from the rendered DOM: the three services with their versions, the saga
//! listed as compensated, and its timeline with a lane per service, the payment dead-lettered
//! and the stock compensation. A screenshot is saved under the test's output folder.

mod common;

use std::process::Command;

use common::shop::{Shop, SERVICES};
use common::{eventually, Backend, TestRuntime};

/// The DOM of `url` after its scripts ran (`--dump-dom`; virtual time lets its fetches finish).
fn rendered(url: &str) -> String {
    let out = Command::new("chromium")
        .args(chromium_flags())
        .args(["--virtual-time-budget=4000", "--dump-dom", url])
        .output()
        .expect("chromium runs (apt-get install chromium; scripts/test.sh does)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chromium_flags() -> [&'static str; 4] {
    // Root in a container: no sandbox. No GPU, no first-run work.
    [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
    ]
}

const TOKEN: &str = "ui-test-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_services_a_compensated_saga_and_its_timeline() {
    let rt = TestRuntime::start_with(Backend::Sqlite, SERVICES, |o| {
        o.config.admin_token = Some(TOKEN.into())
    })
    .await;
    let shop = Shop::of(&rt);
    shop.fund("dave", 100).await;
    shop.stock("kettle", 10).await;
    let id = shop.order("dave", "kettle", 1, 300).await;
    assert_eq!(shop.settled(&id).await["status"], "FAILED");
    eventually("the reservation to be compensated", || async {
        match shop.record("/reservations", &id).await {
            Some(r) if r["status"] == "COMPENSATED" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let url = format!("{}/ui#saga={id}", rt.base);
    let dom = tokio::task::spawn_blocking(move || rendered(&url))
        .await
        .unwrap();
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the script ran:\n{dom}"
    );
    for service in SERVICES {
        assert!(
            dom.contains(&format!(
                r#"<tr data-service="{service}"><td>{service}</td><td>0.1.0</td>"#
            )),
            "{service} with its version in the services table:\n{dom}"
        );
    }
    assert!(
        dom.contains(&format!(r#"data-saga="{id}" data-status="compensated""#)),
        "the saga listed as compensated:\n{dom}"
    );
    for lane in SERVICES {
        assert!(
            dom.contains(&format!(r#"data-lane="{lane}""#)),
            "a lane for {lane}"
        );
    }
    assert!(
        dom.contains(r#"data-service="payment" data-outcome="dead-lettered""#),
        "the rejected payment on the timeline:\n{dom}"
    );
    assert!(
        dom.contains(r#"data-service="stock" data-outcome="compensated""#),
        "the stock compensation on the timeline:\n{dom}"
    );
    assert!(
        dom.contains(r#"<tr data-topic="payment"><td>payment.dlt</td><td>1</td>"#),
        "payment's dead letter:\n{dom}"
    );
    assert!(
        dom.contains(r#"<button data-redrive="payment">"#),
        "its re-drive button"
    );

    // The listing's filters, over plain HTTP.
    let listed = |q: &'static str| {
        let (http, base) = (rt.http.clone(), rt.base.clone());
        async move {
            let resp = http
                .get(format!("{base}/_saga/sagas?{q}"))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    for q in ["service=payment", "status=compensated&service=stock"] {
        let (status, body) = listed(q).await;
        assert!(status == 200 && body.contains(&id), "{q}: {status} {body}");
    }
    for q in ["service=nobody", "status=failed", "status=ok"] {
        let (status, body) = listed(q).await;
        assert!(status == 200 && !body.contains(&id), "{q}: {status} {body}");
    }
    let (status, body) = listed("status=bogus").await;
    assert_eq!(status, 400, "{body}");

    // What the re-drive button calls: refused without the token, done with it.
    let redrive = format!("{}/_saga/admin/dlt/payment/redrive", rt.base);
    let refused = rt
        .http
        .post(&redrive)
        .json(&serde_json::json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let done = rt
        .http
        .post(&redrive)
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let done: serde_json::Value = done.json().await.unwrap();
    assert_eq!(done["redriven"].as_array().map(Vec::len), Some(1), "{done}");

    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui");
    std::fs::create_dir_all(&out).unwrap();
    let shot = out.join("ui.png");
    let url = format!("{}/ui#saga={id}", rt.base);
    let status = Command::new("chromium")
        .args(chromium_flags())
        .args(["--virtual-time-budget=4000", "--window-size=1280,900"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(status.status.success());
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot at {shot:?}"
    );
    eprintln!("screenshot: {}", shot.display());
    rt.stop().await;
}
