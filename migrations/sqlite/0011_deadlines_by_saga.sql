-- The door check of expiry reads a batch's sagas' pending deadlines by saga.
CREATE INDEX deadlines_by_saga ON deadlines (saga, status, due_ms);
