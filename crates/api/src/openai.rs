//! OpenAI's chat completions, completions and models, as documented in OpenAI's API
//! reference. Request fields Ferry does not know are ignored, as OpenAI does. A few
//! sampling fields that vLLM and llama-server accept as extensions (`top_k`, `min_p`,
//! `repetition_penalty`, `ignore_eos`) are accepted too; the SDKs send them via `extra_body`.

use std::collections::BTreeMap;

use indexmap::IndexMap;
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default, PartialEq, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<i64>,
    pub user: Option<String>,
    pub tools: Option<Vec<ToolDefinition>>,
    pub tool_choice: Option<serde_json::Value>,
    /// Several calls in one answer (default true).
    pub parallel_tool_calls: Option<bool>,
    #[schema(value_type = Option<ResponseFormat>)]
    pub response_format: Option<serde_json::Value>,
    /// Fields OpenAI honours and Ferry cannot serve (the legacy functions, audio output,
    /// reasoning), read only to refuse them by name rather than answer without them.
    #[schema(ignore)]
    pub functions: Option<IgnoredAny>,
    #[schema(ignore)]
    pub function_call: Option<IgnoredAny>,
    #[schema(ignore)]
    pub audio: Option<IgnoredAny>,
    #[schema(ignore)]
    pub modalities: Option<Vec<String>>,
    #[schema(ignore)]
    pub reasoning_effort: Option<String>,
}

/// `response_format`: free text, any JSON object, or JSON that follows a schema.
#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct JsonSchemaFormat {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema the output must follow (an empty schema when absent).
    #[schema(value_type = Object)]
    pub schema: Option<serde_json::Value>,
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    pub name: Option<String>,
    pub tool_calls: Option<Vec<ToolCall>>,
    pub tool_call_id: Option<String>,
}

/// `tools[]`: a function the model may call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ToolDefinition {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FunctionDefinition {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<serde_json::Value>,
    /// `true`: the arguments must follow `parameters` exactly (Structured Outputs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// A tool call in an assistant message (request or response).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A streamed piece of a tool call: `id`, `type` and `name` come first, then argument text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// Message content: a string or a list of typed parts.
#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image_url: Option<ImageUrl>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ImageUrl {
    /// An `https:` URL or a `data:image/...;base64,` URI.
    pub url: String,
    /// `auto`, `low` or `high`: the resolution the model sees the image at.
    pub detail: Option<String>,
}

/// The sampling fields chat completions and completions share. They are read from the
/// same JSON object as the request, in a second pass (not `#[serde(flatten)]`, which would
/// lose the field's name in type errors).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SamplingFields {
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f64>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f64>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f64>,
    #[schema(minimum = 0.01, maximum = 10)]
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string, as OpenAI sends it) to a bias in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub seed: Option<i64>,
    #[schema(minimum = 1, maximum = 128)]
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub ignore_eos: Option<bool>,
    /// vLLM's prefix-cache isolation: a prompt reuses only cached prefixes left by requests
    /// with the same salt (and the same tenant), so users sharing a key learn nothing from
    /// `cached_tokens` or timing about each other's prompts.
    pub cache_salt: Option<String>,
}

/// `prompt`: a string, a list of strings, a list of token ids or a list of such lists.
#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<i64>,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Number of top alternatives per token (OpenAI allows 0..=5).
    pub logprobs: Option<i64>,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub echo: bool,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// `cached_tokens`: prompt tokens served from the prefix cache (0 when none were), as
    /// OpenAI always sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// `reasoning_tokens`: always 0 (no served model reasons), as OpenAI always sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: u64,
}

/// One token's logprob in chat completions' format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AssistantMessage {
    pub role: String,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, utoipa::ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Present (as null) on every chunk when usage was asked for; set on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    pub system_fingerprint: Option<String>,
}

/// Logprobs in the legacy completions format (a field an upstream left out reads as empty).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default, utoipa::ToSchema)]
#[serde(default)]
pub struct CompletionLogprobs {
    #[serde(deserialize_with = "null_as_default")]
    pub tokens: Vec<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub token_logprobs: Vec<Option<f32>>,
    /// Each token's alternatives, most likely first (as OpenAI orders them); upstreams send
    /// `null` here when no alternatives were asked for.
    #[serde(deserialize_with = "null_as_default")]
    #[schema(value_type = Vec<Option<BTreeMap<String, f32>>>)]
    pub top_logprobs: Vec<Option<IndexMap<String, f32>>>,
    #[serde(deserialize_with = "null_as_default")]
    pub text_offset: Vec<usize>,
}

/// A field an upstream may send as `null` reads as its empty value.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Model {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// Ferry extensions: what the file is.
    #[serde(flatten)]
    pub details: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<Model>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_ignored_and_unions_parse() {
        let body = serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "stop": "x", "something_new": {"a": 1}, "top_k": 3
        });
        let req: ChatCompletionRequest = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(req.messages.len(), 1);
        let sampling: SamplingFields = serde_json::from_value(body).unwrap();
        assert_eq!(sampling.stop, Some(Stop::One("x".into())));
        assert_eq!(sampling.top_k, Some(3));
        let req: CompletionRequest =
            serde_json::from_value(serde_json::json!({"model": "m", "prompt": [[1, 2], [3]]})).unwrap();
        assert_eq!(req.prompt, Prompt::TokenLists(vec![vec![1, 2], vec![3]]));
    }

    #[test]
    fn completion_logprobs_accept_null_and_missing_fields() {
        let with_nulls = serde_json::json!({
            "tokens": [" a"], "token_logprobs": [-0.25], "top_logprobs": null, "text_offset": null
        });
        let got: CompletionLogprobs = serde_json::from_value(with_nulls).unwrap();
        let want = CompletionLogprobs {
            tokens: vec![" a".into()],
            token_logprobs: vec![Some(-0.25)],
            ..Default::default()
        };
        assert_eq!(got, want);
        let missing: CompletionLogprobs =
            serde_json::from_value(serde_json::json!({"tokens": [" a"]})).unwrap();
        assert_eq!(missing.tokens, vec![" a".to_string()]);
        assert!(serde_json::from_value::<CompletionLogprobs>(serde_json::json!({"tokens": 3})).is_err());
    }
}
