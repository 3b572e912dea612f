//! `POST /v1/responses`: OpenAI's Responses API, stateless (no `previous_response_id`,
//! nothing stored), plain and streaming with its typed events, for a local model or a
//! gateway alias. Both go the neutral way: the request is translated once (`input`), a local
//! model runs it under the same grammar and tool parser as chat completions, an alias routes
//! it like any chat, and one renderer writes the answer (`output`).

mod input;
mod output;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response as HttpResponse};
use ferry_api::openai::SamplingFields;
use ferry_api::responses::ResponsesRequest;
use ferry_providers::ChatRequest;
use serde::de::IgnoredAny;

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::generation::{request_id, unix_now};
use crate::structured::LocalRun;
use crate::validate;
use output::Envelope;

/// `GET` and `DELETE /v1/responses/{id}` (and `.../input_items`): nothing is stored to find,
/// so the 404 says why instead of naming an unknown route.
pub async fn not_stored(axum::extract::Path(rest): axum::extract::Path<String>) -> ApiError {
    let id = rest.split('/').next().unwrap_or_default();
    ApiError::NotFound(format!(
        "No response found with id '{id}': Ferry's Responses API is stateless and stores no responses; \
         each answer goes only to the request that made it"
    ))
}

/// Fields a client moving from Chat Completions may send, which the Responses API spells
/// otherwise or has not: read only to refuse them by name, as OpenAI does, rather than answer
/// without them (at another length, in free text, unseeded).
#[derive(serde::Deserialize)]
struct ChatOnlyFields {
    max_tokens: Option<IgnoredAny>,
    max_completion_tokens: Option<IgnoredAny>,
    response_format: Option<IgnoredAny>,
    stop: Option<IgnoredAny>,
    n: Option<IgnoredAny>,
    seed: Option<IgnoredAny>,
    logit_bias: Option<IgnoredAny>,
    presence_penalty: Option<IgnoredAny>,
    frequency_penalty: Option<IgnoredAny>,
    top_k: Option<IgnoredAny>,
    min_p: Option<IgnoredAny>,
    repetition_penalty: Option<IgnoredAny>,
    ignore_eos: Option<IgnoredAny>,
    truncation: Option<String>,
    reasoning: Option<serde_json::Value>,
}

fn refuse_chat_only(body: &Bytes) -> Result<(), ApiError> {
    let f: ChatOnlyFields = validate::parse_json(body)?;
    let renamed = [
        ("max_tokens", f.max_tokens.is_some(), "max_output_tokens"),
        ("max_completion_tokens", f.max_completion_tokens.is_some(), "max_output_tokens"),
        ("response_format", f.response_format.is_some(), "text.format"),
    ];
    if let Some((param, _, instead)) = renamed.into_iter().find(|(_, given, _)| *given) {
        return Err(ApiError::invalid(
            param,
            format!(
                "Unsupported parameter: '{param}' is not supported with the Responses API: use '{instead}'"
            ),
        ));
    }
    let chat_only = [
        ("stop", f.stop.is_some()),
        ("n", f.n.is_some()),
        ("seed", f.seed.is_some()),
        ("logit_bias", f.logit_bias.is_some()),
        ("presence_penalty", f.presence_penalty.is_some()),
        ("frequency_penalty", f.frequency_penalty.is_some()),
        ("top_k", f.top_k.is_some()),
        ("min_p", f.min_p.is_some()),
        ("repetition_penalty", f.repetition_penalty.is_some()),
        ("ignore_eos", f.ignore_eos.is_some()),
    ];
    if let Some((param, _)) = chat_only.into_iter().find(|(_, given)| *given) {
        return Err(ApiError::invalid(
            param,
            format!("'{param}' is not a parameter of the Responses API: send it to /v1/chat/completions"),
        ));
    }
    if f.truncation.as_deref().is_some_and(|t| t != "disabled") {
        return Err(ApiError::invalid(
            "truncation",
            "Only 'truncation': 'disabled' is supported: an input over the context is refused \
             (context_length_exceeded), never cut",
        ));
    }
    if f.reasoning.as_ref().is_some_and(|r| !r.is_null() && r.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(ApiError::invalid(
            "reasoning",
            "'reasoning' is not supported: Ferry serves no reasoning models",
        ));
    }
    Ok(())
}

/// Refuses, by name, what a stateless server cannot honour.
fn refuse_unsupported(request: &ResponsesRequest) -> Result<(), ApiError> {
    if request.previous_response_id.is_some() {
        return Err(ApiError::invalid(
            "previous_response_id",
            "Ferry's Responses API is stateless: send the whole conversation as 'input' instead of 'previous_response_id'",
        ));
    }
    if request.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(ApiError::invalid(
            "conversation",
            "Ferry's Responses API is stateless and keeps no conversations: send the whole conversation as 'input'",
        ));
    }
    if request.background == Some(true) {
        return Err(ApiError::invalid(
            "background",
            "Ferry's Responses API stores no responses, so it can't run one in the background: send the request \
             without 'background' (or stream it)",
        ));
    }
    if request.prompt.as_ref().is_some_and(|p| !p.is_null()) {
        return Err(ApiError::invalid(
            "prompt",
            "Ferry keeps no stored prompts: send the prompt's text as 'instructions' and 'input'",
        ));
    }
    if let Some(format) = request.text.as_ref().and_then(|t| t.format.as_ref())
        && format.kind == "json_schema"
        && format.schema.is_none()
    {
        return Err(ApiError::missing("text.format.schema"));
    }
    let logprobs = request.include.iter().flatten().any(|i| i == "message.output_text.logprobs");
    if logprobs || request.top_logprobs.is_some_and(|n| n > 0) {
        let param = if logprobs { "include" } else { "top_logprobs" };
        return Err(ApiError::invalid(
            param,
            "Ferry's Responses API doesn't return log probabilities yet: use Chat Completions' 'logprobs' and \
             'top_logprobs'",
        ));
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/responses", tag = "OpenAI",
    summary = "Create a model response (stateless)",
    description = "Input items are messages (text, and `input_image` through gateway aliases), `function_call` \
        and `function_call_output`; function `tools` with `tool_choice` and `parallel_tool_calls`; `text.format` \
        `json_object` or `json_schema`. Calls come back as `function_call` output items, streamed with \
        `response.function_call_arguments.delta`/`.done`. What a target cannot honour is a 400 naming it.",
    request_body = ResponsesRequest,
    responses((status = 200, description = "The response; with `stream: true`, its typed events",
        content((ferry_api::responses::Response = "application/json"), (ferry_api::responses::StreamEvent = "text/event-stream")))))]
pub async fn responses(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(body, &state)?;
    let mut request: ResponsesRequest = validate::parse_json(&body)?;
    refuse_chat_only(&body)?;
    // The response names the model and repeats the instructions as the client sent them,
    // never a preset's.
    let client_model = request.model.clone();
    let client_instructions = request.instructions.clone();
    let mut fields = SamplingFields {
        temperature: request.temperature,
        top_p: request.top_p,
        ..SamplingFields::default()
    };
    if let Some(gateway) = state.gateway()
        && let Some(preset) = gateway.preset(&request.model)
    {
        fields = crate::presets::apply_responses(preset, &mut request)?;
        crate::presets::tighten_policy(&state, preset)?;
    }
    refuse_unsupported(&request)?;
    let neutral = input::to_neutral(&request, &fields)?;
    let envelope = Envelope {
        id: request_id("resp"),
        created_at: unix_now(),
        model: client_model,
        instructions: client_instructions,
        max_output_tokens: request.max_output_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        metadata: request.metadata.clone().unwrap_or_else(|| serde_json::json!({})),
        format: input::text_format(&request),
        tools: request.tools.clone().unwrap_or_default(),
        tool_choice: request.tool_choice.clone().unwrap_or_else(|| "auto".into()),
        parallel_tool_calls: request.parallel_tool_calls.unwrap_or(true),
    };
    if let Some(gateway) = state.gateway()
        && gateway.has_alias(&request.model)
    {
        let use_cache = crate::chat::cache_choice(&headers)?;
        return upstream(gateway, neutral, request.stream, envelope, use_cache).await.map_err(own_names);
    }
    input::refuse_images(&request)?;
    let model = state.model(&request.model).await?;
    let (events, _) = crate::structured::local_neutral_events(&model, neutral, LocalRun::responses()).await?;
    if request.stream {
        return Ok(output::stream(events, envelope).into_response());
    }
    let answer = crate::structured::collect_events(events).await?;
    Ok(axum::Json(output::response(&envelope, answer)).into_response())
}

#[utoipa::path(post, path = "/v1/responses/input_tokens", tag = "OpenAI",
    summary = "Count a response's input tokens",
    description = "The tokens of the prompt a `POST /v1/responses` with the same `input`, `instructions`, \
        `tools` and `text.format` would run on a local model, counted through its chat template.",
    request_body = ResponsesRequest,
    responses((status = 200, body = ferry_api::responses::InputTokens)))]
pub async fn input_tokens(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(body, &state)?;
    let mut request: ResponsesRequest = validate::parse_json(&body)?;
    let mut fields = SamplingFields::default();
    // A preset's instructions are part of the prompt it runs.
    if let Some(gateway) = state.gateway()
        && let Some(preset) = gateway.preset(&request.model)
    {
        fields = crate::presets::apply_responses(preset, &mut request)?;
    }
    refuse_unsupported(&request)?;
    if state.gateway().is_some_and(|g| g.has_alias(&request.model)) {
        return Err(ApiError::invalid(
            "model",
            format!(
                "Counting input tokens is served for local models only: '{}' is answered by an upstream provider",
                request.model
            ),
        ));
    }
    input::refuse_images(&request)?;
    let neutral = input::to_neutral(&request, &fields)?;
    let model = state.model(&request.model).await?;
    let (prompt, _) =
        crate::structured::local_neutral_prompt(&model, &neutral, &LocalRun::responses()).await?;
    let counted = ferry_api::responses::InputTokens {
        object: "response.input_tokens",
        input_tokens: prompt.len() as u64,
    };
    Ok(axum::Json(counted).into_response())
}

/// A Responses request for a gateway alias, routed like any chat.
async fn upstream(
    gateway: std::sync::Arc<ferry_gateway::Gateway>,
    neutral: ChatRequest,
    stream: bool,
    envelope: Envelope,
    use_cache: Option<bool>,
) -> Result<HttpResponse, ApiError> {
    let alias = neutral.model.clone();
    if stream {
        let routed = crate::guard::chat_stream(&gateway, &alias, neutral, use_cache).await?;
        let mut response = output::stream(routed.value, envelope).into_response();
        crate::chat::route_headers(&mut response, &routed.route);
        return Ok(response);
    }
    let routed = crate::guard::chat(&gateway, &alias, neutral, use_cache).await?;
    let mut response = axum::Json(output::response(&envelope, routed.value)).into_response();
    crate::chat::route_headers(&mut response, &routed.route);
    Ok(response)
}

/// A provider's refusal names the neutral (chat) parameter; the client sent the Responses
/// API's own.
fn own_names(error: ApiError) -> ApiError {
    let ApiError::InvalidParameter { param, message, code } = error else { return error };
    let renamed = match param.as_str() {
        "response_format" => "text.format",
        "max_tokens" => "max_output_tokens",
        _ => return ApiError::InvalidParameter { param, message, code },
    };
    ApiError::InvalidParameter { message: message.replace(&param, renamed), param: renamed.to_string(), code }
}
