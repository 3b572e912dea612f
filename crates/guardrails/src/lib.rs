//! Privacy guardrails: find personal data and secrets in text, redact them behind typed
//! placeholders before a request leaves for an upstream provider, and put the values back into
//! the answer the client receives.
//!
//! The crate does no IO and knows nothing of HTTP: the server applies a [`Policy`] to each text
//! of a request through a per-request [`Redactor`], maps [`Blocked`] to a 400 with code
//! [`Blocked::CODE`] (`pii_blocked`), and restores placeholders in the answer with
//! [`Redactor::restore`] or, for a stream, a [`StreamRestorer`].
//!
//! # Detectors
//!
//! [`detect`] runs one detector per kind, each a regular expression for the shape followed by a
//! validation, and keeps non-overlapping findings: a secret wins over anything it overlaps
//! (`https://ghp_…@github.com` is a token, not an email), then the longest, and on equal spans
//! the more specific kind, in the order cn_id, iban, card, email, phone, ip.
//!
//! | kind     | shape                                                  | validation                      |
//! |----------|--------------------------------------------------------|---------------------------------|
//! | `email`  | `local@domain.tld`, ASCII, TLD of letters              | lengths (local ≤ 64, labels ≤ 63) |
//! | `phone`  | `+` and 8–15 digits, groups split by space, `-`, `.`, `(…)`; Chinese mobile `1[3-9]` + 9 digits, as `138 1234 5678` / `138-1234-5678`, optionally after `+86`, `0086`, `86` | country code per ITU; national length for +1, +7, +44, +86, +91 and others in a small table |
//! | `cn_id`  | 18 characters, 17 digits and a digit or `X`            | province code, a real birth date (1900–2099), ISO 7064 MOD 11-2 check character |
//! | `card`   | 13–19 digits, plain or in groups (4-4-4-4, 4-6-5, …)   | issuer prefix (Visa, Mastercard, Amex, Discover, JCB, UnionPay, Diners, Maestro, Mir) and length, Luhn |
//! | `iban`   | country, 2 check digits, BBAN; plain or in groups of 4 | length for the country, ISO 13616 mod-97 |
//! | `ip`     | IPv4 dotted quad; IPv6 full, compressed, IPv4-mapped   | octets ≤ 255 without leading zeros; IPv6 parses, holds a digit and, when compressed, two groups |
//! | `secret` | `sk-…`, `sk_live_…`, `rk_live_…`, `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_…`, `github_pat_…`, `AKIA…`/`ASIA…`, `xox?-…`, `xapp-…`, `AIza…`, `glpat-…`, `hf_…`, JWTs, PEM private keys | `sk-` keys must hold a digit and a letter (so `sk-learn` or `sk-xxxx…` are not keys) |
//!
//! Boundaries are the crate's own, not the regex `\b`, so that detection works inside Chinese
//! text without spaces (`我的手机号是13812345678，请联系我`): a number may touch CJK characters or
//! punctuation but not an ASCII letter, digit or `_`, nor a `.` or `-` that continues it with
//! another digit, nor a `-` that joins it to a word (`INV-4111…`). So `20231105-8842`,
//! `1.2.3.4.5`, `v1.2.3.4`, `INV-2023-001234` and the 15-digit order number in
//! `订单号 202311051234567` are not findings.
//!
//! Only ASCII digits count (`[0-9]`, never Unicode `\d`), so full-width digits (`１３８…`) are
//! not detected.
//!
//! # Policy
//!
//! A policy deserialises from this shape (TOML shown):
//!
//! ```toml
//! name = "strict"
//! action = "redact"                        # for every kind not listed in `kinds`
//! kinds = { ip = "allow", secret = "block" }
//! apply_to_responses = false               # optional, default false
//! ```
//!
//! Kinds are `email`, `phone`, `cn_id`, `card`, `iban`, `ip`, `secret`; actions are `allow`,
//! `redact`, `block`. Unknown fields, kinds or actions are errors.
//!
//! # Placeholders
//!
//! A redacted value becomes `[LABEL_N]`, with labels `EMAIL`, `PHONE`, `CN_ID`, `CARD`, `IBAN`,
//! `IP`, `SECRET` and `N` counting from 1 per kind within one [`Redactor`] (one request): the same
//! value gets the same placeholder every time it occurs, in every message of the request.
//! Restoration replaces only placeholders this redactor issued; anything else that looks like
//! one is left as it is.
//!
//! # Responses
//!
//! With `apply_to_responses`, [`Redactor::redact_response`] masks what the *model* wrote, before
//! [`Redactor::restore`] puts the client's own values back. Those placeholders continue the
//! request's numbering and are never restored. Streams can only be restored, not redacted: a
//! value may span deltas, so redacting a stream needs the whole text.
//!
//! # Known limits
//!
//! - Names, postal addresses, dates of birth and free-form identifiers are not detected.
//! - Phones without `+` are detected only as Chinese mobile numbers; landlines such as
//!   `010-12345678` or `(415) 555-0132` are not, so that order and tracking numbers stay
//!   untouched.
//! - 15-digit (pre-1999) Chinese ID numbers are not detected: nothing tells them from order
//!   numbers.
//! - An 18-digit number that is both a valid ID and a Luhn-valid card is reported as `cn_id`.
//! - A 40-character hexadecimal string (a git commit, a SHA-1) is not a secret, nor is any
//!   other high-entropy string without a known prefix.
//! - A four-part version or section number (`1.2.3.4`) looks like an IPv4 address and is one.
//! - Emails with non-ASCII local parts or internationalised domains are not detected, and the
//!   password of a URL (`https://bob:s3cret@db.example.com`) is found as an email: still hidden,
//!   under the wrong label.
//! - IBANs are detected in capitals only.
//! - Values are matched exactly: `138 1234 5678` and `13812345678` get different placeholders.
//! - A client text that itself contains an issued placeholder (`[EMAIL_1]` typed by hand) gets
//!   that placeholder's value back in the answer: only the client's own values can show up so.
//! - File names such as `icon@2x.png` are not emails; an `@` between two words that ends in a
//!   real top-level domain is one.

mod checks;
mod detect;
mod policy;
mod redact;

pub use detect::detect;
pub use policy::{Action, Policy};
pub use redact::{Blocked, Redactor, StreamRestorer};

use serde::{Deserialize, Serialize};

/// What a finding is. Serialised as the lowercase name of [`PiiKind::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    Email,
    Phone,
    CnId,
    Card,
    Iban,
    Ip,
    Secret,
}

impl PiiKind {
    pub const ALL: [PiiKind; 7] = [
        PiiKind::Email,
        PiiKind::Phone,
        PiiKind::CnId,
        PiiKind::Card,
        PiiKind::Iban,
        PiiKind::Ip,
        PiiKind::Secret,
    ];

    /// The stable name used in policies, errors and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::CnId => "cn_id",
            PiiKind::Card => "card",
            PiiKind::Iban => "iban",
            PiiKind::Ip => "ip",
            PiiKind::Secret => "secret",
        }
    }

    /// The label inside a placeholder: `EMAIL` in `[EMAIL_1]`.
    pub fn label(self) -> &'static str {
        match self {
            PiiKind::Email => "EMAIL",
            PiiKind::Phone => "PHONE",
            PiiKind::CnId => "CN_ID",
            PiiKind::Card => "CARD",
            PiiKind::Iban => "IBAN",
            PiiKind::Ip => "IP",
            PiiKind::Secret => "SECRET",
        }
    }
}

impl std::fmt::Display for PiiKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One detected value: its kind and its byte range in the text (always on char boundaries).
/// It holds no copy of the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}
