"""The monitoring guide's tracking API, with trio semantics.

``async with track_request(endpoint, method) as metric:``
    counts the request in flight, yields a :class:`RequestMetrics`, and on exit sets the
    duration and records it exactly once (in a ``finally``).  A normal exit with no status
    set records 200.  An exception sets ``error`` and, if no status was set, 500 (504 for
    ``trio.TooSlowError`` / ``TimeoutError``), then propagates.  ``trio.Cancelled`` (e.g.
    the client went away) records 499 -- or 504 when the cancellation came from an
    expired deadline -- and is always re-raised, never swallowed.

``async with track_streaming_request(endpoint, method) as (metric, wrapper):``
    ``wrapper(stream)`` returns an async iterator that passes items through unchanged and
    measures first byte (from request start), chunks, bytes (``len`` of bytes-like items,
    UTF-8 length of ``str``), last byte and the first token: the first item, or the
    first for which ``wrapper(stream, first_token=predicate)`` is true.  The stream's
    single terminal outcome:
    normal end -> ``completed``; ``trio.Cancelled`` / ``GeneratorExit`` / ``aclose()``
    before the end -> ``cancelled`` (``timeout`` when the cancellation came from an
    expired deadline); ``trio.TooSlowError`` / ``TimeoutError`` -> ``timeout``; any
    other exception -> ``error``.  The record happens once, when the context exits.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from . import labels
from .request import RequestMetrics

if TYPE_CHECKING:
    from .collector import MetricsCollector


def _collector(collector: MetricsCollector | None) -> MetricsCollector:
    if collector is not None:
        return collector
    from . import get_metrics_collector

    return get_metrics_collector()


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled | GeneratorExit):
        return True
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split((trio.Cancelled, GeneratorExit))[1]
        return rest is None
    return False


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, trio.TooSlowError | TimeoutError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split((trio.TooSlowError, TimeoutError, trio.Cancelled))[1]
        return rest is None and exc.subgroup((trio.TooSlowError, TimeoutError)) is not None
    return False


def _from_deadline(exc: BaseException) -> bool:
    """Whether a cancellation came from an expired deadline (``move_on_after``,
    ``fail_after``, a server-side response timeout) rather than an explicit cancel such
    as a client disconnect.  trio records this on ``Cancelled.source``."""
    if isinstance(exc, trio.Cancelled):
        return getattr(exc, "source", None) == "deadline"
    if isinstance(exc, BaseExceptionGroup):
        cancels = exc.subgroup(trio.Cancelled)
        return cancels is not None and all(_from_deadline(e) for e in cancels.exceptions)
    return False


def _classify(exc: BaseException) -> str:
    if _is_timeout(exc):
        return "timeout"
    if _is_cancellation(exc):
        return "timeout" if _from_deadline(exc) else "cancelled"
    return "error"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def chunk_size(item: Any) -> int:
    if isinstance(item, bytes | bytearray):
        return len(item)
    if isinstance(item, memoryview):
        return item.nbytes
    if isinstance(item, str):
        return len(item.encode("utf-8"))
    return 0


@asynccontextmanager
async def track_request(
    endpoint: str,
    method: str,
    model: str = "",
    *,
    collector: MetricsCollector | None = None,
) -> AsyncGenerator[RequestMetrics, None]:
    c = _collector(collector)
    m = RequestMetrics(endpoint=endpoint, method=method, model=model)
    c.request_started()
    try:
        yield m
    except BaseException as exc:
        kind = _classify(exc)
        if kind == "cancelled":
            m.status_code = labels.STATUS_CLIENT_CLOSED
        elif kind == "timeout":
            if not m.status_code or _is_cancellation(exc):
                m.status_code = labels.STATUS_STREAM_TIMEOUT
            m.error = m.error or _describe(exc)
        else:
            if not m.status_code:
                m.status_code = 500
            m.error = m.error or _describe(exc)
        raise
    else:
        if not m.status_code:
            m.status_code = 200
    finally:
        m.finish()
        c.request_finished(m)


class TrackedStream:
    """Async iterator over ``stream`` that measures it into ``metric`` (see module doc)."""

    __slots__ = ("_done", "_first_token", "_it", "_source", "metric", "started")

    def __init__(
        self,
        stream: AsyncIterable[Any] | Iterable[Any],
        metric: RequestMetrics,
        first_token: Callable[[Any], bool] | None = None,
    ) -> None:
        self._source = stream
        self._it: Any = None
        self._done = False
        self._first_token = first_token
        self.metric = metric
        self.started = False

    def __aiter__(self) -> TrackedStream:
        return self

    def _finish(self, outcome: str) -> None:
        if not self._done:
            self._done = True
            if self.metric.stream_outcome is None:
                self.metric.stream_outcome = outcome

    @property
    def finished(self) -> bool:
        return self._done

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        self.started = True
        try:
            if self._it is None:
                src = self._source
                self._it = aiter(src) if hasattr(src, "__aiter__") else iter(src)  # type: ignore[arg-type]
            if hasattr(self._it, "__anext__"):
                item = await self._it.__anext__()
            else:
                await trio.lowlevel.checkpoint()
                try:
                    item = next(self._it)
                except StopIteration:
                    raise StopAsyncIteration from None
        except StopAsyncIteration:
            self._finish("completed")
            raise
        except BaseException as exc:
            self._finish(_classify(exc))
            raise
        now = time.perf_counter()
        m = self.metric
        m.add_chunk(chunk_size(item), now)
        # without a predicate the first item is the first token: a stream that sent
        # items is no stream "without a first token" (no_output)
        if m.first_token_time_ms is None and (self._first_token is None or self._first_token(item)):
            m.mark_first_token(now)
        return item

    async def aclose(self) -> None:
        """Stop early: the stream counts as cancelled; the source is closed too."""
        if not self._done:
            self._finish("cancelled")
        closer = getattr(self._it if self._it is not None else self._source, "aclose", None)
        if closer is not None:
            await closer()


@asynccontextmanager
async def track_streaming_request(
    endpoint: str,
    method: str,
    model: str = "",
    *,
    collector: MetricsCollector | None = None,
) -> AsyncGenerator[tuple[RequestMetrics, Callable[..., TrackedStream]], None]:
    c = _collector(collector)
    m = RequestMetrics(endpoint=endpoint, method=method, model=model, streaming=True)
    wrappers: list[TrackedStream] = []

    def wrapper(
        stream: AsyncIterable[Any] | Iterable[Any] | Callable[[], Any],
        *,
        first_token: Callable[[Any], bool] | None = None,
    ) -> TrackedStream:
        if (
            callable(stream)
            and not hasattr(stream, "__aiter__")
            and not hasattr(stream, "__iter__")
        ):
            # the monitoring guide's recipe passes the generator function itself
            # (``wrapper(response_stream)``): its stream is what calling it gives
            stream = stream()
        # an iterable by now: mypy narrows on hasattr, not on its negation
        ts = TrackedStream(stream, m, first_token)  # type: ignore[arg-type]
        wrappers.append(ts)
        return ts

    c.request_started()
    try:
        yield m, wrapper
    except BaseException as exc:
        if m.stream_outcome is None:
            m.stream_outcome = _classify(exc)
        if m.stream_outcome == "error" and not _is_cancellation(exc):
            m.error = m.error or _describe(exc)
        if not m.status_code and m.stream_outcome == "error" and m.first_byte_time_ms is None:
            m.status_code = 500  # failed before anything was sent
        raise
    else:
        if m.stream_outcome is None:
            # A wrapped stream left unfinished (the consumer stopped early) -> cancelled.
            abandoned = any(w.started and not w.finished for w in wrappers)
            m.stream_outcome = "cancelled" if abandoned else "completed"
        if not m.status_code:
            m.status_code = 200
    finally:
        m.stream_cancelled = m.stream_outcome == "cancelled"
        m.stream_timeout = m.stream_outcome == "timeout"
        m.finish()
        c.request_finished(m)
