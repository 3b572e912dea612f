//! Request traces: what happened to each request, as a JSON document, kept for a while.
//!
//! A trace is a column of its request's usage record (`usage_records.trace`), written with
//! the record in the same row when the request ends ([`UsageFinish::trace`]): one row per
//! request instead of two. Retention clears the column and keeps the record.
//!
//! What the record's own columns say (request, owner, route, model, status, tokens, cost,
//! latency) is not written again in the trace: the column holds the trace's *detail* (how the
//! request was routed, guardrail actions, engine timings, sampling, the model's card), and
//! [`whole`] puts the two together when a trace is read. That halves what a request writes:
//! the detail is about 300 bytes where the whole was 650, in a row the database copies,
//! checksums and pages.
//!
//! [`UsageFinish::trace`]: crate::UsageFinish::trace

use serde_json::{Map, Value};
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
            "SELECT request_id, tenant_id, project_id, key_id, route, model, provider, status, http_status, \
             prompt_tokens, completion_tokens, cached_tokens, cost, latency_ms, ttft_ms, started_at, trace \
             FROM usage_records WHERE request_id = $1 AND trace IS NOT NULL",
        )
        .bind(request_id)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("trace '{request_id}'")))?;
        let text: String = row.try_get("trace")?;
        let columns = RecordColumns {
            request_id: row.try_get("request_id")?,
            route: row.try_get("route")?,
            model: row.try_get("model")?,
            status: row.try_get("status")?,
            http_status: row.try_get("http_status")?,
            tenant_id: row.try_get("tenant_id")?,
            project_id: row.try_get("project_id")?,
            key_id: row.try_get("key_id")?,
            provider: row.try_get("provider")?,
            latency_ms: row.try_get("latency_ms")?,
            ttft_ms: row.try_get("ttft_ms")?,
            prompt_tokens: row.try_get("prompt_tokens")?,
            completion_tokens: row.try_get("completion_tokens")?,
            cached_tokens: row.try_get("cached_tokens")?,
            cost: row.try_get("cost")?,
        };
        Ok(Trace {
            trace: whole(&columns, &text),
            request_id: columns.request_id,
            tenant_id: columns.tenant_id,
            created_at: row.try_get("started_at")?,
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

/// The columns of a usage record that its trace shows (see [`whole`]).
#[derive(Debug, Clone, Default)]
pub struct RecordColumns {
    pub request_id: String,
    pub route: String,
    pub model: String,
    pub status: String,
    pub http_status: Option<i64>,
    pub tenant_id: Option<String>,
    pub project_id: Option<String>,
    pub key_id: Option<String>,
    pub provider: Option<String>,
    pub latency_ms: Option<i64>,
    pub ttft_ms: Option<i64>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cost: f64,
}

/// A request's whole trace: its record's columns, and the `detail` stored beside them
/// (`routing` without the provider, `guardrails`, `timings` beyond the total and the first
/// token, `sampling`, `model_card`). A detail that names its request is a whole trace,
/// written before traces were split, and is returned as it is.
pub fn whole(columns: &RecordColumns, detail: &str) -> Value {
    let mut detail = match serde_json::from_str::<Value>(detail) {
        Ok(Value::Object(detail)) => detail,
        _ => Map::new(),
    };
    if detail.contains_key("request_id") {
        return Value::Object(detail);
    }
    let text = |v: &Option<String>| v.as_ref().map_or(Value::Null, |v| Value::String(v.clone()));
    let object = |v: Option<Value>| match v {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    let mut trace = Map::new();
    trace.insert("request_id".into(), columns.request_id.clone().into());
    trace.insert("route".into(), columns.route.clone().into());
    trace.insert("model".into(), columns.model.clone().into());
    trace.insert("status".into(), columns.status.clone().into());
    trace.insert("http_status".into(), columns.http_status.into());
    trace.insert("tenant_id".into(), text(&columns.tenant_id));
    trace.insert("project_id".into(), text(&columns.project_id));
    trace.insert("key_id".into(), text(&columns.key_id));
    let mut routing = Map::new();
    routing.insert("provider".into(), text(&columns.provider));
    routing.extend(object(detail.remove("routing")));
    trace.insert("routing".into(), routing.into());
    trace.insert(
        "guardrails".into(),
        detail.remove("guardrails").unwrap_or_else(|| Value::Object(Map::new())),
    );
    let mut timings = Map::new();
    timings.insert("total_ms".into(), columns.latency_ms.into());
    timings.insert("first_token_ms".into(), columns.ttft_ms.into());
    timings.extend(object(detail.remove("timings")));
    trace.insert("timings".into(), timings.into());
    trace.insert("sampling".into(), detail.remove("sampling").unwrap_or_else(|| Value::Object(Map::new())));
    let tokens = serde_json::json!({
        "prompt": columns.prompt_tokens,
        "completion": columns.completion_tokens,
        "cached": columns.cached_tokens,
    });
    trace.insert("tokens".into(), tokens);
    trace.insert("cost".into(), columns.cost.into());
    trace.insert("model_card".into(), detail.remove("model_card").unwrap_or(Value::Null));
    // Anything else the detail holds (a tool's `put_trace`), after what the server writes.
    for (key, value) in detail {
        trace.entry(key).or_insert(value);
    }
    Value::Object(trace)
}
