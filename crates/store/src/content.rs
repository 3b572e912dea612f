//! Request content (the request body and the answer), kept only for tenants that opt in,
//! and purged when their retention period ends or when they opt out.

use serde::Serialize;
use sqlx::Row;

use crate::{Result, Store, StoreError, now_ms};

/// Retention when a tenant keeps content without saying for how long.
pub const DEFAULT_RETENTION_DAYS: i64 = 30;

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Content {
    pub request_id: String,
    pub tenant_id: String,
    pub created_at: i64,
    /// The request body as the client sent it.
    pub request: String,
    /// The answer as the client got it (JSON, or the event stream's text).
    pub response: String,
}

impl Store {
    pub async fn keep_content(&self, content: &Content) -> Result<()> {
        sqlx::query(
            "INSERT INTO request_content (request_id, tenant_id, created_at, request, response) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(content.request_id.as_str())
        .bind(content.tenant_id.as_str())
        .bind(content.created_at)
        .bind(content.request.as_str())
        .bind(content.response.as_str())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    pub async fn content(&self, request_id: &str) -> Result<Content> {
        let row = sqlx::query(
            "SELECT request_id, tenant_id, created_at, request, response FROM request_content WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("retained content of request '{request_id}'")))?;
        Ok(Content {
            request_id: row.try_get("request_id")?,
            tenant_id: row.try_get("tenant_id")?,
            created_at: row.try_get("created_at")?,
            request: row.try_get("request")?,
            response: row.try_get("response")?,
        })
    }

    /// Deletes content past its tenant's retention period, and all content of tenants that
    /// no longer keep it (or no longer exist). Returns how many requests were purged.
    pub async fn purge_content(&self) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM request_content WHERE NOT EXISTS (\
                 SELECT 1 FROM tenants t WHERE t.id = request_content.tenant_id AND t.retain_content = 1 \
                 AND request_content.created_at >= $1 - COALESCE(t.retention_days, $2) * 86400000)",
        )
        .bind(now_ms())
        .bind(DEFAULT_RETENTION_DAYS)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}
