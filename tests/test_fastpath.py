"""The proxy routes are served below Quart (``fastpath``) for POST, also behind a mount
point (``root_path``), and through Quart for everything else. The Quart views of these
routes remain (for other ASGI servers' test clients and as the reference): both must
answer alike."""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.trio import serve

from trioproxy import fastpath, hypercorn_patches
from trioproxy.app import ProxyApp, create_app
from trioproxy.cli import hypercorn_config
from trioproxy.config import Settings

from .conftest import ServerProcess
from .test_proxy_behaviour import chat_body, rid, wait_for_events

ALLOWED = "http://ui.example"
CHAT = [{"role": "user", "content": "hi [[tokens=3]]"}]
VOLATILE = re.compile(
    rb'("created_at":"[^"]*"|"created":\d+|"id":"[^"]*"|_duration":\d+|"system_fingerprint":"[^"]*")'
)
CASES: list[tuple[str, dict[str, Any]]] = [
    ("/api/chat", {"model": "demo-chat", "messages": CHAT, "stream": False}),
    ("/api/chat", {"model": "demo-chat", "messages": CHAT}),
    ("/api/generate", {"model": "demo-chat", "prompt": "hi [[tokens=2]]", "stream": False}),
    ("/api/generate", {"model": "demo-chat"}),
    ("/api/embed", {"model": "demo-embed", "input": ["a", "b"]}),
    ("/api/embeddings", {"model": "demo-embed", "prompt": "a"}),
    ("/v1/chat/completions", {"model": "demo-chat", "messages": CHAT}),
    ("/v1/chat/completions", {"model": "demo-chat", "messages": CHAT, "stream": True}),
    ("/v1/completions", {"model": "demo-chat", "prompt": "hi [[tokens=2]]"}),
    ("/v1/embeddings", {"model": "demo-embed", "input": "a"}),
    ("/v1/chat/completions", {"model": 7}),
    ("/api/chat", {"messages": CHAT}),
]


@pytest.fixture
async def app(demo_backend: ServerProcess) -> AsyncIterator[ProxyApp]:
    settings = Settings(upstream_url=demo_backend.url, cors_origins=ALLOWED, max_retries=0)
    proxy = create_app(settings)
    async with proxy.test_app():
        yield proxy


def _stable(body: bytes) -> bytes:
    return VOLATILE.sub(rb"\1"[:0] + b"<volatile>", body)


async def _post(app: ProxyApp, path: str, body: dict[str, Any], root: str = "") -> Any:
    client = app.test_client()
    return await client.post(
        root + path,
        data=json.dumps(body),
        headers={"Origin": ALLOWED, "X-Request-ID": "case-1"},
        root_path=root,
    )


@pytest.mark.parametrize(("path", "body"), CASES)
async def test_fast_path_and_quart_answer_alike(
    app: ProxyApp, path: str, body: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    served: list[str] = []
    original = fastpath.serve

    async def spy(*args: Any) -> None:
        served.append(args[1]["path"])
        await original(*args)

    monkeypatch.setattr(fastpath, "serve", spy)
    fast = await _post(app, path, body)
    assert served == [path]
    monkeypatch.setattr(fastpath, "fast_route", lambda app, scope: None)
    via_quart = await _post(app, path, body)
    assert served == [path]

    assert fast.status_code == via_quart.status_code
    assert fast.headers["Content-Type"] == via_quart.headers["Content-Type"]
    for response in (fast, via_quart):
        assert response.headers["X-Request-ID"] == "case-1"
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    # the time the proxy added, whenever the backend was asked
    overheads = [r.headers.get("X-Proxy-Overhead-Ms") for r in (fast, via_quart)]
    asked_backend = fast.status_code == 200 and body.keys() & {"messages", "prompt", "input"}
    if asked_backend:
        assert all(float(value) >= 0 for value in overheads)  # type: ignore[arg-type]
    elif fast.status_code == 200 and path == "/api/generate":
        # a load call checks the backend's model list, which may come from the cache
        assert all(value is None or float(value) >= 0 for value in overheads)
    else:
        assert overheads == [None, None]
    fast_body = await fast.get_data()
    assert _stable(fast_body) == _stable(await via_quart.get_data())
    assert fast_body  # every case answers with content


async def test_under_a_mount_point_the_proxy_routes_are_served_below_quart(
    app: ProxyApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a mount point the fast path applies too, so the bound on requests in flight
    and the in-band end at shutdown hold there as well; the metrics see the route path."""
    served: list[str] = []
    finished: list[Any] = []
    original = fastpath.serve

    async def spy(*args: Any) -> None:
        served.append(args[4])
        await original(*args)

    monkeypatch.setattr(fastpath, "serve", spy)
    monkeypatch.setattr(app.collector, "request_finished", finished.append)
    body = {"model": "demo-chat", "messages": CHAT, "stream": False}
    mounted = await _post(app, "/api/chat", body, root="/llm")
    assert mounted.status_code == 200
    assert (await mounted.get_json())["message"]["content"]
    assert served == ["/api/chat"]
    assert [m.endpoint for m in finished] == ["/api/chat"]
    app.admission.limit = 0
    busy = await _post(app, "/v1/chat/completions", body, root="/llm")
    assert busy.status_code == 503
    assert busy.headers["Retry-After"]


@pytest.mark.parametrize(
    ("root", "target"),
    [("/llm", "/llm/api/chat"), ("/llm/", "/llm/api/chat"), ("/llm", "/llm//api/chat"),
     ("", "//api/chat")],
)  # fmt: skip
async def test_every_path_quart_would_route_to_a_proxy_route_takes_the_fast_path(
    app: ProxyApp, root: str, target: str
) -> None:
    """werkzeug routes these to /api/chat; through Quart they would escape the bound on
    requests in flight (and the shutdown handling)."""
    app.admission.limit = 0
    body = json.dumps({"model": "demo-chat", "messages": CHAT, "stream": False})
    response = await app.test_client().post(target, data=body, root_path=root)
    assert response.status_code == 503


@pytest.mark.parametrize(
    ("target", "dialect"),
    [("/api/chat", "ollama"), ("/llm", "ollama"), ("/llmapi/chat", "ollama"),
     ("/v1/chat/completions", "openai"), ("/v1/models", "openai")],
)  # fmt: skip
async def test_outside_the_mount_point_a_path_is_not_found_and_told_so(
    app: ProxyApp, target: str, dialect: str
) -> None:
    """A client whose base URL lacks the mount point got "no route for GET  " in Ollama's
    dialect (Quart's path " "); "/llmapi/chat", which only begins with "/llm", was served
    as "/api/chat"."""
    body = json.dumps({"model": "demo-chat", "messages": CHAT, "stream": False})
    client = app.test_client()
    for method in ("POST", "GET"):
        response = await client.open(target, method=method, data=body, root_path="/llm")
        assert response.status_code == 404
        error = (await response.get_json())["error"]
        message = error["message"] if dialect == "openai" else error
        assert message == (
            f"no route for {method} {target}: the proxy is served below /llm/ "
            "(does the client's base URL lack /llm?)"
        )


async def test_outside_the_mount_point_the_path_is_named_as_sent(app: ProxyApp) -> None:
    """An encoded slash is no separator: "/llm%2Fapi/tags" is not below "/llm/" (the
    test client decodes the path it is given: the scope is built as hypercorn does)."""
    sent = await _get_as_hypercorn_sends_it(
        app, "/llm/api/tags", b"/llm%2Fapi/tags", root_path="/llm"
    )
    assert sent[0]["status"] == 404
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert json.loads(body)["error"].startswith(
        "no route for GET /llm%2Fapi/tags: the proxy is served below /llm/"
    )


async def _get_as_hypercorn_sends_it(
    app: ProxyApp,
    path: str,
    raw_path: bytes,
    *,
    root_path: str = "",
    query: bytes = b"",
    http_version: str = "1.1",
) -> list[dict[str, Any]]:
    """A GET served from a scope built by hand (the test client rebuilds the path and
    query from what it is given); the ASGI events the app sent."""
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": http_version,
        "method": "GET", "scheme": "http", "path": path, "raw_path": raw_path,
        "query_string": query, "root_path": root_path, "headers": [],
        "client": ("127.0.0.1", 1), "server": None, "extensions": {},
    }  # fmt: skip
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else await trio.sleep_forever()  # type: ignore[func-returns-value]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)  # type: ignore[arg-type]
    return sent


async def test_cors_only_for_allowed_origins_and_preflight_still_answered(app: ProxyApp) -> None:
    client = app.test_client()
    body = json.dumps({"model": "demo-chat", "messages": CHAT, "stream": False})
    other = await client.post("/api/chat", data=body, headers={"Origin": "http://evil.example"})
    assert other.status_code == 200
    assert "Access-Control-Allow-Origin" not in other.headers
    preflight = await client.options(
        "/v1/chat/completions",
        headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in preflight.headers["Allow"]
    # browsers never let "*" cover Authorization: it is named; the answer depends on the
    # origin asking (caches must know); the SDK may read the backend's retry advice
    allowed_headers = preflight.headers["Access-Control-Allow-Headers"].split(", ")
    assert "Authorization" in allowed_headers
    assert preflight.headers["Vary"] == "Origin"
    exposed = preflight.headers["Access-Control-Expose-Headers"].split(", ")
    assert {"Retry-After", "retry-after-ms", "x-should-retry", "*"} <= set(exposed)
    # named, as X-Request-ID is: "*" covers no request sent with credentials
    assert {"X-Request-ID", "request-id"} <= set(exposed)


async def test_other_methods_on_a_proxy_route_get_a_405_in_dialect(app: ProxyApp) -> None:
    client = app.test_client()
    response = await client.get("/v1/chat/completions")
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == {"OPTIONS", "POST"}
    assert (await response.get_json())["error"]["message"].startswith("method GET")
    response = await client.put("/api/chat", data=b"{}")
    assert response.status_code == 405
    assert "PUT" in (await response.get_json())["error"]


def _scope(path: str = "/api/chat", headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {"type": "http", "method": "POST", "path": path, "headers": headers or []}


async def _never_called(call: Any) -> Any:
    raise AssertionError("the handler must not run")


async def _serve_raw(
    app: ProxyApp,
    scope: Any,
    events: list[dict[str, Any]],
    handler: Any = _never_called,
    sent: list[Any] | None = None,
) -> list[Any]:
    """Serve one request from scripted receive events; the client then waits forever."""
    pending = list(events)
    sent = [] if sent is None else sent

    async def receive() -> Any:
        if pending:
            return pending.pop(0)
        await trio.sleep_forever()

    async def send(event: Any) -> None:
        sent.append(event)

    await fastpath.serve(app, scope, receive, send, scope["path"], handler)
    return sent


async def test_a_body_that_stops_arriving_is_a_408(app: ProxyApp) -> None:
    app.body_timeout = 0.05
    sent = await _serve_raw(
        app, _scope(), [{"type": "http.request", "body": b"{", "more_body": True}]
    )
    assert sent[0]["status"] == 408
    assert b"did not arrive" in sent[1]["body"]


async def test_a_declared_length_over_the_limit_is_refused_before_reading(app: ProxyApp) -> None:
    limit = app.settings.max_request_bytes
    headers = [(b"content-length", str(limit + 1).encode())]
    sent = await _serve_raw(app, _scope("/v1/embeddings", headers), [])
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["message"].endswith(f"{limit} bytes")


async def test_a_client_gone_before_its_body_ended_gets_nothing_and_counts_as_closed(
    app: ProxyApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[Any] = []
    monkeypatch.setattr(app.collector, "request_finished", finished.append)
    events = [
        {"type": "http.request", "body": b"{", "more_body": True},
        {"type": "http.disconnect"},
    ]
    assert await _serve_raw(app, _scope(), events) == []
    assert [(m.endpoint, m.status_code) for m in finished] == [("/api/chat", 499)]


def _queued(*events: dict[str, Any]) -> tuple[Any, Any]:
    """hypercorn's queue of a request's events (a trio channel) holding ``events``."""
    sender, receiver = trio.open_memory_channel[Any](10)
    for event in events:
        sender.send_nowait(event)
    return sender, receiver


def _part(body: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_body_already_queued_is_read_without_a_scheduler_round(app: ProxyApp) -> None:
    # hypercorn queues a body sent with its head before the app runs: taking it needs no
    # wait (a round, when the loop is busy, is a batch of every other task's step)
    sender, receiver = _queued(_part(b'{"a":'), _part(b"1}"), _part(b"", more=False))
    with sender, receiver, trio.testing.assert_no_checkpoints():
        assert await fastpath._read_body(app, receiver.receive, None) == b'{"a":1}'


async def test_what_follows_a_queued_body_stays_queued(app: ProxyApp) -> None:
    sender, receiver = _queued(_part(b"{}", more=False), {"type": "http.disconnect"})
    with sender, receiver:
        assert await fastpath._read_body(app, receiver.receive, None) == b"{}"
        assert receiver.receive_nowait() == {"type": "http.disconnect"}  # the watcher's


async def test_a_body_partly_queued_waits_for_the_rest(app: ProxyApp) -> None:
    sender, receiver = _queued(_part(b'{"a":'))
    with sender, receiver:
        async with trio.open_nursery() as nursery:

            async def rest() -> None:
                await trio.sleep(0.01)
                await sender.send(_part(b"2}", more=False))

            nursery.start_soon(rest)
            assert await fastpath._read_body(app, receiver.receive, None) == b'{"a":2}'


async def test_a_queued_body_is_bounded_and_a_queued_disconnect_heard(
    app: ProxyApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app, "settings", replace(app.settings, max_request_bytes=4))
    sender, receiver = _queued(_part(b"{}"), _part(b"{}"), _part(b"{", more=False))
    with sender, receiver, pytest.raises(fastpath.ProxyError) as refused:
        await fastpath._read_body(app, receiver.receive, None)
    assert refused.value.status == 413
    sender, receiver = _queued(_part(b"{"), {"type": "http.disconnect"})
    with sender, receiver, pytest.raises(fastpath.ClientLeft):
        await fastpath._read_body(app, receiver.receive, None)


async def _serve_answered(
    app: ProxyApp, after_response: list[dict[str, Any]], *, autojump: bool = False
) -> tuple[list[Any], float]:
    """Serve one request whose handler answers at once; after the response the server
    delivers ``after_response`` (hypercorn: http.disconnect) and then nothing."""
    from trioproxy.exchange import Reply

    pending: list[dict[str, Any]] = [{"type": "http.request", "body": b"{}"}]
    sent: list[Any] = []

    async def receive() -> Any:
        while not pending:
            await trio.sleep_forever()
        return pending.pop(0)

    async def send(event: Any) -> None:
        sent.append(event)
        if event["type"] == "http.response.body" and not event.get("more_body"):
            pending.extend(after_response)

    async def handler(call: Any) -> Reply:
        return Reply(200, b"{}")

    started = trio.current_time()
    await fastpath.serve(app, _scope(), receive, send, "/api/chat", handler)
    return sent, trio.current_time() - started


async def test_the_disconnect_after_a_complete_response_ends_the_request_without_cancelling(
    app: ProxyApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[Any] = []
    monkeypatch.setattr(app.collector, "request_finished", finished.append)
    cancels: list[str] = []
    real_cancel = trio.CancelScope.cancel

    def spy(scope: trio.CancelScope) -> None:
        cancels.append("cancel")
        real_cancel(scope)

    monkeypatch.setattr(trio.CancelScope, "cancel", spy)
    sent, took = await _serve_answered(app, [{"type": "http.disconnect"}])
    assert [e["type"] for e in sent] == ["http.response.start", "http.response.body"]
    assert cancels == [] and took < 0.5
    assert [m.status_code for m in finished] == [200]


async def test_a_server_that_never_reports_the_disconnect_does_not_hold_the_request(
    app: ProxyApp, autojump_clock: Any
) -> None:
    sent, took = await _serve_answered(app, [])
    assert sent[0]["status"] == 200
    assert took == pytest.approx(fastpath._WATCHER_GRACE_SECONDS)


async def test_a_shutdown_ends_in_progress_in_band_and_counts_them(app: ProxyApp) -> None:
    """hypercorn announces its graceful shutdown (``InProgress.begin_shutdown``): streams
    still running a little before the grace period ends get one error line in their
    dialect and a proper end, and count as 503 errors, not as completed or cancelled."""
    text = "hi [[tokens=200]] [[delay=0.05]]"
    requests = {
        "/api/chat": {"model": "demo-chat", "messages": [{"role": "user", "content": text}]},
        "/v1/chat/completions": {
            "model": "demo-chat",
            "messages": [{"role": "user", "content": text}],
            "stream": True,
        },
    }
    replies: dict[str, Any] = {}

    async def ask(path: str) -> None:
        replies[path] = await _post(app, path, requests[path])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for path in requests:
                nursery.start_soon(ask, path)
            while len(app.in_progress) < 2:  # noqa: ASYNC110  (nothing to wait on)
                await trio.sleep(0.01)
            app.in_progress.begin_shutdown(0.4)  # streams end at +0.3 s, not after 10 s

    ndjson = (await replies["/api/chat"].get_data()).decode().splitlines()
    assert json.loads(ndjson[-1]) == {"error": fastpath.SHUTDOWN_MESSAGE}
    assert json.loads(ndjson[-2])["done"] is False  # cut short, after some tokens
    events = (await replies["/v1/chat/completions"].get_data()).decode().split("\n\n")
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["message"] == fastpath.SHUTDOWN_MESSAGE
    assert error["code"] == "service_unavailable"
    assert len(app.in_progress) == 0
    exposition = app.collector.render_prometheus()[0].decode()
    for endpoint in ("api_chat", "v1_chat_completions"):
        assert re.search(
            rf'http_requests_total{{[^}}]*endpoint="{endpoint}"[^}}]*status="503"}} 1\.0',
            exposition,
        )


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_a_shutdown_answers_requests_still_waiting_for_the_backend(
    app: ProxyApp, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[Any] = []
    monkeypatch.setattr(app.collector, "request_finished", finished.append)
    sent: list[Any] = []
    request = [{"type": "http.request", "body": b"{}"}]

    async def slow_backend(call: Any) -> Any:
        await trio.sleep_forever()  # no headers from the backend yet

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_raw, app, _scope(path), request, slow_backend, sent)
            while not len(app.in_progress):  # noqa: ASYNC110  (nothing to wait on)
                await trio.sleep(0.01)
            app.in_progress.begin_shutdown(0.2)
    assert sent[0]["status"] == 503
    error = json.loads(sent[1]["body"])["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert message == fastpath.SHUTDOWN_WAITING_MESSAGE
    assert [(m.status_code, m.streaming) for m in finished] == [(503, False)]
    assert len(app.in_progress) == 0


async def test_a_tracked_phase_ends_at_the_shutdown_s_deadline_and_is_forgotten(
    autojump_clock: object,
) -> None:
    """``InProgress.tracking``: the scope of a phase in progress gets the shutdown's
    deadline, ends it there (swallowing its own cancellation, so the caller goes on to
    answer), and is no longer tracked once it is over, however it ended."""
    streams = fastpath.InProgress()
    with streams.tracking() as scope:
        assert len(streams) == 1 and scope.deadline == math.inf
        streams.begin_shutdown(10.0)
        assert scope.deadline == trio.current_time() + 10.0 - fastpath.SHUTDOWN_MARGIN
        await trio.sleep_forever()
    assert scope.cancelled_caught and len(streams) == 0
    later = streams.tracking()  # a phase begun during the shutdown has its deadline at once
    with pytest.raises(ZeroDivisionError), later as scope:
        assert len(streams) == 1 and scope.deadline == streams.end_at
        1 / 0  # noqa: B018
    assert len(streams) == 0


async def test_a_stream_whose_last_line_is_out_is_not_marked_by_a_shutdown() -> None:
    """After its done line, a relay still reads the rest of the backend's body; a shutdown
    that cuts that housekeeping must not append an error or count the stream as failed."""
    from trioproxy.exchange import RequestState, Tracked
    from trioproxy.metrics import MetricsCollector, RequestMetrics
    from trioproxy.relay import NDJSON, StreamEnd

    streams = fastpath.InProgress()
    metric = RequestMetrics("/api/chat", "POST", streaming=True)
    end = StreamEnd()

    async def body() -> Any:
        yield b'{"done":false}\n'
        end.reached = True
        yield b'{"done":true}\n'
        streams.begin_shutdown(0.2)  # hypercorn announces its shutdown during the drain
        await trio.sleep_forever()  # the rest of the backend's body never comes

    sent: list[dict[str, Any]] = []

    async def send(event: Any) -> None:
        sent.append(event)

    collector = MetricsCollector(enabled=False, system_enabled=False)
    tracked = Tracked(collector, RequestState("r1", metric), send)
    reply = fastpath.Reply(200, body(), NDJSON, end=end)
    with trio.fail_after(5):
        async with tracked as counting_send:
            await fastpath._write(counting_send, reply, [], tracked, streams)
    bodies = b"".join(e.get("body", b"") for e in sent if e["type"] == "http.response.body")
    assert bodies == b'{"done":false}\n{"done":true}\n'
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert metric.stream_outcome == "completed" and metric.status_code != 503


@pytest.mark.parametrize("phase", ["waiting", "first chunk"])
async def test_a_shutdown_ends_the_wait_for_the_backend_and_for_the_first_chunk_alike(
    autojump_clock: object, phase: str
) -> None:
    """``_answer``: the wait for the backend's answer and for a stream's first chunk are
    one tracked scope (not one each); a shutdown in the first is a 503 saying the backend
    did not answer, in the second one saying the stream ended, its body closed and its
    metric an error, and neither has X-Proxy-Overhead-Ms when the stream had started."""
    from trioproxy.exchange import Call, RequestState, Tracked
    from trioproxy.metrics import MetricsCollector, RequestMetrics

    streams = fastpath.InProgress()
    metric = RequestMetrics("/v1/chat/completions", "POST", streaming=True)
    state = RequestState("r1", metric)
    seen: list[set[trio.CancelScope]] = []
    closed: list[bool] = []

    async def body() -> Any:
        try:
            seen.append(set(streams._scopes))
            streams.begin_shutdown(2.0)
            await trio.sleep_forever()
            yield b""
        finally:
            closed.append(True)

    async def handler(call: Any) -> fastpath.Reply:
        seen.append(set(streams._scopes))
        if phase == "waiting":
            streams.begin_shutdown(2.0)
            await trio.sleep_forever()
        return fastpath.Reply(200, body(), "text/event-stream")

    class App:
        settings = Settings()

    collector = MetricsCollector(enabled=False, system_enabled=False)

    async def send(event: Any) -> None:
        pass

    tracked = Tracked(collector, state, send)
    call = Call(App(), state, "/v1/chat/completions", b"{}")  # type: ignore[arg-type]
    reply, head = await fastpath._answer(handler, call, streams, tracked, [], None)
    assert reply.status == 503 and isinstance(reply.body, bytes)
    message = json.loads(reply.body)["error"]["message"]
    if phase == "waiting":
        assert message == fastpath.SHUTDOWN_WAITING_MESSAGE and seen[0]
    else:
        assert message == fastpath.SHUTDOWN_MESSAGE and closed == [True]
        assert seen[0] == seen[1] and len(seen[0]) == 1  # the same scope in both phases
        assert not any(name == b"x-proxy-overhead-ms" for name, _ in head)
    assert metric.stream_outcome == "error" and len(streams) == 0


async def test_a_request_s_cleanups_run_shielded_and_bounded(autojump_clock: object) -> None:
    """Closing the backend's response (a request's cleanups) happens though the request
    is being cancelled, and within ``_CLEANUP_SECONDS``, in one scope: the shield keeps
    out the cancellation from outside, not its own deadline's."""
    from trioproxy import exchange

    ran: list[str] = []

    async def closes() -> None:
        await trio.sleep(1.0)
        ran.append("closed")

    async def hangs() -> None:
        ran.append("hanging")
        await trio.sleep_forever()

    state = exchange.RequestState("r1", None)
    state.cleanups += [closes, hangs]  # run last first
    started = trio.current_time()
    with trio.CancelScope() as outer:
        outer.cancel()
        await exchange._run_cleanups(state)
    assert ran == ["hanging"]  # the hanging cleanup, cut at the bound, ended them all
    assert trio.current_time() - started == exchange._CLEANUP_SECONDS
    assert not state.cleanups
    state.cleanups.append(closes)
    with trio.CancelScope() as outer:
        outer.cancel()
        await exchange._run_cleanups(state)
    assert ran == ["hanging", "closed"]  # shielded: its one-second wait was not cut


async def test_a_query_a_url_cannot_hold_is_forwarded_encoded_not_a_500(app: ProxyApp) -> None:
    """HTTP/2 lets control bytes through in a query; the by-id routes put the query into
    the backend's URL, which must not fail on them."""
    path = "/v1/responses/resp_none/input_items"
    sent = await _get_as_hypercorn_sends_it(
        app, path, path.encode(), query=b"after=\x01\x7f", http_version="2"
    )
    assert sent[0]["status"] == 404  # the demo backend's "no such response", not our 500
    assert app.pool is not None and set(app.pool._urls) <= {"/models", "/responses"}


async def _leave_while_the_backend_thinks(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], list[Any], dict[str, Any]]:
    """A real hypercorn server in this run, the demo backend sitting on a non-stream
    request (30 s) when its client closes the connection: how the request learnt of it
    (``close_hook`` or the watcher task), the request's metrics, the backend's event."""
    app = create_app(Settings(upstream_url=demo_backend.url, host="127.0.0.1", port=0))
    finished: list[Any] = []
    monkeypatch.setattr(app.collector, "request_finished", finished.append)
    how: list[str] = []
    real_hook, real_watch = fastpath.cancel_on_close, fastpath._watch_disconnect

    def hooked(*args: Any) -> None:
        how.append("hook")
        real_hook(*args)

    async def watched(*args: Any) -> None:
        how.append("watcher")
        await real_watch(*args)

    monkeypatch.setattr(fastpath, "cancel_on_close", hooked)
    monkeypatch.setattr(fastpath, "_watch_disconnect", watched)
    request_id = rid()
    payload = json.dumps(chat_body(f"[[first_delay=30]] {rid()}", stream=False)).encode()
    head = (
        f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n"
        f"X-Request-ID: {request_id}\r\n\r\n"
    ).encode()
    hypercorn_patches._writes_end_at = math.inf  # (an earlier in-process server's end)
    with trio.fail_after(15):  # the backend answers after 30 s: a request not cancelled fails
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            config = hypercorn_config(app.settings)
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
            host, port = binds[0].removeprefix("http://").split(":")
            client = await trio.open_tcp_stream(host, int(port))
            await client.send_all(head + payload)
            # the backend has the request
            await trio.to_thread.run_sync(wait_for_events, demo_backend, request_id, bool)
            await client.aclose()
            while not finished:  # noqa: ASYNC110  (the collector's call is what ends it)
                await trio.sleep(0.01)
            stop.set()
    (event,) = await trio.to_thread.run_sync(
        wait_for_events, demo_backend, request_id, lambda ev: ev[0]["ended"] is not None
    )
    return how, finished, event


async def test_a_client_leaving_cancels_the_backend_call_through_hypercorn_s_stream(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under hypercorn (patched: ``hypercorn_patches.cancel_on_close``) the stream's close
    cancels the request: no watcher task, no nursery."""
    how, finished, event = await _leave_while_the_backend_thinks(demo_backend, monkeypatch)
    assert how == ["hook"]
    assert [m.status_code for m in finished] == [499]
    assert event["outcome"] == "disconnected"


async def test_without_the_stream_s_hook_a_watcher_task_cancels_the_backend_call(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another server (or a wrapped send): ``receive()``'s http.disconnect, as before."""
    monkeypatch.setattr(fastpath, "close_hook", lambda send: None)
    how, finished, event = await _leave_while_the_backend_thinks(demo_backend, monkeypatch)
    assert how == ["watcher"]
    assert [m.status_code for m in finished] == [499]
    assert event["outcome"] == "disconnected"
