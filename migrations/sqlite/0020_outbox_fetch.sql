-- PostgreSQL's 0020 makes the relay's fetch a function that walks `outbox_waiting` with a
-- plain index scan (dead index entries). SQLite removes an index entry when its row leaves the
-- index, so it keeps the plain query; this keeps the two histories numbered alike.
SELECT 1;
