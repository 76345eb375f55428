"""Errors in the caller's dialect.

``/api/*`` (Ollama) gets ``{"error": "<message>"}``; ``/v1/*`` (OpenAI) gets
``{"error": {"message", "type", "param", "code"}}``. Both the status and the message are
decided once, by a ProxyError, so every route agrees.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, AnyStr

from .content_coding import codings_of
from .jsonutil import loads
from .metrics.labels import clipped, scrubbed_head

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


class CodedRequestBody(ProxyError):
    """A request body sent in a Content-Encoding (gzip...): the proxy reads every body
    (model, stream, messages) and decodes none, as Ollama does not: a 415 that says so
    (RFC 9110 15.5.16) rather than "invalid JSON"."""

    status = 415
    code = "unsupported_media_type"

    @classmethod
    def refusing(cls, header: str | None) -> CodedRequestBody | None:
        """The refusal of a body sent in ``header``'s codings; None for none (or
        ``identity``, which changes nothing)."""
        codings = codings_of(header) if header else None
        if not codings:
            return None
        return cls(
            f"the request body is sent in Content-Encoding {', '.join(codings)[:64]!r}: "
            "send it uncompressed (no Content-Encoding)",
            headers={"Accept-Encoding": "identity"},  # RFC 9110 12.5.3: what would be read
        )


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


class OutOfFiles(ProxyError):
    """The proxy could not open a connection to the backend because it has run out of
    file descriptors (EMFILE/ENFILE): its own exhaustion, not the backend's failure, so a
    503 to come back shortly (not a 502, which blames the backend) that names the limit,
    and not a failed backend call in the metrics or the UpstreamErrors alert."""

    status = 503
    code = "server_busy"

    def __init__(self, error: OSError, limit: int) -> None:
        reached = (
            "the system has reached its limit of open files (fs.file-max)"
            if error.errno == errno.ENFILE
            else f"it has reached its limit of open files ({limit}, RLIMIT_NOFILE)"
        )
        super().__init__(
            f"the proxy cannot open a connection to the backend: {reached}; retry shortly",
            headers={"Retry-After": "1"},
        )


class MetricsUnavailable(ProxyError):
    """A metrics read whose shared rendering ran past its bound (``metrics/reads.py``):
    the proxy's own monitoring is slow or stuck, not the request wrong: a 503 to retry."""

    status = 503
    code = "metrics_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


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


_SHOWN_NAME_CHARS = 256


def shown_name(name: str) -> str:
    """A client's name as an error quotes it: a 20 MB model name must not come back whole."""
    if len(name) <= _SHOWN_NAME_CHARS:
        return name
    return f"{name[:_SHOWN_NAME_CHARS]}… ({len(name):,} characters)"


# The most of a message an error the proxy writes holds, in bytes of UTF-8: a backend's
# error message (a stream's error event may be hundreds of MB) or an exception's words
# that quote what it sent are cut there, with a "... [N more bytes]" note. The message's
# start, which says what went wrong, is kept; a backend's own error object relayed on
# /v1/* is bounded by MAX_ERROR_BODY (upstream.py) instead.
MESSAGE_BYTES = 4096
_NOTE_ROOM = 64  # left for the note, so that a message cut once is never cut again


def bounded(message: str) -> str:
    """``message`` cut to MESSAGE_BYTES, never inside a character or a ``***``. Cut after
    the backend's secrets are scrubbed from it, never before: a secret the cut splits
    would keep its first half, which no scrubbing finds any more."""
    if len(message) <= MESSAGE_BYTES // 4:  # no character takes more than 4 bytes
        return message
    message = scrubbed_head(message, str, 0, 2 * MESSAGE_BYTES)  # not encoded whole
    if len(message.encode("utf-8", "surrogatepass")) <= MESSAGE_BYTES:
        return message  # (a note included: clipped counts none)
    return clipped(message, MESSAGE_BYTES - _NOTE_ROOM)


def body_too_large_message(limit: int | None) -> str:
    return f"request body is larger than the limit of {limit} bytes"


def openai_error_type(status: int) -> str:
    if status in OPENAI_ERROR_TYPES:
        return OPENAI_ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def ollama_error_body(message: str) -> bytes:
    # a lone surrogate (a client's "\ud800" quoted back in the message) has no UTF-8
    # spelling: it is kept as the JSON escape it came as, never a 500
    message = bounded(message)
    try:
        return json.dumps({"error": message}, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps({"error": message}).encode()


def openai_error_payload(
    message: str, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": bounded(message),
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
    """The OpenAI API's paths (``/v1/*``), the Anthropic Messages API's aside."""
    return path.startswith("/v1/") and not is_anthropic_path(path)


ANTHROPIC_PATH = "/v1/messages"

# The error types Anthropic's API writes, by status (the anthropic SDK picks its exception
# class by the status; Claude Code reads the type)
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def is_anthropic_path(path: str) -> bool:
    """The Anthropic Messages API's paths: ``/v1/messages`` and those below it."""
    return path.startswith(ANTHROPIC_PATH) and (
        len(path) == len(ANTHROPIC_PATH) or path[len(ANTHROPIC_PATH)] == "/"
    )


def anthropic_error_payload(message: str, status: int) -> dict[str, Any]:
    kind = ANTHROPIC_ERROR_TYPES.get(status)
    if kind is None:
        kind = "api_error" if status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": kind, "message": bounded(message)}}


def _utf8_json(payload: Any) -> bytes:
    # a lone surrogate a client or backend quoted back has no UTF-8 spelling: kept as its escape
    try:
        return json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(payload).encode()


def error_body_for(
    path: str, message: str, status: int, *, code: str | None = None, param: str | None = None
) -> bytes:
    if is_anthropic_path(path):
        return _utf8_json(anthropic_error_payload(message, status))
    if is_openai_path(path):
        return openai_error_body(message, status, code=code, param=param)
    return ollama_error_body(message)


def upstream_error_message(body: bytes, status: int) -> str:
    """Pull a human message out of the many error shapes backends use."""
    try:
        payload = loads(body)  # a ValueError, never RecursionError, for a deep body
    except ValueError:
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
            message = _as_text(message)
    if not message:
        # whole: cut before the caller scrubs it, a key across the cut would keep its start
        # (every message the proxy writes is bounded after the scrubbing)
        text = body.decode("utf-8", "replace").strip()
        message = text or f"backend returned HTTP {status}"
    return f"{message}"


def _as_text(detail: list[Any] | dict[str, Any]) -> str | None:
    """A structured error detail as JSON text; None when too deep to write (the body's
    own text is the message then)."""
    try:
        return json.dumps(detail, ensure_ascii=False)
    except RecursionError:
        return None


# Secrets shorter than this are not scrubbed from text: a 3-letter "key" would hide words.
MIN_SECRET_SCRUBBED = 4
# The shortest secret masked in reply bodies. Local backends are given placeholder keys
# ("ollama", "EMPTY", "dummy", "lm-studio", "not-needed"), words a model may well write:
# masking those would corrupt answers and protect nothing. Error messages and logs are
# scrubbed of any secret of MIN_SECRET_SCRUBBED characters or more.
MIN_SECRET_MASKED_IN_REPLIES = 12


@dataclass(frozen=True, slots=True)
class BackendSecrets:
    """Every secret the proxy sends to the backend, in every form a backend's answer may
    quote it, built once from the settings (``Settings.backend_secrets``). One object, so
    a masking site cannot mask one credential and forget another.

    ``texts``: scrubbed from error messages and log lines (longest first, so a secret that
    contains another is replaced whole). ``replies``: masked in reply bodies, and in what
    a backend's answer gives the metrics (a model name)."""

    texts: tuple[str, ...] = ()
    replies: tuple[bytes, ...] = ()
    # the replies as one pattern, compiled once (None without replies)
    pattern: re.Pattern[bytes] | None = field(init=False, default=None, compare=False)
    # the replies as a stream mask looks for them (None without replies)
    trie: SecretsTrie | None = field(init=False, default=None, compare=False)
    # every JSON spelling of the replies (None without replies), and of the texts
    spelled: Spellings | None = field(init=False, default=None, compare=False)
    spelled_texts: re.Pattern[str] | None = field(init=False, default=None, compare=False)
    # the most characters a text's spelling takes (each character at most 14: a surrogate
    # pair's escapes, escaped again): how far past a cut the whole of one may reach
    margin: int = field(init=False, default=0, compare=False)

    def __post_init__(self) -> None:
        # frozen: set once, here
        if self.replies:
            object.__setattr__(self, "pattern", _alternatives(self.replies))
            object.__setattr__(self, "trie", SecretsTrie.of(self.replies))
            object.__setattr__(self, "spelled", Spellings.of(self.replies))
        if self.texts:
            object.__setattr__(self, "spelled_texts", _spelled_alternatives(self.texts))
            object.__setattr__(self, "margin", 16 * max(map(len, self.texts)))

    @classmethod
    def of(cls, *secrets: str) -> BackendSecrets:
        forms = {form for secret in secrets if secret for form in _quoted_forms(secret)}
        texts = sorted((f for f in forms if len(f) >= MIN_SECRET_SCRUBBED), key=len, reverse=True)
        replies = tuple(f.encode() for f in texts if len(f) >= MIN_SECRET_MASKED_IN_REPLIES)
        return cls(tuple(texts), replies)

    def scrub(self, text: str) -> str:
        for secret in self.texts:
            if secret in text:
                text = text.replace(secret, "***")
        # a relayed error body may spell a secret with JSON escapes, which decode to it
        if self.spelled_texts is not None and "\\" in text:
            text = _masked_at_boundaries(self.spelled_texts, text, "***")
        return text

    def mask_body(self, body: bytes) -> bytes:
        """``body`` with every reply secret replaced by ``***``, in every spelling a JSON
        string may give it (:class:`Spellings`): what :meth:`stream_mask` gives for the
        same body, however its reads split it."""
        spelled = self.spelled
        if spelled is None:
            return body
        if spelled.escape in body:
            return _masked_at_boundaries(spelled.pattern, body, b"***")
        # no escape: the secrets can only be there as they are
        replies = self.replies
        if len(replies) == 1:
            return body.replace(replies[0], b"***") if replies[0] in body else body
        assert self.pattern is not None  # set with the replies
        return self.pattern.sub(b"***", body)

    def mask_text(self, text: str) -> str:
        """``text`` masked as a reply body is (:meth:`mask_body`): for what a backend says
        that leaves another way, such as a model name that becomes a metrics label."""
        if not self.replies:
            return text
        raw = text.encode("utf-8", "surrogatepass")
        return self.mask_body(raw).decode("utf-8", "surrogatepass")

    def stream_mask(self) -> SecretsMask:
        """A mask for one body that arrives in pieces: a read without a backslash (so
        without a JSON escape) costs one search of one pattern, however many secrets."""
        return SecretsMask(self.replies, self.pattern, self.spelled, self.trie)


NO_SECRETS = BackendSecrets()


def _quoted_forms(secret: str) -> tuple[str, ...]:
    """``secret`` as a backend may quote it: as is, and inside a JSON string (escaped,
    with ``ensure_ascii`` or not, and with ``/`` as ``\\/`` as PHP writes it: base64 holds
    slashes). Bodies are masked as they come, undecoded, so each form must be masked."""
    escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
    forms = (secret, escaped, json.dumps(secret)[1:-1], escaped.replace("/", "\\/"))
    return tuple(dict.fromkeys(forms))


def _alternatives(secrets: tuple[bytes, ...]) -> re.Pattern[bytes]:
    # longest first: where two secrets start at one place, the longer is masked whole
    ordered = sorted(secrets, key=len, reverse=True)
    return re.compile(b"|".join(re.escape(s) for s in ordered))


@dataclass(frozen=True, slots=True)
class SecretsTrie:
    """Some secrets as a stream mask looks for them in a read: one pattern, the secrets'
    trie, that finds the first place where a secret starts whole (the longest there) or
    where the read ends inside one (a tail to hold back for the next read). Where a read
    may end inside a longer secret, that comes first: the shorter is not yet final.

    One search of one pattern per read, however many secrets: looking for each secret's
    partial start in turn cost about 0.7 µs per secret per read. ``prefixes``: the
    proper prefixes of the secrets, which a match that ends the read is when held."""

    search: re.Pattern[bytes]
    prefixes: frozenset[bytes]

    @classmethod
    def of(cls, secrets: tuple[bytes, ...]) -> SecretsTrie:
        prefixes = frozenset(s[:end] for s in secrets for end in range(1, len(s)))
        return cls(re.compile(_trie_source(list(secrets), top=True)), prefixes)


def _trie_source(rests: list[bytes], top: bool = False) -> bytes:
    """A pattern for ``rests`` (what follows one node of the secrets' trie): a child
    first (the longer secret), then the end of the data (held back), then the end of a
    secret, if one ends here. The top level begins with a literal byte per branch, so
    ``re`` skips to those bytes before it tries one."""
    ends_here = b"" in rests
    children: dict[bytes, list[bytes]] = {}
    for rest in rests:
        if rest:
            children.setdefault(rest[:1], []).append(rest[1:])
    branches = [re.escape(byte) + _trie_source(more) for byte, more in sorted(children.items())]
    if top:
        return b"|".join(branches)
    if not branches:
        return b""  # a secret ends here, and no other goes on
    return b"(?:" + b"|".join([*branches, b"\\Z"]) + (b"|)" if ends_here else b")")


# JSON's two-character escapes (RFC 8259 section 7): a secret holding one of these
# characters may be written with it (any "/" as "\/", as PHP writes it: base64 holds "/")
_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "/": "\\/",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _char_spellings(char: str) -> tuple[str, ...]:
    """Every way a JSON string may write ``char``, longest first: its ``\\u`` escape (a
    surrogate pair past U+FFFF; hex in lower case here, a backend may write either), its
    two-character escape if it has one, and itself; and each escape escaped again, as it
    is in a JSON document quoted in another's string (an error body whose message is the
    JSON a gateway got: ``\\\\u0073``, which a client decoding both reads as ``s``)."""
    units = char.encode("utf-16-be", "surrogatepass")
    escape = "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
    short = _SHORT_ESCAPES.get(char)
    escapes = (escape, short) if short else (escape,)
    again = tuple(form for once in escapes for form in _escaped_again(once))
    return tuple(sorted({*again, *escapes, char}, key=len, reverse=True))


def _escaped_again(escape: str) -> tuple[str, ...]:
    """A JSON escape as a JSON encoder writes it inside a string: its backslash (and a
    quote) escaped, a ``/`` as itself or as ``\\/``."""
    again = escape.replace("\\", "\\\\").replace('"', '\\"')
    return (again, again.replace("/", "\\/")) if "/" in again else (again,)


def _spelling_source(secret: str) -> str:
    """A pattern for every spelling of ``secret`` in a JSON string: each character as any
    of :func:`_char_spellings`, mixed anyhow. An alternative per spelling of the first
    character, each starting with a byte (not a group), lets ``re`` skip to those bytes
    before it tries one: several times faster on reads full of other escapes."""
    rest = "".join(f"(?:{'|'.join(_char_sources(char))})" for char in secret[1:])
    return "|".join(first + rest for first in _char_sources(secret[0]))


def _char_sources(char: str) -> list[str]:
    # "\u006b" and "\u006B" decode alike
    return [
        re.sub("[a-f]", lambda d: f"[{d[0]}{d[0].upper()}]", re.escape(s))
        if "\\u" in s
        else re.escape(s)
        for s in _char_spellings(char)
    ]


def _spelled_alternatives(texts: tuple[str, ...]) -> re.Pattern[str]:
    # longest first, as the plain alternatives
    ordered = sorted(texts, key=len, reverse=True)
    return re.compile("|".join(_spelling_source(text) for text in ordered))


def _masked_at_boundaries(pattern: re.Pattern[AnyStr], data: AnyStr, stars: AnyStr) -> AnyStr:
    """``data`` (bytes or str) with ``pattern``'s spellings replaced by ``stars`` where one
    starts a character of the JSON string: a spelling found after an odd run of
    backslashes starts inside an escape (``\\\\u0073…`` is a backslash and ``u0073…``),
    and replacing it from there would leave a lone backslash, invalid JSON."""
    out: list[AnyStr] = []
    pos = 0
    for match in _boundary_matches(pattern, data, 0, len(data)):
        out += (data[pos : match.start()], stars)
        pos = match.end()
    if not out:
        return data
    out.append(data[pos:])
    return stars[:0].join(out)


def _boundary_matches(
    pattern: re.Pattern[AnyStr], data: AnyStr, pos: int, end: int
) -> Iterator[re.Match[AnyStr]]:
    """``pattern``'s matches in ``data[pos:]`` that start before ``end``, each at a
    character of the JSON string (:func:`_masked_at_boundaries`), leftmost first."""
    backslash = _BACKSLASH if isinstance(data, bytes) else "\\"
    match = pattern.search(data, pos)
    while match is not None and match.start() < end:
        at = match.start()
        run = at
        while run and data[run - 1] == backslash:
            run -= 1
        if (at - run) % 2:  # inside an escape: a later start may be a character
            match = pattern.search(data, at + 1)
            continue
        yield match
        match = pattern.search(data, match.end())


# per character of a secret: its spellings, each with whether its hex is either case
_CharSpellings = tuple[tuple[bytes, bool], ...]


@dataclass(frozen=True, slots=True)
class Spellings:
    """Every spelling a JSON string may give some secrets: each character as itself, as its
    ``\\uXXXX`` escape (hex in either case) or as its two-character escape (``\\/``), or
    as such an escape escaped again (``\\\\u0073``), mixed anyhow. Valid JSON a client
    decodes to the secret, so each is masked; bodies are masked as they come, undecoded.
    Built once, with the secrets.

    A read without ``escape`` can only hold a secret whole as it is (``escape`` is ``\\u``
    unless a secret holds a character with a two-character escape, the ``/`` of base64:
    ``\\`` then); one without a backslash cannot end inside a spelling either: the masks
    look no further."""

    pattern: re.Pattern[bytes]  # any spelling of any secret, longest secret first
    plain: re.Pattern[bytes]  # the secrets as they are, longest first
    chars: tuple[tuple[_CharSpellings, ...], ...]  # per secret
    firsts: tuple[bytes, ...]  # the bytes a spelling can start with
    inside: bytes  # a translation table: 1 for a byte a spelling may hold, 0 for others
    escape: bytes
    reach: int  # the longest spelling's length less one: how far a read may end inside one

    @classmethod
    def of(cls, secrets: tuple[bytes, ...]) -> Spellings:
        texts = sorted((secret.decode() for secret in secrets), key=len, reverse=True)
        pattern = re.compile("|".join(_spelling_source(text) for text in texts).encode())
        chars = tuple(
            tuple(tuple((s.encode(), "\\u" in s) for s in _char_spellings(char)) for char in text)
            for text in texts
        )
        spelled = {s for secret in chars for char in secret for s, _ in char}
        held = set(b"".join(spelled) + b"".join(spelled).upper())  # hex in either case
        inside = bytes(int(byte in held) for byte in range(256))
        firsts = tuple(dict.fromkeys([b"\\", *(text[0].encode()[:1] for text in texts)]))
        short = any(char in _SHORT_ESCAPES for text in texts for char in text)
        longest = max(sum(len(char[0][0]) for char in secret) for secret in chars)
        plain = _alternatives(secrets)
        escape = b"\\" if short else b"\\u"
        return cls(pattern, plain, chars, firsts, inside, escape, longest - 1)

    def tail_start(self, data: bytes, lo: int = 0) -> int:
        """The start of the longest tail of ``data[lo:]`` that is a proper prefix of a
        spelling of a secret (``len(data)`` if none). An offset, not a slice: a read full
        of secrets asks once per secret, and copying its rest each time was quadratic."""
        start = max(lo, len(data) - self.reach)
        # such a tail holds only bytes a spelling may hold: none of an SSE event's "\n\n"
        start += data[start:].translate(self.inside).rfind(b"\0") + 1
        best = len(data)
        for first in self.firsts:
            at = data.find(first, start, best)
            while at != -1:
                if any(_ends_inside(data, at, secret) for secret in self.chars):
                    best = at
                    break
                at = data.find(first, at + 1, best)
        return best


# an int: ``in`` finds one in a read some ten times faster than the one-byte b"\\"
_BACKSLASH = ord("\\")
# a body or stream chunk searched for the secrets' spellings in one call up to this size;
# a larger one in pieces of it, the loop serving between them (exchange.fed_in_pieces)
MASKED_AT_ONCE_BYTES = 64 * 1024


def _ends_inside(data: bytes, at: int, chars: tuple[_CharSpellings, ...]) -> bool:
    """Whether ``data[at:]`` is a proper prefix of a spelling whose characters spell as
    ``chars``. Several places at once: ``\\`` may be written as itself or as ``\\\\``."""
    places = {at}
    for spellings in chars:
        following = set()
        for place in places:
            for spelling, either_case in spellings:
                piece = data[place : place + len(spelling)]
                if (piece.lower() if either_case else piece) != spelling[: len(piece)]:
                    continue
                if len(piece) < len(spelling):
                    return True  # the data ends inside this character's spelling
                following.add(place + len(spelling))
        if not following:
            return False
        places = following
    return False  # a whole spelling: the pattern's to find


# the characters of a text :func:`scrub` scrubs whole: more than any body it scrubs that
# is relayed whole (a status error's, MAX_ERROR_BODY), far more than any message shows
SCRUBBED_WHOLE = 256 * 1024


def scrub(text: str, secrets: BackendSecrets) -> str:
    """Remove the backend's secrets from any text that leaves the process: a text longer
    than SCRUBBED_WHOLE (a backend's error event of MBs) cut first, with the note of a cut
    (:func:`~trioproxy.metrics.labels.scrubbed_head`), so its scrubbing is bounded."""
    return scrubbed_head(text, secrets.scrub, secrets.margin, SCRUBBED_WHOLE)


def _masked_spellings(data: bytes, spelled: Spellings) -> tuple[bytes, bytes]:
    """A read holding a backslash (the held tail included), as the stream mask masks it:
    what goes out, and the tail held for the next read. From the first place where the
    body so far may end inside a spelling, the whole body may hold a longer or an earlier
    secret than this read does: held, with any backslashes just before it, so the next
    read starts at a character of the JSON string (an escape is never cut from its
    backslash, which decides whether what follows is a character or part of an escape)."""
    # without the escape the secrets' spellings need, they can only be whole as they are
    pattern = spelled.pattern if data.find(spelled.escape) != -1 else spelled.plain
    out: list[bytes] = []
    pos = 0
    while True:
        cut = spelled.tail_start(data, pos)
        match = next(_boundary_matches(pattern, data, pos, cut), None)
        if match is None:
            break
        out += (data[pos : match.start()], b"***")
        pos = match.end()
    while cut > pos and data[cut - 1] == _BACKSLASH:
        cut -= 1
    out.append(data[pos:cut])
    return b"".join(out), data[cut:]


class SecretsMask:
    """Masks secrets (the API key, the URL's credentials, an UPSTREAM_HEADERS credential)
    in a body that arrives in pieces, also where a piece ends inside one: the reads'
    outputs add up to what masking the whole body gives (:meth:`BackendSecrets.mask_body`),
    and only a tail that could start a secret is held back, so ordinary reads pass whole
    and at once; ``flush`` returns that tail when the body ends.

    A match is final only where the body so far does not end inside a secret started
    before it or at it: with ``abc`` and ``abcdef`` both secret, a read that ends in
    ``abc`` waits for the next. Secrets are masked in every spelling a JSON string may
    give them (:class:`Spellings`); a read without a backslash costs one search of one
    pattern (:class:`SecretsTrie`) and a look for one byte."""

    __slots__ = ("_held", "_pattern", "_spelled", "_trie")

    def __init__(
        self,
        secrets: tuple[bytes, ...],
        pattern: re.Pattern[bytes] | None = None,
        spelled: Spellings | None = None,
        trie: SecretsTrie | None = None,
    ) -> None:
        self._pattern = pattern if pattern is not None else _alternatives(secrets)
        self._spelled = spelled if spelled is not None else Spellings.of(secrets)
        self._trie = trie if trie is not None else SecretsTrie.of(secrets)
        self._held = b""

    def feed(self, piece: bytes) -> bytes | None:
        """What goes out of ``piece``; None, the mask unchanged, for a piece over
        MASKED_AT_ONCE_BYTES that holds a backslash: searching it for the spellings is one
        call into C that holds the loop (17 MB of JSON in JSON, a tool call's arguments:
        28-44 ms), so the caller feeds it again in pieces (``exchange.fed_in_pieces``).
        A read without one passes at a search per ~0.3 ns a byte, whatever its size."""
        data = self._held + piece if self._held else piece
        if _BACKSLASH in data:  # the held tail counts: an escape may straddle two reads
            if len(piece) > MASKED_AT_ONCE_BYTES:
                return None
            done, self._held = _masked_spellings(data, self._spelled)
            return done
        search = self._trie.search.search
        match = search(data)
        if match is None:
            self._held = b""
            return data  # the common read: nothing to mask, nothing to hold
        out: list[bytes] = []
        pos = 0
        cut = len(data)
        while match is not None:
            if match.end() == cut and match.group() in self._trie.prefixes:
                cut = match.start()  # the data ends inside a secret: held
                break
            out += (data[pos : match.start()], b"***")
            pos = match.end()
            match = search(data, pos)
        out.append(data[pos:cut])
        self._held = data[cut:]
        return b"".join(out)

    def flush(self) -> bytes:
        # what was held may hold a whole secret whose longer rival never came
        held, self._held = self._held, b""
        if _BACKSLASH in held:
            return _masked_at_boundaries(self._spelled.pattern, held, b"***")
        return self._pattern.sub(b"***", held)
