//! `ferry serve`: load the models, start their schedulers, serve HTTP until a signal.

use std::sync::Arc;

use anyhow::Context;
use ferry_engine::{LocalModel, SchedulerConfig, SessionConfig};
use ferry_server::{AppState, HttpConfig};

use crate::config::ServeConfig;
use crate::hub;

pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let mut models = Vec::new();
    for spec in config.model_specs() {
        let path = hub::resolve(&spec, &config.models_dir).await?;
        let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| spec.clone());
        let scheduler = SchedulerConfig {
            session: SessionConfig {
                n_sequences: config.parallel,
                ctx_per_sequence: config.ctx_size,
                batch_tokens: config.batch_size,
                threads: config.threads,
            },
            prefill_chunk: config.prefill_chunk,
            max_waiting: config.max_queue,
        };
        tracing::info!(model = %id, path = %path.display(), "loading");
        let model = tokio::task::spawn_blocking(move || {
            let name = id.clone();
            let mut last_decile = -1;
            LocalModel::load(&id, &path, scheduler, move |p| {
                let decile = (p * 10.0) as i32;
                if decile != last_decile {
                    last_decile = decile;
                    tracing::info!(model = %name, "loading {}%", decile * 10);
                }
            })
        })
        .await??;
        let info = model.info();
        tracing::info!(
            model = %info.id, architecture = %info.architecture, parameters = info.n_params,
            quantization = %info.quantization, "loaded"
        );
        models.push(Arc::new(model));
    }

    let gateway = if config.gateway.aliases.is_empty() {
        None
    } else {
        let gateway = ferry_gateway::Gateway::from_config(&config.gateway)?;
        tracing::info!(
            aliases = config.gateway.aliases.len(),
            providers = config.gateway.providers.len(),
            "gateway ready"
        );
        Some(Arc::new(gateway))
    };
    let state = AppState::new(models, gateway, HttpConfig { max_body_bytes: config.max_body_bytes });
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find a port picked with --port 0.
    println!("Ferry listening on http://{addr}");
    tracing::info!(%addr, "listening");
    axum::serve(listener, ferry_server::app(state)).with_graceful_shutdown(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
