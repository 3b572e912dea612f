#!/usr/bin/env python3
"""Records Hugging Face's rendering of each test model's chat template.

Run once (needs `pip install transformers gguf jinja2`; no torch) after
scripts/fetch-models.py; writes crates/engine/tests/data/chat_templates.json, which the
engine's template test compares against. The template text is read from the GGUF metadata
and rendered with transformers' own `render_jinja_template` (what `apply_chat_template` calls).
"""
import json
import os
import sys

import gguf
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen2.5": "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Name three colours.  "},
    ],
    [{"role": "user", "content": "Übersetze: 你好，世界 🌍"}],
    [
        {"role": "system", "content": "Line one.\nLine two."},
        {"role": "user", "content": "Say {{ not a template }} and {% raw %}"},
    ],
]


def field(reader, key):
    f = reader.fields[key]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(value[0])


def token(reader, key):
    tokens = reader.fields["tokenizer.ggml.tokens"]
    idx = field(reader, key)
    return bytes(tokens.parts[tokens.data[idx]]).decode()


out = []
for name, file in MODELS.items():
    path = os.path.join(ROOT, "models", file)
    if not os.path.exists(path):
        sys.exit(f"missing {path}: run scripts/fetch-models.py first")
    reader = gguf.GGUFReader(path)
    template = field(reader, "tokenizer.chat_template")
    bos = token(reader, "tokenizer.ggml.bos_token_id") if "tokenizer.ggml.bos_token_id" in reader.fields else ""
    eos = token(reader, "tokenizer.ggml.eos_token_id")
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos,
                eos_token=eos,
            )
            out.append({
                "model": file,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "rendered": rendered[0],
            })

dest = os.path.join(ROOT, "crates", "engine", "tests", "data", "chat_templates.json")
with open(dest, "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
print(f"wrote {len(out)} renderings to {dest}")
