"""``partial_json.ObjectPrefix``: what goes out of a tool call's arguments as they come is
always the start of a JSON object the clients can read, and ends as the whole one."""

from __future__ import annotations

import itertools
import json
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
