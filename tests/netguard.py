"""A guard for client-library tests: no connection to any host but loopback.

Client libraries phone home (tracing, telemetry, vocabularies, price lists); a test that
uses one wraps ``socket.getaddrinfo`` and ``socket.socket.connect``/``connect_ex`` with
``NetworkGuard`` so any other host is refused and recorded.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

_LOOPBACK_NAMES = frozenset({"127.0.0.1", "::1", "localhost"})


def _is_loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if not isinstance(host, str):
        return host is None  # getaddrinfo(None, ...) is a local lookup
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NetworkGuard:
    """Wraps ``socket.getaddrinfo`` and ``socket.socket.connect``/``connect_ex`` for one test:
    any other host than loopback is refused and recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.violations: list[str] = []
        real_getaddrinfo = socket.getaddrinfo
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            self.check("getaddrinfo", host)
            return real_getaddrinfo(host, *args, **kwargs)

        def connect(sock: socket.socket, address: Any) -> None:
            if isinstance(address, tuple):  # AF_UNIX addresses are local
                self.check("connect", address[0])
            real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            if isinstance(address, tuple):
                self.check("connect_ex", address[0])
            return real_connect_ex(sock, address)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)

    def check(self, what: str, host: object) -> None:
        if not _is_loopback(host):
            self.violations.append(f"{what} {host!r}")
            raise ConnectionRefusedError(f"test tried to reach {host!r}; only loopback is allowed")
