"""The translation layer against the client libraries' own schemas.

Requests are written by the real ollama-python client (its pydantic ``ChatRequest``,
``GenerateRequest``, ``EmbedRequest``, ``Message``, ``Tool``, ``Options`` and ``Image``
serialise them, caught by an ``httpx.MockTransport`` before any socket), translated, and the
payload meant for the backend is checked against the openai package's own request
``TypedDict``s (``CompletionCreateParams``, ``EmbeddingCreateParams``), strictly, unknown keys
refused. Answers are built with the openai package's pydantic models (``ChatCompletion``,
``ChatCompletionChunk``, ``CreateEmbeddingResponse``, ``Model``) and dumped as a backend sends
them (``exclude_unset``: explicit nulls kept), translated, and each line is read by
ollama-python's own response models, as its client reads it.

tests/test_protocol_properties.py holds the hand-written shapes (odd JSON, relay reads); this
file holds what each library says a valid message is. Deterministic (``derandomize``);
PROPERTY_EXAMPLES=5000 to hunt with fresh randomness.
"""

from __future__ import annotations

import collections.abc
import functools
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ollama._types import (
    ChatResponse,
    GenerateResponse,
    Image,
    Message,
    Options,
    Tool,
)
from openai.types import completion_create_params as legacy_params
from openai.types import embedding_create_params
from openai.types.chat import completion_create_params as chat_params
from pydantic import BaseModel, ConfigDict, TypeAdapter
from typing_extensions import TypedDict, is_typeddict

from trioproxy.jsonutil import compact_json, loads
from trioproxy.translate import (
    MAX_TOP_LOGPROBS,
    RequestValidationError,
    embed_batches,
    ollama_chat_to_openai,
    ollama_embed_to_openai,
    ollama_embeddings_input,
    ollama_embeddings_to_openai,
    ollama_generate_to_completions,
    ollama_generate_to_openai,
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
