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
use ferry_engine::{ChatMessage, Event, FinishReason};
use futures::StreamExt;

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::generation::{self, Submitted, request_id, unix_now};
use crate::validate;

/// The conversation of `instructions` and `input`.
fn conversation(request: &ResponsesRequest) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::new();
    if let Some(instructions) = &request.instructions {
        out.push(ChatMessage { role: "system".into(), content: instructions.clone() });
    }
    match &request.input {
        Input::Text(text) => out.push(ChatMessage { role: "user".into(), content: text.clone() }),
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
                out.push(ChatMessage { role: role.into(), content });
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
    if let Some(kind) = request.text.as_ref().and_then(|t| t.format.as_ref()).map(|f| f.kind.as_str())
        && kind != "text"
    {
        return Err(ApiError::invalid(
            "text.format",
            format!("text.format of type '{kind}' is not supported by local models yet"),
        ));
    }
    Ok(())
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
            text: TextConfig { format: Some(TextFormat { kind: "text".into() }) },
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

pub async fn responses(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(body, &state)?;
    let body = validate::parse_body(&body)?;
    let request: ResponsesRequest = validate::parse_json(&body)?;
    let model = state.model(&request.model)?;
    refuse_unsupported(&request)?;
    let messages = conversation(&request)?;
    let fields = SamplingFields {
        temperature: request.temperature,
        top_p: request.top_p,
        ..SamplingFields::default()
    };
    let sampling = validate::sampling(&fields, &model)?;
    let prompt = {
        let model = model.clone();
        tokio::task::spawn_blocking(move || model.chat_prompt(&messages))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
    };
    let max_tokens =
        validate::max_tokens(request.max_output_tokens, "max_output_tokens", prompt.len(), &model)?;
    let submitted = generation::submit(
        &model,
        vec![validate::generate_request(prompt, max_tokens, &sampling, None, false)],
    )?;
    let envelope = Envelope {
        id: request_id("resp"),
        created_at: unix_now(),
        model: request.model.clone(),
        instructions: request.instructions.clone(),
        max_output_tokens: request.max_output_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        metadata: request.metadata.clone().unwrap_or_else(|| serde_json::json!({})),
    };
    if request.stream {
        return Ok(stream(submitted, envelope).into_response());
    }
    let collected = generation::collect(submitted).await?;
    let choice = collected.choices.into_iter().next().unwrap_or_default();
    let status = status(choice.finish_reason);
    let item = message(&request_id("msg"), status, Some(choice.text));
    let usage = usage(collected.usage.prompt_tokens as usize, collected.usage.completion_tokens as usize);
    Ok(axum::Json(envelope.response(status, vec![item], Some(usage))).into_response())
}

struct StreamState {
    submitted: Submitted,
    envelope: Envelope,
    item_id: String,
    text: String,
    sequence: u64,
    done: bool,
}

impl StreamState {
    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence - 1
    }
}

fn sse(event: StreamEvent) -> SseEvent {
    SseEvent::default()
        .event(event.name())
        .json_data(&event)
        .unwrap_or_else(|_| SseEvent::default().data("{}"))
}

/// The event sequence OpenAI sends for one text message: created, in_progress, item added,
/// part added, text deltas, text done, part done, item done, completed (or incomplete).
fn stream(submitted: Submitted, envelope: Envelope) -> impl IntoResponse {
    let prompt_tokens = submitted.prompt_tokens;
    let mut st = StreamState {
        submitted,
        envelope,
        item_id: request_id("msg"),
        text: String::new(),
        sequence: 0,
        done: false,
    };
    let opening = vec![
        StreamEvent::Created {
            sequence_number: st.next_sequence(),
            response: st.envelope.response("in_progress", vec![], None),
        },
        StreamEvent::InProgress {
            sequence_number: st.next_sequence(),
            response: st.envelope.response("in_progress", vec![], None),
        },
        StreamEvent::OutputItemAdded {
            sequence_number: st.next_sequence(),
            output_index: 0,
            item: message(&st.item_id, "in_progress", None),
        },
        StreamEvent::ContentPartAdded {
            sequence_number: st.next_sequence(),
            item_id: st.item_id.clone(),
            output_index: 0,
            content_index: 0,
            part: output_text(String::new()),
        },
    ];
    let events = futures::stream::unfold(st, move |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let (_, event) = st.submitted.events.next().await?;
            match event {
                Event::PromptLogprobs { .. } => continue,
                Event::Delta { text, .. } if text.is_empty() => continue,
                Event::Delta { text, .. } => {
                    st.text.push_str(&text);
                    let event = StreamEvent::OutputTextDelta {
                        sequence_number: st.next_sequence(),
                        item_id: st.item_id.clone(),
                        output_index: 0,
                        content_index: 0,
                        delta: text,
                        logprobs: vec![],
                    };
                    return Some((vec![event], st));
                }
                Event::Finished { reason, completion_tokens, .. } => {
                    st.done = true;
                    let status = status(Some(reason));
                    let text = st.text.clone();
                    let item = message(&st.item_id, status, Some(text.clone()));
                    let final_response = st.envelope.response(
                        status,
                        vec![item.clone()],
                        Some(usage(prompt_tokens, completion_tokens)),
                    );
                    let item_id = st.item_id.clone();
                    let mut tail = vec![
                        StreamEvent::OutputTextDone {
                            sequence_number: st.next_sequence(),
                            item_id: item_id.clone(),
                            output_index: 0,
                            content_index: 0,
                            text: text.clone(),
                            logprobs: vec![],
                        },
                        StreamEvent::ContentPartDone {
                            sequence_number: st.next_sequence(),
                            item_id,
                            output_index: 0,
                            content_index: 0,
                            part: output_text(text),
                        },
                        StreamEvent::OutputItemDone {
                            sequence_number: st.next_sequence(),
                            output_index: 0,
                            item,
                        },
                    ];
                    let sequence_number = st.next_sequence();
                    tail.push(match reason {
                        FinishReason::Length => {
                            StreamEvent::Incomplete { sequence_number, response: final_response }
                        }
                        FinishReason::Stop => {
                            StreamEvent::Completed { sequence_number, response: final_response }
                        }
                    });
                    return Some((tail, st));
                }
                Event::Error(message) => {
                    st.done = true;
                    let event = StreamEvent::Error {
                        sequence_number: st.next_sequence(),
                        code: Some("internal_error".into()),
                        message,
                        param: None,
                    };
                    return Some((vec![event], st));
                }
            }
        }
    });
    let all = futures::stream::iter(opening)
        .chain(events.flat_map(futures::stream::iter))
        .map(|event| Ok::<_, Infallible>(sse(event)));
    Sse::new(all).keep_alive(KeepAlive::default())
}
