//! The scheduler's side of scoring jobs: a base admitted (from a cached prefix when one
//! fits), its variants forked from its KV cache into free slots, their scored tokens
//! recorded, and each reported as it finishes.

use std::sync::atomic::Ordering;

use super::{ScoreJob, ScorePending, Scoring, Sequence, TokenInfo, Work, Worker};
use crate::sampler::logprobs;
use crate::scoring::ScoreEvent;

impl Worker<'_> {
    /// Ends a scoring job: frees every slot it holds (its base included) and forgets it.
    /// `keep_cache: false` after a failed decode, when the KV state of its cells is unknown.
    pub(super) fn end_job(&mut self, id: u64, keep_cache: bool) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].as_ref().is_some_and(|s| s.score_job() == Some(id)) {
                self.free(slot);
                if !keep_cache {
                    self.forget(slot);
                }
            }
        }
        self.jobs.retain(|j| j.id != id);
    }

    /// Forks the variants of scoring jobs whose base is prefilled into free slots, oldest
    /// job first (admitted jobs go before waiting ones). A base is freed once its last
    /// variant has forked.
    pub(super) fn fork_variants(&mut self) {
        // Empty slots first, then the oldest caches: the prefixes most likely to be asked
        // for again stay.
        let mut free = self.free_slots();
        free.sort_by_key(|&slot| (!self.cached[slot].tokens.is_empty(), self.cached[slot].left_at));
        let mut free = free.into_iter();
        let mut failed = Vec::new();
        self.variant_waits = false;
        'jobs: for j in 0..self.jobs.len() {
            let Some(base_slot) = self.jobs[j].base_slot.filter(|_| self.jobs[j].base_done) else {
                continue;
            };
            while let Some(variant) = self.jobs[j].request.variants.get(self.jobs[j].next_variant) {
                let reserve = variant.first_position() + variant.tokens.len();
                if !self.make_room(reserve) {
                    self.variant_waits = true;
                    break 'jobs;
                }
                let Some(slot) = free.next() else {
                    break 'jobs;
                };
                let job = &mut self.jobs[j];
                let index = job.next_variant;
                let variant = &job.request.variants[index];
                self.cached[slot].tokens.clear();
                self.session.copy_sequence(base_slot, slot);
                let mut removed = self.session.remove_range(slot, variant.keep, None);
                for range in &variant.masked {
                    removed &= self.session.remove_range(slot, range.start, Some(range.end));
                }
                if !removed {
                    self.session.clear_sequence(slot);
                    let message = "this model's memory cannot drop part of a sequence".to_string();
                    let _ = job.events.send(ScoreEvent::Error(message));
                    failed.push(job.id);
                    continue 'jobs;
                }
                job.next_variant += 1;
                job.running_variants += 1;
                let tokens = variant.tokens.clone();
                self.slots[slot] = Some(Sequence {
                    slot,
                    // Variants are prefilled in their job's turn.
                    admitted: self.slots[base_slot].as_ref().map_or(0, |s| s.admitted),
                    first_pos: variant.first_position(),
                    n_prompt: tokens.len() - 1,
                    n_cached: 0,
                    reserve,
                    scope: job.request.cache_scope,
                    work: Work::Score(Scoring {
                        job: job.id,
                        variant: Some(index),
                        scored_from: tokens.len() - variant.n_scored,
                        top_n: 0,
                        scored: Vec::new(),
                        cached: 0,
                    }),
                    tokens,
                });
                self.stats.running.fetch_add(1, Ordering::SeqCst);
            }
            // Every variant has forked: the base's slot is free, its cells cached for a
            // later prompt or explanation of the same conversation. (The copies are made at
            // the next decode, before anything else is written to its slot.)
            self.jobs[j].base_slot = None;
            self.free(base_slot);
        }
        for id in failed {
            self.end_job(id, true);
        }
    }

    /// Starts a scoring job's base in the free slot whose cache shares the longest prefix
    /// with it (a generation of the same conversation, an earlier explanation of it): the
    /// shared cells are reused up to the token before the first scored one.
    pub(super) fn admit_scoring(&mut self, pending: ScorePending, free: &[usize]) {
        let request = pending.request;
        let Some(&(slot, shared)) = self.by_shared_prefix(free, &request.tokens, request.cache_scope).first()
        else {
            return;
        };
        let scored_from = request.tokens.len() - request.n_scored;
        let reuse = self.reuse_cache(slot, shared.min(scored_from - 1));
        let id = self.admissions;
        self.slots[slot] = Some(Sequence {
            slot,
            admitted: id,
            tokens: request.tokens.clone(),
            first_pos: 0,
            n_prompt: request.tokens.len() - 1,
            n_cached: reuse,
            reserve: request.tokens.len(),
            scope: request.cache_scope,
            work: Work::Score(Scoring {
                job: id,
                variant: None,
                scored_from,
                top_n: request.top_logprobs,
                scored: Vec::new(),
                cached: reuse,
            }),
        });
        self.stats.running.fetch_add(1, Ordering::SeqCst);
        self.jobs.push(ScoreJob {
            id,
            request,
            events: pending.events,
            base_slot: Some(slot),
            base_done: false,
            next_variant: 0,
            running_variants: 0,
        });
    }

    pub(super) fn record_score(&mut self, slot: usize, index: usize, row: usize) {
        let logits = self.session.logits(row);
        let Some(seq) = self.slots[slot].as_mut() else {
            return;
        };
        let Work::Score(s) = &mut seq.work else {
            return;
        };
        let token = seq.tokens[index];
        let (logprob, top) = logprobs(logits, token, s.top_n);
        s.scored.push(TokenInfo { token, logprob, top });
    }

    /// Reports a scoring sequence whose tokens are all in the cache: a variant ends and
    /// frees its slot; a base stays until its variants have forked from it.
    pub(super) fn finish_scoring(&mut self, slot: usize) {
        let Some(seq) = self.slots[slot].as_mut().filter(|s| !s.prefilling()) else {
            return;
        };
        let Work::Score(s) = &mut seq.work else {
            return;
        };
        let (id, variant, tokens, cached) = (s.job, s.variant, std::mem::take(&mut s.scored), s.cached);
        let Some(job) = self.jobs.iter_mut().find(|j| j.id == id) else {
            return;
        };
        let free_now = match variant {
            None => {
                let _ = job.events.send(ScoreEvent::Base { tokens, cached });
                job.base_done = true;
                let alone = job.request.variants.is_empty();
                if alone {
                    job.base_slot = None;
                }
                alone
            }
            Some(index) => {
                let _ = job.events.send(ScoreEvent::Variant { index, tokens });
                job.running_variants -= 1;
                true
            }
        };
        let finished = job.finished();
        if free_now {
            self.free(slot);
        }
        if finished {
            self.end_job(id, true);
        }
    }
}
