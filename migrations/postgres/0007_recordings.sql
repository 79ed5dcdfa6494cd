-- What `runtime deploy --verify` replays: recent handler calls per service (the event, its
-- context, the state values the handler read and the effects it produced, as JSON), written
-- by every instance every few seconds, off the event path, and pruned to the newest
-- `worker.verify_recent` per service. An event re-run after a conflict replaces its row.
CREATE TABLE recordings (
    service      TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    recorded_ms  BIGINT  NOT NULL,
    instance     TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    PRIMARY KEY (service, event_id)
);
CREATE INDEX recordings_by_time ON recordings (service, recorded_ms);
