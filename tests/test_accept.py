"""trio's listener takes every queued connection at once (trioproxy.accept, patch 22)."""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing

from trioproxy import accept


@asynccontextmanager
async def _listener() -> AsyncIterator[tuple[trio.SocketListener, int]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    assert isinstance(listener, trio.SocketListener)
    async with listener:
        yield listener, listener.socket.getsockname()[1]


@contextmanager
def _clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``port``, each established (queued at the listener)."""
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        yield clients
    finally:
        for client in clients:
            client.close()


async def _closed_all(streams: list[trio.SocketStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def test_a_burst_of_connections_is_taken_in_one_wait() -> None:
    async with _listener() as (listener, port):
        with _clients(port, 20) as clients:
            streams = [await listener.accept()]
            try:
                with trio.testing.assert_no_checkpoints():
                    streams += [await listener.accept() for _ in range(19)]
                # each stream is its own client's, in the order they connected
                for number, (client, stream) in enumerate(zip(clients, streams, strict=True)):
                    client.sendall(b"%d" % number)
                    assert await stream.receive_some(16) == b"%d" % number
            finally:
                await _closed_all(streams)


async def test_one_accept_takes_at_most_the_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accept, "ACCEPT_BURST", 4)
    async with _listener() as (listener, port):
        with _clients(port, 6):
            streams = [await listener.accept()]
            try:
                with trio.testing.assert_no_checkpoints():
                    streams += [await listener.accept() for _ in range(3)]
                with trio.testing.assert_checkpoints():
                    streams.append(await listener.accept())  # the fifth: a new wait
                streams.append(await listener.accept())
            finally:
                await _closed_all(streams)


async def test_a_worker_sharing_its_socket_takes_one_connection_per_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hypercorn's workers (multiprocessing children) share one listening socket: a burst
    taken whole by one left the other idle for as long as its clients kept their
    connections (bench 3h: one core of two in two rounds of eight)."""
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    async with _listener() as (listener, port):
        with _clients(port, 3):
            streams = [await listener.accept()]
            try:
                for _ in range(2):
                    with trio.testing.assert_checkpoints():
                        streams.append(await listener.accept())
                assert not getattr(listener, accept._QUEUED, None)
            finally:
                await _closed_all(streams)


async def test_an_empty_queue_waits_for_the_next_connection() -> None:
    async with _listener() as (listener, port):
        with trio.testing.assert_checkpoints():
            with _clients(port, 1):
                stream = await listener.accept()
                await stream.aclose()
        with trio.move_on_after(0.05) as waited:
            await listener.accept()  # nothing queued, nothing held: it waits
        assert waited.cancelled_caught


async def test_closing_the_listener_closes_the_connections_it_holds() -> None:
    async with _listener() as (listener, port):
        with _clients(port, 3) as clients:
            first = await listener.accept()
            await listener.aclose()
            for client in clients[1:]:  # accepted, never handed out: closed, not leaked
                client.settimeout(5)
                try:
                    assert client.recv(16) == b""
                except ConnectionResetError:
                    pass
            with pytest.raises(trio.ClosedResourceError):
                await listener.accept()
            await first.aclose()


async def test_a_connection_reset_in_the_queue_does_not_hold_the_ones_behind() -> None:
    async with _listener() as (listener, port):
        with _clients(port, 3) as clients:
            # the second client resets its connection before the listener takes it
            clients[1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            clients[1].close()
            streams = [await listener.accept() for _ in range(3)]
            try:
                with pytest.raises(trio.BrokenResourceError):  # its handler finds it reset
                    await streams[1].receive_some(16)
                clients[2].sendall(b"third")
                assert await streams[2].receive_some(16) == b"third"
            finally:
                await _closed_all(streams)
