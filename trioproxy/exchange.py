"""One proxied exchange, independent of the web framework.

A route handler receives a ``Call`` (the app, the request's bookkeeping, its path and
body) and returns a ``Reply`` (status, content type, headers, and either bytes or an
async iterator of chunks). The same handler is served by the ASGI fast path
(``fastpath``) and through Quart (``app``); ``Tracked`` is the bookkeeping both share:
request id, timing to the last byte, bytes sent, the request's cleanups, and the metrics
record handed over exactly once.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.typing import ASGISendCallable, ASGISendEvent

from .client_address import UNKNOWN as UNKNOWN_ADDRESS
from .client_address import ClientAddresses, peer_address
from .errors import (
    MASKED_AT_ONCE_BYTES,
    BackendSecrets,
    ProxyError,
    SecretsMask,
    UpstreamStatusError,
    bounded,
    error_body_for,
    is_openai_path,
    scrub,
)
from .hypercorn_patches import (
    REFUSED_MID_REQUEST,
    REQUEST_ID_MID_REQUEST,
    write_cut,
    write_cut_by_shutdown,
)
from .json_threads import joined
from .jsonutil import loads
from .logs import ACCESS_LOGGER, REMOTE_ADDR_FIELD, REQUEST_ID_OK, request_id_var
from .metrics import MetricsCollector, RequestMetrics
from .metrics.labels import (
    METHOD_LIMIT,
    PATH_LIMIT,
    STATUS_CLIENT_CLOSED,
    UNTRACKED_PATHS,
    clipped,
    loggable_path,
    loggable_query,
)
from .metrics.store import effective_status

if TYPE_CHECKING:
    from .app import ProxyApp
    from .keepalive import EarlyStart

log = logging.getLogger("trioproxy")

OVERHEAD_HEADER = "X-Proxy-Overhead-Ms"
# Anthropic's name for a response's request id, which the anthropic SDKs read (a message's
# ``_request_id``, an error's ``request_id``): sent beside X-Request-ID on /v1/messages only
ANTHROPIC_REQUEST_ID = "request-id"
_ANTHROPIC_REQUEST_ID_RAW = ANTHROPIC_REQUEST_ID.encode()
_OVERHEAD_HEADER_RAW = OVERHEAD_HEADER.lower().encode("latin-1")
JSON = "application/json"


# sent by the Stainless-generated SDKs (openai-python, openai-node, and what builds on
# them, LangChain's ChatOpenAI among them) on every attempt: the client retries by itself
CLIENT_RETRIES_NAME = "x-stainless-retry-count"
CLIENT_RETRIES_HEADER = CLIENT_RETRIES_NAME.encode()

# W3C Trace Context: passed on to the backend, so a client's trace goes on in a backend
# that traces (vLLM, LiteLLM, any OpenTelemetry-instrumented server)
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_HEADERS = frozenset({TRACEPARENT.encode(), TRACESTATE.encode()})
# version 00's form (a later version may append fields: read as far as 00's); an all-zero
# trace or parent id is invalid, and so is version ff
_TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(-[ -~]*)?"
)
MAX_TRACESTATE_CHARS = 512  # the size the specification asks vendors to keep it within


def trace_context(traceparents: list[str], tracestates: list[str]) -> dict[str, str] | None:
    """The trace headers to send the backend, from every copy of each the client sent: one
    valid ``traceparent`` (else none, as the specification says: restart the trace rather
    than pass on a broken one, and two are as broken as a malformed one) and its
    ``tracestate`` headers combined into one, as HTTP combines a list header's copies, when
    the whole is printable ASCII and at most MAX_TRACESTATE_CHARS long."""
    if len(traceparents) != 1:
        return None
    traceparent = traceparents[0]
    if not traceparent or len(traceparent) > 256 or not _TRACEPARENT.fullmatch(traceparent):
        return None
    if traceparent.startswith("00-") and len(traceparent) != 55:
        return None  # version 00 has exactly four fields
    trace = {TRACEPARENT: traceparent}
    tracestate = ",".join(tracestates)
    # printable ASCII, as the specification's grammar: a client's other bytes arrive as
    # latin-1 text, which httpx cannot encode (the request would fail with a 500)
    if (
        tracestate
        and len(tracestate) <= MAX_TRACESTATE_CHARS
        and tracestate.isascii()
        and tracestate.isprintable()
    ):
        trace[TRACESTATE] = tracestate
    return trace


def trace_context_of_raw(raw: list[tuple[bytes, bytes]]) -> dict[str, str] | None:
    """trace_context of ASGI's raw headers: read only when a ``traceparent`` is there, so
    untraced requests pay nothing for the rescan."""
    found: dict[bytes, list[str]] = {TRACEPARENT.encode(): [], TRACESTATE.encode(): []}
    for name, value in raw:
        name = name.lower()
        if name in TRACE_HEADERS:
            found[name].append(value.decode("latin-1"))
    return trace_context(found[TRACEPARENT.encode()], found[TRACESTATE.encode()])


@dataclass(slots=True)
class RequestState:
    """Per-request bookkeeping shared by the connection adapter and the handlers."""

    request_id: str
    metric: RequestMetrics | None
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    client: str = ""  # the client's name, from its key (PROXY_API_KEYS)
    # the client retries failed requests itself (the openai SDKs say so with their
    # x-stainless-retry-count header): the proxy's own retries would multiply with its
    client_retries: bool = False
    trace: dict[str, str] | None = None  # the client's trace context, for the backend
    # a stream's response may start before the backend's first event (keepalive.EarlyStart,
    # with STREAM_KEEPALIVE_SECONDS; fast path only)
    early_start: EarlyStart | None = None


@dataclass(slots=True)
class Call:
    app: ProxyApp
    state: RequestState
    path: str
    body: bytes


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes | AsyncIterator[bytes]
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    first: bytes | None = None  # a stream's first chunk, read before the response starts
    end: Any = None  # a stream's relay.StreamEnd: whether its last line is out
    # seconds of silence after which an SSE stream gets a keep-alive comment; 0: never
    keepalive: float = 0.0


Handler = Callable[[Call], Awaitable[Reply]]


async def primed(reply: Reply) -> Reply:
    """A stream's reply once its first chunk is there (``reply.first``). Until then nothing
    has been sent, so a failure before it (the first-token deadline, an error event from the
    backend, a broken connection) raises its ``ProxyError`` from the stream and gets a real
    status and a JSON body in the caller's dialect, not a 200 and one error line."""
    if not isinstance(reply.body, bytes):
        reply.first = await anext(reply.body, None)
    return reply


# (errors.MASKED_AT_ONCE_BYTES) a reply body up to this size is masked in one go
# (:func:`masked`); a larger one in pieces of this size, other tasks run between them
# (:func:`masked_in_pieces`); a stream's chunk so when it holds a backslash
# (:func:`fed_in_pieces`)


async def masked_reply(reply: Reply, secrets: BackendSecrets) -> Reply:
    """:func:`masked`, a body over MASKED_AT_ONCE_BYTES masked in pieces: one search of
    a 30 MB answer held the event loop 30-40 ms, one with ``\\u`` escapes (Python's
    JSON writes every character past ASCII so) about 300 ms, every stream standing still."""
    body = reply.body
    if secrets.replies and type(body) is bytes and len(body) > MASKED_AT_ONCE_BYTES:
        reply.body = await masked_in_pieces(body, secrets)
        return reply
    return masked(reply, secrets)


async def masked_in_pieces(body: bytes, secrets: BackendSecrets) -> bytes:
    """``secrets.mask_body(body)``, the same bytes, by the stream mask (whose reads add up
    to it) over pieces of MASKED_AT_ONCE_BYTES with a checkpoint between them: each
    search is one call into C, which a thread would not interrupt either (it keeps the
    GIL), so it is the pieces that let the loop serve. The body itself when nothing was
    masked (the usual answer): not joined again."""
    mask = secrets.stream_mask()
    parts, size = await _fed(mask, body)
    rest = mask.flush()
    if not parts:
        if size + len(rest) == len(body) and body.startswith(rest, size):
            return body
        parts.append(body[:size])
    parts.append(rest)
    return await joined(parts, size + len(rest))


async def fed_in_pieces(mask: SecretsMask, data: bytes) -> bytes:
    """``mask.feed(data)`` for a chunk the mask would not search in one call (its None),
    in pieces of MASKED_AT_ONCE_BYTES with a checkpoint between them."""
    parts, size = await _fed(mask, data)
    return await joined(parts, size) if parts else data[:size]


async def _fed(mask: SecretsMask, data: bytes) -> tuple[list[bytes], int]:
    """``data`` fed to ``mask`` in pieces of MASKED_AT_ONCE_BYTES, the loop serving
    between them: what went out (``size`` bytes) in parts, none while it is ``data``'s
    own start (a comparison, no copy: a second copy of a 40 MB answer was kept until its
    last piece)."""
    parts: list[bytes] = []
    size = 0
    for at in range(0, len(data), MASKED_AT_ONCE_BYTES):
        await trio.lowlevel.checkpoint()
        out = mask.feed(data[at : at + MASKED_AT_ONCE_BYTES])
        assert out is not None  # (a piece is never too large)
        if not parts:
            if data.startswith(out, size):
                size += len(out)
                continue
            parts.append(data[:size])  # the start that went out as it was
        parts.append(out)
        size += len(out)
    return parts, size


def masked(reply: Reply, secrets: BackendSecrets) -> Reply:
    """``reply`` with the backend's secrets (``secrets.replies``: its key, the credentials in
    its URL, as sent) replaced by ``***`` in its body: a backend that quotes our credentials,
    in an echo or in generated text, must not hand them to a client. A stream is masked as
    it goes, also where a read ends inside a secret."""
    if not secrets.replies:
        return reply
    body = reply.body
    if isinstance(body, bytes):
        reply.body = secrets.mask_body(body)
    else:
        reply.body = _masked_chunks(body, secrets)
    return reply


async def _masked_chunks(
    chunks: AsyncIterator[bytes], secrets: BackendSecrets
) -> AsyncIterator[bytes]:
    mask = secrets.stream_mask()
    async with aclosing(chunks):  # type: ignore[type-var]
        async for chunk in chunks:
            out = mask.feed(chunk)
            if out:
                yield out
            elif out is None and (out := await fed_in_pieces(mask, chunk)):
                yield out  # too large to search at once (tested only when out is falsy)
    rest = mask.flush()
    if rest:
        yield rest


def new_state(
    collector: MetricsCollector,
    path: str,
    method: str,
    request_id: str | None,
    content_length: str | None,
) -> RequestState:
    if not request_id or not REQUEST_ID_OK.fullmatch(request_id):
        request_id = os.urandom(16).hex()  # uuid4's entropy in its hex form, at a fifth of its cost
    metric = None
    if collector.enabled and path not in UNTRACKED_PATHS:
        # the api label follows from the path when the record is counted
        metric = RequestMetrics(path, method)
        if content_length and content_length.isdigit():
            metric.request_size = int(content_length)
    return RequestState(request_id, metric)


def note_client(state: RequestState, client: str | None) -> None:
    """The client's name (from its key) for the metrics and the access log."""
    if client:
        state.client = client
        if state.metric is not None:
            state.metric.client = client


class CountingSend:
    """Counts body bytes on their way out; for streams, each body send is one chunk.

    ``finished`` turns true when the last body event is handed to the server: hypercorn
    reports a client's close from inside that final send, so the cancellation that
    follows must not turn a fully sent response into a "cancelled" one."""

    __slots__ = ("_metric", "finished", "sent", "server_send", "status")

    def __init__(self, send: ASGISendCallable, metric: RequestMetrics | None) -> None:
        self.server_send = send
        self._metric = metric
        self.sent = 0
        self.finished = False
        self.status = 0  # the status of the response head handed to the server, once it is

    async def __call__(self, event: ASGISendEvent) -> None:
        if event["type"] == "http.response.body":
            if not event.get("more_body", False):
                self.finished = True
            self.count(event.get("body", b""))
        elif event["type"] == "http.response.start" and not self.status:
            self.status = event["status"]
        await self.server_send(event)

    def count(self, body: bytes) -> None:
        """Count a body event's bytes (and, for a stream, its chunk) that goes out next.
        A stream's loop calls this and then ``server_send`` with a chunk (``more_body``)
        itself: per relayed chunk, one coroutine and the event's inspection less (counting
        and sending a chunk: 0.54 µs before, 0.35 µs so)."""
        if body:
            self.sent += len(body)
            metric = self._metric
            if metric is not None and metric.streaming and not metric.answered_plainly:
                metric.add_chunk(len(body))


class Tracked:
    """``async with Tracked(...) as send:`` around serving one request.

    On exit, whatever happened (a reply, an error, the client leaving, cancellation), the
    request's cleanups run (shielded, bounded) and its metrics record is finished and
    handed to the collector once."""

    __slots__ = (
        "_access",
        "_anthropic",
        "_collector",
        "_scope",
        "_token",
        "send",
        "state",
        "status",
    )

    def __init__(
        self,
        collector: MetricsCollector,
        state: RequestState,
        send: ASGISendCallable,
        access: AccessLine | None = None,
        scope: Mapping[str, Any] | None = None,
        anthropic: bool = False,
    ) -> None:
        self._collector = collector
        self.state = state
        self.send = CountingSend(send, state.metric)
        self._access = access
        self._scope = scope  # the request's ASGI scope, where the server notes a refusal
        self.status = 0
        # an answer on the Anthropic route (``errors.is_anthropic_path``): its id goes out
        # under Anthropic's name too. Decided by the caller, where the check is cheapest
        self._anthropic = anthropic

    async def __aenter__(self) -> CountingSend:
        self._token = request_id_var.set(self.state.request_id)
        if self.state.metric is not None:
            self._collector.request_started()
        return self.send

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await _run_cleanups(self.state)
        finally:
            if self.send.finished and write_cut.get():
                self.send.finished = False  # handed to the server, but never delivered whole
            if self._scope is not None:
                if not self.send.finished:
                    self._note_refusal(self._scope)
                if self._scope.get("method") == "HEAD":
                    self.send.sent = 0  # the server drops the body of a HEAD's answer
            metric = self.state.metric
            if metric is not None:
                send = self.send
                if send.finished and not metric.streaming:
                    # all _finish_metric does for an answer without a stream sent whole,
                    # inline: its call, five arguments and the context read cost ~1.4k
                    # machine instructions of the ~20k metrics add to a request
                    metric.response_size = send.sent
                    if not metric.duration_ms:
                        metric.duration_ms = (time.perf_counter() - metric.start) * 1000.0
                else:
                    by_proxy = _stopped_at_once or write_cut_by_shutdown.get()
                    _finish_metric(metric, send.finished, error, send.sent, by_proxy)
                self._collector.request_finished(metric)
            if self._access is not None:
                self._access.write(self.status, self.send, metric, self.state.client)
            # Kept when an error escapes (or the bookkeeping above raised): the server
            # logs it in this task once the app returns ("Error in ASGI Framework"), and
            # that line is about this request. The task is the request's own (the server
            # starts one per request, with a copy of the context), so the id ends with it.
            if error is None or not _server_logs(error):
                request_id_var.reset(self._token)

    def _note_refusal(self, scope: Mapping[str, Any]) -> None:
        """The server answered the request itself (a malformed body: see hypercorn_patches
        9) while the app read it: the client got that answer, whole, under the id it
        carries (the client's, or one the server made: the app's is only its own until
        then, and costs nothing per request so), which the access line names too."""
        status = scope.get(REFUSED_MID_REQUEST)
        if status is not None:
            self._note_status(status)
            self.send.finished = True
            self.state.request_id = scope[REQUEST_ID_MID_REQUEST]
            request_id_var.set(self.state.request_id)  # reset to before the request below

    def response_headers(self, status: int) -> list[tuple[str, str]]:
        """What every response gets: its request id and, when a backend answered, the
        time the proxy itself added. Also notes the status for the metrics."""
        headers = [("X-Request-ID", self.state.request_id)]
        if self._anthropic:
            headers.append((ANTHROPIC_REQUEST_ID, self.state.request_id))
        overhead = self._note_status(status, overhead_shown=True)
        if overhead is not None:
            headers.append((OVERHEAD_HEADER, f"{overhead:.3f}"))
        return headers

    def raw_response_headers(
        self, status: int, *, overhead_header: bool = True
    ) -> list[tuple[bytes, bytes]]:
        """:meth:`response_headers`, encoded for an ASGI response start."""
        request_id = self.state.request_id.encode("latin-1")
        headers = [(b"x-request-id", request_id)]
        if self._anthropic:
            headers.append((_ANTHROPIC_REQUEST_ID_RAW, request_id))
        overhead = self._note_status(status, overhead_shown=overhead_header)
        if overhead is not None and overhead_header:
            headers.append((_OVERHEAD_HEADER_RAW, b"%.3f" % overhead))
        return headers

    def _note_status(self, status: int, *, overhead_shown: bool = False) -> float | None:
        """Note the status for the metrics; the time the proxy added (ms), if a backend
        answered. ``overhead_shown``: it goes out in the response's head, where a stream's
        overhead is fixed: what it waits for after (the first token) is the model's time,
        not the proxy's (noted here, not by a call of its own: a call less per request)."""
        self.status = status
        metric = self.state.metric
        if metric is None:
            return None
        metric.status_code = status
        upstream = metric.upstream_first_byte_ms if metric.streaming else metric.upstream_ms
        if upstream is None:
            return None
        # metric.elapsed_ms(), inline: a call less per request with metrics on
        overhead = (time.perf_counter() - metric.start) * 1000.0 - upstream - metric.body_wait_ms
        if not overhead > 0.0:  # (-0.0 too: "0.000", never "-0.000")
            overhead = 0.0
        if overhead_shown and metric.streaming:
            metric.overhead_ms = overhead
        return overhead


access_log = logging.getLogger(ACCESS_LOGGER)


class AccessLine:
    """``ACCESS_LOG=true``: one INFO line per request on logger ``trioproxy.access`` when
    it is finished, with its request id (as every line about a request). The client's
    address (``client_address``: the peer, or the client a trusted proxy names), method,
    path (percent-encoded where it holds anything but plain URL characters, so a client's
    ``%0a`` cannot forge a line) and query (credential parameters masked), the status the
    client got, duration, bytes sent and, for a stream, how it ended; never headers or
    bodies, so nothing secret. Off by default: a line per request
    costs a few percent of one."""

    __slots__ = ("_addresses", "_scope", "method", "path", "started")

    def __init__(
        self, method: str, path: str, scope: Mapping[str, Any], addresses: ClientAddresses
    ) -> None:
        self.method = method
        self.path = path
        self.started = time.perf_counter()
        # the address is worked out when the line is written, not per request before
        self._scope = scope
        self._addresses = addresses

    def write(
        self, status: int, send: CountingSend, metric: RequestMetrics | None, client: str = ""
    ) -> None:
        outcome = metric.stream_outcome if metric is not None and metric.streaming else None
        if send.status:
            # the status the client got, as a web server logs it: a stream that failed
            # after its 200 went out is "200 ... (error)", which the metrics count by its
            # outcome (502; a timeout 504, a client that left 499). Where they count
            # another status, the line says which: "(error: 429)" for a failure after an
            # early start (STREAM_KEEPALIVE_SECONDS: a refusal stays the client's),
            # "(error: 503)" for a stream the shutdown cut, "(error: 500)" for our bug
            if outcome is not None and metric is not None:
                counted = effective_status(metric.status_code, outcome)
                if counted != effective_status(send.status, outcome):
                    outcome = f"{outcome}: {counted}"
            status = send.status
        elif metric is not None and (metric.status_code or outcome):
            # no head went out (a stream its client left before the backend answered,
            # one the server answered itself): the status the metrics record (499)
            status = effective_status(metric.status_code, outcome)
        if not send.finished and outcome is None:
            outcome = _unfinished(status, metric)
        address = self._addresses.of(self._scope)
        path, query = loggable_path(self.path), self._scope.get("query_string")
        target = f"{path}?{loggable_query(query)}" if query else path
        # method and path come from the client: escaped, so one request is one line
        access_log.info(
            "%s %s %s %s %.1f ms %d B%s%s",
            address,
            clipped(loggable_path(self.method), METHOD_LIMIT),
            clipped(target, PATH_LIMIT),  # the status after it is kept
            status or "-",
            self._duration_ms(metric),
            send.sent,
            f" ({outcome})" if outcome else "",
            f" client={client}" if client else "",
            extra={REMOTE_ADDR_FIELD: address},
        )

    def write_socket(self, sent: int, detail: str, client: str = "") -> None:
        """The line of a WebSocket served on this path, when it closes: its handshake's
        101, its whole life, the bytes of the messages it sent (text as characters) and
        ``detail`` (its turns, why it closed). Its turns have lines of their own."""
        address = self._addresses.of(self._scope)
        access_log.info(
            "%s %s %s 101 %.1f ms %d B (%s)%s",
            address,
            self.method,
            clipped(loggable_path(self.path), PATH_LIMIT),
            (time.perf_counter() - self.started) * 1000.0,
            sent,
            detail,
            f" client={client}" if client else "",
            extra={REMOTE_ADDR_FIELD: address},
        )

    def _duration_ms(self, metric: RequestMetrics | None) -> float:
        # the metrics' own duration where there is one, so the line and the histogram
        # agree: it ends at the reply, not at work after it (a Responses settle)
        if metric is not None and metric.duration_ms:
            return metric.duration_ms
        return (time.perf_counter() - self.started) * 1000.0


def _unfinished(status: int, metric: RequestMetrics | None) -> str:
    """How a reply that did not go out whole ended (a stream says it by its outcome), as
    the metrics count it (``_finish_metric``): cut by the shutdown (503), by our own bug
    (500), else left by its client (499, whatever the reply)."""
    if not status:
        return "no response"
    counted = metric.status_code if metric is not None else 0
    if counted == STATUS_SHUT_DOWN:
        return "cut by the shutdown"
    if counted == STATUS_OWN_ERROR:
        return "error" if status == counted else f"error: {counted}"
    return "client left"


def record_protocol_refusal(
    collector: MetricsCollector,
    access_log_on: bool,
    status: int,
    request_id: str,
    reason: str = "malformed request",
    sent: int = 0,
    address: str = UNKNOWN_ADDRESS,
) -> None:
    """A request the server refused before the app saw it (a malformed head: see
    hypercorn_patches 9; a WebSocket handshake): counted and logged as one request to no
    known route, since its method and path are unknown or not to be trusted. ``sent``:
    the body bytes of the refusal, where the app wrote it; ``address``: its peer's;
    ``request_id``: the one its answer carries, which its access line carries too."""
    if collector.enabled:
        metric = RequestMetrics("", "-")
        metric.status_code = status
        metric.response_size = sent
        metric.finish()
        collector.request_started()
        collector.request_finished(metric)
    if access_log_on:
        _log_refusal(request_id, address, status, sent, reason)


def log_refused_connection(peer: tuple[str, int] | None, sent: int, request_id: str) -> None:
    """The access line of a connection refused at MAX_CONNECTIONS: its 503, sent before
    any request was read (so no method or path; counted in
    ``trioproxy_connections_refused_total``, not as a request), with the request id the
    503 carries."""
    _log_refusal(request_id, peer_address(peer), 503, sent, "connection cap")


def _log_refusal(request_id: str, address: str, status: int, sent: int, reason: str) -> None:
    """The access line of an answer given before any request was served, with its id (it
    is written in the server's task, not a request's: the id is set for this line only)."""
    token = request_id_var.set(request_id)
    try:
        access_log.info(
            "%s - - %d 0.0 ms %d B (refused: %s)",
            address,
            status,
            sent,
            reason,
            extra={REMOTE_ADDR_FIELD: address},
        )
    finally:
        request_id_var.reset(token)


STATUS_SHUT_DOWN = 503  # the effective status of a request the proxy cut by stopping
STATUS_OWN_ERROR = 500  # ... of one our own bug cut after its answer began
_stopped_at_once = False


def stop_at_once() -> None:
    """The server is being stopped without its grace period (a second signal): requests
    it cancels from now on were cut by the proxy (503), not left by their clients (499)."""
    global _stopped_at_once
    _stopped_at_once = True


def keep_request_id(error: BaseException, request_id: str | None) -> None:
    """Set ``request_id`` for the server's line about ``error`` escaping the app, in the
    task the server logs it in (the app's, which ends with it), when the request was
    served in another task (Quart's), whose id that task does not see."""
    if request_id is not None and _server_logs(error):
        request_id_var.set(request_id)


def _server_logs(error: BaseException) -> bool:
    """Whether the server logs ``error`` escaping the app: an ``Exception`` (our bug),
    alone or in a group; not a cancellation."""
    if isinstance(error, BaseExceptionGroup):
        return error.split(Exception)[0] is not None
    return isinstance(error, Exception)


def _finish_metric(
    metric: RequestMetrics,
    completed: bool,
    error: BaseException | None,
    sent: int,
    by_proxy: bool,
) -> None:
    """``by_proxy``: what was cut (not completed) was cut by the proxy stopping, a
    second signal or the end of a shutdown's grace period, not left by its client."""
    metric.response_size = sent
    if not metric.duration_ms:  # metric.finish(), inline: two calls less per request
        metric.duration_ms = (time.perf_counter() - metric.start) * 1000.0
    # An Exception escaping (alone or in a nursery's group) is the proxy's own bug, never
    # a client that left: counted as one (500, outcome error) so error alerts see it.
    bug = error is not None and _server_logs(error)
    if metric.streaming:
        if metric.stream_outcome is None:
            if completed:
                metric.stream_outcome = "completed"
            elif bug:
                _note_bug(metric, error)
                metric.stream_outcome = "error"
            elif by_proxy:
                metric.status_code = STATUS_SHUT_DOWN
                metric.stream_outcome = "error"
            else:
                metric.stream_outcome = "cancelled"
        metric.stream_cancelled = metric.stream_outcome == "cancelled"
        metric.stream_timeout = metric.stream_outcome == "timeout"
    elif not completed:
        # our bug; the client went away while we waited (or while the body was being
        # written); or the server was stopped at once
        if bug:
            _note_bug(metric, error)
        else:
            metric.status_code = STATUS_SHUT_DOWN if by_proxy else STATUS_CLIENT_CLOSED


def _note_bug(metric: RequestMetrics, error: BaseException | None) -> None:
    metric.status_code = STATUS_OWN_ERROR
    if isinstance(error, BaseExceptionGroup):  # named by its first Exception
        error = error.split(Exception)[0]
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    metric.error = type(error).__name__


_CLEANUP_SECONDS = 5.0  # the most a request's cleanups may take


async def _run_cleanups(state: RequestState) -> None:
    if not state.cleanups:
        return
    # Shielded and bounded: closing the backend connection must happen even though the
    # request is being cancelled, but must never hang the worker. One scope for both: a
    # shield keeps out the cancellations from outside, not its own deadline's (a second
    # scope cost ~50 000 machine instructions per stream)
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _CLEANUP_SECONDS):
        for cleanup in reversed(state.cleanups):
            try:
                await cleanup()
            except Exception:
                log.debug("cleanup failed", exc_info=True)
    state.cleanups.clear()


# -- errors in the caller's dialect ---------------------------------------------------------


def error_reply(
    path: str,
    message: str,
    status: int,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    body = error_body_for(path, message, status, code=code, param=param)
    return Reply(status, body, JSON, dict(headers or {}))


def proxy_error_reply(
    error: ProxyError, path: str, secrets: BackendSecrets, state: RequestState
) -> Reply:
    message = bounded(scrub(error.message, secrets))  # scrubbed whole, then cut: in the log too
    if state.metric is not None and state.metric.error is None:
        state.metric.error = message[:200]
    if isinstance(error, UpstreamStatusError):
        log.info("backend answered %d: %s", error.status, message)
        passthrough = _openai_shaped(error, path, secrets)
        if passthrough is not None:
            return passthrough
    elif error.status >= 500 and not error.quiet:
        log.warning("%s", message)
    return error_reply(
        path, message, error.status, code=error.code, param=error.param, headers=error.headers
    )


def internal_error_reply(path: str) -> Reply:
    return error_reply(path, "internal error in trioproxy; see the server log", 500)


def _openai_shaped(error: UpstreamStatusError, path: str, secrets: BackendSecrets) -> Reply | None:
    """On /v1/*, a backend error already in OpenAI's shape is relayed as it came."""
    if not is_openai_path(path) or not error.body:
        return None
    try:
        payload: Any = loads(error.body)  # never RecursionError: a backend's deep body
    except ValueError:
        return None
    inner = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(inner, dict) or "message" not in inner:
        return None
    body = scrub(error.body.decode("utf-8", "replace"), secrets).encode()
    return Reply(error.status, body, JSON, dict(error.headers))
