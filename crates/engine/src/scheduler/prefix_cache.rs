//! The prefix cache: what finished sequences leave in free slots, which free slot a new
//! prompt takes (the one sharing its longest prefix, in its own cache scope), and eviction
//! of cached prefixes, least recently used first, under the KV budget.

use std::sync::atomic::Ordering;

use super::Worker;
use crate::TokenId;

/// The cells a finished sequence left in a free slot.
#[derive(Default)]
pub(super) struct SlotCache {
    /// The tokens whose KV cells they are (positions from 0).
    pub(super) tokens: Vec<TokenId>,
    /// The admission count when it was left: the oldest is evicted first.
    pub(super) left_at: u64,
    /// The cache scope of the request that left them; only its own scope reuses them.
    pub(super) scope: u64,
}

impl Worker<'_> {
    /// Makes room for `cells` more reserved KV cells under the KV budget, evicting cached
    /// prefixes least recently used first; `false` (evicting nothing) when the reservations of
    /// the running sequences leave too little even with no cache. Always `true` without a
    /// budget (each slot has its own context).
    pub(super) fn make_room(&mut self, cells: usize) -> bool {
        let Some(budget) = self.config.session.shared_kv_cells() else {
            return true;
        };
        let reserved: usize = self.slots.iter().flatten().map(|s| s.reserve).sum();
        if reserved + cells > budget {
            return false;
        }
        loop {
            let cached: usize = self.cached.iter().map(|c| c.tokens.len()).sum();
            if reserved + cells + cached <= budget {
                return true;
            }
            // Cached prefixes live only in free slots (admission clears a slot's).
            let Some(oldest) = (0..self.slots.len())
                .filter(|&slot| self.slots[slot].is_none() && !self.cached[slot].tokens.is_empty())
                .min_by_key(|&slot| self.cached[slot].left_at)
            else {
                return false;
            };
            self.forget(oldest);
            self.stats.evicted_prefixes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Clears a free slot's cells and forgets what they held.
    pub(super) fn forget(&mut self, slot: usize) {
        self.session.clear_sequence(slot);
        self.cached[slot].tokens.clear();
    }

    /// Free slots with how many leading tokens of `tokens` each one's cache holds for
    /// `scope`: the longest shared prefix first; among equals, the oldest cache.
    pub(super) fn by_shared_prefix(
        &self,
        free: &[usize],
        tokens: &[TokenId],
        scope: u64,
    ) -> Vec<(usize, usize)> {
        let mut order: Vec<(usize, usize)> =
            free.iter().map(|&slot| (slot, self.shared_prefix(slot, tokens, scope))).collect();
        order.sort_by_key(|&(slot, shared)| (std::cmp::Reverse(shared), self.cached[slot].left_at));
        order
    }

    /// Keeps the first `reuse` cells of a free slot's cache for the sequence taking it (none
    /// where the memory cannot drop the rest) and forgets what it held; how many it kept.
    pub(super) fn reuse_cache(&mut self, slot: usize, reuse: usize) -> usize {
        let kept = if reuse > 0 && self.session.remove_range(slot, reuse, None) {
            reuse
        } else {
            self.forget(slot);
            0
        };
        self.cached[slot].tokens.clear();
        self.stats.cached_tokens.fetch_add(kept as u64, Ordering::Relaxed);
        kept
    }

    /// How many leading tokens of `prompt` a free slot's cells already hold for `scope`
    /// (none when another scope left them).
    fn shared_prefix(&self, slot: usize, prompt: &[TokenId], scope: u64) -> usize {
        let cache = &self.cached[slot];
        if cache.scope != scope {
            return 0;
        }
        cache.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count()
    }
}
