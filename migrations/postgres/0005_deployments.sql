-- Deployed components, content-addressed (sha256 of the bytes), and the history of what was
-- deployed as which service, by whom, when. A service's active version is its latest row, so
-- a rollback is a new row naming an older digest and the history is never rewritten. Every
-- instance on this database follows the active versions.
CREATE TABLE components (
    digest     TEXT    PRIMARY KEY,
    wasm       BYTEA   NOT NULL,
    stored_ms  BIGINT  NOT NULL
);
CREATE TABLE deployments (
    id           BIGSERIAL PRIMARY KEY,
    service      TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    digest       TEXT    NOT NULL,
    deployed_by  TEXT    NOT NULL,
    deployed_ms  BIGINT  NOT NULL
);
CREATE INDEX deployments_by_service ON deployments (service, id);
