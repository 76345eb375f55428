"""The body of ``GET /v1/metrics/health``: three checks (the error rate and the latency of
the requests that ended in the health window, and the backend's last readiness check)
judged against :class:`HealthThresholds` (docs/metrics.md, section 6).

Pure functions of what the collector hands them (a :class:`~.summary.CollectorView`,
totals, the window): they may run in a worker thread on a copy of the window.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import store
from .derived import Totals
from .env import env_number
from .store import WindowEntry, WindowStore
from .summary import CollectorView, count, newest

log = logging.getLogger("trioproxy.metrics")

_DEGRADED, _UNHEALTHY = 0.1, 0.25  # the error rates' defaults (the guide's)


@dataclass(frozen=True, slots=True)
class HealthThresholds:
    """When health says degraded or unhealthy (``HEALTH_*``)."""

    error_rate_degraded: float
    error_rate_unhealthy: float
    p95_degraded_seconds: float
    min_requests: int
    # health judges recent requests only: an idle proxy is not unhealthy forever for the
    # failures it last saw, however long ago
    window_seconds: float


def health_thresholds(
    error_rate_degraded: float | None = None,
    error_rate_unhealthy: float | None = None,
    p95_degraded_seconds: float | None = None,
    min_requests: int | None = None,
    window_seconds: float | None = None,
) -> HealthThresholds:
    """The thresholds given, each one not given from the environment (``HEALTH_*``)."""
    degraded = _given(error_rate_degraded, "HEALTH_ERROR_RATE_DEGRADED", _DEGRADED)
    unhealthy = _given(error_rate_unhealthy, "HEALTH_ERROR_RATE_UNHEALTHY", _UNHEALTHY)
    if degraded > unhealthy:
        # as the proxy refuses them (HEALTH_ERROR_RATE_DEGRADED above _UNHEALTHY)
        log.warning(
            "metrics: ignoring HEALTH_ERROR_RATE_DEGRADED=%g above HEALTH_ERROR_RATE_UNHEALTHY=%g",
            degraded,
            unhealthy,
        )
        degraded, unhealthy = _DEGRADED, _UNHEALTHY
    return HealthThresholds(
        error_rate_degraded=degraded,
        error_rate_unhealthy=unhealthy,
        p95_degraded_seconds=_given(p95_degraded_seconds, "HEALTH_P95_DEGRADED_SECONDS", 30.0),
        min_requests=(
            min_requests
            if min_requests is not None
            else env_number("HEALTH_MIN_REQUESTS", 1, integer=True, minimum=1)
        ),
        window_seconds=(
            window_seconds
            if window_seconds is not None
            else env_number("HEALTH_WINDOW_SECONDS", 300.0, minimum=1.0)
        ),
    )


def _given(value: float | None, name: str, default: float) -> float:
    return value if value is not None else float(env_number(name, default))


def health_body(
    view: CollectorView,
    thresholds: HealthThresholds,
    t: Totals,
    window: WindowStore,
    now: float,
) -> tuple[dict[str, Any], int]:
    """Body and HTTP status (503 only when unhealthy) at ``now`` (``time.time()``)."""
    # requests that ENDED in the health window: a timeout is recorded when it ends,
    # after waiting longer than any window might be
    entries = _ended_since(window.entries(), now - thresholds.window_seconds)
    counted = [e for e in entries if e.cls != store.CANCELLED]
    success, client, _cancelled, error = store.class_counts(counted)
    recent = newest(entries, view.percentile_window)
    checks = {
        "error_rate": _error_rate_check(error, len(counted), thresholds),
        "latency": _latency_check(recent, thresholds),
        "backend": _backend_check(view),
    }
    status = _overall_status(check["status"] for check in checks.values())
    perf = store.performance(recent)
    body = {
        "status": status,
        "enabled": view.enabled,
        "checks": checks,
        "thresholds": dataclasses.asdict(thresholds),
        "active_requests": count(t.active),
        "total_requests": count(t.total_requests),
        "window_requests": len(entries),
        "success_rate": store.rate(success, len(counted)),
        "error_rate": checks["error_rate"]["value"],
        "client_error_rate": store.rate(client, len(counted)),
        "avg_response_time_ms": perf["avg_duration_ms"],
        "p95_response_time_ms": perf["p95_duration_ms"],
        "uptime_seconds": view.uptime_seconds,
        "buffer_utilization": len(window) / window.max_size,
        "backend_reachable": view.backend_reachable,
    }
    return body, (503 if status == "unhealthy" else 200)


def _ended_since(entries: list[WindowEntry], cutoff: float) -> list[WindowEntry]:
    return [e for e in entries if e.timestamp + e.duration_ms / 1000.0 >= cutoff]


def _error_rate_check(errors: int, requests: int, thresholds: HealthThresholds) -> dict[str, Any]:
    """Server errors among the requests that were not cancelled."""
    rate = store.rate(errors, requests)
    enough = requests >= thresholds.min_requests
    if enough and rate >= thresholds.error_rate_unhealthy:
        status = "unhealthy"
    elif enough and rate >= thresholds.error_rate_degraded:
        status = "degraded"
    else:
        status = "ok"
    return {"status": status, "value": rate, "requests": requests, "errors": errors}


def _latency_check(recent: list[WindowEntry], thresholds: HealthThresholds) -> dict[str, Any]:
    """p95 of the plain (not streamed) requests that succeeded or failed on the service's
    side: a client's mistakes and departures say nothing of the service's speed (a slow
    upload that ends in a 400, a request waiting out a backend's Retry-After)."""
    plain = sorted(
        e.duration_ms
        for e in recent
        if not e.streaming and (e.cls == store.SUCCESS or e.cls == store.ERROR)
    )
    p95_s = store.percentile(plain, 95) / 1000.0
    slow = len(plain) >= thresholds.min_requests and p95_s > thresholds.p95_degraded_seconds
    return {"status": "degraded" if slow else "ok", "p95_seconds": p95_s, "requests": len(plain)}


def _backend_check(view: CollectorView) -> dict[str, Any]:
    if view.backend_reachable is None:
        status = "unknown"
    else:
        status = "ok" if view.backend_reachable else "unhealthy"
    return {
        "status": status,
        "reachable": view.backend_reachable,
        "checked_at": view.backend_checked_at,
    }


def _overall_status(statuses: Iterable[str]) -> str:
    found = set(statuses)
    if "unhealthy" in found:
        return "unhealthy"
    if "degraded" in found:
        return "degraded"
    return "healthy"
