//! The meter of one admitted request: what handlers report to it (tokens, route, guardrail
//! counts, engine timings), and the [`Finish`] that completes its usage record and writes its
//! trace when the response ends or the client goes away.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_store::{UsageFinish, now_ms};
use futures::StreamExt;

use super::{Owner, Sampling, Tenancy};
use crate::limits::Admission;

/// The live record of one admitted request; handlers report to it through [`current`].
pub struct Meter {
    pub(super) request_id: Arc<str>,
    pub(super) model: Arc<str>,
    pub(super) started: Instant,
    pub(super) first_token_ms: AtomicU64,
    pub(super) prompt_tokens: AtomicU64,
    pub(super) completion_tokens: AtomicU64,
    /// Tokens the local engine sampled for this request, counted by the engine as it samples
    /// them: a stream the client left mid-answer is billed what it used.
    pub(super) sampled_tokens: Arc<AtomicU64>,
    pub(super) cached_tokens: AtomicU64,
    pub(super) provider: Mutex<Option<String>>,
    pub(super) cache_hit: AtomicBool,
    /// The privacy policy in force (the project's or tenant's, tightened by a preset's).
    pub(super) policy: Mutex<Option<Arc<ferry_guardrails::Policy>>>,
    /// Values redacted or blocked, by kind (never the values).
    pub(super) guardrail_counts: Mutex<std::collections::BTreeMap<ferry_guardrails::PiiKind, usize>>,
    /// What the trace says beyond the counters: route, engine timings, the model's card.
    pub(super) trace: Mutex<TraceParts>,
    /// The request's tenant id (none for a server without keys or an admin key outside
    /// tenants): the gateway shares cached answers only within it.
    pub(crate) tenant_id: Option<Arc<str>>,
}

#[derive(Default)]
pub(super) struct TraceParts {
    pub(super) route: Option<ferry_gateway::Route>,
    /// (queue, prefill, decode) in milliseconds, from the engine.
    pub(super) engine_ms: Option<(f64, f64, f64)>,
    /// (mean, max) gap between consecutive tokens of a choice in milliseconds, from the
    /// engine (the choice with the largest maximum).
    pub(super) inter_token_ms: Option<(f64, f64)>,
    pub(super) model: Option<serde_json::Value>,
    pub(super) sampling: Sampling,
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

    /// The counter a local generation's engine request adds its sampled tokens to.
    pub fn sampled_tokens(&self) -> Arc<AtomicU64> {
        self.sampled_tokens.clone()
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
    pub(super) static METER: Arc<Meter>;
}

/// The meter of the request being handled, if it is metered.
pub fn current() -> Option<Arc<Meter>> {
    METER.try_with(Arc::clone).ok()
}

/// The engine's prefix-cache scope of the request being handled: its tenant's, so that no
/// tenant reuses another's cached prompt (and learns from `cached_tokens` or the first token's
/// time what that one asked), salted by the request's `cache_salt`; 0 with neither.
pub fn cache_scope(salt: Option<&str>) -> u64 {
    use std::hash::BuildHasher;
    let tenant = current().and_then(|m| m.tenant_id.clone());
    if tenant.is_none() && salt.is_none() {
        return 0;
    }
    // SipHash with fixed keys: the same tenant and salt get the same scope in every request.
    let hasher = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    hasher.hash_one((tenant.as_deref(), salt)).max(1)
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

/// The most of a streamed answer kept for a tenant that keeps content.
pub(super) const MAX_KEPT_RESPONSE: usize = 8 * 1024 * 1024;

/// A request and its answer, for a tenant that keeps content.
pub(super) struct Kept {
    pub(super) tenant_id: String,
    pub(super) request: axum::body::Bytes,
    pub(super) response: Vec<u8>,
}

/// Completes a usage record when dropped: at the end of the response, or when the client
/// goes away mid-stream (`cancelled`).
pub(super) struct Finish {
    pub(super) tenancy: Arc<Tenancy>,
    pub(super) meter: Arc<Meter>,
    pub(super) admission: Admission,
    pub(super) http_status: u16,
    pub(super) ended: bool,
    /// A stream that reported an error in an event (after its 200 was sent): a failure all
    /// the same.
    pub(super) failed_in_stream: bool,
    pub(super) keep: Option<Kept>,
    /// Whose request it was and its route, for its trace.
    pub(super) owner: Owner,
    pub(super) route: Arc<str>,
}

impl Finish {
    /// The request's trace detail: what its usage record's columns don't already say (how it
    /// was routed, guardrail actions as counts, engine timings, sampling parameters, the
    /// model's provenance), written straight from its parts. `ferry_store::traces::whole`
    /// adds the record's columns when the trace is read.
    fn trace_detail(&self, finish: &UsageFinish) -> Option<String> {
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
        // Sized for a typical detail (200-300 bytes), so the buffer isn't regrown (and copied)
        // while it is written.
        let mut j = TraceWriter(Vec::with_capacity(384));
        j.raw("{\"routing\":{\"target\":");
        j.opt_str(route.map(|r| r.target.as_str()));
        j.raw(",\"attempts\":");
        j.opt_int(route.map(|r| r.attempts as u64));
        j.raw(",\"fallbacks\":");
        j.opt_int(route.map(|r| r.fallbacks as u64));
        j.raw(if route.is_some_and(|r| r.cache_hit) {
            ",\"cache_hit\":true}"
        } else {
            ",\"cache_hit\":false}"
        });
        j.raw(",\"guardrails\":{\"policy\":");
        j.opt_str(policy.as_ref().map(|p| p.name.as_str()));
        j.raw(",\"counts\":{");
        for (i, (kind, n)) in counts.iter().enumerate() {
            j.key(i == 0, kind.as_str());
            j.int(*n as u64);
        }
        j.raw("}},\"timings\":{");
        let timings = [
            ("queue_ms", engine.map(|e| e.0)),
            ("prefill_ms", engine.map(|e| e.1)),
            ("decode_ms", engine.map(|e| e.2)),
            ("inter_token_mean_ms", gaps.map(|g| g.0)),
            ("inter_token_max_ms", gaps.map(|g| g.1)),
        ];
        let mut first = true;
        for (key, value) in timings {
            if let Some(value) = value {
                j.key(first, key);
                first = false;
                j.float(value);
            }
        }
        if route.is_some_and(|r| !r.cache_hit) {
            j.key(first, "upstream_ms");
            j.int(finish.latency_ms);
        }
        j.raw("},\"sampling\":{");
        for (i, (key, value)) in parts.sampling.given().enumerate() {
            j.key(i == 0, key);
            j.value(value);
        }
        j.raw("},\"model_card\":");
        match card.as_ref() {
            Some(card) => j.value(card),
            None => j.raw("null"),
        }
        j.raw("}");
        String::from_utf8(j.0).ok()
    }

    /// The record's columns as its trace shows them (for a span exported at the end).
    fn columns(&self, finish: &UsageFinish) -> ferry_store::traces::RecordColumns {
        let text = |v: &Option<Arc<str>>| v.as_deref().map(String::from);
        ferry_store::traces::RecordColumns {
            request_id: self.meter.request_id.to_string(),
            route: self.route.to_string(),
            model: self.meter.model.to_string(),
            status: finish.status.clone(),
            http_status: Some(finish.http_status as i64),
            tenant_id: text(&self.owner.tenant_id),
            project_id: text(&self.owner.project_id),
            key_id: text(&self.owner.key_id),
            provider: finish.provider.clone(),
            latency_ms: Some(finish.latency_ms as i64),
            ttft_ms: finish.ttft_ms.map(|t| t as i64),
            prompt_tokens: finish.prompt_tokens as i64,
            completion_tokens: finish.completion_tokens as i64,
            cached_tokens: finish.cached_tokens as i64,
            cost: finish.cost,
        }
    }
}

/// A trace written as JSON by hand: its keys are literals written as they are, where serde
/// scanned each of the forty-odd for characters to escape (a third of the trace's cost);
/// values go through serde_json, so strings are escaped and numbers written as serde writes
/// them. `GET /v1/traces/{id}` serves the text as it is.
struct TraceWriter(Vec<u8>);

impl TraceWriter {
    /// JSON punctuation and keys, which need no escaping.
    fn raw(&mut self, text: &str) {
        self.0.extend_from_slice(text.as_bytes());
    }

    /// `"key":`, after a comma unless it is the object's `first`.
    fn key(&mut self, first: bool, key: &str) {
        self.raw(if first { "\"" } else { ",\"" });
        self.raw(key);
        self.raw("\":");
    }

    // serde_json writing into a `Vec` cannot fail: its only errors are the writer's, and
    // a map key that is not a string, which neither these values nor a `Value` can have.

    fn str(&mut self, value: &str) {
        let _ = serde_json::to_writer(&mut self.0, value);
    }

    fn opt_str(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.str(value),
            None => self.raw("null"),
        }
    }

    fn int(&mut self, value: u64) {
        self.raw(itoa::Buffer::new().format(value));
    }

    fn opt_int(&mut self, value: Option<u64>) {
        match value {
            Some(value) => self.int(value),
            None => self.raw("null"),
        }
    }

    /// As serde_json writes an `f64`: shortest round-trip digits, `null` when not finite.
    fn float(&mut self, value: f64) {
        let _ = serde_json::to_writer(&mut self.0, &value);
    }

    fn value(&mut self, value: &serde_json::Value) {
        let _ = serde_json::to_writer(&mut self.0, value);
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let m = &self.meter;
        let prompt = m.prompt_tokens.load(Ordering::Relaxed);
        let completion =
            m.completion_tokens.load(Ordering::Relaxed) + m.sampled_tokens.load(Ordering::Relaxed);
        let cached = m.cached_tokens.load(Ordering::Relaxed);
        let cost = if m.cache_hit.load(Ordering::Relaxed) {
            0.0
        } else {
            self.tenancy.prices.get(&*m.model).map_or(0.0, |p| p.cost(prompt, completion, cached))
        };
        self.tenancy.limiter.settle(&self.admission, prompt + completion, cost);
        let status = match (self.ended, self.http_status) {
            (false, _) => "cancelled",
            (true, s) if s < 400 && !self.failed_in_stream => "ok",
            _ => "error",
        };
        let ttft = m.first_token_ms.load(Ordering::Relaxed);
        let provider = m.provider.lock().ok().and_then(|p| p.clone());
        crate::telemetry::finished(&crate::telemetry::Finished {
            route: &self.route,
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
        // The trace's detail goes in the record's row.
        finish.trace =
            (self.tenancy.metering || crate::otel::enabled()).then(|| self.trace_detail(&finish)).flatten();
        if crate::otel::enabled()
            && let Some(detail) = &finish.trace
        {
            let trace = ferry_store::traces::whole(&self.columns(&finish), detail);
            crate::otel::export(&trace, m.started.elapsed());
        }
        if self.tenancy.metering {
            self.tenancy.usage.finish(m.request_id.clone(), finish);
        }
        if let Some(keep) = self.keep.take() {
            let content = ferry_store::content::Content {
                request_id: m.request_id.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_values_are_written_as_serde_writes_them() {
        let mut j = TraceWriter(Vec::new());
        j.raw("{\"s\":");
        j.str("a \"quoted\"\nline \u{1} é");
        j.key(false, "none");
        j.opt_str(None);
        j.key(false, "n");
        j.int(u64::MAX);
        j.key(false, "f");
        j.float(0.1 + 0.2);
        j.key(false, "whole");
        j.float(3.0);
        j.key(false, "nan");
        j.float(f64::NAN);
        j.key(false, "v");
        j.value(&serde_json::json!({"stop": ["</s>", "\\"]}));
        j.raw("}");
        let expected = serde_json::json!({
            "s": "a \"quoted\"\nline \u{1} é", "none": null, "n": u64::MAX, "f": 0.1 + 0.2,
            "whole": 3.0, "nan": null, "v": {"stop": ["</s>", "\\"]},
        });
        let text = String::from_utf8(j.0).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), expected);
        // Byte for byte as serde writes each value.
        for value in [&expected["s"], &expected["f"], &expected["whole"], &expected["v"]] {
            assert!(text.contains(&serde_json::to_string(value).unwrap()), "{text}");
        }
    }
}
