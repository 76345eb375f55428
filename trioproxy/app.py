"""Where a request enters: the Quart-Trio app, its lifecycle, and the measuring connection.

``TrackedHTTPConnection`` is the ASGI entry of every HTTP request. ``POST`` to a proxy
route goes to ``fastpath`` (the handlers served from ASGI events, below Quart), a
Prometheus scrape to ``scrape`` (the same, for ``GET``/``HEAD`` of the exposition); every
other request goes through Quart as usual. Either way ``exchange.Tracked`` sees the
request from its first byte in to its last byte out (or the moment the client went away):
request id, timing, bytes sent, cleanups, and the metrics record handed over once.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any
from urllib.parse import urlsplit

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart import Blueprint, Response, request
from quart.typing import ResponseTypes
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException

from . import (
    __version__,
    fastpath,
    hypercorn_patches,  # applies its fixes on import
    responses_socket,
    scrape,
)
from .auth import ClientKeys
from .client_address import X_FORWARDED_FOR, ClientAddresses, peer_address
from .config import (
    DEFAULT_ENV_FILE,
    ENV_FILE_VARIABLE,
    STOP_NOW_FILE_VARIABLE,
    STOP_NOW_SECONDS,
    STOP_NOW_SIGNAL,
    WORKER_VARIABLE,
    Settings,
    load_settings,
    redact_url,
)
from .errors import (
    CodedRequestBody,
    ProxyError,
    body_too_large_message,
    is_anthropic_path,
    scrub,
)
from .exchange import (
    ANTHROPIC_REQUEST_ID,
    CLIENT_RETRIES_NAME,
    JSON,
    OVERHEAD_HEADER,
    TRACEPARENT,
    TRACESTATE,
    AccessLine,
    Call,
    CountingSend,
    Handler,
    Reply,
    RequestState,
    Tracked,
    error_reply,
    internal_error_reply,
    keep_request_id,
    log_refused_connection,
    masked_reply,
    new_state,
    note_client,
    primed,
    proxy_error_reply,
    record_protocol_refusal,
    stop_at_once,
    trace_context,
)
from .keepalive import KeepAlive, beat_for
from .ledger import Ledger, ResponsesLedger
from .limits import raise_open_files_limit
from .logs import configure_logging, scope_request_id
from .metrics import MetricsCollector, set_metrics_collector
from .metrics.labels import loggable_path
from .model_mapping import ModelMapper
from .relay import stream_end_error
from .shared_ledger import SharedResponsesLedger
from .upstream import UpstreamPool, check_client_environment

log = logging.getLogger("trioproxy")


def request_state() -> RequestState:
    state: RequestState = request._get_current_object().trioproxy_state  # type: ignore[attr-defined]
    return state


class TrackedHTTPConnection(TrioASGIHTTPConnection):
    _request_id: str | None = None  # the request's, once handle_request has it

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        app: ProxyApp = self.app  # type: ignore[assignment]
        path = self.scope["path"]
        if path[:1] != "/":
            # the absolute form ("POST http://host/api/chat"), which RFC 9112 3.2.2 has a
            # server accept: its path is the URL's (hypercorn passes the whole target)
            path = self.scope["path"] = _path_of_absolute_target(path)
        if "//" in path:
            # "/api//tags" is "/api/tags", served, not redirected: werkzeug would answer a
            # 308 to a URL built from the client's Host header (and a preflight gets none)
            path = self.scope["path"] = _REPEATED_SLASHES.sub("/", path)
        raw = self.scope.get("raw_path") or b""
        if b"%" in raw and _ENCODED_SLASH.search(raw):
            # "/v1/chat%2Fcompletions" names no route: matched decoded, it was served as
            # the chat completions that a front proxy matching the path as sent (to allow
            # or refuse it) did not see. Only an id may hold an encoded "/" (the openai
            # SDK sends "org/model" and LiteLLM's Responses ids so), after its route's
            # prefix as sent: "/v1%2Fmodels/x" is no model route either.
            as_sent = _path_as_sent(raw)
            if not _below(as_sent, self.scope.get("root_path", "")).startswith(_BY_ID):
                # a path that is served nothing: kept as sent, so logs and the 404 tell
                # "%2F" from "%252F"
                self.scope["path"] = as_sent.decode("latin-1")
        root = self.scope.get("root_path", "").rstrip("/")
        if root and not self.scope["path"].startswith(root + "/"):
            # Quart answered a 404 for the path " " in Ollama's dialect, so a client whose
            # base URL lacks the mount point never learnt why; and "/llmapi/chat", which
            # only begins with "/llm", was served as "/api/chat"
            # as sent, if it holds a %2F; a key of the proxy's own (ASGI lets an app add
            # some), which hypercorn's TypedDict of the scope cannot list
            self.scope[OUTSIDE_MOUNT] = self.scope["path"]  # type: ignore[literal-required]
            self.scope["path"] = "/"  # outside too: a 404, which names the path as sent
        route = fastpath.fast_route(app, self.scope)
        if route is not None:
            # an http scope's receive (fastpath.HTTPReceive): hypercorn types every scope's
            await fastpath.serve(app, self.scope, receive, send, *route)  # type: ignore[arg-type]
        elif (scraped := scrape.scrape_route(self.scope)) is not None:
            await scrape.serve(app, self.scope, receive, send, scraped)
        else:
            try:
                await super().__call__(receive, send)
            except BaseException as error:
                # Quart served the request in a task of its own; the server logs what
                # escaped ("Error in ASGI Framework") here, once this returns
                keep_request_id(error, self._request_id)
                raise

    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Any, send: ASGISendCallable
    ) -> None:
        app: ProxyApp = self.app  # type: ignore[assignment]
        headers = request.headers
        state = new_state(
            app.collector,
            request.path,
            request.method,
            headers.get("X-Request-ID"),
            headers.get("Content-Length"),
        )
        state.client_retries = CLIENT_RETRIES_NAME in headers
        if TRACEPARENT in headers:
            state.trace = trace_context(headers.getlist(TRACEPARENT), headers.getlist(TRACESTATE))
        request.trioproxy_state = state
        self._request_id = state.request_id
        shown = _shown_path(request)  # also the path whose dialect its errors speak
        access = None
        if app.settings.access_log:
            access = AccessLine(request.method, shown, self.scope, app.client_addresses)
        anthropic = is_anthropic_path(shown)
        tracked = Tracked(app.collector, state, send, access, self.scope, anthropic)
        async with tracked as counting_send:
            response = await app.handle_request(request)
            for name, value in tracked.response_headers(response.status_code):
                response.headers[name] = value
            # Streams are bounded by our own first-token/idle deadlines, never by Quart's
            # RESPONSE_TIMEOUT (which would silently cut long generations; P2).
            keepalive: float = getattr(response, KEEPALIVE_ATTRIBUTE, 0.0)
            if keepalive:
                await self._send_kept_alive(counting_send, response, nursery, keepalive)
            else:
                await self._send_response(counting_send, response)
        nursery.cancel_scope.cancel()

    async def _send_kept_alive(
        self, send: CountingSend, response: ResponseTypes, nursery: trio.Nursery, keepalive: float
    ) -> None:
        """A stream with keep-alive comments (STREAM_KEEPALIVE_SECONDS): their task in the
        request's nursery, stopped with the response."""
        beat = beat_for(response.headers.get("content-type", ""))
        keeper = KeepAlive(keepalive, send.server_send, send, beat)
        nursery.start_soon(keeper.run)
        try:
            await self._send_response(keeper.send_event, response)
        finally:
            keeper.stop()


_EXPOSED_HEADERS = (
    f"X-Request-ID, {ANTHROPIC_REQUEST_ID}, {OVERHEAD_HEADER}, Retry-After, retry-after-ms, "
    "x-should-retry, *"
)


class WebsocketConnection:
    """A WebSocket handshake: the Responses API's WebSocket mode on ``/v1/responses``
    (``responses_socket``); refused on every other path (``RefusedWebsocket``)."""

    def __init__(self, app: ProxyApp, scope: Any) -> None:
        self.app, self.scope = app, scope

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if responses_socket.serves(self.scope):
            await responses_socket.ResponsesSocket(self.app, self.scope, receive, send).serve()
        else:
            await RefusedWebsocket(self.app, self.scope)(receive, send)


class RefusedWebsocket:
    """No other route speaks WebSocket. hypercorn hands an upgrade request to Quart as a
    websocket, and its error handling then failed outside a request context: a 500 and
    two tracebacks per handshake, with a key or without. The handshake is answered 400 in
    the caller's dialect (hypercorn's ``websocket.http.response``), counted and logged as
    a request refused before any route."""

    def __init__(self, app: ProxyApp, scope: Any) -> None:
        self.app, self.scope = app, scope

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await receive()  # websocket.connect
        app, path = self.app, self.scope.get("path") or "/"
        root = self.scope.get("root_path", "").rstrip("/")
        if root:  # the dialect by the path below the mount point, as for HTTP
            path = path[len(root) :] if path.startswith(root + "/") else "/"
        # its head was read whole: the client's id is honoured, as any request's
        request_id = scope_request_id(self.scope)
        if "websocket.http.response" not in self.scope.get("extensions", {}):
            record_protocol_refusal(
                app.collector,
                app.settings.access_log,
                403,
                request_id,
                "websocket",
                0,
                self._address(),
            )
            # a 403 before accepting (no reason: hypercorn's type requires the key)
            await send({"type": "websocket.close", "code": 1003, "reason": None})
            return
        reply = error_reply(
            path, "this server speaks no WebSocket: send the request without Upgrade", 400
        )
        body: bytes = reply.body  # type: ignore[assignment]
        headers = [
            (b"content-type", JSON.encode()),
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request_id.encode()),
        ]
        sent = 0
        try:
            await send({"type": "websocket.http.response.start", "status": 400, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
            sent = len(body)
        finally:  # counted whatever became of the answer
            record_protocol_refusal(
                app.collector,
                app.settings.access_log,
                400,
                request_id,
                "websocket",
                sent,
                self._address(),
            )

    def _address(self) -> str:
        """The client's address for the access line (its handshake's headers were read)."""
        return self.app.client_addresses.of(self.scope) if self.app.settings.access_log else ""


class ProxyApp(QuartTrio):
    asgi_http_class = TrackedHTTPConnection
    asgi_websocket_class = WebsocketConnection  # type: ignore[assignment]

    settings: Settings
    collector: MetricsCollector
    mapper: ModelMapper
    pool: UpstreamPool | None
    fast_routes: dict[str, Handler]
    anthropic_routes: frozenset[str] = frozenset()  # those of fast_routes on Anthropic's API
    in_progress: fastpath.InProgress
    admission: fastpath.Admission
    body_timeout: float = 300.0
    cors_origins: frozenset[str] = frozenset()
    client_keys: ClientKeys | None = None
    client_addresses: ClientAddresses  # who the access log names as a request's client
    ledger: Ledger  # Responses API usage still owed to the metrics
    open_sockets: responses_socket.OpenSockets  # the Responses API's WebSocket connections

    async def dispatch_request(self, request_context: Any = None) -> Any:
        """Quart's dispatch, ended with a 503 in the caller's dialect a little before
        hypercorn's grace period runs out, as the fast path's requests are: a request still
        waiting for the backend then (``/v1/models``, a resumed stream before its first
        chunk) was cut with an empty 500."""
        with self.in_progress.tracking():
            return await super().dispatch_request(request_context)
        fastpath.note_ended_waiting(request_state().metric)
        return reply_response(error_reply(request.path, fastpath.SHUTDOWN_WAITING_MESSAGE, 503))

    def cors_headers(self, origin: str | None) -> list[tuple[str, str]]:
        allowed = self.cors_origins
        if not allowed:
            return []
        # the answer depends on who asks: a shared cache must not hand one origin's answer
        # (with or without CORS headers) to another
        vary = [] if "*" in allowed else [("Vary", "Origin")]
        if not origin or ("*" not in allowed and origin not in allowed):
            return vary
        headers = [
            ("Access-Control-Allow-Origin", "*" if "*" in allowed else origin),
            # the wildcard never covers Authorization (Fetch spec): it is named
            ("Access-Control-Allow-Headers", "Authorization, *"),
            ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS, HEAD"),
            # retry advice and rate limits, for the JavaScript SDK to read; "*" for the
            # x-ratelimit-* family, which has no fixed list of names
            ("Access-Control-Expose-Headers", _EXPOSED_HEADERS),
        ]
        return headers + vary


def create_app(settings: Settings | None = None, **overrides: Any) -> ProxyApp:
    """Build the app. With no settings, read them from the environment and ``.env``.

    Usable directly by hypercorn: ``hypercorn --worker-class trio 'trioproxy.app:create_app()'``.
    """
    if settings is None:
        # a file named by the variable must exist, even one named ".env"; "" reads none
        env_file = os.environ.get(ENV_FILE_VARIABLE)
        settings = load_settings(
            dotenv_path=DEFAULT_ENV_FILE if env_file is None else env_file or None,
            env_file_required=bool(env_file),
            **overrides,
        )
        configure_logging(
            settings.log_level,
            settings.log_format,
            settings.secrets,
            settings.log_repeat_window_seconds,
        )
        # (settings handed in come from the trioproxy command, which checked this already)
        check_client_environment(settings)
    settings.require_upstream()
    if os.environ.get(WORKER_VARIABLE) == "1":
        _drain_on_hypercorns_event_only()

    app = ProxyApp(__name__)
    app.settings = settings
    app.config.update(
        RESPONSE_TIMEOUT=None,
        # Quart's routes (model lists, show, metrics, Responses by id) take small bodies: a
        # GET announcing one that never came was held for the proxy routes' 300 s
        BODY_TIMEOUT=settings.client_body_timeout,
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        PROVIDE_AUTOMATIC_OPTIONS=True,
        JSON_SORT_KEYS=False,
    )
    app.mapper = ModelMapper(settings.model_mapping, settings.declared_models)
    app.client_addresses = ClientAddresses(settings.forwarded_allow_ips, settings.forwarded_header)
    hypercorn_patches.set_write_timeout(settings.client_write_timeout)
    hypercorn_patches.set_body_limit(settings.max_request_bytes)
    keys = ClientKeys(
        settings.proxy_api_keys,
        metrics_open=not settings.metrics_require_auth,
        limit=settings.client_max_concurrent_requests,
    )
    app.client_keys = keys if keys else None  # None: an open proxy, one test per request
    app.collector = MetricsCollector(
        max_metrics=settings.metrics_max_requests,
        enabled=settings.metrics_enabled,
        model_label_limit=settings.metrics_model_labels,
        system_interval=settings.system_metrics_interval,
        system_enabled=settings.system_metrics_enabled,
        container_root=settings.system_metrics_fs_root,
        health_error_rate_degraded=settings.health_error_rate_degraded,
        health_error_rate_unhealthy=settings.health_error_rate_unhealthy,
        health_p95_degraded_seconds=settings.health_p95_degraded_seconds,
        health_min_requests=settings.health_min_requests,
        health_window_seconds=settings.health_window_seconds,
    )
    # with request metrics off nothing counts tokens: nothing to share, no files to write
    app.ledger = _ledger(app.collector.multiprocess_dir if app.collector.enabled else None)
    for client_name, backend_name in settings.model_mapping.items():
        app.collector.model_labels.allow(client_name)
        app.collector.model_labels.allow(backend_name)
    for client_name in settings.declared_models:  # a name the file describes, not maps
        app.collector.model_labels.allow(client_name)
    # per worker, past it a new connection gets a 503 (hypercorn_patches, patch 16)
    cap = hypercorn_patches.cap_connections(app, settings.max_connections)
    app.collector.watch_connections(cap)
    if settings.access_log:  # a line per refused connection, as for every request answered
        cap.on_refused = log_refused_connection
    set_metrics_collector(app.collector)
    app.pool = None

    from .catalog import ModelCatalog
    from .forward import BackendQuirks
    from .routes_anthropic import FAST_ROUTES as anthropic_fast_routes
    from .routes_anthropic import blueprint as anthropic_routes
    from .routes_ollama import FAST_ROUTES as ollama_fast_routes
    from .routes_ollama import blueprint as ollama_routes
    from .routes_openai import FAST_ROUTES as openai_fast_routes
    from .routes_openai import blueprint as openai_routes
    from .routes_ops import ReadinessChecker
    from .routes_ops import blueprint as ops_routes
    from .signatures import ThoughtSignatures

    app.register_blueprint(ops_routes)
    app.register_blueprint(ollama_routes)
    app.register_blueprint(openai_routes)
    app.register_blueprint(anthropic_routes)
    app.fast_routes = {**ollama_fast_routes, **openai_fast_routes, **anthropic_fast_routes}
    app.anthropic_routes = frozenset(filter(is_anthropic_path, app.fast_routes))
    app.in_progress = fastpath.InProgress()
    app.open_sockets = responses_socket.OpenSockets()
    app.admission = fastpath.Admission(settings.max_concurrent_requests)
    _register_error_handlers(app)
    if app.client_keys is not None:
        _require_client_keys(app, app.client_keys)
    app.readiness = ReadinessChecker(settings)  # type: ignore[attr-defined]
    app.catalog = ModelCatalog()  # type: ignore[attr-defined]
    app.backend_quirks = BackendQuirks()  # type: ignore[attr-defined]
    backend_host = urlsplit(settings.upstream_url).hostname if settings.upstream_url else None
    app.thought_signatures = ThoughtSignatures(backend_host)  # type: ignore[attr-defined]

    @app.before_serving
    async def _start() -> None:
        # here, in every serving process: the single one, each worker of --workers, and
        # each of plain hypercorn's
        open_files, _ = raise_open_files_limit()
        _fit_connections_to_files(app, open_files)
        _warn_unread_forwarded_header(settings)
        app.pool = UpstreamPool(settings, app.collector)
        app.background_scope = trio.CancelScope()  # type: ignore[attr-defined]
        await app.nursery.start(_background, app)
        _settle_garbage_collector()
        log.info(
            "trioproxy %s serving; backend %s",
            __version__,
            # the URL's user:password shown as ***, the secrets scrubbed should the URL hold one
            scrub(redact_url(settings.upstream_url or ""), settings.backend_secrets),
        )

    @app.after_serving
    async def _stop() -> None:
        app.background_scope.cancel()  # type: ignore[attr-defined]
        if app.pool is not None:
            with trio.CancelScope(shield=True):
                await app.pool.aclose()

    if settings.cors_origins:
        _enable_cors(app, settings.cors_origins)
    return app


async def current_call() -> Call:
    """The ``Call`` for a request Quart is serving (the body read within Quart's limits)."""
    coded = CodedRequestBody.refusing(request.headers.get("Content-Encoding"))
    if coded is not None:
        raise coded
    # all three arguments: quart's overloads tell bytes only then (its defaults give bytes)
    body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    return Call(request_app(), request_state(), request.path, body)


def answer_all_and_stop(app: ProxyApp) -> None:
    """A second stop signal: requests still waiting get their 503 in their dialect (a
    stream its in-band end), written within ``STOP_NOW_SECONDS``; the server is stopped
    then (by the caller). What is cut from now on is counted as the proxy's doing."""
    stop_at_once()
    app.in_progress.begin_shutdown(0.0)
    hypercorn_patches.end_writes_within(STOP_NOW_SECONDS)


async def _answer_all_on_the_masters_word(
    app: ProxyApp, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """In a worker of ``--workers N``: its master's word that a second signal came (the
    master kills the workers a moment later). The master creates its file first; the
    same signal from anyone else is not its word and leaves the worker serving."""
    marker = os.environ.get(STOP_NOW_FILE_VARIABLE, "")
    with trio.open_signal_receiver(STOP_NOW_SIGNAL) as signals:
        task_status.started()
        async for _ in signals:
            if marker and await trio.Path(marker).exists():
                answer_all_and_stop(app)
                return
            log.warning("SIGUSR1 ignored: trioproxy's master sends it on a second stop signal")


def _drain_on_hypercorns_event_only() -> None:
    """In a worker of ``--workers N``: ignore SIGTERM. hypercorn's master stops its workers
    through a shared event, on which each drains its requests for ``GRACEFUL_TIMEOUT``; but
    as soon as one worker has exited (an idle one at once) it sends SIGTERM to the others,
    which by default ends them on the spot, streams and all. SIGKILL still stops a worker."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def quart_route(blueprint: Blueprint, path: str, handler: Handler) -> None:
    """Serve a fast-path handler through Quart too (other methods get Quart's 405)."""

    async def view() -> Response:
        call = await current_call()
        return await served(call, await handler(call))

    view.__name__ = "fast_" + path.strip("/").replace("/", "_")
    blueprint.add_url_rule(path, view_func=view, methods=["POST"])


async def served(call: Call, reply: Reply) -> Response:
    """A handler's reply as Quart's response: the backend key masked, a stream's first
    chunk read (so a failure before it gets a real status), its end in-band at shutdown."""
    answer = await masked_reply(reply, call.app.settings.backend_secrets)
    return reply_response(await primed(answer), call)


def reply_response(reply: Reply, call: Call | None = None) -> Response:
    body = reply.body
    if reply.first is not None and not isinstance(body, bytes):
        body = _after(reply, body, call)
    response = Response(body, status=reply.status, content_type=reply.content_type)
    for name, value in reply.headers.items():
        response.headers[name] = value
    if not isinstance(reply.body, bytes):
        response.timeout = None
        if reply.keepalive:
            setattr(response, KEEPALIVE_ATTRIBUTE, reply.keepalive)
    return response


# a Quart response's keep-alive interval (``Reply.keepalive``), for ``handle_request``
KEEPALIVE_ATTRIBUTE = "trioproxy_keepalive"


async def _after(
    reply: Reply, rest: AsyncIterator[bytes], call: Call | None
) -> AsyncIterator[bytes]:
    """A stream after its first chunk; at shutdown it ends in-band before hypercorn's grace
    period runs out (as the fast path's streams do), not cut in the middle of a chunk. Each
    read runs in the shutdown's cancel scope; no scope is open across a yield."""
    # closed even if we are at `first`
    async with aclosing(rest):  # type: ignore[type-var]
        yield reply.first  # type: ignore[misc]
        while True:
            if call is None:
                chunk = await anext(rest, None)
            else:
                with call.app.in_progress.tracking() as scope:
                    chunk = await anext(rest, None)
                if scope.cancelled_caught:
                    if (reply.end is None or not reply.end.reached) and (
                        end := _shutdown_end(reply, call)
                    ):
                        yield end
                    return
            if chunk is None:
                return
            yield chunk


def _shutdown_end(reply: Reply, call: Call) -> bytes:
    metric = call.state.metric
    if metric is not None:
        metric.status_code = 503  # the effective status of a stream cut short by us
        metric.stream_outcome = "error"
    end = stream_end_error(
        reply.content_type, reply.end, fastpath.SHUTDOWN_MESSAGE, "service_unavailable"
    )
    return end or b""


YOUNG_COLLECTION_THRESHOLD = 10_000


# descriptors a worker needs besides its client connections and their backend ones: the
# listener, the event loop's, logs, metrics files, a readiness check (the idle backend
# connections kept, UPSTREAM_MAX_KEEPALIVE, are added to it)
FILES_BESIDES_CONNECTIONS = 64


def _fit_connections_to_files(app: ProxyApp, open_files: int) -> None:
    """Lower MAX_CONNECTIONS to what the open files limit leaves room for, two each (a
    client connection and, while it is answered, its backend one): past the limit a new
    connection waited in the listen backlog, unanswered, where under the cap it gets the
    503 that says why. MAX_CONNECTIONS=0 (no cap) is left to the open files limit alone."""
    cap = hypercorn_patches.connection_cap(app)
    if cap is None or not app.settings.max_connections:
        return
    kept = FILES_BESIDES_CONNECTIONS + app.settings.upstream_max_keepalive
    room = max((open_files - kept) // 2, 1)
    if cap.limit > room:
        log.warning(
            "MAX_CONNECTIONS lowered from %d to %d: the open files limit (RLIMIT_NOFILE) "
            "%d leaves room for no more (two each, %d kept for the rest); raise the hard "
            "limit (systemd LimitNOFILE=, docker --ulimit nofile=) to keep %d",
            cap.limit,
            room,
            open_files,
            kept,
            cap.limit,
        )
        cap.lower_to(room)


def _warn_unread_forwarded_header(settings: Settings) -> None:
    """A header named in FORWARDED_HEADER is believed only from the proxies of
    FORWARDED_ALLOW_IPS: naming one without them reads nothing, silently otherwise."""
    if settings.forwarded_header != X_FORWARDED_FOR and not settings.forwarded_allow_ips:
        log.warning(
            "FORWARDED_HEADER=%s is not read: FORWARDED_ALLOW_IPS names no proxy to believe "
            "it from (the access log names the connecting peer)",
            settings.forwarded_header,
        )


def _settle_garbage_collector() -> None:
    """Move start-up objects out of the collector's sight and collect less often.
    Measured (docs/performance-history.md): full collections scanning the import-time heap paused
    the loop 27 ms each under load and up to 225 ms with 1,000 open streams; after the
    freeze, 14 ms at most, and scrape p99 under load fell from 14 to 5 ms. The young
    generation is collected when tracked objects grow by 10,000 instead of 700: at the
    default, the objects of the requests in flight crossed the threshold every few
    requests and young collections took 21 µs per proxied request; now 1 µs. Garbage in
    reference cycles waits a little longer, bounded by that same growth."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, 10, 100)


def _ledger(shared_dir: str | None) -> Ledger:
    """The Responses API ledger: the workers' own beside their metrics files when they
    share them (``--workers N``), so that whichever worker a poll reaches counts what
    another's request left owed; else this process's, in memory."""
    if shared_dir is None:
        return ResponsesLedger()
    return SharedResponsesLedger(os.path.join(shared_dir, "responses_ledger"))


async def _background(app: ProxyApp, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The app's own tasks (metrics publisher, sampler, readiness checks, backend read
    deadlines), owned by the lifespan nursery; and, while they run, the app hears when
    hypercorn begins its graceful shutdown (streams then end in-band before it is over)."""
    grace = app.settings.graceful_timeout

    def shutting_down() -> None:
        app.in_progress.begin_shutdown(grace)
        app.open_sockets.begin_shutdown()
        hypercorn_patches.end_writes_within(grace)

    def refused(status: int, peer: tuple[str, int] | None, request_id: str, reason: str) -> None:
        # the peer only: the head that would name a forwarded client was not understood
        address = peer_address(peer) if app.settings.access_log else ""
        record_protocol_refusal(
            app.collector, app.settings.access_log, status, request_id, reason, address=address
        )

    stop_listening = hypercorn_patches.on_shutdown(shutting_down)
    stop_hearing_refusals = hypercorn_patches.on_protocol_error(refused)
    try:
        with app.background_scope:  # type: ignore[attr-defined]
            async with trio.open_nursery() as nursery:
                if app.collector.enabled:
                    await nursery.start(app.collector.run_publisher)
                # also with request metrics off: the process RSS/CPU series are the sum
                # over live workers, so every worker samples from its start
                if app.settings.system_metrics_enabled:
                    await nursery.start(app.collector.run_system_sampler)
                await nursery.start(app.readiness.run, app)  # type: ignore[attr-defined]
                if app.pool is not None:
                    await nursery.start(app.pool.read_deadlines.run)
                    await nursery.start(app.pool.sweep_idle)
                if isinstance(app.ledger, SharedResponsesLedger):
                    await nursery.start(app.ledger.run_writer)
                if os.environ.get(WORKER_VARIABLE) == "1":
                    await nursery.start(_answer_all_on_the_masters_word, app)
                task_status.started()
    finally:
        stop_listening()
        stop_hearing_refusals()


_REPEATED_SLASHES = re.compile(r"/{2,}")
_ENCODED_SLASH = re.compile(rb"%2f", re.IGNORECASE)
_BY_ID = (b"/v1/responses/", b"/v1/models/")
_REPEATED_RAW_SLASHES = re.compile(rb"/{2,}")


def _path_as_sent(raw: bytes) -> bytes:
    """The request target's path as sent, as routes are matched: repeated slashes merged,
    an absolute form's scheme and host left out."""
    if raw[:1] != b"/":
        rest = raw.partition(b"://")[2]
        raw = rest[rest.find(b"/") :] if b"/" in rest else b"/"
    return _REPEATED_RAW_SLASHES.sub(b"/", raw)


def _below(path: bytes, root_path: str) -> bytes:
    """``path`` below the mount point (``root_path``), as the routes see it."""
    root = root_path.encode("utf-8", "replace")
    return path[len(root) :] if root and path.startswith(root) else path


OUTSIDE_MOUNT = "trioproxy.outside_mount"
"""Scope key: the path of a request sent outside the mount point (``root_path``)."""


def _shown_path(sent: Any) -> str:
    """The path of the request ``sent`` as the client sent it, for error replies and log
    lines."""
    path: str = sent.scope.get(OUTSIDE_MOUNT) or sent.path
    return path


def _path_of_absolute_target(target: str) -> str:
    scheme, _, rest = target.partition("://")
    if not rest or not scheme.isalpha():
        return target  # not a URL: routed as it is (a 404)
    at = rest.find("/")
    return rest[at:] if at >= 0 else "/"


# a refusal of these before their body is read ends the connection (hypercorn cannot read
# past an unread body), so the reply says so
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _register_error_handlers(app: ProxyApp) -> None:
    @app.errorhandler(ProxyError)
    async def _proxy_error(error: ProxyError) -> Response:
        settings: Settings = request_app().settings
        reply = proxy_error_reply(
            error, _shown_path(request), settings.backend_secrets, request_state()
        )
        if await body_left_unread(error.status):
            reply.headers = {**reply.headers, "Connection": "close"}
        return reply_response(reply)

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message = _http_error_message(status, error)
        allowed = getattr(error, "valid_methods", None)  # a 405 must say what is allowed
        headers = {"Allow": ", ".join(allowed)} if allowed else {}
        if await body_left_unread(status):
            headers["Connection"] = "close"
        return reply_response(error_reply(_shown_path(request), message, status, headers=headers))

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        # escaped like the access log: a decoded %0a in the path must not forge a log line
        method, path = loggable_path(request.method), loggable_path(request.path)
        log.exception("unhandled error while serving %s %s", method, path)
        return reply_response(internal_error_reply(_shown_path(request)))


async def body_left_unread(status: int) -> bool:
    """Whether an error reply goes out with the request's body unread: hypercorn then
    closes the connection, and the reply must say so (a pooling client would reuse it and
    fail). A body that arrives within a second (under the size limit) is read and dropped
    instead, so the connection serves the next request."""
    if request.method not in _BODY_METHODS:
        return False
    if status in (408, 413):
        return True
    # no longer than the shutdown allows (``InProgress``): an answer still waiting here when
    # the server was stopped was cut with an empty 500
    with request_app().in_progress.tracking(), trio.move_on_after(1.0):
        try:
            await request.get_data(cache=False)
        except Exception:  # over the size limit, or the client left
            return True
        return False
    return True


def _http_error_message(status: int, error: HTTPException) -> str:
    if status == 404:
        if OUTSIDE_MOUNT in request.scope:
            root = request.root_path.rstrip("/")
            return (
                f"no route for {request.method} {_shown_path(request)}: the proxy is served below "
                f"{root}/ (does the client's base URL lack {root}?)"
            )
        return f"no route for {request.method} {request.path}"
    if status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    if status == 413:
        return body_too_large_message(request.max_content_length)
    return error.description or error.name


def request_app() -> ProxyApp:
    from quart import current_app

    # a LocalProxy, which quart types as the Quart it stands for
    app: ProxyApp = current_app._get_current_object()  # type: ignore[attr-defined]
    return app


def _require_client_keys(app: ProxyApp, keys: ClientKeys) -> None:
    """Quart's side of ``PROXY_API_KEYS`` (the fast path checks its own requests)."""

    @app.before_request
    async def _authenticate() -> None:
        authorization = request.headers.get("Authorization")
        api_key = request.headers.get("x-api-key")  # the anthropic SDKs'
        client = keys.check(request.method, request.path, authorization, api_key)
        note_client(request_state(), client)


def _enable_cors(app: ProxyApp, origins: str) -> None:
    app.cors_origins = frozenset(o.strip() for o in origins.split(",") if o.strip())

    @app.after_request
    async def _cors(response: Response) -> Response:
        for name, value in app.cors_headers(request.headers.get("Origin")):
            if name == "Vary":  # added to what the route varies on (the metrics' codings)
                response.vary.add(value)
            else:
                response.headers[name] = value
        return response
