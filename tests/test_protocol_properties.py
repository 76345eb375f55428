"""Property tests of the sans-I/O protocol layer against independent models of it.

Where tests/test_sse.py, test_translate.py and test_logprobs.py compare the parser and the
translator with themselves (split vs. unsplit, fast path vs. full decode), these compare
them with what the specifications say the result is: a line-by-line SSE interpreter written
from the WHATWG rules, and the answer a random OpenAI stream spells (its text, reasoning,
whole tool calls and usage). They also feed the client-facing entry points arbitrary JSON:
a client's mistake must come out as ``RequestValidationError`` (the 400), never as another
exception (a 500). The relays are driven over reads cut anywhere (a mocked body): every
event reaches the client whole, in its dialect.

Each test runs few examples, so the file takes seconds; ``PROPERTY_EXAMPLES=5000`` hunts.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
import types
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ollama._types import ChatResponse, GenerateResponse
from openai._streaming import SSEDecoder

from trioproxy import relay
from trioproxy.config import Settings
from trioproxy.errors import ProxyError
from trioproxy.jsonutil import NestedTooDeeply, compact_json, loads
from trioproxy.metrics import MetricsCollector
from trioproxy.routes_openai import _model_rewriter
from trioproxy.signatures import ThoughtSignatures
from trioproxy.sse import ERROR_FIELD_EVENT, SSE_DONE, SSEEvent, SSEParser, error_field_as_data
from trioproxy.translate import (
    OllamaCompletionStreamTranslator,
    OllamaStreamTranslator,
    OpenAIStreamObserver,
    RequestValidationError,
    ResponsesStreamObserver,
    Timings,
    _ContentChunks,
    keep_alive_unloads,
    ollama_chat_to_openai,
    ollama_embed_to_openai,
    ollama_embeddings_to_openai,
    ollama_generate_to_completions,
    ollama_generate_to_openai,
    openai_chat_to_ollama_chat,
    openai_chat_to_ollama_generate,
    openai_completion_to_ollama_generate,
    read_chunk,
    response_as_events,
    think_extra_body,
    validate_ollama_chat,
    validate_ollama_embed,
    validate_ollama_embeddings,
    validate_ollama_generate,
    validate_openai_body,
    with_extra_body,
)
from trioproxy.translate.chunks import _TEXT_DELTA


def _examples(default: int) -> settings:
    """Few examples, so the file runs in seconds; PROPERTY_EXAMPLES=5000 to hunt."""
    count = int(os.environ.get("PROPERTY_EXAMPLES", default))
    return settings(max_examples=count, deadline=None, suppress_health_check=[HealthCheck.too_slow])


FAST = _examples(100)
STREAMS = _examples(40)  # a stream's examples cost more


def _whole_characters(text: str) -> str:
    """``text`` with each surrogate pair as the character it spells: a pair cut between two
    chunks ("\\ud83d", "\\ude00") is one character once the translator joins it."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


# =============================================================================================
# SSE: the incremental parser against a whole-text interpreter of the WHATWG rules
# =============================================================================================


def reference_events(stream: bytes) -> list[SSEEvent]:
    """The events of ``stream`` by the specification's "interpret an event stream", read
    whole, with the parser's documented deviations: an event not ended by a blank line is
    still delivered at the end, an empty ``id`` reads as None, and an ``error:`` field is an
    ``error`` event holding OpenAI's error chunk (llama.cpp's older servers)."""
    text = stream.decode("utf-8", "replace")
    text = text.removeprefix("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)
    events: list[SSEEvent] = []
    data: list[str] = []
    event_type: str | None = None
    last_id: str | None = None
    for line in lines:
        if line == "":
            if data:
                events.append(SSEEvent("\n".join(data), event_type, last_id))
            data, event_type = [], None
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value or None
        elif name == "id":
            if "\0" not in value:
                last_id = value or None
        elif name == "error":
            event_type = ERROR_FIELD_EVENT
            data.append(error_field_as_data(value))
    if data:  # the last line, and the event it belongs to, without their ends
        events.append(SSEEvent("\n".join(data), event_type, last_id))
    return events


_FIELD_TEXT = st.text(
    alphabet=st.sampled_from(["a", " ", ":", "é", "世", "🎉", "\u2028", "\0", "\ufeff", "{"]),
    max_size=6,
)
_SSE_LINE = st.one_of(
    st.builds("data:{}".format, _FIELD_TEXT),
    st.builds("data: {}".format, _FIELD_TEXT),
    st.builds("data:  {}".format, _FIELD_TEXT),  # the second space is the value's
    st.builds("event:{}".format, _FIELD_TEXT),
    st.builds("id: {}".format, _FIELD_TEXT),
    st.builds(":{}".format, _FIELD_TEXT),
    st.builds("retry: {}".format, st.integers(0, 9999)),
    st.builds("error: {}".format, st.sampled_from(['{"message":"x"}', "plain", "", "[1]"])),
    st.sampled_from(
        ["data", "event", "id", "dat", "data ", " data: x", "DATA: x", "\ufeffdata: x"]
    ),
    st.just(""),
)
_SSE_EOL = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """An event stream (any line ends, a BOM, bytes that are not UTF-8) and a split of it
    into reads anywhere: inside a CRLF, a UTF-8 character, a ``data:`` prefix."""
    lines = draw(st.lists(st.tuples(_SSE_LINE, _SSE_EOL), max_size=14))
    stream = "".join(line + eol for line, eol in lines)
    if draw(st.booleans()):  # the last line without its end
        stream += draw(_SSE_LINE)
    raw = stream.encode()
    if draw(st.integers(0, 4)) == 0:
        raw = b"\xef\xbb\xbf" + raw
    if raw and draw(st.integers(0, 5)) == 0:  # a byte that is no UTF-8, somewhere
        at = draw(st.integers(0, len(raw)))
        raw = (
            raw[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe4\xb8", b"\xed\xa0\x80"]))
            + raw[at:]
        )
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    bounds = [0, *cuts, len(raw)]
    return raw, [raw[a:b] for a, b in itertools.pairwise(bounds)]


@FAST
@given(sse_streams())
@example((b"data: x\r\r\ndata: y\n\n", [b"data: x\r", b"\r", b"\ndata: y\n\n"]))
@example(
    (b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", [b"\xef", b"\xbb\xbf\xef", b"\xbb\xbfdata: x\n\n"])
)
def test_sse_parser_reads_any_split_as_the_specification_reads_the_whole(
    case: tuple[bytes, list[bytes]],
) -> None:
    raw, reads = case
    parser = SSEParser()
    events: list[SSEEvent] = []
    for data in reads:
        events += parser.feed(data)
    events += parser.close()
    assert events == reference_events(raw)


# =============================================================================================
# OpenAI chat stream -> Ollama NDJSON: the answer a random stream spells comes out whole
# =============================================================================================

_PIECES = st.text(
    alphabet=st.sampled_from(["a", "b", " ", "\n", '"', "\\", "é", "世", "😀", "\u2028"]),
    max_size=5,
)


def _cut(text: str, draw: st.DrawFn) -> list[str]:
    """``text`` in pieces, cut anywhere, between the halves of a surrogate pair too (a
    backend that cuts text by UTF-16 units)."""
    units = text.encode("utf-16-le", "surrogatepass")
    halves = [
        units[i : i + 2].decode("utf-16-le", "surrogatepass") for i in range(0, len(units), 2)
    ]
    cuts = sorted(draw(st.lists(st.integers(0, len(halves)), max_size=4)))
    bounds = [0, *cuts, len(halves)]
    return ["".join(halves[a:b]) for a, b in itertools.pairwise(bounds)]


_ARGUMENTS = st.dictionaries(
    st.text(max_size=4),
    st.one_of(
        st.integers(-5, 5),
        _PIECES,
        st.booleans(),
        st.none(),
        st.lists(st.integers(0, 3), max_size=2),
    ),
    max_size=3,
)


class StreamCase:
    """A generated backend stream and the answer it spells."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []
        self.content = ""
        self.thinking = ""
        self.calls: list[tuple[str | None, str, dict[str, Any]]] = []  # id, name, arguments
        self.usage: tuple[int, int] | None = None
        self.finish: str | None = None

    def __repr__(self) -> str:
        return "StreamCase(" + json.dumps(self.chunks) + ")"


def _chunk(choice: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "b"}
    out["choices"] = [] if choice is None else [{"index": 0, **choice}]
    out.update(top)
    return out


@st.composite
def chat_streams(draw: st.DrawFn) -> StreamCase:
    case = StreamCase()
    events: list[tuple[str, Any]] = []
    for text in draw(st.lists(_PIECES, max_size=4)):
        events += [("content", piece) for piece in _cut(text, draw)]
        case.content += text
    for text in draw(st.lists(_PIECES, max_size=3)):
        field = draw(st.sampled_from(["reasoning_content", "reasoning"]))
        events += [(field, piece) for piece in _cut(text, draw)]
        case.thinking += text
    # tool calls: ids and names on their first fragment (or the id on every one), the
    # arguments cut anywhere. Numbered as OpenAI does (indexes need not start at 0 nor
    # follow each other, and the calls' fragments interleave), or one call after another
    # all at index 0 (Ollama's /v1, SGLang) or without an index (mistral.rs, gateways)
    numbering = draw(st.sampled_from(["indexes", "all 0", "none"]))
    repeat_id = draw(st.booleans())
    indexes = sorted(draw(st.sets(st.integers(0, 6), max_size=3)))
    per_call: list[list[dict[str, Any]]] = []
    for n, index in enumerate(indexes):
        arguments = draw(_ARGUMENTS)
        call_id = draw(st.sampled_from([f"call_{n}", None]))
        name = f"fn{n}"
        case.calls.append((call_id, name, arguments))
        text = json.dumps(arguments, ensure_ascii=draw(st.booleans()))
        pieces = _cut(text, draw)
        deltas: list[dict[str, Any]] = [{"function": {"arguments": piece}} for piece in pieces]
        deltas[0] = {"type": "function", "function": {"name": name, "arguments": pieces[0]}}
        for delta in deltas:
            if numbering != "none":
                delta["index"] = index if numbering == "indexes" else 0
            if call_id is not None and (repeat_id or delta is deltas[0]):
                delta["id"] = call_id
        per_call.append(deltas)
    if numbering != "indexes":  # told apart by their order alone: one after another
        per_call = [[delta for deltas in per_call for delta in deltas]]
    # interleave: the text's events keep their order, each call's fragments theirs
    queues = [[e for e in events if e[0] == "content"], [e for e in events if e[0] != "content"]]
    queues += [[("tool", d) for d in deltas] for deltas in per_call]
    order = draw(st.permutations([q for q, queue in enumerate(queues) for _ in queue]))
    sequence = [queues[q].pop(0) for q in order]

    case.chunks.append(
        _chunk({"delta": {"role": "assistant", "content": draw(st.sampled_from(["", None]))}})
    )
    for kind, value in sequence:
        if kind == "tool":
            delta: dict[str, Any] = {"tool_calls": [value]}
        else:
            delta = {kind: value}
        # null fields around what the chunk says, as some backends write them
        for other in draw(
            st.sets(st.sampled_from(["content", "reasoning_content", "tool_calls", "refusal"]))
        ):
            delta.setdefault(other, None)
        case.chunks.append(_chunk({"delta": delta, "finish_reason": None, "logprobs": None}))
        if draw(st.integers(0, 6)) == 0:
            case.chunks.append(_chunk())  # choices: [] (a keep-alive of some gateways)
    case.finish = draw(st.sampled_from(["stop", "length", "tool_calls" if case.calls else "stop"]))
    where = draw(st.sampled_from(["own chunk", "last delta", "with usage"]))
    if where == "last delta" and len(case.chunks) > 1 and case.chunks[-1]["choices"]:
        case.chunks[-1]["choices"][0]["finish_reason"] = case.finish
    elif where != "with usage":
        case.chunks.append(_chunk({"delta": {}, "finish_reason": case.finish}))
    if draw(st.booleans()):
        case.usage = (draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)))
        usage = {
            "prompt_tokens": case.usage[0],
            "completion_tokens": case.usage[1],
            "total_tokens": sum(case.usage),
        }
        if where == "with usage":
            case.chunks.append(_chunk({"delta": {}, "finish_reason": case.finish}, usage=usage))
        else:
            case.chunks.append(_chunk(usage=usage))
    elif where == "with usage":
        case.chunks.append(_chunk({"delta": {}, "finish_reason": case.finish}))
    return case


def relay_lines(translator: OllamaStreamTranslator, texts: list[str]) -> list[bytes]:
    """What relay_ollama writes for these events: the fast path first, else the decoded
    chunk; then the done line."""
    out: list[bytes] = []
    for now, text in enumerate(texts, 1):
        line = translator.feed_text(text, now)
        if line is None:
            chunk = read_chunk(text)
            if chunk is not None:
                out += [compact_json(line) for line in translator.feed(chunk, now)]
        elif line:
            out.append(line)
    out.append(compact_json(translator.finish(len(texts) + 1)))
    return out


def _answer(lines: list[dict[str, Any]], kind: str) -> tuple[str, str, list[dict[str, Any]]]:
    content = thinking = ""
    calls: list[dict[str, Any]] = []
    for line in lines:
        holder = line["message"] if kind == "chat" else line
        content += holder["content" if kind == "chat" else "response"]
        thinking += holder.get("thinking", "")
        calls += holder.get("tool_calls", [])
    return content, thinking, calls


@STREAMS
@given(chat_streams(), st.sampled_from(["chat", "generate"]), st.booleans(), st.booleans())
def test_a_chat_stream_translates_to_the_answer_it_spells(
    case: StreamCase, kind: str, show_thinking: bool, ascii_events: bool
) -> None:
    translator = OllamaStreamTranslator(
        kind,  # type: ignore[arg-type]
        "m",
        start_ns=0,
        created_at=lambda: "2024-01-01T00:00:00.000000000Z",
        show_thinking=show_thinking,
    )
    texts = [json.dumps(c, ensure_ascii=ascii_events, separators=(",", ":")) for c in case.chunks]
    raw = relay_lines(translator, texts)
    model = ChatResponse if kind == "chat" else GenerateResponse
    lines = []
    for line in raw:
        assert b"\n" not in line
        # each line on its own, as ollama-python reads it: whole JSON, whole characters
        (only,) = line.decode().splitlines()
        decoded = json.loads(only)
        model.model_validate(decoded)
        lines.append(decoded)
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]

    content, thinking, calls = _answer(lines, kind)
    assert content == _whole_characters(case.content)
    assert thinking == (_whole_characters(case.thinking) if show_thinking else "")
    assert [
        (c.get("id"), c["function"]["name"], c["function"]["arguments"]) for c in calls
    ] == case.calls
    final = lines[-1]
    assert final["done_reason"] == ("stop" if case.finish == "tool_calls" else case.finish)
    if case.usage is not None:
        assert (final["prompt_eval_count"], final["eval_count"]) == case.usage
    else:
        assert final["prompt_eval_count"] == 0


# =============================================================================================
# Arbitrary chunks: the translator never fails on a backend's odd JSON with a stray exception
# =============================================================================================

_ANY_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 3),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(["", "x", "{}", '{"a":', "\ud83d", "stop", "tool_calls", "error"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "text", "type"]), inner, max_size=3),
    ),
    max_leaves=8,
)


def _odd(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``strategy``, sometimes any JSON value instead."""
    return st.one_of(strategy, strategy, _ANY_JSON)


_ODD_FUNCTION = st.fixed_dictionaries(
    {},
    optional={
        "name": _odd(st.sampled_from(["f", "g", ""])),
        "arguments": _odd(st.sampled_from(["", "{", '"a":1', "}", "{}", '{"a":[1]}'])),
    },
)
_ODD_CALL = st.fixed_dictionaries(
    {},
    optional={
        "index": _odd(st.integers(0, 2)),
        "id": _odd(st.sampled_from(["a", "b", ""])),
        "type": st.just("function"),
        "function": _odd(_ODD_FUNCTION),
        "extra_content": _odd(st.just({"google": {"thought_signature": "s"}})),
    },
)
_ODD_DELTA = st.fixed_dictionaries(
    {},
    optional={
        "role": _odd(st.just("assistant")),
        "content": _odd(_PIECES),
        "reasoning_content": _odd(_PIECES),
        "reasoning": _odd(_PIECES),
        "refusal": _odd(_PIECES),
        "tool_calls": _odd(st.lists(_odd(_ODD_CALL), max_size=2)),
        "function_call": _odd(_ODD_FUNCTION),
    },
)
_ODD_CHOICE = st.fixed_dictionaries(
    {},
    optional={
        "index": _odd(st.integers(0, 1)),
        "delta": _odd(_ODD_DELTA),
        "message": _odd(_ODD_DELTA),
        "text": _odd(_PIECES),
        "finish_reason": _odd(
            st.sampled_from([None, "stop", "length", "tool_calls", "content_filter"])
        ),
        "logprobs": _odd(
            st.fixed_dictionaries(
                {},
                optional={
                    "content": _odd(
                        st.lists(
                            st.fixed_dictionaries(
                                {"token": _odd(_PIECES), "logprob": _odd(st.floats(-5, 0))},
                                optional={"bytes": _odd(st.lists(st.integers(0, 300), max_size=2))},
                            ),
                            max_size=2,
                        )
                    ),
                    "tokens": _odd(st.lists(_PIECES, max_size=2)),
                    "token_logprobs": _odd(st.lists(st.floats(-5, 0), max_size=2)),
                    "top_logprobs": _odd(
                        st.lists(st.dictionaries(_PIECES, st.floats(-5, 0), max_size=2), max_size=2)
                    ),
                },
            )
        ),
    },
)
_ODD_CHUNK = st.fixed_dictionaries(
    {},
    optional={
        "id": _odd(st.just("c")),
        "choices": _odd(st.lists(_odd(_ODD_CHOICE), max_size=2)),
        "usage": _odd(
            st.fixed_dictionaries(
                {},
                optional={
                    "prompt_tokens": _odd(st.integers(0, 10**9)),
                    "completion_tokens": _odd(st.integers(0, 10**9)),
                },
            )
        ),
        "x_groq": _odd(st.just({"usage": {"prompt_tokens": 1, "completion_tokens": 2}})),
    },
)


@FAST
@given(
    st.lists(_ODD_CHUNK, max_size=6),
    st.sampled_from(["chat", "generate", "completion"]),
    st.booleans(),
    st.booleans(),
)
def test_odd_chunks_are_translated_without_a_stray_exception(
    chunks: list[dict[str, Any]], kind: str, show_thinking: bool, logprobs: bool
) -> None:
    """An odd chunk is the backend's oddity: it may hold no answer, but it must not raise
    out of the translator (relay_ollama would cut the stream without its done line)."""
    translator: OllamaStreamTranslator
    if kind == "completion":
        translator = OllamaCompletionStreamTranslator(
            "m", start_ns=0, top_logprobs=2 if logprobs else None
        )
    else:
        signatures = ThoughtSignatures("generativelanguage.googleapis.com")
        translator = OllamaStreamTranslator(
            kind,  # type: ignore[arg-type]
            "m",
            start_ns=0,
            show_thinking=show_thinking,
            logprobs=logprobs,
            on_tool_calls=lambda calls: signatures.remember("k", "gemini-3", calls),
        )
    texts = [json.dumps(c) for c in chunks]
    lines = [loads(line) for line in relay_lines(translator, texts)]
    assert [line["done"] for line in lines].count(True) == 1 and lines[-1]["done"] is True


# =============================================================================================
# Non-stream answers of unusual but valid shape
# =============================================================================================

_TIMINGS = Timings(total_ns=10, prompt_eval_ns=3, eval_ns=7)


@st.composite
def completions(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant"}
    message["content"] = draw(
        st.one_of(st.none(), _PIECES, st.just([{"type": "text", "text": "hi"}]))
    )
    if draw(st.booleans()):
        message["refusal"] = draw(st.one_of(st.none(), _PIECES))
    if draw(st.booleans()):
        message[draw(st.sampled_from(["reasoning_content", "reasoning"]))] = draw(
            st.one_of(st.none(), _PIECES)
        )
    if draw(st.booleans()):
        message["tool_calls"] = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": f"f{i}", "arguments": json.dumps(args)},
            }
            for i, args in enumerate(draw(st.lists(_ARGUMENTS, max_size=3)))
        ]
    choices = [
        {
            "index": i,
            "message": message,
            "finish_reason": draw(
                st.sampled_from([None, "stop", "length", "tool_calls", "content_filter"])
            ),
            "logprobs": None,
        }
        for i in range(draw(st.integers(1, 3)))
    ]
    out: dict[str, Any] = {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "b",
        "choices": choices,
    }
    usage = draw(
        st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {"prompt_tokens": st.integers(0, 99), "completion_tokens": st.integers(0, 99)}
            ),
            st.just({}),
        )
    )
    if usage is not None or draw(st.booleans()):
        out["usage"] = usage
    return out


@FAST
@given(completions(), st.booleans(), st.booleans())
def test_unusual_completions_translate(
    resp: dict[str, Any], show_thinking: bool, logprobs: bool
) -> None:
    message = resp["choices"][0]["message"]
    content = (
        message["content"]
        if isinstance(message["content"], str)
        else "hi"
        if message["content"]
        else ""
    )
    content += message.get("refusal") or ""
    chat = openai_chat_to_ollama_chat(
        resp, "m", "t", _TIMINGS, show_thinking=show_thinking, logprobs=logprobs
    )
    generate = openai_chat_to_ollama_generate(
        resp, "m", "t", _TIMINGS, show_thinking=show_thinking, logprobs=logprobs
    )
    ChatResponse.model_validate(chat)
    GenerateResponse.model_validate(generate)
    assert chat["message"]["content"] == generate["response"] == content
    calls = [
        (c["id"], c["function"]["name"], c["function"]["arguments"])
        for c in chat["message"].get("tool_calls", [])
    ]
    expected = [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls") or []
    ]
    assert calls == expected
    compact_json(chat), compact_json(generate)
    text = openai_completion_to_ollama_generate(
        {**resp, "choices": [{"text": content, "index": 0}]}, "m", "t", _TIMINGS, 2
    )
    assert text["response"] == content


# =============================================================================================
# Requests: a client's mistake is a RequestValidationError (its 400), never another exception
# =============================================================================================

_IMAGE = st.sampled_from(
    [
        "iVBORw0KGgoAAAA",
        "/9j/4AAQ",
        "UklGRiQAAABXRUJQ",
        "UklGR",
        "data:image/png;base64,AA",
        "  aGk=\n",
        "",
    ]
)
_TOOL = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": _odd(
                st.fixed_dictionaries({"name": _odd(st.just("f")), "parameters": _ANY_JSON})
            ),
        }
    ),
    st.fixed_dictionaries({"name": _odd(st.just("g"))}),
)
_HISTORY_CALL = st.fixed_dictionaries(
    {},
    optional={
        "id": _odd(st.sampled_from(["a", "call_1", ""])),
        "function": _odd(
            st.fixed_dictionaries(
                {"name": _odd(st.sampled_from(["f", "g"]))},
                optional={"arguments": _odd(st.one_of(_ARGUMENTS, st.just('{"a":1}')))},
            )
        ),
    },
)
_MESSAGE = st.fixed_dictionaries(
    {"role": _odd(st.sampled_from(["user", "assistant", "system", "tool", "User", "TOOL", "x"]))},
    optional={
        "content": _odd(_PIECES),
        "images": _odd(st.lists(_odd(_IMAGE), max_size=2)),
        "tool_calls": _odd(st.lists(_odd(_HISTORY_CALL), max_size=2)),
        "tool_name": _odd(st.sampled_from(["f", "g", ""])),
        "tool_call_id": _odd(st.sampled_from(["a", "call_1", "zz", ""])),
        "name": _odd(st.sampled_from(["f", "Jane Doe", "a_b"])),
        "thinking": _odd(_PIECES),
    },
)
_NUMBER = st.one_of(st.integers(-(2**64), 2**64), st.floats(), st.just(10**400), st.booleans())
_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "temperature": _odd(_NUMBER),
        "top_p": _odd(_NUMBER),
        "presence_penalty": _odd(_NUMBER),
        "num_predict": _odd(_NUMBER),
        "seed": _odd(_NUMBER),
        "stop": _odd(st.one_of(_PIECES, st.lists(_odd(_PIECES), max_size=2))),
        "num_ctx": _ANY_JSON,
    },
)
_GENERATION = {
    "model": _odd(st.sampled_from(["m", "m:latest", "", "\ud83d"])),
    "stream": _odd(st.booleans()),
    "options": _odd(_OPTIONS),
    "format": _odd(
        st.one_of(
            st.sampled_from(["json", "", "xml"]),
            st.fixed_dictionaries(
                {"type": st.sampled_from(["object", "array"])},
                optional={
                    "properties": _ANY_JSON,
                    "required": _ANY_JSON,
                    "additionalProperties": _ANY_JSON,
                    "anyOf": _ANY_JSON,
                },
            ),
        )
    ),
    "think": _odd(st.sampled_from([True, False, "low", "max", "none", "HIGH"])),
    "images": _odd(st.lists(_odd(_IMAGE), max_size=2)),
    "logprobs": _odd(st.booleans()),
    "top_logprobs": _odd(st.integers(-1, 25)),
    "keep_alive": _odd(
        st.one_of(st.sampled_from(["0", "5m", "0m0s", "1h30m", "-1", ".5s", "0."]), _NUMBER)
    ),
}
CHAT_BODIES = st.fixed_dictionaries(
    {},
    optional={
        **_GENERATION,
        "messages": _odd(st.lists(_odd(_MESSAGE), max_size=4)),
        "tools": _odd(st.lists(_odd(_TOOL), max_size=2)),
    },
)
_VALID_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "Assistant"])},
    optional={
        "content": st.one_of(st.none(), _PIECES),
        "images": st.lists(_IMAGE, max_size=2),
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {
                    "function": st.fixed_dictionaries(
                        {"name": st.sampled_from(["f", "g"])}, optional={"arguments": _ARGUMENTS}
                    )
                },
                optional={"id": st.sampled_from(["call_1", "call_2", "x"])},
            ),
            max_size=2,
        ),
        "tool_name": st.sampled_from(["f", "g", "h"]),
        "tool_call_id": st.sampled_from(["call_1", "x", "unknown"]),
    },
)
# valid bodies, so that the translation itself is exercised (most odd ones are refused)
VALID_CHAT_BODIES = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(_VALID_MESSAGE, max_size=6)},
    optional={
        "stream": st.booleans(),
        "think": st.sampled_from([True, False, "low"]),
        "tools": st.lists(_TOOL, max_size=2),
    },
)
GENERATE_BODIES = st.fixed_dictionaries(
    {},
    optional={
        **_GENERATION,
        "prompt": _odd(_PIECES),
        "system": _odd(_PIECES),
        "suffix": _odd(st.sampled_from(["", "x"])),
        "raw": _odd(st.booleans()),
        "template": _ANY_JSON,
        "context": _ANY_JSON,
    },
)
EMBED_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "model": _odd(st.just("m")),
        "input": _odd(st.one_of(_PIECES, st.lists(_odd(_PIECES), max_size=3))),
        "prompt": _odd(_PIECES),
        "dimensions": _odd(st.integers(-2, 9)),
        "truncate": _odd(st.booleans()),
        "options": _odd(_OPTIONS),
    },
)
_THINK_SWITCH = {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "low"}


def _translated(body: Any, validate: Any, translate: Any) -> dict[str, Any] | None:
    try:
        valid = validate(body)
    except RequestValidationError:
        return None
    try:
        payload = translate(valid, "backend")
    except NestedTooDeeply:  # forward.for_backend's 400
        return None
    compact_json(payload)  # what is sent: JSON, whatever the client wrote
    return payload


@FAST
@given(st.one_of(CHAT_BODIES, VALID_CHAT_BODIES, _ANY_JSON))
def test_any_chat_body_is_translated_or_refused_as_a_client_error(body: Any) -> None:
    payload = _translated(body, validate_ollama_chat, ollama_chat_to_openai)
    if payload is None:
        return
    signatures = ThoughtSignatures("generativelanguage.googleapis.com")
    signatures.attach("gemini-3", payload["messages"], client="c", tools=payload.get("tools"))
    with_extra_body(payload, think_extra_body(body.get("think"), _THINK_SWITCH, _THINK_SWITCH))
    keep_alive_unloads(body.get("keep_alive"))
    for message in payload["messages"]:
        assert message["role"] == message["role"].lower()
        if message["role"] == "tool":
            assert isinstance(message.get("tool_call_id", ""), str)
        if "tool_calls" in message:
            for call in message["tool_calls"]:
                assert isinstance(call["id"], str) and call["id"]
                assert isinstance(call["function"]["arguments"], str)
        if message["role"] != "user":  # OpenAI takes images from users only
            assert not isinstance(message["content"], list)
    # each tool answer answers a call made before it (a backend refuses one that does not)
    ids: set[str] = set()
    for message in payload["messages"]:
        ids.update(call["id"] for call in message.get("tool_calls", []))
        if message["role"] == "tool" and ids:
            assert message["tool_call_id"] in ids
    # nothing the client said is lost: every text, in order, and every image
    given = body.get("messages") or []
    assert [m["content"] for m in given if m.get("content")] == [
        text for m in payload["messages"] for text in _texts(m["content"])
    ]
    assert sum(len(m.get("images") or []) for m in given) == sum(
        isinstance(part, dict) and part.get("type") == "image_url"
        for m in payload["messages"]
        for part in (m["content"] if isinstance(m["content"], list) else [])
    )


def _texts(content: Any) -> list[str]:
    if isinstance(content, list):
        return [part["text"] for part in content if part["type"] == "text"]
    return [content] if content else []


@FAST
@given(st.one_of(GENERATE_BODIES, _ANY_JSON))
def test_any_generate_body_is_translated_or_refused_as_a_client_error(body: Any) -> None:
    payload = _translated(body, validate_ollama_generate, ollama_generate_to_openai)
    if payload is not None:
        _translated(body, validate_ollama_generate, ollama_generate_to_completions)
        keep_alive_unloads(body.get("keep_alive"))


@FAST
@given(st.one_of(EMBED_BODIES, _ANY_JSON))
def test_any_embed_body_is_translated_or_refused_as_a_client_error(body: Any) -> None:
    try:
        valid = validate_ollama_embed(body)
    except RequestValidationError:
        pass
    else:
        if valid.get("input") is not None:
            compact_json(ollama_embed_to_openai(valid, "b"))
    _translated(body, validate_ollama_embeddings, ollama_embeddings_to_openai)


@FAST
@given(
    st.one_of(
        st.fixed_dictionaries({}, optional={"model": _ANY_JSON, "stream": _ANY_JSON}), _ANY_JSON
    ),
    st.booleans(),
)
def test_any_openai_body_is_passed_or_refused_as_a_client_error(
    body: Any, require_model: bool
) -> None:
    try:
        validate_openai_body(body, require_model=require_model)
    except RequestValidationError:
        pass


# =============================================================================================
# relay: a backend that answers a stream request with one JSON completion
# =============================================================================================


@FAST
@given(
    st.one_of(
        completions(),
        _ANY_JSON,
        st.fixed_dictionaries(
            {"choices": st.lists(_odd(_ODD_CHOICE), max_size=2)},
            optional={"error": _ANY_JSON, "object": st.just("chat.completion")},
        ),
    )
)
def test_a_json_answer_to_a_stream_becomes_events_or_the_backends_error(whole: Any) -> None:
    try:
        events, _ = relay._completion_as_events(whole, usage_asked=True)
    except relay._NotAStream:
        return
    parser = SSEParser()
    parsed = parser.feed(events) + parser.close()
    assert parsed[-1].data == SSE_DONE
    for event in parsed[:-1]:
        assert isinstance(loads(event.data), dict)
    translator = OllamaStreamTranslator("chat", "m", start_ns=0)
    relay._completion_as_chunk(whole, translator)
    compact_json(translator.finish(1))


# =============================================================================================
# a Response object answered to a /v1/responses stream: always that API's events, in order
# =============================================================================================

_ODD_PART = st.fixed_dictionaries(
    {},
    optional={
        "type": _odd(st.sampled_from(["output_text", "refusal", "summary_text", "reasoning_text"])),
        "text": _odd(st.sampled_from(["", "Hi", "\ud83d"])),
        "refusal": _odd(st.just("no")),
        "annotations": _odd(st.lists(_ANY_JSON, max_size=2)),
        "logprobs": _odd(st.just([])),
    },
)
_ODD_ITEM = st.fixed_dictionaries(
    {},
    optional={
        "type": _odd(
            st.sampled_from(
                ["message", "function_call", "custom_tool_call", "reasoning", "web_search_call"]
            )
        ),
        "id": _odd(st.just("item_1")),
        "call_id": _odd(st.just("call_1")),
        "status": _odd(st.just("completed")),
        "content": _odd(st.lists(_odd(_ODD_PART), max_size=2)),
        "summary": _odd(st.lists(_odd(_ODD_PART), max_size=2)),
        "arguments": _odd(st.just('{"a":1}')),
        "input": _odd(st.just("x")),
    },
)
_ODD_RESPONSE = st.fixed_dictionaries(
    {"object": st.just("response")},
    optional={
        "id": _odd(st.just("resp_1")),
        "status": _odd(st.sampled_from(["completed", "incomplete", "failed", "queued"])),
        "output": _odd(st.lists(_odd(_ODD_ITEM), max_size=3)),
        "usage": _odd(st.just({"input_tokens": 2, "output_tokens": 1})),
    },
)


@FAST
@given(_ODD_RESPONSE)
def test_a_json_response_to_a_responses_stream_becomes_that_apis_events(whole: Any) -> None:
    """Whatever a Response object holds, it becomes named events of JSON objects numbered
    from 0, which the stream's observer reads without a stray exception; it ends the
    stream exactly when its status is a finished one (none at all: completed)."""
    parsed = SSEParser().feed(response_as_events(whole))
    observer = ResponsesStreamObserver()
    for number, event in enumerate(parsed):
        data = loads(event.data)
        assert isinstance(data, dict) and data["type"] == event.event
        assert data["sequence_number"] == number
        observer.feed_text(event.data, number)
    status = whole.get("status") or "completed"
    assert observer.ended == (status in ("completed", "incomplete", "failed"))
    assert not observer.malformed


# =============================================================================================
# relay_openai: whatever the reads, the client gets the backend's events, whole, in order
# =============================================================================================


class _Reads(httpx.AsyncByteStream):
    def __init__(self, reads: list[bytes]) -> None:
        self._reads = reads

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for data in self._reads:
            yield data


_SETTINGS = Settings(upstream_url="http://127.0.0.1:9/v1", max_retries=0)
_COLLECTOR = MetricsCollector(enabled=False, system_enabled=False)


def _relayed(reads: list[bytes], observer: Any = None) -> bytes:
    response = httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        stream=_Reads(reads),
        request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"),
    )

    async def run() -> bytes:
        chunks = relay.relay_openai(
            response,
            OpenAIStreamObserver() if observer is None else observer,
            settings=_SETTINGS,
            metric=None,
            sent_at=time.perf_counter(),
            collector=_COLLECTOR,
            rewrite_model=_model_rewriter({"backend/m": "client"}),
        )
        return b"".join([chunk async for chunk in chunks])

    return trio.run(run)


def _event_lines(draw: st.DrawFn, text: str) -> str:
    """One event: its data line (a comment before or after it, sometimes), each line
    ended by LF, CRLF or CR (mixed, as the format allows), then its blank line."""
    lines = [f"data:{draw(st.sampled_from(['', ' ']))}{text}"]
    if draw(st.integers(0, 3)) == 0:
        lines.insert(draw(st.integers(0, 1)), ": keep-alive")
    lines.append("")
    event = ""
    for line in lines:
        # (a CR then an LF is one line end: CRLF)
        after_cr = (event + line).endswith("\r")
        event += line + draw(st.sampled_from(["\r", "\r\n"]) if after_cr else _SSE_EOL)
    return event


@st.composite
def backend_streams(draw: st.DrawFn) -> tuple[list[bytes], list[str], str]:
    """A chat stream (content, llama.cpp's ``error:`` lines, comments, any line ends) split
    into reads anywhere; what the client's parser must read from it (the ``error:`` lines as
    OpenAI's error chunks, the model as the client names it); how it ends: ``[DONE]``, its
    ``finish_reason``, ``cut`` (neither), ``broken`` (inside an event)."""
    expected = ['{"choices":[{"index":0,"delta":{"content":"a"}}]}']
    stream = _event_lines(draw, expected[0])
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 3)) == 0:
            error = draw(st.sampled_from(['{"message":"boom","code":500}', "plain failure"]))
            stream += f"error:{draw(st.sampled_from(['', ' ']))}{error}" + draw(_SSE_EOL) * 2
            expected.append(error_field_as_data(error))
        else:  # named by the backend's model name, which the client gets as its own
            chunk = {
                "model": "backend/m",
                "choices": [{"index": 0, "delta": {"content": draw(_PIECES)}}],
            }
            separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
            stream += _event_lines(draw, json.dumps(chunk, separators=separators))
            expected.append(json.dumps({**chunk, "model": "client"}, separators=separators))
    ending = draw(st.sampled_from(["[DONE]", "finish_reason", "cut"]))
    if ending != "cut":
        text = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        stream += _event_lines(draw, text)
        expected.append(text)
    if ending == "[DONE]":
        stream += "data: [DONE]" + draw(_SSE_EOL) * 2
    elif draw(st.booleans()):
        # the stream's last event without its blank line: still meant
        stream = stream.rstrip("\r\n") + draw(_SSE_EOL)
    elif draw(st.booleans()):
        # the body ends inside an event: not relayed (the openai SDK could not read it);
        # the proxy's error event ends the stream
        stream += draw(st.sampled_from(['data: {"id": "c', "data: [1", 'data: {"usage": ']))
        stream += draw(st.sampled_from(["", "\n"]))
        ending = "broken"
    raw = stream.encode()
    if draw(st.integers(0, 3)) == 0:
        raw = b"\xef\xbb\xbf" + raw  # a byte order mark, which the format allows
    cuts = sorted(draw(st.lists(st.integers(1, len(raw) - 1), max_size=8)))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds) if a < b], expected, ending


@STREAMS
@given(backend_streams())
def test_relay_openai_relays_every_event_whole_with_error_fields_as_data(
    case: tuple[list[bytes], list[str], str],
) -> None:
    reads, expected, ending = case
    # read as the openai SDK reads them (other fields than data are lost on it)
    events = SSEDecoder().iter_bytes(iter([_relayed(reads)]))
    texts = [e.data for e in events if e.event is None]
    if ending == "[DONE]":
        assert texts.pop() == SSE_DONE
    elif ending == "broken":
        message = texts.pop()
        assert "ended before its last event" in message or "ended inside an event" in message
    elif ending == "cut" and not any(text.startswith('{"error"') for text in expected):
        # a stream that stopped before its end (and reported no failure): the proxy says
        # so, after every whole event
        assert "ended before its last event" in texts.pop()
    assert texts == expected


def _relayed_ollama(reads: list[bytes], kind: str, content_type: str) -> bytes:
    response = httpx.Response(
        200,
        headers={"content-type": content_type},
        stream=_Reads(reads),
        request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"),
    )
    translator = OllamaStreamTranslator(
        kind,  # type: ignore[arg-type]
        "m",
        start_ns=0,
        created_at=lambda: "2024-01-01T00:00:00.000000000Z",
    )

    async def run() -> bytes:
        chunks = relay.relay_ollama(
            response,
            translator,
            settings=_SETTINGS,
            metric=None,
            sent_at=time.perf_counter(),
            collector=_COLLECTOR,
        )
        return b"".join([chunk async for chunk in chunks])

    return trio.run(run)


def _wire_json(chunk: dict[str, Any]) -> str:
    """As backends write it: UTF-8, a lone surrogate (half an emoji) as its escape."""
    text = json.dumps(chunk, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(chunk)
    return text


@STREAMS
@given(
    chat_streams(),
    st.sampled_from(["chat", "generate"]),
    st.sampled_from(["text/event-stream", "text/plain"]),
    st.data(),
)
def test_relay_ollama_translates_any_reads_of_a_chat_stream_to_its_answer(
    case: StreamCase, kind: str, content_type: str, data: st.DataObject
) -> None:
    stream = "".join(_event_lines(data.draw, _wire_json(c)) for c in case.chunks)
    if data.draw(st.booleans()):
        stream += "data: [DONE]" + data.draw(_SSE_EOL) * 2
    elif data.draw(st.booleans()):
        stream = stream.rstrip("\r\n")  # the last event without its line end
    raw = stream.encode()
    cuts = sorted(data.draw(st.lists(st.integers(1, len(raw) - 1), max_size=10)))
    bounds = [0, *cuts, len(raw)]
    reads = [raw[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    out = _relayed_ollama(reads, kind, content_type)
    assert out.endswith(b"\n")
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert "error" not in lines[-1], lines[-1]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    content, thinking, calls = _answer(lines, kind)
    assert content == _whole_characters(case.content)
    assert thinking == _whole_characters(case.thinking)
    assert [
        (c.get("id"), c["function"]["name"], c["function"]["arguments"]) for c in calls
    ] == case.calls
    if case.usage is not None:
        assert (lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]) == case.usage


@st.composite
def failing_streams(draw: st.DrawFn) -> tuple[list[bytes], str, str]:
    """A chat stream that fails after its first token, in one of the ways backends say
    so, split into reads anywhere; the text before the failure and the failure's message."""
    text = "a"
    stream = _event_lines(draw, json.dumps(_chunk({"delta": {"content": "a"}})))
    for _ in range(draw(st.integers(0, 3))):
        piece = draw(_PIECES)
        stream += _event_lines(draw, json.dumps(_chunk({"delta": {"content": piece}})))
        text += piece
    failure = draw(st.sampled_from(["error field", "error chunk", "finish_reason error"]))
    if failure == "error field":  # llama.cpp before October 2025
        stream += 'error: {"code":500,"message":"boom"}' + draw(_SSE_EOL) * 2
    elif failure == "error chunk":  # OpenRouter's carries choices too
        chunk = {
            "error": {"message": "boom"},
            **draw(st.sampled_from([{}, _chunk({"delta": {"content": "x"}})])),
        }
        stream += _event_lines(draw, json.dumps(chunk))
    else:
        chunk = _chunk(
            {"delta": {"content": "x"}, "finish_reason": "error"}, error={"message": "boom"}
        )
        stream += _event_lines(draw, json.dumps(chunk))
    # what a backend may send after: more text, the end; none of it is the answer
    stream += _event_lines(
        draw, json.dumps(_chunk({"delta": {"content": "after"}, "finish_reason": "stop"}))
    )
    stream += "data: [DONE]\n\n"
    raw = stream.encode()
    cuts = sorted(draw(st.lists(st.integers(1, len(raw) - 1), max_size=8)))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds) if a < b], text, "boom"


@STREAMS
@given(failing_streams(), st.sampled_from(["chat", "generate"]))
def test_relay_ollama_ends_a_failed_stream_with_one_error_line_after_the_text_before_it(
    case: tuple[list[bytes], str, str], kind: str
) -> None:
    reads, text, message = case
    lines = [
        json.loads(line) for line in _relayed_ollama(reads, kind, "text/event-stream").splitlines()
    ]
    assert lines[-1] == {"error": message}
    assert all(line["done"] is False for line in lines[:-1])
    assert _answer(lines[:-1], kind)[0] == text


@st.composite
def responses_streams(draw: st.DrawFn) -> tuple[list[bytes], list[tuple[str, str]], bool]:
    """A Responses API stream (``event:`` and ``data:`` lines, no ``[DONE]``: its closing
    event ends it) split into reads anywhere; its events; whether it has its closing event."""
    events = [("response.created", {"type": "response.created", "response": {"id": "r1"}})]
    for _ in range(draw(st.integers(0, 4))):
        delta = draw(_PIECES)
        events.append(
            ("response.output_text.delta", {"type": "response.output_text.delta", "delta": delta})
        )
    closed = draw(st.booleans())
    if closed:
        kind = draw(st.sampled_from(["response.completed", "response.incomplete"]))
        usage = {"input_tokens": 3, "output_tokens": 4}
        events.append((kind, {"type": kind, "response": {"id": "r1", "usage": usage}}))
    stream = ""
    for name, payload in events:
        eol = draw(_SSE_EOL)
        stream += f"event: {name}{eol}data: {json.dumps(payload)}{eol}{eol}"
    raw = stream.encode()
    cuts = sorted(draw(st.lists(st.integers(1, len(raw) - 1), max_size=8)))
    bounds = [0, *cuts, len(raw)]
    reads = [raw[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    # what comes after the closing event is never the client's: a backend may keep its
    # body open (the relay stops at that event)
    return reads, [(name, json.dumps(payload)) for name, payload in events], closed


@STREAMS
@given(responses_streams())
def test_relay_openai_relays_a_responses_stream_whole_to_its_closing_event(
    case: tuple[list[bytes], list[tuple[str, str]], bool],
) -> None:
    reads, expected, closed = case
    observer = ResponsesStreamObserver()
    events = [(e.event, e.data) for e in SSEDecoder().iter_bytes(iter([_relayed(reads, observer)]))]
    if not closed:  # cut before its closing event: the proxy's error event ends it
        assert "ended before its last event" in json.loads(events.pop()[1])["error"]["message"]
    assert events == expected
    if closed:
        assert (observer.prompt_tokens, observer.completion_tokens) == (3, 4)


# =============================================================================================
# the read of one whole event (SSEParser.lone_event, the relay's common read) is read as the
# general parser reads it: the same events, the same state after, the same bytes relayed
# =============================================================================================

_LONE_EVENT_TEXT = st.one_of(
    st.builds(
        lambda content: compact_json(
            {"id": "c", "model": "backend/m", "choices": [{"index": 0, "delta": content}]}
        ).decode(),
        st.one_of(
            st.builds(lambda text: {"content": text}, _PIECES),
            st.just({"role": "assistant", "content": ""}),
            st.just({}),
            st.builds(lambda text: {"reasoning_content": text}, _PIECES),
        ),
    ),
    st.just('{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'),
    st.just('{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}'),
    st.just('{"error":{"message":"boom"}}'),
    st.just(SSE_DONE),
    st.just("not json"),
    st.just(""),
)
# bytes at the edges: no UTF-8 (an overlong form, a surrogate, a character cut short, one
# past U+10FFFF), no JSON (a raw control character, escapes cut short), and text (an
# emoji, U+2028, DEL)
_NOT_TEXT = [b"\xc0\x80", b"\xed\xa0\x80", b"\xe4\xb8", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80"]
_NOT_TEXT += [b"\x01", b"\r", b"\\u12", b"\\ud83d", b"\xf0\x9f\x98\x80", b"\xe2\x80\xa8", b"\x7f"]
# the bytes of a delta's content (between its quotes) as a backend may send them: text,
# escapes, and what is no JSON string or no UTF-8
_CONTENT_BYTES = st.lists(
    st.one_of(
        _PIECES.map(lambda text: text.encode()),
        _PIECES.map(lambda text: json.dumps(text)[1:-1].encode()),
        st.binary(max_size=3),
        st.sampled_from(_NOT_TEXT),
    ),
    max_size=4,
).map(b"".join)


def _token_read(content: bytes) -> bytes:
    """A token's chunk as most of a stream's reads are, its content any bytes."""
    head = b'data: {"id":"c","model":"backend/m","choices":[{"index":0,"delta":{"content":"'
    return head + content + b'"}}]}\n\n'


_TOKEN_READ = _CONTENT_BYTES.map(_token_read)
# a read: one whole event (most of them), or any other piece of a stream
_LONE_READ = st.one_of(
    _TOKEN_READ,
    _TOKEN_READ,
    st.builds(lambda text: f"data: {text}\n\n".encode(), _LONE_EVENT_TEXT),
    st.builds(lambda text: f"data: {text}\n\n".encode(), _LONE_EVENT_TEXT),
    st.builds(lambda text, eol: f"data:{text}{eol}{eol}".encode(), _LONE_EVENT_TEXT, _SSE_EOL),
    st.builds(lambda text: f"data: {text}\r\n\r\n".encode(), _LONE_EVENT_TEXT),
    st.builds(lambda text: f"data: {text}\n\n".encode()[:-1], _LONE_EVENT_TEXT),
    st.builds(lambda text: f"data: {text}\n\ndata: x\n\n".encode(), _LONE_EVENT_TEXT),
    st.builds(lambda line, eol: (line + eol).encode(), _SSE_LINE, _SSE_EOL),
    st.sampled_from([b"\n", b"\r", b"\xef\xbb\xbf", b"\xc3", b"\xa9", b"\xff", b": ping\n\n"]),
    st.sampled_from([b"data: \xc3x\n\n", b"data: x\xe4\xb8\n\n", b"data: \n\n", b"data:\n\n"]),
)


@st.composite
def lone_event_reads(draw: st.DrawFn) -> list[bytes]:
    """Reads of a stream, most of them one whole ``data:`` event each, among pieces cut
    anywhere (a CR before an LF, a UTF-8 character, a BOM, a line not ended yet)."""
    return draw(st.lists(_LONE_READ, max_size=12))


def _parsed_both_ways(reads: list[bytes], strict: bool) -> None:
    general, fused = SSEParser(strict_utf8=strict), SSEParser(strict_utf8=strict)
    for data in reads:
        try:
            expected: list[SSEEvent] | type[Exception] = general.feed(data)
        except ValueError as exc:
            expected = type(exc)
        try:
            text = fused.lone_event(data)
            got: list[SSEEvent] | type[Exception] = (
                fused.feed(data) if text is None else [SSEEvent(text, None, fused._id)]
            )
        except ValueError as exc:
            got = type(exc)
        assert got == expected
        if not isinstance(expected, list):
            return
        assert (fused.mid_event, fused.reads_in_line) == (general.mid_event, general.reads_in_line)
        assert fused.lone_room == general.lone_room
        assert not (fused.lone_room and fused.reads_in_line)  # what the relay relies on
    assert _closed(fused) == _closed(general)


@FAST
@given(_CONTENT_BYTES)
@example(b"\xed\x9f\xbf\xee\x80\x80")  # the last character before the surrogates, the first after
@example(b"")
@example(b"\xed\xa0\x80")  # a surrogate
@example(b"\xc2\xa0\x7f\\n")  # text that is not printable, an escape
@example(b"a\x01")
@example(b'a"b')
@example(b'a","role":"x')
def test_a_token_read_at_its_bytes_is_the_one_its_decoded_text_reads(content: bytes) -> None:
    """The relay's common read (``_ContentChunks.lone_text``) reads a token's chunk at
    its bytes only as the content-only shortcut reads the chunk's text (decoded strictly,
    as the relay decodes it): the same literal. It leaves other deltas to it (a role
    beside the content), but never a plain one with text."""
    warm = _token_read(b"warm")[6:-2].decode()
    bytewise, textwise = _ContentChunks(), _ContentChunks()
    bytewise.content(warm)  # (the text around a delta, learnt)
    textwise.content(warm)
    event = _token_read(content)
    body = bytewise.lone_text(event)
    try:
        text = event[6:-2].decode()
    except UnicodeDecodeError:
        assert body is None
        return
    literal = textwise.content(text)
    if body is not None:
        assert f'"{body}"' == literal
    before = text.index('{"content"')  # (its delta, where the first one's was)
    plain = _TEXT_DELTA.fullmatch(text, before, len(text) - len("}]}"))
    assert (body is not None) == (plain is not None and plain["content"] != '""')


def _closed(parser: SSEParser) -> list[SSEEvent] | type[Exception]:
    try:
        return parser.close()
    except ValueError as exc:
        return type(exc)


@FAST
@given(lone_event_reads(), st.booleans())
@example([b"data: a\r", b"data: b\n\n"], True)
@example([b"data: a\n\n", b"\xc3", b"data: b\n\n"], True)
@example([b"data: a\n\n", b"\xc3", b"data: b\n\n"], False)
@example([b"\xc3"], True)
def test_a_read_of_one_whole_event_is_read_as_the_general_parser_reads_it(
    reads: list[bytes], strict: bool
) -> None:
    _parsed_both_ways(reads, strict)


def _observed(observer: OpenAIStreamObserver) -> tuple[Any, ...]:
    return (
        observer.content_chunks,
        observer.first_token_ns,
        observer.last_token_ns,
        observer.finish_reason,
        observer.prompt_tokens,
        observer.completion_tokens,
        observer.failed,
        observer.error,
        observer.malformed,
        observer.ended,
    )


_FIRST_OUTPUT = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
_ROLE_READ = _token_read(b"").replace(b'{"content"', b'{"role":"assistant","content"')
_STOP_READ = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
_TWO_LINES = b'data: {"id":"c",\ndata: "choices":[{"index":0,"delta":{"content":"y"}}]}\n\n'


# a stream the relay ends early (an event that is no JSON, bytes that are no UTF-8) leaves
# the mocked body's reads unfinished: httpx's generators then (a live body is closed)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@STREAMS
@given(
    st.sampled_from([_FIRST_OUTPUT, _ROLE_READ]),
    st.one_of(lone_event_reads(), backend_streams().map(lambda case: case[0])),
)
@example(_FIRST_OUTPUT, [b"data: [DONE]\n\n", _FIRST_OUTPUT])
@example(_FIRST_OUTPUT, [b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'])
@example(_FIRST_OUTPUT, [b"data: not json\n\n"])
@example(_ROLE_READ, [_token_read(b"x"), _token_read(b""), _token_read(b"y"), _token_read(b"\xff")])
@example(_ROLE_READ, [_token_read(b"x"), _token_read(b"\xed\xa0\x80"), _token_read(b"a\nb")])
# (a chunk written on two data lines: the text around its delta has a line end, so no
# single line is a chunk of that shape; this one is two lines, the second no data)
@example(_FIRST_OUTPUT, [_TWO_LINES, _TWO_LINES.replace(b"\ndata: ", b"\n")])
def test_relay_openai_relays_and_counts_the_same_with_and_without_the_lone_event_read(
    first: bytes, reads: list[bytes]
) -> None:
    """Whatever the reads (whole events one by one, the usual case, or cut anywhere), the
    client gets the same bytes (or the same refusal) and the metrics the same counts and
    token times (each event's clock read the same) when the common read skips the general
    parser (a whole event: ``SSEParser.lone_event``; a token's chunk read at its bytes:
    ``OpenAIStreamObserver.count_lone_token``) as when every read goes through it."""
    # (first: output, or the role chunk of the token chunks after it, which may be the
    # first output, or a failure, refused with a status)
    reads = [first, *reads]
    fused = OpenAIStreamObserver()
    relayed = _in_counted_time(lambda: _relayed(reads, fused))
    general = OpenAIStreamObserver()
    lone_event, lone_token = SSEParser.lone_event, OpenAIStreamObserver.count_lone_token
    SSEParser.lone_event = lambda self, data: None  # type: ignore[method-assign]
    OpenAIStreamObserver.count_lone_token = lambda self, data, clock: False  # type: ignore[method-assign]
    try:
        assert _in_counted_time(lambda: _relayed(reads, general)) == relayed
    finally:
        SSEParser.lone_event = lone_event  # type: ignore[method-assign]
        OpenAIStreamObserver.count_lone_token = lone_token  # type: ignore[method-assign]
    assert _observed(fused) == _observed(general)


def _in_counted_time(relayed: Callable[[], bytes]) -> bytes:
    """What ``relayed`` relays with the relay's ns clock counting its reads (1, 2, ...):
    two relays that read it for the same events note the same token times; a refusal
    (a failure before the stream's first byte) as its status and message."""
    clock = itertools.count(1)
    real = relay.time
    relay.time = types.SimpleNamespace(  # type: ignore[assignment]
        perf_counter=time.perf_counter, perf_counter_ns=lambda: next(clock)
    )
    try:
        return relayed()
    except ProxyError as refused:
        return repr((refused.status, str(refused))).encode()
    finally:
        relay.time = real


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # (as above)
@STREAMS
@given(
    st.sampled_from([_FIRST_OUTPUT, _ROLE_READ]),
    st.one_of(lone_event_reads(), backend_streams().map(lambda case: case[0])),
)
@example(_FIRST_OUTPUT, [b"data: [DONE]\n\n", _FIRST_OUTPUT])
@example(_FIRST_OUTPUT, [b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'])
@example(_ROLE_READ, [_token_read(b"x"), _token_read(b""), _token_read(b"y"), _token_read(b"\xff")])
@example(_ROLE_READ, [_token_read(b"x"), _token_read(b"\\ud83d"), _token_read(b"\\ude00")])
@example(_ROLE_READ, [_token_read(b"x"), _token_read(b"y"), _STOP_READ, b"data: [DONE]\n\n"])
@example(_FIRST_OUTPUT, [_TWO_LINES, _TWO_LINES.replace(b"\ndata: ", b"\n")])
def test_relay_ollama_translates_the_same_with_and_without_the_lone_event_read(
    first: bytes, reads: list[bytes]
) -> None:
    """The same for the translated relay: the same lines, byte for byte (each event's
    clock read the same: the same durations), or the same refusal, whatever the reads,
    when the common read skips the general parser (``SSEParser.lone_event``) and the
    translation of a decoded event (``OllamaStreamTranslator.lone_line``) as when every
    read goes through them."""
    reads = [first, *reads]

    def translated() -> bytes:
        return _in_counted_time(lambda: _relayed_ollama(reads, "chat", "text/event-stream"))

    fused = translated()
    lone_event, lone_line = SSEParser.lone_event, OllamaStreamTranslator.lone_line
    SSEParser.lone_event = lambda self, data: None  # type: ignore[method-assign]
    OllamaStreamTranslator.lone_line = lambda self, data, clock: None  # type: ignore[method-assign]
    try:
        assert translated() == fused
    finally:
        SSEParser.lone_event = lone_event  # type: ignore[method-assign]
        OllamaStreamTranslator.lone_line = lone_line  # type: ignore[method-assign]


def _untimed(lines: bytes) -> list[dict[str, Any]]:
    """Ollama's lines without their durations (the clock's, which differ run to run)."""
    out = []
    for line in lines.splitlines():
        fields = json.loads(line)
        out.append({key: value for key, value in fields.items() if "duration" not in key})
    return out
