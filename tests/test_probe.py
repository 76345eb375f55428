"""``python -m trioproxy.probe`` against a port where something other than the proxy
answers: one line and exit status 1, never a traceback (a container's health log)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT

ANSWERS = {
    "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n",
    "a broken status line": b"HTTP/1.1 abc\r\n\r\n",
    "nothing": b"",
}


@pytest.fixture
def odd_server(request: pytest.FixtureRequest) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that reads the request, sends ``request.param`` and
    closes; yields its port."""
    answer: bytes = request.param
    with socket.create_server(("127.0.0.1", 0)) as server:

        def serve() -> None:
            with server.accept()[0] as connection:
                connection.recv(65536)
                connection.sendall(answer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield server.getsockname()[1]
        thread.join(timeout=5)


@pytest.mark.parametrize("odd_server", list(ANSWERS.values()), ids=list(ANSWERS), indirect=True)
def test_the_probe_says_in_one_line_that_the_port_does_not_answer_http(
    odd_server: int, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "TLS_"))}
    env.update(PROXY_PORT=str(odd_server), PYTHONPATH=str(ROOT))
    probe = subprocess.run(
        [sys.executable, "-m", "trioproxy.probe"],
        cwd=tmp_path,  # no .env to read
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert probe.returncode == 1
    assert probe.stdout == ""
    lines = probe.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trioproxy probe: http://127.0.0.1:"), lines
