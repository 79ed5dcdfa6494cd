-- The relay's fetch of waiting rows (see runtime/src/storage/outbox.rs), as a function so that
-- it always walks `outbox_waiting` in id order with a plain index scan. Every published row
-- leaves a dead entry in that index until VACUUM; a plain index scan marks the entries it finds
-- dead so the next scan skips them, a bitmap scan (what the planner picks for a small LIMIT)
-- visits every one of them in the heap on every fetch: under load the fetch grew from under
-- 1 ms to 35 ms within a minute, with ~50,000 dead entries.
CREATE FUNCTION outbox_waiting_rows(slots BIGINT, slot BIGINT, n BIGINT)
RETURNS TABLE (id BIGINT, event_id TEXT, topic TEXT, msg_key TEXT, headers TEXT, payload BYTEA,
               created_ms BIGINT)
LANGUAGE sql STABLE SET enable_bitmapscan = off AS $$
    SELECT o.id, o.event_id, o.topic, o.msg_key, o.headers, o.payload, o.created_ms
    FROM outbox o
    WHERE o.published_ms IS NULL AND o.bucket % slots = slot
    ORDER BY o.id LIMIT n
$$;
