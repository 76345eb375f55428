"""Ctrl-C and SIGTERM for the bench: both unwind it, so every server it started is
stopped on the way out, and a second signal does not cut that cleanup short.

A signal that arrives while a server is being launched waits until the server is known to
whoever stops them (:func:`deferred`): raised inside ``subprocess.Popen`` or the log
reader's start, it would leave a process of its own session running after the bench.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from types import FrameType
from typing import Any

import trio

STOPS = (signal.SIGINT, signal.SIGTERM)

_depth = 0  # how many deferred() blocks the main thread is in
_pending: int | None = None  # the first signal that arrived inside one


def install() -> None:
    """SIGINT raises KeyboardInterrupt and SIGTERM (timeout, a CI cancel, docker stop)
    SystemExit(143) in the main thread, each once."""
    for sig in STOPS:
        signal.signal(sig, _interrupted)


def install_sigterm() -> None:
    """For the bench's development tools (``bench.request_instructions`` and the like):
    SIGTERM raises SystemExit(143) in the main thread, so their cleanup runs, and inside
    :func:`run_trio` it cancels the run first. Ctrl-C stays Python's KeyboardInterrupt,
    which trio delivers itself."""
    signal.signal(signal.SIGTERM, _interrupted)


def run_trio(async_fn: Callable[..., Awaitable[object]], *args: Any, **run_options: Any) -> None:
    """``trio.run(async_fn, *args, **run_options)`` where a SIGTERM cancels the run (its
    tasks' ``finally`` blocks run, their servers stop) and is then raised as
    SystemExit(143). Raised from the signal handler, it would have hit trio's scheduler
    anywhere."""
    received: list[int] = []

    async def until_stopped() -> None:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_first, signals, nursery.cancel_scope, received)
                await async_fn(*args)
                nursery.cancel_scope.cancel()

    trio.run(until_stopped, **run_options)
    if received:
        _unwind(received[0])


async def _cancel_on_first(signals: Any, scope: trio.CancelScope, received: list[int]) -> None:
    async for signum in signals:
        received.append(signum)
        scope.cancel()
        return


def _interrupted(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _depth:
        _pending = _pending or signum
        return
    _unwind(signum)


def _unwind(signum: int) -> None:
    for sig in STOPS:
        signal.signal(sig, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, a stop signal is held back and raised as the block ends. Only the main
    thread defers (Python runs signal handlers there alone); keep the block short."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            signum, _pending = _pending, None
            _unwind(signum)
