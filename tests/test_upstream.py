"""The backend pool calls httpx's transport directly; what the client layers did that we
still need (environment proxies, default headers, timeouts) must survive, and what would
harm a proxy (a cookie jar shared by every user) must stay gone."""

from __future__ import annotations

import base64
import functools
import json
from typing import Any

import httpx
import pytest
import trio

from trioproxy import upstream
from trioproxy.config import Settings
from trioproxy.errors import UpstreamStatusError
from trioproxy.forward import (
    refuses_dimensions,
    refuses_field,
    refuses_stream_options,
    wants_max_completion_tokens,
)
from trioproxy.upstream import UpstreamPool

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


def _settings(upstream: str = "http://backend.test/v1", **extra: object) -> Settings:
    return Settings(upstream_url=upstream, upstream_clients=2, **extra)  # type: ignore[arg-type]


async def test_a_cookie_set_for_one_user_is_never_sent_for_the_next() -> None:
    seen: list[httpx.Request] = []

    def backend(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True}, headers={"Set-Cookie": "session=alice"})

    pool = UpstreamPool(_settings(), transport_factory=lambda: httpx.MockTransport(backend))
    try:
        for _ in range(4):  # one after another: the same client (and connection) each time
            result = await pool.request("POST", "/chat/completions", body=b"{}")
            assert result.response.json() == {"ok": True}
    finally:
        await pool.aclose()
    assert len(seen) == 4
    assert all("cookie" not in request.headers for request in seen)


async def test_requests_carry_the_headers_and_timeouts_the_client_used_to_add() -> None:
    seen: list[httpx.Request] = []

    def backend(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    settings = _settings(api_key="sk-test-1234", request_timeout=33.0, connect_timeout=4.0)
    pool = UpstreamPool(settings, transport_factory=lambda: httpx.MockTransport(backend))
    try:
        await pool.request("POST", "/chat/completions", body=b"{}", request_id="abc")
        await pool.request("POST", "chat/completions", body=b"{}", stream=True)
        await pool.request("GET", "/models")
    finally:
        await pool.aclose()
    plain, streamed, listing = seen
    assert str(plain.url) == "http://backend.test/v1/chat/completions"
    assert str(streamed.url) == str(plain.url)
    assert str(listing.url) == "http://backend.test/v1/models"
    assert plain.headers["authorization"] == "Bearer sk-test-1234"
    assert plain.headers["x-request-id"] == "abc"
    assert plain.headers["content-type"] == "application/json"
    assert plain.headers["content-length"] == "2"
    assert plain.headers["host"] == "backend.test"
    assert plain.headers["user-agent"] == "trioproxy"
    assert "x-request-id" not in streamed.headers
    assert "content-type" not in listing.headers
    assert plain.extensions["timeout"] == {
        "connect": 4.0,
        "read": 33.0,
        "write": 33.0,
        "pool": None,
    }
    # a slow but healthy generation is bounded by the relay's deadlines, not a read timeout
    assert streamed.extensions["timeout"]["read"] is None


_TRACE = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "tracestate": "a=b"}


@pytest.mark.parametrize("extra", [
    {},
    {"api_key": "sk-test-1234"},
    {"api_key": "k", "api_key_header": "api-key", "upstream_headers": {"X-Title": "app"}},
    {"upstream": "http://us%40er:p%3Ass@backend.test:8080/v1?api-version=1"},
    {"upstream_headers": {"User-Agent": "mine", "Accept": "application/json"}},
    {"upstream_headers": {"Content-Type": "text/plain"}},  # (refused in the configuration)
])  # fmt: skip
@pytest.mark.parametrize("trace", [None, _TRACE])
@pytest.mark.parametrize("path", ["/chat/completions", "/responses/resp_1"])
def test_a_request_is_built_as_httpx_builds_it(
    extra: dict[str, Any], trace: dict[str, str] | None, path: str
) -> None:
    """``_build`` passes httpx's header merging by for a body to a fixed path: the
    request must be the one httpx builds, headers in the same order, body read."""
    pool = UpstreamPool(_settings(**{"upstream": "http://backend.test/v1", **extra}))
    # the quick way, unless a default header is one httpx or the pool sets per request
    assert (pool._head is None) == ("Content-Type" in extra.get("upstream_headers", {}))
    headers = {"X-Request-ID": "abc", **(trace or {}), "Content-Type": "application/json"}
    body = b'{"model": "m"}'
    for stream in (False, True):
        built = pool._build("POST", path, body, headers, stream)
        expected = httpx.Request(
            "POST",
            pool._url(path),
            headers=pool._default_headers,
            content=body,
            extensions={"timeout": built.extensions["timeout"]},
        )
        expected.headers.update(headers)
        assert built.headers.raw == expected.headers.raw
        assert (built.method, built.url, built.content) == (
            expected.method,
            expected.url,
            expected.content,
        )
        assert type(built.stream) is type(expected.stream)
        assert list(built.stream) == list(expected.stream)  # type: ignore[call-overload]
        assert built.extensions == {"timeout": upstream._stream_timeouts(pool._settings)
                                    if stream else pool._timeouts}  # fmt: skip


@pytest.mark.parametrize(("api_key", "expected"), [
    (None, "Basic " + base64.b64encode(b"us@er:p:ss").decode()),
    ("sk-test-1234", "Bearer sk-test-1234"),  # the API key wins; the URL's pair is dropped
])  # fmt: skip
async def test_credentials_in_the_backend_url_are_sent_as_basic_auth(
    api_key: str | None, expected: str
) -> None:
    """A backend behind basic auth, reached as http://user:password@host/v1: the requests
    go to the transports directly, which would drop the pair from the URL."""
    seen: list[httpx.Request] = []

    def backend(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    settings = _settings("http://us%40er:p%3Ass@backend.test/v1", api_key=api_key)
    pool = UpstreamPool(settings, transport_factory=lambda: httpx.MockTransport(backend))
    try:
        await pool.request("GET", "/models")
    finally:
        await pool.aclose()
    (request,) = seen
    assert request.headers["authorization"] == expected
    assert str(request.url) == "http://backend.test/v1/models"  # no pair in the URL


async def test_an_http_proxy_from_the_environment_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Operators behind a corporate proxy set HTTP(S)_PROXY; the pool must honour it, as
    httpx's client does."""
    request_lines: list[bytes] = []

    async def forward_proxy(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        request_lines.append(head.split(b"\r\n", 1)[0])
        body = json.dumps({"via": "proxy"}).encode()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, forward_proxy, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        for name in PROXY_VARIABLES:
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        pool = UpstreamPool(_settings("http://backend.invalid/v1"))
        try:
            result = await pool.request("POST", "/chat/completions", body=b"{}")
        finally:
            await pool.aclose()
        nursery.cancel_scope.cancel()
    assert result.response.json() == {"via": "proxy"}
    assert request_lines == [b"POST http://backend.invalid/v1/chat/completions HTTP/1.1"]


@pytest.mark.parametrize(
    ("status", "body", "refuses"),
    [
        # Mistral's API: pydantic's extra_forbidden, located at the field
        (422, {"object": "error", "message": {"detail": [{"type": "extra_forbidden",
               "loc": ["body", "stream_options"], "msg": "Extra inputs are not permitted"}]}},
         True),
        (400, {"error": {"message": "Unrecognized request argument supplied: stream_options"}},
         True),
        # an error that only echoes the request is no refusal of the field
        (400, {"error": {"message": 'prompt too long; request was: {"stream": true, '
               '"stream_options": {"include_usage": true}, "messages": []}'}}, False),
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "field required"}],
               "input": {"stream_options": {"include_usage": True}}}, False),
        (500, {"error": {"message": "stream_options: unknown field"}}, False),
    ],
)  # fmt: skip
def test_only_a_refusal_of_the_field_itself_drops_stream_options(
    status: int, body: dict[str, Any], refuses: bool
) -> None:
    error = UpstreamStatusError("x", status, body=json.dumps(body).encode())
    assert refuses_stream_options(error) is refuses


@pytest.mark.parametrize(
    ("name", "message", "refuses"),
    [
        ("chat_template_kwargs",
         "Unrecognized request argument supplied: chat_template_kwargs", True),
        ("reasoning_effort",
         "Unsupported parameter: 'reasoning_effort' is not supported with this model.", True),
        # the client's own words next to the field as a key of the echoed request
        ("chat_template_kwargs",
         'maximum context length exceeded. Request: {"messages": [{"role": "user", "content":'
         ' "Order a pizza with extra cheese"}], "chat_template_kwargs": {"enable": false}}',
         False),
        ("chat_template_kwargs",
         'context too long: "{\\"content\\": \\"unknown\\", '
         '\\"chat_template_kwargs\\": {}}"', False),
        # a refusal of another field that only begins with the name
        ("reasoning", "Unrecognized request argument supplied: reasoning_effort", False),
    ],
)  # fmt: skip
def test_a_field_is_refused_only_by_a_message_about_it(
    name: str, message: str, refuses: bool
) -> None:
    """An error that quotes the request put the client's words ("extra", "unknown") next
    to the field: the operator's think switch was dropped for the model for good."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    assert refuses_field(UpstreamStatusError("x", 400, body=body.encode()), name) is refuses


@pytest.mark.parametrize(
    ("status", "message", "refuses"),
    [(400, "This model does not support specifying dimensions.", True),  # OpenAI
     (400, 'Model "bge-m3" does not support matryoshka representation, changing output '
           "dimensions will lead to poor results.", True),  # vLLM
     (422, "Extra inputs are not permitted: dimensions", True),
     (400, "dimensions must be at most 3072", False),  # a value out of range: the client's
     (400, "This model does not support batching", False),
     (500, "does not support dimensions", False)],
)  # fmt: skip
def test_a_refusal_of_dimensions_is_told_from_other_errors(
    status: int, message: str, refuses: bool
) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    error = UpstreamStatusError("x", status, body=body.encode())
    assert refuses_dimensions(error) is refuses


def test_a_failure_through_an_environment_proxy_names_the_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CONNECT the proxy refused read as the backend's own 502."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://ops:S3cret@proxy.example:3128")
    pool = UpstreamPool(_settings("https://backend.example/v1"))
    told = pool._describe(httpx.ProxyError("502 Bad Gateway"))
    assert told == (
        "backend request failed: 502 Bad Gateway (connecting through the proxy "
        "http://***@proxy.example:3128 from the environment)"
    )


def test_a_failure_without_words_is_described_by_its_cause() -> None:
    import httpx
    import trio

    from trioproxy.upstream import failure_detail

    handshake = ValueError("certificate verify failed: self-signed")  # as ssl's, in words
    broken = trio.BrokenResourceError()
    broken.__cause__ = handshake
    connect = httpx.ConnectError("")
    connect.__cause__ = broken
    assert failure_detail(connect) == "ConnectError: certificate verify failed: self-signed"
    assert failure_detail(httpx.ConnectError("refused")) == "refused"
    assert failure_detail(httpx.ReadTimeout("")) == "ReadTimeout"
    looped = httpx.ConnectError("")
    looped.__context__ = looped
    assert failure_detail(looped) == "ConnectError"


class _Observer:
    def __init__(self) -> None:
        self.retries: list[str] = []
        self.errors: list[str] = []

    def upstream_retry(self, reason: str) -> None:
        self.retries.append(reason)

    def upstream_error(self, reason: str) -> None:
        self.errors.append(reason)


async def _first_attempt_fails(
    error: type[httpx.TransportError], *, reused: bool, client_retries: bool = False
) -> tuple[int, _Observer]:
    """How many backend calls a request took when the first one failed with ``error``
    (on a connection that had served a response before, or a fresh one)."""
    from trioproxy import netstream

    calls: list[httpx.Request] = []

    def backend(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            netstream.wrote_on_reused.set(reused)  # as the request's write on it would
            raise error("connection reset by peer", request=request)
        return httpx.Response(200, json={"ok": True})

    observer = _Observer()
    pool = UpstreamPool(
        _settings(retry_backoff=0.001),
        transport_factory=lambda: httpx.MockTransport(backend),
        observer=observer,
    )
    try:
        await pool.request("POST", "/chat/completions", body=b"{}", client_retries=client_retries)
    except Exception:
        pass
    finally:
        await pool.aclose()
    return len(calls), observer


@pytest.mark.parametrize("error", [httpx.ReadError, httpx.RemoteProtocolError])
@pytest.mark.parametrize("client_retries", [False, True])
async def test_a_reused_connection_that_breaks_at_once_is_tried_again(
    error: type[httpx.TransportError], client_retries: bool
) -> None:
    """A pooled connection the backend closed while idle: the request crossing its close
    finds an EOF, or a reset (ECONNRESET), before any answer. Retried, also for a client
    that retries by itself, and counted as a retry, not a failure."""
    calls, observer = await _first_attempt_fails(error, reused=True, client_retries=client_retries)
    assert calls == 2
    assert (observer.retries, observer.errors) == (["protocol"], [])


async def test_a_request_not_written_whole_is_tried_again() -> None:
    calls, observer = await _first_attempt_fails(httpx.WriteError, reused=False)
    assert calls == 2 and observer.retries == ["protocol"]


@pytest.mark.parametrize("error", [httpx.ReadError, httpx.RemoteProtocolError])
async def test_a_backend_that_breaks_off_with_the_request_is_not_asked_again(
    error: type[httpx.TransportError], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fresh connection, or on a reused one later than a round trip, the backend had
    the request (it may have generated for seconds, or created a background response):
    asking again would repeat that work."""
    from trioproxy import upstream

    calls, observer = await _first_attempt_fails(error, reused=False)
    assert (calls, observer.retries, observer.errors) == (1, [], ["protocol"])
    monkeypatch.setattr(upstream, "STALE_FAILURE_SECONDS", 0.0)  # the failure took longer
    calls, observer = await _first_attempt_fails(error, reused=True)
    assert (calls, observer.retries, observer.errors) == (1, [], ["protocol"])


@pytest.mark.parametrize("stream", [False, True])
async def test_a_status_http_does_not_define_is_a_bad_answer(stream: bool) -> None:
    """h11 takes 600-999 as a status: passed on, a client got status 999 and the metrics
    recorded it as status 0."""
    from trioproxy.errors import BadUpstreamResponse

    pool = UpstreamPool(
        _settings(),
        transport_factory=lambda: httpx.MockTransport(lambda _: httpx.Response(999, json={})),
    )
    try:
        with pytest.raises(BadUpstreamResponse, match="status 999"):
            await pool.request("POST", "/chat/completions", body=b"{}", stream=stream)
    finally:
        await pool.aclose()


@pytest.mark.parametrize(
    ("status", "message", "wanted"),
    [
        (400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
              "Use 'max_completion_tokens' instead.", True),
        (400, "max_tokens is not supported for o1; use max_completion_tokens", True),
        # a limit too large is not a refusal of the field
        (400, "max_tokens is too large: 100000. This model supports at most 4096 completion "
              "tokens, whereas you provided 100000 (max_completion_tokens).", False),
        (404, "Unsupported parameter: 'max_tokens'. Use 'max_completion_tokens'.", False),
    ],
)  # fmt: skip
def test_a_refusal_of_max_tokens_is_told_from_other_errors(
    status: int, message: str, wanted: bool
) -> None:
    body = json.dumps({"error": {"message": message, "param": "max_tokens"}}).encode()
    assert wants_max_completion_tokens(UpstreamStatusError(message, status, body=body)) is wanted


def test_the_backends_request_id_is_passed_on_beside_ours() -> None:
    """OpenAI's support asks for its ``req_...`` id, which the proxy's own X-Request-ID
    replaced; it reaches the client as X-Upstream-Request-ID, bounded and masked."""
    from trioproxy.errors import BackendSecrets
    from trioproxy.upstream import forwarded_headers

    secrets = BackendSecrets.of("sk-secret-key-1234")
    headers = httpx.Headers(
        {"x-request-id": "req_abc123", "retry-after": "1", "content-type": "application/json"}
    )
    assert forwarded_headers(headers, secrets) == {
        "x-upstream-request-id": "req_abc123",
        "retry-after": "1",
    }
    # masked before it is cut: no first letters of the key at the cut
    echoed = httpx.Headers({"x-request-id": "x" * 199 + "sk-secret-key-1234"})
    assert forwarded_headers(echoed, secrets)["x-upstream-request-id"] == "x" * 199 + "*"


async def test_idle_connections_past_their_keep_alive_are_closed_without_new_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpcore closes an expired connection only when its pool gets the next request: a
    client the traffic no longer reached kept its sockets (CLOSE-WAIT once the backend had
    closed them) until traffic came back to it."""
    monkeypatch.setattr(upstream, "KEEPALIVE_EXPIRY", 0.2)
    closed = trio.Event()

    async def backend(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        while await stream.receive_some(65536):  # until the proxy closes it
            pass
        closed.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, backend, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        pool = UpstreamPool(_settings(f"http://127.0.0.1:{port}/v1"))
        try:
            result = await pool.request("GET", "/models")
            assert result.response.json() == {}
            await nursery.start(pool.sweep_idle)
            with trio.fail_after(3):
                await closed.wait()
        finally:
            await pool.aclose()
        nursery.cancel_scope.cancel()
