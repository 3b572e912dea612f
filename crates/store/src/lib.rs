//! Ferry's durable state: tenants, projects, API keys, usage records and the audit log.
//!
//! One SQL layer serves two databases through sqlx's `Any` driver: SQLite (the embedded
//! default, one file in the data directory, WAL mode) and PostgreSQL (a `postgres://` URL,
//! for several replicas). The queries are written once, in the dialect both accept
//! (`$1` placeholders, `RETURNING`, `ON CONFLICT`), over plain types (text, 64-bit integers,
//! doubles), and so is the schema (`migrations/`). The same test suite
//! (`tests/store.rs`) runs against both. One exception: on a SQLite file the usage writer
//! commits its records through a typed SQLite connection of its own (`usage/writer.rs`).
//!
//! Each domain has its own module and error-free vocabulary: [`tenants`] (tenants and
//! projects with their limits), [`keys`] (hashed API keys and roles), [`usage`] (one record
//! per request, with its trace, written at admission and completed at the end), [`audit`]
//! (an append-only, hash-chained log of admin actions); [`reports`] reads usage and traces
//! for dashboards (time series with latency percentiles, trace listings).

pub mod audit;
pub mod content;
mod filter;
pub mod keys;
pub mod replicas;
pub mod reports;
pub mod tenants;
pub mod traces;
pub mod usage;

use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use audit::{AuditEntry, AuditVerification};
pub use keys::{ApiKey, NewKey, Role};
pub use replicas::Replica;
pub use tenants::{Limits, Project, Tenant};
pub use usage::{UsageFinish, UsageGroup, UsageQuery, UsageRecord, UsageStart, UsageWriter};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Serialises audit appends within this process (the chain's sequence number is the
    /// primary key, so replicas racing each other retry instead of forking the chain).
    audit_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    /// Opens `target`: a `postgres://` (or `postgresql://`) URL, or else the path of a SQLite
    /// file, created if missing. Applies pending migrations before returning.
    pub async fn open(target: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (url, backend) = if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            (target.to_string(), Backend::Postgres)
        } else {
            let path = Path::new(target);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Invalid(format!("cannot create the data directory {}: {e}", dir.display()))
                })?;
            }
            (format!("sqlite://{}?mode=rwc", path.display()), Backend::Sqlite)
        };
        let options: AnyConnectOptions = url.parse()?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the one writer; NORMAL is durable against
                        // process crashes (the test kills the server with SIGKILL). A new
                        // database gets 16 KiB pages (an existing one keeps its size): the usage
                        // records and traces are appended in large groups, and each page is a
                        // WAL frame written (and later checkpointed) with system calls of its
                        // own, so larger pages take a quarter of the calls (with migration 4's
                        // partial index, about 1.6 µs less CPU per request in
                        // `examples/usage_writer_bench.rs`).
                        conn.execute(
                            "PRAGMA page_size=16384; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; \
                             PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let store = Store { pool, backend, audit_lock: Default::default() };
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connection pool, for tools and tests that go around the store's vocabulary.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Applies the migrations this database hasn't seen, each in its own transaction.
    async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Postgres {
            // Replicas starting together take turns.
            conn.execute("SELECT pg_advisory_lock(7243057)").await?;
        }
        let result = async {
            conn.execute(
                "CREATE TABLE IF NOT EXISTS ferry_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )
            .await?;
            let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM ferry_migrations")
                .fetch_all(&mut *conn)
                .await?;
            for (version, script) in MIGRATIONS {
                if applied.contains(version) {
                    continue;
                }
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                for statement in script.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    tx.execute(statement).await?;
                }
                sqlx::query("INSERT INTO ferry_migrations (version, applied_at) VALUES ($1, $2)")
                    .bind(*version)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                tracing::info!(version, "store migration applied");
            }
            Ok::<_, StoreError>(())
        }
        .await;
        if self.backend == Backend::Postgres {
            conn.execute("SELECT pg_advisory_unlock(7243057)").await?;
        }
        result
    }
}

/// (version, script): statements separated by `;`, in the SQL that SQLite and PostgreSQL both
/// accept (a migration that needs to differ would carry one script per backend).
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_content.sql")),
    (3, include_str!("../migrations/0003_traces.sql")),
    (4, include_str!("../migrations/0004_usage_open_partial.sql")),
    (5, include_str!("../migrations/0005_trace_in_record.sql")),
    (6, include_str!("../migrations/0006_imported_key_display.sql")),
    (7, include_str!("../migrations/0007_replicas.sql")),
];

/// Milliseconds since the Unix epoch: every timestamp in the store.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A fresh identifier such as `ten_3f9c…` (96 random bits).
pub(crate) fn new_id(prefix: &str) -> String {
    let bytes: [u8; 12] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}
