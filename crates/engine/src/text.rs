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

/// Holds back text that may be the beginning of a stop sequence.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    pub fn push(&mut self, text: &str) -> Released {
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
}
