//! `POST /v1/chat/completions`, plain and streaming.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferry_api::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, SamplingFields,
};
use ferry_engine::Event;
use futures::StreamExt;

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::generation::{self, SharedModel, Submitted, chat_logprob, request_id, unix_now, usage};
use crate::validate;

pub async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body, &state)?;
    let body = validate::parse_body(&body)?;
    let request: ChatCompletionRequest = validate::parse_json(&body)?;
    let sampling_fields: SamplingFields = validate::parse_json(&body)?;
    let model = state.model(&request.model)?;
    let messages = validate::chat_messages(&request)?;
    let sampling = validate::sampling(&sampling_fields, &model)?;
    let logprobs = validate::chat_logprobs(&request)?;
    let prompt = {
        let model = model.clone();
        tokio::task::spawn_blocking(move || model.chat_prompt(&messages))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
    };
    let (param, requested) = match request.max_completion_tokens {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", request.max_tokens),
    };
    let max_tokens = validate::max_tokens(requested, param, prompt.len(), &model)?;
    let submitted = generation::submit(
        &model,
        vec![validate::generate_request(prompt, max_tokens, &sampling, logprobs, false)],
    )?;
    let id = request_id("chatcmpl");
    let model_id = request.model.clone();
    if request.stream {
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(stream(model, submitted, id, model_id, include_usage).into_response());
    }
    let collected = generation::collect(submitted).await?;
    let choices = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| ChatChoice {
            index: index as u32,
            message: AssistantMessage { role: "assistant".into(), content: Some(c.text) },
            logprobs: logprobs.map(|_| ChatLogprobs {
                content: c.tokens.iter().map(|t| chat_logprob(&model, t)).collect(),
            }),
            finish_reason: c.finish_reason.map(|r| r.as_str().to_string()),
        })
        .collect();
    Ok(axum::Json(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created: unix_now(),
        model: model_id,
        choices,
        usage: collected.usage,
        system_fingerprint: Some(state.fingerprint()),
    })
    .into_response())
}

/// Streams chunks as OpenAI does: a first chunk per choice with the role, content deltas,
/// a chunk with the finish reason, an optional usage chunk, then `[DONE]`.
fn stream(
    model: SharedModel,
    submitted: Submitted,
    id: String,
    model_id: String,
    include_usage: bool,
) -> impl IntoResponse {
    let created = unix_now();
    let n = submitted.n;
    let prompt_tokens = submitted.prompt_tokens;
    let chunk = move |choices: Vec<ChatChunkChoice>,
                      usage_value: Option<Option<ferry_api::openai::Usage>>| {
        let chunk = ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model_id.clone(),
            choices,
            usage: usage_value.or(include_usage.then_some(None)),
            system_fingerprint: None,
        };
        SseEvent::default().json_data(chunk).unwrap_or_else(|_| SseEvent::default().data("{}"))
    };
    let first: Vec<SseEvent> = (0..n)
        .map(|i| {
            chunk(
                vec![ChatChunkChoice {
                    index: i as u32,
                    delta: ChatDelta { role: Some("assistant".into()), content: Some(String::new()) },
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            )
        })
        .collect();

    let events = futures::stream::unfold(
        (submitted, 0usize, n, false),
        move |(mut submitted, mut completion_tokens, mut open, done)| {
            let chunk = chunk.clone();
            let model = model.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    if open == 0 {
                        let event = include_usage
                            .then(|| chunk(vec![], Some(Some(usage(prompt_tokens, completion_tokens)))));
                        let tail: Vec<SseEvent> =
                            event.into_iter().chain([SseEvent::default().data("[DONE]")]).collect();
                        return Some((tail, (submitted, completion_tokens, open, true)));
                    }
                    let Some((_, event)) = submitted.events.next().await else {
                        return None;
                    };
                    let out = match event {
                        Event::PromptLogprobs { .. } => continue,
                        Event::Delta { choice, text, tokens } => chunk(
                            vec![ChatChunkChoice {
                                index: choice as u32,
                                delta: ChatDelta { role: None, content: Some(text) },
                                logprobs: (!tokens.is_empty()).then(|| ChatLogprobs {
                                    content: tokens.iter().map(|t| chat_logprob(&model, t)).collect(),
                                }),
                                finish_reason: None,
                            }],
                            None,
                        ),
                        Event::Finished { choice, reason, completion_tokens: used, .. } => {
                            completion_tokens += used;
                            open -= 1;
                            chunk(
                                vec![ChatChunkChoice {
                                    index: choice as u32,
                                    delta: ChatDelta::default(),
                                    logprobs: None,
                                    finish_reason: Some(reason.as_str().to_string()),
                                }],
                                None,
                            )
                        }
                        Event::Error(message) => {
                            // Headers are gone already: report in the stream, as OpenAI does.
                            let body = ApiError::Internal(message).body();
                            let event = SseEvent::default()
                                .json_data(body)
                                .unwrap_or_else(|_| SseEvent::default().data("{}"));
                            return Some((vec![event], (submitted, completion_tokens, 0, true)));
                        }
                    };
                    return Some((vec![out], (submitted, completion_tokens, open, false)));
                }
            }
        },
    );
    let all =
        futures::stream::iter(first).chain(events.flat_map(futures::stream::iter)).map(Ok::<_, Infallible>);
    Sse::new(all).keep_alive(KeepAlive::default())
}
