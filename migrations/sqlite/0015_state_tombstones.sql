-- Retention of state tombstones (deleted keys) and placeholder rows (keys read while absent):
-- when a row was last written, and an index of the valueless rows by age for the clean-up.
-- Existing rows count as written at migration time.
ALTER TABLE state ADD COLUMN touched_ms INTEGER NOT NULL DEFAULT 0;
UPDATE state SET touched_ms = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)
    WHERE value IS NULL;
CREATE INDEX state_tombstones_by_age ON state (touched_ms) WHERE value IS NULL;
