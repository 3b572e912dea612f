//! Upstream providers behind one `Provider` trait: each translates the neutral
//! [`ChatRequest`] into its own wire format and its answers (plain and streamed) back.
//! One module per provider; credentials never appear in errors or logs.

pub mod anthropic;
pub mod gemini;
pub mod openai;
mod sse;
mod transport;
pub mod types;

use std::pin::Pin;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};

pub use types::*;

pub use transport::error_chain;
pub(crate) use transport::{KeyHeader, Upstream};

pub type EventStream = Pin<Box<dyn Stream<Item = Result<ChatEvent, ProviderError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The upstream answered with an error status; `body` is its error message, already
    /// scrubbed of credentials.
    #[error("upstream answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        code: Option<String>,
        param: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("could not connect to the upstream: {0}")]
    Connect(String),
    #[error("the upstream timed out ({0})")]
    Timeout(&'static str),
    #[error("the upstream's answer could not be read: {0}")]
    Decode(String),
    /// A request parameter this provider cannot express.
    #[error("'{param}' is not supported by {provider} upstreams")]
    Unsupported { param: String, provider: &'static str },
    /// A request this provider cannot express, with the reason.
    #[error("{message}")]
    Refused { param: String, message: String },
}

impl ProviderError {
    /// Worth another try (on this target or the next): rate limits, server errors,
    /// connection failures, timeouts and answers that could not be read (the upstream's
    /// fault, like a 502); never a client error.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status == 429 || *status >= 500,
            ProviderError::Connect(_) | ProviderError::Timeout(_) | ProviderError::Decode(_) => true,
            ProviderError::Unsupported { .. } | ProviderError::Refused { .. } => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Timeouts of one target.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Until the response headers (and, for streams, the first event) arrive.
    pub first_byte: Duration,
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            first_byte: Duration::from_secs(60),
            total: Duration::from_secs(600),
        }
    }
}

pub trait Provider: Send + Sync {
    /// The upstream's name in errors (`OpenAI-compatible`, `Anthropic`, `Gemini`).
    fn name(&self) -> &'static str;

    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>>;
    /// Resolves once the upstream has answered with its first event, so a caller can still
    /// fall back before anything was sent to its client.
    fn chat_stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>>;

    /// A legacy text completion. Upstreams without a completions endpoint answer it as a chat
    /// of one user message (what [`completion_as_chat`] allows); `echo` is honoured by
    /// putting the prompt before the answer.
    fn completion(&self, request: CompletionRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>> {
        Box::pin(async move {
            let (chat, prompt) = completion_as_chat(&request, self.name())?;
            let mut answer = self.chat(chat).await?;
            if request.echo {
                for choice in &mut answer.choices {
                    choice.message.content.insert(0, Part::Text(prompt.clone()));
                }
            }
            Ok(answer)
        })
    }

    /// `completion`, streamed; with `echo`, each choice opens with the prompt.
    fn completion_stream(
        &self,
        request: CompletionRequest,
    ) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        Box::pin(async move {
            let (chat, prompt) = completion_as_chat(&request, self.name())?;
            let events = self.chat_stream(chat).await?;
            if !request.echo {
                return Ok(events);
            }
            let n = request.params.n.unwrap_or(1).max(1);
            let opening: Vec<Result<ChatEvent, ProviderError>> = (0..n)
                .map(|choice| Ok(ChatEvent::Text { choice, text: prompt.clone(), logprobs: None }))
                .collect();
            Ok(futures::stream::iter(opening).chain(events).boxed())
        })
    }
}

/// What an upstream without OpenAI's image `detail` (and, unless `has_strict`, without strict
/// tool use) can do with them. `detail: "auto"` is a hint the provider's own default already
/// follows, so it is left out; `low`/`high` change what the model sees and `strict: true`
/// changes what it may answer, so they are refused by name rather than dropped.
pub(crate) fn refuse_detail_and_strict(
    request: &ChatRequest,
    provider: &'static str,
    has_strict: bool,
) -> Result<(), ProviderError> {
    let details = request.messages.iter().flat_map(|m| &m.content).filter_map(|p| match p {
        Part::Image { detail, .. } => detail.as_deref(),
        Part::Text(_) => None,
    });
    for detail in details {
        if detail != "auto" {
            return Err(ProviderError::Refused {
                param: "detail".into(),
                message: format!(
                    "Image 'detail: \"{detail}\"' cannot be served by {provider} upstreams: they have no \
                     per-image resolution setting (only 'auto' is accepted, and left to the provider)"
                ),
            });
        }
    }
    if !has_strict && let Some(tool) = request.tools.iter().find(|t| t.strict == Some(true)) {
        return Err(ProviderError::Refused {
            param: "strict".into(),
            message: format!(
                "'strict: true' on tool '{}' cannot be served by {provider} upstreams: their function \
                 declarations have no strict mode",
                tool.name
            ),
        });
    }
    Ok(())
}

/// A legacy completion as a chat request of one user message holding the prompt, for
/// upstreams that only chat (as LiteLLM's `text_completion` does). What has no chat
/// equivalent is refused by name: several prompts or token ids, `logprobs`, `suffix`,
/// `best_of` above `n`. Also returns the prompt text, for `echo`.
pub fn completion_as_chat(
    request: &CompletionRequest,
    provider: &'static str,
) -> Result<(ChatRequest, String), ProviderError> {
    let refuse = |param: &str, what: &str| ProviderError::Refused {
        param: param.into(),
        message: format!(
            "{what} cannot be served by {provider} upstreams: they have no text completion endpoint, \
             so a legacy completion reaches them as one chat message"
        ),
    };
    let prompt = match request.prompts.as_slice() {
        [Prompt::Text(text)] => text.clone(),
        [_] => return Err(refuse("prompt", "A prompt of token ids")),
        _ => return Err(refuse("prompt", "More than one prompt per request")),
    };
    if request.logprobs.is_some() {
        return Err(refuse("logprobs", "'logprobs'"));
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(refuse("suffix", "'suffix' (fill in the middle)"));
    }
    if request.best_of.is_some_and(|b| b != request.params.n.unwrap_or(1)) {
        return Err(refuse("best_of", "'best_of' other than 'n'"));
    }
    let chat = ChatRequest {
        model: request.model.clone(),
        messages: vec![Message::text(Role::User, prompt.clone())],
        params: request.params.clone(),
        tools: vec![],
        tool_choice: None,
        response_format: None,
    };
    Ok((chat, prompt))
}

/// Replaces every occurrence of a secret in upstream text, so error messages that echo a
/// request (some do) never leak a key.
pub fn redact(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if s.len() >= 4 => text.replace(s, "[REDACTED]"),
        _ => text.to_string(),
    }
}

/// Resolves once the stream yields its first event (or fails before it), so the gateway can
/// still fall back to another target while nothing has reached the client.
pub(crate) async fn after_first_event(
    mut events: EventStream,
    first_byte: Duration,
) -> Result<EventStream, ProviderError> {
    let first = tokio::time::timeout(first_byte, events.next())
        .await
        .map_err(|_| ProviderError::Timeout("first byte"))?;
    match first {
        Some(Err(e)) => Err(e),
        Some(Ok(event)) => Ok(futures::stream::iter([Ok(event)]).chain(events).boxed()),
        // A stream that ended before its first event (an empty body, or a server that ignored
        // `stream` and answered JSON) is a bad answer, and the gateway may still fall back.
        None => Err(ProviderError::Decode(
            "the upstream's stream ended before its first event (does it support streaming?)".into(),
        )),
    }
}
