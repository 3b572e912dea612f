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
    /// Repetitions (llama-bench's -r)
    #[arg(long, short = 'r', default_value_t = 3)]
    reps: usize,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let batch = args.prompt.max(1);
    let config = SchedulerConfig {
        session: SessionConfig {
            n_sequences: 1,
            ctx_per_sequence: args.prompt + args.gen_tokens + 8,
            batch_tokens: batch,
            threads: args.threads,
        },
        prefill_chunk: batch,
        max_waiting: 1,
    };
    let model = LocalModel::load("bench", &args.model, config, |_| {})?;
    let n_vocab = model.info().n_vocab as u32;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    // One warm-up run, as llama-bench does.
    for rep in 0..=args.reps {
        let prompt: Vec<u32> = (0..args.prompt).map(|_| rng.random_range(0..n_vocab)).collect();
        let request = GenerateRequest {
            prompt,
            max_tokens: args.gen_tokens.max(1),
            n: 1,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            logprobs: None,
            prompt_logprobs: false,
            ignore_eos: true,
        };
        let started = Instant::now();
        let mut events = model.scheduler.submit(request)?;
        while let Some(event) = events.blocking_recv() {
            match event {
                Event::Finished { completion_tokens, timings, .. } => {
                    if rep > 0 {
                        prefill.push(args.prompt as f64 / (timings.first_token - started).as_secs_f64());
                        let decoding = (timings.finished - timings.first_token).as_secs_f64();
                        decode.push((completion_tokens - 1) as f64 / decoding);
                    }
                    break;
                }
                Event::Error(e) => anyhow::bail!(e),
                _ => {}
            }
        }
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
        })
    );
    Ok(())
}
