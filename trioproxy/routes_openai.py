"""The OpenAI API (``/v1/*``): pass-through with model mapping, streams relayed as they come.

``FAST_ROUTES`` (chat, completions, embeddings, responses) are served by ``fastpath`` for ``POST``;
the Quart routes for the same paths make other methods a 405 and serve in-process test
clients the same handlers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from quart import Blueprint, Response

from . import translate as tr
from .app import current_call, quart_route
from .errors import NotFound
from .exchange import JSON, Call, Handler, Reply
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
) -> Reply:
    app = call.app
    state = call.state
    body = validated(tr.validate_openai_body, json_object(call))
    client_model = body["model"]
    note_model(state, client_model)
    backend_model = app.mapper.to_backend(client_model)
    if backend_model == client_model:
        # nothing to rewrite: forward the client's bytes as they came
        payload = call.body
    else:
        payload = encode(tr.openai_passthrough_request(body, app.mapper))
    if body.get("stream") is True:
        result = await open_stream(call, backend_path, payload)
        return _stream_reply(call, result, client_model, backend_model, observer())
    result = await call_raw(call, backend_path, payload)
    content = result.response.content
    _note_usage(call, content)
    if backend_model != client_model:
        content = _rewrite_model_json(content, client_model)
    return Reply(
        result.response.status_code, content, result.response.headers.get("content-type", JSON)
    )


FAST_ROUTES: dict[str, Handler] = {
    "/v1/chat/completions": partial(forward, "/chat/completions"),
    "/v1/completions": partial(forward, "/completions"),
    "/v1/embeddings": partial(forward, "/embeddings"),
    # its events are not chat chunks: they get their own observer
    "/v1/responses": partial(forward, "/responses", observer=tr.ResponsesStreamObserver),
}
for _path, _handler in FAST_ROUTES.items():
    quart_route(blueprint, _path, _handler)


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


def _stream_reply(
    call: Call,
    result: UpstreamResult,
    client_model: str,
    backend_model: str,
    observer: StreamObserver,
) -> Reply:
    metric = call.state.metric
    rewrite: Callable[[bytes], bytes] | None = None
    if backend_model != client_model:
        rewrite = _model_rewriter(backend_model, client_model)
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


def _model_rewriter(backend_model: str, client_model: str) -> Callable[[bytes], bytes]:
    # Backends write compact JSON; both spellings cover the common serialisers.
    pairs = [
        (
            f'"model":{json.dumps(backend_model)}'.encode(),
            f'"model":{json.dumps(client_model)}'.encode(),
        ),
        (
            f'"model": {json.dumps(backend_model)}'.encode(),
            f'"model": {json.dumps(client_model)}'.encode(),
        ),
    ]

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
