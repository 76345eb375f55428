"""Prometheus scrapes served below Quart (``trioproxy.scrape``): the answer is Quart's,
header for header, for every way a scrape can go (formats, codings, HEAD, keys, CORS, a
mount point), with the same access line; and Quart is not entered."""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from trioproxy import scrape
from trioproxy.app import ProxyApp, create_app
from trioproxy.config import Settings

KEY = "sk-scraper-key-0123456789"
ALLOWED = "http://grafana.example"
TRACEPARENT = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
# numbers that differ between two scrapes a moment apart (uptime, CPU, bytes, timestamps)
_SAMPLE_VALUE = re.compile(rb"^([^#][^ ]*(?:\{[^}]*\})?) .*$", re.MULTILINE)
# the time taken and the bytes sent (the values of a scrape differ a moment later)
_DURATION = re.compile(r" [0-9.]+ ms [0-9]+ B")


def _settings(**overrides: Any) -> Settings:
    return Settings(upstream_url="http://127.0.0.1:9", **overrides)


@pytest.fixture
async def app(request: pytest.FixtureRequest) -> AsyncIterator[ProxyApp]:
    proxy = create_app(_settings(**getattr(request, "param", {})))
    async with proxy.test_app():
        yield proxy


async def _asgi(
    app: ProxyApp, method: str, path: str, headers: list[tuple[str, str]], root: str = ""
) -> list[dict[str, Any]]:
    """The ASGI events the app sent for a request, from a scope as hypercorn builds it."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": root + path, "raw_path": (root + path).encode(),
        "query_string": b"", "root_path": root, "client": ("127.0.0.1", 1), "server": None,
        "headers": [(b"x-request-id", b"scrape-1")]
        + [(n.lower().encode(), v.encode()) for n, v in headers],
        "extensions": {},
    }  # fmt: skip
    events = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return events.pop(0) if events else await trio.sleep_forever()  # type: ignore[func-returns-value]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)  # type: ignore[arg-type]
    return sent


def _answer(events: list[dict[str, Any]]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers (content-length checked, then left out: values differ) and the body
    with its sample values left out (decompressed first)."""
    start = events[0]
    body = b"".join(e.get("body", b"") for e in events[1:])
    headers = sorted(start["headers"])
    assert (b"content-length", b"%d" % len(body)) in headers
    if (b"content-encoding", b"gzip") in headers:
        body = gzip.decompress(body)
    stable = [h for h in headers if h[0] != b"content-length"]
    return start["status"], stable, _SAMPLE_VALUE.sub(rb"\1", body)


async def _both_ways(
    app: ProxyApp,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    root: str = "",
) -> None:
    """The scrape served below Quart and the same one through Quart answer alike: as one
    through Quart just before or just after it (a series the background tasks add, such as
    the readiness check's, may appear between two scrapes)."""

    async def through_quart() -> tuple[Any, list[str]]:
        caplog.clear()
        with monkeypatch.context() as patched:
            patched.setattr(scrape, "scrape_route", lambda scope: None)
            answer = _answer(await _asgi(app, method, path, headers, root))
        return answer, _access_lines(caplog)

    before = await through_quart()
    caplog.clear()
    fast = _answer(await _asgi(app, method, path, headers, root)), _access_lines(caplog)
    assert fast in (before, await through_quart()), (method, path, headers)


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [_DURATION.sub(" ", r.getMessage()) for r in caplog.records if r.name.endswith("access")]


@pytest.mark.parametrize(
    "app",
    [{"cors_origins": ALLOWED, "access_log": True}, {"cors_origins": "*"}],
    indirect=True,
)
async def test_the_answer_is_quarts(
    app: ProxyApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    for path in scrape.PROMETHEUS_PATHS:
        for method in ("GET", "HEAD"):
            for headers in (
                [],
                [("Accept", OPENMETRICS), ("Accept-Encoding", "gzip")],
                [("Accept", "text/plain"), ("Accept-Encoding", "gzip;q=0, identity")],
                [("Accept-Encoding", "x-gzip"), ("Origin", ALLOWED)],
                [("Origin", "http://other.example"), ("Accept", OPENMETRICS)],
                [("Accept-Encoding", "*;q=0.5, identity;q=0.1"), ("traceparent", TRACEPARENT)],
            ):  # fmt: skip
                await _both_ways(app, monkeypatch, caplog, method, path, headers)


@pytest.mark.parametrize(
    "app",
    [{"proxy_api_keys": (f"scraper:{KEY}",), "metrics_require_auth": True, "access_log": True,
      "cors_origins": ALLOWED}],
    indirect=True,
)  # fmt: skip
async def test_keys_and_their_refusals_are_quarts(
    app: ProxyApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioproxy.access")
    for path in ("/metrics", "/api/metrics/prometheus", "/v1/metrics/prometheus"):
        for headers in (
            [],
            [("Authorization", "Bearer nope"), ("Origin", ALLOWED)],
            [("Authorization", f"Bearer {KEY}"), ("Accept-Encoding", "gzip")],
            [("x-api-key", KEY)],
        ):
            await _both_ways(app, monkeypatch, caplog, "GET", path, headers)
    refused = await _asgi(app, "GET", "/v1/metrics/prometheus", [])
    assert refused[0]["status"] == 401
    caplog.clear()
    await _asgi(app, "GET", "/metrics", [("Authorization", f"Bearer {KEY}")])
    assert "scraper" in caplog.records[-1].getMessage()  # the client the key names


async def test_below_a_mount_point(
    app: ProxyApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for root in ("/llm", "/llm/"):
        await _both_ways(app, monkeypatch, caplog, "GET", "/metrics", [], root=root)
        await _both_ways(app, monkeypatch, caplog, "GET", "//api/metrics/prometheus", [], root=root)


async def test_a_scrape_does_not_enter_quart(app: ProxyApp) -> None:
    """What made a scrape cost ~0.6 ms more: Quart's request, contexts and hooks."""
    hooks_run = 0

    @app.before_request
    async def _count() -> None:
        nonlocal hooks_run
        hooks_run += 1

    client = app.test_client()
    for path in scrape.PROMETHEUS_PATHS:
        assert (await client.get(path)).status_code == 200
        assert (await client.head(path)).status_code == 200
    assert hooks_run == 0
    # other methods and routes still go through Quart (its 405, its routes)
    assert (await client.post("/metrics")).status_code == 405
    assert (await client.get("/health")).status_code == 200
    assert hooks_run == 2


async def test_a_failing_render_is_a_500_in_dialect(
    app: ProxyApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(app.collector, "read_prometheus", broken)
    await _both_ways(app, monkeypatch, caplog, "GET", "/api/metrics/prometheus", [])
    await _both_ways(app, monkeypatch, caplog, "GET", "/v1/metrics/prometheus", [])
    answer = await _asgi(app, "GET", "/v1/metrics/prometheus", [])
    assert answer[0]["status"] == 500
    assert any("unhandled error while serving GET" in r.getMessage() for r in caplog.records)
