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
