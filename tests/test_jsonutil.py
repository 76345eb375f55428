"""The proxy's JSON codec: orjson, with the standard library where orjson refuses."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.jsonutil import compact_json, compact_json_text, loads

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@given(JSON_VALUES)
def test_what_it_writes_decodes_to_the_same_value_with_either_library(value: object) -> None:
    written = compact_json(value)
    assert loads(written) == value == json.loads(written)


def test_compact_utf8_without_spaces() -> None:
    assert compact_json({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()
    assert compact_json_text({"b": None}) == '{"b":null}'


def test_what_only_the_standard_library_accepts_still_goes_through() -> None:
    big = 2**70
    assert loads(b'{"seed": %d}' % big) == {"seed": big}
    assert compact_json({"seed": big}) == b'{"seed":%d}' % big
    assert math.isnan(loads(b"[NaN]")[0])
    assert compact_json({1: "a"}) == b'{"1":"a"}'


def test_invalid_json_raises_the_standard_librarys_error() -> None:
    with pytest.raises(json.JSONDecodeError, match="Expecting"):
        loads(b'{"model": ')
