-- Replies to commands sent with an `Idempotency-Key`, stored in the transaction of their
-- effects and replayed for a retry with the same key (`retention.idempotency_keys_ms`).
CREATE TABLE idempotency_keys (
    service      TEXT    NOT NULL,
    key          TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,  -- sha256 of method, path, query and body
    status       INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    body         BLOB    NOT NULL,
    created_ms   INTEGER NOT NULL,
    PRIMARY KEY (service, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_ms);
