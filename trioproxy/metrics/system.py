"""psutil sampler: host and process figures, sampled in a trio task (never its own thread).

Only cheap psutil calls are used (``interval=None`` CPU readings, ``/proc`` reads): about
0.5 ms per sample.  ``cpu_percent(None)`` reports usage since the previous call, so both
the host and the process readings are primed when the sampler is created; the first real
sample (taken immediately when :meth:`SystemSampler.run` starts) covers the time since.
If a sample ever takes longer than :data:`OFFLOAD_AFTER_SECONDS` (a slow ``/`` mount, a
huge fd table), later samples read psutil in ``trio.to_thread.run_sync`` so the event
loop is never held up.

The host's network and disk byte counters are also read at scrape time
(:func:`read_io_counters`, two ``/proc`` reads, about 0.1 ms): every worker then reports the
kernel's current totals, so they never go down from one scrape to the next whichever
worker answers (a sample of each worker's own would).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import psutil
import trio

from .store import iso_utc
from .threads import metrics_threads

log = logging.getLogger("trioproxy.metrics")

OFFLOAD_AFTER_SECONDS = 0.02


def empty_snapshot() -> dict[str, Any]:
    return {
        "cpu_usage_percent": 0.0,
        "memory_usage_percent": 0.0,
        "memory_usage_bytes": 0,
        "memory_total_bytes": 0,
        "disk_usage_percent": 0.0,
        "network_io": _empty_network_io(),
        "disk_io": _empty_disk_io(),
        "process": {
            "pid": os.getpid(),
            "rss_bytes": 0,
            "cpu_percent": 0.0,
            "cpu_seconds": 0.0,
            "num_threads": 0,
            "open_fds": 0,
        },
        "system_timestamp": None,
    }


def unmeasured_snapshot() -> dict[str, Any]:
    """The snapshot's shape with ``None`` for every measured figure (``pid`` is known): what
    a collector with system metrics disabled reports. A 0 would read as a measurement (an
    idle host) on dashboards, and the host alerts could never tell it apart."""
    snap: dict[str, Any] = {
        key: dict.fromkeys(value) if isinstance(value, dict) else None
        for key, value in empty_snapshot().items()
    }
    snap["process"]["pid"] = os.getpid()
    return snap


def _empty_network_io() -> dict[str, int]:
    return {"bytes_sent": 0, "bytes_recv": 0, "packets_sent": 0, "packets_recv": 0}


def _empty_disk_io() -> dict[str, int]:
    return {"read_bytes": 0, "write_bytes": 0, "read_count": 0, "write_count": 0}


def read_io_counters() -> tuple[dict[str, int], dict[str, int]]:
    """The host's network and disk I/O counters as the kernel has them now (``/proc``).

    ``nowrap=False``: psutil's wrap-around correction keeps a cache per process, so two
    workers started at different times could add different offsets and disagree; the
    kernel's own figures are the same in every process. 0s where psutil has none (no disk
    counters in some containers)."""
    return _read_network_io(), _read_disk_io()


def _read_network_io() -> dict[str, int]:
    try:
        net = psutil.net_io_counters(nowrap=False)
    except (psutil.Error, OSError):
        net = None
    if net is None:
        return _empty_network_io()
    return {
        "bytes_sent": net.bytes_sent,
        "bytes_recv": net.bytes_recv,
        "packets_sent": net.packets_sent,
        "packets_recv": net.packets_recv,
    }


# how long which of /proc/diskstats' names are whole disks (not partitions) is kept: a
# name's kind changes only when its device goes and another comes under the same name
DISK_KINDS_SECONDS = 60.0


class _DiskKinds:
    """Which block device names are whole disks, as psutil's own total decides it
    (``is_storage_device``: a ``/sys/block`` lookup per name, about 10 us each, which
    psutil made for every line of ``/proc/diskstats`` at every scrape): a name is looked
    up the first time it is seen, and all again every :data:`DISK_KINDS_SECONDS`."""

    def __init__(self) -> None:
        self._whole: dict[str, bool] = {}
        self._since = -math.inf

    def whole(self, names: Iterable[str]) -> list[str]:
        now = time.monotonic()
        if now - self._since >= DISK_KINDS_SECONDS:
            self._whole, self._since = {}, now
        known = self._whole
        found = []
        for name in names:
            whole = known.get(name)
            if whole is None:
                whole = known[name] = _is_whole_disk(name)
            if whole:
                found.append(name)
        return found


def _is_whole_disk(name: str) -> bool:
    if not sys.platform.startswith("linux"):
        return True  # (psutil's per-disk figures elsewhere name no partitions)
    from psutil._pslinux import is_storage_device

    return bool(is_storage_device(name))


_disk_kinds = _DiskKinds()


def _read_disk_io() -> dict[str, int]:
    try:
        # per disk, then summed over the whole disks (a partition's I/O is its disk's too)
        disks = psutil.disk_io_counters(perdisk=True, nowrap=False)  # {} in some containers
    except (psutil.Error, OSError):
        disks = {}
    if not disks:
        return _empty_disk_io()
    totals = _empty_disk_io()
    for name in _disk_kinds.whole(disks):
        dio = disks[name]
        totals["read_bytes"] += dio.read_bytes
        totals["write_bytes"] += dio.write_bytes
        totals["read_count"] += dio.read_count
        totals["write_count"] += dio.write_count
    return totals


class SystemSampler:
    """Latest host/process snapshot, refreshed every ``interval`` seconds by :meth:`run`.

    ``on_sample(snapshot)`` (optional) is called on the trio thread after every sample;
    the collector uses it to feed the process RSS/CPU series.
    """

    def __init__(
        self,
        interval: float = 5.0,
        *,
        on_sample: Callable[[dict[str, Any]], None] | None = None,
        disk_path: str = "/",
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.interval = float(interval)
        self.on_sample = on_sample
        self.disk_path = disk_path
        self.snapshot: dict[str, Any] = empty_snapshot()
        self.samples = 0
        self.last_sample_seconds = 0.0
        self.last_sample_at = 0.0  # time.monotonic() of the latest sample
        self.running = False
        self._stopped = False
        self._offload = False
        self._scope: trio.CancelScope | None = None
        self._proc = psutil.Process()
        self._prime()

    def _prime(self) -> None:
        try:
            psutil.cpu_percent(None)
            self._proc.cpu_percent(None)
        except (psutil.Error, OSError):  # pragma: no cover - exotic platforms
            pass

    # -- sampling ------------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """One round of psutil reads -> a new snapshot dict (thread-safe, no side effects
        on the sampler besides psutil's own CPU bookkeeping)."""
        snap = empty_snapshot()
        try:
            snap["cpu_usage_percent"] = float(psutil.cpu_percent(None))
        except (psutil.Error, OSError):
            pass
        try:
            vm = psutil.virtual_memory()
            snap["memory_usage_percent"] = float(vm.percent)
            snap["memory_usage_bytes"] = int(vm.used)
            snap["memory_total_bytes"] = int(vm.total)
        except (psutil.Error, OSError):
            pass
        try:
            snap["disk_usage_percent"] = float(psutil.disk_usage(self.disk_path).percent)
        except (psutil.Error, OSError):
            pass
        snap["network_io"], snap["disk_io"] = read_io_counters()
        proc = snap["process"]
        p = self._proc
        try:
            with p.oneshot():
                proc["rss_bytes"] = int(p.memory_info().rss)
                proc["cpu_percent"] = float(p.cpu_percent(None))
                ct = p.cpu_times()
                proc["cpu_seconds"] = float(ct.user + ct.system)
                proc["num_threads"] = int(p.num_threads())
                try:
                    proc["open_fds"] = int(p.num_fds())
                except (AttributeError, psutil.Error, OSError):  # Windows has no num_fds
                    proc["open_fds"] = 0
        except (psutil.Error, OSError):
            pass
        snap["system_timestamp"] = iso_utc(time.time())
        return snap

    def _apply(self, snap: dict[str, Any]) -> dict[str, Any]:
        self.snapshot = snap
        self.samples += 1
        self.last_sample_at = time.monotonic()
        if self.on_sample is not None:
            try:
                self.on_sample(snap)
            except Exception:  # never let bookkeeping kill the sampler
                log.exception("metrics: on_sample callback failed")
        return snap

    def sample_once(self) -> dict[str, Any]:
        """Take one sample synchronously (about 0.5 ms) and return the new snapshot."""
        t0 = time.perf_counter()
        snap = self.read()
        self.last_sample_seconds = time.perf_counter() - t0
        return self._apply(snap)

    async def _sample_async(self) -> None:
        if self._offload:
            t0 = time.perf_counter()
            snap = await trio.to_thread.run_sync(
                self.read, abandon_on_cancel=True, limiter=metrics_threads()
            )
            self.last_sample_seconds = time.perf_counter() - t0
            self._apply(snap)
            return
        self.sample_once()
        if self.last_sample_seconds > OFFLOAD_AFTER_SECONDS:
            self._offload = True
            log.debug(
                "metrics: a system sample took %.1f ms; "
                "reading psutil in a worker thread from now on",
                self.last_sample_seconds * 1000.0,
            )

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample now, report started, then every ``interval`` seconds until cancelled or
        :meth:`stop`-ped (then it returns normally and the snapshot stays frozen)."""
        if self._stopped:
            task_status.started()
            return
        with trio.CancelScope() as scope:
            self._scope = scope
            self.running = True
            try:
                self.sample_once()  # immediate first sample: never all zeros after startup
                task_status.started()
                while True:
                    await trio.sleep(self.interval)
                    await self._sample_async()
            finally:
                self.running = False
                self._scope = None

    def stop(self) -> None:
        """Stop sampling: a running :meth:`run` returns; values stay as last sampled."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()

    @property
    def stopped(self) -> bool:
        return self._stopped
