"""The Responses API and legacy completions through gateway aliases, one per provider kind
(mocks speaking OpenAI's, Anthropic's and Gemini's real wire formats): function tools and a
full call/result round trip, plain and streamed; `text.format` JSON schemas; image inputs
arriving in each provider's own image format; legacy `completions.create` forwarded to an
OpenAI-compatible upstream's `/completions` or answered as one user message elsewhere; and
every feature that cannot be mapped refused with a 400 naming it."""
import json

import httpx
import openai
import pytest
from pydantic import BaseModel

from conftest import MODEL_ID
from mock_upstream import MockUpstream
from test_gateway import gateway

DIALECTS = ["openai", "anthropic", "gemini"]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False},
}
PNG = "data:image/png;base64,iVBORw0KGgo="
URL = "https://example.com/cat.jpg"


@pytest.fixture(scope="module")
def mocks():
    ms = {d: MockUpstream(d) for d in DIALECTS}
    yield ms
    for m in ms.values():
        m.stop()


@pytest.fixture(scope="module")
def ferry(mocks, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    s = gateway(tmp, {d: (d, m.url) for d, m in mocks.items()},
                [{"name": f"{d}-alias", "targets": [(d, f"{d}-model")]} for d in DIALECTS])
    yield s
    s.stop()


@pytest.fixture
def gw(ferry):
    return ferry.client(max_retries=0)


def sent(mock):
    return mock.requests[-1][1]


def check_tools_sent(dialect, body, choice):
    """The tool list and tool choice in the provider's own format."""
    if dialect == "openai":
        assert body["tools"] == [{"type": "function", "function": {
            "name": "get_weather", "description": WEATHER["description"], "parameters": WEATHER["parameters"]}}]
        assert body["tool_choice"] == choice
    elif dialect == "anthropic":
        assert body["tools"] == [{"name": "get_weather", "description": WEATHER["description"],
                                  "input_schema": WEATHER["parameters"]}]
        assert body["tool_choice"] == {"required": {"type": "any"}, "auto": {"type": "auto"}}[choice]
    else:
        assert body["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
        assert body["tools"][0]["functionDeclarations"][0]["parameters"] == WEATHER["parameters"]
        mode = {"required": "ANY", "auto": "AUTO"}[choice]
        assert body["toolConfig"] == {"functionCallingConfig": {"mode": mode}}


def check_round_trip_sent(dialect, body, call_id):
    """The earlier call and its result, as the provider wants them back."""
    if dialect == "openai":
        assert body["messages"][1]["tool_calls"] == [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
        assert body["messages"][2] == {"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": call_id}
    elif dialect == "anthropic":
        assert body["messages"][1] == {"role": "assistant", "content": [
            {"type": "tool_use", "id": call_id, "name": "get_weather", "input": {"city": "Paris"}}]}
        assert body["messages"][2] == {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call_id, "content": '{"sky": "sunny"}'}]}
    else:
        assert body["contents"][1] == {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]}
        assert body["contents"][2] == {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"sky": "sunny"}}}]}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_function_call_round_trip(gw, mocks, dialect):
    mock = mocks[dialect]
    mock.script = [("tool", "get_weather", {"city": "Paris"})]
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = gw.responses.create(model=f"{dialect}-alias", input=question, tools=[WEATHER], tool_choice="required")
    assert r.status == "completed" and r.model == f"{dialect}-alias"
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1, r.output
    call = calls[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id and call.id.startswith("fc") and call.status == "completed"
    assert r.tools[0].name == "get_weather" and r.tool_choice == "required"
    check_tools_sent(dialect, sent(mock), "required")
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens > 0
    # The result goes back in the next request's input, after the call as the SDK returned it.
    mock.script = [("ok", "It is sunny in Paris.")]
    final = gw.responses.create(model=f"{dialect}-alias", tools=[WEATHER], input=[
        *question,
        *[o.model_dump(exclude_none=True) for o in r.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'},
    ])
    assert final.output_text == "It is sunny in Paris."
    assert [o.type for o in final.output] == ["message"]
    check_round_trip_sent(dialect, sent(mock), call.call_id)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_streamed_function_call(gw, mocks, dialect):
    mock = mocks[dialect]
    mock.script = [("tool", "get_weather", {"city": "Oslo"})]
    events = list(gw.responses.create(model=f"{dialect}-alias", input="Weather in Oslo?", tools=[WEATHER],
                                          stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert len(added) == 1
    item = added[0].item
    assert item.name == "get_weather" and item.arguments == "" and item.status == "in_progress" and item.call_id
    index = added[0].output_index
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas and all(d.item_id == item.id and d.output_index == index for d in deltas)
    arguments = "".join(d.delta for d in deltas)
    assert json.loads(arguments) == {"city": "Oslo"}
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == arguments and done.item_id == item.id
    (item_done,) = [e for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert item_done.item.arguments == arguments and item_done.item.status == "completed"
    # OpenAI's order: added, deltas, arguments done, item done, then the response completed.
    positions = [events.index(e) for e in (added[0], deltas[0], deltas[-1], done, item_done, events[-1])]
    assert positions == sorted(positions)
    final = events[-1].response
    assert final.output[-1].type == "function_call" and final.output[-1].arguments == arguments
    if dialect == "anthropic":
        # Anthropic's mock says a sentence before the call: a message item comes first.
        assert final.output[0].type == "message" and final.output_text == "Let me check."
    # The SDK's own stream accumulator assembles the same answer from the events.
    mock.script = [("tool", "get_weather", {"city": "Oslo"})]
    with gw.responses.stream(model=f"{dialect}-alias", input="Weather in Oslo?", tools=[WEATHER]) as stream:
        assembled = stream.get_final_response()
    assert [o.type for o in assembled.output] == [o.type for o in final.output]
    assert json.loads(assembled.output[-1].arguments) == {"city": "Oslo"}


class Weather(BaseModel):
    city: str
    celsius: int


FORMAT = {"type": "json_schema", "name": "weather", "strict": True, "schema": Weather.model_json_schema()}


def test_text_format_json_schema_through_aliases(gw, mocks):
    openai_mock, gemini_mock = mocks["openai"], mocks["gemini"]
    answer = '{"city": "Paris", "celsius": 21}'
    openai_mock.script = [("ok", answer)]
    r = gw.responses.create(model="openai-alias", input="Weather in Paris?", text={"format": FORMAT})
    assert json.loads(r.output_text) == {"city": "Paris", "celsius": 21}
    assert r.text.format.type == "json_schema" and r.text.format.name == "weather"
    assert sent(openai_mock)["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "weather", "schema": FORMAT["schema"], "strict": True}}
    # The SDK's parse helper through an alias.
    openai_mock.script = [("ok", answer)]
    parsed = gw.responses.parse(model="openai-alias", input="Weather in Paris?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="Paris", celsius=21)
    openai_mock.script = [("ok", answer)]
    gw.responses.create(model="openai-alias", input="JSON please", text={"format": {"type": "json_object"}})
    assert sent(openai_mock)["response_format"] == {"type": "json_object"}
    # Gemini: a response schema in its generation config.
    gemini_mock.script = [("ok", answer)]
    r = gw.responses.create(model="gemini-alias", input="Weather in Paris?", text={"format": FORMAT})
    assert json.loads(r.output_text)["celsius"] == 21
    config = sent(gemini_mock)["generationConfig"]
    assert config["responseMimeType"] == "application/json" and config["responseJsonSchema"] == FORMAT["schema"]
    # Anthropic: its structured output, `output_config.format`; JSON without a schema has no
    # Anthropic equivalent: refused by name, never dropped.
    mocks["anthropic"].script = [("ok", answer)]
    r = gw.responses.create(model="anthropic-alias", input="Weather in Paris?", text={"format": FORMAT})
    assert json.loads(r.output_text)["city"] == "Paris"
    assert sent(mocks["anthropic"])["output_config"] == {"format": {"type": "json_schema", "schema": FORMAT["schema"]}}
    before = len(mocks["anthropic"].requests)
    with pytest.raises(openai.BadRequestError) as e:
        gw.responses.create(model="anthropic-alias", input="Weather?", text={"format": {"type": "json_object"}})
    assert e.value.param == "text.format" and "Anthropic" in e.value.message
    assert len(mocks["anthropic"].requests) == before
    # A malformed format is refused before any upstream call.
    with pytest.raises(openai.BadRequestError) as e:
        gw.responses.create(model="openai-alias", input="x",
                                text={"format": {"type": "json_schema", "name": "bad name", "schema": {}}})
    assert e.value.param == "text.format.name"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_input_images_arrive_in_each_providers_format(gw, mocks, dialect):
    mock = mocks[dialect]
    mock.script = [("ok", "A cat.")]
    r = gw.responses.create(model=f"{dialect}-alias", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": PNG, "detail": "auto"},
        {"type": "input_image", "image_url": URL, "detail": "auto"},
    ]}])
    assert r.output_text == "A cat."
    body = sent(mock)
    if dialect == "openai":
        assert body["messages"][0]["content"] == [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}},
            {"type": "image_url", "image_url": {"url": URL, "detail": "auto"}},
        ]
    elif dialect == "anthropic":
        assert body["messages"][0]["content"] == [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": URL}},
        ]
    else:
        assert body["contents"][0]["parts"] == [
            {"text": "What is this?"},
            {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
            {"fileData": {"mimeType": "image/jpeg", "fileUri": URL}},
        ]


def test_strict_and_detail_reach_openai_upstreams(gw, mocks):
    mock = mocks["openai"]
    strict_tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["parameters"],
                                                    "strict": True}}
    image = {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}
    mock.script = [("ok", "A cat.")]
    r = gw.chat.completions.create(model="openai-alias", tools=[strict_tool], messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}])
    assert r.choices[0].message.content == "A cat."
    assert sent(mock)["messages"][0]["content"][1] == image
    assert sent(mock)["tools"][0]["function"]["strict"] is True
    # The Responses API's fields arrive in chat's places.
    mock.script = [("ok", "A cat.")]
    gw.responses.create(model="openai-alias", tools=[{**WEATHER, "strict": False}], input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": URL, "detail": "high"}]}])
    assert sent(mock)["messages"][0]["content"] == [{"type": "image_url", "image_url": {"url": URL, "detail": "high"}}]
    assert sent(mock)["tools"][0]["function"]["strict"] is False
    # Left out by the client: left out upstream.
    mock.script = [("ok", "A cat.")]
    gw.chat.completions.create(model="openai-alias", tools=[{"type": "function", "function": {"name": "f"}}],
                               messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": URL}}]}])
    assert sent(mock)["messages"][0]["content"] == [{"type": "image_url", "image_url": {"url": URL}}]
    assert "strict" not in sent(mock)["tools"][0]["function"]


def test_strict_and_detail_on_anthropic_and_gemini_upstreams(ferry, gw, mocks):
    strict_tool = {**WEATHER, "strict": True}
    # Anthropic's tool definitions take `strict`; Gemini's function declarations cannot.
    mocks["anthropic"].script = [("ok", "fine")]
    gw.responses.create(model="anthropic-alias", input="weather?", tools=[strict_tool])
    assert sent(mocks["anthropic"])["tools"][0]["strict"] is True
    mocks["anthropic"].script = [("ok", "fine")]
    gw.chat.completions.create(model="anthropic-alias", messages=[{"role": "user", "content": "weather?"}],
                               tools=[{"type": "function", "function": {"name": "f", "strict": False}}])
    assert sent(mocks["anthropic"])["tools"][0]["strict"] is False
    mocks["gemini"].script = [("ok", "fine")]
    gw.responses.create(model="gemini-alias", input="weather?", tools=[{**WEATHER, "strict": False}])
    assert "strict" not in sent(mocks["gemini"])["tools"][0]["functionDeclarations"][0]
    # `detail: auto` is the default of both (asserted above: nothing sent); another detail
    # and Gemini's strict tools are refused by name before any upstream call.
    before = {d: len(m.requests) for d, m in mocks.items()}
    low = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]}]
    cases = [
        ("anthropic-alias", "/v1/chat/completions", {"messages": low}, "detail"),
        ("gemini-alias", "/v1/chat/completions", {"messages": low}, "detail"),
        ("anthropic-alias", "/v1/responses", {"input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": URL, "detail": "high"}]}]}, "detail"),
        ("gemini-alias", "/v1/responses", {"input": "weather?", "tools": [strict_tool]}, "strict"),
        ("gemini-alias", "/v1/chat/completions", {"messages": [{"role": "user", "content": "weather?"}], "tools": [
            {"type": "function", "function": {"name": "f", "strict": True}}]}, "strict"),
    ]
    for model, route, body, param in cases:
        r = httpx.post(ferry.url + route, json={"model": model, **body}, timeout=30)
        assert r.status_code == 400, (model, body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error
        provider = "Anthropic" if model.startswith("anthropic") else "Gemini"
        assert provider in error["message"] and param in error["message"], error
    assert {d: len(m.requests) for d, m in mocks.items()} == before, "nothing reached an upstream"


def test_what_cannot_be_mapped_is_a_400_naming_it(ferry, mocks):
    cases = [
        ("openai-alias", {"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ("openai-alias", {"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
         "tool_choice"),
        ("openai-alias", {"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]}, "input[0].type"),
        ("openai-alias", {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1",
                                                                  "detail": "auto"}]}]}, "input[0].content[0]"),
        ("openai-alias", {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
         "input[0].content[0]"),
        ("openai-alias", {"input": [{"role": "user", "content": "hi"},
                                    {"type": "function_call_output", "output": "x"}]}, "input[1].call_id"),
        ("openai-alias", {"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ("openai-alias", {"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ("gemini-alias", {"input": "hi", "tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
        ("anthropic-alias", {"input": "hi", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ]
    before = {d: len(m.requests) for d, m in mocks.items()}
    for model, body, param in cases:
        r = httpx.post(ferry.url + "/v1/responses", json={"model": model, **body}, timeout=30)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)
    assert {d: len(m.requests) for d, m in mocks.items()} == before, "nothing reached an upstream"
    # One call at a time is a flag Anthropic and OpenAI-compatible upstreams take.
    mocks["anthropic"].script = [("ok", "fine")]
    r = httpx.post(ferry.url + "/v1/responses", timeout=30, json={
        "model": "anthropic-alias", "input": "hi", "tools": [WEATHER], "parallel_tool_calls": False})
    assert r.status_code == 200 and r.json()["parallel_tool_calls"] is False
    assert sent(mocks["anthropic"])["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_legacy_completions_through_an_openai_alias(ferry, gw, mocks):
    mock = mocks["openai"]
    mock.script = [("ok", "a quiet village")]
    r = gw.completions.create(model="openai-alias", prompt="Once upon a time", max_tokens=8, echo=True,
                                  logprobs=1, stop=["\n"], n=2, suffix="The end.", seed=3, temperature=0.5)
    assert mock.paths[-1] == "/v1/completions"
    assert sent(mock) == {"model": "openai-model", "prompt": "Once upon a time", "max_tokens": 8, "echo": True,
                          "logprobs": 1, "stop": ["\n"], "n": 2, "suffix": "The end.", "seed": 3,
                          "temperature": 0.5}
    assert r.object == "text_completion" and r.model == "openai-alias" and r.id.startswith("cmpl")
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == "Once upon a timea quiet village "
    assert r.choices[0].logprobs.tokens == ["a ", "quiet ", "village "]
    assert r.choices[0].logprobs.token_logprobs == [-0.5, -0.5, -0.5]
    assert r.choices[0].logprobs.text_offset == [16, 18, 24]
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 4, 9)
    # Several prompts and token ids pass as they are; OpenAI's default of 16 tokens is explicit.
    gw.completions.create(model="openai-alias", prompt=["a", "b"])
    assert sent(mock)["prompt"] == ["a", "b"] and sent(mock)["max_tokens"] == 16
    gw.completions.create(model="openai-alias", prompt=[1, 2, 3])
    assert sent(mock)["prompt"] == [1, 2, 3]
    # Streaming: text_completion chunks, the finish, the usage chunk, then [DONE].
    mock.script = [("ok", "a quiet village")]
    chunks = list(gw.completions.create(model="openai-alias", prompt="Once", stream=True, logprobs=0,
                                            stream_options={"include_usage": True}))
    assert sent(mock)["stream"] is True and sent(mock)["stream_options"] == {"include_usage": True}
    assert all(c.object == "text_completion" and c.model == "openai-alias" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a quiet village "
    # `logprobs: 0`: the upstream's `top_logprobs` is null, and its tokens still come through.
    assert [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == \
        ["a ", "quiet ", "village "]
    mock.script = [("ok", "a quiet village")]
    plain = gw.completions.create(model="openai-alias", prompt="Once", logprobs=0)
    assert plain.choices[0].logprobs.tokens == ["a ", "quiet ", "village "]
    assert plain.choices[0].logprobs.token_logprobs == [-0.5, -0.5, -0.5]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 9
    # An upstream's gw error comes back with its status, message and param; it is not retried.
    mock.script = [("error", 400, {"error": {"message": "prompt too odd", "type": "invalid_request_error",
                                             "param": "prompt", "code": None}}, {})]
    before = len(mock.requests)
    with pytest.raises(openai.BadRequestError) as e:
        gw.completions.create(model="openai-alias", prompt="x")
    assert e.value.param == "prompt" and "prompt too odd" in e.value.message
    assert len(mock.requests) == before + 1
    # A rate limit is retried (the alias allows one retry), as for chat.
    busy = ("error", 429, {"error": {"message": "slow down", "type": "rate_limit_error", "code": None}},
            {"Retry-After": "0"})
    mock.script = [busy, ("ok", "after a wait")]
    raw = gw.completions.with_raw_response.create(model="openai-alias", prompt="x")
    assert raw.headers["x-ferry-attempts"] == "2" and raw.headers["x-ferry-target"] == "openai/openai-model"
    assert raw.parse().choices[0].text == "after a wait "
    mock.script = [busy, busy]
    with pytest.raises(openai.RateLimitError):
        gw.completions.create(model="openai-alias", prompt="x")
    # The engine's own sampling extensions cannot go upstream.
    with pytest.raises(openai.BadRequestError) as e:
        gw.completions.create(model="openai-alias", prompt="x", extra_body={"top_k": 5})
    assert e.value.param == "top_k"
    with pytest.raises(openai.BadRequestError) as e:
        gw.completions.create(model="openai-alias", prompt="x", max_tokens=0)
    assert e.value.param == "max_tokens"


def test_legacy_completions_with_logprobs_an_upstream_garbled_are_a_502(gw, mocks):
    # Logprobs the client asked for that do not read as OpenAI's format are never dropped
    # from the answer: the request fails as the upstream's fault, streamed or not.
    mock = mocks["openai"]
    mock.script = [("bad_logprobs", "a quiet village")]
    with pytest.raises(openai.APIStatusError) as e:
        gw.completions.create(model="openai-alias", prompt="Once", max_tokens=8, logprobs=1)
    assert e.value.status_code == 502 and "logprobs" in e.value.message
    mock.script = [("bad_logprobs", "a quiet village")]
    chunks = gw.completions.create(model="openai-alias", prompt="Once", max_tokens=8, logprobs=1, stream=True)
    with pytest.raises(openai.APIError) as e:
        list(chunks)
    assert "logprobs" in str(e.value)


@pytest.mark.parametrize("dialect", ["anthropic", "gemini"])
def test_legacy_completions_as_one_user_message(gw, mocks, dialect):
    """Providers without a text completion endpoint get the prompt as one user message, as
    LiteLLM's text_completion sends it; echo puts the prompt before the answer."""
    mock = mocks[dialect]
    mock.script = [("ok", "a quiet village")]
    r = gw.completions.create(model=f"{dialect}-alias", prompt="Once upon a time", max_tokens=8, echo=True,
                                  temperature=0.2)
    assert r.object == "text_completion" and r.model == f"{dialect}-alias"
    assert r.choices[0].text == "Once upon a timea quiet village" and r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens > 0
    body = sent(mock)
    if dialect == "anthropic":
        assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]}]
        assert body["max_tokens"] == 8 and "system" not in body
    else:
        assert body["contents"] == [{"role": "user", "parts": [{"text": "Once upon a time"}]}]
        assert body["generationConfig"]["maxOutputTokens"] == 8
    mock.script = [("ok", "a quiet village")]
    chunks = list(gw.completions.create(model=f"{dialect}-alias", prompt="Once upon a time", stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip() == "a quiet village"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # What a chat cannot carry is refused by name, naming the provider, before any call.
    before = len(mock.requests)
    for kwargs, param in [({"logprobs": 1}, "logprobs"), ({"suffix": "The end."}, "suffix"),
                          ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2, 3]}, "prompt")]:
        with pytest.raises(openai.BadRequestError) as e:
            gw.completions.create(**{"model": f"{dialect}-alias", "prompt": "x", **kwargs})
        assert e.value.param == param and dialect.capitalize() in e.value.message, (kwargs, e.value.message)
    assert len(mock.requests) == before


def test_legacy_completions_chained_behind_ferry(server, client, tmp_path):
    """A real Ferry as the OpenAI-compatible upstream: the alias answers exactly as the model
    does directly, echo and logprobs included, plain and streamed."""
    b = gateway(tmp_path, {"a": server.url + "/v1"}, [{"name": "chained", "targets": [("a", MODEL_ID)]}], real=("a",))
    try:
        via = b.client(max_retries=0, timeout=120)
        kwargs = dict(prompt="The capital of France is", max_tokens=8, temperature=0, echo=True, logprobs=2)
        direct = client.completions.create(model=MODEL_ID, **kwargs)
        chained = via.completions.create(model="chained", **kwargs)
        assert chained.choices[0].text == direct.choices[0].text
        assert chained.choices[0].logprobs.tokens == direct.choices[0].logprobs.tokens
        assert chained.choices[0].logprobs.top_logprobs == direct.choices[0].logprobs.top_logprobs
        assert (chained.usage.prompt_tokens, chained.usage.completion_tokens) == \
            (direct.usage.prompt_tokens, direct.usage.completion_tokens)
        plain = dict(prompt="The capital of France is", max_tokens=8, temperature=0)
        want = client.completions.create(model=MODEL_ID, **plain).choices[0].text
        streamed = via.completions.create(model="chained", stream=True, **plain)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == want
    finally:
        b.stop()
