"""The gateway: aliases routed to OpenAI-compatible upstreams (a mock speaking OpenAI's
wire format, and a real Ferry), with retries, fallback, the circuit breaker, and errors
passed through intact."""
import json
import socket
import subprocess

import httpx
import openai
import pytest

from conftest import BINARY, MODEL_ID, Server, member_key
from mock_upstream import MockUpstream

HELLO = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the capital of France?"}]


def dead_url():
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def gateway(tmp_path, providers, aliases, extra="", env=None, real=()):
    """A Ferry whose config routes aliases to `providers`: name -> url, or name -> (kind, url).
    Mocks answer at once (3 s to the first byte is plenty); the providers named in `real` are a
    real Ferry computing its answers on a shared machine, and get 60 s."""
    lines = [extra]
    for name, url in providers.items():
        kind, url = url if isinstance(url, tuple) else ("openai", url)
        first_byte = 60000 if name in real else 3000
        lines += [f"[providers.{name}]", f'kind = "{kind}"', f'base_url = "{url}"', "api_key_env = \"MOCK_KEY\"",
                  f"first_byte_timeout_ms = {first_byte}", ""]
    for alias in aliases:
        targets = ", ".join(f'{{ provider = "{p}", model = "{m}" }}' for p, m in alias["targets"])
        lines += ["[[aliases]]", f'name = "{alias["name"]}"', f'retries = {alias.get("retries", 1)}',
                  f'strategy = "{alias.get("strategy", "fallback")}"', f"targets = [{targets}]"]
        if "cache_ttl_s" in alias:
            lines.append(f'cache_ttl_s = {alias["cache_ttl_s"]}')
        lines.append("")
    config = tmp_path / "gateway.toml"
    config.write_text("\n".join(lines))
    return Server("--config", str(config), env={"MOCK_KEY": "sk-secret-mock-key-123", **(env or {})})


@pytest.fixture
def mock():
    m = MockUpstream()
    yield m
    m.stop()


def test_ferry_chained_behind_ferry(server, client, tmp_path):
    b = gateway(tmp_path, {"a": server.url + "/v1"}, [{"name": "chained", "targets": [("a", MODEL_ID)]}], real=("a",))
    try:
        via = b.client(max_retries=0)
        assert "chained" in [m.id for m in via.models.list().data]
        direct = client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=16)
        chained = via.chat.completions.create(model="chained", messages=HELLO, temperature=0, max_tokens=16)
        assert chained.choices[0].message.content == direct.choices[0].message.content
        assert chained.usage.completion_tokens == direct.usage.completion_tokens
        assert chained.model == "chained"
        text = "".join(c.choices[0].delta.content or "" for c in via.chat.completions.create(
            model="chained", messages=HELLO, temperature=0, max_tokens=16, stream=True) if c.choices)
        assert text == direct.choices[0].message.content
        # An upstream client error passes through with its status, code and param.
        with pytest.raises(openai.BadRequestError) as e:
            via.chat.completions.create(model="chained", messages=HELLO, temperature=5)
        assert e.value.param == "temperature"
        r = httpx.post(b.url + "/v1/chat/completions", json={"model": "chained", "messages": HELLO, "max_tokens": 10**9})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    finally:
        b.stop()


def test_translation_tools_images_and_key(mock, tmp_path):
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "tools", "targets": [("m", "upstream-model")]}])
    try:
        client = b.client(max_retries=0)
        mock.script = [("tool", "get_weather", {"city": "Paris"})]
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
        r = client.chat.completions.create(
            model="tools", tools=tools, tool_choice="auto",
            messages=[{"role": "user", "content": [{"type": "text", "text": "Weather here?"},
                                                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}],
        )
        assert r.choices[0].finish_reason == "tool_calls"
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and call.function.arguments == '{"city": "Paris"}'
        headers, body = mock.requests[-1]
        assert headers["authorization"] == "Bearer sk-secret-mock-key-123"
        assert body["model"] == "upstream-model"
        assert body["tools"][0]["function"]["name"] == "get_weather"
        assert body["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png")
        # The tool result round trip, then the final answer.
        mock.script = [("ok", "It is sunny in Paris.")]
        final = client.chat.completions.create(model="tools", tools=tools, messages=[
            {"role": "user", "content": "Weather here?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ])
        assert final.choices[0].message.content == "It is sunny in Paris."
        sent = mock.requests[-1][1]["messages"]
        assert sent[1]["tool_calls"][0]["id"] == "call_1" and sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
        # Streaming a tool call: id and name first, then argument pieces.
        mock.script = [("tool", "get_weather", {"city": "Oslo"})]
        chunks = list(client.chat.completions.create(model="tools", tools=tools, stream=True,
                                                     messages=[{"role": "user", "content": "Oslo?"}]))
        deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert deltas[0].id == "call_1" and deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments for d in deltas) == '{"city": "Oslo"}'
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    finally:
        b.stop()


def test_retries_honour_retry_after_then_succeed(mock, tmp_path):
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "flaky", "retries": 2, "targets": [("m", "x")]}])
    try:
        busy = ("error", 429, {"error": {"message": "slow down", "type": "rate_limit_error", "code": None}}, {"Retry-After": "0"})
        mock.script = [busy, busy]
        r = httpx.post(b.url + "/v1/chat/completions", json={"model": "flaky", "messages": HELLO}, timeout=30)
        assert r.status_code == 200
        assert r.headers["x-ferry-attempts"] == "3"
        assert r.json()["choices"][0]["message"]["content"] == "Hello from the mock."
        # Out of retries: the client sees the upstream's 429 in OpenAI's shape.
        mock.script = [busy, busy, busy]
        r = httpx.post(b.url + "/v1/chat/completions", json={"model": "flaky", "messages": HELLO}, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        # A client error is not retried.
        mock.script = [("error", 400, {"error": {"message": "bad thing", "param": "messages", "code": None}}, {})]
        before = len(mock.requests)
        r = httpx.post(b.url + "/v1/chat/completions", json={"model": "flaky", "messages": HELLO}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert len(mock.requests) == before + 1
    finally:
        b.stop()


def test_an_upstream_rate_limit_reaches_the_client_with_its_retry_after(mock, tmp_path):
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "limited", "retries": 0, "targets": [("m", "x")]}])
    try:
        mock.script = [("error", 429, {"error": {"message": "slow down", "type": "requests",
                                                 "code": "rate_limit_exceeded"}}, {"Retry-After": "7"})]
        r = httpx.post(b.url + "/v1/chat/completions", json={"model": "limited", "messages": HELLO}, timeout=30)
        assert r.status_code == 429 and r.headers.get("retry-after") == "7", r.headers
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    finally:
        b.stop()


def test_fallback_and_circuit_breaker(mock, tmp_path):
    b = gateway(tmp_path, {"dead": dead_url(), "m": mock.url},
                [{"name": "fb", "retries": 0, "targets": [("dead", "x"), ("m", "y")]}],
                extra="circuit_failure_threshold = 2\ncircuit_open_ms = 60000\n")
    try:
        client = b.client(max_retries=0)
        for expected_attempts in ("2", "2", "1", "1"):
            raw = client.chat.completions.with_raw_response.create(model="fb", messages=HELLO)
            assert raw.headers["x-ferry-target"] == "m/y"
            # After two refused connections the dead target's circuit opens and is skipped.
            assert raw.headers["x-ferry-attempts"] == expected_attempts
        # Streams fall back too, before their first byte.
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="fb", messages=HELLO, stream=True) if c.choices)
        assert text.strip() == "Hello from the mock."
    finally:
        b.stop()


def test_a_stream_answered_without_events_is_a_502_and_falls_back(tmp_path):
    """An upstream that ignores `stream` (answers JSON) or sends an empty event stream used to
    crash the request's task: the client's connection dropped without a response."""
    first, second = MockUpstream(), MockUpstream()
    b = gateway(tmp_path, {"a": first.url, "b": second.url},
                [{"name": "one", "retries": 0, "targets": [("a", "x")]},
                 {"name": "two", "retries": 0, "targets": [("a", "x"), ("b", "y")]}])
    try:
        client = b.client(max_retries=0)
        first.script.append(("json", "not a stream"))
        with pytest.raises(openai.APIStatusError) as e:
            list(client.chat.completions.create(model="one", messages=HELLO, stream=True))
        assert e.value.status_code == 502 and "ended before its first event" in e.value.message
        first.script.append(("json", "not a stream"))
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="two", messages=HELLO, stream=True) if c.choices)
        assert text.strip() == "Hello from the mock."
        # n is checked as OpenAI checks it before anything goes upstream.
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="one", messages=HELLO, n=0)
        assert e.value.param == "n"
        # An error without a body (a route the upstream doesn't serve) still says something.
        first.script.append(("error", 404, None, {}))
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="one", messages=HELLO)
        assert "404 Not Found with no message" in e.value.message
    finally:
        b.stop()
        first.stop()
        second.stop()


def test_an_unreachable_upstream_is_reported_without_its_address(tmp_path):
    dead = dead_url()
    b = gateway(tmp_path, {"dead": dead}, [{"name": "gone", "retries": 0, "targets": [("dead", "x")]}])
    try:
        r = httpx.post(b.url + "/v1/chat/completions", json={"model": "gone", "messages": HELLO}, timeout=30)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
        port = dead.split(":")[-1].split("/")[0]
        assert port not in r.text and "127.0.0.1" not in r.text, r.text
        m = httpx.post(b.url + "/v1/messages", json={"model": "gone", "max_tokens": 5,
                                                     "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
        assert m.status_code == 502 and port not in m.text, m.text
    finally:
        b.stop()


def test_an_open_circuit_stops_the_retries_and_then_answers_503_with_retry_after(mock, tmp_path):
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "sick", "retries": 3, "targets": [("m", "x")]}],
                extra="circuit_failure_threshold = 2\ncircuit_open_ms = 30000\n")
    try:
        failing = ("error", 500, {"error": {"message": "boom", "code": None}}, {})
        mock.script = [failing] * 4
        r = httpx.post(b.url + "/v1/chat/completions", json={"model": "sick", "messages": HELLO}, timeout=30)
        assert r.status_code == 500
        assert len(mock.requests) == 2, "the second failure opened the circuit: no third try on that target"
        r = httpx.post(b.url + "/v1/chat/completions", json={"model": "sick", "messages": HELLO}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable", r.text
        assert 1 <= int(r.headers["retry-after"]) <= 30
        assert len(mock.requests) == 2
        bad = httpx.post(b.url + "/v1/chat/completions", json={"model": "sick", "messages": HELLO},
                         headers={"x-ferry-cache": "yes"}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-ferry-cache"
    finally:
        b.stop()


def test_first_byte_timeout_falls_back(mock, tmp_path):
    slow, fast = mock, MockUpstream()
    b = gateway(tmp_path, {"slow": slow.url, "fast": fast.url},
                [{"name": "t", "retries": 0, "targets": [("slow", "a"), ("fast", "b")]}])
    try:
        slow.script = [("sleep", 5)]
        r = httpx.post(b.url + "/v1/chat/completions", json={"model": "t", "messages": HELLO}, timeout=30)
        assert r.status_code == 200
        assert r.headers["x-ferry-target"] == "fast/b"
    finally:
        b.stop()
        fast.stop()


def test_missing_key_variable_is_named_not_leaked(mock, tmp_path):
    config = tmp_path / "g.toml"
    config.write_text(f'[providers.m]\nkind = "openai"\nbase_url = "{mock.url}"\napi_key_env = "NOT_SET_ANYWHERE"\n'
                      '[[aliases]]\nname = "a"\ntargets = [{ provider = "m", model = "x" }]\n')
    import subprocess
    from conftest import BINARY
    r = subprocess.run([BINARY, "serve", "--config", str(config), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "NOT_SET_ANYWHERE" in r.stderr


def test_openai_sdk_through_an_anthropic_upstream(tmp_path):
    upstream = MockUpstream("anthropic")
    b = gateway(tmp_path, {"claude": ("anthropic", upstream.url)},
                [{"name": "claude-alias", "targets": [("claude", "claude-sonnet-4-5")]}])
    try:
        client = b.client(max_retries=0)
        upstream.default = ("ok", "Bonjour from Anthropic.")
        r = client.chat.completions.create(model="claude-alias", max_tokens=50, temperature=0.2, stop=["END"],
                                           messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
        assert r.choices[0].message.content == "Bonjour from Anthropic."
        assert r.choices[0].finish_reason == "stop"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (13, 5)
        headers, body = upstream.requests[-1]
        assert headers["x-api-key"] == "sk-secret-mock-key-123" and headers["anthropic-version"] == "2023-06-01"
        assert body["system"] == "Be brief." and body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        assert body["max_tokens"] == 50 and body["stop_sequences"] == ["END"] and body["model"] == "claude-sonnet-4-5"
        chunks = list(client.chat.completions.create(model="claude-alias", messages=[{"role": "user", "content": "Hi"}],
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == "Bonjour from Anthropic."
        assert chunks[-1].usage.prompt_tokens == 13 and chunks[-1].usage.completion_tokens == 5
        # Tool use, plain and streamed, comes back as OpenAI tool_calls.
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        upstream.script = [("tool", "lookup", {"q": "paris"})]
        r = client.chat.completions.create(model="claude-alias", tools=tools, tool_choice="required",
                                           messages=[{"role": "user", "content": "find paris"}])
        assert r.choices[0].finish_reason == "tool_calls"
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"q": "paris"}
        assert upstream.requests[-1][1]["tool_choice"] == {"type": "any"}
        assert upstream.requests[-1][1]["tools"][0]["input_schema"] == {"type": "object"}
        upstream.script = [("tool", "lookup", {"q": "oslo"})]
        chunks = list(client.chat.completions.create(model="claude-alias", tools=tools, stream=True,
                                                     messages=[{"role": "user", "content": "find oslo"}]))
        calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert calls[0].id == "toolu_1" and calls[0].function.name == "lookup"
        assert "".join(c.function.arguments for c in calls) == '{"q": "oslo"}'
        # A JSON schema becomes Anthropic's structured output (output_config.format); JSON
        # without a schema has no Anthropic equivalent and is refused by name.
        upstream.default = ("ok", '{"city": "Paris", "population_millions": 2.1}')
        schema = {"type": "object", "properties": {"city": {"type": "string"}, "population_millions": {"type": "number"}},
                  "required": ["city", "population_millions"], "additionalProperties": False}
        r = client.chat.completions.create(model="claude-alias", messages=[{"role": "user", "content": "Paris?"}],
                                           response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
        assert json.loads(r.choices[0].message.content)["city"] == "Paris"
        assert upstream.requests[-1][1]["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="claude-alias", response_format={"type": "json_object"},
                                           messages=[{"role": "user", "content": "Hi"}])
        assert e.value.param == "response_format"
        # What Anthropic cannot express is refused by name; its errors map to OpenAI's shape.
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="claude-alias", n=2, messages=[{"role": "user", "content": "Hi"}])
        assert e.value.param == "n"
        upstream.script = [("error", 400, {"type": "error", "error": {"type": "invalid_request_error", "message": "messages: bad"}}, {})]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="claude-alias", messages=[{"role": "user", "content": "Hi"}])
        assert "messages: bad" in e.value.message
        overloaded = ("error", 529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, {})
        upstream.script = [overloaded]
        r = client.chat.completions.with_raw_response.create(model="claude-alias", messages=[{"role": "user", "content": "Hi"}])
        assert r.headers["x-ferry-attempts"] == "2"
    finally:
        b.stop()
        upstream.stop()


def test_openai_sdk_through_a_gemini_upstream(tmp_path):
    upstream = MockUpstream("gemini")
    b = gateway(tmp_path, {"google": ("gemini", upstream.url)},
                [{"name": "gem", "targets": [("google", "gemini-2.5-flash")]}])
    try:
        client = b.client(max_retries=0)
        upstream.default = ("ok", "Hello from Gemini.")
        r = client.chat.completions.create(model="gem", max_tokens=40, temperature=0.3, seed=7,
                                           messages=[{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": [
                                                         {"type": "text", "text": "What is this?"},
                                                         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}]}])
        assert r.choices[0].message.content == "Hello from Gemini."
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (17, 6)
        headers, body = upstream.requests[-1]
        assert headers["x-goog-api-key"] == "sk-secret-mock-key-123"
        assert body["_path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
        assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
        assert body["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}}
        assert body["generationConfig"] == {"temperature": 0.3, "maxOutputTokens": 40, "seed": 7}
        chunks = list(client.chat.completions.create(model="gem", messages=[{"role": "user", "content": "Hi"}],
                                                     stream=True, stream_options={"include_usage": True}))
        assert upstream.requests[-1][1]["_path"].endswith(":streamGenerateContent?alt=sse")
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from Gemini."
        assert chunks[-1].usage.completion_tokens == 6
        # A function call and its result, through the tool-calling round trip.
        tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
        upstream.script = [("tool", "weather", {"city": "Oslo"})]
        r = client.chat.completions.create(model="gem", tools=tools, messages=[{"role": "user", "content": "Oslo?"}])
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "weather"
        assert json.loads(call.function.arguments) == {"city": "Oslo"}
        upstream.script = [("ok", "Cold.")]
        client.chat.completions.create(model="gem", tools=tools, messages=[
            {"role": "user", "content": "Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": -3}'},
        ])
        sent = upstream.requests[-1][1]["contents"]
        assert sent[1] == {"role": "model", "parts": [{"functionCall": {"name": "weather", "args": {"city": "Oslo"}}}]}
        assert sent[2] == {"role": "user", "parts": [{"functionResponse": {"name": "weather", "response": {"temp": -3}}}]}
        upstream.script = [("error", 404, {"error": {"code": 404, "message": "models/x is not found", "status": "NOT_FOUND"}}, {})]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gem", messages=[{"role": "user", "content": "Hi"}])
    finally:
        b.stop()
        upstream.stop()


def test_anthropic_sdk_through_aliases(server, tmp_path):
    """The Messages dialect in front of upstreams: another Ferry (OpenAI wire format) and an
    Anthropic-format mock with tool use."""
    import anthropic

    upstream = MockUpstream("anthropic")
    b = gateway(tmp_path, {"a": server.url + "/v1", "claude": ("anthropic", upstream.url)},
                [{"name": "chained", "targets": [("a", MODEL_ID)]},
                 {"name": "claude-alias", "targets": [("claude", "claude-sonnet-4-5")]}], real=("a",))
    try:
        claude = anthropic.Anthropic(base_url=b.url, api_key="unused", max_retries=0)
        direct = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        kwargs = dict(max_tokens=16, system="You are a helpful assistant.", extra_body={"temperature": 0},
                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        want = direct.messages.create(model=MODEL_ID, **kwargs)
        got = claude.messages.create(model="chained", **kwargs)
        assert got.content[0].text == want.content[0].text
        assert got.stop_reason == want.stop_reason
        assert (got.usage.input_tokens, got.usage.output_tokens) == (want.usage.input_tokens, want.usage.output_tokens)
        with claude.messages.stream(model="chained", **kwargs) as stream:
            final = stream.get_final_message()
        assert final.content[0].text == want.content[0].text
        assert final.usage.output_tokens == want.usage.output_tokens
        # Tool use through an Anthropic upstream, plain and streamed, and the tool result back.
        tools = [{"name": "lookup", "description": "Look up", "input_schema": {"type": "object"}}]
        upstream.script = [("tool", "lookup", {"q": "paris"})]
        m = claude.messages.create(model="claude-alias", max_tokens=30, tools=tools,
                                   messages=[{"role": "user", "content": "find paris"}])
        assert m.stop_reason == "tool_use"
        use = next(b for b in m.content if b.type == "tool_use")
        assert use.name == "lookup" and use.input == {"q": "paris"}
        upstream.script = [("tool", "lookup", {"q": "oslo"})]
        with claude.messages.stream(model="claude-alias", max_tokens=30, tools=tools,
                                    messages=[{"role": "user", "content": "find oslo"}]) as stream:
            final = stream.get_final_message()
        assert [b.type for b in final.content] == ["text", "tool_use"]
        assert final.content[1].input == {"q": "oslo"} and final.stop_reason == "tool_use"
        upstream.script = [("ok", "Found it.")]
        claude.messages.create(model="claude-alias", max_tokens=30, tools=tools, messages=[
            {"role": "user", "content": "find paris"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": "lookup", "input": {"q": "paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Paris, France"}]},
        ])
        sent = upstream.requests[-1][1]["messages"]
        assert sent[1]["content"][0]["type"] == "tool_use"
        assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": use.id, "content": "Paris, France"}
    finally:
        b.stop()
        upstream.stop()


def test_exact_response_cache(mock, tmp_path):
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "cached", "cache_ttl_s": 60, "targets": [("m", "x")]},
                                            {"name": "plain", "targets": [("m", "x")]}])
    try:
        body = {"model": "cached", "messages": HELLO, "temperature": 0}
        first = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=30)
        calls = len(mock.requests)
        again = httpx.post(b.url + "/v1/chat/completions", json=dict(reversed(list(body.items()))), timeout=30)
        assert again.status_code == 200 and again.headers["x-ferry-cache"] == "hit"
        assert again.headers["x-ferry-target"] == "m/x" and again.headers["x-ferry-attempts"] == "0"
        assert again.json()["choices"] == first.json()["choices"]
        assert len(mock.requests) == calls, "a hit costs no upstream call"
        # A different request misses; a request can opt out.
        httpx.post(b.url + "/v1/chat/completions", json={**body, "temperature": 0.5}, timeout=30)
        assert len(mock.requests) == calls + 1
        r = httpx.post(b.url + "/v1/chat/completions", json=body, headers={"x-ferry-cache": "off"}, timeout=30)
        assert "x-ferry-cache" not in r.headers and len(mock.requests) == calls + 2
        # Per request on an alias without a cache; the Anthropic dialect shares it.
        plain = {"model": "plain", "messages": HELLO}
        httpx.post(b.url + "/v1/chat/completions", json=plain, headers={"x-ferry-cache": "on"}, timeout=30)
        r = httpx.post(b.url + "/v1/chat/completions", json=plain, headers={"x-ferry-cache": "on"}, timeout=30)
        assert r.headers["x-ferry-cache"] == "hit"
        r = httpx.post(b.url + "/v1/chat/completions", json=plain, timeout=30)
        assert "x-ferry-cache" not in r.headers
        anthropic_body = {"model": "cached", "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}]}
        httpx.post(b.url + "/v1/messages", json=anthropic_body, timeout=30)
        r = httpx.post(b.url + "/v1/messages", json=anthropic_body, timeout=30)
        assert r.headers["x-ferry-cache"] == "hit" and r.json()["content"][0]["text"] == "Hello from the mock."
    finally:
        b.stop()


def test_cached_answers_are_shared_within_a_tenant_only(mock, tmp_path):
    admin = "cache-test-admin-key-0123456789"
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "cached", "cache_ttl_s": 60, "targets": [("m", "x")]}],
                env={"FERRY_ADMIN_KEY": admin})
    try:
        acme, _, acme_tenant = member_key(b, admin)
        other, _, _ = member_key(b, admin)
        # A second key in acme's tenant, in a project of its own.
        project = httpx.post(b.url + "/admin/v1/projects", json={"tenant_id": acme_tenant, "name": "q"},
                             headers={"Authorization": f"Bearer {admin}"}).json()
        acme_too = httpx.post(b.url + "/admin/v1/keys", json={"name": "k2", "role": "member", "project_id": project["id"]},
                              headers={"Authorization": f"Bearer {admin}"}).json()["key"]
        body = {"model": "cached", "messages": HELLO, "temperature": 0}

        def ask(key):
            return httpx.post(b.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                              timeout=30)

        assert "x-ferry-cache" not in ask(acme).headers
        calls = len(mock.requests)
        assert ask(acme_too).headers.get("x-ferry-cache") == "hit", "the same tenant shares its answers"
        r = ask(other)
        assert r.status_code == 200 and "x-ferry-cache" not in r.headers, "another tenant never gets them"
        assert len(mock.requests) == calls + 1
        assert ask(other).headers.get("x-ferry-cache") == "hit", "it has its own"
    finally:
        b.stop()


def test_streamed_answers_are_cached_and_replayed(mock, tmp_path):
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "cached", "cache_ttl_s": 60, "targets": [("m", "x")]}])
    try:
        client = b.client(max_retries=0)

        def streamed(**extra):
            raw = client.chat.completions.with_raw_response.create(
                model="cached", messages=HELLO, stream=True, stream_options={"include_usage": True}, **extra
            )
            chunks = list(raw.parse())
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = [c.usage.model_dump() for c in chunks if c.usage]
            return raw.headers.get("x-ferry-cache"), text, finish, usage

        first = streamed()
        calls = len(mock.requests)
        again = streamed()
        assert first[0] is None and again[0] == "hit"
        assert again[1:] == first[1:] and first[1], "the same deltas, finish reason and usage"
        assert len(mock.requests) == calls, "a hit costs no upstream call"
        # A plain request is cached apart from the stream, and a stream can opt out.
        plain = client.chat.completions.with_raw_response.create(model="cached", messages=HELLO)
        assert plain.headers.get("x-ferry-cache") is None and len(mock.requests) == calls + 1
        assert streamed(extra_headers={"x-ferry-cache": "off"})[0] is None
        assert len(mock.requests) == calls + 2
        # Anthropic's dialect streams from the same cache (its own request, its own entry).
        body = {"model": "cached", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
        first = httpx.post(b.url + "/v1/messages", json=body, timeout=30)
        again = httpx.post(b.url + "/v1/messages", json=body, timeout=30)
        assert "x-ferry-cache" not in first.headers and again.headers["x-ferry-cache"] == "hit"
        text = lambda r: "".join(  # noqa: E731
            json.loads(line[6:]).get("delta", {}).get("text", "") for line in r.text.splitlines() if line.startswith("data: ")
        )
        assert text(again) == text(first) and text(first).startswith("Hello from the mock.")
    finally:
        b.stop()


def test_a_failed_stream_is_not_cached(mock, tmp_path):
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "cached", "cache_ttl_s": 60, "retries": 0,
                                             "targets": [("m", "x")]}])
    try:
        body = {"model": "cached", "messages": HELLO, "stream": True}
        mock.script.append(("error", 503, {"error": {"message": "overloaded", "type": "server_error"}}, {}))
        failed = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=30)
        assert failed.status_code == 503
        ok = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=30)
        assert ok.status_code == 200 and "x-ferry-cache" not in ok.headers
        hit = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=30)
        assert hit.headers["x-ferry-cache"] == "hit" and hit.text.count("data: ") == ok.text.count("data: ")
    finally:
        b.stop()


def test_config_reload_keeps_requests_in_flight(mock, tmp_path):
    import concurrent.futures
    import signal
    import time

    other = MockUpstream()
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "first", "targets": [("m", "x")]}])
    config = tmp_path / "gateway.toml"
    try:
        url = b.url + "/v1/chat/completions"
        assert httpx.post(url, json={"model": "first", "messages": HELLO}, timeout=30).status_code == 200
        # A slow request is in flight while the config changes under it.
        mock.script = [("sleep", 1.5)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, url, json={"model": "first", "messages": HELLO}, timeout=30)
            time.sleep(0.3)
            config.write_text(config.read_text().replace('name = "first"', 'name = "second"').replace(mock.url, other.url))
            b.proc.send_signal(signal.SIGHUP)
            for _ in range(50):
                ids = [m["id"] for m in httpx.get(b.url + "/v1/models").json()["data"]]
                if "second" in ids:
                    break
                time.sleep(0.1)
            assert "second" in ids and "first" not in ids
            assert slow.result().status_code == 200
            assert slow.result().json()["choices"][0]["message"]["content"] == "slow"
        r = httpx.post(url, json={"model": "second", "messages": HELLO}, timeout=30)
        assert r.status_code == 200 and len(other.requests) == 1
        assert httpx.post(url, json={"model": "first", "messages": HELLO}, timeout=30).status_code == 404
        # The admin route reloads too; a broken file is refused and the running config kept.
        config.write_text(config.read_text().replace('name = "second"', 'name = "third"'))
        r = httpx.post(b.url + "/admin/v1/reload", timeout=30)
        assert r.status_code == 200 and r.json() == {"reloaded": True, "aliases": 1}
        config.write_text(config.read_text() + "\nnot valid toml [[[\n")
        r = httpx.post(b.url + "/admin/v1/reload", timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "config"
        assert httpx.post(url, json={"model": "third", "messages": HELLO}, timeout=30).status_code == 200
        # Both reloads are in the audit log, with the routing before and after; the refused one is not.
        audit = httpx.get(b.url + "/admin/v1/audit", params={"limit": 10}, timeout=30).json()["data"]
        reloads = sorted((e for e in audit if e["action"] == "config.reload"), key=lambda e: e["seq"])
        assert [(e["actor"], e["before"]["aliases"], e["after"]["aliases"]) for e in reloads] == [
            ("signal:SIGHUP", ["first"], ["second"]), (reloads[1]["actor"], ["second"], ["third"])]
    finally:
        b.stop()
        other.stop()


def test_reload_route_needs_the_admin_key_when_one_is_set(mock, tmp_path):
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "a", "targets": [("m", "x")]}], env={"FERRY_ADMIN_KEY": "adm-0123456789abcdef"})
    try:
        r = httpx.post(b.url + "/admin/v1/reload", timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(b.url + "/admin/v1/reload", headers={"authorization": "Bearer wrong"}, timeout=30)
        assert r.status_code == 401
        r = httpx.post(b.url + "/admin/v1/reload", headers={"authorization": "Bearer adm-0123456789abcdef"}, timeout=30)
        assert r.status_code == 200
    finally:
        b.stop()


def test_presets(server, tmp_path):
    """Every example preset loads; a preset adds its system prompt, fills defaults, enforces
    locked parameters, and answers under its own name."""
    import glob
    import os

    from conftest import ROOT

    examples = sorted(glob.glob(os.path.join(ROOT, "examples", "presets", "*.toml")))
    assert len(examples) == 8
    config = tmp_path / "presets.toml"
    config.write_text("\n".join(open(p).read() for p in examples))
    s = Server("--config", str(config))
    try:
        client = s.client(max_retries=0)
        listed = {m.id: m for m in client.models.list().data}
        assert {"healthcare-triage", "smart-home-control", "energy-operations"} <= set(listed)
        assert listed["healthcare-triage"].model_extra["guardrail_policy"] == "health-phi"
        ask = [{"role": "user", "content": "dim the living room to forty percent"}]
        r = client.chat.completions.create(model="smart-home-control", messages=ask)
        assert r.model == "smart-home-control"
        assert "\n" not in r.choices[0].message.content  # the locked stop sequence
        assert r.usage.completion_tokens <= 24  # the default max_tokens
        # The same as the base model with the preset's system prompt and locked parameters.
        system = open(os.path.join(ROOT, "examples", "presets", "smart-home-control.toml")).read()
        prompt = system.split('system_prompt = """')[1].split('"""')[0]
        base = client.chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=24, stop=["\n"],
                                              messages=[{"role": "system", "content": prompt}, *ask])
        assert r.choices[0].message.content == base.choices[0].message.content
        assert r.usage.prompt_tokens == base.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smart-home-control", messages=ask, temperature=0.9)
        assert e.value.param == "temperature" and "locked" in e.value.message
        # The locked stop is a newline: a request for several lines gets one.
        lines = [{"role": "user", "content": "Write a list of 3 commands, one per line: 1. lights on"}]
        r = client.chat.completions.create(model="smart-home-control", messages=lines)
        assert "\n" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        # Every listed preset can be retrieved by its id.
        card = client.models.retrieve("smart-home-control")
        assert card.id == "smart-home-control" and card.owned_by == "ferry-preset"
        assert card.model_extra["base"] == MODEL_ID
        # `ferry chat` sends only what its user set, so a locked temperature and a default
        # max_tokens stay the preset's.
        chat = subprocess.run([BINARY, "chat", "--url", s.url, "-m", "smart-home-control"],
                              input=ask[0]["content"] + "\n/exit\n", capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.strip() == base.choices[0].message.content.strip()
        # A client's value beats a default; its own system prompt joins the preset's.
        alone = client.chat.completions.create(model="agriculture-advice", max_tokens=4, messages=ask)
        joined = client.chat.completions.create(model="agriculture-advice", max_tokens=4,
                                                messages=[{"role": "system", "content": "Answer in French."}, *ask])
        assert alone.usage.completion_tokens <= 4
        assert joined.usage.prompt_tokens > alone.usage.prompt_tokens
        # The Responses and Messages dialects apply the same preset.
        answer = client.responses.create(model="smart-home-control", input=ask[0]["content"])
        assert answer.model == "smart-home-control" and answer.instructions is None
        assert answer.output_text == base.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="smart-home-control", input="hi", temperature=0.9)
        assert e.value.param == "temperature"
        anthropic_body = {"model": "smart-home-control", "max_tokens": 24, "messages": ask}
        r = httpx.post(s.url + "/v1/messages", json=anthropic_body, timeout=120)
        assert r.status_code == 200 and r.json()["model"] == "smart-home-control"
        assert r.json()["content"][0]["text"] == base.choices[0].message.content
        assert r.json()["usage"]["input_tokens"] == base.usage.prompt_tokens
        r = httpx.post(s.url + "/v1/messages", json={**anthropic_body, "temperature": 0.9}, timeout=120)
        assert r.status_code == 400 and "locked" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/messages", json={**anthropic_body, "stop_sequences": ["."]}, timeout=120)
        assert r.status_code == 400 and "'stop_sequences' is locked" in r.json()["error"]["message"]
        # A system prompt in blocks joins the preset's as a string does, and count_tokens
        # counts what a create runs.
        client_system = "Prefer the living room."
        as_text = httpx.post(s.url + "/v1/messages", json={**anthropic_body, "system": client_system}, timeout=120)
        as_blocks = httpx.post(s.url + "/v1/messages", json={**anthropic_body, "system": [
            {"type": "text", "text": client_system}]}, timeout=120)
        assert as_text.status_code == as_blocks.status_code == 200, as_blocks.text
        assert as_text.json()["usage"] == as_blocks.json()["usage"]
        assert as_text.json()["content"] == as_blocks.json()["content"]
        counted = httpx.post(s.url + "/v1/messages/count_tokens", timeout=120, json={
            "model": "smart-home-control", "messages": ask, "system": [{"type": "text", "text": client_system}]})
        assert counted.status_code == 200, counted.text
        assert counted.json()["input_tokens"] == as_blocks.json()["usage"]["input_tokens"]
        # Legacy completions have no system prompt to carry a preset: refused by name.
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="smart-home-control", prompt="hi")
        assert e.value.param == "model" and "/v1/chat/completions" in e.value.message
    finally:
        s.stop()


def test_responses_api_through_an_alias(server, client, tmp_path):
    b = gateway(tmp_path, {"a": server.url + "/v1"}, [{"name": "chained", "targets": [("a", MODEL_ID)]}], real=("a",))
    try:
        via = b.client(max_retries=0)
        kwargs = dict(instructions="You are a helpful assistant.", input="What is the capital of France?",
                      temperature=0, max_output_tokens=16)
        want = client.responses.create(model=MODEL_ID, **kwargs)
        got = via.responses.create(model="chained", **kwargs)
        assert got.output_text == want.output_text and got.status == want.status
        assert via.models.retrieve("chained").owned_by == "ferry-gateway"
        # Counting is the local engine's: an alias gets a 400 that says so, not a 404.
        r = httpx.post(b.url + "/v1/messages/count_tokens", timeout=30,
                       json={"model": "chained", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "local models only" in r.json()["error"]["message"], r.text
        assert (got.usage.input_tokens, got.usage.output_tokens) == (want.usage.input_tokens, want.usage.output_tokens)
        events = list(via.responses.create(model="chained", stream=True, **kwargs))
        assert events[-1].type in ("response.completed", "response.incomplete")
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want.output_text
        assert events[-1].response.usage.output_tokens == want.usage.output_tokens
        assert [e.sequence_number for e in events] == list(range(len(events)))
    finally:
        b.stop()


def test_upstream_logprobs_pass_through(mock, tmp_path):
    """An OpenAI-compatible upstream's logprobs reach the client, plain and streamed."""
    b = gateway(tmp_path, {"m": mock.url}, [{"name": "a", "targets": [("m", "x")]}])
    try:
        client = b.client(max_retries=0)
        mock.script.append(("ok", "Hello there"))
        r = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                                           top_logprobs=1)
        assert mock.requests[-1][1]["logprobs"] is True and mock.requests[-1][1]["top_logprobs"] == 1
        content = r.choices[0].logprobs.content
        assert [(t.token, t.logprob) for t in content] == [("Hello ", -0.25), ("there ", -0.5)]
        assert content[1].top_logprobs[0].token == "there "
        mock.script.append(("ok", "Hello there"))
        stream = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}],
                                                logprobs=True, stream=True)
        streamed = [t.token for c in stream if c.choices and c.choices[0].logprobs
                    for t in c.choices[0].logprobs.content]
        assert streamed == ["Hello ", "there "]
    finally:
        b.stop()
