"""The metrics' worker threads are their own: a burst of slow name resolutions (each new
backend connection resolves its host name in one of trio's 40 default threads) must not
hold a scrape or a health check waiting for a thread."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from trioproxy.metrics import MetricsCollector, RequestMetrics
from trioproxy.metrics import collector as collector_mod
from trioproxy.metrics.threads import metrics_threads


def _finished(i: int) -> RequestMetrics:
    return RequestMetrics(
        endpoint="/api/chat", method="POST", status_code=200, duration_ms=float(i + 1), model="m"
    )


@asynccontextmanager
async def _default_threads_all_taken() -> AsyncIterator[None]:
    """Every token of trio's default thread limiter borrowed, as by 40 resolutions that
    wait on a slow resolver."""
    limiter = trio.to_thread.current_default_thread_limiter()
    holders = [object() for _ in range(int(limiter.total_tokens))]
    for holder in holders:
        limiter.acquire_on_behalf_of_nowait(holder)
    try:
        yield
    finally:
        for holder in holders:
            limiter.release_on_behalf_of(holder)


async def test_reads_in_threads_need_none_of_the_default_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector = MetricsCollector(max_metrics=50, system_enabled=False)
    for i in range(40):
        collector.record(_finished(i))
    # the window read and the exposition encoded in threads, as for a large proxy
    monkeypatch.setattr(collector_mod, "LOOP_WINDOW_ENTRIES", 10)
    monkeypatch.setattr(collector_mod, "LOOP_ENCODED_SAMPLES", 10)
    limiters: list[object] = []  # of each hand-off to a thread
    run_sync = trio.to_thread.run_sync

    async def handed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        limiters.append(kwargs.get("limiter"))
        return await run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", handed)
    async with _default_threads_all_taken():
        # a bound, not a timing assert: before, each read waited for a default thread
        # for as long as the resolutions held them (here: for ever)
        with trio.fail_after(30):
            health, status = await collector.read_health()
            summary = await collector.read_summary()
            body, _ = await collector.read_prometheus()
    assert status == 200 and health["window_requests"] == 40
    assert summary["total_requests"] == 40
    assert b"http_requests_total{" in body
    # the health check's and the summary's windows and the exposition: each in a thread
    assert limiters and limiters == [metrics_threads()] * len(limiters)
    assert len(limiters) >= 3
