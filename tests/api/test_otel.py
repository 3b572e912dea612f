"""OpenTelemetry export: a collector on 127.0.0.1 (OTLP/HTTP, JSON encoding) receives one span per
request, carrying the request id, with the engine's stages as child spans of the same trace."""
import http.server
import json
import threading
import time

import pytest

from conftest import MODEL_ID, Server


class Collector(http.server.ThreadingHTTPServer):
    """Keeps every span POSTed to /v1/traces."""

    def __init__(self):
        self.spans = []
        self.paths = []
        super().__init__(("127.0.0.1", 0), Handler)

    def find(self, predicate, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [s for s in list(self.spans) if predicate(s)]
            if found:
                return found
            time.sleep(0.1)
        return []


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.paths.append((self.path, self.headers["Content-Type"]))
        for resource in json.loads(body).get("resourceSpans", []):
            service = {a["key"]: a["value"] for a in resource["resource"]["attributes"]}
            for scope in resource["scopeSpans"]:
                for span in scope["spans"]:
                    span["attrs"] = {a["key"]: list(a["value"].values())[0] for a in span.get("attributes", [])}
                    span["service"] = service.get("service.name", {}).get("stringValue")
                    self.server.spans.append(span)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    thread = threading.Thread(target=c.serve_forever, daemon=True)
    thread.start()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def server(collector):
    s = Server("--parallel", "2", "--otlp-endpoint", f"http://127.0.0.1:{collector.server_address[1]}",
               env={"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json", "OTEL_BSP_SCHEDULE_DELAY": "100"})
    yield s
    s.stop()


def test_a_request_becomes_a_span_with_engine_children(server, collector):
    client = server.client(max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, temperature=0)
    request_id = raw.headers["x-request-id"]
    roots = collector.find(lambda s: s["attrs"].get("ferry.request_id") == request_id)
    assert len(roots) == 1, collector.spans
    root = roots[0]
    assert root["name"] == "/v1/chat/completions"
    assert root["service"] == "ferry"
    assert root["attrs"]["gen_ai.request.model"] == MODEL_ID
    assert int(root["attrs"]["http.response.status_code"]) == 200
    assert int(root["attrs"]["gen_ai.usage.output_tokens"]) == raw.parse().usage.completion_tokens
    children = collector.find(lambda s: s.get("parentSpanId") == root["spanId"])
    names = sorted(s["name"] for s in children)
    assert names == ["engine.decode", "engine.prefill", "engine.queue"]
    for child in children:
        assert child["traceId"] == root["traceId"]
        assert int(root["startTimeUnixNano"]) <= int(child["startTimeUnixNano"])
        assert int(child["endTimeUnixNano"]) <= int(root["endTimeUnixNano"])
    assert collector.paths[0] == ("/v1/traces", "application/json")


def test_a_failed_request_is_exported_with_its_status(server, collector):
    r = server.client(max_retries=0).with_options(timeout=30)
    with pytest.raises(Exception):
        r.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    spans = collector.find(lambda s: s["attrs"].get("http.response.status_code") in (404, "404"))
    assert spans and spans[0]["name"] == "/v1/chat/completions"
