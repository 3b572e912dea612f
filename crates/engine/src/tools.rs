//! Tool calling in the `<tool_call>` format (Qwen2.5's and Hermes' templates):
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! Three parts: the prompt (a template that renders `tools` itself gets them; for any other
//! template the tool list and the format go into the system message, calls into the
//! assistant's text and results into user turns), the grammar that forces calls into this
//! format with arguments that follow each function's schema, and the parser that turns the
//! generated text back into calls, incrementally for streams.

use serde_json::{Value, json};

use crate::grammar::{Grammar, constrained_schema};
use crate::template::ChatMessage;

/// Opens a tool call in the output.
pub const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// The JSON schema of the arguments (an object schema).
    pub parameters: Value,
}

impl ToolSpec {
    /// OpenAI's tool object, the shape chat templates are given.
    pub fn to_openai(&self) -> Value {
        let mut function = json!({ "name": self.name, "parameters": self.parameters });
        if let Some(description) = &self.description {
            function["description"] = json!(description);
        }
        json!({ "type": "function", "function": function })
    }
}

/// When the model calls tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// Text or calls, as the model chooses: free text until `<tool_call>`, then a call.
    Auto,
    /// At least one call, and nothing else.
    Required,
    /// One call of this function.
    Named(String),
}

/// The grammar of the answer under `mode`. `parallel` allows several calls in a row.
pub fn tool_grammar(tools: &[ToolSpec], mode: &ToolMode, parallel: bool) -> Grammar {
    let chosen: Vec<&ToolSpec> = match mode {
        ToolMode::Named(name) => tools.iter().filter(|t| &t.name == name).collect(),
        _ => tools.iter().collect(),
    };
    let body = call_body_schema(&chosen);
    let more = if parallel && !matches!(mode, ToolMode::Named(_)) { " (\"\\n\" call)*" } else { "" };
    let start = match mode {
        // The lazy head lets any text through until the model writes `<tool_call>`; from
        // there on the call is forced. Small models often skip the tags and answer with the
        // call's bare JSON: an answer that starts with `{` is a call too (so plain text may
        // not start with `{`).
        ToolMode::Auto => format!(
            "start: TEXT | body | first_call{more}\nfirst_call: head \"\\n\" body \"\\n{CLOSE}\"\nhead[lazy]: TEXT \"{OPEN}\"\nTEXT: /([^{{](.|\\n)*)?/\n"
        ),
        ToolMode::Required | ToolMode::Named(_) => format!("start: call{more}\n"),
    };
    Grammar::Lark(format!(
        "%llguidance {{}}\n{start}call: \"{OPEN}\\n\" body \"\\n{CLOSE}\"\nbody: %json {body}\n"
    ))
}

/// The grammar of an answer under `tool_choice: auto` with a JSON `response_format`, as
/// OpenAI serves it: either calls (tagged, several when `parallel`, or one bare call object
/// as small models write them) or one JSON value that `schema` accepts, nothing else.
/// [`ToolCallParser::answering_json`] reads this output.
pub fn tool_or_json_grammar(tools: &[ToolSpec], schema: &Value, parallel: bool) -> Grammar {
    let chosen: Vec<&ToolSpec> = tools.iter().collect();
    let body = call_body_schema(&chosen);
    let answer = constrained_schema(schema.clone());
    let more = if parallel { " (\"\\n\" call)*" } else { "" };
    Grammar::Lark(format!(
        "%llguidance {{}}\nstart: answer | body | call{more}\nanswer: %json {answer}\ncall: \"{OPEN}\\n\" body \"\\n{CLOSE}\"\nbody: %json {body}\n"
    ))
}

/// The JSON schema of one call's object: `{"name": ..., "arguments": ...}` for any of `chosen`.
fn call_body_schema(chosen: &[&ToolSpec]) -> Value {
    let mut variants: Vec<Value> = chosen
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": { "name": { "const": t.name }, "arguments": t.parameters },
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let body = if variants.len() == 1 { variants.swap_remove(0) } else { json!({ "anyOf": variants }) };
    constrained_schema(body)
}

/// The conversation for a template that does not render tools itself: the tool list and
/// the call format appended to the system message, earlier calls written into the
/// assistant's text, results given back as user turns.
pub fn inline_tools(messages: &[ChatMessage], tools: &[ToolSpec]) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if !tools.is_empty() {
        let mut listing = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for tool in tools {
            listing.push('\n');
            listing.push_str(&tool.to_openai().to_string());
        }
        listing.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        match messages.first() {
            Some(first) if first.role == "system" => {
                out.push(ChatMessage::new("system", format!("{}\n\n{listing}", first.content)));
            }
            _ => out.push(ChatMessage::new("system", listing)),
        }
    }
    let skip = usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
    for message in &messages[skip..] {
        match message.role.as_str() {
            "assistant" if !message.tool_calls.is_empty() => {
                let mut text = message.content.clone();
                for call in &message.tool_calls {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    let name = Value::String(call.function.name.clone());
                    let arguments = &call.function.arguments;
                    text.push_str(&format!(
                        "{OPEN}\n{{\"name\": {name}, \"arguments\": {arguments}}}\n{CLOSE}"
                    ));
                }
                out.push(ChatMessage::new("assistant", text));
            }
            "tool" => {
                let response = format!("<tool_response>\n{}\n</tool_response>", message.content);
                match out.last_mut() {
                    // Consecutive results share one user turn, as Qwen's template writes them.
                    Some(last) if last.role == "user" && last.content.ends_with("</tool_response>") => {
                        last.content.push('\n');
                        last.content.push_str(&response);
                    }
                    _ => out.push(ChatMessage::new("user", response)),
                }
            }
            _ => out.push(message.clone()),
        }
    }
    out
}

/// A piece of parsed output.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolOutput {
    /// Plain answer text.
    Text(String),
    /// Call number `index` begins: its function's name.
    CallStart { index: usize, name: String },
    /// More of call `index`'s arguments (JSON text).
    Arguments { index: usize, text: String },
}

/// Splits generated text into plain text and calls as it arrives. Text that may be the
/// beginning of `<tool_call>` is held back until it is known not to be.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    buffer: String,
    state: State,
    calls: usize,
    /// Whether anything was read yet: an answer that starts with `{` is a bare call.
    started: bool,
    /// The call being read has no `<tool_call>` tags.
    bare: bool,
    /// The output is calls or a JSON answer ([`tool_or_json_grammar`]): the names of the
    /// tools, which tell a bare call from the answer.
    json_answer: Option<Vec<String>>,
    /// The output turned out to be the JSON answer: all of it is text.
    answering: bool,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Text,
    /// Inside `<tool_call>`, before the arguments.
    Head,
    /// Inside the arguments: how many bytes of `buffer` are sent, the nesting depth, and
    /// whether the scan is inside a string (and just after a backslash).
    Arguments { depth: usize, in_string: bool, escaped: bool, done: bool },
}

impl ToolCallParser {
    /// The parser of [`tool_or_json_grammar`]'s output over tools named `names`: an answer
    /// that starts with `<tool_call>` is calls, one that starts as a call object of one of
    /// them (`{"name": "NAME", "arguments":`, as the grammar writes it) is a bare call, and
    /// any other is the JSON answer, passed whole as text (even where a string in it spells
    /// `<tool_call>`). Until the start decides, the text is held back.
    pub fn answering_json(names: Vec<String>) -> Self {
        ToolCallParser { json_answer: Some(names), ..ToolCallParser::default() }
    }

    /// Calls seen so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    pub fn push(&mut self, text: &str) -> Vec<ToolOutput> {
        self.buffer.push_str(text);
        let mut out = Vec::new();
        loop {
            let progressed = match self.state {
                State::Text => self.scan_text(&mut out),
                State::Head => self.scan_head(&mut out),
                State::Arguments { .. } => self.scan_arguments(&mut out),
            };
            if !progressed {
                return out;
            }
        }
    }

    /// The end of the output: whatever was held back. `cut`: the output ended at its token
    /// limit, not where the model ended it; a call it cut off is still a call (named, with the
    /// arguments written so far, as OpenAI returns one), and the start of a `<tool_call>` tag
    /// it cut off is not answer text.
    pub fn finish(&mut self, cut: bool) -> Vec<ToolOutput> {
        let rest = std::mem::take(&mut self.buffer);
        match self.state {
            State::Text if cut && !rest.trim().is_empty() && OPEN.starts_with(rest.trim()) => Vec::new(),
            State::Text if !(rest.is_empty() || self.calls > 0 && rest.trim().is_empty()) => {
                vec![ToolOutput::Text(rest)]
            }
            // Cut before its arguments: the call's name, if the model wrote it whole.
            State::Head => match called_name(&rest) {
                Some(name) => {
                    self.calls += 1;
                    vec![ToolOutput::CallStart { index: self.calls - 1, name }]
                }
                None => Vec::new(),
            },
            // Cut in its arguments or its closing tag: a call, its arguments already sent.
            State::Arguments { .. } => {
                self.calls += 1;
                Vec::new()
            }
            State::Text => Vec::new(),
        }
    }

    fn scan_text(&mut self, out: &mut Vec<ToolOutput>) -> bool {
        if !self.started {
            let trimmed = self.buffer.trim_start();
            if trimmed.is_empty() {
                return false;
            }
            if let Some(names) = &self.json_answer {
                match bare_call_start(trimmed, names) {
                    None => return false,
                    Some(true) => {
                        self.buffer = trimmed.to_string();
                        self.bare = true;
                        self.state = State::Head;
                        self.started = true;
                        return true;
                    }
                    Some(false) => self.answering = !trimmed.starts_with('<'),
                }
            }
            self.started = true;
            if self.json_answer.is_none() && trimmed.starts_with('{') {
                self.buffer = trimmed.to_string();
                self.bare = true;
                self.state = State::Head;
                return true;
            }
        }
        if self.answering {
            if !self.buffer.is_empty() {
                out.push(ToolOutput::Text(std::mem::take(&mut self.buffer)));
            }
            return false;
        }
        if self.calls > 0 {
            // Whitespace between calls is not answer text.
            let trimmed = self.buffer.trim_start().len();
            self.buffer.drain(..self.buffer.len() - trimmed);
        }
        if let Some(at) = self.buffer.find(OPEN) {
            if at > 0 {
                out.push(ToolOutput::Text(self.buffer[..at].to_string()));
            }
            self.buffer.drain(..at + OPEN.len());
            self.state = State::Head;
            return true;
        }
        // Keep any tail that could still grow into `<tool_call>`.
        let keep = (1..OPEN.len().min(self.buffer.len() + 1))
            .rev()
            .find(|&n| {
                self.buffer.is_char_boundary(self.buffer.len() - n)
                    && OPEN.starts_with(&self.buffer[self.buffer.len() - n..])
            })
            .unwrap_or(0);
        let send = self.buffer.len() - keep;
        if send > 0 {
            out.push(ToolOutput::Text(self.buffer[..send].to_string()));
            self.buffer.drain(..send);
        }
        false
    }

    fn scan_head(&mut self, out: &mut Vec<ToolOutput>) -> bool {
        const ARGUMENTS: &str = "\"arguments\":";
        let Some(at) = self.buffer.find(ARGUMENTS) else {
            return false;
        };
        let head = self.buffer[..at].trim();
        let name = head
            .strip_prefix('{')
            .and_then(|h| h.trim_start().strip_prefix("\"name\":"))
            .map(|h| h.trim().trim_end_matches(',').trim())
            .and_then(|n| serde_json::from_str::<String>(n).ok())
            .unwrap_or_default();
        out.push(ToolOutput::CallStart { index: self.calls, name });
        let rest = self.buffer[at + ARGUMENTS.len()..].trim_start().to_string();
        self.buffer = rest;
        self.state = State::Arguments { depth: 0, in_string: false, escaped: false, done: false };
        true
    }

    fn scan_arguments(&mut self, out: &mut Vec<ToolOutput>) -> bool {
        let State::Arguments { mut depth, mut in_string, mut escaped, mut done } = self.state else {
            return false;
        };
        if !done {
            if depth == 0 {
                // Before the arguments' first bracket: the space after `"arguments":`.
                let trimmed = self.buffer.trim_start().len();
                self.buffer.drain(..self.buffer.len() - trimmed);
            }
            let mut end = None;
            for (i, c) in self.buffer.char_indices() {
                if in_string {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => in_string = false,
                        _ => {}
                    }
                    continue;
                }
                match c {
                    '"' => in_string = true,
                    '{' | '[' => depth += 1,
                    '}' | ']' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            end = Some(i + 1);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let send = end.unwrap_or(self.buffer.len());
            if send > 0 {
                out.push(ToolOutput::Arguments { index: self.calls, text: self.buffer[..send].to_string() });
                self.buffer.drain(..send);
            }
            done = end.is_some();
        }
        self.state = State::Arguments { depth, in_string, escaped, done };
        if !done {
            return false;
        }
        // The rest of the call: the object's closing brace (and the closing tag).
        let end = if self.bare { "}" } else { CLOSE };
        let Some(at) = self.buffer.find(end) else {
            return false;
        };
        self.buffer.drain(..at + end.len());
        self.bare = false;
        self.calls += 1;
        self.state = State::Text;
        true
    }
}

/// The function's name at the head of a call object cut off before its arguments
/// (`{"name": "get_weather", "argu`), when the name is whole.
fn called_name(head: &str) -> Option<String> {
    let rest = head.trim_start().strip_prefix('{')?.trim_start().strip_prefix("\"name\":")?;
    // The first JSON value there, if it is a whole string (a cut one is an error).
    let name = serde_json::Deserializer::from_str(rest).into_iter::<String>().next()?.ok()?;
    Some(name).filter(|n| !n.is_empty())
}

/// Whether `text` (the start of an answer) is a bare call of one of `names`: `None` while it
/// could still go either way.
fn bare_call_start(text: &str, names: &[String]) -> Option<bool> {
    if !text.starts_with('{') {
        return Some(false);
    }
    let heads = names.iter().map(|name| format!("{{\"name\": \"{name}\", \"arguments\":"));
    let mut undecided = false;
    for head in heads {
        if text.starts_with(&head) {
            return Some(true);
        }
        undecided |= head.starts_with(text);
    }
    if undecided { None } else { Some(false) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` in pieces of `step` bytes (on character boundaries) and joins the output.
    fn parse(text: &str, step: usize) -> (String, Vec<(String, String)>) {
        let mut parser = ToolCallParser::default();
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + step).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            pieces.extend(parser.push(&text[start..end]));
            start = end;
        }
        pieces.extend(parser.finish(false));
        joined(pieces)
    }

    /// The answer text and the calls (name, arguments) that `pieces` make.
    fn joined(pieces: Vec<ToolOutput>) -> (String, Vec<(String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String)> = Vec::new();
        for piece in pieces {
            match piece {
                ToolOutput::Text(t) => content.push_str(&t),
                ToolOutput::CallStart { index, name } => {
                    assert_eq!(index, calls.len());
                    calls.push((name, String::new()));
                }
                ToolOutput::Arguments { index, text } => calls[index].1.push_str(&text),
            }
        }
        (content, calls)
    }

    #[test]
    fn calls_and_text_come_apart_whatever_the_chunking() {
        let text = "Let me check.<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"P}a\\\"ris\", \"days\": [1, 2]}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        for step in [1, 2, 3, 7, 1000] {
            let (content, calls) = parse(text, step);
            assert_eq!(content, "Let me check.", "step {step}");
            assert_eq!(
                calls,
                vec![
                    ("get_weather".to_string(), "{\"city\": \"P}a\\\"ris\", \"days\": [1, 2]}".to_string()),
                    ("now".to_string(), "{}".to_string())
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_bare_json_call_is_a_call() {
        let text = " {\"name\": \"f\", \"arguments\": {\"a\": \"}\"}}";
        for step in [1, 5, 1000] {
            assert_eq!(
                parse(text, step),
                (String::new(), vec![("f".to_string(), "{\"a\": \"}\"}".to_string())])
            );
        }
        // Only at the start: later braces are text.
        assert_eq!(parse("x {\"name\": 1}", 1), ("x {\"name\": 1}".to_string(), vec![]));
    }

    #[test]
    fn beside_a_json_answer_only_tagged_calls_are_calls() {
        // Text and calls (name, arguments) from the output fed in pieces of `step` bytes.
        let parse_with = |text: &str, step: usize| {
            let mut parser = ToolCallParser::answering_json(vec!["f".into()]);
            let mut pieces = Vec::new();
            for chunk in text.as_bytes().chunks(step) {
                pieces.extend(parser.push(std::str::from_utf8(chunk).unwrap()));
            }
            pieces.extend(parser.finish(false));
            let (mut content, mut calls) = (String::new(), Vec::<(String, String)>::new());
            for piece in pieces {
                match piece {
                    ToolOutput::Text(t) => content.push_str(&t),
                    ToolOutput::CallStart { name, .. } => calls.push((name, String::new())),
                    ToolOutput::Arguments { index, text } => calls[index].1.push_str(&text),
                }
            }
            (content, calls)
        };
        let answers = [
            "{\"name\": \"fg\", \"arguments\": {}, \"note\": \"<tool_call>\"}",
            "{\"name\": \"f\"}",
            "[1, 2]",
            "{}",
        ];
        let tagged = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>";
        let bare = "{\"name\": \"f\", \"arguments\": {\"a\": 1}}";
        for step in [1, 4, 1000] {
            for answer in answers {
                assert_eq!(parse_with(answer, step), (answer.to_string(), vec![]), "step {step}");
            }
            for call in [tagged, bare] {
                let want = vec![("f".to_string(), "{\"a\": 1}".to_string())];
                assert_eq!(parse_with(call, step), (String::new(), want), "step {step}: {call}");
            }
        }
    }

    #[test]
    fn the_combined_grammar_holds_both_alternatives() {
        let tools = [ToolSpec { name: "f".into(), description: None, parameters: json!({"type": "object"}) }];
        let Grammar::Lark(source) = tool_or_json_grammar(&tools, &json!({"type": "array"}), false) else {
            panic!("a Lark grammar");
        };
        assert!(source.contains("start: answer | body | call\n"), "{source}");
        assert!(source.contains("answer: %json {\"type\":\"array\",\"x-guidance\""), "{source}");
        assert!(!source.contains("lazy"), "no free text beside the JSON answer: {source}");
    }

    #[test]
    fn plain_text_passes_and_a_lone_angle_bracket_is_released() {
        assert_eq!(parse("a < b and <tool", 1), ("a < b and <tool".to_string(), vec![]));
        assert_eq!(parse("héllo wörld", 1), ("héllo wörld".to_string(), vec![]));
    }

    /// Feeds `text` whole and finishes it as cut off at the token limit.
    fn parse_cut(text: &str) -> (String, Vec<(String, String)>, usize) {
        let mut parser = ToolCallParser::default();
        let mut pieces = parser.push(text);
        pieces.extend(parser.finish(true));
        let (content, calls) = joined(pieces);
        (content, calls, parser.calls())
    }

    #[test]
    fn a_call_cut_off_by_the_token_limit_is_still_a_call() {
        // Cut in the arguments: the call and what it wrote of them.
        let (content, calls, n) =
            parse_cut("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Pa");
        assert_eq!((content.as_str(), n), ("", 1));
        assert_eq!(calls, vec![("get_weather".to_string(), "{\"city\": \"Pa".to_string())]);
        // Cut after the name, before the arguments: the call, named, with none.
        let (content, calls, _) = parse_cut("<tool_call>\n{\"name\": \"get_\\\"weather\", \"argu");
        assert_eq!(content, "");
        assert_eq!(calls, vec![("get_\"weather".to_string(), String::new())]);
        // Cut inside the name, or inside the tag: no call, and no markup as answer text.
        assert_eq!(parse_cut("<tool_call>\n{\"name\": \"get_wea"), (String::new(), vec![], 0));
        assert_eq!(parse_cut("Let me look.<tool_"), ("Let me look.".to_string(), vec![], 0));
        // Ended by the model, a trailing `<tool` is its text.
        assert_eq!(parse("Let me look.<tool_", 3).0, "Let me look.<tool_");
    }

    #[test]
    fn inline_tools_rewrites_calls_and_results() {
        let tools = [ToolSpec { name: "f".into(), description: None, parameters: json!({"type": "object"}) }];
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls.push(crate::template::TemplateToolCall {
            id: "c1".into(),
            kind: "function",
            function: crate::template::TemplateFunction { name: "f".into(), arguments: json!({"x": 1}) },
        });
        let messages = [ChatMessage::new("user", "hi"), call, ChatMessage::new("tool", "42")];
        let out = inline_tools(&messages, &tools);
        assert_eq!(out[0].role, "system");
        assert!(out[0].content.contains("<tools>\n{\"type\":\"function\""), "{}", out[0].content);
        assert_eq!(out[2].content, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\":1}}\n</tool_call>");
        assert_eq!(out[3], ChatMessage::new("user", "<tool_response>\n42\n</tool_response>"));
    }
}
