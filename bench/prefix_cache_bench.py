#!/usr/bin/env python3
"""Time to first token of a growing multi-turn chat with and without `--prefix-cache`, side by
side in one run: two servers on the same model, each turn sent to both in alternation (a long
shared system prompt, then the conversation grows by one question and answer per turn).
Prints the median first-token time per turn of each server, their ratio and the
`cached_tokens` the cached server reported.

    cargo build --release
    python3 bench/prefix_cache_bench.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--runs 3]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time

import httpx

from procstat import peak_rss_mb

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FERRY = os.environ.get("FERRY_BIN", os.path.join(ROOT, "target", "release", "ferry"))
SYSTEM = ("You are the support assistant of a company that rents bicycles in a large city. Answer in one "
          "short sentence, politely, without lists. ") * 8
QUESTIONS = ["How much is a bike for a day?", "Do you have child seats?", "Can I return it at another station?",
             "What if it rains?", "Are helmets included?", "Can I pay by card?"]


def start(args, *extra):
    server = subprocess.Popen(
        [FERRY, "serve", "--model", args.model, "--port", "0", "--parallel", "2", "--ctx-size", "2048",
         "--threads", str(args.threads), "--data-dir", tempfile.mkdtemp(prefix="ferry-bench-"), "--no-metering",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = re.search(r"(http://\S+)", server.stdout.readline()).group(1)
    return server, url


def turn(url, model, messages):
    """(seconds to the first content chunk, the answer, cached prompt tokens)"""
    body = {"model": model, "messages": messages, "max_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started, first, text, cached = time.perf_counter(), None, "", 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - started
                    text += choice["delta"]["content"]
            usage = chunk.get("usage") or {}
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached)
    return first, text, cached


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    plain, plain_url = start(args)
    cache, cache_url = start(args, "--prefix-cache")
    try:
        model = httpx.get(plain_url + "/v1/models").json()["data"][0]["id"]
        times = {"plain": [[] for _ in QUESTIONS], "cache": [[] for _ in QUESTIONS]}
        cached_tokens = [0] * len(QUESTIONS)
        for _ in range(args.runs):
            chats = {"plain": [{"role": "system", "content": SYSTEM}], "cache": [{"role": "system", "content": SYSTEM}]}
            for i, question in enumerate(QUESTIONS):
                for name, url in (("plain", plain_url), ("cache", cache_url)):
                    chats[name].append({"role": "user", "content": question})
                    first, answer, cached = turn(url, model, chats[name])
                    chats[name].append({"role": "assistant", "content": answer})
                    times[name][i].append(first)
                    if name == "cache":
                        cached_tokens[i] = cached
        print(f"model {model}; {len(QUESTIONS)} turns after a shared system prompt; median of {args.runs} runs")
        print(" turn   no cache ms   --prefix-cache ms   ratio   cached tokens")
        for i in range(len(QUESTIONS)):
            a, b = statistics.median(times["plain"][i]), statistics.median(times["cache"][i])
            print(f"{i + 1:5d}   {a * 1000:11.1f}   {b * 1000:17.1f}   {b / a:5.2f}   {cached_tokens[i]:13d}")
        print(f"peak RSS: no cache {peak_rss_mb(plain.pid):.0f} MB, --prefix-cache {peak_rss_mb(cache.pid):.0f} MB")
    finally:
        for server in (plain, cache):
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
