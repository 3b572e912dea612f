//! `POST /v1/responses`: OpenAI's Responses API over the local engine, stateless (no
//! `previous_response_id`, nothing stored), plain and streaming with its typed events.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response as HttpResponse};
use ferry_api::openai::SamplingFields;
use ferry_api::responses::{
    IncompleteDetails, Input, InputContent, InputTokensDetails, OutputMessage, OutputText,
    OutputTokensDetails, Response, ResponseUsage, ResponsesRequest, StreamEvent, TextConfig, TextFormat,
};
use ferry_engine::{ChatMessage, FinishReason};
use ferry_providers::{
    ChatEvent, ChatRequest, EventStream, FinishReason as NeutralFinish, Message, Params, Role,
};
use futures::StreamExt;

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::generation::{self, request_id, unix_now};
use crate::validate;

/// The conversation of `instructions` and `input`.
fn conversation(request: &ResponsesRequest) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::new();
    if let Some(instructions) = &request.instructions {
        out.push(ChatMessage::new("system", instructions.clone()));
    }
    match &request.input {
        Input::Text(text) => out.push(ChatMessage::new("user", text.clone())),
        Input::Items(items) => {
            for (i, item) in items.iter().enumerate() {
                if let Some(kind) = item.kind.as_deref()
                    && kind != "message"
                {
                    return Err(ApiError::invalid(
                        format!("input[{i}].type"),
                        format!("Input items of type '{kind}' are not supported by local models yet"),
                    ));
                }
                let role = match item.role.as_deref() {
                    Some("user") => "user",
                    Some("assistant") => "assistant",
                    Some("system" | "developer") => "system",
                    other => {
                        return Err(ApiError::invalid(
                            format!("input[{i}].role"),
                            format!(
                                "Invalid role {other:?} in input[{i}]; expected user, assistant, system or developer"
                            ),
                        ));
                    }
                };
                let content = match &item.content {
                    None => String::new(),
                    Some(InputContent::Text(text)) => text.clone(),
                    Some(InputContent::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, part) in parts.iter().enumerate() {
                            match (part.kind.as_str(), &part.text) {
                                ("input_text" | "output_text" | "text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::invalid(
                                        format!("input[{i}].content[{j}]"),
                                        format!("Content of type '{kind}' is not supported by this model"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                out.push(ChatMessage::new(role, content));
            }
        }
    }
    if out.iter().all(|m| m.role == "system") {
        return Err(ApiError::invalid("input", "'input' must contain at least one message"));
    }
    Ok(out)
}

/// Refuses, by name, what a stateless local model cannot honour.
fn refuse_unsupported(request: &ResponsesRequest) -> Result<(), ApiError> {
    if request.previous_response_id.is_some() {
        return Err(ApiError::invalid(
            "previous_response_id",
            "Ferry's Responses API is stateless: send the whole conversation as 'input' instead of 'previous_response_id'",
        ));
    }
    if request.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid("tools", "Tools are not supported by local models yet"));
    }
    Ok(())
}

/// The request's `text.format`: `text` when absent.
fn text_format(request: &ResponsesRequest) -> TextFormat {
    request.text.as_ref().and_then(|t| t.format.clone()).unwrap_or(TextFormat {
        kind: "text".into(),
        name: None,
        schema: None,
        strict: None,
        description: None,
    })
}

/// `text.format` as chat completions' `response_format`, so that one check and one grammar
/// serve both APIs.
fn response_format(format: &TextFormat) -> Option<serde_json::Value> {
    match format.kind.as_str() {
        "text" => None,
        "json_schema" => Some(serde_json::json!({
            "type": "json_schema",
            "json_schema": {
                "name": format.name.clone().unwrap_or_default(),
                "schema": format.schema,
                "strict": format.strict,
            },
        })),
        other => Some(serde_json::json!({ "type": other })),
    }
}

/// What every response object repeats from the request.
struct Envelope {
    id: String,
    created_at: u64,
    model: String,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    metadata: serde_json::Value,
    format: TextFormat,
}

impl Envelope {
    fn response(&self, status: &str, output: Vec<OutputMessage>, usage: Option<ResponseUsage>) -> Response {
        Response {
            id: self.id.clone(),
            object: "response".into(),
            created_at: self.created_at,
            status: status.into(),
            error: None,
            incomplete_details: (status == "incomplete")
                .then(|| IncompleteDetails { reason: "max_output_tokens".into() }),
            instructions: self.instructions.clone(),
            max_output_tokens: self.max_output_tokens,
            model: self.model.clone(),
            output,
            parallel_tool_calls: true,
            previous_response_id: None,
            store: false,
            temperature: self.temperature,
            text: TextConfig { format: Some(self.format.clone()) },
            tool_choice: "auto".into(),
            tools: vec![],
            top_p: self.top_p,
            usage,
            metadata: self.metadata.clone(),
        }
    }
}

fn message(id: &str, status: &str, text: Option<String>) -> OutputMessage {
    OutputMessage {
        kind: "message".into(),
        id: id.into(),
        status: status.into(),
        role: "assistant".into(),
        content: text.map(output_text).into_iter().collect(),
    }
}

fn output_text(text: String) -> OutputText {
    OutputText { kind: "output_text".into(), text, annotations: vec![] }
}

fn usage(input: usize, output: usize) -> ResponseUsage {
    ResponseUsage {
        input_tokens: input as u64,
        input_tokens_details: InputTokensDetails { cached_tokens: 0 },
        output_tokens: output as u64,
        output_tokens_details: OutputTokensDetails { reasoning_tokens: 0 },
        total_tokens: (input + output) as u64,
    }
}

fn status(reason: Option<FinishReason>) -> &'static str {
    match reason {
        Some(FinishReason::Length) => "incomplete",
        _ => "completed",
    }
}

#[utoipa::path(post, path = "/v1/responses", tag = "OpenAI",
    summary = "Create a model response (stateless)",
    request_body = ResponsesRequest,
    responses((status = 200, description = "The response; with `stream: true`, its typed events",
        content((ferry_api::responses::Response = "application/json"), (ferry_api::responses::StreamEvent = "text/event-stream")))))]
pub async fn responses(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(body, &state)?;
    let body = validate::parse_body(&body)?;
    let mut request: ResponsesRequest = validate::parse_json(&body)?;
    // The response names the model and repeats the instructions as the client sent them,
    // never a preset's.
    let client_model = request.model.clone();
    let client_instructions = request.instructions.clone();
    let mut fields = SamplingFields {
        temperature: request.temperature,
        top_p: request.top_p,
        ..SamplingFields::default()
    };
    if let Some(gateway) = state.gateway()
        && let Some(preset) = gateway.preset(&request.model)
    {
        fields = crate::presets::apply_responses(preset, &mut request)?;
        crate::presets::tighten_policy(&state, preset)?;
    }
    refuse_unsupported(&request)?;
    let messages = conversation(&request)?;
    let envelope = Envelope {
        id: request_id("resp"),
        created_at: unix_now(),
        model: client_model,
        instructions: client_instructions,
        max_output_tokens: request.max_output_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        metadata: request.metadata.clone().unwrap_or_else(|| serde_json::json!({})),
        format: text_format(&request),
    };
    if let Some(gateway) = state.gateway()
        && gateway.has_alias(&request.model)
    {
        return upstream(gateway, &request, &fields, messages, envelope).await;
    }
    let model = state.model(&request.model).await?;
    let sampling = validate::sampling(&fields, &model)?;
    let plan = crate::structured::format_plan(response_format(&envelope.format).as_ref(), "text.format")?;
    let constraint = crate::structured::compile(&model, &plan).await?;
    let prompt = generation::chat_prompt(&model, messages).await?;
    let max_tokens =
        validate::max_tokens(request.max_output_tokens, "max_output_tokens", prompt.len(), &model)?;
    let mut generate = validate::generate_request(prompt, max_tokens, &sampling, None, false);
    generate.constraint = constraint;
    let submitted = generation::submit(&model, vec![generate])?;
    if request.stream {
        let events = crate::chat::local_events(model, submitted);
        return Ok(stream(events, envelope).into_response());
    }
    let collected = generation::collect(submitted).await?;
    let choice = collected.choices.into_iter().next().unwrap_or_default();
    let status = status(choice.finish_reason);
    let item = message(&request_id("msg"), status, Some(choice.text));
    let usage = usage(collected.usage.prompt_tokens as usize, collected.usage.completion_tokens as usize);
    Ok(axum::Json(envelope.response(status, vec![item], Some(usage))).into_response())
}

/// A Responses request for a gateway alias: text in, text out (tools are refused above).
async fn upstream(
    gateway: std::sync::Arc<ferry_gateway::Gateway>,
    request: &ResponsesRequest,
    fields: &SamplingFields,
    messages: Vec<ChatMessage>,
    envelope: Envelope,
) -> Result<HttpResponse, ApiError> {
    if envelope.format.kind != "text" {
        return Err(ApiError::invalid(
            "text.format",
            format!(
                "text.format of type '{}' is not supported for gateway aliases yet",
                envelope.format.kind
            ),
        ));
    }
    if let Some(m) = request.max_output_tokens
        && m < 1
    {
        return Err(ApiError::invalid("max_output_tokens", format!("Invalid 'max_output_tokens': {m}")));
    }
    let neutral = ChatRequest {
        model: request.model.clone(),
        messages: messages
            .into_iter()
            .map(|m| {
                let role = match m.role.as_str() {
                    "system" => Role::System,
                    "assistant" => Role::Assistant,
                    _ => Role::User,
                };
                Message::text(role, m.content)
            })
            .collect(),
        params: Params {
            temperature: fields.temperature,
            top_p: fields.top_p,
            max_tokens: request.max_output_tokens.map(|m| m as u64),
            // Only a preset sets these here: Responses has no fields for them.
            stop: fields.stop.clone().map(ferry_api::openai::Stop::into_vec).unwrap_or_default(),
            seed: fields.seed,
            presence_penalty: fields.presence_penalty,
            frequency_penalty: fields.frequency_penalty,
            ..Params::default()
        },
        tools: vec![],
        tool_choice: None,
        response_format: None,
    };
    if request.stream {
        let routed = crate::guard::chat_stream(&gateway, &request.model, neutral, None).await?;
        return Ok(stream(routed.value, envelope).into_response());
    }
    let routed = crate::guard::chat(&gateway, &request.model, neutral, None).await?;
    let answer = routed.value;
    let choice = answer.choices.into_iter().next();
    let finish = choice.as_ref().and_then(|c| c.finish_reason);
    let status = if finish == Some(NeutralFinish::Length) { "incomplete" } else { "completed" };
    let text = choice.map(|c| c.message.joined_text()).unwrap_or_default();
    let item = message(&request_id("msg"), status, Some(text));
    let usage = usage(answer.usage.prompt_tokens as usize, answer.usage.completion_tokens as usize);
    let mut response = axum::Json(envelope.response(status, vec![item], Some(usage))).into_response();
    crate::chat::route_headers(&mut response, &routed.route);
    Ok(response)
}

fn sse(event: StreamEvent) -> SseEvent {
    SseEvent::default()
        .event(event.name())
        .json_data(&event)
        .unwrap_or_else(|_| SseEvent::default().data("{}"))
}

/// The event sequence OpenAI sends for one text message: created, in_progress, item added,
/// part added, text deltas, text done, part done, item done, completed (or incomplete).
fn stream(events: EventStream, envelope: Envelope) -> impl IntoResponse {
    struct State {
        envelope: Envelope,
        item_id: String,
        text: String,
        sequence: u64,
        finish: Option<NeutralFinish>,
        usage: ferry_providers::Usage,
    }
    impl State {
        fn next(&mut self) -> u64 {
            self.sequence += 1;
            self.sequence - 1
        }
    }
    let mut st = State {
        envelope,
        item_id: request_id("msg"),
        text: String::new(),
        sequence: 0,
        finish: None,
        usage: Default::default(),
    };
    let in_progress = st.envelope.response("in_progress", vec![], None);
    let opening = vec![
        StreamEvent::Created { sequence_number: st.next(), response: in_progress.clone() },
        StreamEvent::InProgress { sequence_number: st.next(), response: in_progress },
        StreamEvent::OutputItemAdded {
            sequence_number: st.next(),
            output_index: 0,
            item: message(&st.item_id, "in_progress", None),
        },
        StreamEvent::ContentPartAdded {
            sequence_number: st.next(),
            item_id: st.item_id.clone(),
            output_index: 0,
            content_index: 0,
            part: output_text(String::new()),
        },
    ];
    let body = events.map(Some).chain(futures::stream::once(async { None })).map(move |event| match event {
        Some(Ok(ChatEvent::Text { text, .. })) if !text.is_empty() => {
            st.text.push_str(&text);
            vec![StreamEvent::OutputTextDelta {
                sequence_number: st.next(),
                item_id: st.item_id.clone(),
                output_index: 0,
                content_index: 0,
                delta: text,
                logprobs: vec![],
            }]
        }
        Some(Ok(ChatEvent::Finish { reason, .. })) => {
            st.finish = Some(reason);
            vec![]
        }
        Some(Ok(ChatEvent::Usage(u))) => {
            st.usage = u;
            vec![]
        }
        Some(Ok(_)) => vec![],
        Some(Err(e)) => {
            let error = ApiError::from(e);
            let body = error.body().error;
            vec![StreamEvent::Error {
                sequence_number: st.next(),
                code: body.code,
                message: body.message,
                param: body.param,
            }]
        }
        None => {
            let status = if st.finish == Some(NeutralFinish::Length) { "incomplete" } else { "completed" };
            let text = st.text.clone();
            let item = message(&st.item_id, status, Some(text.clone()));
            let usage = usage(st.usage.prompt_tokens as usize, st.usage.completion_tokens as usize);
            let done = st.envelope.response(status, vec![item.clone()], Some(usage));
            let item_id = st.item_id.clone();
            let mut tail = vec![
                StreamEvent::OutputTextDone {
                    sequence_number: st.next(),
                    item_id: item_id.clone(),
                    output_index: 0,
                    content_index: 0,
                    text: text.clone(),
                    logprobs: vec![],
                },
                StreamEvent::ContentPartDone {
                    sequence_number: st.next(),
                    item_id,
                    output_index: 0,
                    content_index: 0,
                    part: output_text(text),
                },
                StreamEvent::OutputItemDone { sequence_number: st.next(), output_index: 0, item },
            ];
            let sequence_number = st.next();
            tail.push(match status {
                "incomplete" => StreamEvent::Incomplete { sequence_number, response: done },
                _ => StreamEvent::Completed { sequence_number, response: done },
            });
            tail
        }
    });
    let all = futures::stream::iter(opening)
        .chain(body.flat_map(futures::stream::iter))
        .map(|event| Ok::<_, Infallible>(sse(event)));
    Sse::new(all).keep_alive(KeepAlive::default())
}
