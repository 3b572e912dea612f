"""Black-box fixtures: the release `ferry` binary started on port 0 with the real test model."""
import itertools
import os
import re
import signal
import subprocess
import tempfile
import time

import httpx
import openai
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.environ.get("FERRY_BIN", os.path.join(ROOT, "target", "release", "ferry"))
MODELS_DIR = os.environ.get("FERRY_MODELS_DIR", os.path.join(ROOT, "models"))
MODEL_FILE = os.path.join(MODELS_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


class Server:
    """`ferry serve` on port 0 with its own data directory (a fresh one unless given)."""

    def __init__(self, *args, env=None, data_dir=None, model=True):
        assert os.path.exists(BINARY), f"{BINARY} missing: cargo build --release first"
        assert os.path.exists(MODEL_FILE), "run python3 scripts/fetch-models.py first"
        self.log = open(os.path.join(ROOT, "target", f"ferry-test-{os.getpid()}-{id(self)}.log"), "w+")
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="ferry-data-")
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_ADMIN_KEY")}
        model_args = ["--model", MODEL_FILE] if model else []
        self.proc = subprocess.Popen(
            [BINARY, "serve", "--port", "0", *model_args, "--threads", "2", "--data-dir", self.data_dir, *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**base_env, **(env or {})},
        )
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (https?://\S+)", line)
        if not match:
            self.proc.kill()
            self.proc.wait()
            self.log.seek(0)
            log = self.log.read()[-4000:]
            self.log.close()
            raise RuntimeError(f"server did not start: {line!r}\n{log}")
        self.url = match.group(1)

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", **kwargs)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def server():
    s = Server("--parallel", "16", "--ctx-size", "1024")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client(max_retries=0, timeout=120)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture
def small_server():
    """One sequence and a one-request queue: for cancellation and back-pressure."""
    s = Server("--parallel", "1", "--max-queue", "1", "--ctx-size", "4096")
    yield s
    s.stop()


def admin_request(server, key, method, path, body=None):
    """A call to the admin API (or /metrics) with `key` as the bearer token."""
    return httpx.request(method, server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


_TENANTS = itertools.count()


def member_key(server, admin_key, tenant=None, project=None, key=None):
    """A fresh tenant and project (with the given fields) and a member key in the project:
    (the key's secret, its record, the tenant's id)."""

    def created(path, body):
        r = admin_request(server, admin_key, "POST", path, body)
        assert r.status_code == 201, r.text
        return r.json()

    t = created("/admin/v1/tenants", {"name": f"tenant-{next(_TENANTS)}", **(tenant or {})})
    p = created("/admin/v1/projects", {"tenant_id": t["id"], "name": "p", **(project or {})})
    k = created("/admin/v1/keys", {"name": "k", "role": "member", "project_id": p["id"], **(key or {})})
    return k["key"], k, t["id"]
