//! Upstream providers behind one `Provider` trait: each translates the neutral
//! [`ChatRequest`] into its own wire format and its answers (plain and streamed) back.
//! One module per provider; credentials never appear in errors or logs.

pub mod openai;
mod sse;
pub mod types;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;

pub use types::*;

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
    /// A request feature this provider cannot express.
    #[error("{0}")]
    Unsupported(String),
}

impl ProviderError {
    /// Worth another try (on this target or the next): rate limits, server errors,
    /// connection failures and timeouts; never a client error.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => *status == 429 || *status >= 500,
            ProviderError::Connect(_) | ProviderError::Timeout(_) => true,
            ProviderError::Decode(_) | ProviderError::Unsupported(_) => false,
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
    fn chat(&self, request: ChatRequest) -> BoxFuture<'_, Result<ChatResponse, ProviderError>>;
    /// Resolves once the upstream has answered with its first event, so a caller can still
    /// fall back before anything was sent to its client.
    fn chat_stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>>;
}

/// Replaces every occurrence of a secret in upstream text, so error messages that echo a
/// request (some do) never leak a key.
pub fn redact(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if s.len() >= 4 => text.replace(s, "[REDACTED]"),
        _ => text.to_string(),
    }
}
