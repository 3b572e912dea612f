//! `GET /openapi.json`: the OpenAPI 3.1 document of every route, generated from the code.
//!
//! The wire types derive their schemas (`ferry_api`, the store's records, the admin and
//! explanation types next to their handlers), each handler carries its `#[utoipa::path]`,
//! and [`Conventions`] adds what every route shares: bearer keys and the error answers of
//! [`ApiError`](crate::error::ApiError) in the dialect's shape. The document is built once.

use std::sync::OnceLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{AllOfBuilder, Schema};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Ferry",
        description = "Large models as a service: OpenAI's and Anthropic's APIs over local models and upstream \
                       providers, with tenants, keys, metering, guardrails and explanations. Routes under `/v1` \
                       that OpenAI or Anthropic also serve take and answer their wire format; Ferry's own \
                       additions are tagged `Ferry` (routes) or described as Ferry extensions (fields).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        crate::chat::chat_completions,
        crate::completions::completions,
        crate::responses::responses,
        crate::responses::input_tokens,
        crate::embeddings::embeddings,
        crate::models::list_models,
        crate::models::get_model,
        crate::models::admin_model,
        crate::messages::messages,
        crate::messages::count_tokens,
        crate::tokenize::tokenize,
        crate::tokenize::detokenize,
        crate::explain::explanations,
        crate::app::get_trace,
        crate::admin::whoami,
        crate::admin::create_tenant,
        crate::admin::list_tenants,
        crate::admin::get_tenant,
        crate::admin::update_tenant,
        crate::admin::create_project,
        crate::admin::list_projects,
        crate::admin::get_project,
        crate::admin::update_project,
        crate::admin::create_key,
        crate::admin::list_keys,
        crate::admin::get_key,
        crate::admin::update_key,
        crate::admin::revoke_key,
        crate::admin::usage,
        crate::admin::usage_series,
        crate::admin::list_traces,
        crate::admin::request_content,
        crate::admin::audit,
        crate::admin::verify_audit,
        crate::admin::list_replicas,
        crate::app::reload,
        crate::app::health,
        crate::app::ready,
        crate::telemetry::render,
        serve,
    ),
    components(schemas(
        // The two halves of chat completions' and completions' bodies (see `Conventions`).
        ferry_api::openai::ChatCompletionRequest,
        ferry_api::openai::CompletionRequest,
        ferry_api::openai::SamplingFields,
        ferry_api::ErrorBody,
        ferry_api::anthropic::ErrorBody,
        RequestTrace,
    )),
    modifiers(&Conventions),
    tags(
        (name = "OpenAI", description = "OpenAI's API: the official SDKs work unchanged"),
        (name = "Anthropic", description = "Anthropic's Messages API"),
        (name = "Ferry", description = "Ferry's extensions: explanations and request traces"),
        (name = "Admin", description = "Tenants, projects, keys, usage and the audit log"),
        (name = "Operations", description = "Health, readiness, metrics and this document"),
    ),
)]
struct ApiDoc;

/// The document, built on first use.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(ApiDoc::openapi)
}

#[utoipa::path(get, path = "/openapi.json", tag = "Operations", summary = "This document", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json",
        body = Object)))]
pub async fn serve() -> Response {
    static JSON: OnceLock<String> = OnceLock::new();
    let json = JSON.get_or_init(|| document().to_json().unwrap_or_else(|_| "{}".into()));
    let mut response = json.as_str().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `GET /v1/traces/{id}`: what happened to a request. Values are never recorded, only
/// what was done (guardrail actions are counted by kind).
#[derive(ToSchema)]
#[allow(dead_code)] // Only its schema is used: the trace is stored as JSON by `tenancy`.
pub(crate) struct RequestTrace {
    request_id: String,
    /// The route's path, e.g. `/v1/chat/completions`.
    route: Option<String>,
    /// The model (or alias) the client asked for.
    model: Option<String>,
    /// `ok`, `error` or `cancelled`.
    status: String,
    http_status: Option<u16>,
    tenant_id: Option<String>,
    project_id: Option<String>,
    key_id: Option<String>,
    /// Provider, upstream target, attempts, fallbacks and whether the cache answered.
    routing: Option<serde_json::Value>,
    /// The policy applied and the count of values redacted or blocked, by kind.
    guardrails: Option<serde_json::Value>,
    /// Milliseconds: total, first token, and for local models queue, prefill and decode;
    /// for upstream targets, upstream.
    timings: Option<serde_json::Value>,
    /// The sampling parameters used.
    sampling: Option<serde_json::Value>,
    /// Prompt, completion and cached token counts.
    tokens: Option<serde_json::Value>,
    /// The model's provenance: file sha256, architecture, parameters, quantization, licence, source.
    model_card: Option<serde_json::Value>,
}

/// What every route shares, added to the generated paths.
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A Ferry API key (`sk-ferry-...`), or the admin key. A server without keys \
                         serves loopback clients without one.",
                    ))
                    .build(),
            ),
        );
        // Chat completions and completions read their sampling fields in a second pass over
        // the same body (see `ferry_api::openai::SamplingFields`): the body is both.
        for (name, request) in [
            ("CreateChatCompletionRequest", "ChatCompletionRequest"),
            ("CreateCompletionRequest", "CompletionRequest"),
        ] {
            let both = AllOfBuilder::new()
                .item(Ref::from_schema_name(request))
                .item(Ref::from_schema_name("SamplingFields"))
                .build();
            components.schemas.insert(name.into(), RefOr::T(Schema::AllOf(both)));
        }
        let security =
            vec![utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new())];
        for (path, item) in doc.paths.paths.iter_mut() {
            let anthropic = path.starts_with("/v1/messages");
            let operations = [
                item.get.as_mut(),
                item.post.as_mut(),
                item.patch.as_mut(),
                item.put.as_mut(),
                item.delete.as_mut(),
            ];
            for operation in operations.into_iter().flatten() {
                // Only the public routes say `security(())` themselves.
                let public = operation.security.is_some();
                if !public {
                    operation.security = Some(security.clone());
                }
                add_errors(operation, path, anthropic, public);
            }
        }
    }
}

/// The error answers a route can give: every status the `ApiError` table maps to.
fn add_errors(operation: &mut Operation, path: &str, anthropic: bool, public: bool) {
    let body: RefOr<Schema> =
        RefOr::Ref(Ref::from_schema_name(if anthropic { "AnthropicErrorBody" } else { "ErrorBody" }));
    let mut statuses: Vec<(&str, &str)> = vec![("500", "The server had an error")];
    if path == "/ready" {
        statuses.push(("503", "No model is loaded"));
    }
    if !public && path != "/ready" {
        statuses.extend([
            ("400", "The request is not valid: the error names the parameter"),
            ("401", "A key is missing, unknown, revoked or expired"),
            ("403", "The key may not do this (role, or a model it is not allowed)"),
            ("404", "No such model, route or record (also for another tenant's)"),
            ("413", "The body is larger than the server's limit"),
            ("503", "The server is not ready, or the model could not be loaded in time (see `Retry-After`)"),
        ]);
    }
    if path.starts_with("/v1/") {
        statuses.extend([
            ("429", "A rate limit or budget is spent, or the queue is full (see `x-ratelimit-*` and `Retry-After`)"),
            ("502", "The upstream provider could not be reached"),
            ("504", "The upstream provider timed out"),
        ]);
    }
    if path.starts_with("/admin/") {
        statuses.push(("409", "The change conflicts with what is stored"));
    }
    if path.starts_with("/admin/v1/models/") {
        statuses.push(("429", "Too many requests are already waiting for this model to load"));
    }
    for (status, description) in statuses {
        if operation.responses.responses.contains_key(status) {
            continue;
        }
        let response = ResponseBuilder::new()
            .description(description)
            .content("application/json", ContentBuilder::new().schema(Some(body.clone())).build())
            .build();
        operation.responses.responses.insert(status.to_string(), RefOr::T(response));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_with_its_errors() {
        let doc = serde_json::to_value(document()).unwrap_or_default();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        for path in
            ["/v1/chat/completions", "/v1/explanations", "/v1/traces/{id}", "/admin/v1/keys", "/openapi.json"]
        {
            assert!(paths.contains_key(path), "{path} is missing");
        }
        let chat = &paths["/v1/chat/completions"]["post"];
        assert_eq!(
            chat["responses"]["401"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody"
        );
        assert!(chat["responses"]["200"]["content"]["text/event-stream"].is_object());
        let messages = &paths["/v1/messages"]["post"];
        assert_eq!(
            messages["responses"]["400"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/AnthropicErrorBody"
        );
        // Every reference resolves.
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().cloned().unwrap_or_default();
        for reference in text.split("\"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap_or_default();
            assert!(schemas.contains_key(name), "{name} is referenced but not defined");
        }
    }
}
