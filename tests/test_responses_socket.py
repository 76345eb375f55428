"""The Responses API's WebSocket mode on ``/v1/responses`` (``trioproxy.responses_socket``),
driven by the official openai SDK's ``responses.connect()`` (sync and async) through a real
proxy in front of the demo backend; the translation's pure functions on their own."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from trioproxy.responses_socket import (
    MAX_KEPT,
    ClientEventError,
    Kept,
    KeptResponses,
    client_error_event,
    expanded,
    kept_after,
    reply_error_event,
    stream_messages,
    tagged,
    turn_body,
)
from trioproxy.sse import SSEParser

from .conftest import ServerProcess
from .test_access_addresses import address_of
from .test_metrics_e2e import scrape, total, wait_for

Start = Callable[..., ServerProcess]


def create(text: str, **fields: Any) -> dict[str, Any]:
    return {"type": "response.create", "model": "demo-chat", "input": text, **fields}


def client(proxy: ServerProcess, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=key, max_retries=0)


def ws_url(proxy: ServerProcess) -> str:
    return proxy.url.replace("http://", "ws://") + "/v1/responses"


def until_done(connection: Any) -> list[Any]:
    """The events of one turn, up to its closing event (or an error event)."""
    events = []
    for event in connection:
        events.append(event)
        if event.type in ("response.completed", "response.failed", "error"):
            return events
    raise AssertionError(f"the connection closed mid-turn after {events}")


def close_code(ws: Any) -> int | None:
    """The code the server closed ``ws`` with, the messages before it read and dropped."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=10)
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


def closed_total(proxy: ServerProcess, reason: str) -> float:
    return total(scrape(proxy.url), "trioproxy_websockets_closed_total", reason=reason)


def socket_lines(proxy: ServerProcess) -> list[str]:
    return [
        line
        for line in proxy.log().splitlines()
        if "trioproxy.access" in line and " GET /v1/responses 101 " in line
    ]


@pytest.fixture(scope="module")
def socket_proxy(demo_backend: ServerProcess, start_proxy: Start) -> ServerProcess:
    return start_proxy(demo_backend.url, MAX_RETRIES="0")


def test_several_turns_and_a_continuation_on_one_connection(socket_proxy: ServerProcess) -> None:
    with client(socket_proxy).responses.connect() as connection:
        connection.send(create("hello [[tokens=3]]"))
        first = until_done(connection)
        assert [e.type for e in first[:2]] == ["response.created", "response.in_progress"]
        assert first[-1].type == "response.completed"
        text = "".join(e.delta for e in first if e.type == "response.output_text.delta")
        assert text == first[-1].response.output[0].content[0].text
        previous = first[-1].response.id
        # the demo stores responses and answers an unknown previous_response_id 404: the
        # continuation went to the backend with it
        connection.send(create("and then? [[tokens=2]]", previous_response_id=previous))
        second = until_done(connection)
        assert second[-1].type == "response.completed"
        connection.send(create("again [[tokens=2]]"))
        assert until_done(connection)[-1].type == "response.completed"


def test_the_async_client_is_served_too(socket_proxy: ServerProcess) -> None:
    async def turns() -> list[str]:
        api = openai.AsyncOpenAI(base_url=f"{socket_proxy.url}/v1", api_key="x", max_retries=0)
        closing = []
        async with api.responses.connect() as connection:
            for text in ("one [[tokens=2]]", "two [[tokens=2]]"):
                await connection.send(create(text))  # type: ignore[arg-type]
                async for event in connection:
                    if event.type == "response.completed":
                        closing.append(event.response.status)
                        break
        return closing

    assert asyncio.run(turns()) == ["completed", "completed"]


def test_turns_sent_together_run_in_order(socket_proxy: ServerProcess) -> None:
    """A response.create sent while a turn runs waits for it (the API runs a connection's
    turns one after another); neither is refused."""
    with client(socket_proxy).responses.connect() as connection:
        connection.send(create("first [[tokens=3]]"))
        connection.send(create("second [[tokens=2]]"))
        first, second = until_done(connection), until_done(connection)
    assert first[-1].type == second[-1].type == "response.completed"
    assert first[-1].response.usage.output_tokens == 3
    assert second[-1].response.usage.output_tokens == 2


def test_a_store_false_response_is_continued_from_the_connections_memory(
    socket_proxy: ServerProcess,
) -> None:
    """No backend kept it (the demo answers its id 404): the connection sends its items
    instead of the id, as the API's WebSocket mode promises for store=false."""
    with client(socket_proxy).responses.connect() as connection:
        connection.send(create("one two [[tokens=3]]", store=False))
        first = until_done(connection)[-1]
        assert first.type == "response.completed"
        connection.send(
            create("three [[tokens=2]]", store=False, previous_response_id=first.response.id)
        )
        second = until_done(connection)[-1]
        assert second.type == "response.completed", second
        # its input: the first turn's input and output, then its own
        words = len("one two [[tokens=3]]".split()) + 3 + len("three [[tokens=2]]".split())
        assert second.response.usage.input_tokens == words
        connection.send(
            create("four [[tokens=1]]", store=False, previous_response_id=second.response.id)
        )
        assert until_done(connection)[-1].type == "response.completed"
        # an older one is still kept (a fork of it)
        connection.send(
            create("five [[tokens=1]]", store=False, previous_response_id=first.response.id)
        )
        assert until_done(connection)[-1].type == "response.completed"
    with client(socket_proxy).responses.connect() as connection:
        # another connection's is the backend's to know (404)
        connection.send(create("six", store=False, previous_response_id=first.response.id))
        (error,) = until_done(connection)
        assert error.type == "error" and error.status == 404


def test_store_false_chains_on_two_lanes_are_both_continued(socket_proxy: ServerProcess) -> None:
    """The API keeps a connection's recent responses, not only its last: two
    conversations on one connection (lanes), each store=false, continue in turn."""
    with connect(ws_url(socket_proxy)) as ws:

        def turn(text: str, lane: str, **fields: Any) -> dict[str, Any]:
            ws.send(json.dumps(create(text, store=False, stream_id=lane, **fields)))
            while (event := json.loads(ws.recv(timeout=10)))["type"] != "response.completed":
                assert event["type"] != "error", event
            return event["response"]  # type: ignore[no-any-return]

        a, b = turn("a one [[tokens=2]]", "a"), turn("b one two [[tokens=3]]", "b")
        a2 = turn("a two [[tokens=1]]", "a", previous_response_id=a["id"])
        assert a2["usage"]["input_tokens"] == 3 + 2 + 3
        b2 = turn("b three [[tokens=1]]", "b", previous_response_id=b["id"])
        assert b2["usage"]["input_tokens"] == 4 + 3 + 3
        # a fork: the same parent continued again, on another lane
        assert turn("fork [[tokens=1]]", "c", previous_response_id=a["id"])["status"] == "completed"


@pytest.fixture(scope="module")
def impatient_proxy(demo_backend: ServerProcess, start_proxy: Start) -> ServerProcess:
    """A stalled stream ends after 1 s (STREAM_IDLE_TIMEOUT); messages of 8 KiB at most."""
    return start_proxy(demo_backend.url, STREAM_IDLE_TIMEOUT="1", MAX_REQUEST_BYTES="8192")


def served_behind_a_stall(proxy: ServerProcess, texts: list[str]) -> tuple[int, int]:
    """How many of ``texts`` (turns sent at once behind one whose stream stalls until the
    proxy's idle deadline ends it) are refused (``too_many_queued``) and how many served."""
    with connect(ws_url(proxy)) as ws:
        ws.send(json.dumps(create("stall [[stall_after=1]]")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.output_text.delta":
            pass
        for text in texts:
            ws.send(json.dumps(create(text)))
        refused = completed = 0
        while refused + completed < len(texts):
            event = json.loads(ws.recv(timeout=10))
            if event["type"] == "response.completed":
                completed += 1
            elif event["type"] == "error" and event["error"]["code"] == "too_many_queued":
                assert event["status"] == 429
                refused += 1
    return refused, completed


def test_at_most_four_turns_wait(impatient_proxy: ServerProcess) -> None:
    texts = [f"turn {n} [[tokens=1]]" for n in range(5)]
    assert served_behind_a_stall(impatient_proxy, texts) == (1, 4)


def test_waiting_turns_hold_max_request_bytes_at_most(impatient_proxy: ServerProcess) -> None:
    texts = [f"turn {n} [[tokens=1]] " + "x" * 3000 for n in range(3)]  # 9 KiB together
    assert served_behind_a_stall(impatient_proxy, texts) == (1, 2)


def test_a_served_turn_no_longer_counts_as_waiting(impatient_proxy: ServerProcess) -> None:
    """Turns served one after another take MAX_REQUEST_BYTES several times over on one
    connection: a message waiting later still has its room."""
    with connect(ws_url(impatient_proxy)) as ws:
        for n in range(4):  # 12 KB together, one at a time
            ws.send(json.dumps(create(f"turn {n} [[tokens=1]] " + "x" * 3000)))
            while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
                pass
        ws.send(json.dumps(create("stall [[stall_after=1]]")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.output_text.delta":
            pass
        ws.send(json.dumps(create("behind it [[tokens=1]] " + "x" * 3000)))
        while (event := json.loads(ws.recv(timeout=10)))["type"] != "response.completed":
            assert event.get("error", {}).get("code") != "too_many_queued", event


def test_refusals_answered_free_their_room(impatient_proxy: ServerProcess) -> None:
    """A client that reads its refusals may be refused any number of times: only those
    waiting for their error event count against MAX_REQUEST_BYTES (then it is a flood)."""
    with connect(ws_url(impatient_proxy)) as ws:
        ws.send(json.dumps(create("stall [[stall_after=1]]")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.output_text.delta":
            pass
        for n in range(4):  # the turns that may wait
            ws.send(json.dumps(create(f"turn {n} [[tokens=1]]")))
        for n in range(10):  # 30 KB refused in all, one at a time
            ws.send(json.dumps(create(f"refused {n} " + "x" * 3000)))
            event = json.loads(ws.recv(timeout=10))
            assert event["error"]["code"] == "too_many_queued", event
        completed = 0
        while completed < 4:  # the waiting turns, served: no 1008 closed the socket
            completed += json.loads(ws.recv(timeout=10))["type"] == "response.completed"


def test_a_backend_refusal_is_an_error_event_and_the_connection_goes_on(
    socket_proxy: ServerProcess,
) -> None:
    with client(socket_proxy).responses.connect() as connection:
        connection.send(create("hi", previous_response_id="resp_nobody_knows"))
        (error,) = until_done(connection)
        assert error.type == "error" and error.status == 404
        assert error.error.param == "previous_response_id"
        assert error.error.type == "invalid_request_error"
        connection.send(create("still there? [[tokens=1]]"))
        assert until_done(connection)[-1].type == "response.completed"


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ('["response.create"]', None, "type"),
        ('{"type": "session.update"}', "unknown_event_type", "type"),
        ('{"model": "demo-chat"}', "unknown_event_type", "type"),
        (
            '{"type": "response.create", "model": "demo-chat", "input": "x", "background": true}',
            "unsupported_parameter",
            "background",
        ),
    ],
)
def test_a_message_that_is_no_turn_gets_an_error_event(
    socket_proxy: ServerProcess, message: str, code: str | None, param: str | None
) -> None:
    with connect(ws_url(socket_proxy)) as ws:
        ws.send(message)
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["status"] == 400
        assert event["error"]["type"] == "invalid_request_error"
        assert (event["error"]["code"], event["error"]["param"]) == (code, param)
        ws.send(json.dumps(create("fine [[tokens=1]]")))  # the connection is still served
        while (event := json.loads(ws.recv(timeout=10)))["type"] != "response.completed":
            assert event["type"] != "error", event


def test_a_client_error_answered_by_the_route_is_an_error_event(
    socket_proxy: ServerProcess,
) -> None:
    """The POST route's own checks (a missing model) answer in the socket's terms."""
    with connect(ws_url(socket_proxy)) as ws:
        ws.send('{"type": "response.create", "input": "no model"}')
        event = json.loads(ws.recv(timeout=10))
    assert event["type"] == "error" and event["status"] == 400
    assert event["error"]["param"] == "model"


def test_other_paths_still_refuse_a_handshake(socket_proxy: ServerProcess) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(socket_proxy.url.replace("http://", "ws://") + "/v1/chat/completions")
    assert refused.value.response.status_code == 400


def test_the_key_is_required_as_for_the_post_route(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    guarded = start_proxy(demo_backend.url, PROXY_API_KEYS="team-a:sk-right")
    with pytest.raises(InvalidStatus) as refused:
        client(guarded, "sk-wrong").responses.connect().__enter__()
    response = refused.value.response
    assert response.status_code == 401
    assert json.loads(response.body)["error"]["code"] == "invalid_api_key"
    with pytest.raises(InvalidStatus):
        connect(ws_url(guarded))  # no key at all
    with client(guarded, "sk-right").responses.connect() as connection:
        connection.send(create("hi [[tokens=1]]"))
        assert until_done(connection)[-1].type == "response.completed"
    samples = scrape(guarded.url)
    # each refused handshake counted as a 401 of the route; the turn as a streamed POST
    assert total(samples, "http_requests_total", endpoint="v1_responses", status="401") == 2
    assert total(samples, "http_requests_total", endpoint="v1_responses", method="POST") == 1
    assert total(samples, "trioproxy_client_requests_total", client="team-a") == 1


def test_messages_are_never_compressed(socket_proxy: ServerProcess) -> None:
    """hypercorn_patches 17: an inflated message could hold MAX_REQUEST_BYTES for a
    thousandth of it sent. A client offering permessage-deflate (websockets does by
    default, browsers too) gets a socket without it, and is served."""
    with connect(ws_url(socket_proxy), compression="deflate") as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        ws.send(json.dumps(create("plain [[tokens=1]]")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
            pass


def test_a_web_page_needs_its_origin_in_cors_origins(
    socket_proxy: ServerProcess, demo_backend: ServerProcess, start_proxy: Start
) -> None:
    """A browser lets any page open a WebSocket to the proxy on localhost and read the
    answers (CORS does not apply): a handshake naming an origin not allowed is a 403."""
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(socket_proxy), origin="https://elsewhere.example")  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["error"]["code"] == "origin_not_allowed"
    allowing = start_proxy(demo_backend.url, CORS_ORIGINS="https://app.example")
    with connect(ws_url(allowing), origin="https://app.example") as ws:  # type: ignore[arg-type]
        ws.send(json.dumps(create("hi [[tokens=1]]")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
            pass


def test_a_message_over_max_request_bytes_closes_with_1009(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    small = start_proxy(demo_backend.url, MAX_REQUEST_BYTES="4096")
    with connect(ws_url(small)) as ws:
        ws.send(json.dumps(create("x" * 5000)))
        assert close_code(ws) == 1009
    # counted apart from a client that left (hypercorn_patches 18)
    wait_for(lambda: closed_total(small, "too_big") == 1)
    assert closed_total(small, "client") == 0


def test_a_socket_holds_its_connection_under_max_connections(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    capped = start_proxy(demo_backend.url, MAX_CONNECTIONS="1")
    opened: list[Any] = []

    def open_one() -> bool:  # once the start's health check has let its connection go
        try:
            opened.append(connect(ws_url(capped)))
        except (InvalidStatus, ConnectionClosed):
            return False
        except AssertionError:
            # websockets' sync client, refused by the cap's 503 and close while it still
            # sends its handshake, can trip its own internal assertion (send_context's
            # close_deadline): a refused attempt all the same
            return False
        return True

    wait_for(open_one)
    with opened.pop() as ws:
        assert httpx.get(f"{capped.url}/health", timeout=5).status_code == 503  # the cap's
        ws.send(json.dumps(create("still served [[tokens=1]]")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
            pass
    wait_for(open_one)  # its place is free again
    opened.pop().close()


def test_each_turn_counts_as_a_streamed_post(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    counted = start_proxy(demo_backend.url)
    with client(counted).responses.connect() as connection:
        for text in ("one [[tokens=3]]", "two [[tokens=4]]"):
            connection.send(create(text))
            assert until_done(connection)[-1].type == "response.completed"
    samples = scrape(counted.url)
    post = {"endpoint": "v1_responses", "method": "POST"}
    assert total(samples, "http_requests_total", status="200", **post) == 2
    assert total(samples, "trioproxy_streams_total", outcome="completed") == 2
    assert total(samples, "trioproxy_time_to_first_token_seconds_count") == 2
    assert total(samples, "trioproxy_tokens_total", type="output") == 7


def test_a_client_closing_mid_turn_cancels_it_and_its_backend_request(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    counted = start_proxy(demo_backend.url)
    event = create("long [[tokens=200]] [[delay=0.05]]")
    backend_body = turn_body(json.dumps(event))
    with connect(ws_url(counted)) as ws:
        ws.send(json.dumps(event))
        while json.loads(ws.recv(timeout=10))["type"] != "response.output_text.delta":
            pass
    base = demo_backend.url.removesuffix("/v1")

    def backend_saw_it_leave() -> bool:
        entries = httpx.get(f"{base}/_demo/events", timeout=5).json()["events"]
        digest = hashlib.sha256(backend_body).hexdigest()[:16]
        return any(
            e.get("body_hash") == digest and e.get("outcome") == "disconnected" for e in entries
        )

    wait_for(backend_saw_it_leave)
    wait_for(
        lambda: total(scrape(counted.url), "trioproxy_streams_total", outcome="cancelled") == 1
    )
    samples = scrape(counted.url)
    assert total(samples, "http_requests_total", endpoint="v1_responses", status="499") == 1


def test_turns_still_waiting_when_the_client_leaves_are_not_sent(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    counted = start_proxy(demo_backend.url)
    running, waiting = create("long [[tokens=200]] [[delay=0.05]]"), create("never sent")
    with connect(ws_url(counted)) as ws:
        ws.send(json.dumps(running))
        ws.send(json.dumps(waiting))
        while json.loads(ws.recv(timeout=10))["type"] != "response.output_text.delta":
            pass
    wait_for(
        lambda: total(scrape(counted.url), "trioproxy_streams_total", outcome="cancelled") == 1
    )
    counted.stop()  # whatever the proxy still had to do is done
    digest = hashlib.sha256(turn_body(json.dumps(waiting))).hexdigest()[:16]
    base = demo_backend.url.removesuffix("/v1")
    entries = httpx.get(f"{base}/_demo/events", timeout=5).json()["events"]
    assert not [e for e in entries if e.get("body_hash") == digest]


def test_an_idle_connection_closes_after_websocket_idle_timeout(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    quick = start_proxy(demo_backend.url, WEBSOCKET_IDLE_TIMEOUT="0.3")
    with connect(ws_url(quick)) as ws:
        assert close_code(ws) == 1000
    wait_for(lambda: closed_total(quick, "idle") == 1)
    assert total(scrape(quick.url), "trioproxy_websockets_open") == 0


def test_shutdown_closes_an_idle_connection_with_going_away(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    stopping = start_proxy(demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO")
    with connect(ws_url(stopping)) as ws:
        ws.send(json.dumps(create("before [[tokens=1]]")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
            pass
        stopping.process.send_signal(signal.SIGTERM)
        assert close_code(ws) == 1001
    assert stopping.process.wait(timeout=10) == 0
    (line,) = socket_lines(stopping)  # its access line says why it closed
    assert line.endswith("(websocket: 1 turns, closed: shutdown)"), line


def test_shutdown_ends_a_turn_in_progress_in_band(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    """As a stream cut by the shutdown: its error event, then the close (1001)."""
    stopping = start_proxy(demo_backend.url, GRACEFUL_TIMEOUT="1")
    with connect(ws_url(stopping)) as ws:
        ws.send(json.dumps(create("long [[tokens=500]] [[delay=0.05]]")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.output_text.delta":
            pass
        stopping.process.send_signal(signal.SIGTERM)
        events = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(json.loads(ws.recv(timeout=10)))
    assert events[-1]["type"] == "error", events[-3:]
    assert "shutting down" in events[-1]["error"]["message"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


def test_shutdown_answers_the_turns_still_waiting(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    """Each with an error event on its lane before the close: the openai SDK's session
    holds a lane busy (no other create) until its create is answered."""
    stopping = start_proxy(demo_backend.url, GRACEFUL_TIMEOUT="1")
    with connect(ws_url(stopping)) as ws:
        ws.send(json.dumps(create("long [[tokens=500]] [[delay=0.05]]", stream_id="a")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.output_text.delta":
            pass
        ws.send(json.dumps(create("waiting [[tokens=1]]", stream_id="b")))
        ws.send(json.dumps(create("waiting too [[tokens=1]]")))
        stopping.process.send_signal(signal.SIGTERM)
        events = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(json.loads(ws.recv(timeout=10)))
    # the running turn's in-band end (a stream's: no status), then each waiting one's
    errors = [(e.get("stream_id"), e.get("status")) for e in events if e["type"] == "error"]
    assert errors == [("a", None), ("b", 503), (None, 503)], events[-3:]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_a_server_without_http_answers_to_handshakes_gets_a_close() -> None:
    """A server without ASGI's websocket.http.response extension: the refusal is a close."""
    from trioproxy.app import create_app
    from trioproxy.config import Settings
    from trioproxy.responses_socket import ResponsesSocket

    app = create_app(Settings(upstream_url="http://127.0.0.1:1/v1", proxy_api_keys=("k",)))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/v1/responses", "headers": []}
    await ResponsesSocket(app, scope, receive, send).serve()  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": None}]


# the pure translation


def test_turn_body_is_the_posts_body() -> None:
    message = (
        '{"type":"response.create","model":"m","input":"hi","stream_id":"lane","stream":false}'
    )
    assert json.loads(turn_body(message)) == {"model": "m", "input": "hi", "stream": True}
    with pytest.raises(ClientEventError, match="steer"):
        turn_body('{"type": "response.steer", "input": "x", "previous_response_id": "r"}')
    with pytest.raises(ClientEventError):
        turn_body(b"\xff")


def test_a_continuation_of_the_kept_response_carries_its_items() -> None:
    request = {"model": "m", "input": "hi", "store": False, "stream": True}
    closing = json.dumps(
        {"type": "response.completed", "response": {"id": "r1", "output": [{"type": "message"}]}}
    )
    kept = kept_after(request, closing, 1000)
    user = {"type": "message", "role": "user", "content": "hi"}
    assert kept is not None and kept.response_id == "r1"
    assert json.loads(kept.items) == [user, {"type": "message"}]
    later = {
        "model": "m",
        "input": [{"type": "function_call_output"}],
        "previous_response_id": "r1",
    }
    assert expanded(later, kept) == {
        "model": "m",
        "input": [user, {"type": "message"}, {"type": "function_call_output"}],
    }
    other = {**later, "previous_response_id": "r0"}
    assert expanded(other, kept) is other
    assert kept_after({**request, "store": True}, closing, 1000) is None  # the backend has it
    assert kept_after(request, closing, len(kept.items) - 1) is None  # over the limit
    failed = json.dumps({"type": "response.failed", "response": {"id": "r1", "output": []}})
    assert kept_after(request, failed, 1000) is None


def test_stream_messages_are_the_events_data() -> None:
    parser = SSEParser()
    chunk = (
        b'event: response.created\ndata: {"type":"response.created"}\n\n'
        b": keep-alive\n\n"
        b'event: response.completed\ndata: {"type":"response.completed"}\n\n'
        b"data: [DONE]\n\n"
    )
    assert stream_messages(parser, chunk) == [
        '{"type":"response.created"}',
        '{"type":"response.completed"}',
    ]


def test_reply_error_event_keeps_the_error_object() -> None:
    body = b'{"error":{"message":"nope","type":"invalid_request_error","param":"x","code":"c"}}'
    event = json.loads(reply_error_event(404, body))
    assert event == {"type": "error", "status": 404, "error": json.loads(body)["error"]}
    plain = json.loads(reply_error_event(502, b"Bad Gateway"))
    assert plain["error"]["message"] == "Bad Gateway" and plain["error"]["type"] == "server_error"


def test_lanes_get_their_events_by_stream_id(socket_proxy: ServerProcess) -> None:
    """The openai SDK's ResponsesWebSocketSession routes each event to its lane by the
    event's ``stream_id`` (the API echoes the create's on every event of its response):
    a named lane whose events came untagged never got its response."""
    from openai.lib.responses_websocket import (
        ResponsesWebSocketLimits,
        ResponsesWebSocketSession,
    )

    limits = ResponsesWebSocketLimits(
        max_lanes=4,
        max_events_per_lane=256,
        max_events=512,
        max_bytes_per_lane=1 << 20,
        max_bytes=1 << 21,
    )
    with (
        client(socket_proxy).responses.connect() as connection,
        ResponsesWebSocketSession(connection, limits=limits) as session,
    ):
        one, two = session.lane("one"), session.lane("two.b")
        one.send(create("first [[tokens=3]]"))  # type: ignore[arg-type]
        two.send(create("second [[tokens=2]]"))  # type: ignore[arg-type]
        assert two.get_final_response(timeout=10).usage.output_tokens == 2  # type: ignore[union-attr]
        assert one.get_final_response(timeout=10).usage.output_tokens == 3  # type: ignore[union-attr]
        # an answer that is an error reaches its lane too
        two.send(create("hi", previous_response_id="resp_nobody_knows"))  # type: ignore[arg-type]
        with pytest.raises(Exception, match="error") as failed:
            two.get_final_response(timeout=10)
        assert getattr(failed.value, "event", None) is not None
        assert failed.value.event.stream_id == "two.b"  # type: ignore[attr-defined]
        # the default lane's events carry none
        session.default.send(create("plain [[tokens=1]]"))  # type: ignore[arg-type]
        assert session.default.get_final_response(timeout=10).status == "completed"


def test_a_refused_message_on_a_lane_tells_that_lane(socket_proxy: ServerProcess) -> None:
    with connect(ws_url(socket_proxy)) as ws:
        ws.send(json.dumps(create("x", background=True, stream_id="lane-1")))
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["stream_id"] == "lane-1"
        ws.send('{"type": "response.create", "stream_id": "lane-2", "input": "no model"}')
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["stream_id"] == "lane-2"


def test_events_on_a_lane_carry_its_stream_id() -> None:
    assert json.loads(tagged('{"type":"a","n":1}', "l.1")) == {
        "type": "a",
        "n": 1,
        "stream_id": "l.1",
    }
    assert json.loads(tagged("{ }\n", "l")) == {"stream_id": "l"}
    assert tagged('{"type":"a"}', None) == '{"type":"a"}'
    assert tagged("not json", "l") == "not json"
    for lane in ("", "a b", "x" * 257, 7, '"}'):
        message = json.dumps(create("x", stream_id=lane))
        with pytest.raises(ClientEventError) as refused:
            turn_body(message)
        assert refused.value.code == "invalid_stream_id" and refused.value.stream_id is None
    with pytest.raises(ClientEventError) as refused:
        turn_body(json.dumps({"type": "response.steer", "stream_id": "s"}))
    assert json.loads(client_error_event(refused.value))["stream_id"] == "s"


def test_kept_output_items_are_sent_back_as_a_store_false_client_sends_them() -> None:
    """Without the ids the backend never stored (OpenAI answers an item id it did not keep
    404, "Items are not persisted when store is set to false"), and without a reasoning
    item that has no encrypted_content (nothing of it can be replayed); an incomplete
    response can be continued too."""
    request = {"model": "m", "input": [{"type": "message", "role": "user", "content": "q"}]}
    request["store"] = False
    output = [
        {"id": "rs_1", "type": "reasoning", "summary": []},
        {"id": "rs_2", "type": "reasoning", "summary": [], "encrypted_content": "e"},
        {"id": "fc_1", "type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"id": "msg_1", "type": "message", "role": "assistant", "content": []},
    ]
    for kind in ("response.completed", "response.incomplete"):
        closing = json.dumps({"type": kind, "response": {"id": "r1", "output": output}})
        kept = kept_after(request, closing, 10_000)
        assert kept is not None and kept.response_id == "r1"
        assert json.loads(kept.items) == [
            request["input"][0],  # type: ignore[index]
            {"type": "reasoning", "summary": [], "encrypted_content": "e"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "message", "role": "assistant", "content": []},
        ]


@pytest.mark.parametrize("closing", ["42", '"text"', "[1]", '{"type": "response.completed"}'])
def test_a_closing_event_that_is_no_response_keeps_nothing(closing: str) -> None:
    """The last event is the backend's: whatever it is, the connection goes on."""
    assert kept_after({"store": False, "input": "x"}, closing, 1000) is None


def test_behind_a_trusted_proxy_each_turn_logs_the_forwarded_client(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    """A turn's access line names the client its handshake came from, as a POST's does."""
    trusting = start_proxy(
        demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO", FORWARDED_ALLOW_IPS="127.0.0.1"
    )
    with connect(ws_url(trusting), additional_headers={"X-Forwarded-For": "203.0.113.7"}) as ws:
        ws.send(json.dumps(create("hi [[tokens=1]]")))
        while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
            pass

    def turn_lines() -> list[str]:
        log = trusting.log().splitlines()
        return [
            line for line in log if "trioproxy.access" in line and " POST /v1/responses " in line
        ]

    wait_for(lambda: bool(turn_lines()))
    assert [address_of(line) for line in turn_lines()] == ["203.0.113.7"]


def test_kept_responses_are_bounded_by_bytes_and_count() -> None:
    kept = KeptResponses(100)
    for n in range(3):
        kept.add(Kept(f"r{n}", b"x" * 40))
    assert kept.get("r0") is None and kept.get("r2") is not None and kept.bytes == 80
    kept.add(Kept("r2", b"y" * 10))  # the same id again replaces it
    assert kept.bytes == 50 and kept.get("r2") == Kept("r2", b"y" * 10)
    assert kept.get(None) is None and kept.get(["r1"]) is None
    many = KeptResponses(10**6)
    for n in range(MAX_KEPT + 5):
        many.add(Kept(f"r{n}", b"[]"))
    assert many.get("r4") is None and many.get("r5") is not None
    assert many.bytes == 2 * MAX_KEPT


# operators: the sockets in the metrics and the access log


def test_open_sockets_are_a_gauge_and_each_close_is_counted_and_logged(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    watched = start_proxy(
        demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO", PROXY_API_KEYS="team-a:sk-a"
    )
    with client(watched, "sk-a").responses.connect() as connection:
        samples = scrape(watched.url)
        assert total(samples, "trioproxy_websockets_open") == 1
        assert total(samples, "trioproxy_websockets_closed_total") == 0
        for text in ("one [[tokens=2]]", "two [[tokens=1]]"):
            connection.send(create(text))
            assert until_done(connection)[-1].type == "response.completed"
    wait_for(lambda: closed_total(watched, "client") == 1)
    assert total(scrape(watched.url), "trioproxy_websockets_open") == 0
    wait_for(lambda: bool(socket_lines(watched)))
    (line,) = socket_lines(watched)
    assert line.endswith("(websocket: 2 turns, closed: client) client=team-a"), line
    sent = int(line.split(" B (")[0].rsplit(" ", 1)[1])
    assert sent > 1000  # the turns' events


# generate: false (a warm-up)


def test_a_warm_up_is_answered_by_the_proxy_and_continued(
    demo_backend: ServerProcess, start_proxy: Start
) -> None:
    """``generate: false`` prepares state without output (WebSocket mode only: a
    backend's POST does not take it): answered without the backend, an empty completed
    response whose continuation carries the warm-up's items."""
    counted = start_proxy(demo_backend.url)
    with client(counted).responses.connect() as connection:
        connection.send(create("you are terse", store=False, generate=False))
        events = until_done(connection)
        assert [e.type for e in events] == ["response.created", "response.completed"]
        warm = events[-1].response
        assert warm.status == "completed" and warm.output == [] and warm.model == "demo-chat"
        assert warm.id.startswith("resp_")
        connection.send(
            create("hello there [[tokens=2]]", store=False, previous_response_id=warm.id)
        )
        done = until_done(connection)[-1]
        assert done.type == "response.completed", done
        assert done.response.usage.input_tokens == 3 + 3  # the warm-up's words, then its own
    samples = scrape(counted.url)
    assert total(samples, "http_requests_total", endpoint="v1_responses") == 1  # no warm-up


def test_a_warm_up_of_a_stored_response_continues_it(socket_proxy: ServerProcess) -> None:
    """A warm-up continuing a response the backend keeps: its continuation names that
    one to the backend, with the warm-up's items before its own input."""
    with client(socket_proxy).responses.connect() as connection:
        connection.send(create("one two [[tokens=3]]"))
        first = until_done(connection)[-1].response
        connection.send(
            create("tools ready", generate=False, previous_response_id=first.id, stream_id="w")
        )
        warm = until_done(connection)[-1]
        assert warm.stream_id == "w" and warm.response.previous_response_id == first.id
        connection.send(create("go [[tokens=1]]", previous_response_id=warm.response.id))
        done = until_done(connection)[-1]
        assert done.type == "response.completed", done
        # the warm-up's words and its own; the first turn's id went to the demo, which
        # knew it (an unknown one is a 404)
        assert done.response.usage.input_tokens == 2 + 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [({}, "field 'model' is required"), ({"model": 7}, "field 'model' must be a string")],
)
def test_a_warm_up_names_its_model_as_a_turn_must(
    socket_proxy: ServerProcess, fields: dict[str, Any], message: str
) -> None:
    """The response a warm-up is answered with names its model: one without a model (or
    with one that is no string) is refused as the POST route refuses a turn's, on its
    lane, not answered with a response whose model is null."""
    with connect(ws_url(socket_proxy)) as ws:
        warm_up = {"type": "response.create", "input": "x", "generate": False, **fields}
        ws.send(json.dumps({**warm_up, "stream_id": "w"}))
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error", event
        assert event["status"] == 400 and event["stream_id"] == "w"
        assert event["error"]["message"] == message and event["error"]["param"] == "model"
        ws.send(json.dumps(create("still served [[tokens=1]]")))  # the connection goes on
        while (event := json.loads(ws.recv(timeout=10)))["type"] != "response.completed":
            assert event["type"] != "error", event


def test_generate_true_is_not_sent_to_the_backend() -> None:
    from trioproxy.responses_socket import generates

    request = {"model": "m", "generate": True}
    assert generates(request) and request == {"model": "m"}
    assert generates({"model": "m"})
    assert not generates({"generate": False})
    with pytest.raises(ClientEventError, match="generate"):
        generates({"generate": "no"})


# a client that sends without reading its answers

REFUSALS_WAITING = 16  # responses_socket.MAX_REFUSALS_WAITING


async def test_the_reader_never_waits_on_a_write_and_a_flood_closes_with_1008() -> None:
    """hypercorn reads ahead into its queue (10 messages) while the app does not take
    them: a reader that waited on a write (a refusal's error event to a client that does
    not read) let a connection hold a dozen messages of MAX_REQUEST_BYTES. It takes every
    message as it comes, and past what may wait (turns, then refusals) closes (1008)."""
    import trio

    from trioproxy.app import create_app
    from trioproxy.config import Settings
    from trioproxy.responses_socket import MAX_QUEUED_TURNS, ResponsesSocket

    app = create_app(Settings(upstream_url="http://127.0.0.1:1/v1"))
    messages = ["{not json"] + [json.dumps(create(f"m{n}")) for n in range(60)]
    taken = trio.Event()  # every message taken from the server
    reading = trio.Event()  # the client reads again
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if sent == []:
            return {"type": "websocket.connect"}
        if messages:
            return {"type": "websocket.receive", "text": messages.pop(0), "bytes": None}
        taken.set()
        await reading.wait()
        await trio.sleep_forever()  # the client reads but sends nothing more

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            await reading.wait()  # the client does not read
        sent.append(message)

    async def release() -> None:
        await taken.wait()
        reading.set()

    scope = {"type": "websocket", "path": "/v1/responses", "headers": []}
    with trio.fail_after(10):  # the old reader waited on its write for ever
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release)
            await ResponsesSocket(app, scope, receive, send).serve()  # type: ignore[arg-type]
    # refusals whose writes were already waiting for the client may land after the close
    # in this fake (its send appends when the write is done)
    closes = [m for m in sent if m["type"] == "websocket.close"]
    assert closes == [
        {"type": "websocket.close", "code": 1008, "reason": "messages sent faster than answered"}
    ]
    refused = [m for m in sent if "too_many_queued" in str(m.get("text"))]
    assert len(refused) <= REFUSALS_WAITING + 1
    assert len(sent) < 2 + MAX_QUEUED_TURNS + REFUSALS_WAITING + 4
