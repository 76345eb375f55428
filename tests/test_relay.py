"""The relay's stream deadlines against a real socket: the idle limit is enforced by the body's
read timeout (kept by the backend stream, ``trioproxy.netstream``), the first-token limit by
that read timeout held at its deadline (a cancel scope of ours where the stream cannot hold
it), and neither cuts the wait for the response headers or a healthy stream."""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from trioproxy import netstream, relay
from trioproxy.config import Settings
from trioproxy.errors import UpstreamTimeout
from trioproxy.metrics import MetricsCollector, RequestMetrics
from trioproxy.sse import SSEParser
from trioproxy.translate import (
    OllamaStreamTranslator,
    OpenAIStreamObserver,
    ReplayedResponsesObserver,
    ResponsesStreamObserver,
)
from trioproxy.upstream import UpstreamPool

# (seconds to wait, bytes to send); None as the bytes: stall until the client leaves.
Script = list[tuple[float, bytes | None]]

HEAD = (
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":'
)
TAIL = b',"logprobs":null,"finish_reason":null}]}'


def event(delta: bytes) -> bytes:
    return b"data: " + HEAD + delta + TAIL + b"\n\n"


ROLE = event(b'{"role":"assistant","content":""}')
DONE = b"data: [DONE]\n\n"


def token(text: str) -> bytes:
    return event(b'{"content":' + json.dumps(text).encode() + b"}")


async def _serve(
    script: Script, header_delay: float, gzip: bool, stream: trio.SocketStream
) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(65536)
    await trio.sleep(header_delay)
    encoding = b"Content-Encoding: gzip\r\n" if gzip else b""
    await stream.send_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n" + encoding + b"\r\n"
    )
    compressor = zlib.compressobj(wbits=31)  # gzip framing
    for delay, data in script:
        await trio.sleep(delay)
        if data is None:
            await trio.sleep_forever()
        if gzip:
            data = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        await stream.send_all(b"%x\r\n%s\r\n" % (len(data), data))
    if gzip:
        rest = compressor.flush()
        await stream.send_all(b"%x\r\n%s\r\n" % (len(rest), rest))
    await stream.send_all(b"0\r\n\r\n")


@asynccontextmanager
async def backend(
    script: Script, header_delay: float = 0.0, gzip: bool = False
) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(
                trio.serve_tcp,
                functools.partial(_serve, script, header_delay, gzip),
                0,
                host="127.0.0.1",
            )
        )
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1"
        nursery.cancel_scope.cancel()


MakeRelay = Callable[[httpx.Response, Settings, MetricsCollector], AsyncIterator[bytes]]


async def run_relay(
    script: Script,
    make: MakeRelay,
    *,
    header_delay: float = 0.0,
    gzip: bool = False,
    deadlines: bool = False,
    **timeouts: float,
) -> tuple[bytes, float, httpx.Request]:
    """Everything the relay sent, how long it took, and the backend request. With
    ``deadlines``, the pool's read deadlines are kept by their task, as in the app."""
    async with backend(script, header_delay, gzip) as url:
        settings = Settings(upstream_url=url, max_retries=0, **timeouts)  # type: ignore[arg-type]
        pool = UpstreamPool(settings)
        if not deadlines:
            return await _relayed(pool, make, settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.read_deadlines.run)
            try:
                return await _relayed(pool, make, settings)
            finally:
                nursery.cancel_scope.cancel()
    raise AssertionError("unreachable")


async def _relayed(
    pool: UpstreamPool, make: MakeRelay, settings: Settings
) -> tuple[bytes, float, httpx.Request]:
    collector = MetricsCollector(enabled=False, system_enabled=False)
    started = time.monotonic()
    try:
        result = await pool.request(
            "POST",
            "/chat/completions",
            body=b"{}",
            stream=True,
            header_timeout=settings.stream_first_token_timeout,
        )
        with trio.fail_after(10):
            out = b"".join([c async for c in make(result.response, settings, collector)])
        await result.response.aclose()
    finally:
        await pool.aclose()
    return out, time.monotonic() - started, result.response.request


def openai(
    response: httpx.Response,
    settings: Settings,
    collector: MetricsCollector,
    rewrite_model: Callable[[bytes], bytes] | None = None,
) -> AsyncIterator[bytes]:
    return relay.relay_openai(
        response,
        OpenAIStreamObserver(),
        settings=settings,
        metric=None,
        sent_at=time.perf_counter(),
        collector=collector,
        rewrite_model=rewrite_model,
    )


def ollama(
    response: httpx.Response, settings: Settings, collector: MetricsCollector
) -> AsyncIterator[bytes]:
    translator = OllamaStreamTranslator(
        "chat", "m", start_ns=time.perf_counter_ns(), created_at=lambda: "T"
    )
    return relay.relay_ollama(
        response,
        translator,
        settings=settings,
        metric=None,
        sent_at=time.perf_counter(),
        collector=collector,
    )


def last_error(out: bytes) -> str:
    last = out.strip().rsplit(b"\n", 1)[-1].removeprefix(b"data: ")
    error = json.loads(last)["error"]
    return error["message"] if isinstance(error, dict) else error


async def test_idle_gap_after_the_first_token_is_cut_by_the_read_timeout() -> None:
    script: Script = [(0, ROLE), (0, token("a")), (0, token("b")), (0, None)]
    for make in (openai, ollama):
        out, elapsed, request = await run_relay(
            script, make, stream_idle_timeout=0.3, stream_first_token_timeout=30
        )
        assert "STREAM_IDLE_TIMEOUT" in last_error(out)
        assert 0.25 < elapsed < 3
        # the idle limit became the body's read timeout once the headers were in
        assert request.extensions["timeout"]["read"] == 0.3
    first = b'{"model":"m","created_at":"T","message":{"role":"assistant","content":"a"}'
    assert out.startswith(first)


async def test_first_token_deadline_still_applies_after_a_role_chunk() -> None:
    script: Script = [(0, ROLE), (0, None)]
    out, elapsed, _ = await run_relay(
        script, openai, stream_idle_timeout=30, stream_first_token_timeout=0.3
    )
    # the role chunk was relayed already: the failure ends the stream in band
    assert "STREAM_FIRST_TOKEN_TIMEOUT" in last_error(out)
    assert 0.25 < elapsed < 3
    # the Ollama stream had no line to send yet: the failure is raised, for a real status
    failures: list[UpstreamTimeout] = []
    try:
        await run_relay(script, ollama, stream_idle_timeout=30, stream_first_token_timeout=0.3)
    except* UpstreamTimeout as group:
        failures = list(group.exceptions)  # type: ignore[arg-type]
    assert len(failures) == 1 and failures[0].status == 504
    assert "STREAM_FIRST_TOKEN_TIMEOUT" in failures[0].message


async def test_before_the_first_token_only_its_own_deadline_applies() -> None:
    """A reasoning model may think in silence after its first event for longer than the
    idle limit: until the first token, STREAM_FIRST_TOKEN_TIMEOUT alone bounds the wait."""
    script: Script = [(0, ROLE), (0.6, token("a")), (0.05, token("b")), (0, DONE)]
    for make in (openai, ollama):
        out, elapsed, _ = await run_relay(
            script, make, stream_idle_timeout=0.3, stream_first_token_timeout=5
        )
        assert b"error" not in out and elapsed > 0.6
    silent: Script = [(0, ROLE), (0, None)]
    out, elapsed, _ = await run_relay(
        silent, openai, stream_idle_timeout=0.3, stream_first_token_timeout=1.0
    )
    assert "STREAM_FIRST_TOKEN_TIMEOUT" in last_error(out)
    assert 0.9 < elapsed < 3  # the first-token deadline, not the 0.3 s idle limit


@pytest.mark.parametrize("deadlines", [False, True], ids=["reads-time-themselves", "task"])
async def test_the_first_token_deadline_is_the_held_read_timeout_s(deadlines: bool) -> None:
    """Before the first token a read times out at the first-token deadline through the
    connection's held read timeout (kept by the pool's deadline task in the app), not a
    cancel scope of the relay's; a role chunk does not move it, a token ends it."""
    silent: Script = [(0, ROLE), (0, None)]
    out, elapsed, _ = await run_relay(
        silent, openai, stream_idle_timeout=0.3, stream_first_token_timeout=1.0, deadlines=deadlines
    )
    assert "STREAM_FIRST_TOKEN_TIMEOUT" in last_error(out)
    assert 0.9 < elapsed < 3  # the first-token deadline, not the 0.3 s idle limit
    thinking: Script = [(0, ROLE), (0.6, token("a")), (0, None)]
    out, elapsed, _ = await run_relay(
        thinking, openai, stream_idle_timeout=0.3, stream_first_token_timeout=5, deadlines=deadlines
    )
    assert "STREAM_IDLE_TIMEOUT" in last_error(out)  # the idle limit again after a token
    assert 0.85 < elapsed < 3


def _scopes_entered_by_the_relay(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Line numbers in relay.py where a cancel scope was entered."""
    import sys

    lines: list[int] = []
    original = trio.CancelScope.__enter__

    def enter(self: trio.CancelScope) -> trio.CancelScope:
        caller = sys._getframe(1)
        if caller.f_code.co_filename == relay.__file__:
            lines.append(caller.f_lineno)
        return original(self)

    monkeypatch.setattr(trio.CancelScope, "__enter__", enter)
    return lines


async def test_a_stream_s_deadlines_take_no_cancel_scope_of_the_relay_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the pool's deadline task (the app's way), neither the reads before the first
    token nor the drain after [DONE] enter a cancel scope (about 50 000 machine
    instructions each, three per stream before)."""
    scopes = _scopes_entered_by_the_relay(monkeypatch)
    script: Script = [(0, ROLE), (0, token("a")), (0, token("b")), (0, event(b"{}")), (0, DONE)]
    for make in (openai, ollama):
        out, _, _ = await run_relay(
            script, make, stream_idle_timeout=5, stream_first_token_timeout=5, deadlines=True
        )
        assert b"error" not in out
    assert scopes == []


@pytest.mark.parametrize("deadlines", [False, True], ids=["reads-time-themselves", "task"])
async def test_the_drain_after_the_last_event_is_brief(deadlines: bool) -> None:
    """A backend that never ends its body after [DONE]: the drain gives up after
    DRAIN_SECONDS (not the idle limit), and the stream is complete."""
    script: Script = [(0, ROLE), (0, token("a")), (0, DONE), (0, None)]
    for make in (openai, ollama):
        out, elapsed, _ = await run_relay(
            script, make, stream_idle_timeout=5, stream_first_token_timeout=5, deadlines=deadlines
        )
        assert b"error" not in out
        assert relay.DRAIN_SECONDS <= elapsed < 2


async def test_the_idle_limit_applies_again_from_the_first_token_on() -> None:
    script: Script = [(0, ROLE), (0.5, token("a")), (0, None)]
    out, elapsed, _ = await run_relay(
        script, openai, stream_idle_timeout=0.3, stream_first_token_timeout=5
    )
    assert "STREAM_IDLE_TIMEOUT" in last_error(out)
    assert 0.75 < elapsed < 3  # 0.5 s to the first token, then the 0.3 s idle limit


async def test_a_held_read_timeout_goes_back_with_the_connection() -> None:
    """The connection returns to the pool: a stream that ended before its first token
    must not leave it without a read timeout for the next request."""
    held: list[Any] = []

    def keep(response: httpx.Response, settings: Settings, collector: MetricsCollector) -> Any:
        held.append(response.extensions["network_stream"])
        return openai(response, settings, collector)

    out, _, _ = await run_relay(
        [(0, ROLE), (0, None)], keep, stream_idle_timeout=0.3, stream_first_token_timeout=0.5
    )
    assert "STREAM_FIRST_TOKEN_TIMEOUT" in last_error(out)
    assert held and held[0]._held is False


async def test_slow_headers_are_bounded_by_the_first_token_timeout_only() -> None:
    script: Script = [(0, ROLE), (0, token("a")), (0.1, token("b")), (0.1, DONE)]
    out, _, _ = await run_relay(
        script,
        openai,
        header_delay=0.6,
        stream_idle_timeout=0.3,
        stream_first_token_timeout=30,
    )
    assert out == b"".join(data for _, data in script if data is not None)


async def test_gaps_under_the_idle_limit_complete_byte_for_byte() -> None:
    script: Script = [(0.1, ROLE)] + [(0.15, token(t)) for t in "abcd"] + [(0.1, DONE)]
    out, elapsed, _ = await run_relay(
        script, openai, stream_idle_timeout=0.4, stream_first_token_timeout=0.5
    )
    assert out == b"".join(data for _, data in script if data is not None)
    assert elapsed > 0.6


async def test_a_compressed_stream_is_relayed_decoded() -> None:
    # we ask backends for gzip; an unencoded body skips the decoder, an encoded one must not
    script: Script = [(0, ROLE)] + [(0.01, token(t)) for t in "abc"] + [(0, DONE)]
    out, _, _ = await run_relay(script, openai, gzip=True)
    assert out == b"".join(data for _, data in script if data is not None)
    lines, _, _ = await run_relay(script, ollama, gzip=True)
    contents = [json.loads(line)["message"]["content"] for line in lines.splitlines()]
    assert contents[:-1] == ["a", "b", "c"]  # the last line is the final summary


def _reader(response: httpx.Response, **timeouts: float) -> relay._Reader:
    return relay._Reader(response, Settings(**timeouts), time.perf_counter())  # type: ignore[arg-type]


def _stream_response(read: float | None) -> httpx.Response:
    request = httpx.Request(
        "POST", "http://b.test/", extensions={"timeout": {"connect": 1.0, "read": read}}
    )
    return httpx.Response(200, request=request, content=b"")


async def test_no_scope_of_ours_once_the_read_timeout_covers_the_deadline() -> None:
    reader = _reader(_stream_response(None), stream_idle_timeout=10, stream_first_token_timeout=300)
    assert reader._deadline() == math.inf  # the first-token deadline is the later one
    reader.token_seen = True
    assert reader._deadline() == math.inf
    near = _reader(_stream_response(None), stream_idle_timeout=10, stream_first_token_timeout=1)
    assert near._deadline() == near.first_token_at


async def test_the_timeouts_are_replaced_not_changed_in_place() -> None:
    shared: dict[str, float | None] = {"connect": 1.0, "read": None}
    request = httpx.Request("POST", "http://b.test/", extensions={"timeout": shared})
    _reader(httpx.Response(200, request=request, content=b""), stream_idle_timeout=7)
    assert request.extensions["timeout"] == {"connect": 1.0, "read": 7}
    assert shared["read"] is None


async def test_another_read_timeout_keeps_our_own_deadlines() -> None:
    response = _stream_response(5.0)
    reader = _reader(response, stream_idle_timeout=10, stream_first_token_timeout=300)
    assert response.request.extensions["timeout"]["read"] == 5.0
    reader.token_seen = True
    assert reader._deadline() < math.inf
    bare = _reader(httpx.Response(200, content=b""), stream_idle_timeout=10)
    bare.token_seen = True
    assert bare._deadline() < math.inf


async def _collect(gen: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in gen]


async def test_a_read_timeout_that_is_not_ours_is_a_broken_connection() -> None:
    class Stalling(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield token("a")
            raise httpx.ReadTimeout("read timed out")

    response = httpx.Response(200, stream=Stalling(), request=_stream_response(5.0).request)
    collector = MetricsCollector(enabled=False, system_enabled=False)
    out = await _collect(openai(response, Settings(stream_idle_timeout=10), collector))
    assert "mid-stream: ReadTimeout" in last_error(b"".join(out))


async def test_a_mapped_model_name_split_between_reads_is_rewritten_whole() -> None:
    """The backend's model name ("m") is the client's "llama3" in every event, also when a
    read ends in the middle of it (each script step is one read, 50 ms apart)."""
    from trioproxy.routes_openai import _model_rewriter

    whole = token("a")
    at = whole.index(b'"model":"m"') + len(b'"model":"')
    script: Script = [(0, ROLE), (0.05, whole[:at]), (0.05, whole[at:] + token("b")), (0.05, DONE)]

    mapped = functools.partial(openai, rewrite_model=_model_rewriter({"m": "llama3"}))
    out, _, _ = await run_relay(script, mapped, stream_first_token_timeout=30)
    expected = b"".join(data for _, data in script if data is not None)
    assert out == expected.replace(b'"model":"m"', b'"model":"llama3"')
    assert out.count(b'"model":"llama3"') == 3


# ---- how a stream ends: its last event, not the backend closing the body -----------------


def responses_event(kind: str, **fields: object) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": 0, **fields}).encode()
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


CREATED = responses_event("response.created", response={"status": "in_progress"})
COMPLETED = responses_event(
    "response.completed",
    response={"status": "completed", "usage": {"input_tokens": 2, "output_tokens": 1}},
)


def text_delta(text: str) -> bytes:
    return responses_event("response.output_text.delta", delta=text, item_id="m")


def observed(
    observer: Callable[[], object],
    metric: RequestMetrics | None = None,
    end: relay.StreamEnd | None = None,
) -> MakeRelay:
    def make(
        response: httpx.Response, settings: Settings, collector: MetricsCollector
    ) -> AsyncIterator[bytes]:
        return relay.relay_openai(
            response,
            observer(),  # type: ignore[arg-type]
            settings=settings,
            metric=metric,
            sent_at=time.perf_counter(),
            collector=collector,
            end=end,
        )

    return make


async def test_a_stream_ends_at_its_last_event_even_if_the_backend_keeps_the_body_open() -> None:
    """After [DONE], or the Responses API's closing event (it has no [DONE]), the relay
    stops: a backend that keeps the body open must not get an error line appended."""
    cases = [
        ([(0, ROLE), (0, token("a")), (0, DONE), (0, None)], OpenAIStreamObserver, DONE),
        ([(0, CREATED), (0, text_delta("a")), (0, COMPLETED), (0, None)],
         ResponsesStreamObserver, COMPLETED),
    ]  # fmt: skip
    for script, observer, last in cases:
        out, elapsed, _ = await run_relay(
            script, observed(observer), stream_idle_timeout=0.3, stream_first_token_timeout=30
        )
        assert out.endswith(last), out[-200:]
        assert elapsed < 2


async def test_finished_output_items_lift_the_first_token_deadline() -> None:
    """A Responses stream may work for long before its first text (a hosted web search):
    a finished output item is progress, so only the idle limit applies from there on."""
    searched = responses_event("response.output_item.done", item={"type": "web_search_call"})
    script: Script = [(0, CREATED), (0, searched), (0.5, text_delta("a")), (0, COMPLETED)]
    out, elapsed, _ = await run_relay(
        script,
        observed(ResponsesStreamObserver),
        stream_idle_timeout=5,
        stream_first_token_timeout=0.3,
    )
    assert out.endswith(COMPLETED) and b'"error"' not in out
    assert elapsed >= 0.5


async def test_a_failure_the_backend_reports_in_the_stream_counts_as_an_error() -> None:
    failed = responses_event("response.failed", response={"status": "failed", "usage": None})
    chat_error = b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
    cases = [
        ([(0, CREATED), (0, text_delta("a")), (0, failed)], ResponsesStreamObserver),
        ([(0, CREATED), (0, responses_event("error", message="boom"))], ResponsesStreamObserver),
        ([(0, ROLE), (0, token("a")), (0, chat_error)], OpenAIStreamObserver),
    ]
    for script, observer in cases:
        metric = RequestMetrics("/v1/responses", "POST", streaming=True)
        out, _, _ = await run_relay(script, observed(observer, metric))
        assert out.endswith(script[-1][1])  # type: ignore[arg-type]  (relayed as it came)
        assert metric.stream_outcome == "error"


def test_a_responses_stream_ends_early_with_that_apis_error_event() -> None:
    """A shutdown (or the proxy's own failure) ends a Responses API stream with that API's
    ``error`` event, the error object beside its fields (the openai SDKs raise on it);
    a chat completions stream with OpenAI's ``{"error": ...}`` as before."""
    message = "the proxy is shutting down"
    end = relay.StreamEnd()
    end.responses = True
    responses = relay.stream_end_error(relay.EVENT_STREAM, end, message, "service_unavailable")
    assert responses is not None and responses.startswith(b"event: error\ndata: ")
    event = json.loads(responses.split(b"data: ", 1)[1])
    fields = {"code": "service_unavailable", "message": message, "param": None}
    assert event == {
        "type": "error",
        "sequence_number": 0,
        **fields,
        "error": {"type": "api_error", **fields},
    }
    for end in (relay.StreamEnd(), None):
        chat = relay.stream_end_error(relay.EVENT_STREAM, end, message, "service_unavailable")
        assert chat is not None
        assert json.loads(chat.removeprefix(b"data: ")) == {
            "error": {"type": "api_error", **fields}
        }
    # a backend's error reply, after an early start: its type, and a code as a string
    body = json.dumps({"error": {"message": "slow down", "type": "rate_limit_error", "code": 429}})
    failure = relay.in_band_failure(relay.EVENT_STREAM, 429, body.encode(), responses=True)
    assert failure is not None
    event = json.loads(failure.split(b"data: ", 1)[1])
    assert (event["code"], event["error"]["type"]) == ("429", "rate_limit_error")


def _numbered(*events: bytes, first: int = 0) -> list[bytes]:
    """Responses events (:func:`responses_event`) numbered from ``first`` on."""
    return [
        e.replace(b'"sequence_number": 0', b'"sequence_number": %d' % n)
        for n, e in enumerate(events, first)
    ]


def _sequence_numbers(out: bytes) -> list[int]:
    return [json.loads(e.data)["sequence_number"] for e in SSEParser().feed(out)]


@pytest.mark.parametrize("first", [0, 7])
@pytest.mark.parametrize("cut", ["ended", "silent"])
@pytest.mark.parametrize("after", [b"", b": keep-alive\n\n", b"\n"])
async def test_the_error_event_of_a_cut_responses_stream_is_numbered_after_the_last(
    first: int, cut: str, after: bytes
) -> None:
    """The proxy's ``error`` event that ends a Responses stream it cuts (the body ended
    before the closing event, or the backend went silent) carries the number after the
    last event relayed (it carried 0): the API numbers every event of a stream in order,
    a replay resumed after event 6 from 7 on. A shutdown's error event, written after
    the relay stopped, reads the same number from the relay's ``StreamEnd``. A read
    after the last event that numbers nothing (``after``: an SSE comment, as OpenRouter
    sends to keep a stream alive, or a blank line, each its own read) changes nothing
    (the error event was numbered 0 after one)."""
    events = _numbered(CREATED, text_delta("a"), text_delta("b"), first=first)
    script: Script = [(0, e) for e in events]
    if after:
        script += [(0.05, after), (0.05, after)]  # reads of their own
    script += [(0, None)] if cut == "silent" else []
    end = relay.StreamEnd()
    end.responses = True
    made = observed(ResponsesStreamObserver, end=end)
    out, _, _ = await run_relay(script, made, stream_idle_timeout=0.2)
    numbers = _sequence_numbers(out)
    assert numbers == list(range(first, first + 4))
    assert out.rsplit(b"\n\n", 2)[-2].startswith(b"event: error\n")
    shutdown = relay.stream_end_error(relay.EVENT_STREAM, end, "shutting down", "x")
    assert _sequence_numbers(shutdown or b"") == [first + 3]


def test_the_next_sequence_number_is_read_from_the_last_event_relayed() -> None:
    assert relay.next_sequence_number(b"") == 0
    assert relay.next_sequence_number(b": keep-alive\n\n") == 0  # a backend numbering none
    two = b'data: {"type":"a","sequence_number":4}\n\ndata: {"sequence_number" : 5}\n\n'
    assert relay.next_sequence_number(two) == 6
    # the key inside a string is escaped: not read
    quoted = b'data: {"sequence_number":2,"delta":"\\"sequence_number\\":99"}\n\n'
    assert relay.next_sequence_number(quoted) == 3
    assert relay.next_sequence_number(b'{"sequence_number":null}') == 0


async def test_a_resumed_responses_stream_is_watched_but_not_counted_again() -> None:
    """``GET /v1/responses/{id}?stream=true`` replays a response its POST already counted:
    the replay ends at its closing event and lifts the first-token deadline, but adds no
    tokens, usage or time to first token."""
    script: Script = [(0, CREATED), (0, text_delta("a")), (0.4, text_delta("b")), (0, COMPLETED)]
    metric = RequestMetrics("/v1/responses/resp_1", "GET", streaming=True)
    out, _, _ = await run_relay(
        script, observed(ReplayedResponsesObserver, metric), stream_first_token_timeout=0.2
    )
    assert out.endswith(COMPLETED)
    assert metric.stream_outcome != "error" and metric.first_token_time_ms is None
    assert not metric.input_tokens and not metric.output_tokens


def test_mapped_model_names_are_rewritten_each_once() -> None:
    """Clients b and a map to backends c and b: a stream naming c must read b, not a (the
    rename of c must not be renamed again)."""
    from trioproxy.routes_openai import _model_rewriter

    rewrite = _model_rewriter({"c": "b", "b": "a"})
    assert rewrite is not None
    line = b'data: {"model":"c","x":{"model": "b"}}\n\n'
    assert rewrite(line) == b'data: {"model":"b","x":{"model": "a"}}\n\n'
    assert _model_rewriter({"same": "same"}) is None


def finish(reason: str = "stop") -> bytes:
    return (
        b"data: " + HEAD + b'{"content":"b"},"logprobs":null,"finish_reason":"'
        + reason.encode() + b'"}]}'
    )  # fmt: skip


USAGE = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'
)


async def test_a_last_event_without_its_blank_line_still_counts() -> None:
    """A backend that ends its body after the last event's line (no blank line, no
    [DONE]): that event holds the finish_reason (or the usage), so the answer is
    finished, not broken, and its text and counts are not lost."""
    completed = {b"\n": b"\n", b"": b"\n\n", b"\r\n": b"\n", b"\r": b"\r"}
    for ending, blank_line in completed.items():
        script: Script = [(0, ROLE), (0, token("a")), (0, finish() + ending)]
        out, _, _ = await run_relay(script, ollama)
        lines = [json.loads(line) for line in out.splitlines()]
        assert "error" not in lines[-1], (ending, lines[-1])
        assert "".join(line["message"]["content"] for line in lines) == "ab"
        assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"

        out, _, _ = await run_relay(script, openai)
        assert b'"error"' not in out, (ending, out[-200:])
        # completed, so that an SSE reader (the openai SDK's) dispatches it
        assert out.endswith(finish() + ending + blank_line)
        events = [e for e in out.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n") if e]
        assert json.loads(events[-1].removeprefix(b"data: "))["choices"][0]["finish_reason"] == (
            "stop"
        )

    script = [(0, ROLE), (0, token("a")), (0, finish() + b"\n\n"), (0, USAGE + b"\n")]
    out, _, _ = await run_relay(script, ollama)
    done = json.loads(out.splitlines()[-1])
    assert (done["prompt_eval_count"], done["eval_count"]) == (11, 7)


# the relay stops reading mid-body: the response is closed, but httpx's generators over
# it are left to the garbage collector, which warns
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_event_is_bounded_like_a_whole_answer() -> None:
    """An event over the SSE parser's old fixed 8 MiB (a Responses image, base64) ended
    the stream as a "broken connection": an event may now be as large as a non-stream
    answer (MAX_RESPONSE_BYTES), and past that the error says which limit it met."""
    big = "x" * (9 * 1024 * 1024)
    script: Script = [(0, ROLE), (0, token(big)), (0, token("!")), (0, DONE)]
    out, _, _ = await run_relay(script, openai)
    assert out.endswith(DONE) and token(big) in out and b'"error"' not in out
    out, _, _ = await run_relay(script, ollama)
    lines = [json.loads(line) for line in out.splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == big + "!"

    small: Script = [(0, ROLE), (0, token("a")), (0.05, token("y" * 5000)), (0, DONE)]
    for make in (openai, ollama):
        out, _, _ = await run_relay(small, make, max_response_bytes=4096)
        assert "MAX_RESPONSE_BYTES" in last_error(out), out[-300:]


async def test_a_body_is_read_off_the_connection_and_a_gzipped_one_decoded_by_us(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Guards the per-chunk saving of ``netstream.H11Body`` (about 12 µs of CPU per relayed
    chunk, docs/performance-history.md): an httpx or httpcore upgrade that changed the classes it
    recognises would silently send every stream back through httpx's generators. A gzipped
    body is read the same way, raw, and decoded in bounded pieces (``DecodedBody``), not
    by httpx's decoders, which unpack a read whole."""
    direct_reads: list[bytes | None] = []
    read = netstream.H11Body.read

    async def counted(self: netstream.H11Body) -> bytes | None:
        direct_reads.append(part := await read(self))
        return part

    monkeypatch.setattr(netstream.H11Body, "read", counted)
    script: Script = [(0, ROLE), (0.01, token("a")), (0.01, DONE)]
    for make in (openai, ollama):
        direct_reads.clear()
        out, _, _ = await run_relay(script, make)
        assert b'"a"' in out
        assert direct_reads[:3] == [ROLE, token("a"), DONE]
        direct_reads.clear()
        out, _, _ = await run_relay(script, make, gzip=True)
        assert b'"a"' in out
        raw = b"".join(part for part in direct_reads if part)
        assert raw.startswith(b"\x1f\x8b") and b'"a"' not in raw  # gzip, read raw


async def test_a_line_sent_a_few_bytes_at_a_time_is_cut_by_the_idle_limit() -> None:
    """A chaos review: a backend that sent one byte every 0.5 s after two events held the
    stream open for ever, since every read reset the read timeout (the idle limit)."""
    trickle: Script = [(0.1, b"d")] * 100  # 10 s of "data: ..." never ended
    script: Script = [(0, ROLE), (0, token("a")), *trickle]
    for make in (openai, ollama):
        out, elapsed, _ = await run_relay(
            script, make, stream_idle_timeout=0.5, stream_first_token_timeout=30
        )
        assert "no whole line for 0.5 s (STREAM_IDLE_TIMEOUT)" in last_error(out)
        assert 0.45 < elapsed < 3


async def test_keep_alive_comments_are_no_silence() -> None:
    keep_alive: Script = [(0.2, b": keep-alive\n\n")] * 5  # 1 s of comments, each gap 0.2 s
    script: Script = [(0, ROLE), (0, token("a")), *keep_alive, (0, token("b")), (0, DONE)]
    out, _, _ = await run_relay(
        script, openai, stream_idle_timeout=0.5, stream_first_token_timeout=30
    )
    assert out.endswith(DONE) and b'"error"' not in out


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"data: {not json at all\n\n", "the backend sent an event that is not JSON"),
        (token("a")[:-20] + b"\xff\xfe" + token("a")[-20:], "not valid UTF-8"),
    ],
)
async def test_an_event_the_client_cannot_read_ends_a_relayed_stream_as_an_error(
    bad: bytes, message: str
) -> None:
    """A chaos review: a ``data:`` that is no JSON, or bytes that are not UTF-8, were
    relayed as they came (the openai SDK failed on them with a JSONDecodeError or a
    UnicodeDecodeError) and the stream was counted as completed. Now the client gets the
    stream's in-band error event instead, and the stream is an error."""
    metric = RequestMetrics("/v1/chat/completions", "POST", streaming=True)
    script: Script = [(0, ROLE), (0, token("a")), (0.05, bad), (0, token("b")), (0, DONE)]
    out, _, _ = await run_relay(script, observed(OpenAIStreamObserver, metric))
    assert message in last_error(out)
    assert "MAX_RESPONSE_BYTES" not in last_error(out)  # no limit it could raise
    assert bad not in out and token("b") not in out
    assert metric.stream_outcome == "error"


async def test_a_done_with_something_after_it_is_no_broken_event() -> None:
    script: Script = [(0, ROLE), (0, token("a")), (0, b"data: [DONE] \n\n"), (0, DONE)]
    out, _, _ = await run_relay(script, openai)
    assert out.endswith(DONE) and b'"error"' not in out


async def test_a_failure_reported_mid_stream_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A chaos review: a failure the backend reported in a relayed stream after its first
    token was counted as an error, but no line said so (a broken transport did)."""
    chat_error = b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n'
    script: Script = [(0, ROLE), (0, token("a")), (0, chat_error), (0.05, chat_error)]
    with caplog.at_level(logging.WARNING, logger="trioproxy.relay"):
        await run_relay(script, openai)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["stream failed: the backend reported: overloaded"]


async def test_events_split_across_reads_are_no_dragging_line() -> None:
    """A review of the idle limit on lines: its start was never reset when a line ended,
    so a healthy stream whose events often arrive in two reads was cut as silent once one
    split read fell ``idle`` s after the first."""
    split: Script = []
    for i in range(20):  # 2 s of events, one every 0.1 s, each cut after 10 bytes
        whole = token(f"t{i}")
        split += [(0.05, whole[:10]), (0.05, whole[10:])]
    script: Script = [(0, ROLE), (0, token("a")), *split, (0, DONE)]
    for make in (openai, ollama):
        out, _, _ = await run_relay(
            script, make, stream_idle_timeout=0.5, stream_first_token_timeout=30
        )
        assert b"STREAM_IDLE_TIMEOUT" not in out and b'"error"' not in out


async def test_the_start_of_a_body_is_joined_only_until_it_tells_what_it_is() -> None:
    """The first reads are joined while they are too short to tell an event stream from a
    JSON body (a line end, "da", half a byte order mark), and no further than 1 KiB: a
    backend sending whitespace a byte at a time is not joined for ever (each join copies).
    A body labelled as an event stream is joined only for a byte order mark in pieces: its
    keep-alive line ends reach the client as they come."""

    class Reads:
        def __init__(self, *reads: bytes) -> None:
            self.reads = list(reads)

        async def read(self) -> bytes | None:
            return self.reads.pop(0) if self.reads else None

    async def start(*reads: bytes, labelled: str = "text/plain") -> tuple[bytes, int]:
        reader = Reads(*reads[1:])
        response = httpx.Response(200, headers={"content-type": labelled})
        joined = await relay._telling_start(reader, reads[0], response)  # type: ignore[arg-type]
        return joined, len(reader.reads)

    assert await start(b"data: x\n\n", b"data: y\n\n") == (b"data: x\n\n", 1)
    assert await start(b"\n", b"da", b"ta: x\n\n", b"more") == (b"\nda" + b"ta: x\n\n", 1)
    assert await start(b"\xef", b"\xbb\xbf{", b"}") == (b"{", 1)  # the mark is left out
    assert await start(b" \n", b'{"a": 1}') == (b' \n{"a": 1}', 0)
    assert await start(b"\xef\xbb\xbf") == (b"\xef\xbb\xbf", 0)  # never an empty read
    joined, left = await start(*[b" "] * 3000)
    assert (joined, left) == (b" " * 1024, 3000 - 1024)
    stream = "text/event-stream; charset=utf-8"
    assert await start(b"\n", b"\n", b"data: x\n\n", labelled=stream) == (b"\n", 2)
    assert await start(b"da", b"ta: x\n\n", labelled=stream) == (b"da", 1)
    assert await start(b"\xef\xbb", b"\xbfdata: x\n\n", labelled=stream) == (b"data: x\n\n", 0)
    # a whole mark in a read of its own: relayed alone, it opened the next read's first
    # field name on the openai SDK's side, and that event was lost (the property test
    # test_relay_openai_relays_every_event_whole_with_error_fields_as_data found it)
    assert await start(b"\xef\xbb\xbf", b"data: x\n\n", labelled=stream) == (b"data: x\n\n", 0)
    assert await start(b"\xef\xbb\xbf", b'{"a": 1}') == (b'{"a": 1}', 0)


# ---- streams of several choices (n > 1) -------------------------------------------------


def choices_event(*choices: tuple[int, str, str | None]) -> bytes:
    """One chunk of the choices ``(index, text, finish_reason)``: OpenAI's and vLLM's hold
    one each, NVIDIA Dynamo's all of them."""
    listed = [
        {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": reason}
        for index, text, reason in choices
    ]
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + json.dumps({**chunk, "choices": listed}).encode() + b"\n\n"


def asking(n: int) -> Callable[[], OpenAIStreamObserver]:
    def make() -> OpenAIStreamObserver:
        observer = OpenAIStreamObserver()
        observer.expect_choices(n)
        return observer

    return make


# n=2, each body ending without [DONE]: cut while a choice ran on, or after both finished
CUT_AFTER_CHOICE_0 = [
    (0, choices_event((0, "a", None))),
    (0, choices_event((1, "b", None))),
    (0, choices_event((0, "c", "stop"))),
    (0, choices_event((1, "d", None))),
]
DYNAMO_CUT = [
    (0, choices_event((0, "a", None), (1, "b", None))),
    (0, choices_event((0, "c", "stop"), (1, "d", None))),
]
DYNAMO_CHOICE_1_FIRST = [
    (0, choices_event((0, "a", None), (1, "b", "stop"))),
    (0, choices_event((0, "c", None), (1, "", None))),
]
BOTH_FINISHED = [*CUT_AFTER_CHOICE_0, (0, choices_event((1, "e", "length")))]
DYNAMO_BOTH_FINISHED = [*DYNAMO_CUT, (0, choices_event((0, "", None), (1, "e", "stop")))]


@pytest.mark.parametrize("script", [CUT_AFTER_CHOICE_0, DYNAMO_CUT, DYNAMO_CHOICE_1_FIRST])
async def test_a_body_cut_while_a_choice_runs_on_is_a_broken_stream(script: Script) -> None:
    """``n=2``: choice 0's finish_reason passed for the whole stream's, so a body that
    ended after it while choice 1 ran on was a completed stream (metrics and access log),
    and the client took the cut choice for a whole one. It ends with the proxy's error."""
    metric = RequestMetrics("/v1/chat/completions", "POST", streaming=True)
    out, _, _ = await run_relay(script, observed(asking(2), metric))
    assert out.startswith(b"".join(data for _, data in script if data is not None))
    assert "1 of the choices asked for without a finish_reason" in last_error(out)
    assert metric.stream_outcome == "error"


@pytest.mark.parametrize("script", [BOTH_FINISHED, DYNAMO_BOTH_FINISHED])
async def test_a_body_that_ends_once_every_choice_finished_is_whole(script: Script) -> None:
    metric = RequestMetrics("/v1/chat/completions", "POST", streaming=True)
    out, _, _ = await run_relay(script, observed(asking(2), metric))
    assert out == b"".join(data for _, data in script if data is not None)
    assert metric.stream_outcome != "error"
    assert metric.token_chunks == 5  # every choice's tokens, in one chunk or in their own


async def test_done_ends_a_stream_of_several_choices_however_many_finished() -> None:
    """A backend that ignores ``n`` (Ollama's /v1) sends one choice, then [DONE]: the
    stream is whole, as [DONE] says."""
    metric = RequestMetrics("/v1/chat/completions", "POST", streaming=True)
    script: Script = [(0, choices_event((0, "a", None))), (0, choices_event((0, "", "stop")))]
    out, _, _ = await run_relay([*script, (0, DONE)], observed(asking(3), metric))
    assert out.endswith(DONE) and b'"error"' not in out
    assert metric.stream_outcome == "completed"


def test_the_choices_a_request_asks_for() -> None:
    """``n`` as backends read it: an integral float is its integer (pydantic's lax ints,
    vLLM's); anything else is one choice, the rule (the backend refuses what it cannot
    read)."""
    from trioproxy.routes_openai import _choices_asked

    assert [_choices_asked({"n": n}) for n in (3, 2.0, 1, 0, -2)] == [3, 2, 1, 0, -2]
    assert [_choices_asked(body) for body in ({}, {"n": None}, {"n": True}, {"n": "2"})] == [1] * 4
    assert _choices_asked({"n": 2.5}) == 1 and _choices_asked({"n": float("inf")}) == 1
