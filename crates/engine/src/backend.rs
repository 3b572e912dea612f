//! The seam between Ferry's engine and a compute backend (llama.cpp today; a CUDA build or
//! another library later). A backend knows a vocabulary and can run a batched forward pass
//! over a KV cache holding several sequences; it knows nothing of requests or sampling.

use crate::model_info::ModelInfo;
use crate::{EngineError, TokenId};

/// A loaded model: shared by the API threads (tokenizing) and the scheduler (decoding).
pub trait Backend: Send + Sync + 'static {
    fn info(&self) -> &ModelInfo;
    /// `add_special` adds the BOS/EOS tokens the model's vocabulary asks for; special-token
    /// text is always parsed to its token.
    fn tokenize(&self, text: &str, add_special: bool) -> Vec<TokenId>;
    /// Text as text: control-token text (`<|im_start|>`) in it stays characters.
    fn tokenize_plain(&self, text: &str) -> Vec<TokenId>;
    /// The text of the vocabulary's control tokens (those that mark turns and ends).
    fn control_texts(&self) -> &[String];
    /// The bytes a token stands for (possibly part of a UTF-8 character).
    fn token_bytes(&self, token: TokenId) -> &[u8];
    fn is_end_of_generation(&self, token: TokenId) -> bool;
    /// A decoding session with its own KV cache; it lives on the scheduler's thread.
    fn new_session(&self, config: &SessionConfig) -> Result<Box<dyn Session + '_>, EngineError>;
    /// A session whose forward passes give one pooled vector per sequence (the model's
    /// hidden states, not its logits); it lives on the model's embedding thread.
    fn new_embedding_session(
        &self,
        _config: &EmbeddingConfig,
    ) -> Result<Box<dyn EmbeddingSession + '_>, EngineError> {
        Err(EngineError::InvalidRequest("this model's backend cannot compute embeddings".into()))
    }
}

/// How a sequence's hidden states become its embedding, as llama.cpp pools them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The mean over the sequence's tokens.
    #[default]
    Mean,
    /// The last token's (in a causal model, the only one that has seen the whole input).
    Last,
}

/// The shape of an embedding session's passes.
#[derive(Debug, Clone)]
pub struct EmbeddingConfig {
    /// Most tokens in one pass, every sequence whole (so also the longest input).
    pub max_tokens: usize,
    /// Most sequences in one pass.
    pub max_sequences: usize,
    pub pooling: Pooling,
    pub threads: usize,
}

pub trait EmbeddingSession {
    /// One pass over `sequences` (within the session's limits): each one's pooled vector,
    /// L2-normalised.
    fn embed(&mut self, sequences: &[&[TokenId]]) -> Result<Vec<Vec<f32>>, EngineError>;
}

/// The shape of a session's KV cache and batches.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// How many sequences the KV cache holds at once.
    pub n_sequences: usize,
    /// Context length of each sequence, prompt and completion together.
    pub ctx_per_sequence: usize,
    /// Most tokens in one forward pass (chunked prefill uses what decoding leaves).
    pub batch_tokens: usize,
    pub threads: usize,
    /// Cells of the KV cache when fewer than `n_sequences * ctx_per_sequence`: the sequences
    /// then share one pool of cells (less memory; each token attends over the pool's used
    /// cells, masked to its own sequence), and the scheduler keeps what they may hold within it.
    pub kv_budget: Option<usize>,
    /// Layers whose weights (and KV cache) go to a GPU, in a build with a GPU backend
    /// (`--features cuda`): `None` offloads every layer, as llama.cpp does by default;
    /// `Some(0)` keeps the model on the CPU. A CPU-only build ignores it.
    pub gpu_layers: Option<u32>,
    /// Attention through llama.cpp's flash-attention kernels or the plain matrix products.
    pub flash_attention: FlashAttention,
}

/// Whether attention runs through llama.cpp's flash-attention kernels (`--flash-attention`,
/// as llama-server's `-fa`). On the CPU they are faster under load (less memory too, at long
/// contexts) but take another kernel for 64 or more of a sequence's tokens in a batch than
/// for fewer, so a prefix cached from a long prompt differs in its last bits from the same
/// tokens recomputed. Without them, reusing a long prompt's cells measured exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlashAttention {
    /// llama.cpp's choice: on where the backend has the kernels.
    #[default]
    Auto,
    On,
    Off,
}

impl FlashAttention {
    pub fn as_str(self) -> &'static str {
        match self {
            FlashAttention::Auto => "auto",
            FlashAttention::On => "on",
            FlashAttention::Off => "off",
        }
    }
}

impl std::str::FromStr for FlashAttention {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(FlashAttention::Auto),
            "on" => Ok(FlashAttention::On),
            "off" => Ok(FlashAttention::Off),
            other => Err(format!("flash attention is auto, on or off, not '{other}'")),
        }
    }
}

impl SessionConfig {
    /// The KV budget when it is smaller than one full context per sequence.
    pub fn shared_kv_cells(&self) -> Option<usize> {
        self.kv_budget.filter(|&b| b < self.n_sequences.saturating_mul(self.ctx_per_sequence))
    }

    /// Cells the KV cache holds.
    pub fn kv_capacity(&self) -> usize {
        self.shared_kv_cells().unwrap_or(self.n_sequences.saturating_mul(self.ctx_per_sequence))
    }
}

/// One token of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry {
    pub token: TokenId,
    pub pos: usize,
    pub seq: usize,
    /// Whether the logits after this token are wanted.
    pub logits: bool,
}

pub trait Session {
    /// Runs one forward pass over `entries`, appending them to their sequences' KV cache.
    fn decode(&mut self, entries: &[BatchEntry]) -> Result<(), EngineError>;
    /// Logits of the `row`-th entry (counting only entries that asked for logits) of the last decode.
    fn logits(&self, row: usize) -> &[f32];
    /// Frees a sequence's KV cache.
    fn clear_sequence(&mut self, seq: usize);
    /// Makes `dst`'s KV cache a copy of `src`'s (whatever `dst` held is dropped). The copy
    /// may be deferred to the next `decode`, which sees it done; `src` may be cleared or
    /// reused before that decode.
    fn copy_sequence(&mut self, src: usize, dst: usize);
    /// Drops `seq`'s KV cells at positions `p0..p1` (`p1 = None`: to the end); the cells
    /// left keep their positions. `false` where the backend's memory cannot drop part of a
    /// sequence (recurrent models).
    fn remove_range(&mut self, seq: usize, p0: usize, p1: Option<usize>) -> bool;
}
