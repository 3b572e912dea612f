//! Ferry's HTTP server: OpenAI-compatible routes over the engine.
//!
//! Requests flow one way: parse → validate (`validate`) → submit to the model's scheduler
//! (`generation`) → stream or collect the answer (`chat`, `completions`, `responses`, `messages`). `error` is the one
//! table from failures to HTTP responses.

mod admin;
pub mod app;
mod chat;
mod completions;
mod deadline;
mod embeddings;
pub mod error;
mod explain;
mod generation;
mod guard;
mod limits;
mod messages;
mod models;
pub mod openapi;
pub mod otel;
mod presets;
pub mod registry;
mod responses;
pub mod shared;
mod structured;
pub mod telemetry;
pub mod tenancy;
mod tokenize;
mod translate;
mod ui;
mod validate;

pub use app::{AppState, GatewayLoader, HttpConfig, app};
pub use registry::{Loader, ModelSpec, Registry, RegistryLimits};
pub use shared::SharedState;
pub use tenancy::{Price, Tenancy};
