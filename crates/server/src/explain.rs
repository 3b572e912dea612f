//! `POST /v1/explanations` (a Ferry extension): which parts of a prompt drove an answer.
//!
//! Method: occlusion. The completion's log-likelihood under the model is computed for the
//! whole conversation, then again with each segment (a message, a sentence or a token of a
//! message's content) removed; a segment's score is how much the log-likelihood drops
//! without it (positive: it supported the answer; negative: it worked against it), and its
//! share is its part of all positive scores. Every variant is submitted to the scheduler at
//! once, so they are prefilled together in batched steps.
//!
//! Limits: occlusion measures each segment alone, so two segments that each suffice
//! (redundant facts) both score low; removing text also shifts the template's formatting,
//! which is part of what is measured; the cost grows with the number of segments (at most
//! [`MAX_SEGMENTS`]) and the prompt's length.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::IntoResponse;
use ferry_engine::{ChatMessage, Event, GenerateRequest, LocalModel, SamplingParams, TokenId, TokenInfo};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::tenancy::Identity;

/// Most segments one explanation occludes.
pub const MAX_SEGMENTS: usize = 256;
/// Alternatives reported for each completion token.
const TOP_LOGPROBS: usize = 5;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainRequest {
    model: String,
    #[serde(default)]
    messages: Option<Vec<InMessage>>,
    #[serde(default)]
    completion: Option<String>,
    /// Instead of `messages` and `completion`: a request whose content was retained.
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default = "default_granularity")]
    granularity: Granularity,
}

#[derive(Deserialize, Clone)]
struct InMessage {
    role: String,
    content: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Granularity {
    Message,
    Sentence,
    Token,
}

fn default_granularity() -> Granularity {
    Granularity::Sentence
}

#[derive(Serialize)]
struct Segment {
    message_index: usize,
    text: String,
    /// Byte offsets in the message's content.
    start: usize,
    end: usize,
    score: f64,
    share: f64,
}

#[derive(Serialize)]
struct TopLogprob {
    token: String,
    logprob: f32,
}

#[derive(Serialize)]
struct CompletionToken {
    token: String,
    logprob: f32,
    top_logprobs: Vec<TopLogprob>,
}

/// Byte ranges of the segments of one message's content.
fn split(model: &LocalModel, content: &str, granularity: Granularity) -> Vec<(usize, usize)> {
    match granularity {
        Granularity::Message => vec![(0, content.len())],
        Granularity::Sentence => {
            let mut out = Vec::new();
            let mut start = 0;
            let mut chars = content.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                let ends = matches!(c, '.' | '!' | '?' | '\n' | '。' | '！' | '？' | '；');
                let next_is_break = chars.peek().is_none_or(|(_, n)| n.is_whitespace() || !c.is_ascii());
                if ends && next_is_break {
                    let end = i + c.len_utf8();
                    if content[start..end].trim().is_empty() {
                        start = end;
                        continue;
                    }
                    out.push((start, end));
                    start = end;
                }
            }
            if !content[start..].trim().is_empty() {
                out.push((start, content.len()));
            }
            // Leading whitespace belongs to no sentence.
            out.into_iter()
                .map(|(s, e)| (s + (content[s..e].len() - content[s..e].trim_start().len()), e))
                .collect()
        }
        Granularity::Token => {
            let mut out = Vec::new();
            let mut offset = 0;
            for token in model.backend.tokenize(content, false) {
                let len = model.backend.token_bytes(token).len();
                let end = (offset + len).min(content.len());
                if content.is_char_boundary(offset) && content.is_char_boundary(end) && end > offset {
                    out.push((offset, end));
                }
                offset = end;
            }
            out
        }
    }
}

/// The prompt tokens of `messages` followed by the completion's tokens.
fn sequence(
    model: &LocalModel,
    messages: &[ChatMessage],
    completion: &[TokenId],
) -> Result<Vec<TokenId>, ApiError> {
    let mut tokens = model.chat_prompt(messages)?;
    tokens.extend_from_slice(completion);
    Ok(tokens)
}

/// Scores every sequence's last `tail` tokens in one submission: the scheduler batches them.
/// Returns each sequence's per-token logprobs of its tail.
async fn score_all(
    model: &Arc<LocalModel>,
    sequences: Vec<Vec<TokenId>>,
    tail: usize,
) -> Result<Vec<Vec<TokenInfo>>, ApiError> {
    let mut receivers = Vec::with_capacity(sequences.len());
    for (i, prompt) in sequences.into_iter().enumerate() {
        let request = GenerateRequest {
            prompt,
            max_tokens: 1,
            n: 1,
            sampling: SamplingParams { temperature: 0.0, ..Default::default() },
            stop: Vec::new(),
            // Alternatives only for the full conversation's tokens (the first sequence).
            logprobs: Some(if i == 0 { TOP_LOGPROBS } else { 0 }),
            prompt_logprobs: true,
            ignore_eos: true,
        };
        let receiver = model.scheduler.submit(request)?;
        receivers.push(UnboundedReceiverStream::new(receiver));
    }
    let mut out = Vec::with_capacity(receivers.len());
    for mut events in receivers {
        let mut scored = None;
        while let Some(event) = events.next().await {
            match event {
                Event::PromptLogprobs { rest, .. } => scored = Some(rest),
                Event::Error(message) => return Err(ApiError::Internal(message)),
                Event::Finished { .. } => break,
                Event::Delta { .. } => {}
            }
        }
        let rest =
            scored.ok_or_else(|| ApiError::Internal("the engine returned no prompt logprobs".into()))?;
        out.push(rest[rest.len().saturating_sub(tail)..].to_vec());
    }
    Ok(out)
}

/// The conversation and completion of a request whose content was retained.
async fn retained(
    state: &AppState,
    identity: &Identity,
    request_id: &str,
) -> Result<(Vec<InMessage>, String), ApiError> {
    let content = state.tenancy().store.content(request_id).await.map_err(|_| {
        ApiError::NotFound(format!(
            "No retained content for request '{request_id}' (its tenant must keep content)"
        ))
    })?;
    if !identity.sees_tenant(Some(&content.tenant_id)) {
        return Err(ApiError::NotFound(format!("No retained content for request '{request_id}'")));
    }
    let request: serde_json::Value = serde_json::from_str(&content.request).unwrap_or_default();
    let messages: Vec<InMessage> = serde_json::from_value(request["messages"].clone()).map_err(|_| {
        ApiError::invalid("request_id", "the retained request is not a chat request with text messages")
    })?;
    let response: serde_json::Value = serde_json::from_str(&content.response).unwrap_or_default();
    let completion = response["choices"][0]["message"]["content"].as_str().ok_or_else(|| {
        ApiError::invalid("request_id", "the retained answer is not a plain chat completion")
    })?;
    Ok((messages, completion.to_string()))
}

pub async fn explanations(
    State(state): State<AppState>,
    axum::Extension(identity): axum::Extension<Identity>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = read_body(body, &state)?;
    let body = crate::validate::parse_body(&body)?;
    let request: ExplainRequest = crate::validate::parse_json(&body)?;
    let model = state.model(&request.model)?;
    let (messages, completion) = match (&request.request_id, request.messages, request.completion) {
        (Some(id), None, None) => retained(&state, &identity, id).await?,
        (None, Some(messages), Some(completion)) => (messages, completion),
        _ => {
            return Err(ApiError::invalid(
                "messages",
                "Give either 'messages' and 'completion', or 'request_id' of a request whose content was retained",
            ));
        }
    };
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "'messages' must contain at least one message"));
    }
    if completion.is_empty() {
        return Err(ApiError::invalid("completion", "'completion' must not be empty"));
    }
    let granularity = request.granularity;
    let started = std::time::Instant::now();
    let steps_before = model.scheduler.stats().steps.load(Ordering::Relaxed);

    let tokenizer = model.clone();
    let completion_text = completion.clone();
    let work = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let model = tokenizer;
        let completion_tokens = model.backend.tokenize(&completion_text, false);
        let chat: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage { role: m.role.clone(), content: m.content.clone() })
            .collect();
        let mut segments = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            for (start, end) in split(&model, &message.content, granularity) {
                segments.push((index, start, end));
            }
        }
        if segments.len() > MAX_SEGMENTS {
            return Err(ApiError::invalid(
                "granularity",
                format!(
                    "{} segments is more than the {MAX_SEGMENTS} one explanation occludes; use a coarser granularity",
                    segments.len()
                ),
            ));
        }
        let mut sequences = vec![sequence(&model, &chat, &completion_tokens)?];
        for &(index, start, end) in &segments {
            let mut occluded = chat.clone();
            let content = &messages[index].content;
            occluded[index].content = format!("{}{}", &content[..start], &content[end..]);
            sequences.push(sequence(&model, &occluded, &completion_tokens)?);
        }
        Ok((completion_tokens, segments, sequences, messages))
    });
    let (completion_tokens, segments, sequences, messages) =
        work.await.map_err(|e| ApiError::Internal(e.to_string()))??;
    let ctx = model.scheduler.config().session.ctx_per_sequence;
    if let Some(longest) = sequences.iter().map(Vec::len).max()
        && longest + 1 > ctx
    {
        return Err(ApiError::ContextLengthExceeded {
            limit: ctx,
            requested: longest + 1,
            prompt: longest - completion_tokens.len(),
            completion: completion_tokens.len(),
        });
    }
    let full_sequence = sequences[0].clone();
    let tail = completion_tokens.len();
    let scored = score_all(&model, sequences, tail).await?;
    let total = |tokens: &[TokenInfo]| tokens.iter().map(|t| f64::from(t.logprob)).sum::<f64>();
    let baseline = total(&scored[0]);
    let scores: Vec<f64> = scored[1..].iter().map(|s| baseline - total(s)).collect();
    let positive: f64 = scores.iter().filter(|s| **s > 0.0).sum();
    let out_segments: Vec<Segment> = segments
        .iter()
        .zip(&scores)
        .map(|(&(index, start, end), &score)| Segment {
            message_index: index,
            text: messages[index].content[start..end].to_string(),
            start,
            end,
            score,
            share: if positive > 0.0 && score > 0.0 { score / positive } else { 0.0 },
        })
        .collect();
    let tokens: Vec<CompletionToken> = scored[0]
        .iter()
        .map(|t| CompletionToken {
            token: model.token_text(t.token),
            logprob: t.logprob,
            top_logprobs: t
                .top
                .iter()
                .map(|a| TopLogprob { token: model.token_text(a.token), logprob: a.logprob })
                .collect(),
        })
        .collect();
    if let Some(meter) = crate::tenancy::current() {
        meter.set_provider("local");
        meter.add_prompt_tokens(full_sequence.len() as u64 * (1 + out_segments.len() as u64));
    }
    let steps = model.scheduler.stats().steps.load(Ordering::Relaxed) - steps_before;
    Ok(axum::Json(json!({
        "object": "explanation",
        "model": model.info().id,
        "granularity": granularity,
        "method": "occlusion",
        "completion": completion,
        "total_logprob": baseline,
        "segments": out_segments,
        "tokens": tokens,
        "scored_token_ids": full_sequence,
        "completion_start": full_sequence.len() - tail,
        "variants": out_segments.len() + 1,
        "engine_steps": steps,
        "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
    })))
}
