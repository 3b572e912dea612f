"""Replicas behind one load balancer: two `ferry serve` processes on one database, sharing
a real Redis (`--redis-url`) for their per-minute limits and word of key changes, a Redis
of the test's own that goes away and comes back, and replicas on a real PostgreSQL whose
heartbeats decide when a crashed one's open usage records are closed."""
import concurrent.futures
import json
import os
import socket
import subprocess
import time
import uuid

import httpx
import pytest

from conftest import BINARY, Server, admin_request
from test_tenancy import ADMIN, CHAT as CHAT_BODY, chat, make_key

REDIS = os.environ.get("FERRY_TEST_REDIS", "redis://127.0.0.1:6379")


def replicas(*extra, redis=REDIS, env=None):
    """Two servers on one data directory and one Redis, under a prefix of their own."""
    prefix = f"ferry-test-{uuid.uuid4().hex[:12]}"
    args = ("--parallel", "4", "--ctx-size", "1024", "--redis-url", redis, "--redis-prefix", prefix, *extra)
    env = {"FERRY_ADMIN_KEY": ADMIN, **(env or {})}
    a = Server(*args, env={**env, "FERRY_INSTANCE": "a"})
    try:
        b = Server(*args, data_dir=a.data_dir, env={**env, "FERRY_INSTANCE": "b"})
    except Exception:
        a.stop()
        raise
    return a, b


def test_requests_per_minute_count_across_replicas_sharing_redis():
    """Without Redis each replica admits the whole limit: 2N of 3N across two. With it,
    exactly N, whichever replica each request reached."""
    a, b = replicas()
    try:
        n = 5
        secret, _, _ = make_key(a, "shared-rpm", limits={"rpm": n})
        targets = [a, b] * (3 * n // 2) + [a]
        with concurrent.futures.ThreadPoolExecutor(3 * n) as pool:
            responses = list(pool.map(lambda s: chat(s, secret, max_tokens=1), targets[: 3 * n]))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * n + [429] * (2 * n), [r.text for r in responses if r.status_code not in (200, 429)]
        admitted = [r for r in responses if r.status_code == 200]
        remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
        assert remaining == list(range(n))
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        # Retry-After in whole seconds, rounded up: never less than the message's wait.
        assert 1 <= int(refused.headers["retry-after"]) <= 60
    finally:
        b.stop()
        a.stop()


def test_tokens_per_minute_settle_across_replicas():
    """A request on one replica is admitted on its estimate and settled to what it used,
    and the other replica's window holds exactly that."""
    a, b = replicas()
    try:
        secret, _, _ = make_key(a, "shared-tpm", limits={"tpm": 2000})
        say_ok = {"messages": [{"role": "user", "content": "Say OK."}], "temperature": 0}
        first = chat(a, secret, max_tokens=600, **say_ok)
        assert first.status_code == 200, first.text
        used = first.json()["usage"]["total_tokens"]
        assert used < 300
        # Settling is sent to Redis as the request ends; b then sees a's real use.
        time.sleep(0.5)
        second = chat(b, secret, max_tokens=600, **say_ok)
        assert second.status_code == 200, second.text
        remaining = int(second.headers["x-ratelimit-remaining-tokens"])
        # b's own estimate: its 600 and its body's bytes / 4 (under 100 here).
        assert 2000 - used - 700 <= remaining <= 2000 - used - 600, (remaining, used)
        # A request that a's own window (a's use alone) would admit, and the shared one (a's
        # and b's) cannot: its estimate, body bytes / 4 + max_tokens, is exactly what a left.
        time.sleep(0.5)
        body = {**CHAT_BODY, **say_ok, "max_tokens": 0}
        size = len(json.dumps({**body, "max_tokens": 1000}).encode())
        body["max_tokens"] = 2000 - used - size // 4
        r = httpx.post(a.url + "/v1/chat/completions", content=json.dumps(body).encode(),
                       headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 429 and r.json()["error"]["type"] == "tokens", r.text
    finally:
        b.stop()
        a.stop()


def test_a_revocation_reaches_a_replica_sharing_redis_at_once():
    """Without Redis the other replica trusts its cached key for up to 10 seconds; with it,
    the revoking replica's announcement makes it forget the key at once."""
    a, b = replicas()
    try:
        secret, key, _ = make_key(a, "shared-revoke")
        assert chat(b, secret, max_tokens=1).status_code == 200  # b holds the key in its cache
        assert admin_request(a, ADMIN, "POST", f"/admin/v1/keys/{key['id']}/revoke").status_code == 200
        revoked = time.monotonic()
        while True:
            r = chat(b, secret, max_tokens=1)
            if r.status_code != 200:
                break
            assert time.monotonic() - revoked < 2, "the other replica still takes a revoked key"
            time.sleep(0.05)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    finally:
        b.stop()
        a.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port):
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def test_a_replica_keeps_limiting_alone_while_redis_is_away_and_shares_again_when_back():
    port = free_port()
    redis = start_redis(port)
    a = b = None
    try:
        a, b = replicas(redis=f"redis://127.0.0.1:{port}")
        n = 3
        secret, _, _ = make_key(a, "redis-away", limits={"rpm": n})
        redis.kill()
        redis.wait()
        # Each replica now counts alone: n on each, and no error answers.
        codes = sorted(chat(s, secret, max_tokens=1).status_code for s in [a, b] * (n + 1))
        assert codes == [200] * (2 * n) + [429] * 2, codes
        with open(a.log.name) as log:
            assert "Redis is out of reach" in log.read()
        metrics = httpx.get(a.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10).text
        assert "ferry_shared_state_errors_total" in metrics
        # Back: the shared window (empty on a fresh Redis) counts both replicas again.
        redis = start_redis(port)
        other, _, _ = make_key(a, "redis-back", limits={"rpm": n})
        deadline = time.monotonic() + 20
        while True:
            codes = sorted(chat(s, other, max_tokens=1).status_code for s in [a, b] * n)
            if codes == [200] * n + [429] * n or time.monotonic() > deadline:
                break
            # Still counting alone (reconnecting): a new key starts a fresh window.
            other, _, _ = make_key(a, "redis-back", limits={"rpm": n})
            time.sleep(1)
        assert codes == [200] * n + [429] * n, codes
        with open(a.log.name) as log:
            assert "Redis answers again" in log.read()
    finally:
        for s in (b, a):
            if s:
                s.stop()
        redis.kill()
        redis.wait()


def test_an_unreachable_redis_stops_the_start_without_showing_its_password(tmp_path):
    port = free_port()
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    env.pop("FERRY_ADMIN_KEY", None)
    done = subprocess.run([BINARY, "serve", "--port", "0", "--data-dir", str(tmp_path),
                           "--redis-url", f"redis://:hunter2secret@127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode != 0
    assert "Redis at redis://:***@127.0.0.1" in done.stderr, done.stderr
    assert "hunter2secret" not in done.stderr + done.stdout


def test_a_keyless_replica_turns_auth_on_when_another_makes_the_first_key():
    """Two keyless local servers on one database: once one makes a key, the other asks for
    keys too (it looks every 2 seconds), rather than staying open."""
    a = Server("--parallel", "2", "--ctx-size", "512", env={"FERRY_INSTANCE": "a"})
    b = None
    try:
        b = Server("--parallel", "2", "--ctx-size", "512", data_dir=a.data_dir, env={"FERRY_INSTANCE": "b"})
        body = {"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert httpx.post(b.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        made = httpx.post(a.url + "/admin/v1/keys", json={"name": "first", "role": "admin"}, timeout=10)
        assert made.status_code == 201, made.text
        deadline = time.monotonic() + 6
        while True:
            r = httpx.post(b.url + "/v1/chat/completions", json=body, timeout=60)
            if r.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 401, r.text
        key = made.json()["key"]
        ok = httpx.post(b.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert ok.status_code == 200, ok.text
    finally:
        if b:
            b.stop()
        a.stop()


def fresh_postgres():
    """A new database on the PostgreSQL at 127.0.0.1:5432 (trust auth): (url, name)."""
    name = f"ferry_py_{uuid.uuid4().hex[:12]}"
    made = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", f"CREATE DATABASE {name}"],
                          capture_output=True, text=True)
    if made.returncode != 0:
        if os.environ.get("CI"):
            raise RuntimeError(f"PostgreSQL is needed in CI: {made.stderr}")
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {made.stderr.strip()}")
    return f"postgres://postgres@127.0.0.1:5432/{name}", name


def drop_postgres(name):
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c",
                    f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"], capture_output=True)


def sql(name, query):
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", name, "-At", "-c", query],
                         capture_output=True, text=True, check=True)
    return [line.split("|") for line in out.stdout.splitlines() if line]


def open_stream(server, secret, max_tokens=400):
    """A streamed chat, read up to its first chunk (admitted, its record open); returns
    (response, its request id)."""
    client = httpx.Client(timeout=120)
    body = {**CHAT_BODY, "max_tokens": max_tokens, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a very long story about the sea."}]}
    request = client.build_request("POST", server.url + "/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {secret}"})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    next(line for line in lines if line.startswith("data:"))
    return response, lines, response.headers["x-request-id"]


def test_a_crashed_replicas_open_records_are_closed_by_another_once_its_lease_runs_out():
    """On PostgreSQL a request's record is written `started` at admission. A replica killed
    in the middle of requests (a crashed Kubernetes pod, whose replacement has another name)
    left them `started` for a day; now a surviving replica closes them as `interrupted` once
    the dead one's heartbeat has been silent for the lease."""
    url, name = fresh_postgres()
    a = b = None
    try:
        args = ("--parallel", "4", "--ctx-size", "1024", "--database-url", url, "--replica-lease-s", "3")
        a = Server(*args, env={"FERRY_ADMIN_KEY": ADMIN, "FERRY_INSTANCE": "pod-a"})
        b = Server(*args, env={"FERRY_ADMIN_KEY": ADMIN, "FERRY_INSTANCE": "pod-b"})
        secret, _, _ = make_key(a, "crash-tenant")
        streams = [open_stream(a, secret) for _ in range(3)]
        ids = [request_id for _, _, request_id in streams]
        a.proc.kill()
        a.proc.wait()
        quoted = ", ".join(f"'{i}'" for i in ids)
        assert {s for (s,) in sql(name, f"SELECT status FROM usage_records WHERE request_id IN ({quoted})")} == {"started"}
        runs = admin_request(b, ADMIN, "GET", "/admin/v1/replicas").json()["data"]
        assert sorted(r["instance"] for r in runs) == ["pod-a", "pod-b"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            statuses = sql(name, f"SELECT status FROM usage_records WHERE request_id IN ({quoted})")
            if {s for (s,) in statuses} == {"interrupted"}:
                break
            time.sleep(0.5)
        assert sorted(s for (s,) in statuses) == ["interrupted"] * 3, statuses
        alive = {r["instance"]: r["alive"] for r in admin_request(b, ADMIN, "GET", "/admin/v1/replicas").json()["data"]}
        assert alive == {"pod-a": False, "pod-b": True}, alive
        with open(b.log.name) as log:
            assert "a replica whose heartbeat stopped" in log.read()
        for response, _, _ in streams:
            response.close()
    finally:
        for s in (b, a):
            if s:
                s.stop()
        drop_postgres(name)


def test_a_namesake_replica_starting_leaves_the_others_requests_in_flight_alone():
    """Two servers given one FERRY_INSTANCE (a misconfiguration, or two containers on one
    host network): the second's start closed every `started` record of that name, and so
    lost the first's requests in flight. Runs now have names of their own."""
    url, name = fresh_postgres()
    a = b = None
    try:
        args = ("--parallel", "4", "--ctx-size", "1024", "--database-url", url)
        a = Server(*args, env={"FERRY_ADMIN_KEY": ADMIN, "FERRY_INSTANCE": "same"})
        secret, _, _ = make_key(a, "namesake-tenant")
        response, lines, request_id = open_stream(a, secret, max_tokens=60)
        b = Server(*args, env={"FERRY_ADMIN_KEY": ADMIN, "FERRY_INSTANCE": "same"})
        rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        response.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            [(status, completion)] = sql(name, f"SELECT status, completion_tokens FROM usage_records WHERE request_id = '{request_id}'")
            if status != "started":
                break
            time.sleep(0.2)
        assert status == "ok" and int(completion) > 0, (status, completion)
        with open(b.log.name) as log:
            assert "another server named same beat moments ago" in log.read()
    finally:
        for s in (b, a):
            if s:
                s.stop()
        drop_postgres(name)
