"""The built-in demo backend over real sockets: the official openai SDK (strict validation) for the
API surface, raw httpx for the test-hook directives and the event log, plus a subprocess run.

Streams use the *sync* SDK client in a worker thread: the async SDK leaves an inner async
generator unfinished after ``[DONE]``, which trio reports as a ResourceWarning (an error here).
"""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import openai
import pytest
import trio

from trioproxy.demo import DemoSettings, create_demo_app, serve_demo
from trioproxy.demo import responses as demo_responses
from trioproxy.demo import script as demo_script

FAST = DemoSettings(token_delay=0.001, first_token_delay=0.0, default_tokens=24)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "hourly": {"type": "boolean"},
                "extra": {"type": "object"},
            },
            "required": ["city"],
        },
    },
}


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def demo_url(nursery: trio.Nursery) -> str:
    return await nursery.start(serve_demo, "127.0.0.1", 0, FAST)


@pytest.fixture
async def sdk(demo_url: str) -> Any:
    async with openai.AsyncOpenAI(
        base_url=demo_url, api_key="x", max_retries=0, _strict_response_validation=True
    ) as client:
        yield client


@pytest.fixture
async def http(demo_url: str) -> Any:
    async with httpx.AsyncClient(base_url=demo_url.removesuffix("/v1"), timeout=5) as client:
        yield client


def _sync_stream(
    url: str, create: Callable[[openai.OpenAI], Any], strict: bool = True
) -> list[Any]:
    with openai.OpenAI(
        base_url=url, api_key="x", max_retries=0, _strict_response_validation=strict
    ) as client:
        with create(client) as stream:
            return list(stream)


async def stream_chat(url: str, **kwargs: Any) -> list[Any]:
    create = partial(_chat_create, kwargs=kwargs)
    return await trio.to_thread.run_sync(_sync_stream, url, create)


def _chat_create(client: openai.OpenAI, kwargs: dict[str, Any]) -> Any:
    return client.chat.completions.create(stream=True, **kwargs)


async def events(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    return (await http.get("/_demo/events")).json()["events"]


async def event_for(http: httpx.AsyncClient, request_id: str) -> dict[str, Any]:
    return next(e for e in await events(http) if e["request_id"] == request_id)


# ---- pure script ---------------------------------------------------------------------------


def test_directives_parse_and_reject() -> None:
    d = demo_script.parse_directives("hi [[tokens=3]] [[delay=0.5]] [[close_connection]] there")
    assert (d.tokens, d.delay, d.close_connection, d.fail_status) == (3, 0.5, True, 503)
    assert demo_script.parse_directives("plain text") == demo_script.Directives()
    for bad in ("[[nope=1]]", "[[tokens=x]]", "[[status=200]]", "[[delay=-1]]", "[[delay=nan]]"):
        with pytest.raises(demo_script.DirectiveError):
            demo_script.parse_directives(bad)


def test_stored_responses_are_bounded_oldest_first() -> None:
    store = demo_responses.ResponseStore(limit=3)
    for n in range(5):
        store.add({"id": f"resp_{n}"}, {"input": "hi"})
    assert len(store) == 3
    assert store.get("resp_1") is None and store.get("resp_4") is not None


def test_input_items_are_paged_as_openai_pages_them() -> None:
    items = demo_responses.input_items(["a", *({"role": "user", "content": w} for w in "bcd")], "r")
    assert len(items) == 3  # a bare string in a list is no message
    first = demo_responses.item_page(items, {"order": ["asc"], "limit": ["2"]})
    assert [i["content"][0]["text"] for i in first["data"]] == ["b", "c"] and first["has_more"]
    rest = demo_responses.item_page(items, {"order": ["asc"], "after": [first["last_id"]]})
    assert [i["content"][0]["text"] for i in rest["data"]] == ["d"] and not rest["has_more"]
    newest = demo_responses.item_page(items, {})
    assert newest["first_id"] == items[-1]["id"]


def test_input_items_list_function_calls_as_their_own_items() -> None:
    """A tool loop's input lists its function call and the call's output as those items
    (they were listed as empty user messages)."""
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "42"}
    items = demo_responses.input_items([{"role": "user", "content": "hi"}, call, output], "r")
    assert [i["type"] for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1]["call_id"] == items[2]["call_id"] == "c1" and items[2]["output"] == "42"
    assert all(i["id"] and i["status"] == "completed" for i in items)


def test_script_is_deterministic() -> None:
    schema = WEATHER_TOOL["function"]["parameters"]
    args = demo_script.example_object(schema)
    assert args == {"city": "demo", "unit": "celsius", "days": 1, "hourly": True, "extra": None}
    text = json.dumps(args)
    fragments = demo_script.split_arguments(text)
    assert len(fragments) >= 3 and "".join(fragments) == text
    assert demo_script.passage_tokens(100)[:24] == demo_script.passage_tokens(24)
    vec = demo_script.embedding("hello", 8)
    assert vec == demo_script.embedding("hello", 8) != demo_script.embedding("hullo", 8)
    assert math.isclose(math.fsum(v * v for v in vec), 1.0, rel_tol=1e-6)


# ---- API surface through the openai SDK (strict) -------------------------------------------


async def test_models(sdk: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in sdk.models.list()]
    assert ids == ["demo-chat", "demo-reasoner", "demo-embed"]
    model = await sdk.models.retrieve("demo-embed")
    assert (model.owned_by, model.object) == ("trioproxy-demo", "model")
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.models.retrieve("gpt-nope")
    assert info.value.code == "model_not_found"


async def test_chat_stream_matches_non_stream(sdk: openai.AsyncOpenAI, demo_url: str) -> None:
    messages = user("Say hello, please")
    whole = await sdk.chat.completions.create(model="demo-chat", messages=messages)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (3, 24)

    chunks = await stream_chat(
        demo_url,
        model="demo-chat",
        messages=messages,
        stream_options={"include_usage": True},
    )
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    first, finish, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == choice.message.content
    assert len(chunks) == 24 + 3  # role, 24 tokens, finish, usage

    short = await sdk.chat.completions.create(
        model="demo-chat", messages=messages, max_completion_tokens=5
    )
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == "".join(demo_script.passage_tokens(5))


async def test_tool_calls(sdk: openai.AsyncOpenAI, demo_url: str) -> None:
    messages = user("What's the weather in Paris?")
    whole = await sdk.chat.completions.create(
        model="demo-chat", messages=messages, tools=[WEATHER_TOOL]
    )
    call = whole.choices[0].message.tool_calls[0]
    assert whole.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "demo"

    chunks = await stream_chat(demo_url, model="demo-chat", messages=messages, tools=[WEATHER_TOOL])
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    head = deltas[0]
    assert (head.index, head.type, head.function.name, head.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert head.id
    fragments = [d.function.arguments for d in deltas[1:]]
    assert len(fragments) >= 3 and all(d.index == 0 and d.id is None for d in deltas[1:])
    assert json.loads("".join(fragments)) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    followup = [
        *messages,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"},
    ]
    answer = await sdk.chat.completions.create(
        model="demo-chat", messages=followup, tools=[WEATHER_TOOL]
    )
    assert answer.choices[0].finish_reason == "stop"
    assert "sunny, 21 degrees" in answer.choices[0].message.content


async def test_a_system_message_after_the_prompt_is_passed_over(sdk: openai.AsyncOpenAI) -> None:
    """Claude Code (2.1.332) appends its environment as a system message after the prompt
    (the proxy keeps it where it stands): the demo answers the message before it, its
    directives and a tool result alike, as a model answers the turn the system note follows."""
    note: Any = {"role": "system", "content": "# Environment [[tokens=9]]"}
    whole = await sdk.chat.completions.create(
        model="demo-chat", messages=[*user("hello [[tokens=3]]"), note]
    )
    assert whole.choices[0].message.content == "".join(demo_script.passage_tokens(3))
    call: Any = {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{}"}}  # fmt: skip
    followup: Any = [
        *user("weather?"),
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        note,
    ]
    answer = await sdk.chat.completions.create(
        model="demo-chat", messages=followup, tools=[WEATHER_TOOL]
    )
    assert answer.choices[0].finish_reason == "stop"
    assert "sunny" in (answer.choices[0].message.content or "")


async def test_reasoner_and_json_mode(sdk: openai.AsyncOpenAI, demo_url: str) -> None:
    chunks = await stream_chat(demo_url, model="demo-reasoner", messages=user("think"))
    reasoning = [getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks[1:]]
    assert "".join(r for r in reasoning if r) == demo_script.REASONING
    assert reasoning[0]  # reasoning comes before any content
    whole = await sdk.chat.completions.create(
        model="demo-reasoner",
        messages=user("json please"),
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    assert whole.choices[0].message.reasoning_content == demo_script.REASONING


async def test_reasoner_counts_its_reasoning_in_completion_tokens_on_a_tool_call(
    sdk: openai.AsyncOpenAI,
) -> None:
    """Reasoning tokens are part of completion_tokens, as OpenAI counts them: a tool-call
    turn of demo-reasoner reported fewer completion tokens than reasoning tokens."""
    whole = await sdk.chat.completions.create(
        model="demo-reasoner", messages=user("What's the weather in Paris?"), tools=[WEATHER_TOOL]
    )
    assert whole.choices[0].finish_reason == "tool_calls"
    usage = whole.usage
    assert usage is not None and usage.completion_tokens_details is not None
    reasoning = usage.completion_tokens_details.reasoning_tokens
    assert reasoning and usage.completion_tokens > reasoning
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_embeddings_float_and_base64(sdk: openai.AsyncOpenAI, demo_url: str) -> None:
    floats = await sdk.embeddings.create(
        model="demo-embed", input=["one two", "three"], encoding_format="float"
    )
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 3
    for d in floats.data:
        assert len(d.embedding) == 8
        assert math.isclose(math.fsum(v * v for v in d.embedding), 1.0, rel_tol=1e-5)
    # The SDK's default is base64 (decoded client-side); strict mode cannot validate that form.
    async with openai.AsyncOpenAI(base_url=demo_url, api_key="x", max_retries=0) as loose:
        decoded = await loose.embeddings.create(model="demo-embed", input=["one two", "three"])
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    wide = await sdk.embeddings.create(
        model="demo-embed", input="one", dimensions=32, encoding_format="float"
    )
    assert len(wide.data[0].embedding) == 32


async def test_legacy_completions(sdk: openai.AsyncOpenAI, demo_url: str) -> None:
    whole = await sdk.completions.create(model="demo-chat", prompt="Once upon", max_tokens=6)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6

    def create(client: openai.OpenAI) -> Any:
        return client.completions.create(
            model="demo-chat",
            prompt="Once upon",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )

    # Strict mode cannot validate legacy stream chunks: the SDK's CompletionChoice declares
    # finish_reason non-optional, while OpenAI (and this backend) send null until the end.
    chunks = await trio.to_thread.run_sync(partial(_sync_stream, demo_url, create, strict=False))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


# ---- raw HTTP: errors and directives -------------------------------------------------------


async def test_error_shapes(http: httpx.AsyncClient) -> None:
    chat = "/v1/chat/completions"
    cases = [
        (await http.post(chat, content=b"{nope"), 400, None),
        (await http.post(chat, json={"messages": user("x")}), 400, None),
        (
            await http.post(chat, json={"model": "gpt-x", "messages": user("x")}),
            404,
            "model_not_found",
        ),
        (await http.post("/v1/nothing", json={}), 404, "unknown_url"),
        (await http.get(chat), 405, "method_not_allowed"),
        (
            await http.post(chat, json={"model": "demo-chat", "messages": user("[[bad]]")}),
            400,
            None,
        ),
        (  # a review: a 500 from the demo (an AttributeError on "w".get)
            await http.post(
                chat,
                json={
                    "model": "demo-chat",
                    "messages": user("x"),
                    "tools": [{"type": "function", "function": {"name": "w"}}],
                    "tool_choice": {"type": "function", "function": "w"},
                },
            ),
            400,
            None,
        ),
    ]
    for response, status, code in cases:
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    # An error before streaming is a JSON body with a non-200 status, even for stream: true.
    body = {"model": "demo-chat", "stream": True, "messages": user("hi [[status=429]]")}
    response = await http.post(chat, json=body)
    assert response.status_code == 429 and response.headers["retry-after"] == "0"
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == "rate_limit_error"


async def test_a_refused_request_keeps_its_connection_even_if_its_body_comes_late(
    demo_url: str,
) -> None:
    """404 and 405 are answered after the body is read; answered before it, the body that
    came later made hypercorn close the connection under a client about to reuse it."""
    host, port = httpx.URL(demo_url).host, httpx.URL(demo_url).port
    assert port is not None
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        await trio.sleep(0.1)  # the body comes late
        await stream.send_all(b"{}")
        first = await _read_response(stream)
        await stream.send_all(b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        second = await _read_response(stream)
    assert first.startswith(b"HTTP/1.1 404") and second.startswith(b"HTTP/1.1 405")


async def _read_response(stream: trio.SocketStream) -> bytes:
    """One response with a Content-Length body; b"" if the server closed instead."""
    data = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


async def test_fail_first_counts_retries_of_one_body(http: httpx.AsyncClient) -> None:
    body = {"model": "demo-chat", "messages": user("flaky [[fail_first=2]] [[fail_status=502]]")}
    statuses = [(await http.post("/v1/chat/completions", json=body)).status_code for _ in range(3)]
    assert statuses == [502, 502, 200]
    other = {"model": "demo-chat", "messages": user("other [[fail_first=1]]")}
    assert (await http.post("/v1/chat/completions", json=other)).status_code == 503
    assert (await http.post("/_demo/reset")).status_code == 200
    assert await events(http) == []
    assert (await http.post("/v1/chat/completions", json=body)).status_code == 502


async def test_first_delay_sends_role_chunk_first(http: httpx.AsyncClient) -> None:
    body = {"model": "demo-chat", "stream": True, "messages": user("slow [[first_delay=0.3]]")}
    start = trio.current_time()
    arrivals: list[tuple[float, str]] = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append((trio.current_time() - start, line))
    assert '"role":"assistant"' in arrivals[0][1] and arrivals[0][0] < 0.2
    assert '"content":"Hello"' in arrivals[1][1] and arrivals[1][0] >= 0.3


async def raw_post(url: str, path: str, body: dict[str, Any], request_id: str) -> trio.SocketStream:
    """POST over a bare socket, so the test controls exactly when the connection goes away
    (breaking out of an httpx stream early leaves async generators that trio warns about)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: {request_id}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    await stream.send_all(head.encode() + data)
    return stream


async def test_disconnect_is_recorded_promptly(demo_url: str, http: httpx.AsyncClient) -> None:
    body = {"model": "demo-chat", "stream": True, "messages": user("hang [[stall_after=3]]")}
    stream = await raw_post(demo_url, "/v1/chat/completions", body, "stall-1")
    received = b""
    with trio.fail_after(2):
        while received.count(b"data: ") < 4:  # the role chunk and 3 tokens
            received += await stream.receive_some()
    await trio.sleep(0.05)  # nothing more arrives: the stream is stalled, not finished
    assert (await event_for(http, "stall-1"))["outcome"] is None
    closed_at = time.time()
    await stream.aclose()
    for _ in range(50):
        entry = await event_for(http, "stall-1")
        if entry["ended"] is not None:
            break
        await trio.sleep(0.005)
    assert entry["outcome"] == "disconnected" and entry["tokens_sent"] == 3
    assert entry["stream"] is True and entry["model"] == "demo-chat"
    assert 0 <= entry["ended"] - closed_at < 0.05

    # A non-stream request still waiting for its first token is cancelled as well.
    body = {"model": "demo-chat", "messages": user("wait [[first_delay=5]]")}
    with pytest.raises(httpx.ReadTimeout):
        await http.post(
            "/v1/chat/completions", json=body, headers={"X-Request-ID": "slow-1"}, timeout=0.2
        )
    await trio.sleep(0.05)
    entry = await event_for(http, "slow-1")
    assert entry["outcome"] == "disconnected" and entry["ended"] - entry["started"] < 1


async def test_drop_after_breaks_the_connection(http: httpx.AsyncClient) -> None:
    body = {"model": "demo-chat", "stream": True, "messages": user("boom [[drop_after=2]]")}
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"X-Request-ID": "drop-1"}
        ) as response:
            async for line in response.aiter_lines():
                received.append(line)
    assert sum(line.startswith("data: {") for line in received) == 3  # role + 2 tokens
    assert "data: [DONE]" not in received
    entry = await event_for(http, "drop-1")
    assert (entry["outcome"], entry["tokens_sent"]) == ("error", 2)

    body = {"model": "demo-chat", "messages": user("boom [[drop_after=0]]")}
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post("/v1/chat/completions", json=body)


async def test_close_connection_and_event_fields(http: httpx.AsyncClient) -> None:
    body = {"model": "demo-chat", "messages": user("bye [[close_connection]] [[tokens=2]]")}
    response = await http.post("/v1/chat/completions", json=body, headers={"X-Request-ID": "c-1"})
    assert response.headers["connection"] == "close"
    entry = await event_for(http, "c-1")
    assert entry["outcome"] == "completed" and entry["tokens_sent"] == 2
    assert entry["path"] == "/v1/chat/completions" and len(entry["body_hash"]) == 16
    assert entry["started"] <= entry["ended"] <= time.time()


async def test_app_exposes_event_log() -> None:
    app = create_demo_app(FAST)
    assert len(app.events) == 0 and callable(app.reset)


# ---- as a separate process -----------------------------------------------------------------


async def test_subprocess_reports_port_and_stops_on_sigterm() -> None:
    command = [sys.executable, "-m", "trioproxy.demo", "--port", "0", "--token-delay", "0"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        buffer = b""
        with trio.fail_after(5):
            while b"\n" not in buffer:
                chunk = await process.stdout.receive_some()
                assert chunk, "demo process exited before printing its address"
                buffer += chunk
        line = buffer.decode().strip()
        assert line.startswith("demo backend listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        assert url.endswith("/v1") and not url.endswith(":0/v1")
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            payload = {"model": "demo-embed", "input": "x", "encoding_format": "base64"}
            data = (await client.post("/embeddings", json=payload)).json()["data"][0]
            vector = struct.unpack("<8f", base64.b64decode(data["embedding"]))
            assert list(vector) == demo_script.embedding("x", 8)
        process.terminate()
        with trio.fail_after(3):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()


async def test_compact_refuses_an_input_of_the_wrong_type(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/responses/compact", json={"model": "demo-chat", "input": 5})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "input"


async def test_an_input_role_that_is_no_string_is_read_as_user(http: httpx.AsyncClient) -> None:
    """The stored input's items looked a list role up in a set of roles: a 500."""
    message = {"role": ["user"], "content": "hi"}
    reply = await http.post("/v1/responses", json={"model": "demo-chat", "input": [message]})
    assert reply.status_code == 200, reply.text
    rid = reply.json()["id"]
    (item,) = (await http.get(f"/v1/responses/{rid}/input_items")).json()["data"]
    assert item["role"] == "user"
