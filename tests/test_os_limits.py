"""The proxy under the operating system's limits: the open files limit (RLIMIT_NOFILE) a
login shell or a systemd unit starts it with, and what a client gets when it runs out.

The proxies here run as their own processes, started with the limits set as ``ulimit -n``
or ``LimitNOFILE=`` would set them (``preexec_fn``), against the demo backend.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import ServerProcess, _spawn, base_env, wait_healthy
from tests.fakes import ScriptedHandler, serving
from trioproxy import limits

FLAGS = ("--env-file", "")  # read no env file
STALLED = "hi [[stall_after=1]]"  # the demo sends one token, then holds the stream open


def _spawn_limited(upstream: str, soft: int, hard: int, *args: str, **env: str) -> ServerProcess:
    """``python -m trioproxy`` started with RLIMIT_NOFILE (soft, hard), as ``ulimit -n``."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    server = _spawn(
        ["-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", *FLAGS, *args],
        base_env(LOG_LEVEL="INFO", OPENAI_API_BASE_URL=upstream, **env),
        preexec_fn=limit,
    )
    wait_healthy(server.url)
    return server


@pytest.fixture
def limited(demo_backend: ServerProcess) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(soft: int, hard: int, *args: str, **env: str) -> ServerProcess:
        server = _spawn_limited(demo_backend.url, soft, hard, *args, **env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files line")


def _chat(content: str) -> dict:
    return {
        "model": "demo-chat",
        "stream": True,
        "messages": [{"role": "user", "content": content}],
    }


async def _hold_streams(url: str, count: int) -> list[str]:
    """Open ``count`` streams at once and wait until every one has its first token, all
    of them open together (the demo holds each after it); what each got: ``token`` or
    its status line. Raw HTTP/1.1: a stream is read only as far as its first token.
    Bounded: a stream that never starts (its connection left in the proxy's listen
    backlog) counts as ``waiting``."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(_chat(STALLED)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    got: list[str] = []
    all_started = trio.Event()

    async def one() -> None:
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(head.encode() + body)
            seen = b""
            while seen.count(b"data:") < 2:  # the role's chunk, then a token
                part = await stream.receive_some(65536)
                if not part:
                    got.append(seen.split(b"\r\n", 1)[0].decode())
                    return
                seen += part
            got.append("token" if seen.startswith(b"HTTP/1.1 200") else seen[:200].decode())
            if len(got) == count:
                all_started.set()
            await all_started.wait()  # held open until every stream has started

    with trio.move_on_after(60):  # the bound, not a timing assert
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return got + ["waiting"] * (count - len(got))


def test_soft_limit_raised_to_the_hard_one_serves_streams_past_it(
    limited: Callable[..., ServerProcess],
) -> None:
    """A soft limit of 256 (hard 4096), as ``ulimit -n`` leaves it: 240 concurrent
    streams hold about 480 descriptors, served because the proxy raised its soft limit.
    It stayed at 256 before: connections waited in the listen backlog and backend
    connections failed."""
    proxy = limited(256, 4096)
    assert _open_files_limits(proxy.process.pid) == (4096, 4096)
    assert "open files limit (RLIMIT_NOFILE) raised from 256 to 4096 (hard limit 4096)" in (
        proxy.log()
    )
    got = trio.run(_hold_streams, proxy.url, 240)
    assert got == ["token"] * 240, sorted(set(got))


def test_every_worker_raises_its_limit(limited: Callable[..., ServerProcess]) -> None:
    proxy = limited(256, 4096, "--workers", "2")
    deadline = time.monotonic() + 20  # the second worker may still be starting
    while True:
        workers = _descendants_serving(proxy.process.pid)
        found = [_open_files_limits(pid) for pid in workers]
        if found == [(4096, 4096)] * 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found == [(4096, 4096)] * 2, found


def _descendants_serving(master: int) -> list[int]:
    """The worker processes under ``master`` (its child is hypercorn's master; its
    children are the workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    grandchildren = [pid for child in children.get(master, []) for pid in children.get(child, [])]
    # multiprocessing's resource tracker is a child of hypercorn's master too
    return [pid for pid in grandchildren if b"spawn_main" in _cmdline(pid)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_hard_limit_too_low_is_a_warning_and_running_out_is_a_503(
    limited: Callable[..., ServerProcess],
) -> None:
    """Soft = hard = 64: the start says so once; once every descriptor is taken (by idle
    connections here), a request on a connection already open cannot reach the backend:
    a 503 in its dialect naming the limit, not a 502 blaming the backend, and not a
    failed backend call in the metrics. Served again once descriptors are free."""
    proxy = limited(
        64, 64, SYSTEM_METRICS_ENABLED="false", READY_CHECK_INTERVAL="600",
        MAX_CONNECTIONS="0",  # no cap: the open files limit alone (else the cap refuses first)
    )  # fmt: skip
    log = proxy.log()
    assert "WARNING" in log and "open files limit (RLIMIT_NOFILE) is 64 (hard limit 64)" in log
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    openai = httpx.Client(base_url=f"{proxy.url}/v1", timeout=10)
    ollama = httpx.Client(base_url=f"{proxy.url}/api", timeout=10)
    idle: list[socket.socket] = []
    try:
        # their connections accepted (and no backend connection pooled by these)
        assert openai.get(f"{proxy.url}/health").status_code == 200
        assert ollama.get(f"{proxy.url}/health").status_code == 200
        _fill_descriptors(proxy.process.pid, 64, host, int(port), idle)

        refused = openai.post("/chat/completions", json=_chat("hi") | {"stream": False})
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "server_busy"
        assert "limit of open files (64, RLIMIT_NOFILE)" in error["message"]
        refused = ollama.post("/chat", json=_chat("hi") | {"stream": False})
        assert refused.status_code == 503, refused.text
        assert "limit of open files (64" in refused.json()["error"]

        metrics = openai.get(f"{proxy.url}/metrics").text
        assert 'trioproxy_upstream_errors_total{reason="connect"} 0.0' in metrics
        log = proxy.log()
        assert "limit of open files (64, RLIMIT_NOFILE)" in log
        # the connections past the limit wait in the backlog: trio's line about it once
        # (a traceback every 0.1 s before), in the proxy's format
        accept = "cannot accept new connections: accept returned EMFILE (Too many open files)"
        assert (
            f"ERROR trio.serve_listeners [-] {accept}; open files limit (RLIMIT_NOFILE) 64" in log
        )
        assert log.count(accept) == 1 and "Traceback" not in log
    finally:
        for sock in idle:
            sock.close()
    _wait_for_descriptors_below(proxy.process.pid, 32)
    # descriptors free again: served, on the same connection
    served = openai.post("/chat/completions", json=_chat("hi") | {"stream": False})
    assert served.status_code == 200, served.text
    openai.close()
    ollama.close()
    assert "backend request failed" not in proxy.log()


class _ClosingBackend(ScriptedHandler):
    """A backend that closes every connection after its answer (HTTP/1.0): each readiness
    check needs a new connection, so a new descriptor."""

    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        self.answer(200, json.dumps({"object": "list", "data": [{"id": "m"}]}).encode())


def test_readiness_out_of_files_is_not_ready_without_blaming_the_backend() -> None:
    """A readiness check that cannot open a connection for want of descriptors: /ready is
    a 503 naming the proxy's limit (requests cannot reach the backend either), the
    backend's state is unknown, not down: trioproxy_backend_up stays 1 (BackendDown would
    page for the wrong cause). Ready again once descriptors are free."""
    with serving(_ClosingBackend) as url:
        proxy = _spawn_limited(
            url, 64, 64, SYSTEM_METRICS_ENABLED="false", READY_CHECK_INTERVAL="0.2",
            MAX_CONNECTIONS="0",
        )  # fmt: skip
        idle: list[socket.socket] = []
        try:
            with httpx.Client(base_url=proxy.url, timeout=10) as client:
                _descriptors_run_out_and_come_back(proxy, client, idle)
            log = proxy.log()
            warning = "WARNING trioproxy.ready [-] not ready: the proxy cannot open a connection"
            assert warning in log
            assert "the backend is not reachable" not in log
        finally:
            for sock in idle:
                sock.close()
            proxy.stop()


def _descriptors_run_out_and_come_back(
    proxy: ServerProcess, client: httpx.Client, idle: list[socket.socket]
) -> None:
    assert client.get("/ready").status_code == 200
    host, port = proxy.url.removeprefix("http://").rsplit(":", 1)
    _fill_descriptors(proxy.process.pid, 64, host, int(port), idle)
    # "reachable" while its last answer is recent (three intervals), then unknown
    body = _wait_for_ready(client, 503, backend="unknown").json()
    assert body["checks"] == {"settings": "ok", "backend": "unknown", "open_files": "exhausted"}
    assert "limit of open files (64, RLIMIT_NOFILE)" in body["proxy_error"]
    assert "backend_error" not in body
    assert "trioproxy_backend_up 1.0" in client.get("/metrics").text
    for sock in idle:
        sock.close()
    idle.clear()
    _wait_for_descriptors_below(proxy.process.pid, 32)
    assert _wait_for_ready(client, 200).json()["checks"]["open_files"] == "ok"


def _wait_for_ready(client: httpx.Client, status: int, backend: str = "") -> httpx.Response:
    deadline = time.monotonic() + 20
    while True:
        ready = client.get("/ready")
        if ready.status_code == status and backend in ("", ready.json()["checks"]["backend"]):
            return ready
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.05)


def _fill_descriptors(
    pid: int, limit: int, host: str, port: int, idle: list[socket.socket]
) -> None:
    """Connect idle clients until the proxy holds ``limit`` descriptors (the ones past
    it wait in its listen backlog)."""
    deadline = time.monotonic() + 20
    while len(os.listdir(f"/proc/{pid}/fd")) < limit:
        assert time.monotonic() < deadline, "the proxy never reached its limit"
        idle.append(socket.create_connection((host, port)))
        time.sleep(0.01)  # let it accept
    for _ in range(4):  # spares in the backlog take the place of any it lets go
        idle.append(socket.create_connection((host, port)))


def _wait_for_descriptors_below(pid: int, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(os.listdir(f"/proc/{pid}/fd")) >= count:
        assert time.monotonic() < deadline, "the proxy never closed the idle connections"
        time.sleep(0.02)


def test_a_limit_that_cannot_be_raised_is_a_warning_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where setrlimit is refused (a seccomp profile, a sandbox), the proxy still starts:
    one WARNING with the numbers."""

    def refuse(which: int, values: tuple[int, int]) -> None:
        raise PermissionError(1, "Operation not permitted")

    _isolated(monkeypatch)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    with caplog.at_level(logging.DEBUG, logger=limits.log.name):
        assert limits.raise_open_files_limit() == (256, 4096)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not raise the open files limit" in w and "256 to 4096" in w for w in warnings)
    assert any("is 256 (hard limit 4096)" in w for w in warnings)


def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """``raise_open_files_limit`` as in a fresh process, logging where caplog sees it."""
    monkeypatch.setattr(limits, "_raised", False)
    monkeypatch.setattr(limits, "log", logging.getLogger("tests.os_limits"))
    monkeypatch.setattr(limits, "_quiet_accept_errors", lambda limit: None)


def test_an_unlimited_hard_limit_raises_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    set_to: list[tuple[int, int]] = []
    _isolated(monkeypatch)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", lambda which, values: set_to.append(values))
    limits.raise_open_files_limit()
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    assert set_to == [(min(limits.NOFILE_CAP, nr_open), resource.RLIM_INFINITY)]


def test_out_of_files_is_found_behind_the_connect_error() -> None:
    """trio's connect error says "all attempts ... failed"; EMFILE is in its cause's
    exception group, which httpx wraps twice."""
    emfile = OSError(24, "Too many open files")
    attempts = OSError("all attempts to connect to 127.0.0.1:1 failed")
    attempts.__cause__ = ExceptionGroup("attempts", [emfile])
    wrapped = httpx.ConnectError("")
    wrapped.__cause__ = attempts
    assert limits.out_of_files(wrapped) is emfile
    refused = OSError("all attempts to connect to 127.0.0.1:1 failed")
    refused.__cause__ = ExceptionGroup("attempts", [ConnectionRefusedError(111, "refused")])
    assert limits.out_of_files(refused) is None


def test_the_connection_cap_is_lowered_to_what_the_open_files_limit_holds(
    limited: Callable[..., ServerProcess],
) -> None:
    """MAX_CONNECTIONS (10,000) above what the open files limit holds (two each, the idle
    backend connections and 64 kept): lowered, with a WARNING, so a connection past it
    gets the 503 that says why instead of waiting in the listen backlog unanswered."""
    from .test_connection_cap import Client, _assert_refusal, _clients

    proxy = limited(256, 256, UPSTREAM_MAX_KEEPALIVE="2", SYSTEM_METRICS_ENABLED="false")
    room = (256 - 64 - 2) // 2
    assert f"MAX_CONNECTIONS lowered from 10000 to {room}" in proxy.log()
    with _clients() as held:
        for _ in range(room):
            held.append(Client(proxy.url))
            assert held[-1].get("/health")[0].status_code == 200
        past = Client(proxy.url)
        held.append(past)
        _assert_refusal(*past.get("/health"), room)
        assert held[0].get("/health")[0].status_code == 200  # those held are served


@pytest.mark.parametrize(
    ("reason", "named"),
    [
        ("accept returned EMFILE (Too many open files)", True),
        ("accept returned ENOBUFS (No buffer space available)", False),
        ("accept returned ENOMEM (Cannot allocate memory)", False),
    ],
)
def test_a_failing_accept_names_the_open_files_limit_only_when_it_is_reached(
    reason: str, named: bool
) -> None:
    """trio retries ENOMEM and ENOBUFS as it retries EMFILE: those are no open files
    problem, and their line must not send an operator after the wrong limit."""
    record = logging.makeLogRecord(
        {"name": "trio.serve_listeners", "msg": f"{reason}; sleeping 0.1 seconds"}
    )
    assert limits.AcceptErrorsLogged(64).filter(record)
    line = record.getMessage()
    assert line.startswith(f"cannot accept new connections: {reason}")
    assert ("RLIMIT_NOFILE" in line) is named
