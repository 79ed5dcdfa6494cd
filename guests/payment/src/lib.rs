//! The payment service of the outbox saga (SPEC A): keeps customers' account balances, charges
//! an order on `PaymentRequested` (→ `PaymentSucceeded` on `payment.success`) and refunds it on
//! `PaymentCompensationRequested`.
//!
//! A charge the account cannot cover is rejected: the host dead-letters the request to
//! `payment.dlt`, which is how the shop learns the payment failed (as in the seed demo).
//! `PaymentCompensationRequested` is a declared compensation, so the host's ledger applies it
//! once per order and ignores a request that arrives after it.
//!
//! Injected lateness (test data, not a runtime feature): accounts whose id starts with `slow-`
//! answer [`SLOW_MS`] after the request was emitted. The guest has no clock and cannot sleep, so
//! it asks the host to retry (the subscription is blocking) until the host's time is past that.

use saga_sdk::{
    blocking, compensating, get_json, list_json, param, parse_json, query_reply, route, subscribe,
    Context, Effects, Error, Event, Manifest, Request, Response, Service,
};
use serde::{Deserialize, Serialize};

/// How long a `slow-` account takes to answer, from the request's emission.
pub const SLOW_MS: i64 = 1_500;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Account {
    account_id: String,
    balance: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PaymentRequested {
    order_id: String,
    customer_id: String,
    amount: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompensationRequested {
    order_id: String,
}

/// A charge for one order.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payment {
    order_id: String,
    account_id: String,
    amount: i64,
    /// `SUCCESS`, then `COMPENSATED` if the order failed.
    status: String,
    updated_ms: i64,
}

fn account_key(id: &str) -> String {
    format!("account/{id}")
}

fn payment_key(order_id: &str) -> String {
    format!("payment/{order_id}")
}

struct PaymentService;

impl PaymentService {
    fn charge(ctx: &Context, event: &Event) -> Result<Effects, Error> {
        let req: PaymentRequested = parse_json(&event.data)?;
        let mut fx = Effects::new();
        if get_json::<Payment>(&payment_key(&req.order_id))?.is_some() {
            return Ok(fx);
        }
        if req.customer_id.starts_with("slow-") && ctx.now_ms < event.time_ms + SLOW_MS {
            return Err(Error::Retry(format!(
                "account {} is slow (injected)",
                req.customer_id
            )));
        }
        let balance = get_json::<Account>(&account_key(&req.customer_id))?.map_or(0, |a| a.balance);
        if balance < req.amount {
            return Err(Error::Reject(format!(
                "insufficient funds: account {} has {balance}, order {} needs {}",
                req.customer_id, req.order_id, req.amount
            )));
        }
        let payment = Payment {
            order_id: req.order_id.clone(),
            account_id: req.customer_id.clone(),
            amount: req.amount,
            status: "SUCCESS".into(),
            updated_ms: ctx.now_ms,
        };
        fx.put_json(
            account_key(&req.customer_id),
            &Account {
                account_id: req.customer_id,
                balance: balance - req.amount,
            },
        )
        .put_json(payment_key(&req.order_id), &payment)
        .emit_json(
            "payment.success",
            "PaymentSucceeded",
            &req.order_id,
            &payment,
        );
        Ok(fx)
    }

    fn refund(ctx: &Context, event: &Event) -> Result<Effects, Error> {
        let req: CompensationRequested = parse_json(&event.data)?;
        let mut fx = Effects::new();
        // Nothing charged (the charge failed, or has not arrived: then the ledger refuses it).
        let Some(mut payment) = get_json::<Payment>(&payment_key(&req.order_id))? else {
            return Ok(fx);
        };
        let balance =
            get_json::<Account>(&account_key(&payment.account_id))?.map_or(0, |a| a.balance);
        payment.status = "COMPENSATED".into();
        payment.updated_ms = ctx.now_ms;
        fx.put_json(
            account_key(&payment.account_id),
            &Account {
                account_id: payment.account_id.clone(),
                balance: balance + payment.amount,
            },
        )
        .put_json(payment_key(&req.order_id), &payment);
        Ok(fx)
    }

    fn open_account(request: &Request) -> Result<Response, Error> {
        let account: Account = parse_json(&request.body)?;
        if account.balance < 0 {
            return Err(Error::Reject("balance must not be negative".into()));
        }
        let mut fx = Effects::new();
        fx.put_json(account_key(&account.account_id), &account);
        Ok(fx.reply(200, &account))
    }
}

impl Service for PaymentService {
    fn describe() -> Manifest {
        Manifest {
            name: "payment".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            subscriptions: vec![
                // Transient failures retry in place: charges of one order stay in order.
                blocking(subscribe("payment")),
                compensating(
                    subscribe("payment.compensation"),
                    &["PaymentCompensationRequested"],
                ),
            ],
            routes: vec![
                route("POST", "/accounts"),
                route("GET", "/accounts/{accountId}"),
                route("GET", "/payments"),
            ],
            publishes: vec!["payment.success".into()],
            saga_deadline_ms: None,
        }
    }

    fn on_event(
        ctx: Context,
        event: Event,
    ) -> Result<saga_sdk::bindings::saga::runtime::types::Effects, Error> {
        let fx = match event.type_.as_str() {
            "PaymentRequested" => Self::charge(&ctx, &event)?,
            "PaymentCompensationRequested" => Self::refund(&ctx, &event)?,
            _ => Effects::new(),
        };
        Ok(fx.build())
    }

    fn on_request(_ctx: Context, request: Request) -> Result<Response, Error> {
        match (request.method.as_str(), request.path.as_str()) {
            ("POST", _) => Self::open_account(&request),
            ("GET", "/payments") => {
                let payments: Vec<Payment> = list_json(&request, "payment/")?;
                Ok(query_reply(200, &payments))
            }
            _ => {
                let id = param(&request, "accountId").unwrap_or_default();
                let balance = get_json::<Account>(&account_key(id))?.map_or(0, |a| a.balance);
                Ok(query_reply(
                    200,
                    &Account {
                        account_id: id.into(),
                        balance,
                    },
                ))
            }
        }
    }
}

saga_sdk::export_service!(PaymentService);
