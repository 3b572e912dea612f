//! The processes serving from one database, each run under a name of its own
//! (`INSTANCE/RANDOM`) with a heartbeat, so that the usage records a crashed one left
//! `started` are reconciled by the others once its lease runs out, and two replicas given
//! the same instance name never reconcile each other's requests in flight.
//!
//! Only PostgreSQL holds `started` records (a SQLite store journals admissions beside the
//! database and ingests a crashed process's journal itself), but the table and the calls are
//! the same on both, and list the replicas of either.

use serde::Serialize;

use crate::{Result, Store, now_ms};

/// A running (or lately running) process of this database.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Replica {
    /// This run's name: the instance name and a random suffix.
    pub run: String,
    /// `FERRY_INSTANCE`, or the host name.
    pub instance: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
    /// Whether its last heartbeat is within the lease (a run silent for longer is taken
    /// for crashed, and its open records are closed).
    pub alive: bool,
}

/// A replica silent for a day is forgotten (its records were reconciled long before).
const FORGET_AFTER_MS: i64 = 86_400_000;

impl Store {
    /// Starts a run of `instance`: a new row, with a fresh heartbeat. Returns the run's name
    /// and the other runs of the same instance name that beat after `live_since_ms` (either
    /// a previous run that crashed moments ago, or another replica misnamed alike).
    pub async fn join(&self, instance: &str, live_since_ms: i64) -> Result<(String, Vec<Replica>)> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let run = format!("{instance}/{}", &suffix[..8]);
        let namesakes = sqlx::query_as::<_, (String, String, i64, i64)>(
            "SELECT run, instance, started_at, heartbeat_at FROM replicas \
             WHERE instance = $1 AND heartbeat_at >= $2 ORDER BY started_at",
        )
        .bind(instance)
        .bind(live_since_ms)
        .fetch_all(self.pool())
        .await?;
        let now = now_ms();
        sqlx::query("INSERT INTO replicas (run, instance, started_at, heartbeat_at) VALUES ($1, $2, $3, $3)")
            .bind(&run)
            .bind(instance)
            .bind(now)
            .execute(self.pool())
            .await?;
        Ok((run, namesakes.into_iter().map(replica).collect()))
    }

    /// Renews a run's lease. `false`: its row was gone (another replica took it for dead,
    /// and reconciled its records); it is written again.
    pub async fn heartbeat(&self, run: &str, instance: &str) -> Result<bool> {
        let now = now_ms();
        let done = sqlx::query("UPDATE replicas SET heartbeat_at = $1 WHERE run = $2")
            .bind(now)
            .bind(run)
            .execute(self.pool())
            .await?;
        if done.rows_affected() > 0 {
            return Ok(true);
        }
        sqlx::query(
            "INSERT INTO replicas (run, instance, started_at, heartbeat_at) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (run) DO UPDATE SET heartbeat_at = $3",
        )
        .bind(run)
        .bind(instance)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(false)
    }

    /// Ends a run that stopped cleanly (its records are all written).
    pub async fn leave(&self, run: &str) -> Result<()> {
        sqlx::query("DELETE FROM replicas WHERE run = $1").bind(run).execute(self.pool()).await?;
        Ok(())
    }

    /// The runs that beat within the last day, latest first; alive if within `lease_ms`.
    pub async fn replicas(&self, lease_ms: i64) -> Result<Vec<Replica>> {
        let now = now_ms();
        let rows = sqlx::query_as::<_, (String, String, i64, i64)>(
            "SELECT run, instance, started_at, heartbeat_at FROM replicas \
             WHERE heartbeat_at >= $1 ORDER BY heartbeat_at DESC, run",
        )
        .bind(now - FORGET_AFTER_MS)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(replica)
            .map(|r| Replica { alive: r.heartbeat_at >= now - lease_ms, ..r })
            .collect())
    }

    /// Marks `interrupted` the records left `started` by runs whose heartbeat is older than
    /// `lease_ms` (they crashed, or lost the database and their answers with it), and those
    /// of any run started more than a day ago (written before runs had names of their own).
    /// Runs silent for a day are forgotten. Returns how many records were reconciled.
    pub async fn reconcile_dead_replicas(&self, lease_ms: i64) -> Result<u64> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE usage_records SET status = 'interrupted', finished_at = $1 \
             WHERE status = 'started' AND (started_at < $2 \
               OR instance IN (SELECT run FROM replicas WHERE heartbeat_at < $3))",
        )
        .bind(now)
        .bind(now - FORGET_AFTER_MS)
        .bind(now - lease_ms)
        .execute(self.pool())
        .await?;
        sqlx::query("DELETE FROM replicas WHERE heartbeat_at < $1")
            .bind(now - FORGET_AFTER_MS)
            .execute(self.pool())
            .await?;
        Ok(done.rows_affected())
    }

    /// At the start of a run of `instance`: marks `interrupted` the records its earlier runs
    /// left `started` when they have been silent since `quiet_since_ms` (a run still beating
    /// may be a namesake replica, left to its lease), and those written under the bare name
    /// by versions before runs were named. Returns how many.
    pub async fn reconcile_earlier_runs(
        &self,
        instance: &str,
        run: &str,
        quiet_since_ms: i64,
    ) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE usage_records SET status = 'interrupted', finished_at = $1 \
             WHERE status = 'started' AND (instance = $2 OR instance IN \
               (SELECT run FROM replicas WHERE instance = $2 AND run <> $3 AND heartbeat_at < $4))",
        )
        .bind(now_ms())
        .bind(instance)
        .bind(run)
        .bind(quiet_since_ms)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }
}

fn replica((run, instance, started_at, heartbeat_at): (String, String, i64, i64)) -> Replica {
    Replica { run, instance, started_at, heartbeat_at, alive: true }
}
