-- Rows written on every step are updated in place (a HOT update: no new index entries, the
-- old version pruned on its page) as long as the update changes no indexed column.
--
-- state: valueless rows (tombstones, placeholders) were found for retention by an index on
-- `touched_ms WHERE value IS NULL`. Its predicate names `value`, so every write of a value was
-- a full update, adding an entry to the primary key's index each time (a key written a
-- thousand times had a thousand entries there until vacuumed). Their age now has a column of
-- its own, NULL while the key holds a value, which a write of a value leaves as it was.
DROP INDEX state_tombstones_by_age;
ALTER TABLE state ADD COLUMN valueless_ms BIGINT;
UPDATE state SET valueless_ms = touched_ms WHERE value IS NULL;
ALTER TABLE state DROP COLUMN touched_ms;
CREATE INDEX state_valueless_by_age ON state (valueless_ms) WHERE valueless_ms IS NOT NULL;
-- Room on each page for the new versions of its rows (sagas and ledger rows keep their
-- `touched_ms` to the minute: `storage::touch`).
ALTER TABLE state SET (fillfactor = 80);
ALTER TABLE sagas SET (fillfactor = 80);
ALTER TABLE saga_ledger SET (fillfactor = 80);
