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
from collections.abc import Iterator
from types import FrameType

STOPS = (signal.SIGINT, signal.SIGTERM)

_depth = 0  # how many deferred() blocks the main thread is in
_pending: int | None = None  # the first signal that arrived inside one


def install() -> None:
    """SIGINT raises KeyboardInterrupt and SIGTERM (timeout, a CI cancel, docker stop)
    SystemExit(143) in the main thread, each once."""
    for sig in STOPS:
        signal.signal(sig, _interrupted)


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
