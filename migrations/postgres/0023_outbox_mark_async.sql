-- The relay's marking of the rows it published commits without waiting for the WAL flush
-- (`synchronous_commit = off` for that transaction only). Losing a mark to a database crash
-- only makes the relay publish those rows again, which the consumers' inboxes absorb (as after
-- a relay crash); every later synchronous commit flushes the WAL past it anyway. Until now the
-- relay's round waited for that flush before it could read the next rows. The setting is made
-- with `set_config(…, true)` in the body, not in the function's SET clause, whose settings are
-- undone when the function returns, before its transaction commits; it ends with that
-- transaction, which the relay's call is alone in (`storage::outbox::mark_and_fetch`, on the
-- pool). With nothing to mark it changes no setting of the transaction it runs in.
CREATE OR REPLACE FUNCTION outbox_mark_and_fetch(sent JSON, sent_ms BIGINT, slots BIGINT,
                                                 slot BIGINT, n BIGINT)
RETURNS TABLE (id BIGINT, event_id TEXT, topic TEXT, msg_key TEXT, headers TEXT, payload BYTEA,
               created_ms BIGINT)
LANGUAGE plpgsql VOLATILE SET enable_bitmapscan = off AS $$
DECLARE
    ids BIGINT[] := ARRAY(SELECT CAST(e.v AS BIGINT) FROM json_array_elements_text(sent) AS e(v));
BEGIN
    IF cardinality(ids) > 0 THEN
        PERFORM set_config('synchronous_commit', 'off', true);
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
