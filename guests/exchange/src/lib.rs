//! The exchange service of the deadline saga (SPEC B): converts an order's currency amount into
//! points (`OrderCreated` → `ExchangeSucceeded`) and undoes the exchange when the order is
//! rejected (`OrderRejected` → `ExchangeCancelled`, which the point service refunds on).
//!
//! The demo's faults are injected here, by `currencyId` (test data, not runtime features). The
//! guest has no clock and cannot sleep, so "slow" means: ask the host to retry this event
//! (a blocking subscription) until the host's time is past the saga deadline.
//! - 100: the step takes longer than the deadline (finishes 1 s after it).
//! - 200: a delay right after the expiry check at the door: the step finishes 500 ms after the
//!   deadline, so only the host's in-commit check can stop it.

use saga_sdk::{
    get_json, list_json, parse_json, query_reply, route, subscribe, Context, Effects, Error, Event,
    Manifest, Request, Response, Service,
};
use serde::{Deserialize, Serialize};

const TOPIC: &str = "exchange";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OrderEvent {
    id: String,
    holder_id: String,
    currency_id: i64,
    amount: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Exchange {
    order_id: String,
    holder_id: String,
    currency_id: i64,
    amount: i64,
    point: i64,
    created_ms: i64,
}

struct ExchangeService;

fn key(order_id: &str) -> String {
    format!("exchange/{order_id}")
}

/// Points per currency unit. The example has one rate; a real service would look it up.
fn rate(_currency_id: i64) -> i64 {
    1
}

/// How long past the saga deadline the fault-injecting currencies keep the step busy.
fn injected_delay_past_deadline(currency_id: i64) -> Option<i64> {
    match currency_id {
        100 => Some(1_000),
        200 => Some(500),
        _ => None,
    }
}

impl ExchangeService {
    fn exchange(ctx: &Context, event: &Event) -> Result<Effects, Error> {
        let order: OrderEvent = parse_json(&event.data)?;
        if let (Some(past), Some(deadline)) = (
            injected_delay_past_deadline(order.currency_id),
            event.deadline_ms,
        ) {
            if ctx.now_ms < deadline + past {
                return Err(Error::Retry(format!(
                    "currency {} is slow (injected fault)",
                    order.currency_id
                )));
            }
        }
        let mut fx = Effects::new();
        if get_json::<Exchange>(&key(&order.id))?.is_some() {
            return Ok(fx);
        }
        let exchange = Exchange {
            order_id: order.id.clone(),
            holder_id: order.holder_id,
            currency_id: order.currency_id,
            amount: order.amount,
            point: order.amount * rate(order.currency_id),
            created_ms: ctx.now_ms,
        };
        fx.put_json(key(&order.id), &exchange).emit_json(
            TOPIC,
            "ExchangeSucceeded",
            &order.id,
            &exchange,
        );
        Ok(fx)
    }

    fn cancel(event: &Event) -> Result<Effects, Error> {
        let order: OrderEvent = parse_json(&event.data)?;
        let mut fx = Effects::new();
        if let Some(exchange) = get_json::<Exchange>(&key(&order.id))? {
            fx.delete(key(&order.id))
                .emit_json(TOPIC, "ExchangeCancelled", &order.id, &exchange);
        }
        Ok(fx)
    }
}

impl Service for ExchangeService {
    fn describe() -> Manifest {
        Manifest {
            name: "exchange".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: vec![saga_sdk::blocking(saga_sdk::compensating(
                subscribe("order"),
                &["OrderRejected"],
            ))],
            routes: vec![route("GET", "/exchanges")],
            publishes: vec![TOPIC.into()],
            saga_deadline_ms: None,
        }
    }

    fn on_event(
        ctx: Context,
        event: Event,
    ) -> Result<saga_sdk::bindings::saga::runtime::types::Effects, Error> {
        let fx = match event.type_.as_str() {
            "OrderCreated" => Self::exchange(&ctx, &event)?,
            "OrderRejected" => Self::cancel(&event)?,
            _ => Effects::new(),
        };
        Ok(fx.build())
    }

    fn on_request(_ctx: Context, request: Request) -> Result<Response, Error> {
        let exchanges: Vec<Exchange> = list_json(&request, "exchange/")?;
        Ok(query_reply(200, &exchanges))
    }
}

saga_sdk::export_service!(ExchangeService);
