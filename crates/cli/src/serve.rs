//! `ferry serve`: load the models, start their schedulers, serve HTTP until a signal.

use std::sync::Arc;

use anyhow::Context;
use ferry_engine::LocalModel;
use ferry_server::{AppState, HttpConfig};

use crate::config::ServeConfig;
use crate::hub;

pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    // Flushes the spans still batched when the server stops.
    let _otel = ferry_server::otel::install(config.otlp_endpoint.as_deref()).map_err(anyhow::Error::msg)?;
    // Checked before the models load, so a refusal is immediate.
    let tenancy = open_tenancy(&config).await?;
    let (store, run) = (tenancy.store.clone(), tenancy.instance.clone());
    let served = serve(config, tenancy).await;
    // A start that failed leaves no run behind for the others to list or wait on.
    if served.is_err()
        && let Err(e) = store.leave(&run).await
    {
        tracing::warn!(error = %e, "this run's heartbeat row could not be removed; it expires with its lease");
    }
    served
}

async fn serve(config: ServeConfig, tenancy: ferry_server::Tenancy) -> anyhow::Result<()> {
    if !tenancy.auth_required() && !is_loopback(&config.host) && !config.insecure_no_auth {
        anyhow::bail!(
            "refusing to serve {} without API keys: anyone who reaches it could use it.\n\
             Set FERRY_ADMIN_KEY (or FERRY_ADMIN_KEY_FILE) to turn keys on, serve on 127.0.0.1, \
             or pass --insecure-no-auth if this network is trusted.",
            config.host
        );
    }
    // Installed before any model loads, so that loads at start are counted too.
    let metrics = ferry_server::telemetry::install()
        .inspect_err(|e| tracing::warn!(error = %e, "metrics are off: the recorder could not be installed"))
        .ok();
    let specs = config.model_specs()?;
    let limits = ferry_server::RegistryLimits {
        max_loaded: config.max_loaded_models,
        memory_budget: config.memory_budget,
        load_timeout: std::time::Duration::from_secs(config.load_timeout_s),
        max_waiting: config.max_queue,
    };
    let registry = Arc::new(
        ferry_server::Registry::new(specs, loader(&config, &tenancy), limits).map_err(anyhow::Error::msg)?,
    );
    // Models marked to preload (every --model) load now, as far as the limits allow;
    // the others load on their first request.
    registry.preload().await.map_err(anyhow::Error::msg)?;
    // The embedding model is served only when asked for, never found in the models directory.
    let embeddings = match &config.embedding_model {
        Some(dir) => Some(load_embedding_model(dir, config.threads, &registry).await?),
        None => None,
    };

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
    let http = HttpConfig {
        max_body_bytes: config.max_body_bytes,
        cors_origins: config.cors_origins.clone(),
        // Listening beyond loopback (with keys, or --insecure-no-auth), any name may reach it.
        allowed_hosts: is_loopback(&config.host).then(|| config.allowed_hosts.clone()),
    };
    let mut state = AppState::new(registry, gateway, loader, http, tenancy);
    if let Some(service) = embeddings {
        state = state.with_embeddings(service);
    }
    if let Some(handle) = metrics {
        state = state.with_metrics(handle);
    }
    state.watch_keys();
    spawn_reload_on_sighup(state.clone());
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    // Kept to commit the last usage records after the server stops.
    let stopped_state = state.clone();
    let app = ferry_server::app(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let Some((cert, key)) = &config.tls else {
        // Tests and scripts read this line to find a port picked with --port 0.
        println!("Ferry listening on http://{addr}");
        tracing::info!(%addr, "listening");
        // On SIGTERM: stop accepting, let requests in flight (streams included) finish, and
        // cancel whatever is still running when the grace period ends.
        let (stopping, mut stopped) = tokio::sync::watch::channel(false);
        let signal = async move {
            shutdown_signal().await;
            let _ = stopping.send(true);
        };
        let grace = config.shutdown_grace;
        let deadline = async move {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = axum::serve(listener, app).with_graceful_shutdown(signal).into_future() => served?,
            () = deadline => tracing::warn!(?grace, "requests still in flight after the grace period were cancelled"),
        }
        leave(&stopped_state).await;
        return Ok(());
    };
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await.with_context(|| {
        format!("loading the TLS certificate {} and key {}", cert.display(), key.display())
    })?;
    let grace = config.shutdown_grace;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        // In-flight requests get this long to finish.
        stopper.graceful_shutdown(Some(grace));
    });
    println!("Ferry listening on https://{addr}");
    tracing::info!(%addr, "listening with TLS");
    axum_server::from_tcp_rustls(listener.into_std()?, tls)?.handle(handle).serve(app).await?;
    leave(&stopped_state).await;
    Ok(())
}

/// After the last request: the usage records committed, and this run's heartbeat row gone
/// (nothing of it is left to reconcile).
async fn leave(state: &AppState) {
    let tenancy = state.tenancy();
    tenancy.flush_usage().await;
    if let Err(e) = tenancy.store.leave(&tenancy.instance).await {
        tracing::warn!(error = %e, "this run's heartbeat row could not be removed; it expires with its lease");
    }
}

/// Loads a sentence-embedding model (off the async threads) and starts its batching thread.
async fn load_embedding_model(
    dir: &std::path::Path,
    threads: usize,
    models: &ferry_server::Registry,
) -> anyhow::Result<ferry_embed::EmbedService> {
    tracing::info!(path = %dir.display(), "loading the embedding model");
    let path = dir.to_path_buf();
    let embedder = tokio::task::spawn_blocking(move || ferry_embed::Embedder::load(&path)).await??;
    if models.contains(embedder.name()) {
        anyhow::bail!("the embedding model and a --model are both named `{}`", embedder.name());
    }
    let (name, dims, max_tokens) = (embedder.name().to_string(), embedder.dims(), embedder.max_tokens());
    let config = ferry_embed::EmbedServiceConfig { threads, ..Default::default() };
    let service = ferry_embed::EmbedService::start(Arc::new(embedder), config)?;
    tracing::info!(model = %name, dims, max_tokens, threads, "loaded");
    Ok(service)
}

/// Opens the store, adds the bootstrap admin key, and reconciles the usage records a crash
/// of this instance left open.
async fn open_tenancy(config: &ServeConfig) -> anyhow::Result<ferry_server::Tenancy> {
    let store = ferry_store::Store::open(&config.database)
        .await
        .with_context(|| format!("opening the store at {}", redact_url(&config.database)))?;
    let admin_key = match (std::env::var("FERRY_ADMIN_KEY"), std::env::var("FERRY_ADMIN_KEY_FILE")) {
        (Ok(key), _) if !key.trim().is_empty() => Some(key.trim().to_string()),
        (_, Ok(path)) if !path.is_empty() => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading FERRY_ADMIN_KEY_FILE {path}"))?
                .trim()
                .to_string(),
        ),
        _ => None,
    };
    if let Some(secret) = admin_key {
        let new = ferry_store::NewKey {
            name: "bootstrap admin".into(),
            role: ferry_store::Role::Admin,
            tenant_id: None,
            project_id: None,
            models: None,
            limits: Default::default(),
            expires_at: None,
        };
        let (key, stored) = store.import_key(&new, &secret).await.context("storing the admin key")?;
        if stored {
            let after = serde_json::to_value(&key).unwrap_or_default();
            store.audit("FERRY_ADMIN_KEY", "key.import", &key.id, None, Some(&after)).await?;
        }
        if key.revoked_at.is_some() {
            tracing::warn!(key = %key.id, "the admin key given in FERRY_ADMIN_KEY was revoked: it opens nothing");
        } else {
            tracing::info!(key = %key.id, prefix = %key.display_prefix, "admin key ready");
        }
    }
    // Redis, if configured, is reached before this run joins the replicas: a start that
    // fails there leaves nothing behind.
    let shared = match &config.redis {
        Some((url, prefix)) => {
            let shared = ferry_server::SharedState::connect(url, prefix)
                .await
                .map_err(|e| anyhow::anyhow!("Redis at {}: {e}", redact_url(url)))?;
            tracing::info!(redis = %redact_url(url), prefix = %prefix, "rate limits and key changes shared through Redis");
            Some(shared)
        }
        None => None,
    };
    // Replicas sharing one database need distinct names: the host's, or FERRY_INSTANCE. Each
    // run adds a random suffix of its own, so that namesakes never close each other's records.
    let instance = std::env::var("FERRY_INSTANCE")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "ferry".into());
    let lease = config.replica_lease;
    let beat = lease / 3;
    // A run of this name that beat lately is alive, or crashed a moment ago: its lease decides.
    let live_since = ferry_store::now_ms() - 2 * beat.as_millis() as i64;
    let (run, namesakes) = store.join(&instance, live_since).await?;
    for other in &namesakes {
        tracing::warn!(
            run = %other.run,
            "another server named {instance} beat moments ago: if it is not an earlier run of this one, \
             give each replica its own FERRY_INSTANCE"
        );
    }
    // Records earlier runs of this name left `started` were cut short by a crash; so were
    // those of any replica whose heartbeat stopped for longer than the lease.
    let reconciled = store.reconcile_earlier_runs(&instance, &run, live_since).await?
        + store.reconcile_dead_replicas(lease.as_millis() as i64).await?;
    if reconciled > 0 {
        tracing::warn!(reconciled, "usage records of requests interrupted by an earlier crash were closed");
    }
    spawn_heartbeat(store.clone(), run.clone(), instance, lease);
    let mut tenancy =
        ferry_server::Tenancy::new(store, config.prices.clone(), config.guardrails.clone(), run)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    tenancy.metering = config.metering;
    tenancy.replica_lease = lease;
    if let Some(shared) = shared {
        tenancy.share(shared);
    }
    if !config.metering {
        tenancy.limiter.read_budgets_once();
    }
    let keep_traces_ms = config.trace_retention_hours as i64 * 3_600_000;
    spawn_purge(
        tenancy.store.clone(),
        std::time::Duration::from_secs(config.purge_interval_s),
        keep_traces_ms,
    );
    tracing::info!(auth = tenancy.auth_required(), store = %redact_url(&config.database), "tenancy ready");
    Ok(tenancy)
}

/// How the registry loads a model: resolve the file (downloading a hub reference), load it
/// off the async threads with its progress in the log, then hash the file in the background
/// (once) for traces and model cards.
fn loader(config: &ServeConfig, tenancy: &ferry_server::Tenancy) -> ferry_server::Loader {
    let models_dir = config.models_dir.clone();
    let hashes = tenancy.model_sha256.clone();
    Arc::new(move |spec: ferry_server::ModelSpec| {
        let models_dir = models_dir.clone();
        let hashes = hashes.clone();
        Box::pin(async move {
            let path = hub::resolve(&spec.source, &models_dir).await.map_err(|e| format!("{e:#}"))?;
            let name = spec.name.clone();
            let load_path = path.clone();
            let model = tokio::task::spawn_blocking(move || {
                let id = name.clone();
                let mut last_decile = -1;
                LocalModel::load(&id, &load_path, spec.scheduler, move |p| {
                    let decile = (p * 10.0) as i32;
                    if decile != last_decile {
                        last_decile = decile;
                        tracing::info!(model = %name, "loading {}%", decile * 10);
                    }
                })
            })
            .await
            .map_err(|e| format!("the loading thread failed: {e}"))?
            .map_err(|e| e.to_string())?;
            let mut model = model;
            // The configured defaults, and what the file recommends where they set nothing.
            model.defaults = spec.defaults.or(&model.defaults);
            model.pooling = spec.pooling;
            let id = model.info().id.clone();
            let hashed = hashes.read().is_ok_and(|h| h.contains_key(&id));
            if !hashed {
                tokio::spawn(async move {
                    match tokio::task::spawn_blocking(move || ferry_engine::model_info::sha256_file(&path))
                        .await
                    {
                        Ok(Ok(sha)) => {
                            if let Ok(mut shas) = hashes.write() {
                                shas.insert(id, sha);
                            }
                        }
                        other => tracing::warn!(model = %id, ?other, "could not hash the model file"),
                    }
                });
            }
            Ok(model)
        })
    })
}

/// Deletes retained request content past its tenant's retention, now and then periodically.
fn spawn_purge(store: ferry_store::Store, every: std::time::Duration, keep_traces_ms: i64) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            match store.purge_content().await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "retained request content purged"),
                Err(e) => tracing::error!(error = %e, "purging retained request content failed"),
            }
            match store.purge_traces(keep_traces_ms).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "old traces purged"),
                Err(e) => tracing::error!(error = %e, "purging old traces failed"),
            }
        }
    });
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A database URL without its password, for logs and errors.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Renews this run's lease every third of it, and reconciles the records of replicas whose
/// lease ran out (they crashed, or lost the database).
fn spawn_heartbeat(store: ferry_store::Store, run: String, instance: String, lease: std::time::Duration) {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(lease / 3);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut beat_at = std::time::Instant::now();
        loop {
            ticks.tick().await;
            match store.heartbeat(&run, &instance).await {
                // (Its row gone, the run was silent for a day: written again, and told below.)
                Ok(_) => {
                    let silent = beat_at.elapsed();
                    beat_at = std::time::Instant::now();
                    if silent > lease {
                        tracing::error!(
                            %run,
                            silent_s = silent.as_secs(),
                            "this server was silent for longer than its lease (stopped, or cut off from the database): other replicas may have closed its requests in flight as interrupted; those that finish now replace that with what they used"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the heartbeat could not be written"),
            }
            match store.reconcile_dead_replicas(lease.as_millis() as i64).await {
                Ok(0) => {}
                Ok(reconciled) => tracing::warn!(
                    reconciled,
                    "usage records of a replica whose heartbeat stopped were closed as interrupted"
                ),
                Err(e) => tracing::warn!(error = %e, "records of stopped replicas could not be reconciled"),
            }
        }
    });
}

/// SIGHUP reloads the gateway config without dropping requests in flight.
fn spawn_reload_on_sighup(state: AppState) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
            return;
        };
        while hangups.recv().await.is_some() {
            // Audited like the admin route's reload, with the signal as the actor.
            if let Err(e) = state.reload_audited("signal:SIGHUP").await {
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
