-- The relay's round on PostgreSQL (see runtime/src/storage/outbox.rs, `mark_and_fetch`): the
-- rows of the batch it last published are marked (published at `sent_ms`, or deleted when it
-- is NULL: no republish window), then the oldest `n` waiting rows of its slot are read, in one
-- statement instead of two. The statements of a volatile PL/pgSQL function each see what the
-- ones before them did, so the rows just marked are not read again. `sent` is a JSON array of
-- ids, looked up through the primary key (`= ANY`): one statement shape for any count. The
-- read walks `outbox_waiting` with a plain index scan, as `outbox_waiting_rows` (0020) does;
-- with nothing to mark this is the relay's plain fetch too. Unlike 0020's SQL function, whose
-- body PostgreSQL before 18 parses and plans on every call (0.3 ms a fetch), a PL/pgSQL
-- function keeps its plans for the session.
CREATE FUNCTION outbox_mark_and_fetch(sent JSON, sent_ms BIGINT, slots BIGINT, slot BIGINT,
                                      n BIGINT)
RETURNS TABLE (id BIGINT, event_id TEXT, topic TEXT, msg_key TEXT, headers TEXT, payload BYTEA,
               created_ms BIGINT)
LANGUAGE plpgsql VOLATILE SET enable_bitmapscan = off AS $$
DECLARE
    ids BIGINT[] := ARRAY(SELECT CAST(e.v AS BIGINT) FROM json_array_elements_text(sent) AS e(v));
BEGIN
    IF cardinality(ids) > 0 THEN
        IF sent_ms IS NULL THEN
            DELETE FROM outbox o
            WHERE o.id = ANY (ids);
        ELSE
            UPDATE outbox o SET published_ms = sent_ms
            WHERE o.id = ANY (ids);
        END IF;
    END IF;
    RETURN QUERY
        SELECT o.id, o.event_id, o.topic, o.msg_key, o.headers, o.payload, o.created_ms
        FROM outbox o
        WHERE o.published_ms IS NULL AND o.bucket % slots = slot
        ORDER BY o.id LIMIT n;
END
$$;
