"""STREAM_KEEPALIVE_SECONDS before a stream's first event: a backend silent that long
(a long prompt's prefill, a queue, a reasoning model that sends nothing first) has the
response start then, with comments until the first event, so a load balancer's idle
timeout or Claude Code's byte watchdog does not cut it. A quick failure keeps its status
(and the proxy's retries); a later one is the stream's in-band error, and the metrics
and access log say it failed."""

from __future__ import annotations

import json
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import anthropic
import httpx
import openai
import pytest
import trio

from tests.conftest import ServerProcess
from tests.fakes import ScriptedHandler, serving
from trioproxy.keepalive import EarlyStart

KEEPALIVE = "0.3"
SILENCE = 0.9  # 3x the interval: the backend's wait before it answers at all
FIRST_TOKEN_TIMEOUT = "1.5"


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [choice]}  # fmt: skip
    return f"data: {json.dumps(chunk)}\n\n".encode()


ANSWER = (
    _chunk({"role": "assistant", "content": ""})
    + _chunk({"content": "forty-two"})
    + _chunk({}, "stop")
    + b"data: [DONE]\n\n"
)


LATE_RESPONSE = {
    "id": "resp_late", "object": "response", "created_at": 1, "status": "completed",
    "model": "late-json-response", "parallel_tool_calls": True, "tool_choice": "auto",
    "tools": [], "usage": {"input_tokens": 2, "output_tokens": 1, "total_tokens": 3},
    "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "forty-two", "annotations": []}]}],
}  # fmt: skip


def _error(message: str, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": None}}).encode()


CONTEXT_TOO_LONG = json.dumps({"error": {
    "message": "This model's maximum context length is 8192 tokens",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
}}).encode()  # fmt: skip
# vLLM's error body: no "error" object, so the proxy writes the client's in its dialect
UNKNOWN_MODEL = json.dumps({
    "object": "error", "message": "The model `late-404` does not exist.",
    "type": "NotFoundError", "param": None, "code": 404,
}).encode()  # fmt: skip


# what the proxy passes on of a backend's stream head (X-Upstream-Request-ID, the rate limits)
BACKEND_HEADERS = {"x-request-id": "req_backend_1", "x-ratelimit-remaining-requests": "41"}


class LateBackend(ScriptedHandler):
    """What it does depends on the model asked for: ``late-headers`` is silent before
    its headers, ``late-event`` after them (before the first event); ``refuse`` answers
    400 at once, ``busy-once`` 429 at once the first time; ``late-500`` and ``late-429``
    fail after the silence; ``never`` waits until the proxy hangs up (noted in
    ``hung_up``); ``late-400`` (OpenAI's context length error), ``late-error-event``
    (the same as the first event of a stream) and ``late-404`` (vLLM's error shape: no
    ``error`` object) are refusals after the silence; ``late-then-hang`` (after the
    silence) and ``then-hang`` (at once) send a token and then nothing until the proxy
    hangs up; ``late-long-429`` is ``late-429`` with a message of 60 KB."""

    seen: dict[str, int] = {}
    hung_up: list[str] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        model = self.json_body()["model"]
        with self.lock:
            self.seen[model] = self.seen.get(model, 0) + 1
            count = self.seen[model]
        if model == "refuse":
            self.answer(400, _error("the prompt is too long", "invalid_request_error"))
        elif model == "busy-once" and count == 1:
            body = _error("slow down", "rate_limit_error")
            self.answer(429, body, headers={"Retry-After": "0"})
        elif model == "late-500":
            time.sleep(SILENCE)
            self.answer(500, _error("the model crashed", "server_error"))
        elif model == "late-400":
            time.sleep(SILENCE)
            self.answer(400, CONTEXT_TOO_LONG)
        elif model == "late-404":
            time.sleep(SILENCE)
            self.answer(404, UNKNOWN_MODEL)
        elif model == "late-429":  # (one the proxy may not retry: the client sees it)
            time.sleep(SILENCE)
            body = _error("queue full", "rate_limit_error")
            self.answer(429, body, headers={"x-should-retry": "false"})
        elif model == "late-long-429":
            # a message of 60 KB (a status error's body is read up to 64 KiB)
            time.sleep(SILENCE)
            body = _error("queue full: " + "q" * 60_000, "rate_limit_error")
            self.answer(429, body, headers={"x-should-retry": "false"})
        elif model == "late-503-once" and count % 2 == 1:
            time.sleep(SILENCE / 2)  # past the start, the retry within the first-token deadline
            self.answer(503, _error("loading the model", "server_error"))
        elif model == "never":
            self._wait_for_hang_up(model)
        elif model == "late-json-response":  # ignores stream: one Response object, late
            time.sleep(SILENCE)
            self.answer(200, json.dumps(LATE_RESPONSE).encode())
        else:
            if model == "late-headers":
                time.sleep(SILENCE)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            for name, value in BACKEND_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.flush()
            if model in ("late-event", "late-error-event", "late-event-cut", "late-then-hang"):
                time.sleep(SILENCE)
            if model in ("late-event-cut", "late-then-hang", "then-hang"):
                # a token, then the connection closes (no end), or nothing more comes
                self.wfile.write(_chunk({"role": "assistant", "content": "forty"}))
                self.wfile.flush()
                if model != "late-event-cut":
                    self._wait_for_hang_up(model)
            else:
                self.wfile.write(b"data: %s\n\n" % CONTEXT_TOO_LONG if "error" in model else ANSWER)
            self.wfile.flush()
            self.close_connection = True

    def _wait_for_hang_up(self, model: str) -> None:
        sock = self.connection
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable and sock.recv(1, socket.MSG_PEEK) == b"":
                self.hung_up.append(model)
                break
        self.close_connection = True


@pytest.fixture(scope="module")
def late_backend() -> Iterator[str]:
    with serving(LateBackend) as url:
        yield url


@pytest.fixture(scope="module")
def proxy(late_backend: str, start_proxy: Callable[..., ServerProcess]) -> ServerProcess:
    return start_proxy(
        late_backend,
        STREAM_KEEPALIVE_SECONDS=KEEPALIVE,
        STREAM_FIRST_TOKEN_TIMEOUT=FIRST_TOKEN_TIMEOUT,
        RETRY_BACKOFF="0",
        ACCESS_LOG="true",
    )


def _body(model: str) -> dict:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": "q"}]}


def _raw(url: str, model: str, path: str = "/v1/chat/completions") -> tuple[int, list[bytes]]:
    with httpx.stream("POST", url + path, json=_body(model) | {"max_tokens": 9}, timeout=10) as r:
        return r.status_code, [line.encode() for line in r.iter_lines() if line]


def _outcomes(url: str, endpoint: str = "v1_chat_completions") -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("trioproxy_streams_total{") and f'endpoint="{endpoint}"' in line:
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _wait_for_outcome(url: str, before: dict[str, float], outcome: str, endpoint: str) -> None:
    deadline = time.monotonic() + 10
    while _outcomes(url, endpoint).get(outcome, 0.0) <= before.get(outcome, 0.0):
        assert time.monotonic() < deadline, _outcomes(url, endpoint)
        time.sleep(0.05)


def _requests(url: str, endpoint: str) -> dict[tuple[str, str], float]:
    """``http_requests_total`` of ``endpoint`` by its (status, model) labels."""
    counts: dict[tuple[str, str], float] = {}
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("http_requests_total{") and f'endpoint="{endpoint}"' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            model = line.split('model="', 1)[1].split('"', 1)[0]
            counts[status, model] = float(line.rsplit(" ", 1)[1])
    return counts


def _new_requests(url: str, endpoint: str, before: dict[tuple[str, str], float]) -> dict:
    after = _requests(url, endpoint)
    return {key: n - before.get(key, 0.0) for key, n in after.items() if n != before.get(key)}


def _access_line(proxy: ServerProcess, path: str, seen: int) -> str:
    """The access line of the request to ``path`` after the first ``seen`` ones (the
    server's output is read by a thread: it may come a little after the metrics)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in proxy.log().splitlines() if f" POST {path} " in line]
        if len(lines) > seen:
            return lines[seen].split(f" POST {path}", 1)[1]
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.02)


def _access_count(proxy: ServerProcess, path: str) -> int:
    return sum(f" POST {path} " in line for line in proxy.log().splitlines())


class _Counts:
    """What the proxy had counted and logged for ``path`` before a request: then
    :meth:`refusal_counted` checks how that request was."""

    def __init__(self, proxy: ServerProcess, path: str, endpoint: str) -> None:
        self.proxy, self.path, self.endpoint = proxy, path, endpoint
        self.outcomes = _outcomes(proxy.url, endpoint)
        self.requests = _requests(proxy.url, endpoint)
        self.seen = _access_count(proxy, path)

    def refusal_counted(self, status: int) -> None:
        """A failed stream (outcome ``error``) counted with the refusal's ``status`` and
        no model label of its own (a failing model mints none), logged as the 200 the
        client got, the outcome and that status."""
        _wait_for_outcome(self.proxy.url, self.outcomes, "error", self.endpoint)
        counted = _new_requests(self.proxy.url, self.endpoint, self.requests)
        assert counted == {(str(status), "other"): 1}
        line = _access_line(self.proxy, self.path, self.seen)
        assert line.startswith(" 200 ") and line.endswith(f" (error: {status})"), line


@pytest.mark.parametrize("model", ["late-headers", "late-event"])
def test_comments_come_before_a_late_first_event(proxy: ServerProcess, model: str) -> None:
    status, lines = _raw(proxy.url, model)
    assert status == 200
    first_event = next(i for i, line in enumerate(lines) if line.startswith(b"data:"))
    comments = [line for line in lines[:first_event] if line.startswith(b":")]
    # 0.9 s of silence at 0.3 s: the start at 0.3 s and one or two more, never a burst
    assert 2 <= len(comments) <= 4, lines
    assert set(comments) == {b": keep-alive"}
    assert lines[-1] == b"data: [DONE]" and any(b"forty-two" in line for line in lines)


EARLY_HEADS = [("fast", True), ("late-event", True), ("late-headers", False)]


def _passed_on(head: httpx.Headers) -> set[object]:
    """Of a stream's head: the backend's request id and rate limit, and whether it has
    X-Proxy-Overhead-Ms; the proxy's own X-Request-ID is always there."""
    assert head["x-request-id"] and head["x-request-id"] != "req_backend_1"
    return {
        head.get("x-upstream-request-id"),
        head.get("x-ratelimit-remaining-requests"),
        "x-proxy-overhead-ms" in head,
    }


@pytest.mark.parametrize(("model", "backend_headers"), EARLY_HEADS)
def test_an_early_start_has_the_backends_headers_when_they_came_before_it(
    proxy: ServerProcess, model: str, backend_headers: bool
) -> None:
    """A backend that sends its head at once and its first event late (the prompt's
    prefill after its headers): the early start sends the stream's own head, the
    backend's request id and rate limits and X-Proxy-Overhead-Ms in it, as a stream that
    did not start early has them. One whose head itself is late: the start has none of
    them (they cannot follow a head), only the proxy's X-Request-ID."""
    url = proxy.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=_body(model), timeout=10) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert (lines[0] == ": keep-alive") is (model != "fast"), lines
    assert lines[-1] == "data: [DONE]"
    assert _passed_on(response.headers) == (
        {"req_backend_1", "41", True} if backend_headers else {None, False}
    )
    assert "request-id" not in response.headers  # Anthropic's name: /v1/messages only


@pytest.mark.parametrize(("model", "backend_headers"), EARLY_HEADS)
def test_an_anthropic_stream_has_the_same_head(
    proxy: ServerProcess, model: str, backend_headers: bool
) -> None:
    """/v1/messages passes on what the other /v1 streams do, started early or not, as the
    anthropic SDK's raw response shows."""
    with anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0) as sdk:
        with sdk.messages.with_streaming_response.create(
            model=model, max_tokens=50, messages=[{"role": "user", "content": "q"}], stream=True
        ) as response:
            lines = [line for line in response.iter_lines() if line]
    assert (lines[0] == "event: ping") is (model != "fast"), lines
    assert lines[-2:] == ["event: message_stop", 'data: {"type":"message_stop"}']
    assert _passed_on(response.headers) == (
        {"req_backend_1", "41", True} if backend_headers else {None, False}
    )
    # the proxy's id under Anthropic's name too, which the SDK reads, in the early head
    assert response.request_id == response.headers["x-request-id"]


def test_the_openai_sdk_reads_an_early_started_stream_whole(proxy: ServerProcess) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="late-headers", messages=[{"role": "user", "content": "q"}], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "forty-two"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_anthropic_sdk_reads_an_early_started_stream_whole(proxy: ServerProcess) -> None:
    status, lines = _raw(proxy.url, "late-headers", "/v1/messages")
    assert status == 200
    start = next(i for i, line in enumerate(lines) if line == b"event: message_start")
    # only Anthropic's pings before it (the SDK drops them), no comments
    assert lines[:start].count(b"event: ping") >= 2, lines
    assert not any(line.startswith(b":") for line in lines), lines
    with anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0) as sdk:
        with sdk.messages.stream(
            model="late-event", max_tokens=50, messages=[{"role": "user", "content": "q"}]
        ) as stream:
            message = stream.get_final_message()
    assert message.content[0].text == "forty-two"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"


def test_a_quick_refusal_keeps_its_status(proxy: ServerProcess) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="refuse", messages=[{"role": "user", "content": "q"}], stream=True
        )
    assert raised.value.status_code == 400 and "too long" in raised.value.message


def test_a_quick_429_is_retried_before_the_start(proxy: ServerProcess) -> None:
    """(No x-stainless-retry-count: the proxy retries; the client sees one answer.)"""
    before = LateBackend.seen.get("busy-once", 0)
    status, lines = _raw(proxy.url, "busy-once")
    assert status == 200 and not any(line.startswith(b":") for line in lines), lines
    assert any(b"forty-two" in line for line in lines)
    assert LateBackend.seen["busy-once"] == before + 2


def test_a_late_503_is_retried_by_the_proxy_for_a_client_that_retries_itself(
    proxy: ServerProcess,
) -> None:
    """The openai SDK sends x-stainless-retry-count, so the proxy leaves retries to it; but
    once the response started early the SDK has its 200 and cannot retry: the proxy does."""
    before = LateBackend.seen.get("late-503-once", 0)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="late-503-once", messages=[{"role": "user", "content": "q"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "forty-two"
    assert LateBackend.seen["late-503-once"] == before + 2


def test_a_failure_after_the_start_is_an_in_band_error(proxy: ServerProcess) -> None:
    before = _outcomes(proxy.url)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="late-500", messages=[{"role": "user", "content": "q"}], stream=True
    )
    with pytest.raises(openai.APIError, match="the model crashed"):
        list(stream)
    _wait_for_outcome(proxy.url, before, "error", "v1_chat_completions")


@pytest.mark.parametrize(
    ("model", "status", "kind", "message"),
    [
        ("late-400", 400, "invalid_request_error", "maximum context length is 8192"),
        # the same refusal as the first event of the backend's stream, after its 200
        ("late-error-event", 400, "invalid_request_error", "maximum context length is 8192"),
        ("late-404", 404, "invalid_request_error", "`late-404` does not exist"),
        ("late-429", 429, "rate_limit_error", "queue full"),
        ("late-500", 500, "server_error", "the model crashed"),
    ],
)
def test_a_late_refusal_is_counted_as_the_same_refusal_without_the_early_start(
    proxy: ServerProcess, model: str, status: int, kind: str, message: str
) -> None:
    """The backend refuses after the response started early (a context too long found
    after a long prefill, an unknown model, a rate limit): the client gets the backend's
    error (its message, the type of its status) as the stream's error event; the metrics
    count the refusal's own status, as they would without the early start (a 4xx is a
    client error, never in the 5xx error rate; a 500 no blanket 502), and a failing model
    gets no label of its own; the access line has the 200 the client got, then the
    stream's outcome and that status."""
    counts = _Counts(proxy, "/v1/chat/completions", "v1_chat_completions")
    code, lines = _raw(proxy.url, model)
    assert code == 200 and lines[0] == b": keep-alive", lines  # started early
    events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: ")]
    assert len(events) == 1 and events[0]["error"]["type"] == kind, lines
    assert message in events[0]["error"]["message"]
    counts.refusal_counted(status)


def test_a_stream_that_breaks_after_the_backends_200_is_still_a_502(proxy: ServerProcess) -> None:
    """Started early, then the backend's own 200 and a token, then its connection closes
    before the stream's end: a broken stream (502, the 5xx error rate), as without the
    early start; only a refusal keeps its own status. The access line: the 200, then
    ``(error)``, no status of its own."""
    counts = _Counts(proxy, "/v1/chat/completions", "v1_chat_completions")
    code, lines = _raw(proxy.url, "late-event-cut")
    assert code == 200 and lines[0] == b": keep-alive", lines  # started early
    assert b"forty" in b"".join(lines) and b'"error"' in lines[-1], lines
    _wait_for_outcome(proxy.url, counts.outcomes, "error", "v1_chat_completions")
    counted = _new_requests(proxy.url, "v1_chat_completions", counts.requests)
    assert [status for status, _ in counted] == ["502"], counted
    line = _access_line(proxy, "/v1/chat/completions", counts.seen)
    assert line.startswith(" 200 ") and line.endswith(" (error)"), line


@pytest.mark.parametrize("model", ["late-then-hang", "then-hang"])  # started early, or not
def test_a_stream_the_shutdown_cuts_logs_the_503_the_metrics_count(
    late_backend: str, start_proxy: Callable[..., ServerProcess], model: str
) -> None:
    """A stream still going when the shutdown's grace period nears its end is ended
    in-band by the proxy, counted as a 503 (the proxy's doing, not the backend's 502):
    its access line said ``200 ... (error)``, which reads as that 502. It has the 200 the
    client got and the 503 the metrics count, as a late refusal has its status."""
    proxy = start_proxy(
        late_backend, STREAM_KEEPALIVE_SECONDS=KEEPALIVE, GRACEFUL_TIMEOUT="1", ACCESS_LOG="true"
    )
    body = _body(model) | {"max_tokens": 9}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(lines)
        assert (first == ": keep-alive") is (model == "late-then-hang"), first  # started early
        if not first.startswith("data: "):
            first = next(line for line in lines if line.startswith("data: "))
        assert "forty" in first, first
        proxy.process.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert any("shutting down" in line for line in rest), rest
    assert proxy.process.wait(timeout=10) == 0
    assert proxy.reader is not None
    proxy.reader.join(timeout=5)
    line = _access_line(proxy, "/v1/chat/completions", 0)
    assert line.startswith(" 200 ") and line.endswith(" (error: 503)"), line


def test_a_failure_after_the_start_of_a_responses_stream_is_that_apis_error_event(
    proxy: ServerProcess,
) -> None:
    """On /v1/responses the in-band error is the Responses API's ``error`` event, with the
    backend's message, type and code (the Vercel AI SDK's schema refuses chat
    completions' bare ``{"error": ...}`` there), which the openai SDK raises on too."""
    before = _outcomes(proxy.url, "v1_responses")
    body = {"model": "late-500", "input": "q", "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/responses", json=body, timeout=10) as response:
        assert response.status_code == 200  # started early
        lines = [line for line in response.iter_lines() if line and not line.startswith(":")]
    assert lines[0] == "event: error", lines
    event = json.loads(lines[1].removeprefix("data: "))
    error = {"code": None, "message": "the model crashed", "param": None}
    assert event == {
        "type": "error",
        "sequence_number": 0,
        **error,
        "error": {"type": "server_error", **error},
    }
    _wait_for_outcome(proxy.url, before, "error", "v1_responses")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="the model crashed"):
        list(client.responses.create(model="late-500", input="q", stream=True))


def test_a_late_refusal_of_a_responses_stream_keeps_its_type_code_and_status(
    proxy: ServerProcess,
) -> None:
    counts = _Counts(proxy, "/v1/responses", "v1_responses")
    body = {"model": "late-400", "input": "q", "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/responses", json=body, timeout=10) as response:
        assert response.status_code == 200  # started early
        lines = [line for line in response.iter_lines() if line and not line.startswith(":")]
    assert lines[0] == "event: error", lines
    event = json.loads(lines[1].removeprefix("data: "))
    assert event["code"] == "context_length_exceeded" and event["param"] == "messages"
    assert event["error"]["type"] == "invalid_request_error", event
    counts.refusal_counted(400)


def test_a_late_refusals_long_message_is_bounded_in_the_responses_error_event(
    proxy: ServerProcess,
) -> None:
    """The error event the proxy writes holds the backend's message bounded (4 KiB, the
    errors' MESSAGE_BYTES), its start and its type kept, the rest counted in a note."""
    body = {"model": "late-long-429", "input": "q", "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/responses", json=body, timeout=10) as response:
        assert response.status_code == 200  # started early
        lines = [line for line in response.iter_lines() if line and not line.startswith(":")]
    event = json.loads(lines[1].removeprefix("data: "))
    message = event["error"]["message"]
    assert event["message"] == message and event["error"]["type"] == "rate_limit_error"
    assert message.startswith("queue full: qqq") and len(message.encode()) <= 4096
    assert message.endswith(" more bytes]"), message[-60:]


def test_a_late_json_response_comes_as_its_events_after_the_comments(
    proxy: ServerProcess,
) -> None:
    """A backend that ignores ``stream`` on /v1/responses and answers one Response object
    late: the response started early, so the Responses API's events follow the comments
    (no second status line), and the stream counts as completed."""
    before = _outcomes(proxy.url, "v1_responses")
    body = {"model": "late-json-response", "input": "q", "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/responses", json=body, timeout=10) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    first_event = lines.index("event: response.created")
    assert first_event >= 1 and all(line.startswith(":") for line in lines[:first_event]), lines
    assert not any(line.startswith(":") for line in lines[first_event:]), lines
    assert lines[-2] == "event: response.completed"
    _wait_for_outcome(proxy.url, before, "completed", "v1_responses")
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with client.responses.stream(model="late-json-response", input="q") as stream:
        assert stream.get_final_response().output_text == "forty-two"


@pytest.mark.parametrize(
    ("model", "status", "kind", "message"),
    [
        ("late-429", 429, "rate_limit_error", "queue full"),
        ("late-400", 400, "invalid_request_error", "maximum context length is 8192"),
        ("late-500", 500, "api_error", "the model crashed"),
    ],
)
def test_a_late_refusal_is_the_anthropic_sdks_error(
    proxy: ServerProcess, model: str, status: int, kind: str, message: str
) -> None:
    """On /v1/messages the error event has Anthropic's type for the backend's status,
    and the metrics count that status, as the same refusal before the start."""
    counts = _Counts(proxy, "/v1/messages", "v1_messages")
    with anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0) as sdk:
        with pytest.raises(anthropic.APIStatusError) as raised:
            with sdk.messages.stream(
                model=model, max_tokens=50, messages=[{"role": "user", "content": "q"}]
            ) as stream:
                stream.get_final_message()
    error = raised.value.body["error"]  # type: ignore[index]
    assert error["type"] == kind and message in error["message"], error
    assert raised.value.request_id == raised.value.response.headers["x-request-id"]
    counts.refusal_counted(status)


def test_the_first_token_deadline_ends_an_early_started_stream(proxy: ServerProcess) -> None:
    """Counted as a timeout (504); the access line: the 200, then ``(timeout)``, which is
    that 504 (no status of its own: the outcome's is the one counted)."""
    counts = _Counts(proxy, "/v1/chat/completions", "v1_chat_completions")
    status, lines = _raw(proxy.url, "never")
    assert status == 200
    assert lines.count(b": keep-alive") >= 3, lines
    errors = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    assert len(errors) == 1 and "error" in errors[0], lines
    _wait_for_outcome(proxy.url, counts.outcomes, "timeout", "v1_chat_completions")
    counted = _new_requests(proxy.url, "v1_chat_completions", counts.requests)
    assert [status for status, _ in counted] == ["504"], counted
    line = _access_line(proxy, "/v1/chat/completions", counts.seen)
    assert line.startswith(" 200 ") and line.endswith(" (timeout)"), line


def test_a_client_leaving_in_the_silence_cancels_the_backend_request(
    proxy: ServerProcess,
) -> None:
    counts = _Counts(proxy, "/v1/chat/completions", "v1_chat_completions")
    before = counts.outcomes
    hung_up = len(LateBackend.hung_up)
    url = proxy.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=_body("never"), timeout=10) as response:
        assert response.status_code == 200  # started early
        for line in response.iter_lines():
            if line.startswith(":"):
                break  # leave in the silence, long before the first-token deadline
    left_at = time.monotonic()
    _wait_for_outcome(proxy.url, before, "cancelled", "v1_chat_completions")
    deadline = time.monotonic() + 5
    while len(LateBackend.hung_up) == hung_up:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert time.monotonic() - left_at < 1.2  # at once, not at the 1.5 s deadline
    # counted 499; the access line has the 200 it got and ``(cancelled)``, that 499
    counted = _new_requests(proxy.url, "v1_chat_completions", counts.requests)
    assert [status for status, _ in counted] == ["499"], counted
    line = _access_line(proxy, "/v1/chat/completions", counts.seen)
    assert line.startswith(" 200 ") and line.endswith(" (cancelled)"), line
    log = proxy.log()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_nothing_starts_early_with_the_setting_off(
    late_backend: str, start_proxy: Callable[..., ServerProcess]
) -> None:
    off = start_proxy(late_backend, STREAM_FIRST_TOKEN_TIMEOUT=FIRST_TOKEN_TIMEOUT)
    start = time.monotonic()
    status, lines = _raw(off.url, "late-500")
    assert status == 500 and time.monotonic() - start >= SILENCE, lines
    assert not any(line.startswith(b":") for line in lines)


async def test_a_request_that_never_streams_builds_no_timer() -> None:
    """Every fast-path request has an EarlyStart with the setting on, most never stream:
    its timer's scope and keeper come only when a stream is opened (they cost ~3 us a
    request), and stopping one never opened sends nothing."""
    sent: list[object] = []

    async def start(content_type: str, head: object) -> None:
        sent.append(content_type)

    async with trio.open_nursery() as nursery:
        early = EarlyStart(0.01, None, None, nursery, start)  # type: ignore[arg-type]
        assert early.keeper is None
        assert early.stop_unless_started() is False
        early.open("text/event-stream")  # a stream opened: timed, then stopped in time
        assert early.keeper is not None
        assert early.stop_unless_started() is False
    assert sent == []
