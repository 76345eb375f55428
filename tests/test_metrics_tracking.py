"""track_request / track_streaming_request under trio: outcomes recorded exactly once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
import trio
import trio.lowlevel

from trioproxy.metrics import MetricsCollector
from trioproxy.metrics.tracking import chunk_size, track_request, track_streaming_request


def new() -> MetricsCollector:
    return MetricsCollector(system_enabled=False)


def statuses(c: MetricsCollector) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, v in c.totals().requests.items():
        out[key[4]] = out.get(key[4], 0.0) + v
    return out


def outcomes(c: MetricsCollector) -> dict[str, float]:
    return {k: v for k, v in c.totals().stream_outcomes().items() if v}


async def source(
    n: int, item: bytes | str = b"abcd", delay: float = 0.0
) -> AsyncIterator[bytes | str]:
    for _ in range(n):
        if delay:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()
        yield item


# ----------------------------------------------------------------------------- track_request


async def test_track_request_records_duration_and_status() -> None:
    c = new()
    async with track_request("/api/chat", "POST", "m", collector=c) as m:
        assert c.totals().active == 1
        await trio.sleep(0.01)
        m.status_code = 201
    assert m.duration_ms >= 10.0
    assert statuses(c) == {"201": 1}
    assert c.totals().active == 0
    async with track_request("/api/tags", "GET", collector=c):
        pass
    assert statuses(c)["200"] == 1  # normal exit without a status: 200


async def test_track_request_exception_sets_error_and_500() -> None:
    c = new()
    with pytest.raises(KeyError):
        async with track_request("/api/chat", "POST", collector=c) as m:
            raise KeyError("x")
    assert m.status_code == 500 and m.error is not None and "KeyError" in m.error
    assert statuses(c) == {"500": 1}
    with pytest.raises(RuntimeError):
        async with track_request("/api/chat", "POST", collector=c) as m:
            m.status_code = 404
            raise RuntimeError("after the status")
    assert m.status_code == 404  # an explicit status is kept
    assert c.totals().active == 0


async def test_track_request_cancelled_is_499_once_and_propagates() -> None:
    c = new()
    reached = False
    with trio.CancelScope() as cs:
        async with track_request("/api/chat", "POST", collector=c) as m:
            m.status_code = 200
            cs.cancel()
            await trio.sleep(1)
            reached = True
    assert cs.cancelled_caught and not reached  # re-raised to its scope, never swallowed
    assert m.status_code == 499
    assert statuses(c) == {"499": 1}
    s = c.summary()
    assert (s["cancelled_requests"], s["success_rate"], s["error_rate"]) == (1, 0.0, 0.0)
    assert s["active_requests"] == 0


async def test_track_request_cancelled_inside_a_nursery_group() -> None:
    c = new()
    with trio.CancelScope() as cs:
        async with track_request("/api/chat", "POST", collector=c):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep, 10)
                nursery.start_soon(trio.sleep, 10)
                await trio.lowlevel.checkpoint()
                cs.cancel()
    assert statuses(c) == {"499": 1}


async def test_track_request_deadline_is_a_timeout() -> None:
    c = new()
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(0.01):
            async with track_request("/api/chat", "POST", collector=c):
                await trio.sleep(1)
    assert statuses(c) == {"504": 1}
    with pytest.raises(TimeoutError):
        async with track_request("/api/chat", "POST", collector=c):
            raise TimeoutError
    assert statuses(c) == {"504": 2}


# ----------------------------------------------------------------------------- streams


async def test_stream_completed_measures_chunks_and_bytes() -> None:
    c = new()
    async with track_streaming_request("/api/chat", "POST", "m", collector=c) as (m, wrap):
        m.status_code = 200
        got = [x async for x in wrap(source(3, delay=0.005))]
    assert got == [b"abcd"] * 3
    assert (m.total_chunks, m.stream_bytes, m.stream_outcome) == (3, 12, "completed")
    assert m.first_byte_time_ms is not None and m.first_byte_time_ms >= 5.0  # from request start
    assert m.last_byte_time_ms is not None and m.last_byte_time_ms > m.first_byte_time_ms
    assert m.duration_ms >= m.last_byte_time_ms
    assert outcomes(c) == {"completed": 1}
    s = c.summary()["streaming"]
    assert (s["total_chunks"], s["total_bytes"]) == (3, 12)
    assert s["avg_throughput_bytes_per_second"] > 0


async def test_without_a_predicate_the_first_item_is_the_first_token() -> None:
    """The guide's wrapper(stream) has no first_token predicate: a completed stream that
    sent chunks has its first token at its first item, and only an empty one counts as
    a stream without a first token (no_output)."""
    c = new()
    async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
        async for _ in wrap(source(3)):
            pass
    assert m.first_token_time_ms == m.first_byte_time_ms
    async with track_streaming_request("/api/chat", "POST", collector=c) as (_, wrap):
        async for _ in wrap(source(0)):
            pass
    s = c.summary()["streaming"]
    assert s["streams_without_first_token"] == {
        "no_output": 1,
        "cancelled": 0,
        "timeout": 0,
        "error": 0,
    }
    assert s["avg_first_token_time_ms"] > 0


async def test_the_guides_recipe_may_pass_the_generator_function_itself() -> None:
    """The monitoring guide writes ``wrapper(response_stream)`` with the function, not
    its call: ``TypeError: 'function' object is not iterable`` before."""
    c = new()

    async def response_stream() -> AsyncIterator[bytes]:
        for _ in range(2):
            yield b"ab"

    async with track_streaming_request("/api/stream", "POST", collector=c) as (m, wrapper):
        m.status_code = 200
        stream = wrapper(response_stream)
        got = [chunk async for chunk in stream]
    assert got == [b"ab", b"ab"] and (m.total_chunks, m.stream_outcome) == (2, "completed")


async def test_str_chunks_count_utf8_bytes_and_first_token() -> None:
    c = new()
    async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
        items = ["", "é", "日本"]

        async def gen() -> AsyncIterator[str]:
            for it in items:
                yield it

        async for _ in wrap(gen(), first_token=bool):
            pass
    assert m.stream_bytes == 0 + 2 + 6
    assert m.first_token_time_ms is not None and m.first_token_time_ms >= m.first_byte_time_ms
    assert (
        chunk_size(memoryview(b"xyz")) == 3 and chunk_size(bytearray(2)) == 2 and chunk_size(7) == 0
    )
    async with track_streaming_request("/api/chat", "POST", collector=c) as (m2, wrap):
        async for _ in wrap([b"a", b"bc"]):  # a plain iterable works too
            pass
    assert (m2.total_chunks, m2.stream_bytes) == (2, 3)


async def test_stream_cancelled_by_client_is_counted_once() -> None:
    c = new()
    with trio.CancelScope() as cs:
        async with track_streaming_request("/api/chat", "POST", "m", collector=c) as (m, wrap):
            m.status_code = 200
            async for i, _ in _enumerate(wrap(source(100, delay=0.001))):
                if i == 2:
                    cs.cancel()
    assert cs.cancelled_caught
    assert m.stream_outcome == "cancelled" and m.stream_cancelled
    assert m.total_chunks == 3
    assert outcomes(c) == {"cancelled": 1}
    assert statuses(c) == {"499": 1}
    s = c.summary()
    assert s["streaming"]["cancelled_streams"] == 1 and s["cancelled_requests"] == 1
    assert s["total_requests"] == 1 and s["error_rate"] == 0.0


async def _enumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


async def test_stream_cancelled_while_waiting_for_the_first_chunk() -> None:
    c = new()
    with trio.move_on_after(0.02) as outer:  # outer deadline, the context is inside it
        async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
            async for _ in wrap(source(1, delay=5)):
                pass
    assert outer.cancelled_caught
    assert m.stream_outcome == "timeout"  # a deadline, not the client
    assert statuses(c) == {"504": 1}
    with trio.CancelScope() as cs:
        async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
            cs.cancel()
            async for _ in wrap(source(1, delay=5)):
                pass
    assert m.stream_outcome == "cancelled" and m.first_byte_time_ms is None
    assert outcomes(c) == {"timeout": 1, "cancelled": 1}


async def test_stream_timeout_via_fail_after_inside() -> None:
    c = new()
    with pytest.raises(trio.TooSlowError):
        async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
            m.status_code = 200
            with trio.fail_after(0.02):
                async for _ in wrap(source(100, delay=0.005)):
                    pass
    assert m.stream_outcome == "timeout" and m.stream_timeout
    assert m.total_chunks >= 1
    assert outcomes(c) == {"timeout": 1}
    assert statuses(c) == {"504": 1}
    with pytest.raises(TimeoutError):
        async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):

            async def bad() -> AsyncIterator[bytes]:
                yield b"x"
                raise TimeoutError

            async for _ in wrap(bad()):
                pass
    assert outcomes(c) == {"timeout": 2}


async def test_stream_upstream_error_is_502() -> None:
    c = new()

    async def broken() -> AsyncIterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("upstream died")

    with pytest.raises(ConnectionResetError):
        async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
            m.status_code = 200
            async for _ in wrap(broken()):
                pass
    assert m.stream_outcome == "error" and "upstream died" in (m.error or "")
    assert outcomes(c) == {"error": 1}
    assert statuses(c) == {"502": 1}
    assert c.summary()["failed_requests"] == 1


async def test_stream_aclose_and_abandon_are_cancelled() -> None:
    c = new()
    async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
        m.status_code = 200
        it = wrap(source(10))
        await it.__anext__()
        await it.aclose()
        with pytest.raises(StopAsyncIteration):
            await it.__anext__()
    assert m.stream_outcome == "cancelled"
    async with aclosing(source(10)) as src:
        async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
            m.status_code = 200
            async for _ in wrap(src):
                break  # the consumer stopped early
    assert m.stream_outcome == "cancelled"
    async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
        m.status_code = 200  # no wrapped stream at all: completed
    assert m.stream_outcome == "completed"
    assert outcomes(c) == {"cancelled": 2, "completed": 1}
    assert c.totals().active == 0


async def test_generator_exit_in_consumer_is_cancelled_once() -> None:
    c = new()

    src = source(10)

    async def body() -> AsyncIterator[bytes]:
        async with track_streaming_request("/api/chat", "POST", collector=c) as (m, wrap):
            m.status_code = 200
            async for chunk in wrap(src):
                yield chunk

    gen = body()
    assert await gen.__anext__() == b"abcd"
    await gen.aclose()  # GeneratorExit at the consumer's yield
    await src.aclose()
    assert outcomes(c) == {"cancelled": 1}
    assert statuses(c) == {"499": 1}
