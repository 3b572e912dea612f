//! The embedding model: loading a sentence-transformers BERT directory, checking and
//! tokenising inputs, and batched forward passes with mean pooling.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use crate::bert::{Bert, Config, mean_pool_normalized};
use crate::{EmbedError, Result};

/// The most inputs one request may hold (OpenAI's limit for its embedding models).
pub const MAX_INPUTS: usize = 2048;

/// The default bound on one forward pass: the tokens of its sequences, packed. It bounds memory
/// (activations take tokens × intermediate size floats; attention scores heads × tokens²
/// floats of one sequence at a time: 12 MB for a 512-token sequence of MiniLM) and the time
/// other requests wait.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 4096;

/// One input of an embedding request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedInput {
    /// Text, tokenised with the model's tokenizer.
    Text(String),
    /// Already tokenised text: the ids the model's tokenizer gives without special tokens.
    /// The model's special tokens are added around them, as the tokenizer does for text.
    Tokens(Vec<u32>),
}

impl From<String> for EmbedInput {
    fn from(text: String) -> Self {
        EmbedInput::Text(text)
    }
}

impl From<&str> for EmbedInput {
    fn from(text: &str) -> Self {
        EmbedInput::Text(text.to_owned())
    }
}

impl From<Vec<u32>> for EmbedInput {
    fn from(tokens: Vec<u32>) -> Self {
        EmbedInput::Tokens(tokens)
    }
}

/// The embedding of one input.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// Unit length (L2), [`Embedder::dims`] long.
    pub vector: Vec<f32>,
    /// Tokens the model read, the special tokens included: the input's share of `usage`.
    pub n_tokens: usize,
}

/// A loaded embedding model: tokenizer and BERT weights. Immutable, `Send + Sync`: share it
/// behind an `Arc` ([`crate::EmbedService`] does).
pub struct Embedder {
    name: String,
    model: Bert,
    tokenizer: Tokenizer,
    device: Device,
    dims: usize,
    max_tokens: usize,
    vocab_size: u32,
    /// The special tokens the tokenizer's post-processor puts before and after one sequence
    /// (`[CLS]` and `[SEP]` for BERT), to wrap token-id inputs the same way.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("name", &self.name)
            .field("dims", &self.dims)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads a sentence-transformers model directory: `config.json` (a BERT config),
    /// `tokenizer.json`, `model.safetensors` and, when present, `1_Pooling/config.json`,
    /// which must ask for mean pooling. The model's name is the directory's name.
    pub fn load(dir: &Path) -> Result<Self> {
        let load_error = |path: &Path, message: String| EmbedError::Load { path: path.to_owned(), message };
        let read = |file: &str| -> Result<(PathBuf, String)> {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path).map_err(|e| load_error(&path, e.to_string()))?;
            Ok((path, text))
        };

        let (config_path, text) = read("config.json")?;
        let config: Config = serde_json::from_str(&text)
            .map_err(|e| load_error(&config_path, format!("not a BERT config: {e}")))?;
        if let Some(message) = config.unsupported() {
            return Err(load_error(&config_path, message));
        }
        // The length sentence-transformers runs the model at (MiniLM: 256 of its 512
        // positions; it truncates there): past it, vectors would differ from the reference.
        let mut max_tokens = config.max_position_embeddings;
        if dir.join("sentence_bert_config.json").is_file() {
            let (path, text) = read("sentence_bert_config.json")?;
            let st: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| load_error(&path, format!("not JSON: {e}")))?;
            if let Some(n) = st["max_seq_length"].as_u64().and_then(|n| usize::try_from(n).ok()) {
                max_tokens = max_tokens.min(n);
            }
        }
        if dir.join("1_Pooling/config.json").is_file() {
            let (path, text) = read("1_Pooling/config.json")?;
            check_pooling(&text, config.hidden_size).map_err(|message| load_error(&path, message))?;
        }

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| load_error(&tokenizer_path, e.to_string()))?;
        // sentence-transformers' tokenizer.json truncates and pads to 128. Here an input over
        // the model's positions is an error (as with OpenAI), and nothing is padded: a forward
        // pass packs its sequences.
        tokenizer.with_truncation(None).map_err(|e| load_error(&tokenizer_path, e.to_string()))?;
        tokenizer.with_padding(None);
        let (prefix, suffix) =
            special_tokens(&tokenizer).map_err(|message| load_error(&tokenizer_path, message))?;

        let device = Device::Cpu;
        let weights_path = dir.join("model.safetensors");
        // `candle_core::safetensors::load` reads the file into memory: the mmap variant is an
        // unsafe fn, and this crate forbids unsafe code. MiniLM is 91 MB.
        let tensors = candle_core::safetensors::load(&weights_path, &device)
            .map_err(|e| load_error(&weights_path, e.to_string()))?;
        let model = Bert::load(VarBuilder::from_tensors(tensors, DType::F32, &device), &config)
            .map_err(|e| load_error(&weights_path, e.to_string()))?;

        let name = dir
            .canonicalize()
            .unwrap_or_else(|_| dir.to_owned())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let vocab_size = u32::try_from(config.vocab_size).map_err(|_| {
            load_error(&config_path, format!("vocab_size {} is too large", config.vocab_size))
        })?;

        let embedder = Embedder {
            name,
            model,
            tokenizer,
            device,
            dims: config.hidden_size,
            max_tokens,
            vocab_size,
            prefix,
            suffix,
        };
        tracing::debug!(model = %embedder.name, dims = embedder.dims, "embedding model loaded");
        Ok(embedder)
    }

    /// The model's name: its directory's name (`all-MiniLM-L6-v2`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The length of every vector.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The most tokens one input may have, counting the special tokens the model adds (two
    /// for BERT): the model's positions.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids of an [`EmbedInput::Tokens`] input must be below this.
    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// Embeds the inputs, in order. Checks them all first: one bad input fails the call.
    /// Runs as few forward passes as [`DEFAULT_MAX_BATCH_TOKENS`] allows; blocks the thread.
    pub fn embed(&self, inputs: &[EmbedInput]) -> Result<Vec<Embedding>> {
        let sequences = self.tokenize(inputs)?;
        let slices: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
        let vectors = self.run_batches(&slices, DEFAULT_MAX_BATCH_TOKENS, || {})?;
        Ok(vectors
            .into_iter()
            .zip(&sequences)
            .map(|(vector, sequence)| Embedding { vector, n_tokens: sequence.len() })
            .collect())
    }

    /// Checks the inputs and turns each into the token ids the model reads, special tokens
    /// included.
    pub(crate) fn tokenize(&self, inputs: &[EmbedInput]) -> Result<Vec<Vec<u32>>> {
        if inputs.is_empty() {
            return Err(EmbedError::NoInput);
        }
        if inputs.len() > MAX_INPUTS {
            return Err(EmbedError::TooManyInputs { n_inputs: inputs.len(), max_inputs: MAX_INPUTS });
        }
        inputs
            .iter()
            .enumerate()
            .map(|(index, input)| {
                let ids = match input {
                    EmbedInput::Text(text) if text.is_empty() => {
                        return Err(EmbedError::EmptyInput { index });
                    }
                    EmbedInput::Text(text) => self
                        .tokenizer
                        .encode(text.as_str(), true)
                        .map_err(|e| EmbedError::Tokenizer(e.to_string()))?
                        .get_ids()
                        .to_vec(),
                    EmbedInput::Tokens(tokens) if tokens.is_empty() => {
                        return Err(EmbedError::EmptyInput { index });
                    }
                    EmbedInput::Tokens(tokens) => {
                        if let Some(&token) = tokens.iter().find(|&&t| t >= self.vocab_size) {
                            let vocab_size = self.vocab_size as usize;
                            return Err(EmbedError::TokenOutOfVocab { index, token, vocab_size });
                        }
                        [&self.prefix[..], tokens, &self.suffix[..]].concat()
                    }
                };
                if ids.len() > self.max_tokens {
                    let max_tokens = self.max_tokens;
                    return Err(EmbedError::TooLong { index, n_tokens: ids.len(), max_tokens });
                }
                Ok(ids)
            })
            .collect()
    }

    /// Embeds checked sequences in forward passes of at most `max_batch_tokens` tokens (a
    /// longer sequence runs alone), calling `on_pass` after each pass. Vectors in order.
    pub(crate) fn run_batches(
        &self,
        sequences: &[&[u32]],
        max_batch_tokens: usize,
        mut on_pass: impl FnMut(),
    ) -> Result<Vec<Vec<f32>>> {
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        let mut vectors = vec![Vec::new(); sequences.len()];
        for pass in plan_passes(&lengths, max_batch_tokens) {
            let batch: Vec<&[u32]> = pass.iter().map(|&i| sequences[i]).collect();
            let pass_vectors = self.forward(&batch).map_err(|e| EmbedError::Model(e.to_string()))?;
            on_pass();
            for (i, vector) in pass.into_iter().zip(pass_vectors) {
                vectors[i] = vector;
            }
        }
        Ok(vectors)
    }

    /// One forward pass: sequences packed, mean-pooled over their own tokens and normalised.
    ///
    /// The pass runs on one of rayon's worker threads (the current pool's when called from
    /// one, as the service does; else the global pool's), so that each of its parallel steps
    /// (some thirty a layer's worth) is shared with the other workers from inside the pool.
    /// From a thread outside it, every step put the caller to sleep on a lock until the
    /// workers were done, and woke it after: for one sentence a quarter of the CPU time went
    /// to the kernel's context switches.
    fn forward(&self, sequences: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        rayon::scope(|_| {
            let hidden = self.model.forward(sequences, &self.device)?;
            let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
            mean_pool_normalized(&hidden, &lengths)
        })
    }
}

/// Groups sequences (by index) into forward passes, in order: each pass holds as many as fit
/// `max_batch_tokens` (at least one).
fn plan_passes(lengths: &[usize], max_batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut passes: Vec<(Vec<usize>, usize)> = Vec::new();
    for (i, &len) in lengths.iter().enumerate() {
        match passes.last_mut() {
            Some((pass, tokens)) if *tokens + len <= max_batch_tokens => {
                pass.push(i);
                *tokens += len;
            }
            _ => passes.push((vec![i], len)),
        }
    }
    passes.into_iter().map(|(pass, _)| pass).collect()
}

/// Only mean pooling over a `hidden_size`-wide output is implemented.
fn check_pooling(text: &str, hidden_size: usize) -> std::result::Result<(), String> {
    let config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| e.to_string())?;
    let modes: Vec<&str> = config
        .iter()
        .filter(|(key, value)| key.starts_with("pooling_mode_") && value.as_bool() == Some(true))
        .map(|(key, _)| key.as_str())
        .collect();
    if modes != ["pooling_mode_mean_tokens"] {
        return Err(format!("pooling {modes:?} is not supported: only pooling_mode_mean_tokens is"));
    }
    match config.get("word_embedding_dimension").and_then(|d| d.as_u64()) {
        Some(dims) if dims != hidden_size as u64 => {
            Err(format!("word_embedding_dimension {dims} is not the model's hidden_size {hidden_size}"))
        }
        _ => Ok(()),
    }
}

/// The special tokens the tokenizer's post-processor adds before and after a single sequence,
/// found by encoding a word with and without them.
fn special_tokens(tokenizer: &Tokenizer) -> std::result::Result<(Vec<u32>, Vec<u32>), String> {
    let encode = |add_special_tokens| {
        tokenizer.encode("a", add_special_tokens).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    };
    let (with, without) = (encode(true)?, encode(false)?);
    let start = (0..=with.len().saturating_sub(without.len()))
        .find(|&start| with[start..].starts_with(&without))
        .filter(|_| !without.is_empty())
        .ok_or("the post-processor does not keep a sequence's tokens whole")?;
    Ok((with[..start].to_vec(), with[start + without.len()..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_group_by_length_within_the_budget() {
        // Lengths 10, 3, 7, 3, 20 with a budget of 24: 10 + 3 + 7 + 3 = 23; 20 more would
        // make 43.
        let passes = plan_passes(&[10, 3, 7, 3, 20], 24);
        assert_eq!(passes, vec![vec![0, 1, 2, 3], vec![4]]);
        // A sequence over the budget still runs, alone.
        assert_eq!(plan_passes(&[50, 2], 8), vec![vec![0], vec![1]]);
        assert!(plan_passes(&[], 8).is_empty());
    }

    #[test]
    fn pooling_config_must_ask_for_mean_tokens() {
        let mean = r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": false,
            "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false}"#;
        assert_eq!(check_pooling(mean, 384), Ok(()));
        assert!(check_pooling(mean, 768).is_err());
        let cls = r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#;
        assert!(check_pooling(cls, 384).is_err());
    }
}
