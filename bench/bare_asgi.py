"""The stack's ceiling (scenario 3i): a bare ASGI app on hypercorn's trio worker.

No framework, no proxying: it reads the request body and answers the same fixed
chat-completion JSON as the nginx backend, on every path. What the proxy does per request
(Quart, httpx, translation, metrics) is everything it costs on top of this.

    python -m bench.bare_asgi [--host 127.0.0.1] [--port 0]

prints ``bare asgi listening on http://HOST:PORT`` on stderr once bound. It is also the
fixed backend when nginx is not installed.
"""

from __future__ import annotations

import argparse
import signal
import sys
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

FIXED_BODY = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"demo-chat","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello from the fixed benchmark backend."},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}'
)
MODELS_BODY = (
    b'{"object":"list","data":[{"id":"demo-chat","object":"model",'
    b'"created":1700000000,"owned_by":"bench"}]}'
)
_HEADERS = [(b"content-type", b"application/json")]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = MODELS_BODY if scope["path"] == "/v1/models" else FIXED_BODY
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*_HEADERS, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve_until_signal(app: Any, name: str, host: str, port: int) -> None:
    """Serve *app* on hypercorn's trio worker until SIGINT/SIGTERM; once bound, print
    ``NAME listening on URL`` on stderr (the line the bench waits for)."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 5
    config.read_timeout = None
    config.backlog = 1024
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def stop() -> None:
            async for _ in signals:
                return

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop))
            print(f"{name} listening on {binds[0]}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_asgi", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--with-trioproxy-patches",
        action="store_true",
        help="apply trioproxy's hypercorn patches first (a reference figure, not the ceiling)",
    )
    args = parser.parse_args(argv)
    if args.with_trioproxy_patches:
        import trioproxy.hypercorn_patches  # noqa: F401  (patches on import)
    trio.run(serve_until_signal, app, "bare asgi", args.host, args.port)


if __name__ == "__main__":
    main()
