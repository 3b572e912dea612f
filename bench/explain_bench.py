#!/usr/bin/env python3
"""Cost of an explanation against one generation of the same completion, side by side on one
server: a prompt of 20 sentences (19 facts and a question), the completion generated once with
`max_tokens` equal to its length, then explained at sentence granularity (the full
conversation and 20 variants) with each occlusion method asked for. Prints the median wall
time of each over --runs (interleaved in every run) and the ratio of each explanation to the
generation.

    cargo build --release --bin ferry
    python3 bench/explain_bench.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--runs 5]
        [--occlusion mask remove]
"""
import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time

import httpx

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FERRY = os.path.join(ROOT, "target", "release", "ferry")
NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Niaj",
         "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Perth", "Porto", "Riga",
          "Sofia", "Turin", "Vaduz", "Zagreb", "Accra", "Baku", "Bern"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--occlusion", nargs="+", default=["mask", "remove"], choices=["mask", "remove"])
    args = p.parse_args()
    server = subprocess.Popen(
        [FERRY, "serve", "--model", args.model, "--port", "0", "--parallel", "24", "--ctx-size", "1024",
         "--threads", str(args.threads), "--data-dir", tempfile.mkdtemp(prefix="ferry-bench-"), "--no-metering"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = re.search(r"(http://\S+)", server.stdout.readline()).group(1)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        facts = " ".join(f"{n} lives in {c}." for n, c in zip(NAMES, CITIES))
        content = f"{facts} Where does Niaj live?"
        messages = [{"role": "user", "content": content}]
        # The completion: what the model itself answers.
        answer = httpx.post(url + "/v1/chat/completions", json={
            "model": model, "messages": messages, "max_tokens": 24, "temperature": 0}, timeout=300).json()
        completion = answer["choices"][0]["message"]["content"]
        n_tokens = answer["usage"]["completion_tokens"]
        gen, exp, bodies = [], {m: [] for m in args.occlusion}, {}
        for _ in range(args.runs):
            t = time.perf_counter()
            httpx.post(url + "/v1/chat/completions", json={
                "model": model, "messages": messages, "max_tokens": n_tokens, "temperature": 0,
                "ignore_eos": True}, timeout=300).raise_for_status()
            gen.append(time.perf_counter() - t)
            for method in args.occlusion:
                t = time.perf_counter()
                r = httpx.post(url + "/v1/explanations", json={
                    "model": model, "messages": messages, "completion": completion, "granularity": "sentence",
                    "occlusion": method}, timeout=300)
                r.raise_for_status()
                exp[method].append(time.perf_counter() - t)
                bodies[method] = r.json()
        g = statistics.median(gen)
        print(f"model {model}; prompt {answer['usage']['prompt_tokens']} tokens, 20 sentences; "
              f"completion {n_tokens} tokens: {completion!r}")
        print(f"generation  median {g * 1000:8.1f} ms over {args.runs} runs")
        for method in args.occlusion:
            e, body = statistics.median(exp[method]), bodies[method]
            top = max(body["segments"], key=lambda s: s["score"])
            print(f"explanation ({method:6}) median {e * 1000:8.1f} ms = {e / g:5.2f}x generation (target <= 3x); "
                  f"{body['variants']} sequences, {body.get('computed_tokens', '?')} tokens computed, "
                  f"{body['engine_steps']} engine steps; top: {top['text']!r} (share {top['share']:.2f})")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
