//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as
//! documented in Anthropic's API reference: requests, responses, stream events and errors.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicMessagesRequest)]
pub struct MessagesRequest {
    pub model: String,
    pub max_tokens: i64,
    pub messages: Vec<Message>,
    pub system: Option<SystemPrompt>,
    pub stop_sequences: Option<Vec<String>>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub tools: Option<Vec<serde_json::Value>>,
    pub tool_choice: Option<serde_json::Value>,
    pub metadata: Option<serde_json::Value>,
    /// Extended thinking: only `{"type": "disabled"}` is served.
    pub thinking: Option<serde_json::Value>,
    /// `format` (`{"type": "json_schema", "schema": ...}`): structured output.
    pub output_config: Option<serde_json::Value>,
    /// Every other field, each refused by name (Anthropic refuses fields it doesn't know).
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// `count_tokens` takes the request without `max_tokens`.
#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicCountTokensRequest)]
pub struct CountTokensRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub system: Option<SystemPrompt>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub tool_choice: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
#[schema(as = AnthropicSystemPrompt)]
pub enum SystemPrompt {
    Text(String),
    Blocks(Vec<ContentBlock>),
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicMessage)]
pub struct Message {
    pub role: String,
    pub content: MessageContent,
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
#[schema(as = AnthropicMessageContent)]
pub enum MessageContent {
    Text(String),
    Blocks(Vec<ContentBlock>),
}

/// A content block of a request: `text`, `image` (`source`), `tool_use` (`id`, `name`,
/// `input`) or `tool_result` (`tool_use_id`, `content`). Kept as one struct so that an
/// unsupported type can be named in the error.
#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicContentBlock)]
pub struct ContentBlock {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub source: Option<serde_json::Value>,
    pub id: Option<String>,
    pub name: Option<String>,
    pub input: Option<serde_json::Value>,
    pub tool_use_id: Option<String>,
    /// A tool result: a string or a list of text blocks.
    pub content: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicUsage)]
pub struct Usage {
    /// Prompt tokens not read from a cache.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Always 0: nothing is written to a cache at a price.
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
    /// Prompt tokens the prefix cache served (`--prefix-cache`), or an upstream's cache.
    #[serde(default)]
    pub cache_read_input_tokens: u64,
}

impl Usage {
    /// Anthropic's split of a prompt's tokens: those read from a cache apart from the rest.
    pub fn of_prompt(prompt_tokens: u64, cached_tokens: u64, output_tokens: u64) -> Usage {
        Usage {
            input_tokens: prompt_tokens.saturating_sub(cached_tokens),
            output_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: cached_tokens,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[schema(as = AnthropicResponseBlock)]
pub enum ResponseBlock {
    Text { text: String },
    ToolUse { id: String, name: String, input: serde_json::Value },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicMessagesResponse)]
pub struct MessagesResponse {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub role: String,
    pub model: String,
    pub content: Vec<ResponseBlock>,
    pub stop_reason: Option<String>,
    pub stop_sequence: Option<String>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicCountTokensResponse)]
pub struct CountTokensResponse {
    pub input_tokens: u64,
}

/// The delta of a `message_delta` event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicMessageDelta)]
pub struct MessageDelta {
    pub stop_reason: Option<String>,
    pub stop_sequence: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[schema(as = AnthropicBlockDelta)]
pub enum BlockDelta {
    TextDelta { text: String },
    InputJsonDelta { partial_json: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicOutputUsage)]
pub struct OutputUsage {
    /// Sent when the prompt size was not known at `message_start` (an upstream stream).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    pub output_tokens: u64,
    /// Sent with `input_tokens` when part of the prompt came from a cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
}

/// The events of a streamed message, in the order Anthropic sends them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[schema(as = AnthropicStreamEvent)]
pub enum StreamEvent {
    MessageStart { message: MessagesResponse },
    ContentBlockStart { index: u32, content_block: ResponseBlock },
    Ping,
    ContentBlockDelta { index: u32, delta: BlockDelta },
    ContentBlockStop { index: u32 },
    MessageDelta { delta: MessageDelta, usage: OutputUsage },
    MessageStop,
    Error { error: ErrorDetail },
}

impl StreamEvent {
    /// The SSE `event:` name, which Anthropic sets to the `type`.
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart { .. } => "message_start",
            StreamEvent::ContentBlockStart { .. } => "content_block_start",
            StreamEvent::Ping => "ping",
            StreamEvent::ContentBlockDelta { .. } => "content_block_delta",
            StreamEvent::ContentBlockStop { .. } => "content_block_stop",
            StreamEvent::MessageDelta { .. } => "message_delta",
            StreamEvent::MessageStop => "message_stop",
            StreamEvent::Error { .. } => "error",
        }
    }
}

/// Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicErrorBody)]
pub struct ErrorBody {
    #[serde(rename = "type")]
    pub kind: String,
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(as = AnthropicErrorDetail)]
pub struct ErrorDetail {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}
