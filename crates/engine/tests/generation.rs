//! The engine on a real model: reference greedy tokens, seeded sampling, batching that
//! does not change results, stop sequences across token boundaries and UTF-8 streaming.

mod common;

use common::{Output, QWEN, SMOLLM2, collect, load, request, run};
use ferry_engine::{ChatMessage, FinishReason, FlashAttention, GenerateRequest, SamplingParams};
use serde_json::Value;

fn user(content: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", content)]
}

/// data/greedy_reference.json holds prompt token ids and the greedy continuation that
/// llama.cpp's own llama-server produced for them (tests/reference/make_greedy_refs.py).
#[test]
fn greedy_matches_llama_cpp_reference() {
    let cases: Vec<Value> =
        serde_json::from_str(include_str!("data/greedy_reference.json")).expect("reference data parses");
    assert!(cases.len() >= 4);
    let model = load(SMOLLM2, 1);
    for case in cases.iter().filter(|c| c["model"] == SMOLLM2) {
        let prompt: Vec<u32> = serde_json::from_value(case["prompt_tokens"].clone()).expect("prompt");
        let expected: Vec<u32> = serde_json::from_value(case["tokens"].clone()).expect("tokens");
        let out = &run(&model, request(prompt, expected.len(), SamplingParams::greedy()))[0];
        let n = out.tokens.len();
        assert_eq!(out.tokens, expected[..n], "{}", case["name"]);
        assert!(n == expected.len() || out.finish == Some(FinishReason::Stop), "{}", case["name"]);
    }
}

/// The prefix cache: a finished request's cells stay in its slot, and a later prompt that
/// starts the same way recomputes only what differs, with the same greedy answer.
#[test]
fn a_repeated_prompt_reuses_its_cached_prefix() {
    let model = common::load_with(SMOLLM2, 2, true);
    let prompt = model.chat_prompt(&user("Name three colours of the rainbow.")).expect("prompt");
    let first = &run(&model, request(prompt.clone(), 12, SamplingParams::greedy()))[0];
    let again = &run(&model, request(prompt.clone(), 12, SamplingParams::greedy()))[0];
    assert_eq!(first.cached_tokens, 0);
    // All but the last prompt token, whose logits give the first new token.
    assert_eq!(again.cached_tokens, prompt.len() - 1);
    assert_eq!(again.tokens, first.tokens);
    // A follow-up turn shares the first turn's prompt and answer.
    let mut turn = user("Name three colours of the rainbow.");
    turn.push(ChatMessage::new("assistant", first.text.clone()));
    turn.push(ChatMessage::new("user", "And one more?"));
    let follow = model.chat_prompt(&turn).expect("prompt");
    let next = &run(&model, request(follow.clone(), 8, SamplingParams::greedy()))[0];
    let fresh_model = load(SMOLLM2, 1);
    let fresh = &run(&fresh_model, request(follow, 8, SamplingParams::greedy()))[0];
    assert!(next.cached_tokens >= prompt.len() - 1, "{} cached", next.cached_tokens);
    assert_eq!(fresh.cached_tokens, 0);
    assert_eq!(next.tokens, fresh.tokens);
}

/// With the prefix cache and flash attention off, reusing a long prompt's cells gives exactly
/// the logprobs recomputing them gives: the next turn's answer does not depend on the turn
/// before it having been cached. With llama.cpp's CPU flash attention it would (this test
/// fails with `FlashAttention::On`): the first turn's prompt is computed 64 or more tokens to
/// a batch (its tiled kernel), while the follow-up's tail is computed with fewer.
#[test]
fn without_flash_attention_a_cached_prefix_gives_exactly_the_recomputed_logprobs() {
    let facts: String = (0..12).map(|i| format!("Fact {i}: box {i} holds {} coins. ", i * 7 % 31)).collect();
    let mut turns =
        vec![ChatMessage::new("system", facts), ChatMessage::new("user", "Which box holds the most coins?")];
    let exact = |n_sequences| {
        let mut config = common::config(n_sequences, true);
        config.session.flash_attention = FlashAttention::Off;
        common::load_config(SMOLLM2, config)
    };
    let model = exact(2);
    let prompt = model.chat_prompt(&turns).expect("prompt");
    assert!(prompt.len() >= 128, "a prompt long enough for the tiled kernel: {}", prompt.len());
    let first = &run(&model, request(prompt.clone(), 16, SamplingParams::greedy()))[0];
    turns.push(ChatMessage::new("assistant", first.text.clone()));
    turns.push(ChatMessage::new("user", "And which one holds the fewest?"));
    let follow = model.chat_prompt(&turns).expect("prompt");
    let cached = &run(&model, request(follow.clone(), 16, SamplingParams::greedy()))[0];
    let fresh_model = exact(1);
    let fresh = &run(&fresh_model, request(follow, 16, SamplingParams::greedy()))[0];
    assert!(cached.cached_tokens >= prompt.len() - 1, "{} cached", cached.cached_tokens);
    assert_eq!(fresh.cached_tokens, 0);
    assert_eq!(cached.tokens, fresh.tokens);
    assert_eq!(cached.logprobs, fresh.logprobs, "bit for bit");
}

/// Cached prefixes are shared only within a cache scope (the server's tenants): another
/// scope's request recomputes the whole prompt and leaves the owner's cells alone.
#[test]
fn a_cached_prefix_is_reused_only_within_its_scope() {
    let model = common::load_with(SMOLLM2, 3, true);
    let prompt = model.chat_prompt(&user("Name three colours of the rainbow.")).expect("prompt");
    let in_scope = |scope| GenerateRequest {
        cache_scope: scope,
        ..request(prompt.clone(), 4, SamplingParams::greedy())
    };
    let owner = &run(&model, in_scope(7))[0];
    let other = &run(&model, in_scope(8))[0];
    let single_user = &run(&model, in_scope(0))[0];
    let owner_again = &run(&model, in_scope(7))[0];
    let other_again = &run(&model, in_scope(8))[0];
    assert_eq!((owner.cached_tokens, other.cached_tokens, single_user.cached_tokens), (0, 0, 0));
    assert_eq!(owner_again.cached_tokens, prompt.len() - 1);
    assert_eq!(other_again.cached_tokens, prompt.len() - 1);
    assert_eq!(owner_again.tokens, owner.tokens);
}

#[test]
fn same_seed_same_text() {
    let model = load(SMOLLM2, 2);
    let prompt = model.chat_prompt(&user("Write a short poem about the sea.")).expect("prompt");
    let sampling = |seed| SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    let a = &run(&model, request(prompt.clone(), 40, sampling(42)))[0];
    let b = &run(&model, request(prompt.clone(), 40, sampling(42)))[0];
    let c = &run(&model, request(prompt, 40, sampling(7)))[0];
    assert_eq!(a.text, b.text);
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens, "a different seed should give a different sample");
}

#[test]
fn batched_equals_alone() {
    let model = load(SMOLLM2, 8);
    let questions = [
        "What is the capital of France?",
        "Name a primary colour.",
        "Count from one to five.",
        "What do bees make?",
        "Translate 'cat' into Spanish.",
        "Give me a synonym for happy, and explain it in a long sentence with many words in it.",
        "What is 2 + 2?",
        "Describe the moon in one sentence.",
    ];
    let prompts: Vec<_> = questions.iter().map(|q| model.chat_prompt(&user(q)).expect("prompt")).collect();
    let alone: Vec<Output> = prompts
        .iter()
        .map(|p| run(&model, request(p.clone(), 24, SamplingParams::greedy())).remove(0))
        .collect();
    let steps_before = model.scheduler.stats().steps.load(std::sync::atomic::Ordering::SeqCst);
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| model.scheduler.submit(request(p.clone(), 24, SamplingParams::greedy())).expect("submitted"))
        .collect();
    let together: Vec<Output> = receivers.into_iter().map(|r| collect(r, 1).remove(0)).collect();
    let steps = model.scheduler.stats().steps.load(std::sync::atomic::Ordering::SeqCst) - steps_before;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.tokens, t.tokens, "prompt {i}: {:?} vs {:?}", a.text, t.text);
    }
    // Decoded together: far fewer forward passes than 8 × 24.
    assert!(steps < 60, "{steps} steps for 8 sequences of 24 tokens");
}

#[test]
fn stop_sequence_split_across_tokens() {
    let model = load(SMOLLM2, 1);
    let prompt = model.chat_prompt(&user("Tell me about the city of Paris.")).expect("prompt");
    let free = &run(&model, request(prompt.clone(), 40, SamplingParams::greedy()))[0];
    // A stop string made of the end of one token's text and the start of the next.
    let pieces: Vec<String> = free.tokens.iter().map(|&t| model.token_text(t)).collect();
    let k = (5..pieces.len() - 1)
        .find(|&k| pieces[k].chars().count() >= 2 && pieces[k + 1].chars().count() >= 2)
        .expect("two multi-character tokens in a row");
    let tail: String = pieces[k].chars().rev().take(2).collect::<Vec<_>>().into_iter().rev().collect();
    let head: String = pieces[k + 1].chars().take(2).collect();
    let stop = format!("{tail}{head}");
    let mut req = request(prompt, 40, SamplingParams::greedy());
    req.stop = vec![stop.clone()];
    let stopped = &run(&model, req)[0];
    let at = free.text.find(&stop).expect("the stop string occurs in the free text");
    assert_eq!(stopped.text, free.text[..at]);
    assert_eq!(stopped.finish, Some(FinishReason::Stop));
    assert!(!stopped.text.contains(&stop));
    // The logprobs end with the answer: the token that straddles the stop string is one of
    // them (part of its text is in the answer), the next one, wholly inside it, is not.
    let mut start = 0;
    let kept: Vec<u32> = free
        .tokens
        .iter()
        .zip(&pieces)
        .take_while(|(_, piece)| {
            let begins = start;
            start += piece.len();
            begins < at
        })
        .map(|(&token, _)| token)
        .collect();
    assert_eq!(stopped.tokens, kept);
    assert!(kept.len() < free.tokens.len() && stopped.completion_tokens > kept.len());
}

#[test]
fn multibyte_utf8_streams_whole_characters() {
    // Qwen's byte-level vocabulary spells these four-byte letters with two tokens each, so
    // the continuation splits characters across tokens.
    let model = load(QWEN, 1);
    let prompt = model.backend.tokenize("𝔄𝔅ℭ𝔇𝔈𝔉𝔊ℌℑ𝔍𝔎𝔏", true);
    let out = &run(&model, request(prompt, 12, SamplingParams::greedy()))[0];
    let split = out.tokens.iter().any(|&t| std::str::from_utf8(model.backend.token_bytes(t)).is_err());
    assert!(split, "a character should be split across tokens: {:?}", out.text);
    let bytes: Vec<u8> = out.tokens.iter().flat_map(|&t| model.backend.token_bytes(t).to_vec()).collect();
    // Twelve tokens, two per letter: the text is exactly the bytes decoded, no U+FFFD.
    let whole = String::from_utf8(bytes).expect("the tokens form whole characters");
    assert_eq!(out.text, whole);
    assert!(out.text.chars().count() >= 3, "{:?}", out.text);
    // Deltas carry whole characters only: a token holding half a letter sends nothing.
    assert!(out.deltas.len() < out.tokens.len(), "{:?}", out.deltas);
    assert_eq!(out.deltas.concat(), out.text);
}

#[test]
fn max_tokens_gives_length_and_exact_counts() {
    let model = load(SMOLLM2, 2);
    let prompt = model.chat_prompt(&user("Write a long story about a dragon.")).expect("prompt");
    let mut req = request(prompt, 7, SamplingParams::greedy());
    req.n = 2;
    let outs = run(&model, req);
    for out in outs {
        assert_eq!(out.finish, Some(FinishReason::Length));
        assert_eq!(out.completion_tokens, 7);
        assert_eq!(out.tokens.len(), 7);
    }
}
