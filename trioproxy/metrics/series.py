"""The primary series: the ``prometheus_client`` metrics every request updates, and their reads.

* :class:`PrimaryMetrics` declares them (their labels and buckets: :mod:`.schema`). In a
  single process they live in a private ``CollectorRegistry`` (one per collector, never
  the global ``REGISTRY``); with ``PROMETHEUS_MULTIPROC_DIR`` set they are
  prometheus_client's mmap-backed multiprocess values, whose files every read merges
  (:mod:`.multiprocess`).
* :class:`RequestSeries` is the hot path: a finished request is counted into a batch
  with plain arithmetic, and the batch reaches prometheus_client once per counter and
  histogram bucket (:func:`observe_many`).
* :class:`Snapshot` is the series as one read sees them: their values copied on the
  event loop, their totals (:func:`.derived.aggregate`), and their exposition kept until a
  series changes (encoded by :mod:`.exposition`).
"""

from __future__ import annotations

import bisect
import copy
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypedDict

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import values as _values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .derived import Totals, aggregate
from .exposition import SAMPLES_PER_PART, GzipHead, encode_apart, encode_head
from .multiprocess import (
    LOOP_MERGED_BYTES,
    SHARED_FILE_KINDS,
    LocalCounter,
    LocalGauge,
    LocalHistogram,
    compact_dead_workers,
    compaction_due,
    ensure_multiprocess_value_class,
    mark_dead_workers,
    merged_families,
    shared_files_size,
    value_class_is_multiprocess,
)
from .schema import (
    DURATION_LABELS,
    FIRST_BYTE_BUCKETS,
    FLOW_LABELS,
    LATENCY_BUCKETS,
    NO_TOKEN_LABELS,
    NO_TOKEN_REASONS,
    OVERHEAD_BUCKETS,
    REQUEST_DURATION_LABELS,
    REQUEST_LABELS,
    STREAM_LABELS,
    TOKEN_GAP_BUCKETS,
    TOKEN_LABELS,
    UPSTREAM_REASONS,
    WEBSOCKET_CLOSE_REASONS,
)
from .shared_merge import SharedFilesMerge
from .threads import metrics_threads

# ``x_created`` series would double the family count and confuse dashboards (the
# text format emits them as separate gauges); the project never uses them.
prometheus_client.disable_created_metrics()


class _InRegistry(TypedDict):
    """The keyword every series is made with (``**r``)."""

    registry: CollectorRegistry | None


class PrimaryMetrics:
    """The primary series and their hot-path update (``observe``)."""

    def __init__(
        self, *, multiprocess_dir: str | None, version: str, process_metrics: bool = True
    ) -> None:
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir:
            os.makedirs(multiprocess_dir, exist_ok=True)
            ensure_multiprocess_value_class()
            registry: CollectorRegistry | None = None
            counter, gauge, histogram = Counter, Gauge, Histogram
        else:
            registry = CollectorRegistry(auto_describe=False)
            if value_class_is_multiprocess():
                counter, gauge, histogram = LocalCounter, LocalGauge, LocalHistogram
            else:
                counter, gauge, histogram = Counter, Gauge, Histogram
        self.registry = registry
        r: _InRegistry = {"registry": registry}

        self.requests = counter(
            "http_requests_total",
            "HTTP requests handled by the proxy (monitoring endpoints excluded). status is "
            "the effective status: a stream that broke after a success status is 499 "
            "(client cancelled), 504 (timeout) or 502 (upstream error); one whose status "
            "was already >= 400 keeps it (503 when cut by a shutdown, 500 for a fault in "
            "the proxy, a backend's 4xx or 5xx after an early start).",
            REQUEST_LABELS,
            **r,
        )
        self.active = gauge(
            "http_requests_active",
            "Requests in flight, streams until their last byte.",
            multiprocess_mode="livesum",
            **r,
        )
        self.duration = histogram(
            "http_request_duration_seconds",
            'Request duration in seconds, to the last byte for streams (stream="true").',
            REQUEST_DURATION_LABELS,
            buckets=LATENCY_BUCKETS,
            **r,
        )
        self.ttfb = histogram(
            "trioproxy_time_to_first_byte_seconds",
            "Streams only: request start to the first body byte sent to the client.",
            DURATION_LABELS,
            buckets=FIRST_BYTE_BUCKETS,
            **r,
        )
        self.ttft = histogram(
            "trioproxy_time_to_first_token_seconds",
            "Streams only: request start to the first generated content sent.",
            DURATION_LABELS,
            buckets=FIRST_BYTE_BUCKETS,
            **r,
        )
        self.tpot = histogram(
            "trioproxy_time_per_output_token_seconds",
            "Streams only: the time between output tokens, (last token - first token) / "
            "(output tokens - 1), once per stream with two or more tokens.",
            DURATION_LABELS,
            buckets=TOKEN_GAP_BUCKETS,
            **r,
        )
        self.no_first_token = counter(
            "trioproxy_streams_without_first_token_total",
            "Streams that ended before any generated token, by reason "
            "(cancelled|timeout|error, or no_output for a stream that completed empty); "
            "they are in no time-to-first-token observation.",
            NO_TOKEN_LABELS,
            **r,
        )
        self.streams = counter(
            "trioproxy_streams_total",
            "Streamed responses by terminal outcome (completed|cancelled|timeout|error), "
            "exactly one per stream.",
            STREAM_LABELS,
            **r,
        )
        self.chunks = counter(
            "trioproxy_stream_chunks_total",
            "Chunks sent on streamed responses.",
            FLOW_LABELS,
            **r,
        )
        self.stream_bytes = counter(
            "trioproxy_stream_bytes_total",
            "Body bytes sent on streamed responses.",
            FLOW_LABELS,
            **r,
        )
        self.transfer = counter(
            "trioproxy_stream_transfer_seconds_total",
            "Seconds streams' bytes flowed: first token to last byte (first byte without a "
            "token; request start for single-chunk streams); throughput = bytes / this.",
            FLOW_LABELS,
            **r,
        )
        self.tokens_estimated = counter(
            "trioproxy_tokens_estimated_total",
            'The part of trioproxy_tokens_total{type="output"} counted from a stream\'s '
            "content chunks (about one token each) because the backend reported no usage.",
            ("api", "model"),
            **r,
        )
        self.tokens = counter(
            "trioproxy_tokens_total",
            "Tokens by type (input|output): from the backend's usage, else output tokens "
            "counted from the content chunks relayed (also for cancelled streams).",
            TOKEN_LABELS,
            **r,
        )
        self.upstream_duration = histogram(
            "trioproxy_upstream_request_duration_seconds",
            "Backend latency: request sent to the backend until its response completed.",
            FLOW_LABELS,
            buckets=LATENCY_BUCKETS,
            **r,
        )
        self.overhead = histogram(
            "trioproxy_overhead_seconds",
            "The proxy's own time: duration minus backend time (non-streams); first byte "
            "sent minus backend first byte (streams, setup overhead).",
            FLOW_LABELS,
            buckets=OVERHEAD_BUCKETS,
            **r,
        )
        self.upstream_errors = counter(
            "trioproxy_upstream_errors_total",
            "Failed backend calls by reason "
            "(connect|timeout|status_4xx|status_429|status_5xx|protocol|other).",
            ("reason",),
            **r,
        )
        self.upstream_retries = counter(
            "trioproxy_upstream_retries_total",
            "Backend call retries by the reason of the failed attempt.",
            ("reason",),
            **r,
        )
        self.client_requests = counter(
            "trioproxy_client_requests_total",
            "Requests by the client that made them, named by its key (PROXY_API_KEYS); "
            "only with client keys.",
            ("client",),
            **r,
        )
        self.client_tokens = counter(
            "trioproxy_client_tokens_total",
            "Tokens (input|output) by the client whose requests used them; only with client keys.",
            ("client", "type"),
            **r,
        )
        self.build_info = gauge(
            "trioproxy_build_info",
            "Build information; always 1.",
            ("version", "python"),
            # live workers only: after hypercorn starts its workers anew in the same
            # directory (SIGHUP, max_requests) on upgraded code, the old version must go
            multiprocess_mode="livemax",
            **r,
        )
        # the server's counts (hypercorn_patches.ConnectionCap), set when the collector
        # publishes, not per connection
        self.connections_open = gauge(
            "trioproxy_connections_open",
            "Client connections open (idle keep-alive ones included), sum over live "
            "workers; each worker takes at most MAX_CONNECTIONS.",
            multiprocess_mode="livesum",
            **r,
        )
        self.connections_refused = counter(
            "trioproxy_connections_refused_total",
            "New client connections refused with a 503 because their worker held "
            "MAX_CONNECTIONS open connections.",
            **r,
        )
        self.connections_open.set(0)
        # the Responses API's WebSockets (responses_socket): few and long, so updated as
        # each opens and closes, never per message
        self.websockets_open = gauge(
            "trioproxy_websockets_open",
            "Responses API WebSockets open (/v1/responses), sum over live workers; each "
            "also holds one of trioproxy_connections_open.",
            multiprocess_mode="livesum",
            **r,
        )
        self.websockets_closed = counter(
            "trioproxy_websockets_closed_total",
            "Responses API WebSockets closed, by reason (client|idle|shutdown|too_big|"
            "flood|error).",
            ("reason",),
            **r,
        )
        self.websockets_open.set(0)
        self._websocket_closed_children = {
            k: self.websockets_closed.labels(k) for k in WEBSOCKET_CLOSE_REASONS
        }
        # created by the first readiness result (set_backend_up): an unknown state must
        # not read as a backend that is down
        self._new_gauge, self._registry_kw = gauge, r
        self._backend_up: Gauge | None = None
        self._backend_up_value = -1
        # Only with the sampler (system metrics enabled): without one there is no
        # measurement, and a series stuck at 0 would read as one on every dashboard.
        self.rss: Gauge | None = None
        self.cpu_seconds: Counter | None = None
        if process_metrics:
            self.rss = gauge(
                "trioproxy_process_resident_memory_bytes",
                "Resident memory of the proxy (sum over live workers), from the sampler.",
                multiprocess_mode="livesum",
                **r,
            )
            self.cpu_seconds = counter(
                "trioproxy_process_cpu_seconds_total",
                "User+system CPU seconds of the proxy (all workers), from the sampler.",
                **r,
            )
            self.rss.set(0)

        py = "{}.{}.{}".format(*sys.version_info[:3])
        self.build_info.labels(version, py).set(1)
        self._upstream_error_children = {
            k: self.upstream_errors.labels(k) for k in UPSTREAM_REASONS
        }
        self._upstream_retry_children = {
            k: self.upstream_retries.labels(k) for k in UPSTREAM_REASONS
        }
        self.active.set(0)
        # Every family declared above, in order. A worker's mmap file holds only the series
        # that have a value, so the merge of the files knows nothing of a labelled family
        # without samples yet (or ever: the client families without PROXY_API_KEYS); the
        # scrape adds their HELP/TYPE from here, as one process's registry does.
        self._families: list[MetricWrapperBase] = [
            m for m in vars(self).values() if isinstance(m, MetricWrapperBase)
        ]

        # the sampler's series change at every tick (SYSTEM_METRICS_INTERVAL): copied at
        # every snapshot, never kept with the encoding, so a tick makes no scrape encode
        # the request series anew
        # the connection counts too: they change without a request (a scraper's own
        # connection), and must not make the kept encoding stale
        self._sampled: tuple[MetricWrapperBase, ...] = (
            (self.rss, self.cpu_seconds)
            if self.rss is not None and self.cpu_seconds is not None
            else ()
        ) + (self.connections_open, self.connections_refused)
        self._sampled_names = frozenset(d.name for m in self._sampled for d in m.describe())

        self._series: dict[tuple[str, str, str, str, str, str | None], RequestSeries] = {}
        self._touched: list[RequestSeries] = []
        # bumped by every change of a series but the sampler's (``changed``): what the
        # kept part of a snapshot was taken at
        self.version = 0
        self._kept: _Kept | None = None
        # the copied series' lines as last encoded, reused by the next copy's encoding
        self._encodings = SeriesEncodings()
        # with --workers: the merge of the workers' files of each set of kinds read, kept
        # and brought up to date by each read (taken with setdefault: reads run in threads)
        self._shared_merges: dict[tuple[str, ...], SharedFilesMerge] = {}
        # ... and its families but the sampler's, kept with their totals and encoding
        # while the merge gives the same ones
        self._kept_merge: _Kept | None = None

    def changed(self) -> None:
        """A series changed: snapshots taken before are out of date (call after every
        update made outside this class, e.g. the in-flight gauge)."""
        self.version += 1

    def set_backend_up(self, up: bool) -> None:
        """The latest readiness result: the backend answered (any status below 500)."""
        value = 1 if up else 0
        if self._backend_up is not None and self._backend_up_value == value:
            return  # the idle check every 10 s must not make a kept encoding stale
        self._backend_up_value = value
        if self._backend_up is None:
            self._backend_up = self._new_gauge(
                "trioproxy_backend_up",
                "1 when the backend answered the proxy's latest check or request (any "
                "status below 500), 0 when it did not (max over live workers); absent "
                "before the first check.",
                multiprocess_mode="livemax",
                **self._registry_kw,
            )
            self._families.append(self._backend_up)  # what a scrape copies and shows
        self._backend_up.set(value)
        self.changed()

    # -- hot path ----------------------------------------------------------------------

    def series(
        self, api: str, endpoint: str, method: str, model: str, status: str, outcome: str | None
    ) -> RequestSeries:
        """The series of one kind of request (label values already bounded)."""
        key = (api, endpoint, method, model, status, outcome)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = RequestSeries(self, *key)
        return found

    def touched(self, series: RequestSeries) -> None:
        self._touched.append(series)

    def flush(self) -> None:
        """Apply the batch: one update per counter and per histogram bucket touched, not
        one per request (each is a lock-protected value update in prometheus_client)."""
        if self._touched:
            touched, self._touched = self._touched, []
            for series in touched:
                series.apply()
            self.version += 1

    def count_client(self, client: str, input_tokens: int, output_tokens: int) -> None:
        """One request of a named client (few, configured names: not batched)."""
        self.version += 1
        self.client_requests.labels(client).inc()
        if input_tokens:
            self.client_tokens.labels(client, "input").inc(input_tokens)
        if output_tokens:
            self.client_tokens.labels(client, "output").inc(output_tokens)

    def websocket_opened(self) -> None:
        self.version += 1
        self.websockets_open.inc()

    def websocket_closed(self, reason: str) -> None:
        self.version += 1
        self.websockets_open.dec()
        children = self._websocket_closed_children
        children.get(reason, children["error"]).inc()

    def upstream_error(self, reason: str) -> None:
        self.version += 1
        self._upstream_error_children.get(reason, self._upstream_error_children["other"]).inc()

    def upstream_retry(self, reason: str) -> None:
        self.version += 1
        self._upstream_retry_children.get(reason, self._upstream_retry_children["other"]).inc()

    # -- scrape side -------------------------------------------------------------------

    def collect(self) -> list[Metric]:
        """The primary families: this process's, or the merge of every worker's files."""
        self.flush()
        if self.multiprocess_dir:
            return self._merged()
        assert self.registry is not None
        return list(self.registry.collect())

    def _merged(
        self, kinds: tuple[str, ...] = SHARED_FILE_KINDS, compact: bool = False
    ) -> list[Metric]:
        """The merge of the workers' files of ``kinds`` (all: every family) after a
        :meth:`flush`; reads files only (and this object's fixed family list), so it may
        run in a worker thread while the event loop writes this process's file. With
        ``compact`` (in a worker thread only: it writes files and takes a lock), dead
        workers' counter and histogram files are first folded into the archives."""
        assert self.multiprocess_dir is not None
        mark_dead_workers(self.multiprocess_dir)
        if compact:
            compact_dead_workers(self.multiprocess_dir)
        kept = self._shared_merges.get(kinds) or self._shared_merges.setdefault(
            kinds, SharedFilesMerge()
        )
        merged = {m.name: m for m in merged_families(self.multiprocess_dir, kinds, kept)}
        families: list[Metric] = []
        for metric in self._families:
            if metric._type not in kinds:
                continue
            for described in metric.describe():  # no samples: its name, HELP and TYPE
                families.append(merged.pop(described.name, described))
        return [*families, *merged.values()]  # anything else in the files, kept

    async def read_snapshot(self) -> Snapshot:
        """:meth:`snapshot` for the monitoring endpoints: with ``--workers``, merging the
        workers' files from nothing costs about 25 ms per MB of them (a full label budget:
        12.7 MB with two workers, 300 ms), as the first read does and one after new series
        appeared; later reads bring the kept merge up to date (:mod:`.shared_merge`: 9 ms
        at that size). Files larger than :data:`LOOP_MERGED_BYTES` are merged in a worker
        thread, never on the event loop."""
        self.flush()
        if not self.multiprocess_dir:
            return self.snapshot()
        if (
            not self._compaction_due()
            and shared_files_size(self.multiprocess_dir) <= LOOP_MERGED_BYTES
        ):
            return self._merged_snapshot()
        # abandoned when its reader is cancelled (a bounded shared rendering, a shutdown):
        # a hung file read must not hold either; the merge's own lock keeps a later one
        # from running beside it
        return await trio.to_thread.run_sync(
            functools.partial(self._merged_snapshot, compact=True),
            limiter=metrics_threads(),
            abandon_on_cancel=True,
        )

    async def read_counts(self) -> Totals:
        """Totals with only ``requests`` and ``active`` filled in (:meth:`collect_counts`),
        their files merged as :meth:`read_snapshot` merges all of them."""
        self.flush()
        if not self.multiprocess_dir:
            return aggregate(self.collect_counts())
        kinds = (_COUNTER, _GAUGE)  # not the histograms: most of the files
        if not self._compaction_due() and (
            shared_files_size(self.multiprocess_dir, kinds) <= LOOP_MERGED_BYTES
        ):
            return aggregate(self._merged(kinds))
        return await trio.to_thread.run_sync(
            lambda: aggregate(self._merged(kinds, compact=True)),
            limiter=metrics_threads(),
            abandon_on_cancel=True,  # as read_snapshot's
        )

    def _compaction_due(self) -> bool:
        """A dead worker's files wait to be folded in (done in a thread, with the read)."""
        assert self.multiprocess_dir is not None
        return compaction_due(self.multiprocess_dir)

    def snapshot(self) -> Snapshot:
        """The primary series as they are now, for a scrape or a summary.

        In one process, every series' values are copied (plain floats, on the event
        loop: a few ms) and the families are built from the copy only when a scrape
        encodes them, which may be in a worker thread; the totals are aggregated from the
        copy without the histograms' buckets. That part is kept, and serves every read
        until a series changes (``version``), so a scrape of a proxy that counted nothing
        since the last one copies, builds and encodes nothing of it again; only the
        sampler's two series and the connection counts are copied anew each time. In
        multiprocess mode other workers change the files: merged at each read, and the
        rest kept likewise while the merge gives the same families."""
        self.flush()
        if self.multiprocess_dir:
            return self._merged_snapshot()
        kept = self._kept
        if kept is None or kept.version != self.version:
            copied = _copy_series([m for m in self._families if m not in self._sampled])
            sampled = _copy_series(self._sampled)
            if copied is None or sampled is None:
                return self._collected_snapshot()
            totals = aggregate(_build_family(c, buckets=False) for c in copied)
            kept = self._kept = _Kept(self.version, totals, copied)
        else:
            sampled = _copy_series(self._sampled)
            assert sampled is not None  # the same kinds of series were copied before
        return Snapshot.of_kept(kept, tuple(_build_family(c) for c in sampled), self._encodings)

    def _collected_snapshot(self) -> Snapshot:
        families = tuple(self.collect())
        return Snapshot(aggregate(families), families=families)

    def _merged_snapshot(self, compact: bool = False) -> Snapshot:
        """The merge of the workers' files, its families but the sampler's kept with their
        totals and encoding while the merge gives the same ones (a family that changed
        is a new object: :mod:`.shared_merge`); ``compact``: as :meth:`_merged`."""
        merged = self._merged(compact=compact)
        sampled = tuple(m for m in merged if m.name in self._sampled_names)
        families = tuple(m for m in merged if m.name not in self._sampled_names)
        kept = self._kept_merge  # read once: another read may replace it meanwhile
        if kept is None or kept.families is None or not _same_families(kept.families, families):
            kept = self._kept_merge = _Kept(-1, aggregate(families), (), families)
        return Snapshot.of_kept(kept, sampled)

    def collect_counts(self) -> list[Metric]:
        """Just the request counter and the in-flight gauge (what health and filtered
        summaries need); skips the histograms when that is possible (one process)."""
        self.flush()
        if self.multiprocess_dir:
            return self._merged((_COUNTER, _GAUGE))
        return [*self.requests.collect(), *self.active.collect()]


def _same_families(kept: tuple[Metric, ...], merged: tuple[Metric, ...]) -> bool:
    """Whether a merge gave the families kept: the same objects (the kept merge builds a
    family anew when it changed), or both without samples (a family no worker has a
    series of yet is described anew at each read)."""
    if len(kept) != len(merged):
        return False
    for old, new in zip(kept, merged, strict=True):
        if old is new:
            continue
        if old.samples or new.samples:
            return False
        if (old.name, old.type, old.documentation, old.unit) != (
            new.name,
            new.type,
            new.documentation,
            new.unit,
        ):
            return False
    return True


class _Kept:
    """The copied request series at one ``version`` (or, with ``--workers``, the merged
    families), their totals and their exposition in each format asked for so far
    (shared by the snapshots of that version)."""

    __slots__ = ("bodies", "copied", "families", "gzipped", "totals", "version")

    def __init__(
        self,
        version: int,
        totals: Totals,
        copied: tuple[_Copied, ...],
        families: tuple[Metric, ...] | None = None,
    ) -> None:
        self.version = version
        self.totals = totals
        self.copied = copied
        self.families = families
        self.bodies: dict[str, bytes] = {}
        self.gzipped: dict[str, GzipHead] = {}


class Snapshot:
    """The primary series as one read sees them: their totals, their families (built
    from the copied values as they are encoded: :meth:`families` reads nothing else, so
    it may run in a worker thread) with their exposition in each format asked for so
    far (``bodies``, and ``gzipped`` for scrapers that accept gzip), and the sampler's
    families (``sampled``), which are encoded with the derived ones and never kept."""

    def __init__(
        self,
        totals: Totals,
        *,
        families: tuple[Metric, ...] | None = None,
        copied: tuple[_Copied, ...] | None = None,
        bodies: dict[str, bytes] | None = None,
        gzipped: dict[str, GzipHead] | None = None,
        sampled: tuple[Metric, ...] = (),
        encodings: SeriesEncodings | None = None,
    ) -> None:
        self.totals = totals  # shared by the reads of this snapshot: never changed
        self._families = families
        self._copied = copied
        self._encodings = encodings
        # Content-Type -> the families encoded (encode_head), kept while the series are
        self.bodies: dict[str, bytes] = {} if bodies is None else bodies
        # Content-Type -> that encoding gzipped, for scrapers that accept gzip (likewise)
        self.gzipped: dict[str, GzipHead] = {} if gzipped is None else gzipped
        self.sampled = sampled

    @classmethod
    def of_kept(
        cls,
        kept: _Kept,
        sampled: tuple[Metric, ...],
        encodings: SeriesEncodings | None = None,
    ) -> Snapshot:
        totals = kept.totals
        if sampled:
            # a shallow copy: the kept totals are shared by other reads, never changed
            totals = copy.copy(totals)
            fresh = aggregate(sampled)
            totals.rss, totals.cpu_seconds = fresh.rss, fresh.cpu_seconds
        return cls(
            totals,
            families=kept.families,
            copied=kept.copied,
            bodies=kept.bodies,
            gzipped=kept.gzipped,
            sampled=sampled,
            encodings=encodings,
        )

    def encoding_load(self, content_type: str) -> int:
        """What encoding the families for ``content_type`` costs, in samples the library
        encodes (:data:`~.exposition.LOOP_ENCODED_SAMPLES` is its budget on the event
        loop): of a copy, those of series never encoded for it, and a tenth of the rest
        (kept lines are compared and, for the values that changed, rewritten: 289 us for
        a head of 1,451 samples after two requests, 0.2 us a sample against the
        library's ~6)."""
        if self._copied is not None and self._encodings is not None:
            new = self._encodings.unencoded(content_type, self._copied)
            return new + (self.samples - new) // KEPT_LINES_PER_SAMPLE
        return self.samples

    @property
    def samples(self) -> int:
        """How many samples the families hold (what encoding them costs, ~6 us each)."""
        if self._families is not None:
            return sum(len(family.samples) for family in self._families)
        assert self._copied is not None
        # a histogram series: a sample per bucket, its count and its sum
        return sum(len(rows) * (len(bounds) + 2 if bounds else 1)
                   for *_, bounds, rows in self._copied)  # fmt: skip

    def encode(
        self,
        encode: Callable[[Sequence[Metric]], bytes],
        content_type: str,
        between_parts: Callable[[], object] | None = None,
    ) -> bytes:
        """The families encoded as the head of an exposition (:func:`encode_head`): of a
        copy, only the series that changed since the last encoding (:class:`SeriesEncodings`)."""
        if self._copied is not None and self._encodings is not None:
            return self._encodings.encode(encode, content_type, self._copied, between_parts)
        return encode_head(encode, content_type, self.families(), between_parts)

    def families(self) -> Iterator[Metric]:
        """The families, one at a time: built from the copy as they are asked for and
        kept by nothing here, so an encoding holds one family's samples at a time, not
        a scrape's hundreds of thousands (that the garbage collector would go through,
        and the event loop wait for)."""
        if self._families is not None:
            yield from self._families
            return
        assert self._copied is not None
        for copied in self._copied:
            yield _build_family(copied)


_COUNTER, _GAUGE, _HISTOGRAM = "counter", "gauge", "histogram"
# a family's kind, name, HELP, TYPE, unit, label names, bucket bounds (histograms) and
# its series: label values and value (counters, gauges) or (bucket counts, sum)
_Copied = tuple[str, str, str, str, str, tuple[str, ...], tuple[float, ...], list[Any]]


def _copy_series(metrics: Sequence[MetricWrapperBase]) -> tuple[_Copied, ...] | None:
    """The values of every series of ``metrics``, copied as plain floats (call on the
    trio thread, the only one that changes them: the values are read without their
    locks). None where this version of prometheus_client keeps them otherwise (the
    caller collects instead)."""
    copied = []
    try:
        for metric in metrics:
            copied.append(_copy_metric(metric))
    except (AttributeError, TypeError):
        return None
    return tuple(copied)


def _value(value: Any) -> float:
    return value._value if type(value) is _values.MutexValue else value.get()


def _copy_metric(metric: MetricWrapperBase) -> _Copied:
    kind = (
        _HISTOGRAM
        if isinstance(metric, Histogram)
        else _COUNTER
        if isinstance(metric, Counter)
        else _GAUGE
        if isinstance(metric, Gauge)
        else None
    )
    if kind is None:
        raise TypeError(f"no copy of {metric!r}")
    names = tuple(metric._labelnames)
    children: list[tuple[Sequence[str], MetricWrapperBase]]
    if names:
        with metric._lock:
            children = list(metric._metrics.items())
    else:
        children = [((), metric)]
    bounds: tuple[float, ...] = ()
    rows: list[Any] = []
    if kind == _HISTOGRAM:
        bounds = tuple(metric._upper_bounds)  # type: ignore[attr-defined]
        for values, child in children:
            if child._upper_bounds != metric._upper_bounds:  # type: ignore[attr-defined]
                raise TypeError("a child with other buckets")
            buckets = [_value(b) for b in child._buckets]  # type: ignore[attr-defined]
            rows.append((values, buckets, _value(child._sum)))  # type: ignore[attr-defined]
    else:
        for values, child in children:
            rows.append((values, _value(child._value)))  # type: ignore[attr-defined]
    return (
        # the kind is the metric's type (its class's ``_type``, typed as optional)
        kind, metric._name, metric._documentation, kind, metric._unit, names,
        bounds, rows,
    )  # fmt: skip


def _build_family(copied: _Copied, *, buckets: bool = True) -> Metric:
    """The family prometheus_client's ``collect`` gives for the copied values (no
    ``_created`` series: disabled above; no exemplars: the proxy sets none), each bucket
    bound formatted once per family, not once per series; without ``buckets``, only a
    histogram's ``_count`` and ``_sum`` (what :func:`aggregate` reads)."""
    kind, name, documentation, typ, unit, names, bounds, rows = copied
    family = Metric(name, documentation, typ, unit)
    add = family.samples.append
    if kind == _COUNTER or kind == _GAUGE:
        sample = f"{name}_total" if kind == _COUNTER else name
        for values, value in rows:
            add(Sample(sample, dict(zip(names, values, strict=True)), value))
        return family
    # formatted only for the buckets: the totals' copy (no buckets) is made at every change
    les = [floatToGoString(b) for b in bounds] if buckets else []
    bucket, count, total = f"{name}_bucket", f"{name}_count", f"{name}_sum"
    with_sum = bool(bounds) and bounds[0] >= 0
    for values, counts, sum_value in rows:
        labels = dict(zip(names, values, strict=True))
        acc = 0.0
        if buckets:
            for le, n in zip(les, counts, strict=True):
                acc += n
                add(Sample(bucket, {**labels, "le": le}, acc))
        else:
            for n in counts:  # the count as the buckets add up to it
                acc += n
        add(Sample(count, labels, acc))
        if with_sum:
            add(Sample(total, dict(labels), sum_value))
    return family


KEPT_LINES_PER_SAMPLE = 10
"""Samples of series whose lines are kept that cost what one sample the library
encodes does (:meth:`Snapshot.encoding_load`; measured: about 30)."""


class _Encoded(NamedTuple):
    """A series as last encoded."""

    row: Any  # the copied row it was encoded from
    block: bytes  # its lines
    values: list[float]  # its samples' values (:func:`_row_values`)
    lines: list[str] | None  # its lines apart; None: not written from kept parts
    prefixes: list[str] | None  # each line without its value


class SeriesEncodings:
    """Each copied series' lines of the exposition as last encoded, by format, so that a
    head (:func:`~.exposition.encode_head`) made from a new copy costs the library's
    encoder only the series it never encoded before.

    * A series whose values did not change since (a model nobody asked for in a scrape
      interval) reuses its lines, without building its samples.
    * One that changed (under load, every series a request touched: its counter, its
      histograms' buckets and sum, its tokens) is written from its lines as the library
      wrote them, each ``name{labels} value``: a line whose value changed is its part
      before the value, kept, and the value formatted by the library's own
      ``floatToGoString``, as its encoders do (a sample of the proxy's has no timestamp,
      exemplar or native histogram); the others are reused. A series with a line that
      is not that when first encoded goes to the library's encoder every time.
    * A new series is encoded by the library (the changed ones of a family at once).

    The same bytes as encoding the families whole (tested): each sample is one line
    standing alone, a family's samples are its series' in the copy's order, and a
    series' lines depend on its label values and its row only.

    Safe to use from several threads at once (renderings of one format, gzipped or not):
    an entry is replaced whole, never changed, and reused only for a row equal to the
    one it was encoded from."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        # (Content-Type, family name) -> its shape, encoded comment lines and series
        self._last: dict[
            tuple[str, str], tuple[tuple[Any, ...], bytes, dict[tuple[str, ...], _Encoded]]
        ] = {}

    def encode(
        self,
        encode: Callable[[Sequence[Metric]], bytes],
        content_type: str,
        copied: Sequence[_Copied],
        between_parts: Callable[[], object] | None = None,
    ) -> bytes:
        """The families of ``copied`` encoded as :func:`~.exposition.encode_head` does."""
        out: list[bytes] = []
        for family in copied:
            out.extend(self._family(encode, content_type, family, between_parts))
        return b"".join(out)

    def unencoded(self, content_type: str, copied: Sequence[_Copied]) -> int:
        """How many of ``copied``'s samples are in series with no lines kept for
        ``content_type`` to rewrite (what the library's encoder will be given)."""
        count = 0
        for kind, name, _doc, _typ, _unit, _names, bounds, rows in copied:
            kept = self._last.get((content_type, name))
            series = kept[2] if kept is not None else {}
            new = 0
            for row in rows:
                hit = series.get(row[0])
                new += hit is None or hit.prefixes is None
            count += new * (len(bounds) + 2 if kind == _HISTOGRAM else 1)
        return count

    def _family(
        self,
        encode: Callable[[Sequence[Metric]], bytes],
        content_type: str,
        copied: _Copied,
        between_parts: Callable[[], object] | None,
    ) -> list[bytes]:
        kind, name, documentation, typ, unit, names, bounds, rows = copied
        shape = (documentation, typ, unit, names, bounds)
        slot = (content_type, name)
        kept = self._last.get(slot)
        last: dict[tuple[str, ...], _Encoded] = {}
        fresh = kept is None or kept[0] != shape
        if kept is not None and not fresh:
            header, last = kept[1], kept[2]
        else:
            header = encode_apart(encode, content_type, Metric(name, documentation, typ, unit))[0]
        encoded: list[_Encoded] = []
        new: list[int] = []
        for row in rows:
            hit = last.get(row[0])
            if hit is None or hit.prefixes is None:
                new.append(len(encoded))
                encoded.append(_Encoded(row, b"", [], None, None))
            elif _same_row(hit.row, row):
                encoded.append(hit)
            else:
                encoded.append(_rewritten(hit, _row_values(kind, bounds, row), row))
        # a series' lines: one per sample (_build_family's)
        per = 1
        if kind == _HISTOGRAM:
            per = len(bounds) + (2 if bounds and bounds[0] >= 0 else 1)
        step = max(1, SAMPLES_PER_PART // per)
        for start in range(0, len(new), step):
            chunk = new[start : start + step]
            part = _build_family((*copied[:7], [rows[i] for i in chunk]))
            blocks = _blocks(encode_apart(encode, content_type, part)[1], per, len(chunk))
            if blocks is None:  # not a line per sample: encoded whole, kept by nothing
                return [encode_head(encode, content_type, [_build_family(copied)])]
            for index, block in zip(chunk, blocks, strict=True):
                encoded[index] = _split(rows[index], block, _row_values(kind, bounds, rows[index]))
            if between_parts is not None:
                between_parts()
        if fresh or len(last) != len(rows) or any(e is not last.get(e.row[0]) for e in encoded):
            self._last[slot] = (shape, header, {e.row[0]: e for e in encoded})
        return [header, *[e.block for e in encoded]]


def _row_values(kind: str, bounds: tuple[float, ...], row: Any) -> list[float]:
    """A copied row's sample values, in :func:`_build_family`'s order and arithmetic."""
    if kind != _HISTOGRAM:
        return [row[1]]
    _, counts, sum_value = row
    values: list[float] = []
    acc = 0.0
    for n in counts:
        acc += n
        values.append(acc)
    values.append(acc)
    if bounds and bounds[0] >= 0:
        values.append(sum_value)
    return values


def _split(row: Any, block: bytes, values: list[float]) -> _Encoded:
    """A series' lines as the library encoded them, with each line's part before its
    value when every line is that part, a space, the value as the library writes it
    (``floatToGoString``) and a newline."""
    # not splitlines: a label value may hold "\r" or "\u2028", written as they are
    *ended, rest = block.decode().split("\n")
    lines = [f"{line}\n" for line in ended]
    if rest or len(lines) != len(values):
        return _Encoded(row, block, values, None, None)
    prefixes = []
    for line, value in zip(lines, values, strict=True):
        written = f" {floatToGoString(value)}\n"
        if not line.endswith(written):
            return _Encoded(row, block, values, None, None)
        prefixes.append(line[: len(line) - len(written) + 1])
    return _Encoded(row, block, values, lines, prefixes)


def _rewritten(before: _Encoded, values: list[float], row: Any) -> _Encoded:
    """``before``'s series with new ``values``: the lines of the values that changed
    written anew, the others' reused."""
    assert before.lines is not None and before.prefixes is not None
    lines = before.lines.copy()
    for i, (value, old) in enumerate(zip(values, before.values, strict=True)):
        if not _same_value(old, value):
            lines[i] = f"{before.prefixes[i]}{floatToGoString(value)}\n"
    return _Encoded(row, "".join(lines).encode(), values, lines, before.prefixes)


def _same_value(old: float, new: float) -> bool:
    """Whether ``new`` is written as ``old`` was: 0.0 == -0.0, written apart; NaN,
    never equal, is written anew."""
    return old == new and (new != 0.0 or math.copysign(1.0, old) == math.copysign(1.0, new))


def _same_row(old: Any, new: Any) -> bool:
    """Whether a series' copied row encodes as ``old`` did: equal values, and a value
    (or histogram sum) of 0 of the same sign (bucket counts are never -0.0: they add
    whole numbers to 0.0). NaN is equal only to itself, the same object."""
    return old == new and _same_value(old[-1], new[-1])


def _blocks(body: bytes, per: int, count: int) -> list[bytes] | None:
    """``body`` cut into ``count`` runs of ``per`` lines, None when it is not that."""
    blocks: list[bytes] = []
    at = 0
    for _ in range(count):
        end = at
        for _ in range(per):
            end = body.find(b"\n", end) + 1
            if not end:
                return None
        blocks.append(body[at:end])
        at = end
    return blocks if at == len(body) else None


class RequestSeries:
    """The series one kind of request updates, and what the current batch has added to
    them so far.

    A request is counted with :meth:`add` (plain arithmetic, no locks); the batch reaches
    prometheus_client in :meth:`apply`. Series a request may not touch (first byte,
    tokens, backend time) are created on first use, so a scrape never shows series that
    were never observed."""

    __slots__ = (
        "_duration",
        "_flow",
        "_metrics",
        "_no_token",
        "_overhead",
        "_requests",
        "_streams",
        "_tokens_estimated",
        "_tokens_in",
        "_tokens_out",
        "_tpot",
        "_ttfb",
        "_ttft",
        "_upstream",
        "api",
        "chunks",
        "count",
        "durations",
        "endpoint",
        "estimated_tokens",
        "first_bytes",
        "first_tokens",
        "input_tokens",
        "method",
        "model",
        "nbytes",
        "no_token",
        "outcome",
        "output_tokens",
        "overheads",
        "status",
        "token_gaps",
        "transfer",
        "upstreams",
    )  # fmt: skip

    def __init__(
        self,
        metrics: PrimaryMetrics,
        api: str,
        endpoint: str,
        method: str,
        model: str,
        status: str,
        outcome: str | None,
    ) -> None:
        self._metrics = metrics
        self.api, self.endpoint, self.method = api, endpoint, method
        self.model, self.status, self.outcome = model, status, outcome
        self._requests = metrics.requests.labels(api, endpoint, method, model, status)
        self._duration = metrics.duration.labels(
            api, endpoint, model, "false" if outcome is None else "true"
        )
        self._streams = (
            None if outcome is None else metrics.streams.labels(api, endpoint, model, outcome)
        )
        self._ttfb: Any = None
        self._ttft: Any = None
        self._tpot: Any = None
        self._no_token: Any = None
        self._flow: tuple[Any, Any, Any] | None = None
        self._tokens_in: Any = None
        self._tokens_out: Any = None
        self._tokens_estimated: Any = None
        self._upstream: Any = None
        self._overhead: Any = None
        self.count = 0
        self.durations: list[float] = []
        self.first_bytes: list[float] = []
        self.first_tokens: list[float] = []
        self.token_gaps: list[float] = []
        self.no_token = 0
        self.chunks = 0
        self.nbytes = 0
        self.transfer = 0.0
        self.input_tokens = 0
        self.output_tokens = 0
        self.estimated_tokens = 0
        self.upstreams: list[float] = []
        self.overheads: list[float] = []

    def add(
        self,
        duration_s: float,
        first_byte_s: float | None,
        first_token_s: float | None,
        chunks: int,
        nbytes: int,
        transfer_s: float,
        input_tokens: int,
        output_tokens: int,
        upstream_s: float | None,
        overhead_s: float | None,
        token_gap_s: float | None = None,
        no_first_token: bool = False,
        estimated: bool = False,
    ) -> None:
        """Count one finished request into the current batch (``token_gap_s``: a stream's
        time per output token; ``no_first_token``: a stream that ended without one;
        ``estimated``: its output tokens were counted from chunks, not reported). A
        request without a stream is counted into the batch by the collector itself, in
        its batch's loop (``MetricsCollector._count_batch``): no call per record."""
        if not self.count:
            self._metrics.touched(self)
        self.count += 1
        self.durations.append(duration_s)
        if first_byte_s is not None:
            self.first_bytes.append(first_byte_s)
        if first_token_s is not None:
            self.first_tokens.append(first_token_s)
            if token_gap_s is not None:
                self.token_gaps.append(token_gap_s)
        elif no_first_token:
            self.no_token += 1
        if chunks or nbytes:
            self.chunks += chunks
            self.nbytes += nbytes
            self.transfer += transfer_s
        self.input_tokens += input_tokens  # never negative: the collector clamps them
        self.output_tokens += output_tokens
        if estimated:
            self.estimated_tokens += output_tokens
        if upstream_s is not None:
            self.upstreams.append(upstream_s)
        if overhead_s is not None:
            self.overheads.append(overhead_s)

    def apply(self) -> None:
        """Hand the batch to prometheus_client and start a new one."""
        m = self._metrics
        api, endpoint, model = self.api, self.endpoint, self.model
        self._requests.inc(self.count)
        if self._streams is not None:
            self._streams.inc(self.count)
        self.count = 0
        observe_many(self._duration, self.durations)
        self.durations.clear()
        if self.first_bytes:
            if self._ttfb is None:
                self._ttfb = m.ttfb.labels(api, endpoint, model)
            observe_many(self._ttfb, self.first_bytes)
            self.first_bytes.clear()
        if self.first_tokens:
            if self._ttft is None:
                self._ttft = m.ttft.labels(api, endpoint, model)
            observe_many(self._ttft, self.first_tokens)
            self.first_tokens.clear()
        if self.token_gaps:
            if self._tpot is None:
                self._tpot = m.tpot.labels(api, endpoint, model)
            observe_many(self._tpot, self.token_gaps)
            self.token_gaps.clear()
        if self.no_token:
            if self._no_token is None:
                reason = NO_TOKEN_REASONS.get(self.outcome or "", "error")
                self._no_token = m.no_first_token.labels(api, endpoint, model, reason)
            self._no_token.inc(self.no_token)
            self.no_token = 0
        if self.chunks or self.nbytes:
            if self._flow is None:
                self._flow = (
                    m.chunks.labels(api, endpoint),
                    m.stream_bytes.labels(api, endpoint),
                    m.transfer.labels(api, endpoint),
                )
            self._flow[0].inc(self.chunks)
            self._flow[1].inc(self.nbytes)
            if self.transfer > 0.0:
                self._flow[2].inc(self.transfer)
            self.chunks = self.nbytes = 0
            self.transfer = 0.0
        if self.input_tokens:
            if self._tokens_in is None:
                self._tokens_in = m.tokens.labels(api, model, "input")
            self._tokens_in.inc(self.input_tokens)
            self.input_tokens = 0
        if self.output_tokens:
            if self._tokens_out is None:
                self._tokens_out = m.tokens.labels(api, model, "output")
            self._tokens_out.inc(self.output_tokens)
            self.output_tokens = 0
        if self.estimated_tokens:
            if self._tokens_estimated is None:
                self._tokens_estimated = m.tokens_estimated.labels(api, model)
            self._tokens_estimated.inc(self.estimated_tokens)
            self.estimated_tokens = 0
        if self.upstreams:
            if self._upstream is None:
                self._upstream = m.upstream_duration.labels(api, endpoint)
            observe_many(self._upstream, self.upstreams)
            self.upstreams.clear()
        if self.overheads:
            if self._overhead is None:
                self._overhead = m.overhead.labels(api, endpoint)
            observe_many(self._overhead, self.overheads)
            self.overheads.clear()


def observe_many(child: Any, values: list[float]) -> None:
    """``child.observe(v)`` for every value, as one update of the sum and one per bucket.

    prometheus_client has no bulk observe; this uses its histogram's own fields (a pinned
    version; without them it falls back to ``observe``). A value goes to the first bucket
    whose bound is >= it, as ``Histogram.observe`` does; NaN goes to none.

    The values are sorted (in C: a float comparison costs list.sort a few instructions)
    and each bucket touched takes its run of them with two bisections: per value, no
    Python bytecode at all. Counting them one by one in a loop cost ~1,800 instructions
    per value and histogram, most of what a batch cost (docs/performance-history.md)."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            child.observe(value)
        return
    added = sum(values)
    total.inc(added)
    if added != added:  # a NaN among them (or inf - inf): sorting orders nothing there
        _observe_each(bounds, buckets, values)
        return
    ordered = sorted(values)
    size, counted, last = len(ordered), 0, len(bounds)
    while counted < size:
        # the bucket of the smallest value not counted yet, and every value up to its bound
        index = bisect.bisect_left(bounds, ordered[counted])
        if index == last:
            break  # above every bound (no +Inf bucket): observe counts it in none either
        upto = bisect.bisect_right(ordered, bounds[index], counted)
        buckets[index].inc(upto - counted)
        counted = upto


def _observe_each(bounds: Sequence[float], buckets: Sequence[Any], values: list[float]) -> None:
    """The buckets of :func:`observe_many`, value by value (NaN goes to none)."""
    tally: dict[int, int] = {}
    for value in values:
        if value == value:  # not NaN
            index = bisect.bisect_left(bounds, value)
            tally[index] = tally.get(index, 0) + 1
    for index, count in tally.items():
        buckets[index].inc(count)
