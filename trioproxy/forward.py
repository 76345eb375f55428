"""Forwarding helpers shared by the Ollama and OpenAI routes: read the client's body,
call the backend, open a stream whose closing is guaranteed."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from quart import request

from .app import ProxyApp, RequestState, request_app, request_state
from .errors import BadRequest, UpstreamUnavailable
from .translate import RequestValidationError
from .upstream import UpstreamResult


async def read_json_object() -> dict[str, Any]:
    """The request body as a JSON object; a client mistake is a 400, never a 500."""
    raw = await request.get_data()
    if not raw:
        raise BadRequest("missing request body", param=None)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON in request body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    state = request_state()
    if state.metric is not None and not state.metric.request_size:
        state.metric.request_size = len(raw)
    return body


def validated(validator: Any, body: Any) -> dict[str, Any]:
    try:
        return validator(body)
    except RequestValidationError as exc:
        raise BadRequest(str(exc), param=exc.field) from None


def note_model(state: RequestState, client_model: str) -> None:
    if state.metric is not None:
        state.metric.model = client_model


async def call_json(
    path: str, payload: dict[str, Any] | bytes, *, method: str = "POST"
) -> tuple[Any, UpstreamResult]:
    """Non-streaming backend call; returns the decoded JSON body."""
    app = request_app()
    state = request_state()
    body = payload if isinstance(payload, bytes | None) else encode(payload)
    result = await pool(app).request(method, path, body=body, request_id=state.request_id)
    _note_upstream(state, result, complete=True)
    try:
        return result.response.json(), result
    except ValueError:
        raise UpstreamUnavailable("the backend returned a body that is not JSON") from None


async def call_raw(path: str, body: bytes | None, *, method: str = "POST") -> UpstreamResult:
    app = request_app()
    state = request_state()
    result = await pool(app).request(method, path, body=body, request_id=state.request_id)
    _note_upstream(state, result, complete=True)
    return result


async def open_stream(path: str, payload: dict[str, Any] | bytes) -> UpstreamResult:
    """Open a streamed backend response and register its closing with the request.

    The close runs from the connection adapter's ``finally`` whether or not the body is
    ever iterated, so a client that leaves during the response start cannot leak the
    backend connection (stack notes P9)."""
    app = request_app()
    state = request_state()
    body = payload if isinstance(payload, bytes) else encode(payload)
    result = await pool(app).request(
        "POST",
        path,
        body=body,
        request_id=state.request_id,
        stream=True,
        header_timeout=app.settings.stream_first_token_timeout,
    )
    state.cleanups.append(result.response.aclose)
    _note_upstream(state, result, complete=False)
    if state.metric is not None:
        state.metric.streaming = True
    return result


def _note_upstream(state: RequestState, result: UpstreamResult, *, complete: bool) -> None:
    request_app().readiness.mark_reachable()  # type: ignore[attr-defined]
    metric = state.metric
    if metric is None:
        return
    metric.upstream_first_byte_ms = (result.headers_at - metric.start) * 1000.0
    if complete:
        metric.upstream_ms = (time.perf_counter() - result.started) * 1000.0


def pool(app: ProxyApp) -> Any:
    if app.pool is None:
        raise UpstreamUnavailable("the backend pool is not running")
    return app.pool


def encode(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def response_content_type(response: httpx.Response, default: str = "application/json") -> str:
    return response.headers.get("content-type", default)
