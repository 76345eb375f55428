"""The official ``ollama`` Python client (sync and async) against a real proxy process.

Every test talks over real sockets to ``python -m trioproxy`` (the ``proxy`` fixture), which
forwards to the demo backend in a third process. The async client runs natively under
pytest-trio (httpx speaks trio through anyio).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

import httpx
import ollama
import openai
import pytest
import trio

from trioproxy import translate as tr
from trioproxy.demo.script import REASONING_TOKENS
from trioproxy.forward import encode

from .conftest import ServerProcess, demo_events_for
from .fakes import (
    FULL_LENGTH_VECTOR,
    FullLengthEmbeddings,
    LlamaCppModels,
    ScriptedHandler,
    serving,
)

# A valid 1x1 PNG (transparent pixel).
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
PNG_B64 = base64.b64encode(PNG_1X1).decode()

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
COUNTS = ("prompt_eval_count", "eval_count")


def marker() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def client() -> Iterator[Callable[..., ollama.Client]]:
    """Factory for sync clients on a proxy; every client is closed at teardown."""
    made: list[ollama.Client] = []

    def make(proxy: ServerProcess, **kwargs: Any) -> ollama.Client:
        made.append(ollama.Client(host=proxy.url, timeout=30, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


@pytest.fixture
async def aclient() -> AsyncIterator[Callable[..., ollama.AsyncClient]]:
    made: list[ollama.AsyncClient] = []

    def make(proxy: ServerProcess, **kwargs: Any) -> ollama.AsyncClient:
        made.append(ollama.AsyncClient(host=proxy.url, timeout=30, **kwargs))
        return made[-1]

    yield make
    for c in made:
        await c.close()


def assert_final(part: Any) -> None:
    """The done line: done_reason, integer nanosecond durations, token counts > 0."""
    assert part.done is True
    assert part.done_reason == "stop"
    for name in (*DURATIONS, *COUNTS):
        value = getattr(part, name)
        assert isinstance(value, int) and not isinstance(value, bool), (name, value)
    assert part.eval_count > 0
    assert part.prompt_eval_count > 0
    assert part.total_duration > 0
    assert isinstance(part.created_at, str)


def check_stream(parts: list[Any]) -> None:
    """Exactly one done line, and it is the last one."""
    assert parts, "empty stream"
    dones = [p for p in parts if p.done]
    assert len(dones) == 1, [p.done for p in parts]
    assert parts[-1].done is True
    assert_final(parts[-1])


# ---- generate and chat, streamed and not ---------------------------------------------------


def test_generate_stream_equals_non_stream(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    c = client(proxy)
    prompt = f"Say hello [[tokens=7]] {marker()}"
    whole = c.generate(model="demo-chat", prompt=prompt, stream=False)
    assert whole.model == "demo-chat"
    assert whole.response.startswith("Hello from the trioproxy")
    assert_final(whole)
    assert whole.eval_count == 7

    parts = list(c.generate(model="demo-chat", prompt=prompt, stream=True))
    check_stream(parts)
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].eval_count == 7
    assert len([p for p in parts if p.response]) == 7  # token by token, not buffered


def test_generate_with_suffix_is_refused(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """A code-completion tool's fill-in-the-middle request gets Ollama's own refusal (a
    ResponseError the tool can show), never an answer that ignored the suffix."""
    c = client(proxy)
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as caught:
            answer = c.generate(
                model="demo-chat", prompt="def add(a, b):", suffix="\n", stream=stream
            )
            if stream:
                list(answer)
        assert caught.value.status_code == 400
        assert caught.value.error == '"demo-chat" does not support insert'


def test_chat_stream_equals_non_stream(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    c = client(proxy)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"Hi there [[tokens=9]] {marker()}"},
    ]
    whole = c.chat(model="demo-chat", messages=messages, stream=False)
    assert whole.message.role == "assistant"
    assert whole.message.content.startswith("Hello from the trioproxy")
    assert_final(whole)
    assert whole.eval_count == 9

    parts = list(c.chat(model="demo-chat", messages=messages, stream=True))
    check_stream(parts)
    assert all(p.message.role == "assistant" for p in parts)
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == 9


def test_chat_options_are_honoured(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """num_predict reaches the backend as max_tokens: the reply is cut and done_reason says so."""
    c = client(proxy)
    messages = [{"role": "user", "content": f"Tell me a story [[tokens=20]] {marker()}"}]
    reply = c.chat(
        model="demo-chat", messages=messages, stream=False,
        options={"num_predict": 4, "temperature": 0.1, "seed": 7},
    )  # fmt: skip
    assert reply.done_reason == "length"
    assert reply.eval_count == 4
    unlimited = c.chat(
        model="demo-chat", messages=messages, stream=False, options={"num_predict": -1}
    )
    assert unlimited.eval_count == 20


async def test_async_generate_and_chat(
    proxy: ServerProcess, aclient: Callable[..., ollama.AsyncClient]
) -> None:
    c = aclient(proxy)
    prompt = f"Async hello [[tokens=5]] {marker()}"
    whole = await c.generate(model="demo-chat", prompt=prompt, stream=False)
    assert_final(whole)
    parts = [p async for p in await c.generate(model="demo-chat", prompt=prompt, stream=True)]
    check_stream(parts)
    assert "".join(p.response for p in parts) == whole.response

    messages = [{"role": "user", "content": prompt}]
    chat_whole = await c.chat(model="demo-chat", messages=messages, stream=False)
    assert_final(chat_whole)
    chat_parts = [p async for p in await c.chat(model="demo-chat", messages=messages, stream=True)]
    check_stream(chat_parts)
    assert "".join(p.message.content or "" for p in chat_parts) == chat_whole.message.content
    assert chat_whole.message.content == whole.response


# ---- tools ---------------------------------------------------------------------------------


def _tool_call_chunks(parts: list[Any]) -> list[Any]:
    return [p for p in parts if p.message.tool_calls]


def test_chat_tool_call_streamed_arrives_whole_then_follow_up(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    c = client(proxy)
    messages: list[Any] = [{"role": "user", "content": f"Weather in Paris? {marker()}"}]
    parts = list(c.chat(model="demo-chat", messages=messages, tools=[WEATHER_TOOL], stream=True))
    check_stream(parts)
    with_calls = _tool_call_chunks(parts)
    assert len(with_calls) == 1, "the tool call must arrive as ONE chunk"
    calls = with_calls[0].message.tool_calls
    assert len(calls) == 1
    call = calls[0]
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, dict)
    assert call.function.arguments == {"city": "demo", "days": 1}
    assert with_calls[0].done is False  # the call line comes before the done line

    # Send the result back: the model answers with text.
    messages.append(with_calls[0].message)
    messages.append({"role": "tool", "content": "sunny, 22 C", "tool_name": "get_weather"})
    follow = list(c.chat(model="demo-chat", messages=messages, tools=[WEATHER_TOOL], stream=True))
    check_stream(follow)
    assert not _tool_call_chunks(follow)
    text = "".join(p.message.content or "" for p in follow)
    assert text == "Thanks! The tool returned: sunny, 22 C"


def test_chat_tool_call_non_stream(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    c = client(proxy)
    messages: list[Any] = [{"role": "user", "content": f"Weather? {marker()}"}]
    reply = c.chat(model="demo-chat", messages=messages, tools=[WEATHER_TOOL], stream=False)
    assert reply.done is True
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert call.function.arguments == {"city": "demo", "days": 1}
    messages += [reply.message, {"role": "tool", "content": "rain", "tool_name": "get_weather"}]
    answer = c.chat(model="demo-chat", messages=messages, tools=[WEATHER_TOOL], stream=False)
    assert answer.message.content == "Thanks! The tool returned: rain"
    assert not answer.message.tool_calls


def test_python_function_as_tool(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """The client can derive the tool schema from a Python function (a common usage)."""

    def add_two_numbers(a: int, b: int) -> int:
        """Add two numbers.

        Args:
          a: The first number
          b: The second number
        """
        return a + b

    c = client(proxy)
    reply = c.chat(
        model="demo-chat",
        messages=[{"role": "user", "content": f"What is 1+1? {marker()}"}],
        tools=[add_two_numbers],
        stream=False,
    )
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "add_two_numbers"
    assert add_two_numbers(**call.function.arguments) == 2


async def test_async_chat_tool_call_stream(
    proxy: ServerProcess, aclient: Callable[..., ollama.AsyncClient]
) -> None:
    c = aclient(proxy)
    messages = [{"role": "user", "content": f"Weather? {marker()}"}]
    stream = await c.chat(model="demo-chat", messages=messages, tools=[WEATHER_TOOL], stream=True)
    parts = [p async for p in stream]
    check_stream(parts)
    (chunk,) = _tool_call_chunks(parts)
    assert chunk.message.tool_calls[0].function.arguments == {"city": "demo", "days": 1}


# ---- images --------------------------------------------------------------------------------


class _Capture:
    """An httpx request hook: remembers the exact bytes the ollama client sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def __call__(self, request: httpx.Request) -> None:
        self.bodies.append(request.read())


def _expected_backend_hash(client_body: bytes, kind: str) -> str:
    body = json.loads(client_body)
    convert = tr.ollama_chat_to_openai if kind == "chat" else tr.ollama_generate_to_openai
    return hashlib.sha256(encode(convert(body, body["model"]))).hexdigest()[:16]


@pytest.mark.parametrize("kind", ["chat", "generate"])
def test_images_reach_the_backend_as_data_urls(
    proxy: ServerProcess,
    demo_backend: ServerProcess,
    kind: str,
    client: Callable[..., ollama.Client],
) -> None:
    request_id = uuid.uuid4().hex
    capture = _Capture()
    c = client(proxy, headers={"X-Request-ID": request_id}, event_hooks={"request": [capture]})
    text = f"What is in this picture? [[tokens=3]] {marker()}"
    if kind == "chat":
        reply = c.chat(
            model="demo-chat",
            messages=[{"role": "user", "content": text, "images": [PNG_1X1]}],
            stream=False,
        )
        assert reply.message.content == "Hello from the"
    else:
        reply = c.generate(model="demo-chat", prompt=text, images=[PNG_1X1], stream=False)
        assert reply.response == "Hello from the"

    # The client sent base64; the proxy must have turned it into an image_url data URL.
    (sent,) = capture.bodies
    body = json.loads(sent)
    images = body["messages"][0]["images"] if kind == "chat" else body["images"]
    assert images == [PNG_B64]
    convert = tr.ollama_chat_to_openai if kind == "chat" else tr.ollama_generate_to_openai
    translated = convert(body, "demo-chat")
    parts = translated["messages"][-1]["content"]
    assert {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}} in parts
    # ... and the demo received exactly those bytes (the event log keeps a hash of the body).
    (event,) = demo_events_for(demo_backend, request_id)
    assert event["outcome"] == "completed"
    assert event["body_hash"] == _expected_backend_hash(sent, kind)


# ---- thinking ------------------------------------------------------------------------------


def test_thinking_from_reasoning_model(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    c = client(proxy)
    messages = [{"role": "user", "content": f"Think first [[tokens=4]] {marker()}"}]
    whole = c.chat(model="demo-reasoner", messages=messages, think=True, stream=False)
    assert whole.message.thinking == "Let me think about a friendly answer."
    assert whole.message.content == "Hello from the trioproxy"

    parts = list(c.chat(model="demo-reasoner", messages=messages, think=True, stream=True))
    check_stream(parts)
    assert "".join(p.message.thinking or "" for p in parts) == whole.message.thinking
    assert "".join(p.message.content or "" for p in parts) == whole.message.content

    gen = c.generate(model="demo-reasoner", prompt=messages[0]["content"], think=True)
    assert gen.thinking == whole.message.thinking
    assert gen.response == whole.message.content


def test_think_false_hides_the_thinking(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """As Ollama: no ``thinking`` when the client says ``think=False`` (Open WebUI's toggle),
    streamed or not, on chat and generate; the answer is the same."""
    c = client(proxy)
    messages = [{"role": "user", "content": f"Think first [[tokens=4]] {marker()}"}]
    whole = c.chat(model="demo-reasoner", messages=messages, think=False, stream=False)
    assert whole.message.thinking is None
    assert whole.message.content == "Hello from the trioproxy"
    parts = list(c.chat(model="demo-reasoner", messages=messages, think=False, stream=True))
    check_stream(parts)
    assert all(p.message.thinking is None for p in parts)
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    for stream in (False, True):
        generated = c.generate(model="demo-reasoner", prompt=messages[0]["content"],
                               think=False, stream=stream)  # fmt: skip
        pieces = list(generated) if stream else [generated]
        assert all(p.thinking is None for p in pieces)
        assert "".join(p.response for p in pieces) == whole.message.content


def test_think_switches_reach_the_backend_as_the_operator_set_them(
    demo_backend: ServerProcess,
    start_proxy: Callable[..., ServerProcess],
    proxy: ServerProcess,
    client: Callable[..., ollama.Client],
) -> None:
    """THINK_OFF_EXTRA_BODY is how a backend is told not to reason (Open WebUI's think
    toggle, ``think=False``): the demo, like vLLM or llama.cpp's server with a Qwen3-style
    template, then spends no tokens on it. Without the setting the reasoning is only hidden
    and still counted; THINK_ON_EXTRA_BODY goes with ``think=True`` or a level."""
    switched = client(
        start_proxy(
            demo_backend.url,
            THINK_OFF_EXTRA_BODY='{"chat_template_kwargs": {"enable_thinking": false}}',
            THINK_ON_EXTRA_BODY='{"chat_template_kwargs": {"enable_thinking": true}}',
        )
    )
    plain = client(proxy)
    messages = [{"role": "user", "content": f"Think first [[tokens=4]] {marker()}"}]
    reasoning = len(REASONING_TOKENS)
    for stream in (False, True):
        for c, think, counted, shown in (
            (switched, False, 4, False),
            (plain, False, 4 + reasoning, False),
            (switched, True, 4 + reasoning, True),
            (switched, "high", 4 + reasoning, True),
            (switched, None, 4 + reasoning, True),  # not asked: the backend's default
        ):
            answer = c.chat(model="demo-reasoner", messages=messages, think=think, stream=stream)
            parts = list(answer) if stream else [answer]
            final = parts[-1]
            assert final.done and final.eval_count == counted, (stream, think)
            thinking = "".join(p.message.thinking or "" for p in parts)
            assert bool(thinking) is shown, (stream, think)
            assert "".join(p.message.content or "" for p in parts) == "Hello from the trioproxy"
    generated = switched.generate(model="demo-reasoner", prompt=messages[0]["content"], think=False)
    assert generated.eval_count == 4 and generated.thinking is None


class _SwitchRefusingBackend(ScriptedHandler):
    """OpenAI's answer to a field a model does not take, for model "no-switch"."""

    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        request = self.json_body()
        self.requests.append(request)
        if request["model"] == "no-switch" and "chat_template_kwargs" in request:
            refusal = {"error": {
                "message": "Unrecognized request argument supplied: chat_template_kwargs",
                "type": "invalid_request_error", "param": None, "code": None}}  # fmt: skip
            self.answer(400, json.dumps(refusal).encode())
            return
        if request.get("stream"):
            delta = {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}
            end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            events = f"data: {json.dumps(delta)}\n\ndata: {json.dumps(end)}\n\ndata: [DONE]\n\n"
            self.answer(200, events.encode(), "text/event-stream")
            return
        message = {"role": "assistant", "content": "ok"}
        answer = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        self.answer(200, json.dumps(answer).encode())


def test_a_model_that_refuses_the_think_switch_is_asked_again_without_it(
    start_proxy: Callable[..., ServerProcess], client: Callable[..., ollama.Client]
) -> None:
    """One THINK_OFF_EXTRA_BODY for every model: behind a gateway, a model that does not
    take the field (OpenAI: 400 "Unrecognized request argument") failed every think=False
    request. Asked again without it, once; later requests for that model go without."""
    _SwitchRefusingBackend.requests.clear()
    with serving(_SwitchRefusingBackend) as url:
        switch = '{"chat_template_kwargs": {"enable_thinking": false}}'
        c = client(start_proxy(url, THINK_OFF_EXTRA_BODY=switch, MAX_RETRIES="0"))
        messages = [{"role": "user", "content": "hi"}]
        for stream in (False, True, False):
            answer = c.chat(model="no-switch", messages=messages, think=False, stream=stream)
            parts = list(answer) if stream else [answer]
            assert "".join(p.message.content or "" for p in parts) == "ok"
        c.chat(model="takes-switch", messages=messages, think=False, stream=False)
    sent = [("chat_template_kwargs" in r, r["model"]) for r in _SwitchRefusingBackend.requests]
    assert sent == [
        (True, "no-switch"),  # refused, remembered
        (False, "no-switch"),
        (False, "no-switch"),
        (False, "no-switch"),
        (True, "takes-switch"),  # another model still gets it
    ]


# ---- embeddings ----------------------------------------------------------------------------


def test_embed_string_and_list(proxy: ServerProcess, client: Callable[..., ollama.Client]) -> None:
    c = client(proxy)
    one = c.embed(model="demo-embed", input="hello world")
    assert len(one.embeddings) == 1
    assert len(one.embeddings[0]) == 8
    assert isinstance(one.total_duration, int)
    assert one.prompt_eval_count == 2

    texts = ["alpha", "beta gamma", "hello world", "delta"]
    many = c.embed(model="demo-embed", input=texts)
    assert len(many.embeddings) == 4
    # In order: the vector for "hello world" is the same whether alone or third in a batch,
    # and every text gets its own (deterministic, distinct) vector.
    assert many.embeddings[2] == one.embeddings[0]
    assert len({tuple(v) for v in many.embeddings}) == 4
    for text, vector in zip(texts, many.embeddings, strict=True):
        assert c.embed(model="demo-embed", input=text).embeddings[0] == vector


def test_a_batch_past_openai_s_cap_is_embedded_whole_and_in_order(
    proxy: ServerProcess, demo_backend: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """Ollama takes any number of inputs; OpenAI (and the demo backend) at most 2,048 in
    one request. LangChain's embed_documents sends every text at once."""
    texts = [f"text {i} " + "word " * (i % 3) for i in range(4_100)]
    too_many = httpx.post(
        demo_backend.url + "/embeddings",
        json={"model": "demo-embed", "input": texts},
        timeout=30,
    )
    assert too_many.status_code == 400  # what the proxy must not send
    c = client(proxy)
    reply = c.embed(model="demo-embed", input=texts)
    assert len(reply.embeddings) == len(texts)
    for i in (0, 2_047, 2_048, 4_095, 4_096, 4_099):  # across the batches' seams
        assert reply.embeddings[i] == c.embed(model="demo-embed", input=texts[i]).embeddings[0]
    words = sum(len(text.split()) for text in texts)
    assert reply.prompt_eval_count == words  # summed over the batches
    legacy = httpx.post(
        proxy.url + "/api/embeddings",
        json={"model": "demo-embed", "input": texts},
        timeout=30,
    ).json()
    assert legacy["embeddings"] == reply.embeddings


def test_a_batch_past_openai_s_token_cap_is_embedded_in_smaller_batches(
    proxy: ServerProcess, demo_backend: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """OpenAI (and the demo backend) also refuse more than 300,000 tokens in one request:
    1,000 chunks of 400 words, fewer than 2,048 inputs, went as one request."""
    texts = [f"chunk {i} " + "word " * 398 for i in range(1_000)]
    too_large = httpx.post(
        demo_backend.url + "/embeddings", json={"model": "demo-embed", "input": texts}, timeout=30
    )
    assert too_large.status_code == 400
    assert "max 300000 tokens per request" in too_large.json()["error"]["message"]
    direct = [
        item["embedding"]
        for start in range(0, len(texts), 100)
        for item in httpx.post(
            demo_backend.url + "/embeddings",
            json={"model": "demo-embed", "input": texts[start : start + 100]},
            timeout=30,
        ).json()["data"]
    ]
    reply = client(proxy).embed(model="demo-embed", input=texts)
    assert reply.embeddings == direct  # every vector, in input order
    assert reply.prompt_eval_count == sum(len(text.split()) for text in texts)


def test_batches_are_asked_for_at_once(proxy: ServerProcess, demo_backend: ServerProcess) -> None:
    """A large ingest is many batches; one after another they took as many round trips."""
    texts = [f"[[first_delay=0.3]] text {i}" for i in range(5_000)]  # 3 batches of inputs
    request_id = f"embed-{uuid.uuid4()}"
    reply = httpx.post(
        proxy.url + "/api/embed",
        json={"model": "demo-embed", "input": texts},
        headers={"X-Request-ID": request_id},
        timeout=30,
    )
    assert reply.status_code == 200
    assert len(reply.json()["embeddings"]) == 5_000
    asked = demo_events_for(demo_backend, request_id)
    assert len(asked) == 3
    assert max(e["started"] for e in asked) < min(e["ended"] for e in asked)  # overlapping


def test_a_refused_batch_stops_the_others(proxy: ServerProcess) -> None:
    """The first failure is the answer: a batch still running is not waited for."""
    texts = ["[[first_delay=10]] slow"] + ["fine"] * 2_047 + ["[[status=400]] refused"]
    started = time.monotonic()
    reply = httpx.post(
        proxy.url + "/api/embed", json={"model": "demo-embed", "input": texts}, timeout=30
    )
    assert time.monotonic() - started < 8  # not the slow batch's 10 s
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("inputs 2048-2048 of 2049 (batch 2 of 2): ")


def test_a_refused_batch_says_which_inputs_it_held(proxy: ServerProcess) -> None:
    texts = ["fine"] * 2_048 + ["[[status=400]] refused", "also"]
    reply = httpx.post(
        proxy.url + "/api/embed", json={"model": "demo-embed", "input": texts}, timeout=30
    )
    assert reply.status_code == 400
    assert reply.json()["error"].startswith("inputs 2048-2049 of 2050 (batch 2 of 2): ")


def test_the_batches_answers_are_bounded_together(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """Each batch's answer was bounded by MAX_RESPONSE_BYTES, their sum by nothing: the
    proxy holds every answer until the last, so 50 batches could hold 50 times the bound."""
    texts = [f"text {i}" for i in range(2_048)]
    one_batch = httpx.post(
        demo_backend.url + "/embeddings",
        json={"model": "demo-embed", "input": texts, "encoding_format": "float"},
        timeout=30,
    )
    limit = int(len(one_batch.content) * 1.5)  # one batch fits, two do not
    proxy = start_proxy(demo_backend.url, MAX_RESPONSE_BYTES=str(limit))
    body = {"model": "demo-embed", "input": texts}
    assert httpx.post(proxy.url + "/api/embed", json=body, timeout=30).status_code == 200
    reply = httpx.post(
        proxy.url + "/api/embed", json={**body, "input": texts + texts[:1_500]}, timeout=30
    )
    assert reply.status_code == 502
    assert "MAX_RESPONSE_BYTES" in reply.json()["error"]


def test_batches_over_the_bound_together_count_one_upstream_error(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """Batches asked for at once whose answers came in the same moment each counted the
    bound's failure: 1-3 protocol errors per refused request instead of one."""
    proxy = start_proxy(demo_backend.url, MAX_RESPONSE_BYTES="700")
    texts = [f"chunk {i} " + "x" * 150_000 for i in range(8)]  # 4 batches of ~470 B answers

    def protocol_errors() -> float:
        text = httpx.get(proxy.url + "/metrics", timeout=10).text
        found = re.search(
            r'^trioproxy_upstream_errors_total\{reason="protocol"\} (\S+)$', text, re.M
        )
        return float(found[1]) if found else 0.0

    before = protocol_errors()
    for _ in range(6):
        reply = httpx.post(
            proxy.url + "/api/embed", json={"model": "demo-embed", "input": texts}, timeout=30
        )
        assert reply.status_code == 502
        assert "larger than 700 bytes together" in reply.json()["error"]
    assert protocol_errors() - before == 6


def test_legacy_embeddings(proxy: ServerProcess, client: Callable[..., ollama.Client]) -> None:
    c = client(proxy)
    legacy = c.embeddings(model="demo-embed", prompt="hello world")
    assert len(legacy.embedding) == 8
    assert list(legacy.embedding) == c.embed(model="demo-embed", input="hello world").embeddings[0]


def test_empty_input_gets_no_vectors_as_from_ollama(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """Vector stores send empty batches; Ollama answers them (and an empty prompt on the
    legacy endpoint, which loads the model) with no vectors, for a model it has."""
    c = client(proxy)
    for empty in ([], ""):
        reply = c.embed(model="demo-embed", input=empty)
        assert reply.embeddings == [] and reply.model == "demo-embed"
    assert list(c.embeddings(model="demo-embed", prompt="").embedding) == []
    # the client leaves a None prompt out of the body: still an empty prompt to Ollama
    assert list(c.embeddings(model="demo-embed").embedding) == []
    no_input = httpx.post(proxy.url + "/api/embed", json={"model": "demo-embed"}, timeout=10)
    assert no_input.status_code == 200 and no_input.json()["embeddings"] == []
    for call in (
        lambda: c.embed(model="no-such-model", input=[]),
        lambda: c.embeddings(model="no-such-model", prompt=""),
    ):
        with pytest.raises(ollama.ResponseError) as info:
            call()
        assert info.value.status_code == 404
        assert info.value.error == 'model "no-such-model" not found, try pulling it first'


@pytest.mark.parametrize("refuses", [False, True])
def test_embed_dimensions_are_as_many_as_asked_for_whatever_the_backend_does(
    start_proxy: Callable[..., ServerProcess],
    client: Callable[..., ollama.Client],
    refuses: bool,
) -> None:
    """Ollama cuts each vector to ``dimensions`` and scales it back to unit length, for
    any model: a vector store sized for that many gets that many. A backend that ignores
    the field (llama.cpp's server) answered its full length, one that refuses it (OpenAI
    for a model without it, vLLM for one without Matryoshka) a 400: the proxy cuts the
    vectors as Ollama does, asking such a model without the field from its first refusal."""
    FullLengthEmbeddings.refuses, FullLengthEmbeddings.asked = refuses, []
    with serving(FullLengthEmbeddings) as url:
        c = client(start_proxy(url, MAX_RETRIES="0"))
        for _ in range(2):
            answer = c.embed("demo-embed", ["alpha", "beta"], dimensions=4)
            assert [v == pytest.approx([0.5] * 4) for v in answer.embeddings] == [True, True]
        assert len(c.embed("demo-embed", "alpha", dimensions=16).embeddings[0]) == 8  # longer
        assert c.embed("demo-embed", "alpha").embeddings == [FULL_LENGTH_VECTOR]
    sent = [body.get("dimensions") for body in FullLengthEmbeddings.asked]
    assert sent == ([4, None, None, None, None] if refuses else [4, 4, 16, None])


async def test_async_embed(
    proxy: ServerProcess, aclient: Callable[..., ollama.AsyncClient]
) -> None:
    c = aclient(proxy)
    result = await c.embed(model="demo-embed", input=["a", "b"])
    assert len(result.embeddings) == 2


# ---- model info ----------------------------------------------------------------------------


def test_list_show_ps(proxy: ServerProcess, client: Callable[..., ollama.Client]) -> None:
    c = client(proxy)
    listed = c.list()
    names = [m.model for m in listed.models]
    # Ollama's spelling: a name without a tag is NAME:latest
    assert {"demo-chat:latest", "demo-reasoner:latest", "demo-embed:latest"} <= set(names)
    for entry in listed.models:
        assert entry.model
        assert entry.modified_at is not None
        assert entry.details is not None

    shown = c.show("demo-chat")
    assert shown.modelinfo is not None
    assert "completion" in (shown.capabilities or [])
    assert "tools" in (shown.capabilities or [])
    assert "embedding" in (c.show("demo-embed").capabilities or [])

    running = c.ps()
    assert "demo-chat:latest" in [m.model for m in running.models]
    for entry in running.models:
        assert entry.expires_at is not None


async def test_async_list_show_ps(
    proxy: ServerProcess, aclient: Callable[..., ollama.AsyncClient]
) -> None:
    c = aclient(proxy)
    assert "demo-chat:latest" in [m.model for m in (await c.list()).models]
    assert (await c.show("demo-chat")).modelinfo is not None
    assert (await c.ps()).models


@pytest.mark.parametrize(
    ("chat", "embed"),
    [
        ("demo-chat:latest", "demo-embed:latest"),
        ("demo-chat", "demo-embed"),
        ("Demo-Chat", "DEMO-EMBED:Latest"),  # a review: Ollama ignores case, we 404ed
        ("library/demo-chat", "registry.ollama.ai/library/Demo-Embed"),  # its defaults
    ],
)
def test_a_name_is_the_same_model_with_and_without_its_latest_tag(
    proxy: ServerProcess, client: Callable[..., ollama.Client], chat: str, embed: str
) -> None:
    """Open WebUI adds ``:latest`` to every name without a tag, looks it up in
    ``/api/tags`` and sends it on every route (its unload is a generate with an empty
    prompt and ``keep_alive: 0``); as in Ollama, ``NAME`` and ``NAME:latest`` are one
    model, wherever the name is used. So are names that differ in case only, and names
    with Ollama's default registry and namespace (Ollama's ParseName and EqualFold)."""
    c = client(proxy)
    assert chat in [m.model for m in c.list().models] or chat != "demo-chat:latest"
    answer = c.chat(chat, [{"role": "user", "content": "hi"}])
    assert answer.message.content and answer.model == chat
    assert "".join(p.response for p in c.generate(chat, "hi", stream=True))
    assert c.generate(chat, "", keep_alive=0).done_reason == "unload"
    assert c.show(chat).modelinfo is not None
    assert len(c.embed(embed, ["a", "b"]).embeddings) == 2
    openai_client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    with openai_client:
        completion = openai_client.chat.completions.create(
            model=chat, messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content
    labels = httpx.get(proxy.url + "/metrics", timeout=10).text
    assert f'model="{chat}"' not in labels or chat == "demo-chat"  # one model, one label


@pytest.mark.parametrize("keep_alive", ["5m", 0, -1, "0", "-1m", 300, 1.5, "1h30m", None])
def test_every_keep_alive_the_client_takes_is_accepted_everywhere(
    proxy: ServerProcess, client: Callable[..., ollama.Client], keep_alive: float | str | None
) -> None:
    """Open WebUI, LangChain and the clients send ``keep_alive`` as a Go duration or a
    number of seconds (negative: forever): never a 400, on every route that takes it.
    With nothing to do (an empty prompt or chat) it is Ollama's load, or its unload when
    zero, answered without the backend."""
    c = client(proxy)
    zero = keep_alive in (0, "0")
    hi = [{"role": "user", "content": f"hi {marker()}"}]
    assert c.chat("demo-chat", hi, keep_alive=keep_alive).message.content
    assert c.generate("demo-chat", "hi", keep_alive=keep_alive).response
    assert c.embed("demo-embed", "hi", keep_alive=keep_alive).embeddings
    assert c.embeddings("demo-embed", "hi", keep_alive=keep_alive).embedding
    for load in (
        c.chat("demo-chat", [], keep_alive=keep_alive),
        c.generate("demo-chat", "", keep_alive=keep_alive),
        *c.generate("demo-chat", "", keep_alive=keep_alive, stream=True),
    ):
        assert load.done is True and load.done_reason == ("unload" if zero else "load")


def test_what_llama_cpps_server_lists_reaches_show_and_list(
    start_proxy: Callable[..., ServerProcess], client: Callable[..., ollama.Client]
) -> None:
    """llama.cpp's server lists a model's GGUF metadata under ``meta``: its trained
    context (where Zed, Continue and VS Code's Copilot read the context window), its
    embedding length, parameter count and file size, as Ollama reports them from the
    same GGUF. They were left out: clients sized every prompt by their own default. (Not
    on /api/ps, whose context_length is the window served: llama.cpp's may be smaller.)"""
    with serving(LlamaCppModels) as url:
        c = client(start_proxy(url, MAX_RETRIES="0"))
        chat, embed = c.show("demo-chat"), c.show("demo-embed")
        assert chat.modelinfo == {
            "general.architecture": "demo",
            "general.parameter_count": 8030261248,
            "demo.context_length": 131072,
            "demo.embedding_length": 4096,
        }
        assert embed.modelinfo is not None and embed.modelinfo["demo.embedding_length"] == 768
        assert chat.details is not None and chat.details.parameter_size == "8.0B"
        assert embed.details is not None and embed.details.parameter_size == "137M"
        listed = {m.model: m for m in c.list().models}
        assert listed["demo-chat:latest"].size == 4912898304
        assert listed["demo-embed:latest"].details.parameter_size == "137M"  # type: ignore[union-attr]


def test_pulling_a_model_the_backend_serves_succeeds(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """Apps and scripts make sure of a model by pulling it before they use it (ollama's
    pull example, @langchain/ollama's ``checkOrPullModel``, start-up scripts): for a model
    the backend serves the pull succeeds, as Ollama's does for one already pulled, by
    Ollama's name rules; one it does not serve is Ollama's 404. A 501 failed them all."""
    c = client(proxy)
    assert c.pull("demo-chat").status == "success"
    progress = list(c.pull("library/Demo-Chat:latest", stream=True))
    assert [p.status for p in progress] == ["pulling manifest", "success"]
    for streamed in (False, True):
        with pytest.raises(ollama.ResponseError) as info:
            result = c.pull("no-such-model", stream=streamed)
            if streamed:
                list(result)  # type: ignore[arg-type]
        assert info.value.status_code == 404
        assert info.value.error.startswith("model 'no-such-model' not found")
    assert c.ps().models  # the client goes on with the model


async def test_async_pull(proxy: ServerProcess, aclient: Callable[..., ollama.AsyncClient]) -> None:
    c = aclient(proxy)
    assert (await c.pull("demo-embed")).status == "success"
    assert [p.status async for p in await c.pull("demo-embed", stream=True)][-1] == "success"


# ---- errors --------------------------------------------------------------------------------


def test_unknown_model_is_404(proxy: ServerProcess, client: Callable[..., ollama.Client]) -> None:
    """In Ollama's words (tools match them), whatever the backend said."""
    c = client(proxy)
    hi = [{"role": "user", "content": "hi"}]
    calls: list[tuple[Callable[[], Any], bool]] = [
        (lambda: c.chat(model="no-such-model", messages=hi), False),
        (lambda: c.chat(model="no-such-model", messages=hi, stream=True), True),
        (lambda: c.generate(model="no-such-model", prompt="hi"), False),
        (lambda: c.generate(model="no-such-model", prompt="hi", stream=True), True),
        (lambda: c.embed(model="no-such-model", input="hi"), False),
        (lambda: c.embeddings(model="no-such-model", prompt="hi"), False),
    ]
    for call, streamed in calls:
        with pytest.raises(ollama.ResponseError) as info:
            result = call()
            if streamed:
                list(result)  # a stream raises when it is iterated
        assert info.value.error == 'model "no-such-model" not found, try pulling it first'
        assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        c.show("no-such-model")
    assert info.value.error == "model 'no-such-model' not found"  # as Ollama's show says it


async def test_async_unknown_model_is_404(
    proxy: ServerProcess, aclient: Callable[..., ollama.AsyncClient]
) -> None:
    c = aclient(proxy)
    with pytest.raises(ollama.ResponseError) as info:
        await c.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404


@pytest.mark.parametrize("stream", [False, True])
def test_backend_503_is_response_error_503(
    proxy_no_retry: ServerProcess,
    stream: bool,
    demo_events: Callable[[], list[dict]],
    client: Callable[..., ollama.Client],
) -> None:
    c = client(proxy_no_retry)
    messages = [{"role": "user", "content": f"[[status=503]] {marker()}"}]
    with pytest.raises(ollama.ResponseError) as info:
        result = c.chat(model="demo-chat", messages=messages, stream=stream)
        if stream:
            list(result)  # type: ignore[arg-type]
    assert info.value.status_code == 503
    assert "simulated HTTP 503" in info.value.error


def test_mid_stream_failure_is_response_error(
    proxy: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """A backend that breaks mid-stream: the client gets the text so far, then ResponseError
    (an in-band error line, status -1), never a JSON decode error."""
    c = client(proxy)
    messages = [{"role": "user", "content": f"[[drop_after=3]] {marker()}"}]
    received: list[str] = []
    with pytest.raises(ollama.ResponseError) as info:
        for part in c.chat(model="demo-chat", messages=messages, stream=True):
            received.append(part.message.content or "")
    assert "".join(received) == "Hello from the"
    assert info.value.status_code == -1
    assert "mid-stream" in info.value.error


def _outcomes(demo_backend: ServerProcess, request_id: str, count: int) -> list[str]:
    """The demo's outcomes for *request_id*, in order, once *count* requests have ended
    (the proxy notices a client that left asynchronously)."""
    deadline = time.monotonic() + 5
    while True:
        events = sorted(demo_events_for(demo_backend, request_id), key=lambda e: e["id"])
        ended = [e for e in events if e["outcome"] is not None]
        if len(ended) >= count or time.monotonic() > deadline:
            return [e["outcome"] for e in events]
        time.sleep(0.05)


SLOW = "Long story [[tokens=100]] [[delay=0.05]]"


def test_a_stream_left_early_ends_the_backend_request_and_the_client_goes_on(
    proxy: ServerProcess, demo_backend: ServerProcess, client: Callable[..., ollama.Client]
) -> None:
    """A stream left after two parts (a ``break``, then closing the generator) ends the
    backend's stream at once; the same client's next request works."""
    request_id = uuid.uuid4().hex
    c = client(proxy, headers={"X-Request-ID": request_id})
    for stream in (
        c.chat(model="demo-chat", messages=[{"role": "user", "content": SLOW}], stream=True),
        c.generate(model="demo-chat", prompt=SLOW, stream=True),
    ):
        for count, _ in enumerate(stream, 1):
            if count == 2:
                break
        stream.close()
    after = c.chat(model="demo-chat", messages=[{"role": "user", "content": "x [[tokens=3]]"}])
    assert after.message.content == "Hello from the"
    assert _outcomes(demo_backend, request_id, 3) == ["disconnected", "disconnected", "completed"]


async def test_a_cancelled_async_stream_ends_the_backend_request(
    proxy: ServerProcess, demo_backend: ServerProcess, aclient: Callable[..., ollama.AsyncClient]
) -> None:
    """A task cancelled while it reads a stream (here a trio cancel scope), or while it
    waits for the first token, ends the backend's stream; the client goes on."""
    request_id = uuid.uuid4().hex
    c = aclient(proxy, headers={"X-Request-ID": request_id})

    async def read(content: str) -> None:
        messages = [{"role": "user", "content": content}]
        async for _ in await c.chat(model="demo-chat", messages=messages, stream=True):
            pass

    for content in (SLOW, "Wait [[first_delay=5]] [[tokens=3]]"):
        with trio.move_on_after(0.3) as scope:
            await read(content)
        assert scope.cancelled_caught
    after = await c.chat(
        model="demo-chat", messages=[{"role": "user", "content": "x [[tokens=3]]"}]
    )
    assert after.message.content == "Hello from the"
    outcomes = await trio.to_thread.run_sync(_outcomes, demo_backend, request_id, 3)
    assert outcomes == ["disconnected", "disconnected", "completed"]


class _EmojiSplittingBackend(ScriptedHandler):
    """A backend that cuts text by UTF-16 units: each emoji's two halves in two chunks,
    each a lone JSON escape (valid JSON, no UTF-8 spelling alone)."""

    PIECES = ('"hi \\ud83d"', '"\\ude00 there \\ud83d"', '"\\ude01"', '"!"')

    def do_POST(self) -> None:
        self.json_body()
        events = [
            '{"choices":[{"index":0,"delta":{"content":' + piece + '},"logprobs":null,'
            '"finish_reason":null}]}'
            for piece in self.PIECES
        ]
        events.append('{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
        body = "".join(f"data: {event}\n\n" for event in events) + "data: [DONE]\n\n"
        self.answer(200, body.encode(), "text/event-stream")


@pytest.mark.parametrize("api", ["chat", "generate"])
def test_an_emoji_the_backend_cuts_in_two_reaches_ollama_python_whole(
    start_proxy: Callable[..., ServerProcess], client: Callable[..., ollama.Client], api: str
) -> None:
    """ollama-python decodes each NDJSON line on its own: a line holding half a surrogate
    pair gave it a lone surrogate (printing it raised UnicodeEncodeError), where
    JavaScript clients join the halves. Every line now holds whole characters."""
    with serving(_EmojiSplittingBackend) as url:
        c = client(start_proxy(url))
        if api == "chat":
            parts = list(
                c.chat(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
            )
            texts = [p.message.content or "" for p in parts]
        else:
            parts = list(c.generate(model="m", prompt="x", stream=True))
            texts = [p.response or "" for p in parts]
    for text in texts:
        text.encode()  # a lone surrogate raises here
    assert "".join(texts) == "hi \U0001f600 there \U0001f601!"
    assert parts[-1].done is True
