//! Routing a request to an upstream target: aliases with one or more targets, retries with
//! backoff (honouring `Retry-After`), fallback to the next target, load balancing and a
//! circuit breaker per target. Streams fall back only before their first event.

pub mod cache;
pub mod config;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_providers::anthropic::AnthropicProvider;
use ferry_providers::gemini::GeminiProvider;
use ferry_providers::openai::OpenAiProvider;
use ferry_providers::{
    ChatEvent, ChatRequest, ChatResponse, CompletionRequest, EventStream, Provider, ProviderError, Timeouts,
};
use futures::StreamExt;
use futures::future::BoxFuture;

pub use config::{
    AliasConfig, GatewayConfig, PresetConfig, PresetParams, ProviderConfig, Strategy, TargetConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("provider `{0}`: {1}")]
    Config(String, String),
    /// Every target failed (or had its circuit open); the last failure.
    #[error(transparent)]
    Upstream(#[from] ProviderError),
    #[error("no target of `{0}` is configured")]
    NoTarget(String),
    /// Every target's circuit is open; the first closes again after `retry_after`.
    #[error("every target of `{alias}` is unavailable for now (its circuit is open)")]
    CircuitOpen { alias: String, retry_after: Duration },
}

/// Where a request went: for response headers and traces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// `provider/model` of the target that answered.
    pub target: String,
    /// Calls made, retries and fallbacks included.
    pub attempts: u32,
    /// Targets given up on before the one that answered.
    pub fallbacks: u32,
    /// Answered from the response cache, with no upstream call.
    pub cache_hit: bool,
}

/// How a request may use the exact response cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheUse<'a> {
    /// The request's own choice (`x-ferry-cache`); `None`: the alias decides.
    pub enabled: Option<bool>,
    /// Whose answers it may be given: entries are shared only within one scope (Ferry uses
    /// the tenant), so a tenant never receives, nor learns the existence of, another's.
    pub scope: &'a str,
}

#[derive(Debug)]
pub struct Routed<T> {
    pub value: T,
    pub route: Route,
}

/// A target's circuit: closed (calls flow), open (calls skipped until `until`), then
/// half-open (one probe decides).
#[derive(Debug, Default)]
struct Circuit {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

struct Target {
    provider: Arc<dyn Provider>,
    provider_name: String,
    model: String,
    weight: u32,
    circuit: Mutex<Circuit>,
    outstanding: AtomicU64,
}

impl Target {
    fn label(&self) -> String {
        format!("{}/{}", self.provider_name, self.model)
    }
}

struct Alias {
    targets: Vec<Arc<Target>>,
    strategy: Strategy,
    retries: u32,
    /// Cache answers for this long unless a request says otherwise; `None`: only on request.
    cache_ttl: Option<Duration>,
}

/// Circuit breaker and retry settings shared by every alias.
#[derive(Debug, Clone, Copy)]
pub struct Reliability {
    pub failure_threshold: u32,
    pub open_for: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for Reliability {
    fn default() -> Self {
        Reliability {
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

pub struct Gateway {
    aliases: HashMap<String, Alias>,
    presets: HashMap<String, PresetConfig>,
    reliability: Reliability,
    counter: AtomicU64,
    cache: Arc<cache::ResponseCache>,
    /// TTL of entries cached because a request asked for it.
    request_cache_ttl: Duration,
}

impl Gateway {
    pub fn from_config(config: &GatewayConfig) -> Result<Self, GatewayError> {
        let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        for (name, p) in &config.providers {
            let base_url = p.checked_base_url().map_err(|e| GatewayError::Config(name.clone(), e))?;
            if let Some(hint) = p.base_url_hint() {
                tracing::warn!(provider = %name, "{hint}");
            }
            let api_key = p.api_key().map_err(|e| GatewayError::Config(name.clone(), e))?;
            let timeouts = Timeouts {
                connect: Duration::from_millis(p.connect_timeout_ms),
                first_byte: Duration::from_millis(p.first_byte_timeout_ms),
                total: Duration::from_millis(p.total_timeout_ms),
            };
            let provider: Arc<dyn Provider> = match p.kind.as_str() {
                "openai" => Arc::new(
                    OpenAiProvider::new(base_url, api_key, timeouts)
                        .map_err(|e| GatewayError::Config(name.clone(), e.to_string()))?,
                ),
                "anthropic" => Arc::new(
                    AnthropicProvider::new(base_url, api_key, timeouts)
                        .map_err(|e| GatewayError::Config(name.clone(), e.to_string()))?,
                ),
                "gemini" => Arc::new(
                    GeminiProvider::new(base_url, api_key, timeouts)
                        .map_err(|e| GatewayError::Config(name.clone(), e.to_string()))?,
                ),
                other => {
                    return Err(GatewayError::Config(
                        name.clone(),
                        format!("unknown kind `{other}` (known: openai, anthropic, gemini)"),
                    ));
                }
            };
            providers.insert(name.clone(), provider);
        }
        let mut aliases = HashMap::new();
        for alias in &config.aliases {
            let targets = alias
                .targets
                .iter()
                .map(|t| {
                    let provider = providers.get(&t.provider).cloned().ok_or_else(|| {
                        GatewayError::Config(
                            t.provider.clone(),
                            format!("alias `{}` names an unknown provider", alias.name),
                        )
                    })?;
                    Ok(Arc::new(Target {
                        provider,
                        provider_name: t.provider.clone(),
                        model: t.model.clone(),
                        weight: t.weight.max(1),
                        circuit: Mutex::new(Circuit::default()),
                        outstanding: AtomicU64::new(0),
                    }))
                })
                .collect::<Result<Vec<_>, GatewayError>>()?;
            let cache_ttl = alias.cache_ttl_s.filter(|&s| s > 0).map(Duration::from_secs);
            let entry = Alias { targets, strategy: alias.strategy, retries: alias.retries, cache_ttl };
            aliases.insert(alias.name.clone(), entry);
        }
        let reliability = Reliability {
            failure_threshold: config.circuit_failure_threshold,
            open_for: Duration::from_millis(config.circuit_open_ms),
            ..Reliability::default()
        };
        let presets = config.presets.iter().map(|p| (p.name.clone(), p.clone())).collect();
        Ok(Gateway {
            aliases,
            presets,
            reliability,
            counter: AtomicU64::new(0),
            cache: Arc::new(cache::ResponseCache::new(config.cache_max_bytes)),
            request_cache_ttl: Duration::from_secs(config.cache_ttl_s),
        })
    }

    pub fn has_alias(&self, name: &str) -> bool {
        self.aliases.contains_key(name)
    }

    pub fn alias_names(&self) -> impl Iterator<Item = &str> {
        self.aliases.keys().map(String::as_str)
    }

    pub fn preset(&self, name: &str) -> Option<&PresetConfig> {
        self.presets.get(name)
    }

    pub fn presets(&self) -> impl Iterator<Item = &PresetConfig> {
        self.presets.values()
    }

    /// How long an answer for `alias` is cached: the request's own choice (`x-ferry-cache`)
    /// first, then the alias's.
    fn cache_ttl(&self, alias: &str, use_cache: Option<bool>) -> Option<Duration> {
        let alias_ttl = self.aliases.get(alias).and_then(|a| a.cache_ttl);
        match use_cache {
            Some(false) => None,
            Some(true) => Some(alias_ttl.unwrap_or(self.request_cache_ttl)),
            None => alias_ttl,
        }
    }

    /// A plain answer, from the cache where `cache` and the alias allow.
    pub async fn chat(
        &self,
        alias: &str,
        request: ChatRequest,
        cache: CacheUse<'_>,
    ) -> Result<Routed<ChatResponse>, GatewayError> {
        self.answer(alias, request, cache, |provider, request| provider.chat(request)).await
    }

    /// A streamed answer. With the cache on, a hit replays a stream recorded earlier; a miss
    /// is recorded as it passes and kept only if it ends with every choice finished (a stream
    /// cut short by an error or by the client is never kept).
    pub async fn chat_stream(
        &self,
        alias: &str,
        request: ChatRequest,
        cache: CacheUse<'_>,
    ) -> Result<Routed<EventStream>, GatewayError> {
        self.stream(alias, request, cache, |provider, request| provider.chat_stream(request)).await
    }

    /// A legacy text completion, routed, retried, cached and fallen back like a chat.
    pub async fn completion(
        &self,
        alias: &str,
        request: CompletionRequest,
        cache: CacheUse<'_>,
    ) -> Result<Routed<ChatResponse>, GatewayError> {
        self.answer(alias, request, cache, |provider, request| provider.completion(request)).await
    }

    /// A streamed legacy text completion.
    pub async fn completion_stream(
        &self,
        alias: &str,
        request: CompletionRequest,
        cache: CacheUse<'_>,
    ) -> Result<Routed<EventStream>, GatewayError> {
        self.stream(alias, request, cache, |provider, request| provider.completion_stream(request)).await
    }

    async fn answer<R, F>(
        &self,
        alias: &str,
        request: R,
        cache: CacheUse<'_>,
        call: F,
    ) -> Result<Routed<ChatResponse>, GatewayError>
    where
        R: Routable,
        F: for<'a> Fn(&'a dyn Provider, R) -> BoxFuture<'a, Result<ChatResponse, ProviderError>>,
    {
        let Some(ttl) = self.cache_ttl(alias, cache.enabled) else {
            return self.route(alias, request, call).await;
        };
        let key = cache::ResponseCache::key(alias, cache.scope, &request, false);
        if let Some((cache::Cached::Response(value), target)) = self.cache.get(&key) {
            return Ok(Routed { value, route: Route { cache_hit: true, target, ..Route::default() } });
        }
        let routed = self.route(alias, request, call).await?;
        self.cache.put(key, &cache::Cached::Response(routed.value.clone()), &routed.route.target, ttl);
        Ok(routed)
    }

    async fn stream<R, F>(
        &self,
        alias: &str,
        request: R,
        cache_use: CacheUse<'_>,
        call: F,
    ) -> Result<Routed<EventStream>, GatewayError>
    where
        R: Routable,
        F: for<'a> Fn(&'a dyn Provider, R) -> BoxFuture<'a, Result<EventStream, ProviderError>>,
    {
        let Some(ttl) = self.cache_ttl(alias, cache_use.enabled) else {
            return self.route(alias, request, call).await;
        };
        let key = cache::ResponseCache::key(alias, cache_use.scope, &request, true);
        if let Some((cache::Cached::Events(events), target)) = self.cache.get(&key) {
            let replay = futures::stream::iter(events.into_iter().map(Ok));
            return Ok(Routed {
                value: Box::pin(replay),
                route: Route { cache_hit: true, target, ..Route::default() },
            });
        }
        let routed = self.route(alias, request, call).await?;
        let cache = self.cache.clone();
        let target = routed.route.target.clone();
        let recorded = Arc::new(Mutex::new(Some(Vec::new())));
        let tape = recorded.clone();
        let events = routed.value.inspect(move |event| {
            let Ok(mut tape) = tape.lock() else { return };
            match (event, tape.as_mut()) {
                (Ok(event), Some(events)) => events.push(event.clone()),
                (Err(_), _) => *tape = None,
                _ => {}
            }
        });
        let keep = futures::stream::once(async move {
            let events = recorded.lock().ok().and_then(|mut r| r.take()).unwrap_or_default();
            let finished: std::collections::HashSet<u32> = events
                .iter()
                .filter_map(|e| if let ChatEvent::Finish { choice, .. } = e { Some(*choice) } else { None })
                .collect();
            let choices: std::collections::HashSet<u32> = events.iter().filter_map(event_choice).collect();
            if !finished.is_empty() && choices.is_subset(&finished) {
                cache.put(key, &cache::Cached::Events(events), &target, ttl);
            }
            None
        })
        .filter_map(futures::future::ready);
        Ok(Routed { value: Box::pin(events.chain(keep)), route: routed.route })
    }

    /// Targets in the order to try them.
    fn order(&self, alias: &Alias) -> Vec<Arc<Target>> {
        let mut targets = alias.targets.clone();
        match alias.strategy {
            Strategy::Fallback => {}
            Strategy::Weighted => {
                // A deterministic weighted rotation: request k goes first to the target whose
                // cumulative weight covers k modulo the total.
                let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
                let k = self.counter.fetch_add(1, Ordering::Relaxed) % total.max(1);
                let mut acc = 0;
                let first = targets
                    .iter()
                    .position(|t| {
                        acc += u64::from(t.weight);
                        k < acc
                    })
                    .unwrap_or(0);
                targets.rotate_left(first);
            }
            Strategy::LeastOutstanding => {
                targets.sort_by_key(|t| t.outstanding.load(Ordering::Relaxed));
            }
        }
        targets
    }

    async fn route<R, T, F>(&self, alias_name: &str, request: R, call: F) -> Result<Routed<T>, GatewayError>
    where
        R: Routable,
        F: for<'a> Fn(&'a dyn Provider, R) -> BoxFuture<'a, Result<T, ProviderError>>,
    {
        let Some(alias) = self.aliases.get(alias_name) else {
            return Err(GatewayError::NoTarget(alias_name.to_string()));
        };
        let mut attempts = 0;
        let mut fallbacks = 0;
        let mut last_error = None;
        for target in self.order(alias) {
            if !self.admit(&target) {
                continue;
            }
            for retry in 0..=alias.retries {
                attempts += 1;
                let mut upstream = request.clone();
                upstream.set_model(&target.model);
                target.outstanding.fetch_add(1, Ordering::Relaxed);
                let result = call(target.provider.as_ref(), upstream).await;
                target.outstanding.fetch_sub(1, Ordering::Relaxed);
                match result {
                    Ok(value) => {
                        self.record(&target, true);
                        let route = Route { target: target.label(), attempts, fallbacks, cache_hit: false };
                        return Ok(Routed { value, route });
                    }
                    Err(e) => {
                        let retryable = e.is_retryable();
                        // A client error (400, 404...) means the target itself is healthy.
                        self.record(&target, !retryable);
                        tracing::warn!(alias = alias_name, target = %target.label(), attempt = attempts, error = %e, "upstream call failed");
                        if !retryable {
                            // The client's mistake: the same request fails everywhere.
                            return Err(GatewayError::Upstream(e));
                        }
                        let wait = e.retry_after().unwrap_or_else(|| self.backoff(retry));
                        last_error = Some(e);
                        if self.is_open(&target) {
                            // This failure opened the circuit: no more tries here, fall back.
                            break;
                        }
                        if retry < alias.retries {
                            tokio::time::sleep(wait.min(self.reliability.backoff_max)).await;
                        }
                    }
                }
            }
            fallbacks += 1;
        }
        Err(match last_error {
            Some(e) => GatewayError::Upstream(e),
            None => {
                // Nothing was tried: every circuit was open. Say when the first one probes again.
                let now = Instant::now();
                let retry_after = alias
                    .targets
                    .iter()
                    .filter_map(|t| t.circuit.lock().ok().and_then(|c| c.open_until))
                    .map(|until| until.saturating_duration_since(now))
                    .min()
                    .unwrap_or_default();
                GatewayError::CircuitOpen { alias: alias_name.to_string(), retry_after }
            }
        })
    }

    /// Whether `target`'s circuit is open now (its failures just opened it, say).
    fn is_open(&self, target: &Target) -> bool {
        target.circuit.lock().ok().and_then(|c| c.open_until).is_some_and(|until| Instant::now() < until)
    }

    fn backoff(&self, retry: u32) -> Duration {
        self.reliability.backoff_base.saturating_mul(1 << retry.min(10)).min(self.reliability.backoff_max)
    }

    /// Whether the circuit lets a call through; past its open time one probe goes.
    fn admit(&self, target: &Target) -> bool {
        let Ok(mut c) = target.circuit.lock() else { return true };
        match c.open_until {
            None => true,
            Some(until) if Instant::now() < until => false,
            Some(_) if c.probing => false,
            Some(_) => {
                c.probing = true;
                true
            }
        }
    }

    fn record(&self, target: &Target, success: bool) {
        let Ok(mut c) = target.circuit.lock() else { return };
        c.probing = false;
        if success {
            c.consecutive_failures = 0;
            c.open_until = None;
            return;
        }
        c.consecutive_failures += 1;
        if c.consecutive_failures >= self.reliability.failure_threshold {
            if c.open_until.is_none() {
                tracing::warn!(target = %target.label(), "circuit opened");
            }
            c.open_until = Some(Instant::now() + self.reliability.open_for);
        }
    }
}

/// A request the gateway routes: sent to each target under the target's model name, and
/// hashed (with its kind) for the response cache.
pub trait Routable: Clone + serde::Serialize + Send {
    /// Keeps a chat and a text completion of the same JSON apart in the cache.
    const KIND: &'static str;
    fn set_model(&mut self, model: &str);
}

impl Routable for ChatRequest {
    const KIND: &'static str = "chat";
    fn set_model(&mut self, model: &str) {
        self.model = model.to_string();
    }
}

impl Routable for CompletionRequest {
    const KIND: &'static str = "completion";
    fn set_model(&mut self, model: &str) {
        self.model = model.to_string();
    }
}

/// The choice an event belongs to (usage belongs to none).
fn event_choice(event: &ChatEvent) -> Option<u32> {
    match event {
        ChatEvent::Text { choice, .. }
        | ChatEvent::ToolCall { choice, .. }
        | ChatEvent::Finish { choice, .. } => Some(*choice),
        ChatEvent::Usage(_) => None,
    }
}
