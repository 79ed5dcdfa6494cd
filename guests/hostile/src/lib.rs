//! A test fixture, not an example: a service that misbehaves on request. Events of type
//! `Loop` spin forever, `Hog` allocate far past any memory limit, `Panic` trap, `Reject`
//! return a permanent error; anything else is recorded under `seen/<event id>`, so a test can
//! prove that well-behaved events keep flowing past the hostile ones.

use saga_sdk::{
    query_reply, route, scan_json, subscribe, Context, Effects, Error, Event, Manifest, Request,
    Response, Service,
};

struct Hostile;

impl Service for Hostile {
    fn describe() -> Manifest {
        Manifest {
            name: "hostile".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: vec![subscribe("hostile")],
            routes: vec![route("GET", "/hostile/seen")],
            publishes: vec![],
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
            _ => {
                let mut fx = Effects::new();
                fx.put_json(format!("seen/{}", event.subject), &event.type_);
                Ok(fx.build())
            }
        }
    }

    fn on_request(_ctx: Context, _request: Request) -> Result<Response, Error> {
        let seen: Vec<String> = scan_json::<String>("seen/", 10_000)?
            .into_iter()
            .map(|(k, _)| k.trim_start_matches("seen/").to_string())
            .collect();
        Ok(query_reply(200, &seen))
    }
}

saga_sdk::export_service!(Hostile);
