"""Server-sent events, sans-I/O: a parser fed raw bytes, and encoders for what we send.

The parser follows the WHATWG "event stream interpretation" rules, because OpenAI-compatible
backends differ in framing (CRLF from some, ``data:`` without the space from others, comments as
keep-alives) and because network reads split lines, events and even UTF-8 characters anywhere.
It never touches a socket: the caller feeds it whatever bytes arrived and gets back complete
events, h11-style.
"""

from __future__ import annotations

import codecs
import re
from typing import Any, NamedTuple

from .errors import bounded
from .jsonutil import compact_json, compact_json_text, loads

__all__ = [
    "ERROR_FIELD_EVENT",
    "SSE_DONE",
    "SSE_DONE_BYTES",
    "SSEEvent",
    "SSEParser",
    "SSEProtocolError",
    "SSETooLarge",
    "encode_sse",
    "encode_sse_event",
    "error_field_as_data",
    "error_fields_as_data",
    "openai_error_event",
    "responses_error_event",
]

SSE_DONE = "[DONE]"
SSE_DONE_BYTES = b"data: [DONE]\n\n"

DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024


# the event type of an ``error:`` field (llama.cpp's older servers): see SSEParser
ERROR_FIELD_EVENT = "error"


def error_field_as_data(value: str) -> str:
    """An ``error:`` field's value as the data of OpenAI's error chunk: its object, or its
    text as the message when it is no object or one too deep to read or write again."""
    try:
        parsed = loads(value)
        if isinstance(parsed, dict):
            return compact_json_text({"error": parsed})
    except ValueError:  # NestedTooDeeply included
        pass
    return compact_json_text({"error": {"message": value or "the backend reported an error"}})


# a line starts after any line end: LF, CRLF, or a CR alone (``^`` knows LF only)
_ERROR_FIELD_LINE = re.compile(rb"(?:^|(?<=\r))error:[ ]?([^\r\n]*)", re.MULTILINE)


def error_fields_as_data(data: bytes) -> bytes:
    """Raw event-stream bytes with each ``error:`` line rewritten as the ``data:`` line of
    OpenAI's error chunk, for clients (the openai SDK) that ignore unknown fields."""
    return _ERROR_FIELD_LINE.sub(
        lambda line: b"data: " + error_field_as_data(line[1].decode(errors="replace")).encode(),
        data,
    )


class SSEProtocolError(ValueError):
    """The byte stream cannot be an event stream we are willing to read: not UTF-8 (when
    strict), or too large (:class:`SSETooLarge`)."""


class SSETooLarge(SSEProtocolError):
    """A line or an event past the parser's limit (``max_line_bytes``)."""


class SSEEvent(NamedTuple):
    """One dispatched event. A named tuple, not a frozen dataclass, though as immutable:
    a frozen dataclass sets each field through ``object.__setattr__``, which made
    ``feed`` of one chat chunk cost 1.4 µs instead of 1.1 µs with this tuple
    (``_new_event``)."""

    data: str
    event: str | None = None
    id: str | None = None


# the parser builds its events with tuple's own constructor: the named tuple's generated
# ``__new__`` (which fills in defaults) takes twice as long
_new_event = tuple.__new__


class SSEParser:
    """Incremental SSE parser: ``feed(bytes) -> events``, then ``close() -> events``.

    Line ends may be LF, CRLF or CR, and a CR ending one read followed by an LF starting the
    next is a single line end. Bytes are decoded with an incremental UTF-8 decoder (invalid
    sequences become U+FFFD rather than killing the stream), so a multibyte character split
    across reads is reassembled.

    ``id`` follows the spec's "last event ID" rule: once set it is reported on every later event
    until another ``id:`` line changes it. ``retry:`` and unknown fields are ignored, except
    one: llama.cpp's server before October 2025 (PR 16486) reported a failure as an
    ``error: {json}`` line, then ``data: [DONE]``. Ignoring it would make the failure a
    finished answer, so it becomes an ``error`` event whose data is OpenAI's error chunk,
    ``{"error": {json}}`` (see :func:`error_field_as_data`).

    Memory is bounded: an incomplete line longer than ``max_line_bytes`` raises
    :class:`SSEProtocolError`, as does any complete line over the limit, and an event whose
    data lines add up to more than that many characters.
    """

    __slots__ = (
        "_data",
        "_data_size",
        "_decoder",
        "_errors",
        "_event",
        "_id",
        "_lone_max",
        "_max",
        "_pending",
        "_pending_bytes",
        "_skip_lf",
        "_started",
        "lone_room",
        "reads_in_line",
    )

    def __init__(
        self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, *, strict_utf8: bool = False
    ) -> None:
        if max_line_bytes <= 0:
            raise ValueError("max_line_bytes must be positive")
        self._max = max_line_bytes
        # strict: bytes that are not UTF-8 are an SSEProtocolError (a stream relayed as it
        # came, which its client decodes strictly), not U+FFFD
        errors = "strict" if strict_utf8 else "replace"
        self._errors = errors
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
        # a line shorter than this holds no line or event past the limit (see _feed_text)
        self._lone_max = max_line_bytes >> 2
        # _lone_max while what was fed so far ends between events, with nothing held (no
        # line, no data, no event type, no CR whose LF may follow, no bytes of a UTF-8
        # character), else 0: a read shorter than this that is one whole ``data:`` event
        # is read by :meth:`lone_event` (or by the relay's own common read, which reads
        # this one number for both checks). Read-only outside the parser. While it is not
        # 0, reads_in_line is 0 (the last read ended a line).
        self.lone_room = 0
        # how many reads in a row ended no line but added to one (0: the last one ended a
        # line): a backend sending a line a few bytes at a time makes progress the reader
        # cannot see (see relay's idle limit)
        self.reads_in_line = 0
        # The incomplete last line, kept as pieces so a long line arriving in many small reads
        # costs O(n) instead of O(n^2) re-concatenation. Never contains CR or LF.
        self._pending: list[str] = []
        self._pending_bytes = 0
        # The previous decoded text ended in CR: an LF starting the next text belongs to it.
        self._skip_lf = False
        self._started = False  # a leading BOM is stripped once, per spec
        self._data: list[str] = []
        self._data_size = 0  # characters in _data: an event is bounded like a line
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Consume one read's worth of bytes; return the events it completed."""
        if not data:
            return []
        self.lone_room = 0
        try:
            text = self._decoder.decode(data)
        except UnicodeDecodeError:
            raise SSEProtocolError("the event stream is not valid UTF-8") from None
        events = self._feed_text(text)
        # a read ending in an ASCII byte leaves no part of a UTF-8 character in the
        # decoder (and, being text, has ``_started`` set)
        if (
            data[-1] < 0x80
            and not self._skip_lf
            and not self._pending
            and not self._data
            and self._event is None
        ):
            self.lone_room = self._lone_max
        return events

    def lone_event(self, data: bytes) -> str | None:
        """The data of the one event ``data`` is, when it is nothing else: a single
        ``data: `` line (no CR, no other line end) and its blank line, read between
        events; None for anything else, which is then :meth:`feed`'s. The same data and
        the same state after as :meth:`feed` (its id is the last one, as there): the
        common read of a chat stream, without decoding it line by line (17 500 machine
        instructions -> 6 300)."""
        end = len(data) - 2  # where its line ends
        if not (
            end < self.lone_room  # between events, and short enough
            and data.startswith(b"data: ")
            and data.find(b"\n") == end
            and data[-1] == 10  # (b"\n")
            and data.find(b"\r") < 0
        ):
            return None
        try:
            text = data[6:end].decode("utf-8", self._errors)
        except UnicodeDecodeError:
            raise SSEProtocolError("the event stream is not valid UTF-8") from None
        self.reads_in_line = 0
        return text

    @property
    def mid_event(self) -> bool:
        """Whether the bytes fed so far end inside an event (a line or an event not yet
        ended by its blank line)."""
        return bool(self._pending or self._data or self._event is not None)

    def close(self) -> list[SSEEvent]:
        """End of stream: flush the decoder and any final line, and dispatch a pending event.

        Strictly the spec discards an event not terminated by a blank line; we deliver it,
        because a backend that forgets the final blank line still meant to send it.
        """
        try:
            text = self._decoder.decode(b"", True)
        except UnicodeDecodeError:
            raise SSEProtocolError("the event stream ends inside a UTF-8 character") from None
        self.lone_room = 0
        events = self._feed_text(text)
        if self._pending:
            line = "".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._process_line(line, events)
        self._dispatch(events)
        self._skip_lf = False
        return events

    # -- internals ------------------------------------------------------------------------

    def _feed_text(self, text: str) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        if not text:
            return events
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
                if not text:
                    return events
        if self._skip_lf:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return events
        if "\r" in text:
            # A trailing CR is a complete line end now; remember it so a following LF is eaten.
            self._skip_lf = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        elif "\n" not in text:
            self._append_pending(text)
            self.reads_in_line += 1
            return events

        self.reads_in_line = 0
        lines = text.split("\n")
        tail = lines.pop()
        if self._pending:
            self._pending.append(lines[0])
            lines[0] = "".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
        # The two lines nearly every event consists of ("data: ..." and the blank line ending
        # it) are handled inline, without two method calls per line.
        quick_max = self._max >> 2  # a line of at most this many characters fits in _max bytes
        for line in lines:
            if len(line) > quick_max:
                self._check_line(line)
            if line.startswith("data:"):
                value = line[6:] if line.startswith(" ", 5) else line[5:]
                self._data.append(value)
                self._data_size += len(value) + 1  # and the newline that joins it
                if self._data_size > self._max:
                    self._event_too_large()
            elif line:
                self._process_line(line, events)
            else:
                self._dispatch(events)
        if tail:
            self._append_pending(tail)
        return events

    def _append_pending(self, piece: str) -> None:
        self._pending.append(piece)
        # Exact UTF-8 size of what we hold; encoding only the new piece keeps this linear.
        self._pending_bytes += len(piece) if piece.isascii() else len(piece.encode())
        if self._pending_bytes > self._max:
            raise SSETooLarge(f"SSE line exceeds {self._max} bytes without a line end")

    def _check_line(self, line: str) -> None:
        # Called for lines over _max // 4 characters only (a UTF-8 character is at most 4 bytes).
        if len(line) > self._max or len(line.encode()) > self._max:
            raise SSETooLarge(f"SSE line exceeds {self._max} bytes")

    def _process_line(self, line: str, events: list[SSEEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        # Fast path for the line that makes up nearly all of a chat stream.
        if line.startswith("data:"):
            value = line[5:]
            self._add_data(value[1:] if value.startswith(" ") else value)
            return
        if line[0] == ":":
            return  # comment, typically a keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value or None
        elif name == "data":  # "data" alone on a line: an empty data line
            self._add_data(value)
        elif name == "id":
            if "\0" not in value:  # per spec an id containing NUL is ignored
                self._id = value or None
        elif name == "error":
            self._event = ERROR_FIELD_EVENT
            self._add_data(error_field_as_data(value))

    def _add_data(self, value: str) -> None:
        self._data.append(value)
        self._data_size += len(value) + 1  # and the newline that joins it
        if self._data_size > self._max:
            self._event_too_large()

    def _event_too_large(self) -> None:
        raise SSETooLarge(f"SSE event exceeds {self._max} characters of data")

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data:
            events.append(_new_event(SSEEvent, ("\n".join(self._data), self._event, self._id)))
            self._data = []
            self._data_size = 0
        # The event type is per event even when nothing was dispatched; the id persists.
        self._event = None


def encode_sse(obj: dict[str, Any]) -> bytes:
    """One ``data:`` event holding compact JSON.

    JSON escapes CR and LF inside strings, so the payload is always a single line and needs no
    splitting into several ``data:`` lines.
    """
    return b"data: " + compact_json(obj) + b"\n\n"


def encode_sse_event(name: str, obj: dict[str, Any]) -> bytes:
    """:func:`encode_sse` with its ``event:`` line (the Responses API names each event)."""
    return b"event: " + name.encode() + b"\n" + encode_sse(obj)


def openai_error_event(
    message: str, type_: str = "api_error", code: str | int | None = None
) -> bytes:
    """The in-band error event the openai SDK turns into ``APIError`` mid-stream (its
    message :func:`~trioproxy.errors.bounded`)."""
    error = {"message": bounded(message), "type": type_, "param": None, "code": code}
    return encode_sse({"error": error})


def responses_error_event(
    message: str,
    type_: str = "api_error",
    code: object = None,
    param: object = None,
    sequence_number: int = 0,
) -> bytes:
    """The in-band error event of a Responses API stream: that API's own ``error`` event
    (``type``, ``code``, ``message``, ``param``, ``sequence_number``), which the Vercel AI
    SDK's schema requires (a bare ``{"error": ...}`` fails its validation, and the message
    is lost), with the error object beside them that the openai SDKs raise ``APIError``
    from. ``code`` and ``param`` are strings or null there. ``sequence_number``: the
    number after the last event relayed on the stream (0 before any), as the API numbers
    every event of a stream in order; the event is the proxy's, not one of the
    response's, so a client resuming the response names the last event before it."""
    code = None if code is None else str(code)
    param = param if isinstance(param, str) else None
    message = bounded(message)
    error = {"type": type_, "code": code, "message": message, "param": param}
    event = {"type": "error", "sequence_number": sequence_number}
    event |= {"code": code, "message": message, "param": param, "error": error}
    return encode_sse_event("error", event)
