"""The official ``openai`` Python SDK, with strict response validation, against a real proxy.

``base_url`` is the proxy's ``/v1``; the demo backend runs in its own process behind it.
``AsyncOpenAI`` runs natively under pytest-trio for plain calls; its streams run on asyncio in a
worker thread (see ``on_asyncio`` for why).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import trio

from .conftest import ServerProcess

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}


def marker() -> str:
    return uuid.uuid4().hex[:12]


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": f"{text} {marker()}"}]


@pytest.fixture
def sdk() -> Iterator[Callable[[ServerProcess], openai.OpenAI]]:
    made: list[openai.OpenAI] = []

    def make(server: ServerProcess) -> openai.OpenAI:
        made.append(
            openai.OpenAI(
                base_url=server.url + "/v1",
                api_key="unused",
                max_retries=0,
                timeout=30,
                _strict_response_validation=True,
            )
        )
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
def client(proxy: ServerProcess, sdk: Callable[[ServerProcess], openai.OpenAI]) -> openai.OpenAI:
    return sdk(proxy)


@pytest.fixture
async def aclient(proxy: ServerProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(
        base_url=proxy.url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        _strict_response_validation=True,
    )
    yield c
    await c.close()


# ---- chat ----------------------------------------------------------------------------------


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    messages = user("Hello [[tokens=8]]")
    whole = client.chat.completions.create(model="demo-chat", messages=messages)
    assert whole.model == "demo-chat"
    assert whole.choices[0].finish_reason == "stop"
    text = whole.choices[0].message.content
    assert text is not None and text.startswith("Hello from the trioproxy")
    assert whole.usage is not None and whole.usage.completion_tokens == 8

    chunks = list(client.chat.completions.create(model="demo-chat", messages=messages, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # not asked for


def test_stream_include_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo-chat",
        messages=user("Count me [[tokens=5]]"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    last = chunks[-1]
    assert last is usage_chunks[0] and last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5


def test_max_tokens_and_length_finish(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="demo-chat", messages=user("Long [[tokens=30]]"), max_tokens=3
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "Hello from the"


def test_reasoning_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="demo-reasoner", messages=user("[[tokens=2]]"))
    assert reply.choices[0].message.content == "Hello from"
    extra = reply.choices[0].message.model_extra or {}
    assert extra.get("reasoning_content") == "Let me think about a friendly answer."


async def test_async_chat(aclient: openai.AsyncOpenAI) -> None:
    whole = await aclient.chat.completions.create(
        model="demo-chat", messages=[{"role": "user", "content": "Async [[tokens=6]]"}]
    )
    assert whole.choices[0].message.content == "Hello from the trioproxy demo backend!"


def async_client_for(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        _strict_response_validation=True,
    )


async def on_asyncio(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run *fn* on an asyncio loop in a worker thread.

    AsyncOpenAI *streams* are run this way: the SDK's ``AsyncStream.__stream__`` breaks out of
    its ``_iter_events()`` async generator at ``[DONE]`` without closing it, and under trio the
    garbage-collected generator raises a ResourceWarning (an error here); asyncio's loop closes
    such generators silently. Non-streaming AsyncOpenAI calls run natively under trio.
    """
    return await trio.to_thread.run_sync(lambda: asyncio.run(fn()))  # type: ignore[arg-type]


async def test_async_chat_stream_on_asyncio(proxy: ServerProcess) -> None:
    async def run() -> tuple[str, str | None]:
        async with async_client_for(proxy) as c:
            messages: Any = [{"role": "user", "content": "Async [[tokens=6]]"}]
            whole = await c.chat.completions.create(model="demo-chat", messages=messages)
            stream = await c.chat.completions.create(
                model="demo-chat", messages=messages, stream=True
            )
            parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
            return "".join(parts), whole.choices[0].message.content

    streamed, whole = await on_asyncio(run)
    assert streamed == whole


# ---- tools ---------------------------------------------------------------------------------


def test_tool_call_non_stream(client: openai.OpenAI) -> None:
    messages = user("Weather in Paris?")
    reply = client.chat.completions.create(
        model="demo-chat", messages=messages, tools=[WEATHER_TOOL]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "demo", "unit": "C"}

    follow = client.chat.completions.create(
        model="demo-chat",
        tools=[WEATHER_TOOL],
        messages=[
            *messages,
            choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ],
    )
    assert follow.choices[0].message.content == "Thanks! The tool returned: sunny"


def test_tool_call_stream_with_sdk_helper(client: openai.OpenAI) -> None:
    """The SDK's own accumulator reassembles the argument fragments into valid JSON."""
    with client.chat.completions.stream(
        model="demo-chat", messages=user("Weather?"), tools=[WEATHER_TOOL]
    ) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in events
    assert events.count("tool_calls.function.arguments.done") == 1
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "demo", "unit": "C"}


def test_tool_call_stream_manual_accumulation(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo-chat", messages=user("Weather?"), tools=[WEATHER_TOOL], stream=True
    )
    names: dict[int, str] = {}
    fragments: dict[int, list[str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.function and delta.function.name:
                    names[delta.index] = delta.function.name
                if delta.function and delta.function.arguments:
                    fragments.setdefault(delta.index, []).append(delta.function.arguments)
    assert finish == "tool_calls"
    assert names == {0: "get_weather"}
    assert len(fragments[0]) >= 3  # really fragmented on the wire
    assert json.loads("".join(fragments[0])) == {"city": "demo", "unit": "C"}


# ---- embeddings ----------------------------------------------------------------------------


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    texts = ["hello world", "second text", "third"]
    floats = client.embeddings.create(model="demo-embed", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    vectors = [d.embedding for d in floats.data]
    assert all(len(v) == 8 and all(isinstance(x, float) for x in v) for v in vectors)
    assert floats.usage.prompt_tokens == 5

    # An explicit "base64" gets the base64 strings back, which the SDK's own types (List[float])
    # reject under strict validation whatever the server: read the raw response instead.
    raw_response = client.embeddings.with_raw_response.create(
        model="demo-embed", input=texts, encoding_format="base64"
    )
    assert raw_response.status_code == 200
    decoded = []
    for item in raw_response.http_response.json()["data"]:
        raw = item["embedding"]
        assert isinstance(raw, str), "an explicit base64 request gets the base64 string"
        packed = base64.b64decode(raw)
        decoded.append(list(struct.unpack(f"<{len(packed) // 4}f", packed)))
    assert decoded == vectors

    # The SDK's default asks the server for base64 itself and decodes it into floats, but only
    # after validating, so strict validation rejects the base64 strings of any server (the SDK's
    # types say List[float]): that path is checked with a lenient client.
    lenient = client.with_options()
    lenient._strict_response_validation = False
    default = lenient.embeddings.create(model="demo-embed", input=texts)
    assert [d.embedding for d in default.data] == vectors

    single = client.embeddings.create(
        model="demo-embed", input="hello world", dimensions=16, encoding_format="float"
    )
    assert len(single.data) == 1 and len(single.data[0].embedding) == 16


async def test_async_embeddings(aclient: openai.AsyncOpenAI) -> None:
    result = await aclient.embeddings.create(
        model="demo-embed", input=["a", "b"], encoding_format="float"
    )
    assert len(result.data) == 2


# ---- models and legacy completions ---------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    listed = client.models.list()
    ids = [m.id for m in listed.data]
    assert {"demo-chat", "demo-reasoner", "demo-embed"} <= set(ids)
    for m in listed.data:
        assert m.object == "model"
        assert isinstance(m.created, int)
        assert isinstance(m.owned_by, str)
    one = client.models.retrieve("demo-chat")
    assert one.id == "demo-chat" and one.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    # OpenAI's own words for it: the type is the same as a 400's, the code tells them apart
    assert (info.value.type, info.value.code) == ("invalid_request_error", "model_not_found")


async def test_async_models(aclient: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in aclient.models.list()]
    assert "demo-chat" in ids


def test_legacy_completions(client: openai.OpenAI) -> None:
    prompt = f"Once upon a time [[tokens=6]] {marker()}"
    whole = client.completions.create(model="demo-chat", prompt=prompt)
    assert whole.object == "text_completion"
    text = whole.choices[0].text
    assert text.startswith("Hello from the trioproxy")
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    # The SDK types every legacy choice's finish_reason as non-null, so strict validation rejects
    # the null in OpenAI's own intermediate stream chunks: stream with a lenient client.
    lenient = client.with_options()
    lenient._strict_response_validation = False
    chunks = list(
        lenient.completions.create(
            model="demo-chat", prompt=prompt, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


# ---- errors --------------------------------------------------------------------------------


def test_unknown_model_not_found(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(
                model="no-such-model", messages=user("hi"), stream=stream
            )
        assert info.value.status_code == 404
        assert "no-such-model" in info.value.message
        assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x", encoding_format="float")


def test_bad_requests(client: openai.OpenAI) -> None:
    # Caught by the backend (empty messages) and relayed as it came.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="demo-chat", messages=[])
    assert info.value.param == "messages"
    # Caught by the proxy itself (empty model): still a 400 in OpenAI's shape, naming model.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="", messages=user("hi"))
    assert "model" in info.value.message
    assert info.value.type == "invalid_request_error"
    # A wrong type the proxy checks: stream must be a boolean.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="demo-chat", messages=user("hi"), extra_body={"stream": "yes"}
        )
    assert "stream" in info.value.message


def test_backend_status_relayed(
    proxy_no_retry: ServerProcess, sdk: Callable[[ServerProcess], openai.OpenAI]
) -> None:
    c = sdk(proxy_no_retry)
    with pytest.raises(openai.InternalServerError) as info:
        c.chat.completions.create(model="demo-chat", messages=user("[[status=503]]"))
    assert info.value.status_code == 503
    assert "simulated HTTP 503" in info.value.message
    with pytest.raises(openai.RateLimitError) as rate:
        c.chat.completions.create(model="demo-chat", messages=user("[[status=429]]"), stream=True)
    assert rate.value.response.headers.get("retry-after") == "0"
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model="demo-chat", messages=user("[[status=422]]"))


def test_mid_stream_failure_raises_api_error(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo-chat", messages=user("[[drop_after=3]]"), stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello from the"
    assert "mid-stream" in info.value.message


async def test_async_mid_stream_failure(proxy: ServerProcess) -> None:
    async def run() -> tuple[str, BaseException | None]:
        received: list[str] = []
        async with async_client_for(proxy) as c:
            stream = await c.chat.completions.create(
                model="demo-chat", messages=user("[[drop_after=2]]"), stream=True
            )
            try:
                async for chunk in stream:
                    received.extend(ch.delta.content or "" for ch in chunk.choices)
            except openai.APIError as exc:
                return "".join(received), exc
        return "".join(received), None

    text, error = await on_asyncio(run)
    assert text == "Hello from"
    assert isinstance(error, openai.APIError)
    assert "mid-stream" in error.message


# ---- the Responses API ---------------------------------------------------------------------


def test_responses_non_stream_and_stream(client: openai.OpenAI) -> None:
    """``client.responses.create``, forwarded to the backend's /responses as it came; the
    SDK validates every event strictly (``_strict_response_validation``)."""
    whole = client.responses.create(model="demo-chat", input=f"Hello [[tokens=6]] {marker()}")
    assert whole.status == "completed" and whole.model == "demo-chat"
    assert len(whole.output_text.split()) == 6
    assert whole.usage is not None and whole.usage.output_tokens == 6
    events = list(
        client.responses.create(model="demo-chat", input=user("Hello [[tokens=6]]"), stream=True)
    )
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.output_tokens == 6


def test_responses_cut_by_max_output_tokens(client: openai.OpenAI) -> None:
    reply = client.responses.create(
        model="demo-chat", input=f"Hello [[tokens=9]] {marker()}", max_output_tokens=3
    )
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert len(reply.output_text.split()) == 3


def test_responses_unknown_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model="no-such-model", input="hi")
    assert "no-such-model" in info.value.message


def test_responses_stored_retrieved_listed_and_deleted(client: openai.OpenAI) -> None:
    """The routes by id reach the backend: a stored response comes back as it was created,
    its input items list, and once deleted it is gone (404 from the backend)."""
    conversation: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Hello [[tokens=4]] {marker()}"},
    ]
    created = client.responses.create(model="demo-chat", input=conversation)
    again = client.responses.retrieve(created.id)
    assert again.id == created.id and again.model == "demo-chat"
    assert again.output_text == created.output_text and again.status == "completed"

    items = client.responses.input_items.list(created.id, order="asc")
    texts = [item.content[0].text for item in items.data]  # type: ignore[union-attr]
    assert texts == [message["content"] for message in conversation]
    newest = client.responses.input_items.list(created.id, limit=1)
    assert [item.id for item in newest.data] == [items.data[-1].id] and newest.has_more

    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(created.id)
    assert created.id in info.value.message


def test_responses_background_polled_and_cancelled(client: openai.OpenAI) -> None:
    queued = client.responses.create(
        model="demo-chat", input=f"Hello [[tokens=3]] {marker()}", background=True
    )
    assert queued.status == "queued" and queued.output == []
    polled = client.responses.retrieve(queued.id)
    assert polled.status == "completed" and len(polled.output_text.split()) == 3
    assert client.responses.cancel(queued.id).id == queued.id

    foreground = client.responses.create(model="demo-chat", input=f"Hello {marker()}")
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.cancel(foreground.id)
    assert "background" in info.value.message


def test_responses_stream_resumed_after_an_event(client: openai.OpenAI) -> None:
    """``retrieve(stream=True, starting_after=N)`` (``GET /responses/{id}?stream=true``)
    is relayed as a stream: the events after N, validated strictly by the SDK."""
    live = list(
        client.responses.create(model="demo-chat", input=user("Hello [[tokens=5]]"), stream=True)
    )
    response_id = live[0].response.id  # type: ignore[union-attr]
    resumed = list(client.responses.retrieve(response_id, stream=True, starting_after=5))
    assert [e.sequence_number for e in resumed] == [e.sequence_number for e in live[6:]]
    assert [e.type for e in resumed] == [e.type for e in live[6:]]
    assert resumed[-1].type == "response.completed"


def test_responses_input_tokens_and_compact(client: openai.OpenAI) -> None:
    counted = client.responses.input_tokens.count(
        model="demo-chat", input="one two three", instructions="four five"
    )
    assert counted.object == "response.input_tokens" and counted.input_tokens == 5
    assert client.responses.input_tokens.count(input="no model named").input_tokens == 3

    earlier = client.responses.create(model="demo-chat", input=f"Hello [[tokens=3]] {marker()}")
    compacted = client.responses.compact(model="demo-chat", previous_response_id=earlier.id)
    assert compacted.object == "response.compaction"
    assert compacted.output[-1].type == "compaction"
    with pytest.raises(openai.NotFoundError):
        client.responses.compact(model="no-such-model", input="hi")


def test_responses_ids_that_could_address_another_route_are_refused(proxy: ServerProcess) -> None:
    """A response id goes into the backend's URL with the proxy's key: an id with other
    characters than letters, digits and "_-+/=", or over 1,024 of them, is refused before
    the backend (the SDK refuses ".." itself)."""
    with httpx.Client(base_url=proxy.url + "/v1", timeout=10) as http:
        for bad in ("resp.1", "resp%201", "%2E%2E", "x" * 1025):
            reply = http.get(f"/responses/{bad}/input_items")
            assert reply.status_code == 400, (bad, reply.text)
            assert reply.json()["error"]["param"] == "response_id"
        # an encoded slash is a slash, which an id may hold (LiteLLM's are base64); a "."
        # may not
        assert http.delete("/responses/..%2Fmodels").status_code == 400
