"""A worker of ``--workers N`` killed by a signal (the OOM killer's SIGKILL, a stray
``kill``) is started again, while the others serve on.

hypercorn's master stops every worker as soon as one exits with a non-zero status, so one
killed worker dropped every stream of every other worker and restarted the whole server.
Here, in the master (``cli.hypercorn_child``), hypercorn's bookkeeping of exited workers
reports a killed one as a clean exit, and hypercorn starts a new worker in its place, as
it does for one that exits cleanly. A worker that fails by itself (a non-zero exit: its
app did not start) still stops the server, as do kills faster than :class:`RespawnBudget`
allows (a worker killed as soon as it starts would be started again forever), and nothing
is started again once the master is stopping.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Protocol

from .metrics.multiprocess import MULTIPROC_ENV, WorkerRestarts, remove_live_gauges

RESPAWN_LIMIT = 5
RESPAWN_WINDOW_SECONDS = 60.0
"""At most RESPAWN_LIMIT killed workers started again within this many seconds (as
systemd's default start limit, 5 in 10 s, but over a window that outlasts a worker's
start); the next kill stops the server, for its supervisor to restart."""


class RespawnBudget:
    """Whether the next killed worker may be started again. Plain bookkeeping."""

    def __init__(
        self,
        limit: int = RESPAWN_LIMIT,
        window: float = RESPAWN_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._started: deque[float] = deque()
        self.stopping = False  # the master is stopping: start nothing again

    def allow(self) -> bool:
        if self.stopping:
            return False
        now = self._clock()
        while self._started and now - self._started[0] >= self.window:
            self._started.popleft()
        if len(self._started) >= self.limit:
            return False
        self._started.append(now)
        return True


class JoinExited(Protocol):
    """``hypercorn.run._join_exited``'s signature (its parameter by name too)."""

    def __call__(self, processes: list[BaseProcess]) -> int: ...


def join_exited_respawning(
    budget: RespawnBudget,
    log: logging.Logger,
    metrics_dir: str | None = None,
    count_restart: Callable[[int], None] | None = None,
) -> JoinExited:
    """A stand-in for ``hypercorn.run._join_exited``: removes the exited workers from
    ``processes`` and returns the status the server stops with (0: go on, and hypercorn
    starts workers until there are N again), a killed worker's being 0 while ``budget``
    allows. An exited worker's live gauges leave ``metrics_dir`` (the workers' shared
    metrics) at once: in-flight requests and open connections of a worker that is gone.
    ``count_restart`` is called with the signal number of each killed worker started
    again (not of a kill past the budget: the server stops)."""

    def join_exited(processes: list[BaseProcess]) -> int:
        exitcode = 0
        for index in reversed(range(len(processes))):
            worker = processes[index]
            if worker.exitcode is None:
                continue
            worker.join()
            if metrics_dir and worker.pid is not None:
                remove_live_gauges(metrics_dir, worker.pid)
            status = _status(worker, budget, log, count_restart)
            exitcode = status if exitcode == 0 else exitcode
            del processes[index]
        return exitcode

    return join_exited


def _status(
    worker: BaseProcess,
    budget: RespawnBudget,
    log: logging.Logger,
    count_restart: Callable[[int], None] | None,
) -> int:
    status = worker.exitcode
    assert status is not None
    if status >= 0 or budget.stopping:
        return status
    killed_by = _signal_name(-status)
    if budget.allow():
        log.warning(
            "worker %s was killed by %s; starting another (the other workers serve on)",
            worker.pid,
            killed_by,
        )
        if count_restart is not None:
            count_restart(-status)
        return 0
    log.error(
        "worker %s was killed by %s, more than %d killed workers within %g s: stopping the server",
        worker.pid,
        killed_by,
        budget.limit,
        budget.window,
    )
    return status


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def respawn_killed_workers(budget: RespawnBudget) -> None:
    """Install :func:`join_exited_respawning` in hypercorn's master (this process)."""
    import hypercorn.run as hypercorn_run

    from .logs import HYPERCORN_LOGGER

    log = logging.getLogger(HYPERCORN_LOGGER)
    metrics_dir = os.environ.get(MULTIPROC_ENV)
    count_restart = _restart_counter(log) if metrics_dir else None
    join_exited = join_exited_respawning(budget, log, metrics_dir, count_restart)
    hypercorn_run._join_exited = join_exited


def _restart_counter(log: logging.Logger) -> Callable[[int], None] | None:
    """The master's ``trioproxy_worker_restarts_total`` (its SIGKILL series at 0 from now
    on), as a function of the signal number. A metric never stops the master from
    replacing a worker: where its file cannot be written, the kills are only logged."""
    try:
        restarts = WorkerRestarts()
    except OSError as error:
        log.warning("metrics: trioproxy_worker_restarts_total is not counted: %s", error)
        return None

    def count_restart(signal_number: int) -> None:
        try:
            restarts.count(signal_number)
        except OSError as error:
            log.warning("metrics: a replaced worker was not counted: %s", error)

    return count_restart
