"""Shared reads: concurrent reads of one kind cost at most two renderings.

A scrape of a busy proxy renders hundreds of thousands of samples, and the monitoring
endpoints are open without a client key by default: N scrapers in a loop must not cost N
renderings at once. :class:`SharedReads` runs one rendering of a kind (a key: the
exposition format, the JSON summary's filters) at a time; every read of that kind arriving
while one runs shares the NEXT rendering, which starts when the current one ends. So
concurrent readers cost at most two renderings, and every read stays exact: the rendering
it gets started after it arrived, and a rendering publishes and reads the collector when
it starts, so it includes every request finished before the read arrived.

Nothing here starts a task: a rendering runs in the task of the reader that starts it,
shielded from that reader's cancellation (a reader whose client left still finishes the
rendering the others wait for; the cancellation reaches it at its next checkpoint, right
after). A reader that is cancelled while it waits just leaves; the next waiter to wake
starts the rendering it joined.

The shield has a deadline, :data:`RENDER_BOUND_SECONDS` from the rendering's start: a
rendering stuck past it (a worker thread that does not return, a file read that hangs) is
cancelled, and it fails for its reader and every reader sharing it with
:class:`SharedRenderingTimedOut` (the monitoring endpoints answer 503). So neither a
reader whose client left nor the server's shutdown waits for it longer than that. The
render's waits must give way to that cancellation: its worker threads are started with
``abandon_on_cancel=True`` (a stuck thread is left to itself and keeps its place in the
metrics' limiter, :mod:`.threads`, until it returns; nothing waits for it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio

RENDER_BOUND_SECONDS = 10.0
"""Longest a rendering may run (shielded) before it is given up. A scrape's legitimate
worst case is far below it: a full label budget renders in ~130 ms of a worker thread in
one process, and merging two workers' files from nothing (12.7 MB) takes ~300 ms
(docs/metrics.md, "What a scrape costs"); 10 s is also Prometheus' default
``scrape_timeout``, past which no scraper at its defaults still waits for the answer."""


class SharedRenderingFailed(RuntimeError):
    """The rendering a read shared ended without a result (its error is the cause)."""


class SharedRenderingTimedOut(SharedRenderingFailed):
    """The rendering a read shared ran past its bound (:data:`RENDER_BOUND_SECONDS`) and
    was given up."""


class _Round:
    """One rendering and the reads that share it."""

    __slots__ = ("done", "error", "ok", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False
        self.result: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> Any:
        if self.ok:
            return self.result
        if isinstance(self.error, SharedRenderingTimedOut):
            # each reader its own exception: a raised one takes the raising task's traceback
            raise SharedRenderingTimedOut(*self.error.args)
        raise SharedRenderingFailed("the shared metrics rendering failed") from self.error


class SharedReads:
    """One rendering per key at a time; the reads that arrive during it share the next.

    Call from the trio thread only. ``render`` is called with no arguments and must
    snapshot what it reads before its first checkpoint (so the rendering includes what
    finished before it started)."""

    def __init__(self, bound: float | None = None) -> None:
        self.bound = RENDER_BOUND_SECONDS if bound is None else bound
        self._running: dict[Hashable, _Round] = {}
        self._next: dict[Hashable, _Round] = {}
        self.renderings = 0  # renderings started, for tests and curious operators

    async def read(self, key: Hashable, render: Callable[[], Awaitable[Any]]) -> Any:
        # a reader already cancelled starts nothing: the rendering would be shielded
        await trio.lowlevel.checkpoint_if_cancelled()
        running = self._running.get(key)
        if running is None:
            # nothing running: start now (taking over a round whose readers all left, or
            # whose woken readers have not run yet: it starts after they all arrived)
            waiting = self._next.pop(key, None)
            return await self._run(key, waiting or _Round(), render)
        joined = self._next.get(key)
        if joined is None:
            joined = self._next[key] = _Round()
        await running.done.wait()  # cancellable: a reader leaving changes nothing here
        if not joined.done.is_set() and key not in self._running:
            # the first of its readers to wake starts the round they share (one that was
            # cancelled meanwhile leaves it to the next; checkpoint_if_cancelled does not
            # let any other task run in between)
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._next.get(key) is joined:
                del self._next[key]
            return await self._run(key, joined, render)
        await joined.done.wait()
        return joined.outcome()

    async def _run(self, key: Hashable, rnd: _Round, render: Callable[[], Awaitable[Any]]) -> Any:
        self._running[key] = rnd
        self.renderings += 1
        try:
            # others wait for this round: it ends even if this reader's client left, and
            # within its bound even if the render is stuck
            with trio.CancelScope(shield=True, deadline=trio.current_time() + self.bound):
                rnd.result = await render()
                rnd.ok = True
        except BaseException as exc:
            rnd.error = exc
            raise
        finally:
            if not rnd.ok and rnd.error is None:  # the bound's cancellation, caught above
                rnd.error = SharedRenderingTimedOut(
                    f"the metrics rendering ran past its {self.bound:g} s bound and was given up"
                )
            del self._running[key]
            rnd.done.set()
        if not rnd.ok:
            # a reader whose client left meanwhile just leaves
            await trio.lowlevel.checkpoint_if_cancelled()
        return rnd.outcome()
