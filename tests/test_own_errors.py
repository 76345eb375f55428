"""The proxy's own bug is counted as an error, never as a client that left.

An Exception escaping the app after the answer began (alone, or in a nursery's group, as
it escapes a stream) was recorded as a cancelled request: status 499, stream outcome
``cancelled``, the access line ``(cancelled)``. Error-rate alerts and the error budget
never saw it; the cancellations panel showed a client that did nothing wrong."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import trio

from trioproxy.exchange import _finish_metric
from trioproxy.metrics import RequestMetrics

from .conftest import ServerProcess, _spawn, base_env, wait_healthy
from .test_log_request_ids import FAULTY_PROXY_SCRIPT


@pytest.fixture
def faulty_proxy(demo_backend: ServerProcess) -> Iterator[ServerProcess]:
    env = base_env(OPENAI_API_BASE_URL=demo_backend.url, ACCESS_LOG="true")
    args = ["-c", FAULTY_PROXY_SCRIPT, "--host", "127.0.0.1", "--port", "0", "--env-file", ""]
    server = _spawn(args, env)
    try:
        wait_healthy(server.url)
        yield server
    finally:
        server.stop()


def _samples(proxy: ServerProcess, family: str) -> dict[str, float]:
    text = httpx.get(proxy.url + "/v1/metrics/prometheus", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(family + "{")
    }


def test_a_stream_cut_by_our_bug_is_an_error_not_a_cancellation(
    faulty_proxy: ServerProcess,
) -> None:
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi [[tokens=8]]"}]}
    with httpx.stream("POST", faulty_proxy.url + "/api/chat", json=body, timeout=10) as answer:
        assert answer.status_code == 200
        request_id = answer.headers["X-Request-ID"]
        with pytest.raises(httpx.RemoteProtocolError):
            answer.read()  # cut: the chunked body never ends
    labels = 'api="ollama",endpoint="api_chat",model="demo-chat"'
    streams = _samples(faulty_proxy, "trioproxy_streams_total")
    assert streams == {f'trioproxy_streams_total{{{labels},outcome="error"}}': 1.0}
    requests = _samples(faulty_proxy, "http_requests_total")
    chat = {key: value for key, value in requests.items() if "api_chat" in key}
    assert chat == {
        'http_requests_total{api="ollama",endpoint="api_chat",method="POST",'
        'model="demo-chat",status="500"}': 1.0
    }
    (access,) = [
        line
        for line in faulty_proxy.log().splitlines()
        if "trioproxy.access" in line and request_id in line
    ]
    # the client had its 200, then the cut; the status the metrics count, as they count it
    assert " 200 " in access and access.endswith("(error: 500)"), access


def _finished(error: BaseException | None, *, streaming: bool) -> RequestMetrics:
    metric = RequestMetrics(endpoint="/api/chat", method="POST", status_code=200)
    metric.streaming = streaming
    _finish_metric(metric, completed=False, error=error, sent=10, by_proxy=False)
    return metric


def _cancelled() -> trio.Cancelled:
    return trio.Cancelled._create()  # type: ignore[attr-defined]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("bug"),
        BaseExceptionGroup("nursery", [RuntimeError("bug")]),
        BaseExceptionGroup("nursery", [_cancelled(), RuntimeError("bug")]),
    ],
    ids=["alone", "in a group", "beside a cancellation"],
)
def test_an_escaping_exception_is_a_500_named_by_its_type(
    error: BaseException, streaming: bool
) -> None:
    metric = _finished(error, streaming=streaming)
    assert (metric.status_code, metric.error) == (500, "RuntimeError")
    if streaming:
        assert metric.stream_outcome == "error"
        assert not metric.stream_cancelled


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    "error",
    [None, _cancelled(), BaseExceptionGroup("nursery", [_cancelled(), _cancelled()])],
    ids=["nothing", "cancelled", "group of cancellations"],
)
def test_a_client_that_left_is_still_a_cancellation(
    error: BaseException | None, streaming: bool
) -> None:
    metric = _finished(error, streaming=streaming)
    if streaming:
        assert metric.stream_outcome == "cancelled"
    else:
        assert metric.status_code == 499
    assert metric.error is None
