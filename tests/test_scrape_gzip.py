"""Scrapes answered in gzip, as Prometheus asks on every scrape (and the OpenTelemetry
collector, Grafana Agent/Alloy, vmagent, node_exporter's and prometheus_client's own
exporters answer): ``Accept-Encoding`` read with its q-values, ``Content-Encoding: gzip``,
``Vary``; over real sockets, with http.client, which sends and decodes nothing of its own.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import subprocess
import zlib
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

from trioproxy.metrics.exposition import GZIP_LEVEL, GzipHead

from .conftest import ServerProcess
from .test_metrics_prom import PROM2_ACCEPT, promtool_or_skip

Answer = tuple[int, dict[str, str], bytes]


def fetch(
    url: str,
    path: str = "/metrics",
    *,
    method: str = "GET",
    accept_encoding: str | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> Answer:
    """Status, headers (lower-case names) and the body as sent: only the headers given.
    On ``conn`` (kept open) if given, else on a connection of its own."""
    if conn is None:
        with contextlib.closing(connect(url)) as own:
            return fetch(url, path, method=method, accept_encoding=accept_encoding,
                         headers=headers, conn=own)  # fmt: skip
    conn.putrequest(method, path, skip_accept_encoding=True)
    if accept_encoding is not None:
        conn.putheader("Accept-Encoding", accept_encoding)
    for name, value in (headers or {}).items():
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    assert parts.hostname is not None
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def gunzip(body: bytes) -> bytes:
    """One gzip member, whole, nothing after it (what Prometheus' Go reader takes)."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
    content = inflater.decompress(body) + inflater.flush()
    assert inflater.eof and inflater.unused_data == b""
    return content


def vary(headers: dict[str, str]) -> set[str]:
    return {v.strip().lower() for v in headers.get("vary", "").split(",") if v.strip()}


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def series(text: str, openmetrics: bool) -> Series:
    parse = om_parse if openmetrics else text_string_to_metric_families
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in parse(text)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def busy_proxy(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> ServerProcess:
    """A proxy with named clients, several models and both APIs used."""
    server = start_proxy(demo_backend.url, PROXY_API_KEYS="webui:key-webui-01,ci:key-ci-0002")
    for key in ("key-webui-01", "key-ci-0002"):
        with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
            for model in ("demo-chat", "demo-reasoner"):
                messages = [{"role": "user", "content": "hi"}]
                for stream in (False, True):
                    for path in ("/api/chat", "/v1/chat/completions"):
                        body = {"model": model, "messages": messages, "stream": stream}
                        assert client.post(server.url + path, json=body).status_code == 200
            embed = {"model": "demo-embed", "input": "a"}
            assert client.post(server.url + "/v1/embeddings", json=embed).status_code == 200
            assert client.post(server.url + "/api/chat", json={"model": "nope"}).status_code == 404
    return server


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_a_gzip_scrape_is_the_plain_exposition_and_promtool_reads_it(
    busy_proxy: ServerProcess, openmetrics: bool
) -> None:
    """Between two plain scrapes, a gzip one: the same series, the same values wherever the
    two plain ones agree (all but the clock's and the host's), the same HELP and TYPE."""
    accept = {"Accept": PROM2_ACCEPT} if openmetrics else {}
    url = busy_proxy.url
    with contextlib.closing(connect(url)) as conn:  # one connection: theirs stay as they are
        fetch(url, accept_encoding="identity", headers=accept, conn=conn)  # the first sample
        before = fetch(url, accept_encoding="identity", headers=accept, conn=conn)
        status, headers, body = fetch(url, accept_encoding="gzip", headers=accept, conn=conn)
        after = fetch(url, accept_encoding="identity", headers=accept, conn=conn)
    assert status == 200 and before[0] == after[0] == 200
    assert headers["content-encoding"] == "gzip"
    assert int(headers["content-length"]) == len(body)
    assert {"accept", "accept-encoding"} <= vary(headers)
    assert headers["content-type"] == before[1]["content-type"]
    assert "content-encoding" not in before[1]
    text = gunzip(body).decode()
    plain, later = before[2].decode(), after[2].decode()
    assert len(body) * 5 < len(plain)  # an exposition compresses 10-20 times

    zipped, first, last = (series(t, openmetrics) for t in (text, plain, later))
    assert zipped.keys() == first.keys() == last.keys()
    steady = {key for key in first if first[key] == last[key]}
    assert len(steady) > 0.8 * len(first)
    assert {key: zipped[key] for key in steady} == {key: first[key] for key in steady}
    assert [line for line in text.splitlines() if line.startswith("#")] == [
        line for line in plain.splitlines() if line.startswith("#")
    ]
    assert "trioproxy_client_requests_total" in text and 'model="demo-reasoner"' in text
    if openmetrics:
        assert text.endswith("# EOF\n")
    else:
        lint = subprocess.run(
            [promtool_or_skip(), "check", "metrics"], input=text.encode(), capture_output=True
        )
        assert lint.returncode == 0 and lint.stdout == lint.stderr == b"", lint


@pytest.mark.parametrize(
    ("accept_encoding", "zipped"),
    [
        ("gzip", True),  # Prometheus, vmagent, the OpenTelemetry collector
        ("gzip, deflate", True),  # Python's requests and httpx
        ("deflate, gzip, br, zstd", True),  # curl --compressed
        ("GZIP;Q=0.5", True),
        ("x-gzip", True),  # RFC 9110 8.4.1.3: the same coding
        ("*", True),
        ("identity;q=0.5, gzip", True),
        ("gzip;q=0.5, identity;q=0.5", True),  # a tie: the smaller body
        (None, False),  # no header: identity, as every exporter answers it
        ("", False),  # RFC 9110 12.5.3: no coding wanted
        ("identity", False),
        ("gzip;q=0", False),
        ("gzip;q=0.000", False),
        ("gzip;q=0, *", False),  # the named coding's q wins over *
        ("*;q=0", False),  # nothing acceptable: identity, the one left to send
        ("identity;q=0", False),  # gzip not offered: identity all the same
        ("identity, gzip;q=0.5", False),
        ("*;q=0.8, gzip;q=0.5", False),  # identity counts as * (0.8)
        ("deflate, br", False),
        ("gzip;q=nonsense", False),  # an entry that cannot be read offers nothing
    ],
)
def test_gzip_only_where_the_scraper_accepts_it(
    proxy: ServerProcess, accept_encoding: str | None, zipped: bool
) -> None:
    for path in ("/metrics", "/v1/metrics/prometheus", "/api/metrics/prometheus"):
        status, headers, body = fetch(proxy.url, path, accept_encoding=accept_encoding)
        assert status == 200
        assert {"accept", "accept-encoding"} <= vary(headers)
        if zipped:
            assert headers["content-encoding"] == "gzip"
            body = gunzip(body)
        else:
            assert "content-encoding" not in headers
        assert body.startswith(b"# HELP ")


def test_head_answers_what_get_would(busy_proxy: ServerProcess) -> None:
    for accept_encoding in ("gzip", "identity"):
        get = fetch(busy_proxy.url, accept_encoding=accept_encoding)
        head = fetch(busy_proxy.url, method="HEAD", accept_encoding=accept_encoding)
        assert head[0] == get[0] == 200 and head[2] == b""
        assert head[1].get("content-encoding") == ("gzip" if accept_encoding == "gzip" else None)
        for name in ("content-type", "content-encoding", "vary"):
            assert head[1].get(name) == get[1].get(name), name
        # the same exposition, but for the clock's and the host's figures
        assert abs(int(head[1]["content-length"]) - len(get[2])) < len(get[2]) / 10


def test_cors_keeps_the_scrape_varying_by_coding(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """The CORS headers (added after the route) add Origin to Vary, never replace it."""
    server = start_proxy(demo_backend.url, CORS_ORIGINS="https://app.example")
    for origin in ("https://app.example", "https://other.example"):
        _, headers, body = fetch(server.url, accept_encoding="gzip", headers={"Origin": origin})
        assert vary(headers) == {"accept", "accept-encoding", "origin"}
        assert gunzip(body).startswith(b"# HELP ")
    _, headers, _ = fetch(server.url, "/health", headers={"Origin": "https://app.example"})
    assert headers["vary"] == "Origin"


@pytest.mark.parametrize("ready", [True, False])
def test_a_gzip_head_finished_by_any_tail_is_one_gzip_member(ready: bool) -> None:
    """Each scrape finishes a copy of the kept compressor: the kept state never changes,
    so finishing it twice, or with another tail, gives each its own whole body (a head
    not ``ready`` is compressed with its first tail, and for itself at its second)."""
    head = b"".join(b'http_requests_total{model="m%d"} %d.0\n' % (i, i) for i in range(5000))
    zipped = GzipHead(head, ready=ready)
    for tail in (b"", b"system_uptime_seconds 1.5\n", b"x 2.0\n" * 10_000, b""):
        body = zipped.finish(tail)
        assert gunzip(body) == head + tail
        assert gzip.decompress(body) == head + tail  # the stdlib's reader: header, CRC, size
        # as small as the whole compressed at once: the tail refers back into the head
        whole = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        assert len(body) <= 1.01 * len(whole.compress(head + tail) + whole.flush()) + 16
