//! Usage metering that loses nothing: every admitted request gets exactly one record,
//! completed once when it ends (`ok`, `error`, `cancelled`), or marked `interrupted` at the
//! next start when a crash cut it short.
//!
//! How the admission is made durable depends on the database. On PostgreSQL (shared by
//! replicas) the record is inserted with status `started` before the request runs and
//! updated when it ends; records a crash left `started` are reconciled by
//! [`Store::reconcile_dead_replicas`] and [`Store::reconcile_earlier_runs`]. On SQLite (a local file) the admission is a line in a local
//! journal (`journal.rs`), and the record reaches the database once, complete, when the
//! request ends; journal lines a crash left behind are ingested as `interrupted` by
//! [`Store::open_usage_writer`] at the next start. Either way [`UsageWriter`] commits records
//! in groups, so a busy server writes few, large transactions. A request's trace is a column
//! of its record, written with the completion (see `traces`).

mod journal;
mod writer;

pub use writer::{GATHER, UsageWriter};

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sqlx::error::BoxDynError;
use sqlx::{AssertSqlSafe, Row};

use crate::filter::Filter;
use crate::{Result, Store, StoreError, now_ms};

/// What is known when a request is admitted.
///
/// Its texts are shared (`Arc<str>`): the server holds each of them already (the key's ids
/// once per key, the instance once per process), and the SQLite writer binds them as they
/// are, where a `String` was copied at admission and again at every bind.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UsageStart {
    #[serde(with = "shared")]
    pub request_id: Arc<str>,
    /// The run that admitted it, `INSTANCE/RANDOM` (see `replicas.rs`).
    #[serde(with = "shared")]
    pub instance: Arc<str>,
    #[serde(with = "shared_or_none", default)]
    pub tenant_id: Option<Arc<str>>,
    #[serde(with = "shared_or_none", default)]
    pub project_id: Option<Arc<str>>,
    #[serde(with = "shared_or_none", default)]
    pub key_id: Option<Arc<str>>,
    /// The API route, e.g. `/v1/chat/completions`.
    #[serde(with = "shared")]
    pub route: Arc<str>,
    #[serde(with = "shared")]
    pub model: Arc<str>,
    pub stream: bool,
    pub started_at: i64,
}

/// An `Arc<str>` as a JSON string (serde's own impl needs its `rc` feature, which would
/// rebuild every crate that uses serde).
mod shared {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(text: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        String::deserialize(d).map(Arc::from)
    }
}

/// An `Option<Arc<str>>` as a JSON string or `null`.
mod shared_or_none {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(text: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
        match text {
            Some(text) => s.serialize_some(&**text),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
        Option::<String>::deserialize(d).map(|text| text.map(Arc::from))
    }
}

/// What is known when it ends.
#[derive(Debug, Clone, Default)]
pub struct UsageFinish {
    pub provider: Option<String>,
    /// `ok`, `error` or `cancelled`.
    pub status: String,
    pub http_status: u16,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cost: f64,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    /// The request's trace, a JSON object (see `traces`), stored in the record's row.
    pub trace: Option<String>,
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRecord {
    pub request_id: String,
    pub tenant_id: Option<String>,
    pub project_id: Option<String>,
    pub key_id: Option<String>,
    pub route: String,
    pub model: String,
    pub provider: Option<String>,
    pub status: String,
    pub http_status: Option<i64>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cost: f64,
    pub latency_ms: Option<i64>,
    pub ttft_ms: Option<i64>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
}

/// What to aggregate usage by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Tenant,
    Project,
    Key,
    Model,
    Day,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "tenant" => GroupBy::Tenant,
            "project" => GroupBy::Project,
            "key" => GroupBy::Key,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            _ => return None,
        })
    }

    fn column(self) -> &'static str {
        match self {
            GroupBy::Tenant => "tenant_id",
            GroupBy::Project => "project_id",
            GroupBy::Key => "key_id",
            GroupBy::Model => "model",
            // Integer division works alike in both databases; the date is formatted here.
            GroupBy::Day => "started_at / 86400000",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct UsageQuery {
    /// Only this tenant's records (a tenant admin's view).
    pub tenant_id: Option<String>,
    /// Inclusive start and exclusive end, in milliseconds since the epoch.
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub group_by: Vec<GroupBy>,
}

/// One aggregated row; the grouping fields not asked for are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct UsageGroup {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `YYYY-MM-DD`, UTC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    pub requests: i64,
    /// Requests that failed or were cut short by a crash (client cancellations are not errors).
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cost: f64,
}

const RECORD_COLUMNS: &str = "request_id, tenant_id, project_id, key_id, route, model, provider, status, \
     http_status, prompt_tokens, completion_tokens, cached_tokens, cost, latency_ms, ttft_ms, started_at, finished_at";

/// Which scope a spending total is for.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    Tenant(&'a str),
    Project(&'a str),
    Key(&'a str),
}

impl Store {
    /// Writes the admission record. It is committed before this returns.
    pub async fn start_usage(&self, start: &UsageStart) -> Result<()> {
        insert_start(self.pool(), start).await
    }

    /// Completes a record once; a second finish (or one after reconciliation) changes
    /// nothing and returns false.
    pub async fn finish_usage(&self, request_id: &str, finish: &UsageFinish) -> Result<bool> {
        update_finish(self.pool(), request_id, finish).await
    }

    /// A writer that commits admission and completion records in groups: one transaction
    /// for whatever arrived while the previous one committed. An admission still returns
    /// only once its record is committed.
    pub fn usage_writer(&self) -> UsageWriter {
        UsageWriter::spawn(self.clone(), None)
    }

    /// The writer a server uses. On SQLite, admissions go to a journal beside the database
    /// file (see the module comment); what an earlier run's journal left is written first,
    /// as `interrupted` records (their number is logged). On PostgreSQL this is
    /// [`Store::usage_writer`].
    pub async fn open_usage_writer(&self) -> Result<UsageWriter> {
        let Some(dir) = self.usage_journal_dir().await? else { return Ok(self.usage_writer()) };
        let (starts, segments) = journal::leftovers(&dir)?;
        if !starts.is_empty() {
            let finished_at = now_ms();
            let rows: Vec<Whole<'_>> = starts.iter().map(|s| (s, None, finished_at)).collect();
            let mut tx = self.pool().begin().await?;
            let mut reconciled = 0;
            for chunk in insert_chunks(&rows) {
                reconciled += insert_records(&mut *tx, self.backend(), chunk, true).await?;
            }
            tx.commit().await?;
            if reconciled > 0 {
                tracing::warn!(
                    reconciled,
                    "usage records of requests interrupted by an earlier crash were written"
                );
            }
        }
        for path in segments {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not delete an ingested journal segment");
            }
        }
        let journal = journal::Journal::open(&dir)?;
        Ok(UsageWriter::spawn(self.clone(), Some(std::sync::Arc::new(journal))))
    }

    /// Where a SQLite store keeps its usage journal: beside the database file. `None` on
    /// PostgreSQL, or for a SQLite database without a file.
    async fn usage_journal_dir(&self) -> Result<Option<std::path::PathBuf>> {
        Ok(self.sqlite_file().await?.map(|f| std::path::PathBuf::from(f + ".usage-journal")))
    }

    /// The file of a SQLite store; `None` on PostgreSQL, or for a SQLite database without a
    /// file (in memory).
    async fn sqlite_file(&self) -> Result<Option<String>> {
        if self.backend() != crate::Backend::Sqlite {
            return Ok(None);
        }
        let file: Option<String> =
            sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                .fetch_optional(self.pool())
                .await?;
        Ok(file.filter(|f| !f.is_empty()))
    }

    pub async fn usage_record(&self, request_id: &str) -> Result<UsageRecord> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {RECORD_COLUMNS} FROM usage_records WHERE request_id = $1"
        )))
        .bind(request_id)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("usage record '{request_id}'")))?;
        Ok(UsageRecord {
            request_id: row.try_get("request_id")?,
            tenant_id: row.try_get("tenant_id")?,
            project_id: row.try_get("project_id")?,
            key_id: row.try_get("key_id")?,
            route: row.try_get("route")?,
            model: row.try_get("model")?,
            provider: row.try_get("provider")?,
            status: row.try_get("status")?,
            http_status: row.try_get("http_status")?,
            prompt_tokens: row.try_get("prompt_tokens")?,
            completion_tokens: row.try_get("completion_tokens")?,
            cached_tokens: row.try_get("cached_tokens")?,
            cost: row.try_get("cost")?,
            latency_ms: row.try_get("latency_ms")?,
            ttft_ms: row.try_get("ttft_ms")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
        })
    }

    /// Aggregates records by the asked-for fields, in a stable order.
    pub async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageGroup>> {
        let scope = Filter::scope(query.tenant_id.as_deref(), "started_at", query.from_ms, query.to_ms);
        let filter = scope.clause();
        let keys: Vec<String> =
            query.group_by.iter().enumerate().map(|(i, g)| format!("{} AS g{i}", g.column())).collect();
        let select_keys = if keys.is_empty() { String::new() } else { format!("{}, ", keys.join(", ")) };
        let group = if keys.is_empty() {
            String::new()
        } else {
            let positions: Vec<String> = (1..=keys.len()).map(|i| i.to_string()).collect();
            format!("GROUP BY {0} ORDER BY {0}", positions.join(", "))
        };
        let sql = format!(
            "SELECT {select_keys}COUNT(*) AS requests, \
             CAST(COALESCE(SUM(CASE WHEN status IN ('error', 'interrupted') THEN 1 ELSE 0 END), 0) AS BIGINT) AS errors, \
             CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT) AS prompt_tokens, \
             CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT) AS completion_tokens, \
             CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT) AS cached_tokens, \
             CAST(COALESCE(SUM(cost), 0) AS DOUBLE PRECISION) AS cost \
             FROM usage_records {filter} {group}"
        );
        let rows = scope.bind(sqlx::query(AssertSqlSafe(sql))).fetch_all(self.pool()).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut g = UsageGroup {
                requests: row.try_get("requests")?,
                errors: row.try_get("errors")?,
                prompt_tokens: row.try_get("prompt_tokens")?,
                completion_tokens: row.try_get("completion_tokens")?,
                cached_tokens: row.try_get("cached_tokens")?,
                // A sum of many float costs carries binary noise (0.8870000000000007); no
                // price has more than nine decimals.
                cost: (row.try_get::<f64, _>("cost")? * 1e9).round() / 1e9,
                ..Default::default()
            };
            for (i, by) in query.group_by.iter().enumerate() {
                let column = format!("g{i}");
                match by {
                    GroupBy::Tenant => g.tenant_id = row.try_get(column.as_str())?,
                    GroupBy::Project => g.project_id = row.try_get(column.as_str())?,
                    GroupBy::Key => g.key_id = row.try_get(column.as_str())?,
                    GroupBy::Model => g.model = row.try_get(column.as_str())?,
                    GroupBy::Day => {
                        let day: i64 = row.try_get(column.as_str())?;
                        g.day = Some(format_day(day));
                    }
                }
            }
            out.push(g);
        }
        Ok(out)
    }

    /// Tokens and cost a scope has spent since `since_ms` (for budgets).
    pub async fn spent(&self, scope: Scope<'_>, since_ms: i64) -> Result<(u64, f64)> {
        let (column, id) = match scope {
            Scope::Tenant(id) => ("tenant_id", id),
            Scope::Project(id) => ("project_id", id),
            Scope::Key(id) => ("key_id", id),
        };
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT CAST(COALESCE(SUM(prompt_tokens + completion_tokens), 0) AS BIGINT) AS tokens, \
             CAST(COALESCE(SUM(cost), 0) AS DOUBLE PRECISION) AS cost \
             FROM usage_records WHERE {column} = $1 AND started_at >= $2"
        )))
        .bind(id)
        .bind(since_ms)
        .fetch_one(self.pool())
        .await?;
        let tokens: i64 = row.try_get("tokens")?;
        Ok((tokens.max(0) as u64, row.try_get("cost")?))
    }
}

/// The databases the usage statements run on: sqlx's `Any` (either database, through the
/// store's pool) and SQLite typed (the usage writer's own connection, see `writer`). Values
/// are added to a statement's arguments one by one, in the order of its placeholders.
pub(crate) trait UsageDb: sqlx::Database<Arguments: sqlx::IntoArguments<Self> + 'static> {
    fn text(args: &mut Self::Arguments, value: Option<&str>) -> std::result::Result<(), BoxDynError>;
    /// A text the caller shares: SQLite's driver keeps the `Arc` itself, with no copy.
    fn shared(args: &mut Self::Arguments, value: Option<&Arc<str>>) -> std::result::Result<(), BoxDynError>;
    fn int(args: &mut Self::Arguments, value: Option<i64>) -> std::result::Result<(), BoxDynError>;
    fn double(args: &mut Self::Arguments, value: f64) -> std::result::Result<(), BoxDynError>;
    fn rows_affected(done: &Self::QueryResult) -> u64;
}

macro_rules! usage_db {
    ($db:ty, $text:expr, $shared:expr) => {
        impl UsageDb for $db {
            fn text(args: &mut Self::Arguments, value: Option<&str>) -> std::result::Result<(), BoxDynError> {
                sqlx::Arguments::add(args, value.map($text))
            }
            fn shared(
                args: &mut Self::Arguments,
                value: Option<&Arc<str>>,
            ) -> std::result::Result<(), BoxDynError> {
                sqlx::Arguments::add(args, value.map($shared))
            }
            fn int(args: &mut Self::Arguments, value: Option<i64>) -> std::result::Result<(), BoxDynError> {
                sqlx::Arguments::add(args, value)
            }
            fn double(args: &mut Self::Arguments, value: f64) -> std::result::Result<(), BoxDynError> {
                sqlx::Arguments::add(args, value)
            }
            fn rows_affected(done: &Self::QueryResult) -> u64 {
                done.rows_affected()
            }
        }
    };
}
usage_db!(sqlx::Any, |text: &str| text, AsRef::<str>::as_ref);
// SQLite's driver copies a `&str` into a `String` and that into an `Arc` of its own (two
// allocations a text, ten texts a record); an `Arc<str>` it takes as it is.
usage_db!(sqlx::Sqlite, Arc::<str>::from, Arc::clone);

/// Arguments with room for `n` values: a multi-row statement's thousand-odd values are pushed
/// without the buffer being regrown (and copied) a dozen times.
fn arguments<DB: UsageDb>(n: usize) -> DB::Arguments {
    let mut arguments = DB::Arguments::default();
    sqlx::Arguments::reserve(&mut arguments, n, 0);
    arguments
}

fn encode_error(e: BoxDynError) -> StoreError {
    StoreError::Database(sqlx::Error::Encode(e))
}

/// The columns that name a request, in the order both inserts list them first: request id,
/// instance, tenant, project, key, route, model.
fn bind_identity<DB: UsageDb>(
    args: &mut DB::Arguments,
    start: &UsageStart,
) -> std::result::Result<(), BoxDynError> {
    DB::shared(args, Some(&start.request_id))?;
    DB::shared(args, Some(&start.instance))?;
    DB::shared(args, start.tenant_id.as_ref())?;
    DB::shared(args, start.project_id.as_ref())?;
    DB::shared(args, start.key_id.as_ref())?;
    DB::shared(args, Some(&start.route))?;
    DB::shared(args, Some(&start.model))
}

async fn insert_start<'e, DB: UsageDb, E: sqlx::Executor<'e, Database = DB>>(
    executor: E,
    start: &UsageStart,
) -> Result<()> {
    let mut args = arguments::<DB>(9);
    let add = |args: &mut DB::Arguments| {
        bind_identity::<DB>(args, start)?;
        DB::int(args, Some(start.stream as i64))?;
        DB::int(args, Some(start.started_at))
    };
    add(&mut args).map_err(encode_error)?;
    sqlx::query_with(
        "INSERT INTO usage_records (request_id, instance, tenant_id, project_id, key_id, route, model, stream, \
         status, started_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'started', $9)",
        args,
    )
    .execute(executor)
    .await
    .map_err(|e| crate::tenants::conflict(e, || format!("request id '{}' is taken", start.request_id)))?;
    Ok(())
}

async fn update_finish<'e, DB: UsageDb, E: sqlx::Executor<'e, Database = DB>>(
    executor: E,
    request_id: &str,
    finish: &UsageFinish,
) -> Result<bool> {
    let mut args = arguments::<DB>(12);
    let add = |args: &mut DB::Arguments| {
        DB::text(args, finish.provider.as_deref())?;
        DB::text(args, Some(&finish.status))?;
        DB::int(args, Some(finish.http_status as i64))?;
        DB::int(args, Some(finish.prompt_tokens as i64))?;
        DB::int(args, Some(finish.completion_tokens as i64))?;
        DB::int(args, Some(finish.cached_tokens as i64))?;
        DB::double(args, finish.cost)?;
        DB::int(args, Some(finish.latency_ms as i64))?;
        DB::int(args, finish.ttft_ms.map(|t| t as i64))?;
        DB::int(args, Some(now_ms()))?;
        DB::text(args, finish.trace.as_deref())?;
        DB::text(args, Some(request_id))
    };
    add(&mut args).map_err(encode_error)?;
    let done = sqlx::query_with(
        "UPDATE usage_records SET provider = $1, status = $2, http_status = $3, prompt_tokens = $4, \
         completion_tokens = $5, cached_tokens = $6, cost = $7, latency_ms = $8, ttft_ms = $9, finished_at = $10, \
         trace = $11 WHERE request_id = $12 AND status IN ('started', 'interrupted')",
        args,
    )
    .execute(executor)
    .await?;
    Ok(DB::rows_affected(&done) == 1)
}

/// A record's columns as written whole: its admission, how it ended (`None`: interrupted)
/// and when.
pub(crate) type Whole<'a> = (&'a UsageStart, Option<&'a UsageFinish>, i64);

const FULL_COLUMNS: &str = "request_id, instance, tenant_id, project_id, key_id, route, model, provider, stream, \
     status, http_status, prompt_tokens, completion_tokens, cached_tokens, cost, latency_ms, ttft_ms, started_at, \
     finished_at, trace";
const N_FULL_COLUMNS: usize = 20;
/// Most rows in one multi-row INSERT: 64 × 20 values, far under either database's limit.
const ROWS_PER_INSERT: usize = 64;

/// Splits rows into multi-row INSERTs of 64, 32, 16... or 1 rows: seven statement shapes in
/// all, each prepared once per connection and then found in its statement cache, where a
/// group's remainder of any size would make a new statement of most groups (SQLite takes
/// about a million instructions to prepare one of 20 rows; at one request at a time, that
/// was 15k instructions a request under callgrind).
pub(crate) fn insert_chunks<T>(rows: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = rows;
    std::iter::from_fn(move || {
        let n = rest.len().min(ROWS_PER_INSERT);
        if n == 0 {
            return None;
        }
        // The largest power of two not above n.
        let (chunk, tail) = rest.split_at(1 << n.ilog2());
        rest = tail;
        Some(chunk)
    })
}

/// The INSERT of `rows` whole records, made once per shape: the statement cache finds a
/// statement by its text, which is then neither rebuilt nor copied.
fn insert_sql(backend: crate::Backend, rows: usize, skip_existing: bool) -> std::borrow::Cow<'static, str> {
    const SHAPES: usize = ROWS_PER_INSERT.ilog2() as usize + 1;
    static MADE: [[std::sync::OnceLock<String>; SHAPES]; 4] =
        [const { [const { std::sync::OnceLock::new() }; SHAPES] }; 4];
    let make = || {
        let conflict = if skip_existing { " ON CONFLICT (request_id) DO NOTHING" } else { "" };
        // On SQLite a statement that may abort half-way (the default for a constraint) inside
        // a transaction keeps a statement journal: a copy of every page it touches, the table's
        // and each index's, 16 KiB each (about 4k instructions a request under callgrind).
        // `OR FAIL` stops at the failing row without undoing the statement's earlier rows,
        // which changes nothing here: a failed group's transaction is rolled back whole and
        // its records retried one by one.
        let or_fail = if backend == crate::Backend::Sqlite && !skip_existing { " OR FAIL" } else { "" };
        format!(
            "INSERT{or_fail} INTO usage_records ({FULL_COLUMNS}) VALUES {}{conflict}",
            values_clause(backend, N_FULL_COLUMNS, rows)
        )
    };
    if !rows.is_power_of_two() || rows > ROWS_PER_INSERT {
        return make().into();
    }
    let kind = usize::from(backend == crate::Backend::Postgres) * 2 + usize::from(skip_existing);
    MADE[kind][rows.ilog2() as usize].get_or_init(make).as_str().into()
}

/// The VALUES of a multi-row INSERT: `($1, $2, ...), ...` on PostgreSQL, and anonymous
/// `(?, ?, ...), ...` on SQLite, the one place the dialects part: SQLite looks each `$n` up by
/// name in a list as long as the statement's parameters, which is quadratic in a statement of
/// a thousand of them.
fn values_clause(backend: crate::Backend, columns: usize, rows: usize) -> String {
    use std::fmt::Write;
    let mut sql = String::with_capacity(rows * columns * 6);
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            sql.push_str(if column == 0 { "" } else { ", " });
            match backend {
                crate::Backend::Sqlite => sql.push('?'),
                crate::Backend::Postgres => {
                    let _ = write!(sql, "${}", row * columns + column + 1);
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// Inserts whole records in one statement (of a size [`insert_chunks`] makes, or else it is
/// prepared anew); with `skip_existing`, a record already there is
/// left as it is (journal ingestion). Returns how many were inserted.
async fn insert_records<'e, DB: UsageDb, E: sqlx::Executor<'e, Database = DB>>(
    executor: E,
    backend: crate::Backend,
    rows: &[Whole<'_>],
    skip_existing: bool,
) -> Result<u64> {
    let sql = insert_sql(backend, rows.len(), skip_existing);
    let mut args = arguments::<DB>(rows.len() * N_FULL_COLUMNS);
    let add = |args: &mut DB::Arguments| {
        for (start, finish, finished_at) in rows {
            bind_identity::<DB>(args, start)?;
            DB::text(args, finish.and_then(|f| f.provider.as_deref()))?;
            DB::int(args, Some(start.stream as i64))?;
            DB::text(args, Some(finish.map_or("interrupted", |f| f.status.as_str())))?;
            DB::int(args, finish.map(|f| f.http_status as i64))?;
            DB::int(args, Some(finish.map_or(0, |f| f.prompt_tokens as i64)))?;
            DB::int(args, Some(finish.map_or(0, |f| f.completion_tokens as i64)))?;
            DB::int(args, Some(finish.map_or(0, |f| f.cached_tokens as i64)))?;
            DB::double(args, finish.map_or(0.0, |f| f.cost))?;
            DB::int(args, finish.map(|f| f.latency_ms as i64))?;
            DB::int(args, finish.and_then(|f| f.ttft_ms.map(|t| t as i64)))?;
            DB::int(args, Some(start.started_at))?;
            DB::int(args, Some(*finished_at))?;
            DB::text(args, finish.and_then(|f| f.trace.as_deref()))?;
        }
        Ok::<_, BoxDynError>(())
    };
    add(&mut args).map_err(encode_error)?;
    let done = sqlx::query_with(AssertSqlSafe(sql), args).execute(executor).await.map_err(|e| {
        crate::tenants::conflict(e, || format!("request id '{}' is taken", rows[0].0.request_id))
    })?;
    Ok(DB::rows_affected(&done))
}

/// Days since the epoch as a UTC date.
pub fn format_day(days: i64) -> String {
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Days since the epoch as (year, month, day), UTC (civil-from-days, after Howard Hinnant).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The start of the UTC day and month containing `ms`, in milliseconds (for budgets).
pub fn day_and_month_start(ms: i64) -> (i64, i64) {
    const DAY: i64 = 86_400_000;
    let day_start = ms.div_euclid(DAY) * DAY;
    // Arithmetic only: the limiter asks for every scope of every request.
    let (_, _, day_of_month) = civil_from_days(ms.div_euclid(DAY));
    (day_start, day_start - (day_of_month - 1) * DAY)
}

#[cfg(test)]
mod tests {
    #[test]
    fn inserts_come_in_seven_sizes() {
        let sizes = |n: usize| super::insert_chunks(&vec![0; n]).map(<[i32]>::len).collect::<Vec<_>>();
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(1), vec![1]);
        assert_eq!(sizes(64), vec![64]);
        assert_eq!(sizes(200), vec![64, 64, 64, 8]);
        assert_eq!(sizes(127), vec![64, 32, 16, 8, 4, 2, 1]);
    }
}
