//! `ferry bench`: the engine's own speed on one sequence, measured as llama-bench measures
//! llama.cpp (a prompt of N random tokens processed at once, then M tokens decoded one by
//! one), so bench/ can put the two side by side on the same file and threads.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use ferry_engine::{Event, GenerateRequest, LocalModel, SamplingParams, SchedulerConfig, SessionConfig};
use rand::{Rng, SeedableRng};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(long, short = 'm')]
    model: PathBuf,
    #[arg(long, short = 't', default_value_t = 1)]
    threads: usize,
    /// Prompt tokens (llama-bench's -p)
    #[arg(long, short = 'p', default_value_t = 512)]
    prompt: usize,
    /// Generated tokens (llama-bench's -n)
    #[arg(long, short = 'n', default_value_t = 128)]
    gen_tokens: usize,
    /// Layers offloaded to the GPU in a GPU build (llama-bench's -ngl); all by default
    #[arg(long)]
    gpu_layers: Option<u32>,
    /// llama.cpp's flash attention: auto, on or off (llama-bench's -fa)
    #[arg(long, default_value = "auto")]
    flash_attention: ferry_engine::FlashAttention,
    /// Repetitions (llama-bench's -r)
    #[arg(long, short = 'r', default_value_t = 3)]
    reps: usize,
    /// Also measure aggregate decode with this many sequences at once (comma-separated)
    #[arg(long, value_delimiter = ',')]
    concurrent: Vec<usize>,
}

pub fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    let batch = args.prompt.max(1);
    args.gen_tokens = args.gen_tokens.max(1);
    let config = SchedulerConfig {
        session: SessionConfig {
            n_sequences: args.concurrent.iter().copied().max().unwrap_or(1).max(1),
            ctx_per_sequence: args.prompt.max(args.gen_tokens) + 8,
            batch_tokens: batch,
            threads: args.threads,
            kv_budget: None,
            gpu_layers: args.gpu_layers,
            flash_attention: args.flash_attention,
        },
        prefill_chunk: batch,
        max_waiting: args.concurrent.iter().copied().max().unwrap_or(1).max(1),
        prefix_cache: false,
        request_timeout: None,
    };
    let model = LocalModel::load("bench", &args.model, config, |_| {})?;
    let n_vocab = model.info().n_vocab as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut run =
        |prompt_len: usize, gen_tokens: usize| -> anyhow::Result<(usize, ferry_engine::Timings, Instant)> {
            let prompt: Vec<u32> = (0..prompt_len).map(|_| rng.random_range(0..n_vocab)).collect();
            let request = greedy_ignoring_eos(prompt, gen_tokens);
            let started = Instant::now();
            let mut events = model.scheduler.submit(request)?;
            while let Some(event) = events.blocking_recv() {
                match event {
                    Event::Finished { completion_tokens, timings, .. } => {
                        return Ok((completion_tokens, timings, started));
                    }
                    Event::Error(e) => anyhow::bail!(e),
                    _ => {}
                }
            }
            anyhow::bail!("the engine stopped")
        };
    // As llama-bench: prompt processing is one batch of random tokens (`pp`), and decoding
    // generates from an empty context (`tg`), each after one discarded warm-up run.
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for rep in 0..=args.reps {
        let (_, timings, started) = run(args.prompt, 1)?;
        let (generated, tg, _) = run(1, args.gen_tokens + 1)?;
        if rep > 0 {
            prefill.push(args.prompt as f64 / (timings.first_token - started).as_secs_f64());
            decode.push((generated - 1) as f64 / (tg.finished - tg.first_token).as_secs_f64());
        }
    }
    // Aggregate decode: N sequences generating together, from submit to the last token.
    let mut aggregate = serde_json::Map::new();
    for &n in &args.concurrent {
        let started = Instant::now();
        let receivers = (0..n)
            .map(|i| {
                let prompt = vec![(i as u32 * 7919) % n_vocab];
                model.scheduler.submit(greedy_ignoring_eos(prompt, args.gen_tokens))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut tokens = 0;
        for mut events in receivers {
            while let Some(event) = events.blocking_recv() {
                if let Event::Finished { completion_tokens, .. } = event {
                    tokens += completion_tokens;
                    break;
                }
            }
        }
        aggregate.insert(n.to_string(), serde_json::json!(tokens as f64 / started.elapsed().as_secs_f64()));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "model": args.model.display().to_string(),
            "threads": args.threads,
            "prompt_tokens": args.prompt,
            "gen_tokens": args.gen_tokens,
            "prefill_tokens_per_s": mean(&prefill),
            "decode_tokens_per_s": mean(&decode),
            "prefill_runs": prefill,
            "decode_runs": decode,
            "aggregate_decode_tokens_per_s": aggregate,
        })
    );
    Ok(())
}

/// What llama-bench generates: greedy tokens, past any end-of-generation token.
fn greedy_ignoring_eos(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        max_tokens,
        n: 1,
        sampling: SamplingParams::greedy(),
        stop: Vec::new(),
        free_text: None,
        logprobs: None,
        prompt_logprobs: false,
        ignore_eos: true,
        constraint: None,
        sampled: None,
        cache_scope: 0,
    }
}
