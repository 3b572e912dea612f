//! Embeddings from a generative model on a real one: the pooled vectors of one pass are those
//! of each sequence alone (to a cosine of 0.9999), unit length, mean and last-token pooling differ, and inputs
//! beyond the context are refused.
#![allow(clippy::expect_used, reason = "tests: a failure stops the test with its message")]

mod common;

use common::{QWEN, SMOLLM2, load};
use ferry_engine::{EngineError, LocalModel, Pooling};

const TEXTS: [&str; 3] = ["A man is eating food.", "The stock market crashed today.", "Paris is in France."];

fn embed(model: &LocalModel, texts: &[&str]) -> Vec<Vec<f32>> {
    let sequences = texts.iter().map(|t| model.backend.tokenize(t, true)).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(model.embedder().expect("embedder starts").embed(sequences)).expect("embedded")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn check(file: &str) {
    let mut model = load(file, 2);
    let together = embed(&model, &TEXTS);
    assert_eq!(together.len(), 3);
    for (text, vector) in TEXTS.iter().zip(&together) {
        assert_eq!(vector.len(), model.info().n_embd);
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        // The same vector as alone, up to llama.cpp's kernels differing with the batch's shape
        // (Q4_K's repacked matmul: about 1e-3 in a component of Qwen2.5's unit vector).
        let alone = embed(&model, &[text]);
        let cosine: f32 = alone[0].iter().zip(vector).map(|(x, y)| x * y).sum();
        assert!(cosine > 0.9999, "{text}: cosine {cosine}, max diff {}", max_diff(&alone[0], vector));
    }
    assert!(max_diff(&together[0], &together[1]) > 1e-2);
    // Last-token pooling: another vector for the same text (a new embedding thread).
    model = LocalModel::from_backend(model.backend.clone(), model.scheduler.config().clone()).expect("model");
    model.pooling = Pooling::Last;
    let last = embed(&model, &TEXTS[..1]);
    assert!(max_diff(&last[0], &together[0]) > 1e-2);
    // An input longer than the context is refused before it reaches the thread.
    let too_long = vec![1; model.scheduler.config().session.ctx_per_sequence + 1];
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let refused = runtime.block_on(model.embedder().expect("embedder").embed(vec![too_long]));
    assert!(matches!(refused, Err(EngineError::InvalidRequest(_))), "{refused:?}");
}

#[test]
fn smollm2_embeds_each_sequence_as_alone() {
    check(SMOLLM2);
}

#[test]
fn qwen_embeds_each_sequence_as_alone() {
    check(QWEN);
}
