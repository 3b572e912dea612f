//! From the OpenAI wire request to the neutral request the gateway routes. Every field an
//! upstream could honour is carried; one it could not is refused by name.

use ferry_api::openai::{ChatCompletionRequest, MessageContent, SamplingFields};
use ferry_providers::{ChatRequest, Message, Params, Part, Role, Tool, ToolCall, ToolChoice};

use crate::error::ApiError;

pub fn from_openai_chat(
    request: &ChatCompletionRequest,
    fields: &SamplingFields,
) -> Result<ChatRequest, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid("messages", "'messages' must contain at least one message"));
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("Invalid role '{other}' in messages[{i}]"),
                ));
            }
        };
        let content = match &m.content {
            None => vec![],
            Some(MessageContent::Text(t)) => vec![Part::Text(t.clone())],
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .enumerate()
                .map(|(j, p)| match (p.kind.as_str(), &p.text, &p.image_url) {
                    ("text", Some(t), _) => Ok(Part::Text(t.clone())),
                    ("image_url", _, Some(image)) => Ok(Part::Image { url: image.url.clone() }),
                    (kind, _, _) => Err(ApiError::invalid(
                        format!("messages[{i}].content[{j}]"),
                        format!("Content part of type '{kind}' is not supported through the gateway"),
                    )),
                })
                .collect::<Result<_, _>>()?,
        };
        let tool_calls = m
            .tool_calls
            .iter()
            .flatten()
            .map(|c| ToolCall {
                id: c.id.clone(),
                name: c.function.name.clone(),
                arguments: c.function.arguments.clone(),
            })
            .collect();
        messages.push(Message { role, content, tool_calls, tool_call_id: m.tool_call_id.clone() });
    }
    let tools = request
        .tools
        .iter()
        .flatten()
        .map(|t| Tool {
            name: t.function.name.clone(),
            description: t.function.description.clone(),
            parameters: t
                .function
                .parameters
                .clone()
                .unwrap_or_else(|| serde_json::json!({"type": "object"})),
        })
        .collect();
    let tool_choice = match &request.tool_choice {
        None => None,
        Some(v) => Some(match (v.as_str(), v["function"]["name"].as_str()) {
            (Some("auto"), _) => ToolChoice::Auto,
            (Some("none"), _) => ToolChoice::None,
            (Some("required"), _) => ToolChoice::Required,
            (None, Some(name)) => ToolChoice::Function(name.to_string()),
            _ => return Err(ApiError::invalid("tool_choice", "Invalid 'tool_choice'")),
        }),
    };
    for (param, value) in [("top_k", fields.top_k.is_some()), ("min_p", fields.min_p.is_some())] {
        if value {
            return Err(ApiError::invalid(
                param,
                format!("'{param}' cannot be passed to an upstream provider"),
            ));
        }
    }
    if fields.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid("logit_bias", "'logit_bias' cannot be passed to an upstream provider"));
    }
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    if let Some(m) = max_tokens
        && m < 1
    {
        return Err(ApiError::invalid(
            "max_tokens",
            format!("Invalid 'max_tokens': {m}; it must be at least 1"),
        ));
    }
    let params = Params {
        temperature: fields.temperature,
        top_p: fields.top_p,
        max_tokens: max_tokens.map(|m| m as u64),
        stop: fields.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        seed: fields.seed,
        n: fields.n.map(|n| n.clamp(1, 128) as u32),
        presence_penalty: fields.presence_penalty,
        frequency_penalty: fields.frequency_penalty,
        logprobs: request.logprobs,
        top_logprobs: request.top_logprobs.map(|t| t.clamp(0, 20) as u32),
    };
    Ok(ChatRequest {
        model: request.model.clone(),
        messages,
        params,
        tools,
        tool_choice,
        response_format: request.response_format.clone(),
    })
}

/// From Anthropic's Messages request to the neutral request.
pub fn from_anthropic(request: &ferry_api::anthropic::MessagesRequest) -> Result<ChatRequest, ApiError> {
    use ferry_api::anthropic::{MessageContent as Content, SystemPrompt};
    if request.top_k.is_some() {
        return Err(ApiError::invalid("top_k", "top_k: cannot be passed to an upstream provider"));
    }
    if request.max_tokens < 1 {
        return Err(ApiError::invalid("max_tokens", "max_tokens: must be at least 1"));
    }
    let mut messages = Vec::new();
    match &request.system {
        Some(SystemPrompt::Text(t)) => messages.push(Message::text(Role::System, t.clone())),
        Some(SystemPrompt::Blocks(blocks)) => {
            let text: String = blocks.iter().filter_map(|b| b.text.as_deref()).collect();
            messages.push(Message::text(Role::System, text));
        }
        None => {}
    }
    for (i, m) in request.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    format!("messages.{i}.role"),
                    format!("messages.{i}.role: unexpected role '{other}'"),
                ));
            }
        };
        let blocks = match &m.content {
            Content::Text(t) => {
                messages.push(Message::text(role, t.clone()));
                continue;
            }
            Content::Blocks(blocks) => blocks,
        };
        let mut message = Message { role, content: vec![], tool_calls: vec![], tool_call_id: None };
        for (j, b) in blocks.iter().enumerate() {
            let path = format!("messages.{i}.content.{j}");
            match b.kind.as_str() {
                "text" => message.content.push(Part::Text(b.text.clone().unwrap_or_default())),
                "image" => {
                    let source = b.source.clone().unwrap_or_default();
                    let url = match source["type"].as_str() {
                        Some("base64") => format!(
                            "data:{};base64,{}",
                            source["media_type"].as_str().unwrap_or("image/png"),
                            source["data"].as_str().unwrap_or_default()
                        ),
                        Some("url") => source["url"].as_str().unwrap_or_default().to_string(),
                        _ => {
                            return Err(ApiError::invalid(
                                path.clone(),
                                format!("{path}: unsupported image source"),
                            ));
                        }
                    };
                    message.content.push(Part::Image { url });
                }
                "tool_use" => message.tool_calls.push(ToolCall {
                    id: b.id.clone().unwrap_or_default(),
                    name: b.name.clone().unwrap_or_default(),
                    arguments: b.input.clone().unwrap_or_default().to_string(),
                }),
                "tool_result" => {
                    let text = match &b.content {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(serde_json::Value::Array(parts)) => {
                            parts.iter().filter_map(|p| p["text"].as_str()).collect()
                        }
                        _ => String::new(),
                    };
                    let mut result = Message::text(Role::Tool, text);
                    result.tool_call_id = b.tool_use_id.clone();
                    messages.push(result);
                }
                other => {
                    return Err(ApiError::invalid(
                        path.clone(),
                        format!("{path}: content blocks of type '{other}' are not supported"),
                    ));
                }
            }
        }
        if !message.content.is_empty() || !message.tool_calls.is_empty() {
            messages.push(message);
        }
    }
    let tools = request
        .tools
        .iter()
        .flatten()
        .map(|t| Tool {
            name: t["name"].as_str().unwrap_or_default().to_string(),
            description: t["description"].as_str().map(str::to_string),
            parameters: t["input_schema"].clone(),
        })
        .collect();
    let tool_choice = match &request.tool_choice {
        None => None,
        Some(c) => Some(match (c["type"].as_str(), c["name"].as_str()) {
            (Some("auto"), _) => ToolChoice::Auto,
            (Some("any"), _) => ToolChoice::Required,
            (Some("none"), _) => ToolChoice::None,
            (Some("tool"), Some(name)) => ToolChoice::Function(name.to_string()),
            _ => return Err(ApiError::invalid("tool_choice", "tool_choice: invalid")),
        }),
    };
    Ok(ChatRequest {
        model: request.model.clone(),
        messages,
        params: Params {
            temperature: request.temperature,
            top_p: request.top_p,
            max_tokens: Some(request.max_tokens as u64),
            stop: request.stop_sequences.clone().unwrap_or_default(),
            ..Params::default()
        },
        tools,
        tool_choice,
        response_format: None,
    })
}
