"""run_performance_benchmarks: structure and sanity (never timings)."""

from __future__ import annotations

import math

import trioproxy.metrics as pkg
from trioproxy.benchmarks import run_performance_benchmarks
from trioproxy.metrics import MetricsCollector

SCENARIOS = (
    "baseline",
    "simple_tracking",
    "streaming_tracking",
    "concurrent_tracking",
    "memory_stress",
    "system_metrics",
)
FIELDS = {
    "test_name",
    "iterations",
    "total_time_seconds",
    "avg_time_ms",
    "min_time_ms",
    "max_time_ms",
    "p50_time_ms",
    "p95_time_ms",
    "p99_time_ms",
    "memory_usage_mb",
    "cpu_usage_percent",
    "overhead_percent",
}


async def test_benchmarks_structure_and_sanity() -> None:
    previous = pkg._collector
    singleton = MetricsCollector(system_enabled=False)
    pkg.set_metrics_collector(singleton)
    try:
        results = await run_performance_benchmarks(iterations=100)
    finally:
        pkg.set_metrics_collector(previous)
    assert singleton.summary()["total_requests"] == 0  # never touches the process collector

    for name in SCENARIOS:
        r = results[name]
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["test_name"] == name
        for key in FIELDS - {"test_name"}:
            assert isinstance(r[key], int | float) and math.isfinite(r[key]), (name, key)
        assert r["min_time_ms"] <= r["p50_time_ms"] <= r["p95_time_ms"] <= r["p99_time_ms"]
        assert r["p99_time_ms"] <= r["max_time_ms"]
        assert r["min_time_ms"] <= r["avg_time_ms"] <= r["max_time_ms"]
        assert r["total_time_seconds"] > 0
        assert 0 <= r["cpu_usage_percent"] <= 200  # process CPU over wall time
        assert r["memory_usage_mb"] >= 0
    assert results["baseline"]["iterations"] == 100
    assert results["concurrent_tracking"]["iterations"] == 100
    assert results["memory_stress"]["iterations"] == 1000
    assert results["memory_stress"]["memory_usage_mb"] > 0
    assert results["memory_stress"]["window_size"] == 1000  # bounded
    assert results["baseline"]["overhead_percent"] == 0.0

    s = results["summary"]
    assert s["total_tests"] == len(SCENARIOS)
    assert s["max_overhead_percent"] == max(results[n]["overhead_percent"] for n in SCENARIOS)
    assert s["total_memory_usage_mb"] == sum(results[n]["memory_usage_mb"] for n in SCENARIOS)
    assert s["baseline_avg_time_ms"] == results["baseline"]["avg_time_ms"]
    assert isinstance(s["performance_acceptable"], bool)
    assert isinstance(s["memory_efficient"], bool)
    assert s["overhead_per_request_us"] == results["simple_tracking"]["overhead_per_request_us"]
    assert s["timestamp"].endswith("+00:00")


async def test_benchmarks_tiny_iterations_do_not_crash() -> None:
    results = await run_performance_benchmarks(iterations=1)
    assert results["summary"]["total_tests"] == 6
    assert math.isfinite(results["summary"]["max_overhead_percent"])


async def test_few_iterations_are_as_many_concurrent_requests() -> None:
    """Under the batch size of 10, the concurrent scenario reported 10 iterations anyway."""
    results = await run_performance_benchmarks(iterations=5)
    assert results["concurrent_tracking"]["iterations"] == 5
    assert results["simple_tracking"]["iterations"] == 5
