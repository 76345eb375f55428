"""The OpenAI API (``/v1/*``): pass-through with model mapping, streams relayed as they come."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from quart import Blueprint, Response, request

from . import translate as tr
from .app import request_app, request_state
from .errors import NotFound
from .forward import call_raw, encode, note_model, open_stream, read_json_object, validated
from .relay import EVENT_STREAM, STREAM_HEADERS, dumps, relay_openai
from .upstream import UpstreamResult

blueprint = Blueprint("openai", __name__)


@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    return await _forward("/chat/completions")


@blueprint.post("/v1/completions")
async def completions() -> Response:
    return await _forward("/completions")


@blueprint.post("/v1/embeddings")
async def embeddings() -> Response:
    return await _forward("/embeddings")


@blueprint.get("/v1/models")
async def models() -> Response:
    listed = await request_app().catalog.models()
    return _json(tr.openai_model_list(listed, request_app().mapper))


@blueprint.get("/v1/models/<path:model_id>")
async def model(model_id: str) -> Response:
    mapper = request_app().mapper
    entry = await request_app().catalog.find(mapper.to_backend(model_id))
    if entry is None:
        raise NotFound(f"The model '{model_id}' does not exist", code="model_not_found")
    return _json(tr.openai_model_entry(model_id, entry))


def _json(payload: Any, status: int = 200) -> Response:
    return Response(dumps(payload), status=status, content_type="application/json")


async def _forward(path: str) -> Response:
    app = request_app()
    state = request_state()
    body = validated(tr.validate_openai_body, await read_json_object())
    client_model = body["model"]
    note_model(state, client_model)
    backend_model = app.mapper.to_backend(client_model)
    if backend_model == client_model:
        # nothing to rewrite: forward the client's bytes as they came
        payload = await request.get_data()
    else:
        payload = encode(tr.openai_passthrough_request(body, app.mapper))
    if body.get("stream") is True:
        result = await open_stream(path, payload)
        return _stream_response(result, client_model, backend_model)
    result = await call_raw(path, payload)
    content = result.response.content
    _note_usage(content)
    if backend_model != client_model:
        content = _rewrite_model_json(content, client_model)
    return Response(
        content,
        status=result.response.status_code,
        content_type=result.response.headers.get("content-type", "application/json"),
    )


def _stream_response(result: UpstreamResult, client_model: str, backend_model: str) -> Response:
    app = request_app()
    metric = request_state().metric
    rewrite: Callable[[bytes], bytes] | None = None
    if backend_model != client_model:
        rewrite = _model_rewriter(backend_model, client_model)
    body_iter = relay_openai(
        result.response,
        tr.OpenAIStreamObserver(),
        settings=app.settings,
        metric=metric,
        metric_start=metric.start if metric else time.perf_counter(),
        collector=app.collector,
        rewrite_model=rewrite,
    )
    response = Response(body_iter, content_type=EVENT_STREAM, headers=STREAM_HEADERS)
    response.timeout = None
    return response


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
        payload = json.loads(content)
    except ValueError:
        return content
    if isinstance(payload, dict) and "model" in payload:
        payload["model"] = client_model
        return dumps(payload)
    return content


def _note_usage(content: bytes) -> None:
    metric = request_state().metric
    if metric is None:
        return
    # usage sits at the end of the body; parse only when it is there
    if b'"usage"' not in content:
        return
    try:
        usage = json.loads(content).get("usage")
    except (ValueError, AttributeError):
        return
    if isinstance(usage, dict):
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        metric.input_tokens = prompt if isinstance(prompt, int) else None
        metric.output_tokens = completion if isinstance(completion, int) else None
