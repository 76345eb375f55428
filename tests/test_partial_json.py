"""``partial_json.ObjectPrefix``: what goes out of a tool call's arguments as they come is
always the start of a JSON object the clients can read, and ends as the whole one."""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jiter import from_json

from trioproxy.partial_json import ObjectPrefix

_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_VALUE = st.recursive(
    _LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=500, deadline=None)
@given(
    obj=st.dictionaries(st.text(max_size=4), _VALUE, max_size=4),
    cuts=st.lists(st.integers(0, 300), max_size=8),
    indent=st.sampled_from([None, 1]),
    ascii_only=st.booleans(),
    stop=st.integers(0, 400),
)
def test_pieces_go_out_as_an_object_start_and_end_whole(
    obj: dict[str, Any], cuts: list[int], indent: int | None, ascii_only: bool, stop: int
) -> None:
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only)
    whole = stop >= len(text)
    text = text if whole else text[:stop]  # cut short, as by the token limit
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    prefix, sent = ObjectPrefix(), ""
    for a, b in itertools.pairwise(points):
        sent += prefix.take(text[a:b])
        assert not prefix.broken
        if sent:  # what the anthropic SDK's accumulator does at each delta
            from_json(sent.encode(), partial_mode=True)
        # closed wherever it stops, it is an object (whitespace is left out)
        assert isinstance(json.loads(sent + prefix.closing()), dict)
    if whole:
        assert prefix.whole and prefix.closing() == "" and json.loads(sent) == obj


@pytest.mark.parametrize(
    ("text", "sent", "closing"),
    [
        ("not json", "", "{}"),
        ("[1]", "", "{}"),  # no object: what a non-stream answer makes {} too
        ("", "", "{}"),
        ('{"a": tru}', "{", "}"),
        ('{"a": 1,}', '{"a":1', "}"),
        ('{"a" 1}', "{", "}"),
        ('{"a": "x\u0001"}', '{"a":"x', '"}'),  # a raw control character
        ('{"a": 01}', "{", "}"),
        ('{"a": "\\q"}', '{"a":"', '"}'),
        ('{"a": 1, "\\q": 2}', '{"a":1', "}"),  # a key's
    ],
)
def test_what_is_no_json_stops_what_goes_out(text: str, sent: str, closing: str) -> None:
    prefix = ObjectPrefix()
    assert prefix.take(text) == sent
    assert prefix.broken == (text.strip() != "") and prefix.closing() == closing


def test_what_follows_a_whole_object_is_ignored() -> None:
    prefix = ObjectPrefix()
    assert prefix.take('{"a": [1, {"b": null}]} and more') == '{"a":[1,{"b":null}]}'
    assert prefix.whole and prefix.take("}") == ""


# -- adversarial properties ------------------------------------------------------------------
# JSON objects spelled every way a backend may write them and cut anywhere (inside an
# escape, a \uXXXX, a number, a literal, between a key and its colon): what goes out is read
# at every piece as the anthropic SDK reads it, and ends as the object the whole text is.


class _Number(str):
    """A number as its text: spellings json.dumps never writes (1E+02, -0.0, 12e999)."""


class _Object(list):  # type: ignore[type-arg]
    """An object as its members, (key, value) pairs, in order (keys may repeat)."""


_LONE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d"])
_CHARS = st.text(
    st.characters(codec="utf-8") | st.sampled_from('"\\/\b\f\n\r\t\x00\x1f\x7f\u2028é😀'),
    max_size=5,
)
_STRINGS = st.lists(_CHARS | _LONE, max_size=3).map("".join)
_NUMBERS = st.from_regex(
    r"-?(0|[1-9][0-9]{0,20})(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,3})?", fullmatch=True
).map(_Number)
_TREES = st.recursive(
    st.none() | st.booleans() | _STRINGS | _NUMBERS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.lists(st.tuples(_STRINGS, inner), max_size=3).map(_Object)
    ),
    max_leaves=8,
)
OBJECTS = st.lists(st.tuples(_STRINGS, _TREES), max_size=4).map(_Object)
_SPACES = st.text(" \t\n\r", max_size=2)
_SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n"}
_SHORT |= {"\r": "\\r", "\t": "\\t"}
_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf16(text: str) -> str:
    """Surrogate halves side by side as the character they spell; a lone one, which has
    no UTF-8 spelling (the SDK encodes each piece) and which jiter refuses as an escape,
    as U+FFFD."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _spell_string(text: str, draw: st.DrawFn) -> tuple[str, str]:
    """A string as JSON, each character raw or escaped any way JSON allows (an astral
    one maybe as the two halves a backend that cuts by UTF-16 units writes); and what
    goes out for it."""
    text = _PAIR.sub(lambda m: _utf16(m[0]), text)  # halves in the value: one character
    spelled, sent = ['"'], ['"']
    for c in text:
        units = c.encode("utf-16-be", "surrogatepass")
        escape = "".join(f"\\u{units[k]:02x}{units[k + 1]:02x}" for k in range(0, len(units), 2))
        ways = [(escape, escape), (escape.upper().replace("\\U", "\\u"),) * 2]
        if c in _SHORT:
            ways.append((_SHORT[c], _SHORT[c]))
        if c >= " " and c not in '"\\':
            ways.append((c, c))
            if len(units) == 4:
                ways.append((units.decode("utf-16-be", "surrogatepass"), c))
        if _SURROGATE.match(c):  # lone: U+FFFD, spelled as it came
            ways = [(way, "\\ufffd" if way.startswith("\\") else "\ufffd") for way, _ in ways]
        way, out = draw(st.sampled_from(ways))
        spelled.append(way)
        sent.append(out)
    return "".join(spelled) + '"', "".join(sent) + '"'


def _spell(value: object, draw: st.DrawFn) -> tuple[str, str]:
    """``value`` as JSON text with whitespace of every kind between its tokens; and what
    goes out for it (no whitespace)."""
    if isinstance(value, _Number):
        return value, value
    if isinstance(value, str):
        return _spell_string(value, draw)
    if not isinstance(value, list):
        return json.dumps(value), json.dumps(value)
    parts: list[tuple[str, str]] = []
    if isinstance(value, _Object):
        for key, member in value:
            (k, k_sent), (v, v_sent) = _spell_string(key, draw), _spell(member, draw)
            between = draw(_SPACES) + ":" + draw(_SPACES)
            parts.append((k + between + v, k_sent + ":" + v_sent))
        ends = "{}"
    else:
        parts = [_spell(member, draw) for member in value]
        ends = "[]"
    spelled = ",".join(draw(_SPACES) + part + draw(_SPACES) for part, _ in parts)
    sent = ",".join(part for _, part in parts)
    return ends[0] + spelled + draw(_SPACES) + ends[1], ends[0] + sent + ends[1]


def _python(value: object) -> object:
    if isinstance(value, _Number):
        number = json.loads(value)
        return number if math.isfinite(number) else 0  # json.dumps writes 1e999 as Infinity
    if isinstance(value, _Object):
        return {key: _python(member) for key, member in value}
    if isinstance(value, list):
        return [_python(member) for member in value]
    return value


def replaced_loads(text: str) -> Any:
    """``json.loads``, its strings' lone surrogates as U+FFFD (see _utf16): keys replaced
    as they are read, so that two that become one keep the later value, as in the text."""

    def replaced(value: Any) -> Any:
        if isinstance(value, str):
            return _utf16(value)
        if isinstance(value, list):
            return [replaced(member) for member in value]
        return value

    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        return {_utf16(key): replaced(value) for key, value in pairs}

    return replaced(json.loads(text, object_pairs_hook=members))


def _same(a: object, b: object) -> bool:
    """Equal values of equal types (1 is not 1.0 nor True, -0.0 is not 0.0), keys in order."""
    return json.dumps(a) == json.dumps(b)


def text_of(draw: st.DrawFn, tree: _Object, spelling: str) -> tuple[str, str]:
    """The object's text as a backend writes it, and what goes out for it."""
    if spelling == "spaced":
        return _spell(tree, draw)
    value = _python(tree)
    ascii_only = spelling.endswith("ascii")
    indent = {"dumps": None, "indent": 2, "tab": "\t"}[spelling.removesuffix("-ascii")]
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only, separators=(",", ": "))
    if indent is None and draw(st.booleans()):
        text = json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))
    compact = json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":"))
    return text, _ESCAPES.sub(_lone_escape_replaced, _utf16(compact))


# an escape (a surrogate pair's two first, so that a lone half is told from a paired one)
_ESCAPES = re.compile(r"\\u[dD][89abAB]..\\u[dD][c-fC-F]..|\\u[dD][89a-fA-F]..|\\.")


def _lone_escape_replaced(escape: re.Match[str]) -> str:
    return "\\ufffd" if len(escape[0]) == 6 else escape[0]


def pieces_of(draw: st.DrawFn, text: str) -> list[str]:
    """``text`` cut anywhere: at a few places, or between every two characters."""
    if draw(st.integers(0, 4)) == 0:
        return list(text)
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=12))
    points = sorted({0, len(text), *cuts})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def _read_as_the_sdk_does(out: str, sent: str, closing: str) -> None:
    """The SDK's accumulator encodes each piece as UTF-8 and parses the pieces so far with
    jiter's partial mode; a block cut short (the token limit) ends with ``closing``."""
    out.encode("utf-8")
    if sent:
        from_json(sent.encode(), partial_mode=True)
        from_json(sent.encode(), partial_mode="trailing-strings")
    closed = json.loads(sent + closing)
    assert isinstance(closed, dict)
    assert _same(from_json((sent + closing).encode()), closed)


SPELLINGS = ["spaced", "dumps", "dumps-ascii", "indent", "indent-ascii", "tab", "tab-ascii"]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(data=st.data(), tree=OBJECTS, spelling=st.sampled_from(SPELLINGS))
def test_any_object_cut_anywhere_goes_out_readable_and_ends_whole(
    data: st.DataObject, tree: _Object, spelling: str
) -> None:
    text, expected = text_of(data.draw, tree, spelling)
    prefix, sent = ObjectPrefix(), ""
    for piece in pieces_of(data.draw, text):
        out = prefix.take(piece)
        sent += out
        assert not prefix.broken
        assert len(prefix._rest) <= _MOST_READ_AGAIN
        _read_as_the_sdk_does(out, sent, prefix.closing())
    assert prefix.whole and prefix.closing() == ""
    assert sent == expected  # nothing lost, nothing twice, only whitespace left out
    assert _same(json.loads(sent), replaced_loads(text))


@pytest.mark.parametrize(
    ("pieces", "sent"),
    [
        # an emoji's halves cut apart by a backend that cuts text by UTF-16 units
        (['{"a": "x\ud83d', '\ude00"}'], ['{"a":"x', '😀"}']),
        # an emoji's escaped halves cut apart: closed after the first, jiter refused it
        (['{"a": "x\\ud83d', '\\ude00"}'], ['{"a":"x', '\\ud83d\\ude00"}']),
        (['{"a": "x\\uD83D\\', "u", "DE00", '"}'], ['{"a":"x', "", "\\uD83D\\uDE00", '"}']),
        # lone halves: raw (no UTF-8 spelling) or escaped (jiter refuses it)
        (['{"a": "\\ud800"}'], ['{"a":"\\ufffd"}']),
        (['{"a": "\\udc00\\n"}'], ['{"a":"\\ufffd\\n"}']),
        (['{"a": "\\ud83d\\u00e9"}'], ['{"a":"\\ufffd\\u00e9"}']),
        (['{"a": "x\ud800y\udc00"}'], ['{"a":"x\ufffdy\ufffd"}']),
        (['{"a": "\udc00\ud800', '"}'], ['{"a":"\ufffd', '\ufffd"}']),
        (['{"\\udbff": 1}'], ['{"\\ufffd":1}']),
    ],
)
def test_surrogate_halves_go_out_as_the_sdk_can_read_them(
    pieces: list[str], sent: list[str]
) -> None:
    """The anthropic SDK encodes each piece as UTF-8 and jiter refuses a lone half's
    escape: either failed the client's stream (UnicodeEncodeError, ValueError)."""
    prefix, joined, outs = ObjectPrefix(), "", []
    for piece in pieces:
        outs.append(prefix.take(piece))
        joined += outs[-1]
        _read_as_the_sdk_does(outs[-1], joined, prefix.closing())
    assert outs == sent


# what a piece may leave to be read again with the next: an escaped surrogate pair cut
# short before its last character (a literal, "fals", is shorter)
_MOST_READ_AGAIN = len("\\ud83d\\ude0")


@pytest.mark.parametrize(
    "text",
    [
        '{"' + "k" * 3000 + '": 1}',  # a long key
        '{"a": -' + "1" * 3000 + ".5e+10}",  # a long number
        '{"a": "' + "x\\n" * 1000 + '"}',  # a long string
    ],
)
def test_each_character_is_read_once_whatever_the_pieces(text: str) -> None:
    """A key or a number a piece cut short was read again from its start with every
    next piece: a backend's 1 MB key in 10,000 pieces took ~10 s of the event loop."""
    prefix, sent = ObjectPrefix(), ""
    for c in text:
        sent += prefix.take(c)
        assert len(prefix._rest) <= _MOST_READ_AGAIN
    assert prefix.whole and sent == text.replace(": ", ":")


_JSONISH = st.text(st.sampled_from('{}[]:,"\\ \n\tuetrfalsn0123456789-+.eEaxdD\x01é\ud800😀'))


@st.composite
def _damaged(draw: st.DrawFn) -> str:
    """Text that may be no JSON: JSON-like characters, or an object's text cut short,
    with characters changed, left out or put in."""
    if draw(st.booleans()):
        return draw(_JSONISH)
    text, _ = text_of(draw, draw(OBJECTS), draw(st.sampled_from(SPELLINGS)))
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(_JSONISH.filter(lambda t: len(t) < 3))
            + text[at + draw(st.integers(0, 2)) :]
        )
    return text[: draw(st.integers(0, len(text)))]


@settings(max_examples=400, deadline=None, derandomize=True)
@given(data=st.data(), text=_damaged())
def test_any_text_cut_anywhere_goes_out_as_an_object_start(data: st.DataObject, text: str) -> None:
    """No exception; what goes out is always the start of an object the SDK reads, and
    closes as one; nothing more after it broke or ended; the same however it is cut."""
    prefix, sent = ObjectPrefix(), ""
    for piece in pieces_of(data.draw, text):
        over = prefix.broken or prefix.whole
        out = prefix.take(piece)
        assert not (over and out)
        sent += out
        assert prefix.sent == bool(sent)
        assert len(prefix._rest) <= _MOST_READ_AGAIN
        _read_as_the_sdk_does(out, sent, prefix.closing())
    whole = ObjectPrefix()
    assert (whole.take(text), whole.closing(), whole.broken) == (
        sent,
        prefix.closing(),
        prefix.broken,
    )
    try:
        value = json.loads(text)
    except ValueError:
        return
    if isinstance(value, dict):  # JSON already: whole, as it reads
        assert prefix.whole and _same(json.loads(sent), replaced_loads(text))
