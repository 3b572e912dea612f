-- One trace per request: route, guardrail actions (counts, never values), timings, sampling
-- parameters, token counts and the model's provenance, as JSON. Kept for a configured time.
CREATE TABLE traces (
    request_id TEXT PRIMARY KEY,
    tenant_id TEXT,
    created_at BIGINT NOT NULL,
    trace TEXT NOT NULL
);
CREATE INDEX traces_created ON traces (created_at)
