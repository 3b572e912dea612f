//! Prometheus metrics through the `metrics` facade: recorded where things happen (the usage
//! record's completion, admission refusals, the engine's token stream, gateway failures),
//! rendered by `GET /metrics`. Labels stay bounded: routes are the fixed API paths, models
//! are only named for answered requests (anything else is `-`), tenants are tenant ids.

use foldhash::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, RwLock};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::app::AppState;
use crate::error::ApiError;

/// Latency buckets in seconds, from a cached answer to a long generation.
const BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// Installs the process-wide recorder; returns the handle that renders it.
pub fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
}

/// One finished request, from its usage record.
pub struct Finished<'a> {
    pub route: &'a str,
    pub model: &'a str,
    pub status: &'a str,
    pub http_status: u16,
    pub tenant: &'a str,
    pub provider: Option<&'a str>,
    pub latency_s: f64,
    pub ttft_s: Option<f64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cache_hit: bool,
}

/// The handles a finished request records into, registered once per label set: registering
/// by name and labels allocates the label strings and hashes them into the registry (a few
/// thousand instructions a request); a cached handle costs one map lookup.
struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    ttft: Histogram,
    prompt_tokens: Counter,
    completion_tokens: Counter,
    cache_hits: Counter,
}

impl RequestHandles {
    fn register(route: &str, model: &str, status: &str, tenant: &str) -> Self {
        let (route, model) = (route.to_string(), model.to_string());
        RequestHandles {
            requests: counter!("ferry_requests_total", "route" => route.clone(), "model" => model.clone(),
                "status" => status.to_string(), "tenant" => tenant.to_string()),
            duration: histogram!("ferry_request_duration_seconds", "route" => route, "model" => model.clone()),
            ttft: histogram!("ferry_time_to_first_token_seconds", "model" => model.clone()),
            prompt_tokens: counter!("ferry_prompt_tokens_total", "model" => model.clone()),
            completion_tokens: counter!("ferry_completion_tokens_total", "model" => model.clone()),
            cache_hits: counter!("ferry_cache_hits_total", "model" => model),
        }
    }
}

/// Handles by label set (the label values joined by NUL, which no label holds). The sets are
/// as bounded as the labels themselves (see the module docs).
static REQUEST_HANDLES: LazyLock<RwLock<HashMap<String, Arc<RequestHandles>>>> =
    LazyLock::new(Default::default);
/// `ferry_upstream_duration_seconds` by target, and `ferry_inter_token_seconds` by model.
static UPSTREAM_HANDLES: LazyLock<RwLock<HashMap<String, Histogram>>> = LazyLock::new(Default::default);
static INTER_TOKEN_HANDLES: LazyLock<RwLock<HashMap<String, Histogram>>> = LazyLock::new(Default::default);

/// The cached value for `key`, made by `make` the first time.
fn cached<V: Clone>(map: &RwLock<HashMap<String, V>>, key: &str, make: impl FnOnce() -> V) -> V {
    if let Some(v) = map.read().unwrap_or_else(|e| e.into_inner()).get(key) {
        return v.clone();
    }
    map.write().unwrap_or_else(|e| e.into_inner()).entry(key.to_string()).or_insert_with(make).clone()
}

pub fn finished(f: &Finished<'_>) {
    let model = if f.http_status < 400 { f.model } else { "-" };
    let mut key = String::with_capacity(f.route.len() + model.len() + f.status.len() + f.tenant.len() + 3);
    for (i, part) in [f.route, model, f.status, f.tenant].into_iter().enumerate() {
        if i > 0 {
            key.push('\0');
        }
        key.push_str(part);
    }
    let handles = cached(&REQUEST_HANDLES, &key, || {
        Arc::new(RequestHandles::register(f.route, model, f.status, f.tenant))
    });
    handles.requests.increment(1);
    handles.duration.record(f.latency_s);
    if let Some(ttft) = f.ttft_s {
        handles.ttft.record(ttft);
    }
    handles.prompt_tokens.increment(f.prompt_tokens);
    handles.completion_tokens.increment(f.completion_tokens);
    if f.cache_hit {
        handles.cache_hits.increment(1);
    } else if let Some(target) = f.provider.filter(|p| *p != "local") {
        cached(
            &UPSTREAM_HANDLES,
            target,
            || histogram!("ferry_upstream_duration_seconds", "target" => target.to_string()),
        )
        .record(f.latency_s);
    }
}

/// A request refused before it ran: `unauthorized`, `forbidden`, `rate_limit_requests`,
/// `rate_limit_tokens`, `budget`, `pii_blocked`.
pub fn refused(reason: &'static str) {
    counter!("ferry_rejections_total", "reason" => reason).increment(1);
}

pub fn guardrail(kind: &str, n: usize) {
    counter!("ferry_guardrail_actions_total", "kind" => kind.to_string()).increment(n as u64);
}

pub fn upstream_error(alias: &str) {
    counter!("ferry_upstream_errors_total", "alias" => alias.to_string()).increment(1);
}

pub fn inter_token(model: &str, seconds: f64) {
    cached(
        &INTER_TOKEN_HANDLES,
        model,
        || histogram!("ferry_inter_token_seconds", "model" => model.to_string()),
    )
    .record(seconds);
}

#[utoipa::path(get, path = "/metrics", tag = "Operations",
    summary = "Prometheus metrics (an admin key, or a loopback client of a server without keys)",
    responses((status = 200, description = "Prometheus' text exposition format", content_type = "text/plain", body = String)))]
/// `GET /metrics`: the admin's (or, without keys, a loopback client's).
pub async fn render(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let identity = crate::tenancy::admin_identity(&state, peer, &headers).await?;
    if identity.role() != ferry_store::Role::Admin {
        return Err(ApiError::Forbidden("Metrics need an admin key.".into()));
    }
    let Some(handle) = state.metrics() else {
        return Err(ApiError::NotReady("metrics are not recorded by this server".into()));
    };
    // Gauges read at scrape time.
    let models = state.registry().list();
    gauge!("ferry_loaded_models").set(models.iter().filter(|m| m.model.is_some()).count() as f64);
    for status in &models {
        let id = status.spec.name.clone();
        gauge!("ferry_model_loaded", "model" => id.clone()).set(f64::from(u8::from(status.model.is_some())));
        let Some(model) = &status.model else {
            // An unloaded model holds no sequences and no cache.
            for name in ["ferry_queue_depth", "ferry_running_sequences", "ferry_kv_cache_tokens"] {
                gauge!(name, "model" => id.clone()).set(0.0);
            }
            continue;
        };
        let stats = model.scheduler.stats();
        use std::sync::atomic::Ordering::Relaxed;
        gauge!("ferry_queue_depth", "model" => id.clone()).set(stats.waiting.load(Relaxed) as f64);
        gauge!("ferry_running_sequences", "model" => id.clone()).set(stats.running.load(Relaxed) as f64);
        gauge!("ferry_engine_steps", "model" => id.clone()).set(stats.steps.load(Relaxed) as f64);
        let session = &model.scheduler.config().session;
        gauge!("ferry_kv_cache_tokens", "model" => id.clone()).set(stats.kv_tokens.load(Relaxed) as f64);
        gauge!("ferry_kv_cache_capacity_tokens", "model" => id.clone()).set(session.kv_capacity() as f64);
        gauge!("ferry_engine_generated_tokens", "model" => id.clone())
            .set(stats.generated_tokens.load(Relaxed) as f64);
        gauge!("ferry_engine_expired_requests", "model" => id.clone())
            .set(stats.expired.load(Relaxed) as f64);
        gauge!("ferry_prefix_cache_evictions", "model" => id)
            .set(stats.evicted_prefixes.load(Relaxed) as f64);
    }
    let mut response = handle.render().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    Ok(response)
}
