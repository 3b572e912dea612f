#!/usr/bin/env python3
"""Ferry's engine against llama.cpp's own llama-bench, and Ferry's aggregate decode
throughput through the HTTP API at several concurrencies.

Both engines run the same GGUF file with the same thread count, in one run, and the script
prints ratios (the machines are shared and noisy: absolute numbers mean little, ratios taken
side by side mean more).

    bench/build-peers.sh                       # llama-bench + llama-server from the same llama.cpp
    cargo build --release
    python3 bench/engine_bench.py [--model models/X.gguf] [--threads 2] [--concurrency 1,4,16]
"""
import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx

from procstat import peak_rss_mb

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FERRY = os.environ.get("FERRY_BIN", os.path.join(ROOT, "target", "release", "ferry"))
# LLAMA_BIN_DIR: peers built elsewhere (bench/gpu-bench.sh's CUDA build).
PEERS = os.environ.get("LLAMA_BIN_DIR", os.path.join(ROOT, "bench", "peers", "bin"))
LLAMA_BENCH = os.path.join(PEERS, "llama-bench")
LLAMA_BATCHED_BENCH = os.path.join(PEERS, "llama-batched-bench")


def llama_bench(model, threads, prompt, gen, reps):
    out = subprocess.run(
        [LLAMA_BENCH, "-m", model, "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", str(reps), "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)["avg_ts"]
    tg = next(r for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)["avg_ts"]
    return pp, tg


def llama_batched_bench(model, threads, gen, concurrencies):
    """Aggregate decode of N sequences generating together (1-token prompts), by llama.cpp."""
    out = subprocess.run(
        [LLAMA_BATCHED_BENCH, "-m", model, "-t", str(threads), "-c", str((gen + 2) * max(concurrencies)),
         "-b", "512", "-ub", "512", "-npp", "1", "-ntg", str(gen), "-npl", ",".join(map(str, concurrencies)),
         "--output-format", "jsonl"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return {r["pl"]: r["speed_tg"] for r in rows}


def ferry_bench(model, threads, prompt, gen, reps, concurrencies):
    out = subprocess.run(
        [FERRY, "bench", "-m", model, "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", str(reps),
         "--concurrent", ",".join(map(str, concurrencies))],
        capture_output=True, text=True, check=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    aggregate = {int(k): v for k, v in r["aggregate_decode_tokens_per_s"].items()}
    return r["prefill_tokens_per_s"], r["decode_tokens_per_s"], aggregate


def http_throughput(model, threads, concurrencies, gen):
    proc = subprocess.Popen(
        [FERRY, "serve", "--port", "0", "--model", model, "--threads", str(threads),
         "--parallel", str(max(concurrencies)), "--ctx-size", "1024"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        url = re.search(r"(http://\S+)", proc.stdout.readline()).group(1)
        model_id = os.path.basename(model)[: -len(".gguf")]
        results = {}

        def one(i):
            body = {"model": model_id, "stream": True, "max_tokens": gen, "ignore_eos": True, "temperature": 0.8,
                    "seed": i, "messages": [{"role": "user", "content": f"Tell me a long story about ship number {i}."}],
                    "stream_options": {"include_usage": True}}
            tokens = 0
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    # Parse only the usage chunk: the client shares the machine's two cores.
                    if '"usage":{' in line:
                        tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            return tokens

        one(0)  # warm-up
        for c in concurrencies:
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                tokens = sum(pool.map(one, range(c)))
            elapsed = time.perf_counter() - start
            results[c] = tokens / elapsed
        results["peak_rss_mb"] = peak_rss_mb(proc.pid)
        return results
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--concurrency", default="1,4,16")
    args = p.parse_args()
    for path in (FERRY, LLAMA_BENCH, LLAMA_BATCHED_BENCH):
        if not os.path.exists(path):
            sys.exit(f"missing {path}: see the docstring")
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    # Alternate the two engines so a noisy neighbour hurts both alike.
    lb_pp, lb_tg = llama_bench(args.model, args.threads, args.prompt, args.gen, args.reps)
    f_pp, f_tg, f_agg = ferry_bench(args.model, args.threads, args.prompt, args.gen, args.reps, concurrencies)
    lb_pp2, lb_tg2 = llama_bench(args.model, args.threads, args.prompt, args.gen, args.reps)
    lb_pp, lb_tg = (lb_pp + lb_pp2) / 2, (lb_tg + lb_tg2) / 2
    lbb = llama_batched_bench(args.model, args.threads, args.gen, concurrencies)
    print(f"model {os.path.basename(args.model)}, {args.threads} threads")
    print(f"{'':24}{'llama-bench':>14}{'ferry':>14}{'ratio':>8}")
    print(f"{'prompt ' + str(args.prompt) + ' (tok/s)':24}{lb_pp:14.1f}{f_pp:14.1f}{f_pp / lb_pp:8.2f}")
    print(f"{'decode ' + str(args.gen) + ' (tok/s)':24}{lb_tg:14.1f}{f_tg:14.1f}{f_tg / lb_tg:8.2f}")

    print(f"\nengine, aggregate decode of N sequences together ({args.gen} tokens each)")
    print(f"{'sequences':>10}{'llama-batched':>15}{'ferry':>10}{'ratio':>8}{'ferry vs 1':>12}")
    for c in concurrencies:
        print(f"{c:>10}{lbb[c]:15.1f}{f_agg[c]:10.1f}{f_agg[c] / lbb[c]:8.2f}{f_agg[c] / f_agg[concurrencies[0]]:12.2f}")

    http = http_throughput(args.model, args.threads, concurrencies, args.gen)
    peak = http.pop("peak_rss_mb")
    base = http[concurrencies[0]]
    print(f"\nHTTP API, aggregate decode ({args.gen} tokens per stream)")
    print(f"{'streams':>8}{'tok/s':>12}{'vs 1 stream':>14}")
    for c, tps in http.items():
        print(f"{c:>8}{tps:12.1f}{tps / base:14.2f}")
    print(f"peak RSS of the server: {peak:.0f} MB")


if __name__ == "__main__":
    main()
