"""The client address on access lines from the other headers proxies name it in:
``Forwarded`` (RFC 7239, walked from the right as X-Forwarded-For is) and ``X-Real-IP``
(one address), read only from peers in FORWARDED_ALLOW_IPS and only when FORWARDED_HEADER
names them: one header is read, never whichever a client added.

Whatever a header holds, what is logged is an IP address printed by the proxy, or the peer.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.client_address import (
    MAX_ELEMENT_CHARS,
    MAX_FORWARDED_ENTRIES,
    NO_PROXIES,
    ClientAddresses,
    TrustedProxies,
    forwarded_client,
    parse_forwarded_header,
    parse_node,
    parse_trusted_proxies,
    real_ip_client,
)
from trioproxy.config import ConfigError, load_settings

from .conftest import ROOT, ServerProcess, base_env
from .test_access_addresses import CHAT, access_lines, address_of

StartProxy = Callable[..., ServerProcess]
ip = ipaddress.ip_address
NGINX = parse_trusted_proxies("10.0.0.0/8, 127.0.0.1, ::1")

# ---- the setting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "header"),
    [
        ("X-Forwarded-For", "X-Forwarded-For"),
        ("x-forwarded-for", "X-Forwarded-For"),
        (" forwarded ", "Forwarded"),
        ("FORWARDED", "Forwarded"),
        ("x-real-ip", "X-Real-IP"),
    ],
)
def test_the_header_is_one_of_three_in_any_case(text: str, header: str) -> None:
    assert parse_forwarded_header(text) == header
    settings = load_settings(environ={"FORWARDED_HEADER": text}, dotenv_path=None)
    assert settings.forwarded_header == header


@pytest.mark.parametrize("text", ["", "X-Forwarded-Host", "X-Forwarded-For, Forwarded", "True"])
def test_any_other_header_stops_the_program_naming_the_setting(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"FORWARDED_HEADER": text}, dotenv_path=None)
    assert str(info.value) == (
        f"invalid FORWARDED_HEADER: expected X-Forwarded-For, Forwarded or X-Real-IP, got {text!r}"
    )


def test_the_program_exits_2_on_another_header() -> None:
    env = base_env(OPENAI_API_BASE_URL="http://127.0.0.1:1/v1", FORWARDED_HEADER="X-Client-IP")
    result = subprocess.run(
        [sys.executable, "-m", "trioproxy", "--port", "0", "--env-file", ""],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result
    assert "invalid FORWARDED_HEADER: expected X-Forwarded-For, Forwarded or X-Real-IP" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("header", "allowed", "warned"),
    [("X-Real-IP", None, True), ("Forwarded", None, True), ("X-Real-IP", "127.0.0.1", False),
     ("X-Forwarded-For", None, False)],
)  # fmt: skip
def test_a_header_named_without_proxies_to_believe_it_from_is_a_warning(
    demo_backend: ServerProcess,
    start_proxy: StartProxy,
    header: str,
    allowed: str | None,
    warned: bool,
) -> None:
    """FORWARDED_HEADER without FORWARDED_ALLOW_IPS reads nothing: said at start, not left
    for the operator to find in addresses that never change (the default header, unset
    by most, is no reason to say anything)."""
    trusted = {"FORWARDED_ALLOW_IPS": allowed} if allowed else {}
    server = start_proxy(demo_backend.url, LOG_LEVEL="INFO", FORWARDED_HEADER=header, **trusted)
    expected = f"FORWARDED_HEADER={header} is not read: FORWARDED_ALLOW_IPS names no proxy"
    # the line comes before the server serves; the pipe's reader may be a moment behind
    started = " serving; backend "
    deadline = time.monotonic() + 10
    while started not in server.log() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (expected in server.log()) is warned, server.log()


def test_the_header_defaults_to_x_forwarded_for_and_is_checked_given_in_python() -> None:
    assert load_settings(environ={}, dotenv_path=None).forwarded_header == "X-Forwarded-For"
    given = load_settings(environ={}, dotenv_path=None, forwarded_header="x-real-ip")
    assert given.forwarded_header == "X-Real-IP"
    with pytest.raises(ConfigError, match="FORWARDED_HEADER"):
        load_settings(environ={}, dotenv_path=None, forwarded_header="X-Client-IP")


# ---- a Forwarded node -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "address"),
    [
        (b"192.0.2.60", "192.0.2.60"),
        (b"192.0.2.60:4711", "192.0.2.60"),
        (b"192.0.2.60:_port", "192.0.2.60"),  # an obfuscated port (RFC 7239 6.3)
        (b"[2001:db8:cafe::17]", "2001:db8:cafe::17"),
        (b"[2001:db8:cafe::17]:4711", "2001:db8:cafe::17"),
        (b"[2001:db8:cafe::17]:_p.1-x", "2001:db8:cafe::17"),
        (b"2001:db8:cafe::17", "2001:db8:cafe::17"),  # unbracketed, as some proxies write
        (b"[2001:DB8:CAFE:0::17]", "2001:db8:cafe::17"),  # printed by us
        (b"unknown", None),
        (b"unknown:4711", None),
        (b"_hidden", None),
        (b"_SEVKISEK", None),
        (b"_hidden:_port", None),
        (b"192.0.2.60:_", None),
        (b"192.0.2.60:_p!", None),
        (b"2001:db8::_p", None),  # no brackets: the port cannot be told from the address
        (b"[192.0.2.60]", None),
        (b"192.0.2.60:99999999", None),
        (b"fe80::1%eth0", None),
        (b"", None),
        (b"1" * 70, None),
    ],
)
def test_a_node_is_an_address_or_nothing(node: bytes, address: str | None) -> None:
    parsed = parse_node(node)
    assert (None if parsed is None else str(parsed)) == address


# ---- the Forwarded walk -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "client"),
    [
        ([b"for=203.0.113.7"], "203.0.113.7"),
        ([b'for="203.0.113.7:41000"'], "203.0.113.7"),
        ([b'for="[2001:db8::7]:4711"'], "2001:db8::7"),
        ([b'For="[2001:db8::7]:4711";Proto=https;BY=10.0.0.1'], "2001:db8::7"),  # any case
        ([b"proto=https;for=203.0.113.7;host=example.com"], "203.0.113.7"),  # anywhere
        ([b'for=203.0.113.7;host="example.com:8443"'], "203.0.113.7"),
        ([b"for=203.0.113.7 ; proto=https"], "203.0.113.7"),  # blanks around ";"
        ([b"for=203.0.113.7;;proto=https;"], "203.0.113.7"),  # empty pairs
        ([b"for=198.51.100.1, for=203.0.113.7"], "203.0.113.7"),  # the rightmost not trusted
        ([b"for=198.51.100.1,for=203.0.113.7;proto=https, for=10.0.0.2"], "203.0.113.7"),
        ([b"for=198.51.100.1", b"for=203.0.113.7, for=10.0.0.1"], "203.0.113.7"),  # two lines
        ([b"for=203.0.113.7,, ,for=10.0.0.1"], "203.0.113.7"),  # empty elements ignored
        ([b"for=10.0.0.3, for=10.0.0.2"], "10.0.0.3"),  # every hop trusted: the leftmost
        ([b'for=203.0.113.9;host="a,b;c", for=10.0.0.1'], "203.0.113.9"),  # quoted , and ;
        ([b'for=203.0.113.9;x="\\"a,\\\\", for=10.0.0.1'], "203.0.113.9"),  # quoted-pairs
        # the walk stops at a hop that names no address, naming the last trusted one
        ([b"for=203.0.113.7, for=_hidden, for=10.0.0.1"], "10.0.0.1"),
        ([b"for=203.0.113.7, for=unknown, for=10.0.0.1"], "10.0.0.1"),
        ([b"for=203.0.113.7, proto=https, for=10.0.0.1"], "10.0.0.1"),  # no for
        ([b"for=203.0.113.7, for=1.2.3.4;for=5.6.7.8, for=10.0.0.1"], "10.0.0.1"),  # twice
        ([b"for=203.0.113.7, for=1.2.3.4 x, for=10.0.0.1"], "10.0.0.1"),
        ([b'for=203.0.113.7, for="1.2.3.4, for=10.0.0.1'], "10.0.0.1"),  # unclosed quote
        ([b'for="\\1.2.3.4"'], None),  # an escape in an address
        ([b"for=_hidden"], None),  # the peer
        ([b"for=unknown"], None),
        ([b"by=10.0.0.1"], None),
        ([b""], None),
        ([b'"'], None),
        ([b"for=203.0.113.7;proto=\xff"], None),
        ([b"for=2001:db8::7, for=::1"], "2001:db8::7"),
    ],
)
def test_the_client_is_the_rightmost_for_not_of_a_trusted_proxy(
    header: list[bytes], client: str | None
) -> None:
    found = forwarded_client(header, NGINX)
    assert (None if found is None else str(found)) == client


def test_what_a_client_left_open_cannot_hide_it() -> None:
    """A quote the client opened and never closed, or a comma inside its own quotes:
    the element its proxy appended is read all the same (a parser reading from the left
    would find the whole header malformed, and log the proxy instead)."""
    for sent in [b'for="', b'for="a', b'x="', b'"', b'for=1.2.3.4;x="a,b', b"\\"]:
        assert forwarded_client([sent + b", for=203.0.113.7"], NGINX) == ip("203.0.113.7")
        assert forwarded_client([sent, b"for=203.0.113.7"], NGINX) == ip("203.0.113.7")


def test_everyone_trusted_names_the_leftmost_for() -> None:
    everyone = TrustedProxies(everyone=True)
    header = [b"for=198.51.100.1, for=203.0.113.7, for=10.0.0.1"]
    assert forwarded_client(header, everyone) == ip("198.51.100.1")


def test_a_header_of_thousands_of_elements_is_read_no_further_than_the_bound() -> None:
    hops = [f"for=10.0.{i // 256}.{i % 256};proto=https".encode() for i in range(5000)]
    bound = ip(
        f"10.0.{(5000 - MAX_FORWARDED_ENTRIES) // 256}.{(5000 - MAX_FORWARDED_ENTRIES) % 256}"
    )
    assert forwarded_client([b", ".join(hops)], NGINX) == bound
    assert forwarded_client(hops, NGINX) == bound  # as many header lines
    assert forwarded_client([b"for=203.0.113.7" + b"," * 100_000], NGINX) is None


def test_an_element_longer_than_any_proxy_writes_ends_the_walk() -> None:
    padding = b"x" * (MAX_ELEMENT_CHARS - len(b"for=203.0.113.7;p="))
    fits = b"for=203.0.113.7;p=" + padding
    assert len(fits) == MAX_ELEMENT_CHARS
    assert forwarded_client([b"junk," + fits + b",for=10.0.0.1"], NGINX) == ip("203.0.113.7")
    assert forwarded_client([b"junk," + fits + b"x,for=10.0.0.1"], NGINX) == ip("10.0.0.1")
    assert forwarded_client([fits], NGINX) == ip("203.0.113.7")  # a line of one element
    assert forwarded_client([fits + b"x"], NGINX) is None
    quoted = b'for=203.0.113.7;p="' + b"," * 600 + b'"'  # its commas are no boundaries
    assert forwarded_client([quoted + b", for=10.0.0.1"], NGINX) == ip("10.0.0.1")
    # a header of quotes only is searched within one element's length, not all of it
    assert forwarded_client([b'"' * 100_000], NGINX) is None
    assert forwarded_client([b'for=10.0.0.9, "' + b'\\"' * 50_000], NGINX) is None


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
ports = st.one_of(st.none(), st.integers(1, 65535).map(str), st.just("_obf-port"))


@st.composite
def elements(draw: st.DrawFn, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """An element a proxy writes about the address it heard from, in the forms RFC 7239
    gives (quoted when it holds what a token cannot), among other parameters."""
    port = draw(ports)
    node = f"[{address}]" if address.version == 6 else str(address)
    if port is not None:
        node = f"{node}:{port}"
    quoted = address.version == 6 or port is not None or draw(st.booleans())
    name = draw(st.sampled_from(["for", "For", "FOR"]))
    pairs = [f'{name}="{node}"' if quoted else f"{name}={node}"]
    by = draw(st.sampled_from(["by=_proxy", 'by="[::1]:80"', "by=10.0.0.1"]))
    others = ["proto=https", 'host="example.com:8443"', by, 'x="a,b;c\\""']
    pairs += draw(st.lists(st.sampled_from(others), max_size=3, unique=True))
    return ";".join(draw(st.permutations(pairs))).encode()


junk = st.one_of(
    st.binary(max_size=80),
    st.text(alphabet='for=_unkw"\\,; []:.0123456789abcdef', max_size=40).map(str.encode),
    addresses.map(lambda a: f"for={a}".encode()),
)


@settings(deadline=None)  # each example parses; a loaded machine took 310 ms for one
@given(data=st.data(), left=st.lists(junk, max_size=6), client=addresses, one_line=st.booleans())
def test_what_the_client_wrote_left_of_its_element_never_matters(
    data: st.DataObject,
    left: list[bytes],
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
    one_line: bool,
) -> None:
    """The trusted proxies each appended an element naming whom they heard from: the
    client is the address of the element left of theirs, whatever the client put in
    front of it, on the same line or its own."""
    if NGINX.trusts(client):
        return  # a client inside the trusted networks is one more hop
    hops = data.draw(st.lists(st.ip_addresses(network="10.0.0.0/8"), max_size=5))
    written = [data.draw(elements(client)), *(data.draw(elements(hop)) for hop in hops)]
    header = [b", ".join([*left, *written])] if one_line else [*left, *written]
    assert forwarded_client(header, NGINX) == client


fuzz = st.one_of(
    st.binary(max_size=200),
    st.text(alphabet='for=_unkw"\\,; \t[]:.0123456789abcdef', max_size=200).map(str.encode),
)


@given(st.lists(fuzz, max_size=5), st.booleans())
def test_any_forwarded_gives_an_address_it_holds_or_the_peer(
    values: list[bytes], everyone: bool
) -> None:
    found = forwarded_client(values, TrustedProxies(everyone=True) if everyone else NGINX)
    if found is not None:
        text = str(found)
        assert ip(text) == found  # an address we print, nothing of the client's own text
        assert text.isascii() and " " not in text and '"' not in text


# ---- X-Real-IP --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "client"),
    [
        ([b"203.0.113.7"], "203.0.113.7"),
        ([b" 203.0.113.7 "], "203.0.113.7"),
        ([b"2001:db8::7"], "2001:db8::7"),
        ([b"[2001:db8::7]:4711"], "2001:db8::7"),  # a port, as nginx's realip reads one
        ([b"203.0.113.7:4711"], "203.0.113.7"),
        ([b"10.0.0.1"], "10.0.0.1"),  # one address, not walked: the proxy's own peer
        ([b"203.0.113.7, 10.0.0.1"], None),  # a list: the peer
        ([b"203.0.113.7", b"198.51.100.1"], None),  # two lines: one was not replaced
        ([b"unknown"], None),
        ([b""], None),
        ([b"203.0.113.7 evil"], None),
        ([b"A" * 6000], None),
        ([b"203.0.113.\xb7"], None),
    ],
)
def test_x_real_ip_is_one_address_or_the_peer(values: list[bytes], client: str | None) -> None:
    found = real_ip_client(values, NGINX)
    assert (None if found is None else str(found)) == client


@given(st.lists(st.binary(max_size=80), max_size=3))
def test_any_x_real_ip_gives_an_address_or_the_peer(values: list[bytes]) -> None:
    found = real_ip_client(values, NGINX)
    assert found is None or ip(str(found)) == found


# ---- per request ------------------------------------------------------------------------------

ALL_THREE = [
    (b"x-forwarded-for", b"198.51.100.1"),
    (b"forwarded", b'for="[2001:db8::2]:4711";proto=https'),
    (b"x-real-ip", b"203.0.113.3"),
]


def scope(peer: tuple[str, int] | None, headers: list[tuple[bytes, bytes]]) -> dict:
    return {"client": peer, "headers": [(b"host", b"x"), *headers]}


@pytest.mark.parametrize(
    ("header", "client"),
    [
        ("X-Forwarded-For", "198.51.100.1"),
        ("Forwarded", "2001:db8::2"),
        ("X-Real-IP", "203.0.113.3"),
    ],
)
def test_only_the_header_named_is_read(header: str, client: str) -> None:
    """A proxy passes on every header it does not set as the client wrote it: reading
    another than its own would let the client name itself."""
    addresses = ClientAddresses(parse_trusted_proxies("127.0.0.1"), header)
    assert addresses.of(scope(("127.0.0.1", 5000), ALL_THREE)) == client
    assert addresses.of(scope(("::ffff:127.0.0.1", 5000), ALL_THREE)) == client
    assert addresses.of(scope(("192.0.2.9", 5000), ALL_THREE)) == "192.0.2.9"  # untrusted
    assert addresses.of(scope(("127.0.0.1", 5000), [])) == "127.0.0.1"  # none sent
    assert addresses.of(scope(None, ALL_THREE)) == "-"
    assert ClientAddresses(NO_PROXIES, header).of(scope(("127.0.0.1", 1), ALL_THREE)) == (
        "127.0.0.1"
    )


def test_the_default_header_is_x_forwarded_for() -> None:
    addresses = ClientAddresses(parse_trusted_proxies("127.0.0.1"))
    assert addresses.header == "X-Forwarded-For"
    assert addresses.of(scope(("127.0.0.1", 5000), ALL_THREE)) == "198.51.100.1"
    assert addresses.of(scope(("127.0.0.1", 5000), ALL_THREE[1:])) == "127.0.0.1"


# ---- a real proxy -----------------------------------------------------------------------------


def both_paths(url: str, request_id: str, headers: list[tuple[str, str]]) -> None:
    """A request served below Quart (POST /api/chat) and one through it (GET /api/tags),
    each with ``headers`` (a name given twice is sent as two lines)."""
    chat = httpx.post(
        f"{url}/api/chat",
        json=CHAT,
        headers=[*headers, ("X-Request-ID", f"{request_id}-fast")],
        timeout=10,
    )
    tags = httpx.get(
        f"{url}/api/tags", headers=[*headers, ("X-Request-ID", f"{request_id}-quart")], timeout=10
    )
    assert chat.status_code == 200 and tags.status_code == 200


def logged(proxy: ServerProcess, request_id: str, headers: list[tuple[str, str]]) -> set[str]:
    """The addresses the access lines of both paths name for a request with ``headers``."""
    both_paths(proxy.url, request_id, headers)
    found = set()
    for path in ("fast", "quart"):
        (line,) = access_lines(proxy, f"{request_id}-{path}")
        # nothing of the header anywhere: the address, then what the proxy itself writes
        assert re.fullmatch(r".*\] \S+ (POST /api/chat|GET /api/tags) 200 [\d.]+ ms \d+ B"
                            r"( \(completed\))?", line), line  # fmt: skip
        found.add(address_of(line))
    return found


def behind(start_proxy: StartProxy, demo_backend: ServerProcess, header: str) -> ServerProcess:
    return start_proxy(
        demo_backend.url,
        ACCESS_LOG="true",
        LOG_LEVEL="INFO",
        FORWARDED_ALLOW_IPS="127.0.0.1",
        FORWARDED_HEADER=header,
    )


@pytest.fixture(scope="module")
def trusting_forwarded(demo_backend: ServerProcess, start_proxy: StartProxy) -> ServerProcess:
    """A proxy behind one that writes RFC 7239 ``Forwarded`` from 127.0.0.1."""
    return behind(start_proxy, demo_backend, "Forwarded")


FORWARDED_SENT = [
    ("plain", [("Forwarded", "for=203.0.113.7")], "203.0.113.7"),
    ("v6", [("Forwarded", 'for="[2001:db8::1]:4711";proto=https;by=_nginx')], "2001:db8::1"),
    ("v4-port", [("Forwarded", 'for="203.0.113.8:41000"')], "203.0.113.8"),
    ("chain", [("Forwarded", "for=198.51.100.66, for=203.0.113.9;proto=https, for=127.0.0.1")],
     "203.0.113.9"),
    ("lines", [("Forwarded", "for=198.51.100.66"), ("Forwarded", "for=203.0.113.10")],
     "203.0.113.10"),
    ("left-open", [("Forwarded", 'for="198.51.100.66, for=203.0.113.11')], "203.0.113.11"),
    ("hidden", [("Forwarded", "for=_hidden")], "127.0.0.1"),
    ("unknown", [("Forwarded", "for=unknown;proto=https")], "127.0.0.1"),
    ("past-hidden", [("Forwarded", "for=198.51.100.66, for=_hidden, for=127.0.0.1")],
     "127.0.0.1"),
    ("garbage", [("Forwarded", "for=<script>203.0.113.12")], "127.0.0.1"),
    ("long", [("Forwarded", "for=" + "A" * 6000)], "127.0.0.1"),
    ("many", [("Forwarded", "for=127.0.0.1, " * 1500 + "for=bogus")], "127.0.0.1"),
    ("xff-ignored", [("X-Forwarded-For", "198.51.100.66")], "127.0.0.1"),
    ("real-ip-ignored", [("X-Real-IP", "198.51.100.66")], "127.0.0.1"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "headers", "address"), FORWARDED_SENT, ids=[case[0] for case in FORWARDED_SENT]
)
def test_behind_a_proxy_writing_forwarded_its_client_is_logged(
    trusting_forwarded: ServerProcess, name: str, headers: list[tuple[str, str]], address: str
) -> None:
    assert logged(trusting_forwarded, f"fwd-{name}", headers) == {address}
    log = trusting_forwarded.log()
    assert "198.51.100.66" not in log and "<script>" not in log and "AAAAAAAA" not in log
    assert "for=" not in log and '"' not in log and "bogus" not in log


def test_forwarded_from_an_untrusted_peer_is_ignored(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    proxy = start_proxy(
        demo_backend.url,
        ACCESS_LOG="true",
        LOG_LEVEL="INFO",
        FORWARDED_ALLOW_IPS="10.0.0.0/8",
        FORWARDED_HEADER="Forwarded",
    )
    assert logged(proxy, "untrusted", [("Forwarded", "for=203.0.113.7")]) == {"127.0.0.1"}
    assert "203.0.113.7" not in proxy.log()


@pytest.fixture(scope="module")
def trusting_real_ip(demo_backend: ServerProcess, start_proxy: StartProxy) -> ServerProcess:
    """A proxy behind one that sets X-Real-IP (nginx's ``$remote_addr``) from 127.0.0.1."""
    return behind(start_proxy, demo_backend, "x-real-ip")


REAL_IP_SENT = [
    ("plain", [("X-Real-IP", "203.0.113.7")], "203.0.113.7"),
    ("v6", [("X-Real-IP", "2001:db8::7")], "2001:db8::7"),
    ("port", [("X-Real-IP", "[2001:db8::8]:4711")], "2001:db8::8"),
    ("list", [("X-Real-IP", "198.51.100.66, 203.0.113.7")], "127.0.0.1"),
    ("lines", [("X-Real-IP", "198.51.100.66"), ("X-Real-IP", "203.0.113.7")], "127.0.0.1"),
    ("garbage", [("X-Real-IP", "<script>")], "127.0.0.1"),
    ("xff-ignored", [("X-Forwarded-For", "198.51.100.66")], "127.0.0.1"),
    ("forwarded-ignored", [("Forwarded", "for=198.51.100.66")], "127.0.0.1"),
]


@pytest.mark.parametrize(
    ("name", "headers", "address"), REAL_IP_SENT, ids=[case[0] for case in REAL_IP_SENT]
)
def test_behind_a_proxy_setting_x_real_ip_its_client_is_logged(
    trusting_real_ip: ServerProcess, name: str, headers: list[tuple[str, str]], address: str
) -> None:
    assert logged(trusting_real_ip, f"rip-{name}", headers) == {address}
    log = trusting_real_ip.log()
    assert "198.51.100.66" not in log and "<script>" not in log


def test_by_default_neither_forwarded_nor_x_real_ip_is_believed(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    """Behind a proxy that sets X-Forwarded-For (the default), the Forwarded and X-Real-IP
    it passes on are the client's own: it cannot name itself with them."""
    proxy = start_proxy(
        demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO", FORWARDED_ALLOW_IPS="127.0.0.1"
    )
    spoofs = [("Forwarded", "for=198.51.100.66"), ("X-Real-IP", "198.51.100.67")]
    assert logged(proxy, "default-spoof", spoofs) == {"127.0.0.1"}
    sent = [*spoofs, ("X-Forwarded-For", "203.0.113.7")]
    assert logged(proxy, "default-xff", sent) == {"203.0.113.7"}
    assert "198.51.100.6" not in proxy.log()


def json_access(proxy: ServerProcess, prefix: str, count: int) -> dict[str, dict]:
    deadline = time.monotonic() + 5
    while True:
        entries = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
        access = {
            e["request_id"]: e
            for e in entries
            if e["logger"] == "trioproxy.access" and e["request_id"].startswith(prefix)
        }
        if len(access) == count or time.monotonic() > deadline:
            return access
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("header", "sent"),
    [
        ("Forwarded", [("Forwarded", 'for="[2001:db8::7]:4711", for=127.0.0.1')]),
        ("X-Real-IP", [("X-Real-IP", "2001:db8::7")]),
    ],
)
def test_json_lines_name_the_forwarded_client_in_remote_addr(
    demo_backend: ServerProcess,
    start_proxy: StartProxy,
    header: str,
    sent: list[tuple[str, str]],
) -> None:
    proxy = start_proxy(
        demo_backend.url,
        ACCESS_LOG="true",
        LOG_LEVEL="INFO",
        LOG_FORMAT="json",
        FORWARDED_ALLOW_IPS="127.0.0.0/8",
        FORWARDED_HEADER=header,
    )
    both_paths(proxy.url, "json", sent)
    access = json_access(proxy, "json-", 2)
    assert {e["remote_addr"] for e in access.values()} == {"2001:db8::7"}, access
    assert access["json-fast"]["message"].startswith("2001:db8::7 POST /api/chat 200 ")
    assert access["json-quart"]["message"].startswith("2001:db8::7 GET /api/tags 200 ")


@pytest.mark.parametrize(
    ("header", "trusted"), [("X-Forwarded-For", "127.0.0.1"), ("X-Real-IP", "127.0.0.0/8")]
)
def test_behind_the_nginx_example_either_header_names_the_client_nginx_heard_from(
    demo_backend: ServerProcess, start_proxy: StartProxy, tmp_path: Path, header: str, trusted: str
) -> None:
    """deploy/nginx/trioproxy.conf in front (it sets both X-Forwarded-For and X-Real-IP),
    the proxy trusting nginx with either header: the line names the client nginx heard
    from (127.0.0.5), whatever that client wrote in X-Real-IP, Forwarded or
    X-Forwarded-For itself (nginx replaces X-Real-IP, appends to X-Forwarded-For and
    passes Forwarded on as written). X-Real-IP is not walked: its one address is named
    even when it is in FORWARDED_ALLOW_IPS (127.0.0.0/8), where X-Forwarded-For's walk
    would go on to what the client wrote."""
    from .test_network_shapes import NGINX as NGINX_PROGRAM
    from .test_network_shapes import NGINX_EXAMPLE, _free_port, _nginx

    if NGINX_PROGRAM is None:
        pytest.skip("nginx is not installed")
    proxy = start_proxy(
        demo_backend.url,
        ACCESS_LOG="true",
        LOG_LEVEL="INFO",
        FORWARDED_ALLOW_IPS=trusted,
        FORWARDED_HEADER=header,
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
        spoofs = {
            "X-Real-IP": "198.51.100.66",
            "Forwarded": "for=198.51.100.67",
            "X-Forwarded-For": "198.51.100.68",
        }
        for request_id, headers in [("nginx-plain", {}), ("nginx-spoof", spoofs)]:
            request_id = f"{request_id}-{header}"
            reply = client.get(f"{url}/api/tags", headers={**headers, "X-Request-ID": request_id})
            assert reply.status_code == 200
            (line,) = access_lines(proxy, request_id)
            assert address_of(line) == "127.0.0.5", line
    assert "198.51.100.6" not in proxy.log()
