"""Many models in one server: load on first request, least-recently-used unloading under
--max-loaded-models and --memory-budget, requests waiting for a load, per-model defaults from
the TOML file, and `ferry models ps|load|unload` against the running server."""
import concurrent.futures
import os
import re
import shutil
import struct
import subprocess

import httpx
import openai
import pytest

from conftest import BINARY, MODEL_FILE, MODEL_ID, MODELS_DIR, Server

QWEN_FILE = os.path.join(MODELS_DIR, "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
QWEN_ID = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M"
# Small sessions keep both models' KV caches (and the test) small.
SMALL = ("--ctx-size", "1024", "--parallel", "2")


def states(server):
    models = httpx.get(server.url + "/v1/models", timeout=30).json()["data"]
    return {m["id"]: m["state"] for m in models if m["owned_by"] == "ferry"}


def loads(server, model):
    text = httpx.get(server.url + "/metrics", timeout=30).text
    match = re.search(r'^ferry_model_loads_total\{model="%s"\} (\d+)' % re.escape(model), text, re.M)
    return int(match.group(1)) if match else 0


def answer(client, model, question="What is the capital of France? Answer in one word."):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0
    )
    assert r.model == model
    return r.choices[0].message.content


@pytest.fixture(scope="module")
def two_models():
    assert os.path.exists(QWEN_FILE), "run python3 scripts/fetch-models.py qwen2.5"
    s = Server("--model", QWEN_FILE, "--max-loaded-models", "1", *SMALL)
    yield s
    s.stop()


def test_the_second_model_waits_on_disk_then_evicts_the_first(two_models):
    client = two_models.client(max_retries=0, timeout=120)
    # --model files preload as far as --max-loaded-models allows: the first one.
    assert states(two_models) == {MODEL_ID: "loaded", QWEN_ID: "on_disk"}
    card = httpx.get(f"{two_models.url}/v1/models/{QWEN_ID}", timeout=30).json()
    assert card["state"] == "on_disk" and card["file"] == QWEN_FILE
    assert card["file_size"] == os.path.getsize(QWEN_FILE)
    assert states(two_models)[QWEN_ID] == "on_disk", "reading a card does not load the model"

    smol_before = answer(client, MODEL_ID)
    qwen_first = answer(client, QWEN_ID)
    assert "Paris" in qwen_first
    assert states(two_models) == {MODEL_ID: "on_disk", QWEN_ID: "loaded"}
    # Back to the first: it loads again and answers exactly as before (greedy).
    assert answer(client, MODEL_ID) == smol_before
    assert states(two_models) == {MODEL_ID: "loaded", QWEN_ID: "on_disk"}
    assert answer(client, QWEN_ID) == qwen_first
    assert loads(two_models, QWEN_ID) == 2
    assert loads(two_models, MODEL_ID) == 2  # at start, and after its eviction


def test_requests_arriving_during_a_load_wait_for_it(two_models):
    client = two_models.client(max_retries=0, timeout=120)
    answer(client, MODEL_ID)  # the other model is now on disk
    assert states(two_models)[QWEN_ID] == "on_disk"
    before = loads(two_models, QWEN_ID)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: answer(client, QWEN_ID), range(4)))
    assert all("Paris" in a for a in answers), answers
    assert len(set(answers)) == 1
    assert loads(two_models, QWEN_ID) == before + 1, "one load served every waiting request"


def test_ferry_models_load_and_unload_a_running_servers_models(two_models):
    def ferry(*args):
        out = subprocess.run(
            [BINARY, "models", *args, "--url", two_models.url], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    ferry("load", MODEL_ID)
    ps = ferry("ps")
    assert re.search(rf"^{re.escape(MODEL_ID)}\s+loaded", ps, re.M), ps
    assert re.search(rf"^{re.escape(QWEN_ID)}\s+on_disk", ps, re.M), ps
    assert "is on disk" in ferry("unload", MODEL_ID)
    assert states(two_models) == {MODEL_ID: "on_disk", QWEN_ID: "on_disk"}
    assert "is loaded" in ferry("load", QWEN_ID)
    assert states(two_models) == {MODEL_ID: "on_disk", QWEN_ID: "loaded"}
    # The admin actions are in the audit log.
    audit = httpx.get(two_models.url + "/admin/v1/audit?limit=5", timeout=30).json()["data"]
    assert [(e["action"], e["target"]) for e in audit[:2]] == [("model.load", QWEN_ID), ("model.unload", MODEL_ID)]
    # Unknown models and actions answer in OpenAI's error shape.
    r = httpx.post(two_models.url + "/admin/v1/models/nope/load", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{two_models.url}/admin/v1/models/{QWEN_ID}/explode", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


def test_a_memory_budget_unloads_to_fit_and_refuses_what_never_fits():
    smol_kv = 2 * 30 * 2048 * 192 * 2  # layers, cells, key/value width, f16
    qwen_kv = 2 * 24 * 2048 * 128 * 2
    smol = os.path.getsize(MODEL_FILE) + smol_kv
    qwen = os.path.getsize(QWEN_FILE) + qwen_kv
    budget = max(smol, qwen) + min(smol, qwen) // 2  # one at a time
    s = Server("--model", QWEN_FILE, "--memory-budget", str(budget), *SMALL)
    try:
        client = s.client(max_retries=0, timeout=120)
        # Preloading the second model unloaded the first to stay within the budget.
        assert states(s) == {MODEL_ID: "on_disk", QWEN_ID: "loaded"}
        card = httpx.get(f"{s.url}/v1/models/{QWEN_ID}", timeout=30).json()
        assert card["memory_bytes"] == qwen
        assert answer(client, MODEL_ID)
        assert states(s) == {MODEL_ID: "loaded", QWEN_ID: "on_disk"}
        assert httpx.get(f"{s.url}/v1/models/{MODEL_ID}", timeout=30).json()["memory_bytes"] == smol
    finally:
        s.stop()
    # A budget below the second model's file: it can never load, and says so: at start for
    # a --model file, at its first request for a model loaded on demand.
    out = subprocess.run(
        [BINARY, "serve", "--port", "0", "--model", QWEN_FILE, "--memory-budget", str(smol), *SMALL,
         "--data-dir", s.data_dir],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0 and "more than the memory budget" in out.stderr, out.stderr[-2000:]
    config = os.path.join(s.data_dir, "ferry.toml")
    with open(config, "w") as f:
        f.write(f'models = ["{MODEL_FILE}", {{ path = "{QWEN_FILE}" }}]\nmemory_budget = {smol + 1024}\n')
    s = Server("--config", config, *SMALL, model=False)
    try:
        assert states(s) == {MODEL_ID: "loaded", QWEN_ID: "on_disk"}
        with pytest.raises(openai.APIStatusError) as err:
            answer(s.client(max_retries=0, timeout=60), QWEN_ID)
        assert err.value.status_code == 503
        body = err.value.response.json()["error"]
        assert body["code"] == "model_unavailable" and "memory budget" in body["message"]
        assert err.value.response.headers["retry-after"]
        assert states(s) == {MODEL_ID: "loaded", QWEN_ID: "on_disk"}
        assert "memory budget" in httpx.get(f"{s.url}/v1/models/{QWEN_ID}", timeout=30).json()["last_error"]
    finally:
        s.stop()


def test_models_from_the_config_file_load_on_first_use_with_their_defaults(tmp_path):
    config = tmp_path / "ferry.toml"
    config.write_text(
        f"""
max_loaded_models = 2
[[models]]
name = "terse"
path = "{MODEL_FILE}"
ctx_size = 512
parallel = 1
[models.defaults]
max_tokens = 5
temperature = 0.0
"""
    )
    s = Server("--config", str(config), model=False)
    try:
        assert states(s) == {"terse": "on_disk"}
        client = s.client(max_retries=0, timeout=120)
        r = client.chat.completions.create(model="terse", messages=[{"role": "user", "content": "Tell me a story."}])
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        card = httpx.get(s.url + "/v1/models/terse", timeout=30).json()
        assert card["state"] == "loaded"
        assert card["context_length"] == 512 and card["parallel_sequences"] == 1
        assert card["defaults"]["max_tokens"] == 5
        # A request's own value wins over the default.
        r = client.chat.completions.create(
            model="terse", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8
        )
        assert r.usage.completion_tokens == 8
    finally:
        s.stop()


def gguf_with_metadata(src, dst, floats):
    """A copy of the GGUF file `src` with more float32 metadata, as llama.cpp's converter
    writes `general.sampling.*` from a model's generation_config.json. The new keys go
    first, padded (with a string key) to a multiple of 256 bytes, so that the tensor data
    that follows keeps its alignment and every offset in the file stays right."""
    def string(text):
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    block = b"".join(string(key) + struct.pack("<If", 6, value) for key, value in floats.items())
    filler = len(string("ferry.test.padding")) + 4 + 8
    block += string("ferry.test.padding") + struct.pack("<I", 8) + string("x" * (-(len(block) + filler) % 256))
    assert len(block) % 256 == 0
    with open(src, "rb") as f, open(dst, "wb") as out:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        assert magic == b"GGUF" and version >= 2
        out.write(struct.pack("<4sIQQ", magic, version, n_tensors, n_kv + len(floats) + 1) + block)
        shutil.copyfileobj(f, out)


def test_a_files_recommended_sampling_is_the_default_below_the_configs(tmp_path):
    """A request that sets no temperature samples as the file recommends (here greedily, so two
    seeds agree); one that sets it samples as asked; the config's defaults win over the file."""
    model = tmp_path / "smol-greedy.gguf"
    gguf_with_metadata(MODEL_FILE, model, {"general.sampling.temp": 0.0, "general.sampling.top_k": 20.0})
    config = tmp_path / "ferry.toml"
    config.write_text(
        f'[[models]]\nname = "file"\npath = "{model}"\nctx_size = 512\nparallel = 1\n'
        f'[[models]]\nname = "configured"\npath = "{model}"\nctx_size = 512\nparallel = 1\n'
        "[models.defaults]\ntemperature = 1.0\n"
    )
    s = Server("--config", str(config), "--max-loaded-models", "1", model=False)
    prompt = [{"role": "user", "content": "Write a short poem about the sea."}]
    try:
        client = s.client(max_retries=0, timeout=120)

        def answers(model, **kw):
            return {client.chat.completions.create(model=model, messages=prompt, max_tokens=24, seed=seed, **kw)
                    .choices[0].message.content for seed in (1, 2, 3)}

        assert len(answers("file")) == 1, "the file's temperature 0 is greedy whatever the seed"
        card = httpx.get(s.url + "/v1/models/file", timeout=30).json()
        assert card["recommended_sampling"]["temperature"] == 0.0
        assert card["recommended_sampling"]["top_k"] == 20
        assert card["defaults"]["temperature"] == 0.0
        assert len(answers("file", temperature=1.0)) > 1, "a request's own temperature wins"
        assert len(answers("configured")) > 1, "the config's temperature wins over the file's"
        assert httpx.get(s.url + "/v1/models/configured", timeout=30).json()["defaults"]["top_k"] == 20
    finally:
        s.stop()


def test_a_config_naming_a_missing_file_fails_at_start(tmp_path):
    config = tmp_path / "ferry.toml"
    config.write_text('[[models]]\nname = "ghost"\npath = "/nonexistent/ghost.gguf"\n')
    out = subprocess.run(
        [BINARY, "serve", "--config", str(config), "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode != 0
    assert "/nonexistent/ghost.gguf does not exist" in out.stderr
