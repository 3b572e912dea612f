//! Precision and recall of `detect` per kind over the labelled corpus in `corpus.jsonl`
//! (written by `corpus_gen.py`). A finding is a true positive when its kind and exact span
//! match a label.

use std::collections::BTreeMap;
use std::io::Write;

use ferry_guardrails::{PiiKind, detect};

const MIN_SCORE: f64 = 0.95;

#[derive(Default)]
struct Score {
    lines: usize,
    true_positives: usize,
    false_positives: usize,
    false_negatives: usize,
}

impl Score {
    fn precision(&self) -> f64 {
        ratio(self.true_positives, self.true_positives + self.false_positives)
    }
    fn recall(&self) -> f64 {
        ratio(self.true_positives, self.true_positives + self.false_negatives)
    }
}

fn ratio(numerator: usize, denominator: usize) -> f64 {
    if denominator == 0 { 1.0 } else { numerator as f64 / denominator as f64 }
}

/// The labelled spans of one corpus line, located in order of appearance.
#[expect(clippy::unwrap_used, reason = "a test helper")]
fn expected_spans(text: &str, labels: &[(String, String)]) -> Vec<(PiiKind, usize, usize)> {
    let mut from = 0;
    labels
        .iter()
        .map(|(kind, substring)| {
            let kind: PiiKind = serde_json::from_value(serde_json::Value::String(kind.clone())).unwrap();
            let start = from + text[from..].find(substring.as_str()).unwrap();
            from = start + substring.len();
            (kind, start, from)
        })
        .collect()
}

#[test]
fn corpus_precision_and_recall() {
    let corpus = include_str!("corpus.jsonl");
    let mut scores: BTreeMap<PiiKind, Score> =
        PiiKind::ALL.into_iter().map(|k| (k, Score::default())).collect();
    let mut negative_lines = 0;
    let mut mistakes = Vec::new();
    for (line_idx, line) in corpus.lines().enumerate() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = entry["text"].as_str().unwrap();
        let labels: Vec<(String, String)> = serde_json::from_value(entry["expect"].clone()).unwrap();
        let expected = expected_spans(text, &labels);
        if expected.is_empty() {
            negative_lines += 1;
        }
        let mut kinds_in_line: Vec<PiiKind> = expected.iter().map(|e| e.0).collect();
        kinds_in_line.dedup();
        for kind in kinds_in_line {
            scores.get_mut(&kind).unwrap().lines += 1;
        }
        let found: Vec<(PiiKind, usize, usize)> =
            detect(text).into_iter().map(|f| (f.kind, f.start, f.end)).collect();
        for span in &found {
            let score = scores.get_mut(&span.0).unwrap();
            if expected.contains(span) {
                score.true_positives += 1;
            } else {
                score.false_positives += 1;
                mistakes.push(format!(
                    "line {}: unexpected {} {:?} in {text:?}",
                    line_idx + 1,
                    span.0,
                    &text[span.1..span.2]
                ));
            }
        }
        for span in &expected {
            if !found.contains(span) {
                scores.get_mut(&span.0).unwrap().false_negatives += 1;
                mistakes.push(format!(
                    "line {}: missed {} {:?} in {text:?}",
                    line_idx + 1,
                    span.0,
                    &text[span.1..span.2]
                ));
            }
        }
    }

    let mut report = format!(
        "guardrails corpus: {} lines, {} without any finding\n{:<8} {:>6} {:>6} {:>4} {:>4} {:>9} {:>7}\n",
        corpus.lines().count(),
        negative_lines,
        "kind",
        "lines",
        "tp",
        "fp",
        "fn",
        "precision",
        "recall"
    );
    for (kind, score) in &scores {
        report += &format!(
            "{:<8} {:>6} {:>6} {:>4} {:>4} {:>9.3} {:>7.3}\n",
            kind.as_str(),
            score.lines,
            score.true_positives,
            score.false_positives,
            score.false_negatives,
            score.precision(),
            score.recall()
        );
    }
    for mistake in &mistakes {
        report += &format!("{mistake}\n");
    }
    // Straight to the process's stderr, past the test harness's capture, so the table shows
    // on every run; and into the target directory for later reading.
    let _ = std::io::stderr().write_all(report.as_bytes());
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("guardrails-corpus.txt"),
        &report,
    );

    assert!(corpus.lines().count() >= 200);
    for (kind, score) in &scores {
        assert!(score.lines >= 25, "{kind}: only {} lines in the corpus", score.lines);
        assert!(score.precision() >= MIN_SCORE, "{kind}: precision {:.3}\n{report}", score.precision());
        assert!(score.recall() >= MIN_SCORE, "{kind}: recall {:.3}\n{report}", score.recall());
    }
}
