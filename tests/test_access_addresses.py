"""The client address on access lines: the connecting peer, or behind proxies trusted by
FORWARDED_ALLOW_IPS, the client they name in X-Forwarded-For (walked from the right).

Whatever a client sends, what is logged is an IP address or the peer's: never its text.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.client_address import (
    MAX_FORWARDED_ENTRIES,
    NO_PROXIES,
    ClientAddresses,
    TrustedProxies,
    parse_entry,
    parse_trusted_proxies,
    x_forwarded_for_client,
)
from trioproxy.config import ConfigError, load_settings
from trioproxy.logs import JsonFormatter

from .conftest import ROOT, ServerProcess, base_env

StartProxy = Callable[..., ServerProcess]
ip = ipaddress.ip_address
NGINX = parse_trusted_proxies("10.0.0.0/8, 127.0.0.1, ::1")

# ---- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", NO_PROXIES),
        (" , ", NO_PROXIES),
        ("*", TrustedProxies(everyone=True)),
        (" * ", TrustedProxies(everyone=True)),
        ("127.0.0.1", TrustedProxies((ipaddress.ip_network("127.0.0.1/32"),))),
        (
            "10.0.0.0/8, ::1,10.0.0.0/8",  # repeated: kept once
            TrustedProxies((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))),
        ),
        ("fd00::/8", TrustedProxies((ipaddress.ip_network("fd00::/8"),))),
    ],
)
def test_trusted_proxies_are_addresses_and_networks(text: str, expected: TrustedProxies) -> None:
    assert parse_trusted_proxies(text) == expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("nginx", "'nginx' is no IP address or CIDR network"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set: did you mean 10.0.0.0/8?"),
        ("10.0.0.0/33", "'10.0.0.0/33' is no IP address"),
        ("127.0.0.1:8080", "'127.0.0.1:8080' is no IP address"),
        ("*, 10.0.0.1", "'*' trusts every peer: give it alone"),
        ("fe80::1%eth0", "without its scope id"),
    ],
)
def test_a_bad_trusted_proxy_stops_the_program_naming_the_setting(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"FORWARDED_ALLOW_IPS": text}, dotenv_path=None)
    assert str(info.value).startswith("invalid FORWARDED_ALLOW_IPS: "), info.value
    assert says in str(info.value)


def test_a_trusted_proxy_given_in_python_is_parsed_too() -> None:
    settings = load_settings(environ={}, dotenv_path=None, forwarded_allow_ips="10.0.0.0/8")
    assert settings.forwarded_allow_ips == parse_trusted_proxies("10.0.0.0/8")
    with pytest.raises(ConfigError, match="FORWARDED_ALLOW_IPS"):
        load_settings(environ={}, dotenv_path=None, forwarded_allow_ips="proxy.local")


def test_the_program_exits_2_on_a_bad_trusted_proxy() -> None:
    env = base_env(OPENAI_API_BASE_URL="http://127.0.0.1:1/v1", FORWARDED_ALLOW_IPS="lb.local")
    result = subprocess.run(
        [sys.executable, "-m", "trioproxy", "--port", "0", "--env-file", ""],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    assert "invalid FORWARDED_ALLOW_IPS: 'lb.local'" in result.stderr


def test_trust_covers_an_ipv4_peer_of_a_dual_stack_socket() -> None:
    trusted = parse_trusted_proxies("10.0.0.0/8")
    assert trusted.trusts(ip("10.1.2.3")) and trusted.trusts(ip("::ffff:10.1.2.3"))
    assert not trusted.trusts(ip("11.0.0.1")) and not trusted.trusts(ip("::1"))
    assert TrustedProxies(everyone=True).trusts(ip("2001:db8::1"))
    assert not NO_PROXIES.trusts(ip("127.0.0.1"))


# ---- one entry --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "address"),
    [
        (b"203.0.113.7", "203.0.113.7"),
        (b"2001:db8::7", "2001:db8::7"),
        (b"2001:DB8:0:0::7", "2001:db8::7"),  # printed by us, in the one canonical form
        (b"203.0.113.7:41000", "203.0.113.7"),  # with a port, as Azure's gateways send
        (b"[2001:db8::7]:41000", "2001:db8::7"),
        (b"[2001:db8::7]", "2001:db8::7"),
        (b"::ffff:203.0.113.7", "::ffff:cb00:7107"),
        (b"unknown", None),  # what nginx/squid write for an unknown hop
        (b"_hidden", None),
        (b"203.0.113.7 evil", None),
        (b"203.0.113.7:", None),
        (b"203.0.113.7:99999999", None),
        (b"[203.0.113.7]", None),  # brackets hold IPv6 only
        (b"[2001:db8::7", None),
        (b"[2001:db8::7]x", None),
        (b"fe80::1%eth0", None),  # a scope id is any text
        (b"fe80::1%\x1b[31m", None),
        (b"0203.0.113.7", None),  # leading zeros: octal to some parsers
        (b"\xff\xfe", None),
        (b"1" * 65, None),
        (b"localhost", None),
    ],
)
def test_an_entry_is_an_address_or_nothing(entry: bytes, address: str | None) -> None:
    parsed = parse_entry(entry)
    assert (None if parsed is None else str(parsed)) == address


# ---- the walk ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "client"),
    [
        ([b"203.0.113.7"], "203.0.113.7"),
        ([b"198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # the rightmost not trusted
        ([b"198.51.100.1, 203.0.113.7, 10.0.0.2, 10.0.0.1"], "203.0.113.7"),  # past proxies
        ([b"198.51.100.1,203.0.113.7,,10.0.0.1"], "203.0.113.7"),  # empty elements ignored
        ([b"198.51.100.1", b"203.0.113.7, 10.0.0.1"], "203.0.113.7"),  # two header lines
        ([b"10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # every hop trusted: the leftmost
        ([b"203.0.113.7, garbage, 10.0.0.1"], "10.0.0.1"),  # no walking past garbage
        ([b"garbage"], None),  # the peer
        ([b""], None),
        ([b" , "], None),
        ([b"203.0.113.7, \t10.0.0.1 "], "203.0.113.7"),
        ([b"2001:db8::7, ::1"], "2001:db8::7"),
    ],
)
def test_the_client_is_the_rightmost_address_not_of_a_trusted_proxy(
    header: list[bytes], client: str | None
) -> None:
    found = x_forwarded_for_client(header, NGINX)
    assert (None if found is None else str(found)) == client


def test_everyone_trusted_names_the_leftmost_entry() -> None:
    everyone = TrustedProxies(everyone=True)
    assert str(x_forwarded_for_client([b"198.51.100.1, 203.0.113.7, 10.0.0.1"], everyone)) == (
        "198.51.100.1"
    )


def test_a_header_of_thousands_of_entries_is_read_no_further_than_the_bound() -> None:
    """Every entry a trusted proxy's: the walk stops after MAX_FORWARDED_ENTRIES of them
    and names the last examined, not the leftmost of 5,000."""
    entries = [f"10.0.{i // 256}.{i % 256}".encode() for i in range(5000)]
    found = x_forwarded_for_client([b",".join(entries)], NGINX)
    assert found == ip(entries[-MAX_FORWARDED_ENTRIES].decode())
    # also over many header lines, and when the entries are empty
    found = x_forwarded_for_client([*entries[:-1], entries[-1]], NGINX)
    assert found == ip(entries[-MAX_FORWARDED_ENTRIES].decode())
    assert x_forwarded_for_client([b"203.0.113.7" + b"," * 100_000], NGINX) is None


def test_the_split_is_bounded_whatever_the_header_holds() -> None:
    """The walk never splits more than it examines: a header of 100,000 commas is split
    into MAX_FORWARDED_ENTRIES + 1 pieces, not 100,001 (counted on the bytes method)."""
    splits: list[int] = []

    class Counting(bytes):
        def rsplit(self, sep: bytes | None = None, maxsplit: int = -1) -> list[bytes]:  # type: ignore[override]
            pieces = bytes(self).rsplit(sep, maxsplit)
            splits.append(len(pieces))
            return pieces

    x_forwarded_for_client([Counting(b"10.0.0.1," * 100_000)], NGINX)
    assert splits == [MAX_FORWARDED_ENTRIES + 1]


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
junk = st.one_of(
    st.binary(max_size=80).filter(lambda b: b"," not in b),
    st.sampled_from([b"unknown", b"", b" ", b"1.2.3.4 x", b"[::1", b"fe80::1%x"]),
    addresses.map(lambda a: str(a).encode()),
)


@given(
    left=st.lists(junk, max_size=10),
    client=addresses,
    hops=st.lists(st.ip_addresses(network="10.0.0.0/8"), max_size=10),
)
def test_what_the_client_wrote_left_of_itself_never_matters(
    left: list[bytes], client: ipaddress.IPv4Address | ipaddress.IPv6Address, hops: list
) -> None:
    """The trusted proxies each appended who they heard from: the client is the address
    left of them, whatever the client itself put in front."""
    if NGINX.trusts(client):
        return  # a client inside the trusted networks is one more hop
    header = b", ".join([*left, str(client).encode(), *(str(h).encode() for h in hops)])
    assert x_forwarded_for_client([header], NGINX) == client


@given(st.lists(st.binary(max_size=100), max_size=5))
def test_any_header_gives_an_address_it_holds_or_the_peer(values: list[bytes]) -> None:
    found = x_forwarded_for_client(values, NGINX)
    if found is not None:
        text = str(found)
        assert ip(text) == found  # an address we print, nothing of the client's own text
        assert text.isascii() and " " not in text and "\n" not in text


# ---- per request ------------------------------------------------------------------------------


def scope(peer: tuple[str, int] | None, *forwarded: bytes) -> dict:
    headers = [(b"host", b"x"), *((b"x-forwarded-for", value) for value in forwarded)]
    return {"client": peer, "headers": headers}


def test_the_peer_is_named_unless_it_is_trusted() -> None:
    behind_nginx = ClientAddresses(parse_trusted_proxies("127.0.0.1"))
    assert behind_nginx.of(scope(("127.0.0.1", 5000), b"203.0.113.7")) == "203.0.113.7"
    assert behind_nginx.of(scope(("127.0.0.1", 5000))) == "127.0.0.1"  # no header
    assert behind_nginx.of(scope(("127.0.0.1", 5000), b"bogus")) == "127.0.0.1"
    assert behind_nginx.of(scope(("192.0.2.9", 5000), b"203.0.113.7")) == "192.0.2.9"
    assert behind_nginx.of(scope(("::ffff:127.0.0.1", 5000), b"203.0.113.7")) == "203.0.113.7"
    assert behind_nginx.of(scope(None, b"203.0.113.7")) == "-"  # a unix socket: no peer
    assert behind_nginx.of({"headers": []}) == "-"
    direct = ClientAddresses(NO_PROXIES)
    assert direct.of(scope(("127.0.0.1", 5000), b"203.0.113.7")) == "127.0.0.1"
    assert direct.of(scope(("::1", 5000))) == "::1"


def test_json_access_lines_carry_the_address_as_a_field() -> None:
    record = logging.makeLogRecord(
        {"name": "trioproxy.access", "msg": "203.0.113.7 GET /api/tags 200", "levelname": "INFO"}
    )
    record.remote_addr = "203.0.113.7"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["remote_addr"] == "203.0.113.7"
    other = logging.makeLogRecord({"name": "trioproxy", "msg": "x", "levelname": "INFO"})
    assert "remote_addr" not in json.loads(JsonFormatter().format(other))


# ---- a real proxy -----------------------------------------------------------------------------


def access_lines(server: ServerProcess, request_id: str, timeout: float = 5.0) -> list[str]:
    """The access lines of ``request_id`` (text format), once there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [
            line
            for line in server.log().splitlines()
            if "trioproxy.access" in line and f"[{request_id}]" in line
        ]
        if lines:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"no access line for {request_id}:\n{server.log()}")


def address_of(line: str) -> str:
    """The address an access line names: the word after its ``[request id]``."""
    return line.partition("] ")[2].split(" ", 1)[0]


CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi [[tokens=2]]"}]}


def both_paths(url: str, request_id: str, forwarded: str | None = None) -> None:
    """A request served below Quart (POST /api/chat) and one through it (GET /api/tags)."""
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    chat = httpx.post(
        f"{url}/api/chat",
        json=CHAT,
        headers={**headers, "X-Request-ID": f"{request_id}-fast"},
        timeout=10,
    )
    tags = httpx.get(
        f"{url}/api/tags", headers={**headers, "X-Request-ID": f"{request_id}-quart"}, timeout=10
    )
    assert chat.status_code == 200 and tags.status_code == 200


def test_the_peer_is_logged_and_a_forwarded_for_from_an_untrusted_peer_ignored(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO")
    both_paths(proxy.url, "plain")
    both_paths(proxy.url, "spoof", forwarded="203.0.113.7")
    for request_id in ("plain-fast", "plain-quart", "spoof-fast", "spoof-quart"):
        (line,) = access_lines(proxy, request_id)
        assert address_of(line) == "127.0.0.1", line
    assert "203.0.113.7" not in proxy.log()


def test_behind_a_trusted_proxy_the_forwarded_client_is_logged(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(
        demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO", FORWARDED_ALLOW_IPS="127.0.0.1"
    )
    both_paths(proxy.url, "fwd", forwarded="203.0.113.7")
    # what the client itself sent, left of the address its proxy appended, is not believed
    both_paths(proxy.url, "chain", forwarded="198.51.100.66, 203.0.113.8, 127.0.0.1")
    both_paths(proxy.url, "none")  # the trusted peer's own request
    for request_id, address in [
        ("fwd-fast", "203.0.113.7"),
        ("fwd-quart", "203.0.113.7"),
        ("chain-fast", "203.0.113.8"),
        ("chain-quart", "203.0.113.8"),
        ("none-fast", "127.0.0.1"),
        ("none-quart", "127.0.0.1"),
    ]:
        (line,) = access_lines(proxy, request_id)
        assert address_of(line) == address, line
    assert "198.51.100.66" not in proxy.log()


@pytest.fixture(scope="module")
def trusting(demo_backend: ServerProcess, start_proxy: StartProxy) -> ServerProcess:
    """A proxy that trusts its peer, 127.0.0.1, as behind nginx on the same host."""
    return start_proxy(
        demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO", FORWARDED_ALLOW_IPS="127.0.0.1"
    )


HOSTILE = [
    "A" * 6000,  # long: not logged, not even cut
    "203.0.113.7 2026-01-01 INFO trioproxy.access [x] forged",
    "<script>203.0.113.7",
    "unknown",
    "1.2.3.4, " * 1500 + "bogus",  # thousands of entries, the rightmost no address
]


@pytest.mark.parametrize("value", HOSTILE, ids=["long", "forged-line", "markup", "unknown", "many"])
def test_a_hostile_forwarded_for_is_ignored(trusting: ServerProcess, value: str) -> None:
    """Line ends and control characters cannot get here (h11 refuses them in a header):
    long values, text and thousands of entries can, and the peer is named instead."""
    proxy = trusting
    request_id = f"hostile-{len(value)}"
    reply = httpx.get(
        f"{proxy.url}/api/tags",
        headers={"X-Forwarded-For": value, "X-Request-ID": request_id},
        timeout=10,
    )
    assert reply.status_code == 200
    (line,) = access_lines(proxy, request_id)
    assert address_of(line) == "127.0.0.1", line
    assert line.endswith(" B"), line  # nothing after its sizes
    assert "AAAAAAAA" not in proxy.log() and "forged" not in proxy.log()
    assert "<script>" not in proxy.log() and "bogus" not in proxy.log()


def test_a_non_ascii_forwarded_for_is_ignored(trusting: ServerProcess) -> None:
    """obs-text bytes (h11 passes 0x80-0xFF in a header's value): sent raw."""
    proxy = trusting
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Request-ID: obs-text\r\n"
            b"X-Forwarded-For: 203.0.113.\xb7\xff\r\nConnection: close\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    (line,) = access_lines(proxy, "obs-text")
    assert address_of(line) == "127.0.0.1", line


def test_json_lines_name_the_address_in_a_field(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(
        demo_backend.url,
        ACCESS_LOG="true",
        LOG_LEVEL="INFO",
        LOG_FORMAT="json",
        FORWARDED_ALLOW_IPS="127.0.0.0/8",
    )
    both_paths(proxy.url, "json", forwarded="2001:db8::7")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
        access = {
            e["request_id"]: e
            for e in entries
            if e["logger"] == "trioproxy.access" and e["request_id"].startswith("json-")
        }
        if len(access) == 2:
            break
        time.sleep(0.02)
    assert {e["remote_addr"] for e in access.values()} == {"2001:db8::7"}, access
    assert access["json-fast"]["message"].startswith("2001:db8::7 POST /api/chat 200 ")
    others = [e for e in entries if e["logger"] != "trioproxy.access"]
    assert others and all("remote_addr" not in e for e in others)


def test_a_refused_request_names_its_peer(trusting: ServerProcess) -> None:
    """Refused before the app saw it: the peer is known, the head (and any forwarded
    client in it) not understood."""
    proxy = trusting
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"NOT A REQUEST LINE\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        refused = [line for line in proxy.log().splitlines() if "(refused: " in line]
        if refused:
            break
        time.sleep(0.02)
    assert len(refused) == 1 and " 127.0.0.1 - - 400 0.0 ms " in refused[0], refused


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_an_ipv6_peer_and_a_trusted_ipv6_proxy(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(demo_backend.url, "--host", "::1", ACCESS_LOG="true", LOG_LEVEL="INFO")
    assert proxy.url.startswith("http://[::1]:")
    both_paths(proxy.url, "v6", forwarded="203.0.113.7")
    for request_id in ("v6-fast", "v6-quart"):
        (line,) = access_lines(proxy, request_id)
        assert address_of(line) == "::1", line
    trusting = start_proxy(
        demo_backend.url,
        "--host",
        "::1",
        ACCESS_LOG="true",
        LOG_LEVEL="INFO",
        FORWARDED_ALLOW_IPS="::1",
    )
    both_paths(trusting.url, "v6fwd", forwarded="2001:db8::7, ::1")
    for request_id in ("v6fwd-fast", "v6fwd-quart"):
        (line,) = access_lines(trusting, request_id)
        assert address_of(line) == "2001:db8::7", line


def test_behind_the_nginx_example_the_client_nginx_heard_from_is_logged(
    demo_backend: ServerProcess, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """deploy/nginx/trioproxy.conf in front, the proxy trusting nginx (127.0.0.1) as the
    manual says: the line names the client nginx received the request from (127.0.0.5, a
    loopback address of its own), not nginx; what that client wrote in its own
    X-Forwarded-For is not believed."""
    from .test_network_shapes import NGINX, NGINX_EXAMPLE, _free_port, _nginx

    if NGINX is None:
        pytest.skip("nginx is not installed")
    proxy = start_proxy(
        demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO", FORWARDED_ALLOW_IPS="127.0.0.1"
    )
    port = _free_port()
    example = NGINX_EXAMPLE.read_text()
    for written, used in [
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("server 127.0.0.1:11434;", f"server {proxy.url.removeprefix('http://')};"),
    ]:
        assert written in example
        example = example.replace(written, used)
    transport = httpx.HTTPTransport(local_address="127.0.0.5")
    with _nginx(tmp_path, example), httpx.Client(transport=transport, timeout=10) as client:
        url = f"http://127.0.0.1:{port}/ollama"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        for request_id, headers in [
            ("via-nginx", {}),
            ("via-nginx-spoof", {"X-Forwarded-For": "203.0.113.9"}),
        ]:
            reply = client.get(f"{url}/api/tags", headers={**headers, "X-Request-ID": request_id})
            assert reply.status_code == 200
            (line,) = access_lines(proxy, request_id)
            assert address_of(line) == "127.0.0.5", line
