"""The OpenAI API (``/v1/*``): pass-through with model mapping, streams relayed as they come.

``FAST_ROUTES`` (chat, completions, embeddings, responses) are served by ``fastpath`` for ``POST``;
the Quart routes for the same paths make other methods a 405 and serve in-process test
clients the same handlers. The Responses API's routes by id (retrieve, resume a stream,
delete, cancel, input items) go through Quart.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import quote, quote_from_bytes, unquote

import trio
from quart import Blueprint, Response, request
from werkzeug.exceptions import MethodNotAllowed

from . import translate as tr
from .app import current_call, quart_route, served
from .catalog import backend_name_for, list_answer, listed_entry
from .errors import BadRequest, NotFound, shown_name
from .exchange import JSON, Call, Handler, Reply
from .forward import (
    ONE_SYSTEM_MESSAGE,
    as_the_backend_takes,
    call_raw,
    delimited_by_framing,
    encoded_for_backend,
    json_object,
    note_model,
    note_usage_counts,
    open_stream,
    require_json_object,
    require_unframed_json_object,
    validated,
)
from .json_threads import OFF_LOOP_BYTES, by_size, off_loop
from .jsonutil import loads, member_near_the_end, plain_usage_counts, top_level_member
from .keepalive import stream_opening
from .ledger import MAX_ID_CHARS, Counted, Ledger, finished_usage, pending_id
from .metrics.request import RequestMetrics
from .metrics.threads import metrics_threads
from .relay import (
    EVENT_STREAM,
    STREAM_HEADERS,
    StreamEnd,
    StreamObserver,
    dumps,
    relay_openai,
)
from .shared_ledger import SharedResponsesLedger
from .upstream import UpstreamResult, forwarded_headers

blueprint = Blueprint("openai", __name__)


async def forward(
    backend_path: str,
    call: Call,
    observer: Callable[[], StreamObserver] = tr.OpenAIStreamObserver,
    require_model: bool = True,
    creates_response: bool = False,
    embeddings: bool = False,
) -> Reply:
    app = call.app
    state = call.state
    body = await json_object(call)
    body = validated(tr.validate_openai_body, body, require_model=require_model)
    client_model = body.get("model")
    # nothing to rewrite: forward the client's bytes as they came
    payload: bytes | None = call.body
    sent = body  # what the payload holds
    rename: tuple[str, str] | None = None  # the backend's name and the client's, if they differ
    if client_model is not None:
        note_model(state, client_model)
        backend_model = await backend_name_for(call, client_model)
        if backend_model != client_model:
            rename = (backend_model, client_model)
            sent = tr.openai_passthrough_request(body, backend_model)
            payload = await encoded_for_backend(call, sent)
    if body.get("stream") is True:
        stream_opening(state, EVENT_STREAM, responses=creates_response)
        if backend_path == _CHAT:
            result = await _chat_as_taken(call, sent, payload, open_stream)
        else:
            result = await open_stream(call, backend_path, payload)
        rewrite = None
        if rename is not None:
            backend_name, client_name = rename
            rewrite = _model_rewriter({backend_name: client_name})
        watcher = observer()
        if isinstance(watcher, tr.OpenAIStreamObserver) and (n := _choices_asked(body)) > 1:
            watcher.expect_choices(n)
        # a response not stored cannot be polled: nothing to owe for it
        stored = creates_response and body.get("store") is not False
        on_finish = partial(_owe_if_cut, app.ledger, watcher) if stored else None
        options = body.get("stream_options")
        return _stream_reply(call, result, watcher, rewrite, on_finish, options)
    if backend_path == _CHAT:
        result = await _chat_as_taken(call, sent, payload, call_raw)
    else:
        result = await call_raw(call, backend_path, payload)
    content = result.response.content
    large = len(content) > OFF_LOOP_BYTES
    delimited = delimited_by_framing(result.response)
    if delimited or not large:
        require_json_object(call, content, delimited=delimited)
    else:  # only decoding it whole tells whether it was cut
        await require_unframed_json_object(call, content)
    if large:
        await _note_large_usage(call, content)
    else:
        _note_usage(call, content)
    if creates_response and body.get("background") is True:
        await _owe_when_queued(app.ledger, content)
    if large:
        asked = body if embeddings else None
        content = await _large_answer_as_asked(content, asked, rename)
        return _whole_reply(call, result, content)
    if embeddings:
        content = _embeddings_as_asked(content, body)
    if rename is not None:
        content = _rewrite_model_json(content, *rename)
    return _whole_reply(call, result, content)


_CHAT = "/chat/completions"


async def _chat_as_taken(
    call: Call,
    sent: dict[str, Any],
    payload: bytes | None,
    send: Callable[[Call, str, bytes | None], Awaitable[UpstreamResult]],
) -> UpstreamResult:
    """``send`` a chat completion (``payload``, the encoding of ``sent``) with its system
    messages as the backend's model takes them (``forward.ONE_SYSTEM_MESSAGE``, as on
    /api/chat and /v1/messages): a model whose chat template refused a system message
    that is not first, or more than one, gets the request again with them joined into
    one, first, and its later requests so at once. Otherwise the client's bytes go."""
    messages = sent.get("messages")

    async def as_taken(adapted: dict[str, Any]) -> UpstreamResult:
        if adapted.get("messages") is messages:  # not joined (joining writes a new list)
            return await send(call, _CHAT, payload)
        return await send(call, _CHAT, await encoded_for_backend(call, adapted))

    return await as_the_backend_takes(call, sent, ONE_SYSTEM_MESSAGE, as_taken)


def _choices_asked(body: tr.JSONDict) -> int:
    """The choices a chat or text completion asks for (``n``): 1 unless it names more.
    An integral float counts as its integer (pydantic backends, vLLM's, take ``2.0``)."""
    n = body.get("n")
    if type(n) is float and n.is_integer():
        return int(n)
    return n if type(n) is int else 1


FAST_ROUTES: dict[str, Handler] = {
    "/v1/chat/completions": partial(forward, _CHAT),
    "/v1/completions": partial(forward, "/completions"),
    "/v1/embeddings": partial(forward, "/embeddings", embeddings=True),
    # its events are not chat chunks: they get their own observer
    "/v1/responses": partial(
        forward, "/responses", observer=tr.ResponsesStreamObserver, creates_response=True
    ),
    "/v1/responses/input_tokens": partial(forward, "/responses/input_tokens", require_model=False),
    "/v1/responses/compact": partial(forward, "/responses/compact"),
}
for _path, _handler in FAST_ROUTES.items():
    quart_route(blueprint, _path, _handler)


# A response id goes into the backend's URL, which carries the proxy's API key. Ids are
# OpenAI's, vLLM's, OpenRouter's and Ollama's (letters, digits, "_" and "-") and LiteLLM's
# ("resp_" and the standard base64 of its routing data: 200-odd characters with "+", "/"
# and "="). So the characters of base64 and base64url, at most 1,024 of them. Not ".",
# "%", "?", "#" or a space: the id, encoded as one path segment, is then never a
# dot-segment, a second encoding, a query or a fragment in the backend's URL.
_ID_MAX = MAX_ID_CHARS
_ID_OTHER = re.compile(r"[^A-Za-z0-9_+/=-]")
_ID_ALPHABET = "letters, digits, '_', '-', '+', '/' and '='"
# "/" is "%2F" (one segment); "+" and "=" stay as they are, as the openai SDK sends them
_SEGMENT_SAFE = "+="
_QUERY_SAFE = "&=+%/:,;@!$'()*?~[]"
# The routes' suffixes, and the methods they take: an id may hold "/" (so its routes take
# a path), but "GET …/cancel" is still the wrong method for cancel, not a retrieve
_SUFFIX_METHODS = {"/cancel": ["OPTIONS", "POST"], "/input_items": ["GET", "HEAD", "OPTIONS"]}


@blueprint.route("/v1/responses/<path:response_id>", methods=["GET", "DELETE"])
async def stored_response(response_id: str) -> Response:
    """Retrieve (or, with ``stream=true``, resume the stream of) a stored response; delete it."""
    _refuse_a_suffix(response_id)
    method = _backend_method()
    resume = method == "GET" and request.args.get("stream", "").lower() == "true"
    return await _serve_by_id(
        method, response_id, "", stream=resume, head_only=request.method == "HEAD"
    )


@blueprint.post("/v1/responses/<path:response_id>/cancel")
async def cancel_response(response_id: str) -> Response:
    return await _serve_by_id("POST", response_id, "/cancel")


@blueprint.get("/v1/responses/<path:response_id>/input_items")
async def response_input_items(response_id: str) -> Response:
    return await _serve_by_id(_backend_method(), response_id, "/input_items")


def _backend_method() -> str:
    """HEAD asks the backend with GET (OpenAI's API has no HEAD on these routes): the client
    gets GET's status and headers, and the server sends no body."""
    return "GET" if request.method == "HEAD" else request.method


def _refuse_a_suffix(response_id: str) -> None:
    """A 405 for ``GET``/``DELETE …/cancel`` and ``DELETE …/input_items``, as before ids
    could hold "/": the path routes take them for ids ending in the suffix."""
    for suffix, methods in _SUFFIX_METHODS.items():
        if response_id.endswith(suffix):
            raise MethodNotAllowed(valid_methods=methods)


def _checked_id(response_id: str) -> str:
    """The id as one segment of the backend's path, or a 400 that says what is wrong."""
    problem = _id_problem(response_id)
    if problem is not None:
        raise BadRequest(f"invalid response id {problem}", param="response_id")
    return quote(response_id, safe=_SEGMENT_SAFE)


def _id_problem(response_id: str) -> str | None:
    if len(response_id) > _ID_MAX:
        return f"({len(response_id):,} characters long): at most {_ID_MAX:,} characters"
    if _held_an_empty_segment():
        return "(it begins with '/' or holds '//'): an empty path segment cannot be passed on"
    other = _ID_OTHER.search(response_id)
    if other is not None:
        shown = f"{response_id[:64]!r}" + ("…" if len(response_id) > 64 else "")
        return f"{shown}: {other.group()!r} is not allowed ({_ID_ALPHABET} only)"
    return None


def _held_an_empty_segment() -> bool:
    """Whether the id as sent began with "/" or held "//": the app merges repeated slashes
    before routing, so the id routed is another than the one sent."""
    raw: bytes = request.scope.get("raw_path", b"")
    sent = unquote(raw.decode("latin-1")).partition("/responses/")[2]
    return sent.startswith("/") or "//" in sent


async def _serve_by_id(
    method: str, response_id: str, suffix: str, *, stream: bool = False, head_only: bool = False
) -> Response:
    call = await current_call()
    path = f"/responses/{_checked_id(response_id)}{suffix}"
    if request.query_string:
        # as it came, but with anything a URL cannot hold (control bytes, which HTTP/2
        # lets through) percent-encoded: a client's odd query is not our 500
        path += "?" + quote_from_bytes(request.query_string, safe=_QUERY_SAFE)
    reply = await by_id(call, method, path, response_id, stream=stream, head_only=head_only)
    return await served(call, reply)


async def by_id(
    call: Call,
    method: str,
    backend_path: str,
    response_id: str,
    *,
    stream: bool,
    head_only: bool = False,
) -> Reply:
    """A Responses API route by id, forwarded as it came (nothing in it names a model);
    the backend's model names in the answer are mapped back. What it returns was counted
    by the request that created the response, except the usage the ledger says is owed
    (a background response, a stream cut before its end): that counts here, once."""
    app = call.app
    mapper = app.mapper
    if stream:
        if call.state.metric is not None:
            call.state.metric.replayed = True  # also if it fails before the backend answers
        result = await open_stream(call, backend_path, None, method=method)
        if head_only:
            return _stream_head(call, result)
        rewrite = _model_rewriter({b: mapper.to_client(b) for _, b in mapper.items()})
        watcher = tr.ReplayedResponsesObserver()
        ended = partial(_replay_ended, call, watcher, response_id)
        return _stream_reply(call, result, watcher, rewrite, ended)
    result = await call_raw(call, backend_path, None, method=method)
    content = result.response.content
    if method == "DELETE":
        _forget(call, response_id)
        return _whole_reply(call, result, content)
    large = len(content) > OFF_LOOP_BYTES  # a response with an image in base64, say
    # bytes in, a new object or bytes out: a client that leaves need not wait for them
    payload = (
        await off_loop(_json_object, content, abandon_on_cancel=True)
        if large
        else _json_object(content)
    )
    if (finished := finished_usage(payload)) is not None:
        _settle(call, *finished)
    model = payload.get("model") if payload is not None else None
    if isinstance(model, str):
        client_model = mapper.to_client(model)
        _note_backend_model(call, client_model)
        if client_model != model:
            rename = partial(_rewrite_model_json, content, model, client_model)
            content = await off_loop(rename, abandon_on_cancel=True) if large else rename()
    return _whole_reply(call, result, content)


async def _owe_when_queued(ledger: Ledger, content: bytes) -> None:
    """A queued background response's usage is owed (the ledger): its id read from the
    answer, decoded in a JSON thread past OFF_LOOP_BYTES (a queued response repeats the
    request's instructions and tools: a long system prompt makes it as long), bytes in,
    a new object out, abandoned to a client that leaves; the ledger noted on the loop, or
    the workers' shared one written in a thread before the client has the id (a poll
    through another worker at once finds it)."""
    payload = await by_size(len(content), _json_object, content, abandon_on_cancel=True)
    response_id = pending_id(payload)
    if response_id is None:
        return
    if ledger.shared:
        # not one of trio's default threads, which slow name resolutions may all hold;
        # abandoned to a client that leaves (a hung disk must not hold its request)
        await trio.to_thread.run_sync(
            ledger.owe, response_id, Counted(), abandon_on_cancel=True, limiter=metrics_threads()
        )
    else:
        ledger.owe(response_id, Counted())


def _owe_if_cut(ledger: Ledger, watcher: StreamObserver) -> None:
    """A stream that ended before its usage counted the tokens it carried: the rest is
    owed (a resumed stream, or a poll, settles it). At the stream's end, which cannot
    wait: the workers' shared ledger writes it in a thread of its own."""
    response_id = getattr(watcher, "response_id", None)
    if response_id is not None and watcher.completion_tokens is None:
        ledger.owe_soon(response_id, Counted(0, watcher.content_chunks))


def _note_streamed_model(call: Call, watcher: tr.ResponsesStreamObserver) -> None:
    """The model a resumed stream names (its tokens, if any are owed, go under it)."""
    if watcher.response_model is not None:
        _note_backend_model(call, call.app.mapper.to_client(watcher.response_model))


def _replay_ended(call: Call, watcher: tr.ReplayedResponsesObserver, response_id: str) -> None:
    """A resumed stream is over: its model named, and what its closing event's usage says
    the response still owes counted (``_settle``)."""
    _note_streamed_model(call, watcher)
    if watcher.final_usage is not None:
        _settle(call, response_id, watcher.final_usage, replayed=True)


def _note_backend_model(call: Call, name: str) -> None:
    """A model named by the backend's answer, not the client, noted for the metrics with
    the backend's secrets masked as in the reply (keys of 12 characters or more): a backend
    that echoes our key there must not make it a label, and a placeholder key ("ollama")
    must not mangle a model named after it ("ollama/llama3")."""
    note_model(call.state, call.app.settings.backend_secrets.mask_text(name))


def _settle(call: Call, response_id: str, usage: Any, *, replayed: bool = False) -> None:
    """Count what a finished response's ``usage`` says it still owes the metrics (the
    ledger): at once from this process's ledger, in memory; from the workers' shared one
    (files) in a metrics thread, as the request ends (a cleanup, after its reply), never
    on the event loop. ``replayed``: a resumed stream's (``settle_off_loop``)."""
    ledger = call.app.ledger
    if not isinstance(ledger, SharedResponsesLedger):
        _count_owed(call.state.metric, ledger.settle(response_id, usage))
        return
    settle = partial(_settle_shared, ledger, call.state.metric, response_id, usage, replayed)
    call.state.cleanups.insert(0, settle)  # run last: after the backend's connection is let go


async def _settle_shared(
    ledger: SharedResponsesLedger,
    metric: RequestMetrics | None,
    response_id: str,
    usage: Any,
    replayed: bool,
) -> None:
    if metric is not None:
        metric.finish()  # the request took until its reply was out, not this settling too
    _count_owed(metric, await ledger.settle_off_loop(response_id, usage, recheck=replayed))


def _count_owed(metric: RequestMetrics | None, owed: tuple[int, int] | None) -> None:
    """The tokens ``owed`` (input, output) as the request's own: its usage, not counted."""
    if owed is not None and metric is not None:
        metric.input_tokens, metric.output_tokens = owed
        metric.tokens_counted = False  # a replay's own (none) were counted from its deltas


def _forget(call: Call, response_id: str) -> None:
    """A deleted response owes nothing any more (in a metrics thread as the request ends
    for the workers' shared ledger, as ``_settle``)."""
    ledger = call.app.ledger
    if isinstance(ledger, SharedResponsesLedger):
        call.state.cleanups.insert(0, partial(ledger.forget_off_loop, response_id))
    else:
        ledger.forget(response_id)


@blueprint.get("/v1/models")
async def models() -> Response:
    call = await current_call()
    return Response(await list_answer(call, tr.openai_model_list), content_type=JSON)


@blueprint.get("/v1/models/<path:model_id>")
async def model(model_id: str) -> Response:
    call = await current_call()
    entry = await listed_entry(call, model_id, counted=False)
    if entry is None:
        raise NotFound(f"The model '{shown_name(model_id)}' does not exist", code="model_not_found")
    return _json(tr.openai_model_entry(model_id, entry, call.app.mapper.declared(model_id)))


def _json(payload: Any, status: int = 200) -> Response:
    return Response(dumps(payload), status=status, content_type=JSON)


def _whole_reply(call: Call, result: UpstreamResult, content: bytes) -> Reply:
    response = result.response
    return Reply(
        response.status_code,
        content,
        response.headers.get("content-type", JSON),
        forwarded_headers(response.headers, call.app.settings.backend_secrets),
    )


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        payload = loads(content)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _stream_head(call: Call, result: UpstreamResult) -> Reply:
    """HEAD of a resumed stream: GET's status and headers, and the backend's stream closed
    (by the request's cleanups) rather than read to its end for a body never sent."""
    if call.state.metric is not None:
        call.state.metric.streaming = False  # nothing was streamed
    secrets = call.app.settings.backend_secrets
    headers = {**forwarded_headers(result.response.headers, secrets), **STREAM_HEADERS}
    return Reply(200, b"", EVENT_STREAM, headers)


def _stream_reply(
    call: Call,
    result: UpstreamResult,
    observer: StreamObserver,
    rewrite: Callable[[bytes], bytes] | None,
    on_finish: Callable[[], None] | None = None,
    stream_options: object = None,
) -> Reply:
    metric = call.state.metric
    end = StreamEnd()
    if isinstance(observer, tr.ResponsesStreamObserver):
        end.responses = True  # its in-band error is the Responses API's error event
    chunks = relay_openai(
        result.response,
        observer,
        settings=call.app.settings,
        metric=metric,
        sent_at=result.started,  # the first-token deadline counts from here
        collector=call.app.collector,
        rewrite_model=rewrite,
        end=end,
        on_finish=on_finish,
        stream_options=stream_options,
    )
    secrets = call.app.settings.backend_secrets
    headers = {**forwarded_headers(result.response.headers, secrets), **STREAM_HEADERS}
    keepalive = call.app.settings.stream_keepalive_seconds
    return Reply(200, chunks, EVENT_STREAM, headers, end=end, keepalive=keepalive)


def _model_rewriter(names: dict[str, str]) -> Callable[[bytes], bytes] | None:
    """Rewrites the backend's model names (keys) to the client's (values) in raw JSON
    lines, each name once (a chain of renames must not rename a rename); None if there is
    nothing to rewrite."""
    renames = {
        _model_member(backend, sep, ascii_only): _model_member(client, sep, ascii_only)
        for backend, client in names.items()
        if backend != client
        # backends write compact JSON; both spellings cover the common serialisers
        for sep in ("", " ")
        # a name beyond ASCII as Python's json writes it ("\u00e8") and as vLLM, llama.cpp's
        # server and Ollama write it (UTF-8 as it is); one spelling for an ASCII name
        for ascii_only in (True, False)
    }
    if not renames:
        return None
    if len(renames) == 2:  # one name (the hot path): two plain replaces
        (old, new), (old_spaced, new_spaced) = renames.items()

        def rewrite_one(data: bytes) -> bytes:
            return data.replace(old, new).replace(old_spaced, new_spaced)

        return rewrite_one
    pattern = re.compile(
        b"|".join(re.escape(old) for old in sorted(renames, key=len, reverse=True))
    )

    def rewrite(data: bytes) -> bytes:
        return pattern.sub(lambda match: renames[match.group(0)], data)

    return rewrite


def _model_member(name: str, separator: str, ascii_only: bool = True) -> bytes:
    return f'"model":{separator}{json.dumps(name, ensure_ascii=ascii_only)}'.encode()


async def _large_answer_as_asked(
    content: bytes,
    embeddings: dict[str, Any] | None,
    rename: tuple[str, str] | None,
) -> bytes:
    """A non-stream answer over OFF_LOOP_BYTES as the client asked for it: the steps
    :func:`forward` takes on a smaller one (its embeddings as the request ``embeddings``
    asked, if it is one; the backend's model name as the client's, ``rename``: see
    :func:`_answer_as_asked`), in a JSON thread when one of them decodes and encodes it
    whole."""
    conversion = _conversion_asked(content, embeddings) if embeddings is not None else None
    if conversion is None and rename is None:
        return content  # as asked: relayed as it came, no thread
    # bytes in, bytes out: a client that leaves need not wait for it
    answer = partial(_answer_as_asked, content, conversion, rename)
    return await off_loop(answer, abandon_on_cancel=True)


def _answer_as_asked(
    content: bytes, conversion: tuple[int, bool] | None, rename: tuple[str, str] | None
) -> bytes:
    """For a JSON thread: ``content`` with its embeddings converted (``conversion``:
    :func:`_conversion_asked`) and the backend's model name as the client's (``rename``:
    the backend's, the client's)."""
    if conversion is not None:
        content = _converted(content, *conversion)
    if rename is not None:
        content = _rewrite_model_json(content, *rename)
    return content


def _rewrite_model_json(content: bytes, backend_model: str, client_model: str) -> bytes:
    """The backend's name for the model as the client's, as streams have it rewritten
    (``_model_rewriter``): only that name. A backend that names another model (OpenAI's
    dated version of an alias, OpenRouter's choice for ``openrouter/auto``) says which
    model answered, in a stream or not."""
    try:
        payload = loads(content)
    except ValueError:
        return content
    if isinstance(payload, dict) and payload.get("model") == backend_model:
        payload["model"] = client_model
        try:
            return dumps(payload)
        except ValueError:  # too deep to write again (jsonutil): relayed as it came
            return content
    return content


# a vector written as a JSON array, where one in base64 is a string
_FLOAT_VECTOR = re.compile(rb'"embedding"\s*:\s*\[')


def _embeddings_as_asked(content: bytes, body: dict[str, Any]) -> bytes:
    """An embeddings answer as the request asked for it, from a backend that ignores
    ``dimensions`` (llama.cpp's server) or ``encoding_format`` and wrote its vectors as
    arrays of floats: none longer than ``dimensions`` (cut as Ollama cuts them: the
    first values, scaled back to unit length; a client sizes its vector store by it),
    and in base64 when asked, as OpenAI encodes them (little-endian float32: the openai
    SDK for JavaScript asks for base64 by default and decodes what it gets as base64
    without looking, so floats became vectors of zeros, without an error). An answer
    already as asked is relayed as it came."""
    asked = _conversion_asked(content, body)
    return content if asked is None else _converted(content, *asked)


def _conversion_asked(content: bytes, body: dict[str, Any]) -> tuple[int, bool] | None:
    """What an embeddings answer must become for ``body`` (:func:`_embeddings_as_asked`),
    told without decoding it: the length to cut its vectors to (0: none) and whether to
    encode them in base64; None when it is as asked."""
    in_base64 = body.get("encoding_format") == "base64"
    dimensions = body.get("dimensions")
    cut = dimensions if type(dimensions) is int and dimensions > 0 else 0
    if not (in_base64 or cut) or (first := _FLOAT_VECTOR.search(content)) is None:
        return None
    if not in_base64 and _values_in(content, first.end()) <= cut:
        # a backend that honoured dimensions (OpenAI, vLLM): one model's vectors are all as
        # long as its first, so there is nothing to cut, and no need to decode an answer
        # of megabytes (a batch of 2,048 vectors of 256 held the event loop for 70 ms)
        return None
    return cut, in_base64


def _converted(content: bytes, cut: int, in_base64: bool) -> bytes:
    """An embeddings answer's vectors cut to ``cut`` values (when positive) and in base64
    (if ``in_base64``); as it came if it cannot be read, or nothing changed."""
    try:
        payload = loads(content, exact_integers=False)
    except ValueError:
        return content
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return content
    changed = [_as_asked(item, cut, in_base64) for item in data]
    if not any(changed):
        return content
    try:
        return dumps(payload)
    except ValueError:  # too deep to write again (jsonutil): relayed as it came
        return content


def _values_in(content: bytes, start: int) -> int:
    """How many values the JSON array of numbers opened just before ``start`` holds (a
    number holds no comma or bracket)."""
    end = content.find(b"]", start)
    if end < 0:
        return 0
    if not content[start:end].strip():
        return 0
    return content.count(b",", start, end) + 1


def _as_asked(item: Any, cut: int, in_base64: bool) -> bool:
    """``item["embedding"]``, if an array of numbers, cut to ``cut`` values (when
    positive and longer) and encoded in base64 if asked; whether it changed."""
    vector = item.get("embedding") if isinstance(item, dict) else None
    if not isinstance(vector, list) or not all(type(v) in (float, int) for v in vector):
        return False
    changed = False
    if cut and len(vector) > cut:
        item["embedding"] = vector = tr.cut_to_dimensions(vector, cut)
        changed = True
    return (in_base64 and _encode_vector(item)) or changed


def _encode_vector(item: Any) -> bool:
    """``item["embedding"]``, an array of numbers, as base64 of little-endian float32;
    whether it was one (a value float32 cannot hold leaves it as it came)."""
    vector = item.get("embedding") if isinstance(item, dict) else None
    if not isinstance(vector, list) or not all(type(v) in (float, int) for v in vector):
        return False
    try:
        packed = struct.pack(f"<{len(vector)}f", *vector)
    except OverflowError:
        return False
    item["embedding"] = base64.b64encode(packed).decode("ascii")
    return True


def _note_usage(call: Call, content: bytes) -> None:
    # the body is relayed as bytes: decode (the tail of) it only when metrics want usage
    metric = call.state.metric
    if metric is None:
        return
    counts = plain_usage_counts(content)  # the common usage, read without decoding
    if counts is None:
        note_usage_counts(call.state, top_level_member(content, "usage"))
    else:  # (whole numbers below WHOLE_NUMBER_LIMIT: as note_usage_counts would keep them)
        metric.input_tokens, metric.output_tokens = counts


async def _note_large_usage(call: Call, content: bytes) -> None:
    """:func:`_note_usage` for a body over OFF_LOOP_BYTES: searched on the loop only in
    its last OFF_LOOP_BYTES, where most backends write ``usage``; elsewhere (llama.cpp's
    server writes it before the embeddings; a look-alike key after it makes the whole
    body decoded) in a JSON thread, bytes in and a new object out, abandoned to a client
    that leaves."""
    if call.state.metric is None:
        return
    found, usage = member_near_the_end(content, "usage", OFF_LOOP_BYTES)
    if not found:
        usage = await off_loop(top_level_member, content, "usage", abandon_on_cancel=True)
    note_usage_counts(call.state, usage)
