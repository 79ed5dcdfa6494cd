//! The order service of the deadline saga (SPEC B): takes orders over HTTP, starts the saga
//! with `OrderCreated` and a saga deadline (`approval`, the service default), and approves or
//! rejects the order when the point step reports back. If the deadline fires first the order is
//! rejected; the `OrderRejected` it emits makes exchange (and then point) compensate, and a late
//! outcome for an order that is no longer pending is ignored.

use saga_sdk::{
    get_json, list_json, param, parse_json, query_reply, route, subscribe, Context, Effects, Error,
    Event, Manifest, Request, Response, Service,
};
use serde::{Deserialize, Serialize};

const TOPIC: &str = "order";
const DEADLINE: &str = "approval";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlaceOrder {
    holder_id: String,
    currency_id: i64,
    amount: i64,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Order {
    id: String,
    holder_id: String,
    currency_id: i64,
    amount: i64,
    status: String,
    reason: Option<String>,
    created_ms: i64,
    updated_ms: i64,
}

/// What the point service reports (`PointUsed`, `PointLimitExceeded`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PointOutcome {
    order_id: String,
    reason: Option<String>,
}

struct OrderService;

fn key(id: &str) -> String {
    format!("order/{id}")
}

impl OrderService {
    fn place(ctx: &Context, request: &Request) -> Result<Response, Error> {
        let cmd: PlaceOrder = parse_json(&request.body)?;
        if cmd.amount <= 0 {
            return Err(Error::Reject("amount must be positive".into()));
        }
        let order = Order {
            id: ctx.new_id.clone(),
            holder_id: cmd.holder_id,
            currency_id: cmd.currency_id,
            amount: cmd.amount,
            status: "PENDING".into(),
            reason: None,
            created_ms: ctx.now_ms,
            updated_ms: ctx.now_ms,
        };
        let mut fx = Effects::new();
        fx.put_json(key(&order.id), &order)
            .set_deadline(&order.id, DEADLINE, None)
            .emit_json(TOPIC, "OrderCreated", &order.id, &order);
        Ok(fx.reply(201, &order))
    }

    /// Settle a pending order: `Ok(reason)` rejects it. A late outcome for an order already
    /// settled changes nothing.
    fn settle(
        ctx: &Context,
        order_id: &str,
        outcome: Result<(), String>,
    ) -> Result<Effects, Error> {
        let mut fx = Effects::new();
        let Some(mut order) = get_json::<Order>(&key(order_id))? else {
            return Ok(fx);
        };
        if order.status != "PENDING" {
            return Ok(fx);
        }
        order.updated_ms = ctx.now_ms;
        match outcome {
            Ok(()) => {
                order.status = "APPROVED".into();
                fx.emit_json(TOPIC, "OrderApproved", &order.id, &order);
            }
            Err(reason) => {
                order.status = "REJECTED".into();
                order.reason = Some(reason);
                fx.emit_json(TOPIC, "OrderRejected", &order.id, &order);
            }
        }
        fx.put_json(key(&order.id), &order)
            .cancel_deadline(&order.id, DEADLINE);
        Ok(fx)
    }
}

impl Service for OrderService {
    fn describe() -> Manifest {
        Manifest {
            name: "order".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: vec![subscribe("point")],
            routes: vec![
                route("POST", "/orders"),
                route("GET", "/orders"),
                route("GET", "/orders/{id}"),
            ],
            publishes: vec![TOPIC.into()],
            saga_deadline_ms: Some(10_000),
        }
    }

    fn on_event(
        ctx: Context,
        event: Event,
    ) -> Result<saga_sdk::bindings::saga::runtime::types::Effects, Error> {
        let fx = match event.type_.as_str() {
            "PointUsed" => {
                let outcome: PointOutcome = parse_json(&event.data)?;
                Self::settle(&ctx, &outcome.order_id, Ok(()))?
            }
            "PointLimitExceeded" => {
                let outcome: PointOutcome = parse_json(&event.data)?;
                let reason = outcome.reason.unwrap_or_else(|| "point limit".into());
                Self::settle(&ctx, &outcome.order_id, Err(reason))?
            }
            "DeadlineExpired" => {
                Self::settle(&ctx, &event.subject, Err("deadline exceeded".into()))?
            }
            _ => Effects::new(),
        };
        Ok(fx.build())
    }

    fn on_request(ctx: Context, request: Request) -> Result<Response, Error> {
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", "/orders") => Self::place(&ctx, &request),
            ("GET", "/orders") => {
                let orders: Vec<Order> = list_json(&request, "order/")?;
                Ok(query_reply(200, &orders))
            }
            ("GET", _) => {
                let id = param(&request, "id").unwrap_or_default();
                match get_json::<Order>(&key(id))? {
                    Some(order) => Ok(query_reply(200, &order)),
                    None => Ok(query_reply(
                        404,
                        &serde_json::json!({"error": "no such order"}),
                    )),
                }
            }
            _ => Err(Error::Reject(format!(
                "no route {} {}",
                request.method, request.path
            ))),
        }
    }
}

saga_sdk::export_service!(OrderService);
