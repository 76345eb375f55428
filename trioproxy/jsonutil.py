"""JSON in and out of the proxy: every body and stream line we decode or write.

orjson (a maintained C-extension library) decodes and encodes the bodies several times
faster than the standard library, which matters twice per request and once per streamed
line. Where orjson refuses what the standard library accepts (``NaN``, non-string keys)
or decodes it inexactly (integers beyond 64 bits), the standard library answers instead,
so the proxy accepts every body it accepted before, and a client's malformed body gets
the standard library's error message. Output differs only in spelling that JSON leaves
open (``1e-05`` is written ``1e-5``) and in ``NaN``, which orjson writes as ``null``, the
valid JSON for it.

Depth: orjson reads 1,024 levels and writes 254; the standard library, which takes over
beyond either, recurses, so it reads and writes only as deep as the stack has room for
(about 900 levels here, fewer when called deep in a stack). Past those limits neither
:func:`loads` nor :func:`compact_json` lets a ``RecursionError`` out: both raise
:class:`NestedTooDeeply`, a ``ValueError``, so that every caller's handling of bad JSON
applies (a client's body is its 400, a backend's body the backend's 502), and a
``RecursionError`` left to reach the request handler is our own bug, not a deep body."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# a decoded JSON object, as the translation reads and builds them
JSONDict = dict[str, Any]

_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_COMPACT_ASCII = json.JSONEncoder(separators=(",", ":"))
# the line ends of str.splitlines that JSON writes unescaped, in UTF-8 and as JSON escapes
_RAW_LINE_SEPARATORS = tuple(
    (chr(code).encode(), b"\\u%04x" % code) for code in (0x85, 0x2028, 0x2029)
)


class NestedTooDeeply(ValueError):
    """JSON nested deeper than :func:`loads` can read or :func:`compact_json` can write
    (see the module's docstring): bad JSON to the caller, as a syntax error is."""


def compact_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON (no spaces, non-ASCII kept as is, except three line ends:
    see :func:`escape_line_separators`); :class:`NestedTooDeeply` past the depth the
    standard library writes."""
    try:
        out = orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError: integers beyond 64 bits, non-str keys, ...
        try:
            out = _stdlib_compact(obj)
        except RecursionError:
            raise NestedTooDeeply("nested too deeply to be written as JSON") from None
    return escape_line_separators(out)


def _stdlib_compact(obj: Any) -> bytes:
    try:
        return _COMPACT.encode(obj).encode()
    except UnicodeEncodeError:
        # a lone surrogate, decoded from a client's "\ud83d" escape: kept as that
        # escape, as it came (it has no UTF-8 spelling)
        return _COMPACT_ASCII.encode(obj).encode()


def escape_line_separators(data: bytes) -> bytes:
    """U+0085, U+2028 and U+2029 written as JSON escapes (``\\u2028``): all three are
    valid inside a JSON string, but Python's ``str.splitlines`` (which httpx's
    ``iter_lines`` uses, and so ollama-python) ends a line at them, cutting an NDJSON line
    in two. Ollama's own encoder (Go's ``encoding/json``) escapes the last two for the
    same reason."""
    if data.isascii():  # none of them then; one pass, where each search cost ~0.2 µs a line
        return data
    for raw, escaped in _RAW_LINE_SEPARATORS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


def compact_json_text(obj: Any) -> str:
    return compact_json(obj).decode()


# An integer of 19 digits or more may be beyond 64 bits, which orjson decodes as an
# inexact float (-9223372036854775809 -> -9.223372036854776e18); the standard library
# keeps it exact. The test maps digits to "1", the decimal point to ".", everything else
# to "0", and looks for 19 ones after a "0": a long run after a decimal point (the
# fraction of an embedding's float) does not count. 0.3 µs on a 300-byte body (a regular
# expression took 2.8 µs).
_DIGIT_MAP = bytes(0x31 if 0x30 <= i <= 0x39 else 0x2E if i == 0x2E else 0x30 for i in range(256))
_LONG_RUN = b"1" * 19
_LONG_INTEGER = b"0" + _LONG_RUN


def _has_long_digit_run(data: bytes | str) -> bool:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    mapped = raw.translate(_DIGIT_MAP)
    return _LONG_INTEGER in mapped or mapped.startswith(_LONG_RUN)


def loads(data: bytes | str, *, exact_integers: bool = True) -> Any:
    """Decode JSON; raises ``ValueError`` (``json.JSONDecodeError``, or
    :class:`NestedTooDeeply`) on invalid input, never ``RecursionError``.

    ``exact_integers=False`` skips the test for integers beyond 64 bits, for bodies that
    cannot hold one worth keeping exact (a backend's embeddings: thousands of floats,
    where the test would cost as much as orjson's decoding)."""
    try:
        if exact_integers and _has_long_digit_run(data):
            return json.loads(data)
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            # integers beyond 64 bits and NaN/Infinity are valid to the standard library;
            # for truly invalid input it raises its own, familiar error
            return json.loads(data)
    except RecursionError:
        # the standard library's decoder recurses: past ~900 levels (orjson stops at
        # 1,024 and hands over) the stack, not the JSON, gives out
        raise NestedTooDeeply("nested too deeply to be read as JSON") from None


_USAGE_NEEDLE = b'"usage"'


def top_level_member(body: bytes, key: str) -> Any:
    """``loads(body).get(key)`` for a JSON object body, decoding only the member itself
    when its place shows it is one of the top-level object's; None when the key or the
    object is missing.

    A relayed completion is forwarded as bytes, and its ``usage`` comes last, after the
    content: decoding the whole body for it cost the metrics more than all their
    counting. Some backends write it first instead (llama.cpp's server: ``{"model",
    "object", "usage", "data"}`` before a batch of embeddings), where that tail is the
    whole body. So the key's last occurrence is read by what surrounds it
    (:func:`_member_at`); anything else falls back to decoding the whole body.
    """
    # the metrics' key, per relayed answer: its needle made once
    needle = _USAGE_NEEDLE if key == "usage" else b'"' + key.encode() + b'"'
    at = body.rfind(needle)
    if at < 0:
        return None
    if len(body) - at > _LONG_TAIL and at <= _HEAD_BYTES:  # read what precedes instead
        found, value = _leading_member(body, at, len(needle))
        if found:
            return value
    elif at == 0 or body[at - 1] != 0x5C:  # the common case, inline (:func:`_member_at`)
        try:
            tail = orjson.loads(b"{" + body[at:])
        except orjson.JSONDecodeError:
            tail = None
        if isinstance(tail, dict):
            return tail.get(key)
    try:
        whole = loads(body)
    except ValueError:
        return None
    return whole.get(key) if isinstance(whole, dict) else None


# the usage most backends end a completion with (vLLM's, llama.cpp's, Ollama's, LiteLLM's
# compact JSON): counts of up to 15 digits, which are whole numbers below
# WHOLE_NUMBER_LIMIT (no leading zero: that would be no JSON number); its key not after a
# backslash (the lookbehind sees the bytes before the match's start)
_COUNT = rb"(0|[1-9][0-9]{0,14})"
_PLAIN_USAGE = re.compile(
    rb'(?<!\\)"usage":\{"prompt_tokens":' + _COUNT + rb',"completion_tokens":' + _COUNT
    + rb',"total_tokens":(?:0|[1-9][0-9]{0,14})\}\}[ \t\r\n]*'
)  # fmt: skip
_USAGE_BEFORE_BRACE = len(b'"usage":')


def plain_usage_counts(body: bytes) -> tuple[int, int] | None:
    """``prompt_tokens`` and ``completion_tokens`` of ``top_level_member(body, "usage")``
    when the body ends with that usage in its plainest form (``_PLAIN_USAGE``), without
    decoding anything; None when only :func:`top_level_member` can tell. The body's last
    ``{`` opens such a usage, whose key is then the last ``"usage"`` in the body: the
    member ``top_level_member`` reads, from the same tail, under the same condition (not
    after a backslash)."""
    at = body.rfind(b"{") - _USAGE_BEFORE_BRACE  # one byte's search: memrchr
    found = _PLAIN_USAGE.fullmatch(body, at) if at >= 0 else None
    return None if found is None else (int(found[1]), int(found[2]))


def member_near_the_end(body: bytes, key: str, within: int) -> tuple[bool, Any]:
    """:func:`top_level_member`'s cheap part for a large body: ``(True, value)`` when the
    key's last occurrence lies in the last ``within`` bytes and :func:`_member_at` reads
    it there (no more than ``within`` bytes searched and decoded); ``(False, None)``
    when only the whole body can tell."""
    at = body.rfind(b'"' + key.encode() + b'"', max(0, len(body) - within))
    if at < 0:
        return False, None
    return _member_at(body, at, key)


def _member_at(body: bytes, at: int, key: str) -> tuple[bool, Any]:
    """The value of ``key`` whose last occurrence as a JSON string starts at ``at``, if
    what surrounds it shows that it is a top-level member: ``(True, value)``, else
    ``(False, None)``. Read from the tail ``{"key": ... }`` (decodes only when the
    occurrence is a key of the top-level object: a nested one would leave closing
    brackets unmatched, a string value would lack its colon), or, for a member near the
    start of a long body, from the members before it (:func:`_leading_member`)."""
    if len(body) - at > _LONG_TAIL and at <= _HEAD_BYTES:  # read what precedes instead
        return _leading_member(body, at, len(key) + 2)
    if at == 0 or body[at - 1] != 0x5C:  # not after a backslash: the quote opens a string
        try:
            tail = orjson.loads(b"{" + body[at:])
        except orjson.JSONDecodeError:
            return False, None
        if isinstance(tail, dict):
            return True, tail.get(key)
    return False, None


# a member read from the start of a body: the members before it (decoded to show that it
# is a top-level one) and its value (decoded from this many bytes at most) are this short;
# read so only when what follows it is longer than _LONG_TAIL (orjson decodes 4 KiB in
# about the 1.5 µs the standard library takes for the value alone)
_HEAD_BYTES = 64 * 1024
_LONG_TAIL = 4096
_DECODER = json.JSONDecoder()
_COLON = re.compile(r"[ \t\r\n]*:[ \t\r\n]*")
_SPACE = " \t\r\n"
_SPACE_BYTES = _SPACE.encode()


def _leading_member(body: bytes, at: int, needle_bytes: int) -> tuple[bool, Any]:
    """The value of the key at ``at`` (its ``needle_bytes`` with the quotes), when the
    bytes before it are ``{`` and whole members, each followed by its comma: the key is
    then one of the top-level object's, and, as its last occurrence, the one that
    counts. Only its value is decoded, however long the rest of the body."""
    head = body[:at].strip(_SPACE_BYTES)
    if head != b"{":
        if not head.endswith(b","):
            return False, None
        try:
            before = orjson.loads(head[:-1] + b"}")
        except orjson.JSONDecodeError:
            return False, None
        if not isinstance(before, dict):
            return False, None
    start = at + needle_bytes
    # a character cut at the window's end cannot be inside a value that ends before it
    text = body[start : start + _HEAD_BYTES].decode("utf-8", "replace")
    colon = _COLON.match(text)
    if colon is None:
        return False, None
    try:
        value, end = _DECODER.raw_decode(text, colon.end())
    except (ValueError, RecursionError):  # cut by the window, not JSON, or nested deeply
        return False, None
    if text[end:].lstrip(_SPACE)[:1] not in (",", "}"):
        return False, None
    return True, value


# a float64 holds every whole number below this exactly (Prometheus counters are float64)
WHOLE_NUMBER_LIMIT = 2**53


def whole_number(value: object) -> int | None:
    """A count or a time a backend wrote as a JSON number (tokens, Unix seconds), if it is
    one: a number from 0 up to :data:`WHOLE_NUMBER_LIMIT`, a fraction dropped; None for
    anything else. ``1e400`` decodes as infinity, ``NaN`` is read too, and an integer of
    400 digits fits no counter: each made ``int()`` or the metrics store raise (a 500, or
    a stream cut off by the metrics that observe it)."""
    if type(value) is int:
        return value if 0 <= value < WHOLE_NUMBER_LIMIT else None
    if type(value) is float and 0.0 <= value < WHOLE_NUMBER_LIMIT:  # NaN compares False
        return int(value)
    return None
