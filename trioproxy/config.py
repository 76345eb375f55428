"""Settings: one frozen object built from CLI flags, the environment and a ``.env`` file.

Precedence: CLI flag > environment > ``.env`` in the working directory > default.
Every setting is documented in docs/configuration.md.
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dotenv import dotenv_values

from .auth import client_keys, parse_keys
from .model_mapping import MappingFileError, load_mapping_file

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ENV_FILE_VARIABLE = "TRIOPROXY_ENV_FILE"
"""Names the dotenv file ``create_app()`` reads when it builds its own settings (default
``.env``; empty for none). ``--workers`` sets it for its workers to the ``--env-file``."""
WORKER_VARIABLE = "TRIOPROXY_WORKER"
"""``1`` in the hypercorn workers that ``--workers N`` starts (see ``app.create_app``)."""


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the setting to fix."""


@dataclass(frozen=True, slots=True)
class Settings:
    upstream_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 11434
    workers: int = 1
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = False
    demo: bool = False
    demo_token_delay: float = 0.02
    request_timeout: float = 600.0
    connect_timeout: float = 10.0
    stream_first_token_timeout: float = 300.0
    stream_idle_timeout: float = 120.0
    max_retries: int = 3
    retry_backoff: float = 0.25
    retry_backoff_max: float = 8.0
    model_mapping_file: str | None = None
    model_mapping: Mapping[str, str] = field(default_factory=dict)
    max_request_bytes: int = 64 * 1024 * 1024
    max_concurrent_requests: int = 2048
    upstream_clients: int = 64
    upstream_max_keepalive: int = 256
    disable_ssl_verification: bool = False
    ready_check_interval: float = 10.0
    metrics_enabled: bool = True
    metrics_max_requests: int = 1000
    metrics_model_labels: int = 50
    system_metrics_enabled: bool = True
    system_metrics_interval: float = 5.0
    health_error_rate_degraded: float = 0.1  # the guide's and the replaced proxy's
    health_error_rate_unhealthy: float = 0.25
    health_p95_degraded_seconds: float = 30.0
    health_min_requests: int = 1
    graceful_timeout: float = 5.0
    keep_alive_timeout: float = 5.0
    cors_origins: str = ""
    proxy_api_keys: tuple[str, ...] = field(default=(), repr=False)
    proxy_api_keys_file: str | None = None
    metrics_require_auth: bool = False
    client_max_concurrent_requests: int = 0
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    env_file: str | None = field(default=None, compare=False)  # the dotenv file read, if any

    @property
    def secrets(self) -> tuple[str, ...]:
        """What log lines must never show: the backend's key and the clients' keys."""
        return (self.api_key or "", *(key for _, key in client_keys(self.proxy_api_keys)))

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


def _positive_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"expected a number of seconds >= 0, got {value!r}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"expected an integer >= 1, got {value!r}")
    return number


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise ValueError(f"expected a fraction between 0 and 1, got {value!r}")
    return number


def _port(value: str) -> int:
    number = int(value)
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


_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "OPENAI_API_BASE_URL": ("upstream_url", _text),
    "OPENAI_API_KEY": ("api_key", _text),
    "PROXY_HOST": ("host", _text),
    "PROXY_PORT": ("port", _port),
    "WORKERS": ("workers", _positive_int),
    "LOG_LEVEL": ("log_level", _log_level),
    "LOG_FORMAT": ("log_format", _log_format),
    "ACCESS_LOG": ("access_log", _bool),
    "DEMO_TOKEN_DELAY": ("demo_token_delay", _non_negative_float),
    "REQUEST_TIMEOUT": ("request_timeout", _positive_float),
    "CONNECT_TIMEOUT": ("connect_timeout", _positive_float),
    "STREAM_FIRST_TOKEN_TIMEOUT": ("stream_first_token_timeout", _positive_float),
    "STREAM_IDLE_TIMEOUT": ("stream_idle_timeout", _positive_float),
    "MAX_RETRIES": ("max_retries", _non_negative_int),
    "RETRY_BACKOFF": ("retry_backoff", _non_negative_float),
    "RETRY_BACKOFF_MAX": ("retry_backoff_max", _non_negative_float),
    "MODEL_MAPPING_FILE": ("model_mapping_file", _text),
    "MAX_REQUEST_BYTES": ("max_request_bytes", _positive_int),
    "MAX_CONCURRENT_REQUESTS": ("max_concurrent_requests", _positive_int),
    "UPSTREAM_CLIENTS": ("upstream_clients", _positive_int),
    "UPSTREAM_MAX_KEEPALIVE": ("upstream_max_keepalive", _positive_int),
    "DISABLE_SSL_VERIFICATION": ("disable_ssl_verification", _bool),
    "READY_CHECK_INTERVAL": ("ready_check_interval", _positive_float),
    "METRICS_ENABLED": ("metrics_enabled", _bool),
    "METRICS_MAX_REQUESTS": ("metrics_max_requests", _positive_int),
    "METRICS_MODEL_LABELS": ("metrics_model_labels", _non_negative_int),
    "SYSTEM_METRICS_ENABLED": ("system_metrics_enabled", _bool),
    "SYSTEM_METRICS_INTERVAL": ("system_metrics_interval", _positive_float),
    "HEALTH_ERROR_RATE_DEGRADED": ("health_error_rate_degraded", _fraction),
    "HEALTH_ERROR_RATE_UNHEALTHY": ("health_error_rate_unhealthy", _fraction),
    "HEALTH_P95_DEGRADED_SECONDS": ("health_p95_degraded_seconds", _positive_float),
    "HEALTH_MIN_REQUESTS": ("health_min_requests", _positive_int),
    "GRACEFUL_TIMEOUT": ("graceful_timeout", _positive_float),
    "KEEP_ALIVE_TIMEOUT": ("keep_alive_timeout", _positive_float),
    "CORS_ORIGINS": ("cors_origins", _text),
    "PROXY_API_KEYS": ("proxy_api_keys", parse_keys),
    "PROXY_API_KEYS_FILE": ("proxy_api_keys_file", _text),
    "METRICS_REQUIRE_AUTH": ("metrics_require_auth", _bool),
    "CLIENT_MAX_CONCURRENT_REQUESTS": ("client_max_concurrent_requests", _non_negative_int),
    "TLS_CERTFILE": ("tls_certfile", _text),
    "TLS_KEYFILE": ("tls_keyfile", _text),
}

ENV_NAMES: tuple[str, ...] = tuple(_ENV)


def read_environment(
    environ: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike[str] | None = ".env"
) -> dict[str, str]:
    """Merge ``.env`` (if present) under the process environment; only known names."""
    merged: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        for key, value in dotenv_values(dotenv_path).items():
            if key in _ENV and value is not None:
                merged[key] = value
    source = os.environ if environ is None else environ
    for key in _ENV:
        if key in source:
            merged[key] = source[key]
    return merged


_OPTIONAL_TEXT = (
    "upstream_url",
    "api_key",
    "model_mapping_file",
    "proxy_api_keys_file",
    "tls_certfile",
    "tls_keyfile",
)


def load_settings(
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike[str] | None = ".env",
    **overrides: Any,
) -> Settings:
    """Build and validate settings. Raises ConfigError naming the offending setting."""
    values: dict[str, Any] = {}
    for name, raw in read_environment(environ, dotenv_path).items():
        attr, parse = _ENV[name]
        if raw.strip() == "" and attr in _OPTIONAL_TEXT:
            continue
        try:
            values[attr] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"invalid {name}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    if dotenv_path is not None and Path(dotenv_path).is_file():
        values["env_file"] = str(dotenv_path)
    settings = Settings(**values)
    return _validated(settings)


def _validated(settings: Settings) -> Settings:
    changes: dict[str, Any] = {}
    if settings.upstream_url:
        changes["upstream_url"] = normalise_upstream_url(settings.upstream_url)
    if settings.model_mapping_file:
        try:
            changes["model_mapping"] = load_mapping_file(settings.model_mapping_file)
        except MappingFileError as exc:
            raise ConfigError(f"invalid MODEL_MAPPING_FILE: {exc}") from None
    if settings.proxy_api_keys_file:
        changes["proxy_api_keys"] = settings.proxy_api_keys + _keys_from_file(
            settings.proxy_api_keys_file
        )
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
    if settings.max_retries > 10:
        raise ConfigError("invalid MAX_RETRIES: expected 0-10")
    if settings.health_error_rate_degraded > settings.health_error_rate_unhealthy:
        raise ConfigError(
            "invalid HEALTH_ERROR_RATE_DEGRADED: above HEALTH_ERROR_RATE_UNHEALTHY "
            f"({settings.health_error_rate_degraded:g} > {settings.health_error_rate_unhealthy:g})"
        )
    return replace(settings, **changes) if changes else settings


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
    with a path is used exactly as given, so ``.../v1beta/openai`` works.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"invalid OPENAI_API_BASE_URL {url!r}: expected an http(s) URL such as "
            "http://127.0.0.1:8000/v1"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        raise ConfigError(f"invalid OPENAI_API_BASE_URL {url!r}: bad port") from None
    path = parts.path.rstrip("/")
    if not path:
        path = "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"
