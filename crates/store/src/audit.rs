//! The audit log: every admin action, append-only, each row chained to the one before by a
//! SHA-256 over its content and the previous row's hash. Editing a row breaks its hash;
//! deleting one breaks the sequence and the next row's link. (Cutting rows off the end
//! leaves a shorter valid chain: compare the head's sequence number with one kept elsewhere
//! to catch that.)

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use crate::{Result, Store, StoreError, now_ms};

/// The hash the first row links to.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: i64,
    /// The key id (or `system`) that acted.
    pub actor: String,
    /// e.g. `tenant.create`, `key.revoke`, `config.reload`.
    pub action: String,
    /// What was acted on, e.g. a tenant or key id.
    pub target: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditVerification {
    pub ok: bool,
    pub rows: u64,
    /// The sequence number of the last row checked.
    pub head: Option<i64>,
    /// The first problem found, with the row it concerns.
    pub problem: Option<String>,
}

struct RawEntry {
    seq: i64,
    at: i64,
    actor: String,
    action: String,
    target: String,
    before: Option<String>,
    after: Option<String>,
    prev_hash: String,
    hash: String,
}

fn raw(row: &AnyRow) -> Result<RawEntry> {
    Ok(RawEntry {
        seq: row.try_get("seq")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        before: row.try_get("before_state")?,
        after: row.try_get("after_state")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

impl RawEntry {
    /// SHA-256 over the length-prefixed fields, so no two different rows hash the same bytes.
    fn computed_hash(&self) -> String {
        let mut h = Sha256::new();
        let (seq, at) = (self.seq.to_string(), self.at.to_string());
        for field in [&self.prev_hash, &seq, &at, &self.actor, &self.action, &self.target] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
        for field in [&self.before, &self.after] {
            match field {
                Some(f) => {
                    h.update([1]);
                    h.update((f.len() as u64).to_le_bytes());
                    h.update(f.as_bytes());
                }
                None => h.update([0]),
            }
        }
        hex::encode(h.finalize())
    }

    fn into_entry(self) -> AuditEntry {
        let parse = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        AuditEntry {
            seq: self.seq,
            at: self.at,
            actor: self.actor,
            action: self.action,
            target: self.target,
            before: parse(self.before),
            after: parse(self.after),
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
    }
}

const AUDIT_COLUMNS: &str = "seq, at, actor, action, target, before_state, after_state, prev_hash, hash";

impl Store {
    /// Appends an entry at the head of the chain.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        before: Option<&serde_json::Value>,
        after: Option<&serde_json::Value>,
    ) -> Result<AuditEntry> {
        let _turn = self.audit_lock.lock().await;
        let before = before.map(|v| v.to_string());
        let after = after.map(|v| v.to_string());
        // Another replica may append between our read of the head and our insert; the
        // sequence number is the primary key, so the loser retries on the new head.
        for _ in 0..16 {
            let head = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(self.pool())
                .await?;
            let (prev_seq, prev_hash) = match head {
                Some(row) => (row.try_get::<i64, _>("seq")?, row.try_get::<String, _>("hash")?),
                None => (0, GENESIS.to_string()),
            };
            let entry = RawEntry {
                seq: prev_seq + 1,
                at: now_ms(),
                actor: actor.to_string(),
                action: action.to_string(),
                target: target.to_string(),
                before: before.clone(),
                after: after.clone(),
                prev_hash,
                hash: String::new(),
            };
            let hash = entry.computed_hash();
            let inserted = sqlx::query(
                "INSERT INTO audit_log (seq, at, actor, action, target, before_state, after_state, prev_hash, hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(entry.seq)
            .bind(entry.at)
            .bind(entry.actor.as_str())
            .bind(entry.action.as_str())
            .bind(entry.target.as_str())
            .bind(entry.before.as_deref())
            .bind(entry.after.as_deref())
            .bind(entry.prev_hash.as_str())
            .bind(hash.as_str())
            .execute(self.pool())
            .await;
            match inserted {
                Ok(_) => return Ok(RawEntry { hash, ..entry }.into_entry()),
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict("the audit log is too busy; try again".into()))
    }

    /// Entries newest first, at most `limit`, optionally before a sequence number.
    pub async fn audit_entries(&self, limit: u32, before_seq: Option<i64>) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq < $1 ORDER BY seq DESC LIMIT $2"
        )))
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|r| raw(r).map(RawEntry::into_entry)).collect()
    }

    /// Walks the whole chain from the first row and reports the first break.
    pub async fn verify_audit(&self) -> Result<AuditVerification> {
        let mut rows = 0u64;
        let mut expected_prev = GENESIS.to_string();
        let mut expected_seq = 1i64;
        let mut after_seq = 0i64;
        loop {
            let page = sqlx::query(AssertSqlSafe(format!(
                "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT 1000"
            )))
            .bind(after_seq)
            .fetch_all(self.pool())
            .await?;
            if page.is_empty() {
                let head = (rows > 0).then_some(expected_seq - 1);
                return Ok(AuditVerification { ok: true, rows, head, problem: None });
            }
            for row in &page {
                let entry = raw(row)?;
                let problem = if entry.seq != expected_seq {
                    Some(format!("row {expected_seq} is missing (the next row is {})", entry.seq))
                } else if entry.prev_hash != expected_prev {
                    Some(format!("row {} does not link to the row before it", entry.seq))
                } else if entry.computed_hash() != entry.hash {
                    Some(format!("row {} was changed after it was written", entry.seq))
                } else {
                    None
                };
                if problem.is_some() {
                    return Ok(AuditVerification { ok: false, rows, head: Some(entry.seq), problem });
                }
                rows += 1;
                expected_seq += 1;
                after_seq = entry.seq;
                expected_prev = entry.hash;
            }
        }
    }
}
