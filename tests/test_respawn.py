"""Which exited workers hypercorn's master replaces (``trioproxy.respawn``), without
processes: the budget's window, and the status the master stops with. The real process
tree is in test_process.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import pytest

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


def _join(workers: list[FakeWorker], budget: RespawnBudget, metrics_dir: str = "") -> int:
    join_exited = join_exited_respawning(budget, logging.getLogger("test"), metrics_dir)
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
