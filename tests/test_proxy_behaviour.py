"""Proxy behaviour over raw HTTP: framing, request ids, errors in dialect, retries, stream
deadlines, cancellation and model mapping.

Everything runs against real processes: ``python -m trioproxy`` (one per configuration) in
front of the demo backend (its own process). The demo's event log (``GET /_demo/events``) tells
what the backend saw: each entry carries the ``X-Request-ID`` the proxy forwarded, the outcome
(``completed`` / ``disconnected`` / ``error``) and wall-clock ``started`` / ``ended`` stamps that
this process can compare with its own ``time.time()``.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import httpx
import ollama
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trioproxy import translate as tr

from .conftest import ServerProcess, closed_port_url, demo_events_for
from .fakes import QuietHTTPServer, ScriptedHandler, serving

# The issue's target: the backend request is closed within 50 ms of the client leaving. It is
# asserted as is: measured 1-7 ms on 2 shared cores, even under load from other test processes.
# Every measurement is printed (run with -s). Relax CANCEL_BOUND here if a CI host is noisier.
CANCEL_TARGET = 0.05
CANCEL_BOUND = CANCEL_TARGET
CANCEL_LATENCIES: dict[str, float] = {}

StartProxy = Callable[..., ServerProcess]


def rid() -> str:
    return uuid.uuid4().hex


def chat_body(text: str, model: str = "demo-chat", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def ndjson(text: str) -> list[dict[str, Any]]:
    """Parse an NDJSON body strictly: newline-terminated, no blank lines, every line JSON."""
    assert text.endswith("\n"), repr(text[-80:])
    lines = text[:-1].split("\n")
    assert all(line.strip() for line in lines), f"blank NDJSON line in {text!r}"
    return [json.loads(line) for line in lines]


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    events = []
    for block in text.split("\n\n"):
        data = [line[5:].lstrip() for line in block.split("\n") if line.startswith("data:")]
        if data:
            events.append("\n".join(data))
    return events


def content_lines(lines: list[dict[str, Any]]) -> list[str]:
    return [
        line["message"]["content"]
        for line in lines
        if "message" in line and line["message"].get("content")
    ]


def wait_for_events(
    demo_backend: ServerProcess,
    request_id: str,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 5.0,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        events = demo_events_for(demo_backend, request_id)
        if until(events):
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"demo events for {request_id} never matched: {events}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def http(proxy: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        yield client


def assert_ollama_error(response: httpx.Response, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for needle in needles:
        assert needle in body["error"], body
    return body["error"]


def assert_openai_error(response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    error = body["error"]
    assert isinstance(error, dict), body
    assert {"message", "type", "param", "code"} <= set(error), body
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    for needle in needles:
        assert needle in error["message"], body
    return error


# ---- framing and content types -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_ollama_stream_is_ndjson(http: httpx.Client, path: str) -> None:
    body: dict[str, Any] = {"model": "demo-chat"}
    if path == "/api/chat":
        body["messages"] = [{"role": "user", "content": "hi [[tokens=5]]"}]
    else:
        body["prompt"] = "hi [[tokens=5]]"
    response = http.post(path, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert "\r" not in response.text
    lines = ndjson(response.text)
    assert len(lines) == 6  # 5 tokens, then the done line
    assert [line["done"] for line in lines] == [False] * 5 + [True]

    whole = http.post(path, json={**body, "stream": False})
    assert whole.headers["content-type"].startswith("application/json")
    assert whole.json()["done"] is True


def test_openai_stream_is_event_stream(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat_body("hi [[tokens=3]]", stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers.get("cache-control") == "no-cache"
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
        "Hello from the"
    )
    whole = http.post("/v1/chat/completions", json=chat_body("hi [[tokens=3]]"))
    assert whole.headers["content-type"].startswith("application/json")


def test_openai_stream_is_relayed_unbuffered(http: httpx.Client) -> None:
    """The first token reaches the client long before the backend has finished."""
    started = time.monotonic()
    body = chat_body("[[tokens=6]] [[delay=0.3]]", stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content":"Hello"' in line:
                first_token = time.monotonic() - started
                break
        else:
            pytest.fail("no first token")
    assert first_token < 0.6, f"first token after {first_token:.2f}s: the stream was buffered"


# ---- request ids and overhead header -------------------------------------------------------


def test_request_id_echoed_and_forwarded(http: httpx.Client, demo_backend: ServerProcess) -> None:
    mine = "client-id-" + rid()[:8]
    response = http.post(
        "/api/chat", json=chat_body("hi [[tokens=2]]", stream=False), headers={"X-Request-ID": mine}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == mine
    (event,) = demo_events_for(demo_backend, mine)
    assert event["outcome"] == "completed"


@pytest.mark.parametrize(
    "path", ["/", "/api/version", "/api/tags", "/v1/models", "/api/nowhere", "/v1/chat/completions"]
)
def test_request_id_generated(http: httpx.Client, path: str) -> None:
    method = "POST" if path == "/v1/chat/completions" else "GET"
    response = http.request(method, path, content=b"{}" if method == "POST" else None)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"]), response.headers
    # an unusable incoming id (spaces, too long) is replaced, not echoed
    response = http.request(method, path, headers={"X-Request-ID": "bad id " + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    # two of them: the first, on every route alike (a review: the proxy routes took the last)
    twice = [("X-Request-ID", "first-id-1"), ("X-Request-ID", "second-id-2")]
    content = b"{}" if method == "POST" else None
    response = http.request(method, path, headers=twice, content=content)
    assert response.headers["x-request-id"] == "first-id-1"


def test_proxy_overhead_header(http: httpx.Client) -> None:
    for path, body in [
        ("/api/chat", chat_body("hi [[tokens=2]]", stream=False)),
        ("/api/chat", chat_body("hi [[tokens=2]]")),
        ("/v1/chat/completions", chat_body("hi [[tokens=2]]")),
        ("/v1/chat/completions", chat_body("hi [[tokens=2]]", stream=True)),
        ("/api/embed", {"model": "demo-embed", "input": "x"}),
    ]:
        response = http.post(path, json=body)
        assert response.status_code == 200
        overhead = float(response.headers["x-proxy-overhead-ms"])
        assert 0.0 <= overhead < 1000.0, (path, overhead)


def test_a_slow_upload_is_not_the_proxys_overhead(proxy: ServerProcess) -> None:
    """X-Proxy-Overhead-Ms (and trioproxy_overhead_seconds) counted the wait for a body the
    client sent slowly: 6 s of "proxy time" for a 74-byte body sent 12 bytes a second."""
    from .test_metrics_e2e import scrape, total

    def overheads() -> tuple[float, float]:
        """(all observations, those within 250 ms) of /api/chat's overhead histogram"""
        samples = scrape(proxy.url)
        name, chat = "trioproxy_overhead_seconds", {"endpoint": "api_chat"}
        return total(samples, f"{name}_count", **chat), total(
            samples, f"{name}_bucket", le="0.25", **chat
        )

    before = overheads()
    body = json.dumps(chat_body("hi [[tokens=2]]", stream=False)).encode()
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for piece in (body[:10], body[10:20], body[20:]):
            client.sendall(piece)
            time.sleep(0.3)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.1 200"), head
    overhead = float(re.search(r"x-proxy-overhead-ms: ([0-9.]+)", head).group(1))  # type: ignore[union-attr]
    assert overhead < 300, overhead  # the upload took 600 ms
    after = overheads()
    # the histogram too: one more observation, and it is below 250 ms
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1), (before, after)


# ---- liveness routes -----------------------------------------------------------------------


def test_root_and_version(http: httpx.Client) -> None:
    for method in ("GET", "HEAD"):
        root = http.request(method, "/")
        assert root.status_code == 200
        assert root.headers["content-type"].startswith("text/plain")
        if method == "GET":
            assert root.text == "Ollama is running"
        else:
            assert root.content == b""
        version = http.request(method, "/api/version")
        assert version.status_code == 200
        if method == "GET":
            assert re.fullmatch(r"\d+\.\d+\.\d+", version.json()["version"])
    assert http.head("/api/tags").status_code == 200


# ---- client errors, in dialect -------------------------------------------------------------


def test_invalid_json(http: httpx.Client) -> None:
    headers = {"Content-Type": "application/json"}
    for path in ("/api/chat", "/api/generate", "/api/embed", "/api/show"):
        assert_ollama_error(http.post(path, content=b"{not json", headers=headers), 400, "JSON")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        error = assert_openai_error(
            http.post(path, content=b"{not json", headers=headers), 400, "JSON"
        )
        assert error["type"] == "invalid_request_error"
    # not an object, and no body at all
    assert_ollama_error(http.post("/api/chat", content=b"[1, 2]"), 400, "object")
    assert_ollama_error(http.post("/api/chat", content=b""), 400)
    assert_openai_error(http.post("/v1/chat/completions", content=b'"text"'), 400, "object")


def test_bytes_that_are_not_utf8_are_read_as_ollama_reads_them(http: httpx.Client) -> None:
    """Windows PowerShell 5.1 sends a string body as Latin-1; Ollama (Go's decoder) reads
    such bytes as U+FFFD and answers. OpenAI's routes keep refusing them."""
    body = (
        '{"model": "demo-chat", "stream": false, "messages": [{"role": "user", "content": "café"}]}'
    )
    latin1 = body.encode("latin-1")
    answer = http.post("/api/chat", content=latin1, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"]["content"]
    assert_ollama_error(http.post("/api/chat", content=b"{\xe9", headers={}), 400, "JSON")
    assert_openai_error(http.post("/v1/chat/completions", content=latin1), 400, "JSON")


def test_missing_model(http: httpx.Client) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    for body in ({"messages": msgs}, {"model": "", "messages": msgs}):
        assert_ollama_error(http.post("/api/chat", json=body), 400, "model")
        error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400, "model")
        assert error["param"] == "model"
    assert_ollama_error(http.post("/api/generate", json={"prompt": "hi"}), 400, "model")
    assert_ollama_error(http.post("/api/embed", json={"input": "hi"}), 400, "model")
    assert_ollama_error(http.post("/api/show", json={}), 400, "model")
    assert_ollama_error(http.post("/api/show", json={"model": 5}), 400, "must be a string")
    assert_ollama_error(http.post("/api/chat", json={"model": 42, "messages": msgs}), 400, "model")


def test_wrong_field_types(http: httpx.Client) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/api/chat", {"model": "demo-chat", "messages": "hello"}, "messages"),
        ("/api/chat", {"model": "demo-chat", "messages": [42]}, "messages[0]"),
        ("/api/chat", {"model": "demo-chat", "messages": [{"content": "x"}]}, "messages[0].role"),
        ("/api/chat", {**chat_body("x"), "stream": "yes"}, "stream"),
        ("/api/chat", {**chat_body("x"), "options": {"temperature": "hot"}}, "temperature"),
        ("/api/chat", {**chat_body("x"), "options": []}, "options"),
        ("/api/chat", {**chat_body("x"), "tools": {"a": 1}}, "tools"),
        ("/api/generate", {"model": "demo-chat", "prompt": ["a"]}, "prompt"),
        ("/api/generate", {"model": "demo-chat", "prompt": "x", "images": "abc"}, "images"),
        ("/api/embed", {"model": "demo-embed", "input": 5}, "input"),
        ("/api/embed", {"model": "demo-embed", "input": [[1]]}, "input[0]"),
    ]
    for path, body, field in cases:
        assert_ollama_error(http.post(path, json=body), 400, field)
    error = assert_openai_error(
        http.post("/v1/chat/completions", json={**chat_body("x"), "stream": "yes"}), 400, "stream"
    )
    assert error["param"] == "stream"
    # messages of the wrong type on /v1 are caught by the backend; its 400 is relayed as is
    error = assert_openai_error(
        http.post("/v1/chat/completions", json={"model": "demo-chat", "messages": "hello"}), 400
    )
    assert error["param"] == "messages"


@pytest.fixture(scope="module")
def small_body_proxy(start_proxy: StartProxy, demo_backend: ServerProcess) -> ServerProcess:
    return start_proxy(demo_backend.url, MAX_REQUEST_BYTES="1000")


def test_body_too_large(small_body_proxy: ServerProcess) -> None:
    big = chat_body("x" * 2000)
    # A fresh connection each time: see test_early_413_does_not_hang_the_connection.
    with httpx.Client(base_url=small_body_proxy.url, timeout=10) as client:
        assert_ollama_error(client.post("/api/chat", json=big), 413, "1000")
    with httpx.Client(base_url=small_body_proxy.url, timeout=10) as client:
        assert_openai_error(client.post("/v1/chat/completions", json=big), 413, "1000")
    with httpx.Client(base_url=small_body_proxy.url, timeout=10) as client:
        # without a Content-Length (chunked upload) the limit holds as well
        payload = json.dumps(big).encode()
        chunks = [payload[i : i + 500] for i in range(0, len(payload), 500)]
        assert client.post("/api/chat", content=iter(chunks)).status_code == 413
    with httpx.Client(base_url=small_body_proxy.url, timeout=10) as client:
        # under the limit still works
        assert client.post("/api/chat", json=chat_body("hi", stream=False)).status_code == 200


@pytest.mark.parametrize(
    ("which", "path", "status"),
    [
        ("small_body_proxy", "/api/chat", 413),  # the headers announce too large a body
        ("proxy", "/api/push", 501),  # answered without reading the body
        ("proxy", "/api/nowhere", 404),
    ],
)
def test_early_answer_does_not_hang_the_connection(
    request: pytest.FixtureRequest, which: str, path: str, status: int
) -> None:
    """An error can go out before the request body has arrived (413 from the announced
    Content-Length; 404/501 without reading the body). When the body arrives only after that
    (httpx writes headers and body separately, and large bodies take a while), the connection
    must then be served or closed, never left hanging.

    Known failure (reported): hypercorn decides to close the connection, but its
    ``TCPServer._close()`` runs inside the request's already-cancelled scope, ``send_eof()``
    raises ``Cancelled`` and the socket is never closed: the next request on the connection
    waits forever, the file descriptor leaks, and graceful shutdown waits for it. Same family
    as stack notes P1 (a hypercorn_patches.py shield around the ``Closed`` event fixes it).
    """
    server: ServerProcess = request.getfixturevalue(which)
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps(chat_body("x" * 2000)).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        sock.sendall(head)
        first = _read_until(sock, lambda got: b"\r\n\r\n" in got and got.endswith(b"}"))
        assert first.startswith(f"HTTP/1.1 {status}".encode()), first
        time.sleep(0.05)  # the request task has finished with the connection
        sock.sendall(body)  # the body the server did not wait for
        time.sleep(0.05)
        try:
            sock.sendall(head + body)
            sock.settimeout(1)
            answer = sock.recv(65536)  # a response, or b"" for a closed connection
        except (BrokenPipeError, ConnectionResetError):
            answer = b""  # closed: fine, the client reconnects
        except TimeoutError:
            pytest.fail("the connection hangs after an early answer (neither served nor closed)")
    assert answer == b"" or answer.startswith(f"HTTP/1.1 {status}".encode()), answer


def test_unknown_path_and_wrong_method(http: httpx.Client) -> None:
    assert_ollama_error(http.get("/api/nowhere"), 404, "/api/nowhere")
    # requests with a body that is never read go on fresh connections: see
    # test_early_answer_does_not_hang_the_connection
    assert_ollama_error(httpx.post(http.base_url.join("/api/chat/extra"), json={}), 404)
    assert_openai_error(http.get("/v1/nowhere"), 404, "/v1/nowhere")
    assert_openai_error(httpx.post(http.base_url.join("/v1/images/generations"), json={}), 404)
    # /v1/messages is the Anthropic Messages API: its mistakes come in Anthropic's shape
    anthropic = httpx.post(http.base_url.join("/v1/messages"), json={})
    assert anthropic.status_code == 400, anthropic.text
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "invalid_request_error"
    assert_openai_error(http.get("/v1/responses/resp_1"), 404)  # the backend has no such response
    assert_ollama_error(http.get("/api/chat"), 405, "GET")
    assert_ollama_error(http.delete("/api/tags"), 405)
    assert_ollama_error(http.post("/"), 405)
    error = assert_openai_error(http.get("/v1/chat/completions"), 405, "GET")
    assert error["type"] == "invalid_request_error"
    assert "POST" in http.get("/v1/chat/completions").headers.get("allow", "")


def test_model_management_is_501(http: httpx.Client) -> None:
    for method, path in [
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/blobs/sha256:" + "0" * 64),
    ]:
        # a fresh connection each: see test_early_answer_does_not_hang_the_connection
        response = httpx.request(method, http.base_url.join(path), json={"model": "demo-chat"})
        assert_ollama_error(response, 501, "backend manages")
    assert http.head("/api/blobs/sha256:" + "0" * 64).status_code == 501


def test_a_pull_names_its_model_as_ollama_reads_it(http: httpx.Client) -> None:
    """``model``, or the legacy ``name`` ollama-js sends; NDJSON unless ``stream: false``."""
    streamed = http.post("/api/pull", json={"name": "demo-chat"})
    assert streamed.headers["content-type"] == "application/x-ndjson"
    lines = streamed.text.splitlines()
    assert [json.loads(line) for line in lines] == tr.ollama_pull_progress()
    assert streamed.text.endswith("\n") and "" not in lines  # no blank line for the parsers
    whole = http.post("/api/pull", json={"model": "demo-chat", "stream": False})
    assert whole.headers["content-type"] == "application/json" and whole.json() == {
        "status": "success"
    }
    assert_ollama_error(http.post("/api/pull", json={"insecure": True}), 400, "'model'")
    assert_ollama_error(http.post("/api/pull", json={"model": 3}), 400, "'model'")
    refused = http.post("/api/pull", json={"model": "demo-chat", "stream": "yes"})
    assert_ollama_error(refused, 400, "'stream'")
    # null is no value, as to Ollama (a *bool) and its chat: the default, a stream
    defaulted = http.post("/api/pull", json={"model": "demo-chat", "stream": None})
    assert defaulted.status_code == 200, defaulted.text
    assert [json.loads(line) for line in defaulted.text.splitlines()] == tr.ollama_pull_progress()


# ---- backend failures ----------------------------------------------------------------------


def test_backend_unreachable_is_502(start_proxy: StartProxy) -> None:
    dead = start_proxy(closed_port_url(), MAX_RETRIES="1", RETRY_BACKOFF="0.01")
    with httpx.Client(base_url=dead.url, timeout=20) as client:
        for body in (chat_body("hi", stream=False), chat_body("hi")):
            assert_ollama_error(client.post("/api/chat", json=body), 502, "backend")
        assert_ollama_error(client.get("/api/tags"), 502)
        assert_ollama_error(client.post("/api/embed", json={"model": "e", "input": "x"}), 502)
        for stream in (False, True):
            error = assert_openai_error(
                client.post("/v1/chat/completions", json=chat_body("hi", stream=stream)), 502
            )
            assert error["type"] == "server_error"
        assert_openai_error(client.get("/v1/models"), 502)


def test_backend_timeout_is_504(start_proxy: StartProxy, demo_backend: ServerProcess) -> None:
    slow = start_proxy(demo_backend.url, REQUEST_TIMEOUT="0.5", MAX_RETRIES="0")
    with httpx.Client(base_url=slow.url, timeout=20) as client:
        started = time.monotonic()
        response = client.post("/api/chat", json=chat_body("[[first_delay=3]]", stream=False))
        assert_ollama_error(response, 504)
        assert time.monotonic() - started < 2.5
        response = client.post("/v1/chat/completions", json=chat_body("[[first_delay=3]]"))
        assert_openai_error(response, 504)


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500, 503])
def test_backend_status_kept_with_message(proxy_no_retry: ServerProcess, status: int) -> None:
    text = f"[[status={status}]] {rid()}"
    with httpx.Client(base_url=proxy_no_retry.url, timeout=10) as client:
        for stream in (False, True):
            response = client.post("/api/chat", json=chat_body(text, stream=stream))
            assert_ollama_error(response, status, f"simulated HTTP {status}")
            response = client.post("/v1/chat/completions", json=chat_body(text, stream=stream))
            error = assert_openai_error(response, status, f"simulated HTTP {status}")
            assert error["message"].startswith("demo backend:")  # the backend's own body


# ---- retries -------------------------------------------------------------------------------


def test_retry_until_success(http: httpx.Client, demo_backend: ServerProcess) -> None:
    """The session proxy has MAX_RETRIES=2: two 503s, then the third attempt succeeds."""
    for path, body in [
        ("/api/chat", chat_body(f"[[fail_first=2]] [[tokens=3]] {rid()}")),
        ("/v1/chat/completions", chat_body(f"[[fail_first=2]] [[tokens=3]] {rid()}")),
    ]:
        request_id = rid()
        response = http.post(path, json=body, headers={"X-Request-ID": request_id})
        assert response.status_code == 200
        assert response.text.count("Hello") == 1  # one answer, not one per attempt
        events = demo_events_for(demo_backend, request_id)
        assert [e["outcome"] for e in events] == ["error", "error", "completed"]
        assert len({e["body_hash"] for e in events}) == 1  # the same body every time


def test_retries_exhausted(http: httpx.Client, demo_backend: ServerProcess) -> None:
    request_id = rid()
    body = chat_body(f"[[fail_first=5]] {rid()}", stream=False)
    response = http.post("/api/chat", json=body, headers={"X-Request-ID": request_id})
    assert_ollama_error(response, 503, "simulated HTTP 503")
    assert len(demo_events_for(demo_backend, request_id)) == 3


def test_no_retries_when_max_retries_is_0(
    proxy_no_retry: ServerProcess, demo_backend: ServerProcess
) -> None:
    with httpx.Client(base_url=proxy_no_retry.url, timeout=10) as client:
        for path in ("/api/chat", "/v1/chat/completions"):
            request_id = rid()
            body = chat_body(f"[[fail_first=2]] {rid()}", stream=False)
            response = client.post(path, json=body, headers={"X-Request-ID": request_id})
            assert response.status_code == 503
            assert len(demo_events_for(demo_backend, request_id)) == 1


def test_retry_after_is_honoured(start_proxy: StartProxy, demo_backend: ServerProcess) -> None:
    """With RETRY_BACKOFF=1 a 503 waits 0.5-1 s before the retry; a 429 carrying
    ``Retry-After: 0`` is retried at once, so the header, not the backoff, decided."""
    patient = start_proxy(demo_backend.url, MAX_RETRIES="1", RETRY_BACKOFF="1")
    gaps = {}
    with httpx.Client(base_url=patient.url, timeout=20) as client:
        for status in (429, 503):
            request_id = rid()
            text = f"[[fail_first=1]] [[fail_status={status}]] [[tokens=2]] {rid()}"
            response = client.post(
                "/api/chat",
                json=chat_body(text, stream=False),
                headers={"X-Request-ID": request_id},
            )
            assert response.status_code == 200, response.text
            first, second = demo_events_for(demo_backend, request_id)
            assert (first["outcome"], second["outcome"]) == ("error", "completed")
            gaps[status] = second["started"] - first["ended"]
    assert gaps[429] < 0.3, gaps
    assert gaps[503] >= 0.45, gaps


def test_429_passed_through_with_retry_after(proxy_no_retry: ServerProcess) -> None:
    with httpx.Client(base_url=proxy_no_retry.url, timeout=10) as client:
        for path in ("/api/chat", "/v1/chat/completions"):
            response = client.post(path, json=chat_body(f"[[status=429]] {rid()}", stream=False))
            assert response.status_code == 429
            assert response.headers.get("retry-after") == "0"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_retries_by_itself_gets_the_failure_at_once(
    proxy: ServerProcess, demo_backend: ServerProcess, stream: bool
) -> None:
    """The openai SDKs retry by themselves and say so (x-stainless-retry-count): the
    proxy's retries (MAX_RETRIES=2 here) multiplied with theirs, 2 SDK attempts were 6
    backend calls, and its waits counted against the SDK's timeout. Such a client gets the
    backend's failure at once: one backend call per attempt it makes."""
    request_id = rid()
    text = f"[[fail_first=5]] [[fail_status=429]] {rid()}"
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=1) as client:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(  # a stream's failure is its status, too
                model="demo-chat",
                messages=[{"role": "user", "content": text}],
                stream=stream,
                extra_headers={"X-Request-ID": request_id},
            )
    assert [e["outcome"] for e in demo_events_for(demo_backend, request_id)] == ["error"] * 2


def test_retry_after_ms_is_read_before_retry_after() -> None:
    """The openai SDK prefers retry-after-ms (finer); so does the proxy's own retry."""
    from trioproxy.upstream import _retry_after_seconds

    assert _retry_after_seconds(httpx.Headers({"retry-after-ms": "300"})) == 0.3
    both = httpx.Headers({"retry-after-ms": "250", "retry-after": "2"})
    assert _retry_after_seconds(both) == 0.25
    assert _retry_after_seconds(httpx.Headers({"retry-after": "2"})) == 2.0
    malformed = httpx.Headers({"retry-after-ms": "soon", "retry-after": "1"})
    assert _retry_after_seconds(malformed) == 1.0
    assert _retry_after_seconds(httpx.Headers({"retry-after-ms": "-5"})) == 0.0
    assert _retry_after_seconds(httpx.Headers({})) is None


class _OverlongBackend(ScriptedHandler):
    """Answers a chat with a whole completion, then ten bytes more on the same connection."""

    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.seen.append(self.json_body()["messages"][-1]["content"])
        completion = {
            "id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi"}}],
        }  # fmt: skip
        self.answer(200, json.dumps(completion).encode())
        self.wfile.write(b"0123456789")  # past its Content-Length


def test_a_backend_connection_with_bytes_past_its_response_is_not_reused(
    start_proxy: StartProxy,
) -> None:
    """h11 took the extra bytes for the start of the next response: the next request on
    that pooled connection failed on them as its status line, was retried as a stale
    connection, and so ran twice on the backend (or was a 502 without retries)."""
    with serving(_OverlongBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="3", UPSTREAM_CLIENTS="1")
        for n in range(3):
            answer = httpx.post(
                proxy.url + "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": f"q{n}"}]},
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
    assert _OverlongBackend.seen == ["q0", "q1", "q2"]  # each once


_COMPLETION_BYTES = json.dumps({
    "id": "c", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hi"}}],
}).encode()  # fmt: skip


def _read_request(conn: socket.socket) -> str | None:
    """One whole request (head and Content-Length body) off ``conn``: its method; None at
    EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    declared = re.search(rb"(?i)content-length: *(\d+)", head)
    while declared and len(body) < int(declared.group(1)):
        body += conn.recv(65536)
    return head.split(b" ", 1)[0].decode()


def _raw_backend(serve: Callable[[socket.socket, list[str]], None]) -> tuple[str, list[str], Any]:
    """A backend on a raw socket, one thread per connection: ``serve(conn, log)`` for a
    chat (a POST); anything else (the readiness check's model list) gets a 404."""
    listener = socket.create_server(("127.0.0.1", 0))
    log: list[str] = []

    def connection(conn: socket.socket) -> None:
        with conn:
            method = _read_request(conn)
            if method == "POST":
                serve(conn, log)
            elif method is not None:
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=connection, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/v1", log, listener


def _answers_once_then_closes(conn: socket.socket, log: list[str]) -> None:
    """Answers the connection's first chat and keeps it; the next request on it finds the
    connection closed (the backend's idle close crossing it)."""
    log.append("answered")
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(_COMPLETION_BYTES))
    conn.sendall(_COMPLETION_BYTES)
    if _read_request(conn):
        log.append("dropped")


def _resets_after_working(conn: socket.socket, log: list[str]) -> None:
    """Takes the chat, works on it, then resets the connection without an answer."""
    log.append("worked")
    time.sleep(0.3)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def test_only_a_reused_connection_that_breaks_at_once_is_retried(
    start_proxy: StartProxy,
) -> None:
    """A pooled connection the backend closed is retried (the request never reached it),
    but a backend that took the request and broke off after working on it is not asked
    again: the generation (or a background response) would run twice."""
    url, log, listener = _raw_backend(_answers_once_then_closes)
    try:
        proxy = start_proxy(url, MAX_RETRIES="3", UPSTREAM_CLIENTS="1", RETRY_BACKOFF="0.01")
        body = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
        for _ in range(2):
            answer = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
            assert answer.status_code == 200, answer.text
        assert log == ["answered", "dropped", "answered"]
    finally:
        listener.close()
    url, log, listener = _raw_backend(_resets_after_working)
    try:
        proxy = start_proxy(url, MAX_RETRIES="3", RETRY_BACKOFF="0.01")
        answer = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=10)
        assert answer.status_code == 502, answer.text
        assert log == ["worked"]
    finally:
        listener.close()


_CHAT_HI = {"messages": [{"role": "user", "content": "hi"}]}


class _NoModelListBackend(ScriptedHandler):
    """No /models route (an Azure deployment URL, say); answers every chat."""

    lists: ClassVar[int] = 0

    def do_GET(self) -> None:
        type(self).lists += 1
        self.answer(404, b'{"error": {"message": "Not Found"}}')

    def do_POST(self) -> None:
        model = self.json_body()["model"]
        completion = {
            "id": "c", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": model}}],
        }  # fmt: skip
        self.answer(200, json.dumps(completion).encode())


def test_a_backend_without_a_model_list_is_not_asked_for_one_per_request(
    start_proxy: StartProxy,
) -> None:
    """Whether to keep a name's ``:latest`` depends on the backend's list; a backend that
    has none was asked for it again by every such request (after the 1 s failure cache),
    with its retries, before the request itself."""
    with serving(_NoModelListBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        asked: list[int] = []
        for _ in range(3):
            answer = httpx.post(
                proxy.url + "/api/chat",
                json={"model": "llama3:latest", "stream": False, **_CHAT_HI},
                timeout=10,
            )
            assert answer.json()["message"]["content"] == "llama3"  # the tag dropped
            asked.append(_NoModelListBackend.lists)  # readiness asks too, before the first
            time.sleep(1.2)
    assert asked[0] >= 1 and asked[2] == asked[0]


class _SlowModelListBackend(_NoModelListBackend):
    """Lists its one model after 5 s; answers every chat at once."""

    def do_GET(self) -> None:
        time.sleep(5)
        self.answer(200, b'{"object": "list", "data": [{"id": "m", "object": "model"}]}')


def test_a_slow_model_list_holds_no_request(start_proxy: StartProxy) -> None:
    """A review: looking every name up in the backend's list (Ollama's case rule) made
    the first requests wait for ``/models`` (up to REQUEST_TIMEOUT), again every 10 s. A
    request reads the list only as it was last fetched, never waits for one."""
    with serving(_SlowModelListBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        started = time.monotonic()
        for path in ("/v1/chat/completions", "/api/chat"):
            for model in ("m", "M"):  # a spelling the list would resolve: not waited for
                body = {"model": model, "stream": False, **_CHAT_HI}
                answer = httpx.post(proxy.url + path, json=body, timeout=20)
                assert answer.status_code == 200, answer.text
        assert time.monotonic() - started < 4  # one /models answer takes 5
        # NAME:latest waits a moment for the list (is the tag part of the backend's name?),
        # not for the whole of it; a later one not at all, for a while
        started = time.monotonic()
        for _ in range(3):
            body = {"model": "m:latest", "stream": False, **_CHAT_HI}
            answer = httpx.post(proxy.url + "/api/chat", json=body, timeout=20)
            assert answer.status_code == 200 and answer.json()["message"]["content"] == "m"
        assert time.monotonic() - started < 4.5  # one wait of LIST_WAIT_SECONDS (2 s)


class _CaseSiblingsBackend(_NoModelListBackend):
    """Lists two ids that differ in case only, each with its tag, as vLLM serving
    ``--served-model-name Foo:latest foo:latest`` does."""

    def do_GET(self) -> None:
        data = [{"id": "Foo:latest", "object": "model"}, {"id": "foo:latest", "object": "model"}]
        self.answer(200, json.dumps({"object": "list", "data": data}).encode())


def test_ids_that_differ_in_case_only_are_found_as_spelled_on_every_route(
    start_proxy: StartProxy,
) -> None:
    """A review: /api/show, the load answers and /v1/models/{id} looked ``foo:latest`` up
    without its tag (the mapping's backend name) and, the two ids sharing a case-blind
    key, found neither: 404s where a chat for the same name was a 200."""
    with serving(_CaseSiblingsBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for name in ("foo:latest", "foo", "Foo:latest", "Foo"):
                show = client.post("/api/show", json={"model": name})
                assert show.status_code == 200, (name, show.text)
                load = client.post("/api/chat", json={"model": name})
                assert load.json()["done_reason"] == "load", (name, load.text)
                chat = client.post("/api/chat", json={"model": name, "stream": False, **_CHAT_HI})
                assert chat.json()["message"]["content"] == f"{name.partition(':')[0]}:latest"
                assert client.get(f"/v1/models/{name}").status_code == 200, name
            for name in ("FOO", "library/FOO:latest"):  # either could be meant: the backend's 404
                assert client.post("/api/show", json={"model": name}).status_code == 404


class _ListingBackend(_NoModelListBackend):
    """Answers GET /models with ``listing`` (after ``delay`` s), counting the requests."""

    listing: ClassVar[bytes] = b"{}"
    delay: ClassVar[float] = 0.0
    status: ClassVar[int] = 200
    asked: ClassVar[int] = 0

    def do_GET(self) -> None:
        type(self).asked += 1
        time.sleep(self.delay)
        self.answer(self.status, self.listing)


def _listing(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"object": "list", "data": list(entries)}).encode()


def test_a_model_list_that_is_no_list_is_no_500(start_proxy: StartProxy) -> None:
    """A review: ``{"data": 5}`` made every NAME:latest request (and /api/tags) a 500."""
    _ListingBackend.listing, _ListingBackend.delay = b'{"object": "list", "data": 5}', 0.0
    with serving(_ListingBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        body = {"model": "m:latest", "stream": False, **_CHAT_HI}
        answer = httpx.post(proxy.url + "/api/chat", json=body, timeout=10)
        assert answer.status_code == 200 and answer.json()["message"]["content"] == "m"
        assert httpx.get(proxy.url + "/api/tags", timeout=10).json() == {"models": []}


def test_requests_queued_for_a_hanging_list_do_not_each_ask_for_it(
    start_proxy: StartProxy,
) -> None:
    """A review: NAME:latest requests that queued behind a fetch of a hanging /models
    each fetched it again once the one before gave up (LIST_WAIT_SECONDS)."""
    _ListingBackend.listing, _ListingBackend.delay = _listing({"id": "m"}), 8.0
    with serving(_ListingBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0", READY_CHECK_INTERVAL="600")
        time.sleep(0.5)  # the start-up readiness check has asked already
        before = _ListingBackend.asked
        body = {"model": "m:latest", "stream": False, **_CHAT_HI}

        def chat() -> None:
            answer = httpx.post(proxy.url + "/api/chat", json=body, timeout=20)
            assert answer.json()["message"]["content"] == "m"

        threads = [threading.Thread(target=chat) for _ in range(4)]
        for thread in threads:
            thread.start()
            time.sleep(0.2)
        for thread in threads:
            thread.join()
        assert _ListingBackend.asked - before == 1


def test_every_route_means_one_entry_when_a_name_is_listed_with_and_without_its_tag(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    """A review: with ``foo`` and ``foo:latest`` both listed, chats for ``foo:latest``
    went to ``foo:latest`` while /api/show and /v1/models/{id} described ``foo``. And
    aliases of a mapping whose target the backend lists in another case lost their own
    labels (counted as the listed id)."""
    _ListingBackend.delay = 0.0
    _ListingBackend.listing = _listing(
        {"id": "foo", "object": "model", "max_model_len": 4096},
        {"id": "foo:latest", "object": "model", "max_model_len": 32768},
        {"id": "bar", "object": "model"},
        {"id": "Qux", "object": "model"},
    )
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"a": "Bar", "b": "Bar", "c": "Qux"}))
    with serving(_ListingBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0", MODEL_MAPPING_FILE=str(mapping))
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            chat = client.post(
                "/api/chat", json={"model": "foo:latest", "stream": False, **_CHAT_HI}
            )
            assert chat.json()["message"]["content"] == "foo:latest"
            show = client.post("/api/show", json={"model": "foo:latest"}).json()
            assert 32768 in show["model_info"].values(), show
            assert client.get("/v1/models/foo:latest").json()["max_model_len"] == 32768
            for alias in ("a", "b"):
                body = {"model": alias, "stream": False, **_CHAT_HI}
                assert client.post("/api/chat", json=body).json()["message"]["content"] == "bar"
            labels = client.get("/metrics").text
            assert 'model="a"' in labels and 'model="b"' in labels
            assert 'model="bar"' not in labels
            # the mapping's target spelled by a client is no alias: counted as listed,
            # however it is spelled (not under the alias the mapping gives that id)
            for spelling in ("Bar", "bar", "BAR:latest"):
                body = {"model": spelling, "stream": False, **_CHAT_HI}
                assert client.post("/api/chat", json=body).json()["message"]["content"] == "bar"
            labels = client.get("/metrics").text
            body = {"model": "qux", "stream": False, **_CHAT_HI}  # an id the mapping names
            assert client.post("/api/chat", json=body).json()["message"]["content"] == "Qux"
            labels = client.get("/metrics").text
    assert 'model="bar"' in labels and 'model="Bar"' not in labels
    assert 'model="BAR' not in labels
    assert 'model="Qux"' in labels and 'model="c"' not in labels  # not the alias's
    assert re.search(r'model="a",status="200"\} 1\.0', labels), labels  # the alias's own


def test_names_follow_the_list_from_the_first_request_in_every_worker(
    start_proxy: StartProxy,
) -> None:
    """Ollama's name rules read the list last fetched, and nothing had fetched one before
    a client asked for it (/api/tags, /api/show): until then, and always in a worker that
    served no such request, ``foo`` went to the backend as spelled (a 404 from a backend
    listing ``Foo``). The readiness check asks each worker's backend for /models as it
    starts; the list it answers is kept."""
    _ListingBackend.listing = _listing({"id": "Foo", "object": "model"})
    _ListingBackend.status, _ListingBackend.delay, _ListingBackend.asked = 200, 0.0, 0
    with serving(_ListingBackend) as url:
        proxy = start_proxy(url, "--workers", "2", MAX_RETRIES="0")
        deadline = time.monotonic() + 10
        while _ListingBackend.asked < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # each worker's start-up check
        assert _ListingBackend.asked == 2
        time.sleep(0.3)  # their answers read
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for _ in range(6):  # new connections: both workers serve some
                for path, model in (("/api/chat", "foo"), ("/v1/chat/completions", "FOO")):
                    body = {"model": model, "stream": False, **_CHAT_HI}
                    answer = httpx.post(proxy.url + path, json=body, timeout=10)
                    assert "Foo" in answer.text, answer.text
            labels = client.get("/metrics").text
    assert _ListingBackend.asked == 2  # no request fetched it again
    assert 'model="Foo"' in labels and 'model="foo"' not in labels and 'model="FOO"' not in labels


def test_show_names_the_id_requests_use_when_the_list_goes_missing(
    start_proxy: StartProxy,
) -> None:
    """A review: once /models answered 404 after a list had been fetched, /api/show
    described ``x`` while requests for ``x`` went to the listed ``x:latest``."""
    _ListingBackend.listing = _listing({"id": "x:latest", "object": "model"})
    _ListingBackend.status, _ListingBackend.delay = 200, 0.0
    try:
        with serving(_ListingBackend) as url:
            proxy = start_proxy(url, MAX_RETRIES="0")
            with httpx.Client(base_url=proxy.url, timeout=10) as client:
                assert client.get("/api/tags").status_code == 200
                _ListingBackend.status = 404
                time.sleep(5.2)  # past the list's 5 s cache
                body = {"model": "x", "stream": False, **_CHAT_HI}
                assert client.post("/api/chat", json=body).json()["message"]["content"] == (
                    "x:latest"
                )
                show = client.post("/api/show", json={"model": "x"}).json()
        assert "FROM x:latest" in show["modelfile"], show
    finally:
        _ListingBackend.status = 200


def test_a_failing_or_hanging_list_is_asked_for_once_per_while(start_proxy: StartProxy) -> None:
    """A review: with /models answering 500 every NAME:latest request asked for it again;
    with /models hanging, /v1/models/m:latest waited LIST_WAIT_SECONDS, then fetched the
    list a second time (5 s where one fetch takes 3)."""
    _ListingBackend.listing, _ListingBackend.delay = _listing({"id": "m"}), 0.0
    _ListingBackend.status = 500
    try:
        with serving(_ListingBackend) as url:
            proxy = start_proxy(url, MAX_RETRIES="0", READY_CHECK_INTERVAL="600")
            time.sleep(0.5)  # the start-up readiness check has asked already
            before = _ListingBackend.asked
            body = {"model": "m:latest", "stream": False, **_CHAT_HI}
            for _ in range(4):
                answer = httpx.post(proxy.url + "/api/chat", json=body, timeout=10)
                assert answer.json()["message"]["content"] == "m"
            assert _ListingBackend.asked - before == 1
        _ListingBackend.status, _ListingBackend.delay = 200, 6.0
        with serving(_ListingBackend) as url:
            proxy = start_proxy(url, REQUEST_TIMEOUT="3", READY_CHECK_INTERVAL="600")
            time.sleep(0.5)
            before = _ListingBackend.asked
            started = time.monotonic()
            answer = httpx.get(proxy.url + "/v1/models/m:latest", timeout=20)
            assert answer.status_code == 504
            assert time.monotonic() - started < 4.5
            assert _ListingBackend.asked - before == 1
    finally:
        _ListingBackend.status, _ListingBackend.delay = 200, 0.0


class _CorruptGzipBackend(ScriptedHandler):
    def do_POST(self) -> None:
        self.json_body()
        self.answer(200, b"\x1f\x8b\x08\x00not gzip at all", headers={"Content-Encoding": "gzip"})


def test_a_body_that_cannot_be_read_counts_as_a_protocol_failure(
    start_proxy: StartProxy,
) -> None:
    """A cut or unreadable body is a broken answer (``protocol``) for a stream; the same
    failure of a non-stream reply was counted as ``other``."""
    from .test_metrics_e2e import scrape, total, wait_for

    with serving(_CorruptGzipBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for path in ("/v1/chat/completions", "/api/chat"):
            answer = httpx.post(proxy.url + path, json={**body, "stream": False}, timeout=10)
            assert answer.status_code == 502, answer.text

        def protocol() -> float:
            return total(scrape(proxy.url), "trioproxy_upstream_errors_total", reason="protocol")

        wait_for(lambda: protocol() == 2)
        assert total(scrape(proxy.url), "trioproxy_upstream_errors_total", reason="other") == 0


def test_a_reply_that_breaks_off_mid_body_is_never_replayed(
    http: httpx.Client, demo_backend: ServerProcess
) -> None:
    """A non-stream reply cut off after its headers: the backend did the work, so the
    proxy answers 502 instead of asking again (MAX_RETRIES=2 here)."""
    for path in ("/v1/chat/completions", "/api/chat"):
        request_id = rid()
        response = http.post(
            path,
            json=chat_body(f"[[tokens=200]] [[drop_after=150]] {rid()}", stream=False),
            headers={"X-Request-ID": request_id},
        )
        assert response.status_code == 502, response.text
        assert len(demo_events_for(demo_backend, request_id)) == 1


def test_a_stream_that_breaks_before_its_first_line_gets_a_real_status(
    http: httpx.Client, demo_backend: ServerProcess
) -> None:
    """The backend hangs up after its role chunk: an Ollama client has received nothing yet
    (the role chunk makes no line), so it gets a 502 in its dialect, not 200 and one line;
    the backend saw one request."""
    request_id = rid()
    response = http.post(
        "/api/chat",
        json=chat_body(f"[[drop_after=0]] {rid()}"),
        headers={"X-Request-ID": request_id},
    )
    assert_ollama_error(response, 502, "broke")
    assert len(demo_events_for(demo_backend, request_id)) == 1


def test_broken_stream_is_never_replayed(http: httpx.Client, demo_backend: ServerProcess) -> None:
    """A backend stream that breaks after 3 tokens: the client gets exactly those 3 tokens and
    one error line; the backend saw ONE request although the proxy may retry (MAX_RETRIES=2)."""
    request_id = rid()
    response = http.post(
        "/api/chat",
        json=chat_body(f"[[drop_after=3]] {rid()}"),
        headers={"X-Request-ID": request_id},
    )
    assert response.status_code == 200
    lines = ndjson(response.text)
    assert content_lines(lines) == ["Hello", " from", " the"]
    assert len(lines) == 4
    assert set(lines[-1]) == {"error"} and "mid-stream" in lines[-1]["error"]
    assert not any(line.get("done") for line in lines)
    assert len(demo_events_for(demo_backend, request_id)) == 1

    request_id = rid()
    response = http.post(
        "/v1/chat/completions",
        json=chat_body(f"[[drop_after=3]] {rid()}", stream=True),
        headers={"X-Request-ID": request_id},
    )
    events = sse_events(response.text)
    assert "[DONE]" not in events
    chunks = [json.loads(e) for e in events]
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[:-1]]
    assert [d for d in deltas if d] == ["Hello", " from", " the"]
    error = chunks[-1]["error"]
    assert "mid-stream" in error["message"] and {"type", "param", "code"} <= set(error)
    assert len(demo_events_for(demo_backend, request_id)) == 1


# ---- stream deadlines ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_proxy(start_proxy: StartProxy, demo_backend: ServerProcess) -> ServerProcess:
    return start_proxy(demo_backend.url, STREAM_IDLE_TIMEOUT="0.5")


@pytest.fixture(scope="module")
def first_token_proxy(start_proxy: StartProxy, demo_backend: ServerProcess) -> ServerProcess:
    return start_proxy(demo_backend.url, STREAM_FIRST_TOKEN_TIMEOUT="0.5")


def test_idle_timeout_ollama(idle_proxy: ServerProcess, demo_backend: ServerProcess) -> None:
    request_id = rid()
    started = time.monotonic()
    response = httpx.post(
        idle_proxy.url + "/api/chat",
        json=chat_body(f"[[stall_after=2]] {rid()}"),
        headers={"X-Request-ID": request_id},
        timeout=10,
    )
    elapsed = time.monotonic() - started
    lines = ndjson(response.text)
    assert content_lines(lines) == ["Hello", " from"]
    assert len(lines) == 3
    assert set(lines[-1]) == {"error"}
    assert "STREAM_IDLE_TIMEOUT" in lines[-1]["error"]
    assert 0.4 < elapsed < 3.0
    # the stalled backend request was closed, not left hanging
    (event,) = wait_for_events(demo_backend, request_id, lambda ev: ev and ev[0]["ended"])
    assert event["outcome"] == "disconnected"


def test_idle_timeout_openai(idle_proxy: ServerProcess) -> None:
    response = httpx.post(
        idle_proxy.url + "/v1/chat/completions",
        json=chat_body(f"[[stall_after=2]] {rid()}", stream=True),
        timeout=10,
    )
    events = sse_events(response.text)
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert "STREAM_IDLE_TIMEOUT" in error["message"]
    assert error["code"] == "stream_timeout"
    contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
    assert [c for c in contents if c] == ["Hello", " from"]


def test_idle_timeout_is_per_gap_not_total(idle_proxy: ServerProcess) -> None:
    """1.2 s of generation with 0.2 s gaps under a 0.5 s idle timeout completes."""
    response = httpx.post(
        idle_proxy.url + "/api/chat",
        json=chat_body(f"[[tokens=6]] [[delay=0.2]] {rid()}"),
        timeout=10,
    )
    lines = ndjson(response.text)
    assert lines[-1]["done"] is True and len(content_lines(lines)) == 6


def test_first_token_timeout(first_token_proxy: ServerProcess) -> None:
    """Nothing was sent yet when the deadline passes: a real 504 in the caller's dialect
    (the reference: before the first byte, a status; after it, an in-band line)."""
    started = time.monotonic()
    response = httpx.post(
        first_token_proxy.url + "/api/chat",
        json=chat_body(f"[[first_delay=3]] {rid()}"),
        timeout=10,
    )
    assert time.monotonic() - started < 2.5
    message = assert_ollama_error(response, 504, "STREAM_FIRST_TOKEN_TIMEOUT")
    assert message

    # /v1 relays the backend's bytes as they come: its role chunk went out already, so
    # the deadline ends the stream in band
    response = httpx.post(
        first_token_proxy.url + "/v1/chat/completions",
        json=chat_body(f"[[first_delay=3]] {rid()}", stream=True),
        timeout=10,
    )
    assert response.status_code == 200
    error = json.loads(sse_events(response.text)[-1])["error"]
    assert "STREAM_FIRST_TOKEN_TIMEOUT" in error["message"]
    assert error["code"] == "stream_timeout"

    # a reply that starts in time is not affected
    ok = httpx.post(
        first_token_proxy.url + "/api/chat",
        json=chat_body(f"[[first_delay=0.1]] [[tokens=3]] [[delay=0.25]] {rid()}"),
        timeout=10,
    )
    assert ndjson(ok.text)[-1]["done"] is True


def test_legacy_completion_streams_are_bounded_by_the_idle_gap_not_the_first_token(
    first_token_proxy: ServerProcess,
) -> None:
    """A /v1/completions stream carries its tokens as ``choices[0].text``: once they flow,
    the first-token deadline (0.5 s here) must not end it (1.2 s of tokens)."""
    response = httpx.post(
        first_token_proxy.url + "/v1/completions",
        json={
            "model": "demo-chat",
            "prompt": f"[[tokens=6]] [[delay=0.2]] {rid()}",
            "stream": True,
        },
        timeout=10,
    )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]", events[-2:]
    texts = [json.loads(e)["choices"][0].get("text") for e in events[:-1]]
    assert len([t for t in texts if t]) == 6


# ---- cancellation --------------------------------------------------------------------------


def _raw_request(url: str, path: str, body: dict[str, Any], request_id: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nX-Request-ID: {request_id}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def _read_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    received = b""
    while not done(received):
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed early: {received!r}")
        received += data
    return received


CANCEL_CASES = {
    # (a) the backend has not produced a token yet (streaming request)
    "before-first-token": ("[[first_delay=5]]", True),
    # (b) mid-stream: 1000 tokens at 10 ms, the client leaves after a few
    "mid-stream": ("[[tokens=1000]] [[delay=0.01]]", True),
    # (c) a non-streaming request waiting for its whole answer
    "non-stream-waiting": ("[[first_delay=5]]", False),
}


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("case", list(CANCEL_CASES))
def test_client_disconnect_cancels_backend_request(
    proxy: ServerProcess, demo_backend: ServerProcess, case: str, path: str
) -> None:
    directives, stream = CANCEL_CASES[case]
    request_id = rid()
    sock = _raw_request(
        proxy.url, path, chat_body(f"{directives} {rid()}", stream=stream), request_id
    )
    try:
        if case == "mid-stream":
            # a few tokens have reached the client through the proxy
            _read_until(sock, lambda got: got.count(b'"content":" ') >= 3)
        else:
            # the backend has the request and is sitting on it
            wait_for_events(demo_backend, request_id, lambda ev: bool(ev))
            if stream and path.startswith("/v1/"):
                # the role chunk came before any token: the proxy has sent its headers. An
                # Ollama stream's headers come with its first line, the first token: waiting
                # for them would wait out the case, and the stream could end meanwhile
                _read_until(sock, lambda got: b"\r\n\r\n" in got)
            time.sleep(0.05)
        (event,) = demo_events_for(demo_backend, request_id)
        assert event["outcome"] is None, event  # still in flight
    finally:
        closed_at = time.time()
        sock.close()
    (event,) = wait_for_events(demo_backend, request_id, lambda ev: ev[0]["ended"] is not None)
    latency = event["ended"] - closed_at
    CANCEL_LATENCIES[f"{case} {path}"] = latency
    print(f"\ncancellation {case} {path}: backend closed {latency * 1000:.1f} ms after client")
    assert event["outcome"] == "disconnected", event
    assert latency < CANCEL_BOUND, f"{latency * 1000:.1f} ms (target {CANCEL_TARGET * 1000} ms)"


def test_cancellation_latencies_summary() -> None:
    """Prints the measured latencies (the assertion per case is above)."""
    if not CANCEL_LATENCIES:
        pytest.skip("run together with test_client_disconnect_cancels_backend_request")
    for name, value in sorted(CANCEL_LATENCIES.items()):
        flag = "" if value < CANCEL_TARGET else "  (over the 50 ms target)"
        print(f"cancellation {name}: {value * 1000:.1f} ms{flag}")


def test_disconnect_with_httpx_stream_closes_backend(
    http: httpx.Client, demo_backend: ServerProcess
) -> None:
    """The same through a normal client library: leave a stream early, the backend stops."""
    request_id = rid()
    body = chat_body(f"[[tokens=1000]] [[delay=0.01]] {rid()}")
    with httpx.Client(base_url=http.base_url, timeout=10) as own:
        with own.stream("POST", "/api/chat", json=body, headers={"X-Request-ID": request_id}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                assert json.loads(next(lines))["done"] is False
    (event,) = wait_for_events(demo_backend, request_id, lambda ev: ev[0]["ended"] is not None)
    assert event["outcome"] == "disconnected"
    assert event["tokens_sent"] < 200


# ---- model mapping -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["flat", "nested"])
def mapped_proxy(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    start_proxy: StartProxy,
    demo_backend: ServerProcess,
) -> ServerProcess:
    mapping = {"llama3": "demo-chat", "nomic-embed-text": "demo-embed", "org/chat": "demo-chat"}
    doc: dict[str, Any] = mapping
    if request.param == "nested":
        doc = {"model_mappings": mapping, "default_model": "llama3"}
    path: Path = tmp_path_factory.mktemp("mapping") / f"{request.param}.json"
    path.write_text(json.dumps(doc))
    return start_proxy(demo_backend.url, MODEL_MAPPING_FILE=str(path))


def test_a_model_id_with_a_slash_is_found_as_the_openai_sdk_spells_it(
    mapped_proxy: ServerProcess,
) -> None:
    """OpenRouter's and vLLM's ids hold a "/" ("meta-llama/Llama-3.1-8B"); the SDK sends
    it encoded ("/v1/models/org%2Fchat"), and the proxy matches other paths as sent."""
    client = openai.OpenAI(base_url=mapped_proxy.url + "/v1", api_key="x", max_retries=0)
    assert client.models.retrieve("org/chat").id == "org/chat"
    raw = httpx.get(mapped_proxy.url + "/v1/models/org/chat", timeout=10)  # as curl sends it
    assert raw.status_code == 200 and raw.json()["id"] == "org/chat"


def test_mapping_ollama_api(mapped_proxy: ServerProcess, demo_backend: ServerProcess) -> None:
    with httpx.Client(base_url=mapped_proxy.url, timeout=10) as client:
        request_id = rid()
        body = chat_body("hi [[tokens=3]]", model="llama3", stream=False)
        reply = client.post("/api/chat", json=body, headers={"X-Request-ID": request_id})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "llama3"
        assert reply.json()["message"]["content"] == "Hello from the"
        (event,) = demo_events_for(demo_backend, request_id)
        assert event["model"] == "demo-chat"  # the backend got its own name

        lines = ndjson(client.post("/api/chat", json=chat_body("hi", model="llama3")).text)
        assert {line["model"] for line in lines} == {"llama3"}
        generated = client.post(
            "/api/generate", json={"model": "llama3", "prompt": "hi", "stream": False}
        )
        assert generated.json()["model"] == "llama3"

        names = [m["name"] for m in client.get("/api/tags").json()["models"]]
        assert "llama3:latest" in names and "nomic-embed-text:latest" in names
        assert [m["model"] for m in client.get("/api/tags").json()["models"]] == names
        assert "llama3:latest" in [m["name"] for m in client.get("/api/ps").json()["models"]]
        tagged = client.post("/api/chat", json=chat_body("hi", model="llama3:latest", stream=False))
        assert tagged.json()["model"] == "llama3:latest"  # the mapping applies to it too
        assert client.post("/api/show", json={"model": "llama3"}).status_code == 200

        embed = client.post("/api/embed", json={"model": "nomic-embed-text", "input": ["a", "b"]})
        assert embed.status_code == 200 and len(embed.json()["embeddings"]) == 2
        assert embed.json()["model"] == "nomic-embed-text"
        # unmapped backend names still pass through
        direct = client.post("/api/chat", json=chat_body("hi", model="demo-reasoner", stream=False))
        assert direct.json()["model"] == "demo-reasoner"


def test_a_model_the_backend_names_otherwise_is_kept_in_a_stream_or_not() -> None:
    """Only the backend's name for the mapped model is the client's: the non-stream body
    turned any model into the client's name, while a stream kept another one (OpenAI's
    dated version of an alias, OpenRouter's pick for openrouter/auto)."""
    from trioproxy.routes_openai import _model_rewriter, _rewrite_model_json

    def body(model: str) -> bytes:
        return json.dumps({"id": "c", "model": model, "choices": []}).encode()

    for answered, shown in [("dated", "fast"), ("dated-2024-07-18", "dated-2024-07-18")]:
        whole = json.loads(_rewrite_model_json(body(answered), "dated", "fast"))
        rewrite = _model_rewriter({"dated": "fast"})
        assert rewrite is not None
        streamed = json.loads(rewrite(body(answered).replace(b": ", b":")))
        assert whole["model"] == streamed["model"] == shown
    # an answer readable but too deep to write again was a 500: relayed as it came
    deep = b'{"model": "dated", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert _rewrite_model_json(deep, "dated", "fast") == deep


def test_mapping_openai_api(mapped_proxy: ServerProcess, demo_backend: ServerProcess) -> None:
    with httpx.Client(base_url=mapped_proxy.url, timeout=10) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert "llama3" in ids and "nomic-embed-text" in ids
        one = client.get("/v1/models/llama3")
        assert one.status_code == 200 and one.json()["id"] == "llama3"

        request_id = rid()
        reply = client.post(
            "/v1/chat/completions",
            json=chat_body("hi [[tokens=2]]", model="llama3"),
            headers={"X-Request-ID": request_id},
        )
        assert reply.status_code == 200
        assert reply.json()["model"] == "llama3"
        assert demo_events_for(demo_backend, request_id)[0]["model"] == "demo-chat"

        stream = client.post(
            "/v1/chat/completions",
            json=chat_body(
                "hi [[tokens=3]]", model="llama3", stream=True,
                stream_options={"include_usage": True},
            ),
        )  # fmt: skip
        chunks = [json.loads(e) for e in sse_events(stream.text) if e != "[DONE]"]
        assert len(chunks) >= 5
        assert {c["model"] for c in chunks} == {"llama3"}

        embedded = client.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": "a"})
        assert embedded.json()["model"] == "nomic-embed-text"
        legacy = client.post("/v1/completions", json={"model": "llama3", "prompt": "hi"})
        assert legacy.json()["model"] == "llama3"

        request_id = rid()
        response = client.post(
            "/v1/responses",
            json={"model": "llama3", "input": "hi [[tokens=2]]"},
            headers={"X-Request-ID": request_id},
        )
        assert response.status_code == 200 and response.json()["model"] == "llama3"
        assert demo_events_for(demo_backend, request_id)[0]["model"] == "demo-chat"
        streamed = client.post(
            "/v1/responses", json={"model": "llama3", "input": "hi [[tokens=3]]", "stream": True}
        )
        named = {e["response"]["model"] for e in map(json.loads, sse_events(streamed.text))
                 if "response" in e}  # fmt: skip
        assert named == {"llama3"}

        # read again by id: the backend's name is mapped back in the object and the events
        response_id = response.json()["id"]
        assert client.get(f"/v1/responses/{response_id}").json()["model"] == "llama3"
        assert client.post(f"/v1/responses/{response_id}/cancel").status_code == 400
        resumed = client.get(f"/v1/responses/{response_id}", params={"stream": "true"})
        named = {e["response"]["model"] for e in map(json.loads, sse_events(resumed.text))
                 if "response" in e}  # fmt: skip
        assert named == {"llama3"}


# ---- never a 500 for a client mistake ------------------------------------------------------


def _json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # a named function: hypothesis checks by reading the source that the argument is used
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    _json_containers,
    max_leaves=6,
)
_FIELDS = [
    "model", "messages", "prompt", "input", "options", "format", "images", "tools", "think",
    "system", "keep_alive", "stream_options", "max_tokens", "dimensions", "truncate",
]  # fmt: skip


_PATHS = [
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show",
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
]  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(_PATHS),
    body=st.dictionaries(st.sampled_from(_FIELDS), _json_values, max_size=5),
    model=st.sampled_from([None, "demo-chat", "demo-embed", "", 3]),
)
def test_client_mistakes_are_never_500(
    http: httpx.Client, path: str, body: dict[str, Any], model: Any
) -> None:
    if model is not None:
        body["model"] = model
    body["stream"] = False
    response = http.post(path, json=body)
    assert response.status_code < 500, (path, body, response.status_code, response.text)
    if response.status_code >= 400:
        if path.startswith("/v1/"):
            assert isinstance(response.json()["error"]["message"], str)
        else:
            assert isinstance(response.json()["error"], str)


@pytest.mark.parametrize("path", _PATHS)
def test_a_half_emoji_from_a_client_is_forwarded_not_a_500(http: httpx.Client, path: str) -> None:
    """JavaScript clients that cut text inside a surrogate pair send a lone ``\\ud83d``
    escape: valid JSON, with no UTF-8 spelling. It goes on as the escape it came as."""
    model = "demo-embed" if "embed" in path else "demo-chat"
    text = '"hi \\ud83d"'
    body = (
        f'{{"model": "{model}", "stream": false, "prompt": {text}, "input": {text},'
        f' "messages": [{{"role": "user", "content": {text}}}]}}'
    )
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/api/chat", "/api/show", "/v1/chat/completions"])
def test_a_body_nested_too_deeply_is_a_400(http: httpx.Client, path: str) -> None:
    body = '{"model": "demo-chat", "messages": %s}' % ("[" * 100_000 + "]" * 100_000)
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert "nested too deeply" in message


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_body_of_millions_of_tiny_values_is_refused_before_it_is_decoded(
    http: httpx.Client, path: str
) -> None:
    """Decoded, tiny values take about 30 times their bytes: 57 MiB of ``[],`` made one
    request hold 1.9 GB. Past 1 MiB, a body with over 2 million values (or half a million
    arrays and objects) is a 413; a batch of token arrays as LangChain sends it (1,000
    inputs) is not refused."""
    values = "[" + "0," * 2_000_001 + "0]"
    body = '{"model": "demo-chat", "messages": [], "metadata": {"x": ' + values + "}}"
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "more than 2,000,000 commas" in response.text
    containers = '{"model": "demo-chat", "messages": [], "x": [' + "[]," * 500_001 + "[]]}"
    response = http.post(path, content=containers, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "more than 500,000 JSON arrays and objects" in response.text
    fine = (
        '{"model": "demo-chat", "messages": [{"role": "user", "content": "%s"}], "stream": false}'
    )
    text = "a, b " * 400_000  # 2 MB of prose: its 400,000 commas are far from the limit
    assert (
        http.post(
            path, content=fine % text, headers={"Content-Type": "application/json"}
        ).status_code
        == 200
    )
    batch = {"model": "demo-embed", "input": [[7] * 1001] * 1000}  # 1,001,000 token ids
    assert http.post("/v1/embeddings", json=batch).status_code != 413


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [1010])
@pytest.mark.parametrize(
    ("path", "template"),
    [
        (
            "/api/chat",
            '{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "format": %s}',
        ),
        (
            "/api/chat",
            '{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}],'
            ' "tools": [{"type": "function", "function": {"name": "f", "parameters": %s}}]}',
        ),
        (
            "/api/chat",
            '{"model": "demo-chat", "messages": [{"role": "assistant", "content": "",'
            ' "tool_calls": [{"function": {"name": "f", "arguments": %s}}]}]}',
        ),
    ],
)
def test_a_body_that_could_be_read_but_not_written_again_is_a_400(
    http: httpx.Client, path: str, template: str, depth: int
) -> None:
    """Between the depth the standard library writes (about 900 levels) and the depth
    orjson reads (1,024), a body was read and then failed to be written for the backend:
    a 500 with a traceback, counted as an error by health."""
    response = http.post(
        path, content=template % _nested(depth), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert "nested too deeply" in response.text


def test_a_lone_surrogate_quoted_in_an_error_keeps_the_error_in_openais_shape() -> None:
    """A backend's 422 quoting a client's lone ``\ud83d`` (FastAPI's ``detail``) made the
    OpenAI error body fail to encode: a bare 500 with an empty body."""
    from trioproxy.errors import openai_error_body

    body = json.loads(openai_error_body("bad input: '\ud83d'", 422))
    assert body["error"]["message"] == "bad input: '\ud83d'"


# ---- a backend answering 2xx with a body of the wrong shape ----------------------------------

# model name -> the 2xx JSON body the fake backend answers with
_WRONG_SHAPES = {
    "a-list": "[1, 2]",
    "a-number": "123",
    "null": "null",
    "message-is-text": '{"choices": [{"message": "text"}]}',
    "tool-call-is-text": (
        '{"choices": [{"message": {"content": "a", "tool_calls": [{"function": "x"}]}}]}'
    ),
    "embedding-is-text": '{"data": [{"embedding": "abc"}]}',
    "no-data": "[]",
    "one-vector": '{"data": [{"embedding": [0.5]}]}',
    "no-choices": "{}",
    "error-with-200": '{"error": {"message": "quota exceeded", "type": "insufficient_quota"}}',
    # OpenRouter's failed completion: an error beside a choice finished with "error"
    "openrouter-error": json.dumps({
        "error": {"code": 502, "message": "Provider disconnected unexpectedly"},
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                     "finish_reason": "error"}]}),
    "refusal": json.dumps({"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "I can't help with that"}}]}),
    # not JSON at all
    "cut-short": '{"id": "c1", "object": "chat.completion", "choi',
    # cut at a brace where the backend closed the connection: no framing told its end
    "cut-at-a-brace-by-close": '{"id": "c1", "object": "chat.completion", "choices": '
        '[{"index": 0, "message": {"role": "assistant", "content": "x"}}',
    "whole-by-close": json.dumps({"id": "c1", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "x"}}],
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]}),
    "empty-body": "",
    "html-page": "<html><body>Bad gateway</body></html>",
    "refuses-max-tokens": json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "thought it through"}}]}),
    "mistral-ids": json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "sunny"}}]}),
    "system-first": json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "sunny"}}]}),
    "system-first-500": json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "sunny"}}]}),
    "system-first-openai": json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "sunny"}}]}),
    "alternating": json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "sunny"}}]}),
}  # fmt: skip

_COMPLETION = {
    "id": "c1", "object": "chat.completion", "created": 1, "model": "full-json",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "full answer"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}  # fmt: skip
_HELLO = (
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"cut",'
    '"choices":[{"index":0,"delta":{"role":"assistant","content":"Hello"},'
    '"finish_reason":null}]}\n\n'
)
_TOOL_CALLS = [
    {"id": f"call_{i}", "type": "function",
     "function": {"name": name, "arguments": json.dumps({"city": "Paris"})}}
    for i, name in enumerate(["weather", "time"])
]  # fmt: skip
_TOOL_COMPLETION = {
    **_COMPLETION,
    "choices": [{"index": 0, "finish_reason": "tool_calls",
                 "message": {"role": "assistant", "content": None, "tool_calls": _TOOL_CALLS}}],
}  # fmt: skip


def _chunk_event(delta: dict[str, Any], finish: str | None = None) -> str:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return "data: " + json.dumps(chunk) + "\n\n"


# OpenRouter's documented mid-stream error
_OPENROUTER_ERROR = {
    "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
    "error": {"code": 502, "message": "Provider disconnected unexpectedly"},
    "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
}  # fmt: skip
# model name -> (content type, body) the fake backend answers a stream request with
_STREAM_SHAPES = {
    "full-json": ("application/json", json.dumps(_COMPLETION)),
    "full-json-tools": ("application/json", json.dumps(_TOOL_COMPLETION)),
    "error-with-200": ("application/json", _WRONG_SHAPES["error-with-200"]),
    "no-choices": ("application/json", "{}"),
    "empty": ("text/event-stream", ""),
    "plain-text": ("text/plain", "oops, not a stream"),
    "cut": ("text/event-stream", _HELLO),
    "context-too-long": ("text/event-stream", "data: " + json.dumps({"error": {
        "message": "This model's maximum context length is 8192 tokens",
        "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}}) + "\n\n"),
    "overloaded": ("text/event-stream", 'data: {"error": {"message": "overloaded",'
                   ' "type": "server_error"}}\n\n'),
    # LiteLLM's errors carry their status as text
    "litellm-too-long": ("text/event-stream", 'data: {"error": {"message": "context window'
                         ' exceeded", "type": null, "param": null, "code": "400"}}\n\n'),
    "full-json-no-object": ("application/json", json.dumps(
        {k: v for k, v in _COMPLETION.items() if k != "object"})),
    "openrouter-mid-error": ("text/event-stream", _HELLO + _chunk_event({"content": " wor"})
                             + "data: " + json.dumps(_OPENROUTER_ERROR) + "\n\n"),
    "openrouter-error-json": ("application/json", json.dumps({
        "error": {"code": 502, "message": "Provider disconnected unexpectedly"},
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hel"},
                     "finish_reason": "error"}]})),
    "openrouter-error-first": ("text/event-stream",
                               "data: " + json.dumps(_OPENROUTER_ERROR) + "\n\n"),
    "refusal": ("text/event-stream", _chunk_event({"content": None, "refusal": "I can't"})
                + _chunk_event({}, finish="stop") + "data: [DONE]\n\n"),
    "refuses-stream-options": ("text/event-stream", _HELLO + _chunk_event({}, finish="stop")
                               + "data: [DONE]\n\n"),
    "refuses-max-tokens": ("text/event-stream", _HELLO + _chunk_event({}, finish="stop")
                           + "data: [DONE]\n\n"),
    "mistral-ids": ("text/event-stream", _HELLO + _chunk_event({}, finish="stop")
                    + "data: [DONE]\n\n"),
    "system-first": ("text/event-stream", _HELLO + _chunk_event({}, finish="stop")
                     + "data: [DONE]\n\n"),
    "system-first-500": ("text/event-stream", _HELLO + _chunk_event({}, finish="stop")
                         + "data: [DONE]\n\n"),
    "system-first-openai": ("text/event-stream", _HELLO + _chunk_event({}, finish="stop")
                            + "data: [DONE]\n\n"),
    **{f"system-first-counted-{n}-500": ("text/event-stream", _HELLO
        + _chunk_event({}, finish="stop") + "data: [DONE]\n\n") for n in (2, 3)},
}  # fmt: skip
# OpenAI's answer to max_tokens from one of its reasoning models
_MAX_TOKENS_REFUSED = {
    "error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
}


def _not_mistral_id(request: dict[str, Any]) -> str | None:
    """The first tool call id of ``request`` that Mistral's API refuses, if any."""
    for message in request["messages"]:
        ids = [c["id"] for c in message.get("tool_calls") or ()]
        for call_id in [*ids, message.get("tool_call_id")]:
            if call_id is not None and not re.fullmatch(r"[A-Za-z0-9]{9}", call_id):
                return str(call_id)
    return None


def _not_alternating(request: dict[str, Any]) -> bool:
    """Whether a chat request's turns after one system message, first, do not alternate
    user, assistant, user... (Gemma 3's and Mistral's chat templates refuse them)."""
    roles = [message.get("role") for message in request["messages"]]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    return turns != [("user", "assistant")[i % 2] for i in range(len(turns))]


def _system_not_first(request: dict[str, Any]) -> bool:
    """Whether a chat request has a system message that is not the first message, or
    more than one (Qwen3.8's template refuses two even at the beginning)."""
    roles = [message.get("role") for message in request["messages"]]
    return roles.count("system") > 1 or ("system" in roles and roles[0] != "system")


class _WrongShapeBackend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    stream_requests: ClassVar[list[dict[str, Any]]] = []
    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(request)
        if request.get("stream"):
            self.stream_requests.append(request)
        status = 200
        content_type, text = (
            _STREAM_SHAPES[request["model"]]
            if request.get("stream")
            else ("application/json", _WRONG_SHAPES[request["model"]])
        )
        if request["model"] == "refuses-stream-options" and "stream_options" in request:
            status, content_type = 422, "application/json"  # as Mistral's API does
            text = json.dumps({"object": "error", "type": "invalid_request_error", "message": {
                "detail": [{"type": "extra_forbidden", "loc": ["body", "stream_options"],
                            "msg": "Extra inputs are not permitted"}]}})  # fmt: skip
        if request["model"] == "refuses-max-tokens" and "max_tokens" in request:
            status, content_type = 400, "application/json"
            text = json.dumps(_MAX_TOKENS_REFUSED)
        if request["model"] == "mistral-ids" and (refused := _not_mistral_id(request)):
            status, content_type = 400, "application/json"  # as Mistral's API words it
            text = json.dumps({"object": "error", "type": "invalid_request_message_error",
                "message": f"Tool call id was {refused} but must be a-z, A-Z, 0-9, with a "
                "length of 9."})  # fmt: skip
        if request["model"].startswith("system-first") and _system_not_first(request):
            # a Qwen3.5-style chat template: vLLM's 400, Ollama's (and llama.cpp's) 500
            status, content_type = 400, "application/json"
            text = json.dumps({"object": "error", "type": "BadRequestError", "code": 400,
                               "message": "System message must be at the beginning."})  # fmt: skip
            if request["model"].endswith("-500"):
                status = 500
                refusal = {
                    "type": "api_error",
                    "message": "system message must be at the beginning",
                }
                text = json.dumps({"error": refusal})
        if request["model"] == "alternating" and _not_alternating(request):
            status, content_type = 400, "application/json"  # as vLLM renders Gemma 3's
            refusal = "Conversation roles must alternate user/assistant/user/assistant/..."
            text = json.dumps({"object": "error", "type": "BadRequestError", "code": 400,
                               "message": refusal})  # fmt: skip
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if request["model"].endswith("-by-close"):  # the body ends where the connection does
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def wrong_shape_proxy(start_proxy: StartProxy) -> Iterator[ServerProcess]:
    backend = QuietHTTPServer(("127.0.0.1", 0), _WrongShapeBackend)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    yield start_proxy(f"http://127.0.0.1:{backend.server_address[1]}/v1", MAX_RETRIES="0")
    backend.shutdown()
    backend.server_close()


_CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": False}
_NOT_AN_OBJECT = ["a-list", "a-number", "null"]
_WRONG_FOR = [
    *[("/api/chat", _CHAT, m) for m in [*_NOT_AN_OBJECT, "message-is-text", "tool-call-is-text"]],
    *[("/api/generate", {"prompt": "hi", "stream": False}, m)
      for m in [*_NOT_AN_OBJECT, "message-is-text"]],
    *[("/api/embed", {"input": "hi"}, m) for m in [*_NOT_AN_OBJECT, "embedding-is-text"]],
    *[("/api/embeddings", {"prompt": "hi"}, m)
      for m in [*_NOT_AN_OBJECT, "embedding-is-text", "no-data"]],
]  # fmt: skip


@pytest.mark.parametrize("model", ["cut-short", "empty-body", "html-page", "a-list"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/completions"])
def test_a_2xx_body_that_is_no_json_object_is_a_502_on_v1_too(
    wrong_shape_proxy: ServerProcess, path: str, model: str
) -> None:
    """/v1 relays a backend's answer as bytes: one that is not a JSON object reached the
    openai SDK as a 200 it could not read (JSONDecodeError, or a str for an HTML page),
    counted as a success."""
    body = {"model": model, "prompt": "hi", "input": "hi", **_CHAT}
    response = httpx.post(wrong_shape_proxy.url + path, json=body, timeout=10)
    assert response.status_code == 502, response.text
    assert "not a JSON object" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/completions"])
def test_a_body_that_ended_with_its_connection_is_decoded_whole(
    wrong_shape_proxy: ServerProcess, path: str
) -> None:
    """A chaos review: a body without Content-Length or chunked framing, cut by the
    backend's close just after a ``}``, had a JSON object's ends and was relayed as a 200
    the client could not read, counted as a success."""
    body = {"prompt": "hi", "input": "hi", **_CHAT}
    cut = httpx.post(
        wrong_shape_proxy.url + path, json={**body, "model": "cut-at-a-brace-by-close"}
    )
    assert cut.status_code == 502, cut.text
    assert "not a JSON object" in cut.json()["error"]["message"]
    whole = httpx.post(wrong_shape_proxy.url + path, json={**body, "model": "whole-by-close"})
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] == "x"


def test_a_large_2xx_body_is_checked_by_its_ends() -> None:
    """Past 256 KiB (a batch of embeddings) decoding to check would cost milliseconds:
    the ends tell a cut, empty or HTML body."""
    from types import SimpleNamespace

    from trioproxy.errors import BadUpstreamResponse
    from trioproxy.forward import require_json_object

    errors: list[str] = []
    call = SimpleNamespace(
        app=SimpleNamespace(collector=SimpleNamespace(upstream_error=errors.append))
    )
    vectors = json.dumps({"data": [{"embedding": [0.25] * 50_000}]}).encode()
    require_json_object(call, vectors + b"\n")  # type: ignore[arg-type]
    with pytest.raises(BadUpstreamResponse):
        require_json_object(call, vectors[:-10])  # type: ignore[arg-type]
    assert errors == ["protocol"]


@pytest.mark.parametrize(("path", "body", "model"), _WRONG_FOR)
def test_a_backend_body_of_the_wrong_shape_is_a_502_in_dialect(
    wrong_shape_proxy: ServerProcess, path: str, body: dict[str, Any], model: str
) -> None:
    """Valid JSON of another shape than the backend's API promises is the backend's fault:
    502 in the caller's dialect, never our own 500 (which a traceback in our log would
    suggest). Shapes the translation tolerates (no ``choices``, no ``data``) are left out."""
    response = httpx.post(wrong_shape_proxy.url + path, json={"model": model, **body}, timeout=10)
    assert response.status_code == 502, response.text
    assert set(response.json()) == {"error"}
    assert "unexpected shape" in response.json()["error"]


def test_fewer_vectors_than_inputs_is_a_502_not_a_misaligned_answer(
    wrong_shape_proxy: ServerProcess,
) -> None:
    """Clients pair texts and vectors by position (LangChain's embed_documents zips them):
    a vector missing from the middle would shift every later one onto the wrong text."""
    body = {"model": "one-vector", "input": ["a", "b"]}
    response = httpx.post(wrong_shape_proxy.url + "/api/embed", json=body, timeout=10)
    assert response.status_code == 502, response.text
    assert response.json() == {"error": "the backend returned 1 embeddings for 2 inputs"}


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_a_completion_without_choices_or_with_an_error_is_a_502_not_an_empty_answer(
    wrong_shape_proxy: ServerProcess, path: str
) -> None:
    """Some gateways answer a failure with 200 and an error body; an empty 200 would pass
    it off as the model saying nothing."""
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    for model, words in (("no-choices", "unexpected shape"), ("error-with-200", "quota exceeded")):
        response = httpx.post(wrong_shape_proxy.url + path, json={**body, "model": model},
                              timeout=10)  # fmt: skip
        assert response.status_code == 502, response.text
        assert words in response.json()["error"]


def test_a_backend_that_takes_only_nine_character_call_ids_gets_them(
    wrong_shape_proxy: ServerProcess,
) -> None:
    """Ollama providers that make up their own call ids (UUIDs: LiteLLM's ollama_chat,
    ai-sdk-ollama) sent a history Mistral's API refuses (400, "must be a-z, A-Z, 0-9, with
    a length of 9"): the request is sent again with the ids rewritten, a call and its
    result still paired, and the model's later requests go so at once."""
    sent = _WrongShapeBackend.requests
    uuid = "3f2b6c1e-8d4a-4e7b-9a61-0c5d2e8f7b13"
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": uuid, "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": uuid, "content": "sunny"},
    ]  # fmt: skip
    for stream in (False, True, False):
        sent.clear()
        with httpx.Client(base_url=wrong_shape_proxy.url, timeout=10) as client:
            answer = client.post(
                "/api/chat", json={"model": "mistral-ids", "messages": history, "stream": stream}
            )
        assert answer.status_code == 200, answer.text
        last = sent[-1]["messages"]
        call_id = last[1]["tool_calls"][0]["id"]
        assert re.fullmatch(r"[A-Za-z0-9]{9}", call_id) and last[2]["tool_call_id"] == call_id
    assert len(sent) == 1  # remembered: the third request went rewritten at once


@pytest.mark.parametrize("model", ["system-first", "system-first-500"])
def test_a_backend_that_takes_one_system_message_first_gets_them_joined(
    wrong_shape_proxy: ServerProcess, model: str
) -> None:
    """Claude Code (2.1.332) sends its environment as a system message after its prompt;
    a chat template that takes one system message, at the beginning (Qwen3.5's on: vLLM's
    400, Ollama's 500 "System message must be at the beginning"), refuses it: the request
    is sent again with the system messages joined, first, in order, and the model's later
    requests go so at once. The same for an Ollama client's system message late in a chat."""
    sent = _WrongShapeBackend.requests
    anthropic_body = {
        "model": model, "max_tokens": 20, "system": "You are Claude Code.",
        "messages": [{"role": "user", "content": "hello"},
                     {"role": "system", "content": [{"type": "text", "text": "# Environment"}]}],
    }  # fmt: skip
    ollama_body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                     {"role": "system", "content": "Answer in French."},
                     {"role": "user", "content": "weather?"}],
    }  # fmt: skip
    joined = {
        "/v1/messages": [{"role": "system", "content": "You are Claude Code.\n\n# Environment"},
                         {"role": "user", "content": "hello"}],
        "/api/chat": [{"role": "system", "content": "Answer in French."},
                      *ollama_body["messages"][:2], ollama_body["messages"][3]],
    }  # fmt: skip
    refusals = 1
    with httpx.Client(base_url=wrong_shape_proxy.url, timeout=10) as client:
        for path, body in (("/v1/messages", anthropic_body), ("/api/chat", ollama_body)):
            for stream in (False, True, False):
                sent.clear()
                answer = client.post(path, json={**body, "stream": stream})
                assert answer.status_code == 200, answer.text
                assert ("sunny" if not stream else "Hello") in answer.text
                assert sent[-1]["messages"] == joined[path]
                # the first request was refused and sent again; from then on the model's
                # requests go joined at once
                assert len(sent) == (2 if refusals else 1)
                refusals = 0


def test_a_chat_completion_whose_system_messages_the_backend_refuses_gets_them_joined(
    wrong_shape_proxy: ServerProcess,
) -> None:
    """The same quirk on /v1/chat/completions, which relays the client's request as it
    came: a conversation with a system message late (an agent's reminder) that the model's
    chat template refuses (vLLM's 400 "System message must be at the beginning") failed
    there, while the same conversation worked on /api/chat. It is sent again with the
    system messages joined, first, streamed or not, and the model's later requests go so
    at once; a request the template takes goes as the client wrote it."""
    sent = _WrongShapeBackend.requests
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]},
        {"role": "user", "content": "weather?"},
    ]
    joined = [
        {"role": "system", "content": "You are terse.\n\nAnswer in French."},
        *messages[1:3],
        messages[4],
    ]
    model = "system-first-openai"
    with openai.OpenAI(
        base_url=wrong_shape_proxy.url + "/v1", api_key="k", max_retries=0
    ) as client:
        for stream, refused in ((True, True), (False, False), (True, False)):
            sent.clear()
            if stream:
                chunks = client.chat.completions.create(
                    model=model,
                    messages=messages,
                    stream=True,  # type: ignore[arg-type]
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert text == "Hello"
            else:
                reply = client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
                assert reply.choices[0].message.content == "sunny"
            assert sent[-1]["messages"] == joined
            assert [m["messages"] for m in sent[:-1]] == ([messages] if refused else [])
        sent.clear()  # one system message, first: as the client wrote it
        client.chat.completions.create(model=model, messages=messages[:3])  # type: ignore[arg-type]
        assert [m["messages"] for m in sent] == [messages[:3]]


def test_a_refusal_joining_cannot_change_is_not_sent_again(
    wrong_shape_proxy: ServerProcess,
) -> None:
    """Gemma 3's "roles must alternate" also refuses a chat with two user turns in a row
    and no system message: joining system messages changes nothing there, so the request
    is not sent again as it was (the backend's 400 is the client's at once), nor is the
    model taken for one that wants its system messages joined: a later chat whose system
    message is late is refused once, then sent joined."""
    sent = _WrongShapeBackend.requests
    with httpx.Client(base_url=wrong_shape_proxy.url, timeout=10) as client:
        sent.clear()
        users = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
        answer = client.post("/api/chat", json={"model": "alternating", "messages": users,
                                                "stream": False})  # fmt: skip
        assert answer.status_code == 400, answer.text
        assert "roles must alternate" in answer.json()["error"]
        assert len(sent) == 1  # not the same request twice
        sent.clear()
        late = [{"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."}]
        answer = client.post("/api/chat", json={"model": "alternating", "messages": late,
                                                "stream": False})  # fmt: skip
        assert answer.status_code == 200, answer.text
        assert [m["role"] for m in sent[-1]["messages"]] == ["system", "user"]
        assert len(sent) == 2  # refused, then joined: the model was not noted before


def _ollama_stream(proxy: ServerProcess, model: str) -> tuple[list[str], BaseException | None]:
    """What ollama-python's streaming chat yields (its text), and what it raised."""
    texts: list[str] = []
    with ollama.Client(host=proxy.url, timeout=10) as client:
        try:
            for part in client.chat(model=model, messages=[{"role": "user", "content": "hi"}],
                                    stream=True):  # fmt: skip
                texts.append(part.message.content or "")
        except ollama.ResponseError as error:
            return texts, error
    return texts, None


def _openai_stream(proxy: ServerProcess, model: str) -> tuple[list[str], BaseException | None]:
    texts: list[str] = []
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        try:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            for chunk in stream:
                texts.extend(c.delta.content or "" for c in chunk.choices)
        except openai.APIError as error:
            return texts, error
    return texts, None


@pytest.mark.parametrize("consume", [_ollama_stream, _openai_stream])
@pytest.mark.parametrize("model", ["full-json", "full-json-no-object"])
def test_a_backend_that_ignores_stream_and_answers_json_is_streamed_as_one_chunk(
    wrong_shape_proxy: ServerProcess, consume: Any, model: str
) -> None:
    texts, error = consume(wrong_shape_proxy, model)
    assert error is None
    assert "".join(texts) == "full answer"


def test_a_json_answer_with_tool_calls_works_with_the_sdks_stream_helpers(
    wrong_shape_proxy: ServerProcess,
) -> None:
    """The made-up chunk numbers its tool calls: the openai SDK's ``stream()`` helper
    indexes its accumulation by them, and ollama-python gets both calls."""
    tools: Any = [{"type": "function", "function": {"name": n, "parameters": {}}}
                  for n in ("weather", "time")]  # fmt: skip
    messages: Any = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=wrong_shape_proxy.url + "/v1", api_key="x", max_retries=0) as c:
        with c.chat.completions.stream(model="full-json-tools", messages=messages,
                                       tools=tools) as stream:  # fmt: skip
            final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(t.id, t.function.name) for t in calls] == [("call_0", "weather"), ("call_1", "time")]
    with ollama.Client(host=wrong_shape_proxy.url, timeout=10) as client:
        parts = list(client.chat(model="full-json-tools", messages=messages, stream=True))
    called = [t.function.name for p in parts for t in (p.message.tool_calls or [])]
    assert called == ["weather", "time"]
    assert parts[-1].done


@pytest.mark.parametrize("consume", [_ollama_stream, _openai_stream])
@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("error-with-200", "quota exceeded"),
        ("openrouter-error-json", "Provider disconnected unexpectedly"),
        ("no-choices", "not a completion"),
        ("empty", "ended before its last event"),
        ("plain-text", "not an event stream"),
    ],
)
def test_a_stream_answer_with_nothing_in_it_is_a_502_not_an_empty_answer(
    wrong_shape_proxy: ServerProcess, consume: Any, model: str, words: str
) -> None:
    texts, error = consume(wrong_shape_proxy, model)
    assert "".join(texts) == ""
    assert error is not None and words in str(error)
    assert getattr(error, "status_code", None) == 502


@pytest.mark.parametrize("consume", [_ollama_stream, _openai_stream])
@pytest.mark.parametrize(
    ("model", "status"),
    [("context-too-long", 400), ("litellm-too-long", 400), ("overloaded", 502)],
)
def test_a_stream_the_backend_fails_at_once_gets_a_real_status(
    wrong_shape_proxy: ServerProcess, consume: Any, model: str, status: int
) -> None:
    """An error as the stream's first event: nothing was sent, so the client gets a real
    status in its dialect, a 4xx for its own mistake (the openai SDK's BadRequestError,
    which LangChain and others test for a context that is too long), else a 502."""
    texts, error = consume(wrong_shape_proxy, model)
    assert texts == []
    assert getattr(error, "status_code", None) == status, error
    if model == "context-too-long" and isinstance(error, openai.BadRequestError):
        assert error.code == "context_length_exceeded"
        assert "maximum context length" in error.message
        # the backend's error object as it wrote it: LangChain reads param and type
        assert error.param == "messages" and error.type == "invalid_request_error"


@pytest.mark.parametrize("consume", [_ollama_stream, _openai_stream])
def test_a_stream_cut_before_its_end_is_an_error_not_a_finished_answer(
    wrong_shape_proxy: ServerProcess, consume: Any
) -> None:
    """The body ended cleanly, but the stream never said it was done (no finish_reason,
    no [DONE]): the client learns that the answer it has is cut, in its dialect."""
    before = _error_streams(wrong_shape_proxy)
    texts, error = consume(wrong_shape_proxy, "cut")
    assert "".join(texts) == "Hello"
    assert error is not None and "ended before its last event" in str(error)
    assert _error_streams(wrong_shape_proxy) == before + 1


def _error_streams(proxy: ServerProcess) -> int:
    summary = httpx.get(proxy.url + "/v1/metrics", timeout=10).json()
    return int(summary["streaming"]["error_streams"])


@pytest.mark.parametrize("placeholder", ["demo", "backend"])
def test_a_placeholder_backend_key_is_not_masked_out_of_answers(
    start_proxy: StartProxy, demo_backend: ServerProcess, placeholder: str
) -> None:
    """Local backends get placeholder keys (``ollama``, ``EMPTY``, ``dummy``): words a
    model may write. Masking them would corrupt the answer and protect nothing; a key of
    12 characters or more is masked (tests/test_cli_config.py)."""
    proxy = start_proxy(demo_backend.url, OPENAI_API_KEY=placeholder)
    body = {"model": "demo-chat", "stream": False,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    answer = httpx.post(proxy.url + "/api/chat", json=body, timeout=10).json()
    assert "trioproxy demo backend" in answer["message"]["content"]


# ---- what a backend says about retries and its rate limits ----------------------------------

_LIMITS = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499",
           "x-ratelimit-reset-tokens": "6ms"}  # fmt: skip


class _RateLimitingBackend(BaseHTTPRequestHandler):
    """Answers the model "refuses" with a 503 that says not to retry, anything else with a
    completion (an event stream when asked); every answer carries rate-limit headers."""

    protocol_version = "HTTP/1.1"
    attempts: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.attempts.append(request["model"])
        if request["model"] == "refuses":
            status, content_type = 503, "application/json"
            body = '{"error": {"message": "busy, and retrying will not help"}}'
            extra = {"x-should-retry": "false", "retry-after-ms": "1500", "retry-after": "2"}
        elif request["model"] == "limited-stream":  # the refusal comes as the first event
            status, content_type, extra = 200, "text/event-stream", {"retry-after": "7"}
            body = 'data: {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}\n\n'

        elif request.get("stream"):
            status, content_type, extra = 200, "text/event-stream", {}
            body = (
                _HELLO + 'data: {"choices": [{"index": 0, "delta": {},'
                ' "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
            )
        else:
            status, content_type, extra = 200, "application/json", {}
            body = json.dumps(_COMPLETION)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body.encode())))
        for name, value in {**_LIMITS, **extra}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body.encode())


def test_the_backends_retry_advice_and_rate_limits_reach_the_client(
    start_proxy: StartProxy,
) -> None:
    """The openai SDK obeys x-should-retry and retry-after-ms, and clients pace themselves
    by x-ratelimit-*: the proxy passes them on, and does not retry what the backend says
    a retry would not help (one failure used to become MAX_RETRIES+1 backend calls, times
    the SDK's own retries)."""
    backend = QuietHTTPServer(("127.0.0.1", 0), _RateLimitingBackend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{backend.server_address[1]}/v1"
        proxy = start_proxy(url, MAX_RETRIES="2", RETRY_BACKOFF="0.01")
        chat = proxy.url + "/v1/chat/completions"
        messages = [{"role": "user", "content": "hi"}]
        refused = httpx.post(chat, json={"model": "refuses", "messages": messages}, timeout=10)
        assert refused.status_code == 503
        assert _RateLimitingBackend.attempts.count("refuses") == 1
        assert refused.headers["x-should-retry"] == "false"
        assert refused.headers["retry-after-ms"] == "1500"
        for stream in (False, True):
            body = {"model": "m", "messages": messages, "stream": stream}
            with httpx.stream("POST", chat, json=body, timeout=10) as answer:
                assert answer.status_code == 200
                assert {k: answer.headers.get(k) for k in _LIMITS} == _LIMITS
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x") as client:  # 2 retries
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="refuses", messages=messages)  # type: ignore[arg-type]
        assert _RateLimitingBackend.attempts.count("refuses") == 2  # the SDK believed it too
        limited = httpx.post(chat, json={"model": "limited-stream", "messages": messages,
                                         "stream": True}, timeout=10)  # fmt: skip
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "7"
        assert limited.headers["x-ratelimit-remaining-requests"] == "499"
    finally:
        backend.shutdown()
        backend.server_close()


# ---- load / unload calls ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "output"),
    [
        ("/api/generate", {"prompt": ""}, "response"),
        ("/api/generate", {}, "response"),
        # Ollama answers an empty prompt at once whatever images come with it
        (
            "/api/generate",
            {"prompt": "", "images": [base64.b64encode(b"GIF89a").decode()]},
            "response",
        ),
        ("/api/chat", {"messages": []}, "message"),
        ("/api/chat", {}, "message"),
    ],
)
def test_load_and_unload_calls_answer_at_once_for_known_models_only(
    http: httpx.Client, path: str, body: dict[str, Any], output: str
) -> None:
    """An empty prompt (or chat) loads the model, with keep_alive 0 unloads it (Ollama's
    warm-up call); an unknown model is a 404, as Ollama's."""
    loaded = http.post(path, json={"model": "demo-chat", **body})
    assert loaded.status_code == 200, loaded.text
    reply = loaded.json()
    assert reply["done"] is True and reply["done_reason"] == "load"
    assert reply[output] in ("", {"role": "assistant", "content": ""})
    for zero in (0, "0m0s", "0.0h"):  # any spelling of Go's zero duration
        unloaded = http.post(path, json={"model": "demo-chat", "keep_alive": zero, **body})
        assert unloaded.json()["done_reason"] == "unload"
    unknown = http.post(path, json={"model": "no-such-model", **body})
    assert unknown.status_code == 404
    assert unknown.json() == {"error": 'model "no-such-model" not found, try pulling it first'}


def test_a_backend_without_a_model_list_lists_no_models_to_clients(
    wrong_shape_proxy: ServerProcess,
) -> None:
    """Open WebUI and ``ollama.list()`` poll the list; a backend with no ``/models`` route
    (this one answers 501) has no models to list, as an Ollama with none pulled, while a
    model it is asked for is still tried."""
    with ollama.Client(host=wrong_shape_proxy.url, timeout=10) as client:
        assert client.list().models == []
        assert client.ps().models == []
        assert client.show("anything").modelfile  # no list to check it against: assumed there
    with openai.OpenAI(base_url=wrong_shape_proxy.url + "/v1", api_key="x", max_retries=0) as c:
        assert list(c.models.list()) == []  # connection checks (Open WebUI) pass


# ---- a backend that fails the model list --------------------------------------------------


def test_concurrent_model_lists_share_one_failed_fetch(start_proxy: StartProxy) -> None:
    """20 clients ask for the model list while the backend hangs up on every connection:
    they all get the 502 of one fetch (with its retry), not one fetch each in a queue."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def hang_up_on_everyone() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=hang_up_on_everyone, daemon=True).start()
    try:
        upstream = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        proxy = start_proxy(upstream, MAX_RETRIES="1", RETRY_BACKOFF="0.01")

        def ask(path: str) -> int:
            return httpx.get(proxy.url + path, timeout=30).status_code

        paths = ["/api/tags", "/v1/models"] * 10
        with ThreadPoolExecutor(max_workers=20) as pool:
            statuses = list(pool.map(ask, paths))
        assert statuses == [502] * 20
        # one fetch and its retry, plus the readiness check's; one fetch each would be ~40
        assert 2 <= len(accepted) <= 6, len(accepted)
    finally:
        listener.close()


# ---- the replaced proxy's aliases --------------------------------------------------------------


def test_the_replaced_proxys_aliases_answer_alike(http: httpx.Client) -> None:
    counted_before = http.get("/v1/metrics").json()["total_requests"]
    for path in ("/health", "/v1/health"):
        body = http.get(path).json()
        assert body["status"] == "healthy" and body["service"] == "trioproxy"
    version = http.get("/v1/version").json()
    assert version["service"] == "trioproxy" and version["api_version"] == "v1"
    assert version["version_info"] == [int(p) for p in version["version"].split(".")]
    tags = http.get("/api/tags").json()
    assert http.get("/api/models").json() == tags == http.get("/v1/tags").json()
    assert {m["name"] for m in tags["models"]} >= {"demo-chat:latest", "demo-embed:latest"}
    for suffix in ("", "/health"):
        assert http.get("/api/metrics" + suffix).status_code == 200
    exposition = http.get("/api/metrics/prometheus").text
    assert "# TYPE http_requests_total counter" in exposition
    # monitoring paths are never counted as traffic, under either prefix: only the three
    # model lists and /v1/version were
    assert http.get("/api/metrics").json()["total_requests"] == counted_before + 4


# ---- a backend's 404: about the model or not ---------------------------------------------


@pytest.mark.parametrize(
    ("body", "model", "about_the_model"),
    [
        (b'{"error":{"message":"The model `gpt-x` does not exist","code":"model_not_found"}}',
         "gpt-x", True),
        (b'{"object":"error","message":"The model `llama3` does not exist.","code":404}',
         "llama3", True),
        (b'{"error":{"message":"model \'m\' not found"}}', "m", True),
        (b"<html><head><title>404 Not Found</title></head><body>nginx</body></html>",
         "nginx", False),
        (b'{"error":{"message":"Invalid URL (POST /v1/embeddings)"}}', "embeddings", False),
        (b'{"detail":"Not Found"}', "Not", False),
        (b'{"error":{"message":"no model route for llama3-8b"}}', "llama3", False),
        (b'{"error":{"message":"model llama3-8b or llama3 not found"}}', "llama3", True),
        (b'{"error":{"message":"The model `a.b` does not exist"}}', "a", False),
    ],
)  # fmt: skip
def test_only_a_404_about_the_model_reads_as_ollamas_model_not_found(
    body: bytes, model: str, about_the_model: bool
) -> None:
    from trioproxy.errors import UpstreamStatusError, upstream_error_message
    from trioproxy.routes_ollama import _is_about_the_model

    error = UpstreamStatusError(upstream_error_message(body, 404), 404, body=body)
    assert _is_about_the_model(error, model) is about_the_model


def test_a_huge_model_name_is_not_echoed_whole(http: httpx.Client) -> None:
    """``/api/show`` quoted a 20 MB model name back in its 404: a 20 MB error body."""
    name = "m" * 1_000_000
    for path in ("/api/show", "/api/generate"):
        answer = http.post(path, json={"model": name, "prompt": ""})
        assert answer.status_code == 404 and len(answer.content) < 1000, answer.text[:300]
        assert "1,000,000 characters" in answer.json()["error"]
    answer = http.get(f"/v1/models/{'m' * 60_000}")
    assert answer.status_code == 404 and len(answer.content) < 1000


def test_a_huge_model_name_in_a_backends_404_is_read_in_linear_time() -> None:
    """The name was compiled into a pattern: a client's 20 MB model name, quoted back in
    vLLM's 404, held the worker 10 s. Run apart, so a regression fails, not hangs."""
    code = """
from trioproxy.errors import UpstreamStatusError
from trioproxy.routes_ollama import _is_about_the_model
name = "m" * 40_000_000
error = UpstreamStatusError(f"The model `{name}` does not exist.", 404)
assert _is_about_the_model(error, name) and not _is_about_the_model(error, name[:-1])
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)


@pytest.mark.parametrize("consume", [_ollama_stream, _openai_stream])
def test_an_error_in_the_middle_of_a_stream_is_an_error_not_a_finished_answer(
    wrong_shape_proxy: ServerProcess, consume: Any
) -> None:
    """OpenRouter reports a provider failing mid-stream as a chunk with an ``error`` beside
    a choice finished with ``finish_reason: "error"``. Ollama clients must not get it as a
    normal stop (the cut answer would pass for a whole one): they get an error line; the
    openai SDK raises on the chunk, relayed as it came. Both count as an error stream."""
    before = _error_streams(wrong_shape_proxy)
    texts, error = consume(wrong_shape_proxy, "openrouter-mid-error")
    assert "".join(texts) == "Hello wor"
    assert error is not None and "Provider disconnected unexpectedly" in str(error)
    assert _error_streams(wrong_shape_proxy) == before + 1


@pytest.mark.parametrize("consume", [_ollama_stream, _openai_stream])
def test_an_error_with_choices_as_the_first_event_gets_a_real_status(
    wrong_shape_proxy: ServerProcess, consume: Any
) -> None:
    texts, error = consume(wrong_shape_proxy, "openrouter-error-first")
    assert texts == []
    assert getattr(error, "status_code", None) == 502, error
    assert "Provider disconnected unexpectedly" in str(error)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_a_completion_finished_with_an_error_is_a_502_not_an_empty_answer(
    wrong_shape_proxy: ServerProcess, path: str
) -> None:
    body = {"model": "openrouter-error", "prompt": "hi", "stream": False,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    response = httpx.post(wrong_shape_proxy.url + path, json=body, timeout=10)
    assert response.status_code == 502, response.text
    assert "Provider disconnected unexpectedly" in response.json()["error"]


def test_a_refusal_reaches_ollama_clients_as_the_answer(wrong_shape_proxy: ServerProcess) -> None:
    """A refusal (OpenAI's structured outputs) has no field in Ollama's API: it is the
    answer's text, streamed or not, never an empty answer."""
    texts, error = _ollama_stream(wrong_shape_proxy, "refusal")
    assert error is None and "".join(texts) == "I can't"
    with ollama.Client(host=wrong_shape_proxy.url, timeout=10) as client:
        answer = client.chat(model="refusal", messages=[{"role": "user", "content": "hi"}])
        assert answer.message.content == "I can't help with that"
        generated = client.generate(model="refusal", prompt="hi")
        assert generated.response == "I can't help with that"


def test_num_predict_goes_as_max_completion_tokens_to_a_model_that_refuses_max_tokens(
    wrong_shape_proxy: ServerProcess,
) -> None:
    """OpenAI's reasoning models refuse ``max_tokens`` (num_predict's usual name) and ask
    for ``max_completion_tokens``: the request is sent again so, and later ones go so from
    the start, streamed or not; other models keep ``max_tokens``."""
    sent = _WrongShapeBackend.requests
    sent.clear()
    options = {"num_predict": 64}
    with ollama.Client(host=wrong_shape_proxy.url, timeout=10) as client:
        asked = [{"role": "user", "content": "hi"}]
        answer = client.chat(model="refuses-max-tokens", messages=asked, options=options)
        assert answer.message.content == "thought it through"
        parts = client.chat(
            model="refuses-max-tokens", messages=asked, options=options, stream=True
        )
        assert "".join(part.message.content or "" for part in parts) == "Hello"
        client.chat(model="refusal", messages=asked, options=options)
    limits = [(r.get("max_tokens"), r.get("max_completion_tokens")) for r in sent]
    assert limits == [(64, None), (None, 64), (None, 64), (64, None)]


def test_a_backend_that_refuses_stream_options_still_streams_to_ollama_clients(
    wrong_shape_proxy: ServerProcess,
) -> None:
    """Mistral's API refuses ``stream_options`` (422, extra_forbidden), which the proxy
    adds to get token counts. The stream is asked again without it, and later streams go
    without it from the start; ollama-python (which streams by default) works."""
    sent = _WrongShapeBackend.stream_requests
    sent.clear()
    for _ in range(2):
        texts, error = _ollama_stream(wrong_shape_proxy, "refuses-stream-options")
        assert error is None, error
        assert "".join(texts) == "Hello"
    assert ["stream_options" in request for request in sent] == [True, False, False]
    # per model: another one behind the same backend still gets its token counts
    _ollama_stream(wrong_shape_proxy, "full-json")
    assert "stream_options" in sent[-1]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
def test_a_stream_sent_again_with_its_system_messages_joined_counts_as_the_stream_it_is(
    wrong_shape_proxy: ServerProcess, path: str
) -> None:
    """A stream whose first sending the backend refused with a 500 (Ollama's, llama.cpp's
    "system message must be at the beginning") and that went through sent again with its
    system messages joined is one completed stream: the refusal's account of the request
    (a stream that failed, answered plainly) was kept, so the stream the client read whole
    counted as an error (and the 5xx error rate's)."""
    from .test_metrics_e2e import scrape, total, wait_for

    model = f"system-first-counted-{path.count('/')}-500"  # the quirk is not known yet
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "weather?"},
    ]
    before = scrape(wrong_shape_proxy.url)
    sent = _WrongShapeBackend.requests
    sent.clear()
    answer = httpx.post(
        wrong_shape_proxy.url + path,
        json={"model": model, "messages": messages, "stream": True},
        timeout=10,
    )
    assert answer.status_code == 200 and "Hello" in answer.text, answer.text
    assert len(sent) == 2  # refused, then sent again joined

    def streams(outcome: str) -> float:
        now = total(scrape(wrong_shape_proxy.url), "trioproxy_streams_total", outcome=outcome)
        return now - total(before, "trioproxy_streams_total", outcome=outcome)

    wait_for(lambda: streams("completed") + streams("error") >= 1)
    assert (streams("completed"), streams("error")) == (1, 0)
