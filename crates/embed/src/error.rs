//! The embedding layer's errors: the client's mistakes (a 400 at the HTTP edge) and the
//! server's own failures.

use std::path::PathBuf;

/// Why an embedding request or a model load failed. Messages name the input by its index in
/// the request's `input` array (index 0 for a single string).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbedError {
    /// The request held no input at all.
    #[error("input is empty: give at least one string or token array")]
    NoInput,
    /// More inputs than one request may hold.
    #[error("input has {n_inputs} items, more than the {max_inputs} one request may hold")]
    TooManyInputs { n_inputs: usize, max_inputs: usize },
    /// An empty string or an empty token array.
    #[error("input[{index}] is empty")]
    EmptyInput { index: usize },
    /// An input longer than the model's positions; `n_tokens` counts the special tokens.
    #[error(
        "input[{index}] has {n_tokens} tokens (with the special tokens the model adds), more than this \
         model's maximum of {max_tokens}"
    )]
    TooLong { index: usize, n_tokens: usize, max_tokens: usize },
    /// A token id the model has no embedding for.
    #[error("input[{index}] holds token id {token}, outside this model's vocabulary (0 to {})", vocab_size - 1)]
    TokenOutOfVocab { index: usize, token: u32, vocab_size: usize },

    /// The model directory is missing a file, or a file is not what this crate can run.
    #[error("cannot load the embedding model from {}: {message}", path.display())]
    Load { path: PathBuf, message: String },
    /// The tokenizer failed on an input (not expected for valid UTF-8 text).
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    /// The forward pass failed.
    #[error("embedding forward pass failed: {0}")]
    Model(String),
    /// The service's model thread could not start, or is gone.
    #[error("the embedding service is not running: {0}")]
    ServiceStopped(String),
}

impl EmbedError {
    /// Whether the request was at fault (map to 400 `invalid_request_error`, param `input`);
    /// otherwise it is the server's (500).
    pub fn is_client_error(&self) -> bool {
        match self {
            EmbedError::NoInput
            | EmbedError::TooManyInputs { .. }
            | EmbedError::EmptyInput { .. }
            | EmbedError::TooLong { .. }
            | EmbedError::TokenOutOfVocab { .. } => true,
            EmbedError::Load { .. }
            | EmbedError::Tokenizer(_)
            | EmbedError::Model(_)
            | EmbedError::ServiceStopped(_) => false,
        }
    }
}
