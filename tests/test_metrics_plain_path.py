"""A request without a stream is counted its own, shorter way
(``MetricsCollector._count_batch``: its series' batch written in the batch's loop, its
window row by column, ``WindowStore.append_plain_rows``, and histograms bucketed by
sorting, ``observe_many``). What it counts must be exactly what the general way counts:
compared here with a collector that takes the general way for every request (full
window rows, every stream argument passed, each value's bucket found one by one), over
random sequences of streams and plain requests that wrap the window around."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy import routes_openai
from trioproxy.exchange import RequestState
from trioproxy.metrics import MetricsCollector, RequestMetrics
from trioproxy.metrics import series as series_module

_WINDOW = 7  # small: the sequences overwrite stream slots with plain requests and back


def _tallied(child: Any, values: list[float]) -> None:
    """observe_many as it was before it sorted: the sum, then a tally value by value."""
    child._sum.inc(sum(values))
    series_module._observe_each(child._upper_bounds, child._buckets, values)


def _general_count_batch(
    self: MetricsCollector, pending: list[RequestMetrics], debug: bool
) -> None:
    """Every record the general way, one call each (``_count``: every stream argument
    passed, a full window row)."""
    for m in pending:
        self._count(m, debug)


_records = st.lists(
    st.fixed_dictionaries(
        {
            "stream": st.booleans(),
            "path": st.sampled_from(["/v1/chat/completions", "/api/chat", "/api/generate"]),
            "status": st.sampled_from([200, 200, 200, 400, 499, 500, 503]),
            "model": st.sampled_from(["m1", "m2", ""]),
            "duration_ms": st.floats(min_value=1e-3, max_value=2e5),  # 0: timed at record
            "upstream_ms": st.one_of(st.none(), st.floats(min_value=-1.0, max_value=2e5)),
            "body_wait_ms": st.floats(min_value=0.0, max_value=50.0),
            "tokens": st.one_of(st.none(), st.integers(min_value=-3, max_value=10**6)),
            "chunks": st.integers(min_value=0, max_value=4),
            "replayed": st.booleans(),
            "clear": st.integers(min_value=0, max_value=30),
        }
    ),
    max_size=40,
)


def _record(spec: dict[str, Any]) -> RequestMetrics:
    m = RequestMetrics(spec["path"], "POST", model=spec["model"], timestamp=1.7e9)
    m.status_code = spec["status"]
    m.duration_ms = spec["duration_ms"]
    m.upstream_ms = spec["upstream_ms"]
    m.body_wait_ms = spec["body_wait_ms"]
    m.input_tokens = m.output_tokens = spec["tokens"]
    m.replayed = spec["replayed"]
    if spec["stream"]:
        m.streaming = True
        m.upstream_first_byte_ms = spec["upstream_ms"]
        m.overhead_ms = spec["body_wait_ms"]
        for i in range(spec["chunks"]):
            m.add_chunk(10 + i, m.start + (i + 1) / 100.0)
            if i == 0:
                m.mark_first_token(m.start + 0.01)
            m.last_token_time_ms = (i + 1) * 10.0
            m.token_chunks += 1
        m.stream_outcome = "completed" if spec["status"] == 200 else "error"
    return m


def _feed(c: MetricsCollector, specs: list[dict[str, Any]]) -> None:
    c.request_started()  # busy: the records are counted in batches
    for spec in specs:
        c.request_started()
        c.request_finished(_record(spec))
        if spec["clear"] == 0:
            c.reset()


def _readings(c: MetricsCollector) -> tuple[str, list[Any]]:
    body = c.render_prometheus(None)[0].decode()
    series = "\n".join(
        line for line in body.splitlines() if line.startswith(("http_", "trioproxy_"))
        and "process" not in line and "uptime" not in line and "active" not in line
    )  # fmt: skip
    return series, c.window.entries()


@settings(max_examples=80, deadline=None)
@given(_records)
def test_plain_requests_are_counted_as_the_general_way_counts_them(
    specs: list[dict[str, Any]],
) -> None:
    fast = MetricsCollector(max_metrics=_WINDOW, system_enabled=False, multiprocess=False)
    _feed(fast, specs)
    got = _readings(fast)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(series_module, "observe_many", _tallied)
        patch.setattr(MetricsCollector, "_count_batch", _general_count_batch)
        general = MetricsCollector(max_metrics=_WINDOW, system_enabled=False, multiprocess=False)
        _feed(general, specs)
        expected = _readings(general)
    assert got[0] == expected[0]
    assert repr(got[1]) == repr(expected[1])  # NaN-free: missing figures read as None


def test_a_plain_request_in_a_slot_a_stream_held_reads_as_no_stream() -> None:
    c = MetricsCollector(max_metrics=1, system_enabled=False, multiprocess=False)
    streamed = _record({
        "stream": True, "path": "/api/chat", "status": 200, "model": "m", "duration_ms": 9.0,
        "upstream_ms": 1.0, "body_wait_ms": 0.0, "tokens": 3, "chunks": 3, "replayed": False,
    })  # fmt: skip
    c.request_finished(streamed)
    assert c.window.entries()[0].chunks == 3
    plain = _record({
        "stream": False, "path": "/api/chat", "status": 200, "model": "m", "duration_ms": 5.0,
        "upstream_ms": 1.0, "body_wait_ms": 0.0, "tokens": 3, "chunks": 0, "replayed": False,
    })  # fmt: skip
    c.request_finished(plain)
    entry = c.window.entries()[0]
    assert entry.duration_ms == 5.0 and not entry.streaming
    assert (entry.chunks, entry.stream_bytes, entry.first_byte_ms) == (0, 0, None)
    assert (entry.first_token_ms, entry.time_per_output_token_ms) == (None, None)


_ANSWER = b'{"id":"c","object":"chat.completion","choices":[],"usage":'
_USAGES = [
    b'{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}',
    b'{"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}}',
    b'{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16,"x":{"y":1}}}',
    b'{"prompt_tokens":9.5,"completion_tokens":-7,"total_tokens":16}}',
    b'{"input_tokens":9,"output_tokens":7}}',
    b"null}",
]


def _noted(content: bytes) -> tuple[int | None, int | None]:
    metric = RequestMetrics("/v1/chat/completions", "POST")
    routes_openai._note_usage(SimpleNamespace(state=RequestState("r", metric)), content)  # type: ignore[arg-type]
    return metric.input_tokens, metric.output_tokens


@pytest.mark.parametrize("usage", _USAGES)
def test_a_relayed_answers_usage_is_noted_as_the_general_way_notes_it(
    usage: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_note_usage`` reads the plainest usage without decoding (``plain_usage_counts``):
    the counts it notes are those of ``top_level_member`` and ``note_usage_counts``."""
    content = _ANSWER + usage
    quick = _noted(content)
    monkeypatch.setattr(routes_openai, "plain_usage_counts", lambda _: None)
    assert quick == _noted(content)


def test_the_plainest_usage_is_noted_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def decoded(*_: Any) -> Any:
        raise AssertionError("decoded")

    monkeypatch.setattr(routes_openai, "top_level_member", decoded)
    assert _noted(_ANSWER + _USAGES[0]) == (9, 7)
