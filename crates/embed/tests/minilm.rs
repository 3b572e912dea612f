//! The embedder and its batching service on the real all-MiniLM-L6-v2
//! (`python3 scripts/fetch-models.py minilm`). Each test is skipped, saying so, when the model
//! directory is missing.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use ferry_embed::{EmbedError, EmbedInput, EmbedService, EmbedServiceConfig, Embedder, Embedding};

const MINILM: &str = "all-MiniLM-L6-v2";

/// The models directory: FERRY_MODELS_DIR, or models/ at the workspace root (as the engine
/// tests find theirs).
fn model_dir() -> PathBuf {
    std::env::var_os("FERRY_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"))
        .join(MINILM)
}

/// The model, loaded once per test binary; `None` (and a message) when it is not there.
#[expect(clippy::expect_used, reason = "a test helper: failing is its job")]
fn embedder() -> Option<Arc<Embedder>> {
    static EMBEDDER: OnceLock<Option<Arc<Embedder>>> = OnceLock::new();
    let embedder = EMBEDDER.get_or_init(|| {
        let dir = model_dir();
        if !dir.is_dir() {
            return None;
        }
        Some(Arc::new(Embedder::load(&dir).expect("the model loads")))
    });
    if embedder.is_none() {
        eprintln!(
            "SKIPPED: {} is missing: run `python3 scripts/fetch-models.py minilm` first",
            model_dir().display()
        );
    }
    embedder.clone()
}

fn text(s: &str) -> EmbedInput {
    EmbedInput::Text(s.to_owned())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_difference(a: &Embedding, b: &Embedding) -> f32 {
    a.vector.iter().zip(&b.vector).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Texts of very different lengths (2 to about 250 tokens).
fn mixed_texts() -> Vec<String> {
    vec![
        "Hi".to_owned(),
        "A man is eating food.".to_owned(),
        "The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide.".to_owned(),
        "Paris is the capital of France. ".repeat(36),
        "Embeddings map text to vectors; similar meanings land close together.".to_owned(),
        "ok".to_owned(),
    ]
}

#[test]
fn model_shape_and_name() {
    let Some(embedder) = embedder() else { return };
    assert_eq!(embedder.name(), MINILM);
    assert_eq!(embedder.dims(), 384);
    // sentence_bert_config.json's max_seq_length, under the 512 positions.
    assert_eq!(embedder.max_tokens(), 256);
    assert_eq!(embedder.vocab_size(), 30522);
}

#[test]
fn cosines_match_the_reference() {
    let Some(embedder) = embedder() else { return };
    let sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "Someone is having a meal.",
        "The stock market crashed today.",
    ];
    let inputs: Vec<EmbedInput> = sentences.iter().map(|s| text(s)).collect();
    let e = embedder.embed(&inputs).expect("embedded");
    // Recorded with transformers (shared/models.md); vectors are unit length, so dot = cosine.
    let expected = [0.755, 0.689, 0.009];
    for (other, expected) in (1..4).zip(expected) {
        let cosine = dot(&e[0].vector, &e[other].vector);
        eprintln!("cosine({:?}, {:?}) = {cosine:.4}", sentences[0], sentences[other]);
        assert!((cosine - expected).abs() <= 0.01, "{:?}: {cosine} vs {expected}", sentences[other]);
    }
    // [CLS] a man is eating food . [SEP]
    assert_eq!(e[0].n_tokens, 8);
}

#[test]
fn vectors_are_unit_length() {
    let Some(embedder) = embedder() else { return };
    let inputs: Vec<EmbedInput> = mixed_texts().into_iter().map(EmbedInput::Text).collect();
    for embedding in embedder.embed(&inputs).expect("embedded") {
        assert_eq!(embedding.vector.len(), 384);
        let norm = dot(&embedding.vector, &embedding.vector).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
}

#[test]
fn a_batch_equals_one_by_one() {
    let Some(embedder) = embedder() else { return };
    let inputs: Vec<EmbedInput> = mixed_texts().into_iter().map(EmbedInput::Text).collect();
    let batched = embedder.embed(&inputs).expect("embedded");
    assert!(batched.iter().any(|e| e.n_tokens > 250) && batched.iter().any(|e| e.n_tokens < 5));
    for (input, together) in inputs.iter().zip(&batched) {
        let alone = embedder.embed(std::slice::from_ref(input)).expect("embedded");
        assert_eq!(alone[0].n_tokens, together.n_tokens);
        let difference = max_difference(&alone[0], together);
        assert!(difference < 1e-4, "{input:?}: differs by {difference}");
    }
}

#[test]
fn text_and_its_token_ids_give_the_same_vector() {
    let Some(embedder) = embedder() else { return };
    // The ids a client gets from the model's own tokenizer, without special tokens (and without
    // the padding to 128 that tokenizer.json asks for: transformers' AutoTokenizer does not pad).
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).expect("tokenizer");
    tokenizer.with_padding(None);
    for sentence in ["A man is eating food.", "Tokenisation: don't split—or do?", "ok"] {
        let ids = tokenizer.encode(sentence, false).expect("encoded").get_ids().to_vec();
        let e = embedder.embed(&[text(sentence), EmbedInput::Tokens(ids.clone())]).expect("embedded");
        assert_eq!(e[0].n_tokens, ids.len() + 2, "{sentence:?}: [CLS] and [SEP] are counted");
        assert_eq!(e[0].n_tokens, e[1].n_tokens);
        let difference = max_difference(&e[0], &e[1]);
        assert!(difference < 1e-6, "{sentence:?}: differs by {difference}");
    }
}

#[test]
fn bad_inputs_are_client_errors() {
    let Some(embedder) = embedder() else { return };
    let check = |inputs: Vec<EmbedInput>, expected: EmbedError| {
        let error = embedder.embed(&inputs).expect_err("refused");
        assert_eq!(error, expected);
        assert!(error.is_client_error());
        eprintln!("{error}");
    };
    check(vec![], EmbedError::NoInput);
    check(vec![text("fine"), text("")], EmbedError::EmptyInput { index: 1 });
    check(vec![EmbedInput::Tokens(vec![])], EmbedError::EmptyInput { index: 0 });
    // "word" is one token: 300 of them and [CLS], [SEP].
    check(vec![text(&"word ".repeat(300))], EmbedError::TooLong { index: 0, n_tokens: 302, max_tokens: 256 });
    check(
        vec![text("fine"), EmbedInput::Tokens(vec![2773; 255])],
        EmbedError::TooLong { index: 1, n_tokens: 257, max_tokens: 256 },
    );
    check(
        vec![EmbedInput::Tokens(vec![101, 30522, 102])],
        EmbedError::TokenOutOfVocab { index: 0, token: 30522, vocab_size: 30522 },
    );
    check(
        vec![text("x"); ferry_embed::MAX_INPUTS + 1],
        EmbedError::TooManyInputs {
            n_inputs: ferry_embed::MAX_INPUTS + 1,
            max_inputs: ferry_embed::MAX_INPUTS,
        },
    );
    // The longest valid inputs: 254 ids and the two special tokens; the last id in the vocabulary.
    let e = embedder.embed(&[EmbedInput::Tokens(vec![2773; 254]), EmbedInput::Tokens(vec![30521])]);
    assert_eq!(e.expect("at the limits").iter().map(|e| e.n_tokens).collect::<Vec<_>>(), [256, 3]);
}

/// Checks a service's answer against the embedder run on that request alone.
#[expect(clippy::expect_used, reason = "a test helper: failing is its job")]
fn check_answer(embedder: &Embedder, request: &[EmbedInput], answer: &ferry_embed::EmbedOutput) {
    let alone = embedder.embed(request).expect("embedded");
    assert_eq!(answer.embeddings.len(), request.len());
    assert_eq!(answer.n_tokens, alone.iter().map(|e| e.n_tokens).sum::<usize>());
    for (served, alone) in answer.embeddings.iter().zip(&alone) {
        assert_eq!(served.n_tokens, alone.n_tokens);
        assert!(max_difference(served, alone) < 1e-4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_forward_passes() {
    let Some(embedder) = embedder() else { return };
    // A small budget, so that the long request needs several passes.
    let config = EmbedServiceConfig { max_batch_tokens: 1024, ..EmbedServiceConfig::default() };
    let long: Vec<EmbedInput> =
        (0..16).map(|i| text(&format!("{i} {}", "Lorem ipsum dolor sit amet. ".repeat(24)))).collect();
    let long_passes = {
        let alone = EmbedService::start(embedder.clone(), config).expect("started");
        alone.embed(long.clone()).await.expect("embedded");
        alone.batches_run()
    };
    assert!(long_passes >= 3, "{long_passes}");

    let mut small_requests: Vec<Vec<EmbedInput>> = Vec::new();
    for i in 0..10 {
        let mut request = vec![text(&format!("Request {i} asks about the weather in town number {i}."))];
        if i % 3 == 0 {
            request.push(EmbedInput::Tokens(vec![101 + i, 2000, 3000]));
            request.push(text(&mixed_texts()[i as usize % 6]));
        }
        small_requests.push(request);
    }

    // The long request first, and the small ones once its first pass is done: they queue up
    // while the model thread works through the rest of it, and are then embedded together.
    let service = EmbedService::start(embedder.clone(), config).expect("started");
    let long_task = {
        let service = service.clone();
        let long = long.clone();
        tokio::spawn(async move { service.embed(long).await })
    };
    while service.batches_run() == 0 && !long_task.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let small_tasks: Vec<_> = small_requests
        .iter()
        .cloned()
        .map(|request| {
            let service = service.clone();
            tokio::spawn(async move { service.embed(request).await })
        })
        .collect();
    // One bad request among them fails alone, without reaching the model thread.
    assert_eq!(service.embed(vec![text("fine"), text("")]).await, Err(EmbedError::EmptyInput { index: 1 }));

    check_answer(&embedder, &long, &long_task.await.expect("joined").expect("embedded"));
    for (request, task) in small_requests.iter().zip(small_tasks) {
        check_answer(&embedder, request, &task.await.expect("joined").expect("embedded"));
    }
    let small_passes = service.batches_run() - long_passes;
    eprintln!("{} small requests ran in {small_passes} forward passes", small_requests.len());
    assert!(small_passes < small_requests.len() as u64, "{small_passes} passes");
}

#[tokio::test]
async fn the_service_answers_after_a_dropped_request() {
    let Some(embedder) = embedder() else { return };
    let service = EmbedService::start(embedder, EmbedServiceConfig::default()).expect("started");
    // A caller that gives up (its task aborted, before or after its request was queued) does
    // not stop the service.
    let given_up = {
        let service = service.clone();
        tokio::spawn(async move { service.embed(vec![text("never awaited")]).await })
    };
    given_up.abort();
    let answer = service.embed(vec![text("A man is eating food.")]).await.expect("embedded");
    assert_eq!(answer.n_tokens, 8);
    assert_eq!(service.embedder().name(), MINILM);
}
