"""The keep-alive timer and send path that trioproxy.hypercorn_patches puts into hypercorn.

Unit tests drive ``IdleTimer`` on trio's virtual clock; the live tests check the same
behaviour on a real proxy process with a 1 s keep-alive."""

from __future__ import annotations

import math
import select
import socket
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import h11
import psutil
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.protocol.events import Body, EndBody, StreamClosed
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import EventWrapper

from trioproxy import hypercorn_patches
from trioproxy.hypercorn_patches import IdleTimer, _protocol_send

from .conftest import ServerProcess

KEEP_ALIVE = 5.0


class FakeServer:
    """What IdleTimer needs of hypercorn's TCPServer, recording when it closes."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(keep_alive_timeout=KEEP_ALIVE)
        self.context = SimpleNamespace(terminated=EventWrapper())
        self.closed_at: list[float] = []

    async def _initiate_server_close(self) -> None:
        self.closed_at.append(trio.current_time())


class FakeTaskGroup:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery


async def _idle_timer(server: FakeServer, nursery: trio.Nursery) -> tuple[IdleTimer, FakeTaskGroup]:
    """A timer for ``server`` whose connection has just gone idle (its first restart)."""
    timer = IdleTimer(server)
    group = FakeTaskGroup(nursery)
    await timer.restart(group)
    return timer, group


async def test_an_idle_connection_closes_after_the_keep_alive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        await _idle_timer(server, nursery)
    assert server.closed_at == [pytest.approx(KEEP_ALIVE)]


async def test_every_response_moves_the_deadline_and_a_request_suspends_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        timer, group = await _idle_timer(server, nursery)
        for _ in range(4):  # a request every 4 s, each served in 30 s (longer than keep-alive)
            await trio.sleep(4)
            await timer.stop()
            await trio.sleep(30)
            assert server.closed_at == []
            await timer.restart(group)
        last_response = trio.current_time()
    assert server.closed_at == [pytest.approx(last_response + KEEP_ALIVE)]


async def test_a_connection_without_a_request_gets_less_time_than_a_pooled_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A review: with the 75 s keep-alive, a connection that sent nothing, or sent its
    first request head a byte at a time, was held 75 s (a slow-headers attack)."""
    fresh, pooled = FakeServer(), FakeServer()
    fresh.config.keep_alive_timeout = pooled.config.keep_alive_timeout = 75.0
    async with trio.open_nursery() as nursery:
        await _idle_timer(fresh, nursery)
        timer, group = await _idle_timer(pooled, nursery)
        await timer.stop()  # its first request's head arrived
        await timer.restart(group)  # and was answered at 0 s
    assert fresh.closed_at == [pytest.approx(hypercorn_patches.FIRST_REQUEST_SECONDS)]
    assert pooled.closed_at == [pytest.approx(75.0)]


async def test_shutdown_closes_an_idle_connection_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        await _idle_timer(server, nursery)
        await trio.sleep(1)
        await server.context.terminated.set()
    assert server.closed_at == [pytest.approx(1.0)]


async def test_shutdown_lets_the_response_in_progress_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        timer, group = await _idle_timer(server, nursery)
        await timer.stop()  # a request arrives
        await server.context.terminated.set()
        await trio.sleep(60)
        assert server.closed_at == []
        await timer.restart(group)  # its response is done
    assert server.closed_at == [pytest.approx(60.0)]


async def test_a_closed_connection_ends_the_timer_without_closing_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    with trio.fail_after(1):  # the nursery must not wait for a timer with no deadline
        async with trio.open_nursery() as nursery:
            timer, _ = await _idle_timer(server, nursery)
            await timer.stop()  # busy: no deadline
            timer.connection_closed()  # the client left mid-request
    assert server.closed_at == []


async def test_arming_the_timer_of_a_new_connection_takes_no_scheduler_round() -> None:
    # the connection reads its first request right after: each round before that is a
    # batch of every other task's step when the loop is busy
    server = FakeServer()
    async with trio.open_nursery() as nursery:
        timer = IdleTimer(server)
        with trio.testing.assert_no_checkpoints():
            await timer.restart(FakeTaskGroup(nursery))
        timer.connection_closed()
    assert server.closed_at == []


async def test_a_connection_closed_before_its_timer_runs_is_not_closed_again() -> None:
    server = FakeServer()
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            timer = IdleTimer(server)
            await timer.restart(FakeTaskGroup(nursery))
            timer.connection_closed()  # before the watcher task had its first step
    assert server.closed_at == []


async def test_a_deadline_passed_before_the_timer_runs_still_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    server.config.keep_alive_timeout = 0  # the deadline is now: passed on the first step
    async with trio.open_nursery() as nursery:
        await IdleTimer(server).restart(FakeTaskGroup(nursery))
    assert server.closed_at == [0.0]


def _queue_of(size: int) -> Config:
    config = Config()
    config.max_app_queue_size = size
    return config


async def _ignored(event: Any) -> None:
    pass


async def test_a_request_event_enters_the_app_queue_without_a_scheduler_round() -> None:
    received: list[Any] = []

    async def app(scope: Any, receive: Any, *_: Any) -> None:
        received.extend([await receive(), await receive()])

    async with TaskGroup() as group:
        # as a request's stream gets it: the put into its app's queue of events
        put = await group.spawn_app(app, _queue_of(10), {"type": "http"}, _ignored)
        with trio.testing.assert_no_checkpoints():
            await put({"type": "http.request", "body": b"{}", "more_body": True})
            await put({"type": "http.request", "body": b"", "more_body": False})
    assert [event["more_body"] for event in received] == [True, False]


async def test_a_full_app_queue_still_holds_the_reader_back() -> None:
    async def app(*_: Any) -> None:
        await trio.sleep_forever()  # takes nothing from its queue

    async with TaskGroup() as group:
        put = await group.spawn_app(app, _queue_of(1), {"type": "http"}, _ignored)
        await put({"type": "http.request", "body": b"{", "more_body": True})
        with trio.move_on_after(0.05) as waited:
            await put({"type": "http.request", "body": b"}", "more_body": True})
        assert waited.cancelled_caught
        assert group._nursery is not None
        group._nursery.cancel_scope.cancel()


async def test_empty_writes_are_not_sent_and_others_are() -> None:
    sent: list[object] = []

    class Stream:
        async def send_all(self, data: bytes) -> None:
            sent.append(data)

    class Protocol:
        async def handle(self, event: object) -> None:
            sent.append(event)

    server = SimpleNamespace(
        send_lock=trio.Lock(), stream=Stream(), protocol=Protocol(), idle_task=None
    )
    await _protocol_send(server, RawData(data=b""))
    await _protocol_send(server, RawData(data=b"HTTP/1.1 200 OK\r\n"))
    assert sent == [b"HTTP/1.1 200 OK\r\n"]


class _Peer:
    """A real socket pair: the server's end as hypercorn holds it, and the client's end."""

    def __init__(self, send_buffer: int | None = None) -> None:
        server_end, self.client = trio.socket.socketpair()
        if send_buffer is not None:
            server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.events: list[object] = []

        peer = self

        class Protocol:
            async def handle(self, event: object) -> None:
                peer.events.append(event)

        self.server = SimpleNamespace(
            send_lock=trio.Lock(), stream=trio.SocketStream(server_end), protocol=Protocol()
        )

    def __enter__(self) -> _Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.stream.socket.close()

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer if they stop coming (a failure, not a hang)."""
        data = b""
        with trio.move_on_after(5):
            while len(data) < size:
                chunk = await self.client.recv(65536)
                if not chunk:
                    break
                data += chunk
        return data


async def test_a_write_the_socket_takes_goes_out_without_a_scheduler_round() -> None:
    with _Peer() as peer:
        with trio.testing.assert_no_checkpoints():
            await _protocol_send(peer.server, RawData(data=b"HTTP/1.1 200 OK\r\n\r\nhi"))
        assert await peer.read(21) == b"HTTP/1.1 200 OK\r\n\r\nhi"


async def test_what_the_socket_cannot_take_at_once_follows_whole_and_in_order() -> None:
    with _Peer(send_buffer=4096) as peer:
        big = bytes(range(256)) * 8192  # 2 MiB, far more than the socket buffers
        received: list[bytes] = []

        async def slow_reader() -> None:
            await trio.sleep(0.05)  # the first write finds the buffer full before we read
            received.append(await peer.read(len(big) + 4))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_reader)
            with trio.CancelScope() as scope:
                # a request already cancelled (its client left) may still start a write;
                # once part of it is out, the rest must follow or the framing is cut
                scope.cancel()
                await _protocol_send(peer.server, RawData(data=big))
            await _protocol_send(peer.server, RawData(data=b"tail"))
        assert received == [big + b"tail"]
        assert peer.events == []


async def test_the_rest_of_a_write_goes_from_a_view_of_it_not_a_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the socket did not take at once follows from a view of the bytes: a copy of
    the rest of a 40 MB answer held the loop 25-40 ms."""
    rests: list[object] = []
    send_rest = hypercorn_patches._send_rest

    async def watched(server: object, data: bytes | memoryview) -> None:
        rests.append(data)
        await send_rest(server, data)

    monkeypatch.setattr(hypercorn_patches, "_send_rest", watched)
    with _Peer(send_buffer=4096) as peer:
        big = bytes(range(256)) * 8192  # 2 MiB, far more than the socket buffers
        received: list[bytes] = []

        async def reader() -> None:
            received.append(await peer.read(len(big)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await _protocol_send(peer.server, RawData(data=big))
        assert received == [big]
        (rest,) = rests
        assert isinstance(rest, memoryview) and rest.obj is big


async def test_a_client_that_reads_nothing_is_closed_after_the_write_timeout() -> None:
    """hypercorn's write waited for room without limit: a client that stopped reading held
    its request (and its slot, and its backend connection) for ever."""
    hypercorn_patches.set_write_timeout(0.2)
    try:
        with _Peer(send_buffer=4096) as peer:
            with trio.fail_after(5):
                await _protocol_send(peer.server, RawData(data=b"x" * (4 << 20)))
            assert peer.events and isinstance(peer.events[-1], Closed)
            with pytest.raises(trio.ClosedResourceError):
                await peer.server.stream.send_all(b"more")
    finally:
        hypercorn_patches.set_write_timeout(60.0)


async def test_a_write_timeout_limits_a_stall_not_a_slow_download() -> None:
    """A client that reads, however slowly, is never cut: the timeout restarts whenever
    the next piece goes out."""
    # a pause between reads well below the timeout (a loaded machine stretches it), a
    # download well above it
    hypercorn_patches.set_write_timeout(1.0)
    try:
        with _Peer(send_buffer=4096) as peer, trio.fail_after(30):
            peer.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            data = bytes(range(256)) * 4096  # 1 MiB: seconds at the reader's pace below
            received = bytearray()

            async def slow_reader() -> None:
                while len(received) < len(data):
                    piece = await peer.client.recv(32 * 1024)
                    if not piece:
                        break  # cut: the assertions below say so (not a loop on EOF)
                    received.extend(piece)
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_reader)
                await hypercorn_patches._send_rest(peer.server, data)
            assert peer.events == []  # not taken for gone
            assert bytes(received) == data
    finally:
        hypercorn_patches.set_write_timeout(60.0)


async def test_a_shutdown_ends_a_stalled_write_within_its_grace_period() -> None:
    try:
        with _Peer(send_buffer=4096) as peer, trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hypercorn_patches._send_rest, peer.server, b"x" * (4 << 20))
                await trio.sleep(0.1)
                hypercorn_patches.end_writes_within(0.2)  # the write timeout is 60 s
            assert peer.events and isinstance(peer.events[-1], Closed)
    finally:
        hypercorn_patches._writes_end_at = math.inf


async def test_a_write_waits_behind_one_still_in_progress() -> None:
    with _Peer() as peer:
        async with trio.open_nursery() as nursery:
            await peer.server.send_lock.acquire()  # another write is waiting for room
            nursery.start_soon(_protocol_send, peer.server, RawData(data=b"second"))
            await trio.testing.wait_all_tasks_blocked()
            readable, _, _ = select.select([peer.client.fileno()], [], [], 0)
            assert readable == []  # nothing jumped the queue
            peer.server.send_lock.release()
        assert await peer.read(6) == b"second"


async def test_a_write_to_a_closed_connection_reports_it_closed() -> None:
    with _Peer() as peer:
        peer.client.close()
        for _ in range(3):  # the first write may still be buffered; then the peer is gone
            await _protocol_send(peer.server, RawData(data=b"x" * 65536))
        assert peer.events and all(isinstance(event, Closed) for event in peer.events)
    with _Peer() as closed_here:
        closed_here.server.stream.socket.close()
        await _protocol_send(closed_here.server, RawData(data=b"late"))
        assert [type(event) for event in closed_here.events] == [Closed]


async def test_closing_is_shielded_from_the_request_cancellation() -> None:
    closed: list[str] = []

    class Stream:
        async def send_eof(self) -> None:
            await trio.lowlevel.checkpoint()
            closed.append("eof")

        async def aclose(self) -> None:
            closed.append("aclose")

    class Protocol:
        async def handle(self, event: object) -> None:
            closed.append(type(event).__name__)

    server = SimpleNamespace(stream=Stream(), protocol=Protocol())
    import hypercorn.trio.tcp_server as tcp_server

    server._close = lambda: tcp_server.TCPServer._close(server)  # type: ignore[attr-defined]
    with trio.CancelScope() as scope:
        scope.cancel()  # quart-trio cancels the request before the connection is closed
        await _protocol_send(server, Closed())
    assert closed == ["eof", "aclose", "Closed"]


# ---------------------------------------------------------------------------------- live


@pytest.fixture(scope="module")
def proxy_1s_keep_alive(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> ServerProcess:
    return start_proxy(demo_backend.url, KEEP_ALIVE_TIMEOUT="1")


def _address(proxy: ServerProcess) -> tuple[str, int]:
    host, port = proxy.url.removeprefix("http://").split(":")
    return host, int(port)


def _chat(sock: socket.socket, content: str = "hi") -> bytes:
    body = b'{"model":"demo-chat","messages":[{"role":"user","content":"%s"}]}' % content.encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = b""
    while b"\r\n\r\n" not in received:
        data = sock.recv(65536)
        assert data, "the proxy closed the connection"
        received += data
    head, _, rest = received.partition(b"\r\n\r\n")
    length = int(next(
        line.split(b":", 1)[1] for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ))  # fmt: skip
    while len(rest) < length:
        data = sock.recv(65536)
        assert data, "the proxy closed the connection mid-body"
        rest += data
    return head.split(b"\r\n", 1)[0]


def test_a_connection_in_use_outlives_its_keep_alive_timeout(
    proxy_1s_keep_alive: ServerProcess,
) -> None:
    with socket.create_connection(_address(proxy_1s_keep_alive), timeout=5) as sock:
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            assert _chat(sock).startswith(b"HTTP/1.1 200")
            time.sleep(0.4)
        # a request slower than the keep-alive timeout is not cut either
        assert _chat(sock, "[[tokens=3]][[first_delay=1.4]]").startswith(b"HTTP/1.1 200")
        idle_from = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(1) == b""  # then, idle, it is closed
    assert 0.8 < time.monotonic() - idle_from < 3.0


def test_clients_leaving_mid_request_leave_no_connection_behind(
    proxy_1s_keep_alive: ServerProcess,
) -> None:
    process = psutil.Process(proxy_1s_keep_alive.process.pid)
    with socket.create_connection(_address(proxy_1s_keep_alive), timeout=5) as sock:
        assert _chat(sock).startswith(b"HTTP/1.1 200")  # pools warm: backend sockets opened
    time.sleep(1.5)
    before = process.num_fds()
    body = b'{"model":"demo-chat","messages":[{"role":"user","content":"[[first_delay=30]]"}]}'
    for _ in range(10):
        with socket.create_connection(_address(proxy_1s_keep_alive), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            time.sleep(0.05)
    deadline = time.monotonic() + 5
    while process.num_fds() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.num_fds() <= before


# ------------------------------------------------------------------ one write per response


class _Writes:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def __call__(self, event: object) -> None:
        self.events.append(event)

    @property
    def raw(self) -> list[bytes]:
        return [e.data for e in self.events if isinstance(e, RawData)]


def _protocol_with_request(method: bytes = b"GET") -> tuple[object, _Writes]:
    from hypercorn.config import Config
    from hypercorn.protocol.h11 import H11Protocol
    from hypercorn.trio.worker_context import WorkerContext

    writes = _Writes()
    protocol = H11Protocol(
        None,
        Config(),
        WorkerContext(None),
        None,
        None,
        False,
        None,
        None,
        writes,  # type: ignore[arg-type]
    )
    protocol.connection.receive_data(method + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(protocol.connection.next_event(), h11.Request)
    return protocol, writes


def _response(length: int | None, status: int = 200) -> object:
    from hypercorn.protocol.events import Response

    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return Response(stream_id=1, status_code=status, headers=headers)


@pytest.mark.parametrize(
    ("status", "length", "line"),
    [
        (200, 2, b"HTTP/1.1 200 OK\r\n"),
        (404, None, b"HTTP/1.1 404 Not Found\r\n"),
        (503, 0, b"HTTP/1.1 503 Service Unavailable\r\n"),
        (599, None, b"HTTP/1.1 599 \r\n"),  # no registered phrase: none, as h11 writes it
    ],
)
async def test_a_status_line_carries_its_reason_phrase(
    status: int, length: int | None, line: bytes
) -> None:
    protocol, writes = _protocol_with_request()
    await protocol.stream_send(_response(length, status))  # type: ignore[attr-defined]
    if length is not None:
        await protocol.stream_send(Body(stream_id=1, data=b"{}"[:length]))  # type: ignore[attr-defined]
        await protocol.stream_send(EndBody(stream_id=1))  # type: ignore[attr-defined]
    assert writes.raw[0].startswith(line), writes.raw[0][:40]


async def test_a_sized_response_is_one_write_with_its_body() -> None:
    protocol, writes = _protocol_with_request()
    await protocol.stream_send(_response(2))  # type: ignore[attr-defined]
    assert writes.raw == []
    await protocol.stream_send(Body(stream_id=1, data=b"{}"))  # type: ignore[attr-defined]
    await protocol.stream_send(EndBody(stream_id=1))  # type: ignore[attr-defined]
    assert len(writes.raw) == 1
    head, _, body = writes.raw[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 2" in head and body == b"{}"


async def test_a_large_sized_body_goes_as_it_is_after_its_head() -> None:
    """A body of 1 MiB or more is not copied behind its head (40 MB held the loop 25-40
    ms): the head goes first, then the body object itself."""
    protocol, writes = _protocol_with_request()
    body = b"[" + b"0," * (1 << 19) + b"0]"
    await protocol.stream_send(_response(len(body)))  # type: ignore[attr-defined]
    await protocol.stream_send(Body(stream_id=1, data=body))  # type: ignore[attr-defined]
    await protocol.stream_send(EndBody(stream_id=1))  # type: ignore[attr-defined]
    assert len(writes.raw) == 2 and writes.raw[1] is body
    assert writes.raw[0].startswith(b"HTTP/1.1 200 ") and writes.raw[0].endswith(b"\r\n\r\n")


async def test_a_body_less_response_is_written_at_its_end() -> None:
    protocol, writes = _protocol_with_request(b"HEAD")
    await protocol.stream_send(_response(2))  # type: ignore[attr-defined]
    await protocol.stream_send(EndBody(stream_id=1))  # type: ignore[attr-defined]
    assert len(writes.raw) == 1 and writes.raw[0].endswith(b"\r\n\r\n")


async def test_a_streamed_response_sends_its_head_at_once() -> None:
    protocol, writes = _protocol_with_request()
    await protocol.stream_send(_response(None))  # type: ignore[attr-defined]
    assert len(writes.raw) == 1 and b"transfer-encoding: chunked" in writes.raw[0].lower()
    await protocol.stream_send(Body(stream_id=1, data=b"data: 1\n\n"))  # type: ignore[attr-defined]
    assert len(writes.raw) == 2


async def test_a_held_head_is_still_sent_when_the_stream_closes_early() -> None:
    protocol, writes = _protocol_with_request()
    await protocol.stream_send(_response(10))  # type: ignore[attr-defined]
    await protocol.stream_send(StreamClosed(stream_id=1))  # type: ignore[attr-defined]
    assert writes.raw and writes.raw[0].startswith(b"HTTP/1.1 200 ")


def _exchange(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b"connection: close" not in answer.lower():
                break  # a kept-alive HTTP/1.1 answer: its head is enough
        return answer


def test_http2_is_not_spoken_even_when_a_client_asks_for_it(proxy: ServerProcess) -> None:
    """The proxy's streaming, disconnect and shutdown handling are HTTP/1.1's: an h2c
    upgrade is served in HTTP/1.1, and HTTP/2 with prior knowledge is refused."""
    upgrade = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    assert _exchange(proxy.url, upgrade).startswith(b"HTTP/1.1 200 ")
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    answer = _exchange(proxy.url, preface)
    assert answer.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), answer[:80]


async def test_a_request_arriving_as_a_connection_closes_is_not_waited_for() -> None:
    """The reader of a connection closed at shutdown, handed a request that arrived just
    then, waited for a turn that never came (the shutdown was held for its grace period)."""
    protocol, writes = _protocol_with_request()
    connection = protocol.connection  # type: ignore[attr-defined]
    assert isinstance(connection.next_event(), h11.EndOfMessage)
    connection.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
    connection.send(h11.EndOfMessage())
    await protocol.context.terminated.set()  # type: ignore[attr-defined]
    await protocol._maybe_recycle()  # type: ignore[attr-defined]
    assert isinstance(writes.events[-1], Closed)
    with trio.fail_after(1), pytest.raises(hypercorn_patches._NoMoreReads):
        await protocol.handle(RawData(data=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))  # type: ignore[attr-defined]


def test_empty_lines_before_a_request_are_ignored() -> None:
    """RFC 9112 2.2: a server SHOULD ignore at least one CRLF before a request-line. h11
    took the CRLF some clients send after a body for a request without a request line:
    a 400 and a closed connection after a request answered 200."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}\r\n\r\n"
        b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert isinstance(connection.next_event(), h11.Request)
    assert isinstance(connection.next_event(), h11.Data)
    assert isinstance(connection.next_event(), h11.EndOfMessage)
    connection.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
    connection.send(h11.EndOfMessage())
    connection.start_next_cycle()
    second = connection.next_event()
    assert isinstance(second, h11.Request) and second.target == b"/y"
    # bounded: a flood of empty lines is still no request
    flooded = h11.Connection(h11.SERVER)
    flooded.receive_data(b"\r\n" * 50 + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        flooded.next_event()


def test_empty_lines_behind_a_response_are_no_whole_head() -> None:
    """Patch 11 skips empty lines before a request: at shutdown, "\\r\\n\\r\\n" behind a
    response (or before part of a head) is no request to serve, and the connection
    closes instead of waiting for one."""
    from trioproxy.hypercorn_patches import _holds_a_whole_head

    assert _holds_a_whole_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _holds_a_whole_head(b"\r\nGET / HTTP/1.1\nHost: x\n\n")
    for partial in (b"\r\n\r\n", b"\n\n", b"\r\n\r\nGET / HTTP/1.1\r\nHo", b"GET / HT"):
        assert not _holds_a_whole_head(partial), partial


def test_bytes_after_a_request_that_said_close_are_no_request(proxy: ServerProcess) -> None:
    """An HTTP-surface fuzzing review: h11 took bytes after a ``Connection: close`` request
    (a CRLF after the body, a request pipelined behind) for a protocol error, and the
    client got a bare 400 in place of the app's answer. RFC 9112 9.6: no further request
    is processed on such a connection."""
    close = b"Host: x\r\nConnection: close\r\n"
    pipelined = b"GET /api/version HTTP/1.1\r\n" + close + b"\r\nGET /api/tags HTTP/1.1\r\n\r\n"
    answer = _exchange(proxy.url, pipelined)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.count(b"HTTP/1.1 ") == 1
    assert b'"version"' in answer
    body = b'{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}'
    head = b"POST /v1/chat/completions HTTP/1.1\r\n" + close
    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    answer = _exchange(proxy.url, head + body + b"\r\n")  # as some older clients send
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"chat.completion" in answer


class _Stream:
    """What ``_close_stream`` needs of hypercorn's HTTPStream: ``closed`` and ``handle``."""

    def __init__(self) -> None:
        self.closed = False
        self.events: list[object] = []

    async def handle(self, event: object) -> None:
        self.events.append(event)
        self.closed = True


@pytest.mark.parametrize("finished", [False, True])
async def test_a_stream_closing_cancels_the_scope_handed_to_it_unless_the_response_finished(
    finished: bool,
) -> None:
    stream = _Stream()
    scope = trio.CancelScope()
    hypercorn_patches.cancel_on_close(stream, scope, SimpleNamespace(finished=finished))
    protocol = SimpleNamespace(stream=stream)
    await hypercorn_patches._close_stream(protocol)
    assert scope.cancel_called is not finished
    assert [type(e) for e in stream.events] == [StreamClosed]  # the disconnect still queued
    assert protocol.stream is None
    assert stream._trioproxy_on_close is None  # type: ignore[attr-defined]  (no cycle kept)


@pytest.mark.parametrize("finished", [False, True])
async def test_a_scope_handed_to_a_stream_already_closed_is_cancelled_at_once(
    finished: bool,
) -> None:
    """The client left while the body was being joined (before the app handed its scope)."""
    stream = _Stream()
    stream.closed = True
    scope = trio.CancelScope()
    hypercorn_patches.cancel_on_close(stream, scope, SimpleNamespace(finished=finished))
    assert scope.cancel_called is not finished


def test_only_hypercorn_s_http11_streams_report_their_close() -> None:
    assert hypercorn_patches.close_hook(lambda event: None) is None
    from hypercorn.config import Config
    from hypercorn.protocol.http_stream import HTTPStream

    protocol, _ = _protocol_with_request(b"POST")
    send = protocol.stream_send  # type: ignore[attr-defined]
    stream = HTTPStream(None, Config(), None, None, False, None, None, send, 1)  # type: ignore[arg-type]
    assert hypercorn_patches.close_hook(stream.app_send) is stream
    stream.send = _Stream().handle  # (an HTTP/2 or HTTP/3 stream's protocol)
    assert hypercorn_patches.close_hook(stream.app_send) is None


class _Served:
    """A streamed response on hypercorn's own send path: an HTTPStream on an H11Protocol
    writing through a TCPServer to a real socket pair (the client's end to read)."""

    def __init__(self, method: str = "POST") -> None:
        from hypercorn.config import Config
        from hypercorn.protocol.h11 import H11Protocol
        from hypercorn.protocol.http_stream import HTTPStream
        from hypercorn.trio.tcp_server import TCPServer
        from hypercorn.trio.worker_context import WorkerContext

        server_end, self.client = socket.socketpair()
        self.client.setblocking(False)
        context = WorkerContext(None)
        config = Config()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(server_end))
        self.server = TCPServer(None, config, context, None, stream)  # type: ignore[arg-type]
        protocol = H11Protocol(
            None, config, context, None, None, False, None, None, self.server.protocol_send
        )  # type: ignore[arg-type]
        self.server.protocol = protocol  # type: ignore[assignment]  (what a close is told to)
        protocol.connection.receive_data(method.encode() + b" / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert isinstance(protocol.connection.next_event(), h11.Request)
        self.stream = HTTPStream(
            None, config, context, None, False, None, None, protocol.stream_send, 1
        )  # type: ignore[arg-type]
        self.stream.scope = {"method": method, "http_version": "1.1"}  # type: ignore[typeddict-item]
        self.stream.start_time = 0.0  # (set by the request event, which is left out here)

    async def start(self, status: int = 200) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await self.stream.app_send(
            {"type": "http.response.start", "status": status, "headers": headers}
        )

    def close(self) -> None:
        self.client.close()
        self.server.stream.socket.close()

    async def received(self) -> bytes:
        data = b""
        while True:
            try:
                data += self.client.recv(65536)
            except BlockingIOError:
                return data


_CHUNKS = [b"data: 1\n\n", b"", b"data: " + b"x" * 20_000 + b"\n\n", bytearray(b"data: 2\n\n")]


@pytest.mark.parametrize("method", ["POST", "HEAD"])
async def test_a_chunk_sent_past_hypercorn_s_layers_is_written_as_its_body_event_is(
    method: str,
) -> None:
    """The same bytes on the wire (chunked framing, an empty chunk skipped, a chunk larger
    than one write, a HEAD's body suppressed) with and without ``chunk_sender``."""
    wires = []
    for direct in (False, True):
        served = _Served(method)
        await served.start()
        if direct:
            send_chunk = hypercorn_patches.chunk_sender(served.stream.app_send)
        else:

            async def send_chunk(chunk: bytes, served: _Served = served) -> None:
                event = {"type": "http.response.body", "body": chunk, "more_body": True}
                await served.stream.app_send(event)  # type: ignore[arg-type]

        wire = b""
        for chunk in _CHUNKS:
            await send_chunk(chunk)
            wire += await served.received()
        wires.append(wire)
        served.close()
    assert wires[0] == wires[1]
    assert (b"x" * 20_000 in wires[1]) is (method == "POST")


async def test_a_chunk_sender_skips_hypercorn_s_events_only_where_it_may() -> None:
    sent: list[object] = []

    async def other_servers_send(event: object) -> None:
        sent.append(event)

    await hypercorn_patches.chunk_sender(other_servers_send)(b"data: 1\n\n")
    assert sent == [{"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True}]

    served = _Served()
    send_chunk = hypercorn_patches.chunk_sender(served.stream.app_send)
    await served.start()
    events: list[object] = []
    served.stream.send = _spy(served.stream.send, events)  # type: ignore[method-assign]
    await send_chunk(b"data: 1\n\n")
    assert events == [] and (await served.received()).endswith(b"9\r\ndata: 1\n\n\r\n")
    served.close()


async def test_a_chunk_sender_behind_a_wrapped_server_send_sends_body_events() -> None:
    """A protocol whose ``send`` is not the TCP server's own (a wrapper in between) gets
    no shortcut: the chunk goes as the ASGI body event it stands for."""
    served = _Served()
    protocol = served.stream.send.__self__  # type: ignore[attr-defined]
    server_send = protocol.send
    passed: list[object] = []

    async def wrapped(event: object) -> None:
        passed.append(event)
        await server_send(event)

    protocol.send = wrapped
    send_chunk = hypercorn_patches.chunk_sender(served.stream.app_send)
    await served.start()
    await served.received()
    await send_chunk(b"data: 1\n\n")
    assert (await served.received()).endswith(b"9\r\ndata: 1\n\n\r\n")
    assert len(passed) == 2  # the head's and the chunk's, both through the wrapper
    served.close()


def _spy(send: Callable[[object], object], events: list[object]) -> Callable[[object], object]:
    async def spied(event: object) -> None:
        events.append(event)
        await send(event)  # type: ignore[misc]

    return spied


async def test_a_chunk_for_a_client_gone_ends_as_its_body_event_does() -> None:
    outcomes = []
    for direct in (False, True):
        served = _Served()
        await served.start()
        await served.received()
        served.client.close()
        send_chunk = hypercorn_patches.chunk_sender(served.stream.app_send)
        cut = hypercorn_patches.write_cut.set(False)
        try:
            if direct:
                await send_chunk(b"data: 1\n\n")
            else:
                await served.stream.app_send(
                    {"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True}
                )
            outcomes.append(hypercorn_patches.write_cut.get())
        finally:
            hypercorn_patches.write_cut.reset(cut)
            served.close()
    assert outcomes == [True, True]
