//! The point service of the deadline saga (SPEC B): keeps users' point balances, deducts an
//! order's points on `ExchangeSucceeded` (or reports the point limit), and refunds them on
//! `ExchangeCancelled`.
//!
//! `ExchangeCancelled` is declared a compensation, so the host's compensation ledger applies it
//! once per order however often it is delivered, and ignores an `ExchangeSucceeded` that
//! arrives after it. The refund below therefore needs no "already refunded?" check of its own.

use saga_sdk::{
    get_json, list_json, param, parse_json, query_reply, route, subscribe, Context, Effects, Error,
    Event, Manifest, Request, Response, Service,
};
use serde::{Deserialize, Serialize};

const TOPIC: &str = "point";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Points {
    user_id: String,
    point: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExchangeEvent {
    order_id: String,
    holder_id: String,
    point: i64,
}

/// One processed step: a deduction for an order, and whether it was refunded.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Transaction {
    order_id: String,
    user_id: String,
    point: i64,
    status: String,
    updated_ms: i64,
    /// Set only by the `point-v2` build (same source, version 0.2.0): a visible change of
    /// behaviour for `runtime deploy --verify` to find.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    handled_by: Option<String>,
}

fn handled_by() -> Option<String> {
    (env!("CARGO_PKG_NAME") == "point-v2").then(|| format!("point {}", env!("CARGO_PKG_VERSION")))
}

struct PointService;

fn user_key(user_id: &str) -> String {
    format!("user/{user_id}")
}

fn tx_key(order_id: &str) -> String {
    format!("tx/{order_id}")
}

fn balance(user_id: &str) -> Result<i64, Error> {
    Ok(get_json::<Points>(&user_key(user_id))?.map_or(0, |p| p.point))
}

impl PointService {
    fn deduct(ctx: &Context, event: &Event) -> Result<Effects, Error> {
        let step: ExchangeEvent = parse_json(&event.data)?;
        let mut fx = Effects::new();
        if get_json::<Transaction>(&tx_key(&step.order_id))?.is_some() {
            return Ok(fx);
        }
        let have = balance(&step.holder_id)?;
        if have < step.point {
            let reason = format!("point limit: has {have}, needs {}", step.point);
            fx.emit_json(
                TOPIC,
                "PointLimitExceeded",
                &step.order_id,
                &serde_json::json!({"orderId": step.order_id, "userId": step.holder_id, "reason": reason}),
            );
            return Ok(fx);
        }
        let tx = Transaction {
            order_id: step.order_id.clone(),
            user_id: step.holder_id.clone(),
            point: step.point,
            status: "USED".into(),
            updated_ms: ctx.now_ms,
            handled_by: handled_by(),
        };
        fx.put_json(
            user_key(&step.holder_id),
            &Points {
                user_id: step.holder_id.clone(),
                point: have - step.point,
            },
        )
        .put_json(tx_key(&step.order_id), &tx)
        .emit_json(TOPIC, "PointUsed", &step.order_id, &tx);
        Ok(fx)
    }

    fn refund(ctx: &Context, event: &Event) -> Result<Effects, Error> {
        let step: ExchangeEvent = parse_json(&event.data)?;
        let mut fx = Effects::new();
        let Some(mut tx) = get_json::<Transaction>(&tx_key(&step.order_id))? else {
            return Ok(fx);
        };
        let have = balance(&tx.user_id)?;
        tx.status = "REFUNDED".into();
        tx.updated_ms = ctx.now_ms;
        fx.put_json(
            user_key(&tx.user_id),
            &Points {
                user_id: tx.user_id.clone(),
                point: have + tx.point,
            },
        )
        .put_json(tx_key(&step.order_id), &tx)
        .emit_json(TOPIC, "PointRefunded", &step.order_id, &tx);
        Ok(fx)
    }

    fn set_points(request: &Request) -> Result<Response, Error> {
        let points: Points = parse_json(&request.body)?;
        if points.point < 0 {
            return Err(Error::Reject("point must not be negative".into()));
        }
        let mut fx = Effects::new();
        fx.put_json(user_key(&points.user_id), &points);
        Ok(fx.reply(200, &points))
    }
}

impl Service for PointService {
    fn describe() -> Manifest {
        Manifest {
            name: "point".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: vec![saga_sdk::compensating(
                subscribe("exchange"),
                &["ExchangeCancelled"],
            )],
            routes: vec![
                route("POST", "/points"),
                route("GET", "/points/{userId}"),
                route("GET", "/transactions"),
            ],
            publishes: vec![TOPIC.into()],
            saga_deadline_ms: None,
        }
    }

    fn on_event(
        ctx: Context,
        event: Event,
    ) -> Result<saga_sdk::bindings::saga::runtime::types::Effects, Error> {
        let fx = match event.type_.as_str() {
            "ExchangeSucceeded" => Self::deduct(&ctx, &event)?,
            "ExchangeCancelled" => Self::refund(&ctx, &event)?,
            _ => Effects::new(),
        };
        Ok(fx.build())
    }

    fn on_request(_ctx: Context, request: Request) -> Result<Response, Error> {
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", "/points") => Self::set_points(&request),
            ("GET", "/transactions") => {
                let txs: Vec<Transaction> = list_json(&request, "tx/")?;
                Ok(query_reply(200, &txs))
            }
            _ => {
                let user_id = param(&request, "userId").unwrap_or_default();
                Ok(query_reply(
                    200,
                    &Points {
                        user_id: user_id.into(),
                        point: balance(user_id)?,
                    },
                ))
            }
        }
    }
}

saga_sdk::export_service!(PointService);
