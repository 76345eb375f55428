"""Fixes for hypercorn 0.18's trio worker: connection housekeeping under quart-trio's
request cancellation, and its cost per request.

1. **One keep-alive timer per connection whose deadline moves** (``IdleTimer``), in place of
   hypercorn's ``TrioSingleTask``, which started a new timer task after every response and
   cancelled it when the next request arrived. That spawn and cancel was about a tenth of
   the CPU a proxied request costs (docs/performance-history.md). It also fixes stack notes P1:
   quart-trio ends a request by cancelling its nursery, the stock restart ran inside that
   cancelled scope and raised ``Cancelled``, so an idle keep-alive connection was never
   closed. Moving a deadline never awaits, so it cannot be cancelled. The timer ends when
   the connection stops reading, so a connection the client closed is released at once.
2. **Closing the connection** (``TCPServer.protocol_send(Closed())``) raised ``Cancelled``
   before the socket was closed, so a connection answered before its request body arrived
   (an early 404/413/501) was neither served again nor closed. Shielded.
3. **A response with a known length leaves in one write.** hypercorn wrote the status line
   and headers, then the body, then h11's zero-byte end of message, each through the send
   lock, a syscall and two scheduler yields. The head now waits for the first body bytes
   (or the end of a body-less response) and empty writes are skipped. Streamed responses
   (no ``Content-Length``) still send their head at once, and so does a response whose
   body is 1 MiB or more: copying it behind its head held the loop (25-40 ms for 40 MB).
4. **A write the socket takes whole goes straight to it.** hypercorn took its send lock (a
   scheduler yield), entered a shielded cancel scope and went through ``send_all`` (another
   yield) for every write, though a socket with room takes the bytes in one non-blocking
   call that cannot be interrupted. Such writes now go to the socket directly; whatever it
   does not take (a slow reader, a full buffer) goes hypercorn's way from a view of the
   bytes (not a copy of the rest), shielded, so a cancellation can never cut a response
   in the middle of its framing. Paired A/B: 175-200 µs less CPU per proxied request at
   32-64 concurrent requests (docs/performance-history.md).
   Such a wait is bounded (``set_write_timeout``, CLIENT_WRITE_TIMEOUT): hypercorn's was
   not, so a client that stopped reading held its request, its slot under
   MAX_CONCURRENT_REQUESTS and its backend connection for ever. The limit is on a stall
   (no room for the next 64 KiB), not on the whole body, and a shutdown shortens it to
   its grace period (``end_writes_within``). Past it the connection is closed, and a
   write cut by that shutdown is the proxy's doing (``write_cut_by_shutdown``: a 503 in
   the metrics, not a client that left).

5. **Shutdown is announced.** ``on_shutdown(listener)`` calls ``listener()`` when hypercorn
   begins its graceful shutdown (its worker context's ``terminated`` event is set, just
   before requests in flight get ``graceful_timeout`` seconds), so the app can end long
   streams in-band before that time runs out and hypercorn cuts them mid-chunk. From then
   on every response says ``Connection: close``: hypercorn closes the connection after it
   but did not say so, so a pooling client (httpx, the openai SDK) reused it and failed on
   its next request instead of opening a connection to a live instance.

6. **HTTP/1.1 only.** hypercorn's HTTP/1.1 protocol switched a connection to HTTP/2 on an
   ``Upgrade: h2c`` request or on HTTP/2's preface sent with prior knowledge, even when
   ALPN offers only HTTP/1.1 (``cli.ALPN_PROTOCOLS``). The streaming, disconnect and
   shutdown handling (and patches 1-4) are built for HTTP/1.1, so an h2c upgrade is
   ignored (served in HTTP/1.1, which an upgrade request allows) and the preface gets
   ``505 HTTP Version Not Supported`` and a close.

7. **No request with both Content-Length and Transfer-Encoding.** h11 reads such a body by
   its chunks and keeps the connection; a front proxy that went by the length would take
   the rest for another request: the shape of request smuggling. RFC 9112 (6.3) lets a
   server refuse it and forbids keeping the connection: it gets a 400 and a close.

8. **No ``100 Continue`` for a body that will be refused.** hypercorn answered ``Expect:
   100-continue`` at once, before the app saw the request, so a client declaring a body
   over MAX_REQUEST_BYTES was invited to send it and then refused (RFC 9110 15.2.1: a
   server that will reject the body should answer with the final status instead). The 100
   is now withheld when the declared Content-Length is over the limit
   (``set_body_limit``); the app's 413 then arrives in its place.

9. **Refusals below the app are heard.** A request hypercorn answers itself before the
   app sees it (h11's 400 for a malformed request line or header, 431 for a head over
   h11's limit, 501 for a transfer coding it does not know, and the 400 / 505 of patches
   6 and 7) is reported to
   ``on_protocol_error`` listeners, so the access log and the request metrics count it
   like any other answer instead of never hearing of it; its answer carries a fresh
   ``X-Request-ID``, which its access line has (a head refused for how it was written
   names no id that could be trusted). A protocol error in the middle
   of a request the app is serving (a malformed chunk of its body) is noted in that
   request's ASGI scope (``REFUSED_MID_REQUEST``) instead: the app records the request
   with the status the client got, not as a client that left, under the id that 400
   carries (``REQUEST_ID_MID_REQUEST``: the client's, if sane, else a fresh one). A
   client that closes its side mid-request is no refusal (h11 calls it a 400) and gets no
   answer: it left, a 499 if the app was serving its request, nothing if its head was cut
   short.

10. **A connection closing at shutdown does not hold it.** A request received behind the
    one answered (pipelined, or sent just as its response went out) made hypercorn's
    reader wait for a turn that never came once the connection was not recycled, holding
    the shutdown for its whole grace period. At shutdown such a request is now served
    when its whole head is there (its response says ``Connection: close``), and the
    connection closed when only part of one is; and the reader of a connection that is
    not recycled stops at once (``_ReadsEnded``) instead of waiting.

11. **Empty lines before a request are ignored** (RFC 9112 2.2: a server SHOULD ignore
    at least one CRLF before the request-line). h11 answered a request with an extra CRLF
    after its body (as some older clients send) with ``400`` for the next "request" and
    closed the connection. Up to ``MAX_EMPTY_LINES`` are skipped; more are still a 400.

12. **Status lines carry their reason phrase** (``HTTP/1.1 404 Not Found``, as Ollama's and
    OpenAI's servers send): hypercorn gave h11 none, so every status line ended in a bare
    space, and clients that show the phrase (requests' ``raise_for_status``, fetch's
    ``statusText``, curl) showed nothing. A status without a registered phrase keeps none.

13. **Bytes after a request that said ``Connection: close`` are dropped.** h11 took them
    (a CRLF some clients send after a body, a body longer than its Content-Length, a
    request pipelined behind) for a protocol error, and hypercorn answered a bare 400 in
    place of the app's answer. RFC 9112 9.6: a server does not process further requests
    on such a connection; it answers the one it has and closes.

14. **A WebSocket handshake hypercorn refuses itself closes its connection.** An invalid
    handshake (no ``Sec-WebSocket-Key``, another version, a body) got hypercorn's bare
    400 with ``Connection: close``, and the connection then stayed open for ever: its
    stream never said it had ended. It is heard as patch 9's refusals are (counted,
    logged, a fresh ``X-Request-ID``). (A valid one reaches the app, which serves it on
    ``/v1/responses``, ``responses_socket``, and refuses it elsewhere: ``app.RefusedWebsocket``.)

15. **A connection closed with its request body still arriving lingers.** An answer given
    before the body was read (a 413 for a declared body over MAX_REQUEST_BYTES) was
    followed by a close at once: the body bytes still arriving then met a closed socket,
    the kernel reset the connection, and a client still writing its body failed on the
    write (Node's fetch, so ollama-js and the openai SDK for JavaScript: ``fetch failed``,
    ``EPIPE``) instead of reading the answer waiting for it. Such a connection now closes
    its sending side (the client reads the answer and its end) and reads and drops what
    the client still sends, until the client closes or for ``LINGER_SECONDS`` (as nginx's
    lingering close). TLS connections, which cannot close one side, close as before.

16. **Open connections are capped per worker** (``cap_connections``, MAX_CONNECTIONS), as
    nginx's ``worker_connections``. With the open files limit raised to the hard one
    (limits.py) nothing else bounded them: idle keep-alive connections (held 75 s, ~16 KiB
    each) held ~8 GiB per worker at 524,288. Past the cap a new connection is not served:
    its request is not read (its path, and so its dialect, is unknown), it gets a fixed
    ``503`` with ``Connection: close``, ``Retry-After``, a fresh ``X-Request-ID`` (its
    access line's) and ``{"error": "..."}`` (the shape
    both Ollama's clients and OpenAI's SDKs read), then a close. The 503, not a bare close,
    so a client reads why, and an SDK that retries a 503 waits as told; its sending side
    is closed and what the client still sends read and dropped for ``LINGER_SECONDS`` at
    most (as patch 15: a close with unread bytes is a reset, which can destroy the answer),
    for at most ``MAX_LINGERING_REFUSALS`` refusals at once (a flood is closed at once past
    that). A TLS connection is closed at once: a handshake would cost the flood's CPU. One
    WARNING per ``REFUSAL_LOG_INTERVAL`` at most; the counts are plain integers, read by the
    metrics when they publish (``trioproxy_connections_open``, ``_refused_total``): one
    increment and one decrement per connection, nothing per request, no lock. The cap is
    the app's (set by ``create_app``), so the demo backend, a hypercorn server in the same
    process, neither counts in it nor is capped.

17. **No compressed WebSocket messages** (permessage-deflate, which browsers and the
    websockets library offer; the openai SDKs do not). hypercorn accepted it, and inflated
    each read before the message size limit saw it: 64 KiB of compressed zeros became
    64 MiB held at once, so a client could make the proxy hold its whole MAX_REQUEST_BYTES
    per connection, over and over, for a thousandth of it sent. The handshake is answered
    without the extension; the client then sends its messages as they are.

18. **The app hears why hypercorn closed a WebSocket.** A message over its size limit
    (MAX_REQUEST_BYTES) was closed with 1009, and the app then told ``websocket.disconnect``
    with 1006, as for a client that went away: the proxy could not count it apart. The
    disconnect now carries 1009 (``trioproxy_websockets_closed_total{reason="too_big"}``).

19. **A request's close is heard at once.** hypercorn tells the app that its client left
    only by queueing ``http.disconnect`` for ``receive()``, so the app kept a task per
    request awaiting it (and a nursery for that task: ~5 % of a proxied request's
    instructions). The app may instead hand the stream a cancel scope
    (``cancel_on_close``): when the stream closes before the response is finished,
    the scope is cancelled where hypercorn queues the disconnect. Only an HTTP/1.1
    stream of hypercorn's (the protocol whose closing is patched here) takes one; for
    any other server ``close_hook`` is None and the app keeps its watcher task.

20. **A stream's chunk goes to h11 and the socket without hypercorn's event layers.**
    An ASGI body event went through ``app_send`` (its dict inspected), a ``Body`` event,
    ``stream_send``'s type dispatch, ``h11.Data``, a ``RawData`` event and
    ``protocol_send``'s dispatch: about a fifth of a relayed chunk's instructions. The app
    may send a chunk of an HTTP/1.1 stream whose head is out with ``chunk_sender``'s
    function instead: the same h11 event, the same write (``_send_data``, patch 4), the
    same outcome for a closed connection; anything else takes ``app_send`` as before.

21. **The client's bytes are read without a timeout scope or a failed read first.** The
    reader entered ``trio.fail_after`` for every read, also without a read timeout (an
    infinite one, as the proxy runs: long streams), and trio's ``receive_some`` first
    tried a read that, on a connection whose request was just handed on, found nothing
    and raised before it waited: both once per request. A plain TCP connection without a
    read timeout now waits for the socket to be readable and then reads what is there
    (``_received``, as the backend's reads in netstream); TLS, or a read timeout, reads
    as before. A new connection's first read is tried at once (its request is usually
    there). ~103k machine instructions less per proxied request, 3.5 %
    (docs/performance-history.md).

22. **A new connection is served in fewer scheduler rounds.** trio's listener took one
    queued connection per round (``trioproxy.accept`` now takes every one waiting, as
    asyncio does), and the keep-alive timer's first arm waited two rounds for its task to
    start (``nursery.start``); it now makes the watcher's cancel scope itself and starts
    the task without waiting. Under load each round is a batch of every ready task's
    step, so a burst of fresh connections waited that many batches with its requests
    unread.

23. **A request's events enter the app's queue without a scheduler round.** hypercorn
    put each one (the body, its end) with the trio channel's ``send``, which yields to
    the scheduler even with room in the queue. They are put with ``send_nowait`` now,
    and only a full queue waits (its bound, ``max_app_queue_size``, still holds the
    reader back). With the proxy's routes taking a body already queued without a round
    (``fastpath``), a request's head and body reach the route in one step.

The semantics of the keep-alive timer are hypercorn's: a connection idle for
``keep_alive_timeout`` seconds is closed (one that has not sent a whole request head yet
after ``FIRST_REQUEST_SECONDS`` at most); at shutdown an idle connection is closed at once and
a busy one after its response. Importing this module applies the patches once;
tests/test_server.py and tests/test_hypercorn_patches.py pin the behaviour, so a version bump
cannot silently undo them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any, Protocol

import h11
import h11._readers as h11_readers
import hypercorn.protocol as protocol_wrapper
import hypercorn.protocol.h11 as h11_protocol
import hypercorn.protocol.ws_stream as ws_stream
import hypercorn.trio.task_group as hypercorn_task_group
import hypercorn.trio.tcp_server as tcp_server
import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.events import Body, EndBody, Response, StreamClosed
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.worker_context import EventWrapper, WorkerContext
from hypercorn.utils import suppress_body
from wsproto.connection import Connection
from wsproto.connection import ConnectionState as WSConnectionState

from . import accept  # noqa: F401  (patch 22: applied on import)
from .logs import fresh_request_id, scope_request_id
from .netstream import send_what_fits

_HELD_HEAD = "_trioproxy_held_head"
# A held head goes alone before a body of this size or more: copied behind it, 1 MiB took
# the loop 40-80 us (about what the write saved costs), 40 MB 25-40 ms; the body (a large
# embeddings answer relayed) then goes as it is.
_ALONE_BYTES = 1 << 20


FIRST_REQUEST_SECONDS = 10.0
"""A new connection's first request head must arrive within this (or the keep-alive
timeout, if shorter): the long keep-alive timeout (75 s) is for clients and load balancers
that pool connections, not for a connection that never sent a request, or sends its head a
byte at a time (a slow-headers attack held each such connection 75 s)."""


class IdleTimer:
    """The keep-alive timer of one connection: ``restart`` (the connection went idle) and
    ``stop`` (a request arrived), with ``TrioSingleTask``'s interface.

    One watcher task per connection waits for shutdown inside a cancel scope whose deadline
    is the idle deadline: infinite while a request is served. The deadline passing, or
    shutdown while idle, closes the connection."""

    __slots__ = ("_became_idle", "_closed", "_idle", "_scope", "_served", "_server")

    def __init__(self, server: Any) -> None:
        self._server = server
        self._scope: trio.CancelScope | None = None
        self._idle = False
        self._closed = False
        self._served = False  # a whole request head arrived on this connection
        self._became_idle: trio.Event | None = None

    async def restart(self, task_group: Any, action: Any = None) -> None:
        self._idle = True
        if self._scope is None:
            # made here, entered by the watcher: ``nursery.start`` would cost the new
            # connection two scheduler rounds before its first read (a scope cancelled
            # or past its deadline before it is entered ends the watcher at once)
            self._scope = trio.CancelScope()
            task_group._nursery.start_soon(self._watch, self._scope)
        timeout = self._server.config.keep_alive_timeout
        if not self._served:
            timeout = min(timeout, FIRST_REQUEST_SECONDS)
        self._scope.deadline = trio.current_time() + timeout
        if self._became_idle is not None:
            self._became_idle.set()

    async def stop(self) -> None:
        self._idle = False
        self._served = True
        if self._scope is not None:
            self._scope.deadline = math.inf

    def connection_closed(self) -> None:
        """Nothing more will be read from the connection (the client closed it or left
        mid-request, or the server closed it): the watcher ends without closing it again,
        so it never keeps a finished connection's task group open."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    async def _watch(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._server.context.terminated.wait()
            if not self._idle:  # shutting down: let the response in progress finish first
                self._became_idle = trio.Event()
                await self._became_idle.wait()
        if self._closed:
            return
        # the idle deadline passed, or the server is shutting down and we are idle
        with trio.CancelScope(shield=True):
            await self._server._initiate_server_close()


_original_init = tcp_server.TCPServer.__init__
_original_protocol_send = tcp_server.TCPServer.protocol_send


log = logging.getLogger("trioproxy")


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    self.idle_task = IdleTimer(self)
    self.lingering = False
    self.reads = trio.CancelScope()  # the reader's, once it runs


async def _read_data(self: Any) -> None:
    try:
        with trio.CancelScope() as scope:
            self.reads = scope  # a lingering close ends them by its deadline
            await _read_until_closed(self)
    finally:
        # nothing more will be read: the connection closes once its tasks are done, and
        # the timer must not hold it open (the client may have left mid-request)
        self.idle_task.connection_closed()


async def _read_until_closed(server: Any) -> None:
    """hypercorn's reader, except that once the connection lingers (patch 15) what
    arrives is dropped, not handed to the protocol; and a plain TCP connection without a
    read timeout is read by :func:`_received` (patch 21)."""
    config = server.config
    stream = server.stream
    direct = type(stream) is trio.SocketStream and not config.read_timeout
    first = True
    while True:
        try:
            if direct:
                # a new connection's request is usually there already (a client writes
                # it as soon as it connected): read first, not after a scheduler round
                # that, with the loop busy, is a whole batch of every other task's steps
                data = await _received(stream.socket, wait_first=not first)
                first = False
            else:
                with trio.fail_after(config.read_timeout or math.inf):
                    data = await stream.receive_some(tcp_server.MAX_RECV)
        except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
            break
        if server.lingering:
            if not data:
                return
            continue
        await server.protocol.handle(RawData(bytes(data)))
        if not data:
            break
    if not server.lingering:
        await server.protocol.handle(Closed())


async def _received(sock: trio.socket.SocketType, *, wait_first: bool = True) -> bytes:
    """What the client sent next (b"" once it closed its side), as ``receive_some`` gives
    it, with its errors as the stream's: waiting for the socket to be readable (first,
    unless ``wait_first`` is false), then reading what is there in one call."""
    try:
        while True:
            if sock.fileno() < 0:  # closed here (a response that closed the connection)
                raise trio.ClosedResourceError("the connection is closed")
            # waiting first saves the read that finds nothing yet: the usual case, as the
            # reader asks again as soon as it handed a request on
            if wait_first:
                await trio.lowlevel.wait_readable(sock)
            wait_first = True
            try:
                return os.read(sock.fileno(), tcp_server.MAX_RECV)
            except BlockingIOError:
                continue
    except OSError as exc:  # EBADF: closed under us; ECONNRESET and the like: broken
        raise trio.BrokenResourceError(str(exc)) from exc


# how long a connection closed with its request body still arriving keeps reading it
LINGER_SECONDS = 2.0


async def _protocol_send(self: Any, event: Any) -> None:
    if type(event) is RawData:
        if event.data:
            await _send_data(self, event.data)
    elif isinstance(event, Closed):
        with trio.CancelScope(shield=True):
            if _body_still_arriving(self) and await _close_sending_side(self):
                await self.protocol.handle(Closed())
            else:
                await _original_protocol_send(self, event)
    else:
        await _original_protocol_send(self, event)


def _body_still_arriving(server: Any) -> bool:
    """Whether the client is (or may be) still sending the request body."""
    connection = getattr(getattr(server.protocol, "protocol", None), "connection", None)
    return type(connection) is h11.Connection and connection.their_state is h11.SEND_BODY


async def _close_sending_side(server: Any) -> bool:
    """Close the connection's sending side and let its reader drop what still arrives
    for ``LINGER_SECONDS`` (patch 15); False where one side cannot be closed alone (TLS),
    or the connection is gone already. The connection closes when its reader ends."""
    try:
        await server.stream.send_eof()
    except (
        AttributeError,
        trio.BrokenResourceError,
        trio.BusyResourceError,
        trio.ClosedResourceError,
    ):
        return False
    server.lingering = True
    server.reads.deadline = trio.current_time() + LINGER_SECONDS
    return True


async def _send_data(server: Any, data: bytes) -> None:
    stream = server.stream
    if type(stream) is not trio.SocketStream or server.send_lock.locked():
        # TLS, or another write still waiting for room: queue behind it
        await _send_rest(server, data)
        return
    try:
        sent = send_what_fits(stream.socket, data)
    except OSError:  # the client is gone (or the socket already closed): as hypercorn does
        write_cut.set(True)
        await server.protocol.handle(Closed())
        return
    if sent < len(data):
        # a view, not a copy of the rest (of a 40 MB body, 25-40 ms of the loop)
        await _send_rest(server, memoryview(data)[sent:])


# set in the task whose write the client did not take whole (it made no room within the
# write timeout, or was gone): its send returned normally, so this is how the app learns
# that its response did not arrive
write_cut: ContextVar[bool] = ContextVar("trioproxy_write_cut", default=False)
# set with it when the write was cut by the end of a shutdown's grace period: the proxy
# cut that response (503), its client did not leave (499)
write_cut_by_shutdown: ContextVar[bool] = ContextVar("trioproxy_shutdown_cut", default=False)

_write_timeout = 60.0
# the latest a write may wait once a shutdown began (its grace period): trio time
_writes_end_at = math.inf
# piece by piece, so the write timeout measures a stall, not the whole body's download
_WRITE_PIECE = 64 * 1024
_waiting_writes: set[trio.CancelScope] = set()


_body_limit: int | None = None


def set_body_limit(limit: int | None) -> None:
    """The largest request body the app reads (MAX_REQUEST_BYTES): a request declaring a
    larger one is not invited to send it with ``100 Continue``."""
    global _body_limit
    _body_limit = limit


def _refuses_declared_body(protocol: Any) -> bool:
    if _body_limit is None or protocol.stream is None:
        return False
    for name, value in protocol.stream.scope["headers"]:
        if name == b"content-length":
            return value.isdigit() and int(value) > _body_limit
    return False


def set_write_timeout(seconds: float) -> None:
    """How long a write may wait for a client to make room (CLIENT_WRITE_TIMEOUT)."""
    global _write_timeout
    _write_timeout = seconds


def end_writes_within(seconds: float) -> None:
    """A shutdown began: no write waits for a client past ``seconds`` from now (the grace
    period), however long the write timeout; a second signal is not held up by them."""
    global _writes_end_at
    _writes_end_at = min(_writes_end_at, trio.current_time() + seconds)
    for scope in _waiting_writes:
        scope.deadline = min(scope.deadline, _writes_end_at)


async def _send_rest(server: Any, data: bytes | memoryview) -> None:
    """hypercorn's write (behind its send lock, shielded: part of the framing may be out
    already), bounded: a client that makes no room for the next piece within the write
    timeout has stopped reading, and its connection is closed."""
    gone = False
    view = memoryview(data)
    # the shield covers the wait for the lock too: a request cancelled since its first
    # bytes went out must still finish the framing it started
    with trio.CancelScope(shield=True) as scope:
        _waiting_writes.add(scope)
        try:
            scope.deadline = min(trio.current_time() + _write_timeout, _writes_end_at)
            async with server.send_lock:
                for at in range(0, len(view), _WRITE_PIECE):
                    # progress: the client reads, so the wait starts again
                    scope.deadline = min(trio.current_time() + _write_timeout, _writes_end_at)
                    await server.stream.send_all(view[at : at + _WRITE_PIECE])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            gone = True
        finally:
            _waiting_writes.discard(scope)
    if scope.cancelled_caught or gone:
        write_cut.set(True)
    if scope.cancelled_caught:
        if _writes_end_at <= trio.current_time():
            write_cut_by_shutdown.set(True)
            log.info("closing a connection whose client took no more before shutting down")
        else:
            log.info("closing a connection whose client made no room for %g s", _write_timeout)
        with trio.CancelScope(shield=True):
            await server.stream.aclose()  # as hypercorn closes one (idempotent)
            await server.protocol.handle(Closed())
    elif gone:
        await server.protocol.handle(Closed())


_original_stream_send = h11_protocol.H11Protocol.stream_send


async def _send_h11_event(self: Any, event: Any) -> None:
    # hypercorn's own version, plus holding back the head of a sized response
    if type(event) is h11.InformationalResponse and _refuses_declared_body(self):
        return  # the app's 413 answers instead; h11 stops waiting once it is sent
    if type(event) is h11.Response and self.context.terminated.is_set():
        event = _closing(event)
    try:
        data = self.connection.send(event)
    except h11.LocalProtocolError:
        if self.connection.their_state != h11.ERROR:
            raise
        return
    if type(event) in _STATUS_EVENTS and not event.reason:
        data = _with_reason_phrase(data, event.status_code)
    head = self.__dict__.pop(_HELD_HEAD, None)
    if head is not None:
        if len(data) < _ALONE_BYTES:
            data = head + data
        else:  # the body's copy behind the head would hold the loop longer than a write
            await self.send(RawData(data=head))
    if type(event) is h11.Response and _has_length(event):
        self.__dict__[_HELD_HEAD] = data  # sent with the body, or at the end of the message
    elif data:
        await self.send(RawData(data=data))


_STATUS_EVENTS = (h11.Response, h11.InformationalResponse)
# per status: the line h11 writes without a phrase, and the line with the registered one
_STATUS_LINES = {
    int(status): (
        b"HTTP/1.1 %d \r\n" % status,
        b"HTTP/1.1 %d %s\r\n" % (status, status.phrase.encode()),
    )
    for status in HTTPStatus
}


def _with_reason_phrase(head: bytes, status: int) -> bytes:
    lines = _STATUS_LINES.get(status)
    if lines is None or not head.startswith(lines[0]):
        return head
    bare, phrased = lines
    return phrased + head[len(bare) :]


def _closing(response: h11.Response) -> h11.Response:
    """``response`` saying that the connection closes after it, as it does once a shutdown
    began: a pooling client that is not told reuses the connection and finds it closed."""
    for name, value in response.headers:
        if name == b"connection" and b"close" in value.lower():
            return response
    headers = [*response.headers, (b"connection", b"close")]
    return h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)


def _has_length(response: h11.Response) -> bool:
    return any(name == b"content-length" for name, _ in response.headers)


async def _stream_send(self: Any, event: Any) -> None:
    if type(event) is not Body and type(event) is not EndBody:
        # anything else (the stream closing early, an error) first sends a head held back
        head = self.__dict__.pop(_HELD_HEAD, None)
        if head:
            await self.send(RawData(data=head))
    await _original_stream_send(self, event)


class _AmbiguousLength(Exception):
    """A request with both Content-Length and Transfer-Encoding (RFC 9112 6.3)."""


async def _check_protocol(self: Any, event: h11.Request) -> None:
    if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
        raise h11_protocol.H2ProtocolAssumedError(b"")
    # an "Upgrade: h2c" header is ignored: the request is served in HTTP/1.1
    for name, _ in event.headers:
        if name == b"transfer-encoding":  # rare: no cost for the usual request
            if any(other == b"content-length" for other, _ in event.headers):
                raise _AmbiguousLength
            break


async def _handle_http11_only(self: Any, event: Any) -> None:
    try:
        await self.protocol.handle(event)
    except _NoMoreReads:
        return  # the connection is closing: its reader finds the stream closed and ends
    except h11_protocol.H2ProtocolAssumedError:
        await self.protocol._send_error_response(505)
        await self.protocol.send(Closed())
    except _AmbiguousLength:
        await self.protocol._send_error_response(400)
        await self.protocol.send(Closed())


class _NoMoreReads(Exception):
    """Raised to the connection's reader where hypercorn would wait to read the next
    request of a connection that is closing."""


class _ReadsEnded:
    """``can_read`` of a connection that will not be recycled. hypercorn's reader, with a
    request already received behind the one answered (h11's ``PAUSED``), waited for
    ``can_read``, was woken by the close, found the request still there and waited again:
    for ever, holding the connection's task, and a shutdown, for its whole grace period."""

    async def set(self) -> None:
        pass

    async def clear(self) -> None:
        pass

    async def wait(self) -> None:
        raise _NoMoreReads

    def is_set(self) -> bool:
        return True


_READS_ENDED = _ReadsEnded()


async def _maybe_recycle(self: Any) -> None:
    """hypercorn's, plus: at shutdown a request already received behind the one answered
    is served (its response says ``Connection: close``), not left unanswered; and a
    connection that is not recycled ends its reader (``_ReadsEnded``)."""
    await self._close_stream()
    connection = self.connection
    shutting_down = self.context.terminated.is_set()
    if (
        connection.our_state is h11.DONE
        and connection.their_state is h11.DONE
        and (not shutting_down or _holds_a_whole_head(connection.trailing_data[0]))
    ):
        try:
            connection.start_next_cycle()
        except h11.LocalProtocolError:
            pass
        else:
            await self.can_read.set()
            if not shutting_down:
                # at shutdown the connection is busy with the request it has, not idle:
                # the keep-alive timer would close it under that request
                await self.send(Updated(idle=True))
            return
    reading, self.can_read = self.can_read, _READS_ENDED
    await reading.set()
    await self.send(Closed())


# (patch 19) the attribute of a stream holding what its close cancels: a class attribute
# of None, so that a stream without one is read without an AttributeError
_ON_CLOSE = "_trioproxy_on_close"


class Finishes(Protocol):
    """A response that knows whether its last body event was handed to the server
    (``exchange.CountingSend``)."""

    finished: bool


def close_hook(send: Any) -> Any:
    """The stream behind an ASGI ``send`` when it is an HTTP/1.1 stream of hypercorn's,
    whose close ``_close_stream`` reports (``cancel_on_close``); else None (another
    server, a test's send, a wrapped send): the app then watches ``receive()``."""
    stream = getattr(send, "__self__", None)
    if type(stream) is not HTTPStream:
        return None
    # its HTTP/2 and HTTP/3 streams are HTTPStreams too, closed by other protocols
    if type(getattr(stream.send, "__self__", None)) is not h11_protocol.H11Protocol:
        return None
    return stream


def chunk_sender(send: Any) -> Callable[[bytes], Awaitable[None]]:
    """What sends one more chunk of a streamed response's body through ``send`` (an ASGI
    send): as ``send({"type": "http.response.body", "body": chunk, "more_body": True})``
    does, and for an HTTP/1.1 stream of hypercorn's (``close_hook``'s) whose response head
    is out, straight to its h11 connection and socket (patch 20)."""

    async def send_event(chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    stream = close_hook(send)
    if stream is None:
        return send_event
    protocol = stream.send.__self__
    server = getattr(protocol.send, "__self__", None)
    if type(server) is not tcp_server.TCPServer:  # a wrapped send: no shortcut
        return send_event

    async def send_chunk(chunk: bytes) -> None:
        if (
            stream.state is not ASGIHTTPState.RESPONSE
            or not chunk
            or _HELD_HEAD in protocol.__dict__
            or suppress_body(stream.scope["method"], int(stream.response["status"]))
        ):
            await stream.app_send({"type": "http.response.body", "body": chunk, "more_body": True})
            return
        try:
            data = protocol.connection.send(h11.Data(data=chunk))
        except h11.LocalProtocolError:  # as _send_h11_event: a connection already failed
            if protocol.connection.their_state != h11.ERROR:
                raise
            return
        if data:
            await _send_data(server, data)

    return send_chunk


def cancel_on_close(stream: Any, scope: trio.CancelScope, response: Finishes) -> None:
    """Cancel ``scope`` when ``stream`` (``close_hook``'s) closes before ``response`` is
    finished; at once if it has already closed (the client left while its body was
    being joined). A response finished when it closes (hypercorn closes the stream from
    inside the last body event's send) is not cancelled."""
    if stream.closed:
        if not response.finished:
            scope.cancel()
        return
    setattr(stream, _ON_CLOSE, (scope, response))


async def _close_stream(self: Any) -> None:
    """hypercorn's, plus: the cancel scope the app handed the stream (patch 19) is
    cancelled if the response is not finished, before the disconnect is queued."""
    stream = self.stream
    if stream is not None:
        watch = getattr(stream, _ON_CLOSE, None)
        if watch is not None:
            # dropped: the response's send is the stream's, a cycle for the collector
            setattr(stream, _ON_CLOSE, None)
            scope, response = watch
            if not stream.closed and not response.finished:
                scope.cancel()
        await stream.handle(StreamClosed(stream_id=h11_protocol.STREAM_ID))
        self.stream = None


def _holds_a_whole_head(data: bytes) -> bool:
    """Whether bytes received behind a response hold a request's whole head: at shutdown
    only such a request is served. Part of one (a client that stalled, or is still
    sending) would hold the connection, and the shutdown, for the whole grace period."""
    data = data.lstrip(b"\r\n")  # empty lines before a request are skipped (patch 11)
    return b"\r\n\r\n" in data or b"\n\n" in data


_shutdown_listeners: list[Callable[[], None]] = []


def on_shutdown(listener: Callable[[], None]) -> Callable[[], None]:
    """Call ``listener()`` (from hypercorn's task, so it must not block) when hypercorn
    begins its graceful shutdown; returns the function that unsubscribes it."""
    _shutdown_listeners.append(listener)
    return lambda: _shutdown_listeners.remove(listener)


class _AnnouncedShutdown(EventWrapper):
    async def set(self) -> None:
        first = not self.is_set()
        await super().set()
        if first:
            for listener in list(_shutdown_listeners):
                listener()


ProtocolErrorListener = Callable[[int, "tuple[str, int] | None", str, str], None]
_protocol_error_listeners: list[ProtocolErrorListener] = []


def on_protocol_error(listener: ProtocolErrorListener) -> Callable[[], None]:
    """Call ``listener(status, peer, request_id, reason)`` (from hypercorn's task, so it
    must not block) when a request is refused at the protocol level before the app saw
    it; ``peer`` is the connection's (host, port), None on a unix socket; ``request_id``
    the fresh id its answer carries (``X-Request-ID``); ``reason`` what was refused
    (``malformed request``, ``websocket``). Returns the function that unsubscribes it."""
    _protocol_error_listeners.append(listener)
    return lambda: _protocol_error_listeners.remove(listener)


_original_send_error_response = h11_protocol.H11Protocol._send_error_response


# the ASGI scope's key for the status the server answered a request the app was reading
# (a malformed chunk in its body): the app sees only the disconnect that follows, and
# records this status instead of a client that left (499)
REFUSED_MID_REQUEST = "trioproxy.refused"
# the ASGI scope's key for the id that answer carries: the client's X-Request-ID if it is
# sane, else a fresh one; the app takes it for the request's access line. (The app's own
# id is not stored for the server to find: that cost every request a store, for an answer
# that almost none gets, and the server may refuse the body before the app's task ran.)
REQUEST_ID_MID_REQUEST = "trioproxy.request_id"


async def _send_error_response(self: Any, status_code: int) -> None:
    if self.connection.trailing_data[1]:
        # The client closed its side before its request was whole (h11 calls that a 400):
        # it left. Nothing is sent (RFC 9112 9.6: an answer to an incomplete request is a
        # MAY), so what is recorded is what happened whether it closed both ways or only
        # its sending side: the app sees the disconnect (a 499); a head cut short is no
        # request at all, as a connection closed before any byte is none.
        return
    if self.stream is None:
        # a fresh id, as every answer has one: a head that could not be parsed (or is
        # refused for how it was framed) names no id of its own that could be trusted
        request_id = _heard_refusal(status_code, self.client, "malformed request")
        await _send_refusal(self, status_code, request_id)
        return
    # the app is serving the request and records it, under the id its answer carries
    scope = getattr(self.stream, "scope", None)
    if scope is not None:
        request_id = scope[REQUEST_ID_MID_REQUEST] = scope_request_id(scope)
        scope[REFUSED_MID_REQUEST] = status_code
        await _send_refusal(self, status_code, request_id)
        return
    await _original_send_error_response(self, status_code)


def _heard_refusal(status: int, peer: tuple[str, int] | None, reason: str) -> str:
    """Tell the listeners of a refusal before the app; the fresh id its answer carries."""
    request_id = fresh_request_id()
    for listener in list(_protocol_error_listeners):
        listener(status, peer, request_id, reason)
    return request_id


def _refusal_headers(request_id: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-length", b"0"),
        (b"connection", b"close"),
        (b"x-request-id", request_id.encode()),
    ]


async def _send_refusal(protocol: Any, status_code: int, request_id: str) -> None:
    """hypercorn's bodyless error answer, with its request id."""
    headers = _refusal_headers(request_id) + protocol.config.response_headers("h11")
    await protocol._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await protocol._send_h11_event(h11.EndOfMessage())


_original_ws_send_error_response = ws_stream.WSStream._send_error_response


async def _ws_send_error_response(self: Any, status_code: int) -> None:
    """hypercorn's answer to a WebSocket handshake it refuses itself (invalid: no key,
    another version), heard and given an id as any refusal before the app; an answer
    of the app's (a close before accepting) is the app's to record."""
    if self.app_put is not None:
        await _original_ws_send_error_response(self, status_code)
        return
    request_id = _heard_refusal(status_code, self.client, "websocket")
    headers = _refusal_headers(request_id)
    await self.send(Response(stream_id=self.stream_id, status_code=status_code, headers=headers))
    await self.send(EndBody(stream_id=self.stream_id))


_original_ws_accept = ws_stream.Handshake.accept


def _ws_accept_uncompressed(
    self: ws_stream.Handshake,
    subprotocol: str | None,
    additional_headers: Iterable[tuple[bytes, bytes]],
) -> tuple[int, list[tuple[bytes, bytes]], Connection]:
    """hypercorn's acceptance of a WebSocket handshake, without permessage-deflate (patch
    17): as if the client had offered no extension."""
    self.extensions = None
    return _original_ws_accept(self, subprotocol, additional_headers)


_original_context_init = WorkerContext.__init__


def _context_init(self: Any, max_requests: int | None) -> None:
    _original_context_init(self, max_requests)
    self.terminated = _AnnouncedShutdown()


MAX_EMPTY_LINES = 4
# READERS[(CLIENT, IDLE)] by its name: READERS' values are typed as functions or dicts
_original_idle_client_reader = h11_readers.maybe_read_from_IDLE_client


_original_ws_handle = ws_stream.WSStream.handle


async def _ws_handle(self: Any, event: Any) -> None:
    if type(event) is StreamClosed and getattr(self, _TOO_BIG, False) and not self.closed:
        # the app is told what the client was told (patch 18)
        self.closed = True
        await self.app_put({"type": "websocket.disconnect", "code": 1009})
        return
    closed = self.closed
    connected = type(event) is not StreamClosed and _ws_open(self)
    await _original_ws_handle(self, event)
    if connected and _ws_closing_itself(self):
        setattr(self, _TOO_BIG, True)
    if self.closed and not closed and type(event) is not StreamClosed:
        # hypercorn answered the handshake itself (400/404) and stopped there
        await self.send(StreamClosed(stream_id=self.stream_id))


# set on a WSStream hypercorn closed for a message over its size limit (patch 18)
_TOO_BIG = "_trioproxy_too_big"


def _ws_open(stream: Any) -> bool:
    """Whether the app accepted ``stream`` and neither side has begun to close it."""
    return (
        stream.state is ws_stream.ASGIWebsocketState.CONNECTED
        and stream.connection.state is WSConnectionState.OPEN
    )


def _ws_closing_itself(stream: Any) -> bool:
    """Whether hypercorn began to close ``stream`` (it sent a close the app did not ask
    for, the client has not answered): while reading, only for a message too big."""
    return (
        stream.state is ws_stream.ASGIWebsocketState.CONNECTED
        and stream.connection.state is WSConnectionState.LOCAL_CLOSING
    )


def _nothing_after_close(buf: Any) -> None:
    """The reader of a client that said ``Connection: close`` (h11's MUST_CLOSE): what
    else it sends is no request, and not an error either."""
    buf.maybe_extract_at_most(len(buf))


def _read_request_after_empty_lines(buf: Any) -> Any:
    """h11's reader of a request-line and headers, past a few empty lines before them:
    each one h11 takes out of the buffer and reports as a missing request line."""
    for _ in range(MAX_EMPTY_LINES):
        try:
            return _original_idle_client_reader(buf)
        except h11.LocalProtocolError as error:
            if str(error) != "no request line received":
                raise
    return _original_idle_client_reader(buf)


REFUSAL_LOG_INTERVAL = 10.0  # seconds between the WARNING lines about refused connections
MAX_LINGERING_REFUSALS = 256  # refused connections read and dropped at once, at most
REFUSAL_RETRY_AFTER = 1  # seconds, as the proxy's other 503s (MAX_CONCURRENT_REQUESTS)
_CAP_ATTRIBUTE = "_trioproxy_connection_cap"


class ConnectionCap:
    """The open client connections of one app's server (per worker) and their cap: the
    counts the metrics read (``open``, ``refused``), and the refusal past the cap."""

    __slots__ = (
        "_held_back",
        "_lingering",
        "_logged_at",
        "answer",
        "limit",
        "on_refused",
        "open",
        "refused",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit or sys.maxsize  # 0: no cap, only the count
        self.open = 0
        self.refused = 0  # since start
        self._lingering = 0
        self._logged_at = -math.inf
        self._held_back = 0
        self.answer = _refusal(limit)
        # told of each refused connection: its peer (host, port) or None, the bytes of
        # the answer it was sent and that answer's request id (the access log's line;
        # None: no one listens)
        self.on_refused: Callable[[tuple[str, int] | None, int, str], None] | None = None

    def lower_to(self, limit: int) -> None:
        """Cap at ``limit`` from now on (what the open files limit leaves room for)."""
        self.limit = limit
        self.answer = _refusal(limit)

    async def refuse(self, stream: Any) -> None:
        """Answer a connection accepted past the cap with the 503 and close it."""
        self.refused += 1
        self._log_refusal()
        sent = 0
        request_id = fresh_request_id()  # as every answer has (also one over TLS, unsent)
        try:
            if type(stream) is not trio.SocketStream:
                return  # TLS: no handshake for a connection that will not be served
            answer = _with_request_id(self.answer, request_id)
            if self._lingering >= MAX_LINGERING_REFUSALS:
                sent = send_what_fits(stream.socket, answer)  # and the close at once
                return
            self._lingering += 1
            try:
                with trio.move_on_after(LINGER_SECONDS):
                    sent = await _answer(stream, answer)
                    await _drain(stream)
            finally:
                self._lingering -= 1
        except OSError:
            pass  # the client is gone already
        finally:
            if self.on_refused is not None:
                self.on_refused(_peer_of(stream), sent, request_id)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _log_refusal(self) -> None:
        now = time.monotonic()
        if now - self._logged_at < REFUSAL_LOG_INTERVAL:
            self._held_back += 1
            return
        refused = self._held_back + 1
        self._logged_at, self._held_back = now, 0
        log.warning(
            "refused %d new connection%s (503): this worker holds its limit of %d open "
            "connections (MAX_CONNECTIONS); at most one such line per %g s",
            refused,
            "" if refused == 1 else "s since the last such line",
            self.limit,
            REFUSAL_LOG_INTERVAL,
        )


def _refusal(limit: int) -> bytes:
    body = json.dumps(
        {
            "error": f"the proxy is holding its limit of {limit} open connections "
            "(MAX_CONNECTIONS); retry shortly"
        }
    ).encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Retry-After: %d\r\n"
        b"Connection: close\r\n\r\n%s"
    ) % (len(body), REFUSAL_RETRY_AFTER, body)


def _with_request_id(answer: bytes, request_id: str) -> bytes:
    """``answer`` (a whole HTTP/1.1 response, head and body) with an ``X-Request-ID``
    header: its head is fixed, its id new for each refusal."""
    return answer.replace(b"\r\n", b"\r\nX-Request-ID: %s\r\n" % request_id.encode(), 1)


async def _answer(stream: trio.SocketStream, answer: bytes) -> int:
    """Send ``answer`` and close the sending side; its bytes sent (0: the client is gone)."""
    try:
        await stream.send_all(answer)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return 0
    return len(answer)


async def _drain(stream: trio.SocketStream) -> None:
    """Drop what the client sends (its request, unread) until it closes."""
    try:
        while await stream.receive_some(tcp_server.MAX_RECV):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _peer_of(stream: Any) -> tuple[str, int] | None:
    """The (host, port) a refused connection came from (a TLS stream's from its socket);
    None when the socket cannot say (the client gone, a unix socket)."""
    socket = getattr(getattr(stream, "transport_stream", stream), "socket", None)
    try:
        peer = socket.getpeername() if socket is not None else None
    except OSError:
        return None
    return (peer[0], peer[1]) if isinstance(peer, tuple) else None


def cap_connections(app: Any, limit: int) -> ConnectionCap:
    """Cap the open connections of the server that serves ``app`` at ``limit`` per worker
    (0: no cap, only counted); the counts are the returned object's."""
    cap = ConnectionCap(limit)
    setattr(app, _CAP_ATTRIBUTE, cap)
    return cap


def connection_cap(app: Any) -> ConnectionCap | None:
    """The cap ``cap_connections`` put on ``app``'s server, if any."""
    return getattr(app, _CAP_ATTRIBUTE, None)


_original_spawn_app = hypercorn_task_group.TaskGroup.spawn_app


async def _spawn_app(self: Any, *args: Any, **kwargs: Any) -> Callable[[Any], Awaitable[None]]:
    put = await _original_spawn_app(self, *args, **kwargs)
    queue = getattr(put, "__self__", None)
    if type(queue) is not trio.MemorySendChannel:  # not the version this was written for
        return put

    async def put_in_queue(event: Any) -> None:
        try:
            queue.send_nowait(event)
        except trio.WouldBlock:  # the queue is full: wait for the app to take one
            await queue.send(event)

    return put_in_queue


_original_run = tcp_server.TCPServer.run


async def _run_within_cap(self: Any) -> None:
    cap = getattr(getattr(self.app, "app", None), _CAP_ATTRIBUTE, None)
    if cap is None:  # another app (the demo backend): hypercorn's own
        await _original_run(self)
        return
    if cap.open >= cap.limit:
        await cap.refuse(self.stream)
        return
    cap.open += 1
    try:
        await _original_run(self)
    finally:
        cap.open -= 1


if not getattr(tcp_server.TCPServer.__init__, "_trioproxy_patched", False):
    _init._trioproxy_patched = True  # type: ignore[attr-defined]
    tcp_server.TCPServer.__init__ = _init  # type: ignore[method-assign]
    tcp_server.TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]
    tcp_server.TCPServer._read_data = _read_data  # type: ignore[method-assign]
    tcp_server.TCPServer.run = _run_within_cap  # type: ignore[method-assign]
    hypercorn_task_group.TaskGroup.spawn_app = _spawn_app  # type: ignore[method-assign]
    h11_protocol.H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    h11_protocol.H11Protocol.stream_send = _stream_send  # type: ignore[method-assign]
    h11_protocol.H11Protocol._maybe_recycle = _maybe_recycle  # type: ignore[method-assign]
    h11_protocol.H11Protocol._close_stream = _close_stream  # type: ignore[method-assign]
    setattr(HTTPStream, _ON_CLOSE, None)
    WorkerContext.__init__ = _context_init  # type: ignore[method-assign]
    h11_protocol.H11Protocol._check_protocol = _check_protocol  # type: ignore[method-assign]
    protocol_wrapper.ProtocolWrapper.handle = _handle_http11_only  # type: ignore[method-assign]
    h11_protocol.H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]
    h11_readers.READERS[(h11.CLIENT, h11.IDLE)] = _read_request_after_empty_lines
    h11_readers.READERS[(h11.CLIENT, h11.MUST_CLOSE)] = _nothing_after_close
    ws_stream.WSStream.handle = _ws_handle  # type: ignore[method-assign]
    ws_stream.WSStream._send_error_response = _ws_send_error_response  # type: ignore[method-assign]
    ws_stream.Handshake.accept = _ws_accept_uncompressed  # type: ignore[method-assign]
