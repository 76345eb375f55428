"""Shared fixtures: real processes on 127.0.0.1 ephemeral ports.

- ``demo_backend``: the demo backend as its own process (session-wide), ``.url`` ends in /v1.
- ``start_proxy``: start ``python -m trioproxy`` as its own process against a backend, with
  any environment; returns a handle with ``.url``. Stopped with SIGTERM at teardown.
- ``proxy``: one such proxy against ``demo_backend`` (session-wide, default settings).
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from trioproxy import hypercorn_patches


@pytest.fixture(autouse=True)
def _writes_unbounded_after_each_test() -> Iterator[None]:
    """A server run in the test process that shut down leaves hypercorn_patches' end of
    writes (its grace period, on that run's trio clock) behind: a later test's writes in
    another trio run, whose clock starts elsewhere, were cut by it at random."""
    yield
    hypercorn_patches._writes_end_at = math.inf


ROOT = Path(__file__).resolve().parent.parent
# an IPv4 address, or an IPv6 one in brackets ("http://[::1]:PORT")
LISTEN_LINE = re.compile(r"listening on (https?://(?:[0-9.]+|\[[0-9a-fA-F:.]+\]):\d+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def log(self) -> str:
        return "".join(self.output)


def _spawn(
    args: list[str],
    env: dict[str, str],
    timeout: float = 20.0,
    preexec_fn: Callable[[], None] | None = None,
) -> ServerProcess:
    """Start a server process and wait for its "listening on URL" line; ``preexec_fn``
    runs in the child before it starts (limits set as ``ulimit`` would)."""
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=preexec_fn,
    )
    output: list[str] = []
    found = threading.Event()
    url_box: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = LISTEN_LINE.search(line)
            if match and not found.is_set() and "demo backend at" not in line:
                url_box.append(match.group(1))
                found.set()
        found.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    if not found.wait(timeout) or not url_box:
        process.kill()
        process.wait()
        reader.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
        raise RuntimeError(f"server did not start: {args}\n{''.join(output)}")
    return ServerProcess(process, url_box[0], output, reader)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PROXY_"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update({"PYTHONUNBUFFERED": "1", "LOG_LEVEL": "WARNING"})
    env.update(extra)
    return env


def wait_healthy(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} never became healthy")


@pytest.fixture(scope="session")
def demo_backend() -> Iterator[ServerProcess]:
    server = _spawn(
        ["-m", "trioproxy.demo", "--host", "127.0.0.1", "--port", "0", "--token-delay", "0.005"],
        base_env(),
    )
    server.url = server.url + "/v1"
    yield server
    server.stop()


@pytest.fixture(scope="session")
def start_proxy() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(upstream: str | None, *args: str, **env: str) -> ServerProcess:
        environment = base_env(**env)
        if upstream is not None:
            environment["OPENAI_API_BASE_URL"] = upstream
        server = _spawn(
            [
                "-m",
                "trioproxy",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--env-file",
                "",  # read no env file
                *args,
            ],
            environment,
        )
        wait_healthy(server.url)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def proxy(demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]) -> ServerProcess:
    return start_proxy(demo_backend.url, MAX_RETRIES="2", RETRY_BACKOFF="0.01")


@pytest.fixture
def demo_events(demo_backend: ServerProcess) -> Callable[[], list[dict]]:
    """Read the demo backend's event log (requests it saw, and when clients went away)."""

    def read() -> list[dict]:
        base = demo_backend.url.removesuffix("/v1")
        return httpx.get(f"{base}/_demo/events", timeout=5).json()["events"]

    return read


@pytest.fixture(scope="session")
def proxy_with_short_keepalive(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> str:
    return start_proxy(demo_backend.url, KEEP_ALIVE_TIMEOUT="1").url


@pytest.fixture(scope="session")
def proxy_no_retry(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> ServerProcess:
    """A proxy against the demo with MAX_RETRIES=0: one attempt, backend errors come straight
    back."""
    return start_proxy(demo_backend.url, MAX_RETRIES="0")


def closed_port_url() -> str:
    """An http://127.0.0.1:PORT/v1 URL where nothing listens (the port was just released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def demo_events_for(demo_backend: ServerProcess, request_id: str) -> list[dict]:
    """The demo's event-log entries that carry *request_id* (the proxy forwards X-Request-ID)."""
    base = demo_backend.url.removesuffix("/v1")
    events = httpx.get(f"{base}/_demo/events", timeout=5).json()["events"]
    return [e for e in events if e.get("request_id") == request_id]


@contextlib.contextmanager
def install_lock(directory: Path) -> Iterator[None]:
    """Held while one test process checks and installs *directory*'s node modules: under
    pytest-xdist two workers' fixtures otherwise run ``npm ci`` in the same folder at once,
    and one deletes node_modules while the other installs into it."""
    with open(directory / ".install.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def npm_ci(directory: Path, *flags: str, timeout: float) -> None:
    """``npm ci`` in *directory* (call it holding :func:`install_lock`); fails the test
    with npm's output if it fails."""
    npm = shutil.which("npm")
    assert npm is not None
    install = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", *flags],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "npm_config_update_notifier": "false"},
    )
    assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"
