"""ACCESS_LOG=true: one request is one line, whatever its path holds.

The server decodes the path (``%0a`` becomes a newline) before the access line is written;
a client must not be able to end that line and forge another one.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from collections.abc import Callable

import httpx
import pytest

from trioproxy.client_address import NO_PROXIES, ClientAddresses
from trioproxy.config import query_secrets
from trioproxy.exchange import STATUS_SHUT_DOWN, AccessLine, CountingSend, _finish_metric
from trioproxy.logs import ACCESS_LOGGER
from trioproxy.metrics import RequestMetrics
from trioproxy.metrics.labels import (
    PATH_LIMIT,
    clipped,
    loggable_path,
    loggable_query,
    loggable_text,
)
from trioproxy.metrics.store import effective_status

from .conftest import ServerProcess

StartProxy = Callable[..., ServerProcess]

KEY = "sk-access-log-test-key"
# The reviewer's request: a 401 whose path carries a complete, plausible access line.
FORGED = "2020-01-02 21:11:45,337 INFO trioproxy.access [abc] POST /api/chat 200 client=alice"
INJECTING_PATH = (
    "/api/x%0a2020-01-02%2021:11:45,337%20INFO%20trioproxy.access%20%5Babc%5D"
    "%20POST%20/api/chat%20200%20client=alice"
)


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/api/chat", "/api/chat"),
        ("/v1/models/org/model:tag", "/v1/models/org/model:tag"),
        ("/api/x\n2026 INFO forged", "/api/x%0A2026%20INFO%20forged"),
        ("/a\r\x1b[31mred", "/a%0D%1B%5B31mred"),
        ("/100%", "/100%25"),  # % itself, so the encoded form is unambiguous
        ("/caf\u00e9", "/caf%C3%A9"),
        ("/\u2028", "/%E2%80%A8"),  # a line separator to some log viewers
        ("/\udcff", "/%5Cudcff"),  # a surrogate from undecodable bytes: no exception
    ],
)
def test_loggable_path(path: str, logged: str) -> None:
    assert loggable_path(path) == logged


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        (b"beta=true", "beta=true"),  # Claude Code's, on every request
        (b"stream=true&starting_after=3", "stream=true&starting_after=3"),
        # credentials by their parameter's name, however it is spelled
        (b"key=AIzaSyA-1&alt=sse", "key=***&alt=sse"),
        (b"api_key=s1&API-KEY=s2&api%5Fkey=s3", "api_key=***&API-KEY=***&api%5Fkey=***"),
        (
            b"access_token=t&X-Amz-Signature=a&pass=p",
            "access_token=***&X-Amz-Signature=***&pass=***",
        ),
        (b"session=s&code=c&encode=e", "session=***&code=***&encode=e"),
        (b"token=&monkey", "token=&monkey"),  # no value: nothing to hide
        # ";" separates parameters for some servers: the value runs to "&" for the others
        (b"alt=sse;key=s1;b=2&x=1", "alt=sse;key=***&x=1"),
        (b"key=s1;b=2", "key=***"),
        (b"a;b;token=s1", "a;b;token=***"),
        (b"q=a%20b", "q=a%20b"),  # as sent: its escapes stay
        (b"q=a\nb\x1b\xff", "q=a%0Ab%1B%FF"),
        (b"q=\r\n2026 INFO forged", "q=%0D%0A2026%20INFO%20forged"),
    ],
)
def test_loggable_query(query: bytes, logged: str) -> None:
    assert loggable_query(query) == logged


@pytest.mark.parametrize(
    "name",
    ["key", "api_key", "token", "auth", "secret", "pass", "cookie", "session", "sig", "code"],
)
def test_a_query_name_the_backend_url_hides_is_hidden_on_access_lines(name: str) -> None:
    """A name config.py reads as a credential in the backend's URL is one here too."""
    assert query_secrets(f"http://b/v1?{name}=s3cr3t") == ("s3cr3t",)
    assert loggable_query(f"{name}=s3cr3t".encode()) == f"{name}=***"


@pytest.mark.parametrize(
    "query",
    [
        b"key=" + b"x" * 5000 + b"&token=s3cr3t",  # a masked value shortens the line
        b"q=" + b"a=1;" * 4000 + b"key=s3cr3t",  # names are read only where they show
        b"a&" * 8000 + b"key=s3cr3t",
        b"x=" + b"\xff" * 400 + b"&key=s3cr3t",  # escapes lengthen it
    ],
)
def test_a_long_query_shows_no_credential(query: bytes) -> None:
    line = clipped(f"/v1/messages?{loggable_query(query)}", PATH_LIMIT)
    assert "s3cr3t" not in line, line
    assert "=***" in line or line.endswith(" more bytes]"), line  # masked, or cut before it


def test_loggable_text_keeps_one_line() -> None:
    assert loggable_text("backend said: no") == "backend said: no"
    assert loggable_text("a\nb\x1bc") == "a\\nb\\x1bc"


def raw_get(url: str, target: str, request_id: str) -> bytes:
    """A request with the target exactly as given (an HTTP client would re-encode it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nX-Request-ID: {request_id}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def lines_of(server: ServerProcess, request_id: str, timeout: float = 5.0) -> list[str]:
    """The server's log lines carrying ``request_id``, once its access line is out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in server.log().splitlines() if request_id in line]
        if any("trioproxy.access" in line for line in lines):
            return lines
        time.sleep(0.02)
    raise AssertionError(f"no access line for {request_id}:\n{server.log()}")


@pytest.mark.parametrize("keys", [True, False], ids=["with-keys", "open"])
def test_a_path_cannot_forge_an_access_line(
    demo_backend: ServerProcess, start_proxy: StartProxy, keys: bool
) -> None:
    env = {"ACCESS_LOG": "true", "LOG_LEVEL": "INFO"}
    if keys:
        env["PROXY_API_KEYS"] = f"alice:{KEY}"
    proxy = start_proxy(demo_backend.url, **env)
    answer = raw_get(proxy.url, INJECTING_PATH, "inject-1")
    assert answer.startswith(b"HTTP/1.1 401" if keys else b"HTTP/1.1 404"), answer[:40]
    mine = [line for line in lines_of(proxy, "inject-1") if "trioproxy.access" in line]
    assert len(mine) == 1, mine
    assert "/api/x%0A2020-01-02%2021:11:45,337%20INFO" in mine[0]
    # nothing the client sent became a line of its own
    assert not [line for line in proxy.log().splitlines() if line.startswith("2020-01-02")]
    assert FORGED not in proxy.log().splitlines()


def test_json_access_lines_are_one_object_each(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO", LOG_FORMAT="json")
    raw_get(proxy.url, INJECTING_PATH, "inject-2")
    mine = lines_of(proxy, "inject-2")
    entries = [json.loads(line) for line in mine]  # every line is one JSON object
    access = [e for e in entries if e["logger"] == "trioproxy.access"]
    assert len(access) == 1 and access[0]["request_id"] == "inject-2"
    assert "\n" not in access[0]["message"]
    assert access[0]["message"].startswith(
        "127.0.0.1 GET /api/x%0A2020-01-02%2021:11:45,337%20INFO"
    )
    assert access[0]["remote_addr"] == "127.0.0.1"


def test_a_backend_message_that_echoes_a_line_end_stays_on_its_line() -> None:
    """A backend's error quotes what the client sent ("The model `X` does not exist"): a
    model name holding a line end must not forge a line in the text log, whoever logs it."""
    import io
    import logging

    from trioproxy.logs import TEXT_FORMAT, RequestContextFilter, TextFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    logger = logging.getLogger("trioproxy.test-forged-lines")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        forged = "x\n2020-01-02 00:00:00,000 INFO trioproxy.access [0] POST /v1/admin 200"
        logger.warning("backend answered %d: The model `%s` does not exist", 404, forged)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("unhandled")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert "does not exist" in lines[0] and "\\n2020-01-02" in lines[0]
    assert not any(line.startswith("2020-01-02") for line in lines)
    assert lines[-1] == "ValueError: boom"  # a traceback keeps its own lines


def _send_raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_requests_the_server_refuses_below_the_app_are_logged_and_counted(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    """A malformed head, a request with both lengths (smuggling) and HTTP/2's preface are
    answered by the server before the app sees them: still one access line and one counted
    request each, with the status the client got."""
    from .test_metrics_e2e import scrape, total, wait_for

    proxy = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO")
    refused = {
        b"NOT A REQUEST LINE\r\n\r\n": b"HTTP/1.1 400",
        (
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ): b"HTTP/1.1 400",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n": b"HTTP/1.1 505",
    }
    for request, status in refused.items():
        assert _send_raw(proxy.url, request).startswith(status)
    wait_for(lambda: total(scrape(proxy.url), "http_requests_total") == 3)
    samples = scrape(proxy.url)
    assert total(samples, "http_requests_total", status="400", endpoint="other") == 2
    assert total(samples, "http_requests_total", status="505", endpoint="other") == 1
    lines = [line for line in proxy.log().splitlines() if "trioproxy.access" in line]
    # the peer's address first, as on every access line: known though the head was not
    assert sum("] 127.0.0.1 - - 400 " in line for line in lines) == 2, lines
    assert sum("] 127.0.0.1 - - 505 " in line for line in lines) == 1, lines
    # a request served normally afterwards is one more, not lost among them
    httpx.get(proxy.url + "/api/tags", timeout=5)
    wait_for(lambda: total(scrape(proxy.url), "http_requests_total") == 4)


def _send_in_two(url: str, first: bytes, second: bytes) -> bytes:
    """``_send_raw`` of ``first + second``, the second part sent once the server has read
    the first (and the app has started on the request)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(first)
        time.sleep(0.2)
        sock.sendall(second)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.mark.parametrize("in_two", [False, True])
@pytest.mark.parametrize("path", ["/api/chat", "/api/show"])  # served below Quart / by Quart
def test_a_body_the_server_refuses_midway_is_recorded_with_the_status_sent(
    demo_backend: ServerProcess, start_proxy: StartProxy, path: str, in_two: bool
) -> None:
    """A malformed chunk in a request's body: the server answers 400 while the app reads
    the body. The app sees only a disconnect, but the client got a 400, not a request it
    left (499). That 400 carries the request's id (it had none), the one its access line
    has: the client's when it sent one, else the one the app gave it, whether the server
    refused the body before the app's task started on it (all of it in one read) or after
    (``in_two``: the malformed chunk comes later)."""
    from .test_metrics_e2e import scrape, total, wait_for

    proxy = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO")
    ids = []
    for sent_id in ("", "X-Request-ID: client-id-1\r\n"):
        malformed = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f'{sent_id}Transfer-Encoding: chunked\r\n\r\n5\r\n{{"a":\r\nzz\r\n'
        ).encode()
        at = malformed.index(b"zz")
        if in_two:
            answer = _send_in_two(proxy.url, malformed[:at], malformed[at:])
        else:
            answer = _send_raw(proxy.url, malformed)
        assert answer.startswith(b"HTTP/1.1 400"), answer
        found = re.search(rb"\r\nx-request-id: ([^\r]+)\r\n", answer, re.IGNORECASE)
        assert found is not None, answer
        ids.append(found.group(1).decode())
    assert ids[1] == "client-id-1" and re.fullmatch("[0-9a-f]{32}", ids[0]), ids
    wait_for(lambda: total(scrape(proxy.url), "http_requests_total") == 2)
    samples = scrape(proxy.url)
    assert total(samples, "http_requests_total", status="400") == 2
    assert total(samples, "http_requests_total", status="499") == 0
    lines = [line for line in proxy.log().splitlines() if "trioproxy.access" in line]
    posts = [line for line in lines if " POST " in line]
    assert len(posts) == 2, lines
    for line, request_id in zip(posts, ids, strict=True):
        assert f"POST {path} 400 " in line and request_id in line, (line, request_id)
        assert "client left" not in line


@pytest.mark.parametrize("path", ["/api/chat", "/api/show"])  # served below Quart / by Quart
def test_a_client_that_leaves_mid_request_is_recorded_as_gone_not_refused(
    demo_backend: ServerProcess, start_proxy: StartProxy, path: str
) -> None:
    """A review: a client that closed its connection after part of its request (the head
    cut short, the whole head, some of the body, or after a ``100 Continue``) was counted
    as a 400 (h11's word for an unfinished message) that no client received. One that
    leaves while its request is being read is a 499, as one that leaves while it is
    answered; a head cut short is no request, as a connection closed before any byte.
    Nothing is answered, so a client that closed only its sending side and still reads
    gets no 400 either (it did: a second review), and the record is true for both."""
    from .test_metrics_e2e import scrape, total, wait_for

    proxy = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO")
    body = b'{"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}'
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode()
    host, port = proxy.url.removeprefix("http://").split(":")
    sends = {
        head[:20]: b"",  # no request
        head + b"\r\n": b"",
        head + b"\r\n" + body[:10]: b"",
        head + b"Expect: 100-continue\r\n\r\n": b"HTTP/1.1 100 ",
    }
    for half_close in (False, True):
        for sent, expected in sends.items():
            with socket.create_connection((host, int(port)), timeout=5) as client:
                client.sendall(sent)
                time.sleep(0.2)  # the server has read it all
                if half_close:  # stops sending, goes on reading
                    client.shutdown(socket.SHUT_WR)
                    received = b""
                    while chunk := client.recv(65536):
                        received += chunk
                    assert received.startswith(expected), received
                    assert b"400" not in received, received
    wait_for(lambda: total(scrape(proxy.url), "http_requests_total") == 6)
    time.sleep(0.3)  # nothing else arrives late
    samples = scrape(proxy.url)
    assert total(samples, "http_requests_total") == 6
    assert total(samples, "http_requests_total", status="499") == 6
    lines = [line for line in proxy.log().splitlines() if "trioproxy.access" in line]
    assert not [line for line in lines if " 400 " in line], lines


def test_an_empty_line_after_a_body_is_not_a_refused_request(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    """The CRLF some clients send after a body was read as a malformed request: a 400
    counted in the metrics, and the connection closed under the client's next request."""
    from .test_metrics_e2e import scrape, total, wait_for

    proxy = start_proxy(demo_backend.url)
    body = json.dumps(
        {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    ).encode()
    chat = (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s\r\n" % (len(body), body)
    )
    last = b"GET /api/version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = _send_raw(proxy.url, chat + last)
    assert answer.count(b"HTTP/1.1 200 ") == 2 and b"HTTP/1.1 400" not in answer, answer[-300:]
    wait_for(lambda: total(scrape(proxy.url), "http_requests_total", endpoint="api_chat") == 1)
    assert total(scrape(proxy.url), "http_requests_total", status="400") == 0


@pytest.mark.parametrize("path", ["/", "/api/tags", "/v1/models", "/health"])
def test_a_head_request_logs_no_body_bytes(
    demo_backend: ServerProcess, start_proxy: StartProxy, path: str
) -> None:
    """A review: the answer to a HEAD went out without its body, but its access line
    said the body's size."""
    proxy = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO")
    request_id = "head-" + path.replace("/", "-")
    answer = httpx.head(proxy.url + path, headers={"X-Request-ID": request_id}, timeout=5)
    assert answer.status_code == 200 and answer.content == b""
    (line,) = [line for line in lines_of(proxy, request_id) if "trioproxy.access" in line]
    assert f" HEAD {path} 200 " in line and line.endswith(" 0 B"), line


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_stream_left_before_the_backend_answered_logs_499(
    demo_backend: ServerProcess, start_proxy: StartProxy, path: str
) -> None:
    """A chaos review: a stream whose client left while the proxy waited to retry the
    backend was logged with status ``-``, while the metrics recorded 499."""
    proxy = start_proxy(
        demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO", MAX_RETRIES="2", RETRY_BACKOFF="5"
    )
    request_id = "left-waiting" + path.replace("/", "-")
    content = f"leave me {path} [[fail_first=3]]"
    messages = [{"role": "user", "content": content}]
    body = {"model": "demo-chat", "stream": True, "messages": messages}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(proxy.url + path, json=body, headers={"X-Request-ID": request_id}, timeout=0.5)
    (line,) = [line for line in lines_of(proxy, request_id) if "trioproxy.access" in line]
    assert f" POST {path} 499 " in line and line.endswith(" 0 B (cancelled)"), line


PIPE_BUF = 4096  # the longest write a pipe takes whole, never torn by another process's


def test_a_huge_path_or_model_name_makes_no_huge_line(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    """A review: a 12 KB path made a 36 KB access line, and a model name a backend quotes
    back ("The model `…` does not exist") a line as long as the request's body allows. The
    workers of --workers N share one stderr, where a line over PIPE_BUF can be torn by
    another worker's; a client must not be able to fill the log either. Each line is cut,
    and the access line still ends with its status and sizes."""
    proxy = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO")
    answer = raw_get(proxy.url, "/nope/" + "%0a" * 4000, "huge-path")
    assert answer.startswith(b"HTTP/1.1 404"), answer[:40]
    model = "m\n\x1b[31m" + "e" * 30_000  # the backend quotes it whole (its body < 64 KB)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    reply = httpx.post(
        proxy.url + "/v1/chat/completions",
        json=body,
        headers={"X-Request-ID": "huge-model"},
        timeout=10,
    )
    assert reply.status_code == 404
    for request_id, status in (("huge-path", "GET /nope/%0A%0A"), ("huge-model", "POST /v1")):
        lines = lines_of(proxy, request_id)
        assert all(len(line.encode()) < PIPE_BUF for line in lines), [len(x) for x in lines]
        (access,) = [line for line in lines if "trioproxy.access" in line]
        assert status in access and " 404 " in access and access.endswith(" B"), access
    (access,) = [line for line in lines_of(proxy, "huge-path") if "trioproxy.access" in line]
    assert " more bytes] 404 " in access, access
    (echoed,) = [line for line in lines_of(proxy, "huge-model") if "backend answered" in line]
    assert "The model `m\\n\\x1b[31meee" in echoed and echoed.endswith(" more bytes]"), echoed


def test_json_lines_are_cut_as_text_lines_are() -> None:
    """JSON writes a control character in 6 bytes: a message of them is cut shorter, so
    the line stays under PIPE_BUF too."""
    import logging

    from trioproxy.logs import JsonFormatter

    for message in ("\x1b" * 100_000, '"' * 100_000, "é" * 100_000, "\udcff" * 100_000):
        record = logging.makeLogRecord({"name": "trioproxy", "levelname": "INFO", "msg": message})
        record.request_id = "r" * 128
        line = JsonFormatter().format(record)
        assert len(line.encode("utf-8", "surrogatepass")) < PIPE_BUF, len(line)
        entry = json.loads(line)
        assert entry["message"].startswith(message[:100]) and entry["message"].endswith(
            " more bytes]"
        )


def test_a_stderr_nobody_reads_stalls_no_request(demo_backend: ServerProcess) -> None:
    """A review: with stderr a pipe nobody read (a stuck log shipper, a parent that never
    reads), the line that filled it blocked the event loop: no request, no ``/health`` was
    answered, and SIGTERM did not stop the process. Lines wait for the pipe on their own
    thread now; once it is read, they are all there."""
    import signal
    import subprocess
    import sys

    from .conftest import LISTEN_LINE, ROOT, base_env

    env = base_env(OPENAI_API_BASE_URL=demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO")
    command = ["-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", "--env-file", ""]
    process = subprocess.Popen(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        while not (match := LISTEN_LINE.search(process.stdout.readline().decode())):
            pass
        url = match.group(1)  # and the pipe is read no more: its 64 KB fill up
        with httpx.Client(timeout=3) as client:
            for i in range(200):  # access lines of over 1 KB each
                answer = client.get(f"{url}/nope/{'x' * 1000}", headers={"X-Request-ID": f"s{i}"})
                assert answer.status_code == 404
            assert client.get(url + "/health").status_code == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)  # reads the pipe, so it drains
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    lines = output.decode().splitlines()
    access = [line for line in lines if "trioproxy.access" in line and " /nope/" in line]
    assert len(access) == 200 and all(" 404 " in line for line in access), len(access)


def test_lines_past_the_backlog_are_dropped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """While stderr takes nothing, lines wait up to ``BACKLOG_LIMIT``; those past it are
    dropped without waiting, and a warning stands where they would have been."""
    import os
    import threading

    from trioproxy import logs

    monkeypatch.setattr(logs, "BACKLOG_LIMIT", 10_000)
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", encoding="utf-8")  # closed below
    writer = logs.LineWriter()
    started = time.monotonic()
    for i in range(200):  # 200 KB: the pipe's 64 KB and the backlog's 10 KB are full
        writer.write(stream, f"line {i} {'x' * 1000}\n")
    assert time.monotonic() - started < 1.0  # never waited for the pipe
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_read_all(read_end)))
    reader.start()
    assert writer.drain(timeout=5.0)
    writer.write(stream, "the last line\n")
    assert writer.drain(timeout=5.0)
    stream.close()
    reader.join(timeout=5)
    lines = received.decode().splitlines()
    assert lines[0].startswith("line 0 ") and lines[-1] == "the last line", lines[-1]
    # each warning stands where the lines it counts were, and counts them all
    expected, warnings = 0, 0
    for line in lines[:-1]:
        if line.startswith("line "):
            assert int(line.split()[1]) == expected, line[:20]
            expected += 1
        else:
            assert line.endswith(" log lines dropped: stderr was not read fast enough"), line
            expected += int(line.split(" WARNING trioproxy [-] ")[1].split()[0])
            warnings += 1
    assert expected == 200 and warnings >= 1


def _read_all(fd: int) -> bytes:
    import os

    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    os.close(fd)
    return data


def test_the_access_log_is_written_whatever_the_log_level(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    """A review: ACCESS_LOG=true with LOG_LEVEL=WARNING (to keep the rest quiet) wrote no
    access line at all, without a word. The access log is asked for by its own setting;
    the other INFO lines still follow LOG_LEVEL."""
    proxy = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="WARNING")
    httpx.get(proxy.url + "/api/tags", headers={"X-Request-ID": "quiet-1"}, timeout=5)
    (line,) = lines_of(proxy, "quiet-1")
    assert " INFO trioproxy.access [quiet-1] 127.0.0.1 GET /api/tags 200 " in line, line
    assert not [
        x for x in proxy.log().splitlines() if " INFO " in x and "trioproxy.access" not in x
    ]


def test_the_writer_writes_whole_lines_up_to_pipe_buf() -> None:
    """Lines waiting go out several per write, but never more than a pipe takes whole
    (PIPE_BUF) and never part of a line: the workers' writes to one stderr do not tear
    each other's lines."""
    import threading

    from trioproxy.logs import LineWriter

    class Recording:
        def __init__(self) -> None:
            self.writes: list[str] = []
            self.gate = threading.Event()

        def write(self, text: str) -> int:
            self.gate.wait(5)  # the first write waits: the lines after it pile up
            self.writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    stream = Recording()
    writer = LineWriter()
    lines = [f"{i} {'é' * (i * 37 % 1500)}\n" for i in range(300)]
    for line in lines:
        writer.write(stream, line)  # type: ignore[arg-type]
    stream.gate.set()
    assert writer.drain(timeout=5.0)
    assert "".join(stream.writes) == "".join(lines)
    assert all(w.endswith("\n") for w in stream.writes)
    assert all(len(w.encode()) <= PIPE_BUF for w in stream.writes)
    assert len(stream.writes) < 250  # several lines per write


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_traceback_is_scrubbed_of_the_secrets(fmt: str) -> None:
    """A review: the secrets were scrubbed from a line's message but not from the
    traceback after it, whose exception text may quote what it was given."""
    import io
    import logging

    from trioproxy.logs import JsonFormatter, RequestContextFilter, TextFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter(("sk-backend-secret-1234",)))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter("%(message)s"))
    logger = logging.getLogger(f"trioproxy.test-scrubbed-{fmt}")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("the backend said: bad key sk-backend-secret-1234")
        except ValueError:
            logger.exception("unhandled")
    finally:
        logger.removeHandler(handler)
    assert "sk-backend-secret" not in stream.getvalue()
    assert "bad key ***" in stream.getvalue()


def test_a_stream_that_failed_after_its_200_logs_the_200_and_its_query(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    """A /v1/messages stream ended by an in-band error event: the client got a 200, and
    the access line says so (then how the stream ended), while the metrics count the
    failure (502). Its query (Claude Code's ``?beta=true``) is on the line, a credential
    in it masked."""
    from .test_metrics_e2e import scrape, total, wait_for

    proxy = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO")
    body = {
        "model": "demo-chat",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "[[tokens=20]] [[drop_after=3]]"}],
    }
    path = "/v1/messages?beta=true&key=not-for-logs"
    headers = {"X-Request-ID": "failed-after-200"}
    with httpx.stream("POST", proxy.url + path, json=body, headers=headers, timeout=10) as got:
        assert got.status_code == 200
        assert b"event: error" in got.read()
    (line,) = [line for line in lines_of(proxy, "failed-after-200") if "trioproxy.access" in line]
    assert " POST /v1/messages?beta=true&key=*** 200 " in line, line
    assert line.endswith(" (error)") and "not-for-logs" not in line, line
    wait_for(lambda: total(scrape(proxy.url), "http_requests_total", status="502") == 1)


def _access_line_of(
    metric: RequestMetrics,
    head: int,
    completed: bool,
    error: BaseException | None = None,
    by_proxy: bool = False,
) -> str:
    """The access line ``Tracked`` writes of a request whose head (``head``: its status,
    0 for none) went out, once the metrics record is finished as ``Tracked`` finishes it;
    from its status on. The status ``Tracked`` noted is the record's before that (the
    status of the reply whose head was built: after an early start, the failure's), but
    for one the proxy set itself (503: a stream the shutdown ended in-band)."""
    send = CountingSend(_no_send, metric)
    send.status, send.finished = head, completed
    noted = head if metric.status_code == STATUS_SHUT_DOWN else metric.status_code
    _finish_metric(metric, completed, error, 0, by_proxy)
    message = _written(noted, send, metric).split(" /v1/chat/completions ", 1)[1]
    status, _, rest = message.partition(" ")
    return f"{status} {rest.split(' B', 1)[1].strip()}".strip()


def _written(status: int, send: CountingSend, metric: RequestMetrics) -> str:
    """The message of the one access line ``AccessLine.write`` logs."""
    access = AccessLine("POST", "/v1/chat/completions", {}, ClientAddresses(NO_PROXIES))
    logger = logging.getLogger(ACCESS_LOGGER)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        access.write(status, send, metric)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    (record,) = records
    return record.getMessage()


async def _no_send(event: object) -> None:
    pass


def _stream(status: int, outcome: str | None = None) -> RequestMetrics:
    metric = RequestMetrics("/v1/chat/completions", "POST", status_code=status)
    metric.streaming, metric.stream_outcome = True, outcome
    return metric


@pytest.mark.parametrize(
    ("metric", "head", "completed", "error", "by_proxy", "line"),
    [
        # a stream that failed after its 200: the outcome says the status counted
        (_stream(200, "error"), 200, True, None, False, "200 (error)"),  # 502
        (_stream(200, "timeout"), 200, True, None, False, "200 (timeout)"),  # 504
        (_stream(200), 200, False, None, False, "200 (cancelled)"),  # 499
        (_stream(200, "completed"), 200, True, None, False, "200 (completed)"),
        # ... and where the metrics count another status, the line names it
        (_stream(429, "error"), 200, True, None, False, "200 (error: 429)"),  # early start
        (_stream(503, "error"), 200, True, None, False, "200 (error: 503)"),  # shutdown, in-band
        (_stream(200), 200, False, None, True, "200 (error: 503)"),  # a write the shutdown cut
        (_stream(200), 200, False, RuntimeError("bug"), False, "200 (error: 500)"),  # our bug
        (_stream(504, "timeout"), 200, True, None, False, "200 (timeout)"),  # early start, 504
        (_stream(502, "error"), 200, True, None, False, "200 (error)"),  # early start, 502
        # no head went out: the status counted, whatever the outcome
        (_stream(0), 0, False, None, False, "499 (cancelled)"),
        # a reply that did not go out whole
        (RequestMetrics("/api/tags", "GET", 200), 200, False, None, False, "200 (client left)"),
        (
            RequestMetrics("/api/tags", "GET", 200),
            200,
            False,
            None,
            True,
            "200 (cut by the shutdown)",
        ),
        (
            RequestMetrics("/api/tags", "GET", 200),
            200,
            False,
            RuntimeError("bug"),
            False,
            "200 (error: 500)",
        ),
        (
            RequestMetrics("/api/tags", "GET", 0),
            0,
            False,
            RuntimeError("bug"),
            False,
            "500 (error)",
        ),
    ],
    ids=[
        "stream-error",
        "stream-timeout",
        "stream-cancelled",
        "stream-completed",
        "early-start-refusal",
        "stream-ended-by-shutdown",
        "stream-write-cut-by-shutdown",
        "stream-cut-by-our-bug",
        "early-start-timeout",
        "early-start-502",
        "stream-left-before-head",
        "reply-left",
        "reply-cut-by-shutdown",
        "reply-cut-by-our-bug",
        "our-bug-before-head",
    ],
)
def test_the_access_line_has_the_status_the_metrics_count(
    metric: RequestMetrics,
    head: int,
    completed: bool,
    error: BaseException | None,
    by_proxy: bool,
    line: str,
) -> None:
    """The line has the status the client got (a stream's 200) and, where the metrics
    count another, says which: its outcome alone where that is the outcome's own status
    (``error`` 502, ``timeout`` 504, ``cancelled`` 499), else the outcome and the status
    (``(error: 503)``: a stream the shutdown cut; ``(error: 500)``: our bug)."""
    assert _access_line_of(metric, head, completed, error, by_proxy) == line
    counted = effective_status(metric.status_code, metric.stream_outcome)
    # as an operator reads the line: the status named, else one not 2xx, else the
    # outcome's own (an unfinished 200 with no word of why: a client that left)
    status, _, said = line.partition(" ")
    implied = {"(error)": 502, "(timeout)": 504, "(cancelled)": 499, "(client left)": 499}
    implied["(cut by the shutdown)"] = 503
    if ": " in said:
        read = int(said.rsplit(": ", 1)[1].rstrip(")"))
    elif not status.startswith("2") or said == "(completed)":
        read = int(status)
    else:
        read = implied[said]
    assert read == counted, (line, counted)


def test_the_access_line_has_the_duration_the_metrics_record() -> None:
    """A request whose metrics record ended before its last cleanup (a Responses settle
    after the reply, which may wait 0.25 s) is logged with the duration the histogram
    has, not the time until the line was written."""
    metric = _stream(200, "completed")
    metric.duration_ms = 1234.5
    send = CountingSend(_no_send, metric)
    send.status, send.finished = 200, True
    assert " 200 1234.5 ms " in _written(200, send, metric)
