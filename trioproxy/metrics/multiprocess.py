"""The workers' shared files: what makes the metrics of ``--workers N`` one set of numbers.

With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client keeps every series in mmap-backed
files, one per process and metric type, and each scrape merges the files of all workers
(:func:`merged_families`). The plumbing around that lives here, apart from the series
themselves (:mod:`.series`), so the request path reads none of it:

* whether this process is one of several hypercorn workers sharing nothing (a warning);
* the value classes: switching to the multiprocess ones late, and local ones for private
  collectors (the benchmarks') that must not write into the workers' files;
* dead workers' live gauges removed, their counter and histogram files folded into one
  archive per type (:mod:`.archive`), and the master's ``trioproxy_worker_restarts_total``;
* the files merged (kept between reads and brought up to date: :mod:`.shared_merge`),
  sized (to merge large ones off the event loop) and claimed by one collector per
  process (:func:`claim_shared_files`).
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import signal
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import psutil
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client import values as _values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from . import archive, mmap_files
from .shared_merge import SharedFilesMerge

log = logging.getLogger("trioproxy.metrics")

# the multiprocess files with their space reserved: a full filesystem must not kill a
# worker (SIGBUS) nor fail its requests' bookkeeping
mmap_files.install()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir_from_env() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


_workers_checked = False


def warn_if_workers_share_nothing() -> None:
    """Once per process: warn when this process is one of several hypercorn workers while
    the metrics are per process (no ``PROMETHEUS_MULTIPROC_DIR``). Each scrape would then
    report whichever worker answered, and the counters would jump between them.

    hypercorn's worker count is not visible to the app, so it is read from the command
    line of the parent process (``hypercorn ... --workers N``); a count set only in a
    hypercorn config file is not seen. Costs nothing outside a multiprocessing child."""
    global _workers_checked
    if _workers_checked:
        return
    _workers_checked = True
    workers = _parent_hypercorn_workers()
    if workers > 1:
        log.warning(
            "metrics: hypercorn runs %d workers but %s is not set, so each worker reports "
            "only its own requests and scrapes jump between them; set %s to an empty "
            "directory (or run trioproxy --workers %d); see docs/metrics.md",
            workers,
            MULTIPROC_ENV,
            MULTIPROC_ENV,
            workers,
        )


def _parent_hypercorn_workers() -> int:
    """The ``--workers`` of the hypercorn that started this process; 0 if none did."""
    parent = multiprocessing.parent_process()  # hypercorn spawns its workers with it
    if parent is None or parent.pid is None:
        return 0
    try:
        cmdline = psutil.Process(parent.pid).cmdline()
    except (psutil.Error, OSError):
        return 0
    return hypercorn_workers(cmdline)


def hypercorn_workers(argv: Sequence[str]) -> int:
    """Workers a hypercorn command line asks for: 1 by default, 0 if it is not hypercorn
    (``hypercorn ...``, ``python /venv/bin/hypercorn ...``, ``python -m hypercorn ...``)."""
    for i, arg in enumerate(argv):
        if os.path.basename(arg) in ("hypercorn", "hypercorn.exe"):
            return _workers_option(argv[i + 1 :])
    return 0


def _workers_option(args: Sequence[str]) -> int:
    workers = "1"  # hypercorn's default
    for i, arg in enumerate(args):
        if arg in ("-w", "--workers") and i + 1 < len(args):
            workers = args[i + 1]
        elif arg.startswith("--workers="):
            workers = arg.partition("=")[2]
        elif arg.startswith("-w") and not arg.startswith("--") and len(arg) > 2:
            workers = arg[2:]
    try:
        return int(workers)
    except ValueError:
        return 1


# --------------------------------------------------------------------------- value classes


def value_class_is_multiprocess() -> bool:
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


def ensure_multiprocess_value_class() -> None:
    """prometheus_client picks its value class when it is first imported.  If the
    multiprocess directory was set only afterwards, switch now (before any metric of
    ours exists) instead of silently exporting per-worker numbers."""
    if not value_class_is_multiprocess():
        log.warning(
            "%s is set but prometheus_client was imported before it; "
            "switching to multiprocess values now",
            MULTIPROC_ENV,
        )
        _values.ValueClass = _values.MultiProcessValue()


class _LocalValues(MetricWrapperBase):
    """A metric class whose values stay in this process even when the process runs in
    multiprocess mode (for private collectors, e.g. the benchmarks: they must not
    write into, and clobber, the workers' shared files). Mixed in before the metric's
    class (``LocalCounter``): ``super()`` is then that class's ``_metric_init``."""

    def _metric_init(self) -> None:
        saved = _values.ValueClass
        _values.ValueClass = _values.MutexValue
        try:
            super()._metric_init()
        finally:
            _values.ValueClass = saved


class LocalCounter(_LocalValues, Counter):
    pass


class LocalGauge(_LocalValues, Gauge):
    pass


class LocalHistogram(_LocalValues, Histogram):
    pass


def mark_dead_workers(path: str) -> list[int]:
    """Drop the live-gauge files of workers that no longer exist (hypercorn has no
    child-exit hook), so in-flight and RSS gauges only sum live processes.  Counter and
    histogram files of dead workers stay until a read in a worker thread folds them into
    the archives (:func:`compact_dead_workers`): their counts still happened.

    Every worker scrapes, so two may clean up the same dead worker at once: the files are
    removed here, a file the other worker removed first is no error (prometheus_client's
    ``mark_process_dead`` would raise ``FileNotFoundError`` and fail the scrape)."""
    me = os.getpid()
    dead: set[int] = set()
    for f in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid = _live_gauge_pid(f)
        if pid is None or pid == me:
            continue
        if pid in dead or not psutil.pid_exists(pid):
            dead.add(pid)
            _remove_if_there(f)
    for pid in sorted(dead):
        log.debug("metrics: removed live gauges of dead worker pid %d", pid)
    return sorted(dead)


def remove_live_gauges(path: str, pid: int) -> None:
    """Drop the live-gauge files of worker ``pid``, which has exited: its master knows it
    at once (the scrapes' check by pid would keep them if another process took the pid)."""
    for f in glob.glob(os.path.join(path, f"gauge_live*_{pid}.db")):
        if _live_gauge_pid(f) == pid:
            _remove_if_there(f)


WORKER_RESTARTS = "trioproxy_worker_restarts_total"
OTHER_SIGNAL = "other"  # the signal label of a number without a name


def signal_label(number: int) -> str:
    """The ``signal`` label of a worker killed by signal ``number``: its name (``SIGKILL``),
    one of the few dozen the platform names; a number without one (a real-time signal,
    ``SIGRTMIN+3``) is ``other``, so the label stays bounded."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return OTHER_SIGNAL


class WorkerRestarts:
    """``trioproxy_worker_restarts_total``: the killed workers that the master of
    ``trioproxy --workers N`` replaced (``trioproxy.respawn``), counted by the master.

    A multiprocess counter in the workers' shared directory, in the master's own file
    (``counter_<master pid>.db``): every worker's scrape merges it with the workers' files
    (:func:`merged_families` reads every file there; a counter file leaves only for the
    archive, once its process is gone), so whichever worker answers reports it. Its
    SIGKILL series is there, at 0, from before the first worker starts: ``increase()``
    sees the first kill. No worker declares the family, so a plain hypercorn (which
    replaces no worker) and one process (no master) have no such series."""

    def __init__(self) -> None:
        ensure_multiprocess_value_class()
        self._counter = Counter(
            WORKER_RESTARTS,
            "Workers killed by a signal (SIGKILL: most likely the OOM killer; other names, "
            "or other for a number without one) that the master of trioproxy --workers N "
            "started again while the others served on; only with --workers.",
            ("signal",),
            registry=None,
        )
        self._counter.labels(signal_label(signal.SIGKILL))

    def count(self, signal_number: int) -> None:
        self._counter.labels(signal_label(signal_number)).inc()


def _live_gauge_pid(filename: str) -> int | None:
    """The pid of a live gauge file (``gauge_<live mode>_<pid>.db``: the files
    ``mark_process_dead`` removes), else None."""
    parts = os.path.basename(filename)[: -len(".db")].split("_")
    if len(parts) != 3 or parts[0] != "gauge" or not parts[1].startswith("live"):
        return None
    try:
        return int(parts[2])
    except ValueError:
        return None


def _remove_if_there(filename: str) -> None:
    try:
        os.remove(filename)
    except FileNotFoundError:
        pass  # another worker's scrape removed it first


_MMAP_HEADER = 8  # prometheus_client's mmap files start with 8 bytes: used size, padding


# prometheus_client's file name prefix of each metric type (``counter_<pid>.db``, ...)
SHARED_FILE_KINDS: tuple[str, ...] = ("counter", "gauge", "histogram")

LOOP_MERGED_BYTES = 128 * 1024
"""Workers' files of up to this many bytes in use (about 5 ms of merging) are merged on
the event loop; larger ones in a worker thread (the hand-offs to a thread cost a busy loop
more than a small merge)."""


def _shared_files(path: str, kinds: tuple[str, ...]) -> list[str]:
    names = glob.glob(os.path.join(path, "*.db"))
    if kinds != SHARED_FILE_KINDS:
        names = [f for f in names if os.path.basename(f).partition("_")[0] in kinds]
    return names


def shared_files_size(path: str, kinds: tuple[str, ...] = SHARED_FILE_KINDS) -> int:
    """Bytes in use in the workers' files of ``kinds`` (what merging them costs): each
    file's header says how much of it holds values."""
    total = 0
    for f in _shared_files(path, kinds):
        try:
            with open(f, "rb") as file:
                header = file.read(_MMAP_HEADER)
        except FileNotFoundError:
            continue  # a dead worker's live gauge, removed since the glob
        if len(header) == _MMAP_HEADER:
            total += int.from_bytes(header[:4], sys.byteorder)
    return total


def merged_families(
    path: str, kinds: tuple[str, ...] = SHARED_FILE_KINDS, kept: SharedFilesMerge | None = None
) -> list[Metric]:
    """The merge of every worker's files of ``kinds`` in ``path``, tolerant of the files
    changing under the scrape: a live gauge file removed by another worker's cleanup is
    skipped (by prometheus_client), and so is a file a starting worker has created but not
    yet sized (it holds no value yet, and reading it would fail on its missing header).
    Dead workers' files folded into an archive meanwhile (:mod:`.archive`) are counted
    once: the files the archive read names are skipped, and a read during which an
    archive was replaced is made again (under the compactors' lock after a few tries).

    With ``kept`` (one per ``path`` and ``kinds``), the merge is brought up to date from
    the last one instead of made anew: the same families, in a fraction of the time."""
    for _ in range(_MERGE_TRIES):
        seen = archive.versions(path, kinds)
        try:
            merged = _merged_once(path, kinds, kept, archive.skipped(seen))
        except FileNotFoundError:
            continue  # the library's read of a file folded in since the glob
        if archive.unchanged(path, seen):
            return merged
    with archive.shared_lock(path):  # no compaction now: waits for one to end (ms)
        return _merged_once(path, kinds, kept, archive.skipped(archive.versions(path, kinds)))


_MERGE_TRIES = 4  # compactions run once per dead worker: a second try is already rare


def _merged_once(
    path: str,
    kinds: tuple[str, ...],
    kept: SharedFilesMerge | None,
    skipped: frozenset[tuple[str, int]],
) -> list[Metric]:
    files: list[str] = []
    for f in _shared_files(path, kinds):
        try:
            st = os.stat(f)
        except FileNotFoundError:
            continue  # removed since the glob: a dead worker's live gauge
        if st.st_size >= _MMAP_HEADER and (os.path.basename(f), st.st_ino) not in skipped:
            files.append(f)
    if kept is not None:
        return kept.merge(files)
    return list(MultiProcessCollector.merge(files, accumulate=True))


def compact_dead_workers(path: str) -> int:
    """Fold dead workers' counter and histogram files into the archives (:mod:`.archive`);
    blocking file I/O, for a worker thread."""
    return archive.compact(path)


def compaction_due(path: str) -> bool:
    """Whether a dead worker's counter or histogram files wait to be folded in."""
    return bool(archive.dead_files(path))


_writer: weakref.ref[Any] | None = None
_writer_pid = 0


def claim_shared_files(owner: Any) -> bool:
    """Make ``owner`` (a collector) the one writer of this process's multiprocess files;
    False when another live collector of this process already is.

    prometheus_client's multiprocess values keep their value in memory and write it to
    the process's file on every change, one slot per series: two collectors writing the
    same series would each write their own count over the other's, and the counters
    would go backwards. So one collector per process writes the files; it stops being
    the writer when it is garbage-collected (a later collector then takes over and
    carries on from the counts in the files)."""
    global _writer, _writer_pid
    pid = os.getpid()
    if _writer is not None and _writer_pid == pid and _writer() is not None:
        return False
    _writer, _writer_pid = weakref.ref(owner), pid
    return True
