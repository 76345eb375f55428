"""How long large JSON holds the proxy's event loop: ``python -m bench.loop_stall``.

The proxy runs in this process, on its own trio loop, next to a task that sleeps 1 ms at a
time and records how late each wake-up is (the loop's longest stall). The demo backend and
the client each run in a process of their own, so neither competes with the proxy for the
GIL. Scenarios (each ``--rounds`` times, one request at a time per client, ``--clients``
clients at once):

- ``chat-ollama``: ``POST /api/chat``, a 10 MB body holding one base64 image (decoded,
  translated, encoded again for the backend);
- ``chat-openai``: ``POST /v1/chat/completions``, the same image as a data URL (decoded,
  forwarded as it came);
- ``embed-ollama``: ``POST /api/embed``, 2,048 inputs at 1,024 dimensions (the backend's
  answer of ~40 MB decoded, translated, encoded for the client);
- ``embed-openai-mapped``: ``POST /v1/embeddings`` for a mapped model name, the same batch
  (the answer decoded, its model renamed, encoded again);
- ``embed-openai``: ``POST /v1/embeddings``, the same batch for the backend's own name (the
  answer's ~40 MB read and relayed as they came: joined, checked, its usage read);
- ``models-ollama``: ``GET /api/tags`` then ``GET /api/ps``, and ``models-openai``:
  ``GET /v1/models``, of a backend (a stub process, :func:`model_list_body`) that lists
  760 models as OpenRouter does, ~2 MB (fetched and decoded every 5 s at most, answered
  from at each request);
- ``answer-text``, ``answer-tool``, ``answer-logprobs``: ``POST /api/chat``, not streamed,
  of the same stub backend, which answers with one large completion (:func:`chat_answer_body`):
  30 MB of text, a tool call whose arguments are 30 MB of JSON (10,000 files' contents), or
  17 MB of log probabilities (11,000 tokens with 20 alternatives each: about the most that stays
  under the proxy's limit of 500,000 arrays and objects per answer); decoded, translated to
  Ollama's shape and encoded for the client;
- ``stream-text``, ``stream-tool``, ``stream-logprobs``: ``POST /v1/chat/completions``,
  streamed, of the same stub backend, which sends the same answers as one large event of
  a ``/v1`` stream (:func:`chat_stream_body`), relayed as it came and observed for the
  metrics (decoded: its tokens, finish and usage);
- ``models-refetched``: ``GET /api/tags`` with the proxy's list cache at 0 s, so that each
  fetches the list again (as polls further apart than the cache's 5 s do);
- ``chat-ollama-300k``: ``POST /api/chat``, a 300 KB body of one base64 image (past the
  threshold: decoded in a JSON thread);
- ``show-300k``: ``POST /api/show`` with a 300 KB body (decoded in a JSON thread, then
  answered from the model list held: beside another scenario, the list is held for the
  whole run, so the backend, busy with the other's answer, is not asked).

The proxy has a backend key (``--api-key``, a fixed dummy one by default; the backends
ignore it), as every real deployment does: what a backend sends is masked for it (a large
answer in 64 KiB pieces), work that a keyless proxy never does.

Prints, per scenario, the longest stall and the 99th percentile of the wake-ups while
its requests ran, and the same for an idle second before them. ``--beside
show-300k:300:0.02`` runs one more client (300 requests of that scenario, 20 ms apart)
beside each of the demo's scenarios and prints how long its requests took (how long one
waits behind another's JSON work); ``--json-threads`` sets the JSON threads per worker.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import trio

from bench import interrupts
from trioproxy import catalog, json_threads
from trioproxy.app import create_app
from trioproxy.cli import hypercorn_config
from trioproxy.config import load_settings
from trioproxy.json_threads import JSON_THREADS

TICK = 0.001
# the backend key the proxy is given unless --api-key says otherwise: masked in answers
DUMMY_API_KEY = "sk-loop-stall-bench-0123456789abcdef"
_ROOT = str(Path(__file__).resolve().parent.parent)  # for the stub backend's import
_LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")

# the client: its own process, stdlib only; prints the monotonic clock (system-wide on
# Linux: the same as this process's) when its bodies are built and when it is done, and
# one line per request (status, bytes sent, bytes received)
_CLIENT = r"""
import base64, http.client, json, os, sys, time
port, scenario, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0  # between requests, s
image = base64.b64encode(os.urandom(7_500_000)).decode()
small_image = base64.b64encode(os.urandom(225_000)).decode()  # 300 KB, past 256 KiB
inputs = [f"text number {i}" for i in range(2048)]
bodies = {
    "chat-ollama": ("/api/chat", {"model": "demo-chat", "stream": False, "messages": [
        {"role": "user", "content": "what is this?", "images": [image]}]}),
    "chat-openai": ("/v1/chat/completions", {"model": "demo-chat", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]}),
    "chat-ollama-300k": ("/api/chat", {"model": "demo-chat", "stream": False, "messages": [
        {"role": "user", "content": "what is this?", "images": [small_image]}]}),
    "show-300k": ("/api/show", {"model": "demo-chat", "note": small_image}),
    "embed-ollama": ("/api/embed", {"model": "demo-embed", "input": inputs,
                                    "dimensions": 1024}),
    "embed-openai-mapped": ("/v1/embeddings", {"model": "client-embed", "input": inputs,
                                               "dimensions": 1024}),
    "embed-openai": ("/v1/embeddings", {"model": "demo-embed", "input": inputs,
                                        "dimensions": 1024}),
}
for kind in ("text", "tool", "logprobs"):
    bodies["answer-" + kind] = ("/api/chat", {"model": "answer-" + kind, "stream": False,
        "logprobs": kind == "logprobs", "messages": [{"role": "user", "content": "hi"}]})
    bodies["stream-" + kind] = ("/v1/chat/completions", {"model": "answer-" + kind,
        "stream": True, "messages": [{"role": "user", "content": "hi"}]})
gets = {"models-ollama": ["/api/tags", "/api/ps"], "models-openai": ["/v1/models"],
        "models-refetched": ["/api/tags"]}
asks = ([("POST", bodies[scenario][0], json.dumps(bodies[scenario][1]).encode())]
        if scenario in bodies else [("GET", path, b"") for path in gets[scenario]])
print("start", time.monotonic(), flush=True)
for _ in range(rounds):
    for method, path, raw in asks:
        began = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request(method, path, raw or None, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        took = (time.monotonic() - began) * 1000
        print(reply.status, len(raw), len(data), f"{took:.1f}ms",
              data[:120] if reply.status != 200 else b"", flush=True)
        conn.close()
        time.sleep(pause)
print("end", time.monotonic(), flush=True)
"""

# the stub backend of the model-list and answer scenarios: its own process, stdlib and
# this module only; answers GET /v1/models with model_list_body(), POST
# /v1/chat/completions with chat_answer_body() for the model's kind, and prints where it
# listens
_LIST_BACKEND = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
sys.path.insert(0, sys.argv[1])
from bench.loop_stall import chat_answer_body, chat_stream_body, model_list_body
body = model_list_body()
answers = {}

class Models(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def do_GET(self):
        found = self.path.rstrip("/") == "/v1/models"
        answer = body if found else b'{"error": "not found"}'
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
    def do_POST(self):
        asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        kind = asked["model"].removeprefix("answer-")
        streamed = asked.get("stream") is True
        made = chat_stream_body if streamed else chat_answer_body
        key = (kind, streamed)
        answer = answers.get(key) or answers.setdefault(key, made(kind))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if streamed else "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
"""

_WORDS = (
    "the a model of for with and reasoning context tokens vision tool coding fast large "
    "small open weights instruct chat multilingual benchmark latency"
).split()
_VENDORS = ["openai", "anthropic", "google", "meta-llama", "mistralai", "qwen", "deepseek"]


def model_list_body(models: int = 760, seed: int = 7) -> bytes:
    """A ``GET /models`` answer of OpenRouter's shape (its entries' fields, a description of
    150-450 words each, pricing, architecture, parameters): ~2.6 KB per model, so the 760
    of the default ~2 MB. The same bytes for the same arguments."""
    rng = random.Random(seed)
    data = []
    for i in range(models):
        vendor = rng.choice(_VENDORS)
        model_id = f"{vendor}/model-{i}-{rng.randrange(1000)}"
        description = " ".join(rng.choice(_WORDS) for _ in range(rng.randrange(150, 450)))
        inputs = ["text", "image"] if i % 3 == 0 else ["text"]
        data.append(
            {
                "id": model_id,
                "canonical_slug": f"{model_id}-2025",
                "name": f"{vendor}: Model {i}",
                "created": 1_700_000_000 + i * 3600,
                "description": description,
                "context_length": rng.choice([8192, 32768, 131072, 200000, 1048576]),
                "architecture": {
                    "modality": "text+image->text",
                    "input_modalities": inputs,
                    "output_modalities": ["text"],
                    "tokenizer": "Other",
                    "instruct_type": None,
                },
                "pricing": {"prompt": "0.000003", "completion": "0.000015", "request": "0",
                            "image": "0.0048", "input_cache_read": "0.0000003"},
                "top_provider": {"context_length": 200000, "max_completion_tokens": 64000,
                                 "is_moderated": True},
                "per_request_limits": None,
                "supported_parameters": ["include_reasoning", "max_tokens", "reasoning",
                                         "response_format", "stop", "temperature",
                                         "tool_choice", "tools", "top_p"],
            }
        )  # fmt: skip
    return json.dumps({"data": data}).encode()


def chat_answer_body(kind: str) -> bytes:
    """A non-stream chat completion of ``kind``: ``text`` (30 MB of content), ``tool``
    (a tool call whose arguments are 30 MB of JSON: 10,000 files of 3 KB each), or
    ``logprobs`` (11,000 tokens, 20 alternatives each: ~17 MB, about the most under
    the proxy's limit of 500,000 arrays and objects per answer)."""
    words = " ".join(_WORDS)
    message: dict[str, object] = {"role": "assistant", "content": ""}
    choice: dict[str, object] = {"index": 0, "message": message, "finish_reason": "stop"}
    if kind == "text":
        message["content"] = (words + " ") * (30_000_000 // (len(words) + 1))
    elif kind == "tool":
        files = [{"path": f"src/file_{i}.txt", "content": words * 20} for i in range(10_000)]
        function = {"name": "write_files", "arguments": json.dumps({"files": files})}
        message["tool_calls"] = [{"id": "call_1", "type": "function", "function": function}]
        choice["finish_reason"] = "tool_calls"
    else:

        def entry(token: str, logprob: float) -> dict[str, object]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        tokens = [_WORDS[i % len(_WORDS)] for i in range(11_000)]
        content = [
            {**entry(token, -0.25), "top_logprobs": [entry(w, -1.5 - j) for j, w in
                                                     enumerate(_WORDS[:20])]}
            for token in tokens
        ]  # fmt: skip
        message["content"] = " ".join(tokens)
        choice["logprobs"] = {"content": content}
    usage = {"prompt_tokens": 3, "completion_tokens": 11_000, "total_tokens": 11_003}
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000,
              "model": "answer-" + kind, "choices": [choice], "usage": usage}  # fmt: skip
    return json.dumps(answer).encode()


def chat_stream_body(kind: str) -> bytes:
    """:func:`chat_answer_body` as a ``/v1`` stream (Server-Sent Events) whose one large
    event carries the whole message (and its log probabilities): a role chunk, that
    chunk, a finish chunk with the usage, ``[DONE]``."""
    answer = json.loads(chat_answer_body(kind))
    choice = answer["choices"][0]
    message = choice["message"]
    delta: dict[str, object] = {"content": message["content"]}
    if "tool_calls" in message:
        delta["tool_calls"] = [{"index": 0, **call} for call in message["tool_calls"]]
    head = {key: answer[key] for key in ("id", "created", "model")}
    head["object"] = "chat.completion.chunk"

    def event(delta: dict[str, object], finish: object = None, **extra: object) -> bytes:
        chosen = {"index": 0, "delta": delta, **extra, "finish_reason": finish}
        chunk = {**head, "choices": [chosen]}
        if finish is not None:
            chunk["usage"] = answer["usage"]
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    role = event({"role": "assistant", "content": ""})
    large = event(delta, logprobs=choice.get("logprobs"))
    return role + large + event({}, choice["finish_reason"]) + b"data: [DONE]\n\n"


class Ticker:
    """Wakes every TICK on the loop, noting when and how late (s) each wake-up was."""

    def __init__(self) -> None:
        self.ticks: list[tuple[float, float]] = []

    async def run(self) -> None:
        clock = time.monotonic
        while True:
            before = clock()
            await trio.sleep(TICK)
            now = clock()
            self.ticks.append((now, now - before - TICK))

    def between(self, start: float, end: float) -> str:
        """The longest and the 99th-percentile lateness of the wake-ups in [start, end]."""
        late = sorted(lateness for at, lateness in self.ticks if start <= at <= end)
        if not late:
            return "no ticks"
        longest, p99 = late[-1] * 1e3, late[int(len(late) * 0.99)] * 1e3
        return f"max {longest:7.2f} ms  p99 {p99:6.2f} ms  ({len(late)} ticks)"


def _start_backend(*command: str) -> tuple[subprocess.Popen[str], str]:
    """The demo backend (or ``command``, a backend that prints where it listens as the
    demo does) in its own process; its base URL."""
    command = command or ("-m", "trioproxy.demo", "--host", "127.0.0.1", "--port", "0")
    backend = subprocess.Popen(
        [sys.executable, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert backend.stdout is not None
    for line in backend.stdout:
        if match := _LISTENING.search(line):
            return backend, match.group(1) + "/v1"
    raise RuntimeError("the backend did not start")


def _client(port: int, scenario: str, rounds: int, pause: float = 0.0) -> list[str]:
    """Run one scenario's client process to its end (in a thread); its lines. ``pause``:
    seconds between its requests."""
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, str(port), scenario, str(rounds), str(pause)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


async def _clients(port: int, scenario: str, rounds: int, parallel: int) -> list[list[str]]:
    """``parallel`` clients of ``scenario`` at once, each in a thread of ours waiting for
    its process; their lines."""
    outputs: list[list[str]] = []

    async def client() -> None:
        run = partial(_client, port, scenario, rounds)
        outputs.append(await trio.to_thread.run_sync(run))

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(client)
    return outputs


async def main(
    scenarios: list[str],
    rounds: int,
    parallel: int = 1,
    beside: tuple[str, int, float] | None = None,
    api_key: str = DUMMY_API_KEY,
) -> None:
    """Each backend's scenarios against a proxy of their own, in the order given (with a
    client of ``beside`` beside each of the demo's); the proxies' backend key ``api_key``
    (none if empty)."""
    demo = [s for s in scenarios if s not in LIST_SCENARIOS]
    listing = [s for s in scenarios if s in LIST_SCENARIOS]
    if demo:
        await _run_against(_start_backend(), demo, rounds, parallel, beside, api_key)
    if listing:
        backend = _start_backend("-c", _LIST_BACKEND, _ROOT)
        await _run_against(backend, listing, rounds, parallel, None, api_key)


async def _with_beside(
    port: int,
    scenario: str,
    rounds: int,
    parallel: int,
    beside: tuple[str, int, float] | None,
) -> tuple[list[list[str]], list[str]]:
    """The scenario's clients' lines, and those of one client of ``beside`` (a scenario,
    its rounds and the pause between them) started with them, if any."""
    besides: list[str] = []

    async def beside_client() -> None:
        assert beside is not None
        run = partial(_client, port, *beside)
        besides.extend(await trio.to_thread.run_sync(run))

    async with trio.open_nursery() as nursery:
        if beside is not None:
            nursery.start_soon(beside_client)
        outputs = await _clients(port, scenario, rounds, parallel)
    return outputs, besides


def _latencies(lines: list[str]) -> str:
    """The median and the longest of the request times a client printed."""
    took = sorted(float(line.split()[3].removesuffix("ms")) for line in lines)
    if not took:
        return "no requests"
    return f"{len(took)} requests, median {took[len(took) // 2]:.1f} ms, max {took[-1]:.1f} ms"


async def _run_against(
    started: tuple[subprocess.Popen[str], str],
    scenarios: list[str],
    rounds: int,
    parallel: int,
    beside: tuple[str, int, float] | None = None,
    api_key: str = DUMMY_API_KEY,
) -> None:
    backend, upstream = started
    try:
        settings = load_settings(
            environ={"OPENAI_API_KEY": api_key} if api_key else {},
            dotenv_path=None,
            upstream_url=upstream,
            host="127.0.0.1",
            port=0,
            model_mapping={"client-embed": "demo-embed"},
        )
        app = create_app(settings)
        config = hypercorn_config(settings)
        ticker = Ticker()
        async with trio.open_nursery() as nursery:
            from hypercorn.trio import serve

            stop = trio.Event()
            binds = await nursery.start(
                partial(serve, app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
            )
            port = int(binds[0].rsplit(":", 1)[1])
            nursery.start_soon(ticker.run)
            await trio.sleep(2.0)
            print(f"{'idle':<22} {ticker.between(time.monotonic() - 1.0, time.monotonic())}")
            for scenario in scenarios:
                cached = catalog.CACHE_SECONDS
                if scenario == "models-refetched":  # every poll fetches the list
                    catalog.CACHE_SECONDS = 0.0
                elif beside is not None:  # the list held throughout: show-300k never waits
                    catalog.CACHE_SECONDS = math.inf  # for a backend busy with another
                try:
                    outputs, besides = await _with_beside(port, scenario, rounds, parallel, beside)
                finally:
                    catalog.CACHE_SECONDS = cached
                start = min(float(lines[0].split()[1]) for lines in outputs)
                end = max(float(lines[-1].split()[1]) for lines in outputs)
                print(f"{scenario:<22} {ticker.between(start, end)}")
                for lines in outputs:
                    for line in lines[1:-1]:
                        print("    " + line)
                if besides:
                    print(f"  beside: {beside[0]} {_latencies(besides[1:-1])}")
            stop.set()
            nursery.cancel_scope.cancel()
    finally:
        backend.terminate()
        backend.wait()


LIST_SCENARIOS = [
    "models-ollama",
    "models-openai",
    "models-refetched",
    "answer-text",
    "answer-tool",
    "answer-logprobs",
    "stream-text",
    "stream-tool",
    "stream-logprobs",
]
SCENARIOS = [
    "chat-ollama",
    "chat-ollama-300k",
    "show-300k",
    "chat-openai",
    "embed-ollama",
    "embed-openai-mapped",
    "embed-openai",
    *LIST_SCENARIOS,
]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--clients", type=int, default=1, help="clients at once, each its own")
    parser.add_argument(
        "--beside",
        metavar="SCENARIO:ROUNDS[:PAUSE]",
        help="one more client, of this demo scenario, beside each demo scenario's, PAUSE "
        "seconds between its requests: their median and longest time are printed (e.g. "
        "show-300k:300:0.02)",
    )
    parser.add_argument(
        "--json-threads", type=int, default=JSON_THREADS, help="JSON threads per worker"
    )
    parser.add_argument(
        "--api-key",
        default=DUMMY_API_KEY,
        help="the proxy's backend key, masked in what the backend sends as in production "
        "(a dummy one by default; '' for none, as before 2026-12-03)",
    )
    args = parser.parse_args()
    json_threads.JSON_THREADS = args.json_threads
    beside = None
    if args.beside:
        name, beside_rounds, pause, *_ = [*args.beside.split(":"), "", ""]
        beside = (name, int(beside_rounds or args.rounds), float(pause or 0))
    interrupts.install_sigterm()  # a SIGTERM cancels the run: its backends are stopped
    interrupts.run_trio(main, args.only.split(","), args.rounds, args.clients, beside, args.api_key)
