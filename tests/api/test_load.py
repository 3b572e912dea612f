"""Load behaviour, black box: per-request deadlines (`x-ferry-timeout`, `--request-timeout`)
end a request with OpenAI's error shape and free its sequence; the trace records inter-token
gaps. Assertions are on statuses, codes and counters, never on how long anything took."""
import time

import httpx
import openai
import pytest

from conftest import MODEL_ID, Server
from test_metrics import parse, value

MESSAGES = [{"role": "user", "content": "Tell me a very long story about a lighthouse."}]


@pytest.fixture(scope="module")
def timed_server():
    """A server-wide deadline no 4000-token answer can meet on a CPU."""
    s = Server("--parallel", "2", "--ctx-size", "4096", "--request-timeout", "0.5")
    yield s
    s.stop()


def metrics(server):
    return parse(httpx.get(server.url + "/metrics", timeout=30).text)


def running_sequences(server):
    """The scheduler's running sequences, once they drop to zero (a bounded wait for the
    scheduler thread's next step, not a timing assertion)."""
    for _ in range(100):
        n = value(metrics(server), "ferry_running_sequences", model=MODEL_ID)
        if n == 0:
            return n
        time.sleep(0.05)
    return n


def test_a_request_past_its_deadline_gets_504_deadline_exceeded(server, client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=50,
                                       extra_headers={"x-ferry-timeout": "0"})
    assert e.value.status_code == 504
    error = e.value.response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", "deadline_exceeded", None)
    assert "deadline" in error["message"]
    # The legacy completions and Anthropic's route answer the same way, each in its own shape.
    r = httpx.post(server.url + "/v1/completions", headers={"x-ferry-timeout": "0"}, timeout=60,
                   json={"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 20})
    assert (r.status_code, r.json()["error"]["code"]) == (504, "deadline_exceeded")
    r = httpx.post(server.url + "/v1/messages", headers={"x-ferry-timeout": "0"}, timeout=60,
                   json={"model": MODEL_ID, "max_tokens": 20, "messages": MESSAGES})
    assert r.status_code == 504 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "timeout_error", "Anthropic's type for a 504"


def test_a_generous_deadline_does_not_interfere(client):
    answer = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=8,
                                            extra_headers={"x-ferry-timeout": "600"})
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens >= 1


@pytest.mark.parametrize("bad", ["soon", "-1", "1e9"])
def test_a_malformed_deadline_is_refused_naming_the_header(client, bad):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4,
                                       extra_headers={"x-ferry-timeout": bad})
    error = e.value.response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "x-ferry-timeout")


def test_the_server_wide_deadline_ends_a_started_stream_with_an_error_event(timed_server):
    client = timed_server.client(max_retries=0, timeout=120)
    before = value(metrics(timed_server), "ferry_engine_expired_requests", model=MODEL_ID)
    stream = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4000, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            chunks.append(chunk)
    # The stream had started (the role chunk at least) and ended with OpenAI's error object.
    assert chunks and chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].finish_reason is None for c in chunks if c.choices)
    assert e.value.body["code"] == "deadline_exceeded"
    assert e.value.body["type"] == "server_error"
    # The sequence was freed and counted.
    assert running_sequences(timed_server) == 0
    after = value(metrics(timed_server), "ferry_engine_expired_requests", model=MODEL_ID)
    assert after == before + 1
    # Its record and trace say it failed, though its 200 had been sent.
    request_id = stream.response.headers["x-request-id"]
    for _ in range(50):
        r = httpx.get(f"{timed_server.url}/v1/traces/{request_id}")
        if r.status_code != 404:
            break
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["http_status"]) == ("error", 200), r.json()


def test_the_server_wide_deadline_answers_a_whole_response_with_504(timed_server):
    client = timed_server.client(max_retries=0, timeout=120)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=4000,
                                  extra_body={"ignore_eos": True})
    assert e.value.status_code == 504
    assert e.value.response.json()["error"]["code"] == "deadline_exceeded"
    assert running_sequences(timed_server) == 0


def test_a_kv_budget_below_two_contexts_is_refused_at_start():
    with pytest.raises(RuntimeError, match="kv-budget"):
        Server("--parallel", "4", "--ctx-size", "512", "--kv-budget", "1000")


def test_under_a_kv_budget_a_request_that_can_never_fit_is_refused():
    s = Server("--parallel", "4", "--ctx-size", "512", "--kv-budget", "1024")
    try:
        client = s.client(max_retries=0, timeout=120)
        answer = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=8)
        assert answer.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=400, n=3)
        error = e.value.response.json()["error"]
        assert error["param"] == "n" and "KV budget" in error["message"]
        m = metrics(s)
        assert value(m, "ferry_kv_cache_capacity_tokens", model=MODEL_ID) == 1024
    finally:
        s.stop()
