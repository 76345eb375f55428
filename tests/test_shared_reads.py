"""The shared metrics renderings' bound (``trioproxy/metrics/reads.py``).

A rendering runs shielded from its reader's cancellation (others share it); the shield has
a deadline, so a stuck rendering (a worker thread that does not return, a file read that
hangs) holds neither a reader whose client left nor the server's shutdown for longer than
that: it fails for every reader sharing it, and the endpoints answer 503.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from trioproxy.metrics import RequestMetrics, exposition, reads, series
from trioproxy.metrics import collector as collector_mod
from trioproxy.metrics.reads import SharedReads, SharedRenderingFailed, SharedRenderingTimedOut

from .test_scrape_cost import _app

BOUND = 10.0


async def _stuck() -> bytes:
    # longer than any bound here: the old, unbounded shield returned it after this
    await trio.sleep(1000 * BOUND)
    return b"late"


async def test_a_stuck_rendering_fails_for_every_reader_at_its_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = SharedReads(bound=BOUND)
    outcomes: dict[str, tuple[float, BaseException | bytes]] = {}
    start = trio.current_time()

    async def read(name: str) -> None:
        try:
            result: BaseException | bytes = await shared.read("k", _stuck)
        except SharedRenderingFailed as exc:
            result = exc
        outcomes[name] = (trio.current_time() - start, result)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, "first")
        await trio.testing.wait_all_tasks_blocked()
        for i in range(3):
            nursery.start_soon(read, f"later{i}")
    # the first rendering, and the one the three later readers shared after it
    assert shared.renderings == 2
    assert outcomes["first"][0] == BOUND
    assert {outcomes[f"later{i}"][0] for i in range(3)} == {2 * BOUND}
    errors = [outcome for _, outcome in outcomes.values()]
    assert all(isinstance(error, SharedRenderingTimedOut) for error in errors)
    assert "10 s bound" in str(errors[0])
    assert len({id(error) for error in errors}) == 4  # each reader raised its own
    assert shared._running == {} and shared._next == {}


async def test_a_reader_whose_client_left_waits_for_a_stuck_rendering_only_to_its_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = SharedReads(bound=BOUND)
    start = trio.current_time()
    with trio.CancelScope() as scope:
        scope.deadline = start + 1  # the client leaves a second in
        await shared.read("k", _stuck)
    # its own cancellation, not the others' error: it has no one left to tell
    assert scope.cancelled_caught
    assert trio.current_time() - start == BOUND


async def test_after_a_rendering_given_up_the_next_renders_as_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = SharedReads(bound=BOUND)
    with pytest.raises(SharedRenderingTimedOut):
        await shared.read("k", _stuck)

    async def quick() -> bytes:
        await trio.sleep(BOUND / 2)  # under the bound: the shield keeps it whole
        return b"body"

    assert await shared.read("k", quick) == b"body"


async def test_a_stuck_worker_thread_is_abandoned_at_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A render waiting for a thread that does not return: the reader leaves at the bound
    and nothing in trio waits for the thread (it ends when it can, unobserved)."""
    shared = SharedReads(bound=BOUND)
    release = threading.Event()

    async def in_thread() -> bool:
        return await trio.to_thread.run_sync(release.wait, abandon_on_cancel=True)

    try:
        with pytest.raises(SharedRenderingTimedOut):
            await shared.read("k", in_thread)
    finally:
        release.set()


async def test_a_default_bound_is_documented_and_far_above_a_legitimate_scrape() -> None:
    # ~130 ms for a full label budget in one process, ~300 ms merging two workers' files
    assert SharedReads().bound == reads.RENDER_BOUND_SECONDS
    assert 3.0 <= reads.RENDER_BOUND_SECONDS <= 10.0


# ------------------------------------------------------------------ through the endpoints


def _hung_encoding(monkeypatch: pytest.MonkeyPatch, released: threading.Event) -> None:
    """Every exposition encoding (in its worker thread) waits for ``released``."""
    choose = exposition.choose_encoder

    def held(accept: str) -> tuple[Callable[[Any], bytes], str]:
        encoder, content_type = choose(accept)

        def encode(registry: Any) -> bytes:
            # a worker thread hangs here (bounded only so that code without the bound
            # fails the test instead of hanging it); the loop's own encodings do not
            if threading.current_thread() is not threading.main_thread():
                released.wait(timeout=2.0)
            return encoder(registry)

        return encode, content_type

    monkeypatch.setattr(exposition, "choose_encoder", held)
    monkeypatch.setattr(collector_mod, "LOOP_ENCODED_SAMPLES", -1)  # encoded in a thread


async def test_a_scrape_whose_rendering_hangs_is_a_503_in_the_callers_dialect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reads, "RENDER_BOUND_SECONDS", 0.5)
    released = threading.Event()
    _hung_encoding(monkeypatch, released)
    try:
        async with _app() as app:
            client = app.test_client()
            app.collector.record(
                RequestMetrics(
                    endpoint="/api/chat", method="POST", status_code=200, duration_ms=5.0
                )
            )
            replies: dict[str, Any] = {}

            async def scrape(path: str) -> None:
                replies[path] = await client.get(path)

            began = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(scrape, "/metrics")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(scrape, "/v1/metrics/prometheus")
                nursery.start_soon(scrape, "/api/metrics/prometheus")
            # the first rendering, then the one the other two shared: each to its bound
            assert trio.current_time() - began < 4.0
            for reply in replies.values():
                assert reply.status_code == 503
                assert reply.headers["Retry-After"] == "1"
            openai = await replies["/v1/metrics/prometheus"].get_json()
            assert openai["error"]["code"] == "metrics_unavailable"
            assert "0.5 s bound" in openai["error"]["message"]
            ollama = await replies["/api/metrics/prometheus"].get_json()
            assert "0.5 s bound" in ollama["error"]
            # once the encoding works again, so do the scrapes
            released.set()
            reply = await client.get("/metrics")
            assert reply.status_code == 200
            assert b"http_requests_total{" in await reply.get_data()
    finally:
        released.set()


@pytest.mark.parametrize("read", ["read_snapshot", "read_counts"])
async def test_a_hung_merge_of_the_workers_files_lets_its_reader_go(
    read: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--workers`` the files are merged in a worker thread: one that hangs (a file
    read on a stuck disk) must not hold the reader that gave up, nor so the shutdown."""
    primary = series.PrimaryMetrics(multiprocess_dir=None, version="test")
    primary.multiprocess_dir = str(tmp_path)  # the threaded merge, without the global mode
    release = threading.Event()
    monkeypatch.setattr(primary, "_compaction_due", lambda: True)
    monkeypatch.setattr(primary, "_merged_snapshot", lambda compact: release.wait())
    monkeypatch.setattr(primary, "_merged", lambda kinds, compact: release.wait())
    # the old, waited-for thread would return only at this release, after the assertion
    releaser = threading.Timer(5.0, release.set)
    releaser.start()
    try:
        started = trio.current_time()
        with trio.move_on_after(0.2):
            await getattr(primary, read)()
        assert trio.current_time() - started < 2.0
    finally:
        release.set()
        releaser.cancel()
