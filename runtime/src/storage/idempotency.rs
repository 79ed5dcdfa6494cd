//! Stored replies of commands sent with an `Idempotency-Key` (see `crate::ingress`): written in
//! the transaction of the command's effects, so a reply is stored exactly when its effects are,
//! and read by any instance on the database.

use super::{Conn, Db, Error};

/// A command's reply, and what identifies the request it answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// sha256 of the request (method, path, query, body): the same key with another request
    /// is refused.
    pub fingerprint: String,
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// The live reply stored for `key` of `service` (written after `since_ms`), if any.
pub async fn lookup(
    db: &Db,
    service: &str,
    key: &str,
    since_ms: i64,
) -> Result<Option<Stored>, Error> {
    let row = super::query(
        "SELECT fingerprint, status, content_type, body FROM idempotency_keys \
         WHERE service = $1 AND key = $2 AND created_ms >= $3",
    )
    .bind(service)
    .bind(key)
    .bind(since_ms)
    .fetch_optional(db.pool())
    .await?;
    row.map(|r| {
        let status: i64 = r.try_get("status")?;
        Ok(Stored {
            fingerprint: r.try_get("fingerprint")?,
            status: u16::try_from(status)
                .map_err(|_| Error::Corrupt(format!("status {status}")))?,
            content_type: r.try_get("content_type")?,
            body: r.try_get("body")?,
        })
    })
    .transpose()
}

/// Store the reply for `key` on the command's transaction, replacing one written before
/// `since_ms` (expired). `false` if a live reply is already stored: another request with the
/// key committed first, and this one must not commit.
pub async fn store(
    conn: &mut Conn,
    service: &str,
    key: &str,
    reply: &Stored,
    now_ms: i64,
    since_ms: i64,
) -> Result<bool, Error> {
    let done = super::query(
        "INSERT INTO idempotency_keys \
         (service, key, fingerprint, status, content_type, body, created_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (service, key) DO UPDATE SET fingerprint = excluded.fingerprint, \
         status = excluded.status, content_type = excluded.content_type, body = excluded.body, \
         created_ms = excluded.created_ms WHERE idempotency_keys.created_ms < $8",
    )
    .bind(service)
    .bind(key)
    .bind(&reply.fingerprint)
    .bind(reply.status as i64)
    .bind(&reply.content_type)
    .bind(&reply.body)
    .bind(now_ms)
    .bind(since_ms)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A reply to store with its command's effects: its key, the reply, and when the command ran.
#[derive(Debug, Clone, Copy)]
pub struct Keyed<'a> {
    pub key: &'a str,
    pub reply: &'a Stored,
    pub now_ms: i64,
}

/// Whether no two of `replies` have the same key (one statement cannot store both).
pub fn keys_differ(replies: &[Keyed<'_>]) -> bool {
    let mut keys: Vec<&str> = replies.iter().map(|r| r.key).collect();
    keys.sort_unstable();
    keys.dedup();
    keys.len() == replies.len()
}

/// Join what [`store`] stores for each of `replies` to `joint` (`replies_stored`, PostgreSQL),
/// a reply stored before `since_ms` counting as expired, checked in the same statement: a key
/// whose live reply is already stored fails it, and nothing of it is written. The keys must
/// differ (one statement cannot write a row twice). `false`: too many for one statement
/// (nothing joined).
pub fn join_all(
    joint: &mut super::joint::Joint,
    service: &str,
    replies: &[Keyed<'_>],
    since_ms: i64,
) -> bool {
    if replies.len() > JOIN_MAX {
        return false;
    }
    if replies.is_empty() {
        return true;
    }
    let rows: Vec<JsonReply<'_>> = replies
        .iter()
        .map(|r| JsonReply {
            key: r.key,
            fingerprint: &r.reply.fingerprint,
            status: i64::from(r.reply.status),
            content_type: &r.reply.content_type,
            body: super::joint::hex(&r.reply.body),
            created_ms: r.now_ms,
        })
        .collect();
    let part = super::sql::Query::new(JOINED).bind(service);
    joint.with(part.bind(super::joint::json(&rows)).bind(since_ms));
    joint.expect("SELECT COUNT(*) FROM replies_stored", replies.len());
    true
}

/// Replies per joined statement at most (a group holds at most 64 commands).
const JOIN_MAX: usize = 500;

/// [`join_all`]'s entry: [`store`] for each reply of one JSON parameter (`$2`), expired before
/// `$3`.
const JOINED: &str = "replies_stored AS (INSERT INTO idempotency_keys AS k \
     (service, key, fingerprint, status, content_type, body, created_ms) \
     SELECT $1, v.key, v.fingerprint, v.status, v.content_type, decode(v.body, 'hex'), \
     v.created_ms FROM json_to_recordset(CAST($2 AS json)) AS v(key text, fingerprint text, \
     status integer, content_type text, body text, created_ms bigint) \
     ON CONFLICT (service, key) DO UPDATE SET fingerprint = excluded.fingerprint, \
     status = excluded.status, content_type = excluded.content_type, body = excluded.body, \
     created_ms = excluded.created_ms WHERE k.created_ms < $3 RETURNING 1)";

/// A reply as [`join_all`] sends it, one object of its JSON parameter (the body in hex).
#[derive(serde::Serialize)]
struct JsonReply<'a> {
    key: &'a str,
    fingerprint: &'a str,
    status: i64,
    content_type: &'a str,
    body: String,
    created_ms: i64,
}
