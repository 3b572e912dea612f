//! Privacy guardrails on the way to an upstream provider: the request's policy (its
//! project's or else its tenant's, made stricter by a preset's) is applied to every text the
//! provider would see (messages, tool calls and results). `redact` swaps values for typed
//! placeholders (`[EMAIL_1]`) and restores them in the answer the client gets, streamed or
//! not, so the provider never sees them; `block` refuses the request with `pii_blocked`,
//! naming the kinds found and never the values.
//!
//! Local models keep the data in this process; for them only `block` applies (see
//! [`check_local`]).

use std::collections::HashMap;
use std::sync::Arc;

use ferry_gateway::{CacheUse, Gateway, Routed};
use ferry_guardrails::{Action, PiiKind, Policy, Redactor};
use ferry_providers::{ChatEvent, ChatRequest, ChatResponse, CompletionRequest, EventStream, Part, Prompt};
use futures::StreamExt;

use crate::error::ApiError;

/// The stricter of two policies, kind by kind (block > redact > allow).
pub fn stricter(a: &Policy, b: &Policy) -> Policy {
    let rank = |a: Action| match a {
        Action::Allow => 0,
        Action::Redact => 1,
        Action::Block => 2,
    };
    let max = |x: Action, y: Action| if rank(x) >= rank(y) { x } else { y };
    Policy {
        name: format!("{}+{}", a.name, b.name),
        action: max(a.action, b.action),
        kinds: PiiKind::ALL.iter().map(|&k| (k, max(a.action_for(k), b.action_for(k)))).collect(),
        apply_to_responses: a.apply_to_responses || b.apply_to_responses,
    }
}

/// The policy of the request being handled (its project's or tenant's, tightened by a
/// preset's), kept on its meter.
fn policy() -> Option<Arc<Policy>> {
    crate::tenancy::current().and_then(|m| m.policy())
}

/// The response cache's scope of the request being handled: its tenant's id (none for a
/// server without keys, or an admin key outside any tenant; `CacheUse` then gets "").
fn cache_scope() -> Option<Arc<str>> {
    crate::tenancy::current().and_then(|m| m.tenant_id.clone())
}

fn blocked(e: ferry_guardrails::Blocked) -> ApiError {
    crate::telemetry::refused("pii_blocked");
    ApiError::PiiBlocked(e.kinds.iter().map(|k| k.as_str().to_string()).collect())
}

/// Redacts every text of the request the provider would see.
fn redact_request(policy: &Policy, request: &mut ChatRequest) -> Result<Redactor, ApiError> {
    let mut redactor = Redactor::new();
    // Placeholder-shaped text anywhere in the request is the user's own, never issued.
    for message in &request.messages {
        for part in &message.content {
            if let Part::Text(text) = part {
                redactor.reserve_literals(text);
            }
        }
        for call in &message.tool_calls {
            redactor.reserve_literals(&call.arguments);
        }
    }
    for message in &mut request.messages {
        for part in &mut message.content {
            if let Part::Text(text) = part {
                *text = redactor.redact(policy, text).map_err(blocked)?;
            }
        }
        for call in &mut message.tool_calls {
            call.arguments = redactor.redact(policy, &call.arguments).map_err(blocked)?;
        }
    }
    count_redactions(policy, &redactor);
    Ok(redactor)
}

fn count_redactions(policy: &Policy, redactor: &Redactor) {
    let counts = redactor.counts();
    if !counts.is_empty() {
        tracing::info!(policy = %policy.name, ?counts, "guardrail redacted values before the upstream call");
        if let Some(meter) = crate::tenancy::current() {
            meter.add_guardrail_counts(&counts);
        }
    }
}

/// Puts the request's values back; with `apply_to_responses`, what the model itself wrote
/// is redacted first (and those placeholders stay).
fn restore_response(
    policy: &Policy,
    redactor: &mut Redactor,
    response: &mut ChatResponse,
) -> Result<(), ApiError> {
    for choice in &mut response.choices {
        for part in &mut choice.message.content {
            if let Part::Text(text) = part {
                let own = redactor.redact_response(policy, text).map_err(blocked_answer)?;
                *text = redactor.restore(&own);
            }
        }
        for call in &mut choice.message.tool_calls {
            call.arguments = redactor.restore(&call.arguments);
        }
    }
    let counts = redactor.response_counts();
    if !counts.is_empty()
        && let Some(meter) = crate::tenancy::current()
    {
        meter.add_guardrail_counts(&counts);
    }
    Ok(())
}

fn blocked_answer(e: ferry_guardrails::Blocked) -> ApiError {
    ApiError::PiiBlocked(e.kinds.iter().map(|k| format!("{} (in the answer)", k.as_str())).collect())
}

/// A gateway call with the request's policy applied, metered.
pub async fn chat(
    gateway: &Gateway,
    alias: &str,
    mut request: ChatRequest,
    use_cache: Option<bool>,
) -> Result<Routed<ChatResponse>, ApiError> {
    let policy = policy();
    let redactor = match &policy {
        Some(policy) => Some(redact_request(policy, &mut request)?),
        None => None,
    };
    let scope = cache_scope();
    let routed = gateway
        .chat(alias, request, CacheUse { enabled: use_cache, scope: scope.as_deref().unwrap_or("") })
        .await;
    answered(alias, policy, redactor, routed)
}

/// A streaming gateway call with the request's policy applied: placeholders are restored in
/// the text and tool-call deltas, holding back only what might be half a placeholder.
pub async fn chat_stream(
    gateway: &Gateway,
    alias: &str,
    mut request: ChatRequest,
    use_cache: Option<bool>,
) -> Result<Routed<EventStream>, ApiError> {
    let policy = policy();
    let redactor = match &policy {
        Some(policy) => Some(redact_request(policy, &mut request)?),
        None => None,
    };
    let scope = cache_scope();
    let routed = gateway
        .chat_stream(alias, request, CacheUse { enabled: use_cache, scope: scope.as_deref().unwrap_or("") })
        .await;
    streamed(alias, policy, redactor, routed)
}

/// A legacy text completion through the gateway, its text prompts redacted like messages
/// (token-id prompts carry no text to screen).
pub async fn completion(
    gateway: &Gateway,
    alias: &str,
    mut request: CompletionRequest,
    use_cache: Option<bool>,
) -> Result<Routed<ChatResponse>, ApiError> {
    let policy = policy();
    let redactor = match &policy {
        Some(policy) => Some(redact_prompts(policy, &mut request)?),
        None => None,
    };
    let scope = cache_scope();
    let routed = gateway
        .completion(alias, request, CacheUse { enabled: use_cache, scope: scope.as_deref().unwrap_or("") })
        .await;
    answered(alias, policy, redactor, routed)
}

/// `completion`, streamed.
pub async fn completion_stream(
    gateway: &Gateway,
    alias: &str,
    mut request: CompletionRequest,
    use_cache: Option<bool>,
) -> Result<Routed<EventStream>, ApiError> {
    let policy = policy();
    let redactor = match &policy {
        Some(policy) => Some(redact_prompts(policy, &mut request)?),
        None => None,
    };
    let scope = cache_scope();
    let routed = gateway
        .completion_stream(
            alias,
            request,
            CacheUse { enabled: use_cache, scope: scope.as_deref().unwrap_or("") },
        )
        .await;
    streamed(alias, policy, redactor, routed)
}

fn redact_prompts(policy: &Policy, request: &mut CompletionRequest) -> Result<Redactor, ApiError> {
    let mut redactor = Redactor::new();
    for prompt in &request.prompts {
        if let Prompt::Text(text) = prompt {
            redactor.reserve_literals(text);
        }
    }
    if let Some(suffix) = &request.suffix {
        redactor.reserve_literals(suffix);
    }
    for prompt in &mut request.prompts {
        if let Prompt::Text(text) = prompt {
            *text = redactor.redact(policy, text).map_err(blocked)?;
        }
    }
    if let Some(suffix) = &mut request.suffix {
        *suffix = redactor.redact(policy, suffix).map_err(blocked)?;
    }
    count_redactions(policy, &redactor);
    Ok(redactor)
}

/// A plain answer metered and its values restored.
fn answered(
    alias: &str,
    policy: Option<Arc<Policy>>,
    redactor: Option<Redactor>,
    routed: Result<Routed<ChatResponse>, ferry_gateway::GatewayError>,
) -> Result<Routed<ChatResponse>, ApiError> {
    let mut routed = routed.inspect_err(|_| crate::telemetry::upstream_error(alias))?;
    if let Some(meter) = crate::tenancy::current() {
        meter.upstream(&routed.route, &routed.value.usage);
    }
    if let (Some(policy), Some(mut redactor)) = (policy, redactor) {
        restore_response(&policy, &mut redactor, &mut routed.value)?;
    }
    Ok(routed)
}

/// A stream metered as it passes, its values restored (or screened whole).
fn streamed(
    alias: &str,
    policy: Option<Arc<Policy>>,
    redactor: Option<Redactor>,
    routed: Result<Routed<EventStream>, ferry_gateway::GatewayError>,
) -> Result<Routed<EventStream>, ApiError> {
    let routed = routed.inspect_err(|_| crate::telemetry::upstream_error(alias))?;
    let events = crate::tenancy::tap_upstream(&routed.route, routed.value);
    let value = match (policy, redactor) {
        (Some(policy), Some(redactor)) if policy.apply_to_responses => {
            screen_stream(policy, redactor, events)
        }
        (_, Some(redactor)) if !redactor.counts().is_empty() => restore_stream(redactor, events),
        _ => events,
    };
    Ok(Routed { value, route: routed.route })
}

/// With `apply_to_responses`, a value in the answer can only be judged whole: each choice's
/// text is held until it ends, then screened and restored, and sent as one delta.
fn screen_stream(policy: Arc<Policy>, mut redactor: Redactor, events: EventStream) -> EventStream {
    let mut texts: HashMap<u32, String> = HashMap::new();
    let mut calls = CallRestorers::new();
    let screened = events.map(move |event| match event {
        Ok(ChatEvent::Text { choice, text, .. }) => {
            texts.entry(choice).or_default().push_str(&text);
            Vec::new()
        }
        Ok(ChatEvent::ToolCall { choice, index, id, name, arguments }) => {
            let r = calls.entry((choice, index)).or_insert_with(|| redactor.stream_restorer());
            vec![Ok(ChatEvent::ToolCall { choice, index, id, name, arguments: r.push(&arguments) })]
        }
        Ok(ChatEvent::Finish { choice, reason }) => {
            let text = texts.remove(&choice).unwrap_or_default();
            let mut out = Vec::new();
            flush_calls(&mut calls, choice, &mut out);
            match redactor.redact_response(&policy, &text) {
                Ok(own) => {
                    out.push(Ok(ChatEvent::Text { choice, text: redactor.restore(&own), logprobs: None }));
                    out.push(Ok(ChatEvent::Finish { choice, reason }));
                    out
                }
                Err(e) => vec![Err(ferry_providers::ProviderError::Status {
                    status: 400,
                    message: blocked_answer(e).to_string(),
                    code: Some("pii_blocked".into()),
                    param: None,
                    retry_after: None,
                })],
            }
        }
        other => vec![other],
    });
    Box::pin(screened.flat_map(futures::stream::iter))
}

/// A restorer per tool call, by (choice, call index).
type CallRestorers = HashMap<(u32, u32), ferry_guardrails::StreamRestorer>;

/// Sends what the restorers of `choice`'s tool calls held back, in call order.
fn flush_calls(
    calls: &mut CallRestorers,
    choice: u32,
    out: &mut Vec<Result<ChatEvent, ferry_providers::ProviderError>>,
) {
    let mut open: Vec<(u32, u32)> = calls.keys().filter(|(c, _)| *c == choice).copied().collect();
    open.sort_unstable();
    for (choice, index) in open {
        if let Some(r) = calls.remove(&(choice, index)) {
            let arguments = r.finish();
            if !arguments.is_empty() {
                out.push(Ok(ChatEvent::ToolCall { choice, index, id: None, name: None, arguments }));
            }
        }
    }
}

fn restore_stream(redactor: Redactor, events: EventStream) -> EventStream {
    // One restorer per choice's text and per tool call's arguments.
    let mut texts: HashMap<u32, ferry_guardrails::StreamRestorer> = HashMap::new();
    let mut calls = CallRestorers::new();
    let restored = events.map(move |event| {
        let event = match event {
            Ok(e) => e,
            Err(e) => return vec![Err(e)],
        };
        match event {
            ChatEvent::Text { choice, text, logprobs } => {
                let r = texts.entry(choice).or_insert_with(|| redactor.stream_restorer());
                vec![Ok(ChatEvent::Text { choice, text: r.push(&text), logprobs })]
            }
            ChatEvent::ToolCall { choice, index, id, name, arguments } => {
                let r = calls.entry((choice, index)).or_insert_with(|| redactor.stream_restorer());
                vec![Ok(ChatEvent::ToolCall { choice, index, id, name, arguments: r.push(&arguments) })]
            }
            ChatEvent::Finish { choice, reason } => {
                // Whatever was held back is flushed before the choice ends.
                let mut out = Vec::new();
                if let Some(r) = texts.remove(&choice) {
                    let tail = r.finish();
                    if !tail.is_empty() {
                        out.push(Ok(ChatEvent::Text { choice, text: tail, logprobs: None }));
                    }
                }
                flush_calls(&mut calls, choice, &mut out);
                out.push(Ok(ChatEvent::Finish { choice, reason }));
                out
            }
            other => vec![Ok(other)],
        }
    });
    Box::pin(restored.flat_map(futures::stream::iter))
}

/// For local models: a `block` policy refuses texts holding what it blocks (nothing leaves
/// the process, so nothing needs redacting).
pub fn check_local<'a>(texts: impl IntoIterator<Item = &'a str>) -> Result<(), ApiError> {
    let Some(policy) = policy() else { return Ok(()) };
    let mut found: Vec<PiiKind> = Vec::new();
    for text in texts {
        for finding in ferry_guardrails::detect(text) {
            if policy.action_for(finding.kind) == Action::Block && !found.contains(&finding.kind) {
                found.push(finding.kind);
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    found.sort_unstable();
    Err(blocked(ferry_guardrails::Blocked { kinds: found }))
}
