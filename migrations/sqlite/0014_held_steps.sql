-- Steps of blocking subscriptions being retried (their partition held), by service and saga:
-- a compensation of the saga waits for them on any instance, not only on the one retrying.
CREATE TABLE held_steps (
    service   TEXT    NOT NULL,
    saga      TEXT    NOT NULL,
    until_ms  INTEGER NOT NULL,
    PRIMARY KEY (service, saga)
);
