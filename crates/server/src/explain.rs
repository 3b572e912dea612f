//! `POST /v1/explanations` (a Ferry extension): which parts of a prompt drove an answer.
//!
//! Method: occlusion. The completion's log-likelihood under the model is computed for the
//! whole conversation, then again for each segment (a message, a sentence or a token of a
//! message's content) with that segment taken out; a segment's score is how much the
//! log-likelihood drops without it (positive: it supported the answer; negative: it worked
//! against it), and its share is its part of all positive scores. Everything runs as one
//! scoring job in the scheduler: the whole conversation is prefilled once, with logits only
//! for the completion's tokens, and each variant is forked from its KV cache into a free
//! slot and computes only what differs, the variants sharing batched steps.
//!
//! Two ways to take a segment out (`occlusion` in the request, echoed in the answer):
//! - `mask` (default): the segment's token cells are dropped from a copy of the whole
//!   conversation's KV cache (later tokens keep their positions) and only the tail is
//!   recomputed: the prompt's last token and the completion. The completion's length plus one
//!   per segment, so a 20-sentence explanation of a 13-token answer costs 2.6 generations of
//!   it on a CPU with SmolLM2 and 3.1 with Qwen2.5, whose output layer is five times larger
//!   (`bench/explain_bench.py`). It is an approximation: the cells after a masked segment
//!   were computed while it was there and still carry some of it, so a fact near the question
//!   can score lower than it would removed, and masking the question or a message's first
//!   sentence can move the answer more than removing it does. On the faithfulness cases
//!   (tests/api/test_explanations.py) the fact's sentence scored highest in 9 of 10 with
//!   SmolLM2-135M and 10 of 10 with Qwen2.5-0.5B, and in 46 and 56 of sixty generated ones
//!   (`bench/explain_cases.py`). A segment whose text the template does not render verbatim
//!   is removed instead.
//! - `remove`: the conversation is re-rendered through the chat template without the
//!   segment, and the variant recomputes everything from its first token that differs from
//!   the whole conversation (the prefix before it is reused, exactly). The scores are those
//!   of recomputing each variant from scratch (10 of 10 on both models, 56 and 53 of the
//!   sixty); the cost is about half the prompt per segment on average, about 10 generations
//!   for 20 sentences.
//!
//! Limits of both: occlusion measures each segment alone, so two segments that each
//! suffice (redundant facts) both score low; removing text also shifts the template's
//! formatting, which is part of what is measured; the cost grows with the number of
//! segments (at most [`MAX_SEGMENTS`]); explaining needs at least two parallel sequences
//! (the conversation's and one variant's at a time).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::IntoResponse;
use ferry_engine::{
    ChatMessage, EngineError, LocalModel, ScoreEvent, ScoreRequest, ScoreVariant, TemplateError, TokenId,
    TokenInfo,
};
use serde::{Deserialize, Serialize};

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::tenancy::Identity;

/// Most segments one explanation occludes.
pub const MAX_SEGMENTS: usize = 256;
/// Alternatives reported for each completion token.
const TOP_LOGPROBS: usize = 5;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExplainRequest {
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
    /// How a segment is taken out: `mask` (default) or `remove`.
    #[serde(default)]
    occlusion: Occlusion,
}

/// How a segment is taken out of the conversation (see the module docs).
#[derive(Deserialize, Serialize, Clone, Copy, PartialEq, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum Occlusion {
    /// Drop the segment's cells from a copy of the conversation's KV cache and recompute
    /// only the prompt's last token and the completion: several times cheaper, approximate.
    #[default]
    Mask,
    /// Re-render the conversation without the segment and recompute everything from where
    /// its tokens first differ (the shared prefix is computed once): exact.
    Remove,
}

#[derive(Deserialize, Clone, utoipa::ToSchema)]
#[schema(as = ExplainMessage)]
struct InMessage {
    role: String,
    content: String,
}

#[derive(Deserialize, Serialize, Clone, Copy, PartialEq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum Granularity {
    Message,
    Sentence,
    Token,
}

fn default_granularity() -> Granularity {
    Granularity::Sentence
}

#[derive(Serialize, utoipa::ToSchema)]
struct Segment {
    message_index: usize,
    text: String,
    /// Byte offsets in the message's content.
    start: usize,
    end: usize,
    score: f64,
    share: f64,
}

#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ExplanationTopLogprob)]
struct TopLogprob {
    token: String,
    logprob: f32,
}

#[derive(Serialize, utoipa::ToSchema)]
struct CompletionToken {
    token: String,
    logprob: f32,
    top_logprobs: Vec<TopLogprob>,
}

/// The answer of `POST /v1/explanations`.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Explanation {
    /// Always `explanation`.
    object: &'static str,
    model: String,
    granularity: Granularity,
    /// Always `occlusion`.
    method: &'static str,
    /// How segments were taken out: `remove` or `mask`.
    occlusion: Occlusion,
    completion: String,
    /// The completion's log-likelihood given the whole conversation.
    total_logprob: f64,
    segments: Vec<Segment>,
    /// The completion's tokens with their logprobs and alternatives.
    tokens: Vec<CompletionToken>,
    /// The scored sequence: the conversation's prompt tokens, then the completion's.
    scored_token_ids: Vec<TokenId>,
    /// Where the completion starts in `scored_token_ids`.
    completion_start: usize,
    /// Sequences scored: the whole conversation and one per segment.
    variants: usize,
    /// Forward passes the engine ran for this explanation.
    engine_steps: u64,
    /// Tokens the engine computed: the conversation once, then each variant's own.
    computed_tokens: usize,
    /// Leading tokens of the conversation found in the cache instead of computed.
    cached_tokens: usize,
    elapsed_ms: f64,
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

/// A segment: message index and byte range in its content.
type SegmentRange = (usize, usize, usize);

/// The variant that removes `segment`: the conversation re-rendered without it, computed
/// from the first token where it differs from `full` (the shared prefix is reused).
fn removal(
    model: &LocalModel,
    chat: &[ChatMessage],
    (index, start, end): SegmentRange,
    full: &[TokenId],
    completion: &[TokenId],
) -> Result<ScoreVariant, ApiError> {
    let mut occluded = chat.to_vec();
    let content = &chat[index].content;
    occluded[index].content = format!("{}{}", &content[..start], &content[end..]);
    let tokens = sequence(model, &occluded, completion)?;
    let common = full.iter().zip(&tokens).take_while(|(a, b)| a == b).count();
    // The token before the completion is decoded by the variant itself.
    let keep = common.min(tokens.len().saturating_sub(completion.len() + 1)).min(full.len() - 1);
    Ok(ScoreVariant { keep, masked: Vec::new(), tokens: tokens[keep..].to_vec(), n_scored: completion.len() })
}

/// Token boundaries of byte offsets in the rendered prompt: `rendered[..offset]` tokenized
/// alone is compared with the whole prompt's tokens.
struct Boundaries<'a> {
    model: &'a LocalModel,
    rendered: &'a str,
    prompt: &'a [TokenId],
    known: HashMap<usize, (usize, bool)>,
}

impl Boundaries<'_> {
    /// How many of the prompt's tokens lie wholly before `offset`, and whether one ends
    /// exactly there (else the next token straddles it).
    fn at(&mut self, offset: usize) -> (usize, bool) {
        if let Some(&known) = self.known.get(&offset) {
            return known;
        }
        let head = self.model.backend.tokenize(&self.rendered[..offset], false);
        let common = head.iter().zip(self.prompt).take_while(|(a, b)| a == b).count();
        let found = (common, common == head.len());
        self.known.insert(offset, found);
        found
    }
    /// The first token holding any byte at or after `offset`.
    fn start(&mut self, offset: usize) -> usize {
        self.at(offset).0
    }
    /// The first token holding no byte before `offset`.
    fn end(&mut self, offset: usize) -> usize {
        let (n, exact) = self.at(offset);
        if exact { n } else { n + 1 }
    }
}

/// The masking variants: each drops its segment's token cells from a copy of the full
/// conversation's KV cache and recomputes the tail (the prompt's last token and the
/// completion). A segment whose text cannot be found in the
/// rendered prompt (a template that rewrites content) falls back to removal.
fn maskings(
    model: &LocalModel,
    chat: &[ChatMessage],
    segments: &[SegmentRange],
    full: &[TokenId],
    completion: &[TokenId],
) -> Result<Vec<ScoreVariant>, ApiError> {
    let template = model.template.as_ref().ok_or(EngineError::Template(TemplateError::Missing))?;
    let rendered = template.render(chat, true).map_err(EngineError::from)?;
    let prompt = &full[..full.len() - completion.len()];
    // Where each message's content is in the rendered text, searched in order.
    let mut located = Vec::with_capacity(chat.len());
    let mut cursor = 0;
    for message in chat {
        let at = rendered[cursor..].find(&message.content).map(|i| cursor + i);
        if let Some(at) = at {
            cursor = at + message.content.len();
        }
        located.push(at);
    }
    let mut boundaries = Boundaries { model, rendered: &rendered, prompt, known: HashMap::new() };
    // The tail is the token before the completion and the completion: the cells of the
    // template's text after the last message (its turn end, the assistant's header) are
    // kept too. Recomputing them as well cost 4 more tokens per segment for the same
    // faithfulness (8 of 10 cases on SmolLM2, 10 of 10 on Qwen2.5, 2026-11-29); starting
    // the tail at the question measured worse (7 of 10 on SmolLM2).
    let tail = prompt.len().saturating_sub(1);
    let mut variants = Vec::with_capacity(segments.len());
    for &(index, start, end) in segments {
        let Some(at) = located[index] else {
            variants.push(removal(model, chat, (index, start, end), full, completion)?);
            continue;
        };
        let first = boundaries.start(at + start);
        let masked = first..boundaries.end(at + end).max(first);
        variants.push(ScoreVariant {
            keep: tail,
            masked: vec![masked],
            tokens: full[tail..].to_vec(),
            n_scored: completion.len(),
        });
    }
    Ok(variants)
}

/// What a scoring job gave: the full sequence's scored tokens, how many of its leading tokens
/// came from the cache, and each variant's scored tokens.
struct Scored {
    base: Vec<TokenInfo>,
    cached: usize,
    variants: Vec<Vec<TokenInfo>>,
}

/// Runs the scoring job.
async fn score(model: &Arc<LocalModel>, request: ScoreRequest) -> Result<Scored, ApiError> {
    let n_variants = request.variants.len();
    let mut events = model.scheduler.score(request).map_err(|e| match e {
        // What the model's setup cannot score (a KV budget), named by the model.
        ferry_engine::EngineError::InvalidRequest(message) => ApiError::invalid("model", message),
        other => ApiError::from(other),
    })?;
    let mut base = None;
    let mut variants = vec![None; n_variants];
    while let Some(event) = events.recv().await {
        match event {
            ScoreEvent::Base { tokens, cached } => base = Some((tokens, cached)),
            ScoreEvent::Variant { index, tokens } => variants[index] = Some(tokens),
            ScoreEvent::Error(message) => return Err(ApiError::Internal(message)),
        }
    }
    let missing = || ApiError::Internal("the engine ended the scoring job early".into());
    let variants = variants.into_iter().map(|v| v.ok_or_else(missing)).collect::<Result<_, _>>()?;
    let (base, cached) = base.ok_or_else(missing)?;
    Ok(Scored { base, cached, variants })
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

#[utoipa::path(post, path = "/v1/explanations", tag = "Ferry",
    summary = "Explain a completion: how much each part of the prompt drove it",
    description = include_str!("../docs/explanations.md"),
    request_body = ExplainRequest,
    responses((status = 200, body = Explanation)))]
pub async fn explanations(
    State(state): State<AppState>,
    axum::Extension(identity): axum::Extension<Identity>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = read_body(body, &state)?;
    let request: ExplainRequest = crate::validate::parse_json(&body)?;
    let model = state.model(&request.model).await?;
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
    let occlusion = request.occlusion;
    if model.scheduler.config().session.n_sequences < 2 {
        return Err(ApiError::invalid(
            "model",
            "explanations need a model served with at least 2 parallel sequences (--parallel)",
        ));
    }
    let started = std::time::Instant::now();
    let steps_before = model.scheduler.stats().steps.load(Ordering::Relaxed);

    let tokenizer = model.clone();
    let completion_text = completion.clone();
    let work = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let model = tokenizer;
        let completion_tokens = model.backend.tokenize(&completion_text, false);
        let chat: Vec<ChatMessage> =
            messages.iter().map(|m| ChatMessage::new(m.role.clone(), m.content.clone())).collect();
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
        let full = sequence(&model, &chat, &completion_tokens)?;
        let variants = match occlusion {
            Occlusion::Mask => maskings(&model, &chat, &segments, &full, &completion_tokens)?,
            Occlusion::Remove => segments
                .iter()
                .map(|&segment| removal(&model, &chat, segment, &full, &completion_tokens))
                .collect::<Result<_, _>>()?,
        };
        Ok((completion_tokens, segments, full, variants, messages))
    });
    let (completion_tokens, segments, full_sequence, variants, messages) =
        work.await.map_err(|e| ApiError::Internal(e.to_string()))??;
    let ctx = model.scheduler.config().session.ctx_per_sequence;
    let longest = variants
        .iter()
        .map(|v| v.first_position() + v.tokens.len())
        .chain([full_sequence.len()])
        .max()
        .unwrap_or(0);
    if longest > ctx {
        return Err(ApiError::ContextLengthExceeded {
            limit: ctx,
            requested: longest,
            prompt: longest - completion_tokens.len(),
            completion: completion_tokens.len(),
            input: "messages",
        });
    }
    // Tokens the engine decodes: the full sequence once, then each variant's own (a
    // sequence's last token is only scored, never decoded), less what the full sequence
    // found in the cache (with `--prefix-cache`: the generation being explained).
    let decoded = full_sequence.len() - 1 + variants.iter().map(|v| v.tokens.len() - 1).sum::<usize>();
    let tail = completion_tokens.len();
    let job = ScoreRequest {
        tokens: full_sequence.clone(),
        n_scored: tail,
        top_logprobs: TOP_LOGPROBS,
        variants,
        cache_scope: crate::tenancy::cache_scope(None),
    };
    let Scored { base: full_scored, cached: cached_tokens, variants: scored } = score(&model, job).await?;
    let computed_tokens = decoded - cached_tokens;
    let total = |tokens: &[TokenInfo]| tokens.iter().map(|t| f64::from(t.logprob)).sum::<f64>();
    let baseline = total(&full_scored);
    let scores: Vec<f64> = scored.iter().map(|s| baseline - total(s)).collect();
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
    let tokens: Vec<CompletionToken> = full_scored
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
        meter.add_prompt_tokens(decoded as u64);
        meter.add_cached_tokens(cached_tokens as u64);
    }
    let steps = model.scheduler.stats().steps.load(Ordering::Relaxed) - steps_before;
    Ok(axum::Json(Explanation {
        object: "explanation",
        model: model.info().id.clone(),
        granularity,
        method: "occlusion",
        occlusion,
        completion,
        total_logprob: baseline,
        variants: out_segments.len() + 1,
        segments: out_segments,
        tokens,
        completion_start: full_sequence.len() - tail,
        scored_token_ids: full_sequence,
        engine_steps: steps,
        computed_tokens,
        cached_tokens,
        elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
    }))
}
