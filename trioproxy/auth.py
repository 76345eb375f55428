"""Client authentication (``PROXY_API_KEYS``): who may spend the backend's key.

Without keys the proxy serves every caller, like Ollama. With keys, every request to the
Ollama and OpenAI APIs must carry one as ``Authorization: Bearer <key>``, which is what
the OpenAI SDKs send (their ``api_key``), and ollama-python (``OLLAMA_API_KEY``), ollama-js
and Open WebUI send when given a key. Probes (``/``, ``/health``, ``/ready``) and CORS
preflights stay open; the metrics endpoints too unless ``METRICS_REQUIRE_AUTH``.

Keys are kept as SHA-256 digests and a presented key is looked up by its digest, so the
time a comparison takes says nothing about how much of a key was right.

An entry ``name:key`` names its client in the metrics (``trioproxy_client_*``) and the
access log; a bare key is named ``key-`` and the first 8 hex digits of its digest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from .errors import ProxyError
from .metrics.labels import UNTRACKED_PATHS

# always open: liveness and readiness probes, and Ollama's "is it running" page
PROBE_PATHS = frozenset({"/", "/health", "/v1/health", "/ready"})
METRICS_PATHS = UNTRACKED_PATHS - PROBE_PATHS
_CLIENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Unauthorized(ProxyError):
    status = 401
    code = "invalid_api_key"
    quiet = True

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ClientKeys:
    """The keys clients may present, each with its client's name; empty means no
    authentication."""

    __slots__ = ("_names", "_open_paths")

    def __init__(self, entries: Iterable[str], *, metrics_open: bool = True) -> None:
        self._names = {_digest(key): name for name, key in map(split_entry, entries)}
        self._open_paths = PROBE_PATHS | METRICS_PATHS if metrics_open else PROBE_PATHS

    def __bool__(self) -> bool:
        return bool(self._names)

    def check(self, method: str, path: str, authorization: str | None) -> str | None:
        """The name of the client whose key the request carries, None where no key is
        needed; raises ``Unauthorized`` for a request that may not pass."""
        if not self._names or method == "OPTIONS" or path in self._open_paths:
            return None
        if not authorization:
            raise Unauthorized(
                "missing API key: this proxy requires 'Authorization: Bearer <key>' "
                "with one of its PROXY_API_KEYS"
            )
        scheme, _, token = authorization.partition(" ")
        name = self._names.get(_digest(token.strip())) if scheme.lower() == "bearer" else None
        if name is None:
            # never quote what was sent: it may be a real key for somewhere else
            raise Unauthorized("incorrect API key provided")
        return name


def split_entry(entry: str) -> tuple[str, str]:
    """The client name and the key of a ``PROXY_API_KEYS`` entry (``name:key``, or a bare
    key, named by its digest)."""
    name, separator, key = entry.partition(":")
    if separator and key and _CLIENT_NAME.fullmatch(name):
        return name, key
    return "key-" + hashlib.sha256(entry.encode("utf-8", "surrogateescape")).hexdigest()[:8], entry


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def parse_keys(text: str) -> tuple[str, ...]:
    """Keys from ``PROXY_API_KEYS`` (comma- or newline-separated) or the lines of
    ``PROXY_API_KEYS_FILE``; blank entries and ``#`` comment lines are skipped."""
    keys: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        keys += [key.strip() for key in line.split(",") if key.strip()]
    return tuple(keys)
