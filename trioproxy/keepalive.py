"""SSE keep-alive comments while a /v1 stream's backend is silent (STREAM_KEEPALIVE_SECONDS).

A reasoning model sends its first chunk (the role) and then nothing while it thinks, for
minutes at times; a load balancer in front of the proxy cuts a connection idle for 60 s
(AWS ALB, nginx's ``proxy_read_timeout``; Cloudflare 100 s). An SSE comment line is
ignored by every SSE client (the openai SDKs included), so one written while the backend
is silent keeps such a connection alive. Ollama's NDJSON has no such line: only event
streams get them.

The relay's per-chunk path is left alone (a cancel scope per read costs 6-20 µs per chunk,
see ``relay._Reader``): a task of the response's nursery wakes when the client has been
written nothing for the interval, and writes the comment only between whole events, never
while a chunk is being written. The chunks' writer does a few attribute stores per chunk
(and only for a stream that has keep-alive on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from hypercorn.typing import ASGISendCallable, ASGISendEvent

    from .exchange import CountingSend

COMMENT = b": keep-alive\n\n"

# a blank line after a line end, in every spelling SSE allows: what ends an event
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r")


class KeepAlive:
    """The keep-alive of one stream: :meth:`send_chunk` writes each relayed chunk,
    :meth:`run` (a task of the response's nursery) the comments in the silences, until
    :meth:`stop`. Comments are counted as bytes written (the access log's size), never as
    chunks, tokens or a first byte in the stream's metrics."""

    __slots__ = (
        "_commenting",
        "_counted",
        "_interval",
        "_scope",
        "_send",
        "last",
        "sending",
        "wrote_at",
    )

    def __init__(self, interval: float, send: ASGISendCallable, counted: CountingSend) -> None:
        self._interval = interval
        self._send = send  # the server's send: chunks are counted by the caller, comments here
        self._counted = counted
        self._scope = trio.CancelScope()
        self._commenting: trio.Event | None = None  # set while a comment is being written
        self.sending = False  # a chunk is being written (a slow client may hold it)
        self.last = b""  # the last chunk written: a comment only after a whole event
        self.wrote_at = trio.current_time()

    async def send_chunk(self, chunk: bytes) -> None:
        """Write a relayed chunk (after a comment being written, never into it)."""
        if self._commenting is not None:
            await self._commenting.wait()
        self.sending = True
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
        self.sending = False  # (left set if the write failed: no comment after that)
        self.last = chunk
        self.wrote_at = trio.current_time()

    async def settled(self) -> None:
        """Wait for a comment being written: what the caller writes next comes after it."""
        if self._commenting is not None:
            await self._commenting.wait()

    async def send_event(self, event: ASGISendEvent) -> None:
        """The ASGI send of a response written by Quart: its chunks as :meth:`send_chunk`
        (counted as ``CountingSend`` counts them), its last event after the comments."""
        if event["type"] == "http.response.body" and event.get("more_body", False):
            body = event["body"]
            self._counted.count(body)
            await self.send_chunk(body)
            return
        if event["type"] == "http.response.body":
            self.stop()
        await self.settled()
        await self._counted(event)

    def stop(self) -> None:
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            while True:
                due = self.wrote_at + self._interval
                if trio.current_time() < due:
                    await trio.sleep_until(due)
                elif self.sending or not self.last.endswith(_EVENT_ENDS):
                    # a chunk is being written (the client reads slowly: the connection is
                    # not idle), or what went out ends inside an event (a masked secret's
                    # start held back): no comment may go there; look again later
                    self.wrote_at = trio.current_time()
                else:
                    await self._comment()

    async def _comment(self) -> None:
        done = self._commenting = trio.Event()
        try:
            self._counted.sent += len(COMMENT)
            await self._send({"type": "http.response.body", "body": COMMENT, "more_body": True})
        finally:
            self._commenting = None
            done.set()
        self.wrote_at = trio.current_time()
