-- Outbox rows the broker refuses for good (e.g. over its message size limit), set aside by the
-- relay with the reason so the rows behind them flow; `runtime outbox redrive` puts them back.
CREATE TABLE outbox_parked (
    id          INTEGER PRIMARY KEY,  -- its id in the outbox when it was parked
    event_id    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    msg_key     TEXT    NOT NULL,
    headers     TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    created_ms  INTEGER NOT NULL,
    parked_ms   INTEGER NOT NULL,
    reason      TEXT    NOT NULL
);
