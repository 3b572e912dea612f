//! What follows a dense layer's matrix product, done in place on the product's rows: the bias
//! and the activation (`act(x + b)`), or the bias, the residual connection and the layer norm
//! (`norm(x + b + residual)`). With candle's ops each was its own pass, its own zeroed
//! allocation and (for the norm) a serial `memset` of it while the other threads waited.
//! Here the packed kernel (`packed.rs`) applies the epilogue to each block of rows it has just
//! written, while the block is still in cache.
//!
//! Every step works row by row, so a row's result does not depend on the rows beside it.

use candle_core::{CpuStorage, Layout, Tensor};
use rayon::prelude::*;

/// Elements a worker thread takes at a time, and the size under which a pass stays on the
/// calling thread.
const CHUNK: usize = 16 * 1024;

/// The contiguous `f32` data of a 2-D tensor's storage, with its `(rows, width)` (`name` is
/// the caller's, for its errors).
fn matrix<'a>(
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

/// Runs `f` on the contiguous `f32` data of `t`, a 2-D tensor on the CPU, and its
/// `(rows, width)`: how every kernel of this crate reads its input, and each then returns its
/// own `Vec` as a new tensor (`Tensor::from_vec`, no copy).
pub(crate) fn with_matrix<R>(
    t: &Tensor,
    name: &str,
    f: impl FnOnce(&[f32], (usize, usize)) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("{name}: CPU tensors only")
    };
    let (data, dims) = matrix(storage, layout, name)?;
    f(data, dims)
}

/// `n` zeros, written by the pool's threads when there are many: a `memset` of a few MB on
/// one thread leaves the others idle.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    if n <= 4 * CHUNK {
        return vec![0.0; n];
    }
    let mut zeros = Vec::with_capacity(n);
    zeros.par_extend(rayon::iter::repeat_n(0.0f32, n));
    zeros
}

/// Lanes of [`sum`]: eight running sums the compiler keeps in one AVX2 register, where one
/// running sum is a chain of dependent additions it may not reorder.
const LANES: usize = 8;

/// The sum of `f` of each of `xs`, eight lanes at a time.
#[inline(always)]
pub(crate) fn sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let x8 = xs.chunks_exact(LANES);
    let tail: f32 = x8.remainder().iter().map(|&x| f(x)).sum();
    for x in x8 {
        for k in 0..LANES {
            lanes[k] += f(x[k]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// A dense layer's activation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Activation {
    /// The exact GELU (`erf`), BERT's `gelu`.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    #[inline(always)]
    fn of(self, x: f32) -> f32 {
        match self {
            Activation::Gelu => crate::gelu::gelu(x),
            // candle's `gelu`, the same formula.
            Activation::GeluTanh => {
                const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (SQRT_TWO_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
            }
            Activation::Relu => x.max(0.0),
        }
    }
}

/// A layer norm's weight, bias and epsilon.
pub(crate) struct Norm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl Norm {
    /// Normalises one row in place: the mean taken out, then divided by the standard
    /// deviation (the variance of the centred values, as torch computes it), then scaled and
    /// shifted.
    #[inline(always)]
    fn row(&self, row: &mut [f32]) {
        let n = row.len() as f32;
        let mean = sum(row, |x| x) / n;
        let variance = sum(row, |x| (x - mean) * (x - mean)) / n;
        let scale = 1.0 / (variance + self.eps).sqrt();
        for ((x, &w), &b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
            *x = (*x - mean) * scale * w + b;
        }
    }
}

/// What follows a product, applied in place to rows of it.
pub(crate) enum Epilogue<'a> {
    /// `x + bias`.
    Bias(&'a [f32]),
    /// `act(x + bias)`.
    Activation(&'a [f32], Activation),
    /// `norm(x + bias + residual)`; `residual` holds as many rows as the whole product.
    ResidualNorm { bias: &'a [f32], residual: &'a [f32], norm: &'a Norm },
    /// `norm(x)`.
    Norm(&'a Norm),
}

impl Epilogue<'_> {
    /// The row width it applies to.
    pub(crate) fn width(&self) -> usize {
        match self {
            Epilogue::Bias(bias) | Epilogue::Activation(bias, _) | Epilogue::ResidualNorm { bias, .. } => {
                bias.len()
            }
            Epilogue::Norm(norm) => norm.weight.len(),
        }
    }

    /// Applies to `rows` (whole rows), which are the product's rows from `first` on.
    pub(crate) fn apply(&self, rows: &mut [f32], first: usize) {
        let width = self.width();
        match *self {
            Epilogue::Bias(bias) => {
                for row in rows.chunks_exact_mut(width) {
                    row.iter_mut().zip(bias).for_each(|(x, &b)| *x += b);
                }
            }
            Epilogue::Activation(bias, activation) => {
                for row in rows.chunks_exact_mut(width) {
                    row.iter_mut().zip(bias).for_each(|(x, &b)| *x = activation.of(*x + b));
                }
            }
            Epilogue::ResidualNorm { bias, residual, norm } => {
                let residual = residual[first * width..].chunks_exact(width);
                for (row, residual) in rows.chunks_exact_mut(width).zip(residual) {
                    for ((x, &b), &r) in row.iter_mut().zip(bias).zip(residual) {
                        *x = *x + b + r;
                    }
                    norm.row(row);
                }
            }
            Epilogue::Norm(norm) => rows.chunks_exact_mut(width).for_each(|row| norm.row(row)),
        }
    }

    /// Applies to the whole product `y`, in parallel when it is large.
    pub(crate) fn apply_all(&self, y: &mut [f32]) {
        let width = self.width();
        if y.len() <= CHUNK {
            return self.apply(y, 0);
        }
        let rows = CHUNK.div_ceil(width);
        y.par_chunks_mut(rows * width).enumerate().for_each(|(i, y)| self.apply(y, i * rows));
    }

    /// Whether it fits a product of `(rows, width)`, or else why not (`name` is the caller's).
    pub(crate) fn check(&self, rows: usize, width: usize, name: &str) -> candle_core::Result<()> {
        if width != self.width() || width == 0 {
            candle_core::bail!("{name}: rows of {width} and an epilogue of {}", self.width())
        }
        if let Epilogue::ResidualNorm { residual, .. } = self
            && residual.len() != rows * width
        {
            candle_core::bail!("{name}: {rows}x{width} against a residual of {}", residual.len())
        }
        Ok(())
    }
}

/// `epilogue` applied to a copy of `x`, `(rows, width)`.
pub(crate) fn apply(x: &Tensor, epilogue: &Epilogue) -> candle_core::Result<Tensor> {
    with_matrix(x, "ferry-epilogue", |data, (rows, width)| {
        epilogue.check(rows, width, "ferry-epilogue")?;
        let mut y = data.to_vec();
        epilogue.apply_all(&mut y);
        Tensor::from_vec(y, (rows, width), x.device())
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module};

    use super::*;

    fn random(rows: usize, width: usize) -> Tensor {
        Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu).unwrap()
    }

    fn largest_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn bias_residual_and_norm_match_candles_ops_small_and_large() {
        for rows in [3, 200] {
            let width = 384;
            let (x, residual) = (random(rows, width), random(rows, width));
            let bias: Vec<f32> = (0..width).map(|i| i as f32 / 100.0).collect();
            let norm = Norm {
                weight: (0..width).map(|i| 1.0 + i as f32 / 1000.0).collect(),
                bias: (0..width).map(|i| i as f32 / -500.0).collect(),
                eps: 1e-12,
            };
            let residual_data = residual.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let epilogue = Epilogue::ResidualNorm { bias: &bias, residual: &residual_data, norm: &norm };
            let ours = apply(&x, &epilogue).unwrap();

            let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
            let summed = (x.broadcast_add(&t(&bias)).unwrap() + &residual).unwrap();
            let candle_norm = candle_nn::LayerNorm::new(t(&norm.weight), t(&norm.bias), 1e-12);
            let reference = candle_norm.forward(&summed).unwrap();
            assert!(largest_difference(&ours, &reference) < 1e-5, "{rows} rows");
        }
    }

    #[test]
    fn the_bias_comes_before_the_activation() {
        let x = random(50, 400);
        let bias: Vec<f32> = (0..400).map(|i| i as f32 / 100.0 - 2.0).collect();
        let t = Tensor::new(bias.as_slice(), &Device::Cpu).unwrap();
        let biased = x.broadcast_add(&t).unwrap();
        for (activation, reference) in [
            (Activation::GeluTanh, biased.gelu().unwrap()),
            (Activation::Relu, biased.relu().unwrap()),
            (Activation::Gelu, biased.gelu_erf().unwrap()),
        ] {
            let ours = apply(&x, &Epilogue::Activation(&bias, activation)).unwrap();
            assert!(largest_difference(&ours, &reference) < 4e-6, "{activation:?}");
        }
        let ours = apply(&x, &Epilogue::Bias(&bias)).unwrap();
        assert_eq!(ours.to_vec2::<f32>().unwrap(), biased.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn an_epilogue_of_another_shape_is_an_error() {
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(apply(&x, &Epilogue::Bias(&[0.0; 3])).is_err());
        let norm = Norm { weight: vec![1.0; 4], bias: vec![0.0; 4], eps: 1e-5 };
        let short = Epilogue::ResidualNorm { bias: &[0.0; 4], residual: &[0.0; 4], norm: &norm };
        assert!(apply(&x, &short).is_err());
        assert!(apply(&x, &Epilogue::Norm(&norm)).is_ok());
    }
}
