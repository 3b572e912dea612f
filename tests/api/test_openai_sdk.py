"""The official openai SDK against the running binary."""
import concurrent.futures
import math

import httpx
import openai
import pytest

from conftest import MODEL_ID, Server

# With its default system prompt SmolLM2 answers this one in French (llama.cpp agrees);
# with a plain system prompt it says Paris.
HELLO = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_models(client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert MODEL_ID in ids
    model = client.models.retrieve(MODEL_ID)
    assert model.id == MODEL_ID
    assert model.owned_by == "ferry"
    assert model.model_extra["architecture"] == "llama"
    assert model.model_extra["quantization"] == "Q4_1"
    # Provenance: the file's sha256 (hashed in the background just after start).
    import time

    for _ in range(100):
        model = client.models.retrieve(MODEL_ID)
        if model.model_extra["sha256"]:
            break
        time.sleep(0.1)
    assert model.model_extra["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert model.model_extra["parameters"] > 100_000_000 and model.model_extra["n_layer"] == 30


def test_chat_plain(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=32)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens > 5
    # The details OpenAI always sends, which clients read without checking for None.
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


def test_chat_streaming_equals_plain(client):
    plain = client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=32)
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles, fingerprints = "", None, None, [], set()
    for chunk in stream:
        fingerprints.add(chunk.system_fingerprint)
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert roles == ["assistant"]
    assert text == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage.prompt_tokens_details == plain.usage.prompt_tokens_details
    assert usage.completion_tokens_details == plain.usage.completion_tokens_details
    # Every chunk names the build, as the plain answer does.
    assert fingerprints == {plain.system_fingerprint} and plain.system_fingerprint.startswith("ferry-")


def test_completions(client):
    r = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    chunks = list(client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))
    assert {c.system_fingerprint for c in chunks} == {r.system_fingerprint} and r.system_fingerprint
    assert len(r.choices[0].text) > 0
    assert r.usage.completion_tokens <= 8
    batch = client.completions.create(model=MODEL_ID, prompt=["One, two,", "Red, green,"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_ID, messages=HELLO, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-5)
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_logprobs_end_where_a_stop_sequence_ends_the_answer(client):
    """Tokens that only spell the stop sequence are not part of the answer, so their logprobs
    are not either (chat, streamed chat and completions), as with OpenAI."""
    ask = [{"role": "user", "content": "Count from 1 to 10 separated by commas."}]
    free = client.chat.completions.create(model=MODEL_ID, messages=ask, temperature=0, max_tokens=16, logprobs=True)
    tokens = [e.token for e in free.choices[0].logprobs.content]
    # A stop made of two whole tokens that first occur at token k.
    k = next(k for k in range(2, len(tokens) - 2)
             if "".join(tokens[:k + 2]).find(tokens[k] + tokens[k + 1]) == len("".join(tokens[:k])))
    stop = tokens[k] + tokens[k + 1]
    r = client.chat.completions.create(model=MODEL_ID, messages=ask, temperature=0, max_tokens=16, logprobs=True,
                                       stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "".join(tokens[:k])
    assert [e.token for e in r.choices[0].logprobs.content] == tokens[:k]
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=ask, temperature=0, max_tokens=16,
                                                 logprobs=True, stop=[stop], stream=True))
    streamed = [e.token for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content or []]
    assert streamed == tokens[:k]
    prompt = "1, 2, 3,"
    free = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, logprobs=1)
    tokens = free.choices[0].logprobs.tokens
    stop = tokens[2] + tokens[3]
    if "".join(tokens).find(stop) == len("".join(tokens[:2])):
        r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, logprobs=1,
                                      stop=[stop])
        assert r.choices[0].text == "".join(tokens[:2])
        assert r.choices[0].logprobs.tokens == tokens[:2]


def test_completion_logprobs_and_echo(client):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.text_offset == sorted(lp.text_offset)
    # The two likeliest, and the chosen token where it was not one of them (OpenAI: up to
    # logprobs + 1 entries); echoed prompt tokens are rarely the model's own top choice.
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert math.isclose(top[token], logprob, abs_tol=1e-5), (token, top)
    assert any(len(t) == 3 for t in lp.top_logprobs[1:]), "some prompt token is outside the top two"
    # Alternatives most likely first, as OpenAI orders them (clients take the first key as the top).
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=4, temperature=0, logprobs=5)
    for token, top in zip(r.choices[0].logprobs.tokens, r.choices[0].logprobs.top_logprobs):
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert next(iter(top)) == token, "greedy: the chosen token is the likeliest"


def test_n_choices(client):
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a story."}],
        n=2, max_tokens=16, temperature=1.0, seed=3, logprobs=True,
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_same_seed_same_text(client):
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Write a haiku."}], max_tokens=24, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_errors_map_to_sdk_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "word " * 3000}])
    assert e.value.code == "context_length_exceeded"
    assert "1024" in e.value.message


def test_sixteen_concurrent_streams(client):
    def one(i):
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=20, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        deltas, usage, finish = 0, None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                finish = c.finish_reason or finish
                if c.delta.content:
                    deltas += 1
        return usage, finish, deltas

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for usage, finish, deltas in results:
        assert finish == "length"
        assert usage.completion_tokens == 20
        assert usage.total_tokens == usage.prompt_tokens + 20
        assert 0 < deltas <= 20


def test_disconnect_frees_the_slot(small_server):
    client = small_server.client(max_retries=0, timeout=60)
    # A stream that would run for minutes (ignore_eos, thousands of tokens) on the only sequence.
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=HELLO, max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # The next request gets the sequence at once instead of waiting minutes for the first.
    quick = small_server.client(max_retries=0, timeout=20)
    r = quick.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4


def test_full_queue_answers_429(small_server):
    url = small_server.url
    body = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=60) as a, httpx.Client(base_url=url, timeout=60) as b:
        with a.stream("POST", "/v1/chat/completions", json=body) as running:
            assert running.status_code == 200
            # Past the role chunk, two content chunks: the request holds the only sequence.
            lines = (l for l in running.iter_lines() if l.startswith("data: "))
            for _ in range(3):
                next(lines)
            with b.stream("POST", "/v1/chat/completions", json=body) as queued:
                assert queued.status_code == 200  # headers go out; it waits in the queue
                r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
                assert r.status_code == 429
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
                client = small_server.client(max_retries=0)
                with pytest.raises(openai.RateLimitError):
                    client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=2)
    # More prompts than the queue holds could never be admitted: a 400, not a 429 to retry.
    r = httpx.post(url + "/v1/completions", json={"model": MODEL_ID, "prompt": ["a", "b"], "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "--max-queue" in r.text, r.text


def test_a_shared_prompt_prefix_is_served_from_the_cache():
    """The prefix cache (--prefix-cache): a request that starts like an earlier one reports the
    reused part as `usage.prompt_tokens_details.cached_tokens` (streamed usage too)."""
    server = Server("--parallel", "2", "--ctx-size", "1024", "--prefix-cache")
    try:
        check_prefix_cache(server.client(max_retries=0, timeout=120))
    finally:
        server.stop()


def check_prefix_cache(client):
    system = {"role": "system", "content": "You are Ferry's test assistant. Answer in one short sentence. " * 4}
    first_turn = [system, {"role": "user", "content": "What colour is the sky on a clear day?"}]
    first = client.chat.completions.create(model=MODEL_ID, messages=first_turn, max_tokens=12, temperature=0)
    again = client.chat.completions.create(model=MODEL_ID, messages=first_turn, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    # The next turn of the same chat, streamed: the system prompt and first turn are reused.
    second_turn = first_turn + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And at night?"},
    ]
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=second_turn, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_a_cache_salt_shares_cached_prompts_only_with_the_same_salt():
    """vLLM's `cache_salt`: users behind one key keep their cached prompts apart."""
    server = Server("--parallel", "3", "--ctx-size", "1024", "--prefix-cache")
    try:
        client = server.client(max_retries=0, timeout=120)
        ask = [{"role": "user", "content": "Write one sentence about the sea and the wind."}]

        def cached(**salt):
            r = client.chat.completions.create(model=MODEL_ID, messages=ask, max_tokens=2, temperature=0,
                                               extra_body=salt)
            return r.usage.prompt_tokens_details.cached_tokens

        assert cached(cache_salt="alice") == 0
        assert cached(cache_salt="bob") == 0, "another salt does not reuse alice's prompt"
        assert cached() == 0, "nor does a request without a salt"
        assert cached(cache_salt="alice") > 0
        legacy = client.completions.create(model=MODEL_ID, prompt="The sea and the wind", max_tokens=2,
                                           temperature=0, extra_body={"cache_salt": "carol"})
        again = client.completions.create(model=MODEL_ID, prompt="The sea and the wind", max_tokens=2,
                                          temperature=0, extra_body={"cache_salt": "carol"})
        assert legacy.usage.prompt_tokens_details.cached_tokens == 0
        assert again.usage.prompt_tokens_details.cached_tokens > 0
        with pytest.raises(openai.BadRequestError) as e:
            cached(cache_salt="")
        assert e.value.param == "cache_salt"
    finally:
        server.stop()
