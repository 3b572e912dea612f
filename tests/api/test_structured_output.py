"""Structured output and tool calling on local models through the official `openai` SDK:
`chat.completions.parse` with pydantic models, tool calls (plain and streamed) with a full round
trip, every `tool_choice`, and schemas the grammar compiler refuses."""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from conftest import MODEL_ID, MODELS_DIR, Server

QWEN_FILE = os.path.join(MODELS_DIR, "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf")
QWEN_ID = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M"


class Review(BaseModel):
    topic: str = Field(max_length=40)
    sentiment: Literal["positive", "negative", "neutral"]
    score: int = Field(ge=0, le=10)
    keywords: list[Annotated[str, Field(max_length=20)]] = Field(max_length=3)


PROMPTS = [
    "The pizza was cold and the waiter ignored us.",
    "I loved the new phone: fast, light and the battery lasts two days.",
    "The train was on time.",
    "This book changed my life. Beautiful writing.",
    "The hotel room smelled of smoke and the sheets were dirty.",
    "Average movie, nothing special, popcorn was fine.",
    "Best concert I have been to in years!",
    "The software update broke my printer driver.",
    "Our hike up the mountain had gorgeous views.",
    "The museum was closed without notice.",
    "My new running shoes are comfortable but wear out quickly.",
    "The coffee here is strong and cheap.",
    "Customer support hung up on me twice.",
    "The garden is blooming with tulips this spring.",
    "The exam was hard but fair.",
    "Delivery took three weeks and the box was crushed.",
    "The violin lesson went well today.",
    "A quiet day at the office.",
    "The cake recipe worked perfectly on the first try.",
    "Traffic was terrible and I missed the meeting.",
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def smollm2():
    s = Server("--parallel", "8", "--ctx-size", "1024")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def qwen():
    if not os.path.exists(QWEN_FILE):
        pytest.skip("run python3 scripts/fetch-models.py qwen2.5")
    s = Server("--model", QWEN_FILE, "--parallel", "8", "--ctx-size", "1024", model=False)
    yield s
    s.stop()


@pytest.fixture(params=["smollm2", "qwen"])
def target(request):
    server = request.getfixturevalue(request.param)
    model = MODEL_ID if request.param == "smollm2" else QWEN_ID
    return server.client(max_retries=0, timeout=300), model


def parse_review(client, model, text, seed):
    completion = client.chat.completions.parse(
        model=model,
        messages=[
            {"role": "system", "content": "Summarise the review as JSON."},
            {"role": "user", "content": text},
        ],
        response_format=Review,
        max_tokens=120,
        temperature=0.7,
        seed=seed,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    return choice.message.parsed


def test_parse_twenty_prompts_all_validate(target):
    client, model = target
    with ThreadPoolExecutor(8) as pool:
        parsed = list(pool.map(lambda item: parse_review(client, model, item[1], item[0]), enumerate(PROMPTS)))
    assert len(parsed) == 20
    for review in parsed:
        assert isinstance(review, Review)
        # pydantic validated it already; the bounds are the schema's.
        assert 0 <= review.score <= 10 and len(review.keywords) <= 3


def test_json_object_mode_gives_an_object_and_logprobs_stay_on(smollm2):
    client = smollm2.client(max_retries=0, timeout=120)
    completion = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Give me a JSON object describing a cat."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = completion.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")
    tokens = choice.logprobs.content
    assert len(tokens) == completion.usage.completion_tokens
    assert "".join(t.token for t in tokens).startswith("{")
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)


def test_a_schema_that_leaves_objects_open_gets_no_undeclared_keys(smollm2):
    # JSON Schema leaves an object open unless it says `additionalProperties: false`; a small
    # model then invents keys (7 of 8 answers did). Objects that list their properties are
    # closed, at the top and nested, in response formats and tool arguments alike.
    client = smollm2.client(max_retries=0, timeout=120)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                       "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                                "required": ["city"]}},
        "required": ["name", "age", "home"],
    }

    def person(seed):
        completion = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Describe a person as JSON, with many details."}],
            response_format={"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": schema}},
            max_tokens=150,
            temperature=1.0,
            seed=seed,
        )
        assert completion.choices[0].finish_reason == "stop", completion
        return json.loads(completion.choices[0].message.content)

    with ThreadPoolExecutor(8) as pool:
        people = list(pool.map(person, range(8)))
    for p in people:
        assert set(p) == {"name", "age", "home"}, p
        assert set(p["home"]) == {"city"}, p

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}

    def call(seed):
        completion = client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "What's the weather in Paris? Give every detail you can."}],
            tools=[tool], tool_choice="required", parallel_tool_calls=False,
            max_tokens=80, temperature=1.0, seed=seed,
        )
        return json.loads(completion.choices[0].message.tool_calls[0].function.arguments)

    with ThreadPoolExecutor(8) as pool:
        for arguments in pool.map(call, range(8)):
            assert set(arguments) == {"city"}, arguments


def test_streamed_structured_output_parses(smollm2):
    client = smollm2.client(max_retries=0, timeout=120)
    with client.chat.completions.stream(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Review: the soup was great."}],
        response_format=Review,
        max_tokens=120,
        temperature=0,
    ) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Review)


def test_streamed_tool_calls_open_with_null_content(smollm2):
    """A streamed answer of tool calls opens its choice with content null, as OpenAI's: the SDK's
    stream helper then ends with the same message as the whole answer (content None, not "")."""
    client = smollm2.client(max_retries=0, timeout=120)
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Weather in Paris?"}], temperature=0,
                  tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {
                      "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
                  tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    whole = client.chat.completions.create(**kwargs).choices[0].message
    with client.chat.completions.stream(**kwargs) as stream:
        streamed = stream.get_final_completion().choices[0].message
    assert whole.content is None and streamed.content is None, (whole.content, streamed.content)
    assert streamed.tool_calls[0].function.name == whole.tool_calls[0].function.name == "get_weather"


def test_a_call_cut_off_by_max_tokens_is_returned_as_far_as_it_got(smollm2):
    """A call cut off by max_tokens vanished: finish_reason length, no tool_calls, and (cut in
    its opening tag) content '<tool_'. OpenAI returns the call as far as it was written."""
    client = smollm2.client(max_retries=0, timeout=120)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Weather in Paris?"}], temperature=0,
                  tools=tools, tool_choice="required")
    full = client.chat.completions.create(max_tokens=60, **kwargs).choices[0].message.tool_calls[0].function.arguments
    for limit in (3, 16, 20):
        choice = client.chat.completions.create(max_tokens=limit, **kwargs).choices[0]
        assert choice.finish_reason == "length"
        assert "<tool" not in (choice.message.content or ""), choice.message.content
        chunks = list(client.chat.completions.create(max_tokens=limit, stream=True, **kwargs))
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert chunks[-1].choices[0].finish_reason == "length"
        if limit == 3:
            assert not choice.message.tool_calls and not deltas
            continue
        call = choice.message.tool_calls[0].function
        assert call.name == "get_weather" and full.startswith(call.arguments) and len(call.arguments) < len(full)
        assert deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments or "" for d in deltas) == call.arguments


def test_bad_schemas_and_formats_are_400s_naming_the_parameter(smollm2):
    client = smollm2.client(max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "array", "items": {"type": "string"}, "uniqueItems": True}}},
         "response_format", "uniqueItems"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strung"}}},
         "response_format", "strung"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
         "response_format.json_schema.name", "name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
         "response_format.json_schema.schema", "object"),
        ({"type": "xml"}, "response_format", "json_schema"),
    ]
    for response_format, param, word in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_ID, messages=messages, response_format=response_format,
                                           max_tokens=5)
        error = e.value.body
        assert e.value.status_code == 400
        assert error["param"] == param, error
        assert word in error["message"], error
        assert error["type"] == "invalid_request_error"


def test_tool_choice_errors_are_400s(smollm2):
    client = smollm2.client(max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hi"}]
    bad = [
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools[1].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}}}]}, "tools"),
    ]
    for extra, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=5, **extra)
        assert e.value.body["param"] == param, (extra, e.value.body)


def weather_question():
    return [{"role": "user", "content": "What is the weather like in Paris right now? Use celsius."}]


def check_weather_call(call):
    assert call.type == "function"
    assert call.id.startswith("call_"), "OpenAI's spelling"
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"}
    assert arguments["unit"] in ("celsius", "fahrenheit")
    return arguments


@pytest.mark.parametrize("stream", [False, True])
def test_tool_round_trip(target, stream):
    # Greedy, like the final answer below: sampled at the default temperature, SmolLM2 now and
    # then wrote arguments longer than max_tokens and the call ended with `length` (about one
    # run in six).
    client, model = target
    messages = weather_question()
    tools = [WEATHER_TOOL, TIME_TOOL]
    if stream:
        chunks = list(client.chat.completions.create(
            model=model, messages=messages, tools=tools, tool_choice="required", max_tokens=80, stream=True,
            parallel_tool_calls=False, temperature=0))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        call_deltas = [d.tool_calls[0] for d in deltas if d.tool_calls]
        # OpenAI's streaming shape: the first delta has id, type and name with empty arguments,
        # later ones add argument text only.
        first = call_deltas[0]
        assert first.index == 0 and first.id and first.type == "function"
        assert first.function.name == "get_weather" and first.function.arguments == ""
        assert all(d.id is None and d.function.name is None for d in call_deltas[1:])
        assert len(call_deltas) >= 2
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        arguments = "".join(d.function.arguments for d in call_deltas)
        assert json.loads(arguments)["unit"] in ("celsius", "fahrenheit")
        call = openai.types.chat.ChatCompletionMessageToolCall(
            id=first.id, type="function", function={"name": "get_weather", "arguments": arguments})
        assistant = {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}
    else:
        completion = client.chat.completions.create(
            model=model, messages=messages, tools=tools, tool_choice="required", max_tokens=80,
            parallel_tool_calls=False, temperature=0)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        check_weather_call(call)
        assistant = choice.message.model_dump(exclude_none=True)
    # The tool's result goes back; the model answers in text.
    messages = messages + [
        assistant,
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    final = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="none",
                                           max_tokens=60, temperature=0)
    choice = final.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None
    assert choice.message.content and "<tool_call>" not in choice.message.content
    if "qwen" in model.lower():
        # Qwen reads the tool's answer.
        assert "21" in choice.message.content, choice.message.content


def test_tool_choice_variants_on_qwen(qwen):
    client = qwen.client(max_retries=0, timeout=300)
    tools = [WEATHER_TOOL, TIME_TOOL]
    question = [{"role": "user", "content": "What time is it in Tokyo?"}]
    named = client.chat.completions.create(
        model=QWEN_ID, messages=question, tools=tools, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    check_weather_call(calls[0])
    # auto: the model picks the right tool by itself here.
    auto = client.chat.completions.create(model=QWEN_ID, messages=question, tools=tools, max_tokens=80,
                                          temperature=0)
    choice = auto.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls[0].function.name == "get_time"
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"]
    # none: never a call.
    none = client.chat.completions.create(model=QWEN_ID, messages=question, tools=tools, tool_choice="none",
                                          max_tokens=30, temperature=0)
    assert none.choices[0].message.tool_calls is None


def test_a_stop_sequence_never_cuts_a_call_or_a_json_answer(qwen):
    """A stop string ends free text only: inside a tool call's arguments or a JSON answer it
    would leave arguments that do not parse and a call to run without them."""
    client = qwen.client(max_retries=0, timeout=300)
    question = weather_question()
    for tool_choice in ("required", "auto"):
        r = client.chat.completions.create(model=QWEN_ID, messages=question, tools=[WEATHER_TOOL],
                                           tool_choice=tool_choice, stop=["Paris", "celsius"], max_tokens=80,
                                           temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", (tool_choice, choice)
        arguments = check_weather_call(choice.message.tool_calls[0])
        assert "Paris" in arguments["city"] and arguments["unit"] == "celsius", tool_choice
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = client.chat.completions.create(
        model=QWEN_ID, messages=[{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        stop=["Paris", "}"], max_tokens=40, temperature=0)
    assert "Paris" in json.loads(r.choices[0].message.content)["city"]
    # Free text before a call still stops, as a stop sequence should.
    plain = client.chat.completions.create(model=QWEN_ID, messages=question, tools=[WEATHER_TOOL], tool_choice="none",
                                           max_tokens=40, temperature=0)
    words = plain.choices[0].message.content.split()
    assert len(words) > 2
    cut = client.chat.completions.create(model=QWEN_ID, messages=question, tools=[WEATHER_TOOL], tool_choice="none",
                                         stop=[words[2]], max_tokens=40, temperature=0)
    assert cut.choices[0].finish_reason == "stop" and words[2] not in cut.choices[0].message.content


def test_parallel_tool_calls_on_qwen(qwen):
    client = qwen.client(max_retries=0, timeout=300)
    completion = client.chat.completions.create(
        model=QWEN_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris and in Rome? Use celsius."}],
        tools=[WEATHER_TOOL], tool_choice="required", max_tokens=120, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    cities = [json.loads(c.function.arguments)["city"] for c in choice.message.tool_calls]
    assert len(cities) >= 1
    assert len({c.id for c in choice.message.tool_calls}) == len(cities)
    for call in choice.message.tool_calls:
        check_weather_call(call)


def test_responses_api_text_format_parses(smollm2):
    client = smollm2.client(max_retries=0, timeout=120)
    response = client.responses.parse(
        model=MODEL_ID,
        input="Review: the museum was wonderful.",
        text_format=Review,
        max_output_tokens=120,
    )
    assert isinstance(response.output_parsed, Review)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL_ID, input="Hi", max_output_tokens=5,
                                text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "strung"}}})
    assert e.value.body["param"] == "text.format"


def responses_tool(chat_tool):
    """A chat completions tool in the Responses API's flat shape."""
    return {"type": "function", **chat_tool["function"]}


@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_round_trip(target, stream):
    """`responses.create` with tools on a local model: the same grammar and parser as chat
    completions (same prompt, same call at temperature 0), a `function_call` item, then its
    output in the next request's input and a text answer."""
    client, model = target
    question = weather_question()
    tools = [responses_tool(WEATHER_TOOL), responses_tool(TIME_TOOL)]
    kwargs = dict(model=model, input=question, tools=tools, tool_choice="required", max_output_tokens=80,
                  parallel_tool_calls=False, temperature=0)
    if stream:
        events = list(client.responses.create(stream=True, **kwargs))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        (added,) = [e for e in events if e.type == "response.output_item.added"]
        assert added.item.type == "function_call" and added.item.name == "get_weather"
        assert added.item.arguments == "" and added.item.call_id.startswith("call")
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert len(deltas) >= 2 and "".join(deltas) == done.arguments
        assert events[-1].type == "response.completed"
        response = events[-1].response
    else:
        response = client.responses.create(**kwargs)
    assert response.status == "completed"
    (call,) = response.output
    assert call.type == "function_call" and call.status == "completed"
    arguments = check_weather_call(openai.types.chat.ChatCompletionMessageToolCall(
        id=call.call_id, type="function", function={"name": call.name, "arguments": call.arguments}))
    chat = client.chat.completions.create(model=model, messages=question, tools=[WEATHER_TOOL, TIME_TOOL],
                                          tool_choice="required", max_tokens=80, parallel_tool_calls=False,
                                          temperature=0)
    assert json.loads(chat.choices[0].message.tool_calls[0].function.arguments) == arguments
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    # The call and its output go back as input items; the model answers in text.
    final = client.responses.create(
        model=model, tools=tools, tool_choice="none", max_output_tokens=60, temperature=0,
        input=question + [o.model_dump(exclude_none=True) for o in response.output] + [
            {"type": "function_call_output", "call_id": call.call_id,
             "output": json.dumps({"temperature": 21, "sky": "sunny"})}],
    )
    assert [o.type for o in final.output] == ["message"]
    assert final.output_text and "<tool_call>" not in final.output_text
    if "qwen" in model.lower():
        assert "21" in final.output_text, final.output_text


def test_responses_tool_choice_and_refusals_on_qwen(qwen):
    client = qwen.client(max_retries=0, timeout=300)
    tools = [responses_tool(WEATHER_TOOL), responses_tool(TIME_TOOL)]
    question = [{"role": "user", "content": "What time is it in Tokyo?"}]
    named = client.responses.create(model=QWEN_ID, input=question, tools=tools, max_output_tokens=80,
                                    tool_choice={"type": "function", "name": "get_weather"})
    assert [o.name for o in named.output if o.type == "function_call"] == ["get_weather"]
    auto = client.responses.create(model=QWEN_ID, input=question, tools=tools, max_output_tokens=80, temperature=0)
    assert [o.name for o in auto.output if o.type == "function_call"] == ["get_time"]
    none = client.responses.create(model=QWEN_ID, input=question, tools=tools, tool_choice="none",
                                   max_output_tokens=20, temperature=0)
    assert [o.type for o in none.output] == ["message"]


def test_anthropic_tool_use_round_trip_on_qwen(qwen):
    anthropic = pytest.importorskip("anthropic")
    claude = anthropic.Anthropic(base_url=qwen.url, api_key="unused", max_retries=0, timeout=300)
    tools = [{"name": "get_weather", "description": "Get the current weather in a city",
              "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    messages = [{"role": "user", "content": "What is the weather in Paris? Use celsius."}]
    message = claude.messages.create(model=QWEN_ID, max_tokens=80, messages=messages, tools=tools,
                                     tool_choice={"type": "any"}, extra_body={"temperature": 0})
    assert message.stop_reason == "tool_use"
    use = [b for b in message.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and use.input["unit"] in ("celsius", "fahrenheit")
    # Streamed: the SDK assembles the tool_use block from input_json deltas.
    with claude.messages.stream(model=QWEN_ID, max_tokens=80, messages=messages, tools=tools,
                                tool_choice={"type": "any"}, extra_body={"temperature": 0}) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [use.input]
    # The result goes back as a tool_result block; the answer is text.
    messages += [
        {"role": "assistant", "content": [b.model_dump() for b in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 degrees, sunny"}]},
    ]
    final = claude.messages.create(model=QWEN_ID, max_tokens=60, messages=messages, tools=tools,
                                   tool_choice={"type": "none"}, extra_body={"temperature": 0})
    assert final.stop_reason in ("end_turn", "max_tokens")
    text = "".join(b.text for b in final.content if b.type == "text")
    assert "21" in text, text


class WeatherReport(BaseModel):
    city: str = Field(max_length=30)
    temperature_c: int = Field(ge=-60, le=60)
    sky: Literal["sunny", "cloudy", "rainy", "snowy"]


class GetWeather(BaseModel):
    """Get the current weather in a city"""
    city: str = Field(max_length=30)
    unit: Literal["celsius", "fahrenheit"]


def report_format():
    return {"type": "json_schema", "json_schema": {"name": "WeatherReport", "strict": True,
                                                   "schema": openai.pydantic_function_tool(WeatherReport)["function"]["parameters"]}}


def sunny_result(call_id):
    return {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}


def test_json_schema_with_strict_tools_round_trip(target):
    """`chat.completions.parse` with a response format and a strict pydantic tool, as OpenAI
    serves it: under `required` the answer is the call only; after its result, under `none`,
    the final answer is JSON the format accepts. (Under `auto` these small models tend to call
    again; the test of `auto` below checks that every answer is one or the other.)"""
    client, model = target
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    assert tool["function"]["strict"] is True
    kwargs = dict(model=model, tools=[tool], response_format=WeatherReport, max_tokens=120, temperature=0,
                  parallel_tool_calls=False)
    first = client.chat.completions.parse(messages=weather_question(), tool_choice="required", **kwargs)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    (call,) = choice.message.tool_calls
    assert isinstance(call.function.parsed_arguments, GetWeather)
    messages = weather_question() + [choice.message.model_dump(exclude_none=True), sunny_result(call.id)]
    final = client.chat.completions.parse(messages=messages, tool_choice="none", **kwargs).choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls, final
    assert isinstance(final.message.parsed, WeatherReport), final.message.content
    if "qwen" in model.lower():
        # Qwen reads the tool's answer into the report.
        assert final.message.parsed.temperature_c == 21, final.message.parsed


def assemble_stream(chunks):
    """Each choice's content and calls (name, arguments) from streamed chat chunks."""
    out = {}
    for chunk in chunks:
        for c in chunk.choices:
            content, calls, finish = out.setdefault(c.index, ["", {}, None])
            out[c.index][0] = content + (c.delta.content or "")
            for d in c.delta.tool_calls or []:
                name, arguments = calls.get(d.index, ("", ""))
                calls[d.index] = (name + (d.function.name or ""), arguments + (d.function.arguments or ""))
            out[c.index][2] = c.finish_reason or finish
    return {i: (content, list(calls.values()), finish) for i, (content, calls, finish) in out.items()}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_with_tools_under_auto_calls_or_answers_in_the_schema(target, stream):
    """Sampled freely, every answer is a valid call of a given tool or JSON that validates
    against the response format: the one grammar is the alternation of both."""
    client, model = target
    kwargs = dict(model=model, tools=[WEATHER_TOOL, TIME_TOOL], response_format=report_format(), max_tokens=150,
                  temperature=1.0, seed=11, n=2, parallel_tool_calls=False)
    answers = {}
    for question in (weather_question(), [{"role": "user", "content": "Write a weather report for Rome."}]):
        if stream:
            got = assemble_stream(client.chat.completions.create(messages=question, stream=True, **kwargs))
        else:
            completion = client.chat.completions.create(messages=question, **kwargs)
            got = {c.index: (c.message.content or "",
                             [(t.function.name, t.function.arguments) for t in c.message.tool_calls or []],
                             c.finish_reason) for c in completion.choices}
        assert sorted(got) == [0, 1]
        for content, calls, finish in got.values():
            if calls:
                assert finish == "tool_calls" and content == "", (content, calls)
                for name, arguments in calls:
                    assert name in ("get_weather", "get_time"), calls
                    assert json.loads(arguments)["city"], calls
                answers["call"] = answers.get("call", 0) + 1
            else:
                assert finish == "stop", (content, finish)
                WeatherReport.model_validate_json(content)
                answers["json"] = answers.get("json", 0) + 1
    assert sum(answers.values()) == 4, answers


def test_json_schema_with_tool_choice_none_is_the_format_only(smollm2):
    client = smollm2.client(max_retries=0, timeout=120)
    completion = client.chat.completions.create(
        model=MODEL_ID, messages=weather_question(), tools=[WEATHER_TOOL], tool_choice="none",
        response_format=report_format(), max_tokens=120, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    WeatherReport.model_validate_json(choice.message.content)


@pytest.mark.parametrize("stream", [False, True])
def test_responses_text_format_with_tools(target, stream):
    """The Responses API's `text.format` beside tools: `function_call` items under `required`,
    then, after the call's output, under `none`, a message that validates against the format;
    under `auto` an output item of either kind."""
    client, model = target
    tools = [responses_tool(WEATHER_TOOL)]
    text = {"format": {"type": "json_schema", "name": "WeatherReport", "strict": True,
                       "schema": report_format()["json_schema"]["schema"]}}
    kwargs = dict(model=model, tools=tools, text=text, max_output_tokens=120, temperature=0,
                  parallel_tool_calls=False)
    first = client.responses.create(input=weather_question(), tool_choice="required", **kwargs)
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    follow_up = weather_question() + [call.model_dump(exclude_none=True), {
        "type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature": 21, "sky": "sunny"})}]
    if stream:
        events = list(client.responses.create(input=follow_up, stream=True, tool_choice="none", **kwargs))
        assert events[-1].type == "response.completed"
        final = events[-1].response
        streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert streamed == final.output_text
    else:
        final = client.responses.create(input=follow_up, tool_choice="none", **kwargs)
    assert [o.type for o in final.output] == ["message"], final.output
    WeatherReport.model_validate_json(final.output_text)
    auto = client.responses.create(input=weather_question(), **kwargs)
    kinds = [o.type for o in auto.output]
    assert kinds in (["message"], ["function_call"]), auto.output
    if kinds == ["message"]:
        WeatherReport.model_validate_json(auto.output_text)
    else:
        check_weather_call(openai.types.chat.ChatCompletionMessageToolCall(
            id=auto.output[0].call_id, type="function",
            function={"name": auto.output[0].name, "arguments": auto.output[0].arguments}))
