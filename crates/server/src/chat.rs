//! `POST /v1/chat/completions`, plain and streaming, for a local model or a gateway alias.
//! Both produce neutral `ChatEvent`s when streaming, so one renderer writes OpenAI's chunks.

use std::convert::Infallible;
use std::pin::Pin;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferry_api::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, ChatDelta, ChatLogprobs, FunctionCall, FunctionCallDelta, SamplingFields,
    ToolCall, ToolCallDelta, Usage,
};
use ferry_engine::Event;
use ferry_gateway::Route;
use ferry_providers::{ChatEvent, ChatResponse, ProviderError};
use futures::{Stream, StreamExt};

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::generation::{self, SharedModel, Submitted, chat_logprob, neutral_usage, request_id, unix_now};
use crate::{structured, translate, validate};

pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<ChatEvent, ProviderError>> + Send>>;

#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI",
    summary = "Create a chat completion",
    request_body(content = ref("#/components/schemas/CreateChatCompletionRequest")),
    responses((status = 200, description = "The completion; with `stream: true`, `chat.completion.chunk` events",
        content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream")))))]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body, &state)?;
    let mut request: ChatCompletionRequest = validate::parse_json(&body)?;
    let mut fields: SamplingFields = validate::parse_json(&body)?;
    validate::stream_options_need_stream(request.stream_options.is_some(), request.stream)?;
    validate::refuse_unserved_chat_fields(&request)?;
    validate::tool_results_answer_calls(&request.messages)?;
    let client_model = request.model.clone();
    if let Some(gateway) = state.gateway()
        && let Some(preset) = gateway.preset(&request.model)
    {
        crate::presets::apply(preset, &mut request, &mut fields)?;
        crate::presets::tighten_policy(&state, preset)?;
    }
    // A preset answers under its own name, as the client asked for it.
    if let Some(gateway) = state.gateway()
        && gateway.has_alias(&request.model)
    {
        validate::n_in_range(fields.n)?;
        return upstream(gateway, request, fields, cache_choice(&headers)?, client_model).await;
    }
    let model = state.model(&request.model).await?;
    local(state, model, request, fields, client_model).await
}

async fn local(
    state: AppState,
    model: SharedModel,
    request: ChatCompletionRequest,
    fields: SamplingFields,
    display_model: String,
) -> Result<Response, ApiError> {
    let plan = structured::plan(&request)?;
    let messages = validate::chat_messages(&request)?;
    let sampling = validate::sampling(&fields, &model)?;
    let logprobs = validate::chat_logprobs(&request)?;
    let constraint = structured::compile(&model, &plan).await?;
    let prompt = generation::chat_prompt_with_tools(&model, messages, plan.tools.clone()).await?;
    let (param, requested) = match request.max_completion_tokens {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", request.max_tokens),
    };
    let max_tokens = validate::max_tokens(requested, param, "messages", prompt.len(), &model)?;
    let mut generate = validate::generate_request(prompt, max_tokens, &sampling, logprobs, false);
    generate.constraint = constraint;
    generate.free_text = plan.free_text();
    let submitted = generation::submit(&model, vec![generate])?;
    let id = request_id("chatcmpl");
    if request.stream {
        let n = submitted.n;
        let mut events = local_events(model, submitted);
        if plan.calls_tools() {
            events = structured::tool_call_events(events, &plan);
        }
        let include_usage = include_usage(&request);
        let fingerprint = Some(state.fingerprint());
        return Ok(stream(events, n, id, display_model, include_usage, fingerprint).into_response());
    }
    let collected = generation::collect(submitted).await?;
    let choices = collected
        .choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let (content, tool_calls) = if plan.calls_tools() {
                let cut = c.finish_reason == Some(ferry_engine::FinishReason::Length);
                structured::split_calls(&c.text, plan.parser(), cut)
            } else {
                (Some(c.text), Vec::new())
            };
            let finish_reason = match c.finish_reason {
                Some(ferry_engine::FinishReason::Stop) if !tool_calls.is_empty() => {
                    Some("tool_calls".to_string())
                }
                other => other.map(|r| r.as_str().to_string()),
            };
            ChatChoice {
                index: index as u32,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content,
                    tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                },
                logprobs: logprobs.map(|_| ChatLogprobs {
                    content: c.tokens.iter().map(|t| chat_logprob(&model, t)).collect(),
                }),
                finish_reason,
            }
        })
        .collect();
    Ok(axum::Json(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created: unix_now(),
        model: display_model,
        choices,
        usage: collected.usage,
        system_fingerprint: Some(state.fingerprint()),
    })
    .into_response())
}

/// The engine's events as neutral chat events; usage comes last.
pub(crate) fn local_events(model: SharedModel, submitted: Submitted) -> EventStream {
    let prompt_tokens = submitted.prompt_tokens;
    // (events, completion tokens, cached prompt tokens, done)
    let state = (submitted, 0usize, 0usize, false);
    futures::stream::unfold(state, move |(mut submitted, mut completion_tokens, mut cached_tokens, done)| {
        let model = model.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let Some((_, event)) = submitted.events.next().await else {
                    let usage = ferry_providers::Usage {
                        prompt_tokens: prompt_tokens as u64,
                        completion_tokens: completion_tokens as u64,
                        cached_tokens: cached_tokens as u64,
                    };
                    let state = (submitted, completion_tokens, cached_tokens, true);
                    return Some((vec![Ok(ChatEvent::Usage(usage))], state));
                };
                let out = match event {
                    Event::PromptLogprobs { .. } => continue,
                    Event::Delta { choice, text, tokens } => {
                        let logprobs = (!tokens.is_empty()).then(|| {
                            let content: Vec<_> = tokens.iter().map(|t| chat_logprob(&model, t)).collect();
                            serde_json::json!({ "content": content })
                        });
                        vec![Ok(ChatEvent::Text { choice: choice as u32, text, logprobs })]
                    }
                    Event::Finished {
                        choice,
                        reason,
                        completion_tokens: used,
                        cached_tokens: cached,
                        ..
                    } => {
                        completion_tokens += used;
                        if choice == 0 {
                            cached_tokens += cached;
                        }
                        let reason = match reason {
                            ferry_engine::FinishReason::Stop => ferry_providers::FinishReason::Stop,
                            ferry_engine::FinishReason::Length => ferry_providers::FinishReason::Length,
                        };
                        vec![Ok(ChatEvent::Finish { choice: choice as u32, reason })]
                    }
                    Event::Error(message) => {
                        let error = ProviderError::Status {
                            status: 500,
                            message,
                            code: None,
                            param: None,
                            retry_after: None,
                        };
                        return Some((vec![Err(error)], (submitted, completion_tokens, cached_tokens, true)));
                    }
                    Event::DeadlineExceeded { admitted, completion_tokens: used } => {
                        let error = ApiError::DeadlineExceeded { admitted, completion_tokens: used };
                        let error = ProviderError::Status {
                            status: error.status().as_u16(),
                            message: error.to_string(),
                            code: Some("deadline_exceeded".into()),
                            param: None,
                            retry_after: None,
                        };
                        completion_tokens += used;
                        return Some((vec![Err(error)], (submitted, completion_tokens, cached_tokens, true)));
                    }
                };
                return Some((out, (submitted, completion_tokens, cached_tokens, false)));
            }
        }
    })
    .flat_map(futures::stream::iter)
    .boxed()
}

fn include_usage(request: &ChatCompletionRequest) -> bool {
    request.stream_options.as_ref().is_some_and(|o| o.include_usage)
}

/// A request for a gateway alias: translated to the neutral form, routed, and the answer
/// translated back.
async fn upstream(
    gateway: std::sync::Arc<ferry_gateway::Gateway>,
    request: ChatCompletionRequest,
    fields: SamplingFields,
    use_cache: Option<bool>,
    display_model: String,
) -> Result<Response, ApiError> {
    let neutral = translate::from_openai_chat(&request, &fields)?;
    let id = request_id("chatcmpl");
    if request.stream {
        let routed = crate::guard::chat_stream(&gateway, &request.model, neutral, use_cache).await?;
        let n = fields.n.unwrap_or(1).max(1) as usize;
        let include_usage = include_usage(&request);
        let mut response = stream(routed.value, n, id, display_model, include_usage, None).into_response();
        route_headers(&mut response, &routed.route);
        return Ok(response);
    }
    let routed = crate::guard::chat(&gateway, &request.model, neutral, use_cache).await?;
    let mut response = axum::Json(completion(routed.value, id, display_model)).into_response();
    route_headers(&mut response, &routed.route);
    Ok(response)
}

/// The request's own say on the response cache: `x-ferry-cache: on` or `off` (none: the
/// alias decides). Any other value is refused rather than read as no say.
pub fn cache_choice(headers: &HeaderMap) -> Result<Option<bool>, ApiError> {
    let Some(value) = headers.get("x-ferry-cache") else { return Ok(None) };
    match value.to_str().map(str::to_ascii_lowercase).as_deref() {
        Ok("on" | "true" | "1") => Ok(Some(true)),
        Ok("off" | "false" | "0") => Ok(Some(false)),
        _ => Err(ApiError::invalid(
            "x-ferry-cache",
            format!(
                "The x-ferry-cache header takes on or off, not '{}'",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )),
    }
}

/// Says which target answered and after how many calls; a cache hit says so, names the
/// target that produced the answer, and made no call (attempts 0).
pub fn route_headers(response: &mut Response, route: &Route) {
    let headers = response.headers_mut();
    if route.cache_hit {
        headers.insert("x-ferry-cache", HeaderValue::from_static("hit"));
    }
    if let Ok(v) = HeaderValue::from_str(&route.target)
        && !route.target.is_empty()
    {
        headers.insert("x-ferry-target", v);
    }
    headers.insert("x-ferry-attempts", HeaderValue::from(route.attempts));
}

fn completion(answer: ChatResponse, id: String, model: String) -> ChatCompletion {
    let choices = answer
        .choices
        .into_iter()
        .map(|c| {
            let tool_calls = (!c.message.tool_calls.is_empty()).then(|| {
                c.message
                    .tool_calls
                    .iter()
                    .map(|t| ToolCall {
                        id: t.id.clone(),
                        kind: "function".into(),
                        function: FunctionCall { name: t.name.clone(), arguments: t.arguments.clone() },
                    })
                    .collect()
            });
            let text = c.message.joined_text();
            ChatChoice {
                index: c.index,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content: (!text.is_empty() || tool_calls.is_none()).then_some(text),
                    tool_calls,
                },
                logprobs: c.logprobs.and_then(|v| serde_json::from_value(v).ok()),
                finish_reason: c.finish_reason.map(|r| r.openai().to_string()),
            }
        })
        .collect();
    ChatCompletion {
        id,
        object: "chat.completion".into(),
        created: unix_now(),
        model,
        choices,
        usage: neutral_usage(&answer.usage),
        system_fingerprint: None,
    }
}

/// OpenAI's chunk sequence from neutral events: a first chunk per choice with the role,
/// content and tool-call deltas, a chunk with the finish reason, an optional usage chunk,
/// then `[DONE]`. An error after the headers went out is reported in the stream.
fn stream(
    events: EventStream,
    n: usize,
    id: String,
    model: String,
    include_usage: bool,
    fingerprint: Option<String>,
) -> impl IntoResponse {
    let created = unix_now();
    let chunk = move |choices: Vec<ChatChunkChoice>, usage_value: Option<Option<Usage>>| {
        let chunk = ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            choices,
            usage: usage_value.or(include_usage.then_some(None)),
            // A local model's, in every chunk as OpenAI sends it; a gateway's upstream says none.
            system_fingerprint: fingerprint.clone(),
        };
        SseEvent::default().json_data(chunk).unwrap_or_else(|_| SseEvent::default().data("{}"))
    };
    let delta_chunk = {
        let chunk = chunk.clone();
        move |index: u32, delta: ChatDelta, logprobs: Option<ChatLogprobs>, finish_reason: Option<String>| {
            chunk(vec![ChatChunkChoice { index, delta, logprobs, finish_reason }], None)
        }
    };
    // Each choice opens with the assistant's role, as OpenAI's does: with `content: ""` before
    // text, `content: null` before tool calls (so the SDKs' stream helpers end with the same
    // message as a whole answer). It goes with the choice's first event, which says which.
    let mut opened = vec![false; n];
    let body = events.map(move |event| {
        let mut out = Vec::with_capacity(2);
        let opening = match &event {
            Ok(ChatEvent::Text { choice, .. }) | Ok(ChatEvent::Finish { choice, .. }) => {
                Some((*choice, true))
            }
            Ok(ChatEvent::ToolCall { choice, .. }) => Some((*choice, false)),
            _ => None,
        };
        if let Some((choice, text)) = opening
            && let Some(open) = opened.get_mut(choice as usize)
            && !*open
        {
            *open = true;
            let content = text.then(String::new);
            let role = ChatDelta { role: Some("assistant".into()), content, tool_calls: None };
            out.push(delta_chunk(choice, role, None, None));
        }
        match event {
            Ok(ChatEvent::Text { choice, text, logprobs }) => {
                let delta = ChatDelta { role: None, content: Some(text), tool_calls: None };
                out.push(delta_chunk(
                    choice,
                    delta,
                    logprobs.and_then(|v| serde_json::from_value(v).ok()),
                    None,
                ));
            }
            Ok(ChatEvent::ToolCall { choice, index, id, name, arguments }) => {
                let call = ToolCallDelta {
                    index,
                    kind: id.as_ref().map(|_| "function".to_string()),
                    id,
                    function: FunctionCallDelta { name, arguments },
                };
                let delta = ChatDelta { role: None, content: None, tool_calls: Some(vec![call]) };
                out.push(delta_chunk(choice, delta, None, None));
            }
            Ok(ChatEvent::Finish { choice, reason }) => {
                out.push(delta_chunk(choice, ChatDelta::default(), None, Some(reason.openai().to_string())));
            }
            Ok(ChatEvent::Usage(u)) => {
                let u = neutral_usage(&u);
                out.extend(include_usage.then(|| chunk(vec![], Some(Some(u)))));
            }
            Err(e) => {
                let body = ApiError::from(e).body();
                out.push(
                    SseEvent::default().json_data(body).unwrap_or_else(|_| SseEvent::default().data("{}")),
                );
            }
        }
        out
    });
    let all = body
        .flat_map(futures::stream::iter)
        .chain(futures::stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok::<_, Infallible>);
    Sse::new(all).keep_alive(KeepAlive::default())
}
