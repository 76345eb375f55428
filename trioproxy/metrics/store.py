"""The sliding window of recent requests, the status semantics, and window summaries.

Everything here is plain, synchronous Python: the window is a ring of preallocated
columns (O(1) append, the oldest request is overwritten), touched only from the trio
thread, so it needs no lock.  Recording keeps no object per request alive, only numbers
in arrays and a reference to a shared :class:`RequestKind`; :class:`WindowEntry` objects
are built when the window is read.  Summaries sort on read, never on record.

Status semantics (shared by the counters in :mod:`.series` and the window here):

* **effective status** = ``status_code``, except streams that ended abnormally while the
  status line still said success (or no status was set): cancelled -> 499, timeout -> 504,
  upstream error -> 502.  A stream whose status is already an error (>= 400) keeps it:
  the proxy shutting down sets 503 itself, and a refusal after a response started early
  (``keepalive.EarlyStart``) notes its own status (a backend's 429 stays a 429, a client
  error, as it is without the early start), see ``fastpath``.
* **classes**: success = 2xx/3xx; client_error = 4xx except 499, and 501 (a feature not
  offered, such as Ollama's model management: asking again cannot succeed, and nothing
  failed) and 505 (HTTP Version Not Supported: a client speaking HTTP/2's preface to the
  HTTP/1.1 port, a misconfigured gRPC client or a scanner; nothing of the service failed);
  cancelled = 499; error = the other 5xx and any invalid/unset status (so an unknown
  outcome is never a success), labelled ``status="0"``: so in PromQL errors are exactly
  ``status=~"5..|0", status!~"501|505"`` and client errors
  ``status=~"4..|501|505", status!="499"`` (the dashboard and alerts use these).
* **rates** are taken over the non-cancelled requests: success + error + client_error = 1.
"""

from __future__ import annotations

import collections
import math
import operator
import struct
import time
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from . import labels
from .request import RequestMetrics

SUCCESS = 0
CLIENT_ERROR = 1
CANCELLED = 2
ERROR = 3

CLASS_NAMES = ("success", "client_error", "cancelled", "error")
NOT_IMPLEMENTED = 501
HTTP_VERSION_NOT_SUPPORTED = 505
# the 5xx that are the client's doing, never errors (see the module docstring)
CLIENT_ERROR_5XX = frozenset((NOT_IMPLEMENTED, HTTP_VERSION_NOT_SUPPORTED))

# why a stream produced no token: its outcome, or no_output for one that completed empty
NO_TOKEN_REASONS: dict[str, str] = {
    "completed": "no_output",
    "cancelled": "cancelled",
    "timeout": "timeout",
    "error": "error",
}

_ABNORMAL_STATUS = {
    "cancelled": labels.STATUS_CLIENT_CLOSED,
    "timeout": labels.STATUS_STREAM_TIMEOUT,
    "error": labels.STATUS_STREAM_UPSTREAM_ERROR,
}


def status_class(code: int) -> int:
    """Class of an (effective) status code; see the module docstring."""
    if 200 <= code < 400:
        return SUCCESS
    if code == labels.STATUS_CLIENT_CLOSED:
        return CANCELLED
    if 400 <= code < 500 or code in CLIENT_ERROR_5XX:
        return CLIENT_ERROR
    return ERROR  # 5xx, and 0 / 1xx / >= 600: no valid final status was recorded


def status_label(code: int) -> str:
    """Bounded ``status`` label value: the code itself, or ``"0"`` for anything that is no
    valid final status (none, 1xx, out of range): every error-class code that is not 5xx
    has the one label, so a query can select the error class exactly."""
    return str(code) if 200 <= code <= 599 else "0"


def stream_outcome(m: RequestMetrics) -> str:
    """The single terminal outcome of a stream (``m.streaming`` must be true)."""
    outcome = m.stream_outcome
    if outcome in _ABNORMAL_STATUS or outcome == "completed":
        return outcome
    if m.stream_cancelled:
        return "cancelled"
    if m.stream_timeout:
        return "timeout"
    code = m.status_code
    if code == labels.STATUS_CLIENT_CLOSED:
        return "cancelled"
    if code == labels.STATUS_STREAM_TIMEOUT:
        return "timeout"
    if code >= 500 or (code and code < 100):
        return "error"
    return "completed"


def effective_status(code: int, outcome: str | None) -> int:
    """Status recorded for a request: see the module docstring for the table."""
    if outcome is None or outcome == "completed" or code >= 400:
        return code
    return _ABNORMAL_STATUS[outcome]


def transfer_seconds(m: RequestMetrics) -> float:
    """A stream's transfer time, the denominator of its throughput
    (``RequestMetrics.transfer_ms``: first token -> last byte)."""
    return m.transfer_ms() / 1000.0


def rate(part: float, total: float) -> float:
    return part / total if total > 0 else 0.0


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks: rank = p/100 * (n - 1)."""
    n = len(sorted_values)
    if n == 0:
        return 0.0
    if n == 1:
        return float(sorted_values[0])
    rank = (p / 100.0) * (n - 1)
    lo = int(rank)
    if lo >= n - 1:
        return float(sorted_values[-1])
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[lo + 1] - sorted_values[lo]) * frac


def iso_utc(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat()


class RequestKind(NamedTuple):
    """The bounded labels and status of a request; one shared object per kind."""

    api: str
    endpoint: str
    method: str
    model: str
    status: int  # effective status
    cls: int  # status class
    streaming: bool
    outcome: str | None


@dataclass(slots=True)
class WindowEntry:
    """What the window keeps of one request: bounded labels and numbers, no raw paths."""

    timestamp: float  # wall clock at request start (UTC seconds)
    api: str
    endpoint: str
    method: str
    model: str
    status: int  # effective status
    cls: int  # status class
    duration_ms: float
    streaming: bool
    outcome: str | None
    first_byte_ms: float | None
    first_token_ms: float | None
    chunks: int
    stream_bytes: int
    transfer_s: float
    input_tokens: int
    output_tokens: int
    time_per_output_token_ms: float | None = None  # streams with two or more tokens
    replayed: bool = False  # a stream replaying an earlier response: no first token due


def _floats(size: int) -> array[float]:
    return array("d", bytes(8 * size))


def _nans(size: int) -> array[float]:
    return array("d", _NAN_BYTES) * size


_NAN_BYTES = array("d", [math.nan]).tobytes()
_STREAMING = operator.attrgetter("streaming")


def _ints(size: int) -> array[int]:
    return array("q", bytes(8 * size))


def _packed_floats(values: list[float], start: int, end: int) -> array[float]:
    """``values[start:end]`` as an array, converted by ``struct`` (``PyFloat_AsDouble``
    per value) rather than by ``array``'s own item parsing."""
    return array("d", struct.pack(f"{end - start}d", *values[start:end]))


def _packed_ints(values: list[int], start: int, end: int) -> array[int]:
    return array("q", struct.pack(f"{end - start}q", *values[start:end]))


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else value


class WindowStore:
    """Ring buffer of the last ``max_size`` requests of this process, one column per
    field (a missing first byte or first token is stored as NaN).

    A slot whose request was no stream (or that holds none) has the stream columns at
    what a request without a stream gives them (no first byte, token or gap, no chunk,
    byte or transfer time): :meth:`append_plain_rows` writes only the other columns
    unless the slot held a stream."""

    __slots__ = (
        "_bytes", "_chunks", "_duration", "_first_byte", "_first_token", "_input",
        "_kind", "_next", "_output", "_replayed", "_size", "_timestamp", "_token_gap",
        "_transfer", "max_size",
    )  # fmt: skip

    def __init__(self, max_size: int = 1000) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self.max_size = max_size
        self._next = 0
        self._size = 0
        self._kind: list[RequestKind | None] = [None] * max_size
        self._timestamp = _floats(max_size)
        self._duration = _floats(max_size)
        self._input = _ints(max_size)
        self._output = _ints(max_size)
        self._replayed = bytearray(max_size)
        self._no_streams()

    def _no_streams(self) -> None:
        """The stream columns as no slot holds a stream (see the class doc)."""
        size = self.max_size
        self._first_byte = _nans(size)
        self._first_token = _nans(size)
        self._transfer = _floats(size)
        self._chunks = _ints(size)
        self._bytes = _ints(size)
        self._token_gap = _nans(size)

    def append(
        self,
        kind: RequestKind,
        timestamp: float,
        duration_ms: float,
        first_byte_ms: float,
        first_token_ms: float,
        chunks: int,
        stream_bytes: int,
        transfer_s: float,
        input_tokens: int,
        output_tokens: int,
        token_gap_ms: float = math.nan,
        replayed: bool = False,
    ) -> None:
        """Record one request (``first_byte_ms``/``first_token_ms``/``token_gap_ms``, the
        time per output token: NaN when none). A request that was no stream gives its
        stream columns what :meth:`append_plain_rows` leaves in them (see the class doc)."""
        i = self._next
        self._kind[i] = kind
        self._timestamp[i] = timestamp
        self._duration[i] = duration_ms
        self._first_byte[i] = first_byte_ms
        self._first_token[i] = first_token_ms
        self._chunks[i] = chunks
        self._bytes[i] = stream_bytes
        self._transfer[i] = transfer_s
        self._input[i] = input_tokens
        self._output[i] = output_tokens
        self._token_gap[i] = token_gap_ms
        self._replayed[i] = replayed
        i += 1
        self._next = 0 if i == self.max_size else i
        if self._size < self.max_size:
            self._size += 1

    def append_plain_rows(
        self,
        kinds: list[RequestKind],
        timestamps: list[float],
        durations_ms: list[float],
        input_tokens: list[int],
        output_tokens: list[int],
        replayed: list[bool],
    ) -> None:
        """:meth:`append` for a run of requests that were no stream, given by column (row
        ``r`` of each list is one request; ``kind.streaming`` false): each column is
        written with slice stores in C, not item by item (an ``array`` item store parses
        its value with ``PyArg_Parse``: ~300 machine instructions each). A slot's stream
        columns are written only when it held a stream (see the class doc)."""
        count = len(kinds)
        size = self.max_size
        start = 0
        if count > size:  # only the last ``size`` rows stay; the others would be overwritten
            start = count - size
            self._next = (self._next + start) % size
        while start < count:
            i = self._next
            end = min(count, start + size - i)  # up to the end of the ring, then from 0
            j = i + end - start
            before = self._kind[i:j]
            if any(map(_STREAMING, filter(None, before))):  # in C: no bytecode per slot
                self._clear_streams(i, before)
            self._kind[i:j] = kinds[start:end]
            self._timestamp[i:j] = _packed_floats(timestamps, start, end)
            self._duration[i:j] = _packed_floats(durations_ms, start, end)
            self._input[i:j] = _packed_ints(input_tokens, start, end)
            self._output[i:j] = _packed_ints(output_tokens, start, end)
            self._replayed[i:j] = replayed[start:end]
            self._next = 0 if j == size else j
            start = end
        self._size = min(self._size + count, size)

    def _clear_streams(self, first: int, before: list[RequestKind | None]) -> None:
        """The stream columns of the slots from ``first`` that held a stream, as a request
        without one gives them."""
        for offset, kind in enumerate(before):
            if kind is not None and kind.streaming:
                i = first + offset
                self._first_byte[i] = self._first_token[i] = self._token_gap[i] = math.nan
                self._chunks[i] = self._bytes[i] = 0
                self._transfer[i] = 0.0

    def copy(self) -> WindowStore:
        """A copy of the window as it is now (its columns copied whole: a few ms for a
        million requests), which a worker thread may read while this one changes."""
        copied = WindowStore.__new__(WindowStore)
        for name in self.__slots__:
            value = getattr(self, name)
            setattr(
                copied, name, value[:] if isinstance(value, (list, array, bytearray)) else value
            )
        return copied

    def clear(self) -> None:
        self._next = 0
        self._size = 0
        self._kind = [None] * self.max_size
        self._no_streams()  # no slot holds a stream now (append_plain_rows)

    def __len__(self) -> int:
        return self._size

    @property
    def is_full(self) -> bool:
        return self._size == self.max_size

    def _order(self) -> list[int]:
        """Slot indexes, oldest request first."""
        if self._size < self.max_size:
            return list(range(self._size))
        return [*range(self._next, self.max_size), *range(self._next)]

    def durations(self, last: int | None = None) -> list[float]:
        """Durations (ms) of the newest ``last`` requests (all when None), oldest first."""
        column = self._duration
        if self._size < self.max_size:
            newest = column[: self._size]
        else:  # full: the oldest is at _next
            newest = column[self._next :] + column[: self._next]
        if last is not None and len(newest) > last:
            newest = newest[len(newest) - last :]
        return newest.tolist()

    def entries(
        self,
        endpoint_filter: str | None = None,
        time_range_minutes: float | None = None,
        *,
        now: float | None = None,
    ) -> list[WindowEntry]:
        """Entries oldest -> newest, optionally filtered.

        ``endpoint_filter`` is a case-insensitive substring of the endpoint label (a path
        such as ``/api/chat`` also matches its label).  ``time_range_minutes`` keeps
        requests that started within the last N minutes (plain timestamp subtraction, any
        positive N).
        """
        order = self._order()
        if time_range_minutes is not None:
            cutoff = (time.time() if now is None else now) - float(time_range_minutes) * 60.0
            stamps = self._timestamp
            order = [i for i in order if stamps[i] >= cutoff]
        if endpoint_filter:
            needle = endpoint_filter.lower()
            as_label = labels.endpoint_label(endpoint_filter) if needle.startswith("/") else None
            if as_label == labels.OTHER and endpoint_filter not in labels.ENDPOINT_LABELS:
                as_label = None
            kinds = self._kind
            order = [
                i
                for i in order
                if needle in kinds[i].endpoint.lower()  # type: ignore[union-attr]
                or kinds[i].endpoint == as_label  # type: ignore[union-attr]
            ]
        return [self._entry(i) for i in order]

    def _entry(self, i: int) -> WindowEntry:
        k = self._kind[i]
        assert k is not None
        return WindowEntry(
            self._timestamp[i],
            k.api,
            k.endpoint,
            k.method,
            k.model,
            k.status,
            k.cls,
            self._duration[i],
            k.streaming,
            k.outcome,
            _optional(self._first_byte[i]),
            _optional(self._first_token[i]),
            self._chunks[i],
            self._bytes[i],
            self._transfer[i],
            self._input[i],
            self._output[i],
            _optional(self._token_gap[i]),
            bool(self._replayed[i]),
        )


# --------------------------------------------------------------------------- summaries


def class_counts(entries: Iterable[WindowEntry]) -> list[int]:
    counts = [0, 0, 0, 0]
    for e in entries:
        counts[e.cls] += 1
    return counts


def rates_from_counts(
    success: float, client: float, cancelled: float, error: float
) -> dict[str, Any]:
    total = success + client + cancelled + error
    denom = total - cancelled
    return {
        "success_rate": rate(success, denom),
        "error_rate": rate(error, denom),
        "client_error_rate": rate(client, denom),
    }


def performance(entries: Sequence[WindowEntry]) -> dict[str, float]:
    durations = sorted(e.duration_ms for e in entries)
    if not durations:
        return {
            "avg_duration_ms": 0.0,
            "p50_duration_ms": 0.0,
            "p95_duration_ms": 0.0,
            "p99_duration_ms": 0.0,
            "min_duration_ms": 0.0,
            "max_duration_ms": 0.0,
        }
    return {
        "avg_duration_ms": sum(durations) / len(durations),
        "p50_duration_ms": percentile(durations, 50),
        "p95_duration_ms": percentile(durations, 95),
        "p99_duration_ms": percentile(durations, 99),
        "min_duration_ms": durations[0],
        "max_duration_ms": durations[-1],
    }


def streaming_summary(entries: Iterable[WindowEntry]) -> dict[str, Any]:
    """The summary's ``streaming`` object over window entries: the same keys as the
    all-time one, each figure defined as there (averages over the streams that have the
    figure; streams without a first token by the reason of the Prometheus counter)."""
    streams = [e for e in entries if e.streaming]
    outcomes = collections.Counter(e.outcome for e in streams)
    chunks = sum(e.chunks for e in streams)
    nbytes = sum(e.stream_bytes for e in streams)
    transfer = sum(e.transfer_s for e in streams)
    fb = [e.first_byte_ms for e in streams if e.first_byte_ms is not None]
    ft = [e.first_token_ms for e in streams if e.first_token_ms is not None]
    gaps = [e.time_per_output_token_ms for e in streams if e.time_per_output_token_ms is not None]
    without_token = dict.fromkeys(NO_TOKEN_REASONS.values(), 0)
    for e in streams:
        if e.first_token_ms is None and not e.replayed:
            without_token[NO_TOKEN_REASONS.get(e.outcome or "", "error")] += 1
    return {
        "total_streaming_requests": len(streams),
        "completed_streams": outcomes["completed"],
        "cancelled_streams": outcomes["cancelled"],
        "timeout_streams": outcomes["timeout"],
        "error_streams": outcomes["error"],
        "total_chunks": chunks,
        "total_bytes": nbytes,
        "avg_first_byte_time_ms": sum(fb) / len(fb) if fb else 0.0,
        "avg_first_token_time_ms": sum(ft) / len(ft) if ft else 0.0,
        "avg_time_per_output_token_ms": sum(gaps) / len(gaps) if gaps else 0.0,
        "streams_without_first_token": without_token,
        "avg_throughput_bytes_per_second": nbytes / transfer if transfer > 0 else 0.0,
        "avg_chunk_size": nbytes / chunks if chunks else 0.0,
    }


def endpoints_summary(entries: Iterable[WindowEntry]) -> dict[str, dict[str, Any]]:
    acc: dict[str, dict[str, Any]] = {}
    for e in entries:
        d = acc.get(e.endpoint)
        if d is None:
            d = acc[e.endpoint] = {
                "count": 0,
                "_dur": 0.0,
                "errors": 0,
                "client_errors": 0,
                "cancelled": 0,
                "streaming_requests": 0,
                "_models": set(),
            }
        d["count"] += 1
        d["_dur"] += e.duration_ms
        if e.cls == ERROR:
            d["errors"] += 1
        elif e.cls == CLIENT_ERROR:
            d["client_errors"] += 1
        elif e.cls == CANCELLED:
            d["cancelled"] += 1
        if e.streaming:
            d["streaming_requests"] += 1
        if e.model:
            d["_models"].add(e.model)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(acc):
        d = acc[name]
        out[name] = {
            "count": d["count"],
            "avg_duration_ms": d["_dur"] / d["count"],
            "errors": d["errors"],
            "client_errors": d["client_errors"],
            "cancelled": d["cancelled"],
            "error_rate": rate(d["errors"], d["count"] - d["cancelled"]),
            "streaming_requests": d["streaming_requests"],
            "models": sorted(d["_models"]),
        }
    return out


def period(entries: Sequence[WindowEntry]) -> dict[str, Any]:
    if not entries:
        return {"start": None, "end": None, "duration_seconds": 0.0}
    start = min(e.timestamp for e in entries)
    end = max(e.timestamp for e in entries)
    return {"start": iso_utc(start), "end": iso_utc(end), "duration_seconds": end - start}
