"""What a scrape costs: the metrics endpoints are open without a client key by default
(``METRICS_REQUIRE_AUTH=false``), so no number of scrapers may multiply the cost of one.

What must hold (docs/metrics.md, "What a scrape costs"): concurrent scrapes of one format
share renderings, at most two for any number of scrapers; every scrape still includes
every request finished before it arrived; a scraper whose client leaves breaks nothing for
the others; a scrape of a proxy that counted nothing since the last one encodes nothing
again, and the JSON summary builds no histogram bucket at all.
"""

from __future__ import annotations

import gc
import threading
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.metrics import Histogram

from trioproxy.config import Settings
from trioproxy.metrics import MetricsCollector, RequestMetrics, exposition, series
from trioproxy.metrics import collector as collector_mod

OPENMETRICS = "application/openmetrics-text;version=1.0.0"


def _finished(model: str = "m", status: int = 200) -> RequestMetrics:
    return RequestMetrics(
        endpoint="/api/chat", method="POST", status_code=status, duration_ms=5.0, model=model
    )


def _requests_total(body: bytes) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("http_requests_total{")
    )


def _gunzip(body: bytes) -> bytes:
    """A gzip body's content: one gzip member, whole, nothing after it."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    content = inflater.decompress(body) + inflater.flush()
    assert inflater.eof and inflater.unused_data == b""
    return content


class _Compressions:
    """Records each gzip head made (a head compressed for the scrapes that accept gzip)
    and whether it was made in a worker thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.in_thread: list[bool] = []
        made = self.in_thread

        class Counted(exposition.GzipHead):
            __slots__ = ()

            def __init__(self, head: bytes, *, ready: bool = True) -> None:
                made.append(threading.current_thread() is not threading.main_thread())
                super().__init__(head, ready=ready)

        monkeypatch.setattr(collector_mod, "GzipHead", Counted)


def _hand_offs_to_threads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The functions the metrics hand to a worker thread from now on (not the app's own)."""
    handed: list[object] = []
    run_sync = trio.to_thread.run_sync

    async def counted(fn: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__module__", None) == collector_mod.__name__:
            handed.append(fn)
        return await run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return handed


async def _scrape(client: Any, accept_encoding: str | None = None, path: str = "/metrics") -> bytes:
    """A scrape's exposition, decoded; a gzip answer says so and varies by the coding."""
    headers = {"Accept-Encoding": accept_encoding} if accept_encoding else {}
    reply = await client.get(path, headers=headers)
    assert reply.status_code == 200
    assert "Accept-Encoding" in reply.headers["Vary"]
    data = await reply.get_data()
    if reply.headers.get("Content-Encoding") == "gzip":
        return _gunzip(data)
    assert "Content-Encoding" not in reply.headers
    return data


async def _backend_checked(collector: MetricsCollector) -> None:
    """Wait for the first readiness check, whose result changes a series."""
    for _ in range(1000):
        if collector.backend_reachable is not None:
            return
        await trio.sleep(0.01)


@asynccontextmanager
async def _app() -> AsyncIterator[Any]:
    from trioproxy.app import create_app

    app = create_app(Settings(upstream_url="http://127.0.0.1:1/v1"))
    before = gc.get_threshold()
    try:
        async with app.test_app():
            yield app
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


class _Renderings:
    """Counts renderings (each builds the derived families once) and collections of the
    primary series (what a rendering costs first: collected, or copied to be built and
    encoded later), and holds every exposition encoding (wherever it runs) until
    :meth:`release`: a scrape stays in progress while others arrive."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.renderings = 0
        self.collections = 0
        self._released = threading.Event()
        derived = collector_mod.derived_families
        collect = series.PrimaryMetrics.collect
        copy = getattr(series, "_copy_series", None)
        choose = exposition.choose_encoder

        def counted_derived(*args: Any) -> Any:
            self.renderings += 1
            return derived(*args)

        def counted_collect(primary: series.PrimaryMetrics) -> Any:
            self.collections += 1
            return collect(primary)

        def counted_copy(metrics: Any) -> Any:
            # the request series' copy, not the sampler's two (copied at every scrape)
            if any(getattr(m, "_name", None) == "http_requests" for m in metrics):
                self.collections += 1
            assert copy is not None
            return copy(metrics)

        def held(accept: str) -> tuple[Callable[[Any], bytes], str]:
            encoder, content_type = choose(accept)

            def encode(registry: Any) -> bytes:
                # a thread waits here; code that encodes on the event loop only stalls
                self._released.wait(timeout=0.3)
                return encoder(registry)

            return encode, content_type

        monkeypatch.setattr(collector_mod, "derived_families", counted_derived)
        monkeypatch.setattr(series.PrimaryMetrics, "collect", counted_collect)
        if copy is not None:
            monkeypatch.setattr(series, "_copy_series", counted_copy)
        monkeypatch.setattr(exposition, "choose_encoder", held)
        # these tests' expositions are small, which the event loop encodes itself: only
        # one encoded in the thread stays in progress while other scrapes arrive
        monkeypatch.setattr(collector_mod, "LOOP_ENCODED_SAMPLES", -1)

    def release(self) -> None:
        self._released.set()


async def test_concurrent_scrapes_share_renderings_and_stay_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    renderings = _Renderings(monkeypatch)
    async with _app() as app:
        client = app.test_client()
        app.collector.record(_finished())
        bodies: dict[str, bytes] = {}

        async def scrape(name: str, path: str = "/metrics") -> None:
            reply = await client.get(path)
            assert reply.status_code == 200
            bodies[name] = await reply.get_data()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(scrape, "first")
            await trio.testing.wait_all_tasks_blocked()  # the first is rendering
            app.collector.record(_finished())  # finished before the next scrapes arrive
            paths = ("/metrics", "/v1/metrics/prometheus", "/api/metrics/prometheus")
            for i in range(6):
                nursery.start_soon(scrape, f"later{i}", paths[i % 3])
            await trio.testing.wait_all_tasks_blocked()
            renderings.release()
    # the first rendering, and one more shared by the six that came during it
    assert renderings.renderings == 2
    assert _requests_total(bodies["first"]) == 1
    assert {_requests_total(bodies[f"later{i}"]) for i in range(6)} == {2}


async def test_a_scraper_that_leaves_breaks_nothing_for_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    renderings = _Renderings(monkeypatch)
    async with _app() as app:
        client = app.test_client()
        app.collector.record(_finished())
        bodies: dict[str, bytes] = {}
        left: list[str] = []

        async def scrape(name: str, scope: trio.CancelScope) -> None:
            with scope:
                reply = await client.get("/metrics")
                assert reply.status_code == 200
                bodies[name] = await reply.get_data()
            if scope.cancelled_caught:
                left.append(name)

        first, waiting = trio.CancelScope(), trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scrape, "first", first)
            await trio.testing.wait_all_tasks_blocked()
            app.collector.record(_finished())
            nursery.start_soon(scrape, "waiting", waiting)
            for i in range(3):
                nursery.start_soon(scrape, f"stays{i}", trio.CancelScope())
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()  # the client whose scrape is rendering leaves
            waiting.cancel()  # and one waiting for the next rendering
            await trio.testing.wait_all_tasks_blocked()
            renderings.release()
        assert set(left) == {"first", "waiting"}
        assert {_requests_total(bodies[f"stays{i}"]) for i in range(3)} == {2}
        assert renderings.renderings == 2
        # and the renderings go on as before
        app.collector.record(_finished())
        reply = await client.get("/metrics")
        assert _requests_total(await reply.get_data()) == 3


async def test_a_scrape_encodes_nothing_again_until_a_series_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    renderings = _Renderings(monkeypatch)
    renderings.release()
    async with _app() as app:
        client = app.test_client()
        collector = app.collector

        async def scrape(accept: str | None = None) -> str:
            reply = await client.get("/metrics", headers={"Accept": accept} if accept else {})
            return (await reply.get_data()).decode()

        for _ in range(1000):  # the first readiness check's result changes a series
            if collector.backend_reachable is not None:
                break
            await trio.sleep(0.01)
        collector.record(_finished())
        await scrape()
        before = renderings.collections
        for _ in range(3):
            await scrape()
        assert renderings.collections == before  # nothing counted since: nothing collected
        # a sampler tick (every SYSTEM_METRICS_INTERVAL) shows at once, and is no reason
        # to copy and encode the request series again
        collector._on_sample({"process": {"rss_bytes": 123_456_789, "cpu_seconds": 1e6}})
        for accept in (None, OPENMETRICS):
            text = await scrape(accept)
            assert "\ntrioproxy_process_resident_memory_bytes 1.23456789e+08\n" in text
            cpu = text.split("\ntrioproxy_process_cpu_seconds_total ", 1)[1].split("\n", 1)[0]
            assert float(cpu) == pytest.approx(1e6)  # counted up to the tick's total
        assert collector.totals().rss == 123_456_789
        assert renderings.collections == before
        # every kind of change reaches the next scrape
        collector.record(_finished())
        assert _requests_total((await scrape()).encode()) == 2
        collector.upstream_error("timeout")
        assert 'trioproxy_upstream_errors_total{reason="timeout"} 1.0' in await scrape()
        collector.request_started()
        assert "\nhttp_requests_active 1.0\n" in await scrape()
        collector.request_finished(_finished())
        text = await scrape(OPENMETRICS)
        assert "\nhttp_requests_active 0.0\n" in text and text.endswith("# EOF\n")
        assert renderings.collections == before + 4


async def test_the_json_summary_builds_no_histogram_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The summary reads the histograms' counts and sums only: building their buckets
    made a JSON summary cost as much as a Prometheus collection (84 ms at the default
    label budget, for 10 KB)."""
    buckets_built = 0
    child_samples = Histogram._child_samples

    def counted(self: Histogram) -> Any:
        nonlocal buckets_built
        buckets_built += 1
        return child_samples(self)

    monkeypatch.setattr(Histogram, "_child_samples", counted)
    async with _app() as app:
        app.collector.record(_finished())
        app.collector.record(_finished(status=500))
        reply = await app.test_client().get("/v1/metrics")
        summary = await reply.get_json()
    assert summary["total_requests"] == 2 and summary["failed_requests"] == 1
    assert summary["endpoints"]["api_chat"]["avg_duration_ms"] == pytest.approx(5.0)
    assert buckets_built == 0


async def test_a_shared_rendering_is_the_whole_exposition_byte_for_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The endpoints' rendering (its primary families encoded apart, in a thread, and
    kept) is what rendering every family at once gives, in both formats; gzipped (the
    kept head compressed once, each scrape's tail appended to a copy of its compressor),
    it decompresses to the same bytes."""
    monkeypatch.setattr(MetricsCollector, "uptime_seconds", property(lambda self: 12.5))
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    c.record(_finished())
    c.record(_finished(model='q"u\\o{te}', status=503))
    stream = RequestMetrics(endpoint="/v1/chat/completions", method="POST", status_code=200)
    stream.streaming, stream.stream_outcome, stream.duration_ms = True, "completed", 9.0
    stream.add_chunk(10, stream.start + 0.002)
    c.record(stream)
    c.upstream_retry("connect")
    for per_part in (exposition.SAMPLES_PER_PART, 3):  # encoded in parts: families split too
        monkeypatch.setattr(exposition, "SAMPLES_PER_PART", per_part)
        c.upstream_retry("connect")  # a change: encoded anew
        for accept in (None, OPENMETRICS, "text/plain;version=0.0.4"):
            whole, content_type = c.render_prometheus(accept)
            for _ in range(2):  # as rendered, then as kept
                assert await c.read_prometheus(accept) == (whole, content_type)
                zipped, zipped_type = await c.read_prometheus(accept, gzip=True)
                assert (_gunzip(zipped), zipped_type) == (whole, content_type)


async def test_a_reader_already_cancelled_starts_no_rendering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rendering is shielded from its reader's cancellation (others may share it), so
    a reader whose client is gone must not start one: a loop of such reads would never
    see its cancellation."""
    renderings = _Renderings(monkeypatch)
    renderings.release()
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    c.record(_finished())
    with trio.CancelScope() as scope:
        scope.cancel()
        for _ in range(3):
            await c.read_prometheus(None)  # raises Cancelled, or renders shielded
        pytest.fail("cancelled reads rendered and returned")
    assert scope.cancelled_caught
    assert renderings.renderings == 0
    body, _ = await c.read_prometheus(None)
    assert _requests_total(body) == 1 and renderings.renderings == 1


async def test_any_openmetrics_version_asked_is_one_of_two_kept_bodies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review: prometheus_client echoes any OpenMetrics version >= 1.0.0 a scraper asks
    for, and the kept bodies and shared renderings are keyed by Content-Type: 300 keyless
    Accept headers (1.0.1, 1.0.2, ...) kept 300 copies of the exposition."""
    encodings: list[str] = []  # the content type of each head encoded
    encode_head = series.Snapshot.encode

    def counted(snapshot: Any, encode: Any, content_type: str, *args: Any) -> bytes:
        encodings.append(content_type)
        return encode_head(snapshot, encode, content_type, *args)

    monkeypatch.setattr(series.Snapshot, "encode", counted)
    async with _app() as app:
        client = app.test_client()
        await _backend_checked(app.collector)  # its result changes a series
        app.collector.record(_finished())
        types = set()
        for minor in range(1, 30):
            for major in (1, 2, 7):
                accept = f"application/openmetrics-text; version={major}.0.{minor}"
                reply = await client.get("/metrics", headers={"Accept": accept})
                types.add(reply.headers["Content-Type"])
        assert types == {
            "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores",
            "application/openmetrics-text; version=2.0.0; charset=utf-8; escaping=underscores",
        }
        assert len(app.collector._prom.snapshot().bodies) == 2
        assert sorted(encodings) == sorted(types)  # 87 scrapes, each format encoded once


async def test_a_small_exposition_is_encoded_on_the_loop_a_large_one_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The full bench: scrapes of a few hundred samples under load took 28 ms at p50 (3 ms
    idle) once encoded in a thread: each hand-off waited for the GIL the busy loop held."""
    handed = _hand_offs_to_threads(monkeypatch)
    async with _app() as app:
        client = app.test_client()
        app.collector.record(_finished())
        small = await (await client.get("/metrics")).get_data()
        assert app.collector._prom.snapshot().samples <= collector_mod.LOOP_ENCODED_SAMPLES
        assert handed == []
        # any head over the budget (a changed one's kept lines count a tenth)
        monkeypatch.setattr(collector_mod, "LOOP_ENCODED_SAMPLES", -1)
        app.collector.record(_finished())
        large = await (await client.get("/metrics")).get_data()
        assert len(handed) == 1
        assert _requests_total(small) == 1 and _requests_total(large) == 2


async def test_a_few_models_exposition_is_encoded_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A proxy serving a few models exposes some hundreds of samples; built, encoded and
    gzipped at about 6 us each, 600 of them held the loop for about 4 ms per scrape (until
    2026-12-02 up to 4,000, about 25 ms, stayed on the loop). At the defaults, such an
    exposition goes to the worker thread; a single model's stays on the loop."""
    handed = _hand_offs_to_threads(monkeypatch)
    async with _app() as app:
        client = app.test_client()
        collector = app.collector
        await _backend_checked(collector)
        for endpoint in ("/api/chat", "/v1/chat/completions", "/api/generate"):
            collector.record(
                RequestMetrics(endpoint=endpoint, method="POST", status_code=200, duration_ms=5)
            )
        await _scrape(client, "gzip")
        assert collector._prom.snapshot().samples < 300
        assert handed == []
        for model in range(8):
            for endpoint in ("/api/chat", "/v1/chat/completions", "/api/generate"):
                collector.record(
                    RequestMetrics(
                        endpoint=endpoint,
                        method="POST",
                        status_code=200,
                        duration_ms=5,
                        model=f"model-{model}",
                    )
                )
        assert _requests_total(await _scrape(client, "gzip")) == 27
        assert 500 < collector._prom.snapshot().samples < 4000
        assert len(handed) == 1


async def test_a_few_models_exposition_once_encoded_stays_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its lines kept, a few models' head (here ~800 samples) costs a tenth of
    encoding it or less once encoded: a scrape after a few requests encodes it on the
    event loop, without waiting for a worker thread (and the GIL the loop holds) twice;
    a new series' samples count in full."""
    handed = _hand_offs_to_threads(monkeypatch)
    c = MetricsCollector(system_enabled=False, multiprocess=False)

    def count(model: str) -> None:
        for endpoint in ("/api/chat", "/v1/chat/completions", "/api/generate"):
            c.record(RequestMetrics(endpoint=endpoint, method="POST", status_code=200,
                                    duration_ms=5, model=model))  # fmt: skip

    for model in range(12):
        count(f"model-{model}")
    first, _ = await c.read_prometheus(OPENMETRICS, gzip=True)
    assert c._prom.snapshot().samples > 600 and len(handed) == 1
    count("model-1")
    count("model-2")
    again, _ = await c.read_prometheus(OPENMETRICS, gzip=True)
    assert len(handed) == 1  # on the loop
    assert _requests_total(_gunzip(again)) == _requests_total(_gunzip(first)) + 6
    budget = c._prom.snapshot().samples // 10 + 10  # the kept lines fit, not 3 new series
    monkeypatch.setattr(collector_mod, "LOOP_ENCODED_SAMPLES", budget)
    count("model-1")
    await c.read_prometheus(OPENMETRICS, gzip=True)
    assert len(handed) == 1
    count("model-new")  # its series are new: encoded by the library, in the thread
    await c.read_prometheus(OPENMETRICS, gzip=True)
    assert len(handed) == 2


async def test_a_gzip_scrape_compresses_nothing_again_until_a_series_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kept encoding is kept compressed too: a scrape of a proxy that counted
    nothing since the last one compresses only its few derived families."""
    compressions = _Compressions(monkeypatch)
    async with _app() as app:
        client = app.test_client()
        collector = app.collector
        await _backend_checked(collector)
        collector.record(_finished())
        plain = await _scrape(client)
        assert compressions.in_thread == []  # nobody asked for gzip: nothing compressed
        for path in ("/metrics", "/v1/metrics/prometheus", "/api/metrics/prometheus") * 2:
            assert _requests_total(await _scrape(client, "gzip", path)) == 1
        assert len(compressions.in_thread) == 1
        assert _requests_total(await _scrape(client)) == _requests_total(plain)
        collector.record(_finished())
        assert _requests_total(await _scrape(client, "gzip")) == 2
        assert _requests_total(await _scrape(client, "gzip")) == 2
        assert len(compressions.in_thread) == 2
        # and a format of its own is compressed for itself
        reply = await client.get(
            "/metrics", headers={"Accept": OPENMETRICS, "Accept-Encoding": "gzip"}
        )
        assert _gunzip(await reply.get_data()).endswith(b"# EOF\n")
        assert len(compressions.in_thread) == 3


async def test_concurrent_gzip_scrapes_share_their_compression(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scrapes in gzip share renderings as plain ones do: seven scrapers during one
    rendering cost two renderings and two compressions, and each is still exact."""
    renderings = _Renderings(monkeypatch)
    compressions = _Compressions(monkeypatch)
    async with _app() as app:
        client = app.test_client()
        app.collector.record(_finished())
        bodies: dict[str, bytes] = {}

        async def scrape(name: str) -> None:
            bodies[name] = await _scrape(client, "gzip")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(scrape, "first")
            await trio.testing.wait_all_tasks_blocked()  # the first is rendering
            app.collector.record(_finished())
            for i in range(6):
                nursery.start_soon(scrape, f"later{i}")
            await trio.testing.wait_all_tasks_blocked()
            renderings.release()
    assert renderings.renderings == 2
    assert compressions.in_thread == [True, True]  # with the encoding, in its thread
    assert _requests_total(bodies["first"]) == 1
    assert {_requests_total(bodies[f"later{i}"]) for i in range(6)} == {2}


async def test_a_large_head_is_compressed_in_a_thread_a_small_one_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compressed where it is encoded: on the loop a head of at most
    LOOP_ENCODED_SAMPLES samples, in the encoding's thread a larger one (one hand-off,
    not two); a head kept from a plain scrape is compressed in a thread when it is over
    LOOP_COMPRESSED_BYTES."""
    compressions = _Compressions(monkeypatch)
    handed = _hand_offs_to_threads(monkeypatch)
    async with _app() as app:
        client = app.test_client()
        collector = app.collector
        await _backend_checked(collector)
        collector.record(_finished())
        await _scrape(client, "gzip")
        assert (compressions.in_thread, handed) == ([False], [])
        # any head over the budget (a changed one's kept lines count a tenth)
        monkeypatch.setattr(collector_mod, "LOOP_ENCODED_SAMPLES", -1)
        collector.record(_finished())
        assert _requests_total(await _scrape(client, "gzip")) == 2
        assert (compressions.in_thread, len(handed)) == ([False, True], 1)
        # encoded for a plain scrape, then compressed for a gzip one
        collector.record(_finished())
        await _scrape(client)
        assert len(handed) == 2
        assert _requests_total(await _scrape(client, "gzip")) == 3
        assert (compressions.in_thread[-1], len(handed)) == (False, 2)
        monkeypatch.setattr(collector_mod, "LOOP_COMPRESSED_BYTES", 10)
        collector.record(_finished())
        await _scrape(client)
        assert _requests_total(await _scrape(client, "gzip")) == 4
        assert (compressions.in_thread[-1], len(handed)) == (True, 4)


# ----------------------------------------------------------------------------- the tail


def _family(name: str, *values: float, exemplar: bool = False) -> Any:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.samples import Exemplar

    if exemplar:
        family: Any = CounterMetricFamily(name, "a counter", labels=["kind"])
        for n, value in enumerate(values):
            family.add_metric([str(n)], value)
        family.samples = [
            s._replace(exemplar=Exemplar({"trace_id": "ab"}, 1.0)) for s in family.samples
        ]
        return family
    family = GaugeMetricFamily(name, "a gauge\nwith a newline", labels=["kind"])
    for n, value in enumerate(values):
        family.add_metric([f"k{n}"], value)
    return family


@pytest.mark.parametrize(
    "accept",
    [None, "application/openmetrics-text;version=1.0.0", "application/openmetrics-text"],
)
def test_the_tail_is_encoded_as_a_whole_and_only_its_changed_families_again(
    accept: str | None,
) -> None:
    """A scrape's tail (derived and sampled families, built anew for each scrape) encoded
    family by family, each reused while its samples are the same: the same bytes as
    prometheus_client encoding the list at once, through values that compare equal but
    are written apart (0.0 and -0.0, 1 and 1.0), NaN, and exemplars."""
    encode, content_type = exposition.exposition_format(accept)
    encoded: list[str] = []

    def counting(families: Any) -> bytes:
        encoded.extend(f.name for f in families)
        return encode(families)

    tails = exposition.TailEncodings()
    scrapes = [
        [_family("a", 1.0, 2.0), _family("b", 0.0), _family("c", float("nan")), _family("d", 1.0)],
        [_family("a", 1.0, 2.0), _family("b", -0.0), _family("c", float("nan")), _family("d", 1)],
        [_family("a", 1.0, 3.0), _family("b", -0.0), _family("e", 5.0, exemplar=True)],
        [_family("a", 1.0, 3.0), _family("b", -0.0), _family("e", 5.0, exemplar=True)],
        [],
    ]
    for families in scrapes:
        assert tails.encode(counting, content_type, families) == encode(families)
    # the first scrape encodes all; then only what changed (NaN, compared by its repr, is
    # the same; exemplars are encoded every time)
    assert encoded == ["a", "b", "c", "d", "b", "d", "a", "e", "e"]


async def test_a_scrape_encodes_only_the_changed_families_of_its_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = MetricsCollector(multiprocess=False)
    calls: list[int] = []
    real = exposition.TailEncodings.encode

    def spy(self: Any, encode: Any, content_type: str, families: Any) -> bytes:
        def counted(listed: Any) -> bytes:
            calls.append(len(listed))
            return encode(listed)

        return real(self, counted, content_type, families)

    monkeypatch.setattr(exposition.TailEncodings, "encode", spy)
    first, _ = await c.read_prometheus(None)
    everything = len(calls)
    calls.clear()
    second, _ = await c.read_prometheus(None)
    assert 0 < len(calls) < everything / 2  # uptime, the host's counters: not the rest
    assert first.count(b"\n") == second.count(b"\n")


_FORMATS = [
    None,
    OPENMETRICS,
    "application/openmetrics-text;version=2.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
]


@pytest.mark.parametrize("accept", _FORMATS)
def test_a_head_encodes_only_new_series_and_is_the_whole_encoding_byte_for_byte(
    accept: str | None,
) -> None:
    """The primary families' head made from a copy reuses each unchanged series' lines
    and writes a changed one's from its kept lines: the bytes of encoding the families
    whole, through random updates (new series, label values to escape, values written
    apart though equal: 0.0 and -0.0; NaN, infinities, Go's exponents), while the
    library's encoder sees only series it never encoded before."""
    import random

    encode, content_type = exposition.exposition_format(accept)
    library: list[int] = []  # samples the library's encoder was given, per call

    def counting(families: Any) -> bytes:
        library.append(sum(len(f.samples) for f in families))
        return encode(families)

    m = series.PrimaryMetrics(multiprocess_dir=None, version="t", process_metrics=False)
    encodings = series.SeriesEncodings()
    rng = random.Random(7)
    models = ["m", 'q"u\\o{te}', "new\nline", "ünï", "car\rriage\u2028", "x"]
    values = [0.0, -0.0, 1.0, 2.5, 1e21, 1234567.0, float("nan"), float("inf"), -3.0]
    seen: set[tuple[str, ...]] = set()
    for step in range(60):
        for _ in range(rng.randrange(4)):
            model = rng.choice(models)
            m.requests.labels("openai", "v1_chat", "POST", model, "200").inc(rng.choice([1, 2.5]))
            m.duration.labels("openai", "v1_chat", model, "false").observe(rng.choice(values))
            m.tokens.labels("openai", model, "output").inc(rng.choice([0, 3, 1e21]))
        m.active.set(rng.choice(values))  # a gauge: -0.0 after 0.0 is a change
        if step % 17 == 16:
            m.tokens.clear()  # series that go away: not kept, new when they come back
            seen = {key for key in seen if key[0] != "trioproxy_tokens"}
        copied = series._copy_series(m._families)
        assert copied is not None
        whole = exposition.encode_head(encode, content_type, map(series._build_family, copied))
        library.clear()
        assert encodings.encode(counting, content_type, copied) == whole
        # the library encoded comment lines (first encodings) and new series only
        fresh = {(c[1], *values_) for c in copied for values_, *_ in c[7]} - seen
        per_series = {c[1]: len(c[6]) + 2 if c[6] else 1 for c in copied}
        assert sum(library) == sum(per_series[name] for name, *_ in fresh)
        seen |= fresh
    assert seen  # the loop went through series


async def test_a_scrape_under_load_encodes_no_series_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With requests counted between scrapes, a scrape's head is written from the lines
    kept (the library encodes only the tail): before, every family of the head was
    encoded again."""
    monkeypatch.setattr(MetricsCollector, "uptime_seconds", property(lambda self: 12.5))
    encoded: list[str] = []
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    for accept in (None, OPENMETRICS):
        for gzip in (False, True):
            c.record(_finished())
            c.record(_finished(model="other", status=503))
            await c.read_prometheus(accept, gzip=gzip)
    real = exposition.exposition_format

    def spied(accept: str | None) -> Any:
        encode, content_type = real(accept)

        def counted(families: Any) -> bytes:
            encoded.extend(f.name for f in families)
            return encode(families)

        return counted, content_type

    monkeypatch.setattr(collector_mod, "exposition_format", spied)
    scraped: list[str] = []
    for accept in (None, OPENMETRICS):
        for gzip in (False, True):
            c.record(_finished())
            c.record(_finished(model="other", status=503))
            body, _ = await c.read_prometheus(accept, gzip=gzip)
            scraped.extend(encoded)
            whole, _ = c.render_prometheus(accept)  # every family encoded at once
            encoded.clear()
            assert (_gunzip(body) if gzip else body) == whole
    primary = {f.name for f in c._prom.collect()}
    assert scraped and not primary & set(scraped)


async def test_a_gzip_head_used_once_is_compressed_with_its_tail_in_one_go() -> None:
    """Under load each scrape's head is new and used once: compressed with its tail as
    one stream (the bytes of compressing the whole at once), not flushed and copied for
    reuse; a head used again is compressed for itself then, and still the exposition."""
    c = MetricsCollector(system_enabled=False, multiprocess=False)
    for _ in range(3):
        c.record(_finished())
        body, _ = await c.read_prometheus(OPENMETRICS, gzip=True)
        whole = zlib.compressobj(exposition.GZIP_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        assert body == whole.compress(_gunzip(body)) + whole.flush()
    kept = c._prom.snapshot().gzipped
    assert kept and all(head._state is None for head in kept.values())
    again, _ = await c.read_prometheus(OPENMETRICS, gzip=True)
    assert _gunzip(again).startswith(_gunzip(body)[:1000])
    assert all(head._state is not None for head in kept.values())
