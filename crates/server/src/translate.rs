//! From the OpenAI wire request to the neutral request the gateway routes. Every field an
//! upstream could honour is carried; one it could not is refused by name.

use ferry_api::openai::{ChatCompletionRequest, CompletionRequest, MessageContent, SamplingFields};
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
                    ("image_url", _, Some(image)) => {
                        Ok(Part::Image { url: image.url.clone(), detail: image.detail.clone() })
                    }
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
            strict: t.function.strict,
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
    refuse_engine_only(fields)?;
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
        parallel_tool_calls: request.parallel_tool_calls,
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

/// Anthropic's rule: every call of an assistant turn is answered by a `tool_result` in the
/// turn right after it (`next`, at index `i`), or the model would read calls with no outcome.
fn results_follow_calls(
    previous: &ferry_api::anthropic::Message,
    next: &ferry_api::anthropic::Message,
    i: usize,
) -> Result<(), ApiError> {
    use ferry_api::anthropic::MessageContent as Content;
    fn blocks(m: &ferry_api::anthropic::Message) -> &[ferry_api::anthropic::ContentBlock] {
        match &m.content {
            Content::Blocks(blocks) => blocks,
            Content::Text(_) => &[],
        }
    }
    if previous.role != "assistant" {
        return Ok(());
    }
    let answered: Vec<&str> = blocks(next)
        .iter()
        .filter(|b| next.role == "user" && b.kind == "tool_result")
        .filter_map(|b| b.tool_use_id.as_deref())
        .collect();
    let unanswered: Vec<&str> = blocks(previous)
        .iter()
        .filter(|b| b.kind == "tool_use")
        .filter_map(|b| b.id.as_deref())
        .filter(|id| !answered.contains(id))
        .collect();
    if unanswered.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid(
        format!("messages.{i}"),
        format!(
            "messages.{i}: tool_use ids were found without tool_result blocks immediately after: {}. Each \
             tool_use block must have a corresponding tool_result block in the next message.",
            unanswered.join(", ")
        ),
    ))
}

/// An Anthropic `tool_use` block: an assistant's call, with its id, name and object input.
fn tool_use(b: &ferry_api::anthropic::ContentBlock, role: Role, path: &str) -> Result<ToolCall, ApiError> {
    if role != Role::Assistant {
        return Err(ApiError::invalid(
            path,
            format!("{path}: tool_use blocks may only appear in assistant messages"),
        ));
    }
    let id =
        b.id.clone().filter(|id| !id.is_empty()).ok_or_else(|| ApiError::missing(format!("{path}.id")))?;
    let name =
        b.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| ApiError::missing(format!("{path}.name")))?;
    let input = match &b.input {
        Some(input @ serde_json::Value::Object(_)) => input.to_string(),
        None => return Err(ApiError::missing(format!("{path}.input"))),
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{path}.input"),
                format!("{path}.input: must be an object"),
            ));
        }
    };
    Ok(ToolCall { id, name, arguments: input })
}

/// An Anthropic `tool_result` block: the id of the earlier call it answers and its text.
/// Images and documents in a result are refused by name, never dropped: the model would
/// answer about what it never saw.
fn tool_result(
    b: &ferry_api::anthropic::ContentBlock,
    role: Role,
    path: &str,
    called: &[String],
) -> Result<(String, String), ApiError> {
    if role != Role::User {
        return Err(ApiError::invalid(
            path,
            format!("{path}: tool_result blocks may only appear in user messages"),
        ));
    }
    let id = b
        .tool_use_id
        .clone()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| ApiError::missing(format!("{path}.tool_use_id")))?;
    if !called.contains(&id) {
        return Err(ApiError::invalid(
            format!("{path}.tool_use_id"),
            format!("{path}.tool_use_id: no earlier tool_use block has the id '{id}'"),
        ));
    }
    let text = match &b.content {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(parts)) => {
            let mut text = String::new();
            for (k, part) in parts.iter().enumerate() {
                match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some("text"), None) => {
                        return Err(ApiError::missing(format!("{path}.content.{k}.text")));
                    }
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("{path}.content.{k}"),
                            format!(
                                "{path}.content.{k}: content blocks of type '{}' inside a tool_result are not supported; \
                                 only text is",
                                kind.unwrap_or("?")
                            ),
                        ));
                    }
                }
            }
            text
        }
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{path}.content"),
                format!("{path}.content: must be a string or a list of text blocks"),
            ));
        }
    };
    Ok((id, text))
}

/// The sampling extensions only Ferry's engine takes: refused by name for an upstream.
pub fn refuse_engine_only(fields: &SamplingFields) -> Result<(), ApiError> {
    let set = [
        ("top_k", fields.top_k.is_some()),
        ("min_p", fields.min_p.is_some()),
        ("repetition_penalty", fields.repetition_penalty.is_some()),
        ("ignore_eos", fields.ignore_eos.is_some()),
        ("cache_salt", fields.cache_salt.is_some()),
        ("logit_bias", fields.logit_bias.as_ref().is_some_and(|b| !b.is_empty())),
    ];
    for (param, value) in set {
        if value {
            return Err(ApiError::invalid(
                param,
                format!("'{param}' cannot be passed to an upstream provider"),
            ));
        }
    }
    Ok(())
}

/// From a legacy completion request to the neutral one. OpenAI's default of 16 tokens is
/// made explicit, so every provider answers with the same budget.
pub fn from_openai_completion(
    request: &CompletionRequest,
    fields: &SamplingFields,
) -> Result<ferry_providers::CompletionRequest, ApiError> {
    use ferry_api::openai::Prompt as Wire;
    use ferry_providers::Prompt;
    refuse_engine_only(fields)?;
    let prompts: Vec<Prompt> = match &request.prompt {
        Wire::Text(t) => vec![Prompt::Text(t.clone())],
        Wire::Texts(v) => v.iter().cloned().map(Prompt::Text).collect(),
        Wire::Tokens(ids) => vec![Prompt::Tokens(ids.clone())],
        Wire::TokenLists(lists) => lists.iter().cloned().map(Prompt::Tokens).collect(),
    };
    if prompts.is_empty() || prompts.iter().any(|p| matches!(p, Prompt::Tokens(ids) if ids.is_empty())) {
        return Err(ApiError::invalid("prompt", "'prompt' must not be empty"));
    }
    let max_tokens = request.max_tokens.unwrap_or(16);
    if max_tokens < 1 {
        return Err(ApiError::invalid(
            "max_tokens",
            format!("Invalid 'max_tokens': {max_tokens}; it must be at least 1"),
        ));
    }
    let logprobs = match request.logprobs {
        None => None,
        Some(k) if (0..=20).contains(&k) => Some(k as u32),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("Invalid 'logprobs': {k} is not between 0 and 20"),
            ));
        }
    };
    let n = fields.n.map(|n| n.clamp(1, 128) as u32);
    let best_of = match request.best_of {
        None => None,
        Some(b) if b >= i64::from(n.unwrap_or(1)) && b <= 128 => Some(b as u32),
        Some(b) => {
            return Err(ApiError::invalid(
                "best_of",
                format!("Invalid 'best_of': {b}; it must be at least 'n' and at most 128"),
            ));
        }
    };
    Ok(ferry_providers::CompletionRequest {
        model: request.model.clone(),
        prompts,
        params: Params {
            temperature: fields.temperature,
            top_p: fields.top_p,
            max_tokens: Some(max_tokens as u64),
            stop: fields.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
            seed: fields.seed,
            n,
            presence_penalty: fields.presence_penalty,
            frequency_penalty: fields.frequency_penalty,
            ..Params::default()
        },
        echo: request.echo,
        logprobs,
        suffix: request.suffix.clone(),
        best_of,
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
    // The ids of the calls made so far: a result answers one of them.
    let mut called: Vec<String> = Vec::new();
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
            // An empty final assistant turn prefills nothing.
            Content::Text(t) if t.is_empty() && role == Role::Assistant => continue,
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
                "text" => {
                    let text = b.text.clone().ok_or_else(|| ApiError::missing(format!("{path}.text")))?;
                    message.content.push(Part::Text(text));
                }
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
                    message.content.push(Part::Image { url, detail: None });
                }
                "tool_use" => {
                    let call = tool_use(b, role, &path)?;
                    called.push(call.id.clone());
                    message.tool_calls.push(call);
                }
                "tool_result" => {
                    let (id, text) = tool_result(b, role, &path, &called)?;
                    let mut result = Message::text(Role::Tool, text);
                    result.tool_call_id = Some(id);
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
    // After each block's own checks, which name the block.
    for (i, pair) in request.messages.windows(2).enumerate() {
        results_follow_calls(&pair[0], &pair[1], i + 1)?;
    }
    let tools = request
        .tools
        .iter()
        .flatten()
        .map(|t| Tool {
            name: t["name"].as_str().unwrap_or_default().to_string(),
            description: t["description"].as_str().map(str::to_string),
            parameters: t["input_schema"].clone(),
            strict: t["strict"].as_bool(),
        })
        .collect();
    let response_format = match request.output_config.as_ref().map(|c| &c["format"]) {
        None | Some(serde_json::Value::Null) => None,
        Some(format) if format["type"] == "json_schema" && format["schema"].is_object() => {
            Some(serde_json::json!({
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": format["schema"], "strict": true},
            }))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "output_config.format",
                "output_config.format: must be {\"type\": \"json_schema\", \"schema\": {...}}",
            ));
        }
    };
    // `disable_parallel_tool_use` asks for at most one call.
    let parallel_tool_calls =
        request.tool_choice.as_ref().and_then(|c| c["disable_parallel_tool_use"].as_bool()).map(|off| !off);
    let tool_choice = match &request.tool_choice {
        None => None,
        Some(c) => Some(match (c["type"].as_str(), c["name"].as_str()) {
            (Some("auto"), _) => ToolChoice::Auto,
            (Some("any"), _) => ToolChoice::Required,
            (Some("none"), _) => ToolChoice::None,
            (Some("tool"), Some(name)) => ToolChoice::Function(name.to_string()),
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice: must be {\"type\": \"auto\"}, \"any\", \"none\", or \"tool\" with a name",
                ));
            }
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
            parallel_tool_calls,
            ..Params::default()
        },
        tools,
        tool_choice,
        response_format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(body: serde_json::Value) -> Result<ferry_providers::CompletionRequest, ApiError> {
        let mut body = body;
        body["model"] = "alias".into();
        let request: CompletionRequest = serde_json::from_value(body.clone()).unwrap();
        let fields: SamplingFields = serde_json::from_value(body).unwrap();
        from_openai_completion(&request, &fields)
    }

    fn param(result: Result<ferry_providers::CompletionRequest, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidParameter { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn legacy_completions_keep_every_field_an_upstream_takes() {
        use ferry_providers::Prompt;
        let got = completion(serde_json::json!({
            "prompt": ["a", "b"], "echo": true, "logprobs": 2, "suffix": "z", "n": 2, "best_of": 3,
            "stop": "\n", "seed": 7, "temperature": 0.5, "presence_penalty": 0.1,
        }))
        .unwrap();
        assert_eq!(got.prompts, [Prompt::Text("a".into()), Prompt::Text("b".into())]);
        assert!(got.echo);
        assert_eq!((got.logprobs, got.best_of, got.params.n), (Some(2), Some(3), Some(2)));
        assert_eq!(got.suffix.as_deref(), Some("z"));
        assert_eq!(got.params.stop, ["\n"]);
        assert_eq!((got.params.seed, got.params.temperature), (Some(7), Some(0.5)));
        assert_eq!(got.params.max_tokens, Some(16), "OpenAI's default, made explicit");
        let tokens = completion(serde_json::json!({"prompt": [[1, 2], [3]], "max_tokens": 4})).unwrap();
        assert_eq!(tokens.prompts, [Prompt::Tokens(vec![1, 2]), Prompt::Tokens(vec![3])]);
        assert_eq!(tokens.params.max_tokens, Some(4));
    }

    #[test]
    fn legacy_completions_refuse_by_name() {
        let cases = [
            (serde_json::json!({"prompt": "x", "top_k": 3}), "top_k"),
            (serde_json::json!({"prompt": "x", "repetition_penalty": 1.1}), "repetition_penalty"),
            (serde_json::json!({"prompt": "x", "cache_salt": "a"}), "cache_salt"),
            (serde_json::json!({"prompt": "x", "logit_bias": {"1": 5}}), "logit_bias"),
            (serde_json::json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
            (serde_json::json!({"prompt": "x", "logprobs": 21}), "logprobs"),
            (serde_json::json!({"prompt": "x", "n": 3, "best_of": 2}), "best_of"),
            (serde_json::json!({"prompt": []}), "prompt"),
        ];
        for (body, expected) in cases {
            assert_eq!(param(completion(body.clone())), expected, "{body}");
        }
    }
}
