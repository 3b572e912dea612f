#!/usr/bin/env python3
"""Instructions per request of the tenancy path, counted by callgrind: repeatable where CPU
time on a shared machine is not (see bench/README.md, "Tenancy on against off").

Runs `ferry serve` under `valgrind --tool=callgrind` twice in front of the mock upstream of
gateway_bench.py: with everything off (no keys, `--no-metering`) and with all of it on (a
member key with RPM/TPM limits on key, project and tenant, a usage record and trace per
request in SQLite, the tenant's `redact` policy). For each it sends warm-up requests, zeroes
the counters (`callgrind_control -z`), sends N requests on one connection, waits for the
writer's group commit and dumps (`callgrind_control -d`). Only user-space instructions are
counted: system calls (the journal's `write`, SQLite's WAL writes) are not.

    cargo build --release -p ferry-cli -p ferry-mock-upstream
    apt-get install valgrind
    FERRY_BIN=target/release/ferry python3 bench/tenancy_callgrind.py [--requests 1000]
"""
import argparse
import glob
import http.client
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import gateway_bench as g

ADMIN = "bench-admin-key-0123456789abcdef"


def instructions_per_request(mode, requests, warmup):
    """Runs one server (mode `on` or `off`) under callgrind; returns its instructions per request."""
    out = tempfile.mkdtemp(prefix="ferry-callgrind-")
    mock_port = g.free_port()
    mock = subprocess.Popen([g.MOCK, str(mock_port)], stdout=subprocess.DEVNULL)
    mock_url = f"http://127.0.0.1:{mock_port}"
    server = None
    try:
        g.wait_ready(mock_url + "/v1/chat/completions")
        config = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        config.write(f'[providers.mock]\nkind = "openai"\nbase_url = "{mock_url}/v1"\n\n'
                     '[[aliases]]\nname = "bench"\ntargets = [{ provider = "mock", model = "mock" }]\n')
        if mode == "on":
            config.write('\n[[guardrails]]\nname = "redact"\naction = "redact"\n')
        config.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_ADMIN_KEY")}
        env["FERRY_LOG"] = "warn"
        args = [g.FERRY, "serve", "--config", config.name, "--port", "0",
                "--data-dir", tempfile.mkdtemp(prefix="ferry-bench-")]
        if mode == "on":
            env["FERRY_ADMIN_KEY"] = ADMIN
        else:
            args.append("--no-metering")
        server = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/callgrind.%p"] + args,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        url = re.search(r"(http://\S+)", server.stdout.readline()).group(1)
        key = g.make_member_key(url, ADMIN) if mode == "on" else "sk-bench"
        host, port = url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}

        def send(n):
            for _ in range(n):
                conn.request("POST", "/v1/chat/completions", body=g.BODY, headers=headers)
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status

        send(warmup)
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True)
        send(requests)
        # The last requests' records are committed within the writer's gathering time (0.1 s).
        time.sleep(0.5)
        subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True)
    finally:
        for proc in (server, mock):
            if proc:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
    for path in glob.glob(f"{out}/callgrind.*"):
        text = open(path, errors="replace").read()
        if re.search(r"^desc: Trigger: dump\s*$", text, re.M):
            return int(re.search(r"^summary:\s+(\d+)", text, re.M).group(1)) / requests, commits(text)
    raise RuntimeError(f"no callgrind dump in {out}")


def commits(text):
    """SQLite write transactions committed in a dump (calls of sqlite3BtreeCommitPhaseOne).

    A commit's WAL work (each dirty 16 KiB page checksummed and written) is shared by the
    records of its group, so instructions per request depend on how many requests arrived in
    the writer's 100 ms: a loaded machine answers fewer, and its figure is higher."""
    ids = set(re.findall(r"^c?fn=\((\d+)\) sqlite3BtreeCommitPhaseOne", text, re.M))
    n = 0
    for m in re.finditer(r"^cfn=\((\d+)\).*\ncalls=(\d+)", text, re.M):
        if m.group(1) in ids:
            n += int(m.group(2))
    return n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=300)
    args = p.parse_args()
    off, _ = instructions_per_request("off", args.requests, args.warmup)
    on, on_commits = instructions_per_request("on", args.requests, args.warmup)
    print(f"{os.path.basename(g.FERRY)}: instructions/request off {off:,.0f}, on {on:,.0f}, "
          f"extra {on - off:,.0f}, on/off {on / off:.2f}; {on_commits} group commits "
          f"({args.requests / max(on_commits, 1):.0f} requests each)")


if __name__ == "__main__":
    sys.exit(main())
