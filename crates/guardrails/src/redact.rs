//! Redaction behind typed placeholders, and restoration of whole texts and of streams.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::{Action, Finding, PiiKind, Policy, detect};

/// A text the policy refuses. It names the kinds that caused the refusal, never the values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the privacy policy blocks this content: it contains {}", kind_list(.kinds))]
pub struct Blocked {
    /// The blocked kinds found, sorted, each once.
    pub kinds: Vec<PiiKind>,
}

impl Blocked {
    /// The stable error code for the HTTP edge (status 400).
    pub const CODE: &'static str = "pii_blocked";
}

fn kind_list(kinds: &[PiiKind]) -> String {
    kinds.iter().map(|kind| kind.as_str()).collect::<Vec<_>>().join(", ")
}

/// The redaction state of one request: which placeholder stands for which value.
///
/// Use one per request, for all of its texts (every message), so that one value gets one
/// placeholder throughout; drop it with the request. Its `Debug` shows counts, never values.
#[derive(Default)]
pub struct Redactor {
    /// Placeholder → original, for values redacted from the request: what `restore` puts back.
    originals: HashMap<String, String>,
    /// (kind, value) → placeholder, for both directions.
    placeholders: HashMap<(PiiKind, String), String>,
    /// The last number issued per kind.
    last_number: BTreeMap<PiiKind, usize>,
    counts: BTreeMap<PiiKind, usize>,
    response_counts: BTreeMap<PiiKind, usize>,
    /// Placeholder-shaped text the request itself holds (`[EMAIL_1]` typed by the user): never
    /// issued, so that such text reaches the provider and comes back as it was written.
    reserved: std::collections::HashSet<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

impl Redactor {
    pub fn new() -> Redactor {
        Redactor::default()
    }

    /// Notes the placeholder-shaped text in one of the request's texts, so that no value is
    /// given a placeholder the request already holds literally. Call it on every text of the
    /// request before redacting any ([`Redactor::redact`] does it for the text it is given).
    pub fn reserve_literals(&mut self, text: &str) {
        let mut rest = text;
        while let Some(open) = rest.find('[') {
            rest = &rest[open..];
            // Both brackets are ASCII, so these slices fall on char boundaries.
            if let Some(close) = rest.bytes().take(MAX_PLACEHOLDER_LEN).position(|byte| byte == b']') {
                let candidate = &rest[..=close];
                if is_placeholder(candidate) {
                    self.reserved.insert(candidate.to_owned());
                }
            }
            rest = &rest[1..];
        }
    }

    /// Applies `policy` to a text of the request: `Err` if a blocked kind is found (the redactor
    /// is then unchanged), else the text with every value of a redacted kind replaced by its
    /// placeholder.
    pub fn redact(&mut self, policy: &Policy, text: &str) -> Result<String, Blocked> {
        self.reserve_literals(text);
        self.apply(policy, text, Direction::Request)
    }

    /// Applies `policy` to what the model wrote, when the policy says `apply_to_responses`
    /// (otherwise returns the text as it is). Call it on the provider's text *before*
    /// [`Redactor::restore`]: the client's own values come back, values the model produced are
    /// masked. New placeholders continue the request's numbering and are never restored.
    pub fn redact_response(&mut self, policy: &Policy, text: &str) -> Result<String, Blocked> {
        if !policy.apply_to_responses {
            return Ok(text.to_owned());
        }
        self.apply(policy, text, Direction::Response)
    }

    /// Puts the original values back in place of the placeholders this redactor issued for the
    /// request. Other bracketed text, including placeholders it never issued, is left alone.
    pub fn restore(&self, text: &str) -> String {
        let mut restored = String::with_capacity(text.len());
        restore_into(&self.originals, text, &mut restored);
        restored
    }

    /// A restorer for a streamed answer, holding this redactor's placeholders as of now.
    pub fn stream_restorer(&self) -> StreamRestorer {
        StreamRestorer { originals: self.originals.clone(), pending: String::new() }
    }

    /// How many values of each kind were redacted from the request (occurrences, not distinct
    /// values). Kinds with none are absent.
    pub fn counts(&self) -> BTreeMap<PiiKind, usize> {
        self.counts.clone()
    }

    /// The same as [`Redactor::counts`], for [`Redactor::redact_response`].
    pub fn response_counts(&self) -> BTreeMap<PiiKind, usize> {
        self.response_counts.clone()
    }

    fn apply(&mut self, policy: &Policy, text: &str, direction: Direction) -> Result<String, Blocked> {
        if PiiKind::ALL.iter().all(|&kind| policy.action_for(kind) == Action::Allow) {
            return Ok(text.to_owned());
        }
        let findings = detect(text);
        let mut blocked: Vec<PiiKind> = findings
            .iter()
            .map(|finding| finding.kind)
            .filter(|&kind| policy.action_for(kind) == Action::Block)
            .collect();
        if !blocked.is_empty() {
            blocked.sort_unstable();
            blocked.dedup();
            return Err(Blocked { kinds: blocked });
        }
        let mut redacted = String::with_capacity(text.len());
        let mut copied_to = 0;
        for Finding { kind, start, end } in findings {
            if policy.action_for(kind) != Action::Redact {
                continue;
            }
            redacted.push_str(&text[copied_to..start]);
            redacted.push_str(&self.placeholder(kind, &text[start..end], direction));
            copied_to = end;
            let counts = match direction {
                Direction::Request => &mut self.counts,
                Direction::Response => &mut self.response_counts,
            };
            *counts.entry(kind).or_default() += 1;
        }
        redacted.push_str(&text[copied_to..]);
        Ok(redacted)
    }

    fn placeholder(&mut self, kind: PiiKind, value: &str, direction: Direction) -> String {
        let key = (kind, value.to_owned());
        let placeholder = match self.placeholders.get(&key) {
            Some(existing) => existing.clone(),
            None => {
                let number = self.last_number.entry(kind).or_default();
                let placeholder = loop {
                    *number += 1;
                    let candidate = format!("[{}_{}]", kind.label(), number);
                    if !self.reserved.contains(&candidate) {
                        break candidate;
                    }
                };
                self.placeholders.insert(key, placeholder.clone());
                placeholder
            }
        };
        if direction == Direction::Request {
            self.originals.entry(placeholder.clone()).or_insert_with(|| value.to_owned());
        }
        placeholder
    }
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("counts", &self.counts)
            .field("response_counts", &self.response_counts)
            .finish_non_exhaustive()
    }
}

/// Restores placeholders in a streamed answer, delta by delta.
///
/// Text goes out as soon as it cannot be the start of a placeholder: only a tail that could
/// still become one of the issued placeholders (`[EMA` of `[EMAIL_1]`) is held back, until the
/// next delta decides it or [`StreamRestorer::finish`] lets it out as it is.
pub struct StreamRestorer {
    originals: HashMap<String, String>,
    pending: String,
}

impl StreamRestorer {
    /// Takes the next delta; returns the restored text that is ready, possibly empty.
    pub fn push(&mut self, delta: &str) -> String {
        self.pending.push_str(delta);
        let held_from = self.held_from();
        let mut ready = String::with_capacity(held_from);
        restore_into(&self.originals, &self.pending[..held_from], &mut ready);
        self.pending.drain(..held_from);
        ready
    }

    /// Ends the stream: returns what was held back.
    pub fn finish(self) -> String {
        let mut rest = String::with_capacity(self.pending.len());
        restore_into(&self.originals, &self.pending, &mut rest);
        rest
    }

    /// Where the tail of `pending` that may grow into a placeholder starts, or its length.
    /// A placeholder holds one `[`, at its start, so only the last `[` can begin one.
    fn held_from(&self) -> usize {
        let Some(open) = self.pending.rfind('[') else { return self.pending.len() };
        let tail = &self.pending[open..];
        let may_grow = self
            .originals
            .keys()
            .any(|placeholder| placeholder.len() > tail.len() && placeholder.starts_with(tail));
        if may_grow { open } else { self.pending.len() }
    }
}

impl fmt::Debug for StreamRestorer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamRestorer")
            .field("placeholders", &self.originals.len())
            .field("held_bytes", &self.pending.len())
            .finish()
    }
}

/// The longest placeholder, `[SECRET_` and a number: any `]` further away ends something else.
const MAX_PLACEHOLDER_LEN: usize = 32;

/// `[EMAIL_3]`: a kind's label, `_`, and a number, in brackets.
fn is_placeholder(text: &str) -> bool {
    let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else { return false };
    let Some((label, number)) = inner.rsplit_once('_') else { return false };
    !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && PiiKind::ALL.iter().any(|kind| kind.label() == label)
}

fn restore_into(originals: &HashMap<String, String>, text: &str, out: &mut String) {
    if originals.is_empty() {
        out.push_str(text);
        return;
    }
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let close = tail.bytes().take(MAX_PLACEHOLDER_LEN).position(|byte| byte == b']');
        // Both brackets are ASCII, so these slices fall on char boundaries.
        if let Some(close) = close
            && let Some(original) = originals.get(&tail[..=close])
        {
            out.push_str(original);
            rest = &tail[close + 1..];
        } else {
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
}
