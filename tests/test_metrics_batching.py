"""Finished requests are counted in batches while a worker is busy (MetricsCollector.record).

What must hold: this process's own reads are always exact; another worker sees a record
(and the number of requests in flight) at the latest when its worker goes idle, fills a
batch, or a publish interval passes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from trioproxy.metrics import PUBLISH_AFTER_RECORDS, MetricsCollector, RequestMetrics
from trioproxy.metrics.series import observe_many

ROOT = Path(__file__).resolve().parent.parent


def _finished(status: int = 200, tokens: int = 2) -> RequestMetrics:
    return RequestMetrics(
        endpoint="/api/chat", method="POST", status_code=status, duration_ms=5.0,
        model="m", output_tokens=tokens,
    )  # fmt: skip


def _requests_total(body: bytes) -> float:
    for line in body.decode().splitlines():
        if line.startswith("http_requests_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_own_reads_are_exact_while_a_batch_is_pending() -> None:
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    c.request_started()  # a long request stays in flight: the worker is busy
    for status in (200, 200, 500):
        c.request_started()
        c.request_finished(_finished(status))
    summary = c.summary()
    assert summary["total_requests"] == 3 and summary["failed_requests"] == 1
    assert summary["tokens"]["output"] == 6
    assert summary["active_requests"] == 1
    assert _requests_total(c.render_prometheus(None)[0]) == 2  # the 200 series
    c.request_started()
    c.request_finished(_finished())
    assert c.filtered_summary()["filtered_requests"] == 4
    c.request_started()
    c.request_finished(_finished())
    assert c.health()[0]["total_requests"] == 5
    c.request_started()
    c.request_finished(_finished())
    assert len(c.window) == 6


def test_reset_counts_the_pending_batch_before_clearing_the_window() -> None:
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    c.request_started()
    c.request_started()
    c.request_finished(_finished())
    c.reset()
    assert len(c.window) == 0
    assert c.summary()["total_requests"] == 1


# What another worker sees is what prometheus_client's multiprocess files hold, read here
# by a separate process the way a scrape on another worker reads them.
WORKER = textwrap.dedent(
    """
    import json, sys
    import trio
    from prometheus_client.multiprocess import MultiProcessCollector
    from trioproxy.metrics import (
        PUBLISH_AFTER_RECORDS, PUBLISH_WITHIN_SECONDS, MetricsCollector, RequestMetrics,
    )

    directory = sys.argv[1]
    c = MetricsCollector(system_enabled=False, multiprocess_dir=directory)

    def seen_elsewhere():
        total = 0.0
        for family in MultiProcessCollector(None, directory).collect():
            if family.name == "http_requests":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return total

    def active_elsewhere():
        total = 0.0
        for family in MultiProcessCollector(None, directory).collect():
            if family.name == "http_requests_active":
                total += sum(s.value for s in family.samples)
        return total

    def finish_one():
        c.request_started()
        c.request_finished(RequestMetrics(endpoint="/v1/chat/completions", method="POST",
                                          status_code=200, duration_ms=1.0))

    seen = {}
    c.request_started()  # busy from here on
    seen["active_before_publishing"] = active_elsewhere()
    for _ in range(PUBLISH_AFTER_RECORDS - 1):
        finish_one()
    seen["batch_not_full"] = seen_elsewhere()
    finish_one()
    seen["batch_full"] = seen_elsewhere()
    seen["active_once_published"] = active_elsewhere()
    for _ in range(3):
        finish_one()
    seen["new_batch"] = seen_elsewhere()

    async def publisher_runs():
        with trio.move_on_after(PUBLISH_WITHIN_SECONDS * 1.5):
            await c.run_publisher()
    trio.run(publisher_runs)
    seen["after_interval"] = seen_elsewhere()
    c.request_started()
    c.request_finished(RequestMetrics(endpoint="/v1/chat/completions", method="POST",
                                      status_code=200, duration_ms=1.0))
    seen["still_busy"] = seen_elsewhere()
    c.request_finished(RequestMetrics(endpoint="/v1/chat/completions", method="POST",
                                      status_code=200, duration_ms=1.0))
    seen["idle"] = seen_elsewhere()
    seen["active_idle"] = active_elsewhere()
    print(json.dumps(seen))
    """
)


def test_other_workers_see_records_once_a_batch_fills_time_passes_or_the_worker_idles(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "prom"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(directory)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    n = PUBLISH_AFTER_RECORDS
    assert seen == {
        "batch_not_full": 0,
        "batch_full": n,
        "new_batch": n,
        "after_interval": n + 3,
        "still_busy": n + 3,
        "idle": n + 5,  # the long request finished too: nothing is left in flight
        # the in-flight gauge is set when publishing, like the counts
        "active_before_publishing": 0,
        "active_once_published": 1,
        "active_idle": 0,
    }


async def test_the_publisher_publishes_on_its_way_out() -> None:
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    c.request_started()
    c.request_started()
    c.request_finished(_finished())
    pending_before = c.pending_records
    with trio.move_on_after(0.01):
        await c.run_publisher()
    assert pending_before == 1 and c.pending_records == 0


async def test_the_publisher_publishes_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    c.request_started()
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run_publisher)
        for _ in range(3):
            c.request_started()
            c.request_finished(_finished())
            assert c.pending_records == 1
            await trio.sleep(0.6)
            assert c.pending_records == 0
        nursery.cancel_scope.cancel()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
            st.sampled_from([0.0, 0.005, 0.01, 0.1, 1.0, 60.0, math.inf, math.nan]),
        ),
        max_size=80,
    )
)
def test_a_batch_of_observations_lands_where_one_by_one_would(values: list[float]) -> None:
    """``observe_many`` (one update per bucket touched) against prometheus_client's own
    ``observe``, value by value, including bucket bounds, infinity and NaN."""
    registry = CollectorRegistry()
    buckets = (0.005, 0.01, 0.1, 1.0, 60.0)
    one_by_one = Histogram("one", "h", ["k"], buckets=buckets, registry=registry).labels("x")
    batched = Histogram("batched", "h", ["k"], buckets=buckets, registry=registry).labels("x")
    for value in values:
        one_by_one.observe(value)
    observe_many(batched, values)
    samples = {
        family.name: [
            (s.name.split("_", 1)[1], s.labels.get("le"), s.value) for s in family.samples
        ]
        for family in registry.collect()
    }
    expected, got = samples["one"], samples["batched"]
    assert [(n, le, v) for n, le, v in got if n != "sum" and n != "created"] == [
        (n, le, v) for n, le, v in expected if n != "sum" and n != "created"
    ]
    expected_sum = next(v for n, _, v in expected if n == "sum")
    got_sum = next(v for n, _, v in got if n == "sum")
    assert (math.isnan(expected_sum) and math.isnan(got_sum)) or got_sum == pytest.approx(
        expected_sum
    )


def test_counts_reach_the_series_only_when_the_batch_is_applied() -> None:
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    c.request_started()  # busy: finished requests wait in the batch
    for _ in range(3):
        c.request_started()
        c.request_finished(_finished(tokens=4))
    body = c.render_prometheus(None)[0].decode()  # a read publishes (and applies) first
    assert _requests_total(body.encode()) == 3
    assert 'trioproxy_tokens_total{api="ollama",model="m",type="output"} 12.0' in body
