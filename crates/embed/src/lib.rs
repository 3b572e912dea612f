//! Sentence embeddings from a BERT model in safetensors (all-MiniLM-L6-v2 and its kind): the
//! tokenizer and model ([`Embedder`]) and a batching service for concurrent requests
//! ([`EmbedService`]). The engine behind `POST /v1/embeddings`.
//!
//! An input is text or token ids (OpenAI's `input` may be either). Each becomes one sequence
//! wrapped in the tokenizer's special tokens (`[CLS] … [SEP]`), so text and the ids its
//! tokenizer gives without special tokens embed to the same vector. The vector is the mean of
//! the last hidden states over the sequence's tokens (sentence-transformers' mean pooling),
//! normalised to unit length. An input longer than the model's positions is an error, as with
//! OpenAI, never truncated silently.
//!
//! Computation is candle's tensors on the CPU, F32, through Ferry's own BERT encoder
//! (`bert.rs`): the sequences of a forward pass are packed, never padded, and attend only to
//! their own tokens (`attention.rs`), so a vector does not depend on what it was batched with
//! (to float rounding in the matrix products). The exact GELU is Ferry's own too (`gelu.rs`).

mod attention;
mod bert;
mod error;
mod fused;
mod gelu;
mod model;
mod packed;
mod service;

pub use error::EmbedError;
pub use model::{DEFAULT_MAX_BATCH_TOKENS, EmbedInput, Embedder, Embedding, MAX_INPUTS};
pub use service::{EmbedOutput, EmbedService, EmbedServiceConfig};

pub type Result<T, E = EmbedError> = std::result::Result<T, E>;
