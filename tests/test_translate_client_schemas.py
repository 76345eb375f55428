"""The translation layer against the client libraries' own schemas.

Requests are written by the real ollama-python client (its pydantic ``ChatRequest``,
``GenerateRequest``, ``EmbedRequest``, ``Message``, ``Tool``, ``Options`` and ``Image``
serialise them, caught by an ``httpx.MockTransport`` before any socket), translated, and the
payload meant for the backend is checked against the openai package's own request
``TypedDict``s (``CompletionCreateParams``, ``EmbeddingCreateParams``), strictly, unknown keys
refused. Answers are built with the openai package's pydantic models (``ChatCompletion``,
``ChatCompletionChunk``, ``Completion``, ``CreateEmbeddingResponse``, ``Model``) and dumped as
a backend sends them (``exclude_unset``: explicit nulls kept), translated, and read by
ollama-python's own client (the same MockTransport answering with the translated lines) or
its response models.

tests/test_protocol_properties.py holds the hand-written shapes (odd JSON, relay reads); this
file holds what each library says a valid message is. Deterministic (``derandomize``);
PROPERTY_EXAMPLES=5000 to hunt with fresh randomness.
"""

from __future__ import annotations

import collections.abc
import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator
from types import UnionType
from typing import (
    Annotated,
    Any,
    Literal,
    NotRequired,
    Required,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import httpx
import ollama
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ollama._types import (
    ChatResponse,
    EmbeddingsResponse,
    EmbedResponse,
    GenerateResponse,
    Image,
    ListResponse,
    Message,
    Options,
    ProcessResponse,
    ShowResponse,
    Tool,
)
from openai.types import Completion, CreateEmbeddingResponse, embedding_create_params
from openai.types import Model as OpenAIModel
from openai.types import completion_create_params as legacy_params
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat import completion_create_params as chat_params
from pydantic import BaseModel, ConfigDict, TypeAdapter
from typing_extensions import TypedDict, is_typeddict

from trioproxy.jsonutil import compact_json, loads
from trioproxy.model_mapping import ModelMapper, with_default_tag
from trioproxy.translate import (
    MAX_TOP_LOGPROBS,
    OllamaCompletionStreamTranslator,
    OllamaStreamTranslator,
    RequestValidationError,
    Timings,
    embed_batches,
    ollama_chat_to_openai,
    ollama_embed_to_openai,
    ollama_embeddings_input,
    ollama_embeddings_to_openai,
    ollama_generate_to_completions,
    ollama_generate_to_openai,
    ollama_ps,
    ollama_show,
    openai_chat_to_ollama_chat,
    openai_chat_to_ollama_generate,
    openai_completion_to_ollama_generate,
    openai_embeddings_to_ollama_embed,
    openai_embeddings_to_ollama_embeddings,
    openai_models_to_ollama_tags,
    read_chunk,
    validate_ollama_chat,
    validate_ollama_embed,
    validate_ollama_embeddings,
    validate_ollama_generate,
)

_HUNT = "PROPERTY_EXAMPLES" in os.environ


def _examples(default: int) -> settings:
    """Few examples, the same every run (CI); PROPERTY_EXAMPLES=N to hunt at random."""
    return settings(
        max_examples=int(os.environ.get("PROPERTY_EXAMPLES", default)),
        deadline=None,
        derandomize=not _HUNT,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


REQUESTS = _examples(100)
ANSWERS = _examples(100)

# =============================================================================================
# The openai package's request schemas, strict, unknown keys refused
# =============================================================================================


def _strict(typed_dict: Any) -> Callable[[bytes], Any]:
    """A checker of a JSON request body against one of openai's request ``TypedDict``s: no
    coercion (a number is no string), no key the type does not name."""
    # a TypedDict takes no config of its own: a list of them does, and passes it down
    adapter = TypeAdapter(list[_eager(typed_dict)], config=ConfigDict(extra="forbid", strict=True))

    def check(body: bytes) -> Any:
        return adapter.validate_json(b"[" + body + b"]")[0]

    return check


def _eager(hint: Any) -> Any:
    """``hint`` with each ``Iterable[X]`` a ``list[X]``, through TypedDicts, unions and the
    rest. pydantic checks an Iterable lazily, and in a union it prefers the lazy branch:
    ``Union[str, Iterable[Part]]`` read the string "ab" as parts, and refused them."""
    if is_typeddict(hint):
        return _eager_typed_dict(hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin is None or origin is Literal:
        return hint
    if origin is Annotated:
        return Annotated[(_eager(args[0]), *hint.__metadata__)]  # type: ignore[valid-type]
    if origin in (Required, NotRequired):
        return origin[_eager(args[0])]
    if origin in (Union, UnionType):
        # a tuple of hints: only Union[...] spells their union
        return Union[tuple(_eager(arg) for arg in args)]  # type: ignore[valid-type]  # noqa: UP007
    if origin is collections.abc.Iterable:
        return list[_eager(args[0])]  # type: ignore[misc]
    return origin[tuple(_eager(arg) for arg in args)] if args else hint


@functools.cache
def _eager_typed_dict(typed_dict: Any) -> Any:
    # openai marks each required key Required[...] (its modules' postponed annotations
    # leave __required_keys__ empty on Python 3.11)
    fields = {}
    for name, hint in get_type_hints(typed_dict, include_extras=True).items():
        required = name in typed_dict.__required_keys__
        while get_origin(hint) in (Required, NotRequired):
            required = get_origin(hint) is Required
            hint = get_args(hint)[0]
        fields[name] = Required[_eager(hint)] if required else _eager(hint)
    return TypedDict(typed_dict.__name__, fields, total=False)  # type: ignore[operator]


CHAT_STREAMING = _strict(chat_params.CompletionCreateParamsStreaming)
CHAT_NON_STREAMING = _strict(chat_params.CompletionCreateParamsNonStreaming)
LEGACY_STREAMING = _strict(legacy_params.CompletionCreateParamsStreaming)
LEGACY_NON_STREAMING = _strict(legacy_params.CompletionCreateParamsNonStreaming)
EMBEDDINGS = _strict(embedding_create_params.EmbeddingCreateParams)
RESPONSE_FORMAT = _strict(chat_params.ResponseFormat)


def _check_chat_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` as openai's ``CompletionCreateParams`` reads it (raises if it does not)."""
    check = CHAT_STREAMING if payload.get("stream") else CHAT_NON_STREAMING
    return check(compact_json(payload))  # type: ignore[no-any-return]


# =============================================================================================
# What ollama-python sends: its own client, caught before the socket
# =============================================================================================

_DONE_LINE = b'{"model":"m","created_at":"2024-01-01T00:00:00Z","done":true,'
_EMPTY_ANSWERS = {
    "/api/chat": _DONE_LINE + b'"message":{"role":"assistant","content":""}}',
    "/api/generate": _DONE_LINE + b'"response":""}',
    "/api/embed": b'{"model":"m","embeddings":[]}',
    "/api/embeddings": b'{"embedding":[]}',
}


class _MockedOllama:
    """The ollama-python client, its requests ending in an ``httpx.MockTransport``: the
    last body it posted is ``body``; it is answered with ``answer`` (the lines of an
    Ollama answer), or a finished, empty answer."""

    def __init__(self) -> None:
        self.body = b""
        self.answer: list[bytes] | None = None
        self.client = ollama.Client(
            host="http://127.0.0.1:11434", transport=httpx.MockTransport(self._reply)
        )

    def _reply(self, request: httpx.Request) -> httpx.Response:
        self.body = request.read()
        lines = self.answer or [_EMPTY_ANSWERS[request.url.path]]
        return httpx.Response(200, content=b"".join(line + b"\n" for line in lines))

    def sent(self, method: Callable[..., Any], **kwargs: Any) -> bytes:
        """The body ollama-python posts for ``method(**kwargs)``."""
        self.answer = None
        answer = method(**kwargs)
        if isinstance(answer, Iterator):
            list(answer)  # a stream is only sent once read
        return self.body

    def read(
        self, kind: str, lines: list[bytes], *, stream: bool = True
    ) -> list[ChatResponse | GenerateResponse]:
        """What ollama-python's ``chat``/``generate`` gives for these NDJSON lines: a
        stream's parts, each line read on its own (``ResponseError`` on an error line), or
        the one answer of a call without ``stream``."""
        self.answer = lines
        if kind == "chat":
            answer = self.client.chat("m", [{"role": "user", "content": "x"}], stream=stream)
        else:
            answer = self.client.generate("m", "x", stream=stream)
        return list(answer) if stream else [answer]


OLLAMA = _MockedOllama()

_PIECE = st.text(
    alphabet=st.sampled_from(["a", "b", " ", "\n", '"', "\\", "é", "世", "😀", "\u2028", "{"]),
    max_size=6,
)
_NAME = st.sampled_from(["get_weather", "search", "f", "add_two_numbers"])
_JSON_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    _PIECE,
)
_JSON_VALUE = st.recursive(
    _JSON_SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_PIECE, inner, max_size=3)
    ),
    max_leaves=6,
)
_ARGUMENTS = st.dictionaries(_PIECE, _JSON_VALUE, max_size=3)

# images as ollama-python takes them: raw bytes it encodes (a PNG, a JPEG, a GIF, a WEBP, or
# anything else)
_IMAGE = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(
        [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\x24\x00\x00\x00WEBPVP8 ", b""]
    ),
    st.binary(min_size=1, max_size=12),
)
_TOOL_CALL = st.builds(
    Message.ToolCall,
    function=st.builds(Message.ToolCall.Function, name=_NAME, arguments=_ARGUMENTS),
)
_ROLE = st.sampled_from(["system", "user", "assistant", "tool", "User", "ASSISTANT"])
_MESSAGE = st.builds(
    Message,
    role=_ROLE,
    content=st.none() | _PIECE,
    thinking=st.none() | _PIECE,
    images=st.none() | st.lists(st.builds(Image, value=_IMAGE), max_size=2),
    tool_name=st.none() | _NAME,
    tool_calls=st.none() | st.lists(_TOOL_CALL, max_size=2),
)
_PROPERTY = st.builds(
    Tool.Function.Parameters.Property,
    type=st.none() | st.sampled_from(["string", "integer", "number", "boolean", "array"]),
    description=st.none() | _PIECE,
    enum=st.none() | st.lists(_PIECE, max_size=3),
)
_PARAMETERS = st.builds(
    Tool.Function.Parameters,
    required=st.none() | st.lists(_PIECE, max_size=2),
    properties=st.none() | st.dictionaries(_PIECE, _PROPERTY, max_size=3),
    defs=st.none() | st.dictionaries(_PIECE, st.just({"type": "string"}), max_size=1),
)


def add_two_numbers(a: int, b: int) -> int:
    """
    Add two numbers.

    Args:
      a: The first number
      b: The second number

    Returns:
      int: The sum
    """
    return a + b


_TOOL = st.just(add_two_numbers) | st.builds(  # a function: ollama-python describes it
    Tool,
    # ollama-python's type is any string ("function" unless set), which Ollama does not read
    type=st.none() | st.sampled_from(["function", "Function", "custom", ""]),
    function=st.builds(
        Tool.Function,
        name=_NAME,
        description=st.none() | _PIECE,
        parameters=st.none() | _PARAMETERS,
    ),
)


def _object_schema(properties: dict[str, Any], closed: bool, required: list[str]) -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if closed:
        schema["additionalProperties"] = False
    return schema


_LEAF_SCHEMA = st.sampled_from(
    [{"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}]
)
_SCHEMA = st.recursive(
    _LEAF_SCHEMA,
    lambda inner: st.one_of(
        st.builds(lambda items: {"type": "array", "items": items}, inner),
        st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3).flatmap(
            lambda props: st.builds(
                _object_schema,
                st.just(props),
                st.booleans(),
                st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([]),
            )
        ),
    ),
    max_leaves=5,
)


class _City(BaseModel):
    name: str
    population: int | None = None


class _Country(BaseModel):
    cities: list[_City]


# ollama-python's format: "" or "json", or any JSON schema (JsonSchemaValue), a pydantic
# model's as its README shows
_FORMAT = (
    st.none()
    | st.sampled_from(["", "json", _Country.model_json_schema(), _City.model_json_schema()])
    | _SCHEMA
)
_THINK = st.none() | st.booleans() | st.sampled_from(["low", "medium", "high", "max", "none"])
_OPTIONS = st.none() | st.builds(
    Options,
    temperature=st.none() | st.floats(0, 2),
    top_p=st.none() | st.floats(0, 1),
    top_k=st.none() | st.integers(0, 100),
    frequency_penalty=st.none() | st.floats(-2, 2),
    presence_penalty=st.none() | st.floats(-2, 2),
    repeat_penalty=st.none() | st.floats(0, 2),
    seed=st.none() | st.integers(-1, 2**32),
    num_predict=st.none() | st.integers(-2, 4096),
    num_ctx=st.none() | st.integers(1, 2**17),
    stop=st.none() | st.lists(_PIECE, max_size=5),
)
# options as a plain mapping (ollama-python sends any): Ollama's names, odd values too
_OPTION_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    _PIECE,
    st.lists(_PIECE, max_size=2),
)
_OPTIONS_MAPPING = st.dictionaries(
    st.sampled_from(
        ["temperature", "top_p", "seed", "num_predict", "stop", "top_k", "presence_penalty", "x"]
    ),
    _OPTION_VALUE,
    max_size=4,
)
_KEEP_ALIVE = st.none() | st.sampled_from(["5m", "0", "1h30m", "-1"]) | st.floats(-1, 3600)
_TOP_LOGPROBS = st.none() | st.integers(-1, MAX_TOP_LOGPROBS + 2)


def _expected_refusal(think: object, top_logprobs: int | None) -> bool:
    """Whether Ollama itself refuses what the client sent (a 400 there too): a think level
    it does not know, top_logprobs out of its range."""
    unknown_level = isinstance(think, str) and think not in ("low", "medium", "high", "max")
    return unknown_level or (top_logprobs is not None and not 0 <= top_logprobs <= 20)


def _odd_option(options: object, exc: RequestValidationError) -> bool:
    """Whether ``exc`` refuses an option of a plain mapping (which ollama-python sends as
    it is) that Ollama's Go decoder refuses too: a number that is no number, a list of no
    strings."""
    return isinstance(options, dict) and (exc.field or "").startswith("options.")


def _client_body(raw: bytes) -> dict[str, Any]:
    body = loads(raw)  # as json_object reads it
    assert isinstance(body, dict)
    return body


# =============================================================================================
# Property 1: a valid ollama-python request is an OpenAI request openai's schema accepts
# (or Ollama's own 400)
# =============================================================================================


@REQUESTS
@given(
    model=st.sampled_from(["m", "llama3.2:latest", "org/model:7b-q4"]),
    messages=st.lists(_MESSAGE, max_size=5),
    tools=st.lists(_TOOL, max_size=2),
    stream=st.booleans(),
    think=_THINK,
    logprobs=st.none() | st.booleans(),
    top_logprobs=_TOP_LOGPROBS,
    fmt=_FORMAT,
    options=_OPTIONS | _OPTIONS_MAPPING,
    keep_alive=_KEEP_ALIVE,
)
def test_an_ollama_python_chat_is_a_chat_completion_openai_accepts(
    model: str,
    messages: list[Message],
    tools: list[Tool | Callable[..., Any]],
    stream: bool,
    think: Any,
    logprobs: bool | None,
    top_logprobs: int | None,
    fmt: Any,
    options: Options | dict[str, Any] | None,
    keep_alive: Any,
) -> None:
    raw = OLLAMA.sent(
        OLLAMA.client.chat,
        model=model,
        messages=messages,
        tools=tools,
        stream=stream,
        think=think,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        format=fmt,
        options=options,
        keep_alive=keep_alive,
    )
    body = _client_body(raw)
    try:
        valid = validate_ollama_chat(body)
    except RequestValidationError as exc:
        assert _expected_refusal(think, top_logprobs) or _odd_option(options, exc), exc.message
        return
    assert not _expected_refusal(think, top_logprobs)
    if not valid.get("messages"):
        return  # a load request: answered without the backend
    payload = ollama_chat_to_openai(valid, "backend/model")
    sent = _check_chat_payload(_without_orphan_tool_results(payload))
    assert sent["model"] == "backend/model"
    assert sent.get("stream") is stream
    if not isinstance(options, dict):
        _check_generation_fields(sent, _client_body(raw))
    # each call an assistant made is sent with the same arguments, as JSON text (a call on
    # another role's message, which Ollama's templates do not show, is not)
    asked = [
        call
        for m in _client_body(raw)["messages"]
        if m["role"].lower() == "assistant"
        for call in m.get("tool_calls", [])
    ]
    forwarded = [call for m in sent["messages"] for call in m.get("tool_calls", [])]
    assert [json.loads(c["function"]["arguments"]) for c in forwarded] == [
        c["function"]["arguments"] for c in asked
    ]
    assert [c["function"]["name"] for c in forwarded] == [c["function"]["name"] for c in asked]
    # every image, as a data URL of the bytes the client read
    images = [image for m in _client_body(raw)["messages"] for image in m.get("images", [])]
    urls = [
        part["image_url"]["url"]
        for m in sent["messages"]
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part["type"] == "image_url"
    ]
    assert [url.split(";base64,", 1)[1] for url in urls] == images
    assert [t["function"]["name"] for t in sent.get("tools", [])] == [
        t.__name__ if callable(t) else t.function.name for t in tools
    ]


def _without_orphan_tool_results(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` less the tool results sent without ``tool_call_id``: only those that come
    before any call. Left as they are: Ollama takes a tool result that answers no call, and
    no id would make one OpenAI takes (it refuses a tool message that follows no call)."""
    seen_call = False
    kept = []
    for message in payload["messages"]:
        seen_call = seen_call or bool(message.get("tool_calls"))
        if message["role"] == "tool" and "tool_call_id" not in message:
            assert not seen_call, message
            continue
        kept.append(message)
    return {**payload, "messages": kept}


def _check_generation_fields(sent: dict[str, Any], body: dict[str, Any]) -> None:
    """The sampling, format, think and logprobs fields as the client set them."""
    options = body.get("options") or {}
    num_predict = options.get("num_predict")
    assert sent.get("max_tokens") == (num_predict if num_predict and num_predict > 0 else None)
    for key in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        assert sent.get(key) == options.get(key)
    seed = options.get("seed")
    assert sent.get("seed") == (None if seed in (None, -1) else seed)
    assert sent.get("stop") == (options.get("stop") or None)
    fmt = body.get("format")
    if fmt == "json":
        assert sent["response_format"] == {"type": "json_object"}
    elif isinstance(fmt, dict):
        assert sent["response_format"]["json_schema"]["schema"] == fmt
    else:
        assert "response_format" not in sent
    think = body.get("think")
    assert sent.get("reasoning_effort") == (
        {"max": "high"}.get(think, think) if isinstance(think, str) else None
    )
    if body.get("logprobs"):
        assert sent["logprobs"] is True
        assert sent.get("top_logprobs") == (body.get("top_logprobs") or None)
    else:
        assert "logprobs" not in sent and "top_logprobs" not in sent


@REQUESTS
@given(
    prompt=_PIECE,
    system=_PIECE,
    images=st.none() | st.lists(_IMAGE, max_size=2),
    raw_mode=st.none() | st.booleans(),
    stream=st.booleans(),
    think=_THINK,
    logprobs=st.none() | st.booleans(),
    top_logprobs=_TOP_LOGPROBS,
    fmt=_FORMAT,
    options=_OPTIONS | _OPTIONS_MAPPING,
    keep_alive=_KEEP_ALIVE,
    context=st.none() | st.lists(st.integers(0, 2**31), max_size=3),
)
def test_an_ollama_python_generate_is_a_completion_openai_accepts(
    prompt: str,
    system: str,
    images: list[bytes] | None,
    raw_mode: bool | None,
    stream: bool,
    think: Any,
    logprobs: bool | None,
    top_logprobs: int | None,
    fmt: Any,
    options: Options | dict[str, Any] | None,
    keep_alive: Any,
    context: list[int] | None,
) -> None:
    raw = OLLAMA.sent(
        OLLAMA.client.generate,
        model="m",
        prompt=prompt,
        system=system,
        images=images,
        raw=raw_mode,
        stream=stream,
        think=think,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        format=fmt,
        options=options,
        keep_alive=keep_alive,
        context=context,
    )
    body = _client_body(raw)
    refused = _expected_refusal(think, top_logprobs) or bool(raw_mode and images)
    try:
        valid = validate_ollama_generate(body)
    except RequestValidationError as exc:
        assert refused or _odd_option(options, exc), exc.message
        return
    assert not refused
    if not valid.get("prompt"):
        return  # a load request: answered without the backend
    if raw_mode:
        payload = ollama_generate_to_completions(valid, "backend")
        # response_format is vLLM's extension of /completions, not in openai's legacy type:
        # checked against the chat type's
        response_format = payload.pop("response_format", None)
        if response_format is not None:
            RESPONSE_FORMAT(compact_json(response_format))
        check = LEGACY_STREAMING if stream else LEGACY_NON_STREAMING
        sent = check(compact_json(payload))
        assert sent["prompt"] == prompt
        if not isinstance(options, dict):
            num_predict = (options.num_predict if options else None) or 0
            assert sent["max_tokens"] == (num_predict if num_predict > 0 else None)
        if logprobs:
            assert sent["logprobs"] == (top_logprobs or 0)
        return
    sent = _check_chat_payload(ollama_generate_to_openai(valid, "backend"))
    if not isinstance(options, dict):
        _check_generation_fields(sent, body)
    texts = [
        part["text"] if isinstance(part, dict) else part
        for m in sent["messages"]
        for part in (m["content"] if isinstance(m["content"], list) else [m["content"]])
        if isinstance(part, str) or part["type"] == "text"
    ]
    assert texts == [text for text in (system, prompt) if text]


@REQUESTS
@given(
    text=st.one_of(_PIECE, st.lists(_PIECE, max_size=4)),
    truncate=st.none() | st.booleans(),
    dimensions=st.none() | st.integers(-1, 4096),
    options=_OPTIONS,
    keep_alive=_KEEP_ALIVE,
)
def test_an_ollama_python_embed_is_an_embeddings_request_openai_accepts(
    text: str | list[str],
    truncate: bool | None,
    dimensions: int | None,
    options: Options | dict[str, Any] | None,
    keep_alive: Any,
) -> None:
    raw = OLLAMA.sent(
        OLLAMA.client.embed,
        model="m",
        input=text,
        truncate=truncate,
        dimensions=dimensions,
        options=options,
        keep_alive=keep_alive,
    )
    valid = validate_ollama_embed(_client_body(raw))
    if valid.get("input") in (None, "", []):
        return  # nothing to embed: answered without the backend
    payload = ollama_embed_to_openai(valid, "backend")
    batches = embed_batches(payload)
    sent = [EMBEDDINGS(compact_json(batch)) for batch in batches]
    assert [item for batch in sent for item in batch["input"]] == (
        [text] if isinstance(text, str) else text
    )
    for batch in sent:
        assert batch.get("dimensions") == (dimensions if dimensions and dimensions > 0 else None)

    # the legacy endpoint, one prompt
    prompt = text if isinstance(text, str) else "".join(text)
    legacy = validate_ollama_embeddings(
        _client_body(OLLAMA.sent(OLLAMA.client.embeddings, model="m", prompt=prompt))
    )
    if ollama_embeddings_input(legacy) != "":
        assert EMBEDDINGS(compact_json(ollama_embeddings_to_openai(legacy, "b")))["input"] == [
            prompt
        ]


# =============================================================================================
# Property 2: any OpenAI answer, as openai's models shape it, is an Ollama answer
# ollama-python reads
# =============================================================================================

_FINISH = st.sampled_from(
    ["stop", "length", "tool_calls", "content_filter", "function_call", None, "end_turn", "eos"]
)
_COUNT = st.integers(0, 10**7)
_USAGE = st.none() | st.builds(
    lambda prompt, completion, details: {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        **(
            {
                "completion_tokens_details": {"reasoning_tokens": completion // 2},
                "prompt_tokens_details": {"cached_tokens": prompt // 3, "audio_tokens": None},
            }
            if details
            else {}
        ),
    },
    _COUNT,
    _COUNT,
    st.booleans(),
)
_TOKEN_LOGPROB = st.fixed_dictionaries(
    {
        "token": _PIECE,
        "logprob": st.floats(-100, 0),
        "bytes": st.none() | st.lists(st.integers(0, 255), max_size=4),
        "top_logprobs": st.lists(
            st.fixed_dictionaries(
                {"token": _PIECE, "logprob": st.floats(-100, 0), "bytes": st.none()}
            ),
            max_size=2,
        ),
    }
)
_REASONING_FIELD = st.sampled_from(["reasoning_content", "reasoning"])
_EXPECTED_REASON = {"stop": "stop", "length": "length", "content_filter": "content_filter"}
_TIMINGS = Timings(total_ns=3_000_000, prompt_eval_ns=1_000_000, eval_ns=2_000_000)


def _dumped(model: Any) -> dict[str, Any]:
    """An openai model as a backend's JSON: what was set, nulls set included."""
    return json.loads(model.model_dump_json(exclude_unset=True))  # type: ignore[no-any-return]


@st.composite
def chat_completions(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``ChatCompletion`` as the backend sends it, and what its answer is: content (the
    refusal after it), thinking, tool calls (name, arguments), usage counts, finish."""
    message: dict[str, Any] = {"role": "assistant", "content": draw(st.none() | _PIECE)}
    if draw(st.booleans()):
        message["refusal"] = draw(st.none() | _PIECE)
    reasoning = draw(st.none() | _PIECE)
    if reasoning is not None:
        message[draw(_REASONING_FIELD)] = reasoning
    calls = draw(st.lists(st.tuples(_NAME, _ARGUMENTS), max_size=3))
    if calls:
        message["tool_calls"] = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
            for i, (name, arguments) in enumerate(calls)
        ]
    elif draw(st.booleans()):
        # the legacy single function call
        name, arguments = draw(st.tuples(_NAME, _ARGUMENTS))
        message["function_call"] = {"name": name, "arguments": json.dumps(arguments)}
        calls = [(name, arguments)]
    logprobs = draw(st.none() | st.lists(_TOKEN_LOGPROB, max_size=3))
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "finish_reason": "stop",
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
    }
    usage = draw(_USAGE)
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": draw(st.integers(0, 2**33)),
        "model": "backend",
        "choices": [choice],
    }
    if usage is not None or draw(st.booleans()):
        body["usage"] = usage
    if draw(st.booleans()):
        body["system_fingerprint"] = draw(st.none() | st.just("fp_1"))
        body["service_tier"] = "default"
    data = _dumped(ChatCompletion.model_validate(body))
    # a finish reason openai's Literal does not list, or null: the SDK takes any
    finish = draw(_FINISH)
    data["choices"][0]["finish_reason"] = finish
    answer = {
        "content": (message["content"] or "") + (message.get("refusal") or ""),
        "thinking": reasoning or "",
        "calls": calls,
        "usage": usage,
        "finish": finish,
        "logprobs": logprobs or [],
    }
    return data, answer


def _token_entries(entries: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(entry["token"], entry["logprob"]) for entry in entries]


@ANSWERS
@given(chat_completions(), st.booleans(), st.booleans())
def test_a_chat_completion_is_an_answer_ollama_python_reads(
    completion: tuple[dict[str, Any], dict[str, Any]], show_thinking: bool, logprobs: bool
) -> None:
    resp, answer = completion
    for kind, translate in (
        ("chat", openai_chat_to_ollama_chat),
        ("generate", openai_chat_to_ollama_generate),
    ):
        out = translate(
            resp,
            "m",
            "2024-01-01T00:00:00Z",
            _TIMINGS,
            show_thinking=show_thinking,
            logprobs=logprobs,
        )
        written = compact_json(out)
        (read,) = OLLAMA.read(kind, [written], stream=False)
        holder = read.message if isinstance(read, ChatResponse) else read
        text = holder.content if isinstance(read, ChatResponse) else holder.response
        assert text == answer["content"]
        assert (holder.thinking or "") == (answer["thinking"] if show_thinking else "")
        assert _calls(read, json.loads(written)) == answer["calls"]
        _check_final(read, answer)
        if logprobs:
            assert _token_entries(
                [entry.model_dump() for entry in read.logprobs or []]
            ) == _token_entries(answer["logprobs"])


def _calls(read: ChatResponse | GenerateResponse, line: dict[str, Any]) -> list[tuple]:
    """A line's tool calls, as ollama-python's ``Message.ToolCall`` reads them: on the
    message (chat), or at the top (generate: Ollama's own, which ollama-python's
    GenerateResponse does not declare)."""
    if isinstance(read, ChatResponse):
        calls = read.message.tool_calls or []
    else:
        calls = [Message.ToolCall.model_validate(c) for c in line.get("tool_calls", [])]
    for call in calls:
        assert isinstance(call.function.arguments, dict)
    return [(c.function.name, c.function.arguments) for c in calls]


def _check_final(read: ChatResponse | GenerateResponse, answer: dict[str, Any]) -> None:
    assert read.done is True
    assert read.done_reason == _EXPECTED_REASON.get(answer["finish"], "stop")
    usage = answer["usage"] or {}
    assert read.prompt_eval_count == usage.get("prompt_tokens", 0)
    for count in (read.prompt_eval_count, read.eval_count):
        assert isinstance(count, int) and count >= 0
    durations = (read.total_duration, read.prompt_eval_duration, read.eval_duration)
    for duration in (*durations, read.load_duration):
        assert isinstance(duration, int) and duration >= 0
    assert read.total_duration >= read.prompt_eval_duration + read.eval_duration  # type: ignore[operator]


# --- streams -----------------------------------------------------------------------------


def _pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(min(c, len(text)) for c in cuts), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@st.composite
def chunk_streams(draw: st.DrawFn) -> tuple[list[str], dict[str, Any]]:
    """A ``ChatCompletionChunk`` stream as the backend sends it (each chunk built with
    openai's model, dumped with its explicit nulls), and the answer it spells."""
    reasoning_field = draw(_REASONING_FIELD)
    events: list[tuple[str, Any]] = []
    answer: dict[str, Any] = {"content": "", "thinking": "", "calls": [], "logprobs": []}
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["content", "refusal", reasoning_field]))
        text = draw(_PIECE)
        for piece in _pieces(text, draw(st.lists(st.integers(0, 6), max_size=2))):
            events.append((kind, piece))
        answer["thinking" if kind == reasoning_field else "content"] += text
    # tool calls: OpenAI's way (index, id, type and name on the first fragment only), or
    # the legacy single function_call, its name first, then its arguments in fragments
    legacy = draw(st.booleans())
    calls = draw(st.lists(st.tuples(_NAME, _ARGUMENTS), max_size=1 if legacy else 3))
    for index, (name, arguments) in enumerate(calls):
        text = json.dumps(arguments, ensure_ascii=draw(st.booleans()))
        fragments = _pieces(text, draw(st.lists(st.integers(0, len(text)), max_size=3)))
        for n, fragment in enumerate(fragments):
            function = {"name": name, "arguments": fragment} if n == 0 else {"arguments": fragment}
            if legacy:
                events.append(("function_call", function))
                continue
            delta: dict[str, Any] = {"index": index, "function": function}
            if n == 0:
                delta.update(id=f"call_{index}", type="function")
            events.append(("tool_calls", [delta]))
        answer["calls"].append((name, arguments))
    include_usage = draw(st.booleans())
    top: dict[str, Any] = {"id": "chatcmpl-1", "created": 1, "model": "backend"}
    if include_usage:
        top["usage"] = None  # OpenAI writes it on every chunk when asked for it
    if draw(st.booleans()):
        top.update(system_fingerprint="fp_1", service_tier="default", obfuscation="x")

    def chunk(choices: list[dict[str, Any]], finish: Any = None, **more: Any) -> str:
        body = {**top, "object": "chat.completion.chunk", "choices": choices, **more}
        data = _dumped(ChatCompletionChunk.model_validate(body))
        if finish is not None:  # also one openai's Literal does not list: the SDK takes any
            data["choices"][0]["finish_reason"] = finish
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    def choice(delta: dict[str, Any], logprobs: Any = None) -> dict:
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}

    texts = []
    if draw(st.booleans()):  # Azure's opening chunk: no choices, the prompt's filter results
        texts.append(chunk([], prompt_filter_results=[{"prompt_index": 0}]))
    texts.append(chunk([choice({"role": "assistant", "content": "", "refusal": None})]))
    for kind, value in events:
        delta = {kind: value}
        for other in draw(st.sets(st.sampled_from(["content", "tool_calls", "function_call"]))):
            delta.setdefault(other, None)
        logprobs = None
        if kind == "content" and draw(st.booleans()):
            entries = draw(st.lists(_TOKEN_LOGPROB, min_size=1, max_size=2))
            logprobs = {"content": entries, "refusal": None}
            answer["logprobs"] += entries
        texts.append(chunk([choice(delta, logprobs=logprobs)]))
    finish = draw(_FINISH)
    answer["finish"] = finish
    if finish is not None or draw(st.booleans()):
        texts.append(chunk([choice({})], finish))
    usage = draw(_USAGE) if include_usage else None
    answer["usage"] = usage
    if usage is not None:
        texts.append(chunk([], usage=usage))
    return texts, answer


@ANSWERS
@given(chunk_streams(), st.sampled_from(["chat", "generate"]), st.booleans(), st.booleans())
def test_a_chunk_stream_is_lines_ollama_python_reads_spelling_the_same_answer(
    stream: tuple[list[str], dict[str, Any]], kind: str, show_thinking: bool, logprobs: bool
) -> None:
    texts, answer = stream
    clock = iter(range(1_000, 10**9, 1_000))
    translator = OllamaStreamTranslator(
        kind,  # type: ignore[arg-type]
        "m",
        start_ns=0,
        created_at=lambda: "2024-01-01T00:00:00.000000000Z",
        show_thinking=show_thinking,
        logprobs=logprobs,
    )
    raw: list[bytes] = []
    for text in texts:
        now = next(clock)
        line = translator.feed_text(text, now)
        if line is None:
            chunk = read_chunk(text)
            assert chunk is not None
            raw += [compact_json(out) for out in translator.feed(chunk, now)]
        elif line:
            raw.append(line)
    raw.append(compact_json(translator.finish(next(clock))))

    lines = OLLAMA.read(kind, raw)  # what ollama-python's stream yields
    decoded = [json.loads(line) for line in raw]
    assert len(lines) == len(decoded)
    assert [line.done for line in lines] == [False] * (len(lines) - 1) + [True]
    holders = [line.message if isinstance(line, ChatResponse) else line for line in lines]
    text = "".join(
        (h.content if isinstance(line, ChatResponse) else h.response) or ""
        for h, line in zip(holders, lines, strict=True)
    )
    assert text == answer["content"]
    assert "".join(h.thinking or "" for h in holders) == (
        answer["thinking"] if show_thinking else ""
    )
    calls = [call for line, data in zip(lines, decoded, strict=True) for call in _calls(line, data)]
    assert calls == answer["calls"]
    entries = [entry.model_dump() for line in lines for entry in line.logprobs or []]
    assert _token_entries(entries) == (_token_entries(answer["logprobs"]) if logprobs else [])
    final = lines[-1]
    _check_final(final, answer)
    usage = answer["usage"]
    if usage is not None:
        assert final.eval_count == usage["completion_tokens"]


# --- raw prompts: the legacy text completions ------------------------------------------


@st.composite
def text_completions(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A ``Completion`` stream (openai's model, one text piece a chunk, its log
    probabilities in the legacy shape), the whole ``Completion`` it adds up to, and the
    answer both spell."""
    pieces = draw(st.lists(_PIECE, max_size=5))
    entries = [
        draw(st.none() | st.tuples(st.floats(-50, 0), st.dictionaries(_PIECE, st.floats(-50, 0))))
        for _ in pieces
    ]
    finish = draw(st.sampled_from(["stop", "length", "content_filter", "eos"]))
    usage = draw(_USAGE)

    def completion(text: str, logprobs: list[tuple[str, Any]], **more: Any) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "stop"}
        choice["logprobs"] = {
            "tokens": [token for token, _ in logprobs],
            "token_logprobs": [entry[0] for _, entry in logprobs],
            "top_logprobs": [entry[1] for _, entry in logprobs],
            "text_offset": [0 for _ in logprobs],
        }
        body = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "b"}
        return _dumped(Completion.model_validate({**body, "choices": [choice], **more}))

    chunks = []
    for piece, entry in zip(pieces, entries, strict=True):
        chunk = completion(piece, [] if entry is None else [(piece, entry)])
        chunk["choices"][0]["finish_reason"] = None
        chunks.append(chunk)
    ending = completion("", [])
    ending["choices"][0]["finish_reason"] = finish  # the SDK takes one its Literal lacks
    chunks.append(ending)
    if usage is not None:
        chunks.append({**ending, "choices": [], "usage": usage})
    logprobs = [(piece, entry) for piece, entry in zip(pieces, entries, strict=True) if entry]
    whole = completion("".join(pieces), logprobs, **({"usage": usage} if usage else {}))
    whole["choices"][0]["finish_reason"] = finish
    answer = {
        "content": "".join(pieces),
        "logprobs": [(token, entry[0], entry[1]) for token, entry in logprobs],
        "finish": finish,
        "usage": usage,
    }
    return chunks, {"whole": whole, **answer}


def _check_legacy_logprobs(read: GenerateResponse, answer: dict[str, Any], top: int) -> None:
    """Each token once, in order, with at most ``top`` alternatives, the likeliest first."""
    assert [(e.token, e.logprob) for e in read.logprobs or []] == [
        (token, value) for token, value, _ in answer["logprobs"]
    ]
    for entry, (_, _, alternatives) in zip(read.logprobs or [], answer["logprobs"], strict=True):
        likeliest = sorted(alternatives.values(), reverse=True)[:top]
        assert [alt.logprob for alt in entry.top_logprobs or []] == likeliest


@ANSWERS
@given(text_completions(), st.none() | st.integers(0, 3))
def test_a_raw_prompts_answer_is_one_ollama_python_reads_streamed_or_whole(
    completion: tuple[list[dict[str, Any]], dict[str, Any]], top_logprobs: int | None
) -> None:
    chunks, answer = completion
    translator = OllamaCompletionStreamTranslator(
        "m", start_ns=0, created_at=lambda: "2024-01-01T00:00:00Z", top_logprobs=top_logprobs
    )
    raw = [compact_json(line) for n, c in enumerate(chunks, 1) for line in translator.feed(c, n)]
    raw.append(compact_json(translator.finish(len(chunks) + 1)))
    lines = OLLAMA.read("generate", raw)
    assert [line.done for line in lines] == [False] * (len(lines) - 1) + [True]
    assert "".join(line.response or "" for line in lines) == answer["content"]
    whole = openai_completion_to_ollama_generate(
        answer["whole"], "m", "2024-01-01T00:00:00Z", _TIMINGS, top_logprobs
    )
    (read,) = OLLAMA.read("generate", [compact_json(whole)], stream=False)
    assert read.response == answer["content"]
    for final in (lines[-1], read):
        _check_final(final, answer)
    if top_logprobs is None:
        assert not any(line.logprobs for line in [*lines, read])
        return
    streamed = GenerateResponse(logprobs=[e for line in lines for e in line.logprobs or []])
    for got in (streamed, read):
        _check_legacy_logprobs(got, answer, top_logprobs)


# =============================================================================================
# Embeddings and models: openai's answers, read by ollama-python's models
# =============================================================================================


@ANSWERS
@given(
    st.lists(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=4), max_size=4),
    st.randoms(use_true_random=False),
    _COUNT,
    st.integers(0, 5),
)
def test_an_embeddings_answer_is_one_ollama_python_reads_in_input_order(
    vectors: list[list[float]], random: Any, prompt_tokens: int, dimensions: int
) -> None:
    data = [
        {"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)
    ]
    random.shuffle(data)  # a backend may answer out of order: index says which is which
    resp = _dumped(
        CreateEmbeddingResponse.model_validate(
            {
                "object": "list",
                "data": data,
                "model": "backend",
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )
    )
    read = EmbedResponse.model_validate_json(
        compact_json(openai_embeddings_to_ollama_embed(resp, "m", _TIMINGS, dimensions))
    )
    assert [len(v) for v in read.embeddings] == [
        min(len(v), dimensions) if dimensions else len(v) for v in vectors
    ]
    if not dimensions:
        assert [list(v) for v in read.embeddings] == vectors
    assert read.prompt_eval_count == prompt_tokens
    legacy = EmbeddingsResponse.model_validate_json(
        compact_json(openai_embeddings_to_ollama_embeddings(resp))
    )
    assert list(legacy.embedding) == (vectors[0] if vectors else [])


_MODEL_ID = st.text(
    alphabet=st.sampled_from(["a", "b", "7", "-", ".", "/", ":", "é", "😀"]),
    min_size=1,
    max_size=12,
)


@ANSWERS
@given(
    st.lists(
        st.builds(
            lambda model_id, created, owner: {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": owner,
            },
            _MODEL_ID,
            st.integers(-(2**40), 2**40),
            st.sampled_from(["", "vllm", "openai"]),
        ),
        max_size=4,
    )
)
def test_a_model_list_is_tags_show_and_ps_answers_ollama_python_reads(
    entries: list[dict[str, Any]],
) -> None:
    models = [_dumped(OpenAIModel.model_validate(entry)) for entry in entries]
    mapper = ModelMapper()
    tags = ListResponse.model_validate_json(
        compact_json(openai_models_to_ollama_tags(models, mapper))
    )
    assert [m.model for m in tags.models] == list(
        dict.fromkeys(with_default_tag(entry["id"]) for entry in entries)
    )
    ps = ProcessResponse.model_validate_json(compact_json(ollama_ps(models, mapper, now_ns=0)))
    assert len(ps.models) == len(tags.models)
    for model in models:
        shown = ShowResponse.model_validate_json(compact_json(ollama_show(model["id"], model)))
        assert shown.capabilities and shown.details is not None


# =============================================================================================
# What the properties found, each pinned by the shortest case
# =============================================================================================


def test_tool_calls_on_a_message_not_an_assistants_are_not_sent() -> None:
    """ollama-python takes ``tool_calls`` on any message; OpenAI refused the whole request
    for one on a system message. Its images still follow it at once."""
    call = Message.ToolCall(function=Message.ToolCall.Function(name="f", arguments={"a": 1}))
    raw = OLLAMA.sent(
        OLLAMA.client.chat,
        model="m",
        messages=[
            Message(role="system", content="s", tool_calls=[call], images=[Image(value=b"x")]),
            Message(role="user", content="u", tool_calls=[call]),
            Message(role="assistant", tool_calls=[call]),
            Message(role="tool", content="r", tool_name="f"),
        ],
    )
    sent = _check_chat_payload(ollama_chat_to_openai(validate_ollama_chat(loads(raw)), "b"))
    assert [(m["role"], "tool_calls" in m) for m in sent["messages"]] == [
        ("system", False),
        ("user", False),  # the system message's image
        ("user", False),
        ("assistant", True),
        ("tool", False),
    ]
    assert sent["messages"][4]["tool_call_id"] == sent["messages"][3]["tool_calls"][0]["id"]


def test_a_tool_of_another_type_is_sent_as_the_function_tool_it_is() -> None:
    """ollama-python's ``Tool.type`` is any string, which Ollama does not read; OpenAI
    refused the whole request for a type other than "function"."""
    tool = Tool(type="Function", function=Tool.Function(name="f"))
    raw = OLLAMA.sent(
        OLLAMA.client.chat, model="m", messages=[{"role": "user", "content": "x"}], tools=[tool]
    )
    sent = _check_chat_payload(ollama_chat_to_openai(validate_ollama_chat(loads(raw)), "b"))
    assert sent["tools"] == [{"type": "function", "function": {"name": "f"}}]


def test_a_model_created_before_the_year_1000_is_listed_as_rfc_3339() -> None:
    """strftime wrote the year 999 as "999": ollama-python refused ``modified_at``, and
    with it the whole ``ollama.list()``."""
    models = [{"id": "m", "object": "model", "created": -30_610_224_001, "owned_by": "x"}]
    tags = ListResponse.model_validate_json(
        compact_json(openai_models_to_ollama_tags(models, ModelMapper()))
    )
    assert tags.models[0].modified_at is not None
    assert tags.models[0].modified_at.year == 999
    shown = ShowResponse.model_validate_json(compact_json(ollama_show("m", models[0])))
    assert shown.modified_at is not None and shown.modified_at.year == 999


@pytest.mark.parametrize("kind", ["chat", "generate"])
def test_a_streamed_legacy_function_call_is_the_tool_call_it_is_in_a_whole_answer(
    kind: str,
) -> None:
    """A legacy ``function_call`` streamed in fragments was dropped (the client got an empty
    answer), where the same call in a whole answer is a tool call."""
    fragments = [{"name": "get_weather", "arguments": ""}, {"arguments": '{"city": '}]
    fragments.append({"arguments": '"Paris"}'})
    texts = [
        json.dumps(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "b",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )
        for delta, finish in [
            ({"role": "assistant", "content": None}, None),
            *(({"function_call": fragment}, None) for fragment in fragments),
            ({}, "function_call"),
        ]
    ]
    translator = OllamaStreamTranslator(kind, "m", start_ns=0)  # type: ignore[arg-type]
    lines = [line for text in texts for line in translator.feed(json.loads(text), 1)]
    lines.append(translator.finish(2))
    read = OLLAMA.read(kind, [compact_json(line) for line in lines])
    calls = [call for part, line in zip(read, lines, strict=True) for call in _calls(part, line)]
    assert calls == [("get_weather", {"city": "Paris"})]
    assert read[-1].done and read[-1].done_reason == "stop"
