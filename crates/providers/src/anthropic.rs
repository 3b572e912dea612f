//! Anthropic's Messages API as an upstream: `POST {base}/v1/messages`, plain and streamed.
//! System messages become `system`; tool calls become `tool_use` blocks and tool results
//! `tool_result` blocks in a user turn; images become `image` blocks.

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::sse::{SseMessage, messages};
use crate::transport::Answer;
use crate::{
    ChatEvent, ChatRequest, ChatResponse, Choice, EventStream, FinishReason, KeyHeader, Message, Part,
    Provider, ProviderError, Role, Timeouts, ToolCall, ToolChoice, Upstream, Usage,
};

const VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; used when the client set none.
const DEFAULT_MAX_TOKENS: u64 = 4096;

pub struct AnthropicProvider {
    http: Upstream,
}

impl AnthropicProvider {
    /// `base_url` without `/v1` (e.g. `https://api.anthropic.com`).
    pub fn new(base_url: &str, api_key: Option<String>, timeouts: Timeouts) -> Result<Self, ProviderError> {
        let http = Upstream::new(
            base_url,
            api_key,
            KeyHeader::Named("x-api-key"),
            &[("anthropic-version", VERSION)],
            timeouts,
        )?;
        Ok(AnthropicProvider { http })
    }

    async fn send(&self, body: Value) -> Result<Answer, ProviderError> {
        self.http.post("/v1/messages", &body).await
    }
}

impl Provider for AnthropicProvider {
    fn name(&self) -> &'static str {
        "Anthropic"
    }

    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>> {
        async move {
            let body = request_body(&request, false)?;
            let response = self.send(body).await?;
            Ok(parse_response(&self.http.json(response).await?))
        }
        .boxed()
    }

    fn chat_stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        async move {
            let body = request_body(&request, true)?;
            let response = self.send(body).await?;
            let mut state = StreamState::default();
            let events = messages(self.http.stream(response))
                .flat_map(move |m| futures::stream::iter(state.events(m)))
                .boxed();
            crate::after_first_event(events, self.http.timeouts.first_byte).await
        }
        .boxed()
    }
}

/// An image part as an Anthropic `source`: inline base64 for `data:` URIs, else a URL.
fn image_source(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((media_type, data)) = rest.split_once(";base64,")
    {
        return json!({"type": "base64", "media_type": media_type, "data": data});
    }
    json!({"type": "url", "url": url})
}

fn blocks(message: &Message) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    if message.role == Role::Tool {
        let text = message.joined_text();
        out.push(json!({"type": "tool_result", "tool_use_id": message.tool_call_id, "content": text}));
        return out;
    }
    for part in &message.content {
        match part {
            Part::Text(t) if !t.is_empty() => out.push(json!({"type": "text", "text": t})),
            Part::Text(_) => {}
            Part::Image { url, .. } => out.push(json!({"type": "image", "source": image_source(url)})),
        }
    }
    for call in &message.tool_calls {
        let input: Value = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
        out.push(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}));
    }
    out
}

/// The Messages API body of a neutral request; what Anthropic cannot express is refused.
pub fn request_body(request: &ChatRequest, stream: bool) -> Result<Value, ProviderError> {
    let p = &request.params;
    let refuse = |param: &str| Err(ProviderError::Unsupported { param: param.into(), provider: "Anthropic" });
    if p.n.is_some_and(|n| n > 1) {
        return refuse("n");
    }
    if p.presence_penalty.is_some_and(|v| v != 0.0) {
        return refuse("presence_penalty");
    }
    if p.frequency_penalty.is_some_and(|v| v != 0.0) {
        return refuse("frequency_penalty");
    }
    if p.logprobs == Some(true) {
        return refuse("logprobs");
    }
    // A JSON schema is Anthropic's structured output (`output_config.format`); JSON without
    // a schema has no equivalent.
    let output_format = match &request.response_format {
        Some(f) if f["type"] == "json_schema" && f["json_schema"]["schema"].is_object() => {
            Some(json!({"type": "json_schema", "schema": f["json_schema"]["schema"]}))
        }
        Some(f) if f["type"] != "text" => return refuse("response_format"),
        _ => None,
    };
    // Anthropic's tool definitions take `strict` (structured outputs); images have no detail.
    crate::refuse_detail_and_strict(request, "Anthropic", true)?;
    let system: Vec<String> =
        request.messages.iter().filter(|m| m.role == Role::System).map(Message::joined_text).collect();
    // Anthropic wants alternating turns: tool results join the user turn, consecutive
    // messages of one role merge.
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    for message in request.messages.iter().filter(|m| m.role != Role::System) {
        let role = if message.role == Role::Assistant { "assistant" } else { "user" };
        let content = blocks(message);
        match turns.last_mut() {
            Some((last, existing)) if last == role => existing.extend(content),
            _ => turns.push((role.to_string(), content)),
        }
    }
    let mut body = json!({
        "model": request.model,
        "max_tokens": p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "messages": turns.into_iter().map(|(role, content)| json!({"role": role, "content": content})).collect::<Vec<_>>(),
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if let Some(t) = p.temperature {
        body["temperature"] = json!(t.min(1.0));
    }
    if let Some(t) = p.top_p {
        body["top_p"] = json!(t);
    }
    if !p.stop.is_empty() {
        body["stop_sequences"] = json!(p.stop);
    }
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| {
                let mut tool =
                    json!({"name": t.name, "description": t.description, "input_schema": t.parameters});
                if let Some(strict) = t.strict {
                    tool["strict"] = json!(strict);
                }
                tool
            })
            .collect();
    }
    if let Some(choice) = &request.tool_choice {
        body["tool_choice"] = match choice {
            ToolChoice::Auto => json!({"type": "auto"}),
            ToolChoice::None => json!({"type": "none"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::Function(name) => json!({"type": "tool", "name": name}),
        };
    }
    // One call at a time is a flag of Anthropic's tool choice (`auto` when none was set).
    if p.parallel_tool_calls == Some(false) && !request.tools.is_empty() {
        if body["tool_choice"].is_null() {
            body["tool_choice"] = json!({"type": "auto"});
        }
        if body["tool_choice"]["type"] != "none" {
            body["tool_choice"]["disable_parallel_tool_use"] = json!(true);
        }
    }
    if let Some(format) = output_format {
        body["output_config"] = json!({"format": format});
    }
    if stream {
        body["stream"] = json!(true);
    }
    Ok(body)
}

/// Anthropic's `input_tokens` leaves out what its prompt cache read or wrote: the prompt is
/// all three, and the cached part is what was read.
fn prompt_usage(usage: &Value) -> (u64, u64) {
    let count = |field: &str| usage[field].as_u64().unwrap_or(0);
    let read = count("cache_read_input_tokens");
    (count("input_tokens") + read + count("cache_creation_input_tokens"), read)
}

fn finish_reason(value: &Value) -> Option<FinishReason> {
    Some(match value.as_str()? {
        "max_tokens" => FinishReason::Length,
        "tool_use" => FinishReason::ToolCalls,
        "refusal" => FinishReason::ContentFilter,
        _ => FinishReason::Stop,
    })
}

pub fn parse_response(value: &Value) -> ChatResponse {
    let mut content = Vec::new();
    let mut tool_calls = Vec::new();
    for block in value["content"].as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => content.push(Part::Text(block["text"].as_str().unwrap_or_default().to_string())),
            Some("tool_use") => tool_calls.push(ToolCall {
                id: block["id"].as_str().unwrap_or_default().to_string(),
                name: block["name"].as_str().unwrap_or_default().to_string(),
                arguments: block["input"].to_string(),
            }),
            _ => {}
        }
    }
    ChatResponse {
        id: value["id"].as_str().unwrap_or_default().to_string(),
        model: value["model"].as_str().unwrap_or_default().to_string(),
        choices: vec![Choice {
            index: 0,
            message: Message { role: Role::Assistant, content, tool_calls, tool_call_id: None },
            finish_reason: finish_reason(&value["stop_reason"]),
            logprobs: None,
        }],
        usage: {
            let (prompt_tokens, cached_tokens) = prompt_usage(&value["usage"]);
            Usage {
                prompt_tokens,
                completion_tokens: value["usage"]["output_tokens"].as_u64().unwrap_or(0),
                cached_tokens,
            }
        },
    }
}

/// Anthropic numbers content blocks; OpenAI numbers tool calls. This maps one to the other
/// and remembers the prompt tokens from `message_start` for the final usage.
#[derive(Default)]
struct StreamState {
    input_tokens: u64,
    cached_tokens: u64,
    tool_index_of_block: std::collections::HashMap<u64, u32>,
    tools_seen: u32,
}

impl StreamState {
    fn events(
        &mut self,
        message: Result<SseMessage, ProviderError>,
    ) -> Vec<Result<ChatEvent, ProviderError>> {
        let message = match message {
            Ok(m) => m,
            Err(e) => return vec![Err(e)],
        };
        // Read into typed fields, not a `Value` tree: a delta arrives for every token.
        let Ok(event) = serde_json::from_str::<WireEvent>(&message.data) else {
            return vec![Err(ProviderError::Decode("a stream event is not JSON".into()))];
        };
        let delta = event.delta.unwrap_or_default();
        match event.kind.as_str().unwrap_or_default() {
            "message_start" => {
                (self.input_tokens, self.cached_tokens) = prompt_usage(&event.message["usage"]);
                vec![]
            }
            "content_block_start" if event.content_block["type"] == "tool_use" => {
                let index = self.tools_seen;
                self.tools_seen += 1;
                self.tool_index_of_block.insert(event.index.as_u64().unwrap_or(0), index);
                let block = &event.content_block;
                vec![Ok(ChatEvent::ToolCall {
                    choice: 0,
                    index,
                    id: block["id"].as_str().map(str::to_string),
                    name: block["name"].as_str().map(str::to_string),
                    arguments: String::new(),
                })]
            }
            "content_block_delta" => match delta.kind.as_str() {
                Some("text_delta") => vec![Ok(ChatEvent::Text {
                    choice: 0,
                    text: delta.text.as_str().unwrap_or_default().to_string(),
                    logprobs: None,
                })],
                Some("input_json_delta") => {
                    let block = event.index.as_u64().unwrap_or(0);
                    let index = self.tool_index_of_block.get(&block).copied().unwrap_or(0);
                    vec![Ok(ChatEvent::ToolCall {
                        choice: 0,
                        index,
                        id: None,
                        name: None,
                        arguments: delta.partial_json.as_str().unwrap_or_default().to_string(),
                    })]
                }
                _ => vec![],
            },
            "message_delta" => {
                let mut out = Vec::new();
                if let Some(reason) = finish_reason(&delta.stop_reason) {
                    out.push(Ok(ChatEvent::Finish { choice: 0, reason }));
                }
                out.push(Ok(ChatEvent::Usage(Usage {
                    prompt_tokens: self.input_tokens,
                    completion_tokens: event.usage["output_tokens"].as_u64().unwrap_or(0),
                    cached_tokens: self.cached_tokens,
                })));
                out
            }
            "error" => vec![Err(ProviderError::Status {
                status: if event.error["type"] == "overloaded_error" { 529 } else { 500 },
                message: event.error["message"].as_str().unwrap_or("upstream error").to_string(),
                code: event.error["type"].as_str().map(str::to_string),
                param: None,
                retry_after: None,
            })],
            _ => vec![],
        }
    }
}

/// One event of a Messages stream. The per-token part (`delta`) is typed; what comes once a
/// stream or a block (`message`, `content_block`, `usage`, `error`) stays a JSON value.
#[derive(Deserialize)]
struct WireEvent {
    #[serde(default, rename = "type")]
    kind: Value,
    #[serde(default)]
    index: Value,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    message: Value,
    #[serde(default)]
    content_block: Value,
    #[serde(default)]
    usage: Value,
    #[serde(default)]
    error: Value,
}

#[derive(Deserialize, Default)]
struct WireDelta {
    #[serde(default, rename = "type")]
    kind: Value,
    #[serde(default)]
    text: Value,
    #[serde(default)]
    partial_json: Value,
    #[serde(default)]
    stop_reason: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Params;

    #[test]
    fn stream_events_become_neutral_events() {
        let mut state = StreamState::default();
        let mut read = |v: Value| -> Vec<ChatEvent> {
            let message = SseMessage { event: None, data: v.to_string() };
            state.events(Ok(message)).into_iter().map(Result::unwrap).collect()
        };
        let start = json!({"type": "message_start", "message": {"id": "msg_1", "usage":
            {"input_tokens": 10, "cache_read_input_tokens": 4, "output_tokens": 1}}});
        assert_eq!(read(start), []);
        let text =
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}});
        assert_eq!(read(text), [ChatEvent::Text { choice: 0, text: "Hi".into(), logprobs: None }]);
        let tool = json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}});
        let call = crate::types::first_call_delta;
        assert_eq!(read(tool), [call(Some("toolu_1"), Some("f"), "")]);
        let part = json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}});
        assert_eq!(read(part), [call(None, None, "{\"a\":")]);
        let end = json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}});
        assert_eq!(
            read(end),
            [
                ChatEvent::Finish { choice: 0, reason: FinishReason::ToolCalls },
                ChatEvent::Usage(Usage { prompt_tokens: 14, completion_tokens: 7, cached_tokens: 4 }),
            ]
        );
        let error = SseMessage {
            event: None,
            data: json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}})
                .to_string(),
        };
        match state.events(Ok(error)).pop().unwrap() {
            Err(ProviderError::Status { status, .. }) => assert_eq!(status, 529),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn translates_system_tools_images_and_results() {
        let request = ChatRequest {
            model: "claude".into(),
            messages: crate::types::sample_conversation(
                "what?",
                "data:image/png;base64,AAAA",
                ToolCall { id: "t1".into(), name: "f".into(), arguments: "{\"a\":1}".into() },
                "ok",
            ),
            params: Params { temperature: Some(1.5), ..Params::default() },
            tools: vec![],
            tool_choice: Some(ToolChoice::Required),
            response_format: None,
        };
        let body = request_body(&request, false).unwrap();
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(body["temperature"], 1.0);
        assert_eq!(body["messages"][0]["content"][1]["source"]["media_type"], "image/png");
        assert_eq!(body["messages"][1]["content"][0]["input"]["a"], 1);
        assert_eq!(body["messages"][2]["content"][0]["tool_use_id"], "t1");
        assert_eq!(body["tool_choice"]["type"], "any");
        let mut seeded = request.clone();
        seeded.params.n = Some(2);
        assert!(
            matches!(request_body(&seeded, false), Err(ProviderError::Unsupported { param, .. }) if param == "n")
        );
    }

    #[test]
    fn one_call_at_a_time_is_a_tool_choice_flag() {
        let mut request = ChatRequest {
            model: "claude".into(),
            messages: vec![Message::text(Role::User, "hi")],
            params: Params { parallel_tool_calls: Some(false), ..Params::default() },
            tools: vec![crate::Tool {
                name: "f".into(),
                description: None,
                parameters: json!({"type": "object"}),
                strict: None,
            }],
            tool_choice: None,
            response_format: None,
        };
        let body = request_body(&request, false).unwrap();
        assert_eq!(body["tool_choice"], json!({"type": "auto", "disable_parallel_tool_use": true}));
        request.tool_choice = Some(ToolChoice::Function("f".into()));
        let body = request_body(&request, false).unwrap();
        assert_eq!(
            body["tool_choice"],
            json!({"type": "tool", "name": "f", "disable_parallel_tool_use": true})
        );
        request.params.parallel_tool_calls = None;
        assert!(
            request_body(&request, false).unwrap()["tool_choice"].get("disable_parallel_tool_use").is_none()
        );
    }

    #[test]
    fn strict_is_sent_on_and_only_an_auto_detail_is_taken() {
        for strict in [Some(true), Some(false), None] {
            let request = crate::types::detail_and_strict_request(Some("auto"), strict);
            let body = request_body(&request, false).unwrap();
            assert_eq!(body["tools"][0].get("strict").and_then(Value::as_bool), strict);
            let image = &body["messages"][0]["content"][1];
            assert_eq!(
                image,
                &json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}})
            );
        }
        for detail in ["low", "high"] {
            let request = crate::types::detail_and_strict_request(Some(detail), None);
            match request_body(&request, false) {
                Err(ProviderError::Refused { param, message }) => {
                    assert_eq!(param, "detail");
                    assert!(message.contains("Anthropic") && message.contains(detail), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_legacy_completion_becomes_one_user_message() {
        let mut completion = crate::CompletionRequest {
            model: "claude".into(),
            prompts: vec![crate::Prompt::Text("Once upon a time".into())],
            params: Params { max_tokens: Some(16), n: Some(1), ..Params::default() },
            echo: true,
            logprobs: None,
            suffix: None,
            best_of: None,
        };
        let (chat, prompt) = crate::completion_as_chat(&completion, "Anthropic").unwrap();
        assert_eq!(prompt, "Once upon a time");
        assert_eq!(chat.messages, vec![Message::text(Role::User, "Once upon a time")]);
        assert_eq!(request_body(&chat, false).unwrap()["max_tokens"], 16);
        let refused = |c: &crate::CompletionRequest| match crate::completion_as_chat(c, "Anthropic") {
            Err(ProviderError::Refused { param, message }) => {
                assert!(message.contains("Anthropic"), "{message}");
                param
            }
            other => panic!("{other:?}"),
        };
        completion.logprobs = Some(2);
        assert_eq!(refused(&completion), "logprobs");
        completion.logprobs = None;
        completion.suffix = Some("The end.".into());
        assert_eq!(refused(&completion), "suffix");
        completion.suffix = None;
        completion.prompts.push(crate::Prompt::Text("two".into()));
        assert_eq!(refused(&completion), "prompt");
        completion.prompts = vec![crate::Prompt::Tokens(vec![1, 2])];
        assert_eq!(refused(&completion), "prompt");
        completion.prompts = vec![crate::Prompt::Text("x".into())];
        completion.best_of = Some(3);
        assert_eq!(refused(&completion), "best_of");
    }
}
