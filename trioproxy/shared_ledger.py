"""The Responses API ledger (:mod:`.ledger`) shared by the workers of ``--workers N``.

A response created through one worker is often polled, resumed or cancelled through
another: what it still owes the metrics must be known to every worker, and counted once.
The ledger is a directory beside the metrics files (the workers' run directory), one small
file per response owed:

* named after the SHA-256 of its id (the backend's text, never a path), in one of 100
  bucket directories; the file holds the tokens counted and the id itself, so two ids of
  one hash would be told apart;
* written under a draft name, then renamed into place: it is there whole or not at all;
* settled by renaming it to a name of the settling process's own: of two workers settling
  one id at the same moment, one rename succeeds, and only that worker counts it;
* bounded: a bucket keeps its newest 100 entries (10,000 in all, the oldest of a full
  bucket go first), each a file of at most about 1 KiB (ids over 1,024 bytes are not owed);
* swept: a draft or a claim is named after its process (pid and a random tag of the
  process); one that a killed worker left between writing and renaming, or claiming and
  removing, is removed when its bucket is next written to, once its process is gone (or is
  another process of the same pid) or it is an hour old, a few per write.

Nothing here runs on the event loop but noting a cut stream's entry: settling (when
nothing is owed, a hash and one rename that fails, about 6 us; when something is, a rename,
a read and an unlink of one small file, about 25 us, once per response owed: ext4 and
tmpfs alike) and owing (a write, a rename, a listing of the bucket: about 25-40 us; and a
stat of its 100 entries when it is full: about 330 us) go to one of the metrics' threads
(:mod:`.metrics.threads`, not trio's default ones, which slow name resolutions may all
hold), abandoned to a cancellation (a hung disk holds no request, no shutdown): awaited
where the caller can wait (a queued background response: the entry is there before the
client has the id; a poll's or a resumed stream's settling, in the request's cleanups,
after its reply), else by this ledger's writer task (a stream cut before its end).

A directory that cannot be written or read (a full or read-only disk, no file descriptor
left) never fails a request: what cannot be written is not owed and what cannot be read
is not counted (tokens missed, never doubled), and one WARNING says so.
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import itertools
import logging
import math
import os
import random
import secrets
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, ClassVar, TypeVar

import psutil
import trio

from .ledger import MAX_ID_CHARS, MAX_OWED, Counted, rest, usage_totals
from .metrics.threads import metrics_threads

log = logging.getLogger("trioproxy.metrics")

BUCKETS = 100
# owed from a stream's end, not yet written by the writer task: past this many, dropped
MAX_PENDING = 1024
# a file holds two counts and an id of at most MAX_ID_CHARS bytes
_MAX_FILE = MAX_ID_CHARS + 64
# a stopping worker's last writes: what is not written by then is missed
SHUTDOWN_WRITE_S = 0.5
# a cut stream's entry is written this long after its end at most, but for a worker whose
# metrics' threads are all busy: a resumed stream that finds nothing owed looks again then
PENDING_WRITE_S = 0.25
# a draft or claim left behind (a worker killed between its two steps): examined per write
# to a bucket, and removed past this age even if a live process has its pid (pids are
# reused: a container's restarted workers get the same small ones); one in use lives for
# the microseconds of a write or a read
SWEEP_PER_WRITE = 8
_STALE_NS = 3600 * 10**9


def _new_tag() -> None:
    """This process's tag in its drafts' and claims' names: a former process of the same
    pid (a reused pid) has another, so its leftovers neither collide with nor pass as ours."""
    global _tag
    _tag = secrets.token_hex(4)


T = TypeVar("T")
_tag = ""
_new_tag()
os.register_at_fork(after_in_child=_new_tag)
_names = itertools.count()  # of this process's drafts and claims


class SharedResponsesLedger:
    """The ledger in ``directory``, shared by every process that opens it there."""

    __slots__ = ("_buckets", "_dir", "_pending", "_per_bucket", "_wake", "_warned", "_writing")
    shared: ClassVar[bool] = True

    def __init__(self, directory: str, limit: int = MAX_OWED, buckets: int = BUCKETS) -> None:
        self._dir = directory
        self._buckets = max(1, min(buckets, limit))
        self._per_bucket = -(-limit // self._buckets)
        self._pending: dict[str, Counted] = {}
        self._writing = _Batch({})  # the writer task's batch in a thread
        self._wake = trio.lowlevel.ParkingLot()
        self._warned = False

    # ---------------------------------------------------------------- owing (blocking)

    def owe(self, response_id: str, counted: Counted) -> None:
        """Write that ``response_id``'s usage is still to come. Blocking: in a thread."""
        where = self._where(response_id)
        if where is None:
            return
        bucket, path, key = where
        data = b"%d %d\n%s" % (counted.input_tokens, counted.output_tokens, key)
        try:
            self._write(bucket, path, data)
            self._trim(bucket)
        except OSError as error:
            self._warn(error)

    def _write(self, bucket: str, path: str, data: bytes) -> None:
        draft = self._own_name(bucket, "draft")
        try:
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:  # the bucket's first entry
            os.makedirs(bucket, exist_ok=True)
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                # the age a full bucket evicts by: to the nanosecond (a write's own time
                # can be as coarse as the kernel's tick)
                now = time.time_ns()
                os.utime(fd, ns=(now, now))
            finally:
                os.close(fd)
            os.rename(draft, path)  # owed again: the newer replaces it
        except BaseException:
            with suppress(OSError):
                os.unlink(draft)
            raise

    def _trim(self, bucket: str) -> None:
        """The oldest entries of ``bucket`` past its share of the limit, removed, and a few
        drafts and claims left behind by processes gone."""
        names: list[str] = []
        own: list[str] = []
        for name in os.listdir(bucket):
            (own if name.startswith(".") else names).append(name)
        if len(names) > self._per_bucket:
            self._evict(bucket, names)
        if own:  # after the bound is kept: a file that cannot be removed fails no eviction
            # a sample: a few that cannot go yet never hide the others behind them
            _sweep(bucket, random.sample(own, min(len(own), SWEEP_PER_WRITE)))

    def _evict(self, bucket: str, names: list[str]) -> None:
        """The oldest of ``names`` in ``bucket`` past its share of the limit, removed."""
        aged: list[tuple[int, str]] = []
        for name in names:
            with suppress(FileNotFoundError):  # settled since the listing
                aged.append((os.stat(os.path.join(bucket, name)).st_mtime_ns, name))
        for _, name in heapq.nsmallest(len(aged) - self._per_bucket, aged):
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(bucket, name))

    # ---------------------------------------------------------------- on the event loop

    def owe_soon(self, response_id: str, counted: Counted) -> None:
        """``owe``, written by :meth:`run_writer` in a thread: for code that cannot wait."""
        if len(self._pending) >= MAX_PENDING and response_id not in self._pending:
            return  # a writer that cannot keep up: missed rather than held without bound
        self._pending[response_id] = counted
        self._wake.unpark()

    async def run_writer(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Write what :meth:`owe_soon` noted, in a thread, for the worker's life."""
        task_status.started()
        try:
            while True:
                if not self._pending:
                    await self._wake.park()
                self._writing, self._pending = _Batch(self._pending), {}
                # abandoned to the worker's stop (a write stuck on a hung disk must not hold
                # it): the stop takes the batch over (_owe_last)
                await self._in_thread(self._owe_all, self._writing)
        finally:
            # the worker stops: what is left is written now, in a thread that joins the one
            # abandoned (an entry is taken by one thread only: never written twice, which
            # another worker may have settled since and would count again)
            batches = [self._writing, _Batch(self._pending)]
            self._pending = {}
            await self._owe_last(batches)

    async def _owe_last(self, batches: list[_Batch]) -> None:
        """Write what ``batches`` hold in a thread, for about :data:`SHUTDOWN_WRITE_S` at
        most, not on the event loop that other tasks' shutdowns share; the thread is
        abandoned at the bound (a write stuck on a hung disk with it), the rest is missed,
        and logged."""
        if not any(batch.left() for batch in batches):
            return
        until = time.monotonic() + SHUTDOWN_WRITE_S
        for batch in batches:
            batch.until = until  # a thread abandoned before stops taking entries then too
        # shielded: the cancellation stopping the worker is what brought us here
        with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_WRITE_S):
            await self._in_thread(self._owe_each, batches)
        missed = sum(batch.left() for batch in batches)
        if missed:
            log.warning(
                "metrics: %d Responses API ledger entries were not written as the worker "
                "stopped: other workers will not count the rest of those responses' tokens",
                missed,
            )

    def _owe_each(self, batches: list[_Batch]) -> None:
        for batch in batches:
            self._owe_all(batch)
        # then another thread's write (abandoned as the worker stopped): done in
        # microseconds, or stuck on the disk until the bound
        while any(batch.writing for batch in batches) and time.monotonic() <= batches[0].until:
            time.sleep(0.001)

    def _owe_all(self, batch: _Batch) -> None:
        """Write ``batch``'s entries, each taken from it first, until its ``until``."""
        entries = batch.entries
        while time.monotonic() <= batch.until:
            try:
                response_id, counted = entries.popitem()
            except KeyError:  # all written (or settled meanwhile)
                return
            batch.writing.add(response_id)
            try:
                self.owe(response_id, counted)
            finally:
                batch.writing.discard(response_id)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the metrics' threads (trio's default ones may all wait
        on name resolutions), abandoned to a cancellation: a disk that hangs holds no
        request and no shutdown (what the abandoned call would have done is missed)."""
        return await trio.to_thread.run_sync(
            fn, *args, abandon_on_cancel=True, limiter=metrics_threads()
        )

    # ---------------------------------------------------------------- settling (blocking)

    async def settle_off_loop(
        self, response_id: str, usage: Any, *, recheck: bool = False
    ) -> tuple[int, int] | None:
        """:meth:`settle` in a thread (:meth:`_in_thread`). ``recheck``, for a resumed
        stream: a cut stream's entry is written in a thread just after its end (by the
        worker that relayed it), so one resumed at once through another worker may find
        nothing owed yet; it looks once more :data:`PENDING_WRITE_S` later."""
        owed = await self._in_thread(self.settle, response_id, usage)
        if owed is None and recheck and usage_totals(usage) is not None:
            await trio.sleep(PENDING_WRITE_S)
            owed = await self._in_thread(self.settle, response_id, usage)
        return owed

    async def forget_off_loop(self, response_id: str) -> None:
        await self._in_thread(self.forget, response_id)

    def owed(self, response_id: str) -> Counted | None:
        if (counted := self._pending.get(response_id)) is not None:
            return counted
        where = self._where(response_id)
        if where is None:
            return None
        try:
            with open(where[1], "rb") as f:
                return _parsed(f.read(_MAX_FILE), where[2])
        except FileNotFoundError:
            return None
        except OSError as error:
            self._warn(error)
            return None

    def settle(self, response_id: str, usage: Any) -> tuple[int, int] | None:
        """The tokens still to count for ``response_id`` given its final ``usage``
        (input, output), once in all the workers; None if nothing is owed (or another
        worker settled it first) or ``usage`` says nothing."""
        totals = usage_totals(usage)
        if totals is None:
            return None
        counted = self._take(response_id)
        return None if counted is None else rest(counted, totals)

    def forget(self, response_id: str) -> None:
        self._take(response_id)

    def _take(self, response_id: str) -> Counted | None:
        """What ``response_id`` owed, no longer owed: this process's (noted, or in the
        writer's batch), or the one whose rename of the entry succeeded. Blocking (a rename),
        and safe in any thread: the noted entries are taken as the writer takes them."""
        counted = self._pending.pop(response_id, None)
        if counted is None:  # being written: taken first by whichever thread comes first
            counted = self._writing.entries.pop(response_id, None)
        where = self._where(response_id)
        if where is None:
            return counted
        bucket, path, key = where
        claim = self._own_name(bucket, "claim")
        try:
            os.rename(path, claim)
        except FileNotFoundError:  # nothing owed, or another worker took it first
            return counted
        except OSError as error:
            self._warn(error)
            return counted
        taken = self._read_claim(claim, path, key)
        return counted if counted is not None else taken

    def _read_claim(self, claim: str, path: str, key: bytes) -> Counted | None:
        """The entry renamed to ``claim``, removed; one that turns out to be another id's
        (of the same hash) is put back, unless that id was owed anew meanwhile."""
        counted: Counted | None = None
        try:
            with open(claim, "rb") as f:
                data = f.read(_MAX_FILE)
            counted = _parsed(data, key)
            if counted is None and data.partition(b"\n")[2] != key:
                with suppress(FileExistsError):
                    os.link(claim, path)
        except OSError as error:
            self._warn(error)
        finally:
            with suppress(OSError):
                os.unlink(claim)
        return counted

    def __len__(self) -> int:
        """Entries owed in all the workers (reads every bucket: for tests)."""
        count = len(self._pending)
        for bucket in range(self._buckets):
            with suppress(FileNotFoundError):
                names = os.listdir(os.path.join(self._dir, f"{bucket:02d}"))
                count += sum(not name.startswith(".") for name in names)
        return count

    # ---------------------------------------------------------------- names

    def _where(self, response_id: str) -> tuple[str, str, bytes] | None:
        """(bucket directory, entry path, id as bytes) of ``response_id``; None for an id
        too long to be polled (never owed)."""
        key = response_id.encode("utf-8", "surrogatepass")
        if len(key) > MAX_ID_CHARS:
            return None
        digest = hashlib.sha256(key).hexdigest()
        bucket = os.path.join(self._dir, f"{int(digest[:8], 16) % self._buckets:02d}")
        return bucket, os.path.join(bucket, digest), key

    def _own_name(self, bucket: str, kind: str) -> str:
        """A name in ``bucket`` no other process or thread uses (dotted: not an entry)."""
        return os.path.join(bucket, f".{kind}_{os.getpid()}_{_tag}_{next(_names)}")

    def _warn(self, error: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "metrics: the Responses API ledger shared by the workers in %s cannot be "
                "used (%s): tokens of background responses and cut streams that a later "
                "request would count may be missed",
                self._dir,
                error,
            )


class _Batch:
    """Entries owed from streams' ends, handed to threads to write. Each is taken from
    ``entries`` (one ``dict.popitem`` or ``dict.pop``, atomic under the GIL) by exactly one
    of: a writing thread, or a settle or forget in any thread; so none is written twice, nor
    written and counted too, however many threads work on one batch (a stopping worker's
    joins one stuck on the disk)."""

    __slots__ = ("entries", "until", "writing")

    def __init__(self, entries: dict[str, Counted]) -> None:
        self.entries = entries
        self.until = math.inf  # on the monotonic clock: no entry is taken past it
        self.writing: set[str] = set()  # taken, being written

    def left(self) -> int:
        """Entries not written (yet: a write stuck on the disk may end some day)."""
        return len(self.entries) + len(self.writing)


def _sweep(bucket: str, names: list[str]) -> None:
    """The drafts and claims among ``names`` that no process uses any more, removed."""
    me = os.getpid()
    now = time.time_ns()
    for name in names:
        _, _, rest_of_name = name.partition("_")
        pid_text, _, rest_of_name = rest_of_name.partition("_")
        pid = _pid(pid_text)
        path = os.path.join(bucket, name)
        try:
            if pid == me:
                gone = not rest_of_name.startswith(_tag + "_")
            else:
                gone = pid is not None and not psutil.pid_exists(pid)
            # a rename sets a claim's ctime (its mtime is its entry's, maybe hours old)
            gone = gone or now - os.stat(path).st_ctime_ns > _STALE_NS
            if gone:
                os.unlink(path)
        except FileNotFoundError:  # renamed or removed meanwhile (by its owner, a sweep)
            pass


def _pid(text: str) -> int | None:
    """The pid a leftover's name gives, if it can be one: ASCII digits (``str.isdigit``
    takes "²" too, which ``int`` refuses) few enough for the kernel's pid type (a longer
    run made ``psutil.pid_exists`` an OverflowError out of every write to the bucket);
    else None, and the file is judged by its age."""
    if len(text) > _PID_DIGITS or not text.isascii() or not text.isdigit():
        return None
    return int(text)


# Linux's pids stop at 2**22 (PID_MAX_LIMIT); a C int, which os.kill takes, holds 9 digits
_PID_DIGITS = 9


def _parsed(data: bytes, key: bytes) -> Counted | None:
    """The counts an entry holds, if it is ``key``'s and whole."""
    head, _, owner = data.partition(b"\n")
    counts = head.split(b" ")
    if owner != key or len(counts) != 2 or not all(c.isdigit() for c in counts):
        return None
    return Counted(int(counts[0]), int(counts[1]))
