"""Client authentication (``PROXY_API_KEYS``): who may spend the backend's key.

Without keys the proxy serves every caller, like Ollama. With keys, every request to the
Ollama, OpenAI and Anthropic APIs must carry one as ``Authorization: Bearer <key>``, which
is what the OpenAI SDKs send (their ``api_key``), and ollama-python (``OLLAMA_API_KEY``),
ollama-js, Open WebUI and Claude Code (``ANTHROPIC_AUTH_TOKEN``) send when given a key; or
as ``x-api-key: <key>``, which the anthropic SDKs send. Probes (``/``, ``/health``,
``/ready``), Ollama's ``/api/version`` (clients probe it without their key, as Ollama has
none) and CORS preflights stay open; the metrics endpoints too unless
``METRICS_REQUIRE_AUTH``.

Keys are kept as SHA-256 digests and a presented key is looked up by its digest, so the
time a comparison takes says nothing about how much of a key was right.

An entry ``name:key`` names its client in the metrics (``trioproxy_client_*``) and the
access log; a bare key is named by its place in the list (``key-1``, ``key-2``, ...): nothing
derived from a key is ever shown, so the open metrics give no way to test a guess. Keys
are printable ASCII without spaces or commas (what an HTTP header carries unchanged).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from .errors import ProxyError
from .metrics.labels import UNTRACKED_PATHS

# always open: liveness and readiness probes, Ollama's "is it running" page, and its
# version, which clients ask for before sending a key (Open WebUI's connection check)
PROBE_PATHS = frozenset({"/", "/health", "/v1/health", "/ready", "/api/version"})
METRICS_PATHS = UNTRACKED_PATHS - PROBE_PATHS
_CLIENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # visible ASCII but the comma


class Unauthorized(ProxyError):
    status = 401
    code = "invalid_api_key"
    quiet = True

    def __init__(self, message: str) -> None:
        # x-should-retry: the Stainless SDKs (openai, anthropic) read it; Claude Code retries
        # a 401 without it for minutes with backoff, as if its own token could be renewed
        super().__init__(message, headers={"WWW-Authenticate": "Bearer", "x-should-retry": "false"})


class ClientBusy(ProxyError):
    """A client has ``CLIENT_MAX_CONCURRENT_REQUESTS`` proxy requests in flight already."""

    status = 429
    code = "rate_limit_exceeded"
    quiet = True  # counted in the metrics, per client

    def __init__(self, client: str, limit: int) -> None:
        super().__init__(
            f"client {client} has its limit of {limit} requests in flight "
            "(CLIENT_MAX_CONCURRENT_REQUESTS); retry when one has ended",
            headers={"Retry-After": "1"},
        )


class ClientKeys:
    """The keys clients may present, each with its client's name, and each client's proxy
    requests in flight (at most ``limit``, 0 for no limit); empty means no authentication."""

    __slots__ = ("_in_flight", "_names", "_open_paths", "limit")

    def __init__(
        self, entries: Iterable[str], *, metrics_open: bool = True, limit: int = 0
    ) -> None:
        self._names = {_digest(key): name for name, key in client_keys(entries)}
        self._open_paths = PROBE_PATHS | METRICS_PATHS if metrics_open else PROBE_PATHS
        self.limit = limit
        self._in_flight: dict[str, int] = {}

    def enter(self, client: str) -> None:
        """Count a proxy request of ``client`` in; raises ``ClientBusy`` past its limit.
        Every successful ``enter`` is paired with a ``leave``."""
        count = self._in_flight.get(client, 0)
        if self.limit and count >= self.limit:
            raise ClientBusy(client, self.limit)
        self._in_flight[client] = count + 1

    def leave(self, client: str) -> None:
        count = self._in_flight[client] - 1
        if count:
            self._in_flight[client] = count
        else:
            del self._in_flight[client]  # the dict holds only clients with requests

    def in_flight(self, client: str) -> int:
        return self._in_flight.get(client, 0)

    def __bool__(self) -> bool:
        return bool(self._names)

    def check(
        self, method: str, path: str, authorization: str | None, api_key: str | None = None
    ) -> str | None:
        """The name of the client whose key the request carries, None where no key is
        needed; raises ``Unauthorized`` for a request that may not pass. The key comes as
        ``Authorization: Bearer <key>``, or as ``x-api-key: <key>`` (``api_key``), which
        the anthropic SDKs send (and Claude Code given ``ANTHROPIC_API_KEY``)."""
        if not self._names or method == "OPTIONS" or path in self._open_paths:
            return None
        if not authorization and not api_key:
            raise Unauthorized(
                "missing API key: this proxy requires 'Authorization: Bearer <key>' "
                "(or 'x-api-key: <key>') with one of its PROXY_API_KEYS"
            )
        name = self.name_of(authorization)
        if name is None and api_key:
            name = self._names.get(_digest(api_key.strip()))
        if name is None:
            # never quote what was sent: it may be a real key for somewhere else
            raise Unauthorized("incorrect API key provided")
        return name

    def name_of(self, authorization: str | None) -> str | None:
        """The client whose key ``authorization`` carries; None for no key or another."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        return self._names.get(_digest(token.strip())) if scheme.lower() == "bearer" else None


def client_keys(entries: Iterable[str]) -> list[tuple[str, str]]:
    """(client name, key) for each ``PROXY_API_KEYS`` entry: ``name:key``, or a bare key
    named by its place in the list. Raises ``ValueError`` for a key an HTTP header cannot
    carry as it is."""
    pairs: list[tuple[str, str]] = []
    for position, entry in enumerate(entries, start=1):
        name, separator, key = (part.strip() for part in entry.partition(":"))
        if not (separator and key and _CLIENT_NAME.fullmatch(name)):
            name, key = f"key-{position}", entry.strip()
        if not _KEY.fullmatch(key):
            raise ValueError(
                f"the key of entry {position} ({name}) must be printable ASCII without "
                "spaces or commas"
            )
        if any(name == known for known, _ in pairs):
            raise ValueError(f"two entries are named {name}: their counts would merge")
        pairs.append((name, key))
    return pairs


def _digest(key: str) -> bytes:
    # a header value arrives decoded as latin-1: an ASCII key is the same either way
    return hashlib.sha256(key.encode("latin-1", "replace")).digest()


def parse_keys(text: str) -> tuple[str, ...]:
    """Keys from ``PROXY_API_KEYS`` (comma- or newline-separated) or the lines of
    ``PROXY_API_KEYS_FILE``; blank entries and ``#`` comment lines are skipped."""
    keys: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        keys += [key.strip() for key in line.split(",") if key.strip()]
    return tuple(keys)
