//! Structured output and tool calling on local models: `response_format` and
//! `tools`/`tool_choice` checked and turned into the engine's grammar and tool list, and the
//! generated text turned back into OpenAI's `tool_calls`, whole or as stream deltas. A JSON
//! format beside tools is served as OpenAI serves it (see `plan_of`).

use std::collections::HashMap;

use ferry_api::openai::{ChatCompletionRequest, FunctionCall, ResponseFormat, ToolCall};
use ferry_engine::{
    Constraint, EngineError, FreeText, Grammar, ToolCallParser, ToolMode, ToolOutput, ToolSpec, tools,
};
use ferry_providers::{ChatEvent, FinishReason};
use futures::StreamExt;

use crate::error::ApiError;
use crate::generation::{SharedModel, request_id};

/// What a chat request asks of the output beyond plain text.
#[derive(Default)]
pub struct OutputPlan {
    /// Tools offered to the model (rendered into the prompt); none with `tool_choice: none`.
    pub tools: Vec<ToolSpec>,
    /// `Some` when the model may or must call them.
    pub mode: Option<ToolMode>,
    /// The grammar the output must follow, and the parameter that asked for it.
    pub grammar: Option<(Grammar, &'static str)>,
    /// A JSON format given beside tools, compiled alone first so that a schema the compiler
    /// refuses is named by its own parameter (in `grammar` it is part of the tool grammar,
    /// or waits for a later answer under `required` or a named function).
    pub format_check: Option<(Grammar, &'static str)>,
    /// The answer is calls or the format's JSON ([`tools::tool_or_json_grammar`]).
    pub json_answer: bool,
}

impl OutputPlan {
    /// Whether the output is parsed for tool calls.
    pub fn calls_tools(&self) -> bool {
        self.mode.is_some()
    }

    /// The free text of this plan's output, the only part stop sequences end: a stop string
    /// never cuts a tool call or a JSON answer (it would leave arguments or an object that do
    /// not parse). Under `auto` that is the text before a call (`tools::OPEN`, or none when
    /// the answer opens as a call object); where the whole output follows a grammar, none.
    pub fn free_text(&self) -> Option<FreeText> {
        match (&self.grammar, &self.mode) {
            (None, _) => None,
            (Some(_), Some(ToolMode::Auto)) if !self.json_answer => {
                Some(FreeText { ends_at: tools::OPEN, unless_opening_with: Some('{') })
            }
            (Some(_), _) => Some(FreeText::NONE),
        }
    }

    /// The parser from this plan's output to text and calls.
    pub fn parser(&self) -> ToolCallParser {
        parser_of(self.json_answer.then(|| self.tools.iter().map(|t| t.name.clone()).collect()))
    }
}

/// Checks `response_format`, `tools`, `tool_choice` and `parallel_tool_calls`.
pub fn plan(request: &ChatCompletionRequest) -> Result<OutputPlan, ApiError> {
    let tools = tool_specs(request)?;
    let mode = tool_mode(request, &tools)?;
    let schema = response_schema(request.response_format.as_ref(), "response_format")?;
    let parallel = request.parallel_tool_calls.unwrap_or(true);
    plan_of(tools, mode, schema, parallel, "response_format")
}

/// The plan of checked tools, tool mode and output schema; `format_param` names the
/// request's format parameter in errors.
fn plan_of(
    tools: Vec<ToolSpec>,
    mode: Option<ToolMode>,
    schema: Option<serde_json::Value>,
    parallel: bool,
    format_param: &'static str,
) -> Result<OutputPlan, ApiError> {
    // A format beside tools, as OpenAI serves it: under `auto` the answer is calls or the
    // format's JSON; under `required` or a named function it is calls only (the format is
    // for the answer after their results); under `none` it is the format only.
    let json_answer = matches!(mode, Some(ToolMode::Auto)) && schema.is_some();
    let format_check = match (&mode, &schema) {
        (Some(_), Some(schema)) => Some((Grammar::JsonSchema(schema.clone()), format_param)),
        _ => None,
    };
    let grammar = match (&mode, schema) {
        (Some(ToolMode::Auto), Some(schema)) => {
            Some((tools::tool_or_json_grammar(&tools, &schema, parallel), "tools"))
        }
        (Some(mode), _) => Some((tools::tool_grammar(&tools, mode, parallel), "tools")),
        (None, Some(schema)) => Some((Grammar::JsonSchema(schema), format_param)),
        (None, None) => None,
    };
    // With `tool_choice: none` the tools are not offered at all: a model shown them may
    // try to call one in plain text.
    let tools = if mode.is_some() { tools } else { Vec::new() };
    Ok(OutputPlan { tools, mode, grammar, format_check, json_answer })
}

/// The plan of a request that only asks for a `response_format` (the Responses API's
/// `text.format`, mapped to chat's shape); `param` names it in errors.
pub fn format_plan(format: Option<&serde_json::Value>, param: &'static str) -> Result<OutputPlan, ApiError> {
    let grammar = response_schema(format, param)?.map(|schema| (Grammar::JsonSchema(schema), param));
    Ok(OutputPlan { grammar, ..OutputPlan::default() })
}

/// The JSON schema a `response_format` asks for; `None` for text. Errors name `param`
/// (`response_format`, or `text.format` for the Responses API) and the field within it.
fn response_schema(
    format: Option<&serde_json::Value>,
    param: &'static str,
) -> Result<Option<serde_json::Value>, ApiError> {
    // Where the Responses API keeps name and schema: directly in `text.format`.
    let field = |name: &str| {
        if param == "response_format" {
            format!("{param}.json_schema.{name}")
        } else {
            format!("{param}.{name}")
        }
    };
    let format = match format {
        None => ResponseFormat::Text,
        Some(value) => crate::validate::parse_json::<ResponseFormat>(value).map_err(|e| {
            let message = match e {
                ApiError::InvalidParameter { message, .. } | ApiError::InvalidJson(message) => message,
                other => other.to_string(),
            };
            ApiError::invalid(
                param,
                format!("Invalid '{param}': {message}; expected type text, json_object or json_schema"),
            )
        })?,
    };
    match format {
        ResponseFormat::Text => Ok(None),
        ResponseFormat::JsonObject => Ok(Some(serde_json::json!({ "type": "object" }))),
        ResponseFormat::JsonSchema { json_schema } => {
            if !crate::validate::valid_name(&json_schema.name) {
                let field = field("name");
                return Err(ApiError::invalid(
                    field.clone(),
                    format!("Invalid '{field}': use 1 to 64 letters, digits, '_' or '-'"),
                ));
            }
            match json_schema.schema {
                None => Ok(Some(serde_json::json!({}))),
                Some(schema) if schema.is_object() => Ok(Some(schema)),
                Some(_) => {
                    let field = field("schema");
                    Err(ApiError::invalid(
                        field.clone(),
                        format!("Invalid '{field}': a JSON schema is an object"),
                    ))
                }
            }
        }
    }
}

pub(crate) fn tool_specs(request: &ChatCompletionRequest) -> Result<Vec<ToolSpec>, ApiError> {
    let mut specs: Vec<ToolSpec> = Vec::new();
    for (i, tool) in request.tools.iter().flatten().enumerate() {
        if tool.kind != "function" {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                format!("Invalid 'tools[{i}].type': '{}'; only 'function' tools are supported", tool.kind),
            ));
        }
        let name = &tool.function.name;
        if !crate::validate::valid_name(name) {
            return Err(ApiError::invalid(
                format!("tools[{i}].function.name"),
                format!(
                    "Invalid 'tools[{i}].function.name': '{name}'; use 1 to 64 letters, digits, '_' or '-'"
                ),
            ));
        }
        if specs.iter().any(|s| &s.name == name) {
            return Err(ApiError::invalid(
                format!("tools[{i}].function.name"),
                format!("Duplicate function name '{name}' in 'tools'"),
            ));
        }
        let parameters = match &tool.function.parameters {
            // No parameters: the function takes none.
            None => serde_json::json!({ "type": "object", "properties": {}, "additionalProperties": false }),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("tools[{i}].function.parameters"),
                    format!("Invalid 'tools[{i}].function.parameters': a JSON schema is an object"),
                ));
            }
        };
        specs.push(ToolSpec {
            name: name.clone(),
            description: tool.function.description.clone(),
            parameters,
        });
    }
    Ok(specs)
}

fn tool_mode(request: &ChatCompletionRequest, tools: &[ToolSpec]) -> Result<Option<ToolMode>, ApiError> {
    let Some(choice) = &request.tool_choice else {
        return Ok((!tools.is_empty()).then_some(ToolMode::Auto));
    };
    let mode = match (choice.as_str(), choice["type"].as_str(), choice["function"]["name"].as_str()) {
        (Some("none"), _, _) => return Ok(None),
        (Some("auto"), _, _) => ToolMode::Auto,
        (Some("required"), _, _) => ToolMode::Required,
        (None, Some("function"), Some(name)) => {
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("Invalid 'tool_choice': function '{name}' is not in 'tools'"),
                ));
            }
            ToolMode::Named(name.to_string())
        }
        _ => {
            return Err(ApiError::invalid(
                "tool_choice",
                "Invalid 'tool_choice': expected 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            ));
        }
    };
    if tools.is_empty() {
        return Err(ApiError::invalid(
            "tool_choice",
            "'tool_choice' is only allowed when 'tools' are specified",
        ));
    }
    Ok(Some(mode))
}

/// Compiles the plan's grammar against the model's vocabulary, off the async runtime. A
/// schema or grammar the compiler cannot take is the client's mistake, named by parameter.
pub async fn compile(model: &SharedModel, plan: &OutputPlan) -> Result<Option<Constraint>, ApiError> {
    if let Some(check) = plan.format_check.clone() {
        compile_one(model, check).await?;
    }
    match plan.grammar.clone() {
        Some(grammar) => compile_one(model, grammar).await.map(Some),
        None => Ok(None),
    }
}

async fn compile_one(
    model: &SharedModel,
    (grammar, param): (Grammar, &'static str),
) -> Result<Constraint, ApiError> {
    let model = model.clone();
    let compiled = tokio::task::spawn_blocking(move || model.compile_grammar(&grammar))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    match compiled {
        Ok(constraint) => Ok(constraint),
        Err(EngineError::Grammar(message)) => Err(ApiError::invalid(
            param,
            format!("Invalid '{param}': the schema cannot be used for constrained decoding: {message}"),
        )),
        Err(other) => Err(other.into()),
    }
}

/// A whole answer's text split into content and calls (`None` content when it is only calls);
/// `cut`: it ended at its token limit.
pub fn split_calls(text: &str, mut parser: ToolCallParser, cut: bool) -> (Option<String>, Vec<ToolCall>) {
    let mut pieces = parser.push(text);
    pieces.extend(parser.finish(cut));
    let mut content = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for piece in pieces {
        match piece {
            ToolOutput::Text(t) => content.push_str(&t),
            ToolOutput::CallStart { name, .. } => calls.push(ToolCall {
                id: request_id("call"),
                kind: "function".into(),
                function: FunctionCall { name, arguments: String::new() },
            }),
            ToolOutput::Arguments { index, text } => {
                if let Some(call) = calls.get_mut(index) {
                    call.function.arguments.push_str(&text);
                }
            }
        }
    }
    let content = if calls.is_empty() || !content.trim().is_empty() { Some(content) } else { None };
    (content, calls)
}

/// Rewrites a local model's neutral events: each choice's text goes through a tool-call
/// parser, calls come out as OpenAI streams them (id, type and name first with empty
/// arguments, then argument pieces), and a choice that called tools finishes with
/// `tool_calls`.
pub fn tool_call_events(events: crate::chat::EventStream, plan: &OutputPlan) -> crate::chat::EventStream {
    let names: Option<Vec<String>> =
        plan.json_answer.then(|| plan.tools.iter().map(|t| t.name.clone()).collect());
    let new_parser = move || parser_of(names.clone());
    let mut parsers: HashMap<u32, ToolCallParser> = HashMap::new();
    events
        .flat_map(move |event| {
            let out: Vec<_> = match event {
                Ok(ChatEvent::Text { choice, text, logprobs }) => {
                    let parser = parsers.entry(choice).or_insert_with(&new_parser);
                    let mut out = render(choice, parser.push(&text));
                    // Logprobs ride on the text they belong to; calls carry none, as OpenAI's.
                    if let Some(Ok(ChatEvent::Text { logprobs: slot, .. })) = out.first_mut() {
                        *slot = logprobs;
                    }
                    out
                }
                Ok(ChatEvent::Finish { choice, reason }) => {
                    let parser = parsers.entry(choice).or_insert_with(&new_parser);
                    let mut out = render(choice, parser.finish(reason == FinishReason::Length));
                    let reason = if parser.calls() > 0 && reason == FinishReason::Stop {
                        FinishReason::ToolCalls
                    } else {
                        reason
                    };
                    out.push(Ok(ChatEvent::Finish { choice, reason }));
                    out
                }
                other => vec![other],
            };
            futures::stream::iter(out)
        })
        .boxed()
}

/// The parser of calls alone, or of calls or a JSON answer over the tools named.
fn parser_of(json_answer: Option<Vec<String>>) -> ToolCallParser {
    match json_answer {
        Some(names) => ToolCallParser::answering_json(names),
        None => ToolCallParser::default(),
    }
}

fn render(choice: u32, pieces: Vec<ToolOutput>) -> Vec<Result<ChatEvent, ferry_providers::ProviderError>> {
    pieces
        .into_iter()
        .map(|piece| {
            Ok(match piece {
                ToolOutput::Text(text) => ChatEvent::Text { choice, text, logprobs: None },
                ToolOutput::CallStart { index, name } => ChatEvent::ToolCall {
                    choice,
                    index: index as u32,
                    id: Some(request_id("call")),
                    name: Some(name),
                    arguments: String::new(),
                },
                ToolOutput::Arguments { index, text } => {
                    ChatEvent::ToolCall { choice, index: index as u32, id: None, name: None, arguments: text }
                }
            })
        })
        .collect()
}

/// How a dialect names the parameters a local run checks, and what it adds beyond the
/// neutral request.
pub struct LocalRun {
    /// Anthropic's `top_k` (outside the neutral params).
    pub top_k: Option<i64>,
    /// `max_tokens`, or the Responses API's `max_output_tokens`.
    pub max_tokens_param: &'static str,
    /// `response_format`, or the Responses API's `text.format`.
    pub format_param: &'static str,
    /// The field holding the conversation: `messages`, or the Responses API's `input`.
    pub input_param: &'static str,
    /// Consecutive turns of one role are one turn (Anthropic's rule; OpenAI keeps them).
    pub merge_turns: bool,
}

impl LocalRun {
    /// A Messages request's run (`max_tokens`, `output_config.format`).
    pub fn messages(top_k: Option<i64>) -> LocalRun {
        LocalRun {
            top_k,
            max_tokens_param: "max_tokens",
            format_param: "output_config.format",
            input_param: "messages",
            merge_turns: true,
        }
    }

    /// A Responses API request's run (`max_output_tokens`, `text.format`, `input`).
    pub fn responses() -> LocalRun {
        LocalRun {
            top_k: None,
            max_tokens_param: "max_output_tokens",
            format_param: "text.format",
            input_param: "input",
            merge_turns: false,
        }
    }
}

/// A neutral request (Anthropic's Messages with tools, translated) run on a local model:
/// the same tool grammar and parser as chat completions, answered as neutral events so the
/// dialect's own renderer writes them. `top_k` is the dialect's, outside the neutral params.
pub async fn local_tool_events(
    model: &SharedModel,
    request: ferry_providers::ChatRequest,
    top_k: Option<i64>,
) -> Result<(crate::chat::EventStream, u64), ApiError> {
    local_neutral_events(model, request, LocalRun::messages(top_k)).await
}

/// A neutral request run on a local model: its tools (with the tool grammar and the parser
/// from text to calls), its `response_format` (a JSON schema grammar), earlier calls and
/// their results in the conversation, and its sampling parameters. The answer is neutral
/// events, so each dialect's renderer writes it, and the prompt's size, which a stream's
/// first event reports before any usage arrives.
pub async fn local_neutral_events(
    model: &SharedModel,
    request: ferry_providers::ChatRequest,
    run: LocalRun,
) -> Result<(crate::chat::EventStream, u64), ApiError> {
    let (prompt, plan) = local_neutral_prompt(model, &request, &run).await?;
    let p = &request.params;
    let fields = ferry_api::openai::SamplingFields {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: run.top_k,
        stop: Some(ferry_api::openai::Stop::Many(p.stop.clone())),
        seed: p.seed,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        ..ferry_api::openai::SamplingFields::default()
    };
    let sampling = crate::validate::sampling(&fields, model)?;
    let constraint = compile(model, &plan).await?;
    let requested = request.params.max_tokens.map(|m| m as i64);
    let max_tokens =
        crate::validate::max_tokens(requested, run.max_tokens_param, run.input_param, prompt.len(), model)?;
    let prompt_tokens = prompt.len() as u64;
    let mut generate = crate::validate::generate_request(prompt, max_tokens, &sampling, None, false);
    generate.constraint = constraint;
    generate.free_text = plan.free_text();
    let submitted = crate::generation::submit(model, vec![generate])?;
    let events = crate::chat::local_events(model.clone(), submitted);
    Ok((if plan.calls_tools() { tool_call_events(events, &plan) } else { events }, prompt_tokens))
}

/// The prompt a neutral request runs on a local model (its conversation, earlier calls and
/// results included, rendered with the tools it offers) and the plan of its output. Counting
/// a request's tokens uses the same prompt.
pub async fn local_neutral_prompt(
    model: &SharedModel,
    request: &ferry_providers::ChatRequest,
    run: &LocalRun,
) -> Result<(Vec<ferry_engine::TokenId>, OutputPlan), ApiError> {
    use ferry_providers::{Part, Role, ToolChoice};
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, message) in request.messages.iter().enumerate() {
        if message.content.iter().any(|p| matches!(p, Part::Image { .. })) {
            return Err(ApiError::invalid(
                format!("messages.{i}.content"),
                "Image content is not supported by this model",
            ));
        }
        let role = match message.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let mut out = ferry_engine::ChatMessage::new(role, message.joined_text());
        out.tool_call_id = message.tool_call_id.clone();
        for call in &message.tool_calls {
            let arguments = serde_json::from_str(&call.arguments)
                .unwrap_or_else(|_| serde_json::Value::String(call.arguments.clone()));
            out.tool_calls.push(ferry_engine::TemplateToolCall {
                id: call.id.clone(),
                kind: "function",
                function: ferry_engine::TemplateFunction { name: call.name.clone(), arguments },
            });
        }
        messages.push(out);
    }
    if run.merge_turns {
        crate::messages::merge_consecutive_turns(&mut messages);
    }
    let mut tools = Vec::new();
    for (i, tool) in request.tools.iter().enumerate() {
        if !tool.parameters.is_object() {
            return Err(ApiError::invalid(
                format!("tools.{i}.input_schema"),
                format!("tools.{i}.input_schema: a JSON schema object is required"),
            ));
        }
        tools.push(ToolSpec {
            name: tool.name.clone(),
            description: tool.description.clone(),
            parameters: tool.parameters.clone(),
        });
    }
    let mode = match &request.tool_choice {
        // Without tools there is nothing to call.
        _ if tools.is_empty() => None,
        None | Some(ToolChoice::Auto) => Some(ToolMode::Auto),
        Some(ToolChoice::None) => None,
        Some(ToolChoice::Required) => Some(ToolMode::Required),
        Some(ToolChoice::Function(name)) => {
            if !tools.iter().any(|t| &t.name == name) {
                return Err(ApiError::invalid("tool_choice", format!("tool_choice: no tool named '{name}'")));
            }
            Some(ToolMode::Named(name.clone()))
        }
    };
    let schema = response_schema(request.response_format.as_ref(), run.format_param)?;
    let parallel = request.params.parallel_tool_calls.unwrap_or(true);
    let plan = plan_of(tools, mode, schema, parallel, run.format_param)?;
    let prompt = crate::generation::chat_prompt_with_tools(model, messages, plan.tools.clone()).await?;
    Ok((prompt, plan))
}

/// Collects neutral events into a whole neutral answer (one choice).
pub async fn collect_events(
    mut events: crate::chat::EventStream,
) -> Result<ferry_providers::ChatResponse, ApiError> {
    use ferry_providers::{ChatResponse, Choice, Message, Part, Role, ToolCall as NeutralCall};
    let mut text = String::new();
    let mut calls: Vec<NeutralCall> = Vec::new();
    let mut finish = None;
    let mut usage = ferry_providers::Usage::default();
    while let Some(event) = events.next().await {
        match event.map_err(ApiError::from)? {
            ChatEvent::Text { text: t, .. } => text.push_str(&t),
            ChatEvent::ToolCall { index, id, name, arguments, .. } => {
                let index = index as usize;
                if index >= calls.len() {
                    calls.resize(
                        index + 1,
                        NeutralCall { id: String::new(), name: String::new(), arguments: String::new() },
                    );
                }
                let call = &mut calls[index];
                if let Some(id) = id {
                    call.id = id;
                }
                if let Some(name) = name {
                    call.name = name;
                }
                call.arguments.push_str(&arguments);
            }
            ChatEvent::Finish { reason, .. } => finish = Some(reason),
            ChatEvent::Usage(u) => usage = u,
        }
    }
    let content = if text.is_empty() { Vec::new() } else { vec![Part::Text(text)] };
    Ok(ChatResponse {
        id: request_id("msg"),
        model: String::new(),
        choices: vec![Choice {
            index: 0,
            message: Message { role: Role::Assistant, content, tool_calls: calls, tool_call_id: None },
            finish_reason: finish,
            logprobs: None,
        }],
        usage,
    })
}
