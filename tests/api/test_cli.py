"""The `ferry` command line: clear messages when a model is missing, settings from a TOML
file and environment variables, and `ferry models`."""
import os
import subprocess

from conftest import BINARY, MODEL_FILE, MODELS_DIR, Server


def run(*args, env=None, timeout=60):
    return subprocess.run([BINARY, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_serve_help_shows_the_defaults():
    r = run("serve", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for flag, default in [("--port", "8080"), ("--ctx-size", "4096"), ("--parallel", "8"), ("--max-queue", "256"),
                          ("--batch-size", "512"), ("--gpu-layers", "all"), ("--cors-origin", "loopback")]:
        after = text[text.index(flag):]
        assert f"[default: {default}" in after[:400], f"{flag}: {after[:400]}"


def test_missing_default_model_says_how_to_fetch_it(tmp_path):
    r = run("serve", "--models-dir", str(tmp_path), "--port", "0")
    assert r.returncode != 0
    assert "python3 scripts/fetch-models.py smollm2" in r.stderr
    assert str(tmp_path) in r.stderr


def test_missing_model_path_is_named(tmp_path):
    r = run("serve", "--model", str(tmp_path / "nope.gguf"), "--port", "0")
    assert r.returncode != 0
    assert "nope.gguf does not exist" in r.stderr


def test_hub_download_failure_is_clear(tmp_path):
    # Port 9 on loopback refuses connections: the same path as a machine without internet.
    r = run(
        "serve", "--model", "hf:someone/some-repo/model.Q4_K_M.gguf", "--models-dir", str(tmp_path), "--port", "0",
        env={"HF_ENDPOINT": "http://127.0.0.1:9"},
    )
    assert r.returncode != 0
    assert "could not download model.Q4_K_M.gguf from the Hugging Face hub" in r.stderr
    assert "http://127.0.0.1:9/someone/some-repo/resolve/main/model.Q4_K_M.gguf" in r.stderr
    assert "--model" in r.stderr
    assert not list(tmp_path.rglob("*.gguf"))


def test_config_file_and_environment(tmp_path):
    config = tmp_path / "ferry.toml"
    config.write_text(f'models = ["{MODEL_FILE}"]\nparallel = 3\nctx_size = 512\n')
    s = Server("--config", str(config), env={"FERRY_PARALLEL": "2"})
    try:
        model = s.client().models.list().data[0]
        assert model.model_extra["context_length"] == 512  # from the file
        assert model.model_extra["parallel_sequences"] == 2  # the environment beats the file
    finally:
        s.stop()


def test_bad_config_is_rejected(tmp_path):
    config = tmp_path / "ferry.toml"
    config.write_text("parallel = 2\nbogus_key = 1\n")
    r = run("serve", "--config", str(config))
    assert r.returncode != 0
    assert "bogus_key" in r.stderr


def test_models_lists_files_with_facts():
    r = run("models", "--dir", MODELS_DIR)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("SmolLM2-135M-Instruct.Q4_1"))
    assert "llama" in line and "Q4_1" in line and "135M" in line
    assert "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in line


def test_a_listing_piped_to_a_reader_that_stops_ends_quietly():
    # As `ferry models | head -0`: the reader is gone before the first line is written.
    proc = subprocess.Popen([BINARY, "models", "--dir", MODELS_DIR, "--no-hash"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, stderr
    assert "panicked" not in stderr and "Broken pipe" not in stderr, stderr


def test_chat_against_a_running_server(server):
    r = subprocess.run(
        [BINARY, "chat", "--url", server.url, "--temperature", "0", "--max-tokens", "12"],
        input="What is the capital of France?\n/exit\n", capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "Chatting with SmolLM2-135M-Instruct.Q4_1" in r.stderr
    assert len(r.stdout.strip()) > 0


def test_chat_with_a_local_model():
    r = subprocess.run(
        [BINARY, "chat", "--model", MODEL_FILE, "--temperature", "0", "--max-tokens", "12"],
        input="Hello!\n/reset\nName a colour.\n", capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2, r.stdout


def test_sigterm_lets_a_stream_in_flight_finish():
    import json
    import signal as signals

    import httpx

    from conftest import MODEL_ID, Server

    s = Server("--parallel", "2", "--shutdown-grace-s", "60")
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 60,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(l for l in lines if l.startswith("data: "))
            s.proc.send_signal(signals.SIGTERM)
            rest = [l for l in lines if l.startswith("data: ")]
        assert json.loads(first[6:])["object"] == "chat.completion.chunk"
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 60
        assert s.proc.wait(timeout=60) == 0
    finally:
        s.stop()


def test_json_logs():
    import json

    from conftest import Server

    s = Server("--parallel", "1", "--log-format", "json")
    s.stop()
    lines = [l for l in open(s.log.name).read().splitlines() if l.startswith("{")]
    assert lines, "no JSON log lines"
    # (A line written before the address is printed: the test stops the server at once.)
    assert any(json.loads(l)["fields"].get("message") == "tenancy ready" for l in lines)
