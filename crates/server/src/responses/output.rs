//! Neutral answers written as the Responses API's: a `response` object whose `output` holds a
//! `message` item for text and a `function_call` item per call, or the typed stream events
//! OpenAI sends for them (items added and done, text and argument deltas), numbered in order.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use ferry_api::responses::{
    FunctionCall, IncompleteDetails, InputTokensDetails, OutputItem, OutputMessage, OutputText,
    OutputTokensDetails, Response, ResponseUsage, StreamEvent, TextConfig, TextFormat, Tool,
};
use ferry_providers::{ChatEvent, ChatResponse, EventStream, FinishReason};
use futures::StreamExt;

use crate::error::ApiError;
use crate::generation::request_id;

/// What every response object repeats from the request.
pub struct Envelope {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub metadata: serde_json::Value,
    pub format: TextFormat,
    pub tools: Vec<Tool>,
    pub tool_choice: serde_json::Value,
    pub parallel_tool_calls: bool,
}

impl Envelope {
    pub fn response(&self, status: &str, output: Vec<OutputItem>, usage: Option<ResponseUsage>) -> Response {
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
            parallel_tool_calls: self.parallel_tool_calls,
            previous_response_id: None,
            store: false,
            temperature: self.temperature,
            text: TextConfig { format: Some(self.format.clone()) },
            tool_choice: self.tool_choice.clone(),
            tools: self.tools.clone(),
            top_p: self.top_p,
            usage,
            metadata: self.metadata.clone(),
        }
    }
}

fn status(finish: Option<FinishReason>) -> &'static str {
    if finish == Some(FinishReason::Length) { "incomplete" } else { "completed" }
}

fn message(id: &str, status: &str, text: Option<String>) -> OutputItem {
    OutputItem::Message(OutputMessage {
        id: id.into(),
        status: status.into(),
        role: "assistant".into(),
        content: text.map(output_text).into_iter().collect(),
    })
}

fn output_text(text: String) -> OutputText {
    OutputText { kind: "output_text".into(), text, annotations: vec![] }
}

fn usage(u: &ferry_providers::Usage) -> ResponseUsage {
    ResponseUsage {
        input_tokens: u.prompt_tokens,
        input_tokens_details: InputTokensDetails { cached_tokens: u.cached_tokens },
        output_tokens: u.completion_tokens,
        output_tokens_details: OutputTokensDetails { reasoning_tokens: 0 },
        total_tokens: u.prompt_tokens + u.completion_tokens,
    }
}

/// A call's id as the client will answer it; an upstream that gave none gets one.
fn call_id(id: &str) -> String {
    if id.is_empty() { request_id("call") } else { id.to_string() }
}

/// The response object of a whole neutral answer (its first choice): the text as a message
/// item (also when empty and nothing was called), then one `function_call` item per call.
pub fn response(envelope: &Envelope, answer: ChatResponse) -> Response {
    let choice = answer.choices.into_iter().next();
    let finish = choice.as_ref().and_then(|c| c.finish_reason);
    let status = status(finish);
    let mut output = Vec::new();
    if let Some(choice) = choice {
        let text = choice.message.joined_text();
        // Blank text beside calls is no message (chat completions answer it as `null` content).
        if !text.trim().is_empty() || choice.message.tool_calls.is_empty() {
            output.push(message(&request_id("msg"), status, Some(text)));
        }
        for call in choice.message.tool_calls {
            output.push(OutputItem::FunctionCall(FunctionCall {
                id: request_id("fc"),
                call_id: call_id(&call.id),
                name: call.name,
                arguments: call.arguments,
                status: status.into(),
            }));
        }
    } else {
        output.push(message(&request_id("msg"), status, Some(String::new())));
    }
    envelope.response(status, output, Some(usage(&answer.usage)))
}

fn sse(event: StreamEvent) -> SseEvent {
    SseEvent::default()
        .event(event.name())
        .json_data(&event)
        .unwrap_or_else(|_| SseEvent::default().data("{}"))
}

/// An output item being streamed.
enum Item {
    Message { id: String, text: String },
    Call { id: String, call_id: String, name: String, arguments: String },
}

impl Item {
    fn output(&self, status: &str) -> OutputItem {
        match self {
            Item::Message { id, text } => message(id, status, Some(text.clone())),
            Item::Call { id, call_id, name, arguments } => OutputItem::FunctionCall(FunctionCall {
                id: id.clone(),
                call_id: call_id.clone(),
                name: name.clone(),
                arguments: arguments.clone(),
                status: status.into(),
            }),
        }
    }
}

/// The stream's state: items in output order, the one still open, calls by their index.
struct Renderer {
    envelope: Envelope,
    sequence: u64,
    items: Vec<Item>,
    open: Option<usize>,
    calls: HashMap<u32, usize>,
    /// Blank text not yet in a message: it opens one only if more text follows.
    blank: String,
    finish: Option<FinishReason>,
    usage: ferry_providers::Usage,
    /// An error ended the response (`response.failed` was sent): nothing follows it.
    failed: bool,
}

impl Renderer {
    fn new(envelope: Envelope) -> Self {
        Renderer {
            envelope,
            sequence: 0,
            items: Vec::new(),
            open: None,
            calls: HashMap::new(),
            blank: String::new(),
            finish: None,
            usage: Default::default(),
            failed: false,
        }
    }

    fn next(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence - 1
    }

    /// The opening events: the response created and in progress, with no output yet.
    fn opening(&mut self) -> Vec<StreamEvent> {
        let in_progress = self.envelope.response("in_progress", vec![], None);
        vec![
            StreamEvent::Created { sequence_number: self.next(), response: in_progress.clone() },
            StreamEvent::InProgress { sequence_number: self.next(), response: in_progress },
        ]
    }

    fn event(&mut self, event: Result<ChatEvent, ferry_providers::ProviderError>) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.failed {
            return out;
        }
        match event {
            // A Responses answer has one choice.
            Ok(ChatEvent::Text { choice, text, .. }) if choice == 0 && !text.is_empty() => {
                let index = match self.open {
                    Some(i) if matches!(self.items[i], Item::Message { .. }) => i,
                    _ if text.trim().is_empty() => {
                        self.blank.push_str(&text);
                        return out;
                    }
                    _ => self.add(Item::Message { id: request_id("msg"), text: String::new() }, &mut out),
                };
                let text = std::mem::take(&mut self.blank) + &text;
                self.push_text(index, text, &mut out);
            }
            Ok(ChatEvent::ToolCall { choice: 0, index: call, id, name, arguments }) => {
                self.blank.clear();
                let index = match self.calls.get(&call) {
                    Some(&i) => i,
                    None => {
                        let item = Item::Call {
                            id: request_id("fc"),
                            call_id: call_id(id.as_deref().unwrap_or_default()),
                            name: name.unwrap_or_default(),
                            arguments: String::new(),
                        };
                        let i = self.add(item, &mut out);
                        self.calls.insert(call, i);
                        i
                    }
                };
                if !arguments.is_empty()
                    && let Item::Call { id, arguments: all, .. } = &mut self.items[index]
                {
                    all.push_str(&arguments);
                    let item_id = id.clone();
                    out.push(StreamEvent::FunctionCallArgumentsDelta {
                        sequence_number: self.next(),
                        item_id,
                        output_index: index as u32,
                        delta: arguments,
                    });
                }
            }
            Ok(ChatEvent::Finish { choice: 0, reason }) => self.finish = Some(reason),
            Ok(ChatEvent::Usage(u)) => self.usage = u,
            Ok(_) => {}
            // As OpenAI ends a response that fails midway: `error`, the open item closed as
            // incomplete, then `response.failed` with what was output. Never `completed`.
            Err(e) => {
                let body = ApiError::from(e).body().error;
                out.push(StreamEvent::Error {
                    sequence_number: self.next(),
                    code: body.code.clone(),
                    message: body.message.clone(),
                    param: body.param,
                });
                let last = self.open;
                self.close("incomplete", &mut out);
                let output = self.outputs(last, "incomplete");
                let mut failed = self.envelope.response("failed", output, Some(usage(&self.usage)));
                failed.error = Some(serde_json::json!({"code": body.code, "message": body.message}));
                out.push(StreamEvent::Failed { sequence_number: self.next(), response: failed });
                self.failed = true;
            }
        }
        out
    }

    /// Opens an item after closing the one before (items stream one after another).
    /// Appends `text` to the message item at `index` and sends it as a delta.
    fn push_text(&mut self, index: usize, text: String, out: &mut Vec<StreamEvent>) {
        let sequence_number = self.next();
        if let Item::Message { id, text: all } = &mut self.items[index] {
            all.push_str(&text);
            out.push(StreamEvent::OutputTextDelta {
                sequence_number,
                item_id: id.clone(),
                output_index: index as u32,
                content_index: 0,
                delta: text,
                logprobs: vec![],
            });
        }
    }

    fn add(&mut self, item: Item, out: &mut Vec<StreamEvent>) -> usize {
        self.close("completed", out);
        let index = self.items.len();
        let added = item.output("in_progress");
        let item_id = match &item {
            Item::Message { id, .. } | Item::Call { id, .. } => id.clone(),
        };
        let is_message = matches!(item, Item::Message { .. });
        self.items.push(item);
        self.open = Some(index);
        let added = match added {
            OutputItem::Message(m) => OutputItem::Message(OutputMessage { content: vec![], ..m }),
            other => other,
        };
        out.push(StreamEvent::OutputItemAdded {
            sequence_number: self.next(),
            output_index: index as u32,
            item: added,
        });
        if is_message {
            out.push(StreamEvent::ContentPartAdded {
                sequence_number: self.next(),
                item_id,
                output_index: index as u32,
                content_index: 0,
                part: output_text(String::new()),
            });
        }
        index
    }

    fn close(&mut self, status: &str, out: &mut Vec<StreamEvent>) {
        let Some(index) = self.open.take() else { return };
        let output_index = index as u32;
        match &self.items[index] {
            Item::Message { id, text } => {
                let (item_id, text) = (id.clone(), text.clone());
                out.push(StreamEvent::OutputTextDone {
                    sequence_number: self.next(),
                    item_id: item_id.clone(),
                    output_index,
                    content_index: 0,
                    text: text.clone(),
                    logprobs: vec![],
                });
                out.push(StreamEvent::ContentPartDone {
                    sequence_number: self.next(),
                    item_id,
                    output_index,
                    content_index: 0,
                    part: output_text(text),
                });
            }
            Item::Call { id, arguments, .. } => {
                let (item_id, arguments) = (id.clone(), arguments.clone());
                out.push(StreamEvent::FunctionCallArgumentsDone {
                    sequence_number: self.next(),
                    item_id,
                    output_index,
                    arguments,
                });
            }
        }
        let item = self.items[index].output(status);
        out.push(StreamEvent::OutputItemDone { sequence_number: self.next(), output_index, item });
    }

    /// Every item as the final response shows it: the one at `last` with `status`, the
    /// others completed.
    fn outputs(&self, last: Option<usize>, status: &str) -> Vec<OutputItem> {
        let status_of = |i| if Some(i) == last { status } else { "completed" };
        self.items.iter().enumerate().map(|(i, item)| item.output(status_of(i))).collect()
    }

    /// The last item closed, then `response.completed` (or `.incomplete`) with every item.
    fn end(&mut self) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        if self.failed {
            return out;
        }
        let status = status(self.finish);
        if self.items.is_empty() {
            let text = std::mem::take(&mut self.blank);
            let index = self.add(Item::Message { id: request_id("msg"), text: String::new() }, &mut out);
            if !text.is_empty() {
                self.push_text(index, text, &mut out);
            }
        }
        let last = self.items.len() - 1;
        self.close(status, &mut out);
        let output = self.outputs(Some(last), status);
        let done = self.envelope.response(status, output, Some(usage(&self.usage)));
        let sequence_number = self.next();
        out.push(match status {
            "incomplete" => StreamEvent::Incomplete { sequence_number, response: done },
            _ => StreamEvent::Completed { sequence_number, response: done },
        });
        out
    }
}

/// The event sequence OpenAI sends: created, in_progress; per output item, added, its
/// deltas (text, or a call's arguments) and done; then completed (or incomplete).
pub fn stream(events: EventStream, envelope: Envelope) -> impl IntoResponse {
    let mut renderer = Renderer::new(envelope);
    let opening = renderer.opening();
    let body = events.map(Some).chain(futures::stream::once(async { None })).map(move |event| match event {
        Some(event) => renderer.event(event),
        None => renderer.end(),
    });
    let all = futures::stream::iter(opening)
        .chain(body.flat_map(futures::stream::iter))
        .map(|event| Ok::<_, Infallible>(sse(event)));
    Sse::new(all).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_providers::ProviderError;

    fn envelope() -> Envelope {
        Envelope {
            id: "resp_1".into(),
            created_at: 0,
            model: "m".into(),
            instructions: None,
            max_output_tokens: None,
            temperature: None,
            top_p: None,
            metadata: serde_json::json!({}),
            format: TextFormat {
                kind: "text".into(),
                name: None,
                schema: None,
                strict: None,
                description: None,
            },
            tools: vec![],
            tool_choice: "auto".into(),
            parallel_tool_calls: true,
        }
    }

    fn render(events: Vec<ChatEvent>) -> Vec<serde_json::Value> {
        let mut r = Renderer::new(envelope());
        let mut out = r.opening();
        for event in events {
            out.extend(r.event(Ok::<_, ProviderError>(event)));
        }
        out.extend(r.end());
        out.into_iter().map(|e| serde_json::to_value(e).unwrap()).collect()
    }

    fn types(events: &[serde_json::Value]) -> Vec<&str> {
        events.iter().map(|e| e["type"].as_str().unwrap()).collect()
    }

    fn call(index: u32, id: Option<&str>, name: Option<&str>, arguments: &str) -> ChatEvent {
        ChatEvent::ToolCall {
            choice: 0,
            index,
            id: id.map(str::to_string),
            name: name.map(str::to_string),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn an_error_midway_fails_the_response_and_ends_the_stream() {
        let mut r = Renderer::new(envelope());
        let mut out = r.opening();
        out.extend(r.event(Ok(ChatEvent::Text { choice: 0, text: "Once upon".into(), logprobs: None })));
        out.extend(r.event(Err(ProviderError::Timeout("total"))));
        out.extend(r.event(Ok(ChatEvent::Text { choice: 0, text: " a time".into(), logprobs: None })));
        out.extend(r.end());
        let events: Vec<serde_json::Value> =
            out.into_iter().map(|e| serde_json::to_value(e).unwrap()).collect();
        assert_eq!(
            types(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "error",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.failed",
            ]
        );
        let failed = &events.last().unwrap()["response"];
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["error"]["code"], "upstream_timeout");
        assert_eq!(failed["output"][0]["status"], "incomplete");
        assert_eq!(failed["output"][0]["content"][0]["text"], "Once upon");
    }

    #[test]
    fn text_then_calls_stream_as_items_in_order() {
        let events = render(vec![
            ChatEvent::Text { choice: 0, text: "Let me check.".into(), logprobs: None },
            call(0, Some("call_a"), Some("get_weather"), ""),
            call(0, None, None, "{\"city\":"),
            call(0, None, None, "\"Paris\"}"),
            call(1, Some("call_b"), Some("get_time"), "{}"),
            ChatEvent::Finish { choice: 0, reason: FinishReason::ToolCalls },
            ChatEvent::Usage(ferry_providers::Usage {
                prompt_tokens: 5,
                completion_tokens: 7,
                cached_tokens: 0,
            }),
        ]);
        assert_eq!(
            types(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let numbers: Vec<u64> = events.iter().map(|e| e["sequence_number"].as_u64().unwrap()).collect();
        assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
        let added = &events[8]["item"];
        assert_eq!(added["type"], "function_call");
        assert_eq!(
            (added["call_id"].as_str(), added["name"].as_str()),
            (Some("call_a"), Some("get_weather"))
        );
        assert_eq!((added["arguments"].as_str(), added["status"].as_str()), (Some(""), Some("in_progress")));
        assert_eq!(events[11]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(events[11]["output_index"], 1);
        let done = &events[17]["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["content"][0]["text"], "Let me check.");
        assert_eq!(done["output"][1]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(done["output"][2]["call_id"], "call_b");
        assert_eq!(done["usage"]["total_tokens"], 12);
    }

    #[test]
    fn an_empty_answer_still_has_a_message_and_length_is_incomplete() {
        let events = render(vec![ChatEvent::Finish { choice: 0, reason: FinishReason::Length }]);
        assert_eq!(types(&events)[2..4], ["response.output_item.added", "response.content_part.added"]);
        let last = events.last().unwrap();
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(last["response"]["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(last["response"]["output"][0]["status"], "incomplete");
    }

    #[test]
    fn a_whole_answer_with_calls() {
        let answer = ChatResponse {
            id: "x".into(),
            model: "m".into(),
            choices: vec![ferry_providers::Choice {
                index: 0,
                message: ferry_providers::Message {
                    role: ferry_providers::Role::Assistant,
                    content: vec![],
                    tool_calls: vec![ferry_providers::ToolCall {
                        id: String::new(),
                        name: "f".into(),
                        arguments: "{}".into(),
                    }],
                    tool_call_id: None,
                },
                finish_reason: Some(FinishReason::ToolCalls),
                logprobs: None,
            }],
            usage: Default::default(),
        };
        let value = serde_json::to_value(response(&envelope(), answer)).unwrap();
        let output = value["output"].as_array().unwrap();
        assert_eq!(output.len(), 1, "no empty message beside a call");
        assert_eq!(output[0]["type"], "function_call");
        assert!(output[0]["call_id"].as_str().unwrap().starts_with("call"), "an id is made when none came");
        assert_eq!(value["status"], "completed");
    }
}
