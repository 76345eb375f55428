"""/ready: answered from the last check, failures included; one bounded check at a time,
never counted as a failed backend call of a request.

Unit tests drive ``ReadinessChecker`` on trio's autojump clock with a scripted backend;
the rest run a real proxy against real sockets that refuse, hang up or never answer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import pytest
import trio

from trioproxy import routes_ops
from trioproxy.catalog import ModelCatalog
from trioproxy.config import Settings
from trioproxy.errors import OutOfFiles
from trioproxy.metrics import MetricsCollector
from trioproxy.routes_ops import CHECK_TIMEOUT_SECONDS, ReadinessChecker

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving

StartProxy = Callable[..., ServerProcess]


# ----------------------------------------------------------------------------- unit


@dataclass
class FakeApp:
    collector: MetricsCollector
    catalog: ModelCatalog = field(default_factory=ModelCatalog)


class ScriptedBackend:
    """Stands in for ``ReadinessChecker._ask_backend``: counts the checks, takes
    ``delay`` seconds, answers ``error`` (None: reachable)."""

    def __init__(self, error: str | None = "refused", delay: float = 0.0) -> None:
        self.error = error
        self.delay = delay
        self.calls = 0

    async def __call__(self, catalog: ModelCatalog) -> str | None:
        self.calls += 1
        await trio.sleep(self.delay)
        return self.error


def checker_with(
    backend: ScriptedBackend, monkeypatch: pytest.MonkeyPatch, interval: float = 10.0
) -> tuple[ReadinessChecker, FakeApp]:
    checker = ReadinessChecker(
        Settings(upstream_url="http://127.0.0.1:1/v1", ready_check_interval=interval)
    )
    monkeypatch.setattr(checker, "_ask_backend", backend)
    return checker, FakeApp(MetricsCollector(system_enabled=False))


async def test_a_failed_check_stands_for_the_interval(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend("refused")
    checker, app = checker_with(backend, monkeypatch)
    for _ in range(20):
        await checker.refresh(app)
        assert not checker.fresh() and checker.last_error == "refused"
        await trio.sleep(0.4)  # 20 probes within 8 s < the 10 s interval
    assert backend.calls == 1
    await trio.sleep(2.1)  # past the interval: the next probe checks again
    backend.error = None
    await checker.refresh(app)
    assert backend.calls == 2 and checker.fresh() and checker.last_error is None


class StarvedBackend(ScriptedBackend):
    """A check that cannot open a connection: the proxy is out of file descriptors."""

    async def __call__(self, catalog: ModelCatalog) -> str | None:
        self.calls += 1
        raise OutOfFiles(OSError(errno.EMFILE, "Too many open files"), 64)


async def test_a_check_out_of_files_is_not_ready_but_does_not_mark_the_backend_down(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    starved = StarvedBackend()
    checker, app = checker_with(ScriptedBackend(None), monkeypatch)
    await checker.check(app)
    assert checker.fresh() and app.collector.backend_reachable
    await trio.sleep(10)
    monkeypatch.setattr(checker, "_ask_backend", starved)
    await checker.check(app)
    assert checker.out_of_files() and checker.reachable is True
    assert "limit of open files (64" in (checker.out_of_files_error or "")
    assert app.collector.backend_reachable  # trioproxy_backend_up untouched
    for _ in range(5):  # stands for the interval, as a failed check
        await checker.refresh(app)
    assert starved.calls == 1
    checker.mark_reachable()  # a request reached the backend: descriptors again
    assert not checker.out_of_files() and checker.fresh()


async def test_concurrent_probes_share_one_check(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    backend = ScriptedBackend("no answer", delay=CHECK_TIMEOUT_SECONDS)
    checker, app = checker_with(backend, monkeypatch)
    finished: list[float] = []

    async def probe() -> None:
        await checker.refresh(app)
        finished.append(trio.current_time())

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(probe)
    assert backend.calls == 1
    assert len(finished) == 10
    assert max(finished) - started <= CHECK_TIMEOUT_SECONDS + 0.01


async def test_the_background_task_keeps_the_result_current(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """Checked once per interval while the backend is down, so probes never wait; never
    while requests prove it reachable."""
    backend = ScriptedBackend("refused")
    checker, app = checker_with(backend, monkeypatch, interval=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run, app)
        await trio.sleep(35)  # checks at 0, 10, 20, 30
        assert backend.calls == 4
        for _ in range(10):  # probes in between are answered from the last check
            await checker.refresh(app)
        assert backend.calls == 4
        backend.error = None
        for _ in range(60):  # traffic proves the backend reachable every second
            checker.mark_reachable()
            await trio.sleep(1)
        assert backend.calls == 4  # none since 30 s: requests proved it reachable
        assert checker.fresh()
        nursery.cancel_scope.cancel()


async def test_probes_never_wait_for_a_check_when_a_result_stands(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """The failed result expired exactly when the background task started its next check,
    so a probe during that check (2 s, a backend that never answers) waited for it: once
    per cycle a probe took ~2 s, past Kubernetes' default 1 s probe timeout. Only the
    probes before the very first result may wait."""
    backend = ScriptedBackend("no answer", delay=CHECK_TIMEOUT_SECONDS)
    checker, app = checker_with(backend, monkeypatch, interval=10.0)
    waits: list[tuple[float, float]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(checker.run, app)
        await checker.refresh(app)  # no result yet: this one waits for the first check
        assert checker.reachable is False
        while trio.current_time() < 40:  # checks at 0, 12, 24, 36 (2 s each)
            await trio.sleep(0.25)
            started = trio.current_time()
            await checker.refresh(app)
            waits.append((started, trio.current_time() - started))
            assert checker.reachable is False and checker.last_error == "no answer"
        nursery.cancel_scope.cancel()
    assert backend.calls == 4  # the probes started none of their own
    assert max(took for _, took in waits) == 0, [w for w in waits if w[1]]


async def test_without_the_background_task_a_probe_checks_and_others_do_not_wait(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """Nothing else would check, so an expired result sends one probe to the backend; a
    probe that comes while that check runs answers from the previous result."""
    backend = ScriptedBackend("no answer", delay=CHECK_TIMEOUT_SECONDS)
    checker, app = checker_with(backend, monkeypatch, interval=10.0)
    await checker.refresh(app)
    await trio.sleep(10)  # the failure has expired
    finished: dict[str, float] = {}

    async def probe(name: str) -> None:
        await checker.refresh(app)
        finished[name] = trio.current_time()

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe, "first")
        await trio.sleep(0.5)
        nursery.start_soon(probe, "second")
    assert backend.calls == 2
    assert finished["first"] - started == pytest.approx(CHECK_TIMEOUT_SECONDS)
    assert finished["second"] - started == pytest.approx(0.5)


async def test_requests_that_reach_the_backend_clear_a_failed_check_in_health(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """/v1/metrics/health's backend check followed only the checks, which stop while
    requests prove the backend reachable: it said unhealthy (503) for as long as traffic
    flowed after one failed check."""
    checker, app = checker_with(ScriptedBackend("refused"), monkeypatch)
    await checker.check(app)
    body, status = app.collector.health()
    assert status == 503 and body["checks"]["backend"]["status"] == "unhealthy"
    checker.mark_reachable()
    body, status = app.collector.health()
    assert status == 200 and body["checks"]["backend"]["status"] == "ok"
    assert checker.fresh()


# ----------------------------------------------------------------------------- real sockets


@dataclass
class FakeBackend:
    url: str
    accepted: list[socket.socket]
    # the process that opened each accepted connection (None: gone before it was read)
    peers: list[int | None] = field(default_factory=list)

    def accepted_from(self, server: ServerProcess) -> int:
        """Connections ``server`` opened: in a full run, another test's proxy still
        checking a backend that had this port before can connect here too."""
        own = {server.process.pid}
        with contextlib.suppress(psutil.NoSuchProcess):
            own.update(c.pid for c in psutil.Process(server.process.pid).children(True))
        return sum(pid in own for pid in self.peers)


def _peer_pid(conn: socket.socket) -> int | None:
    """The pid of the process on the other end of a loopback connection."""
    peer = conn.getpeername()
    for c in psutil.net_connections("tcp"):
        if c.laddr and (c.laddr.ip, c.laddr.port) == peer[:2] and c.pid:
            return c.pid
    return None


@pytest.fixture
def hanging_backend() -> Iterator[FakeBackend]:
    """Accepts connections and never answers."""
    yield from _listener(keep=True)


@pytest.fixture
def hanging_up_backend() -> Iterator[FakeBackend]:
    """Accepts connections and closes them at once (every attempt fails, and is
    retryable for requests)."""
    yield from _listener(keep=False)


def _listener(*, keep: bool) -> Iterator[FakeBackend]:
    listener = socket.create_server(("127.0.0.1", 0))
    backend = FakeBackend(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", [])

    listener.settimeout(0.05)  # so the thread sees the end promptly
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            backend.accepted.append(conn)
            backend.peers.append(_peer_pid(conn))
            if not keep:
                conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield backend
    # the proxy may still be connecting: the thread ends before the connections are
    # closed, or one it accepted after would be left open (a ResourceWarning later on)
    done.set()
    thread.join(timeout=5)
    listener.close()
    for conn in backend.accepted:
        conn.close()


def upstream_counts(url: str) -> dict[str, Any]:
    upstream = httpx.get(f"{url}/v1/metrics", timeout=5).json()["upstream"]
    return {"errors": upstream["errors"], "retries": upstream["retries"]}


def test_probes_of_a_failing_backend_are_answered_from_the_cached_check(
    start_proxy: StartProxy, hanging_up_backend: FakeBackend
) -> None:
    proxy = start_proxy(
        hanging_up_backend.url, MAX_RETRIES="3", RETRY_BACKOFF="0.01", READY_CHECK_INTERVAL="30"
    )
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        answers = [http.get("/ready") for _ in range(20)]
    assert [a.status_code for a in answers] == [503] * 20
    assert "backend request failed" in answers[-1].json()["backend_error"]
    # one check at start, a single attempt; 20 probes with retries were 80 connections
    assert hanging_up_backend.accepted_from(proxy) <= 2, hanging_up_backend.peers
    # checks are no request traffic: the UpstreamErrors alert does not see them
    reasons = ["connect", "other", "protocol", "status_4xx", "status_429", "status_5xx", "timeout"]
    zero = dict.fromkeys(reasons, 0)
    assert upstream_counts(proxy.url) == {"errors": zero, "retries": zero}
    health = httpx.get(f"{proxy.url}/v1/metrics/health", timeout=5).json()
    assert health["checks"]["backend"]["status"] == "unhealthy"


def test_probes_of_a_silent_backend_answer_within_the_probe_timeout(
    start_proxy: StartProxy, hanging_backend: FakeBackend
) -> None:
    """The shipped Kubernetes probe gives /ready 3 s; a backend that accepts and never
    answers held every probe 5 s."""
    proxy = start_proxy(hanging_backend.url, READY_CHECK_INTERVAL="30")

    def probe(_: int) -> tuple[int, float]:
        started = time.monotonic()
        status = httpx.get(f"{proxy.url}/ready", timeout=10).status_code
        return status, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=10) as pool:
        first = list(pool.map(probe, range(10)))
    assert [status for status, _ in first] == [503] * 10
    assert max(took for _, took in first) < 3.0, first
    status, took = probe(0)
    assert status == 503 and took < 0.5, took  # the failure stands: no new check
    assert hanging_backend.accepted_from(proxy) == 1, hanging_backend.peers  # one shared check
    assert "did not answer" in httpx.get(f"{proxy.url}/ready").json()["backend_error"]


def test_probes_of_a_silent_backend_never_wait_for_the_next_check(
    start_proxy: StartProxy, hanging_backend: FakeBackend
) -> None:
    """With a 1 s interval the proxy checks for 1 s every 2 s; a probe during a check
    waited for it (up to 1 s) although the previous failure was there to answer from."""
    proxy = start_proxy(hanging_backend.url, READY_CHECK_INTERVAL="1")
    with httpx.Client(base_url=proxy.url, timeout=10) as http:
        assert http.get("/ready").status_code == 503  # the first result
        took = []
        deadline = time.monotonic() + 5  # two and a half check cycles
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert http.get("/ready").status_code == 503
            took.append(time.monotonic() - started)
            time.sleep(0.05)
    assert hanging_backend.accepted_from(proxy) >= 2  # checks did run meanwhile
    assert max(took) < 0.3, sorted(took)[-5:]


class _ModelsBackend(ScriptedHandler):
    def do_GET(self) -> None:
        self.answer(200, b'{"object": "list", "data": [{"id": "m"}]}')


async def test_the_checks_pool_is_built_before_the_backend_is_timed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Building the checks' pool loads the CA bundle (in a thread): on a busy machine that
    took longer than a short READY_CHECK_INTERVAL, and the first check blamed the backend
    ("did not answer within 0.2 s"; the test suite's descriptor test failed so once)."""
    build = routes_ops.UpstreamPool

    def slow_build(settings: Settings) -> Any:
        time.sleep(0.5)  # past the 0.2 s the check gives the backend
        return build(settings)

    monkeypatch.setattr(routes_ops, "UpstreamPool", slow_build)
    with serving(_ModelsBackend) as url:
        checker = ReadinessChecker(Settings(upstream_url=url, ready_check_interval=0.2))
        app = FakeApp(MetricsCollector(system_enabled=False))
        try:
            await checker.check(app)
            assert (checker.reachable, checker.last_error) == (True, None)
        finally:
            await checker._close()


def test_ready_when_the_backend_answers(proxy: ServerProcess) -> None:
    response = httpx.get(f"{proxy.url}/ready", timeout=5)
    assert response.status_code == 200
    assert response.json()["checks"]["backend"] == "reachable"
    assert isinstance(response.json()["backend_checked_at"], float)


async def test_the_backend_going_down_and_back_is_logged_once_each(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, autojump_clock: Any
) -> None:
    """An operator review: a backend outage left no line in the log (the checks are not
    request traffic, so nothing else said so while no client asked)."""
    backend = ScriptedBackend(error="refused")
    checker, app = checker_with(backend, monkeypatch, interval=1.0)
    with caplog.at_level(logging.INFO, logger="trioproxy.ready"):
        for _ in range(3):
            await checker.check(app)
        backend.error = None
        for _ in range(2):
            await checker.check(app)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "the backend is not reachable: refused"),
        ("INFO", "the backend is reachable again"),
    ]


def test_an_open_ready_probe_keeps_the_backend_address_to_key_holders(
    start_proxy: StartProxy,
) -> None:
    """A security review: with client keys set, anyone could read the backend's host and
    port in ``/ready``'s ``backend_error`` (the probe is open)."""
    with socket.socket() as sock:  # a port nothing listens on: refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proxy = start_proxy(f"http://127.0.0.1:{port}/v1", PROXY_API_KEYS="ops:ops-key-0123456789")
    keyless = httpx.get(f"{proxy.url}/ready", timeout=10)
    assert keyless.status_code == 503
    assert str(port) not in keyless.text and "log says why" in keyless.json()["backend_error"]
    keyed = httpx.get(
        f"{proxy.url}/ready", headers={"Authorization": "Bearer ops-key-0123456789"}, timeout=10
    )
    assert keyed.status_code == 503 and str(port) in keyed.json()["backend_error"]
    assert "the backend is not reachable: " in proxy.log()


def _backend_up(collector: MetricsCollector) -> list[str]:
    text = collector.render_prometheus()[0].decode()
    return [line for line in text.splitlines() if line.startswith("trioproxy_backend_up")]


async def test_the_backend_state_is_a_gauge_for_alerting(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """An operator review: on Kubernetes a down backend makes every pod unready, so the
    Service has no endpoint, no request is counted and no error alert can fire: the
    exposition had nothing that said the backend was down."""
    checker, app = checker_with(ScriptedBackend("refused"), monkeypatch)
    assert _backend_up(app.collector) == []  # unknown before the first check: no series
    await checker.check(app)
    assert _backend_up(app.collector) == ["trioproxy_backend_up 0.0"]
    checker.mark_reachable()
    assert _backend_up(app.collector) == ["trioproxy_backend_up 1.0"]


def test_a_backend_state_that_did_not_change_keeps_the_scrape_encoding() -> None:
    """A scrape keeps its encoding until a series changes: the idle readiness check
    (every 10 s) made every scrape of an idle proxy encode its whole exposition anew."""
    collector = MetricsCollector(system_enabled=False)
    collector.set_backend_status(True, 1.0)
    kept = collector._prom.snapshot().bodies  # the encodings kept with the series' copy
    collector.set_backend_status(True, 2.0)
    assert collector._prom.snapshot().bodies is kept
    collector.set_backend_status(False, 3.0)
    assert collector._prom.snapshot().bodies is not kept
    assert _backend_up(collector) == ["trioproxy_backend_up 0.0"]


def test_a_down_backend_shows_in_the_exposition(start_proxy: StartProxy) -> None:
    with socket.socket() as sock:  # a port nothing listens on: refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proxy = start_proxy(f"http://127.0.0.1:{port}/v1")
    assert httpx.get(f"{proxy.url}/ready", timeout=10).status_code == 503
    exposition = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    assert "\ntrioproxy_backend_up 0.0\n" in exposition
