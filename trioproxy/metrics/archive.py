"""Dead workers' counter and histogram files folded into one archive per metric type.

prometheus_client keeps a file per process and type (``counter_<pid>.db``, ...). A worker
that dies leaves its files, whose counts happened and stay in every total; with workers
started again after each kill (``trioproxy.respawn``), or by hypercorn's ``max_requests``,
the directory, and the merge every read does, grew for the proxy's whole life. Here the
files of processes that no longer exist are folded into ``<type>_archive.db``, written in
prometheus_client's own file format (its ``MultiProcessCollector`` and our merge read it
unchanged), then removed: the directory holds the live processes' files and at most one
archive per type.

A total never moves by the fold, to the last bit: each key's values are kept in the
archive as the non-overlapping partial sums of their exact sum (the entries of one key
add up to it exactly; usually one entry), and the merge adds a series' values across the
files exactly (:func:`exact_sum`, as ``math.fsum``), so it gives the correctly rounded
exact sum whatever the files (a plain left-to-right ``+=`` in another order could come
out one unit lower: a counter reset for Prometheus).

One process compacts at a time (an exclusive, non-blocking ``flock`` on
``.archive.lock``: a process that finds it taken leaves the work to the holder). It
writes the new archive whole (a temporary name, then ``os.replace``) before it removes
the files it took in, and the archive names those files (name and inode, after the
library's data: no reader of the library looks there), so a reader never counts a dead
worker twice (it skips the files its archive names) nor misses it (a reader whose
archive was replaced while it read reads again: :func:`versions`, :func:`unchanged`).
Readers take no lock. Each archive carries a generation (one more than the last one's,
in the header's padding) so that a kept merge never takes a new archive that got the
old one's inode for the old one. Gauges are left as they are: trioproxy's are all ``live*`` (a dead
worker's are removed), and the other modes keep a dead process's value by design.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import math
import os
import struct
from collections.abc import Iterable, Iterator

log = logging.getLogger("trioproxy.metrics")

ARCHIVED_KINDS: tuple[str, ...] = ("counter", "histogram", "summary")  # summed types
ARCHIVE_PID = "archive"  # in place of a pid: ``counter_archive.db``
ARCHIVE_SUFFIX = f"_{ARCHIVE_PID}.db"
LOCK_NAME = ".archive.lock"
_TMP_SUFFIX = ".archive-tmp"  # not ``.db``: no reader globs it

_HEADER = 8  # prometheus_client's files: the used size (4 bytes), 4 of padding
_INT = struct.Struct("i")
_DOUBLES = struct.Struct("dd")
_TRAILER = struct.Struct("=8sI")  # after the last byte: magic and the names' length
_MAGIC = b"TPXARCH1"

Ident = tuple[int, int]  # an archive's inode and generation: which one a name is now
Absorbed = frozenset[tuple[str, int]]  # files an archive took in: (name, inode)


def archive_path(directory: str, kind: str) -> str:
    return os.path.join(directory, kind + ARCHIVE_SUFFIX)


def _dead_pid(filename: str) -> int | None:
    """The pid of a summed type's file (``counter_<pid>.db``) whose process is gone."""
    kind, _, rest = os.path.basename(filename).partition("_")
    if kind not in ARCHIVED_KINDS or not rest.endswith(".db"):
        return None
    try:
        pid = int(rest[: -len(".db")])
    except ValueError:
        return None  # the archive itself
    if pid == os.getpid() or _pid_exists(pid):
        return None
    return pid


def _pid_exists(pid: int) -> bool:
    """Whether a process (or, conservatively, a thread) has this pid: ``kill(pid, 0)``
    alone (psutil's check reads /proc too: four times the cost, on every read)."""
    if pid <= 0:
        return True  # not a pid: never taken for a dead worker's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OverflowError:
        return False  # beyond any pid: no process has it
    return True


def dead_files(directory: str) -> list[str]:
    """The summed types' files of processes that no longer exist (a glob and one
    ``kill(pid, 0)`` per file: cheap enough for every read)."""
    return [f for f in glob.glob(os.path.join(directory, "*.db")) if _dead_pid(f) is not None]


# ------------------------------------------------------------------------- exact sums


def _partials(values: Iterable[float]) -> list[float]:
    """Non-overlapping floats whose exact sum is that of ``values`` (Shewchuk's
    algorithm, what ``math.fsum`` keeps internally)."""
    partials: list[float] = []
    for x in values:
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]
    return [p for p in partials if p] or [0.0]


def exact_sum(values: list[float]) -> float:
    """The correctly rounded sum of ``values`` (``math.fsum``; a plain sum when one is
    not finite, which fsum refuses to mix)."""
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):
        return sum(values)


def _kept_values(values: list[float]) -> list[float]:
    if all(math.isfinite(v) for v in values):
        return _partials(values)
    return [sum(values)]


# --------------------------------------------------------------------- file contents


def _read_entries(data: bytes) -> list[tuple[str, float, float]]:
    """The (key, value, timestamp) entries of a file's bytes, as the library reads them."""
    used = _INT.unpack_from(data, 0)[0] if len(data) >= _HEADER else 0
    if used > len(data):
        raise RuntimeError("Read beyond file size detected, file is corrupted.")
    out: list[tuple[str, float, float]] = []
    pos = _HEADER
    while pos < used:
        length = _INT.unpack_from(data, pos)[0]
        if length + pos > used:
            raise RuntimeError("Read beyond file size detected, file is corrupted.")
        key = data[pos + 4 : pos + 4 + length].decode("utf-8")
        pos += 4 + length + (8 - (length + 4) % 8)
        value, timestamp = _DOUBLES.unpack_from(data, pos)
        pos += 16
        out.append((key, value, timestamp))
    return out


def archive_generation(data: bytes) -> int:
    """An archive's generation, from its first bytes: one more than the archive before
    it (kept in the header's padding, which prometheus_client neither reads nor writes)."""
    generation: int = _INT.unpack_from(data, 4)[0]
    return generation


def _encoded(
    entries: Iterable[tuple[str, float, float]], absorbed: Absorbed, generation: int
) -> bytes:
    """A file in prometheus_client's ``MmapedDict`` format holding ``entries`` (a key may
    repeat: readers add the entries up), then the names of the files it took in."""
    body = bytearray(_HEADER)
    _INT.pack_into(body, 4, generation)
    for key, value, timestamp in entries:
        encoded = key.encode("utf-8")
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
        body += _INT.pack(len(encoded)) + padded + _DOUBLES.pack(value, timestamp)
    _INT.pack_into(body, 0, len(body))
    names = json.dumps(sorted(absorbed)).encode()
    return bytes(body) + names + _TRAILER.pack(_MAGIC, len(names))


def _absorbed_in(fd: int, size: int) -> Absorbed:
    """The files named after an archive's data (none in a file without them)."""
    if size < _TRAILER.size:
        return frozenset()
    magic, length = _TRAILER.unpack(os.pread(fd, _TRAILER.size, size - _TRAILER.size))
    if magic != _MAGIC or length > size - _TRAILER.size:
        return frozenset()
    names = json.loads(os.pread(fd, length, size - _TRAILER.size - length))
    return frozenset((str(name), int(ino)) for name, ino in names)


# -------------------------------------------------------------------------- readers


def _ident(fd: int) -> Ident:
    """Which archive ``fd`` is: its inode, and its generation (an inode freed by the
    last archive may be the next one's)."""
    return os.fstat(fd).st_ino, archive_generation(os.pread(fd, _HEADER, 0).ljust(_HEADER, b"\0"))


def versions(directory: str, kinds: Iterable[str]) -> dict[str, tuple[Ident, Absorbed] | None]:
    """Which archive each of ``kinds`` has now (None: none yet) and the files it took in:
    a read skips those files, and is good if :func:`unchanged` says so at its end."""
    out: dict[str, tuple[Ident, Absorbed] | None] = {}
    for kind in kinds:
        if kind not in ARCHIVED_KINDS:
            continue
        try:
            fd = os.open(archive_path(directory, kind), os.O_RDONLY)
        except FileNotFoundError:
            out[kind] = None
            continue
        try:
            out[kind] = (_ident(fd), _absorbed_in(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)
    return out


def unchanged(directory: str, seen: dict[str, tuple[Ident, Absorbed] | None]) -> bool:
    """Whether every archive is still the one :func:`versions` saw: no compaction
    removed a file that the archive read did not hold."""
    for kind, version in seen.items():
        try:
            fd = os.open(archive_path(directory, kind), os.O_RDONLY)
        except FileNotFoundError:
            now: Ident | None = None
        else:
            try:
                now = _ident(fd)
            finally:
                os.close(fd)
        if now != (version[0] if version is not None else None):
            return False
    return True


def skipped(seen: dict[str, tuple[Ident, Absorbed] | None]) -> frozenset[tuple[str, int]]:
    """The files the archives seen took in (removed just after, or left by a compactor
    that was killed in between): never counted beside their archive."""
    out: set[tuple[str, int]] = set()
    for version in seen.values():
        if version is not None:
            out |= version[1]
    return frozenset(out)


@contextlib.contextmanager
def shared_lock(directory: str) -> Iterator[None]:
    """Held while reading, no compaction runs (for a reader that lost its race with
    compactions too often; blocks while one runs: milliseconds)."""
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ compaction


def compact(directory: str) -> int:
    """Fold the dead processes' files of the summed types into their archives; the
    number of files removed (0 when another process is compacting: it does the work).
    Blocking file I/O: never on the event loop. A failure (a full disk) leaves every
    file as it was, logged: it costs the merge's time, never a count."""
    try:
        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        _warn_once("", error)
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another process is compacting
        _remove_temporaries(directory)
        removed = 0
        for kind in ARCHIVED_KINDS:
            try:
                removed += _compact_kind(directory, kind)
            except (OSError, RuntimeError, ValueError) as error:  # full disk, a bad file
                _warn_once(kind, error)
        return removed
    finally:
        os.close(fd)  # releases the lock


_warned: set[str] = set()  # the kinds whose compaction failed: one WARNING per process


def _warn_once(kind: str, error: Exception) -> None:
    """Every read tries again; the log says it once (for the first kind that failed)."""
    if _warned:
        _warned.add(kind)
        return
    _warned.add(kind)
    log.warning(
        "metrics: dead workers' %s files not folded into the archive (they stay, and are "
        "counted as before; tried again at each read): %s",
        kind or "metrics",
        error,
    )


def _remove_temporaries(directory: str) -> None:
    """A compactor killed while writing left its temporary file (we hold the lock)."""
    for f in glob.glob(os.path.join(directory, f".*{_TMP_SUFFIX}")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f)


def _compact_kind(directory: str, kind: str) -> int:
    target = archive_path(directory, kind)
    entries, absorbed, generation = _current(target)
    # files the archive took in but its compactor could not remove: counted there already
    leftovers = _remove_absorbed(directory, absorbed)
    dead = [
        f for f in glob.glob(os.path.join(directory, f"{kind}_*.db")) if _dead_pid(f) is not None
    ]
    if not dead:
        return leftovers
    taken: set[tuple[str, int]] = set()
    for f in sorted(dead):
        try:
            with open(f, "rb") as file:
                ino = os.fstat(file.fileno()).st_ino
                data = file.read()
        except FileNotFoundError:
            continue
        entries.extend(_read_entries(data))
        taken.add((os.path.basename(f), ino))
    if not taken:
        return leftovers
    tmp = os.path.join(directory, f".{kind}_{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as out:
            next_generation = (generation + 1) % (1 << 31)
            out.write(_encoded(_folded(entries), frozenset(taken), next_generation))
        os.replace(tmp, target)  # readers see the old archive or the new one, whole
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # only now: a reader of the new archive skips these, one of the old reads again
    removed = _remove_absorbed(directory, frozenset(taken))
    log.debug("metrics: %d dead workers' %s files folded into %s", removed, kind, target)
    return leftovers + removed


def _current(target: str) -> tuple[list[tuple[str, float, float]], Absorbed, int]:
    """The archive's entries, the files it took in, its generation (0: no archive)."""
    try:
        with open(target, "rb") as file:
            data = file.read()
            absorbed = _absorbed_in(file.fileno(), len(data))
    except FileNotFoundError:
        return [], frozenset(), 0
    return _read_entries(data), absorbed, archive_generation(data)


def _remove_absorbed(directory: str, absorbed: Absorbed) -> int:
    removed = 0
    for name, ino in absorbed:
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_ino != ino:
                continue  # a new process with that pid made a file of its own
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def _folded(entries: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """Each key once per partial of its exact sum, in the order keys first appear (the
    latest timestamp kept: the library ignores it for summed types)."""
    values: dict[str, list[float]] = {}
    stamps: dict[str, float] = {}
    for key, value, timestamp in entries:
        values.setdefault(key, []).append(value)
        stamps[key] = max(stamps.get(key, 0.0), timestamp)
    return [(k, p, stamps[k]) for k, vs in values.items() for p in _kept_values(vs)]
