//! OpenAI's embeddings API (`POST /v1/embeddings`), as documented in OpenAI's API reference.
//! Request fields Ferry does not know are ignored, as OpenAI does.

use serde::{Deserialize, Serialize};

use crate::openai::Prompt;

/// `input`: a string, a list of strings, a list of token ids or a list of such lists. Token
/// ids are read as `i64` so that a negative one is refused by the handler, naming `input`.
pub type EmbeddingInput = Prompt;

/// `encoding_format`: a JSON array of floats, or the little-endian `f32` bytes in base64
/// (what OpenAI's SDKs ask for by default).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Debug, Clone, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct EmbeddingRequest {
    pub model: String,
    pub input: EmbeddingInput,
    pub encoding_format: Option<EncodingFormat>,
    /// Only the model's own number of dimensions is accepted.
    pub dimensions: Option<i64>,
    pub user: Option<String>,
}

/// One vector, in the requested encoding.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: String,
    /// The input's position in the request's `input`.
    pub index: usize,
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: String,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_every_input_shape_and_format() {
        let parse = |body: serde_json::Value| serde_json::from_value::<EmbeddingRequest>(body).unwrap();
        let req = parse(serde_json::json!({"model": "m", "input": "hi", "something_new": 1}));
        assert_eq!(req.input, Prompt::Text("hi".into()));
        assert_eq!(req.encoding_format, None);
        let req = parse(serde_json::json!({"model": "m", "input": ["a", "b"], "encoding_format": "base64"}));
        assert_eq!(req.input, Prompt::Texts(vec!["a".into(), "b".into()]));
        assert_eq!(req.encoding_format, Some(EncodingFormat::Base64));
        let req = parse(serde_json::json!({"model": "m", "input": [1, -2], "dimensions": 384}));
        assert_eq!(req.input, Prompt::Tokens(vec![1, -2]));
        assert_eq!(req.dimensions, Some(384));
        let req = parse(serde_json::json!({"model": "m", "input": [[1], [2, 3]], "encoding_format": null}));
        assert_eq!(req.input, Prompt::TokenLists(vec![vec![1], vec![2, 3]]));
        assert_eq!(req.encoding_format, None);
        let bad = serde_json::json!({"model": "m", "input": "x", "encoding_format": "hex"});
        assert!(serde_json::from_value::<EmbeddingRequest>(bad).is_err());
    }

    #[test]
    fn vectors_serialize_as_floats_or_a_string() {
        let data = EmbeddingData {
            object: "embedding".into(),
            index: 0,
            embedding: EmbeddingVector::Float(vec![0.5, -1.0]),
        };
        assert_eq!(
            serde_json::to_value(&data).unwrap(),
            serde_json::json!({"object": "embedding", "index": 0, "embedding": [0.5, -1.0]})
        );
        let data = EmbeddingData { embedding: EmbeddingVector::Base64("AAAAPw==".into()), ..data };
        assert_eq!(serde_json::to_value(&data).unwrap()["embedding"], "AAAAPw==");
    }
}
