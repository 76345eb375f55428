"""prometheus_client's multiprocess files, made safe on a full filesystem.

With ``PROMETHEUS_MULTIPROC_DIR`` (``--workers N``: the run directory in ``$TMPDIR``), each
worker keeps its series in memory-mapped files that grow as series are added. The library
grows a file by ``truncate`` alone, which reserves no space: on a full filesystem (a
``/tmp`` tmpfs, a container's ``emptyDir`` at its ``sizeLimit``) the first write into the
new part is a SIGBUS, which killed the worker at the end of a request, and ``trioproxy``
with it (``the worker server stopped without being asked``). Where the file may not grow
(RLIMIT_FSIZE: ``EFBIG``), the library's file was left half-grown and every later request
logged an ``IndexError`` traceback.

:class:`SpaceReservedDict` takes its place: it reserves each page of the file before it
writes into it (``posix_fallocate``; the file takes no more space than the library's), so
a full filesystem is an error it can see. A file that finds no room stays as it is, and
its series go on in memory (:class:`PartlyFiledDict`): requests are served as before,
the series already in the file keep counting, and those added since are missing from
scrapes, with one WARNING per process saying so.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import sys
import threading

from prometheus_client import mmap_dict, values

log = logging.getLogger("trioproxy.metrics")

# where posix_fallocate cannot reserve (a filesystem without it): grown as before
_CANNOT_RESERVE = frozenset((errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL))
_warned = threading.Event()  # the WARNING about it: once per process


class SpaceReservedDict(mmap_dict.MmapedDict):
    """prometheus_client's ``MmapedDict`` that reserves a page of its file before it
    writes the first entry into it (the file stays sparse past what is written, as the
    library's). Where there is no room, it becomes a :class:`PartlyFiledDict`."""

    _reserved: int  # the file's first bytes whose space is reserved (or written)

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        failure = None if read_mode else _reserve_new_file(filename)
        if failure is None:
            super().__init__(filename, read_mode)
            self._reserved = _pages(self._used)  # pages written are allocated
            return
        # no room for even the file's first bytes: every value in memory
        # MmapedDict's own close() sets None too: its attribute's inferred type misses it
        self._f = None  # type: ignore[assignment]
        self._fname = filename
        self._positions = {}
        self._m = mmap.mmap(-1, mmap_dict._INITIAL_MMAP_SIZE)
        self._capacity = mmap_dict._INITIAL_MMAP_SIZE
        self._used = 8
        mmap_dict._pack_integer(self._m, 0, self._used)
        PartlyFiledDict.unfiled(self, None, failure)

    def _init_value(self, key: str) -> None:
        needed = self._used + _entry_size(key)
        failure = None
        if needed > self._capacity:
            failure = self._grow_file(_doubled(self._capacity, needed))
        if failure is None and needed > self._reserved:
            failure = self._reserve(needed)
        if failure is not None:
            PartlyFiledDict.unfiled(self, self._m, failure)
            self._init_value(key)  # the PartlyFiledDict's, in memory
            return
        super()._init_value(key)  # the room is there: the library writes the entry

    def _grow_file(self, capacity: int) -> str | None:
        """Grow the file to ``capacity`` (sparse, as the library does) and map it; why
        not, when it may not grow (the map is then as it was)."""
        assert self._f is not None
        fd = self._f.fileno()
        try:
            os.ftruncate(fd, capacity)
            grown = mmap.mmap(fd, capacity)
        except OSError as error:
            return error.strerror or str(error)
        self._m, self._capacity = grown, capacity
        return None

    def _reserve(self, needed: int) -> str | None:
        """Reserve the pages up to ``needed`` bytes; why not, when there is no room."""
        assert self._f is not None
        end = _pages(needed)
        try:
            os.posix_fallocate(self._f.fileno(), self._reserved, end - self._reserved)
        except OSError as error:
            if error.errno not in _CANNOT_RESERVE:
                return error.strerror or str(error)
            end = sys.maxsize  # nothing to reserve with: written as before, unreserved
        self._reserved = end
        return None


class PartlyFiledDict(SpaceReservedDict):
    """A ``SpaceReservedDict`` whose file found no room: the values already in the file
    are still written there (published: they keep counting), every value is kept in an
    anonymous map (``_m``, what the library's methods read and write), and the values
    added since are only there: missing from scrapes. Its write costs more than the
    library's, from then on only."""

    _file_map: mmap.mmap | None
    _filed_used: int  # the file's entries end here: positions below are in the file

    @classmethod
    def unfiled(cls, entries: SpaceReservedDict, file_map: mmap.mmap | None, reason: str) -> None:
        """Turn ``entries`` (whose file found no room) into one of these."""
        entries.__class__ = cls
        assert isinstance(entries, PartlyFiledDict)
        entries._file_map = file_map
        entries._filed_used = entries._used if file_map is not None else 0
        if file_map is not None:
            memory = mmap.mmap(-1, entries._capacity)
            # what is written only: on a tmpfs even reading a page never written takes
            # one (and there is none: SIGBUS)
            used = entries._used
            memory[:used] = file_map[:used]
            entries._m = memory
        _warn(entries._fname, reason)

    def _init_value(self, key: str) -> None:
        needed = self._used + _entry_size(key)
        if needed > self._capacity:
            capacity = _doubled(self._capacity, needed)
            memory = mmap.mmap(-1, capacity)
            memory[: self._capacity] = self._m[:]
            self._m, self._capacity = memory, capacity
        mmap_dict.MmapedDict._init_value(self, key)

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        super().write_value(key, value, timestamp)
        pos = self._positions[key]
        if pos < self._filed_used and self._file_map is not None:
            mmap_dict._pack_two_doubles(self._file_map, pos, value, timestamp)

    def close(self) -> None:
        if self._file_map is not None:
            self._file_map.close()
            self._file_map = None
        if self._f is None and self._m is not None:  # no file: the library closes none
            self._m.close()
            self._m = None
        super().close()


def _doubled(capacity: int, needed: int) -> int:
    while needed > capacity:
        capacity *= 2
    return capacity


def _warn(filename: str, reason: str) -> None:
    if _warned.is_set():
        return
    _warned.set()
    log.warning(
        "metrics: no room for the metrics file %s (%s): this worker (pid %d) keeps the "
        "series it adds from now on in memory, missing from /metrics (those already in "
        "the file keep counting); requests are served as before. Free space where "
        "PROMETHEUS_MULTIPROC_DIR is ($TMPDIR with --workers) and restart to publish them",
        filename,
        reason,
        os.getpid(),
    )


def _entry_size(key: str) -> int:
    """Bytes ``MmapedDict._init_value`` appends for ``key``: its length, the key padded
    to 8 bytes, the value and the timestamp."""
    encoded = len(key.encode("utf-8"))
    return 4 + encoded + (8 - (encoded + 4) % 8) + 16


def _reserve_new_file(filename: str) -> str | None:
    """Create ``filename`` with its first page reserved (the library writes its header
    there at once), or find it there; why not when there is no room (no file is left
    behind: an empty one would fail the scrapes that read it)."""
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        return error.strerror or str(error)
    try:
        if os.fstat(fd).st_size == 0:
            try:
                os.posix_fallocate(fd, 0, mmap.PAGESIZE)
                os.ftruncate(fd, mmap_dict._INITIAL_MMAP_SIZE)  # the library's first size
            except OSError as error:
                if error.errno in _CANNOT_RESERVE:
                    return None  # the library creates it, as before
                os.unlink(filename)
                return error.strerror or str(error)
        return None
    finally:
        os.close(fd)


def _pages(size: int) -> int:
    """``size`` rounded up to whole pages."""
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def install() -> None:
    """prometheus_client's multiprocess values use :class:`SpaceReservedDict` for their
    files (it names the class at call time: values created from now on)."""
    # a patch of the name values imported, which it does not export
    values.MmapedDict = SpaceReservedDict  # type: ignore[attr-defined]
