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

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_held: list[int] = []


def _hold(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def take_held() -> list[int]:
    """The stop signals received while the program started, once."""
    taken = _held[:]
    _held.clear()
    return taken


def main() -> int:
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _hold)
    from .cli import main as run

    return run()
