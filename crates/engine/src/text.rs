//! From token bytes to the text a client sees: incremental UTF-8 decoding (a character
//! may be split across tokens) and stop sequences (a stop string may be split across
//! tokens too, so text that could still become a stop string is held back).

/// Accumulates token bytes and yields only complete UTF-8 characters.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds the bytes of one token and returns the text that is now complete.
    /// Invalid sequences (a model can emit any bytes) become U+FFFD, never an error.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: any incomplete trailing bytes become U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            String::new()
        } else {
            self.pending.clear();
            char::REPLACEMENT_CHARACTER.to_string()
        }
    }
}

/// What the stop matcher lets through after new text arrives.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    /// Text that can be sent to the client now.
    pub text: String,
    /// The stop sequence found, if any (the text stops just before it).
    pub stopped: Option<String>,
}

/// Which part of an output is free text, the only part stop sequences end: what a grammar
/// constrains (a tool call, a JSON answer) no stop string may cut, or it would not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeText {
    /// Free text ends where this marker appears (the opening of a tool call); empty: the
    /// output has none.
    pub ends_at: &'static str,
    /// An output that opens with this character has none either (a call written without
    /// its marker).
    pub unless_opening_with: Option<char>,
}

impl FreeText {
    /// None at all: the whole output follows a grammar.
    pub const NONE: FreeText = FreeText { ends_at: "", unless_opening_with: None };
}

/// Holds back text that may be the beginning of a stop sequence.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// Where free text ends, while it has not ended.
    free: Option<FreeText>,
    /// Whether any text came yet.
    opened: bool,
    /// The end of the text so far that may be the start of the marker.
    seen: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self::for_free_text(stops, None)
    }

    /// Stop sequences that end only `free` text (`None`: all of it); past it, the text
    /// passes as it is.
    pub fn for_free_text(stops: Vec<String>, free: Option<FreeText>) -> Self {
        let stops = match free {
            Some(f) if f.ends_at.is_empty() => Vec::new(),
            _ => stops.into_iter().filter(|s| !s.is_empty()).collect(),
        };
        let free = free.filter(|_| !stops.is_empty());
        StopMatcher { stops, held: String::new(), free, opened: false, seen: String::new() }
    }

    /// No stop applies from here on.
    fn free_text_ended(&mut self) {
        self.stops.clear();
        self.free = None;
    }

    pub fn push(&mut self, text: &str) -> Released {
        let Some(free) = self.free else { return self.push_stops(text) };
        if !self.opened && !text.is_empty() {
            self.opened = true;
            if free.unless_opening_with.is_some_and(|c| text.starts_with(c)) {
                self.free_text_ended();
                return self.push_stops(text);
            }
        }
        let marker = free.ends_at;
        let window = format!("{}{text}", self.seen);
        let Some(at) = window.find(marker) else {
            // Keep what could still be the marker's beginning.
            let mut from = window.len().saturating_sub(marker.len() - 1);
            while !window.is_char_boundary(from) {
                from += 1;
            }
            self.seen = window[from..].to_string();
            return self.push_stops(text);
        };
        // `seen` is shorter than the marker, so the marker ends inside `text`, at a
        // character boundary.
        let end = at + marker.len() - self.seen.len();
        let mut released = self.push_stops(&text[..end]);
        if released.stopped.is_none() {
            released.text.push_str(&std::mem::take(&mut self.held));
            released.text.push_str(&text[end..]);
            self.free_text_ended();
        }
        released
    }

    fn push_stops(&mut self, text: &str) -> Released {
        self.held.push_str(text);
        if self.stops.is_empty() {
            return Released { text: std::mem::take(&mut self.held), stopped: None };
        }
        // The earliest stop occurrence wins.
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s))).min();
        if let Some((at, stop)) = first {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released { text, stopped: Some(stop.clone()) };
        }
        // Keep the longest suffix that is a proper prefix of a stop sequence.
        let keep = self
            .stops
            .iter()
            .map(|stop| {
                (1..stop.len().min(self.held.len() + 1))
                    .rev()
                    .find(|&k| {
                        let start = self.held.len() - k;
                        self.held.is_char_boundary(start)
                            && stop.as_bytes().starts_with(&self.held.as_bytes()[start..])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released { text, stopped: None }
    }

    /// Ends generation without a stop: whatever was held back is released.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multibyte_characters_split_across_tokens() {
        let mut s = Utf8Stream::default();
        let snowman = "☃".as_bytes(); // three bytes
        assert_eq!(s.push(&snowman[..1]), "");
        assert_eq!(s.push(&snowman[1..2]), "");
        assert_eq!(s.push(&[snowman[2], b'!']), "☃!");
        assert_eq!(s.push(&[0xff, b'a']), "\u{fffd}a");
        assert_eq!(s.push(&"é".as_bytes()[..1]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_split_across_pieces() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), Released { text: "hello ".into(), stopped: None });
        assert_eq!(m.push("N"), Released { text: "".into(), stopped: None });
        assert_eq!(m.push("D and more"), Released { text: "".into(), stopped: Some("END".into()) });
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(m.push("EN"), Released { text: "".into(), stopped: None });
        assert_eq!(m.push("Zx\n"), Released { text: "ENZx".into(), stopped: None });
        assert_eq!(m.push("y"), Released { text: "\ny".into(), stopped: None });
        assert_eq!(m.push("E"), Released { text: "".into(), stopped: None });
        assert_eq!(m.finish(), "E");
    }

    #[test]
    fn stops_end_only_free_text() {
        let call = Some(FreeText { ends_at: "<tool_call>", unless_opening_with: Some('{') });
        // Before the marker, a stop ends the text as always.
        let mut m = StopMatcher::for_free_text(vec!["Paris".into()], call);
        assert_eq!(m.push("Let me call Par"), Released { text: "Let me call ".into(), stopped: None });
        assert_eq!(m.push("is<tool"), Released { text: "".into(), stopped: Some("Paris".into()) });
        // The marker split across pieces; from it on, no stop applies.

        let mut m = StopMatcher::for_free_text(vec!["Paris".into()], call);
        assert_eq!(m.push("Calling <tool_"), Released { text: "Calling <tool_".into(), stopped: None });
        assert_eq!(
            m.push("call>\n{\"city\": \"Par"),
            Released { text: "call>\n{\"city\": \"Par".into(), stopped: None }
        );
        assert_eq!(m.push("is\"}"), Released { text: "is\"}".into(), stopped: None }, "inside the call");
        assert_eq!(m.finish(), "");

        // A call without its marker: no free text at all.
        let mut m = StopMatcher::for_free_text(vec!["Paris".into()], call);
        assert_eq!(m.push(""), Released { text: "".into(), stopped: None });
        assert_eq!(
            m.push("{\"city\": \"Paris\"}"),
            Released { text: "{\"city\": \"Paris\"}".into(), stopped: None }
        );

        let mut m = StopMatcher::for_free_text(vec!["}".into()], Some(FreeText::NONE));
        assert_eq!(m.push("{\"a\": 1}"), Released { text: "{\"a\": 1}".into(), stopped: None }, "no stops");
        let mut m = StopMatcher::for_free_text(vec!["ü".into()], call);
        assert_eq!(m.push("aü"), Released { text: "a".into(), stopped: Some("ü".into()) }, "multibyte text");
    }
}
