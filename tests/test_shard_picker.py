"""Which httpx client carries a request: one request per client while there are enough,
so httpcore never hands one idle connection to two requests (the ``ConnectionNotAvailable``
churn that tripled the p99 at 64 concurrent requests), and the client that became idle
last first, so a quiet proxy keeps one warm connection."""

from __future__ import annotations

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.config import Settings
from trioproxy.errors import UpstreamStatusError, UpstreamUnavailable
from trioproxy.upstream import ShardPicker, UpstreamPool


def test_one_request_after_another_reuses_the_same_client() -> None:
    picker = ShardPicker(8)
    for _ in range(5):
        shard = picker.acquire()
        assert shard == 0
        picker.release(shard)


def test_concurrent_requests_get_a_client_each_while_there_are_enough() -> None:
    picker = ShardPicker(4)
    shards = [picker.acquire() for _ in range(4)]
    assert sorted(shards) == [0, 1, 2, 3]
    assert picker.in_flight() == [1, 1, 1, 1]


def test_the_client_that_became_idle_last_is_taken_first() -> None:
    picker = ShardPicker(4)
    for _ in range(3):
        picker.acquire()  # 0, 1, 2
    picker.release(2)
    picker.release(0)
    assert picker.acquire() == 0
    assert picker.acquire() == 2


def test_when_every_client_is_busy_the_least_busy_takes_more() -> None:
    picker = ShardPicker(3)
    for _ in range(3):
        picker.acquire()
    picker.acquire()  # a second request on some client
    extra = picker.in_flight().index(2)
    assert picker.acquire() != extra
    assert sorted(picker.in_flight()) == [1, 2, 2]


@given(st.lists(st.integers(min_value=-1, max_value=20), max_size=200), st.integers(1, 6))
def test_counts_stay_exact_under_any_order(ops: list[int], shards: int) -> None:
    """-1 acquires; n >= 0 releases the n-th request still in flight (if any)."""
    picker = ShardPicker(shards)
    held: list[int] = []
    for op in ops:
        if op < 0:
            before = picker.in_flight()
            shard = picker.acquire()
            if 0 in before:
                assert before[shard] == 0  # never a busy client while one is idle
            else:
                assert before[shard] == min(before)
            held.append(shard)
        elif held:
            picker.release(held.pop(op % len(held)))
        expected = [held.count(shard) for shard in range(shards)]
        assert picker.in_flight() == expected
    for shard in held:
        picker.release(shard)
    assert picker.in_flight() == [0] * shards


class _Backend:
    """One MockTransport per client; records which client served each request and holds
    every response until released, so requests overlap."""

    def __init__(self) -> None:
        self.served_by: list[int] = []
        self.release = trio.Event()
        self._clients = 0

    def transport(self) -> httpx.AsyncBaseTransport:
        index = self._clients
        self._clients += 1

        async def handler(request: httpx.Request) -> httpx.Response:
            self.served_by.append(index)
            await self.release.wait()
            status = 500 if request.url.path.endswith("/fail") else 200
            return httpx.Response(status, json={"client": index})

        return httpx.MockTransport(handler)


def _pool(backend: _Backend, clients: int = 8) -> UpstreamPool:
    settings = Settings(upstream_url="http://backend.test/v1", upstream_clients=clients)
    return UpstreamPool(settings, transport_factory=backend.transport)


async def test_overlapping_requests_are_spread_one_per_client() -> None:
    backend = _Backend()
    pool = _pool(backend)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(pool.request, "POST", "/chat/completions")
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(backend.served_by) == [0, 1, 2, 3, 4, 5]
            backend.release.set()
        assert pool.in_flight() == [0] * 8
    finally:
        await pool.aclose()


async def test_a_stream_holds_its_client_until_it_is_closed() -> None:
    backend = _Backend()
    backend.release.set()
    pool = _pool(backend)
    try:
        result = await pool.request("POST", "/chat/completions", stream=True)
        assert pool.in_flight()[0] == 1
        second = await pool.request("POST", "/chat/completions")
        assert second.response.json() == {"client": 1}  # the stream's client is busy
        await result.aclose()
        await result.aclose()  # closing twice releases once
        assert pool.in_flight() == [0] * 8
    finally:
        await pool.aclose()


async def test_failed_requests_hand_their_client_back() -> None:
    backend = _Backend()
    backend.release.set()
    pool = _pool(backend)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    try:
        with pytest.raises(UpstreamStatusError):
            await pool.request("POST", "/fail", stream=True)
        assert pool.in_flight() == [0] * 8
        with trio.CancelScope() as scope:
            backend.release = trio.Event()  # the next request waits forever
            scope.deadline = trio.current_time() + 0.05
            await pool.request("POST", "/chat/completions")
        assert pool.in_flight() == [0] * 8  # cancelled while waiting for the backend
    finally:
        await pool.aclose()
    settings = Settings(
        upstream_url="http://backend.test/v1",
        upstream_clients=2,
        max_retries=2,
        retry_backoff=0.001,
    )
    refusing = UpstreamPool(settings, transport_factory=lambda: httpx.MockTransport(refuse))
    try:
        with pytest.raises(UpstreamUnavailable):
            await refusing.request("POST", "/chat/completions")
        assert refusing.in_flight() == [0, 0]
    finally:
        await refusing.aclose()
