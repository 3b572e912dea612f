//! `ferry`: the command line. Thin: it parses settings and calls the library crates.

mod bench;
mod chat;
mod config;
mod hub;
mod models;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Serve large models as a service: an OpenAI-compatible server with an embedded engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over the OpenAI API
    Serve(config::ServeArgs),
    /// Chat in the terminal with a local model or a running server
    Chat(chat::ChatArgs),
    /// List the models on disk: architecture, parameters, quantization, size, sha256
    Models(models::ModelsArgs),
    /// Measure the engine on one sequence, as llama-bench does (for bench/)
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // One TLS provider for the whole process (ring: no large C build).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Serve(args) => {
            init_logging();
            runtime.block_on(serve::run(args.resolve()?))
        }
        Command::Chat(args) => runtime.block_on(chat::run(args)),
        Command::Models(args) => models::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,llama-cpp-2=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
