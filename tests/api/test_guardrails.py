"""Privacy guardrails, black box: a tenant's (or project's, or preset's) policy redacts values
before a mocked upstream sees them and restores them in the answer, streamed or not, or
blocks the request naming only the kinds found."""
import json

import anthropic
import httpx
import openai
import pytest

from conftest import MODEL_ID, Server, admin_request, member_key
from mock_upstream import MockUpstream

ADMIN = "admin-guardrails-0123456789abcdef"
EMAIL = "alice.smith@example.com"
CARD = "4111 1111 1111 1111"
IP = "203.0.113.7"

CONFIG = f"""
[providers.mock]
kind = "openai"
base_url = "{{url}}"
api_key_env = "MOCK_KEY"

[[aliases]]
name = "remote"
targets = [{{ provider = "mock", model = "upstream-model" }}]

[[guardrails]]
name = "redact-all"
action = "redact"

[[guardrails]]
name = "no-cards"
action = "redact"
kinds = {{ card = "block", ip = "allow" }}

[[guardrails]]
name = "no-ips"
action = "allow"
kinds = {{ ip = "block" }}

[[guardrails]]
name = "screen-answers"
action = "redact"
apply_to_responses = true

[[presets]]
name = "ops-assistant"
base = "remote"
system_prompt = "You help operators."
guardrail_policy = "no-ips"
"""


@pytest.fixture(scope="module")
def mock():
    m = MockUpstream()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def ferry(mock, tmp_path_factory):
    config = tmp_path_factory.mktemp("guard") / "ferry.toml"
    config.write_text(CONFIG.replace("{url}", mock.url))
    s = Server("--config", str(config), env={"FERRY_ADMIN_KEY": ADMIN, "MOCK_KEY": "sk-mock-secret-123456"})
    yield s
    s.stop()


def admin(server, method, path, body=None):
    r = admin_request(server, ADMIN, method, path, body)
    assert r.status_code < 300, r.text
    return r.json()


def key_for(server, policy=None, project_policy=None):
    """A member key of a fresh tenant with `policy`, its project with `project_policy`."""
    secret, key, _ = member_key(server, ADMIN, tenant={"guardrail_policy": policy})
    if project_policy:
        admin(server, "PATCH", f"/admin/v1/projects/{key['project_id']}", {"guardrail_policy": project_policy})
    return secret


def sent_text(mock):
    """Everything the upstream received in its last request."""
    return json.dumps(mock.requests[-1][1])


def test_redaction_round_trip_plain(ferry, mock):
    client = openai.OpenAI(base_url=ferry.url + "/v1", api_key=key_for(ferry, "redact-all"), max_retries=0)
    mock.script.append(("ok", "I will write to [EMAIL_1] about card [CARD_1] today."))
    answer = client.chat.completions.create(
        model="remote",
        messages=[{"role": "user", "content": f"Email {EMAIL} about my card {CARD}, twice: {EMAIL}"}],
    )
    upstream = sent_text(mock)
    assert EMAIL not in upstream and "4111" not in upstream
    assert "[EMAIL_1]" in upstream and "[CARD_1]" in upstream
    assert upstream.count("[EMAIL_1]") == 2, "the same value gets the same placeholder"
    assert answer.choices[0].message.content == f"I will write to {EMAIL} about card {CARD} today."


def test_placeholder_text_the_user_wrote_comes_back_as_written(ferry, mock):
    client = openai.OpenAI(base_url=ferry.url + "/v1", api_key=key_for(ferry, "redact-all"), max_retries=0)
    mock.script.append(("ok", "Noted: [EMAIL_1] is a literal and [EMAIL_2] is the address."))
    answer = client.chat.completions.create(
        model="remote",
        messages=[{"role": "user", "content": "The token [EMAIL_1] is literal."},
                  {"role": "user", "content": f"The real address is {EMAIL}."}],
    )
    upstream = sent_text(mock)
    assert EMAIL not in upstream
    assert "The token [EMAIL_1] is literal." in upstream and "The real address is [EMAIL_2]." in upstream
    assert answer.choices[0].message.content == f"Noted: [EMAIL_1] is a literal and {EMAIL} is the address."


def test_redaction_round_trip_streaming_text_and_tool_arguments(ferry, mock):
    client = openai.OpenAI(base_url=ferry.url + "/v1", api_key=key_for(ferry, "redact-all"), max_retries=0)
    mock.script.append(("ok", "Sending to [EMAIL_1] now."))
    stream = client.chat.completions.create(
        model="remote", messages=[{"role": "user", "content": f"Mail {EMAIL} please"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert EMAIL not in sent_text(mock)
    assert text.strip() == f"Sending to {EMAIL} now."
    # Tool-call arguments arrive in 5-character pieces: a placeholder is split across them.
    mock.script.append(("tool", "send_mail", {"to": "[EMAIL_1]", "subject": "hi"}))
    stream = client.chat.completions.create(
        model="remote",
        messages=[{"role": "user", "content": f"Mail {EMAIL}"}],
        tools=[{"type": "function", "function": {"name": "send_mail", "parameters": {"type": "object"}}}],
        stream=True,
    )
    args = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in stream
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert json.loads(args) == {"to": EMAIL, "subject": "hi"}


def test_redaction_through_the_anthropic_dialect(ferry, mock):
    claude = anthropic.Anthropic(base_url=ferry.url, api_key=key_for(ferry, "redact-all"), max_retries=0)
    mock.script.append(("ok", "Noted [EMAIL_1]."))
    message = claude.messages.create(
        model="remote", max_tokens=50, messages=[{"role": "user", "content": f"My address is {EMAIL}"}]
    )
    assert EMAIL not in sent_text(mock)
    assert message.content[0].text == f"Noted {EMAIL}."


def test_block_names_kinds_never_values(ferry, mock):
    client = openai.OpenAI(base_url=ferry.url + "/v1", api_key=key_for(ferry, "no-cards"), max_retries=0)
    before = len(mock.requests)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="remote", messages=[{"role": "user", "content": f"Charge {CARD}"}])
    error = e.value.body
    assert error["code"] == "pii_blocked"
    assert "card" in error["message"] and "4111" not in error["message"]
    assert len(mock.requests) == before, "a blocked request never reaches the upstream"
    # The same policy allows IPs and redacts emails.
    mock.script.append(("ok", "ok"))
    client.chat.completions.create(model="remote", messages=[{"role": "user", "content": f"{IP} {EMAIL}"}])
    assert IP in sent_text(mock) and EMAIL not in sent_text(mock)


def test_project_policy_overrides_the_tenant_and_a_preset_tightens_it(ferry, mock):
    client = openai.OpenAI(
        base_url=ferry.url + "/v1", api_key=key_for(ferry, "redact-all", project_policy="no-cards"), max_retries=0
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="remote", messages=[{"role": "user", "content": f"card {CARD}"}])
    # The preset's policy blocks IPs, which the project's allows.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="ops-assistant", messages=[{"role": "user", "content": f"ping {IP}"}])
    assert e.value.body["code"] == "pii_blocked" and "ip" in e.value.body["message"]


def test_local_models_honour_block(ferry):
    client = openai.OpenAI(base_url=ferry.url + "/v1", api_key=key_for(ferry, "no-cards"), max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": f"card {CARD}"}])
    assert e.value.body["code"] == "pii_blocked"
    ok = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_unknown_policies_are_refused(ferry):
    r = httpx.post(
        ferry.url + "/admin/v1/tenants",
        json={"name": "typo", "guardrail_policy": "strictest"},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r.status_code == 400
    assert "strictest" in r.json()["error"]["message"] and "redact-all" in r.json()["error"]["message"]


def test_a_preset_naming_an_undefined_policy_stops_startup(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[presets]]\nname = "p"\nbase = "x"\nguardrail_policy = "nowhere"\n')
    with pytest.raises(RuntimeError) as e:
        Server("--config", str(config))
    assert "nowhere" in str(e.value)


@pytest.mark.parametrize("stream", [False, True])
def test_answers_are_screened_when_the_policy_says_so(ferry, mock, stream):
    client = openai.OpenAI(base_url=ferry.url + "/v1", api_key=key_for(ferry, "screen-answers"), max_retries=0)
    mock.script.append(("ok", "Ask bob.jones@example.org or write to [EMAIL_1] again."))
    request = {"model": "remote", "messages": [{"role": "user", "content": f"I am {EMAIL}"}]}
    if stream:
        chunks = client.chat.completions.create(**request, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(**request).choices[0].message.content
    assert "bob.jones@example.org" not in text, "what the model wrote is redacted"
    assert EMAIL in text, "the client's own value is restored"
    assert "[EMAIL_2]" in text
