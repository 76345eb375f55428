"""The proxy served in this process, for counting what its work costs under valgrind or
cProfile (``bench.chunk_instructions``, ``bench.request_instructions``): hypercorn with
trioproxy's patches applied, as ``trioproxy`` serves one worker, and requests written as
raw HTTP/1.1 bytes by a client in the same trio run."""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from bench.servers import Server

ROUTES = {"v1": "/v1/chat/completions", "ollama": "/api/chat"}


def run_against(
    start_backend: Callable[[], Server], main: Callable[[str], Awaitable[object]]
) -> None:
    """``main`` run by trio with the base URL (ending in /v1) of the backend
    ``start_backend`` launches; the backend stopped after, however it ends: Ctrl-C, or a
    SIGTERM (``timeout``, a CI cancel), which cancels the run and exits 143."""
    from bench import interrupts, servers

    interrupts.install_sigterm()
    with servers.stopped_after():
        backend = start_backend()
        interrupts.run_trio(main, backend.url + "/v1")
    sys.stdout.flush()


def raw_post(path: str, body: dict[str, Any]) -> bytes:
    """A keep-alive ``POST`` of ``body`` as JSON, head and body in one piece."""
    encoded = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(encoded)}\r\n\r\n"
    )
    return head.encode() + encoded


@asynccontextmanager
async def serving_proxy(upstream: str, **settings: Any) -> AsyncIterator[tuple[str, int]]:
    """The proxy in front of ``upstream`` on an ephemeral port of 127.0.0.1 (its address
    yielded), without the work that is no request's: the system sampler, readiness checks,
    the access log. ``settings`` are more of :class:`trioproxy.config.Settings`."""
    from hypercorn.trio import serve

    from trioproxy.app import create_app
    from trioproxy.cli import hypercorn_config
    from trioproxy.config import Settings

    config_settings = Settings(
        upstream_url=upstream,
        host="127.0.0.1",
        port=0,
        access_log=False,
        system_metrics_enabled=False,
        ready_check_interval=3600.0,
        **settings,
    )
    app = create_app(config_settings)
    config = hypercorn_config(config_settings)
    config.bind = ["127.0.0.1:0"]
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        try:
            yield host, int(port)
        finally:
            stop.set()


@contextmanager
def measured(profile: str | None) -> Iterator[None]:
    """The measured part of a run: after a collection and ``gc.freeze()``, as the proxy
    does after start-up (app.py: no full collection re-scans imports), and under cProfile
    when ``profile`` names a file to write it to."""
    gc.collect()
    gc.freeze()
    if not profile:
        yield
        return
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(profile)
