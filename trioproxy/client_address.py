"""The client address an access line names: the connecting peer, or, behind proxies the
operator trusts (``FORWARDED_ALLOW_IPS``), the client those proxies name in
``X-Forwarded-For``.

Each proxy appends the address it received the request from, so only the entries to the
right, up to the first that a trusted proxy did not write, can be believed: the header is
walked from its right end, past the trusted proxies, and the first other address is the
client (uvicorn's and gunicorn's ``forwarded_allow_ips`` work so). Whatever the header holds,
what is logged is an IP address this module printed itself, or the peer: a client cannot
put text of its own into a log line. The walk is bounded (``MAX_FORWARDED_ENTRIES``).
Only read when an access line is written; nothing here runs per request otherwise.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

UNKNOWN = "-"  # no peer address (a unix socket; a test's scope)
MAX_FORWARDED_ENTRIES = 32
"""Entries of ``X-Forwarded-For`` examined, from the right: more proxies than any real chain,
and a header of thousands costs no more than this."""
MAX_ENTRY_CHARS = 64  # "[ffff:…:255.255.255.255]:65535" is 53: longer is no address
PEER_CACHE_SIZE = 1024  # peers whose trust is remembered, per process
_FORWARDED_FOR = b"x-forwarded-for"


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


class ClientAddresses:
    """Names the client of a request for its access line."""

    def __init__(self, trusted: TrustedProxies) -> None:
        self.trusted = trusted
        # a peer's trust, by its address as the server gives it: proxies and clients
        # come back on many connections, and the answer never changes
        self._trusts_peer = lru_cache(maxsize=PEER_CACHE_SIZE)(self._trusts_text)

    def of(self, scope: Mapping[str, Any]) -> str:
        """The address to log for the request of ``scope``: its peer's, or the client the
        trusted peer names in ``X-Forwarded-For``; ``-`` when there is none (a unix socket)."""
        client = scope.get("client")
        if not client:
            return UNKNOWN
        peer: str = client[0]
        if not self.trusted or not self._trusts_peer(peer):
            return peer
        values = [value for name, value in scope.get("headers", ()) if name == _FORWARDED_FOR]
        forwarded = forwarded_client(values, self.trusted) if values else None
        return peer if forwarded is None else str(forwarded)

    def _trusts_text(self, peer: str) -> bool:
        try:
            return self.trusted.trusts(ipaddress.ip_address(peer))
        except ValueError:  # not an IP address (a unix socket's path): never trusted
            return False


def peer_address(client: Sequence[Any] | None) -> str:
    """The address of an ASGI ``client`` (host, port), as an access line names it."""
    return str(client[0]) if client else UNKNOWN


def forwarded_client(values: Sequence[bytes], trusted: TrustedProxies) -> IPAddress | None:
    """The client named by the ``X-Forwarded-For`` header lines ``values`` (in the order
    received) that a trusted peer passed on; None to name the peer itself.

    From the right: the first address not of a trusted proxy is the client. The walk stops
    at an entry that is no address ("unknown", garbage), naming the last trusted hop, as it
    does after ``MAX_FORWARDED_ENTRIES`` entries: nothing left of such an entry can be
    vouched for. When every address is a trusted proxy's, the leftmost one is the client."""
    last: IPAddress | None = None
    for entry in _entries_from_right(values):
        entry = entry.strip(b" \t")
        if not entry:
            continue  # an empty list element, which RFC 9110 5.6.1 has recipients ignore
        address = parse_entry(entry)
        if address is None:
            break
        if not trusted.trusts(address):
            return address
        last = address
    return last


def _entries_from_right(values: Sequence[bytes]) -> Iterator[bytes]:
    """The comma-separated entries of ``values``, last first, at most
    ``MAX_FORWARDED_ENTRIES``: a long header is split no further than that."""
    left = MAX_FORWARDED_ENTRIES
    for value in reversed(values):
        parts = value.rsplit(b",", left)  # at most left + 1: the first is what is not read
        for part in reversed(parts):
            if left == 0:
                return
            left -= 1
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
