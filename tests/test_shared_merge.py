"""The workers' files merged once and brought up to date (``--workers N``), not merged anew
at every read: exactly prometheus_client's merge, whatever the workers write in between.

The files are written as the workers write them (prometheus_client's ``MmapedDict``), in
this process: the merge reads files only."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.samples import Sample

from trioproxy.metrics.shared_merge import SharedFilesMerge

from .test_metrics_multiprocess import _in_a_worker

# the files of three workers (one of them a master: a counter only), a gauge of each mode
# the proxy uses, and one the library accumulates by timestamp
FILES = (
    "counter_101.db",
    "counter_102.db",
    "counter_103.db",
    "histogram_101.db",
    "histogram_102.db",
    "gauge_livesum_101.db",
    "gauge_livesum_102.db",
    "gauge_livemax_102.db",
    "gauge_max_101.db",
    "gauge_mostrecent_101.db",
    "gauge_mostrecent_102.db",
)
LABELS = ("a", "b", "c", "d")
BOUNDS = ("0.1", "1.0", "+Inf")


def _key(family: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    return mmap_key(family, sample, tuple(labels), tuple(labels.values()), help_text)


def _keys(filename: str, series: str, histogram_family: str) -> list[tuple[str, bool]]:
    """The keys one write to ``series`` touches in a file of this kind, and whether the
    write sets it (else it is only created, at 0, as prometheus_client creates them).
    Series ``d`` of a histogram has no sum (no writer of the proxy's makes one: the
    library orders such a series after all the others of its family)."""
    kind = filename.partition("_")[0]
    labels = {"model": series}
    if kind == "histogram":
        name = histogram_family
        keys = []
        if series != "d":
            keys.append((_key(name, f"{name}_sum", labels, "a histogram"), True))
        for le in BOUNDS:  # the buckets after the sum; the write observes one of them
            with_le = {**labels, "le": le}
            keys.append((_key(name, f"{name}_bucket", with_le, "a histogram"), le == "1.0"))
        return keys
    name = "requests" if kind == "counter" else f"gauge_{filename.split('_')[1]}"
    sample = f"{name}_total" if kind == "counter" else name
    return [(_key(name, sample, labels, f"help of {name}"), True)]


# one write: a file, a series, which histogram family, the value, its timestamp
_WRITE = st.tuples(
    st.sampled_from(FILES),
    st.sampled_from(LABELS),
    st.sampled_from(("duration", "ttfb")),
    # few values: a write often repeats another file's value, with another timestamp
    st.one_of(st.integers(0, 3).map(float), st.floats(0, 1e6, allow_nan=False)),
    st.integers(0, 3).map(float),
)
# between two reads: some writes, and maybe a file gone (a dead worker's live gauge
# removed, or any file: the merge must follow)
_STEP = st.tuples(st.lists(_WRITE, max_size=12), st.sampled_from((None, *FILES)))


def _write(directory: str, write: tuple[str, str, str, float, float]) -> None:
    filename, series, histogram_family, value, timestamp = write
    entries = MmapedDict(os.path.join(directory, filename))
    try:
        for key, written in _keys(filename, series, histogram_family):
            if written:
                entries.write_value(key, value, timestamp)
            else:
                entries.read_value(key)
    finally:
        entries.close()


def _library(files: list[str]) -> list[tuple[str, str, str, list[object]]]:
    """prometheus_client's merge, but for one thing: a sample's values across the files
    (of a counter or histogram) added exactly, not by ``+=`` in the files' order (what
    keeps a total still when dead workers' files are folded into an archive)."""
    metrics = MultiProcessCollector._read_metrics(files)
    for metric in metrics.values():
        if metric.type != "gauge":
            summed: dict[tuple[str, object], list[float]] = {}
            for sample in metric.samples:
                summed.setdefault((sample.name, sample.labels), []).append(sample.value)
            metric.samples = [
                Sample(name, labels, math.fsum(values))  # type: ignore[arg-type]
                for (name, labels), values in summed.items()
            ]
    merged = MultiProcessCollector._accumulate_metrics(metrics, True)
    return [(m.name, m.type, m.documentation, m.samples) for m in merged]


def _kept(merge: SharedFilesMerge, files: list[str]) -> list[tuple[str, str, str, list[object]]]:
    return [(m.name, m.type, m.documentation, m.samples) for m in merge.merge(files)]


@settings(max_examples=150, deadline=None)
@given(st.lists(_STEP, min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_the_kept_merge_is_the_librarys_after_any_writes(
    steps: list[tuple[list[tuple[str, str, str, float, float]], str | None]], rng: object
) -> None:
    """After every step of writes (new series, new values, new files, files removed), the
    merge brought up to date equals prometheus_client's merge of the same files from
    nothing: the same families in the same order, the same samples in the same order."""
    merge = SharedFilesMerge()
    with tempfile.TemporaryDirectory() as directory:
        for writes, removed in steps:
            for write in writes:
                _write(directory, write)
            if removed is not None and os.path.exists(os.path.join(directory, removed)):
                os.remove(os.path.join(directory, removed))
            files = sorted(str(p) for p in Path(directory).glob("*.db"))
            rng.shuffle(files)  # type: ignore[attr-defined]  # any order the glob gives
            assert _kept(merge, files) == _library(files)


def test_a_new_timestamp_alone_is_a_change(tmp_path: Path) -> None:
    """A gauge accumulated by timestamp (``mostrecent``) changes when a worker writes the
    value it already had at a later time: the merge must see it."""
    directory = str(tmp_path)
    _write(directory, ("gauge_mostrecent_101.db", "a", "", 1.0, 2.0))
    _write(directory, ("gauge_mostrecent_102.db", "a", "", 2.0, 1.0))
    files = sorted(str(p) for p in tmp_path.glob("*.db"))
    merge = SharedFilesMerge()
    assert _kept(merge, files)[0][3][0].value == 1.0  # type: ignore[attr-defined]
    _write(directory, ("gauge_mostrecent_102.db", "a", "", 2.0, 3.0))
    assert _kept(merge, files)[0][3][0].value == 2.0  # type: ignore[attr-defined]
    assert _kept(merge, files) == _library(files)


def test_a_read_after_a_few_writes_accumulates_only_their_series(tmp_path: Path) -> None:
    directory = str(tmp_path)
    for filename in FILES:
        for series in LABELS:
            _write(directory, (filename, series, "duration", 1.0, 0.0))
    files = sorted(str(p) for p in tmp_path.glob("*.db"))
    merge = SharedFilesMerge()
    assert _kept(merge, files) == _library(files)
    merged = merge.merge(files)
    accumulated = merge.series_accumulated
    assert merge.merge(files) == merged  # nothing changed: nothing accumulated again
    assert merge.series_accumulated == accumulated
    _write(directory, ("histogram_102.db", "b", "duration", 7.5, 0.0))
    again = merge.merge(files)
    assert merge.series_accumulated == accumulated + 1  # that histogram series only
    assert [m.name for m in again if m not in merged] == ["duration"]
    assert [(m.name, m.samples) for m in again] == [(n, s) for n, _t, _d, s in _library(files)]


SCRAPES_PARSING_KEYS = textwrap.dedent(
    """
    import json, trio
    from trioproxy.metrics import MetricsCollector, RequestMetrics, series

    c = MetricsCollector(system_enabled=False)
    for i in range(20):
        c.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=200,
                                model=f"m{i}", duration_ms=5.0))
    parsed = []
    loads = json.loads

    def counted(text, *args, **kwargs):
        if isinstance(text, str) and text.startswith('["'):
            parsed.append(text)  # an mmap key
        return loads(text, *args, **kwargs)

    async def reads():
        out = []
        for limit in (10**9, 0):  # merged on the event loop, then in a thread
            series.LOOP_MERGED_BYTES = limit
            await c.read_prometheus()  # the first read of these kinds parses every key
            c.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=200,
                                    model="m3", duration_ms=5.0))
            json.loads = counted
            del parsed[:]
            body, _ = await c.read_prometheus()
            summary = await c.read_summary()
            json.loads = loads
            out.append({"parsed": len(parsed), "total": summary["total_requests"],
                        "body": body.decode()})
        return out

    print(json.dumps(trio.run(reads)), flush=True)
    """
)


def test_a_scrape_with_workers_parses_no_key_it_parsed_before(tmp_path: Path) -> None:
    """Every scrape with --workers parsed the key of every entry of every worker's file
    (JSON) and accumulated every series: at a full label budget 260 ms of a 390 ms
    scrape. A key is parsed once; a scrape then reads the values only."""
    first, threaded = json.loads(_in_a_worker(SCRAPES_PARSING_KEYS, tmp_path))
    assert first["parsed"] == threaded["parsed"] == 0
    assert (first["total"], threaded["total"]) == (21, 22)
    for read, count in ((first, 2.0), (threaded, 3.0)):
        assert f'model="m3",status="200"}} {count}' in read["body"]


SCRAPES_ENCODING = textwrap.dedent(
    """
    import json, os, trio, zlib
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from trioproxy.metrics import MetricsCollector, RequestMetrics, series

    c = MetricsCollector()  # its sampler's series change at every tick: never kept
    encoded = []
    encode_head = series.Snapshot.encode

    def counted(*args, **kwargs):
        encoded.append(1)
        return encode_head(*args, **kwargs)

    series.Snapshot.encode = counted

    def other_worker_counts(n):
        # another worker's request, written as prometheus_client writes it
        d = MmapedDict(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "counter_4000003.db"))
        labels = {"api": "ollama", "endpoint": "api_chat", "method": "POST",
                  "model": "", "status": "200"}
        d.write_value(mmap_key("http_requests", "http_requests_total", tuple(labels),
                               tuple(labels.values()), "x"), n, 0.0)
        d.close()

    async def reads():
        out = []
        for step in ("first", "again", "sampled", "counted here", "counted there", "again"):
            if step == "sampled":
                c._sampler.sample_once()
            if step == "counted here":
                c.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=200))
            if step == "counted there":
                other_worker_counts(5)
            del encoded[:]
            body, _ = await c.read_prometheus(gzip=True)
            total = sum(float(line.rsplit(" ", 1)[1])
                        for line in zlib.decompress(body, 47).decode().splitlines()
                        if line.startswith("http_requests_total{"))
            out.append([step, len(encoded), total])
        return out

    print(json.dumps(trio.run(reads)), flush=True)
    """
)


def test_a_scrape_with_workers_encodes_nothing_again_until_a_worker_counts(
    tmp_path: Path,
) -> None:
    """With --workers every scrape encoded the whole exposition, as in one process only a
    scrape after a change does: at a full label budget 130 ms of CPU per scrape of a
    proxy that counted nothing. The encoding is kept while the merge gives the same
    families: a request counted by this worker or another makes the next scrape encode
    anew, the sampler's ticks do not."""
    steps = json.loads(_in_a_worker(SCRAPES_ENCODING, tmp_path))
    assert steps == [
        ["first", 1, 0.0],
        ["again", 0, 0.0],
        ["sampled", 0, 0.0],
        ["counted here", 1, 1.0],
        ["counted there", 1, 6.0],
        ["again", 0, 6.0],
    ]


def test_a_read_that_failed_misses_no_change_afterwards(tmp_path: Path) -> None:
    """A read that fails on one file (here one whose header claims more than it holds)
    had already taken the values of the files before it: the next read found them
    unchanged and kept their series' samples from before those writes, and a counter
    stayed behind its file until it changed again."""
    directory = str(tmp_path)
    _write(directory, ("counter_101.db", "a", "", 1.0, 0.0))
    _write(directory, ("counter_102.db", "b", "", 1.0, 0.0))  # a series of its own
    first, broken = str(tmp_path / "counter_101.db"), str(tmp_path / "counter_102.db")
    merge = SharedFilesMerge()
    assert _kept(merge, [first, broken]) == _library([first, broken])
    _write(directory, ("counter_101.db", "a", "", 5.0, 0.0))
    with open(broken, "r+b") as f:
        f.write((1 << 30).to_bytes(4, sys.byteorder))  # used: more than the file holds
    with pytest.raises(RuntimeError):
        merge.merge([first, broken])
    os.remove(broken)  # gone (or mended): the reads go on without it
    assert _kept(merge, [first]) == _library([first])


def test_a_histogram_series_a_worker_is_still_creating_is_left_out(tmp_path: Path) -> None:
    """prometheus_client writes a new histogram series' entries one at a time (its sum,
    then its buckets in order, +Inf last): a read meanwhile merged the series without its
    +Inf bucket and count, an exposition OpenMetrics forbids. Such a series is left out
    until a file holds it whole; one whole in any worker's file is there as always."""
    directory = str(tmp_path)
    _write(directory, ("histogram_101.db", "a", "duration", 1.0, 0.0))
    made = MmapedDict(os.path.join(directory, "histogram_102.db"))
    try:  # series b: its sum and first bucket so far; series a: whole in the other file
        for series in ("b", "a"):
            for key, _ in _keys("histogram_102.db", series, "duration")[:2]:
                made.read_value(key)
    finally:
        made.close()
    files = sorted(str(p) for p in tmp_path.glob("*.db"))
    (family,) = SharedFilesMerge().merge(files)
    assert {s.labels["model"] for s in family.samples} == {"a"}
    assert next(s for s in family.samples if s.name == "duration_count").value == 1.0
    exposed = openmetrics_latest(SimpleNamespace(collect=lambda: [family])).decode()
    list(om_parse(exposed))  # valid OpenMetrics: every histogram has its +Inf and count
    _write(directory, ("histogram_102.db", "b", "duration", 2.0, 0.0))  # now whole
    assert _kept(SharedFilesMerge(), files) == _library(files)
