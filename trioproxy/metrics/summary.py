"""The JSON bodies of ``GET /v1/metrics``: the summary (all-time totals, every worker's,
and this process's window) and the filtered summary (the window's requests matching the
filters), documented in docs/metrics.md, section 5.

Pure functions of what the collector hands them (a :class:`CollectorView`, totals, the
window, its system block): they read no collector state, so they may run in a worker
thread on a copy of the window.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import store
from .derived import Totals
from .schema import NO_TOKEN_REASONS
from .store import WindowEntry, WindowStore


@dataclass(frozen=True, slots=True)
class CollectorView:
    """What the JSON bodies say of the collector itself, taken on the event loop when a
    read starts (before any hand-off to a thread)."""

    enabled: bool
    uptime_seconds: float
    percentile_window: int  # the newest requests the percentiles are taken over
    backend_reachable: bool | None
    backend_checked_at: float | None


def count(v: float) -> int:
    """A count as JSON shows it (the series hold floats)."""
    return round(v)


def newest(entries: list[WindowEntry], percentile_window: int) -> list[WindowEntry]:
    """The newest ``percentile_window`` of the window's ``entries`` (oldest first)."""
    if len(entries) > percentile_window:
        entries = entries[-percentile_window:]
    return entries


def time_range(minutes: float | None) -> float | None:
    """The filters' ``time_range_minutes``, checked before anything is read."""
    if minutes is None:
        return None
    minutes = float(minutes)
    if not minutes > 0:
        raise ValueError("time_range_minutes must be a positive number")
    return minutes


def window_block(view: CollectorView, window: WindowStore) -> dict[str, Any]:
    return {
        "scope": "process",
        "pid": os.getpid(),
        "size": len(window),
        "max_size": window.max_size,
        "percentile_size": min(len(window), view.percentile_window),
    }


def summary_body(
    view: CollectorView, t: Totals, system: dict[str, Any], window: WindowStore
) -> dict[str, Any]:
    """Body of ``GET /v1/metrics``: all-time totals (aggregated) + window figures."""
    success, client, cancelled, error = t.class_counts()
    total = success + client + cancelled + error
    entries = window.entries()
    body: dict[str, Any] = {
        "enabled": view.enabled,
        "total_requests": count(total),
        "successful_requests": count(success),
        "failed_requests": count(error),
        "client_errors": count(client),
        "cancelled_requests": count(cancelled),
        **store.rates_from_counts(success, client, cancelled, error),
        "active_requests": count(t.active),
        "global_total_requests": count(total),
        "uptime_seconds": view.uptime_seconds,
        "performance": store.performance(newest(entries, view.percentile_window)),
        "streaming": _streaming(t),
        "tokens": _tokens(t),
        "upstream": _upstream(t, view),
        "endpoints": _endpoints(t),
        "clients": {
            name: {key: count(value) for key, value in figures.items()}
            for name, figures in sorted(t.clients.items())
        },
        "models": _models(t),
        "period": store.period(entries),
        "window": window_block(view, window),
        "system": system,
    }
    if total == 0:
        body["message"] = "No requests recorded yet"
    return body


def _mean_ms(sum_count: Sequence[float]) -> float:
    """The mean in ms of a histogram's (sum in seconds, count); 0.0 without one."""
    s, n = sum_count
    return s / n * 1000.0 if n else 0.0


def _streaming(t: Totals) -> dict[str, Any]:
    outcomes = t.stream_outcomes()
    chunks = sum(t.chunks.values())
    nbytes = sum(t.stream_bytes.values())
    transfer = sum(t.transfer.values())
    return {
        "total_streaming_requests": count(sum(outcomes.values())),
        "completed_streams": count(outcomes["completed"]),
        "cancelled_streams": count(outcomes["cancelled"]),
        "timeout_streams": count(outcomes["timeout"]),
        "error_streams": count(outcomes["error"]),
        "total_chunks": count(chunks),
        "total_bytes": count(nbytes),
        "avg_first_byte_time_ms": _mean_ms(t.ttfb),
        "avg_first_token_time_ms": _mean_ms(t.ttft),
        "avg_time_per_output_token_ms": _mean_ms(t.tpot),
        "streams_without_first_token": {
            reason: count(t.no_first_token.get(reason, 0.0)) for reason in NO_TOKEN_REASONS.values()
        },
        "avg_throughput_bytes_per_second": nbytes / transfer if transfer > 0 else 0.0,
        "avg_chunk_size": nbytes / chunks if chunks else 0.0,
    }


def _tokens(t: Totals) -> dict[str, int]:
    tokens = t.tokens_by_type()
    return {
        "input": count(tokens["input"]),
        "output": count(tokens["output"]),
        # the part of "output" counted from stream chunks: the backend sent no usage
        "output_estimated": count(t.tokens_estimated),
    }


def _upstream(t: Totals, view: CollectorView) -> dict[str, Any]:
    return {
        "errors": {k: count(v) for k, v in sorted(t.upstream_errors.items())},
        "retries": {k: count(v) for k, v in sorted(t.upstream_retries.items())},
        "backend_reachable": view.backend_reachable,
        "checked_at": view.backend_checked_at,
    }


def _endpoints(t: Totals) -> dict[str, Any]:
    endpoints: dict[str, Any] = {}
    for ep, d in sorted(t.endpoints().items()):
        classes = d["classes"]
        requests = sum(classes)
        endpoints[ep] = {
            "count": count(requests),
            "avg_duration_ms": _mean_ms(d["dur"]),
            "errors": count(classes[store.ERROR]),
            "client_errors": count(classes[store.CLIENT_ERROR]),
            "cancelled": count(classes[store.CANCELLED]),
            "error_rate": store.rate(classes[store.ERROR], requests - classes[store.CANCELLED]),
            "streaming_requests": count(d["streams"]),
            "models": sorted(d["models"]),
        }
    return endpoints


def _models(t: Totals) -> dict[str, dict[str, int]]:
    return {
        k: {
            "count": count(v["count"]),
            "input_tokens": count(v["input_tokens"]),
            "output_tokens": count(v["output_tokens"]),
        }
        for k, v in sorted(t.models().items())
    }


def filtered_summary_body(
    view: CollectorView,
    endpoint_filter: str | None,
    time_range_minutes: float | None,
    t: Totals,
    system: dict[str, Any] | None,
    window: WindowStore,
) -> dict[str, Any]:
    """Window figures for the requests matching the filters (this process's window);
    ``system`` None when not asked for."""
    entries = window.entries(endpoint_filter, time_range_minutes)
    success, client, cancelled, error = store.class_counts(entries)
    body: dict[str, Any] = {
        "enabled": view.enabled,
        "filters": {
            "endpoint_filter": endpoint_filter,
            "time_range_minutes": time_range_minutes,
            "include_system_metrics": system is not None,
        },
        "filtered_requests": len(entries),
        "successful_requests": success,
        "failed_requests": error,
        "client_errors": client,
        "cancelled_requests": cancelled,
        **store.rates_from_counts(success, client, cancelled, error),
        "global_active_requests": count(t.active),
        "global_total_requests": count(t.total_requests),
        "performance": store.performance(entries),
        "streaming": store.streaming_summary(entries),
        "endpoints": store.endpoints_summary(entries),
        "period": store.period(entries),
        "window": window_block(view, window),
    }
    if not entries:
        body["message"] = "No metrics available for specified filters"
    if system is not None:
        body["system"] = system
    return body
