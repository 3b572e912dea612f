-- Only records still `started` are ever looked up by instance (reconciliation after a
-- crash, PostgreSQL's admission records). A partial index holds just those: a record written
-- whole, as every record is on SQLite, never enters it, one B-tree insert fewer per request.
DROP INDEX usage_open;
CREATE INDEX usage_open ON usage_records (instance) WHERE status = 'started'
