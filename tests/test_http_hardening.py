"""What the proxy bounds and refuses at the HTTP layer, each found by a review against the
running program: a backend body without end, a client that stops reading, replies sent
before the body was read, request smuggling shapes, paths with repeated slashes, a lone
surrogate in a model name, CORS caching, and the backend's key in relayed headers."""

from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import pytest

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving
from .test_content_coding import bomb

StartProxy = Callable[..., ServerProcess]
BACKEND_KEY = "sk-backend-secret-0123456789"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class _Backend(ScriptedHandler):
    """Model ``huge``: a 2 MB completion; ``bomb``: 4 MB of zeros gzipped to a few KB;
    ``bomb-nested``: 256 MiB of zeros gzipped twice (590 bytes), ``err-bomb`` the same as a
    400's body, ``zstd``: a body in a coding the proxy does not ask for;
    ``echo``: a completion whose rate-limit header echoes the key it was sent; ``moved``: a
    redirect elsewhere, with the key in its query; ``err-stall``: a 500 whose body stalls;
    ``trickle``: a completion a byte at a time; ``tools-forever``: a stream of tool-call
    arguments that never ends."""

    def do_POST(self) -> None:
        request = self.json_body()
        model = request["model"]
        extra: dict[str, str] = {}
        if model in _MISBEHAVIOURS:
            with contextlib.suppress(OSError):  # the proxy hangs up on us
                _MISBEHAVIOURS[model](self)
            return
        if model == "moved":
            location = f"https://elsewhere.example/v1/chat/completions?key={BACKEND_KEY}"
            self.answer(308, b"", headers={"Location": location})
            return
        if model == "huge":
            body = json.dumps(_completion("x" * 2_000_000)).encode()
        elif model == "bomb":
            body = gzip.compress(b"0" * 4_000_000)
            extra["Content-Encoding"] = "gzip"
        elif model in ("bomb-nested", "err-bomb"):
            extra["Content-Encoding"] = "gzip, gzip"
            kind = "text/event-stream" if request.get("stream") else "application/json"
            self.answer(400 if model == "err-bomb" else 200, bomb(), kind, headers=extra)
            return
        elif model == "amplify":  # 3 MB of empty arrays beside the answer
            body = json.dumps({**_completion("ok"), "extra": [[]] * 1_000_000}).encode()
        elif model == "many-floats":  # an answer of 2.2 million values of 9 bytes each
            body = json.dumps(_completion("ok"))[:-1].encode()
            body += b', "extra": [' + b"0.123456," * 2_200_000 + b"1]}"
        elif model == "zstd":
            body = b"(\xb5/\xfd not really zstd"
            extra["Content-Encoding"] = "zstd"
        else:
            body = json.dumps(_completion("ok")).encode()
            extra["x-ratelimit-echo"] = self.headers.get("Authorization", "")
        self.answer(200, body, headers=extra)


def _stall_an_error(handler: ScriptedHandler) -> None:
    handler.send_response(500)
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    handler.wfile.write(b'{"error":')
    handler.wfile.flush()
    time.sleep(15)


def _trickle(handler: ScriptedHandler) -> None:
    body = json.dumps(_completion("ok")).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for byte in body:
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(0.5)


def _tools_forever(handler: ScriptedHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    start = {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}
    more = {"index": 0, "function": {"arguments": "x" * 65536}}
    for call in itertools.chain([start], itertools.repeat(more, 100_000)):
        chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {
            "tool_calls": [call]}, "finish_reason": None}]}  # fmt: skip
        event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))


_MISBEHAVIOURS: dict[str, Callable[[ScriptedHandler], None]] = {
    "err-stall": _stall_an_error,
    "trickle": _trickle,
    "tools-forever": _tools_forever,
}


def _completion(text: str) -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
    }


@pytest.fixture(scope="module")
def odd_backend_proxy(start_proxy: StartProxy) -> Iterator[ServerProcess]:
    with serving(_Backend) as url:
        yield start_proxy(
            url,
            MAX_RETRIES="0",
            MAX_RESPONSE_BYTES="1000000",
            OPENAI_API_KEY=BACKEND_KEY,
            REQUEST_TIMEOUT="2",
        )


@pytest.mark.parametrize("model", ["huge", "bomb"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_a_backend_body_over_the_limit_is_a_502_not_a_worker_out_of_memory(
    odd_backend_proxy: ServerProcess, model: str, path: str
) -> None:
    """A body without end (or a small gzip body that unpacks to gigabytes) used to be read
    whole into memory; past MAX_RESPONSE_BYTES (decoded) it is a 502."""
    body = {"model": model, "stream": False, **CHAT}
    answer = httpx.post(odd_backend_proxy.url + path, json=body, timeout=20)
    assert answer.status_code == 502, answer.text
    assert "MAX_RESPONSE_BYTES" in answer.text


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_an_encoded_answer_unpacks_no_further_than_its_limit(start_proxy: StartProxy) -> None:
    """A review: 590 bytes of ``gzip, gzip`` unpacked to 256 MiB in one httpx decoder call
    (a zstd body to gigabytes), in answers, error bodies and streams alike, on the event
    loop, before MAX_RESPONSE_BYTES was looked at. Each read now unpacks in 64 KiB pieces
    and stops at the limit; a coding the proxy did not ask for is a 502 naming it."""
    with serving(_Backend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0", MAX_RESPONSE_BYTES="1000000")
        for path in ("/v1/chat/completions", "/api/chat"):
            for stream in (False, True):
                body = {"model": "bomb-nested", "stream": stream, **CHAT}
                answer = httpx.post(proxy.url + path, json=body, timeout=30)
                assert "MAX_RESPONSE_BYTES" in answer.text, answer.text[:300]
                body = {"model": "err-bomb", "stream": stream, **CHAT}
                answer = httpx.post(proxy.url + path, json=body, timeout=30)
                assert answer.status_code == 400, answer.text[:300]
        # the proxy idles at about 60 MB; one whole bomb would be 256 more
        assert _peak_rss_mb(proxy.process.pid) < 160
        for path in ("/v1/chat/completions", "/api/chat"):
            body = {"model": "zstd", "stream": False, **CHAT}
            answer = httpx.post(proxy.url + path, json=body, timeout=30)
            assert answer.status_code == 502
            assert "'zstd', which the proxy did not ask for" in answer.text


def test_an_answer_that_decodes_far_larger_than_its_size_is_a_502(
    start_proxy: StartProxy,
) -> None:
    """A review: a 200 MB answer of empty arrays, within MAX_RESPONSE_BYTES, took 6.3 GB and
    20 s of the worker to decode for translation. A client's body was bounded so; an
    answer now is too: past 1 MiB, at most 500,000 arrays and objects, and no more commas
    than one per 8 bytes (a float embedding batch has one per 10-20)."""
    with serving(_Backend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        body = {"model": "amplify", "stream": False, **CHAT}
        answer = httpx.post(proxy.url + "/api/chat", json=body, timeout=30)
        assert answer.status_code == 502, answer.text[:300]
        assert answer.json()["error"].endswith(
            "the backend's answer is too costly to decode: "
            "it holds more than 500,000 arrays and objects"
        )
        body = {"model": "many-floats", "stream": False, **CHAT}
        answer = httpx.post(proxy.url + "/api/chat", json=body, timeout=30)
        assert answer.status_code == 200, answer.text[:300]
        assert answer.json()["message"]["content"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_an_error_whose_body_stalls_is_answered_with_its_status(
    odd_backend_proxy: ServerProcess, path: str, stream: bool
) -> None:
    """A stream's reads have no timeout of their own: the request hung, holding its slot."""
    body = {"model": "err-stall", "stream": stream, **CHAT}
    started = time.monotonic()
    answer = httpx.post(odd_backend_proxy.url + path, json=body, timeout=20)
    assert answer.status_code == 500
    assert time.monotonic() - started < 10


def test_a_body_that_trickles_is_bounded_by_the_request_timeout(
    odd_backend_proxy: ServerProcess,
) -> None:
    """httpx bounds each read, not the body: a byte every half second held it for ever."""
    body = {"model": "trickle", "stream": False, **CHAT}
    started = time.monotonic()
    answer = httpx.post(odd_backend_proxy.url + "/v1/chat/completions", json=body, timeout=20)
    assert answer.status_code == 504
    assert "REQUEST_TIMEOUT" in answer.json()["error"]["message"]
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_tool_calls_that_never_end_are_cut_not_held_without_bound(
    odd_backend_proxy: ServerProcess, path: str
) -> None:
    """Ollama sends a tool call whole, so its fragments are held: a backend streaming
    arguments for ever grew the worker by 50 MB/s."""
    body = {"model": "tools-forever", "prompt": "p", **CHAT}
    answer = httpx.post(odd_backend_proxy.url + path, json=body, timeout=20)
    assert answer.status_code == 502
    assert "tool calls exceed" in answer.json()["error"]
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", _status(odd_backend_proxy)).group(1))
    assert rss_kb < 300_000


def _status(server: ServerProcess) -> str:
    with open(f"/proc/{server.process.pid}/status") as status:
        return status.read()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_a_backend_redirect_is_a_502_naming_where_it_points(
    odd_backend_proxy: ServerProcess, path: str, stream: bool
) -> None:
    """It used to reach /v1 clients as a bare 308 without its Location, and /api clients
    as "not JSON"; following it would send the backend key elsewhere."""
    body = {"model": "moved", "stream": stream, **CHAT}
    answer = httpx.post(odd_backend_proxy.url + path, json=body, timeout=10)
    assert answer.status_code == 502
    error = answer.json()["error"]
    message = error if path.startswith("/api") else error["message"]
    assert "redirects (308) to https://elsewhere.example/v1/chat/completions;" in message
    assert "OPENAI_API_BASE_URL" in message
    assert BACKEND_KEY not in answer.text and "key=" not in answer.text


def test_the_backend_key_echoed_in_a_relayed_header_is_masked(
    odd_backend_proxy: ServerProcess,
) -> None:
    answer = httpx.post(
        odd_backend_proxy.url + "/v1/chat/completions", json={"model": "echo", **CHAT}, timeout=10
    )
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-echo"] == "Bearer ***"
    assert BACKEND_KEY not in str(answer.headers)


def test_a_client_that_stops_reading_frees_its_slot(
    start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    """A client that reads nothing used to hold its request, its slot under
    MAX_CONCURRENT_REQUESTS and its backend connection for ever (no write timeout)."""
    proxy = start_proxy(demo_backend.url, MAX_CONCURRENT_REQUESTS="1", CLIENT_WRITE_TIMEOUT="1")
    host, port = proxy.url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "demo-chat",
            "stream": True,
            "messages": [
                {"role": "user", "content": "[[tokens=200000]][[delay=0]] " + "long " * 200}
            ],
        }
    ).encode()
    sleeper = socket.socket()
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.connect((host, int(port)))
    try:
        sleeper.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(0.5)
        assert (
            httpx.post(
                proxy.url + "/api/chat", json={"model": "demo-chat", **CHAT}, timeout=5
            ).status_code
            == 503
        )  # the one slot is taken
        deadline = time.monotonic() + 20
        status = 503
        while status == 503 and time.monotonic() < deadline:
            time.sleep(0.5)
            status = httpx.post(
                proxy.url + "/api/chat",
                timeout=5,
                json={"model": "demo-chat", "stream": False, **CHAT},
            ).status_code
        assert status == 200, "the slot was freed once the client was taken to be gone"
    finally:
        sleeper.close()


def test_a_request_target_in_absolute_form_is_served_by_its_path(
    guarded_proxy: ServerProcess,
) -> None:
    """RFC 9112 3.2.2: a server accepts ``GET http://host/path``; the host was read as the
    path's first segment (a 404 for ``/host/api/tags``)."""
    host = guarded_proxy.url.removeprefix("http://")
    for target, status in [
        (f"http://{host}/health", b"200"),
        (f"http://{host}/api/chat", b"401"),  # routed, and checked like any request
        (f"http://{host}", b"200"),  # the root
    ]:
        method = "POST" if target.endswith("chat") else "GET"
        request = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
        received = _raw(guarded_proxy.url, request.encode())
        assert received.startswith(b"HTTP/1.1 " + status), (target, received[:200])


def test_a_body_that_stalls_frees_its_slot_after_client_body_timeout(
    start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    """A POST that sent its headers and no body held its slot under
    MAX_CONCURRENT_REQUESTS for the whole body timeout (300 s): enough such sockets and
    every proxy request was a 503. A body that makes no progress for
    CLIENT_BODY_TIMEOUT is a 408, and the slot is free again."""
    proxy = start_proxy(demo_backend.url, MAX_CONCURRENT_REQUESTS="1", CLIENT_BODY_TIMEOUT="1")
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as silent:
        silent.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model":'  # and then nothing
        )
        answer = silent.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"stalled: no bytes for 1 s" in answer
    chat = {"model": "demo-chat", "stream": False, **CHAT}
    assert httpx.post(proxy.url + "/api/chat", json=chat, timeout=5).status_code == 200
    # a review: Quart's routes waited 300 s for a body announced and never sent
    with socket.create_connection((host, int(port)), timeout=10) as silent:
        silent.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        answer = silent.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 5


def test_a_reply_the_client_never_took_is_not_counted_as_served(
    start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    """A whole non-stream reply handed to the server returned normally to the app even when
    the client made no room for it and the write timeout closed the connection: it was
    recorded as a 200. It is a request the client did not take (499), as a stream's is."""
    from .test_metrics_e2e import scrape, total, wait_for

    proxy = start_proxy(
        demo_backend.url, CLIENT_WRITE_TIMEOUT="1", ACCESS_LOG="true", LOG_LEVEL="INFO"
    )
    host, port = proxy.url.removeprefix("http://").split(":")
    body = json.dumps(
        {
            "model": "demo-chat",
            "stream": False,
            "messages": [{"role": "user", "content": "[[tokens=400000]] long"}],
        }
    ).encode()
    sleeper = socket.socket()
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sleeper.connect((host, int(port)))
    try:
        sleeper.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_for(lambda: total(scrape(proxy.url), "http_requests_total") == 1, timeout=20)
    finally:
        sleeper.close()
    samples = scrape(proxy.url)
    assert total(samples, "http_requests_total", endpoint="api_chat", status="499") == 1
    assert total(samples, "http_requests_total", status="200") == 0
    access = [line for line in proxy.log().splitlines() if "POST /api/chat" in line]
    # the 200 that went out, and that its client left (the metrics: 499)
    assert len(access) == 1 and " 200 " in access[0] and "(client left)" in access[0], access


def _raw(url: str, request: bytes, read_for: float = 2.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_for) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


@pytest.fixture(scope="module")
def guarded_proxy(start_proxy: StartProxy, demo_backend: ServerProcess) -> ServerProcess:
    return start_proxy(
        demo_backend.url,
        MAX_REQUEST_BYTES="1000",
        PROXY_API_KEYS="alice:alice-key-0123456789",
        CORS_ORIGINS="https://app.example",
    )


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/api/chat", {"Authorization": "Bearer alice-key-0123456789"}, 413),
        ("/api/show", {"Authorization": "Bearer alice-key-0123456789"}, 413),
        ("/api/chat", {"Authorization": "Bearer wrong"}, 401),
        ("/api/show", {"Authorization": "Bearer wrong"}, 401),
    ],
)
def test_a_reply_before_the_body_was_read_says_the_connection_closes(
    guarded_proxy: ServerProcess, path: str, headers: dict[str, str], status: int
) -> None:
    """The server closes such a connection; without ``Connection: close`` a pooling client
    reused it and found it closed ("Server disconnected without sending a response")."""
    answer = httpx.post(
        guarded_proxy.url + path,
        content=b"x" * 200_000,
        headers={**headers, "Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == status
    assert answer.headers.get("connection") == "close"


def _refused_upload(url: str, size: int) -> socket.socket:
    """A connection whose request declares a body of *size* bytes, over the limit, and
    whose 413 has gone out before any of the body did."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer alice-key-0123456789\r\nContent-Length: %d\r\n\r\n" % size
    )
    time.sleep(0.2)  # the 413 is out, and the server has closed its side
    return sock


def test_a_client_still_sending_a_refused_body_reads_the_answer(
    guarded_proxy: ServerProcess,
) -> None:
    """Node's fetch (ollama-js, the openai SDK for JavaScript) writes the whole body
    before it reads: closed at once, the connection was reset by the body's bytes and the
    client failed on its write ("fetch failed", EPIPE) instead of reading the 413. The
    server closes its sending side and drops what still arrives (patch 15)."""
    size = 8 * 1024 * 1024
    with _refused_upload(guarded_proxy.url, size) as sock:
        sock.sendall(b"x" * size)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 413"), received[:80]
    assert received.endswith(b"}")  # the whole answer, then the end of the connection


def test_a_refused_body_is_not_read_for_ever(guarded_proxy: ServerProcess) -> None:
    """The lingering close is bounded: a client that goes on sending finds the connection
    closed within a few seconds."""
    with _refused_upload(guarded_proxy.url, 1 << 40) as sock:
        deadline = time.monotonic() + 10
        with pytest.raises(OSError):  # EPIPE or a reset, once the server closed
            while time.monotonic() < deadline:
                sock.sendall(b"x" * 65536)
                time.sleep(0.05)
        assert time.monotonic() < deadline - 6


def test_a_request_with_both_lengths_is_refused_and_closed(guarded_proxy: ServerProcess) -> None:
    """Content-Length and Transfer-Encoding together are the shape of request smuggling:
    RFC 9112 lets a server refuse it and forbids keeping the connection."""
    request = (
        b"POST /api/tags HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    received = _raw(guarded_proxy.url, request)
    assert received.startswith(b"HTTP/1.1 400")
    assert received.count(b"HTTP/1.1") == 1  # nothing served after it


def _expecting_continue(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer alice-key-0123456789\r\nContent-Length: {length}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/api/show"])
def test_a_body_over_the_limit_is_refused_without_being_invited(
    guarded_proxy: ServerProcess, path: str
) -> None:
    """RFC 9110 15.2.1: a server that will refuse the body answers ``Expect: 100-continue``
    with the final status, not with an invitation to upload it first."""
    received = _raw(guarded_proxy.url, _expecting_continue(path, 5000), read_for=1.0)
    assert received.startswith(b"HTTP/1.1 413"), received[:80]
    assert b"100 Continue" not in received


def test_a_body_within_the_limit_is_invited_with_100_continue(
    guarded_proxy: ServerProcess,
) -> None:
    body = json.dumps({"model": "demo-chat", "messages": [], "stream": False}).encode()
    host, port = guarded_proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(_expecting_continue("/api/chat", len(body)))
        assert sock.recv(65536).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("path", ["/api//tags", "//api/tags", "/api/tags//"])
def test_repeated_slashes_are_served_not_redirected(
    guarded_proxy: ServerProcess, path: str
) -> None:
    """werkzeug answered "/api//tags" with a 308 to a URL built from the Host header."""
    answer = httpx.get(
        guarded_proxy.url + path,
        headers={"Host": "evil.example", "Authorization": "Bearer alice-key-0123456789"},
        timeout=10,
    )
    assert answer.status_code != 308 and "location" not in answer.headers
    if path != "/api/tags//":
        assert answer.status_code == 200 and "models" in answer.json()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat%2Fcompletions"),
        ("POST", "/v1/chat%2fcompletions"),
        ("POST", "/v1%2fchat/completions"),
        ("POST", "/api%2Fchat"),
        ("GET", "/api/tags%2F"),
        ("GET", "/v1%2Fmodels/demo-chat"),  # an id route's prefix must come as it is
        ("GET", "/v1/models%2Fdemo-chat"),
        ("DELETE", "/v1%2Fresponses/resp_x"),
        ("POST", "/api//chat%2Fx"),  # no werkzeug redirect to the Host header
    ],
)
def test_an_encoded_slash_is_no_path_separator(
    guarded_proxy: ServerProcess, method: str, path: str
) -> None:
    """A front proxy that allows or refuses paths matches them as sent: the proxy served
    "/v1/chat%2Fcompletions" as chat completions, having matched it decoded."""
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.request(
        method,
        guarded_proxy.url + path,
        json=body if method == "POST" else None,
        headers={"Authorization": "Bearer alice-key-0123456789", "Host": "evil.example"},
        timeout=10,
    )
    assert answer.status_code == 404, answer.text
    assert "location" not in answer.headers
    error = answer.json()["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert message == f"no route for {method} {path.replace('//', '/')}"  # as it was sent


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed", "/api/show"])
def test_a_lone_surrogate_in_a_model_name_is_never_a_500(proxy: ServerProcess, path: str) -> None:
    body = b'{"model": "\\ud800", "prompt": "hi", "input": "hi", "messages": []}'
    answer = httpx.post(proxy.url + path, content=body, timeout=10)
    assert answer.status_code < 500, answer.text
    assert "error" in json.loads(answer.content)


def test_every_cors_answer_varies_by_origin(guarded_proxy: ServerProcess) -> None:
    """A shared cache must not hand the answer without CORS headers to the allowed origin."""
    for origin in (None, "https://other.example", "https://app.example"):
        headers = {"Origin": origin} if origin else {}
        answer = httpx.get(guarded_proxy.url + "/health", headers=headers, timeout=10)
        assert answer.headers.get("vary") == "Origin", origin


class _SlowResponsesBackend(BaseHTTPRequestHandler):
    """``GET /v1/responses/{id}?stream=true``: a Responses stream of 100 deltas, one per
    0.1 s (HTTP/1.0: the body ends at the close)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for i in range(100):
                event = {"type": "response.output_text.delta", "delta": f"w{i} "}
                self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass


def test_a_quart_routed_stream_ends_in_band_at_shutdown(start_proxy: StartProxy) -> None:
    """Streams served through Quart (a resumed Responses stream) were cut mid-chunk when
    GRACEFUL_TIMEOUT ran out; like the fast path's, they now end with an error event. Its
    access line has the 200 it got and the 503 the metrics count."""
    with serving(_SlowResponsesBackend) as url:
        proxy = start_proxy(url, GRACEFUL_TIMEOUT="1.5", ACCESS_LOG="true")
        lines: list[str] = []
        problems: list[BaseException] = []

        def read() -> None:
            try:
                with httpx.stream("GET", proxy.url + "/v1/responses/resp_slow?stream=true",
                                  timeout=20) as response:  # fmt: skip
                    lines.extend(line for line in response.iter_lines() if line)
            except httpx.HTTPError as error:
                problems.append(error)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.6)
        proxy.process.send_signal(signal.SIGTERM)
        reader.join(timeout=15)
        assert proxy.process.wait(timeout=15) == 0
        assert not problems, problems
        last = json.loads(lines[-1].removeprefix("data: "))
        assert "shutting down" in json.dumps(last), lines[-2:]
        assert len(lines) < 60  # ended by the shutdown, not by the backend's end
    assert proxy.reader is not None
    proxy.reader.join(timeout=5)
    (access,) = [line for line in proxy.log().splitlines() if "GET /v1/responses/" in line]
    assert " 200 " in access and access.endswith(" (error: 503)"), access


class _HangingModels(ScriptedHandler):
    def do_GET(self) -> None:
        time.sleep(10)  # a model list that does not come


def test_quart_routed_requests_waiting_at_shutdown_get_a_503_in_their_dialect(
    start_proxy: StartProxy,
) -> None:
    """The fast path's requests did; Quart's (the model lists) were cut with an empty 500
    when GRACEFUL_TIMEOUT ran out."""
    with serving(_HangingModels) as url:
        proxy = start_proxy(url, GRACEFUL_TIMEOUT="1.5", READY_CHECK_INTERVAL="600")
        answers: dict[str, httpx.Response] = {}

        def ask(path: str) -> None:
            answers[path] = httpx.get(proxy.url + path, timeout=20)

        askers = [threading.Thread(target=ask, args=(p,)) for p in ("/v1/models", "/api/tags")]
        for asker in askers:
            asker.start()
        time.sleep(0.5)
        proxy.process.send_signal(signal.SIGTERM)
        for asker in askers:
            asker.join(timeout=15)
        assert proxy.process.wait(timeout=15) == 0
    assert answers["/v1/models"].status_code == answers["/api/tags"].status_code == 503
    assert "shutting down" in answers["/v1/models"].json()["error"]["message"]
    assert "shutting down" in answers["/api/tags"].json()["error"]


def _connections_used(url: str, requests: list[tuple[str, str, bytes, dict[str, str]]]) -> int:
    """How many connections one pooled client needed for ``requests`` in turn."""
    streams = set()
    with httpx.Client(limits=httpx.Limits(max_connections=1), timeout=10) as client:
        for method, path, body, headers in requests:
            answer = client.request(method, url + path, content=body, headers=headers)
            streams.add(id(answer.extensions["network_stream"]))
    return len(streams)


def test_a_refused_request_with_a_small_body_keeps_its_connection(
    guarded_proxy: ServerProcess, proxy: ServerProcess
) -> None:
    """A client retrying a 401, 429 or 503 keeps its connection: the refused request's
    small body is read and dropped, so only an unread body closes the connection."""
    wrong = {"Authorization": "Bearer wrong", "Content-Type": "application/json"}
    refused = [("POST", "/api/chat", b'{"model": "demo-chat"}', wrong)] * 5
    assert _connections_used(guarded_proxy.url, refused) == 1
    elsewhere = [("POST", "/v1/nothing", b"x" * 200_000, {}), ("POST", "/api/tags", b"{}", {})]
    assert _connections_used(proxy.url, elsewhere * 3) == 1  # 404 and 405 through Quart


def test_a_websocket_handshake_is_a_400_in_dialect_not_a_500(guarded_proxy: ServerProcess) -> None:
    """An HTTP-surface fuzzing review: hypercorn handed an upgrade to Quart as a websocket,
    whose error handling failed outside a request: a 500 and two tracebacks for anyone,
    without a key. No route speaks WebSocket."""
    upgrade = (
        "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    for path, dialect in (("/api/tags", str), ("/v1/models", dict)):
        answer = _raw(guarded_proxy.url, f"GET {path} HTTP/1.1\r\n{upgrade}".encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert isinstance(json.loads(body)["error"], dialect)
    assert "Traceback" not in guarded_proxy.log()


def test_a_handshake_the_server_refuses_itself_closes_its_connection(
    guarded_proxy: ServerProcess,
) -> None:
    """A review: an invalid WebSocket handshake got hypercorn's bare 400 and its connection
    stayed open for ever (any client could hold sockets so)."""
    host, port = guarded_proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n")  # fmt: skip
        received = b""
        while chunk := sock.recv(65536):  # ends when the server closes: not a timeout
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 "), received


@pytest.mark.parametrize(
    ("path", "dialect"),
    [("/llm/v1/models", dict), ("/llm/api/tags", str), ("/v1/models", str)],  # outside: "/"
)
async def test_a_refused_handshake_speaks_the_dialect_below_the_mount_point(
    path: str, dialect: type
) -> None:
    """A review: under a root_path the dialect was chosen by the path with its mount
    point, so /llm/v1/models was refused in Ollama's words."""
    from trioproxy.app import RefusedWebsocket, create_app
    from trioproxy.config import Settings

    app = create_app(Settings(upstream_url="http://127.0.0.1:1/v1"))
    scope = {"path": path, "root_path": "/llm", "extensions": {"websocket.http.response": {}}}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await RefusedWebsocket(app, scope)(receive, send)  # type: ignore[arg-type]
    start, body = sent
    assert start["status"] == 400
    assert isinstance(json.loads(body["body"])["error"], dialect)


async def test_a_refused_handshake_logs_the_bytes_of_its_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A review: the access line of a refused handshake said ``0 B`` though its 400 body
    went out."""
    from trioproxy.app import RefusedWebsocket, create_app
    from trioproxy.config import Settings

    app = create_app(Settings(upstream_url="http://127.0.0.1:1/v1", access_log=True))
    scope = {"path": "/api/tags", "extensions": {"websocket.http.response": {}}}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "websocket.connect"}

    async def send(message: dict) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO, logger="trioproxy.access"):
        await RefusedWebsocket(app, scope)(receive, send)  # type: ignore[arg-type]
    size = len(sent[1]["body"])
    assert size > 0
    lines = [r.getMessage() for r in caplog.records if r.name == "trioproxy.access"]
    assert lines == [f"- - - 400 0.0 ms {size} B (refused: websocket)"]


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/api/chat", str),  # the fast path
        ("/v1/chat/completions", dict),
        ("/api/show", str),  # served through Quart
        ("/v1/responses", dict),
    ],
)
def test_a_compressed_request_body_is_a_415_that_says_so(
    proxy: ServerProcess, path: str, dialect: type
) -> None:
    """A review: a gzip request body was read as it came and refused as "invalid JSON"
    (a 400 that sent the client looking for a JSON mistake)."""
    body = gzip.compress(json.dumps({"model": "demo-chat", "messages": []}).encode())
    coded = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    with httpx.Client(limits=httpx.Limits(max_connections=1), timeout=10) as client:
        answer = client.post(proxy.url + path, content=body, headers=coded)
        assert answer.status_code == 415, answer.text
        assert answer.headers["accept-encoding"] == "identity"
        error = answer.json()["error"]
        assert isinstance(error, dialect)
        assert "Content-Encoding 'gzip'" in (error if isinstance(error, str) else error["message"])
        # the small refused body was read and dropped: the connection serves the next one
        plain = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
        again = client.post(
            proxy.url + "/api/chat", json=plain, headers={"Content-Encoding": "identity"}
        )
        assert again.status_code == 200, again.text


@pytest.mark.parametrize(
    ("header", "refused"),
    [(None, False), ("", False), ("identity", False), (" Identity ", False),
     ("gzip", True), ("identity, br", True), ("x-anything", True)],
)  # fmt: skip
def test_which_content_encodings_are_refused(header: str | None, refused: bool) -> None:
    from trioproxy.errors import CodedRequestBody

    assert (CodedRequestBody.refusing(header) is not None) is refused


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/api/delete"), ("POST", "/api/copy"), ("POST", "/api/create"),
     ("POST", "/api/push")],
)  # fmt: skip
def test_a_refused_model_management_call_keeps_its_connection(
    proxy: ServerProcess, method: str, path: str
) -> None:
    """A review replaying Open WebUI's and n8n's calls: these 501s were answered before
    their body arrived, and the server then closed the connection without saying so:
    ollama-python's and ollama-js's next request on it failed ("Server disconnected")."""
    host, port = proxy.url.removeprefix("http://").split(":")
    body = b'{"model": "demo-chat:latest", "source": "a", "destination": "b"}'
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        time.sleep(0.05)  # the body after the head, as over a real network
        sock.sendall(body)
        refusal = _one_answer(sock)
        assert refusal.startswith(b"HTTP/1.1 501 "), refusal
        time.sleep(0.05)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # the client's next request
        assert _one_answer(sock).endswith(b"Ollama is running")


def _one_answer(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length from ``sock``; fails if the connection ends."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the connection was closed: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, f"the connection was closed: {received!r}"
        body += chunk
    return head + b"\r\n\r\n" + body
