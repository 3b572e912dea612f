//! Element-wise passes fused with a dense layer's bias: `f(x + bias)` (the activation) and
//! `x + bias + residual` (before a layer norm), each one pass over memory and one parallel
//! region instead of two or three candle ops, each with its own allocation and region.
//!
//! A tensor under [`CHUNK`] elements (a short request's) is done on the calling thread: waking
//! the rayon pool's other threads costs more than the pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements a worker thread takes at a time, and the size under which a pass stays on the
/// calling thread.
const CHUNK: usize = 16 * 1024;

/// The contiguous `f32` data of a 2-D tensor, with its `(rows, width)`: what every custom op
/// of this crate reads (`name` is the op's, for its errors).
pub(crate) fn matrix<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    name: &str,
) -> candle_core::Result<(&'a [f32], (usize, usize))> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{name}: f32 tensors only") };
    let (Some((start, end)), dims) = (layout.contiguous_offsets(), layout.shape().dims2()?) else {
        candle_core::bail!("{name}: contiguous tensors only")
    };
    Ok((&data[start..end], dims))
}

/// The contiguous `f32` data of a `(rows, width)` tensor whose width is `bias`'s.
fn rows<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    bias: &[f32],
    name: &str,
) -> candle_core::Result<&'a [f32]> {
    let (data, (_, width)) = matrix(storage, layout, name)?;
    if width != bias.len() || width == 0 {
        candle_core::bail!("{name}: rows of {width} and a bias of {}", bias.len())
    }
    Ok(data)
}

/// Runs `pass` over row-aligned chunks of `out` and of each input, in parallel when large.
fn chunked<'a, F>(out: &mut [f32], inputs: [&'a [f32]; 2], width: usize, pass: F)
where
    F: Fn(&mut [f32], [&'a [f32]; 2]) + Sync,
{
    if out.len() <= CHUNK {
        return pass(out, inputs);
    }
    let step = CHUNK.div_ceil(width) * width;
    let [a, b] = inputs;
    out.par_chunks_mut(step).enumerate().for_each(|(i, out)| {
        let at = |xs: &'a [f32]| if xs.is_empty() { xs } else { &xs[i * step..i * step + out.len()] };
        pass(out, [at(a), at(b)])
    });
}

struct MapRows<'a, F> {
    bias: &'a [f32],
    name: &'static str,
    f: F,
}

impl<F: Fn(f32, f32) -> f32 + Sync> CustomOp1 for MapRows<'_, F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = rows(storage, layout, self.bias, self.name)?;
        let width = self.bias.len();
        let mut out = vec![0.0f32; xs.len()];
        chunked(&mut out, [xs, &[]], width, |out, [xs, _]| {
            for (out, xs) in out.chunks_exact_mut(width).zip(xs.chunks_exact(width)) {
                for ((o, &x), &b) in out.iter_mut().zip(xs).zip(self.bias) {
                    *o = (self.f)(x, b);
                }
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `f(x, bias[column])` of each element of `x`, `(rows, width)` (made contiguous if it is not).
pub fn map_rows(
    x: &Tensor,
    bias: &[f32],
    name: &'static str,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&MapRows { bias, name, f })
}

struct BiasResidual<'a> {
    bias: &'a [f32],
}

impl CustomOp2 for BiasResidual<'_> {
    fn name(&self) -> &'static str {
        "ferry-bias-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = rows(x, x_layout, self.bias, self.name())?;
        let residual = rows(residual, residual_layout, self.bias, self.name())?;
        if x_layout.shape() != residual_layout.shape() {
            candle_core::bail!(
                "{}: {:?} against {:?}",
                self.name(),
                x_layout.shape(),
                residual_layout.shape()
            )
        }
        let width = self.bias.len();
        let mut out = vec![0.0f32; xs.len()];
        chunked(&mut out, [xs, residual], width, |out, [xs, residual]| {
            let rows =
                out.chunks_exact_mut(width).zip(xs.chunks_exact(width)).zip(residual.chunks_exact(width));
            for ((out, xs), residual) in rows {
                for (((o, &x), &b), &r) in out.iter_mut().zip(xs).zip(self.bias).zip(residual) {
                    *o = x + b + r;
                }
            }
        });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// `x + bias + residual`: a dense layer's product, its bias (per column) and the residual
/// connection, all `(rows, width)`.
pub fn bias_residual(x: &Tensor, bias: &[f32], residual: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&residual.contiguous()?, &BiasResidual { bias })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn bias_and_residual_match_candles_adds_small_and_large() {
        for rows in [3, 200] {
            let width = 384;
            let x = Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).unwrap();
            let residual = Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).unwrap();
            let bias: Vec<f32> = (0..width).map(|i| i as f32 / 100.0).collect();
            let ours = bias_residual(&x, &bias, &residual).unwrap();
            let bias_t = Tensor::new(bias.as_slice(), &Device::Cpu).unwrap();
            let reference = (x.broadcast_add(&bias_t).unwrap() + &residual).unwrap();
            assert_eq!(ours.to_vec2::<f32>().unwrap(), reference.to_vec2::<f32>().unwrap());
        }
    }

    #[test]
    fn a_bias_of_another_width_is_an_error() {
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(bias_residual(&x, &[0.0; 3], &x).is_err());
        assert!(map_rows(&x, &[0.0; 5], "t", |x, b| x + b).is_err());
    }
}
