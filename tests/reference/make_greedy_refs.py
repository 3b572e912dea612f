#!/usr/bin/env python3
"""Records greedy continuations from llama.cpp's own llama-server, built by
bench/build-peers.sh from the same llama.cpp source Ferry's engine vendors.

For each prompt the token ids come from llama-server's /tokenize, the continuation from
/completion with temperature 0 and `return_tokens`. Writes
crates/engine/tests/data/greedy_reference.json, which the engine test compares against.
Run once: python3 tests/reference/make_greedy_refs.py
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SERVER = os.path.join(ROOT, "bench", "peers", "bin", "llama-server")
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_PREDICT = 32
PROMPTS = {
    "chat-capital": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "chat-colours": "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
    "text-story": "Once upon a time, in a small village by the sea,",
    "text-code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "text-list": "The planets of the solar system are Mercury,",
}


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def main():
    if not os.path.exists(SERVER):
        sys.exit("build llama-server first: bench/build-peers.sh")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [SERVER, "-m", os.path.join(ROOT, "models", MODEL), "--port", str(port), "-t", "2", "-c", "2048", "-np", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.5)
        out = []
        for name, text in PROMPTS.items():
            # Chat prompts carry special tokens as text; plain text gets the vocabulary's BOS rule.
            tokens = post(base + "/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]
            result = post(base + "/completion", {
                "prompt": tokens, "n_predict": N_PREDICT, "temperature": 0, "top_k": 1,
                "return_tokens": True, "cache_prompt": False, "samplers": ["top_k"],
            })
            out.append({"name": name, "model": MODEL, "prompt": text, "prompt_tokens": tokens,
                        "tokens": result["tokens"], "text": result["content"]})
            print(name, repr(result["content"][:60]))
    finally:
        proc.terminate()
        proc.wait()
    dest = os.path.join(ROOT, "crates", "engine", "tests", "data", "greedy_reference.json")
    with open(dest, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
