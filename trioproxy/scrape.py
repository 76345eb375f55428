"""Prometheus scrapes served straight from ASGI events, below Quart, as ``fastpath`` serves
the proxy routes.

Through Quart a scrape built a werkzeug request and response, pushed an app and request
context, routed, ran the hooks and a task reading the request's events: about 0.6 ms of a
scrape's 1.7 ms of CPU in process (docs/performance-history.md, "twenty-ninth session: scrape
cost"), paid again by every scraper every scrape interval. ``GET`` and ``HEAD`` on the
exposition's paths are answered here with what Quart answered, header for header: the
client key check (``METRICS_REQUIRE_AUTH``), errors in the path's dialect, CORS, the
request id, the access line, and the shutdown's 503 for a read still waiting when the
grace period runs out. Other methods on these paths (405, CORS preflight) go through
Quart, as does every other route.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.typing import ASGISendCallable
from werkzeug.http import parse_accept_header

from . import fastpath
from .errors import MetricsUnavailable, ProxyError
from .exchange import (
    CLIENT_RETRIES_HEADER,
    CLIENT_RETRIES_NAME,
    TRACEPARENT,
    AccessLine,
    Reply,
    RequestState,
    Tracked,
    error_reply,
    internal_error_reply,
    new_state,
    note_client,
    proxy_error_reply,
    trace_context_of_raw,
)
from .hypercorn_patches import cancel_on_close, close_hook
from .metrics.labels import loggable_path
from .metrics.reads import SharedRenderingTimedOut

if TYPE_CHECKING:
    from .app import ProxyApp
    from .metrics import MetricsCollector

log = logging.getLogger("trioproxy")

PROMETHEUS_PATHS = ("/v1/metrics/prometheus", "/api/metrics/prometheus", "/metrics")
_ROUTES = dict.fromkeys(PROMETHEUS_PATHS, True)
_METHODS = frozenset({"GET", "HEAD"})
_WANTED_HEADERS = frozenset(
    {
        b"x-request-id",
        b"origin",
        b"authorization",
        b"x-api-key",
        b"accept",
        b"accept-encoding",
        CLIENT_RETRIES_HEADER,
        TRACEPARENT.encode(),
    }
)
# the format follows Accept and the coding Accept-Encoding: a cache must not hand one
# scraper's answer to another
VARY = "Accept, Accept-Encoding"


def scrape_route(scope: Any) -> str | None:
    """The route path of a ``GET`` or ``HEAD`` of the exposition, else None (below a mount
    point, the path below it, as Quart routes it)."""
    if scope["method"] not in _METHODS:
        return None
    route = fastpath.routed(_ROUTES, scope)
    return None if route is None else route[0]


async def exposition(
    collector: MetricsCollector, accept: str | None, accept_encoding: str | None
) -> tuple[bytes, str, bool]:
    """The exposition for a scraper's ``Accept`` and ``Accept-Encoding``: body, Content-Type
    and whether the body is gzipped. Concurrent scrapes share renderings, encoded off the
    event loop (docs/metrics.md)."""
    gzip = gzip_wanted(accept_encoding)
    with rendering_in_time():
        body, content_type = await collector.read_prometheus(accept, gzip=gzip)
    return body, content_type, gzip


@contextmanager
def rendering_in_time() -> Iterator[None]:
    """A read whose shared rendering was given up at its bound answers 503 in the caller's
    dialect (the error handler's), not a 500 for an unhandled error."""
    try:
        yield
    except SharedRenderingTimedOut as exc:
        raise MetricsUnavailable(f"{exc}; retry shortly") from exc


@functools.lru_cache(maxsize=64)
def gzip_wanted(accept_encoding: str | None) -> bool:
    """Whether a scrape is answered in gzip, from its ``Accept-Encoding`` (a scraper sends
    the same one every time: kept for the last 64 seen). As RFC 9110 (12.5.3) reads it:
    ``gzip`` (or ``x-gzip``, the same coding) is acceptable at its q-value, else at that
    of ``*``, and ``q=0`` refuses it; it is chosen unless ``identity`` (named, or as
    ``*``) is preferred. No header, or an empty one, is identity, as Prometheus' own
    exporters answer it; so is a header that refuses every coding we have, identity
    included (the one to send)."""
    named = {coding.lower(): quality for coding, quality in parse_accept_header(accept_encoding)}
    anything = named.get("*", 0.0)
    gzip = named.get("gzip", named.get("x-gzip", anything))
    return gzip > 0 and gzip >= named.get("identity", anything)


async def serve(app: ProxyApp, scope: Any, receive: Any, send: ASGISendCallable, path: str) -> None:
    """Answer a scrape of ``path`` (``scrape_route``'s) as Quart answered it."""
    headers = fastpath._wanted_headers(scope["headers"], _WANTED_HEADERS)
    method: str = scope["method"]
    # (a monitoring path: no metrics record, but the id, the client and the access line)
    state = new_state(app.collector, path, method, headers.get("x-request-id"), None)
    state.client_retries = CLIENT_RETRIES_NAME in headers
    if TRACEPARENT in headers:
        state.trace = trace_context_of_raw(scope["headers"])
    access = None
    if app.settings.access_log:
        access = AccessLine(method, path, scope, app.client_addresses)
    tracked = Tracked(app.collector, state, send, access, scope)
    async with tracked as counting_send:
        # the client leaving ends the wait (Quart's task reading the request's events did);
        # without hypercorn's HTTP/1.1 stream the scrape is answered to the end
        with trio.CancelScope() as cancel:
            stream = close_hook(send)
            if stream is not None:
                cancel_on_close(stream, cancel, counting_send)
            reply = await _answer(app, headers, method, path, state)
            origin = app.cors_headers(headers.get("origin"))
            cors = [item for item in origin if item[0] != "Vary"]
            if len(cors) < len(origin):  # one Vary header, as Quart's response.vary made it
                vary = reply.headers.get("Vary")
                reply.headers["Vary"] = "Origin" if vary is None else vary + ", Origin"
            head = fastpath._head(reply, tracked, cors)
            await fastpath._write(counting_send, reply, head, tracked, app.in_progress)


async def _answer(
    app: ProxyApp, headers: dict[str, str], method: str, path: str, state: RequestState
) -> Reply:
    try:
        if app.client_keys is not None:
            client = app.client_keys.check(
                method, path, headers.get("authorization"), headers.get("x-api-key")
            )
            note_client(state, client)
        # a read still waiting when the shutdown's deadline comes is answered 503, as
        # ProxyApp.dispatch_request answers Quart's routes
        with app.in_progress.tracking():
            body, content_type, gzip = await exposition(
                app.collector, headers.get("accept"), headers.get("accept-encoding")
            )
            reply = Reply(200, body, content_type, {"Vary": VARY})
            if gzip:
                reply.headers["Content-Encoding"] = "gzip"
            return reply
        return error_reply(path, fastpath.SHUTDOWN_WAITING_MESSAGE, 503)
    except ProxyError as error:
        return proxy_error_reply(error, path, app.settings.backend_secrets, state)
    except Exception:
        # escaped like the access log: a decoded %0a in the path must not forge a log line
        log.exception(
            "unhandled error while serving %s %s", loggable_path(method), loggable_path(path)
        )
        return internal_error_reply(path)
