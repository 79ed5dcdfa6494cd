-- Retention (see runtime/src/retention.rs): when saga rows and ledger rows were last written,
-- and indexes by age for the clean-up's batched deletes. Existing rows count as written now.
ALTER TABLE sagas ADD COLUMN touched_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE saga_ledger ADD COLUMN touched_ms INTEGER NOT NULL DEFAULT 0;
UPDATE sagas SET touched_ms = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER);
UPDATE saga_ledger SET touched_ms = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER);
CREATE INDEX sagas_by_age ON sagas (touched_ms);
CREATE INDEX saga_ledger_by_age ON saga_ledger (touched_ms);
CREATE INDEX inbox_by_age ON inbox (handled_ms);
CREATE INDEX saga_attempts_by_age ON saga_attempts (last_ms);
