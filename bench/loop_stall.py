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
  (the answer decoded, its model renamed, encoded again).

Prints, per scenario, the longest stall and the 99th percentile of the wake-ups while
its requests ran, and the same for an idle second before them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from functools import partial

import trio

from trioproxy.app import create_app
from trioproxy.cli import hypercorn_config
from trioproxy.config import load_settings

TICK = 0.001
_LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")

# the client: its own process, stdlib only; prints the monotonic clock (system-wide on
# Linux: the same as this process's) when its bodies are built and when it is done, and
# one line per request (status, bytes sent, bytes received)
_CLIENT = r"""
import base64, http.client, json, os, sys, time
port, scenario, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
image = base64.b64encode(os.urandom(7_500_000)).decode()
inputs = [f"text number {i}" for i in range(2048)]
bodies = {
    "chat-ollama": ("/api/chat", {"model": "demo-chat", "stream": False, "messages": [
        {"role": "user", "content": "what is this?", "images": [image]}]}),
    "chat-openai": ("/v1/chat/completions", {"model": "demo-chat", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]}),
    "embed-ollama": ("/api/embed", {"model": "demo-embed", "input": inputs,
                                    "dimensions": 1024}),
    "embed-openai-mapped": ("/v1/embeddings", {"model": "client-embed", "input": inputs,
                                               "dimensions": 1024}),
}
path, body = bodies[scenario]
raw = json.dumps(body).encode()
print("start", time.monotonic(), flush=True)
for _ in range(rounds):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, raw, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    data = reply.read()
    print(reply.status, len(raw), len(data), data[:120] if reply.status != 200 else b"",
          flush=True)
    conn.close()
print("end", time.monotonic(), flush=True)
"""


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


def _start_backend() -> tuple[subprocess.Popen[str], str]:
    backend = subprocess.Popen(
        [sys.executable, "-m", "trioproxy.demo", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert backend.stdout is not None
    for line in backend.stdout:
        if match := _LISTENING.search(line):
            return backend, match.group(1) + "/v1"
    raise RuntimeError("the demo backend did not start")


def _client(port: int, scenario: str, rounds: int) -> list[str]:
    """Run one scenario's client process to its end (in a thread); its lines."""
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT, str(port), scenario, str(rounds)],
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


async def main(scenarios: list[str], rounds: int, parallel: int = 1) -> None:
    backend, upstream = _start_backend()
    try:
        settings = load_settings(
            environ={},
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
                outputs = await _clients(port, scenario, rounds, parallel)
                start = min(float(lines[0].split()[1]) for lines in outputs)
                end = max(float(lines[-1].split()[1]) for lines in outputs)
                print(f"{scenario:<22} {ticker.between(start, end)}")
                for lines in outputs:
                    for line in lines[1:-1]:
                        print("    " + line)
            stop.set()
            nursery.cancel_scope.cancel()
    finally:
        backend.terminate()
        backend.wait()


SCENARIOS = ["chat-ollama", "chat-openai", "embed-ollama", "embed-openai-mapped"]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--clients", type=int, default=1, help="clients at once, each its own")
    args = parser.parse_args()
    trio.run(main, args.only.split(","), args.rounds, args.clients)
