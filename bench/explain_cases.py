#!/usr/bin/env python3
"""Per-case scores behind the explanation faithfulness test: for each of the ten cases of
tests/api/test_explanations.py (three facts and a question, one fact holding the answer),
each sentence's score under each occlusion method, whether the fact's sentence scored
highest, and the count. Shows *where* a method misses, which the test's pass/fail does not.

With `--generated N`, N more cases made from templates with a fixed seed (three to five facts
of one kind, the asked-for fact at any position, varied names and values) instead: whether
the ten hand-made cases are representative. Only misses are printed then.

    cargo build --release --bin ferry
    python3 bench/explain_cases.py [--model smollm2|qwen] [--occlusion remove mask] [--generated 60]
"""
import argparse
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "api"))
from conftest import MODEL_ID, Server  # noqa: E402
from test_explanations import CASES, QWEN_FILE, QWEN_ID, explain  # noqa: E402


NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Lena", "Omar", "Priya",
         "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Yuki", "Zane"]
KINDS = [
    # (fact, question, answer): {n} a name, {v} a value of the kind
    ("{n} lives in {v}.", "Where does {n} live?", "{v}",
     ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Perth", "Riga", "Sofia"]),
    ("{n} works as a {v}.", "What does {n} do?", "A {v}",
     ["nurse", "chef", "pilot", "baker", "farmer", "lawyer", "plumber", "teacher", "dentist", "painter"]),
    ("{n}'s favourite fruit is the {v}.", "What is {n}'s favourite fruit?", "The {v}",
     ["mango", "pear", "plum", "kiwi", "lemon", "cherry", "melon", "peach", "apricot", "lime"]),
    ("{n} drives a {v} car.", "What colour is {n}'s car?", "{V}",
     ["red", "blue", "green", "yellow", "black", "white", "silver", "orange", "purple", "brown"]),
    ("{n} plays the {v}.", "What does {n} play?", "The {v}",
     ["violin", "drums", "flute", "piano", "cello", "guitar", "harp", "trumpet", "banjo", "oboe"]),
]


def generated(n, seed=7):
    """`n` cases from the templates: (facts, question, index of the fact, answer)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        fact, question, answer, values = rng.choice(KINDS)
        k = rng.randint(3, 5)
        names, picked = rng.sample(NAMES, k), rng.sample(values, k)
        at = rng.randrange(k)
        facts = " ".join(fact.format(n=a, v=v) for a, v in zip(names, picked))
        v = picked[at]
        cases.append((facts, question.format(n=names[at]), at, answer.format(v=v, V=v.capitalize())))
    return cases


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["smollm2", "qwen"], default="smollm2")
    p.add_argument("--occlusion", nargs="+", default=["remove", "mask"])
    p.add_argument("--generated", type=int, default=0, help="this many template cases instead of the test's ten")
    args = p.parse_args()
    cases = generated(args.generated) if args.generated else CASES
    if args.model == "qwen":
        server, model = Server("--model", QWEN_FILE, "--parallel", "8", "--ctx-size", "512", model=False), QWEN_ID
    else:
        server, model = Server("--parallel", "8", "--ctx-size", "512"), MODEL_ID
    try:
        for method in args.occlusion:
            hits = 0
            for facts, question, fact, answer in cases:
                r = explain(server.url, model, f"{facts} {question}", answer, occlusion=method)
                r.raise_for_status()
                scores = [s["score"] for s in r.json()["segments"]]
                best = max(range(len(scores)), key=scores.__getitem__)
                hits += best == fact
                if args.generated and best == fact:
                    continue
                print(f"{method:6s} fact {fact} best {best} {'ok ' if best == fact else 'MISS'} "
                      + " ".join(f"{s:7.3f}" for s in scores) + f"   {question} -> {answer}")
            print(f"{method}: the fact's sentence scored highest in {hits} of {len(cases)} cases\n")
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
