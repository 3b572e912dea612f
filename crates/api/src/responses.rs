//! OpenAI's Responses API (`POST /v1/responses`), stateless: the request carries the whole
//! conversation as `input` items; the answer is a `response` object with `output` items, or
//! its typed stream events.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Input,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "crate::null_as_default")]
    pub stream: bool,
    pub text: Option<TextConfig>,
    pub tools: Option<Vec<Tool>>,
    /// `none`, `auto`, `required`, or `{"type": "function", "name": ...}`.
    pub tool_choice: Option<serde_json::Value>,
    /// Several function calls in one answer (default true).
    pub parallel_tool_calls: Option<bool>,
    pub previous_response_id: Option<String>,
    pub store: Option<bool>,
    pub metadata: Option<serde_json::Value>,
    /// Stateful or stored things a stateless server can't honour, read only to refuse them by
    /// name rather than ignore them: a stored conversation, a background run, a stored prompt.
    #[schema(value_type = Option<Object>)]
    pub conversation: Option<serde_json::Value>,
    pub background: Option<bool>,
    #[schema(value_type = Option<Object>)]
    pub prompt: Option<serde_json::Value>,
    /// Log probabilities (`top_logprobs`, `include: ["message.output_text.logprobs"]`): refused
    /// by name for now; Chat Completions serves them.
    pub top_logprobs: Option<u32>,
    pub include: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<InputItem>),
}

/// A tool the model may call. Only `function` tools are served; other types are named in
/// errors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub parameters: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// An input item: a message (`role` and `content`, `type` absent or `message`), a
/// `function_call` the model made (`call_id`, `name`, `arguments`), or a
/// `function_call_output` (`call_id`, `output`). Other types are named in errors.
#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct InputItem {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub role: Option<String>,
    pub content: Option<InputContent>,
    pub call_id: Option<String>,
    pub name: Option<String>,
    pub arguments: Option<String>,
    /// A function's result: text, or a list of `input_text` parts.
    pub output: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum InputContent {
    Text(String),
    Parts(Vec<InputPart>),
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct InputPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    /// `input_image`: a URL, or the image inline as a `data:` URL (base64).
    pub image_url: Option<String>,
    /// `input_image` by uploaded file: not served (Ferry stores no files).
    pub file_id: Option<String>,
    /// `input_image`: `auto`, `low` or `high`.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TextConfig {
    pub format: Option<TextFormat>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct TextFormat {
    /// `text`, `json_object` or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `json_schema`: the schema's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `json_schema`: the JSON schema the output follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub schema: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OutputText {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: String,
    pub annotations: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OutputMessage {
    pub id: String,
    pub status: String,
    pub role: String,
    pub content: Vec<OutputText>,
}

/// A call of a function tool the model made; the client answers it with a
/// `function_call_output` input item carrying the same `call_id`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FunctionCall {
    pub id: String,
    pub call_id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
    /// `in_progress`, `completed` or `incomplete`.
    pub status: String,
}

/// An item of a response's `output`, tagged by `type`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    Message(OutputMessage),
    FunctionCall(FunctionCall),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct InputTokensDetails {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u64,
}

/// `POST /v1/responses/input_tokens`: the prompt's tokens, without running it.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
#[schema(as = ResponseInputTokens)]
pub struct InputTokens {
    /// Always `response.input_tokens`.
    pub object: &'static str,
    pub input_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct IncompleteDetails {
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Response {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    /// `in_progress`, `completed` or `incomplete`.
    pub status: String,
    pub error: Option<serde_json::Value>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub temperature: Option<f64>,
    pub text: TextConfig,
    /// As the request set it (`auto` when it did not).
    pub tool_choice: serde_json::Value,
    pub tools: Vec<Tool>,
    pub top_p: Option<f64>,
    pub usage: Option<ResponseUsage>,
    pub metadata: serde_json::Value,
}

/// The typed events of a streamed response, each with its `sequence_number`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type")]
#[schema(as = ResponseStreamEvent)]
pub enum StreamEvent {
    #[serde(rename = "response.created")]
    Created { sequence_number: u64, response: Response },
    #[serde(rename = "response.in_progress")]
    InProgress { sequence_number: u64, response: Response },
    #[serde(rename = "response.output_item.added")]
    OutputItemAdded { sequence_number: u64, output_index: u32, item: OutputItem },
    #[serde(rename = "response.content_part.added")]
    ContentPartAdded {
        sequence_number: u64,
        item_id: String,
        output_index: u32,
        content_index: u32,
        part: OutputText,
    },
    #[serde(rename = "response.output_text.delta")]
    OutputTextDelta {
        sequence_number: u64,
        item_id: String,
        output_index: u32,
        content_index: u32,
        delta: String,
        logprobs: Vec<serde_json::Value>,
    },
    #[serde(rename = "response.output_text.done")]
    OutputTextDone {
        sequence_number: u64,
        item_id: String,
        output_index: u32,
        content_index: u32,
        text: String,
        logprobs: Vec<serde_json::Value>,
    },
    #[serde(rename = "response.content_part.done")]
    ContentPartDone {
        sequence_number: u64,
        item_id: String,
        output_index: u32,
        content_index: u32,
        part: OutputText,
    },
    #[serde(rename = "response.function_call_arguments.delta")]
    FunctionCallArgumentsDelta { sequence_number: u64, item_id: String, output_index: u32, delta: String },
    #[serde(rename = "response.function_call_arguments.done")]
    FunctionCallArgumentsDone { sequence_number: u64, item_id: String, output_index: u32, arguments: String },
    #[serde(rename = "response.output_item.done")]
    OutputItemDone { sequence_number: u64, output_index: u32, item: OutputItem },
    #[serde(rename = "response.completed")]
    Completed { sequence_number: u64, response: Response },
    #[serde(rename = "response.incomplete")]
    Incomplete { sequence_number: u64, response: Response },
    /// The response ended by an error: with the output it had, status `failed` and `error`.
    #[serde(rename = "response.failed")]
    Failed { sequence_number: u64, response: Response },
    #[serde(rename = "error")]
    Error { sequence_number: u64, code: Option<String>, message: String, param: Option<String> },
}

impl StreamEvent {
    /// The SSE `event:` name: the event's `type`.
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::Created { .. } => "response.created",
            StreamEvent::InProgress { .. } => "response.in_progress",
            StreamEvent::OutputItemAdded { .. } => "response.output_item.added",
            StreamEvent::ContentPartAdded { .. } => "response.content_part.added",
            StreamEvent::OutputTextDelta { .. } => "response.output_text.delta",
            StreamEvent::OutputTextDone { .. } => "response.output_text.done",
            StreamEvent::ContentPartDone { .. } => "response.content_part.done",
            StreamEvent::FunctionCallArgumentsDelta { .. } => "response.function_call_arguments.delta",
            StreamEvent::FunctionCallArgumentsDone { .. } => "response.function_call_arguments.done",
            StreamEvent::OutputItemDone { .. } => "response.output_item.done",
            StreamEvent::Completed { .. } => "response.completed",
            StreamEvent::Incomplete { .. } => "response.incomplete",
            StreamEvent::Failed { .. } => "response.failed",
            StreamEvent::Error { .. } => "error",
        }
    }
}
