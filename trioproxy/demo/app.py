"""The demo backend as a bare ASGI 3 app (no framework: it is the yardstick benchmarks measure
the proxy against, so it must cost as little CPU per request and per chunk as possible).

Routing is a dict lookup on the path, bodies are parsed with :mod:`json`, constant responses are
encoded once at import, and stream chunks are assembled from pre-built string prefixes.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import secrets
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from . import responses, script
from .script import BadRequest, ChatPlan, DemoSettings, Directives

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

_T = TypeVar("_T")
MAX_EVENTS = 10_000
MAX_FAIL_COUNTERS = 100_000
MODEL_CREATED = 1_700_000_000  # fixed, so /v1/models is byte-identical across runs

_JSON: Headers = [(b"content-type", b"application/json")]
_SSE: Headers = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_RETRY_NOW: Headers = [(b"retry-after", b"0")]
_CLOSE: Headers = [(b"connection", b"close")]
_DONE = "data: [DONE]\n\n"
_BY_ID = "/v1/responses/"
# Compact output, and a prebuilt encoder: json.dumps(separators=...) would build one per call.
_dumps = json.JSONEncoder(separators=(",", ":")).encode

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def _model_entry(model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": MODEL_CREATED,
        "owned_by": "trioproxy-demo",
    }


_MODEL_BODIES = {m: _dumps(_model_entry(m)).encode() for m in script.MODEL_IDS}
_MODELS_BODY = _dumps(
    {"object": "list", "data": [_model_entry(m) for m in script.MODEL_IDS]}
).encode()


class ApiError(Exception):
    """An error answered with an OpenAI error body (never mid-stream: always before the start)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or []

    def body(self) -> bytes:
        kind = _ERROR_TYPES.get(
            self.status, "api_error" if self.status >= 500 else "invalid_request_error"
        )
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return _dumps({"error": error}).encode()


def _simulated_error(status: int, why: str) -> ApiError:
    code = "rate_limit_exceeded" if status == 429 else None
    return ApiError(status, f"demo backend: simulated HTTP {status} ({why})", code=code)


class _ClientGone(Exception):
    """Raised out of the response loop once the client is known to have left."""


@dataclass(slots=True)
class _Exchange:
    """One in-flight generation request: its ASGI send, its event-log entry, its extra headers."""

    send: Send
    entry: dict[str, Any]
    extra_headers: Headers
    finishing: bool = False  # the last body message is on its way: a disconnect now is not a loss

    def finish(self, outcome: str) -> None:
        """Record the outcome once; the first call wins (a disconnect beats a later send error)."""
        if self.entry["ended"] is None:
            self.entry["ended"] = time.time()
            self.entry["outcome"] = outcome

    async def start(self, status: int, headers: Headers) -> None:
        message = {
            "type": "http.response.start",
            "status": status,
            "headers": headers + self.extra_headers,
        }
        await self._send(message)

    async def body(self, data: bytes, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def _send(self, message: Message) -> None:
        try:
            await self.send(message)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # hypercorn usually drops writes to a closed socket silently (the watcher notices the
            # disconnect instead), but a transport error can still surface here.
            self.finish("disconnected")
            raise _ClientGone from exc


@dataclass(slots=True)
class _Timing:
    """When to send what: resolved from settings and directives once per request."""

    first_delay: float
    delay: float
    stall_after: int | None
    drop_after: int | None


@dataclass(slots=True)
class _Reply:
    """A prepared answer: either one JSON body, or the three parts of an SSE stream."""

    body: bytes = b""
    head: str = ""  # sent right after the headers (the role chunk), before any wait
    pieces: Iterable[str] = ()  # one SSE payload per generated token
    tail: str = ""  # finish chunk, usage chunk and [DONE], sent together
    stream: bool = False
    tokens: int = 0  # for the non-stream drop/delay simulation


class DemoApp:
    """ASGI 3 callable; ``events`` is the bounded event log, ``reset()`` clears it and counters."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.responses = responses.ResponseStore()
        self._fail_counts: dict[str, int] = {}
        self._ids = itertools.count(1)
        # A per-process prefix keeps completion ids unique across restarts, without a uuid4 each.
        self._id_prefix = secrets.token_hex(4)
        self._routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._completions),
            "/v1/embeddings": ("POST", self._embeddings),
            "/v1/responses": ("POST", self._responses),
            "/v1/responses/input_tokens": ("POST", self._input_tokens),
            "/v1/responses/compact": ("POST", self._compact),
            "/v1/models": ("GET", self._models),
            "/_demo/events": ("GET", self._events),
            "/_demo/reset": ("POST", self._reset),
        }

    def reset(self) -> None:
        self.events.clear()
        self._fail_counts.clear()
        self.responses.clear()

    # ---- ASGI entry point and plumbing ----------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        route = self._routes.get(path)
        if route is None and path.startswith("/v1/models/"):
            route = ("GET", self._model)
        elif route is None and path.startswith(_BY_ID):
            route = self._by_id_route(method, path)
        if route is None or route[0] != method:
            # read the body before refusing: answering first made stock hypercorn close the
            # connection whenever the body arrived after the answer, and a client reusing it
            # then failed with "Server disconnected" (a race seen in CI)
            await _read_body(receive)
        if route is None:
            error = ApiError(404, f"Unknown request URL: {method} {path}", code="unknown_url")
            await _send_error(send, error)
        elif route[0] != method:
            allow = [(b"allow", route[0].encode())]
            error = ApiError(
                405, f"Method {method} not allowed for {path}", code="method_not_allowed"
            )
            error.headers = allow
            await _send_error(send, error)
        else:
            await route[1](scope, receive, send)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, _MODELS_BODY)

    async def _model(self, scope: Scope, receive: Receive, send: Send) -> None:
        model_id = scope["path"][len("/v1/models/") :]
        body = _MODEL_BODIES.get(model_id)
        if body is None:
            await _send_error(send, _model_not_found(model_id))
        else:
            await _send_json(send, 200, body)

    def _by_id_route(
        self, method: str, path: str
    ) -> tuple[str, Callable[..., Awaitable[None]]] | None:
        action = path[len(_BY_ID) :].partition("/")[2]
        if action == "":
            return (method if method in ("GET", "DELETE") else "GET", self._stored_response)
        allowed = {"cancel": "POST", "input_items": "GET"}.get(action)
        return None if allowed is None else (allowed, self._stored_response)

    async def _stored_response(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The Responses API's routes by id: retrieve (``stream=true`` replays the events
        after ``starting_after``), delete, cancel (background responses only), input items."""
        await _read_body(receive)
        rid, _, action = scope["path"][len(_BY_ID) :].partition("/")
        query = urllib.parse.parse_qs(scope["query_string"].decode("latin-1"))
        stored = self.responses.get(rid)
        try:
            if stored is None:
                raise ApiError(404, f"Response with id '{rid}' not found.", param="response_id")
            if action == "input_items":
                page = _planned(responses.item_page, stored.items, query)
                await _send_json(send, 200, _dumps(page).encode())
            elif action == "cancel":
                if not stored.background:
                    message = "Only responses created with background=true can be cancelled."
                    raise ApiError(400, message, param="response_id")
                await _send_json(send, 200, _dumps(stored.response).encode())
            elif scope["method"] == "DELETE":
                self.responses.delete(rid)
                deleted = {"id": rid, "object": "response.deleted", "deleted": True}
                await _send_json(send, 200, _dumps(deleted).encode())
            elif query.get("stream", [""])[0].lower() == "true":
                await _replay(send, stored, query)
            else:
                await _send_json(send, 200, _dumps(stored.response).encode())
        except ApiError as error:
            await _send_error(send, error)

    async def _input_tokens(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        if raw is None:
            return
        try:
            body = _parse_object(raw)
            if body.get("model") is not None:
                _checked_model(body, script.CHAT_MODELS, "responses")
            count = _planned(responses.count_input_tokens, body)
        except ApiError as error:
            await _send_error(send, error)
            return
        answer = {"object": "response.input_tokens", "input_tokens": count}
        await _send_json(send, 200, _dumps(answer).encode())

    async def _compact(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await _read_body(receive)
        if raw is None:
            return
        try:
            body = _parse_object(raw)
            _checked_model(body, script.CHAT_MODELS, "responses")
            earlier = None
            previous = body.get("previous_response_id")
            if previous is not None:
                earlier = self.responses.get(str(previous))
                if earlier is None:
                    message = f"Previous response with id '{previous}' not found."
                    raise ApiError(404, message, param="previous_response_id")
            elif body.get("input") is None:
                raise ApiError(400, "input or previous_response_id is required", param="input")
            rid = f"resp_demo{self._id_prefix}{next(self._ids):x}"
            answer = _planned(responses.compacted, rid, body, earlier)
        except ApiError as error:
            await _send_error(send, error)
            return
        await _send_json(send, 200, _dumps(answer).encode())

    async def _events(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, _dumps({"events": list(self.events)}).encode())

    async def _reset(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _read_body(receive)
        self.reset()
        await _send_json(send, 200, b'{"ok":true}')

    # ---- generation endpoints -------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, self._prepare_chat)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, self._prepare_completion)

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, self._prepare_embeddings)

    async def _responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, self._prepare_response)

    async def _generate(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        prepare: Callable[[dict[str, Any], _Exchange], tuple[_Reply, Directives]],
    ) -> None:
        """Shared life cycle of the three generation endpoints, including the event log entry."""
        entry = self._new_event(scope)
        ex = _Exchange(send, entry, [])
        try:
            raw = await _read_body(receive)
            if raw is None:
                ex.finish("disconnected")
                return
            entry["body_hash"] = body_hash = hashlib.sha256(raw).hexdigest()[:16]
            try:
                body = _parse_object(raw)
                reply, directives = prepare(body, ex)
                if directives.close_connection:
                    ex.extra_headers = _CLOSE
                self._simulate_failures(directives, body_hash)
            except ApiError as error:
                ex.finish("error")
                error.headers += ex.extra_headers
                await _send_error(send, error)
                return
            timing = self._timing(directives, reply)
            await self._respond(receive, ex, reply, timing)
        except* _ClientGone:
            pass  # already recorded as "disconnected"
        finally:
            ex.finish("error")  # no-op unless something unexpected (or server shutdown) cut us off

    def _new_event(self, scope: Scope) -> dict[str, Any]:
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
        entry: dict[str, Any] = {
            "id": next(self._ids),
            "path": scope["path"],
            "model": None,
            "stream": False,
            "started": time.time(),
            "ended": None,
            "outcome": None,
            "tokens_sent": 0,
            "request_id": request_id,
            "body_hash": None,
        }
        self.events.append(entry)
        return entry

    def _simulate_failures(self, directives: Directives, body_hash: str) -> None:
        if directives.status is not None:
            headers = _RETRY_NOW if directives.status == 429 else None
            error = _simulated_error(directives.status, "[[status]] directive")
            error.headers = list(headers or [])
            raise error
        wanted = directives.fail_first
        if not wanted:
            return
        # Keyed by the body hash: a client's (or proxy's) retry of the same body counts as the
        # same request, so "fail twice, then succeed" is observable through retries.
        key = f"{body_hash}:{wanted}:{directives.fail_status}"
        seen = self._fail_counts.get(key, 0)
        if seen >= wanted:
            return
        if len(self._fail_counts) >= MAX_FAIL_COUNTERS:
            self._fail_counts.clear()
        self._fail_counts[key] = seen + 1
        status = directives.fail_status
        error = _simulated_error(status, f"[[fail_first]] failure {seen + 1} of {wanted}")
        error.headers = list(_RETRY_NOW) if status == 429 else []
        raise error

    def _timing(self, d: Directives, reply: _Reply) -> _Timing:
        settings = self.settings
        first = d.first_delay if d.first_delay is not None else settings.first_token_delay
        if reply.stream:
            delay = d.delay if d.delay is not None else settings.token_delay
        else:
            # Non-stream answers stay instant unless a test explicitly asks for generation time
            # with [[delay]]: then the body arrives when the equivalent stream would have ended.
            delay = d.delay or 0.0
        return _Timing(first, delay, d.stall_after, d.drop_after)

    async def _respond(self, receive: Receive, ex: _Exchange, reply: _Reply, t: _Timing) -> None:
        send_now = not reply.stream and not t.first_delay and not t.delay and t.stall_after is None
        if send_now:
            # The hot path for benchmarks: nothing to wait for, so no watcher task is needed.
            await self._respond_once(ex, reply, t)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_disconnect, receive, ex, nursery.cancel_scope)
            if reply.stream:
                await self._respond_stream(ex, reply, t)
            else:
                await self._respond_once(ex, reply, t)
            nursery.cancel_scope.cancel()

    async def _respond_once(self, ex: _Exchange, reply: _Reply, t: _Timing) -> None:
        wait = t.first_delay + t.delay * max(reply.tokens - 1, 0)
        if wait:
            await trio.sleep(wait)
        if t.stall_after is not None:
            await trio.sleep_forever()  # a body that never comes: the disconnect watcher ends it
        body = reply.body
        headers = [*_JSON, (b"content-length", str(len(body)).encode())]
        await ex.start(200, headers)
        if t.drop_after is not None:
            # Promise the full length, deliver half, then end the ASGI call without the rest:
            # hypercorn closes the socket and the client sees an incomplete body.
            await ex.body(body[: len(body) // 2], more=True)
            ex.finish("error")
            return
        ex.finishing = True
        await ex.body(body, more=False)
        ex.entry["tokens_sent"] = reply.tokens
        ex.finish("completed")

    async def _respond_stream(self, ex: _Exchange, reply: _Reply, t: _Timing) -> None:
        entry = ex.entry
        await ex.start(200, _SSE)
        if reply.head:
            await ex.body(reply.head.encode(), more=True)
        # An absolute schedule keeps the token cadence exact however long each send takes.
        due = trio.current_time() + t.first_delay
        sent = 0
        for piece in itertools.chain(reply.pieces, (None,)):
            if sent == t.stall_after:
                await trio.sleep_forever()  # silent until the client gives up
            if sent == t.drop_after:
                # Ending the ASGI call mid-body makes hypercorn close the socket without the
                # terminating zero-length chunk: the client sees a truncated stream.
                ex.finish("error")
                return
            if piece is None:
                break
            if due > trio.current_time():
                await trio.sleep_until(due)
            await ex.body(piece.encode(), more=True)
            sent += 1
            entry["tokens_sent"] = sent
            due += t.delay
        ex.finishing = True
        await ex.body(reply.tail.encode(), more=False)
        ex.finish("completed")

    # ---- request parsing: each returns the prepared reply and the directives ---------------

    def _prepare_chat(self, body: dict[str, Any], ex: _Exchange) -> tuple[_Reply, Directives]:
        model = _model_of(body, ex, script.CHAT_MODELS, "chat completions")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty array", param="messages")
        directives = _directives(
            script.content_text(script.answered_message(messages).get("content"))
        )
        plan = _planned(script.plan_chat, body, messages, directives, self.settings.default_tokens)
        top = None  # the common request asks for none: no call for it
        if "logprobs" in body or "top_logprobs" in body:
            top = _planned(script.logprobs_wanted, body)
        stream = ex.entry["stream"] = body.get("stream") is True
        usage = _usage(script.prompt_tokens(messages), plan)
        cid = f"chatcmpl-demo{self._id_prefix}{ex.entry['id']:x}"
        created = int(time.time())
        if stream:
            reply = _chat_stream(cid, created, model, plan, usage, _include_usage(body), top)
            return reply, directives
        return _Reply(
            body=_chat_body(cid, created, model, plan, usage, top), tokens=len(plan.content)
        ), directives

    def _prepare_completion(self, body: dict[str, Any], ex: _Exchange) -> tuple[_Reply, Directives]:
        model = _model_of(body, ex, script.CHAT_MODELS, "completions")
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        texts = [p for p in prompts if isinstance(p, str)]
        if not texts:
            raise ApiError(400, "prompt must be a string or an array of strings", param="prompt")
        directives = _directives(texts[0])
        tokens, finish = _planned(
            script.plan_completion, body, directives, self.settings.default_tokens
        )
        top = _planned(script.completion_logprobs_wanted, body)
        stream = ex.entry["stream"] = body.get("stream") is True
        prompt_tokens = sum(script.count_words(t) for t in texts)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        cid = f"cmpl-demo{self._id_prefix}{ex.entry['id']:x}"
        created = int(time.time())
        if stream:
            return _completion_stream(
                cid, created, model, tokens, finish, usage, _include_usage(body), top
            ), directives
        logprobs = None if top is None else script.completion_logprobs(tokens, top)
        choice = {
            "text": "".join(tokens),
            "index": 0,
            "finish_reason": finish,
            "logprobs": logprobs,
        }
        response = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
        return _Reply(body=_dumps(response).encode(), tokens=len(tokens)), directives

    def _prepare_response(self, body: dict[str, Any], ex: _Exchange) -> tuple[_Reply, Directives]:
        """OpenAI's Responses API: ``input`` is a string or a list of items; function
        ``tools`` are called, ``text.format`` answers JSON, a ``function_call_output`` last
        is answered with what the tool returned, demo-reasoner reasons first (a reasoning
        item) as on chat; ``max_output_tokens`` caps the reply (status "incomplete"). Stored
        unless ``store`` is false; ``background`` answers "queued" and stores the finished
        reply; a ``previous_response_id`` must name a stored response."""
        model = _model_of(body, ex, script.CHAT_MODELS, "responses")
        texts = _planned(responses.input_texts, body.get("input"))
        previous = body.get("previous_response_id")
        if previous is not None and self.responses.get(str(previous)) is None:
            message = f"Previous response with id '{previous}' not found."
            raise ApiError(404, message, param="previous_response_id")
        directives = _directives(texts[-1])
        reply = _planned(responses.plan, body, directives, self.settings.default_tokens)
        stream = ex.entry["stream"] = body.get("stream") is True
        input_tokens = sum(script.count_words(t) for t in texts)
        rid = f"resp_demo{self._id_prefix}{ex.entry['id']:x}"
        response = responses.response_object(rid, model, reply, input_tokens)
        if body.get("store") is not False:
            self.responses.add(response, body)
        if stream:
            return _response_stream(responses.stream_parts(response)), directives
        tokens = response["usage"]["output_tokens"]
        if body.get("background") is True:
            response = responses.queued(response)
        return _Reply(body=_dumps(response).encode(), tokens=tokens), directives

    def _prepare_embeddings(self, body: dict[str, Any], ex: _Exchange) -> tuple[_Reply, Directives]:
        model = _model_of(body, ex, script.EMBED_MODELS, "embeddings")
        texts = _embedding_inputs(body.get("input"))
        if len(texts) > script.MAX_EMBED_INPUTS:
            raise ApiError(
                400, f"input must have at most {script.MAX_EMBED_INPUTS} items", param="input"
            )
        words = sum(script.count_words(t) for t in texts)
        if words > script.MAX_EMBED_TOKENS:
            raise ApiError(
                400,
                f"Requested {words} tokens, max {script.MAX_EMBED_TOKENS} tokens per request",
                code="max_tokens_per_request",
            )
        directives = _directives(texts[0])
        dimensions = body.get("dimensions", script.EMBED_DIMENSIONS)
        if (
            isinstance(dimensions, bool)
            or not isinstance(dimensions, int)
            or not 1 <= dimensions <= script.MAX_EMBED_DIMENSIONS
        ):
            raise ApiError(
                400, "dimensions must be an integer between 1 and 4096", param="dimensions"
            )
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(
                400, "encoding_format must be 'float' or 'base64'", param="encoding_format"
            )
        data = []
        for index, text in enumerate(texts):
            vector: Any = script.embedding(text, dimensions)
            if encoding == "base64":
                vector = _b64(script.pack_float32(vector))
            data.append({"object": "embedding", "index": index, "embedding": vector})
        response = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": words, "total_tokens": words},
        }
        return _Reply(body=_dumps(response).encode()), directives


# ---- module-level helpers (no state) -------------------------------------------------------


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body  # the usual case: one message, no copying
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _watch_disconnect(receive: Receive, ex: _Exchange, scope: trio.CancelScope) -> None:
    """Cancel the response the moment the client leaves, even while it is still sleeping."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not ex.finishing:
        ex.finish("disconnected")
        scope.cancel()


async def _send_json(send: Send, status: int, body: bytes, headers: Headers | None = None) -> None:
    all_headers = [*_JSON, (b"content-length", str(len(body)).encode()), *(headers or ())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: ApiError) -> None:
    await _send_json(send, error.status, error.body(), error.headers)


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _model_not_found(model: str) -> ApiError:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return ApiError(404, message, param="model", code="model_not_found")


def _model_of(body: dict[str, Any], ex: _Exchange, allowed: frozenset[str], what: str) -> str:
    model = body.get("model")
    if isinstance(model, str):
        ex.entry["model"] = model
    return _checked_model(body, allowed, what)


def _checked_model(body: dict[str, Any], allowed: frozenset[str], what: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    if model not in allowed:
        if model in _MODEL_BODIES:
            raise ApiError(400, f"The model `{model}` does not support {what}.", param="model")
        raise _model_not_found(model)
    return model


def _planned(plan: Callable[..., _T], *args: Any) -> _T:
    """``plan(*args)``, its BadRequest answered as a 400."""
    try:
        return plan(*args)
    except BadRequest as exc:
        raise ApiError(400, exc.message, param=exc.param) from None


def _directives(text: str) -> Directives:
    try:
        return script.parse_directives(text)
    except BadRequest as exc:
        raise ApiError(400, exc.message) from None


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage(prompt_tokens: int, plan: ChatPlan) -> dict[str, Any]:
    completion = plan.completion_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
    if plan.reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": len(plan.reasoning)}
    return usage


def _embedding_inputs(value: Any) -> list[str]:
    """Strings to embed; token-id inputs are embedded via their text form (still deterministic)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [_dumps(value)]
        if all(isinstance(v, str | list) for v in value):
            return [v if isinstance(v, str) else _dumps(v) for v in value]
    raise ApiError(400, "input must be a non-empty string or array of strings", param="input")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _tool_call_id(cid: str) -> str:
    return "call_" + cid.removeprefix("chatcmpl-")


def _content_logprobs(plan: ChatPlan, top: int | None) -> str:
    """A choice's ``logprobs`` member's value: null unless asked (``top`` is not None);
    then made-up entries for the content's tokens (none for reasoning or a tool call, as
    OpenAI gives none)."""
    if top is None:
        return "null"
    entries = []
    if plan.tool_call is None:
        entries = [script.token_logprob(tok, i, top) for i, tok in enumerate(plan.content)]
    return _dumps({"content": entries, "refusal": None})


def _chat_body(
    cid: str,
    created: int,
    model: str,
    plan: ChatPlan,
    usage: dict[str, Any],
    top: int | None = None,
) -> bytes:
    """A non-stream chat.completion; the common passage reply reuses its cached JSON text."""
    tool = plan.tool_call
    if tool is None:
        if plan.content is script.passage_tokens(len(plan.content)):
            content = script.passage_text_json(len(plan.content))  # identity: the cached passage
        else:
            content = _dumps("".join(plan.content))
        extra = f',"reasoning_content":{_dumps("".join(plan.reasoning))}' if plan.reasoning else ""
        message = f'{{"role":"assistant","content":{content}{extra},"refusal":null}}'
    else:
        call = {
            "id": _tool_call_id(cid),
            "type": "function",
            "function": {"name": tool.name, "arguments": tool.arguments},
        }
        fields: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if plan.reasoning:
            fields["reasoning_content"] = "".join(plan.reasoning)
        fields["tool_calls"] = [call]
        message = _dumps(fields)
    return (
        f'{{"id":"{cid}","object":"chat.completion","created":{created},"model":{_dumps(model)},'
        f'"choices":[{{"index":0,"message":{message},"finish_reason":"{plan.finish_reason}",'
        f'"logprobs":{_content_logprobs(plan, top)}}}],"usage":{_dumps(usage)}}}'
    ).encode()


def _chat_stream(
    cid: str,
    created: int,
    model: str,
    plan: ChatPlan,
    usage: dict[str, Any],
    include_usage: bool,
    top: int | None = None,
) -> _Reply:
    """SSE parts of a chat stream; token chunks are built lazily from two fixed string halves."""
    prefix = (
        f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
        f'"model":{_dumps(model)},"choices":[{{"index":0,"delta":'
    )
    usage_null = ',"usage":null' if include_usage else ""
    open_suffix = f',"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'

    def chunk(delta: str) -> str:
        return prefix + delta + open_suffix

    head = chunk('{"role":"assistant","content":""}')
    if plan.tool_call:
        answer = _tool_call_pieces(chunk, cid, plan)
    elif top is None:
        answer = _content_pieces(chunk, plan)
    else:  # each token's chunk with its own entry, as OpenAI streams them
        answer = _content_pieces_with_logprobs(prefix, usage_null, plan, top)
    pieces = itertools.chain(
        (chunk(f'{{"reasoning_content":{_dumps(tok)}}}') for tok in plan.reasoning), answer
    )
    tail = (
        f'{prefix}{{}},"logprobs":null,"finish_reason":"{plan.finish_reason}"}}]{usage_null}}}\n\n'
    )
    if include_usage:
        tail += (
            f'data: {{"id":"{cid}","object":"chat.completion.chunk","created":{created},'
            f'"model":{_dumps(model)},"choices":[],"usage":{_dumps(usage)}}}\n\n'
        )
    return _Reply(head=head, pieces=pieces, tail=tail + _DONE, stream=True)


def _content_pieces(chunk: Callable[[str], str], plan: ChatPlan) -> Iterator[str]:
    for tok in plan.content:
        yield chunk(f'{{"content":{_dumps(tok)}}}')


def _content_pieces_with_logprobs(
    prefix: str, usage_null: str, plan: ChatPlan, top: int
) -> Iterator[str]:
    for i, tok in enumerate(plan.content):
        logprobs = _dumps({"content": [script.token_logprob(tok, i, top)], "refusal": None})
        yield (
            f'{prefix}{{"content":{_dumps(tok)}}},"logprobs":{logprobs},'
            f'"finish_reason":null}}]{usage_null}}}\n\n'
        )


def _tool_call_pieces(chunk: Callable[[str], str], cid: str, plan: ChatPlan) -> Iterator[str]:
    """OpenAI's shape: a first delta with id/type/name and empty arguments, then fragments."""
    tool = plan.tool_call
    assert tool is not None
    first = True
    for fragment in script.split_arguments(tool.arguments):
        args = _dumps(fragment)
        if first:
            call = {
                "index": 0,
                "id": _tool_call_id(cid),
                "type": "function",
                "function": {"name": tool.name, "arguments": ""},
            }
            # The head delta rides with the first fragment, so it is not counted as a token.
            yield chunk(_dumps({"tool_calls": [call]})) + chunk(
                f'{{"tool_calls":[{{"index":0,"function":{{"arguments":{args}}}}}]}}'
            )
            first = False
        else:
            yield chunk(f'{{"tool_calls":[{{"index":0,"function":{{"arguments":{args}}}}}]}}')


def _completion_stream(
    cid: str,
    created: int,
    model: str,
    tokens: tuple[str, ...],
    finish: str,
    usage: dict[str, Any],
    include_usage: bool,
    top: int | None = None,
) -> _Reply:
    prefix = (
        f'data: {{"id":"{cid}","object":"text_completion","created":{created},'
        f'"model":{_dumps(model)},"choices":[{{"text":'
    )
    usage_null = ',"usage":null' if include_usage else ""
    open_suffix = f',"index":0,"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'
    if top is None:
        pieces: Iterator[str] = (prefix + _dumps(tok) + open_suffix for tok in tokens)
    else:  # each token's chunk with its own log probabilities, as vLLM streams them
        pieces = _completion_pieces_with_logprobs(prefix, usage_null, tokens, top)
    tail = f'{prefix}"","index":0,"logprobs":null,"finish_reason":"{finish}"}}]{usage_null}}}\n\n'
    if include_usage:
        tail += (
            f'data: {{"id":"{cid}","object":"text_completion","created":{created},'
            f'"model":{_dumps(model)},"choices":[],"usage":{_dumps(usage)}}}\n\n'
        )
    return _Reply(pieces=pieces, tail=tail + _DONE, stream=True)


def _completion_pieces_with_logprobs(
    prefix: str, usage_null: str, tokens: tuple[str, ...], top: int
) -> Iterator[str]:
    start = 0
    for i, tok in enumerate(tokens):
        logprobs = _dumps(script.completion_logprobs((tok,), top, i, start))
        start += len(tok)
        yield (
            f'{prefix}{_dumps(tok)},"index":0,"logprobs":{logprobs},'
            f'"finish_reason":null}}]{usage_null}}}\n\n'
        )


async def _replay(send: Send, stored: responses.Stored, query: dict[str, list[str]]) -> None:
    """A stored response's stream again, from the event after ``starting_after``."""
    try:
        after = int(query.get("starting_after", ["-1"])[0])
    except ValueError:
        raise ApiError(400, "starting_after must be an integer", param="starting_after") from None
    events = responses.stream_events(stored.response)[after + 1 :]
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    for event in events:
        await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _response_stream(parts: list[tuple[str, bool]]) -> _Reply:
    """A Responses stream paced by its deltas: the events before the first go out at
    once, each delta with the events that lead up to it, and those after the last close
    the stream."""
    deltas = [n for n, (_, delta) in enumerate(parts) if delta]
    first = deltas[0] if deltas else len(parts) - 1
    last = deltas[-1] if deltas else first - 1
    pieces = []
    start = first
    for n in deltas:
        pieces.append("".join(text for text, _ in parts[start : n + 1]))
        start = n + 1
    return _Reply(
        head="".join(text for text, _ in parts[:first]),
        pieces=pieces,
        tail="".join(text for text, _ in parts[last + 1 :]),
        stream=True,
    )


def create_demo_app(settings: DemoSettings | None = None) -> DemoApp:
    """The demo backend's ASGI app; its event log is ``app.events`` (also GET /_demo/events)."""
    return DemoApp(settings or DemoSettings())


__all__ = ["ApiError", "DemoApp", "create_demo_app"]
