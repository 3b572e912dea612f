//! The batching service: one thread runs the model; requests that arrive while it is busy are
//! embedded together in the next forward passes.
//!
//! A request is checked and tokenised on tokio's blocking pool, in the caller's task, so a bad
//! input is answered without reaching the model thread. The model thread takes the first
//! queued request, then every request already waiting (up to `max_batch_tokens` tokens in
//! all), runs their sequences through [`Embedder::run_batches`] and answers each on its own
//! oneshot channel. A request whose caller has gone (the future was dropped) is skipped.
//!
//! The forward passes run on a rayon pool of the service's own, `threads` wide (`ferry serve
//! --threads`), not on rayon's global pool, which is as wide as the machine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::model::DEFAULT_MAX_BATCH_TOKENS;
use crate::{EmbedError, EmbedInput, Embedder, Embedding, Result};

/// How the service batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedServiceConfig {
    /// The most tokens of one forward pass (packed, no padding); also the most tokens of the
    /// requests gathered for one round (a larger request runs in a round of its own).
    pub max_batch_tokens: usize,
    /// Requests waiting for the model thread beyond this make callers wait to enqueue.
    pub queue_capacity: usize,
    /// Threads of the forward passes (0: rayon's default, `RAYON_NUM_THREADS` or one per CPU).
    pub threads: usize,
}

impl Default for EmbedServiceConfig {
    fn default() -> Self {
        EmbedServiceConfig { max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS, queue_capacity: 256, threads: 0 }
    }
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedOutput {
    /// One per input, in order.
    pub embeddings: Vec<Embedding>,
    /// Tokens of all inputs, special tokens included: `usage.prompt_tokens` and `total_tokens`.
    pub n_tokens: usize,
}

/// A cheap, cloneable handle to the model thread. The thread ends when the last handle is
/// dropped and its queue is empty.
#[derive(Debug, Clone)]
pub struct EmbedService {
    embedder: Arc<Embedder>,
    sender: mpsc::Sender<Job>,
    batches_run: Arc<AtomicU64>,
}

struct Job {
    sequences: Vec<Vec<u32>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("n_sequences", &self.sequences.len()).finish_non_exhaustive()
    }
}

impl EmbedService {
    /// Starts the model thread. `max_batch_tokens` is raised to the model's `max_tokens` if
    /// below it, so that any valid input fits a pass.
    pub fn start(embedder: Arc<Embedder>, config: EmbedServiceConfig) -> Result<Self> {
        let max_batch_tokens = config.max_batch_tokens.max(embedder.max_tokens());
        let (sender, receiver) = mpsc::channel(config.queue_capacity.max(1));
        let batches_run = Arc::new(AtomicU64::new(0));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("ferry-embed-{i}"))
            .build()
            .map_err(|e| EmbedError::ServiceStopped(format!("cannot start the embedding threads: {e}")))?;
        let worker = Worker {
            embedder: embedder.clone(),
            receiver,
            max_batch_tokens,
            batches_run: batches_run.clone(),
            pool,
        };
        std::thread::Builder::new()
            .name("ferry-embed".to_owned())
            .spawn(move || worker.run())
            .map_err(|e| EmbedError::ServiceStopped(format!("cannot start the model thread: {e}")))?;
        Ok(EmbedService { embedder, sender, batches_run })
    }

    /// The model: its name, dims, max tokens.
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// Embeds the inputs, batched with whatever other requests are waiting. Input errors are
    /// the same as [`Embedder::embed`]'s.
    pub async fn embed(&self, inputs: Vec<EmbedInput>) -> Result<EmbedOutput> {
        let embedder = self.embedder.clone();
        let sequences = tokio::task::spawn_blocking(move || embedder.tokenize(&inputs))
            .await
            .map_err(|e| EmbedError::Tokenizer(format!("the tokenizer task failed: {e}")))??;
        let n_tokens_each: Vec<usize> = sequences.iter().map(Vec::len).collect();
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Job { sequences, reply })
            .await
            .map_err(|_| EmbedError::ServiceStopped("the model thread has ended".to_owned()))?;
        let vectors = answer
            .await
            .map_err(|_| EmbedError::ServiceStopped("the model thread dropped the request".to_owned()))??;
        let embeddings: Vec<Embedding> = vectors
            .into_iter()
            .zip(n_tokens_each)
            .map(|(vector, n_tokens)| Embedding { vector, n_tokens })
            .collect();
        let n_tokens = embeddings.iter().map(|e| e.n_tokens).sum();
        Ok(EmbedOutput { embeddings, n_tokens })
    }

    /// Forward passes run so far (for tests and metrics).
    pub fn batches_run(&self) -> u64 {
        self.batches_run.load(Ordering::Relaxed)
    }
}

struct Worker {
    embedder: Arc<Embedder>,
    receiver: mpsc::Receiver<Job>,
    max_batch_tokens: usize,
    batches_run: Arc<AtomicU64>,
    pool: rayon::ThreadPool,
}

impl Worker {
    fn run(mut self) {
        // A request that did not fit the last round opens the next.
        let mut carried: Option<Job> = None;
        loop {
            let Some(first) = carried.take().or_else(|| self.receiver.blocking_recv()) else {
                return;
            };
            let mut n_tokens = job_tokens(&first);
            let mut jobs = vec![first];
            while n_tokens < self.max_batch_tokens {
                let Ok(job) = self.receiver.try_recv() else { break };
                if n_tokens + job_tokens(&job) > self.max_batch_tokens {
                    carried = Some(job);
                    break;
                }
                n_tokens += job_tokens(&job);
                jobs.push(job);
            }
            jobs.retain(|job| !job.reply.is_closed());
            if !jobs.is_empty() {
                self.run_round(jobs);
            }
        }
    }

    fn run_round(&self, jobs: Vec<Job>) {
        let sequences: Vec<&[u32]> =
            jobs.iter().flat_map(|job| job.sequences.iter().map(Vec::as_slice)).collect();
        let result = self.pool.install(|| {
            self.embedder.run_batches(&sequences, self.max_batch_tokens, || {
                self.batches_run.fetch_add(1, Ordering::Relaxed);
            })
        });
        match result {
            Ok(vectors) => {
                let mut vectors = vectors.into_iter();
                for job in jobs {
                    let mine = vectors.by_ref().take(job.sequences.len()).collect();
                    // A caller that has gone no longer needs its answer.
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(error) => {
                tracing::error!(%error, "embedding forward pass failed");
                for job in jobs {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
    }
}

fn job_tokens(job: &Job) -> usize {
    job.sequences.iter().map(Vec::len).sum()
}
