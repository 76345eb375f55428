"""The network shapes deployments have: IPv6 and dual-stack listening, backend host names
that resolve to several addresses or to none, and how a failure to connect is told."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
import trio

from trioproxy import cli
from trioproxy.config import ConfigError, load_settings
from trioproxy.errors import UpstreamUnavailable
from trioproxy.upstream import UpstreamPool

from .conftest import ROOT, ServerProcess, _spawn, base_env, closed_port_url, wait_healthy
from .fakes import ScriptedHandler, serving
from .test_cli_config import main_in_process, one_line
from .test_upstream import _Observer

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


def _resolving(monkeypatch: pytest.MonkeyPatch, name: str, addresses: list[str]) -> None:
    """``name`` resolves to ``addresses``, in that order (every other name as usual)."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host != name:
            return real_getaddrinfo(host, port, *args, **kwargs)
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
            if ":" in address
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
            for address in addresses
        ]

    monkeypatch.setattr(cli.socket, "getaddrinfo", getaddrinfo)


def test_a_host_name_with_ipv6_addresses_only_is_bound_at_its_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bound as an IPv4 name, one with IPv6 addresses only (``ip6-localhost``, a host of
    an IPv6-only network) failed: "Address family for hostname not supported"."""
    _resolving(monkeypatch, "v6only.test", ["::1"])
    listener = cli.listen("v6only.test", 0)
    try:
        address, port = listener.getsockname()[:2]
        assert (listener.family, address) == (socket.AF_INET6, "::1")
        assert _reaches("::1", port)
        assert not _reaches("127.0.0.1", port)
    finally:
        listener.close()


def test_a_host_name_with_both_families_is_bound_at_its_ipv4_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As Go's net.Listen (Ollama's) takes such a name (``localhost`` where /etc/hosts lists
    ::1 first): one address, IPv4's."""
    _resolving(monkeypatch, "dual.test", ["::1", "127.0.0.1"])
    listener = cli.listen("dual.test", 0)
    try:
        assert (listener.family, listener.getsockname()[0]) == (socket.AF_INET, "127.0.0.1")
    finally:
        listener.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_host_name_that_does_not_resolve_is_one_line(tmp_path: Path, workers: str) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "trioproxy", "--host", "no-such-host.invalid", "--port", "0",
            "--workers", workers, "--upstream", "http://127.0.0.1:1/v1", "--env-file", "",
        ],
        cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    line = one_line(result.stderr)
    assert line.startswith(
        "trioproxy: error: cannot listen on no-such-host.invalid:0: cannot resolve the host name ("
    ), line


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


@pytest.mark.parametrize(
    ("name", "given", "expected"),
    [
        ("PROXY_PORT", "abc", "a port 0-65535"),
        ("PROXY_PORT", "8080.0", "a port 0-65535"),
        ("WORKERS", "two", "an integer from 1 to 256"),
        ("REQUEST_TIMEOUT", "10s", "a positive number of seconds"),
        ("HEALTH_ERROR_RATE_DEGRADED", "5%", "a fraction between 0 and 1"),
    ],
)
def test_a_number_that_does_not_parse_says_what_was_expected(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    given: str,
    expected: str,
) -> None:
    """It said Python's "invalid literal for int() with base 10: 'abc'"."""
    code, err = main_in_process(
        monkeypatch, capsys, OPENAI_API_BASE_URL="http://127.0.0.1:1/v1", **{name: given}
    )
    assert code == 2
    assert one_line(err) == f"trioproxy: error: invalid {name}: expected {expected}, got {given!r}"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://back end:8000/v1", "http://back end:8000/v1"),
        ("http://backend:8000/v1 # the GPU box", "http://backend:8000/v1 # the GPU box"),
        ("http://user:pass word@backend/v1", "http://***@backend/v1"),
    ],
)
def test_a_backend_url_with_a_space_stops_the_program(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, shown: str
) -> None:
    """httpx sent it percent-encoded: to the host "back%20end", which failed at every
    request after the proxy had said it serves."""
    code, err = main_in_process(monkeypatch, capsys, OPENAI_API_BASE_URL=url)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"trioproxy: error: invalid OPENAI_API_BASE_URL {shown!r}: ")
    assert "a space is %20" in line and "pass" not in line


@pytest.mark.parametrize(
    ("url", "told"),
    [
        (
            "https://api.openai.com/v1/chat/completions",
            "give the base URL, without /chat/completions (such as https://api.openai.com/v1)",
        ),
        (
            "http://user:pass-word@127.0.0.1:8000/v1/embeddings/",
            "give the base URL, without /embeddings (such as http://127.0.0.1:8000/v1)",
        ),
        ("http://127.0.0.1:0/v1", "its port is not a number from 1 to 65535"),
        ("http://127.0.0.1:99999/v1", "its port is not a number from 1 to 65535"),
    ],
)
def test_a_backend_url_that_cannot_be_the_base_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, told: str
) -> None:
    """An endpoint's whole URL, pasted from a backend's docs, had every request sent to
    ".../chat/completions/chat/completions" (the backend's 404); port 0 failed each."""
    code, err = main_in_process(monkeypatch, capsys, OPENAI_API_BASE_URL=url)
    assert code == 2
    line = one_line(err)
    assert line.startswith("trioproxy: error: invalid OPENAI_API_BASE_URL ")
    assert line.endswith(told) and "pass-word" not in line


@pytest.mark.parametrize(
    "url",
    ["https://NAME.services.ai.azure.com/models", "https://openrouter.ai/api/v1/", "http://h:/v1"],
)
def test_base_urls_deployments_use_are_taken(url: str) -> None:
    assert load_settings({"OPENAI_API_BASE_URL": url}, dotenv_path=None).upstream_url == (
        url.rstrip("/")
    )


# ---- the backend's address -------------------------------------------------------------------


class _Resolver(trio.abc.HostnameResolver):
    """Host names as a deployment's DNS or /etc/hosts may give them, without asking the
    network: ``dual.test`` is ::1 first, then 127.0.0.1 (``localhost`` on many systems);
    ``gone.test`` does not exist; ``flaky.test`` fails as a resolver that got no answer."""

    lookups: list[str] = []  # every name asked, in order
    gone = 0  # how many lookups of restarting.test find no such name

    async def getaddrinfo(self, host: Any, port: Any, *args: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        self.lookups.append(name)
        if name == "gone.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if name == "flaky.test":  # a DNS server that did not answer this time
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if name == "restarting.test":  # gone while its container restarts (Docker's DNS)
            if self.gone:
                type(self).gone -= 1
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        if name == "dual.test":
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            ]
        return await trio.to_thread.run_sync(socket.getaddrinfo, host, port, *args)

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise NotImplementedError


async def _ask(
    base_url: str, retries: int = 0, observer: _Observer | None = None
) -> httpx.Response:
    trio.socket.set_custom_hostname_resolver(_Resolver())
    try:
        settings = load_settings(
            {"OPENAI_API_BASE_URL": base_url, "MAX_RETRIES": str(retries), "RETRY_BACKOFF": "0"},
            dotenv_path=None,
        )
        pool = UpstreamPool(settings, observer)
        try:
            return (await pool.request("GET", "/models")).response
        finally:
            await pool.aclose()
    finally:
        trio.socket.set_custom_hostname_resolver(None)


class _Models(ScriptedHandler):
    def do_GET(self) -> None:
        self.answer(200, b'{"object": "list", "data": []}')


async def test_a_name_whose_first_address_refuses_falls_back_to_the_next() -> None:
    """A backend on 127.0.0.1 only, named by a host name that resolves to ::1 first
    (``localhost`` where /etc/hosts lists ::1 first): the refused ::1 is left at once."""
    with serving(_Models) as url:
        port = httpx.URL(url).port
        response = await _ask(f"http://dual.test:{port}/v1")
    assert response.status_code == 200
    assert response.json() == {"object": "list", "data": []}


async def test_a_backend_host_that_does_not_resolve_is_named() -> None:
    """It said "[Errno -2] Name or service not known": which name, the operator had to
    guess. Credentials in the URL stay out of it."""
    with pytest.raises(UpstreamUnavailable) as failed:
        await _ask("http://user:pass-word@gone.test:8000/v1")
    assert str(failed.value) == (
        "backend request failed: cannot resolve the backend's host name 'gone.test' "
        "(Name or service not known)"
    )


@pytest.mark.parametrize(("host", "attempts"), [("gone.test", 1), ("flaky.test", 3)])
async def test_a_backend_host_that_does_not_exist_is_not_asked_for_again(
    host: str, attempts: int
) -> None:
    """A name the resolver says does not exist (EAI_NONAME) is a configuration error: it
    was retried as a failure to connect, each retry after its backoff, to the same answer.
    It fails at once, counted as the failed call it is (``connect``); a lookup that failed
    this time (EAI_AGAIN: a DNS server that did not answer) is still retried."""
    _Resolver.lookups.clear()
    calls = _Observer()
    with pytest.raises(UpstreamUnavailable) as failed:
        await _ask(f"http://{host}:8000/v1", retries=2, observer=calls)
    assert f"cannot resolve the backend's host name '{host}'" in str(failed.value)
    assert _Resolver.lookups == [host] * attempts
    assert calls.errors == ["connect"]
    assert calls.retries == ["connect"] * (attempts - 1)


class _ClosingModels(ScriptedHandler):
    """Closes each connection after its answer: every request resolves the name again."""

    def do_GET(self) -> None:
        self.answer(200, b'{"object": "list", "data": []}', headers={"Connection": "close"})


async def test_a_backend_host_that_resolved_before_and_is_gone_is_asked_for_again() -> None:
    """A name that resolved since the start and that the resolver now says does not exist
    is passing (a backend container restarting, a headless Kubernetes service without a
    ready pod: NXDOMAIN for a while; macOS says so without a network), not the
    configuration error it is at the start: it is retried as a failure to connect."""
    calls = _Observer()
    trio.socket.set_custom_hostname_resolver(_Resolver())
    try:
        with serving(_ClosingModels) as url:
            port = httpx.URL(url).port
            settings = load_settings(
                {"OPENAI_API_BASE_URL": f"http://restarting.test:{port}/v1",
                 "MAX_RETRIES": "2", "RETRY_BACKOFF": "0"},
                dotenv_path=None,
            )  # fmt: skip
            pool = UpstreamPool(settings, calls)
            try:
                assert (await pool.request("GET", "/models")).response.status_code == 200
                _Resolver.lookups.clear()
                _Resolver.gone = 1
                assert (await pool.request("GET", "/models")).response.status_code == 200
            finally:
                await pool.aclose()
    finally:
        _Resolver.gone = 0
        trio.socket.set_custom_hostname_resolver(None)
    assert _Resolver.lookups == ["restarting.test"] * 2
    assert calls.retries == ["connect"] and calls.errors == []


def test_the_proxy_answers_a_backend_host_that_does_not_exist_at_once(
    start_proxy: Callable[..., ServerProcess],
) -> None:
    """End to end, the name in the reserved ``.invalid`` domain (resolved by a stub in the
    proxy's process: no query leaves the machine): each dialect's client gets the 502 in
    its own shape, naming the host and not the credentials in the URL; the metrics count
    one failed ``connect`` call per request and no retry (an Ollama client's request was
    tried 1 + MAX_RETRIES times)."""
    import anthropic

    from .dns_stub import PROXY_WITH_STUB
    from .test_metrics_e2e import scrape, total, wait_for

    base = "http://user:pass-word@no-such-host.invalid/v1"
    server = _spawn(
        [*PROXY_WITH_STUB, "--host", "127.0.0.1", "--port", "0", "--env-file", ""],
        base_env(OPENAI_API_BASE_URL=base, MAX_RETRIES="3", RETRY_BACKOFF="0.01"),
    )
    try:
        wait_healthy(server.url)
        said = "cannot resolve the backend's host name 'no-such-host.invalid'"
        messages = [{"role": "user", "content": "hi"}]
        with (
            ollama.Client(host=server.url, timeout=10) as by_ollama,
            openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0) as by_openai,
            anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0) as by_anthropic,
        ):
            with pytest.raises(ollama.ResponseError) as ollama_error:
                by_ollama.chat(model="m", messages=messages)
            with pytest.raises(openai.APIStatusError) as openai_error:
                by_openai.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
            with pytest.raises(anthropic.APIStatusError) as anthropic_error:
                by_anthropic.messages.create(model="m", max_tokens=8, messages=messages)  # type: ignore[arg-type]
        assert ollama_error.value.status_code == 502 and said in ollama_error.value.error
        assert openai_error.value.status_code == 502 and said in openai_error.value.message
        assert openai_error.value.code == "upstream_unavailable"
        assert anthropic_error.value.status_code == 502 and said in anthropic_error.value.message
        assert anthropic_error.value.body["type"] == "error"  # type: ignore[index]
        wait_for(lambda: total(scrape(server.url), "http_requests_total", status="502") == 3)
        samples = scrape(server.url)
        assert total(samples, "trioproxy_upstream_errors_total", reason="connect") == 3
        assert total(samples, "trioproxy_upstream_retries_total") == 0
        assert "pass-word" not in server.log()
    finally:
        server.stop()


async def test_a_refused_connection_names_each_address_tried() -> None:
    """trio says "all attempts to connect to HOST:PORT failed", not why, nor where."""
    port = httpx.URL(closed_port_url()).port
    with pytest.raises(UpstreamUnavailable) as failed:
        await _ask(f"http://dual.test:{port}/v1")
    assert str(failed.value) == (
        f"backend request failed: cannot connect to dual.test:{port} "
        "(::1: connection refused; 127.0.0.1: connection refused)"
    )
    with pytest.raises(UpstreamUnavailable) as failed:
        await _ask(f"http://[::1]:{port}/v1")
    assert str(failed.value) == (
        f"backend request failed: cannot connect to [::1]:{port} (connection refused)"
    )


@pytest.fixture
def silent_backend() -> Iterator[str]:
    """Accepts connections (the kernel does, from its backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"


def test_a_backend_that_never_answers_is_a_504_naming_the_timeout(
    start_proxy: Callable[..., ServerProcess], silent_backend: str
) -> None:
    """Connected, so no CONNECT_TIMEOUT: the wait for an answer is bounded by
    REQUEST_TIMEOUT, a stream's by STREAM_FIRST_TOKEN_TIMEOUT, and the 504 says which (it
    said "within the read timeout", and "in time")."""
    proxy = start_proxy(
        silent_backend, REQUEST_TIMEOUT="0.5", STREAM_FIRST_TOKEN_TIMEOUT="0.5", MAX_RETRIES="0"
    )
    prompt = [{"role": "user", "content": "hi"}]
    with ollama.Client(host=proxy.url, timeout=10) as client:
        with pytest.raises(ollama.ResponseError) as failed:
            client.chat(model="demo-chat", messages=prompt)
    assert failed.value.status_code == 504
    assert failed.value.error.endswith("no data from the backend within 0.5 s (REQUEST_TIMEOUT)")
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as refused:
            sdk.chat.completions.create(model="demo-chat", messages=prompt, stream=True)  # type: ignore[arg-type]
    assert refused.value.status_code == 504
    assert refused.value.body == {
        "message": "the backend did not start answering within 0.5 s (STREAM_FIRST_TOKEN_TIMEOUT)",
        "type": "server_error",
        "param": None,
        "code": "upstream_timeout",
    }


# ---- behind a reverse proxy ------------------------------------------------------------------

NGINX_EXAMPLE = ROOT / "deploy" / "nginx" / "trioproxy.conf"
NGINX = shutil.which("nginx")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _hypercorn_below(root: str, backend: str) -> Iterator[str]:
    """The proxy served by plain hypercorn with ``--root-path``; yields its address."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "--worker-class", "trio", "--root-path", root,
         "--bind", f"127.0.0.1:{port}", "trioproxy.app:create_app()"],
        cwd=ROOT,
        env=base_env(OPENAI_API_BASE_URL=backend, TRIOPROXY_ENV_FILE=""),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}{root}")
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextlib.contextmanager
def _trioproxy_below(root: str, backend: str) -> Iterator[str]:
    """The proxy served by the ``trioproxy`` command with ``ROOT_PATH``, as the example's
    comment says; yields its address."""
    server = _spawn(
        ["-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", "--env-file", ""],
        base_env(OPENAI_API_BASE_URL=backend, ROOT_PATH=root),
    )
    try:
        wait_healthy(server.url + root)
        yield server.url.removeprefix("http://")
    finally:
        server.stop()


@pytest.fixture(params=["prefix stripped", "ROOT_PATH", "hypercorn --root-path"])
def nginx_in_front(
    request: pytest.FixtureRequest,
    proxy: ServerProcess,
    demo_backend: ServerProcess,
    tmp_path: Path,
) -> Iterator[str]:
    """deploy/nginx/trioproxy.conf run by Debian's nginx in front of a trioproxy; yields
    nginx's base URL. Only the upstream's address and the listen port are changed, and
    for the variant its comment gives, the "/" after the upstream (nginx then passes
    /ollama/... on, and the proxy is served below it: ROOT_PATH, or plain hypercorn's
    --root-path)."""
    if NGINX is None:
        pytest.skip("nginx is not installed")
    with contextlib.ExitStack() as stack:
        example = NGINX_EXAMPLE.read_text()
        changes = [("listen 80;", f"listen 127.0.0.1:{(port := _free_port())};")]
        if request.param == "prefix stripped":
            address = proxy.url.removeprefix("http://")
        else:
            below = _trioproxy_below if request.param == "ROOT_PATH" else _hypercorn_below
            address = stack.enter_context(below("/ollama", demo_backend.url))
            changes.append(("proxy_pass http://trioproxy/;", "proxy_pass http://trioproxy;"))
        changes.append(("server 127.0.0.1:11434;", f"server {address};"))
        for written, used in changes:
            assert written in example  # the example and this test must not drift apart
            example = example.replace(written, used)
        stack.enter_context(_nginx(tmp_path, example))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(f"{url}/ollama")
        yield url


@contextlib.contextmanager
def _nginx(tmp_path: Path, site: str) -> Iterator[None]:
    (tmp_path / "trioproxy.conf").write_text(site)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp_path}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        # as root, nginx's workers would run as nobody, who cannot enter pytest's tmp_path
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log warn;\n"
        f"events {{}}\nhttp {{\n    access_log off;\n{temp_paths}\n"
        f"    include {tmp_path}/trioproxy.conf;\n}}\n"
    )
    assert NGINX is not None
    server = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-e", f"{tmp_path}/error.log", "-c", f"{tmp_path}/nginx.conf"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_nginx_example_serves_both_apis_below_its_prefix(nginx_in_front: str) -> None:
    """The Ollama and OpenAI clients, streaming and not, through the example's
    ``location /ollama/``; a body past nginx's own 1 MB default is let through."""
    prompt = [{"role": "user", "content": "hi [[tokens=4]]"}]
    with ollama.Client(host=f"{nginx_in_front}/ollama", timeout=10) as client:
        parts = list(client.chat(model="demo-chat", messages=prompt, stream=True))
        assert len(parts) > 1 and parts[-1].done
        assert client.chat(model="demo-chat", messages=prompt).message.content
        big = [{"role": "user", "content": "x" * 1_500_000 + " [[tokens=2]]"}]
        assert client.chat(model="demo-chat", messages=big).message.content
    with openai.OpenAI(base_url=f"{nginx_in_front}/ollama/v1", api_key="unused") as sdk:
        chunks = list(
            sdk.chat.completions.create(model="demo-chat", messages=prompt, stream=True)  # type: ignore[arg-type]
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
