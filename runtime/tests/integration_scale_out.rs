//! SPEC A5, C6: several runtime processes against one PostgreSQL and one broker. They share
//! the services' partitions (partition leases) and one of them relays (the relay lease). When
//! the relaying one is killed with SIGKILL in the middle of a load of sagas — no shutdown, no
//! lease released, batches and a Kafka transaction possibly half done — the other takes over its
//! partitions and the relay once the leases expire: every saga still finishes, and nothing is
//! applied twice (balances and stock add up exactly).
//!
//! PostgreSQL only: several instances need a shared server database (SQLite is embedded).
//! The load is randomised; it prints its seed and takes one back from `TEST_SEED`.

mod common;

use common::instances::{Instance, Rng};
use common::shop::{Shop, SERVICES};
use common::{eventually, Backend, TestDb};
use serde_json::Value;
use sqlx::Connection;

async fn relay_holder(db: &TestDb) -> Option<String> {
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query_scalar("SELECT holder FROM leases WHERE name = 'relay/0'")
        .fetch_optional(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_mid_load_loses_and_duplicates_nothing() {
    const ORDERS: usize = 60;
    const BEFORE_KILL: usize = 25;
    const CUSTOMERS: usize = 4;
    const BALANCE: i64 = 1_000_000;
    const AVAILABLE: i64 = 100_000;
    let seed = common::instances::seed();
    let mut rng = Rng(seed);

    let db = TestDb::new(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::instances::config_file(
        dir.path(),
        "[kafka]\npartitions = 4\n\
         [worker]\nretry_backoff_ms = 10\nmax_backoff_ms = 100\npartition_lease_ms = 2000\n\
         [relay]\nlease_ttl_ms = 2000\npoll_interval_ms = 50\n",
    );
    let prefix = format!("so{}.", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut a = Instance::start("a", &db.url, &prefix, &config, SERVICES);
    let mut b = Instance::start("b", &db.url, &prefix, &config, SERVICES);
    let http = common::http_client();
    let bases = [a.base.clone(), b.base.clone()];
    let shops = bases.each_ref().map(|base| Shop { base, http: &http });
    for c in 0..CUSTOMERS {
        shops[0].fund(&format!("c{c}"), BALANCE).await;
    }
    shops[0].stock("bolt", AVAILABLE).await;

    let mut spent = [0i64; CUSTOMERS];
    let mut taken = 0i64;
    let mut ids = Vec::new();
    let mut place = |shop: usize, rng: &mut Rng| {
        let c = rng.below(CUSTOMERS as u64) as usize;
        let amount = 1 + rng.below(50) as i64;
        let quantity = 1 + rng.below(3) as i64;
        spent[c] += amount;
        taken += quantity;
        (shop, format!("c{c}"), quantity, amount)
    };
    for i in 0..BEFORE_KILL {
        let (s, customer, quantity, amount) = place(i % 2, &mut rng);
        ids.push(shops[s].order(&customer, "bolt", quantity, amount).await);
    }
    // Kill the instance that holds the relay, with sagas in flight.
    let holder = eventually("a relay lease holder", || async {
        relay_holder(&db).await.ok_or("no holder yet".to_string())
    })
    .await;
    let (victim, survivor) = if holder == a.id {
        (&mut a, 1)
    } else {
        (&mut b, 0)
    };
    eprintln!("killing instance {} (relay holder {holder})", victim.id);
    victim.kill();
    let survivor = &shops[survivor];
    for _ in BEFORE_KILL..ORDERS {
        let (_, customer, quantity, amount) = place(0, &mut rng);
        ids.push(survivor.order(&customer, "bolt", quantity, amount).await);
    }

    eventually("every saga to finish on the survivor", || async {
        let orders = survivor.get("/shop/orders").await;
        let done = orders
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["status"] == "SUCCESS")
            .count();
        if done == ORDERS {
            Ok(())
        } else {
            Err(format!("{done} of {ORDERS} orders succeeded"))
        }
    })
    .await;
    for (c, spent) in spent.iter().enumerate() {
        assert_eq!(
            survivor.balance(&format!("c{c}")).await,
            BALANCE - spent,
            "customer c{c} (seed {seed})"
        );
    }
    assert_eq!(
        survivor.available("bolt").await,
        AVAILABLE - taken,
        "seed {seed}"
    );
    for list in ["/payments", "/reservations"] {
        let records = survivor.get(list).await;
        let records = records.as_array().unwrap();
        assert_eq!(records.len(), ORDERS, "{list}");
        assert!(records.iter().all(|r| r["status"] == "SUCCESS"), "{list}");
        for id in &ids {
            assert!(
                records.iter().any(|r| r["orderId"] == id.as_str()),
                "{list} lacks {id}"
            );
        }
    }
    let stats: Value = survivor.get("/_saga/stats").await;
    eprintln!("survivor's counters: {stats}");
    drop(a);
    drop(b);
    db.drop_db().await;
}
