//! The engine under load, on a real model: deadlines end requests and free their slots, and
//! queued requests are served first come first served, long prompts included. Assertions are
//! on events, counters and order, never on how long anything took.
#![allow(clippy::expect_used, reason = "tests: a failure stops the test with its message")]

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{SMOLLM2, collect, load, request};
use ferry_engine::{ChatMessage, Event, LocalModel, SamplingParams, Timings, TokenId};
use tokio::sync::mpsc::UnboundedReceiver;

fn prompt(model: &LocalModel, text: &str) -> Vec<TokenId> {
    model.chat_prompt(&[ChatMessage::new("user", text)]).expect("prompt")
}

/// Waits for the request's last event, counting the tokens its deltas carried.
fn last_event(receiver: &mut UnboundedReceiver<Event>) -> (Event, usize) {
    let mut delivered = 0;
    loop {
        let event = receiver.blocking_recv().expect("the engine answers");
        match event {
            Event::Delta { tokens, .. } => delivered += tokens.len(),
            Event::PromptLogprobs { .. } => {}
            last => return (last, delivered),
        }
    }
}

/// The timings of a request's only choice, or a panic naming what came instead.
fn finished(receiver: &mut UnboundedReceiver<Event>) -> (Timings, usize) {
    match last_event(receiver) {
        (Event::Finished { timings, completion_tokens, .. }, _) => (timings, completion_tokens),
        (other, _) => panic!("expected Finished, got {other:?}"),
    }
}

#[test]
fn a_request_past_its_deadline_is_cancelled_and_its_slot_freed() {
    // One slot: every request below needs the one before it to have let go of it.
    let model = load(SMOLLM2, 1);
    let stats = model.scheduler.stats();
    let tokens = prompt(&model, "Tell me a very long story about the sea.");

    // Already past its deadline when it is submitted: it never leaves the queue.
    let mut queued = model
        .scheduler
        .submit_until(request(tokens.clone(), 8, SamplingParams::greedy()), Some(Instant::now()))
        .expect("submitted");
    let (event, _) = last_event(&mut queued);
    assert_eq!(event, Event::DeadlineExceeded { admitted: false, completion_tokens: 0 });
    assert!(queued.blocking_recv().is_none(), "no event after DeadlineExceeded");

    // Generating (end-of-generation ignored, up to the whole context) when its deadline passes:
    // it ends with the tokens it had sampled, and nothing after.
    let mut long = request(tokens.clone(), 1024 - tokens.len(), SamplingParams::greedy());
    long.ignore_eos = true;
    let mut running = model
        .scheduler
        .submit_until(long, Instant::now().checked_add(Duration::from_millis(300)))
        .expect("submitted");
    let (event, delivered) = last_event(&mut running);
    let Event::DeadlineExceeded { admitted: true, completion_tokens } = event else {
        panic!("expected DeadlineExceeded after admission, got {event:?}");
    };
    assert!(completion_tokens >= delivered, "{completion_tokens} sampled, {delivered} delivered");
    assert!(completion_tokens < 1024 - tokens.len());
    // The channel closes once the scheduler has dropped the request, slot freed.
    assert!(running.blocking_recv().is_none(), "no event after DeadlineExceeded");
    assert_eq!(stats.running.load(Ordering::SeqCst), 0);
    assert_eq!(stats.waiting.load(Ordering::SeqCst), 0);
    assert_eq!(stats.expired.load(Ordering::Relaxed), 2);

    // The slot serves the next request, whose generous deadline does not interfere.
    let far = Instant::now().checked_add(Duration::from_secs(3600));
    let receiver =
        model.scheduler.submit_until(request(tokens, 8, SamplingParams::greedy()), far).expect("submitted");
    let out = collect(receiver, 1);
    assert_eq!(out[0].completion_tokens, out[0].tokens.len());
    assert!(out[0].finish.is_some());
    assert_eq!(stats.expired.load(Ordering::Relaxed), 2);
}

#[test]
fn queued_requests_are_served_first_come_first_served() {
    let model = load(SMOLLM2, 1);
    let questions = ["Name a colour.", "Name a fruit.", "Name a city.", "Name a river.", "Name a tree."];
    let mut receivers: Vec<_> = questions
        .iter()
        .map(|q| {
            model
                .scheduler
                .submit(request(prompt(&model, q), 6, SamplingParams::greedy()))
                .expect("submitted")
        })
        .collect();
    let timings: Vec<Timings> = receivers.iter_mut().map(|r| finished(r).0).collect();
    // With one slot each request is admitted after the one before it finished.
    for pair in timings.windows(2) {
        assert!(pair[0].finished <= pair[1].admitted, "admitted out of order: {timings:?}");
    }
    assert_eq!(model.scheduler.stats().admitted.load(Ordering::Relaxed), questions.len() as u64);
}

#[test]
fn a_long_prompt_among_short_ones_is_admitted_in_turn_and_finishes() {
    let model = load(SMOLLM2, 2);
    let short = |i: usize| prompt(&model, &format!("Say the number {i}."));
    // About 900 tokens: four prefill chunks of 256 while the other slot decodes.
    let filler = "The quick brown fox jumps over the lazy dog. ".repeat(90);
    let long_prompt = prompt(&model, &filler);
    assert!(long_prompt.len() > 3 * 256 && long_prompt.len() < 1000, "{} tokens", long_prompt.len());

    let mut order = Vec::new();
    let mut submit = |tokens: Vec<TokenId>, max_tokens: usize| {
        let mut r = request(tokens, max_tokens, SamplingParams::greedy());
        r.ignore_eos = true;
        order.push(model.scheduler.submit(r).expect("submitted"));
    };
    submit(short(0), 24);
    submit(long_prompt.clone(), 16);
    for i in 1..7 {
        submit(short(i), 24);
    }
    let results: Vec<(Timings, usize)> = order.iter_mut().map(finished).collect();
    // Everyone finishes with the tokens it asked for, the long prompt too.
    let expected = [24, 16, 24, 24, 24, 24, 24, 24];
    let counts: Vec<usize> = results.iter().map(|r| r.1).collect();
    assert_eq!(counts, expected);
    // Admission follows submission: no later short prompt overtakes the long one.
    for pair in results.windows(2) {
        assert!(pair[0].0.admitted <= pair[1].0.admitted, "admitted out of order");
    }
    // The first short request was mid-stream when the long prompt's prefill (in chunks,
    // beside its decoding) produced its first token.
    let (first, long) = (results[0].0, results[1].0);
    assert!(first.first_token <= long.first_token && long.first_token <= first.finished);
    assert_eq!(model.scheduler.stats().waiting.load(Ordering::SeqCst), 0);
}

#[test]
fn with_nothing_decoding_a_step_prefills_the_whole_batch() {
    let model = load(SMOLLM2, 2);
    // About 450 tokens: two chunks of 256, but one batch of 512.
    let long_prompt = prompt(&model, &"The quick brown fox jumps over the lazy dog. ".repeat(45));
    assert!(long_prompt.len() > 256 && long_prompt.len() < 512, "{} tokens", long_prompt.len());
    let steps = || model.scheduler.stats().steps.load(Ordering::SeqCst);
    let before = steps();
    let mut receiver =
        model.scheduler.submit(request(long_prompt, 1, SamplingParams::greedy())).expect("submitted");
    assert_eq!(finished(&mut receiver).1, 1);
    // One forward pass: the whole prompt, and the first token sampled from its last row.
    assert_eq!(steps() - before, 1);
}

/// Two sequences of 256 tokens sharing a pool of 512 cells, prefix cache on.
fn budgeted(n_sequences: usize) -> LocalModel {
    let mut config = common::config(n_sequences, true);
    config.session.ctx_per_sequence = 256;
    config.session.kv_budget = Some(512);
    common::load_config(SMOLLM2, config)
}

/// A prompt of plain tokens starting with `first` (distinct first tokens share no prefix).
fn plain_prompt(first: TokenId, len: usize) -> Vec<TokenId> {
    (0..len as TokenId).map(|i| first + i).collect()
}

#[test]
fn under_a_kv_budget_cached_prefixes_are_evicted_to_admit_requests() {
    let model = budgeted(4);
    let stats = model.scheduler.stats();
    let a = plain_prompt(1000, 20);
    let _ = common::run(&model, request(a.clone(), 4, SamplingParams::greedy()));
    // The prefix cache works in the shared pool: the same prompt again reuses all but one token.
    let again = common::run(&model, request(a.clone(), 4, SamplingParams::greedy()));
    assert_eq!(again[0].cached_tokens, a.len() - 1);

    // Two requests reserving 250 cells each do not fit beside the cached prefix (500 + 23
    // > 512): it is evicted, though its slot was never needed (fresh slots go first).
    let big = |first| request(plain_prompt(first, 20), 230, SamplingParams::greedy());
    let receivers = [2000, 3000].map(|first| model.scheduler.submit(big(first)).expect("submitted"));
    for r in receivers {
        let out = collect(r, 1);
        assert!(out[0].finish.is_some());
    }
    assert_eq!(stats.evicted_prefixes.load(Ordering::Relaxed), 1);
    let evicted = common::run(&model, request(a, 4, SamplingParams::greedy()));
    assert_eq!(evicted[0].cached_tokens, 0);

    // A request that could never fit the budget is refused rather than queued forever.
    let mut too_big = big(4000);
    too_big.n = 3;
    assert!(model.scheduler.submit(too_big).is_err());
}

#[test]
fn under_a_kv_budget_requests_wait_for_room_in_order() {
    let model = budgeted(4);
    // Four free slots, but room for two reservations of 240 cells at a time.
    let mut receivers: Vec<_> = (0..4)
        .map(|i| {
            let mut r = request(plain_prompt(5000 + 1000 * i, 20), 220, SamplingParams::greedy());
            r.ignore_eos = true;
            model.scheduler.submit(r).expect("submitted")
        })
        .collect();
    let results: Vec<(Timings, usize)> = receivers.iter_mut().map(finished).collect();
    assert!(results.iter().all(|r| r.1 == 220));
    for pair in results.windows(2) {
        assert!(pair[0].0.admitted <= pair[1].0.admitted, "admitted out of order");
    }
    // The third waited for one of the first two to finish, the fourth for a second one.
    let mut done: Vec<Instant> = results[..3].iter().map(|r| r.0.finished).collect();
    done.sort();
    assert!(results[2].0.admitted >= results[0].0.finished.min(results[1].0.finished));
    assert!(results[3].0.admitted >= done[1]);
}

/// Forked variants read cells another sequence computed; in llama.cpp's shared pool their
/// scores came out up to 0.1 nats off the same tokens computed whole (while a variant that
/// keeps nothing matched exactly), so under a budget the scheduler refuses them plainly.
#[test]
fn under_a_kv_budget_scoring_variants_are_refused_and_a_lone_base_is_scored() {
    use ferry_engine::{ScoreEvent, ScoreRequest, ScoreVariant};
    let model = budgeted(4);
    let tokens = plain_prompt(1000, 200);
    let variant = ScoreVariant { keep: 150, masked: Vec::new(), tokens: tokens[150..].to_vec(), n_scored: 5 };
    let job = |variants| ScoreRequest {
        tokens: tokens.clone(),
        n_scored: 5,
        top_logprobs: 0,
        variants,
        cache_scope: 0,
    };
    assert!(model.scheduler.score(job(vec![variant])).is_err());
    let mut receiver = model.scheduler.score(job(Vec::new())).expect("submitted");
    let Some(ScoreEvent::Base { tokens: scored, .. }) = receiver.blocking_recv() else {
        panic!("expected the base's scores");
    };
    assert_eq!(scored.len(), 5);
}
