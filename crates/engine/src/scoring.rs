//! Scoring jobs: the log-likelihood of a sequence's last tokens, for one base sequence and
//! many variants of it, with the base's KV cache computed once and shared.
//!
//! The scheduler prefills the base once (logits only for the scored tokens), then forks each
//! variant into a free slot: the variant's KV cache is a copy of the base's, minus the cells
//! the variant drops (`masked`, and everything from `keep` on), and the variant decodes only
//! its own `tokens`, at the positions that follow its last kept cell. Variants run in the
//! same batched steps as everything else and report as they finish.
//!
//! What a variant drops decides what it measures: drop everything from where it first
//! differs from the base (`keep` = the common prefix, `masked` empty) and the variant is
//! exactly the new text computed with the base's prefix reused; drop a segment's cells and
//! recompute only a short tail, and the tail sees the context without the segment while the
//! kept cells after the segment are still the base's (they saw it).

use std::ops::Range;

use crate::TokenId;
use crate::scheduler::TokenInfo;

/// A base sequence and variants of it, each scored on its last `n_scored` tokens.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    /// The base sequence, prefilled once.
    pub tokens: Vec<TokenId>,
    /// How many of the base's last tokens are scored (at least one token precedes them).
    pub n_scored: usize,
    /// Alternatives reported with each of the base's scored tokens.
    pub top_logprobs: usize,
    pub variants: Vec<ScoreVariant>,
    /// Whose cached prefixes the base may reuse and leave (see `GenerateRequest::cache_scope`).
    pub cache_scope: u64,
}

/// One variant: a part of the base's KV cache, then tokens of its own.
#[derive(Debug, Clone)]
pub struct ScoreVariant {
    /// The base's cells at positions `0..keep` are kept, except those in `masked` (`keep`
    /// is below the base's length: its last token is scored but never cached).
    pub keep: usize,
    /// Ranges of base positions dropped (parts beyond `keep` change nothing).
    pub masked: Vec<Range<usize>>,
    /// Decoded after the kept cells, at the positions that follow the last of them.
    pub tokens: Vec<TokenId>,
    /// How many of `tokens`' last ones are scored (fewer than `tokens.len()`: the token
    /// before the first scored one must be decoded by the variant itself).
    pub n_scored: usize,
}

impl ScoreVariant {
    /// The position of `tokens[0]`: right after the last kept cell.
    pub fn first_position(&self) -> usize {
        let mut pos = self.keep;
        while let Some(range) = self.masked.iter().find(|r| r.start < pos && pos <= r.end) {
            pos = range.start;
        }
        pos
    }
}

/// What a scoring job's receiver gets: the base, then each variant as it finishes (in any
/// order), then the channel closes. After an `Error` nothing follows.
#[derive(Debug, Clone, PartialEq)]
pub enum ScoreEvent {
    /// The base's scored tokens with their logprobs and alternatives, and how many of its
    /// leading tokens were found in a slot's cache (a generation or an earlier job that
    /// shared them) rather than computed.
    Base {
        tokens: Vec<TokenInfo>,
        cached: usize,
    },
    /// Variant `index`'s scored tokens (logprobs only).
    Variant {
        index: usize,
        tokens: Vec<TokenInfo>,
    },
    Error(String),
}

impl ScoreRequest {
    /// Checks the request against the session: scored tokens follow a decoded token, every
    /// variant fits the context, and forks have a slot besides the base's.
    pub(crate) fn check(&self, n_sequences: usize, ctx: usize) -> Result<(), String> {
        if self.n_scored == 0 || self.n_scored >= self.tokens.len() {
            return Err("a scoring job scores between 1 and all but the first of its tokens".into());
        }
        if self.tokens.len() > ctx {
            return Err(format!(
                "the base sequence has {} tokens, more than the context of {ctx}",
                self.tokens.len()
            ));
        }
        if !self.variants.is_empty() && n_sequences < 2 {
            return Err("scoring variants needs at least 2 parallel sequences".into());
        }
        for (i, v) in self.variants.iter().enumerate() {
            if v.n_scored == 0 || v.n_scored >= v.tokens.len() {
                return Err(format!("variant {i} scores between 1 and all but the first of its own tokens"));
            }
            // The base's last token is only scored, never cached: a variant keeps less.
            if v.keep >= self.tokens.len() || v.masked.iter().any(|r| r.start > r.end) {
                return Err(format!("variant {i} keeps cells the base does not have"));
            }
            if v.first_position() + v.tokens.len() > ctx {
                return Err(format!("variant {i} does not fit the context of {ctx}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[expect(clippy::single_range_in_vec_init, reason = "variants here mask one range each")]
mod tests {
    use super::*;

    fn variant(keep: usize, masked: Vec<Range<usize>>) -> ScoreVariant {
        ScoreVariant { keep, masked, tokens: vec![1, 2], n_scored: 1 }
    }

    #[test]
    fn first_position_follows_the_last_kept_cell() {
        assert_eq!(variant(10, vec![]).first_position(), 10);
        assert_eq!(variant(10, vec![2..5]).first_position(), 10);
        // A masked range ending at `keep` (or past it) pulls the tail back to its start.
        assert_eq!(variant(10, vec![6..10]).first_position(), 6);
        assert_eq!(variant(10, vec![6..12]).first_position(), 6);
        assert_eq!(variant(10, vec![2..6, 6..10]).first_position(), 2);
        assert_eq!(variant(10, vec![0..10]).first_position(), 0);
    }

    #[test]
    fn check_refuses_what_cannot_be_scored() {
        let base = |variants| ScoreRequest {
            tokens: vec![1; 8],
            n_scored: 2,
            top_logprobs: 0,
            variants,
            cache_scope: 0,
        };
        assert!(base(vec![variant(4, vec![1..2])]).check(2, 16).is_ok());
        assert!(base(vec![variant(4, vec![])]).check(1, 16).is_err());
        assert!(base(vec![variant(9, vec![])]).check(2, 16).is_err());
        assert!(base(vec![]).check(1, 4).is_err());
        let mut no_context = variant(4, vec![]);
        no_context.n_scored = 2;
        assert!(base(vec![no_context]).check(2, 16).is_err());
        let mut whole = base(vec![]);
        whole.n_scored = 8;
        assert!(whole.check(1, 16).is_err());
    }
}
