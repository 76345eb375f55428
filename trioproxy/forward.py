"""Forwarding helpers shared by the Ollama and OpenAI handlers: decode the client's body,
call the backend, open a stream whose closing is guaranteed."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn, TypeVar

import httpx

from .errors import (
    BackendSecrets,
    BadRequest,
    BadUpstreamResponse,
    ProxyError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
    scrub,
    upstream_error_message,
)
from .exchange import Call, RequestState
from .json_threads import OFF_LOOP_BYTES, off_loop
from .jsonutil import NestedTooDeeply, compact_json, loads, whole_number
from .metrics.request import RequestMetrics
from .model_mapping import DEFAULT_TAG
from .translate import (
    FINISHED_WITH_ERROR,
    RequestValidationError,
    has_system_messages_to_join,
    with_nine_character_ids,
    with_one_system_message,
)
from .upstream import UpstreamPool, UpstreamResult

log = logging.getLogger("trioproxy.forward")
_ABSENT = object()
T = TypeVar("T")


async def json_object(call: Call) -> dict[str, Any]:
    """The request body as a JSON object; a client mistake is a 400, never a 500. A body
    over OFF_LOOP_BYTES is checked and decoded in a JSON thread (json_threads), abandoned
    to a client that leaves (bytes in, a new object out); a smaller one here, on the loop
    (a coroutine costs ~55 ns per request; a thread's round trip more than the work)."""
    raw = call.body
    if not raw:
        raise BadRequest("missing request body", param=None)
    lenient = call.path.startswith("/api/")
    if len(raw) <= OFF_LOOP_BYTES:
        body = _checked_object(raw, lenient)
    else:
        body = await off_loop(_checked_object, raw, lenient, abandon_on_cancel=True)
    metric = call.state.metric  # on the loop: the metrics are not the thread's to touch
    if metric is not None and not metric.request_size:
        metric.request_size = len(raw)
    return body


def _checked_object(raw: bytes, lenient: bool) -> dict[str, Any]:
    """A non-empty body checked and decoded as a JSON object (on the loop or in a thread)."""
    if len(raw) > _COUNTED_BODY_BYTES:
        _refuse_what_decodes_too_large(raw)
    try:
        body = _decoded(raw, lenient=lenient)
    except ValueError as exc:  # UnicodeDecodeError and NestedTooDeeply included
        raise BadRequest(f"invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


# Decoded, a body of tiny values takes up to 30 times its size (57 MiB of "[]," made
# 1.9 GB): past 1 MiB its commas, about one per value, are counted first (30 ms for 50 MiB).
# Measured at the limit: 2,000,000 short strings take 180 MB, integers 50 MB. A chat, a
# document, or a batch of token arrays as backends take them (LangChain sends 1,000
# inputs of token ids; 1,000 of 1,000 tokens is half the limit) stays below it.
_COUNTED_BODY_BYTES = 1 << 20
MAX_JSON_ITEMS = 2_000_000
# arrays and objects cost the most (about 60 bytes and 0.35 µs each to decode; 999,000
# "[]" in 3 MB held a worker 370 ms): fewer of them, counted by their opening brackets
MAX_JSON_CONTAINERS = 500_000


def _refuse_what_decodes_too_large(raw: bytes) -> None:
    """A 413 for a body whose decoding would take far more memory and time than its size
    suggests; the counts include what is inside strings, so they err on the side of a
    body that would be harmless (a text with millions of commas)."""
    if raw.count(b",") > MAX_JSON_ITEMS:
        raise ProxyError(
            f"request body holds more than {MAX_JSON_ITEMS:,} commas, about one per JSON "
            "value: send fewer values (a larger batch in several requests)",
            413,
        )
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_CONTAINERS:
        raise ProxyError(
            f"request body holds more than {MAX_JSON_CONTAINERS:,} JSON arrays and objects: "
            "send fewer (a larger batch in several requests)",
            413,
        )


# A backend's answer is bounded the same way, except that its values may be many: a float
# embedding batch of 2,048 x 3,072 holds 6.3 million, of 10-20 bytes each, which decode to
# about 32 bytes each. Past 1 MiB it may hold as many commas as one per 8 bytes (decoded, a
# value of 8 bytes of text takes at most about 8 times that), and the same containers.
_ANSWER_BYTES_PER_VALUE = 8


def _answer_decodes_too_large(content: bytes) -> str | None:
    """Why a backend's answer would take far more memory to decode than its size (a
    200 MB answer of empty arrays took 6.3 GB and 20 s of a worker); None if it would not."""
    if len(content) <= _COUNTED_BODY_BYTES:
        return None
    most_values = max(MAX_JSON_ITEMS, len(content) // _ANSWER_BYTES_PER_VALUE)
    if content.count(b",") > most_values:
        return f"it holds more than {most_values:,} commas in {len(content):,} bytes"
    if content.count(b"[") + content.count(b"{") > MAX_JSON_CONTAINERS:
        return f"it holds more than {MAX_JSON_CONTAINERS:,} arrays and objects"
    return None


def _decoded(raw: bytes, *, lenient: bool) -> Any:
    """``loads``; ``lenient`` (``/api/*``) reads bytes that are not UTF-8 as U+FFFD, as
    Ollama's decoder (Go's) does, so its clients get away with them (Windows PowerShell
    5.1 sends Latin-1)."""
    try:
        return loads(raw)
    except UnicodeDecodeError:
        if not lenient:
            raise
    return loads(raw.decode(errors="replace"))


def encode(payload: Any) -> bytes:
    """A request body the proxy wrote from the client's, for the backend. orjson reads 1,024
    levels but writes 254, and the standard library, which writes the rest, only about 900
    (jsonutil): a client's body between the two is read, then cannot be written. Only the
    client can fix that, so it is the client's 400; checking every body's depth up front
    would cost more than decoding it."""
    try:
        return compact_json(payload)
    except NestedTooDeeply:
        raise _too_deep_to_forward() from None


async def encoded_for_backend(call: Call, payload: Any) -> bytes | None:
    """``payload`` as the backend gets it: bytes and None as they are, an object encoded
    (:func:`encode`); in a JSON thread when the client's body it was written from is over
    OFF_LOOP_BYTES (and so about as large), waited for by a client that leaves, since the
    payload is the request's own object, read by the thread until it is done."""
    if isinstance(payload, bytes | None):
        return payload
    if len(call.body) <= OFF_LOOP_BYTES:
        return encode(payload)
    return await off_loop(encode, payload)


def for_backend(translate: Callable[..., T], *args: Any) -> T:
    """``translate(*args)`` on the client's request: a translation that writes part of it
    as JSON text (a tool call's arguments) fails for the client's depth as :func:`encode`
    does, a 400."""
    try:
        return translate(*args)
    except NestedTooDeeply:
        raise _too_deep_to_forward() from None


def _too_deep_to_forward() -> BadRequest:
    return BadRequest("invalid JSON in request body: nested too deeply to be forwarded")


def validated(
    validator: Callable[..., dict[str, Any]], body: Any, **options: Any
) -> dict[str, Any]:
    try:
        return validator(body, **options)
    except RequestValidationError as exc:
        raise BadRequest(str(exc), param=exc.field) from None


def note_model(state: RequestState, client_model: str) -> None:
    if state.metric is not None:
        # NAME:latest is NAME (Ollama's rule, model_mapping): one model, one label
        state.metric.model = client_model.removesuffix(DEFAULT_TAG) or client_model


def note_usage(state: RequestState, response: Any) -> None:
    """Token counts from a backend response's ``usage``, for the metrics."""
    note_usage_counts(state, response.get("usage") if isinstance(response, dict) else None)


def note_usage_counts(state: RequestState, usage: Any) -> None:
    """Token counts from a ``usage`` object, for the metrics (Chat Completions' names, or
    the Responses API's ``input_tokens`` / ``output_tokens``)."""
    metric = state.metric
    if metric is None or not isinstance(usage, dict):
        return
    # the other name is looked up only when the first is absent (a present null counts)
    prompt = usage.get("prompt_tokens", _ABSENT)
    if prompt is _ABSENT:
        prompt = usage.get("input_tokens")
    completion = usage.get("completion_tokens", _ABSENT)
    if completion is _ABSENT:
        completion = usage.get("output_tokens")
    metric.input_tokens = whole_number(prompt)
    metric.output_tokens = whole_number(completion)


async def call_json(
    call: Call,
    path: str,
    payload: dict[str, Any] | bytes | None,
    *,
    method: str = "POST",
) -> tuple[Any, UpstreamResult]:
    """Non-streaming backend call; returns the decoded JSON body."""
    body = await encoded_for_backend(call, payload)
    result = await call_raw(call, path, body, method=method)
    secrets = call.app.settings.backend_secrets
    # embeddings are floats only: no integer there needs the exactness test
    exact_integers = path != "/embeddings"
    content = result.response.content
    try:  # read_answer's steps, inline: its coroutine cost 0.3 µs a request
        if len(content) <= OFF_LOOP_BYTES:
            return checked_answer(content, secrets, exact_integers), result
        read = partial(checked_answer, content, secrets, exact_integers)
        return await off_loop(read, abandon_on_cancel=True), result
    except BadUpstreamResponse:
        call.app.collector.upstream_error("protocol")
        raise


async def read_answer(call: Call, read: Callable[..., T], content: bytes, *args: Any) -> T:
    """``read(content, *args)``, a backend's answer decoded (:func:`checked_answer` or a
    function that calls it), in a JSON thread past OFF_LOOP_BYTES: bytes in, a new object
    out, so a client that leaves need not wait for it. Its BadUpstreamResponse is counted
    as a protocol error, here on the loop (the metrics are not the thread's to touch)."""
    try:
        if len(content) <= OFF_LOOP_BYTES:
            return read(content, *args)
        return await off_loop(read, content, *args, abandon_on_cancel=True)
    except BadUpstreamResponse:
        call.app.collector.upstream_error("protocol")
        raise


def checked_answer(content: bytes, secrets: BackendSecrets, exact_integers: bool = True) -> Any:
    """:func:`json_answer`, and a BadUpstreamResponse for one that reports an error: some
    gateways answer a failure with 200 and an error body, which is not an empty answer.
    Pure: on the loop or in a JSON thread."""
    payload = json_answer(content, exact_integers=exact_integers)
    if _reports_an_error(payload):
        message = (
            upstream_error_message(content, 200) if payload.get("error") else FINISHED_WITH_ERROR
        )
        raise BadUpstreamResponse(scrub(f"the backend reported an error: {message}", secrets))
    return payload


def json_answer(content: bytes, *, exact_integers: bool = True) -> Any:
    """A backend's 2xx body decoded, unless decoding it would cost far more than its size
    or it is no JSON (BadUpstreamResponse saying which)."""
    if (costly := _answer_decodes_too_large(content)) is not None:
        raise BadUpstreamResponse(f"the backend's answer is too costly to decode: {costly}")
    try:
        return loads(content, exact_integers=exact_integers)
    except ValueError as exc:
        raise BadUpstreamResponse(_not_json_message(exc)) from None


def _not_json_message(exc: ValueError) -> str:
    if isinstance(exc, NestedTooDeeply):
        return "the backend returned JSON nested too deeply to be read"
    return "the backend returned a body that is not JSON"


_JSON_SPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"


def require_json_object(call: Call, content: bytes, *, delimited: bool = True) -> None:
    """A 2xx body relayed as bytes must be the JSON object the API promises: an empty,
    cut or HTML body would reach an OpenAI client as a success it cannot read. Its ends
    tell (decoding it whole to be sure would undo relaying it as bytes: 300 µs for a batch
    of embeddings); the metrics' ``usage`` lookup decodes its tail anyway.

    A UTF-8 byte order mark before the object passes, relayed as it came: the openai SDK
    reads a body with httpx's ``Response.json`` (``json.loads`` on bytes, which skips it),
    and a browser's ``fetch`` drops it too. NDJSON (``{...}`` line after line, an Ollama
    API where an OpenAI one was expected) has the ends of one object: it is caught by its
    first line break when that falls within the first 64 KiB (:func:`_objects_on_lines`);
    an object split across lines further on, or a body whose depth is more than a JSON
    decoder reads (1,024 levels), passes: only a whole decode would tell.

    Not ``delimited``: a body that ended where the backend closed the connection (neither
    a Content-Length nor chunked), so a cut one cannot be told from a whole one by its
    framing: it is decoded whole (rare: HTTP/1.0-style servers)."""
    body = content.strip(_JSON_SPACE)  # C speed; a copy only when there is space
    if body.startswith(_BOM):
        body = body[len(_BOM) :].lstrip(_JSON_SPACE)  # a copy, for this rare body only
    if (
        len(body) < 2
        or body[:1] != b"{"
        or body[-1:] != b"}"
        or _objects_on_lines(body)
        or (not delimited and not _decodes_whole(body))
    ):
        _not_a_json_object(call)


async def require_unframed_json_object(call: Call, content: bytes) -> None:
    """:func:`require_json_object` for a body over OFF_LOOP_BYTES that ended where the
    backend closed the connection: its ends and first line checked here, its decoding
    (which alone tells a cut one) in a JSON thread (it held the loop as long as any
    decoding: 60-330 ms for 32 MB), bytes in, abandoned to a client that leaves."""
    require_json_object(call, content)
    # a byte order mark or spaces around the object: decoded as they are (the standard
    # library, which takes over from orjson, skips both)
    if not await off_loop(_decodes_whole, content, abandon_on_cancel=True):
        _not_a_json_object(call)


def _not_a_json_object(call: Call) -> NoReturn:
    call.app.collector.upstream_error("protocol")
    raise BadUpstreamResponse("the backend returned a body that is not a JSON object")


def _decodes_whole(body: bytes) -> bool:
    try:
        loads(body)
    except NestedTooDeeply:
        return True  # too deep to tell, as for a framed body
    except ValueError:  # cut, or not UTF-8
        return False
    return True


def delimited_by_framing(response: httpx.Response) -> bool:
    """Whether a body's end was announced (Content-Length, chunked), not just a close."""
    headers = response.headers
    return "content-length" in headers or "chunked" in headers.get("transfer-encoding", "")


# how far the first line break is looked for (memchr: 0.6 µs; a whole 1.2 MB batch of
# embeddings without one took 10 µs)
_LINE_BREAK_WINDOW = 64 * 1024
_NEXT_OBJECT = re.compile(rb"[ \t\r\n]*\{")


def _objects_on_lines(body: bytes) -> bool:
    """Whether the first line break stands between a ``}`` and a ``{``: never one JSON
    value (a line break cannot be inside a JSON string, and two values need a comma
    between them), but what NDJSON looks like. Pretty-printed JSON breaks its first line
    after ``{``, so this costs it one ``find``."""
    at = body.find(b"\n", 0, _LINE_BREAK_WINDOW)
    if at < 0:
        return False
    before = body[max(0, at - 16) : at].rstrip(_JSON_SPACE)  # a few bytes, not the body
    return before.endswith(b"}") and _NEXT_OBJECT.match(body, at) is not None


def _reports_an_error(payload: Any) -> bool:
    """An ``error`` member instead of an answer, or choices that end with
    ``finish_reason: "error"`` (OpenRouter's failed completion carries an error too)."""
    if not isinstance(payload, dict) or payload.get("data"):
        return False
    choices = payload.get("choices")
    if isinstance(choices, list) and choices:
        return any(
            isinstance(choice, dict) and choice.get("finish_reason") == "error"
            for choice in choices
        )
    return bool(payload.get("error")) and not choices


def from_backend(call: Call, translate: Callable[..., T], *args: Any) -> T:
    """``translate(*args)`` on a backend's decoded 2xx body. The translations are pure and
    trust the shape of the backend's API, so a failure here means a body of another shape:
    the backend's fault (502), not ours (500); logged with its trace in case it is ours.
    So is JSON read from it (a tool call's arguments, up to 1,024 levels) that cannot be
    written again for the client (about 900): not logged, since it is not ours."""
    try:
        return translate(*args)
    except NestedTooDeeply as exc:
        call.app.collector.upstream_error("protocol")
        raise BadUpstreamResponse(f"the backend's response is {exc}") from None
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        log.warning("the backend's response has an unexpected shape", exc_info=True)
        call.app.collector.upstream_error("protocol")
        raise BadUpstreamResponse(
            f"the backend returned a response of an unexpected shape ({type(exc).__name__})"
        ) from None


async def call_raw(
    call: Call, path: str, body: bytes | None, *, method: str = "POST"
) -> UpstreamResult:
    state = call.state
    # what the call takes from its client's request, as keywords: a dict of them built
    # and unpacked cost 0.5 µs a request
    result = await pool(call).request(
        method,
        path,
        body=body,
        request_id=state.request_id,
        client_retries=state.client_retries,
        trace=state.trace,
    )
    _note_upstream(call, result, complete=True)
    return result


async def open_stream(
    call: Call, path: str, payload: dict[str, Any] | bytes | None, *, method: str = "POST"
) -> UpstreamResult:
    """Open a streamed backend response and register its closing with the request.

    The close runs from the request's bookkeeping (``Tracked``) whether or not the body is
    ever iterated, so a client that leaves during the response start cannot leak the
    backend connection (stack notes P9)."""
    state = call.state
    body = await encoded_for_backend(call, payload)
    metric = state.metric
    if metric is not None:
        # a stream from the start: one that times out, fails or is left by its client
        # before the backend's headers is a stream that got no first token, too. A
        # request sent again (as_the_backend_takes, after a refusal its quirk explains)
        # is this stream, not the refused one: its 500's account of it is dropped
        metric.streaming = True
        metric.stream_outcome = None
        metric.answered_plainly = False
    try:
        result = await pool(call).request(
            method,
            path,
            body=body,
            request_id=state.request_id,
            client_retries=state.client_retries,
            trace=state.trace,
            stream=True,
            header_timeout=call.app.settings.stream_first_token_timeout,
            early=state.early_start,
        )
    except ProxyError as error:
        if metric is not None:
            _note_stream_refused(metric, error)
        raise
    state.cleanups.append(result.aclose)
    _note_upstream(call, result, complete=False)
    return result


def _note_stream_refused(metric: RequestMetrics, error: ProxyError) -> None:
    """A backend's 4xx is a refused request, not a stream (as one refused at the stream's
    first event); a timeout waiting for the headers is a timed-out stream, anything else a
    failed one."""
    if isinstance(error, UpstreamStatusError) and (error.status < 500 or error.status == 501):
        metric.streaming = False  # 501: the backend does not do it, a client error here too
        return
    metric.stream_outcome = "timeout" if isinstance(error, UpstreamTimeout) else "error"
    metric.answered_plainly = True


@dataclass(frozen=True)
class FieldQuirk:
    """A field of a request the proxy writes that some backend models refuse: how their
    refusal reads, and what the request becomes for them."""

    field: str
    refused: Callable[[UpstreamStatusError], bool]
    adapt: Callable[[dict[str, Any]], None]
    news: str  # logged once per model (``%s``: the model)
    # whether a request holds what the quirk is about (default: ``field`` among its keys)
    present: Callable[[dict[str, Any]], bool] | None = None
    # whether ``adapt`` would change a refused request, asked after a refusal only (a
    # refusal its words match for another cause is the client's, not sent again as it was)
    adapts: Callable[[dict[str, Any]], bool] | None = None

    def applies(self, payload: dict[str, Any]) -> bool:
        return self.present(payload) if self.present is not None else self.field in payload


@dataclass
class BackendQuirks:
    """What the backend was found to refuse, per quirk and per model (a gateway may front
    some backends that take a field and some that do not), so that later requests go as
    it takes them."""

    found: dict[str, set[str]] = field(default_factory=dict)

    # bounds each set: a backend that accepts any model name cannot grow it without end
    MAX_MODELS = 1000

    def has(self, quirk: FieldQuirk, model: str) -> bool:
        return model in self.found.get(quirk.field, ())

    def note(self, quirk: FieldQuirk, model: str) -> bool:
        """Remember that ``model`` has ``quirk``; whether it is news."""
        models = self.found.setdefault(quirk.field, set())
        if model in models:
            return False
        if len(models) < self.MAX_MODELS:
            models.add(model)
        return True


async def as_the_backend_takes(
    call: Call,
    payload: dict[str, Any],
    quirk: FieldQuirk,
    send: Callable[[dict[str, Any]], Awaitable[T]],
) -> T:
    """``send(payload)``, adapted for a backend model known to refuse ``quirk.field``; a
    first refusal is remembered and the request sent again, adapted."""
    if not quirk.applies(payload):
        return await send(payload)
    quirks: BackendQuirks = call.app.backend_quirks  # type: ignore[attr-defined]
    model = str(payload.get("model", ""))
    if quirks.has(quirk, model):
        quirk.adapt(payload)
        return await send(payload)
    try:
        return await send(payload)
    except UpstreamStatusError as error:
        if not quirk.refused(error) or (quirk.adapts is not None and not quirk.adapts(payload)):
            raise
    if quirks.note(quirk, model):
        log.warning(quirk.news, model)
    quirk.adapt(payload)
    return await send(payload)


# Mistral's API, and vLLM serving Mistral's models, refuse any other tool call id than
# nine letters and digits: "Tool call id was call_… but must be a-z, A-Z, 0-9, with a
# length of 9." The ids the proxy makes up are so; a client's own may not be.
_REFUSES_CALL_IDS = re.compile(rb"a-z, ?A-Z, ?0-9,? with a length of 9", re.IGNORECASE)


def refuses_tool_call_ids(error: UpstreamStatusError) -> bool:
    """Whether a backend's 400/422 refuses a request's tool call ids for their shape."""
    return error.status in (400, 422) and _REFUSES_CALL_IDS.search(error.body) is not None


NINE_CHARACTER_CALL_IDS = FieldQuirk(
    "tool_call_id",
    refuses_tool_call_ids,
    with_nine_character_ids,
    "the backend takes only tool call ids of nine letters and digits for model %s "
    "(Mistral's); its requests now have theirs rewritten so",
    present=lambda payload: True,  # only a refusal tells: no scan of the messages
)


# A chat template that takes one system message, first (Qwen3.5's on; vLLM answers 400,
# llama.cpp's server and Ollama 500), or alternating turns after it (Gemma 3's, Mistral's)
_REFUSES_LATE_SYSTEM = re.compile(
    rb"system message must be at the beginning|roles must alternate", re.IGNORECASE
)


def refuses_late_system(error: UpstreamStatusError) -> bool:
    """Whether a backend's 400/422/500 is its chat template refusing a system message
    that is not the first one (and only one)."""
    return error.status in (400, 422, 500) and _REFUSES_LATE_SYSTEM.search(error.body) is not None


ONE_SYSTEM_MESSAGE = FieldQuirk(
    "system_messages",
    refuses_late_system,
    with_one_system_message,
    "the backend takes only one system message, first, for model %s (its chat template); "
    "its requests now have their system messages joined into one",
    present=lambda payload: True,  # only a refusal tells: no scan of the messages
    # "roles must alternate" is also two user turns in a row, which joining leaves as is
    adapts=has_system_messages_to_join,
)


async def call_chat(call: Call, payload: dict[str, Any]) -> tuple[Any, UpstreamResult]:
    """``call_json`` for a chat completion the proxy wrote, its token limit as the backend
    takes it (``MAX_COMPLETION_TOKENS``)."""
    send = partial(call_json, call, "/chat/completions")

    async def with_system_as_taken(sent: dict[str, Any]) -> tuple[Any, UpstreamResult]:
        return await as_the_backend_takes(call, sent, ONE_SYSTEM_MESSAGE, send)

    async def with_call_ids_as_taken(sent: dict[str, Any]) -> tuple[Any, UpstreamResult]:
        return await as_the_backend_takes(call, sent, NINE_CHARACTER_CALL_IDS, with_system_as_taken)

    return await as_the_backend_takes(call, payload, MAX_COMPLETION_TOKENS, with_call_ids_as_taken)


async def open_chat_stream(call: Call, payload: dict[str, Any]) -> UpstreamResult:
    """``open_stream`` for a chat completion the proxy wrote, its token limit and its
    ``stream_options`` (it asks for the token counts) as the backend takes them; streams
    without ``stream_options`` have their tokens counted from their chunks."""

    async def with_system_as_taken(sent: dict[str, Any]) -> UpstreamResult:
        return await as_the_backend_takes(
            call, sent, ONE_SYSTEM_MESSAGE, partial(open_stream, call, "/chat/completions")
        )

    async def with_call_ids_as_taken(sent: dict[str, Any]) -> UpstreamResult:
        return await as_the_backend_takes(call, sent, NINE_CHARACTER_CALL_IDS, with_system_as_taken)

    async def without_stream_options_if_refused(sent: dict[str, Any]) -> UpstreamResult:
        return await as_the_backend_takes(call, sent, NO_STREAM_OPTIONS, with_call_ids_as_taken)

    return await as_the_backend_takes(
        call, payload, MAX_COMPLETION_TOKENS, without_stream_options_if_refused
    )


def wants_max_completion_tokens(error: UpstreamStatusError) -> bool:
    """Whether a backend's 400 refuses ``max_tokens`` and names ``max_completion_tokens``
    as the field to use (OpenAI's wording for its reasoning models)."""
    body = error.body
    return (
        error.status == 400
        and b"max_completion_tokens" in body
        and _REFUSES_MAX_TOKENS.search(body) is not None
    )


_REFUSES_MAX_TOKENS = re.compile(
    rb"max_tokens.{0,80}not supported|unsupported.{0,80}max_tokens", re.IGNORECASE
)


def _rename_max_tokens(payload: dict[str, Any]) -> None:
    payload["max_completion_tokens"] = payload.pop("max_tokens")


# words with which validators refuse a field they do not know (pydantic: extra_forbidden,
# "Extra inputs are not permitted"; others: unrecognized, unknown, unsupported)
_REFUSES_A_FIELD = re.compile(
    rb"extra|unrecogni[sz]ed|unknown|unsupported|not supported|not permitted"
    rb"|not allowed|forbidden|unexpected",
    re.IGNORECASE,
)
# how close to the field's name such a word must be: an error that merely echoes the
# request (a "prompt too long" quoting the whole body) must not look like a refusal
_NEAR = 80


def refuses_stream_options(error: UpstreamStatusError) -> bool:
    """Whether a backend's 400/422 refuses the ``stream_options`` field itself."""
    return refuses_field(error, "stream_options")


def refuses_field(error: UpstreamStatusError, name: str) -> bool:
    """Whether a backend's 400/422 refuses the field ``name`` itself: a validation error
    located at that field (pydantic's ``loc``), or a message that names it next to a word
    of refusal (OpenAI's "Unrecognized request argument supplied: …", "Unsupported
    parameter: '…'")."""
    encoded = name.encode()
    if error.status not in (400, 422) or encoded not in error.body:
        return False
    try:
        payload = loads(error.body)
    except ValueError:
        payload = None
    if _located_at(payload, name):
        return True
    for at in _named_as_a_field(encoded).finditer(error.body):
        window = error.body[max(0, at.start() - _NEAR) : at.end() + _NEAR]
        if _REFUSES_A_FIELD.search(window):
            return True
    return False


@functools.lru_cache(maxsize=64)
def _named_as_a_field(name: bytes) -> re.Pattern[bytes]:
    """``name`` as a word of its own (not inside "reasoning_effort" for "reasoning"), and
    not as a key of JSON (``"name":``, also escaped inside strings): an error that quotes
    the request it refuses (a prompt too long, say) holds the field as a key, next to
    whatever words the client wrote, and must not read as a refusal of the field."""
    return re.compile(rb"(?<![\w])" + re.escape(name) + rb'(?![\w])(?!\\*"\s*:)')


def extra_body_quirk(setting: str, added: tuple[str, ...]) -> FieldQuirk:
    """The fields an operator's extra body (``setting``) ``added`` to a request, as a
    quirk: a backend model that refuses one of them gets the request again without them
    all, and later requests for it go without (a gateway may front models that take a
    reasoning switch and models that do not)."""

    def refused(error: UpstreamStatusError) -> bool:
        return any(refuses_field(error, name) for name in added)

    def adapt(payload: dict[str, Any]) -> None:
        for name in added:
            payload.pop(name, None)

    def present(payload: dict[str, Any]) -> bool:
        return any(name in payload for name in added)

    return FieldQuirk(
        f"{setting}:{','.join(added)}",
        refused,
        adapt,
        f"the backend refuses {setting} ({', '.join(added)}) for model %s; its requests "
        "now go without it",
        present,
    )


def optional_field(name: str, news: str | None = None) -> FieldQuirk:
    """A field some backend models refuse (:func:`refuses_field`): such a model gets the
    request again without it, and its later requests go without."""

    def without(payload: dict[str, Any]) -> None:
        payload.pop(name, None)

    news = news or f"the backend refuses {name} for model %s; its requests now go without it"
    return FieldQuirk(name, functools.partial(refuses_field, name=name), without, news)


# Mistral's API refuses stream_options (422, extra_forbidden)
NO_STREAM_OPTIONS = optional_field(
    "stream_options",
    "the backend refuses stream_options for model %s; its streams now go without it, and "
    "their output tokens are counted from the chunks",
)
# OpenAI: "This model does not support specifying dimensions." (text-embedding-ada-002);
# vLLM: "Model ... does not support matryoshka representation, changing output
# dimensions will lead to poor results."
_NO_DIMENSIONS = re.compile(rb"does not support|not supported|matryoshka", re.IGNORECASE)


def refuses_dimensions(error: UpstreamStatusError) -> bool:
    """Whether a backend's 400/422 refuses an embedding request's ``dimensions``."""
    if refuses_field(error, "dimensions"):
        return True
    body = error.body
    return (
        error.status in (400, 422) and b"dimensions" in body and bool(_NO_DIMENSIONS.search(body))
    )


# Ollama cuts any model's vectors to the dimensions asked for; a backend model may refuse
# the field: asked without it, its vectors are cut by the proxy (tr.cut_to_dimensions)
NO_DIMENSIONS = FieldQuirk(
    "dimensions",
    refuses_dimensions,
    lambda payload: payload.pop("dimensions", None),
    "the backend refuses dimensions for model %s; its embeddings are now asked for "
    "without it and cut to the length asked for, as Ollama cuts them",
)
# OpenAI's reasoning models refuse max_tokens (num_predict's usual name) for this one
MAX_COMPLETION_TOKENS = FieldQuirk(
    "max_tokens",
    wants_max_completion_tokens,
    _rename_max_tokens,
    "the backend takes max_completion_tokens, not max_tokens, for model %s; its output "
    "limits now go as that",
)


def _located_at(payload: Any, name: str, depth: int = 0) -> bool:
    """A validation error's entry whose ``loc`` names the field, anywhere in the body."""
    if depth > 6:
        return False
    if isinstance(payload, dict):
        loc = payload.get("loc")
        if isinstance(loc, list) and name in loc:
            return True
        return any(_located_at(v, name, depth + 1) for v in payload.values())
    if isinstance(payload, list):
        return any(_located_at(v, name, depth + 1) for v in payload)
    return False


def _note_upstream(call: Call, result: UpstreamResult, *, complete: bool) -> None:
    call.app.readiness.mark_reachable()  # type: ignore[attr-defined]
    metric = call.state.metric
    if metric is None:
        return
    metric.upstream_first_byte_ms = (result.headers_at - result.started) * 1000.0
    if complete:
        metric.upstream_ms = (time.perf_counter() - result.started) * 1000.0


def pool(call: Call) -> UpstreamPool:
    if call.app.pool is None:
        raise UpstreamUnavailable("the backend pool is not running")
    return call.app.pool
