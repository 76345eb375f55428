"""Every Python snippet of MONITORING_INTEGRATION.md runs as written, inside an async
function under trio (``src.utils.metrics`` read as ``trioproxy.metrics``,
``src.utils.benchmarks`` as ``trioproxy.benchmarks``).  The DataDog / New Relic snippets get
stub modules; nothing else is added but the names a snippet uses from an earlier one."""

from __future__ import annotations

import logging
import re
import sys
import textwrap
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import trioproxy.metrics as pkg
from trioproxy.metrics import MetricsCollector

# shared/ sits beside the checkout (also in CI, which copies it next to its clone)
GUIDE = Path(__file__).resolve().parents[2] / "shared" / "seed" / "MONITORING_INTEGRATION.md"

# The guide's Python blocks, verbatim (trailing blanks aside), in guide order.
SNIPPETS: dict[str, str] = {
    "custom_metrics": """
from src.utils.metrics import get_metrics_collector, RequestMetrics

# Custom metric collection
collector = get_metrics_collector()

# Record custom metric
custom_metric = RequestMetrics(
    endpoint="/custom/endpoint",
    method="POST",
    status_code=200,
    duration_ms=150.5,
    model="custom-model"
)

await collector.record_request(custom_metric)
""",
    "filtering": """
from src.utils.metrics import get_filtered_metrics_summary

# Get metrics for specific endpoints
chat_metrics = await get_filtered_metrics_summary(
    endpoint_filter="chat",
    time_range_minutes=60
)

# Get metrics without system data
api_metrics = await get_filtered_metrics_summary(
    include_system_metrics=False
)
""",
    "reduce_buffer": """
# Reduce buffer size
from src.utils.metrics import MetricsCollector

collector = MetricsCollector(max_metrics=500)  # Reduce from default 1000
""",
    "minimal_tracking": """
# Disable system metrics collection
collector = get_metrics_collector()
collector.stop()

# Use minimal tracking
async with track_request("/api/endpoint", "GET") as metric:
    # Only set essential fields
    metric.status_code = 200
""",
    "streaming": """
# Use streaming context manager
async with track_streaming_request("/api/stream", "POST") as (metric, wrapper):
    metric.status_code = 200

    # Wrap the stream
    stream = wrapper(response_stream)
    async for chunk in stream:
        # Process chunk
        pass
""",
    "debug_logging": """
import logging
logging.getLogger('src.utils.metrics').setLevel(logging.DEBUG)
""",
    "benchmarks": """
from src.utils.benchmarks import run_performance_benchmarks

# Run benchmarks
results = await run_performance_benchmarks(iterations=100)
summary = results["summary"]

if not summary["performance_acceptable"]:
    print(f"Performance issue detected: {summary['max_overhead_percent']}% overhead")
""",
    "datadog": """
import datadog
from src.utils.metrics import get_metrics_summary

# Configure DataDog
datadog.initialize(api_key='your_api_key', app_key='your_app_key')

# Send metrics to DataDog
async def send_to_datadog():
    summary = await get_metrics_summary()

    datadog.api.Metric.send(
        metric='ollama.proxy.requests.total',
        points=summary['total_requests'],
        tags=['service:ollama-proxy']
    )
""",
    "newrelic": """
import newrelic.agent
from src.utils.metrics import track_request

# Instrument with New Relic
@newrelic.agent.function_trace()
async def process_request():
    async with track_request("/api/endpoint", "POST") as metric:
        # Your code here
        metric.status_code = 200
""",
}


def rewrite(code: str) -> str:
    code = code.replace("src.utils.metrics", "trioproxy.metrics")
    return code.replace("src.utils.benchmarks", "trioproxy.benchmarks")


async def run_snippet(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Run ``code`` as the body of an async function; return its locals."""
    body = textwrap.indent(rewrite(code).strip("\n"), "    ")
    src = f"async def __snippet__():\n{body}\n    return locals()\n"
    exec(compile(src, "<guide>", "exec"), namespace)
    result = await namespace["__snippet__"]()
    namespace.update(result)
    return result


def test_snippets_are_the_guides_verbatim() -> None:
    if not GUIDE.exists():
        pytest.skip("the seed guide is not available here")
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)

    def norm(block: str) -> str:  # the guide has whitespace-only blank lines
        return "\n".join(line.rstrip() for line in block.strip().splitlines())

    assert [norm(b) for b in blocks] == [norm(s) for s in SNIPPETS.values()]


class DatadogStub:
    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.initialized: dict = {}
        self.api = types.SimpleNamespace(Metric=types.SimpleNamespace(send=self._send))

    def initialize(self, **kw: Any) -> None:
        self.initialized = kw

    def _send(self, **kw: Any) -> None:
        self.sent.append(kw)


@pytest.fixture
def fresh_singleton() -> Iterator[MetricsCollector]:
    previous = pkg._collector
    c = MetricsCollector(system_enabled=True)
    pkg.set_metrics_collector(c)
    yield c
    pkg.set_metrics_collector(previous)


@pytest.fixture
def stub_modules(monkeypatch: pytest.MonkeyPatch) -> DatadogStub:
    dd = DatadogStub()
    datadog = types.ModuleType("datadog")
    datadog.initialize = dd.initialize  # type: ignore[attr-defined]
    datadog.api = dd.api  # type: ignore[attr-defined]
    traced: list[str] = []

    def function_trace(*_a: Any, **_k: Any):
        def deco(fn):
            traced.append(fn.__name__)
            return fn

        return deco

    newrelic = types.ModuleType("newrelic")
    agent = types.ModuleType("newrelic.agent")
    agent.function_trace = function_trace  # type: ignore[attr-defined]
    newrelic.agent = agent  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datadog", datadog)
    monkeypatch.setitem(sys.modules, "newrelic", newrelic)
    monkeypatch.setitem(sys.modules, "newrelic.agent", agent)
    dd.traced = traced  # type: ignore[attr-defined]
    return dd


async def test_every_guide_snippet_runs(
    fresh_singleton: MetricsCollector, stub_modules: DatadogStub, capsys: pytest.CaptureFixture[str]
) -> None:
    async def response_stream() -> AsyncIterator[bytes]:
        for part in (b'{"a":1}\n', b'{"b":2}\n'):
            yield part

    # names a later snippet uses without importing (it relies on an earlier context)
    ns: dict[str, Any] = {
        "track_request": pkg.track_request,
        "track_streaming_request": pkg.track_streaming_request,
        "response_stream": response_stream(),
    }
    level = logging.getLogger("trioproxy.metrics").level
    try:
        out = await run_snippet(SNIPPETS["custom_metrics"], ns)
        assert out["collector"] is fresh_singleton
        s = fresh_singleton.summary()
        assert s["total_requests"] == 1
        assert s["endpoints"]["other"]["count"] == 1  # "/custom/endpoint" -> bounded label
        assert s["models"]["custom-model"]["count"] == 1

        out = await run_snippet(SNIPPETS["filtering"], ns)
        assert out["chat_metrics"]["filters"]["time_range_minutes"] == 60
        assert out["chat_metrics"]["filtered_requests"] == 0  # "other" does not contain "chat"
        assert "system" not in out["api_metrics"] and out["api_metrics"]["filtered_requests"] == 1

        out = await run_snippet(SNIPPETS["reduce_buffer"], ns)
        assert out["collector"].max_metrics == 500

        out = await run_snippet(SNIPPETS["minimal_tracking"], ns)
        assert out["collector"] is fresh_singleton
        assert fresh_singleton.sampler.stopped
        assert out["metric"].status_code == 200

        out = await run_snippet(SNIPPETS["streaming"], ns)
        assert out["metric"].total_chunks == 2 and out["metric"].stream_outcome == "completed"

        await run_snippet(SNIPPETS["debug_logging"], ns)

        out = await run_snippet(SNIPPETS["benchmarks"], ns)
        assert "performance_acceptable" in out["summary"]

        out = await run_snippet(SNIPPETS["datadog"], ns)
        await out["send_to_datadog"]()
        assert stub_modules.initialized == {"api_key": "your_api_key", "app_key": "your_app_key"}
        assert stub_modules.sent[-1]["points"] == fresh_singleton.summary()["total_requests"] == 3

        out = await run_snippet(SNIPPETS["newrelic"], ns)
        await out["process_request"]()
        assert stub_modules.traced == ["process_request"]  # type: ignore[attr-defined]
        assert fresh_singleton.summary()["total_requests"] == 4
    finally:
        logging.getLogger("trioproxy.metrics").setLevel(level)
    capsys.readouterr()


def test_the_guide_api_also_runs_under_asyncio() -> None:
    """The guide's integrations (DataDog's ``send_to_datadog``) may live in an asyncio
    application: its async functions read in place there, without trio's threads."""
    import asyncio

    collector = MetricsCollector(system_enabled=False)
    pkg.set_metrics_collector(collector)
    try:

        async def integration() -> tuple[dict, dict, str]:
            async with pkg.track_request("/api/chat", "POST", model="m") as metric:
                metric.status_code = 200
            summary = await pkg.get_metrics_summary()
            chat = await pkg.get_filtered_metrics_summary(endpoint_filter="chat")
            return summary, chat, await pkg.get_prometheus_metrics()

        summary, chat, exposition = asyncio.run(integration())
    finally:
        pkg.set_metrics_collector(None)
    assert summary["total_requests"] == 1 and chat["filtered_requests"] == 1
    assert 'http_requests_total{api="ollama",endpoint="api_chat"' in exposition
