//! What chat completions and completions share once a request is valid: submitting its
//! prompts to the scheduler, merging their event streams, and collecting a whole answer.

use std::pin::Pin;
use std::sync::Arc;

use ferry_api::openai::{
    ChatTokenLogprob, ChatTopLogprob, CompletionTokensDetails, PromptTokensDetails, Usage,
};
use ferry_engine::{Event, FinishReason, GenerateRequest, LocalModel, TokenId, TokenInfo};
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::ApiError;

/// An event tagged with the index of the prompt it belongs to.
pub type TaggedEvent = (usize, Event);

/// Requests in the scheduler; dropping this cancels all of them.
pub struct Submitted {
    pub events: Pin<Box<dyn Stream<Item = TaggedEvent> + Send>>,
    pub prompt_tokens: usize,
    pub n: usize,
    pub n_prompts: usize,
}

pub fn submit(model: &LocalModel, requests: Vec<GenerateRequest>) -> Result<Submitted, ApiError> {
    let prompt_tokens = requests.iter().map(|r| r.prompt.len()).sum();
    let n = requests.first().map_or(1, |r| r.n);
    let n_prompts = requests.len();
    // Each prompt waits in the queue on its own: more than it holds could never be admitted,
    // and a 429 would invite a retry.
    let queue = model.scheduler.config().max_waiting;
    if n_prompts > queue {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "This request's {n_prompts} prompts are more than this model's queue holds ({queue}, --max-queue): send at most {queue} per request"
            ),
        ));
    }
    let mut streams = Vec::with_capacity(requests.len());
    let meter = crate::tenancy::current();
    for (prompt_idx, mut request) in requests.into_iter().enumerate() {
        // The engine counts the tokens it samples into the request's usage record as it
        // samples them, so that a cancelled request is billed what it used.
        request.sampled = meter.as_ref().map(|m| m.sampled_tokens());
        // A failure drops the receivers already made, which cancels those requests.
        let receiver = model.scheduler.submit_until(request, crate::deadline::current())?;
        streams.push(UnboundedReceiverStream::new(receiver).map(move |e| (prompt_idx, e)));
    }
    let events = futures::stream::select_all(streams);
    let Some(meter) = meter else {
        return Ok(Submitted { events: Box::pin(events), prompt_tokens, n, n_prompts });
    };
    // The request's usage record counts what the engine really did.
    meter.set_provider("local");
    meter.add_prompt_tokens(prompt_tokens as u64);
    meter.set_model_card(serde_json::to_value(model.info()).unwrap_or_default());
    let model_id = model.info().id.clone();
    let mut last_token: Option<std::time::Instant> = None;
    let events = events.inspect(move |(_, event)| match event {
        Event::Delta { .. } => {
            meter.first_token();
            let now = std::time::Instant::now();
            if let Some(last) = last_token.replace(now) {
                crate::telemetry::inter_token(&model_id, now.duration_since(last).as_secs_f64());
            }
        }
        // (Completion tokens reach the meter from the engine, as they are sampled.)
        Event::Finished { choice, completion_tokens, cached_tokens, timings, .. } => {
            if *choice == 0 {
                meter.add_cached_tokens(*cached_tokens as u64);
            }
            meter.engine_timings(timings, *completion_tokens);
        }
        _ => {}
    });
    Ok(Submitted { events: Box::pin(events), prompt_tokens, n, n_prompts })
}

/// One finished choice.
#[derive(Default)]
pub struct CollectedChoice {
    pub text: String,
    pub tokens: Vec<TokenInfo>,
    /// The first prompt token and the logprobs of the others (completions' echo).
    pub prompt_logprobs: Option<(TokenId, Vec<TokenInfo>)>,
    pub finish_reason: Option<FinishReason>,
    /// The stop string that ended the choice, if one did.
    pub stop_sequence: Option<String>,
}

pub struct Collected {
    /// Indexed by `prompt_idx * n + choice`.
    pub choices: Vec<CollectedChoice>,
    pub usage: Usage,
}

/// Waits for every choice of every prompt to finish.
pub async fn collect(mut submitted: Submitted) -> Result<Collected, ApiError> {
    let n = submitted.n;
    let mut choices: Vec<CollectedChoice> =
        (0..n * submitted.n_prompts).map(|_| CollectedChoice::default()).collect();
    let mut completion_tokens = 0;
    let mut cached_tokens = 0;
    let mut open = choices.len();
    while open > 0 {
        let Some((prompt_idx, event)) = submitted.events.next().await else {
            return Err(ApiError::Internal("the engine stopped before the answer was complete".into()));
        };
        match event {
            Event::PromptLogprobs { first_token, rest } => {
                for choice in &mut choices[prompt_idx * n..(prompt_idx + 1) * n] {
                    choice.prompt_logprobs = Some((first_token, rest.clone()));
                }
            }
            Event::Delta { choice, text, tokens } => {
                let c = &mut choices[prompt_idx * n + choice];
                c.text.push_str(&text);
                c.tokens.extend(tokens);
            }
            Event::Finished {
                choice,
                reason,
                stop_sequence,
                completion_tokens: used,
                cached_tokens: cached,
                ..
            } => {
                // Each prompt's cache hit once, as OpenAI counts it (its choices share the prompt).
                if choice == 0 {
                    cached_tokens += cached;
                }
                let c = &mut choices[prompt_idx * n + choice];
                c.finish_reason = Some(reason);
                c.stop_sequence = stop_sequence;
                completion_tokens += used;
                open -= 1;
            }
            Event::Error(message) => return Err(ApiError::Internal(message)),
            Event::DeadlineExceeded { admitted, completion_tokens } => {
                return Err(ApiError::DeadlineExceeded { admitted, completion_tokens });
            }
        }
    }
    let mut usage = usage(submitted.prompt_tokens, completion_tokens);
    usage.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens: cached_tokens as u64 });
    Ok(Collected { choices, usage })
}

/// OpenAI's usage from the neutral one, with the prompt's cached tokens.
pub fn neutral_usage(u: &ferry_providers::Usage) -> Usage {
    let mut out = usage(u.prompt_tokens as usize, u.completion_tokens as usize);
    out.prompt_tokens_details = Some(PromptTokensDetails { cached_tokens: u.cached_tokens });
    out
}

/// OpenAI's usage, its details as OpenAI always sends them (none cached, none reasoning).
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Usage {
    Usage {
        prompt_tokens: prompt_tokens as u64,
        completion_tokens: completion_tokens as u64,
        total_tokens: (prompt_tokens + completion_tokens) as u64,
        prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: 0 }),
        completion_tokens_details: Some(CompletionTokensDetails { reasoning_tokens: 0 }),
    }
}

/// A token's logprob in chat completions' format.
pub fn chat_logprob(model: &LocalModel, info: &TokenInfo) -> ChatTokenLogprob {
    let bytes = model.backend.token_bytes(info.token).to_vec();
    ChatTokenLogprob {
        token: String::from_utf8_lossy(&bytes).into_owned(),
        logprob: info.logprob,
        bytes,
        top_logprobs: info
            .top
            .iter()
            .map(|t| {
                let bytes = model.backend.token_bytes(t.token).to_vec();
                ChatTopLogprob {
                    token: String::from_utf8_lossy(&bytes).into_owned(),
                    logprob: t.logprob,
                    bytes,
                }
            })
            .collect(),
    }
}

/// Seconds since the Unix epoch, for `created`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn request_id(prefix: &str) -> String {
    // As the real APIs spell them: OpenAI's completions `chatcmpl-…` and `cmpl-…`, its
    // Responses and tool calls `resp_…`, `msg_…`, `fc_…`, `call_…`, Anthropic's `msg_…`.
    let separator = if matches!(prefix, "chatcmpl" | "cmpl") { '-' } else { '_' };
    format!("{prefix}{separator}{}", uuid::Uuid::new_v4().simple())
}

/// Keeps the model alive as long as a response stream that uses it.
pub type SharedModel = Arc<LocalModel>;

/// Renders and tokenizes a conversation with the model's chat template, off the async runtime.
pub async fn chat_prompt(
    model: &SharedModel,
    messages: Vec<ferry_engine::ChatMessage>,
) -> Result<Vec<TokenId>, ApiError> {
    chat_prompt_with_tools(model, messages, Vec::new()).await
}

/// A conversation whose last message, the assistant's, generation continues (Anthropic's
/// prefill); see `LocalModel::continued_prompt`.
pub async fn continued_prompt(
    model: &SharedModel,
    messages: Vec<ferry_engine::ChatMessage>,
) -> Result<Vec<TokenId>, ApiError> {
    crate::guard::check_local(messages.iter().map(|m| m.content.as_str()))?;
    let model = model.clone();
    tokio::task::spawn_blocking(move || model.continued_prompt(&messages))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(prompt_error)
}

/// A conversation the engine could not make a prompt of: a 400 naming the tools or the
/// messages.
pub fn prompt_error(e: ferry_engine::EngineError) -> ApiError {
    match e {
        ferry_engine::EngineError::InvalidRequest(m) if m.starts_with("the tool") => {
            ApiError::invalid("tools", m)
        }
        ferry_engine::EngineError::InvalidRequest(m) => ApiError::invalid("messages", m),
        other => ApiError::from(other),
    }
}

/// `chat_prompt` for a conversation that offers tools (and may hold earlier calls and results).
pub async fn chat_prompt_with_tools(
    model: &SharedModel,
    messages: Vec<ferry_engine::ChatMessage>,
    tools: Vec<ferry_engine::ToolSpec>,
) -> Result<Vec<TokenId>, ApiError> {
    crate::guard::check_local(messages.iter().map(|m| m.content.as_str()))?;
    let model = model.clone();
    tokio::task::spawn_blocking(move || model.chat_prompt_with_tools(&messages, &tools))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(prompt_error)
}
