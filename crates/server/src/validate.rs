//! Validation: from a parsed wire request to the engine's `GenerateRequest`, checking every
//! number and naming the parameter that is wrong. Only valid requests reach the engine.

use std::collections::HashMap;

use axum::body::Bytes;
use ferry_api::openai::{ChatCompletionRequest, CompletionRequest, MessageContent, Prompt, SamplingFields};
use ferry_engine::{
    ChatMessage, GenerateRequest, LocalModel, SamplingParams, TemplateFunction, TemplateToolCall, TokenId,
};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Most choices one request may ask for (OpenAI allows 128; a local model is bounded
/// further by its parallel sequences, checked against the model).
const MAX_N: i64 = 128;

/// `n` (default 1) between 1 and 128, as OpenAI takes it; a local model may take fewer.
pub fn n_in_range(n: Option<i64>) -> Result<i64, ApiError> {
    let n = n.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::invalid("n", format!("Invalid 'n': {n} is not between 1 and {MAX_N}")));
    }
    Ok(n)
}

/// OpenAI's and Anthropic's rule for a function's, a tool's or a schema's name: 1 to 64
/// ASCII letters, digits, `_` or `-`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A `tool` message answers a call an earlier assistant message made, by its id: OpenAI
/// refuses one without, and a model would otherwise read a result of nothing it asked for.
pub fn tool_results_answer_calls(messages: &[ferry_api::openai::ChatMessage]) -> Result<(), ApiError> {
    for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "tool") {
        let Some(id) = m.tool_call_id.as_deref().filter(|id| !id.is_empty()) else {
            return Err(ApiError::missing(format!("messages[{i}].tool_call_id")));
        };
        let called = messages[..i].iter().any(|earlier| {
            earlier.role == "assistant" && earlier.tool_calls.iter().flatten().any(|c| c.id == id)
        });
        if !called {
            return Err(ApiError::invalid(
                format!("messages[{i}].tool_call_id"),
                format!(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceding message with 'tool_calls'; no call has the id '{id}'"
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses the legacy `functions`/`function_call`, audio output (`audio`, `modalities` other
/// than text) and `reasoning_effort`, which a model would otherwise silently answer without.
pub fn refuse_unserved_chat_fields(fields: &ChatCompletionRequest) -> Result<(), ApiError> {
    for (param, given) in
        [("functions", fields.functions.is_some()), ("function_call", fields.function_call.is_some())]
    {
        if given {
            return Err(ApiError::invalid(
                param,
                format!(
                    "'{param}' (deprecated by OpenAI) is not supported: send the functions as 'tools' and choose \
                     one with 'tool_choice'"
                ),
            ));
        }
    }
    if fields.modalities.iter().flatten().any(|m| m != "text") {
        return Err(ApiError::invalid(
            "modalities",
            "Only text output is supported: 'modalities' may only be [\"text\"]",
        ));
    }
    if fields.audio.is_some() {
        return Err(ApiError::invalid("audio", "Audio output is not supported by this server"));
    }
    // As OpenAI answers for a model that does not reason.
    if fields.reasoning_effort.is_some() {
        return Err(ApiError::invalid(
            "reasoning_effort",
            "Unsupported parameter: 'reasoning_effort' is not supported with this model",
        ));
    }
    Ok(())
}

/// OpenAI refuses `stream_options` on a request that does not stream (it would be dropped).
pub fn stream_options_need_stream(stream_options: bool, stream: bool) -> Result<(), ApiError> {
    if stream_options && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        ));
    }
    Ok(())
}

const MAX_STOP: usize = 16;
const MAX_TOP_LOGPROBS: i64 = 20;

/// Query parameters, refused in OpenAI's error shape (axum's own `Query` answers plain text).
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::invalid("query", e.body_text()))
    }
}

/// What `parse_json` reads from: a request body's bytes, or a part of a body already parsed.
/// A body's typed parts are read straight from its bytes, not through a `serde_json::Value`
/// first: building that tree of maps cost more than both typed reads of a chat request.
pub trait JsonSource {
    /// Deserializes `T`; an error comes with the path of the field it is about (`.` for
    /// the whole).
    fn read<T: DeserializeOwned>(&self) -> Result<T, (String, serde_json::Error)>;
    /// The syntax error of a source that is not JSON at all, if it is not.
    fn syntax_error(&self) -> Option<String>;
}

impl JsonSource for Bytes {
    fn read<T: DeserializeOwned>(&self) -> Result<T, (String, serde_json::Error)> {
        // Tracking the path costs more than the read itself, so it is done again only to
        // name what failed.
        serde_json::from_slice(self).map_err(|plain| {
            let mut de = serde_json::Deserializer::from_slice(self);
            match serde_path_to_error::deserialize::<_, T>(&mut de) {
                Err(e) => split(e),
                Ok(_) => (".".to_string(), plain),
            }
        })
    }

    fn syntax_error(&self) -> Option<String> {
        serde_json::from_slice::<serde::de::IgnoredAny>(self).err().map(|e| e.to_string())
    }
}

impl JsonSource for serde_json::Value {
    fn read<T: DeserializeOwned>(&self) -> Result<T, (String, serde_json::Error)> {
        T::deserialize(self).map_err(|plain| match serde_path_to_error::deserialize::<_, T>(self) {
            Err(e) => split(e),
            Ok(_) => (".".to_string(), plain),
        })
    }

    fn syntax_error(&self) -> Option<String> {
        None
    }
}

fn split(e: serde_path_to_error::Error<serde_json::Error>) -> (String, serde_json::Error) {
    (e.path().to_string(), e.into_inner())
}

/// Reads a typed request (or a part of one) from a body, naming the field whose type is
/// wrong. A body that is not JSON at all is refused as such, wherever its first error is.
pub fn parse_json<T: DeserializeOwned>(body: &impl JsonSource) -> Result<T, ApiError> {
    body.read().map_err(|(path, inner)| {
        if !inner.is_data() {
            return ApiError::InvalidJson(inner.to_string());
        }
        // A wrong field's type may come before a syntax error further on.
        if let Some(syntax) = body.syntax_error() {
            return ApiError::InvalidJson(syntax);
        }
        let message = inner.to_string();
        // serde reports a missing field at its parent's path; name the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(|field| if path == "." { field.to_string() } else { format!("{path}.{field}") });
        match missing {
            Some(param) => ApiError::missing(param),
            None if path != "." => wrong_field(path, &message),
            None => ApiError::InvalidJson(message),
        }
    })
}

/// serde's account of a field's bad type or value, in OpenAI's words: `invalid type:
/// string "hi", expected a sequence at line 1 column 53` becomes `Invalid type for
/// 'messages': expected an array, but got string "hi" instead.` (code `invalid_type`).
fn wrong_field(path: String, serde_message: &str) -> ApiError {
    // The position is of the body's bytes, which the field's path already names better.
    let message = match serde_message.rfind(" at line ") {
        Some(at) if serde_message[at..].contains(" column ") => &serde_message[..at],
        _ => serde_message,
    };
    // A field of several forms (serde's untagged enums) says which forms it takes.
    if let Some(form) = message.strip_prefix("data did not match any variant of untagged enum ") {
        let expected = match form.trim() {
            "Stop" => "a string or an array of strings",
            "MessageContent" | "InputContent" => "a string or an array of content parts",
            "SystemPrompt" => "a string or an array of text blocks",
            "Prompt" => "a string, an array of strings, an array of token ids or an array of such arrays",
            "Input" => "a string or an array of input items",
            _ => "one of the forms it takes (see the API reference)",
        };
        let message = format!("Invalid value for '{path}': expected {expected}.");
        return ApiError::InvalidParameter { param: path, message, code: "invalid_type" };
    }
    let Some((got, expected)) =
        message.strip_prefix("invalid type: ").and_then(|rest| rest.split_once(", expected "))
    else {
        return ApiError::invalid(path.clone(), format!("Invalid value for '{path}': {message}."));
    };
    let expected = match expected {
        "a sequence" => "an array",
        "a map" => "an object",
        e if e.starts_with("struct ") || e.starts_with("internally tagged enum") => "an object",
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" | "isize" => "an integer",
        "f32" | "f64" => "a number",
        "a boolean" => "a boolean",
        e => e,
    };
    let got = got.replace("map", "object").replace("sequence", "array");
    let message = format!("Invalid type for '{path}': expected {expected}, but got {got} instead.");
    ApiError::InvalidParameter { param: path, message, code: "invalid_type" }
}

/// The sampling part of a request, checked.
pub struct ValidSampling {
    pub params: SamplingParams,
    pub n: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// The engine's prefix-cache scope: the tenant's, salted by `cache_salt`.
    pub cache_scope: u64,
}

fn check_range(param: &str, value: Option<f64>, min: f64, max: f64) -> Result<(), ApiError> {
    match value {
        Some(v) if !(min..=max).contains(&v) || v.is_nan() => {
            Err(ApiError::invalid(param, format!("Invalid '{param}': {v} is not between {min} and {max}")))
        }
        _ => Ok(()),
    }
}

/// The request's sampling fields, with the model's configured defaults where it sets none.
fn with_defaults(fields: &SamplingFields, model: &LocalModel) -> SamplingFields {
    let d = &model.defaults;
    let mut fields = fields.clone();
    fields.temperature = fields.temperature.or(d.temperature);
    fields.top_p = fields.top_p.or(d.top_p);
    fields.top_k = fields.top_k.or(d.top_k);
    fields.min_p = fields.min_p.or(d.min_p);
    fields.repetition_penalty = fields.repetition_penalty.or(d.repetition_penalty);
    fields.presence_penalty = fields.presence_penalty.or(d.presence_penalty);
    fields.frequency_penalty = fields.frequency_penalty.or(d.frequency_penalty);
    fields.seed = fields.seed.or(d.seed);
    if fields.stop.is_none() {
        fields.stop = d.stop.clone().map(ferry_api::openai::Stop::Many);
    }
    fields
}

pub fn sampling(fields: &SamplingFields, model: &LocalModel) -> Result<ValidSampling, ApiError> {
    let fields = &with_defaults(fields, model);
    check_range("temperature", fields.temperature, 0.0, 2.0)?;
    check_range("top_p", fields.top_p, 0.0, 1.0)?;
    check_range("min_p", fields.min_p, 0.0, 1.0)?;
    check_range("presence_penalty", fields.presence_penalty, -2.0, 2.0)?;
    check_range("frequency_penalty", fields.frequency_penalty, -2.0, 2.0)?;
    check_range("repetition_penalty", fields.repetition_penalty, 0.01, 10.0)?;
    if fields.cache_salt.as_deref().is_some_and(str::is_empty) {
        return Err(ApiError::invalid("cache_salt", "'cache_salt' must be a non-empty string"));
    }
    let top_k = match fields.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("Invalid 'top_k': {k}; use -1 or 0 for no limit, or a positive number"),
            ));
        }
    };
    let n = n_in_range(fields.n)?;
    let parallel = model.scheduler.config().session.n_sequences;
    if n as usize > parallel {
        return Err(ApiError::invalid(
            "n",
            format!("Invalid 'n': {n} is more than this model's {parallel} parallel sequences"),
        ));
    }
    let n_vocab = model.info().n_vocab;
    let mut logit_bias = HashMap::new();
    for (key, &bias) in fields.logit_bias.iter().flatten() {
        let token: TokenId =
            key.parse().ok().filter(|&t: &TokenId| (t as usize) < n_vocab).ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("Invalid 'logit_bias': '{key}' is not a token id of this model (0..{n_vocab})"),
                )
            })?;
        if !(-100.0..=100.0).contains(&bias) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("Invalid 'logit_bias': {bias} for token {key} is not between -100 and 100"),
            ));
        }
        logit_bias.insert(token, bias as f32);
    }
    let stop = fields.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid("stop", format!("Invalid 'stop': at most {MAX_STOP} sequences")));
    }
    let defaults = SamplingParams::default();
    Ok(ValidSampling {
        params: SamplingParams {
            temperature: fields.temperature.map_or(defaults.temperature, |t| t as f32),
            top_p: fields.top_p.map_or(defaults.top_p, |p| p as f32),
            top_k,
            min_p: fields.min_p.map_or(defaults.min_p, |p| p as f32),
            presence_penalty: fields.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: fields.frequency_penalty.unwrap_or(0.0) as f32,
            repetition_penalty: fields.repetition_penalty.unwrap_or(1.0) as f32,
            logit_bias,
            seed: fields.seed.map(|s| s as u64),
        },
        n: n as usize,
        stop,
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        cache_scope: crate::tenancy::cache_scope(fields.cache_salt.as_deref()),
    })
}

/// Checks `max_tokens` (named `param`) against the context and gives the completion budget;
/// a context-length error names `input`, the field holding the prompt.
pub fn max_tokens(
    requested: Option<i64>,
    param: &str,
    input: &'static str,
    prompt_len: usize,
    model: &LocalModel,
) -> Result<usize, ApiError> {
    let ctx = model.scheduler.config().session.ctx_per_sequence;
    if let Some(m) = requested
        && m < 1
    {
        return Err(ApiError::invalid(param, format!("Invalid '{param}': {m}; it must be at least 1")));
    }
    let completion = requested.map(|m| m as usize);
    let needed = prompt_len + completion.unwrap_or(1);
    if prompt_len == 0 {
        return Err(ApiError::invalid("prompt", "The prompt is empty"));
    }
    if needed > ctx {
        return Err(ApiError::ContextLengthExceeded {
            limit: ctx,
            requested: needed,
            prompt: prompt_len,
            completion: completion.unwrap_or(1),
            input,
        });
    }
    // The model's configured default, where the request names none, within what is left.
    let rest = ctx - prompt_len;
    let default = model.defaults.max_tokens.and_then(|m| usize::try_from(m).ok()).filter(|&m| m > 0);
    Ok(completion.unwrap_or_else(|| default.map_or(rest, |m| m.min(rest))))
}

/// The conversation of a chat request in the template's terms.
pub fn chat_messages(request: &ChatCompletionRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid("messages", "'messages' must contain at least one message"));
    }
    request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!("Invalid role '{other}' in messages[{i}]; expected one of system, developer, user, assistant, tool"),
                    ));
                }
            };
            let content = match &m.content {
                // Only an assistant turn (one that called tools) may come without content.
                None if role != "assistant" => return Err(ApiError::missing(format!("messages[{i}].content"))),
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]"),
                                    format!("Content part of type '{kind}' is not supported by this model; only text parts are"),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            let mut message = ChatMessage::new(role.to_string(), content);
            message.tool_call_id = m.tool_call_id.clone();
            for call in m.tool_calls.iter().flatten() {
                // Templates write arguments with `tojson`: give them the value, not its text.
                let arguments = serde_json::from_str(&call.function.arguments)
                    .unwrap_or_else(|_| serde_json::Value::String(call.function.arguments.clone()));
                message.tool_calls.push(TemplateToolCall {
                    id: call.id.clone(),
                    kind: "function",
                    function: TemplateFunction { name: call.function.name.clone(), arguments },
                });
            }
            Ok(message)
        })
        .collect()
}

/// Logprob settings of a chat request: `Some(top)` when logprobs are on.
pub fn chat_logprobs(request: &ChatCompletionRequest) -> Result<Option<usize>, ApiError> {
    let top = request.top_logprobs.unwrap_or(0);
    if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
        return Err(ApiError::invalid(
            "top_logprobs",
            format!("Invalid 'top_logprobs': {top} is not between 0 and {MAX_TOP_LOGPROBS}"),
        ));
    }
    match (request.logprobs.unwrap_or(false), request.top_logprobs) {
        (true, _) => Ok(Some(top as usize)),
        (false, Some(t)) if t > 0 => {
            Err(ApiError::invalid("top_logprobs", "'top_logprobs' requires 'logprobs' to be true"))
        }
        (false, _) => Ok(None),
    }
}

/// The prompts of a completions request, tokenized (a list of strings or of token lists
/// is several prompts).
pub fn completion_prompts(
    request: &CompletionRequest,
    model: &LocalModel,
) -> Result<Vec<Vec<TokenId>>, ApiError> {
    let n_vocab = model.info().n_vocab as i64;
    let check_tokens = |tokens: &[i64]| -> Result<Vec<TokenId>, ApiError> {
        tokens
            .iter()
            .map(|&t| {
                if (0..n_vocab).contains(&t) {
                    Ok(t as TokenId)
                } else {
                    Err(ApiError::invalid(
                        "prompt",
                        format!("Invalid token id {t} in 'prompt' (the vocabulary has {n_vocab})"),
                    ))
                }
            })
            .collect()
    };
    let prompts = match &request.prompt {
        Prompt::Text(t) => vec![model.backend.tokenize(t, true)],
        Prompt::Texts(ts) => ts.iter().map(|t| model.backend.tokenize(t, true)).collect(),
        Prompt::Tokens(ids) => vec![check_tokens(ids)?],
        Prompt::TokenLists(lists) => lists.iter().map(|l| check_tokens(l)).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "'prompt' must not be an empty list"));
    }
    if prompts.len() > 16 {
        return Err(ApiError::invalid("prompt", "At most 16 prompts per request"));
    }
    Ok(prompts)
}

/// Assembles the engine request once every part is checked.
pub fn generate_request(
    prompt: Vec<TokenId>,
    max_tokens: usize,
    sampling: &ValidSampling,
    logprobs: Option<usize>,
    prompt_logprobs: bool,
) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens,
        n: sampling.n,
        sampling: sampling.params.clone(),
        stop: sampling.stop.clone(),
        free_text: None,
        logprobs,
        prompt_logprobs,
        ignore_eos: sampling.ignore_eos,
        constraint: None,
        sampled: None,
        cache_scope: sampling.cache_scope,
    }
}
