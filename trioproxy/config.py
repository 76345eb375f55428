"""Settings: one frozen object built from CLI flags, the environment and a ``.env`` file.

Precedence: CLI flag > environment > ``.env`` in the working directory > default.
A flag's value is parsed and checked exactly as the environment variable it stands for.
Every setting is documented in docs/configuration.md.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import math
import os
import re
import signal
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from .auth import client_keys, parse_keys
from .client_address import (
    NO_PROXIES,
    X_FORWARDED_FOR,
    TrustedProxies,
    parse_forwarded_header,
    parse_trusted_proxies,
)
from .errors import BackendSecrets
from .model_mapping import DeclaredModel, MappingFileError, read_mapping_file

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_ENV_FILE = ".env"
"""Read when present; any other dotenv file named must exist (see ``read_environment``)."""
ENV_FILE_VARIABLE = "TRIOPROXY_ENV_FILE"
"""Names the dotenv file ``create_app()`` reads when it builds its own settings (default
``.env``; empty for none). ``--workers`` sets it for its workers to the ``--env-file``."""
WORKER_VARIABLE = "TRIOPROXY_WORKER"
"""``1`` in the hypercorn workers that ``--workers N`` starts (see ``app.create_app``)."""
STOP_NOW_SECONDS = 0.5
"""How long a second signal leaves for the 503s and in-band ends it makes to be written."""
STOP_NOW_SIGNAL = signal.SIGUSR1
"""What the master of ``--workers N`` sends its workers on a second stop signal."""
STOP_NOW_FILE_VARIABLE = "TRIOPROXY_STOP_NOW_FILE"
"""Names the file the master of ``--workers N`` creates before it sends ``STOP_NOW_SIGNAL``:
a worker acts on the signal only then (an operator's SIGUSR1, logrotate's say, is not it)."""


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the setting to fix."""


@dataclass(frozen=True, slots=True)
class Settings:
    upstream_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    # the header the key goes in: "Authorization" as "Bearer KEY", any other as the bare key
    api_key_header: str = "Authorization"
    # sent with every backend request; values may be credentials (never shown)
    upstream_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    host: str = "127.0.0.1"
    port: int = 11434
    workers: int = 1
    log_level: str = "INFO"
    log_format: str = "text"
    # seconds a line identical to one written is counted, not written (0: off); logs.py
    log_repeat_window_seconds: float = 10.0
    access_log: bool = False
    # whose X-Forwarded-For the access log believes; none by default (see the manual)
    forwarded_allow_ips: TrustedProxies = NO_PROXIES
    # the one header they name the client in: X-Forwarded-For, Forwarded or X-Real-IP
    forwarded_header: str = X_FORWARDED_FOR
    demo: bool = False
    demo_token_delay: float = 0.02
    request_timeout: float = 600.0
    connect_timeout: float = 10.0
    stream_first_token_timeout: float = 300.0
    stream_idle_timeout: float = 120.0
    stream_keepalive_seconds: float = 0.0  # 0: no keep-alive comments in /v1 streams
    max_retries: int = 3
    retry_backoff: float = 0.25
    retry_backoff_max: float = 8.0
    model_mapping_file: str | None = None
    model_mapping: Mapping[str, str] = field(default_factory=dict)
    # what MODEL_MAPPING_FILE declares of client names (capabilities, context window)
    declared_models: Mapping[str, DeclaredModel] = field(default_factory=dict)
    max_request_bytes: int = 64 * 1024 * 1024
    max_response_bytes: int = 256 * 1024 * 1024
    max_concurrent_requests: int = 2048
    # per worker; 0: no cap. Idle keep-alive connections cost ~16 KiB each: 10,000 is
    # ~160 MiB, far above MAX_CONCURRENT_REQUESTS plus what pools keep idle, far below
    # what the open files limit (raised to the hard one, often 524,288) would let in
    max_connections: int = 10_000
    upstream_clients: int = 64
    upstream_max_keepalive: int = 256
    disable_ssl_verification: bool = False
    ready_check_interval: float = 10.0
    metrics_enabled: bool = True
    metrics_max_requests: int = 1000
    metrics_model_labels: int = 50
    system_metrics_enabled: bool = True
    system_metrics_interval: float = 5.0
    # where /proc/self/cgroup, mountinfo and the cgroup mounts are read (tests, odd mounts)
    system_metrics_fs_root: str = "/"
    health_error_rate_degraded: float = 0.1  # the guide's and the replaced proxy's
    health_error_rate_unhealthy: float = 0.25
    health_p95_degraded_seconds: float = 30.0
    health_min_requests: int = 1
    health_window_seconds: float = 300.0
    graceful_timeout: float = 5.0
    # longer than the idle timeouts of what sits in front (an AWS load balancer's 60 s,
    # nginx's upstream keepalive 60 s) and of the clients that pool (httpx 5 s, aiohttp
    # 15 s): whoever closes an idle connection first must be the client, or a request it
    # sends as the server closes fails (a 502 from the load balancer)
    keep_alive_timeout: float = 75.0
    # a Responses API WebSocket with no turn in progress (an agent's tool may run minutes)
    websocket_idle_timeout: float = 300.0
    client_write_timeout: float = 60.0
    client_body_timeout: float = 30.0
    cors_origins: str = ""
    proxy_api_keys: tuple[str, ...] = field(default=(), repr=False)
    proxy_api_keys_file: str | None = None
    metrics_require_auth: bool = False
    client_max_concurrent_requests: int = 0
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    root_path: str = ""  # the mount point the proxy is served below ("" for none)
    think_on_extra_body: Mapping[str, Any] = field(default_factory=dict)
    think_off_extra_body: Mapping[str, Any] = field(default_factory=dict)
    env_file: str | None = field(default=None, compare=False)  # the dotenv file read, if any
    # what that file set (known names only), for workers: a pipe or a /dev/fd path (a
    # decrypted secret) cannot be read twice; never shown (it holds keys)
    env_file_values: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # derived from api_key and upstream_url (__post_init__): what is masked wherever the
    # proxy's output could quote what it sent the backend
    backend_secrets: BackendSecrets = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        url = self.upstream_url or ""
        # the basic credential also without its "=" padding: quoted so, it still holds the
        # whole user:password
        credential = basic_credential(url) or ""
        secrets = BackendSecrets.of(
            self.api_key or "",
            *url_credentials(url),
            credential,
            credential.rstrip("="),
            *header_secrets(self.upstream_headers),
            *query_secrets(url),
        )
        object.__setattr__(self, "backend_secrets", secrets)  # frozen: set once, here

    @property
    def secrets(self) -> tuple[str, ...]:
        """What log lines must never show: the backend's secrets (its key, the credentials
        in its URL and the basic-auth credential made of them), and the clients' keys."""
        return (
            *self.backend_secrets.texts,
            *(key for _, key in client_keys(self.proxy_api_keys)),
        )

    @property
    def key_in_authorization(self) -> bool:
        """Whether OPENAI_API_KEY goes as ``Authorization: Bearer …`` (else the bare key in
        its own header, and URL credentials, if any, as ``Authorization: Basic …``)."""
        return self.api_key_header.lower() == "authorization"

    def credential_headers(self) -> dict[str, str]:
        """What the backend's credentials are sent in: OPENAI_API_KEY (as ``Authorization:
        Bearer …`` or in OPENAI_API_KEY_HEADER bare) and the URL's ``user:password`` as
        ``Authorization: Basic …`` unless the key is sent in it. One function for the pool
        and for the check that UPSTREAM_HEADERS names none of them."""
        headers: dict[str, str] = {}
        bearer = self.key_in_authorization
        if self.api_key:
            headers[self.api_key_header] = f"Bearer {self.api_key}" if bearer else self.api_key
        credential = basic_credential(self.upstream_url or "")
        if credential and not (self.api_key and bearer):
            # user:password in the URL (a backend behind basic auth): the transports are
            # handed requests directly and would drop it, so it becomes the header
            headers["Authorization"] = f"Basic {credential}"
        return headers

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def require_upstream(self) -> str:
        if not self.upstream_url:
            raise ConfigError(
                "no backend configured: set OPENAI_API_BASE_URL (or pass --upstream URL), "
                "or run with --demo"
            )
        return self.upstream_url


# env name -> (field, parser)
def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def _integer(value: str, expected: str) -> int:
    try:
        return int(value)
    except ValueError:  # Python's words: "invalid literal for int() with base 10: 'x'"
        raise ValueError(f"expected {expected}, got {value!r}") from None


def _number(value: str, expected: str) -> float:
    try:
        return float(value)
    except ValueError:  # Python's words: "could not convert string to float: '10s'"
        raise ValueError(f"expected {expected}, got {value!r}") from None


def _positive_float(value: str) -> float:
    number = _number(value, "a positive number of seconds")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    number = _number(value, "a number of seconds >= 0")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"expected a number of seconds >= 0, got {value!r}")
    return number


def _seconds_up_to(high: float) -> Callable[[str], float]:
    """A number of seconds from 0 to ``high``: a window of days would hold a count back
    for days."""

    def parse(value: str) -> float:
        expected = f"a number of seconds from 0 to {high:g}"
        number = _number(value, expected)
        if not 0 <= number <= high:  # NaN fails too
            raise ValueError(f"expected {expected}, got {value!r}")
        return number

    return parse


def _non_negative_int(value: str) -> int:
    number = _integer(value, "an integer >= 0")
    if number < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = _integer(value, "an integer >= 1")
    if number < 1:
        raise ValueError(f"expected an integer >= 1, got {value!r}")
    return number


def _int_between(low: int, high: int) -> Callable[[str], int]:
    """An integer setting with an upper bound too: a typo's extra zeros must be a clear
    refusal at start, not a worker that forks a thousand processes or preallocates
    gigabytes."""

    def parse(value: str) -> int:
        number = _integer(value, f"an integer from {low} to {high}")
        if not low <= number <= high:
            raise ValueError(f"expected an integer from {low} to {high}, got {value!r}")
        return number

    return parse


def _fraction(value: str) -> float:
    number = _number(value, "a fraction between 0 and 1")
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise ValueError(f"expected a fraction between 0 and 1, got {value!r}")
    return number


def _port(value: str) -> int:
    number = _integer(value, "a port 0-65535")
    if not 0 <= number <= 65535:
        raise ValueError(f"expected a port 0-65535, got {value!r}")
    return number


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def _log_format(value: str) -> str:
    fmt = value.strip().lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"expected text or json, got {value!r}")
    return fmt


def _text(value: str) -> str:
    return value.strip()


def _directory(value: str) -> str:
    path = value.strip()
    if not os.path.isdir(path):
        raise ValueError(f"expected an existing directory, got {value!r}")
    return path


# path segments as RFC 3986 spells them, no percent-escapes: the prefix is compared with
# the request's decoded path, so an escape would never match
_ROOT_PATH = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+")


def _root_path(value: str) -> str:
    path = value.strip().rstrip("/")
    if path and (not _ROOT_PATH.fullmatch(path) or "/./" in path + "/" or "/../" in path + "/"):
        raise ValueError(f"expected a path such as /llm (letters, digits, -._~), got {value!r}")
    return path


# what the proxy itself writes into a request it translates, and reads its answer by: an
# extra body that changed them would get an answer the translation cannot read
_PROXY_OWNED_FIELDS = frozenset({"model", "messages", "stream", "stream_options", "n"})
MAX_EXTRA_BODY_CHARS = 64 * 1024
MAX_EXTRA_BODY_DEPTH = 32  # what backends take is a few fields; every request copies it


def _extra_body(value: str) -> dict[str, Any]:
    """A JSON object merged into translated requests (``THINK_ON_EXTRA_BODY``, ...);
    empty for none."""
    text = value.strip()
    if not text:
        return {}
    if len(text) > MAX_EXTRA_BODY_CHARS:
        raise ValueError(f"longer than {MAX_EXTRA_BODY_CHARS} characters")
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    return _checked_extra_body(body)


def _no_constant(name: str) -> None:
    # Python's decoder takes NaN and Infinity, which are not JSON: sent, they became null
    raise ValueError(f"{name} is not JSON")


def _checked_extra_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise ValueError('expected a JSON object, such as {"reasoning_effort": "minimal"}')
    owned = sorted(_PROXY_OWNED_FIELDS & body.keys())
    if owned:
        raise ValueError(f"{', '.join(owned)}: set by the proxy, not by an extra body")
    _check_plain_json(body)
    return dict(body)


def _check_plain_json(value: Any) -> None:
    """Only what JSON writes as it is (a value given from Python may hold anything), and
    at most MAX_EXTRA_BODY_DEPTH levels: copied into every request, a deeper one ran out of
    stack there, a 500 on every request it went with. Walked without recursion for the
    same reason."""
    pending = [(value, 1)]  # an object or array and how many hold it, itself counted
    while pending:
        item, depth = pending.pop()
        if depth > MAX_EXTRA_BODY_DEPTH and isinstance(item, Mapping | list):
            raise ValueError(f"nested deeper than {MAX_EXTRA_BODY_DEPTH} levels")
        if isinstance(item, Mapping):
            if not all(isinstance(key, str) for key in item):
                raise ValueError("an object's keys must be strings")
            pending.extend((member, depth + 1) for member in item.values())
        elif isinstance(item, list):
            pending.extend((member, depth + 1) for member in item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("NaN and infinities are not JSON")
        elif item is not None and not isinstance(item, str | int | float):
            raise ValueError(f"{type(item).__name__} is not JSON")


def _host(value: str) -> str:
    """The address to bind: an IPv4 address, a host name, or an IPv6 address with or
    without its brackets (``[::1]`` as URLs write it, given back as ``::1``)."""
    host = value.strip()
    if not host:
        # the socket API reads "" as every interface: an unset template variable would
        # quietly expose the proxy
        raise ValueError("empty; give an address such as 127.0.0.1, or 0.0.0.0 for all")
    if "/" in host or _WITH_PORT.fullmatch(host):
        # Ollama's OLLAMA_HOST takes "0.0.0.0:11434" and "http://..."; bound as written,
        # it failed as an unknown IPv6 host name, the port named as the one of PROXY_PORT
        raise ValueError(
            f"{host!r} is more than an address; give the address alone, such as 0.0.0.0 "
            "or ::, and the port as PROXY_PORT (--port)"
        )
    bracketed = host.startswith("[") and host.endswith("]")
    unbracketed = host[1:-1] if bracketed else host
    if ":" in unbracketed or bracketed or "[" in host or "]" in host:
        try:
            ipaddress.IPv6Address(unbracketed)
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IPv6 address (such as ::1, or :: for all)"
            ) from None
    return unbracketed


# a host and a port: "0.0.0.0:11434", "localhost:8080", "[::1]:8080" (not "::1", "fe80::1")
_WITH_PORT = re.compile(r"(\[[^\]]*\]|[^:\[\]]*):\d*")


def _api_key(value: str) -> str:
    """The backend key, which goes out in an HTTP header: only printable ASCII. h11 refuses
    a line end or a control character in a header (its error quotes the header escaped,
    past the scrubbing of the key as written) and httpx cannot encode a non-ASCII letter
    (a crash after the proxy said it listens), so such a key is refused here, named by
    the character's kind and place only: the message must not quote the key."""
    key = value.strip()
    for place, char in enumerate(key, 1):
        if not " " <= char <= "~":
            kind = (
                "a line end"
                if char in "\r\n"
                else "a non-ASCII character"
                if char > "~"
                else "a control character"
            )
            raise ValueError(
                f"{kind} at character {place} (not shown); the key is sent in an HTTP "
                "header, which takes printable ASCII only (a multi-line secret file, or a "
                "stray character pasted with the key?)"
            )
    return key


# RFC 9110 5.1: a field name is a token
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What no header the operator gives may name (lower case), and why: what the HTTP client
# sets for each request's framing, what concerns one connection only, and what the proxy
# itself sets for each request.
_RESERVED_HEADERS = {
    **dict.fromkeys(
        ("host", "content-length", "transfer-encoding", "expect"),
        "set by the HTTP client for each request (its framing)",
    ),
    **dict.fromkeys(
        ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"),
        "a hop-by-hop header, about one connection, not for the backend",
    ),
    "proxy-authorization": "for a proxy on the way, not the backend: give its credentials "
    "in the URL of HTTPS_PROXY",
    "content-type": "set by trioproxy for each request (its JSON body)",
    "content-encoding": "set by trioproxy for each request (its body is not encoded)",
    "accept-encoding": "set by trioproxy (gzip, deflate: what it decodes)",
    "x-request-id": "set by trioproxy for each request (the request's id)",
    "traceparent": "set by trioproxy for each request (the client's trace context)",
    "tracestate": "set by trioproxy for each request (the client's trace context)",
}
MAX_UPSTREAM_HEADERS = 32
# names, values and ": " and CRLF each: far inside what servers take in all (8 KiB a line
# for nginx and gunicorn, 16 KiB a head for Node), beside the proxy's own headers
MAX_UPSTREAM_HEADERS_BYTES = 8 * 1024
# a header whose name says it holds a credential: of "SCHEME TOKEN" in it, the token
_CREDENTIAL_NAME = re.compile(
    r"key|token|auth|secret|pass|cookie|session|credential|signature", re.IGNORECASE
)
# "Bearer TOKEN", "Basic BASE64": an auth scheme (RFC 9110 11.1: letters, up to 16 here)
# and the credential, which is what a backend's echo may quote without the scheme
_SCHEME_AND_CREDENTIAL = re.compile(r"([A-Za-z][A-Za-z-]{0,15}) +([^ ]+)")
# auth schemes (the IANA registry's, and the ones gateways use): a value of another
# header that starts with one is a credential too, and its token the secret
_AUTH_SCHEMES = frozenset(
    {"bearer", "basic", "digest", "token", "apikey", "api-key", "key", "dpop", "negotiate"}
)
# headers whose values are public by what they are: the app's attribution (OpenRouter's
# X-Title and HTTP-Referer), the client's name, OpenAI's organisation and project ids
# (named in OpenAI's own error messages), API versions and betas. Every other
# UPSTREAM_HEADERS value is a secret: a gateway's credential may go in a header of any
# name (X-Custom-Gateway, Helicone-Auth), and a gateway may quote it in an error body.
PUBLIC_UPSTREAM_HEADERS = frozenset(
    {
        "user-agent",
        "x-title",
        "http-referer",
        "referer",
        "openai-organization",
        "openai-project",
        "openai-beta",
        "anthropic-version",
        "anthropic-beta",
    }
)


def _header_name(value: str) -> str:
    """OPENAI_API_KEY_HEADER: a header name, not one the proxy or the client sets."""
    name = value.strip()
    _check_header_name(name, "the name")
    reason = _RESERVED_HEADERS.get(name.lower())
    if reason:
        raise ValueError(f"{name!r} is {reason}")
    return "Authorization" if name.lower() == "authorization" else name


def _check_header_name(name: str, which: str) -> None:
    """An HTTP token; an invalid name is not quoted (a pasted "api-key: KEY" holds one)."""
    if not name:
        raise ValueError(f"{which} is empty")
    if not _TOKEN.fullmatch(name):
        place = next(i for i, char in enumerate(name, 1) if not _TOKEN.fullmatch(char))
        raise ValueError(
            f"{which} is not an HTTP header name: character {place} is not allowed (names "
            "take letters, digits and !#$%&'*+-.^_`|~)"
        )


def _upstream_headers(value: str) -> dict[str, str]:
    """UPSTREAM_HEADERS: a JSON object of header names and string values; empty for none."""
    text = value.strip()
    if not text:
        return {}
    try:
        pairs = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # json's message quotes no text, only where it failed: values may be secrets
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(pairs, _Pairs):
        raise ValueError('expected a JSON object, such as {"X-Title": "My App"}')
    return checked_upstream_headers(pairs)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its pairs: ``json.loads`` keeps the last of a name given twice."""


def _pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    return _Pairs(pairs)


def checked_upstream_headers(headers: Any) -> dict[str, str]:
    """Names (HTTP tokens, none reserved, none twice in any case) and values (printable
    ASCII, not empty), bounded in number and size; errors never quote a value."""
    if not isinstance(headers, Mapping | list):
        raise ValueError('expected a JSON object, such as {"X-Title": "My App"}')
    pairs = list(headers.items()) if isinstance(headers, Mapping) else headers
    if len(pairs) > MAX_UPSTREAM_HEADERS:
        raise ValueError(f"more than {MAX_UPSTREAM_HEADERS} headers")
    out: dict[str, str] = {}
    seen: set[str] = set()
    size = 0
    for place, (name, header_value) in enumerate(pairs, 1):
        if not isinstance(name, str):
            raise ValueError(f"the name of header {place} is not a string")
        _check_header_name(name, f"the name of header {place}")
        reason = _RESERVED_HEADERS.get(name.lower())
        if reason:
            raise ValueError(f"{name!r} is {reason}")
        if name.lower() in seen:
            raise ValueError(f"{name!r} is given twice (header names ignore case)")
        seen.add(name.lower())
        out[name] = _header_value(name, header_value)
        size += len(name) + len(out[name]) + 4
    if size > MAX_UPSTREAM_HEADERS_BYTES:
        raise ValueError(f"the headers take more than {MAX_UPSTREAM_HEADERS_BYTES} bytes")
    return out


def _header_value(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f'the value of {name!r} is not a JSON string (write "1", not 1)')
    value = value.strip()  # as the key's: the line end of a secret file pasted in
    if not value:
        # "${TOKEN}" with TOKEN unset: sent empty, the backend's refusal would be all
        raise ValueError(f"the value of {name!r} is empty")
    for place, char in enumerate(value, 1):
        if not " " <= char <= "~":
            kind = "a line end" if char in "\r\n" else "a character that is not printable ASCII"
            # h11 refuses a line end (header injection); httpx cannot encode non-ASCII
            raise ValueError(
                f"the value of {name!r} holds {kind} at character {place} (not shown); "
                "header values take printable ASCII only"
            )
    return value


def header_secrets(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The values of the headers that are not known to be public
    (:data:`PUBLIC_UPSTREAM_HEADERS`), secrets as OPENAI_API_KEY is: an operator cannot
    be expected to name a credential's header so that it looks like one. Of ``SCHEME
    TOKEN`` (``Bearer …``) the token alone, which every quote of the whole holds too (one
    secret less to look for): after any scheme in a header named as a credential
    (``cf-aig-authorization``), after a known auth scheme in others (in ``X-Title: My
    App``, "My" is no scheme). Public values (a title, the app's URL) are not secrets:
    masked in reply bodies, they would corrupt answers that mention them."""
    secrets: list[str] = []
    for name, value in headers.items():
        if name.lower() in PUBLIC_UPSTREAM_HEADERS:
            continue
        found = _SCHEME_AND_CREDENTIAL.fullmatch(value)
        if found and (_CREDENTIAL_NAME.search(name) or found[1].lower() in _AUTH_SCHEMES):
            secrets.append(found[2])
        else:
            secrets.append(value)
    return tuple(secrets)


def _check_backend_headers(settings: Settings) -> None:
    """UPSTREAM_HEADERS must not name a header the credentials go in: one would replace
    the other, and the backend would get the one the operator did not look at."""
    taken = {name.lower() for name in settings.credential_headers()}
    for name in settings.upstream_headers:
        if name.lower() in taken:
            why = (
                "OPENAI_API_KEY is sent in it (see OPENAI_API_KEY_HEADER)"
                if settings.api_key and name.lower() == settings.api_key_header.lower()
                else "the credentials in OPENAI_API_BASE_URL are sent in it"
            )
            raise ConfigError(f"invalid UPSTREAM_HEADERS: {name!r}: {why}")


_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "OPENAI_API_BASE_URL": ("upstream_url", _text),
    "OPENAI_API_KEY": ("api_key", _api_key),
    "OPENAI_API_KEY_HEADER": ("api_key_header", _header_name),
    "UPSTREAM_HEADERS": ("upstream_headers", _upstream_headers),
    "PROXY_HOST": ("host", _host),
    "PROXY_PORT": ("port", _port),
    "WORKERS": ("workers", _int_between(1, 256)),
    "LOG_LEVEL": ("log_level", _log_level),
    "LOG_FORMAT": ("log_format", _log_format),
    "LOG_REPEAT_WINDOW_SECONDS": ("log_repeat_window_seconds", _seconds_up_to(3600)),
    "ACCESS_LOG": ("access_log", _bool),
    "FORWARDED_ALLOW_IPS": ("forwarded_allow_ips", parse_trusted_proxies),
    "FORWARDED_HEADER": ("forwarded_header", parse_forwarded_header),
    "DEMO_TOKEN_DELAY": ("demo_token_delay", _non_negative_float),
    "REQUEST_TIMEOUT": ("request_timeout", _positive_float),
    "CONNECT_TIMEOUT": ("connect_timeout", _positive_float),
    "STREAM_FIRST_TOKEN_TIMEOUT": ("stream_first_token_timeout", _positive_float),
    "STREAM_IDLE_TIMEOUT": ("stream_idle_timeout", _positive_float),
    "STREAM_KEEPALIVE_SECONDS": ("stream_keepalive_seconds", _non_negative_float),
    "MAX_RETRIES": ("max_retries", _int_between(0, 10)),
    "RETRY_BACKOFF": ("retry_backoff", _non_negative_float),
    "RETRY_BACKOFF_MAX": ("retry_backoff_max", _non_negative_float),
    "MODEL_MAPPING_FILE": ("model_mapping_file", _text),
    "MAX_REQUEST_BYTES": ("max_request_bytes", _positive_int),
    "MAX_RESPONSE_BYTES": ("max_response_bytes", _positive_int),
    "MAX_CONCURRENT_REQUESTS": ("max_concurrent_requests", _positive_int),
    "MAX_CONNECTIONS": ("max_connections", _non_negative_int),
    "UPSTREAM_CLIENTS": ("upstream_clients", _int_between(1, 1_024)),
    "UPSTREAM_MAX_KEEPALIVE": ("upstream_max_keepalive", _positive_int),
    "DISABLE_SSL_VERIFICATION": ("disable_ssl_verification", _bool),
    "READY_CHECK_INTERVAL": ("ready_check_interval", _positive_float),
    "METRICS_ENABLED": ("metrics_enabled", _bool),
    "METRICS_MAX_REQUESTS": ("metrics_max_requests", _int_between(1, 1_000_000)),
    "METRICS_MODEL_LABELS": ("metrics_model_labels", _int_between(0, 10_000)),
    "SYSTEM_METRICS_ENABLED": ("system_metrics_enabled", _bool),
    "SYSTEM_METRICS_INTERVAL": ("system_metrics_interval", _positive_float),
    "SYSTEM_METRICS_FS_ROOT": ("system_metrics_fs_root", _directory),
    "HEALTH_ERROR_RATE_DEGRADED": ("health_error_rate_degraded", _fraction),
    "HEALTH_ERROR_RATE_UNHEALTHY": ("health_error_rate_unhealthy", _fraction),
    "HEALTH_P95_DEGRADED_SECONDS": ("health_p95_degraded_seconds", _positive_float),
    "HEALTH_MIN_REQUESTS": ("health_min_requests", _positive_int),
    "HEALTH_WINDOW_SECONDS": ("health_window_seconds", _positive_float),
    "GRACEFUL_TIMEOUT": ("graceful_timeout", _positive_float),
    "KEEP_ALIVE_TIMEOUT": ("keep_alive_timeout", _positive_float),
    "WEBSOCKET_IDLE_TIMEOUT": ("websocket_idle_timeout", _positive_float),
    "CLIENT_WRITE_TIMEOUT": ("client_write_timeout", _positive_float),
    "CLIENT_BODY_TIMEOUT": ("client_body_timeout", _positive_float),
    "CORS_ORIGINS": ("cors_origins", _text),
    "PROXY_API_KEYS": ("proxy_api_keys", parse_keys),
    "PROXY_API_KEYS_FILE": ("proxy_api_keys_file", _text),
    "METRICS_REQUIRE_AUTH": ("metrics_require_auth", _bool),
    "CLIENT_MAX_CONCURRENT_REQUESTS": ("client_max_concurrent_requests", _non_negative_int),
    "TLS_CERTFILE": ("tls_certfile", _text),
    "TLS_KEYFILE": ("tls_keyfile", _text),
    "ROOT_PATH": ("root_path", _root_path),
    "THINK_ON_EXTRA_BODY": ("think_on_extra_body", _extra_body),
    "THINK_OFF_EXTRA_BODY": ("think_off_extra_body", _extra_body),
}

ENV_NAMES: tuple[str, ...] = tuple(_ENV)


def read_environment(
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike[str] | None = DEFAULT_ENV_FILE,
    env_file_required: bool | None = None,
) -> dict[str, str]:
    """Merge the dotenv file under the process environment; only known names.

    A file that must exist and cannot be read is a ConfigError: settings such as
    ``PROXY_API_KEYS`` in a mistyped path must not silently go missing. It must exist
    when ``env_file_required``; when that is None, unless it is the default ``.env``."""
    return _under_environment(_dotenv(dotenv_path, env_file_required) or {}, environ)


def _under_environment(
    file_values: Mapping[str, str], environ: Mapping[str, str] | None
) -> dict[str, str]:
    merged = dict(file_values)
    source = os.environ if environ is None else environ
    for key in _ENV:
        if key in source:
            merged[key] = source[key]
    return merged


def _dotenv(path: str | os.PathLike[str] | None, required: bool | None) -> _FileValues | None:
    """The known settings in the dotenv file; None when there is none to read."""
    if path is None:
        return None
    if required is None:
        required = os.fspath(path) != DEFAULT_ENV_FILE
    # the default is skipped unless it is a file (a virtualenv named .env is common)
    if not required and not Path(path).is_file():
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"cannot read the env file {os.fspath(path)!r} ({reason}); "
            "--env-file '' (or TRIOPROXY_ENV_FILE=) reads none"
        ) from None
    given = _require_only_settings(text, os.fspath(path))
    values = dotenv_values(stream=io.StringIO(text))
    known = _FileValues(
        {key: value for key, value in values.items() if key in _ENV and value is not None}
    )
    for key, (raw, line) in given.items():
        # NAME=${UNSET} expands to "": PROXY_API_KEYS=${KEY} with KEY unset served everyone
        # (${KEY:-} says empty on purpose)
        if _BARE_REFERENCE.search(raw) and values.get(key) == "":
            known.void[key] = (
                f"the env file {os.fspath(path)!r} sets {key} from a variable that is not "
                f"set or is empty (line {line})"
            )
    return known


class _FileValues(dict[str, str]):
    """The known settings of a dotenv file, and those it gives as a ``${VARIABLE}`` that
    came out empty, each with why: an error if the value is used (not if the environment
    or a flag gives the setting)."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.void: dict[str, str] = {}


_BARE_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")


def _require_only_settings(text: str, path: str) -> dict[str, tuple[str, int]]:
    """A line python-dotenv cannot read (``PROXY_API_KEYS: key``, an unclosed quote), or a
    setting's name without ``=``, is a ConfigError: dotenv skips the one with a warning and
    reads the other as unset, so the keys went missing and the proxy served everyone. The
    line is not quoted: it may hold a secret. Other names without a value are left alone
    (the file may be shared with other programs)."""
    given: dict[str, tuple[str, int]] = {}  # each setting's last value as written, and line
    for binding in parse_stream(io.StringIO(text)):
        # a setting's name alone (no "="): dotenv reads it as no value, which dropped a
        # key given on an earlier line
        if binding.error or (binding.key in _ENV and binding.value is None):
            raise ConfigError(
                f"the env file {path!r} has a line that is no NAME=value setting "
                f"(line {binding.original.line})"
            )
        if binding.key in _ENV and binding.value is not None:
            given[binding.key] = (binding.value, binding.original.line)
    return given


def parse_setting(name: str, raw: str, given_as: str | None = None) -> tuple[str, Any]:
    """The ``Settings`` field and value for the setting ``name`` (its environment name)
    given as ``raw``; a ConfigError names ``given_as`` (a flag, say) or ``name``."""
    attr, parse = _ENV[name]
    try:
        return attr, parse(raw)
    except ValueError as exc:
        raise ConfigError(f"invalid {given_as or name}: {exc}") from None


_OPTIONAL_TEXT = (
    "upstream_url",
    "api_key",
    "api_key_header",  # empty: the default, Authorization
    "model_mapping_file",
    "proxy_api_keys_file",
    "tls_certfile",
    "tls_keyfile",
)


def load_settings(
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike[str] | None = DEFAULT_ENV_FILE,
    env_file_required: bool | None = None,
    **overrides: Any,
) -> Settings:
    """Build and validate settings. Raises ConfigError naming the offending setting.
    ``overrides`` are already parsed values (``parse_setting`` parses a flag's)."""
    values: dict[str, Any] = {}
    file_values = _dotenv(dotenv_path, env_file_required) or _FileValues({})
    given = {attr for attr, value in overrides.items() if value is not None}
    source = os.environ if environ is None else environ
    for name, raw in _under_environment(file_values, environ).items():
        if _ENV[name][0] in given:
            continue  # a flag wins, and rescues a bad value in the environment
        if name in file_values.void and name not in source:
            raise ConfigError(file_values.void[name])
        if raw.strip() == "" and _ENV[name][0] in _OPTIONAL_TEXT:
            continue
        attr, value = parse_setting(name, raw)
        values[attr] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    if file_values or (dotenv_path is not None and Path(dotenv_path).is_file()):
        values["env_file"] = str(dotenv_path)
    values["env_file_values"] = dict(file_values)
    settings = Settings(**values)
    return _validated(settings)


def _validated(settings: Settings) -> Settings:
    changes: dict[str, Any] = _reparsed(settings)
    if settings.upstream_url:
        changes["upstream_url"] = normalise_upstream_url(settings.upstream_url)
    if settings.model_mapping_file:
        try:
            mapping_file = read_mapping_file(settings.model_mapping_file)
        except MappingFileError as exc:
            raise ConfigError(f"invalid MODEL_MAPPING_FILE: {exc}") from None
        changes["model_mapping"] = mapping_file.mapping
        changes["declared_models"] = mapping_file.declared
    if settings.proxy_api_keys_file:
        changes["proxy_api_keys"] = settings.proxy_api_keys + _keys_from_file(
            settings.proxy_api_keys_file
        )
    for name, attr in (
        ("THINK_ON_EXTRA_BODY", "think_on_extra_body"),
        ("THINK_OFF_EXTRA_BODY", "think_off_extra_body"),
    ):
        try:  # given as a Python value (create_app(**overrides)), it was not parsed
            _checked_extra_body(getattr(settings, attr))
        except ValueError as exc:
            raise ConfigError(f"invalid {name}: {exc}") from None
    try:  # given as a Python value (create_app(**overrides)), it was not parsed
        headers = checked_upstream_headers(settings.upstream_headers)
    except ValueError as exc:
        raise ConfigError(f"invalid UPSTREAM_HEADERS: {exc}") from None
    if headers != settings.upstream_headers:
        changes["upstream_headers"] = headers
    _check_backend_headers(replace(settings, **changes) if changes else settings)
    keys = changes.get("proxy_api_keys", settings.proxy_api_keys)
    try:
        client_keys(keys)
    except ValueError as exc:
        raise ConfigError(f"invalid PROXY_API_KEYS: {exc}") from None
    for name, wanted in (
        ("METRICS_REQUIRE_AUTH", settings.metrics_require_auth),
        ("CLIENT_MAX_CONCURRENT_REQUESTS", settings.client_max_concurrent_requests),
    ):
        if wanted and not keys:
            raise ConfigError(
                f"invalid {name}: it needs client keys; set PROXY_API_KEYS or PROXY_API_KEYS_FILE"
            )
    _check_tls(settings.tls_certfile, settings.tls_keyfile)
    if settings.workers < 1:
        raise ConfigError("invalid WORKERS: expected an integer >= 1")
    if not isinstance(settings.max_connections, int) or settings.max_connections < 0:
        raise ConfigError("invalid MAX_CONNECTIONS: expected an integer >= 0 (0: no cap)")
    if settings.max_retries > 10:
        raise ConfigError("invalid MAX_RETRIES: expected 0-10")
    if settings.health_error_rate_degraded > settings.health_error_rate_unhealthy:
        raise ConfigError(
            "invalid HEALTH_ERROR_RATE_DEGRADED: above HEALTH_ERROR_RATE_UNHEALTHY "
            f"({settings.health_error_rate_degraded:g} > {settings.health_error_rate_unhealthy:g})"
        )
    return replace(settings, **changes) if changes else settings


def _reparsed(settings: Settings) -> dict[str, Any]:
    """Values given already parsed (``create_app(**overrides)``, ``Settings(...)``) get the
    parsers' checks too: an empty host, a port out of range or an unknown log level would
    otherwise fail later, with a traceback or, for the host, not at all."""
    changes: dict[str, Any] = {}
    for name, value in (
        ("PROXY_HOST", settings.host),
        ("PROXY_PORT", str(settings.port)),
        ("LOG_LEVEL", settings.log_level),
        ("LOG_FORMAT", settings.log_format),
        ("LOG_REPEAT_WINDOW_SECONDS", str(settings.log_repeat_window_seconds)),
        ("FORWARDED_ALLOW_IPS", str(settings.forwarded_allow_ips)),
        ("FORWARDED_HEADER", settings.forwarded_header),
        ("OPENAI_API_KEY_HEADER", settings.api_key_header),
        ("ROOT_PATH", settings.root_path),
        *((("OPENAI_API_KEY", settings.api_key),) if settings.api_key else ()),
    ):
        attr, parsed = parse_setting(name, value)
        if parsed != getattr(settings, attr):
            changes[attr] = parsed
    return changes


def _check_tls(certfile: str | None, keyfile: str | None) -> None:
    """Both files or neither, and a pair that loads: a mistake stops the program before it
    serves, not at the first client's handshake."""
    if not certfile and not keyfile:
        return
    if not certfile or not keyfile:
        missing = "TLS_KEYFILE" if certfile else "TLS_CERTFILE"
        raise ConfigError(f"invalid {missing}: TLS needs both TLS_CERTFILE and TLS_KEYFILE")
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            f"invalid TLS_KEYFILE: {keyfile!r} is encrypted; give the key without a "
            "passphrase (hypercorn would ask for it on the terminal)"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"invalid TLS_CERTFILE/TLS_KEYFILE: cannot load {certfile!r} with {keyfile!r} "
            f"({reason})"
        ) from None


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    raise _EncryptedKey  # only called for a key that has a passphrase


def _keys_from_file(path: str) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid PROXY_API_KEYS_FILE: cannot read {path!r} ({exc})") from None
    keys = parse_keys(text)
    if not keys:
        raise ConfigError(f"invalid PROXY_API_KEYS_FILE: {path!r} holds no key")
    return keys


def normalise_upstream_url(url: str) -> str:
    """Validate the backend base URL.

    A URL with no path gets ``/v1`` (where every OpenAI-compatible server lives); a URL
    with a path is used exactly as given, so ``.../v1beta/openai`` works. A query is kept
    and sent with every backend request (Azure OpenAI's ``?api-version=...``).
    """
    shown = redact_url(url)  # the URL's credentials never reach an error line
    try:
        parts = urlsplit(url.strip())
    except ValueError as exc:  # an unclosed "[" of an IPv6 address, say
        raise ConfigError(f"invalid OPENAI_API_BASE_URL {shown!r}: {exc}") from None
    if "@" in parts.path + parts.query + parts.fragment:
        # A password with an unencoded "/", "?" or "#" ends the host there: the rest of
        # it reads as a path (or the part before the "/" as a port), so it would be
        # printed and the wrong host asked. No base URL needs a literal "@" after its
        # host, so the URL is refused, and not shown: where its password ends is unknown.
        raise ConfigError(
            "invalid OPENAI_API_BASE_URL (not shown): an '@' after the host; percent-encode "
            "'/', '?', '#' and '@' in a user name or password (%2F, %3F, %23, %40), and "
            "'@' in the path or query (%40)"
        )
    if _BLANK_OR_CONTROL.search(url.strip()):
        # httpx sends "http://h o/v1" to the host "h%20o" and "/v1 x" as "/v1%20x": a
        # typo or a comment pasted in, which then failed at every request
        raise ConfigError(
            f"invalid OPENAI_API_BASE_URL {shown!r}: it holds a space or a control "
            "character (percent-encode one that belongs there: a space is %20)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"invalid OPENAI_API_BASE_URL {shown!r}: expected an http(s) URL such as "
            "http://127.0.0.1:8000/v1"
        )
    try:
        port = parts.port  # None when there is none; ValueError when not 0-65535
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(
            f"invalid OPENAI_API_BASE_URL {shown!r}: its port is not a number from 1 to 65535"
        )
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    if endpoint := next((e for e in _ENDPOINTS if path.endswith(e)), None):
        # the endpoint's whole URL, pasted from a backend's docs: every request went to
        # ".../chat/completions/chat/completions" and came back the backend's 404
        raise ConfigError(
            f"invalid OPENAI_API_BASE_URL {shown!r}: give the base URL, without {endpoint} "
            f"(such as {parts.scheme}://{_host_and_port(parts)}{path.removesuffix(endpoint)})"
        )
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{path}{query}"


# the API's endpoints, which no backend's base URL ends in ("/models" may: Azure AI's
# model inference endpoint is https://NAME.services.ai.azure.com/models)
_ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/responses")


def _host_and_port(parts: SplitResult) -> str:
    """The URL's host and port, without its userinfo (which is never shown)."""
    return parts.netloc.rpartition("@")[2]


_BLANK_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/?#]*@")
# For display, everything up to the URL's last "@": a password holding an unencoded "/",
# "?" or "#" runs past where the userinfo ends by the RFC, and hiding a path is harmless.
_SHOWN_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?.*@", re.DOTALL)


def redact_url(url: str) -> str:
    """``url`` with its userinfo (``user:password@``) shown as ``***@``: how a URL appears
    in log lines and errors."""
    return _SHOWN_USERINFO.sub(r"\1***@", url, count=1)


def url_credentials(url: str) -> tuple[str, ...]:
    """The secret in a URL's userinfo, as written and decoded, for the log filter: the
    password, or the user name when there is no password (a token given as user name).
    A bare user name is not masked everywhere: ``user`` would hide every such word."""
    match = _USERINFO.match(url.strip())
    if match is None:
        return ()
    userinfo = match.group(0).removeprefix(match.group(1) or "")[:-1]
    user, colon, password = userinfo.partition(":")
    secret = password if colon else user
    return tuple(dict.fromkeys(v for v in (secret, unquote(secret)) if v))


# a query parameter of the backend's URL that holds a credential: "?key=…" (Google's
# API keys), "?access_token=…", "?sig=…" (an Azure SAS signature), "?code=…" (Azure
# Functions). Sent with every request, shown in the startup line and in errors that quote
# the URL: its value is a secret. Others (api-version) are shown.
_CREDENTIAL_QUERY = re.compile(rf"{_CREDENTIAL_NAME.pattern}|^(?:sig|code)$", re.IGNORECASE)


def query_secrets(url: str) -> tuple[str, ...]:
    """The values of the credential parameters in ``url``'s query, as written and
    percent-decoded."""
    query = url.partition("?")[2].partition("#")[0]
    values: list[str] = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        if value and _CREDENTIAL_QUERY.search(unquote(name)):
            values += (value, unquote(value.replace("+", " ")))
    return tuple(dict.fromkeys(values))


def basic_credential(url: str) -> str | None:
    """What ``user:password@`` in ``url`` is sent to the backend as: the base64 of the
    decoded ``user:password`` in ``Authorization: Basic …`` (None without userinfo). One
    function for the header and for the masking, so what is masked is what is sent."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    if not (user or password):
        return None
    return base64.b64encode(f"{user}:{password}".encode()).decode()
