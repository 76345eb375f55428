"""The workers' shared files merged once and then brought up to date, series by series.

With ``--workers N`` every read of the metrics (a scrape, the JSON summary, a health check)
merges the files of all workers. prometheus_client's :meth:`MultiProcessCollector.merge`
does it from nothing each time: every entry's key decoded and parsed (JSON), every sample
built and accumulated. At a full label budget (50 models on every route: 12.7 MB of files
with two workers) that was about 260 ms per read, twice what encoding the result costs.

:class:`SharedFilesMerge` keeps what it read. Each file's keys are parsed once (a file
only ever appends entries: prometheus_client never moves or rewrites one), and its values
and timestamps are read at every merge in one ``struct`` call over the file's bytes, so no
change can be missed (no marker to trust: a file's mtime does not follow writes through
its mapping). Only the series whose values changed are accumulated again, by
prometheus_client's own ``_accumulate_metrics`` on that series' samples (so the result is
the library's, sample for sample and in its order), and only the families holding one
are built anew; the others are the same :class:`Metric` objects as before, never changed
once handed out (a reader may be encoding them in another thread).

The merge is the library's in every respect a reader sees: the families in the order
they first appear in the files (files in ``glob`` order), each family's help and type
from its first entry, its series in the library's order, a gauge's samples accumulated by
its mode (gauge families are accumulated whole: their series group differently by mode).
But for one state of the files: a histogram series a worker is still adding (no ``+Inf``
bucket yet) is left out, where the library gives it without its count (:func:`_being_made`).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

from .archive import ARCHIVE_SUFFIX, archive_generation, exact_sum

_HEADER = 8  # a file starts with its used size (4 bytes) and 4 of padding
_USED = struct.Struct("i")
_COMPARED = 512  # values compared at once when looking for the changed ones


class _Entry:
    """One parsed key of a file (shared by every file holding the same key)."""

    __slots__ = ("help", "inf", "key", "labels", "metric", "name", "without_le")

    def __init__(self, key: str) -> None:
        self.key = key
        metric, name, labels, help_text = json.loads(key)
        self.metric: str = metric
        self.name: str = name
        self.labels: tuple[tuple[str, str], ...] = tuple(sorted(labels.items()))
        self.help: str = help_text
        # in a histogram, a bucket's series: its labels without le (None: no le)
        self.without_le: tuple[tuple[str, str], ...] | None = None
        if "le" in labels:
            self.without_le = tuple(lbl for lbl in self.labels if lbl[0] != "le")
        self.inf = labels.get("le") == "+Inf"  # a histogram's last bucket (its count)


class _File:
    """What was read of one worker's file: its entries and their values."""

    __slots__ = ("entries", "ident", "mode", "pid", "typ", "unpack", "used", "values")

    def __init__(self, path: str, ident: tuple[int, int, int]) -> None:
        parts = os.path.basename(path).split("_")
        self.typ = parts[0]
        # a gauge's mode and pid come from its name, as prometheus_client reads them
        self.mode = parts[1] if self.typ == "gauge" else ""
        self.pid = parts[2][:-3] if self.typ == "gauge" else ""
        self.ident = ident
        self.used = _HEADER
        self.entries: list[_Entry] = []
        self.unpack = struct.Struct(f"={_HEADER}x")  # the header, then each value
        self.values: tuple[float, ...] = ()  # value, timestamp of each entry in turn

    def extend(self, data: bytes, used: int, keys: dict[str, _Entry]) -> None:
        """Parse the entries appended since the last read (``data`` holds the file's
        first ``used`` bytes) and make the unpacker of all values."""
        pos, formats = self.used, [self.unpack.format[1:]]
        at = pos  # where the unpacker's last value ended
        while pos < used:
            length = _USED.unpack_from(data, pos)[0]
            if length + pos > used:
                raise RuntimeError("Read beyond file size detected, file is corrupted.")
            key = data[pos + 4 : pos + 4 + length].decode("utf-8")
            entry = keys.get(key)
            if entry is None:
                entry = keys[key] = _Entry(key)
            self.entries.append(entry)
            pos += 4 + length + (8 - (length + 4) % 8)
            formats.append(f"{pos - at}xdd")
            pos += 16
            at = pos
        self.unpack = struct.Struct("=" + "".join(formats))
        self.used = used

    def read_values(self, data: bytes) -> set[int]:
        """Read every value again; the entries whose value or timestamp changed."""
        values = self.unpack.unpack_from(data)
        old, self.values = self.values, values
        if values == old:
            return set()
        changed: set[int] = set()
        for start in range(0, len(values), _COMPARED):
            end = start + _COMPARED
            if values[start:end] == old[start:end]:
                continue
            for i in range(start, min(end, len(values))):
                if i >= len(old) or values[i] != old[i]:
                    changed.add(i // 2)
        return changed


class _Series:
    """The samples of one series (or a whole gauge family) across the files, and their
    accumulation."""

    __slots__ = ("accumulated", "refs")

    def __init__(self) -> None:
        self.refs: list[tuple[_File, int]] = []  # in the files' order, then the entries'
        self.accumulated: list[Sample] | None = None


class _Family:
    """A family's series in the library's order, and its :class:`Metric` as last built."""

    __slots__ = ("bucket_only", "help", "metric", "mode", "name", "refs", "series", "typ", "whole")

    def __init__(self, entry: _Entry, file: _File) -> None:
        self.name = entry.metric
        self.help = entry.help
        self.typ = file.typ
        self.mode = ""  # the last gauge file's, as prometheus_client leaves it
        # gauges group their series by mode, and a family mixing kinds is the library's
        # corner: both accumulated whole
        self.whole = file.typ == "gauge"
        self.series: dict[tuple[tuple[str, str], ...], _Series] = {}
        self.bucket_only: dict[tuple[tuple[str, str], ...], _Series] = {}
        self.refs: list[tuple[_File, int]] = []  # every entry, in the files' order
        self.metric: Metric | None = None

    def add(self, entry: _Entry, file: _File, index: int) -> _Series:
        if file.typ != self.typ:
            self.whole = True
        if file.typ == "gauge":
            self.mode = file.mode
        self.refs.append((file, index))
        # a histogram's bucket belongs to the series of its labels without le
        bucket = self.typ == "histogram" and entry.without_le is not None
        key = entry.without_le if bucket else entry.labels
        assert key is not None
        series = self.series.get(key)
        if series is None:
            # the library orders series as they first appear, histogram buckets after
            # the rest (a series seen in buckets only comes after every other)
            table = self.bucket_only if bucket else self.series
            series = table.get(key)
            if series is None:
                series = table[key] = _Series()
            elif not bucket:
                del self.bucket_only[key]
                self.series[key] = series
        series.refs.append((file, index))
        return series

    def ordered(self) -> list[_Series]:
        return [*self.series.values(), *self.bucket_only.values()]

    def accumulate_whole(self) -> None:
        """One series of every entry (a gauge family, or one mixing kinds)."""
        whole = _Series()
        whole.refs = self.refs
        self.series, self.bucket_only = {(): whole}, {}

    def keep_accumulated(self, before: _Family) -> None:
        """Take over the accumulation of each series made of the same entries as before
        (its samples depend on nothing else)."""
        if (before.whole, before.typ, before.mode) != (self.whole, self.typ, self.mode):
            return
        kept = {**before.series, **before.bucket_only}
        for key, series in (*self.series.items(), *self.bucket_only.items()):
            old = kept.get(key)
            if old is not None and old.refs == series.refs:
                series.accumulated = old.accumulated


class SharedFilesMerge:
    """The merge of the files of a multiprocess directory, kept and brought up to date
    (one per directory and set of file kinds). Safe to call from several threads: one
    merge runs at a time.

    It holds each file's parsed keys and values and each series' merged samples: about
    what one merge from nothing builds, bounded as the files are (by the label budget).
    The first merge costs what prometheus_client's does; so does one after new series
    appeared (each entry is placed again, the series that did not change keep their
    samples); one after values changed costs reading the files' values (one ``struct``
    call per file) and accumulating the changed series."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.series_accumulated = 0  # for tests: series (or gauge families) merged anew
        self._forget()

    def _forget(self) -> None:
        """Nothing kept: the next merge is made from nothing."""
        self._files: dict[str, _File] = {}
        self._order: list[str] = []
        self._keys: dict[str, _Entry] = {}
        self._families: dict[str, _Family] = {}
        # each file's entries -> the series (or whole family) they are samples of
        self._owners: dict[str, list[tuple[_Family, _Series]]] = {}

    def merge(self, files: Iterable[str]) -> list[Metric]:
        """The merged families of ``files`` (in this order), as
        ``MultiProcessCollector.merge(files, accumulate=True)`` makes them. A file gone
        since it was listed is skipped."""
        with self._lock:
            try:
                return self._merge(list(files))
            except BaseException:
                # the files read before the failure were taken as read (their changes
                # seen, so the next merge would find none): all of it is forgotten
                self._forget()
                raise

    def _merge(self, paths: list[str]) -> list[Metric]:
        changed: dict[str, set[int]] = {}
        present: list[str] = []
        grown = False
        for path in paths:
            read = self._read(path)
            if read is None:
                continue
            present.append(path)
            file, data, was_new = read
            if was_new:
                grown = True
            if len(data) > file.used:
                file.extend(data, len(data), self._keys)
                grown = True
            changed[path] = file.read_values(data)
        if grown or present != self._order:
            for path in set(self._files) - set(present):
                del self._files[path]
            self._order = present
            self._relayout()
            self._trim_keys()
        dirty = self._dirty(changed)
        return self._publish(dirty)

    def _read(self, path: str) -> tuple[_File, bytes, bool] | None:
        """The file's state (a new one when the file is new or not the one read before)
        and its first ``used`` bytes; None when it is gone or holds no header yet."""
        try:
            with open(path, "rb") as f:
                ident = os.fstat(f.fileno())
                data = f.read(_HEADER)
                if len(data) < _HEADER:
                    return None  # created, not sized yet: no value in it
                used = _USED.unpack_from(data, 0)[0]
                if used <= _HEADER:
                    return None  # no entry yet
                data += f.read(used - _HEADER)
        except FileNotFoundError:
            return None  # a dead worker's live gauge, removed since the glob
        if len(data) < used:
            raise RuntimeError("Read beyond file size detected, file is corrupted.")
        file = self._files.get(path)
        # a worker's file is the same while its inode is; an archive, written whole and
        # never changed, by its generation too: the next one may get the inode the last
        # one freed (ext4 reuses them)
        made = archive_generation(data) if path.endswith(ARCHIVE_SUFFIX) else 0
        same = (ident.st_dev, ident.st_ino, made)
        new = file is None or file.ident != same or used < file.used
        if new:
            file = self._files[path] = _File(path, same)
        assert file is not None
        return file, data, new

    def _relayout(self) -> None:
        """The families and series of the files as they are now: their order, and each
        entry's series. A series whose samples are the same entries as before keeps its
        accumulation (whether a value changed is seen by :meth:`_dirty`)."""
        old = self._families
        self._families = {}
        self._owners = {}
        families = self._families
        for path in self._order:
            file = self._files[path]
            owners = self._owners[path] = []
            for index, entry in enumerate(file.entries):
                family = families.get(entry.metric)
                if family is None:
                    family = families[entry.metric] = _Family(entry, file)
                owners.append((family, family.add(entry, file, index)))
        for family in families.values():
            if family.whole:  # every entry's series is the family's one
                family.accumulate_whole()
            before = old.get(family.name)
            if before is not None:
                family.keep_accumulated(before)

    def _trim_keys(self) -> None:
        """Forget the keys no file holds any more (a dead worker's gauges removed)."""
        held = sum(len(f.entries) for f in self._files.values())
        if len(self._keys) > 2 * held + 1024:
            self._keys = {}
            for file in self._files.values():
                for entry in file.entries:
                    self._keys[entry.key] = entry

    def _dirty(self, changed: dict[str, set[int]]) -> set[int]:
        """Forget the accumulation of every series with a changed entry; the ids of the
        families holding one."""
        dirty: set[int] = set()
        for path, indexes in changed.items():
            owners = self._owners.get(path, ())
            for index in indexes:
                family, series = owners[index]
                if family.whole:
                    series = family.ordered()[0]
                series.accumulated = None
                dirty.add(id(family))
        return dirty

    def _publish(self, dirty: set[int]) -> list[Metric]:
        out: list[Metric] = []
        for family in self._families.values():
            series = family.ordered()
            if (
                family.metric is None
                or id(family) in dirty
                or any(s.accumulated is None for s in series)
            ):
                family.metric = self._built(family, series)
            out.append(family.metric)
        return out

    def _built(self, family: _Family, series: list[_Series]) -> Metric:
        samples: list[Sample] = []
        for one in series:
            if one.accumulated is None:
                one.accumulated = self._accumulated(family, one)
                self.series_accumulated += 1
            samples.extend(one.accumulated)
        metric = Metric(family.name, family.help, family.typ)
        if family.mode:
            metric._multiprocess_mode = family.mode  # type: ignore[attr-defined]
        metric.samples = samples
        return metric

    @staticmethod
    def _accumulated(family: _Family, series: _Series) -> list[Sample]:
        """prometheus_client's accumulation of the series' samples (in the files' order);
        none for a histogram series a worker is still creating (see :func:`_being_made`)."""
        if _being_made(family, series):
            return []
        metric = Metric(family.name, family.help, family.typ)
        summed: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}
        for file, index in series.refs:
            entry = file.entries[index]
            value, timestamp = file.values[2 * index], file.values[2 * index + 1]
            if file.typ == "gauge":
                metric._multiprocess_mode = file.mode  # type: ignore[attr-defined]
                labels = (*entry.labels, ("pid", file.pid))
                metric.add_sample(entry.name, labels, value, timestamp)  # type: ignore[arg-type]
            else:
                summed.setdefault((entry.name, entry.labels), []).append(value)
        # a sample's values across the files added exactly (the library's += in the
        # files' order may round one unit lower once an archive took some in: a drop)
        for (name, labels), values in summed.items():
            metric.add_sample(name, labels, exact_sum(values))  # type: ignore[arg-type]
        merged: Any = MultiProcessCollector._accumulate_metrics(  # type: ignore[no-untyped-call]
            {family.name: metric}, True
        )
        return list(next(iter(merged)).samples)


def _being_made(family: _Family, series: _Series) -> bool:
    """Whether ``series`` is a histogram's that no file holds whole yet: prometheus_client
    adds a new series' entries to a worker's file one at a time (its sum, then its
    buckets up to ``+Inf``, all at 0 until the series is whole), and a merge reading the
    file meanwhile gives a series without its ``+Inf`` bucket and count, which
    OpenMetrics forbids (prometheus_client's own parser refuses the exposition). Left
    out, as a read a moment earlier would have; the next read has it whole."""
    if family.typ != "histogram" or family.whole:
        return False
    # from the end: in a whole series the last entry is one (+Inf comes last in a file)
    return not any(file.entries[index].inf for file, index in reversed(series.refs))
