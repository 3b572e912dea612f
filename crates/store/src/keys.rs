//! API keys: 256 random bits behind a recognisable prefix, shown once, kept only as a
//! SHA-256 hash and a short display prefix.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use crate::tenants::{Limits, check_name, conflict};
use crate::{Result, Store, StoreError, new_id, now_ms};

/// Every key starts with this, so scanners and people recognise a leaked one.
pub const KEY_PREFIX: &str = "sk-ferry-";
/// How much of a generated key is kept in clear to tell keys apart in listings: the prefix
/// and 24 of its 256 random bits.
const DISPLAY_CHARS: usize = KEY_PREFIX.len() + 6;
/// How much of an imported key (one chosen outside Ferry, such as `FERRY_ADMIN_KEY`) is kept
/// in clear: its first four characters. Such a key may be as short as 16 characters, and no
/// prefix of it is known to carry nothing secret.
const IMPORTED_DISPLAY_CHARS: usize = 4;

/// The part of `secret` stored and shown in clear.
fn display_prefix(secret: &str) -> String {
    let shown = if secret.starts_with(KEY_PREFIX) { DISPLAY_CHARS } else { IMPORTED_DISPLAY_CHARS };
    secret.chars().take(shown).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, across tenants.
    Admin,
    /// Its own tenant: projects, keys, usage.
    TenantAdmin,
    /// Inference only.
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::TenantAdmin => "tenant_admin",
            Role::Member => "member",
        }
    }

    fn parse(s: &str) -> Role {
        match s {
            "admin" => Role::Admin,
            "tenant_admin" => Role::TenantAdmin,
            _ => Role::Member,
        }
    }
}

/// A key as stored: never the secret itself.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: String,
    pub name: String,
    pub display_prefix: String,
    pub role: Role,
    pub tenant_id: Option<String>,
    pub project_id: Option<String>,
    /// The models this key may use; `None` allows all.
    pub models: Option<Vec<String>>,
    pub limits: Limits,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
}

impl ApiKey {
    /// Usable now: not revoked, not expired.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| t > now_ms)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.iter().any(|allowed| allowed == model))
    }
}

/// What a new key is for. Admin keys belong to no tenant; tenant admins to a tenant;
/// members to a project (and through it to a tenant).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    pub role: Role,
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// The SHA-256 of a key, hex: what the store keeps and looks keys up by.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn generate_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

const KEY_COLUMNS: &str = "id, name, display_prefix, role, tenant_id, project_id, models, limits, expires_at, revoked_at, created_at";

fn key(row: &AnyRow) -> Result<ApiKey> {
    let models: Option<String> = row.try_get("models")?;
    Ok(ApiKey {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        display_prefix: row.try_get("display_prefix")?,
        role: Role::parse(&row.try_get::<String, _>("role")?),
        tenant_id: row.try_get("tenant_id")?,
        project_id: row.try_get("project_id")?,
        models: models.and_then(|m| serde_json::from_str(&m).ok()),
        limits: Limits::from_json(&row.try_get::<String, _>("limits")?),
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Creates a key and returns it with its secret, which is not stored and can't be shown again.
    pub async fn create_key(&self, new: &NewKey) -> Result<(ApiKey, String)> {
        let secret = generate_secret();
        let key = self.insert_key(new, &secret).await?;
        Ok((key, secret))
    }

    /// Stores a key whose secret comes from outside (the bootstrap admin key), and says
    /// whether it was stored now: the key already stored under this secret is returned as it
    /// is (a revoked one stays revoked).
    pub async fn import_key(&self, new: &NewKey, secret: &str) -> Result<(ApiKey, bool)> {
        if secret.len() < 16 {
            return Err(StoreError::Invalid("an imported key must be at least 16 characters".into()));
        }
        if let Some(existing) = self.key_by_secret(secret).await? {
            return Ok((existing, false));
        }
        match self.insert_key(new, secret).await {
            Ok(key) => Ok((key, true)),
            // Another replica starting with the same key stored it between the read and the
            // insert: its key is this one.
            Err(StoreError::Conflict(e)) => {
                self.key_by_secret(secret).await?.map(|key| (key, false)).ok_or(StoreError::Conflict(e))
            }
            Err(e) => Err(e),
        }
    }

    async fn insert_key(&self, new: &NewKey, secret: &str) -> Result<ApiKey> {
        check_name("key", &new.name)?;
        let (tenant_id, project_id) = match new.role {
            Role::Admin => {
                if new.tenant_id.is_some() || new.project_id.is_some() {
                    return Err(StoreError::Invalid("an admin key belongs to no tenant or project".into()));
                }
                (None, None)
            }
            Role::TenantAdmin => {
                let tenant = new
                    .tenant_id
                    .clone()
                    .ok_or_else(|| StoreError::Invalid("a tenant_admin key needs tenant_id".into()))?;
                self.tenant(&tenant).await?;
                (Some(tenant), None)
            }
            Role::Member => {
                let project_id = new
                    .project_id
                    .clone()
                    .ok_or_else(|| StoreError::Invalid("a member key needs project_id".into()))?;
                let project = self.project(&project_id).await?;
                if new.tenant_id.as_ref().is_some_and(|t| *t != project.tenant_id) {
                    return Err(StoreError::NotFound(format!("project '{project_id}'")));
                }
                (Some(project.tenant_id), Some(project.id))
            }
        };
        let display = display_prefix(secret);
        let models = new.models.as_ref().map(|m| serde_json::to_string(m).unwrap_or_default());
        let row = sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO api_keys (id, hash, display_prefix, name, role, tenant_id, project_id, models, limits, \
             expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING {KEY_COLUMNS}"
        )))
        .bind(new_id("key"))
        .bind(hash_secret(secret))
        .bind(display)
        .bind(new.name.as_str())
        .bind(new.role.as_str())
        .bind(tenant_id)
        .bind(project_id)
        .bind(models)
        .bind(new.limits.to_json())
        .bind(new.expires_at)
        .bind(now_ms())
        .fetch_one(self.pool())
        .await
        .map_err(|e| conflict(e, || "this key is already stored".into()))?;
        key(&row)
    }

    /// The key with this secret, active or not. The lookup is by hash (an index probe), so
    /// the time it takes says nothing about how much of a secret matched.
    pub async fn key_by_secret(&self, secret: &str) -> Result<Option<ApiKey>> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE hash = $1")))
            .bind(hash_secret(secret))
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(key).transpose()
    }

    pub async fn key(&self, id: &str) -> Result<ApiKey> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1")))
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key '{id}'")))?;
        key(&row)
    }

    /// Every key, or a tenant's.
    pub async fn keys(&self, tenant_id: Option<&str>) -> Result<Vec<ApiKey>> {
        let rows = match tenant_id {
            Some(tenant) => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 ORDER BY created_at, id"
                )))
                .bind(tenant)
                .fetch_all(self.pool())
                .await?
            }
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id"
                )))
                .fetch_all(self.pool())
                .await?
            }
        };
        rows.iter().map(key).collect()
    }

    /// Whether any admin key can still be used: what turns authentication on.
    pub async fn has_active_admin_key(&self) -> Result<bool> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $1)",
        )
        .bind(now_ms())
        .fetch_one(self.pool())
        .await?;
        Ok(count > 0)
    }

    /// Whether any key was ever made (revoked and expired ones included): what turns
    /// authentication on, for good. A server that had keys never falls back to the keyless
    /// single-user mode because its keys were revoked or expired.
    pub async fn has_keys(&self) -> Result<bool> {
        let count: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM (SELECT 1 FROM api_keys LIMIT 1) AS any_key")
                .fetch_one(self.pool())
                .await?;
        Ok(count > 0)
    }

    /// Revokes a key; revoking twice keeps the first time. The last admin key that can be
    /// used is not revoked (a conflict): nobody could manage the server after it.
    pub async fn revoke_key(&self, id: &str) -> Result<ApiKey> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL \
             AND (role <> 'admin' OR EXISTS (SELECT 1 FROM api_keys other WHERE other.role = 'admin' \
             AND other.id <> $2 AND other.revoked_at IS NULL AND (other.expires_at IS NULL OR other.expires_at > $1)))",
        )
        .bind(now)
        .bind(id)
        .execute(self.pool())
        .await?;
        let key = self.key(id).await?;
        if done.rows_affected() == 0 && key.revoked_at.is_none() {
            return Err(StoreError::Conflict(format!(
                "key '{id}' is the last admin key that can be used: create another admin key before revoking it"
            )));
        }
        Ok(key)
    }

    pub async fn set_key_limits(&self, id: &str, limits: &Limits) -> Result<ApiKey> {
        sqlx::query("UPDATE api_keys SET limits = $1 WHERE id = $2")
            .bind(limits.to_json())
            .bind(id)
            .execute(self.pool())
            .await?;
        self.key(id).await
    }
}
