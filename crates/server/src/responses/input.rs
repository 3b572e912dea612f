//! A Responses request as the neutral request: `instructions` and `input` items (messages
//! with text and images, earlier `function_call`s and their `function_call_output`s),
//! function `tools`, `tool_choice`, `parallel_tool_calls` and `text.format`. Every path in an
//! error is the Responses API's own (`input[2].content[1]`, `tools[0].name`).

use ferry_api::openai::SamplingFields;
use ferry_api::responses::{Input, InputContent, InputItem, ResponsesRequest, TextFormat};
use ferry_providers::{ChatRequest, Message, Params, Part, Role, Tool, ToolCall, ToolChoice};

use crate::error::ApiError;

/// The neutral request of a Responses request; `fields` carries the sampling parameters (a
/// preset's `stop`, `seed` and penalties among them).
pub fn to_neutral(request: &ResponsesRequest, fields: &SamplingFields) -> Result<ChatRequest, ApiError> {
    if let Some(m) = request.max_output_tokens
        && m < 1
    {
        return Err(ApiError::invalid(
            "max_output_tokens",
            format!("Invalid 'max_output_tokens': {m}; it must be at least 1"),
        ));
    }
    let tools = tools(request)?;
    let tool_choice = tool_choice(request, &tools)?;
    let response_format = response_format(&text_format(request));
    // The same checks as a local model's, so a bad schema is refused before any upstream call.
    crate::structured::format_plan(response_format.as_ref(), "text.format")?;
    Ok(ChatRequest {
        model: request.model.clone(),
        messages: messages(request)?,
        params: Params {
            temperature: fields.temperature,
            top_p: fields.top_p,
            max_tokens: request.max_output_tokens.map(|m| m as u64),
            // Only a preset sets these here: Responses has no fields for them.
            stop: fields.stop.clone().map(ferry_api::openai::Stop::into_vec).unwrap_or_default(),
            seed: fields.seed,
            presence_penalty: fields.presence_penalty,
            frequency_penalty: fields.frequency_penalty,
            parallel_tool_calls: request.parallel_tool_calls,
            ..Params::default()
        },
        tools,
        tool_choice,
        response_format,
    })
}

/// The request's `text.format`: `text` when absent.
pub fn text_format(request: &ResponsesRequest) -> TextFormat {
    request.text.as_ref().and_then(|t| t.format.clone()).unwrap_or(TextFormat {
        kind: "text".into(),
        name: None,
        schema: None,
        strict: None,
        description: None,
    })
}

/// `text.format` as chat completions' `response_format`, the shape the local grammar and
/// every provider take.
pub fn response_format(format: &TextFormat) -> Option<serde_json::Value> {
    match format.kind.as_str() {
        "text" => None,
        "json_schema" => {
            let mut schema = serde_json::json!({
                "name": format.name.clone().unwrap_or_default(),
                "schema": format.schema,
            });
            if let Some(strict) = format.strict {
                schema["strict"] = strict.into();
            }
            if let Some(description) = &format.description {
                schema["description"] = description.clone().into();
            }
            Some(serde_json::json!({ "type": "json_schema", "json_schema": schema }))
        }
        other => Some(serde_json::json!({ "type": other })),
    }
}

/// Refuses image parts by path, for a model that reads text only.
pub fn refuse_images(request: &ResponsesRequest) -> Result<(), ApiError> {
    let Input::Items(items) = &request.input else { return Ok(()) };
    for (i, item) in items.iter().enumerate() {
        if let Some(InputContent::Parts(parts)) = &item.content
            && let Some(j) = parts.iter().position(|p| p.kind == "input_image")
        {
            return Err(ApiError::invalid(
                format!("input[{i}].content[{j}]"),
                format!(
                    "Content of type 'input_image' (input[{i}].content[{j}]) is not supported by this model: it reads text only"
                ),
            ));
        }
    }
    Ok(())
}

fn messages(request: &ResponsesRequest) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    if let Some(instructions) = &request.instructions {
        out.push(Message::text(Role::System, instructions.clone()));
    }
    match &request.input {
        Input::Text(text) => out.push(Message::text(Role::User, text.clone())),
        Input::Items(items) => {
            for (i, item) in items.iter().enumerate() {
                item_message(i, item, &mut out)?;
            }
        }
    }
    if out.iter().all(|m| m.role == Role::System) {
        return Err(ApiError::invalid("input", "'input' must contain at least one message"));
    }
    // Every call is answered by its output, as OpenAI requires.
    let answered = |id: &str| out.iter().any(|m| m.tool_call_id.as_deref() == Some(id));
    if let Some(call) = out.iter().flat_map(|m| &m.tool_calls).find(|c| !answered(&c.id)) {
        return Err(ApiError::invalid(
            "input",
            format!("No tool output found for function call {}.", call.id),
        ));
    }
    Ok(out)
}

/// Appends input item `i`: a call joins the assistant turn before it (one turn may hold
/// text and several calls, as a chat assistant message does).
fn item_message(i: usize, item: &InputItem, out: &mut Vec<Message>) -> Result<(), ApiError> {
    let required = |field: &str, value: &Option<String>| {
        value.clone().filter(|v| !v.is_empty()).ok_or_else(|| {
            ApiError::invalid(format!("input[{i}].{field}"), format!("Missing 'input[{i}].{field}'"))
        })
    };
    match item.kind.as_deref() {
        None | Some("message") => {
            let role = match item.role.as_deref() {
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some("system" | "developer") => Role::System,
                Some(other) => {
                    return Err(ApiError::invalid(
                        format!("input[{i}].role"),
                        format!(
                            "Invalid role '{other}' in input[{i}]; expected user, assistant, system or developer"
                        ),
                    ));
                }
                None => return Err(ApiError::missing(format!("input[{i}].role"))),
            };
            out.push(Message { role, content: content(i, item)?, tool_calls: vec![], tool_call_id: None });
        }
        Some("function_call") => {
            let call = ToolCall {
                id: required("call_id", &item.call_id)?,
                name: required("name", &item.name)?,
                arguments: item.arguments.clone().unwrap_or_else(|| "{}".into()),
            };
            match out.last_mut() {
                Some(last) if last.role == Role::Assistant => last.tool_calls.push(call),
                _ => out.push(Message {
                    role: Role::Assistant,
                    content: vec![],
                    tool_calls: vec![call],
                    tool_call_id: None,
                }),
            }
        }
        Some("function_call_output") => {
            let call_id = required("call_id", &item.call_id)?;
            // An output answers a call earlier in the input (a model would otherwise see a
            // result of nothing it asked for).
            if !out.iter().any(|m| m.tool_calls.iter().any(|c| c.id == call_id)) {
                return Err(ApiError::invalid(
                    format!("input[{i}].call_id"),
                    format!("No tool call found for function call output with call_id {call_id}."),
                ));
            }
            let text = match &item.output {
                Some(serde_json::Value::String(text)) => text.clone(),
                Some(serde_json::Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part["type"].as_str(), part["text"].as_str()) {
                            (Some("input_text" | "output_text"), Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("input[{i}].output[{j}]"),
                                    format!(
                                        "A function's output of type '{}' is not supported; send its result as text",
                                        kind.unwrap_or("?")
                                    ),
                                ));
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(ApiError::invalid(
                        format!("input[{i}].output"),
                        format!("'input[{i}].output' must be the function's result as a string"),
                    ));
                }
            };
            out.push(Message { tool_call_id: Some(call_id), ..Message::text(Role::Tool, text) });
        }
        Some(kind) => {
            return Err(ApiError::invalid(
                format!("input[{i}].type"),
                format!(
                    "Input items of type '{kind}' are not supported; use message, function_call or function_call_output"
                ),
            ));
        }
    }
    Ok(())
}

fn content(i: usize, item: &InputItem) -> Result<Vec<Part>, ApiError> {
    let parts = match &item.content {
        None => return Ok(vec![]),
        Some(InputContent::Text(text)) => return Ok(vec![Part::Text(text.clone())]),
        Some(InputContent::Parts(parts)) => parts,
    };
    let mut out = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let path = format!("input[{i}].content[{j}]");
        out.push(match (part.kind.as_str(), &part.text, &part.image_url) {
            ("input_text" | "output_text" | "text", Some(t), _) => Part::Text(t.clone()),
            ("input_image", _, Some(url)) if !url.is_empty() => {
                Part::Image { url: url.clone(), detail: part.detail.clone() }
            }
            ("input_image", _, _) if part.file_id.is_some() => {
                return Err(ApiError::invalid(
                    path,
                    "Images by 'file_id' are not supported (Ferry stores no files); send 'image_url' as a URL or a data: URL",
                ));
            }
            ("input_image", _, _) => {
                return Err(ApiError::invalid(format!("{path}.image_url"), "An input_image needs 'image_url'"));
            }
            (kind, _, _) => {
                return Err(ApiError::invalid(path, format!("Content of type '{kind}' is not supported")));
            }
        });
    }
    Ok(out)
}

fn tools(request: &ResponsesRequest) -> Result<Vec<Tool>, ApiError> {
    let mut out: Vec<Tool> = Vec::new();
    for (i, tool) in request.tools.iter().flatten().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                format!("Invalid 'tools[{i}].type': '{}'; only 'function' tools are supported", tool.kind),
            ));
        }
        let name = tool.name.clone().unwrap_or_default();
        if !crate::validate::valid_name(&name) {
            return Err(ApiError::invalid(
                format!("tools[{i}].name"),
                format!("Invalid 'tools[{i}].name': '{name}'; use 1 to 64 letters, digits, '_' or '-'"),
            ));
        }
        if out.iter().any(|t| t.name == name) {
            return Err(ApiError::invalid(
                format!("tools[{i}].name"),
                format!("Duplicate function name '{name}' in 'tools'"),
            ));
        }
        let parameters = match &tool.parameters {
            None => serde_json::json!({ "type": "object", "properties": {}, "additionalProperties": false }),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("tools[{i}].parameters"),
                    format!("Invalid 'tools[{i}].parameters': a JSON schema is an object"),
                ));
            }
        };
        out.push(Tool { name, description: tool.description.clone(), parameters, strict: tool.strict });
    }
    Ok(out)
}

fn tool_choice(request: &ResponsesRequest, tools: &[Tool]) -> Result<Option<ToolChoice>, ApiError> {
    let Some(choice) = &request.tool_choice else { return Ok(None) };
    let parsed = match (choice.as_str(), choice["type"].as_str(), choice["name"].as_str()) {
        (Some("none"), _, _) => ToolChoice::None,
        (Some("auto"), _, _) => ToolChoice::Auto,
        (Some("required"), _, _) => ToolChoice::Required,
        (None, Some("function"), Some(name)) => {
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("Invalid 'tool_choice': function '{name}' is not in 'tools'"),
                ));
            }
            ToolChoice::Function(name.to_string())
        }
        _ => {
            return Err(ApiError::invalid(
                "tool_choice",
                "Invalid 'tool_choice': expected 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}",
            ));
        }
    };
    if tools.is_empty() {
        // Without tools, `none` and `auto` both mean no call: nothing to pass on.
        return match parsed {
            ToolChoice::None | ToolChoice::Auto => Ok(None),
            _ => Err(ApiError::invalid(
                "tool_choice",
                "'tool_choice' is only allowed when 'tools' are specified",
            )),
        };
    }
    Ok(Some(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: serde_json::Value) -> ResponsesRequest {
        let mut body = body;
        body["model"] = "m".into();
        serde_json::from_value(body).unwrap()
    }

    fn neutral(body: serde_json::Value) -> Result<ChatRequest, ApiError> {
        to_neutral(&request(body), &SamplingFields::default())
    }

    fn param(result: Result<ChatRequest, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidParameter { param, .. }) => param,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn a_tool_round_trip_becomes_calls_and_results() {
        let got = neutral(serde_json::json!({
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": [
                    {"type": "input_text", "text": "weather?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA==", "detail": "auto"},
                ]},
                {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                 "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                 "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
                {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "call_2",
                 "output": [{"type": "input_text", "text": "noon"}]},
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}},
                      {"type": "function", "name": "get_time", "description": "Time", "strict": true}],
            "tool_choice": {"type": "function", "name": "get_time"},
            "parallel_tool_calls": false,
        }))
        .unwrap();
        let roles: Vec<Role> = got.messages.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::System, Role::User, Role::Assistant, Role::Tool, Role::Tool]);
        assert_eq!(
            got.messages[1].content[1],
            Part::Image { url: "data:image/png;base64,AA==".into(), detail: Some("auto".into()) }
        );
        let assistant = &got.messages[2];
        assert_eq!(assistant.joined_text(), "Let me look.");
        let ids: Vec<&str> = assistant.tool_calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["call_1", "call_2"]);
        assert_eq!(assistant.tool_calls[0].arguments, r#"{"city":"Paris"}"#);
        assert_eq!(got.messages[3].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(got.messages[4].joined_text(), "noon");
        assert_eq!(got.tools[1].parameters["type"], "object", "no parameters: a function of none");
        let strict: Vec<Option<bool>> = got.tools.iter().map(|t| t.strict).collect();
        assert_eq!(strict, [None, Some(true)]);
        assert_eq!(got.tool_choice, Some(ToolChoice::Function("get_time".into())));
        assert_eq!(got.params.parallel_tool_calls, Some(false));
    }

    #[test]
    fn text_format_maps_to_response_format() {
        let got = neutral(serde_json::json!({
            "input": "hi",
            "text": {"format": {"type": "json_schema", "name": "r", "strict": true,
                                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
        }))
        .unwrap();
        let format = got.response_format.unwrap();
        assert_eq!(format["type"], "json_schema");
        assert_eq!(format["json_schema"]["name"], "r");
        assert_eq!(format["json_schema"]["strict"], true);
        assert_eq!(format["json_schema"]["schema"]["properties"]["a"]["type"], "integer");
        let object = neutral(serde_json::json!({"input": "hi", "text": {"format": {"type": "json_object"}}}));
        assert_eq!(object.unwrap().response_format, Some(serde_json::json!({"type": "json_object"})));
        let text = neutral(serde_json::json!({"input": "hi", "text": {"format": {"type": "text"}}}));
        assert_eq!(text.unwrap().response_format, None);
    }

    #[test]
    fn what_cannot_be_mapped_is_named() {
        let cases = [
            (serde_json::json!({"input": [{"type": "reasoning", "summary": []}]}), "input[0].type"),
            (
                serde_json::json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
                "input[0].content[0]",
            ),
            (
                serde_json::json!({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}),
                "input[0].content[0]",
            ),
            (
                serde_json::json!({"input": [{"role": "user", "content": "hi"},
                                          {"type": "function_call", "name": "f", "arguments": "{}"}]}),
                "input[1].call_id",
            ),
            (
                serde_json::json!({"input": [{"role": "user", "content": "hi"},
                                          {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                                          {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image", "image_url": "x"}]}]}),
                "input[2].output[0]",
            ),
            (
                serde_json::json!({"input": [{"role": "user", "content": "hi"},
                                          {"type": "function_call_output", "call_id": "nobody", "output": "42"}]}),
                "input[1].call_id",
            ),
            (
                serde_json::json!({"input": [{"role": "user", "content": "hi"},
                                          {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]}),
                "input",
            ),
            (serde_json::json!({"input": "hi", "tools": [{"type": "web_search"}]}), "tools[0].type"),
            (
                serde_json::json!({"input": "hi", "tools": [{"type": "function", "name": "a b"}]}),
                "tools[0].name",
            ),
            (
                serde_json::json!({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": 3}]}),
                "tools[0].parameters",
            ),
            (
                serde_json::json!({"input": "hi", "tools": [{"type": "function", "name": "f"}],
                                "tool_choice": {"type": "function", "name": "g"}}),
                "tool_choice",
            ),
            (serde_json::json!({"input": "hi", "tool_choice": "required"}), "tool_choice"),
            (
                serde_json::json!({"input": "hi", "tools": [{"type": "function", "name": "f"}],
                                "tool_choice": {"type": "file_search"}}),
                "tool_choice",
            ),
            (
                serde_json::json!({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x y"}}}),
                "text.format.name",
            ),
            (serde_json::json!({"input": "hi", "text": {"format": {"type": "yaml"}}}), "text.format"),
            (serde_json::json!({"input": "hi", "max_output_tokens": 0}), "max_output_tokens"),
            (serde_json::json!({"input": [{"role": "system", "content": "only a system prompt"}]}), "input"),
        ];
        for (body, expected) in cases {
            assert_eq!(param(neutral(body.clone())), expected, "{body}");
        }
    }

    #[test]
    fn images_are_refused_by_path_for_text_models() {
        let with_image = request(serde_json::json!({"input": [{"role": "user", "content": [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]}));
        match refuse_images(&with_image) {
            Err(ApiError::InvalidParameter { param, .. }) => assert_eq!(param, "input[0].content[1]"),
            other => panic!("{other:?}"),
        }
        assert!(refuse_images(&request(serde_json::json!({"input": "hi"}))).is_ok());
    }
}
