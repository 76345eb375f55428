"""The direct backend socket I/O under httpx: real sockets, a tiny trio server per test."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import httpcore
import httpx
import pytest
import trio
import trio.testing

from trioproxy.netstream import (
    DirectTCPBackend,
    DirectTCPStream,
    H11Body,
    ReadDeadlines,
    install,
)

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


def _transport() -> httpx.AsyncHTTPTransport:
    transport = httpx.AsyncHTTPTransport()
    assert install(transport)
    return transport


async def _exchange(
    handler: Handler, request: httpx.Request, *, transport: httpx.AsyncHTTPTransport | None = None
) -> httpx.Response:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        request.url = request.url.copy_with(host="127.0.0.1", port=port)
        transport = transport or _transport()
        try:
            response = await transport.handle_async_request(request)
            await response.aread()
        except httpx.HTTPError as exc:
            error = exc  # raised below, outside the nursery, as itself
        else:
            error = None
        finally:
            await transport.aclose()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return response


def _get(timeout: float = 5.0) -> httpx.Request:
    return httpx.Request(
        "GET", "http://backend.test/", extensions={"timeout": httpx.Timeout(timeout).as_dict()}
    )


async def test_a_response_that_trickles_in_arrives_whole() -> None:
    pieces = [b"HTTP/1.1 200 OK\r\n", b"Transfer-Encoding: chunked\r\n\r\n"]
    pieces += [b"5\r\nhello\r\n"] * 20 + [b"0\r\n\r\n"]

    async def handler(stream: trio.SocketStream) -> None:
        await _read_head(stream)
        for piece in pieces:
            await stream.send_all(piece)
            await trio.sleep(0.001)

    response = await _exchange(handler, _get())
    assert response.status_code == 200
    assert response.content == b"hello" * 20


async def test_a_silent_backend_times_the_read_out() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_head(stream)
        await trio.sleep_forever()

    with trio.fail_after(5), pytest.raises(httpx.ReadTimeout):
        await _exchange(handler, _get(timeout=0.2))


async def test_a_backend_that_hangs_up_mid_response_is_an_error_not_a_hang() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_head(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await stream.aclose()

    with trio.fail_after(5), pytest.raises(httpx.RemoteProtocolError):
        await _exchange(handler, _get())


async def test_a_request_body_larger_than_the_socket_buffers_arrives_whole() -> None:
    body = bytes(range(256)) * 16384  # 4 MiB
    received: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        data = await _read_head(stream)
        _, _, rest = data.partition(b"\r\n\r\n")
        await trio.sleep(0.05)  # the client's first write finds the buffers full
        while len(rest) < len(body):
            rest += await stream.receive_some(65536)
        received.append(rest)
        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")

    request = httpx.Request("POST", "http://backend.test/", content=body)
    request.extensions["timeout"] = httpx.Timeout(5.0).as_dict()
    response = await _exchange(handler, request)
    assert response.status_code == 204
    assert received == [body]


async def test_connections_use_the_direct_stream_and_are_reused() -> None:
    peers: list[Any] = []

    async def handler(stream: trio.SocketStream) -> None:
        peers.append(stream.socket.getpeername())
        while await _read_head(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    transport = _transport()
    pool = transport._pool
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
        for _ in range(3):
            response = await transport.handle_async_request(httpx.Request("GET", url))
            assert await response.aread() == b"ok"
        streams = [connection._connection._network_stream for connection in pool.connections]
        await transport.aclose()
        nursery.cancel_scope.cancel()
    assert len(peers) == 1  # one connection served all three
    assert [type(stream) for stream in streams] == [DirectTCPStream]


async def test_a_write_the_socket_takes_needs_no_scheduler_round() -> None:
    client_end, server_end = trio.socket.socketpair()
    with client_end, server_end:
        inner = _InnerStream(trio.SocketStream(client_end))
        stream = DirectTCPStream(inner)
        with trio.testing.assert_no_checkpoints():
            await stream.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await server_end.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
        await server_end.send(b"reply")
        assert await stream.read(100) == b"reply"
        assert inner.calls == []  # neither went through httpcore's stream


async def test_tls_streams_are_left_to_httpcore() -> None:
    client_end, server_end = trio.socket.socketpair()
    with client_end, server_end:
        inner = _InnerStream(trio.SocketStream(client_end), ssl_object=object())
        stream = DirectTCPStream(inner)
        await stream.write(b"x")
        await stream.read(10)
        assert inner.calls == ["write", "read"]


async def test_an_https_stream_can_hold_its_read_timeout_too() -> None:
    """A relay holds the read timeout until a stream's first token (relay._Reader): the
    stream httpcore gets after TLS must still be ours, or an https backend (OpenAI) would
    keep the idle limit before the first token."""
    client_end, server_end = trio.socket.socketpair()
    with client_end, server_end:
        plain = DirectTCPStream(_InnerStream(trio.SocketStream(client_end)))
        tls = await plain.start_tls(None, "backend.test")
        assert isinstance(tls, DirectTCPStream)
        inner: Any = tls._inner
        await tls.read(10, timeout=5.0)
        tls.hold_read_timeout()
        await tls.read(10, timeout=5.0)
        tls.release_read_timeout()
        await tls.read(10, timeout=5.0)
        assert inner.timeouts == [5.0, None, 5.0]


def test_only_httpcore_pools_get_the_direct_backend() -> None:
    assert not install(httpx.MockTransport(lambda request: httpx.Response(200)))
    transport = httpx.AsyncHTTPTransport()
    assert install(transport) and install(transport)
    backend = transport._pool._network_backend
    assert isinstance(backend, DirectTCPBackend)
    assert not isinstance(backend._inner, DirectTCPBackend)  # installed once


class _InnerStream(httpcore.AsyncNetworkStream):
    """Stands in for httpcore's trio stream, recording what is delegated to it."""

    def __init__(self, stream: trio.SocketStream, ssl_object: object = None) -> None:
        self._stream = stream
        self._ssl_object = ssl_object
        self.calls: list[str] = []
        self.timeouts: list[float | None] = []

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        self.calls.append("read")
        self.timeouts.append(timeout)
        return b""

    async def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        return _InnerStream(self._stream, ssl_object=object())

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.calls.append("write")

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._stream.socket
        if info == "ssl_object":
            return self._ssl_object
        return None


class _Pair:
    """A direct stream on one end of a socket pair; the other end plays the backend."""

    def __init__(self, deadlines: ReadDeadlines | None) -> None:
        client_end, self.backend = trio.socket.socketpair()
        self._client_end = client_end
        self.stream = DirectTCPStream(_InnerStream(trio.SocketStream(client_end)), deadlines)

    def __enter__(self) -> _Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client_end.close()
        self.backend.close()


async def _timed_read(stream: DirectTCPStream, limit: float) -> float:
    """How long a read on a silent backend took to time out."""
    start = trio.current_time()
    with pytest.raises(httpcore.ReadTimeout):
        await stream.read(100, timeout=limit)
    return trio.current_time() - start


async def test_the_deadline_task_times_a_silent_read_out(autojump_clock: object) -> None:
    deadlines = ReadDeadlines()
    async with trio.open_nursery() as nursery:
        await nursery.start(deadlines.run)
        with _Pair(deadlines) as pair:
            took: list[float] = []
            done = trio.Event()

            async def read() -> None:
                took.append(await _timed_read(pair.stream, 5.0))
                done.set()

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert deadlines.waiting() == 1  # kept by the task, not by a scope of its own
            await done.wait()
            assert took == [pytest.approx(5.0, abs=1e-6)]
            assert deadlines.waiting() == 0
        nursery.cancel_scope.cancel()


async def test_a_read_that_gets_its_data_leaves_nothing_behind(autojump_clock: object) -> None:
    deadlines = ReadDeadlines()
    async with trio.open_nursery() as nursery:
        await nursery.start(deadlines.run)
        with _Pair(deadlines) as pair:
            await pair.backend.send(b"data")
            assert await pair.stream.read(100, timeout=5.0) == b"data"
            assert deadlines.waiting() == 0
            await trio.sleep(10)  # the task wakes for the old deadline and finds nothing due
            await pair.backend.send(b"more")
            assert await pair.stream.read(100, timeout=5.0) == b"more"
        nursery.cancel_scope.cancel()


async def test_a_shorter_timeout_is_not_held_up_by_a_longer_one(autojump_clock: object) -> None:
    deadlines = ReadDeadlines()
    took: dict[str, float] = {}

    async def timed(name: str, stream: DirectTCPStream, limit: float) -> None:
        took[name] = await _timed_read(stream, limit)

    async with trio.open_nursery() as nursery:
        await nursery.start(deadlines.run)
        with _Pair(deadlines) as long, _Pair(deadlines) as short:
            async with trio.open_nursery() as reads:
                reads.start_soon(timed, "long", long.stream, 60.0)
                await trio.testing.wait_all_tasks_blocked()
                reads.start_soon(timed, "short", short.stream, 1.0)
        nursery.cancel_scope.cancel()
    assert took == {"long": pytest.approx(60.0, abs=1e-6), "short": pytest.approx(1.0, abs=1e-6)}


async def test_without_the_task_reads_time_themselves(autojump_clock: object) -> None:
    deadlines = ReadDeadlines()  # never started (or already stopped)
    with _Pair(deadlines) as pair:
        assert await _timed_read(pair.stream, 2.0) == pytest.approx(2.0, abs=1e-6)
        assert deadlines.waiting() == 0


@pytest.mark.parametrize("task", [False, True], ids=["reads-time-themselves", "task"])
async def test_a_held_read_times_out_at_the_hold_s_deadline(
    autojump_clock: object, task: bool
) -> None:
    """``hold_read_timeout(until)``: reads ignore httpcore's timeout and time out at
    ``until`` (a stream's first-token deadline, a drain's end), kept by the deadline task
    when it runs; once ``until`` has passed, a read times out at once, data or not."""
    deadlines = ReadDeadlines()
    async with trio.open_nursery() as nursery:
        if task:
            await nursery.start(deadlines.run)
        with _Pair(deadlines) as pair:
            pair.stream.hold_read_timeout(trio.current_time() + 3.0)
            assert await _timed_read(pair.stream, 60.0) == pytest.approx(3.0, abs=1e-6)
        with _Pair(deadlines) as pair:  # (a timed-out read may have closed the socket)
            pair.stream.hold_read_timeout(trio.current_time())
            await pair.backend.send(b"late")
            with pytest.raises(httpcore.ReadTimeout):
                await pair.stream.read(100, timeout=60.0)
            pair.stream.release_read_timeout(trio.current_time() + 1.0)  # another's hold
            assert pair.stream._held
            pair.stream.release_read_timeout()
            assert await pair.stream.read(100, timeout=60.0) == b"late"
            assert await _timed_read(pair.stream, 2.0) == pytest.approx(2.0, abs=1e-6)
        nursery.cancel_scope.cancel()


# -- H11Body: a response body read straight off httpcore's h11 state -------------------


class _Backend:
    """A trio server answering each request on a connection with the next reply of a list
    (a reply is a list of pieces, sent apart); records the connections it served."""

    def __init__(self, replies: list[list[bytes | None]], *, then_close: bool = False) -> None:
        self.replies = replies
        self.then_close = then_close
        self.connections = 0
        self.url = ""

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self._serve(stream)
        except trio.BrokenResourceError:
            pass  # the client closed a response part-read

    async def _serve(self, stream: trio.SocketStream) -> None:
        while self.replies and await _read_head(stream):
            for piece in self.replies.pop(0):
                if piece is None:  # silence
                    await trio.sleep_forever()
                await stream.send_all(piece)
                await trio.sleep(0.001)  # each piece its own read
            if self.then_close:
                await stream.aclose()
                return


async def _with_backend(backend: _Backend, run: Callable[[httpx.AsyncHTTPTransport], Any]) -> Any:
    transport = _transport()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, backend.handle, 0, host="127.0.0.1")
        )
        backend.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
        try:
            with trio.fail_after(5):
                return await run(transport)
        finally:
            await transport.aclose()
            nursery.cancel_scope.cancel()


async def _read_all(body: H11Body) -> list[bytes]:
    parts = []
    while (part := await body.read()) is not None:
        parts.append(part)
    return parts


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunked(*parts: bytes) -> list[bytes | None]:
    return [CHUNKED_HEAD] + [b"%x\r\n%s\r\n" % (len(part), part) for part in parts] + [b"0\r\n\r\n"]


def _request(backend: _Backend, read_timeout: float = 5.0) -> httpx.Request:
    timeouts = {**httpx.Timeout(5.0).as_dict(), "read": read_timeout}
    return httpx.Request("GET", backend.url, extensions={"timeout": timeouts})


async def _direct(
    transport: httpx.AsyncHTTPTransport, backend: _Backend, read_timeout: float = 5.0
) -> tuple[httpx.Response, H11Body]:
    """A response and its direct reader, which the pinned httpx must allow."""
    response = await transport.handle_async_request(_request(backend, read_timeout))
    body = H11Body.of(response)
    assert body is not None
    return response, body


async def test_a_chunked_body_is_read_part_by_part_and_the_connection_pooled() -> None:
    backend = _Backend([_chunked(b"data: 1\n\n", b"data: 2\n\n"), _chunked(b"again")])

    async def run(transport: httpx.AsyncHTTPTransport) -> list[list[bytes]]:
        bodies = []
        for _ in range(2):
            response, body = await _direct(transport, backend)
            bodies.append(await _read_all(body))
            await response.aclose()
        return bodies

    assert await _with_backend(backend, run) == [[b"data: 1\n\n", b"data: 2\n\n"], [b"again"]]
    assert backend.connections == 1  # the first response left its connection reusable


async def test_a_held_read_timeout_ends_with_its_response() -> None:
    """A hold is one response's: when the response closes, before its connection goes
    back to the pool, the next request's reads have their own timeout again."""
    backend = _Backend([_chunked(b"abc")])

    async def run(transport: httpx.AsyncHTTPTransport) -> None:
        response, body = await _direct(transport, backend)
        stream = response.extensions["network_stream"]
        assert isinstance(stream, DirectTCPStream)
        stream.hold_read_timeout(trio.current_time() + 30.0)
        assert await body.read() == b"abc" and stream._held
        assert await body.read() is None
        assert not stream._held

    await _with_backend(backend, run)


async def test_a_body_with_a_length_ends_at_its_length() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    backend = _Backend([[head, b"01234", b"56789"], [head, b"abcdefghij"]])

    async def run(transport: httpx.AsyncHTTPTransport) -> list[bytes]:
        response, body = await _direct(transport, backend)
        first = b"".join(await _read_all(body))
        await response.aclose()
        second = await transport.handle_async_request(_request(backend))
        return [first, await second.aread()]

    assert await _with_backend(backend, run) == [b"0123456789", b"abcdefghij"]
    assert backend.connections == 1


async def test_a_body_left_part_read_closes_its_connection() -> None:
    backend = _Backend([_chunked(b"one", b"two"), _chunked(b"fresh")])

    async def run(transport: httpx.AsyncHTTPTransport) -> bytes:
        response, body = await _direct(transport, backend)
        assert await body.read() == b"one"
        await response.aclose()  # mid-body: the connection cannot serve another response
        second = await transport.handle_async_request(_request(backend))
        return await second.aread()

    assert await _with_backend(backend, run) == b"fresh"
    assert backend.connections == 2


async def test_a_backend_that_hangs_up_mid_body_is_httpx_s_protocol_error() -> None:
    backend = _Backend([[CHUNKED_HEAD, b"3\r\none\r\n"]], then_close=True)

    async def run(transport: httpx.AsyncHTTPTransport) -> None:
        response, body = await _direct(transport, backend)
        assert await body.read() == b"one"
        with pytest.raises(httpx.RemoteProtocolError):
            await body.read()
        await response.aclose()

    await _with_backend(backend, run)


async def test_malformed_chunk_framing_is_httpx_s_protocol_error() -> None:
    backend = _Backend([[CHUNKED_HEAD, b"zz\r\nnot a chunk\r\n"]])

    async def run(transport: httpx.AsyncHTTPTransport) -> None:
        response, body = await _direct(transport, backend)
        with pytest.raises(httpx.RemoteProtocolError):
            await body.read()
        await response.aclose()

    await _with_backend(backend, run)


async def test_a_silent_body_times_out_with_the_request_s_read_timeout() -> None:

    class Silent(_Backend):
        async def handle(self, stream: trio.SocketStream) -> None:
            await _read_head(stream)
            await stream.send_all(CHUNKED_HEAD)
            await trio.sleep_forever()

    backend = Silent([])

    async def run(transport: httpx.AsyncHTTPTransport) -> float:
        response, body = await _direct(transport, backend, read_timeout=0.2)
        start = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await body.read()
        await response.aclose()
        return trio.current_time() - start

    assert 0.15 <= await _with_backend(backend, run) < 2


async def test_bodies_httpx_must_read_itself_get_no_direct_reader() -> None:
    backend = _Backend([_chunked(b"read"), _chunked(b"x")])

    async def run(transport: httpx.AsyncHTTPTransport) -> None:
        response = await transport.handle_async_request(_request(backend))
        await response.aread()
        assert H11Body.of(response) is None  # read already
        second = await transport.handle_async_request(_request(backend))
        assert H11Body.of(second) is not None
        assert H11Body.of(second) is None  # handed out once
        await second.aclose()

    await _with_backend(backend, run)
    mocked = httpx.Response(200, content=b"{}", request=httpx.Request("GET", "http://x/"))
    assert H11Body.of(mocked) is None


async def test_after_a_failed_read_the_body_is_over_and_its_connection_closed() -> None:
    backend = _Backend([[CHUNKED_HEAD, b"3\r\none\r\n", b"zz\r\n"], _chunked(b"fresh")])

    async def run(transport: httpx.AsyncHTTPTransport) -> bytes:
        response, body = await _direct(transport, backend)
        assert await body.read() == b"one"
        with pytest.raises(httpx.RemoteProtocolError):
            await body.read()
        assert await body.read() is None  # as httpx's iterator, finished by its error
        # closed at once, not held until aclose
        assert all(connection.is_closed() for connection in transport._pool.connections)
        await response.aclose()
        second = await transport.handle_async_request(_request(backend))
        return await second.aread()

    assert await _with_backend(backend, run) == b"fresh"
    assert backend.connections == 2


async def test_a_cancelled_read_ends_the_body_too() -> None:
    backend = _Backend([[CHUNKED_HEAD, b"3\r\none\r\n", None]])

    async def run(transport: httpx.AsyncHTTPTransport) -> None:
        response, body = await _direct(transport, backend)
        assert await body.read() == b"one"
        with trio.move_on_after(0.05) as scope:
            await body.read()  # the backend sends nothing more
        assert scope.cancelled_caught
        assert await body.read() is None
        await response.aclose()

    await _with_backend(backend, run)


async def test_a_response_an_async_client_sent_is_read_directly_too() -> None:
    backend = _Backend([_chunked(b"via", b"client"), _chunked(b"again")])

    async def run(transport: httpx.AsyncHTTPTransport) -> list[bytes]:
        async with httpx.AsyncClient(transport=transport) as client:
            parts = []
            for _ in range(2):
                async with client.stream("GET", backend.url) as response:
                    body = H11Body.of(response)
                    assert body is not None
                    parts += await _read_all(body)
                assert response.elapsed.total_seconds() > 0  # closed through the client
            return parts

    assert await _with_backend(backend, run) == [b"via", b"client", b"again"]
    assert backend.connections == 1


@pytest.mark.parametrize(
    ("reply", "then_close"),
    [
        (_chunked(b"kept alive"), False),
        ([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n", b"close"], True),
        ([b"HTTP/1.0 200 OK\r\n\r\n", b"until the end"], True),
    ],
)
async def test_reads_after_the_end_return_at_once(
    reply: list[bytes | None], then_close: bool
) -> None:
    """The relays read again after the last part (a drain after [DONE], a JSON answer to
    a stream): h11 then asks for more data, or says the connection closed for ever, and
    the read waited for the drain's limit or spun, holding the worker."""
    backend = _Backend([reply], then_close=then_close)

    async def run(transport: httpx.AsyncHTTPTransport) -> tuple[bytes, bool]:
        response, body = await _direct(transport, backend)
        whole = b"".join(await _read_all(body))
        with trio.fail_after(0.1):
            assert await body.read() is None
            assert await body.read() is None
        return whole, response.is_closed

    whole, closed = await _with_backend(backend, run)
    assert whole in (b"kept alive", b"close", b"until the end")
    assert closed  # as after httpx's aiter_raw: the response is closed at its end


async def test_a_body_read_to_its_end_frees_its_pool_slot_without_aclose() -> None:
    backend = _Backend([_chunked(b"one"), _chunked(b"two")])
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    assert install(transport)

    async def run(_: httpx.AsyncHTTPTransport) -> bytes:
        _, body = await _direct(transport, backend)
        await _read_all(body)  # never closed by the caller
        with trio.fail_after(1):
            second = await transport.handle_async_request(_request(backend))
        return await second.aread()

    try:
        assert await _with_backend(backend, run) == b"two"
    finally:
        await transport.aclose()
    assert backend.connections == 1


async def test_a_failed_read_says_which_request_failed() -> None:
    backend = _Backend([[CHUNKED_HEAD, b"zz\r\n"]])

    async def run(transport: httpx.AsyncHTTPTransport) -> None:
        request = _request(backend)
        response = await transport.handle_async_request(request)
        response.request = request
        body = H11Body.of(response)
        assert body is not None
        with pytest.raises(httpx.RemoteProtocolError) as failure:
            await body.read()
        assert failure.value.request is request

    await _with_backend(backend, run)


# -- httpcore's connection locks and request writes ------------------------------------------


async def test_a_free_connection_lock_is_taken_without_a_scheduler_round() -> None:
    """httpcore's ``AsyncLock`` (a connection's request and state locks): three per
    proxied request, each a full scheduler round with trio's ``Lock``."""
    lock = httpcore._synchronization.AsyncLock()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # runs at the next scheduler round
        async with lock:
            pass
        async with lock:  # (set up on the first use: the second takes the short way too)
            pass
        assert ran == []


async def test_a_connection_lock_is_still_a_cancellation_point() -> None:
    lock = httpcore._synchronization.AsyncLock()
    entered = False
    with trio.CancelScope() as scope:
        scope.cancel()
        async with lock:
            entered = True
    assert scope.cancelled_caught and not entered


async def test_a_held_connection_lock_is_waited_for_in_turn() -> None:
    lock = httpcore._synchronization.AsyncLock()
    order: list[str] = []
    release = trio.Event()

    async def holder(task_status: trio.TaskStatus[None]) -> None:
        async with lock:
            task_status.started()
            await release.wait()
            order.append("holder done")

    async def waiter(name: str) -> None:
        async with lock:
            order.append(name)

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        nursery.start_soon(waiter, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # both wait
        release.set()
    assert order == ["holder done", "first", "second"]


class _Closing:
    """A pooled connection's stand-in that notes its closing, with a checkpoint in it."""

    def __init__(self) -> None:
        self.closed = False

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self.closed = True


async def test_the_pool_closes_the_connections_it_dropped_shielded() -> None:
    """``_close_connections`` with connections to close: httpcore's, in its shield (a
    request being cancelled still closes them)."""
    pool = httpcore.AsyncConnectionPool()
    closing = [_Closing(), _Closing()]
    with trio.CancelScope() as scope:
        scope.cancel()
        await pool._close_connections(closing)  # type: ignore[arg-type]
    assert all(connection.closed for connection in closing)


async def test_the_pool_opens_no_scope_when_it_dropped_no_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Twice per request the pool has nothing to close: no shielded scope for that (about
    50 000 machine instructions each), and no checkpoint, as httpcore's own."""
    scopes: list[object] = []
    original = trio.CancelScope.__enter__

    def enter(self: trio.CancelScope) -> trio.CancelScope:
        scopes.append(self)
        return original(self)

    pool = httpcore.AsyncConnectionPool()
    monkeypatch.setattr(trio.CancelScope, "__enter__", enter)
    with trio.CancelScope() as scope:
        scope.cancel()
        await pool._close_connections([])
        await pool._close_connections([_Closing()])  # type: ignore[list-item]
    assert len(scopes) == 2  # ours and the shield of the second call only
    assert not scope.cancelled_caught  # neither call was a cancellation point


def _recording_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    from trioproxy import netstream

    writes: list[bytes] = []

    def send_what_fits(socket: trio.socket.SocketType, data: bytes) -> int:
        writes.append(bytes(data))
        return original(socket, data)

    original = netstream.send_what_fits
    monkeypatch.setattr(netstream, "send_what_fits", send_what_fits)
    return writes


async def test_a_small_request_body_goes_out_with_its_head_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes = _recording_writes(monkeypatch)
    received: list[bytes] = []
    body = b'{"model": "m"}'

    async def handler(stream: trio.SocketStream) -> None:
        while data := await _read_head(stream):
            rest = data.partition(b"\r\n\r\n")[2]
            while len(rest) < len(body):
                rest += await stream.receive_some(65536)
            received.append(rest)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    transport = _transport()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
        )
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
        for _ in range(2):  # the connection goes on after such a request
            request = httpx.Request("POST", url, content=body)
            response = await transport.handle_async_request(request)
            assert await response.aread() == b"ok"
        await transport.aclose()
        nursery.cancel_scope.cancel()
    assert received == [body, body]
    assert len(writes) == 2  # one per request
    assert all(write.startswith(b"POST / HTTP/1.1\r\n") for write in writes)
    assert all(write.endswith(b"\r\n\r\n" + body) for write in writes)
    assert all(b"\r\nContent-Length: 14\r\n" in write for write in writes)


async def test_a_large_request_body_is_not_copied_to_join_its_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trioproxy.netstream import COALESCED_BODY_BYTES

    writes = _recording_writes(monkeypatch)
    body = b"x" * (COALESCED_BODY_BYTES + 1)

    async def handler(stream: trio.SocketStream) -> None:
        data = await _read_head(stream)
        rest = data.partition(b"\r\n\r\n")[2]
        while len(rest) < len(body):
            rest += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")

    request = httpx.Request("POST", "http://backend.test/", content=body)
    request.extensions["timeout"] = httpx.Timeout(5.0).as_dict()
    response = await _exchange(handler, request)
    assert response.status_code == 204
    assert writes[0].endswith(b"\r\n\r\n") and writes[1].startswith(b"x")


class _RefusingStream(httpcore.AsyncNetworkStream):
    """A connection whose writes fail, after which the backend's answer is read."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        answer, self._answer = self._answer, b""
        return answer

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        raise httpcore.WriteError("broken pipe")

    async def aclose(self) -> None:
        pass


async def test_a_request_whose_write_failed_does_not_leave_its_connection_pooled() -> None:
    """httpcore reads the backend's answer after a failed write (a server may refuse a
    request before reading it); a request written with its body in one write that failed
    must still close the connection after that answer, as a failed body write did."""
    from httpcore._async.http11 import AsyncHTTP11Connection

    answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\nno"
    origin = httpcore.Origin(b"http", b"backend.test", 80)
    connection = AsyncHTTP11Connection(origin, _RefusingStream(answer))
    headers = [(b"Host", b"backend.test"), (b"Content-Length", b"2")]
    request = httpcore.Request(
        "POST", "http://backend.test/", headers=headers, content=httpx.ByteStream(b"{}")
    )
    response = await connection.handle_async_request(request)
    assert response.status == 413
    assert await response.aread() == b"no"
    await response.aclose()
    assert connection.is_closed()
