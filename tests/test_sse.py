"""SSE parser and encoders: spec line-ending rules, split reads, bounded buffers."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.sse import (
    SSE_DONE,
    SSE_DONE_BYTES,
    SSEEvent,
    SSEParser,
    SSEProtocolError,
    encode_sse,
    error_fields_as_data,
    openai_error_event,
)


def parse_all(*reads: bytes, max_line_bytes: int | None = None) -> list[SSEEvent]:
    parser = SSEParser() if max_line_bytes is None else SSEParser(max_line_bytes)
    events: list[SSEEvent] = []
    for data in reads:
        events += parser.feed(data)
    return events + parser.close()


def test_basic_event_and_done() -> None:
    events = parse_all(b'data: {"a":1}\n\ndata: [DONE]\n\n')
    assert events == [SSEEvent('{"a":1}'), SSEEvent(SSE_DONE)]


def test_data_with_and_without_space() -> None:
    # Only one leading space is stripped; "data:x" is legal.
    assert parse_all(b"data:x\n\ndata:  y\n\n") == [SSEEvent("x"), SSEEvent(" y")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = b"event: e" + eol + b"data: a" + eol + b"data: b" + eol + eol
    assert parse_all(stream) == [SSEEvent("a\nb", event="e")]


def test_cr_lf_split_across_reads_is_one_line_end() -> None:
    # If the CR and LF were counted as two line ends, the blank line would dispatch "a" early
    # and there would be two events.
    events = parse_all(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert events == [SSEEvent("a\nb")]


def test_cr_then_non_lf_next_read() -> None:
    assert parse_all(b"data: a\r", b"\r") == [SSEEvent("a")]


def test_comments_ignored_and_fields_kept() -> None:
    stream = b": keep-alive\n\nid: 7\nevent: delta\nretry: 100\nfoo: bar\ndata: x\n\n"
    assert parse_all(stream) == [SSEEvent("x", event="delta", id="7")]


def test_event_without_data_not_dispatched_and_event_type_resets() -> None:
    events = parse_all(b"event: ping\n\ndata: x\n\n")
    assert events == [SSEEvent("x")]


def test_last_event_id_persists() -> None:
    events = parse_all(b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n")
    assert [e.id for e in events] == ["1", "1", None]


def test_empty_data_line_dispatches_empty_event() -> None:
    assert parse_all(b"data\n\ndata:\n\n") == [SSEEvent(""), SSEEvent("")]


def test_multibyte_split_across_reads() -> None:
    payload = 'data: {"t":"héllo 世界 🎉"}\n\n'.encode()
    for cut in range(1, len(payload)):
        assert parse_all(payload[:cut], payload[cut:]) == [SSEEvent('{"t":"héllo 世界 🎉"}')]


def test_invalid_utf8_replaced_not_fatal() -> None:
    assert parse_all(b"data: a\xffb\n\n") == [SSEEvent("a\ufffdb")]


def test_leading_bom_stripped() -> None:
    assert parse_all(b"\xef\xbb", b"\xbfdata: x\n\n") == [SSEEvent("x")]


def test_close_flushes_unterminated_event_and_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\ndata: b") == []
    assert parser.close() == [SSEEvent("a\nb")]


def test_close_flushes_truncated_multibyte_as_replacement() -> None:
    assert parse_all("data: é".encode()[:-1]) == [SSEEvent("\ufffd")]


def test_line_too_long_incomplete_raises() -> None:
    parser = SSEParser(max_line_bytes=16)
    parser.feed(b"data: 0123456789")  # exactly 16 bytes: fine
    with pytest.raises(SSEProtocolError):
        parser.feed(b"x")


def test_line_too_long_complete_raises() -> None:
    with pytest.raises(SSEProtocolError):
        parse_all(b"data: " + b"x" * 100 + b"\n\n", max_line_bytes=64)


def test_line_limit_counts_bytes_not_characters() -> None:
    # 10 characters but 30 bytes.
    with pytest.raises(SSEProtocolError):
        parse_all(("世" * 10 + "\n").encode(), max_line_bytes=20)
    with pytest.raises(SSEProtocolError):
        SSEParser(max_line_bytes=20).feed(("世" * 10).encode())


def test_many_short_lines_under_limit_ok() -> None:
    stream = b"".join(b"data: %d\n\n" % i for i in range(1000))
    events = parse_all(stream, max_line_bytes=16)
    assert [e.data for e in events] == [str(i) for i in range(1000)]


def test_an_event_of_many_short_data_lines_is_bounded_too() -> None:
    """Every line is short, but no blank line ends the event: its data must not grow
    without bound (the fast path and the general path both count)."""
    parser = SSEParser(max_line_bytes=64)
    assert parser.feed(b"data: 0123456789\n" * 5) == []  # 55 characters held, newlines too
    with pytest.raises(SSEProtocolError, match="event exceeds"):
        parser.feed(b"data: 0123456789\n")
    general = SSEParser(max_line_bytes=64)
    general.feed(b"data: 0123456789\r" * 5 + b"data: 0123456789abcdef")
    with pytest.raises(SSEProtocolError, match="event exceeds"):
        general.close()  # the unfinished last line goes through _process_line
    # empty data lines count too (each adds a newline to the event)
    empty = SSEParser(max_line_bytes=1000)
    with pytest.raises(SSEProtocolError, match="event exceeds"):
        empty.feed(b"data:\n" * 2000)
    # many events, each under the limit, are fine
    assert len(parse_all(b"data: 0123456789\ndata: x\n\n" * 100, max_line_bytes=64)) == 100


def test_is_a_value_error() -> None:
    assert issubclass(SSEProtocolError, ValueError)


def test_encode_sse_compact_utf8() -> None:
    out = encode_sse({"a": "é\nx", "b": [1, 2]})
    assert out == 'data: {"a":"é\\nx","b":[1,2]}\n\n'.encode()
    assert parse_all(out) == [SSEEvent('{"a":"é\\nx","b":[1,2]}')]


def test_done_bytes() -> None:
    assert parse_all(SSE_DONE_BYTES) == [SSEEvent(SSE_DONE)]


def test_openai_error_event_shape() -> None:
    out = openai_error_event("boom")
    (event,) = parse_all(out)
    assert json.loads(event.data) == {
        "error": {"message": "boom", "type": "api_error", "param": None, "code": None}
    }
    (event,) = parse_all(openai_error_event("slow", type_="timeout", code="504"))
    assert json.loads(event.data)["error"] == {
        "message": "slow",
        "type": "timeout",
        "param": None,
        "code": "504",
    }


# -- property: any split of the byte stream yields the same events ------------------------

_text = st.text(
    alphabet=st.sampled_from(["a", "é", "世", "🎉", " ", ":", "\u2028", "x"]), max_size=8
)
_line = st.one_of(
    st.builds(lambda t: "data:" + t, _text),
    st.builds(lambda t: "data: " + t, _text),
    st.builds(lambda t: "event: " + t, _text),
    st.builds(lambda t: "id: " + t, _text),
    st.builds(lambda t: ": " + t, _text),
    st.just("data"),
    st.just(""),
)
_eol = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def _streams_and_cuts(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    lines = draw(st.lists(st.tuples(_line, _eol), max_size=20))
    stream = "".join(line + eol for line, eol in lines).encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    return stream, cuts


@settings(max_examples=300, deadline=None)
@given(_streams_and_cuts())
def test_any_split_yields_same_events(case: tuple[bytes, list[int]]) -> None:
    stream, cuts = case
    whole = parse_all(stream)
    bounds = [0, *cuts, len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert parse_all(*pieces) == whole


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=10), st.data())
def test_encoded_events_roundtrip_byte_by_byte(texts: list[str], data: st.DataObject) -> None:
    objs = [{"t": t} for t in texts]
    stream = b"".join(encode_sse(o) for o in objs) + SSE_DONE_BYTES
    step = data.draw(st.integers(1, 7))
    pieces = [stream[i : i + step] for i in range(0, len(stream), step)]
    events = parse_all(*pieces)
    assert [json.loads(e.data) for e in events[:-1]] == objs
    assert events[-1].data == SSE_DONE


def test_an_error_field_becomes_an_error_event_with_openais_error_chunk() -> None:
    """llama.cpp's server before October 2025 wrote failures as ``error: {json}``."""
    parser = SSEParser()
    events = parser.feed(b'error: {"code":400,"message":"too long"}\n\ndata: [DONE]\n\n')
    assert [(e.event, json.loads(e.data)) for e in events[:1]] == [
        ("error", {"error": {"code": 400, "message": "too long"}})
    ]
    assert events[1].data == SSE_DONE
    assert json.loads(SSEParser().feed(b"error: out of memory\n\n")[0].data) == {
        "error": {"message": "out of memory"}
    }


def test_error_lines_are_rewritten_as_data_lines_and_nothing_else() -> None:
    raw = b'data: {"a":1}\n\nerror: {"message":"x"}\r\n\r\ndata: [DONE]\n\n'
    assert error_fields_as_data(raw) == (
        b'data: {"a":1}\n\ndata: {"error":{"message":"x"}}\r\n\r\ndata: [DONE]\n\n'
    )
    events = SSEParser().feed(error_fields_as_data(raw))
    assert [e.event for e in events] == [None, None, None]


def test_error_lines_after_a_cr_alone_are_rewritten_too() -> None:
    """A CR alone ends a line as LF does; the rewrite looked for lines after an LF only,
    so after ``\r`` line ends the ``error:`` line reached the openai SDK, which ignores it,
    and the failed stream read as a finished one."""
    raw = b'data: {"a":1}\r\rerror: {"message":"x"}\r\rdata: [DONE]\r\r'
    assert error_fields_as_data(raw) == (
        b'data: {"a":1}\r\rdata: {"error":{"message":"x"}}\r\rdata: [DONE]\r\r'
    )
    assert error_fields_as_data(b"data: x\rerror:no json\r\r") == (
        b'data: x\rdata: {"error":{"message":"no json"}}\r\r'
    )
    assert error_fields_as_data(b"data: a\rerror:\r") == (
        b'data: a\rdata: {"error":{"message":"the backend reported an error"}}\r'
    )
    # a value that says "error:" is no field
    assert error_fields_as_data(b"data: error: x\r\r") == b"data: error: x\r\r"


def test_mid_event_says_whether_the_bytes_so_far_end_inside_an_event() -> None:
    """What the /v1 relay holds back, so it never relays half an event."""
    parser = SSEParser()
    assert not parser.mid_event
    for piece, inside in [
        (b'data: {"a"', True),  # a line cut short
        (b": 1}\n", True),  # the line is whole, the event is not
        (b"\n", False),  # its blank line ends it
        (b": ping\n", False),  # a comment is no event
        (b"event: done\n", True),
        (b"data: x\r\n\r\n", False),
    ]:
        parser.feed(piece)
        assert parser.mid_event is inside, piece


def _whole_events(data: bytes, mid_event: bool) -> tuple[bytes, bytes]:
    """What a fresh hold lets out of one read, and what it keeps."""
    from trioproxy.relay import _HeldEvent

    held = _HeldEvent()
    out = held.whole_events(data, mid_event)
    return out, held._release(b"")


def test_only_whole_events_are_relayed_when_a_read_ends_inside_one() -> None:
    assert _whole_events(b"data: 1\n\ndata: 2", True) == (b"data: 1\n\n", b"data: 2")
    assert _whole_events(b"data: 1\r\n\r\ndata: 2\r\n", True) == (
        b"data: 1\r\n\r\n",
        b"data: 2\r\n",
    )
    assert _whole_events(b"data: 1\r\rdata", True) == (b"data: 1\r\r", b"data")
    assert _whole_events(b"data: 1\n\rdata", True) == (b"data: 1\n\r", b"data")  # LF, then CR
    assert _whole_events(b"data: half", True) == (b"", b"data: half")
    assert _whole_events(b"data: 1\n\n", False) == (b"data: 1\n\n", b"")


def test_an_event_end_split_between_reads_is_found() -> None:
    """Each read is searched alone (linear time), so an end that begins in what is held
    and finishes in the next read must still end the event there."""
    from trioproxy.relay import _HeldEvent

    for end in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        for split in range(1, len(end)):
            held, parser, out = _HeldEvent(), SSEParser(), b""
            for read in (b"data: 1" + end[:split], end[split:] + b"data: 2"):
                parser.feed(read)  # as the relay does: the parser says where it is
                out += held.whole_events(read, parser.mid_event)
            # the first event out whole, the second held (however the end was split)
            assert out.startswith(b"data: 1" + end[:2]) and b"data: 2" not in out, (end, split)
            assert out + held.completed() == b"data: 1" + end + b"data: 2\n\n"


def test_a_large_event_in_many_reads_is_held_in_linear_time() -> None:
    """Joining and searching everything held at each read made a 64 MB event cost 50 s
    of CPU: 4 MB in 4 KiB reads took 0.17 s then; counted in operations here, not time."""
    from trioproxy.relay import _HeldEvent

    held = _HeldEvent()
    piece = b"x" * 4096
    assert held.whole_events(b'data: {"a":"', True) == b""
    for _ in range(1024):
        assert held.whole_events(piece, True) == b""
        assert len(held._parts[-1]) == 4096  # appended, never re-joined
    assert held.whole_events(b'"}\n\n', False).endswith(b'"}\n\n')
    assert not held


def test_reads_in_line_counts_the_reads_in_a_row_that_ended_no_line() -> None:
    parser = SSEParser()
    parser.feed(b"data: a\n\ndat")
    assert parser.reads_in_line == 0  # a line ended in that read
    parser.feed(b"a: ")
    parser.feed(b"b")
    assert parser.reads_in_line == 2
    assert parser.feed(b"\n\n") == [SSEEvent("b")] and parser.reads_in_line == 0


def test_strict_utf8_refuses_what_the_client_could_not_decode() -> None:
    assert SSEParser().feed(b"data: \xff\n\n") == [SSEEvent("\ufffd")]  # lenient by default
    strict = SSEParser(strict_utf8=True)
    assert strict.feed(b"data: \xc3") == []  # half a character: not yet an error
    assert strict.feed(b"\xa9\n\n") == [SSEEvent("\u00e9")]
    with pytest.raises(SSEProtocolError, match="not valid UTF-8"):
        strict.feed(b"data: \xff\n\n")
    cut = SSEParser(strict_utf8=True)
    cut.feed(b"data: \xc3")
    with pytest.raises(SSEProtocolError, match="inside a UTF-8 character"):
        cut.close()
