"""Browser pages calling the API from another origin (CORS): loopback pages and configured
origins are admitted, preflights included, before any key is checked; other origins get no
`access-control-allow-origin`, so a browser keeps the answer from the page. (The admin UI's
Chromium tests make the same calls from real pages.)"""
import httpx
import pytest

from conftest import Server

ADMIN_KEY = "cors-test-admin-key-0123456789"
APP = "https://app.example.com"


@pytest.fixture(scope="module")
def cors_server():
    server = Server("--cors-origin", APP, model=False, env={"FERRY_ADMIN_KEY": ADMIN_KEY})
    yield server
    server.stop()


def preflight(url, origin, method="POST", headers="authorization,content-type,x-stainless-os"):
    return httpx.options(url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers})


@pytest.mark.parametrize("origin", [APP, "http://localhost:5173", "http://127.0.0.1:3000", "http://[::1]:8000"])
def test_a_preflight_from_an_admitted_origin_is_answered_before_any_key(cors_server, origin):
    r = preflight(cors_server.url, origin)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"].lower()
    for header in ("authorization", "content-type", "x-stainless-os"):
        assert header in allowed
    assert "access-control-allow-credentials" not in r.headers, "keys travel in headers, not cookies"


@pytest.mark.parametrize("origin", ["https://evil.example", "http://localhost.evil.example", "null"])
def test_other_origins_are_not_admitted(cors_server, origin):
    r = preflight(cors_server.url, origin)
    assert "access-control-allow-origin" not in r.headers, r.headers


def test_answers_and_errors_carry_the_cors_headers_for_the_page(cors_server):
    ok = httpx.get(cors_server.url + "/v1/models", headers={"Origin": APP, "Authorization": f"Bearer {ADMIN_KEY}"})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == APP
    assert ok.headers["access-control-expose-headers"] == "*", "x-request-id and rate-limit headers are readable"
    refused = httpx.get(cors_server.url + "/v1/models", headers={"Origin": APP})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == APP, "the page can read why it was refused"
    assert refused.json()["error"]["code"] == "invalid_api_key"
    foreign = httpx.get(cors_server.url + "/v1/models", headers={"Origin": "https://evil.example",
                                                                 "Authorization": f"Bearer {ADMIN_KEY}"})
    assert "access-control-allow-origin" not in foreign.headers


def test_a_star_admits_every_origin():
    server = Server("--cors-origin", "*", model=False)
    try:
        r = preflight(server.url, "https://anywhere.example")
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://anywhere.example"
    finally:
        server.stop()


def test_a_malformed_origin_stops_the_server_at_start():
    with pytest.raises(RuntimeError, match="--cors-origin takes an origin"):
        Server("--cors-origin", "app.example.com/chat", model=False)


def test_a_keyless_server_refuses_other_sites_and_other_host_names():
    """Without keys, a page on another site cannot make the browser run requests on the local
    server (a text/plain POST needs no preflight, and CORS only hides the answer), nor reach it
    under its own host name rebound to 127.0.0.1 (DNS rebinding). Local pages, configured
    origins, the server's own pages and --allowed-host names still can; once a key exists,
    keys decide."""
    server = Server("--cors-origin", APP, "--allowed-host", "ferry.internal", model=False)
    try:
        evil = {"Origin": "https://evil.example", "content-type": "text/plain"}
        r = httpx.post(server.url + "/admin/v1/tenants", content='{"name": "evil"}', headers=evil)
        assert r.status_code == 403 and "--cors-origin" in r.json()["error"]["message"], r.text
        r = httpx.post(server.url + "/admin/v1/keys", content='{"name": "evil", "role": "admin"}', headers=evil)
        assert r.status_code == 403
        assert httpx.get(server.url + "/admin/v1/tenants").json()["data"] == []
        rebound = httpx.get(server.url + "/v1/models", headers={"Host": "attacker.example:8080"})
        assert rebound.status_code == 403 and "--allowed-host" in rebound.json()["error"]["message"]
        anthropic = httpx.post(server.url + "/v1/messages", headers={"Host": "attacker.example"},
                               json={"model": "m", "max_tokens": 1, "messages": []})
        assert anthropic.status_code == 403 and anthropic.json()["type"] == "error"
        for origin in (APP, "http://localhost:5173", server.url):
            assert httpx.get(server.url + "/v1/models", headers={"Origin": origin}).status_code == 200, origin
        assert httpx.get(server.url + "/v1/models", headers={"Host": "ferry.internal:8080"}).status_code == 200
        own_page = {"Host": "ferry.internal:8080", "Origin": "http://ferry.internal:8080"}
        assert httpx.get(server.url + "/v1/models", headers=own_page).status_code == 200
        # The first key turns keys on: then a foreign page is refused for want of one.
        key = httpx.post(server.url + "/admin/v1/keys", json={"name": "first", "role": "admin"})
        assert key.status_code == 201, key.text
        r = httpx.get(server.url + "/v1/models", headers={"Origin": "https://evil.example", "Host": "attacker.example"})
        assert r.status_code == 401
    finally:
        server.stop()
