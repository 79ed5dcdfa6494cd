//! The outbox: events committed together with the state change that caused them, published
//! afterwards by the relay (`crate::relay`) in `id` order, and deleted once Kafka has them.

use sqlx::Row as _;

use super::{Conn, Db, Error};

/// One event to publish: Kafka topic, key and headers (the CloudEvents attributes) and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub event_id: String,
    pub topic: String,
    pub key: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// A stored row: its position in the outbox and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: i64,
    pub message: Message,
}

pub async fn insert(conn: &mut Conn, message: &Message, created_ms: i64) -> Result<(), Error> {
    let headers = serde_json::to_string(&message.headers).expect("string pairs serialise");
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, msg_key, headers, payload, created_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&message.event_id)
    .bind(&message.topic)
    .bind(&message.key)
    .bind(headers)
    .bind(&message.payload)
    .bind(created_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The oldest `limit` rows, in storage order.
pub async fn fetch(db: &Db, limit: u32) -> Result<Vec<Row>, Error> {
    let rows = sqlx::query(
        "SELECT id, event_id, topic, msg_key, headers, payload FROM outbox ORDER BY id LIMIT $1",
    )
    .bind(limit as i64)
    .fetch_all(db.pool())
    .await?;
    rows.into_iter()
        .map(|row| {
            let headers: String = row.try_get("headers")?;
            Ok(Row {
                id: row.try_get("id")?,
                message: Message {
                    event_id: row.try_get("event_id")?,
                    topic: row.try_get("topic")?,
                    key: row.try_get("msg_key")?,
                    headers: serde_json::from_str(&headers)
                        .map_err(|e| Error::Sql(sqlx::Error::Decode(Box::new(e))))?,
                    payload: row.try_get("payload")?,
                },
            })
        })
        .collect()
}

/// Remove published rows (ids up to and including `last` that were in the batch).
pub async fn delete(db: &Db, ids: &[i64]) -> Result<(), Error> {
    for chunk in ids.chunks(500) {
        let sql = format!(
            "DELETE FROM outbox WHERE id IN ({})",
            super::placeholders(1, chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(*id);
        }
        query.execute(db.pool()).await?;
    }
    Ok(())
}

pub async fn len(db: &Db) -> Result<i64, Error> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM outbox")
        .fetch_one(db.pool())
        .await?)
}
