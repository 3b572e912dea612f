#!/usr/bin/env python3
"""Ferry's server against llama.cpp's llama-server under load, side by side in one run.

Both serve the same GGUF file with the same threads, 16 parallel sequences and the same
context per sequence. A fixed workload (seeded: prompts of 64-1024 random tokens, 128
generated tokens each, end-of-generation ignored, greedy) is sent by N concurrent streaming
clients to `/v1/completions`, one server after the other at each concurrency. Printed per
concurrency and server: aggregate decode tokens/s (generated tokens of all requests over the
wall time of the level), time to first token p50/p99, and peak RSS (VmHWM from /proc,
reset before each level), then the ratios ferry/llama-server.

    bench/build-peers.sh && cargo build --release
    python3 bench/serve_bench.py [--concurrency 1,4,16,64] [--threads 2] [--seed 7]
"""
import argparse
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time

import httpx

from procstat import peak_rss_mb, reset_peak_rss

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FERRY = os.environ.get("FERRY_BIN", os.path.join(ROOT, "target", "release", "ferry"))
# LLAMA_BIN_DIR: peers built elsewhere (bench/gpu-bench.sh's CUDA build).
LLAMA_SERVER = os.path.join(os.environ.get("LLAMA_BIN_DIR", os.path.join(ROOT, "bench", "peers", "bin")), "llama-server")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
# Requests per level: enough for each client to send at least one, few enough for two cores.
REQUESTS = {1: 2, 4: 4, 16: 16, 64: 64}


def workload(seed, n, min_len, max_len, vocab=(1000, 40000)):
    """`n` prompts of random token ids (no special tokens), lengths uniform in [min_len, max_len]."""
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name, argv, url=None):
        self.name = name
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE if url is None else self.log,
                                     stderr=self.log, text=True)
        if url is None:  # Ferry prints its address (port 0).
            self.url = re.search(r"(http://\S+)", self.proc.stdout.readline()).group(1)
        else:
            self.url = url
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{name} did not become ready; log in {self.log.name}")

    def reset_peak_rss(self):
        reset_peak_rss(self.proc.pid)

    def peak_rss_mb(self):
        return peak_rss_mb(self.proc.pid)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one(client, url, model, prompt, gen):
    """(seconds to the first generated text, generated tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started, first, chunks, usage = time.perf_counter(), None, 0, None
    with client.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            # Parse only what is needed: the client shares the machine's cores with the server.
            if first is None or '"usage":{' in line:
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - started
            if '"text":""' not in line:
                chunks += 1
    return first, usage if usage is not None else chunks


def level(server, model, prompts, concurrency, gen):
    """Runs `prompts` with `concurrency` closed-loop clients."""
    queue = list(enumerate(prompts))
    lock = threading.Lock()
    ttfts, tokens, errors = [], [], []

    def client_loop():
        # A fresh connection per request: llama-server closes idle keep-alive connections,
        # which a pooled client would only find out when reusing one.
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    _, prompt = queue.pop(0)
                try:
                    first, n = one(client, server.url, model, prompt, gen)
                    with lock:
                        ttfts.append(first)
                        tokens.append(n)
                except Exception as e:  # noqa: BLE001 - reported, the level goes on
                    with lock:
                        errors.append(repr(e))

    server.reset_peak_rss()
    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts.sort()
    q = statistics.quantiles(ttfts, n=100, method="inclusive") if len(ttfts) > 1 else ttfts * 99
    return {"tok_s": sum(tokens) / wall, "ttft_p50": q[49], "ttft_p99": q[98], "rss_mb": server.peak_rss_mb(),
            "tokens": sum(tokens), "wall_s": wall, "errors": errors}


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--ctx-per-seq", type=int, default=1280)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--min-prompt", type=int, default=64)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--requests", type=int, default=0, help="requests per level (default: 2, 4, 16, 64)")
    p.add_argument("--per-client", type=int, default=0, help="requests per level: this many per client")
    p.add_argument("--ferry-args", default="", help="extra flags for ferry serve")
    p.add_argument("--llama-args", default="", help="extra flags for llama-server")
    p.add_argument("--only", choices=["ferry", "llama-server"], help="run one server (profiling)")
    args = p.parse_args()
    needed = {None: (FERRY, LLAMA_SERVER), "ferry": (FERRY,), "llama-server": (LLAMA_SERVER,)}[args.only]
    for path in (*needed, args.model):
        if not os.path.exists(path):
            raise SystemExit(f"missing {path}: see the docstring")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    model_id = os.path.basename(args.model)[: -len(".gguf")]

    servers = []
    if args.only != "llama-server":
        servers.append(lambda: Proc("ferry", [
            FERRY, "serve", "--port", "0", "--model", args.model, "--threads", str(args.threads),
            "--parallel", str(args.parallel), "--ctx-size", str(args.ctx_per_seq), "--max-queue", "1024",
            "--data-dir", tempfile.mkdtemp(prefix="ferry-bench-"), *args.ferry_args.split()]))
    if args.only != "ferry":
        port = free_port()
        servers.append(lambda: Proc("llama-server", [
            LLAMA_SERVER, "-m", args.model, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
            "-tb", str(args.threads), "-np", str(args.parallel), "-c", str(args.parallel * args.ctx_per_seq),
            "--no-webui", *args.llama_args.split()], url=f"http://127.0.0.1:{port}"))
    running = []
    # SIGTERM (a timeout, or a user) stops the servers too.
    signal.signal(signal.SIGTERM, interrupted)
    try:
        for start in servers:
            running.append(start())
        warm = workload(args.seed + 1000, 2, args.min_prompt, args.min_prompt)
        for s in running:
            level(s, model_id, warm, 2, 8)
        results = {}
        for c in concurrencies:
            prompts = workload(args.seed + c, args.requests or args.per_client * c or REQUESTS.get(c, 2 * c), args.min_prompt,
                               args.max_prompt)
            for s in running:
                r = level(s, model_id, prompts, c, args.gen)
                results[(s.name, c)] = r
                # Each level as it ends, so that an interrupted run still tells something.
                print(f"# {s.name} c={c}: {len(prompts)} requests, {r['tokens']} tokens in {r['wall_s']:.1f} s, "
                      f"{r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.2f} s p99 {r['ttft_p99']:.2f} s, "
                      f"peak RSS {r['rss_mb']:.0f} MB" + (f", errors: {r['errors'][:3]}" if r["errors"] else ""),
                      flush=True)
    finally:
        for s in running:
            s.stop()

    names = [s.name for s in running]
    print(f"\nmodel {model_id}, {args.threads} threads, -np {args.parallel}, {args.ctx_per_seq} ctx per sequence, "
          f"prompts {args.min_prompt}-{args.max_prompt} tokens, {args.gen} generated, seed {args.seed}")
    print(f"{'clients':>7} {'server':<13}{'tok/s':>8}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'peak RSS MB':>13}")
    for c in concurrencies:
        for name in names:
            r = results[(name, c)]
            print(f"{c:>7} {name:<13}{r['tok_s']:8.1f}{r['ttft_p50']:12.2f}{r['ttft_p99']:12.2f}{r['rss_mb']:13.0f}")
        if len(names) == 2:
            f, l = results[("ferry", c)], results[("llama-server", c)]
            print(f"{c:>7} {'ferry/llama':<13}{f['tok_s'] / l['tok_s']:8.2f}{f['ttft_p50'] / l['ttft_p50']:12.2f}"
                  f"{f['ttft_p99'] / l['ttft_p99']:12.2f}{f['rss_mb'] / l['rss_mb']:13.2f}")


if __name__ == "__main__":
    main()
