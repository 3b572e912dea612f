//! A dense layer's matrix product `x · Wᵀ` with `W` packed once, when the model loads, into
//! the panels a register-blocked kernel reads in order, for CPUs without AVX-512.
//!
//! gemm packs its weight operand into panels on every call. With its AVX2 kernels that was 37%
//! of an embedding's time for one sentence (27 tokens): the weight is packed for a product
//! that uses each of its values 27 times. Here the panels are made at load, and each call only
//! multiplies. The epilogue (`fused.rs`: bias, activation, residual, norm) is applied to each
//! block of rows as soon as the block is done.
//!
//! The kernel keeps a tile of [`ROWS`] rows of `x` by [`PANEL`] output columns in registers
//! (12 of AVX2's 16 vector registers) and steps through the inner dimension, one fused
//! multiply-add per row and vector. A row's result is summed in the same order whatever rows
//! it is batched with, so a sentence's embedding does not depend on its batch.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::fused::{Epilogue, zeroed};

/// Output columns of a panel: two vectors of eight lanes.
const PANEL: usize = 16;
/// Rows of `x` a tile multiplies at once.
const ROWS: usize = 6;
/// The bytes of `x` a block of rows holds, so that the block stays in L2 while every panel
/// passes over it.
const BLOCK_BYTES: usize = 128 * 1024;
/// Products under this many multiply-adds run on the calling thread.
const SERIAL_MACS: usize = 1 << 18;

/// A weight `(out, in)` as panels: for each run of [`PANEL`] output columns, `in` steps of
/// [`PANEL`] values (zeros past `out`).
pub(crate) struct PackedWeight {
    panels: Vec<f32>,
    inp: usize,
    out: usize,
}

impl PackedWeight {
    /// From a weight stored `(out, in)`, row-major.
    pub(crate) fn new(weight: &Tensor) -> candle_core::Result<PackedWeight> {
        let (out, inp) = weight.dims2()?;
        if out == 0 || inp == 0 {
            candle_core::bail!("ferry-packed-product: an empty weight ({out}x{inp})")
        }
        let stored = weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(PackedWeight::from_fn(out, inp, |o, k| stored[o * inp + k]))
    }

    /// The weight `(out, in)` whose value at `(o, k)` is `at(o, k)`; neither may be 0.
    pub(crate) fn from_fn(out: usize, inp: usize, at: impl Fn(usize, usize) -> f32) -> PackedWeight {
        let mut panels = vec![0.0f32; out.div_ceil(PANEL) * inp * PANEL];
        for (p, panel) in panels.chunks_exact_mut(inp * PANEL).enumerate() {
            let columns = (out - p * PANEL).min(PANEL);
            for (k, step) in panel.chunks_exact_mut(PANEL).enumerate() {
                for (c, w) in step[..columns].iter_mut().enumerate() {
                    *w = at(p * PANEL + c, k);
                }
            }
        }
        PackedWeight { panels, inp, out }
    }

    /// `x · Wᵀ` on the calling thread.
    pub(crate) fn product_here(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len() / self.inp * self.out];
        self.block(&self.interleave(x), &mut y, self.out, 0, 0..self.n_panels());
        y
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.panels[p * self.inp * PANEL..(p + 1) * self.inp * PANEL]
    }

    fn n_panels(&self) -> usize {
        self.out.div_ceil(PANEL)
    }

    /// The rows of `x` (`rows × in`) interleaved by tiles, `in` steps of up to [`ROWS`] values
    /// each, so that a tile reads one run of memory; made once for all the panels.
    fn interleave(&self, x: &[f32]) -> Vec<f32> {
        let inp = self.inp;
        let mut tiles = vec![0.0f32; x.len()];
        for (tile, out) in x.chunks(ROWS * inp).zip(tiles.chunks_mut(ROWS * inp)) {
            let n = tile.len() / inp;
            if n == ROWS {
                // A whole tile: each step written at once, one value from each row (a third of
                // the time of the scattered writes below, which stride across the tile).
                let rows: [&[f32]; ROWS] = std::array::from_fn(|r| &tile[r * inp..(r + 1) * inp]);
                for (k, step) in out.as_chunks_mut::<ROWS>().0.iter_mut().enumerate() {
                    *step = std::array::from_fn(|r| rows[r][k]);
                }
                continue;
            }
            for (r, row) in tile.chunks_exact(inp).enumerate() {
                for (step, &v) in out.chunks_exact_mut(n).zip(row) {
                    step[r] = v;
                }
            }
        }
        tiles
    }

    /// `y` (`rows × out`) = `x · Wᵀ`, over panels `panels` only, for the rows of `x` as
    /// [`interleave`](Self::interleave) lays them out.
    fn block(
        &self,
        tiles: &[f32],
        y: &mut [f32],
        y_width: usize,
        y_from: usize,
        panels: std::ops::Range<usize>,
    ) {
        let inp = self.inp;
        for p in panels {
            let panel = self.panel(p);
            let columns = (self.out - p * PANEL).min(PANEL);
            let at = p * PANEL - y_from;
            for (t, xt) in tiles.chunks(ROWS * inp).enumerate() {
                let y = &mut y[t * ROWS * y_width..];
                match xt.len() / inp {
                    6 => store(tile::<6>(xt, panel), y, y_width, at, columns),
                    5 => store(tile::<5>(xt, panel), y, y_width, at, columns),
                    4 => store(tile::<4>(xt, panel), y, y_width, at, columns),
                    3 => store(tile::<3>(xt, panel), y, y_width, at, columns),
                    2 => store(tile::<2>(xt, panel), y, y_width, at, columns),
                    _ => store(tile::<1>(xt, panel), y, y_width, at, columns),
                }
            }
        }
    }

    /// `epilogue(x · Wᵀ)` of `x`, `(rows, in)` row-major: `(rows, out)`.
    fn product(&self, x: &[f32], epilogue: &Epilogue) -> Vec<f32> {
        let (inp, out) = (self.inp, self.out);
        let rows = x.len() / inp;
        let mut y = zeroed(rows * out);
        let all = 0..self.n_panels();
        if rows * inp * out <= SERIAL_MACS || rayon::current_num_threads() == 1 {
            self.block(&self.interleave(x), &mut y, out, 0, all);
            epilogue.apply(&mut y, 0);
            return y;
        }
        let most_rows = (BLOCK_BYTES / (4 * inp) / ROWS).max(1) * ROWS;
        if rows > most_rows {
            // Blocks of rows in parallel, each through every panel. Their number is a multiple
            // of the threads', so that each thread gets the same share: 864 rows of 384 in
            // blocks of the most that fit, 126, were 7 blocks, 4 for one thread and 3 for the
            // other (no change in embeddings a second was measurable on its own).
            let blocks = rows.div_ceil(most_rows).next_multiple_of(rayon::current_num_threads());
            let block_rows = rows.div_ceil(blocks).next_multiple_of(ROWS);
            y.par_chunks_mut(block_rows * out).zip(x.par_chunks(block_rows * inp)).enumerate().for_each(
                |(i, (y, x))| {
                    self.block(&self.interleave(x), y, out, 0, all.clone());
                    epilogue.apply(y, i * block_rows);
                },
            );
            return y;
        }
        // Too few rows to share out: the panels are shared out instead, each share into its
        // own columns, copied into place after (with the epilogue, rows shared out again);
        // the rows are interleaved once for all shares.
        let tiles = self.interleave(x);
        let shares = (rayon::current_num_threads() * 2).min(self.n_panels());
        let per = self.n_panels().div_ceil(shares);
        let parts: Vec<(usize, usize, Vec<f32>)> = (0..shares)
            .into_par_iter()
            .map(|s| {
                let panels = s * per..((s + 1) * per).min(self.n_panels());
                let (from, to) = (panels.start * PANEL, (panels.end * PANEL).min(out));
                let mut part = vec![0.0f32; rows * (to - from)];
                self.block(&tiles, &mut part, to - from, from, panels);
                (from, to, part)
            })
            .collect();
        let place = |first: usize, y: &mut [f32]| {
            for (from, to, part) in &parts {
                let part = part[first * (to - from)..].chunks_exact(to - from);
                for (y, part) in y.chunks_exact_mut(out).zip(part) {
                    y[*from..*to].copy_from_slice(part);
                }
            }
            epilogue.apply(y, first);
        };
        let share_rows = rows.div_ceil(rayon::current_num_threads());
        y.par_chunks_mut(share_rows * out).enumerate().for_each(|(i, y)| place(i * share_rows, y));
        y
    }
}

/// The `R × PANEL` products of `R` rows of `x`, interleaved (`in` steps of `R` values), with a
/// panel (`in` steps of `PANEL` values).
#[inline(always)]
fn tile<const R: usize>(x: &[f32], panel: &[f32]) -> [[f32; PANEL]; R] {
    let (steps, _) = x.as_chunks::<R>();
    let (weights, _) = panel.as_chunks::<PANEL>();
    let mut acc = [[0.0f32; PANEL]; R];
    for (xs, w) in steps.iter().zip(weights) {
        for (acc, &v) in acc.iter_mut().zip(xs) {
            for (a, &w) in acc.iter_mut().zip(w) {
                *a = v.mul_add(w, *a);
            }
        }
    }
    acc
}

/// Writes a tile's first `columns` columns at column `at` of `R` rows of `y`.
#[inline(always)]
fn store<const R: usize>(acc: [[f32; PANEL]; R], y: &mut [f32], width: usize, at: usize, columns: usize) {
    for (r, acc) in acc.iter().enumerate() {
        y[r * width + at..r * width + at + columns].copy_from_slice(&acc[..columns]);
    }
}

/// `epilogue(x · Wᵀ)` for `x` `(rows, in)`.
pub(crate) fn product(x: &Tensor, weight: &PackedWeight, epilogue: &Epilogue) -> candle_core::Result<Tensor> {
    const NAME: &str = "ferry-packed-product";
    crate::fused::with_matrix(x, NAME, |x_data, (rows, inp)| {
        if inp != weight.inp {
            candle_core::bail!("{NAME}: rows of {inp} against a weight of {}", weight.inp)
        }
        epilogue.check(rows, weight.out, NAME)?;
        Tensor::from_vec(weight.product(x_data, epilogue), (rows, weight.out), x.device())
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_candles_matmul_for_every_shape_of_tail() {
        // Outputs that leave a panel part-filled, rows that leave tiles and blocks part-filled,
        // and products large enough to run in parallel both ways.
        for (rows, inp, out) in [(1, 8, 16), (7, 24, 40), (13, 384, 1152), (200, 1536, 384), (5, 3, 1)] {
            let x = Tensor::from_vec(values(rows * inp, 1), (rows, inp), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(values(out * inp, 2), (out, inp), &Device::Cpu).unwrap();
            let ours =
                product(&x, &PackedWeight::new(&w).unwrap(), &Epilogue::Bias(&vec![0.0; out])).unwrap();
            let candle = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(ours.dims(), candle.dims());
            let diff = (ours - candle).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4 * inp as f32, "{rows}x{inp}x{out}: {diff}");
        }
    }

    #[test]
    fn a_row_is_the_same_alone_and_among_others() {
        let (inp, out) = (384, 1152);
        let w = PackedWeight::new(&Tensor::from_vec(values(out * inp, 3), (out, inp), &Device::Cpu).unwrap())
            .unwrap();
        let many = values(100 * inp, 4);
        let zero = vec![0.0; out];
        let bias = Epilogue::Bias(&zero);
        let together = w.product(&many, &bias);
        for r in [0, 5, 6, 51, 99] {
            let alone = w.product(&many[r * inp..(r + 1) * inp], &bias);
            assert_eq!(alone, together[r * out..(r + 1) * out], "row {r}");
        }
    }
}
