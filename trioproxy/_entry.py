"""The ``trioproxy`` command and ``python -m trioproxy``.

Importing the program takes a few tenths of a second. A stop signal in that time (a
supervisor stopping a service it has just started) ended the process by the signal's
default (exit 143) or as a ``KeyboardInterrupt`` traceback. The stop signals are held
from the first moment here, before the imports, and the signal watcher
(``cli.watch_signals``) acts on them as soon as it runs: a clean drain and exit 0.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_held: list[int] = []
_before: dict[int, Any] = {}  # the handlers in place before ours


def _hold(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def take_held() -> list[int]:
    """The stop signals received while the program started, once."""
    taken = _held[:]
    _held.clear()
    return taken


def stop_holding() -> None:
    """Give the stop signals back their handlers from before (once the signal watcher is
    done with them): a later one is not held for a watcher that is gone."""
    for stop_signal, handler in _before.items():
        if signal.getsignal(stop_signal) is _hold:
            signal.signal(stop_signal, handler)
    _before.clear()


def main() -> int:
    for stop_signal in STOP_SIGNALS:
        _before[stop_signal] = signal.signal(stop_signal, _hold)
    from .cli import main as run

    return run()
