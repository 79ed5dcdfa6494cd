-- PostgreSQL's 0024 keeps the relay's marking on the outbox's primary key. SQLite's marking is
-- a statement of its own, `WHERE id IN (…)`, looked up by the key; this keeps the two
-- histories numbered alike.
SELECT 1;
