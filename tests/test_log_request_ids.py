"""Every log line written while a request is served carries its request id, the one its
``X-Request-ID`` response header and its access line carry: in the task that serves it,
in the tasks it starts, and on the server's own line about an error that escaped the app.
Lines about no request (startup, the readiness checks) carry ``-``.

The end-to-end tests run a real proxy (its own process) against a dead port, a scripted
backend, or the demo with a fault injected; the unit tests drive ``Tracked`` and the
log handler in process. That identical lines with different ids still count as repeats
is test_log_repeats.py's (``test_a_line_repeated_within_the_window_...``, and
``test_a_dead_backend_is_one_warning_not_one_per_request`` in both formats).
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import httpx
import pytest
import trio

from trioproxy import logs
from trioproxy.exchange import RequestState, Tracked, new_state
from trioproxy.logs import (
    TEXT_FORMAT,
    BackgroundStreamHandler,
    JsonFormatter,
    RequestContextFilter,
    TextFormatter,
    request_id_var,
)
from trioproxy.metrics import MetricsCollector

from .conftest import ServerProcess, _spawn, base_env, closed_port_url, wait_healthy
from .fakes import FullLengthEmbeddings, serving

StartProxy = Callable[..., ServerProcess]
FORMATS = ["text", "json"]


class Line(NamedTuple):
    level: str
    logger: str
    request_id: str
    message: str


# "2026-01-02 10:11:12,345 WARNING trioproxy.relay [ID] message" (TEXT_FORMAT)
_TEXT_LINE = re.compile(r"^\S+ \S+ (\w+) (\S+) \[([^\]]*)\] (.*)$")


def parsed(log: str, fmt: str) -> list[Line]:
    """The log's lines (a traceback's lines and the plain notices left out)."""
    lines = []
    for text in log.splitlines():
        if fmt == "json":
            if text.startswith("{"):
                entry = json.loads(text)
                lines.append(
                    Line(entry["level"], entry["logger"], entry["request_id"], entry["message"])
                )
        elif (match := _TEXT_LINE.match(text)) is not None:
            lines.append(Line(*match.groups()))
    return lines


def lines_of(
    server: ServerProcess, request_id: str, fmt: str, last: str = "trioproxy.access"
) -> list[Line]:
    """The lines carrying ``request_id``, once one of logger ``last`` is out."""
    deadline = time.monotonic() + 10
    while True:
        mine = [line for line in parsed(server.log(), fmt) if line.request_id == request_id]
        if any(line.logger == last for line in mine):
            return mine
        assert time.monotonic() < deadline, f"no {last} line for {request_id}:\n{server.log()}"
        time.sleep(0.02)


@pytest.fixture(scope="module", params=FORMATS)
def dead_backend_proxy(request: pytest.FixtureRequest, start_proxy: StartProxy) -> Any:
    fmt = request.param
    proxy = start_proxy(
        closed_port_url(),
        MAX_RETRIES="0",
        ACCESS_LOG="true",
        LOG_FORMAT=fmt,
        LOG_REPEAT_WINDOW_SECONDS="0",  # each request's failure is a line of its own
    )
    return proxy, fmt


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/chat", {"model": "m", "messages": [], "stream": False}),  # fast path
        ("GET", "/api/tags", None),  # through Quart
    ],
)
def test_a_warning_carries_the_id_of_its_access_line_and_response_header(
    dead_backend_proxy: tuple[ServerProcess, str], method: str, path: str, body: Any
) -> None:
    """The client sends no id: the one the proxy makes up is on the response, on the
    WARNING about the backend's failure and on the access line, in either format."""
    proxy, fmt = dead_backend_proxy
    answer = httpx.request(method, proxy.url + path, json=body, timeout=10)
    assert answer.status_code == 502
    request_id = answer.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    mine = lines_of(proxy, request_id, fmt)
    assert [line.level for line in mine] == ["WARNING", "INFO"], mine
    assert mine[0].message.startswith("backend request failed: cannot connect to 127.0.0.1:")
    assert mine[1].logger == "trioproxy.access" and f"{method} {path} 502" in mine[1].message


def test_a_background_line_carries_no_request_id(
    dead_backend_proxy: tuple[ServerProcess, str],
) -> None:
    """The readiness check runs in the app's own task: its line is about no request,
    though requests were served before and after it was written."""
    proxy, fmt = dead_backend_proxy
    httpx.get(proxy.url + "/api/tags", timeout=10)
    ready = [line for line in parsed(proxy.log(), fmt) if line.logger == "trioproxy.ready"]
    assert ready and ready[0].message.startswith("the backend is not reachable: "), proxy.log()
    assert {line.request_id for line in ready} == {"-"}
    startup = parsed(proxy.log(), fmt)[0]  # the first line the program wrote
    assert startup.request_id == "-", proxy.log()


def test_a_line_from_a_task_the_request_started_carries_its_id(
    start_proxy: StartProxy,
) -> None:
    """2049 inputs are two batches, each asked for by a task of its own in the request's
    nursery: the backend refusing ``dimensions`` is logged from one of them."""
    FullLengthEmbeddings.refuses, FullLengthEmbeddings.asked = True, []
    try:
        with serving(FullLengthEmbeddings) as url:
            proxy = start_proxy(url, MAX_RETRIES="0", ACCESS_LOG="true")
            body = {"model": "demo-embed", "input": ["a"] * 2049, "dimensions": 4}
            answer = httpx.post(
                proxy.url + "/api/embed", json=body, headers={"X-Request-ID": "embed-1"}, timeout=10
            )
            assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "embed-1"
            mine = lines_of(proxy, "embed-1", "text")
    finally:
        FullLengthEmbeddings.refuses = False
    assert len([body for body in FullLengthEmbeddings.asked if "dimensions" in body]) >= 2
    (warning,) = [line for line in mine if line.level == "WARNING"]
    assert warning.message.startswith("the backend refuses dimensions for model demo-embed")


def _answer_to(url: str, data: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers (names lowercase) of the answer to ``data`` sent raw."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
    status_line, *lines = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), {name.lower(): value for name, value in headers.items()}


# past h11's bound on a head still incomplete (16 KiB; a whole one that large is read)
_HEAD_TOO_LARGE = b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Big: %s" % (b"a" * 20_000)
# each a head the server answers itself, before the app sees a request; some name an id
_REFUSED_HEADS = [
    (b"NOT A REQUEST LINE\r\nX-Request-ID: mine-1\r\n\r\n", 400),
    (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nX-Request-ID: mine-2\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (_HEAD_TOO_LARGE, 431),
    (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
]


@pytest.mark.parametrize(
    ("head", "status"),
    _REFUSED_HEADS,
    ids=["malformed", "both-lengths", "head-too-large", "unknown-coding", "http2-preface"],
)
def test_a_refusal_by_the_server_carries_a_fresh_id_its_access_line_has(
    dead_backend_proxy: tuple[ServerProcess, str], head: bytes, status: int
) -> None:
    """A head the server refuses before the app sees it (malformed, both lengths, too
    large, a transfer coding it does not speak, HTTP/2's preface) is answered with an id,
    as every answer is, and its access line has it: a client's report of a 400 finds its
    line. A fresh one, though the head named one: a head refused for how it was written
    is not one whose headers can be trusted."""
    proxy, fmt = dead_backend_proxy
    answered, headers = _answer_to(proxy.url, head)
    assert answered == status
    request_id = headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), headers
    (line,) = lines_of(proxy, request_id, fmt)
    assert line.message.endswith(f" - - {status} 0.0 ms 0 B (refused: malformed request)")


def test_a_refused_websocket_handshake_carries_the_clients_id(
    dead_backend_proxy: tuple[ServerProcess, str],
) -> None:
    """A WebSocket handshake the app refuses was read whole: the client's id is honoured,
    on its 400 and its access line, as on any request."""
    proxy, fmt = dead_backend_proxy
    handshake = (
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"X-Request-ID: ws-%s\r\n\r\n" % fmt.encode()
    )
    status, headers = _answer_to(proxy.url, handshake)
    assert status == 400 and headers["x-request-id"] == f"ws-{fmt}", headers
    (line,) = lines_of(proxy, f"ws-{fmt}", fmt)
    assert " - - 400 0.0 ms " in line.message and line.message.endswith("(refused: websocket)")


def test_a_handshake_the_server_refuses_itself_carries_a_fresh_id(
    dead_backend_proxy: tuple[ServerProcess, str],
) -> None:
    """An invalid WebSocket handshake (no key) is refused by the server before the app:
    its 400 got no id and no access line (nor a count); now both, as the other
    refusals before the app, with a fresh id."""
    proxy, fmt = dead_backend_proxy
    handshake = (
        b"GET /api/tags HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"X-Request-ID: mine-3\r\n\r\n"
    )
    status, headers = _answer_to(proxy.url, handshake)
    request_id = headers["x-request-id"]
    assert status == 400 and re.fullmatch(r"[0-9a-f]{32}", request_id), headers
    (line,) = lines_of(proxy, request_id, fmt)
    assert line.message.endswith(" - - 400 0.0 ms 0 B (refused: websocket)"), line


# Our own bug, injected: a stream's chunk holding the demo's fourth word fails its write.
# The error escapes the app, and the server (hypercorn) logs it once the app has returned.
FAULTY_PROXY_SCRIPT = """
from trioproxy import exchange
original = exchange.CountingSend.count
def count(self, body):
    if b'"done":false' in body and b"trioproxy" in body:  # an /api/chat chunk mid-stream
        raise RuntimeError("injected bug")
    if b'"type":"response.output_text.delta"' in body:  # a resumed stream's (through Quart)
        raise RuntimeError("injected bug")
    original(self, body)
exchange.CountingSend.count = count
from trioproxy._entry import main
raise SystemExit(main())
"""


@pytest.fixture(params=FORMATS)
def faulty_proxy(
    request: pytest.FixtureRequest, demo_backend: ServerProcess
) -> Iterator[tuple[ServerProcess, str]]:
    fmt = request.param
    env = base_env(OPENAI_API_BASE_URL=demo_backend.url, ACCESS_LOG="true", LOG_FORMAT=fmt)
    args = ["-c", FAULTY_PROXY_SCRIPT, "--host", "127.0.0.1", "--port", "0", "--env-file", ""]
    server = _spawn(args, env)
    try:
        wait_healthy(server.url)
        yield server, fmt
    finally:
        server.stop()


def test_the_servers_line_about_an_error_that_escaped_carries_the_id(
    faulty_proxy: tuple[ServerProcess, str],
) -> None:
    """A stream cut by the proxy's own bug after its 200 went out: the traceback is
    hypercorn's ``Error in ASGI Framework``, written in the request's task after the app
    returned. It carried ``-``: the 500-class bug an operator looks for by the client's
    id was the one line that did not name it."""
    proxy, fmt = faulty_proxy
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi [[tokens=8]]"}]}
    with httpx.stream("POST", proxy.url + "/api/chat", json=body, timeout=10) as answer:
        request_id = answer.headers["X-Request-ID"]
        with pytest.raises(httpx.RemoteProtocolError):
            answer.read()  # cut: the chunked body never ends
    mine = lines_of(proxy, request_id, fmt, last="hypercorn.error")
    errors = [line for line in mine if line.level == "ERROR"]
    assert [(e.logger, e.message) for e in errors] == [
        ("hypercorn.error", "Error in ASGI Framework")
    ], proxy.log()
    assert "RuntimeError: injected bug" in proxy.log()


def test_the_servers_line_carries_the_id_through_quart_too(
    faulty_proxy: tuple[ServerProcess, str],
) -> None:
    """The same on a route Quart serves: a resumed Responses stream (``GET
    /v1/responses/{id}?stream=true``) cut by the proxy's bug. Quart serves the request in
    a task of its own, and the error reaches the server's task through Quart's nursery:
    the id must be there too."""
    proxy, fmt = faulty_proxy
    created = httpx.post(
        proxy.url + "/v1/responses", json={"model": "demo-chat", "input": "hi"}, timeout=10
    )
    assert created.status_code == 200, created.text
    url = f"{proxy.url}/v1/responses/{created.json()['id']}?stream=true"
    with httpx.stream("GET", url, timeout=10) as answer:
        assert answer.status_code == 200
        request_id = answer.headers["X-Request-ID"]
        with pytest.raises(httpx.RemoteProtocolError):
            answer.read()  # cut: the chunked body never ends
    mine = lines_of(proxy, request_id, fmt, last="hypercorn.error")
    errors = [(line.logger, line.message) for line in mine if line.level == "ERROR"]
    assert ("hypercorn.error", "Error in ASGI Framework") in errors, proxy.log()
    # the 200 it got, and the 500 the metrics count for our bug
    (access,) = [line for line in mine if line.logger == "trioproxy.access"]
    assert " 200 " in access.message and access.message.endswith(" (error: 500)"), access


# -- in process ------------------------------------------------------------------------


@pytest.mark.parametrize("sent", ["abc\n", "abc\r\n", "a b", "x" * 129, "", "é"])
def test_a_client_id_that_could_break_a_log_line_is_replaced(sent: str) -> None:
    """A client's id is written on every line of its request: one with a line end (which
    ``$`` let through at the end) or a space would forge or shift a text line."""
    collector = MetricsCollector(enabled=False, system_enabled=False)
    made = new_state(collector, "/api/chat", "POST", sent, None).request_id
    assert re.fullmatch(r"[0-9a-f]{32}", made)


def test_a_sane_client_id_is_kept() -> None:
    collector = MetricsCollector(enabled=False, system_enabled=False)
    for sent in ["abc", "req_01J:9.x-Y", "x" * 128]:
        assert new_state(collector, "/api/chat", "POST", sent, None).request_id == sent


class Records(logging.Handler):
    """The records a logger hands its handlers, request id filled in as configured."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, Records]]:
    logger = logging.getLogger("test-request-ids")
    handler = Records()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


async def _ignore(event: Any) -> None:
    pass


def _tracked(request_id: str) -> Tracked:
    collector = MetricsCollector(enabled=False, system_enabled=False)
    return Tracked(collector, RequestState(request_id, None), _ignore)


async def test_tracked_gives_its_id_to_the_tasks_it_starts_and_takes_it_back(
    captured: tuple[logging.Logger, Records],
) -> None:
    logger, handler = captured

    async def child() -> None:
        await trio.lowlevel.checkpoint()
        logger.warning("from a child task")

    async with _tracked("r1"), trio.open_nursery() as nursery:
        logger.warning("from the request's task")
        nursery.start_soon(child)
    logger.warning("after the request")
    with trio.move_on_after(0):  # a cancellation (a BaseException) ends it as well
        async with _tracked("r2"):
            await trio.sleep_forever()
    logger.warning("after a cancelled request")
    assert [(r.msg, r.request_id) for r in handler.records] == [  # type: ignore[attr-defined]
        ("from the request's task", "r1"),
        ("from a child task", "r1"),
        ("after the request", "-"),
        ("after a cancelled request", "-"),
    ]


async def test_an_error_escaping_tracked_leaves_the_id_for_the_servers_line(
    captured: tuple[logging.Logger, Records],
) -> None:
    logger, handler = captured

    async def as_the_server_runs_the_app() -> None:  # in a task of its own, as hypercorn
        try:
            async with _tracked("r3"):
                raise RuntimeError("bug")
        except RuntimeError:
            logger.exception("Error in ASGI Framework")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(as_the_server_runs_the_app)
    logger.warning("in the task that started it")
    assert [(r.msg, r.request_id) for r in handler.records] == [  # type: ignore[attr-defined]
        ("Error in ASGI Framework", "r3"),
        ("in the task that started it", "-"),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_line_keeps_the_id_it_was_logged_with_whenever_it_is_written(fmt: str) -> None:
    """The writer thread writes a line later; it must be the id of the moment it was
    logged, not whatever the context holds by then."""
    stream = io.StringIO()
    handler = BackgroundStreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    logger = logging.getLogger("test-request-ids-written")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = request_id_var.set("r4")
        try:
            logger.warning("while serving")
        finally:
            request_id_var.reset(token)
        logger.warning("after")
        assert logs._writer.drain()
    finally:
        logger.removeHandler(handler)
    lines = parsed(stream.getvalue(), fmt)
    assert [(line.request_id, line.message) for line in lines] == [
        ("r4", "while serving"),
        ("-", "after"),
    ]
