"""Errors in the caller's dialect.

``/api/*`` (Ollama) gets ``{"error": "<message>"}``; ``/v1/*`` (OpenAI) gets
``{"error": {"message", "type", "param", "code"}}``. Both the status and the message are
decided once, by a ProxyError, so every route agrees.
"""

from __future__ import annotations

import json
from typing import Any

# the types OpenAI's API itself writes (a wrong key and an unknown model are
# invalid_request_error there, told apart by their code)
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ProxyError(Exception):
    """An error with a status code and a message meant for the client."""

    status: int = 500
    quiet = False  # True: not logged when answered (it is still counted)
    code: str | None = None

    def __init__(
        self,
        message: str,
        status: int | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param
        self.headers = headers or {}


class BadRequest(ProxyError):
    status = 400
    code = "invalid_request"


class NotFound(ProxyError):
    status = 404
    code = "not_found"


class UpstreamUnavailable(ProxyError):
    """The backend could not be reached (connect error, refused, reset before a response)."""

    status = 502
    code = "upstream_unavailable"


class BadUpstreamResponse(ProxyError):
    """The backend answered 2xx with a body that is not what its API promises."""

    status = 502
    code = "bad_upstream_response"


class ServerBusy(ProxyError):
    """More proxy requests in flight than ``MAX_CONCURRENT_REQUESTS``: come back shortly."""

    status = 503
    code = "server_busy"
    quiet = True  # counted in the metrics; a log line per refusal would add to the load

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the proxy is serving its limit of {limit} requests (MAX_CONCURRENT_REQUESTS); "
            "retry shortly",
            headers={"Retry-After": "1"},
        )


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"


class UpstreamStatusError(ProxyError):
    """The backend answered with an error status; we keep its status and its message."""

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        status: int,
        *,
        body: bytes = b"",
        content_type: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, status, headers=headers)
        self.body = body
        self.content_type = content_type


def body_too_large_message(limit: int | None) -> str:
    return f"request body is larger than the limit of {limit} bytes"


def openai_error_type(status: int) -> str:
    if status in OPENAI_ERROR_TYPES:
        return OPENAI_ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def ollama_error_body(message: str) -> bytes:
    # a lone surrogate (a client's "\ud800" quoted back in the message) has no UTF-8
    # spelling: it is kept as the JSON escape it came as, never a 500
    try:
        return json.dumps({"error": message}, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps({"error": message}).encode()


def openai_error_payload(
    message: str, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": openai_error_type(status),
            "param": param,
            "code": code,
        }
    }


def openai_error_body(
    message: str, status: int, *, code: str | None = None, param: str | None = None
) -> bytes:
    payload = openai_error_payload(message, status, code=code, param=param)
    try:
        return json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate a backend quoted back: kept as its escape
        return json.dumps(payload).encode()


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_body_for(
    path: str, message: str, status: int, *, code: str | None = None, param: str | None = None
) -> bytes:
    if is_openai_path(path):
        return openai_error_body(message, status, code=code, param=param)
    return ollama_error_body(message)


def upstream_error_message(body: bytes, status: int) -> str:
    """Pull a human message out of the many error shapes backends use."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        payload = None
    message: Any = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error.get("msg")
        elif isinstance(error, str):
            message = error
        if not message:
            message = payload.get("detail") or payload.get("message")
        if isinstance(message, list | dict):
            message = json.dumps(message, ensure_ascii=False)
    if not message:
        text = body.decode("utf-8", "replace").strip()
        message = text[:500] if text else f"backend returned HTTP {status}"
    return f"{message}"


def scrub(text: str, secret: str | None) -> str:
    """Remove a secret (the upstream API key) from any text that leaves the process."""
    if secret and len(secret) >= 4 and secret in text:
        return text.replace(secret, "***")
    return text


class SecretMask:
    """Masks a secret in a body that arrives in pieces, also where a piece ends inside it.

    ``feed`` returns what can go out now: the secret's complete occurrences replaced by
    ``***`` (leftmost first, as ``bytes.replace``), minus the shortest tail that could
    still be the start of one; ``flush`` returns that tail when the body ends. Only a tail
    that *is* the start of the secret is held back, so ordinary reads pass whole and at
    once."""

    __slots__ = ("_held", "_secret")

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._held = b""

    def feed(self, piece: bytes) -> bytes:
        data = self._held + piece if self._held else piece
        secret = self._secret
        done = b""
        if secret in data:
            end = _after_last_match(data, secret)
            done, data = data[:end].replace(secret, b"***"), data[end:]
        cut = _partial_start(data, secret)
        self._held = data[cut:]
        return done + data[:cut] if cut else done

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def _after_last_match(data: bytes, secret: bytes) -> int:
    """Where the last of the secret's leftmost-first occurrences in ``data`` ends."""
    end = 0
    found = data.find(secret)
    while found != -1:
        end = found + len(secret)
        found = data.find(secret, end)
    return end


def _partial_start(data: bytes, secret: bytes) -> int:
    """The start of the longest tail of ``data`` that is a proper prefix of the secret
    (``len(data)`` if none)."""
    first = secret[:1]
    at = data.find(first, max(0, len(data) - len(secret) + 1))
    while at != -1:
        if secret.startswith(data[at:]):
            return at
        at = data.find(first, at + 1)
    return len(data)
