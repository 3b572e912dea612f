//! Presets: virtual models. A request naming a preset becomes a request to its base model
//! (local or alias) with the preset's system prompt first, its defaults where the client
//! set nothing, and its locked parameters enforced (a client asking otherwise gets a 400
//! naming the parameter).

use ferry_api::openai::{ChatCompletionRequest, ChatMessage, MessageContent, SamplingFields, Stop};
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
