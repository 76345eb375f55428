"""trioproxy metrics: the monitoring guide's public API, and nothing web.

This package imports no web framework. Where things are:

* :mod:`.collector`: :class:`MetricsCollector`, which counts each finished request (in
  batches) and serves the monitoring endpoints' reads;
* :mod:`.summary`, :mod:`.health`: the JSON bodies of ``/v1/metrics`` and
  ``/v1/metrics/health``, built from what the collector hands them;
* :mod:`.request`, :mod:`.tracking`: the record of one request, and the guide's
  ``track_request`` / ``track_streaming_request``;
* :mod:`.series`, :mod:`.derived`, :mod:`.exposition`, :mod:`.multiprocess`: Prometheus;
  :mod:`.store`: the window; :mod:`.system`, :mod:`.container`: the samplers.

This module holds the process-wide collector and the guide's functions on it
(docs/metrics.md, section 8). Semantics are documented in ``docs/metrics.md``.
"""

from __future__ import annotations

import os
from typing import Any

import trio

from .collector import (
    PUBLISH_AFTER_RECORDS,
    PUBLISH_WITHIN_SECONDS,
    SLOW_REQUEST_MS,
    ConnectionCounts,
    MetricsCollector,
)
from .env import env_bool, env_number
from .request import RequestMetrics
from .system import SystemSampler

__all__ = [
    "PUBLISH_AFTER_RECORDS",
    "PUBLISH_WITHIN_SECONDS",
    "SLOW_REQUEST_MS",
    "ConnectionCounts",
    "MetricsCollector",
    "RequestMetrics",
    "SystemSampler",
    "get_filtered_metrics_summary",
    "get_metrics_collector",
    "get_metrics_summary",
    "get_prometheus_metrics",
    "reset_metrics",
    "set_metrics_collector",
    "stop_metrics_collection",
    "track_request",
    "track_streaming_request",
]


# --------------------------------------------------------------------------- singleton + guide API

_collector: MetricsCollector | None = None


def _collector_from_env() -> MetricsCollector:
    return MetricsCollector(
        max_metrics=env_number("METRICS_MAX_REQUESTS", 1000, integer=True, minimum=1),
        enabled=env_bool("METRICS_ENABLED", True),
        model_label_limit=env_number("METRICS_MODEL_LABELS", 50, integer=True),
        system_interval=env_number("SYSTEM_METRICS_INTERVAL", 5.0, minimum=0.001),
        system_enabled=env_bool("SYSTEM_METRICS_ENABLED", True),
        container_root=os.environ.get("SYSTEM_METRICS_FS_ROOT", "").strip() or "/",
    )


def get_metrics_collector() -> MetricsCollector:
    """The process-wide collector, created on first use from the environment
    (``METRICS_ENABLED``, ``METRICS_MAX_REQUESTS``, ``METRICS_MODEL_LABELS``,
    ``SYSTEM_METRICS_INTERVAL``, ``SYSTEM_METRICS_ENABLED``)."""
    global _collector
    if _collector is None:
        _collector = _collector_from_env()
    return _collector


def set_metrics_collector(collector: MetricsCollector | None) -> None:
    """Replace the process-wide collector (``None``: recreate from env on next use)."""
    global _collector
    _collector = collector


# async, as the guide's API is: under trio each reads as the monitoring endpoints do (a
# large window from a copy, and with --workers large files merged, in a worker thread),
# not on the loop; awaited under another event loop (asyncio) it reads in place, as before
async def get_metrics_summary() -> dict[str, Any]:
    collector = get_metrics_collector()
    if trio.lowlevel.in_trio_task():
        return await collector.read_summary()
    return collector.summary()


async def get_filtered_metrics_summary(
    endpoint_filter: str | None = None,
    time_range_minutes: float | None = None,
    include_system_metrics: bool = True,
) -> dict[str, Any]:
    collector = get_metrics_collector()
    if trio.lowlevel.in_trio_task():
        return await collector.read_filtered_summary(
            endpoint_filter, time_range_minutes, include_system_metrics
        )
    return collector.filtered_summary(endpoint_filter, time_range_minutes, include_system_metrics)


async def get_prometheus_metrics() -> str:
    """The text-format (0.0.4) exposition."""
    collector = get_metrics_collector()
    if trio.lowlevel.in_trio_task():
        body, _ = await collector.read_prometheus(None)
    else:
        body, _ = collector.render_prometheus(None)
    return body.decode("utf-8")


def reset_metrics() -> None:
    get_metrics_collector().reset()


def stop_metrics_collection() -> None:
    get_metrics_collector().stop()


from .tracking import track_request, track_streaming_request  # noqa: E402
