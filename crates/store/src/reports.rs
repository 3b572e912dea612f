//! Read-only reports for dashboards: usage as a time series (counts, tokens and latency
//! percentiles per bucket) and the list of recent traces. Percentiles are computed here, not
//! in SQL: the two databases have no common percentile function.

use futures::TryStreamExt;
use serde::Serialize;
use sqlx::{AssertSqlSafe, Row};

use crate::filter::Filter;
use crate::{Result, Store, StoreError};

/// Most buckets one series may have (a minute series over a day is 1440).
pub const MAX_BUCKETS: i64 = 2000;

#[derive(Debug, Clone)]
pub struct SeriesQuery {
    /// Only this tenant's records (a tenant admin's view).
    pub tenant_id: Option<String>,
    /// Inclusive start and exclusive end, in milliseconds since the epoch.
    pub from_ms: i64,
    pub to_ms: i64,
    /// The width of a bucket in milliseconds. Buckets are aligned to multiples of it
    /// (minutes, hours and days in UTC), so the first one may start before `from_ms`.
    pub bucket_ms: i64,
}

/// One bucket of a series. Latencies are over the requests that finished.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SeriesPoint {
    /// The bucket's start, in milliseconds since the epoch.
    pub start: i64,
    pub requests: i64,
    /// Requests that failed or were cut short by a crash (as in [`Store::usage`]).
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: f64,
    pub latency_p50_ms: Option<i64>,
    pub latency_p95_ms: Option<i64>,
    pub latency_p99_ms: Option<i64>,
    pub ttft_p50_ms: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct TraceQuery {
    /// Only this tenant's traces; `None` for all (an admin's view).
    pub tenant_id: Option<String>,
    /// Inclusive start and exclusive end of the request's start, in milliseconds since the epoch.
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Request ids starting with this.
    pub id_prefix: Option<String>,
    /// Most rows, newest first.
    pub limit: u32,
}

/// A trace's headline, for lists; the whole document is [`Store::trace`].
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TraceSummary {
    pub request_id: String,
    pub tenant_id: Option<String>,
    /// When the request started, in milliseconds since the epoch.
    pub created_at: i64,
    pub route: Option<String>,
    pub model: Option<String>,
    pub status: Option<String>,
    pub http_status: Option<i64>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_ms: Option<i64>,
}

/// A series and the same measures over its whole range.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    /// Oldest first; every bucket of the range, empty ones with zeros.
    pub buckets: Vec<SeriesPoint>,
    /// All the range's requests together (`start` is the first bucket's).
    pub total: SeriesPoint,
}

impl Store {
    /// Usage per time bucket from `from_ms` to `to_ms`, and over the whole range.
    pub async fn usage_series(&self, query: &SeriesQuery) -> Result<Series> {
        if query.bucket_ms <= 0 || query.to_ms <= query.from_ms {
            return Err(StoreError::Invalid("the series needs from < to and a positive bucket".into()));
        }
        let first = query.from_ms.div_euclid(query.bucket_ms);
        let last = (query.to_ms - 1).div_euclid(query.bucket_ms);
        let n_buckets = last - first + 1;
        if n_buckets > MAX_BUCKETS {
            return Err(StoreError::Invalid(format!(
                "{n_buckets} buckets is more than {MAX_BUCKETS}; use wider buckets or a shorter range"
            )));
        }
        let tenant = if query.tenant_id.is_some() { " AND tenant_id = $3" } else { "" };
        let sql = format!(
            "SELECT started_at, status, prompt_tokens, completion_tokens, cost, latency_ms, ttft_ms \
             FROM usage_records WHERE started_at >= $1 AND started_at < $2{tenant}"
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(query.from_ms).bind(query.to_ms);
        if let Some(t) = &query.tenant_id {
            q = q.bind(t.as_str());
        }
        let mut points: Vec<SeriesPoint> = (first..=last)
            .map(|b| SeriesPoint { start: b * query.bucket_ms, ..Default::default() })
            .collect();
        let mut latencies: Vec<Vec<i64>> = vec![Vec::new(); points.len()];
        let mut ttfts: Vec<Vec<i64>> = vec![Vec::new(); points.len()];
        // Streamed: only the latencies are kept per bucket, not the rows.
        let mut rows = q.fetch(self.pool());
        while let Some(row) = rows.try_next().await? {
            let started_at: i64 = row.try_get("started_at")?;
            let index = (started_at.div_euclid(query.bucket_ms) - first) as usize;
            let Some(point) = points.get_mut(index) else { continue };
            let status: String = row.try_get("status")?;
            point.requests += 1;
            if status == "error" || status == "interrupted" {
                point.errors += 1;
            }
            point.prompt_tokens += row.try_get::<i64, _>("prompt_tokens")?;
            point.completion_tokens += row.try_get::<i64, _>("completion_tokens")?;
            point.cost += row.try_get::<f64, _>("cost")?;
            if let Some(latency) = row.try_get::<Option<i64>, _>("latency_ms")? {
                latencies[index].push(latency);
            }
            if let Some(ttft) = row.try_get::<Option<i64>, _>("ttft_ms")? {
                ttfts[index].push(ttft);
            }
        }
        let mut total = SeriesPoint { start: first * query.bucket_ms, ..Default::default() };
        for point in &points {
            total.requests += point.requests;
            total.errors += point.errors;
            total.prompt_tokens += point.prompt_tokens;
            total.completion_tokens += point.completion_tokens;
            total.cost += point.cost;
        }
        let mut all_latencies: Vec<i64> = latencies.iter().flatten().copied().collect();
        let mut all_ttfts: Vec<i64> = ttfts.iter().flatten().copied().collect();
        set_percentiles(&mut total, &mut all_latencies, &mut all_ttfts);
        for ((point, latency), ttft) in points.iter_mut().zip(&mut latencies).zip(&mut ttfts) {
            set_percentiles(point, latency, ttft);
        }
        Ok(Series { buckets: points, total })
    }

    /// Traces newest first, filtered by tenant, time and request-id prefix.
    pub async fn traces(&self, query: &TraceQuery) -> Result<Vec<TraceSummary>> {
        let mut scope = Filter::scope(query.tenant_id.as_deref(), "started_at", query.from_ms, query.to_ms);
        // Records whose trace retention cleared (or that never had one, interrupted ones).
        scope.condition("trace IS NOT NULL");
        if let Some(prefix) = query.id_prefix.as_deref().filter(|p| !p.is_empty()) {
            // `\` escapes LIKE's wildcards in both databases when named in ESCAPE.
            let escaped = prefix.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            scope.text("request_id LIKE {} ESCAPE '\\'", format!("{escaped}%"));
        }
        let filter = scope.clause();
        // The summary is the record's own columns: no trace is read or parsed.
        let sql = format!(
            "SELECT request_id, tenant_id, started_at, route, model, status, http_status, prompt_tokens, \
             completion_tokens, latency_ms FROM usage_records {filter} \
             ORDER BY started_at DESC, request_id DESC LIMIT {}",
            query.limit.clamp(1, 1000)
        );
        let rows = scope.bind(sqlx::query(AssertSqlSafe(sql))).fetch_all(self.pool()).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(TraceSummary {
                request_id: row.try_get("request_id")?,
                tenant_id: row.try_get("tenant_id")?,
                created_at: row.try_get("started_at")?,
                route: row.try_get("route")?,
                model: row.try_get("model")?,
                status: row.try_get("status")?,
                http_status: row.try_get("http_status")?,
                prompt_tokens: row.try_get("prompt_tokens")?,
                completion_tokens: row.try_get("completion_tokens")?,
                total_ms: row.try_get("latency_ms")?,
            });
        }
        Ok(out)
    }
}

fn set_percentiles(point: &mut SeriesPoint, latencies: &mut [i64], ttfts: &mut [i64]) {
    latencies.sort_unstable();
    ttfts.sort_unstable();
    point.latency_p50_ms = percentile(latencies, 50.0);
    point.latency_p95_ms = percentile(latencies, 95.0);
    point.latency_p99_ms = percentile(latencies, 99.0);
    point.ttft_p50_ms = percentile(ttfts, 50.0);
}

/// The nearest-rank percentile of sorted values: the smallest value with at least `p` percent
/// of the values at or below it.
pub fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}
