//! `POST /v1/completions`: the legacy text completions API, with several prompts per
//! request, `echo` and prompt logprobs, on a local model or through a gateway alias (an
//! OpenAI-compatible target's own `/completions`; other providers answer the prompt as one
//! user message, see `ferry_providers::completion_as_chat`).

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferry_api::openai::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, SamplingFields,
};
use ferry_engine::{Event, LocalModel, TokenId, TokenInfo};
use ferry_providers::{ChatEvent, EventStream};
use futures::StreamExt;
use indexmap::IndexMap;

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::generation::{self, SharedModel, Submitted, neutral_usage, request_id, unix_now, usage};
use crate::{translate, validate};

const MAX_LOGPROBS: i64 = 20;

#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI",
    summary = "Create a completion (legacy)",
    description = "A local model, or a gateway alias: an OpenAI-compatible target gets the request on its own \
        `/completions`; Anthropic and Gemini targets get the prompt as one user message, and refuse by name what \
        a chat cannot carry (several prompts or token ids, `logprobs`, `suffix`, `best_of` other than `n`). \
        Presets are refused: a raw prompt has no place for their system prompt.",
    request_body(content = ref("#/components/schemas/CreateCompletionRequest")),
    responses((status = 200, description = "The completion; with `stream: true`, `text_completion` chunks",
        content((Completion = "application/json"), (Completion = "text/event-stream")))))]
pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body, &state)?;
    let request: CompletionRequest = validate::parse_json(&body)?;
    let sampling_fields: SamplingFields = validate::parse_json(&body)?;
    validate::stream_options_need_stream(request.stream_options.is_some(), request.stream)?;
    if let Some(gateway) = state.gateway() {
        // A preset is a system prompt and parameters for a conversation; a raw prompt has no
        // place for the system prompt, and dropping it would change what the preset means.
        if gateway.preset(&request.model).is_some() {
            return Err(ApiError::invalid(
                "model",
                format!(
                    "'{}' is a preset: its system prompt has no place in a legacy completion's raw prompt; \
                     use /v1/chat/completions, /v1/responses or /v1/messages for it",
                    request.model
                ),
            ));
        }
        if gateway.has_alias(&request.model) {
            let use_cache = crate::chat::cache_choice(&headers)?;
            return upstream(gateway, &request, &sampling_fields, use_cache).await;
        }
    }
    let model = state.model(&request.model).await?;
    let sampling = validate::sampling(&sampling_fields, &model)?;
    let logprobs = match request.logprobs {
        None => None,
        Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("Invalid 'logprobs': {k} is not between 0 and {MAX_LOGPROBS}"),
            ));
        }
    };
    if let Some(best_of) = request.best_of
        && best_of != sampling.n as i64
    {
        return Err(ApiError::invalid("best_of", "'best_of' other than 'n' is not supported"));
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "'suffix' (fill-in-the-middle) is not supported by this model",
        ));
    }
    let prompts = {
        let model = model.clone();
        let request = request.clone();
        tokio::task::spawn_blocking(move || validate::completion_prompts(&request, &model))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
    };
    // OpenAI's default for this endpoint is 16 tokens.
    let requested = Some(request.max_tokens.unwrap_or(16));
    let mut engine_requests = Vec::with_capacity(prompts.len());
    let mut prompt_texts = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let max_tokens = validate::max_tokens(requested, "max_tokens", "prompt", prompt.len(), &model)?;
        prompt_texts.push(request.echo.then(|| detokenize(&model, &prompt)));
        let prompt_logprobs = request.echo && logprobs.is_some();
        engine_requests.push(validate::generate_request(
            prompt,
            max_tokens,
            &sampling,
            logprobs,
            prompt_logprobs,
        ));
    }
    let submitted = generation::submit(&model, engine_requests)?;
    let n = submitted.n;
    let id = request_id("cmpl");
    let model_id = request.model.clone();
    let created = unix_now();

    if request.stream {
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let echo_logprobs = request.echo && logprobs.is_some();
        let fingerprint = state.fingerprint();
        let chunk = move |index: usize,
                          text: String,
                          logprobs: Option<CompletionLogprobs>,
                          finish_reason: Option<&str>,
                          usage: Option<ferry_api::openai::Usage>| {
            let choices = match finish_reason.is_none() && usage.is_some() {
                true => vec![],
                false => vec![CompletionChoice {
                    index: index as u32,
                    text,
                    logprobs,
                    finish_reason: finish_reason.map(str::to_string),
                }],
            };
            let body = Completion {
                id: id.clone(),
                object: "text_completion".into(),
                created,
                model: model_id.clone(),
                choices,
                usage,
                // As the non-streamed answer has it, in every chunk as OpenAI sends it.
                system_fingerprint: Some(fingerprint.clone()),
            };
            SseEvent::default().json_data(body).unwrap_or_else(|_| SseEvent::default().data("{}"))
        };
        let mut stream = StreamState {
            model: model.clone(),
            n,
            open: n * submitted.n_prompts,
            offsets: vec![0; n * submitted.n_prompts],
            prompt_tokens: submitted.prompt_tokens,
            completion_tokens: 0,
            submitted,
            done: false,
        };
        // Echo without logprobs: the prompt text opens each choice right away. With logprobs
        // it goes out when the prompt's logprobs arrive, before the first generated token.
        let mut opening = Vec::new();
        if request.echo && !echo_logprobs {
            for (index, offset) in stream.offsets.iter_mut().enumerate() {
                let text = prompt_texts[index / n].clone().unwrap_or_default();
                *offset = text.len();
                opening.push(chunk(index, text, None, None, None));
            }
        }
        let events = futures::stream::unfold(stream, move |mut st| {
            let chunk = chunk.clone();
            let prompt_texts = prompt_texts.clone();
            async move {
                if st.done {
                    return None;
                }
                {
                    if st.open == 0 {
                        st.done = true;
                        let tail: Vec<SseEvent> = include_usage
                            .then(|| {
                                chunk(
                                    0,
                                    String::new(),
                                    None,
                                    None,
                                    Some(usage(st.prompt_tokens, st.completion_tokens)),
                                )
                            })
                            .into_iter()
                            .chain([SseEvent::default().data("[DONE]")])
                            .collect();
                        return Some((tail, st));
                    }
                    let (prompt_idx, event) = st.submitted.events.next().await?;
                    let n = st.n;
                    let out = match event {
                        Event::PromptLogprobs { first_token, rest } => (0..n)
                            .map(|c| {
                                let index = prompt_idx * n + c;
                                let lp = legacy_logprobs(
                                    &st.model,
                                    Some(first_token),
                                    &rest,
                                    &mut st.offsets[index],
                                );
                                chunk(
                                    index,
                                    prompt_texts[prompt_idx].clone().unwrap_or_default(),
                                    Some(lp),
                                    None,
                                    None,
                                )
                            })
                            .collect(),
                        Event::Delta { choice, text, tokens } => {
                            let index = prompt_idx * n + choice;
                            let lp = (!tokens.is_empty())
                                .then(|| legacy_logprobs(&st.model, None, &tokens, &mut st.offsets[index]));
                            vec![chunk(index, text, lp, None, None)]
                        }
                        Event::Finished { choice, reason, completion_tokens, .. } => {
                            st.completion_tokens += completion_tokens;
                            st.open -= 1;
                            vec![chunk(
                                prompt_idx * n + choice,
                                String::new(),
                                None,
                                Some(reason.as_str()),
                                None,
                            )]
                        }
                        Event::DeadlineExceeded { admitted, completion_tokens } => {
                            st.done = true;
                            st.completion_tokens += completion_tokens;
                            let body = ApiError::DeadlineExceeded { admitted, completion_tokens }.body();
                            vec![
                                SseEvent::default()
                                    .json_data(body)
                                    .unwrap_or_else(|_| SseEvent::default().data("{}")),
                            ]
                        }
                        Event::Error(message) => {
                            st.done = true;
                            let body = ApiError::Internal(message).body();
                            vec![
                                SseEvent::default()
                                    .json_data(body)
                                    .unwrap_or_else(|_| SseEvent::default().data("{}")),
                            ]
                        }
                    };
                    Some((out, st))
                }
            }
        });
        let stream = futures::stream::iter(opening)
            .chain(events.flat_map(futures::stream::iter))
            .map(Ok::<_, Infallible>);
        return Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response());
    }

    let collected = generation::collect(submitted).await?;
    let choices = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let prompt_text = prompt_texts[index / n].clone();
            let mut offset = 0;
            let mut logprobs_out = None;
            if logprobs.is_some() {
                let (first, mut tokens) = match &c.prompt_logprobs {
                    Some((first, rest)) => (Some(*first), rest.clone()),
                    None => (None, Vec::new()),
                };
                tokens.extend(c.tokens.iter().cloned());
                logprobs_out = Some(legacy_logprobs(&model, first, &tokens, &mut offset));
            }
            CompletionChoice {
                index: index as u32,
                text: prompt_text.unwrap_or_default() + &c.text,
                logprobs: logprobs_out,
                finish_reason: c.finish_reason.map(|r| r.as_str().to_string()),
            }
        })
        .collect();
    Ok(axum::Json(Completion {
        id,
        object: "text_completion".into(),
        created,
        model: model_id,
        choices,
        usage: Some(collected.usage),
        system_fingerprint: Some(state.fingerprint()),
    })
    .into_response())
}

/// A legacy completion for a gateway alias: translated, routed like a chat (retries,
/// fallbacks, cache, guardrails, metering), and the answer written as `text_completion`.
async fn upstream(
    gateway: std::sync::Arc<ferry_gateway::Gateway>,
    request: &CompletionRequest,
    fields: &SamplingFields,
    use_cache: Option<bool>,
) -> Result<Response, ApiError> {
    let neutral = translate::from_openai_completion(request, fields)?;
    let id = request_id("cmpl");
    let created = unix_now();
    if request.stream {
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let routed = crate::guard::completion_stream(&gateway, &request.model, neutral, use_cache).await?;
        let events = upstream_stream(routed.value, id, request.model.clone(), created, include_usage);
        let mut response = events.into_response();
        crate::chat::route_headers(&mut response, &routed.route);
        return Ok(response);
    }
    let routed = crate::guard::completion(&gateway, &request.model, neutral, use_cache).await?;
    let answer = routed.value;
    let choices = answer
        .choices
        .into_iter()
        .map(|c| {
            Ok(CompletionChoice {
                index: c.index,
                text: c.message.joined_text(),
                logprobs: upstream_logprobs(c.logprobs)?,
                finish_reason: c.finish_reason.map(|r| r.openai().to_string()),
            })
        })
        .collect::<Result<_, ApiError>>()?;
    let completion = Completion {
        id,
        object: "text_completion".into(),
        created,
        model: request.model.clone(),
        choices,
        usage: Some(neutral_usage(&answer.usage)),
        system_fingerprint: None,
    };
    let mut response = axum::Json(completion).into_response();
    crate::chat::route_headers(&mut response, &routed.route);
    Ok(response)
}

/// An upstream's `logprobs` of a text completion, read as OpenAI's format: what does not read
/// is a 502 naming it, never dropped from the answer.
fn upstream_logprobs(logprobs: Option<serde_json::Value>) -> Result<Option<CompletionLogprobs>, ApiError> {
    logprobs
        .map(|v| {
            serde_json::from_value(v).map_err(|e| {
                ApiError::BadGateway(format!(
                    "the upstream's logprobs are not in the completions format: {e}"
                ))
            })
        })
        .transpose()
}

/// `text_completion` chunks from an upstream's neutral events: one per text piece and per
/// finished choice, the usage chunk when asked for, then `[DONE]`. An error after the
/// headers went out is reported in the stream.
fn upstream_stream(
    events: EventStream,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
) -> impl IntoResponse {
    let chunk = move |choices: Vec<CompletionChoice>, usage: Option<ferry_api::openai::Usage>| {
        let body = Completion {
            id: id.clone(),
            object: "text_completion".into(),
            created,
            model: model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        };
        SseEvent::default().json_data(body).unwrap_or_else(|_| SseEvent::default().data("{}"))
    };
    let body = events.filter_map(move |event| {
        let out = match event {
            Ok(ChatEvent::Text { choice, text, logprobs }) => Some(match upstream_logprobs(logprobs) {
                Ok(logprobs) => {
                    chunk(vec![CompletionChoice { index: choice, text, logprobs, finish_reason: None }], None)
                }
                Err(e) => {
                    SseEvent::default().json_data(e.body()).unwrap_or_else(|_| SseEvent::default().data("{}"))
                }
            }),
            Ok(ChatEvent::Finish { choice, reason }) => Some(chunk(
                vec![CompletionChoice {
                    index: choice,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(reason.openai().to_string()),
                }],
                None,
            )),
            Ok(ChatEvent::Usage(u)) => include_usage.then(|| chunk(vec![], Some(neutral_usage(&u)))),
            // No tools are offered to a text completion.
            Ok(ChatEvent::ToolCall { .. }) => None,
            Err(e) => {
                let body = ApiError::from(e).body();
                Some(SseEvent::default().json_data(body).unwrap_or_else(|_| SseEvent::default().data("{}")))
            }
        };
        futures::future::ready(out)
    });
    let all = body
        .chain(futures::stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    Sse::new(all).keep_alive(KeepAlive::default())
}

struct StreamState {
    model: SharedModel,
    submitted: Submitted,
    n: usize,
    open: usize,
    /// Running text offset of each choice, for `text_offset`.
    offsets: Vec<usize>,
    prompt_tokens: usize,
    completion_tokens: usize,
    done: bool,
}

fn detokenize(model: &LocalModel, tokens: &[TokenId]) -> String {
    let bytes: Vec<u8> = tokens.iter().flat_map(|&t| model.backend.token_bytes(t).iter().copied()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Logprobs in the completions format; `offset` is the running text offset of the choice.
/// `first_prompt_token` (echo) is listed without a logprob, as in OpenAI's echo.
fn legacy_logprobs(
    model: &LocalModel,
    first_prompt_token: Option<TokenId>,
    tokens: &[TokenInfo],
    offset: &mut usize,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut push_text = |out: &mut CompletionLogprobs, token: TokenId| {
        let text = model.token_text(token);
        out.text_offset.push(*offset);
        *offset += text.len();
        out.tokens.push(text);
    };
    if let Some(token) = first_prompt_token {
        push_text(&mut out, token);
        out.token_logprobs.push(None);
        out.top_logprobs.push(None);
    }
    for info in tokens {
        push_text(&mut out, info.token);
        out.token_logprobs.push(Some(info.logprob));
        // Most likely first; of two tokens spelling the same text, the likelier one's.
        let mut top = IndexMap::with_capacity(info.top.len());
        for t in &info.top {
            top.entry(model.token_text(t.token)).or_insert(t.logprob);
        }
        // The chosen token is always listed, last when it was not among the likeliest (so up
        // to `logprobs` + 1 entries), as OpenAI's and vLLM's legacy logprobs do.
        top.entry(model.token_text(info.token)).or_insert(info.logprob);
        out.top_logprobs.push(Some(top));
    }
    out
}
