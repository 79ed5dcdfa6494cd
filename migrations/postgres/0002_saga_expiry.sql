-- One row per saga that has a deadline: created when the deadline is set, marked expired when
-- a deadline of the saga fires. Every forward step of the saga writes the row inside its
-- commit, so a step and the firing serialise on it and a step cannot commit after expiry.
CREATE TABLE sagas (
    saga        TEXT    PRIMARY KEY,
    expired_ms  BIGINT,
    steps       BIGINT NOT NULL DEFAULT 0
);
