-- The Kafka transactional id generation of each relay slot (see runtime/src/relay.rs): a new
-- producer fences and aborts the previous generation's id, then produces under a new one.
CREATE TABLE relay_generations (
    slot        TEXT    PRIMARY KEY,
    generation  BIGINT  NOT NULL
);
