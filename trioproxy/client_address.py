"""The client address an access line names: the connecting peer, or, behind proxies the
operator trusts (``FORWARDED_ALLOW_IPS``), the client those proxies name in the one header
``FORWARDED_HEADER`` says they set: ``X-Forwarded-For`` (the default), ``Forwarded``
(RFC 7239) or ``X-Real-IP``.

One header, never a choice among those present (as nginx's ``real_ip_header``; uvicorn's
``--proxy-headers`` modes exclude each other too): a proxy passes on every header it does
not set as the client wrote it, so reading any other would let the client name itself.

``X-Forwarded-For`` and ``Forwarded`` name a hop per proxy, each appended by the proxy that
heard from it, so only the entries to the right, up to the first that a trusted proxy did
not write, can be believed: the header is walked from its right end, past the trusted
proxies, and the first other address is the client (uvicorn's and gunicorn's
``forwarded_allow_ips`` work so). ``X-Real-IP`` is one address, which the proxy sets to its
own peer's (nginx's ``proxy_set_header X-Real-IP $remote_addr``). Whatever a header holds,
what is logged is an IP address this module printed itself, or the peer: a client cannot
put text of its own into a log line. Every walk is bounded (``MAX_FORWARDED_ENTRIES``
entries, of at most ``MAX_ELEMENT_CHARS``). Only read when an access line is written;
nothing here runs per request otherwise.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

UNKNOWN = "-"  # no peer address (a unix socket; a test's scope)
MAX_FORWARDED_ENTRIES = 32
"""Entries of ``X-Forwarded-For`` (elements of ``Forwarded``) examined, from the right: more
proxies than any real chain, and a header of thousands costs no more than this."""
MAX_ENTRY_CHARS = 64  # "[ffff:…:255.255.255.255]:65535" is 53: longer is no address
MAX_ELEMENT_CHARS = 512
"""The longest ``Forwarded`` element read (``for``, ``by``, ``proto`` and a ``host`` of a long
name fit): a longer one ends the walk, as garbage does."""
PEER_CACHE_SIZE = 1024  # peers whose trust is remembered, per process

X_FORWARDED_FOR = "X-Forwarded-For"
FORWARDED = "Forwarded"
X_REAL_IP = "X-Real-IP"


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """``FORWARDED_ALLOW_IPS``: the proxies whose ``X-Forwarded-For`` is believed."""

    networks: tuple[IPNetwork, ...] = ()
    everyone: bool = False

    def __bool__(self) -> bool:
        return self.everyone or bool(self.networks)

    def trusts(self, address: IPAddress) -> bool:
        if self.everyone:
            return True
        if any(address in net for net in self.networks):
            return True
        # "::ffff:10.0.0.1": an IPv4 peer of a socket listening on both (PROXY_HOST=::)
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        return mapped is not None and any(mapped in net for net in self.networks)

    def __str__(self) -> str:
        return "*" if self.everyone else ",".join(map(str, self.networks))


NO_PROXIES = TrustedProxies()


def parse_trusted_proxies(text: str) -> TrustedProxies:
    """``FORWARDED_ALLOW_IPS``: comma-separated IP addresses and CIDR networks, ``*`` for
    every peer, empty for none. Anything else is a ValueError naming it: a typo must not
    quietly trust nobody (uvicorn's takes it as a host name that never matches)."""
    items = [item.strip() for item in text.split(",")]
    items = [item for item in items if item]
    if "*" in items:
        if len(items) > 1:
            raise ValueError("'*' trusts every peer: give it alone")
        return TrustedProxies(everyone=True)
    networks: list[IPNetwork] = []
    for item in items:
        if "%" in item:  # a scope id (fe80::1%eth0) is no address another host writes
            raise ValueError(f"{item!r}: give the address without its scope id (%...)")
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError as exc:
            if "/" in item and "has host bits set" in str(exc):
                network = ipaddress.ip_network(item, strict=False)
                raise ValueError(f"{item!r} has host bits set: did you mean {network}?") from None
            raise ValueError(
                f"{item!r} is no IP address or CIDR network (such as 10.0.0.0/8, ::1 or *)"
            ) from None
    return TrustedProxies(tuple(dict.fromkeys(networks)))


def parse_forwarded_header(text: str) -> str:
    """``FORWARDED_HEADER``: the header the trusted proxies set, in any case."""
    for name in (X_FORWARDED_FOR, FORWARDED, X_REAL_IP):
        if text.strip().lower() == name.lower():
            return name
    raise ValueError(f"expected X-Forwarded-For, Forwarded or X-Real-IP, got {text!r}")


ClientReader = Callable[[Sequence[bytes], TrustedProxies], IPAddress | None]


class ClientAddresses:
    """Names the client of a request for its access line."""

    def __init__(self, trusted: TrustedProxies, header: str = X_FORWARDED_FOR) -> None:
        self.trusted = trusted
        self.header = parse_forwarded_header(header)
        self._name = self.header.lower().encode("ascii")  # as the server gives header names
        self._client: ClientReader = _READERS[self.header]
        # a peer's trust, by its address as the server gives it: proxies and clients
        # come back on many connections, and the answer never changes
        self._trusts_peer = lru_cache(maxsize=PEER_CACHE_SIZE)(self._trusts_text)

    def of(self, scope: Mapping[str, Any]) -> str:
        """The address to log for the request of ``scope``: its peer's, or the client the
        trusted peer names in the header; ``-`` when there is none (a unix socket)."""
        client = scope.get("client")
        if not client:
            return UNKNOWN
        peer: str = client[0]
        if not self.trusted or not self._trusts_peer(peer):
            return peer
        values = [value for name, value in scope.get("headers", ()) if name == self._name]
        named = self._client(values, self.trusted) if values else None
        return peer if named is None else str(named)

    def _trusts_text(self, peer: str) -> bool:
        try:
            return self.trusted.trusts(ipaddress.ip_address(peer))
        except ValueError:  # not an IP address (a unix socket's path): never trusted
            return False


def peer_address(client: Sequence[Any] | None) -> str:
    """The address of an ASGI ``client`` (host, port), as an access line names it."""
    return str(client[0]) if client else UNKNOWN


# ---- X-Forwarded-For --------------------------------------------------------------------------


def x_forwarded_for_client(values: Sequence[bytes], trusted: TrustedProxies) -> IPAddress | None:
    """The client named by the ``X-Forwarded-For`` header lines ``values`` (in the order
    received) that a trusted peer passed on; None to name the peer itself.

    From the right: the first address not of a trusted proxy is the client. The walk stops
    at an entry that is no address ("unknown", garbage), naming the last trusted hop, as it
    does after ``MAX_FORWARDED_ENTRIES`` entries: nothing left of such an entry can be
    vouched for. When every address is a trusted proxy's, the leftmost one is the client."""
    return _walk(map(parse_entry, _entries_from_right(values)), trusted)


def _walk(hops: Iterable[IPAddress | None], trusted: TrustedProxies) -> IPAddress | None:
    """The client among ``hops``, nearest first (None: a hop that names no address)."""
    last: IPAddress | None = None
    for address in hops:
        if address is None:
            break
        if not trusted.trusts(address):
            return address
        last = address
    return last


def _entries_from_right(values: Sequence[bytes]) -> Iterator[bytes]:
    """The comma-separated entries of ``values``, last first, at most
    ``MAX_FORWARDED_ENTRIES``: a long header is split no further than that. Empty entries
    (which RFC 9110 5.6.1 has recipients ignore) are counted, not yielded."""
    left = MAX_FORWARDED_ENTRIES
    for value in reversed(values):
        parts = value.rsplit(b",", left)  # at most left + 1: the first is what is not read
        for part in reversed(parts):
            if left == 0:
                return
            left -= 1
            part = part.strip(b" \t")
            if part:
                yield part


def parse_entry(entry: bytes) -> IPAddress | None:
    """One ``X-Forwarded-For`` entry as an address: ``203.0.113.7``, ``2001:db8::1``, or
    with a port (``203.0.113.7:41000``, ``[2001:db8::1]:41000``, as Azure's gateways send);
    None for anything else."""
    if len(entry) > MAX_ENTRY_CHARS or not entry.isascii():
        return None
    text = entry.decode("ascii")
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not _is_port(port.removeprefix(":"), port)):
            return None
        text = host
        if ":" not in text:
            return None  # brackets hold an IPv6 address only
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not _is_port(port, ":" + port):
            return None
    if "%" in text:
        return None  # a scope id: the name of another host's interface, any text at all
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_port(digits: str, written: str) -> bool:
    return written.startswith(":") and 0 < len(digits) <= 5 and digits.isdigit()


# ---- Forwarded (RFC 7239) ---------------------------------------------------------------------


def forwarded_client(values: Sequence[bytes], trusted: TrustedProxies) -> IPAddress | None:
    """The client named by the ``Forwarded`` header lines ``values`` that a trusted peer
    passed on; None to name the peer itself.

    Each element (``for=192.0.2.60;proto=https``, comma-separated, over one line or many)
    is one proxy's: its ``for`` names whom that proxy heard from. They are walked from the
    right as ``X-Forwarded-For``'s entries are, and the walk stops likewise at an element
    whose ``for`` names no address: ``unknown``, an obfuscated ``_name`` (RFC 7239 6.3),
    none at all, or an element that does not parse. What a client wrote left of the
    element its proxy appended is never read, whatever quotes it left open."""
    return _walk((_for_address(element) for element in _elements_from_right(values)), trusted)


_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# a value: a quoted-string (RFC 9110 5.6.4, ASCII), or, leniently, a run of what a proxy
# might leave unquoted (for=[2001:db8::1]:4711, host=a:8080): only an address is kept
_VALUE = rb'"(?:[\t !#-\[\]-~]|\\[\t !-~])*"|[!#-+\--:<-~]+'
_PAIR = re.compile(rb"[ \t]*(?:(" + _TOKEN + rb")=(" + _VALUE + rb")[ \t]*)?")
_OBFUSCATED_PORT = re.compile(rb"_[0-9A-Za-z._-]+")


def _for_address(element: bytes | None) -> IPAddress | None:
    """The address an element's ``for`` names; None for anything else."""
    pairs = _pairs(element) if element is not None else None
    node = pairs.get(b"for") if pairs is not None else None
    if node is None:
        return None
    if node.startswith(b'"'):
        node = node[1:-1]
        if b"\\" in node:
            return None  # an escaped character: no address needs one
    return parse_node(node)


def _pairs(element: bytes) -> dict[bytes, bytes] | None:
    """The parameters of an element by lower-case name; None if it does not parse, or
    names one twice (RFC 7239 4: which one would be the proxy's?)."""
    pairs: dict[bytes, bytes] = {}
    position = 0
    while True:
        pair = _PAIR.match(element, position)  # matches, if only the empty string
        if pair is None:
            return None
        if pair[1] is not None:
            name = pair[1].lower()
            if name in pairs:
                return None
            pairs[name] = pair[2]
        position = pair.end()
        if position == len(element):
            return pairs
        if element[position] != ord(";"):
            return None
        position += 1


def parse_node(node: bytes) -> IPAddress | None:
    """A ``for`` node (RFC 7239 6) as an address: ``192.0.2.60``, ``[2001:db8::1]``, with a
    port or an obfuscated one (``192.0.2.60:4711``, ``[2001:db8::1]:_p``); also an IPv6
    address without its brackets, as some proxies write it. None for ``unknown``, an
    obfuscated node (``_hidden``) and anything else."""
    host, colon, port = node.rpartition(b":")
    if colon and _OBFUSCATED_PORT.fullmatch(port) and (host.endswith(b"]") or b":" not in host):
        node = host
    return parse_entry(node)


def _elements_from_right(values: Sequence[bytes]) -> Iterator[bytes | None]:
    """The comma-separated elements of ``values``, last first, without their surrounding
    blanks, at most ``MAX_FORWARDED_ENTRIES``; a comma inside a quoted-string separates
    none. None for one that cannot be told apart (a quote that never opens, an element
    longer than ``MAX_ELEMENT_CHARS``): nothing left of it is read. Empty elements are
    counted, not yielded."""
    left = MAX_FORWARDED_ENTRIES
    for value in reversed(values):
        end = len(value)
        while left:
            left -= 1
            start = _element_start(value, end)
            if start is None:
                yield None
                return
            element = value[start:end].strip(b" \t")
            if element:
                yield element
            if start == 0:
                break
            end = start - 1  # the comma before it
        if not left:
            return


def _element_start(value: bytes, end: int) -> int | None:
    """Where the element ending at ``end`` begins: after the last comma before ``end``
    that is outside quotes. Searched within ``MAX_ELEMENT_CHARS`` only."""
    floor = max(0, end - MAX_ELEMENT_CHARS - 1)  # where the comma before the longest is
    cut = end
    comma = value.rfind(b",", floor, cut)
    while True:
        quote = value.rfind(b'"', floor, cut)
        if quote < comma or quote < 0:  # the nearest is a comma, or nothing is
            if comma >= 0:
                return comma + 1
            return 0 if end <= MAX_ELEMENT_CHARS else None
        # a quoted-string ends at ``quote``: on from where it opens
        opening = value.rfind(b'"', floor, quote)
        while opening >= 0 and _escaped(value, opening, floor):
            opening = value.rfind(b'"', floor, opening)
        if opening < 0:
            return None
        cut = opening
        if comma > opening:  # that comma was inside the quotes
            comma = value.rfind(b",", floor, cut)


def _escaped(value: bytes, quote: int, floor: int) -> bool:
    """Whether the quote at ``quote`` is a quoted-pair's: after an odd run of backslashes."""
    start = quote
    while start > floor and value[start - 1] == 0x5C:
        start -= 1
    return (quote - start) % 2 == 1


# ---- X-Real-IP --------------------------------------------------------------------------------


def real_ip_client(values: Sequence[bytes], trusted: TrustedProxies) -> IPAddress | None:
    """The client a trusted peer names in ``X-Real-IP``: one address (a port allowed, as
    nginx's realip module reads it); None to name the peer for anything else, a list or two
    header lines included (a proxy that sets the header replaces the client's: two mean one
    was not replaced, and which is which cannot be known). Not walked: the proxy wrote its
    own peer, so ``trusted`` does not matter."""
    del trusted
    if len(values) != 1:
        return None
    return parse_entry(values[0].strip(b" \t"))


_READERS: dict[str, ClientReader] = {
    X_FORWARDED_FOR: x_forwarded_for_client,
    FORWARDED: forwarded_client,
    X_REAL_IP: real_ip_client,
}
