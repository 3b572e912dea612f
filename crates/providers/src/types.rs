//! The neutral chat request and answer every provider translates to and from its own wire
//! format. Ingress dialects (OpenAI, Anthropic, Responses) translate into these too, so any
//! dialect reaches any provider.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Part {
    Text(String),
    /// An image by URL, or inline as a `data:` URI.
    Image {
        url: String,
        /// OpenAI's `detail` (`auto`, `low`, `high`) as the client sent it.
        #[serde(default)]
        detail: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, as the model wrote them.
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Part>,
    pub tool_calls: Vec<ToolCall>,
    /// For `Role::Tool`: the call this message answers.
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message { role, content: vec![Part::Text(text.into())], tool_calls: vec![], tool_call_id: None }
    }

    /// The text parts joined.
    pub fn joined_text(&self) -> String {
        self.content
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Image { .. } => None,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: serde_json::Value,
    /// `Some(true)`: arguments must follow `parameters` exactly (OpenAI's and Anthropic's
    /// strict tool use).
    #[serde(default)]
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

/// Sampling and length settings; `None` leaves the provider's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u64>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    /// `Some(false)`: at most one tool call per answer.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The model name the provider knows.
    pub model: String,
    pub messages: Vec<Message>,
    pub params: Params,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    /// OpenAI's `response_format` object, passed where the provider has an equivalent.
    pub response_format: Option<serde_json::Value>,
}

/// One prompt of a legacy text completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    Text(String),
    /// Token ids of the upstream's own tokenizer, passed as they are.
    Tokens(Vec<i64>),
}

/// A legacy text completion (OpenAI's `/v1/completions`): raw prompts, no chat template.
/// Upstreams with a completions endpoint take it as it is; the others answer it as one user
/// message (see [`crate::completion_as_chat`]). The answer is a [`ChatResponse`] (or its
/// events) whose choices carry the text, and `logprobs` in the completions format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// The model name the provider knows.
    pub model: String,
    /// One or more prompts; each gets `n` choices, numbered prompt by prompt.
    pub prompts: Vec<Prompt>,
    /// `temperature`, `top_p`, `max_tokens`, `stop`, `seed`, `n` and the penalties.
    pub params: Params,
    /// The prompt is repeated before each choice's text.
    pub echo: bool,
    /// Top alternatives per token (the completions API's integer `logprobs`).
    pub logprobs: Option<u32>,
    /// Text after the completion (fill in the middle).
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
}

impl FinishReason {
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens the provider served from its prompt cache (0 when it says nothing).
    #[serde(default)]
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub index: u32,
    pub message: Message,
    pub finish_reason: Option<FinishReason>,
    /// Passed through as the provider sent them (OpenAI's chat `logprobs` object).
    pub logprobs: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub id: String,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

/// One piece of a streamed answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ChatEvent {
    Text {
        choice: u32,
        text: String,
        logprobs: Option<serde_json::Value>,
    },
    /// The first delta of a call carries its id and name; later ones append to `arguments`.
    ToolCall {
        choice: u32,
        index: u32,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
    Finish {
        choice: u32,
        reason: FinishReason,
    },
    Usage(Usage),
}

/// The conversation every provider's translation test sends: a system prompt, a user turn
/// with text and an image, an assistant tool call, and that call's result.
#[cfg(test)]
pub(crate) fn sample_conversation(
    question: &str,
    image_url: &str,
    call: ToolCall,
    result: &str,
) -> Vec<Message> {
    let call_id = call.id.clone();
    vec![
        Message::text(Role::System, "be brief"),
        Message {
            role: Role::User,
            content: vec![Part::Text(question.into()), Part::Image { url: image_url.into(), detail: None }],
            tool_calls: vec![],
            tool_call_id: None,
        },
        Message { role: Role::Assistant, content: vec![], tool_calls: vec![call], tool_call_id: None },
        Message { tool_call_id: Some(call_id), ..Message::text(Role::Tool, result) },
    ]
}

/// One user turn with an image of the given `detail` and one tool of the given `strict`: what
/// every provider's test of those two fields sends.
#[cfg(test)]
pub(crate) fn detail_and_strict_request(detail: Option<&str>, strict: Option<bool>) -> ChatRequest {
    ChatRequest {
        model: "m".into(),
        messages: vec![Message {
            role: Role::User,
            content: vec![
                Part::Text("what is this?".into()),
                Part::Image { url: "data:image/png;base64,AA==".into(), detail: detail.map(str::to_string) },
            ],
            tool_calls: vec![],
            tool_call_id: None,
        }],
        params: Params::default(),
        tools: vec![Tool {
            name: "lookup".into(),
            description: None,
            parameters: serde_json::json!({"type": "object"}),
            strict,
        }],
        tool_choice: None,
        response_format: None,
    }
}

/// A streamed tool call of choice 0's first call: its id and name (the delta that opens it)
/// or an arguments fragment.
#[cfg(test)]
pub(crate) fn first_call_delta(id: Option<&str>, name: Option<&str>, arguments: &str) -> ChatEvent {
    ChatEvent::ToolCall {
        choice: 0,
        index: 0,
        id: id.map(str::to_string),
        name: name.map(str::to_string),
        arguments: arguments.into(),
    }
}
