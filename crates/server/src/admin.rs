//! The admin API (`/admin/v1/...`): tenants, projects, keys, usage and the audit log, as
//! JSON with OpenAI-shaped errors. An admin sees everything; a tenant admin sees its own
//! tenant, and another tenant's things answer 404 as if they did not exist. Every change is
//! written to the audit log with its actor and before/after state.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_store::tenants::{ProjectUpdate, TenantUpdate};
use ferry_store::usage::GroupBy;
use ferry_store::{Limits, NewKey, Role, UsageQuery};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::app::AppState;
use crate::error::ApiError;
use crate::tenancy::{Identity, admin_identity};
use crate::validate::Query;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/v1/whoami", get(whoami))
        .route("/admin/v1/tenants", get(list_tenants).post(create_tenant))
        .route("/admin/v1/tenants/{id}", get(get_tenant).patch(update_tenant))
        .route("/admin/v1/projects", get(list_projects).post(create_project))
        .route("/admin/v1/projects/{id}", get(get_project).patch(update_project))
        .route("/admin/v1/keys", get(list_keys).post(create_key))
        .route("/admin/v1/keys/{id}", get(get_key).patch(update_key))
        .route("/admin/v1/keys/{id}/revoke", post(revoke_key))
        .route("/admin/v1/usage", get(usage))
        .route("/admin/v1/usage/series", get(usage_series))
        .route("/admin/v1/traces", get(list_traces))
        .route("/admin/v1/audit", get(audit))
        .route("/admin/v1/audit/verify", get(verify_audit))
        .route("/admin/v1/replicas", get(list_replicas))
        .route("/admin/v1/requests/{id}/content", get(request_content))
}

/// The caller, already checked to be an admin or a tenant admin.
struct Caller(Identity);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller
where
    AppState: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        let app = <AppState as axum::extract::FromRef<S>>::from_ref(state);
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .ok_or_else(|| ApiError::Internal("the peer address is unknown".into()))?;
        Ok(Caller(admin_identity(&app, peer, &parts.headers).await?))
    }
}

impl Caller {
    fn require_admin(&self) -> Result<(), ApiError> {
        if self.0.role() == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden("This needs an admin key.".into()))
        }
    }

    /// 404 for a tenant's thing the caller may not see: its existence doesn't leak.
    fn check_tenant(&self, tenant: Option<&str>, what: &str) -> Result<(), ApiError> {
        if self.0.sees_tenant(tenant) { Ok(()) } else { Err(ApiError::NotFound(format!("No such {what}"))) }
    }
}

async fn record(
    state: &AppState,
    caller: &Caller,
    action: &str,
    target: &str,
    before: Option<Value>,
    after: Option<Value>,
) -> Result<(), ApiError> {
    state.tenancy().store.audit(&caller.0.actor(), action, target, before.as_ref(), after.as_ref()).await?;
    Ok(())
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `{"object": "list", "data": [...]}`, as OpenAI lists things.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct List<T> {
    /// Always `list`.
    object: &'static str,
    data: Vec<T>,
}

fn list<T>(data: Vec<T>) -> Json<List<T>> {
    Json(List { object: "list", data })
}

/// The caller's own key and role.
#[derive(Serialize, utoipa::ToSchema)]
struct WhoAmI {
    role: Role,
    tenant_id: Option<String>,
    /// The caller's key (none for a loopback client of a server without keys).
    key: Option<ferry_store::ApiKey>,
    /// Whether `/v1` routes need a key.
    auth_required: bool,
}

/// A new key: the stored record and, this once, its secret.
#[derive(Serialize, utoipa::ToSchema)]
struct CreatedKey {
    #[serde(flatten)]
    record: ferry_store::ApiKey,
    /// The secret (`sk-ferry-...`): it is not stored and is never shown again.
    key: String,
    warning: &'static str,
}

#[utoipa::path(get, path = "/admin/v1/whoami", tag = "Admin", summary = "The caller's key and role",
    responses((status = 200, body = WhoAmI)))]
async fn whoami(State(state): State<AppState>, caller: Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        role: caller.0.role(),
        tenant_id: caller.0.tenant_id().map(String::from),
        auth_required: state.tenancy().auth_required(),
        key: caller.0.key.as_deref().cloned(),
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    guardrail_policy: Option<String>,
    #[serde(default)]
    retain_content: Option<bool>,
    #[serde(default)]
    retention_days: Option<i64>,
}

#[utoipa::path(post, path = "/admin/v1/tenants", tag = "Admin", summary = "Create a tenant (admin)", request_body = NewTenant, responses((status = 201, body = ferry_store::Tenant)))]
async fn create_tenant(
    State(state): State<AppState>,
    caller: Caller,
    bytes: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_admin()?;
    let new: NewTenant = crate::validate::parse_json(&bytes)?;
    state.tenancy().check_policy(new.guardrail_policy.as_deref(), "guardrail_policy")?;
    let store = &state.tenancy().store;
    let mut tenant = store.create_tenant(&new.name, &new.limits).await?;
    if new.guardrail_policy.is_some() || new.retain_content.is_some() || new.retention_days.is_some() {
        let update = TenantUpdate {
            guardrail_policy: new.guardrail_policy.map(Some),
            retain_content: new.retain_content,
            retention_days: new.retention_days.map(Some),
            ..Default::default()
        };
        tenant = store.update_tenant(&tenant.id, &update).await?;
    }
    record(&state, &caller, "tenant.create", &tenant.id, None, Some(to_value(&tenant))).await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

#[utoipa::path(get, path = "/admin/v1/tenants", tag = "Admin", summary = "List the tenants the caller sees", responses((status = 200, body = List<ferry_store::Tenant>)))]
async fn list_tenants(State(state): State<AppState>, caller: Caller) -> Result<impl IntoResponse, ApiError> {
    let tenants = state.tenancy().store.tenants().await?;
    Ok(list(tenants.into_iter().filter(|t| caller.0.sees_tenant(Some(&t.id))).collect()))
}

#[utoipa::path(get, path = "/admin/v1/tenants/{id}", tag = "Admin", summary = "Retrieve a tenant", params(("id" = String, Path)), responses((status = 200, body = ferry_store::Tenant)))]
async fn get_tenant(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.check_tenant(Some(&id), &format!("tenant '{id}'"))?;
    Ok(Json(state.tenancy().store.tenant(&id).await?))
}

#[utoipa::path(patch, path = "/admin/v1/tenants/{id}", tag = "Admin", summary = "Change a tenant's limits, policy or retention (admin)", params(("id" = String, Path)), request_body = TenantUpdate, responses((status = 200, body = ferry_store::Tenant)))]
async fn update_tenant(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    caller.check_tenant(Some(&id), &format!("tenant '{id}'"))?;
    // A tenant's limits and policy are set above it.
    caller.require_admin()?;
    let update: TenantUpdate = crate::validate::parse_json(&bytes)?;
    state.tenancy().check_policy(update.guardrail_policy.clone().flatten().as_deref(), "guardrail_policy")?;
    let store = &state.tenancy().store;
    let before = store.tenant(&id).await?;
    let after = store.update_tenant(&id, &update).await?;
    record(&state, &caller, "tenant.update", &id, Some(to_value(&before)), Some(to_value(&after))).await?;
    state.tenancy().refresh().await?;
    Ok(Json(after))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewProject {
    tenant_id: String,
    name: String,
    #[serde(default)]
    limits: Limits,
}

#[utoipa::path(post, path = "/admin/v1/projects", tag = "Admin", summary = "Create a project", request_body = NewProject, responses((status = 201, body = ferry_store::Project)))]
async fn create_project(
    State(state): State<AppState>,
    caller: Caller,
    bytes: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let new: NewProject = crate::validate::parse_json(&bytes)?;
    caller.check_tenant(Some(&new.tenant_id), &format!("tenant '{}'", new.tenant_id))?;
    let project = state.tenancy().store.create_project(&new.tenant_id, &new.name, &new.limits).await?;
    record(&state, &caller, "project.create", &project.id, None, Some(to_value(&project))).await?;
    Ok((StatusCode::CREATED, Json(project)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct TenantFilter {
    /// Only this tenant's (an admin's filter; a tenant admin always sees its own).
    tenant_id: Option<String>,
}

#[utoipa::path(get, path = "/admin/v1/projects", tag = "Admin", summary = "List projects", params(TenantFilter), responses((status = 200, body = List<ferry_store::Project>)))]
async fn list_projects(
    State(state): State<AppState>,
    caller: Caller,
    Query(filter): Query<TenantFilter>,
) -> Result<impl IntoResponse, ApiError> {
    let tenant = filter.tenant_id.as_deref().or(caller.0.tenant_id());
    let projects = state.tenancy().store.projects(tenant).await?;
    Ok(list(projects.into_iter().filter(|p| caller.0.sees_tenant(Some(&p.tenant_id))).collect()))
}

#[utoipa::path(get, path = "/admin/v1/projects/{id}", tag = "Admin", summary = "Retrieve a project", params(("id" = String, Path)), responses((status = 200, body = ferry_store::Project)))]
async fn get_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let project = state.tenancy().store.project(&id).await?;
    caller.check_tenant(Some(&project.tenant_id), &format!("project '{id}'"))?;
    Ok(Json(project))
}

#[utoipa::path(patch, path = "/admin/v1/projects/{id}", tag = "Admin", summary = "Change a project's limits or policy", params(("id" = String, Path)), request_body = ProjectUpdate, responses((status = 200, body = ferry_store::Project)))]
async fn update_project(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let store = &state.tenancy().store;
    let before = store.project(&id).await?;
    caller.check_tenant(Some(&before.tenant_id), &format!("project '{id}'"))?;
    let update: ProjectUpdate = crate::validate::parse_json(&bytes)?;
    state.tenancy().check_policy(update.guardrail_policy.clone().flatten().as_deref(), "guardrail_policy")?;
    let after = store.update_project(&id, &update).await?;
    record(&state, &caller, "project.update", &id, Some(to_value(&before)), Some(to_value(&after))).await?;
    state.tenancy().refresh().await?;
    Ok(Json(after))
}

#[utoipa::path(post, path = "/admin/v1/keys", tag = "Admin", summary = "Create an API key (its secret is shown once)", request_body = NewKey, responses((status = 201, body = CreatedKey)))]
async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    bytes: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let mut new: NewKey = crate::validate::parse_json(&bytes)?;
    let store = &state.tenancy().store;
    if caller.0.role() != Role::Admin {
        if new.role == Role::Admin {
            return Err(ApiError::Forbidden("A tenant admin can't create admin keys.".into()));
        }
        // A tenant admin's keys belong to its own tenant.
        match (&new.tenant_id, &new.project_id) {
            (Some(t), _) => caller.check_tenant(Some(t), &format!("tenant '{t}'"))?,
            (None, Some(p)) => {
                let project = store
                    .project(p)
                    .await
                    .map_err(|_| ApiError::NotFound(format!("No such project '{p}'")))?;
                caller.check_tenant(Some(&project.tenant_id), &format!("project '{p}'"))?;
            }
            (None, None) => new.tenant_id = caller.0.tenant_id().map(String::from),
        }
    }
    if new.expires_at.is_some_and(|at| at <= ferry_store::now_ms()) {
        return Err(ApiError::invalid(
            "expires_at",
            "expires_at must be in the future (milliseconds since the epoch)",
        ));
    }
    // The first key turns authentication on for good: without an admin key among them,
    // nobody could manage the server any more.
    if new.role != Role::Admin && !store.has_active_admin_key().await? {
        return Err(ApiError::Conflict(
            "Create an admin key first (or start the server with FERRY_ADMIN_KEY): once a key exists, every \
             request needs one, and the admin API an admin key."
                .into(),
        ));
    }
    let (key, secret) = store.create_key(&new).await?;
    record(&state, &caller, "key.create", &key.id, None, Some(to_value(&key))).await?;
    state.tenancy().refresh().await?;
    let shown = CreatedKey {
        record: key,
        key: secret,
        warning: "This is the only time the key is shown; store it now.",
    };
    Ok((StatusCode::CREATED, Json(shown)))
}

#[utoipa::path(get, path = "/admin/v1/keys", tag = "Admin", summary = "List keys (never their secrets)", params(TenantFilter), responses((status = 200, body = List<ferry_store::ApiKey>)))]
async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    Query(filter): Query<TenantFilter>,
) -> Result<impl IntoResponse, ApiError> {
    let tenant = filter.tenant_id.as_deref().or(caller.0.tenant_id());
    let keys = state.tenancy().store.keys(tenant).await?;
    Ok(list(keys.into_iter().filter(|k| caller.0.sees_tenant(k.tenant_id.as_deref())).collect()))
}

async fn owned_key(state: &AppState, caller: &Caller, id: &str) -> Result<ferry_store::ApiKey, ApiError> {
    let key = state.tenancy().store.key(id).await?;
    caller.check_tenant(key.tenant_id.as_deref(), &format!("key '{id}'"))?;
    Ok(key)
}

#[utoipa::path(get, path = "/admin/v1/keys/{id}", tag = "Admin", summary = "Retrieve a key", params(("id" = String, Path)), responses((status = 200, body = ferry_store::ApiKey)))]
async fn get_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(owned_key(&state, &caller, &id).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct KeyUpdate {
    limits: Limits,
}

#[utoipa::path(patch, path = "/admin/v1/keys/{id}", tag = "Admin", summary = "Set a key's limits", params(("id" = String, Path)), request_body = KeyUpdate, responses((status = 200, body = ferry_store::ApiKey)))]
async fn update_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let before = owned_key(&state, &caller, &id).await?;
    let update: KeyUpdate = crate::validate::parse_json(&bytes)?;
    let after = state.tenancy().store.set_key_limits(&id, &update.limits).await?;
    record(&state, &caller, "key.limits", &id, Some(to_value(&before)), Some(to_value(&after))).await?;
    state.tenancy().refresh().await?;
    Ok(Json(after))
}

#[utoipa::path(post, path = "/admin/v1/keys/{id}/revoke", tag = "Admin", summary = "Revoke a key", params(("id" = String, Path)), responses((status = 200, body = ferry_store::ApiKey)))]
async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let before = owned_key(&state, &caller, &id).await?;
    let after = state.tenancy().store.revoke_key(&id).await?;
    record(&state, &caller, "key.revoke", &id, Some(to_value(&before)), Some(to_value(&after))).await?;
    state.tenancy().refresh().await?;
    Ok(Json(after))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct UsageParams {
    /// Comma-separated: tenant, project, key, model, day.
    group_by: Option<String>,
    /// Milliseconds since the epoch.
    from: Option<i64>,
    to: Option<i64>,
    tenant_id: Option<String>,
    /// `json` (default) or `csv`.
    format: Option<String>,
}

#[utoipa::path(get, path = "/admin/v1/usage", tag = "Admin", summary = "Usage aggregated by tenant, project, key, model and day", params(UsageParams), responses((status = 200, description = "Usage groups, as JSON or CSV", content((List<ferry_store::UsageGroup> = "application/json"), (String = "text/csv")))))]
async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<UsageParams>,
) -> Result<Response, ApiError> {
    let mut group_by = Vec::new();
    for name in params.group_by.as_deref().unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()) {
        group_by.push(GroupBy::parse(name).ok_or_else(|| {
            ApiError::invalid("group_by", format!("'{name}' is not one of tenant, project, key, model, day"))
        })?);
    }
    if let (Some(from), Some(to)) = (params.from, params.to)
        && from > to
    {
        return Err(ApiError::invalid("from", "'from' must not be after 'to'"));
    }
    let tenant_id = report_tenant(&caller, params.tenant_id)?;
    let query = UsageQuery { tenant_id, from_ms: params.from, to_ms: params.to, group_by: group_by.clone() };
    // Read this replica's own writes: records still gathering for the next group commit.
    state.tenancy().settle_writes().await;
    let rows = state.tenancy().store.usage(&query).await?;
    match params.format.as_deref().unwrap_or("json") {
        "json" => Ok(list(rows).into_response()),
        "csv" => {
            let mut columns: Vec<&str> = group_by
                .iter()
                .map(|g| match g {
                    GroupBy::Tenant => "tenant_id",
                    GroupBy::Project => "project_id",
                    GroupBy::Key => "key_id",
                    GroupBy::Model => "model",
                    GroupBy::Day => "day",
                })
                .collect();
            columns.extend([
                "requests",
                "errors",
                "prompt_tokens",
                "completion_tokens",
                "cached_tokens",
                "cost",
            ]);
            let mut out = columns.join(",") + "\n";
            for row in rows {
                let value = to_value(&row);
                let cells: Vec<String> = columns.iter().map(|c| csv_cell(&value[*c])).collect();
                out.push_str(&cells.join(","));
                out.push('\n');
            }
            let mut response = out.into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
            response.headers_mut().insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"usage.csv\""),
            );
            Ok(response)
        }
        other => Err(ApiError::invalid("format", format!("'{other}' is not json or csv"))),
    }
}

/// The tenant a report is narrowed to: the one asked for by an admin, a tenant admin's own.
fn report_tenant(caller: &Caller, asked: Option<String>) -> Result<Option<String>, ApiError> {
    match (caller.0.role(), asked) {
        (Role::Admin, asked) => Ok(asked),
        // Another tenant doesn't exist for a tenant admin: the 404 any of its things gets.
        (_, Some(asked)) if Some(asked.as_str()) != caller.0.tenant_id() => {
            Err(ApiError::NotFound(format!("No such tenant '{asked}'")))
        }
        _ => Ok(caller.0.tenant_id().map(String::from)),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SeriesParams {
    /// `minute`, `hour` (default) or `day`.
    bucket: Option<String>,
    /// Milliseconds since the epoch; by default the last 60 minutes, 24 hours or 30 days.
    from: Option<i64>,
    to: Option<i64>,
    tenant_id: Option<String>,
}

/// Usage over time, for the overview's charts.
#[derive(Serialize, utoipa::ToSchema)]
struct UsageSeries {
    /// Always `list`.
    object: &'static str,
    /// `minute`, `hour` or `day`.
    bucket: String,
    bucket_ms: i64,
    from: i64,
    to: i64,
    /// One point per bucket, every bucket present.
    data: Vec<ferry_store::reports::SeriesPoint>,
    /// The whole range as one point.
    total: ferry_store::reports::SeriesPoint,
}

#[utoipa::path(get, path = "/admin/v1/usage/series", tag = "Admin", summary = "Usage per time bucket (requests, errors, tokens, cost, latency percentiles)", params(SeriesParams), responses((status = 200, body = UsageSeries)))]
/// `GET /admin/v1/usage/series`: requests, errors, tokens, cost and latency percentiles per
/// time bucket, every bucket present, for the overview's charts.
async fn usage_series(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<SeriesParams>,
) -> Result<impl IntoResponse, ApiError> {
    let bucket = params.bucket.as_deref().unwrap_or("hour");
    let (bucket_ms, default_buckets) = match bucket {
        "minute" => (60_000, 60),
        "hour" => (3_600_000, 24),
        "day" => (86_400_000, 30),
        other => return Err(ApiError::invalid("bucket", format!("'{other}' is not minute, hour or day"))),
    };
    let to = params.to.unwrap_or_else(ferry_store::now_ms);
    let from = params.from.unwrap_or(to - bucket_ms * default_buckets);
    if from >= to {
        return Err(ApiError::invalid("from", "'from' must be before 'to'"));
    }
    let query = ferry_store::reports::SeriesQuery {
        tenant_id: report_tenant(&caller, params.tenant_id)?,
        from_ms: from,
        to_ms: to,
        bucket_ms,
    };
    state.tenancy().settle_writes().await;
    let series = state.tenancy().store.usage_series(&query).await.map_err(|e| match e {
        ferry_store::StoreError::Invalid(m) => ApiError::invalid("bucket", m),
        other => other.into(),
    })?;
    Ok(Json(UsageSeries {
        object: "list",
        bucket: bucket.to_string(),
        bucket_ms,
        from,
        to,
        data: series.buckets,
        total: series.total,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct TraceParams {
    /// Milliseconds since the epoch (inclusive, exclusive), of the request's start.
    from: Option<i64>,
    to: Option<i64>,
    /// Request ids starting with this.
    id: Option<String>,
    /// Most rows (default 100, at most 1000), newest first.
    limit: Option<u32>,
    tenant_id: Option<String>,
}

#[utoipa::path(get, path = "/admin/v1/traces", tag = "Admin", summary = "Search traces by time and request id", params(TraceParams), responses((status = 200, body = List<ferry_store::reports::TraceSummary>)))]
/// `GET /admin/v1/traces`: traces newest first, by time and request-id prefix; a tenant
/// admin sees its own tenant's only. The whole trace is `GET /v1/traces/{id}`.
async fn list_traces(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<TraceParams>,
) -> Result<impl IntoResponse, ApiError> {
    let query = ferry_store::reports::TraceQuery {
        tenant_id: report_tenant(&caller, params.tenant_id)?,
        from_ms: params.from,
        to_ms: params.to,
        id_prefix: params.id.map(|id| id.trim().to_string()),
        limit: params.limit.unwrap_or(100).clamp(1, 1000),
    };
    state.tenancy().settle_writes().await;
    Ok(list(state.tenancy().store.traces(&query).await?))
}

fn csv_cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) if s.contains([',', '"', '\n']) => format!("\"{}\"", s.replace('"', "\"\"")),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[utoipa::path(get, path = "/admin/v1/requests/{id}/content", tag = "Admin", summary = "A request's retained content (tenants that keep content)", params(("id" = String, Path)), responses((status = 200, body = ferry_store::content::Content)))]
/// A request's retained content (tenants that keep content only).
async fn request_content(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let content = state.tenancy().store.content(&id).await?;
    caller.check_tenant(Some(&content.tenant_id), &format!("retained content of request '{id}'"))?;
    Ok(Json(content))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    /// Most entries (1 to 1000, default 100), newest first.
    limit: Option<u32>,
    /// Entries before this sequence number (paging).
    before: Option<i64>,
}

#[utoipa::path(get, path = "/admin/v1/audit", tag = "Admin", summary = "The audit log, newest first (admin)", params(AuditParams), responses((status = 200, body = List<ferry_store::AuditEntry>)))]
async fn audit(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<AuditParams>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_admin()?;
    let limit = params.limit.unwrap_or(100).clamp(1, 1000);
    Ok(list(state.tenancy().store.audit_entries(limit, params.before).await?))
}

#[utoipa::path(get, path = "/admin/v1/audit/verify", tag = "Admin", summary = "Check the audit log's hash chain (admin)", responses((status = 200, body = ferry_store::AuditVerification)))]
async fn verify_audit(State(state): State<AppState>, caller: Caller) -> Result<impl IntoResponse, ApiError> {
    caller.require_admin()?;
    Ok(Json(state.tenancy().store.verify_audit().await?))
}

#[utoipa::path(get, path = "/admin/v1/replicas", tag = "Admin",
    summary = "The servers sharing this database, by their last heartbeat (admin)",
    responses((status = 200, body = List<ferry_store::Replica>)))]
async fn list_replicas(State(state): State<AppState>, caller: Caller) -> Result<impl IntoResponse, ApiError> {
    caller.require_admin()?;
    let lease = state.tenancy().replica_lease.as_millis() as i64;
    Ok(list(state.tenancy().store.replicas(lease).await?))
}
