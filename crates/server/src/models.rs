//! `/v1/models`: every model a client may name (local models in whatever state they are,
//! the embedding model, gateway aliases and presets), and the admin routes that load and
//! unload local models at run time.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use ferry_api::openai::{Model, ModelList};
use ferry_store::Role;
use serde_json::json;

use crate::app::AppState;
use crate::embeddings;
use crate::error::ApiError;
use crate::registry::ModelStatus;

/// A local model's card: OpenAI's fields, then Ferry's (state, provenance, limits). What the
/// last load learned stays on the card while the model is on disk. The file's path and the
/// last load's error (which may name paths) are the server operator's: a tenant's key gets
/// the card without them.
fn local_card(state: &AppState, status: &ModelStatus, operator: bool) -> Model {
    let spec = &status.spec;
    let info = status.model.as_ref().map(|m| m.info()).or(status.info.as_ref());
    let config = &spec.scheduler.session;
    let sha256 = state.tenancy().model_sha256.read().ok().and_then(|s| s.get(&spec.name).cloned());
    let mut details = json!({
        "state": status.state,
        "file": spec.source,
        "architecture": info.map(|i| &i.architecture),
        "parameters": info.map(|i| i.n_params),
        "quantization": info.map(|i| &i.quantization),
        "file_size": info.map(|i| i.file_size)
            .or_else(|| spec.path.as_ref().and_then(|p| std::fs::metadata(p).ok()).map(|m| m.len())),
        "memory_bytes": status.memory,
        "context_length": config.ctx_per_sequence,
        "parallel_sequences": config.n_sequences,
        "prefix_cache": spec.scheduler.prefix_cache,
        "flash_attention": config.flash_attention.as_str(),
        "has_chat_template": status.model.as_ref().map(|m| m.template.is_some())
            .or_else(|| info.map(|i| i.chat_template.is_some())),
        "license": info.and_then(|i| i.license.as_ref()),
        "source": info.and_then(|i| i.source.as_ref()),
        "name": info.and_then(|i| i.name.as_ref()),
        "n_layer": info.map(|i| i.n_layer),
        "n_embd": info.map(|i| i.n_embd),
        "n_vocab": info.map(|i| i.n_vocab),
        "n_ctx_train": info.map(|i| i.n_ctx_train),
        // Hashed in the background after the first load: null until that finishes.
        "sha256": sha256,
        // In force: the configured ones, and the file's recommendation where they set none.
        "defaults": status.model.as_ref().map_or(&spec.defaults, |m| &m.defaults),
        "recommended_sampling": info.map(|i| &i.sampling),
        "last_error": status.last_error,
    });
    if !operator && let Some(fields) = details.as_object_mut() {
        fields.remove("file");
        fields.remove("last_error");
    }
    Model {
        id: spec.name.clone(),
        object: "model".into(),
        created: state.created(),
        owned_by: "ferry".into(),
        details: serde_json::from_value(details).unwrap_or_default(),
    }
}

#[utoipa::path(get, path = "/v1/models", tag = "OpenAI", summary = "List models",
    description = "Every model this caller may use. Local models carry their `state` \
        (`loaded`, `loading` or `on_disk`: loaded on the first request that names it).",
    responses((status = 200, body = ModelList)))]
/// The models this caller may use: all of them, or those its key is limited to.
pub async fn list_models(
    State(state): State<AppState>,
    axum::Extension(identity): axum::Extension<crate::tenancy::Identity>,
) -> impl IntoResponse {
    let operator = identity.role() == Role::Admin;
    let mut data: Vec<Model> =
        state.registry().list().iter().map(|s| local_card(&state, s, operator)).collect();
    data.extend(state.embeddings().map(|e| embeddings::model_card(e, state.created())));
    if let Some(gateway) = state.gateway().as_deref() {
        let mut aliases: Vec<&str> = gateway.alias_names().collect();
        aliases.sort_unstable();
        data.extend(aliases.into_iter().map(|alias| alias_card(&state, alias)));
        let mut presets: Vec<_> = gateway.presets().collect();
        presets.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        data.extend(presets.into_iter().map(|p| preset_card(&state, p)));
    }
    if let Some(key) = &identity.key {
        data.retain(|m| key.allows_model(&m.id));
    }
    axum::Json(ModelList { object: "list".into(), data })
}

#[utoipa::path(get, path = "/v1/models/{id}", tag = "OpenAI",
    summary = "Retrieve a model, with its state and provenance (Ferry extensions)",
    description = "Reading a card does not load the model.",
    params(("id" = String, Path, description = "The model's id")),
    responses((status = 200, body = Model)))]
pub async fn get_model(
    State(state): State<AppState>,
    axum::Extension(identity): axum::Extension<crate::tenancy::Identity>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    if identity.key.as_ref().is_some_and(|k| !k.allows_model(&id)) {
        return Err(ApiError::ModelNotFound(id));
    }
    if let Some(service) = state.embeddings()
        && service.embedder().name() == id
    {
        return Ok(axum::Json(embeddings::model_card(service, state.created())));
    }
    // The order requests are routed in: a preset, then an alias, then a local model.
    if let Some(gateway) = state.gateway().as_deref() {
        if let Some(preset) = gateway.preset(&id) {
            return Ok(axum::Json(preset_card(&state, preset)));
        }
        if gateway.has_alias(&id) {
            return Ok(axum::Json(alias_card(&state, &id)));
        }
    }
    card(&state, &id, identity.role() == Role::Admin).map(axum::Json)
}

/// A gateway alias: its targets are the operator's business, not the caller's.
fn alias_card(state: &AppState, alias: &str) -> Model {
    Model {
        id: alias.to_string(),
        object: "model".into(),
        created: state.created(),
        owned_by: "ferry-gateway".into(),
        details: Default::default(),
    }
}

fn preset_card(state: &AppState, preset: &ferry_gateway::PresetConfig) -> Model {
    Model {
        id: preset.name.clone(),
        object: "model".into(),
        created: state.created(),
        owned_by: "ferry-preset".into(),
        details: serde_json::from_value(json!({
            "base": preset.base,
            "description": preset.description,
            "guardrail_policy": preset.guardrail_policy,
        }))
        .unwrap_or_default(),
    }
}

fn card(state: &AppState, name: &str, operator: bool) -> Result<Model, ApiError> {
    state
        .registry()
        .list()
        .iter()
        .find(|s| s.spec.name == name)
        .map(|s| local_card(state, s, operator))
        .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
}

#[utoipa::path(post, path = "/admin/v1/models/{name}/{action}", tag = "Admin",
    summary = "Load or unload a local model (`ferry models load|unload NAME`)",
    description = "`load` returns once the model is loaded (unloading least-recently-used \
        models first where the limits ask for it); `unload` frees it once its requests in \
        flight finish. Either answers with the model's card. Admin keys only.",
    params(("name" = String, Path, description = "The model's id"),
        ("action" = String, Path, description = "`load` or `unload`")),
    responses((status = 200, body = Model)))]
/// `POST /admin/v1/models/{name}/load|unload`: an admin key, or a loopback client of a
/// server without keys. Both are recorded in the audit log.
pub async fn admin_model(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let identity = crate::tenancy::admin_identity(&state, peer, &headers).await?;
    if identity.role() != ferry_store::Role::Admin {
        return Err(ApiError::Forbidden("Loading and unloading models needs an admin key.".into()));
    }
    let unknown =
        || ApiError::RouteNotFound { method: "POST".into(), path: format!("/admin/v1/models/{path}") };
    let (name, action) = path.rsplit_once('/').ok_or_else(unknown)?;
    let before = state.registry().state(name).ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?;
    match action {
        "load" => {
            state.registry().get(name).await?;
        }
        "unload" => {
            state.registry().unload(name)?;
        }
        _ => return Err(unknown()),
    }
    let after = card(&state, name, true)?;
    let now = state.registry().state(name);
    if now != Some(before) {
        let store = &state.tenancy().store;
        let (before, now) = (json!({"state": before}), json!({"state": now}));
        store.audit(&identity.actor(), &format!("model.{action}"), name, Some(&before), Some(&now)).await?;
    }
    Ok(axum::Json(after))
}
