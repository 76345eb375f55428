"""The LangChain integrations (``langchain-ollama`` 1.1.0, ``langchain-openai`` 1.8.1) against a
real proxy.

Every test talks over real sockets to ``python -m trioproxy`` (the ``proxy`` fixture), which
forwards to the demo backend in a third process. Only the sync LangChain API is used: its async
methods need asyncio, and pytest-trio runs async tests under trio.

Nothing here may leave 127.0.0.1: LangSmith tracing is switched off, ``OpenAIEmbeddings`` runs
with ``check_embedding_ctx_length=False`` (otherwise tiktoken downloads its vocabulary), and a
socket guard fails any test that tries to resolve or connect to another host.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_ollama import ChatOllama, OllamaEmbeddings
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from pydantic import BaseModel, Field

from trioproxy.demo.script import EMBED_DIMENSIONS, PASSAGE, REASONING, embedding

from .conftest import ServerProcess, demo_events_for
from .netguard import NetworkGuard

TOOL_REPLY_PREFIX = "Thanks! The tool returned:"


def passage(words: int) -> str:
    """The first *words* words of the demo's reply passage."""
    return " ".join(PASSAGE.split()[:words])


def server_chunks(chunks: list[AIMessageChunk]) -> list[AIMessageChunk]:
    """*chunks* without the empty ``chunk_position="last"`` marker langchain-core appends."""
    last = chunks[-1] if chunks else None
    if (
        last is not None
        and last.chunk_position == "last"
        and not last.content
        and not last.response_metadata
        and not last.usage_metadata
        and not last.tool_call_chunks
    ):
        return chunks[:-1]
    return chunks


def word_count(*texts: str) -> int:
    """The demo's prompt size: words across all message contents."""
    return sum(len(t.split()) for t in texts)


# ---- keep everything on 127.0.0.1 ----------------------------------------------------------


@pytest.fixture(autouse=True)
def local_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No LangSmith tracing, no proxies from the environment, and no connection off 127.0.0.1."""
    for name in (
        "LANGSMITH_TRACING",
        "LANGSMITH_TRACING_V2",
        "LANGCHAIN_TRACING",
        "LANGCHAIN_TRACING_V2",
        "LANGSMITH_API_KEY",
        "LANGCHAIN_API_KEY",
        "LANGSMITH_ENDPOINT",
        "LANGCHAIN_ENDPOINT",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_API_BASE",
        "OPENAI_ORG_ID",
        "OPENAI_PROXY",
        "OLLAMA_HOST",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANGSMITH_TRACING", "false")
    monkeypatch.setenv("LANGCHAIN_TRACING_V2", "false")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    guard = NetworkGuard(monkeypatch)
    yield
    assert not guard.violations, f"network access outside 127.0.0.1: {guard.violations}"


# ---- tools used by both integrations -------------------------------------------------------


class GetWeather(BaseModel):
    """Current weather for a city."""

    city: str = Field(description="City name")
    days: int = Field(description="How many days to forecast")


def add_two_numbers(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


class Greeting(BaseModel):
    """What the demo's JSON mode returns: {"message": ..., "ok": true}."""

    message: str
    ok: bool


class Person(BaseModel):
    """A structured answer with typed fields."""

    name: str
    age: int
    member: bool


# ---- HTTP plumbing owned by the tests --------------------------------------------------------


class Sent:
    """An httpx request hook: the path and JSON body of every request a client sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, request: Any) -> None:  # httpx.Request, or httpx2's for openai>=3
        body = request.read()
        self.requests.append((request.url.path, json.loads(body) if body else {}))

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [body for sent_path, body in self.requests if sent_path == path]


@pytest.fixture
def sent() -> Sent:
    return Sent()


@pytest.fixture
def transport() -> Iterator[httpx.HTTPTransport]:
    """One connection pool for the test's Ollama clients, closed at teardown.

    LangChain never closes the ``ollama.Client`` it builds (nor can it when the constructor
    raises, as validate_model_on_init does), and unclosed sockets are errors here.
    """
    pool = httpx.HTTPTransport()
    yield pool
    pool.close()


@pytest.fixture
def chat_ollama(
    proxy: ServerProcess, transport: httpx.HTTPTransport, sent: Sent
) -> Callable[..., ChatOllama]:
    def make(
        model: str = "demo-chat", headers: dict[str, str] | None = None, **kw: Any
    ) -> ChatOllama:
        return ChatOllama(
            model=model,
            base_url=proxy.url,
            client_kwargs={"timeout": 30, "headers": headers or {}},
            sync_client_kwargs={"transport": transport, "event_hooks": {"request": [sent]}},
            **kw,
        )

    return make


@pytest.fixture
def ollama_embeddings(
    proxy: ServerProcess, transport: httpx.HTTPTransport, sent: Sent
) -> Callable[..., OllamaEmbeddings]:
    def make(**kw: Any) -> OllamaEmbeddings:
        return OllamaEmbeddings(
            model="demo-embed",
            base_url=proxy.url,
            client_kwargs={"timeout": 30},
            sync_client_kwargs={"transport": transport, "event_hooks": {"request": [sent]}},
            **kw,
        )

    return make


# ---- langchain-ollama: ChatOllama ----------------------------------------------------------


def test_chat_ollama_invoke(
    chat_ollama: Callable[..., ChatOllama], demo_backend: ServerProcess, sent: Sent
) -> None:
    request_id = uuid.uuid4().hex
    llm = chat_ollama(headers={"X-Request-ID": request_id})
    prompt = "Say hello [[tokens=5]]"
    reply = llm.invoke(prompt)
    assert isinstance(reply, AIMessage)
    assert reply.content == passage(5) == "Hello from the trioproxy demo"
    assert reply.tool_calls == []

    meta = reply.response_metadata
    assert meta["done"] is True
    assert meta["done_reason"] == "stop"
    assert meta["model"] == meta["model_name"] == "demo-chat"
    assert meta["model_provider"] == "ollama"
    assert meta["prompt_eval_count"] == word_count(prompt)
    assert meta["eval_count"] == 5
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(meta[name], int), name

    usage = reply.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] == meta["prompt_eval_count"]
    assert usage["output_tokens"] == meta["eval_count"] == 5
    assert usage["total_tokens"] == usage["input_tokens"] + 5

    # ChatOllama always streams, even for invoke() (as the API reference says).
    (body,) = sent.bodies("/api/chat")
    assert body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": prompt}]
    (event,) = demo_events_for(demo_backend, request_id)
    assert event["stream"] is True
    assert event["outcome"] == "completed"
    assert event["model"] == "demo-chat"


def test_chat_ollama_messages_and_options(
    chat_ollama: Callable[..., ChatOllama], sent: Sent
) -> None:
    """System + user messages count as prompt tokens; num_predict cuts the reply (length)."""
    llm = chat_ollama(num_predict=3, temperature=0.1, seed=7)
    messages: list[BaseMessage] = [
        SystemMessage("Be brief."),
        HumanMessage("Tell me a long story [[tokens=20]]"),
    ]
    reply = llm.invoke(messages)
    assert reply.content == passage(3)
    assert reply.response_metadata["done_reason"] == "length"
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] == 3
    assert reply.usage_metadata["input_tokens"] == word_count("Be brief.", str(messages[1].content))
    (body,) = sent.bodies("/api/chat")
    assert body["options"]["num_predict"] == 3
    assert body["options"]["seed"] == 7
    assert body["options"]["temperature"] == 0.1


def test_chat_ollama_stream(chat_ollama: Callable[..., ChatOllama]) -> None:
    llm = chat_ollama()
    prompt = "Stream please [[tokens=6]]"
    chunks = list(llm.stream(prompt))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    texts = [c.content for c in chunks if c.content]
    assert len(texts) == 6  # token by token, not buffered by the proxy
    assert "".join(str(t) for t in texts) == passage(6)

    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1
    final = with_usage[0]
    assert final is server_chunks(chunks)[-1]  # the done line is the last one from the wire
    assert final.usage_metadata == {
        "input_tokens": word_count(prompt),
        "output_tokens": 6,
        "total_tokens": word_count(prompt) + 6,
    }
    assert final.response_metadata["done_reason"] == "stop"
    assert final.response_metadata["eval_count"] == 6

    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.content == passage(6)
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] == 6


@pytest.mark.parametrize("tool", [GetWeather, add_two_numbers], ids=["pydantic", "function"])
def test_chat_ollama_bind_tools(chat_ollama: Callable[..., ChatOllama], tool: Any) -> None:
    llm = chat_ollama().bind_tools([tool])
    question = HumanMessage("Use the tool, please.")
    reply = llm.invoke([question])
    assert isinstance(reply, AIMessage)
    (call,) = reply.tool_calls
    if tool is GetWeather:
        assert call["name"] == "GetWeather"
        assert call["args"] == {"city": "demo", "days": 1}
        assert GetWeather(**call["args"]).city == "demo"
    else:
        assert call["name"] == "add_two_numbers"
        assert call["args"] == {"a": 1, "b": 1}
        assert add_two_numbers(**call["args"]) == 2
    assert isinstance(call["id"], str) and call["id"]
    assert reply.content == ""
    assert reply.response_metadata["done_reason"] == "stop"  # tool_calls maps to stop
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] > 0

    # Send the result back: the history (assistant tool call + tool message) is translated to
    # OpenAI form and the demo answers with text quoting the tool output.
    follow = llm.invoke([question, reply, ToolMessage("sunny, 22 C", tool_call_id=call["id"])])
    assert follow.tool_calls == []
    assert follow.content == f"{TOOL_REPLY_PREFIX} sunny, 22 C"


def test_chat_ollama_stream_tool_call_arrives_whole(chat_ollama: Callable[..., ChatOllama]) -> None:
    llm = chat_ollama().bind_tools([GetWeather])
    chunks = list(llm.stream("Weather in Paris?"))
    with_calls = [c for c in chunks if c.tool_calls]
    assert len(with_calls) == 1, "the tool call must arrive as ONE chunk"
    (call,) = with_calls[0].tool_calls
    assert call["name"] == "GetWeather"
    assert call["args"] == {"city": "demo", "days": 1}
    final = server_chunks(chunks)[-1]
    assert final.response_metadata["done"] is True
    assert final.response_metadata["done_reason"] == "stop"
    assert final.usage_metadata is not None and final.usage_metadata["output_tokens"] > 0


@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_chat_ollama_structured_output(
    chat_ollama: Callable[..., ChatOllama], sent: Sent, method: str
) -> None:
    """json_schema sends format=<schema> (the proxy makes it response_format json_schema and the
    demo fills the schema), json_mode sends format="json" (the demo answers JSON mode with a
    fixed object), function_calling binds the schema as a tool."""
    schema: type[BaseModel] = Greeting if method == "json_mode" else Person
    llm = chat_ollama().with_structured_output(schema, method=method)  # type: ignore[arg-type]
    result = llm.invoke("Answer in JSON.")
    (body,) = sent.bodies("/api/chat")
    if method == "json_mode":
        assert body["format"] == "json"
        assert result == Greeting(message="hello from the demo backend", ok=True)
    else:
        assert result == Person(name="demo", age=1, member=True)
        if method == "json_schema":
            assert body["format"]["properties"].keys() == {"name", "age", "member"}
        else:
            assert [t["function"]["name"] for t in body["tools"]] == ["Person"]


def test_chat_ollama_structured_output_include_raw(chat_ollama: Callable[..., ChatOllama]) -> None:
    llm = chat_ollama().with_structured_output(Person, include_raw=True)
    result = llm.invoke("Answer in JSON.")
    assert isinstance(result, dict)
    assert result["parsing_error"] is None
    assert result["parsed"] == Person(name="demo", age=1, member=True)
    raw = result["raw"]
    assert isinstance(raw, AIMessage)
    assert raw.usage_metadata is not None and raw.usage_metadata["output_tokens"] > 0


def test_chat_ollama_reasoning(chat_ollama: Callable[..., ChatOllama], sent: Sent) -> None:
    prompt = "Think first [[tokens=4]]"
    llm = chat_ollama(model="demo-reasoner", reasoning=True)
    reply = llm.invoke(prompt)
    assert sent.bodies("/api/chat")[0]["think"] is True
    assert reply.content == passage(4)
    assert reply.additional_kwargs["reasoning_content"] == REASONING
    assert REASONING not in str(reply.content)
    assert reply.usage_metadata is not None
    # The demo counts reasoning tokens as completion tokens (as OpenAI does).
    assert reply.usage_metadata["output_tokens"] == 4 + len(REASONING.split())

    chunks = list(llm.stream(prompt))
    thinking = "".join(c.additional_kwargs.get("reasoning_content", "") for c in chunks)
    answer = "".join(str(c.content) for c in chunks)
    assert thinking == REASONING
    assert answer == passage(4)
    # Reasoning and answer travel in separate chunks, reasoning first.
    assert not any(c.content and c.additional_kwargs.get("reasoning_content") for c in chunks)
    first_answer = next(i for i, c in enumerate(chunks) if c.content)
    last_thought = max(i for i, c in enumerate(chunks) if c.additional_kwargs)
    assert last_thought < first_answer

    # Per call: reasoning=False is sent as think=false; the answer carries no thinking (the demo
    # still reasons, and LangChain drops message.thinking unless reasoning is truthy).
    plain = chat_ollama(model="demo-reasoner").invoke(prompt, reasoning=False)
    assert sent.bodies("/api/chat")[-1]["think"] is False
    assert plain.content == passage(4)
    assert "reasoning_content" not in plain.additional_kwargs


def test_chat_ollama_validate_model_on_init(
    chat_ollama: Callable[..., ChatOllama], sent: Sent
) -> None:
    for model in ("demo-chat", "demo-reasoner"):
        llm = chat_ollama(model=model, validate_model_on_init=True)
        assert llm.invoke("Hi [[tokens=2]]").content == passage(2)
    assert [path for path, _ in sent.requests].count("/api/tags") == 2

    with pytest.raises(ValueError, match=r"Model `no-such-model` not found in Ollama") as info:
        chat_ollama(model="no-such-model", validate_model_on_init=True)
    assert "demo-chat" in str(info.value)  # the available models come from /api/tags


def test_chat_ollama_unknown_model_without_validation(
    chat_ollama: Callable[..., ChatOllama],
) -> None:
    llm = chat_ollama(model="no-such-model")
    with pytest.raises(ollama.ResponseError) as info:
        llm.invoke("hi")
    assert info.value.status_code == 404
    assert "no-such-model" in info.value.error


# ---- langchain-ollama: OllamaEmbeddings ----------------------------------------------------


def test_ollama_embeddings(ollama_embeddings: Callable[..., OllamaEmbeddings], sent: Sent) -> None:
    emb = ollama_embeddings()
    query = emb.embed_query("hello world")
    # OllamaEmbeddings sends every option, the unset ones as explicit nulls; the proxy takes it.
    (body,) = sent.bodies("/api/embed")
    assert body["input"] == ["hello world"]
    assert body["options"] and all(v is None for v in body["options"].values())
    assert len(query) == EMBED_DIMENSIONS
    assert query == embedding("hello world", EMBED_DIMENSIONS)

    texts = ["alpha", "beta gamma", "hello world", "delta"]
    docs = emb.embed_documents(texts)
    assert len(docs) == len(texts)
    assert all(len(v) == EMBED_DIMENSIONS for v in docs)
    assert docs[2] == query  # in order
    assert docs == [embedding(t, EMBED_DIMENSIONS) for t in texts]


def test_ollama_embeddings_empty_list(ollama_embeddings: Callable[..., OllamaEmbeddings]) -> None:
    """Ollama answers /api/embed with no input (``[]`` or ``""``) with 200 and
    ``{"embeddings": []}`` (server/routes.go EmbedHandler: ``len(input) == 0``), so
    ``embed_documents([])`` returns ``[]`` against real Ollama (vector stores call it with
    empty batches). OpenAI backends reject an empty ``input`` with 400, so the proxy must answer
    this case itself instead of forwarding it."""
    assert ollama_embeddings().embed_documents([]) == []


def test_ollama_embeddings_dimensions(
    ollama_embeddings: Callable[..., OllamaEmbeddings],
) -> None:
    emb = ollama_embeddings(dimensions=4)
    (vector,) = emb.embed_documents(["hello"])
    assert vector == embedding("hello", 4)


# ---- langchain-openai: ChatOpenAI ----------------------------------------------------------


@pytest.fixture
def openai_http(sent: Sent) -> Iterator[openai.DefaultHttpxClient]:
    """The HTTP client for the test's OpenAI objects, closed at teardown (by default
    langchain-openai shares a process-wide cached client that is never closed)."""
    client = openai.DefaultHttpxClient(timeout=30, event_hooks={"request": [sent]})
    yield client
    client.close()


@pytest.fixture
def chat_openai(
    proxy: ServerProcess, openai_http: openai.DefaultHttpxClient
) -> Callable[..., ChatOpenAI]:
    def make(model: str = "demo-chat", **kw: Any) -> ChatOpenAI:
        return ChatOpenAI(
            model=model,
            base_url=proxy.url + "/v1",
            api_key="x",  # type: ignore[arg-type]
            max_retries=0,
            timeout=30,
            http_client=openai_http,
            **kw,
        )

    return make


def test_chat_openai_invoke(chat_openai: Callable[..., ChatOpenAI]) -> None:
    prompt = "Say hello [[tokens=5]]"
    reply = chat_openai().invoke(prompt)
    assert isinstance(reply, AIMessage)
    assert reply.content == passage(5)
    meta = reply.response_metadata
    assert meta["finish_reason"] == "stop"
    assert meta["model_name"] == "demo-chat"
    assert meta["model_provider"] == "openai"
    assert meta["token_usage"]["completion_tokens"] == 5
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["input_tokens"] == word_count(prompt)
    assert reply.usage_metadata["output_tokens"] == 5
    assert reply.usage_metadata["total_tokens"] == word_count(prompt) + 5
    assert isinstance(reply.id, str) and reply.id


def test_chat_openai_on_the_responses_api(chat_openai: Callable[..., ChatOpenAI]) -> None:
    """``use_responses_api=True``: LangChain speaks /v1/responses, whole and streamed."""
    prompt = "Say hello [[tokens=5]]"
    llm = chat_openai(use_responses_api=True)
    reply = llm.invoke(prompt)
    assert reply.text == passage(5)
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] == 5
    assert reply.usage_metadata["input_tokens"] == word_count(prompt)
    chunks = list(llm.stream(prompt))
    assert "".join(c.text for c in chunks) == passage(5)
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) == 5


def test_chat_openai_stream_usage(chat_openai: Callable[..., ChatOpenAI]) -> None:
    prompt = "Count me [[tokens=5]]"
    llm = chat_openai(stream_usage=True)
    chunks = list(llm.stream(prompt))
    assert "".join(str(c.content) for c in chunks) == passage(5)
    assert len([c for c in chunks if c.content]) == 5

    with_usage = [c for c in chunks if c.usage_metadata]
    assert len(with_usage) == 1
    assert with_usage[0].usage_metadata == {
        "input_tokens": word_count(prompt),
        "output_tokens": 5,
        "total_tokens": word_count(prompt) + 5,
        "input_token_details": {},
        "output_token_details": {},
    }
    finished = [c for c in chunks if c.response_metadata.get("finish_reason")]
    assert [c.response_metadata["finish_reason"] for c in finished] == ["stop"]

    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.content == passage(5)
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] == 5


def test_chat_openai_max_tokens_sent_as_max_completion_tokens(
    chat_openai: Callable[..., ChatOpenAI], sent: Sent
) -> None:
    """langchain-openai (1.7.4 on) turns max_tokens into max_completion_tokens; the proxy
    forwards it as written and the demo honours it: the reply is cut at N tokens with
    finish_reason=length."""
    llm = chat_openai(max_tokens=3)
    reply = llm.invoke("A long story [[tokens=30]]")
    (body,) = sent.bodies("/v1/chat/completions")
    assert body["max_completion_tokens"] == 3
    assert "max_tokens" not in body
    assert reply.content == passage(3)
    assert reply.response_metadata["finish_reason"] == "length"
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 3

    streamed = list(chat_openai(max_tokens=3, stream_usage=True).stream("Long [[tokens=30]]"))
    body = sent.bodies("/v1/chat/completions")[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 3
    assert "".join(str(c.content) for c in streamed) == passage(3)
    reasons = [
        c.response_metadata["finish_reason"]
        for c in streamed
        if c.response_metadata.get("finish_reason")
    ]
    assert reasons == ["length"]
    usage = [c.usage_metadata for c in streamed if c.usage_metadata]
    assert len(usage) == 1 and usage[0]["output_tokens"] == 3


@pytest.mark.parametrize("tool", [GetWeather, add_two_numbers], ids=["pydantic", "function"])
def test_chat_openai_bind_tools(chat_openai: Callable[..., ChatOpenAI], tool: Any) -> None:
    llm = chat_openai().bind_tools([tool])
    question = HumanMessage("Use the tool, please.")
    reply = llm.invoke([question])
    assert isinstance(reply, AIMessage)
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    (call,) = reply.tool_calls
    expected = (
        ("GetWeather", {"city": "demo", "days": 1})
        if tool is GetWeather
        else ("add_two_numbers", {"a": 1, "b": 1})
    )
    assert (call["name"], call["args"]) == expected
    assert isinstance(call["id"], str) and call["id"]
    assert reply.invalid_tool_calls == []

    follow = llm.invoke([question, reply, ToolMessage("rain", tool_call_id=call["id"])])
    assert follow.tool_calls == []
    assert follow.content == f"{TOOL_REPLY_PREFIX} rain"


@pytest.mark.parametrize("responses_api", [False, True], ids=["chat", "responses"])
def test_chat_openai_stream_tool_call(
    chat_openai: Callable[..., ChatOpenAI], responses_api: bool
) -> None:
    """On the Responses API since langchain-openai 1.8.1 a
    ``response.function_call_arguments.done`` whose arguments go past the deltas streamed
    for its item (matched by ``item_id``, the added item's ``id``) adds the rest as one more
    chunk: events naming the item inconsistently would double the arguments."""
    llm = chat_openai(use_responses_api=responses_api).bind_tools([GetWeather])
    chunks = list(llm.stream("Weather in Paris?"))
    assert len([c for c in chunks if c.tool_call_chunks]) >= 2  # arguments arrive in fragments
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert isinstance(total, AIMessageChunk)
    (call,) = total.tool_calls
    assert call["name"] == "GetWeather"
    assert call["args"] == {"city": "demo", "days": 1}


@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_chat_openai_structured_output(chat_openai: Callable[..., ChatOpenAI], method: str) -> None:
    schema: type[BaseModel] = Greeting if method == "json_mode" else Person
    llm = chat_openai().with_structured_output(schema, method=method)  # type: ignore[arg-type]
    result = llm.invoke("Answer in JSON.")
    if method == "json_mode":
        assert result == Greeting(message="hello from the demo backend", ok=True)
    else:
        assert result == Person(name="demo", age=1, member=True)


def test_chat_openai_unknown_model(chat_openai: Callable[..., ChatOpenAI]) -> None:
    for stream in (False, True):
        llm = chat_openai(model="no-such-model", streaming=stream)
        with pytest.raises(openai.NotFoundError) as info:
            llm.invoke("hi")
        assert info.value.status_code == 404
        assert "no-such-model" in info.value.message


# ---- langchain-openai: OpenAIEmbeddings ----------------------------------------------------


def test_openai_embeddings(proxy: ServerProcess, openai_http: openai.DefaultHttpxClient) -> None:
    emb = OpenAIEmbeddings(
        model="demo-embed",
        base_url=proxy.url + "/v1",
        api_key="x",  # type: ignore[arg-type]
        max_retries=0,
        timeout=30,
        http_client=openai_http,
        check_embedding_ctx_length=False,  # no tiktoken, so no vocabulary download
    )
    texts = ["alpha", "beta gamma", "hello world"]
    docs = emb.embed_documents(texts)
    assert len(docs) == len(texts)
    assert all(len(v) == EMBED_DIMENSIONS for v in docs)
    assert docs == [embedding(t, EMBED_DIMENSIONS) for t in texts]
    assert emb.embed_query("hello world") == docs[2]
