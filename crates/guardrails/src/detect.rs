//! The detectors: a regular expression per shape, then boundaries and validation in code, then
//! one non-overlapping set of findings.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

use crate::checks;
use crate::{Finding, PiiKind};

/// Every finding in `text`, sorted by position, none overlapping. Where candidates overlap a
/// secret wins, then the longest, and on equal spans the more specific kind (see the crate
/// documentation).
pub fn detect(text: &str) -> Vec<Finding> {
    detect_with(text, true)
}

/// [`detect`], optionally without skipping the shapes a text cannot hold (to test that skipping
/// them changes nothing).
fn detect_with(text: &str, skip_impossible: bool) -> Vec<Finding> {
    let mut candidates = Vec::new();
    // Most texts (prose) hold no digit, `@`, `+` or `:`; the shapes that need one are not
    // searched for at all then, which saves a regex search per shape on every message.
    let has_digit = text.bytes().any(|b| b.is_ascii_digit());
    for detector in DETECTORS.iter() {
        let possible = !skip_impossible
            || match detector.needs {
                Needs::Nothing => true,
                Needs::Digit => has_digit,
                Needs::Byte(byte) => text.as_bytes().contains(&byte),
            };
        if !possible {
            continue;
        }
        let mut pos = 0;
        while let Some(found) = detector.regex.find_at(text, pos) {
            let start = found.start();
            match (detector.accept)(text, start, found.end()) {
                Some(end) => {
                    candidates.push(Finding { kind: detector.kind, start, end });
                    pos = end;
                }
                // A shorter or later candidate may start inside a rejected one (`x86 138…` holds
                // the phone `138…`), so retry at the next character, not after the match. Every
                // pattern that can be rejected is bounded in length, which keeps this linear.
                None => pos = start + text[start..].chars().next().map_or(1, char::len_utf8),
            }
            if pos >= text.len() {
                break;
            }
        }
    }
    resolve_overlaps(candidates)
}

/// Checks a regex match: boundaries and validation. Returns the end of the finding (validation
/// may shorten the match, never lengthen it), or `None` to reject it.
type Accept = fn(text: &str, start: usize, end: usize) -> Option<usize>;

struct Detector {
    kind: PiiKind,
    regex: Regex,
    accept: Accept,
    /// What every match of `regex` contains.
    needs: Needs,
}

/// Bytes a detector's matches always contain, so that a text without them is skipped.
#[derive(Clone, Copy)]
enum Needs {
    /// Nothing to rule a text out by (secrets: their regexes start with literal prefixes,
    /// which the regex engine already searches for quickly).
    Nothing,
    /// An ASCII digit.
    Digit,
    /// This byte.
    Byte(u8),
}

/// A local part of dot- or apostrophe-separated atoms (`o'brien`), a domain of labels.
const EMAIL: &str = r"[A-Za-z0-9_%+\-]{1,64}(?:['.][A-Za-z0-9_%+\-]{1,64}){0,8}@[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?){0,8}\.[A-Za-z]{2,24}";
/// `+`, then digit groups separated by at most one space, dash or dot, or in parentheses.
const PHONE_E164: &str = r"\+[0-9]{1,4}(?:[ .\-]?(?:\([0-9]{1,4}\)|[0-9]{1,14})){0,8}";
const PHONE_CN_MOBILE: &str =
    r"(?:(?:\(\+86\)|\+86|0086|86)[ \-]?)?1[3-9][0-9](?:[0-9]{8}|[ \-][0-9]{4}[ \-][0-9]{4})";
const CN_ID: &str = r"[1-9][0-9]{16}[0-9Xx]";
const CARD: &str =
    r"[0-9]{4}[ \-][0-9]{6}[ \-][0-9]{4,5}|[0-9]{4}(?:[ \-][0-9]{4}){2,3}(?:[ \-][0-9]{1,3})?|[0-9]{13,19}";
const IBAN: &str = r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?";
const IPV4: &str = r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}";
const IPV6: &str = r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{1,4})?";
const SECRET_TOKEN: &str = concat!(
    r"sk-[A-Za-z0-9_\-]{20,300}",
    r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,247}",
    r"|gh[pousr]_[A-Za-z0-9]{36,251}",
    r"|github_pat_[A-Za-z0-9_]{22,244}",
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}",
    r"|xox[abposr]-[A-Za-z0-9\-]{10,250}",
    r"|xapp-[0-9]-[A-Za-z0-9\-]{10,250}",
    r"|AIza[0-9A-Za-z_\-]{35}",
    r"|glpat-[A-Za-z0-9_\-]{20,50}",
    r"|hf_[A-Za-z0-9]{30,60}",
    r"|eyJ[A-Za-z0-9_\-]{10,2000}\.eyJ[A-Za-z0-9_\-]{10,4000}\.[A-Za-z0-9_\-]{10,1000}",
);
/// A PEM private key block: BEGIN, lines of base64 (or the headers of an encrypted key), END.
/// Lines may be split by newlines, spaces or the `\n` of a JSON string (a cloud service
/// account file). Only base64 lines of 16 characters or more are taken, and a short last line
/// only before END, so a truncated paste (no END) does not swallow the prose after it.
const SECRET_PEM: &str = concat!(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----",
    r"(?:(?:[ \t\r\n]|\\r|\\n)+(?:[A-Za-z0-9+/=]{16,}|Proc-Type: [0-9A-Z,]+|DEK-Info: [A-Z0-9\-]+,[0-9A-Fa-f]+))*",
    r"(?:(?:(?:[ \t\r\n]|\\r|\\n)+[A-Za-z0-9+/=]{1,15})?(?:[ \t\r\n]|\\r|\\n)*-----END[A-Z0-9 ]*PRIVATE KEY-----)?",
);

static DETECTORS: LazyLock<Vec<Detector>> = LazyLock::new(|| {
    let specs: [(PiiKind, &str, Accept, Needs); 10] = [
        (PiiKind::Email, EMAIL, accept_email, Needs::Byte(b'@')),
        (PiiKind::Phone, PHONE_E164, accept_e164, Needs::Byte(b'+')),
        (PiiKind::Phone, PHONE_CN_MOBILE, accept_cn_mobile, Needs::Digit),
        (PiiKind::CnId, CN_ID, accept_cn_id, Needs::Digit),
        (PiiKind::Card, CARD, accept_card, Needs::Digit),
        (PiiKind::Iban, IBAN, accept_iban, Needs::Digit),
        (PiiKind::Ip, IPV4, accept_ipv4, Needs::Digit),
        (PiiKind::Ip, IPV6, accept_ipv6, Needs::Byte(b':')),
        (PiiKind::Secret, SECRET_TOKEN, accept_token, Needs::Nothing),
        (PiiKind::Secret, SECRET_PEM, accept_pem, Needs::Nothing),
    ];
    specs
        .into_iter()
        .map(|(kind, pattern, accept, needs)| Detector { kind, regex: compile(pattern), accept, needs })
        .collect()
});

#[expect(clippy::expect_used, reason = "the patterns are constants, compiled by every test")]
fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).expect("guardrail patterns compile")
}

/// The kind kept when two candidates cover the same span: lower is more specific.
fn specificity(kind: PiiKind) -> u8 {
    match kind {
        PiiKind::Secret => 0,
        PiiKind::CnId => 1,
        PiiKind::Iban => 2,
        PiiKind::Card => 3,
        PiiKind::Email => 4,
        PiiKind::Phone => 5,
        PiiKind::Ip => 6,
    }
}

fn resolve_overlaps(mut candidates: Vec<Finding>) -> Vec<Finding> {
    // Secrets first whatever their length: `https://ghp_…@github.com` is a token, not an email.
    candidates.sort_by(|a, b| {
        (a.kind != PiiKind::Secret)
            .cmp(&(b.kind != PiiKind::Secret))
            .then((b.end - b.start).cmp(&(a.end - a.start)))
            .then(specificity(a.kind).cmp(&specificity(b.kind)))
            .then(a.start.cmp(&b.start))
    });
    // Accepted findings by start; they never overlap, so only the last one starting before a
    // candidate's end can overlap it.
    let mut accepted: BTreeMap<usize, Finding> = BTreeMap::new();
    for candidate in candidates {
        let overlaps = accepted
            .range(..candidate.end)
            .next_back()
            .is_some_and(|(_, previous)| previous.end > candidate.start);
        if !overlaps {
            accepted.insert(candidate.start, candidate);
        }
    }
    accepted.into_values().collect()
}

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

/// Whether `text[start..end]` stands alone as a number: not glued to an ASCII letter, digit or
/// `_`, nor continued by one of `connectors` and a digit (`20231105-8842`, `1.2.3.4.5`), nor
/// part of a hyphenated identifier (`INV-2023-…`) when `-` is a connector. CJK characters and
/// other punctuation are boundaries. Works on bytes: ASCII bytes never occur inside a
/// multi-byte UTF-8 character.
fn stands_alone(text: &str, start: usize, end: usize, connectors: &[u8]) -> bool {
    let bytes = text.as_bytes();
    let continues = |connector: u8, beyond: Option<&u8>| {
        connectors.contains(&connector)
            && beyond.is_some_and(|&b| b.is_ascii_digit() || (connector == b'-' && b.is_ascii_alphanumeric()))
    };
    if let Some(&previous) = start.checked_sub(1).and_then(|idx| bytes.get(idx)) {
        let beyond = start.checked_sub(2).and_then(|idx| bytes.get(idx));
        if is_word_byte(previous) || continues(previous, beyond) {
            return false;
        }
    }
    let glued_after =
        bytes.get(end).is_some_and(|&next| is_word_byte(next) || continues(next, bytes.get(end + 1)));
    !glued_after
}

fn ascii_digits(text: &str) -> Vec<u8> {
    text.bytes().filter(u8::is_ascii_digit).collect()
}

fn accept_email(text: &str, start: usize, end: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let local_byte = |b: u8| is_word_byte(b) || b"._%+-".contains(&b);
    let glued_before = start.checked_sub(1).and_then(|idx| bytes.get(idx)).is_some_and(|&b| local_byte(b));
    let glued_after = bytes.get(end).is_some_and(|&b| is_word_byte(b) || b == b'-' || b == b'@');
    // `icon@2x.png` is a file name: these endings are not top-level domains.
    let tld = text[start..end].rsplit('.').next().unwrap_or_default().to_ascii_lowercase();
    let file_name = FILE_EXTENSIONS.contains(&tld.as_str());
    (!glued_before && !glued_after && !file_name).then_some(end)
}

const FILE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "pdf", "js", "css", "html", "json", "txt",
    "yaml", "yml", "toml", "lock",
];

fn accept_e164(text: &str, start: usize, end: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    if start.checked_sub(1).and_then(|idx| bytes.get(idx)).is_some_and(|&b| is_word_byte(b) || b == b'+') {
        return None;
    }
    // Split into digit groups, remembering where each ends, then take the longest run of whole
    // groups that is a valid number: `+1 415-555-0132 12 items` ends before ` 12`.
    let mut digits = Vec::new();
    let mut group_ends = Vec::new();
    let mut idx = start + 1;
    while idx < end {
        match bytes[idx] {
            b'(' => {
                let close = idx + bytes[idx..end].iter().position(|&b| b == b')')?;
                // `(0)` is the trunk prefix, written but not dialled: `+44 (0)20 7946 0958`.
                if &bytes[idx..=close] != b"(0)" {
                    digits.extend_from_slice(&bytes[idx + 1..close]);
                }
                idx = close + 1;
                group_ends.push((idx, digits.len()));
            }
            b'0'..=b'9' => {
                let run = bytes[idx..end].iter().take_while(|b| b.is_ascii_digit()).count();
                digits.extend_from_slice(&bytes[idx..idx + run]);
                idx += run;
                group_ends.push((idx, digits.len()));
            }
            _ => idx += 1,
        }
    }
    group_ends.into_iter().rev().find_map(|(group_end, n_digits)| {
        let valid = checks::e164_ok(&digits[..n_digits]) && stands_alone(text, start, group_end, b".-");
        valid.then_some(group_end)
    })
}

fn accept_cn_mobile(text: &str, start: usize, end: usize) -> Option<usize> {
    if !stands_alone(text, start, end, b".-") {
        return None;
    }
    let digits = ascii_digits(&text[start..end]);
    // The regex guarantees the shape; the prefix (86 or 0086) comes before the last 11 digits.
    checks::cn_mobile_ok(&digits[digits.len().saturating_sub(11)..]).then_some(end)
}

fn accept_cn_id(text: &str, start: usize, end: usize) -> Option<usize> {
    let valid = stands_alone(text, start, end, b".-") && checks::cn_id_ok(&text.as_bytes()[start..end]);
    valid.then_some(end)
}

fn accept_card(text: &str, start: usize, end: usize) -> Option<usize> {
    // The grouped form may take a group that follows the number (`5555 5555 5555 4444 2023`):
    // try the whole match, then without its trailing groups.
    let bytes = text.as_bytes();
    let mut digits = Vec::new();
    let mut group_ends = Vec::new();
    for (idx, &byte) in bytes[start..end].iter().enumerate() {
        if byte.is_ascii_digit() {
            digits.push(byte);
            if !bytes.get(start + idx + 1).is_some_and(u8::is_ascii_digit) {
                group_ends.push((start + idx + 1, digits.len()));
            }
        }
    }
    group_ends.into_iter().rev().find_map(|(group_end, n_digits)| {
        let number = &digits[..n_digits];
        let valid = (13..=19).contains(&n_digits)
            && checks::card_prefix_ok(number)
            && checks::luhn_ok(number)
            && stands_alone(text, start, group_end, b".-");
        valid.then_some(group_end)
    })
}

fn accept_iban(text: &str, start: usize, end: usize) -> Option<usize> {
    let candidate = &text.as_bytes()[start..end];
    let expected_len = checks::iban_length(&candidate[..2])?;
    // The regex may take a group too many (`BE68 5390 0754 7034 1234`): cut at the country's
    // length, which must fall on a group boundary.
    let mut compact = Vec::with_capacity(expected_len);
    let mut cut = end;
    for (idx, &byte) in candidate.iter().enumerate() {
        if byte == b' ' {
            continue;
        }
        if compact.len() == expected_len {
            if candidate[idx - 1] != b' ' {
                return None;
            }
            cut = start + idx - 1;
            break;
        }
        compact.push(byte);
    }
    let valid =
        compact.len() == expected_len && checks::iban_ok(&compact) && stands_alone(text, start, cut, b"");
    valid.then_some(cut)
}

fn accept_ipv4(text: &str, start: usize, end: usize) -> Option<usize> {
    (stands_alone(text, start, end, b".") && checks::ipv4_ok(&text[start..end])).then_some(end)
}

fn accept_ipv6(text: &str, start: usize, end: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    if let Some(&previous) = start.checked_sub(1).and_then(|idx| bytes.get(idx)) {
        // `host:2001:db8::1` is fine; a colon after a hex digit means we are mid-address.
        let before_previous = start.checked_sub(2).and_then(|idx| bytes.get(idx)).copied();
        let mid_address =
            previous == b':' && before_previous.is_some_and(|b| b.is_ascii_hexdigit() || b == b':');
        if is_word_byte(previous) || previous == b'.' || mid_address {
            return None;
        }
    }
    let candidate = &text[start..end];
    // A single `:` is never the start of an address (`::` is).
    if candidate.starts_with(':') && !candidate.starts_with("::") {
        return None;
    }
    // A colon that ends a sentence (`at 2001:db8::1: the`) is not part of the address.
    let end = if candidate.ends_with(':') && !candidate.ends_with("::") { end - 1 } else { end };
    let candidate = &text[start..end];
    candidate.parse::<std::net::Ipv6Addr>().ok()?;
    let has_digit = candidate.bytes().any(|b| b.is_ascii_digit());
    let n_groups = candidate.split(':').filter(|group| !group.is_empty()).count();
    // `::1`, `fe80::` and `Add::add` parse, but are not someone's address.
    let plausible = has_digit && (!candidate.contains("::") || n_groups >= 2);
    let glued_after = match bytes.get(end) {
        Some(b':') => bytes.get(end + 1).is_some_and(|&b| b.is_ascii_hexdigit() || b == b':'),
        Some(b'.') => bytes.get(end + 1).is_some_and(u8::is_ascii_digit),
        Some(&next) => is_word_byte(next),
        None => false,
    };
    (plausible && !glued_after).then_some(end)
}

fn accept_token(text: &str, start: usize, end: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let token_byte = |b: u8| is_word_byte(b) || b == b'-';
    if start.checked_sub(1).and_then(|idx| bytes.get(idx)).is_some_and(|&b| token_byte(b)) {
        return None;
    }
    if bytes.get(end).is_some_and(|&b| token_byte(b)) {
        return None;
    }
    let token = &text[start..end];
    if let Some(body) = token.strip_prefix("sk-") {
        // Real keys are random: a digit and a letter. Prose (`sk-learn-…`) and templates
        // (`sk-xxxxxxxx…`) are not keys.
        let random =
            body.bytes().any(|b| b.is_ascii_digit()) && body.bytes().any(|b| b.is_ascii_alphabetic());
        return random.then_some(end);
    }
    Some(end)
}

fn accept_pem(_text: &str, _start: usize, end: usize) -> Option<usize> {
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(PiiKind, &str)> {
        detect(text).into_iter().map(|finding| (finding.kind, &text[finding.start..finding.end])).collect()
    }

    #[test]
    fn chinese_text_without_spaces() {
        assert_eq!(found("我的手机号是13812345678，请联系我"), [(PiiKind::Phone, "13812345678")]);
        assert_eq!(found("身份证号11010519491231002X"), [(PiiKind::CnId, "11010519491231002X")]);
        assert_eq!(found("邮箱zhang.san@example.com谢谢"), [(PiiKind::Email, "zhang.san@example.com")]);
        assert_eq!(found("服务器192.168.1.10挂了"), [(PiiKind::Ip, "192.168.1.10")]);
    }

    #[test]
    fn longest_wins() {
        assert_eq!(found("13812345678@163.com"), [(PiiKind::Email, "13812345678@163.com")]);
        assert_eq!(found("IP ::ffff:192.0.2.1 ok"), [(PiiKind::Ip, "::ffff:192.0.2.1")]);
        assert_eq!(found("+86 138 1234 5678"), [(PiiKind::Phone, "+86 138 1234 5678")]);
    }

    #[test]
    fn phone_groups_are_trimmed() {
        assert_eq!(found("call +1 415-555-0132 12 times"), [(PiiKind::Phone, "+1 415-555-0132")]);
        assert_eq!(found("+44 (0)20 7946 0958"), [(PiiKind::Phone, "+44 (0)20 7946 0958")]);
    }

    #[test]
    fn card_groups_are_trimmed() {
        assert_eq!(found("5555 5555 5555 4444 2023"), [(PiiKind::Card, "5555 5555 5555 4444")]);
        assert_eq!(found("4111-1111-1111-1111-2023"), []);
    }

    #[test]
    fn iban_groups_are_trimmed() {
        assert_eq!(found("BE68 5390 0754 7034 1234"), [(PiiKind::Iban, "BE68 5390 0754 7034")]);
    }

    #[test]
    fn skipping_impossible_shapes_changes_nothing() {
        let corpus = include_str!("../tests/corpus.jsonl");
        let mut texts: Vec<String> = corpus
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|entry| entry["text"].as_str().map(String::from))
            .collect();
        assert!(texts.len() > 200);
        texts.extend(
            ["abcd::ef01 up", "fe80::1", "a@b.co", "+44 20 7946 0958", "Say hello."].map(String::from),
        );
        for text in &texts {
            assert_eq!(detect_with(text, true), detect_with(text, false), "{text}");
        }
    }

    #[test]
    fn no_findings() {
        for text in ["1.2.3.4.5", "2023-11-05 10:30:45", "$1,234.56", "user@", "sk-learn", "::1", "std::vec"]
        {
            assert_eq!(found(text), [], "{text}");
        }
    }
}
