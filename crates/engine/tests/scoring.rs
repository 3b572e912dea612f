//! Scoring jobs on a real model: a variant forked from the base's KV cache scores exactly as
//! the same tokens computed from scratch, the job takes few batched steps, and a cancelled
//! job leaves no cells behind.
#![allow(clippy::expect_used, reason = "tests: a failure stops the test with its message")]
#![expect(clippy::single_range_in_vec_init, reason = "variants here mask one range each")]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{SMOLLM2, load, load_with, request, run};
use ferry_engine::{
    ChatMessage, Event, LocalModel, SamplingParams, ScoreEvent, ScoreRequest, ScoreVariant, TokenId,
    TokenInfo,
};

const FACTS: &str = "Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo. Where does Alice live?";

/// The chat prompt of `content` followed by `completion`'s tokens, and the completion's length.
fn conversation(model: &LocalModel, content: &str, completion: &str) -> (Vec<TokenId>, usize) {
    let messages = vec![ChatMessage::new("user", content)];
    let mut tokens = model.chat_prompt(&messages).expect("prompt");
    let completion = model.backend.tokenize(completion, false);
    tokens.extend_from_slice(&completion);
    (tokens, completion.len())
}

/// Runs a job to its end: the base's scored tokens and each variant's.
fn score(model: &LocalModel, request: ScoreRequest) -> (Vec<TokenInfo>, Vec<Vec<TokenInfo>>) {
    let (base, _, variants) = score_cached(model, request);
    (base, variants)
}

/// As [`score`], with how many of the base's tokens came from the cache.
fn score_cached(model: &LocalModel, request: ScoreRequest) -> (Vec<TokenInfo>, usize, Vec<Vec<TokenInfo>>) {
    let n_variants = request.variants.len();
    let mut receiver = model.scheduler.score(request).expect("submitted");
    let mut base = None;
    let mut variants = vec![None; n_variants];
    while let Some(event) = receiver.blocking_recv() {
        match event {
            ScoreEvent::Base { tokens, cached } => base = Some((tokens, cached)),
            ScoreEvent::Variant { index, tokens } => variants[index] = Some(tokens),
            ScoreEvent::Error(e) => panic!("engine error: {e}"),
        }
    }
    let variants = variants.into_iter().map(|v| v.expect("every variant reports")).collect();
    let (base, cached) = base.expect("the base reports");
    (base, cached, variants)
}

fn alone(tokens: &[TokenId], n_scored: usize) -> ScoreRequest {
    ScoreRequest { tokens: tokens.to_vec(), n_scored, top_logprobs: 0, variants: Vec::new(), cache_scope: 0 }
}

fn assert_close(a: &[TokenInfo], b: &[TokenInfo], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.token, y.token, "{what}");
        assert!((x.logprob - y.logprob).abs() < 1e-3, "{what}: {} vs {}", x.logprob, y.logprob);
    }
}

/// A variant that keeps the base's cells up to `keep` and decodes the rest again.
fn tail_from(tokens: &[TokenId], keep: usize, masked: Vec<std::ops::Range<usize>>, n: usize) -> ScoreVariant {
    ScoreVariant { keep, masked, tokens: tokens[keep..].to_vec(), n_scored: n }
}

#[test]
fn the_base_scores_as_completions_echo_does() {
    let model = load(SMOLLM2, 4);
    let (tokens, n) = conversation(&model, FACTS, "Alice lives in Paris");
    let (base, _) = score(&model, ScoreRequest { top_logprobs: 5, ..alone(&tokens, n) });
    assert!(base.iter().all(|t| t.top.len() == 5));
    let mut echo = request(tokens.clone(), 1, SamplingParams::greedy());
    echo.prompt_logprobs = true;
    let receiver = model.scheduler.submit(echo).expect("submitted");
    let mut stream = receiver;
    let rest = loop {
        match stream.blocking_recv().expect("the engine answers") {
            Event::PromptLogprobs { rest, .. } => break rest,
            Event::Error(e) => panic!("engine error: {e}"),
            _ => {}
        }
    };
    assert_close(&base, &rest[rest.len() - n..], "base vs echo");
}

#[test]
fn a_forked_variant_without_a_mask_scores_as_the_base() {
    let model = load(SMOLLM2, 4);
    let (tokens, n) = conversation(&model, FACTS, "Alice lives in Paris");
    let keep = tokens.len() - n - 3;
    let variants = vec![tail_from(&tokens, keep, Vec::new(), n), tail_from(&tokens, 0, Vec::new(), n)];
    let (base, scored) = score(&model, ScoreRequest { variants, ..alone(&tokens, n) });
    assert_close(&base, &scored[0], "forked at the tail");
    assert_close(&base, &scored[1], "recomputed whole");
}

#[test]
fn a_variant_from_the_common_prefix_scores_as_its_own_text() {
    let model = load(SMOLLM2, 4);
    let (tokens, n) = conversation(&model, FACTS, "Paris");
    let (removed, _) =
        conversation(&model, "Bob lives in Rome. Carol lives in Oslo. Where does Alice live?", "Paris");
    let common = tokens.iter().zip(&removed).take_while(|(a, b)| a == b).count();
    let variant = tail_from(&removed, common, Vec::new(), n);
    let (_, scored) = score(&model, ScoreRequest { variants: vec![variant], ..alone(&tokens, n) });
    let (fresh, _) = score(&model, alone(&removed, n));
    assert_close(&fresh, &scored[0], "forked at the common prefix vs computed alone");
    // Masking the fact's cells (and recomputing only the turn's end) moves the answer too.
    let start = tokens.iter().position(|&t| model.token_text(t).contains("Alice")).expect("Alice");
    let end = tokens.iter().position(|&t| model.token_text(t).contains("Bob")).expect("Bob");
    let tail = tokens.len() - n - 4;
    let masked = tail_from(&tokens, tail, vec![start..end], n);
    let (base, scored) = score(&model, ScoreRequest { variants: vec![masked], ..alone(&tokens, n) });
    let total = |t: &[TokenInfo]| t.iter().map(|t| t.logprob).sum::<f32>();
    assert!(total(&scored[0]) < total(&base) - 0.1, "{} vs {}", total(&scored[0]), total(&base));
}

#[test]
fn twenty_variants_take_few_steps() {
    let model = load(SMOLLM2, 8);
    let (tokens, n) = conversation(&model, FACTS, "Alice lives in Paris");
    let tail = tokens.len() - n - 4;
    let variants: Vec<ScoreVariant> =
        (0..20).map(|i| tail_from(&tokens, tail, vec![i + 1..i + 3], n)).collect();
    let steps_before = model.scheduler.stats().steps.load(Ordering::SeqCst);
    let (_, scored) = score(&model, ScoreRequest { variants, ..alone(&tokens, n) });
    let steps = model.scheduler.stats().steps.load(Ordering::SeqCst) - steps_before;
    assert_eq!(scored.len(), 20);
    // One step for the base, then seven variants per step in the other slots.
    assert!(steps <= 5, "{steps} steps");
    assert_eq!(model.scheduler.stats().running.load(Ordering::SeqCst), 0);
}

#[test]
fn a_cancelled_job_frees_its_slots_and_cells() {
    let model = load(SMOLLM2, 4);
    let (tokens, n) = conversation(&model, FACTS, "Alice lives in Paris");
    // Variants that recompute almost everything, so the job is still running when dropped.
    let variants: Vec<ScoreVariant> = (0..40).map(|_| tail_from(&tokens, 1, Vec::new(), n)).collect();
    let mut receiver =
        model.scheduler.score(ScoreRequest { variants, ..alone(&tokens, n) }).expect("submitted");
    assert!(matches!(receiver.blocking_recv(), Some(ScoreEvent::Base { .. })));
    drop(receiver);
    let deadline = Instant::now() + Duration::from_secs(60);
    while model.scheduler.stats().running.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "the cancelled job still holds slots");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every slot starts empty again: a cell left behind would make llama.cpp refuse a new
    // sequence at position 0, or change what it computes.
    let prompt = model.chat_prompt(&[ChatMessage::new("user", "Name a colour.")]);
    let prompt = prompt.expect("prompt");
    let mut all = request(prompt.clone(), 8, SamplingParams::greedy());
    all.n = 4;
    let together = run(&model, all);
    let one = run(&model, request(prompt, 8, SamplingParams::greedy())).remove(0);
    for out in together {
        assert_eq!(out.tokens, one.tokens);
    }
    let (fresh, _) = score(&model, alone(&tokens, n));
    let variants = vec![tail_from(&tokens, 5, Vec::new(), n); 3];
    let (base, scored) = score(&model, ScoreRequest { variants, ..alone(&tokens, n) });
    assert_close(&fresh, &base, "base after the cancellation");
    for s in &scored {
        assert_close(&fresh, s, "variant after the cancellation");
    }
}

#[test]
fn with_the_prefix_cache_a_base_starts_from_the_generation_it_explains() {
    let model = load_with(SMOLLM2, 4, true);
    let (tokens, n) = conversation(&model, FACTS, "Paris");
    let prompt = tokens[..tokens.len() - n].to_vec();
    let generated = run(&model, request(prompt.clone(), 2, SamplingParams::greedy()));
    assert_eq!(generated.len(), 1);
    let variant = || tail_from(&tokens, tokens.len() - n - 1, vec![2..6], n);
    let job = || ScoreRequest { variants: vec![variant()], ..alone(&tokens, n) };
    // The generation's cells hold the prompt: all of it but its last token is reused (that
    // token's logits score the completion's first).
    let (base, cached, scored) = score_cached(&model, job());
    assert_eq!(cached, prompt.len() - 1);
    // An explanation of the same conversation again starts from the first job's base.
    let (again, cached_again, scored_again) = score_cached(&model, job());
    assert_eq!(cached_again, prompt.len() - 1);
    // The same scores as computing everything (within llama.cpp's batch-shape drift).
    let fresh_model = load(SMOLLM2, 4);
    let (fresh, cached_fresh, fresh_scored) = score_cached(&fresh_model, job());
    assert_eq!(cached_fresh, 0);
    assert_close(&fresh, &base, "base from the generation's cells vs computed");
    assert_close(&fresh, &again, "base from the last job's cells vs computed");
    assert_close(&fresh_scored[0], &scored[0], "variant forked from a reused base");
    assert_close(&fresh_scored[0], &scored_again[0], "variant forked from a reused base, again");
}
