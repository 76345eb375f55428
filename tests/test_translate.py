"""Ollama <-> OpenAI translation: validation, request mapping, responses, streams, models.

Outputs are validated against the real client models (ollama-python's pydantic types and the
openai SDK's ``Model``) where that is cheap, since those are what break in production.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ollama._types import (
    ChatResponse,
    EmbeddingsResponse,
    EmbedResponse,
    GenerateResponse,
    ListResponse,
    ProcessResponse,
    ShowResponse,
)
from openai.types import Model as OpenAIModel
from pydantic import BaseModel

from trioproxy.jsonutil import compact_json
from trioproxy.model_mapping import DeclaredModel, ModelMapper
from trioproxy.translate import (
    OllamaCompletionStreamTranslator,
    OllamaStreamTranslator,
    OpenAIStreamObserver,
    RequestValidationError,
    ResponsesStreamObserver,
    Timings,
    _ContentChunks,
    _generated_call_id,
    embed_batches,
    embedding_count,
    image_data_url,
    is_embedding_model,
    joined_embeddings,
    keep_alive_unloads,
    listed_capabilities,
    model_family,
    ollama_chat_to_openai,
    ollama_embed_to_openai,
    ollama_embeddings_input,
    ollama_embeddings_to_openai,
    ollama_generate_to_openai,
    ollama_ps,
    ollama_ps_joined,
    ollama_ps_parts,
    ollama_ps_template,
    ollama_show,
    openai_chat_to_ollama_chat,
    openai_chat_to_ollama_generate,
    openai_embeddings_to_ollama_embed,
    openai_embeddings_to_ollama_embeddings,
    openai_model_entry,
    openai_model_list,
    openai_models_to_ollama_tags,
    openai_passthrough_request,
    parse_chunk,
    parse_tool_arguments,
    think_extra_body,
    utc_timestamp,
    validate_ollama_chat,
    validate_ollama_embed,
    validate_ollama_embeddings,
    validate_ollama_generate,
    validate_openai_body,
    with_extra_body,
    with_one_system_message,
)

CREATED = "2024-01-02T03:04:05.000000006Z"
TIMINGS = Timings(total_ns=3_000, prompt_eval_ns=1_000, eval_ns=2_000)
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 8).decode()
GIF_B64 = base64.b64encode(b"GIF89a" + b"\0" * 8).decode()
JPEG_B64 = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 8).decode()
WEBP_B64 = base64.b64encode(b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 8).decode()
WAV_B64 = base64.b64encode(b"RIFF\x10\0\0\0WAVEfmt " + b"\0" * 8).decode()


# =============================================================================================
# Validation
# =============================================================================================


def _err(fn: Any, body: object) -> RequestValidationError:
    with pytest.raises(RequestValidationError) as info:
        fn(body)
    return info.value


def test_error_message_names_field() -> None:
    e = _err(validate_ollama_chat, {"messages": []})
    assert e.field == "model"
    assert str(e) == e.message == "field 'model' is required"
    assert isinstance(e, ValueError)
    e = _err(validate_ollama_chat, {"model": "m", "messages": {}})
    assert str(e) == "field 'messages' must be a list"
    e = _err(validate_ollama_chat, [])
    assert e.field is None and "JSON object" in str(e)


class _City(BaseModel):
    name: str
    population: int | None = None


class _Country(BaseModel):
    name: str
    capital: _City
    languages: list[str] = []


_CLOSED_ITEM = {
    "type": "object",
    "properties": {"x": {"type": "integer"}},
    "required": ["x"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"type": "string"}}},  # open, nothing required
        {**_CLOSED_ITEM, "required": []},  # a property not required
        {**_CLOSED_ITEM, "properties": {"x": {"type": "array", "items": {"type": "object"}}}},
        {**_CLOSED_ITEM, "$defs": {"Item": {**_CLOSED_ITEM, "additionalProperties": True}}},
        {"anyOf": [_CLOSED_ITEM, {"type": "object", "properties": {}}]},
        _Country.model_json_schema(),  # the ollama-python README's structured-output example
    ],
)
def test_a_schema_openai_strict_mode_would_refuse_is_sent_without_strict(
    schema: dict[str, Any],
) -> None:
    """Ollama holds an answer to any schema; OpenAI's strict mode refuses a schema with an
    open object or an optional property (a 400 for the standard pydantic example), so such
    a schema goes without ``strict`` and the backend follows it as best it can."""
    body = {"model": "m", "messages": [], "format": schema}
    assert ollama_chat_to_openai(body, "b")["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }


def test_a_closed_nested_schema_keeps_strict_mode() -> None:
    schema = {
        **_CLOSED_ITEM,
        "properties": {"x": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
        "$defs": {"Item": _CLOSED_ITEM},
    }
    out = ollama_chat_to_openai({"model": "m", "messages": [], "format": schema}, "b")
    assert out["response_format"]["json_schema"]["strict"] is True


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": ""}, "model"),
        ({"model": None}, "model"),
        ({"model": 3}, "model"),
        ({"model": "m", "messages": [1]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": 1}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "images": "x"}]}, "messages[0].images"),
        (
            {"model": "m", "messages": [{"role": "assistant", "tool_calls": [{"x": 1}]}]},
            "messages[0].tool_calls[0].function",
        ),
        (
            {
                "model": "m",
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": [1]}}],
                    }
                ],
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"model": "m", "options": []}, "options"),
        ({"model": "m", "options": {"temperature": "hot"}}, "options.temperature"),
        ({"model": "m", "options": {"temperature": True}}, "options.temperature"),
        ({"model": "m", "options": {"num_predict": "10"}}, "options.num_predict"),
        # not finite: forwarded, they became null, the backend's default, silently
        ({"model": "m", "options": {"temperature": float("nan")}}, "options.temperature"),
        ({"model": "m", "options": {"top_p": float("inf")}}, "options.top_p"),
        ({"model": "m", "options": {"num_predict": 1e300}}, "options.num_predict"),
        ({"model": "m", "options": {"seed": -(2**63) - 1}}, "options.seed"),
        ({"model": "m", "options": {"stop": [1]}}, "options.stop[0]"),
        ({"model": "m", "stream": "yes"}, "stream"),
        ({"model": "m", "stream": 1}, "stream"),
        ({"model": "m", "format": "xml"}, "format"),
        ({"model": "m", "format": 3}, "format"),
        ({"model": "m", "think": 3}, "think"),
        ({"model": "m", "think": "extreme"}, "think"),
        ({"model": "m", "think": ""}, "think"),
        ({"model": "m", "think": ["high"]}, "think"),
        ({"model": "m", "think": {"level": "high"}}, "think"),
        ({"model": "m", "tools": {}}, "tools"),
        ({"model": "m", "tools": [{"function": {}}]}, "tools[0].function.name"),
    ],
)
def test_chat_validation_errors(body: dict[str, Any], field: str) -> None:
    e = _err(validate_ollama_chat, body)
    assert e.field == field
    assert f"'{field}'" in str(e)


def test_chat_validation_accepts_lenient_shapes() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u", "images": [PNG_B64], "thinking": "t"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
            },
            {"role": "assistant", "tool_calls": [{"function": {"name": "g", "arguments": "{}"}}]},
            {"role": "tool", "content": "r", "tool_name": "f"},
        ],
        "options": {"num_predict": -1, "top_k": 40, "mirostat": 2, "stop": "x", "seed": 42.0},
        "stream": False,
        "format": {"type": "object"},
        "think": "high",
        "keep_alive": "5m",
        "unknown_field": {"anything": True},
        "tools": [{"type": "function", "function": {"name": "f"}}, {"name": "bare"}],
    }
    assert validate_ollama_chat(body) is body
    assert validate_ollama_chat({"model": "m"})["model"] == "m"  # load request
    assert validate_ollama_chat({"model": "m", "stream": None, "options": None})


def test_generate_validation() -> None:
    assert validate_ollama_generate({"model": "m"})
    assert validate_ollama_generate({"model": "m", "prompt": "p", "images": [PNG_B64]})
    assert _err(validate_ollama_generate, {"model": "m", "prompt": 1}).field == "prompt"
    assert _err(validate_ollama_generate, {"model": "m", "system": []}).field == "system"
    assert _err(validate_ollama_generate, {"model": "m", "images": "x"}).field == "images"
    assert _err(validate_ollama_generate, {"prompt": "x"}).field == "model"
    assert validate_ollama_generate({"model": "m", "prompt": "p", "suffix": ""})  # none given


def test_generate_suffix_is_refused_as_ollama_refuses_it() -> None:
    """Fill-in-the-middle cannot be asked of chat completions: a non-empty suffix is
    Ollama's 400 for a model without the insert capability, not silently dropped."""
    error = _err(validate_ollama_generate, {"model": "coder", "prompt": "def f(", "suffix": ")"})
    assert error.field == "suffix"
    assert str(error) == '"coder" does not support insert'


def test_embed_validation() -> None:
    assert validate_ollama_embed({"model": "m", "input": "x"})
    assert validate_ollama_embed({"model": "m", "input": ["x", "y"], "dimensions": 8})
    assert validate_ollama_embed({"model": "m"})  # nothing to embed: answered with none
    assert _err(validate_ollama_embed, {"model": "m", "input": 3}).field == "input"
    assert _err(validate_ollama_embed, {"model": "m", "input": ["a", 1]}).field == "input[1]"
    assert _err(validate_ollama_embed, {"model": "m", "input": "x", "dimensions": "8"}).field == (
        "dimensions"
    )
    # Ollama reads 0 (its omitempty zero) and less as "not set": accepted, not forwarded
    for unset in (0, -1):
        body = validate_ollama_embed({"model": "m", "input": "x", "dimensions": unset})
        assert "dimensions" not in ollama_embed_to_openai(body, "b")
    assert _err(validate_ollama_embed, {"input": "x"}).field == "model"
    # truncate: a boolean, as Ollama decodes it, and never sent (the OpenAI API has none)
    for truncate in (True, False):
        body = validate_ollama_embed({"model": "m", "input": "x", "truncate": truncate})
        assert "truncate" not in ollama_embed_to_openai(body, "b")
    assert _err(validate_ollama_embed, {"model": "m", "truncate": "yes"}).field == "truncate"


def test_embeddings_validation() -> None:
    assert validate_ollama_embeddings({"model": "m", "prompt": "x"})
    assert validate_ollama_embeddings({"model": "m", "input": "x"})
    assert validate_ollama_embeddings({"model": "m", "input": ["x"]})
    assert validate_ollama_embeddings({"model": "m"})  # no prompt: Ollama loads the model
    assert ollama_embeddings_input({"model": "m"}) == ""
    assert ollama_embeddings_input({"model": "m", "input": None}) == ""
    assert _err(validate_ollama_embeddings, {"model": "m", "prompt": 1}).field == "prompt"


def test_openai_body_validation() -> None:
    assert validate_openai_body({"model": "m", "messages": "anything"})
    assert _err(validate_openai_body, {"messages": []}).field == "model"
    assert _err(validate_openai_body, {"model": ""}).field == "model"
    assert _err(validate_openai_body, {"model": "m", "stream": "x"}).field == "stream"
    assert _err(validate_openai_body, "x").field is None
    assert validate_openai_body({}, require_model=False) == {}
    with pytest.raises(RequestValidationError):
        validate_openai_body({"model": 5}, require_model=False)


# =============================================================================================
# Request side
# =============================================================================================


def test_chat_request_minimal_streams_with_usage_and_no_defaults() -> None:
    out = ollama_chat_to_openai(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "backend"
    )
    assert out == {
        "model": "backend",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_chat_request_non_stream_has_no_stream_options() -> None:
    out = ollama_chat_to_openai({"model": "m", "messages": [], "stream": False}, "b")
    assert out["stream"] is False
    assert "stream_options" not in out


@pytest.mark.parametrize("num_predict", [-2, -1, 0])
def test_num_predict_special_values_omitted(num_predict: int) -> None:
    out = ollama_generate_to_openai({"model": "m", "options": {"num_predict": num_predict}}, "b")
    assert "max_tokens" not in out


def test_options_mapping_only_what_was_set() -> None:
    options = {
        "num_predict": 128,
        "temperature": 0,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["a", "b"],
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "top_k": 40,
        "num_ctx": 4096,
        "repeat_penalty": 1.1,
        "mirostat": 1,
    }
    out = ollama_chat_to_openai({"model": "m", "messages": [], "options": options}, "b")
    sampling = {
        k: v for k, v in out.items() if k not in ("model", "messages", "stream", "stream_options")
    }
    assert sampling == {
        "max_tokens": 128,
        "temperature": 0,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["a", "b"],
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
    }
    out = ollama_chat_to_openai({"model": "m", "messages": [], "options": {"stop": "x"}}, "b")
    assert out["stop"] == "x"
    assert "temperature" not in out and "top_p" not in out


def test_format_and_think_and_keep_alive() -> None:
    base = {"model": "m", "messages": [], "keep_alive": 0}
    out = ollama_chat_to_openai({**base, "format": "json", "think": "low"}, "b")
    assert out["response_format"] == {"type": "json_object"}
    assert out["reasoning_effort"] == "low"
    assert "keep_alive" not in out and "think" not in out and "format" not in out
    closed = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    out = ollama_chat_to_openai({**base, "format": closed, "think": True}, "b")
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": closed, "strict": True},
    }
    assert "reasoning_effort" not in out
    out = ollama_chat_to_openai({**base, "think": "max", "format": ""}, "b")
    assert out["reasoning_effort"] == "high"  # the highest effort every backend accepts
    assert "response_format" not in out


def test_think_extra_body_is_picked_by_the_clients_think() -> None:
    on, off = {"on": 1}, {"off": 1}
    assert think_extra_body(False, on, off) is off
    for think in (True, "low", "max"):
        assert think_extra_body(think, on, off) is on
    assert think_extra_body(None, on, off) == {}


def test_extra_body_adds_what_the_request_lacks_and_never_overrides_it() -> None:
    request = {
        "model": "b",
        "reasoning_effort": "high",  # the client's think level
        "chat_template_kwargs": {"enable_thinking": True, "other": 1},
    }
    extra = {
        "reasoning_effort": "minimal",
        "chat_template_kwargs": {"enable_thinking": False, "preserve_thinking": False},
        "reasoning": {"effort": "none"},
    }
    out = with_extra_body(request, extra)
    assert out == {
        "model": "b",
        "reasoning_effort": "high",
        "chat_template_kwargs": {"enable_thinking": True, "other": 1, "preserve_thinking": False},
        "reasoning": {"effort": "none"},
    }
    assert request["chat_template_kwargs"] == {"enable_thinking": True, "other": 1}  # untouched


def test_extra_body_is_copied_into_each_request() -> None:
    """A request changed after the merge (the retry without stream_options, say) must
    not change the settings' value that every later request gets."""
    extra = {"chat_template_kwargs": {"enable_thinking": False}, "stop": ["x"]}
    out = with_extra_body({"model": "b"}, extra)
    out["chat_template_kwargs"]["enable_thinking"] = True
    out["stop"].append("y")
    assert extra == {"chat_template_kwargs": {"enable_thinking": False}, "stop": ["x"]}


@pytest.mark.parametrize(
    ("b64", "mime"),
    [
        (PNG_B64, "png"),
        (JPEG_B64, "jpeg"),
        (GIF_B64, "gif"),
        (WEBP_B64, "webp"),
        (WAV_B64, "jpeg"),
        ("AAAA", "jpeg"),
    ],
)
def test_image_sniffing(b64: str, mime: str) -> None:
    assert image_data_url(b64) == f"data:image/{mime};base64,{b64}"


@pytest.mark.parametrize("width", [64, 76, 120, 1000])
@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
def test_wrapped_base64_images_lose_their_line_ends(width: int, line_end: str) -> None:
    """Wrapped base64 (the ``base64`` command's 76 columns, or any width) is decoded by
    Ollama whatever the width; the data URL the backend gets must be one line."""
    whole = PNG_B64 + "A" * 3000
    wrapped = line_end.join(whole[i : i + width] for i in range(0, len(whole), width))
    assert image_data_url(wrapped + line_end) == f"data:image/png;base64,{whole}"


def test_image_data_url_passthrough() -> None:
    url = "data:image/png;base64,AAAA"
    assert image_data_url(url) == url


def test_chat_images_become_content_parts() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": "what is this?",
                "images": [PNG_B64, "data:image/gif;base64,R0"],
            }
        ],
    }
    (msg,) = ollama_chat_to_openai(body, "b")["messages"]
    assert msg == {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
            {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0"}},
        ],
    }


def test_images_on_other_messages_follow_in_a_user_message() -> None:
    """A review: Ollama takes images on any message (a tool's answer with a screenshot),
    OpenAI only on a user's: an image part on a tool or system message is a 400 for the
    whole request. The images follow in a user message, after the run of tool answers
    (which must come right after the assistant's calls)."""
    png = f"data:image/png;base64,{PNG_B64}"
    call = {"function": {"name": "screenshot", "arguments": {}}}
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "look", "images": [PNG_B64]},
            {"role": "user", "content": "go", "images": ["data:image/gif;base64,R0"]},
            {"role": "assistant", "content": "", "tool_calls": [call, call]},
            {"role": "tool", "content": "shot 1", "images": [PNG_B64]},
            {"role": "tool", "content": "shot 2", "images": [PNG_B64]},
            {"role": "assistant", "content": "seen", "images": [PNG_B64]},
        ],
    }
    messages = ollama_chat_to_openai(validate_ollama_chat(body), "b")["messages"]
    shapes = [
        (m["role"], "parts" if isinstance(m["content"], list) else m["content"]) for m in messages
    ]
    assert shapes == [
        ("system", "look"),
        ("user", "parts"),  # its images
        ("user", "parts"),  # the user's own, with its text
        ("assistant", None),
        ("tool", "shot 1"),
        ("tool", "shot 2"),
        ("user", "parts"),  # both screenshots, after the answers
        ("assistant", "seen"),
        ("user", "parts"),
    ]
    image = {"type": "image_url", "image_url": {"url": png}}
    assert messages[1]["content"] == [image]
    assert messages[6]["content"] == [image, image]
    assert [m.get("tool_call_id") for m in messages[4:6]] == [
        c["id"] for c in messages[3]["tool_calls"]
    ]


def test_generate_request() -> None:
    body = {
        "model": "m",
        "prompt": "describe",
        "system": "be brief",
        "images": [JPEG_B64],
        "template": "t",  # (a suffix is refused, raw goes to /completions: not here)
        "context": [1, 2],
        "keep_alive": "1m",
        "options": {"temperature": 0.2},
        "stream": False,
    }
    out = ollama_generate_to_openai(body, "backend")
    assert out == {
        "model": "backend",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "describe"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/jpeg;base64,{JPEG_B64}"},
                    },
                ],
            },
        ],
        "stream": False,
        "temperature": 0.2,
    }
    plain = ollama_generate_to_openai({"model": "m", "prompt": "p"}, "b")
    assert plain["messages"] == [{"role": "user", "content": "p"}]
    assert plain["stream"] is True and plain["stream_options"] == {"include_usage": True}


def test_tools_wrapped() -> None:
    fn = {"name": "get_weather", "description": "d", "parameters": {"type": "object"}}
    out = ollama_chat_to_openai(
        {
            "model": "m",
            "messages": [],
            "tools": [{"type": "function", "function": fn}, fn, {"function": fn}],
        },
        "b",
    )
    assert out["tools"] == [{"type": "function", "function": fn}] * 3


def test_tool_call_history() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "weather in Paris and time?"},
            {
                "role": "assistant",
                "content": "",
                "thinking": "let me call tools",
                "tool_calls": [
                    {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "time", "arguments": {}}},
                ],
            },
            {"role": "tool", "content": "12:00", "tool_name": "time"},
            {"role": "tool", "content": "sunny"},  # no name, no id: the open call
            {
                "role": "assistant",
                "content": "ok",
                "tool_calls": [
                    {"id": "abc", "function": {"name": "weather", "arguments": '{"city":"Nice"}'}}
                ],
            },
            {"role": "tool", "content": "rain", "tool_call_id": "abc"},
            {"role": "tool", "content": "again?"},  # nothing open: most recent call
        ],
    }
    msgs = ollama_chat_to_openai(body, "b")["messages"]
    assert msgs[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call00000",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
            },
            {
                "id": "call00001",
                "type": "function",
                "function": {"name": "time", "arguments": "{}"},
            },
        ],
    }
    assert "thinking" not in msgs[1]
    assert msgs[2] == {"role": "tool", "content": "12:00", "tool_call_id": "call00001"}
    assert msgs[3]["tool_call_id"] == "call00000"
    assert msgs[4]["content"] == "ok"
    assert msgs[4]["tool_calls"][0]["id"] == "abc"
    assert msgs[4]["tool_calls"][0]["function"]["arguments"] == '{"city":"Nice"}'
    assert msgs[5]["tool_call_id"] == "abc"
    assert msgs[6]["tool_call_id"] == "abc"
    # Deterministic: the same history gives byte-identical requests.
    assert ollama_chat_to_openai(body, "b") == ollama_chat_to_openai(body, "b")


def test_a_tool_result_whose_id_names_no_call_answers_the_call_it_pairs_with() -> None:
    """ollama-python's ToolCall has no id, so a history's call loses the backend's id while
    its result keeps ``tool_call_id``: forwarded as is, the result answered no call and an
    OpenAI-compatible backend refuses the request."""
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "w?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"function": {"name": "get_time", "arguments": {}}},
                ],
            },
            {"role": "tool", "content": "12:00", "tool_name": "get_time", "tool_call_id": "t_9"},
            {"role": "tool", "content": "20C", "tool_call_id": "toolu_01A"},
            {"role": "tool", "content": "?", "tool_call_id": "orphan"},  # none open: the last
        ],
    }
    msgs = ollama_chat_to_openai(body, "b")["messages"]
    assert [m.get("tool_call_id") for m in msgs[2:]] == ["call00001", "call00000", "call00001"]
    # no call in the history at all: the client's id is all there is
    lone = {"model": "m", "messages": [{"role": "tool", "content": "x", "tool_call_id": "k1"}]}
    assert ollama_chat_to_openai(lone, "b")["messages"][0]["tool_call_id"] == "k1"


def test_parallel_tool_results_in_order_without_names() -> None:
    body = {
        "model": "m",
        "messages": [
            {
                "role": "assistant",
                "tool_calls": [
                    {"function": {"name": "f", "arguments": {"i": 1}}},
                    {"function": {"name": "f", "arguments": {"i": 2}}},
                ],
            },
            {"role": "tool", "content": "r1", "tool_name": "f"},
            {"role": "tool", "content": "r2", "tool_name": "f"},
        ],
    }
    msgs = ollama_chat_to_openai(body, "b")["messages"]
    assert [m.get("tool_call_id") for m in msgs[1:]] == ["call00000", "call00001"]


@pytest.mark.parametrize(("number", "expected"), [
    (0, "call00000"), (1, "call00001"), (35, "call0000z"), (36, "call00010"),
    (36**5 - 1, "callzzzzz"), (36**5, "call100000"),
])  # fmt: skip
def test_generated_tool_call_ids_are_nine_letters_and_digits(number: int, expected: str) -> None:
    """Mistral's models (its API, vLLM serving them) refuse any other tool-call id shape
    than nine letters and digits, and ollama-python never echoes a backend's own id back:
    ids the proxy makes up must pass there."""
    assert _generated_call_id(number) == expected
    if number < 36**5:
        assert re.fullmatch(r"[a-zA-Z0-9]{9}", expected)


def _system(text: Any) -> dict[str, Any]:
    return {"role": "system", "content": text}


USER = {"role": "user", "content": "hi"}
ANSWER = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(("messages", "expected"), [
    # Claude Code 2.1.332: the top-level system, the prompt, its environment after it
    ([_system("A"), USER, _system("B")], [_system("A\n\nB"), USER]),
    ([USER, _system("B"), ANSWER, USER], [_system("B"), USER, ANSWER, USER]),
    ([_system("A"), _system("B"), USER], [_system("A\n\nB"), USER]),  # Qwen3.8 refuses two
    ([USER, _system([{"type": "text", "text": "B"}, {"type": "text", "text": "C"}])],
     [_system("B\n\nC"), USER]),
    ([_system(""), USER, _system(None), _system("B")], [_system("B"), USER]),
])  # fmt: skip
def test_system_messages_join_into_one_first(
    messages: list[dict[str, Any]], expected: list[dict[str, Any]]
) -> None:
    """For a backend whose chat template takes one system message, at the beginning."""
    payload = {"model": "m", "messages": messages}
    with_one_system_message(payload)
    assert payload == {"model": "m", "messages": expected}


@pytest.mark.parametrize("messages", [[USER, ANSWER], [_system("A"), USER, ANSWER, USER]])
def test_a_request_with_one_system_message_first_or_none_is_left_as_it_is(
    messages: list[dict[str, Any]],
) -> None:
    payload = {"model": "m", "messages": messages}
    with_one_system_message(payload)
    assert payload["messages"] is messages


def test_passthrough_request_maps_model_only() -> None:
    body = {"model": "llama3", "max_completion_tokens": 8, "messages": [], "stream": True}
    out = openai_passthrough_request(body, "meta/Llama-3")
    assert out == {
        "model": "meta/Llama-3",
        "max_completion_tokens": 8,
        "messages": [],
        "stream": True,
    }
    assert body["model"] == "llama3"  # input untouched


def test_embed_requests() -> None:
    assert ollama_embed_to_openai({"model": "m", "input": "a"}, "b") == {
        "model": "b",
        "input": ["a"],
        "encoding_format": "float",
    }
    assert ollama_embed_to_openai(
        {"model": "m", "input": ["a", "b"], "dimensions": 64, "truncate": True, "keep_alive": 0},
        "b",
    ) == {"model": "b", "input": ["a", "b"], "encoding_format": "float", "dimensions": 64}
    assert ollama_embeddings_to_openai({"model": "m", "prompt": "p"}, "b") == {
        "model": "b",
        "input": ["p"],
        "encoding_format": "float",
    }
    assert ollama_embeddings_to_openai({"model": "m", "input": ["x", "y"]}, "b")["input"] == [
        "x",
        "y",
    ]


# =============================================================================================
# Response side: non-stream
# =============================================================================================


def test_utc_timestamp() -> None:
    assert utc_timestamp(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert utc_timestamp(5) == "1970-01-01T00:00:00.000000005Z"
    now = utc_timestamp()
    parsed = datetime.fromisoformat(now[:26] + "+00:00")
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 5


def _chat_resp(
    message: dict[str, Any], finish: str | None = "stop", usage: dict[str, int] | None = None
) -> dict[str, Any]:
    resp: dict[str, Any] = {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "backend",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    }
    if usage is not None:
        resp["usage"] = usage
    return resp


def test_chat_response_basic() -> None:
    resp = _chat_resp(
        {"role": "assistant", "content": "hello"},
        usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    )
    out = openai_chat_to_ollama_chat(resp, "llama3", CREATED, TIMINGS)
    assert out == {
        "model": "llama3",
        "created_at": CREATED,
        "message": {"role": "assistant", "content": "hello"},
        "done": True,
        "done_reason": "stop",
        "total_duration": 3_000,
        "load_duration": 0,
        "prompt_eval_count": 5,
        "prompt_eval_duration": 1_000,
        "eval_count": 2,
        "eval_duration": 2_000,
    }
    ChatResponse.model_validate(out)


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "stop"),
        ("content_filter", "content_filter"),  # a cut answer must not read as finished
        (None, "stop"),
        ("function_call", "stop"),
    ],
)
def test_done_reason_mapping(finish: str | None, reason: str) -> None:
    out = openai_chat_to_ollama_chat(_chat_resp({"content": "x"}, finish), "m", CREATED, TIMINGS)
    assert out["done_reason"] == reason
    out = openai_chat_to_ollama_generate(
        _chat_resp({"content": "x"}, finish), "m", CREATED, TIMINGS
    )
    assert out["done_reason"] == reason


def test_chat_response_tool_calls_thinking_null_content() -> None:
    resp = _chat_resp(
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "hmm",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a": 1, "b": [2]}'},
                },
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{bad"}},
                {"id": "c3", "type": "function", "function": {"name": "h", "arguments": "[1]"}},
                {"id": "c4", "type": "function", "function": {"name": "k", "arguments": ""}},
            ],
        },
        finish="tool_calls",
    )
    out = openai_chat_to_ollama_chat(resp, "m", CREATED, TIMINGS)
    msg = out["message"]
    assert msg["content"] == ""
    assert msg["thinking"] == "hmm"
    assert [c["function"] for c in msg["tool_calls"]] == [
        {"index": 0, "name": "f", "arguments": {"a": 1, "b": [2]}},
        {"index": 1, "name": "g", "arguments": {}},
        {"index": 2, "name": "h", "arguments": {}},
        {"index": 3, "name": "k", "arguments": {}},
    ]
    assert out["done_reason"] == "stop"
    assert out["prompt_eval_count"] == 0 and out["eval_count"] == 0
    parsed = ChatResponse.model_validate(out)
    assert parsed.message.tool_calls[0].function.arguments == {"a": 1, "b": [2]}


def test_chat_response_reasoning_field_and_legacy_function_call() -> None:
    resp = _chat_resp(
        {"content": "x", "reasoning": "r", "function_call": {"name": "f", "arguments": '{"q": 1}'}}
    )
    msg = openai_chat_to_ollama_chat(resp, "m", CREATED, TIMINGS)["message"]
    assert msg["thinking"] == "r"
    assert msg["tool_calls"][0]["function"] == {"index": 0, "name": "f", "arguments": {"q": 1}}


@pytest.mark.parametrize("resp", [{}, {"choices": []}, {"choices": ["text"]}])
def test_a_completion_without_choices_is_not_an_empty_answer(resp: dict[str, Any]) -> None:
    """The caller turns this into a 502: an empty 200 would pass a backend's failure off
    as the model saying nothing."""
    for convert in (openai_chat_to_ollama_chat, openai_chat_to_ollama_generate):
        with pytest.raises(ValueError, match="without choices"):
            convert(resp, "m", CREATED, TIMINGS)


def test_generate_response() -> None:
    resp = _chat_resp(
        {"content": "hello", "reasoning_content": "t"},
        "length",
        {"prompt_tokens": 3, "completion_tokens": 9},
    )
    out = openai_chat_to_ollama_generate(resp, "m", CREATED, TIMINGS)
    assert out["response"] == "hello" and out["thinking"] == "t"
    assert out["done"] is True and out["done_reason"] == "length"
    assert (out["prompt_eval_count"], out["eval_count"]) == (3, 9)
    assert "message" not in out
    GenerateResponse.model_validate(out)
    out = openai_chat_to_ollama_generate(_chat_resp({"content": None}), "m", CREATED, TIMINGS)
    assert out["response"] == "" and "thinking" not in out


def test_generate_response_keeps_tool_calls_at_the_top_level() -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    resp = _chat_resp({"content": None, "tool_calls": [call]}, "tool_calls")
    out = openai_chat_to_ollama_generate(resp, "m", CREATED, TIMINGS)
    assert out["tool_calls"][0]["function"]["name"] == "get_weather"
    assert out["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert out["response"] == "" and out["done_reason"] == "stop"
    GenerateResponse.model_validate(out)


def test_parse_tool_arguments() -> None:
    assert parse_tool_arguments('{"a": 1}') == {"a": 1}
    assert parse_tool_arguments({"a": 1}) == {"a": 1}
    assert parse_tool_arguments("not json") == {}
    assert parse_tool_arguments('"str"') == {}
    assert parse_tool_arguments(None) == {}


# =============================================================================================
# Streams
# =============================================================================================


def _chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
    empty_choices: bool = False,
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "b",
        "usage": usage,
    }
    c["choices"] = (
        [] if empty_choices else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    )
    return c


def _translator(kind: str = "chat") -> OllamaStreamTranslator:
    return OllamaStreamTranslator(
        kind,
        "llama3",
        start_ns=1_000,  # type: ignore[arg-type]
        created_at=lambda: CREATED,
    )


def test_stream_chat_text() -> None:
    t = _translator()
    lines: list[dict[str, Any]] = []
    lines += t.feed(_chunk({"role": "assistant", "content": ""}), 1_100)
    assert lines == []  # role-only chunk emits nothing
    assert t.first_token_ns is None
    lines += t.feed(_chunk({"content": "Hel"}), 1_500)
    lines += t.feed(_chunk({"content": "lo"}), 1_900)
    lines += t.feed(_chunk({}, finish="stop"), 2_000)
    lines += t.feed(
        _chunk(
            usage={"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
            empty_choices=True,
        ),
        2_100,
    )
    final = t.finish(2_500)
    assert lines == [
        {
            "model": "llama3",
            "created_at": CREATED,
            "message": {"role": "assistant", "content": "Hel"},
            "done": False,
        },
        {
            "model": "llama3",
            "created_at": CREATED,
            "message": {"role": "assistant", "content": "lo"},
            "done": False,
        },
    ]
    assert final == {
        "model": "llama3",
        "created_at": CREATED,
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
        "total_duration": 1_500,
        "load_duration": 0,
        "prompt_eval_count": 4,
        "prompt_eval_duration": 500,
        "eval_count": 2,
        "eval_duration": 400,
    }
    for line in [*lines, final]:
        ChatResponse.model_validate(line)
    assert t.usage_seen and t.prompt_tokens == 4 and t.completion_tokens == 2
    assert t.first_token_ns == 1_500 and t.content_chunks == 2
    assert t.finish_reason == "stop"


def test_stream_generate_thinking_and_length() -> None:
    t = _translator("generate")
    lines = t.feed(_chunk({"reasoning_content": "think"}), 1_200)
    lines += t.feed(_chunk({"reasoning": "more"}), 1_300)
    lines += t.feed(_chunk({"content": "ans"}), 1_400)
    lines += t.feed(_chunk({"content": None}, finish="length"), 1_500)
    final = t.finish(1_600)
    assert [(x["response"], x.get("thinking")) for x in lines] == [
        ("", "think"),
        ("", "more"),
        ("ans", None),
    ]
    assert final["response"] == "" and final["done_reason"] == "length"
    # No usage: eval_count falls back to content-bearing chunks, prompt count to 0.
    assert not t.usage_seen
    assert final["eval_count"] == 3 and final["prompt_eval_count"] == 0
    assert final["prompt_eval_duration"] == 200 and final["eval_duration"] == 200
    for line in [*lines, final]:
        GenerateResponse.model_validate(line)
        assert "message" not in line


def test_a_generates_done_line_has_a_context_as_ollamas_has() -> None:
    """Ollama's done line of a generate always carries ``context`` (its token ids; the
    proxy has none: an empty list), streamed or not, and only that line: the Vercel AI
    SDK's ollama-ai-provider-v2 refused a generate without it ("Invalid JSON response").
    Chat lines have none."""
    whole = openai_chat_to_ollama_generate(_chat_resp({"content": "hi"}), "m", CREATED, TIMINGS)
    assert whole["context"] == [] and whole["done"] is True
    assert "context" not in openai_chat_to_ollama_chat(
        _chat_resp({"content": "hi"}), "m", CREATED, TIMINGS
    )
    for kind in ("generate", "chat"):
        t = _translator(kind)
        lines = t.feed(_chunk({"content": "hi"}), 1_100)
        lines += t.feed(_chunk({}, finish="stop"), 1_200)
        final = t.finish(1_300)
        assert not any("context" in line for line in lines)
        assert final.get("context") == ([] if kind == "generate" else None)
    # Ollama's raw mode (a text completion behind it) has none
    raw = OllamaCompletionStreamTranslator("m", start_ns=0)
    raw.feed({"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]}, 10)
    assert "context" not in raw.finish(20)


def test_stream_chat_thinking_line_has_empty_content() -> None:
    t = _translator()
    (line,) = t.feed(_chunk({"reasoning_content": "hmm"}), 1_100)
    assert line["message"] == {"role": "assistant", "content": "", "thinking": "hmm"}


# Mistral's reasoning models (Magistral) send their reasoning as content parts
_MAGISTRAL_THINKING = [{"type": "thinking", "thinking": [{"type": "text", "text": "Let me "}]}]


def test_magistral_thinking_parts_are_thinking_and_tokens() -> None:
    """A review: Magistral's reasoning parts were dropped and counted as no token, so the
    first-token deadline cut a stream that was reasoning (a 504 / stream_timeout)."""
    t = _translator()
    (line,) = t.feed(_chunk({"role": "assistant", "content": _MAGISTRAL_THINKING}), 1_100)
    assert line["message"] == {"role": "assistant", "content": "", "thinking": "Let me "}
    assert t.first_token_ns == 1_100
    also_string = [{"type": "thinking", "thinking": "think."}, {"type": "text", "text": "Hi"}]
    also_string.append({"type": "text", "text": None})  # a review: a TypeError
    (line,) = t.feed(_chunk({"content": also_string}), 1_200)
    assert line["message"] == {"role": "assistant", "content": "Hi", "thinking": "think."}
    observer = OpenAIStreamObserver(start_ns=0)
    observer.feed_text(json.dumps(_chunk({"content": _MAGISTRAL_THINKING})), 500)
    assert observer.first_token_ns == 500 and observer.content_chunks == 1
    message = {
        "role": "assistant",
        "content": [*_MAGISTRAL_THINKING, {"type": "text", "text": "4"}],
    }
    out = openai_chat_to_ollama_chat(_chat_resp(message), "m", CREATED, TIMINGS)
    assert out["message"]["thinking"] == "Let me " and out["message"]["content"] == "4"


def test_groq_usage_under_x_groq_is_the_usage() -> None:
    """A review: Groq streams carry usage as ``x_groq.usage``; the tokens were estimated
    from the chunks (and the input tokens missing)."""
    groq = {**_chunk({}, finish="stop"), "x_groq": {"id": "req_1", "usage": {
        "prompt_tokens": 23, "completion_tokens": 19, "total_tokens": 42}}}  # fmt: skip
    t = _translator()
    t.feed(_chunk({"content": "Hi"}), 1_100)
    t.feed(groq, 1_200)
    final = t.finish(1_300)
    assert (final["prompt_eval_count"], final["eval_count"]) == (23, 19)
    observer = OpenAIStreamObserver(start_ns=0)
    observer.feed_text(json.dumps(groq), 500)
    assert (observer.prompt_tokens, observer.completion_tokens) == (23, 19)
    observer.feed_text(json.dumps({**_chunk({}), "x_groq": {"id": "req_1"}}), 600)
    observer.feed_text(json.dumps({**_chunk({}), "x_groq": "odd"}), 700)
    assert observer.usage_seen and observer.completion_tokens == 19


def test_stream_tool_calls_accumulated() -> None:
    t = _translator()
    lines = t.feed(
        _chunk(
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "c0",
                        "type": "function",
                        "function": {"name": "weather", "arguments": ""},
                    }
                ],
            }
        ),
        1_100,
    )
    lines += t.feed(
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}), 1_200
    )
    lines += t.feed(
        _chunk(
            {
                "tool_calls": [
                    {"index": 1, "id": "c1", "function": {"name": "time", "arguments": "{}"}},
                    {"index": 0, "function": {"arguments": 'ty": "Paris"}'}},
                ]
            }
        ),
        1_300,
    )
    assert lines == []  # nothing until finish_reason
    lines += t.feed(_chunk({}, finish="tool_calls"), 1_400)
    final = t.finish(1_500)
    for tool_line in lines:
        assert tool_line["done"] is False
        assert tool_line["message"]["role"] == "assistant"
        assert tool_line["message"]["content"] == ""
        ChatResponse.model_validate(tool_line)
    assert _calls_of(lines) == [
        {"function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}}, "id": "c0"},
        {"function": {"index": 1, "name": "time", "arguments": {}}, "id": "c1"},
    ]
    assert final["done_reason"] == "stop"
    assert "tool_calls" not in final["message"]
    assert t.first_token_ns == 1_100
    ChatResponse.model_validate(final)


def _calls_of(lines: list[dict]) -> list[dict]:
    """The tool calls of stream lines that each hold one, as Ollama writes them: a line
    holding two made Haystack's streaming reader mix their names and arguments. Each says
    its ``index`` beside its ``id`` too (LiteLLM reads it there), dropped here."""
    calls = []
    for line in lines:
        (call,) = line["message"]["tool_calls"]
        assert call.pop("index") == call["function"]["index"]
        calls.append(call)
    return calls


def litellm_reads(lines: list[dict]) -> list[dict]:
    """Stream lines' tool calls as LiteLLM's ollama_chat provider (1.110) gathers them: a
    call is known by its ``index``, or, without one, by its place in its line (from 0);
    arguments of one index run together, as its stream_chunk_builder joins them."""
    calls: dict[int, dict] = {}
    for line in lines:
        for place, call in enumerate(line["message"].get("tool_calls") or []):
            index = call.get("index", place)
            arguments = json.dumps(call["function"]["arguments"])
            if index in calls:
                calls[index]["arguments"] += arguments
            else:
                calls[index] = {"name": call["function"]["name"], "arguments": arguments}
    return [calls[i] for i in sorted(calls)]


def test_stream_tool_calls_say_their_index_for_litellm() -> None:
    """A review with LiteLLM's ollama_chat provider: it numbers a line's calls from 0 by
    their place unless a call says its ``index`` (OpenAI's chunks do, Ollama's lines do
    not), so two parallel calls on lines of their own both read as call 0: one call, its
    names and arguments run together, and the next turn failed on those arguments. Each
    streamed call says its index beside its id (Ollama's clients ignore it)."""
    t = _translator()
    two = [
        {"index": 0, "id": "c0", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
        {"index": 1, "id": "c1", "function": {"name": "time", "arguments": "{}"}},
    ]
    t.feed(_chunk({"tool_calls": two}), 1_100)
    lines = t.feed(_chunk({}, finish="tool_calls"), 1_200)
    assert litellm_reads(lines) == [
        {"name": "weather", "arguments": '{"city": "Paris"}'},
        {"name": "time", "arguments": "{}"},
    ]
    # without a finish reason the calls ride on the done line, said the same way
    t = _translator()
    t.feed(_chunk({"tool_calls": two}), 1_100)
    final = t.finish(1_200)
    assert [c["index"] for c in final["message"]["tool_calls"]] == [0, 1]
    ChatResponse.model_validate(final)


def test_stream_tool_calls_without_finish_reason_ride_on_final_line() -> None:
    t = _translator()
    assert (
        t.feed(
            _chunk(
                {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a":1}'}}]}
            ),
            1_100,
        )
        == []
    )
    final = t.finish(1_200)
    assert final["done"] is True
    assert final["message"]["tool_calls"] == [
        {"function": {"index": 0, "name": "f", "arguments": {"a": 1}}, "index": 0}
    ]
    ChatResponse.model_validate(final)


def test_stream_tool_calls_without_index() -> None:
    t = _translator()
    t.feed(
        _chunk({"tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]}), 1_100
    )
    t.feed(_chunk({"tool_calls": [{"function": {"arguments": "}"}}]}), 1_200)
    t.feed(
        _chunk({"tool_calls": [{"id": "b", "function": {"name": "g", "arguments": {"x": 1}}}]}),
        1_300,
    )
    calls = _calls_of(t.feed(_chunk({}, finish="tool_calls"), 1_400))
    assert [c["function"]["arguments"] for c in calls] == [{}, {"x": 1}]
    assert [c["function"]["name"] for c in calls] == ["f", "g"]


def test_stream_tool_call_without_index_repeating_its_id_is_one_call() -> None:
    """A backend without ``index`` that repeats the call's id on every fragment: each
    fragment was a call of its own (the first with the name, all with empty arguments)."""
    t = _translator()
    for fragment in ('{"city": ', '"Paris"}'):
        delta = {"id": "call_1", "function": {"arguments": fragment}}
        if fragment.startswith("{"):
            delta["function"]["name"] = "weather"
        t.feed(_chunk({"tool_calls": [delta]}), 1_100)
    t.feed(_chunk({"tool_calls": [{"id": "call_2", "function": {"name": "time"}}]}), 1_200)
    t.feed(_chunk({"tool_calls": [{"id": "call_2", "function": {"arguments": "{}"}}]}), 1_300)
    # and one naming the latest function again before its arguments are whole
    t.feed(_chunk({"tool_calls": [{"function": {"name": "f", "arguments": '{"a"'}}]}), 1_400)
    t.feed(_chunk({"tool_calls": [{"function": {"name": "f", "arguments": ": 1}"}}]}), 1_500)
    assert _calls_of(t.feed(_chunk({}, finish="tool_calls"), 1_600)) == [
        {
            "function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}},
            "id": "call_1",
        },
        {"function": {"index": 1, "name": "time", "arguments": {}}, "id": "call_2"},
        {"function": {"index": 2, "name": "f", "arguments": {"a": 1}}},
    ]


def test_stream_parallel_tool_calls_that_all_say_index_0_stay_apart() -> None:
    """Ollama's own /v1, SGLang and Gemini's OpenAI layer number every call 0 and tell
    them apart by id: a new id at a used index is a new call, not more arguments."""
    t = _translator()
    for call_id, name, args in (
        ("call_1", "weather", '{"city": "Paris"}'),
        ("call_2", "time", '{"zone": "CET"}'),
    ):
        t.feed(
            _chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": call_id,
                            "type": "function",
                            "function": {"name": name, "arguments": args},
                        }
                    ]
                }
            ),
            1_100,
        )
    t.feed(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}), 1_200)
    lines = t.feed(_chunk({}, finish="tool_calls"), 1_300)
    assert _calls_of(lines) == [
        {
            "function": {"index": 0, "name": "weather", "arguments": {"city": "Paris"}},
            "id": "call_1",
        },
        {"function": {"index": 1, "name": "time", "arguments": {"zone": "CET"}}, "id": "call_2"},
    ]


def test_stream_tool_call_at_a_used_index_with_another_name_is_another_call() -> None:
    t = _translator()
    t.feed(
        _chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}), 1_100
    )
    t.feed(
        _chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]}), 1_150
    )  # a backend repeating the name on a continuation: the same call
    t.feed(
        _chunk({"tool_calls": [{"index": 0, "function": {"name": "g", "arguments": "{}"}}]}), 1_200
    )
    final = t.finish(1_300)
    assert [c["function"]["name"] for c in final["message"]["tool_calls"]] == ["f", "g"]


def test_stream_whole_calls_to_one_function_at_index_0_without_ids_stay_apart() -> None:
    """Gemini's OpenAI layer sends each parallel call whole, all at index 0, no ids."""
    t = _translator()
    for city in ("Paris", "London"):
        t.feed(
            _chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "function": {
                                "name": "get_weather",
                                "arguments": json.dumps({"city": city}),
                            },
                        }
                    ]
                }
            ),
            1_100,
        )
    final = t.finish(1_200)
    assert [c["function"]["arguments"] for c in final["message"]["tool_calls"]] == [
        {"city": "Paris"},
        {"city": "London"},
    ]


def test_stream_no_tokens_durations() -> None:
    t = _translator()
    final = t.finish(5_000)
    assert final["total_duration"] == 4_000
    assert final["prompt_eval_duration"] == 4_000
    assert final["eval_duration"] == 0 and final["eval_count"] == 0
    assert t.first_token_ns is None


@pytest.mark.parametrize("usage", [True, False])
def test_stream_whose_tokens_came_at_once_has_an_eval_duration(usage: bool) -> None:
    """A review replaying Open WebUI: a backend that sent the whole answer in one chunk (or
    ignored ``stream``) made ``eval_count`` 7 with ``eval_duration`` 0: a script computing
    tokens per second divided by zero. The wait then holds the generation, as the whole
    wait of a non-stream answer is its eval_duration."""
    t = _translator()
    t.feed(_chunk({"content": "the whole answer at once"}, finish="stop"), 3_000)
    if usage:
        t.feed(
            _chunk({}, empty_choices=True, usage={"prompt_tokens": 5, "completion_tokens": 7}),
            3_000,
        )
    final = t.finish(3_100)
    assert final["eval_count"] == (7 if usage else 1)
    assert final["eval_duration"] == 2_000 and final["prompt_eval_duration"] == 0
    assert final["total_duration"] == 2_100


def test_stream_of_a_tool_call_alone_has_an_eval_duration() -> None:
    t = _translator()
    call = {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}
    t.feed(_chunk({"tool_calls": [call]}, finish="tool_calls"), 2_500)
    t.feed(
        _chunk({}, empty_choices=True, usage={"prompt_tokens": 5, "completion_tokens": 9}), 2_600
    )
    final = t.finish(2_700)
    assert final["eval_count"] == 9 and final["eval_duration"] > 0


def test_stream_finish_once() -> None:
    t = _translator()
    t.finish(2_000)
    with pytest.raises(RuntimeError):
        t.finish(3_000)
    with pytest.raises(RuntimeError):
        t.feed(_chunk({"content": "x"}), 3_000)
    assert t.finished


def test_error_line() -> None:
    assert OllamaStreamTranslator.error_line("boom") == {"error": "boom"}
    assert _translator().error_line("x") == {"error": "x"}


def test_invalid_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        OllamaStreamTranslator("embed", "m", start_ns=0)  # type: ignore[arg-type]


def test_default_created_at_is_utc_now() -> None:
    t = OllamaStreamTranslator("chat", "m", start_ns=0)
    (line,) = t.feed(_chunk({"content": "x"}), 1)
    assert line["created_at"].endswith("Z") and len(line["created_at"]) == 30


def test_openai_observer() -> None:
    o = OpenAIStreamObserver(start_ns=0)
    o.feed(_chunk({"role": "assistant"}), 10)
    o.feed(_chunk({"content": "a"}), 20)
    o.feed(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}), 30)
    o.feed(_chunk({}, finish="tool_calls"), 40)
    assert not o.usage_seen and o.completion_tokens is None
    o.feed(_chunk(usage={"prompt_tokens": 1, "completion_tokens": 2}, empty_choices=True), 50)
    assert o.first_token_ns == 20 and o.last_token_ns == 30
    assert o.content_chunks == 2
    assert o.usage_seen and (o.prompt_tokens, o.completion_tokens) == (1, 2)
    assert o.finish_reason == "tool_calls"
    o.feed({"garbage": True}, 60)  # tolerated


def test_openai_observer_reads_legacy_completion_chunks() -> None:
    """/v1/completions streams put the text on the choice: it is a token like any other
    (the relay's first-token deadline and the token metrics depend on it)."""

    def legacy(text: str, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": "cmpl-1", "object": "text_completion", "choices": [choice]}

    o = OpenAIStreamObserver(start_ns=0)
    o.feed_text(json.dumps(legacy("")), 10)
    o.feed_text(json.dumps(legacy("Hello")), 20)
    o.feed_text(json.dumps(legacy(" there", finish="stop")), 30)
    assert o.first_token_ns == 20 and o.last_token_ns == 30
    assert o.content_chunks == 2 and o.finish_reason == "stop"


def test_openai_observer_counts_function_call_and_audio_deltas_as_tokens() -> None:
    """A legacy ``functions`` call and gpt-4o-audio stream no text: such a stream never
    had its first token, so the first-token deadline cut it mid-flow."""
    for delta in (
        {"function_call": {"name": "f", "arguments": ""}},
        {"audio": {"id": "a1", "transcript": "Hi", "data": "AAAA"}},
    ):
        o = OpenAIStreamObserver(start_ns=0)
        o.feed_text(json.dumps(_chunk({"role": "assistant", "content": None})), 10)
        assert o.first_token_ns is None
        o.feed_text(json.dumps(_chunk(delta)), 20)
        o.feed_text(json.dumps(_chunk(delta)), 30)
        assert (o.first_token_ns, o.last_token_ns, o.content_chunks) == (20, 30, 2), delta


# ---- several choices (n > 1): the stream is whole once every choice finished ---------------


def _choices_chunk(*choices: tuple[int, str, str | None], legacy: bool = False) -> str:
    """One event holding the choices ``(index, text, finish_reason)``: OpenAI sends one
    choice per chunk, NVIDIA Dynamo all of them in one; ``legacy``: /v1/completions'."""
    listed = [
        {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if legacy
        else {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
        for index, text, finish in choices
    ]
    return json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 1,
                       "model": "b", "choices": listed})  # fmt: skip


def _observer_of(n: int) -> OpenAIStreamObserver:
    o = OpenAIStreamObserver(start_ns=0)
    if n > 1:
        o.expect_choices(n)
    return o


@pytest.mark.parametrize("legacy", [False, True])
def test_a_stream_of_several_choices_is_open_until_each_choice_finished(legacy: bool) -> None:
    """``n=3``, one choice per chunk (OpenAI's, vLLM's): choice 0's finish_reason used to
    end the stream for the relay, so a body cut while choices 1 and 2 ran on passed as a
    whole answer."""
    o = _observer_of(3)
    for i in range(3):
        o.feed_text(_choices_chunk((i, "a", None), legacy=legacy), 10 + i)
    assert o.open_choices == 3 and o.content_chunks == 3
    o.feed_text(_choices_chunk((0, "b", "stop"), legacy=legacy), 20)
    assert o.finish_reason == "stop" and o.open_choices == 2
    o.feed_text(_choices_chunk((0, "", "stop"), legacy=legacy), 21)  # a repeat changes nothing
    o.feed_text(_choices_chunk((2, "c", "length"), legacy=legacy), 22)
    assert o.open_choices == 1
    o.feed_text(_choices_chunk((1, "", "stop"), legacy=legacy), 23)
    assert o.open_choices == 0 and not o.failed
    assert o.content_chunks == 5 and (o.first_token_ns, o.last_token_ns) == (10, 22)


def test_several_choices_in_one_chunk_are_each_read() -> None:
    """NVIDIA Dynamo streams all ``n`` choices in one chunk: every choice but the first was
    unread, so their tokens went uncounted, and a chunk in which only choice 1 finished
    (or failed) was missed."""
    o = _observer_of(2)
    o.feed_text(_choices_chunk((0, "a", None), (1, "b", None)), 10)
    assert o.content_chunks == 2 and o.first_token_ns == 10
    o.feed_text(_choices_chunk((0, "", None), (1, "c", "stop")), 20)  # only choice 1's token
    assert o.content_chunks == 3 and o.last_token_ns == 20
    assert o.open_choices == 1 and o.finish_reason == "stop"
    o.feed_text(_choices_chunk((0, "d", "length"), (1, "", None)), 30)
    assert o.open_choices == 0 and o.content_chunks == 4

    failing = _observer_of(2)
    failing.feed_text(_choices_chunk((0, "a", None), (1, "", "error")), 10)
    assert failing.failed


def test_choices_without_an_index_count_by_their_place_and_bad_indices_by_none() -> None:
    """A backend that numbers no choice: a choice's place in its chunk is its index. An
    index past ``n`` (or not a number) finishes nothing, so a huge ``n`` keeps nothing."""
    o = _observer_of(2)
    chunk = json.loads(_choices_chunk((0, "a", "stop"), (1, "b", "stop")))
    for choice in chunk["choices"]:
        del choice["index"]
    o.feed_text(json.dumps(chunk), 1)
    assert o.open_choices == 0
    o = _observer_of(2)
    o.feed_text(_choices_chunk((5, "a", "stop"), (-1, "b", "stop")), 1)
    o.feed_text(_choices_chunk((True, "a", "stop")), 2)  # type: ignore[arg-type]
    assert o.open_choices == 1  # True is no index: its place (0) is
    huge = _observer_of(10**9)
    huge.feed_text(_choices_chunk((0, "a", "stop")), 1)
    assert huge.open_choices == 10**9 - 1


def test_one_choice_streams_keep_their_rules() -> None:
    """``n`` = 1, the rule: a finish_reason ends the stream; choices past the first in a
    chunk (a request that asked for one) are not read, as the Ollama translation never
    reads them either."""
    o = _observer_of(1)
    assert o.open_choices == 1
    o.feed_text(_choices_chunk((0, "a", None), (1, "b", "stop")), 1)
    assert o.content_chunks == 1 and o.open_choices == 1 and o.finish_reason is None
    o.feed_text(_choices_chunk((0, "", "stop")), 2)
    assert o.open_choices == 0
    t = _translator()
    t.feed(json.loads(_choices_chunk((0, "a", None), (1, "b", "error"))), 1)
    assert not t.failed and t.content_chunks == 1


def test_stream_consumers_keep_their_attributes_few_for_the_per_chunk_path() -> None:
    """An object with many attributes has them read slower (CPython's shared-key instance
    dicts end at 30; see OllamaStreamTranslator.__init__): the two attributes of ``n`` > 1
    on every stream consumer took the Ollama translator from 28 to 30, and ``feed`` of a
    non-ASCII content chunk from ~1.22 to ~1.33 us (timeit), for what only a /v1
    passthrough stream asking for several choices uses. They are class defaults there."""
    assert len(vars(_translator())) < 30
    assert len(vars(OllamaStreamTranslator("generate", "m", start_ns=0))) < 30
    assert "_finished_choices" not in vars(_translator())


_fragment_lists = st.lists(
    st.dictionaries(
        st.text(max_size=5),
        st.one_of(st.integers(), st.text(max_size=8), st.booleans(), st.none()),
        max_size=4,
    ),
    min_size=1,
    max_size=3,
)


@st.composite
def _tool_stream(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Chunks carrying interleaved content, thinking and split tool-call arguments."""
    args = draw(_fragment_lists)
    texts = [json.dumps(a, ensure_ascii=draw(st.booleans())) for a in args]
    # Split each argument string into random fragments.
    pieces: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=5)))
        bounds = [0, *cuts, len(text)]
        pieces += [(i, text[a:b]) for a, b in itertools.pairwise(bounds)]
    # Interleave the calls' fragments while keeping each call's own order.
    order = draw(st.permutations(range(len(pieces))))
    queues = {i: [p for p in pieces if p[0] == i] for i in range(len(texts))}
    seq = [queues[pieces[k][0]].pop(0) for k in order]
    chunks: list[dict[str, Any]] = [_chunk({"role": "assistant", "content": ""})]
    started: set[int] = set()
    for i, frag in seq:
        if draw(st.booleans()):
            chunks.append(
                _chunk(
                    {
                        draw(st.sampled_from(["content", "reasoning_content"])): draw(
                            st.text(max_size=3)
                        )
                    }
                )
            )
        tc: dict[str, Any] = {"index": i, "function": {"arguments": frag}}
        if i not in started:
            started.add(i)
            tc.update(id=f"id{i}", type="function")
            tc["function"]["name"] = f"fn{i}"
        chunks.append(_chunk({"tool_calls": [tc]}))
    finish = draw(st.sampled_from(["tool_calls", "stop", None]))
    if finish is not None:
        chunks.append(_chunk({}, finish=finish))
    if draw(st.booleans()):
        chunks.append(
            _chunk(usage={"prompt_tokens": 3, "completion_tokens": 4}, empty_choices=True)
        )
    return chunks, args, draw(st.sampled_from(["chat", "generate"]))


@settings(max_examples=200, deadline=None)
@given(_tool_stream(), st.lists(st.integers(0, 1_000_000), min_size=1))
def test_stream_properties(
    case: tuple[list[dict[str, Any]], list[dict[str, Any]], str], gaps: list[int]
) -> None:
    chunks, expected_args, kind = case
    t = OllamaStreamTranslator(kind, "m", start_ns=1_000_000)  # type: ignore[arg-type]
    now = 1_000_000
    lines: list[dict[str, Any]] = []
    for n, chunk in enumerate(chunks):
        now += gaps[n % len(gaps)]
        lines += t.feed(chunk, now)
    lines.append(t.finish(now + 1))

    assert [line["done"] for line in lines].count(True) == 1
    assert lines[-1]["done"] is True
    model = ChatResponse if kind == "chat" else GenerateResponse
    calls: list[dict[str, Any]] = []
    for line in lines:
        model.model_validate(line)
        json.dumps(line)  # serializable as one NDJSON line
        if kind == "chat":
            assert line["message"]["role"] == "assistant"
            assert isinstance(line["message"]["content"], str)
            calls += line["message"].get("tool_calls", [])
        else:
            assert isinstance(line["response"], str)
            calls += line.get("tool_calls", [])
    assert [c["function"]["arguments"] for c in calls] == expected_args
    assert [c["function"]["name"] for c in calls] == [f"fn{i}" for i in range(len(calls))]
    final = lines[-1]
    for key in (
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
        "prompt_eval_count",
        "eval_count",
    ):
        assert type(final[key]) is int and final[key] >= 0
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]


# ---- feed_text: content-only chunks found without json.loads, with the same results ----------


class _Obj(list[tuple[str, Any]]):
    """A JSON object as its members in order, so duplicate names can be written."""


_JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.sampled_from(["", "\n", '"', "\\", "\x00", "\x1f", "\u2028", "é", "😀", "\ud800"]),
)
_CONTENT_VALUES = st.one_of(
    _JSON_SCALARS,
    st.lists(
        st.builds(lambda t: _Obj([("type", "text"), ("text", t)]), st.text(max_size=3)), max_size=2
    ),
)


def _members(values: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[list[Any]]:
    """Members named from ``values`` (plus an unread name), in any order, repeats allowed."""
    names = st.sampled_from([*values, "other"])
    return st.lists(
        names.flatmap(lambda n: values.get(n, _JSON_SCALARS).map(lambda v: (n, v))),
        max_size=4,
    )


_DELTA_MEMBERS = _members(
    {
        "content": _CONTENT_VALUES,
        "role": st.just("assistant"),
        "reasoning_content": _JSON_SCALARS,
        "reasoning": _JSON_SCALARS,
        "tool_calls": st.one_of(st.none(), st.just([]), st.just([_Obj([("index", 0)])])),
        "refusal": st.none(),
    }
)
_COMMON_DELTA = st.builds(lambda c: _Obj([("content", c)]), st.text(max_size=8))
# weighted: one_of would flatten the scalars' branches and make them most of the deltas
_DELTAS = st.integers(0, 9).flatmap(
    lambda n: _COMMON_DELTA if n < 6 else _DELTA_MEMBERS.map(_Obj) if n < 9 else _JSON_SCALARS
)
_CHOICE_MEMBERS = _members(
    {
        "index": st.integers(0, 2),
        "finish_reason": st.sampled_from([None, "", "stop", "length", "tool_calls"]),
        "logprobs": st.none(),
        "delta": _DELTAS,
        "message": _DELTAS,
    }
)
_TOP_MEMBERS = _members(
    {
        "id": st.text(max_size=6),
        "created": st.integers(0, 2**40),
        "model": st.text(max_size=6),
        "usage": st.one_of(
            st.none(),
            st.builds(
                lambda p, c: _Obj([("prompt_tokens", p), ("completion_tokens", c)]),
                _JSON_SCALARS,
                st.integers(0, 99),
            ),
        ),
        "choices": st.one_of(st.none(), st.just([])),
        "error": _JSON_SCALARS,
    }
)


@st.composite
def _style(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "item": draw(st.sampled_from([",", ", ", " ,\n\t", "\r\n,"])),
        "key": draw(st.sampled_from([":", ": ", " :\t"])),
        "ascii": draw(st.booleans()),
        "escape_names": draw(st.integers(0, 3)) == 0,  # "usage" written as "\u0075sage"
        "pad": draw(st.sampled_from(["", " ", "\n", "\t \r"])),
    }


def _render(value: Any, style: dict[str, Any]) -> str:
    if isinstance(value, _Obj):
        return (
            "{"
            + style["item"].join(
                _name(n, style) + style["key"] + _render(v, style) for n, v in value
            )
            + "}"
        )
    if isinstance(value, list):
        return "[" + style["item"].join(_render(v, style) for v in value) + "]"
    return json.dumps(value, ensure_ascii=style["ascii"])


def _name(name: str, style: dict[str, Any]) -> str:
    if style["escape_names"] and name:
        return f'"\\u{ord(name[0]):04x}{name[1:]}"'
    return json.dumps(name)


# What backends send, as (members before, members after) the one that holds the rest.
_USUAL_TOP = st.tuples(
    st.builds(
        lambda i, m: [("id", i), ("object", "chat.completion.chunk"), ("created", 1), ("model", m)],
        st.text(max_size=4),
        st.text(max_size=4),
    ),
    st.sampled_from([[], [("usage", None)], [("system_fingerprint", "fp"), ("usage", None)]]),
)
_USUAL_CHOICE = st.sampled_from(
    [
        ([("index", 0)], [("logprobs", None), ("finish_reason", None)]),
        ([("index", 0)], [("finish_reason", None)]),
        ([("finish_reason", None), ("index", 0)], []),
    ]
)


@st.composite
def _event_texts(draw: st.DrawFn) -> list[str]:
    """A stream's events: chunks built around one template (as a backend repeats its id,
    model and choice members), with other shapes, styles and non-JSON mixed in."""
    top_before, top_after = draw(st.one_of(_USUAL_TOP, st.tuples(_TOP_MEMBERS, _TOP_MEMBERS)))
    choice_before, choice_after = draw(
        st.one_of(_USUAL_CHOICE, st.tuples(_CHOICE_MEMBERS, _CHOICE_MEMBERS))
    )
    compact = {"item": ",", "key": ":", "ascii": False, "escape_names": False, "pad": ""}
    style = draw(st.one_of(st.just(compact), _style()))
    texts = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["template"] * 4 + ["other", "noise"]))
        if kind == "noise":
            texts.append(draw(st.sampled_from(["", "[DONE]", "null", "[1]", "{", '{"a":1}x'])))
            continue
        delta = draw(_DELTAS)
        choice = _Obj([*choice_before, ("delta", delta), *choice_after])
        chunk = _Obj([*top_before, ("choices", [choice]), *top_after])
        if kind == "other":
            chunk = _Obj([*draw(_TOP_MEMBERS), ("choices", [_Obj(draw(_CHOICE_MEMBERS))])])
        text = _render(chunk, style if draw(st.booleans()) else draw(_style()))
        texts.append(style["pad"] + text + style["pad"])
    return texts


def _stats(o: OpenAIStreamObserver | OllamaStreamTranslator) -> tuple[Any, ...]:
    return (
        o.first_token_ns,
        o.last_token_ns,
        o.content_chunks,
        o.prompt_tokens,
        o.completion_tokens,
        o.finish_reason,
        o.failed,
    )


@settings(max_examples=400, deadline=None)
@given(_event_texts())
def test_observer_feed_text_matches_a_full_decode(texts: list[str]) -> None:
    fast, full = OpenAIStreamObserver(start_ns=0), OpenAIStreamObserver(start_ns=0)
    for now, text in enumerate(texts, 1):
        fast.feed_text(text, now)
        chunk = parse_chunk(text)
        if chunk is not None:
            full.feed(chunk, now)
        assert _stats(fast) == _stats(full), text


def _lines_or_error(feed: Callable[[], list[bytes]]) -> list[bytes] | str:
    try:
        return feed()
    except UnicodeEncodeError as exc:  # a lone surrogate cannot be UTF-8, either way
        return type(exc).__name__


def _full_lines(t: OllamaStreamTranslator, text: str, now: int) -> list[bytes]:
    chunk = parse_chunk(text)
    return [] if chunk is None else [compact_json(line) for line in t.feed(chunk, now)]


def _fast_lines(t: OllamaStreamTranslator, text: str, now: int) -> list[bytes]:
    line = t.feed_text(text, now)
    if line is None:
        return _full_lines(t, text, now)
    # only a chunk with choices takes the fast path: the relay's in-band error check (an
    # "error" member without choices) is never skipped
    assert (parse_chunk(text) or {}).get("choices")
    return [line] if line else []


@settings(max_examples=400, deadline=None)
@given(
    _event_texts(),
    st.sampled_from(["chat", "generate"]),
    st.text(max_size=4),
    st.sampled_from(["2024-05-01T12:00:00.123456789Z", 'a"\\\n\u2028é']),
)
# half a surrogate pair: the fast line's fallback read the clock a second time
@example([json.dumps(_chunk({"content": "\ud800"}))], "chat", "", "2024-05-01T12:00:00.123456789Z")
def test_translator_feed_text_writes_the_same_bytes(
    texts: list[str], kind: str, model: str, stamp: str
) -> None:
    def make() -> OllamaStreamTranslator:
        clock = itertools.count()
        return OllamaStreamTranslator(
            kind,
            model,
            start_ns=0,  # type: ignore[arg-type]
            created_at=lambda: f"{stamp}{next(clock)}",
        )

    fast, full = make(), make()
    for now, text in enumerate(texts, 1):
        expected = _lines_or_error(lambda: _full_lines(full, text, now))  # noqa: B023
        assert _lines_or_error(lambda: _fast_lines(fast, text, now)) == expected  # noqa: B023
        assert _stats(fast) == _stats(full)
    end = len(texts) + 1
    assert _lines_or_error(lambda: [compact_json(fast.finish(end))]) == _lines_or_error(
        lambda: [compact_json(full.finish(end))]
    )


@pytest.mark.parametrize("kind", ["chat", "generate"])
def test_a_line_end_inside_content_does_not_cut_the_ndjson_line(kind: str) -> None:
    """ollama-python splits NDJSON where str.splitlines does (U+2028 too): the line of a
    token holding one must stay one line, on the fast path and the full one."""
    t = OllamaStreamTranslator(kind, "m\u2029", start_ns=0)  # type: ignore[arg-type]
    text = json.dumps(_chunk({"content": "one\u2028two\u0085three"}), ensure_ascii=False)
    fast = t.feed_text(text, 1)
    assert fast is not None
    (full,) = t.feed(_chunk({"content": "one\u2028two\u0085three", "role": "assistant"}), 2)
    for line in (fast, compact_json(full)):
        (only,) = line.decode().splitlines()
        decoded = json.loads(only)
        text_out = decoded["message"]["content"] if kind == "chat" else decoded["response"]
        assert text_out == "one\u2028two\u0085three" and decoded["model"] == "m\u2029"


def _content_event(literal: str) -> str:
    return '{"choices":[{"index":0,"delta":{"content":' + literal + '},"finish_reason":null}]}'


@pytest.mark.parametrize("fast", [True, False])
def test_an_emoji_cut_in_two_by_the_backend_reaches_the_client_whole(fast: bool) -> None:
    """A backend that slices text by UTF-16 length sends an emoji's surrogates in two
    chunks, each a lone escape. ollama-python reads each NDJSON line on its own, so a line
    with half a pair gave it a lone surrogate (JavaScript joins them): the first half waits
    for the next piece, and every line holds whole characters."""
    t = _translator()

    def lines(text: str, now: int) -> list[bytes]:
        return _fast_lines(t, text, now) if fast else _full_lines(t, text, now)

    texts = [r'"hi \ud83d"', r'"\ude00 there \ud83d"', r'"\ude01"', r'"\ud83d"', r'"\ude02!"']
    out = [line for now, text in enumerate(texts, 1) for line in lines(_content_event(text), now)]
    contents = [json.loads(line)["message"]["content"] for line in out]
    assert contents == ["hi ", "\U0001f600 there ", "\U0001f601", "\U0001f602!"]
    assert all(b"\\ud" not in line for line in out)
    assert json.loads(compact_json(t.finish(9)))["message"]["content"] == ""


@pytest.mark.parametrize("kind", ["chat", "generate"])
def test_half_a_pair_left_at_the_end_is_flushed_on_the_done_line(kind: str) -> None:
    """Nothing is lost: a first half the backend never completes goes out, as the escape
    it came as, on the done line; a second half alone is written as its escape at once."""
    t = OllamaStreamTranslator(kind, "m", start_ns=0)  # type: ignore[arg-type]
    lone_second = t.feed_text(_content_event(r'"\ude00 x"'), 1)
    assert lone_second is not None and b"\\ude00 x" in lone_second
    assert t.feed_text(_content_event(r'"y \ud83d"'), 2) is not None
    done = compact_json(t.finish(3))
    assert b"\\ud83d" in done
    decoded = json.loads(done)
    text = decoded["message"]["content"] if kind == "chat" else decoded["response"]
    assert text == "\ud83d" and decoded["done"] is True


def test_reasoning_cut_inside_a_pair_is_joined_too() -> None:
    t = _translator()
    first = t.feed(_chunk({"reasoning_content": "hm \ud83e"}), 1)
    second = t.feed(_chunk({"reasoning_content": "\udd14", "content": "ok \ud83d"}), 2)
    third = t.feed(_chunk({"content": "\ude00"}), 3)
    assert [line["message"].get("thinking") for line in first + second] == ["hm ", "\U0001f914"]
    assert [line["message"]["content"] for line in second + third] == ["ok ", "\U0001f600"]


_BACKEND_CHUNKS = {
    "openai": '{"id":"chatcmpl-B9","object":"chat.completion.chunk","created":1727,'
    '"model":"gpt-4o-mini","service_tier":"default","system_fingerprint":"fp_44",'
    '"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],'
    '"usage":null,"obfuscation":"q1"}',
    "vllm": '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    '"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}',
    "ollama": '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    '"model":"llama3","system_fingerprint":"fp_ollama","choices":[{"index":0,'
    '"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}',
    "llama.cpp": '{"choices":[{"finish_reason":null,"index":0,"delta":{"content":"Hi"}}],'
    '"created":1,"id":"chatcmpl-1","model":"m","system_fingerprint":"b1",'
    '"object":"chat.completion.chunk"}',
    "python json.dumps": json.dumps(
        {
            "id": "x",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
        }
    ),
}


@pytest.mark.parametrize("backend", sorted(_BACKEND_CHUNKS))
def test_common_backend_chunks_take_the_fast_path(backend: str) -> None:
    text = _BACKEND_CHUNKS[backend]
    t = _translator()
    for now in (1, 2):  # the second one through the remembered text around the delta
        line = t.feed_text(text, now)
        assert line == compact_json(
            {
                "model": "llama3",
                "created_at": CREATED,
                "message": {"role": "assistant", "content": "Hi"},
                "done": False,
            }
        )
    assert t.content_chunks == 2 and (t.first_token_ns, t.last_token_ns) == (1, 2)
    o = OpenAIStreamObserver()
    o.feed_text(text, 5)
    assert o.content_chunks == 1 and o._shapes.content(text) == '"Hi"'


_HEAD = '{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{'
_NEAR_MISSES = [
    # a member the consumers read, written twice: json.loads keeps the last one
    _HEAD + '"index":0,"delta":{"content":"a","content":""},"finish_reason":null}]}',
    _HEAD + '"index":0,"delta":{"content":"a"},"delta":{},"finish_reason":null}]}',
    _HEAD + '"index":0,"delta":{"content":"a"},"finish_reason":null,"finish_reason":"stop"}]}',
    _HEAD + '"index":0,"delta":{"content":"a"},"finish_reason":null}],"choices":[]}',
    _HEAD + '"index":0,"delta":{"content":"a"},"finish_reason":null}],"usage":null,'
    '"usage":{"prompt_tokens":1,"completion_tokens":2}}',
    # names written with escapes are the same names to json.loads
    _HEAD + '"index":0,"delta":{"\\u0063ontent":"a"},"finish_reason":null}]}',
    _HEAD + '"index":0,"delta":{"content":"a"},"finish_reason":null}],"\\u0075sage":'
    '{"prompt_tokens":1,"completion_tokens":2}}',
    # not JSON: a raw control character, a bad escape, a Unicode digit, trailing data
    _HEAD + '"index":0,"delta":{"content":"a\x01"},"finish_reason":null}]}',
    _HEAD + '"index":0,"delta":{"content":"a\\x41"},"finish_reason":null}]}',
    _HEAD.replace('"created":1', '"created":\u0661') + '"delta":{"content":"a"}}]}',
    _HEAD + '"index":0,"delta":{"content":"a"},"finish_reason":null}]}}',
    # reasoning, a refusal and a second choice are more than content
    _HEAD + '"index":0,"delta":{"content":"a","reasoning_content":"b"}}]}',
    _HEAD + '"index":0,"delta":{"content":null,"refusal":"I cannot"},"finish_reason":null}]}',
    # an error beside the choices is a failure, whatever the delta says
    _HEAD.replace('"created":1', '"created":1,"error":"boom"')
    + '"index":0,"delta":{"content":"a"},"finish_reason":null}]}',
    _HEAD + '"index":0,"delta":{"content":""}},{"index":1,"delta":{"content":"b"}}]}',
]


@pytest.mark.parametrize("text", _NEAR_MISSES)
def test_near_misses_of_the_content_chunk_are_decoded_in_full(text: str) -> None:
    content = json.dumps(_chunk({"content": "warm"}))  # remembers the text around a delta
    _observed_as_decoded([content, text, content])
    assert _ContentChunks().content(text) is None


def _observed_as_decoded(events: list[str]) -> None:
    """``feed_text`` of each event observes what ``feed`` of it decoded does."""
    fast, full = OpenAIStreamObserver(start_ns=0), OpenAIStreamObserver(start_ns=0)
    for now, event in enumerate(events, 1):
        fast.feed_text(event, now)
        chunk = parse_chunk(event)
        if chunk is not None:
            full.feed(chunk, now)
        else:  # (no JSON at all: what feed_text notes)
            full.malformed = full.malformed or not event.startswith("[DONE]")
        assert (*_stats(fast), fast.malformed) == (*_stats(full), full.malformed)


_COMPACT_HEAD = _HEAD + '"index":0,"delta":'
_COMPACT_TAIL = ',"finish_reason":null}]}'
# deltas of the plain shape ({"content": a string}, as most backends write it) that the
# plain pattern tried first must read as json.loads does: some are no JSON at all
_PLAIN_DELTAS = [
    '{"content":"a"}',
    '{"content":""}',
    '{"content":"a\\"b"}',
    '{"content":"a\\\\"}',
    '{"content":"\\u00e9\\ud83d\\ude00"}',
    '{"content":"a\x01"}',
    '{"content":"a\\x41"}',
    '{"content":"a\\u12"}',
    '{"content":"a"b"}',
    '{"content":"a"}}',
    '{"content":null}',
    '{"content":"a","role":"assistant"}',
]


@pytest.mark.parametrize("delta", _PLAIN_DELTAS)
def test_plain_deltas_read_as_decoding_reads_them(delta: str) -> None:
    warm = _COMPACT_HEAD + '{"content":"warm"}' + _COMPACT_TAIL  # remembers head and tail
    _observed_as_decoded([warm, _COMPACT_HEAD + delta + _COMPACT_TAIL, warm])


def test_feed_text_defers_other_chunks() -> None:
    t = _translator()
    finish = json.dumps(_chunk({}, finish="stop"))
    usage = json.dumps(_chunk(usage={"prompt_tokens": 1, "completion_tokens": 2}))
    thinking = json.dumps(_chunk({"reasoning_content": "hm"}))
    assert [t.feed_text(x, 1) for x in (finish, usage, thinking)] == [None, None, None]
    assert t.feed_text(json.dumps(_chunk({"role": "assistant", "content": ""})), 1) == b""
    t.finish(2)
    with pytest.raises(RuntimeError):
        t.feed_text(json.dumps(_chunk({"content": "x"})), 3)


def test_feed_text_with_a_non_string_timestamp_still_matches() -> None:
    t = OllamaStreamTranslator("generate", "m", start_ns=0, created_at=lambda: 7)  # type: ignore[arg-type,return-value]
    line = t.feed_text(json.dumps(_chunk({"content": "x"})), 1)
    assert line == b'{"model":"m","created_at":7,"response":"x","done":false}'


# =============================================================================================
# Embeddings
# =============================================================================================


def _emb_resp(vectors: list[Any], shuffled: bool = False) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    if shuffled:
        data.reverse()
    return {
        "object": "list",
        "data": data,
        "model": "b",
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
    }


def test_embed_response_in_index_order() -> None:
    out = openai_embeddings_to_ollama_embed(
        _emb_resp([[0.1], [0.2], [0.3]], shuffled=True), "m", TIMINGS
    )
    assert out == {
        "model": "m",
        "embeddings": [[0.1], [0.2], [0.3]],
        "total_duration": 3_000,
        "load_duration": 0,
        "prompt_eval_count": 6,
    }
    EmbedResponse.model_validate(out)


def test_embed_vectors_are_cut_to_the_dimensions_asked_for_as_ollama_cuts_them() -> None:
    """A vector longer than ``dimensions`` keeps its first values at unit length; one no
    longer stays as it came; a zero vector stays zero; values that are no numbers (a
    broken backend) are cut but not scaled, never a 500."""
    vectors = [[3.0, 4.0, 12.0], [0.6, 0.8], [0.0, 0.0, 0.0], ["a", None, 1.0]]
    out = openai_embeddings_to_ollama_embed(_emb_resp(vectors), "m", TIMINGS, 2)
    assert out["embeddings"][0] == pytest.approx([0.6, 0.8])
    assert out["embeddings"][1:] == [[0.6, 0.8], [0.0, 0.0], ["a", None]]
    whole = openai_embeddings_to_ollama_embed(_emb_resp(vectors), "m", TIMINGS, 0)
    assert whole["embeddings"] == vectors


@given(count=st.integers(1, 30), size=st.integers(1, 8))
def test_embed_batches_keep_every_input_in_order(count: int, size: int) -> None:
    payload = {"model": "b", "input": [f"t{i}" for i in range(count)], "dimensions": 4}
    batches = embed_batches(payload, size)
    assert [text for batch in batches for text in batch["input"]] == payload["input"]
    assert all(0 < len(batch["input"]) <= size for batch in batches)
    assert len(batches) == -(-count // size)
    assert all(batch["model"] == "b" and batch["dimensions"] == 4 for batch in batches)
    if count <= size:
        assert batches == [payload]


def test_embed_batches_default_to_openai_s_cap() -> None:
    payload = {"model": "b", "input": ["x"] * 5_000}
    assert [len(b["input"]) for b in embed_batches(payload)] == [2_048, 2_048, 904]


@given(
    texts=st.lists(st.text(max_size=40), min_size=1, max_size=40),
    tokens=st.integers(1, 200),
)
def test_embed_batches_bound_the_tokens_of_each(texts: list[str], tokens: int) -> None:
    """No batch holds more than ``tokens`` UTF-8 bytes (a bound on its tokens) beyond
    one per input, unless it is a single input; order and every input kept."""
    payload = {"model": "b", "input": texts}
    batches = embed_batches(payload, 2_048, tokens)
    assert [text for batch in batches for text in batch["input"]] == texts
    for batch in batches:
        held = sum(len(text.encode(errors="replace")) + 1 for text in batch["input"])
        assert held <= tokens or len(batch["input"]) == 1


def test_embed_batches_stay_under_openai_s_token_cap() -> None:
    """2,048 chunks of 1,000 characters (a RAG ingest, ~500,000 tokens) in one request:
    OpenAI refuses it (max 300,000 tokens per request)."""
    chunk = "word " * 200
    batches = embed_batches({"model": "b", "input": [chunk] * 2_048})
    assert [len(b["input"]) for b in batches] == [299] * 6 + [254]
    accented = embed_batches({"model": "b", "input": ["é" * 1_000] * 300})  # 2 bytes each
    assert [len(b["input"]) for b in accented] == [149, 149, 2]
    ids = embed_batches({"model": "b", "input": [[1] * 1_000] * 300})  # token ids: exact
    assert [len(b["input"]) for b in ids] == [299, 1]


def test_joined_embeddings_renumber_in_order_and_sum_the_usage() -> None:
    first = _emb_resp([[0.1], [0.2]], shuffled=True)
    second = _emb_resp([[0.3]])
    joined = joined_embeddings([first, second])
    assert [item["index"] for item in joined["data"]] == [0, 1, 2]
    assert embedding_count(joined) == 3
    assert joined["usage"] == {"prompt_tokens": 12, "total_tokens": 12}
    out = openai_embeddings_to_ollama_embed(joined, "m", TIMINGS)
    assert out["embeddings"] == [[0.1], [0.2], [0.3]]
    assert out["prompt_eval_count"] == 12
    assert joined_embeddings([first]) is first


def test_embed_response_base64_vectors() -> None:
    b64 = base64.b64encode(struct.pack("<3f", 0.5, -1.0, 2.0)).decode()
    out = openai_embeddings_to_ollama_embed(_emb_resp([b64]), "m", TIMINGS)
    assert out["embeddings"] == [[0.5, -1.0, 2.0]]


def test_embeddings_legacy_response() -> None:
    out = openai_embeddings_to_ollama_embeddings(_emb_resp([[1.0, 2.0]]))
    assert out == {"embedding": [1.0, 2.0]}
    EmbeddingsResponse.model_validate(out)
    out = openai_embeddings_to_ollama_embeddings(_emb_resp([[1.0], [2.0]], shuffled=True))
    assert out == {"embedding": [1.0], "embeddings": [[1.0], [2.0]]}
    assert openai_embeddings_to_ollama_embeddings({}) == {"embedding": []}


# =============================================================================================
# Models
# =============================================================================================

BACKEND_MODELS = [
    {
        "id": "meta/Llama-3-8B",
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "meta",
        "max_model_len": 8192,
    },
    {"id": "nomic-embed-text", "object": "model"},  # llama-cpp-python style: no created
    {"id": "qwen2.5:7b", "object": "model", "created": 1_710_000_000},
    "garbage",
    {"object": "model"},
]
MAPPER = ModelMapper(
    {"llama3": "meta/Llama-3-8B", "l3": "meta/Llama-3-8B", "missing": "not/listed"}
)


def test_tags() -> None:
    out = openai_models_to_ollama_tags(BACKEND_MODELS, MAPPER)  # type: ignore[arg-type]
    names = [m["name"] for m in out["models"]]
    # spelled as Ollama lists them: Open WebUI looks "NAME:latest" up in this list
    assert names == ["llama3:latest", "l3:latest", "nomic-embed-text:latest", "qwen2.5:7b"]
    first = out["models"][0]
    assert first["model"] == "llama3:latest"
    assert first["size"] == 0
    assert first["digest"] == hashlib.sha256(b"meta/Llama-3-8B").hexdigest()  # as Ollama: bare
    assert first["details"] == {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "",
        "quantization_level": "",
    }
    parsed = ListResponse.model_validate(out)
    assert parsed.models[0].modified_at == datetime.fromtimestamp(1_700_000_000, UTC)
    assert parsed.models[2].modified_at == datetime.fromtimestamp(0, UTC)


def test_listed_capabilities_read_llama_cpps_ollama_style_entries() -> None:
    """llama.cpp's server sends its models in Ollama's shape beside ``data``; what they
    say goes by Ollama's names ("multimodal": a projector for images, "vision"), anything
    else (an unknown word, "insert", which trioproxy refuses, a malformed entry) is left out."""
    payload = {
        "models": [
            {"name": "m.gguf", "model": "m.gguf", "capabilities": ["completion", "multimodal"]},
            {"name": "e", "capabilities": ["embedding", "embedding", "insert", "audio", 3, None]},
            {"model": "", "name": "named", "capabilities": ["completion"]},
            {"model": "no-capabilities"},
            {"model": "odd", "capabilities": "completion"},
            {"capabilities": ["completion"]},
            "junk",
        ],
        "object": "list",
        "data": [{"id": "m.gguf"}],
    }
    assert listed_capabilities(payload) == {
        "m.gguf": ("completion", "vision"),
        "e": ("embedding",),
        "named": ("completion",),
    }
    for nothing in ({"data": []}, {"models": 5}, [], None, "x"):
        assert listed_capabilities(nothing) == {}


def test_show_with_listed_and_declared_capabilities() -> None:
    """Declared capabilities are the whole list (and decide the template); else what the
    backend's list gave adds to the entry's; a list saying embedding only is an embedder."""
    entry = {"id": "m", "max_model_len": 4096, "architecture": {"input_modalities": ["image"]}}
    assert ollama_show("m", entry, listed=("completion", "vision"))["capabilities"] == [
        "completion",
        "tools",
        "vision",
    ]
    assert ollama_show("m", {"id": "m"}, listed=("completion", "thinking"))["capabilities"] == [
        "completion",
        "tools",
        "thinking",
    ]
    assert ollama_show("m", {"id": "m"}, listed=("embedding",))["capabilities"] == ["embedding"]
    plain = DeclaredModel(("completion",), 65536)
    shown = ollama_show("m", entry, listed=("completion", "vision"), declared=plain)
    assert shown["capabilities"] == ["completion"]
    assert shown["template"] == "{{ .Prompt }}"
    assert shown["model_info"] == {"general.architecture": "m", "m.context_length": 65536}
    # an embedding model's name, declared a chat model: the declaration wins
    chat = DeclaredModel(("completion", "tools"), None)
    declared = ollama_show("text-embed-chat", {"id": "text-embed-chat"}, declared=chat)
    assert declared["capabilities"] == ["completion", "tools"]
    assert ".Tools" in declared["template"]
    # only a window: the capabilities stay the backend's
    window = ollama_show("m", entry, declared=DeclaredModel(None, 1024))
    assert window["capabilities"] == ["completion", "tools", "vision"]
    assert window["model_info"]["m.context_length"] == 1024
    ShowResponse.model_validate(shown)


def test_declared_window_in_ps_and_openai_entries() -> None:
    mapper = ModelMapper(
        {"alias": "vllm-model"},
        {"alias": DeclaredModel(None, 2048), "bare": DeclaredModel(("completion",), 1000)},
    )
    models = [{"id": "vllm-model", "max_model_len": 32768, "root": "vllm-model"}, {"id": "bare"}]
    ps = {m["name"]: m["context_length"] for m in ollama_ps(models, mapper)["models"]}
    assert ps == {"alias:latest": 2048, "bare:latest": 1000}
    listed = {m["id"]: m for m in openai_model_list(models, mapper)["data"]}
    assert listed["alias"]["max_model_len"] == 2048
    assert set(listed["bare"]) == {"id", "object", "created", "owned_by"}  # no field made up
    retrieved = openai_model_entry("alias", models[0], mapper.declared("alias"))
    assert retrieved["max_model_len"] == 2048
    assert openai_model_entry("vllm-model", models[0])["max_model_len"] == 32768


def test_tags_empty() -> None:
    assert ListResponse.model_validate(openai_models_to_ollama_tags([], ModelMapper()))


def test_show() -> None:
    out = ollama_show("llama3", BACKEND_MODELS[0])  # type: ignore[arg-type]
    # the context window the backend lists, where Ollama's clients (Zed, Continue) read it
    info = {"general.architecture": "llama", "llama.context_length": 8192}
    assert out["model_info"] == info
    assert out["capabilities"] == ["completion", "tools"]
    parsed = ShowResponse.model_validate(out)
    assert parsed.modelinfo == info
    assert parsed.modified_at == datetime.fromtimestamp(1_700_000_000, UTC)
    assert "meta/Llama-3-8B" in out["modelfile"]
    # a template that reads .Tools, as Ollama's does when it lists "tools": LiteLLM's
    # supports_function_calling("ollama/...") looks for "tools" in the template only
    assert ".Tools" in out["template"] and ".Prompt" in out["template"]
    emb = ollama_show("nomic-embed-text", None)
    assert emb["capabilities"] == ["embedding"]
    assert "tools" not in emb["template"].lower()
    ShowResponse.model_validate(emb)
    assert ollama_show("my-embedder", None, embedding=False)["capabilities"] == [
        "completion",
        "tools",
    ]
    assert ollama_show("x", None, embedding=True)["capabilities"] == ["embedding"]
    assert ollama_show("alias", {"id": "bge-embed"})["capabilities"] == ["embedding"]
    # OpenRouter's entries say what a model takes and does
    openrouter = {"id": "openai/gpt-4o", "context_length": 128000,
                  "architecture": {"input_modalities": ["text", "image"]},
                  "supported_parameters": ["tools", "reasoning", "temperature"]}  # fmt: skip
    shown = ollama_show("gpt-4o", openrouter)
    assert shown["capabilities"] == ["completion", "tools", "vision", "thinking"]
    assert ShowResponse.model_validate(shown).capabilities == shown["capabilities"]
    assert ollama_show("x", {"id": "x"})["model_info"] == {"general.architecture": "x"}
    # a context window that decodes as infinity (1e400) is no context window: left out
    huge = ollama_show("x", {"id": "x", "context_length": float("inf")})
    assert huge["model_info"] == {"general.architecture": "x"}
    assert (
        ollama_ps([{"id": "x", "max_model_len": float("inf")}], MAPPER)["models"][0][
            "context_length"
        ]
        == 0
    )


def test_ps_reports_the_window_llama_cpp_serves_not_the_trained_one() -> None:
    """Some llama.cpp servers list the served window (``n_ctx``) beside the trained one:
    /api/ps's context_length is the served window, as Ollama's (what a prompt must fit)."""
    served = {"id": "m", "meta": {"n_ctx_train": 131072, "n_ctx": 8192}}
    assert ollama_ps([served], MAPPER)["models"][0]["context_length"] == 8192
    trained_only = {"id": "m", "meta": {"n_ctx_train": 131072}}
    assert ollama_ps([trained_only], MAPPER)["models"][0]["context_length"] == 0


def test_llama_cpp_meta_that_is_no_number_is_left_out() -> None:
    """llama.cpp's ``meta`` is read as Ollama reads a GGUF; anything that is no count
    (a string, a negative, 1e400, a meta that is no object) is left out, never a 500."""
    for meta in ("x", None, [1], {"n_ctx_train": "8k", "n_embd": -1, "n_params": float("inf"),
                                  "size": True}):  # fmt: skip
        entry = {"id": "m", "meta": meta}
        shown = ollama_show("m", entry)
        assert shown["model_info"] == {"general.architecture": "m"}
        assert shown["details"]["parameter_size"] == ""
        tag = openai_models_to_ollama_tags([entry], ModelMapper())["models"][0]
        assert tag["size"] == 0 and ListResponse.model_validate({"models": [tag]})
    # the served window a backend lists wins over llama.cpp's trained one
    both = {"id": "m", "max_model_len": 4096, "meta": {"n_ctx_train": 131072}}
    assert ollama_show("m", both)["model_info"]["m.context_length"] == 4096


@pytest.mark.parametrize(
    ("count", "shown"),
    [(8_030_261_248, "8.0B"), (70_553_706_496, "70.6B"), (136_727_040, "137M"),
     (1_500_000_000_000, "1.5T"), (22_000, "22K"), (999, "999"),
     (999_960_000, "1.0B"), (999_600, "1M"), (950_000_000, "950M")],
)  # fmt: skip
def test_parameter_size_as_ollama_writes_it(count: int, shown: str) -> None:
    entry = {"id": "m", "meta": {"n_params": count}}
    assert ollama_show("m", entry)["details"]["parameter_size"] == shown


def test_ps() -> None:
    now = 1_700_000_000 * 10**9
    out = ollama_ps(BACKEND_MODELS, MAPPER, now_ns=now)  # type: ignore[arg-type]
    parsed = ProcessResponse.model_validate(out)
    assert [m.model for m in parsed.models] == [
        "llama3:latest",
        "l3:latest",
        "nomic-embed-text:latest",
        "qwen2.5:7b",
    ]
    assert parsed.models[0].context_length == 8192
    assert parsed.models[1].context_length == 8192
    assert parsed.models[2].context_length == 0
    assert parsed.models[0].expires_at == datetime.fromtimestamp(1_700_000_300, UTC)
    assert all(m["size_vram"] == 0 for m in out["models"])


def test_ps_from_its_template_is_the_same_bytes_at_any_time() -> None:
    """``/api/ps`` is written once per list as of the epoch and given each request's time
    where every expiry goes: the bytes :func:`ollama_ps` writes then, also for a model
    whose name spells the template's expiry (inside a string its quotes are escaped)."""
    spelled = {"id": '"expires_at":"1970-01-01T00:05:00.000000000Z"', "object": "model"}
    models: Any = [*BACKEND_MODELS, spelled]
    parts = ollama_ps_parts(compact_json(ollama_ps_template(models, MAPPER)))
    assert len(parts) == len(ollama_ps(models, MAPPER)["models"]) + 1
    for now in (0, 1_700_000_000 * 10**9 + 123, 4_102_444_800 * 10**9):
        assert ollama_ps_joined(parts, now) == compact_json(ollama_ps(models, MAPPER, now_ns=now))


def test_openai_model_list() -> None:
    out = openai_model_list(BACKEND_MODELS, MAPPER)  # type: ignore[arg-type]
    assert out["object"] == "list"
    assert [m["id"] for m in out["data"]] == ["llama3", "l3", "nomic-embed-text", "qwen2.5:7b"]
    # the backend's other fields stay (what clients size prompts by)
    assert out["data"][0] == {
        "id": "llama3",
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "meta",
        "max_model_len": 8192,
    }
    assert out["data"][2] == {
        "id": "nomic-embed-text",
        "object": "model",
        "created": 0,
        "owned_by": "trioproxy",
    }
    for entry in out["data"]:
        OpenAIModel.model_validate(entry, strict=True)


def test_openai_model_entry() -> None:
    assert openai_model_entry("x") == {
        "id": "x",
        "object": "model",
        "created": 0,
        "owned_by": "trioproxy",
    }
    assert openai_model_entry("x", {"id": "b", "created": 12.7, "owned_by": ""})["created"] == 12
    # vLLM's entry names the backend's model again in "root": a mapping must not leak it
    vllm = {
        "id": "meta/Llama-3-8B",
        "object": "model",
        "created": 1,
        "owned_by": "vllm",
        "root": "meta/Llama-3-8B",
        "parent": None,
        "max_model_len": 8192,
    }
    assert openai_model_entry("llama3", vllm) == {
        "id": "llama3",
        "object": "model",
        "created": 1,
        "owned_by": "vllm",
        "parent": None,
        "max_model_len": 8192,
    }


@pytest.mark.parametrize(
    ("model_id", "family"),
    [
        ("meta-llama/Meta-Llama-3-8B", "llama"),
        ("codellama:7b", "codellama"),
        ("Qwen/Qwen2.5-7B", "qwen"),
        ("gpt-4o", "gpt"),
        ("text-embedding-3-small", "text"),
        ("123", "unknown"),
    ],
)
def test_model_family(model_id: str, family: str) -> None:
    assert model_family(model_id) == family


def test_is_embedding_model() -> None:
    assert is_embedding_model("text-embedding-3-small")
    assert is_embedding_model("nomic-Embed-text")
    assert not is_embedding_model("llama3")


# ---- the Responses API stream observer ---------------------------------------------------


def _response_event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "sequence_number": 0, **fields}, separators=(",", ":"))


def test_responses_observer_counts_deltas_and_reads_the_closing_usage() -> None:
    o = ResponsesStreamObserver()
    usage = {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8}
    events = [
        (_response_event("response.created", response={"status": "in_progress"}), 10),
        (_response_event("response.output_text.delta", delta="", item_id="m"), 15),
        (_response_event("response.reasoning_text.delta", delta="hmm", item_id="m"), 20),
        (_response_event("response.output_text.delta", delta="Hi", item_id="m"), 30),
        ('{"sequence_number":1,"type":"response.function_call_arguments.delta","delta":"{"}', 40),
        (_response_event("response.output_text.done", text="Hi", item_id="m"), 50),
        (_response_event("response.completed", response={"status": "completed", "usage": usage}),
         60),
        ("not json", 70),
    ]  # fmt: skip
    for data, now in events:
        o.feed_text(data, now)
    assert (o.first_token_ns, o.last_token_ns, o.content_chunks) == (20, 40, 3)
    assert (o.prompt_tokens, o.completion_tokens, o.finish_reason) == (5, 3, "completed")


def test_responses_observer_counts_speech_by_its_transcript_not_its_audio_bytes() -> None:
    o = ResponsesStreamObserver()
    for n, word in enumerate(["Hel", "lo"]):
        o.feed_text(_response_event("response.audio.delta", delta="UklGRiQ="), 10 + n)
        o.feed_text(_response_event("response.audio.transcript.delta", delta=word), 20 + n)
    assert (o.first_token_ns, o.content_chunks) == (20, 2)


@pytest.mark.parametrize("end", ["response.incomplete", "response.failed"])
def test_responses_observer_reads_usage_from_every_closing_event(end: str) -> None:
    o = ResponsesStreamObserver()
    closing = {"status": end[9:], "usage": {"output_tokens": 2}}
    o.feed_text(_response_event(end, response=closing), 1)
    assert (o.completion_tokens, o.prompt_tokens, o.finish_reason) == (2, None, end[9:])


def test_responses_observer_names_the_response_from_its_closing_event_too() -> None:
    """A stream resumed after its start has no ``response.created``: the closing event
    names the response; an opening one, when there is one, names it first."""
    o = ResponsesStreamObserver()
    closing = {"id": "resp_1", "model": "m-2024", "status": "completed"}
    o.feed_text(_response_event("response.completed", response=closing), 1)
    assert (o.response_id, o.response_model) == ("resp_1", "m-2024")
    o = ResponsesStreamObserver()
    o.feed_text(_response_event("response.created", response={"id": "r", "model": "m"}), 1)
    o.feed_text(_response_event("response.completed", response=closing), 2)
    assert (o.response_id, o.response_model) == ("r", "m")


def test_responses_observer_tells_the_relay_about_progress_the_end_and_failures() -> None:
    o = ResponsesStreamObserver()
    o.feed_text(_response_event("response.output_item.added", item={"type": "reasoning"}), 1)
    assert not (o.progressed or o.ended or o.failed)  # an announced item is not work done
    o.feed_text(_response_event("response.output_item.done", item={"type": "reasoning"}), 2)
    assert o.progressed and o.first_token_ns is None  # progress, but no token yet
    o.feed_text(_response_event("response.failed", response={"status": "failed"}), 3)
    assert o.ended and o.failed
    chat = OpenAIStreamObserver()
    chat.feed_text('{"error":null,"choices":[]}', 1)
    assert not chat.failed
    chat.feed_text('{"error":{"message":"overloaded"}}', 2)
    assert chat.failed and not chat.ended  # a chat stream ends with [DONE]


# =============================================================================================
# Failures, refusals and hidden thinking in a stream
# =============================================================================================


def _openrouter_error_chunk() -> dict[str, Any]:
    """OpenRouter's documented mid-stream error: an error beside a choice finished with
    ``finish_reason: "error"``."""
    chunk = _chunk({"content": ""}, finish="error")
    chunk["error"] = {"code": 502, "message": "Provider disconnected unexpectedly"}
    return chunk


@pytest.mark.parametrize("consumer", [OpenAIStreamObserver, _translator])
def test_an_error_beside_choices_fails_the_stream(consumer: Callable[[], Any]) -> None:
    o = consumer()
    o.feed(_chunk({"content": "Hello"}), 1)
    assert not o.failed
    o.feed(_openrouter_error_chunk(), 2)
    assert o.failed
    assert o.error == {"code": 502, "message": "Provider disconnected unexpectedly"}


def test_finish_reason_error_alone_fails_the_stream() -> None:
    o = OpenAIStreamObserver()
    o.feed(_chunk({"content": "Hel"}), 1)
    o.feed(_chunk({}, finish="error"), 2)
    assert o.failed and o.error == 'the backend ended the answer with finish_reason "error"'


def test_a_refusal_is_the_answer_on_the_ollama_api() -> None:
    """OpenAI's structured outputs refuse in ``refusal``, with ``content`` null; Ollama has
    no field for it, so it is the content (an empty answer would read as the model saying
    nothing, and a ``format`` caller would fail to parse it)."""
    t = _translator()
    lines = t.feed_text(json.dumps(_chunk({"content": None, "refusal": "I can't"})), 1)
    assert lines is None  # not the content-only shape: decoded in full
    lines = t.feed(_chunk({"content": None, "refusal": "I can't"}), 1)
    assert [line["message"]["content"] for line in lines] == ["I can't"]
    assert t.content_chunks == 1
    message = {"role": "assistant", "content": None, "refusal": "I can't help"}
    resp = {"choices": [{"message": message, "finish_reason": "stop"}]}
    timings = Timings(total_ns=1, prompt_eval_ns=0, eval_ns=1)
    assert openai_chat_to_ollama_chat(resp, "m", CREATED, timings)["message"]["content"] == (
        "I can't help"
    )
    assert openai_chat_to_ollama_generate(resp, "m", CREATED, timings)["response"] == (
        "I can't help"
    )


def test_think_false_hides_the_thinking_but_counts_its_tokens() -> None:
    t = OllamaStreamTranslator("chat", "m", start_ns=0, created_at=lambda: CREATED,
                               show_thinking=False)  # fmt: skip
    assert t.feed(_chunk({"reasoning_content": "hmm"}), 1) == []
    lines = t.feed(_chunk({"reasoning_content": "so", "content": "Hi"}), 2)
    assert [line["message"] for line in lines] == [{"role": "assistant", "content": "Hi"}]
    assert t.content_chunks == 2  # the reasoning was generated, so it is tokens all the same
    message = {"role": "assistant", "content": "Hi", "reasoning_content": "hmm"}
    resp = {"choices": [{"message": message, "finish_reason": "stop"}]}
    timings = Timings(total_ns=1, prompt_eval_ns=0, eval_ns=1)
    chat = openai_chat_to_ollama_chat(resp, "m", CREATED, timings, show_thinking=False)
    assert chat["message"] == {"role": "assistant", "content": "Hi"}
    generate = openai_chat_to_ollama_generate(resp, "m", CREATED, timings, show_thinking=False)
    assert "thinking" not in generate
    assert openai_chat_to_ollama_chat(resp, "m", CREATED, timings)["message"]["thinking"] == "hmm"


# ---- read as Ollama reads them (its Go types) ------------------------------------------------


def test_roles_are_read_in_lower_case_as_ollama_reads_them() -> None:
    """A "Tool" message lost its tool_call_id (the checks were case-sensitive) and
    OpenAI refuses a role spelled "User"."""
    call = {"function": {"name": "weather", "arguments": {"city": "Paris"}}}
    body = validate_ollama_chat(
        {
            "model": "m",
            "messages": [
                {"role": "User", "content": "weather?"},
                {"role": "ASSISTANT", "content": "", "tool_calls": [call]},
                {"role": "Tool", "content": "rain", "tool_name": "weather"},
            ],
        }
    )
    out = ollama_chat_to_openai(body, "b")
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "tool"]
    assert out["messages"][1]["content"] is None
    assert out["messages"][2]["tool_call_id"] == out["messages"][1]["tool_calls"][0]["id"]


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"type": "string"}},
        {"type": "string", "enum": ["a", "b"]},
        {"anyOf": [{"type": "object", "properties": {}, "additionalProperties": False}]},
        {},
    ],
)
def test_strict_mode_only_for_a_schema_with_an_object_at_its_top(schema: dict) -> None:
    """OpenAI's strict mode refuses any other top (a 400); Ollama accepts them."""
    out = ollama_generate_to_openai(
        validate_ollama_generate({"model": "m", "prompt": "p", "format": schema}), "b"
    )
    assert out["response_format"]["type"] == "json_schema"
    assert "strict" not in out["response_format"]["json_schema"]


def test_options_read_as_ollamas_go_decoder_reads_them() -> None:
    def sampling(**options: Any) -> dict:
        body = validate_ollama_generate({"model": "m", "prompt": "p", "options": options})
        return ollama_generate_to_openai(body, "b")

    assert "seed" not in sampling(seed=-1)  # Ollama's default: a random seed
    assert sampling(seed=42.7)["seed"] == 42  # the fraction dropped
    assert sampling(num_predict=10.5)["max_tokens"] == 10
    assert "max_tokens" not in sampling(num_predict=0.5)
    with pytest.raises(RequestValidationError, match=r"options\.seed"):
        sampling(seed="42")


@pytest.mark.parametrize(
    ("keep_alive", "unloads"),
    [
        (0, True), (0.0, True), ("0", True), ("0s", True), ("0m", True), ("0h", True),
        ("0ms", True), ("0.0s", True), ("0m0s", True), ("5m", False), (-1, False),
        ("-1", False), ("1h0m", False), (None, False), ("never", False), (True, False),
    ],
)  # fmt: skip
def test_keep_alive_zero_in_any_go_duration_spelling_unloads(
    keep_alive: object, unloads: bool
) -> None:
    assert keep_alive_unloads(keep_alive) is unloads


def test_a_crafted_keep_alive_is_read_in_linear_time() -> None:
    """The Go-duration pattern split a run of digits every possible way: 82 bytes of
    ``"11111111s" * 9 + "!"`` held the worker 30 s, and each group multiplied it by 8.
    Run apart, so a regression fails here instead of hanging the suite."""
    code = (
        "from trioproxy.translate import keep_alive_unloads as k;"
        "assert not k('11111111s' * 40 + '!') and not k('1' * 100000 + 's!')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)


def test_a_long_tool_history_is_paired_in_linear_time() -> None:
    """Each tool message scanned every open call: 20,000 calls answered by ids that match
    none of them (a 1.7 MB body) held the worker 20 s. Run apart, as above."""
    code = """
from trioproxy.translate import validate_ollama_chat, ollama_chat_to_openai
n = 60000
calls = [{"function": {"name": "f", "arguments": {}}} for _ in range(n)]
messages = [{"role": "assistant", "content": "", "tool_calls": calls}]
messages += [{"role": "tool", "content": "x", "tool_call_id": f"no{i}"} for i in range(n)]
messages += [{"role": "tool", "content": "x"} for _ in range(n)]  # the oldest open call each
out = ollama_chat_to_openai(validate_ollama_chat({"model": "m", "messages": messages}), "m")
assert out["messages"][-1]["tool_call_id"] == out["messages"][0]["tool_calls"][-1]["id"]
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_tool_call_fragments_held_are_bounded() -> None:
    from trioproxy.translate import MAX_HELD_TOOL_CALL_BYTES, StreamTooLarge

    translator = OllamaStreamTranslator("chat", "m", start_ns=0)
    piece = "x" * 65536

    def fragment(call: dict) -> dict:
        return {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}

    translator.feed(fragment({"index": 0, "id": "c", "function": {"name": "f"}}), 1)
    with pytest.raises(StreamTooLarge):
        for _ in range(MAX_HELD_TOOL_CALL_BYTES // len(piece) + 1):
            translator.feed(fragment({"index": 0, "function": {"arguments": piece}}), 2)


def test_a_participant_name_openai_would_refuse_is_left_out() -> None:
    """Ollama's messages have no ``name`` and Ollama ignores one; OpenAI refuses a name
    outside [A-Za-z0-9_-]{1,64} with a 400 for the whole request."""
    names = ["alice_2", "Jane Doe", "x" * 65, "é", ""]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi", "name": n} for n in names]}
    sent = ollama_chat_to_openai(body, "b")["messages"]
    assert [m.get("name") for m in sent] == ["alice_2", None, None, None, None]
