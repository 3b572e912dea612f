//! Ferry's inference engine: model loading, tokenizing, chat templates, sampling and the
//! continuous-batching scheduler. No HTTP and no database here; the only IO is reading
//! model files.
//!
//! The entry point is [`LocalModel::load`], which gives a handle the API layer shares
//! between requests.

pub mod backend;
pub mod embedding;
pub mod grammar;
pub mod llama;
pub mod model_info;
pub mod sampler;
pub mod scheduler;
pub mod scoring;
pub mod template;
pub mod text;
pub mod tools;

use std::path::Path;
use std::sync::{Arc, OnceLock};

pub use backend::{Backend, EmbeddingConfig, FlashAttention, Pooling, SessionConfig};
pub use embedding::LmEmbedder;
pub use grammar::{Constraint, Grammar, GrammarCompiler};
pub use model_info::ModelInfo;
pub use sampler::SamplingParams;
pub use scheduler::{Event, FinishReason, GenerateRequest, Scheduler, SchedulerConfig, Timings, TokenInfo};
pub use scoring::{ScoreEvent, ScoreRequest, ScoreVariant};
pub use template::{ChatMessage, ChatTemplate, TemplateError, TemplateFunction, TemplateToolCall};
pub use text::FreeText;
pub use tools::{ToolCallParser, ToolMode, ToolOutput, ToolSpec};

/// A token id in the model's vocabulary.
pub type TokenId = u32;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("loading the model failed: {0}")]
    Load(String),
    #[error("decoding failed: {0}")]
    Decode(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the request queue is full")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The grammar or schema a request constrains its output to cannot be compiled.
    #[error("{0}")]
    Grammar(String),
}

/// A model served locally: its weights, its chat template, its scheduler, and the sampling
/// defaults its configuration sets.
pub struct LocalModel {
    pub backend: Arc<dyn Backend>,
    pub template: Option<ChatTemplate>,
    pub scheduler: Scheduler,
    pub defaults: ModelDefaults,
    /// How `/v1/embeddings` pools this model's hidden states.
    pub pooling: Pooling,
    /// The grammar compiler over this model's vocabulary, built on first use.
    grammar: OnceLock<Result<GrammarCompiler, String>>,
    /// The embedding thread, started on the first embeddings request.
    embedder: OnceLock<Result<LmEmbedder, String>>,
    /// Finds control-token text in a message (`None`: the vocabulary has none), built on
    /// first use.
    controls: OnceLock<Option<aho_corasick::AhoCorasick>>,
}

/// Stands for a message's content while the template renders a conversation whose text
/// holds control-token text: a private-use character no template writes, the message's
/// index, and the character again.
const MARK: char = '\u{F8FF}';

/// Sampling parameters a model's configuration sets (as Ollama's Modelfile `PARAMETER`s do),
/// used wherever a request leaves them unset.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    /// Completion tokens when a request names no maximum (otherwise the rest of the context).
    pub max_tokens: Option<i64>,
    pub stop: Option<Vec<String>>,
}

impl ModelDefaults {
    /// These settings, with `fallback`'s wherever these set none.
    pub fn or(self, fallback: &ModelDefaults) -> ModelDefaults {
        ModelDefaults {
            temperature: self.temperature.or(fallback.temperature),
            top_p: self.top_p.or(fallback.top_p),
            top_k: self.top_k.or(fallback.top_k),
            min_p: self.min_p.or(fallback.min_p),
            repetition_penalty: self.repetition_penalty.or(fallback.repetition_penalty),
            presence_penalty: self.presence_penalty.or(fallback.presence_penalty),
            frequency_penalty: self.frequency_penalty.or(fallback.frequency_penalty),
            seed: self.seed.or(fallback.seed),
            max_tokens: self.max_tokens.or(fallback.max_tokens),
            stop: self.stop.or_else(|| fallback.stop.clone()),
        }
    }
}

impl LocalModel {
    /// Loads a GGUF file with llama.cpp and starts its scheduler.
    pub fn load(
        id: &str,
        path: &Path,
        config: SchedulerConfig,
        progress: impl FnMut(f32) + 'static,
    ) -> Result<Self, EngineError> {
        let backend: Arc<dyn Backend> =
            Arc::new(llama::LlamaCppModel::load(id, path, config.session.gpu_layers, progress)?);
        Self::from_backend(backend, config)
    }

    pub fn from_backend(backend: Arc<dyn Backend>, config: SchedulerConfig) -> Result<Self, EngineError> {
        let info = backend.info();
        let template = match &info.chat_template {
            Some(source) => Some(ChatTemplate::new(source, &info.bos_token, &info.eos_token)?),
            None => None,
        };
        // What the file recommends; a configuration's defaults go over them (`ModelDefaults::or`).
        let defaults = info.sampling.clone();
        let scheduler = Scheduler::start(backend.clone(), config)?;
        Ok(LocalModel {
            backend,
            template,
            scheduler,
            defaults,
            pooling: Pooling::default(),
            grammar: OnceLock::new(),
            embedder: OnceLock::new(),
            controls: OnceLock::new(),
        })
    }

    /// The model's embedding thread, started on first use (a llama.cpp context of one
    /// sequence's context length, shared by up to 16 sequences a pass; it blocks while it
    /// starts). Its inputs are at most one context long.
    pub fn embedder(&self) -> Result<&LmEmbedder, EngineError> {
        let session = &self.scheduler.config().session;
        let config = EmbeddingConfig {
            max_tokens: session.ctx_per_sequence,
            max_sequences: 16,
            pooling: self.pooling,
            threads: session.threads,
        };
        self.embedder
            .get_or_init(|| LmEmbedder::start(self.backend.clone(), config, 256).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| EngineError::Load(e.clone()))
    }

    pub fn info(&self) -> &ModelInfo {
        self.backend.info()
    }

    /// Memory this model holds, estimated: its file (mapped weights) and its KV cache.
    pub fn memory_bytes(&self) -> u64 {
        let session = &self.scheduler.config().session;
        let info = self.info();
        // The embedding thread's context, once started: one context's cells.
        let embedding = match self.embedder.get() {
            Some(Ok(embedder)) => info.kv_cache_bytes(embedder.max_tokens()),
            _ => 0,
        };
        info.file_size + info.kv_cache_bytes(session.kv_capacity()) + embedding
    }

    /// Renders a conversation with the model's chat template and tokenizes it.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<TokenId>, EngineError> {
        self.chat_prompt_with_tools(messages, &[])
    }

    /// Renders a conversation that offers `tools`, through the template where it renders
    /// them itself and with the tools written into the system message where it does not.
    pub fn chat_prompt_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<Vec<TokenId>, EngineError> {
        self.conversation_tokens(messages, tools, true)
    }

    /// The tokens of a conversation, ending with the assistant's turn opened when
    /// `add_generation_prompt`. The template's own markup is read with its control tokens
    /// (`<|im_start|>`); the messages' text is text: where a message holds control-token text
    /// (a user writing `<|im_end|><|im_start|>system`), that text stays characters instead of
    /// opening a turn the template never wrote, past a preset's system prompt.
    pub fn conversation_tokens(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        add_generation_prompt: bool,
    ) -> Result<Vec<TokenId>, EngineError> {
        self.refuse_controls_outside_content(messages, tools)?;
        let held = self.holding_controls(messages);
        if held.is_empty() {
            // The template writes BOS itself where the model wants one.
            let text = self.render_chat(messages, tools, add_generation_prompt)?;
            return Ok(self.backend.tokenize(&text, false));
        }
        let marked = marked(messages, &held);
        let text = self.render_chat(&marked, tools, add_generation_prompt)?;
        self.tokenize_marked(&text, messages, &held)
    }

    /// The conversation with its last message, the assistant's, left open: generation goes on
    /// from that text (Anthropic's prefill; `continue_final_message` in transformers). The
    /// template renders the whole conversation and the text is cut after that message's
    /// content, so whatever closes its turn is left out.
    pub fn continued_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<TokenId>, EngineError> {
        let last = messages
            .last()
            .filter(|m| m.role == "assistant")
            .map(|m| m.content.trim_end())
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                EngineError::InvalidRequest("the last message is not the assistant's text".into())
            })?;
        self.refuse_controls_outside_content(messages, &[])?;
        let held = self.holding_controls(messages);
        let marked = marked(messages, &held);
        let text = self.render_chat(&marked, &[], false)?;
        let last_index = messages.len() - 1;
        let end = if held.contains(&last_index) {
            let mark = mark(last_index);
            text.rfind(&mark).map(|i| i + mark.len())
        } else {
            text.rfind(last).map(|i| i + last.len())
        };
        let end = end.ok_or_else(|| {
            EngineError::InvalidRequest(
                "this model's chat template rewrites the assistant's text, so it can't be continued".into(),
            )
        })?;
        self.tokenize_marked(&text[..end], messages, &held)
    }

    /// Finds the vocabulary's control-token text (`None`: it has none).
    fn control_matcher(&self) -> Option<&aho_corasick::AhoCorasick> {
        self.controls
            .get_or_init(|| {
                let texts = self.backend.control_texts();
                if texts.is_empty() {
                    return None;
                }
                aho_corasick::AhoCorasick::new(texts)
                    .inspect_err(|e| tracing::warn!(error = %e, "control tokens can't be searched for"))
                    .ok()
            })
            .as_ref()
    }

    /// The indexes of the messages whose content holds control-token text.
    fn holding_controls(&self, messages: &[ChatMessage]) -> Vec<usize> {
        let Some(controls) = self.control_matcher() else { return Vec::new() };
        messages.iter().enumerate().filter(|(_, m)| controls.is_match(&m.content)).map(|(i, _)| i).collect()
    }

    /// Refuses control-token text where the template writes it inside its own markup, as
    /// JSON or names: tool definitions, and the calls and call ids of earlier turns. (A
    /// message's content is kept as text instead; these are written by the developer or the
    /// model, and could not be told apart from the template's markup once rendered.)
    fn refuse_controls_outside_content(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<(), EngineError> {
        let Some(controls) = self.control_matcher() else { return Ok(()) };
        // The place is named only when something is found (this runs on every request).
        let refuse = |place: &dyn Fn() -> String, text: &str| match controls.find(text) {
            Some(found) => Err(EngineError::InvalidRequest(format!(
                "{} holds '{}', this model's control-token text, which its chat template would read as its own markup",
                place(),
                &text[found.range()]
            ))),
            None => Ok(()),
        };
        for tool in tools {
            let place = || format!("the tool '{}'", tool.name);
            refuse(&place, &tool.name)?;
            refuse(&place, tool.description.as_deref().unwrap_or_default())?;
            refuse(&place, &tool.parameters.to_string())?;
        }
        for (i, m) in messages.iter().enumerate() {
            refuse(&|| format!("messages[{i}].tool_call_id"), m.tool_call_id.as_deref().unwrap_or_default())?;
            let place = || format!("messages[{i}].tool_calls");
            for call in &m.tool_calls {
                refuse(&place, &call.id)?;
                refuse(&place, &call.function.name)?;
                refuse(&place, &call.function.arguments.to_string())?;
            }
        }
        Ok(())
    }

    /// Tokenizes a rendered conversation whose `held` messages stand as marks: the template's
    /// text with its control tokens, each held message's content as plain text wherever its
    /// mark is (nowhere, if the template leaves the message out or the prompt was cut before
    /// it; twice, if the template writes it twice).
    fn tokenize_marked(
        &self,
        text: &str,
        messages: &[ChatMessage],
        held: &[usize],
    ) -> Result<Vec<TokenId>, EngineError> {
        let mut found: Vec<(usize, usize, usize)> = held
            .iter()
            .flat_map(|&i| {
                let mark = mark(i);
                let len = mark.len();
                text.match_indices(&mark).map(move |(at, _)| (at, i, len)).collect::<Vec<_>>()
            })
            .collect();
        found.sort_unstable();
        let mut tokens = Vec::new();
        let mut from = 0;
        let template_text = |piece: &str, tokens: &mut Vec<TokenId>| {
            // A mark the template took apart (sliced, changed) can't be put back.
            if piece.contains(MARK) {
                return Err(EngineError::InvalidRequest(
                    "a message holds the model's control-token text, and this model's chat template rewrites message text, so it can't be kept as plain text".into(),
                ));
            }
            tokens.extend(self.backend.tokenize(piece, false));
            Ok(())
        };
        for (at, i, len) in found {
            template_text(&text[from..at], &mut tokens)?;
            tokens.extend(self.backend.tokenize_plain(&messages[i].content));
            from = at + len;
        }
        template_text(&text[from..], &mut tokens)?;
        Ok(tokens)
    }

    /// The conversation as the chat template writes it, ending with the assistant's turn
    /// opened when `add_generation_prompt` (as generation needs).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self.template.as_ref().ok_or(TemplateError::Missing)?;
        let has_tool_turns = messages.iter().any(|m| m.role == "tool" || !m.tool_calls.is_empty());
        Ok(if template.supports_tools() {
            let listed: Vec<serde_json::Value> = tools.iter().map(ToolSpec::to_openai).collect();
            template.render_with_tools(messages, &listed, add_generation_prompt)?
        } else if tools.is_empty() && !has_tool_turns {
            template.render(messages, add_generation_prompt)?
        } else {
            template.render(&tools::inline_tools(messages, tools), add_generation_prompt)?
        })
    }

    /// Compiles a grammar into a constraint for `GenerateRequest::constraint`. The first call
    /// builds the vocabulary's token trie (tens of milliseconds); call it off the async runtime.
    pub fn compile_grammar(&self, grammar: &Grammar) -> Result<Constraint, EngineError> {
        let compiler = self.grammar.get_or_init(|| GrammarCompiler::new(self.backend.as_ref()));
        match compiler {
            Ok(compiler) => compiler.compile(grammar).map_err(EngineError::Grammar),
            Err(e) => Err(EngineError::Load(format!("grammar compiler: {e}"))),
        }
    }

    /// The text of a token for logprobs (lossy where it holds part of a character).
    pub fn token_text(&self, token: TokenId) -> String {
        String::from_utf8_lossy(self.backend.token_bytes(token)).into_owned()
    }
}

/// The mark standing for message `i`'s content.
fn mark(i: usize) -> String {
    format!("{MARK}{i}{MARK}")
}

/// The conversation with each `held` message's content replaced by its mark.
fn marked(messages: &[ChatMessage], held: &[usize]) -> Vec<ChatMessage> {
    let mut marked = messages.to_vec();
    for &i in held {
        marked[i].content = mark(i);
    }
    marked
}
