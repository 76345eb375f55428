"""Thin trio adapters between the backend's SSE stream and the client.

The protocol work (SSE parsing, OpenAI -> Ollama translation, tool-call accumulation,
usage) is done by the sans-I/O classes in ``sse`` and ``translate``; this module only
moves bytes, enforces the first-token and idle-gap deadlines, and fills in the stream
measurements. Errors after the first byte end the stream with one in-band error line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import httpx
import trio

from .config import Settings
from .errors import scrub
from .jsonutil import compact_json
from .metrics import MetricsCollector, RequestMetrics
from .sse import SSE_DONE, SSEParser, SSEProtocolError, openai_error_event

log = logging.getLogger("trioproxy.relay")

NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamObserver(Protocol):
    first_token_ns: int | None
    content_chunks: int
    prompt_tokens: int | None
    completion_tokens: int | None

    def feed(self, chunk: dict[str, Any], now_ns: int) -> Any: ...


dumps = compact_json


class _Deadlines:
    """First token must arrive within ``first_token`` s of the request start; after that,
    no gap between backend reads may exceed ``idle`` s."""

    def __init__(self, settings: Settings, metric_start: float) -> None:
        now = trio.current_time()
        already = time.perf_counter() - metric_start
        self.first_token_at = now + settings.stream_first_token_timeout - already
        self.idle = settings.stream_idle_timeout
        self.token_seen = False

    def next(self) -> float:
        idle_at = trio.current_time() + self.idle
        return idle_at if self.token_seen else min(idle_at, self.first_token_at)

    def describe(self) -> str:
        if self.token_seen:
            return f"the backend sent nothing for {self.idle:g} s (STREAM_IDLE_TIMEOUT)"
        return "the backend produced no token in time (STREAM_FIRST_TOKEN_TIMEOUT)"


class StreamTimeout(Exception):
    pass


# After the backend's last event, how long to wait for the end of its response. Reading to
# the end lets httpx hand the connection back to its pool (a half-read response costs a
# fresh connection next time) and lets every generator in httpx's read chain finish.
DRAIN_SECONDS = 0.25


async def _drain(reads: AsyncIterator[bytes]) -> None:
    with trio.move_on_after(DRAIN_SECONDS):
        async for _ in reads:
            pass


async def _reads(response: httpx.Response, deadlines: _Deadlines) -> AsyncIterator[bytes]:
    reader = response.aiter_bytes()
    while True:
        with trio.move_on_at(deadlines.next()) as scope:
            chunk = await anext(reader, None)
        if scope.cancelled_caught:
            raise StreamTimeout(deadlines.describe())
        if chunk is None:
            return
        yield chunk


def _record_tokens(metric: RequestMetrics | None, observer: StreamObserver) -> None:
    if metric is None:
        return
    if observer.first_token_ns is not None and metric.first_token_time_ms is None:
        metric.first_token_time_ms = (observer.first_token_ns / 1e9 - metric.start) * 1000.0
    metric.input_tokens = observer.prompt_tokens
    if observer.completion_tokens is not None:
        metric.output_tokens = observer.completion_tokens
    else:
        metric.output_tokens = observer.content_chunks
        metric.tokens_counted = True


def _finish_upstream(metric: RequestMetrics | None) -> None:
    if metric is not None:
        metric.upstream_ms = metric.elapsed_ms()


async def relay_ollama(
    response: httpx.Response,
    translator: Any,
    *,
    settings: Settings,
    metric: RequestMetrics | None,
    metric_start: float,
    collector: MetricsCollector,
) -> AsyncIterator[bytes]:
    """Backend SSE -> Ollama NDJSON, one output chunk per backend read."""
    parser = SSEParser()
    deadlines = _Deadlines(settings, metric_start)
    error: str | None = None
    reads = _reads(response, deadlines)
    done = False
    try:
        async for data in reads:
            lines: list[bytes] = []
            done = False
            for event in parser.feed(data):
                if event.data == SSE_DONE:
                    done = True
                    break
                chunk = _parse_chunk(event.data)
                if chunk is None:
                    continue
                if "error" in chunk and not chunk.get("choices"):
                    error = scrub(_in_band_error(chunk), settings.api_key)
                    break
                for line in translator.feed(chunk, time.perf_counter_ns()):
                    lines.append(dumps(line))
                if translator.first_token_ns is not None:
                    deadlines.token_seen = True
            if lines:
                yield b"\n".join(lines) + b"\n"
            if done or error:
                break
    except StreamTimeout as exc:
        error = str(exc)
        _set_outcome(metric, "timeout")
        collector.upstream_error("timeout")
    except (httpx.HTTPError, SSEProtocolError) as exc:
        error = f"the backend connection broke mid-stream: {type(exc).__name__}"
        collector.upstream_error("protocol")
    finally:
        _finish_upstream(metric)
        _record_tokens(metric, translator)
    if error is not None:
        _set_outcome(metric, "error")
        log.warning("stream ended early: %s", error)
        yield dumps({"error": error}) + b"\n"
    else:
        yield dumps(translator.finish(time.perf_counter_ns())) + b"\n"
    if done or error is not None:
        await _drain(reads)


async def relay_openai(
    response: httpx.Response,
    observer: StreamObserver,
    *,
    settings: Settings,
    metric: RequestMetrics | None,
    metric_start: float,
    collector: MetricsCollector,
    rewrite_model: Callable[[bytes], bytes] | None = None,
) -> AsyncIterator[bytes]:
    """Backend SSE -> client SSE, relayed read by read; events are only observed."""
    parser = SSEParser()
    deadlines = _Deadlines(settings, metric_start)
    error: str | None = None
    # a backend that quotes our credentials in its output must not hand them to the client
    secret = settings.api_key.encode() if settings.api_key and len(settings.api_key) >= 4 else None
    try:
        async for data in _reads(response, deadlines):
            if secret is not None and secret in data:
                data = data.replace(secret, b"***")
            for event in parser.feed(data):
                if event.data == SSE_DONE:
                    continue
                chunk = _parse_chunk(event.data)
                if chunk is not None:
                    observer.feed(chunk, time.perf_counter_ns())
            if observer.first_token_ns is not None:
                deadlines.token_seen = True
            yield rewrite_model(data) if rewrite_model else data
    except StreamTimeout as exc:
        error = str(exc)
        _set_outcome(metric, "timeout")
        collector.upstream_error("timeout")
    except (httpx.HTTPError, SSEProtocolError) as exc:
        error = f"the backend connection broke mid-stream: {type(exc).__name__}"
        collector.upstream_error("protocol")
    finally:
        _finish_upstream(metric)
        _record_tokens(metric, observer)
    if error is not None:
        _set_outcome(metric, "error")
        log.warning("stream ended early: %s", error)
        code = "stream_timeout" if metric and metric.stream_outcome == "timeout" else None
        yield openai_error_event(error, "api_error", code)


def _set_outcome(metric: RequestMetrics | None, outcome: str) -> None:
    if metric is not None and metric.stream_outcome is None:
        metric.stream_outcome = outcome


def _parse_chunk(data: str) -> dict[str, Any] | None:
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


def _in_band_error(chunk: dict[str, Any]) -> str:
    error = chunk.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
