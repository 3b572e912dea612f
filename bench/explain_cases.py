#!/usr/bin/env python3
"""Per-case scores behind the explanation faithfulness test: for each of the ten cases of
tests/api/test_explanations.py (three facts and a question, one fact holding the answer),
each sentence's score under each occlusion method, whether the fact's sentence scored
highest, and the count. Shows *where* a method misses, which the test's pass/fail does not.

    cargo build --release --bin ferry
    python3 bench/explain_cases.py [--model smollm2|qwen] [--occlusion remove mask]
"""
import argparse
import os
import sys

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "api"))
from conftest import MODEL_ID, Server  # noqa: E402
from test_explanations import CASES, QWEN_FILE, QWEN_ID  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["smollm2", "qwen"], default="smollm2")
    p.add_argument("--occlusion", nargs="+", default=["remove", "mask"])
    args = p.parse_args()
    if args.model == "qwen":
        server, model = Server("--model", QWEN_FILE, "--parallel", "8", "--ctx-size", "512", model=False), QWEN_ID
    else:
        server, model = Server("--parallel", "8", "--ctx-size", "512"), MODEL_ID
    try:
        for method in args.occlusion:
            hits = 0
            for facts, question, fact, answer in CASES:
                r = httpx.post(server.url + "/v1/explanations", json={
                    "model": model, "messages": [{"role": "user", "content": f"{facts} {question}"}],
                    "completion": answer, "granularity": "sentence", "occlusion": method}, timeout=300)
                r.raise_for_status()
                scores = [s["score"] for s in r.json()["segments"]]
                best = max(range(len(scores)), key=scores.__getitem__)
                hits += best == fact
                print(f"{method:6s} fact {fact} best {best} {'ok ' if best == fact else 'MISS'} "
                      + " ".join(f"{s:7.3f}" for s in scores) + f"   {question} -> {answer}")
            print(f"{method}: the fact's sentence scored highest in {hits} of {len(CASES)} cases\n")
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
