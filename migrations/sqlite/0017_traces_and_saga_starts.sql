-- The trace context of the span that set a deadline (W3C traceparent): the fired event
-- continues the saga's trace.
ALTER TABLE deadlines ADD COLUMN traceparent TEXT;
-- When a saga's row was made (its first deadline set): the saga duration metric. NULL for
-- sagas opened before this migration.
ALTER TABLE sagas ADD COLUMN opened_ms BIGINT;
