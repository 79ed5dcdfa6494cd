-- Where each service's consumption stands, per topic partition: the next offset to read. Written
-- in the same transaction as the inbox records and effects of the events before it, so a
-- restart or a takeover by another instance resumes exactly after what was committed.
CREATE TABLE consumer_offsets (
    service      TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition    INTEGER NOT NULL,
    next_offset  BIGINT  NOT NULL,
    PRIMARY KEY (service, topic, partition)
);
