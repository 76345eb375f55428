"""TLS (``TLS_CERTFILE``, ``TLS_KEYFILE``): the proxy serves HTTPS itself, in one process
and with ``--workers``, to the official clients; HTTP/1.1 only; a bad pair stops it before
it serves."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from trioproxy.config import ConfigError, load_settings

from .conftest import ServerProcess, _spawn, base_env


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    paths = {name: str(folder / f"{name}.pem") for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    issued.cert_chain_pems[0].write_to_path(paths["cert"])
    issued.private_key_pem.write_to_path(paths["key"])
    return paths


def trusting(files: dict[str, str]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=files["ca"])


def _start(upstream: str, files: dict[str, str], *args: str) -> ServerProcess:
    env = base_env(
        OPENAI_API_BASE_URL=upstream,
        TLS_CERTFILE=files["cert"],
        TLS_KEYFILE=files["key"],
        KEEP_ALIVE_TIMEOUT="5",  # what a silent connection's handshake gets (3-10 s)
    )
    command = ["-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", *args]
    server = _spawn([*command, "--env-file", ""], env)
    assert server.url.startswith("https://"), server.url
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                if httpx.get(server.url + "/health", verify=trusting(files), timeout=2).is_success:
                    return server
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
    except BaseException:
        server.stop()  # whatever went wrong, no server outlives its test
        raise


@pytest.fixture(scope="module")
def https_proxy(demo_backend: ServerProcess, tls_files: dict[str, str]) -> Iterator[str]:
    server = _start(demo_backend.url, tls_files)
    yield server.url
    server.stop()


def test_the_official_clients_talk_to_it_over_tls(
    https_proxy: str, tls_files: dict[str, str]
) -> None:
    with httpx.Client(verify=trusting(tls_files)) as http:
        client = openai.OpenAI(
            base_url=https_proxy + "/v1", api_key="unused", max_retries=0, http_client=http
        )
        reply = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hi [[tokens=3]]"}]
        )
        assert reply.choices[0].message.content == "Hello from the"
        streamed = client.chat.completions.create(
            model="demo-chat",
            messages=[{"role": "user", "content": "hi [[tokens=4]]"}],
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == "Hello from the trioproxy"
    with ollama.Client(host=https_proxy, verify=trusting(tls_files)) as local:
        chunks = list(
            local.chat(
                model="demo-chat",
                messages=[{"role": "user", "content": "hi [[tokens=3]]"}],
                stream=True,
            )
        )
        assert chunks[-1].done and "".join(c.message.content for c in chunks) == "Hello from the"


def test_only_http_1_1_is_offered(https_proxy: str, tls_files: dict[str, str]) -> None:
    """A client offering HTTP/2 (a browser) still gets HTTP/1.1, the protocol the proxy's
    streaming, disconnect and shutdown handling are built on."""
    context = trusting(tls_files)
    context.set_alpn_protocols(["h2", "http/1.1"])
    port = int(https_proxy.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"


def test_plain_http_gets_no_answer_from_the_tls_port(https_proxy: str) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(https_proxy.replace("https://", "http://") + "/health", timeout=5)


def test_workers_serve_tls_too(
    demo_backend: ServerProcess, tls_files: dict[str, str], https_proxy: str
) -> None:
    """And a connection that never starts its handshake is closed like an idle one
    (KEEP_ALIVE_TIMEOUT, 5 s here), by one process or by workers: hypercorn held it 60 s,
    so a few hundred such sockets held as many connections that long."""
    server = _start(demo_backend.url, tls_files, "--workers", "2")
    try:
        with httpx.Client(base_url=server.url, verify=trusting(tls_files), timeout=10) as http:
            body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
            assert http.post("/api/chat", json=body | {"stream": False}).status_code == 200
        silent = [
            socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=20)
            for url in (https_proxy, server.url)
        ]
        for connection in silent:
            with connection:
                assert connection.recv(1) == b""  # closed by the server, long before 60 s
    finally:
        server.stop()


def test_a_bad_certificate_pair_stops_it_before_it_serves(
    tls_files: dict[str, str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="TLS_KEYFILE"):
        load_settings({"TLS_CERTFILE": tls_files["cert"]}, dotenv_path=None)
    with pytest.raises(ConfigError, match="TLS_CERTFILE"):
        load_settings({"TLS_KEYFILE": tls_files["key"]}, dotenv_path=None)
    mismatched = {"TLS_CERTFILE": tls_files["cert"], "TLS_KEYFILE": tls_files["ca"]}
    with pytest.raises(ConfigError, match="cannot load"):
        load_settings(mismatched, dotenv_path=None)
    missing = {"TLS_CERTFILE": str(tmp_path / "none.pem"), "TLS_KEYFILE": tls_files["key"]}
    with pytest.raises(ConfigError, match="cannot load"):
        load_settings(missing, dotenv_path=None)
    encrypted = tmp_path / "encrypted.pem"
    key = serialization.load_pem_private_key(Path(tls_files["key"]).read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    locked = {"TLS_CERTFILE": tls_files["cert"], "TLS_KEYFILE": str(encrypted)}
    with pytest.raises(ConfigError, match="encrypted"):  # never a prompt on the terminal
        load_settings(locked, dotenv_path=None)
    ok = load_settings({"TLS_CERTFILE": tls_files["cert"], "TLS_KEYFILE": tls_files["key"]})
    assert ok.tls_certfile == tls_files["cert"]


def test_a_backend_whose_certificate_is_not_trusted_is_named_as_such(
    https_proxy: str, start_proxy: Callable[..., ServerProcess]
) -> None:
    """httpx's ConnectError says nothing under trio: the reason (what tells an operator
    to set SSL_CERT_FILE) is in its cause's cause, and was left out."""
    front = start_proxy(https_proxy + "/v1", MAX_RETRIES="0")
    body = {"model": "demo-chat", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(front.url + "/api/chat", json=body, timeout=10)
    assert answer.status_code == 502
    assert "certificate verify failed" in answer.json()["error"]
    ready = httpx.get(front.url + "/ready", timeout=10).json()
    assert "certificate verify failed" in ready["backend_error"]


def test_a_tls_backend_s_read_timeout_reads_as_a_plain_one_s(
    https_proxy: str, tls_files: dict[str, str], start_proxy: Callable[..., ServerProcess]
) -> None:
    """It said "ReadTimeout: cancelled due to deadline" (trio's words) over TLS."""
    front = start_proxy(https_proxy + "/v1", SSL_CERT_FILE=tls_files["ca"], REQUEST_TIMEOUT="1")
    content = "hi [[first_delay=3]]"
    body = {
        "model": "demo-chat",
        "stream": False,
        "messages": [{"role": "user", "content": content}],
    }
    answer = httpx.post(front.url + "/api/chat", json=body, timeout=10)
    assert answer.status_code == 504
    assert answer.json()["error"].endswith("no data from the backend within 1 s (REQUEST_TIMEOUT)")


def test_a_backend_that_never_finishes_its_handshake_is_a_connect_timeout_in_words(
    start_proxy: Callable[..., ServerProcess],
) -> None:
    """It said "ConnectTimeout: cancelled due to deadline" (trio's words)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes the TCP connection only
        port = silent.getsockname()[1]
        front = start_proxy(f"https://127.0.0.1:{port}/v1", CONNECT_TIMEOUT="0.5", MAX_RETRIES="0")
        body = {
            "model": "demo-chat",
            "stream": False,
            "messages": [{"role": "user", "content": "hi"}],
        }
        answer = httpx.post(front.url + "/api/chat", json=body, timeout=10)
    assert answer.status_code == 502
    assert answer.json()["error"] == (
        "backend request failed: no connection to the backend (TCP and TLS) within 0.5 s "
        "(CONNECT_TIMEOUT)"
    )


def test_the_container_probe_knocks_over_https(https_proxy: str, tls_files: dict[str, str]) -> None:
    """The image's HEALTHCHECK (``python -m trioproxy.probe``) probed plain HTTP on a
    proxy serving HTTPS, so the container was marked unhealthy for ever."""
    import subprocess
    import sys

    port = https_proxy.rsplit(":", 1)[1]
    env = base_env(PROXY_PORT=port, TLS_CERTFILE=tls_files["cert"], TLS_KEYFILE=tls_files["key"])
    probe = [sys.executable, "-m", "trioproxy.probe"]
    folder = Path(tls_files["ca"]).parent  # no .env there
    assert subprocess.run(probe, env=env, cwd=folder, timeout=30).returncode == 0
    plain = {k: v for k, v in env.items() if not k.startswith("TLS_")}
    assert subprocess.run(probe, env=plain, cwd=folder, timeout=30).returncode == 1
