"""Server-level behaviour of the stack itself (hypercorn trio worker + quart-trio)."""

from __future__ import annotations

import socket
import time

import trio

from trioproxy.cli import hypercorn_config
from trioproxy.config import Settings


def test_idle_keep_alive_connection_is_closed(proxy_with_short_keepalive: str) -> None:
    """hypercorn 0.18 + quart-trio never closed idle keep-alive connections (stack notes P1);
    trioproxy.hypercorn_patches fixes it. A version bump that undoes the fix fails here."""
    host, port = proxy_with_short_keepalive.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        sock.settimeout(5)
        tail = b""
        while True:
            data = sock.recv(4096)
            if not data:
                break
            tail += data
        closed_after = time.monotonic() - started
    assert closed_after < 3.0, f"idle connection stayed open {closed_after:.2f}s"


def test_hypercorn_config_never_cuts_streams() -> None:
    config = hypercorn_config(Settings(upstream_url="http://127.0.0.1:1/v1"))
    assert config.read_timeout is None  # type: ignore[attr-defined]
    assert config.accesslog is None  # type: ignore[attr-defined]


async def test_app_disables_quart_response_timeout() -> None:
    from trioproxy.app import create_app

    app = create_app(Settings(upstream_url="http://127.0.0.1:1/v1"))
    assert app.config["RESPONSE_TIMEOUT"] is None
    assert app.config["MAX_CONTENT_LENGTH"] == 64 * 1024 * 1024
    await trio.lowlevel.checkpoint()


async def test_start_up_heap_is_frozen_out_of_the_collectors_sight() -> None:
    """Full collections re-scanning the import-time heap were the latency tail (27 ms per
    pause under load, 225 ms with 1,000 open streams), and young collections at the
    default threshold cost 21 µs per proxied request (docs/performance-history.md)."""
    import gc

    from trioproxy.app import create_app

    app = create_app(Settings(upstream_url="http://127.0.0.1:1/v1"))
    before = gc.get_threshold()
    try:
        async with app.test_app():
            assert gc.get_freeze_count() > 10_000
            assert gc.get_threshold() == (10_000, 10, 100)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
