"""Keys, roles, rate limits, budgets, usage metering, crash safety and the audit log,
black box: the release binary with an admin key, the official SDKs, and the CLI."""
import concurrent.futures
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import threading
import time

import anthropic
import httpx
import openai
import pytest

from conftest import BINARY, MODEL_ID, Server, admin_request

ADMIN = "admin-test-key-0123456789abcdef"
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


@pytest.fixture(scope="module")
def keyed():
    s = Server("--parallel", "16", "--ctx-size", "1024", env={"FERRY_ADMIN_KEY": ADMIN})
    yield s
    s.stop()


def admin(server, method, path, json=None, key=ADMIN):
    return admin_request(server, key, method, path, json)


def make_key(server, tenant_name, role="member", limits=None, project_limits=None, tenant_limits=None, **extra):
    """A tenant (made if new), a project in it and a key; returns (key secret, key record, tenant id)."""
    tenants = admin(server, "GET", "/admin/v1/tenants").json()["data"]
    tenant = next((t for t in tenants if t["name"] == tenant_name), None)
    if tenant is None:
        tenant = admin(server, "POST", "/admin/v1/tenants", {"name": tenant_name, "limits": tenant_limits or {}}).json()
    project = admin(
        server,
        "POST",
        "/admin/v1/projects",
        {"tenant_id": tenant["id"], "name": f"p{time.monotonic_ns()}", "limits": project_limits or {}},
    ).json()
    body = {"name": "test", "role": role, "limits": limits or {}, **extra}
    if role == "member":
        body["project_id"] = project["id"]
    else:
        body["tenant_id"] = tenant["id"]
    r = admin(server, "POST", "/admin/v1/keys", body)
    assert r.status_code == 201, r.text
    created = r.json()
    return created["key"], created, tenant["id"]


def chat(server, key, **overrides):
    return httpx.post(
        server.url + "/v1/chat/completions",
        json={**CHAT, **overrides},
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def test_every_v1_route_needs_a_valid_key(keyed):
    r = httpx.post(keyed.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-ferry-" + "0" * 64, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(**CHAT)
    assert "sk-fer****0000" in str(e.value), "the wrong key is shown masked"
    # Health checks stay open for load balancers.
    assert httpx.get(keyed.url + "/health").status_code == 200


def test_member_key_works_with_both_sdks_and_not_on_admin_routes(keyed):
    secret, key, _ = make_key(keyed, "sdk-tenant")
    assert secret.startswith("sk-ferry-") and len(secret) == len("sk-ferry-") + 64
    assert "key" not in admin(keyed, "GET", f"/admin/v1/keys/{key['id']}").json(), "secrets are shown once"
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=secret, max_retries=0)
    answer = client.chat.completions.create(**CHAT)
    assert answer.usage.completion_tokens > 0
    claude = anthropic.Anthropic(base_url=keyed.url, api_key=secret, max_retries=0)
    message = claude.messages.create(model=MODEL_ID, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert message.usage.output_tokens > 0
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    # The card without the server's file path (the operator's), with its provenance.
    card = client.models.retrieve(MODEL_ID).model_extra
    assert "file" not in card and "last_error" not in card and card["architecture"] == "llama"
    assert "file" in admin(keyed, "GET", f"/v1/models/{MODEL_ID}").json(), "the admin sees it"
    r = admin(keyed, "GET", "/admin/v1/tenants", key=secret)
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"


def test_revoked_and_expired_keys_are_refused(keyed):
    secret, key, _ = make_key(keyed, "revoke-tenant")
    assert chat(keyed, secret).status_code == 200
    assert admin(keyed, "POST", f"/admin/v1/keys/{key['id']}/revoke").status_code == 200
    r = chat(keyed, secret)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    expiring, _, _ = make_key(keyed, "revoke-tenant", expires_at=int(time.time() * 1000) + 1500)
    time.sleep(2)
    r = chat(keyed, expiring)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    # A key can't be made expired.
    r = admin(keyed, "POST", "/admin/v1/keys", {"name": "x", "role": "admin", "expires_at": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "expires_at"


def test_the_last_admin_key_is_not_revoked_and_auth_stays_on(tmp_path):
    """Revoking every admin key used to turn authentication off: the server fell back to the
    keyless single-user mode, open to anyone. The last usable admin key now can't be revoked,
    and a server that had keys never goes back to having none."""
    server = Server(model=False, env={"FERRY_ADMIN_KEY": ADMIN})
    try:
        bootstrap = admin(server, "GET", "/admin/v1/whoami").json()["key"]["id"]
        r = admin(server, "POST", f"/admin/v1/keys/{bootstrap}/revoke")
        assert r.status_code == 409, r.text
        assert "last admin key" in r.json()["error"]["message"]
        # With a second admin key the first can go, and the second is then the last.
        second = admin(server, "POST", "/admin/v1/keys", {"name": "second", "role": "admin"}).json()
        assert admin(server, "POST", f"/admin/v1/keys/{bootstrap}/revoke").status_code == 200
        assert admin(server, "POST", f"/admin/v1/keys/{second['id']}/revoke", key=second["key"]).status_code == 409
        for path in ("/v1/models", "/admin/v1/whoami"):
            r = httpx.get(server.url + path)
            assert r.status_code == 401, (path, r.status_code)
        assert admin(server, "GET", "/admin/v1/whoami", key=ADMIN).status_code == 401
    finally:
        server.stop()


def test_a_keyless_server_makes_an_admin_key_before_any_other(tmp_path):
    """The first key turns authentication on for good: a member key made first would lock the
    local user out of the admin API."""
    server = Server(model=False)
    try:
        tenant = httpx.post(server.url + "/admin/v1/tenants", json={"name": "t"}).json()
        project = httpx.post(server.url + "/admin/v1/projects", json={"tenant_id": tenant["id"], "name": "p"}).json()
        r = httpx.post(server.url + "/admin/v1/keys", json={"name": "m", "role": "member", "project_id": project["id"]})
        assert r.status_code == 409 and "admin key first" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/models").status_code == 200  # still keyless
        r = httpx.post(server.url + "/admin/v1/keys", json={"name": "a", "role": "admin"})
        assert r.status_code == 201
        assert httpx.get(server.url + "/v1/models").status_code == 401
    finally:
        server.stop()


def test_a_budget_spent_on_one_replica_is_seen_by_another():
    """Budgets were read from the records once per process, then counted locally: with N
    replicas a daily budget could be spent N times. Each replica now reads them again every
    5 seconds."""
    a = Server("--parallel", "2", "--ctx-size", "512", env={"FERRY_ADMIN_KEY": ADMIN, "FERRY_INSTANCE": "a"})
    b = None
    try:
        b = Server("--parallel", "2", "--ctx-size", "512", data_dir=a.data_dir,
                   env={"FERRY_ADMIN_KEY": ADMIN, "FERRY_INSTANCE": "b"})
        secret, _, _ = make_key(a, "shared-budget", limits={"tokens_per_day": 120})
        assert chat(b, secret).status_code == 200  # b has read the budget's spending
        while chat(a, secret).status_code == 200:
            pass
        assert chat(a, secret).status_code == 429
        time.sleep(6)
        r = chat(b, secret)
        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota", r.text
    finally:
        if b:
            b.stop()
        a.stop()


def test_a_revocation_reaches_another_replica_within_the_key_cache_ttl():
    """Two servers on one database: the one that revokes a key refuses it at once, the other
    (which trusts its cached copy of the key for up to 10 seconds) soon after."""
    a = Server("--parallel", "2", "--ctx-size", "512", env={"FERRY_ADMIN_KEY": ADMIN, "FERRY_INSTANCE": "a"})
    b = None
    try:
        b = Server("--parallel", "2", "--ctx-size", "512", data_dir=a.data_dir,
                   env={"FERRY_ADMIN_KEY": ADMIN, "FERRY_INSTANCE": "b"})
        secret, key, _ = make_key(a, "replica-tenant")
        assert chat(b, secret).status_code == 200  # b now holds the key in its cache
        assert admin(a, "POST", f"/admin/v1/keys/{key['id']}/revoke").status_code == 200
        assert chat(a, secret).status_code == 401
        revoked = time.monotonic()
        while True:
            # A request is authenticated when it arrives: what counts is when it was sent (a
            # generation on a loaded machine can take seconds to answer).
            sent = time.monotonic()
            r = chat(b, secret, max_tokens=1)
            if r.status_code != 200:
                break
            assert sent - revoked < 11, "the other replica still takes a revoked key"
            time.sleep(0.5)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    finally:
        if b:
            b.stop()
        a.stop()


def test_keys_limited_to_models(keyed):
    secret, _, _ = make_key(keyed, "models-tenant", models=["some-other-model"])
    r = chat(keyed, secret)
    assert r.status_code == 403
    # OpenAI's answer to a project without access to a model.
    error = r.json()["error"]
    assert MODEL_ID in error["message"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "model_not_found", "model")
    # A badly typed field elsewhere in the body doesn't hide the model from the check.
    assert chat(keyed, secret, max_tokens=-1).status_code == 403
    # The key sees only what it may use.
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=secret, max_retries=0)
    assert client.models.list().data == []
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(MODEL_ID)
    allowed, _, _ = make_key(keyed, "models-tenant", models=[MODEL_ID])
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=allowed, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL_ID]


def test_tenant_admins_see_only_their_tenant(keyed):
    a_admin, _, tenant_a = make_key(keyed, "tenant-a", role="tenant_admin")
    _, b_key, tenant_b = make_key(keyed, "tenant-b")
    # Its own tenant: projects and keys.
    r = admin(keyed, "POST", "/admin/v1/projects", {"tenant_id": tenant_a, "name": "mine"}, key=a_admin)
    assert r.status_code == 201
    r = admin(keyed, "POST", "/admin/v1/keys", {"name": "m", "role": "member", "project_id": r.json()["id"]}, key=a_admin)
    assert r.status_code == 201
    # Another tenant's things don't exist for it.
    assert admin(keyed, "GET", f"/admin/v1/tenants/{tenant_b}", key=a_admin).status_code == 404
    assert admin(keyed, "GET", f"/admin/v1/keys/{b_key['id']}", key=a_admin).status_code == 404
    # Nor does its usage: asking for it is a 404, not its own totals under another name.
    assert admin(keyed, "GET", f"/admin/v1/usage?tenant_id={tenant_b}", key=a_admin).status_code == 404
    assert admin(keyed, "GET", f"/admin/v1/usage?tenant_id={tenant_a}", key=a_admin).status_code == 200
    assert admin(keyed, "POST", f"/admin/v1/keys/{b_key['id']}/revoke", key=a_admin).status_code == 404
    r = admin(keyed, "POST", "/admin/v1/projects", {"tenant_id": tenant_b, "name": "x"}, key=a_admin)
    assert r.status_code == 404
    tenants = admin(keyed, "GET", "/admin/v1/tenants", key=a_admin).json()["data"]
    assert [t["id"] for t in tenants] == [tenant_a]
    assert all(k["tenant_id"] == tenant_a for k in admin(keyed, "GET", "/admin/v1/keys", key=a_admin).json()["data"])
    # No admin keys, no new tenants, no audit log.
    r = admin(keyed, "POST", "/admin/v1/keys", {"name": "x", "role": "admin"}, key=a_admin)
    assert r.status_code == 403
    assert admin(keyed, "POST", "/admin/v1/tenants", {"name": "mine-too"}, key=a_admin).status_code == 403
    assert admin(keyed, "GET", "/admin/v1/audit", key=a_admin).status_code == 403


def test_tenants_never_share_cached_prompts():
    """The prefix cache reuses a prompt's cells only within its tenant: another tenant sending
    the same prompt recomputes it all, so `cached_tokens` (or the first token's time) tells it
    nothing about what others asked."""
    keyed = Server("--parallel", "4", "--ctx-size", "1024", "--prefix-cache", env={"FERRY_ADMIN_KEY": ADMIN})
    try:
        check_cache_isolation(keyed)
    finally:
        keyed.stop()


def check_cache_isolation(keyed):
    a, _, _ = make_key(keyed, "cache-a")
    b, _, _ = make_key(keyed, "cache-b")
    system = f"Run {time.monotonic_ns()}. You answer questions about tide tables for small harbours in one short line."
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "When is high tide?"}]}

    def cached(key):
        r = chat(keyed, key, **body)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        return usage["prompt_tokens"], (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    prompt_tokens, first = cached(a)
    assert prompt_tokens > 30 and first == 0
    assert cached(a)[1] == prompt_tokens - 1, "the tenant's own second request reuses its prompt"
    assert cached(b)[1] == 0, "another tenant's identical prompt is not served from the first one's cells"
    assert cached(b)[1] == prompt_tokens - 1
    assert cached(a)[1] == prompt_tokens - 1, "the other tenant left the first one's cells alone"


def test_admin_api_rejects_bad_input_in_openai_shape(keyed):
    r = admin(keyed, "POST", "/admin/v1/tenants", {"name": "x", "limits": {"rpm": "many"}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = admin(keyed, "POST", "/admin/v1/keys", {"name": "x", "role": "member"})
    assert r.status_code == 400 and "project_id" in r.json()["error"]["message"]
    assert admin(keyed, "GET", "/admin/v1/keys/key_nope").status_code == 404
    admin(keyed, "POST", "/admin/v1/tenants", {"name": "dup"})
    assert admin(keyed, "POST", "/admin/v1/tenants", {"name": "dup"}).status_code == 409
    assert admin(keyed, "GET", "/admin/v1/usage?group_by=planet").status_code == 400
    r = admin(keyed, "GET", "/admin/v1/usage?from=1800000000000&to=1700000000000")
    assert r.status_code == 400 and r.json()["error"]["param"] == "from"


def test_rpm_admits_exactly_n_of_3n_concurrent_requests(keyed):
    n = 5
    secret, _, _ = make_key(keyed, "rpm-tenant", limits={"rpm": n})
    with concurrent.futures.ThreadPoolExecutor(3 * n) as pool:
        responses = list(pool.map(lambda _: chat(keyed, secret, max_tokens=1), range(3 * n)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * n + [429] * (2 * n)
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert refused.headers["x-ratelimit-limit-requests"] == str(n)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(refused.headers["retry-after"]) >= 1
    admitted = [r for r in responses if r.status_code == 200]
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(n))


def test_project_and_tenant_limits_apply_to_all_their_keys(keyed):
    secret, key, _ = make_key(keyed, "shared-tenant", project_limits={"rpm": 2})
    other = admin(keyed, "POST", "/admin/v1/keys", {"name": "second", "role": "member", "project_id": key["project_id"]})
    second = other.json()["key"]
    assert chat(keyed, secret, max_tokens=1).status_code == 200
    assert chat(keyed, second, max_tokens=1).status_code == 200
    r = chat(keyed, secret, max_tokens=1)
    assert r.status_code == 429 and "project" in r.json()["error"]["message"]


def test_tpm_admits_on_the_maximum_and_reconciles_to_real_use(keyed):
    secret, _, _ = make_key(keyed, "tpm-tenant", limits={"tpm": 1000})
    # 600 requested: admitted on prompt + 600; the model stops long before.
    say_ok = {"messages": [{"role": "user", "content": "Say OK."}], "temperature": 0}
    first = chat(keyed, secret, max_tokens=600, **say_ok)
    assert first.status_code == 200
    used = first.json()["usage"]["total_tokens"]
    assert used < 300
    assert int(first.headers["x-ratelimit-remaining-tokens"]) <= 400
    # Without reconciliation 600 + 600 would not fit in 1000; with it, it does.
    second = chat(keyed, secret, max_tokens=600, **say_ok)
    assert second.status_code == 200, second.text
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert remaining <= 1000 - used - 600
    # More than the whole limit can never be admitted: no wait helps, so no Retry-After, and
    # the SDKs are told not to retry (they read x-should-retry before retrying a 429).
    r = chat(keyed, secret, max_tokens=5000)
    assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
    assert "retry-after" not in r.headers and r.headers["x-should-retry"] == "false"
    seen = []
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=secret, max_retries=2,
                           http_client=httpx.Client(event_hooks={"request": [seen.append]}))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    assert len(seen) == 1, "the SDK did not retry"


def test_daily_token_budget(keyed):
    secret, _, _ = make_key(keyed, "budget-tenant", tenant_limits={"tokens_per_day": 120})
    first = chat(keyed, secret, max_tokens=8)
    assert first.status_code == 200
    spent = first.json()["usage"]["total_tokens"]
    assert spent > 30
    statuses = [chat(keyed, secret, max_tokens=8).status_code for _ in range(4)]
    assert 429 in statuses
    r = chat(keyed, secret, max_tokens=8)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "insufficient_quota"
    # No wait within a client's backoff renews a budget: the SDKs are told not to retry.
    assert r.headers["x-should-retry"] == "false"


def test_usage_records_one_row_per_request_and_exports_csv(keyed):
    secret, key, tenant = make_key(keyed, "usage-tenant")
    client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=secret, max_retries=0)
    totals = 0
    for _ in range(3):
        totals += client.chat.completions.create(**CHAT).usage.total_tokens
    stream = client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    totals += chunks[-1].usage.total_tokens
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**{**CHAT, "temperature": -1})
    time.sleep(0.5)  # records are completed just after the response
    rows = admin(keyed, "GET", f"/admin/v1/usage?group_by=key,model&tenant_id={tenant}").json()["data"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["key_id"], row["model"], row["requests"], row["errors"]) == (key["id"], MODEL_ID, 5, 1)
    assert row["prompt_tokens"] + row["completion_tokens"] == totals
    csv = admin(keyed, "GET", f"/admin/v1/usage?group_by=tenant,day&format=csv&tenant_id={tenant}")
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.strip().splitlines()
    assert lines[0] == "tenant_id,day,requests,errors,prompt_tokens,completion_tokens,cached_tokens,cost"
    assert lines[1].startswith(f"{tenant},{time.strftime('%Y-%m-%d', time.gmtime())},5,1,")
    # The CLI reads the same API.
    out = subprocess.run(
        [BINARY, "usage", "--url", keyed.url, "--group-by", "tenant", "--tenant", tenant],
        env={**os.environ, "FERRY_ADMIN_KEY": ADMIN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert tenant in out.stdout and " 5 " in out.stdout


def test_a_response_x_request_id_names_its_usage_record(keyed):
    secret, _, _ = make_key(keyed, "rid-tenant")
    r = chat(keyed, secret)
    rid = r.headers["x-request-id"]
    time.sleep(0.3)
    db = sqlite3.connect(os.path.join(keyed.data_dir, "ferry.db"))
    row = db.execute("SELECT status, completion_tokens FROM usage_records WHERE request_id = ?", (rid,)).fetchone()
    assert row == ("ok", r.json()["usage"]["completion_tokens"])


def test_a_stream_the_client_leaves_is_billed_the_tokens_it_used(keyed):
    """A client that read most of a streamed answer and hung up was billed 0 completion
    tokens (they were counted only when the answer finished): a way around tpm and costs."""
    secret, _, _ = make_key(keyed, "leaver-tenant")
    # ignore_eos: a sampled answer could end before the client leaves (14 tokens in one CI run).
    body = {**CHAT, "max_tokens": 300, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", keyed.url + "/v1/chat/completions", json=body,
                           headers={"Authorization": f"Bearer {secret}"}) as r:
            rid = r.headers["x-request-id"]
            chunks = 0
            for line in r.iter_lines():
                if line.startswith("data:") and '"content":"' in line:
                    chunks += 1
                    if chunks == 25:
                        break
    db = sqlite3.connect(os.path.join(keyed.data_dir, "ferry.db"))
    deadline = time.monotonic() + 10
    row = None
    while time.monotonic() < deadline:
        row = db.execute("SELECT status, completion_tokens FROM usage_records WHERE request_id = ?", (rid,)).fetchone()
        if row:
            break
        time.sleep(0.2)
    assert row is not None and row[0] == "cancelled", row
    assert 24 <= row[1] < 300, row


def test_cli_manages_keys_against_a_running_server(keyed):
    env = {**os.environ, "FERRY_ADMIN_KEY": ADMIN, "FERRY_URL": keyed.url}

    def ferry(*args):
        out = subprocess.run([BINARY, *args], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out

    tenant = httpx.Response(200, text=ferry("tenants", "create", "cli-tenant", "--rpm", "100", "--json").stdout).json()
    assert tenant["limits"] == {"rpm": 100}
    project = ferry("projects", "create", "--tenant", tenant["id"], "web", "--json").stdout
    project_id = httpx.Response(200, text=project).json()["id"]
    # Privacy settings from the CLI: retention on the tenant, a policy (or none) on the project.
    ferry("tenants", "privacy", tenant["id"], "--retain-content", "true", "--retention-days", "3")
    shown = admin_request(keyed, ADMIN, "GET", f"/admin/v1/tenants/{tenant['id']}").json()
    assert shown["retain_content"] is True and shown["retention_days"] == 3
    refused = subprocess.run([BINARY, "projects", "policy", project_id, "--guardrail-policy", "no-such-policy"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "no-such-policy" in refused.stderr, refused.stderr
    ferry("projects", "policy", project_id, "--no-guardrail-policy")
    created = ferry("keys", "create", "--project", project_id, "--name", "cli", "--expires-in-days", "30",
                    "--models", MODEL_ID)
    secret = created.stdout.strip()
    assert secret.startswith("sk-ferry-") and "shown only this once" in created.stderr
    assert chat(keyed, secret).status_code == 200
    listing = ferry("keys", "list", "--tenant", tenant["id"]).stdout
    assert secret[:15] in listing and secret not in listing
    key_id = next(line.split()[0] for line in listing.splitlines() if "cli" in line)
    # Its models and expiry are in the table, the expiry as a date.
    row = next(line for line in listing.splitlines() if "cli" in line)
    assert MODEL_ID in row and re.search(r"\b20\d\d-\d\d-\d\d \d\d:\d\d:\d\d\b", row), row
    ferry("keys", "revoke", key_id)
    assert chat(keyed, secret).status_code == 401


def test_audit_log_verifies_and_detects_tampering():
    s = Server("--parallel", "2", env={"FERRY_ADMIN_KEY": ADMIN})
    try:
        t = admin(s, "POST", "/admin/v1/tenants", {"name": "audited"}).json()
        admin(s, "PATCH", f"/admin/v1/tenants/{t['id']}", {"limits": {"rpm": 7}})
        _, key, _ = make_key(s, "audited")
        admin(s, "POST", f"/admin/v1/keys/{key['id']}/revoke")
        entries = admin(s, "GET", "/admin/v1/audit").json()["data"]
        actions = [e["action"] for e in reversed(entries)]
        # The admin key from FERRY_ADMIN_KEY is audited when it is first stored.
        assert actions[:3] == ["key.import", "tenant.create", "tenant.update"] and actions[-1] == "key.revoke"
        imported = entries[-1]
        assert imported["actor"] == "FERRY_ADMIN_KEY" and imported["after"]["role"] == "admin"
        update = next(e for e in entries if e["action"] == "tenant.update")
        assert update["before"]["limits"] == {} and update["after"]["limits"] == {"rpm": 7}
        assert admin(s, "GET", "/admin/v1/audit/verify").json()["ok"]
    finally:
        s.stop()

    def verify():
        return subprocess.run(
            [BINARY, "audit", "verify", "--data-dir", s.data_dir], capture_output=True, text=True, timeout=60
        )

    ok = verify()
    assert ok.returncode == 0 and "intact" in ok.stdout, ok.stderr
    assert "ferry.db" in ok.stdout, "it names the database it read"
    db = sqlite3.connect(os.path.join(s.data_dir, "ferry.db"))
    db.execute("UPDATE audit_log SET after_state = '{\"limits\":{\"rpm\":7000}}' WHERE seq = 2")
    db.commit()
    edited = verify()
    assert edited.returncode != 0 and "row 2 was changed" in edited.stderr
    db.execute("UPDATE audit_log SET after_state = (SELECT after_state FROM audit_log WHERE seq = 2) WHERE seq = 2")
    db.execute("DELETE FROM audit_log WHERE seq = 3")
    db.commit()
    deleted = verify()
    assert deleted.returncode != 0 and "TAMPERED" in deleted.stderr


def test_kill_9_during_50_streams_leaves_exactly_one_record_per_admitted_request():
    s = Server("--parallel", "50", "--ctx-size", "512", env={"FERRY_ADMIN_KEY": ADMIN})
    seen = []  # request ids of responses that started
    lock = threading.Lock()
    started = threading.Barrier(51, timeout=120)

    def stream(secret):
        try:
            with httpx.stream(
                "POST",
                s.url + "/v1/chat/completions",
                json={**CHAT, "max_tokens": 200, "stream": True, "messages": [{"role": "user", "content": "Count to 100."}]},
                headers={"Authorization": f"Bearer {secret}"},
                timeout=120,
            ) as r:
                with lock:
                    seen.append((r.headers["x-request-id"], r.status_code))
                first = True
                for _ in r.iter_lines():
                    if first:
                        first = False
                        try:
                            started.wait()
                        except threading.BrokenBarrierError:
                            pass
        except (httpx.HTTPError, threading.BrokenBarrierError):
            pass

    try:
        secret, _, _ = make_key(s, "crash-tenant")
        threads = [threading.Thread(target=stream, args=(secret,)) for _ in range(50)]
        for t in threads:
            t.start()
        # Every stream has sent its first chunk: kill the server without warning.
        started.wait()
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait()
        for t in threads:
            t.join(timeout=60)
    finally:
        s.stop()
    assert len(seen) == 50 and all(code == 200 for _, code in seen)
    # The restart reconciles what the crash left open.
    restarted = Server("--parallel", "2", data_dir=s.data_dir, env={"FERRY_ADMIN_KEY": ADMIN})
    try:
        db = sqlite3.connect(os.path.join(s.data_dir, "ferry.db"))
        rows = dict(db.execute("SELECT request_id, status FROM usage_records WHERE route = '/v1/chat/completions'"))
        ids = [rid for rid, _ in seen]
        assert len(set(ids)) == 50
        assert set(ids) <= set(rows), "every admitted request has its record"
        assert len(rows) == 50, "and no other"
        assert set(rows.values()) <= {"ok", "cancelled", "interrupted"}
        assert "interrupted" in rows.values()
        counts = db.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM usage_records").fetchone()
        assert counts[0] == counts[1]
    finally:
        restarted.stop()


def test_refuses_a_public_address_without_keys():
    out = subprocess.run(
        [BINARY, "serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", "/tmp/ferry-no-auth-test"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("FERRY_ADMIN_KEY")},
    )
    assert out.returncode != 0
    assert "--insecure-no-auth" in out.stderr and "FERRY_ADMIN_KEY" in out.stderr
    s = Server("--host", "0.0.0.0", "--insecure-no-auth", "--parallel", "1")
    try:
        url = s.url.replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(url + "/health").status_code == 200
    finally:
        s.stop()


def test_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    s = Server("--parallel", "1", "--tls-cert", str(cert), "--tls-key", str(key), env={"FERRY_ADMIN_KEY": ADMIN})
    try:
        assert s.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=trust) as http:
            assert http.get(s.url + "/health").status_code == 200
            r = http.post(s.url + "/admin/v1/tenants", json={"name": "over-tls"},
                          headers={"Authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 201
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=ADMIN, max_retries=0,
                               http_client=httpx.Client(verify=trust))
        assert client.chat.completions.create(**CHAT).choices[0].message.content is not None
        # Plain HTTP on the TLS port gets nowhere.
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url.replace("https://", "http://") + "/health", timeout=5)
    finally:
        s.stop()
    out = subprocess.run([BINARY, "serve", "--port", "0", "--tls-cert", str(cert)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "--tls-key" in out.stderr


def test_content_is_kept_only_for_tenants_that_opt_in_and_purged():
    s = Server("--parallel", "2", "--purge-interval-s", "1", env={"FERRY_ADMIN_KEY": ADMIN})
    try:
        keeper, _, keeper_tenant = make_key(s, "keeper")
        admin(s, "PATCH", f"/admin/v1/tenants/{keeper_tenant}", {"retain_content": True, "retention_days": 7})
        other, _, _ = make_key(s, "no-keeping")
        plain = chat(s, keeper, messages=[{"role": "user", "content": "Remember the word teapot."}])
        streamed = chat(s, keeper, stream=True)
        not_kept = chat(s, other)
        time.sleep(0.5)
        kept = admin(s, "GET", f"/admin/v1/requests/{plain.headers['x-request-id']}/content").json()
        assert "teapot" in kept["request"]
        assert json.loads(kept["response"])["choices"][0]["message"] == plain.json()["choices"][0]["message"]
        kept_stream = admin(s, "GET", f"/admin/v1/requests/{streamed.headers['x-request-id']}/content").json()
        assert kept_stream["response"].startswith("data: ") and "[DONE]" in kept_stream["response"]
        r = admin(s, "GET", f"/admin/v1/requests/{not_kept.headers['x-request-id']}/content")
        assert r.status_code == 404
        db = sqlite3.connect(os.path.join(s.data_dir, "ferry.db"))
        assert db.execute("SELECT COUNT(*) FROM request_content").fetchone()[0] == 2
        # Another tenant's admin can't read it.
        other_admin, _, _ = make_key(s, "no-keeping", role="tenant_admin")
        r = admin(s, "GET", f"/admin/v1/requests/{plain.headers['x-request-id']}/content", key=other_admin)
        assert r.status_code == 404
        # An explanation of a kept request by its id, for its own tenant only.
        rid = plain.headers["x-request-id"]
        body = {"model": MODEL_ID, "request_id": rid, "granularity": "message"}
        headers = {"Authorization": f"Bearer {keeper}"}
        explained = httpx.post(s.url + "/v1/explanations", json=body, headers=headers, timeout=120)
        assert explained.status_code == 200, explained.text
        assert explained.json()["segments"][0]["text"] == "Remember the word teapot."
        r = httpx.post(s.url + "/v1/explanations", json=body, headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 404
        # Opting out: the purge task deletes what was kept.
        admin(s, "PATCH", f"/admin/v1/tenants/{keeper_tenant}", {"retain_content": False})
        deadline = time.time() + 10
        while db.execute("SELECT COUNT(*) FROM request_content").fetchone()[0] and time.time() < deadline:
            time.sleep(0.2)
        assert db.execute("SELECT COUNT(*) FROM request_content").fetchone()[0] == 0
    finally:
        s.stop()


def test_admin_key_from_a_file(tmp_path):
    key_file = tmp_path / "admin.key"
    key_file.write_text("file-admin-key-0123456789abcdef\n")
    s = Server("--parallel", "1", env={"FERRY_ADMIN_KEY_FILE": str(key_file)})
    try:
        r = admin(s, "GET", "/admin/v1/whoami", key="file-admin-key-0123456789abcdef")
        assert r.status_code == 200 and r.json()["role"] == "admin"
        assert httpx.post(s.url + "/v1/chat/completions", json=CHAT).status_code == 401
    finally:
        s.stop()
