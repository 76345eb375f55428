"""The proxy routes served straight from ASGI events, below Quart.

``POST`` to a proxy route (chat, completions, embeddings, in both dialects) is the hot
path: per request Quart built a werkzeug request and response, pushed an app and request
context, routed, and ran its hooks — about a fifth of the CPU a proxied request cost
(docs/performance-history.md). Here the same handlers (``Call`` in, ``Reply`` out) are served
from the ASGI scope directly, with the same guarantees: the body is bounded and timed,
a client that disconnects cancels the work (and so the backend request) at once, errors
come in the caller's dialect, and ``Tracked`` does the bookkeeping. Every other request,
including other methods on these paths (405, CORS preflight), goes through Quart.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from hypercorn.typing import ASGISendCallable, HTTPDisconnectEvent, HTTPRequestEvent

from .errors import (
    MASKED_AT_ONCE_BYTES,
    CodedRequestBody,
    ProxyError,
    ServerBusy,
    body_too_large_message,
)
from .exchange import (
    CLIENT_RETRIES_HEADER,
    CLIENT_RETRIES_NAME,
    TRACEPARENT,
    AccessLine,
    Call,
    CountingSend,
    Handler,
    Reply,
    Tracked,
    error_reply,
    internal_error_reply,
    masked,
    masked_in_pieces,
    new_state,
    note_client,
    proxy_error_reply,
    trace_context_of_raw,
)
from .hypercorn_patches import cancel_on_close, chunk_sender, close_hook
from .json_threads import joined
from .keepalive import EarlyStart, KeepAlive, beat_for
from .relay import STREAM_HEADERS, in_band_failure, stream_end_error

if TYPE_CHECKING:
    from .app import ProxyApp
    from .metrics import RequestMetrics

log = logging.getLogger("trioproxy")

# An http scope's receive: ASGI gives it only these two events (hypercorn's type, one for
# every scope, has the websocket's and lifespan's too).
HTTPReceiveEvent = HTTPRequestEvent | HTTPDisconnectEvent
HTTPReceive = Callable[[], Awaitable[HTTPReceiveEvent]]

_WANTED_HEADERS = frozenset(
    {
        b"x-request-id",
        b"content-length",
        b"content-encoding",
        b"origin",
        b"authorization",
        b"x-api-key",  # the anthropic SDKs' key
        CLIENT_RETRIES_HEADER,
        TRACEPARENT.encode(),
    }
)
_WATCHER_GRACE_SECONDS = 1.0
Header = tuple[bytes, bytes]
_Route = TypeVar("_Route")


class ClientLeft(Exception):
    """The client disconnected before its request body was complete."""


def fast_route(app: ProxyApp, scope: Any) -> tuple[str, Handler] | None:
    """The route path and handler of a ``POST`` to a proxy route, else None. Under a mount
    point (``root_path``) the route is the path below it, as Quart routes it."""
    if scope["method"] != "POST":
        return None
    return routed(app.fast_routes, scope)


def routed(routes: Mapping[str, _Route], scope: Any) -> tuple[str, _Route] | None:
    """The route path (below the mount point) and what ``routes`` has for it, else None."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "").rstrip("/")
    if root:
        if not path.startswith(root + "/"):
            return None  # outside the mount point: Quart answers 404 (app.OUTSIDE_MOUNT)
        path = path[len(root) :]
    handler = routes.get(path)
    if handler is None:
        # werkzeug routes "//api/chat" (or "api/chat" below "/llm/") as "/api/chat": so
        # must we, or such a request would be served through Quart, past our bounds
        path = "/" + path.lstrip("/")
        handler = routes.get(path)
    return None if handler is None else (path, handler)


async def serve(
    app: ProxyApp,
    scope: Any,
    receive: HTTPReceive,
    send: ASGISendCallable,
    path: str,
    handler: Handler,
) -> None:
    headers = _wanted_headers(scope["headers"])
    state = new_state(
        app.collector, path, "POST", headers.get("x-request-id"), headers.get("content-length")
    )
    state.client_retries = CLIENT_RETRIES_NAME in headers
    if TRACEPARENT in headers:
        state.trace = trace_context_of_raw(scope["headers"])
    access = None
    if app.settings.access_log:
        access = AccessLine("POST", path, scope, app.client_addresses)
    # a set of the app's fast routes (~10 ns), not errors.is_anthropic_path (~55 ns)
    anthropic = path in app.anthropic_routes
    tracked = Tracked(app.collector, state, send, access, scope, anthropic)
    slots = _Slots(app, app.admission.enter())
    # hypercorn's stream, when it cancels a scope of ours as the client leaves (patch 19):
    # no watcher task then, and without keep-alive comments no nursery either (a nursery
    # cost ~98k machine instructions a request, a plain cancel scope ~48k)
    stream = close_hook(send)
    try:
        async with tracked:
            if stream is None or app.settings.stream_keepalive_seconds:
                async with trio.open_nursery() as nursery:
                    cancel = nursery.cancel_scope
                    await _serve(
                        app,
                        receive,
                        headers,
                        path,
                        handler,
                        tracked,
                        slots,
                        stream,
                        cancel,
                        nursery,
                    )
                    # hypercorn hands the app http.disconnect once the response is
                    # complete, which ends the watcher without a cancellation (unwinding
                    # one costs as much as the watcher); the deadline only guards against
                    # a server that would not
                    cancel.deadline = trio.current_time() + _WATCHER_GRACE_SECONDS
            else:
                with trio.CancelScope() as cancel:
                    await _serve(
                        app, receive, headers, path, handler, tracked, slots, stream, cancel, None
                    )
    finally:
        slots.free()


async def _serve(
    app: ProxyApp,
    receive: HTTPReceive,
    headers: dict[str, str],
    path: str,
    handler: Handler,
    tracked: Tracked,
    slots: _Slots,
    stream: Any,
    scope: trio.CancelScope,
    nursery: trio.Nursery | None,
) -> None:
    """``serve``'s request inside ``scope``, which the client leaving cancels: through
    hypercorn's ``stream`` (``close_hook``), else a watcher task in ``nursery``. The
    nursery, if any, also holds a stream's keep-alive comments."""
    state = tracked.state
    counting_send = tracked.send
    early: EarlyStart | None = None
    try:
        if app.client_keys is not None:
            client = app.client_keys.check(
                "POST", path, headers.get("authorization"), headers.get("x-api-key")
            )
            note_client(state, client)
            if client is not None:
                app.client_keys.enter(client)
                slots.client = client
        if not slots.admitted:
            raise ServerBusy(app.admission.limit)
        coded = CodedRequestBody.refusing(headers.get("content-encoding"))
        if coded is not None:
            raise coded
        body = await _read_body(app, receive, headers.get("content-length"))
        if state.metric is not None:  # a slow upload is not the proxy's overhead
            state.metric.body_wait_ms = state.metric.elapsed_ms()
    except ClientLeft:
        return
    except ProxyError as error:
        reply = proxy_error_reply(error, path, app.settings.backend_secrets, state)
        declared = headers.get("content-length")
        if not await _discard_body(receive, declared, error, app.in_progress):
            # answered before its body was read: the server closes the connection
            # after this reply, so it says so (a client would reuse it, find it
            # closed and fail)
            reply.headers = {**reply.headers, "Connection": "close"}
        head = _head(reply, tracked, app.cors_headers(headers.get("origin")))
    else:
        # from here on, the client leaving cancels everything below, the backend
        # call included
        if stream is not None:
            cancel_on_close(stream, scope, counting_send)
        else:
            assert nursery is not None  # (serve opens one without a stream)
            nursery.start_soon(_watch_disconnect, receive, scope, counting_send)
        call = Call(app, state, path, body)
        if nursery is not None and app.settings.stream_keepalive_seconds:
            early = state.early_start = _early_start(app, tracked, headers, nursery)
        cors = app.cors_headers(headers.get("origin"))
        reply, head = await _answer(handler, call, app.in_progress, tracked, cors, early)
    streams = app.in_progress
    if early is not None and early.stop_unless_started():
        await early.settle()
        await _write_started(counting_send, reply, tracked, streams, slots.free, early)
    else:
        await _write(counting_send, reply, head, tracked, streams, slots.free, nursery)


class _Slots:
    """What a request holds while in flight: its place under MAX_CONCURRENT_REQUESTS and
    its client's under CLIENT_MAX_CONCURRENT_REQUESTS. Freed as soon as the response's
    body is out (``_write``), not after the bookkeeping that follows: a client that read
    the end may send its next request at once, which found the slot still taken (a 429
    for a client at its limit that waited its turn)."""

    __slots__ = ("admitted", "app", "client")

    def __init__(self, app: ProxyApp, admitted: bool) -> None:
        self.app = app
        self.admitted = admitted
        self.client: str | None = None  # the client whose count of requests we raised

    def free(self) -> None:
        if self.admitted:
            self.admitted = False
            self.app.admission.leave()
        if self.client is not None:
            self.app.client_keys.leave(self.client)  # type: ignore[union-attr]
            self.client = None


class Admission:
    """The bound on proxy requests in flight (``MAX_CONCURRENT_REQUESTS``): past it, a
    request is answered 503 with ``Retry-After`` at once, before its body is read, instead
    of adding to a backlog whose memory and latency would grow without limit."""

    __slots__ = ("in_flight", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def enter(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1


def _wanted_headers(
    raw: list[tuple[bytes, bytes]], wanted: frozenset[bytes] = _WANTED_HEADERS
) -> dict[str, str]:
    """The headers the proxy routes read (``wanted``), each the first of its name, as
    Quart's routes read them (two X-Request-IDs were the last one here, the first there)."""
    found: dict[str, str] = {}
    for name, value in raw:
        name = name.lower()
        if name in wanted:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


class _ShutdownWhileReading(ProxyError):
    """A request whose body was still arriving when the shutdown ended the wait for it."""

    quiet = True  # counted (503), as the requests the shutdown answers while they wait


class _Body:
    """A request body as its ``http.request`` events arrive, bounded by ``limit``."""

    __slots__ = ("limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, event: HTTPReceiveEvent) -> bool:
        """Take one event: True once the body is whole, ClientLeft on a disconnect."""
        if event["type"] == "http.disconnect":
            raise ClientLeft
        chunk = event.get("body", b"")
        if chunk:
            self.size += len(chunk)
            if self.size > self.limit:
                raise _too_large(self.limit)
            self.parts.append(chunk)
        return not event.get("more_body", False)

    async def whole(self) -> bytes:
        # a small body comes in one part: no coroutine for it (~55 ns)
        parts = self.parts
        return parts[0] if len(parts) == 1 else await joined(parts, self.size)


async def _read_body(app: ProxyApp, receive: HTTPReceive, declared: str | None) -> bytes:
    limit = app.settings.max_request_bytes
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = _Body(limit)
    if _took_queued(receive, body):
        return await body.whole()
    # the whole body within body_timeout, and no stall longer than CLIENT_BODY_TIMEOUT: a
    # request holds its slot under MAX_CONCURRENT_REQUESTS while its body is awaited, so
    # headers alone must not hold one for the whole body timeout
    stall = app.settings.client_body_timeout
    whole_by = trio.current_time() + app.body_timeout
    # the body is awaited as the backend is (``InProgress``): a shutdown answers a request
    # still sending it a little before hypercorn's grace period runs out, which cut it with
    # an empty 500 (recorded as a client that left, 499). One scope for the three
    # deadlines: a second one per request cost ~5 us
    in_progress = app.in_progress
    with trio.CancelScope(
        deadline=min(whole_by, trio.current_time() + stall, in_progress.end_at)
    ) as scope:
        in_progress.add(scope)
        try:
            seen = body.size
            while not body.add(await receive()):
                if body.size > seen:  # bytes came: the stall's deadline moves (~1.5 µs)
                    seen = body.size
                    now = trio.current_time()
                    scope.deadline = min(whole_by, now + stall, in_progress.end_at)
        finally:
            in_progress.discard(scope)
    if scope.cancelled_caught:
        if trio.current_time() >= in_progress.end_at:
            raise _ShutdownWhileReading(SHUTDOWN_READING_MESSAGE, 503)
        if trio.current_time() >= whole_by:
            raise ProxyError(f"the request body did not arrive within {app.body_timeout:g} s", 408)
        raise ProxyError(f"the request body stalled: no bytes for {stall:g} s", 408)
    return await body.whole()


def _took_queued(receive: HTTPReceive, body: _Body) -> bool:
    """Give ``body`` the events already in the server's queue (hypercorn's ``receive``
    is a trio channel's), without a scheduler round or a cancel scope each: True when
    they hold the whole body, as they usually do for a body sent with its head."""
    take = getattr(getattr(receive, "__self__", None), "receive_nowait", None)
    if take is None:  # another server: every event awaited
        return False
    while True:
        try:
            event = take()
        except trio.WouldBlock:
            return False
        if body.add(event):
            return True


# a refused request's body up to this size is read and dropped, so its connection serves
# the next request (a client retrying a 429 or 503 keeps its connection)
_DISCARDED_BODY_LIMIT = 64 * 1024
_DISCARD_SECONDS = 1.0


async def _discard_body(
    receive: HTTPReceive, declared: str | None, error: ProxyError, shutdown: InProgress
) -> bool:
    """Read and drop a refused request's small body; whether the connection can go on."""
    if (
        error.status in (408, 413)
        or isinstance(error, _ShutdownWhileReading)
        or declared is None
        or not declared.isdigit()
    ):
        return False  # the body is partly read, too large, or of unknown length
    if int(declared) > _DISCARDED_BODY_LIMIT:
        return False
    # and no longer than the shutdown allows: a refusal still waiting here when the server
    # was stopped was cut with an empty 500; it goes out at once, saying the connection closes
    with shutdown.tracking(), trio.move_on_after(_DISCARD_SECONDS):
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return False
            if not event.get("more_body", False):
                return True
    return False


def _too_large(limit: int) -> ProxyError:
    return ProxyError(body_too_large_message(limit), 413)


async def _watch_disconnect(
    receive: HTTPReceive, scope: trio.CancelScope, response: CountingSend
) -> None:
    """Cancel the request when the client leaves before its response is complete."""
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            if not response.finished:
                scope.cancel()
            return


async def _run(handler: Handler, call: Call) -> Reply:
    try:
        reply = await handler(call)
        secrets = call.app.settings.backend_secrets
        body = reply.body
        # exchange.masked_reply, inline: its coroutine cost 0.1 us a request
        if secrets.replies and type(body) is bytes and len(body) > MASKED_AT_ONCE_BYTES:
            reply.body = await masked_in_pieces(body, secrets)
            return reply
        return masked(reply, secrets)
    except ProxyError as error:
        return _failure(error, call)
    except Exception:
        return _unexpected(call)


async def _answer(
    handler: Handler,
    call: Call,
    in_progress: InProgress,
    tracked: Tracked,
    cors: list[tuple[str, str]],
    early: EarlyStart | None,
) -> tuple[Reply, list[Header]]:
    """``_run``, and for a stream its first chunk (``_read_first``), with the response's
    head (X-Proxy-Overhead-Ms: up to the backend's headers). Both phases are ended a little
    before hypercorn's grace period runs out, in one tracked scope (a second cost ~50k
    machine instructions per stream): a shutdown while the backend has not answered is a
    503 in the caller's dialect (a request still waiting then would be cut without any
    response), one while a stream's first chunk is awaited ends the stream as a 503."""
    reply: Reply | None = None
    with in_progress.tracking():
        reply = await _run(handler, call)
        head = _head(reply, tracked, cors)
        if isinstance(reply.body, bytes):
            return reply, head
        if early is not None and reply.content_type == early.content_type:
            early.head = head  # a start while the first event is awaited sends it
        failed = await _read_first(reply, call)
        if failed is None:
            return reply, head
        # the time a failure took is not the proxy's overhead: no such header
        return failed, _head(failed, tracked, cors, overhead=False)
    # only a shutdown's deadline gets here
    if reply is None:
        # like any failure before the backend's headers, recorded with its status
        note_ended_waiting(call.state.metric)
        waiting = error_reply(call.path, SHUTDOWN_WAITING_MESSAGE, 503)
        return waiting, _head(waiting, tracked, cors)
    await reply.body.aclose()  # type: ignore[union-attr]
    if call.state.metric is not None:
        call.state.metric.stream_outcome = "error"  # a stream the shutdown ended
    ended = error_reply(call.path, SHUTDOWN_MESSAGE, 503)
    return ended, _head(ended, tracked, cors, overhead=False)


def note_ended_waiting(metric: RequestMetrics | None) -> None:
    """A stream request (a stream from the start: ``forward.open_stream``) the shutdown
    answered before the backend did failed, as one it ends later does: its 503 went out
    whole, which counted it as a completed stream."""
    if metric is not None and metric.streaming:
        metric.stream_outcome = "error"


def _unexpected(call: Call) -> Reply:
    """Our own bug: logged with its trace, a 500 for the client."""
    log.exception("unhandled error while serving POST %s", call.path)
    return internal_error_reply(call.path)


def _failure(error: ProxyError, call: Call) -> Reply:
    return proxy_error_reply(error, call.path, call.app.settings.backend_secrets, call.state)


async def _read_first(reply: Reply, call: Call) -> Reply | None:
    """Read a stream's first chunk into ``reply.first`` before the response starts. Until
    then nothing has been sent, so a failure (the first-token deadline, a backend that
    hangs up, an error event before any output) gets a real status and a JSON body in the
    caller's dialect: the reply to send instead, else None."""
    body: AsyncIterator[bytes] = reply.body  # type: ignore[assignment]
    try:
        reply.first = await anext(body, None)
    except ProxyError as error:
        return _failure(error, call)
    except Exception:
        return _unexpected(call)
    return None


def _early_start(
    app: ProxyApp, tracked: Tracked, headers: dict[str, str], nursery: trio.Nursery
) -> EarlyStart:
    """What starts a stream's response before its backend's first event, once that has
    been awaited ``STREAM_KEEPALIVE_SECONDS`` (a route says when its stream's request
    goes out: ``keepalive.stream_opening``); its timer and comments are tasks of
    ``nursery``, the request's."""
    send = tracked.send

    async def start(content_type: str, head: list[Header] | None) -> None:
        if head is None:  # the backend has not answered: none of its headers, and no
            # X-Proxy-Overhead-Ms (the metrics get it later)
            reply = Reply(200, b"", content_type, dict(STREAM_HEADERS))
            head = _head(reply, tracked, app.cors_headers(headers.get("origin")), overhead=False)
        await send({"type": "http.response.start", "status": 200, "headers": head})

    return EarlyStart(app.settings.stream_keepalive_seconds, send.server_send, send, nursery, start)


async def _write_started(
    send: CountingSend,
    reply: Reply,
    tracked: Tracked,
    streams: InProgress,
    written: Callable[[], None],
    early: EarlyStart,
) -> None:
    """The reply to the client after its response started early (``EarlyStart``): a
    stream's chunks, with the comments going on in its silences; a failure as the
    stream's in-band error (the client has its 200: no status, no retry) while the
    metrics and the access log keep what happened."""
    keeper = early.keeper
    assert keeper is not None  # (started)
    if not isinstance(reply.body, bytes):
        try:
            await _stream(send, reply, tracked, streams, written, keeper=keeper)
        finally:
            keeper.stop()
        return
    try:
        if reply.status >= 400:
            _note_failed_after_start(tracked, reply.status)
            body = in_band_failure(
                early.content_type, reply.status, reply.body, responses=early.responses
            )
        else:
            body = reply.body  # (no route answers a stream's request so; as it came)
        if body:
            send.count(body)
            await keeper.send_chunk(body)
    finally:
        keeper.stop()
    await keeper.settled()
    written()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _note_failed_after_start(tracked: Tracked, status: int) -> None:
    """A stream's failure after its response started early, recorded as one that broke
    mid-stream: its outcome (``timeout`` if a deadline ran out, else ``error``), and the
    status its error reply had, which the metrics' effective status keeps (a backend's
    429 counts as the 429 it is without the early start: a client error, not a 502 in
    the 5xx error rate). The access log has the 200 the client got, the outcome and that
    status (``(error: 429)``)."""
    tracked.status = status
    metric = tracked.state.metric
    if metric is None:
        return
    metric.streaming = True  # (a backend's 4xx is otherwise a refused request, no stream)
    metric.answered_plainly = True  # its error event is no stream traffic of the backend's
    if metric.stream_outcome is None:
        metric.stream_outcome = "error"


def _head(
    reply: Reply, tracked: Tracked, extra: list[tuple[str, str]], *, overhead: bool = True
) -> list[Header]:
    headers = [(b"content-type", reply.content_type.encode("latin-1"))]
    headers += [_encoded(item) for item in reply.headers.items()]
    headers += tracked.raw_response_headers(reply.status, overhead_header=overhead)
    headers += [_encoded(item) for item in extra]
    return headers


async def _write(
    send: CountingSend,
    reply: Reply,
    headers: list[Header],
    tracked: Tracked,
    streams: InProgress,
    written: Callable[[], None] | None = None,
    nursery: trio.Nursery | None = None,
) -> None:
    """The reply to the client; ``written`` runs once its body is out: after a whole
    body's send, and before a stream's empty last event (the client may have read its
    last chunk and sent its next request before that event's send returns). A stream with
    keep-alive comments (``reply.keepalive``) has their task in ``nursery``, the
    response's."""
    body = reply.body
    if isinstance(body, bytes):
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        if written is not None:
            written()
        return
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await _stream(send, reply, tracked, streams, written, nursery)


async def _stream(
    send: CountingSend,
    reply: Reply,
    tracked: Tracked,
    streams: InProgress,
    written: Callable[[], None] | None = None,
    nursery: trio.Nursery | None = None,
    keeper: KeepAlive | None = None,
) -> None:
    """A stream's body after its head: ``_write``'s, or with the comments of ``keeper``
    (already running) after an early start."""
    body: AsyncIterator[bytes] = reply.body  # type: ignore[assignment]
    # the chunks (never the last body event) go to the server directly, counted on the way;
    # on hypercorn's HTTP/1.1 streams past its event layers (patch 20)
    count, send_chunk = send.count, chunk_sender(send.server_send)
    with streams.tracking() as scope:
        async with aclosing(body) as chunks:  # type: ignore[type-var]
            if keeper is not None:
                await _send_kept_alive(send, reply, chunks, keeper)
            elif reply.keepalive and nursery is not None:
                await _write_kept_alive(send, reply, chunks, nursery)
            else:
                if reply.first is not None:
                    count(reply.first)
                    await send_chunk(reply.first)
                async for chunk in chunks:
                    count(chunk)
                    await send_chunk(chunk)
    ended = reply.end is not None and reply.end.reached
    if scope.cancelled_caught and not ended:  # shutting down: end in-band, not mid-chunk
        end = stream_end_error(
            reply.content_type, reply.end, SHUTDOWN_MESSAGE, "service_unavailable"
        )
        if end:
            await send({"type": "http.response.body", "body": end, "more_body": True})
        _note_shutdown(tracked)
    if written is not None:
        written()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _write_kept_alive(
    send: CountingSend, reply: Reply, chunks: AsyncIterator[bytes], nursery: trio.Nursery
) -> None:
    """A stream's chunks, with a keep-alive comment in every silence of
    ``reply.keepalive`` s (STREAM_KEEPALIVE_SECONDS) between them."""
    beat = beat_for(reply.content_type)
    keeper = KeepAlive(reply.keepalive, send.server_send, send, beat)
    nursery.start_soon(keeper.run)
    await _send_kept_alive(send, reply, chunks, keeper)


async def _send_kept_alive(
    send: CountingSend, reply: Reply, chunks: AsyncIterator[bytes], keeper: KeepAlive
) -> None:
    """A stream's chunks through ``keeper`` (running), which is stopped at their end."""
    count = send.count
    try:
        if reply.first is not None:
            count(reply.first)
            await keeper.send_chunk(reply.first)
        async for chunk in chunks:
            count(chunk)
            await keeper.send_chunk(chunk)
        await keeper.settled()  # the end goes out after a comment being written
    finally:
        keeper.stop()


SHUTDOWN_MESSAGE = "the proxy is shutting down; the stream ended before the backend finished"
SHUTDOWN_WAITING_MESSAGE = "the proxy is shutting down; the backend did not answer in time"
SHUTDOWN_READING_MESSAGE = "the proxy is shutting down; the request body did not arrive in time"


def _note_shutdown(tracked: Tracked) -> None:
    metric = tracked.state.metric
    if metric is not None:
        metric.status_code = 503  # the effective status of a stream cut short by us
        metric.stream_outcome = "error"


class InProgress:
    """The proxy requests in progress (receiving their body, waiting for the backend, or
    writing a stream), so that a shutdown can answer them a little before hypercorn's
    grace period runs out and it cuts them without a response or mid-chunk: a 503 for
    those still waiting, an in-band end for streams.

    Each phase runs in a cancel scope of its own (never inside the relay's generator);
    ``begin_shutdown`` gives every scope, and every later one, the deadline
    ``grace - margin`` from now."""

    __slots__ = ("_end_at", "_scopes")

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._end_at = math.inf

    def begin_shutdown(self, grace: float) -> None:
        self._end_at = trio.current_time() + grace - min(SHUTDOWN_MARGIN, grace / 4)
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, self._end_at)

    def __len__(self) -> int:
        return len(self._scopes)

    @property
    def end_at(self) -> float:
        """When a shutdown answers the requests in progress (``inf`` until one begins)."""
        return self._end_at

    def add(self, scope: trio.CancelScope) -> None:
        """Track a scope of the caller's, whose deadline it keeps at most ``end_at``
        (also when it moves it); :meth:`discard` it when it ends."""
        self._scopes.add(scope)

    def discard(self, scope: trio.CancelScope) -> None:
        self._scopes.discard(scope)

    def tracking(self) -> _Tracking:
        """``with in_progress.tracking() as scope:`` a cancel scope with the shutdown's
        deadline, tracked while it is open."""
        return _Tracking(self._scopes, trio.CancelScope(deadline=self._end_at))


class _Tracking:
    """:meth:`InProgress.tracking`'s context manager: a class, not a ``@contextmanager``
    generator, whose creation, two resumptions and ``StopIteration`` cost about 1.5 µs
    per proxied request (a stream pays it twice)."""

    __slots__ = ("_scope", "_scopes")

    def __init__(self, scopes: set[trio.CancelScope], scope: trio.CancelScope) -> None:
        self._scopes = scopes
        self._scope = scope

    def __enter__(self) -> trio.CancelScope:
        scope = self._scope.__enter__()
        self._scopes.add(scope)
        return scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._scopes.discard(self._scope)
        return self._scope.__exit__(exc_type, exc, traceback)


SHUTDOWN_MARGIN = 0.5  # seconds before the grace period ends that requests are answered


def _encoded(item: tuple[str, str]) -> tuple[bytes, bytes]:
    return item[0].lower().encode("latin-1"), item[1].encode("latin-1")
