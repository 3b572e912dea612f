//! Anthropic's Messages API over the local engine: `POST /v1/messages` (plain and
//! streaming) and `POST /v1/messages/count_tokens`. Errors take Anthropic's shape here, so
//! the official `anthropic` SDK raises its own exception classes.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferry_api::anthropic::{
    BlockDelta, ContentBlock, CountTokensRequest, CountTokensResponse, ErrorBody, ErrorDetail, Message,
    MessageContent, MessageDelta, MessagesRequest, MessagesResponse, OutputUsage, ResponseBlock, StreamEvent,
    SystemPrompt, Usage,
};
use ferry_api::openai::{SamplingFields, Stop};
use ferry_engine::{ChatMessage, Event, FinishReason};
use std::sync::Arc;

use ferry_gateway::Gateway;
use ferry_providers::ChatEvent;
use futures::StreamExt;

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::generation::{self, SharedModel, Submitted, request_id};
use crate::{translate, validate};

/// An error answered in Anthropic's shape.
pub struct AnthropicError(ApiError);

/// An error for an Anthropic-dialect route, in Anthropic's shape.
pub fn error_response(e: ApiError) -> Response {
    AnthropicError(e).into_response()
}

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        AnthropicError(e)
    }
}

/// An error in the shape of the API the path belongs to: Anthropic's under `/v1/messages`
/// (an unknown route or method there included), OpenAI's elsewhere.
pub fn in_dialect_of(path: &str, error: ApiError) -> Response {
    if path.starts_with("/v1/messages") {
        AnthropicError(error).into_response()
    } else {
        error.into_response()
    }
}

fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..500 => "invalid_request_error",
        _ => "api_error",
    }
}

fn error_body(e: &ApiError) -> ErrorBody {
    ErrorBody {
        kind: "error".into(),
        error: ErrorDetail { kind: error_type(e.status()).into(), message: e.to_string() },
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let body = error_body(&self.0);
        // Keep the status, headers (Retry-After) and log extension of the OpenAI-shaped answer.
        let (mut parts, _) = self.0.into_response().into_parts();
        parts.headers.remove(axum::http::header::CONTENT_LENGTH);
        let json = axum::Json(body).into_response();
        let (json_parts, json_body) = json.into_parts();
        parts.headers.extend(json_parts.headers);
        Response::from_parts(parts, json_body)
    }
}

/// The conversation in the template's terms: the system prompt first, then the turns.
fn conversation(system: Option<&SystemPrompt>, messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages: at least one message is required"));
    }
    let mut out = Vec::with_capacity(messages.len() + 1);
    match system {
        Some(SystemPrompt::Text(text)) => out.push(ChatMessage::new("system", text.clone())),
        Some(SystemPrompt::Blocks(blocks)) => {
            out.push(ChatMessage::new("system", block_text(blocks, "system")?))
        }
        None => {}
    }
    for (i, message) in messages.iter().enumerate() {
        if message.role != "user" && message.role != "assistant" {
            return Err(ApiError::invalid(
                format!("messages.{i}.role"),
                format!("messages.{i}.role: unexpected role '{}'; expected user or assistant", message.role),
            ));
        }
        let content = match &message.content {
            MessageContent::Text(text) => text.clone(),
            MessageContent::Blocks(blocks) => block_text(blocks, &format!("messages.{i}.content"))?,
        };
        // An empty final assistant turn prefills nothing: the answer starts a turn of its own.
        if content.is_empty() && message.role == "assistant" && i + 1 == messages.len() {
            break;
        }
        out.push(ChatMessage::new(message.role.clone(), content));
    }
    merge_consecutive_turns(&mut out);
    Ok(out)
}

/// Anthropic's rule: consecutive user (or assistant) turns are one turn. Their texts are
/// joined by a blank line and an assistant's calls kept in order; a tool's result, a turn
/// of its own in the template, is never merged.
pub(crate) fn merge_consecutive_turns(messages: &mut Vec<ChatMessage>) {
    let mut merged: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for message in messages.drain(..) {
        match merged.last_mut() {
            Some(last)
                if last.role == message.role
                    && (message.role == "user" || message.role == "assistant")
                    && last.tool_call_id.is_none()
                    && message.tool_call_id.is_none() =>
            {
                if !last.content.is_empty() && !message.content.is_empty() {
                    last.content.push_str("\n\n");
                }
                last.content.push_str(&message.content);
                last.tool_calls.extend(message.tool_calls);
            }
            _ => merged.push(message),
        }
    }
    *messages = merged;
}

/// Whether the conversation ends with the assistant's text, for the model to continue. As
/// Anthropic, that text may not end in white space.
fn prefilled(messages: &[Message]) -> Result<bool, ApiError> {
    let Some(last) = messages.last().filter(|m| m.role == "assistant") else { return Ok(false) };
    let text = match &last.content {
        MessageContent::Text(text) => text.clone(),
        MessageContent::Blocks(blocks) => {
            block_text(blocks, &format!("messages.{}.content", messages.len() - 1))?
        }
    };
    if text != text.trim_end() {
        return Err(ApiError::invalid(
            format!("messages.{}", messages.len() - 1),
            "final assistant content cannot end with trailing whitespace",
        ));
    }
    Ok(!text.is_empty())
}

/// The prompt of a conversation without tools: continued from the assistant's text when it
/// ends with some (a prefill: the answer is only what follows, as Anthropic's is), else with
/// the assistant's turn opened.
async fn local_prompt(
    model: &SharedModel,
    request: &[Message],
    messages: Vec<ChatMessage>,
) -> Result<Vec<ferry_engine::TokenId>, ApiError> {
    if prefilled(request)? {
        generation::continued_prompt(model, messages).await
    } else {
        generation::chat_prompt(model, messages).await
    }
}

fn block_text(blocks: &[ContentBlock], path: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, block) in blocks.iter().enumerate() {
        match (block.kind.as_str(), &block.text) {
            ("text", Some(t)) => text.push_str(t),
            ("text", None) => return Err(ApiError::missing(format!("{path}.{j}.text"))),
            (kind, _) => {
                return Err(ApiError::invalid(
                    format!("{path}.{j}"),
                    format!("{path}.{j}: content blocks of type '{kind}' are not supported by this model"),
                ));
            }
        }
    }
    Ok(text)
}

#[utoipa::path(post, path = "/v1/messages", tag = "Anthropic",
    summary = "Create a message (Anthropic's Messages API)",
    request_body = ferry_api::anthropic::MessagesRequest,
    responses((status = 200, description = "The message; with `stream: true`, Anthropic's stream events",
        content((ferry_api::anthropic::MessagesResponse = "application/json"), (ferry_api::anthropic::StreamEvent = "text/event-stream")))))]
pub async fn messages(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AnthropicError> {
    let body = read_body(body, &state)?;
    let mut request: MessagesRequest = validate::parse_json(&body)?;
    check_request(&request)?;
    let client_model = request.model.clone();
    if let Some(gateway) = state.gateway()
        && let Some(preset) = gateway.preset(&request.model)
    {
        crate::presets::apply_messages(preset, &mut request)?;
        crate::presets::tighten_policy(&state, preset)?;
    }
    if let Some(gateway) = state.gateway()
        && gateway.has_alias(&request.model)
    {
        return upstream(gateway, request, crate::chat::cache_choice(&headers)?, client_model).await;
    }
    let model = state.model(&request.model).await?;
    if let Some(t) = request.temperature
        && !(0.0..=1.0).contains(&t)
    {
        return Err(
            ApiError::invalid("temperature", format!("temperature: {t} is not between 0 and 1")).into()
        );
    }
    if uses_tools(request.tools.as_deref(), &request.messages) || request.output_config.is_some() {
        // Tool use and structured output go the neutral way: translated as for an upstream,
        // generated under the tool or schema grammar, rendered back by the same code as an
        // upstream's answer.
        let mut translatable = request.clone();
        let top_k = translatable.top_k.take();
        let neutral = translate::from_anthropic(&translatable)?;
        let (events, prompt_tokens) = crate::structured::local_tool_events(&model, neutral, top_k).await?;
        let id = request_id("msg");
        if request.stream {
            return Ok(upstream_stream(events, id, client_model, Some(prompt_tokens)).into_response());
        }
        let answer = crate::structured::collect_events(events).await?;
        return Ok(answer_response(answer, id, client_model));
    }
    let messages = conversation(request.system.as_ref(), &request.messages)?;
    let fields = SamplingFields {
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        stop: request.stop_sequences.clone().map(Stop::Many),
        ..SamplingFields::default()
    };
    let sampling = validate::sampling(&fields, &model)?;
    let prompt = local_prompt(&model, &request.messages, messages).await?;
    let max_tokens =
        validate::max_tokens(Some(request.max_tokens), "max_tokens", "messages", prompt.len(), &model)?;
    let input_tokens = prompt.len() as u64;
    let submitted = generation::submit(
        &model,
        vec![validate::generate_request(prompt, max_tokens, &sampling, None, false)],
    )?;
    let id = request_id("msg");
    if request.stream {
        return Ok(stream(submitted, id, client_model, input_tokens).into_response());
    }
    let collected = generation::collect(submitted).await?;
    let choice = collected.choices.into_iter().next().unwrap_or_default();
    Ok(axum::Json(MessagesResponse {
        id,
        kind: "message".into(),
        role: "assistant".into(),
        model: client_model,
        content: vec![ResponseBlock::Text { text: choice.text }],
        stop_reason: choice.finish_reason.map(|r| stop_reason(r, choice.stop_sequence.as_deref()).into()),
        stop_sequence: choice.stop_sequence,
        usage: Usage::of_prompt(
            input_tokens,
            collected.usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            collected.usage.completion_tokens,
        ),
    })
    .into_response())
}

/// A Messages request for a gateway alias: translated, routed, and answered in Anthropic's
/// format (tool calls as `tool_use` blocks).
async fn upstream(
    gateway: Arc<Gateway>,
    request: MessagesRequest,
    use_cache: Option<bool>,
    display_model: String,
) -> Result<Response, AnthropicError> {
    let neutral = translate::from_anthropic(&request)?;
    let id = request_id("msg");
    if request.stream {
        let routed = crate::guard::chat_stream(&gateway, &request.model, neutral, use_cache).await?;
        let mut response = upstream_stream(routed.value, id, display_model, None).into_response();
        crate::chat::route_headers(&mut response, &routed.route);
        return Ok(response);
    }
    let routed = crate::guard::chat(&gateway, &request.model, neutral, use_cache).await?;
    let mut response = answer_response(routed.value, id, display_model);
    crate::chat::route_headers(&mut response, &routed.route);
    Ok(response)
}

/// A neutral answer in Anthropic's format (tool calls as `tool_use` blocks).
fn answer_response(answer: ferry_providers::ChatResponse, id: String, model: String) -> Response {
    let choice = answer.choices.into_iter().next();
    let mut content = Vec::new();
    let mut reason = "end_turn";
    if let Some(choice) = choice {
        let text = choice.message.joined_text();
        if !text.is_empty() {
            content.push(ResponseBlock::Text { text });
        }
        for call in choice.message.tool_calls {
            let input = serde_json::from_str(&call.arguments).unwrap_or_else(|_| serde_json::json!({}));
            content.push(ResponseBlock::ToolUse { id: call.id, name: call.name, input });
        }
        reason = choice.finish_reason.map_or("end_turn", upstream_stop_reason);
    }
    axum::Json(MessagesResponse {
        id,
        kind: "message".into(),
        role: "assistant".into(),
        model,
        content,
        stop_reason: Some(reason.into()),
        stop_sequence: None,
        usage: Usage::of_prompt(
            answer.usage.prompt_tokens,
            answer.usage.cached_tokens,
            answer.usage.completion_tokens,
        ),
    })
    .into_response()
}

fn upstream_stop_reason(reason: ferry_providers::FinishReason) -> &'static str {
    match reason {
        ferry_providers::FinishReason::Length => "max_tokens",
        ferry_providers::FinishReason::ToolCalls => "tool_use",
        ferry_providers::FinishReason::ContentFilter => "refusal",
        ferry_providers::FinishReason::Stop => "end_turn",
    }
}

/// Anthropic's event sequence from neutral events: a text block opens on the first text, a
/// tool_use block on each tool call (closing the block before it), then message_delta with
/// the stop reason and usage, and message_stop.
fn upstream_stream(
    events: ferry_providers::EventStream,
    id: String,
    model: String,
    input_tokens: Option<u64>,
) -> impl IntoResponse {
    #[derive(Default)]
    struct Blocks {
        /// Index and kind of the open block: `Some((index, tool_index))`, `None` for text.
        open: Option<(u32, Option<u32>)>,
        next: u32,
        reason: Option<&'static str>,
        usage: ferry_providers::Usage,
    }
    impl Blocks {
        fn close(&mut self, out: &mut Vec<StreamEvent>) {
            if let Some((index, _)) = self.open.take() {
                out.push(StreamEvent::ContentBlockStop { index });
            }
        }
        fn open(&mut self, tool: Option<u32>, block: ResponseBlock, out: &mut Vec<StreamEvent>) -> u32 {
            if let Some((index, open_tool)) = self.open
                && open_tool == tool
            {
                return index;
            }
            self.close(out);
            let index = self.next;
            self.next += 1;
            self.open = Some((index, tool));
            out.push(StreamEvent::ContentBlockStart { index, content_block: block });
            index
        }
    }
    let start = StreamEvent::MessageStart {
        message: MessagesResponse {
            id,
            kind: "message".into(),
            role: "assistant".into(),
            model,
            content: vec![],
            stop_reason: None,
            stop_sequence: None,
            // Known here for a local model; an upstream's count comes with message_delta.
            usage: Usage::of_prompt(input_tokens.unwrap_or(0), 0, 0),
        },
    };
    let mut blocks = Blocks::default();
    let body = events.map(Some).chain(futures::stream::once(async { None })).map(move |event| {
        let mut out = Vec::new();
        match event {
            Some(Ok(ChatEvent::Text { text, .. })) => {
                let index = blocks.open(None, ResponseBlock::Text { text: String::new() }, &mut out);
                out.push(StreamEvent::ContentBlockDelta { index, delta: BlockDelta::TextDelta { text } });
            }
            Some(Ok(ChatEvent::ToolCall { index: tool, id, name, arguments, .. })) => {
                let block = ResponseBlock::ToolUse {
                    id: id.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                    input: serde_json::json!({}),
                };
                let index = blocks.open(Some(tool), block, &mut out);
                if !arguments.is_empty() {
                    let delta = BlockDelta::InputJsonDelta { partial_json: arguments };
                    out.push(StreamEvent::ContentBlockDelta { index, delta });
                }
            }
            Some(Ok(ChatEvent::Finish { reason, .. })) => blocks.reason = Some(upstream_stop_reason(reason)),
            Some(Ok(ChatEvent::Usage(u))) => blocks.usage = u,
            Some(Err(e)) => {
                out.push(StreamEvent::Error { error: error_body(&ApiError::from(e)).error });
            }
            None => {
                blocks.close(&mut out);
                let delta = MessageDelta {
                    stop_reason: Some(blocks.reason.unwrap_or("end_turn").into()),
                    stop_sequence: None,
                };
                let u = &blocks.usage;
                let usage = OutputUsage {
                    input_tokens: Some(u.prompt_tokens.saturating_sub(u.cached_tokens)),
                    output_tokens: u.completion_tokens,
                    cache_read_input_tokens: (u.cached_tokens > 0).then_some(u.cached_tokens),
                };
                out.push(StreamEvent::MessageDelta { delta, usage });
                out.push(StreamEvent::MessageStop);
            }
        }
        out
    });
    let all = futures::stream::iter([start])
        .chain(body.flat_map(futures::stream::iter))
        .map(|event| Ok::<_, Infallible>(sse(event)));
    Sse::new(all).keep_alive(KeepAlive::default())
}

fn stop_reason(reason: FinishReason, stop_sequence: Option<&str>) -> &'static str {
    match (reason, stop_sequence) {
        (FinishReason::Length, _) => "max_tokens",
        (FinishReason::Stop, Some(_)) => "stop_sequence",
        (FinishReason::Stop, None) => "end_turn",
    }
}

fn sse(event: StreamEvent) -> SseEvent {
    SseEvent::default()
        .event(event.name())
        .json_data(&event)
        .unwrap_or_else(|_| SseEvent::default().data("{}"))
}

/// Streams Anthropic's event sequence: message_start, one text block (start, deltas, stop),
/// message_delta with the stop reason and usage, message_stop.
fn stream(submitted: Submitted, id: String, model_id: String, input_tokens: u64) -> impl IntoResponse {
    let start = StreamEvent::MessageStart {
        message: MessagesResponse {
            id,
            kind: "message".into(),
            role: "assistant".into(),
            model: model_id,
            content: vec![],
            stop_reason: None,
            stop_sequence: None,
            usage: Usage::of_prompt(input_tokens, 0, 0),
        },
    };
    let opening = [
        start,
        StreamEvent::ContentBlockStart {
            index: 0,
            content_block: ResponseBlock::Text { text: String::new() },
        },
        StreamEvent::Ping,
    ];
    let events = futures::stream::unfold(Some(submitted), move |state| async move {
        let mut submitted = state?;
        loop {
            let (_, event) = submitted.events.next().await?;
            let out = match event {
                Event::PromptLogprobs { .. } => continue,
                Event::Delta { text, .. } if text.is_empty() => continue,
                Event::Delta { text, .. } => {
                    vec![StreamEvent::ContentBlockDelta { index: 0, delta: BlockDelta::TextDelta { text } }]
                }
                Event::Finished { reason, stop_sequence, completion_tokens, cached_tokens, .. } => {
                    let delta = MessageDelta {
                        stop_reason: Some(stop_reason(reason, stop_sequence.as_deref()).into()),
                        stop_sequence,
                    };
                    // message_start counted the whole prompt: corrected where a cache served part.
                    let cached = (cached_tokens > 0).then_some(cached_tokens as u64);
                    let usage = OutputUsage {
                        input_tokens: cached.map(|c| input_tokens.saturating_sub(c)),
                        output_tokens: completion_tokens as u64,
                        cache_read_input_tokens: cached,
                    };
                    let tail = vec![
                        StreamEvent::ContentBlockStop { index: 0 },
                        StreamEvent::MessageDelta { delta, usage },
                        StreamEvent::MessageStop,
                    ];
                    return Some((tail, None));
                }
                Event::Error(message) => {
                    let error = error_body(&ApiError::Internal(message)).error;
                    return Some((vec![StreamEvent::Error { error }], None));
                }
                Event::DeadlineExceeded { admitted, completion_tokens } => {
                    let error = error_body(&ApiError::DeadlineExceeded { admitted, completion_tokens }).error;
                    return Some((vec![StreamEvent::Error { error }], None));
                }
            };
            return Some((out, Some(submitted)));
        }
    });
    let all = futures::stream::iter(opening)
        .chain(events.flat_map(futures::stream::iter))
        .map(|event| Ok::<_, Infallible>(sse(event)));
    Sse::new(all).keep_alive(KeepAlive::default())
}

/// Fields Anthropic's API takes that change nothing here: `service_tier` picks a capacity
/// tier, `cache_control` marks where prompt caching may cut (Ferry's prefix cache needs no
/// marks).
const IGNORED_FIELDS: &[&str] = &["service_tier", "cache_control"];

/// Refuses what this server would otherwise have to drop: fields it doesn't serve (each by
/// name), thinking, output settings other than a JSON schema, messages without content,
/// server tools, tools without a name or input schema, and a tool choice without tools or
/// naming a tool not offered.
fn check_request(request: &MessagesRequest) -> Result<(), ApiError> {
    if let Some(name) = request.other.keys().find(|k| !IGNORED_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(name.clone(), format!("{name}: this parameter is not supported")));
    }
    if let Some(thinking) = &request.thinking
        && thinking["type"] != "disabled"
    {
        return Err(ApiError::invalid(
            "thinking",
            format!(
                "thinking: extended thinking (type '{}') is not supported; leave it out or send {{\"type\": \"disabled\"}}",
                thinking["type"].as_str().unwrap_or("?")
            ),
        ));
    }
    if let Some(config) = &request.output_config {
        let Some(config) = config.as_object() else {
            return Err(ApiError::invalid("output_config", "output_config: must be an object"));
        };
        if let Some(name) = config.keys().find(|k| k.as_str() != "format") {
            return Err(ApiError::invalid(
                format!("output_config.{name}"),
                format!("output_config.{name}: this parameter is not supported"),
            ));
        }
    }
    let last = request.messages.len().saturating_sub(1);
    for (i, m) in request.messages.iter().enumerate() {
        let empty = match &m.content {
            MessageContent::Blocks(blocks) => blocks.is_empty(),
            MessageContent::Text(text) => text.is_empty(),
        };
        // A final assistant turn may be empty (nothing prefilled).
        if empty && !(i == last && m.role == "assistant") {
            return Err(ApiError::invalid(
                format!("messages.{i}.content"),
                format!(
                    "messages.{i}: all messages must have non-empty content except for the optional final assistant message"
                ),
            ));
        }
    }
    let tools = request.tools.as_deref().unwrap_or_default();
    for (i, tool) in tools.iter().enumerate() {
        if tools[..i].iter().any(|earlier| earlier["name"] == tool["name"]) {
            return Err(ApiError::invalid(
                format!("tools.{i}.name"),
                format!(
                    "tools.{i}.name: tool names must be unique; '{}' is defined twice",
                    tool["name"].as_str().unwrap_or("?")
                ),
            ));
        }
        if let Some(kind) = tool["type"].as_str().filter(|k| *k != "custom") {
            return Err(ApiError::invalid(
                format!("tools.{i}.type"),
                format!(
                    "tools.{i}: server tools (type '{kind}') are not supported; define a client tool with name and input_schema"
                ),
            ));
        }
        let name = tool["name"].as_str().unwrap_or_default();
        if !validate::valid_name(name) {
            return Err(ApiError::invalid(
                format!("tools.{i}.name"),
                format!("tools.{i}.name: '{name}' must be 1 to 64 letters, digits, underscores or hyphens"),
            ));
        }
        if !tool["input_schema"].is_object() {
            return Err(ApiError::invalid(
                format!("tools.{i}.input_schema"),
                format!("tools.{i}.input_schema: a JSON schema object is required"),
            ));
        }
    }
    if let Some(choice) = &request.tool_choice {
        let kind = choice["type"].as_str().unwrap_or_default();
        if tools.is_empty() && kind != "none" {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice: may only be specified while providing tools",
            ));
        }
        if kind == "tool" {
            let name = choice["name"].as_str().unwrap_or_default();
            if !tools.iter().any(|t| t["name"] == name) {
                return Err(ApiError::invalid(
                    "tool_choice.name",
                    format!("tool_choice.name: '{name}' is not one of the tools offered"),
                ));
            }
        }
    }
    Ok(())
}

/// Whether the request offers tools or earlier turns hold tool calls or their results: the
/// neutral path renders those (for a create and for count_tokens alike).
fn uses_tools(tools: Option<&[serde_json::Value]>, messages: &[Message]) -> bool {
    tools.is_some_and(|t| !t.is_empty()) || has_tool_blocks(messages)
}

fn has_tool_blocks(messages: &[Message]) -> bool {
    messages.iter().any(|m| match &m.content {
        MessageContent::Blocks(blocks) => {
            blocks.iter().any(|b| b.kind == "tool_use" || b.kind == "tool_result")
        }
        MessageContent::Text(_) => false,
    })
}

#[utoipa::path(post, path = "/v1/messages/count_tokens", tag = "Anthropic",
    summary = "Count a message's input tokens",
    request_body = ferry_api::anthropic::CountTokensRequest,
    responses((status = 200, body = ferry_api::anthropic::CountTokensResponse)))]
pub async fn count_tokens(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, AnthropicError> {
    let body = read_body(body, &state)?;
    let count: CountTokensRequest = validate::parse_json(&body)?;
    // Counted on the prompt a create with the same model, tools and conversation runs.
    let mut request = MessagesRequest {
        model: count.model,
        messages: count.messages,
        system: count.system,
        tools: count.tools,
        tool_choice: count.tool_choice,
        max_tokens: 1,
        stop_sequences: None,
        temperature: None,
        top_p: None,
        top_k: None,
        stream: false,
        metadata: None,
        thinking: None,
        output_config: None,
        other: Default::default(),
    };
    if let Some(gateway) = state.gateway() {
        if let Some(preset) = gateway.preset(&request.model) {
            // A count sends no max_tokens to contradict a locked one.
            request.max_tokens = preset.locked.max_tokens.unwrap_or(request.max_tokens);
            crate::presets::apply_messages(preset, &mut request)?;
        }
        if gateway.has_alias(&request.model) {
            return Err(ApiError::invalid(
                "model",
                format!(
                    "Counting tokens is served for local models only: '{}' is answered by an upstream provider",
                    request.model
                ),
            )
            .into());
        }
    }
    let model: SharedModel = state.model(&request.model).await?;
    if uses_tools(request.tools.as_deref(), &request.messages) {
        let neutral = translate::from_anthropic(&request)?;
        let run = crate::structured::LocalRun::messages(None);
        let (prompt, _) = crate::structured::local_neutral_prompt(&model, &neutral, &run).await?;
        return Ok(axum::Json(CountTokensResponse { input_tokens: prompt.len() as u64 }).into_response());
    }
    let messages = conversation(request.system.as_ref(), &request.messages)?;
    let prompt = local_prompt(&model, &request.messages, messages).await?;
    Ok(axum::Json(CountTokensResponse { input_tokens: prompt.len() as u64 }).into_response())
}
