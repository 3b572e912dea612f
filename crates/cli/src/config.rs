//! `ferry serve` settings from three places, highest first: command-line flags, `FERRY_*`
//! environment variables (clap reads both), and a TOML file (`--config`). Parsing and
//! checking happen here; loading models happens in `serve`, with the checked config.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;

/// The default model: fetched by scripts/fetch-models.py into the models directory.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML file with the same settings (flags and FERRY_* variables override it)
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1]
    #[arg(long, env = "FERRY_HOST")]
    pub host: Option<String>,
    /// Port to listen on (0 picks a free one and prints it) [default: 8080]
    #[arg(long, env = "FERRY_PORT")]
    pub port: Option<u16>,
    /// A GGUF file, or a Hugging Face file as `hf:OWNER/REPO/FILE.gguf`; repeat to serve several
    #[arg(long = "model", short = 'm', env = "FERRY_MODEL", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Where the default model and downloads live [default: models]
    #[arg(long, env = "FERRY_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    /// A sentence-embedding model directory (e.g. models/all-MiniLM-L6-v2) to serve on /v1/embeddings
    #[arg(long, env = "FERRY_EMBEDDING_MODEL")]
    pub embedding_model: Option<PathBuf>,
    /// CPU threads for the forward pass [default: all cores]
    #[arg(long, short = 't', env = "FERRY_THREADS")]
    pub threads: Option<usize>,
    /// Context length of each sequence (prompt and completion) [default: 4096]
    #[arg(long, short = 'c', env = "FERRY_CTX_SIZE")]
    pub ctx_size: Option<usize>,
    /// Sequences decoded together (concurrent requests per model) [default: 8]
    #[arg(long, short = 'p', env = "FERRY_PARALLEL")]
    pub parallel: Option<usize>,
    /// Layers of each model offloaded to the GPU in a GPU build (`--features cuda`); 0 keeps
    /// models on the CPU [default: all]
    #[arg(long, env = "FERRY_GPU_LAYERS")]
    pub gpu_layers: Option<u32>,
    /// llama.cpp's flash attention: `auto` (its choice: on for the CPU), `on`, or `off`
    /// (slower under load, but a prefix cache's reuse of long prompts measured exact)
    /// [default: auto]
    #[arg(long, env = "FERRY_FLASH_ATTENTION")]
    pub flash_attention: Option<ferry_engine::FlashAttention>,
    /// Most tokens per forward pass [default: 512]
    #[arg(long, env = "FERRY_BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Most prompt tokens prefilled per step while other sequences decode (chunked prefill);
    /// with none decoding a step prefills up to --batch-size [default: 512]
    #[arg(long, env = "FERRY_PREFILL_CHUNK")]
    pub prefill_chunk: Option<usize>,
    /// Most requests waiting for a sequence; past it the answer is 429 [default: 256]
    #[arg(long, env = "FERRY_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// KV-cache cells of each model, shared by its sequences, when fewer than ctx-size ×
    /// parallel (the default: one full context per sequence); at least twice ctx-size
    #[arg(long, env = "FERRY_KV_BUDGET")]
    pub kv_budget: Option<usize>,
    /// Seconds a request to a local model may take from reaching its queue to its last token;
    /// past it the request is cancelled and answered 504 (`x-ferry-timeout` may shorten it)
    #[arg(long, env = "FERRY_REQUEST_TIMEOUT")]
    pub request_timeout: Option<f64>,
    /// Largest request body in bytes; past it the answer is 413 [default: 4194304]
    #[arg(long, env = "FERRY_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// A browser origin (`https://app.example.com`) whose pages may call the API (CORS);
    /// repeat for several, `*` for any [default: loopback pages only]
    #[arg(long = "cors-origin", env = "FERRY_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// While the server has no keys and listens on loopback, a host name besides localhost
    /// that requests may be addressed to (their Host header), such as a reverse proxy's;
    /// repeat for several, `*` for any [default: loopback names only]
    #[arg(long = "allowed-host", env = "FERRY_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Where Ferry keeps its database (tenants, keys, usage, audit log) [default:
    /// $XDG_DATA_HOME/ferry, else ~/.local/share/ferry]
    #[arg(long, env = "FERRY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A postgres:// URL to keep state in PostgreSQL instead (several replicas)
    #[arg(long, env = "FERRY_DATABASE_URL")]
    pub database_url: Option<String>,
    /// A redis:// URL shared by replicas: their requests- and tokens-per-minute limits then
    /// count together, and key changes reach every replica at once
    #[arg(long, env = "FERRY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Begins Ferry's Redis keys and channels, for deployments sharing one Redis [default: ferry]
    #[arg(long, env = "FERRY_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Seconds a replica's heartbeat may stop before the others take it for crashed and close
    /// the usage records of its requests in flight [default: 30]
    #[arg(long, env = "FERRY_REPLICA_LEASE_S")]
    pub replica_lease_s: Option<u64>,
    /// Serve without keys on a non-loopback address (anyone who can reach it may use it)
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// PEM certificate chain: serve HTTPS (with --tls-key)
    #[arg(long, env = "FERRY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the certificate
    #[arg(long, env = "FERRY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Seconds between purges of retained request content past its tenant's retention [default: 600]
    #[arg(long, env = "FERRY_PURGE_INTERVAL_S")]
    pub purge_interval_s: Option<u64>,
    /// Hours a request's trace is kept [default: 72]
    #[arg(long, env = "FERRY_TRACE_RETENTION_HOURS")]
    pub trace_retention_hours: Option<u64>,
    /// `text` (default) or `json`: one JSON object per log line
    #[arg(long, env = "FERRY_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// Seconds in-flight requests get to finish after SIGTERM before they are cancelled [default: 30]
    #[arg(long, env = "FERRY_SHUTDOWN_GRACE_S")]
    pub shutdown_grace_s: Option<u64>,
    /// Reuse a finished request's KV cache for a later prompt that starts the same way
    /// (multi-turn chats, shared system prompts); greedy answers may then differ slightly
    /// from uncached ones
    #[arg(long, env = "FERRY_PREFIX_CACHE")]
    pub prefix_cache: bool,
    /// OTLP/HTTP collector (base URL) to export one span per request to; the standard
    /// OTEL_EXPORTER_OTLP_ENDPOINT works too
    #[arg(long, env = "FERRY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Write no usage records (limits still apply; budgets then only count this process)
    #[arg(long, env = "FERRY_NO_METERING")]
    pub no_metering: bool,
    /// Most local models loaded at once; loading another unloads the least recently used
    #[arg(long, env = "FERRY_MAX_LOADED_MODELS")]
    pub max_loaded_models: Option<usize>,
    /// Most memory for loaded models' weights and KV caches (e.g. 8G, 512M; binary units);
    /// loading past it unloads the least recently used
    #[arg(long, env = "FERRY_MEMORY_BUDGET", value_parser = parse_bytes)]
    pub memory_budget: Option<u64>,
    /// Seconds a request waits for its model to load before a 503 [default: 300]
    #[arg(long, env = "FERRY_LOAD_TIMEOUT_S")]
    pub load_timeout_s: Option<u64>,
}

/// `512M`, `8G`, `1.5GiB`, `1048576`: binary units (K = 1024).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("'{text}' is not a size such as 512M or 8G"))?;
    let shift =
        match unit.trim().trim_end_matches(['B', 'b']).trim_end_matches('i').to_ascii_uppercase().as_str() {
            "" => 0,
            "K" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => return Err(format!("'{text}': the unit must be K, M, G or T")),
        };
    Ok((number * (1u64 << shift) as f64) as u64)
}

/// One entry of the TOML file's `models`: a path or hub reference (loaded at start), or a
/// table with its own name, limits and sampling defaults (loaded on first use unless
/// `preload = true`).
#[derive(Debug, Clone)]
pub enum ModelEntry {
    Source(String),
    Table(Box<ModelTable>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTable {
    /// The name clients use; the file's name without `.gguf` if unset.
    pub name: Option<String>,
    /// A GGUF path, or `hf:OWNER/REPO/FILE.gguf`.
    pub path: String,
    pub ctx_size: Option<usize>,
    pub parallel: Option<usize>,
    pub prefix_cache: Option<bool>,
    /// Layers offloaded to the GPU (overrides the server-wide setting).
    pub gpu_layers: Option<u32>,
    /// `auto`, `on` or `off` (overrides the server-wide setting).
    pub flash_attention: Option<ferry_engine::FlashAttention>,
    /// Load at start instead of on the first request.
    #[serde(default)]
    pub preload: bool,
    /// Sampling parameters used where a request sets none.
    #[serde(default)]
    pub defaults: ferry_engine::ModelDefaults,
    /// How `/v1/embeddings` pools the model's hidden states: `mean` (the default) or `last`.
    #[serde(default)]
    pub pooling: ferry_engine::Pooling,
}

impl<'de> Deserialize<'de> for ModelEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match toml::Value::deserialize(deserializer)? {
            toml::Value::String(source) => Ok(ModelEntry::Source(source)),
            table @ toml::Value::Table(_) => ModelTable::deserialize(table)
                .map(|t| ModelEntry::Table(Box::new(t)))
                .map_err(D::Error::custom),
            other => Err(D::Error::custom(format!(
                "a model is a path string or a table with `path`, not a {}",
                other.type_str()
            ))),
        }
    }
}

/// The TOML file: the same keys as the flags, with underscores.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host: Option<String>,
    port: Option<u16>,
    models: Option<Vec<ModelEntry>>,
    max_loaded_models: Option<usize>,
    /// Bytes, or a string such as "8G".
    memory_budget: Option<toml::Value>,
    load_timeout_s: Option<u64>,
    models_dir: Option<PathBuf>,
    embedding_model: Option<PathBuf>,
    threads: Option<usize>,
    ctx_size: Option<usize>,
    parallel: Option<usize>,
    gpu_layers: Option<u32>,
    flash_attention: Option<ferry_engine::FlashAttention>,
    batch_size: Option<usize>,
    prefill_chunk: Option<usize>,
    max_queue: Option<usize>,
    request_timeout: Option<f64>,
    kv_budget: Option<usize>,
    max_body_bytes: Option<usize>,
    cors_origins: Option<Vec<String>>,
    allowed_hosts: Option<Vec<String>>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    replica_lease_s: Option<u64>,
    metering: Option<bool>,
    purge_interval_s: Option<u64>,
    shutdown_grace_s: Option<u64>,
    otlp_endpoint: Option<String>,
    prefix_cache: Option<bool>,
    trace_retention_hours: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    /// Price per million tokens by model name, for costs and cost budgets.
    #[serde(default)]
    prices: std::collections::HashMap<String, ferry_server::Price>,
    /// Named privacy policies, for tenants, projects and presets.
    #[serde(default)]
    guardrails: Vec<ferry_guardrails::Policy>,
    /// Upstream providers of the gateway (see ferry_gateway::config).
    #[serde(default)]
    providers: std::collections::BTreeMap<String, ferry_gateway::ProviderConfig>,
    /// Model names clients use for upstream targets.
    #[serde(default)]
    aliases: Vec<ferry_gateway::AliasConfig>,
    /// Virtual models over a local model or an alias.
    #[serde(default)]
    presets: Vec<ferry_gateway::PresetConfig>,
    circuit_failure_threshold: Option<u32>,
    circuit_open_ms: Option<u64>,
    cache_max_bytes: Option<usize>,
    cache_ttl_s: Option<u64>,
}

/// Checked settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    pub models: Vec<ModelEntry>,
    pub max_loaded_models: Option<usize>,
    pub memory_budget: Option<u64>,
    pub load_timeout_s: u64,
    pub models_dir: PathBuf,
    /// Served on `/v1/embeddings` only when given: never picked up from `models_dir` implicitly.
    pub embedding_model: Option<PathBuf>,
    pub threads: usize,
    pub ctx_size: usize,
    pub parallel: usize,
    /// `None`: every layer on the GPU, where the build has one.
    pub gpu_layers: Option<u32>,
    pub flash_attention: ferry_engine::FlashAttention,
    pub batch_size: usize,
    pub prefill_chunk: usize,
    pub max_queue: usize,
    /// `None`: requests have no deadline unless they ask for one.
    pub request_timeout: Option<std::time::Duration>,
    /// `None`: `ctx_size * parallel` cells, one context per sequence.
    pub kv_budget: Option<usize>,
    pub max_body_bytes: usize,
    /// Browser origins besides loopback ones that may call the API (`*`: any).
    pub cors_origins: Vec<String>,
    /// Host names besides loopback ones a keyless loopback server answers (`*`: any).
    pub allowed_hosts: Vec<String>,
    /// The SQLite file, or a postgres:// URL.
    pub database: String,
    /// Redis shared by replicas, and the prefix of Ferry's keys in it.
    pub redis: Option<(String, String)>,
    /// How long a replica's heartbeat may stop before it is taken for crashed.
    pub replica_lease: std::time::Duration,
    pub insecure_no_auth: bool,
    /// Certificate and key files, for HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub metering: bool,
    pub purge_interval_s: u64,
    pub shutdown_grace: std::time::Duration,
    pub otlp_endpoint: Option<String>,
    pub prefix_cache: bool,
    pub trace_retention_hours: u64,
    pub prices: std::collections::HashMap<String, ferry_server::Price>,
    pub guardrails: Vec<ferry_guardrails::Policy>,
    pub gateway: ferry_gateway::GatewayConfig,
    /// The TOML file the settings came from, for reloads.
    pub config_path: Option<PathBuf>,
}

impl ServeArgs {
    pub fn resolve(self) -> anyhow::Result<ServeConfig> {
        let config_path = self.config.clone();
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("in the config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let threads_default = std::thread::available_parallelism().map_or(1, |n| n.get());
        let config = ServeConfig {
            host: self.host.or(file.host).unwrap_or_else(|| "127.0.0.1".into()),
            port: self.port.or(file.port).unwrap_or(8080),
            models: if self.models.is_empty() {
                file.models.unwrap_or_default()
            } else {
                self.models.into_iter().map(ModelEntry::Source).collect()
            },
            max_loaded_models: self.max_loaded_models.or(file.max_loaded_models),
            memory_budget: match (self.memory_budget, file.memory_budget) {
                (Some(bytes), _) => Some(bytes),
                (None, Some(toml::Value::Integer(bytes))) => Some(u64::try_from(bytes).unwrap_or(0)),
                (None, Some(toml::Value::String(text))) => {
                    Some(parse_bytes(&text).map_err(anyhow::Error::msg)?)
                }
                (None, Some(other)) => {
                    bail!("memory_budget must be a number of bytes or a size such as \"8G\", not {other}")
                }
                (None, None) => None,
            },
            load_timeout_s: self.load_timeout_s.or(file.load_timeout_s).unwrap_or(300),
            models_dir: self.models_dir.or(file.models_dir).unwrap_or_else(|| PathBuf::from("models")),
            embedding_model: self.embedding_model.or(file.embedding_model),
            threads: self.threads.or(file.threads).unwrap_or(threads_default),
            ctx_size: self.ctx_size.or(file.ctx_size).unwrap_or(4096),
            parallel: self.parallel.or(file.parallel).unwrap_or(8),
            gpu_layers: self.gpu_layers.or(file.gpu_layers),
            flash_attention: self.flash_attention.or(file.flash_attention).unwrap_or_default(),
            batch_size: self.batch_size.or(file.batch_size).unwrap_or(512),
            prefill_chunk: self.prefill_chunk.or(file.prefill_chunk).unwrap_or(512),
            max_queue: self.max_queue.or(file.max_queue).unwrap_or(256),
            request_timeout: match self.request_timeout.or(file.request_timeout) {
                None => None,
                Some(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => {
                    Some(std::time::Duration::from_secs_f64(s))
                }
                Some(s) => {
                    bail!("--request-timeout must be a number of seconds above 0 and at most 86400, not {s}")
                }
            },
            kv_budget: self.kv_budget.or(file.kv_budget),
            max_body_bytes: self.max_body_bytes.or(file.max_body_bytes).unwrap_or(4 * 1024 * 1024),
            cors_origins: if self.cors_origins.is_empty() {
                file.cors_origins.unwrap_or_default()
            } else {
                self.cors_origins
            },
            allowed_hosts: if self.allowed_hosts.is_empty() {
                file.allowed_hosts.unwrap_or_default()
            } else {
                self.allowed_hosts
            },
            database: match self.database_url.or(file.database_url) {
                Some(url) => url,
                None => self
                    .data_dir
                    .or(file.data_dir)
                    .unwrap_or_else(default_data_dir)
                    .join("ferry.db")
                    .display()
                    .to_string(),
            },
            redis: match self.redis_url.or(file.redis_url) {
                Some(url) => {
                    let prefix = self.redis_prefix.or(file.redis_prefix).unwrap_or_else(|| "ferry".into());
                    if prefix.is_empty() || prefix.contains(char::is_whitespace) {
                        bail!("--redis-prefix must be a word without spaces, not '{prefix}'");
                    }
                    Some((url, prefix))
                }
                None => None,
            },
            replica_lease: match self.replica_lease_s.or(file.replica_lease_s).unwrap_or(30) {
                s @ 3..=86_400 => std::time::Duration::from_secs(s),
                s => bail!("--replica-lease-s must be from 3 to 86400 seconds, not {s}"),
            },
            insecure_no_auth: self.insecure_no_auth,
            tls: match (self.tls_cert.or(file.tls_cert), self.tls_key.or(file.tls_key)) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => bail!("--tls-cert and --tls-key go together"),
            },
            trace_retention_hours: self.trace_retention_hours.or(file.trace_retention_hours).unwrap_or(72),
            otlp_endpoint: self.otlp_endpoint.clone().or(file.otlp_endpoint.clone()),
            prefix_cache: self.prefix_cache || file.prefix_cache.unwrap_or(false),
            shutdown_grace: std::time::Duration::from_secs(
                self.shutdown_grace_s.or(file.shutdown_grace_s).unwrap_or(30),
            ),
            purge_interval_s: self.purge_interval_s.or(file.purge_interval_s).unwrap_or(600).max(1),
            metering: !self.no_metering && file.metering.unwrap_or(true),
            prices: file.prices,
            guardrails: file.guardrails,
            gateway: ferry_gateway::GatewayConfig {
                providers: file.providers,
                aliases: file.aliases,
                presets: file.presets,
                circuit_failure_threshold: file.circuit_failure_threshold.unwrap_or(5),
                circuit_open_ms: file.circuit_open_ms.unwrap_or(30_000),
                cache_max_bytes: file.cache_max_bytes.unwrap_or(64 * 1024 * 1024),
                cache_ttl_s: file.cache_ttl_s.unwrap_or(300),
            },
            config_path,
        };
        for (name, value) in [
            ("threads", config.threads),
            ("ctx-size", config.ctx_size),
            ("parallel", config.parallel),
            ("batch-size", config.batch_size),
            ("prefill-chunk", config.prefill_chunk),
            ("max-body-bytes", config.max_body_bytes),
        ] {
            if value == 0 {
                bail!("--{name} must be at least 1");
            }
        }
        for origin in &config.cors_origins {
            let rest = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
            if origin != "*" && !rest.is_some_and(|r| !r.is_empty() && !r.trim_end_matches('/').contains('/'))
            {
                bail!(
                    "--cors-origin takes an origin such as https://app.example.com (scheme, host, optional port) or *, not '{origin}'"
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for policy in &config.guardrails {
            if !names.insert(policy.name.as_str()) {
                bail!("two guardrail policies are named '{}'", policy.name);
            }
        }
        for preset in &config.gateway.presets {
            if let Some(name) = &preset.guardrail_policy
                && !names.contains(name.as_str())
            {
                bail!(
                    "the preset '{}' names the guardrail policy '{name}', which no [[guardrails]] entry defines",
                    preset.name
                );
            }
        }
        // Names clients use must each mean one thing, and a preset must sit on something.
        let local: std::collections::HashSet<String> = config.local_model_names().into_iter().collect();
        let aliases: std::collections::HashSet<&str> =
            config.gateway.aliases.iter().map(|a| a.name.as_str()).collect();
        for alias in &config.gateway.aliases {
            if local.contains(&alias.name) {
                bail!(
                    "the alias '{}' has the name of a local model; give one of them another name",
                    alias.name
                );
            }
        }
        for preset in &config.gateway.presets {
            if !aliases.contains(preset.base.as_str()) && !local.contains(&preset.base) {
                bail!(
                    "the preset '{}' is over '{}', which is neither an alias nor a local model",
                    preset.name,
                    preset.base
                );
            }
        }
        if config.max_loaded_models == Some(0) {
            bail!("--max-loaded-models must be at least 1");
        }
        if let Some(budget) = config.kv_budget
            && budget < 2 * config.ctx_size
            && budget < config.ctx_size * config.parallel
        {
            bail!("--kv-budget ({budget}) must be at least twice --ctx-size ({})", config.ctx_size);
        }
        if config.batch_size < config.parallel {
            bail!("--batch-size ({}) must be at least --parallel ({})", config.batch_size, config.parallel);
        }
        Ok(config)
    }
}

impl ServeConfig {
    /// The local models to serve: the given ones, or the default model in the models
    /// directory (unless the server only routes to upstream providers).
    pub fn model_specs(&self) -> anyhow::Result<Vec<ferry_server::ModelSpec>> {
        if self.models.is_empty() && !self.gateway.aliases.is_empty() && self.gateway.presets.is_empty() {
            return Ok(Vec::new());
        }
        if self.models.is_empty() {
            let default = ModelEntry::Source(self.models_dir.join(DEFAULT_MODEL_FILE).display().to_string());
            let mut spec = self.spec(&default)?;
            // Started to serve embeddings, with no model asked for, the server keeps the default
            // chat model on disk until a request needs it: its KV cache is most of a gigabyte
            // (SmolLM2 at the default context and parallelism) that embeddings never use.
            spec.preload = self.embedding_model.is_none();
            return Ok(vec![spec]);
        }
        self.models.iter().map(|entry| self.spec(entry)).collect()
    }

    /// The names clients use for the local models (as `model_specs` names them, without
    /// looking for the files).
    fn local_model_names(&self) -> Vec<String> {
        if self.models.is_empty() {
            let gateway_only = !self.gateway.aliases.is_empty() && self.gateway.presets.is_empty();
            let stem = DEFAULT_MODEL_FILE.trim_end_matches(".gguf").to_string();
            return if gateway_only { Vec::new() } else { vec![stem] };
        }
        self.models.iter().map(|entry| Self::entry_name(entry).0).collect()
    }

    /// The name of a configured model and where its weights come from.
    fn entry_name(entry: &ModelEntry) -> (String, Option<crate::hub::HubFile>) {
        let (name, path) = match entry {
            ModelEntry::Source(source) => (None, source.clone()),
            ModelEntry::Table(table) => (table.name.clone(), table.path.clone()),
        };
        let hub = crate::hub::HubFile::parse(&path);
        let file = match &hub {
            Some(hub) => hub.file.clone(),
            None => path.clone(),
        };
        let stem = Path::new(&file).file_stem().map(|s| s.to_string_lossy().into_owned());
        (name.or(stem).unwrap_or(path), hub)
    }

    fn spec(&self, entry: &ModelEntry) -> anyhow::Result<ferry_server::ModelSpec> {
        let table = match entry {
            ModelEntry::Source(source) => ModelTable {
                name: None,
                path: source.clone(),
                ctx_size: None,
                parallel: None,
                prefix_cache: None,
                gpu_layers: None,
                flash_attention: None,
                preload: true,
                defaults: Default::default(),
                pooling: Default::default(),
            },
            ModelEntry::Table(table) => (**table).clone(),
        };
        let (name, hub) = Self::entry_name(entry);
        // A missing local file is a mistake to hear about now, not at the first request.
        let path = match hub {
            Some(_) => None,
            None => Some(crate::hub::local_file(&table.path)?),
        };
        let parallel = table.parallel.unwrap_or(self.parallel);
        let ctx_size = table.ctx_size.unwrap_or(self.ctx_size);
        if parallel == 0 || ctx_size == 0 {
            bail!("the model '{name}' needs parallel and ctx_size of at least 1");
        }
        Ok(ferry_server::ModelSpec {
            name,
            source: table.path.clone(),
            path,
            scheduler: ferry_engine::SchedulerConfig {
                session: ferry_engine::SessionConfig {
                    n_sequences: parallel,
                    ctx_per_sequence: ctx_size,
                    batch_tokens: self.batch_size.max(parallel),
                    threads: self.threads,
                    kv_budget: self.kv_budget,
                    gpu_layers: table.gpu_layers.or(self.gpu_layers),
                    flash_attention: table.flash_attention.unwrap_or(self.flash_attention),
                },
                prefill_chunk: self.prefill_chunk,
                max_waiting: self.max_queue,
                prefix_cache: table.prefix_cache.unwrap_or(self.prefix_cache),
                request_timeout: self.request_timeout,
            },
            defaults: table.defaults,
            pooling: table.pooling,
            preload: table.preload,
        })
    }
}

/// `$XDG_DATA_HOME/ferry`, or `~/.local/share/ferry`, or `./ferry-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("ferry");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/ferry"),
        None => PathBuf::from("ferry-data"),
    }
}

/// Where the default model should be, and how to get it, for the error a user sees.
pub fn missing_default_model(path: &Path) -> String {
    format!(
        "the default model {} is missing; fetch it with:\n    python3 scripts/fetch-models.py smollm2\nor serve another GGUF file with --model PATH",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("8G"), Ok(8 << 30));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("2kb"), Ok(2048));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3Q").is_err());
    }

    #[test]
    fn cors_origins_are_origins_or_a_star() {
        let resolve = |origins: &[&str]| {
            ServeArgs { cors_origins: origins.iter().map(|o| o.to_string()).collect(), ..Default::default() }
                .resolve()
                .map(|c| c.cors_origins)
        };
        assert_eq!(resolve(&["https://app.example.com", "*"]).unwrap().len(), 2);
        assert!(resolve(&["http://localhost:3000/"]).is_ok(), "a trailing slash is tolerated");
        for bad in ["app.example.com", "https://app.example.com/chat", "ftp://x", "https://"] {
            let err = resolve(&[bad]).unwrap_err().to_string();
            assert!(err.contains("--cors-origin"), "{bad}: {err}");
        }
    }

    #[test]
    fn gateway_names_and_urls_are_checked_when_the_config_is_read() {
        // As main does: providers build HTTP clients over rustls with ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("ferry-gateway-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("ferry.toml");
        let resolve = |text: &str| {
            std::fs::write(&config, text).unwrap();
            let resolved = ServeArgs { config: Some(config.clone()), ..Default::default() }.resolve();
            resolved.map(|c| c.gateway).map_err(|e| format!("{e:#}"))
        };
        let provider = "[providers.up]\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:9/v1\"\n";
        let alias = |name: &str| {
            format!("[[aliases]]\nname = \"{name}\"\ntargets = [{{ provider = \"up\", model = \"m\" }}]\n")
        };
        let gateway = resolve(&format!("{provider}{}", alias("chat"))).unwrap();
        assert!(ferry_gateway::Gateway::from_config(&gateway).is_ok());

        let err =
            resolve(&format!("models = [\"x/SmolLM2.gguf\"]\n{provider}{}", alias("SmolLM2"))).unwrap_err();
        assert!(err.contains("the alias 'SmolLM2' has the name of a local model"), "{err}");

        let preset = "[[presets]]\nname = \"triage\"\nbase = \"no-such-base\"\n";
        let err = resolve(&format!("{provider}{}{preset}", alias("chat"))).unwrap_err();
        assert!(err.contains("the preset 'triage' is over 'no-such-base'"), "{err}");

        let schemeless = provider.replace("http://127.0.0.1:9/v1", "127.0.0.1:9");
        let gateway = resolve(&format!("{schemeless}{}", alias("chat"))).unwrap();
        let err =
            ferry_gateway::Gateway::from_config(&gateway).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("must be an http:// or https:// URL"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_default_model_waits_on_disk_in_an_embedding_server() {
        let dir = std::env::temp_dir().join(format!("ferry-default-model-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(DEFAULT_MODEL_FILE), b"GGUF").unwrap();
        let specs = |embedding_model: Option<PathBuf>| {
            let args = ServeArgs { models_dir: Some(dir.clone()), embedding_model, ..Default::default() };
            args.resolve().unwrap().model_specs().unwrap()
        };
        let plain = specs(None);
        assert!(plain.len() == 1 && plain[0].preload, "a plain server loads its default model at start");
        let embedding = specs(Some(dir.join("all-MiniLM-L6-v2")));
        assert!(embedding.len() == 1 && !embedding[0].preload, "an embedding server loads it on first use");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn models_are_paths_or_tables_with_their_own_settings() {
        let dir = std::env::temp_dir().join(format!("ferry-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.gguf"), dir.join("b.gguf"));
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        let config = dir.join("ferry.toml");
        std::fs::write(
            &config,
            format!(
                "memory_budget = \"6G\"\nmax_loaded_models = 1\nparallel = 3\ngpu_layers = 20\n\
                 flash_attention = \"off\"\n\
                 models = [\"{}\", {{ name = \"bee\", path = \"{}\", ctx_size = 512, gpu_layers = 0, \
                 flash_attention = \"on\", defaults = {{ max_tokens = 7 }} }}]\n",
                a.display(),
                b.display()
            ),
        )
        .unwrap();
        let resolved = ServeArgs { config: Some(config.clone()), ..Default::default() }.resolve().unwrap();
        assert_eq!(resolved.memory_budget, Some(6 << 30));
        assert_eq!(resolved.max_loaded_models, Some(1));
        let specs = resolved.model_specs().unwrap();
        assert_eq!(specs[0].name, "a");
        assert!(specs[0].preload, "a plain path loads at start");
        assert_eq!(specs[0].scheduler.session.n_sequences, 3);
        assert_eq!(specs[0].scheduler.session.gpu_layers, Some(20));
        assert_eq!(specs[1].scheduler.session.gpu_layers, Some(0), "a model's own setting wins");
        assert_eq!(specs[0].scheduler.session.flash_attention, ferry_engine::FlashAttention::Off);
        assert_eq!(specs[1].scheduler.session.flash_attention, ferry_engine::FlashAttention::On);
        assert_eq!(specs[1].name, "bee");
        assert!(!specs[1].preload, "a table loads on first use");
        assert_eq!(specs[1].scheduler.session.ctx_per_sequence, 512);
        assert_eq!(specs[1].defaults.max_tokens, Some(7));

        std::fs::write(&config, "[[models]]\nname = \"x\"\npath = \"/nope/x.gguf\"\n").unwrap();
        let resolved = ServeArgs { config: Some(config.clone()), ..Default::default() }.resolve().unwrap();
        let err = resolved.model_specs().unwrap_err().to_string();
        assert!(err.contains("/nope/x.gguf does not exist"), "{err}");

        std::fs::write(&config, "[[models]]\npath = \"x.gguf\"\ncolour = \"red\"\n").unwrap();
        let err =
            format!("{:#}", ServeArgs { config: Some(config), ..Default::default() }.resolve().unwrap_err());
        assert!(err.contains("unknown field `colour`"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every `toml` example in the README is a config file Ferry accepts: a key placed after a
    /// table by mistake lands inside that table, which refuses it.
    #[test]
    fn the_readme_examples_parse() {
        let readme = include_str!("../../../README.md");
        let mut blocks = 0;
        let mut lines = readme.lines();
        while let Some(line) = lines.next() {
            let fence = line.trim_start();
            if fence != "```toml" {
                continue;
            }
            let indent = line.len() - fence.len();
            let block: Vec<&str> = lines
                .by_ref()
                .take_while(|l| l.trim_start() != "```")
                .map(|l| l.get(indent..).unwrap_or(l.trim_start()))
                .collect();
            let text = block.join("\n");
            if let Err(e) = toml::from_str::<FileConfig>(&text) {
                panic!("a README example does not parse: {e}\n{text}");
            }
            blocks += 1;
        }
        assert!(blocks >= 3, "{blocks} toml examples found in the README");
    }
}
