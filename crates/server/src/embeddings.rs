//! `POST /v1/embeddings`: OpenAI's embeddings API over the sentence-embedding model
//! (`ferry_embed`), its vectors as floats or as base64 of little-endian `f32`s.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ferry_api::embeddings::{
    EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, EmbeddingVector, EncodingFormat,
};
use ferry_api::openai::{Model, Prompt};
use ferry_embed::{EmbedInput, EmbedService, Embedder};
use serde_json::json;

use crate::app::{AppState, read_body};
use crate::error::ApiError;
use crate::validate;

#[utoipa::path(post, path = "/v1/embeddings", tag = "OpenAI",
    summary = "Create embeddings",
    request_body = EmbeddingRequest,
    responses((status = 200, body = EmbeddingResponse)))]
pub async fn embeddings(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body, &state)?;
    let body = validate::parse_body(&body)?;
    let request: EmbeddingRequest = validate::parse_json(&body)?;
    let service = embedding_model(&state, &request.model)?;
    let embedder = service.embedder();
    let format = request.encoding_format.unwrap_or_default();
    if let Some(dimensions) = request.dimensions
        && usize::try_from(dimensions).ok() != Some(embedder.dims())
    {
        return Err(ApiError::invalid(
            "dimensions",
            format!(
                "Invalid 'dimensions': {dimensions}. The model `{}` gives vectors of {} dimensions and \
                 cannot shorten them; leave 'dimensions' out or set it to {}",
                embedder.name(),
                embedder.dims(),
                embedder.dims()
            ),
        ));
    }
    let inputs = inputs(request.input, embedder)?;
    let output = service.embed(inputs).await.map_err(|e| {
        if e.is_client_error() {
            ApiError::invalid("input", format!("Invalid 'input': {e}"))
        } else {
            ApiError::Internal(e.to_string())
        }
    })?;
    let n_tokens = output.n_tokens as u64;
    if let Some(meter) = crate::tenancy::current() {
        meter.set_provider("local");
        meter.add_prompt_tokens(n_tokens);
    }
    let data = output
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| EmbeddingData {
            object: "embedding".into(),
            index,
            embedding: match format {
                EncodingFormat::Float => EmbeddingVector::Float(embedding.vector),
                EncodingFormat::Base64 => EmbeddingVector::Base64(base64_f32(&embedding.vector)),
            },
        })
        .collect();
    Ok(axum::Json(EmbeddingResponse {
        object: "list".into(),
        data,
        model: embedder.name().to_string(),
        usage: EmbeddingUsage { prompt_tokens: n_tokens, total_tokens: n_tokens },
    })
    .into_response())
}

/// The embedding service for a request's `model`: 404 for a name the server does not know,
/// 400 for one of its text-generation models.
fn embedding_model(state: &AppState, id: &str) -> Result<EmbedService, ApiError> {
    if let Some(service) = state.embeddings()
        && service.embedder().name() == id
    {
        return Ok(service.clone());
    }
    let generative = state.registry().contains(id)
        || state.gateway().is_some_and(|g| g.has_alias(id) || g.preset(id).is_some());
    if !generative {
        return Err(ApiError::ModelNotFound(id.to_string()));
    }
    let served = match state.embeddings() {
        Some(service) => format!("the embedding model of this server is `{}`", service.embedder().name()),
        None => "this server serves no embedding model (see `ferry serve --embedding-model`)".to_string(),
    };
    Err(ApiError::invalid("model", format!("The model `{id}` does not support embeddings: {served}")))
}

/// The error for a text-generation route called with the embedding model.
pub(crate) fn not_generative(id: &str) -> ApiError {
    ApiError::invalid(
        "model",
        format!(
            "The model `{id}` is an embedding model: use it with POST /v1/embeddings, not to generate text"
        ),
    )
}

/// OpenAI's `input` as the embedder's inputs; token ids must fit a `u32` (the embedder checks
/// them against its vocabulary).
fn inputs(input: Prompt, embedder: &Embedder) -> Result<Vec<EmbedInput>, ApiError> {
    let tokens = |index: usize, ids: Vec<i64>| -> Result<EmbedInput, ApiError> {
        ids.into_iter()
            .map(|id| {
                u32::try_from(id).map_err(|_| {
                    ApiError::invalid(
                        "input",
                        format!(
                            "Invalid 'input': input[{index}] holds token id {id}, outside this model's \
                             vocabulary (0 to {})",
                            embedder.vocab_size().saturating_sub(1)
                        ),
                    )
                })
            })
            .collect::<Result<Vec<u32>, ApiError>>()
            .map(EmbedInput::Tokens)
    };
    match input {
        Prompt::Text(text) => Ok(vec![EmbedInput::Text(text)]),
        Prompt::Texts(texts) => Ok(texts.into_iter().map(EmbedInput::Text).collect()),
        Prompt::Tokens(ids) => Ok(vec![tokens(0, ids)?]),
        Prompt::TokenLists(lists) => lists.into_iter().enumerate().map(|(i, ids)| tokens(i, ids)).collect(),
    }
}

/// The vector's little-endian `f32` bytes in standard base64, as OpenAI sends them.
fn base64_f32(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The embedding model's entry in `GET /v1/models`.
pub(crate) fn model_card(service: &EmbedService, created: u64) -> Model {
    let embedder = service.embedder();
    let details = json!({
        "type": "embedding",
        "architecture": "bert",
        "dimensions": embedder.dims(),
        "context_length": embedder.max_tokens(),
        "vocab_size": embedder.vocab_size(),
        "state": "loaded",
    });
    Model {
        id: embedder.name().to_string(),
        object: "model".into(),
        created,
        owned_by: "ferry".into(),
        details: serde_json::from_value(details).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        // 1.0f32 is 0x3f800000; -2.0f32 is 0xc0000000.
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
        assert_eq!(base64_f32(&[]), "");
    }
}
