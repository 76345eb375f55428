"""SSE keep-alive comments while a /v1 stream's backend is silent (STREAM_KEEPALIVE_SECONDS).

A reasoning model sends its first chunk (the role) and then nothing while it thinks, for
minutes at times; a load balancer in front of the proxy cuts a connection idle for 60 s
(AWS ALB, nginx's ``proxy_read_timeout``; Cloudflare 100 s). An SSE comment line is
ignored by every SSE client (the openai SDKs included), so one written while the backend
is silent keeps such a connection alive. Ollama's NDJSON has no such line: only event
streams get them.

The silence before the backend's first event (a long prompt's prefill, a queue in front
of a busy backend, a reasoning model that sends nothing before its first token) is the
longest: :class:`EarlyStart` starts the response when it has lasted the interval (status
200 and the stream's headers, then comments), where the proxy otherwise waits for the
first event so that a quick failure gets its real status. A failure after that goes to
the client as the stream's in-band error.

The relay's per-chunk path is left alone (a cancel scope per read costs 6-20 µs per chunk,
see ``relay._Reader``): a task of the response's nursery wakes when the client has been
written nothing for the interval, and writes the comment only between whole events, never
while a chunk is being written. The chunks' writer does a few attribute stores per chunk
(and only for a stream that has keep-alive on).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from .anthropic import EVENT_STREAM as ANTHROPIC_EVENT_STREAM

if TYPE_CHECKING:
    from hypercorn.typing import ASGISendCallable, ASGISendEvent

    from .exchange import CountingSend, RequestState

# a response head's header lines, as an ASGI response start carries them
Head = list[tuple[bytes, bytes]]

COMMENT = b": keep-alive\n\n"
# Anthropic's own keep-alive, which its API sends in a stream's silences: both anthropic
# SDKs drop ``ping`` events before they reach the caller (as they drop comments, at the
# SSE decoder), and a client that reads the events itself expects it there
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def beat_for(content_type: str) -> bytes:
    """What keeps a stream of ``content_type`` alive: a ``ping`` event in Anthropic's
    streams (``/v1/messages``), a comment in the others."""
    return PING if content_type == ANTHROPIC_EVENT_STREAM else COMMENT


# a blank line after a line end, in every spelling SSE allows: what ends an event
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r")


class KeepAlive:
    """The keep-alive of one stream: :meth:`send_chunk` writes each relayed chunk,
    :meth:`run` (a task of the response's nursery) the comments in the silences, until
    :meth:`stop`. Comments are counted as bytes written (the access log's size), never as
    chunks, tokens or a first byte in the stream's metrics."""

    __slots__ = (
        "_beat",
        "_commenting",
        "_counted",
        "_scope",
        "_send",
        "interval",
        "last",
        "sending",
        "wrote_at",
    )

    def __init__(
        self,
        interval: float,
        send: ASGISendCallable,
        counted: CountingSend,
        beat: bytes = COMMENT,
    ) -> None:
        self.interval = interval
        self._beat = beat  # what is written in a silence: a comment, or Anthropic's ping
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
                due = self.wrote_at + self.interval
                if trio.current_time() < due:
                    await trio.sleep_until(due)
                elif self.sending or not self.last.endswith(_EVENT_ENDS):
                    # a chunk is being written (the client reads slowly: the connection is
                    # not idle), or what went out ends inside an event (a masked secret's
                    # start held back): no comment may go there; look again later
                    self.wrote_at = trio.current_time()
                else:
                    await self._comment()

    async def begin(self) -> None:
        """A comment at once, after a response head written before any event: comments
        go on from there (nothing is inside an event yet)."""
        await self._comment()
        self.last = self._beat

    async def _comment(self) -> None:
        done = self._commenting = trio.Event()
        try:
            self._counted.sent += len(self._beat)
            await self._send({"type": "http.response.body", "body": self._beat, "more_body": True})
        finally:
            self._commenting = None
            done.set()
        self.wrote_at = trio.current_time()


class EarlyStart:
    """The start of a stream's response before its backend's first event, when the wait
    for it lasts ``interval`` (STREAM_KEEPALIVE_SECONDS): the route calls
    :func:`stream_opening` as the stream's request goes to the backend, which starts the
    timer, a task of the request's nursery; when it runs out, ``start`` writes the
    response's head (status 200, the stream's headers: ``head``, the one the response
    would have had, when the backend's headers were in by then) and ``keeper`` a comment,
    then comments in the silence as usual. Whoever has the reply (or its failure) calls
    :meth:`stop_unless_started`: before the timer ran out, that stops it and nothing was
    sent; after, :meth:`settle`. Built for every fast-path request with the setting on,
    most of which never stream: the timer's scope and ``keeper`` come only with
    :meth:`open` (building them for every request cost ~3 us)."""

    __slots__ = (
        "_counted",
        "_nursery",
        "_scope",
        "_send",
        "_start",
        "_started",
        "committed",
        "content_type",
        "head",
        "interval",
        "keeper",
        "responses",
    )

    def __init__(
        self,
        interval: float,
        send: ASGISendCallable,
        counted: CountingSend,
        nursery: trio.Nursery,
        start: Callable[[str, Head | None], Awaitable[None]],
    ) -> None:
        self.interval = interval
        self._send = send  # the server's send and the counted one, for ``keeper``
        self._counted = counted
        self._nursery = nursery  # the request's: the timer never outlives it
        self._start = start
        self._scope: trio.CancelScope | None = None  # the timer's, once opened
        self._started: trio.Event | None = None  # set once the head (and a comment) is out
        self.keeper: KeepAlive | None = None  # once opened
        self.committed = False  # the response has started: only in-band from here on
        self.content_type = ""
        self.responses = False  # the Responses API's stream: its error event is its own
        # the stream's own head, once the backend's headers are in and the reply built (the
        # backend's rate limits and request id, X-Proxy-Overhead-Ms): a start after that
        # sends it; one before, a head without them (they cannot follow it)
        self.head: Head | None = None

    def open(self, content_type: str, *, responses: bool = False) -> None:
        """The stream's request goes to the backend: the timer starts (once)."""
        if self._started is None:
            self.content_type = content_type
            self.responses = responses
            self._started = trio.Event()
            self._scope = trio.CancelScope()
            beat = beat_for(content_type)
            self.keeper = KeepAlive(self.interval, self._send, self._counted, beat)
            self._nursery.start_soon(self._run, self._scope, self.keeper, self._started)

    async def _run(self, scope: trio.CancelScope, keeper: KeepAlive, started: trio.Event) -> None:
        with scope:
            await trio.sleep(self.interval)
            self.committed = True  # (no checkpoint between this and the scope's end)
        if not self.committed:
            return
        try:
            await self._start(self.content_type, self.head)
            await keeper.begin()
        finally:
            started.set()
        await keeper.run()

    def stop_unless_started(self) -> bool:
        """Whether the response has started; if not, the timer (if any) is stopped and
        never starts it."""
        if self.committed:
            return True
        if self._scope is not None:
            self._scope.cancel()
        return False

    async def settle(self) -> None:
        """Once a started response's head and any comment being written are out (what
        the caller writes next comes after them)."""
        assert self._started is not None and self.keeper is not None  # (committed)
        await self._started.wait()
        await self.keeper.settled()


def stream_opening(state: RequestState, content_type: str, *, responses: bool = False) -> None:
    """A route's word that a stream of ``content_type`` (an event stream; ``responses``:
    the Responses API's) is being requested from the backend: with
    STREAM_KEEPALIVE_SECONDS, its response may start before the backend's first event
    (:class:`EarlyStart`)."""
    early = state.early_start
    if early is not None:
        early.open(content_type, responses=responses)
