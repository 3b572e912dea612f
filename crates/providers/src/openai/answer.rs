//! Reading what an OpenAI-compatible server answers: a plain chat or text completion, and
//! the chunks of a streamed one, into the neutral types.

use serde::Deserialize;
use serde_json::Value;

use crate::{
    ChatEvent, ChatResponse, Choice, FinishReason, Message, Part, ProviderError, Role, ToolCall, Usage,
};

/// An OpenAI chat or text completion as it comes off the wire, read into these fields
/// rather than into a `serde_json::Value` tree, whose objects are hash maps: building one was
/// the largest part of the gateway's own work on a small answer. The leaves stay JSON values,
/// so that a server sending another type than OpenAI's (a numeric id, arguments as an
/// object) still gets through; unknown fields (`reasoning_content`, `system_fingerprint`)
/// are skipped.
#[derive(Deserialize)]
pub struct WireAnswer {
    #[serde(default)]
    id: Value,
    #[serde(default)]
    model: Value,
    choices: Option<Vec<WireChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// A choice of an answer or of a streamed chunk: a chat completion has a `message` (a chunk
/// a `delta` of one), a text completion a `text`.
#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: Value,
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default)]
    delta: Option<WireMessage>,
    #[serde(default)]
    text: Value,
    #[serde(default)]
    finish_reason: Value,
    #[serde(default)]
    logprobs: Value,
}

#[derive(Deserialize, Default)]
struct WireMessage {
    #[serde(default)]
    content: Value,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
    /// Which call a streamed delta continues.
    #[serde(default)]
    index: Value,
    #[serde(default)]
    id: Value,
    #[serde(default)]
    function: Option<WireFunction>,
}

impl WireToolCall {
    /// The call's function name and its arguments as JSON text.
    fn name_and_arguments(&mut self) -> (Value, String) {
        let (name, arguments) =
            self.function.take().map_or((Value::Null, Value::Null), |f| (f.name, f.arguments));
        (name, arguments_text(arguments))
    }
}

#[derive(Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Value,
    #[serde(default)]
    arguments: Value,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Value,
    #[serde(default)]
    completion_tokens: Value,
    #[serde(default)]
    prompt_tokens_details: Option<WireTokenDetails>,
}

#[derive(Deserialize)]
struct WireTokenDetails {
    #[serde(default)]
    cached_tokens: Value,
}

/// A tool call's arguments as JSON text: some servers send them as an object instead.
fn arguments_text(arguments: Value) -> String {
    match arguments {
        Value::String(text) => text,
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn text_of(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

impl WireAnswer {
    /// The neutral answer, each choice's message made by `message`.
    fn neutral(self, message: impl Fn(WireChoice) -> Message) -> Result<ChatResponse, ProviderError> {
        let choices = self
            .choices
            .ok_or_else(|| ProviderError::Decode("the answer has no 'choices'".into()))?
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| Choice {
                index: c.index.as_u64().unwrap_or(i as u64) as u32,
                finish_reason: finish_reason(&c.finish_reason),
                logprobs: Some(c.logprobs.take()).filter(|v| !v.is_null()),
                message: message(c),
            })
            .collect();
        Ok(ChatResponse {
            id: text_of(&self.id),
            model: text_of(&self.model),
            choices,
            usage: usage(self.usage),
        })
    }
}

/// A neutral answer from a text completion: each choice's `text`, its `logprobs` object as
/// the upstream sent it.
pub fn parse_completion(answer: WireAnswer) -> Result<ChatResponse, ProviderError> {
    answer.neutral(|c| Message::text(Role::Assistant, c.text.as_str().unwrap_or_default()))
}

fn finish_reason(value: &Value) -> Option<FinishReason> {
    match value.as_str()? {
        "stop" | "end_turn" => Some(FinishReason::Stop),
        "length" => Some(FinishReason::Length),
        "tool_calls" | "function_call" => Some(FinishReason::ToolCalls),
        "content_filter" => Some(FinishReason::ContentFilter),
        _ => Some(FinishReason::Stop),
    }
}

fn usage(usage: Option<WireUsage>) -> Usage {
    let Some(usage) = usage else { return Usage::default() };
    Usage {
        prompt_tokens: usage.prompt_tokens.as_u64().unwrap_or(0),
        completion_tokens: usage.completion_tokens.as_u64().unwrap_or(0),
        cached_tokens: usage.prompt_tokens_details.and_then(|d| d.cached_tokens.as_u64()).unwrap_or(0),
    }
}

/// A neutral answer from an OpenAI chat completion.
pub fn parse_response(answer: WireAnswer) -> Result<ChatResponse, ProviderError> {
    answer.neutral(|c| {
        let m = c.message.unwrap_or_default();
        let tool_calls = m
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .map(|mut t| {
                let (name, arguments) = t.name_and_arguments();
                ToolCall { id: text_of(&t.id), name: text_of(&name), arguments }
            })
            .collect();
        Message {
            role: Role::Assistant,
            content: m.content.as_str().map(|t| vec![Part::Text(t.to_string())]).unwrap_or_default(),
            tool_calls,
            tool_call_id: None,
        }
    })
}

/// The neutral events of one streamed chunk.
pub(super) fn parse_chunk(
    message: Result<crate::sse::SseMessage, ProviderError>,
) -> Vec<Result<ChatEvent, ProviderError>> {
    let message = match message {
        Ok(m) => m,
        Err(e) => return vec![Err(e)],
    };
    // Read like a plain answer, into typed fields: a chunk arrives for every token.
    let chunk: WireChunk = match serde_json::from_str(&message.data) {
        Ok(v) => v,
        Err(e) => return vec![Err(ProviderError::Decode(format!("a stream chunk is not JSON: {e}")))],
    };
    if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
        let message = error["message"].as_str().unwrap_or("upstream error in stream").to_string();
        return vec![Err(ProviderError::Status {
            status: 500,
            message,
            code: None,
            param: None,
            retry_after: None,
        })];
    }
    let mut events = Vec::new();
    for mut c in chunk.choices.unwrap_or_default() {
        let choice = c.index.as_u64().unwrap_or(0) as u32;
        let delta = c.delta.unwrap_or_default();
        // A text completion chunk carries `text` where a chat chunk has a delta.
        if let Some(text) = delta.content.as_str().or_else(|| c.text.as_str())
            && !text.is_empty()
        {
            let logprobs = Some(c.logprobs.take()).filter(|v| !v.is_null());
            events.push(Ok(ChatEvent::Text { choice, text: text.to_string(), logprobs }));
        }
        for mut call in delta.tool_calls.unwrap_or_default() {
            let (name, arguments) = call.name_and_arguments();
            events.push(Ok(ChatEvent::ToolCall {
                choice,
                index: call.index.as_u64().unwrap_or(0) as u32,
                id: call.id.as_str().map(str::to_string),
                name: name.as_str().map(str::to_string),
                arguments,
            }));
        }
        if let Some(reason) = finish_reason(&c.finish_reason) {
            events.push(Ok(ChatEvent::Finish { choice, reason }));
        }
    }
    // Servers send `"usage": null` in every chunk but the last.
    if chunk.usage.is_object() {
        events.push(Ok(ChatEvent::Usage(usage(WireUsage::deserialize(&chunk.usage).ok()))));
    }
    events
}

/// One streamed chunk of a chat or text completion (see [`WireAnswer`]).
#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    choices: Option<Vec<WireChoice>>,
    #[serde(default)]
    usage: Value,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn text_completion_answers_and_chunks() {
        let logprobs = json!({"tokens": [" b"], "token_logprobs": [-0.5], "top_logprobs": [{" b": -0.5}], "text_offset": [1]});
        let answer = parse_completion(
            serde_json::from_value(json!({
                "id": "cmpl-1", "object": "text_completion", "model": "m",
                "choices": [{"index": 0, "text": "a b", "logprobs": logprobs, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            }))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(answer.choices[0].message.joined_text(), "a b");
        assert_eq!(answer.choices[0].finish_reason, Some(FinishReason::Length));
        assert_eq!(answer.choices[0].logprobs, Some(logprobs.clone()));
        assert_eq!(answer.usage.completion_tokens, 2);
        let chunk = crate::sse::SseMessage {
            event: None,
            data: json!({"object": "text_completion", "choices": [{"index": 1, "text": " b", "logprobs": logprobs, "finish_reason": "stop"}]})
                .to_string(),
        };
        let events: Vec<ChatEvent> = parse_chunk(Ok(chunk)).into_iter().map(Result::unwrap).collect();
        assert_eq!(
            events,
            [
                ChatEvent::Text { choice: 1, text: " b".into(), logprobs: Some(logprobs) },
                ChatEvent::Finish { choice: 1, reason: FinishReason::Stop },
            ]
        );
    }

    #[test]
    fn chat_answers_are_read_without_a_value_tree() {
        let read = |v: Value| parse_response(serde_json::from_value(v).unwrap());
        let answer = read(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "m", "system_fingerprint": "fp",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi", "reasoning_content": "think"},
                 "logprobs": null, "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": {"b": 2}}}]},
                 "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 3}},
        }))
        .unwrap();
        assert_eq!((answer.id.as_str(), answer.model.as_str()), ("chatcmpl-1", "m"));
        assert_eq!(answer.choices[0].message.joined_text(), "hi");
        assert_eq!(answer.choices[0].logprobs, None);
        let calls = &answer.choices[1].message.tool_calls;
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("f", "{\"a\":1}"));
        // Arguments sent as an object arrive as its JSON text.
        assert_eq!((calls[1].id.as_str(), calls[1].arguments.as_str()), ("call_2", "{\"b\":2}"));
        assert_eq!(answer.choices[1].finish_reason, Some(FinishReason::ToolCalls));
        assert_eq!(
            (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.cached_tokens),
            (5, 7, 3)
        );
        // A choice without a message has no content, not an empty text.
        let bare = read(json!({"choices": [{"index": 0, "finish_reason": "stop"}]})).unwrap();
        assert!(bare.choices[0].message.content.is_empty());
        // No usage is zero usage; no choices is an error that says so.
        assert_eq!(read(json!({"choices": []})).unwrap().usage, Usage::default());
        let missing = read(json!({"id": "x"})).err().unwrap();
        assert!(missing.to_string().contains("no 'choices'"), "{missing}");
    }

    #[test]
    fn chat_chunks_are_read_without_a_value_tree() {
        let read = |v: Value| -> Vec<ChatEvent> {
            let chunk = crate::sse::SseMessage { event: None, data: v.to_string() };
            parse_chunk(Ok(chunk)).into_iter().map(Result::unwrap).collect()
        };
        // vLLM sends `"usage": null` until the last chunk, and `"error": null` means none.
        let first = json!({"id": "c", "object": "chat.completion.chunk", "usage": null, "error": null,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "",
                "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                "function": {"name": "f", "arguments": ""}}]},
                "logprobs": null, "finish_reason": null}]});
        let call = crate::types::first_call_delta;
        assert_eq!(read(first), [call(Some("call_1"), Some("f"), "")]);
        let more = json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": "{\"a\":"}}]}, "finish_reason": null}]});
        assert_eq!(read(more), [call(None, None, "{\"a\":")]);
        let last = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4}});
        assert_eq!(
            read(last),
            [
                ChatEvent::Finish { choice: 0, reason: FinishReason::ToolCalls },
                ChatEvent::Usage(Usage { prompt_tokens: 3, completion_tokens: 4, cached_tokens: 0 }),
            ]
        );
        let error = crate::sse::SseMessage {
            event: None,
            data: json!({"error": {"message": "overloaded"}}).to_string(),
        };
        let refused = parse_chunk(Ok(error)).pop().unwrap().unwrap_err();
        assert!(refused.to_string().contains("overloaded"), "{refused}");
    }
}
