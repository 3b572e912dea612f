//! Self-attention of packed sequences in one pass: each sequence's tokens attend to that
//! sequence's tokens only, every head at once, straight from the `(tokens, 3 × hidden)` rows
//! of queries, keys and values.
//!
//! The same arithmetic as candle's ops (scores `q·k / √d`, a softmax with its maximum taken
//! out, the weighted sum of values), without their tensors: done with them it took a dozen
//! ops per sequence and layer (views, three copies, two matrix products, a scale, a softmax,
//! a concatenation), each its own allocation and parallel region, hundreds per batch, for
//! about 1% of the encoder's arithmetic. Sequences run in parallel on the rayon pool; a
//! sequence's result never depends on what it was batched with.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::packed::PackedWeight;

struct PackedAttention<'a> {
    lengths: &'a [usize],
    heads: usize,
}

impl PackedAttention<'_> {
    /// One sequence's context rows `out` (`len × hidden`) from its `qkv` rows
    /// (`len × 3·hidden`). Each head's two products (scores `Q·Kᵀ`, then context `P·V`) run
    /// through the dense layers' kernel (`packed.rs`), the keys and values packed as its
    /// weights.
    fn sequence(&self, qkv: &[f32], out: &mut [f32], hidden: usize) {
        let (width, len) = (3 * hidden, out.len() / hidden);
        let head = hidden / self.heads;
        let scale = 1.0 / (head as f32).sqrt();
        let mut queries = vec![0.0f32; len * head];
        for h in 0..self.heads {
            let (q_at, k_at, v_at) = (h * head, hidden + h * head, 2 * hidden + h * head);
            for (q, row) in queries.chunks_exact_mut(head).zip(qkv.chunks_exact(width)) {
                q.copy_from_slice(&row[q_at..q_at + head]);
            }
            let keys = PackedWeight::from_fn(len, head, |j, d| qkv[j * width + k_at + d]);
            let mut weights = keys.product_here(&queries);
            for row in weights.chunks_exact_mut(len) {
                let mut max = f32::NEG_INFINITY;
                for w in row.iter_mut() {
                    *w *= scale;
                    max = max.max(*w);
                }
                for w in row.iter_mut() {
                    *w = exp_nonpositive(*w - max);
                }
            }
            let values = PackedWeight::from_fn(head, len, |c, j| qkv[j * width + v_at + c]);
            let context = values.product_here(&weights);
            let rows =
                out.chunks_exact_mut(hidden).zip(context.chunks_exact(head)).zip(weights.chunks_exact(len));
            for ((out, context), weights) in rows {
                let sum = crate::fused::sum(weights, |w| w);
                for (o, c) in out[q_at..q_at + head].iter_mut().zip(context) {
                    *o = c / sum;
                }
            }
        }
    }
}

/// `e^x` for `x ≤ 0` (a score less the row's maximum) to 2e-7 relative near 0 (growing by
/// 7e-8 for each unit of |x|, from rounding `x · log2(e)`), without a
/// call or a branch, so that a row of them is computed eight at a time: `2^n · 2^f` with
/// `x · log2(e) = n + f`, `|f| ≤ 1/2`, and `2^f` a polynomial fitted for Ferry by least squares
/// (relative error, numpy) on [-1/2, 1/2]. Below `2^-126` (`x < -87.3`) it stays at `2^-126`,
/// a weight of nothing beside the maximum's 1.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const C: [f32; 7] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_48,
        0.055_503_327,
        0.009_618_437,
        0.001_339_882,
        0.000_153_532_43,
    ];
    /// 1.5 × 2^23: adding and subtracting it rounds a float below 2^22 to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let t = (x * std::f32::consts::LOG2_E).max(-126.0);
    let n = (t + ROUND) - ROUND;
    let f = t - n;
    let p = C.iter().rev().fold(0.0f32, |acc, &c| acc.mul_add(f, c));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

impl PackedAttention<'_> {
    const NAME: &'static str = "ferry-packed-attention";

    /// The context rows of `qkv`, `(tokens, width)`: `(tokens, width / 3)`.
    fn run(&self, qkv: &[f32], (tokens, width): (usize, usize)) -> candle_core::Result<Vec<f32>> {
        if !width.is_multiple_of(3 * self.heads) || self.lengths.iter().sum::<usize>() != tokens {
            candle_core::bail!("{}: {tokens}x{width} rows do not fit the sequences and heads", Self::NAME)
        }
        let hidden = width / 3;
        let mut out = crate::fused::zeroed(tokens * hidden);
        // Each sequence's rows, in and out.
        let mut parts = Vec::with_capacity(self.lengths.len());
        let (mut rest_in, mut rest_out) = (qkv, out.as_mut_slice());
        for &len in self.lengths {
            let (qkv, tail_in) = rest_in.split_at(len * width);
            let (out, tail_out) = std::mem::take(&mut rest_out).split_at_mut(len * hidden);
            parts.push((qkv, out));
            (rest_in, rest_out) = (tail_in, tail_out);
        }
        if parts.len() == 1 {
            parts.into_iter().for_each(|(qkv, out)| self.sequence(qkv, out, hidden));
        } else {
            parts.into_par_iter().for_each(|(qkv, out)| self.sequence(qkv, out, hidden));
        }
        Ok(out)
    }
}

/// The packed `(tokens, hidden)` context of `qkv` (`(tokens, 3 × hidden)`: queries, keys and
/// values side by side), for sequences of `lengths` tokens one after another, with `heads`
/// heads.
pub fn packed_attention(qkv: &Tensor, lengths: &[usize], heads: usize) -> candle_core::Result<Tensor> {
    let attention = PackedAttention { lengths, heads };
    crate::fused::with_matrix(qkv, PackedAttention::NAME, |data, (tokens, width)| {
        Tensor::from_vec(attention.run(data, (tokens, width))?, (tokens, width / 3), qkv.device())
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device};

    use super::*;

    /// The same attention with candle's ops, one sequence at a time.
    fn with_candle_ops(qkv: &Tensor, lengths: &[usize], heads: usize) -> Tensor {
        let hidden = qkv.dim(1).unwrap() / 3;
        let head = hidden / heads;
        let mut contexts = Vec::new();
        let mut offset = 0;
        for &len in lengths {
            let rows = qkv.narrow(0, offset, len).unwrap();
            offset += len;
            let split = |i: usize| {
                rows.narrow(1, i * hidden, hidden)
                    .unwrap()
                    .reshape((len, heads, head))
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
            };
            let (q, k, v) = (
                split(0).contiguous().unwrap(),
                split(1).t().unwrap().contiguous().unwrap(),
                split(2).contiguous().unwrap(),
            );
            let scores = (q.matmul(&k).unwrap() * (1.0 / (head as f64).sqrt())).unwrap();
            let weights = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
            contexts
                .push(weights.matmul(&v).unwrap().transpose(0, 1).unwrap().reshape((len, hidden)).unwrap());
        }
        Tensor::cat(&contexts, 0).unwrap()
    }

    #[test]
    fn matches_candles_ops_sequence_by_sequence() {
        let lengths = [7, 1, 30, 12];
        let (heads, hidden) = (4, 32);
        let tokens: usize = lengths.iter().sum();
        let qkv = Tensor::randn(0f32, 2.0, (tokens, 3 * hidden), &Device::Cpu).unwrap();
        let ours = packed_attention(&qkv, &lengths, heads).unwrap();
        let reference = with_candle_ops(&qkv, &lengths, heads);
        let diff = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "largest difference {diff}");
    }

    #[test]
    fn a_sequence_is_the_same_alone_and_in_a_batch() {
        let (heads, hidden) = (2, 16);
        let qkv = Tensor::randn(0f32, 1.0, (9, 3 * hidden), &Device::Cpu).unwrap();
        let batch = packed_attention(&qkv, &[4, 5], heads).unwrap();
        let alone = packed_attention(&qkv.narrow(0, 4, 5).unwrap(), &[5], heads).unwrap();
        let in_batch = batch.narrow(0, 4, 5).unwrap();
        assert_eq!(alone.to_vec2::<f32>().unwrap(), in_batch.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn exp_is_close_over_a_softmaxs_range() {
        for i in 0..=100_000 {
            let x = -(i as f32) / 1000.0;
            let (ours, std) = (exp_nonpositive(x), x.exp());
            // Rounding `x · log2(e)` costs about 6e-8 relative per unit of |x|.
            let tolerance = (2e-7 + 7e-8 * x.abs()) * std + 1e-37;
            assert!((ours - std).abs() <= tolerance, "exp({x}) = {ours}, std {std}");
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e30) >= 0.0 && exp_nonpositive(f32::NEG_INFINITY) >= 0.0);
    }

    #[test]
    fn rows_that_do_not_fit_are_an_error() {
        let qkv = Tensor::zeros((5, 48), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(packed_attention(&qkv, &[2, 2], 2).is_err());
        assert!(packed_attention(&qkv, &[5], 5).is_err());
    }
}
