"""The ledger of Responses API usage still owed to the metrics, without sockets."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from trioproxy import shared_ledger
from trioproxy.ledger import Counted, ResponsesLedger, finished_usage, pending_id
from trioproxy.routes_openai import _owe_when_queued
from trioproxy.shared_ledger import SharedResponsesLedger
from trioproxy.translate import ReplayedResponsesObserver

from .test_metrics_threads import _default_threads_all_taken


def test_owed_usage_is_settled_once_for_the_rest_only() -> None:
    ledger = ResponsesLedger()
    ledger.owe("resp_1", Counted(0, 12))  # a stream cut after 12 tokens
    usage = {"input_tokens": 5, "output_tokens": 40}
    assert ledger.settle("resp_1", usage) == (5, 28)
    assert ledger.settle("resp_1", usage) is None  # once
    assert ledger.settle("resp_2", usage) is None  # nothing owed
    ledger.owe("resp_3", Counted())
    assert ledger.settle("resp_3", None) is None and ledger.owed("resp_3") is not None
    ledger.owe("resp_4", Counted(0, 50))  # counted more than the usage says: never negative
    assert ledger.settle("resp_4", {"input_tokens": 1, "output_tokens": 30}) == (1, 0)


def test_the_ledger_is_bounded_oldest_first() -> None:
    ledger = ResponsesLedger(limit=2)
    for n in range(3):
        ledger.owe(f"resp_{n}", Counted())
    assert len(ledger) == 2 and ledger.owed("resp_0") is None


def test_an_id_too_long_to_be_polled_is_not_owed() -> None:
    """The routes by id refuse an id over 1,024 characters: owing a backend's longer id
    would only hold it (of any length) in memory until it is pushed out."""
    ledger = ResponsesLedger()
    ledger.owe("r" * 1024, Counted())
    ledger.owe("r" * 1025, Counted())
    assert len(ledger) == 1 and ledger.owed("r" * 1025) is None


def test_finished_and_pending_responses() -> None:
    done = {"id": "resp_1", "status": "completed", "usage": {"input_tokens": 1}}
    assert finished_usage(done) == ("resp_1", {"input_tokens": 1})
    assert finished_usage({"id": "resp_1", "status": "queued"}) is None
    assert pending_id({"id": "resp_1", "status": "queued"}) == "resp_1"
    assert pending_id(done) is None and pending_id(None) is None


def test_a_replayed_stream_observer_only_keeps_its_closing_usage() -> None:
    """Translation is pure: the observer of a resumed stream counts nothing and settles
    nothing (settling the workers' ledger is a file's rename: I/O); it keeps the closing
    event's usage for the route to settle once the stream is over."""
    closing = (
        '{"type":"response.completed","sequence_number":9,"response":{"status":"completed",'
        '"usage":{"input_tokens":5,"output_tokens":40}}}'
    )
    created = (
        '{"type":"response.created","sequence_number":0,"response":{"id":"resp_1",'
        '"model":"gpt-x","status":"in_progress"}}'
    )
    delta = '{"type":"response.output_text.delta","sequence_number":3,"delta":"hi"}'
    watcher = ReplayedResponsesObserver()
    assert watcher.final_usage is None
    for data in (created, delta, closing):
        watcher.feed_text(data, 1)
    assert watcher.final_usage == {"input_tokens": 5, "output_tokens": 40}
    assert watcher.prompt_tokens is None and watcher.completion_tokens is None
    assert watcher.content_chunks == 0 and watcher.first_token_ns is None and watcher.progressed
    assert (watcher.response_id, watcher.response_model) == ("resp_1", "gpt-x")
    assert watcher.ended and not watcher.failed


# ----------------------------------------------------------------------------- shared by workers
# Two ledgers on one directory stand for two workers of ``--workers N``.


def _two_workers(tmp_path: Path, **limits: int) -> tuple[SharedResponsesLedger, ...]:
    return tuple(SharedResponsesLedger(str(tmp_path / "ledger"), **limits) for _ in range(2))


def test_what_one_worker_owes_another_settles_once(tmp_path: Path) -> None:
    first, second = _two_workers(tmp_path)
    first.owe("resp_1", Counted(0, 12))
    assert second.owed("resp_1") == Counted(0, 12) and len(second) == 1
    usage = {"input_tokens": 5, "output_tokens": 40}
    assert second.settle("resp_1", None) is None and first.owed("resp_1") is not None
    assert second.settle("resp_1", usage) == (5, 28)
    assert first.settle("resp_1", usage) is None and second.settle("resp_1", usage) is None
    first.owe("resp_2", Counted())
    second.forget("resp_2")  # deleted through the other worker
    assert first.settle("resp_2", usage) is None and len(first) == 0


def test_two_workers_settling_one_id_at_the_same_moment_count_it_once(tmp_path: Path) -> None:
    ledgers = _two_workers(tmp_path)
    usage = {"input_tokens": 3, "output_tokens": 4}
    ids = [f"resp_{n}" for n in range(200)]
    for response_id in ids:
        ledgers[0].owe(response_id, Counted())
    start = threading.Barrier(2)
    settled: list[list[str]] = [[], []]

    def settle_all(n: int) -> None:
        start.wait()
        for response_id in ids:
            if ledgers[n].settle(response_id, usage) is not None:
                settled[n].append(response_id)

    threads = [threading.Thread(target=settle_all, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(settled[0] + settled[1]) == sorted(ids)  # each once, by one of them
    assert len(ledgers[0]) == 0
    assert not list((tmp_path / "ledger").rglob(".*_*"))  # no draft or claim left behind


def test_the_shared_ledger_is_bounded_oldest_first_over_the_workers(tmp_path: Path) -> None:
    first, second = _two_workers(tmp_path, limit=2, buckets=1)
    first.owe("resp_0", Counted())
    second.owe("resp_1", Counted())
    first.owe("resp_2", Counted())
    assert len(first) == 2 and second.owed("resp_0") is None
    second.owe("resp_1", Counted(0, 1))  # owed again: the newest now
    first.owe("resp_3", Counted())
    assert second.owed("resp_2") is None and first.owed("resp_1") == Counted(0, 1)
    many = SharedResponsesLedger(str(tmp_path / "many"), limit=20, buckets=4)
    for n in range(100):
        many.owe(f"resp_{n}", Counted())
    assert len(many) <= 20 and many.owed("resp_99") is not None


def test_ids_are_text_never_paths_and_too_long_ones_are_not_owed(tmp_path: Path) -> None:
    ledger = SharedResponsesLedger(str(tmp_path / "ledger"))
    hostile = ["../../escaped", "/tmp/escaped", "..", "a\x00b", "é" * 300, "\ud800"]
    for response_id in hostile:
        ledger.owe(response_id, Counted(0, 1))
    ledger.owe("r" * 1025, Counted())  # no route takes it: never polled
    ledger.owe("é" * 513, Counted())  # 1,026 bytes
    assert [p.name for p in tmp_path.iterdir()] == ["ledger"]
    assert len(ledger) == len(hostile)
    for response_id in hostile:
        assert ledger.settle(response_id, {"input_tokens": 1, "output_tokens": 1}) == (1, 0)


def test_an_entry_of_another_id_with_the_same_name_is_not_taken(tmp_path: Path) -> None:
    """Entries are named by a hash of the id and hold the id: a collision (simulated here,
    never seen with SHA-256) counts nothing and leaves the other id's entry owed."""
    ledger = SharedResponsesLedger(str(tmp_path / "ledger"))
    ledger.owe("resp_b", Counted(0, 2))
    where_a, where_b = ledger._where("resp_a"), ledger._where("resp_b")
    assert where_a is not None and where_b is not None
    os.makedirs(where_a[0], exist_ok=True)
    os.rename(where_b[1], where_a[1])  # resp_b's entry under resp_a's name
    assert ledger.owed("resp_a") is None
    assert ledger.settle("resp_a", {"input_tokens": 1, "output_tokens": 9}) is None
    with open(where_a[1], "rb") as f:
        assert f.read().endswith(b"\nresp_b")  # put back


def test_an_unwritable_ledger_never_fails_a_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens are missed, never a request failed: a directory that cannot be made (a file
    in its way; tests may run as root, who may write anywhere), a full disk, a read-only
    one."""
    (tmp_path / "file").write_bytes(b"")
    usage = {"input_tokens": 1, "output_tokens": 1}
    blocked = SharedResponsesLedger(str(tmp_path / "file" / "ledger"))
    blocked.owe("resp_1", Counted())
    blocked.owe("resp_2", Counted())
    assert blocked.owed("resp_1") is None and blocked.settle("resp_1", usage) is None
    blocked.forget("resp_1")
    assert len(caplog.records) == 1 and "may be missed" in caplog.text  # once

    ledger = SharedResponsesLedger(str(tmp_path / "ledger"))
    ledger.owe("resp_1", Counted())
    with monkeypatch.context() as patched:
        patched.setattr(os, "write", lambda fd, data: 0)  # ENOSPC after 0 bytes
        ledger.owe("resp_2", Counted())
    with monkeypatch.context() as patched:
        patched.setattr(os, "write", _fails(errno.ENOSPC))
        ledger.owe("resp_3", Counted())
    assert len(ledger) == 1 and not list((tmp_path / "ledger").rglob(".draft*"))
    with monkeypatch.context() as patched:
        patched.setattr(os, "rename", _fails(errno.EROFS))
        assert ledger.settle("resp_1", usage) is None
    assert ledger.settle("resp_1", usage) == (1, 1)


def _fails(code: int) -> Callable[..., Any]:
    def fail(*args: object) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


def test_what_a_cut_stream_owes_is_written_by_the_writer_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's end cannot wait for a file: it notes what is owed, at once settled
    through this worker, and written in a thread for the other workers; also what is left
    when the worker stops (not on the event loop, which other apps' shutdowns share)."""
    first, second = _two_workers(tmp_path)
    writers: dict[str, bool] = {}  # id: written on the event loop's thread
    owe = SharedResponsesLedger.owe

    def recorded(self: SharedResponsesLedger, response_id: str, counted: Counted) -> None:
        writers[response_id] = threading.current_thread() is _loop_thread
        owe(self, response_id, counted)

    _loop_thread = threading.current_thread()
    monkeypatch.setattr(SharedResponsesLedger, "owe", recorded)
    usage = {"input_tokens": 2, "output_tokens": 10}

    async def main() -> None:
        first.owe_soon("resp_1", Counted(0, 4))
        first.owe_soon("resp_2", Counted(0, 6))
        assert first.settle("resp_1", usage) == (2, 6)  # before it is written
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run_writer)
            while second.owed("resp_2") is None:  # noqa: ASYNC110 (another worker: no event)
                await trio.sleep(0.01)
            first.owe_soon("resp_3", Counted())
            nursery.cancel_scope.cancel()  # a stopping worker writes what is left

    trio.run(main)
    assert second.settle("resp_2", usage) == (2, 4)
    assert second.owed("resp_3") == Counted() and second.owed("resp_1") is None
    assert writers == {"resp_2": False, "resp_3": False}


def test_what_a_stopping_worker_cannot_write_in_time_is_missed_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The last writes are bounded (here: no time at all): the rest is missed, never
    written later, and one WARNING says how many; the cancellation still propagates."""
    monkeypatch.setattr(shared_ledger, "SHUTDOWN_WRITE_S", 0)
    first, second = _two_workers(tmp_path)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run_writer)
            first.owe_soon("resp_1", Counted())
            first.owe_soon("resp_2", Counted())
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(second) == 0
    assert len(caplog.records) == 1 and "2 Responses API ledger entries" in caplog.text


def test_drafts_and_claims_of_processes_gone_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed between writing a draft and renaming it (or claiming an entry and
    removing it) leaves the file: the next write to its bucket removes it once its process
    is gone, never a live process's file in use, a few per write."""
    ledger = SharedResponsesLedger(str(tmp_path / "ledger"))
    where = ledger._where("resp_1")
    assert where is not None
    bucket = Path(where[0])
    bucket.mkdir(parents=True)
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    dead = killed.pid
    gone = [
        f".draft_{dead}_0123abcd_0",
        f".claim_{dead}_0123abcd_1",
        f".draft_{dead}_7",  # named by an earlier version
        f".draft_{os.getpid()}_ffffffff_3",  # a former process of this pid
    ]
    in_use = Path(ledger._own_name(str(bucket), "draft")).name  # this process's
    live = [in_use, f".claim_{os.getppid()}_0123abcd_0"]  # and another live one's
    for name in gone + live:
        (bucket / name).write_bytes(b"0 1\nresp_x")
    ledger.owe("resp_1", Counted())
    assert sorted(p.name for p in bucket.iterdir()) == sorted([*live, Path(where[1]).name])
    # a pid reused by a live process: past an hour, its file is no write's any more
    monkeypatch.setattr(shared_ledger, "_STALE_NS", -1)
    ledger.owe("resp_1", Counted())
    assert [p.name for p in bucket.iterdir()] == [Path(where[1]).name]
    monkeypatch.undo()

    many = [f".draft_{dead}_0123abcd_{n}" for n in range(20)]
    for name in many:
        (bucket / name).write_bytes(b"")
    ledger.owe("resp_1", Counted())
    assert len(list(bucket.iterdir())) == 1 + 20 - shared_ledger.SWEEP_PER_WRITE  # bounded
    for _ in range(3):
        ledger.owe("resp_1", Counted())
    assert [p.name for p in bucket.iterdir()] == [Path(where[1]).name]


def test_a_leftover_named_with_no_pid_fails_no_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dotted file whose pid part is digits but no pid (too many for the kernel's pid
    type, or digits outside ASCII) was an OverflowError or ValueError out of every write
    to its bucket; it is judged by its age, as a name without a pid is."""
    ledger = SharedResponsesLedger(str(tmp_path / "ledger"))
    where = ledger._where("resp_1")
    assert where is not None
    bucket = Path(where[0])
    bucket.mkdir(parents=True)
    odd = [".draft_99999999999999999999_0123abcd_0", ".claim_\u00b2_0123abcd_0"]
    for name in odd:
        (bucket / name).write_bytes(b"")
    ledger.owe("resp_1", Counted(input_tokens=3))
    assert ledger.owed("resp_1") == Counted(input_tokens=3)
    assert sorted(p.name for p in bucket.iterdir()) == sorted([*odd, Path(where[1]).name])
    monkeypatch.setattr(shared_ledger, "_STALE_NS", -1)  # an hour later
    ledger.owe("resp_1", Counted())
    assert [p.name for p in bucket.iterdir()] == [Path(where[1]).name]


def test_the_shared_ledger_is_written_without_trios_default_threads(tmp_path: Path) -> None:
    """A burst of slow name resolutions holds trio's 40 default threads (each new backend
    connection resolves its host name in one): a queued background answer must not wait
    for one to write what it owes, nor the writer task for a cut stream's (the metrics'
    own threads, as their reads: tests/test_metrics_threads.py)."""
    first, second = _two_workers(tmp_path)
    queued = b'{"id": "resp_1", "object": "response", "status": "queued"}'

    async def main() -> None:
        async with _default_threads_all_taken(), trio.open_nursery() as nursery:
            await nursery.start(first.run_writer)
            first.owe_soon("resp_2", Counted(0, 3))
            # a bound, not a timing assert: before, both waited for as long as the
            # resolutions held the threads (here: for ever)
            with trio.fail_after(30):
                await _owe_when_queued(first, queued)
                while second.owed("resp_2") is None:  # noqa: ASYNC110 (another worker)
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert second.owed("resp_1") == Counted() and second.owed("resp_2") == Counted(0, 3)


def test_a_leftover_of_a_former_process_of_this_pid_blocks_no_write(tmp_path: Path) -> None:
    """Pids are reused (a container's restarted workers get the same small ones): a draft
    a killed process of this pid left under the name this one would take next (the old
    naming, pid and a count from 0) made its write fail, and the entry was not owed."""
    ledger = SharedResponsesLedger(str(tmp_path / "ledger"))
    where = ledger._where("resp_1")
    assert where is not None
    os.makedirs(where[0])
    for n in range(4):
        Path(where[0], f".draft_{os.getpid()}_{n}").write_bytes(b"")
    ledger.owe("resp_1", Counted(0, 1))
    assert ledger.owed("resp_1") == Counted(0, 1)


# a held thread waits at most this long before it goes on by itself: on code that waits for
# it, what the test checks happens only then, and the test fails instead of hanging
HOLD_SECONDS = 5.0


def test_a_write_stuck_on_a_hung_disk_holds_no_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopping worker's writer abandons a write stuck on the disk at the bound (before,
    it awaited that thread for as long as the disk hung, and the worker with it): what
    can still be written is written, and one WARNING counts the rest."""
    monkeypatch.setattr(shared_ledger, "SHUTDOWN_WRITE_S", 0.2)
    first, second = _two_workers(tmp_path)
    stuck, release = threading.Event(), threading.Event()
    write = SharedResponsesLedger._write

    def hung(self: SharedResponsesLedger, bucket: str, path: str, data: bytes) -> None:
        if data.endswith(b"\nresp_1"):
            stuck.set()
            release.wait(HOLD_SECONDS)
        write(self, bucket, path, data)

    monkeypatch.setattr(SharedResponsesLedger, "_write", hung)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run_writer)
            first.owe_soon("resp_1", Counted())
            await trio.to_thread.run_sync(stuck.wait, HOLD_SECONDS)
            first.owe_soon("resp_2", Counted(0, 2))  # noted while the disk hangs
            nursery.cancel_scope.cancel()

    timer = threading.Timer(HOLD_SECONDS, release.set)
    timer.start()
    try:
        trio.run(main)
        held = release.is_set()  # the stop waited for the disk
        assert second.owed("resp_1") is None and second.owed("resp_2") == Counted(0, 2)
    finally:
        timer.cancel()
        release.set()
    assert not held
    assert "1 Responses API ledger entries were not written" in caplog.text


def test_a_settle_while_its_entry_is_being_written_takes_it_from_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer task hands a batch of cut streams' entries to a thread: one settled
    through this worker meanwhile is taken from the batch (counted now, never written);
    before, it was in neither the pending entries nor a file yet, and counted nothing."""
    first, second = _two_workers(tmp_path)
    writing, release = threading.Event(), threading.Event()
    first_written: list[str] = []
    owe = SharedResponsesLedger.owe

    def held(self: SharedResponsesLedger, response_id: str, counted: Counted) -> None:
        if not first_written:
            first_written.append(response_id)
            writing.set()
            release.wait(HOLD_SECONDS)
        owe(self, response_id, counted)

    monkeypatch.setattr(SharedResponsesLedger, "owe", held)
    usage = {"input_tokens": 2, "output_tokens": 10}

    async def main() -> tuple[int, int] | None:
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run_writer)
            first.owe_soon("resp_1", Counted(0, 4))
            first.owe_soon("resp_2", Counted(0, 6))
            await trio.to_thread.run_sync(writing.wait, HOLD_SECONDS)
            other = "resp_2" if first_written == ["resp_1"] else "resp_1"
            owed = first.settle(other, usage)  # on this thread, as a test may
            release.set()
            while second.owed(first_written[0]) is None:  # noqa: ASYNC110 (another worker)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        return owed

    try:
        owed = trio.run(main)
    finally:
        release.set()
    other = "resp_2" if first_written == ["resp_1"] else "resp_1"
    assert owed == (2, 10 - (4 if other == "resp_1" else 6))
    assert second.owed(other) is None and len(second) == 1  # never written


def test_a_stream_resumed_through_another_worker_before_its_entry_is_written_counts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cut stream's entry is written in a thread just after its end: a resume through
    another worker can settle before it is there (its worker's metrics threads busy,
    say). The resumed stream looks once more after the write's window and counts it then;
    before, it counted nothing (a later poll would have)."""
    monkeypatch.setattr(shared_ledger, "PENDING_WRITE_S", 0)
    first, second = _two_workers(tmp_path)
    looked, written = threading.Event(), threading.Event()
    owe, settle = SharedResponsesLedger.owe, SharedResponsesLedger.settle
    looks: list[tuple[int, int] | None] = []

    def late(self: SharedResponsesLedger, response_id: str, counted: Counted) -> None:
        looked.wait(HOLD_SECONDS)  # the first worker's write, after the other's first look
        owe(self, response_id, counted)
        written.set()

    def watched(self: SharedResponsesLedger, response_id: str, usage: Any) -> Any:
        owed = settle(self, response_id, usage)
        looks.append(owed)
        if not looked.is_set():
            looked.set()
            written.wait(HOLD_SECONDS)
        return owed

    monkeypatch.setattr(SharedResponsesLedger, "owe", late)
    monkeypatch.setattr(SharedResponsesLedger, "settle", watched)
    usage = {"input_tokens": 2, "output_tokens": 40}

    async def main() -> tuple[int, int] | None:
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run_writer)
            first.owe_soon("resp_1", Counted(0, 6))  # cut on the first worker
            owed = await second.settle_off_loop("resp_1", usage, recheck=True)  # resumed
            nursery.cancel_scope.cancel()
        return owed

    try:
        assert trio.run(main) == (2, 34)
    finally:
        looked.set()
        written.set()
    assert looks == [None, (2, 34)] and len(second) == 0
    # a poll (no recheck) or a resume that finds nothing owed at all looks once, or twice
    looks.clear()
    assert trio.run(partial(second.settle_off_loop, "resp_1", usage)) is None
    assert trio.run(partial(second.settle_off_loop, "resp_1", usage, recheck=True)) is None
    assert looks == [None, None, None]


def test_a_queued_answer_whose_entry_is_stuck_on_a_hung_disk_lets_its_client_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queued answer waits for its entry; a client that leaves (or a stopping worker)
    no longer waits for a write stuck on the disk: the thread is abandoned."""
    ledger = SharedResponsesLedger(str(tmp_path / "ledger"))
    stuck, release = threading.Event(), threading.Event()

    def hung(self: SharedResponsesLedger, response_id: str, counted: Counted) -> None:
        stuck.set()
        release.wait(HOLD_SECONDS)

    monkeypatch.setattr(SharedResponsesLedger, "owe", hung)
    queued = b'{"id": "resp_1", "object": "response", "status": "queued"}'

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_owe_when_queued, ledger, queued)
            await trio.to_thread.run_sync(stuck.wait, HOLD_SECONDS)
            nursery.cancel_scope.cancel()  # the client left

    timer = threading.Timer(HOLD_SECONDS, release.set)
    timer.start()
    try:
        trio.run(main)
        held = release.is_set()
    finally:
        timer.cancel()
        release.set()
    assert not held
