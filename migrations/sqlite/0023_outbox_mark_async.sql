-- PostgreSQL's 0023 lets the relay's marking commit without waiting for the WAL flush. SQLite
-- runs with `synchronous = NORMAL` in WAL mode, whose commits do not wait for one; this keeps
-- the two histories numbered alike.
SELECT 1;
