"""The psutil sampler: a trio task in a nursery, never blocking the loop, stoppable."""

from __future__ import annotations

import time

import psutil
import pytest
import trio

from trioproxy.metrics import MetricsCollector
from trioproxy.metrics import system as system_mod
from trioproxy.metrics.system import SystemSampler


async def test_first_sample_is_taken_at_start() -> None:
    c = MetricsCollector(system_interval=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run_system_sampler)
        assert c.sampler.samples == 1 and c.sampler.running
        snap = c.summary()["system"]
        assert snap["memory_total_bytes"] > 0
        assert snap["process"]["rss_bytes"] > 0
        assert snap["process"]["num_threads"] >= 1
        assert snap["system_timestamp"] is not None
        assert snap["sampler"] == {
            "enabled": True,
            "running": True,
            "interval_seconds": 60.0,
            "samples": 1,
        }
        nursery.cancel_scope.cancel()
    assert not c.sampler.running


async def test_sampler_loop_does_not_block_the_event_loop() -> None:
    c = MetricsCollector(system_interval=0.01)
    worst = 0.0
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run_system_sampler)
        deadline = trio.current_time() + 0.4
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            await trio.sleep(0.005)
            worst = max(worst, time.perf_counter() - t0 - 0.005)
        nursery.cancel_scope.cancel()
    assert c.sampler.samples >= 5
    assert worst < 0.05, f"event loop blocked for {worst * 1000:.1f} ms"


async def test_stop_ends_the_loop_and_freezes_values() -> None:
    c = MetricsCollector(system_interval=0.01)
    async with trio.open_nursery() as nursery:  # exits on its own: run() returns after stop()
        await nursery.start(c.run_system_sampler)
        await trio.sleep(0.05)
        c.stop()
    frozen = c.sampler.samples
    snap = c.sampler.snapshot
    await trio.sleep(0.03)
    assert c.sampler.samples == frozen
    assert c.summary()["system"]["sampler"]["enabled"] is False
    assert c.sampler.snapshot is snap
    # a stopped collector's sampler does not start again
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run_system_sampler)
    assert c.sampler.samples == frozen


async def test_disabled_sampler_returns_at_once_and_stays_zero() -> None:
    c = MetricsCollector(system_enabled=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run_system_sampler)
    assert c.sampler.samples == 0
    assert c.summary()["system"]["cpu_usage_percent"] == 0.0


def test_missing_disk_io_counters_are_handled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "disk_io_counters", lambda *a, **k: None)
    monkeypatch.setattr(psutil, "net_io_counters", lambda *a, **k: None)

    def broken(*_a: object) -> None:
        raise PermissionError("no")

    monkeypatch.setattr(psutil, "disk_usage", broken)
    snap = SystemSampler(5.0).sample_once()
    assert snap["disk_io"] == {"read_bytes": 0, "write_bytes": 0, "read_count": 0, "write_count": 0}
    assert snap["network_io"]["bytes_sent"] == 0
    assert snap["disk_usage_percent"] == 0.0
    assert snap["memory_total_bytes"] > 0


async def test_slow_samples_move_to_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system_mod, "OFFLOAD_AFTER_SECONDS", -1.0)
    s = SystemSampler(0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await trio.sleep(0.08)
        nursery.cancel_scope.cancel()
    assert s._offload and s.samples >= 3


async def test_process_series_follow_the_sampler() -> None:
    c = MetricsCollector(system_interval=0.01)
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run_system_sampler)
        sum(i * i for i in range(300_000))  # burn a little CPU
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    t = c.totals()
    assert t.rss > 0
    assert t.cpu_seconds == pytest.approx(c.sampler.snapshot["process"]["cpu_seconds"], rel=1e-6)


def test_bad_interval() -> None:
    with pytest.raises(ValueError):
        SystemSampler(0)
