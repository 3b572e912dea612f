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
use ferry_engine::{EngineError, TokenId};

#[utoipa::path(post, path = "/v1/embeddings", tag = "OpenAI",
    summary = "Create embeddings",
    request_body = EmbeddingRequest,
    responses((status = 200, body = EmbeddingResponse)))]
pub async fn embeddings(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body, &state)?;
    let request: EmbeddingRequest = validate::parse_json(&body)?;
    if state.registry().contains(&request.model) {
        return lm_embeddings(&state, request).await;
    }
    let service = embedding_model(&state, &request.model)?;
    let embedder = service.embedder();
    let format = request.encoding_format.unwrap_or_default();
    check_dimensions(request.dimensions, embedder.name(), embedder.dims())?;
    let inputs = inputs(request.input, embedder)?;
    let output = service.embed(inputs).await.map_err(|e| {
        if e.is_client_error() {
            ApiError::invalid("input", format!("Invalid 'input': {e}"))
        } else {
            ApiError::Internal(e.to_string())
        }
    })?;
    let vectors = output.embeddings.into_iter().map(|e| e.vector).collect();
    Ok(answer(embedder.name(), vectors, output.n_tokens as u64, format))
}

/// The answer to an embeddings request, metered.
fn answer(model: &str, vectors: Vec<Vec<f32>>, n_tokens: u64, format: EncodingFormat) -> Response {
    if let Some(meter) = crate::tenancy::current() {
        meter.set_provider("local");
        meter.add_prompt_tokens(n_tokens);
    }
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| EmbeddingData {
            object: "embedding".into(),
            index,
            embedding: match format {
                EncodingFormat::Float => EmbeddingVector::Float(vector),
                EncodingFormat::Base64 => EmbeddingVector::Base64(base64_f32(&vector)),
            },
        })
        .collect();
    axum::Json(EmbeddingResponse {
        object: "list".into(),
        data,
        model: model.to_string(),
        usage: EmbeddingUsage { prompt_tokens: n_tokens, total_tokens: n_tokens },
    })
    .into_response()
}

/// The 400 for `dimensions` other than the model's own.
fn check_dimensions(dimensions: Option<i64>, model: &str, dims: usize) -> Result<(), ApiError> {
    match dimensions {
        Some(d) if usize::try_from(d).ok() != Some(dims) => Err(ApiError::invalid(
            "dimensions",
            format!(
                "Invalid 'dimensions': {d}. The model `{model}` gives vectors of {dims} dimensions and \
                 cannot shorten them; leave 'dimensions' out or set it to {dims}"
            ),
        )),
        _ => Ok(()),
    }
}

/// Embeddings from a local generative model (GGUF): its hidden states pooled as its
/// configuration says (`pooling`: mean by default, or last token), L2-normalised.
async fn lm_embeddings(state: &AppState, request: EmbeddingRequest) -> Result<Response, ApiError> {
    let model = state.model(&request.model).await?;
    let id = model.info().id.clone();
    check_dimensions(request.dimensions, &id, model.info().n_embd)?;
    let format = request.encoding_format.unwrap_or_default();
    let vocab = model.info().n_vocab;
    let token_ids = |index: usize, ids: Vec<i64>| -> Result<Vec<TokenId>, ApiError> {
        ids.into_iter()
            .map(|id| {
                TokenId::try_from(id)
                    .ok()
                    .filter(|&t| (t as usize) < vocab)
                    .ok_or_else(|| outside_vocabulary(index, id, vocab))
            })
            .collect()
    };
    let empty = match &request.input {
        Prompt::Texts(t) if t.is_empty() => Some("'input' must not be an empty list".to_string()),
        Prompt::TokenLists(t) if t.is_empty() => Some("'input' must not be an empty list".to_string()),
        Prompt::Text(t) if t.is_empty() => Some("'input' must not be an empty string".to_string()),
        Prompt::Texts(t) => {
            t.iter().position(String::is_empty).map(|i| format!("input[{i}] is an empty string"))
        }
        Prompt::Tokens(t) if t.is_empty() => Some("'input' must not be an empty list".to_string()),
        Prompt::TokenLists(t) => {
            t.iter().position(Vec::is_empty).map(|i| format!("input[{i}] holds no tokens"))
        }
        _ => None,
    };
    if let Some(message) = empty {
        return Err(ApiError::invalid("input", format!("Invalid 'input': {message}")));
    }
    let texts = match request.input {
        Prompt::Text(text) => vec![text],
        Prompt::Texts(texts) => texts,
        Prompt::Tokens(ids) => return lm_embed(&model, vec![token_ids(0, ids)?], format).await,
        Prompt::TokenLists(lists) => {
            let sequences =
                lists.into_iter().enumerate().map(|(i, ids)| token_ids(i, ids)).collect::<Result<_, _>>()?;
            return lm_embed(&model, sequences, format).await;
        }
    };
    let sequences = {
        let model = model.clone();
        tokio::task::spawn_blocking(move || texts.iter().map(|t| model.backend.tokenize(t, true)).collect())
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
    };
    lm_embed(&model, sequences, format).await
}

/// Runs token sequences through a generative model's embedding thread.
async fn lm_embed(
    model: &std::sync::Arc<ferry_engine::LocalModel>,
    sequences: Vec<Vec<TokenId>>,
    format: EncodingFormat,
) -> Result<Response, ApiError> {
    let n_tokens = sequences.iter().map(Vec::len).sum::<usize>() as u64;
    let embedder = {
        let model = model.clone();
        tokio::task::spawn_blocking(move || model.embedder().cloned())
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??
    };
    let vectors = embedder.embed(sequences).await.map_err(|e| match e {
        EngineError::InvalidRequest(message) => {
            ApiError::invalid("input", format!("Invalid 'input': {message}"))
        }
        other => ApiError::from(other),
    })?;
    Ok(answer(&model.info().id, vectors, n_tokens, format))
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
                u32::try_from(id).map_err(|_| outside_vocabulary(index, id, embedder.vocab_size() as usize))
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

/// The 400 for a token id of `input[index]` that the model's vocabulary lacks.
fn outside_vocabulary(index: usize, id: i64, vocab: usize) -> ApiError {
    ApiError::invalid(
        "input",
        format!(
            "Invalid 'input': input[{index}] holds token id {id}, outside this model's vocabulary (0 to {})",
            vocab.saturating_sub(1)
        ),
    )
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
