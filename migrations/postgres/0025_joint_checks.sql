-- A check inside a batch's end in one statement (`storage::joint`): the count a part came to,
-- the count it must come to, and which check it is. When they differ, the whole statement
-- fails with SQLSTATE SG001 and nothing of it is written, with or without a transaction
-- around it; so a batch's end can run as a statement on its own, without BEGIN, lock and
-- COMMIT round trips, and still be undone whole when a row is not as its handlers read it.
CREATE FUNCTION saga_expect(got BIGINT, want BIGINT, which BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
BEGIN
    IF got IS DISTINCT FROM want THEN
        RAISE EXCEPTION 'joint check % came to %, expected %', which, got, want
            USING ERRCODE = 'SG001';
    END IF;
    RETURN got;
END
$$;
