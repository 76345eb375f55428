"""The OpenAI API (``/v1/*``): pass-through with model mapping, streams relayed as they come.

``FAST_ROUTES`` (chat, completions, embeddings, responses) are served by ``fastpath`` for ``POST``;
the Quart routes for the same paths make other methods a 405 and serve in-process test
clients the same handlers. The Responses API's routes by id (retrieve, resume a stream,
delete, cancel, input items) go through Quart.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from quart import Blueprint, Response, request

from . import translate as tr
from .app import current_call, quart_route, reply_response
from .errors import BadRequest, NotFound
from .exchange import JSON, Call, Handler, Reply, masked, primed
from .forward import (
    call_raw,
    encode,
    json_object,
    note_model,
    note_usage_counts,
    open_stream,
    validated,
)
from .jsonutil import loads, top_level_member
from .relay import (
    EVENT_STREAM,
    STREAM_HEADERS,
    StreamEnd,
    StreamObserver,
    dumps,
    relay_openai,
)
from .upstream import UpstreamResult

blueprint = Blueprint("openai", __name__)


async def forward(
    backend_path: str,
    call: Call,
    observer: Callable[[], StreamObserver] = tr.OpenAIStreamObserver,
    require_model: bool = True,
) -> Reply:
    app = call.app
    state = call.state
    body = validated(tr.validate_openai_body, json_object(call), require_model=require_model)
    client_model = body.get("model")
    backend_model = client_model
    if client_model is not None:
        note_model(state, client_model)
        backend_model = app.mapper.to_backend(client_model)
    if backend_model == client_model:
        # nothing to rewrite: forward the client's bytes as they came
        payload = call.body
    else:
        payload = encode(tr.openai_passthrough_request(body, app.mapper))
    if body.get("stream") is True:
        result = await open_stream(call, backend_path, payload)
        rewrite = None
        if backend_model != client_model:
            rewrite = _model_rewriter({backend_model: client_model})
        return _stream_reply(call, result, observer(), rewrite)
    result = await call_raw(call, backend_path, payload)
    content = result.response.content
    _note_usage(call, content)
    if backend_model != client_model:
        content = _rewrite_model_json(content, client_model)
    return _whole_reply(result, content)


FAST_ROUTES: dict[str, Handler] = {
    "/v1/chat/completions": partial(forward, "/chat/completions"),
    "/v1/completions": partial(forward, "/completions"),
    "/v1/embeddings": partial(forward, "/embeddings"),
    # its events are not chat chunks: they get their own observer
    "/v1/responses": partial(forward, "/responses", observer=tr.ResponsesStreamObserver),
    "/v1/responses/input_tokens": partial(forward, "/responses/input_tokens", require_model=False),
    "/v1/responses/compact": partial(forward, "/responses/compact"),
}
for _path, _handler in FAST_ROUTES.items():
    quart_route(blueprint, _path, _handler)


# A response id goes into the backend's URL with our API key: only the characters of
# OpenAI's ids ("resp_" and hex) pass, so "..", "%2F" or "?" cannot address another route.
_RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


@blueprint.route("/v1/responses/<response_id>", methods=["GET", "DELETE"])
async def stored_response(response_id: str) -> Response:
    """Retrieve (or, with ``stream=true``, resume the stream of) a stored response; delete it."""
    resume = request.method == "GET" and request.args.get("stream", "").lower() == "true"
    return await _serve_by_id(request.method, response_id, "", stream=resume)


@blueprint.post("/v1/responses/<response_id>/cancel")
async def cancel_response(response_id: str) -> Response:
    return await _serve_by_id("POST", response_id, "/cancel")


@blueprint.get("/v1/responses/<response_id>/input_items")
async def response_input_items(response_id: str) -> Response:
    return await _serve_by_id("GET", response_id, "/input_items")


async def _serve_by_id(
    method: str, response_id: str, suffix: str, *, stream: bool = False
) -> Response:
    call = await current_call()
    if not _RESPONSE_ID.fullmatch(response_id):
        message = f"invalid response id {response_id[:64]!r}: letters, digits, '_' and '-' only"
        raise BadRequest(message, param="response_id")
    path = f"/responses/{response_id}{suffix}"
    if request.query_string:
        path += "?" + request.query_string.decode("latin-1")
    reply = await by_id(call, method, path, stream=stream)
    return reply_response(await primed(masked(reply, call.app.secret)))


async def by_id(call: Call, method: str, backend_path: str, *, stream: bool) -> Reply:
    """A Responses API route by id, forwarded as it came (nothing in it names a model);
    the backend's model names in the answer are mapped back. What it returns was generated,
    and its tokens counted, by the ``POST`` that created the response: nothing is counted
    again, not even for a resumed stream, which replays that response's events."""
    mapper = call.app.mapper
    if stream:
        result = await open_stream(call, backend_path, None, method=method)
        rewrite = _model_rewriter({b: mapper.to_client(b) for _, b in mapper.items()})
        return _stream_reply(call, result, tr.ReplayedResponsesObserver(), rewrite)
    result = await call_raw(call, backend_path, None, method=method)
    content = result.response.content
    model = _json_member(content, "model")
    if isinstance(model, str):
        client_model = mapper.to_client(model)
        note_model(call.state, client_model)
        if client_model != model:
            content = _rewrite_model_json(content, client_model)
    return _whole_reply(result, content)


@blueprint.get("/v1/models")
async def models() -> Response:
    call = await current_call()
    listed = await call.app.catalog.models(call)  # type: ignore[attr-defined]
    return _json(tr.openai_model_list(listed, call.app.mapper))


@blueprint.get("/v1/models/<path:model_id>")
async def model(model_id: str) -> Response:
    call = await current_call()
    entry = await call.app.catalog.find(call, call.app.mapper.to_backend(model_id))  # type: ignore[attr-defined]
    if entry is None:
        raise NotFound(f"The model '{model_id}' does not exist", code="model_not_found")
    return _json(tr.openai_model_entry(model_id, entry))


def _json(payload: Any, status: int = 200) -> Response:
    return Response(dumps(payload), status=status, content_type=JSON)


def _whole_reply(result: UpstreamResult, content: bytes) -> Reply:
    response = result.response
    return Reply(response.status_code, content, response.headers.get("content-type", JSON))


def _json_member(content: bytes, name: str) -> Any:
    try:
        payload = loads(content)
    except ValueError:
        return None
    return payload.get(name) if isinstance(payload, dict) else None


def _stream_reply(
    call: Call,
    result: UpstreamResult,
    observer: StreamObserver,
    rewrite: Callable[[bytes], bytes] | None,
) -> Reply:
    metric = call.state.metric
    chunks = relay_openai(
        result.response,
        observer,
        settings=call.app.settings,
        metric=metric,
        metric_start=metric.start if metric else time.perf_counter(),
        collector=call.app.collector,
        rewrite_model=rewrite,
        end=(end := StreamEnd()),
    )
    return Reply(200, chunks, EVENT_STREAM, dict(STREAM_HEADERS), end=end)


def _model_rewriter(names: dict[str, str]) -> Callable[[bytes], bytes] | None:
    """Rewrites the backend's model names (keys) to the client's (values) in raw JSON
    lines; None if there is nothing to rewrite."""
    pairs = [
        (
            f'"model":{sep}{json.dumps(backend)}'.encode(),
            f'"model":{sep}{json.dumps(client)}'.encode(),
        )
        for backend, client in names.items()
        if backend != client
        # backends write compact JSON; both spellings cover the common serialisers
        for sep in ("", " ")
    ]
    if not pairs:
        return None

    def rewrite(data: bytes) -> bytes:
        for old, new in pairs:
            data = data.replace(old, new)
        return data

    return rewrite


def _rewrite_model_json(content: bytes, client_model: str) -> bytes:
    try:
        payload = loads(content)
    except ValueError:
        return content
    if isinstance(payload, dict) and "model" in payload:
        payload["model"] = client_model
        return dumps(payload)
    return content


def _note_usage(call: Call, content: bytes) -> None:
    # the body is relayed as bytes: decode (the tail of) it only when metrics want usage
    if call.state.metric is not None:
        note_usage_counts(call.state, top_level_member(content, "usage"))
