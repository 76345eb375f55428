"""The psutil sampler: a trio task in a nursery, never blocking the loop, stoppable."""

from __future__ import annotations

import itertools
import time
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

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


async def test_disabled_sampler_returns_at_once_and_measures_nothing() -> None:
    c = MetricsCollector(system_enabled=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run_system_sampler)
    assert c.sampler.samples == 0
    assert c.summary()["system"]["cpu_usage_percent"] is None  # unmeasured, not an idle 0


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


# ----------------------------------------------------------------------------- host counters


HOST_COUNTERS = (
    "network_bytes_sent_total",
    "network_bytes_recv_total",
    "disk_read_bytes_total",
    "disk_write_bytes_total",
)


def _exposed(c: MetricsCollector) -> dict[str, float]:
    text = c.render_prometheus(None)[0].decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _growing_kernel_counters(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """psutil's I/O counters, growing by 1000 bytes on every read (as the kernel's do);
    returns the keyword arguments of each call."""
    reads = itertools.count(1)
    calls: list[dict[str, Any]] = []

    def net(*_a: Any, **kw: Any) -> SimpleNamespace:
        calls.append(kw)
        n = next(reads) * 1000
        return SimpleNamespace(bytes_sent=n, bytes_recv=n, packets_sent=n, packets_recv=n)

    def disk(*_a: Any, **kw: Any) -> dict[str, SimpleNamespace]:
        calls.append(kw)
        n = next(reads) * 1000
        return {"sda": SimpleNamespace(read_bytes=n, write_bytes=n, read_count=n, write_count=n)}

    monkeypatch.setattr(psutil, "net_io_counters", net)
    monkeypatch.setattr(psutil, "disk_io_counters", disk)
    monkeypatch.setattr(system_mod, "_disk_kinds", system_mod._DiskKinds())
    monkeypatch.setattr(system_mod, "_is_whole_disk", lambda name: True)
    return calls


def test_host_counters_never_go_down_whichever_worker_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers sample at different moments; scrapes alternate between them. With each
    worker's own sample as the counter, a scrape of the worker that sampled earlier went
    below the one before (Prometheus reads a reset: a spike on every dashboard)."""
    calls = _growing_kernel_counters(monkeypatch)
    first = MetricsCollector(system_interval=3600.0, multiprocess=False)
    second = MetricsCollector(system_interval=3600.0, multiprocess=False)
    first.sampler.sample_once()
    second.sampler.sample_once()  # later: the kernel's counters have grown since
    seen: dict[str, list[float]] = {name: [] for name in HOST_COUNTERS}
    json_seen: list[int] = []
    for worker in (second, first, second, first):
        exposed = _exposed(worker)
        for name in HOST_COUNTERS:
            seen[name].append(exposed[name])
        json_seen.append(worker.summary()["system"]["network_io"]["bytes_sent"])
    for name, values in seen.items():
        assert values == sorted(values) and len(set(values)) == len(values), (name, values)
    assert json_seen == sorted(json_seen), json_seen
    # the kernel's own figures: psutil's per-process wrap correction would differ by worker
    assert calls and all(kw.get("nowrap") is False for kw in calls)


def test_a_stopped_sampler_freezes_the_host_counters_too(monkeypatch: pytest.MonkeyPatch) -> None:
    _growing_kernel_counters(monkeypatch)
    c = MetricsCollector(system_interval=3600.0, multiprocess=False)
    c.sampler.sample_once()
    c.stop()
    frozen = c.sampler.snapshot["network_io"]["bytes_sent"]
    assert _exposed(c)["network_bytes_sent_total"] == frozen
    assert c.summary()["system"]["network_io"]["bytes_sent"] == frozen


# ----------------------------------------------------------------------------- disabled

SYSTEM_FAMILIES = (
    "system_cpu_usage_percent",
    "system_memory_usage_percent",
    "system_memory_usage_bytes",
    "system_disk_usage_percent",
    *HOST_COUNTERS,
    "trioproxy_process_resident_memory_bytes",
    "trioproxy_process_cpu_seconds_total",
)


def test_disabled_system_metrics_are_absent_not_zero() -> None:
    """SYSTEM_METRICS_ENABLED=false reported 0 % CPU, 0 % memory and 0 bytes RSS: false
    zeros on the dashboards, and HighCPUUsage/HighMemoryUsage silenced by a measurement
    that never happened. Now the families are absent and the JSON says null."""
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    exposed = _exposed(c)
    assert not [name for name in SYSTEM_FAMILIES if name in exposed]
    assert exposed["system_uptime_seconds"] >= 0  # the proxy's own uptime: still known
    system = c.summary()["system"]
    for key in ("cpu_usage_percent", "memory_usage_percent", "memory_usage_bytes",
                "memory_total_bytes", "disk_usage_percent", "system_timestamp"):  # fmt: skip
        assert key in system and system[key] is None, key
    assert set(system["network_io"]) == {"bytes_sent", "bytes_recv", "packets_sent", "packets_recv"}
    assert set(system["network_io"].values()) == {None}
    assert set(system["disk_io"].values()) == {None}
    process = system["process"]
    assert process.pop("pid") > 0 and set(process.values()) == {None}
    assert c.filtered_summary()["system"]["process"]["rss_bytes"] is None
    body, status = c.health()  # health never reads them: no crash, nothing unhealthy
    assert status == 200 and body["status"] == "healthy"


def test_enabled_system_metrics_are_all_there() -> None:
    exposed = _exposed(MetricsCollector(system_interval=3600.0, multiprocess=False))
    assert [name for name in SYSTEM_FAMILIES if name not in exposed] == []
    assert exposed["trioproxy_process_resident_memory_bytes"] > 0


@pytest.mark.parametrize("metrics_enabled", [True, False])
async def test_every_worker_samples_from_its_start(metrics_enabled: bool) -> None:
    """The process RSS/CPU series are the sum over live workers: each worker must sample
    from its start, also with METRICS_ENABLED=false (requests not recorded, system
    metrics still served), not only once a scrape reaches it."""
    from trioproxy.app import create_app
    from trioproxy.config import Settings

    from .conftest import closed_port_url

    settings = Settings(
        upstream_url=closed_port_url(),
        metrics_enabled=metrics_enabled,
        system_metrics_interval=60.0,
    )
    app = create_app(settings)
    async with app.test_app():
        assert app.collector.sampler.running
        assert app.collector.sampler.samples == 1


# ----------------------------------------------------------------------------- disk kinds


def _disks(*names: str) -> dict[str, SimpleNamespace]:
    return {
        name: SimpleNamespace(read_bytes=1000, write_bytes=100, read_count=10, write_count=1)
        for name in names
    }


def test_disk_io_is_the_whole_disks_sum_and_their_kinds_are_kept_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partition's I/O is its disk's too: only whole disks are summed, as psutil's own
    total does; which names are whole disks (a /sys/block lookup each, psutil's per line
    at every scrape) is looked up once per name, and all again after DISK_KINDS_SECONDS."""
    devices = ["sda", "sda1", "sda2", "nvme0n1", "nvme0n1p1"]
    monkeypatch.setattr(psutil, "disk_io_counters", lambda *a, **kw: _disks(*devices))
    looked_up: list[str] = []

    def whole(name: str) -> bool:
        looked_up.append(name)
        return name in ("sda", "sdb", "nvme0n1")

    now = [1000.0]
    monkeypatch.setattr(system_mod, "_is_whole_disk", whole)
    monkeypatch.setattr(system_mod.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(system_mod, "_disk_kinds", system_mod._DiskKinds())
    expected = {"read_bytes": 2000, "write_bytes": 200, "read_count": 20, "write_count": 2}
    assert system_mod.read_io_counters()[1] == expected
    assert sorted(looked_up) == sorted(devices)
    looked_up.clear()
    devices.append("sdb")  # a disk plugged in counts from the first read that sees it
    now[0] += system_mod.DISK_KINDS_SECONDS - 1
    assert system_mod.read_io_counters()[1]["read_bytes"] == 3000
    assert looked_up == ["sdb"]
    looked_up.clear()
    now[0] += 1  # and every name is looked up again once the kinds are that old
    system_mod.read_io_counters()
    assert sorted(looked_up) == sorted(devices)


def test_disk_io_is_psutils_own_total_on_this_machine() -> None:
    total = psutil.disk_io_counters(nowrap=False)
    ours = system_mod.read_io_counters()[1]
    if total is None:
        assert ours == system_mod._empty_disk_io()
        return
    # the kernel's counters may move between the two reads: never back, and only a little
    assert 0 <= ours["read_count"] - total.read_count < 1000
    assert 0 <= ours["write_bytes"] - total.write_bytes < 1 << 30
