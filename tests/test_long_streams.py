"""Long, slow and stalled streams over real sockets on 127.0.0.1: how the first-token
deadline (STREAM_FIRST_TOKEN_TIMEOUT) holds across the proxy's retries and without
metrics, and how a backend that stops taking a request is told."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import ollama
import pytest
import trio
import trio.testing

from trioproxy.config import Settings
from trioproxy.errors import UpstreamTimeout
from trioproxy.upstream import UpstreamPool

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving

StartProxy = Callable[..., ServerProcess]
PROMPT = [{"role": "user", "content": "think hard"}]
Script = Callable[[ScriptedHandler, int], None]
Scripted = Callable[[Script], tuple[str, list[float]]]


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    event = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


class _Calls(ScriptedHandler):
    """A backend whose answers the test scripts per call (``script(handler, number)``)."""

    calls: list[float]
    script: Script

    def do_POST(self) -> None:
        self.json_body()
        self.calls.append(time.monotonic())
        type(self).script(self, len(self.calls))

    def do_GET(self) -> None:  # the readiness check's model list
        self.answer(200, b'{"object":"list","data":[]}')


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    """Serve a backend answering as ``script(handler, call_number)`` says; the fixture's
    function returns its URL and the times of the calls it got."""
    with contextlib.ExitStack() as stack:

        def serve(script: Script) -> tuple[str, list[float]]:
            calls: list[float] = []
            handler = type("Scripted", (_Calls,), {"calls": calls, "script": staticmethod(script)})
            return stack.enter_context(serving(handler)), calls

        yield serve


def test_a_retry_does_not_wait_past_the_first_token_deadline(
    start_proxy: StartProxy, scripted: Scripted
) -> None:
    """A 429 asking for a 3 s wait, 2 s before the first-token deadline: the wait and the
    retry went past it (the client waited 3 s more, and a retry that succeeded then had its
    answer cut at once for being late). The client gets the 429 at once instead."""

    def rate_limited(handler: ScriptedHandler, number: int) -> None:
        handler.answer(
            429,
            b'{"error": {"message": "slow down", "type": "rate_limit_error"}}',
            headers={"Retry-After": "3"},
        )

    url, calls = scripted(rate_limited)
    proxy = start_proxy(url, STREAM_FIRST_TOKEN_TIMEOUT="2", MAX_RETRIES="3")
    with pytest.raises(ollama.ResponseError) as refused:
        with ollama.Client(host=proxy.url, timeout=30) as client:
            list(client.chat(model="m", messages=PROMPT, stream=True))
    assert refused.value.status_code == 429
    assert "slow down" in refused.value.error
    assert len(calls) == 1


def test_retries_share_the_first_token_deadline(
    start_proxy: StartProxy, scripted: Scripted
) -> None:
    """Each retry waited the whole STREAM_FIRST_TOKEN_TIMEOUT for the headers again: a
    backend failing after 1.5 s, then after 2.25 s each time, under a 3 s deadline, held
    the stream 8 s over four calls. The deadline is the stream's: the second call is cut
    when it runs out."""

    def failing(handler: ScriptedHandler, number: int) -> None:
        time.sleep(1.5 if number == 1 else 2.25)
        handler.answer(503, b'{"error": {"message": "overloaded", "type": "server_error"}}')

    url, calls = scripted(failing)
    proxy = start_proxy(url, STREAM_FIRST_TOKEN_TIMEOUT="3", MAX_RETRIES="3", RETRY_BACKOFF="0.01")
    with ollama.Client(host=proxy.url, timeout=30) as client:  # it leaves retries to us
        with pytest.raises(ollama.ResponseError) as refused:
            list(client.chat(model="m", messages=PROMPT, stream=True))
    assert refused.value.status_code == 504
    assert "STREAM_FIRST_TOKEN_TIMEOUT" in refused.value.error
    assert len(calls) == 2


def test_without_metrics_the_wait_for_headers_counts_against_the_first_token(
    start_proxy: StartProxy, scripted: Scripted
) -> None:
    """With METRICS_ENABLED=false the first-token deadline was counted from the backend's
    headers, not from the request: a backend that sent its headers after 2 s and its first
    token after 4 s was served under a 3 s deadline."""

    def slow_thinker(handler: ScriptedHandler, number: int) -> None:
        time.sleep(2)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(_chunk({"role": "assistant", "content": ""}))
        handler.wfile.flush()
        time.sleep(2)
        try:
            handler.wfile.write(_chunk({"content": "late"}) + _chunk({}, "stop"))
            handler.wfile.write(b"data: [DONE]\n\n")
        except OSError:
            pass  # the proxy gave up on it

    url, _ = scripted(slow_thinker)
    proxy = start_proxy(url, STREAM_FIRST_TOKEN_TIMEOUT="3", METRICS_ENABLED="false")
    with ollama.Client(host=proxy.url, timeout=30) as client:
        with pytest.raises(ollama.ResponseError) as timed_out:
            list(client.chat(model="m", messages=PROMPT, stream=True))
    assert timed_out.value.status_code == 504
    assert "STREAM_FIRST_TOKEN_TIMEOUT" in timed_out.value.error


@pytest.fixture
def unread_backend() -> Iterator[str]:
    """A backend that accepts connections (the kernel does, from its backlog) and reads
    nothing of what it is sent; its receive buffer is small, so a large body stalls."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"


# the write stops mid-body: httpx's generator over the body is left to the garbage
# collector, which warns
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_backend_that_takes_none_of_the_request_is_told_by_its_setting(
    unread_backend: str, autojump_clock: trio.testing.MockClock
) -> None:
    """The 504 for a backend that stopped taking a request said "backend request failed:
    WriteTimeout: cancelled due to deadline", naming no setting; a stream's was cut at 60 s
    by a write timeout of its own, though its wait is bounded by STREAM_FIRST_TOKEN_TIMEOUT
    (here 100 s)."""
    settings = Settings(upstream_url=unread_backend, request_timeout=5.0, max_retries=0)
    pool = UpstreamPool(settings)
    body = b"x" * (16 << 20)  # more than the kernel buffers both sides hold
    try:
        with pytest.raises(UpstreamTimeout) as whole:
            await pool.request("POST", "/chat/completions", body=body)
        assert str(whole.value).endswith(
            "the backend took none of the request for 5 s (REQUEST_TIMEOUT)"
        )
        started = trio.current_time()
        with pytest.raises(UpstreamTimeout) as streamed:
            await pool.request(
                "POST", "/chat/completions", body=body, stream=True, header_timeout=100.0
            )
        assert "within 100 s (STREAM_FIRST_TOKEN_TIMEOUT)" in str(streamed.value)
        assert trio.current_time() - started >= 100.0  # the virtual clock's
    finally:
        await pool.aclose()


def test_a_slow_upload_does_not_spend_the_backends_first_token_time(
    start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    """The first-token deadline ran from the request's arrival: a client that took 2.4 s
    to send its body (well within CLIENT_BODY_TIMEOUT) left a backend 0.6 s of a 3 s
    STREAM_FIRST_TOKEN_TIMEOUT, and its 1.5 s to a first token was a 504 "the backend
    produced no token in time", counted as the backend's timeout."""
    proxy = start_proxy(demo_backend.url, STREAM_FIRST_TOKEN_TIMEOUT="3")
    content = "[[first_delay=1.5]] [[tokens=3]] " + "a long prompt " * 40
    body = json.dumps(
        {"model": "demo-chat", "stream": True, "messages": [{"role": "user", "content": content}]}
    ).encode()
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        quarter = len(body) // 4 + 1
        for start in range(0, len(body), quarter):
            time.sleep(0.6)
            client.sendall(body[start : start + quarter])
        answer = b""
        while received := client.recv(65536):
            answer += received
    head, _, chunked = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[-300:]
    last = [line for line in chunked.split(b"\n") if line.startswith(b"{")][-1]
    assert json.loads(last)["done"] is True


class _HeadersLate(ScriptedHandler):
    """A backend loading its model: no headers for 10 s (Ollama's OpenAI endpoint sends
    them with its first chunk)."""

    asked = threading.Event()

    def do_POST(self) -> None:
        self.json_body()
        self.asked.set()
        time.sleep(10)

    def do_GET(self) -> None:
        if "/responses/" in self.path:
            self.asked.set()
            time.sleep(10)
        else:  # the readiness check's model list
            self.answer(200, b'{"object":"list","data":[]}')


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/chat"),  # served by the fast path
        ("GET", "/v1/responses/resp_1?stream=true"),  # through Quart
    ],
)
def test_a_stream_the_shutdown_answers_before_its_backend_did_is_no_completed_stream(
    start_proxy: StartProxy, method: str, path: str
) -> None:
    """A stream request still waiting for the backend's headers when a shutdown ends it
    gets a 503; its outcome was recorded "completed" (the 503 went out whole), so
    trioproxy_streams_total counted a completed stream with a 503. It failed, as a
    stream the shutdown ends after its headers."""
    _HeadersLate.asked.clear()
    with serving(_HeadersLate) as url:
        proxy = start_proxy(url, GRACEFUL_TIMEOUT="1.5", ACCESS_LOG="true", LOG_LEVEL="INFO")
        answers: list[httpx.Response] = []
        body = {"model": "m", "stream": True, "messages": PROMPT}

        def ask() -> None:
            json_body = body if method == "POST" else None
            answers.append(httpx.request(method, proxy.url + path, json=json_body, timeout=30))

        asker = threading.Thread(target=ask)
        asker.start()
        assert _HeadersLate.asked.wait(10)
        proxy.process.send_signal(signal.SIGTERM)
        asker.join(timeout=20)
        assert proxy.process.wait(timeout=20) == 0
    assert [answer.status_code for answer in answers] == [503]
    assert "shutting down" in answers[0].text
    assert proxy.reader is not None
    proxy.reader.join(timeout=5)
    logged = f"{method} {path} "  # the query too
    (line,) = [line for line in proxy.log().splitlines() if logged in line]
    assert " 503 " in line and line.endswith("(error)"), line
