//! Shared helpers of the engine tests: the real test models and a way to run a request
//! to completion.
#![allow(clippy::expect_used, reason = "test helpers: a failure stops the test with its message")]
#![allow(dead_code)]

use std::path::PathBuf;

use ferry_engine::{
    Event, FinishReason, GenerateRequest, LocalModel, SamplingParams, SchedulerConfig, SessionConfig, TokenId,
};

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN: &str = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf";

/// The models directory: FERRY_MODELS_DIR, or models/ at the workspace root.
pub fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("FERRY_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join(file);
    assert!(path.is_file(), "{} is missing: run `python3 scripts/fetch-models.py` first", path.display());
    path
}

pub fn load(file: &str, n_sequences: usize) -> LocalModel {
    load_with(file, n_sequences, false)
}

/// `load` with the prefix cache on or off.
pub fn load_with(file: &str, n_sequences: usize, prefix_cache: bool) -> LocalModel {
    load_config(file, config(n_sequences, prefix_cache))
}

/// The tests' scheduler config: 1024 tokens per sequence, no KV budget, no deadline.
pub fn config(n_sequences: usize, prefix_cache: bool) -> SchedulerConfig {
    SchedulerConfig {
        session: SessionConfig {
            n_sequences,
            ctx_per_sequence: 1024,
            batch_tokens: 512,
            threads: 2,
            kv_budget: None,
            gpu_layers: None,
            flash_attention: Default::default(),
        },
        prefill_chunk: 256,
        max_waiting: 64,
        prefix_cache,
        request_timeout: None,
    }
}

pub fn load_config(file: &str, config: SchedulerConfig) -> LocalModel {
    LocalModel::load(file, &model_path(file), config, |_| {}).expect("model loads")
}

/// What one choice produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Output {
    pub text: String,
    /// Each delta as it arrived.
    pub deltas: Vec<String>,
    pub tokens: Vec<TokenId>,
    /// Each token's logprob (the request's `logprobs` is `Some(0)`).
    pub logprobs: Vec<f32>,
    pub finish: Option<FinishReason>,
    pub completion_tokens: usize,
    /// Prompt tokens the prefix cache served.
    pub cached_tokens: usize,
}

pub fn request(prompt: Vec<TokenId>, max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens,
        n: 1,
        sampling,
        stop: Vec::new(),
        free_text: None,
        logprobs: Some(0),
        prompt_logprobs: false,
        ignore_eos: false,
        constraint: None,
        sampled: None,
        cache_scope: 0,
    }
}

/// Submits and waits for every choice.
pub fn run(model: &LocalModel, request: GenerateRequest) -> Vec<Output> {
    let receiver = model.scheduler.submit(request.clone()).expect("submitted");
    collect(receiver, request.n)
}

pub fn collect(mut receiver: tokio::sync::mpsc::UnboundedReceiver<Event>, n: usize) -> Vec<Output> {
    let mut outputs = vec![Output::default(); n];
    let mut open = n;
    while open > 0 {
        match receiver.blocking_recv().expect("the engine answers") {
            Event::Delta { choice, text, tokens } => {
                let o = &mut outputs[choice];
                o.text.push_str(&text);
                o.deltas.push(text);
                o.tokens.extend(tokens.iter().map(|t| t.token));
                o.logprobs.extend(tokens.iter().map(|t| t.logprob));
            }
            Event::Finished { choice, reason, completion_tokens, cached_tokens, .. } => {
                outputs[choice].finish = Some(reason);
                outputs[choice].completion_tokens = completion_tokens;
                outputs[choice].cached_tokens = cached_tokens;
                open -= 1;
            }
            Event::Error(e) => panic!("engine error: {e}"),
            Event::DeadlineExceeded { .. } => panic!("deadline exceeded"),
            Event::PromptLogprobs { .. } => {}
        }
    }
    outputs
}
