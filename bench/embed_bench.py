#!/usr/bin/env python3
"""Ferry's /v1/embeddings against sentence-transformers on torch (CPU), side by side in one run.

The same model directory (all-MiniLM-L6-v2, safetensors), the same sentences (fixed seed,
8-40 words each) and the same thread count for both. Embeddings per second at batch sizes 1
and 32: one request of one sentence at a time, and one request of 32 sentences at a time
(Ferry through HTTP with the float format; sentence-transformers calling `encode` in-process,
which spares it the HTTP round trip). Also the peak RSS of the Ferry server (VmHWM from /proc)
and of the Python process holding torch.

    python3 scripts/fetch-models.py minilm && cargo build --release
    python3 -m venv /tmp/st-venv && /tmp/st-venv/bin/pip install sentence-transformers httpx
    /tmp/st-venv/bin/python bench/embed_bench.py [--threads 2] [--seconds 10]
"""
import argparse
import os
import random
import re
import resource
import signal
import subprocess
import tempfile
import time

import httpx

from procstat import peak_rss_mb

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FERRY = os.environ.get("FERRY_BIN", os.path.join(ROOT, "target", "release", "ferry"))
MODEL_DIR = os.path.join(ROOT, "models", "all-MiniLM-L6-v2")
WORDS = ("the a ship harbour storm light keeper night sea wave rock boat sailor wind rain fog bell "
         "island coast tide map star lamp rope anchor gull shore cliff deck mast sail north south "
         "quiet loud old young red blue green cold warm far near slow fast").split()


def sentences(seed, n):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "." for _ in range(n)]


def rate(fn, batches, seconds):
    """Embeddings per second of `fn` over `batches`, cycling for at least `seconds`."""
    fn(batches[0])  # warm-up
    done, i, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < seconds or i < len(batches):
        batch = batches[i % len(batches)]
        fn(batch)
        done += len(batch)
        i += 1
    return done / (time.perf_counter() - started)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--batch-sizes", default="1,32")
    args = p.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    texts = sentences(3, 32 * 8)

    ferry = subprocess.Popen(
        [FERRY, "serve", "--port", "0", "--embedding-model", MODEL_DIR, "--threads", str(args.threads),
         "--data-dir", tempfile.mkdtemp(prefix="ferry-embed-bench-"), "--no-metering"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "RAYON_NUM_THREADS": str(args.threads)})
    results = {}
    try:
        url = re.search(r"(http://\S+)", ferry.stdout.readline()).group(1)
        with httpx.Client(base_url=url, timeout=300) as client:
            def embed(batch):
                r = client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": batch,
                                                         "encoding_format": "float"})
                r.raise_for_status()

            for b in sizes:
                batches = [texts[i:i + b] for i in range(0, len(texts), b)]
                results[("ferry", b)] = rate(embed, batches, args.seconds)
        ferry_rss = peak_rss_mb(ferry.pid)
    finally:
        ferry.send_signal(signal.SIGTERM)
        ferry.wait()

    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(MODEL_DIR, device="cpu")
    for b in sizes:
        batches = [texts[i:i + b] for i in range(0, len(texts), b)]
        results[("st", b)] = rate(lambda batch: model.encode(batch, batch_size=b), batches, args.seconds)
    st_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"all-MiniLM-L6-v2, {args.threads} threads, torch {torch.__version__}")
    print(f"{'batch':>6}{'ferry emb/s':>14}{'s-t emb/s':>12}{'ratio':>8}")
    for b in sizes:
        f, s = results[("ferry", b)], results[("st", b)]
        print(f"{b:>6}{f:14.1f}{s:12.1f}{f / s:8.2f}")
    print(f"peak RSS: ferry server {ferry_rss:.0f} MB, python with sentence-transformers {st_rss:.0f} MB")


if __name__ == "__main__":
    main()
