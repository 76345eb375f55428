"""The multiprocess metrics files on a full filesystem: the proxy keeps serving.

``--workers N`` keeps its metrics in memory-mapped files in the run directory
(``$TMPDIR``). prometheus_client grows them sparse: on a full filesystem the first write
into the new part was a SIGBUS that killed the worker (and trioproxy with it), and where
a file may not grow (RLIMIT_FSIZE) every request after logged a traceback.
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import mmap_dict

from tests.conftest import ServerProcess, _spawn, base_env, wait_healthy
from trioproxy.metrics import mmap_files

FLAGS = ("--env-file", "", "--workers", "2")
KEY = '["c", "c_total", {"n": "%d"}, "help"]'


def _no_room(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_file_that_finds_no_room_keeps_its_series_counting_and_new_ones_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "counter_1.db")
    entries = mmap_files.SpaceReservedDict(path)
    assert os.stat(path).st_blocks * 512 >= mmap.PAGESIZE  # its first page reserved
    entries.write_value(KEY % 0, 1.0, 0.0)
    monkeypatch.setattr(mmap_files, "_warned", threading.Event())
    monkeypatch.setattr(os, "posix_fallocate", _no_room)
    added = 0
    while not isinstance(entries, mmap_files.PartlyFiledDict):
        added += 1
        entries.write_value(KEY % added, float(added), 0.0)  # until the file is full
    assert added * len(KEY) > mmap.PAGESIZE // 2  # the page it had
    entries.write_value(KEY % 0, 7.0, 0.0)  # already in the file: still published
    entries.write_value(KEY % 100000, 5.0, 0.0)  # new: in memory
    assert entries.read_value(KEY % 100000) == (5.0, 0.0)
    assert entries.read_value(KEY % added) == (float(added), 0.0)
    published = {
        key: value for key, value, *_ in mmap_dict.MmapedDict.read_all_values_from_file(path)
    }
    assert published[KEY % 0] == 7.0
    assert KEY % 100000 not in published and KEY % added not in published
    assert os.path.getsize(path) == mmap_dict._INITIAL_MMAP_SIZE  # as it was
    entries.close()


def test_a_file_that_cannot_be_created_leaves_none_and_keeps_its_series_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mmap_files, "_warned", threading.Event())
    monkeypatch.setattr(os, "posix_fallocate", _no_room)
    path = tmp_path / "counter_2.db"
    entries = mmap_files.SpaceReservedDict(str(path))
    assert not path.exists()  # an empty file would fail every scrape that reads it
    for n in range(2000):  # past the first map's size
        entries.write_value(KEY % n, float(n), 0.0)
    assert entries.read_value(KEY % 1999) == (1999.0, 0.0)
    assert entries.read_value(KEY % 3000) == (0.0, 0.0)
    entries.close()


def test_multiprocess_values_use_the_reserving_files() -> None:
    from prometheus_client import values

    import trioproxy.metrics.multiprocess  # noqa: F401 (installs it)

    assert values.MmapedDict is mmap_files.SpaceReservedDict


def _start_workers(tmpdir: Path, upstream: str, file_size: int | None = None) -> ServerProcess:
    """``trioproxy --workers 2`` with its run directory in ``tmpdir`` and, optionally,
    RLIMIT_FSIZE (as ``ulimit -f``)."""

    def limit() -> None:
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    server = _spawn(
        ["-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", *FLAGS],
        base_env(OPENAI_API_BASE_URL=upstream, TMPDIR=str(tmpdir)),
        preexec_fn=limit,
    )
    wait_healthy(server.url)
    return server


HI = [{"role": "user", "content": "hi"}]
REQUESTS = [
    ("/v1/chat/completions", {"model": "demo-chat", "max_tokens": 2, "messages": HI}),
    ("/v1/chat/completions", {"model": "demo-chat", "stream": True, "messages": HI}),
    ("/api/chat", {"model": "demo-chat", "stream": False, "messages": HI}),
    ("/api/generate", {"model": "demo-chat", "prompt": "hi", "options": {"num_predict": 2}}),
    ("/v1/embeddings", {"model": "demo-embed", "input": "hi"}),
    ("/api/embed", {"model": "demo-embed", "input": "hi"}),
    ("/v1/completions", {"model": "demo-chat", "prompt": "hi", "max_tokens": 2}),
]


def _serves_with_metrics_degraded(server: ServerProcess) -> None:
    """Every kind of request answered, again and again (each kind adds series), the
    scrapes answered, one WARNING and no traceback; the workers all alive."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(4):
            for path, body in REQUESTS:
                assert client.post(path, json=body).status_code == 200, path
            assert client.get("/metrics").status_code == 200
            assert client.get("/v1/metrics").status_code == 200
        scrape = client.get("/metrics").text
    assert "http_requests_total{" in scrape  # the series filed before it filled
    assert server.process.poll() is None, server.log()
    log = server.log()
    assert "metrics: no room for the metrics file" in log, log
    assert "Traceback" not in log and "Error in ASGI" not in log, log


def test_metrics_files_that_may_not_grow_degrade_the_metrics_only(
    demo_backend: ServerProcess, tmp_path: Path
) -> None:
    """RLIMIT_FSIZE of 64 KiB (a file's first size): the histograms' file cannot grow."""
    server = _start_workers(tmp_path, demo_backend.url, file_size=mmap_dict._INITIAL_MMAP_SIZE)
    try:
        _serves_with_metrics_degraded(server)
    finally:
        server.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only; skipped elsewhere)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_tmpdir_degrades_the_metrics_only(
    demo_backend: ServerProcess, small_tmpfs: Path
) -> None:
    """The run directory's filesystem fills once the workers run: the worker that grew
    its file was killed by SIGBUS, and trioproxy exited 1."""
    server = _start_workers(small_tmpfs, demo_backend.url)
    try:
        free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
        with open(small_tmpfs / "filler", "wb") as filler:
            try:
                filler.write(b"\0" * free)
            except OSError:
                pass  # full
        _serves_with_metrics_degraded(server)
    finally:
        server.stop()
