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
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint, Response, request

from . import __version__
from .app import request_app
from .config import Settings
from .errors import BadRequest, OutOfFiles, UpstreamStatusError, scrub
from .limits import open_files_limit, out_of_files
from .logs import EVERY_TIME
from .metrics import MetricsCollector
from .relay import dumps
from .scrape import VARY, exposition, rendering_in_time
from .upstream import UpstreamPool

if TYPE_CHECKING:
    from .catalog import ModelCatalog

log = logging.getLogger("trioproxy.ready")

blueprint = Blueprint("ops", __name__)


CHECK_TIMEOUT_SECONDS = 2.0
"""Longest a readiness check waits for the backend (or ``READY_CHECK_INTERVAL`` if less):
well under the 3 s ``timeoutSeconds`` of the shipped Kubernetes probe, so a probe that
has to wait for a check still gets its answer in time."""


class ReadinessChecker:
    """Knows whether the backend answered recently, without asking it on every probe.

    Evidence comes from any successful backend exchange of a request
    (:meth:`mark_reachable`) and from checks, ``GET /models`` (cheap on every
    OpenAI-compatible server): a background task checks every ``READY_CHECK_INTERVAL``
    while no request proved the backend reachable, and ``/ready`` checks only when there
    is no result to answer from. A failed check stands for the interval too, and any
    result stands until the next check ends, so probes of a down backend are answered
    from it at once, never held by a check in progress; concurrent probes share one
    check.

    A check is a single attempt of at most :data:`CHECK_TIMEOUT_SECONDS`, through a
    one-connection pool of its own: never retried, and never counted as a failed backend
    call (``trioproxy_upstream_errors_total`` / ``_retries_total`` count requests' calls
    only), so probing a down backend neither piles up connections nor fires the
    UpstreamErrors alert. Its failure shows in ``/ready``'s ``backend_error``, in
    ``upstream.backend_reachable`` and in the health check's ``backend``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.out_of_files_error: str | None = None  # why the latest check could not ask
        self._out_of_files_at = -math.inf  # trio clock: that check's end
        self._last_ok = -math.inf  # trio clock: the latest evidence the backend answers
        self._last_check = -math.inf  # trio clock: when the latest check ended
        self._checking: trio.Event | None = None  # the running check's end
        self._scheduled = False  # run() is alive: it starts every check that falls due
        self._pool: UpstreamPool | None = None
        self._closed = False
        self._collector: MetricsCollector | None = None  # the app's: told every change

    @property
    def interval(self) -> float:
        return self._settings.ready_check_interval

    @property
    def timeout(self) -> float:
        return min(CHECK_TIMEOUT_SECONDS, self.interval)

    @property
    def checked_at(self) -> float | None:
        """Wall clock of the latest evidence either way (for display), None before any."""
        latest = max(self._last_ok, self._last_check)
        if latest == -math.inf:
            return None
        return time.time() - (_now() - latest)

    def mark_reachable(self) -> None:
        """A request's backend exchange succeeded. Runs per request: one clock read, and
        the bookkeeping only when the state changes."""
        self._last_ok = _now()
        if self.reachable is not True:
            self._record(True, None)

    def fresh(self) -> bool:
        """The backend answered within the last three intervals (and no check since
        failed)."""
        return self.reachable is True and _now() - self._last_ok <= 3 * self.interval

    def out_of_files(self) -> bool:
        """The latest check could not open a connection for want of file descriptors (the
        proxy's own exhaustion), and no backend exchange succeeded since: not ready, as
        requests cannot reach the backend either, but nothing learnt of the backend."""
        return self._out_of_files_at > self._last_ok

    def failed_recently(self) -> bool:
        """The latest check failed less than an interval ago: its answer still stands."""
        failed = self.reachable is False or self.out_of_files()
        return failed and _now() - self._last_check < self.interval

    async def run(self, app: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Check whenever an interval passed without evidence either way, until cancelled
        (then the checks' pool is closed)."""
        self._collector = app.collector
        self._scheduled = True
        task_status.started()
        try:
            while True:
                latest = max(self._last_ok, self._last_check)
                if _now() - latest >= self.interval:
                    await self.check(app)
                else:
                    await trio.sleep_until(latest + self.interval)
        finally:
            self._scheduled = False
            await self._close()

    async def refresh(self, app: Any) -> None:
        """What a probe needs: the latest result, success or failure, while it is of the
        last interval or while a newer one is on its way (a check running, or due from
        :meth:`run`); a check only when there is no result at all (then it waits for
        the one running, if any) or nothing else will check.

        A result that has just expired is not waited past: :meth:`run` starts its
        check exactly when the last result turns an interval old, and a probe that
        waited for that check would take up to :data:`CHECK_TIMEOUT_SECONDS` whenever
        the backend hangs, longer than a probe's usual 1 s timeout."""
        if self.fresh() or self.failed_recently():
            return
        if self.reachable is not None and (self._checking is not None or self._scheduled):
            return
        await self.check(app)

    async def check(self, app: Any) -> None:
        """Ask the backend once; a caller that finds a check running waits for it instead
        (bounded by the check's timeout)."""
        self._collector = app.collector
        if self._checking is not None:
            await self._checking.wait()
            return
        self._checking = done = trio.Event()
        try:
            try:
                error = await self._ask_backend(app.catalog)
            except OutOfFiles as exc:
                self._last_check = _now()
                self._note_out_of_files(exc.message)
                return
            self._last_check = _now()
            self._out_of_files_at = -math.inf
            if error is None:
                self._last_ok = self._last_check
            self._record(error is None, error)
        finally:
            self._checking = None
            done.set()

    async def _ask_backend(self, catalog: ModelCatalog) -> str | None:
        """``GET /models`` once: None if the backend answered (any status below 500; one
        without the route, or refusing our key, is up), else why not. The list it answers
        goes to the ``catalog``: no request has to fetch one for Ollama's name rules."""
        try:
            # built before the clock starts: loading the CA bundle is the proxy's time,
            # not the backend's (on a busy machine it took longer than a short interval)
            pool = await self._check_pool()
        except Exception as exc:
            return self._why_unreachable(exc)
        timeout = self.timeout
        with trio.move_on_after(timeout):
            asked_at = _now()
            try:
                result = await pool.request("GET", "/models")
            except UpstreamStatusError as exc:
                return None if exc.status < 500 else exc.message[:200]
            except OutOfFiles:
                raise
            except Exception as exc:  # unreachable, for whatever reason: say why
                return self._why_unreachable(exc)
            await catalog.take(result.response.content, self._settings.backend_secrets, asked_at)
            return None
        return f"the backend did not answer within {timeout:g} s"

    def _why_unreachable(self, exc: Exception) -> str:
        """Why a check could not reach the backend, secrets scrubbed; OutOfFiles raised
        instead when it was the proxy's own descriptors that ran out."""
        if (exhausted := out_of_files(exc)) is not None:
            raise OutOfFiles(exhausted, open_files_limit()) from exc
        return scrub(str(exc) or type(exc).__name__, self._settings.backend_secrets)[:200]

    async def _check_pool(self) -> UpstreamPool:
        """The checks' own pool: one client, one kept connection, one attempt, bounded
        timeouts, no metrics observer (checks are not request traffic)."""
        if self._pool is None:
            if self._closed:
                raise RuntimeError("shutting down")
            bound = self.timeout
            settings = replace(
                self._settings,
                max_retries=0,
                upstream_clients=1,
                upstream_max_keepalive=1,
                connect_timeout=min(self._settings.connect_timeout, bound),
                request_timeout=min(self._settings.request_timeout, bound),
            )
            # building one loads the CA bundle (tens of ms): not on the event loop
            self._pool = await trio.to_thread.run_sync(UpstreamPool, settings)
        return self._pool

    async def _close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await pool.aclose()

    def _note_out_of_files(self, message: str) -> None:
        # the backend's state (and trioproxy_backend_up) stays as last known: blaming
        # the backend would fire BackendDown for the proxy's own limit
        if not self.out_of_files():
            log.warning("not ready: %s", message.removesuffix("; retry shortly"))
        self._out_of_files_at = self._last_check
        self.out_of_files_error = message

    def _record(self, reachable: bool, error: str | None) -> None:
        # a change is logged, not every check: a backend down for an hour is one line.
        # Each is written every time (never counted as a repeat): the last says the state
        if not reachable and self.reachable is not False:
            log.warning("the backend is not reachable: %s", error, extra=EVERY_TIME)
        elif reachable and self.reachable is False:
            log.info("the backend is reachable again", extra=EVERY_TIME)
        self.reachable = reachable
        self.last_error = error
        if self._collector is not None:
            self._collector.set_backend_status(reachable, self.checked_at or time.time())


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


# why the backend is unreachable, as an open /ready tells it to callers without a key
HIDDEN_BACKEND_ERROR = "the proxy's log says why (so does this answer, with a client key)"


@blueprint.get("/ready")
async def ready() -> Response:
    app = request_app()
    checker: ReadinessChecker = app.readiness  # type: ignore[attr-defined]
    # answered from the last interval's result when there is one, success or failure;
    # else from one shared check of at most CHECK_TIMEOUT_SECONDS
    await checker.refresh(app)
    reachable = checker.fresh()
    out_of_files = checker.out_of_files()
    ready_now = reachable and not out_of_files
    body: dict[str, Any] = {
        "status": "ready" if ready_now else "not ready",
        "checks": {
            "settings": "ok",
            "backend": _backend_check(reachable, out_of_files),
            "open_files": "exhausted" if out_of_files else "ok",
        },
        "backend_checked_at": checker.checked_at,
    }
    if out_of_files:
        # the proxy's own limit, no backend address in it: told to anyone
        body["proxy_error"] = checker.out_of_files_error
    if not reachable and not out_of_files and checker.last_error:
        keys = app.client_keys
        if keys and keys.name_of(request.headers.get("Authorization")) is None:
            # open to anyone: why it failed names the backend's address, which only
            # the log and callers with a client key get to read
            body["backend_error"] = HIDDEN_BACKEND_ERROR
        else:
            body["backend_error"] = checker.last_error
    return _json(body, 200 if ready_now else 503)


def _backend_check(reachable: bool, out_of_files: bool) -> str:
    if reachable:
        return "reachable"
    # no connection to ask it with: its state is not known, not "unreachable"
    return "unknown" if out_of_files else "unreachable"


@blueprint.get("/v1/metrics")
@blueprint.get("/api/metrics")  # the replaced proxy served its metrics under both prefixes
async def metrics_json() -> Response:
    collector = request_app().collector
    args = request.args
    endpoint = args.get("endpoint") or args.get("endpoint_filter")
    minutes = _positive_number(args.get("time_range_minutes") or args.get("minutes"))
    include_system = _flag(args.get("include_system") or args.get("include_system_metrics"))
    with rendering_in_time():
        if endpoint is None and minutes is None and include_system is None:
            return _json(await collector.read_summary())
        return _json(
            await collector.read_filtered_summary(
                endpoint_filter=endpoint,
                time_range_minutes=minutes,
                include_system_metrics=True if include_system is None else include_system,
            )
        )


# GET and HEAD are served below Quart (``scrape``); this view answers the same, for a
# client of the app that is not its ASGI entry (and Quart's rule gives other methods their
# 405 and a preflight its answer)
@blueprint.get("/v1/metrics/prometheus")
@blueprint.get("/api/metrics/prometheus")
@blueprint.get("/metrics")
async def metrics_prometheus() -> Response:
    headers = request.headers
    body, content_type, gzip = await exposition(
        request_app().collector, headers.get("Accept"), headers.get("Accept-Encoding")
    )
    response = Response(body, content_type=content_type)
    response.headers["Vary"] = VARY
    if gzip:
        response.content_encoding = "gzip"
    return response


@blueprint.get("/v1/metrics/health")
@blueprint.get("/api/metrics/health")
async def metrics_health() -> Response:
    with rendering_in_time():
        body, status = await request_app().collector.read_health()
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
