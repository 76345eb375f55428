"""Which exited workers hypercorn's master replaces (``trioproxy.respawn``), without
processes: the budget's window, and the status the master stops with. The real process
tree is in test_process.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from trioproxy.metrics.multiprocess import mark_dead_workers, merged_families, signal_label
from trioproxy.respawn import RespawnBudget, join_exited_respawning


class FakeWorker:
    def __init__(self, pid: int, exitcode: int | None) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.joined = False

    def join(self) -> None:
        self.joined = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_allows_its_limit_within_its_window() -> None:
    clock = Clock()
    budget = RespawnBudget(limit=2, window=60.0, clock=clock)
    assert budget.allow() and budget.allow()
    assert not budget.allow()
    clock.now = 59.9
    assert not budget.allow()  # the first two are still within the window
    clock.now = 60.0
    assert budget.allow()  # both have left it: room for two again
    assert budget.allow()
    assert not budget.allow()


def test_nothing_is_started_again_once_the_master_stops() -> None:
    budget = RespawnBudget()
    budget.stopping = True
    assert not budget.allow()


def _join(
    workers: list[FakeWorker],
    budget: RespawnBudget,
    metrics_dir: str = "",
    restarts: list[int] | None = None,
) -> int:
    count = restarts.append if restarts is not None else None
    join_exited = join_exited_respawning(budget, logging.getLogger("test"), metrics_dir, count)
    return join_exited(cast(list[Any], workers))


def test_a_killed_worker_is_reported_as_a_clean_exit_and_removed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    running, killed = FakeWorker(10, None), FakeWorker(11, -9)
    workers = [running, killed]
    with caplog.at_level(logging.WARNING):
        assert _join(workers, RespawnBudget()) == 0
    assert workers == [running] and killed.joined and not running.joined
    assert "worker 11 was killed by SIGKILL; starting another" in caplog.text


@pytest.mark.parametrize("status", [1, 3])
def test_a_worker_that_failed_by_itself_stops_the_server(status: int) -> None:
    """A non-zero exit is the worker's own failure (its app did not start): starting it
    again would fail again."""
    workers = [FakeWorker(10, status), FakeWorker(11, None)]
    assert _join(workers, RespawnBudget()) == status
    assert [w.pid for w in workers] == [11]


def test_a_clean_exit_stays_clean() -> None:
    workers = [FakeWorker(10, 0)]
    assert _join(workers, RespawnBudget()) == 0 and workers == []


def test_past_the_budget_a_kill_stops_the_server(caplog: pytest.LogCaptureFixture) -> None:
    budget = RespawnBudget(limit=1, window=60.0, clock=Clock())
    assert _join([FakeWorker(10, -9)], budget) == 0
    with caplog.at_level(logging.ERROR):
        assert _join([FakeWorker(11, -9)], budget) == -9
    assert "worker 11 was killed by SIGKILL, more than 1 killed workers within 60 s" in (
        caplog.text
    )


def test_while_stopping_a_kill_keeps_its_status(caplog: pytest.LogCaptureFixture) -> None:
    budget = RespawnBudget()
    budget.stopping = True
    with caplog.at_level(logging.WARNING):
        assert _join([FakeWorker(10, -15)], budget) == -15
    assert caplog.text == ""


def test_an_unknown_signal_is_named_by_its_number(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert _join([FakeWorker(10, -200)], RespawnBudget()) == 0
    assert "killed by signal 200" in caplog.text


def test_an_exited_workers_live_gauges_leave_the_shared_metrics_at_once(tmp_path: Path) -> None:
    """Its in-flight and connection gauges would otherwise stay until a scrape finds its
    pid gone, and forever if another process took the pid. Its counts stay."""
    names = ["gauge_livesum_11.db", "gauge_livemax_11.db", "gauge_livesum_110.db",
             "counter_11.db", "histogram_11.db", "gauge_all_11.db"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert _join([FakeWorker(11, -9)], RespawnBudget(), str(tmp_path)) == 0
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["counter_11.db", "gauge_all_11.db", "gauge_livesum_110.db", "histogram_11.db"]


def test_only_a_killed_worker_started_again_is_counted() -> None:
    restarts: list[int] = []
    budget = RespawnBudget(limit=1, window=60.0, clock=Clock())
    workers = [FakeWorker(10, 0), FakeWorker(11, 1), FakeWorker(12, -9), FakeWorker(13, None)]
    _join(workers, budget, restarts=restarts)
    assert restarts == [signal.SIGKILL]
    assert _join([FakeWorker(14, -9)], budget, restarts=restarts) == -9  # past the budget
    budget.stopping = True
    assert _join([FakeWorker(15, -15)], budget, restarts=restarts) == -15
    assert restarts == [signal.SIGKILL]  # the server stops: nothing was started again
    assert _join([FakeWorker(16, -15)], RespawnBudget(), restarts=restarts) == 0
    assert restarts == [signal.SIGKILL, signal.SIGTERM]


def test_the_signal_label_is_a_signals_name_or_other() -> None:
    """Bounded whatever the number: the platform's named signals, and one value for the
    rest (real-time signals, numbers no signal has)."""
    assert signal_label(9) == "SIGKILL" and signal_label(15) == "SIGTERM"
    assert signal_label(200) == signal_label(-1) == signal_label(signal.SIGRTMIN + 3) == "other"
    labels = {signal_label(n) for n in range(-10, 1000)}
    assert labels <= {s.name for s in signal.Signals} | {"other"}
    assert len(labels) <= len(signal.Signals) + 1


MASTER = """
import logging, sys
import hypercorn.run
from trioproxy.cli import hypercorn_child  # what the master imports
from trioproxy.respawn import RespawnBudget, respawn_killed_workers

class Killed:
    def __init__(self, pid, exitcode):
        self.pid, self.exitcode = pid, exitcode
    def join(self):
        pass

respawn_killed_workers(RespawnBudget())
if sys.argv[1] == "kill":
    assert hypercorn.run._join_exited([Killed(10, -9), Killed(11, -200)]) == 0
web = sorted(m for m in sys.modules if m.split(".")[0] in ("quart", "quart_trio", "werkzeug"))
assert not web, web
"""


def _restarts_in(directory: Path) -> dict[str, float]:
    return {
        sample.labels["signal"]: sample.value
        for family in merged_families(str(directory))
        if family.name == "trioproxy_worker_restarts"
        for sample in family.samples
    }


@pytest.mark.parametrize("kill", [False, True])
def test_the_masters_count_is_in_the_shared_files_for_every_workers_merge(
    tmp_path: Path, kill: bool
) -> None:
    """The master's own counter file, at 0 before any worker starts, is merged by the
    workers' scrapes, and stays after the master is gone (the scrapes' clean-up of dead
    processes' files removes only live gauges). The master imports no web framework."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    argv = [sys.executable, "-c", MASTER, "kill" if kill else "start"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    mark_dead_workers(str(tmp_path))  # what every worker's scrape does first
    expected = {"SIGKILL": 1.0, "other": 1.0} if kill else {"SIGKILL": 0.0}
    assert _restarts_in(tmp_path) == expected
