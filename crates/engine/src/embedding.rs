//! Embeddings from a generative model (llama.cpp's pooled hidden states): a thread of the
//! model's own holds an embedding session and runs the sequences of every request waiting
//! in shared passes, as many as fit one pass's tokens and sequences.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use tokio::sync::oneshot;

use crate::backend::{Backend, EmbeddingConfig, EmbeddingSession};
use crate::{EngineError, TokenId};

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>;

struct Job {
    sequences: Vec<Vec<TokenId>>,
    reply: Reply,
}

/// A cheap handle to a model's embedding thread; the thread ends with the last handle.
#[derive(Clone)]
pub struct LmEmbedder {
    jobs: SyncSender<Job>,
    config: EmbeddingConfig,
}

impl LmEmbedder {
    /// Starts the thread and its session (a llama.cpp context of `config.max_tokens` cells).
    pub fn start(
        backend: Arc<dyn Backend>,
        config: EmbeddingConfig,
        queue: usize,
    ) -> Result<Self, EngineError> {
        let (jobs, inbox) = mpsc::sync_channel(queue.max(1));
        let (ready, started) = mpsc::channel();
        let session_config = config.clone();
        std::thread::Builder::new()
            .name("ferry-embed-lm".into())
            .spawn(move || match backend.new_embedding_session(&session_config) {
                Ok(session) => {
                    let _ = ready.send(Ok(()));
                    run(session, &session_config, &inbox);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            })
            .map_err(|e| EngineError::Load(format!("cannot start the embedding thread: {e}")))?;
        started.recv().map_err(|_| EngineError::Stopped)??;
        Ok(LmEmbedder { jobs, config })
    }

    /// The longest input, in tokens.
    pub fn max_tokens(&self) -> usize {
        self.config.max_tokens
    }

    /// Each sequence's L2-normalised embedding, in order. Every sequence holds 1 to
    /// [`Self::max_tokens`] tokens (else `InvalidRequest`).
    pub async fn embed(&self, sequences: Vec<Vec<TokenId>>) -> Result<Vec<Vec<f32>>, EngineError> {
        if let Some((i, s)) =
            sequences.iter().enumerate().find(|(_, s)| s.is_empty() || s.len() > self.max_tokens())
        {
            return Err(EngineError::InvalidRequest(format!(
                "input {i} has {} tokens; this model embeds 1 to {} tokens",
                s.len(),
                self.max_tokens()
            )));
        }
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.jobs.try_send(Job { sequences, reply }).map_err(|e| match e {
            TrySendError::Full(_) => EngineError::QueueFull,
            TrySendError::Disconnected(_) => EngineError::Stopped,
        })?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }
}

/// Takes the first job waiting, then every other one already queued, and runs all their
/// sequences in passes filled in order; each job is answered once its last sequence ran.
fn run(mut session: Box<dyn EmbeddingSession + '_>, config: &EmbeddingConfig, inbox: &Receiver<Job>) {
    while let Ok(first) = inbox.recv() {
        let mut jobs = vec![first];
        jobs.extend(inbox.try_iter());
        let mut results: Vec<Result<Vec<Vec<f32>>, EngineError>> =
            jobs.iter().map(|j| Ok(Vec::with_capacity(j.sequences.len()))).collect();
        let all: Vec<(usize, &[TokenId])> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| job.sequences.iter().map(move |s| (j, s.as_slice())))
            .collect();
        let mut next = 0;
        while next < all.len() {
            let mut end = next;
            let mut tokens = 0;
            while end < all.len()
                && end - next < config.max_sequences
                && (end == next || tokens + all[end].1.len() <= config.max_tokens)
            {
                tokens += all[end].1.len();
                end += 1;
            }
            let pass: Vec<&[TokenId]> = all[next..end].iter().map(|(_, s)| *s).collect();
            match session.embed(&pass) {
                Ok(vectors) => {
                    for ((j, _), vector) in all[next..end].iter().zip(vectors) {
                        if let Ok(done) = &mut results[*j] {
                            done.push(vector);
                        }
                    }
                }
                Err(e) => {
                    for (j, _) in &all[next..end] {
                        results[*j] = Err(EngineError::Decode(e.to_string()));
                    }
                }
            }
            next = end;
        }
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}
