#!/usr/bin/env python3
"""Gateway overhead: Ferry against LiteLLM's proxy, both in front of the same fast mock
upstream on 127.0.0.1, loaded by wrk with a small chat body. Prints requests/s and
p50/p99 latency at each concurrency, the mock alone alongside, and each server's CPU time
per request (utime + stime from /proc).

Two Ferry rows: `ferry` with everything per-request off (no keys, no limits, no usage
records, no guardrails), and `ferry+tenancy` with all of it on: an admin key, a member key
whose key, project and tenant have RPM/TPM limits, a usage record and a trace per request
in SQLite, and a redact guardrail policy scanning every message. After its run the script
checks that all of that really happened (see `check_tenancy`).

    cargo build --release -p ferry-cli -p ferry-mock-upstream
    apt-get install wrk
    python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'
    python3 bench/gateway_bench.py [--litellm /tmp/litellm-venv/bin/litellm] [--duration 10] [--rounds 1]

With `--rounds N` the two Ferry rows are measured N times each, alternating, at every
concurrency: their rows show the medians, and the tenancy ratio line each round's ratio.

With `--redis redis://127.0.0.1:6379` a third row, `ferry+redis`, runs the tenancy server's
setup with its rate-limit windows shared through that Redis (`--redis-url`), alternating
with the other two; its CPU column is Ferry's, and the Redis server's own CPU per request
(read from /proc by its process id, so a local Redis only) is printed after the table.
"""
import argparse
import os
import statistics
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from procstat import cpu_seconds

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# FERRY_BIN and FERRY_MOCK_BIN name other builds (a worktree's own target directory).
FERRY = os.environ.get("FERRY_BIN") or os.path.join(ROOT, "target", "release", "ferry")
MOCK = os.environ.get("FERRY_MOCK_BIN") or os.path.join(ROOT, "target", "release", "ferry-mock-upstream")
BODY = '{"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}'


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, timeout=120, key="sk-bench"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url, data=BODY.encode(), headers={"content-type": "application/json",
                                                                           "authorization": f"Bearer {key}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer")


def wrk(url, connections, duration, key="sk-bench"):
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(f'wrk.method = "POST"\nwrk.body = {BODY!r}\nwrk.headers["Content-Type"] = "application/json"\n'
                 f'wrk.headers["Authorization"] = "Bearer {key}"\n')
    script.close()
    out = subprocess.run(["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{duration}s",
                          "--latency", "-s", script.name, url], capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)

    def latency(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": latency(50),
            "p99": latency(99), "requests": requests, "errors": int(errors.group(1)) if errors else 0}


def measure(name, url, pid, concurrencies, duration, key="sk-bench"):
    rows = []
    for c in concurrencies:
        before = cpu_seconds(pid) if pid else None
        r = wrk(url, c, duration, key)
        r["cpu_ms_per_request"] = (cpu_seconds(pid) - before) * 1000 / max(r["requests"], 1) if pid else None
        rows.append((name, c, r))
    return rows


def median_row(runs):
    """One row from several runs of a server: each figure's median; requests and errors summed."""
    row = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99", "cpu_ms_per_request")}
    row["requests"] = sum(r["requests"] for r in runs)
    row["errors"] = sum(r["errors"] for r in runs)
    return row


def make_member_key(url, admin):
    """A tenant with a redact policy, a project and a member key, each with limits high
    enough never to refuse: the limiter's work is measured, not its refusals."""
    import json

    def post(path, body):
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", "authorization": f"Bearer {admin}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    limits = {"rpm": 10**9, "tpm": 10**12}
    tenant = post("/admin/v1/tenants", {"name": "bench", "limits": limits, "guardrail_policy": "redact"})
    project = post("/admin/v1/projects", {"tenant_id": tenant["id"], "name": "bench", "limits": limits})
    return post("/admin/v1/keys", {"name": "bench", "role": "member", "project_id": project["id"],
                                   "limits": limits})["key"]


def check_tenancy(url, admin, member, served):
    """Proves the `ferry+tenancy` row paid for everything it claims: the member key is needed
    (401 without it), rate-limit headers come back, every request served has its usage
    record, and a request's trace names the redact policy."""
    import json

    def get(path, key):
        req = urllib.request.Request(url + path, headers={"authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    try:
        urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", data=BODY.encode(),
                                                      headers={"content-type": "application/json"}), timeout=30)
        raise RuntimeError("the tenancy server answered a request without a key")
    except urllib.error.HTTPError as e:
        assert e.code == 401, e.code
    req = urllib.request.Request(url + "/v1/chat/completions", data=BODY.encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {member}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers.get("x-ratelimit-limit-requests"), "no rate-limit headers: limits are off"
        request_id = r.headers["x-request-id"]
    deadline = time.time() + 10
    while True:
        rows = get("/admin/v1/usage?group_by=tenant", admin)["data"]
        records = sum(row["requests"] for row in rows)
        try:
            trace = get(f"/v1/traces/{request_id}", member)
        except urllib.error.HTTPError:
            trace = None
        if (records >= served + 1 and trace) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert records >= served + 1, f"{records} usage records for {served + 1} requests: metering is off"
    assert trace and trace["guardrails"]["policy"] == "redact", f"the trace shows no redact policy: {trace}"
    print(f"(ferry+tenancy checked: key required, rate-limit headers, {records} usage records for "
          f"{served + 1} requests, traces with the redact policy)", file=sys.stderr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--litellm", default="/tmp/litellm-venv/bin/litellm")
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternating runs of the two Ferry servers at each concurrency (medians shown)")
    p.add_argument("--redis", help="a local Redis URL: adds the ferry+redis row (shared rate-limit windows)")
    args = p.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    procs = []
    try:
        mock_port = free_port()
        mock = subprocess.Popen([MOCK, str(mock_port)], stdout=subprocess.DEVNULL)
        procs.append(mock)
        mock_url = f"http://127.0.0.1:{mock_port}"
        wait_ready(mock_url + "/v1/chat/completions")

        config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        config.write(f'[providers.mock]\nkind = "openai"\nbase_url = "{mock_url}/v1"\n\n'
                     '[[aliases]]\nname = "bench"\ntargets = [{ provider = "mock", model = "mock" }]\n')
        config.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_ADMIN_KEY")}
        ferry = subprocess.Popen([FERRY, "serve", "--config", config.name, "--port", "0", "--no-metering",
                                  "--data-dir", tempfile.mkdtemp(prefix="ferry-bench-")], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True, env={**env, "FERRY_LOG": "warn"})
        procs.append(ferry)
        ferry_url = re.search(r"(http://\S+)", ferry.stdout.readline()).group(1)
        wait_ready(ferry_url + "/v1/chat/completions")

        tconfig = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        tconfig.write(open(config.name).read() + '\n[[guardrails]]\nname = "redact"\naction = "redact"\n')
        tconfig.close()
        admin = "bench-admin-key-0123456789abcdef"

        def tenancy_server(name, *extra):
            """A server with the tenancy config and an admin key, its member key made: a row."""
            proc = subprocess.Popen([FERRY, "serve", "--config", tconfig.name, "--port", "0", *extra,
                                     "--data-dir", tempfile.mkdtemp(prefix="ferry-bench-")], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True,
                                    env={**env, "FERRY_LOG": "warn", "FERRY_ADMIN_KEY": admin})
            procs.append(proc)
            url = re.search(r"(http://\S+)", proc.stdout.readline()).group(1)
            member = make_member_key(url, admin)
            wait_ready(url + "/v1/chat/completions", key=member)
            return (name, url, proc.pid, member)

        servers = [("ferry", ferry_url, ferry.pid, "sk-bench"), tenancy_server("ferry+tenancy")]
        redis_pid = None
        if args.redis:
            servers.append(tenancy_server("ferry+redis", "--redis-url", args.redis,
                                          "--redis-prefix", f"bench-{os.getpid()}"))
            info = subprocess.run(["redis-cli", "-u", args.redis, "info", "server"], capture_output=True,
                                  text=True, check=True).stdout
            redis_pid = int(re.search(r"process_id:(\d+)", info).group(1))
        redis_cpu = {}

        rows = measure("mock alone", mock_url + "/v1/chat/completions", mock.pid, concurrencies, args.duration)
        # The two Ferry rows alternate at each concurrency, so that their ratio compares runs
        # seconds apart on a machine whose load drifts.
        tenancy_rows, round_ratios = [], {}
        for c in concurrencies:
            runs = {name: [] for name, *_ in servers}
            for _ in range(args.rounds):
                for name, url, pid, key in servers:
                    before = cpu_seconds(redis_pid) if name == "ferry+redis" else None
                    runs[name] += measure(name, url + "/v1/chat/completions", pid, [c], args.duration, key=key)
                    if before is not None:
                        redis_cpu.setdefault(c, []).append(
                            (cpu_seconds(redis_pid) - before) * 1000 / max(runs[name][-1][2]["requests"], 1))
            rows.append(("ferry", c, median_row([r for _, _, r in runs["ferry"]])))
            for name, *_ in servers[1:]:
                tenancy_rows.append((name, c, median_row([r for _, _, r in runs[name]])))
            round_ratios[c] = [t["cpu_ms_per_request"] / f["cpu_ms_per_request"]
                               for (_, _, f), (_, _, t) in zip(runs["ferry"], runs["ferry+tenancy"])]
        rows += tenancy_rows
        # wrk's count plus the readiness probe.
        for name, url, _, key in servers[1:]:
            check_tenancy(url, admin, key, sum(r["requests"] for n, _, r in tenancy_rows if n == name) + 1)

        if os.path.exists(args.litellm):
            lport = free_port()
            lconfig = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
            lconfig.write(f"model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/mock\n"
                          f"      api_base: {mock_url}/v1\n      api_key: sk-bench\n")
            lconfig.close()
            litellm = subprocess.Popen([args.litellm, "--config", lconfig.name, "--port", str(lport), "--num_workers", "1"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
                                            "LITELLM_MASTER_KEY": "sk-bench"})
            procs.append(litellm)
            wait_ready(f"http://127.0.0.1:{lport}/v1/chat/completions", timeout=180)
            rows += measure("litellm", f"http://127.0.0.1:{lport}/v1/chat/completions", litellm.pid, concurrencies,
                            args.duration)
        else:
            print(f"(LiteLLM not found at {args.litellm}: its rows are skipped)", file=sys.stderr)

        print(f"{'server':<15}{'conc':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/req':>12}{'non-2xx':>9}")
        for name, c, r in rows:
            cpu = f"{r['cpu_ms_per_request']:.3f}" if r["cpu_ms_per_request"] is not None else "-"
            print(f"{name:<15}{c:>6}{r['rps']:>10.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}{cpu:>12}{r['errors']:>9}")
        by = {(name, c): r for name, c, r in rows}
        print()
        for c in concurrencies:
            f, m, l = by[("ferry", c)], by[("mock alone", c)], by.get(("litellm", c))
            line = f"c={c}: ferry adds {f['p99'] - m['p99']:.2f} ms at p99 over the mock alone"
            if l:
                line += f"; ferry/litellm requests/s = {f['rps'] / l['rps']:.1f}x"
            t = by[("ferry+tenancy", c)]
            line += (f"; tenancy on: CPU/request {t['cpu_ms_per_request'] / f['cpu_ms_per_request']:.2f}x, "
                     f"requests/s {t['rps'] / f['rps']:.2f}x")
            if args.rounds > 1:
                line += " (CPU/request by round: " + " ".join(f"{r:.2f}" for r in round_ratios[c]) + ")"
            shared = by.get(("ferry+redis", c))
            if shared:
                line += (f"; shared through Redis: Ferry CPU/request {shared['cpu_ms_per_request'] / t['cpu_ms_per_request']:.2f}x"
                         f" the tenancy row's, plus Redis {statistics.median(redis_cpu[c]):.3f} ms/request")
            print(line)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
