//! BERT's encoder over packed sequences: the tokens of every sequence of a forward pass sit
//! one after another in one `(tokens, hidden)` matrix, so the linear layers (nearly all of
//! the work) multiply only real tokens, never padding, and attention runs per sequence over
//! its own tokens. A sequence's result does not depend on what it was packed with.

use candle_core::{D, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::fused::{Activation, Epilogue, Norm};

/// The fields of a Hugging Face BERT `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_activation")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    pub model_type: Option<String>,
    pub position_embedding_type: Option<String>,
}

fn default_activation() -> String {
    "gelu".into()
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}

impl Config {
    /// What this encoder cannot run, said as the config's own field.
    pub fn unsupported(&self) -> Option<String> {
        if let Some(kind) = self.model_type.as_deref().filter(|t| *t != "bert") {
            return Some(format!("model_type {kind:?} is not \"bert\""));
        }
        if let Some(kind) = self.position_embedding_type.as_deref().filter(|t| *t != "absolute") {
            return Some(format!("position_embedding_type {kind:?} is not supported: only \"absolute\" is"));
        }
        if Activation::parse(&self.hidden_act).is_none() {
            return Some(format!(
                "hidden_act {:?} is not supported: \"gelu\", \"gelu_new\", \"gelu_pytorch_tanh\" and \"relu\" are",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Some(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        None
    }
}

struct Layer {
    /// Query, key and value in one `(3 × hidden, hidden)` projection: one matrix product.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    intermediate: Dense,
    output: Dense,
    output_norm: Norm,
}

/// The encoder's weights.
pub struct Bert {
    words: Embedding,
    positions: Embedding,
    /// Token type 0's embedding: every input is a single segment.
    token_type: Tensor,
    embeddings_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    activation: Activation,
}

/// A dense layer, `x · Wᵀ + b`, with its weight laid out for the matrix-product kernel this
/// CPU runs.
///
/// gemm computes `x · Wᵀ` as `(W · xᵀ)ᵀ`, with the weight on its left. Stored `(out, in)`,
/// that side's columns are strided, and gemm packs the whole weight into panels on every
/// call. With its AVX-512 kernels the packing was 31% of the time for one sentence, and a
/// weight kept `(in, out)`, contiguous, is read in place instead: batch 1 went from 63-66 to
/// 108 embeddings a second, batch 32 from 300-307 to 318-335. gemm's AVX2 kernels read such a
/// weight badly (24 rows of a column at a time, a cache line and a half): 67-69 against 90-94
/// at batch 1. So where gemm would choose AVX-512 (see [`avx512`]) the weight is transposed
/// for it, and elsewhere it is packed once for Ferry's own kernel (`packed.rs`), which never
/// packs per call.
enum Weight {
    /// `Wᵀ`, contiguous, for gemm's AVX-512 kernels.
    Transposed(Tensor),
    Packed(crate::packed::PackedWeight),
}

struct Dense {
    weight: Weight,
    /// Added in the product's epilogue (`fused.rs`).
    bias: Vec<f32>,
}

impl Dense {
    /// From a weight `(out, in)` as stored, and its bias `(out)`.
    fn new(weight: &Tensor, bias: Tensor) -> candle_core::Result<Dense> {
        let weight = if avx512() {
            Weight::Transposed(weight.t()?.contiguous()?)
        } else {
            Weight::Packed(crate::packed::PackedWeight::new(weight)?)
        };
        Ok(Dense { weight, bias: bias.to_vec1()? })
    }

    /// `epilogue(x · Wᵀ)`.
    fn product(&self, x: &Tensor, epilogue: &Epilogue) -> candle_core::Result<Tensor> {
        match &self.weight {
            Weight::Transposed(w) => crate::fused::apply(&x.matmul(w)?, epilogue),
            Weight::Packed(w) => crate::packed::product(x, w, epilogue),
        }
    }

    /// `x · Wᵀ + b`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.product(x, &Epilogue::Bias(&self.bias))
    }

    /// `act(x · Wᵀ + b)`.
    fn forward_activation(&self, x: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
        self.product(x, &Epilogue::Activation(&self.bias, activation))
    }

    /// `norm(x · Wᵀ + b + residual)`.
    fn forward_residual_norm(
        &self,
        x: &Tensor,
        residual: &Tensor,
        norm: &Norm,
    ) -> candle_core::Result<Tensor> {
        crate::fused::with_matrix(residual, "ferry-residual", |residual, _| {
            self.product(x, &Epilogue::ResidualNorm { bias: &self.bias, residual, norm })
        })
    }
}

/// Whether gemm runs its AVX-512 kernels here: the CPU has the features its `x86-v4` level
/// asks for (checked the same way, at run time).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512cd")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A dense layer's stored weight `(out, in)` and bias.
fn dense_parts(vb: &VarBuilder, out: usize, inp: usize) -> candle_core::Result<(Tensor, Tensor)> {
    Ok((vb.get((out, inp), "weight")?, vb.get(out, "bias")?))
}

fn dense(vb: &VarBuilder, out: usize, inp: usize) -> candle_core::Result<Dense> {
    let (weight, bias) = dense_parts(vb, out, inp)?;
    Dense::new(&weight, bias)
}

fn layer_norm(vb: &VarBuilder, size: usize, eps: f64) -> candle_core::Result<Norm> {
    Ok(Norm {
        weight: vb.get(size, "weight")?.to_vec1()?,
        bias: vb.get(size, "bias")?.to_vec1()?,
        eps: eps as f32,
    })
}

impl Bert {
    /// Loads the weights (named as `BertModel`'s state dict, with or without a `bert.`
    /// prefix). The config must have passed [`Config::unsupported`].
    pub fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") { vb } else { vb.pp("bert") };
        let (hidden, eps) = (config.hidden_size, config.layer_norm_eps);
        let embeddings = vb.pp("embeddings");
        let table = |name: &str, rows: usize| -> candle_core::Result<Embedding> {
            Ok(Embedding::new(embeddings.pp(name).get((rows, hidden), "weight")?, hidden))
        };
        let token_types =
            embeddings.pp("token_type_embeddings").get((config.type_vocab_size, hidden), "weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layer.{i}"));
                let attention = vb.pp("attention");
                let [q, k, v] = ["query", "key", "value"]
                    .map(|name| dense_parts(&attention.pp("self").pp(name), hidden, hidden));
                let ((qw, qb), (kw, kb), (vw, vb_)) = (q?, k?, v?);
                let qkv = Dense::new(&Tensor::cat(&[qw, kw, vw], 0)?, Tensor::cat(&[qb, kb, vb_], 0)?)?;
                Ok(Layer {
                    qkv,
                    attention_out: dense(&attention.pp("output.dense"), hidden, hidden)?,
                    attention_norm: layer_norm(&attention.pp("output.LayerNorm"), hidden, eps)?,
                    intermediate: dense(&vb.pp("intermediate.dense"), config.intermediate_size, hidden)?,
                    output: dense(&vb.pp("output.dense"), hidden, config.intermediate_size)?,
                    output_norm: layer_norm(&vb.pp("output.LayerNorm"), hidden, eps)?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Bert {
            words: table("word_embeddings", config.vocab_size)?,
            positions: table("position_embeddings", config.max_position_embeddings)?,
            token_type: token_types.get(0)?,
            embeddings_norm: layer_norm(&embeddings.pp("LayerNorm"), hidden, eps)?,
            layers,
            heads: config.num_attention_heads,
            activation: Activation::parse(&config.hidden_act).unwrap_or(Activation::Gelu),
        })
    }

    /// The last hidden states of `sequences` packed: `(total tokens, hidden)`, sequence after
    /// sequence. Every sequence is within the model's positions.
    pub fn forward(&self, sequences: &[&[u32]], device: &Device) -> candle_core::Result<Tensor> {
        let ids: Vec<u32> = sequences.iter().flat_map(|s| s.iter().copied()).collect();
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        let positions: Vec<u32> = sequences.iter().flat_map(|s| 0..s.len() as u32).collect();
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, device)?;
        let positions = Tensor::from_vec(positions, n, device)?;
        let embedded = (self.words.forward(&ids)? + self.positions.forward(&positions)?)?
            .broadcast_add(&self.token_type)?;
        let mut x = crate::fused::apply(&embedded, &Epilogue::Norm(&self.embeddings_norm))?;
        for layer in &self.layers {
            let context = crate::attention::packed_attention(&layer.qkv.forward(&x)?, &lengths, self.heads)?;
            let attended = layer.attention_out.forward_residual_norm(&context, &x, &layer.attention_norm)?;
            let inner = layer.intermediate.forward_activation(&attended, self.activation)?;
            x = layer.output.forward_residual_norm(&inner, &attended, &layer.output_norm)?;
        }
        Ok(x)
    }
}

/// Each sequence's mean over its rows of the packed `hidden` states, normalised to unit length
/// (sentence-transformers' mean pooling then `Normalize`: x / max(‖x‖, 1e-12)).
pub fn mean_pool_normalized(hidden: &Tensor, lengths: &[usize]) -> candle_core::Result<Vec<Vec<f32>>> {
    let mut means = Vec::with_capacity(lengths.len());
    let mut offset = 0;
    for &len in lengths {
        means.push(hidden.narrow(0, offset, len)?.mean(0)?);
        offset += len;
    }
    let means = Tensor::stack(&means, 0)?;
    let norms = means.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    means.broadcast_div(&norms)?.to_vec2::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small config with `extra`'s fields set over it.
    fn config(extra: &str) -> Config {
        let mut fields = serde_json::json!({"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32});
        let extra: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&format!("{{{}}}", extra.trim_start_matches(','))).unwrap();
        fields.as_object_mut().unwrap().extend(extra);
        serde_json::from_value(fields).unwrap()
    }

    #[test]
    fn what_the_encoder_cannot_run_is_named() {
        assert_eq!(config("").unsupported(), None);
        assert_eq!(config(r#", "hidden_act": "gelu_new", "model_type": "bert""#).unsupported(), None);
        let refused = |extra: &str, field: &str| {
            assert!(config(extra).unsupported().is_some_and(|m| m.contains(field)), "{extra}");
        };
        refused(r#", "model_type": "roberta""#, "model_type");
        refused(r#", "hidden_act": "silu""#, "hidden_act");
        refused(r#", "position_embedding_type": "relative_key""#, "position_embedding_type");
        refused(r#", "num_attention_heads": 3"#, "num_attention_heads");
    }
}
