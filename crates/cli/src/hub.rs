//! Model references: a local path, or a file on the Hugging Face hub (`hf:OWNER/REPO/FILE`),
//! downloaded once into the models directory with a progress bar.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ferry_providers::error_chain;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::config::{DEFAULT_MODEL_FILE, missing_default_model};

/// A hub file: `owner/repo` and the file's path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    pub repo: String,
    pub file: String,
}

impl HubFile {
    /// Parses `hf:OWNER/REPO/FILE` (FILE may contain slashes).
    pub fn parse(spec: &str) -> Option<HubFile> {
        let rest = spec.strip_prefix("hf:")?;
        let mut parts = rest.splitn(3, '/');
        let (owner, repo, file) = (parts.next()?, parts.next()?, parts.next()?);
        if owner.is_empty() || repo.is_empty() || file.is_empty() {
            return None;
        }
        Some(HubFile { repo: format!("{owner}/{repo}"), file: file.to_string() })
    }

    pub fn url(&self, endpoint: &str) -> String {
        format!("{}/{}/resolve/main/{}", endpoint.trim_end_matches('/'), self.repo, self.file)
    }

    fn local_path(&self, models_dir: &Path) -> PathBuf {
        models_dir.join("hub").join(self.repo.replace('/', "--")).join(&self.file)
    }
}

/// Turns a model reference into a file on disk, downloading it if needed.
pub async fn resolve(spec: &str, models_dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(hub) = HubFile::parse(spec) {
        let path = hub.local_path(models_dir);
        if path.is_file() {
            return Ok(path);
        }
        download(&hub, &path).await?;
        return Ok(path);
    }
    local_file(spec)
}

/// A model reference that is not a hub file: the file itself, which must exist.
pub fn local_file(spec: &str) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(spec);
    if path.is_file() {
        return Ok(path);
    }
    if path.file_name().is_some_and(|n| n == DEFAULT_MODEL_FILE) {
        bail!(missing_default_model(&path));
    }
    bail!(
        "model file {} does not exist (give a GGUF path, or hf:OWNER/REPO/FILE.gguf to download one)",
        path.display()
    )
}

/// Downloads into `path.partial`, then renames, so an interrupted download never looks complete.
async fn download(hub: &HubFile, path: &Path) -> anyhow::Result<()> {
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let url = hub.url(&endpoint);
    let fail = |why: String| {
        anyhow::anyhow!(
            "could not download {} from the Hugging Face hub ({url}): {why}\n\
             If this machine has no internet access, copy the file here and pass its path with --model",
            hub.file
        )
    };
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(15))
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut request = client.get(&url);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| fail(error_chain(&e)))?;
    if !response.status().is_success() {
        return Err(fail(format!("the hub answered {}", response.status())));
    }
    let total = response.content_length().unwrap_or(0);
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.with_context(|| format!("creating {}", dir.display()))?;
    }
    let partial = path.with_extension("partial");
    let mut file =
        tokio::fs::File::create(&partial).await.with_context(|| format!("creating {}", partial.display()))?;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(hub.file.clone());
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| fail(error_chain(&e)))?;
        file.write_all(&chunk).await?;
        bar.inc(chunk.len() as u64);
    }
    file.flush().await?;
    bar.finish();
    tokio::fs::rename(&partial, path).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hub_references() {
        assert_eq!(
            HubFile::parse("hf:bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf"),
            Some(HubFile {
                repo: "bartowski/SmolLM2-135M-Instruct-GGUF".into(),
                file: "SmolLM2-135M-Instruct-Q4_K_M.gguf".into()
            })
        );
        assert_eq!(HubFile::parse("hf:owner/repo"), None);
        assert_eq!(HubFile::parse("models/x.gguf"), None);
    }
}
