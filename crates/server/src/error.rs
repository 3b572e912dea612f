//! Every error the HTTP edge can answer, and the one table that maps each to a status,
//! OpenAI's error `type` and a stable `code`. Turning an error into a response has no
//! side effects; the request log (see `app`) records it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferry_api::{ErrorBody, ErrorDetail};
use ferry_engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("We could not parse the JSON body of your request: {0}")]
    InvalidJson(String),
    /// A parameter that is missing, of the wrong type, or out of range (`code` says which:
    /// OpenAI's `missing_required_parameter`, `invalid_type` or `invalid_value`).
    #[error("{message}")]
    InvalidParameter { param: String, message: String, code: &'static str },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error(
        "This model's maximum context length is {limit} tokens. However, you requested {requested} tokens ({prompt} in the prompt, {completion} for the completion). Please reduce the length of the prompt or of max_tokens."
    )]
    ContextLengthExceeded {
        limit: usize,
        requested: usize,
        prompt: usize,
        completion: usize,
        /// The request's field holding the prompt (`messages`, completions' `prompt`).
        input: &'static str,
    },
    #[error("The request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("The server is busy: its request queue is full. Retry after {retry_after} seconds.")]
    QueueFull { retry_after: u64 },
    #[error("Unknown route: {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("Method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    #[error("The server is not ready: {0}")]
    NotReady(String),
    /// A configured local model that could not be made ready in time (loading, or failed to load).
    #[error("{0}")]
    ModelUnavailable(String),
    #[error("{0}")]
    Forbidden(String),
    /// A key limited to other models: 403 with OpenAI's `model_not_found`, as OpenAI answers
    /// a project without access to a model.
    #[error("This API key does not have access to model `{0}`.")]
    ModelForbidden(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A rate limit (`tokens` is false for requests per minute); `retry_after` is `None` for a
    /// request larger than the limit itself, which no wait lets through.
    #[error("{message}")]
    RateLimited {
        message: String,
        tokens: bool,
        retry_after: Option<u64>,
        headers: Box<axum::http::HeaderMap>,
    },
    /// The privacy policy refuses what the request holds (kinds only, never values).
    #[error("The request was blocked by the privacy policy: it contains {}.", .0.join(", "))]
    PiiBlocked(Vec<String>),
    /// A token or cost budget is spent.
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("The server had an error while processing your request: {0}")]
    Internal(String),
    /// An upstream provider's error, passed on with its status.
    #[error("{message}")]
    Upstream {
        status: u16,
        message: String,
        code: Option<String>,
        param: Option<String>,
        retry_after: Option<u64>,
    },
    #[error("The upstream provider could not be reached: {0}")]
    BadGateway(String),
    /// An upstream answer that could not be read (not its wire format, or cut short).
    #[error("The upstream provider's answer could not be read: {0}")]
    BadUpstreamAnswer(String),
    #[error("The upstream provider timed out: {0}")]
    GatewayTimeout(String),
    /// Every target of an alias has its circuit open: 503 with Retry-After.
    #[error("{message}; retry after {retry_after} s")]
    UpstreamUnavailable { message: String, retry_after: u64 },
    /// The request's deadline (`--request-timeout`, or its `x-ferry-timeout` header) passed.
    #[error("{}", deadline_message(*.admitted, *.completion_tokens))]
    DeadlineExceeded { admitted: bool, completion_tokens: usize },
}

fn deadline_message(admitted: bool, completion_tokens: usize) -> String {
    if admitted {
        format!(
            "The request did not finish before its deadline and was cancelled after {completion_tokens} generated tokens"
        )
    } else {
        "The request did not finish before its deadline: it was still waiting for a free sequence".to_string()
    }
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidParameter { param: param.into(), message: message.into(), code: "invalid_value" }
    }

    /// A required parameter the request lacks, as OpenAI words it.
    pub fn missing(param: impl Into<String>) -> Self {
        let param = param.into();
        let message = format!("Missing required parameter: '{param}'.");
        ApiError::InvalidParameter { param, message, code: "missing_required_parameter" }
    }

    /// Status, OpenAI error type, code and param of each error.
    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>, Option<String>) {
        use ApiError::*;
        match self {
            InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", Some("invalid_json"), None),
            InvalidParameter { param, code, .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", Some(*code), Some(param.clone()))
            }
            ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".into()),
            ),
            ContextLengthExceeded { input, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("context_length_exceeded"),
                Some((*input).into()),
            ),
            BodyTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", Some("request_too_large"), None)
            }
            QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("queue_full"), None),
            RouteNotFound { .. } => {
                (StatusCode::NOT_FOUND, "invalid_request_error", Some("unknown_url"), None)
            }
            MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", Some("method_not_allowed"), None)
            }
            NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("not_ready"), None),
            ModelUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("model_unavailable"),
                Some("model".into()),
            ),
            Forbidden(_) => (StatusCode::FORBIDDEN, "permission_error", Some("forbidden"), None),
            ModelForbidden(_) => (
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".into()),
            ),
            Unauthorized(_) => {
                (StatusCode::UNAUTHORIZED, "invalid_request_error", Some("invalid_api_key"), None)
            }
            NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found"), None),
            Conflict(_) => (StatusCode::CONFLICT, "invalid_request_error", Some("conflict"), None),
            // OpenAI's own shape: the type says which limit, the code is shared.
            RateLimited { tokens, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                if *tokens { "tokens" } else { "requests" },
                Some("rate_limit_exceeded"),
                None,
            ),
            PiiBlocked(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", Some("pii_blocked"), None),
            QuotaExceeded(_) => {
                (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", Some("insufficient_quota"), None)
            }
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("internal_error"), None),
            Upstream { status, code, param, .. } => {
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
                let kind = match status.as_u16() {
                    401 => "authentication_error",
                    403 => "permission_error",
                    404 | 400 | 409 | 413 | 422 => "invalid_request_error",
                    429 if code.as_deref() == Some("insufficient_quota") => "insufficient_quota",
                    429 => "rate_limit_error",
                    _ => "server_error",
                };
                let code: &'static str = match code.as_deref() {
                    Some("model_not_found") => "model_not_found",
                    Some("context_length_exceeded") => "context_length_exceeded",
                    Some("queue_full") => "queue_full",
                    Some("invalid_value") => "invalid_value",
                    Some("deadline_exceeded") => "deadline_exceeded",
                    Some("rate_limit_exceeded") => "rate_limit_exceeded",
                    Some("insufficient_quota") => "insufficient_quota",
                    Some("missing_required_parameter") => "missing_required_parameter",
                    Some("invalid_type") => "invalid_type",
                    Some("invalid_api_key") => "invalid_api_key",
                    Some("pii_blocked") => "pii_blocked",
                    _ => "upstream_error",
                };
                (status, kind, Some(code), param.clone())
            }
            BadGateway(_) => (StatusCode::BAD_GATEWAY, "server_error", Some("upstream_unreachable"), None),
            BadUpstreamAnswer(_) => {
                (StatusCode::BAD_GATEWAY, "server_error", Some("bad_upstream_response"), None)
            }
            UpstreamUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("upstream_unavailable"), None)
            }
            GatewayTimeout(_) => {
                (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("upstream_timeout"), None)
            }
            DeadlineExceeded { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("deadline_exceeded"), None)
            }
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    pub fn body(&self) -> ErrorBody {
        let (_, kind, code, param) = self.parts();
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: kind.to_string(),
                param,
                code: code.map(str::to_string),
            },
        }
    }
}

impl From<ferry_store::StoreError> for ApiError {
    fn from(e: ferry_store::StoreError) -> Self {
        use ferry_store::StoreError as S;
        match e {
            S::NotFound(what) => ApiError::NotFound(format!("No such {what}")),
            S::Conflict(m) => ApiError::Conflict(m),
            S::Invalid(m) => ApiError::invalid("body", m),
            S::Database(e) => ApiError::Internal(format!("the store failed: {e}")),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull => ApiError::QueueFull { retry_after: 1 },
            EngineError::InvalidRequest(message) => ApiError::invalid("n", message),
            EngineError::Template(t) => ApiError::invalid("messages", t.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<ferry_providers::ProviderError> for ApiError {
    fn from(e: ferry_providers::ProviderError) -> Self {
        use ferry_providers::ProviderError as P;
        let message = e.to_string();
        match e {
            P::Status { status, message, code, param, retry_after } => ApiError::Upstream {
                status,
                message,
                code,
                param,
                retry_after: retry_after.map(whole_seconds_up),
            },
            P::Connect(m) => ApiError::BadGateway(m),
            P::Timeout(what) => ApiError::GatewayTimeout(what.to_string()),
            P::Decode(m) => ApiError::BadUpstreamAnswer(m),
            P::Unsupported { param, .. } => ApiError::invalid(param, message),
            P::Refused { param, message } => ApiError::invalid(param, message),
        }
    }
}

/// A wait as `Retry-After`'s whole seconds, rounded up: the client waits at least as long as
/// asked.
fn whole_seconds_up(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

impl From<ferry_gateway::GatewayError> for ApiError {
    fn from(e: ferry_gateway::GatewayError) -> Self {
        match e {
            ferry_gateway::GatewayError::Upstream(p) => p.into(),
            ref circuit @ ferry_gateway::GatewayError::CircuitOpen { retry_after, .. } => {
                ApiError::UpstreamUnavailable {
                    message: circuit.to_string(),
                    // At least one second: the client waits until the first probe.
                    retry_after: whole_seconds_up(retry_after).max(1),
                }
            }
            other => ApiError::BadGateway(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        let retry_after = match &self {
            ApiError::QueueFull { retry_after } => Some(*retry_after),
            ApiError::RateLimited { retry_after, .. } => *retry_after,
            // An upstream's Retry-After reaches the client, whose SDK backs off by it.
            ApiError::Upstream { retry_after, .. } => *retry_after,
            ApiError::UpstreamUnavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        if let Some(retry_after) = retry_after
            && let Ok(value) = HeaderValue::from_str(&retry_after.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if let ApiError::ModelUnavailable(_) = &self {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        if let ApiError::RateLimited { headers, retry_after, .. } = &self {
            response.headers_mut().extend((**headers).clone());
            if retry_after.is_none() {
                // The official SDKs read this before retrying a 429: a request larger than
                // the limit would fail again after every wait.
                response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
            }
        }
        if let ApiError::QuotaExceeded(_) = &self {
            // A spent budget renews with the next day or month: no retry within the SDK's
            // backoff can pass.
            response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response.extensions_mut().insert(LoggedError(self.to_string()));
        response
    }
}

/// Carried on error responses so the request log can say what went wrong.
#[derive(Clone, Debug)]
pub struct LoggedError(pub String);
