-- The compensation ledger (SPEC B2, B4): per service and saga, whether a forward step was
-- applied and which event compensated it. The first compensation closes the service's part in
-- the saga: a second compensation and any later forward step are recorded but not applied. A
-- compensation with no forward step before it leaves a tombstone (forward_steps = 0).
CREATE TABLE saga_ledger (
    service          TEXT    NOT NULL,
    saga             TEXT    NOT NULL,
    forward_steps    BIGINT  NOT NULL DEFAULT 0,
    compensated_by   TEXT,
    compensated_ms   BIGINT,
    PRIMARY KEY (service, saga)
);
