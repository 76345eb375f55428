"""The proxy's JSON codec: orjson, with the standard library where orjson refuses."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy import jsonutil
from trioproxy.jsonutil import (
    NestedTooDeeply,
    compact_json,
    compact_json_text,
    escape_line_separators,
    loads,
    member_near_the_end,
    plain_usage_counts,
    top_level_member,
    whole_number,
)

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


LINE_ENDS_IN_TEXT = st.text(alphabet=st.sampled_from("a\u0085\u2028\u2029\n\x0b\x1c"))


@given(st.recursive(LINE_ENDS_IN_TEXT, lambda inner: st.lists(inner, max_size=3), max_leaves=8))
def test_what_it_writes_is_one_line_to_pythons_splitlines(value: object) -> None:
    """ollama-python reads NDJSON with httpx's ``iter_lines``, which splits where
    ``str.splitlines`` does: also at U+0085, U+2028 and U+2029, which JSON may leave
    unescaped. A line cut there fails to decode in the client."""
    written = compact_json(value)
    assert len(written.decode().splitlines()) == 1
    assert loads(written) == value


def test_line_separators_are_escaped_in_text_that_is_not_all_ascii() -> None:
    assert escape_line_separators(b'{"a":"plain"}') == b'{"a":"plain"}'
    mixed = '{"a":"é\u0085b\u2028c\u2029"}'.encode()
    assert escape_line_separators(mixed) == '{"a":"é\\u0085b\\u2028c\\u2029"}'.encode()


def test_a_lone_surrogate_from_a_client_is_written_as_the_escape_it_came_as() -> None:
    value = loads(b'{"content": "half an emoji \\ud83d"}')
    assert compact_json(value) == b'{"content":"half an emoji \\ud83d"}'
    assert loads(compact_json(value)) == value


def test_compact_utf8_without_spaces() -> None:
    assert compact_json({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()
    assert compact_json_text({"b": None}) == '{"b":null}'


def test_what_only_the_standard_library_accepts_still_goes_through() -> None:
    big = 2**70
    assert loads(b'{"seed": %d}' % big) == {"seed": big}
    # orjson decodes these as floats: -9.223372036854776e+18, 1.8446744073709552e+19
    for exact in (-(2**63) - 1, 2**64, 2**64 + 1, -(10**30) - 7):
        value = loads(b'{"seed": %d}' % exact)["seed"]
        assert value == exact and type(value) is int
        assert loads(f"[{exact}]") == [exact]
    # a long run of digits after a decimal point is a float's fraction: orjson decodes it
    # (the standard library's slower path is only for integers)
    from trioproxy.jsonutil import _has_long_digit_run

    assert not _has_long_digit_run(b'{"embedding": [0.00012345678901234567, -1.5e-05]}')
    assert _has_long_digit_run(b"12345678901234567890") and _has_long_digit_run(
        b"[-1234567890123456789]"
    )
    assert compact_json({"seed": big}) == b'{"seed":%d}' % big
    assert math.isnan(loads(b"[NaN]")[0])
    assert compact_json({1: "a"}) == b'{"1":"a"}'


def test_invalid_json_raises_the_standard_librarys_error() -> None:
    with pytest.raises(json.JSONDecodeError, match="Expecting"):
        loads(b'{"model": ')


@pytest.mark.parametrize(
    "text",
    [
        b"[" * 2000 + b"]" * 2000,  # past orjson's 1,024 levels: the standard library's turn
        "[" * 2000 + "]" * 2000,
        b"[" * 2000 + b"12345678901234567890" + b"]" * 2000,  # straight to the standard library
    ],
)
def test_json_too_deep_to_read_is_a_value_error_not_a_recursion_error(
    text: bytes | str,
) -> None:
    """A RecursionError reached the request handler, which could not tell whose body it
    was (the client's, or the backend's): a ValueError is bad JSON to every caller."""
    with pytest.raises(NestedTooDeeply, match="nested too deeply") as raised:
        loads(text)
    assert isinstance(raised.value, ValueError)


def test_json_too_deep_to_write_is_a_value_error_not_a_recursion_error() -> None:
    """orjson writes 254 levels, the standard library about 900: what orjson reads (1,024)
    may not be written again."""
    deep = loads(b"[" * 1020 + b"]" * 1020)
    with pytest.raises(NestedTooDeeply, match="nested too deeply"):
        compact_json(deep)
    assert compact_json(loads(b"[" * 300 + b"]" * 300)) == b"[" * 300 + b"]" * 300


# keys and strings that look like the key being looked for, or end in a backslash
TRICKY_TEXT = st.sampled_from(
    ["usage", '"usage', 'usage"', '"usage"', "usage\\", "\\", '\\"usage', '"usage":{', "x"]
) | st.text(max_size=6)
TRICKY_VALUES = st.recursive(
    st.none() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TRICKY_TEXT, inner, max_size=4),
    max_leaves=16,
)


@given(
    st.dictionaries(TRICKY_TEXT, TRICKY_VALUES, max_size=5) | TRICKY_VALUES,
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(1, 200),
    st.integers(0, 400),
)
def test_top_level_member_agrees_with_decoding_the_whole_body(
    value: object, spaced: bool, ascii_only: bool, from_the_start: bool, head: int, within: int
) -> None:
    """``from_the_start``: a key with anything after it is read from what precedes it, as
    one followed by more than 4 KiB is (these bodies are shorter), its value from a
    window of ``head`` bytes (64 KiB in use) that may cut it, or a character of it;
    ``within``: the end searched (256 KiB in use) may cut the key."""
    dumped = json.dumps(value, indent=1 if spaced else None, ensure_ascii=ascii_only)
    body = dumped.encode("utf-8", "surrogatepass")
    try:
        expected = json.loads(body).get("usage") if isinstance(value, dict) else None
    except UnicodeDecodeError:  # a lone surrogate written raw: no JSON body
        return
    with pytest.MonkeyPatch.context() as patch:
        if from_the_start:
            patch.setattr(jsonutil, "_LONG_TAIL", 0)
        patch.setattr(jsonutil, "_HEAD_BYTES", head)
        assert top_level_member(body, "usage") == expected
        for near in (0, 8, len(body) // 2, len(body), within):  # read near the end too
            found, usage = member_near_the_end(body, "usage", near)
            assert usage == (expected if found else None)


def test_top_level_member_reads_a_completion_and_tolerates_garbage() -> None:
    completion = {
        "id": "c1",
        "choices": [{"message": {"content": 'say "usage": {"prompt_tokens": 9}'}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5},
        "system_fingerprint": "fp",
    }
    assert top_level_member(compact_json(completion), "usage") == completion["usage"]
    assert top_level_member(b'{"a": {"usage": 1}, "usage": 2}', "usage") == 2
    assert top_level_member(b'{"usage": 1, "a": {"usage": 2}}', "usage") == 1
    assert top_level_member(b'{"usage": 1, "usage": 2}', "usage") == 2  # the last one wins
    assert top_level_member(b'[{"usage": 1}]', "usage") is None
    assert top_level_member(b'{"usage": 1', "usage") is None  # truncated
    assert top_level_member(b"not json", "usage") is None


def _decoded_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of what ``top_level_member`` hands orjson from now on; the whole-body
    fallback (``loads``) must not be reached."""
    sizes: list[int] = []

    def counted(data: bytes) -> Any:
        sizes.append(len(data))
        return orjson.loads(data)

    def whole(data: bytes, **_: Any) -> Any:
        raise AssertionError(f"the whole body decoded ({len(data)} bytes)")

    fake = SimpleNamespace(loads=counted, JSONDecodeError=orjson.JSONDecodeError)
    monkeypatch.setattr(jsonutil, "orjson", fake)
    monkeypatch.setattr(jsonutil, "loads", whole)
    return sizes


@pytest.mark.parametrize("spaced", [False, True])
def test_a_usage_written_before_the_data_is_read_without_decoding_the_data(
    monkeypatch: pytest.MonkeyPatch, spaced: bool
) -> None:
    """llama.cpp's server writes ``usage`` before its embeddings: read from the members
    before it and its own value, never the vectors (the tail from its key is the whole
    body: a 32 MB answer took 60-330 ms to decode)."""
    usage = {"prompt_tokens": 600, "total_tokens": 600}
    data = [{"embedding": [0.25] * 1024, "index": i, "object": "embedding"} for i in range(200)]
    answer = {"model": "nomic", "object": "list", "usage": usage, "data": data}
    body = (json.dumps(answer, indent=1) if spaced else json.dumps(answer)).encode()
    sizes = _decoded_sizes(monkeypatch)
    assert top_level_member(body, "usage") == usage
    assert max(sizes, default=0) < 100  # the members before it, "{model, object}"
    assert top_level_member(b'{"usage": {"a": 1}, "data": [1, 2]}', "usage") == {"a": 1}


def test_a_usage_near_the_start_that_is_no_top_level_member_is_not_taken() -> None:
    for body, expected in [
        (b'{"a": {"usage": 1}, "b": [' + b"2, " * 100 + b"3]}", None),  # nested
        (b'{"a": ["x", "usage"], "b": [' + b"2, " * 100 + b"3]}", None),  # a string value
        (b'{"a": "x", "usage": 1, "b": [' + b"2, " * 100 + b"3]}", 1),
        (b'{"usage": 1, "usage": [' + b"2, " * 100 + b"3]}", [2] * 100 + [3]),  # the last
        (b'{"a": "\\\\", "usage": 1, "b": [' + b"2, " * 100 + b"3]}", 1),  # a "\\"
        (b'{"usage": 1 2, "b": [' + b"2, " * 100 + b"3]}", None),  # not JSON
    ]:
        assert top_level_member(body, "usage") == expected, body


def test_a_whole_number_is_a_count_a_counter_holds() -> None:
    for value, expected in [(0, 0), (7, 7), (7.9, 7), (2**53 - 1, 2**53 - 1), ("7", None)]:
        assert whole_number(value) == expected, value
    for absurd in (-1, -0.5, 2**53, 10**400, math.inf, -math.inf, math.nan, True, None):
        assert whole_number(absurd) is None, absurd
    assert whole_number(loads(b"1e400")) is None and whole_number(loads(b"NaN")) is None


# what a usage's counts may be written as: plain ones the shortcut reads, and every kind it
# must leave to the general way (a leading zero or a sign is no JSON number, 16 digits may
# be past what a counter holds exactly, a string or a fraction is no count)
COUNT_TEXT = st.integers(0, 10**15 - 1).map(str) | st.sampled_from(
    ["0", "00", "07", "-1", "-0", "1.5", "1e3", "null", '"9"', str(10**15), str(2**53), str(2**64)]
)
PLAIN_BODY = b'{"id":"c","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":7,'


def _usage_body(
    before: dict[str, Any],
    counts: tuple[str, str, str],
    spaced: bool,
    extra_inside: bool,
    after: bytes,
    escaped: bool,
) -> bytes:
    prompt, completion, total = counts
    comma, colon = (", ", ": ") if spaced else (",", ":")
    members = [f'"prompt_tokens"{colon}{prompt}', f'"completion_tokens"{colon}{completion}']
    members.append(f'"total_tokens"{colon}{total}')
    if extra_inside:
        members.append(f'"prompt_tokens_details"{colon}{{"cached_tokens"{colon}0}}')
    usage = f'"usage"{colon}{{{comma.join(members)}}}'.encode()
    head = compact_json(before)[:-1]
    head += b"," if len(head) > 1 else b""
    if escaped:  # the key's quote escaped: a key 'x"usage' (no usage), or no JSON
        head += b'"x\\'
    return head + usage + b"}" + after


@settings(max_examples=400)
@given(
    st.dictionaries(TRICKY_TEXT, TRICKY_VALUES, max_size=3),
    st.tuples(COUNT_TEXT, COUNT_TEXT, COUNT_TEXT),
    st.booleans(),
    st.booleans(),
    st.sampled_from([b"", b"", b"\n", b" \r\n\t", b"}", b",", b" x", b'"usage":1}']),
    st.booleans(),
)
def test_plain_usage_counts_are_what_the_general_way_reads(
    before: dict[str, Any],
    counts: tuple[str, str, str],
    spaced: bool,
    extra_inside: bool,
    after: bytes,
    escaped: bool,
) -> None:
    """The shortcut's counts are the general way's (``top_level_member``, then
    ``note_usage_counts``' ``whole_number``), and it reads every plain usage it is for."""
    body = _usage_body(before, counts, spaced, extra_inside, after, escaped)
    read = plain_usage_counts(body)
    usage = top_level_member(body, "usage")
    if read is not None:
        assert isinstance(usage, dict)
        general = (
            whole_number(usage.get("prompt_tokens")),
            whole_number(usage.get("completion_tokens")),
        )
        assert read == general and all(type(count) is int for count in read)
    plain = all(c.isdigit() and (c == "0" or c[0] != "0") and len(c) <= 15 for c in counts)
    if plain and not (spaced or extra_inside or escaped) and after.strip() == b"":
        assert read is not None  # the shortcut is not lost to a change


def test_plain_usage_counts_read_the_usual_completion_and_leave_the_rest() -> None:
    assert plain_usage_counts(PLAIN_BODY + b'"total_tokens":16}}') == (9, 7)
    assert plain_usage_counts(PLAIN_BODY + b'"total_tokens":16}}\n') == (9, 7)
    for other in (
        PLAIN_BODY + b'"total_tokens":16}',  # cut
        PLAIN_BODY + b'"total_tokens":16,"x":{}}}',  # a member after it
        PLAIN_BODY.replace(b'"usage"', b'\\"usage"') + b'"total_tokens":16}}',  # escaped
        b'{"a":{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}}',  # nested
        b"{}",
        b"",
    ):
        assert plain_usage_counts(other) is None, other
    # the key itself at the start of the body, as top_level_member reads it
    alone = b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}'
    assert plain_usage_counts(alone) == (1, 2)
    assert top_level_member(alone, "usage") == {
        "prompt_tokens": 1,
        "completion_tokens": 2,
        "total_tokens": 3,
    }
