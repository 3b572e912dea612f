//! Who is asking, may they, and what did it cost: authentication with hashed keys,
//! admission against rate limits and budgets, and a usage record per request.
//!
//! The `admission` middleware wraps every `/v1` route. For a request that runs a model it:
//! authenticates the key, peeks at the body (model, requested maximum), checks the key may
//! use that model, admits it against the limits of the key, its project and its tenant,
//! writes the usage record (committed before any work starts), then runs the handler with a
//! [`Meter`] in scope. Handlers report tokens through [`current`] without carrying the
//! meter around; when the response (or its stream) ends, the record is completed, or marked
//! `cancelled` if the client went away. A crash leaves `started` records, which the next
//! start reconciles.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferry_store::{ApiKey, Project, Role, Store, Tenant, UsageFinish, UsageStart, now_ms};
use futures::StreamExt;
use serde::Deserialize;
use sha2::Digest;

use crate::app::AppState;
use crate::error::ApiError;
use crate::limits::{Admission, Limiter, ScopeKind, Subject};

/// Prices per million tokens, in the currency budgets are written in.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    /// Prompt tokens served from a cache, when cheaper.
    #[serde(default)]
    pub cached_input_per_mtok: Option<f64>,
}

impl Price {
    pub fn cost(&self, prompt: u64, completion: u64, cached: u64) -> f64 {
        let cached_price = self.cached_input_per_mtok.unwrap_or(self.input_per_mtok);
        (prompt.saturating_sub(cached) as f64 * self.input_per_mtok
            + cached as f64 * cached_price
            + completion as f64 * self.output_per_mtok)
            / 1e6
    }
}

/// How long a key (with its project and tenant) is trusted from memory before the store
/// is asked again; revocations through this server take effect at once.
const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// A key as admission needs it: with its project and tenant, and the scopes its requests
/// count against (made once per key, not per request).
struct KeyContext {
    key: Arc<ApiKey>,
    project: Option<Project>,
    tenant: Option<Tenant>,
    subjects: Vec<Subject>,
    fetched: Instant,
}

/// Keys, limits and metering, shared by every request.
pub struct Tenancy {
    pub store: Store,
    /// Usage records go through one group-committing writer.
    usage: ferry_store::UsageWriter,
    pub limiter: Limiter,
    pub prices: HashMap<String, Price>,
    /// Guardrail policies by name.
    pub policies: HashMap<String, Arc<ferry_guardrails::Policy>>,
    /// Names this process in usage records (see `Store::reconcile_usage`).
    pub instance: String,
    /// Whether usage records and traces are written (on unless `--no-metering`).
    pub metering: bool,
    /// The sha256 of each local model file by model id, filled in after loading.
    pub model_sha256: Arc<std::sync::RwLock<HashMap<String, String>>>,
    /// On when an admin key exists; until then the server is a single local user's.
    auth_required: AtomicBool,
    /// Keys by the SHA-256 of their secret, raw: the hex text the store keeps would cost a
    /// string and its encoding per request.
    keys: Mutex<HashMap<[u8; 32], Arc<KeyContext>>>,
}

/// The caller of a request: a key, or the local user of a server without keys.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Shared with the key cache: an identity is cloned into every request's extensions.
    pub key: Option<Arc<ApiKey>>,
}

impl Identity {
    pub fn local() -> Identity {
        Identity { key: None }
    }

    pub fn role(&self) -> Role {
        self.key.as_ref().map_or(Role::Admin, |k| k.role)
    }

    pub fn tenant_id(&self) -> Option<&str> {
        self.key.as_ref().and_then(|k| k.tenant_id.as_deref())
    }

    /// The actor named in the audit log.
    pub fn actor(&self) -> String {
        self.key.as_ref().map_or_else(|| "local".to_string(), |k| k.id.clone())
    }

    /// Whether this caller may see something owned by `tenant` (`None`: global things).
    pub fn sees_tenant(&self, tenant: Option<&str>) -> bool {
        match self.role() {
            Role::Admin => true,
            Role::TenantAdmin | Role::Member => tenant.is_some() && tenant == self.tenant_id(),
        }
    }
}

impl Tenancy {
    pub async fn new(
        store: Store,
        prices: HashMap<String, Price>,
        policies: Vec<ferry_guardrails::Policy>,
        instance: String,
    ) -> Result<Tenancy, ApiError> {
        let required = store.has_active_admin_key().await?;
        Ok(Tenancy {
            usage: store.open_usage_writer().await?,
            store,
            limiter: Limiter::new(),
            prices,
            policies: policies.into_iter().map(|p| (p.name.clone(), Arc::new(p))).collect(),
            instance,
            metering: true,
            model_sha256: Default::default(),
            auth_required: AtomicBool::new(required),
            keys: Mutex::new(HashMap::new()),
        })
    }

    /// A configured policy by name; an unknown one (named by a tenant, project or preset) is
    /// the server's misconfiguration.
    pub fn policy(&self, name: &str) -> Result<Arc<ferry_guardrails::Policy>, ApiError> {
        self.policies.get(name).cloned().ok_or_else(|| {
            ApiError::Internal(format!("the guardrail policy '{name}' is not configured on this server"))
        })
    }

    /// A configured policy, or a 400 naming the field that asked for an unknown one.
    pub fn check_policy(&self, name: Option<&str>, field: &str) -> Result<(), ApiError> {
        match name {
            Some(n) if !self.policies.contains_key(n) => {
                let mut known: Vec<&str> = self.policies.keys().map(String::as_str).collect();
                known.sort_unstable();
                Err(ApiError::invalid(
                    field,
                    format!("no guardrail policy is named '{n}' (configured: {})", known.join(", ")),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Returns once the usage records and traces of requests that have ended are committed
    /// (at shutdown: nothing is left for the next start to reconcile).
    pub async fn flush_usage(&self) {
        self.usage.flush().await;
    }

    /// Waits until every usage record and trace finished so far is committed, so that a
    /// reader on this replica sees its own requests (they gather for a group commit).
    pub async fn settle_writes(&self) {
        self.usage.flush().await;
    }

    pub fn auth_required(&self) -> bool {
        self.auth_required.load(Ordering::Relaxed)
    }

    /// Re-reads whether an admin key exists (after keys change) and forgets cached keys.
    pub async fn refresh(&self) -> Result<(), ApiError> {
        let required = self.store.has_active_admin_key().await?;
        self.auth_required.store(required, Ordering::Relaxed);
        if let Ok(mut keys) = self.keys.lock() {
            keys.clear();
        }
        Ok(())
    }

    async fn key_context(&self, secret: &str) -> Result<Option<Arc<KeyContext>>, ApiError> {
        let hash: [u8; 32] = sha2::Sha256::digest(secret.as_bytes()).into();
        if let Ok(keys) = self.keys.lock()
            && let Some(found) = keys.get(&hash)
            && found.fetched.elapsed() < KEY_CACHE_TTL
        {
            return Ok(Some(found.clone()));
        }
        let Some(key) = self.store.key_by_secret(secret).await? else { return Ok(None) };
        let project = match &key.project_id {
            Some(id) => Some(self.store.project(id).await?),
            None => None,
        };
        let tenant = match &key.tenant_id {
            Some(id) => Some(self.store.tenant(id).await?),
            None => None,
        };
        let mut subjects = vec![Subject::new(ScopeKind::Key, &key.id, &key.limits)];
        subjects.extend(project.as_ref().map(|p| Subject::new(ScopeKind::Project, &p.id, &p.limits)));
        subjects.extend(tenant.as_ref().map(|t| Subject::new(ScopeKind::Tenant, &t.id, &t.limits)));
        let context =
            Arc::new(KeyContext { key: Arc::new(key), project, tenant, subjects, fetched: Instant::now() });
        if let Ok(mut keys) = self.keys.lock() {
            if keys.len() > 100_000 {
                keys.clear();
            }
            keys.insert(hash, context.clone());
        }
        Ok(Some(context))
    }

    /// The caller named by the request's key (`Authorization: Bearer` or `x-api-key`).
    async fn authenticate(
        &self,
        headers: &HeaderMap,
    ) -> Result<(Identity, Option<Arc<KeyContext>>), ApiError> {
        if !self.auth_required() {
            return Ok((Identity::local(), None));
        }
        let Some(secret) = presented_key(headers) else {
            return Err(ApiError::Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' (or 'x-api-key: KEY').".into(),
            ));
        };
        let context = self.key_context(secret).await?;
        match context {
            Some(c) if c.key.is_active(now_ms()) => Ok((Identity { key: Some(c.key.clone()) }, Some(c))),
            Some(c) if c.key.revoked_at.is_some() => Err(ApiError::Unauthorized(format!(
                "The API key {}… has been revoked.",
                c.key.display_prefix
            ))),
            Some(c) => {
                Err(ApiError::Unauthorized(format!("The API key {}… has expired.", c.key.display_prefix)))
            }
            None => Err(ApiError::Unauthorized(format!(
                "Incorrect API key provided: {}. Ask your administrator for a key.",
                mask(secret)
            ))),
        }
    }
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).unwrap_or(value);
        return Some(token.trim()).filter(|t| !t.is_empty());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim).filter(|t| !t.is_empty())
}

/// A presented secret as OpenAI shows a wrong one: the ends only.
fn mask(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 12 {
        return "****".into();
    }
    let head: String = chars[..6].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}****{tail}")
}

/// The caller of an admin route. Without keys, only loopback clients are the admin.
pub async fn admin_identity(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<Identity, ApiError> {
    let tenancy = state.tenancy();
    if !tenancy.auth_required() {
        if peer.ip().is_loopback() {
            return Ok(Identity::local());
        }
        return Err(ApiError::Forbidden(
            "This server has no admin key yet: its admin API answers loopback clients only.".into(),
        ));
    }
    let (identity, _) = tenancy.authenticate(headers).await?;
    if identity.role() == Role::Member {
        return Err(ApiError::Forbidden("This key may only call the inference API (role 'member').".into()));
    }
    Ok(identity)
}

/// What admission reads from a request body; everything else is the handler's business.
/// Each field is read on its own: a field of the wrong type (the handler's 400 to give) reads
/// as absent and never hides the others, the model above all. Other fields (the messages)
/// are skipped without being built.
#[derive(Default)]
struct Peek {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    n: Option<u64>,
    stream: Option<bool>,
    /// The sampling parameters as sent, for the trace.
    sampling: Sampling,
}

/// The body's fields admission reads, named once.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum PeekField {
    Model,
    MaxTokens,
    MaxCompletionTokens,
    MaxOutputTokens,
    N,
    Stream,
    Temperature,
    TopP,
    TopK,
    MinP,
    Seed,
    Stop,
    PresencePenalty,
    FrequencyPenalty,
    RepetitionPenalty,
    Logprobs,
    TopLogprobs,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Peek {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Peek, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Peek;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Peek, A::Error> {
                use serde_json::Value;
                let mut p = Peek::default();
                let s = &mut p.sampling;
                while let Some(field) = map.next_key::<PeekField>()? {
                    match field {
                        PeekField::Model => p.model = lenient(map.next_value::<Value>()?),
                        PeekField::MaxTokens => p.max_tokens = lenient(map.next_value::<Value>()?),
                        PeekField::MaxCompletionTokens => {
                            p.max_completion_tokens = lenient(map.next_value::<Value>()?)
                        }
                        PeekField::MaxOutputTokens => {
                            p.max_output_tokens = lenient(map.next_value::<Value>()?)
                        }
                        PeekField::N => p.n = lenient(map.next_value::<Value>()?),
                        PeekField::Stream => p.stream = lenient(map.next_value::<Value>()?),
                        PeekField::Temperature => s.temperature = map.next_value()?,
                        PeekField::TopP => s.top_p = map.next_value()?,
                        PeekField::TopK => s.top_k = map.next_value()?,
                        PeekField::MinP => s.min_p = map.next_value()?,
                        PeekField::Seed => s.seed = map.next_value()?,
                        PeekField::Stop => s.stop = map.next_value()?,
                        PeekField::PresencePenalty => s.presence_penalty = map.next_value()?,
                        PeekField::FrequencyPenalty => s.frequency_penalty = map.next_value()?,
                        PeekField::RepetitionPenalty => s.repetition_penalty = map.next_value()?,
                        PeekField::Logprobs => s.logprobs = map.next_value()?,
                        PeekField::TopLogprobs => s.top_logprobs = map.next_value()?,
                        PeekField::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(p)
            }
        }
        d.deserialize_map(Fields)
    }
}

#[derive(Default, serde::Serialize)]
struct Sampling {
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_p: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repetition_penalty: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<serde_json::Value>,
}

/// A value as `T`, or `None` when it has another type.
fn lenient<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Option<T> {
    serde_json::from_value(value).ok()
}

/// The live record of one admitted request; handlers report to it through [`current`].
pub struct Meter {
    request_id: String,
    model: String,
    started: Instant,
    first_token_ms: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    provider: Mutex<Option<String>>,
    cache_hit: AtomicBool,
    /// The privacy policy in force (the project's or tenant's, tightened by a preset's).
    policy: Mutex<Option<Arc<ferry_guardrails::Policy>>>,
    /// Values redacted or blocked, by kind (never the values).
    guardrail_counts: Mutex<std::collections::BTreeMap<ferry_guardrails::PiiKind, usize>>,
    /// What the trace says beyond the counters: route, engine timings, the model's card.
    trace: Mutex<TraceParts>,
}

#[derive(Default)]
struct TraceParts {
    route: Option<ferry_gateway::Route>,
    /// (queue, prefill, decode) in milliseconds, from the engine.
    engine_ms: Option<(f64, f64, f64)>,
    /// (mean, max) gap between consecutive tokens of a choice in milliseconds, from the
    /// engine (the choice with the largest maximum).
    inter_token_ms: Option<(f64, f64)>,
    model: Option<serde_json::Value>,
    sampling: Sampling,
}

impl Meter {
    pub fn policy(&self) -> Option<Arc<ferry_guardrails::Policy>> {
        self.policy.lock().ok().and_then(|p| p.clone())
    }

    /// Makes the request's policy at least as strict as `extra` (a preset's).
    pub fn tighten(&self, extra: &Arc<ferry_guardrails::Policy>) {
        if let Ok(mut p) = self.policy.lock() {
            *p = Some(match p.as_ref() {
                Some(current) => Arc::new(crate::guard::stricter(current, extra)),
                None => extra.clone(),
            });
        }
    }

    pub fn add_guardrail_counts(
        &self,
        counts: &std::collections::BTreeMap<ferry_guardrails::PiiKind, usize>,
    ) {
        for (kind, n) in counts {
            crate::telemetry::guardrail(kind.as_str(), *n);
        }
        if let Ok(mut c) = self.guardrail_counts.lock() {
            for (kind, n) in counts {
                *c.entry(*kind).or_default() += n;
            }
        }
    }

    pub fn add_prompt_tokens(&self, n: u64) {
        self.prompt_tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Prompt tokens served from the local prefix cache.
    pub fn add_cached_tokens(&self, n: u64) {
        self.cached_tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_completion_tokens(&self, n: u64) {
        self.completion_tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Marks the first token sent (the first call wins).
    pub fn first_token(&self) {
        let ms = self.started.elapsed().as_millis().max(1) as u64;
        let _ = self.first_token_ms.compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed);
    }

    pub fn set_provider(&self, provider: &str) {
        if let Ok(mut p) = self.provider.lock() {
            *p = Some(provider.to_string());
        }
    }

    pub fn set_cache_hit(&self) {
        self.cache_hit.store(true, Ordering::Relaxed);
    }

    /// Reports an upstream answer's usage and route.
    /// Records the gateway's route for the trace.
    pub fn set_route(&self, route: &ferry_gateway::Route) {
        if let Ok(mut t) = self.trace.lock() {
            t.route = Some(route.clone());
        }
    }

    /// Records the local model's card (provenance) for the trace.
    pub fn set_model_card(&self, card: serde_json::Value) {
        if let Ok(mut t) = self.trace.lock() {
            t.model = Some(card);
        }
    }

    /// Records the engine's timings of a finished choice that sampled `completion_tokens`
    /// (the slowest choice wins; inter-token gaps need two tokens).
    pub fn engine_timings(&self, t: &ferry_engine::Timings, completion_tokens: usize) {
        let ms = |a: Instant, b: Instant| b.saturating_duration_since(a).as_secs_f64() * 1000.0;
        let timings =
            (ms(self.started, t.admitted), ms(t.admitted, t.first_token), ms(t.first_token, t.finished));
        let gaps = (completion_tokens > 1)
            .then(|| (timings.2 / (completion_tokens - 1) as f64, t.max_inter_token.as_secs_f64() * 1000.0));
        if let Ok(mut parts) = self.trace.lock() {
            if parts.engine_ms.is_none_or(|(q, p, d)| q + p + d < timings.0 + timings.1 + timings.2) {
                parts.engine_ms = Some(timings);
            }
            if let Some(gaps) = gaps
                && parts.inter_token_ms.is_none_or(|(_, max)| max < gaps.1)
            {
                parts.inter_token_ms = Some(gaps);
            }
        }
    }

    pub fn upstream(&self, route: &ferry_gateway::Route, usage: &ferry_providers::Usage) {
        self.set_route(route);
        self.set_provider(if route.cache_hit { "cache" } else { &route.target });
        if route.cache_hit {
            self.set_cache_hit();
        }
        self.add_prompt_tokens(usage.prompt_tokens);
        self.add_completion_tokens(usage.completion_tokens);
    }
}

tokio::task_local! {
    static METER: Arc<Meter>;
}

/// The meter of the request being handled, if it is metered.
pub fn current() -> Option<Arc<Meter>> {
    METER.try_with(Arc::clone).ok()
}

/// Counts an upstream stream's first token and usage into the current meter.
pub fn tap_upstream(
    route: &ferry_gateway::Route,
    events: ferry_providers::EventStream,
) -> ferry_providers::EventStream {
    let Some(meter) = current() else { return events };
    meter.set_provider(&route.target);
    meter.set_route(route);
    Box::pin(events.inspect(move |event| match event {
        Ok(ferry_providers::ChatEvent::Usage(u)) => {
            meter.add_prompt_tokens(u.prompt_tokens);
            meter.add_completion_tokens(u.completion_tokens);
        }
        Ok(ferry_providers::ChatEvent::Finish { .. }) | Err(_) => {}
        Ok(_) => meter.first_token(),
    }))
}

/// Runs on every `/v1` route: authentication for all, admission and metering for the
/// routes that run a model.
pub async fn admission(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Time-ordered (UUIDv7: milliseconds, then 74 random bits), so that the records and
    // traces keyed by it are appended at the end of their indexes instead of dirtying a
    // random page of each per request.
    let request_id = format!("req_{}", uuid::Uuid::now_v7().simple());
    let anthropic = request.uri().path().starts_with("/v1/messages");
    let mut response = match admit(&state, request, next, &request_id).await {
        Ok(response) => response,
        Err(e) => {
            if let Some(reason) = refusal(&e) {
                crate::telemetry::refused(reason);
            }
            if anthropic { crate::messages::error_response(e) } else { e.into_response() }
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Why admission refused a request, for the rejection counter.
fn refusal(e: &ApiError) -> Option<&'static str> {
    Some(match e {
        ApiError::Unauthorized(_) => "unauthorized",
        ApiError::Forbidden(_) => "forbidden",
        ApiError::RateLimited { tokens: false, .. } => "rate_limit_requests",
        ApiError::RateLimited { tokens: true, .. } => "rate_limit_tokens",
        ApiError::QuotaExceeded(_) => "budget",
        _ => return None,
    })
}

async fn admit(
    state: &AppState,
    request: Request,
    next: Next,
    request_id: &str,
) -> Result<Response, ApiError> {
    let tenancy = state.tenancy_arc();
    let (identity, context) = tenancy.authenticate(request.headers()).await?;
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(identity.clone());
    // Only model-running routes are metered; count_tokens and listings are not.
    let metered = parts.method == Method::POST && !parts.uri.path().ends_with("/count_tokens");
    if !metered {
        return Ok(next.run(Request::from_parts(parts, body)).await);
    }
    let limit = state.max_body_bytes();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::BodyTooLarge { limit })?;
    let peek: Peek = serde_json::from_slice(&bytes).unwrap_or_default();
    let model = peek.model.clone().unwrap_or_default();
    if let Some(key) = &identity.key
        && !model.is_empty()
        && !key.allows_model(&model)
    {
        return Err(ApiError::Forbidden(format!("This API key may not use the model '{model}'.")));
    }
    let subjects: &[Subject] = context.as_ref().map_or(&[], |c| &c.subjects);
    // The prompt's tokens are estimated from the body (about four bytes a token) until
    // the handler counts them; the requested maximum is taken at its word.
    let max = peek.max_completion_tokens.or(peek.max_tokens).or(peek.max_output_tokens).unwrap_or(0);
    let estimate = bytes.len() as u64 / 4 + max * peek.n.unwrap_or(1).max(1);
    // The project's policy, or else the tenant's.
    let policy_name = context.as_ref().and_then(|c| {
        let project = c.project.as_ref().and_then(|p| p.guardrail_policy.as_deref());
        project.or_else(|| c.tenant.as_ref().and_then(|t| t.guardrail_policy.as_deref()))
    });
    let policy = policy_name.map(|name| tenancy.policy(name)).transpose()?;
    let admission = tenancy.limiter.admit(&tenancy.store, subjects, estimate).await?;
    let key = identity.key.as_ref();
    let route_path = parts.uri.path().to_string();
    let start = UsageStart {
        request_id: request_id.to_string(),
        instance: tenancy.instance.clone(),
        tenant_id: key.and_then(|k| k.tenant_id.clone()),
        project_id: key.and_then(|k| k.project_id.clone()),
        key_id: key.map(|k| k.id.clone()),
        route: route_path.clone(),
        model: model.clone(),
        stream: peek.stream.unwrap_or(false),
        started_at: now_ms(),
    };
    if tenancy.metering
        && let Err(e) = tenancy.usage.start(start).await
    {
        tenancy.limiter.settle(&admission, 0, 0.0);
        return Err(e.into());
    }
    let meter = Arc::new(Meter {
        request_id: request_id.to_string(),
        model,
        started: Instant::now(),
        first_token_ms: AtomicU64::new(0),
        prompt_tokens: AtomicU64::new(0),
        completion_tokens: AtomicU64::new(0),
        cached_tokens: AtomicU64::new(0),
        provider: Mutex::new(None),
        cache_hit: AtomicBool::new(false),
        policy: Mutex::new(policy),
        guardrail_counts: Mutex::new(Default::default()),
        trace: Mutex::new(TraceParts { sampling: peek.sampling, ..Default::default() }),
    });
    // Content is kept only for tenants that opted in (and purged after their retention).
    let keep = context.as_ref().and_then(|c| c.tenant.as_ref()).filter(|t| t.retain_content).map(|t| Kept {
        tenant_id: t.id.clone(),
        request: bytes.clone(),
        response: Vec::new(),
    });
    let request = Request::from_parts(parts, Body::from(bytes));
    let mut response = METER.scope(meter.clone(), next.run(request)).await;
    let mut admission = admission;
    let headers = response.headers_mut();
    headers.reserve(admission.n_headers());
    admission.write_headers(headers);
    let http_status = response.status().as_u16();
    let owner = Owner {
        tenant_id: identity.tenant_id().map(String::from),
        project_id: identity.key.as_ref().and_then(|k| k.project_id.clone()),
        key_id: identity.key.as_ref().map(|k| k.id.clone()),
        route: route_path,
    };
    let mut finish = Finish { tenancy, meter, admission, http_status, ended: false, keep, owner };
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        // The whole answer is in hand: the record is completed now.
        if let Some(keep) = finish.keep.as_mut() {
            let (parts, body) = response.into_parts();
            let answer = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
            keep.response.extend_from_slice(&answer);
            response = Response::from_parts(parts, Body::from(answer));
        }
        finish.ended = true;
        drop(finish);
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let stream =
        futures::stream::unfold((body.into_data_stream(), finish), |(mut body, mut finish)| async move {
            let chunk = body.next().await;
            if let (Some(Ok(bytes)), Some(keep)) = (&chunk, finish.keep.as_mut())
                && keep.response.len() < MAX_KEPT_RESPONSE
            {
                keep.response.extend_from_slice(bytes);
            }
            // Dropping `finish` with the stream completes the record: ended, or cut short.
            finish.ended = chunk.is_none();
            chunk.map(|chunk| (chunk, (body, finish)))
        });
    Ok(Response::from_parts(parts, Body::from_stream(stream)))
}

/// The most of a streamed answer kept for a tenant that keeps content.
const MAX_KEPT_RESPONSE: usize = 8 * 1024 * 1024;

/// A request and its answer, for a tenant that keeps content.
struct Kept {
    tenant_id: String,
    request: axum::body::Bytes,
    response: Vec<u8>,
}

/// Completes a usage record when dropped: at the end of the response, or when the client
/// goes away mid-stream (`cancelled`).
struct Finish {
    tenancy: Arc<Tenancy>,
    meter: Arc<Meter>,
    admission: Admission,
    http_status: u16,
    ended: bool,
    keep: Option<Kept>,
    owner: Owner,
}

/// Whose request it was, for its trace.
struct Owner {
    tenant_id: Option<String>,
    project_id: Option<String>,
    key_id: Option<String>,
    route: String,
}

impl Finish {
    /// The request's trace: route, guardrail actions (counts only), timings, sampling
    /// parameters, tokens and the model's provenance, serialised straight from its parts.
    fn trace(&self, status: &str, finish: &UsageFinish) -> Option<String> {
        let m = &self.meter;
        let parts = m.trace.lock().ok()?;
        let counts = m.guardrail_counts.lock().ok()?;
        let policy = m.policy();
        // The local model's card gets its file's sha256 once that is known.
        let mut card = parts.model.clone();
        if let Some(card) = card.as_mut()
            && let Some(id) = card["id"].as_str()
            && let Ok(shas) = self.tenancy.model_sha256.read()
            && let Some(sha) = shas.get(id)
        {
            card["sha256"] = serde_json::Value::String(sha.clone());
        }
        let route = parts.route.as_ref();
        let engine = parts.engine_ms;
        let gaps = parts.inter_token_ms;
        let doc = TraceDoc {
            request_id: &m.request_id,
            route: &self.owner.route,
            model: &m.model,
            status,
            http_status: self.http_status,
            tenant_id: self.owner.tenant_id.as_deref(),
            project_id: self.owner.project_id.as_deref(),
            key_id: self.owner.key_id.as_deref(),
            routing: TraceRouting {
                provider: finish.provider.as_deref(),
                target: route.map(|r| r.target.as_str()),
                attempts: route.map(|r| r.attempts),
                fallbacks: route.map(|r| r.fallbacks),
                cache_hit: route.is_some_and(|r| r.cache_hit),
            },
            guardrails: TraceGuardrails {
                policy: policy.as_ref().map(|p| p.name.as_str()),
                counts: Counts(&counts),
            },
            timings: TraceTimings {
                total_ms: finish.latency_ms,
                first_token_ms: finish.ttft_ms,
                queue_ms: engine.map(|e| e.0),
                prefill_ms: engine.map(|e| e.1),
                decode_ms: engine.map(|e| e.2),
                inter_token_mean_ms: gaps.map(|g| g.0),
                inter_token_max_ms: gaps.map(|g| g.1),
                upstream_ms: route.filter(|r| !r.cache_hit).map(|_| finish.latency_ms),
            },
            sampling: &parts.sampling,
            tokens: TraceTokens {
                prompt: finish.prompt_tokens,
                completion: finish.completion_tokens,
                cached: finish.cached_tokens,
            },
            cost: finish.cost,
            model_card: card.as_ref(),
        };
        // Sized for a typical trace (600-700 bytes), so the buffer isn't regrown (and copied)
        // while it is written; under 1 KiB, the allocator serves it from its per-thread cache.
        let mut json = Vec::with_capacity(768);
        serde_json::to_writer(&mut json, &doc).ok()?;
        String::from_utf8(json).ok()
    }
}

/// A request's trace as `GET /v1/traces/{id}` shows it.
#[derive(serde::Serialize)]
struct TraceDoc<'a> {
    request_id: &'a str,
    route: &'a str,
    model: &'a str,
    status: &'a str,
    http_status: u16,
    tenant_id: Option<&'a str>,
    project_id: Option<&'a str>,
    key_id: Option<&'a str>,
    routing: TraceRouting<'a>,
    guardrails: TraceGuardrails<'a>,
    timings: TraceTimings,
    sampling: &'a Sampling,
    tokens: TraceTokens,
    cost: f64,
    model_card: Option<&'a serde_json::Value>,
}

#[derive(serde::Serialize)]
struct TraceRouting<'a> {
    provider: Option<&'a str>,
    target: Option<&'a str>,
    attempts: Option<u32>,
    fallbacks: Option<u32>,
    cache_hit: bool,
}

#[derive(serde::Serialize)]
struct TraceGuardrails<'a> {
    policy: Option<&'a str>,
    counts: Counts<'a>,
}

/// Guardrail counts by kind name.
struct Counts<'a>(&'a std::collections::BTreeMap<ferry_guardrails::PiiKind, usize>);

impl serde::Serialize for Counts<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(kind, n)| (kind.as_str(), n)))
    }
}

/// Milliseconds; the engine's and the upstream's only where they apply.
#[derive(serde::Serialize)]
struct TraceTimings {
    total_ms: u64,
    first_token_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefill_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decode_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inter_token_mean_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inter_token_max_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_ms: Option<u64>,
}

#[derive(serde::Serialize)]
struct TraceTokens {
    prompt: u64,
    completion: u64,
    cached: u64,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let m = &self.meter;
        let prompt = m.prompt_tokens.load(Ordering::Relaxed);
        let completion = m.completion_tokens.load(Ordering::Relaxed);
        let cached = m.cached_tokens.load(Ordering::Relaxed);
        let cost = if m.cache_hit.load(Ordering::Relaxed) {
            0.0
        } else {
            self.tenancy.prices.get(&m.model).map_or(0.0, |p| p.cost(prompt, completion, cached))
        };
        self.tenancy.limiter.settle(&self.admission, prompt + completion, cost);
        let status = match (self.ended, self.http_status) {
            (false, _) => "cancelled",
            (true, s) if s < 400 => "ok",
            _ => "error",
        };
        let ttft = m.first_token_ms.load(Ordering::Relaxed);
        let provider = m.provider.lock().ok().and_then(|p| p.clone());
        crate::telemetry::finished(&crate::telemetry::Finished {
            route: &self.owner.route,
            model: &m.model,
            status,
            http_status: self.http_status,
            tenant: self.owner.tenant_id.as_deref().unwrap_or(""),
            provider: provider.as_deref(),
            latency_s: m.started.elapsed().as_secs_f64(),
            ttft_s: (ttft > 0).then(|| ttft as f64 / 1000.0),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cache_hit: m.cache_hit.load(Ordering::Relaxed),
        });
        let mut finish = UsageFinish {
            provider: m.provider.lock().ok().and_then(|p| p.clone()),
            status: status.to_string(),
            http_status: self.http_status,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            cost,
            latency_ms: m.started.elapsed().as_millis() as u64,
            ttft_ms: (ttft > 0).then_some(ttft),
            trace: None,
        };
        // The trace goes in the record's row.
        finish.trace =
            (self.tenancy.metering || crate::otel::enabled()).then(|| self.trace(status, &finish)).flatten();
        if let Some(trace) = &finish.trace {
            crate::otel::export(trace, m.started.elapsed());
        }
        if self.tenancy.metering {
            self.tenancy.usage.finish(m.request_id.clone(), finish);
        }
        if let Some(keep) = self.keep.take() {
            let content = ferry_store::content::Content {
                request_id: m.request_id.clone(),
                tenant_id: keep.tenant_id,
                created_at: now_ms(),
                request: String::from_utf8_lossy(&keep.request).into_owned(),
                response: String::from_utf8_lossy(&keep.response).into_owned(),
            };
            let store = self.tenancy.store.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    if let Err(e) = store.keep_content(&content).await {
                        tracing::error!(request_id = %content.request_id, error = %e, "could not keep the request's content");
                    }
                });
            }
        }
    }
}
