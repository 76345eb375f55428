"""The Anthropic Messages API translation (``trioproxy.anthropic``), without sockets.

Requests become chat completions the openai SDK's own types accept; answers and streamed
events are read with the anthropic SDK's types, and a translated stream, accumulated by
the SDK's own accumulator, is the message the non-stream translation gives.
"""

from __future__ import annotations

import itertools
import json
import sys
from typing import Any
from unittest import mock

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from pydantic import TypeAdapter

from trioproxy import anthropic as an
from trioproxy.errors import error_body_for, is_anthropic_path, is_openai_path
from trioproxy.partial_json import ObjectPrefix
from trioproxy.translate import RequestValidationError, StreamTooLarge, read_chunk

from .test_partial_json import OBJECTS, SPELLINGS, pieces_of, replaced_loads, text_of

EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)
OPENAI_MESSAGES: TypeAdapter[list[ChatCompletionMessageParam]] = TypeAdapter(
    list[ChatCompletionMessageParam]
)
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
    "rkJggg=="
)


def request(**more: Any) -> dict[str, Any]:
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    return {**body, **more}


def translated(**more: Any) -> dict[str, Any]:
    return an.messages_to_openai(an.validate_messages(request(**more)), "backend-m")


def test_fields_translated() -> None:
    out = translated(
        system=[{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        stop_sequences=["END"],
        metadata={"user_id": "u"},
        stream=True,
    )
    assert out == {
        "model": "backend-m",
        "messages": [
            {"role": "system", "content": "one\n\ntwo"},
            {"role": "user", "content": "hi"},
        ],
        "max_tokens": 100,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "stop": ["END"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_documents_the_backend_cannot_read_are_named_not_refused() -> None:
    """A PDF (Claude Code's Read tool returns one in a tool result, and keeps it in every
    later request) becomes a note the model reads: a 400 would end the conversation."""
    pdf = {
        "type": "document",
        "title": "report.pdf",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
    }
    plain = {"type": "document", "source": {"type": "text", "data": "plain words"}}
    out = translated(
        messages=[
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read"}]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [pdf]},
                    pdf,
                    plain,
                ],
            },
        ]
    )
    note = "[document 'report.pdf' (application/pdf) left out: this model cannot read it]"
    assert out["messages"][1:] == [
        {"role": "tool", "tool_call_id": "t1", "content": note},
        {"role": "user", "content": f"{note}\nplain words"},
    ]
    OPENAI_MESSAGES.validate_python(out["messages"])


def test_a_document_of_malformed_blocks_is_read_leniently() -> None:
    """A document's own content blocks are not checked: one whose text is no string is
    left out of its text, not a TypeError (a 500 for a client's mistake)."""
    doc = {
        "type": "document",
        "source": {"type": "content", "content": [{"type": "text", "text": 5}, "x", {}]},
    }
    ok = {"type": "text", "text": "kept"}
    other = {"type": "document", "source": {"type": "content", "content": [ok, {"text": []}]}}
    out = translated(messages=[{"role": "user", "content": [doc, other]}])
    assert out["messages"] == [{"role": "user", "content": "\nkept"}]


def test_system_messages_in_the_conversation_stay_where_they_are() -> None:
    """Claude Code (2.1, beta ``mid-conversation-system-2026-04-07``) sends system messages
    among the others on every request: the conversation before one stays a prefix."""
    out = translated(
        system="first",
        messages=[
            {"role": "user", "content": "context"},
            {"role": "system", "content": [{"type": "text", "text": "agents: a, b"}]},
            {"role": "user", "content": "say hi"},
            {"role": "system", "content": ""},
            {"role": "system"},
        ],
    )
    assert out["messages"] == [
        {"role": "system", "content": "first"},
        {"role": "user", "content": "context"},
        {"role": "system", "content": "agents: a, b"},
        {"role": "user", "content": "say hi"},
    ]
    OPENAI_MESSAGES.validate_python(out["messages"])


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_tools_and_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    tools = [
        {"name": "f", "description": "d", "input_schema": {"type": "object"}},
        {"type": "web_search_20250305", "name": "web_search"},  # a server tool: dropped
    ]
    out = translated(tools=tools, tool_choice=choice)
    assert out["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
        }
    ]
    assert out["tool_choice"] == expected
    none = translated(tools=tools, tool_choice={"type": "none"})
    assert "tools" not in none and "tool_choice" not in none


def test_conversation_with_tools_images_and_thinking() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "calling"},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
                {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "is_error": True,
                    "content": [
                        {"type": "text", "text": "bad"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                        },
                    ],
                },
                {"type": "text", "text": "go on", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ]
    out = translated(messages=messages)["messages"]
    data_url = f"data:image/png;base64,{PNG}"
    assert out == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": "calling",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a":1}'},
                },
                {"id": "toolu_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "42"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: bad"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": "go on"},
            ],
        },
    ]
    OPENAI_MESSAGES.validate_python(out)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"model": 5}, "model"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "system", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "system", "content": [{"x": 1}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
            "messages[0].content[0].type",
        ),
        ({"system": 5}, "system"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"stream": "yes"}, "stream"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        ({"thinking": {"type": "enabled", "budget_tokens": "lots"}}, "thinking.budget_tokens"),
        ({"output_config": "fast"}, "output_config"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
        ({"output_config": {"effort": {"level": "high"}}}, "output_config.effort"),
        ({"output_config": {"format": {"type": "json"}}}, "output_config.format.type"),
        ({"output_config": {"format": "json"}}, "output_config.format.type"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
        ({"output_format": {"type": "json_schema", "schema": []}}, "output_format.schema"),
    ],
)
def test_client_mistakes_name_the_field(change: dict[str, Any], field: str) -> None:
    body = {key: value for key, value in request(**change).items() if value is not None}
    with pytest.raises(RequestValidationError) as caught:
        an.validate_messages(body)
    assert caught.value.field == field


CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
}


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "schema": schema}


@pytest.mark.parametrize(
    ("more", "schema", "strict"),
    [
        ({"output_config": {"format": json_schema(CITY_SCHEMA)}}, CITY_SCHEMA, True),
        # strict mode would refuse an open object: sent without it
        ({"output_config": {"format": json_schema({"type": "object"})}}, {"type": "object"}, False),
        ({"output_format": json_schema(CITY_SCHEMA)}, CITY_SCHEMA, True),  # the beta's name
    ],
)
def test_output_format_as_response_format(
    more: dict[str, Any], schema: dict[str, Any], strict: bool
) -> None:
    """Structured outputs (the SDKs' ``messages.parse``, the AI SDK's ``Output.object``)
    ask the backend for the schema, strict where OpenAI's strict mode takes it."""
    wanted: dict[str, Any] = {"name": "response", "schema": schema}
    if strict:
        wanted["strict"] = True
    out = translated(**more)
    assert out["response_format"] == {"type": "json_schema", "json_schema": wanted}
    assert "response_format" not in translated(output_config={"effort": "low"})


def test_think_of() -> None:
    assert an.think_of(request()) is None
    assert an.think_of(request(thinking={"type": "enabled", "budget_tokens": 2048})) is True
    assert an.think_of(request(thinking={"type": "disabled"})) is False


@pytest.mark.parametrize(
    ("thinking", "effort", "expected"),
    [
        (None, None, None),
        ({"type": "enabled", "budget_tokens": 1024}, None, "low"),
        ({"type": "enabled", "budget_tokens": 4999}, None, "low"),
        # a larger budget allows more thinking, asks for none: Claude Code's own
        ({"type": "enabled", "budget_tokens": 31999}, None, None),
        ({"type": "adaptive"}, None, None),  # no budget, no effort: the backend's own
        # Anthropic's default effort is "high" (Claude Code sends it every time): the
        # backend's default; a step below or above it, a step below or above OpenAI's
        ({"type": "adaptive"}, "high", None),
        ({"type": "adaptive"}, "medium", "low"),
        (None, "low", "low"),
        ({"type": "enabled", "budget_tokens": 1024}, "xhigh", "high"),  # the effort wins
        (None, "max", "high"),
        ({"type": "disabled"}, "max", None),  # no reasoning asked for
    ],
)
def test_effort_and_budget_as_reasoning_effort(
    thinking: dict[str, Any] | None, effort: str | None, expected: str | None
) -> None:
    more: dict[str, Any] = {"thinking": thinking}
    if effort is not None:
        more["output_config"] = {"effort": effort}
    body = an.validate_messages({k: v for k, v in request(**more).items() if v is not None})
    assert an.messages_to_openai(body, "b").get("reasoning_effort") == expected


def completion(
    content: str | None = "Hi",
    reasoning: str | None = None,
    calls: list[tuple[str, str]] = (),  # type: ignore[assignment]
    finish: str = "stop",
    stop_reason: str | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
            for i, (name, args) in enumerate(calls)
        ]
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
    if stop_reason is not None:
        choice["stop_reason"] = stop_reason
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "backend-m",
        "choices": [choice],
        "usage": usage or {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }


def test_answer_as_message() -> None:
    resp = completion("Hi", reasoning="why", calls=[("f", '{"a": [1]}')], finish="tool_calls")
    ChatCompletion.model_validate(resp)
    out = an.openai_to_message(resp, "m", "msg_1")
    Message.model_validate(out, strict=True)
    assert out == {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [
            {"type": "thinking", "thinking": "why", "signature": ""},
            {"type": "text", "text": "Hi"},
            {"type": "tool_use", "id": "call_0", "name": "f", "input": {"a": [1]}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 7,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 3,
        },
    }
    hidden = an.openai_to_message(resp, "m", "msg_1", show_thinking=False)
    assert [block["type"] for block in hidden["content"]] == ["text", "tool_use"]
    # thinking.display "omitted": the block is there, its text is not
    omitted = an.openai_to_message(resp, "m", "msg_1", omit_thinking=True)
    assert omitted["content"][0] == {"type": "thinking", "thinking": "", "signature": ""}
    assert omitted["content"][1:] == out["content"][1:]


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        # OpenAI, vLLM, llama.cpp's server: cached_tokens, part of prompt_tokens
        ({"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 60}}, (40, 0, 60)),
        # OpenRouter: what it wrote to the cache too
        (
            {
                "prompt_tokens": 100,
                "prompt_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 30},
            },
            (60, 30, 10),
        ),
        ({"prompt_tokens": 100, "prompt_cache_hit_tokens": 64}, (36, 0, 64)),  # DeepSeek
        ({"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": None}}, (100, 0, 0)),
        ({"prompt_tokens": 100, "prompt_tokens_details": None}, (100, 0, 0)),
        # more cached than the prompt (a backend's mistake): cut to it, the sum still holds
        ({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9}}, (0, 0, 5)),
        ({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": -1}}, (5, 0, 0)),
    ],
)
@pytest.mark.parametrize("streamed", [False, True])
def test_cached_prompt_tokens_as_anthropic_usage(
    usage: dict[str, Any], expected: tuple[int, int, int], streamed: bool
) -> None:
    """Anthropic's input_tokens leave out the cached ones: the three add up to the prompt."""
    resp = completion(usage={**usage, "completion_tokens": 3})
    if streamed:
        out = streamed_message(as_chunks(resp, [1], 1))
    else:
        out = an.openai_to_message(resp, "m", "msg_1")
        Message.model_validate(out, strict=True)
    got = out["usage"]
    assert (
        got["input_tokens"], got["cache_creation_input_tokens"], got["cache_read_input_tokens"]
    ) == expected  # fmt: skip
    assert got["output_tokens"] == 3


def test_stream_cache_counts_from_usage_on_every_chunk() -> None:
    """A backend that sends its usage on every chunk (vLLM's continuous usage): message_start
    already splits the prompt; a later usage without details says nothing was cached."""
    details = {
        "prompt_tokens": 9,
        "completion_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    chunk = {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]}
    translator = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0)
    start = translator.feed({**chunk, "usage": details}, 1)[0]
    assert start["message"]["usage"] == {
        "input_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4,
        "output_tokens": 0,
    }  # fmt: skip
    translator.feed({**chunk, "usage": {"prompt_tokens": 9, "completion_tokens": 2}}, 2)
    assert translator.finish(3)[-2]["usage"]["input_tokens"] == 9
    assert translator.prompt_tokens == 9  # what the metrics count: the whole prompt


@pytest.mark.parametrize(
    ("finish", "matched", "reason", "sequence"),
    [
        ("stop", None, "end_turn", None),
        ("length", None, "max_tokens", None),
        ("content_filter", None, "refusal", None),
        ("stop", "END", "stop_sequence", "END"),  # vLLM names the stop string it met
        ("stop", "OTHER", "end_turn", None),
    ],
)
def test_stop_reasons(finish: str, matched: str | None, reason: str, sequence: str | None) -> None:
    out = an.openai_to_message(
        completion(finish=finish, stop_reason=matched), "m", "msg_1", stops=["END"]
    )
    assert (out["stop_reason"], out["stop_sequence"]) == (reason, sequence)


def test_error_shape_by_path() -> None:
    assert is_anthropic_path("/v1/messages") and is_anthropic_path("/v1/messages/count_tokens")
    assert not is_anthropic_path("/v1/messagesX") and not is_openai_path("/v1/messages")
    for status, kind in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
    ]:
        body = json.loads(error_body_for("/v1/messages", "why", status))
        assert body == {"type": "error", "error": {"type": kind, "message": "why"}}
    event = an.error_event("broke").decode()
    assert event.startswith("event: error\ndata: ") and event.endswith("\n\n")


# -- streams --------------------------------------------------------------------------------


def as_chunks(resp: dict[str, Any], pieces: list[int], calls_split: int) -> list[dict[str, Any]]:
    """A completion as the stream a backend would send: a role chunk, its reasoning and
    content cut at ``pieces``, its tool calls' arguments in ``calls_split`` fragments,
    the finish chunk and a usage chunk."""
    choice = resp["choices"][0]
    message = choice["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "backend-m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    out = [chunk({"role": "assistant", "content": ""})]
    for key in ("reasoning_content", "content"):
        text = message.get(key) or ""
        cuts = sorted({0, len(text), *(p % (len(text) + 1) for p in pieces)})
        out += [chunk({key: text[a:b]}) for a, b in itertools.pairwise(cuts)]
    for index, call in enumerate(message.get("tool_calls") or []):
        args = call["function"]["arguments"]
        size = max(1, len(args) // max(1, calls_split))
        fragments = [args[i : i + size] for i in range(0, len(args), size)] or [""]
        first = {"index": index, "id": call["id"], "type": "function"}
        first["function"] = {"name": call["function"]["name"], "arguments": fragments[0]}
        out.append(chunk({"tool_calls": [first]}))
        for fragment in fragments[1:]:
            out.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            )
    out.append(chunk({}, choice["finish_reason"]))
    out.append({**chunk({}), "choices": [], "usage": resp["usage"]})
    return out


def streamed_message(chunks: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    translator = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0, **options)
    events = [event for i, c in enumerate(chunks) for event in translator.feed(c, i + 1)]
    events += translator.finish(len(chunks) + 1)
    snapshot = None
    json_bufs: dict[int, bytes] = {}  # each tool_use block's input so far, as the SDK keeps it
    for event in events:
        encoded = an.encode_event(event).decode()
        assert encoded.startswith(f"event: {event['type']}\ndata: ")
        snapshot = accumulate_event(
            event=EVENTS.validate_python(event), current_snapshot=snapshot, json_bufs=json_bufs
        )
    assert snapshot is not None
    return snapshot.model_dump(exclude_none=True)


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
# thinking shown, omitted (thinking.display "omitted"), hidden (thinking disabled)
THINKING: list[dict[str, bool]] = [
    {}, {"omit_thinking": True}, {"show_thinking": False, "omit_thinking": True},
    {"show_thinking": False},
]  # fmt: skip
ARGUMENTS = st.one_of(
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3).map(
        json.dumps
    ),
    st.just("not json"),  # a broken call: {} either way
)


@settings(max_examples=150, deadline=None)
@given(
    content=st.none() | TEXT,
    reasoning=st.none() | TEXT,
    calls=st.lists(st.tuples(st.sampled_from(["f", "g"]), ARGUMENTS), max_size=3),
    finish=st.sampled_from(["stop", "length", "tool_calls", "content_filter"]),
    pieces=st.lists(st.integers(0, 40), max_size=5),
    calls_split=st.integers(1, 4),
    thinking=st.sampled_from(THINKING),
    cached=st.integers(0, 12),
)
def test_stream_accumulates_to_the_answer(
    content: str | None,
    reasoning: str | None,
    calls: list[tuple[str, str]],
    finish: str,
    pieces: list[int],
    calls_split: int,
    thinking: dict[str, bool],
    cached: int,
) -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
             "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
    resp = completion(content, reasoning, calls, finish, usage=usage)
    whole = an.openai_to_message(resp, "m", "msg_1", **thinking)
    Message.model_validate(whole, strict=True)
    streamed = streamed_message(as_chunks(resp, pieces, calls_split), **thinking)
    assert streamed == Message.model_validate(whole).model_dump(exclude_none=True)


def test_stream_counts_tokens_and_streams_calls_as_they_come() -> None:
    resp = completion("Hi there", calls=[("f", '{"a": 1, "b": "xyz"}')], finish="tool_calls")
    chunks = as_chunks(resp, [2], 3)
    translator = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0)
    fed = [translator.feed(c, i + 1) for i, c in enumerate(chunks)]
    assert fed[0] == []  # the role chunk: message_start waits for the first block
    kinds = [e["type"] for e in fed[1]]
    assert kinds == ["message_start", "content_block_start", "content_block_delta"]
    # the call's block opens with its first fragment, each fragment goes out as it comes
    # (as far as it keeps a JSON object's start: the comma waits for what follows it)
    calls_at = [i for i, c in enumerate(chunks) if c["choices"] and "tool_calls" in delta(c)]
    assert [e["type"] for e in fed[calls_at[0]]][:2] == [
        "content_block_stop",
        "content_block_start",
    ]
    assert fed[calls_at[0]][1]["content_block"] == {
        "type": "tool_use", "id": "call_0", "name": "f", "input": {}
    }  # fmt: skip
    partial = [
        e["delta"]["partial_json"]
        for i in calls_at
        for e in fed[i]
        if e["type"] == "content_block_delta"
    ]
    assert partial == ["{", '"a":1', ',"b":"xyz', '"}']
    assert translator.first_token_ns == 2 and translator.prompt_tokens == 7
    end = translator.finish(99)
    assert end[-2]["usage"] == {
        "output_tokens": 3,
        "input_tokens": 7,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    assert end[-2]["delta"]["stop_reason"] == "tool_use"
    with pytest.raises(RuntimeError):
        translator.finish(100)


def delta(chunk: dict[str, Any]) -> dict[str, Any]:
    return chunk["choices"][0]["delta"]


def call_chunk(index: int, arguments: str, name: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if name is not None:
        call |= {"id": f"call_{index}", "type": "function"}
        call["function"]["name"] = name
    return {"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}


def finish_chunk(reason: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def fed_events(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    translator = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0)
    events = [event for i, c in enumerate(chunks) for event in translator.feed(c, i + 1)]
    return events + translator.finish(len(chunks) + 1)


def accumulated(events: list[dict[str, Any]]) -> dict[str, Any]:
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for event in events:
        snapshot = accumulate_event(
            event=EVENTS.validate_python(event), current_snapshot=snapshot, json_bufs=json_bufs
        )
    assert snapshot is not None
    return snapshot.model_dump(exclude_none=True)


def test_interleaved_calls_become_blocks_one_after_another() -> None:
    """Anthropic's blocks do not interleave: a backend that writes two calls at once has
    the second held until the first is whole and closed."""
    chunks = [
        call_chunk(0, '{"path": "a', "read"),
        call_chunk(1, '{"path": ', "read"),
        call_chunk(0, '.txt"'),
        call_chunk(1, '"b.txt"}'),
        call_chunk(0, "}"),
        call_chunk(2, "", "list"),
        finish_chunk("tool_calls"),
    ]
    events = fed_events(chunks)
    opened: list[int] = []
    for event in events:  # every delta and stop is for the one block open
        if event["type"] == "content_block_start":
            opened.append(event["index"])
        elif event["type"] in ("content_block_delta", "content_block_stop"):
            assert event["index"] == opened[-1]
    message = accumulated(events)
    assert [(b["name"], b["input"]) for b in message["content"]] == [
        ("read", {"path": "a.txt"}),
        ("read", {"path": "b.txt"}),
        ("list", {}),
    ]
    assert message["stop_reason"] == "tool_use"
    # the first call went out before the second was whole
    first_stop = next(i for i, e in enumerate(events) if e["type"] == "content_block_stop")
    assert events[first_stop - 1]["delta"] == {"type": "input_json_delta", "partial_json": "}"}


def text_chunk(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def test_text_written_while_a_call_is_unfinished_waits_for_the_call() -> None:
    """A backend that writes text (a line end) while a call's arguments are still coming:
    the call's block cannot close unfinished, so the text follows it (the stream ended
    with an error)."""
    chunks = [
        call_chunk(0, '{"path": "a', "read"),
        text_chunk("\n"),
        call_chunk(0, '.txt"}'),
        text_chunk("done"),
        finish_chunk("tool_calls"),
    ]
    events = fed_events(chunks)
    message = accumulated(events)
    assert message["content"] == [
        {"type": "tool_use", "id": "call_0", "name": "read", "input": {"path": "a.txt"}},
        {"type": "text", "text": "\ndone"},
    ]
    assert message["stop_reason"] == "tool_use"


def reasoning_chunk(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"reasoning_content": text}, "finish_reason": None}]}


@pytest.mark.parametrize("first", ["", '{"path": "a'])
def test_thinking_written_while_a_call_is_unfinished_waits_for_the_call(first: str) -> None:
    """Thinking closed the open call's block: a call not begun was {} and its arguments
    were lost; one partly out ended the stream (ToolInputNotJSON)."""
    rest = '{"path": "a.txt"}'[len(first) :]
    chunks = [
        call_chunk(0, first, "read"),
        reasoning_chunk("hm"),
        text_chunk("\n"),
        reasoning_chunk("m"),
        call_chunk(0, rest),
        finish_chunk("tool_calls"),
    ]
    message = accumulated(fed_events(chunks))
    assert message["content"] == [
        {"type": "tool_use", "id": "call_0", "name": "read", "input": {"path": "a.txt"}},
        {"type": "thinking", "thinking": "hm", "signature": ""},
        {"type": "text", "text": "\n"},
        {"type": "thinking", "thinking": "m", "signature": ""},
    ]


def test_text_held_behind_a_call_is_bounded_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    held_in = sys.modules[an.tr._HeldToolCalls.__module__]  # the module that bounds them
    monkeypatch.setattr(held_in, "MAX_HELD_TOOL_CALL_BYTES", 200)
    translator = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0)
    translator.feed(call_chunk(0, '{"path": "a', "read"), 1)
    with pytest.raises(StreamTooLarge):
        for n in range(10):
            translator.feed(text_chunk("x" * 30), n + 2)


@pytest.mark.parametrize("arguments", ["", "not json", "[1, 2]", " "])
def test_arguments_that_start_no_object_are_an_empty_input(arguments: str) -> None:
    message = accumulated(fed_events([call_chunk(0, arguments, "f"), finish_chunk("tool_calls")]))
    assert message["content"] == [{"type": "tool_use", "id": "call_0", "name": "f", "input": {}}]


def test_a_streamed_call_cut_by_the_token_limit_is_closed_where_it_stopped() -> None:
    chunks = [call_chunk(0, '{"path": "a.txt", "text": "one\\ntw', "write"), finish_chunk("length")]
    message = accumulated(fed_events(chunks))
    assert message["content"][0]["input"] == {"path": "a.txt", "text": "one\ntw"}
    assert message["stop_reason"] == "max_tokens"  # not run by the client


@pytest.mark.parametrize(
    "chunks",
    [
        [call_chunk(0, '{"path": "a', "write"), call_chunk(0, '"\x01}')],  # no JSON any more
        [call_chunk(0, '{"path": "a', "write"), finish_chunk("tool_calls")],  # never whole
    ],
)
def test_a_call_that_stops_being_json_once_streamed_fails_the_stream(
    chunks: list[dict[str, Any]],
) -> None:
    """Part of its input is out: closed, the client would run it with that part."""
    with pytest.raises(an.ToolInputNotJSON):
        fed_events(chunks)


def test_parallel_calls_at_one_index_told_apart_by_their_ids() -> None:
    """Ollama's /v1 and SGLang send every call at index 0, each with its own id."""
    first, second = call_chunk(0, '{"a": 1}', "f"), call_chunk(0, '{"b": 2}', "g")
    second["choices"][0]["delta"]["tool_calls"][0]["id"] = "call_other"
    message = accumulated(fed_events([first, second, finish_chunk("tool_calls")]))
    inputs = [(b["id"], b["input"]) for b in message["content"]]
    assert inputs == [("call_0", {"a": 1}), ("call_other", {"b": 2})]


def test_empty_stream_still_a_message() -> None:
    translator = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0)
    translator.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, 1)
    kinds = [event["type"] for event in translator.finish(2)]
    assert kinds == ["message_start", "message_delta", "message_stop"]


def test_a_call_cut_by_the_token_limit_is_max_tokens() -> None:
    resp = completion(None, calls=[("f", '{"a": ')], finish="length")
    assert an.openai_to_message(resp, "m", "msg_1")["stop_reason"] == "max_tokens"
    resp = completion(None, calls=[("f", "{}")], finish="stop")  # Ollama's /v1 says stop
    assert an.openai_to_message(resp, "m", "msg_1")["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    "message",
    [
        # an output limit, not the context: the client's max_tokens is simply refused
        "max_tokens is too large: 32000. This model supports at most 16384 completion tokens",
        "Invalid 'messages[1].content': string too long.",
        "model 'x' not found",
    ],
)
def test_other_errors_are_no_context_overflow(message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}})
    assert an.context_overflow(message, body.encode()) is None


def test_a_context_overflow_without_numbers_still_reads_as_one() -> None:
    worded = an.context_overflow("Prompt is too long for this model", b"{}")
    assert worded is not None and worded.startswith("prompt is too long")
    body = json.dumps({"error": {"type": "exceed_context_size_error", "n_ctx": "x"}}).encode()
    assert an.context_overflow("the request exceeds the available context size", body) == (
        "prompt is too long (the request exceeds the available context size)"
    )


# -- the text shortcut (feed_text) against the full path ------------------------------------

_ANY_TEXT = st.text(
    st.characters(codec=None, categories=("L", "N", "P", "S", "Z", "Cc", "Cs", "So")),
    max_size=12,
)
_PIECES = st.lists(
    st.one_of(
        st.tuples(st.just("content"), _ANY_TEXT | st.sampled_from(["\u2028", "\x85", "\t\n"])),
        st.tuples(st.just("reasoning_content"), TEXT),
        st.tuples(st.just("call"), st.sampled_from(["f", "g"])),
        st.tuples(st.just("role"), st.just("")),
    ),
    max_size=12,
)


def _event_text(delta: dict[str, Any], finish: str | None, spaced: bool, extra: bool) -> str:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
    if extra:
        choice["logprobs"] = None
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunk["choices"] = [choice]
    if extra:
        chunk["system_fingerprint"] = None
    text = json.dumps(delta)  # a lone surrogate can only come as its escape
    ascii_only = any(0xD800 <= ord(c) <= 0xDFFF for c in text) or spaced
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(chunk, ensure_ascii=ascii_only, separators=separators)


@settings(max_examples=300, deadline=None)
@given(
    pieces=_PIECES,
    finish=st.sampled_from(["stop", "length", "tool_calls"]),
    spaced=st.booleans(),
    extra=st.booleans(),
    usage_last=st.booleans(),
)
def test_the_text_shortcut_writes_what_feed_writes(
    pieces: list[tuple[str, str]], finish: str, spaced: bool, extra: bool, usage_last: bool
) -> None:
    """The relay tries :meth:`feed_text` first and decodes only what it declines: the
    bytes sent and the counts kept must be those of decoding every event."""
    texts = []
    for number, (kind, value) in enumerate(pieces):
        if kind == "call":
            delta: dict[str, Any] = call_delta_of(number, value)
        elif kind == "role":
            delta = {"role": "assistant", "content": ""}
        else:
            delta = {kind: value}
        texts.append(_event_text(delta, None, spaced, extra))
    texts.append(_event_text({}, finish, spaced, extra))
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    if usage_last:
        texts.append(json.dumps({"id": "c", "choices": [], "usage": usage}))
    fast = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0)
    full = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0)
    fast_out: list[bytes] = []
    full_out: list[bytes] = []
    for now, text in enumerate(texts, 1):
        line = fast.feed_text(text, now)
        if line is None:
            fast_out += map(an.encode_event, fast.feed(read_chunk(text), now))
        else:
            fast_out += [line] if line else []
        full_out += map(an.encode_event, full.feed(read_chunk(text), now))
    fast_out += map(an.encode_event, fast.finish(len(texts) + 1))
    full_out += map(an.encode_event, full.finish(len(texts) + 1))
    assert fast_out == full_out
    stats = ("content_chunks", "first_token_ns", "last_token_ns", "prompt_tokens",
             "completion_tokens", "finish_reason")  # fmt: skip
    assert [getattr(fast, s) for s in stats] == [getattr(full, s) for s in stats]


@pytest.mark.parametrize(
    "texts",
    [
        # as the backend's JSON spells them: escapes, and a raw line separator
        ["Hel", "lo", r" \u2028 there\n", "\u2028", r"\"q\" \\ \/"],
        ["a", r"\ud83d", r"\ude00", "é"],  # an emoji's halves as escapes: kept as escapes
    ],
)
def test_the_text_shortcut_is_taken_for_text_after_text(texts: list[str]) -> None:
    translator = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0)
    events = [_event_text({"content": "x"}, None, False, False)]
    events += [e.replace('"x"', f'"{text}"') for text in texts for e in events[:1]]
    assert translator.feed_text(events[0], 1) is None  # the block opens: decoded
    translator.feed(read_chunk(events[0]), 1)
    for now, event in enumerate(events[1:], 2):
        line = translator.feed_text(event, now)
        assert line is not None
        (expected,) = an.AnthropicStreamTranslator.feed(  # what feed writes for it
            _opened(), read_chunk(event), now
        )
        assert line == an.encode_event(expected)
    assert translator.content_chunks == len(events) and translator.last_token_ns == len(events)


def _opened() -> an.AnthropicStreamTranslator:
    translator = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0)
    translator.feed(read_chunk(_event_text({"content": "x"}, None, False, False)), 1)
    return translator


def call_delta_of(number: int, name: str) -> dict[str, Any]:
    call = {"index": number, "id": f"call_{number}", "type": "function"}
    call["function"] = {"name": name, "arguments": "{}"}
    return {"tool_calls": [call]}


def test_stream_translator_keeps_its_attributes_few() -> None:
    """Under CPython's 30 shared keys (see test_translate's test of the same)."""
    assert len(vars(an.AnthropicStreamTranslator("m", "msg_1", start_ns=0))) < 30


# -- tool calls as they come, adversarially ----------------------------------------------------

_NOT_OBJECTS = st.sampled_from(
    ["", " ", "not json", "[1, 2]", "nul", '{"a": 1', '{"a": 1,', '{"a": tru', '{"a": "x\x01"}',
     '{"a": "x\\q"}', '{"a": 1} and more', '{"a": 01}', "{"]
)  # fmt: skip


@st.composite
def _call_arguments(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 3)) == 0:
        return draw(_NOT_OBJECTS)
    text, _ = text_of(draw, draw(OBJECTS), draw(st.sampled_from(SPELLINGS)))
    return text


def _expected_input(arguments: str, finish: str | None) -> dict[str, Any] | None:
    """What a call's block reads as for the client, or None where the stream must end
    with ToolInputNotJSON (part of its input out, the rest no JSON or never whole)."""
    prefix = ObjectPrefix()
    sent = prefix.take(arguments)
    if not prefix.sent:
        return {}  # never began an object: {}, as in a non-stream answer
    if prefix.whole:
        return replaced_loads(arguments[: arguments.rindex("}") + 1])  # type: ignore[no-any-return]
    if prefix.broken or finish != "length":
        return None
    return json.loads(sent + prefix.closing())  # cut by the token limit where it stopped


def _wire(event: dict[str, Any]) -> dict[str, Any]:
    """An event as the client reads it: encoded, sent, decoded."""
    data = an.encode_event(event).split(b"\ndata: ", 1)[1]
    return json.loads(data)  # type: ignore[no-any-return]


@settings(max_examples=250, deadline=None, derandomize=True)
@given(
    data=st.data(),
    calls=st.lists(st.tuples(st.sampled_from(["f", "g"]), _call_arguments()), max_size=3),
    finish=st.sampled_from(["tool_calls", "length", "stop", None]),
    thinking=st.sampled_from(THINKING),
    held_limit=st.sampled_from([None, 300]),  # a call holds 64 bytes besides its arguments
)
def test_calls_written_at_once_come_out_as_blocks_of_their_inputs(
    data: st.DataObject,
    calls: list[tuple[str, str]],
    finish: str | None,
    thinking: dict[str, bool],
    held_limit: int | None,
) -> None:
    """Parallel calls, their pieces interleaved any way, text and thinking between them,
    cut by the token limit or not: each call is a tool_use block of its arguments as
    json.loads reads them (or {} for none), blocks one after another, indexes counting
    up; or the stream ends with the error it documents. Read by the SDK as it comes."""
    draw = data.draw
    deltas: list[list[dict[str, Any]]] = []
    for number, (name, arguments) in enumerate(calls):
        pieces = pieces_of(draw, arguments) or [""]
        if draw(st.booleans()):
            pieces = ["", *pieces]  # the name first, alone (as OpenAI writes it)
        head = call_chunk(number, pieces[0], name)
        deltas.append([head] + [call_chunk(number, piece) for piece in pieces[1:]])
    order = draw(st.permutations([n for n, pieces in enumerate(deltas) for _ in pieces]))
    chunks = [deltas[n].pop(0) for n in order]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["content", "reasoning_content"]))
        said = {kind: draw(TEXT.filter(bool))}
        at = draw(st.integers(0, len(chunks)))
        chunks.insert(at, {"choices": [{"index": 0, "delta": said, "finish_reason": None}]})
    texts = {
        kind: "".join(d.get(kind, "") for d in map(delta, chunks))
        for kind in ("content", "reasoning_content")
    }
    if finish is not None:
        chunks.append(finish_chunk(finish))
    expected = [_expected_input(arguments, finish) for _, arguments in calls]
    starts = sorted(range(len(calls)), key=order.index)  # the calls in the order they began
    translator = an.AnthropicStreamTranslator("m", "msg_1", start_ns=0, **thinking)
    events: list[dict[str, Any]] = []
    held_in = sys.modules[an.tr._HeldToolCalls.__module__]
    limit = held_in.MAX_HELD_TOOL_CALL_BYTES if held_limit is None else held_limit
    try:
        with mock.patch.object(held_in, "MAX_HELD_TOOL_CALL_BYTES", limit):
            for now, chunk in enumerate(chunks, 1):
                events += translator.feed(chunk, now)
            events += translator.finish(len(chunks) + 1)
    except an.ToolInputNotJSON:
        assert None in expected
        return
    except StreamTooLarge:
        assert held_limit is not None  # what the backend wrote went past the bound
        return
    assert None not in expected
    opened: list[int] = []
    for event in events:  # one block at a time, their indexes counting up from 0
        if event["type"] == "content_block_start":
            assert event["index"] == len(opened)
            opened.append(event["index"])
        elif event["type"] in ("content_block_delta", "content_block_stop"):
            assert event["index"] == opened[-1]
    message = accumulated([_wire(event) for event in events])
    blocks = message["content"]
    assert [(b["name"], b["input"]) for b in blocks if b["type"] == "tool_use"] == [
        (calls[n][0], expected[n]) for n in starts
    ]
    out = {
        kind: "".join(b[kind] for b in blocks if b["type"] == kind) for kind in ("text", "thinking")
    }
    assert out["text"] == texts["content"]
    shown = thinking.get("show_thinking", True) and not thinking.get("omit_thinking")
    assert out["thinking"] == (texts["reasoning_content"] if shown else "")
    # omitted: a block where the thinking was, never a delta of it
    omitted = thinking == {"omit_thinking": True}
    blocked = (omitted and texts["reasoning_content"]) or (shown and out["thinking"])
    assert any(b["type"] == "thinking" for b in blocks) == bool(blocked)
    deltas = [e["delta"]["type"] for e in events if e["type"] == "content_block_delta"]
    assert shown or "thinking_delta" not in deltas
    if finish == "length":
        assert message["stop_reason"] == "max_tokens"
    elif calls:
        assert message["stop_reason"] == "tool_use"
