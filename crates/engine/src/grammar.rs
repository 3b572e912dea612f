//! Grammar-constrained decoding: a JSON schema or a Lark grammar compiled by `llguidance`
//! into a per-sequence [`Constraint`] that says, before each token is drawn, which tokens
//! keep the output inside the grammar.
//!
//! The compiler is built once per model from the backend's token bytes (a token trie);
//! compiling a request's grammar is cheap and happens on the API side, so that a schema
//! the compiler refuses is a 400 before the request is queued. The scheduler applies the
//! mask inside its own sampling, sequence by sequence, so constrained and free sequences
//! share every forward pass.

use std::fmt;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

use crate::TokenId;
use crate::backend::Backend;

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON value the schema accepts.
    JsonSchema(serde_json::Value),
    /// An llguidance Lark grammar (it may inline JSON schemas with `%json { ... }`).
    Lark(String),
}

/// How constrained JSON is written: with the separators of Python's `json.dumps` (what chat
/// templates' `tojson` writes, so what models have seen) and no free whitespace, which a
/// small model could otherwise fill until `max_tokens` runs out. `oneOf` is enforced as
/// `anyOf`, as llama.cpp and vLLM do: exact for the discriminated unions that schema
/// generators (pydantic) write it for.
pub fn json_format_options() -> serde_json::Value {
    serde_json::json!({
        "item_separator": ", ",
        "key_separator": ": ",
        "whitespace_flexible": false,
        "coerce_one_of": true,
    })
}

/// A request's JSON schema as it is compiled: objects that declare their properties are
/// closed (see [`close_objects`]), and the format options ([`json_format_options`]) are added.
pub fn constrained_schema(mut schema: serde_json::Value) -> serde_json::Value {
    close_objects(&mut schema, true);
    if let Some(object) = schema.as_object_mut() {
        object.insert("x-guidance".into(), json_format_options());
    }
    schema
}

/// Makes every object schema that lists `properties` accept no others, unless it says what
/// to do with them (`additionalProperties`, `patternProperties`, `unevaluatedProperties`).
///
/// JSON Schema leaves an object open by default, and a small model fills an open object
/// with keys of its own (7 of 8 answers did, on SmolLM2). OpenAI's strict mode refuses a
/// schema that does not close its objects; llama.cpp's grammars and vLLM's xgrammar close
/// them. Here they are closed whatever `strict` says: a schema that wants extra keys says
/// `"additionalProperties": true`. Objects with no `properties` (any object) stay open, and
/// so do those combined with siblings (`allOf` members, and objects beside an `allOf` or a
/// `$ref`), where closing each part would refuse the keys of the others.
fn close_objects(schema: &mut serde_json::Value, closable: bool) {
    use serde_json::Value;
    let Some(object) = schema.as_object_mut() else { return };
    let open = ["additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref"];
    if closable && object.contains_key("properties") && !open.iter().any(|k| object.contains_key(*k)) {
        object.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (keyword, value) in object.iter_mut() {
        match (keyword.as_str(), value) {
            (
                "properties" | "$defs" | "definitions" | "patternProperties" | "dependentSchemas",
                Value::Object(m),
            ) => m.values_mut().for_each(|s| close_objects(s, true)),
            ("anyOf" | "oneOf" | "prefixItems" | "items", Value::Array(list)) => {
                list.iter_mut().for_each(|s| close_objects(s, true))
            }
            ("allOf", Value::Array(list)) => list.iter_mut().for_each(|s| close_objects(s, false)),
            ("items" | "additionalItems" | "additionalProperties" | "contains" | "then" | "else", s) => {
                close_objects(s, true)
            }
            _ => {}
        }
    }
}

/// Compiles grammars against one model's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// Builds the token trie of `backend`'s vocabulary. End-of-generation tokens are the
    /// grammar's "end": allowed exactly where the grammar accepts.
    pub fn new(backend: &dyn Backend) -> Result<Self, String> {
        let n_vocab = backend.info().n_vocab;
        let words: Vec<Vec<u8>> = (0..n_vocab as TokenId).map(|t| backend.token_bytes(t).to_vec()).collect();
        let eog: Vec<TokenId> =
            (0..n_vocab as TokenId).filter(|&t| backend.is_end_of_generation(t)).collect();
        let first_eog = eog.first().copied().ok_or("the model has no end-of-generation token")?;
        let info = TokRxInfo::new(n_vocab as u32, first_eog);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
        Self::from_env(Arc::new(ApproximateTokEnv::new(trie)))
    }

    fn from_env(env: TokEnv) -> Result<Self, String> {
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| e.to_string())?;
        // llguidance's own log goes to stderr by default; errors come back as values.
        factory.set_stderr_log_level(0);
        Ok(GrammarCompiler { factory })
    }

    /// Compiles `grammar` into a fresh constraint. The error names what the compiler could
    /// not take (an unsupported schema keyword, a grammar syntax error).
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, String> {
        let top = match grammar {
            Grammar::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(constrained_schema(schema.clone()))
            }
            Grammar::Lark(source) => TopLevelGrammar::from_lark(source.clone()),
        };
        let parser = self.factory.create_parser(top).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(error);
        }
        Ok(Constraint { matcher: Box::new(matcher) })
    }
}

/// The grammar state of one sequence. Cloning gives an independent copy (one per choice).
#[derive(Clone)]
pub struct Constraint {
    /// Boxed: a matcher is large, and requests carrying one move through channels.
    matcher: Box<Matcher>,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Constraint {
    /// The tokens allowed next.
    pub fn allowed(&mut self) -> Result<SimpleVob, String> {
        self.matcher.compute_mask().map_err(|e| e.to_string())
    }

    /// Sets the logits of every token the grammar forbids next to minus infinity.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self.allowed()?;
        for (token, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(token as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances the grammar past a sampled token.
    pub fn accept(&mut self, token: TokenId) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// The grammar is complete and allows nothing more (not even more text).
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::{ToolMode, ToolSpec, tool_grammar};

    /// A compiler over a vocabulary of single bytes (its last token is the end).
    fn compiler() -> GrammarCompiler {
        match GrammarCompiler::from_env(ApproximateTokEnv::single_byte_env()) {
            Ok(c) => c,
            Err(e) => panic!("compiler: {e}"),
        }
    }

    const EOS: TokenId = 261;

    /// Feeds `text` byte by byte; the number of bytes accepted before the first refusal.
    fn accepted(constraint: &mut Constraint, text: &str) -> usize {
        for (i, &byte) in text.as_bytes().iter().enumerate() {
            let allowed = constraint.allowed().unwrap_or_else(|e| panic!("mask: {e}"));
            if !allowed.is_allowed(TokenId::from(byte)) {
                return i;
            }
            constraint.accept(TokenId::from(byte)).unwrap_or_else(|e| panic!("accept: {e}"));
        }
        text.len()
    }

    fn can_end(constraint: &mut Constraint) -> bool {
        constraint.is_finished() || constraint.allowed().is_ok_and(|a| a.is_allowed(EOS))
    }

    fn compile(grammar: Grammar) -> Constraint {
        compiler().compile(&grammar).unwrap_or_else(|e| panic!("compile: {e}"))
    }

    #[test]
    fn a_schema_allows_exactly_its_json_in_python_format() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": { "name": { "type": "string" }, "age": { "type": "integer" } },
            "required": ["name", "age"],
            "additionalProperties": false,
        });
        let mut c = compile(Grammar::JsonSchema(schema.clone()));
        let good = r#"{"name": "Ann", "age": 31}"#;
        assert_eq!(accepted(&mut c, good), good.len());
        assert!(can_end(&mut c));
        // A string where the integer goes is refused at its first byte.
        let mut c = compile(Grammar::JsonSchema(schema.clone()));
        let bad = r#"{"name": "Ann", "age": "#;
        assert_eq!(accepted(&mut c, &format!("{bad}\"31\"}}")), bad.len());
        // No free whitespace: the separators are fixed.
        let mut c = compile(Grammar::JsonSchema(schema));
        assert_eq!(accepted(&mut c, "{ "), 1);
    }

    #[test]
    fn objects_that_list_their_properties_take_no_others() {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "name": { "type": "string" },
                "address": { "type": "object", "properties": { "city": { "type": "string" } } },
                "tags": { "type": "object" },
                "extra": { "type": "object", "properties": { "a": {} }, "additionalProperties": true },
            },
            "required": ["name"],
        });
        let ends = |text: &str| {
            let mut c = compile(Grammar::JsonSchema(schema.clone()));
            accepted(&mut c, text) == text.len() && can_end(&mut c)
        };
        assert!(ends(r#"{"name": "Ann", "address": {"city": "Rome"}}"#));
        assert!(!ends(r#"{"name": "Ann", "age": 3}"#), "an undeclared key at the top");
        assert!(!ends(r#"{"name": "Ann", "address": {"city": "Rome", "zip": "1"}}"#), "nested");
        // An object with no properties listed is any object; an open one stays open.
        assert!(ends(r#"{"name": "Ann", "tags": {"x": 1}}"#));
        assert!(ends(r#"{"name": "Ann", "extra": {"a": 1, "b": 2}}"#));

        // Members of `allOf` stay open (each would refuse the others' keys), their own
        // properties' objects are closed; `anyOf` branches and `$defs` are closed.
        let closed = constrained_schema(serde_json::json!({
            "allOf": [{ "properties": { "a": { "properties": { "b": {} } } } }, { "properties": { "c": {} } }],
            "anyOf": [{ "properties": { "d": {} } }],
            "$defs": { "E": { "type": "object", "properties": { "e": {} } } },
            "items": { "properties": { "f": {} } },
        }));
        assert_eq!(closed["allOf"][0].get("additionalProperties"), None);
        assert_eq!(closed["allOf"][0]["properties"]["a"]["additionalProperties"], false);
        assert_eq!(closed["anyOf"][0]["additionalProperties"], false);
        assert_eq!(closed["$defs"]["E"]["additionalProperties"], false);
        assert_eq!(closed["items"]["additionalProperties"], false);
        assert!(closed.get("x-guidance").is_some());
    }

    #[test]
    fn unsupported_schema_features_are_named() {
        let schema =
            serde_json::json!({ "type": "array", "items": { "type": "string" }, "uniqueItems": true });
        let error = compiler().compile(&Grammar::JsonSchema(schema)).err().unwrap_or_default();
        assert!(error.contains("uniqueItems"), "{error}");
        let schema = serde_json::json!({ "type": "string", "format": "no-such-format" });
        let error = compiler().compile(&Grammar::JsonSchema(schema)).err().unwrap_or_default();
        assert!(error.contains("no-such-format"), "{error}");
    }

    #[test]
    fn auto_tool_grammar_lets_text_through_and_forces_the_call_after_the_marker() {
        let tools = [ToolSpec {
            name: "get_weather".into(),
            description: None,
            parameters: serde_json::json!({
                "type": "object",
                "properties": { "city": { "type": "string" } },
                "required": ["city"],
                "additionalProperties": false,
            }),
        }];
        let auto = tool_grammar(&tools, &ToolMode::Auto, true);
        // A bare call (no tags) is forced to a valid one as soon as it starts with `{`.
        let mut c = compile(auto.clone());
        let bare = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}";
        assert_eq!(accepted(&mut c, bare), bare.len());
        assert!(can_end(&mut c));
        let mut c = compile(auto.clone());
        assert_eq!(accepted(&mut c, "{\"nome\""), 3);
        let mut c = compile(auto.clone());
        let text = "It is sunny < 30 degrees.\nNo call needed.";
        assert_eq!(accepted(&mut c, text), text.len());
        assert!(can_end(&mut c));

        let call =
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let mut c = compile(auto.clone());
        assert_eq!(accepted(&mut c, &format!("Let me look.{call}\n{call}")), 12 + 2 * call.len() + 1);
        assert!(can_end(&mut c));
        // After the marker, only the call's JSON goes.
        let mut c = compile(auto);
        let head = "<tool_call>\n{\"name\": \"";
        assert_eq!(accepted(&mut c, &format!("{head}lookup")), head.len());

        let mut c = compile(tool_grammar(&tools, &ToolMode::Required, false));
        assert_eq!(accepted(&mut c, "Sure"), 0);
        assert_eq!(accepted(&mut c, call), call.len());
        assert!(can_end(&mut c));
    }
}
