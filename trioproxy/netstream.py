"""Backend socket I/O for httpcore with fewer scheduler rounds per read and write.

httpcore's trio stream wraps every socket read in an exception-mapping context manager and
``trio.fail_after`` even without a timeout, then trio's socket tries ``recv`` first, which
on a connection waiting for the backend fails with ``EAGAIN`` before it waits. Every write
goes through ``send_all`` and two scheduler yields, though a socket with room takes the
bytes in one call. Per proxied request that was about 55 µs of CPU, and 7 µs per relayed
stream chunk (docs/performance.md).

``DirectTCPBackend`` wraps the network backend of an httpcore pool (httpx's transport has
no public way to pass one in). Streams it opens read by waiting for readability first and
then reading what is there, and write straight to the socket when it has room; anything
else (TLS, a partial write, Unix sockets, connecting) is left to httpcore's own stream.
"""

# httpcore's stream and backend interface passes timeouts as parameters
# ruff: noqa: ASYNC109

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import httpcore
import trio


class DirectTCPStream(httpcore.AsyncNetworkStream):
    """An httpcore stream over plain TCP that reads and writes the socket directly."""

    __slots__ = ("_inner", "_socket")

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        socket = inner.get_extra_info("socket")
        plain = inner.get_extra_info("ssl_object") is None and isinstance(
            socket, trio.socket.SocketType
        )
        self._socket: trio.socket.SocketType | None = socket if plain else None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._socket is None:
            return await self._inner.read(max_bytes, timeout)
        if timeout is None:
            return await self._receive(self._socket, max_bytes)
        with trio.CancelScope(deadline=trio.current_time() + timeout):
            return await self._receive(self._socket, max_bytes)
        raise httpcore.ReadTimeout(f"no data from the backend within {timeout:g} s")

    @staticmethod
    async def _receive(socket: trio.socket.SocketType, max_bytes: int) -> bytes:
        try:
            while True:
                # waiting first saves the read that would find nothing yet (the usual case)
                await trio.lowlevel.wait_readable(socket)
                try:
                    return os.read(socket.fileno(), max_bytes)
                except BlockingIOError:
                    continue
        except (OSError, trio.ClosedResourceError) as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._socket is None:
            await self._inner.write(buffer, timeout)
            return
        try:
            sent = os.write(self._socket.fileno(), buffer)
        except BlockingIOError:
            sent = 0
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
        return await self._inner.start_tls(ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DirectTCPBackend(httpcore.AsyncNetworkBackend):
    """Connects with the wrapped backend, then hands out ``DirectTCPStream``s."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

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
        return DirectTCPStream(stream)

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


def install(transport: object) -> bool:
    """Give an httpx transport's connection pool the direct backend; whether it could."""
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool):
        return False
    backend = pool._network_backend
    if not isinstance(backend, DirectTCPBackend):
        pool._network_backend = DirectTCPBackend(backend)
    return True
