//! `POST /tokenize` and `POST /detokenize`, as vLLM serves them: a local model's tokens for a
//! prompt or a whole conversation (through its chat template), and the text of tokens. For
//! clients that budget a context or check a template without running the model. Behind keys
//! like `/v1`, unmetered.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use ferry_api::openai::ChatCompletionRequest;
use serde::{Deserialize, Serialize};

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::validate::parse_json;

/// A prompt (`prompt`) or a conversation (`messages`, with optional `tools`) to tokenize.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct TokenizeRequest {
    pub model: String,
    /// Text, tokenized as `/v1/completions` tokenizes a prompt.
    pub prompt: Option<String>,
    /// A chat conversation, rendered by the model's chat template first (as in `/v1/chat/completions`).
    #[schema(value_type = Option<Vec<Object>>)]
    pub messages: Option<serde_json::Value>,
    /// Whether the tokenizer adds the model's special tokens (BOS): true for a prompt by
    /// default; false for a conversation, whose template writes them.
    pub add_special_tokens: Option<bool>,
    /// With `messages`: end with the assistant's turn opened, as generation does (default true).
    pub add_generation_prompt: Option<bool>,
    /// Also answer each token's text.
    pub return_token_strs: Option<bool>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    /// The context length of a sequence of this model on this server.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct DetokenizeRequest {
    pub model: String,
    pub tokens: Vec<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[utoipa::path(post, path = "/tokenize", tag = "Ferry",
    summary = "Tokenize a prompt or a conversation (vLLM's route)",
    request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse)))]
pub async fn tokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body, &state)?;
    let request: TokenizeRequest = parse_json(&body)?;
    let model = state.model(&request.model).await?;
    let add_generation_prompt = request.add_generation_prompt.unwrap_or(true);
    let tokens = match (&request.prompt, &request.messages) {
        (Some(prompt), None) => model.backend.tokenize(prompt, request.add_special_tokens.unwrap_or(true)),
        (None, Some(_)) => {
            // The conversation is read as chat completions read theirs: the same roles,
            // content parts and tool definitions, the same errors and the same tokens.
            let chat: ChatCompletionRequest = parse_json(&body)?;
            let messages = crate::validate::chat_messages(&chat)?;
            let tools = crate::structured::tool_specs(&chat)?;
            let conversation = model
                .conversation_tokens(&messages, &tools, add_generation_prompt)
                .map_err(crate::generation::prompt_error)?;
            // The template writes BOS where the model wants one; asked, the tokenizer adds its own.
            let mut tokens = if request.add_special_tokens == Some(true) {
                model.backend.tokenize("", true)
            } else {
                Vec::new()
            };
            tokens.extend(conversation);
            tokens
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "Give either 'prompt' or 'messages', not both and not neither.",
            ));
        }
    };
    let token_strs = request
        .return_token_strs
        .unwrap_or(false)
        .then(|| tokens.iter().map(|&t| model.token_text(t)).collect());
    Ok(axum::Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.scheduler.config().session.ctx_per_sequence,
        tokens,
        token_strs,
    })
    .into_response())
}

#[utoipa::path(post, path = "/detokenize", tag = "Ferry",
    summary = "The text of tokens (vLLM's route)",
    request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse)))]
pub async fn detokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body, &state)?;
    let request: DetokenizeRequest = parse_json(&body)?;
    let model = state.model(&request.model).await?;
    let n_vocab = model.info().n_vocab;
    let mut bytes = Vec::new();
    for (i, &token) in request.tokens.iter().enumerate() {
        let id = u32::try_from(token).ok().filter(|&t| (t as usize) < n_vocab).ok_or_else(|| {
            ApiError::invalid(
                format!("tokens[{i}]"),
                format!("Invalid 'tokens[{i}]': {token} is not a token of this model (0 to {})", n_vocab - 1),
            )
        })?;
        bytes.extend_from_slice(model.backend.token_bytes(id));
    }
    Ok(axum::Json(DetokenizeResponse { prompt: String::from_utf8_lossy(&bytes).into_owned() })
        .into_response())
}
