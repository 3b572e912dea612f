//! The scheduler's side of generations: a request's choices admitted into slots (reusing a
//! cached prefix when one fits), prompt logprobs recorded during prefill, and each step's
//! token sampled (grammar mask, logprobs), turned into text (whole characters, stop strings
//! held back) and sent as events until the choice finishes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Event, FinishReason, Pending, Sequence, Timings, TokenInfo, Work, Worker, generation_reserve};
use crate::TokenId;
use crate::grammar::Constraint;
use crate::sampler::{Sampler, logprobs};
use crate::text::{StopMatcher, Utf8Stream};

/// A choice being generated.
pub(super) struct Generation {
    pub(super) request: Arc<Pending>,
    choice: usize,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    max_inter_token: Duration,
    sampler: Sampler,
    utf8: Utf8Stream,
    stops: StopMatcher,
    /// Logprobs of tokens sampled whose text is still held back (a character's first bytes,
    /// a possible stop sequence), with where each token's text starts in the choice's output.
    unsent: Vec<TokenInfo>,
    unsent_starts: Vec<usize>,
    /// Bytes of text the sampled tokens make, and bytes of it released as the answer so far.
    bytes_sampled: usize,
    bytes_released: usize,
    /// Collects prompt logprobs during prefill (only for the first choice, when asked).
    pub(super) prompt_logprobs: Option<Vec<TokenInfo>>,
    /// Prompt tokens found in the slot's cache and not recomputed.
    cached_tokens: usize,
    /// The grammar state of this choice, when the request has one.
    constraint: Option<Constraint>,
    /// Logits with the grammar's mask applied (reused between steps).
    masked: Vec<f32>,
}

impl Worker<'_> {
    pub(super) fn admit_generation(&mut self, pending: Pending, free: &[usize]) {
        let pending = Arc::new(pending);
        let request = &pending.request;
        let reserve = generation_reserve(request, self.config.session.ctx_per_sequence);
        let order = self.by_shared_prefix(free, &request.prompt, request.cache_scope);
        for (choice, &(slot, shared)) in order.iter().take(request.n).enumerate() {
            let want_prompt = request.prompt_logprobs && choice == 0;
            // The last prompt token is always computed (its logits give the first token), and
            // echo's prompt logprobs need every position.
            let reuse = self.reuse_cache(
                slot,
                if want_prompt { 0 } else { shared.min(request.prompt.len().saturating_sub(1)) },
            );
            self.slots[slot] = Some(Sequence {
                slot,
                admitted: self.admissions,
                tokens: request.prompt.clone(),
                first_pos: 0,
                n_prompt: request.prompt.len(),
                n_cached: reuse,
                reserve,
                scope: request.cache_scope,
                work: Work::Generate(Box::new(Generation {
                    request: pending.clone(),
                    choice,
                    admitted_at: Instant::now(),
                    first_token_at: None,
                    last_token_at: None,
                    max_inter_token: Duration::ZERO,
                    sampler: Sampler::new(request.sampling.clone(), choice as u64),
                    utf8: Utf8Stream::default(),
                    stops: StopMatcher::for_free_text(request.stop.clone(), request.free_text),
                    unsent: Vec::new(),
                    unsent_starts: Vec::new(),
                    bytes_sampled: 0,
                    bytes_released: 0,
                    prompt_logprobs: want_prompt.then(Vec::new),
                    cached_tokens: reuse,
                    constraint: request.constraint.clone(),
                    masked: Vec::new(),
                })),
            });
            self.stats.running.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub(super) fn record_prompt_logprob(&mut self, slot: usize, pos: usize, row: usize) {
        let logits = self.session.logits(row);
        let Some(seq) = self.slots[slot].as_mut() else {
            return;
        };
        let Work::Generate(g) = &mut seq.work else {
            return;
        };
        let top_n = g.request.request.logprobs.unwrap_or(0);
        let token = seq.tokens[pos + 1];
        let (logprob, top) = logprobs(logits, token, top_n);
        if let Some(collected) = g.prompt_logprobs.as_mut() {
            collected.push(TokenInfo { token, logprob, top });
        }
    }

    pub(super) fn sample(&mut self, slot: usize, row: usize) {
        let logits = self.session.logits(row);
        let backend = self.backend;
        let ctx = self.config.session.ctx_per_sequence;
        let Some(seq) = self.slots[slot].as_mut() else {
            return;
        };
        let Work::Generate(g) = &mut seq.work else {
            return;
        };
        let events = &g.request.events;
        if let Some(rest) = g.prompt_logprobs.take() {
            let _ = events.send(Event::PromptLogprobs { first_token: seq.tokens[0], rest });
        }
        let request = &g.request.request;
        // The grammar's mask applies to what is drawn; logprobs stay those of the model.
        let drawn = match g.constraint.as_mut() {
            None => Ok(g.sampler.sample(logits)),
            Some(constraint) => {
                g.masked.clear();
                g.masked.extend_from_slice(logits);
                constraint.mask(&mut g.masked).map(|()| g.sampler.sample(&g.masked))
            }
        };
        let eog = |t: TokenId| !request.ignore_eos && backend.is_end_of_generation(t);
        let drawn = drawn.and_then(|token| match g.constraint.as_mut() {
            Some(constraint) if !eog(token) => constraint.accept(token).map(|()| token),
            _ => Ok(token),
        });
        let token = match drawn {
            Ok(token) => token,
            Err(e) => {
                let _ = events.send(Event::Error(format!("grammar: {e}")));
                self.free(slot);
                return;
            }
        };
        let grammar_done = g.constraint.as_ref().is_some_and(Constraint::is_finished);
        let now = Instant::now();
        let first_token = *g.first_token_at.get_or_insert(now);
        if let Some(last) = g.last_token_at.replace(now) {
            g.max_inter_token = g.max_inter_token.max(now.saturating_duration_since(last));
        }
        g.sampler.accept(token);
        seq.tokens.push(token);
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(sampled) = &request.sampled {
            sampled.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(top_n) = request.logprobs {
            let (logprob, top) = logprobs(logits, token, top_n);
            g.unsent.push(TokenInfo { token, logprob, top });
            g.unsent_starts.push(g.bytes_sampled);
        }
        let generated = seq.tokens.len() - seq.n_prompt;

        let mut finish = None;
        let mut text = String::new();
        let mut stop_sequence = None;
        if eog(token) {
            finish = Some(FinishReason::Stop);
        } else {
            let bytes = backend.token_bytes(token);
            g.bytes_sampled += bytes.len();
            let piece = g.utf8.push(bytes);
            let released = g.stops.push(&piece);
            text = released.text;
            stop_sequence = released.stopped;
            if stop_sequence.is_some() || grammar_done {
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() && (generated >= request.max_tokens || seq.tokens.len() >= ctx) {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() && stop_sequence.is_none() {
            // No stop sequence ended it: what was held back is part of the answer.
            let tail = g.utf8.finish();
            let released = g.stops.push(&tail);
            text.push_str(&released.text);
            if released.stopped.is_some() {
                finish = Some(FinishReason::Stop);
                stop_sequence = released.stopped;
            } else {
                text.push_str(&g.stops.finish());
            }
        }
        g.bytes_released += text.len();
        // A token's logprob goes out with the first of its text. Past a stop sequence, the
        // tokens that only made the stop (or what followed it) are not part of the answer;
        // any other end sends the rest (an end-of-generation token has no text).
        let ready = if finish.is_some() && stop_sequence.is_none() {
            g.unsent.len()
        } else {
            g.unsent_starts.iter().take_while(|&&start| start < g.bytes_released).count()
        };
        if !text.is_empty() || (finish.is_some() && ready > 0) {
            let tokens: Vec<TokenInfo> = g.unsent.drain(..ready).collect();
            g.unsent_starts.drain(..ready);
            let _ = events.send(Event::Delta { choice: g.choice, text, tokens });
        }
        if let Some(reason) = finish {
            let _ = events.send(Event::Finished {
                choice: g.choice,
                reason,
                stop_sequence,
                completion_tokens: generated,
                cached_tokens: g.cached_tokens,
                timings: Timings {
                    admitted: g.admitted_at,
                    first_token,
                    finished: now,
                    max_inter_token: g.max_inter_token,
                },
            });
            self.free(slot);
        }
    }
}
