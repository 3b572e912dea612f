"""Request traces, black box: every kind of request (local, upstream, cached, failed) leaves a
trace under its x-request-id, readable by its tenant or an admin and by nobody else."""
import json
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID, Server, member_key
from mock_upstream import MockUpstream

ADMIN = "admin-traces-0123456789abcdef"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="module")
def mock():
    m = MockUpstream()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def ferry(mock, tmp_path_factory):
    config = tmp_path_factory.mktemp("traces") / "ferry.toml"
    config.write_text(
        f'[providers.mock]\nkind = "openai"\nbase_url = "{mock.url}"\napi_key_env = "MOCK_KEY"\n\n'
        '[[aliases]]\nname = "remote"\ncache_ttl_s = 60\ntargets = [{ provider = "mock", model = "up" }]\n\n'
        '[[guardrails]]\nname = "redact"\naction = "redact"\n'
    )
    s = Server("--config", str(config), "--parallel", "4", env={"FERRY_ADMIN_KEY": ADMIN, "MOCK_KEY": "sk-mock-0123456789"})
    yield s
    s.stop()


def member(server, policy=None):
    return member_key(server, ADMIN, tenant={"guardrail_policy": policy})[0]


def trace(server, request_id, key, wait=True):
    """The trace, once the writer has committed it."""
    for _ in range(50 if wait else 1):
        r = httpx.get(f"{server.url}/v1/traces/{request_id}", headers={"Authorization": f"Bearer {key}"})
        if r.status_code != 404:
            return r
        time.sleep(0.1)
    return r


def call(server, key, body):
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=120)


def test_local_request_trace(ferry):
    key = member(ferry)
    r = call(ferry, key, {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                          "temperature": 0.3, "seed": 11})
    assert r.status_code == 200
    t = trace(ferry, r.headers["x-request-id"], key).json()
    assert (t["status"], t["http_status"], t["route"], t["model"]) == ("ok", 200, "/v1/chat/completions", MODEL_ID)
    assert t["routing"]["provider"] == "local"
    assert t["tokens"] == {"prompt": r.json()["usage"]["prompt_tokens"],
                           "completion": r.json()["usage"]["completion_tokens"], "cached": 0}
    assert t["sampling"] == {"temperature": 0.3, "seed": 11}
    for timing in ("total_ms", "first_token_ms", "queue_ms", "prefill_ms", "decode_ms"):
        assert t["timings"][timing] is not None and t["timings"][timing] >= 0, timing
    if r.json()["usage"]["completion_tokens"] > 1:
        # The mean gap between tokens can't exceed the longest one.
        mean, longest = t["timings"]["inter_token_mean_ms"], t["timings"]["inter_token_max_ms"]
        assert 0 <= mean <= longest + 1e-6
    card = t["model_card"]
    assert (card["architecture"], card["quantization"], card["sha256"]) == ("llama", "Q4_1", SMOLLM2_SHA256)
    assert card["n_params"] > 100_000_000


def test_upstream_cached_and_failed_traces(ferry, mock):
    key = member(ferry, policy="redact")
    body = {"model": "remote", "messages": [{"role": "user", "content": "Mail bob@example.com"}]}
    first = call(ferry, key, body)
    second = call(ferry, key, body)
    assert second.headers.get("x-ferry-cache") == "hit"
    upstream = trace(ferry, first.headers["x-request-id"], key).json()
    assert upstream["routing"] == {"provider": "mock/up", "target": "mock/up", "attempts": 1, "fallbacks": 0,
                                   "cache_hit": False}
    assert upstream["guardrails"] == {"policy": "redact", "counts": {"email": 1}}
    assert "bob@example.com" not in json.dumps(upstream), "a trace never holds the values"
    assert upstream["timings"]["upstream_ms"] >= 0
    cached = trace(ferry, second.headers["x-request-id"], key).json()
    assert cached["routing"]["cache_hit"] is True and cached["routing"]["provider"] == "cache"
    assert cached["cost"] == 0
    mock.script.append(("error", 503, {"error": {"message": "overloaded", "type": "server_error"}}, {}))
    mock.script.append(("error", 503, {"error": {"message": "overloaded", "type": "server_error"}}, {}))
    failed = call(ferry, key, {**body, "messages": [{"role": "user", "content": "fail please"}]})
    assert failed.status_code == 503
    t = trace(ferry, failed.headers["x-request-id"], key).json()
    assert (t["status"], t["http_status"]) == ("error", 503)
    bad = call(ferry, key, {"model": MODEL_ID, "messages": [], "max_tokens": 1})
    assert bad.status_code == 400
    assert trace(ferry, bad.headers["x-request-id"], key).json()["http_status"] == 400


def test_only_the_tenant_and_admins_see_a_trace(ferry):
    owner, stranger = member(ferry), member(ferry)
    r = call(ferry, owner, {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    rid = r.headers["x-request-id"]
    assert trace(ferry, rid, owner).status_code == 200
    hidden = trace(ferry, rid, stranger, wait=False)
    missing = trace(ferry, "req_doesnotexist", owner, wait=False)
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"].startswith("No trace for request")
    assert trace(ferry, rid, ADMIN).status_code == 200
    # The openai SDK's generic GET reaches it too.
    client = openai.OpenAI(base_url=ferry.url + "/v1", api_key=owner, max_retries=0)
    assert client.get(f"/traces/{rid}", cast_to=object)["request_id"] == rid


def test_legacy_completion_and_responses_through_an_alias(ferry, mock):
    """Legacy completions and the Responses API through an alias are routed, redacted,
    metered and traced like chat: the upstream never sees the value, the client gets it back."""
    key = member(ferry, policy="redact")
    headers = {"Authorization": f"Bearer {key}", "x-ferry-cache": "off"}
    r = httpx.post(ferry.url + "/v1/completions", headers=headers, timeout=60,
                   json={"model": "remote", "prompt": "Mail bob@example.com", "echo": True, "max_tokens": 5})
    assert r.status_code == 200, r.text
    assert mock.paths[-1] == "/v1/completions"
    assert "bob@example.com" not in json.dumps(mock.requests[-1][1])
    assert r.json()["choices"][0]["text"].startswith("Mail bob@example.com"), "echo restores the value"
    t = trace(ferry, r.headers["x-request-id"], key).json()
    assert (t["status"], t["route"]) == ("ok", "/v1/completions")
    assert t["routing"]["target"] == "mock/up" and t["guardrails"]["counts"] == {"email": 1}
    assert t["tokens"]["prompt"] == 5 and t["tokens"]["completion"] == 4
    mock.script.append(("tool", "send_mail", {"to": "[EMAIL_1]"}))
    r = httpx.post(ferry.url + "/v1/responses", headers=headers, timeout=60, json={
        "model": "remote", "input": "Mail bob@example.com",
        "tools": [{"type": "function", "name": "send_mail", "parameters": {"type": "object"}}]})
    assert r.status_code == 200, r.text
    assert "bob@example.com" not in json.dumps(mock.requests[-1][1])
    (call_item,) = r.json()["output"]
    assert json.loads(call_item["arguments"]) == {"to": "bob@example.com"}, "placeholders restored in arguments"
    t = trace(ferry, r.headers["x-request-id"], key).json()
    assert (t["route"], t["routing"]["target"]) == ("/v1/responses", "mock/up")
