//! The llama.cpp backend, through the `llama-cpp-2` crate: GGUF loading, the vocabulary,
//! and batched decoding over a multi-sequence KV cache. Everything above the forward pass
//! (sampling, stop sequences, scheduling) is Ferry's own and lives elsewhere.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

use crate::backend::{
    Backend, BatchEntry, EmbeddingConfig, EmbeddingSession, FlashAttention, Pooling, Session, SessionConfig,
};
use crate::model_info::{ModelInfo, quantization_name};
use crate::{EngineError, TokenId};

/// llama.cpp's process-wide state; initialised once, on first use.
fn llama_backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            let backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            for device in llama_cpp_2::list_llama_ggml_backend_devices() {
                tracing::info!(
                    device = %device.name,
                    backend = %device.backend,
                    memory_free_mib = device.memory_free >> 20,
                    memory_total_mib = device.memory_total >> 20,
                    "llama.cpp device: {}",
                    device.description
                );
            }
            Ok(backend)
        })
        .as_ref()
        .map_err(|e| EngineError::Load(format!("llama.cpp backend: {e}")))
}

/// A GGUF model loaded by llama.cpp.
pub struct LlamaCppModel {
    model: LlamaModel,
    info: ModelInfo,
    /// The bytes of every token, looked up once (detokenizing is on the hot path).
    pieces: Vec<Vec<u8>>,
    /// The text of each control token.
    controls: Vec<String>,
    eog: Vec<bool>,
}

impl LlamaCppModel {
    /// Loads `path` with `gpu_layers` of its layers on the GPU (`None`: all of them, where
    /// the build has a GPU backend); `progress` is called with the fraction loaded.
    pub fn load(
        id: &str,
        path: &Path,
        gpu_layers: Option<u32>,
        mut progress: impl FnMut(f32) + 'static,
    ) -> Result<Self, EngineError> {
        if !path.is_file() {
            return Err(EngineError::Load(format!("model file {} does not exist", path.display())));
        }
        let backend = llama_backend()?;
        let mut params = LlamaModelParams::default().with_progress_callback(move |p| {
            progress(p);
            true
        });
        if let Some(layers) = gpu_layers {
            params = params.with_n_gpu_layers(layers);
        }
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;

        let meta = |key: &str| model.meta_val_str(key).ok().filter(|v| !v.is_empty());
        let vocab = model.vocab();
        let token_text =
            |t: LlamaToken| vocab.text(t).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let n_vocab = usize::try_from(model.n_vocab()).unwrap_or(0);
        let mut pieces = Vec::with_capacity(n_vocab);
        let mut eog = Vec::with_capacity(n_vocab);
        let mut controls = Vec::new();
        for t in 0..n_vocab {
            let token = LlamaToken(t as i32);
            pieces.push(vocab.token_to_piece(token, false, None));
            eog.push(vocab.is_eog(token));
            if vocab.is_control(token) {
                let text = token_text(token);
                if !text.is_empty() {
                    controls.push(text);
                }
            }
        }
        let file_size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let architecture = meta("general.architecture").unwrap_or_else(|| "unknown".into());
        let n_head = model.n_head();
        let n_head_kv = model.n_head_kv();
        let info = ModelInfo {
            id: id.to_string(),
            path: path.to_path_buf(),
            architecture,
            name: meta("general.name"),
            n_params: model.n_params(),
            file_size,
            quantization: meta("general.file_type")
                .and_then(|v| v.parse::<u32>().ok())
                .map(quantization_name)
                .unwrap_or_else(|| "unknown".into()),
            n_ctx_train: model.n_ctx_train(),
            n_vocab,
            n_layer: model.n_layer(),
            n_embd: usize::try_from(model.n_embd()).unwrap_or(0),
            n_head,
            n_head_kv,
            chat_template: model.chat_template(None).ok().and_then(|t| t.to_string().ok()),
            bos_token: token_text(vocab.bos()),
            eos_token: token_text(vocab.eos()),
            license: meta("general.license"),
            source: meta("general.source.url").or_else(|| meta("general.url")),
            sampling: recommended_sampling(&meta),
        };
        Ok(LlamaCppModel { model, info, pieces, eog, controls })
    }
}

/// The sampling a GGUF file recommends (`general.sampling.*`, written by llama.cpp's converter
/// from the model's `generation_config.json`). Values out of the API's ranges are ignored.
fn recommended_sampling(meta: &dyn Fn(&str) -> Option<String>) -> crate::ModelDefaults {
    let number = |key: &str, range: std::ops::RangeInclusive<f64>| {
        meta(&format!("general.sampling.{key}"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| range.contains(v))
    };
    crate::ModelDefaults {
        temperature: number("temp", 0.0..=2.0),
        top_p: number("top_p", 0.0..=1.0),
        top_k: number("top_k", 0.0..=1e6).map(|k| k as i64),
        min_p: number("min_p", 0.0..=1.0),
        repetition_penalty: number("penalty_repeat", 0.0..=2.0).filter(|&p| p > 0.0),
        ..Default::default()
    }
}

impl Backend for LlamaCppModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize(&self, text: &str, add_special: bool) -> Vec<TokenId> {
        // `add_special` adds BOS/EOS only where the vocabulary asks for them, as llama-server does;
        // special-token text (`<|im_start|>`) always parses to its token.
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .map(|t| t.0 as TokenId)
            .collect()
    }

    fn tokenize_plain(&self, text: &str) -> Vec<TokenId> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), false, false)
            .into_iter()
            .map(|t| t.0 as TokenId)
            .collect()
    }

    fn control_texts(&self) -> &[String] {
        &self.controls
    }

    fn token_bytes(&self, token: TokenId) -> &[u8] {
        self.pieces.get(token as usize).map_or(&[], Vec::as_slice)
    }

    fn is_end_of_generation(&self, token: TokenId) -> bool {
        self.eog.get(token as usize).copied().unwrap_or(false)
    }

    fn new_session(&self, config: &SessionConfig) -> Result<Box<dyn Session + '_>, EngineError> {
        let backend = llama_backend()?;
        let n_seq = config.n_sequences.max(1);
        let shared = config.shared_kv_cells();
        let n_ctx = shared.unwrap_or(config.ctx_per_sequence.saturating_mul(n_seq));
        let threads = i32::try_from(config.threads.max(1)).unwrap_or(1);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx as u32))
            .with_n_batch(config.batch_tokens as u32)
            .with_n_ubatch(config.batch_tokens as u32)
            .with_n_seq_max(n_seq as u32)
            // By default one KV stream per sequence: a token attends only to its own
            // sequence's cells (a unified cache measured slower here for 16 concurrent
            // sequences). Under a KV budget smaller than that, one pool shared by all.
            .with_kv_unified(shared.is_some())
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            // llama.h's `llama_flash_attn_type`.
            .with_flash_attention_policy(match config.flash_attention {
                FlashAttention::Auto => -1,
                FlashAttention::Off => 0,
                FlashAttention::On => 1,
            });
        let context = self
            .model
            .new_context(backend, params)
            .map_err(|e| EngineError::Load(format!("creating the llama.cpp context: {e}")))?;
        Ok(Box::new(LlamaCppSession {
            context,
            batch: LlamaBatch::new(config.batch_tokens.max(n_seq), 1),
            logit_rows: Vec::new(),
        }))
    }

    fn new_embedding_session(
        &self,
        config: &EmbeddingConfig,
    ) -> Result<Box<dyn EmbeddingSession + '_>, EngineError> {
        let backend = llama_backend()?;
        let threads = i32::try_from(config.threads.max(1)).unwrap_or(1);
        let tokens = config.max_tokens.max(1) as u32;
        let params = LlamaContextParams::default()
            .with_embeddings(true)
            .with_pooling_type(match config.pooling {
                Pooling::Mean => LlamaPoolingType::Mean,
                Pooling::Last => LlamaPoolingType::Last,
            })
            // One pool of cells for all sequences of a pass, each sequence whole in one ubatch
            // (llama.cpp pools a sequence within a ubatch).
            .with_n_ctx(NonZeroU32::new(tokens))
            .with_n_batch(tokens)
            .with_n_ubatch(tokens)
            .with_n_seq_max(config.max_sequences.max(1) as u32)
            .with_kv_unified(true)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let context = self
            .model
            .new_context(backend, params)
            .map_err(|e| EngineError::Load(format!("creating the llama.cpp embedding context: {e}")))?;
        Ok(Box::new(LlamaCppEmbedding { context, batch: LlamaBatch::new(config.max_tokens.max(1), 1) }))
    }
}

struct LlamaCppEmbedding<'m> {
    context: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
}

impl EmbeddingSession for LlamaCppEmbedding<'_> {
    fn embed(&mut self, sequences: &[&[TokenId]]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.context.clear_kv_cache();
        self.batch.clear();
        for (seq, tokens) in sequences.iter().enumerate() {
            for (pos, &token) in tokens.iter().enumerate() {
                // Every token is an output: llama.cpp pools the outputs of each sequence.
                self.batch
                    .add(LlamaToken(token as i32), pos as i32, &[seq as i32], true)
                    .map_err(|e| EngineError::Decode(e.to_string()))?;
            }
        }
        self.context.decode(&mut self.batch).map_err(|e| EngineError::Decode(e.to_string()))?;
        let mut out = Vec::with_capacity(sequences.len());
        for seq in 0..sequences.len() {
            let pooled = self
                .context
                .embeddings_seq_ith(seq as i32)
                .map_err(|e| EngineError::Decode(format!("reading sequence {seq}'s embedding: {e}")))?;
            let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt();
            out.push(pooled.iter().map(|x| if norm > 0.0 { x / norm } else { *x }).collect());
        }
        Ok(out)
    }
}

struct LlamaCppSession<'m> {
    context: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// Batch indices that asked for logits in the last decode, in order.
    logit_rows: Vec<i32>,
}

impl Session for LlamaCppSession<'_> {
    fn decode(&mut self, entries: &[BatchEntry]) -> Result<(), EngineError> {
        self.batch.clear();
        self.logit_rows.clear();
        for (i, entry) in entries.iter().enumerate() {
            self.batch
                .add(LlamaToken(entry.token as i32), entry.pos as i32, &[entry.seq as i32], entry.logits)
                .map_err(|e| EngineError::Decode(e.to_string()))?;
            if entry.logits {
                self.logit_rows.push(i as i32);
            }
        }
        self.context.decode(&mut self.batch).map_err(|e| EngineError::Decode(e.to_string()))
    }

    fn logits(&self, row: usize) -> &[f32] {
        match self.logit_rows.get(row) {
            Some(&i) => self.context.get_logits_ith(i),
            None => &[],
        }
    }

    fn clear_sequence(&mut self, seq: usize) {
        let _ = self.context.clear_kv_cache_seq(Some(seq as u32), None, None);
    }

    fn copy_sequence(&mut self, src: usize, dst: usize) {
        // With one KV stream per sequence (`kv_unified(false)`) llama.cpp copies only whole
        // sequences across streams: the stream's buffer is copied at the next decode, after
        // the cell metadata here. Callers drop the cells they do not want with `remove_range`.
        let _ = self.context.copy_kv_cache_seq(src as i32, dst as i32, None, None);
    }

    fn remove_range(&mut self, seq: usize, p0: usize, p1: Option<usize>) -> bool {
        let p1 = p1.map(|p| u32::try_from(p).unwrap_or(u32::MAX));
        let p0 = u32::try_from(p0).unwrap_or(u32::MAX);
        self.context.clear_kv_cache_seq(Some(seq as u32), Some(p0), p1).unwrap_or(false)
    }
}
