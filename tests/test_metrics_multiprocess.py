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

from trioproxy.metrics import multiprocess
from trioproxy.metrics.labels import ModelLabels

ROOT = Path(__file__).resolve().parent.parent
DEAD = 4_000_001  # a worker that has exited (psutil is told so)


def _in_a_worker(script: str, tmp_path: Path, *args: str) -> str:
    """The stdout of ``script`` run as a worker of a proxy whose multiprocess directory
    is ``tmp_path / "prom"`` (created on first use)."""
    mp = tmp_path / "prom"
    mp.mkdir(exist_ok=True)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp), "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


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
    monkeypatch.setattr(multiprocess.psutil, "pid_exists", lambda pid: pid != DEAD)
    _removed_by_another_worker_first(monkeypatch)

    assert multiprocess.mark_dead_workers(str(tmp_path)) == [DEAD]
    assert not any(f.exists() for f in live)
    assert all(f.exists() for f in kept)  # a dead worker's counts still happened


def test_no_dead_worker_no_removal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = _plant(tmp_path, f"gauge_livesum_{os.getpid()}.db", "http_requests_active", 1)
    odd = _plant(tmp_path, "gauge_livesum_notapid.db", "http_requests_active", 1)
    monkeypatch.setattr(multiprocess.psutil, "pid_exists", lambda pid: False)
    assert multiprocess.mark_dead_workers(str(tmp_path)) == []
    assert mine.exists() and odd.exists()


SCRAPE_DURING_CLEANUP = textwrap.dedent(
    """
    import os, sys
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from trioproxy.metrics import MetricsCollector, RequestMetrics, multiprocess

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

    multiprocess.psutil.pid_exists = lambda pid: pid != DEAD
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
    out = _in_a_worker(SCRAPE_DURING_CLEANUP, tmp_path, str(DEAD))
    first, _, body = out.partition("\n")
    assert first == "200 1"
    assert "http_requests_active 0.0" in body  # the dead worker's in-flight 1 is gone
    assert not list((tmp_path / "prom").glob(f"gauge_live*_{DEAD}.db"))


MERGED_OFF_THE_LOOP = textwrap.dedent(
    """
    import json, threading, trio
    from trioproxy.metrics import MetricsCollector, RequestMetrics, series

    merged_on = []
    merge = series.merged_families

    def merged_families(*args):
        merged_on.append("loop" if threading.current_thread() is threading.main_thread()
                         else "thread")
        return merge(*args)

    series.merged_families = merged_families
    c = MetricsCollector(system_enabled=False)
    for status in (200, 200, 502):
        c.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=status))

    async def reads():
        out = {}
        for limit in (0, 10**9):  # every file larger than the limit / none
            series.LOOP_MERGED_BYTES = limit
            del merged_on[:]
            body, _ = await c.read_prometheus()
            summary = await c.read_summary()
            health, status = await c.read_health()
            filtered = await c.read_filtered_summary(endpoint_filter="/api/chat")
            out[limit] = {
                "merged_on": sorted(set(merged_on)), "merges": len(merged_on),
                "requests": [ln for ln in body.decode().splitlines()
                             if ln.startswith("http_requests_total{")],
                "total": summary["total_requests"], "failed": summary["failed_requests"],
                "health_total": health["total_requests"], "status": status,
                "global_total": filtered["global_total_requests"],
            }
        return out

    out = trio.run(reads)
    sync = c.render_prometheus()[0].decode().splitlines()
    out["sync_requests"] = [ln for ln in sync if ln.startswith("http_requests_total{")]
    out["sync_status"] = c.health()[1]
    print(json.dumps(out), flush=True)
    """
)


def test_the_workers_files_are_merged_off_the_event_loop_when_large(tmp_path: Path) -> None:
    """With --workers every scrape, JSON summary and metrics health check merged the
    workers' files on the event loop: at a full label budget (10 MB of files) 450 ms in
    which the worker moved no request. Large files are merged in a worker thread."""
    out = json.loads(_in_a_worker(MERGED_OFF_THE_LOOP, tmp_path))
    large, small = out["0"], out[str(10**9)]
    assert large["merged_on"] == ["thread"] and small["merged_on"] == ["loop"]
    assert large["merges"] == small["merges"] == 4  # scrape, summary, health, filtered
    for read in (large, small):
        assert read["requests"] == out["sync_requests"] and len(read["requests"]) == 2
        assert (read["total"], read["failed"]) == (3, 1)
        assert read["health_total"] == read["global_total"] == 3
        assert read["status"] == out["sync_status"] == 503  # one error in three


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
    out = _in_a_worker(SECOND_COLLECTOR, tmp_path)
    app, app_after_own, app_more, app_after_own_again, own, taken_over = json.loads(out)
    assert [app, app_after_own, app_more, app_after_own_again] == [10, 10, 15, 15]
    assert own == 2
    assert taken_over == 16  # carries on from the files


# ----------------------------------------------------------------------------- model labels


def test_a_model_one_worker_admitted_is_labelled_so_on_every_worker(tmp_path: Path) -> None:
    """Each worker kept its own set of model labels: a model was newmodel-xyz on the
    worker where it first succeeded and "other" on the next, splitting its counts."""
    a, b = ModelLabels(50, shared_dir=str(tmp_path)), ModelLabels(50, shared_dir=str(tmp_path))
    assert a.label("newmodel-xyz", succeeded=True) == "newmodel-xyz"
    assert b.label("newmodel-xyz", succeeded=False) == "newmodel-xyz"
    assert b.label("never-succeeded", succeeded=False) == "other"
    assert a.label("never-succeeded", succeeded=False) == "other"


def test_the_model_label_budget_is_the_proxys(tmp_path: Path) -> None:
    a, b = ModelLabels(2, shared_dir=str(tmp_path)), ModelLabels(2, shared_dir=str(tmp_path))
    a.allow("mapped")
    b.allow("mapped")  # every worker pre-registers the mapping: one name, one slot
    assert b.label("m1", succeeded=True) == "m1"
    assert a.label("m2", succeeded=True) == "other"  # the budget of 2 is spent
    assert b.label("m2", succeeded=True) == "other"
    assert {a.label(m, succeeded=False) for m in ("mapped", "m1")} == {"mapped", "m1"}
    assert a.size == b.size == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_label_0", "model_label_1"]


def test_two_workers_taking_one_slot_both_end_with_a_label(tmp_path: Path) -> None:
    a, b = ModelLabels(3, shared_dir=str(tmp_path)), ModelLabels(3, shared_dir=str(tmp_path))
    assert a.label("first", succeeded=True) == "first"
    b.allow("second")  # b has not looked: it tries slot 0, finds it taken, takes slot 1
    assert b.label("second", succeeded=False) == "second"
    assert b.label("first", succeeded=False) == "first"
    a.refresh()
    assert a.label("second", succeeded=False) == "second"
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["first", "second"]


def test_a_slot_that_cannot_be_read_is_no_error_and_no_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of file descriptors, reading a slot raised EMFILE out of ``refresh`` (and so
    out of the metrics publisher, which ended for the worker's life); labelling a new
    model would take and re-read the slot for ever. Now: no error, "other" this time,
    and the name is read once descriptors are back."""
    a, b = ModelLabels(3, shared_dir=str(tmp_path)), ModelLabels(3, shared_dir=str(tmp_path))
    assert a.label("first", succeeded=True) == "first"
    real_open = open

    def no_descriptors(path: str, *args: object, **kwargs: object) -> object:
        if "model_label_" in str(path) and "draft" not in str(path):
            raise OSError(24, "Too many open files")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", no_descriptors)
    b.refresh()
    assert b.label("second", succeeded=True) == "other"
    monkeypatch.undo()
    b.refresh()
    assert b.label("first", succeeded=False) == "first"

    # the draft of a new slot cannot be opened either: "other" this time, and the names
    # stay shared (they were turned off for the worker's life, as for a read-only dir)
    def no_descriptors_at_all(path: str, *args: object, **kwargs: object) -> object:
        if "model_label" in str(path):
            raise OSError(24, "Too many open files")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", no_descriptors_at_all)
    assert b.label("third", succeeded=True) == "other"
    monkeypatch.undo()
    assert b.label("third", succeeded=True) == "third"
    a.refresh()
    assert a.label("third", succeeded=False) == "third"  # b's name reached a


SHARED_LABELS = textwrap.dedent(
    """
    import json, os
    from trioproxy.metrics import MetricsCollector, RequestMetrics
    from trioproxy.metrics.labels import ModelLabels

    c = MetricsCollector(system_enabled=False)
    other_worker = ModelLabels(50, shared_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"])

    def rec(model, status):
        c.record(RequestMetrics(endpoint="/v1/chat/completions", method="POST",
                                status_code=status, model=model))

    other_worker.label("newmodel-xyz", succeeded=True)  # it succeeded on the other worker
    rec("newmodel-xyz", 503)
    rec("late", 503)  # nobody admitted it yet: "other", and the kind is cached so
    other_worker.label("late", succeeded=True)
    c.model_labels.refresh()  # what run_publisher does every 0.5 s
    rec("late", 503)
    counts = [
        [s.labels["model"], s.value] for f in c._prom.collect() if f.name == "http_requests"
        for s in f.samples if s.name == "http_requests_total"
    ]
    print(json.dumps(sorted(counts)), flush=True)
    """
)


def test_a_worker_labels_the_models_other_workers_admitted(tmp_path: Path) -> None:
    out = _in_a_worker(SHARED_LABELS, tmp_path)
    assert json.loads(out) == [["late", 1.0], ["newmodel-xyz", 1.0], ["other", 1.0]]


SPLIT = textwrap.dedent(
    """
    import json, sys
    from trioproxy.metrics import MetricsCollector, RequestMetrics

    c = MetricsCollector(system_enabled=False)
    status = int(sys.argv[1])
    c.record(RequestMetrics(endpoint="/v1/chat/completions", method="POST",
                            status_code=status, model="newmodel-xyz"))
    print(json.dumps(c.window.entries()[-1].model), flush=True)
    """
)


def test_a_models_failures_on_another_worker_keep_its_label(tmp_path: Path) -> None:
    """The reviewer's split.py without a server: the model succeeds on one worker, then
    fails on another, which labelled it "other" and split the model's counts."""

    def worker(status: int) -> str:
        return json.loads(_in_a_worker(SPLIT, tmp_path, str(status)))

    assert worker(503) == "other"  # never succeeded anywhere yet
    assert worker(200) == "newmodel-xyz"
    assert worker(503) == "newmodel-xyz"


# a worker of an earlier version of trioproxy: it counts one request and exits
WORKER_OF_AN_OLDER_VERSION = textwrap.dedent(
    """
    from trioproxy.metrics import MetricsCollector, RequestMetrics, collector

    collector.__version__ = "0.0.1-before-the-upgrade"  # where the collector reads it
    c = MetricsCollector(system_enabled=False)
    c.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=200, model="m"))
    body, _ = c.render_prometheus(None)
    print([line for line in body.decode().splitlines() if line.startswith("trioproxy_build_info")])
    """
)

BUILD_INFO = textwrap.dedent(
    """
    import json
    from prometheus_client.parser import text_string_to_metric_families
    from trioproxy.metrics import MetricsCollector

    body, _ = MetricsCollector(system_enabled=False).render_prometheus(None)
    samples = [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]
    print(json.dumps({
        "build_info": [s.labels["version"] for s in samples if s.name == "trioproxy_build_info"],
        "requests": sum(s.value for s in samples if s.name == "http_requests_total"),
    }))
    """
)


def test_build_info_names_the_versions_of_the_live_workers_only(tmp_path: Path) -> None:
    """hypercorn starts its workers anew in the same directory on SIGHUP (how plain
    hypercorn reloads upgraded code) or after ``max_requests``, and a directory reused
    across runs holds the last run's files. trioproxy_build_info was a "max" gauge, kept
    for dead workers: after an upgrade it said 1 for the old version too, forever. Their
    counts stay (their requests happened); their build_info goes, as their other gauges."""
    from trioproxy import __version__

    older = _in_a_worker(WORKER_OF_AN_OLDER_VERSION, tmp_path)
    assert 'version="0.0.1-before-the-upgrade"' in older  # it ran as the older version
    now = json.loads(_in_a_worker(BUILD_INFO, tmp_path))
    assert now == {"build_info": [__version__], "requests": 1}


# a worker's app owing a response, as a queued background answer makes it owe one
WORKER_OWING_A_RESPONSE = textwrap.dedent(
    """
    import sys
    from trioproxy.app import create_app
    from trioproxy.ledger import Counted

    app = create_app(upstream_url="http://127.0.0.1:9", metrics_enabled=sys.argv[1] == "on")
    app.ledger.owe("resp_1", Counted())
    """
)


@pytest.mark.parametrize("metrics", ["on", "off"])
def test_the_workers_share_a_ledger_only_while_tokens_are_counted(
    tmp_path: Path, metrics: str
) -> None:
    """The Responses API ledger says what a later request is to count. With request
    metrics off nothing counts tokens: the workers write no ledger files (a thread and a
    file per background response, a rename on the event loop per poll, for nothing)."""
    _in_a_worker(WORKER_OWING_A_RESPONSE, tmp_path, metrics)
    written = list((tmp_path / "prom" / "responses_ledger").rglob("*"))
    assert bool(written) is (metrics == "on"), written
