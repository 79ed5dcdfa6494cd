//! The stock service of the outbox saga (SPEC A): keeps products' available quantities,
//! reserves an order's quantity on `StockReserveRequested` (→ `StockReserved` on
//! `stock.success`) and puts it back on `StockCompensationRequested`.
//!
//! A reservation the stock cannot cover is rejected: the host dead-letters the request to
//! `stock.dlt`, which is how the shop learns the step failed. `StockCompensationRequested` is a
//! declared compensation: applied once per order, and a request arriving after it is ignored.
//!
//! Injected lateness (test data): products whose id starts with `slow-` answer [`SLOW_MS`]
//! after the request was emitted (the guest asks the host to retry until then).

use saga_sdk::{
    blocking, compensating, get_json, list_json, param, parse_json, query_reply, route, subscribe,
    Context, Effects, Error, Event, Manifest, Request, Response, Service,
};
use serde::{Deserialize, Serialize};

/// How long a `slow-` product takes to answer, from the request's emission.
pub const SLOW_MS: i64 = 1_500;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Product {
    product_id: String,
    available: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReserveRequested {
    order_id: String,
    product_id: String,
    quantity: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompensationRequested {
    order_id: String,
}

/// The quantity held for one order.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reservation {
    order_id: String,
    product_id: String,
    quantity: i64,
    /// `SUCCESS`, then `COMPENSATED` if the order failed.
    status: String,
    updated_ms: i64,
}

fn product_key(id: &str) -> String {
    format!("product/{id}")
}

fn reservation_key(order_id: &str) -> String {
    format!("reservation/{order_id}")
}

fn available(product_id: &str) -> Result<i64, Error> {
    Ok(get_json::<Product>(&product_key(product_id))?.map_or(0, |p| p.available))
}

struct StockService;

impl StockService {
    fn reserve(ctx: &Context, event: &Event) -> Result<Effects, Error> {
        let req: ReserveRequested = parse_json(&event.data)?;
        let mut fx = Effects::new();
        if get_json::<Reservation>(&reservation_key(&req.order_id))?.is_some() {
            return Ok(fx);
        }
        if req.product_id.starts_with("slow-") && ctx.now_ms < event.time_ms + SLOW_MS {
            return Err(Error::Retry(format!(
                "product {} is slow (injected)",
                req.product_id
            )));
        }
        let have = available(&req.product_id)?;
        if have < req.quantity {
            return Err(Error::Reject(format!(
                "out of stock: product {} has {have}, order {} needs {}",
                req.product_id, req.order_id, req.quantity
            )));
        }
        let reservation = Reservation {
            order_id: req.order_id.clone(),
            product_id: req.product_id.clone(),
            quantity: req.quantity,
            status: "SUCCESS".into(),
            updated_ms: ctx.now_ms,
        };
        fx.put_json(
            product_key(&req.product_id),
            &Product {
                product_id: req.product_id,
                available: have - req.quantity,
            },
        )
        .put_json(reservation_key(&req.order_id), &reservation)
        .emit_json(
            "stock.success",
            "StockReserved",
            &req.order_id,
            &reservation,
        );
        Ok(fx)
    }

    fn release(ctx: &Context, event: &Event) -> Result<Effects, Error> {
        let req: CompensationRequested = parse_json(&event.data)?;
        let mut fx = Effects::new();
        let Some(mut reservation) = get_json::<Reservation>(&reservation_key(&req.order_id))?
        else {
            return Ok(fx);
        };
        let have = available(&reservation.product_id)?;
        reservation.status = "COMPENSATED".into();
        reservation.updated_ms = ctx.now_ms;
        fx.put_json(
            product_key(&reservation.product_id),
            &Product {
                product_id: reservation.product_id.clone(),
                available: have + reservation.quantity,
            },
        )
        .put_json(reservation_key(&req.order_id), &reservation);
        Ok(fx)
    }

    fn restock(request: &Request) -> Result<Response, Error> {
        let product: Product = parse_json(&request.body)?;
        if product.available < 0 {
            return Err(Error::Reject("available must not be negative".into()));
        }
        let mut fx = Effects::new();
        fx.put_json(product_key(&product.product_id), &product);
        Ok(fx.reply(200, &product))
    }
}

impl Service for StockService {
    fn describe() -> Manifest {
        Manifest {
            name: "stock".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: vec![
                blocking(subscribe("stock")),
                compensating(
                    subscribe("stock.compensation"),
                    &["StockCompensationRequested"],
                ),
            ],
            routes: vec![
                route("POST", "/stock"),
                route("GET", "/stock/{productId}"),
                route("GET", "/reservations"),
            ],
            publishes: vec!["stock.success".into()],
            saga_deadline_ms: None,
        }
    }

    fn on_event(
        ctx: Context,
        event: Event,
    ) -> Result<saga_sdk::bindings::saga::runtime::types::Effects, Error> {
        let fx = match event.type_.as_str() {
            "StockReserveRequested" => Self::reserve(&ctx, &event)?,
            "StockCompensationRequested" => Self::release(&ctx, &event)?,
            _ => Effects::new(),
        };
        Ok(fx.build())
    }

    fn on_request(_ctx: Context, request: Request) -> Result<Response, Error> {
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", _) => Self::restock(&request),
            ("GET", "/reservations") => {
                let all: Vec<Reservation> = list_json(&request, "reservation/")?;
                Ok(query_reply(200, &all))
            }
            _ => {
                let id = param(&request, "productId").unwrap_or_default();
                Ok(query_reply(
                    200,
                    &Product {
                        product_id: id.into(),
                        available: available(id)?,
                    },
                ))
            }
        }
    }
}

saga_sdk::export_service!(StockService);
