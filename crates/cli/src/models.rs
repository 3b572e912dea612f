//! `ferry models`: what is on disk, with the facts a user checks before serving a file; and
//! `ferry models ps|load|unload` against a running server.

use std::path::{Path, PathBuf};

use clap::Args;
use ferry_engine::llama::LlamaCppModel;
use ferry_engine::model_info::sha256_file;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub command: Option<ServerModels>,
    /// Directory to scan (recursively) for GGUF files
    #[arg(long, env = "FERRY_MODELS_DIR", default_value = "models")]
    dir: PathBuf,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
    /// Skip computing the sha256 of each file
    #[arg(long)]
    no_hash: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum ServerModels {
    /// A running server's local models and their state
    Ps {
        #[command(flatten)]
        remote: crate::admin::Remote,
    },
    /// Load a configured model on a running server
    Load {
        name: String,
        #[command(flatten)]
        remote: crate::admin::Remote,
    },
    /// Unload a model on a running server
    Unload {
        name: String,
        #[command(flatten)]
        remote: crate::admin::Remote,
    },
}

impl ServerModels {
    pub fn split(self) -> (crate::admin::Remote, crate::admin::ServerModelCommand) {
        use crate::admin::ServerModelCommand as C;
        match self {
            ServerModels::Ps { remote } => (remote, C::Ps),
            ServerModels::Load { name, remote } => (remote, C::Load { name }),
            ServerModels::Unload { name, remote } => (remote, C::Unload { name }),
        }
    }
}

/// Lists the GGUF files of a directory (no subcommand).
pub fn run(args: ModelsArgs) -> anyhow::Result<()> {
    let mut files = Vec::new();
    find_gguf(&args.dir, &mut files);
    files.sort();
    let mut rows = Vec::new();
    for path in files {
        let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let info = match LlamaCppModel::load(&id, &path, Some(0), |_| {}) {
            Ok(model) => ferry_engine::Backend::info(&model).clone(),
            Err(e) => {
                eprintln!("{}: {e}", path.display());
                continue;
            }
        };
        let sha256 = if args.no_hash { None } else { Some(sha256_file(&path)?) };
        rows.push((info, sha256));
    }
    if args.json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(info, sha)| {
                let mut v = serde_json::to_value(info).unwrap_or_default();
                v["sha256"] = serde_json::json!(sha);
                v
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if rows.is_empty() {
        outln!(
            "No GGUF models in {}. Fetch the test models with: python3 scripts/fetch-models.py",
            args.dir.display()
        );
        return Ok(());
    }
    outln!("{:<40} {:<8} {:>8} {:<9} {:>9}  SHA256", "MODEL", "ARCH", "PARAMS", "QUANT", "SIZE");
    for (info, sha) in rows {
        outln!(
            "{:<40} {:<8} {:>8} {:<9} {:>9}  {}",
            info.id,
            info.architecture,
            format!("{:.0}M", info.n_params as f64 / 1e6),
            info.quantization,
            format!("{:.0} MB", info.file_size as f64 / 1e6),
            sha.unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}

fn find_gguf(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            find_gguf(&path, out);
        } else if path.extension().is_some_and(|e| e == "gguf") {
            out.push(path);
        }
    }
}
