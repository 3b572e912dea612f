"""GET /metrics after a known mix of requests: the counters and histogram counts match exactly."""
import re
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID, Server, admin_request, member_key

ADMIN = "admin-metrics-0123456789abcdef"
LINE = re.compile(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$')


def parse(text):
    """{(name, frozenset(labels)): value}"""
    out = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(metrics, name, **labels):
    return metrics.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def server():
    s = Server("--parallel", "4", env={"FERRY_ADMIN_KEY": ADMIN})
    yield s
    s.stop()


def admin(s, method, path, body=None, key=ADMIN):
    return admin_request(s, key, method, path, body)


def key(s, name, limits=None):
    secret, _, tenant = member_key(s, ADMIN, tenant={"name": name}, key={"limits": limits or {}})
    return secret, tenant


def chat(s, secret, **extra):
    # Greedy, so the token-by-token counts are the same on every run.
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            **extra}
    return httpx.post(s.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"},
                      timeout=120)


def test_counters_and_histograms_match_a_known_mix(server):
    secret, tenant = key(server, "metered")
    limited, limited_tenant = key(server, "limited", {"rpm": 1})
    completion = prompt = 0
    for _ in range(3):
        usage = chat(server, secret).json()["usage"]
        completion += usage["completion_tokens"]
        prompt += usage["prompt_tokens"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}, timeout=120) as r:
        import json
        chunks = [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]
        completion += chunks[-1]["usage"]["completion_tokens"]
        prompt += chunks[-1]["usage"]["prompt_tokens"]
    assert chat(server, secret, temperature=-1).status_code == 400
    assert httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL_ID}).status_code == 401
    first = chat(server, limited).json()["usage"]
    completion += first["completion_tokens"]
    prompt += first["prompt_tokens"]
    assert chat(server, limited).status_code == 429
    time.sleep(0.5)  # the stream's record completes just after its last byte

    r = admin(server, "GET", "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = parse(r.text)
    route = "/v1/chat/completions"
    assert value(m, "ferry_requests_total", route=route, model=MODEL_ID, status="ok", tenant=tenant) == 4
    assert value(m, "ferry_requests_total", route=route, model="-", status="error", tenant=tenant) == 1
    assert value(m, "ferry_requests_total", route=route, model=MODEL_ID, status="ok", tenant=limited_tenant) == 1
    assert value(m, "ferry_request_duration_seconds_count", route=route, model=MODEL_ID) == 5
    assert value(m, "ferry_time_to_first_token_seconds_count", model=MODEL_ID) == 5
    assert value(m, "ferry_completion_tokens_total", model=MODEL_ID) == completion
    assert value(m, "ferry_prompt_tokens_total", model=MODEL_ID) == prompt
    assert value(m, "ferry_inter_token_seconds_count", model=MODEL_ID) == completion - 5
    assert value(m, "ferry_rejections_total", reason="unauthorized") == 1
    assert value(m, "ferry_rejections_total", reason="rate_limit_requests") == 1
    assert value(m, "ferry_loaded_models") == 1
    assert value(m, "ferry_running_sequences", model=MODEL_ID) == 0
    assert value(m, "ferry_engine_generated_tokens", model=MODEL_ID) >= completion


def test_metrics_need_an_admin_key(server):
    assert httpx.get(server.url + "/metrics").status_code == 401
    secret, _ = key(server, "curious")
    assert admin(server, "GET", "/metrics", key=secret).status_code == 403


def test_kv_cache_use_is_reported_while_a_stream_runs(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Count to one hundred."}], max_tokens=200,
        stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    next(chunks)
    m = parse(admin(server, "GET", "/metrics").text)
    stream.close()
    capacity = value(m, "ferry_kv_cache_capacity_tokens", model=MODEL_ID)
    used = value(m, "ferry_kv_cache_tokens", model=MODEL_ID)
    assert capacity == 4 * 4096
    # The prompt's cells at least, and no more than one sequence's context.
    assert 10 <= used <= 4096
    deadline = time.time() + 10
    while value(parse(admin(server, "GET", "/metrics").text), "ferry_kv_cache_tokens", model=MODEL_ID) != 0:
        assert time.time() < deadline, "the closed stream's cells were not released"
        time.sleep(0.1)
