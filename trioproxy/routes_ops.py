"""The monitoring plane: liveness, readiness and the three metrics endpoints.

Requests here are never recorded as traffic (``labels.UNTRACKED_PATHS``), so scrapes and
probes cannot drown the figures they report.
"""

from __future__ import annotations

import itertools
import logging
import math
import platform
import time
from typing import Any

import trio
from quart import Blueprint, Response, request

from . import __version__
from .app import request_app
from .config import Settings
from .errors import BadRequest
from .relay import dumps

log = logging.getLogger("trioproxy.ready")

blueprint = Blueprint("ops", __name__)


class ReadinessChecker:
    """Knows whether the backend answered recently, without asking it on every probe.

    Any successful backend exchange counts; when none happened within the check interval,
    a background task asks ``GET /models`` (cheap on every OpenAI-compatible server)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.reachable: bool | None = None
        self.checked_at: float = 0.0  # wall clock, for display
        self._last_ok = -math.inf  # trio clock
        self.last_error: str | None = None

    def mark_reachable(self) -> None:
        self._last_ok = _now()
        self.reachable = True
        self.checked_at = time.time()

    def fresh(self) -> bool:
        return (
            self.reachable is True
            and _now() - self._last_ok <= 3 * self._settings.ready_check_interval
        )

    async def run(self, app: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        interval = self._settings.ready_check_interval
        while True:
            if _now() - self._last_ok >= interval:
                await self.check(app)
            await trio.sleep(interval)

    async def check(self, app: Any) -> None:
        pool = app.pool
        ok = False
        if pool is not None:
            try:
                with trio.move_on_after(min(5.0, self._settings.ready_check_interval)):
                    result = await pool.request("GET", "/models")
                    ok = result.response.status_code < 500
            except Exception as exc:
                self.last_error = str(exc)[:200]
        if ok:
            self.mark_reachable()
            self.last_error = None
        else:
            self.reachable = False
            self.checked_at = time.time()
        app.collector.set_backend_status(bool(ok), self.checked_at)


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


def _json(payload: Any, status: int = 200) -> Response:
    return Response(dumps(payload), status=status, content_type="application/json")


@blueprint.get("/health")
@blueprint.get("/v1/health")
async def health() -> Response:
    """Liveness: the process serves. ``healthy`` as the replaced proxy said, for probes
    that match the body; whether the backend answers is ``/ready``'s question."""
    return _json({"status": "healthy", "service": "trioproxy", "version": __version__})


@blueprint.get("/v1/version")
async def proxy_version() -> Response:
    """The proxy's own version (``/api/version`` is the Ollama version clients gate on)."""
    return _json(
        {
            "service": "trioproxy",
            "version": __version__,
            "version_info": _version_info(__version__),
            "api_version": "v1",
            "python_version": platform.python_version(),
            "uptime_seconds": round(time.time() - _STARTED_AT, 3),
        }
    )


_STARTED_AT = time.time()


def _version_info(version: str) -> list[int]:
    """[major, minor, patch] from a version such as 0.2.0 or 0.2.0rc1 (its leading digits)."""
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        parts.append(int(digits) if digits else 0)
    return parts


@blueprint.get("/ready")
async def ready() -> Response:
    app = request_app()
    checker: ReadinessChecker = app.readiness  # type: ignore[attr-defined]
    if not checker.fresh() and app.pool is not None:
        # No recent evidence either way (e.g. right after start): check now, once.
        with trio.move_on_after(5):
            await checker.check(app)
    ready_now = checker.fresh()
    body = {
        "status": "ready" if ready_now else "not ready",
        "checks": {
            "settings": "ok",
            "backend": "reachable" if ready_now else "unreachable",
        },
        "backend_checked_at": checker.checked_at or None,
    }
    if not ready_now and checker.last_error:
        body["backend_error"] = checker.last_error
    return _json(body, 200 if ready_now else 503)


@blueprint.get("/v1/metrics")
@blueprint.get("/api/metrics")  # the replaced proxy served its metrics under both prefixes
async def metrics_json() -> Response:
    collector = request_app().collector
    args = request.args
    endpoint = args.get("endpoint") or args.get("endpoint_filter")
    minutes = _positive_number(args.get("time_range_minutes") or args.get("minutes"))
    include_system = _flag(args.get("include_system") or args.get("include_system_metrics"))
    if endpoint is None and minutes is None and include_system is None:
        return _json(collector.summary())
    return _json(
        collector.filtered_summary(
            endpoint_filter=endpoint,
            time_range_minutes=minutes,
            include_system_metrics=True if include_system is None else include_system,
        )
    )


@blueprint.get("/v1/metrics/prometheus")
@blueprint.get("/api/metrics/prometheus")
@blueprint.get("/metrics")
async def metrics_prometheus() -> Response:
    body, content_type = request_app().collector.render_prometheus(request.headers.get("Accept"))
    return Response(body, content_type=content_type)


@blueprint.get("/v1/metrics/health")
@blueprint.get("/api/metrics/health")
async def metrics_health() -> Response:
    body, status = request_app().collector.health()
    return _json(body, status)


def _positive_number(raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"time_range_minutes must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise BadRequest("time_range_minutes must be a positive number")
    return value


def _flag(raw: str | None) -> bool | None:
    if raw is None or raw == "":
        return None
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"include_system must be true or false, got {raw!r}")
