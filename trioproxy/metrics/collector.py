"""The collector: counts each finished request (in batches, see
:meth:`MetricsCollector.record`) into the primary series and the window, and serves the
reads of the monitoring endpoints from them.

The request path calls :meth:`MetricsCollector.request_started` /
:meth:`MetricsCollector.request_finished` with a filled-in :class:`RequestMetrics`; the
monitoring endpoints call :meth:`~MetricsCollector.read_summary`,
:meth:`~MetricsCollector.read_filtered_summary`, :meth:`~MetricsCollector.read_health` and
:meth:`~MetricsCollector.read_prometheus`. The JSON bodies are built in
:mod:`.summary` and :mod:`.health` from what the collector hands them.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import trio
from prometheus_client.metrics_core import Metric

from .. import __version__
from . import labels, store
from .container import ContainerReader, ContainerReading, unknown_container
from .derived import Totals, aggregate, derived_families
from .exposition import (
    LOOP_COMPRESSED_BYTES,
    LOOP_ENCODED_SAMPLES,
    GzipHead,
    TailEncodings,
    exposition_format,
)
from .health import HealthThresholds, health_body, health_thresholds
from .labels import (
    API_LABELS,
    UNTRACKED_PATHS,
    ModelLabels,
    endpoint_label,
    loggable_path,
    loggable_text,
    method_label,
)
from .multiprocess import (
    claim_shared_files,
    multiprocess_dir_from_env,
    warn_if_workers_share_nothing,
)
from .reads import SharedReads
from .request import RequestMetrics
from .series import PrimaryMetrics, RequestSeries, Snapshot
from .store import RequestKind, WindowStore
from .summary import CollectorView, filtered_summary_body, summary_body, time_range
from .system import OFFLOAD_AFTER_SECONDS, SystemSampler, read_io_counters, unmeasured_snapshot
from .threads import metrics_threads

# what the store's int64 columns and a float64 counter hold exactly
_TOKEN_COUNT_LIMIT = 2**53

log = logging.getLogger("trioproxy.metrics")

SLOW_REQUEST_MS = 5000.0
# a window of up to this many requests is read on the event loop (about 5 ms for a
# summary), a larger one from a copy in a worker thread
LOOP_WINDOW_ENTRIES = 5000
# copies of a large window alive at once: each is ~90 bytes per request (25 MB at
# 300,000), and the monitoring endpoints are open to any number of concurrent readers
WINDOW_COPIES = 2
_Read = TypeVar("_Read")
PUBLISH_AFTER_RECORDS = 64
"""Largest batch of finished requests counted together (see ``MetricsCollector.record``)."""
PUBLISH_WITHIN_SECONDS = 0.5
"""Longest a finished request waits to be counted while its worker stays busy."""
# container reads moved to a thread by one slow read come back to the event loop after
# this many in a row took at most FAST_READ_SECONDS each (measured in the thread)
FAST_READS_TO_RETURN = 30
FAST_READ_SECONDS = 0.005

# what a finished record says about its kind: path, api, method, model, status, outcome,
# and the status its stream started with (0: none, or not a stream)
_RawKind = tuple[str, str, str, str, int, str | None, int]
_KINDS_KEPT = 4096  # raw paths and models are unbounded: the kind cache starts over past this
_NAN = math.nan


def _api_for(path: str, endpoint: str) -> str:
    if path.startswith("/"):
        return labels.api_label(path)
    # already a label (the caller passed e.g. "api_chat")
    if endpoint == "root" or endpoint.startswith("api_"):
        return "ollama"
    if endpoint.startswith("v1_messages"):
        return "anthropic"
    if endpoint.startswith("v1_"):
        return "openai"
    return labels.OTHER


def _token_count(count: int | None) -> int:
    """A record's token count as counted: none below zero, nor one past what the store's
    int64 and a float64 counter hold exactly (the Python API takes counts from anyone)."""
    count = count or 0
    return int(count) if 0 <= count < _TOKEN_COUNT_LIMIT else 0


def _time_per_output_token(
    first_token_ms: float | None, last_token_ms: float | None, tokens_seen: int
) -> float | None:
    """Seconds between output tokens over a stream, (last - first) / (tokens - 1): what
    OpenTelemetry's gen_ai.server.time_per_output_token measures, but from the tokens the
    stream carried (its content chunks, about one token each), so neither a trailing usage
    chunk nor reasoning tokens the backend counts but never streams (OpenAI's o-series)
    skew it. None without two of them. A stream of several choices (``n``) counts every
    choice's tokens: the stream's own pace, about 1/n of one choice's gap when they are
    generated side by side (a gap per choice would need each chunk's choice index, read
    on the per-chunk path)."""
    if first_token_ms is None or last_token_ms is None or tokens_seen < 2:
        return None
    span_ms = last_token_ms - first_token_ms
    return span_ms / (tokens_seen - 1) / 1000.0 if span_ms > 0.0 else None


def _log_recorded(kind: store.RequestKind, duration_ms: float, chunks: int) -> None:
    log.debug(
        "metrics: recorded %s %s -> %s [%s] %.1f ms%s",
        kind.method,
        kind.endpoint,
        kind.status,
        store.CLASS_NAMES[kind.cls],
        duration_ms,
        f" stream={kind.outcome} chunks={chunks}" if kind.streaming else "",
    )


def _note_second_collector(mp_dir: str | None, *, asked: bool) -> None:
    """Another collector of this process already writes the shared files: this one keeps
    its values in the process, as with ``multiprocess=False`` (a warning when the caller
    asked for the shared files outright)."""
    log.log(
        logging.WARNING if asked else logging.INFO,
        "metrics: another collector of this process already writes the multiprocess files "
        "in %s; this one counts only its own requests, in this process (see docs/metrics.md)",
        mp_dir,
    )


def _yield_gil() -> None:
    """In a worker thread: let the event loop's thread take the GIL now, if it waits."""
    time.sleep(0)


async def _primary_exposition(
    primary: Snapshot,
    encode: Callable[[Sequence[Metric]], bytes],
    content_type: str,
    *,
    gzip: bool,
) -> tuple[bytes, GzipHead | None]:
    """The primary families encoded as the head of an exposition (:meth:`Snapshot.encode`)
    and, for ``gzip``, compressed (:class:`GzipHead`): taken from the snapshot when it
    holds them (kept until a series changes), else made and kept there. A head costing
    more than :data:`LOOP_ENCODED_SAMPLES` samples (:meth:`Snapshot.encoding_load`) is
    encoded in a worker thread, and compressed there too; one already encoded is
    compressed in a thread when it is over :data:`LOOP_COMPRESSED_BYTES`."""
    head = primary.bodies.get(content_type)
    zipped = primary.gzipped.get(content_type) if gzip else None
    if head is not None and (zipped is not None or not gzip):
        return head, zipped
    if head is None:
        # a few models' head, its lines kept, costs little once encoded: on the loop
        in_thread = primary.encoding_load(content_type) > LOOP_ENCODED_SAMPLES
    else:
        in_thread = len(head) > LOOP_COMPRESSED_BYTES
    encoded = head

    def make() -> tuple[bytes, GzipHead | None]:
        between_parts = _yield_gil if in_thread else None
        made = encoded
        if made is None:
            made = primary.encode(encode, content_type, between_parts)
        # on the loop, compressed at its first use, with that scrape's tail
        return made, (GzipHead(made, ready=in_thread) if gzip else None)

    if in_thread:
        # abandoned at the shared rendering's bound (.reads): it reads only its snapshot
        body, zipped = await trio.to_thread.run_sync(
            make, abandon_on_cancel=True, limiter=metrics_threads()
        )
    else:
        body, zipped = make()
    primary.bodies[content_type] = body
    if zipped is not None:
        primary.gzipped[content_type] = zipped
    return body, zipped


# --------------------------------------------------------------------------- collector


class ConnectionCounts(Protocol):
    """A server's client connections (``hypercorn_patches.ConnectionCap``)."""

    @property
    def open(self) -> int: ...

    @property
    def refused(self) -> int: ...


class MetricsCollector:
    """Counters/histograms (all-time, monotonic) + a sliding window + a system sampler.

    Everything is synchronous and O(1) on the request path; call it from the trio
    thread only (no locks are needed or taken).
    """

    def __init__(
        self,
        max_metrics: int = 1000,
        *,
        enabled: bool = True,
        model_label_limit: int = 50,
        system_interval: float = 5.0,
        system_enabled: bool = True,
        percentile_window: int | None = None,
        multiprocess: bool | None = None,
        multiprocess_dir: str | None = None,
        health_error_rate_degraded: float | None = None,
        health_error_rate_unhealthy: float | None = None,
        health_p95_degraded_seconds: float | None = None,
        health_min_requests: int | None = None,
        health_window_seconds: float | None = None,
        container_root: str = "/",
    ) -> None:
        if max_metrics < 1:
            raise ValueError("max_metrics must be >= 1")
        if percentile_window is not None and percentile_window < 1:
            raise ValueError("percentile_window must be >= 1")
        self.enabled = enabled
        self.max_metrics = max_metrics
        self.percentile_window = min(percentile_window or max_metrics, max_metrics)
        self.system_enabled = system_enabled
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.multiprocess_dir = self._shared_dir(multiprocess, multiprocess_dir)
        # (none given: from the environment, as a collector of the guide's API)
        self.health_thresholds: HealthThresholds = health_thresholds(
            health_error_rate_degraded,
            health_error_rate_unhealthy,
            health_p95_degraded_seconds,
            health_min_requests,
            health_window_seconds,
        )

        self._prom = PrimaryMetrics(
            multiprocess_dir=self.multiprocess_dir,
            version=__version__,
            process_metrics=system_enabled,
        )
        self._window = WindowStore(max_metrics)
        # the proxy's label budget, shared by its workers (or this process's alone)
        self.model_labels = ModelLabels(model_label_limit, shared_dir=self.multiprocess_dir)
        self._inflight = 0
        self._inflight_shown = 0  # what the in-flight gauge says (set when publishing)
        self._pending: list[RequestMetrics] = []
        self._connections: ConnectionCounts | None = None  # (watch_connections)
        self._connections_shown = (0, 0)  # open, refused: what the series say
        # request kind as recorded -> its bounded labels and series, so a batch resolves
        # labels once per kind, not per request; forgotten whenever a model label is minted
        self._kinds: dict[_RawKind, tuple[store.RequestKind, RequestSeries]] = {}
        self._kinds_labelled = self.model_labels.size
        self._cpu_seen = 0.0
        self._sampler = SystemSampler(system_interval, on_sample=self._on_sample)
        if not system_enabled:
            self._sampler.snapshot = unmeasured_snapshot()  # never sampled: null, not 0
        # the container's cgroup figures, read at scrape time (_read_container)
        self._container = ContainerReader(container_root)
        self._container_last: ContainerReading | None = None  # what stop() froze
        self._container_offload = False
        self._container_fast_reads = 0  # in a row, in the thread: see _read_container
        self._tails = TailEncodings()  # a scrape's tail: only the changed families encoded
        self._sampling_stopped = False
        self.backend_reachable: bool | None = None
        self.backend_checked_at: float | None = None
        self._reads = SharedReads()  # the monitoring endpoints' reads (read_prometheus)
        self._window_copies = trio.CapacityLimiter(WINDOW_COPIES)  # (_on_window)
        log.debug(
            "metrics: collector created (enabled=%s, window=%d, multiprocess=%s, "
            "system=%s every %.1fs)",
            enabled,
            max_metrics,
            self.multiprocess_dir,
            system_enabled,
            system_interval,
        )

    def _shared_dir(self, multiprocess: bool | None, multiprocess_dir: str | None) -> str | None:
        """The directory of the workers' shared files this collector writes, or None: its
        values stay in this process (asked for, or another collector of this process
        writes the files already). ``multiprocess=None``: shared when a directory is set."""
        mp_dir = multiprocess_dir or multiprocess_dir_from_env()
        asked = bool(multiprocess)
        if multiprocess is None:
            multiprocess = mp_dir is not None
            if not multiprocess:
                # a private registry: right for one process, wrong under a server's workers
                warn_if_workers_share_nothing()
        if multiprocess and not mp_dir:
            raise ValueError("multiprocess mode needs PROMETHEUS_MULTIPROC_DIR or multiprocess_dir")
        if multiprocess and not claim_shared_files(self):
            _note_second_collector(mp_dir, asked=asked)
            return None
        return mp_dir if multiprocess else None

    # -- hot path ------------------------------------------------------------------------

    def request_started(self) -> None:
        # the in-flight gauge follows at the next publish (every read publishes first)
        if not self.enabled:
            return
        self._inflight += 1

    def request_finished(self, m: RequestMetrics) -> None:
        """The request is no longer in flight; :meth:`record` it (its body, inline: a
        call less per request)."""
        if self._inflight > 0:
            self._inflight -= 1
        if not self.enabled or m.endpoint in UNTRACKED_PATHS:
            return
        if not m.duration_ms:
            m.finish()  # the duration ends now, not when the batch is counted
        pending = self._pending
        pending.append(m)
        if self._inflight == 0 or len(pending) >= PUBLISH_AFTER_RECORDS:
            self.publish()

    def record(self, m: RequestMetrics) -> None:
        """Count one finished request: counters, histograms, the window.
        Monitoring-plane paths (``labels.UNTRACKED_PATHS``) are ignored.

        While requests are in flight, records are counted in batches (see
        :data:`PUBLISH_AFTER_RECORDS`): counting many records in a row costs far less than
        counting each as it comes, because the counting code and its series stay in
        the CPU's caches (docs/performance-history.md). Every read of this collector publishes
        first, so what this process reports is always exact; other workers see a
        record once it is published: when its worker goes idle, after
        :data:`PUBLISH_AFTER_RECORDS` records, or within :data:`PUBLISH_WITHIN_SECONDS`.
        """
        if not self.enabled or m.endpoint in UNTRACKED_PATHS:
            return
        if not m.duration_ms:
            m.finish()  # the duration ends now, not when the batch is counted
        pending = self._pending
        pending.append(m)
        if self._inflight == 0 or len(pending) >= PUBLISH_AFTER_RECORDS:
            self.publish()

    @property
    def pending_records(self) -> int:
        """Finished requests waiting in the current batch (not yet in the series)."""
        return len(self._pending)

    def publish(self) -> None:
        """Count the records waiting in the current batch and show the requests in flight
        (cheap when nothing changed)."""
        if self._inflight_shown != self._inflight:
            self._inflight_shown = self._inflight
            self._prom.active.set(self._inflight)
            self._prom.changed()
        pending = self._pending
        if not pending:
            return
        self._pending = []
        if self._kinds_labelled != self.model_labels.size:
            self._forget_kinds()  # a model was allowed in since: its label may have changed
        self._count_batch(pending, log.isEnabledFor(logging.DEBUG))
        self._prom.flush()

    def _count_batch(self, pending: list[RequestMetrics], debug: bool) -> None:
        """Count a batch of records: their series and window entries, in order.

        A request without a stream, most of them, is counted here, in this loop, not by a
        call per record: each call with its arguments cost ~650 machine instructions of a
        record's few thousand (docs/performance-history.md). Its series' batch is written in
        place (what ``RequestSeries.add`` does with no stream figures) and its window
        row goes into columns, written by :meth:`WindowStore.append_plain_rows` in C. A
        stream goes the general way, :meth:`_count`, once the plain rows before it are
        in the window."""
        kinds = self._kinds
        find = kinds.get
        touched = self._prom.touched
        run: list[RequestKind] = []
        stamps: list[float] = []
        durations: list[float] = []
        inputs: list[int] = []
        outputs: list[int] = []
        replays: list[bool] = []
        for m in pending:
            if m.streaming:
                if run:
                    self._window.append_plain_rows(run, stamps, durations, inputs, outputs, replays)
                    run, stamps, durations, inputs, outputs, replays = [], [], [], [], [], []
                self._count(m, debug)
                continue
            raw = (m.endpoint, m.api, m.method, m.model, m.status_code, None, m.started_status)
            known = find(raw)
            kind, series = known if known is not None else self._new_kind(raw)
            duration_ms = m.duration_ms if m.duration_ms > 0.0 else 0.0
            inp = m.input_tokens
            if type(inp) is not int or not 0 <= inp < _TOKEN_COUNT_LIMIT:
                inp = _token_count(inp)
            out = m.output_tokens
            if type(out) is not int or not 0 <= out < _TOKEN_COUNT_LIMIT:
                out = _token_count(out)
            if not series.count:
                touched(series)
            series.count += 1
            series.durations.append(duration_ms / 1000.0)
            series.input_tokens += inp
            series.output_tokens += out
            if m.tokens_counted:
                series.estimated_tokens += out
            up_ms = m.upstream_ms
            if up_ms is not None:
                # the client's upload time is not the proxy's, as in X-Proxy-Overhead-Ms
                own_ms = duration_ms - up_ms - m.body_wait_ms
                series.upstreams.append((up_ms if up_ms > 0.0 else 0.0) / 1000.0)
                series.overheads.append((own_ms if own_ms > 0.0 else 0.0) / 1000.0)
            if m.client:
                self._prom.count_client(m.client, inp, out)
            run.append(kind)
            stamps.append(m.timestamp)
            durations.append(duration_ms)
            inputs.append(inp)
            outputs.append(out)
            replays.append(m.replayed)
            if debug:
                _log_recorded(kind, duration_ms, 0)
        if run:
            self._window.append_plain_rows(run, stamps, durations, inputs, outputs, replays)

    def _count(self, m: RequestMetrics, debug: bool) -> None:
        """Count one record the general way: its series (every figure passed) and its full
        window row. Streams are counted so; a record without a stream is counted by
        :meth:`_count_batch`, to the same effect (tests/test_metrics_plain_path.py)."""
        streaming = m.streaming
        outcome = store.stream_outcome(m) if streaming else None
        raw = (m.endpoint, m.api, m.method, m.model, m.status_code, outcome, m.started_status)
        known = self._kinds.get(raw)
        kind, series = known if known is not None else self._new_kind(raw)
        duration_ms = m.duration_ms if m.duration_ms > 0.0 else 0.0
        inp = _token_count(m.input_tokens)
        out = _token_count(m.output_tokens)
        up_ms = m.upstream_ms
        if streaming:
            fb = m.first_byte_time_ms
            ft = m.first_token_time_ms
            token_gap_s = _time_per_output_token(ft, m.last_token_time_ms, m.token_chunks)
            transfer_s = store.transfer_seconds(m)
            chunks = m.total_chunks
            nbytes = m.stream_bytes
            overhead_ms = m.overhead_ms
        else:
            fb = ft = token_gap_s = None
            transfer_s = 0.0
            chunks = nbytes = 0
            # the client's upload time is not the proxy's, as in X-Proxy-Overhead-Ms
            overhead_ms = None if up_ms is None else duration_ms - up_ms - m.body_wait_ms
        series.add(
            duration_ms / 1000.0,
            fb / 1000.0 if fb is not None else None,
            ft / 1000.0 if ft is not None else None,
            chunks,
            nbytes,
            transfer_s,
            inp,
            out,
            (up_ms if up_ms > 0.0 else 0.0) / 1000.0 if up_ms is not None else None,
            (overhead_ms if overhead_ms > 0.0 else 0.0) / 1000.0
            if overhead_ms is not None
            else None,
            token_gap_s,
            streaming and ft is None and not m.replayed,
            m.tokens_counted,
        )
        if m.client:
            self._prom.count_client(m.client, inp, out)
        self._window.append(
            kind,
            m.timestamp,
            duration_ms,
            fb if fb is not None else _NAN,
            ft if ft is not None else _NAN,
            chunks,
            nbytes,
            transfer_s,
            inp,
            out,
            token_gap_s * 1000.0 if token_gap_s is not None else _NAN,
            m.replayed,
        )
        if debug:
            _log_recorded(kind, duration_ms, chunks)

    def _new_kind(self, raw: _RawKind) -> tuple[store.RequestKind, RequestSeries]:
        """Bounded labels and series for a request kind not seen before (or forgotten)."""
        path, api_hint, raw_method, raw_model, raw_status, outcome, started = raw
        endpoint = endpoint_label(path)
        api = api_hint if api_hint in API_LABELS else _api_for(path, endpoint)
        method = method_label(raw_method)
        code = store.effective_status(raw_status, outcome)
        # the backend accepted the model when the response started 2xx: for a stream, the
        # status its first byte went out with (a stream the shutdown cut is a 503 by now);
        # failing requests never mint a model label
        accepted = started or raw_status
        model = self.model_labels.label(raw_model, succeeded=200 <= accepted < 300)
        if self._kinds_labelled != self.model_labels.size or len(self._kinds) >= _KINDS_KEPT:
            self._forget_kinds()
        kind = store.RequestKind(
            api, endpoint, method, model, code, store.status_class(code), outcome is not None,
            outcome,
        )  # fmt: skip
        series = self._prom.series(api, endpoint, method, model, store.status_label(code), outcome)
        self._kinds[raw] = found = (kind, series)
        return found

    def _forget_kinds(self) -> None:
        self._kinds.clear()
        self._kinds_labelled = self.model_labels.size

    async def record_request(self, m: RequestMetrics) -> None:
        """The monitoring guide's API: :meth:`record`, plus a warning for failed or slow
        requests (never an INFO line per request)."""
        self.record(m)
        if not self.enabled:
            return
        # method, path and error can come from clients or backends: escaped, one line each
        if m.error or (m.status_code >= 500 and m.status_code not in store.CLIENT_ERROR_5XX):
            log.warning(
                "metrics: request failed: %s %s -> %s (%s)",
                loggable_path(m.method),
                loggable_path(m.endpoint),
                m.status_code,
                loggable_text(m.error) if m.error else "no error message",
            )
        elif m.duration_ms > SLOW_REQUEST_MS:
            log.warning(
                "metrics: slow request: %s %s took %.0f ms",
                loggable_path(m.method),
                loggable_path(m.endpoint),
                m.duration_ms,
            )

    def websocket_opened(self) -> None:
        """A Responses API WebSocket was accepted (``trioproxy_websockets_open``)."""
        if self.enabled:
            self._prom.websocket_opened()

    def websocket_closed(self, reason: str) -> None:
        """It closed, for ``reason`` (:data:`.schema.WEBSOCKET_CLOSE_REASONS`)."""
        if self.enabled:
            self._prom.websocket_closed(reason)

    def upstream_error(self, reason: str) -> None:
        if self.enabled:
            self._prom.upstream_error(reason)

    def upstream_retry(self, reason: str) -> None:
        if self.enabled:
            self._prom.upstream_retry(reason)

    def set_backend_status(self, reachable: bool, checked_at: float) -> None:
        self.backend_reachable = bool(reachable)
        self.backend_checked_at = checked_at
        self._prom.set_backend_up(reachable)

    def allow_model(self, model: str) -> None:
        """Give ``model`` its own label from the start (e.g. from the model mapping).
        Requests already finished keep the label they had when they finished."""
        self.publish()
        self.model_labels.allow(model)

    # -- reads -----------------------------------------------------------------------------

    @property
    def uptime_seconds(self) -> float:
        return time.monotonic() - self._started_mono

    @property
    def sampler(self) -> SystemSampler:
        return self._sampler

    @property
    def window(self) -> WindowStore:
        self.publish()
        return self._window

    def totals(self) -> Totals:
        """All-time totals from the primary series (every worker's, in multiprocess mode)."""
        return copy.deepcopy(self._totals())

    def _totals(self) -> Totals:
        """:meth:`totals`, shared while no series changes: read it, never change it."""
        self.publish()
        return self._prom.snapshot().totals

    def _count_totals(self) -> Totals:
        """Only ``requests`` and ``active`` are filled in (cheaper than :meth:`totals`)."""
        self.publish()
        return aggregate(self._prom.collect_counts())

    def _system_snapshot(self) -> dict[str, Any]:
        s = self._sampler
        if (
            self.system_enabled
            and not self._sampling_stopped
            and not s.running
            and (s.samples == 0 or time.monotonic() - s.last_sample_at >= s.interval)
        ):
            # the sampler task is not running (not started, or used outside an app): sample
            # on read instead, at most once per interval
            s.sample_once()
        return s.snapshot

    def _host_io(self, snap: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The host's network and disk counters: the kernel's, read now (cheap ``/proc``
        reads), so every worker reports the same ever-growing totals; a worker's own
        periodic sample would be older or newer than another's and the counters would go
        back and forth between scrapes. Frozen with the sampler (:meth:`stop`); ``None``
        values when system metrics are disabled."""
        if self.system_enabled and not self._sampling_stopped:
            return read_io_counters()
        return snap["network_io"], snap["disk_io"]

    def _container_reading(self) -> ContainerReading | None:
        """The container's cgroup figures, read now (a few small files, about 0.1 ms):
        the same for every worker, and the kernel's counters never go down whichever
        worker answers. None when system metrics are disabled or no cgroup was found;
        frozen with the sampler (:meth:`stop`)."""
        if self.system_enabled and not self._sampling_stopped:
            self._container_last = self._container.read()
        return self._container_last

    async def _read_container(self) -> ContainerReading | None:
        """:meth:`_container_reading` for the monitoring endpoints: in a worker thread
        the first read (it parses the mount table, which a node with thousands of mounts
        makes megabytes long) and the reads after one that took longer than
        ``OFFLOAD_AFTER_SECONDS`` (a cgroup filesystem that stalls must not hold the event
        loop), as the sampler does. A read held up once only because the machine ran
        another process meanwhile looks the same; so after ``FAST_READS_TO_RETURN`` quick
        reads in a row in the thread they come back to the loop, where one costs less."""
        reader = self._container
        in_thread = self._container_offload or not reader.located
        if not in_thread or not self.system_enabled or self._sampling_stopped:
            reading = self._container_reading()
            if reader.last_read_seconds > OFFLOAD_AFTER_SECONDS:
                self._container_offload = True
                self._container_fast_reads = 0
            return reading
        reading = await trio.to_thread.run_sync(
            reader.read, abandon_on_cancel=True, limiter=metrics_threads()
        )
        if reader.last_read_seconds > FAST_READ_SECONDS:
            self._container_fast_reads = 0
        else:
            self._container_fast_reads += 1
            if self._container_fast_reads >= FAST_READS_TO_RETURN:
                self._container_offload = False
        if not self._sampling_stopped:  # stop() may have come meanwhile: keep what it froze
            self._container_last = reading
        return self._container_last

    def _system_block(self, container: ContainerReading | None) -> dict[str, Any]:
        snap = self._system_snapshot()
        network_io, disk_io = self._host_io(snap)
        window = self._window
        block: dict[str, Any] = {
            "buffer_size": len(window),
            "buffer_full": window.is_full,
            "max_buffer_size": window.max_size,
            "uptime_seconds": self.uptime_seconds,
        }
        block.update(snap)
        block["network_io"] = dict(network_io)
        block["disk_io"] = dict(disk_io)
        block["process"] = dict(snap["process"])
        block["container"] = unknown_container() if container is None else container.as_json()
        block["sampler"] = {
            "enabled": self.system_enabled and not self._sampling_stopped,
            "running": self._sampler.running,
            "interval_seconds": self._sampler.interval,
            "samples": self._sampler.samples,
        }
        return block

    async def _on_window(self, read: Callable[[WindowStore], _Read]) -> _Read:
        """``read(window)``: on the event loop for a window of up to
        :data:`LOOP_WINDOW_ENTRIES` requests, else on a copy of it in a worker thread
        (at the largest ``METRICS_MAX_REQUESTS``, a summary of the window took the loop
        3 s; the copy is a few ms). ``read`` must change nothing."""
        window = self._window
        if len(window) <= LOOP_WINDOW_ENTRIES:
            return read(window)
        # the copy is made once a slot is free, and kept only while its thread reads it:
        # N concurrent readers made N copies before waiting for a thread
        async with self._window_copies:
            copied = self._window.copy()
            return await trio.to_thread.run_sync(read, copied, limiter=metrics_threads())

    def _view(self) -> CollectorView:
        """What the JSON bodies say of this collector, as it is now."""
        return CollectorView(
            enabled=self.enabled,
            uptime_seconds=self.uptime_seconds,
            percentile_window=self.percentile_window,
            backend_reachable=self.backend_reachable,
            backend_checked_at=self.backend_checked_at,
        )

    def summary(self) -> dict[str, Any]:
        """Body of ``GET /v1/metrics``: all-time totals (aggregated) + window figures."""
        t = self._totals()  # publishes the pending batch first
        system = self._system_block(self._container_reading())
        return summary_body(self._view(), t, system, self._window)

    async def read_summary(self) -> dict[str, Any]:
        """:meth:`summary` for the monitoring endpoints: with ``--workers`` the workers'
        files are merged off the event loop, and concurrent reads share the merge; a
        large window is read off the loop (:meth:`_on_window`)."""
        t = await self._read_totals()
        system = self._system_block(await self._read_container())
        view = self._view()
        return await self._on_window(lambda window: summary_body(view, t, system, window))

    async def _read_totals(self) -> Totals:
        self.publish()
        # SharedReads gives what the key's render gives (typed Any: one round, any key)
        snap: Snapshot = await self._reads.read(("totals",), self._prom.read_snapshot)
        return snap.totals

    async def _read_counts(self) -> Totals:
        self.publish()
        counts: Totals = await self._reads.read(("counts",), self._prom.read_counts)
        return counts

    def filtered_summary(
        self,
        endpoint_filter: str | None = None,
        time_range_minutes: float | None = None,
        include_system_metrics: bool = True,
    ) -> dict[str, Any]:
        """Window figures for the requests matching the filters (this process's window)."""
        minutes = time_range(time_range_minutes)
        t = self._count_totals()  # publishes the pending batch first
        system = self._system_block(self._container_reading()) if include_system_metrics else None
        return filtered_summary_body(
            self._view(), endpoint_filter, minutes, t, system, self._window
        )

    async def read_filtered_summary(
        self,
        endpoint_filter: str | None = None,
        time_range_minutes: float | None = None,
        include_system_metrics: bool = True,
    ) -> dict[str, Any]:
        """:meth:`filtered_summary` for the monitoring endpoints (see :meth:`read_summary`)."""
        minutes = time_range(time_range_minutes)
        t = await self._read_counts()
        system = None
        if include_system_metrics:
            system = self._system_block(await self._read_container())
        view = self._view()
        return await self._on_window(
            lambda window: filtered_summary_body(view, endpoint_filter, minutes, t, system, window)
        )

    def health(self) -> tuple[dict[str, Any], int]:
        """Body and HTTP status of ``GET /v1/metrics/health`` (503 only when unhealthy)."""
        t = self._count_totals()
        return health_body(self._view(), self.health_thresholds, t, self._window, time.time())

    async def read_health(self) -> tuple[dict[str, Any], int]:
        """:meth:`health` for the monitoring endpoints (see :meth:`read_summary`)."""
        t = await self._read_counts()
        view, thresholds, now = self._view(), self.health_thresholds, time.time()
        return await self._on_window(lambda window: health_body(view, thresholds, t, window, now))

    def render_prometheus(self, accept: str | None = None) -> tuple[bytes, str]:
        """Exposition body and Content-Type (text 0.0.4 unless the scraper asks for
        OpenMetrics). The monitoring endpoints use :meth:`read_prometheus`."""
        encode, content_type = exposition_format(accept)
        primary, derived = self._prometheus_families()
        return encode([*primary.families(), *primary.sampled, *derived]), content_type

    def _prometheus_families(self) -> tuple[Snapshot, list[Metric]]:
        """Every family of a scrape as it is now: the primary families (a snapshot that
        nothing changes later: encoders may read it in another thread) and the derived
        ones, built for this scrape."""
        system = self._system_snapshot()  # first: a lazy first sample also feeds RSS/CPU
        self.publish()
        self._publish_connections()
        durations = sorted(self._window.durations(self.percentile_window))
        container = self._container_reading()
        return self._with_derived(self._prom.snapshot(), system, durations, container)

    async def _read_prometheus_families(self) -> tuple[Snapshot, list[Metric]]:
        """:meth:`_prometheus_families`, the workers' files merged as
        :meth:`PrimaryMetrics.read_snapshot` merges them."""
        system = self._system_snapshot()
        self.publish()
        self._publish_connections()
        primary = await self._prom.read_snapshot()
        last = self.percentile_window
        durations = await self._on_window(lambda window: sorted(window.durations(last)))
        container = await self._read_container()
        return self._with_derived(primary, system, durations, container)

    def _with_derived(
        self,
        primary: Snapshot,
        system: dict[str, Any],
        durations: list[float],
        container: ContainerReading | None,
    ) -> tuple[Snapshot, list[Metric]]:
        host = system if self.system_enabled else None  # disabled: absent, not 0
        io = self._host_io(system) if host is not None else None
        derived = derived_families(
            primary.totals, durations, host, self.uptime_seconds, io, container
        )
        return primary, derived

    async def read_prometheus(
        self, accept: str | None = None, *, gzip: bool = False
    ) -> tuple[bytes, str]:
        """:meth:`render_prometheus` for the monitoring endpoints, gzipped when ``gzip``
        (what Prometheus asks for), at a cost no number of scrapers multiplies
        (docs/metrics.md, "What a scrape costs"):

        * concurrent scrapes of one format and coding share renderings
          (:class:`~.reads.SharedReads`: at most two for any number of scrapers, each
          including every request finished before it arrived);
        * the primary families' exposition, nearly all of the body and of its cost, is
          encoded (and compressed) in a worker thread, off the event loop, from a snapshot;
        * and it is kept with the snapshot, compressed too once a scraper asked for gzip:
          until a series changes (a request is counted), a scrape encodes and compresses
          only the few families derived for it (:class:`~.exposition.GzipHead`)."""
        encode, content_type = exposition_format(accept)

        async def render() -> bytes:
            # counts what finished before any checkpoint
            primary, derived = await self._read_prometheus_families()
            head, zipped = await _primary_exposition(primary, encode, content_type, gzip=gzip)
            tail = self._tails.encode(encode, content_type, [*primary.sampled, *derived])
            return head + tail if zipped is None else zipped.finish(tail)

        body = await self._reads.read(("prometheus", content_type, gzip), render)
        return body, content_type

    # -- lifecycle ---------------------------------------------------------------------------

    async def run_system_sampler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the psutil sampler until cancelled (or :meth:`stop`); start it in the app's
        nursery: ``await app.nursery.start(collector.run_system_sampler)``."""
        if not self.system_enabled or self._sampling_stopped:
            task_status.started()
            return
        await self._sampler.run(task_status=task_status)

    async def run_publisher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Publish the pending batch every :data:`PUBLISH_WITHIN_SECONDS` until cancelled,
        so a busy worker's counts reach the other workers' scrapes in time; the last batch
        is published on the way out."""
        task_status.started()
        try:
            while True:
                await trio.sleep(PUBLISH_WITHIN_SECONDS)
                # names other workers admitted: relabel the kinds cached as "other"
                self.model_labels.refresh()
                self.publish()
                self._publish_connections()
        finally:
            self.publish()
            self._publish_connections()

    def watch_connections(self, counts: ConnectionCounts) -> None:
        """Show the server's connection counts (``trioproxy_connections_*``): read when the
        collector publishes (every :data:`PUBLISH_WITHIN_SECONDS`) and at each scrape."""
        self._connections = counts

    def _publish_connections(self) -> None:
        counts = self._connections
        if counts is None:
            return
        now = (counts.open, counts.refused)
        shown, self._connections_shown = self._connections_shown, now
        if now[0] != shown[0]:
            self._prom.connections_open.set(now[0])
        if now[1] > shown[1]:
            self._prom.connections_refused.inc(now[1] - shown[1])

    def stop(self) -> None:
        """Stop system sampling (the sampler loop returns; system values stay frozen).
        Request metrics keep being recorded."""
        self._sampling_stopped = True
        self._sampler.stop()
        log.debug("metrics: system sampling stopped")

    def reset(self) -> None:
        """Clear the window (percentiles, filters, period).  Counters are monotonic since
        process start and are never reset."""
        self.publish()
        self._window.clear()
        log.debug("metrics: window cleared")

    def _on_sample(self, snap: dict[str, Any]) -> None:
        rss, cpu_seconds = self._prom.rss, self._prom.cpu_seconds
        if rss is None or cpu_seconds is None:  # system metrics disabled: no such series
            return
        proc = snap["process"]
        rss.set(proc["rss_bytes"])
        cpu = proc["cpu_seconds"]
        if cpu > self._cpu_seen:
            cpu_seconds.inc(cpu - self._cpu_seen)
            self._cpu_seen = cpu
        # no ``changed()``: the sampler's series are copied at every snapshot
