-- The trace context of the span that set a deadline (W3C traceparent): the fired event
-- continues the saga's trace.
ALTER TABLE deadlines ADD COLUMN traceparent TEXT;
