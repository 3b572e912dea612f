//! The router: routes, shared state, body limits, the fallback for unknown routes and the
//! request log.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferry_engine::LocalModel;
use serde_json::json;

use crate::error::{ApiError, LoggedError};
use crate::{chat, completions, embeddings, messages, responses};

/// Limits of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Browser origins (`https://app.example.com`), besides loopback ones, whose pages may call
    /// the API (CORS); `*` admits every origin.
    pub cors_origins: Vec<String>,
    /// While the server has no keys, the `Host` names besides loopback ones (`localhost`,
    /// `*.localhost`, `127.x.x.x`, `[::1]`) its requests may be addressed to; `None` admits
    /// any (a server that does not listen on loopback only), `*` in the list too.
    pub allowed_hosts: Option<Vec<String>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_body_bytes: 4 * 1024 * 1024,
            cors_origins: Vec::new(),
            allowed_hosts: Some(Vec::new()),
        }
    }
}

/// What every handler shares: the served models and the HTTP limits.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// Builds a fresh gateway from the config file, for a reload.
pub type GatewayLoader = Arc<dyn Fn() -> Result<Option<ferry_gateway::Gateway>, String> + Send + Sync>;

struct Inner {
    /// The local models: configured, loaded on demand, unloaded least-recently-used.
    registry: Arc<crate::registry::Registry>,
    tenancy: Arc<crate::tenancy::Tenancy>,
    /// Swapped whole on reload; requests in flight keep the `Arc` they started with.
    gateway: RwLock<Option<Arc<ferry_gateway::Gateway>>>,
    loader: Option<GatewayLoader>,
    http: HttpConfig,
    created: u64,
    /// The sentence-embedding model of `/v1/embeddings`, when one is served.
    embeddings: std::sync::OnceLock<ferry_embed::EmbedService>,
    /// Renders the Prometheus metrics, when a recorder is installed.
    metrics: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle>,
}

impl AppState {
    /// `loader` rebuilds the gateway from the config file on reload (SIGHUP,
    /// `POST /admin/v1/reload`); without one, reloading is refused.
    pub fn new(
        registry: Arc<crate::registry::Registry>,
        gateway: Option<Arc<ferry_gateway::Gateway>>,
        loader: Option<GatewayLoader>,
        http: HttpConfig,
        tenancy: crate::tenancy::Tenancy,
    ) -> Self {
        let gateway = RwLock::new(gateway);
        let created = crate::generation::unix_now();
        let tenancy = Arc::new(tenancy);
        let embeddings = std::sync::OnceLock::new();
        let metrics = std::sync::OnceLock::new();
        AppState {
            inner: Arc::new(Inner { registry, tenancy, gateway, loader, http, created, embeddings, metrics }),
        }
    }

    /// Serves `service`'s model on `/v1/embeddings` (and lists it). Set once, before serving;
    /// a second call is ignored.
    pub fn with_embeddings(self, service: ferry_embed::EmbedService) -> Self {
        if self.inner.embeddings.set(service).is_err() {
            tracing::warn!("an embedding model is already served; ignoring another");
        }
        self
    }

    /// The embedding service, when an embedding model is served.
    /// Serves `GET /metrics` from `handle` (see `telemetry::install`).
    pub fn with_metrics(self, handle: metrics_exporter_prometheus::PrometheusHandle) -> Self {
        let _ = self.inner.metrics.set(handle);
        self
    }

    pub fn metrics(&self) -> Option<&metrics_exporter_prometheus::PrometheusHandle> {
        self.inner.metrics.get()
    }

    pub fn embeddings(&self) -> Option<&ferry_embed::EmbedService> {
        self.inner.embeddings.get()
    }

    /// Keys, limits and metering.
    pub fn tenancy(&self) -> &crate::tenancy::Tenancy {
        &self.inner.tenancy
    }

    /// Starts the tasks that keep this replica's keys current (see [`Tenancy::watch`]).
    ///
    /// [`Tenancy::watch`]: crate::tenancy::Tenancy::watch
    pub fn watch_keys(&self) {
        self.inner.tenancy.watch();
    }

    pub(crate) fn tenancy_arc(&self) -> Arc<crate::tenancy::Tenancy> {
        self.inner.tenancy.clone()
    }

    pub fn max_body_bytes(&self) -> usize {
        self.inner.http.max_body_bytes
    }

    /// The gateway, when upstream aliases are configured.
    pub fn gateway(&self) -> Option<Arc<ferry_gateway::Gateway>> {
        self.inner.gateway.read().ok().and_then(|g| g.clone())
    }

    /// Re-reads the config and swaps in a new gateway; requests in flight finish on the old one.
    /// Answers the routing before and after (alias and preset names), for the audit log.
    fn reload(&self) -> Result<(serde_json::Value, serde_json::Value), String> {
        let loader = self.inner.loader.as_ref().ok_or("this server was started without a config file")?;
        let gateway = loader()?.map(Arc::new);
        let after = routing_summary(gateway.as_deref());
        let mut slot = self.inner.gateway.write().map_err(|_| "the gateway lock is poisoned".to_string())?;
        let before = routing_summary(slot.as_deref());
        *slot = gateway;
        tracing::info!(aliases = after["aliases"].as_array().map_or(0, Vec::len), "gateway config reloaded");
        Ok((before, after))
    }

    /// Reloads and records it in the audit log as done by `actor`.
    pub async fn reload_audited(&self, actor: &str) -> Result<serde_json::Value, ApiError> {
        let (before, after) = self.reload().map_err(|e| ApiError::invalid("config", e))?;
        self.tenancy().store.audit(actor, "config.reload", "config", Some(&before), Some(&after)).await?;
        Ok(after)
    }

    /// The local model `id`, loaded first if it is on disk (the request waits for it).
    pub async fn model(&self, id: &str) -> Result<Arc<LocalModel>, ApiError> {
        if let Some(service) = self.embeddings()
            && service.embedder().name() == id
        {
            return Err(crate::embeddings::not_generative(id));
        }
        self.inner.registry.get(id).await
    }

    /// The local models, loaded or not.
    pub fn registry(&self) -> &Arc<crate::registry::Registry> {
        &self.inner.registry
    }

    /// When this server started (the `created` of its model cards).
    pub(crate) fn created(&self) -> u64 {
        self.inner.created
    }

    /// Identifies the build serving the answer (OpenAI's `system_fingerprint`).
    pub fn fingerprint(&self) -> String {
        format!("ferry-{}", env!("CARGO_PKG_VERSION"))
    }
}

/// What a gateway routes, by name: the before and after of a reload in the audit log.
fn routing_summary(gateway: Option<&ferry_gateway::Gateway>) -> serde_json::Value {
    let mut aliases: Vec<&str> = gateway.map(|g| g.alias_names().collect()).unwrap_or_default();
    let mut presets: Vec<&str> =
        gateway.map(|g| g.presets().map(|p| p.name.as_str()).collect()).unwrap_or_default();
    aliases.sort_unstable();
    presets.sort_unstable();
    json!({"aliases": aliases, "presets": presets})
}

/// Turns the body extractor's rejection (too large, unreadable) into an OpenAI error.
pub fn read_body(body: Result<Bytes, BytesRejection>, state: &AppState) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge { limit: state.inner.http.max_body_bytes }
        } else {
            ApiError::InvalidJson(rejection.body_text())
        }
    })
}

pub fn app(state: AppState) -> Router {
    let limit = state.inner.http.max_body_bytes;
    // Every /v1 route needs a key once the server has keys, and is admitted and metered.
    let v1 = Router::new()
        .route("/v1/models", get(crate::models::list_models))
        .route("/v1/models/{*id}", get(crate::models::get_model))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/responses/input_tokens", post(responses::input_tokens))
        .route("/v1/responses/{*id}", get(responses::not_stored).delete(responses::not_stored))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/traces/{id}", get(get_trace))
        .route("/v1/explanations", post(crate::explain::explanations))
        .route("/v1/embeddings", post(embeddings::embeddings))
        // vLLM's paths, outside /v1 there too; keys apply as on /v1.
        .route("/tokenize", post(crate::tokenize::tokenize))
        .route("/detokenize", post(crate::tokenize::detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), crate::tenancy::admission));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(v1)
        .merge(crate::admin::routes())
        .merge(crate::ui::routes())
        .route("/admin/v1/reload", post(reload))
        .route("/admin/v1/models/{*name}", post(crate::models::admin_model))
        .route("/metrics", get(crate::telemetry::render))
        .route("/openapi.json", get(crate::openapi::serve))
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(cors(&state.inner.http.cors_origins))
        .layer(middleware::from_fn_with_state(state.clone(), keyless_guard))
        .layer(middleware::from_fn(log_requests))
        .with_state(state)
}

/// While the server has no keys, anyone who can reach it may use it, so it only answers
/// what its local user sends. A web page on another site can make the browser send a "simple"
/// request (a POST of `text/plain` or a form) without asking first, and CORS only keeps the
/// answer from the page, not the request from running: such a request carries the page's
/// `Origin`, and is refused unless that origin may call the API. A page can also rebind its
/// own host name to 127.0.0.1 and call the server as its own origin (DNS rebinding, as in
/// Ollama's CVE-2024-28224): its requests then name that host in `Host`, which a loopback
/// server refuses unless it is a loopback name or an allowed one. Servers with keys need
/// neither check: a page has no key to send.
async fn keyless_guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.tenancy().auth_required()
        && let Some(refusal) = foreign_request(&state.inner.http, &request)
    {
        return crate::messages::in_dialect_of(request.uri().path(), refusal);
    }
    next.run(request).await
}

fn foreign_request(http: &HttpConfig, request: &Request) -> Option<ApiError> {
    let headers = request.headers();
    // HTTP/2 names the host in the URI's authority.
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if let (Some(allowed), Some(host)) = (&http.allowed_hosts, host)
        && !host_allowed(host, allowed)
    {
        return Some(ApiError::Forbidden(format!(
            "This server has no keys, so it answers requests addressed to localhost only, not to '{host}'. \
             Create a key, or start it with --allowed-host NAME for a name you trust (a reverse proxy's)."
        )));
    }
    let origin = headers.get(axum::http::header::ORIGIN)?;
    let any = http.cors_origins.iter().any(|o| o == "*");
    let listed = || http.cors_origins.iter().any(|o| o.trim_end_matches('/').as_bytes() == origin.as_bytes());
    // A page this server itself served (the admin UI) calls it as its own origin.
    let same_origin =
        || origin_authority(origin).is_some_and(|a| host.is_some_and(|h| a.eq_ignore_ascii_case(h)));
    if any || listed() || is_loopback_origin(origin) || same_origin() {
        return None;
    }
    Some(ApiError::Forbidden(format!(
        "This server has no keys, so pages from '{}' may not call it: only local pages and the \
         origins given with --cors-origin may. Create a key, or add that origin with --cors-origin.",
        origin.to_str().unwrap_or("?")
    )))
}

/// `localhost`, `*.localhost`, a loopback address or an allowed name, with any port.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = host_name(host).trim_end_matches('.');
    is_loopback_name(name)
        || name.to_ascii_lowercase().ends_with(".localhost")
        || allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(name))
}

/// The host of `host[:port]` or `[v6][:port]`.
fn host_name(authority: &str) -> &str {
    match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    }
}

/// `localhost` or a loopback address.
fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The `host[:port]` of an `http(s)://` origin.
fn origin_authority(origin: &axum::http::HeaderValue) -> Option<&str> {
    let origin = origin.to_str().ok()?;
    origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"))
}

/// Cross-origin access for browser pages: pages served from a loopback address (a local
/// app on another port, as Ollama allows) and the configured origins may call the API; a
/// preflight from any other origin gets no `access-control-allow-origin`, so the browser
/// keeps the answer from the page. Keys travel in headers, never in cookies, so no
/// credentials mode is offered.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::HeaderValue;
    use tower_http::cors::{AllowHeaders, AllowOrigin, Any, CorsLayer};
    let any = origins.iter().any(|o| o == "*");
    let listed: Vec<HeaderValue> =
        origins.iter().filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok()).collect();
    let allow = AllowOrigin::predicate(move |origin: &HeaderValue, _| {
        any || listed.contains(origin) || is_loopback_origin(origin)
    });
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        // The SDKs send their own headers (`x-stainless-*`, `anthropic-version`, ...).
        .allow_headers(AllowHeaders::mirror_request())
        // Rate-limit headers, request ids, `x-ferry-cache`: readable by the page.
        .expose_headers(Any)
        .max_age(std::time::Duration::from_secs(3600))
}

/// `http(s)://localhost`, `127.x.x.x` or `[::1]`, any port.
fn is_loopback_origin(origin: &axum::http::HeaderValue) -> bool {
    origin_authority(origin).is_some_and(|authority| is_loopback_name(host_name(authority)))
}

#[utoipa::path(post, path = "/admin/v1/reload", tag = "Admin",
    summary = "Reload the routing config (as SIGHUP does)",
    responses((status = 200, body = inline(ReloadResult))))]
/// `POST /admin/v1/reload`: an admin key, or a loopback client of a server without keys.
async fn reload(
    State(state): State<AppState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: axum::http::HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    let identity = crate::tenancy::admin_identity(&state, peer, &headers).await?;
    if identity.role() != ferry_store::Role::Admin {
        return Err(ApiError::Forbidden("Reloading the config needs an admin key.".into()));
    }
    let after = state.reload_audited(&identity.actor()).await?;
    let aliases = after["aliases"].as_array().map_or(0, Vec::len);
    Ok(axum::Json(ReloadResult { reloaded: true, aliases }))
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct ReloadResult {
    reloaded: bool,
    /// How many aliases the new config routes.
    aliases: usize,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    /// Always `ok`.
    status: &'static str,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Ready {
    /// Always `ready` (a server with no model and no alias answers 503).
    status: &'static str,
    /// Local generation models loaded now (others load on their first request).
    models: usize,
}

#[utoipa::path(get, path = "/health", tag = "Operations", summary = "Liveness", security(()),
    responses((status = 200, body = inline(Health))))]
async fn health() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

#[utoipa::path(get, path = "/ready", tag = "Operations", summary = "Readiness: a model is loaded", security(()),
    responses((status = 200, body = inline(Ready))))]
async fn ready(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if state.registry().is_empty() && state.embeddings().is_none() && state.gateway().is_none() {
        return Err(ApiError::NotReady("no model is configured".into()));
    }
    Ok(axum::Json(Ready { status: "ready", models: state.registry().loaded().len() }))
}

#[utoipa::path(get, path = "/v1/traces/{id}", tag = "Ferry",
    summary = "The trace of a request (its tenant or an admin)",
    params(("id" = String, Path, description = "The request's `x-request-id`")),
    responses((status = 200, body = crate::openapi::RequestTrace)))]
/// `GET /v1/traces/{id}`: what happened to a request, for its tenant or an admin; anyone
/// else gets the same 404 as for a request that never was.
async fn get_trace(
    State(state): State<AppState>,
    axum::Extension(identity): axum::Extension<crate::tenancy::Identity>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let missing = || ApiError::NotFound(format!("No trace for request '{id}'"));
    // A trace still gathering for the writer's next group commit is this caller's to read.
    state.tenancy().settle_writes().await;
    let trace = match state.tenancy().store.trace(&id).await {
        Ok(trace) => trace,
        Err(ferry_store::StoreError::NotFound(_)) => return Err(missing()),
        Err(e) => return Err(e.into()),
    };
    if !identity.sees_tenant(trace.tenant_id.as_deref()) {
        return Err(missing());
    }
    Ok(axum::Json(trace.trace))
}

async fn fallback(method: Method, uri: axum::http::Uri) -> Response {
    let error = ApiError::RouteNotFound { method: method.to_string(), path: uri.path().to_string() };
    crate::messages::in_dialect_of(uri.path(), error)
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    crate::messages::in_dialect_of(uri.path(), ApiError::MethodNotAllowed(method.to_string()))
}

/// One log line per request; server errors at `error`, client mistakes at `info`.
async fn log_requests(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let error = response.extensions().get::<LoggedError>().map(|e| e.0.as_str());
    if status.is_server_error() {
        tracing::error!(%method, %path, status = status.as_u16(), elapsed_ms, error, "request");
    } else {
        tracing::info!(%method, %path, status = status.as_u16(), elapsed_ms, error, "request");
    }
    response
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    #[test]
    fn a_keyless_loopback_server_answers_loopback_and_allowed_host_names_only() {
        let allowed = vec!["ferry.internal".to_string()];
        for host in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "app.localhost:3000",
            "[::1]:8080",
            "127.1.2.3",
            "ferry.internal:443",
            "Ferry.Internal",
        ] {
            assert!(super::host_allowed(host, &allowed), "{host}");
        }
        for host in ["attacker.example:8080", "10.0.0.5:8080", "localhost.attacker.example", "[::2]:80", ""] {
            assert!(!super::host_allowed(host, &allowed), "{host}");
        }
        assert!(super::host_allowed("anything.example", &["*".to_string()]));
    }

    #[test]
    fn loopback_origins_are_local_pages_on_any_port() {
        for origin in
            ["http://localhost:3000", "https://localhost", "http://127.0.0.1:8080", "http://[::1]:5173"]
        {
            assert!(super::is_loopback_origin(&HeaderValue::from_static(origin)), "{origin}");
        }
        for origin in [
            "http://localhost.evil.example",
            "http://127.0.0.1.nip.io",
            "https://example.com",
            "null",
            "file://",
        ] {
            assert!(!super::is_loopback_origin(&HeaderValue::from_static(origin)), "{origin}");
        }
    }
}
