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

    let gateway = if config.gateway.aliases.is_empty() && config.gateway.presets.is_empty() {
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
    // Reloading re-reads the config file (flags and variables are fixed for the process)
    // and rebuilds the gateway; local models stay as they are.
    let loader: Option<ferry_server::GatewayLoader> = config.config_path.clone().map(|path| {
        let loader: ferry_server::GatewayLoader = Arc::new(move || {
            let args = crate::config::ServeArgs { config: Some(path.clone()), ..Default::default() };
            let fresh = args.resolve().map_err(|e| format!("{e:#}"))?;
            if fresh.gateway.aliases.is_empty() && fresh.gateway.presets.is_empty() {
                return Ok(None);
            }
            ferry_gateway::Gateway::from_config(&fresh.gateway).map(Some).map_err(|e| e.to_string())
        });
        loader
    });
    let state = AppState::new(models, gateway, loader, HttpConfig { max_body_bytes: config.max_body_bytes });
    spawn_reload_on_sighup(state.clone());
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to find a port picked with --port 0.
    println!("Ferry listening on http://{addr}");
    tracing::info!(%addr, "listening");
    let app = ferry_server::app(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    Ok(())
}

/// SIGHUP reloads the gateway config without dropping requests in flight.
fn spawn_reload_on_sighup(state: AppState) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hangups.recv().await.is_some() {
            if let Err(e) = state.reload() {
                tracing::error!(error = %e, "config reload failed; keeping the previous config");
            }
        }
    });
    #[cfg(not(unix))]
    let _ = state;
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
