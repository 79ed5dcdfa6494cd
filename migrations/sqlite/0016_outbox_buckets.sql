-- Relay slots (see runtime/src/relay.rs): every outbox row carries the bucket of its key
-- (FNV-1a of the key, modulo 1024), and relay slot s of N publishes the rows whose bucket is s
-- modulo N, so the events of one saga (one key) go out through one slot, in order. Rows from
-- before this migration are in bucket 0.
ALTER TABLE outbox ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox_parked ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0;
