//! Driving the outbox saga (SPEC A: shop, payment, stock) over HTTP, as a user would with curl.

use serde_json::{json, Value};

use super::{eventually, get_json, post_json, TestRuntime};

pub const SERVICES: &[&str] = &["shop", "payment", "stock"];

/// The base URL of a runtime serving the shop's routes.
pub struct Shop<'a> {
    pub base: &'a str,
    pub http: &'a reqwest::Client,
}

impl<'a> Shop<'a> {
    pub fn of(rt: &'a TestRuntime) -> Self {
        Shop {
            base: &rt.base,
            http: &rt.http,
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        post_json(self.http, self.base, path, body).await
    }

    pub async fn get(&self, path: &str) -> Value {
        get_json(self.http, self.base, path).await
    }

    pub async fn fund(&self, account: &str, balance: i64) {
        let (status, body) = self
            .post(
                "/accounts",
                json!({"accountId": account, "balance": balance}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    pub async fn stock(&self, product: &str, available: i64) {
        let (status, body) = self
            .post(
                "/stock",
                json!({"productId": product, "available": available}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }

    /// Place an order; returns its id.
    pub async fn order(&self, customer: &str, product: &str, quantity: i64, amount: i64) -> String {
        let (status, order) = self
            .post(
                "/shop/orders",
                json!({"customerId": customer, "productId": product, "quantity": quantity, "amount": amount}),
            )
            .await;
        assert_eq!(status, 201, "{order}");
        assert_eq!(order["status"], "PENDING");
        order["id"].as_str().unwrap().to_string()
    }

    pub async fn balance(&self, account: &str) -> i64 {
        self.get(&format!("/accounts/{account}")).await["balance"]
            .as_i64()
            .unwrap()
    }

    pub async fn available(&self, product: &str) -> i64 {
        self.get(&format!("/stock/{product}")).await["available"]
            .as_i64()
            .unwrap()
    }

    /// Wait until the order is no longer PENDING; returns it.
    pub async fn settled(&self, id: &str) -> Value {
        eventually(&format!("order {id} to settle"), || async {
            let order = self.get(&format!("/shop/orders/{id}")).await;
            match order["status"].as_str() {
                Some("SUCCESS" | "FAILED") => Ok(order),
                _ => Err(order.to_string()),
            }
        })
        .await
    }

    /// The record of `order_id` in a list route (`/payments`, `/reservations`).
    pub async fn record(&self, list: &str, order_id: &str) -> Option<Value> {
        let all = self.get(list).await;
        all.as_array()?
            .iter()
            .find(|r| r["orderId"] == order_id)
            .cloned()
    }
}
