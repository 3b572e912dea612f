//! `ferry chat`: an interactive, streaming chat in the terminal, with a model loaded in
//! this process or with a running Ferry (or any OpenAI-compatible server).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use ferry_engine::{
    ChatMessage, Event, GenerateRequest, LocalModel, SamplingParams, SchedulerConfig, SessionConfig,
};
use futures::StreamExt;

use crate::config::DEFAULT_MODEL_FILE;
use crate::hub;

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A running server's base URL (e.g. http://127.0.0.1:8080); without it a model is loaded here
    #[arg(long, env = "FERRY_URL")]
    url: Option<String>,
    /// Model file (local mode) or model id (server mode)
    #[arg(long, short = 'm')]
    model: Option<String>,
    #[arg(long, env = "FERRY_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
    /// System prompt
    #[arg(long)]
    system: Option<String>,
    /// Sampling temperature [default: 0.7 for a model loaded here; a server's own default,
    /// or a preset's, otherwise]
    #[arg(long)]
    temperature: Option<f32>,
    /// Most tokens per answer [default: 512 for a model loaded here; the server's, or a
    /// preset's, otherwise]
    #[arg(long)]
    max_tokens: Option<usize>,
    /// API key for a server that needs one
    #[arg(long, env = "FERRY_API_KEY")]
    api_key: Option<String>,
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let mut backend = match &args.url {
        Some(url) => {
            Backend::Remote { client: reqwest::Client::new(), url: url.trim_end_matches('/').to_string() }
        }
        None => {
            let spec = args
                .model
                .clone()
                .unwrap_or_else(|| args.models_dir.join(DEFAULT_MODEL_FILE).display().to_string());
            let path = hub::resolve(&spec, &args.models_dir).await?;
            let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let config = SchedulerConfig {
                session: SessionConfig {
                    n_sequences: 1,
                    ctx_per_sequence: 4096,
                    batch_tokens: 512,
                    threads,
                    kv_budget: None,
                    gpu_layers: None,
                    flash_attention: Default::default(),
                },
                prefill_chunk: 512,
                max_waiting: 1,
                prefix_cache: true,
                request_timeout: None,
            };
            let model =
                tokio::task::spawn_blocking(move || LocalModel::load(&id, &path, config, |_| {})).await??;
            Backend::Local(Arc::new(model))
        }
    };
    let model_id = match (&backend, &args.model) {
        (Backend::Local(m), _) => m.info().id.clone(),
        (Backend::Remote { .. }, Some(m)) => m.clone(),
        (Backend::Remote { client, url }, None) => {
            first_remote_model(client, url, args.api_key.as_deref()).await?
        }
    };
    eprintln!("Chatting with {model_id}. Type /reset to start over, /exit or Ctrl-D to leave.");
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &args.system {
        history.push(ChatMessage::new("system", system.clone()));
    }
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line.to_string()));
        let answer = backend.answer(&model_id, &history, &args).await?;
        println!();
        history.push(ChatMessage::new("assistant", answer));
    }
    Ok(())
}

enum Backend {
    Local(Arc<LocalModel>),
    Remote { client: reqwest::Client, url: String },
}

impl Backend {
    /// Streams one answer to stdout and returns it.
    async fn answer(
        &mut self,
        model_id: &str,
        history: &[ChatMessage],
        args: &ChatArgs,
    ) -> anyhow::Result<String> {
        let mut answer = String::new();
        let mut out = std::io::stdout();
        match self {
            Backend::Local(model) => {
                let prompt = model.chat_prompt(history)?;
                let ctx = model.scheduler.config().session.ctx_per_sequence;
                if prompt.len() >= ctx {
                    bail!("the conversation is longer than the context ({ctx} tokens); /reset to start over");
                }
                let request = GenerateRequest {
                    max_tokens: args.max_tokens.unwrap_or(512).min(ctx - prompt.len()),
                    prompt,
                    n: 1,
                    sampling: SamplingParams {
                        temperature: args.temperature.unwrap_or(0.7),
                        ..SamplingParams::default()
                    },
                    stop: Vec::new(),
                    free_text: None,
                    logprobs: None,
                    prompt_logprobs: false,
                    ignore_eos: false,
                    constraint: None,
                    sampled: None,
                    cache_scope: 0,
                };
                let mut events = model.scheduler.submit(request)?;
                while let Some(event) = events.recv().await {
                    match event {
                        Event::Delta { text, .. } => {
                            print!("{text}");
                            out.flush()?;
                            answer.push_str(&text);
                        }
                        Event::Finished { .. } => break,
                        Event::Error(e) => bail!(e),
                        Event::DeadlineExceeded { .. } => bail!("the answer passed its deadline"),
                        Event::PromptLogprobs { .. } => {}
                    }
                }
            }
            Backend::Remote { client, url } => {
                let messages: Vec<serde_json::Value> = history
                    .iter()
                    .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
                    .collect();
                // Only what the user set: the rest is the server's (or a preset's, which
                // may lock it) to choose.
                let mut body = serde_json::json!({"model": model_id, "messages": messages, "stream": true});
                if let Some(t) = args.temperature {
                    body["temperature"] = t.into();
                }
                if let Some(n) = args.max_tokens {
                    body["max_tokens"] = n.into();
                }
                let mut request = client.post(format!("{url}/v1/chat/completions")).json(&body);
                if let Some(key) = &args.api_key {
                    request = request.bearer_auth(key);
                }
                let response = request.send().await.with_context(|| format!("connecting to {url}"))?;
                if !response.status().is_success() {
                    let status = response.status();
                    bail!("{status}: {}", response.text().await.unwrap_or_default());
                }
                let mut buffer = Vec::new();
                let mut body = response.bytes_stream();
                while let Some(chunk) = body.next().await {
                    buffer.extend_from_slice(&chunk?);
                    while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        let line = String::from_utf8_lossy(&line);
                        let Some(data) = line.trim().strip_prefix("data:") else {
                            continue;
                        };
                        let data = data.trim();
                        if data == "[DONE]" {
                            return Ok(answer);
                        }
                        let chunk: serde_json::Value = serde_json::from_str(data)?;
                        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
                            print!("{text}");
                            out.flush()?;
                            answer.push_str(text);
                        }
                    }
                }
            }
        }
        Ok(answer)
    }
}

async fn first_remote_model(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
) -> anyhow::Result<String> {
    let mut request = client.get(format!("{url}/v1/models"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let list: serde_json::Value = request.send().await?.error_for_status()?.json().await?;
    list["data"][0]["id"].as_str().map(str::to_string).context("the server lists no models")
}
