//! The outbox: events committed together with the state change that caused them, published
//! afterwards by the relay (`crate::relay`) in `id` order. Once Kafka has them they are marked
//! published and kept for the relay's republish window (deleted at once if it is 0); a relay
//! whose broker connections dropped marks its recent rows waiting again.

use std::borrow::Borrow;

use super::joint::Joint;
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
    /// When the transaction that wrote it committed (host clock).
    pub created_ms: i64,
}

/// How many buckets keys hash into; relay slots divide them among themselves (at most this
/// many slots).
pub const BUCKETS: u32 = 1024;

/// The bucket of a message key: FNV-1a (32 bit) of its bytes, modulo [`BUCKETS`]. Stored with
/// the row, so it must never change.
pub fn bucket(key: &str) -> u32 {
    let hash = key.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash % BUCKETS
}

/// Insert `rows` (each a message and its creation time) in their order, in as few statements
/// as the bind limit allows: a batch's emitted events in one round trip, not one per event.
pub async fn insert_all<M: Borrow<Message>>(
    conn: &mut Conn,
    rows: &[(M, i64)],
) -> Result<(), Error> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("({})", super::placeholders(1 + i * 7, 7)))
            .collect();
        let sql = format!(
            "INSERT INTO outbox (event_id, topic, msg_key, headers, payload, created_ms, bucket) \
             VALUES {}",
            values.join(", ")
        );
        let mut query = super::query(&sql);
        for (message, created_ms) in chunk {
            let message = message.borrow();
            let headers = serde_json::to_string(&message.headers).expect("string pairs serialise");
            query = query
                .bind(&message.event_id)
                .bind(&message.topic)
                .bind(&message.key)
                .bind(headers)
                .bind(&message.payload)
                .bind(*created_ms)
                .bind(i64::from(bucket(&message.key)));
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Join what [`insert_all`] inserts to `joint` (`outbox_inserted`), PostgreSQL: the rows as
/// one JSON parameter, one statement shape for any count, inserted in their order (ids follow
/// it). `false`: too many rows for one statement (nothing joined).
pub fn join_all<M: Borrow<Message>>(joint: &mut Joint, rows: &[(M, i64)]) -> bool {
    if rows.len() > INSERT_CHUNK {
        return false;
    }
    if rows.is_empty() {
        return true;
    }
    let rows: Vec<JsonRow<'_>> = rows
        .iter()
        .enumerate()
        .map(|(n, (message, created_ms))| {
            let m = message.borrow();
            JsonRow {
                n: n as i64,
                event_id: &m.event_id,
                topic: &m.topic,
                msg_key: &m.key,
                headers: serde_json::to_string(&m.headers).expect("string pairs serialise"),
                payload: super::joint::hex(&m.payload),
                created_ms: *created_ms,
                bucket: i64::from(bucket(&m.key)),
            }
        })
        .collect();
    joint.with(super::sql::Query::new(JOINED).bind(super::joint::json(&rows)));
    true
}

/// [`join_all`]'s entry: the rows from one JSON parameter, in order.
const JOINED: &str = "outbox_inserted AS (INSERT INTO outbox (event_id, topic, msg_key, \
     headers, payload, created_ms, bucket) SELECT v.event_id, v.topic, v.msg_key, v.headers, \
     decode(v.payload, 'hex'), v.created_ms, v.bucket FROM json_to_recordset(CAST($1 AS json)) \
     AS v(n bigint, event_id text, topic text, msg_key text, headers text, payload text, \
     created_ms bigint, bucket integer) ORDER BY v.n)";

/// A row as [`join_all`] sends it, one object of its JSON parameter (the payload in hex).
#[derive(serde::Serialize)]
struct JsonRow<'m> {
    n: i64,
    event_id: &'m str,
    topic: &'m str,
    msg_key: &'m str,
    headers: String,
    payload: String,
    created_ms: i64,
    bucket: i64,
}

/// Rows per multi-row insert: 7 binds each, well under SQLite's and PostgreSQL's bind limits.
const INSERT_CHUNK: usize = 500;

/// Ids per `WHERE id IN (…)` statement (one bind each), well under the bind limits.
const IDS_PER_STATEMENT: usize = 500;

/// Insert one row.
pub async fn insert(conn: &mut Conn, message: &Message, created_ms: i64) -> Result<(), Error> {
    insert_all(conn, &[(message, created_ms)]).await
}

impl Message {
    /// Its size on the wire as the broker counts it, near enough: key, value and headers.
    pub fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.key.len() + self.payload.len() + headers
    }
}

/// The oldest `limit` rows of relay slot `slot` of `slots` (the buckets equal to `slot`
/// modulo `slots`), in storage order.
///
/// On PostgreSQL through `outbox_mark_and_fetch` (migration 0022) with nothing to mark, which
/// walks the waiting rows' index with a plain index scan: the entries that published rows leave
/// behind are marked dead as it passes them, instead of visited again by every fetch until
/// VACUUM. (Migration 0020's `outbox_waiting_rows` did the same as an SQL function, whose body
/// PostgreSQL before 18 plans again on every call: 0.3 ms a fetch, a fifth of the database's
/// time at 8 bench clients.)
pub async fn fetch(db: &Db, slot: u32, slots: u32, limit: u32) -> Result<Vec<Row>, Error> {
    mark_and_fetch(db, &[], None, (slot, slots), limit).await
}

/// Mark the rows `sent` (published at `published_ms`, or deleted if `None`: no republish
/// window), then read the oldest `limit` waiting rows of relay slot `slot` of `slots`, as
/// [`fetch`]. On PostgreSQL one statement (`outbox_mark_and_fetch`, migration 0022: a round
/// trip and a statement fewer per relay batch); on SQLite two.
pub async fn mark_and_fetch(
    db: &Db,
    sent: &[i64],
    published_ms: Option<i64>,
    (slot, slots): (u32, u32),
    limit: u32,
) -> Result<Vec<Row>, Error> {
    let dialect = db.dialect();
    let mut query = if dialect == super::Dialect::Postgres {
        super::query("SELECT * FROM outbox_mark_and_fetch(CAST($1 AS json), $2, $3, $4, $5)")
            .bind(super::joint::json(sent))
            .bind(published_ms)
    } else {
        mark(db, sent, published_ms).await?;
        super::query(fetch_sql(dialect))
    };
    query = query
        .bind(i64::from(slots.max(1)))
        .bind(i64::from(slot))
        .bind(limit as i64);
    let rows = query.fetch_all(db.pool()).await?;
    rows.iter().map(decode).collect()
}

/// The outbox read of [`fetch`] with nothing to mark (slots, slot, limit bound as `$1`–`$3`).
pub fn fetch_sql(dialect: super::Dialect) -> &'static str {
    match dialect {
        super::Dialect::Postgres => {
            "SELECT * FROM outbox_mark_and_fetch(CAST('[]' AS json), NULL, $1, $2, $3)"
        }
        super::Dialect::Sqlite => {
            "SELECT id, event_id, topic, msg_key, headers, payload, created_ms FROM outbox \
             WHERE published_ms IS NULL AND bucket % $1 = $2 ORDER BY id LIMIT $3"
        }
    }
}

fn decode(row: &super::Row) -> Result<Row, Error> {
    let headers: String = row.try_get("headers")?;
    Ok(Row {
        id: row.try_get("id")?,
        message: Message {
            event_id: row.try_get("event_id")?,
            topic: row.try_get("topic")?,
            key: row.try_get("msg_key")?,
            headers: serde_json::from_str(&headers)
                .map_err(|e| Error::Corrupt(format!("outbox headers: {e}")))?,
            payload: row.try_get("payload")?,
        },
        created_ms: row.try_get("created_ms")?,
    })
}

/// An outbox row the broker refused for good, set aside with the reason.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Parked {
    pub id: i64,
    pub event_id: String,
    pub topic: String,
    pub key: String,
    /// Key, value and headers, bytes.
    pub size: usize,
    pub parked_ms: i64,
    pub reason: String,
}

/// Move a row out of the outbox into `outbox_parked` with `reason`, in one transaction.
pub async fn park(db: &Db, id: i64, reason: &str, now_ms: i64) -> Result<(), Error> {
    let mut tx = db.begin().await?;
    super::query(
        "INSERT INTO outbox_parked \
         (id, event_id, topic, msg_key, headers, payload, created_ms, parked_ms, reason, bucket) \
         SELECT id, event_id, topic, msg_key, headers, payload, created_ms, $2, $3, bucket \
         FROM outbox WHERE id = $1",
    )
    .bind(id)
    .bind(now_ms)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    super::query("DELETE FROM outbox WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Parked rows in id order, `limit` at a time after `after` (a cursor: the last id seen).
pub async fn parked(db: &Db, after: i64, limit: u32) -> Result<Vec<Parked>, Error> {
    let rows = super::query(
        "SELECT id, event_id, topic, msg_key, headers, payload, created_ms, parked_ms, reason \
         FROM outbox_parked WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit as i64)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            let row = decode(r)?;
            Ok(Parked {
                id: row.id,
                size: row.message.size(),
                event_id: row.message.event_id,
                topic: row.message.topic,
                key: row.message.key,
                parked_ms: r.try_get("parked_ms")?,
                reason: r.try_get("reason")?,
            })
        })
        .collect()
}

/// Put parked rows back at the end of the outbox (all of them if `ids` is `None`), for the
/// relay to try again, e.g. after the broker's limit was raised. Returns how many moved.
pub async fn unpark(db: &Db, ids: Option<&[i64]>, now_ms: i64) -> Result<u64, Error> {
    let ids = match ids {
        Some([]) => return Ok(0),
        Some(ids) => ids.to_vec(),
        None => {
            super::query_scalar("SELECT id FROM outbox_parked ORDER BY id")
                .fetch_all(db.pool())
                .await?
        }
    };
    let mut moved = 0;
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let mut tx = db.begin().await?;
        let insert = format!(
            "INSERT INTO outbox (event_id, topic, msg_key, headers, payload, created_ms, bucket) \
             SELECT event_id, topic, msg_key, headers, payload, $1, bucket FROM outbox_parked \
             WHERE id IN ({}) ORDER BY id",
            super::placeholders(2, chunk.len())
        );
        let mut query = super::query(&insert).bind(now_ms);
        for id in chunk {
            query = query.bind(*id);
        }
        moved += query.execute(&mut *tx).await?.rows_affected();
        let delete = format!(
            "DELETE FROM outbox_parked WHERE id IN ({})",
            super::placeholders(1, chunk.len())
        );
        let mut query = super::query(&delete);
        for id in chunk {
            query = query.bind(*id);
        }
        query.execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(moved)
}

/// Mark rows as published at `now_ms` (kept for the republish window).
pub async fn published(db: &Db, ids: &[i64], now_ms: i64) -> Result<(), Error> {
    by_ids(db, "UPDATE outbox SET published_ms = $1", Some(now_ms), ids).await
}

/// Mark the rows of relay slot `slot` of `slots` published at or after `since_ms` waiting
/// again (the broker may have lost them). How many.
pub async fn unpublish(db: &Db, slot: u32, slots: u32, since_ms: i64) -> Result<u64, Error> {
    let _gate = db.write_gate().await;
    let done = super::query(
        "UPDATE outbox SET published_ms = NULL \
         WHERE published_ms >= $1 AND bucket % $2 = $3",
    )
    .bind(since_ms)
    .bind(i64::from(slots.max(1)))
    .bind(i64::from(slot))
    .execute(db.pool())
    .await?;
    Ok(done.rows_affected())
}

/// Delete the rows of relay slot `slot` of `slots` published before `before_ms`. How many.
pub async fn sweep(db: &Db, slot: u32, slots: u32, before_ms: i64) -> Result<u64, Error> {
    let _gate = db.write_gate().await;
    let done = super::query("DELETE FROM outbox WHERE published_ms < $1 AND bucket % $2 = $3")
        .bind(before_ms)
        .bind(i64::from(slots.max(1)))
        .bind(i64::from(slot))
        .execute(db.pool())
        .await?;
    Ok(done.rows_affected())
}

/// Remove published rows.
pub async fn delete(db: &Db, ids: &[i64]) -> Result<(), Error> {
    by_ids(db, "DELETE FROM outbox", None, ids).await
}

/// Mark rows published at `published_ms` ([`published`]), or delete them if `None` (no
/// republish window).
pub async fn mark(db: &Db, ids: &[i64], published_ms: Option<i64>) -> Result<(), Error> {
    match published_ms {
        Some(at) => published(db, ids, at).await,
        None => delete(db, ids).await,
    }
}

/// `statement WHERE id IN (…)` over `ids`, [`IDS_PER_STATEMENT`] at a time, with `first` bound
/// as `$1` if given.
async fn by_ids(db: &Db, statement: &str, first: Option<i64>, ids: &[i64]) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let _gate = db.write_gate().await;
    let from = 1 + usize::from(first.is_some());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let sql = format!(
            "{statement} WHERE id IN ({})",
            super::placeholders(from, chunk.len())
        );
        let mut query = super::query(&sql);
        if let Some(first) = first {
            query = query.bind(first);
        }
        for id in chunk {
            query = query.bind(*id);
        }
        query.execute(db.pool()).await?;
    }
    Ok(())
}

/// How many rows wait and when the oldest was committed (`None` if none wait).
pub async fn depth(db: &Db) -> Result<(i64, Option<i64>), Error> {
    let row = super::query(
        "SELECT COUNT(*) AS n, MIN(created_ms) AS oldest FROM outbox WHERE published_ms IS NULL",
    )
    .fetch_one(db.pool())
    .await?;
    Ok((row.try_get("n")?, row.try_get("oldest")?))
}

/// How many rows wait for the relay (published ones kept for the window not counted).
pub async fn len(db: &Db) -> Result<i64, Error> {
    super::query_scalar("SELECT COUNT(*) FROM outbox WHERE published_ms IS NULL")
        .fetch_one(db.pool())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_keeps_its_bucket() {
        // FNV-1a (32 bit) of "" and of "a", modulo 1024: stored with rows, so it must not move.
        assert_eq!(bucket(""), 0x811c_9dc5 % BUCKETS);
        assert_eq!(bucket("a"), 0xe40c_292c % BUCKETS);
        assert!((0..1000).all(|i| bucket(&format!("saga-{i}")) < BUCKETS));
    }
}
