"""Metrics semantics with a scripted ground truth: counters, JSON, window, health, labels."""

from __future__ import annotations

import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import trioproxy.metrics as metrics_pkg
from trioproxy.metrics import MetricsCollector, RequestMetrics
from trioproxy.metrics import collector as collector_mod
from trioproxy.metrics import store as st_mod
from trioproxy.metrics.store import WindowStore, percentile


def scrape(c: MetricsCollector) -> dict[str, list[tuple[dict[str, str], float]]]:
    body, ctype = c.render_prometheus(None)
    assert ctype.startswith("text/plain; version=0.0.4")
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: dict, name: str, **match: str) -> float:
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in match.items())
    )


def req(
    endpoint: str, status: int, ms: float, model: str = "", method: str = "POST", **kw
) -> RequestMetrics:
    return RequestMetrics(
        endpoint=endpoint, method=method, status_code=status, duration_ms=ms, model=model, **kw
    )


def stream(
    endpoint: str,
    outcome: str,
    chunks: list[tuple[float, int]],
    duration_ms: float,
    *,
    model: str = "llama3",
    status: int = 200,
    first_token_ms: float | None = None,
    **kw,
) -> RequestMetrics:
    m = RequestMetrics(
        endpoint=endpoint, method="POST", status_code=status, model=model, streaming=True, **kw
    )
    for at_ms, size in chunks:
        m.add_chunk(size, m.start + at_ms / 1000.0)
    if first_token_ms is not None:
        m.mark_first_token(m.start + first_token_ms / 1000.0)
    m.stream_outcome = outcome
    m.duration_ms = duration_ms
    return m


def scripted() -> list[RequestMetrics]:
    """Ten requests whose every figure is known (see the asserts)."""
    return [
        req("/api/chat", 200, 100.0, "llama3", input_tokens=10, output_tokens=20, upstream_ms=90.0),
        req("/api/chat", 200, 300.0, "llama3"),
        req("/v1/chat/completions", 500, 50.0, "gpt"),
        req("/api/generate", 404, 10.0, "nope"),
        req("/api/chat", 499, 1000.0, "llama3"),  # non-stream, client went away
        stream(
            "/api/chat", "completed", [(50, 100), (150, 100), (250, 100)], 260.0,
            first_token_ms=60.0, output_tokens=3, tokens_counted=True,
            upstream_first_byte_ms=45.0, overhead_ms=5.0,
        ),
        stream("/v1/chat/completions", "cancelled", [(20, 10), (40, 10)], 45.0, model="gpt"),
        stream("/api/generate", "timeout", [(30, 5)], 5000.0),
        stream("/api/chat", "error", [], 70.0),
        req("/custom/endpoint", 200, 150.5, "custom-model", method="GET"),
    ]  # fmt: skip


@pytest.fixture
def collector() -> MetricsCollector:
    c = MetricsCollector(system_enabled=False)
    for m in scripted():
        c.request_started()
        c.request_finished(m)
    return c


# ----------------------------------------------------------------------------- status rules


@pytest.mark.parametrize(
    ("code", "outcome", "expected"),
    [
        (200, None, 200),
        (200, "completed", 200),
        (200, "cancelled", 499),
        (0, "cancelled", 499),
        (200, "timeout", 504),
        (200, "error", 502),
        (404, "cancelled", 404),
        (404, "error", 404),  # a refusal after an early start (STREAM_KEEPALIVE_SECONDS)
        (429, "timeout", 429),
        (503, "error", 503),
        (500, "timeout", 500),
        (499, None, 499),
    ],
)
def test_effective_status(code: int, outcome: str | None, expected: int) -> None:
    assert st_mod.effective_status(code, outcome) == expected


def test_status_classes() -> None:
    c = st_mod.status_class
    assert [c(200), c(204), c(302)] == [st_mod.SUCCESS] * 3
    # 501: a feature not offered (ollama push): the client's request, not a failure
    # 505: HTTP/2's preface on the HTTP/1.1 port (a gRPC client, a scanner): the client's
    assert [c(400), c(404), c(429), c(501), c(505)] == [st_mod.CLIENT_ERROR] * 5
    assert c(499) == st_mod.CANCELLED
    assert [c(500), c(502), c(503), c(504), c(0), c(100), c(700)] == [st_mod.ERROR] * 7
    assert st_mod.status_label(700) == "0" and st_mod.status_label(0) == "0"


def test_505_is_a_client_error_everywhere() -> None:
    """A client sending HTTP/2's preface (``PRI * HTTP/2.0``) to the HTTP/1.1 port gets 505
    (endpoint ``other``). Counted as an error, any such client raised error_rate, degraded
    /v1/metrics/health and fired HighErrorRate: like 501 it is a client error."""
    c = MetricsCollector(system_enabled=False, health_min_requests=1)
    for _ in range(20):
        c.record(req("PRI", 505, 1.0, method="PRI"))
    c.record(req("/api/chat", 200, 5.0))
    j = c.summary()
    assert j["error_rate"] == 0.0
    assert j["client_error_rate"] == pytest.approx(20 / 21)
    body, status = c.health()
    assert (body["status"], status) == ("healthy", 200)
    s = scrape(c)
    assert total(s, "http_requests_total", status="505", endpoint="other") == 20
    assert total(s, "http_request_error_rate") == 0
    assert total(s, "http_request_client_error_rate") == pytest.approx(20 / 21)
    assert total(s, "http_request_errors_per_endpoint_total") == 0


def test_stream_outcome_fallbacks() -> None:
    m = RequestMetrics(endpoint="/api/chat", method="POST", streaming=True, status_code=200)
    assert st_mod.stream_outcome(m) == "completed"
    m.stream_cancelled = True
    assert st_mod.stream_outcome(m) == "cancelled"
    m = RequestMetrics(endpoint="/api/chat", method="POST", streaming=True, status_code=504)
    assert st_mod.stream_outcome(m) == "timeout"
    m = RequestMetrics(endpoint="/api/chat", method="POST", streaming=True, status_code=502)
    assert st_mod.stream_outcome(m) == "error"


def test_time_per_output_token_and_streams_without_a_first_token() -> None:
    """Once per stream with two tokens or more: (last - first) / (tokens - 1), by usage or
    by the chunks counted; a stream without a first token counts by why it ended."""
    c = MetricsCollector(system_enabled=False)
    timed = stream("/api/chat", "completed", [(50.0, 10)], 400.0, first_token_ms=100.0)
    # 9 gaps of 20 ms between the 10 tokens streamed; the usage also counts 500 reasoning
    # tokens the backend never streamed, which must not shrink the gap
    timed.last_token_time_ms, timed.token_chunks, timed.output_tokens = 280.0, 10, 510
    single = stream("/api/chat", "completed", [(50.0, 10)], 400.0, first_token_ms=100.0)
    single.last_token_time_ms, single.token_chunks = 100.0, 1  # no gap to measure
    empty = stream("/v1/chat/completions", "completed", [(50.0, 10)], 60.0)
    replayed = stream("/v1/responses/resp_1", "completed", [(50.0, 10)], 60.0, replayed=True)
    cut = stream("/v1/chat/completions", "cancelled", [(50.0, 10)], 60.0, status=499)
    late = stream("/api/chat", "timeout", [], 300.0, status=504)
    plain = req("/api/chat", 200, 100.0, "llama3", output_tokens=5)
    for m in (timed, single, empty, replayed, cut, late, plain):
        c.request_finished(m)
    s = scrape(c)
    assert total(s, "trioproxy_time_per_output_token_seconds_count") == 1
    assert total(s, "trioproxy_time_per_output_token_seconds_sum") == pytest.approx(0.02)
    without = {lab["reason"]: v for lab, v in s["trioproxy_streams_without_first_token_total"]}
    assert without == {"no_output": 1, "cancelled": 1, "timeout": 1}
    streaming = c.summary()["streaming"]
    assert streaming["avg_time_per_output_token_ms"] == pytest.approx(20.0)
    assert streaming["streams_without_first_token"] == {
        "no_output": 1, "cancelled": 1, "timeout": 1, "error": 0
    }  # fmt: skip


def test_filtered_streaming_has_the_summary_keys_over_its_window() -> None:
    """A filtered view's streaming object lacked avg_time_per_output_token_ms and
    streams_without_first_token; it carries every key of the summary's, computed over
    the requests it selects."""
    c = MetricsCollector(system_enabled=False)
    timed = stream("/api/chat", "completed", [(50.0, 10)], 400.0, first_token_ms=100.0)
    timed.last_token_time_ms, timed.token_chunks = 280.0, 10  # 9 gaps of 20 ms
    slow = stream("/v1/chat/completions", "completed", [(50.0, 10)], 400.0, first_token_ms=90.0)
    slow.last_token_time_ms, slow.token_chunks = 490.0, 5  # 4 gaps of 100 ms
    empty = stream("/v1/chat/completions", "completed", [(50.0, 10)], 60.0)
    replayed = stream("/v1/responses/resp_1", "completed", [(50.0, 10)], 60.0, replayed=True)
    cut = stream("/v1/chat/completions", "cancelled", [(50.0, 10)], 60.0, status=499)
    late = stream("/api/chat", "timeout", [], 300.0, status=504)
    broken = stream("/api/generate", "error", [(50.0, 10)], 60.0, status=502)
    for m in (timed, slow, empty, replayed, cut, late, broken):
        c.request_finished(m)
    everything = c.summary()["streaming"]
    window = c.filtered_summary(time_range_minutes=600)["streaming"]
    assert list(window) == list(everything)
    assert window["avg_time_per_output_token_ms"] == pytest.approx(60.0)  # (20 + 100) / 2
    assert window["streams_without_first_token"] == {
        "no_output": 1, "cancelled": 1, "timeout": 1, "error": 1
    }  # fmt: skip
    for key, value in everything.items():  # the window holds every request here
        assert window[key] == (value if isinstance(value, dict) else pytest.approx(value)), key
    openai = c.filtered_summary(endpoint_filter="v1_chat")["streaming"]
    assert openai["avg_time_per_output_token_ms"] == pytest.approx(100.0)
    assert openai["streams_without_first_token"] == {
        "no_output": 1, "cancelled": 1, "timeout": 0, "error": 0
    }  # fmt: skip
    none = c.filtered_summary(endpoint_filter="nothing-matches")["streaming"]
    assert list(none) == list(everything)
    assert none["avg_time_per_output_token_ms"] == 0.0
    assert set(none["streams_without_first_token"].values()) == {0}


# ----------------------------------------------------------------------------- counters


def test_token_counts_no_counter_holds_are_counted_as_none() -> None:
    """The Python API takes counts from anyone: one of 400 digits made the store's
    int64 column raise out of ``request_finished`` (and a float, a NaN too)."""
    c = MetricsCollector(system_enabled=False)
    counts = [(10**400, math.nan), (-3, math.inf), (3.7, 2), (2**53, 2**53 - 3)]
    for input_tokens, output_tokens in counts:
        c.request_started()
        m = req("/api/chat", 200, 5.0, "m", input_tokens=input_tokens, output_tokens=output_tokens)
        c.request_finished(m)
    s = scrape(c)
    assert total(s, "trioproxy_tokens_total", type="input") == 3
    assert total(s, "trioproxy_tokens_total", type="output") == 2**53 - 1  # exactly
    assert c.summary()["total_requests"] == 4


def test_scripted_counters_are_exact(collector: MetricsCollector) -> None:
    s = scrape(collector)
    assert total(s, "http_requests_total") == 10
    expected = {
        ("ollama", "api_chat", "POST", "llama3", "200"): 3,  # 2 plain + 1 stream
        ("openai", "v1_chat_completions", "POST", "other", "500"): 1,  # never succeeded
        ("ollama", "api_generate", "POST", "other", "404"): 1,
        ("ollama", "api_chat", "POST", "llama3", "499"): 1,
        (
            "openai",
            "v1_chat_completions",
            "POST",
            "gpt",
            "499",
        ): 1,  # started 200: gpt earned a label
        ("ollama", "api_generate", "POST", "llama3", "504"): 1,
        ("ollama", "api_chat", "POST", "llama3", "502"): 1,
        ("other", "other", "GET", "custom-model", "200"): 1,
    }
    got = {
        tuple(lab[k] for k in ("api", "endpoint", "method", "model", "status")): v
        for lab, v in s["http_requests_total"]
    }
    assert got == expected
    assert total(s, "http_requests_active") == 0

    assert total(s, "trioproxy_streams_total") == 4
    for outcome in ("completed", "cancelled", "timeout", "error"):
        assert total(s, "trioproxy_streams_total", outcome=outcome) == 1
    assert total(s, "trioproxy_stream_chunks_total") == 6
    assert total(s, "trioproxy_stream_bytes_total") == 325
    # spans: 190 ms (completed: first token -> last byte) + 20 ms (cancelled, no token:
    # first -> last byte) + 30 ms (single chunk: start -> last)
    assert total(s, "trioproxy_stream_transfer_seconds_total") == pytest.approx(0.24)
    assert total(s, "trioproxy_time_to_first_byte_seconds_count") == 3
    assert total(s, "trioproxy_time_to_first_byte_seconds_sum") == pytest.approx(0.1)
    assert total(s, "trioproxy_time_to_first_token_seconds_count") == 1
    assert total(s, "trioproxy_time_to_first_token_seconds_sum") == pytest.approx(0.06)
    assert total(s, "trioproxy_tokens_total", type="input") == 10
    assert total(s, "trioproxy_tokens_total", type="output") == 23
    assert total(s, "http_request_duration_seconds_count") == 10
    assert total(s, "http_request_duration_seconds_sum") == pytest.approx(6.9855)
    assert total(s, "trioproxy_upstream_request_duration_seconds_count") == 1
    # overhead: 100 - 90 ms (plain); 5 ms (the stream's, fixed at its head)
    assert total(s, "trioproxy_overhead_seconds_count") == 2
    assert total(s, "trioproxy_overhead_seconds_sum") == pytest.approx(0.015)

    # derived families
    assert total(s, "http_request_success_rate") == pytest.approx(4 / 8)
    assert total(s, "http_request_error_rate") == pytest.approx(3 / 8)
    assert total(s, "http_request_client_error_rate") == pytest.approx(1 / 8)
    assert total(s, "http_requests_per_endpoint_total", endpoint="api_chat") == 5
    assert total(s, "http_request_errors_per_endpoint_total", endpoint="api_chat") == 1
    assert total(s, "http_request_errors_per_endpoint_total", endpoint="api_generate") == 1
    assert total(s, "http_request_errors_per_endpoint_total", endpoint="v1_chat_completions") == 1
    assert total(s, "http_streaming_requests_per_endpoint_total", endpoint="api_chat") == 2
    assert total(
        s, "http_request_duration_per_endpoint_seconds", endpoint="api_generate"
    ) == pytest.approx((0.010 + 5.0) / 2)
    assert total(s, "http_streaming_requests_total") == 4
    assert total(s, "http_streaming_chunks_total") == 6
    assert total(s, "http_streaming_cancelled_total") == 1
    assert total(s, "http_streaming_timeout_total") == 1
    assert total(s, "http_streaming_first_byte_time_seconds") == pytest.approx(0.1 / 3)
    assert total(s, "http_streaming_throughput_bytes_per_second") == pytest.approx(325 / 0.24)
    assert total(s, "http_streaming_avg_chunk_size_bytes") == pytest.approx(325 / 6)
    durations = sorted(m.duration_ms for m in scripted())
    assert total(s, "http_request_duration_p50_seconds") == pytest.approx(
        percentile(durations, 50) / 1000
    )
    assert total(s, "http_request_duration_p99_seconds") == pytest.approx(
        percentile(durations, 99) / 1000
    )
    assert total(s, "trioproxy_build_info") == 1
    assert not [n for n in s if n.endswith("_created")]


def test_scripted_json_is_exact(collector: MetricsCollector) -> None:
    j = collector.summary()
    assert j["enabled"] is True
    assert "message" not in j
    assert (j["total_requests"], j["global_total_requests"]) == (10, 10)
    assert j["successful_requests"] == 4
    assert j["failed_requests"] == 3
    assert j["client_errors"] == 1
    assert j["cancelled_requests"] == 2
    assert j["success_rate"] == pytest.approx(0.5)
    assert j["error_rate"] == pytest.approx(0.375)
    assert j["client_error_rate"] == pytest.approx(0.125)
    assert j["success_rate"] + j["error_rate"] + j["client_error_rate"] == pytest.approx(1.0)
    assert j["active_requests"] == 0
    durations = sorted(m.duration_ms for m in scripted())
    perf = j["performance"]
    assert perf["avg_duration_ms"] == pytest.approx(sum(durations) / 10)
    assert perf["p50_duration_ms"] == pytest.approx((100.0 + 150.5) / 2)
    assert perf["p95_duration_ms"] == pytest.approx(percentile(durations, 95))
    assert (perf["min_duration_ms"], perf["max_duration_ms"]) == (10.0, 5000.0)
    sj = j["streaming"]
    assert sj["total_streaming_requests"] == 4
    assert [
        sj[k]
        for k in ("completed_streams", "cancelled_streams", "timeout_streams", "error_streams")
    ] == [
        1,
        1,
        1,
        1,
    ]
    assert sj["total_chunks"] == 6
    assert sj["avg_first_byte_time_ms"] == pytest.approx(100 / 3)
    assert sj["avg_first_token_time_ms"] == pytest.approx(60.0)
    assert sj["avg_throughput_bytes_per_second"] == pytest.approx(325 / 0.24)
    assert sj["avg_chunk_size"] == pytest.approx(325 / 6)
    # the stream's 3 output tokens were counted from its chunks (tokens_counted): estimated
    assert j["tokens"] == {"input": 10, "output": 23, "output_estimated": 3}
    ep = j["endpoints"]
    assert set(ep) == {"api_chat", "api_generate", "v1_chat_completions", "other"}
    assert ep["api_chat"]["count"] == 5
    assert ep["api_chat"]["errors"] == 1
    assert ep["api_chat"]["cancelled"] == 1
    assert ep["api_chat"]["error_rate"] == pytest.approx(1 / 4)
    assert ep["api_chat"]["streaming_requests"] == 2
    assert ep["api_chat"]["models"] == ["llama3"]
    assert ep["api_chat"]["avg_duration_ms"] == pytest.approx((100 + 300 + 1000 + 260 + 70) / 5)
    assert ep["v1_chat_completions"]["models"] == ["gpt", "other"]
    assert j["models"]["llama3"] == {"count": 6, "input_tokens": 10, "output_tokens": 23}
    assert j["window"]["scope"] == "process"
    assert (j["window"]["size"], j["window"]["max_size"]) == (10, 1000)
    assert j["period"]["start"] is not None and j["period"]["start"].endswith("+00:00")
    sysj = j["system"]
    assert (sysj["buffer_size"], sysj["buffer_full"], sysj["max_buffer_size"]) == (10, False, 1000)
    for key in (
        "cpu_usage_percent",
        "memory_usage_percent",
        "memory_usage_bytes",
        "disk_usage_percent",
    ):
        assert key in sysj
    assert set(sysj["network_io"]) == {"bytes_sent", "bytes_recv", "packets_sent", "packets_recv"}
    assert set(sysj["disk_io"]) == {"read_bytes", "write_bytes", "read_count", "write_count"}
    assert set(sysj["process"]) == {
        "pid",
        "rss_bytes",
        "cpu_percent",
        "cpu_seconds",
        "num_threads",
        "open_fds",
    }
    assert sysj["sampler"]["enabled"] is False
    assert set(j["upstream"]["errors"]) == {
        "connect",
        "timeout",
        "status_4xx",
        "status_429",
        "status_5xx",
        "protocol",
        "other",
    }


def test_upstream_errors_retries_and_backend(collector: MetricsCollector) -> None:
    collector.upstream_error("connect")
    collector.upstream_error("connect")
    collector.upstream_error("weird")  # unknown reason -> other
    collector.upstream_retry("timeout")
    collector.set_backend_status(False, 1234.5)
    s = scrape(collector)
    assert total(s, "trioproxy_upstream_errors_total", reason="connect") == 2
    assert total(s, "trioproxy_upstream_errors_total", reason="other") == 1
    assert total(s, "trioproxy_upstream_retries_total", reason="timeout") == 1
    assert len(s["trioproxy_upstream_errors_total"]) == 7  # every reason, even at 0
    up = collector.summary()["upstream"]
    assert up["errors"]["connect"] == 2 and up["retries"]["timeout"] == 1
    assert (up["backend_reachable"], up["checked_at"]) == (False, 1234.5)


def test_empty_state_is_zeros_not_errors() -> None:
    c = MetricsCollector(system_enabled=False)
    j = c.summary()
    assert j["message"] == "No requests recorded yet"
    assert j["total_requests"] == 0 and j["success_rate"] == 0.0 and j["error_rate"] == 0.0
    assert all(v == 0.0 for v in j["performance"].values())
    assert j["streaming"]["avg_throughput_bytes_per_second"] == 0.0
    assert j["endpoints"] == {} and j["models"] == {}
    assert j["period"] == {"start": None, "end": None, "duration_seconds": 0.0}
    f = c.filtered_summary(endpoint_filter="chat", time_range_minutes=5)
    assert f["filtered_requests"] == 0 and f["performance"]["p99_duration_ms"] == 0.0
    body, status = c.health()
    assert (body["status"], status) == ("healthy", 200)
    s = scrape(c)
    assert total(s, "http_requests_total") == 0
    assert total(s, "http_request_success_rate") == 0
    assert "http_request_duration_p95_seconds" in s


def test_counters_survive_reset_window_does_not(collector: MetricsCollector) -> None:
    collector.reset()
    j = collector.summary()
    assert j["total_requests"] == 10  # all-time, monotonic
    assert j["window"]["size"] == 0
    assert j["performance"]["avg_duration_ms"] == 0.0
    assert total(scrape(collector), "http_requests_total") == 10
    f = collector.filtered_summary()
    assert f["filtered_requests"] == 0 and f["global_total_requests"] == 10


def test_window_is_bounded_counters_are_not() -> None:
    c = MetricsCollector(max_metrics=5, system_enabled=False)
    for i in range(12):
        c.record(req("/api/chat", 200, float(i + 1), "m"))
    j = c.summary()
    assert j["total_requests"] == 12
    assert j["window"]["size"] == 5
    assert j["system"]["buffer_full"] is True
    assert j["performance"]["min_duration_ms"] == 8.0  # the last five: 8..12
    assert j["performance"]["p50_duration_ms"] == 10.0


@given(
    max_size=st.integers(1, 12),
    appended=st.integers(0, 40),
    last=st.one_of(st.none(), st.integers(1, 15)),
)
def test_durations_are_the_newest_oldest_first(
    max_size: int, appended: int, last: int | None
) -> None:
    window = WindowStore(max_size)
    kind = st_mod.RequestKind("openai", "v1_chat", "POST", "m", 200, 0, False, None)
    for i in range(appended):
        window.append(kind, 0.0, float(i), math.nan, math.nan, 0, 0, 0.0, 0, 0)
    kept = list(range(appended))[-max_size:] if appended else []
    expected = kept[-last:] if last is not None else kept
    assert window.durations(last) == [float(i) for i in expected]
    copied = window.copy()
    window.append(kind, 0.0, -1.0, math.nan, math.nan, 0, 0, 0.0, 0, 0)  # not in the copy
    assert copied.durations(last) == [float(i) for i in expected]
    assert [e.duration_ms for e in copied.entries()] == [float(i) for i in kept]


async def test_a_large_window_is_read_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the largest METRICS_MAX_REQUESTS (1,000,000) a JSON summary, a health check or
    a scrape held the event loop 0.35-3.4 s reading the window: a window larger than
    LOOP_WINDOW_ENTRIES is copied and read in a worker thread."""
    import threading

    c = MetricsCollector(max_metrics=50, system_enabled=False)
    for i in range(40):
        c.record(req("/api/chat" if i % 2 else "/v1/chat/completions", 200, float(i + 1)))
    read_on: list[bool] = []
    entries, durations = WindowStore.entries, WindowStore.durations

    def on_loop() -> None:
        read_on.append(threading.current_thread() is threading.main_thread())

    def entries_seen(self: WindowStore, *args: object, **kw: object) -> object:
        on_loop()
        return entries(self, *args, **kw)  # type: ignore[arg-type]

    def durations_seen(self: WindowStore, *args: object) -> object:
        on_loop()
        return durations(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(WindowStore, "entries", entries_seen)
    monkeypatch.setattr(WindowStore, "durations", durations_seen)
    reads = {}
    for limit in (10**6, 10):  # the window (40) is below / above the limit
        monkeypatch.setattr(collector_mod, "LOOP_WINDOW_ENTRIES", limit)
        del read_on[:]
        summary = await c.read_summary()
        health, _ = await c.read_health()
        filtered = await c.read_filtered_summary(endpoint_filter="/api/chat")
        body, _ = await c.read_prometheus()
        p99 = [
            ln for ln in body.decode().splitlines() if ln.startswith("http_request_duration_p99")
        ]
        reads[limit] = (read_on[:], summary["performance"], health["total_requests"],
                        filtered["filtered_requests"], filtered["performance"], p99)  # fmt: skip
    on_loop_reads, off_loop_reads = reads[10**6], reads[10]
    assert on_loop_reads[0] == [True] * 4 and off_loop_reads[0] == [False] * 4
    assert on_loop_reads[1:] == off_loop_reads[1:]
    assert off_loop_reads[3] == 20 and off_loop_reads[1]["max_duration_ms"] == 40.0


async def test_the_guide_api_reads_a_large_window_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """get_metrics_summary(), get_filtered_metrics_summary() and get_prometheus_metrics()
    are async: they read a large window as the endpoints do, from a copy in a worker
    thread (they called the synchronous reads, which held the event loop)."""
    import threading

    c = MetricsCollector(max_metrics=50, system_enabled=False)
    for i in range(40):
        c.record(req("/api/chat", 200, float(i + 1)))
    read_on: list[bool] = []
    entries, durations = WindowStore.entries, WindowStore.durations

    def entries_seen(self: WindowStore, *args: object, **kw: object) -> object:
        read_on.append(threading.current_thread() is threading.main_thread())
        return entries(self, *args, **kw)  # type: ignore[arg-type]

    def durations_seen(self: WindowStore, *args: object) -> object:
        read_on.append(threading.current_thread() is threading.main_thread())
        return durations(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(WindowStore, "entries", entries_seen)
    monkeypatch.setattr(WindowStore, "durations", durations_seen)
    monkeypatch.setattr(collector_mod, "LOOP_WINDOW_ENTRIES", 10)  # the window (40) is above
    previous = metrics_pkg.get_metrics_collector()
    metrics_pkg.set_metrics_collector(c)
    try:
        summary = await metrics_pkg.get_metrics_summary()
        filtered = await metrics_pkg.get_filtered_metrics_summary(endpoint_filter="chat")
        text = await metrics_pkg.get_prometheus_metrics()
    finally:
        metrics_pkg.set_metrics_collector(previous)
    assert read_on == [False] * 3
    assert summary["total_requests"] == 40 and filtered["filtered_requests"] == 40
    assert "http_request_duration_p99_seconds" in text


def test_percentile_window_limits_percentiles() -> None:
    c = MetricsCollector(max_metrics=100, percentile_window=3, system_enabled=False)
    for ms in (1000.0, 1000.0, 1.0, 2.0, 3.0):
        c.record(req("/api/chat", 200, ms))
    assert c.summary()["performance"]["max_duration_ms"] == 3.0
    assert total(scrape(c), "http_request_duration_p99_seconds") == pytest.approx(0.00298)


# ----------------------------------------------------------------------------- percentiles


def test_percentile_linear_interpolation() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([10.0, 20.0], 100) == 20.0
    assert percentile([10.0, 20.0], 0) == 10.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=60),
    st.sampled_from([0, 1, 25, 50, 90, 95, 99, 100]),
)
def test_percentile_matches_numpy_linear(values: list[float], p: int) -> None:
    np = pytest.importorskip("numpy")
    got = percentile(sorted(values), p)
    assert got == pytest.approx(float(np.percentile(values, p)), rel=1e-9, abs=1e-9)


# ----------------------------------------------------------------------------- filters


def test_filters_endpoint_and_time_range_including_hours() -> None:
    c = MetricsCollector(system_enabled=False)
    now = time.time()
    ages_min = {"/api/chat": 5, "/v1/chat/completions": 90, "/api/generate": 30, "/api/tags": 200}
    for path, age in ages_min.items():
        c.record(req(path, 200, 10.0, timestamp=now - age * 60))
    c.record(req("/api/chat", 500, 20.0, timestamp=now - 59 * 60))
    c.record(req("/api/chat", 499, 20.0, timestamp=now - 1))

    f = c.filtered_summary(endpoint_filter="CHAT")
    assert f["filtered_requests"] == 4
    assert set(f["endpoints"]) == {"api_chat", "v1_chat_completions"}
    assert f["failed_requests"] == 1 and f["cancelled_requests"] == 1
    assert f["error_rate"] == pytest.approx(1 / 3)
    assert f["success_rate"] == pytest.approx(2 / 3)

    assert c.filtered_summary(time_range_minutes=60)["filtered_requests"] == 4
    assert c.filtered_summary(time_range_minutes=120)["filtered_requests"] == 5
    assert c.filtered_summary(time_range_minutes=1440)["filtered_requests"] == 6
    assert c.filtered_summary(time_range_minutes=0.5)["filtered_requests"] == 1
    both = c.filtered_summary(endpoint_filter="chat", time_range_minutes=60)
    assert both["filtered_requests"] == 3
    assert both["filters"] == {
        "endpoint_filter": "chat",
        "time_range_minutes": 60.0,
        "include_system_metrics": True,
    }
    assert "system" in both
    assert "system" not in c.filtered_summary(include_system_metrics=False)
    # a path works too, and maps to its label
    assert c.filtered_summary(endpoint_filter="/api/chat")["filtered_requests"] == 3
    assert c.filtered_summary(endpoint_filter="nothing-matches")["message"]
    with pytest.raises(ValueError, match="positive"):
        c.filtered_summary(time_range_minutes=0)
    with pytest.raises(ValueError, match="positive"):
        c.filtered_summary(time_range_minutes=-5)


def test_filtered_streaming_block() -> None:
    c = MetricsCollector(system_enabled=False)
    for m in scripted():
        c.record(m)
    f = c.filtered_summary(endpoint_filter="api_chat")
    sj = f["streaming"]
    assert sj["total_streaming_requests"] == 2
    assert (sj["completed_streams"], sj["error_streams"]) == (1, 1)
    assert sj["total_chunks"] == 3
    assert sj["avg_throughput_bytes_per_second"] == pytest.approx(300 / 0.19)


def test_window_store_rejects_bad_size() -> None:
    with pytest.raises(ValueError):
        WindowStore(0)


def _kind(endpoint: str = "api_chat", streaming: bool = False) -> st_mod.RequestKind:
    outcome = "completed" if streaming else None
    return st_mod.RequestKind("ollama", endpoint, "POST", "m", 200, 0, streaming, outcome)


def test_window_ring_overwrites_the_oldest_and_reads_oldest_first() -> None:
    w = WindowStore(3)
    nan = float("nan")
    for i in range(5):
        w.append(_kind(), 1000.0 + i, float(i), nan, nan, 0, 0, 0.0, i, 2 * i)
    assert (len(w), w.is_full) == (3, True)
    assert [e.timestamp for e in w.entries()] == [1002.0, 1003.0, 1004.0]
    assert [e.output_tokens for e in w.entries()] == [4, 6, 8]
    assert w.durations() == [2.0, 3.0, 4.0] and w.durations(2) == [3.0, 4.0]
    assert [e.timestamp for e in w.entries(time_range_minutes=1, now=1063.5)] == [1004.0]
    w.clear()
    assert (len(w), w.entries(), w.durations()) == (0, [], [])
    w.append(_kind("v1_embeddings"), 1.0, 5.0, nan, nan, 0, 0, 0.0, 0, 0)
    assert [e.endpoint for e in w.entries("/v1/embeddings")] == ["v1_embeddings"]


def test_window_entry_gives_back_what_was_recorded() -> None:
    w = WindowStore(2)
    w.append(_kind(streaming=True), 7.0, 12.5, 3.25, float("nan"), 4, 400, 0.01, 9, 11)
    (e,) = w.entries()
    assert (e.first_byte_ms, e.first_token_ms) == (3.25, None)
    assert (e.streaming, e.outcome, e.status, e.cls) == (True, "completed", 200, 0)
    assert (e.duration_ms, e.chunks, e.stream_bytes, e.transfer_s) == (12.5, 4, 400, 0.01)
    assert (e.input_tokens, e.output_tokens) == (9, 11)
    assert (e.time_per_output_token_ms, e.replayed) == (None, False)
    w.append(_kind(streaming=True), 8.0, 1.0, 0.5, 0.75, 2, 20, 0.01, 0, 2, 0.25, True)
    assert (w.entries()[-1].time_per_output_token_ms, w.entries()[-1].replayed) == (0.25, True)


# ----------------------------------------------------------------------------- health


def _health(records: list[RequestMetrics], **kw) -> tuple[dict, int]:
    c = MetricsCollector(system_enabled=False, **kw)
    for m in records:
        c.record(m)
    return c.health()


def test_health_thresholds() -> None:
    ok = [req("/api/chat", 200, 10.0) for _ in range(96)]
    body, status = _health(ok + [req("/api/chat", 500, 10.0)] * 10)  # 9.4 %
    assert (body["status"], status) == ("healthy", 200)
    body, status = _health(ok + [req("/api/chat", 502, 10.0)] * 11)  # 10.3 %
    assert (body["status"], status) == ("degraded", 200)
    assert body["thresholds"]["error_rate_degraded"] == 0.1  # the guide's threshold
    assert body["checks"]["error_rate"]["status"] == "degraded"
    body, status = _health(ok[:60] + [req("/api/chat", 500, 10.0)] * 40)
    assert (body["status"], status) == ("unhealthy", 503)
    assert body["thresholds"]["error_rate_unhealthy"] == 0.25


def test_health_ignores_client_errors_and_cancellations() -> None:
    recs = [req("/api/chat", 200, 10.0)] * 10 + [req("/api/chat", 404, 1.0)] * 50
    recs += [req("/api/chat", 499, 1.0)] * 50
    recs += [stream("/api/chat", "cancelled", [(1, 1)], 2.0) for _ in range(20)]
    body, status = _health(recs)
    assert (body["status"], status) == ("healthy", 200)
    assert body["error_rate"] == 0.0
    assert body["client_error_rate"] == pytest.approx(50 / 60)


def test_health_latency_and_backend() -> None:
    slow = [req("/api/chat", 200, 31_000.0)] * 10
    body, status = _health(slow)
    assert (body["status"], status) == ("degraded", 200)
    assert body["checks"]["latency"]["p95_seconds"] == pytest.approx(31.0)
    # long streams are not "slow requests"
    body, _ = _health([stream("/api/chat", "completed", [(10, 5)], 120_000.0)] * 10)
    assert body["status"] == "healthy"
    # a client's slow mistakes (a slow upload answered 400, a 429 waited out) are not the
    # service's latency; a slow failure of the service is
    slow_mistakes = [req("/api/chat", 400, 31_000.0), req("/api/chat", 429, 31_000.0)] * 5
    body, _ = _health([req("/api/chat", 200, 10.0), *slow_mistakes])
    assert body["status"] == "healthy" and body["checks"]["latency"]["requests"] == 1
    body, _ = _health([req("/api/chat", 200, 10.0)] * 95 + [req("/api/chat", 504, 31_000.0)] * 9)
    assert body["checks"]["latency"]["status"] == "degraded"
    # configurable
    body, _ = _health(slow, health_p95_degraded_seconds=60)
    assert body["status"] == "healthy"
    c = MetricsCollector(system_enabled=False)
    c.set_backend_status(False, time.time())
    body, status = c.health()
    assert (body["status"], status, body["backend_reachable"]) == ("unhealthy", 503, False)
    c.set_backend_status(True, time.time())
    assert c.health()[1] == 200


def test_health_forgets_failures_older_than_its_window() -> None:
    """An idle proxy is not unhealthy forever for the failures it last saw: only requests
    of the last HEALTH_WINDOW_SECONDS count (the window of recent requests has no age)."""
    old = time.time() - 120.0
    failures = [req("/api/chat", 500, 10.0, timestamp=old) for _ in range(30)]
    body, status = _health(failures, health_window_seconds=60)
    assert (body["status"], status) == ("healthy", 200)
    assert body["checks"]["error_rate"]["requests"] == 0
    assert body["thresholds"]["window_seconds"] == 60
    body, status = _health(failures)  # the default window is 300 s: they still count
    assert (body["status"], status) == ("unhealthy", 503)
    recent = [req("/api/chat", 200, 10.0)] * 3
    body, _ = _health(failures + recent, health_window_seconds=60)
    assert body["checks"]["error_rate"] == {"status": "ok", "value": 0.0, "requests": 3,
                                            "errors": 0}  # fmt: skip
    # a request counts by when it ended: a timeout that waited longer than the window
    timed_out = req("/api/chat", 504, 390_000.0, timestamp=time.time() - 400.0)
    body, status = _health([timed_out], health_window_seconds=60)
    assert (body["status"], status) == ("unhealthy", 503)


def test_the_stream_averages_are_no_value_before_the_first_stream() -> None:
    """A 0 would read as a measurement: the guide's StreamingPerformanceDegraded alert
    (throughput < 1000) would fire on every proxy that has not streamed yet."""
    c = MetricsCollector(system_enabled=False)
    c.record(req("/api/chat", 200, 10.0))
    samples = scrape(c)
    for name in ("http_streaming_throughput_bytes_per_second",
                 "http_streaming_avg_chunk_size_bytes",
                 "http_streaming_first_byte_time_seconds"):  # fmt: skip
        ((_, value),) = samples[name]
        assert value != value, name  # NaN
    c.record(stream("/api/chat", "completed", [(10, 100), (20, 100)], 30.0, first_token_ms=10.0))
    ((_, throughput),) = scrape(c)["http_streaming_throughput_bytes_per_second"]
    assert throughput > 0


def test_request_durations_say_whether_they_were_a_stream() -> None:
    c = MetricsCollector(system_enabled=False)
    c.record(req("/api/chat", 200, 10.0, "llama3"))
    c.record(stream("/api/chat", "completed", [(10, 5)], 60_000.0, first_token_ms=10.0))
    samples = scrape(c)
    name = "http_request_duration_seconds_count"
    assert total(samples, name, stream="false") == 1
    assert total(samples, name, stream="true") == 1
    assert c.summary()["endpoints"]["api_chat"]["count"] == 2


def test_health_env_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEALTH_ERROR_RATE_DEGRADED", "0.5")
    monkeypatch.setenv("HEALTH_ERROR_RATE_UNHEALTHY", "0.9")
    monkeypatch.setenv("HEALTH_P95_DEGRADED_SECONDS", "1")
    c = MetricsCollector(system_enabled=False)
    assert c.health()[0]["thresholds"]["error_rate_degraded"] == 0.5
    for _ in range(6):
        c.record(req("/api/chat", 200, 10.0))
    for _ in range(4):
        c.record(req("/api/chat", 500, 10.0))
    assert c.health()[0]["status"] == "healthy"  # 40 % < 50 %


# ----------------------------------------------------------------------------- labels


def test_random_endpoints_and_models_create_no_new_series() -> None:
    c = MetricsCollector(system_enabled=False, model_label_limit=5)
    c.record(req("/x", 404, 1.0, "zzz"))
    c.record(req("/y", 200, 1.0, ""))
    before = {n: len(v) for n, v in scrape(c).items()}
    rnd = random.Random(7)
    for i in range(10_000):
        path = "/" + "".join(rnd.choice("abcdefgh/") for _ in range(12))
        c.record(req(path, 404 if i % 2 else 500, 1.0, f"model-{rnd.random()}"))
    after = {n: len(v) for n, v in scrape(c).items()}
    grew = {n for n in after if after[n] != before.get(n)}
    assert grew <= {"http_requests_total", "http_request_duration_seconds_bucket"} | {
        "http_request_duration_seconds_count",
        "http_request_duration_seconds_sum",
    }
    # only the bounded status values may add series: 404 -> already there, 500 is new
    assert after["http_requests_total"] - before["http_requests_total"] == 1
    # successful random models stop getting labels at the budget
    for i in range(2_000):
        c.record(req("/api/chat", 200, 1.0, f"ok-{i}"))
    models = {lab["model"] for lab, _ in scrape(c)["http_requests_total"]}
    assert len(models - {"", "other"}) == 5
    assert len(c.summary()["models"]) == 6  # five + other


def test_a_model_labelled_other_gets_its_own_label_once_it_succeeds() -> None:
    # request kinds are labelled once and remembered; minting a model label (by a
    # success, or allow_model) must relabel that model's failing requests too
    c = MetricsCollector(system_enabled=False)
    c.request_started()  # busy: records wait in one batch, counted together
    for status in (500, 200, 500):
        c.request_started()
        c.request_finished(req("/api/chat", status, 1.0, "fresh"))
    c.request_started()
    c.request_finished(req("/api/chat", 500, 1.0, "late"))
    c.allow_model("late")
    c.request_started()
    c.request_finished(req("/api/chat", 500, 1.0, "late"))
    got = {(lab["model"], lab["status"]): v for lab, v in scrape(c)["http_requests_total"]}
    assert got == {
        ("other", "500"): 2.0,  # "fresh" before it succeeded, "late" before it was allowed
        ("fresh", "200"): 1.0,
        ("fresh", "500"): 1.0,
        ("late", "500"): 1.0,
    }


def _stream_ended_by(head: int, then: int, model: str) -> RequestMetrics:
    """A stream whose head went out with ``head``, a first chunk after it, and then the
    status the request path noted when it ended (``then``): what fastpath records for a
    stream the proxy's shutdown cut (200, then 503) or answered with a 503 at once."""
    m = RequestMetrics(endpoint="/v1/chat/completions", method="POST", model=model)
    m.streaming = True
    m.status_code = head
    m.add_chunk(12)
    m.status_code = then
    m.stream_outcome = "error"
    return m


def test_a_stream_the_shutdown_cut_keeps_its_model_label() -> None:
    """docs/metrics.md: a stream that started 2xx and broke later keeps its label. The
    shutdown rewrites the status of a stream it cuts to 503 after the head went out 200:
    the label follows the status the stream started with, not that 503."""
    c = MetricsCollector(system_enabled=False)
    c.record(_stream_ended_by(200, 503, "cut-by-shutdown"))
    c.record(_stream_ended_by(503, 503, "refused-at-once"))  # never started 2xx
    got = {
        (lab["model"], lab["status"]): v
        for lab, v in scrape(c)["http_requests_total"]
        if lab["endpoint"] == "v1_chat_completions"
    }
    assert got == {("cut-by-shutdown", "503"): 1.0, ("other", "503"): 1.0}
    outcomes = {(lab["model"], lab["outcome"]) for lab, _ in scrape(c)["trioproxy_streams_total"]}
    assert outcomes == {("cut-by-shutdown", "error"), ("other", "error")}


def test_many_request_kinds_keep_every_count() -> None:
    c = MetricsCollector(system_enabled=False, model_label_limit=3)
    c.request_started()
    for i in range(collector_mod._KINDS_KEPT + 500):
        c.request_started()
        c.request_finished(req(f"/nope/{i}", 404, 1.0, f"m{i}"))
    assert len(c._kinds) <= collector_mod._KINDS_KEPT
    assert total(scrape(c), "http_requests_total", endpoint="other", model="other") == (
        collector_mod._KINDS_KEPT + 500
    )


def test_api_label_from_record_or_path() -> None:
    c = MetricsCollector(system_enabled=False)
    c.record(req("/v1/models/gpt-4", 200, 1.0, method="GET"))
    c.record(req("/v1/responses/resp_1/input_items", 200, 1.0, method="GET"))
    c.record(req("/v1/responses/input_tokens", 200, 1.0))
    c.record(req("/api/chat", 200, 1.0, api="openai"))  # explicit api wins
    c.record(req("api_chat", 200, 1.0))  # already a label
    c.record(req("/api/tags", 200, 1.0, method="BREW"))
    got = {
        (lab["api"], lab["endpoint"], lab["method"]) for lab, _ in scrape(c)["http_requests_total"]
    }
    assert got == {
        ("openai", "v1_model", "GET"),
        ("openai", "v1_response", "GET"),
        ("openai", "v1_responses_input_tokens", "POST"),
        ("openai", "api_chat", "POST"),
        ("ollama", "api_chat", "POST"),
        ("ollama", "api_tags", "other"),
    }


# ----------------------------------------------------------------------------- switches, logs, env


def test_disabled_collector_records_nothing() -> None:
    c = MetricsCollector(enabled=False, system_enabled=False)
    c.request_started()
    c.request_finished(req("/api/chat", 500, 1.0))
    c.upstream_error("connect")
    j = c.summary()
    assert j["enabled"] is False and j["total_requests"] == 0 and j["active_requests"] == 0
    assert c.health()[0]["enabled"] is False
    s = scrape(c)
    assert total(s, "http_requests_total") == 0
    assert total(s, "trioproxy_upstream_errors_total") == 0


def test_monitoring_plane_is_never_recorded() -> None:
    c = MetricsCollector(system_enabled=False)
    for path in ("/health", "/ready", "/metrics", "/v1/metrics", "/v1/metrics/prometheus"):
        c.record(req(path, 200, 1.0, method="GET"))
    assert c.summary()["total_requests"] == 0 and c.summary()["window"]["size"] == 0


def test_active_gauge_counts_in_flight() -> None:
    c = MetricsCollector(system_enabled=False)
    c.request_started()
    c.request_started()
    assert c.summary()["active_requests"] == 2
    assert total(scrape(c), "http_requests_active") == 2
    c.request_finished(req("/api/chat", 200, 1.0))
    assert c.health()[0]["active_requests"] == 1
    c.request_finished(req("/api/chat", 200, 1.0))
    c.request_finished(req("/api/chat", 200, 1.0))  # unbalanced: never below 0
    assert total(scrape(c), "http_requests_active") == 0


async def test_record_request_logs_only_warnings(caplog: pytest.LogCaptureFixture) -> None:
    c = MetricsCollector(system_enabled=False)
    caplog.set_level(logging.DEBUG, logger="trioproxy.metrics")
    await c.record_request(req("/api/chat", 200, 10.0))
    await c.record_request(req("/api/chat", 200, 6000.0))
    await c.record_request(req("/api/chat", 502, 10.0, error="boom"))
    # client errors: a feature not offered, HTTP/2 sent to the HTTP/1.1 port
    await c.record_request(req("/api/pull", 501, 10.0))
    await c.record_request(req("", 505, 1.0))
    levels = [r.levelno for r in caplog.records if r.name == "trioproxy.metrics"]
    assert logging.INFO not in levels
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "slow" in warnings[0] and "boom" in warnings[1]
    assert c.summary()["total_requests"] == 5


@pytest.fixture
def collector_from_env() -> Iterator[Callable[[], MetricsCollector]]:
    """The guide's singleton built afresh from the environment as it is now, each call;
    the one in place before is put back after the test."""
    previous = metrics_pkg._collector

    def fresh() -> MetricsCollector:
        metrics_pkg.set_metrics_collector(None)
        return metrics_pkg.get_metrics_collector()

    yield fresh
    metrics_pkg.set_metrics_collector(previous)


def test_singleton_from_env(
    monkeypatch: pytest.MonkeyPatch, collector_from_env: Callable[[], MetricsCollector]
) -> None:
    monkeypatch.setenv("METRICS_ENABLED", "false")
    monkeypatch.setenv("METRICS_MAX_REQUESTS", "7")
    monkeypatch.setenv("SYSTEM_METRICS_INTERVAL", "2.5")
    monkeypatch.setenv("SYSTEM_METRICS_ENABLED", "no")
    c = collector_from_env()
    assert c is metrics_pkg.get_metrics_collector()
    assert (c.enabled, c.max_metrics, c.sampler.interval, c.system_enabled) == (
        False,
        7,
        2.5,
        False,
    )
    monkeypatch.setenv("METRICS_MAX_REQUESTS", "lots")
    monkeypatch.setenv("METRICS_ENABLED", "maybe")
    c = collector_from_env()
    assert (c.enabled, c.max_metrics) == (True, 1000)


def test_settings_out_of_the_proxys_range_are_ignored_from_env(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    collector_from_env: Callable[[], MetricsCollector],
) -> None:
    """The proxy refuses these (exit 2); the Python API took them as given (a window of
    5,000,000 requests, an error-rate threshold of 2): ignored with a warning, as
    documented, the default applying."""
    monkeypatch.setenv("METRICS_MAX_REQUESTS", "5000000")
    monkeypatch.setenv("METRICS_MODEL_LABELS", "20000")
    monkeypatch.setenv("HEALTH_ERROR_RATE_DEGRADED", "2")
    c = collector_from_env()
    assert (c.max_metrics, c.model_labels._limit, c.health_thresholds.error_rate_degraded) == (
        1000,
        50,
        0.1,
    )
    monkeypatch.setenv("HEALTH_ERROR_RATE_DEGRADED", "0.5")
    monkeypatch.setenv("HEALTH_ERROR_RATE_UNHEALTHY", "0.3")
    c = collector_from_env()
    thresholds = c.health_thresholds
    assert (thresholds.error_rate_degraded, thresholds.error_rate_unhealthy) == (0.1, 0.25)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("METRICS_MAX_REQUESTS" in w for w in warnings), warnings
    assert any("HEALTH_ERROR_RATE_DEGRADED=0.5" in w for w in warnings), warnings


def test_a_slow_first_token_is_no_slow_transfer() -> None:
    """An operator review: an OpenAI stream's first byte (its role chunk) leaves before the
    model's first token, so a 12 s first token and then 50 tokens/s read as 670 B/s and
    fired StreamingPerformanceDegraded, where the same traffic on /api/chat did not."""
    role = [(5.0, 40)]  # the role chunk, at once
    tokens = [(12_000.0 + 20.0 * i, 100) for i in range(50)]  # then 50 tokens/s
    v1 = stream("/v1/chat/completions", "completed", role + tokens, 13_000.0,
                first_token_ms=12_000.0)  # fmt: skip
    assert v1.transfer_ms() == pytest.approx(980.0)
    assert st_mod.transfer_seconds(v1) == pytest.approx(0.98)
    assert v1.throughput_bytes_per_second == pytest.approx(5040 / 0.98)
    # no token (or a replay): from the first byte; one chunk: from the request's start
    untimed = stream("/v1/chat/completions", "completed", [(5.0, 40), (25.0, 40)], 30.0)
    assert untimed.transfer_ms() == pytest.approx(20.0)
    single = stream("/api/chat", "completed", [(50.0, 10)], 60.0, first_token_ms=50.0)
    assert single.transfer_ms() == pytest.approx(50.0)


async def test_concurrent_reads_of_a_large_window_hold_few_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The monitoring endpoints are open without a client key: N concurrent JSON
    summaries or health checks of a window larger than LOOP_WINDOW_ENTRIES each made a
    copy of it (at METRICS_MAX_REQUESTS=300,000 about 25 MB) before waiting for a worker
    thread, so N readers held N copies at once. The copies are bounded."""
    import threading

    import trio

    c = MetricsCollector(max_metrics=50, system_enabled=False)
    for i in range(40):
        c.record(req("/api/chat", 200, float(i + 1)))
    monkeypatch.setattr(collector_mod, "LOOP_WINDOW_ENTRIES", 10)
    held = [0, 0]  # copies not yet read through, the most at once
    lock = threading.Lock()
    copy, entries = WindowStore.copy, WindowStore.entries

    def copy_seen(self: WindowStore) -> WindowStore:
        with lock:
            held[0] += 1
            held[1] = max(held)
        return copy(self)

    def entries_seen(self: WindowStore, *args: object, **kw: object) -> object:
        time.sleep(0.001)
        try:
            return entries(self, *args, **kw)  # type: ignore[arg-type]
        finally:
            with lock:
                held[0] -= 1

    monkeypatch.setattr(WindowStore, "copy", copy_seen)
    monkeypatch.setattr(WindowStore, "entries", entries_seen)
    async with trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(c.read_health)
            nursery.start_soon(c.read_summary)
            nursery.start_soon(c.read_filtered_summary, "/api/chat")
    assert 1 <= held[1] <= 2, held[1]  # copied (read in threads), two at the most
