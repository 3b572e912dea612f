-- Tenants own projects, projects own API keys. Limits are JSON (see tenants::Limits).
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    limits TEXT NOT NULL DEFAULT '{}',
    guardrail_policy TEXT,
    retain_content BIGINT NOT NULL DEFAULT 0,
    retention_days BIGINT,
    created_at BIGINT NOT NULL
);
CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    limits TEXT NOT NULL DEFAULT '{}',
    guardrail_policy TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (tenant_id, name)
);
-- Only the SHA-256 of a key is kept, with a short prefix to recognise it by.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    display_prefix TEXT NOT NULL,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    tenant_id TEXT REFERENCES tenants (id),
    project_id TEXT REFERENCES projects (id),
    models TEXT,
    limits TEXT NOT NULL DEFAULT '{}',
    expires_at BIGINT,
    revoked_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX api_keys_project ON api_keys (project_id);
-- One row per request: written at admission (status 'started'), completed at the end.
CREATE TABLE usage_records (
    request_id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    tenant_id TEXT,
    project_id TEXT,
    key_id TEXT,
    route TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT,
    stream BIGINT NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    http_status BIGINT,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cached_tokens BIGINT NOT NULL DEFAULT 0,
    cost DOUBLE PRECISION NOT NULL DEFAULT 0,
    latency_ms BIGINT,
    ttft_ms BIGINT,
    started_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX usage_started ON usage_records (started_at);
CREATE INDEX usage_tenant ON usage_records (tenant_id, started_at);
CREATE INDEX usage_open ON usage_records (status, instance);
-- Append-only: each row's hash covers its content and the previous row's hash.
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before_state TEXT,
    after_state TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
)
