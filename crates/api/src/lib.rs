//! The wire types of the APIs Ferry speaks. This is the one crate that knows the JSON
//! shapes; serde only, no behaviour beyond small accessors.

pub mod anthropic;
pub mod embeddings;
pub mod error;
pub mod openai;
pub mod responses;

pub use error::{ErrorBody, ErrorDetail};
