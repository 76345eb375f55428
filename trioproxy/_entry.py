"""The ``trioproxy`` command and ``python -m trioproxy``.

Importing the program takes a few tenths of a second. A stop signal in that time (a
supervisor stopping a service it has just started) ended the process by the signal's
default (exit 143) or as a ``KeyboardInterrupt`` traceback. The stop signals are held
from the first moment here, before the imports, and the signal watcher
(``cli.watch_signals``) acts on them as soon as it runs: a clean drain and exit 0.
"""

from __future__ import annotations

import atexit
import os
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


def _exit_now(signum: int, frame: FrameType | None) -> None:
    os._exit(0)


def stop_holding() -> None:
    """Once the run and its clean-up are over: a later stop signal is not held for a
    watcher that is gone. Where it would have ended the process (its default, or Python's
    KeyboardInterrupt) it ends it at once with exit 0, the clean-up being done: by its
    default a script repeating its kill got exit 143 (or a traceback) for a clean stop,
    depending on when its last signal came. Only the last log lines still waiting (at
    most ``logs.EXIT_WAIT``) can be lost, as they would by the default. Any other handler
    from before is given back."""
    for stop_signal, handler in _before.items():
        if signal.getsignal(stop_signal) is _hold:
            ends = handler in (signal.SIG_DFL, signal.default_int_handler)
            signal.signal(stop_signal, _exit_now if ends else handler)
    _before.clear()


def _ignore_stop_signals() -> None:
    """The last exit handler (registered first): past it, the interpreter's finalization
    sets every signal with a Python handler back to its default (not an ignored one), so
    a stop signal arriving then, as the process ends anyway (a script repeating its kill,
    a third Ctrl-C), ended it by that default: exit -15 or -2 instead of its own status."""
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, signal.SIG_IGN)


def hold_stop_signals() -> None:
    """From the program's first moment to its last: held while it starts, acted on by the
    signal watcher while it runs, ending it at once after (:func:`stop_holding`), ignored
    while the interpreter finishes."""
    atexit.register(_ignore_stop_signals)
    for stop_signal in STOP_SIGNALS:
        _before[stop_signal] = signal.signal(stop_signal, _hold)


def main() -> int:
    hold_stop_signals()
    from .cli import main as run

    return run()
