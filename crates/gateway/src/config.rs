//! The gateway's part of the TOML config: upstream providers and the aliases clients use.
//!
//! ```toml
//! [providers.vllm]
//! kind = "openai"
//! base_url = "http://10.0.0.5:8000/v1"
//! api_key_env = "VLLM_API_KEY"        # or api_key_file = "/run/secrets/vllm"
//!
//! [[aliases]]
//! name = "chat"
//! strategy = "fallback"               # or "weighted", "least_outstanding"
//! retries = 2
//! targets = [{ provider = "vllm", model = "Qwen/Qwen2.5-7B-Instruct" }]
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    pub aliases: Vec<AliasConfig>,
    /// Virtual models: a base model or alias with a system prompt and parameters.
    #[serde(default)]
    pub presets: Vec<PresetConfig>,
    /// Consecutive failures that open a target's circuit.
    #[serde(default = "default_failure_threshold")]
    pub circuit_failure_threshold: u32,
    /// How long an open circuit skips its target before one probe.
    #[serde(default = "default_open_ms")]
    pub circuit_open_ms: u64,
    /// Memory bound of the exact response cache.
    #[serde(default = "default_cache_bytes")]
    pub cache_max_bytes: usize,
    /// TTL of answers cached because a request asked (`x-ferry-cache: on`).
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// `openai` (any OpenAI-compatible server).
    pub kind: String,
    pub base_url: String,
    /// Environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// File holding the API key (a mounted secret).
    pub api_key_file: Option<String>,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_first_byte_ms")]
    pub first_byte_timeout_ms: u64,
    #[serde(default = "default_total_ms")]
    pub total_timeout_ms: u64,
}

impl ProviderConfig {
    /// The base URL, checked: `http://` or `https://` and a host. Without a scheme every call
    /// would fail with a URL error; better to hear it when the config is read.
    pub fn checked_base_url(&self) -> Result<&str, String> {
        let url = self.base_url.trim();
        let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        match rest {
            Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(url),
            _ => Err(format!(
                "base_url `{}` must be an http:// or https:// URL with a host, such as http://127.0.0.1:8000/v1",
                self.base_url
            )),
        }
    }

    /// A likely mistake in a base URL that is well formed: the path each kind appends makes
    /// the upstream answer 404 to every request. Said in the log when the config is read.
    pub fn base_url_hint(&self) -> Option<String> {
        let url = self.base_url.trim().trim_end_matches('/');
        let path = url.split_once("://").map_or("", |(_, rest)| rest.find('/').map_or("", |i| &rest[i..]));
        match self.kind.as_str() {
            "openai" if path.is_empty() => Some(format!(
                "base_url `{url}` has no path, so requests go to {url}/chat/completions; \
                 OpenAI-compatible servers (vLLM, Ollama, llama-server) serve under /v1, as in {url}/v1"
            )),
            "anthropic" if path.ends_with("/v1") => Some(format!(
                "base_url `{url}` ends in /v1, so requests go to {url}/v1/messages; \
                 the anthropic kind appends /v1/messages itself (base_url like https://api.anthropic.com)"
            )),
            "gemini" if path.ends_with("/v1beta") || path.ends_with("/v1") => Some(format!(
                "base_url `{url}` ends in a version, so requests go to {url}/v1beta/models/…; \
                 the gemini kind appends /v1beta itself (base_url like https://generativelanguage.googleapis.com)"
            )),
            _ => None,
        }
    }

    /// The key from its variable or file; an error names the source, never the value.
    pub fn api_key(&self) -> Result<Option<String>, String> {
        if let Some(var) = &self.api_key_env {
            return std::env::var(var)
                .map(Some)
                .map_err(|_| format!("the environment variable {var} is not set"));
        }
        if let Some(path) = &self.api_key_file {
            return std::fs::read_to_string(path)
                .map(|k| Some(k.trim().to_string()))
                .map_err(|e| format!("reading the key file {path}: {e}"));
        }
        Ok(None)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Targets in the order listed; the next one only when the previous fails.
    #[default]
    Fallback,
    /// Spread by weight; the others stay as fallbacks.
    Weighted,
    /// The target with the fewest requests in flight first.
    LeastOutstanding,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasConfig {
    pub name: String,
    #[serde(default)]
    pub strategy: Strategy,
    /// Retries on the same target before falling back.
    #[serde(default = "default_retries")]
    pub retries: u32,
    pub targets: Vec<TargetConfig>,
    /// Cache this alias's plain answers for so many seconds (off when absent).
    pub cache_ttl_s: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub provider: String,
    pub model: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_failure_threshold() -> u32 {
    5
}
fn default_open_ms() -> u64 {
    30_000
}
fn default_connect_ms() -> u64 {
    10_000
}
fn default_first_byte_ms() -> u64 {
    60_000
}
fn default_total_ms() -> u64 {
    600_000
}
fn default_cache_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_cache_ttl() -> u64 {
    300
}
fn default_retries() -> u32 {
    1
}
fn default_weight() -> u32 {
    1
}

/// A preset: what clients name as `model`, standing for `base` (a local model or an alias)
/// with a system prompt, default parameters (used when the client sets none) and locked
/// parameters (a client may not change them).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetConfig {
    pub name: String,
    pub base: String,
    pub description: Option<String>,
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub defaults: PresetParams,
    #[serde(default)]
    pub locked: PresetParams,
    /// The privacy guardrail policy this preset asks for (enforced once policies exist).
    pub guardrail_policy: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PresetParams {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(kind: &str, base_url: &str) -> ProviderConfig {
        ProviderConfig {
            kind: kind.into(),
            base_url: base_url.into(),
            api_key_env: None,
            api_key_file: None,
            connect_timeout_ms: 1,
            first_byte_timeout_ms: 1,
            total_timeout_ms: 1,
        }
    }

    #[test]
    fn base_urls_missing_or_repeating_the_version_are_pointed_out() {
        let hint = |kind, url| provider(kind, url).base_url_hint();
        assert!(hint("openai", "http://10.0.0.5:8000").unwrap().contains("http://10.0.0.5:8000/v1"));
        assert!(hint("openai", "http://10.0.0.5:8000/").is_some());
        assert_eq!(hint("openai", "http://10.0.0.5:8000/v1"), None);
        assert_eq!(hint("openai", "https://dashscope.aliyuncs.com/compatible-mode/v1"), None);
        assert!(hint("anthropic", "https://api.anthropic.com/v1").unwrap().contains("/v1/v1/messages"));
        assert_eq!(hint("anthropic", "https://api.anthropic.com"), None);
        assert!(hint("gemini", "https://generativelanguage.googleapis.com/v1beta/").is_some());
        assert_eq!(hint("gemini", "https://generativelanguage.googleapis.com"), None);
    }
}
