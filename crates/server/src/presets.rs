//! Presets: virtual models. A request naming a preset becomes a request to its base model
//! (local or alias) with the preset's system prompt first, its defaults where the client
//! set nothing, and its locked parameters enforced (a client asking otherwise gets a 400
//! naming the parameter).

use ferry_api::anthropic::{ContentBlock, MessagesRequest, SystemPrompt};
use ferry_api::openai::{ChatCompletionRequest, ChatMessage, MessageContent, SamplingFields, Stop};
use ferry_api::responses::ResponsesRequest;
use ferry_gateway::{PresetConfig, PresetParams};

use crate::error::ApiError;

pub fn apply(
    preset: &PresetConfig,
    request: &mut ChatCompletionRequest,
    fields: &mut SamplingFields,
) -> Result<(), ApiError> {
    request.model = preset.base.clone();
    if let Some(system) = &preset.system_prompt {
        // One system message: templates often allow no second one.
        match request.messages.first_mut() {
            Some(first) if first.role == "system" || first.role == "developer" => {
                let client = match &first.content {
                    Some(MessageContent::Text(t)) => t.clone(),
                    _ => String::new(),
                };
                let merged = if client.is_empty() { system.clone() } else { format!("{system}\n\n{client}") };
                first.content = Some(MessageContent::Text(merged));
            }
            _ => request.messages.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: Some(MessageContent::Text(system.clone())),
                    name: None,
                    tool_calls: None,
                    tool_call_id: None,
                },
            ),
        }
    }
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let mut max_tokens_slot = max_tokens;
    apply_params(&preset.name, &preset.locked, fields, &mut max_tokens_slot, true)?;
    apply_params(&preset.name, &preset.defaults, fields, &mut max_tokens_slot, false)?;
    if max_tokens_slot != max_tokens {
        request.max_tokens = max_tokens_slot;
        request.max_completion_tokens = None;
    }
    Ok(())
}

/// A preset named in Anthropic's Messages dialect: its system prompt before the client's, and
/// its parameters where Messages has them (`temperature`, `top_p`, `stop_sequences`,
/// `max_tokens`, which that dialect always sets). Penalties and `seed` have no field there.
pub fn apply_messages(preset: &PresetConfig, request: &mut MessagesRequest) -> Result<(), ApiError> {
    request.model = preset.base.clone();
    if let Some(system) = &preset.system_prompt {
        request.system = Some(match request.system.take() {
            Some(SystemPrompt::Text(client)) if !client.is_empty() => {
                SystemPrompt::Text(format!("{system}\n\n{client}"))
            }
            Some(SystemPrompt::Blocks(mut blocks)) if !blocks.is_empty() => {
                // Blocks are joined as they are: the separator is the preset's, as above.
                blocks.insert(0, text_block(&format!("{system}\n\n")));
                SystemPrompt::Blocks(blocks)
            }
            _ => SystemPrompt::Text(system.clone()),
        });
    }
    let mut fields = SamplingFields {
        temperature: request.temperature,
        top_p: request.top_p,
        stop: request.stop_sequences.clone().map(Stop::Many),
        ..SamplingFields::default()
    };
    let mut max_tokens = Some(request.max_tokens);
    // A refusal names the Messages field the client sent.
    let own_name = |error: ApiError| match error {
        ApiError::InvalidParameter { param, message, code } if param == "stop" => {
            ApiError::InvalidParameter {
                message: message.replace("'stop'", "'stop_sequences'"),
                param: "stop_sequences".into(),
                code,
            }
        }
        other => other,
    };
    apply_params(&preset.name, &preset.locked, &mut fields, &mut max_tokens, true).map_err(own_name)?;
    apply_params(&preset.name, &preset.defaults, &mut fields, &mut max_tokens, false).map_err(own_name)?;
    request.temperature = fields.temperature;
    request.top_p = fields.top_p;
    request.stop_sequences = fields.stop.map(Stop::into_vec);
    request.max_tokens = max_tokens.unwrap_or(request.max_tokens);
    Ok(())
}

/// A preset named in the Responses dialect: its system prompt before the client's
/// `instructions`, and its parameters. Those Responses has fields for (`temperature`,
/// `top_p`, `max_output_tokens`) are set on the request; the sampling fields returned carry
/// them and the rest (`stop`, `seed`, penalties) to the model or upstream.
pub fn apply_responses(
    preset: &PresetConfig,
    request: &mut ResponsesRequest,
) -> Result<SamplingFields, ApiError> {
    request.model = preset.base.clone();
    if let Some(system) = &preset.system_prompt {
        request.instructions = Some(match request.instructions.take() {
            Some(client) if !client.is_empty() => format!("{system}\n\n{client}"),
            _ => system.clone(),
        });
    }
    let mut fields = SamplingFields {
        temperature: request.temperature,
        top_p: request.top_p,
        ..SamplingFields::default()
    };
    let mut max_tokens = request.max_output_tokens;
    apply_params(&preset.name, &preset.locked, &mut fields, &mut max_tokens, true)?;
    apply_params(&preset.name, &preset.defaults, &mut fields, &mut max_tokens, false)?;
    request.temperature = fields.temperature;
    request.top_p = fields.top_p;
    request.max_output_tokens = max_tokens;
    Ok(fields)
}

fn text_block(text: &str) -> ContentBlock {
    ContentBlock {
        kind: "text".into(),
        text: Some(text.to_string()),
        source: None,
        id: None,
        name: None,
        input: None,
        tool_use_id: None,
        content: None,
    }
}

/// The preset's guardrail policy tightens the request's (a preset never loosens one).
pub fn tighten_policy(state: &crate::app::AppState, preset: &PresetConfig) -> Result<(), ApiError> {
    if let Some(name) = &preset.guardrail_policy
        && let Some(meter) = crate::tenancy::current()
    {
        meter.tighten(&state.tenancy().policy(name)?);
    }
    Ok(())
}

/// Locked values must not be contradicted; defaults fill what is unset.
fn apply_params(
    preset: &str,
    params: &PresetParams,
    fields: &mut SamplingFields,
    max_tokens: &mut Option<i64>,
    locked: bool,
) -> Result<(), ApiError> {
    fn set<T: PartialEq + Clone>(
        preset: &str,
        name: &str,
        value: &Option<T>,
        slot: &mut Option<T>,
        locked: bool,
    ) -> Result<(), ApiError> {
        let Some(value) = value else { return Ok(()) };
        match slot {
            Some(current) if locked && current != value => Err(ApiError::invalid(
                name,
                format!("'{name}' is locked by the preset '{preset}' and cannot be changed"),
            )),
            Some(_) if !locked => Ok(()),
            _ => {
                *slot = Some(value.clone());
                Ok(())
            }
        }
    }
    set(preset, "temperature", &params.temperature, &mut fields.temperature, locked)?;
    set(preset, "top_p", &params.top_p, &mut fields.top_p, locked)?;
    set(preset, "presence_penalty", &params.presence_penalty, &mut fields.presence_penalty, locked)?;
    set(preset, "frequency_penalty", &params.frequency_penalty, &mut fields.frequency_penalty, locked)?;
    set(preset, "seed", &params.seed, &mut fields.seed, locked)?;
    set(preset, "max_tokens", &params.max_tokens, max_tokens, locked)?;
    let mut stop = fields.stop.clone().map(Stop::into_vec);
    set(preset, "stop", &params.stop, &mut stop, locked)?;
    fields.stop = stop.map(Stop::Many);
    Ok(())
}
