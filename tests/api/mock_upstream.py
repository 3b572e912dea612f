"""A mock OpenAI-compatible upstream on 127.0.0.1, port 0, speaking OpenAI's real wire
format (chat completions, plain and SSE, with tool calls and usage; legacy text completions
with echo, logprobs and several prompts). Tests script its
answers and read back the requests it received. Only the network edge Ferry doesn't own
is mocked here."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MockUpstream:
    """dialect: "openai" (POST .../v1/chat/completions), "anthropic" (POST /v1/messages) or
    "gemini" (POST /v1beta/models/M:generateContent and :streamGenerateContent?alt=sse)."""

    def __init__(self, dialect="openai"):
        self.requests = []  # (headers, body) as received
        self.paths = []  # the path of each request, in the same order
        # per request: ("error", status, body, headers), ("ok", text or tool call), ("sleep", s)
        # or ("json", text): a plain JSON answer even to a stream request
        self.script = []
        self.default = ("ok", "Hello from the mock.")
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                mock.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                mock.paths.append(self.path)
                step = mock.script.pop(0) if mock.script else mock.default
                if step[0] == "error":
                    _, status, payload, headers = step
                    data = b"" if payload is None else json.dumps(payload).encode()
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if step[0] == "json":
                    # A server that ignores `stream` and answers plain JSON.
                    self.plain(body, ("ok", step[1]))
                    return
                if step[0] == "sleep":
                    time.sleep(step[1])
                    step = ("ok", "slow")
                if dialect == "gemini":
                    body["_path"] = self.path
                    streaming = ":streamGenerateContent" in self.path
                    (self.gemini_stream if streaming else self.gemini_plain)(body, step)
                elif dialect == "anthropic":
                    (self.anthropic_stream if body.get("stream") else self.anthropic_plain)(body, step)
                elif self.path.endswith("/v1/completions"):
                    (self.text_stream if body.get("stream") else self.text_plain)(body, step)
                elif body.get("stream"):
                    self.stream(body, step)
                else:
                    self.plain(body, step)

            def send_json(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def gemini_candidate(self, step, finish=True):
                if step[0] == "tool":
                    parts = [{"functionCall": {"name": step[1], "args": step[2]}}]
                else:
                    parts = [{"text": step[1]}]
                candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
                if finish:
                    candidate["finishReason"] = "STOP"
                return candidate

            def gemini_plain(self, body, step):
                self.send_json({"candidates": [self.gemini_candidate(step)],
                                "usageMetadata": {"promptTokenCount": 17, "candidatesTokenCount": 6, "totalTokenCount": 23},
                                "modelVersion": "gemini-mock-001", "responseId": "resp-mock"})

            def gemini_stream(self, body, step):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()

                def send(obj):
                    self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\r\n\r\n")
                    self.wfile.flush()

                usage = {"promptTokenCount": 17, "candidatesTokenCount": 6, "totalTokenCount": 23}
                if step[0] == "tool":
                    send({"candidates": [self.gemini_candidate(step)], "usageMetadata": usage, "modelVersion": "gemini-mock-001"})
                    return
                words = step[1].split(" ")
                for i, word in enumerate(words):
                    last = i == len(words) - 1
                    chunk = {"candidates": [self.gemini_candidate(("ok", word + ("" if last else " ")), finish=last)],
                             "modelVersion": "gemini-mock-001"}
                    if last:
                        chunk["usageMetadata"] = usage
                    send(chunk)

            def anthropic_plain(self, body, step):
                if step[0] == "tool":
                    content = [{"type": "tool_use", "id": "toolu_1", "name": step[1], "input": step[2]}]
                    stop = "tool_use"
                else:
                    content = [{"type": "text", "text": step[1]}]
                    stop = "end_turn"
                self.send_json({"id": "msg_mock", "type": "message", "role": "assistant", "model": body["model"],
                                "content": content, "stop_reason": stop, "stop_sequence": None,
                                "usage": {"input_tokens": 13, "output_tokens": 5}})

            def anthropic_stream(self, body, step):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()

                def send(name, obj):
                    obj = {"type": name, **obj}
                    self.wfile.write(f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode())
                    self.wfile.flush()

                send("message_start", {"message": {"id": "msg_mock", "type": "message", "role": "assistant",
                                                   "model": body["model"], "content": [], "stop_reason": None,
                                                   "stop_sequence": None, "usage": {"input_tokens": 13, "output_tokens": 1}}})
                if step[0] == "tool":
                    send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                    send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Let me check."}})
                    send("content_block_stop", {"index": 0})
                    send("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                               "name": step[1], "input": {}}})
                    args = json.dumps(step[2])
                    for i in range(0, len(args), 4):
                        send("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta", "partial_json": args[i:i + 4]}})
                    send("content_block_stop", {"index": 1})
                    stop = "tool_use"
                else:
                    send("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                    send("ping", {})
                    for word in step[1].split(" "):
                        send("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": word + " "}})
                    send("content_block_stop", {"index": 0})
                    stop = "end_turn"
                send("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 5}})
                send("message_stop", {})

            def logprobs(self, body, words):
                """OpenAI's chat logprobs object for `words`, when the request asked for them."""
                if not body.get("logprobs"):
                    return None
                k = body.get("top_logprobs") or 0
                return {"content": [{"token": w, "logprob": -0.25 * (i + 1), "bytes": list(w.encode()),
                                     "top_logprobs": [{"token": w, "logprob": -0.25 * (i + 1),
                                                       "bytes": list(w.encode())}][:k]}
                                    for i, w in enumerate(words)]}

            def text_choices(self, body, step):
                """(index, text, logprobs) of each choice of a legacy completion: `n` per prompt,
                the prompt first with `echo`, logprobs word by word when asked for."""
                prompts = body["prompt"] if isinstance(body["prompt"], list) and body["prompt"] \
                    and not isinstance(body["prompt"][0], int) else [body["prompt"]]
                out = []
                for p in prompts:
                    prefix = (p if isinstance(p, str) else "") if body.get("echo") else ""
                    words = [w + " " for w in step[1].split(" ")]
                    for _ in range(body.get("n") or 1):
                        logprobs = None
                        if body.get("logprobs") is not None:
                            offsets = [len(prefix) + sum(len(x) for x in words[:i]) for i in range(len(words))]
                            # No alternatives asked for (`logprobs: 0`): `top_logprobs` is null.
                            top = [{w: -0.5} for w in words] if body["logprobs"] else None
                            logprobs = {"tokens": words, "token_logprobs": [-0.5] * len(words),
                                        "top_logprobs": top, "text_offset": offsets}
                            if step[0] == "bad_logprobs":
                                logprobs["token_logprobs"] = ["low"] * len(words)
                        out.append((len(out), prefix, words, logprobs))
                return out

            def text_plain(self, body, step):
                choices = [{"index": i, "text": prefix + "".join(words), "logprobs": logprobs, "finish_reason": "stop"}
                           for i, prefix, words, logprobs in self.text_choices(body, step)]
                self.send_json({"id": "cmpl-mock", "object": "text_completion", "created": 1700000000,
                                "model": body["model"], "choices": choices,
                                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}})

            def text_stream(self, body, step):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()

                def send(choices, usage=None):
                    chunk = {"id": "cmpl-mock", "object": "text_completion", "created": 1700000000,
                             "model": body["model"], "choices": choices}
                    if usage:
                        chunk["usage"] = usage
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()

                for i, prefix, words, logprobs in self.text_choices(body, step):
                    if prefix:
                        send([{"index": i, "text": prefix, "logprobs": None, "finish_reason": None}])
                    for j, word in enumerate(words):
                        lp = None if logprobs is None else \
                            {k: v if v is None else v[j:j + 1] for k, v in logprobs.items()}
                        send([{"index": i, "text": word, "logprobs": lp, "finish_reason": None}])
                    send([{"index": i, "text": "", "logprobs": None, "finish_reason": "stop"}])
                if (body.get("stream_options") or {}).get("include_usage"):
                    send([], {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
                self.wfile.write(b"data: [DONE]\n\n")

            def plain(self, body, step):
                message = {"role": "assistant", "content": None}
                logprobs = None
                finish = "stop"
                if step[0] == "tool":
                    message["tool_calls"] = [{"id": "call_1", "type": "function",
                                              "function": {"name": step[1], "arguments": json.dumps(step[2])}}]
                    finish = "tool_calls"
                else:
                    message["content"] = step[1]
                    logprobs = self.logprobs(body, [w + " " for w in step[1].split(" ")])
                data = json.dumps({
                    "id": "chatcmpl-mock", "object": "chat.completion", "created": 1700000000, "model": body["model"],
                    "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
                }).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def stream(self, body, step):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()

                def send(obj):
                    self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                    self.wfile.flush()

                def chunk(delta, finish=None, logprobs=None):
                    return {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1700000000,
                            "model": body["model"], "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                                 "finish_reason": finish}]}

                send(chunk({"role": "assistant", "content": ""}))
                if step[0] == "tool":
                    args = json.dumps(step[2])
                    send(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                "function": {"name": step[1], "arguments": ""}}]}))
                    for i in range(0, len(args), 5):
                        send(chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 5]}}]}))
                    send(chunk({}, "tool_calls"))
                else:
                    for word in step[1].split(" "):
                        send(chunk({"content": word + " "}, logprobs=self.logprobs(body, [word + " "])))
                    send(chunk({}, "stop"))
                send({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1700000000,
                      "model": body["model"], "choices": [],
                      "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = base if dialect in ("anthropic", "gemini") else base + "/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
