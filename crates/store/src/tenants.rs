//! Tenants and their projects, each with optional limits.

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use crate::{Result, Store, StoreError, new_id, now_ms};

/// Rate limits and budgets; every field is optional (no limit). They apply to a key, a
/// project or a tenant, and a request must fit all three.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (prompt plus completion) per minute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Tokens per UTC day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// Tokens per UTC calendar month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_month: Option<u64>,
    /// Cost per UTC day, in the price table's currency.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_per_day: Option<f64>,
    /// Cost per UTC calendar month.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_per_month: Option<f64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    pub(crate) fn from_json(text: &str) -> Limits {
        serde_json::from_str(text).unwrap_or_default()
    }

    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub limits: Limits,
    /// The guardrail policy applied to this tenant's requests, by name.
    pub guardrail_policy: Option<String>,
    /// Whether prompts and completions may be kept (off unless the tenant opts in).
    pub retain_content: bool,
    pub retention_days: Option<i64>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Project {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub limits: Limits,
    pub guardrail_policy: Option<String>,
    pub created_at: i64,
}

/// The changeable settings of a tenant; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantUpdate {
    pub limits: Option<Limits>,
    pub guardrail_policy: Option<Option<String>>,
    pub retain_content: Option<bool>,
    pub retention_days: Option<Option<i64>>,
}

/// The changeable settings of a project.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectUpdate {
    pub limits: Option<Limits>,
    pub guardrail_policy: Option<Option<String>>,
}

const TENANT_COLUMNS: &str = "id, name, limits, guardrail_policy, retain_content, retention_days, created_at";
const PROJECT_COLUMNS: &str = "id, tenant_id, name, limits, guardrail_policy, created_at";

fn tenant(row: &AnyRow) -> Result<Tenant> {
    Ok(Tenant {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        limits: Limits::from_json(&row.try_get::<String, _>("limits")?),
        guardrail_policy: row.try_get("guardrail_policy")?,
        retain_content: row.try_get::<i64, _>("retain_content")? != 0,
        retention_days: row.try_get("retention_days")?,
        created_at: row.try_get("created_at")?,
    })
}

fn project(row: &AnyRow) -> Result<Project> {
    Ok(Project {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        limits: Limits::from_json(&row.try_get::<String, _>("limits")?),
        guardrail_policy: row.try_get("guardrail_policy")?,
        created_at: row.try_get("created_at")?,
    })
}

/// A unique-constraint failure as a conflict the caller can show.
pub(crate) fn conflict(error: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what()),
        _ => StoreError::Database(error),
    }
}

pub(crate) fn check_name(kind: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() || name.len() > 200 {
        return Err(StoreError::Invalid(format!("a {kind} name must be 1 to 200 characters")));
    }
    Ok(())
}

impl Store {
    pub async fn create_tenant(&self, name: &str, limits: &Limits) -> Result<Tenant> {
        check_name("tenant", name)?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO tenants (id, name, limits, created_at) VALUES ($1, $2, $3, $4) RETURNING {TENANT_COLUMNS}"
        )))
        .bind(new_id("ten"))
        .bind(name)
        .bind(limits.to_json())
        .bind(now_ms())
        .fetch_one(self.pool())
        .await
        .map_err(|e| conflict(e, || format!("a tenant named '{name}' already exists")))?;
        tenant(&row)
    }

    pub async fn tenant(&self, id: &str) -> Result<Tenant> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE id = $1")))
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("tenant '{id}'")))?;
        tenant(&row)
    }

    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {TENANT_COLUMNS} FROM tenants ORDER BY created_at, id"
        )))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(tenant).collect()
    }

    pub async fn update_tenant(&self, id: &str, update: &TenantUpdate) -> Result<Tenant> {
        let mut current = self.tenant(id).await?;
        if let Some(limits) = &update.limits {
            current.limits = limits.clone();
        }
        if let Some(policy) = &update.guardrail_policy {
            current.guardrail_policy = policy.clone();
        }
        if let Some(retain) = update.retain_content {
            current.retain_content = retain;
        }
        if let Some(days) = update.retention_days {
            current.retention_days = days;
        }
        sqlx::query(
            "UPDATE tenants SET limits = $1, guardrail_policy = $2, retain_content = $3, retention_days = $4 \
             WHERE id = $5",
        )
        .bind(current.limits.to_json())
        .bind(current.guardrail_policy.clone())
        .bind(current.retain_content as i64)
        .bind(current.retention_days)
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(current)
    }

    pub async fn create_project(&self, tenant_id: &str, name: &str, limits: &Limits) -> Result<Project> {
        check_name("project", name)?;
        self.tenant(tenant_id).await?;
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO projects (id, tenant_id, name, limits, created_at) VALUES ($1, $2, $3, $4, $5) \
             RETURNING {PROJECT_COLUMNS}"
        )))
        .bind(new_id("proj"))
        .bind(tenant_id)
        .bind(name)
        .bind(limits.to_json())
        .bind(now_ms())
        .fetch_one(self.pool())
        .await
        .map_err(|e| conflict(e, || format!("the tenant already has a project named '{name}'")))?;
        project(&row)
    }

    pub async fn project(&self, id: &str) -> Result<Project> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1")))
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("project '{id}'")))?;
        project(&row)
    }

    /// Every project, or a tenant's.
    pub async fn projects(&self, tenant_id: Option<&str>) -> Result<Vec<Project>> {
        let rows = match tenant_id {
            Some(tenant) => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {PROJECT_COLUMNS} FROM projects WHERE tenant_id = $1 ORDER BY created_at, id"
                )))
                .bind(tenant)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {PROJECT_COLUMNS} FROM projects ORDER BY created_at, id"
                )))
                .fetch_all(self.pool())
                .await?
            }
        };
        rows.iter().map(project).collect()
    }

    pub async fn update_project(&self, id: &str, update: &ProjectUpdate) -> Result<Project> {
        let mut current = self.project(id).await?;
        if let Some(limits) = &update.limits {
            current.limits = limits.clone();
        }
        if let Some(policy) = &update.guardrail_policy {
            current.guardrail_policy = policy.clone();
        }
        sqlx::query("UPDATE projects SET limits = $1, guardrail_policy = $2 WHERE id = $3")
            .bind(current.limits.to_json())
            .bind(current.guardrail_policy.clone())
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(current)
    }
}
