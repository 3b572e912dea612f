"""The openai SDK's Responses API (`responses.create`) against the local engine."""
import openai
import pytest

from conftest import MODEL_ID


def test_responses_plain_matches_chat(client):
    r = client.responses.create(model=MODEL_ID, instructions="You are terse.", input="What is the capital of France?",
                                temperature=0, max_output_tokens=24)
    assert r.object == "response"
    assert r.id.startswith("resp_") and r.output[0].id.startswith("msg_"), "OpenAI's spelling"
    assert r.status in ("completed", "incomplete")
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    chat = client.chat.completions.create(
        model=MODEL_ID, temperature=0, max_tokens=24,
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}],
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_responses_items_and_incomplete(client):
    r = client.responses.create(
        model=MODEL_ID, temperature=0, max_output_tokens=3,
        input=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "Tell me a long story."}]},
        ],
    )
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3


def test_responses_streaming(client):
    kwargs = dict(model=MODEL_ID, input="Name three colours.", temperature=0, max_output_tokens=16)
    plain = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text
    assert events[-1].response.output_text == plain.output_text
    assert events[-1].response.usage.output_tokens == plain.usage.output_tokens


def test_responses_refuses_what_it_cannot_do(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL_ID, input="hi", previous_response_id="resp_123")
    assert e.value.param == "previous_response_id"
    # Stored conversations, background runs, stored prompts and log probabilities are named,
    # never silently dropped.
    refused = [({"conversation": "conv_1"}, "conversation"), ({"background": True}, "background"),
               ({"prompt": {"id": "pmpt_1"}}, "prompt"), ({"top_logprobs": 2}, "top_logprobs"),
               ({"include": ["message.output_text.logprobs"]}, "include")]
    for extra, param in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL_ID, input="hi", max_output_tokens=16, **extra)
        assert e.value.param == param, (extra, e.value.param)
    # The local models read text only: an image part is named, never dropped.
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL_ID, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "auto"}]}])
    assert e.value.param == "input[0].content[1]"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL_ID, input="hi", tools=[{"type": "file_search", "vector_store_ids": ["v"]}])
    assert e.value.param == "tools[0].type"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    # Nothing is stored: retrieving or deleting a response is a 404 that says so.
    for call in (client.responses.retrieve, client.responses.delete, client.responses.input_items.list):
        with pytest.raises(openai.NotFoundError) as e:
            call("resp_123")
        assert "stateless" in e.value.message and "resp_123" in e.value.message


def test_input_tokens_counts_the_prompt_a_response_runs(client):
    kwargs = dict(model=MODEL_ID, instructions="You are terse.", input="What is the capital of France?")
    counted = client.responses.input_tokens.count(**kwargs)
    assert counted.object == "response.input_tokens"
    ran = client.responses.create(temperature=0, max_output_tokens=4, **kwargs)
    assert counted.input_tokens == ran.usage.input_tokens > 0
    # Tools are part of the prompt, as they are when the response runs.
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    with_tool = client.responses.input_tokens.count(tools=[tool], **kwargs)
    ran_with_tool = client.responses.create(temperature=0, max_output_tokens=4, tools=[tool], **kwargs)
    assert with_tool.input_tokens == ran_with_tool.usage.input_tokens > counted.input_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.input_tokens.count(model="no-such-model", input="hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.input_tokens.count(model=MODEL_ID, input="hi", previous_response_id="resp_1")
    assert e.value.param == "previous_response_id"
