//! Redaction, blocking and restoration through the public API.

use std::collections::BTreeMap;

use ferry_guardrails::{Action, Blocked, PiiKind, Policy, Redactor, detect};

fn policy(action: Action, kinds: &[(PiiKind, Action)]) -> Policy {
    Policy {
        name: "test".to_owned(),
        action,
        kinds: kinds.iter().copied().collect(),
        apply_to_responses: false,
    }
}

fn redact_all() -> Policy {
    policy(Action::Redact, &[])
}

#[test]
fn same_value_same_placeholder_numbered_per_kind() {
    let mut redactor = Redactor::new();
    let text = "Mail a@example.com, then b@example.com, then a@example.com again; call 13812345678.";
    let redacted = redactor.redact(&redact_all(), text).unwrap();
    assert_eq!(redacted, "Mail [EMAIL_1], then [EMAIL_2], then [EMAIL_1] again; call [PHONE_1].");
    // A second message of the same request continues the numbering and reuses placeholders.
    let second = redactor.redact(&redact_all(), "b@example.com or c@example.com").unwrap();
    assert_eq!(second, "[EMAIL_2] or [EMAIL_3]");
    assert_eq!(redactor.restore(&redacted), text);
    assert_eq!(redactor.counts(), BTreeMap::from([(PiiKind::Email, 5), (PiiKind::Phone, 1)]));
}

#[test]
fn placeholder_text_the_user_wrote_is_never_issued_nor_restored() {
    // The user's literal "[EMAIL_1]" (in this message and the next) must reach the provider and
    // come back as written; the real address gets a number no message holds.
    let mut redactor = Redactor::new();
    let (first, second) =
        ("the token [EMAIL_1] is literal; real one is bob@example.org", "see also [EMAIL_2]");
    redactor.reserve_literals(first);
    redactor.reserve_literals(second);
    let redacted = redactor.redact(&redact_all(), first).unwrap();
    assert_eq!(redacted, "the token [EMAIL_1] is literal; real one is [EMAIL_3]");
    assert_eq!(redactor.redact(&redact_all(), second).unwrap(), second);
    assert_eq!(
        redactor.restore("[EMAIL_1] and [EMAIL_2] stay, [EMAIL_3] is bob"),
        "[EMAIL_1] and [EMAIL_2] stay, bob@example.org is bob"
    );
    // Within one text, redact reserves by itself; brackets near multi-byte text are safe.
    let mut alone = Redactor::new();
    assert_eq!(alone.redact(&redact_all(), "[EMAIL_1] é[ a@b.co").unwrap(), "[EMAIL_1] é[ [EMAIL_2]");
}

#[test]
fn round_trip_of_every_kind() {
    let text = "email a@example.com phone +44 20 7946 0958 id 11010519491231002X card 4111 1111 1111 1111 \
                iban GB82WEST12345698765432 ip 2001:db8::1 key sk-proj-a1B2c3D4e5F6g7H8i9J0k1L2";
    let mut redactor = Redactor::new();
    let redacted = redactor.redact(&redact_all(), text).unwrap();
    assert_eq!(
        redacted,
        "email [EMAIL_1] phone [PHONE_1] id [CN_ID_1] card [CARD_1] iban [IBAN_1] ip [IP_1] key [SECRET_1]"
    );
    assert!(detect(&redacted).is_empty(), "placeholders are not findings");
    assert_eq!(redactor.restore(&redacted), text);
    let counts = redactor.counts();
    assert!(PiiKind::ALL.iter().all(|kind| counts.get(kind) == Some(&1)), "{counts:?}");
}

#[test]
fn chinese_text() {
    let mut redactor = Redactor::new();
    let text = "我的手机号是13812345678，身份证号11010519491231002X，邮箱zhang.san@qq.com，请联系我";
    let redacted = redactor.redact(&redact_all(), text).unwrap();
    assert_eq!(redacted, "我的手机号是[PHONE_1]，身份证号[CN_ID_1]，邮箱[EMAIL_1]，请联系我");
    assert_eq!(redactor.restore("好的，我会打[PHONE_1]联系您"), "好的，我会打13812345678联系您");
    // An ID with a wrong check digit and a 15-digit order number stay.
    let untouched = "身份证号110105194912310021，订单号 202311051234567";
    assert_eq!(redactor.redact(&redact_all(), untouched).unwrap(), untouched);
}

#[test]
fn block_names_kinds_never_values() {
    let strict = policy(Action::Redact, &[(PiiKind::Card, Action::Block), (PiiKind::Secret, Action::Block)]);
    let mut redactor = Redactor::new();
    let text = "pay with 4111111111111111 using key sk-a1B2c3D4e5F6g7H8i9J0k1L2 for a@example.com";
    let blocked = redactor.redact(&strict, text).unwrap_err();
    assert_eq!(blocked, Blocked { kinds: vec![PiiKind::Card, PiiKind::Secret] });
    let message = blocked.to_string();
    assert_eq!(message, "the privacy policy blocks this content: it contains card, secret");
    assert!(!message.contains("4111") && !message.contains("sk-"));
    assert_eq!(Blocked::CODE, "pii_blocked");
    // Nothing was issued: the email of a blocked text got no placeholder.
    assert!(redactor.counts().is_empty());
    assert_eq!(redactor.redact(&strict, "a@example.com").unwrap(), "[EMAIL_1]");
}

#[test]
fn per_kind_overrides() {
    let allow_ips = policy(Action::Redact, &[(PiiKind::Ip, Action::Allow)]);
    let mut redactor = Redactor::new();
    let redacted = redactor.redact(&allow_ips, "host 10.0.0.1 owned by ops@example.com").unwrap();
    assert_eq!(redacted, "host 10.0.0.1 owned by [EMAIL_1]");

    let only_secrets = policy(Action::Allow, &[(PiiKind::Secret, Action::Redact)]);
    let text = "ops@example.com uses ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    assert_eq!(redactor.redact(&only_secrets, text).unwrap(), "ops@example.com uses [SECRET_1]");
    assert_eq!(redactor.counts(), BTreeMap::from([(PiiKind::Email, 1), (PiiKind::Secret, 1)]));
}

#[test]
fn policy_from_toml() {
    let parsed: Policy = toml::from_str(
        r#"
        name = "strict"
        action = "redact"
        kinds = { ip = "allow", secret = "block", cn_id = "block" }
        apply_to_responses = true
        "#,
    )
    .unwrap();
    assert_eq!(parsed.name, "strict");
    assert_eq!(parsed.action_for(PiiKind::Ip), Action::Allow);
    assert_eq!(parsed.action_for(PiiKind::CnId), Action::Block);
    assert_eq!(parsed.action_for(PiiKind::Email), Action::Redact);
    assert!(parsed.apply_to_responses);

    let minimal: Policy = toml::from_str("name = \"open\"\naction = \"allow\"").unwrap();
    assert!(minimal.kinds.is_empty() && !minimal.apply_to_responses);

    for wrong in [
        "name = \"x\"\naction = \"mask\"",
        "name = \"x\"\naction = \"allow\"\nkinds = { ssn = \"block\" }",
        "name = \"x\"\naction = \"allow\"\nextra = 1",
        "name = \"x\"",
    ] {
        assert!(toml::from_str::<Policy>(wrong).is_err(), "{wrong}");
    }
}

#[test]
fn unknown_placeholders_are_left_alone() {
    let mut redactor = Redactor::new();
    redactor.redact(&redact_all(), "a@example.com").unwrap();
    let answer = "[EMAIL_1] [EMAIL_2] [PHONE_1] [EMAIL_1 [EMAIL_1]] [[EMAIL_1]] [email_1]";
    assert_eq!(
        redactor.restore(answer),
        "a@example.com [EMAIL_2] [PHONE_1] [EMAIL_1 a@example.com] [a@example.com] [email_1]"
    );
}

#[test]
fn responses() {
    let mut on_responses = redact_all();
    on_responses.apply_to_responses = true;
    let mut redactor = Redactor::new();
    redactor.redact(&on_responses, "I am a@example.com").unwrap();
    // The model saw `[EMAIL_1]`; it answers with it and with an address of its own.
    let answer = "Hello [EMAIL_1], write to b@example.com or call 13812345678.";
    let masked = redactor.redact_response(&on_responses, answer).unwrap();
    assert_eq!(masked, "Hello [EMAIL_1], write to [EMAIL_2] or call [PHONE_1].");
    assert_eq!(redactor.restore(&masked), "Hello a@example.com, write to [EMAIL_2] or call [PHONE_1].");
    assert_eq!(redactor.response_counts(), BTreeMap::from([(PiiKind::Email, 1), (PiiKind::Phone, 1)]));
    assert_eq!(redactor.counts(), BTreeMap::from([(PiiKind::Email, 1)]));

    // Without `apply_to_responses` the answer passes as it is.
    assert_eq!(redactor.redact_response(&redact_all(), answer).unwrap(), answer);

    let mut blocking = policy(Action::Allow, &[(PiiKind::Secret, Action::Block)]);
    blocking.apply_to_responses = true;
    let blocked = redactor.redact_response(&blocking, "here: AKIAIOSFODNN7EXAMPLE").unwrap_err();
    assert_eq!(blocked.kinds, [PiiKind::Secret]);
}

#[test]
fn debug_shows_no_values() {
    let mut redactor = Redactor::new();
    redactor.redact(&redact_all(), "a@example.com").unwrap();
    let debug = format!("{redactor:?} {:?}", redactor.stream_restorer());
    assert!(!debug.contains("example"), "{debug}");
}

/// The answer a model might stream back: issued placeholders, an unknown one, broken ones,
/// stray brackets, CJK and emoji.
const ANSWER: &str = "Hi [EMAIL_1]! 你的电话[PHONE_1]已记录😀 [EMAIL_12] [EMAIL_2] [CARD_1 oops [ [[PHONE_1]] \
                      end [EMA";

#[expect(clippy::unwrap_used, reason = "a test helper")]
fn stream_redactor() -> Redactor {
    let mut redactor = Redactor::new();
    redactor.redact(&redact_all(), "a@example.com 13812345678 b@example.com").unwrap();
    redactor
}

fn char_boundaries(text: &str) -> Vec<usize> {
    text.char_indices().map(|(idx, _)| idx).chain([text.len()]).collect()
}

#[test]
fn stream_restorer_every_split() {
    let redactor = stream_redactor();
    let expected = redactor.restore(ANSWER);
    assert!(expected.contains("a@example.com") && expected.contains("[13812345678]"));
    let boundaries = char_boundaries(ANSWER);
    for &first in &boundaries {
        for &second in boundaries.iter().filter(|&&b| b >= first) {
            let mut restorer = redactor.stream_restorer();
            let mut streamed = restorer.push(&ANSWER[..first]);
            streamed += &restorer.push(&ANSWER[first..second]);
            streamed += &restorer.push(&ANSWER[second..]);
            streamed += &restorer.finish();
            assert_eq!(streamed, expected, "split at {first} and {second}");
        }
    }
}

#[test]
fn stream_restorer_char_by_char_holds_back_only_placeholder_prefixes() {
    let redactor = stream_redactor();
    let mut restorer = redactor.stream_restorer();
    let mut streamed = String::new();
    for ch in ANSWER.chars() {
        let out = restorer.push(ch.encode_utf8(&mut [0; 4]));
        // Plain text comes out at once.
        if ch != '[' && !ch.is_ascii_uppercase() && ch != '_' && !ch.is_ascii_digit() {
            assert!(!out.is_empty() || ch == ']', "{ch:?} held back");
        }
        streamed += &out;
    }
    streamed += &restorer.finish();
    assert_eq!(streamed, redactor.restore(ANSWER));

    let mut restorer = redactor.stream_restorer();
    assert_eq!(restorer.push("ok [EMA"), "ok ");
    assert_eq!(restorer.push("IL_1] done"), "a@example.com done");
    assert_eq!(restorer.push("[EMAIL_"), "");
    assert_eq!(restorer.push("3"), "[EMAIL_3", "no such placeholder was issued");
    assert_eq!(restorer.push(" [PHO"), " ");
    assert_eq!(restorer.finish(), "[PHO");
}

/// A small deterministic generator, so the test needs no `rand`.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % below
    }
}

#[test]
fn arbitrary_unicode_never_panics_and_round_trips() {
    const PIECES: &[&str] = &[
        "a",
        "Z",
        "x",
        "_",
        "-",
        ".",
        ":",
        "+",
        "@",
        " ",
        "\n",
        "[",
        "]",
        "(",
        ")",
        "0",
        "1",
        "3",
        "8",
        "9",
        "X",
        "中",
        "文",
        "，",
        "。",
        "😀",
        "👨‍👩‍👧",
        "é",
        "\u{0301}",
        "１",
        "３",
        "＠",
        "13812345678",
        "4111111111111111",
        "a@b.co",
        "2001:db8::",
        "192.168.",
        "1.1",
        "sk-",
        "a1B2c3D4e5F6g7H8i9J0",
        "GB82WEST",
        "12345698765432",
        "11010519491231002X",
        "+86 ",
        "-----BEGIN PRIVATE KEY-----",
        "-----END PRIVATE KEY-----",
        "AKIA",
    ];
    let mut rng = Lcg(7);
    let mut n_findings = 0;
    for _ in 0..3000 {
        let text: String = (0..rng.next(24)).map(|_| PIECES[rng.next(PIECES.len())]).collect();
        let findings = detect(&text);
        let mut previous_end = 0;
        for finding in &findings {
            assert!(finding.start >= previous_end && finding.start < finding.end, "{text:?}");
            assert!(text.is_char_boundary(finding.start) && text.is_char_boundary(finding.end), "{text:?}");
            previous_end = finding.end;
        }
        n_findings += findings.len();
        let mut redactor = Redactor::new();
        let redacted = redactor.redact(&redact_all(), &text).unwrap();
        assert_eq!(redactor.restore(&redacted), text);
        let mut restorer = redactor.stream_restorer();
        let split = char_boundaries(&redacted)[rng.next(redacted.chars().count() + 1)];
        let streamed =
            restorer.push(&redacted[..split]) + &restorer.push(&redacted[split..]) + &restorer.finish();
        assert_eq!(streamed, redactor.restore(&redacted), "{redacted:?}");
    }
    assert!(n_findings > 500, "the generator should produce findings, got {n_findings}");
}

#[test]
fn long_inputs_stay_fast() {
    // Pathological runs: long digit strings, hex-and-colon soup, an unterminated key block.
    let inputs = [
        "1".repeat(200_000),
        "a:".repeat(100_000),
        format!("-----BEGIN PRIVATE KEY-----{}", "A".repeat(200_000)),
        "x@".repeat(100_000),
        "sk-".repeat(70_000),
        "1.".repeat(100_000),
    ];
    let started = std::time::Instant::now();
    for input in &inputs {
        detect(input);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
}

#[test]
fn truncated_key_does_not_swallow_what_follows() {
    let line = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKB";
    let truncated = format!("-----BEGIN PRIVATE KEY-----\n{line}\n{line}");
    let full = format!("-----BEGIN PRIVATE KEY-----\n{line}\nAb3=\n-----END PRIVATE KEY-----");
    let text = format!("first {truncated}\nthen some words and a@example.com\nlater {full}\nbye");
    let found: Vec<_> = detect(&text).into_iter().map(|f| (f.kind, &text[f.start..f.end])).collect();
    assert_eq!(
        found,
        [
            (PiiKind::Secret, truncated.as_str()),
            (PiiKind::Email, "a@example.com"),
            (PiiKind::Secret, full.as_str())
        ]
    );
}
