"""Malformed and hostile requests: each gets the right 4xx in OpenAI's error shape, and the
server keeps serving."""
import json

import pytest

from conftest import MODEL_ID

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MSG = [{"role": "user", "content": "Hi"}]


def chat(**fields):
    return json.dumps({"model": MODEL_ID, "messages": MSG, **fields}).encode()


def responses(**fields):
    return json.dumps({"model": MODEL_ID, "input": "Hi", **fields}).encode()


def nested(depth):
    return ("[" * depth + "]" * depth).encode()


# (name, method, path, raw body, expected status, expected param or None, expected code or None)
CASES = [
    ("invalid json", "POST", CHAT, b"{not json", 400, None, "invalid_json"),
    ("empty body", "POST", CHAT, b"", 400, None, "invalid_json"),
    ("json array body", "POST", CHAT, b"[1,2,3]", 400, None, None),
    ("missing model", "POST", CHAT, json.dumps({"messages": MSG}).encode(), 400, "model", "missing_required_parameter"),
    ("missing messages", "POST", CHAT, json.dumps({"model": MODEL_ID}).encode(), 400, "messages", "missing_required_parameter"),
    ("missing role", "POST", CHAT, chat(messages=[{"content": "x"}]), 400, "messages[0].role", None),
    ("model wrong type", "POST", CHAT, json.dumps({"model": 5, "messages": MSG}).encode(), 400, "model", "invalid_type"),
    ("messages not a list", "POST", CHAT, chat(messages="hi"), 400, "messages", "invalid_type"),
    ("empty messages", "POST", CHAT, chat(messages=[]), 400, "messages", None),
    ("unknown role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", None),
    ("user message without content", "POST", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content", "missing_required_parameter"),
    ("content wrong type", "POST", CHAT, chat(messages=[{"role": "user", "content": 42}]), 400, None, None),
    ("image part", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages[0].content[0]", None),
    ("temperature 5", "POST", CHAT, chat(temperature=5), 400, "temperature", "invalid_value"),
    ("temperature string", "POST", CHAT, chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("negative max_tokens", "POST", CHAT, chat(max_tokens=-1), 400, "max_tokens", None),
    ("zero max_completion_tokens", "POST", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("huge max_tokens", "POST", CHAT, chat(max_tokens=10**9), 400, "messages", "context_length_exceeded"),
    ("huge n", "POST", CHAT, chat(n=1000), 400, "n", None),
    ("n zero", "POST", CHAT, chat(n=0), 400, "n", None),
    ("top_p above one", "POST", CHAT, chat(top_p=1.5), 400, "top_p", None),
    ("presence_penalty out of range", "POST", CHAT, chat(presence_penalty=3), 400, "presence_penalty", None),
    ("logit_bias bad token", "POST", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias", None),
    ("logit_bias out of range", "POST", CHAT, chat(logit_bias={"5": 500}), 400, "logit_bias", None),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=3), 400, "top_logprobs", None),
    ("top_logprobs too many", "POST", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", None),
    ("stop wrong type", "POST", CHAT, chat(stop=5), 400, "stop", "invalid_type"),
    ("too many stops", "POST", CHAT, chat(stop=[str(i) for i in range(40)]), 400, "stop", None),
    ("stream not bool", "POST", CHAT, chat(stream="yes"), 400, "stream", "invalid_type"),
    ("tool result without its call", "POST", CHAT, chat(messages=MSG + [{"role": "tool", "tool_call_id": "call_nobody", "content": "42"}]), 400, "messages[1].tool_call_id", None),
    ("tool result without an id", "POST", CHAT, chat(messages=MSG + [{"role": "tool", "content": "42"}]), 400, "messages[1].tool_call_id", "missing_required_parameter"),
    ("stream_options without stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("completions stream_options without stream", "POST", COMPLETIONS, json.dumps({"model": MODEL_ID, "prompt": "x", "stream_options": {"include_usage": True}}).encode(), 400, "stream_options", None),
    # What OpenAI honours and Ferry cannot is refused by name, never answered without it.
    ("legacy functions", "POST", CHAT, chat(functions=[{"name": "f", "parameters": {"type": "object"}}]), 400, "functions", None),
    ("legacy function_call", "POST", CHAT, chat(function_call="auto"), 400, "function_call", None),
    ("audio output", "POST", CHAT, chat(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}), 400, "modalities", None),
    ("reasoning_effort", "POST", CHAT, chat(reasoning_effort="high"), 400, "reasoning_effort", None),
    ("responses bad role", "POST", RESPONSES, responses(input=[{"role": "tool", "content": "x"}]), 400, "input[0].role", None),
    ("audio parameters", "POST", CHAT, chat(audio={"voice": "alloy", "format": "wav"}), 400, "audio", None),
    ("completions prompt longer than context", "POST", COMPLETIONS, json.dumps({"model": MODEL_ID, "prompt": "hello " * 2000}).encode(), 400, "prompt", "context_length_exceeded"),
    # A client moving from chat: what the Responses API spells otherwise, or has not, is named.
    ("responses max_tokens", "POST", RESPONSES, responses(max_tokens=3), 400, "max_tokens", None),
    ("responses response_format", "POST", RESPONSES, responses(response_format={"type": "json_object"}), 400, "response_format", None),
    ("responses top_k", "POST", RESPONSES, responses(top_k=1), 400, "top_k", None),
    ("responses stop", "POST", RESPONSES, responses(stop=["5"]), 400, "stop", None),
    ("responses truncation auto", "POST", RESPONSES, responses(truncation="auto"), 400, "truncation", None),
    ("responses reasoning", "POST", RESPONSES, responses(reasoning={"effort": "high"}), 400, "reasoning", None),
    ("responses json_schema without schema", "POST", RESPONSES, responses(text={"format": {"type": "json_schema", "name": "a"}}), 400, "text.format.schema", "missing_required_parameter"),
    ("responses input longer than context", "POST", RESPONSES, responses(input="hello " * 2000), 400, "input", "context_length_exceeded"),
    ("unknown model", "POST", CHAT, chat(model="gpt-17"), 404, "model", "model_not_found"),
    ("prompt longer than context", "POST", CHAT, chat(messages=[{"role": "user", "content": "hello " * 2000}]), 400, "messages", "context_length_exceeded"),
    ("invalid utf-8", "POST", CHAT, b'{"model": "' + MODEL_ID.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, None),
    ("deeply nested json", "POST", CHAT, nested(100000), 400, None, None),
    ("10 MB body", "POST", CHAT, b'{"model": "x", "pad": "' + b"a" * (10 * 1024 * 1024) + b'"}', 413, None, "request_too_large"),
    ("completions token out of vocab", "POST", COMPLETIONS, json.dumps({"model": MODEL_ID, "prompt": [10**9]}).encode(), 400, "prompt", None),
    ("completions negative token", "POST", COMPLETIONS, json.dumps({"model": MODEL_ID, "prompt": [-5]}).encode(), 400, "prompt", None),
    ("completions empty prompt list", "POST", COMPLETIONS, json.dumps({"model": MODEL_ID, "prompt": []}).encode(), 400, "prompt", None),
    ("completions logprobs 100", "POST", COMPLETIONS, json.dumps({"model": MODEL_ID, "prompt": "x", "logprobs": 100}).encode(), 400, "logprobs", None),
    ("completions prompt wrong type", "POST", COMPLETIONS, json.dumps({"model": MODEL_ID, "prompt": {"a": 1}}).encode(), 400, None, None),
    ("unknown route", "POST", "/v1/nothing", b"{}", 404, None, "unknown_url"),
    ("wrong method", "GET", CHAT, None, 405, None, "method_not_allowed"),
    ("unknown model retrieve", "GET", "/v1/models/nope", None, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("name,method,path,body,status,param,code", CASES, ids=[c[0] for c in CASES])
def test_bad_request(http, name, method, path, body, status, param, code):
    r = http.request(method, path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "rate_limit_error", "server_error")
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if error["code"] != "invalid_json":  # a syntax error's position helps; a field's path says more
        assert " at line " not in error["message"], error["message"]
    assert "untagged" not in error["message"] and "variant" not in error["message"], error["message"]


def test_messages_say_what_was_expected(http):
    r = http.post(CHAT, content=chat(messages="hi"))
    assert r.json()["error"]["message"] == "Invalid type for 'messages': expected an array, but got string \"hi\" instead."
    r = http.post(CHAT, content=json.dumps({"model": MODEL_ID}).encode())
    assert r.json()["error"]["message"] == "Missing required parameter: 'messages'."
    r = http.post(CHAT, content=chat(max_tokens="ten"))
    assert r.json()["error"]["message"] == "Invalid type for 'max_tokens': expected an integer, but got string \"ten\" instead."
    r = http.post(CHAT, content=chat(stop=5))
    assert r.json()["error"]["message"] == "Invalid value for 'stop': expected a string or an array of strings."
    r = http.post(COMPLETIONS, content=json.dumps({"model": MODEL_ID, "prompt": [1, "a"]}).encode())
    assert r.json()["error"]["param"] == "prompt" and "an array of token ids" in r.json()["error"]["message"]


def test_table_is_large_enough():
    assert len(CASES) >= 25


def test_unknown_fields_are_ignored(http):
    r = http.post(CHAT, content=chat(max_tokens=2, some_future_field={"x": [1, 2]}, temperature=0))
    assert r.status_code == 200, r.text


def test_nullable_booleans_take_null(http):
    """OpenAI's `boolean | null` fields: null is their default, not a type error."""
    r = http.post(CHAT, content=chat(max_tokens=2, stream=None, stream_options=None))
    assert r.status_code == 200 and r.json()["object"] == "chat.completion", r.text
    body = json.dumps({"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2, "echo": None, "stream": None})
    r = http.post("/v1/completions", content=body.encode())
    assert r.status_code == 200 and r.json()["object"] == "text_completion", r.text
    r = http.post("/v1/responses", content=responses(max_output_tokens=16, stream=None))
    assert r.status_code == 200 and r.json()["object"] == "response", r.text


def test_server_still_serves_after_bad_input(http):
    for _, method, path, body, *_ in CASES[:10]:
        http.request(method, path, content=body)
    r = http.post(CHAT, content=chat(max_tokens=3, temperature=0))
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] <= 3
