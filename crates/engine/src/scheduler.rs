//! The scheduler: one thread owns the backend session (its KV cache) and serves every
//! request by packing their sequences into shared forward passes.
//!
//! - Continuous batching: a request waiting in the queue takes free sequence slots at the
//!   start of the next step, while others are mid-generation.
//! - Chunked prefill: each step first gives one token to every decoding sequence, then
//!   fills what is left of the step's token budget with prompt chunks, so a long prompt
//!   never stalls running streams for more than one chunk.
//! - Cancellation: a request whose receiver is gone (client disconnected) has its
//!   sequences dropped and their KV cache cleared at the next step.
//! - The queue is bounded: `submit` fails with `QueueFull` instead of growing it.
//!
//! See README.md in this crate for the life of a request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::backend::{Backend, BatchEntry, Session, SessionConfig};
use crate::sampler::{Sampler, SamplingParams, TokenLogprob, logprobs};
use crate::text::{StopMatcher, Utf8Stream};
use crate::{EngineError, TokenId};

/// A request the API layer has validated: the prompt fits, the numbers are in range.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<TokenId>,
    /// Most tokens to generate per choice; already capped to what the context leaves.
    pub max_tokens: usize,
    /// Number of choices; each is its own sequence.
    pub n: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// `Some(k)`: report each generated token's logprob and the top `k` alternatives.
    pub logprobs: Option<usize>,
    /// Report the logprobs of the prompt tokens too (completions' `echo`).
    pub prompt_logprobs: bool,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
}

/// A token with its logprob and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub token: TokenId,
    pub logprob: f32,
    pub top: Vec<TokenLogprob>,
}

/// When a choice passed each stage, measured on the scheduler thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Taken from the queue into a sequence slot.
    pub admitted: Instant,
    /// The first token was sampled (prefill done).
    pub first_token: Instant,
    pub finished: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-generation token or a stop sequence.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a request's receiver gets, in order per choice.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Logprobs of the prompt tokens after the first (which has none), sent once, before
    /// any delta.
    PromptLogprobs { first_token: TokenId, rest: Vec<TokenInfo> },
    /// New text of one choice, with the tokens that produced it when logprobs were asked for.
    Delta { choice: usize, text: String, tokens: Vec<TokenInfo> },
    /// A choice ended; `completion_tokens` counts every token it sampled.
    /// `stop_sequence` is the stop string that ended it, if one did.
    Finished {
        choice: usize,
        reason: FinishReason,
        stop_sequence: Option<String>,
        completion_tokens: usize,
        timings: Timings,
    },
    /// The request failed inside the engine; no more events follow.
    Error(String),
}

/// Scheduler limits and sizes.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub session: SessionConfig,
    /// Most prompt tokens one step prefills (across sequences).
    pub prefill_chunk: usize,
    /// Most requests waiting for a slot; past it `submit` fails with `QueueFull`.
    pub max_waiting: usize,
}

/// Counters read by tests, metrics and the benchmark.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    /// Forward passes run.
    pub steps: AtomicU64,
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
}

/// A cheap handle to the scheduler thread.
#[derive(Clone)]
pub struct Scheduler {
    commands: mpsc::Sender<Pending>,
    stats: Arc<SchedulerStats>,
    config: Arc<SchedulerConfig>,
}

struct Pending {
    request: GenerateRequest,
    events: UnboundedSender<Event>,
}

impl Scheduler {
    /// Starts the scheduler thread; fails if the backend cannot create its session.
    pub fn start(backend: Arc<dyn Backend>, config: SchedulerConfig) -> Result<Self, EngineError> {
        let (commands, inbox) = mpsc::channel::<Pending>();
        let stats = Arc::new(SchedulerStats::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_stats = stats.clone();
        let thread_config = config.clone();
        std::thread::Builder::new()
            .name("ferry-scheduler".into())
            .spawn(move || {
                let session = match backend.new_session(&thread_config.session) {
                    Ok(session) => {
                        let _ = ready_tx.send(Ok(()));
                        session
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                Worker::new(backend.as_ref(), session, thread_config, thread_stats).run(inbox);
            })
            .map_err(|e| EngineError::Load(format!("spawning the scheduler thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| EngineError::Load("the scheduler thread ended while starting".into()))??;
        Ok(Scheduler { commands, stats, config: Arc::new(config) })
    }

    /// Queues a request. Events arrive on the returned receiver; dropping it cancels the request.
    pub fn submit(&self, request: GenerateRequest) -> Result<UnboundedReceiver<Event>, EngineError> {
        if request.n == 0 || request.n > self.config.session.n_sequences {
            return Err(EngineError::InvalidRequest(format!(
                "n must be between 1 and {} (the parallel sequences of this model)",
                self.config.session.n_sequences
            )));
        }
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.config.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull);
        }
        let (events, receiver) = unbounded_channel();
        self.commands.send(Pending { request, events }).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            EngineError::Stopped
        })?;
        Ok(receiver)
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
}

/// One choice of one request, occupying one KV slot.
struct Sequence {
    slot: usize,
    /// Admission order, so the oldest prompt is prefilled first.
    admitted: u64,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
    choice: usize,
    request: Arc<Pending>,
    /// Prompt followed by the generated tokens.
    tokens: Vec<TokenId>,
    n_prompt: usize,
    /// Tokens already in the KV cache.
    n_cached: usize,
    sampler: Sampler,
    utf8: Utf8Stream,
    stops: StopMatcher,
    /// Tokens sampled whose text the stop matcher still holds back.
    unsent: Vec<TokenInfo>,
    /// Collects prompt logprobs during prefill (only for the first choice, when asked).
    prompt_logprobs: Option<Vec<TokenInfo>>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.n_prompt
    }
    fn prefilling(&self) -> bool {
        self.n_cached < self.n_prompt
    }
}

struct Worker<'m> {
    backend: &'m dyn Backend,
    session: Box<dyn Session + 'm>,
    config: SchedulerConfig,
    stats: Arc<SchedulerStats>,
    slots: Vec<Option<Sequence>>,
    waiting: VecDeque<Pending>,
    admissions: u64,
}

/// What one batch entry's logits are for.
enum RowUse {
    /// The next token of a sequence.
    Sample(usize),
    /// The logprob of prompt token `pos + 1` of the sequence in `slot`.
    Prompt { slot: usize, pos: usize },
}

impl<'m> Worker<'m> {
    fn new(
        backend: &'m dyn Backend,
        session: Box<dyn Session + 'm>,
        config: SchedulerConfig,
        stats: Arc<SchedulerStats>,
    ) -> Self {
        let slots = (0..config.session.n_sequences).map(|_| None).collect();
        Worker { backend, session, config, stats, slots, waiting: VecDeque::new(), admissions: 0 }
    }

    fn run(mut self, inbox: mpsc::Receiver<Pending>) {
        loop {
            let idle = self.slots.iter().all(Option::is_none) && self.waiting.is_empty();
            if idle {
                match inbox.recv() {
                    Ok(p) => self.waiting.push_back(p),
                    Err(_) => return,
                }
            }
            while let Ok(p) = inbox.try_recv() {
                self.waiting.push_back(p);
            }
            self.drop_cancelled();
            self.admit();
            self.step();
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|p| !p.events.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.waiting.fetch_sub(gone, Ordering::SeqCst);
        }
        for slot in 0..self.slots.len() {
            if self.slots[slot].as_ref().is_some_and(|s| s.request.events.is_closed()) {
                self.free(slot);
            }
        }
    }

    fn free(&mut self, slot: usize) {
        if self.slots[slot].take().is_some() {
            self.session.clear_sequence(slot);
            self.stats.running.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Moves waiting requests into free slots, first come first served: a request needing
    /// more slots than are free waits, and nothing behind it overtakes it.
    fn admit(&mut self) {
        while let Some(front) = self.waiting.front() {
            let free: Vec<usize> = (0..self.slots.len()).filter(|&i| self.slots[i].is_none()).collect();
            if free.len() < front.request.n {
                break;
            }
            let Some(pending) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            let pending = Arc::new(pending);
            let request = &pending.request;
            self.admissions += 1;
            for (choice, &slot) in free.iter().take(request.n).enumerate() {
                let want_prompt = request.prompt_logprobs && choice == 0;
                self.slots[slot] = Some(Sequence {
                    slot,
                    admitted: self.admissions,
                    admitted_at: Instant::now(),
                    first_token_at: None,
                    choice,
                    request: pending.clone(),
                    tokens: request.prompt.clone(),
                    n_prompt: request.prompt.len(),
                    n_cached: 0,
                    sampler: Sampler::new(request.sampling.clone(), choice as u64),
                    utf8: Utf8Stream::default(),
                    stops: StopMatcher::new(request.stop.clone()),
                    unsent: Vec::new(),
                    prompt_logprobs: want_prompt.then(Vec::new),
                });
                self.stats.running.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn step(&mut self) {
        let mut entries = Vec::new();
        let mut rows = Vec::new();
        // Every decoding sequence advances by one token.
        for seq in self.slots.iter().flatten().filter(|s| !s.prefilling()) {
            let pos = seq.tokens.len() - 1;
            entries.push(BatchEntry { token: seq.tokens[pos], pos, seq: seq.slot, logits: true });
            rows.push(RowUse::Sample(seq.slot));
        }
        // Then prompt chunks, oldest sequences first, within the step's budget.
        let budget = self.config.session.batch_tokens.saturating_sub(entries.len());
        let mut prefill_left = self.config.prefill_chunk.min(budget);
        let mut order: Vec<usize> =
            self.slots.iter().flatten().filter(|s| s.prefilling()).map(|s| s.slot).collect();
        order.sort_by_key(|&slot| self.slots[slot].as_ref().map_or(u64::MAX, |s| s.admitted));
        for slot in order {
            if prefill_left == 0 {
                break;
            }
            let Some(seq) = self.slots[slot].as_mut() else {
                continue;
            };
            let take = (seq.n_prompt - seq.n_cached).min(prefill_left);
            for pos in seq.n_cached..seq.n_cached + take {
                let last = pos + 1 == seq.n_prompt;
                let for_prompt = seq.prompt_logprobs.is_some() && !last;
                entries.push(BatchEntry {
                    token: seq.tokens[pos],
                    pos,
                    seq: slot,
                    logits: last || for_prompt,
                });
                if last {
                    rows.push(RowUse::Sample(slot));
                } else if for_prompt {
                    rows.push(RowUse::Prompt { slot, pos });
                }
            }
            seq.n_cached += take;
            prefill_left -= take;
            self.stats.prompt_tokens.fetch_add(take as u64, Ordering::Relaxed);
        }
        if entries.is_empty() {
            return;
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.session.decode(&entries) {
            // The KV state of every sequence in this batch is now unknown: fail them all.
            let slots: Vec<usize> = entries.iter().map(|e| e.seq).collect();
            for slot in slots {
                if let Some(seq) = self.slots[slot].as_ref() {
                    let _ = seq.request.events.send(Event::Error(e.to_string()));
                }
                self.free(slot);
            }
            return;
        }
        for (row, use_) in rows.into_iter().enumerate() {
            match use_ {
                RowUse::Prompt { slot, pos } => self.record_prompt_logprob(slot, pos, row),
                RowUse::Sample(slot) => self.sample(slot, row),
            }
        }
    }

    fn record_prompt_logprob(&mut self, slot: usize, pos: usize, row: usize) {
        let logits = self.session.logits(row);
        let Some(seq) = self.slots[slot].as_mut() else {
            return;
        };
        let top_n = seq.request.request.logprobs.unwrap_or(0);
        let token = seq.tokens[pos + 1];
        let (logprob, top) = logprobs(logits, token, top_n);
        if let Some(collected) = seq.prompt_logprobs.as_mut() {
            collected.push(TokenInfo { token, logprob, top });
        }
    }

    fn sample(&mut self, slot: usize, row: usize) {
        let logits = self.session.logits(row);
        let backend = self.backend;
        let ctx = self.config.session.ctx_per_sequence;
        let Some(seq) = self.slots[slot].as_mut() else {
            return;
        };
        let events = &seq.request.events;
        if let Some(rest) = seq.prompt_logprobs.take() {
            let _ = events.send(Event::PromptLogprobs { first_token: seq.tokens[0], rest });
        }
        let request = &seq.request.request;
        let token = seq.sampler.sample(logits);
        let now = Instant::now();
        let first_token = *seq.first_token_at.get_or_insert(now);
        seq.sampler.accept(token);
        seq.tokens.push(token);
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(top_n) = request.logprobs {
            let (logprob, top) = logprobs(logits, token, top_n);
            seq.unsent.push(TokenInfo { token, logprob, top });
        }

        let mut finish = None;
        let mut text = String::new();
        let mut stop_sequence = None;
        if !request.ignore_eos && backend.is_end_of_generation(token) {
            finish = Some(FinishReason::Stop);
        } else {
            let piece = seq.utf8.push(backend.token_bytes(token));
            let released = seq.stops.push(&piece);
            text = released.text;
            stop_sequence = released.stopped;
            if stop_sequence.is_some() {
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() && (seq.generated() >= request.max_tokens || seq.tokens.len() >= ctx) {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() && stop_sequence.is_none() {
            // No stop sequence ended it: what was held back is part of the answer.
            let tail = seq.utf8.finish();
            let released = seq.stops.push(&tail);
            text.push_str(&released.text);
            if released.stopped.is_some() {
                finish = Some(FinishReason::Stop);
                stop_sequence = released.stopped;
            } else {
                text.push_str(&seq.stops.finish());
            }
        }
        if !text.is_empty() || (finish.is_some() && !seq.unsent.is_empty()) {
            let tokens = std::mem::take(&mut seq.unsent);
            let _ = events.send(Event::Delta { choice: seq.choice, text, tokens });
        }
        if let Some(reason) = finish {
            let _ = events.send(Event::Finished {
                choice: seq.choice,
                reason,
                stop_sequence,
                completion_tokens: seq.generated(),
                timings: Timings { admitted: seq.admitted_at, first_token, finished: now },
            });
            self.free(slot);
        }
    }
}
