//! Google's Gemini API as an upstream: `models/{model}:generateContent` and
//! `:streamGenerateContent?alt=sse`. System messages become `systemInstruction`; tool calls
//! become `functionCall` parts and tool results `functionResponse` parts; images become
//! `inlineData` (base64) or `fileData` (URL).

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

pub struct GeminiProvider {
    http: Upstream,
}

impl GeminiProvider {
    /// `base_url` before `/v1beta` (e.g. `https://generativelanguage.googleapis.com`).
    pub fn new(base_url: &str, api_key: Option<String>, timeouts: Timeouts) -> Result<Self, ProviderError> {
        let http = Upstream::new(base_url, api_key, KeyHeader::Named("x-goog-api-key"), &[], timeouts)?;
        Ok(GeminiProvider { http })
    }

    async fn send(&self, model: &str, stream: bool, body: Value) -> Result<Answer, ProviderError> {
        let method = if stream { "streamGenerateContent?alt=sse" } else { "generateContent" };
        self.http.post(&format!("/v1beta/models/{model}:{method}"), &body).await
    }
}

impl Provider for GeminiProvider {
    fn name(&self) -> &'static str {
        "Gemini"
    }

    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>> {
        async move {
            let body = request_body(&request)?;
            let response = self.send(&request.model, false, body).await?;
            Ok(parse_response(&self.http.json(response).await?, &request.model))
        }
        .boxed()
    }

    fn chat_stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        async move {
            let body = request_body(&request)?;
            let response = self.send(&request.model, true, body).await?;
            let mut calls_seen = 0u32;
            let events = messages(self.http.stream(response))
                .flat_map(move |m| futures::stream::iter(chunk_events(m, &mut calls_seen)))
                .boxed();
            crate::after_first_event(events, self.http.timeouts.first_byte).await
        }
        .boxed()
    }
}

fn part_json(part: &Part) -> Value {
    match part {
        Part::Text(t) => json!({"text": t}),
        Part::Image { url, .. } => match url.strip_prefix("data:").and_then(|r| r.split_once(";base64,")) {
            Some((mime, data)) => json!({"inlineData": {"mimeType": mime, "data": data}}),
            None => {
                let mime = match url.rsplit('.').next().map(str::to_ascii_lowercase).as_deref() {
                    Some("png") => "image/png",
                    Some("webp") => "image/webp",
                    Some("gif") => "image/gif",
                    _ => "image/jpeg",
                };
                json!({"fileData": {"mimeType": mime, "fileUri": url}})
            }
        },
    }
}

/// The `generateContent` body of a neutral request.
pub fn request_body(request: &ChatRequest) -> Result<Value, ProviderError> {
    let p = &request.params;
    crate::refuse_detail_and_strict(request, "Gemini", false)?;
    if p.top_logprobs.is_some_and(|t| t > 0) && p.logprobs != Some(true) {
        return Err(ProviderError::Unsupported { param: "top_logprobs".into(), provider: "Gemini" });
    }
    // Gemini has no switch for one call per answer.
    if p.parallel_tool_calls == Some(false) && !request.tools.is_empty() {
        return Err(ProviderError::Refused {
            param: "parallel_tool_calls".into(),
            message:
                "'parallel_tool_calls: false' cannot be served by Gemini upstreams: they have no way to \
                      limit an answer to one function call"
                    .into(),
        });
    }
    // Tool results name their function in Gemini; find it from the call's id.
    let call_names: std::collections::HashMap<&str, &str> = request
        .messages
        .iter()
        .flat_map(|m| m.tool_calls.iter().map(|c| (c.id.as_str(), c.name.as_str())))
        .collect();
    let system: Vec<Value> = request
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| json!({"text": m.joined_text()}))
        .collect();
    let mut contents: Vec<(String, Vec<Value>)> = Vec::new();
    for message in request.messages.iter().filter(|m| m.role != Role::System) {
        let (role, parts) = match message.role {
            Role::Tool => {
                let id = message.tool_call_id.as_deref().unwrap_or_default();
                let name = call_names.get(id).copied().unwrap_or(id);
                let text = message.joined_text();
                let response = serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"result": text}));
                ("user", vec![json!({"functionResponse": {"name": name, "response": response}})])
            }
            Role::Assistant => {
                let mut parts: Vec<Value> = message.content.iter().map(part_json).collect();
                parts.extend(message.tool_calls.iter().map(|c| {
                    let args: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
                    json!({"functionCall": {"name": c.name, "args": args}})
                }));
                ("model", parts)
            }
            _ => ("user", message.content.iter().map(part_json).collect()),
        };
        match contents.last_mut() {
            Some((last, existing)) if last == role => existing.extend(parts),
            _ => contents.push((role.to_string(), parts)),
        }
    }
    let mut config = serde_json::Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            config.insert(key.to_string(), v);
        }
    };
    put("temperature", p.temperature.map(|v| json!(v)));
    put("topP", p.top_p.map(|v| json!(v)));
    put("maxOutputTokens", p.max_tokens.map(|v| json!(v)));
    put("stopSequences", (!p.stop.is_empty()).then(|| json!(p.stop)));
    put("candidateCount", p.n.map(|v| json!(v)));
    put("seed", p.seed.map(|v| json!(v)));
    put("presencePenalty", p.presence_penalty.map(|v| json!(v)));
    put("frequencyPenalty", p.frequency_penalty.map(|v| json!(v)));
    put("responseLogprobs", p.logprobs.filter(|l| *l).map(|v| json!(v)));
    put("logprobs", p.top_logprobs.map(|v| json!(v)));
    if let Some(format) = &request.response_format {
        match format["type"].as_str() {
            Some("json_object") => put("responseMimeType", Some(json!("application/json"))),
            Some("json_schema") => {
                put("responseMimeType", Some(json!("application/json")));
                put("responseJsonSchema", Some(format["json_schema"]["schema"].clone()));
            }
            _ => {}
        }
    }
    let mut body = json!({
        "contents": contents.into_iter().map(|(role, parts)| json!({"role": role, "parts": parts})).collect::<Vec<_>>(),
    });
    if !system.is_empty() {
        body["systemInstruction"] = json!({"parts": system});
    }
    if !config.is_empty() {
        body["generationConfig"] = Value::Object(config);
    }
    if !request.tools.is_empty() {
        let declarations: Vec<Value> = request
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect();
        body["tools"] = json!([{"functionDeclarations": declarations}]);
    }
    if let Some(choice) = &request.tool_choice {
        body["toolConfig"] = json!({"functionCallingConfig": match choice {
            ToolChoice::Auto => json!({"mode": "AUTO"}),
            ToolChoice::None => json!({"mode": "NONE"}),
            ToolChoice::Required => json!({"mode": "ANY"}),
            ToolChoice::Function(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
        }});
    }
    Ok(body)
}

fn finish_reason(value: &Value, called: bool) -> Option<FinishReason> {
    Some(match value.as_str()? {
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => FinishReason::ContentFilter,
        _ if called => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    })
}

fn usage(value: &Value) -> Usage {
    Usage {
        prompt_tokens: value["promptTokenCount"].as_u64().unwrap_or(0),
        completion_tokens: value["candidatesTokenCount"].as_u64().unwrap_or(0),
        cached_tokens: value["cachedContentTokenCount"].as_u64().unwrap_or(0),
    }
}

pub fn parse_response(value: &Value, model: &str) -> ChatResponse {
    let choices = value["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, candidate)| {
            let mut content = Vec::new();
            let mut tool_calls = Vec::new();
            for part in candidate["content"]["parts"].as_array().into_iter().flatten() {
                if let Some(text) = part["text"].as_str() {
                    content.push(Part::Text(text.to_string()));
                } else if let Some(call) = part.get("functionCall") {
                    tool_calls.push(ToolCall {
                        id: call["id"]
                            .as_str()
                            .map_or_else(|| format!("call_{}", tool_calls.len()), str::to_string),
                        name: call["name"].as_str().unwrap_or_default().to_string(),
                        arguments: call["args"].to_string(),
                    });
                }
            }
            let finish = finish_reason(&candidate["finishReason"], !tool_calls.is_empty());
            Choice {
                index: candidate["index"].as_u64().unwrap_or(i as u64) as u32,
                message: Message { role: Role::Assistant, content, tool_calls, tool_call_id: None },
                finish_reason: finish,
                logprobs: None,
            }
        })
        .collect();
    ChatResponse {
        id: value["responseId"].as_str().unwrap_or_default().to_string(),
        model: value["modelVersion"].as_str().unwrap_or(model).to_string(),
        choices,
        usage: usage(&value["usageMetadata"]),
    }
}

/// Each streamed chunk is a partial `GenerateContentResponse`; the last carries the finish
/// reason and the usage.
fn chunk_events(
    message: Result<SseMessage, ProviderError>,
    calls_seen: &mut u32,
) -> Vec<Result<ChatEvent, ProviderError>> {
    let message = match message {
        Ok(m) => m,
        Err(e) => return vec![Err(e)],
    };
    // Read into typed fields, not a `Value` tree: a chunk arrives every few tokens.
    let Ok(chunk) = serde_json::from_str::<WireChunk>(&message.data) else {
        return vec![Err(ProviderError::Decode("a stream chunk is not JSON".into()))];
    };
    if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
        return vec![Err(ProviderError::Status {
            status: error["code"].as_u64().unwrap_or(500) as u16,
            message: error["message"].as_str().unwrap_or("upstream error").to_string(),
            code: error["status"].as_str().map(str::to_string),
            param: None,
            retry_after: None,
        })];
    }
    let mut events = Vec::new();
    let mut finished = false;
    for (i, candidate) in chunk.candidates.unwrap_or_default().into_iter().enumerate() {
        let choice = candidate.index.as_u64().unwrap_or(i as u64) as u32;
        let parts = candidate.content.and_then(|c| c.parts).unwrap_or_default();
        for part in parts {
            if let Some(text) = part.text.as_str() {
                events.push(Ok(ChatEvent::Text { choice, text: text.to_string(), logprobs: None }));
            } else if let Some(call) = part.function_call {
                let index = *calls_seen;
                *calls_seen += 1;
                events.push(Ok(ChatEvent::ToolCall {
                    choice,
                    index,
                    id: Some(call["id"].as_str().map_or_else(|| format!("call_{index}"), str::to_string)),
                    name: call["name"].as_str().map(str::to_string),
                    arguments: call["args"].to_string(),
                }));
            }
        }
        if let Some(reason) = finish_reason(&candidate.finish_reason, *calls_seen > 0) {
            events.push(Ok(ChatEvent::Finish { choice, reason }));
            finished = true;
        }
    }
    if finished && chunk.usage_metadata.is_object() {
        events.push(Ok(ChatEvent::Usage(usage(&chunk.usage_metadata))));
    }
    events
}

/// One streamed chunk: a partial `GenerateContentResponse`. Text parts are typed; a function
/// call (once per call) and the usage stay JSON values.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireChunk {
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    candidates: Option<Vec<WireCandidate>>,
    #[serde(default)]
    usage_metadata: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate {
    #[serde(default)]
    index: Value,
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default)]
    finish_reason: Value,
}

#[derive(Deserialize)]
struct WireContent {
    #[serde(default)]
    parts: Option<Vec<WirePart>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WirePart {
    #[serde(default)]
    text: Value,
    #[serde(default)]
    function_call: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Params, Tool};

    #[test]
    fn stream_chunks_become_neutral_events() {
        let mut calls_seen = 0;
        let mut read = |v: Value| -> Vec<ChatEvent> {
            let message = SseMessage { event: None, data: v.to_string() };
            chunk_events(Ok(message), &mut calls_seen).into_iter().map(Result::unwrap).collect()
        };
        let usage_so_far = json!({"promptTokenCount": 5, "candidatesTokenCount": 1, "totalTokenCount": 6});
        let text = json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi"}]}, "index": 0}],
            "usageMetadata": usage_so_far, "modelVersion": "gemini-2.5-flash"});
        assert_eq!(read(text), [ChatEvent::Text { choice: 0, text: "Hi".into(), logprobs: None }]);
        let call = json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "f", "args": {"a": 1}}}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 3, "cachedContentTokenCount": 2}});
        assert_eq!(
            read(call),
            [
                crate::types::first_call_delta(Some("call_0"), Some("f"), "{\"a\":1}"),
                ChatEvent::Finish { choice: 0, reason: FinishReason::ToolCalls },
                ChatEvent::Usage(Usage { prompt_tokens: 5, completion_tokens: 3, cached_tokens: 2 }),
            ]
        );
        let error = SseMessage {
            event: None,
            data: json!({"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}})
                .to_string(),
        };
        match chunk_events(Ok(error), &mut 0).pop().unwrap() {
            Err(ProviderError::Status { status, code, .. }) => {
                assert_eq!((status, code.as_deref()), (429, Some("RESOURCE_EXHAUSTED")))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn translates_roles_tools_and_images() {
        let request = ChatRequest {
            model: "gemini-2.5-flash".into(),
            messages: crate::types::sample_conversation(
                "see",
                "data:image/jpeg;base64,/9j/",
                ToolCall { id: "c1".into(), name: "weather".into(), arguments: "{\"city\":\"Oslo\"}".into() },
                "{\"temp\": 3}",
            ),
            params: Params { max_tokens: Some(20), stop: vec!["x".into()], ..Params::default() },
            tools: vec![Tool {
                name: "weather".into(),
                description: None,
                parameters: json!({"type": "object"}),
                strict: None,
            }],
            tool_choice: Some(ToolChoice::Function("weather".into())),
            response_format: Some(json!({"type": "json_object"})),
        };
        let body = request_body(&request).unwrap();
        assert_eq!(body["systemInstruction"]["parts"][0]["text"], "be brief");
        assert_eq!(body["contents"][0]["parts"][1]["inlineData"]["mimeType"], "image/jpeg");
        assert_eq!(body["contents"][1]["role"], "model");
        assert_eq!(body["contents"][1]["parts"][0]["functionCall"]["args"]["city"], "Oslo");
        assert_eq!(body["contents"][2]["parts"][0]["functionResponse"]["name"], "weather");
        assert_eq!(body["contents"][2]["parts"][0]["functionResponse"]["response"]["temp"], 3);
        assert_eq!(body["generationConfig"]["maxOutputTokens"], 20);
        assert_eq!(body["generationConfig"]["responseMimeType"], "application/json");
        assert_eq!(body["toolConfig"]["functionCallingConfig"]["allowedFunctionNames"][0], "weather");
    }

    #[test]
    fn json_schema_becomes_a_response_schema_and_one_call_at_a_time_is_refused() {
        let mut request = ChatRequest {
            model: "g".into(),
            messages: vec![Message::text(Role::User, "hi")],
            params: Params::default(),
            tools: vec![],
            tool_choice: None,
            response_format: Some(
                json!({"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}),
            ),
        };
        let body = request_body(&request).unwrap();
        assert_eq!(body["generationConfig"]["responseJsonSchema"], json!({"type": "object"}));
        request.params.parallel_tool_calls = Some(false);
        assert!(request_body(&request).is_ok(), "without tools there is nothing to limit");
        request.tools = vec![Tool {
            name: "f".into(),
            description: None,
            parameters: json!({"type": "object"}),
            strict: None,
        }];
        assert!(
            matches!(request_body(&request), Err(ProviderError::Refused { param, .. }) if param == "parallel_tool_calls")
        );
    }

    #[test]
    fn strict_tools_and_a_detail_other_than_auto_are_refused_by_name() {
        let body = request_body(&crate::types::detail_and_strict_request(Some("auto"), Some(false))).unwrap();
        assert_eq!(
            body["contents"][0]["parts"][1],
            json!({"inlineData": {"mimeType": "image/png", "data": "AA=="}})
        );
        assert_eq!(
            body["tools"][0]["functionDeclarations"][0],
            json!({"name": "lookup", "description": null, "parameters": {"type": "object"}})
        );
        let refused = |detail: Option<&str>, strict: Option<bool>| match request_body(
            &crate::types::detail_and_strict_request(detail, strict),
        ) {
            Err(ProviderError::Refused { param, message }) => {
                assert!(message.contains("Gemini"), "{message}");
                param
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(None, Some(true)), "strict");
        assert_eq!(refused(Some("high"), None), "detail");
    }
}
