"""A stream counts as completed only once its end is written: real proxy processes on
127.0.0.1 and a client that stops reading before its stream's last line.

The relay marked a stream ``completed`` as soon as its last line (the done line of
/api/chat, the Responses API's ``response.completed``) was handed to the server. That
send returns normally also when the client made no room for the line and its connection
was closed, so a stream whose end never reached its client was counted completed (200),
not cancelled (499), nor cut by the shutdown (503). The last line here is many megabytes
(a tool call's arguments, a whole response's output), so it is the write the client
stops: the kernel buffers on both sides take a few."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving
from .test_long_streams import _chunk
from .test_metrics_e2e import scrape, total, wait_for

StartProxy = Callable[..., ServerProcess]
# more than the kernel's send buffer (at most 4 MiB) and a 4 KiB receive buffer hold, and
# less than the 8 MiB a tool call's arguments may take
HUGE = 7 << 20
PIECE = 1 << 16


def _chat_events() -> Iterator[bytes]:
    """Some text, then one tool call whose arguments /api/chat's done line carries whole."""
    yield _chunk({"role": "assistant", "content": "hi"})
    call = {"index": 0, "id": "call_1", "type": "function"}
    yield _chunk({"tool_calls": [{**call, "function": {"name": "f", "arguments": ""}}]})
    arguments = '{"text": "' + "x" * HUGE + '"}'
    for at in range(0, len(arguments), PIECE):
        piece = arguments[at : at + PIECE]
        yield _chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    yield _chunk({}, "tool_calls")
    yield b"data: [DONE]\n\n"


def _responses_events() -> Iterator[bytes]:
    """Some text, then ``response.completed``, which holds the whole output again."""
    response = {"id": "resp_1", "object": "response", "model": "m", "status": "in_progress"}
    text = "hi" + "x" * HUGE
    content = [{"type": "output_text", "text": text, "annotations": []}]
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
            "content": content}  # fmt: skip
    events: list[dict[str, object]] = [
        {"type": "response.created", "response": response},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": "hi"},
        {"type": "response.completed",
         "response": {**response, "status": "completed", "output": [item]}},
    ]  # fmt: skip
    for number, event in enumerate(events):
        kind = event["type"]
        data = json.dumps({**event, "sequence_number": number})
        yield f"event: {kind}\ndata: {data}\n\n".encode()


class _Backend(ScriptedHandler):
    """Streams ``_chat_events`` or ``_responses_events``; ``sent`` is set once all of a
    stream is written (the proxy has read it, but for what the kernel buffers)."""

    sent = threading.Event()

    def do_POST(self) -> None:
        self.json_body()
        events = _responses_events() if self.path.endswith("/responses") else _chat_events()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for event in events:
                self.wfile.write(event)
            self.wfile.flush()
        except OSError:
            return  # the proxy gave up on it
        type(self).sent.set()

    def do_GET(self) -> None:  # the readiness check's model list
        self.answer(200, b'{"object":"list","data":[]}')


@pytest.fixture
def backend() -> Iterator[str]:
    _Backend.sent.clear()
    with serving(_Backend) as url:
        yield url


_REQUESTS = {
    "/api/chat": {"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": True},
    "/v1/responses": {"model": "m", "input": "go", "stream": True},
}


def _slow_reader(proxy: ServerProcess, path: str) -> socket.socket:
    """A client that reads its stream's head and first text, then nothing more."""
    host, port = proxy.url.removeprefix("http://").split(":")
    body = json.dumps(_REQUESTS[path]).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    client.settimeout(10)
    client.connect((host, int(port)))
    client.sendall(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )
    received = b""
    while b"hi" not in received.partition(b"\r\n\r\n")[2]:
        data = client.recv(1024)
        assert data, received
        received += data
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return client


def _access_line(proxy: ServerProcess, path: str) -> str:
    lines = [line for line in proxy.log().splitlines() if f"POST {path} " in line]
    assert len(lines) == 1, lines
    return lines[0]


def _assert_cancelled(proxy: ServerProcess, path: str) -> None:
    wait_for(lambda: total(scrape(proxy.url), "http_requests_total") == 1, timeout=20)
    samples = scrape(proxy.url)
    assert total(samples, "trioproxy_streams_total", outcome="cancelled") == 1, samples.get(
        "trioproxy_streams_total"
    )
    assert total(samples, "http_requests_total", status="499") == 1
    assert total(samples, "http_requests_total", status="200") == 0
    line = _access_line(proxy, path)  # the 200 that went out, and that its client left
    assert " 200 " in line and line.endswith("(cancelled)"), line


@pytest.mark.parametrize("path", ["/api/chat", "/v1/responses"])
def test_a_stream_whose_client_made_no_room_for_its_end_is_cancelled(
    start_proxy: StartProxy, backend: str, path: str
) -> None:
    """The client stops reading; CLIENT_WRITE_TIMEOUT closes its connection while the
    stream's last line is being written: the client never got the end."""
    proxy = start_proxy(backend, CLIENT_WRITE_TIMEOUT="1", ACCESS_LOG="true", LOG_LEVEL="INFO")
    with _slow_reader(proxy, path):
        _assert_cancelled(proxy, path)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/responses"])
def test_a_stream_whose_client_left_during_its_end_is_cancelled(
    start_proxy: StartProxy, backend: str, path: str
) -> None:
    """The client stops reading, then closes its connection: however far the proxy got
    (its last line is most likely being written by then), the client never got the end."""
    proxy = start_proxy(backend, ACCESS_LOG="true", LOG_LEVEL="INFO")
    with _slow_reader(proxy, path):
        assert _Backend.sent.wait(20)
        time.sleep(0.5)  # the proxy's last write waits for room (the outcome is one either way)
    _assert_cancelled(proxy, path)


def test_a_stream_whose_end_the_shutdown_cut_is_the_proxys_doing(
    start_proxy: StartProxy, backend: str
) -> None:
    """SIGTERM while the stream's last line waits for a client that takes no more: when
    GRACEFUL_TIMEOUT runs out the write is cut. The proxy cut the stream (503), its client
    did not leave, and it did not complete."""
    proxy = start_proxy(backend, GRACEFUL_TIMEOUT="1", ACCESS_LOG="true", LOG_LEVEL="INFO")
    with _slow_reader(proxy, "/api/chat"):
        assert _Backend.sent.wait(20)
        time.sleep(0.5)  # the proxy's last write waits for room (the outcome is one either way)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=20) == 0
    assert proxy.reader is not None
    proxy.reader.join(timeout=5)
    line = _access_line(proxy, "/api/chat")
    assert " 200 " in line and line.endswith("(error: 503)"), line
