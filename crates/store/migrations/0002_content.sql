-- Prompts and answers, kept only for tenants that opt in, until their retention period ends.
CREATE TABLE request_content (
    request_id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE INDEX request_content_tenant ON request_content (tenant_id, created_at)
