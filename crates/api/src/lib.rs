//! The wire types of the APIs Ferry speaks. This is the one crate that knows the JSON
//! shapes; serde only, no behaviour beyond small accessors.

pub mod anthropic;
pub mod embeddings;
pub mod error;
pub mod openai;
pub mod responses;

pub use error::{ErrorBody, ErrorDetail};

/// `null` read as the field's default: OpenAI's `boolean | null` fields (`stream`, `echo`,
/// ...) take either.
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de> + Default,
{
    Ok(<Option<T> as serde::Deserialize>::deserialize(deserializer)?.unwrap_or_default())
}
