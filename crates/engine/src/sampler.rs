//! Turning one row of logits into the next token: penalties, logit bias, truncation
//! (top-k, top-p, min-p), temperature and a seeded draw, plus the log-probabilities
//! OpenAI's `logprobs` reports.
//!
//! The order follows llama.cpp's default chain (penalties, bias, top-k, top-p, min-p,
//! temperature, draw), so the same parameters mean the same thing here as in llama-server.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::TokenId;

/// Validated sampling parameters of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means no top-k truncation.
    pub top_k: usize,
    pub min_p: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1.0 means none; applied llama.cpp-style (divide positive logits, multiply negative ones).
    pub repetition_penalty: f32,
    pub logit_bias: HashMap<TokenId, f32>,
    /// `None` draws a seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: HashMap::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..SamplingParams::default() }
    }

    fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// One token with its log-probability under the model's raw distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenId,
    pub logprob: f32,
}

/// The sampler state of one sequence: its parameters, its random stream and the counts
/// of tokens it generated (for the penalties).
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    counts: HashMap<TokenId, u32>,
    scratch: Vec<(TokenId, f32)>,
}

impl Sampler {
    /// `stream` separates the random streams of the `n` choices of one request, so that
    /// choices differ but a fixed seed still reproduces every one of them.
    pub fn new(params: SamplingParams, stream: u64) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Sampler { params, rng, counts: HashMap::new(), scratch: Vec::new() }
    }

    /// Records a token the sequence produced, for the penalties.
    pub fn accept(&mut self, token: TokenId) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> TokenId {
        let p = &self.params;
        let mut adjusted: Option<Vec<f32>> = None;
        let needs_adjust = !p.logit_bias.is_empty()
            || (!self.counts.is_empty()
                && (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 || p.repetition_penalty != 1.0));
        if needs_adjust {
            let mut row = logits.to_vec();
            for (&token, &count) in &self.counts {
                let Some(logit) = row.get_mut(token as usize) else {
                    continue;
                };
                if p.repetition_penalty != 1.0 {
                    if *logit > 0.0 {
                        *logit /= p.repetition_penalty;
                    } else {
                        *logit *= p.repetition_penalty;
                    }
                }
                *logit -= p.frequency_penalty * count as f32 + p.presence_penalty;
            }
            for (&token, &bias) in &p.logit_bias {
                if let Some(logit) = row.get_mut(token as usize) {
                    *logit += bias;
                }
            }
            adjusted = Some(row);
        }
        let logits = adjusted.as_deref().unwrap_or(logits);

        if p.is_greedy() {
            return argmax(logits);
        }

        // Candidates, truncated by top-k first (cheap with select_nth, no full sort).
        let candidates = &mut self.scratch;
        candidates.clear();
        candidates.extend(logits.iter().enumerate().map(|(i, &l)| (i as TokenId, l)));
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            candidates.truncate(p.top_k);
        }
        let max = candidates.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);

        // Top-p and min-p look at the distribution at temperature 1, as llama.cpp does before
        // applying temperature. Only the head of the distribution is sorted: enough candidates
        // to cover `top_p`, found by growing a partial selection.
        if p.top_p < 1.0 || p.min_p > 0.0 {
            let total: f32 = candidates.iter().map(|c| (c.1 - max).exp()).sum();
            let mut head = 64.min(candidates.len());
            loop {
                if head < candidates.len() {
                    candidates.select_nth_unstable_by(head - 1, |a, b| b.1.total_cmp(&a.1));
                }
                candidates[..head].sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
                let mut keep = head;
                let mut cumulative = 0.0;
                let mut covered = false;
                for (i, c) in candidates[..head].iter().enumerate() {
                    let prob = (c.1 - max).exp() / total;
                    if p.min_p > 0.0 && prob < p.min_p * (1.0 / total) {
                        keep = i.max(1);
                        covered = true;
                        break;
                    }
                    cumulative += prob;
                    if p.top_p < 1.0 && cumulative >= p.top_p {
                        keep = i + 1;
                        covered = true;
                        break;
                    }
                }
                if covered || head == candidates.len() {
                    candidates.truncate(keep);
                    break;
                }
                head = (head * 4).min(candidates.len());
            }
        }

        // Temperature, then the draw.
        let weights: Vec<f32> = candidates.iter().map(|c| ((c.1 - max) / p.temperature).exp()).collect();
        let total: f32 = weights.iter().sum();
        let mut target = self.rng.random::<f32>() * total;
        for (candidate, weight) in candidates.iter().zip(&weights) {
            if target < *weight {
                return candidate.0;
            }
            target -= weight;
        }
        candidates[candidates.len() - 1].0
    }
}

/// Index of the largest logit; ties go to the lowest id, as in llama.cpp's greedy sampler.
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as TokenId
}

/// Log-probability of `token` and the `top_n` most likely tokens under the softmax of `logits`.
pub fn logprobs(logits: &[f32], token: TokenId, top_n: usize) -> (f32, Vec<TokenLogprob>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    let chosen = logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| l - log_sum);
    let mut top = Vec::new();
    if top_n > 0 {
        let mut indexed: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
        let n = top_n.min(indexed.len());
        indexed.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1));
        indexed.truncate(n);
        indexed.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        top = indexed
            .into_iter()
            .map(|(i, l)| TokenLogprob { token: i as TokenId, logprob: l - log_sum })
            .collect();
    }
    (chosen, top)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_and_bias_moves_it() {
        let logits = [0.1, 2.0, 1.0, -3.0];
        let mut sampler = Sampler::new(SamplingParams::greedy(), 0);
        assert_eq!(sampler.sample(&logits), 1);
        let mut params = SamplingParams::greedy();
        params.logit_bias.insert(3, 100.0);
        assert_eq!(Sampler::new(params, 0).sample(&logits), 3);
    }

    #[test]
    fn penalties_discourage_repeats() {
        let logits = [1.0, 1.5];
        let mut params = SamplingParams::greedy();
        params.frequency_penalty = 1.0;
        let mut sampler = Sampler::new(params, 0);
        assert_eq!(sampler.sample(&logits), 1);
        sampler.accept(1);
        assert_eq!(sampler.sample(&logits), 0);
    }

    #[test]
    fn same_seed_same_draws_and_top_k_bounds_them() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams { seed: Some(7), top_k: 5, ..SamplingParams::default() };
        let draws = |stream| {
            let mut s = Sampler::new(params.clone(), stream);
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draws(0), draws(0));
        assert_ne!(draws(0), draws(1));
        let mut top5: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
        top5.sort_by(|a, b| b.1.total_cmp(&a.1));
        let allowed: Vec<TokenId> = top5[..5].iter().map(|x| x.0 as TokenId).collect();
        assert!(draws(3).iter().all(|t| allowed.contains(t)));
    }

    #[test]
    fn top_p_and_min_p_keep_only_the_head() {
        // Probabilities about 0.5, 0.3, 0.15, then a long tail of tiny ones.
        let mut logits = vec![-20.0f32; 5000];
        logits[10] = 0.5f32.ln();
        logits[20] = 0.3f32.ln();
        logits[30] = 0.15f32.ln();
        let draws = |params: SamplingParams| {
            let mut s = Sampler::new(params, 0);
            (0..300).map(|_| s.sample(&logits)).collect::<std::collections::HashSet<_>>()
        };
        let nucleus = draws(SamplingParams { top_p: 0.75, seed: Some(1), ..SamplingParams::default() });
        assert_eq!(nucleus, [10, 20].into_iter().collect());
        let min_p = draws(SamplingParams { min_p: 0.25, seed: Some(1), ..SamplingParams::default() });
        assert_eq!(min_p, [10, 20, 30].into_iter().collect());
        let both =
            draws(SamplingParams { top_p: 0.6, min_p: 0.25, seed: Some(1), ..SamplingParams::default() });
        assert_eq!(both, [10, 20].into_iter().collect());
    }

    #[test]
    fn logprobs_are_normalised() {
        let logits = [1.0, 2.0, 3.0];
        let (lp, top) = logprobs(&logits, 2, 3);
        let total: f32 = top.iter().map(|t| t.logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(top[0].token, 2);
        assert!((lp - top[0].logprob).abs() < 1e-6);
    }
}
