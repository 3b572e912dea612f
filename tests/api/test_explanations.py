"""Input attribution (`POST /v1/explanations`) on the real models, for both occlusion methods
(`mask`, the default, and `remove`): the fact an answer depends on gets the highest score
among distractors, scores are reproducible, variants are scored in batched engine steps, and
the total agrees with /v1/completions' echo logprobs."""
import os

import httpx
import pytest

from conftest import MODEL_ID, MODELS_DIR, Server

QWEN_FILE = os.path.join(MODELS_DIR, "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
QWEN_ID = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M"

# (context sentences, question, index of the sentence holding the fact, answer). Each answer
# must come from its fact, not from the model's priors: exact removal (`remove`) must score the
# fact positive. A case "The party is on Friday." -> "Friday" failed that on SmolLM2 (the bare
# day was likelier without any of the facts, as it was for Thursday, Tuesday and Saturday), so
# the party's case asks for a room number instead.
CASES = [
    ("Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo.", "Where does Alice live?", 0, "Paris"),
    ("Bob lives in Rome. Alice lives in Paris. Carol lives in Oslo.", "Where does Alice live?", 1, "Paris"),
    ("Bob lives in Rome. Carol lives in Oslo. Alice lives in Paris.", "Where does Alice live?", 2, "Paris"),
    ("The red box holds apples. The blue box holds keys. The green box holds coins.", "What is in the blue box?", 1,
     "Keys"),
    ("Tom's favourite colour is green. Mia's favourite colour is purple. Sam's favourite colour is orange.",
     "What is Mia's favourite colour?", 1, "Purple"),
    ("The meeting is in room 12. The exam is in room 40. The party is in room 7.", "Which room is the party in?", 2,
     "Room 7"),
    ("Lily has a cat named Tom. Max has a dog named Rex. Ben has a parrot named Kiwi.",
     "What is the name of Lily's cat?", 0, "Tom"),
    ("The train leaves at 9 am. The ferry leaves at 4 pm. The bus leaves at 11 am.", "When does the ferry leave?", 1,
     "4 pm"),
    ("Anna works as a nurse. Emma works as a chef. David works as a pilot.", "What does David do?", 2, "A pilot"),
    ("Our office is in Lisbon. Our warehouse is in Porto. Our shop is in Faro.", "Where is the warehouse?", 1,
     "Porto"),
]


def explain(url, model, content, completion, granularity="sentence", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "completion": completion,
            "granularity": granularity, **extra}
    return httpx.post(url + "/v1/explanations", json=body, timeout=300)


@pytest.fixture(scope="module")
def qwen():
    if not os.path.exists(QWEN_FILE):
        pytest.skip("run python3 scripts/fetch-models.py qwen2.5")
    s = Server("--model", QWEN_FILE, "--parallel", "8", "--ctx-size", "512", model=False)
    yield s
    s.stop()


METHODS = ["remove", "mask"]
# Cases out of ten where the fact's sentence must score highest (issue 6: at least 9). Measured
# (bench/explain_cases.py, 2026-11-30): removal 10 and 10; masking, approximate (the cells after
# a masked sentence still saw it), 9 on SmolLM2 (the warehouse case) and 10 on Qwen2.5.
AT_LEAST = 9


def faithfulness(url, model, occlusion):
    hits = 0
    for facts, question, fact, answer in CASES:
        r = explain(url, model, f"{facts} {question}", answer, occlusion=occlusion)
        assert r.status_code == 200, r.text
        scores = [s["score"] for s in r.json()["segments"]]
        assert len(scores) == 4
        assert r.json()["occlusion"] == occlusion
        hits += max(range(4), key=scores.__getitem__) == fact
    print(f"{model} ({occlusion}): the fact's sentence scored highest in {hits} of {len(CASES)} cases")
    return hits


@pytest.mark.parametrize("occlusion", METHODS)
def test_the_fact_gets_the_highest_attribution_smollm2(server, occlusion):
    assert faithfulness(server.url, MODEL_ID, occlusion) >= AT_LEAST


@pytest.mark.parametrize("occlusion", METHODS)
def test_the_fact_gets_the_highest_attribution_qwen(qwen, occlusion):
    assert faithfulness(qwen.url, QWEN_ID, occlusion) >= AT_LEAST


@pytest.mark.parametrize("occlusion", METHODS)
def test_scores_are_reproducible_and_variants_are_batched(server, occlusion):
    facts, question, _, answer = CASES[3]
    first = explain(server.url, MODEL_ID, f"{facts} {question}", answer, occlusion=occlusion).json()
    second = explain(server.url, MODEL_ID, f"{facts} {question}", answer, occlusion=occlusion).json()
    assert [s["score"] for s in first["segments"]] == [s["score"] for s in second["segments"]]
    assert first["total_logprob"] == second["total_logprob"]
    # Five sequences (the whole conversation and four occlusions) in fewer engine steps
    # than sequences: the full conversation once, then the variants forked from it together.
    assert first["variants"] == 5
    assert first["engine_steps"] <= 3
    # The shared prefix is computed once: far fewer tokens than five whole sequences (masking
    # recomputes only the turn's end and the completion).
    n = len(first["scored_token_ids"])
    assert first["computed_tokens"] < (2 * n if occlusion == "mask" else 4 * n)
    shares = [s["share"] for s in first["segments"]]
    assert abs(sum(shares) - 1) < 1e-9 and all(0 <= s <= 1 for s in shares)
    segment = first["segments"][1]
    content = f"{facts} {question}"
    assert content[segment["start"]:segment["end"]] == segment["text"] == "The blue box holds keys."


@pytest.mark.parametrize("occlusion", METHODS)
def test_total_logprob_equals_completions_echo(server, occlusion):
    r = explain(server.url, MODEL_ID, "Alice lives in Paris. Where does Alice live?", "Alice lives in Paris",
                occlusion=occlusion).json()
    tokens = r["scored_token_ids"]
    echo = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL_ID, "prompt": tokens, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
    }, timeout=120).json()
    logprobs = echo["choices"][0]["logprobs"]["token_logprobs"][:len(tokens)]
    total = sum(logprobs[r["completion_start"]:])
    assert abs(total - r["total_logprob"]) < 1e-3
    assert abs(sum(t["logprob"] for t in r["tokens"]) - r["total_logprob"]) < 1e-3
    assert len(r["tokens"][0]["top_logprobs"]) == 5


@pytest.mark.parametrize("occlusion", METHODS)
def test_granularities(server, occlusion):
    content = "Alice lives in Paris. Where does Alice live?"
    by_message = explain(server.url, MODEL_ID, content, "Paris", "message", occlusion=occlusion).json()
    assert [(s["message_index"], s["text"]) for s in by_message["segments"]] == [(0, content)]
    # Without the whole message the answer is far less likely.
    assert by_message["segments"][0]["score"] > 1
    by_token = explain(server.url, MODEL_ID, content, "Paris", "token", occlusion=occlusion).json()
    assert len(by_token["segments"]) > 8
    assert "".join(s["text"] for s in by_token["segments"]) == content


def test_several_messages(server):
    # Segments of every message, the system prompt included; masking finds each in the
    # rendered template and agrees with removal on which sentence matters.
    messages = [{"role": "system", "content": "You answer briefly. Bob lives in Rome."},
                {"role": "user", "content": "Alice lives in Paris. Where does Alice live?"}]
    for occlusion in METHODS:
        r = httpx.post(server.url + "/v1/explanations", json={
            "model": MODEL_ID, "messages": messages, "completion": "Paris", "occlusion": occlusion}, timeout=300)
        assert r.status_code == 200, r.text
        segments = r.json()["segments"]
        assert [(s["message_index"], s["text"]) for s in segments] == [
            (0, "You answer briefly."), (0, "Bob lives in Rome."), (1, "Alice lives in Paris."),
            (1, "Where does Alice live?")]
        assert max(segments, key=lambda s: s["score"])["text"] == "Alice lives in Paris.", (occlusion, segments)


def test_bad_requests(server):
    r = httpx.post(server.url + "/v1/explanations", json={"model": MODEL_ID, "completion": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = explain(server.url, MODEL_ID, "word " * 400, "word", "token")
    assert r.status_code == 400 and "segments" in r.json()["error"]["message"]
    r = explain(server.url, "no-such-model", "Hi", "Hello")
    assert r.status_code == 404
    r = explain(server.url, MODEL_ID, "Hi", "")
    assert r.status_code == 400 and r.json()["error"]["param"] == "completion"
    r = explain(server.url, MODEL_ID, "Hi", "Hello", occlusion="blur")
    assert r.status_code == 400 and r.json()["error"]["param"] == "occlusion"
    # Without `occlusion`, masking.
    assert explain(server.url, MODEL_ID, "Hi", "Hello").json()["occlusion"] == "mask"
