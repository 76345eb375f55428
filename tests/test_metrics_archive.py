"""Dead workers' counter and histogram files folded into one archive per type
(``trioproxy.metrics.archive``): the directory stays bounded across worker respawns, and
no total moves, in any read, while it happens.

The files are prometheus_client's own (``MmapedDict``, as the workers write them); the
concurrency test runs real processes: workers that count and die, and scrapers that
compact and read at the same time."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from trioproxy.metrics import archive
from trioproxy.metrics.multiprocess import merged_families
from trioproxy.metrics.shared_merge import SharedFilesMerge

ROOT = Path(__file__).resolve().parent.parent
LIVE = 101  # a live worker (and 103: a master, a counter only)
MASTER = 103
DEAD_FROM = 4_000_100  # dead workers' pids from here on


def _key(family: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    return mmap_key(family, sample, tuple(labels), tuple(labels.values()), help_text)


def _write_worker(directory: str, pid: int, values: list[tuple[str, float]]) -> None:
    """A worker's counter and histogram files, as prometheus_client writes them: for each
    (model, value) one request counted and one duration observed."""
    counters = MmapedDict(os.path.join(directory, f"counter_{pid}.db"))
    histograms = MmapedDict(os.path.join(directory, f"histogram_{pid}.db"))
    try:
        for model, value in values:
            labels = {"model": model}
            key = _key("requests", "requests_total", labels, "Requests.")
            counters.write_value(key, counters.read_value(key)[0] + 1, 0.0)
            key = _key("tokens", "tokens_total", labels, "Tokens.")
            counters.write_value(key, counters.read_value(key)[0] + value * 7, 0.0)
            key = _key("duration", "duration_sum", labels, "Duration.")
            histograms.write_value(key, histograms.read_value(key)[0] + value, 0.0)
            # the library's files hold each bucket's own count (not cumulative)
            observed = "0.1" if value <= 0.1 else "1.0" if value <= 1 else "+Inf"
            for le in ("0.1", "1.0", "+Inf"):
                key = _key("duration", "duration_bucket", {**labels, "le": le}, "Duration.")
                hit = 1.0 if le == observed else 0.0
                histograms.write_value(key, histograms.read_value(key)[0] + hit, 0.0)
    finally:
        counters.close()
        histograms.close()


def _exposition(families: list[Metric]) -> list[str]:
    """The text exposition of ``families``, its lines sorted (series come in the order
    the files hold them: the fold moves them, which no reader of the format depends on)."""

    class Fixed:
        def collect(self) -> list[Metric]:
            return families

    registry = CollectorRegistry()
    registry.register(Fixed())  # type: ignore[arg-type]
    return sorted(generate_latest(registry).decode().splitlines())


@pytest.fixture(autouse=True)
def _dead_workers() -> Iterator[None]:
    """Pids from DEAD_FROM on belong to workers that have exited."""
    with mock.patch.object(archive, "_pid_exists", lambda pid: pid < DEAD_FROM):
        yield


def _ours(directory: str, kept: SharedFilesMerge) -> list[str]:
    return _exposition(merged_families(directory, kept=kept))


def _librarys(directory: str) -> dict[tuple[str, str], float]:
    files = [str(p) for p in Path(directory).glob("*.db")]
    return {
        (s.name, json.dumps(s.labels, sort_keys=True)): s.value
        for m in MultiProcessCollector.merge(files, accumulate=True)
        for s in m.samples
    }


_VALUES = st.lists(
    st.tuples(
        st.sampled_from(("a", "b", "c")),
        # durations: fractions whose sums round, and a few exact ones
        st.one_of(st.floats(0, 1e6, allow_nan=False), st.integers(0, 3).map(float)),
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(
    live=_VALUES,
    dead=st.lists(st.lists(_VALUES, min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_folding_dead_workers_keeps_every_familys_exposition(
    live: list[tuple[str, float]], dead: list[list[list[tuple[str, float]]]]
) -> None:
    """K dead workers' files, folded in in rounds (each round's into the archive the
    last one left): the exposition is the same before and after each fold, to the last
    digit of every float, and the directory holds the live processes' files and at most
    one archive per type. prometheus_client's own merge reads the archive too."""
    with tempfile.TemporaryDirectory() as directory:
        kept = SharedFilesMerge()
        _write_worker(directory, LIVE, live)
        master = MmapedDict(os.path.join(directory, f"counter_{MASTER}.db"))
        master.write_value(_key("restarts", "restarts_total", {}, "Restarts."), 2.0, 0.0)
        master.close()
        pid = DEAD_FROM
        for workers in dead:
            for values in workers:
                _write_worker(directory, pid, values)
                pid += 1
            before, library_before = _ours(directory, kept), _librarys(directory)
            assert archive.compact(directory) == 2 * len(workers)
            assert _ours(directory, kept) == before
            assert _ours(directory, SharedFilesMerge()) == before  # and merged anew
            library_after = _librarys(directory)
            assert library_after.keys() == library_before.keys()
            for sample, value in library_after.items():  # its += order moved: ~ulps
                assert math.isclose(value, library_before[sample], rel_tol=1e-12, abs_tol=0)
            assert not any("_created" in line for line in before)
            names = sorted(p.name for p in Path(directory).glob("*.db"))
            live_files = [f"counter_{LIVE}.db", f"histogram_{LIVE}.db", f"counter_{MASTER}.db"]
            assert names == sorted([*live_files, "counter_archive.db", "histogram_archive.db"])


def test_the_merge_adds_a_series_exactly() -> None:
    """Across files a series' values are added exactly: the library's left-to-right +=
    gives 1e16 for 1e16 + 1 + 1 (each 1 rounded away), an archive holding 1 + 1 would
    give 1e16 + 2: a fold must not change what the merge says, so it says 1e16 + 2."""
    with tempfile.TemporaryDirectory() as directory:
        key = _key("c", "c_total", {}, "C.")
        for pid, value in ((LIVE, 1e16), (DEAD_FROM, 1.0), (DEAD_FROM + 1, 1.0)):
            d = MmapedDict(os.path.join(directory, f"counter_{pid}.db"))
            d.write_value(key, value, 0.0)
            d.close()
        files = sorted(str(p) for p in Path(directory).glob("*.db"))
        assert [s.value for s in SharedFilesMerge().merge(files)[0].samples] == [1e16 + 2]
        archive.compact(directory)
        assert [s.value for s in merged_families(directory)[0].samples] == [1e16 + 2]
        assert [
            s.value for s in merged_families(directory, kept=SharedFilesMerge())[0].samples
        ] == [1e16 + 2]


def test_a_compactor_killed_before_it_removed_the_files_counts_them_once() -> None:
    """The archive is written, its files not yet removed (the compactor was killed in
    between): a read skips the files the archive names, the next compaction removes
    them, and a new worker that took a dead one's pid is not taken for it."""
    with tempfile.TemporaryDirectory() as directory:
        _write_worker(directory, LIVE, [("a", 0.5)])
        _write_worker(directory, DEAD_FROM, [("a", 0.25), ("b", 3.0)])
        before = _ours(directory, SharedFilesMerge())
        with mock.patch.object(archive, "_remove_absorbed", lambda d, absorbed: 0):
            archive.compact(directory)
        assert (Path(directory) / f"counter_{DEAD_FROM}.db").exists()
        assert _ours(directory, SharedFilesMerge()) == before
        assert archive.compact(directory) == 2  # the leftovers
        assert _ours(directory, SharedFilesMerge()) == before
        assert not (Path(directory) / f"counter_{DEAD_FROM}.db").exists()


def test_a_compaction_in_progress_elsewhere_is_left_to_it(tmp_path: Path) -> None:
    import fcntl

    _write_worker(str(tmp_path), DEAD_FROM, [("a", 1.0)])
    fd = os.open(tmp_path / archive.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # another open file description: flock locks conflict as between processes
        assert archive.compact(str(tmp_path)) == 0
    finally:
        os.close(fd)
    assert archive.compact(str(tmp_path)) == 2


def test_a_read_that_raced_a_compaction_reads_again(tmp_path: Path) -> None:
    """A compaction that ends while a read is under way (the read saw the old archive,
    then the dead worker's file was gone): the read is made again, never short."""
    directory = str(tmp_path)
    _write_worker(directory, LIVE, [("a", 0.5)])
    _write_worker(directory, DEAD_FROM, [("a", 0.25)])
    expected = _ours(directory, SharedFilesMerge())
    kept = SharedFilesMerge()
    real = kept.merge
    calls = []

    def merge_racing(files: list[str]) -> list[Metric]:
        calls.append(files)
        if len(calls) == 1:
            archive.compact(directory)  # between this read's glob and its reads
        return real(files)

    kept.merge = merge_racing  # type: ignore[method-assign]
    assert _exposition(merged_families(directory, kept=kept)) == expected
    assert len(calls) == 2


CHURN = textwrap.dedent(
    """
    import os, random, shutil, sys, time
    from tests.test_metrics_archive import _write_worker

    directory, reference, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(7)

    def values(n):
        return [(rng.choice("abc"), rng.choice((rng.random() * 3, 1.0))) for _ in range(n)]

    def keep(pid):  # the files as their worker left them, for the expected totals
        for kind in ("counter", "histogram"):
            name = f"{kind}_{pid}.db"
            shutil.copyfile(os.path.join(directory, name), os.path.join(reference, name))

    for _ in range(rounds):
        batch = values(rng.randint(1, 6))
        child = os.fork()
        if child == 0:  # a worker: counts, then dies
            _write_worker(directory, os.getpid(), batch)
            keep(os.getpid())
            os._exit(0)
        os.waitpid(child, 0)
        _write_worker(directory, os.getpid(), values(2))  # a live worker counts on
        time.sleep(0.005)
    keep(os.getpid())
    open(os.path.join(directory, "stop"), "w").close()
    """
)

SCRAPER = textwrap.dedent(
    """
    import json, os, sys
    from trioproxy.metrics import archive
    from trioproxy.metrics.multiprocess import merged_families
    from trioproxy.metrics.shared_merge import SharedFilesMerge

    directory = sys.argv[1]
    kept, last, problems, reads, folded = SharedFilesMerge(), {}, [], 0, 0
    while True:
        stop = os.path.exists(os.path.join(directory, "stop"))
        folded += archive.compact(directory)
        now = {
            (s.name, json.dumps(s.labels, sort_keys=True)): s.value
            for m in merged_families(directory, kept=kept)
            for s in m.samples
        }
        for key, value in last.items():
            if key not in now or now[key] < value:
                problems.append([key, value, now.get(key)])
        last, reads = now, reads + 1
        if stop:
            break
    print(json.dumps({"reads": reads, "folded": folded, "problems": problems[:5]}))
    """
)


def _run(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_scrapes_while_workers_die_and_are_folded_in_never_see_a_count_drop(
    tmp_path: Path,
) -> None:
    """Real processes: a live worker counts on while 40 short-lived workers count and
    die, and three scrapers each fold the dead ones in (racing one another for the
    lock) and read, over and over. No read of any scraper sees a sample go down or go
    missing (a dead worker's counts twice, then once, or not at all), and in the end the
    totals are those of every worker's files as they left them, exactly."""
    directory, reference = tmp_path / "prom", tmp_path / "reference"
    directory.mkdir()
    reference.mkdir()
    scrapers = [_run(SCRAPER, str(directory)) for _ in range(3)]
    churn = _run(CHURN, str(directory), str(reference), "40")
    try:
        _, err = churn.communicate(timeout=120)
        assert churn.returncode == 0, err
        results = []
        for scraper in scrapers:
            out, err = scraper.communicate(timeout=120)
            assert scraper.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for process in (churn, *scrapers):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert all(r["problems"] == [] for r in results), results
    assert sum(r["folded"] for r in results) > 0
    with mock.patch.object(archive, "_pid_exists", lambda pid: False):  # all gone
        archive.compact(str(directory))
    final = _exposition(merged_families(str(directory), kept=SharedFilesMerge()))
    assert final == _exposition(merged_families(str(reference), kept=SharedFilesMerge()))
    assert sorted(p.name for p in directory.glob("*.db")) == [
        "counter_archive.db",
        "histogram_archive.db",
    ]


def test_a_fold_that_cannot_be_written_leaves_every_file_as_it_was(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No room for the archive (a full disk): the dead worker's files stay and are
    counted as before, no temporary file is left, one WARNING says so, and the next
    fold, with room again, does it."""
    directory = str(tmp_path)
    _write_worker(directory, LIVE, [("a", 0.5)])
    _write_worker(directory, DEAD_FROM, [("a", 0.25)])
    before = sorted(p.name for p in tmp_path.iterdir())  # and the lock file, below
    expected = _ours(directory, SharedFilesMerge())

    def no_room(*args: object) -> None:
        raise OSError(28, "No space left on device")

    archive._warned.clear()
    with mock.patch.object(archive.os, "replace", no_room):
        assert archive.compact(directory) == 0
        assert archive.compact(directory) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, archive.LOCK_NAME])
    assert _ours(directory, SharedFilesMerge()) == expected
    warnings = [r for r in caplog.records if "not folded" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
    assert archive.compact(directory) == 2
    assert _ours(directory, SharedFilesMerge()) == expected


def test_a_kept_merge_reads_a_new_archive_that_took_the_old_ones_inode(tmp_path: Path) -> None:
    """The next archive may get the inode the last one freed (ext4 reuses them): the kept
    merge, which knows a worker's file by its inode, must not take the new archive for
    the old one grown (its entries are laid out anew), here the new one written over the
    old in place, the same inode."""
    directory = str(tmp_path)
    _write_worker(directory, LIVE, [("a", 0.5)])
    _write_worker(directory, DEAD_FROM, [("a", 0.25)])
    archive.compact(directory)
    kept = SharedFilesMerge()
    _ours(directory, kept)
    # a's sum now two partials: every entry after it moves
    _write_worker(directory, DEAD_FROM + 1, [("a", 1e17), ("b", 2.0)])
    expected = _ours(directory, SharedFilesMerge())
    for kind in ("counter", "histogram"):  # the next fold, in place
        target = archive.archive_path(directory, kind)
        entries, _, generation = archive._current(target)
        dead = Path(directory, f"{kind}_{DEAD_FROM + 1}.db").read_bytes()
        folded = archive._folded([*entries, *archive._read_entries(dead)])
        with open(target, "r+b") as file:
            file.write(archive._encoded(folded, frozenset(), generation + 1))
        os.unlink(Path(directory, f"{kind}_{DEAD_FROM + 1}.db"))
    assert _ours(directory, kept) == expected
