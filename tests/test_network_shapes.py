"""The network shapes deployments have: IPv6 and dual-stack listening."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import ollama
import pytest

from trioproxy import cli
from trioproxy.config import ConfigError, load_settings

from .conftest import ServerProcess, _spawn, base_env, wait_healthy
from .test_cli_config import main_in_process, one_line

# ---- listening: PROXY_HOST -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "bound"),
    [("[::1]", "::1"), (" ::1 ", "::1"), ("::", "::"), ("[::]", "::"), ("localhost", "localhost")],
)
def test_an_ipv6_host_is_taken_with_or_without_brackets(given: str, bound: str) -> None:
    """``[::1]`` is how URLs (and hypercorn's --bind) write it: bound as written, it
    failed as a host name ("cannot listen on [[::1]]:11434")."""
    assert load_settings({"PROXY_HOST": given}, dotenv_path=None).host == bound
    assert load_settings({}, dotenv_path=None, host=given).host == bound  # create_app(host=)


@pytest.mark.parametrize(
    "given",
    ["0.0.0.0:11434", "localhost:8080", "[::1]:8080", "http://0.0.0.0:11434", "0.0.0.0/0"],
)
def test_a_host_with_a_port_or_a_scheme_is_refused_naming_proxy_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], given: str
) -> None:
    """Ollama's OLLAMA_HOST takes ``0.0.0.0:11434``: carried over, it was bound as an
    IPv6 host name and failed as "Name or service not known", on the wrong port."""
    code, err = main_in_process(
        monkeypatch, capsys, OPENAI_API_BASE_URL="http://127.0.0.1:1/v1", PROXY_HOST=given
    )
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"trioproxy: error: invalid PROXY_HOST: {given!r} is more than")
    assert "PROXY_PORT" in line
    code, err = main_in_process(
        monkeypatch, capsys, "--host", given, OPENAI_API_BASE_URL="http://127.0.0.1:1/v1"
    )
    assert (code, one_line(err).startswith("trioproxy: error: invalid --host:")) == (2, True)


@pytest.mark.parametrize("given", ["[::1", "::1]", "[127.0.0.1]", "::1::2", "[]"])
def test_a_malformed_ipv6_host_is_refused(given: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid PROXY_HOST: .* is not an IPv6 address"):
        load_settings({"PROXY_HOST": given}, dotenv_path=None)


def _v6only_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """IPv6 sockets made as on a system with ``net.ipv6.bindv6only=1`` (some BSDs, some
    hardened Linux images), whose default is to take IPv6 connections only."""
    real_socket = socket.socket

    def v6only(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        made = real_socket(family, *args, **kwargs)
        if family == socket.AF_INET6:
            made.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return made

    monkeypatch.setattr(cli.socket, "socket", v6only)


def _reaches(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        try:
            client.connect((address, port))
        except ConnectionRefusedError:
            return False
    return True


def test_every_address_is_ipv4_too_whatever_the_systems_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``PROXY_HOST=::`` is every address, as Ollama (a Go server) takes it: where the
    system makes IPv6 sockets v6-only, IPv4 clients were refused."""
    _v6only_by_default(monkeypatch)
    listener = cli.listen("::", 0)
    try:
        port = listener.getsockname()[1]
        assert _reaches("127.0.0.1", port)
        assert _reaches("::1", port)
    finally:
        listener.close()


def test_one_ipv6_address_is_that_address_only() -> None:
    listener = cli.listen("::1", 0)
    try:
        assert not _reaches("127.0.0.1", listener.getsockname()[1])
    finally:
        listener.close()


def test_no_ipv6_on_the_machine_is_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A container without IPv6 and ``PROXY_HOST=::``: the socket cannot even be made."""
    real_socket = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(cli.socket, "socket", no_ipv6)
    with pytest.raises(cli.ListenFailed) as failed:
        cli.listen("::", 0)
    assert str(failed.value) == "cannot listen on [::]:0: Address family not supported by protocol"


@pytest.fixture
def proxies() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


@pytest.mark.parametrize(
    ("host", "workers", "shown", "clients"),
    [
        ("::", "1", "[::]", ["127.0.0.1", "[::1]"]),
        ("[::1]", "2", "[::1]", ["[::1]"]),
    ],
)
def test_the_proxy_serves_on_ipv6_and_says_where(
    demo_backend: ServerProcess,
    proxies: list[ServerProcess],
    host: str,
    workers: str,
    shown: str,
    clients: list[str],
) -> None:
    """The "listening on" line is a URL (the IPv6 address in brackets), with --workers
    too, and the Ollama client reaches the proxy at each address it serves."""
    server = _spawn(
        ["-m", "trioproxy", "--host", host, "--port", "0", "--workers", workers,
         "--env-file", ""],
        base_env(OPENAI_API_BASE_URL=demo_backend.url),
    )  # fmt: skip
    proxies.append(server)
    assert server.url.startswith(f"http://{shown}:")
    port = server.url.rsplit(":", 1)[1]
    for address in clients:
        url = f"http://{address}:{port}"
        wait_healthy(url)
        with ollama.Client(host=url, timeout=10) as client:
            reply = client.chat(
                model="demo-chat", messages=[{"role": "user", "content": "hi [[tokens=3]]"}]
            )
        assert reply.message.content
