//! The scheduler: one thread owns the backend session (its KV cache) and serves every
//! request by packing their sequences into shared forward passes.
//!
//! - Continuous batching: a request waiting in the queue takes free sequence slots at the
//!   start of the next step, while others are mid-generation.
//! - Chunked prefill: each step first gives one token to every decoding sequence, then
//!   fills what is left of the step's token budget with prompt chunks, so a long prompt
//!   never stalls running streams for more than one chunk. With no sequence decoding, a step
//!   prefills up to the whole batch.
//! - Cancellation: a request whose receiver is gone (client disconnected) has its
//!   sequences dropped and their KV cache cleared at the next step.
//! - The queue is bounded: `submit` fails with `QueueFull` instead of growing it.
//! - Fairness: requests are admitted first come first served, and prompts are prefilled
//!   oldest first within a bounded chunk per step, so no request waits behind later ones and
//!   running streams keep one token per step while long prompts are prefilled.
//! - KV budget (`SessionConfig::kv_budget` below one full context per sequence): the
//!   sequences share one pool of cells. Each sequence reserves the most cells it can hold
//!   (prompt plus `max_tokens`); a job is admitted only when its reservation fits beside the
//!   others' and the prefix cache's cells, evicting cached prefixes least recently used first,
//!   else it waits (and nothing overtakes it).
//! - Deadlines (`Scheduler::submit_until`, or the config's `request_timeout`): a request
//!   still waiting or running when its deadline passes gets `Event::DeadlineExceeded` and
//!   its sequences are freed at the next step, like a cancelled one.
//! - Scoring jobs (`Scheduler::score`): one base sequence prefilled once, then variants
//!   forked from its KV cache into free slots (a copy, minus the cells the variant drops),
//!   each decoding only its own tokens; see [`ScoreRequest`].
//!
//! See README.md in this crate for the life of a request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::backend::{Backend, BatchEntry, FlashAttention, Session, SessionConfig};
use crate::grammar::Constraint;
use crate::sampler::{SamplingParams, TokenLogprob};
use crate::scoring::{ScoreEvent, ScoreRequest};
use crate::text::FreeText;
use crate::{EngineError, TokenId};

mod generation;
mod prefix_cache;
mod scoring_jobs;

use generation::Generation;
use prefix_cache::SlotCache;

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
    /// The part of the output that is free text, the only part `stop` ends (`None`: all of
    /// it); what a grammar constrains (a tool call, a JSON answer) no stop string may cut.
    pub free_text: Option<FreeText>,
    /// `Some(k)`: report each generated token's logprob and the top `k` alternatives.
    pub logprobs: Option<usize>,
    /// Report the logprobs of the prompt tokens too (completions' `echo`).
    pub prompt_logprobs: bool,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// A grammar the output must follow (compiled by `LocalModel::compile_grammar`); each
    /// choice gets its own copy. The generation ends where the grammar is complete.
    pub constraint: Option<Constraint>,
    /// Counts every token sampled for this request (all its choices) as it is sampled, so
    /// that one cancelled mid-answer (its receiver dropped) still tells what it used.
    pub sampled: Option<Arc<AtomicU64>>,
    /// Who may share cached prefixes with this request: only requests of the same scope reuse
    /// each other's cells (the server gives each tenant its own, so that no tenant learns
    /// from `cached_tokens` or timing what another one asked). 0 for a single user.
    pub cache_scope: u64,
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
    /// The longest gap between two consecutive sampled tokens (zero for one token). The mean
    /// gap is `(finished - first_token) / (completion_tokens - 1)`.
    pub max_inter_token: Duration,
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
    /// `stop_sequence` is the stop string that ended it, if one did; `cached_tokens` counts
    /// the prompt tokens whose KV cache an earlier request left in its slot (not recomputed).
    Finished {
        choice: usize,
        reason: FinishReason,
        stop_sequence: Option<String>,
        completion_tokens: usize,
        cached_tokens: usize,
        timings: Timings,
    },
    /// The request failed inside the engine; no more events follow.
    Error(String),
    /// The request's deadline passed before every choice finished; its sequences are freed
    /// and no more events follow. `admitted` says whether it had left the queue;
    /// `completion_tokens` counts the tokens its unfinished choices had sampled.
    DeadlineExceeded { admitted: bool, completion_tokens: usize },
}

/// Scheduler limits and sizes.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub session: SessionConfig,
    /// Most prompt tokens one step prefills (across sequences) beside decoding sequences;
    /// with none decoding, a step fills the whole batch.
    pub prefill_chunk: usize,
    /// Most requests waiting for a slot; past it `submit` fails with `QueueFull`.
    pub max_waiting: usize,
    /// Keep a finished generation's cells in its slot and let a later prompt of the same
    /// cache scope that starts the same way reuse them. llama.cpp's kernels depend on the
    /// batch's shape (the CPU's attention takes a tiled kernel for 64 or more of a sequence's
    /// tokens), so cells computed in another batch differ in their last bits and a greedy
    /// answer can drift from the uncached one after some tokens.
    pub prefix_cache: bool,
    /// A request's deadline when it brings none: this long after `submit`.
    pub request_timeout: Option<Duration>,
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
    /// KV-cache cells the live sequences hold (of `n_sequences * ctx_per_sequence`).
    pub kv_tokens: AtomicUsize,
    /// Prompt tokens found in a slot's cache (prefix cache hits), not recomputed.
    pub cached_tokens: AtomicU64,
    /// Requests ended by their deadline.
    pub expired: AtomicU64,
    /// Requests admitted from the queue (generation and scoring).
    pub admitted: AtomicU64,
    /// Prefix-cache entries dropped to make room under the KV budget.
    pub evicted_prefixes: AtomicU64,
}

/// A cheap handle to the scheduler thread.
#[derive(Clone)]
pub struct Scheduler {
    commands: mpsc::Sender<Job>,
    stats: Arc<SchedulerStats>,
    config: Arc<SchedulerConfig>,
}

/// A job waiting for slots, or running in them.
enum Job {
    Generate(Pending),
    Score(ScorePending),
}

struct Pending {
    request: GenerateRequest,
    events: UnboundedSender<Event>,
    deadline: Option<Instant>,
}

impl Pending {
    fn expired(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }
}

struct ScorePending {
    request: ScoreRequest,
    events: UnboundedSender<ScoreEvent>,
}

impl Job {
    fn is_cancelled(&self) -> bool {
        match self {
            Job::Generate(p) => p.events.is_closed(),
            Job::Score(p) => p.events.is_closed(),
        }
    }

    /// KV cells the job reserves when it is admitted (see `Sequence::reserve`).
    fn cells_needed(&self, ctx: usize) -> usize {
        match self {
            Job::Generate(p) => p.request.n * generation_reserve(&p.request, ctx),
            Job::Score(p) => p.request.tokens.len(),
        }
    }

    /// Free slots the job needs to be admitted. A scoring job with variants waits for two,
    /// so that bases never hold every slot while their variants wait for one.
    fn slots_needed(&self) -> usize {
        match self {
            Job::Generate(p) => p.request.n,
            Job::Score(p) => 1 + usize::from(!p.request.variants.is_empty()),
        }
    }
}

/// The most KV cells one choice of `request` can hold: its prompt and every token it may
/// generate (the last one sampled is never fed back), within the context.
fn generation_reserve(request: &GenerateRequest, ctx: usize) -> usize {
    (request.prompt.len() + request.max_tokens).min(ctx)
}

impl Scheduler {
    /// Starts the scheduler thread; fails if the backend cannot create its session.
    pub fn start(backend: Arc<dyn Backend>, config: SchedulerConfig) -> Result<Self, EngineError> {
        if let Some(cells) = config.session.shared_kv_cells()
            && cells < 2 * config.session.ctx_per_sequence
        {
            // A scoring job holds its base while a variant forks beside it: two contexts.
            return Err(EngineError::Load(format!(
                "a KV budget of {cells} tokens is less than two contexts of {} tokens",
                config.session.ctx_per_sequence
            )));
        }
        let (commands, inbox) = mpsc::channel::<Job>();
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
        self.submit_until(request, None)
    }

    /// `submit` with a deadline: past it the request ends with `Event::DeadlineExceeded`
    /// (the earlier of `deadline` and the config's `request_timeout` from now).
    pub fn submit_until(
        &self,
        request: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<UnboundedReceiver<Event>, EngineError> {
        let default = self.config.request_timeout.and_then(|t| Instant::now().checked_add(t));
        let deadline = match (deadline, default) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let session = &self.config.session;
        if request.n == 0 || request.n > session.n_sequences {
            return Err(EngineError::InvalidRequest(format!(
                "n must be between 1 and {} (the parallel sequences of this model)",
                session.n_sequences
            )));
        }
        if let Some(cells) = session.shared_kv_cells() {
            let needed = request.n * generation_reserve(&request, session.ctx_per_sequence);
            if needed > cells {
                return Err(EngineError::InvalidRequest(format!(
                    "n choices of the prompt and max_tokens need {needed} KV cells, more than this model's KV budget of {cells}"
                )));
            }
        }
        let (events, receiver) = unbounded_channel();
        self.enqueue(Job::Generate(Pending { request, events, deadline }))?;
        Ok(receiver)
    }

    /// Queues a scoring job (one queue entry, however many variants). Events arrive on the
    /// returned receiver; dropping it cancels the job and frees every slot it holds.
    pub fn score(&self, request: ScoreRequest) -> Result<UnboundedReceiver<ScoreEvent>, EngineError> {
        let session = &self.config.session;
        request.check(session.n_sequences, session.ctx_per_sequence).map_err(EngineError::InvalidRequest)?;
        if session.shared_kv_cells().is_some() && !request.variants.is_empty() {
            // Variants read the base's cells; in llama.cpp's shared pool their scores came out
            // up to 0.1 nats off the same tokens computed whole (see tests/load.rs).
            return Err(EngineError::InvalidRequest(
                "scoring variants needs one KV stream per sequence: serve this model without --kv-budget"
                    .into(),
            ));
        }
        let (events, receiver) = unbounded_channel();
        self.enqueue(Job::Score(ScorePending { request, events }))?;
        Ok(receiver)
    }

    fn enqueue(&self, job: Job) -> Result<(), EngineError> {
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.config.max_waiting {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::QueueFull);
        }
        self.commands.send(job).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            EngineError::Stopped
        })
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
}

/// One sequence in one KV slot: a choice of a generation request, or the base or a variant
/// of a scoring job.
struct Sequence {
    slot: usize,
    /// Admission order, so the oldest prompt is prefilled first.
    admitted: u64,
    /// What this sequence feeds the model: its prompt (a variant's own tokens), then the
    /// generated tokens.
    tokens: Vec<TokenId>,
    /// The position of `tokens[0]`: 0, or right after a variant's kept cells.
    first_pos: usize,
    /// Tokens of `tokens` to prefill: all of a prompt; all but the last of a scoring
    /// sequence (the last one is only scored, and no later token attends to it).
    n_prompt: usize,
    /// Tokens of `tokens` already in the KV cache.
    n_cached: usize,
    /// The most KV cells this sequence can hold, counted against a KV budget: a generation's
    /// prompt and `max_tokens`; a scoring sequence's kept cells and tokens (cells a variant
    /// shares with its base are counted again: an overestimate, never an underestimate).
    reserve: usize,
    /// The request's cache scope: the cells it leaves are reused only within it.
    scope: u64,
    work: Work,
}

enum Work {
    Generate(Box<Generation>),
    Score(Scoring),
}

/// The base or a variant of a scoring job.
struct Scoring {
    job: u64,
    /// `None` for the base.
    variant: Option<usize>,
    /// Index in `tokens` of the first scored token.
    scored_from: usize,
    top_n: usize,
    scored: Vec<TokenInfo>,
    /// Leading tokens taken from a slot's cache (only a base reuses any).
    cached: usize,
}

impl Sequence {
    /// Cells this sequence holds in the KV cache: its kept (copied) cells and what it has
    /// decoded (a generation's newest token is fed at the next step).
    fn kv_cells(&self) -> usize {
        let decoded = if self.decoding() { self.tokens.len() - 1 } else { self.n_cached };
        self.first_pos + decoded
    }
    fn prefilling(&self) -> bool {
        self.n_cached < self.n_prompt
    }
    /// Advances one token per step: a generation past its prompt.
    fn decoding(&self) -> bool {
        matches!(self.work, Work::Generate(_)) && !self.prefilling()
    }
    fn score_job(&self) -> Option<u64> {
        match &self.work {
            Work::Score(s) => Some(s.job),
            Work::Generate(_) => None,
        }
    }
    fn is_cancelled(&self, jobs: &[ScoreJob]) -> bool {
        match &self.work {
            Work::Generate(g) => g.request.events.is_closed(),
            Work::Score(s) => jobs.iter().find(|j| j.id == s.job).is_none_or(|j| j.events.is_closed()),
        }
    }
}

/// A scoring job that holds slots: its base, then its variants as they fork.
struct ScoreJob {
    id: u64,
    request: ScoreRequest,
    events: UnboundedSender<ScoreEvent>,
    /// The base's slot while variants still have to fork from it.
    base_slot: Option<usize>,
    base_done: bool,
    next_variant: usize,
    running_variants: usize,
}

impl ScoreJob {
    fn finished(&self) -> bool {
        self.base_done && self.next_variant == self.request.variants.len() && self.running_variants == 0
    }
}

struct Worker<'m> {
    backend: &'m dyn Backend,
    session: Box<dyn Session + 'm>,
    config: SchedulerConfig,
    stats: Arc<SchedulerStats>,
    slots: Vec<Option<Sequence>>,
    waiting: VecDeque<Job>,
    /// Scoring jobs holding slots, oldest first.
    jobs: Vec<ScoreJob>,
    admissions: u64,
    /// Per free slot, what a finished generation left there. A new prompt takes the free
    /// slot that shares the longest prefix with it and recomputes only the rest (the prefix
    /// cache); a slot with nothing to share goes to the oldest cache.
    cached: Vec<SlotCache>,
    /// A scoring variant waits for room under the KV budget: admit nothing until it forks.
    variant_waits: bool,
}

/// What one batch entry's logits are for.
enum RowUse {
    /// The next token of a sequence.
    Sample(usize),
    /// The logprob of prompt token `pos + 1` of the sequence in `slot`.
    Prompt { slot: usize, pos: usize },
    /// The logprob of token `index` of a scoring sequence.
    Score { slot: usize, index: usize },
}

impl<'m> Worker<'m> {
    fn new(
        backend: &'m dyn Backend,
        session: Box<dyn Session + 'm>,
        config: SchedulerConfig,
        stats: Arc<SchedulerStats>,
    ) -> Self {
        let slots = (0..config.session.n_sequences).map(|_| None).collect();
        let cached = (0..config.session.n_sequences).map(|_| SlotCache::default()).collect();
        Worker {
            backend,
            session,
            config,
            stats,
            slots,
            waiting: VecDeque::new(),
            jobs: Vec::new(),
            admissions: 0,
            cached,
            variant_waits: false,
        }
    }

    fn run(mut self, inbox: mpsc::Receiver<Job>) {
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
            self.expire(Instant::now());
            self.fork_variants();
            self.admit();
            self.step();
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|p| !p.is_cancelled());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.waiting.fetch_sub(gone, Ordering::SeqCst);
        }
        for slot in 0..self.slots.len() {
            if self.slots[slot].as_ref().is_some_and(|s| s.is_cancelled(&self.jobs)) {
                self.free(slot);
            }
        }
        self.jobs.retain(|j| !j.events.is_closed());
    }

    /// Ends the generation requests whose deadline has passed: waiting ones leave the queue,
    /// running ones free every sequence of theirs (as a cancellation does). Each gets one
    /// `DeadlineExceeded`, then its channel closes.
    fn expire(&mut self, now: Instant) {
        let before = self.waiting.len();
        self.waiting.retain(|job| match job {
            Job::Generate(p) if p.expired(now) => {
                let _ = p.events.send(Event::DeadlineExceeded { admitted: false, completion_tokens: 0 });
                false
            }
            _ => true,
        });
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.stats.waiting.fetch_sub(gone, Ordering::SeqCst);
            self.stats.expired.fetch_add(gone as u64, Ordering::Relaxed);
        }
        // Expired requests holding slots, each once with the tokens its choices sampled.
        let mut expired: Vec<(Arc<Pending>, usize)> = Vec::new();
        for slot in 0..self.slots.len() {
            let Some(seq) = self.slots[slot].as_ref() else {
                continue;
            };
            let Work::Generate(g) = &seq.work else {
                continue;
            };
            if !g.request.expired(now) {
                continue;
            }
            let sampled = seq.tokens.len().saturating_sub(seq.n_prompt);
            match expired.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &g.request)) {
                Some((_, tokens)) => *tokens += sampled,
                None => expired.push((g.request.clone(), sampled)),
            }
            self.free(slot);
        }
        self.stats.expired.fetch_add(expired.len() as u64, Ordering::Relaxed);
        for (pending, completion_tokens) in expired {
            let _ = pending.events.send(Event::DeadlineExceeded { admitted: true, completion_tokens });
        }
    }

    /// Frees a slot. The cells of a generation or of a scoring job's base stay for the next
    /// prompt or base that shares their prefix; a variant's (copied, with cells dropped) are
    /// cleared. Without flash attention, where reusing a prompt's cells measured exact, a
    /// generation keeps only its prompt's: those of its answer, computed a token at a time,
    /// differ in their last bits from what the next turn's prompt computes for the same tokens.
    fn free(&mut self, slot: usize) {
        let Some(seq) = self.slots[slot].take() else {
            return;
        };
        self.stats.running.fetch_sub(1, Ordering::SeqCst);
        let whole = match &seq.work {
            Work::Generate(_) => true,
            Work::Score(s) => s.variant.is_none(),
        };
        if !(self.config.prefix_cache && whole && seq.first_pos == 0) {
            self.forget(slot);
            return;
        }
        let mut cells = seq.kv_cells();
        if self.config.session.flash_attention == FlashAttention::Off && cells > seq.n_prompt {
            if !self.session.remove_range(slot, seq.n_prompt, None) {
                self.forget(slot);
                return;
            }
            cells = seq.n_prompt;
        }
        let mut tokens = seq.tokens;
        tokens.truncate(cells);
        self.cached[slot] = SlotCache { tokens, left_at: self.admissions, scope: seq.scope };
    }

    fn free_slots(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.slots[i].is_none()).collect()
    }

    /// Moves waiting jobs into free slots, first come first served: a job needing more
    /// slots than are free waits, and nothing behind it overtakes it.
    fn admit(&mut self) {
        if self.variant_waits {
            return;
        }
        let ctx = self.config.session.ctx_per_sequence;
        while let Some(front) = self.waiting.front() {
            let free = self.free_slots();
            let cells = front.cells_needed(ctx);
            if free.len() < front.slots_needed() || !self.make_room(cells) {
                break;
            }
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            self.stats.admitted.fetch_add(1, Ordering::Relaxed);
            self.admissions += 1;
            match job {
                Job::Generate(pending) => self.admit_generation(pending, &free),
                Job::Score(pending) => self.admit_scoring(pending, &free),
            }
        }
    }

    fn record_kv(&self) {
        let cells: usize = self.slots.iter().flatten().map(Sequence::kv_cells).sum();
        self.stats.kv_tokens.store(cells, Ordering::Relaxed);
    }

    fn step(&mut self) {
        // Before (frees of cancelled sequences) and after (new cells, finished sequences).
        self.record_kv();
        self.advance();
        self.record_kv();
    }

    fn advance(&mut self) {
        let mut entries = Vec::new();
        let mut rows = Vec::new();
        // Every decoding sequence advances by one token.
        for seq in self.slots.iter().flatten().filter(|s| s.decoding()) {
            let index = seq.tokens.len() - 1;
            let pos = seq.first_pos + index;
            entries.push(BatchEntry { token: seq.tokens[index], pos, seq: seq.slot, logits: true });
            rows.push(RowUse::Sample(seq.slot));
        }
        // Then prompt chunks, oldest sequences first, within the step's budget: at most
        // `prefill_chunk` beside decoding sequences (their next token waits for the step), the
        // whole batch when none decodes (nobody waits; fewer, fuller steps).
        let budget = self.config.session.batch_tokens.saturating_sub(entries.len());
        let mut prefill_left =
            if entries.is_empty() { budget } else { self.config.prefill_chunk.min(budget) };
        let mut order: Vec<usize> =
            self.slots.iter().flatten().filter(|s| s.prefilling()).map(|s| s.slot).collect();
        order.sort_by_key(|&slot| self.slots[slot].as_ref().map_or(u64::MAX, |s| s.admitted));
        let mut prefilled = Vec::new();
        for slot in order {
            if prefill_left == 0 {
                break;
            }
            let Some(seq) = self.slots[slot].as_mut() else {
                continue;
            };
            let take = (seq.n_prompt - seq.n_cached).min(prefill_left);
            for index in seq.n_cached..seq.n_cached + take {
                let last = index + 1 == seq.n_prompt;
                let row = match &seq.work {
                    Work::Generate(_) if last => Some(RowUse::Sample(slot)),
                    Work::Generate(g) if g.prompt_logprobs.is_some() => {
                        Some(RowUse::Prompt { slot, pos: index })
                    }
                    Work::Generate(_) => None,
                    // Logits only where the next token is scored.
                    Work::Score(s) => {
                        (index + 1 >= s.scored_from).then_some(RowUse::Score { slot, index: index + 1 })
                    }
                };
                entries.push(BatchEntry {
                    token: seq.tokens[index],
                    pos: seq.first_pos + index,
                    seq: slot,
                    logits: row.is_some(),
                });
                rows.extend(row);
            }
            seq.n_cached += take;
            prefill_left -= take;
            prefilled.push(slot);
            self.stats.prompt_tokens.fetch_add(take as u64, Ordering::Relaxed);
        }
        if entries.is_empty() {
            return;
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.session.decode(&entries) {
            // The KV state of every sequence in this batch is now unknown: fail them all.
            let mut slots: Vec<usize> = entries.iter().map(|e| e.seq).collect();
            slots.dedup();
            for slot in slots {
                match self.slots[slot].as_ref().map(|s| (&s.work, s.score_job())) {
                    Some((Work::Generate(g), _)) => {
                        let _ = g.request.events.send(Event::Error(e.to_string()));
                        self.free(slot);
                        self.forget(slot);
                    }
                    Some((Work::Score(_), Some(id))) => {
                        if let Some(job) = self.jobs.iter().find(|j| j.id == id) {
                            let _ = job.events.send(ScoreEvent::Error(e.to_string()));
                        }
                        self.end_job(id, false);
                    }
                    _ => {}
                }
            }
            return;
        }
        for (row, use_) in rows.into_iter().enumerate() {
            match use_ {
                RowUse::Prompt { slot, pos } => self.record_prompt_logprob(slot, pos, row),
                RowUse::Sample(slot) => self.sample(slot, row),
                RowUse::Score { slot, index } => self.record_score(slot, index, row),
            }
        }
        for slot in prefilled {
            self.finish_scoring(slot);
        }
    }
}
