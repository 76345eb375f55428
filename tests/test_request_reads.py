"""How a client's bytes reach hypercorn's protocol: the reader of a plain connection (patch
21 of trioproxy.hypercorn_patches), on a real TCP connection."""

from __future__ import annotations

import socket
import struct
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from hypercorn.events import Closed, RawData

from trioproxy import hypercorn_patches


class _Protocol:
    """What the reader hands its bytes to, recording them."""

    def __init__(self) -> None:
        self.events: list[object] = []

    async def handle(self, event: object) -> None:
        self.events.append(event)


def _reader(read_timeout: float | None = None) -> tuple[SimpleNamespace, socket.socket]:
    """A TCPServer's part the reader uses, on one end of a TCP connection (the other
    end, the client's, returned)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server_end, _ = listener.accept()
    listener.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(server_end))
    server = SimpleNamespace(
        config=SimpleNamespace(read_timeout=read_timeout),
        stream=stream,
        protocol=_Protocol(),
        lingering=False,
    )
    return server, client


def _data(events: list[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, RawData))


async def test_a_plain_connection_is_read_without_receive_some_or_a_timeout_scope(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each read waits for the socket and takes what is there: no ``receive_some`` (which
    tried a read that found nothing first) and no ``fail_after`` scope per read."""

    async def refused(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("receive_some was called")

    def no_scope(*args: object, **kwargs: object) -> None:
        raise AssertionError("a timeout scope was entered")

    monkeypatch.setattr(trio.SocketStream, "receive_some", refused)
    monkeypatch.setattr(hypercorn_patches.trio, "fail_after", no_scope)
    server, client = _reader()
    with client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hypercorn_patches._read_until_closed, server)
            for part in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n\r\n"):
                client.sendall(part)
                await trio.testing.wait_all_tasks_blocked()
            client.shutdown(socket.SHUT_WR)
    await server.stream.aclose()
    events = server.protocol.events
    assert _data(events) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert events[-2:] == [RawData(b""), Closed()]  # the end, as hypercorn's reader says it


async def test_a_reset_connection_ends_the_reader_as_a_closed_one() -> None:
    server, client = _reader()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sendall(b"GET / HTTP/1.1\r\n")
    client.close()  # with linger 0: a reset
    await hypercorn_patches._read_until_closed(server)
    await server.stream.aclose()
    assert server.protocol.events[-1] == Closed()


async def test_a_connection_closed_here_ends_its_reader_waiting_or_about_to_read() -> None:
    """Closed by the server while the reader waits (a response that closed the
    connection), or before its next read: the reader ends, no error."""
    server, client = _reader()
    with client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hypercorn_patches._read_until_closed, server)
            await trio.testing.wait_all_tasks_blocked()
            await server.stream.aclose()
    assert server.protocol.events == [Closed()]

    server, client = _reader()
    with client:
        await server.stream.aclose()
        await hypercorn_patches._read_until_closed(server)
    assert server.protocol.events == [Closed()]


async def test_with_a_read_timeout_a_silent_connection_is_left_as_before() -> None:
    server, client = _reader(read_timeout=0.2)
    with client, trio.fail_after(10):
        await hypercorn_patches._read_until_closed(server)
    await server.stream.aclose()
    assert server.protocol.events == [Closed()]


async def test_a_new_connections_request_is_read_without_waiting_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client writes its request as soon as it connected: the first read takes it at
    once; only the reads after it wait for the socket first (with the loop busy, a wait
    is a whole round of every other task's steps)."""
    waits: list[int] = []
    wait_readable = trio.lowlevel.wait_readable

    async def counted(sock: object) -> None:
        waits.append(len(server.protocol.events))
        await wait_readable(sock)

    monkeypatch.setattr(hypercorn_patches.trio.lowlevel, "wait_readable", counted)
    server, client = _reader()
    with client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hypercorn_patches._read_until_closed, server)
            await trio.testing.wait_all_tasks_blocked()
            client.close()
    await server.stream.aclose()
    assert _data(server.protocol.events) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert waits == [1]  # one wait, after the request was handed on
