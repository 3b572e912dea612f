//! `ferry`: the command line. Thin: it parses settings and calls the library crates.

/// `println!` for a command's output: when the reader has gone (`ferry audit list | head`),
/// the command ends quietly with success, as other Unix tools do, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that ends the command quietly once the reader has gone (see `outln!`).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))
    };
}

mod admin;
mod bench;
mod chat;
mod config;
mod hub;
mod models;
mod serve;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: a proxied request allocates a few hundred times
/// (headers, JSON, the usage record), and glibc's allocator was about 15% of the gateway's CPU
/// (its `malloc_consolidate` runs whenever a block of 1 KiB or more is asked for, such as a
/// response's header map growing). Measured in bench/README.md ("Tenancy on against off").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
#[expect(clippy::large_enum_variant, reason = "parsed once at start; boxing buys nothing")]
enum Command {
    /// Serve models over the OpenAI API
    Serve(config::ServeArgs),
    /// Chat in the terminal with a local model or a running server
    Chat(chat::ChatArgs),
    /// List the models on disk (architecture, parameters, quantization, size, sha256), or
    /// a running server's: `ferry models ps|load|unload`
    Models(models::ModelsArgs),
    /// Measure the engine on one sequence, as llama-bench does (for bench/)
    Bench(bench::BenchArgs),
    /// Tenants of a running server
    Tenants {
        #[command(subcommand)]
        command: admin::TenantCommand,
        #[command(flatten)]
        remote: admin::Remote,
    },
    /// Projects of a running server
    Projects {
        #[command(subcommand)]
        command: admin::ProjectCommand,
        #[command(flatten)]
        remote: admin::Remote,
    },
    /// API keys of a running server
    Keys {
        #[command(subcommand)]
        command: admin::KeyCommand,
        #[command(flatten)]
        remote: admin::Remote,
    },
    /// Usage of a running server, aggregated (table or CSV)
    Usage {
        #[command(flatten)]
        args: admin::UsageArgs,
        #[command(flatten)]
        remote: admin::Remote,
    },
    /// The audit log: list it, or verify its hash chain
    Audit {
        #[command(subcommand)]
        command: admin::AuditCommand,
        #[command(flatten)]
        remote: admin::Remote,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // One TLS provider for the whole process (ring: no large C build).
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Serve(args) => {
            init_logging(args.log_format.as_deref() == Some("json"));
            runtime.block_on(serve::run(args.resolve()?))
        }
        Command::Chat(args) => runtime.block_on(chat::run(args)),
        Command::Models(models::ModelsArgs { command: Some(command), .. }) => {
            let (remote, command) = command.split();
            runtime.block_on(admin::models(remote, command))
        }
        Command::Models(args) => models::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Tenants { command, remote } => runtime.block_on(admin::tenants(remote, command)),
        Command::Projects { command, remote } => runtime.block_on(admin::projects(remote, command)),
        Command::Keys { command, remote } => runtime.block_on(admin::keys(remote, command)),
        Command::Usage { args, remote } => runtime.block_on(admin::usage(remote, args)),
        Command::Audit { command, remote } => runtime.block_on(admin::audit(remote, command)),
    }
}

/// Human-readable lines, or one JSON object per line (`--log-format json`) for log shippers.
/// Coloured only on a terminal, and never under `NO_COLOR` (no-color.org): a log written to
/// a file or a pipe carries no escape codes.
fn init_logging(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,llama-cpp-2=warn"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let logs =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

/// Writes to stdout; a closed pipe ends the process with success (the reader took what it
/// wanted), any other failure with an error.
fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}
