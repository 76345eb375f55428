"""A backend stream's events read: the content-only chunk recognised without decoding it,
every other event decoded in full."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from trioproxy.jsonutil import JSONDict, NestedTooDeeply, loads

if TYPE_CHECKING:  # json's C scanner: there at run time, left out of typeshed

    def scanstring(s: str, end: int, strict: bool = True) -> tuple[str, int]: ...

else:
    from json.decoder import scanstring

# The content-only chunk, recognised without json.loads. Nearly every event of a chat stream is
#   {"id":..,"object":..,"created":..,"model":..,"choices":[{"index":0,
#    "delta":{"content":"tok"},"logprobs":null,"finish_reason":null}]}
# and the stream consumers need only its content. The grammar below is a subset of JSON (a
# match is always what json.loads would accept) in which every member the consumers read is
# either absent, present once, or only ever null; so a match means: no usage, no finish_reason,
# no reasoning, no tool calls, and choices[0].delta.content is the captured string (or absent).
# Anything else (a second choice, nested values in other members, escaped member names, ...)
# does not match and is decoded in full, so the results are always exact. tests/test_translate
# compares both ways on generated streams.
_WS = r"[ \t\n\r]*"  # JSON whitespace exactly (\s also matches other characters)
_STR = r'"(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+"'
_NUM = r"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?"  # [0-9]: \d is Unicode
_SCALAR = rf"(?:{_STR}|{_NUM}|null|true|false)"
_SEP = rf"{_WS},{_WS}"


def _member(name: str, value: str) -> str:
    return name + _WS + ":" + _WS + value


def _other_member(read: str) -> str:
    """A scalar member named none of ``read``; the name has no escapes, so it is literal."""
    return _member(r'"(?!(?:' + read + r')")[^"\\\x00-\x1f]++"', _SCALAR)


def _around(member: str, required: str) -> str:
    """``required`` with any number of ``member`` before and after it, comma-separated."""
    return rf"(?:{member}{_SEP})*+{required}(?:{_SEP}{member})*+"


def _obj(body: str) -> str:
    return r"\{" + _WS + body + _WS + r"\}"


_DELTA_MEMBER = "(?:{}|{})".format(
    _other_member("content|reasoning_content|reasoning|tool_calls|refusal"),
    _member('"(?:reasoning_content|reasoning|tool_calls|refusal)"', "null"),
)
_CHOICE_MEMBER = "(?:{}|{})".format(
    _other_member("delta|message|finish_reason"), _member('"finish_reason"', "null")
)
_TOP_MEMBER = "(?:{}|{})".format(
    _other_member("choices|usage|error"), _member('"(?:usage|error)"', "null")
)
_DELTA = _obj(
    "(?:"
    + _around(_DELTA_MEMBER, _member('"content"', f"(?:(?P<content>{_STR})|null)"))
    + f"|(?:{_DELTA_MEMBER}(?:{_SEP}{_DELTA_MEMBER})*+)?)"
)
_CHOICE = _obj(_around(_CHOICE_MEMBER, _member('"delta"', f"(?P<delta>{_DELTA})")))
_CONTENT_CHUNK = re.compile(
    _WS
    + _obj(_around(_TOP_MEMBER, _member('"choices"', r"\[" + _WS + _CHOICE + _WS + r"\]")))
    + _WS
)
_CONTENT_DELTA = re.compile(_DELTA)
# The delta nearly every chunk of OpenAI's, vLLM's and llama.cpp's servers carries, and
# one that _DELTA reads the same (its content the same literal): tried first, as its
# match costs two thirds of _DELTA's (3 700 machine instructions against 5 600 on a
# token's delta); a delta of another shape fails it at its first member's name.
_TEXT_DELTA = re.compile(r'\{"content":(?P<content>' + _STR + r")\}")
# What a plain delta's content literal holds between its quotes (_STR's), for the relay's
# common read (_ContentChunks.lone_text)
_STR_BODY = re.compile(r'(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+')
# a plain delta's text around its content literal's, in the bytes of a relayed event
_LONE_DELTA_HEAD = b'{"content":"'
_LONE_DELTA_TAIL = b'"}'


def _decode_str(literal: str) -> str:
    """A JSON string literal matched by _STR, decoded (by json's own C scanner)."""
    return scanstring(literal, 1)[0]


# Full-chunk attempts that may fail in a row before a stream is taken to have another shape.
_MAX_SHAPE_MISSES = 8


class _ContentChunks:
    """Finds content-only chunks in event texts (see the grammar above).

    Every chunk of a stream repeats the text around its delta (id, created, model, the choice's
    other members), so after one full match only the delta is matched while the text before and
    after it stays the same. That is exact as well: swapping one JSON value (the delta object)
    for another keeps a JSON document's structure everywhere else.
    """

    __slots__ = ("_event_head", "_event_tail", "_head", "_misses", "_plain", "_tail")

    def __init__(self) -> None:
        self._head: str | None = None
        self._tail = ""
        self._misses = 0
        self._plain = True  # whether the deltas so far were _TEXT_DELTA's
        # the whole relayed event around the delta, as bytes (``data: `` and head, tail
        # and the blank line), while the deltas are plain: see :meth:`lone_text`
        self._event_head: bytes | None = None
        self._event_tail = b""

    def content(self, data: str) -> str | None:
        """The content's JSON string literal (``'""'`` when absent or null) if ``data`` is a
        content-only chunk; ``None`` if it must be decoded in full."""
        head = self._head
        if head is not None and data.startswith(head) and data.endswith(self._tail):
            start, stop = len(head), len(data) - len(self._tail)
            match = _TEXT_DELTA.fullmatch(data, start, stop) if self._plain else None
            if match is None:
                # a stream whose deltas have other members (Ollama's repeat the role) stops
                # trying the plain one: a failed try cost 1 500 instructions a chunk
                self._plain = False
                self._event_head = None
                match = _CONTENT_DELTA.fullmatch(data, start, stop)
            if match is not None:
                return match["content"] or '""'
        if self._misses >= _MAX_SHAPE_MISSES:
            return None
        match = _CONTENT_CHUNK.fullmatch(data)
        if match is None:
            self._misses += 1
            return None
        self._misses = 0
        self._head, self._tail = data[: match.start("delta")], data[match.end("delta") :]
        if self._plain:
            self._event_head, self._event_tail = _event_around(self._head, self._tail)
        return match["content"] or '""'

    def lone_text(self, data: bytes) -> str | None:
        """What a plain delta's content literal holds between its quotes (never empty)
        when ``data`` is one whole relayed event, ``data: `` then a chunk of the stream's
        shape with such a delta and a blank line (``\\n\\n``), read between events: what
        :meth:`content` gives (quoted) once the event's data is decoded (strict UTF-8);
        ``None`` for anything else. The relay's common read: the text around the literal
        compared as bytes, only the literal decoded, and most literals (text without
        escapes) checked without a regular expression (a match costs ~2 000 machine
        instructions, half of them the match's own allocation)."""
        head, tail = self._event_head, self._event_tail
        if head is None:
            return None
        start, stop = len(head), len(data) - len(tail)
        # no text (or no room for it between head and tail); the text around it compared
        # by slices: startswith and endswith parse their arguments (~600 instructions)
        if start >= stop or data[:start] != head or data[stop:] != tail:
            return None
        try:  # (the literal ends at ASCII quotes: it decodes alone as within the event)
            body = data[start:stop].decode()
        except UnicodeDecodeError:
            return None
        if body.isprintable() and '"' not in body and "\\" not in body:
            return body  # (no control character either)
        return body if _STR_BODY.fullmatch(body) else None


def _event_around(head: str, tail: str) -> tuple[bytes | None, bytes]:
    """The bytes of a whole event before a plain delta's content literal (None when there
    can be none: the text around the delta has a line end, so such an event is no single
    line, or is not Unicode text, a lone surrogate, which a decoded event never has) and
    after it."""
    if "\n" in head or "\r" in head or "\n" in tail or "\r" in tail:
        return None, b""
    try:
        before = b"data: " + head.encode() + _LONE_DELTA_HEAD
        return before, _LONE_DELTA_TAIL + tail.encode() + b"\n\n"
    except UnicodeEncodeError:
        return None, b""


def parse_chunk(data: str) -> JSONDict | None:
    """One event's JSON object; ``None`` for anything else (ignored, as keep-alive noise),
    an event too deep to read included: the observers only watch a stream relayed as it
    came, which its client may well read."""
    try:
        return read_chunk(data)
    except NestedTooDeeply:
        return None


def read_chunk(data: str) -> JSONDict | None:
    """:func:`parse_chunk`, but an event too deep to read raises :class:`NestedTooDeeply`:
    for a stream translated to Ollama's, it may hold the answer, so it is not noise."""
    try:
        chunk = loads(data)
    except NestedTooDeeply:
        raise
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None
