"""Backend socket I/O for httpcore with fewer scheduler rounds per read and write.

httpcore's trio stream wraps every socket read in an exception-mapping context manager and
``trio.fail_after`` even without a timeout, then trio's socket tries ``recv`` first, which
on a connection waiting for the backend fails with ``EAGAIN`` before it waits. Every write
goes through ``send_all`` and two scheduler yields, though a socket with room takes the
bytes in one call. Per proxied request that was about 55 µs of CPU, and 7 µs per relayed
stream chunk (docs/performance-history.md).

``DirectTCPBackend`` wraps the network backend of an httpcore pool (httpx's transport has
no public way to pass one in). Streams it opens read by waiting for readability first and
then reading what is there, and write straight to the socket when it has room; anything
else (TLS, a partial write, Unix sockets, connecting) is left to httpcore's own stream.

A read timeout costs a cancel scope per read (about 15 µs per relayed chunk). While a
``ReadDeadlines`` task runs, the streams register their deadline with it instead: one task
sleeps until the earliest deadline and closes the socket of a read that is still waiting
then, which ends that read with ``ReadTimeout``. Without the task, reads use a scope.

``H11Body`` reads a plain HTTP/1.1 response body the way httpcore's iterator does, on
the same h11 state, without the generator layers between it and the caller: about 12 µs
of CPU per relayed stream chunk (docs/performance-history.md). ``body_reader`` picks it or httpx,
and decodes an encoded body in bounded pieces (``DecodedBody``).

One fix to httpcore's HTTP/1.1 connection comes with it: a backend that sends bytes past
the end of its response gets that connection closed, not pooled (``_response_closed``).
And httpcore's connection locks, under trio, are taken without a scheduler round when
free (``_lock_enter``): a trio ``Lock`` yields to the scheduler on every acquire, and a
proxied request took three uncontended ones (the connection's request lock, its HTTP/1.1
state lock at the request and again when the response closes). A request with a small
body goes out in one write with its head (``_send_request_headers``), not two. And the
pool's closing of the connections it dropped opens no shielded scope when it dropped none
(``_close_connections``), which is twice per request.
"""

# httpcore's stream and backend interface passes timeouts as parameters
# ruff: noqa: ASYNC109

from __future__ import annotations

import functools
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any, NoReturn

import h11
import httpcore
import httpx
import trio
from httpcore import _synchronization
from httpcore._async import http11
from httpcore._async.connection_pool import PoolByteStream
from httpx._client import BoundAsyncStream
from httpx._exceptions import request_context
from httpx._transports.default import AsyncResponseStream, map_httpcore_exceptions

from .content_coding import ContentDecoder, ContentDecodingError, codings_of


def send_what_fits(socket: trio.socket.SocketType, data: bytes) -> int:
    """Write what the socket takes now, in one non-blocking call that no cancellation can
    interrupt: the bytes sent, 0 when its buffer is full; ``OSError`` when the connection is
    gone or the socket closed. No scheduler round: the caller sends any rest its own way."""
    try:
        return os.write(socket.fileno(), data)
    except BlockingIOError:
        return 0


class ReadDeadlines:
    """The read timeouts of every ``DirectTCPStream`` of a pool, kept by one task.

    ``run`` (owned by the app's nursery) sleeps in a cancel scope whose deadline is the
    earliest registered one; a read registers with ``watch`` and leaves with ``unwatch``.
    Registering only moves that deadline when it is earlier, which with one timeout per
    kind of read is rare. When the task wakes, reads past their deadline are expired."""

    __slots__ = ("_alarm", "_reads")

    def __init__(self) -> None:
        self._reads: dict[DirectTCPStream, float] = {}
        self._alarm: trio.CancelScope | None = None

    def watch(self, stream: DirectTCPStream, deadline: float) -> bool:
        """Register a read; False when no task keeps deadlines (the caller times itself)."""
        alarm = self._alarm
        if alarm is None:
            return False
        self._reads[stream] = deadline
        if deadline < alarm.deadline:
            alarm.deadline = deadline
        return True

    def unwatch(self, stream: DirectTCPStream) -> None:
        self._reads.pop(stream, None)

    def waiting(self) -> int:
        return len(self._reads)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            while True:
                with trio.CancelScope(
                    deadline=min(self._reads.values(), default=math.inf)
                ) as alarm:
                    self._alarm = alarm
                    if not started:
                        task_status.started()
                        started = True
                    await trio.sleep_forever()
                self._alarm = None
                self._expire_due(trio.current_time())
        finally:
            self._alarm = None

    def _expire_due(self, now: float) -> None:
        due = [stream for stream, deadline in self._reads.items() if deadline <= now]
        for stream in due:
            del self._reads[stream]
            stream.expire()


# whether the request being written went out on a connection that had been read from
# before (it served a response): only there can a failure before any answer be the
# pool's stale connection, closed by the backend while idle, rather than the backend
# failing on this request
wrote_on_reused: ContextVar[bool] = ContextVar("trioproxy_wrote_on_reused", default=False)


class DirectTCPStream(httpcore.AsyncNetworkStream):
    """An httpcore stream over plain TCP that reads and writes the socket directly."""

    __slots__ = ("_deadlines", "_expired", "_held", "_inner", "_read_from", "_socket", "_until")

    def __init__(
        self, inner: httpcore.AsyncNetworkStream, deadlines: ReadDeadlines | None = None
    ) -> None:
        self._inner = inner
        self._deadlines = deadlines
        self._expired = False
        self._held = False
        self._until = math.inf  # while held: when reads time out (trio's clock)
        self._read_from = False
        socket = inner.get_extra_info("socket")
        plain = inner.get_extra_info("ssl_object") is None and isinstance(
            socket, trio.socket.SocketType
        )
        self._socket: trio.socket.SocketType | None = socket if plain else None

    def hold_read_timeout(self, until: float = math.inf) -> None:
        """Read without httpcore's read timeout until :meth:`release_read_timeout`, each
        read timing out at ``until`` (trio's clock; ``inf``: never): its timeout is fixed
        for a whole response body, and a stream's first token has a deadline of its own
        that may be later (a relay holds it until then), as has the drain of a body's end.
        A deadline kept so costs no cancel scope of the caller's (about 50 000 machine
        instructions each; two or three per stream)."""
        self._held = True
        self._until = until

    def release_read_timeout(self, until: float | None = None) -> None:
        """End the hold; with ``until``, only a hold with that deadline: a holder that lets
        go after its response ended must not end the hold of the next response on the
        connection."""
        if until is None or until == self._until:
            self._held = False

    def _held_timeout(self) -> float | None:
        """A held read's timeout: what is left until the hold's deadline, ``None`` for
        none; ``ReadTimeout`` once it has passed (no read then, as in a cancel scope
        past its deadline)."""
        until = self._until
        if until == math.inf:
            return None
        left = until - trio.current_time()
        if left <= 0:
            raise self._timed_out()
        return left

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._read_from = True
        if self._held:
            timeout = self._held_timeout()
        socket = self._socket
        if socket is None:  # TLS: httpcore's own stream, whose timeout says trio's words
            try:
                return await self._inner.read(max_bytes, timeout)
            except httpcore.ReadTimeout:
                raise self._timed_out() from None
        if timeout is None:
            return await self._receive(socket, max_bytes)
        deadline = trio.current_time() + timeout
        deadlines = self._deadlines
        if deadlines is not None and deadlines.watch(self, deadline):
            try:
                return await self._receive(socket, max_bytes)
            finally:
                deadlines.unwatch(self)
        with trio.CancelScope(deadline=deadline):
            return await self._receive(socket, max_bytes)
        raise self._timed_out()

    def expire(self) -> None:
        """The read in progress is past its deadline: end it by closing the connection."""
        self._expired = True
        if self._socket is not None:
            self._socket.close()  # wakes the waiting read with ClosedResourceError

    async def _receive(self, socket: trio.socket.SocketType, max_bytes: int) -> bytes:
        try:
            while True:
                # waiting first saves the read that would find nothing yet (the usual case)
                await trio.lowlevel.wait_readable(socket)
                try:
                    return os.read(socket.fileno(), max_bytes)
                except BlockingIOError:
                    continue
        except (OSError, trio.ClosedResourceError) as exc:
            if self._expired:
                raise self._timed_out() from None
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    @staticmethod
    def _timed_out() -> httpcore.ReadTimeout:
        return httpcore.ReadTimeout("no data from the backend within the read timeout")

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        wrote_on_reused.set(self._read_from)
        if not buffer:
            return
        if self._socket is None:
            await self._inner.write(buffer, timeout)
            return
        try:
            sent = send_what_fits(self._socket, buffer)
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc
        if sent < len(buffer):
            await self._inner.write(buffer[sent:], timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # still ours over TLS (its reads go through the TLS stream): a relay holds the
        # read timeout of an https backend's stream as of a plain one
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return DirectTCPStream(tls, self._deadlines)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DirectTCPBackend(httpcore.AsyncNetworkBackend):
    """Connects with the wrapped backend, then hands out ``DirectTCPStream``s."""

    def __init__(
        self, inner: httpcore.AsyncNetworkBackend, deadlines: ReadDeadlines | None = None
    ) -> None:
        self._inner = inner
        self._deadlines = deadlines

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(
            host, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )
        return DirectTCPStream(stream, self._deadlines)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_unix_socket(
            path, timeout=timeout, socket_options=socket_options
        )

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def pool_of(transport: object) -> httpcore.AsyncConnectionPool | None:
    """The httpcore connection pool of an httpx transport (none for a mock)."""
    pool = getattr(transport, "_pool", None)
    return pool if isinstance(pool, httpcore.AsyncConnectionPool) else None


def install(transport: object, deadlines: ReadDeadlines | None = None) -> bool:
    """Give an httpx transport's connection pool the direct backend; whether it could."""
    pool = pool_of(transport)
    if pool is None:
        return False
    backend = pool._network_backend
    if not isinstance(backend, DirectTCPBackend):
        pool._network_backend = DirectTCPBackend(backend, deadlines)
    return True


class H11Body:
    """The rest of a plain HTTP/1.1 response body from httpcore's pool, read by driving
    its connection's h11 state directly: what httpcore's body iterator does per read,
    without the five generator layers (httpx's ``aiter_raw`` and response stream,
    httpcore's pool, connection and body streams) and two exception-mapping context
    managers that cost about a sixth of relaying a stream chunk (docs/performance-history.md).

    As with ``aiter_raw``: errors are the ones httpx raises (mapped on the way out
    only); at the end of the body the response is closed (its connection goes back to
    the pool, or is closed when the backend closes it); a read that fails or is
    cancelled closes the response too (shielded), which closes the connection; after
    either, reads return None."""

    __slots__ = ("_connection", "_h11", "_network", "_response", "_timeout")

    def __init__(
        self,
        response: httpx.Response,
        connection: http11.AsyncHTTP11Connection,
        timeout: float | None,
    ) -> None:
        self._response = response
        self._connection = connection
        self._h11: h11.Connection | None = connection._h11_state
        self._network: httpcore.AsyncNetworkStream = connection._network_stream
        self._timeout = timeout

    @classmethod
    def of(cls, response: httpx.Response) -> H11Body | None:
        """The direct reader of an unread HTTP/1.1 body from httpx's pool, else None (an
        HTTP/2 or mocked response, one read already or closed: httpx reads those)."""
        if response.is_stream_consumed or response.is_closed:
            return None
        stream = response.stream
        if type(stream) is BoundAsyncStream:  # sent by an AsyncClient, not its transport
            stream = stream._stream
        if type(stream) is not AsyncResponseStream:
            return None
        pooled = stream._httpcore_stream
        if type(pooled) is not PoolByteStream:
            return None
        body = pooled._stream
        if type(body) is not http11.HTTP11ConnectionByteStream or body._closed:
            return None
        if type(body._connection) is not http11.AsyncHTTP11Connection:
            return None
        # httpcore takes the read timeout from its request when its iterator starts
        timeouts = body._request.extensions.get("timeout", {})
        response.is_stream_consumed = True  # httpx must not read it a second time
        return cls(response, body._connection, timeouts.get("read"))

    async def read(self) -> bytes | None:
        """The next part of the body, None at its end (httpcore's ``_receive_event``)."""
        state = self._h11
        if state is None:
            return None
        try:
            while True:
                event = state.next_event()
                if event is h11.NEED_DATA:
                    data = await self._network.read(
                        self._connection.READ_NUM_BYTES, timeout=self._timeout
                    )
                    state.receive_data(data)
                elif type(event) is h11.Data:
                    return bytes(event.data)
                else:  # EndOfMessage; PAUSED, ConnectionClosed: nothing more to read
                    break
        except BaseException as exc:
            self._h11 = None
            with trio.CancelScope(shield=True):
                await self._response.aclose()
            if isinstance(exc, h11.RemoteProtocolError):
                self._raise_as_httpx(httpcore.RemoteProtocolError(str(exc)))
            if isinstance(exc, Exception):  # httpcore's ReadError, ReadTimeout, ...
                self._raise_as_httpx(exc)
            raise
        self._h11 = None
        await self._response.aclose()
        return None

    def _raise_as_httpx(self, exc: Exception) -> NoReturn:
        """``exc`` as httpx raises it from a body it reads (others unchanged)."""
        with request_context(request=self._response._request), map_httpcore_exceptions():
            raise exc
        raise AssertionError("unreachable")


def body_reader(response: httpx.Response) -> Callable[[], Awaitable[bytes | None]]:
    """How to read a response's body part by part (None at its end), decoded: a plain
    HTTP/1.1 body straight off the connection's h11 state (``H11Body``), anything else
    unencoded (HTTP/2, a test's mock, a body read already) through httpx; an encoded body
    is read raw the same way and decoded in bounded pieces (``DecodedBody``), never by
    httpx's decoders, which unpack a read whole."""
    coding = response.headers.get("content-encoding", "")
    encoded = coding not in ("", "identity") and bool(codings_of(coding))
    direct = H11Body.of(response)
    if encoded and not hasattr(response, "_content"):  # read already: decoded already
        raw = direct.read if direct is not None else _raw_reader(response)
        return DecodedBody(response, raw, coding).read
    if direct is not None:
        return direct.read
    return functools.partial(anext, response.aiter_bytes(), None)


def _raw_reader(response: httpx.Response) -> Callable[[], Awaitable[bytes | None]]:
    return functools.partial(anext, response.aiter_raw(), None)


class DecodedBody:
    """An encoded body's reads, decoded in pieces of at most ``PIECE_BYTES``
    (``content_coding``): a caller that stops at its size limit stops the unpacking, and
    other tasks run between the pieces of one read (a read of gzip may unpack to a
    thousand of them). Errors are httpx's ``DecodingError``, after the response is
    closed, as httpx's decoders raise them."""

    __slots__ = ("_decoder", "_header", "_pending", "_read_raw", "_response")

    def __init__(
        self,
        response: httpx.Response,
        read_raw: Callable[[], Awaitable[bytes | None]],
        header: str,
    ) -> None:
        self._response = response
        self._read_raw: Callable[[], Awaitable[bytes | None]] | None = read_raw
        self._header = header
        self._decoder: ContentDecoder | None = None
        self._pending: Iterator[bytes] | None = None

    async def read(self) -> bytes | None:
        try:
            return await self._next_piece()
        except ContentDecodingError as exc:
            self._read_raw = self._pending = None
            with trio.CancelScope(shield=True):
                await self._response.aclose()
            raise httpx.DecodingError(str(exc), request=self._response.request) from None

    async def _next_piece(self) -> bytes | None:
        if self._decoder is None:
            self._decoder = ContentDecoder(self._header)  # an unsupported coding: at once
        just_read = False
        while True:
            if self._pending is not None:
                piece = next(self._pending, None)
                if piece is not None:
                    if not just_read:  # a later piece of an earlier read: others go first
                        await trio.lowlevel.checkpoint()
                    return piece
                self._pending = None
            if self._read_raw is None:
                return None
            data = await self._read_raw()
            just_read = True
            if data is None:
                self._read_raw = None
                self._pending = self._decoder.end()
            else:
                self._pending = self._decoder.pieces(data)


_original_response_closed = http11.AsyncHTTP11Connection._response_closed


async def _response_closed(self: Any) -> None:
    """httpcore's, except that a connection whose backend sent more than its response is
    closed instead of pooled. h11 keeps such bytes as the start of the next response: the
    next request on the connection would get them as its status line, fail as a "stale
    pooled connection" and be sent again, after the backend had already run it once. And
    a read timeout held for the response (``DirectTCPStream.hold_read_timeout``) ends
    with it: the next request on the connection reads with its own."""
    stream = self._network_stream
    if type(stream) is DirectTCPStream:  # a held read timeout is one response's
        stream.release_read_timeout()
    state = self._h11_state
    if state.their_state is h11.DONE and state.trailing_data[0]:
        await self.aclose()
        return
    await _original_response_closed(self)


if not getattr(http11.AsyncHTTP11Connection._response_closed, "_trioproxy_patched", False):
    _response_closed._trioproxy_patched = True  # type: ignore[attr-defined]
    http11.AsyncHTTP11Connection._response_closed = _response_closed  # type: ignore[method-assign]


_original_close_connections = httpcore.AsyncConnectionPool._close_connections


async def _close_connections(self: Any, closing: list[Any]) -> None:
    """httpcore's, without its shielded scope when there is nothing to close: the pool
    calls it after every request's assignment and every response's close, nearly always
    with no connection, and the scope (with the look-up of the async library) cost about
    50 000 machine instructions each time, for no await."""
    if closing:
        await _original_close_connections(self, closing)


if not getattr(_original_close_connections, "_trioproxy_patched", False):
    _close_connections._trioproxy_patched = True  # type: ignore[attr-defined]
    httpcore.AsyncConnectionPool._close_connections = _close_connections  # type: ignore[method-assign]


# a request body up to this size is written with its head (one write, one segment); a
# larger one is not copied for it
COALESCED_BODY_BYTES = 64 * 1024

_original_send_request_headers = http11.AsyncHTTP11Connection._send_request_headers
_original_send_request_body = http11.AsyncHTTP11Connection._send_request_body


async def _send_request_headers(self: Any, request: httpcore.Request) -> None:
    """httpcore's, and for a body given whole (httpx's ``ByteStream``) of at most
    COALESCED_BODY_BYTES the body and its end too: the same h11 events in the same order,
    their bytes in one write instead of two (each a system call that, on a local backend,
    also runs the backend's side of TCP). ``_send_request_body`` then finds the request
    sent. A write that fails leaves h11 in its error state, so the connection is closed
    after whatever the backend answers, as after a failed write of the body alone."""
    stream = request.stream
    if type(stream) is not httpx.ByteStream or len(body := stream._stream) > COALESCED_BODY_BYTES:
        await _original_send_request_headers(self, request)
        return
    timeout = request.extensions.get("timeout", {}).get("write", None)
    try:  # httpcore's map_exceptions, without a generator's context manager
        event = h11.Request(
            method=request.method, target=request.url.target, headers=request.headers
        )
    except h11.LocalProtocolError as exc:
        raise httpcore.LocalProtocolError(exc) from exc
    state: h11.Connection = self._h11_state
    head = state.send(event) or b""
    data = state.send(h11.Data(data=body)) or b""
    end = state.send(h11.EndOfMessage()) or b""
    try:
        await self._network_stream.write(head + data + end, timeout=timeout)
    except BaseException:
        state.send_failed()
        raise


async def _send_request_body(self: Any, request: httpcore.Request) -> None:
    if self._h11_state.our_state is h11.DONE:  # sent with its head
        return
    await _original_send_request_body(self, request)


if not getattr(_original_send_request_headers, "_trioproxy_patched", False):
    _send_request_headers._trioproxy_patched = True  # type: ignore[attr-defined]
    http11.AsyncHTTP11Connection._send_request_headers = _send_request_headers  # type: ignore[method-assign]
    http11.AsyncHTTP11Connection._send_request_body = _send_request_body  # type: ignore[method-assign]

_original_lock_enter = _synchronization.AsyncLock.__aenter__


@trio.lowlevel.enable_ki_protection
async def _lock_enter(self: Any) -> Any:
    """httpcore's ``AsyncLock`` taken as trio's ``Lock.acquire`` takes it, but without the
    scheduler round that follows an uncontended acquire: still a cancellation point, and a
    lock held by another task (or with tasks waiting for it) is waited for as before, in
    turn. The locks guard a connection's state between its own awaits; the request that
    takes one goes on to await the backend's socket, which yields anyway. Three such
    rounds per proxied request were about a third of its scheduler rounds."""
    if not self._backend:
        self.setup()
    if self._backend != "trio":
        return await _original_lock_enter(self)
    lock: trio.Lock = self._trio_lock
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    return self


if _synchronization.AsyncLock.__aenter__ is _original_lock_enter:
    _synchronization.AsyncLock.__aenter__ = _lock_enter  # type: ignore[method-assign]
