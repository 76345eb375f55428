"""Exposition: promtool lint, uniqueness, content negotiation, multiprocess aggregation."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from trioproxy.metrics import MetricsCollector, RequestMetrics

ROOT = Path(__file__).resolve().parent.parent

# What Prometheus 2.x and 3.x send.
PROM2_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROM3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)


def busy_collector() -> MetricsCollector:
    c = MetricsCollector(system_enabled=True)
    c.record(
        RequestMetrics(
            endpoint="/api/chat", method="POST", status_code=200, duration_ms=12, model="m1"
        )
    )
    c.record(
        RequestMetrics(
            endpoint="/v1/chat/completions", method="POST", status_code=503, duration_ms=3
        )
    )
    c.record(
        RequestMetrics(
            endpoint="/nope", method="GET", status_code=404, duration_ms=1, model='we"ird\nname'
        )
    )
    c.record(  # a successful model with characters the exposition must escape
        RequestMetrics(
            endpoint="/api/show", method="POST", status_code=200, duration_ms=2, model='q"u\\o{te}'
        )
    )
    m = RequestMetrics(
        endpoint="/api/generate",
        method="POST",
        status_code=200,
        streaming=True,
        model="m1",
        upstream_first_byte_ms=1.0,
        overhead_ms=1.0,
        upstream_ms=30.0,
        input_tokens=4,
        output_tokens=9,
    )
    m.add_chunk(10, m.start + 0.002)
    m.mark_first_token(m.start + 0.003)
    m.add_chunk(10, m.start + 0.010)
    m.stream_outcome = "cancelled"
    m.duration_ms = 11.0
    c.record(m)
    c.upstream_error("timeout")
    c.upstream_retry("connect")
    c.request_started()
    return c


def promtool_or_skip() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool must be installed in CI")
        pytest.skip("promtool not installed")
    return path


@pytest.mark.parametrize("busy", [False, True], ids=["empty", "busy"])
def test_promtool_check_metrics_is_silent(busy: bool) -> None:
    promtool = promtool_or_skip()
    c = busy_collector() if busy else MetricsCollector(system_enabled=False)
    body, _ = c.render_prometheus(None)
    res = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, check=False
    )
    assert res.returncode == 0, (res.stdout + res.stderr).decode()
    assert res.stdout == b"" and res.stderr == b""


def test_the_help_of_http_requests_total_says_a_failed_stream_keeps_an_error_status() -> None:
    """As docs/metrics.md section 2 says: a broken stream's 499/504/502 replace only a
    success status; one already >= 400 (a shutdown's 503, a refusal after an early start)
    is kept. The HELP said every broken stream was one of four statuses."""
    body, _ = MetricsCollector(system_enabled=False).render_prometheus(None)
    (help_line,) = [
        line
        for line in body.decode().splitlines()
        if line.startswith("# HELP http_requests_total ")
    ]
    assert all(status in help_line for status in ("499", "504", "502", "503", "500"))
    assert "already >= 400 keeps it" in help_line


def test_series_are_unique_and_families_complete() -> None:
    body, ctype = busy_collector().render_prometheus(None)
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert text.endswith("\n")
    seen: Counter[tuple] = Counter()
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        for s in fam.samples:
            seen[(s.name, tuple(sorted(s.labels.items())))] += 1
    assert [k for k, n in seen.items() if n > 1] == []
    helps = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# HELP")]
    assert len(helps) == len(set(helps))
    guide = {
        "http_requests", "http_requests_active", "http_request_success_rate",
        "http_request_error_rate",
        "http_request_duration_seconds", "http_request_duration_p50_seconds",
        "http_request_duration_p95_seconds", "http_request_duration_p99_seconds",
        "http_requests_per_endpoint", "http_request_duration_per_endpoint_seconds",
        "http_request_errors_per_endpoint", "http_streaming_requests_per_endpoint",
        "http_streaming_requests", "http_streaming_first_byte_time_seconds",
        "http_streaming_throughput_bytes_per_second", "http_streaming_chunks",
        "http_streaming_cancelled", "http_streaming_timeout", "http_streaming_avg_chunk_size_bytes",
        "system_cpu_usage_percent", "system_memory_usage_percent", "system_memory_usage_bytes",
        "system_disk_usage_percent", "system_uptime_seconds", "network_bytes_sent",
        "network_bytes_recv", "disk_read_bytes", "disk_write_bytes",
        # ours
        "trioproxy_time_to_first_byte_seconds", "trioproxy_time_to_first_token_seconds",
        "trioproxy_streams", "trioproxy_stream_chunks", "trioproxy_stream_bytes",
        "trioproxy_stream_transfer_seconds", "trioproxy_tokens",
        "trioproxy_upstream_request_duration_seconds", "trioproxy_overhead_seconds",
        "trioproxy_upstream_errors", "trioproxy_upstream_retries", "trioproxy_build_info",
        "trioproxy_process_resident_memory_bytes", "trioproxy_process_cpu_seconds",
        "http_request_client_error_rate",
    }  # fmt: skip
    assert guide <= names, guide - names
    types = {fam.name: fam.type for fam in text_string_to_metric_families(text)}
    assert types["system_uptime_seconds"] == "gauge"
    assert types["http_request_duration_seconds"] == "histogram"
    assert "_created" not in text
    # the sampler fed the process series on the lazy first sample
    rss = [
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.endswith("resident_memory_bytes")
    ]
    assert rss and rss[0] > 0


def test_histogram_buckets_are_the_documented_ones() -> None:
    text = busy_collector().render_prometheus(None)[0].decode()
    les = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                le = s.labels["le"]
                if le not in les[fam.name]:
                    les[fam.name].append(le)
    assert [float(x) for x in les["http_request_duration_seconds"]] == [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280,
        float("inf"),
    ]  # fmt: skip
    assert [float(x) for x in les["trioproxy_time_to_first_token_seconds"]][:-1] == [
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
    ]  # fmt: skip
    assert [float(x) for x in les["trioproxy_overhead_seconds"]][:-1] == [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "accept", ["application/openmetrics-text; version=1.0.0", PROM2_ACCEPT, PROM3_ACCEPT]
)
def test_openmetrics_when_asked(accept: str) -> None:
    body, ctype = busy_collector().render_prometheus(accept)
    assert ctype.startswith("application/openmetrics-text; version=1.0.0; charset=utf-8")
    text = body.decode()
    assert text.endswith("# EOF\n")
    fams = {f.name: f for f in om_parse(text)}  # the strict parser
    assert fams["http_requests"].type == "counter"
    assert sum(s.value for s in fams["http_requests"].samples) == 5


def test_openmetrics_for_prometheus_2_escapes_no_plain_name_per_character(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Prometheus 2.x names no escaping, so it gets ``escaping=underscores``, under which
    prometheus_client's OpenMetrics encoder escapes every sample's name a character at a
    time (1.8x the text format's cost per sample, docs/metrics.md). Names that need no
    escaping are encoded without it: the same bytes as prometheus_client's own encoder."""
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.openmetrics import exposition as om

    from trioproxy.metrics.exposition import exposition_format

    primary, derived = busy_collector()._prometheus_families()
    families = [*primary.families(), *primary.sampled, *derived]
    theirs, their_type = choose_encoder(PROM2_ACCEPT)
    expected = theirs(Families(families))
    assert "escaping=underscores" in their_type
    escaped: list[str] = []
    escape = om._escape

    def counted(s: str, escaping: str, *args: object) -> str:
        if escaping == om.UNDERSCORES:
            escaped.append(s)
        return escape(s, escaping, *args)

    monkeypatch.setattr(om, "_escape", counted)
    encode, content_type = exposition_format(PROM2_ACCEPT)
    assert (encode(families), content_type) == (expected, their_type)
    assert escaped == []


@pytest.mark.parametrize(
    ("sample_name", "label_name"),
    [("a:b", "le"), ("ab", "bad:label"), ("ab", "ünit"), ("ünit", "le")],
)
def test_names_that_need_escaping_are_escaped_as_prometheus_client_does(
    sample_name: str, label_name: str
) -> None:
    """A name that ``underscores`` rewrites (a colon, a character outside ASCII) keeps
    prometheus_client's own encoding, alone or next to plain families."""
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import Metric

    from trioproxy.metrics.exposition import exposition_format

    odd = Metric(sample_name, "odd", "gauge")
    odd.add_sample(sample_name, {label_name: "v"}, 1.0)
    plain = Metric("plain", "plain", "gauge")
    plain.add_sample("plain", {"le": "x"}, 2.0)
    for families in ([odd], [plain, odd]):
        expected = choose_encoder(PROM2_ACCEPT)[0](Families(families))
        assert exposition_format(PROM2_ACCEPT)[0](families) == expected


class Families:
    """A collector over a fixed list of families (what prometheus_client's encoders read)."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


@pytest.mark.parametrize(
    "accept",
    [
        None, "", "*/*", "text/plain", "application/json",
        # a review: prometheus_client compares a quoted version as a string (a 500)
        'application/openmetrics-text; version="1.0.0"', 'text/plain; version="0.0.4"',
        "application/openmetrics-text; version=abc",
    ],
)  # fmt: skip
def test_text_format_by_default(accept: str | None) -> None:
    _, ctype = MetricsCollector(system_enabled=False).render_prometheus(accept)
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"


async def test_get_prometheus_metrics_is_text() -> None:
    import trioproxy.metrics as pkg

    previous = pkg._collector
    try:
        pkg.set_metrics_collector(busy_collector())
        text = await pkg.get_prometheus_metrics()
        assert isinstance(text, str) and "# TYPE http_requests_total counter" in text
    finally:
        pkg.set_metrics_collector(previous)


# ----------------------------------------------------------------------------- multiprocess

WORKER = textwrap.dedent(
    """
    import json, sys
    from trioproxy.metrics import MetricsCollector, RequestMetrics

    role = sys.argv[1]
    c = MetricsCollector(system_enabled=False)
    def rec(status, streaming=False, outcome=None):
        m = RequestMetrics(endpoint="/api/chat", method="POST", status_code=status,
                           duration_ms=10.0, model="m", streaming=streaming, output_tokens=2)
        if streaming:
            m.add_chunk(5, m.start + 0.001)
            m.stream_outcome = outcome
        c.request_started()
        c.request_finished(m)

    if role == "a":
        for s in (200, 200, 500):
            rec(s)
        c.request_started()  # dies with one request in flight
        print("done", flush=True)
    elif role == "b":
        for s in (200, 200, 200, 404):
            rec(s)
        rec(200, streaming=True, outcome="cancelled")
        c.request_started(); c.request_started()  # two in flight while alive
        c.publish()  # what run_publisher does within PUBLISH_WITHIN_SECONDS
        # a private collector (benchmarks) must not leak into the shared files
        private = MetricsCollector(system_enabled=False, multiprocess=False)
        for _ in range(100):
            private.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=200))
        print("ready", flush=True)
        sys.stdin.readline()
        body, _ = c.render_prometheus(None)
        print(json.dumps({"body": body.decode(), "summary": c.summary()}), flush=True)
        sys.stdin.readline()
    else:
        body, _ = c.render_prometheus(None)
        print(json.dumps({"body": body.decode(), "summary": c.summary()}), flush=True)
    """
)


def _sums(text: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] += s.value
    return out


def test_multiprocess_scrape_sums_all_workers(tmp_path: Path) -> None:
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp), "PYTHONPATH": str(ROOT)}

    def run(role: str, **kw) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER, role], env=env, cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw,
        )  # fmt: skip

    with run("a") as a:
        _, err_a = a.communicate(timeout=30)
    assert a.returncode == 0, err_a
    with run("b") as b:
        try:
            assert b.stdout is not None and b.stdin is not None
            assert b.stdout.readline().strip() == "ready"
            with run("scrape") as scraper:
                out, err = scraper.communicate(timeout=30)
            assert scraper.returncode == 0, err
            seen_by_scraper = json.loads(out)
            b.stdin.write("\n")
            b.stdin.flush()
            seen_by_b = json.loads(b.stdout.readline())
            b.communicate("\n", timeout=30)
        finally:
            if b.poll() is None:
                b.kill()
                b.communicate()
    assert b.returncode == 0

    for seen in (seen_by_scraper, seen_by_b):
        sums = _sums(seen["body"])
        assert sums["http_requests_total"] == 8  # 3 (dead worker) + 5; the private 100 are not here
        assert sums["http_request_duration_seconds_count"] == 8
        assert sums["trioproxy_streams_total"] == 1
        assert sums["http_streaming_cancelled_total"] == 1
        assert sums["trioproxy_tokens_total"] == 16
        assert sums["http_requests_active"] == 2  # the dead worker's in-flight request is gone
        assert sums["trioproxy_build_info"] == 1
        assert sums["http_request_error_rate"] == pytest.approx(1 / 7)  # 499 excluded
        s = seen["summary"]
        assert (
            s["total_requests"] == 8 and s["failed_requests"] == 1 and s["cancelled_requests"] == 1
        )
        assert s["client_errors"] == 1 and s["active_requests"] == 2
        assert s["tokens"]["output"] == 16
        assert s["window"]["scope"] == "process"
    # the JSON is the same all-time figures on any worker; the window is per process
    assert seen_by_scraper["summary"]["window"]["size"] == 0
    assert seen_by_b["summary"]["window"]["size"] == 5
    assert (
        _sums(seen_by_scraper["body"])["http_requests_total"]
        == _sums(seen_by_b["body"])["http_requests_total"]
    )


FRESH_WORKER = textwrap.dedent(
    """
    import json
    from trioproxy.metrics import MetricsCollector, RequestMetrics

    c = MetricsCollector(system_enabled=False)
    fresh, _ = c.render_prometheus(None)
    c.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=200, model="m"))
    busy, _ = c.render_prometheus(None)
    print(json.dumps({"fresh": fresh.decode(), "busy": busy.decode()}), flush=True)
    """
)


def _descriptions(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith(("# HELP", "# TYPE")))


def test_a_fresh_worker_describes_every_family_as_one_process_does(tmp_path: Path) -> None:
    """A worker's files hold only series with a value, so a fresh --workers N proxy left
    out HELP/TYPE of 16 labelled families until requests created samples, and the client
    families (no samples without PROXY_API_KEYS) for good; one process describes them all
    from the start."""
    mp = tmp_path / "prom"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp), "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", FRESH_WORKER], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    worker = json.loads(res.stdout)

    single = MetricsCollector(system_enabled=False, multiprocess=False)
    fresh, _ = single.render_prometheus(None)
    single.record(RequestMetrics(endpoint="/api/chat", method="POST", status_code=200, model="m"))
    busy, _ = single.render_prometheus(None)

    assert "# TYPE trioproxy_client_requests_total counter" in fresh.decode()
    assert _descriptions(worker["fresh"]) == _descriptions(fresh.decode())
    assert _descriptions(worker["busy"]) == _descriptions(busy.decode())
    promtool = shutil.which("promtool")
    if promtool is not None:
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=worker["fresh"].encode(),
            capture_output=True, check=False,
        )  # fmt: skip
        assert lint.returncode == 0 and lint.stdout == lint.stderr == b"", lint


# ----------------------------------------------------------------------------- unshared workers


@pytest.mark.parametrize(
    ("argv", "workers"),
    [
        (["/venv/bin/python", "/venv/bin/hypercorn", "--worker-class", "trio", "--workers",
          "2", "trioproxy.app:create_app()"], 2),
        (["python", "-m", "hypercorn", "-k", "trio", "-w", "4", "trioproxy.app:create_app()"], 4),
        (["hypercorn", "-w3", "trioproxy.app:create_app()"], 3),
        (["hypercorn", "--workers=5", "--worker-class", "trio", "app:create_app()"], 5),
        (["hypercorn", "--worker-class", "trio", "trioproxy.app:create_app()"], 1),
        (["hypercorn", "--workers", "many", "app"], 1),
        (["python", "-m", "trioproxy", "--workers", "2"], 0),
        (["gunicorn", "-w", "4"], 0),
        ([], 0),
    ],
)  # fmt: skip
def test_hypercorn_workers_from_a_command_line(argv: list[str], workers: int) -> None:
    from trioproxy.metrics.multiprocess import hypercorn_workers

    assert hypercorn_workers(argv) == workers


@contextlib.contextmanager
def _metrics_warnings() -> Iterator[list[str]]:
    """The metrics logger's messages, also when logging was configured not to propagate."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("trioproxy.metrics")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_unshared_workers_are_warned_about_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """hypercorn --workers N without PROMETHEUS_MULTIPROC_DIR: every worker has its own
    registry and each scrape reports whichever answered (16, 16, 4, 16 requests...)."""
    from trioproxy.metrics import multiprocess

    monkeypatch.delenv(multiprocess.MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(multiprocess, "_workers_checked", False)
    monkeypatch.setattr(multiprocess, "_parent_hypercorn_workers", lambda: 2)
    with _metrics_warnings() as seen:
        MetricsCollector(system_enabled=False)
        MetricsCollector(system_enabled=False)
    warnings = [message for message in seen if "PROMETHEUS_MULTIPROC_DIR" in message]
    assert len(warnings) == 1 and "hypercorn runs 2 workers" in warnings[0]
    assert "\n" not in warnings[0]


def test_no_warning_for_one_worker_or_an_explicit_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from trioproxy.metrics import multiprocess

    workers_asked: list[int] = []

    def hypercorn_workers(n: int) -> Callable[[], int]:
        def asked() -> int:
            workers_asked.append(n)
            return n

        return asked

    monkeypatch.delenv(multiprocess.MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(multiprocess, "_parent_hypercorn_workers", hypercorn_workers(1))
    monkeypatch.setattr(multiprocess, "_workers_checked", False)
    with _metrics_warnings() as seen:
        MetricsCollector(system_enabled=False)
        assert workers_asked == [1]  # the check ran, and found one worker
        monkeypatch.setattr(multiprocess, "_parent_hypercorn_workers", hypercorn_workers(8))
        monkeypatch.setattr(multiprocess, "_workers_checked", False)
        MetricsCollector(system_enabled=False, multiprocess=False)  # the benchmarks' choice
    assert workers_asked == [1]  # an explicit choice needs no check
    assert not [message for message in seen if "PROMETHEUS_MULTIPROC_DIR" in message]
