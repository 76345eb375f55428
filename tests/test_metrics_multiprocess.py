"""Multiprocess mode (``--workers N``): the shared files under concurrent workers.

prometheus_client's value class is chosen per process, so anything that needs the
multiprocess values in a collector runs in a subprocess of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from trioproxy.metrics import prom

ROOT = Path(__file__).resolve().parent.parent
DEAD = 4_000_001  # a worker that has exited (psutil is told so)


def _plant(path: Path, filename: str, metric: str, value: float) -> Path:
    """A worker's mmap file holding one sample, as prometheus_client writes it."""
    target = path / filename
    d = MmapedDict(str(target))
    d.write_value(mmap_key(metric, metric, (), (), "planted"), value, 0.0)
    d.close()
    return target


def _removed_by_another_worker_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every removal finds the file already gone: another worker's scrape removed it a
    moment earlier (what two scrapes cleaning up one dead worker do)."""
    real = os.remove

    def remove(target: str | os.PathLike[str], *args: object, **kw: object) -> None:
        real(target)  # the other worker
        real(target)  # this one: FileNotFoundError

    monkeypatch.setattr(os, "remove", remove)
    monkeypatch.setattr(os, "unlink", remove)


def test_two_workers_cleaning_up_one_dead_worker_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = [
        _plant(tmp_path, f"gauge_livesum_{DEAD}.db", "http_requests_active", 1),
        _plant(tmp_path, f"gauge_liveall_{DEAD}.db", "some_gauge", 2),
    ]
    kept = [
        _plant(tmp_path, f"counter_{DEAD}.db", "http_requests_total", 3),
        _plant(tmp_path, f"gauge_max_{DEAD}.db", "trioproxy_build_info", 1),
        _plant(tmp_path, f"gauge_livesum_{os.getpid()}.db", "http_requests_active", 0),
    ]
    monkeypatch.setattr(prom.psutil, "pid_exists", lambda pid: pid != DEAD)
    _removed_by_another_worker_first(monkeypatch)

    assert prom.mark_dead_workers(str(tmp_path)) == [DEAD]
    assert not any(f.exists() for f in live)
    assert all(f.exists() for f in kept)  # a dead worker's counts still happened


def test_no_dead_worker_no_removal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = _plant(tmp_path, f"gauge_livesum_{os.getpid()}.db", "http_requests_active", 1)
    odd = _plant(tmp_path, "gauge_livesum_notapid.db", "http_requests_active", 1)
    monkeypatch.setattr(prom.psutil, "pid_exists", lambda pid: False)
    assert prom.mark_dead_workers(str(tmp_path)) == []
    assert mine.exists() and odd.exists()


SCRAPE_DURING_CLEANUP = textwrap.dedent(
    """
    import os, sys
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from trioproxy.metrics import MetricsCollector, RequestMetrics, prom

    DEAD = int(sys.argv[1])
    mp = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    c = MetricsCollector(system_enabled=False)
    c.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=200, model="m"))

    for name in (f"gauge_livesum_{DEAD}.db", f"gauge_liveall_{DEAD}.db"):
        d = MmapedDict(os.path.join(mp, name))
        d.write_value(mmap_key("http_requests_active", "http_requests_active", (), (), "x"), 1, 0)
        d.close()
    # a worker starting right now: its file is created, not yet sized (no header)
    open(os.path.join(mp, "counter_4000002.db"), "wb").close()

    prom.psutil.pid_exists = lambda pid: pid != DEAD
    real = os.remove
    def remove(target, *args, **kw):
        real(target)  # another worker's scrape removed it first
        real(target)
    os.remove = os.unlink = remove

    body, _ = c.render_prometheus(None)
    health, status = c.health()
    print(status, c.summary()["total_requests"], flush=True)
    print(body.decode(), flush=True)
    """
)


def test_a_scrape_survives_files_changing_under_it(tmp_path: Path) -> None:
    """The scrape, the JSON and health all collect the files: another worker removing a
    dead worker's gauges first, or a worker starting (its file not sized yet), must not
    turn them into a 500."""
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp), "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", SCRAPE_DURING_CLEANUP, str(DEAD)], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    first, _, body = res.stdout.partition("\n")
    assert first == "200 1"
    assert "http_requests_active 0.0" in body  # the dead worker's in-flight 1 is gone
    assert not list(mp.glob(f"gauge_live*_{DEAD}.db"))


SECOND_COLLECTOR = textwrap.dedent(
    """
    import gc, json
    from trioproxy.metrics import MetricsCollector, RequestMetrics

    def rec(c, n):
        for _ in range(n):
            c.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=200))

    seen = []
    app = MetricsCollector(system_enabled=False)  # the app's: the process's writer
    rec(app, 10)
    seen.append(app.summary()["total_requests"])
    own = MetricsCollector(max_metrics=500, system_enabled=False)  # docs/monitoring.md
    rec(own, 1)
    seen.append(app.summary()["total_requests"])
    rec(app, 5)
    seen.append(app.summary()["total_requests"])
    rec(own, 1)
    seen.append(app.summary()["total_requests"])
    seen.append(own.summary()["total_requests"])
    del app
    gc.collect()
    after = MetricsCollector(system_enabled=False)  # the writer is gone: this one takes over
    rec(after, 1)
    seen.append(after.summary()["total_requests"])
    print(json.dumps(seen), flush=True)
    """
)


def test_a_second_collector_in_a_worker_never_moves_the_shared_counters(
    tmp_path: Path,
) -> None:
    """Two collectors writing one process's multiprocess files each wrote its own count
    over the other's (10 -> 11 -> 15 -> 12). The first is the process's writer; another
    counts only its own requests, in the process, as it would without --workers."""
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp), "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", SECOND_COLLECTOR], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    app, app_after_own, app_more, app_after_own_again, own, taken_over = json.loads(res.stdout)
    assert [app, app_after_own, app_more, app_after_own_again] == [10, 10, 15, 15]
    assert own == 2
    assert taken_over == 16  # carries on from the files
