-- The relay's marking (`UPDATE outbox … WHERE id = ANY (ids)` in `outbox_mark_and_fetch`) is
-- planned once per connection for any list of ids, estimated at 10 rows; against an outbox of a
-- few hundred rows PostgreSQL chose to scan the whole table for them, and the table holds every
-- row published within `relay.republish_window_ms`: measured under the saga benchmark at 8
-- clients, 0.37 ms per marking reading 700–860 rows to mark 3–7, the relay's largest cost in
-- the database. The function's statements use indexes only.
ALTER FUNCTION outbox_mark_and_fetch(JSON, BIGINT, BIGINT, BIGINT, BIGINT)
    SET enable_seqscan = off;
