-- PostgreSQL's 0025 adds the function that fails a batch's end in one statement when one of
-- its checks does not hold; SQLite writes a batch's end statement by statement inside its
-- transaction. This keeps the two histories numbered alike.
SELECT 1;
