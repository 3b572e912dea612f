"""The official anthropic SDK against /v1/messages on the local engine.

Recent SDKs no longer take `temperature` as an argument; the API still accepts it, so the
tests send it through `extra_body` (greedy decoding makes the answers comparable)."""
import json
from typing import Literal

import anthropic
import httpx
import pydantic
import pytest

from conftest import MODEL_ID

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def test_message_plain(claude, client):
    m = claude.messages.create(
        model=MODEL_ID, max_tokens=24, extra_body=GREEDY, system="You are terse.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert m.type == "message" and m.role == "assistant"
    assert m.id.startswith("msg_"), "Anthropic's spelling"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    # The same conversation through the OpenAI dialect gives the same greedy text and counts.
    o = client.chat.completions.create(
        model=MODEL_ID, max_tokens=24, temperature=0,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}],
    )
    assert m.content[0].text == o.choices[0].message.content
    assert m.usage.input_tokens == o.usage.prompt_tokens
    assert m.usage.output_tokens == o.usage.completion_tokens


def test_message_streaming(claude):
    kwargs = dict(model=MODEL_ID, max_tokens=16, extra_body=GREEDY,
                  messages=[{"role": "user", "content": [{"type": "text", "text": "Name three colours."}]}])
    plain = claude.messages.create(**kwargs)
    types = []
    with claude.messages.stream(**kwargs) as stream:
        for event in stream:
            types.append(event.type)
        final = stream.get_final_message()
    assert types[0] == "message_start"
    assert types[-1] == "message_stop"
    assert "content_block_start" in types and "content_block_stop" in types and "message_delta" in types
    assert final.content[0].text == plain.content[0].text
    assert final.usage.output_tokens == plain.usage.output_tokens
    assert final.stop_reason == plain.stop_reason


def test_stop_sequence_and_max_tokens(claude):
    m = claude.messages.create(model=MODEL_ID, max_tokens=3, extra_body=GREEDY,
                               messages=[{"role": "user", "content": "Tell me a long story."}])
    assert m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 3
    free = claude.messages.create(model=MODEL_ID, max_tokens=30, extra_body=GREEDY,
                                  messages=[{"role": "user", "content": "Tell me a long story."}])
    words = free.content[0].text.split()
    stop = words[3]
    m = claude.messages.create(model=MODEL_ID, max_tokens=30, extra_body=GREEDY, stop_sequences=[stop],
                               messages=[{"role": "user", "content": "Tell me a long story."}])
    assert m.stop_reason == "stop_sequence"
    assert m.stop_sequence == stop
    assert stop not in m.content[0].text


def test_count_tokens(claude):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    counted = claude.messages.count_tokens(model=MODEL_ID, messages=messages, system="You are terse.")
    m = claude.messages.create(model=MODEL_ID, max_tokens=1, messages=messages, system="You are terse.")
    assert counted.input_tokens == m.usage.input_tokens


def test_usage_and_a_tool_stream_count_the_prompt_at_message_start(claude):
    """Anthropic's usage fields, and `message_start` counting the prompt in a stream with
    tools too (it said 0, and only `message_delta` had the count)."""
    tools = [{"name": "get_weather", "description": "The weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    counted = claude.messages.count_tokens(model=MODEL_ID, messages=ask, tools=tools).input_tokens
    m = claude.messages.create(model=MODEL_ID, max_tokens=2, messages=ask)
    assert (m.usage.cache_creation_input_tokens, m.usage.cache_read_input_tokens) == (0, 0)
    with claude.messages.stream(model=MODEL_ID, max_tokens=2, messages=ask, tools=tools) as stream:
        start = next(e for e in stream if e.type == "message_start")
        final = stream.get_final_message()
    assert start.message.usage.input_tokens == counted == final.usage.input_tokens


def test_count_tokens_with_tools_and_tool_turns(claude):
    """count_tokens counts the prompt a create runs, tools and earlier tool turns included (it
    refused both)."""
    tools = [{"name": "get_weather", "description": "The weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    counted = claude.messages.count_tokens(model=MODEL_ID, messages=ask, tools=tools)
    m = claude.messages.create(model=MODEL_ID, max_tokens=1, messages=ask, tools=tools)
    assert counted.input_tokens == m.usage.input_tokens
    assert counted.input_tokens > claude.messages.count_tokens(model=MODEL_ID, messages=ask).input_tokens
    turns = ask + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"}]},
    ]
    for offered in (tools, None):
        extra = {"tools": offered} if offered else {}
        counted = claude.messages.count_tokens(model=MODEL_ID, messages=turns, **extra)
        m = claude.messages.create(model=MODEL_ID, max_tokens=1, messages=turns, **extra)
        assert counted.input_tokens == m.usage.input_tokens, offered


def test_consecutive_turns_of_one_role_are_one_turn(claude):
    """As Anthropic combines them (the SDK's docs say so); they were two turns of the template."""
    tools = [{"name": "get_weather", "description": "The weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    two = [{"role": "user", "content": "My name is Ada."}, {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]}]
    one = [{"role": "user", "content": "My name is Ada.\n\nWhat is my name?"}]
    for extra in ({}, {"tools": tools}):
        assert (claude.messages.count_tokens(model=MODEL_ID, messages=two, **extra).input_tokens
                == claude.messages.count_tokens(model=MODEL_ID, messages=one, **extra).input_tokens), extra
    a = claude.messages.create(model=MODEL_ID, max_tokens=12, messages=two, extra_body=GREEDY)
    b = claude.messages.create(model=MODEL_ID, max_tokens=12, messages=one, extra_body=GREEDY)
    assert a.content[0].text == b.content[0].text and a.usage.input_tokens == b.usage.input_tokens


def test_an_assistant_prefill_is_continued(claude):
    """A conversation ending with the assistant's text is continued from it, and the answer is
    only what follows (it used to be closed as a turn of its own, and the model began anew)."""
    ask = {"role": "user", "content": "Count from 1 to 10 separated by commas"}
    prefilled = [ask, {"role": "assistant", "content": "1, 2, 3,"}]
    m = claude.messages.create(model=MODEL_ID, max_tokens=8, extra_body=GREEDY, messages=prefilled)
    assert m.content[0].text.startswith(" 4, 5"), m.content[0].text
    assert claude.messages.count_tokens(model=MODEL_ID, messages=prefilled).input_tokens == m.usage.input_tokens
    plain = claude.messages.create(model=MODEL_ID, max_tokens=1, messages=[ask])
    assert m.usage.input_tokens > plain.usage.input_tokens
    # As Anthropic: the prefill may not end in white space.
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL_ID, max_tokens=8, messages=[ask, {"role": "assistant", "content": "1, 2, "}])
    assert "trailing whitespace" in e.value.message


def test_errors_are_anthropic_shaped(claude, server):
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL_ID, max_tokens=5, extra_body={"temperature": 1.5}, messages=[{"role": "user", "content": "hi"}])
    assert "temperature" in str(e.value)
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL_ID, max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                               tools=[{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
                               tool_choice={"type": "tool", "name": "g"})
    assert "tool_choice" in str(e.value)
    r = httpx.post(server.url + "/v1/messages", content=b"{oops", timeout=30)
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


class Weather(pydantic.BaseModel):
    city: str
    sky: Literal["sunny", "cloudy", "rainy", "snowy"]
    windy: bool
    temperature_c: int


def test_structured_output_with_messages_parse(claude):
    """`messages.parse(output_format=Model)` sends `output_config.format` with the model's
    JSON schema; the answer is generated under that schema's grammar, so it always parses.
    (The SDK moves bounds such as maxLength into descriptions, so the schema has none.)"""
    for place in ["Paris", "Tokyo", "Lagos", "Lima"]:
        m = claude.messages.parse(model=MODEL_ID, max_tokens=150, extra_body=GREEDY, output_format=Weather,
                                  messages=[{"role": "user", "content": f"What is the weather like in {place} today? Answer in JSON."}])
        assert isinstance(m.parsed_output, Weather), m.content
        assert m.stop_reason == "end_turn"
    # Streamed: the text deltas add up to JSON that validates.
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "windy": {"type": "boolean"}},
              "required": ["city", "windy"], "additionalProperties": False}
    with claude.messages.stream(model=MODEL_ID, max_tokens=150, extra_body=GREEDY,
                                output_config={"format": {"type": "json_schema", "schema": schema}},
                                messages=[{"role": "user", "content": "Is it windy in Oslo? Answer in JSON."}]) as stream:
        text = "".join(stream.text_stream)
    answer = json.loads(text)
    assert set(answer) == {"city", "windy"} and isinstance(answer["windy"], bool)


def test_what_cannot_be_served_is_refused_by_name(claude):
    """Each of these was answered 200 with the field dropped; Anthropic's API refuses them
    (or Ferry cannot honour them), so they are 400s naming the field."""
    hi = [{"role": "user", "content": "hi"}]
    tool = {"name": "lookup", "description": "d", "input_schema": {"type": "object"}}
    cases = [
        ({"tool_choice": {"type": "auto"}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": []}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": []}, {"role": "user", "content": "b"}]}, "messages.1"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
        ({"tools": [{**tool, "name": "look up!"}]}, "tools.0.name"),
        ({"tools": [{"name": "lookup"}]}, "tools.0.input_schema"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"output_config": {"effort": "high"}}, "output_config.effort"),
        ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format"),
        ({"mcp_servers": [{"type": "url", "url": "https://example.com", "name": "x"}]}, "mcp_servers"),
        ({"tools": [tool], "tool_choice": {"type": "tool", "name": "other"}}, "tool_choice.name"),
        ({"tools": [tool, tool]}, "tools.1.name"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    ]
    # Tool turns that don't fit together, and a result holding what the model cannot read
    # (an image was dropped from it, and the model answered about what it never saw).
    call = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}]}
    def result(**block):
        return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", **block}]}
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    cases += [
        ({"tools": [tool], "messages": hi + [call, result(tool_use_id="toolu_nope", content="x")]},
         "messages.2.content.0.tool_use_id"),
        ({"tools": [tool], "messages": hi + [call, result(content=[image])]}, "messages.2.content.0.content.0"),
        ({"tools": [tool], "messages": hi + [call, result(content=5)]}, "messages.2.content.0.content"),
        ({"tools": [tool], "messages": hi + [call, {"role": "user", "content": "thanks"}]}, "without tool_result"),
        ({"tools": [tool], "messages": hi + [{"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": "x"}]}, result(content="x")]},
         "messages.1.content.0.input"),
        ({"tools": [tool], "messages": [{"role": "user", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}}]}]}, "messages.0.content.0"),
    ]
    for extra, named in cases:
        body = {"messages": hi, **extra}
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.create(model=MODEL_ID, max_tokens=5, messages=body.pop("messages"), extra_body=body)
        assert named in str(e.value), (extra, str(e.value))
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    # Thinking turned off, a service tier and a final empty assistant turn are served.
    m = claude.messages.create(model=MODEL_ID, max_tokens=3, messages=hi + [{"role": "assistant", "content": ""}],
                               extra_body={"thinking": {"type": "disabled"}, "service_tier": "auto"})
    assert m.content[0].type == "text"


def test_unknown_routes_and_methods_under_messages_answer_in_anthropic_shape(server):
    for method, path, status in [("GET", "/v1/messages", 405), ("POST", "/v1/messages/batches", 404)]:
        r = httpx.request(method, server.url + path, json={})
        assert r.status_code == status
        assert r.json()["type"] == "error" and r.json()["error"]["type"] in ("invalid_request_error", "not_found_error")
    # OpenAI's routes keep OpenAI's shape.
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "type" not in r.json() and r.json()["error"]["message"]


def test_the_request_id_reads_as_anthropic_sends_it(claude):
    raw = claude.messages.with_raw_response.create(model=MODEL_ID, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    assert raw.parse()._request_id == raw.headers["request-id"]
