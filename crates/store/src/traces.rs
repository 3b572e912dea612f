//! Request traces: what happened to each request, as a JSON document, kept for a while.
//!
//! A trace is a column of its request's usage record (`usage_records.trace`), written with
//! the record in the same row when the request ends ([`UsageFinish::trace`]): one row per
//! request instead of two. Retention clears the column and keeps the record.
//!
//! [`UsageFinish::trace`]: crate::UsageFinish::trace

use sqlx::Row;

use crate::{Result, Store, StoreError, now_ms};

#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub request_id: String,
    pub tenant_id: Option<String>,
    /// When its request started (the record's `started_at`), in milliseconds since the epoch.
    pub created_at: i64,
    pub trace: serde_json::Value,
}

impl Store {
    /// Sets the trace of a recorded request (tools and tests; the server writes traces with
    /// their records through the [`UsageWriter`](crate::UsageWriter)).
    pub async fn put_trace(&self, request_id: &str, trace: &serde_json::Value) -> Result<()> {
        let done = sqlx::query("UPDATE usage_records SET trace = $1 WHERE request_id = $2")
            .bind(trace.to_string())
            .bind(request_id)
            .execute(self.pool())
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("usage record '{request_id}'")));
        }
        Ok(())
    }

    pub async fn trace(&self, request_id: &str) -> Result<Trace> {
        let row = sqlx::query(
            "SELECT request_id, tenant_id, started_at, trace FROM usage_records \
             WHERE request_id = $1 AND trace IS NOT NULL",
        )
        .bind(request_id)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("trace '{request_id}'")))?;
        let text: String = row.try_get("trace")?;
        Ok(Trace {
            request_id: row.try_get("request_id")?,
            tenant_id: row.try_get("tenant_id")?,
            created_at: row.try_get("started_at")?,
            trace: serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        })
    }

    /// Clears the traces of requests started more than `keep_ms` ago (their usage records
    /// stay); returns how many.
    pub async fn purge_traces(&self, keep_ms: i64) -> Result<u64> {
        let done =
            sqlx::query("UPDATE usage_records SET trace = NULL WHERE trace IS NOT NULL AND started_at < $1")
                .bind(now_ms() - keep_ms)
                .execute(self.pool())
                .await?;
        Ok(done.rows_affected())
    }
}
