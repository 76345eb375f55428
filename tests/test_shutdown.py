"""A graceful shutdown as clients see it: real proxy processes on 127.0.0.1.

Once a shutdown began, every response says ``Connection: close`` (a pooling client then
opens its next connection to a live instance instead of failing on a closed one), a
request already received is answered, the listening socket is closed everywhere (new
connections are refused, not queued), and nothing holds the process past its requests.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from .conftest import ServerProcess, wait_healthy
from .test_cli_config import _start_demo_proxy


def _address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def _chat_request(content: str, *, stream: bool = False) -> bytes:
    body = json.dumps({
        "model": "demo-chat",
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    }).encode()  # fmt: skip
    return (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def _read_response(sock: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """One response with a Content-Length: its head (lower case), its body, and what
    followed it."""
    received = buffered
    while b"\r\n\r\n" not in received:
        data = sock.recv(65536)
        assert data, f"closed without a response: {received!r}"
        received += data
    head, _, rest = received.partition(b"\r\n\r\n")
    head = head.lower()
    length = int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(rest) < length:
        data = sock.recv(65536)
        assert data, "closed in the middle of a body"
        rest += data
    return head, rest[:length], rest[length:]


def _read_stream(sock: socket.socket) -> tuple[bytes, bytes]:
    """One chunked response: its head (lower case), and what followed it."""
    received = b""
    while b"\r\n0\r\n\r\n" not in received:
        data = sock.recv(65536)
        assert data, f"closed in the middle of a stream: {received[-200:]!r}"
        received += data
    head = received.partition(b"\r\n\r\n")[0].lower()
    return head, received.partition(b"\r\n0\r\n\r\n")[2]


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("workers", [1, 2])
def test_a_response_after_the_shutdown_began_says_the_connection_closes(workers: int) -> None:
    """Without it an httpx or openai client kept the connection in its pool and its next
    request failed on it (EOF, reset) instead of going to a live instance."""
    server = _start_demo_proxy(workers, GRACEFUL_TIMEOUT="10", LOG_LEVEL="INFO")
    try:
        wait_healthy(server.url, timeout=30)
        with socket.create_connection(_address(server), timeout=10) as sock:
            sock.sendall(_chat_request("hi [[first_delay=1]]"))
            time.sleep(0.4)  # waiting for the backend
            server.process.send_signal(signal.SIGTERM)
            head, body, _ = _read_response(sock)
            assert head.startswith(b"http/1.1 200"), head
            assert b"\r\nconnection: close" in head, head
            assert json.loads(body)["done"] is True
            assert _closed_by_server(sock)
        assert server.process.wait(timeout=10) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("first_streams", [True, False])
def test_a_request_received_behind_the_one_in_flight_does_not_hold_the_shutdown(
    first_streams: bool,
) -> None:
    """A request pipelined behind one in flight when the shutdown began (or arriving just
    as its response went out) held the process for the whole GRACEFUL_TIMEOUT: hypercorn's
    reader waited for a turn that never came. Behind a stream whose head went out before
    the shutdown it is served, saying the connection closes; behind a reply that already
    said so, the connection closes (the client resends it, RFC 9112 9.3.2)."""
    server = _start_demo_proxy(1, GRACEFUL_TIMEOUT="20")
    try:
        wait_healthy(server.url, timeout=30)
        with socket.create_connection(_address(server), timeout=10) as sock:
            first = _chat_request("hi [[tokens=10]] [[delay=0.1]]", stream=first_streams)
            sock.sendall(first + _chat_request("hi"))
            time.sleep(0.4)  # the first is under way, the second waits behind it
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            if first_streams:
                head, after = _read_stream(sock)
                assert head.startswith(b"http/1.1 200") and b"connection: close" not in head
                second, body, _ = _read_response(sock, after)
                assert second.startswith(b"http/1.1 200"), second
                assert b"\r\nconnection: close" in second, second
                assert json.loads(body)["done"] is True
            else:
                head, _, after = _read_response(sock)
                assert b"\r\nconnection: close" in head and after == b""
            assert _closed_by_server(sock)
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - started < 5, "held for the grace period"
    finally:
        server.stop()


def test_part_of_a_request_behind_a_stream_does_not_hold_the_shutdown() -> None:
    """Only a whole head received behind the response is served at shutdown: a part of
    one (a client that stalled mid-head) started a new cycle whose reader waited for the
    rest, holding the connection and the process for the whole GRACEFUL_TIMEOUT."""
    server = _start_demo_proxy(1, GRACEFUL_TIMEOUT="20")
    try:
        wait_healthy(server.url, timeout=30)
        with socket.create_connection(_address(server), timeout=10) as sock:
            first = _chat_request("hi [[tokens=10]] [[delay=0.1]]", stream=True)
            sock.sendall(first + b"GET /api/version HTTP/1.1\r\nHo")
            time.sleep(0.4)  # the stream is under way, half a head behind it
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            head, _ = _read_stream(sock)
            assert head.startswith(b"http/1.1 200")
            assert _closed_by_server(sock)
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - started < 5, "held for the grace period"
    finally:
        server.stop()


def test_a_reply_cut_at_the_end_of_the_grace_period_is_recorded_as_the_proxys_doing(
    start_proxy: Callable[..., ServerProcess], demo_backend: ServerProcess
) -> None:
    """A client still taking its reply when GRACEFUL_TIMEOUT runs out is cut by the proxy:
    a 503, as the metrics document it, not a 499 (a client that went away)."""
    proxy = start_proxy(demo_backend.url, GRACEFUL_TIMEOUT="1", ACCESS_LOG="true", LOG_LEVEL="INFO")
    with socket.socket() as sleeper:
        sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sleeper.settimeout(10)
        sleeper.connect(_address(proxy))
        sleeper.sendall(_chat_request("[[tokens=400000]] long"))
        assert sleeper.recv(1, socket.MSG_PEEK)  # the reply is going out; we take no more
        time.sleep(0.2)
        proxy.process.send_signal(signal.SIGTERM)
        assert proxy.process.wait(timeout=10) == 0
    assert proxy.reader is not None
    proxy.reader.join(timeout=5)
    access = [line for line in proxy.log().splitlines() if "POST /api/chat" in line]
    # the 200 the client got (the metrics record the 503), and what cut it
    assert len(access) == 1 and " 200 " in access[0], access
    assert "(cut by the shutdown)" in access[0], access


def test_a_request_still_sending_its_body_gets_a_503_before_the_grace_period_ends(
    start_proxy: Callable[..., ServerProcess], demo_backend: ServerProcess
) -> None:
    """hypercorn cut it when GRACEFUL_TIMEOUT ran out: the client got an empty 500 and the
    metrics a 499 (a client that went away), though the client was still sending. It is
    answered a little before, in its dialect, as a request still waiting for the backend."""
    proxy = start_proxy(demo_backend.url, GRACEFUL_TIMEOUT="1", ACCESS_LOG="true", LOG_LEVEL="INFO")
    with socket.create_connection(_address(proxy), timeout=10) as sock:
        sock.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model":'
        )
        time.sleep(0.5)  # the proxy waits for the rest of the body
        proxy.process.send_signal(signal.SIGTERM)
        head, body, _ = _read_response(sock)
        assert head.startswith(b"http/1.1 503"), head
        assert b"\r\nconnection: close" in head, head
        assert "shutting down" in json.loads(body)["error"]
        assert proxy.process.wait(timeout=10) == 0
    assert proxy.reader is not None
    proxy.reader.join(timeout=5)
    access = [line for line in proxy.log().splitlines() if "POST /api/chat" in line]
    assert len(access) == 1 and " 503 " in access[0], access


@pytest.mark.parametrize("path", ["/api/chat", "/api/pull"])  # the fast path, and Quart's
def test_a_refusal_waiting_for_the_body_it_drops_is_answered_when_the_server_stops(
    path: str,
) -> None:
    """A refused request reads and drops its small body for up to a second, so that its
    connection serves the next one. A second signal stops the server within half a second:
    the refusal still waiting for that body was cut with hypercorn's empty 500. It goes out
    at once instead, saying the connection closes."""
    server = _start_demo_proxy(
        1, GRACEFUL_TIMEOUT="30", PROXY_API_KEYS="alice:sk-alice-0123456789abcdef"
    )
    try:
        wait_healthy(server.url, timeout=30)
        with socket.create_connection(_address(server), timeout=10) as sock:
            sock.sendall(
                b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                b"Content-Length: 10\r\n\r\n" % path.encode()  # and no body
            )
            # refused: the proxy waits up to a second for the body to drop; the second
            # signal comes well within it (hypercorn cut the wait half a second later)
            time.sleep(0.25)
            for _ in range(2):
                server.process.send_signal(signal.SIGTERM)
                time.sleep(0.05)
            head, body, _ = _read_response(sock)
            assert head.startswith(b"http/1.1 401"), head
            assert b"\r\nconnection: close" in head, head
            assert "API key" in json.loads(body)["error"]
        assert server.process.wait(timeout=10) == 0
    finally:
        server.stop()


@pytest.mark.parametrize(("signals", "workers"), [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_requests_still_waiting_for_the_backend_get_a_503(signals: int, workers: int) -> None:
    """In their caller's dialect, however the proxy stops. On one signal hypercorn would
    close their connections without a response when GRACEFUL_TIMEOUT runs out: they are
    answered a little before. On a second one hypercorn, cancelled at once, answered them
    with an empty 500, and with --workers the master killed its workers, connections and
    all: they are answered at once, and the process still stops at once."""
    server = _start_demo_proxy(workers, GRACEFUL_TIMEOUT="1.5" if signals == 1 else "30")
    replies: dict[str, httpx.Response | str] = {}
    messages = [{"role": "user", "content": "hi [[first_delay=20]]"}]
    bodies = {
        "/api/chat": {"model": "demo-chat", "messages": messages, "stream": False},
        "/v1/chat/completions": {"model": "demo-chat", "messages": messages},
    }

    def ask(path: str) -> None:
        try:
            replies[path] = httpx.post(server.url + path, json=bodies[path], timeout=30)
        except httpx.HTTPError as exc:
            replies[path] = f"broken: {exc!r}"

    try:
        wait_healthy(server.url, timeout=30)
        threads = [threading.Thread(target=ask, args=(path,), daemon=True) for path in bodies]
        for thread in threads:
            thread.start()
        time.sleep(0.6)  # both wait for the backend
        started = time.monotonic()
        for _ in range(signals):
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        for thread in threads:
            thread.join(timeout=15)
        assert server.process.wait(timeout=15) == 0
        assert time.monotonic() - started < (5 if signals == 1 else 3)
        ollama, openai = replies["/api/chat"], replies["/v1/chat/completions"]
        assert isinstance(ollama, httpx.Response) and ollama.status_code == 503, ollama
        assert isinstance(openai, httpx.Response) and openai.status_code == 503, openai
        assert "shutting down" in ollama.json()["error"]
        assert "shutting down" in openai.json()["error"]["message"]
    finally:
        server.stop()


def test_sighup_drains_like_sigterm() -> None:
    """SIGHUP (a closed terminal or SSH session) killed the process, streams and all."""
    server = _start_demo_proxy(1, GRACEFUL_TIMEOUT="10")
    try:
        wait_healthy(server.url, timeout=30)
        with socket.create_connection(_address(server), timeout=10) as sock:
            sock.sendall(_chat_request("hi [[tokens=10]] [[delay=0.1]]", stream=True))
            time.sleep(0.4)  # the stream is under way
            server.process.send_signal(signal.SIGHUP)
            head, _ = _read_stream(sock)
            assert head.startswith(b"http/1.1 200")
        assert server.process.wait(timeout=10) == 0
    finally:
        server.stop()
