"""The stack's floor for a relayed stream chunk (shown next to scenario 3b).

The fixed stack's two ends with nothing between them: an ASGI app on hypercorn's trio
worker, with trioproxy's hypercorn patches, that forwards ``POST /v1/chat/completions`` to
the upstream and hands every read of the response body to the client as it is. No
parsing, no translation, no metrics, no deadlines. The proxy's CPU per chunk minus this
one's is what trioproxy's own relay costs; the target is judged on the proxy alone.

    python -m bench.relay_floor --upstream http://127.0.0.1:PORT [--raw] [--port 0]

By default the upstream is read with httpx, as the proxy reads it (with trioproxy's direct
socket stream installed in its pool, and the body read off httpcore's h11 state with
``netstream.H11Body``). ``--raw`` reads a raw trio socket instead, one
HTTP/1.0 request per connection whose body ends at the close: what hypercorn alone costs.
Prints ``relay floor listening on http://HOST:PORT`` on stderr once bound.
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

import trioproxy.hypercorn_patches  # noqa: F401  (patches on import)
from trioproxy.config import Settings
from trioproxy.netstream import body_reader, install
from trioproxy.upstream import ShardPicker

from .bare_asgi import serve_until_signal

CHAT = "/v1/chat/completions"
_EVENT_STREAM = [(b"content-type", b"text/event-stream")]
_OK = [(b"content-type", b"text/plain"), (b"content-length", b"2")]


class Relay:
    """The ASGI app; ``raw`` picks the upstream side (see the module's doc)."""

    def __init__(self, upstream: str, *, raw: bool) -> None:
        parts = urlsplit(upstream)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.raw = raw
        self.clients: list[httpx.AsyncClient] = []
        self.picker = ShardPicker(1)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if scope["method"] != "POST" or scope["path"] != CHAT:
            await send({"type": "http.response.start", "status": 200, "headers": _OK})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": _EVENT_STREAM})
        if self.raw:
            await self._relay_raw(body, send)
        else:
            await self._relay_httpx(body, send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._open_clients()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for client in self.clients:
                    await client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _open_clients(self) -> None:
        """The proxy's pool layout (``upstream.UpstreamPool``): its default number of
        httpx clients, the keep-alive connections shared out among them, a request on the
        least busy one. One client for every request would scan all its connections on
        each assignment, a per-stream cost the proxy does not pay (docs/performance-history.md)."""
        settings = Settings()
        shards = settings.upstream_clients
        keepalive = max(1, settings.upstream_max_keepalive // shards)
        for _ in range(shards):
            transport = httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive)
            )
            install(transport)
            self.clients.append(httpx.AsyncClient(transport=transport, timeout=None))
        self.picker = ShardPicker(shards)

    async def _relay_httpx(self, body: bytes, send: Any) -> None:
        url = f"http://{self.host}:{self.port}{CHAT}"
        headers = {"content-type": "application/json"}
        shard = self.picker.acquire()
        try:
            client = self.clients[shard]
            async with client.stream("POST", url, content=body, headers=headers) as response:
                next_part = body_reader(response)  # as the proxy reads a body
                while (data := await next_part()) is not None:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            self.picker.release(shard)

    async def _relay_raw(self, body: bytes, send: Any) -> None:
        sock = trio.socket.socket()
        with sock:
            await sock.connect((self.host, self.port))
            head = (
                f"POST {CHAT} HTTP/1.0\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            await sock.send(head + body)  # a few hundred bytes: one write
            seen = b""
            while True:
                await trio.lowlevel.wait_readable(sock)
                data = os.read(sock.fileno(), 65536)
                if not data:
                    return
                if seen is not None:  # still in the response head
                    seen += data
                    if b"\r\n\r\n" not in seen:
                        continue
                    data = seen.partition(b"\r\n\r\n")[2]
                    seen = None
                    if not data:
                        continue
                await send({"type": "http.response.body", "body": data, "more_body": True})


async def _read_body(receive: Any) -> bytes:
    parts = []
    more = True
    while more:
        message = await receive()
        parts.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_floor", description=__doc__)
    parser.add_argument("--upstream", required=True, help="http://HOST:PORT of the backend")
    parser.add_argument("--raw", action="store_true", help="raw socket upstream, no httpx")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    app = Relay(args.upstream, raw=args.raw)
    trio.run(serve_until_signal, app, "relay floor", args.host, args.port)


if __name__ == "__main__":
    main()
