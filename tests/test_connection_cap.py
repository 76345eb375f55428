"""MAX_CONNECTIONS: the open client connections a worker takes (hypercorn_patches, patch 16).

Real proxies on 127.0.0.1, raw sockets: the connections held are keep-alive connections
that were each served a request first, so the proxy has certainly counted them when the
next one arrives."""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h11
import pytest
import trustme

from trioproxy.config import ConfigError, load_settings

from .conftest import ServerProcess, _spawn, base_env

REFUSAL_LINE = re.compile(r"refused (\d+) new connections? .*\(503\): this worker holds its limit")


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


class Client:
    """One HTTP/1.1 connection, requests sent and answers read with h11."""

    def __init__(self, url: str, tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(_address(url), timeout=10)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.h11 = h11.Connection(h11.CLIENT)

    def send_request(self, path: str) -> None:
        request = h11.Request(method="GET", target=path, headers=[("Host", "127.0.0.1")])
        self.sock.sendall(self.h11.send(request) + self.h11.send(h11.EndOfMessage()))

    def read_response(self) -> tuple[h11.Response, bytes]:
        response, body = None, b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, body

    def get(self, path: str) -> tuple[h11.Response, bytes]:
        self.send_request(path)
        response, body = self.read_response()
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return response, body

    def closed_by_server(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


@contextmanager
def _clients() -> Iterator[list[Client]]:
    held: list[Client] = []
    try:
        yield held
    finally:
        for client in held:
            client.close()


def _headers(response: h11.Response) -> dict[bytes, bytes]:
    return {name: value for name, value in response.headers}


def _assert_refusal(response: h11.Response, body: bytes, limit: int) -> str:
    """Check the cap's 503; its request id (fresh: 32 hex digits)."""
    assert response.status_code == 503
    assert response.reason == b"Service Unavailable"
    headers = _headers(response)
    assert headers[b"connection"] == b"close"
    assert headers[b"retry-after"] == b"1"
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body) == {
        "error": f"the proxy is holding its limit of {limit} open connections "
        "(MAX_CONNECTIONS); retry shortly"
    }
    request_id = headers[b"x-request-id"].decode()
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), headers
    return request_id


def _hold_served(
    held: list[Client], url: str, count: int, tls: ssl.SSLContext | None = None
) -> None:
    """Open ``count`` connections, each served a request (so counted open), kept idle.

    The first waits, scraping on its own connection, until it is the only one counted: the
    readiness probe's connection (conftest.wait_healthy) is closed by the time the proxy is
    started, but the proxy may not have read that close yet, and would count it against
    the cap (a 503 for the last one held)."""
    held.append(Client(url, tls))
    _wait_until_alone(held[-1])
    for _ in range(count - 1):
        held.append(Client(url, tls))
        assert held[-1].get("/health")[0].status_code == 200


def _wait_until_alone(client: Client) -> None:
    deadline = time.monotonic() + 10
    while True:
        response, body = client.get("/metrics")
        assert response.status_code == 200
        if _sample(body.decode(), "trioproxy_connections_open") == 1:
            return
        assert time.monotonic() < deadline, "an earlier connection's close was never counted"
        time.sleep(0.02)


def _served_when_room(url: str, path: str, refused: list[int]) -> tuple[Client, bytes]:
    """A new connection served ``path`` once the proxy has noticed a close; the 503s met
    before are counted in ``refused``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        client = Client(url)
        response, body = client.get(path)
        if response.status_code == 200:
            return client, body
        _assert_refusal(response, body, 5)
        refused[0] += 1
        client.close()
        time.sleep(0.02)
    raise AssertionError(f"no connection was served {path} after one closed")


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{name} not in the scrape"
    return float(match.group(1))


def test_past_the_cap_a_connection_gets_a_503_and_a_close(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    proxy = start_proxy(demo_backend.url, MAX_CONNECTIONS="5")
    refused = [0]
    with _clients() as held:
        _hold_served(held, proxy.url, 5)

        # the 6th sends its request: answered without it being read, then closed
        sixth = Client(proxy.url)
        held.append(sixth)
        sixth.send_request("/v1/models")
        first_id = _assert_refusal(*sixth.read_response(), 5)
        assert sixth.closed_by_server()
        refused[0] += 1
        # the 7th sends nothing: the same answer, with an id of its own
        seventh = Client(proxy.url)
        held.append(seventh)
        assert _assert_refusal(*seventh.read_response(), 5) != first_id
        assert seventh.closed_by_server()
        refused[0] += 1

        # the five are still served
        response, body = held[0].get("/v1/models")
        assert response.status_code == 200
        assert json.loads(body)["object"] == "list"

        # one closes: a new connection gets in (once the proxy has seen the close)
        held.pop(0).close()
        newcomer, _ = _served_when_room(proxy.url, "/health", refused)
        held.append(newcomer)
        assert newcomer.get("/health")[0].status_code == 200  # and stays served

        # two more close: room for a scrape, which sees the others and the refusals
        held.pop(0).close()
        held.pop(0).close()
        deadline = time.monotonic() + 10
        while True:
            scraper, text = _served_when_room(proxy.url, "/metrics", refused)
            scraper.close()
            # 3 held (the 6th and 7th were closed by the proxy) + the scraper's
            if _sample(text.decode(), "trioproxy_connections_open") == 4:
                break
            assert time.monotonic() < deadline, "the closes were never counted"
    assert _sample(text.decode(), "trioproxy_connections_refused_total") == refused[0]

    # one WARNING line at once for the first refusal; the rest within 10 s are held back
    lines = [line for line in proxy.log().splitlines() if REFUSAL_LINE.search(line)]
    assert len(lines) == 1, proxy.log()
    assert "WARNING" in lines[0]
    assert "refused 1 new connection (503): this worker holds its limit of 5 open " in lines[0]
    assert "(MAX_CONNECTIONS)" in lines[0]


def test_zero_is_no_cap(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    proxy = start_proxy(demo_backend.url, MAX_CONNECTIONS="0")
    with _clients() as held:
        _hold_served(held, proxy.url, 20)
        scraper = Client(proxy.url)
        held.append(scraper)
        text = scraper.get("/metrics")[1].decode()
    assert _sample(text, "trioproxy_connections_open") == 21
    assert _sample(text, "trioproxy_connections_refused_total") == 0
    assert not REFUSAL_LINE.search(proxy.log())


def test_the_open_connections_of_every_worker_are_summed(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    proxy = start_proxy(demo_backend.url, "--workers", "2")
    with _clients() as held:
        _hold_served(held, proxy.url, 6)
        scraper = Client(proxy.url)
        held.append(scraper)
        deadline = time.monotonic() + 10
        while True:  # each worker publishes its count within 0.5 s
            text = scraper.get("/metrics")[1].decode()
            if _sample(text, "trioproxy_connections_open") == 7:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
    assert "# TYPE trioproxy_connections_refused_total counter" in text
    assert _sample(text, "trioproxy_connections_refused_total") == 0


def test_over_tls_a_connection_past_the_cap_is_closed_without_a_handshake(
    demo_backend: ServerProcess, tmp_path: Path
) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    env = base_env(
        OPENAI_API_BASE_URL=demo_backend.url,
        TLS_CERTFILE=str(cert),
        TLS_KEYFILE=str(key),
        MAX_CONNECTIONS="2",
    )
    command = ["-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", "--env-file", ""]
    proxy = _spawn(command, env)
    try:
        with _clients() as held:
            _hold_served(held, proxy.url, 2, context)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                Client(proxy.url, context)  # closed in the handshake
            assert held[0].get("/health")[0].status_code == 200
    finally:
        proxy.stop()
    assert len(REFUSAL_LINE.findall(proxy.log())) == 1


@pytest.mark.parametrize("raw", ["-1", "ten", "1.5", "1e4", ""])
def test_max_connections_must_be_a_count(raw: str) -> None:
    with pytest.raises(ConfigError, match="invalid MAX_CONNECTIONS: expected an integer >= 0"):
        load_settings(environ={"MAX_CONNECTIONS": raw}, dotenv_path=None)


def test_max_connections_default_and_no_cap() -> None:
    assert load_settings(environ={}, dotenv_path=None).max_connections == 10_000
    assert load_settings(environ={"MAX_CONNECTIONS": "0"}, dotenv_path=None).max_connections == 0
    with pytest.raises(ConfigError, match="invalid MAX_CONNECTIONS"):
        load_settings(environ={}, dotenv_path=None, max_connections=-5)


def test_a_refused_connection_has_its_access_line(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """With ACCESS_LOG=true a connection refused at the cap is logged as every answer is:
    the client's address, the 503 and the bytes of it sent, what refused it, and the
    request id the 503 carries, a fresh one for each (operators looking for a client's 503
    find it there by its id, not only in the counter)."""
    proxy = start_proxy(demo_backend.url, MAX_CONNECTIONS="2", ACCESS_LOG="true")
    with _clients() as held:
        _hold_served(held, proxy.url, 2)
        third = Client(proxy.url)
        held.append(third)
        third.send_request("/v1/models")
        response, body = third.read_response()
        deadline = time.monotonic() + 5
        while "(refused: connection cap)" not in proxy.log() and time.monotonic() < deadline:
            time.sleep(0.02)
    lines = [line for line in proxy.log().splitlines() if "(refused: connection cap)" in line]
    assert len(lines) == 1, proxy.log()
    request_id = _assert_refusal(response, body, 2)
    match = re.search(
        r"trioproxy\.access \[(\w+)\] 127\.0\.0\.1 - - 503 0\.0 ms (\d+) B ", lines[0]
    )
    assert match is not None and match.group(1) == request_id, lines[0]
    head_and_body = len(body) + len(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert int(match.group(2)) > head_and_body  # the whole answer, headers included
