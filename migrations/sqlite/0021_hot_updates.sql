-- The same schema as PostgreSQL's 0021 (where it lets rows be updated in place): a valueless
-- state row's age in a column of its own, NULL while the key holds a value.
DROP INDEX state_tombstones_by_age;
ALTER TABLE state ADD COLUMN valueless_ms INTEGER;
UPDATE state SET valueless_ms = touched_ms WHERE value IS NULL;
ALTER TABLE state DROP COLUMN touched_ms;
CREATE INDEX state_valueless_by_age ON state (valueless_ms) WHERE valueless_ms IS NOT NULL;
