"""The Responses API's WebSocket mode: ``/v1/responses`` as a persistent connection.

A client (the openai SDKs' ``responses.connect()``) opens ``ws(s)://HOST/v1/responses``
with its key and sends ``response.create`` messages, each the body of a ``POST
/v1/responses`` (``stream`` implicit). Each is served as one: a turn is a streamed POST
handed to the fast path (``fastpath.serve``) with the route's own handler, so the model
mapping, the relay and its deadlines, the ledger, the slots under
``MAX_CONCURRENT_REQUESTS``, the metrics (endpoint ``v1_responses``), the access log and
the shutdown's in-band end are the POST route's, unchanged. The stream's SSE events go to
the client one JSON message each; an answer that is an error is one ``error`` event.

Turns run one after another, in the order sent, whatever their lanes (``stream_id``,
which every event of a turn echoes: the API runs lanes in parallel, each in order); a
few messages may wait behind the one running, as they came (``MAX_QUEUED_TURNS``,
``MAX_REQUEST_BYTES`` together), each read in its turn. A client
that closes the socket mid-turn cancels it and its backend request (499), as a client
that leaves a stream. A connection with no turn closes after ``WEBSOCKET_IDLE_TIMEOUT``;
at shutdown an idle one closes at once (1001, which the SDK reconnects on) and a busy one
after its turn, which the shutdown ends in-band as it ends a stream.

A response created with ``store: false`` is kept by no backend, so its continuation
(``previous_response_id``) could not be served: the connection keeps its recent such
responses (their input and output items, at most ``MAX_REQUEST_BYTES`` together) and
sends a continuation of one with its items before its own input, without the id, as the
API's WebSocket mode promises; a warm-up (``generate: false``) is answered by the proxy
with an empty response whose items are kept likewise (no backend takes the field). The
reader takes every message as it arrives, never behind a write, so hypercorn's
read-ahead stays empty; a client that sends more than may wait for its answers is
closed (1008). Each socket is in ``trioproxy_websockets_open`` while open, its close
counted by reason and, with ``ACCESS_LOG``, logged. A handshake from a web page
(``Origin``) is refused unless ``CORS_ORIGINS`` allows its origin.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPDisconnectEvent,
    HTTPRequestEvent,
)

from . import fastpath
from .errors import ProxyError, openai_error_type
from .exchange import (
    JSON,
    AccessLine,
    Tracked,
    new_state,
    proxy_error_reply,
)
from .json_threads import by_size
from .jsonutil import compact_json, loads
from .logs import request_id_var, scope_request_id
from .sse import SSE_DONE, SSEParser
from .translate.validation import RequestValidationError, validate_openai_body

if TYPE_CHECKING:
    from .app import ProxyApp

PATH = "/v1/responses"
# response.create messages that may wait behind the turn running; past them the client is
# told with an error event (each holds up to MAX_REQUEST_BYTES)
MAX_QUEUED_TURNS = 4
# refused messages (too_many_queued) that may wait for their error event (each held until
# its lane is read, all of them at most MAX_REQUEST_BYTES): past them the client sends
# faster than it reads its answers, and the socket closes (1008)
MAX_REFUSALS_WAITING = 16
# store=false responses a connection keeps for their continuations (each up to
# MAX_REQUEST_BYTES, and all of them together)
MAX_KEPT = 16
# close codes (RFC 6455 7.4.1)
NORMAL_CLOSURE = 1000
GOING_AWAY = 1001  # the proxy is stopping: the openai SDKs reconnect on it
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009  # hypercorn closed it: a message over MAX_REQUEST_BYTES
# the headers of the handshake each turn's POST carries (its key for the client's slots,
# its origin for CORS, its trace context, the client a trusted proxy in front names for
# the access line); the request id is each turn's own
_TURN_HEADERS = frozenset(
    {
        b"authorization",
        b"x-api-key",
        b"origin",
        b"traceparent",
        b"tracestate",
        b"x-forwarded-for",
        b"forwarded",
        b"x-real-ip",
    }
)


_UNSERVED = "the proxy is shutting down; this response.create was not served: send it again"


class ClientEventError(Exception):
    """A client message that is no turn: told to the client as an ``error`` event (on the
    message's lane, ``stream_id``, if it named a valid one)."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param
        self.stream_id: str | None = None


# a lane's name, as the API and the openai SDK's ResponsesWebSocketSession take it: so it
# needs no escaping in JSON, and an event can be tagged with it as text
_STREAM_ID = re.compile(r"[A-Za-z0-9_.-]{1,256}")


def _lane(value: object) -> str | None:
    """A message's ``stream_id`` (None: the default lane). Raises
    :class:`ClientEventError` for one that is no lane's name. Pure."""
    if value is None or (isinstance(value, str) and _STREAM_ID.fullmatch(value)):
        return value
    raise ClientEventError(
        "stream_id must be 1-256 ASCII letters, digits, '_', '-' or '.'",
        code="invalid_stream_id",
        param="stream_id",
    )


def turn_request(message: str | bytes) -> tuple[dict[str, Any], str | None]:
    """The ``POST /v1/responses`` body of a client message (a ``response.create``): its
    fields as they came, ``stream`` true, without the WebSocket's own (``type``,
    ``stream_id``); and its lane, ``stream_id``, which every event of its answer echoes.
    Raises :class:`ClientEventError` for anything else. Pure."""
    try:
        event = loads(message)
    except ValueError:
        raise ClientEventError("the message is not valid JSON", code="invalid_json") from None
    if not isinstance(event, dict):
        raise ClientEventError("the message must be a JSON object with a 'type'", param="type")
    kind = event.pop("type", None)
    # the lane is the WebSocket's: a backend's POST does not know it (every turn runs in
    # order on this connection, whatever its lane)
    lane = _lane(event.pop("stream_id", None))
    try:
        if kind != "response.create":
            raise ClientEventError(
                _unknown_type_message(kind), code="unknown_event_type", param="type"
            )
        if event.get("background") is True:
            raise ClientEventError(
                "background responses are not supported over WebSocket: send them with "
                "POST /v1/responses",
                code="unsupported_parameter",
                param="background",
            )
    except ClientEventError as error:
        error.stream_id = lane
        raise
    event["stream"] = True
    return event, lane


def lane_of(message: str | bytes) -> str | None:
    """The lane a client message names, if it is a JSON object naming a valid one. Pure."""
    try:
        event = loads(message)
        return _lane(event.get("stream_id")) if isinstance(event, dict) else None
    except (ValueError, ClientEventError):
        return None


def tagged(text: str, lane: str | None) -> str:
    """An event (a JSON object's text) on ``lane``: with its ``stream_id``, as the API
    tags every event of a response whose create named one (the openai SDK routes events
    to lanes by it); as it is on the default lane. A lane's name needs no escaping; the
    field goes last, so it wins over any the text had. Pure."""
    if lane is None:
        return text
    body = text.rstrip()
    if not body.endswith("}"):
        return text  # no JSON object: nothing to tag
    head = body[:-1].rstrip()
    separator = "" if head.endswith("{") else ","
    return f'{head}{separator}"stream_id":"{lane}"}}'


def encoded(request: dict[str, Any]) -> bytes:
    """A turn's request as the POST's body. Pure."""
    try:
        return compact_json(request)
    except ValueError:
        raise ClientEventError("the message is nested too deeply") from None


def turn_body(message: str | bytes) -> bytes:
    """:func:`turn_request` as the POST's body. Pure."""
    return encoded(turn_request(message)[0])


class Kept(NamedTuple):
    """The connection's last response created with ``store: false``: what a continuation
    of it (``previous_response_id``) sends instead, since no backend kept it."""

    response_id: str
    # its input items (expanded, if it continued one) and output items, as a JSON array:
    # held between turns, so as compact as they come (decoded, values take several times
    # their bytes)
    items: bytes
    # the response it continues that the connection does not keep (a backend's): a warm-up
    # (``generate: false``) of one, which its continuation continues in its place
    previous: str | None = None


def input_items(value: object) -> list[Any]:
    """A request's ``input`` as a list of items (a string is one user message). Pure."""
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return []


class KeptResponses:
    """The connection's recent responses created with ``store: false``, by id, oldest
    first: the API keeps a connection's recent responses (two conversations on its
    lanes, a fork of one), not only its last. At most ``limit`` bytes of items together
    and ``MAX_KEPT`` responses; the oldest go first."""

    __slots__ = ("_by_id", "bytes", "limit")

    def __init__(self, limit: int) -> None:
        self._by_id: dict[str, Kept] = {}
        self.bytes = 0
        self.limit = limit

    def get(self, response_id: object) -> Kept | None:
        return self._by_id.get(response_id) if isinstance(response_id, str) else None

    def add(self, kept: Kept) -> None:
        by_id = self._by_id
        replaced = by_id.pop(kept.response_id, None)  # a backend that repeats its ids
        if replaced is not None:
            self.bytes -= len(replaced.items)
        by_id[kept.response_id] = kept
        self.bytes += len(kept.items)
        while self.bytes > self.limit or len(by_id) > MAX_KEPT:
            oldest = next(iter(by_id))
            self.bytes -= len(by_id.pop(oldest).items)


def expanded(request: dict[str, Any], kept: Kept | None) -> dict[str, Any]:
    """``request``, if it continues the kept response, with that response's items before
    its own input instead of ``previous_response_id`` (what the API's WebSocket mode does
    for ``store: false``); else as it is. Pure."""
    if kept is None or request.get("previous_response_id") != kept.response_id:
        return request
    rest = {k: v for k, v in request.items() if k != "previous_response_id"}
    if kept.previous is not None:
        rest["previous_response_id"] = kept.previous
    rest["input"] = loads(kept.items) + input_items(request.get("input"))
    return rest


def generates(request: dict[str, Any]) -> bool:
    """Whether a ``response.create`` asks for output, its ``generate`` (WebSocket mode's
    own field, which a backend's POST does not take) taken out of it. Raises
    :class:`ClientEventError` for one that is no boolean. Pure but for that."""
    generate = request.pop("generate", None)
    if generate is None or isinstance(generate, bool):
        return generate is not False
    raise ClientEventError("generate must be a boolean", param="generate")


def warm_up_events(request: dict[str, Any], response_id: str, asked: object) -> list[str]:
    """What the API answers a ``response.create`` with ``generate: false`` (a warm-up:
    request state prepared, no output): its response created, then completed empty.
    ``asked``: the ``previous_response_id`` it named. Pure but for the clock."""
    now = int(time.time())
    response = {
        "id": response_id,
        "object": "response",
        "created_at": now,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "metadata": request.get("metadata") or {},
        "model": request.get("model"),
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": asked if isinstance(asked, str) else None,
        "store": request.get("store", True),
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "usage": None,
    }
    created = {"type": "response.created", "sequence_number": 0, "response": response}
    done = {**response, "status": "completed", "completed_at": now}
    completed = {"type": "response.completed", "sequence_number": 1, "response": done}
    return [compact_json(created).decode(), compact_json(completed).decode()]


def kept_warm_up(request: dict[str, Any], response_id: str, limit: int) -> Kept | None:
    """What the connection keeps of a warm-up: its input items (expanded, if it continued
    a kept response), and the backend's response it continues, if any; None if they take
    over ``limit`` bytes. Pure."""
    try:
        items = compact_json(input_items(request.get("input")))
    except ValueError:
        return None
    previous = request.get("previous_response_id")
    previous = previous if isinstance(previous, str) else None
    return Kept(response_id, items, previous) if len(items) <= limit else None


class TurnOf(NamedTuple):
    """What a ``response.create`` asks for."""

    request: dict[str, Any]  # expanded, if it continues the kept response
    lane: str | None  # its stream_id
    body: bytes  # the POST's (empty for a warm-up, which none is sent for)
    asked: object  # the previous_response_id it named


def _turn_of(message: str | bytes, kept: KeptResponses) -> TurnOf:
    """A message's request, expanded if it continues a kept response, its lane and its
    POST's body (in a JSON thread for a large one: ``kept`` is not changed meanwhile)."""
    request, lane = turn_request(message)
    asked = request.get("previous_response_id")
    try:
        generate = generates(request)
        if not generate:
            _check_warm_up(request)
        request = expanded(request, kept.get(asked))
        return TurnOf(request, lane, encoded(request) if generate else b"", asked)
    except ClientEventError as error:
        error.stream_id = lane
        raise


def _check_warm_up(request: dict[str, Any]) -> None:
    """A warm-up's ``model`` checked as the POST route checks a turn's (required, a
    string): the response the proxy answers names it. Raises :class:`ClientEventError`."""
    try:
        validate_openai_body(request)
    except RequestValidationError as error:
        raise ClientEventError(error.message, code="invalid_request", param=error.field) from None


# the closing events of a response that can be continued
_CONTINUABLE = frozenset({"response.completed", "response.incomplete"})


def kept_after(request: dict[str, Any], closing: str | None, limit: int) -> Kept | None:
    """What to keep after a turn of ``request`` whose last event was ``closing`` (its
    text): a completed (or incomplete) response created with ``store: false``, if its
    items take at most ``limit`` bytes; else None. Pure."""
    if request.get("store") is not False or closing is None:
        return None
    try:
        event = loads(closing)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") not in _CONTINUABLE:
        return None
    response = event.get("response")
    if not isinstance(response, dict):
        return None
    response_id, output = response.get("id"), response.get("output")
    if not isinstance(response_id, str) or not isinstance(output, list):
        return None
    replayed = [replayable(item) for item in output if _replayable(item)]
    try:
        items = compact_json(input_items(request.get("input")) + replayed)
    except ValueError:
        return None
    return Kept(response_id, items) if len(items) <= limit else None


def _replayable(item: object) -> bool:
    # a reasoning item is replayed by its encrypted_content, the only part of it the
    # backend can take back without having stored it
    return not (
        isinstance(item, dict)
        and item.get("type") == "reasoning"
        and not item.get("encrypted_content")
    )


def replayable(item: Any) -> Any:
    """An output item as a ``store: false`` client sends it back as input (as Codex does):
    without its ``id``, which names an item the backend did not keep (OpenAI answers such
    an id 404: "Items are not persisted when store is set to false"). Pure."""
    if isinstance(item, dict) and "id" in item:
        return {k: v for k, v in item.items() if k != "id"}
    return item


def _unknown_type_message(kind: object) -> str:
    if kind == "response.steer":
        return "response.steer is not supported by this proxy: send a response.create"
    if kind is None:
        return 'the message has no \'type\': send {"type": "response.create", ...}'
    shown = repr(kind)[:64] if isinstance(kind, str) else type(kind).__name__
    return f"unknown event type {shown}: this endpoint takes 'response.create'"


def client_error_event(error: ClientEventError) -> str:
    """The ``error`` event that answers a client message which is no turn. Pure."""
    return tagged(error_event(400, error.message, error.code, error.param), error.stream_id)


def error_event(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> str:
    """An ``error`` event in the shape of the API's WebSocket mode. Pure."""
    error = {"type": openai_error_type(status), "code": code, "message": message, "param": param}
    return compact_json({"type": "error", "status": status, "error": error}).decode()


def reply_error_event(status: int, body: bytes) -> str:
    """The ``error`` event for a turn answered ``status`` with ``body`` (an OpenAI error
    object, the proxy's or the backend's), its fields kept. Pure."""
    try:
        payload = loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        event = {"type": "error", "status": status, "error": error}
        return compact_json(event).decode()
    text = body.decode("utf-8", "replace").strip()[:1000] or f"the backend answered {status}"
    return error_event(status, text)


def stream_messages(parser: SSEParser, chunk: bytes) -> list[str]:
    """The WebSocket messages of a chunk of a Responses stream (whole SSE events, as the
    relay gives them): each event's data, keep-alive comments and ``[DONE]`` left out.
    The proxy's own in-band ``error`` event already carries the ``error`` object the
    WebSocket mode's has. Pure."""
    return [event.data for event in parser.feed(chunk) if event.data and event.data != SSE_DONE]


class OpenSockets:
    """The app's open Responses sockets, told when the proxy begins to shut down."""

    __slots__ = ("_sockets", "stopping")

    def __init__(self) -> None:
        self._sockets: set[ResponsesSocket] = set()
        self.stopping = False

    def add(self, socket: ResponsesSocket) -> None:
        self._sockets.add(socket)

    def discard(self, socket: ResponsesSocket) -> None:
        self._sockets.discard(socket)

    def begin_shutdown(self) -> None:
        self.stopping = True
        for socket in list(self._sockets):
            socket.stop_waiting()


def origin_allowed(allowed: frozenset[str], origin: str) -> bool:
    """Whether a handshake that names the web page it comes from (``Origin``: browsers
    send it, the SDKs do not) may open a socket. A browser lets any page open a WebSocket
    to any host, the proxy on localhost included, and read what it answers, which CORS
    does not prevent: only the origins of ``CORS_ORIGINS`` may. Pure."""
    return "*" in allowed or origin in allowed


def serves(scope: Any) -> bool:
    """Whether a WebSocket handshake is for this route (below the mount point, if any)."""
    path: str = scope.get("path") or "/"
    root: str = scope.get("root_path", "").rstrip("/")
    if root:
        if not path.startswith(root + "/"):
            return False
        path = path[len(root) :]
    return "/" + path.lstrip("/") == PATH


class ResponsesSocket:
    """One client's WebSocket on ``/v1/responses``: the handshake (its key checked as
    the POST route checks it), then its turns, one at a time."""

    def __init__(
        self, app: ProxyApp, scope: Any, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        self.app, self.scope = app, scope
        self._receive, self._send = receive, send
        self._headers = _handshake_headers(scope.get("headers", ()))
        # the messages waiting for their turn, as they came (decoded when it comes: a
        # decoded body takes several times its bytes), at most MAX_REQUEST_BYTES together
        self._queue_in, self._queue_out = trio.open_memory_channel[str | bytes](MAX_QUEUED_TURNS)
        self._queued_bytes = 0
        # the messages refused (too many waiting), each until its error event is out: the
        # reader never waits on a write, so the server's read-ahead (hypercorn's queue of
        # 10 messages) stays empty, and a client that does not read its answers is closed
        # (1008) instead of holding a dozen messages of MAX_REQUEST_BYTES
        self._refused_in, self._refused_out = trio.open_memory_channel[str | bytes](
            MAX_REFUSALS_WAITING
        )
        self._refused_bytes = 0
        # the recent store=false responses, for their continuations
        self._kept = KeptResponses(app.settings.max_request_bytes)
        self._waiting: trio.CancelScope | None = None  # while no turn runs
        self._turn: _Turn | None = None
        self.closed = False  # the client closed the socket, or the server did
        # for the operators: why it closed (metrics.schema.WEBSOCKET_CLOSE_REASONS, None
        # while open: the client's doing unless the proxy's), turns and warm-ups served,
        # bytes of the messages sent (text as characters), its client's name
        self.ending: str | None = None
        self.turns = self.warm_ups = self.sent = 0
        self._client = ""

    async def serve(self) -> None:
        await self._receive()  # websocket.connect
        refusal = self._refusal()
        if refusal is not None:
            await self._refuse(refusal)
            return
        await self._send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        app = self.app
        sockets = app.open_sockets
        sockets.add(self)
        app.collector.websocket_opened()
        line = AccessLine("GET", PATH, self.scope, app.client_addresses)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                nursery.start_soon(self._answer_refusals)
                await self._run_turns()
                if self.ending == "flood":
                    await self._close(POLICY_VIOLATION, "messages sent faster than answered")
                nursery.cancel_scope.cancel()
        except BaseException:
            # cancelled: the server cut it at the end of its shutdown's grace period
            self.ending = self.ending or ("shutdown" if sockets.stopping else "error")
            raise
        finally:
            sockets.discard(self)
            self._closed_for_operators(line)

    def _closed_for_operators(self, line: AccessLine) -> None:
        """Its close counted (``trioproxy_websockets_*``) and, with ACCESS_LOG, its line."""
        app, reason = self.app, self.ending or "client"
        app.collector.websocket_closed(reason)
        if not app.settings.access_log:
            return
        detail = f"websocket: {self.turns} turns"
        if self.warm_ups:
            detail += f", {self.warm_ups} warm-ups"
        token = request_id_var.set(scope_request_id(self.scope))  # the handshake's
        try:
            line.write_socket(self.sent, f"{detail}, closed: {reason}", self._client)
        finally:
            request_id_var.reset(token)

    def stop_waiting(self) -> None:
        """The proxy is stopping: an idle socket closes now, a busy one after its turn."""
        if self._waiting is not None:
            self._waiting.cancel()

    def _refusal(self) -> ProxyError | None:
        headers = self._headers
        origin = headers.get("origin")
        if origin is not None and not origin_allowed(self.app.cors_origins, origin):
            return ProxyError(
                f"WebSocket connections from the web page origin {origin[:200]!r} are not "
                "allowed (CORS_ORIGINS)",
                403,
                code="origin_not_allowed",
            )
        keys = self.app.client_keys
        if keys is None:
            return None
        try:
            name = keys.check("GET", PATH, headers.get("authorization"), headers.get("x-api-key"))
        except ProxyError as error:
            return error
        self._client = name or ""
        return None

    async def _refuse(self, error: ProxyError) -> None:
        """The handshake answered with the POST route's refusal (a 401 in OpenAI's shape),
        counted and logged as a request to the route."""
        app = self.app
        if "websocket.http.response" not in self.scope.get("extensions", {}):
            # a server that cannot answer a handshake over HTTP: its bare 403
            await self._send({"type": "websocket.close", "code": 1008, "reason": None})
            return
        state = new_state(app.collector, PATH, "GET", self._headers.get("x-request-id"), None)
        access = (
            AccessLine("GET", PATH, self.scope, app.client_addresses)
            if app.settings.access_log
            else None
        )
        tracked = Tracked(app.collector, state, _HandshakeAnswer(self._send), access, self.scope)
        async with tracked as send:
            reply = proxy_error_reply(error, PATH, app.settings.backend_secrets, state)
            body: bytes = reply.body  # type: ignore[assignment]
            headers = [(b"content-type", JSON.encode()), (b"content-length", b"%d" % len(body))]
            headers += [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()
            ]
            headers += tracked.raw_response_headers(reply.status)
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _read(self) -> None:
        """The client's messages, taken as they come and never behind a write: each
        response.create queued for its turn, past the queue's bounds one refused; past
        those, the socket is to close (1008) and what else comes is dropped. The socket
        closing ends the turn running."""
        try:
            while True:
                event = await self._receive()
                if event["type"] != "websocket.receive":
                    if event.get("code") == MESSAGE_TOO_BIG:  # hypercorn_patches 18
                        self.ending = self.ending or "too_big"
                    break  # websocket.disconnect
                text = event.get("text")
                if self.ending is None:
                    self._queue(event.get("bytes") or b"" if text is None else text)
        finally:
            self.closed = True
            if self._turn is not None:
                self._turn.over.set()  # the client left: the turn is cancelled
            self._queue_in.close()
            self._refused_in.close()

    def _queue(self, message: str | bytes) -> None:
        """A message for its turn; past the queue's bounds, for its error event; past
        theirs, the socket is to close (one message is bounded by the server:
        MAX_REQUEST_BYTES)."""
        size = len(message)
        limit = self.app.settings.max_request_bytes
        if _put(self._queue_in, message, self._queued_bytes, limit):
            self._queued_bytes += size
            return
        if _put(self._refused_in, message, self._refused_bytes, limit):
            self._refused_bytes += size
            return
        # the client does not read what it is answered: no turn is served any more
        self.ending = "flood"
        if self._turn is not None:
            self._turn.over.set()
        self._queue_in.close()

    async def _answer_refusals(self) -> None:
        """The error event of each refused message, on its lane, in order."""
        text = (
            f"too many response.create waiting: at most {MAX_QUEUED_TURNS} messages of "
            "MAX_REQUEST_BYTES together may wait behind the response in progress"
        )
        async for message in self._refused_out:
            size = len(message)
            lane = await by_size(size, lane_of, message)  # its lane is told, not another
            del message
            self._refused_bytes -= size
            await self.send_text(tagged(error_event(429, text, code="too_many_queued"), lane))

    async def _run_turns(self) -> None:
        idle = self.app.settings.websocket_idle_timeout
        sockets = self.app.open_sockets
        while not sockets.stopping:
            with trio.move_on_after(idle) as waiting:
                self._waiting = waiting
                try:
                    message = await self._queue_out.receive()
                except trio.EndOfChannel:
                    return  # the client closed the socket
                finally:
                    self._waiting = None
            if waiting.cancelled_caught:
                if not sockets.stopping:
                    self.ending = "idle"
                    await self._close(NORMAL_CLOSURE, f"idle for {idle:g} s")
                    return
                break
            if self.closed or self.ending is not None:
                return  # the client left with turns still waiting: none is served
            self._queued_bytes -= len(message)
            await self._run_turn(message)
            if self.closed or self.ending is not None:
                return
        self.ending = "shutdown"
        await self._answer_unserved()
        await self._close(GOING_AWAY, "the proxy is shutting down")

    async def _answer_unserved(self) -> None:
        """The proxy is stopping: the messages still waiting (as many as may wait, not
        what keeps arriving) are each answered with an error event on their lane, for the
        openai SDK's session holds a lane busy until its create is answered."""
        for _ in range(MAX_QUEUED_TURNS):
            try:
                message = self._queue_out.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            lane = await by_size(len(message), lane_of, message)
            await self.send_text(tagged(error_event(503, _UNSERVED, "service_unavailable"), lane))

    async def _run_turn(self, message: str | bytes) -> None:
        kept = self._kept
        size = len(message) + kept.bytes  # at most: one of them is sent
        try:
            request, lane, body, asked = await by_size(size, _turn_of, message, kept)
        except ClientEventError as error:
            await self.send_text(client_error_event(error))
            return
        if self.closed or self.ending is not None:  # the client left meanwhile
            return
        if not body:
            await self._warm_up(request, lane, asked, size)
            return
        self.turns += 1
        turn = self._turn = _Turn(self, body, lane)  # (no wait since the check: the reader sees it)
        try:
            handler = self.app.fast_routes[PATH]
            await fastpath.serve(self.app, turn.scope(), turn.receive, turn.send, PATH, handler)
        finally:
            self._turn = None
        if request.get("store") is False and turn.last is not None:
            limit = self.app.settings.max_request_bytes
            work = len(turn.last) + len(body)  # its closing event decoded, its items encoded
            last = await by_size(work, kept_after, request, turn.last, limit)
            if last is not None:
                kept.add(last)

    async def _warm_up(
        self, request: dict[str, Any], lane: str | None, asked: object, size: int
    ) -> None:
        """A ``response.create`` with ``generate: false``: the API prepares the request's
        state and answers with an empty response that later turns continue. No backend
        takes the field (nor has a warm-up to give): the proxy answers it, and keeps its
        items as it keeps a store=false response's, so a continuation of it sends them."""
        self.warm_ups += 1
        response_id = f"resp_{uuid.uuid4().hex}"
        limit = self.app.settings.max_request_bytes
        kept = await by_size(size, kept_warm_up, request, response_id, limit)
        if kept is not None:
            self._kept.add(kept)
        for text in warm_up_events(request, response_id, asked):
            await self.send_text(tagged(text, lane))

    async def send_text(self, text: str) -> None:
        if not self.closed:
            self.sent += len(text)
            await self._send({"type": "websocket.send", "bytes": None, "text": text})

    async def _close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


class _Turn:
    """One response.create served as a streamed ``POST /v1/responses``: the ASGI
    ``receive`` and ``send`` the fast path serves it with, in the socket's terms."""

    __slots__ = (
        "_body",
        "_error",
        "_given",
        "_lane",
        "_parser",
        "_socket",
        "last",
        "over",
        "status",
    )

    def __init__(self, socket: ResponsesSocket, body: bytes, lane: str | None) -> None:
        self._socket, self._body, self._lane = socket, body, lane
        self._given = False
        self._parser = SSEParser(socket.app.settings.max_response_bytes)
        self._error = bytearray()  # an error answer's body (whole, bounded by its route)
        self.status = 0
        self.last: str | None = None  # the stream's last event (its closing one, if it ended)
        # the turn's answer is out, or the client left: its POST's disconnect
        self.over = trio.Event()

    def scope(self) -> dict[str, Any]:
        socket = self._socket
        headers = [
            (name, value)
            for name, value in socket.scope.get("headers", ())
            if name.lower() in _TURN_HEADERS
        ]
        headers.append((b"content-length", b"%d" % len(self._body)))
        return {**socket.scope, "type": "http", "method": "POST", "headers": headers}

    async def receive(self) -> HTTPRequestEvent | HTTPDisconnectEvent:
        if not self._given:
            self._given = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        # as hypercorn tells a request whose response is complete, or whose client left
        await self.over.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            return
        body: bytes = message.get("body", b"")  # type: ignore[assignment]
        socket = self._socket
        if self.status == 200:
            for text in stream_messages(self._parser, body):
                self.last = text
                await socket.send_text(tagged(text, self._lane))
        else:
            self._error += body
        if not message.get("more_body", False):
            if self.status != 200:
                error = reply_error_event(self.status, bytes(self._error))
                await socket.send_text(tagged(error, self._lane))
            self.over.set()


class _HandshakeAnswer:
    """An HTTP answer's ASGI events as the refusal of a WebSocket handshake (hypercorn's
    ``websocket.http.response`` extension)."""

    __slots__ = ("_send",)

    def __init__(self, send: ASGISendCallable) -> None:
        self._send = send

    async def __call__(self, message: Any) -> None:
        kind = "websocket." + message["type"]
        await self._send({**message, "type": kind})


def _put(
    channel: trio.MemorySendChannel[str | bytes], message: str | bytes, held: int, limit: int
) -> bool:
    """Whether ``message`` went into ``channel``, which holds ``held`` bytes of messages:
    one always may (a message is bounded by the server), more up to ``limit`` together."""
    if held and held + len(message) > limit:
        return False
    try:
        channel.send_nowait(message)
    except trio.WouldBlock:
        return False
    return True


def _handshake_headers(raw: Any) -> dict[str, str]:
    """A handshake's headers by lowercase name, the first of each, as text."""
    found: dict[str, str] = {}
    for name, value in raw:
        found.setdefault(bytes(name).lower().decode("latin-1"), bytes(value).decode("latin-1"))
    return found
