#!/usr/bin/env python3
"""Cost of an explanation against one generation of the same completion: a prompt of 20
sentences (19 facts and a question), its completion generated with `max_tokens` equal to its
length, then explained at sentence granularity (the full conversation and 20 variants) with
each occlusion method asked for. Two phases, each on a server of its own:

- cold: no prefix cache, so the generation and every explanation compute their whole prompt;
  the same conversation every run, generation and explanations interleaved;
- warm: `--prefix-cache`, as a user explains an answer just generated: each run generates the
  answer to a prompt no earlier run sent (its facts rotated), then explains it, the
  explanation's base starting from the generation's cached cells.

Prints the median wall time and the median server CPU time (utime + stime from /proc, which
other work on a shared machine does not inflate) of each, and the median of the runs' ratios
of explanation to generation. With `--threads 1` (the default) the CPU time is the work done;
with more threads llama.cpp's waiting threads spin, and only the wall time means much.

    cargo build --release --bin ferry
    python3 bench/explain_bench.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--runs 5]
        [--threads 1] [--occlusion mask remove] [--phase cold warm]
"""
import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time

import httpx

from procstat import cpu_seconds

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FERRY = os.path.join(ROOT, "target", "release", "ferry")
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj",
         "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Perth", "Porto", "Riga",
          "Sofia", "Turin", "Vaduz", "Zagreb", "Accra", "Baku", "Bern"]


def start(args, *extra):
    server = subprocess.Popen(
        [FERRY, "serve", "--model", args.model, "--port", "0", "--parallel", "24", "--ctx-size", "1024",
         "--threads", str(args.threads), "--data-dir", tempfile.mkdtemp(prefix="ferry-bench-"), "--no-metering",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = re.search(r"(http://\S+)", server.stdout.readline()).group(1)
    return server, url


def conversation(rotation):
    """The 19 facts rotated by `rotation` (a prompt no earlier run has sent), then the question."""
    pairs = list(zip(NAMES, CITIES))
    pairs = pairs[rotation % len(pairs):] + pairs[:rotation % len(pairs)]
    facts = " ".join(f"{n} lives in {c}." for n, c in pairs)
    return [{"role": "user", "content": f"{facts} Where does Niaj live?"}]


def timed(server, fn):
    """Wall seconds and the server's CPU seconds (utime + stime) spent on `fn`'s request."""
    t, cpu = time.perf_counter(), cpu_seconds(server.pid)
    result = fn()
    return (time.perf_counter() - t, cpu_seconds(server.pid) - cpu), result


def explain(url, model, messages, completion, method):
    r = httpx.post(url + "/v1/explanations", json={
        "model": model, "messages": messages, "completion": completion, "granularity": "sentence",
        "occlusion": method}, timeout=300)
    r.raise_for_status()
    return r.json()


def report(phase, gen, exp, bodies, methods):
    """Medians of wall and server CPU time; each ratio is the median of the runs' own ratios
    (a run's explanation against the generation just before it)."""
    wall, cpu = statistics.median(g[0] for g in gen), statistics.median(g[1] for g in gen)
    print(f"{phase}: generation median {wall * 1000:7.1f} ms wall, {cpu * 1000:7.1f} ms server CPU "
          f"over {len(gen)} runs")
    for method in methods:
        runs, body = exp[method], bodies[method]
        e_wall, e_cpu = statistics.median(e[0] for e in runs), statistics.median(e[1] for e in runs)
        r_wall = statistics.median(e[0] / g[0] for e, g in zip(runs, gen))
        r_cpu = statistics.median(e[1] / g[1] for e, g in zip(runs, gen))
        top = max(body["segments"], key=lambda s: s["score"])
        print(f"  explanation ({method:6}) {e_wall * 1000:7.1f} ms wall = {r_wall:5.2f}x, "
              f"{e_cpu * 1000:7.1f} ms CPU = {r_cpu:5.2f}x generation (target <= 3x); "
              f"{body['variants']} sequences, {body['computed_tokens']} tokens computed "
              f"({body.get('cached_tokens', 0)} cached), {body['engine_steps']} engine steps; "
              f"top: {top['text']!r} (share {top['share']:.2f})")


def cold(args):
    """No prefix cache: the generation and each explanation compute their whole prompt."""
    server, url = start(args)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        messages = conversation(0)
        # The completion: what the model itself answers.
        answer = httpx.post(url + "/v1/chat/completions", json={
            "model": model, "messages": messages, "max_tokens": 24, "temperature": 0}, timeout=300).json()
        completion = answer["choices"][0]["message"]["content"]
        n_tokens = answer["usage"]["completion_tokens"]
        print(f"model {model}; prompt {answer['usage']['prompt_tokens']} tokens, 20 sentences; "
              f"completion {n_tokens} tokens: {completion!r}")
        gen, exp, bodies = [], {m: [] for m in args.occlusion}, {}
        for _ in range(args.runs):
            elapsed, r = timed(server, lambda: httpx.post(url + "/v1/chat/completions", json={
                "model": model, "messages": messages, "max_tokens": n_tokens, "temperature": 0,
                "ignore_eos": True}, timeout=300))
            r.raise_for_status()
            gen.append(elapsed)
            for method in args.occlusion:
                elapsed, bodies[method] = timed(server, lambda: explain(url, model, messages, completion, method))
                exp[method].append(elapsed)
        report("cold (no prefix cache)", gen, exp, bodies, args.occlusion)
        return n_tokens
    finally:
        server.terminate()
        server.wait(timeout=30)


def warm(args, n_tokens):
    """With `--prefix-cache`, as a user explains an answer just generated: each run generates
    the answer to a prompt no earlier run sent (its facts rotated), then explains it; the
    explanation's base starts from the generation's cached cells."""
    server, url = start(args, "--prefix-cache")
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        gen, exp, bodies = [], {m: [] for m in args.occlusion}, {}
        for run in range(args.runs):
            messages = conversation(run + 1)
            # As many tokens as the cold phase's completion, so that the ratios compare.
            elapsed, r = timed(server, lambda: httpx.post(url + "/v1/chat/completions", json={
                "model": model, "messages": messages, "max_tokens": n_tokens, "temperature": 0,
                "ignore_eos": True}, timeout=300))
            r.raise_for_status()
            gen.append(elapsed)
            completion = r.json()["choices"][0]["message"]["content"]
            for method in args.occlusion:
                elapsed, bodies[method] = timed(server, lambda: explain(url, model, messages, completion, method))
                exp[method].append(elapsed)
        report("warm (--prefix-cache, right after the generation)", gen, exp, bodies, args.occlusion)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--occlusion", nargs="+", default=["mask", "remove"], choices=["mask", "remove"])
    p.add_argument("--phase", nargs="+", default=["cold", "warm"], choices=["cold", "warm"])
    args = p.parse_args()
    n_tokens = cold(args) if "cold" in args.phase else 13
    if "warm" in args.phase:
        warm(args, n_tokens)


if __name__ == "__main__":
    main()
