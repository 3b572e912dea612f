-- The running processes (replicas) of one database, each under a name of its own for this run
-- (`INSTANCE/RANDOM`), kept alive by a heartbeat. A replica whose heartbeat stopped for longer
-- than the lease crashed or lost its database: another replica reconciles the usage records
-- it left `started`, instead of leaving them for a day or for a restart under the same name.
CREATE TABLE replicas (
    run TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
)
