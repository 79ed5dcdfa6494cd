-- When the broker's connections were last seen dropping, by any instance (see
-- runtime/src/ownership.rs): a partition taken over soon after reads again from before it.
CREATE TABLE broker_losses (
    broker   TEXT    PRIMARY KEY,
    lost_ms  BIGINT  NOT NULL
);
