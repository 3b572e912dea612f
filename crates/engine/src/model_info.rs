//! What Ferry knows about a model file: architecture, size, quantization and provenance.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The name clients use.
    pub id: String,
    pub path: PathBuf,
    pub architecture: String,
    pub name: Option<String>,
    pub n_params: u64,
    pub file_size: u64,
    pub quantization: String,
    pub n_ctx_train: u32,
    pub n_vocab: usize,
    pub n_layer: u32,
    pub n_embd: usize,
    /// Attention heads, and the key/value heads they share (fewer with grouped-query attention).
    pub n_head: u32,
    pub n_head_kv: u32,
    #[serde(skip)]
    pub chat_template: Option<String>,
    #[serde(skip)]
    pub bos_token: String,
    #[serde(skip)]
    pub eos_token: String,
    pub license: Option<String>,
    pub source: Option<String>,
    /// Sampling the file recommends (GGUF `general.sampling.*`, from the model's
    /// `generation_config.json` at conversion), as llama.cpp reads it: the model's defaults
    /// where the configuration sets none.
    pub sampling: crate::ModelDefaults,
}

impl ModelInfo {
    /// Bytes of an F16 KV cache holding `cells` tokens (keys and values of every layer): what a
    /// session of this model adds to the weights' memory.
    pub fn kv_cache_bytes(&self, cells: usize) -> u64 {
        let heads = u64::from(self.n_head.max(1));
        let kv_width = self.n_embd as u64 * u64::from(self.n_head_kv.max(1)).min(heads) / heads;
        2 * u64::from(self.n_layer) * cells as u64 * kv_width * 2
    }
}

/// llama.cpp's `llama_ftype` numbers, as stored in `general.file_type`.
pub fn quantization_name(file_type: u32) -> String {
    let name = match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        other => return format!("ftype {other}"),
    };
    name.to_string()
}

/// SHA-256 of a file, hex encoded.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
