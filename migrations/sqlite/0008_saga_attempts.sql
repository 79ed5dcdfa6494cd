-- What a saga's timeline shows besides the inbox's final outcomes: handler attempts that
-- failed (and were retried or later dead-lettered) and deliveries found to be duplicates, one
-- row per service, event and kind, counting how often it happened and when it last did.
CREATE TABLE saga_attempts (
    service     TEXT    NOT NULL,
    event_id    TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    saga        TEXT    NOT NULL,
    event_type  TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    version     TEXT    NOT NULL,
    times       BIGINT  NOT NULL,
    last_ms     BIGINT  NOT NULL,
    detail      TEXT,
    PRIMARY KEY (service, event_id, outcome)
);
CREATE INDEX saga_attempts_by_saga ON saga_attempts (saga);
