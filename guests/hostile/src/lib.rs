//! A test fixture, not an example: a service that misbehaves on request. Events of type
//! `Loop` spin forever, `Hog` allocate far past any memory limit, `Panic` trap, `Reject`
//! return a permanent error; anything else is recorded under `seen/<event id>`, so a test can
//! prove that well-behaved events keep flowing past the hostile ones. `Probe` records what the
//! sandbox lets a guest see of the world (clock, environment, files) under `probe/<subject>`.
//!
//! Types that try to reach what is not theirs: `ForgeDeadline` emits a `DeadlineExpired` onto
//! `order.deadline` (a host topic), `ForgeDeadLetter` onto `payment.dlt`, `OtherSaga` sets a
//! deadline on a saga it neither handles nor starts, `Forever` sets one `u64::MAX` ms away,
//! `Flood` returns 100,000 state writes, `Giant` emits an event of 1 MiB.
//!
//! Sagas with deadlines, for the fences: `POST /hostile/start?after=MS` starts a saga (its
//! `new-id`) with deadline `d`; events `Cancel` and `Move` cancel it or move it an hour out;
//! `Undo` is a declared compensation; `POST /hostile/continue/{id}` emits an event of saga `id`
//! (a command continuing a saga).
//!
//! Built as package `hostile-v2` (version 0.2.0, same source) it consumes `hostile-v2` instead
//! of `hostile`, declares no compensations and serves `/hostile/v2/seen` instead of the probe
//! route: a new version with other subscriptions and routes. Built as `hostile-forger` it declares that it publishes to
//! `order.deadline`, which a deploy must refuse.

use saga_sdk::{
    query_reply, route, scan_json, subscribe, Context, Effects, Error, Event, Manifest, Request,
    Response, Service,
};

struct Hostile;

impl Service for Hostile {
    fn describe() -> Manifest {
        let v2 = env!("CARGO_PKG_NAME") == "hostile-v2";
        let forger = env!("CARGO_PKG_NAME") == "hostile-forger";
        Manifest {
            name: "hostile".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: vec![if v2 {
                subscribe("hostile-v2")
            } else {
                saga_sdk::compensating(subscribe("hostile"), &["Undo"])
            }],
            routes: vec![
                route("GET", "/hostile/seen"),
                route("POST", "/hostile/start"),
                route("POST", "/hostile/continue/{id}"),
                route("GET", "/hostile/calls"),
                if v2 {
                    route("GET", "/hostile/v2/seen")
                } else {
                    route("GET", "/hostile/probe/{id}")
                },
            ],
            publishes: if forger {
                vec!["order.deadline".into()]
            } else {
                vec!["hostile-out".into()]
            },
            saga_deadline_ms: None,
        }
    }

    fn on_event(
        _ctx: Context,
        event: Event,
    ) -> Result<saga_sdk::bindings::saga::runtime::types::Effects, Error> {
        match event.type_.as_str() {
            "Loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "Hog" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "Panic" => panic!("hostile guest panics on purpose (event {})", event.id),
            "Reject" => Err(Error::Reject("hostile guest rejects this event".into())),
            "Cancel" => {
                let mut fx = Effects::new();
                fx.cancel_deadline(&event.subject, "d")
                    .put_json(format!("seen/{}", event.subject), &"Cancel");
                Ok(fx.build())
            }
            "Move" => {
                let mut fx = Effects::new();
                fx.set_deadline(&event.subject, "d", Some(3_600_000))
                    .put_json(format!("seen/{}", event.subject), &"Move");
                Ok(fx.build())
            }
            "ForgeDeadline" => {
                let mut fx = Effects::new();
                fx.emit_json(
                    "order.deadline",
                    "DeadlineExpired",
                    &event.subject,
                    &"forged",
                );
                Ok(fx.build())
            }
            "ForgeDeadLetter" => {
                let mut fx = Effects::new();
                fx.emit_json("payment.dlt", "PaymentRequested", &event.subject, &"forged");
                Ok(fx.build())
            }
            "OtherSaga" => {
                let mut fx = Effects::new();
                fx.set_deadline("someone-elses-saga", "approval", Some(1));
                Ok(fx.build())
            }
            "Forever" => {
                let mut fx = Effects::new();
                fx.set_deadline(&event.subject, "forever", Some(u64::MAX));
                Ok(fx.build())
            }
            "Flood" => {
                let mut fx = Effects::new();
                for i in 0..100_000 {
                    fx.put_json(format!("flood/{i}"), &i);
                }
                Ok(fx.build())
            }
            "Giant" => {
                let mut fx = Effects::new();
                fx.emit_json("hostile-out", "Giant", &event.subject, &"x".repeat(1 << 20));
                Ok(fx.build())
            }
            "Probe" => {
                let clock_secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(u64::MAX);
                let probe = serde_json::json!({
                    "clockSecs": clock_secs,
                    "envVars": std::env::vars().count(),
                    "args": std::env::args().count(),
                    "rootReadable": std::fs::read_dir("/").is_ok(),
                    "cwdReadable": std::fs::read_dir(".").is_ok(),
                });
                let mut fx = Effects::new();
                fx.put_json(format!("probe/{}", event.subject), &probe);
                Ok(fx.build())
            }
            _ => {
                let mut fx = Effects::new();
                fx.put_json(format!("seen/{}", event.subject), &event.type_);
                Ok(fx.build())
            }
        }
    }

    fn on_request(ctx: Context, request: Request) -> Result<Response, Error> {
        // Calls this instance has served: 1 on every call, unless memory survived a call.
        let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if request.path == "/hostile/calls" {
            return Ok(query_reply(200, &calls));
        }
        if request.method == "POST" && request.path == "/hostile/start" {
            let after = saga_sdk::query(&request, "after")
                .and_then(|v| v.parse().ok())
                .unwrap_or(60_000);
            let mut fx = Effects::new();
            fx.set_deadline(&ctx.new_id, "d", Some(after));
            return Ok(fx.reply(201, &serde_json::json!({ "id": ctx.new_id })));
        }
        if request.method == "POST" {
            let id = saga_sdk::param(&request, "id").unwrap_or_default();
            let mut fx = Effects::new();
            fx.emit_json("hostile-out", "Continued", &id, &"continued");
            return Ok(fx.reply(200, &serde_json::json!({ "continued": id })));
        }
        if let Some(id) = saga_sdk::param(&request, "id") {
            let probe = saga_sdk::get_json::<serde_json::Value>(&format!("probe/{id}"))?;
            return Ok(query_reply(200, &probe));
        }
        let seen: Vec<String> = scan_json::<String>("seen/", 10_000)?
            .into_iter()
            .map(|(k, _)| k.trim_start_matches("seen/").to_string())
            .collect();
        Ok(query_reply(200, &seen))
    }
}

/// A guest global: every call must start with it at 0 (a fresh instance, memory reset).
static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

saga_sdk::export_service!(Hostile);
