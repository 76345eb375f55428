"""What is computed from the primary series when they are read, never per request.

:func:`aggregate` turns the collected primary families (one process's, or every worker's
merged) into :class:`Totals`; the JSON summary and the derived Prometheus families are
both computed from them, so they agree with each other and, with ``--workers``, across
workers. :func:`derived_families` builds the monitoring guide's families (rates,
per-endpoint, streaming, window percentiles) and the host's and container's ones for a
scrape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import store
from .container import ContainerReading
from .schema import (
    DURATION_LABELS,
    FLOW_LABELS,
    REQUEST_LABELS,
    STREAM_LABELS,
    TOKEN_LABELS,
    UPSTREAM_REASONS,
)

_NAN = float("nan")  # an average of nothing yet: no value, where 0 would read as a measurement


# --------------------------------------------------------------------------- aggregation


@dataclass
class Totals:
    """All-time values of the primary families (summed over workers in multiprocess mode)."""

    # keyed by label values, in the order of the family's label names (``_key``)
    requests: dict[tuple[str, ...], float] = field(default_factory=dict)
    active: float = 0.0
    duration: dict[tuple[str, ...], list[float]] = field(default_factory=dict)  # [sum, n]
    ttfb: list[float] = field(default_factory=lambda: [0.0, 0.0])
    ttft: list[float] = field(default_factory=lambda: [0.0, 0.0])
    tpot: list[float] = field(default_factory=lambda: [0.0, 0.0])
    no_first_token: dict[str, float] = field(default_factory=dict)  # by reason
    streams: dict[tuple[str, ...], float] = field(default_factory=dict)
    chunks: dict[tuple[str, ...], float] = field(default_factory=dict)
    stream_bytes: dict[tuple[str, ...], float] = field(default_factory=dict)
    transfer: dict[tuple[str, ...], float] = field(default_factory=dict)
    tokens: dict[tuple[str, ...], float] = field(default_factory=dict)
    tokens_estimated: float = 0.0
    clients: dict[str, dict[str, float]] = field(default_factory=dict)
    upstream_errors: dict[str, float] = field(default_factory=dict)
    upstream_retries: dict[str, float] = field(default_factory=dict)
    rss: float = 0.0
    cpu_seconds: float = 0.0

    # -- views ---------------------------------------------------------------------------

    def class_counts(self) -> list[float]:
        counts = [0.0, 0.0, 0.0, 0.0]
        for key, v in self.requests.items():
            counts[store.status_class(int(key[4]))] += v
        return counts

    @property
    def total_requests(self) -> float:
        return sum(self.requests.values())

    def stream_outcomes(self) -> dict[str, float]:
        out = {"completed": 0.0, "cancelled": 0.0, "timeout": 0.0, "error": 0.0}
        for key, v in self.streams.items():
            out[key[3]] = out.get(key[3], 0.0) + v
        return out

    def endpoints(self) -> dict[str, dict[str, Any]]:
        acc: dict[str, dict[str, Any]] = {}

        def get(ep: str) -> dict[str, Any]:
            d = acc.get(ep)
            if d is None:
                d = acc[ep] = {
                    "classes": [0.0, 0.0, 0.0, 0.0],
                    "dur": [0.0, 0.0],
                    "streams": 0.0,
                    "models": set(),
                }
            return d

        for (_api, ep, _m, model, status), v in self.requests.items():
            d = get(ep)
            d["classes"][store.status_class(int(status))] += v
            if model:
                d["models"].add(model)
        for (_api, ep, _model), (s, n) in self.duration.items():
            d = get(ep)
            d["dur"][0] += s
            d["dur"][1] += n
        for (_api, ep, _model, _outcome), v in self.streams.items():
            get(ep)["streams"] += v
        return acc

    def models(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (_a, _e, _m, model, _s), v in self.requests.items():
            if model:
                d = out.setdefault(model, {"count": 0.0, "input_tokens": 0.0, "output_tokens": 0.0})
                d["count"] += v
        for (_a, model, typ), v in self.tokens.items():
            if model:
                d = out.setdefault(model, {"count": 0.0, "input_tokens": 0.0, "output_tokens": 0.0})
                d[f"{typ}_tokens"] = d.get(f"{typ}_tokens", 0.0) + v
        return out

    def tokens_by_type(self) -> dict[str, float]:
        out = {"input": 0.0, "output": 0.0}
        for (_a, _m, typ), v in self.tokens.items():
            out[typ] = out.get(typ, 0.0) + v
        return out


def _key(labels: dict[str, str], names: Sequence[str]) -> tuple[str, ...]:
    return tuple(labels.get(n, "") for n in names)


def aggregate(families: Iterable[Metric]) -> Totals:
    t = Totals()
    for fam in families:
        name = fam.name
        if name == "http_requests":
            for s in fam.samples:
                if s.name == "http_requests_total":
                    k = _key(s.labels, REQUEST_LABELS)
                    t.requests[k] = t.requests.get(k, 0.0) + s.value
        elif name == "http_requests_active":
            t.active = sum(s.value for s in fam.samples)
        elif name == "http_request_duration_seconds":
            for s in fam.samples:
                if s.name.endswith("_sum") or s.name.endswith("_count"):
                    k = _key(s.labels, DURATION_LABELS)
                    acc = t.duration.setdefault(k, [0.0, 0.0])
                    acc[0 if s.name.endswith("_sum") else 1] += s.value
        elif name in (
            "trioproxy_time_to_first_byte_seconds",
            "trioproxy_time_to_first_token_seconds",
            "trioproxy_time_per_output_token_seconds",
        ):
            acc = t.ttfb if "byte" in name else t.ttft if "first" in name else t.tpot
            for s in fam.samples:
                if s.name.endswith("_sum"):
                    acc[0] += s.value
                elif s.name.endswith("_count"):
                    acc[1] += s.value
        elif name == "trioproxy_streams_without_first_token":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    r = s.labels.get("reason", "error")
                    t.no_first_token[r] = t.no_first_token.get(r, 0.0) + s.value
        elif name == "trioproxy_streams":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    k = _key(s.labels, STREAM_LABELS)
                    t.streams[k] = t.streams.get(k, 0.0) + s.value
        elif name in (
            "trioproxy_stream_chunks",
            "trioproxy_stream_bytes",
            "trioproxy_stream_transfer_seconds",
        ):
            target = {
                "trioproxy_stream_chunks": t.chunks,
                "trioproxy_stream_bytes": t.stream_bytes,
                "trioproxy_stream_transfer_seconds": t.transfer,
            }[name]
            for s in fam.samples:
                if s.name.endswith("_total"):
                    k = _key(s.labels, FLOW_LABELS)
                    target[k] = target.get(k, 0.0) + s.value
        elif name == "trioproxy_tokens_estimated":
            t.tokens_estimated += sum(s.value for s in fam.samples if s.name.endswith("_total"))
        elif name == "trioproxy_tokens":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    k = _key(s.labels, TOKEN_LABELS)
                    t.tokens[k] = t.tokens.get(k, 0.0) + s.value
        elif name in ("trioproxy_client_requests", "trioproxy_client_tokens"):
            for s in fam.samples:
                if s.name.endswith("_total"):
                    what = s.labels.get("type", "requests")
                    what = what if what == "requests" else f"{what}_tokens"
                    client = t.clients.setdefault(
                        s.labels.get("client", ""),
                        {"requests": 0.0, "input_tokens": 0.0, "output_tokens": 0.0},
                    )
                    client[what] = client.get(what, 0.0) + s.value
        elif name in ("trioproxy_upstream_errors", "trioproxy_upstream_retries"):
            target2 = t.upstream_errors if name.endswith("errors") else t.upstream_retries
            for s in fam.samples:
                if s.name.endswith("_total"):
                    r = s.labels.get("reason", "other")
                    target2[r] = target2.get(r, 0.0) + s.value
        elif name == "trioproxy_process_resident_memory_bytes":
            t.rss = sum(s.value for s in fam.samples)
        elif name == "trioproxy_process_cpu_seconds":
            t.cpu_seconds = sum(s.value for s in fam.samples if s.name.endswith("_total"))
    for r in UPSTREAM_REASONS:
        t.upstream_errors.setdefault(r, 0.0)
        t.upstream_retries.setdefault(r, 0.0)
    return t


# --------------------------------------------------------------------------- derived families


def derived_families(
    t: Totals,
    window_durations_ms: Sequence[float],
    system: dict[str, Any] | None,
    uptime_s: float,
    io: tuple[dict[str, int], dict[str, int]] | None = None,
    container: ContainerReading | None = None,
) -> list[Metric]:
    """The monitoring guide's families, computed from ``t`` (all-time, aggregated), the
    sorted window durations (this process), the sampler's latest snapshot (host gauges)
    and ``io``, the host's network and disk counters read for this scrape (else the
    snapshot's), and the container's cgroup figures read for it. ``system`` None (system
    metrics disabled): no host or container families at all."""
    fams: list[Metric] = []

    def gauge(name: str, doc: str, value: float) -> None:
        fams.append(GaugeMetricFamily(name, doc, value=float(value)))

    def counter(name: str, doc: str, value: float) -> None:
        fams.append(CounterMetricFamily(name, doc, value=float(value)))

    success, client, cancelled, error = t.class_counts()
    rates = store.rates_from_counts(success, client, cancelled, error)
    gauge(
        "http_request_success_rate",
        "All-time share of 2xx/3xx responses among non-cancelled requests (0-1).",
        rates["success_rate"],
    )
    gauge(
        "http_request_error_rate",
        "All-time share of server errors (5xx but 501/505, incl. streams broken by "
        "timeout/upstream error) among non-cancelled requests (0-1); cancelled (499) counts "
        "neither way.",
        rates["error_rate"],
    )
    gauge(
        "http_request_client_error_rate",
        "All-time share of client errors (4xx but 499, and 501/505: a feature or protocol "
        "the client asked for) among non-cancelled requests (0-1).",
        rates["client_error_rate"],
    )
    for p in (50, 95, 99):
        gauge(
            f"http_request_duration_p{p}_seconds",
            f"{p}th percentile request duration over this process's sliding window of recent "
            "requests (per process; use histogram_quantile on http_request_duration_seconds "
            "for fleet-wide percentiles).",
            store.percentile(window_durations_ms, p) / 1000.0,
        )

    eps = t.endpoints()
    per_total = CounterMetricFamily(
        "http_requests_per_endpoint_total", "All-time requests per endpoint.", labels=["endpoint"]
    )
    per_err = CounterMetricFamily(
        "http_request_errors_per_endpoint_total",
        "All-time server errors (5xx but 501/505) per endpoint (incl. streams broken by "
        "timeout/upstream error).",
        labels=["endpoint"],
    )
    per_stream = CounterMetricFamily(
        "http_streaming_requests_per_endpoint_total",
        "All-time streamed responses per endpoint.",
        labels=["endpoint"],
    )
    per_dur = GaugeMetricFamily(
        "http_request_duration_per_endpoint_seconds",
        "All-time average request duration per endpoint (sum / count of the histogram).",
        labels=["endpoint"],
    )
    for ep in sorted(eps):
        d = eps[ep]
        per_total.add_metric([ep], sum(d["classes"]))
        per_err.add_metric([ep], d["classes"][store.ERROR])
        per_stream.add_metric([ep], d["streams"])
        s, n = d["dur"]
        per_dur.add_metric([ep], s / n if n else 0.0)
    fams += [per_total, per_err, per_stream, per_dur]

    outcomes = t.stream_outcomes()
    chunks = sum(t.chunks.values())
    nbytes = sum(t.stream_bytes.values())
    transfer = sum(t.transfer.values())
    counter("http_streaming_requests_total", "All-time streamed responses.", sum(outcomes.values()))
    counter("http_streaming_chunks_total", "All-time chunks sent on streams.", chunks)
    counter(
        "http_streaming_cancelled_total",
        "All-time streams cancelled by the client.",
        outcomes["cancelled"],
    )
    counter(
        "http_streaming_timeout_total",
        "All-time streams stopped by a timeout.",
        outcomes["timeout"],
    )
    gauge(
        "http_streaming_first_byte_time_seconds",
        "All-time average time to first byte of streams (NaN before the first stream).",
        t.ttfb[0] / t.ttfb[1] if t.ttfb[1] else _NAN,
    )
    gauge(
        "http_streaming_throughput_bytes_per_second",
        "All-time stream throughput: bytes sent / seconds between first and last byte "
        "(NaN before the first stream that sent any, so '< threshold' alerts stay quiet).",
        nbytes / transfer if transfer > 0 else _NAN,
    )
    gauge(
        "http_streaming_avg_chunk_size_bytes",
        "All-time average chunk size of streams (NaN before the first chunk).",
        nbytes / chunks if chunks else _NAN,
    )

    gauge(
        "system_uptime_seconds",
        "Seconds since this proxy process started its metrics collector (a gauge: a counter "
        "would need the _total suffix).",
        uptime_s,
    )
    if system is not None:
        fams += _host_families(system, io or (system["network_io"], system["disk_io"]))
        if container is not None:
            fams += container_families(container)
    return fams


def _host_families(
    system: dict[str, Any], io: tuple[dict[str, int], dict[str, int]]
) -> list[Metric]:
    """Host gauges from the sampler's latest sample; host counters from ``io``, the
    kernel's counters as read for this scrape: the same whichever worker answers, so they
    never go down between two scrapes (a worker's own sample, older or newer than the
    other's, would)."""
    net, dio = io
    gauges = (
        ("system_cpu_usage_percent", "Host CPU usage percentage (latest sample).",
         system["cpu_usage_percent"]),
        ("system_memory_usage_percent", "Host memory usage percentage (latest sample).",
         system["memory_usage_percent"]),
        ("system_memory_usage_bytes", "Host memory used in bytes (latest sample).",
         system["memory_usage_bytes"]),
        ("system_disk_usage_percent", "Usage percentage of the / filesystem (latest sample).",
         system["disk_usage_percent"]),
    )  # fmt: skip
    counters = (
        ("network_bytes_sent_total", "Host-wide network bytes sent (kernel counters, "
         "read at scrape time).", net["bytes_sent"]),
        ("network_bytes_recv_total", "Host-wide network bytes received (kernel counters, "
         "read at scrape time).", net["bytes_recv"]),
        ("disk_read_bytes_total", "Host-wide disk bytes read (kernel counters, read at "
         "scrape time).", dio["read_bytes"]),
        ("disk_write_bytes_total", "Host-wide disk bytes written (kernel counters, read at "
         "scrape time).", dio["write_bytes"]),
    )  # fmt: skip
    fams: list[Metric] = [
        GaugeMetricFamily(name, doc, value=float(value)) for name, doc, value in gauges
    ]
    fams += [CounterMetricFamily(name, doc, value=float(value)) for name, doc, value in counters]
    return fams


def container_families(c: ContainerReading) -> list[Metric]:
    """The container's own figures (its cgroup's, read for this scrape: the same for every
    worker), each family present only when the kernel reports it; the limits only when
    there is one, so ``working_set / limit`` has no result, and no alert, without."""
    gauges = (
        ("trioproxy_container_memory_working_set_bytes", "Memory of the proxy's container "
         "(cgroup) minus its inactive page cache: what the OOM killer goes by.",
         c.memory_working_set_bytes),
        ("trioproxy_container_memory_limit_bytes", "Memory limit of the proxy's container "
         "(cgroup); absent without one.", c.memory_limit_bytes),
        ("trioproxy_container_cpu_limit_cores", "CPU quota of the proxy's container "
         "(cgroup) in cores (quota / period); absent without one.", c.cpu_limit_cores),
    )  # fmt: skip
    counters = (
        ("trioproxy_container_cpu_usage_seconds_total", "CPU seconds used by the proxy's "
         "container (cgroup).", c.cpu_usage_seconds),
        ("trioproxy_container_cpu_periods_total", "CFS enforcement periods of the proxy's "
         "container (cgroup) in which it could run.", c.cpu_periods),
        ("trioproxy_container_cpu_throttled_periods_total", "Periods in which the proxy's "
         "container (cgroup) used its whole CPU quota and was throttled.",
         c.cpu_throttled_periods),
        ("trioproxy_container_cpu_throttled_seconds_total", "Seconds the proxy's container "
         "(cgroup) was held back by its CPU quota.", c.cpu_throttled_seconds),
        ("trioproxy_container_oom_kills_total", "Processes of the proxy's container (cgroup) "
         "killed by the OOM killer.", c.oom_kills),
    )  # fmt: skip
    fams: list[Metric] = [
        GaugeMetricFamily(name, doc, value=float(value))
        for name, doc, value in gauges
        if value is not None
    ]
    fams += [
        CounterMetricFamily(name, doc, value=float(value))
        for name, doc, value in counters
        if value is not None
    ]
    return fams
