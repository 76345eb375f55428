"""A JSON object's text as it comes in pieces, checked as it comes (sans-I/O).

Anthropic's streams send a tool call's input as it is written (``input_json_delta``
events); the clients join the pieces and parse them at each one (the anthropic SDK's
accumulator, in jiter's partial mode) or at the block's end. So what goes out must always
be the start of a JSON object, and the block must end as a whole one. :class:`ObjectPrefix`
passes on what keeps the text so, holds what cannot be cut yet (a comma, a key, a number
that may go on), and at the end says what closes the object (:meth:`ObjectPrefix.closing`).
Strings, most of a tool's input (a file's content), are read by one regular expression
each, not character by character.
"""

from __future__ import annotations

import re

# a string's characters up to its end, an escape or where it is no longer JSON (a raw
# control character, an unknown escape), or a surrogate half that is not in a pair of
# escapes (see _read_string)
_STRING_BODY = re.compile(
    r'(?:[^"\\\x00-\x1f\ud800-\udfff]+|\\["\\/bfnrt]|\\u(?![dD][89a-fA-F])[0-9a-fA-F]{4}'
    r"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})*"
)
# what the next piece may end: an escape, a surrogate pair's first half (an escape, maybe
# with some of the second; or raw, as a backend that cuts text by UTF-16 units writes it)
_CUT = re.compile(
    r"(?:\\u[dD][89abAB][0-9a-fA-F]{2}(?:\\(?:u[0-9a-fA-F]{0,3})?)?"
    r"|\\(?:u[0-9a-fA-F]{0,3})?|[\ud800-\udbff])\Z"
)
_RAW_HALVES = re.compile("[\ud800-\udfff]+")
_ESCAPED_HALF = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_NUMBER_EXTENT = re.compile(r"[-+.eE0-9]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_SPACE = " \t\n\r"

# what comes next
_OBJECT = 0  # the object's "{" (only whitespace before it)
_KEY_OR_END = 1  # after "{"
_KEY = 2  # after a "," in an object
_IN_KEY = 3  # a key's characters (``_in_string``), held
_COLON = 4
_VALUE = 5  # after ":" or a "," in an array
_VALUE_OR_END = 6  # after "["
_IN_NUMBER = 7  # a number's characters, held until what follows it shows its end
_AFTER = 8  # after a value: "," or the container's end
_WHOLE = 9  # the object ended: what follows is ignored
_BROKEN = 10  # no JSON object any more: what follows is ignored


class ObjectPrefix:
    """One JSON object's text, piece by piece: :meth:`take` gives what of each piece can
    go out now; :meth:`closing` what ends what went out as a whole object.

    What goes out always stops where the object can be closed by ending an open string
    and the open containers: after ``{``, ``[``, a whole value, or inside a string value.
    Whitespace between tokens is left out. Text that is no JSON object (no ``{`` first,
    an invalid character) makes the prefix :attr:`broken`: nothing more goes out.

    Each character is read once, whatever the pieces: a key or a number a piece cuts
    short is kept as far as it was read, and only an escape or a literal (a few
    characters) is read again with the next piece."""

    __slots__ = ("_closers", "_expect", "_held", "_in_string", "_number", "_rest", "sent")

    def __init__(self) -> None:
        self._closers: list[str] = []  # the open containers' ends, innermost last
        self._expect = _OBJECT
        self._in_string = False  # inside a string: a key, or a value whose quote went out
        self._held: list[str] = []  # read, but not yet safe to send: ``,"key":``
        self._number: list[str] = []  # the number being read (_IN_NUMBER)
        self._rest = ""  # an escape or literal the piece cut short: read again with the next
        self.sent = False  # something went out

    @property
    def whole(self) -> bool:
        return self._expect == _WHOLE

    @property
    def broken(self) -> bool:
        return self._expect == _BROKEN

    def closing(self) -> str:
        """What ends what went out as a whole object (``{}`` when nothing did)."""
        if not self.sent:
            return "{}"
        in_value = self._in_string and self._expect != _IN_KEY
        return ('"' if in_value else "") + "".join(reversed(self._closers))

    def take(self, piece: str) -> str:
        """What of ``piece`` (with what earlier pieces left) can go out now."""
        if self._expect >= _WHOLE:
            return ""
        text, self._rest = self._rest + piece, ""
        out: list[str] = []
        i, end = 0, len(text)
        while i < end and self._expect < _WHOLE:
            if self._in_string:
                i = self._string(text, i, out)
                continue
            if self._expect == _IN_NUMBER:
                i = self._digits(text, i, out)
                continue
            c = text[i]
            if c in _SPACE:
                i += 1
            elif self._expect in (_KEY_OR_END, _KEY) and c == '"':
                self._held.append(c)
                self._in_string = True
                self._expect = _IN_KEY
                i += 1
            else:
                i = self._token(text, i, c, out)
        if out:
            self.sent = True
        return "".join(out)

    def _string(self, text: str, i: int, out: list[str]) -> int:
        """A string's characters: a value's go out, a key's are held."""
        sink = self._held if self._expect == _IN_KEY else out
        j = _STRING_BODY.match(text, i).end()  # type: ignore[union-attr]  # matches ""
        sink.append(text[i:j])
        if j == len(text):  # most pieces: a string's characters, read in one match
            return j
        read = _CLOSED
        if text[j] == '"':
            j += 1
        else:  # an escape cut short, a surrogate half, or no JSON
            j, read = _read_string(text, j, sink)
        if read == _CLOSED:
            sink.append('"')
            self._in_string = False
            self._expect = _COLON if self._expect == _IN_KEY else _AFTER
            return j
        if read == _CUT_SHORT:
            self._rest = text[j:]
        else:
            self._in_string = sink is out  # a key: nothing of it went out to close
            self._expect = _BROKEN
        return len(text)

    def _token(self, text: str, i: int, c: str, out: list[str]) -> int:
        expect = self._expect
        if expect == _OBJECT:
            if c != "{":
                self._expect = _BROKEN
                return len(text)
            return self._open(c, "}", _KEY_OR_END, out, i)
        if expect == _COLON:
            if c != ":":
                self._expect = _BROKEN
                return len(text)
            self._held.append(c)
            self._expect = _VALUE
            return i + 1
        if expect == _AFTER or (c in "}]" and expect in (_KEY_OR_END, _VALUE_OR_END)):
            return self._after_value(text, i, c, out)
        if expect in (_VALUE, _VALUE_OR_END):
            return self._value(text, i, c, out)
        self._expect = _BROKEN  # a key that is no string
        return len(text)

    def _after_value(self, text: str, i: int, c: str, out: list[str]) -> int:
        closers = self._closers
        if c == "," and self._expect == _AFTER:
            self._held = [c]
            self._expect = _KEY if closers[-1] == "}" else _VALUE
        elif c == closers[-1]:
            closers.pop()
            out.append(c)
            self._expect = _AFTER if closers else _WHOLE
        else:
            self._expect = _BROKEN
        return i + 1

    def _value(self, text: str, i: int, c: str, out: list[str]) -> int:
        if c == '"':
            self._send(c, out)
            self._in_string = True
            return i + 1
        if c == "{":
            return self._open(c, "}", _KEY_OR_END, out, i)
        if c == "[":
            return self._open(c, "]", _VALUE_OR_END, out, i)
        if c in _LITERALS:
            word = _LITERALS[c]
            token = text[i : i + len(word)]
            if token == word:
                self._send(token, out)
                self._expect = _AFTER
                return i + len(token)
            if word.startswith(token) and i + len(token) == len(text):
                self._rest = token
                return len(text)
        elif c == "-" or "0" <= c <= "9":
            self._expect = _IN_NUMBER
            return self._digits(text, i, out)
        self._expect = _BROKEN
        return len(text)

    def _digits(self, text: str, i: int, out: list[str]) -> int:
        """A number's characters: it goes out once what follows shows where it ends (the
        next piece may go on with it)."""
        j = _NUMBER_EXTENT.match(text, i).end()  # type: ignore[union-attr]
        self._number.append(text[i:j])
        if j == len(text):
            return j
        number = "".join(self._number)
        self._number.clear()
        if not _NUMBER.match(number):
            self._expect = _BROKEN
            return len(text)
        self._send(number, out)
        self._expect = _AFTER
        return j

    def _open(self, c: str, closer: str, expect: int, out: list[str], i: int) -> int:
        self._send(c, out)
        self._closers.append(closer)
        self._expect = expect
        return i + 1

    def _send(self, token: str, out: list[str]) -> None:
        """``token`` goes out, after what was held for it (``,"key":``)."""
        if self._held:
            out.append("".join(self._held))
            self._held.clear()
        out.append(token)


# how _read_string stopped
_CLOSED = 0  # at the string's end
_CUT_SHORT = 1  # at the piece's end, or before what the next piece may end (_CUT)
_NOT_JSON = 2


def _read_string(text: str, i: int, out: list[str]) -> tuple[int, int]:
    """A string's characters from ``i`` on, into ``out`` as they go out: where and how
    it stopped (after its closing quote, where the next piece must go on, or where it is
    no JSON).

    Surrogate halves: the anthropic SDK encodes each piece as UTF-8 (a half has no UTF-8
    spelling) and jiter refuses a half's escape alone, so either failed the client's
    stream. Two raw halves side by side (a backend that cuts text by UTF-16 units sent
    them in two pieces) go out as the one character they spell; a first half waits for
    its second; a lone half, raw or escaped, goes out as U+FFFD, the replacement
    character a UTF-8 decoder writes for it."""
    end = len(text)
    while True:
        j = _STRING_BODY.match(text, i).end()  # type: ignore[union-attr]  # matches ""
        if j > i:
            out.append(text[i:j])
        if j == end:
            return j, _CUT_SHORT
        c = text[j]
        if c == '"':
            return j + 1, _CLOSED
        if _CUT.match(text, j):
            return j, _CUT_SHORT
        if "\ud800" <= c <= "\udfff":
            i = _RAW_HALVES.match(text, j).end()  # type: ignore[union-attr]
            if i == end and text[i - 1] <= "\udbff":
                i -= 1  # a first half: waits for its second (_CUT, next round)
            out.append(
                text[j:i].encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
            )
        elif _ESCAPED_HALF.match(text, j):
            out.append("\\ufffd")
            i = j + 6
        else:
            return j, _NOT_JSON
