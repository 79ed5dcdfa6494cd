-- PostgreSQL's 0022 makes the relay's marking of its last batch and its read of the next one
-- one function call. SQLite marks apart, while the next batch is read (its marking queues
-- behind the workers' commits for the single write lock), so it needs nothing; this keeps the
-- two histories numbered alike.
SELECT 1;
