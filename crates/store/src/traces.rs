//! Request traces: what happened to each request, as a JSON document, kept for a while.

use sqlx::Row;

use crate::{Result, Store, StoreError, now_ms};

#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub request_id: String,
    pub tenant_id: Option<String>,
    pub created_at: i64,
    pub trace: serde_json::Value,
}

/// A trace already serialised: what the server writes, without building a
/// `serde_json::Value` first.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceText {
    pub request_id: String,
    pub tenant_id: Option<String>,
    pub created_at: i64,
    /// The trace as a JSON object.
    pub json: String,
}

impl From<Trace> for TraceText {
    fn from(t: Trace) -> TraceText {
        TraceText {
            request_id: t.request_id,
            tenant_id: t.tenant_id,
            created_at: t.created_at,
            json: t.trace.to_string(),
        }
    }
}

/// Rows in one multi-row INSERT of traces.
pub(crate) const ROWS_PER_INSERT: usize = 128;

/// Inserts traces in one statement.
pub(crate) async fn insert_many<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    executor: E,
    backend: crate::Backend,
    traces: &[&TraceText],
) -> Result<()> {
    let sql = format!(
        "INSERT INTO traces (request_id, tenant_id, created_at, trace) VALUES {}",
        crate::usage::values_clause(backend, 4, traces.len())
    );
    let mut q =
        sqlx::query_with(sqlx::AssertSqlSafe(sql), crate::usage::reserved_arguments(traces.len() * 4));
    for t in traces {
        q = q
            .bind(t.request_id.as_str())
            .bind(t.tenant_id.as_deref())
            .bind(t.created_at)
            .bind(t.json.as_str());
    }
    q.execute(executor).await.map_err(|e| {
        crate::tenants::conflict(e, || format!("request '{}' already has a trace", traces[0].request_id))
    })?;
    Ok(())
}

pub(crate) async fn insert<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    executor: E,
    t: &Trace,
) -> Result<()> {
    sqlx::query("INSERT INTO traces (request_id, tenant_id, created_at, trace) VALUES ($1, $2, $3, $4)")
        .bind(t.request_id.as_str())
        .bind(t.tenant_id.as_deref())
        .bind(t.created_at)
        .bind(t.trace.to_string())
        .execute(executor)
        .await
        .map_err(|e| {
            crate::tenants::conflict(e, || format!("request '{}' already has a trace", t.request_id))
        })?;
    Ok(())
}

impl Store {
    pub async fn put_trace(&self, trace: &Trace) -> Result<()> {
        insert(self.pool(), trace).await
    }

    pub async fn trace(&self, request_id: &str) -> Result<Trace> {
        let row =
            sqlx::query("SELECT request_id, tenant_id, created_at, trace FROM traces WHERE request_id = $1")
                .bind(request_id)
                .fetch_optional(self.pool())
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("trace '{request_id}'")))?;
        let text: String = row.try_get("trace")?;
        Ok(Trace {
            request_id: row.try_get("request_id")?,
            tenant_id: row.try_get("tenant_id")?,
            created_at: row.try_get("created_at")?,
            trace: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        })
    }

    /// Deletes traces older than `keep_ms`; returns how many.
    pub async fn purge_traces(&self, keep_ms: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM traces WHERE created_at < $1")
            .bind(now_ms() - keep_ms)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }
}
