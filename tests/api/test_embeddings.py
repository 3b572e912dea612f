"""`POST /v1/embeddings` black box: the release binary serving all-MiniLM-L6-v2 next to the chat
model, through the official `openai` SDK (which asks for base64 by default) and raw HTTP."""
import base64
import concurrent.futures
import json
import math
import os
import sqlite3
import struct
import subprocess
import time

import httpx
import openai
import pytest

from conftest import BINARY, MODEL_FILE, MODEL_ID, MODELS_DIR, Server

EMBED_DIR = os.path.join(MODELS_DIR, "all-MiniLM-L6-v2")
EMBED_ID = "all-MiniLM-L6-v2"
DIMS = 384
ADMIN = "admin-embed-key-0123456789abcdef"

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(EMBED_DIR, "model.safetensors")),
    reason=f"{EMBED_DIR} is missing: run python3 scripts/fetch-models.py minilm",
)

FOOD = "A man is eating food."
# cosine(FOOD, other) as sentence-transformers computes it for all-MiniLM-L6-v2.
REFERENCE = [
    ("A man is eating a piece of bread.", 0.755),
    ("Someone is having a meal.", 0.689),
    ("The stock market crashed today.", 0.009),
]


@pytest.fixture(scope="module")
def server():
    s = Server("--embedding-model", EMBED_DIR)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(max_retries=0, timeout=120)


def post(server, body, **kwargs):
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=120, **kwargs)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def max_diff(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def vocab():
    with open(os.path.join(EMBED_DIR, "vocab.txt"), encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


def word_ids(text):
    """Token ids of simple lowercase-able words and final punctuation, each a whole vocabulary
    entry (what BERT's uncased WordPiece gives for them), without [CLS]/[SEP]."""
    table = vocab()
    words = text.lower().replace(".", " .").split()
    assert all(w in table for w in words), words
    return [table[w] for w in words]


def test_reference_similarities_with_the_sdk_defaults(client):
    # No encoding_format: the SDK asks for base64 and decodes it itself.
    texts = [FOOD] + [other for other, _ in REFERENCE]
    answer = client.embeddings.create(model=EMBED_ID, input=texts)
    assert answer.object == "list" and answer.model == EMBED_ID
    assert [d.index for d in answer.data] == list(range(len(texts)))
    assert all(d.object == "embedding" and len(d.embedding) == DIMS for d in answer.data)
    for d in answer.data:
        assert abs(math.sqrt(sum(x * x for x in d.embedding)) - 1.0) < 1e-4, "vectors are unit length"
    food = answer.data[0].embedding
    for (other, expected), d in zip(REFERENCE, answer.data[1:]):
        got = cosine(food, d.embedding)
        assert abs(got - expected) <= 0.01, f"cosine({FOOD!r}, {other!r}) = {got:.4f}, expected {expected}"


def test_float_format_matches_the_default_and_one_by_one(client):
    texts = [FOOD] + [other for other, _ in REFERENCE]
    batch = client.embeddings.create(model=EMBED_ID, input=texts, encoding_format="float")
    default = client.embeddings.create(model=EMBED_ID, input=texts)
    for text, b, d in zip(texts, batch.data, default.data):
        assert max_diff(b.embedding, d.embedding) < 1e-6
        single = client.embeddings.create(model=EMBED_ID, input=text, encoding_format="float")
        assert len(single.data) == 1 and single.data[0].index == 0
        assert max_diff(b.embedding, single.data[0].embedding) < 1e-4, text


def test_base64_is_little_endian_f32_of_the_float_vectors(server):
    texts = [FOOD, "Someone is having a meal."]
    floats = post(server, {"model": EMBED_ID, "input": texts}).json()
    encoded = post(server, {"model": EMBED_ID, "input": texts, "encoding_format": "base64"})
    assert encoded.status_code == 200, encoded.text
    for f, e in zip(floats["data"], encoded.json()["data"]):
        assert isinstance(f["embedding"], list) and isinstance(e["embedding"], str)
        raw = base64.b64decode(e["embedding"])
        assert len(raw) == 4 * DIMS
        decoded = struct.unpack(f"<{DIMS}f", raw)
        assert max_diff(decoded, f["embedding"]) < 1e-6


def test_token_ids_embed_like_their_text(client):
    ids = word_ids(FOOD)
    text = client.embeddings.create(model=EMBED_ID, input=FOOD, encoding_format="float")
    one = client.embeddings.create(model=EMBED_ID, input=ids, encoding_format="float")
    assert max_diff(one.data[0].embedding, text.data[0].embedding) < 1e-4
    assert one.usage.prompt_tokens == text.usage.prompt_tokens == len(ids) + 2
    other = "Someone is having a meal."
    many = client.embeddings.create(model=EMBED_ID, input=[ids, word_ids(other)])
    assert len(many.data) == 2
    assert max_diff(many.data[0].embedding, text.data[0].embedding) < 1e-4
    expected = client.embeddings.create(model=EMBED_ID, input=other).data[0].embedding
    assert max_diff(many.data[1].embedding, expected) < 1e-4


def test_usage_counts_every_token_with_cls_and_sep(client):
    texts = [FOOD, "Someone is having a meal.", "a"]
    answer = client.embeddings.create(model=EMBED_ID, input=texts)
    expected = sum(len(word_ids(t)) + 2 for t in texts)
    assert expected == 8 + 8 + 3
    assert answer.usage.prompt_tokens == expected
    assert answer.usage.total_tokens == expected


def test_usage_is_metered(server):
    r = post(server, {"model": EMBED_ID, "input": [FOOD, "a"]})
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    db = sqlite3.connect(os.path.join(server.data_dir, "ferry.db"))
    for _ in range(50):
        row = db.execute(
            "SELECT route, model, provider, status, prompt_tokens, completion_tokens FROM usage_records "
            "WHERE request_id = ?",
            (rid,),
        ).fetchone()
        if row and row[3] != "started":
            break
        time.sleep(0.1)
    assert row == ("/v1/embeddings", EMBED_ID, "local", "ok", 11, 0)


@pytest.mark.parametrize(
    "overrides, param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [-1]}, "input"),
        ({"input": [[1996], [4294967296]]}, "input"),
        ({"input": [10**9]}, "input"),
        ({"input": ["a", 1]}, "input"),
        ({"input": "a " * 600}, "input"),
        ({"dimensions": 10}, "dimensions"),
        ({"dimensions": 0}, "dimensions"),
        ({"encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_bad_input_is_a_400_in_openai_shape(server, overrides, param):
    r = post(server, {"model": EMBED_ID, "input": FOOD, **overrides})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


def test_bad_input_through_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBED_ID, input="")
    assert e.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMBED_ID, input=FOOD, dimensions=10)
    assert e.value.body["param"] == "dimensions" and "384" in e.value.body["message"]


def test_dimensions_equal_to_the_model_is_accepted(client):
    answer = client.embeddings.create(model=EMBED_ID, input=FOOD, dimensions=DIMS, user="u-1")
    assert len(answer.data[0].embedding) == DIMS


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input=FOOD)
    assert e.value.body["code"] == "model_not_found"


def test_models_list_the_embedding_model(server, client):
    models = {m.id: m for m in client.models.list()}
    assert MODEL_ID in models and EMBED_ID in models
    card = models[EMBED_ID].model_dump()
    assert card["type"] == "embedding" and card["dimensions"] == DIMS and card["context_length"] == 256
    one = client.models.retrieve(EMBED_ID).model_dump()
    assert one["id"] == EMBED_ID and one["type"] == "embedding"


def test_generation_routes_refuse_the_embedding_model(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=EMBED_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert e.value.body["param"] == "model" and "embedding" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=EMBED_ID, prompt="hi", max_tokens=4)
    r = httpx.post(
        server.url + "/v1/messages",
        json={"model": EMBED_ID, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    # The chat model still works next to it.
    answer = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.choices[0].message.content is not None


def test_concurrent_requests_all_succeed_and_agree(client):
    texts = [FOOD] + [other for other, _ in REFERENCE]
    expected = {
        t: d.embedding for t, d in zip(texts, client.embeddings.create(model=EMBED_ID, input=texts).data)
    }

    def one(i):
        batch = [texts[(i + j) % len(texts)] for j in range(1 + i % 3)]
        answer = client.embeddings.create(model=EMBED_ID, input=batch)
        return batch, [d.embedding for d in answer.data]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(48)))
    assert len(results) == 48
    for batch, vectors in results:
        assert len(vectors) == len(batch)
        for text, vector in zip(batch, vectors):
            assert max_diff(vector, expected[text]) < 1e-4


def test_embeddings_need_a_key_when_keys_are_on():
    s = Server("--embedding-model", EMBED_DIR, env={"FERRY_ADMIN_KEY": ADMIN})
    try:
        assert post(s, {"model": EMBED_ID, "input": FOOD}).status_code == 401
        keyed = openai.OpenAI(base_url=s.url + "/v1", api_key=ADMIN, max_retries=0)
        answer = keyed.embeddings.create(model=EMBED_ID, input=FOOD)
        assert len(answer.data[0].embedding) == DIMS
    finally:
        s.stop()


def test_embeddings_run_on_as_many_threads_as_asked(server, client):
    """`--threads 2` (the test servers' setting) bounds the embedding passes too: their pool's
    threads are named ferry-embed-N, two of them, however many CPUs the machine has."""
    client.embeddings.create(model=EMBED_ID, input=[FOOD] * 8)
    names = []
    for task in os.listdir(f"/proc/{server.proc.pid}/task"):
        with open(f"/proc/{server.proc.pid}/task/{task}/comm") as f:
            names.append(f.read().strip())
    assert sorted(n for n in names if n.startswith("ferry-embed-")) == ["ferry-embed-0", "ferry-embed-1"]


def test_an_embedding_server_loads_the_chat_model_on_its_first_request():
    """Started for embeddings with no model named, the default chat model stays on disk (its
    KV cache is most of a gigabyte) until a chat request needs it."""
    s = Server("--embedding-model", EMBED_DIR, "--models-dir", MODELS_DIR, model=False)
    try:
        def state():
            models = httpx.get(s.url + "/v1/models", timeout=30).json()["data"]
            return {m["id"]: m.get("state") for m in models}[MODEL_ID]

        assert state() == "on_disk"
        assert post(s, {"model": EMBED_ID, "input": FOOD}).status_code == 200
        assert state() == "on_disk", "embeddings do not load the chat model"
        answer = s.client(max_retries=0, timeout=120).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert answer.choices[0].message.content is not None
        assert state() == "loaded"
    finally:
        s.stop()


def test_embedding_model_is_loaded_only_when_asked(tmp_path):
    s = Server()
    try:
        ids = [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]
        assert EMBED_ID not in ids
        r = post(s, {"model": EMBED_ID, "input": FOOD})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        # The generative model still embeds (its own pooled hidden states).
        r = post(s, {"model": MODEL_ID, "input": FOOD})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == LM_DIMS
    finally:
        s.stop()


def test_embedding_model_from_the_environment_and_the_config_file(tmp_path):
    s = Server(env={"FERRY_EMBEDDING_MODEL": EMBED_DIR})
    try:
        assert post(s, {"model": EMBED_ID, "input": FOOD}).status_code == 200
    finally:
        s.stop()
    config = tmp_path / "ferry.toml"
    config.write_text(f"embedding_model = {json.dumps(EMBED_DIR)}\n")
    s = Server("--config", str(config))
    try:
        assert post(s, {"model": EMBED_ID, "input": FOOD}).status_code == 200
    finally:
        s.stop()


def test_a_bad_embedding_model_directory_fails_startup(tmp_path):
    out = subprocess.run(
        [BINARY, "serve", "--port", "0", "--model", MODEL_FILE, "--data-dir", str(tmp_path / "data"),
         "--embedding-model", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "listening" not in out.stdout
    assert "embedding model" in out.stderr and str(tmp_path) in out.stderr, out.stderr[-2000:]


# Embeddings from the generative model the server also serves (llama.cpp's pooled hidden
# states of the GGUF LM): SmolLM2-135M's hidden size.
LM_DIMS = 576
SENTENCES = [FOOD, "A man is eating a piece of bread.", "The stock market crashed today.", "Paris is in France."]


def test_a_generative_model_embeds_through_the_sdk(client):
    batch = client.embeddings.create(model=MODEL_ID, input=SENTENCES)
    assert batch.model == MODEL_ID and [d.index for d in batch.data] == [0, 1, 2, 3]
    vectors = [d.embedding for d in batch.data]
    assert all(len(v) == LM_DIMS for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    # Each sequence pooled alone: the same vector as in the batch (no cross-talk between
    # the sequences of one pass), and different texts give different vectors.
    for text, vector in zip(SENTENCES, vectors):
        alone = client.embeddings.create(model=MODEL_ID, input=text).data[0].embedding
        assert max_diff(alone, vector) < 1e-4
    assert all(cosine(vectors[0], v) < 0.999 for v in vectors[1:])
    assert batch.usage.prompt_tokens == batch.usage.total_tokens > len(" ".join(SENTENCES).split())
    encoded = client.embeddings.create(model=MODEL_ID, input=SENTENCES[:1], encoding_format="base64")
    raw = base64.b64decode(encoded.data[0].embedding) if isinstance(encoded.data[0].embedding, str) else None
    floats = list(struct.unpack(f"<{LM_DIMS}f", raw)) if raw else encoded.data[0].embedding
    assert max_diff(floats, vectors[0]) < 1e-4


def test_a_generative_model_embeds_token_ids(client):
    answer = client.embeddings.create(model=MODEL_ID, input=[[1, 2, 3, 4], [5, 6]])
    assert answer.usage.prompt_tokens == 6
    assert [len(d.embedding) for d in answer.data] == [LM_DIMS, LM_DIMS]


def test_concurrent_generative_embeddings_agree(client):
    alone = [client.embeddings.create(model=MODEL_ID, input=t).data[0].embedding for t in SENTENCES]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda i: client.embeddings.create(model=MODEL_ID, input=SENTENCES[i % 4]).data[0].embedding, range(16)))
    for i, vector in enumerate(results):
        assert max_diff(vector, alone[i % 4]) < 1e-4


@pytest.mark.parametrize(
    "overrides, param",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [10**7]}, "input"),
        ({"input": "word " * 9000}, "input"),
        ({"dimensions": 10}, "dimensions"),
    ],
)
def test_bad_input_to_a_generative_model_is_a_400(server, overrides, param):
    r = post(server, {"model": MODEL_ID, "input": FOOD, **overrides})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_last_token_pooling_from_the_config(tmp_path):
    config = tmp_path / "ferry.toml"
    config.write_text(f'models = [{{ name = "last", path = "{MODEL_FILE}", pooling = "last", preload = true }}, '
                      f'{{ name = "mean", path = "{MODEL_FILE}" }}]\n')
    s = Server("--config", str(config), model=False)
    try:
        client = s.client(max_retries=0, timeout=120)
        last = [d.embedding for d in client.embeddings.create(model="last", input=SENTENCES[:2]).data]
        mean = client.embeddings.create(model="mean", input=SENTENCES[0]).data[0].embedding
        assert max_diff(client.embeddings.create(model="last", input=SENTENCES[0]).data[0].embedding, last[0]) < 1e-4
        assert cosine(last[0], mean) < 0.99
        assert cosine(last[0], last[1]) < 0.999
    finally:
        s.stop()
