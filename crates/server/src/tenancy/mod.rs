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
use ferry_store::{ApiKey, Project, Role, Store, Tenant, UsageStart, now_ms};
use futures::StreamExt;
use serde::Deserialize;
use sha2::Digest;

use crate::app::AppState;
use crate::error::ApiError;
use crate::limits::{Limiter, ScopeKind, Subject};

mod meter;

use meter::{Finish, Kept, MAX_KEPT_RESPONSE, METER, TraceParts};
pub use meter::{Meter, cache_scope, current, tap_upstream};

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
/// is asked again; revocations through this server take effect at once, and on replicas that
/// share Redis with it as soon as they hear of them.
const KEY_CACHE_TTL: Duration = Duration::from_secs(10);
/// How often a server without keys looks for a first key made by another replica.
const FIRST_KEY_POLL: Duration = Duration::from_secs(2);

/// A key as admission needs it: with its project and tenant, and the scopes its requests
/// count against (made once per key, not per request).
struct KeyContext {
    key: Arc<ApiKey>,
    project: Option<Project>,
    tenant: Option<Tenant>,
    subjects: Vec<Subject>,
    /// The key's ids as its usage records name them, shared with every record.
    ids: Owner,
    fetched: Instant,
}

/// Whose a request is, as its usage record and trace name it.
#[derive(Clone, Default)]
pub(super) struct Owner {
    pub(super) tenant_id: Option<Arc<str>>,
    pub(super) project_id: Option<Arc<str>>,
    pub(super) key_id: Option<Arc<str>>,
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
    /// Names this run in usage records, `INSTANCE/RANDOM` (see `ferry_store::replicas`).
    pub instance: Arc<str>,
    /// Whether usage records and traces are written (on unless `--no-metering`).
    pub metering: bool,
    /// How long a replica's heartbeat may stop before it is taken for crashed.
    pub replica_lease: Duration,
    /// The sha256 of each local model file by model id, filled in after loading.
    pub model_sha256: Arc<std::sync::RwLock<HashMap<String, String>>>,
    /// On once a key exists (revoked and expired ones too); until then the server is a
    /// single local user's.
    auth_required: AtomicBool,
    /// Keys by the SHA-256 of their secret, raw: the hex text the store keeps would cost a
    /// string and its encoding per request.
    keys: Mutex<foldhash::HashMap<[u8; 32], Arc<KeyContext>>>,
    /// Redis shared with other replicas (`--redis-url`), if any.
    shared: Option<Arc<crate::shared::SharedState>>,
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
        let required = store.has_keys().await?;
        Ok(Tenancy {
            usage: store.open_usage_writer().await?,
            store,
            limiter: Limiter::new(),
            prices,
            policies: policies.into_iter().map(|p| (p.name.clone(), Arc::new(p))).collect(),
            instance: instance.into(),
            metering: true,
            replica_lease: Duration::from_secs(30),
            model_sha256: Default::default(),
            auth_required: AtomicBool::new(required),
            keys: Mutex::new(Default::default()),
            shared: None,
        })
    }

    /// Shares rate-limit windows and key changes with the other replicas on this Redis.
    pub fn share(&mut self, shared: Arc<crate::shared::SharedState>) {
        self.limiter.share(shared.clone());
        self.shared = Some(shared);
    }

    /// Starts what keeps this replica's view of keys current: word of other replicas' key
    /// changes through Redis, if shared; and, while this server has no keys, a look every
    /// [`FIRST_KEY_POLL`] for a first key another replica made (auth then turns on here too).
    pub fn watch(self: &Arc<Self>) {
        if let Some(shared) = &self.shared {
            shared.clone().watch_keys(Arc::downgrade(self));
        }
        if self.auth_required() {
            return;
        }
        let tenancy = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(FIRST_KEY_POLL).await;
                let Some(t) = tenancy.upgrade() else { return };
                if t.auth_required() {
                    return;
                }
                match t.store.has_keys().await {
                    Ok(true) => {
                        tracing::info!("another replica made a key: API keys are now required here too");
                        t.forget_keys().await;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "could not check the store for keys"),
                }
            }
        });
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

    /// Re-reads whether keys exist (after keys change here) and forgets cached keys, and
    /// tells the other replicas to do the same. Once on, authentication stays on.
    pub async fn refresh(&self) -> Result<(), ApiError> {
        if self.store.has_keys().await? {
            self.auth_required.store(true, Ordering::Relaxed);
        }
        self.clear_key_cache();
        if let Some(shared) = &self.shared {
            shared.announce_key_change().await;
        }
        Ok(())
    }

    /// After another replica changed keys: forgets cached keys, and turns auth on if keys
    /// now exist.
    pub(crate) async fn forget_keys(&self) {
        match self.store.has_keys().await {
            Ok(true) => self.auth_required.store(true, Ordering::Relaxed),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not check the store for keys"),
        }
        self.clear_key_cache();
    }

    fn clear_key_cache(&self) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.clear();
        }
    }

    async fn key_context(&self, secret: &str) -> Result<Option<Arc<KeyContext>>, ApiError> {
        let hash: [u8; 32] = sha2::Sha256::digest(secret.as_bytes()).into();
        if let Ok(keys) = self.keys.lock()
            && let Some(found) = keys.get(&hash)
            && found.fetched.elapsed() < KEY_CACHE_TTL
        {
            return Ok(Some(found.clone()));
        }
        // The store's reads are boxed: a key is read once every `KEY_CACHE_TTL` at most, and their futures
        // would otherwise size every request's admission state.
        let Some(key) = Box::pin(self.store.key_by_secret(secret)).await? else { return Ok(None) };
        let project = match &key.project_id {
            Some(id) => Some(Box::pin(self.store.project(id)).await?),
            None => None,
        };
        let tenant = match &key.tenant_id {
            Some(id) => Some(Box::pin(self.store.tenant(id)).await?),
            None => None,
        };
        let mut subjects = vec![Subject::new(ScopeKind::Key, &key.id, &key.limits)];
        subjects.extend(project.as_ref().map(|p| Subject::new(ScopeKind::Project, &p.id, &p.limits)));
        subjects.extend(tenant.as_ref().map(|t| Subject::new(ScopeKind::Tenant, &t.id, &t.limits)));
        let ids = Owner {
            tenant_id: key.tenant_id.as_deref().map(Arc::from),
            project_id: key.project_id.as_deref().map(Arc::from),
            key_id: Some(Arc::from(key.id.as_str())),
        };
        let context = Arc::new(KeyContext {
            key: Arc::new(key),
            project,
            tenant,
            subjects,
            ids,
            fetched: Instant::now(),
        });
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

/// The sampling parameters a request sent, as sent, for its trace.
#[derive(Default)]
struct Sampling {
    temperature: Option<serde_json::Value>,
    top_p: Option<serde_json::Value>,
    top_k: Option<serde_json::Value>,
    min_p: Option<serde_json::Value>,
    seed: Option<serde_json::Value>,
    stop: Option<serde_json::Value>,
    presence_penalty: Option<serde_json::Value>,
    frequency_penalty: Option<serde_json::Value>,
    repetition_penalty: Option<serde_json::Value>,
    logprobs: Option<serde_json::Value>,
    top_logprobs: Option<serde_json::Value>,
}

impl Sampling {
    /// The parameters the request gave, by name, in a fixed order.
    fn given(&self) -> impl Iterator<Item = (&'static str, &serde_json::Value)> {
        [
            ("temperature", &self.temperature),
            ("top_p", &self.top_p),
            ("top_k", &self.top_k),
            ("min_p", &self.min_p),
            ("seed", &self.seed),
            ("stop", &self.stop),
            ("presence_penalty", &self.presence_penalty),
            ("frequency_penalty", &self.frequency_penalty),
            ("repetition_penalty", &self.repetition_penalty),
            ("logprobs", &self.logprobs),
            ("top_logprobs", &self.top_logprobs),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.as_ref().map(|v| (name, v)))
    }
}

/// A value as `T`, or `None` when it has another type.
fn lenient<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Option<T> {
    serde_json::from_value(value).ok()
}

/// Runs on every `/v1` route (and vLLM's `/tokenize` and `/detokenize`): the request's
/// deadline and authentication for all, the key's models for every POST, admission and
/// metering for the routes that run a model.
pub async fn admission(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Time-ordered (UUIDv7: milliseconds, then 74 random bits), so that the records and
    // traces keyed by it are appended at the end of their indexes instead of dirtying a
    // random page of each per request.
    let request_id: Arc<str> = format!("req_{}", uuid::Uuid::now_v7().simple()).into();
    let anthropic = request.uri().path().starts_with("/v1/messages");
    // The deadline is read first: a bad `x-ferry-timeout` is refused before anything else.
    let admitted = match crate::deadline::requested(&request) {
        Ok(deadline) => crate::deadline::within(deadline, admit(&state, request, next, &request_id)).await,
        Err(e) => Err(e),
    };
    let mut response = match admitted {
        Ok(response) => response,
        Err(e) => {
            if let Some(reason) = refusal(&e) {
                crate::telemetry::refused(reason);
            }
            if anthropic { crate::messages::error_response(e) } else { e.into_response() }
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        // Anthropic's SDKs read theirs from `request-id`.
        if anthropic {
            response.headers_mut().insert("request-id", v.clone());
        }
        response.headers_mut().insert("x-request-id", v);
    }
    response
}

/// Why admission refused a request, for the rejection counter.
fn refusal(e: &ApiError) -> Option<&'static str> {
    Some(match e {
        ApiError::Unauthorized(_) => "unauthorized",
        ApiError::Forbidden(_) | ApiError::ModelForbidden(_) => "forbidden",
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
    request_id: &Arc<str>,
) -> Result<Response, ApiError> {
    let tenancy = state.tenancy_arc();
    let (identity, context) = tenancy.authenticate(request.headers()).await?;
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(identity.clone());
    if parts.method != Method::POST {
        return Ok(next.run(Request::from_parts(parts, body)).await);
    }
    let limit = state.max_body_bytes();
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::BodyTooLarge { limit })?;
    let peek: Peek = serde_json::from_slice(&bytes).unwrap_or_default();
    let model: Arc<str> = peek.model.as_deref().map(Arc::from).unwrap_or_default();
    if let Some(key) = &identity.key
        && !model.is_empty()
        && !key.allows_model(&model)
    {
        return Err(ApiError::ModelForbidden(model.to_string()));
    }
    // Only model-running routes are metered; counting tokens is not.
    let path = parts.uri.path();
    if path.ends_with("/count_tokens")
        || path == "/v1/responses/input_tokens"
        || path == "/tokenize"
        || path == "/detokenize"
    {
        return Ok(next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await);
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
    let owner = context.as_ref().map(|c| c.ids.clone()).unwrap_or_default();
    let route: Arc<str> = parts.uri.path().into();
    let start = UsageStart {
        request_id: request_id.clone(),
        instance: tenancy.instance.clone(),
        tenant_id: owner.tenant_id.clone(),
        project_id: owner.project_id.clone(),
        key_id: owner.key_id.clone(),
        route: route.clone(),
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
        request_id: request_id.clone(),
        model,
        started: Instant::now(),
        first_token_ms: AtomicU64::new(0),
        prompt_tokens: AtomicU64::new(0),
        completion_tokens: AtomicU64::new(0),
        sampled_tokens: Arc::new(AtomicU64::new(0)),
        cached_tokens: AtomicU64::new(0),
        provider: Mutex::new(None),
        cache_hit: AtomicBool::new(false),
        policy: Mutex::new(policy),
        guardrail_counts: Mutex::new(Default::default()),
        trace: Mutex::new(TraceParts { sampling: peek.sampling, ..Default::default() }),
        tenant_id: owner.tenant_id.clone(),
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
    let mut finish = Finish {
        tenancy,
        meter,
        admission,
        http_status,
        ended: false,
        failed_in_stream: false,
        keep,
        owner,
        route,
    };
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
            // Each event is a chunk of its own; an error event is the stream's failure.
            if let Some(Ok(bytes)) = &chunk
                && (bytes.starts_with(b"data: {\"error\":") || bytes.starts_with(b"event: error\n"))
            {
                finish.failed_in_stream = true;
            }
            // Dropping `finish` with the stream completes the record: ended, or cut short.
            finish.ended = chunk.is_none();
            chunk.map(|chunk| (chunk, (body, finish)))
        });
    Ok(Response::from_parts(parts, Body::from_stream(stream)))
}
