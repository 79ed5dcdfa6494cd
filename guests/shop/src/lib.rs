//! The order service of the outbox saga (SPEC A), named `shop` so that it can run beside the
//! deadline saga's `order`. Placing an order commits the order and two outbox rows in one
//! transaction: `PaymentRequested` on `payment` and `StockReserveRequested` on `stock`, which
//! the relay publishes in one Kafka transaction (A3, A4).
//!
//! The order follows both steps: `payment.success` / `stock.success` report success, and the
//! dead-letter topics `payment.dlt` / `stock.dlt` report failure (the step's handler rejected
//! it; the reason travels with the event). The first failure makes the order FAILED and sends a
//! compensation request to every other step not known to have failed (A8). Whether that step
//! already succeeded, is still in progress, or fails later, the receiving service's compensation
//! ledger settles it (A9): compensate now, refuse the late step, or nothing to undo.

use saga_sdk::{
    get_json, list_json, param, parse_json, query_reply, route, subscribe, Context, Effects, Error,
    Event, Manifest, Request, Response, Service,
};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PlaceOrder {
    customer_id: String,
    product_id: String,
    quantity: i64,
    amount: i64,
}

#[derive(Serialize, Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Order {
    id: String,
    customer_id: String,
    product_id: String,
    quantity: i64,
    amount: i64,
    /// `PENDING`, then `SUCCESS` or `FAILED`.
    status: String,
    /// What the order knows of each step: `IN_PROGRESS`, `SUCCESS` or `FAILED`.
    payment: String,
    stock: String,
    reason: Option<String>,
    /// Steps the order asked to compensate.
    compensations: Vec<String>,
    created_ms: i64,
    updated_ms: i64,
}

/// The two steps of the saga.
#[derive(Clone, Copy, PartialEq)]
enum Step {
    Payment,
    Stock,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Payment => "payment",
            Step::Stock => "stock",
        }
    }

    fn other(self) -> Step {
        match self {
            Step::Payment => Step::Stock,
            Step::Stock => Step::Payment,
        }
    }

    fn compensation_type(self) -> &'static str {
        match self {
            Step::Payment => "PaymentCompensationRequested",
            Step::Stock => "StockCompensationRequested",
        }
    }

    fn status(self, order: &mut Order) -> &mut String {
        match self {
            Step::Payment => &mut order.payment,
            Step::Stock => &mut order.stock,
        }
    }
}

fn key(id: &str) -> String {
    format!("order/{id}")
}

struct ShopService;

impl ShopService {
    fn place(ctx: &Context, request: &Request) -> Result<Response, Error> {
        let cmd: PlaceOrder = parse_json(&request.body)?;
        if cmd.quantity <= 0 || cmd.amount <= 0 {
            return Err(Error::Reject("quantity and amount must be positive".into()));
        }
        let order = Order {
            id: ctx.new_id.clone(),
            customer_id: cmd.customer_id,
            product_id: cmd.product_id,
            quantity: cmd.quantity,
            amount: cmd.amount,
            status: "PENDING".into(),
            payment: "IN_PROGRESS".into(),
            stock: "IN_PROGRESS".into(),
            reason: None,
            compensations: Vec::new(),
            created_ms: ctx.now_ms,
            updated_ms: ctx.now_ms,
        };
        let mut fx = Effects::new();
        fx.put_json(key(&order.id), &order)
            .emit_json(
                "payment",
                "PaymentRequested",
                &order.id,
                &serde_json::json!({
                    "orderId": order.id, "customerId": order.customer_id, "amount": order.amount,
                }),
            )
            .emit_json(
                "stock",
                "StockReserveRequested",
                &order.id,
                &serde_json::json!({
                    "orderId": order.id, "productId": order.product_id, "quantity": order.quantity,
                }),
            );
        Ok(fx.reply(201, &order))
    }

    /// A step reported back: `Err(reason)` if it failed.
    fn step_done(
        ctx: &Context,
        order_id: &str,
        step: Step,
        outcome: Result<(), String>,
    ) -> Result<Effects, Error> {
        let mut fx = Effects::new();
        let Some(mut order) = get_json::<Order>(&key(order_id))? else {
            return Ok(fx);
        };
        match (step.status(&mut order).as_str(), &outcome) {
            ("IN_PROGRESS", _) => {}
            // A failed step that succeeds after all: its request was re-driven from the
            // dead-letter topic (`runtime dlt redrive`). If the order failed, it is compensated.
            ("FAILED", Ok(())) => {}
            _ => return Ok(fx), // already known
        }
        *step.status(&mut order) = if outcome.is_ok() { "SUCCESS" } else { "FAILED" }.into();
        order.updated_ms = ctx.now_ms;
        match (order.status.as_str(), outcome) {
            ("PENDING", Err(reason)) => {
                order.status = "FAILED".into();
                order.reason = Some(format!("{} failed: {reason}", step.name()));
                let other = step.other();
                if other.status(&mut order).as_str() != "FAILED" {
                    Self::compensate(&mut fx, &mut order, other);
                }
            }
            ("PENDING", Ok(())) if order.payment == "SUCCESS" && order.stock == "SUCCESS" => {
                order.status = "SUCCESS".into();
            }
            // A step that succeeds after the order failed: the compensation sent when the order
            // failed settles it at the step's service. Ask only if it was never asked (it had
            // failed too, and was re-driven).
            ("FAILED", Ok(())) if !order.compensations.iter().any(|c| c == step.name()) => {
                Self::compensate(&mut fx, &mut order, step);
            }
            _ => {}
        }
        fx.put_json(key(&order.id), &order);
        Ok(fx)
    }

    fn compensate(fx: &mut Effects, order: &mut Order, step: Step) {
        order.compensations.push(step.name().into());
        fx.emit_json(
            &format!("{}.compensation", step.name()),
            step.compensation_type(),
            &order.id,
            &serde_json::json!({"orderId": order.id}),
        );
    }
}

impl Service for ShopService {
    fn describe() -> Manifest {
        Manifest {
            name: "shop".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: vec![
                subscribe("payment.success"),
                subscribe("stock.success"),
                subscribe("payment.dlt"),
                subscribe("stock.dlt"),
            ],
            routes: vec![
                route("POST", "/shop/orders"),
                route("GET", "/shop/orders"),
                route("GET", "/shop/orders/{id}"),
            ],
            publishes: vec![
                "payment".into(),
                "stock".into(),
                "payment.compensation".into(),
                "stock.compensation".into(),
            ],
            saga_deadline_ms: None,
        }
    }

    fn on_event(
        ctx: Context,
        event: Event,
    ) -> Result<saga_sdk::bindings::saga::runtime::types::Effects, Error> {
        let step = if event.topic.starts_with("payment.") {
            Step::Payment
        } else {
            Step::Stock
        };
        let outcome = match &event.dead_letter {
            Some(dead) => Err(dead.reason.clone()),
            None => Ok(()),
        };
        Ok(Self::step_done(&ctx, &event.subject, step, outcome)?.build())
    }

    fn on_request(ctx: Context, request: Request) -> Result<Response, Error> {
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", _) => Self::place(&ctx, &request),
            ("GET", "/shop/orders") => {
                let orders: Vec<Order> = list_json(&request, "order/")?;
                Ok(query_reply(200, &orders))
            }
            _ => {
                let id = param(&request, "id").unwrap_or_default();
                match get_json::<Order>(&key(id))? {
                    Some(order) => Ok(query_reply(200, &order)),
                    None => Ok(query_reply(
                        404,
                        &serde_json::json!({"error": "no such order"}),
                    )),
                }
            }
        }
    }
}

saga_sdk::export_service!(ShopService);
