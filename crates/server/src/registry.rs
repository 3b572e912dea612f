//! The local models a server may serve. Each configured model is on disk, loading or loaded;
//! a request for one that is on disk loads it, and requests that arrive while it loads wait
//! for it (for a bounded time, in a bounded number). Before a load, the least recently used
//! models are unloaded until the count (`--max-loaded-models`) and the memory budget
//! (`--memory-budget`: weights plus KV cache) leave room for it.
//!
//! An unloaded model's requests in flight keep their handle and finish; its memory is freed
//! when the last one ends, and a load that needed that memory waits for it.
//! Loads run one at a time, on their own task: a client that goes away does not cancel one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ferry_engine::{LocalModel, ModelInfo, SchedulerConfig};
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::error::ApiError;

/// A configured model: what a load needs.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The name clients use.
    pub name: String,
    /// Where the weights come from: a path, or a hub reference (`hf:OWNER/REPO/FILE.gguf`).
    pub source: String,
    /// The local file, when `source` is one (for the size estimate before a first load).
    pub path: Option<std::path::PathBuf>,
    pub scheduler: SchedulerConfig,
    pub defaults: ferry_engine::ModelDefaults,
    /// How `/v1/embeddings` pools the model's hidden states.
    pub pooling: ferry_engine::Pooling,
    /// Loaded at start rather than on the first request.
    pub preload: bool,
}

/// Turns a spec into a running model (resolving, downloading and loading the file).
pub type Loader = Arc<dyn Fn(ModelSpec) -> BoxFuture<'static, Result<LocalModel, String>> + Send + Sync>;

/// Limits on what is loaded at once.
#[derive(Debug, Clone)]
pub struct RegistryLimits {
    /// Most models loaded at once.
    pub max_loaded: Option<usize>,
    /// Most bytes of weights and KV caches loaded at once.
    pub memory_budget: Option<u64>,
    /// How long a request waits for its model to load (or for memory to be freed).
    pub load_timeout: Duration,
    /// Most requests waiting for one model to load.
    pub max_waiting: usize,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        RegistryLimits {
            max_loaded: None,
            memory_budget: None,
            load_timeout: Duration::from_secs(300),
            max_waiting: 256,
        }
    }
}

/// Where a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    OnDisk,
    Loading,
    Loaded,
}

/// A load's outcome, shared with every request waiting for it.
type LoadResult = Option<Result<Arc<LocalModel>, String>>;

enum Slot {
    OnDisk,
    Loading(watch::Receiver<LoadResult>),
    Loaded(Arc<LocalModel>),
}

struct Entry {
    spec: ModelSpec,
    slot: Slot,
    /// Tick of the last request (a logical clock: higher is more recent).
    last_used: u64,
    /// What the last load learned, kept while the model is on disk.
    info: Option<ModelInfo>,
    memory: Option<u64>,
    last_error: Option<String>,
    /// Requests waiting for the load in progress.
    waiting: usize,
}

impl Entry {
    fn state(&self) -> ModelState {
        match self.slot {
            Slot::OnDisk => ModelState::OnDisk,
            Slot::Loading(_) => ModelState::Loading,
            Slot::Loaded(_) => ModelState::Loaded,
        }
    }
}

/// A model as `GET /v1/models` shows it.
pub struct ModelStatus {
    pub spec: ModelSpec,
    pub state: ModelState,
    /// The running model, when loaded.
    pub model: Option<Arc<LocalModel>>,
    /// From the last load, if any.
    pub info: Option<ModelInfo>,
    /// Bytes of weights and KV cache (measured at the last load, or the file size before one).
    pub memory: Option<u64>,
    pub last_error: Option<String>,
}

pub struct Registry {
    entries: Mutex<Vec<Entry>>,
    loader: Loader,
    limits: RegistryLimits,
    clock: AtomicU64,
    /// One load at a time: room is made, then the file loaded, before the next starts.
    loading: tokio::sync::Mutex<()>,
    /// Models unloaded while requests still held them, with their memory, until those end.
    releasing: Mutex<Vec<(Weak<LocalModel>, u64)>>,
}

impl Registry {
    pub fn new(specs: Vec<ModelSpec>, loader: Loader, limits: RegistryLimits) -> Result<Self, String> {
        let mut names = std::collections::HashSet::new();
        for spec in &specs {
            if !names.insert(spec.name.clone()) {
                return Err(format!("two models are named '{}'", spec.name));
            }
        }
        let entries = specs
            .into_iter()
            .map(|spec| Entry {
                memory: spec.path.as_ref().and_then(|p| std::fs::metadata(p).ok()).map(|m| m.len()),
                spec,
                slot: Slot::OnDisk,
                last_used: 0,
                info: None,
                last_error: None,
                waiting: 0,
            })
            .collect();
        Ok(Registry {
            entries: Mutex::new(entries),
            loader,
            limits,
            clock: AtomicU64::new(1),
            loading: tokio::sync::Mutex::new(()),
            releasing: Mutex::new(Vec::new()),
        })
    }

    /// Models already running, served as they are (embedders and tests); none loads again.
    pub fn preloaded(models: Vec<Arc<LocalModel>>) -> Result<Self, String> {
        let specs = models.iter().map(|m| spec_of(m)).collect();
        let loader: Loader = Arc::new(|spec: ModelSpec| {
            Box::pin(async move {
                Err(format!("the model '{}' cannot be loaded again by this server", spec.name))
            })
        });
        let registry = Registry::new(specs, loader, RegistryLimits::default())?;
        for (entry, model) in registry.lock().iter_mut().zip(models) {
            entry.info = Some(model.info().clone());
            entry.memory = Some(model.memory_bytes());
            entry.slot = Slot::Loaded(model);
        }
        Ok(registry)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `name` is configured here (loaded or not).
    pub fn contains(&self, name: &str) -> bool {
        self.lock().iter().any(|e| e.spec.name == name)
    }

    /// The model `name`, loading it first if it is on disk.
    pub async fn get(self: &Arc<Self>, name: &str) -> Result<Arc<LocalModel>, ApiError> {
        let mut receiver = {
            let mut entries = self.lock();
            let tick = self.tick();
            let entry = entries
                .iter_mut()
                .find(|e| e.spec.name == name)
                .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
            entry.last_used = tick;
            match &entry.slot {
                Slot::Loaded(model) => return Ok(model.clone()),
                Slot::Loading(receiver) => {
                    if entry.waiting >= self.limits.max_waiting {
                        return Err(ApiError::QueueFull { retry_after: 5 });
                    }
                    receiver.clone()
                }
                Slot::OnDisk => self.start_load(entry),
            }
        };
        self.add_waiting(name, 1);
        let outcome =
            tokio::time::timeout(self.limits.load_timeout, receiver.wait_for(|r| r.is_some())).await;
        self.add_waiting(name, -1);
        match outcome {
            Ok(Ok(result)) => match result.as_ref() {
                Some(Ok(model)) => Ok(model.clone()),
                Some(Err(e)) => {
                    Err(ApiError::ModelUnavailable(format!("Loading the model '{name}' failed: {e}")))
                }
                None => Err(ApiError::ModelUnavailable(format!("The model '{name}' is not loaded"))),
            },
            Ok(Err(_)) => {
                Err(ApiError::ModelUnavailable(format!("Loading the model '{name}' was abandoned")))
            }
            Err(_) => Err(ApiError::ModelUnavailable(format!(
                "The model '{name}' is still loading after {} s; try again shortly",
                self.limits.load_timeout.as_secs()
            ))),
        }
    }

    fn add_waiting(&self, name: &str, delta: isize) {
        if let Some(entry) = self.lock().iter_mut().find(|e| e.spec.name == name) {
            entry.waiting = entry.waiting.saturating_add_signed(delta);
        }
    }

    /// Marks `entry` loading and starts the load on its own task.
    fn start_load(self: &Arc<Self>, entry: &mut Entry) -> watch::Receiver<LoadResult> {
        let (done, receiver) = watch::channel(None);
        entry.slot = Slot::Loading(receiver.clone());
        entry.last_error = None;
        let registry = self.clone();
        let spec = entry.spec.clone();
        tokio::spawn(async move {
            let result = registry.load_now(spec).await;
            let _ = done.send(Some(result));
        });
        receiver
    }

    /// Makes room, loads, and records the outcome in the entry.
    async fn load_now(self: &Arc<Self>, spec: ModelSpec) -> Result<Arc<LocalModel>, String> {
        let _one_at_a_time = self.loading.lock().await;
        let name = spec.name.clone();
        let estimate = self.lock().iter().find(|e| e.spec.name == name).and_then(|e| e.memory).unwrap_or(0);
        let result = match self.make_room(&name, estimate).await {
            Ok(()) => {
                let started = Instant::now();
                tracing::info!(model = %name, source = %spec.source, "loading");
                let loaded = (self.loader)(spec).await;
                metrics::histogram!("ferry_model_load_seconds", "model" => name.clone())
                    .record(started.elapsed().as_secs_f64());
                loaded.map(Arc::new)
            }
            Err(e) => Err(e),
        };
        let mut entries = self.lock();
        let Some(entry) = entries.iter_mut().find(|e| e.spec.name == name) else {
            return Err(format!("the model '{name}' is no longer configured"));
        };
        match &result {
            Ok(model) => {
                let info = model.info();
                tracing::info!(
                    model = %name, architecture = %info.architecture, parameters = info.n_params,
                    quantization = %info.quantization, memory_mib = model.memory_bytes() >> 20, "loaded"
                );
                metrics::counter!("ferry_model_loads_total", "model" => name.clone()).increment(1);
                entry.info = Some(info.clone());
                entry.memory = Some(model.memory_bytes());
                entry.slot = Slot::Loaded(model.clone());
                // The estimate was the file alone before a first load: now the KV cache counts too.
                self.evict_until_fits(&mut entries, &name, model.memory_bytes());
            }
            Err(e) => {
                tracing::error!(model = %name, error = %e, "loading failed");
                entry.last_error = Some(e.clone());
                entry.slot = Slot::OnDisk;
            }
        }
        result
    }

    /// Unloads least-recently-used models until `name` (needing `estimate` bytes) fits, then
    /// waits until the memory of those still finishing requests is free.
    async fn make_room(&self, name: &str, estimate: u64) -> Result<(), String> {
        let limits = &self.limits;
        if let Some(budget) = limits.memory_budget
            && estimate > budget
        {
            return Err(format!(
                "it needs about {} MiB, more than the memory budget of {} MiB",
                estimate >> 20,
                budget >> 20
            ));
        }
        self.evict_until_fits(&mut self.lock(), name, estimate);
        // In-flight requests of unloaded models still hold their memory: wait for them to end.
        let deadline = Instant::now() + limits.load_timeout;
        loop {
            let (loaded, used) = self
                .lock()
                .iter()
                .filter(|e| matches!(e.slot, Slot::Loaded(_)) && e.spec.name != name)
                .fold((0, 0), |(n, bytes), e| (n + 1, bytes + e.memory.unwrap_or(0)));
            let (releasing, releasing_bytes) = self.releasing();
            let count_ok = limits.max_loaded.is_none_or(|max| loaded + releasing < max);
            let memory_ok = limits.memory_budget.is_none_or(|b| used + releasing_bytes + estimate <= b);
            if (count_ok && memory_ok) || releasing == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err("models unloaded to make room are still serving requests".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Unloads the least recently used models other than `name` (idle ones first) until it,
    /// at `estimate` bytes, fits the count and the memory budget.
    fn evict_until_fits(&self, entries: &mut [Entry], name: &str, estimate: u64) {
        let limits = &self.limits;
        loop {
            let loaded: Vec<usize> = (0..entries.len())
                .filter(|&i| matches!(entries[i].slot, Slot::Loaded(_)) && entries[i].spec.name != name)
                .collect();
            let used: u64 =
                loaded.iter().map(|&i| entries[i].memory.unwrap_or(0)).sum::<u64>() + self.releasing().1;
            let over_count = limits.max_loaded.is_some_and(|max| loaded.len() + 1 > max);
            let over_memory = limits.memory_budget.is_some_and(|budget| used + estimate > budget);
            if !over_count && !over_memory {
                return;
            }
            let Some(&victim) = loaded.iter().min_by_key(|&&i| (is_busy(&entries[i]), entries[i].last_used))
            else {
                return;
            };
            let reason = if over_count { "max loaded models" } else { "memory budget" };
            self.evict(&mut entries[victim], reason);
        }
    }

    /// Moves a loaded model to disk; requests holding it finish first.
    fn evict(&self, entry: &mut Entry, reason: &str) {
        let Slot::Loaded(model) = std::mem::replace(&mut entry.slot, Slot::OnDisk) else {
            return;
        };
        let name = entry.spec.name.clone();
        tracing::info!(model = %name, reason, "unloading");
        metrics::counter!("ferry_model_unloads_total", "model" => name.clone()).increment(1);
        let memory = entry.memory.unwrap_or(0);
        let weak = Arc::downgrade(&model);
        drop(model);
        let mut releasing = self.releasing.lock().unwrap_or_else(|p| p.into_inner());
        releasing.retain(|(w, _)| w.strong_count() > 0);
        if weak.strong_count() > 0 {
            releasing.push((weak, memory));
        }
    }

    /// How many unloaded models still have requests running, and their memory.
    fn releasing(&self) -> (usize, u64) {
        let mut releasing = self.releasing.lock().unwrap_or_else(|p| p.into_inner());
        releasing.retain(|(w, _)| w.strong_count() > 0);
        (releasing.len(), releasing.iter().map(|(_, bytes)| bytes).sum())
    }

    /// Unloads `name`; false if it was not loaded. A model still loading cannot be unloaded.
    pub fn unload(&self, name: &str) -> Result<bool, ApiError> {
        let mut entries = self.lock();
        let entry = entries
            .iter_mut()
            .find(|e| e.spec.name == name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
        match entry.slot {
            Slot::OnDisk => Ok(false),
            Slot::Loading(_) => Err(ApiError::Conflict(format!(
                "The model '{name}' is loading; unload it once it has loaded"
            ))),
            Slot::Loaded(_) => {
                self.evict(entry, "asked to");
                Ok(true)
            }
        }
    }

    /// Loads the models marked `preload`, in order, as far as the limits allow.
    pub async fn preload(self: &Arc<Self>) -> Result<(), String> {
        let names: Vec<String> =
            self.lock().iter().filter(|e| e.spec.preload).map(|e| e.spec.name.clone()).collect();
        let room = self.limits.max_loaded.unwrap_or(usize::MAX);
        for (i, name) in names.iter().enumerate() {
            if i >= room {
                tracing::info!(model = %name, "not preloaded: --max-loaded-models is reached; it loads on first use");
                continue;
            }
            self.get(name).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Where the model `name` is, if it is configured.
    pub fn state(&self, name: &str) -> Option<ModelState> {
        self.lock().iter().find(|e| e.spec.name == name).map(|e| e.state())
    }

    /// Every configured model, in configuration order.
    pub fn list(&self) -> Vec<ModelStatus> {
        self.lock()
            .iter()
            .map(|e| ModelStatus {
                spec: e.spec.clone(),
                state: e.state(),
                model: match &e.slot {
                    Slot::Loaded(model) => Some(model.clone()),
                    _ => None,
                },
                info: e.info.clone(),
                memory: e.memory,
                last_error: e.last_error.clone(),
            })
            .collect()
    }

    /// The models loaded now.
    pub fn loaded(&self) -> Vec<Arc<LocalModel>> {
        self.lock()
            .iter()
            .filter_map(|e| match &e.slot {
                Slot::Loaded(model) => Some(model.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Whether requests are running or waiting on the model.
fn is_busy(entry: &Entry) -> bool {
    let Slot::Loaded(model) = &entry.slot else { return false };
    let stats = model.scheduler.stats();
    stats.running.load(Ordering::Relaxed) > 0 || stats.waiting.load(Ordering::Relaxed) > 0
}

fn spec_of(model: &LocalModel) -> ModelSpec {
    let info = model.info();
    ModelSpec {
        name: info.id.clone(),
        source: info.path.display().to_string(),
        path: Some(info.path.clone()),
        scheduler: model.scheduler.config().clone(),
        defaults: model.defaults.clone(),
        pooling: model.pooling,
        preload: true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use ferry_engine::SessionConfig;

    use super::*;

    /// The real test model, under `name`.
    fn spec(name: &str) -> ModelSpec {
        let dir = std::env::var_os("FERRY_MODELS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
        let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(path.is_file(), "{} is missing: run scripts/fetch-models.py", path.display());
        ModelSpec {
            name: name.into(),
            source: path.display().to_string(),
            path: Some(path),
            scheduler: SchedulerConfig {
                session: SessionConfig {
                    n_sequences: 1,
                    ctx_per_sequence: 256,
                    batch_tokens: 256,
                    threads: 2,
                    kv_budget: None,
                    gpu_layers: None,
                    flash_attention: Default::default(),
                },
                prefill_chunk: 256,
                max_waiting: 8,
                prefix_cache: false,
                request_timeout: None,
            },
            defaults: Default::default(),
            pooling: Default::default(),
            preload: false,
        }
    }

    /// A registry of `names` whose loader counts its loads.
    fn registry(names: &[&str], limits: RegistryLimits) -> (Arc<Registry>, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        let loader: Loader = Arc::new(move |spec: ModelSpec| {
            counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    let path = spec.path.clone().unwrap_or_default();
                    LocalModel::load(&spec.name, &path, spec.scheduler, |_| {}).map_err(|e| e.to_string())
                })
                .await
                .map_err(|e| e.to_string())?
            })
        });
        let specs = names.iter().map(|n| spec(n)).collect();
        (Arc::new(Registry::new(specs, loader, limits).unwrap()), count)
    }

    fn state(registry: &Registry, name: &str) -> ModelState {
        registry.state(name).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_least_recently_used_model_makes_room() {
        let limits = RegistryLimits { max_loaded: Some(2), ..Default::default() };
        let (registry, loads) = registry(&["a", "b", "c"], limits);
        assert_eq!(state(&registry, "a"), ModelState::OnDisk);
        drop(registry.get("a").await.unwrap());
        drop(registry.get("b").await.unwrap());
        drop(registry.get("a").await.unwrap()); // b is now the least recently used
        drop(registry.get("c").await.unwrap());
        assert_eq!(state(&registry, "a"), ModelState::Loaded);
        assert_eq!(state(&registry, "b"), ModelState::OnDisk);
        assert_eq!(state(&registry, "c"), ModelState::Loaded);
        assert_eq!(loads.load(Ordering::SeqCst), 3);
        assert!(matches!(registry.get("nope").await, Err(ApiError::ModelNotFound(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_during_a_load_share_it() {
        let (registry, loads) = registry(&["a"], RegistryLimits::default());
        let waiting: Vec<_> = (0..4)
            .map(|_| {
                let registry = registry.clone();
                tokio::spawn(async move { registry.get("a").await.map(|m| Arc::as_ptr(&m) as usize) })
            })
            .collect();
        let mut models = Vec::new();
        for task in waiting {
            models.push(task.await.unwrap().unwrap());
        }
        models.dedup();
        assert_eq!(models.len(), 1, "every request got the one loaded model");
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_waits_until_an_unloaded_models_requests_end() {
        let limits = RegistryLimits { max_loaded: Some(1), ..Default::default() };
        let (registry, _) = registry(&["a", "b"], limits);
        let in_flight = registry.get("a").await.unwrap();
        // `b` unloads `a` at once, but cannot load while a request still holds `a`.
        let pending = tokio::time::timeout(Duration::from_millis(300), registry.get("b")).await;
        assert!(pending.is_err(), "b loaded while a's request was still running");
        assert_eq!(state(&registry, "a"), ModelState::OnDisk);
        assert_eq!(state(&registry, "b"), ModelState::Loading);
        assert!(matches!(registry.unload("b"), Err(ApiError::Conflict(_))));
        drop(in_flight);
        registry.get("b").await.unwrap();
        assert_eq!(state(&registry, "b"), ModelState::Loaded);
        assert!(registry.unload("b").unwrap());
        assert!(!registry.unload("b").unwrap());
        assert_eq!(state(&registry, "b"), ModelState::OnDisk);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_larger_than_the_budget_is_refused_with_its_reason() {
        let limits = RegistryLimits { memory_budget: Some(1 << 20), ..Default::default() };
        let (registry, loads) = registry(&["a"], limits);
        let err = registry.get("a").await.err().unwrap();
        assert!(matches!(&err, ApiError::ModelUnavailable(m) if m.contains("memory budget")), "{err}");
        assert_eq!(loads.load(Ordering::SeqCst), 0);
        assert_eq!(state(&registry, "a"), ModelState::OnDisk);
        assert!(registry.list()[0].last_error.as_deref().is_some_and(|e| e.contains("memory budget")));
    }
}
