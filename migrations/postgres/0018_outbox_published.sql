-- Published rows stay in the outbox for `relay.republish_window_ms`, marked with when Kafka
-- took them (see runtime/src/relay.rs): the test broker can lose records it acknowledged when
-- it restarts, and a relay that saw its connections drop marks its recent rows unpublished
-- again, in the database, so they go out again in their order even if that relay dies before
-- it publishes them. NULL: waiting for the relay.
ALTER TABLE outbox ADD COLUMN published_ms BIGINT;
CREATE INDEX outbox_waiting ON outbox (id) WHERE published_ms IS NULL;
