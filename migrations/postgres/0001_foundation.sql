-- Service state: one row per (service, key). A delete keeps the row with value NULL and bumps
-- the version, so optimistic concurrency checks never mistake a recreated key for an untouched one.
CREATE TABLE state (
    service  TEXT    NOT NULL,
    key      TEXT    COLLATE "C" NOT NULL,
    value    BYTEA,
    version  BIGINT NOT NULL,
    PRIMARY KEY (service, key)
);

-- Inbox: every event a service has finished with, and how. Written in the same transaction as
-- the event's effects, so a redelivered event is recognised and never applied twice.
CREATE TABLE inbox (
    service     TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,
    saga        TEXT    NOT NULL,
    event_type  TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    detail      TEXT,
    version     TEXT    NOT NULL,
    handled_ms  BIGINT NOT NULL,
    PRIMARY KEY (service, event_id)
);
CREATE INDEX inbox_by_saga ON inbox (saga);

-- Outbox: events committed with the state change that caused them, waiting for the relay.
CREATE TABLE outbox (
    id          BIGSERIAL PRIMARY KEY,
    event_id    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    msg_key     TEXT    NOT NULL,
    headers     TEXT    NOT NULL,
    payload     BYTEA    NOT NULL,
    created_ms  BIGINT NOT NULL
);

-- Deadlines set by handlers, fired by the host's scheduler.
CREATE TABLE deadlines (
    service   TEXT    NOT NULL,
    saga      TEXT    NOT NULL,
    name      TEXT    NOT NULL,
    due_ms    BIGINT NOT NULL,
    status    TEXT    NOT NULL,
    set_by    TEXT    NOT NULL,
    PRIMARY KEY (service, saga, name)
);
CREATE INDEX deadlines_due ON deadlines (status, due_ms);

-- Leases: which instance holds a singleton role (e.g. relay slot 0) until when.
CREATE TABLE leases (
    name        TEXT    PRIMARY KEY,
    holder      TEXT    NOT NULL,
    expires_ms  BIGINT NOT NULL
);
