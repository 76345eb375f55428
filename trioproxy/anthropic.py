"""The Anthropic Messages API (``/v1/messages``) as OpenAI chat completions, and back.

Pure functions and one sans-I/O stream translator, as ``translate`` is for Ollama's API:
the request a client of the anthropic SDK (or Claude Code) sends becomes a
``/chat/completions`` request for the backend; the backend's completion becomes a
``message`` object; its stream of ``chat.completion.chunk`` events becomes Anthropic's
named server-sent events (``message_start``, ``content_block_*``, ``message_delta``,
``message_stop``). Errors are Anthropic's ``{"type": "error", "error": {...}}``.
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _encode_str
from operator import itemgetter
from typing import Any

from . import translate as tr
from .errors import anthropic_error_payload
from .jsonutil import (
    compact_json,
    compact_json_text,
    escape_line_separators,
    loads,
    whole_number,
)
from .partial_json import ObjectPrefix
from .translate import JSONDict, RequestValidationError

# Anthropic's content type for its event streams; told apart from the OpenAI routes' plain
# ``text/event-stream`` by ``relay.in_band_error``, which ends a stream in its dialect
EVENT_STREAM = "text/event-stream; charset=utf-8"


def error_event(message: str, status: int = 500) -> bytes:
    """The ``error`` event that ends a stream early: the anthropic SDK raises on it
    (``APIStatusError``), where a stream that just stopped would read as a finished one."""
    return encode_event(anthropic_error_payload(message, status)) + b"\n"


def encode_event(event: JSONDict) -> bytes:
    """One named server-sent event, without the blank line that ends it (the relay joins
    events with a line end and ends the last one): the anthropic SDK skips an event
    without its ``event:`` name."""
    name: str = event["type"]
    return b"event: " + name.encode() + b"\ndata: " + compact_json(event) + b"\n"


# =============================================================================================
# Requests
# =============================================================================================

# "system" in ``messages``: Claude Code's mid-conversation system messages (its beta
# ``mid-conversation-system-2026-04-07``), sent on every request since 2.1
_ROLES = ("user", "assistant", "system")
_TOOL_CHOICES = ("auto", "any", "tool", "none")
_THINKING_TYPES = ("enabled", "disabled", "adaptive")
# thinking.display: "summarized" (the text) or "omitted" (blocks without it); another
# string (a display a newer client knows) is read as the text shown, not refused
OMITTED = "omitted"


def validate_messages(body: object) -> JSONDict:
    """The checks Anthropic's API makes before it reads a request, as 400s naming the
    field; what is not checked here is read leniently by :func:`messages_to_openai`."""
    if not isinstance(body, dict):
        raise RequestValidationError(None, "request body must be a JSON object")
    model = body.get("model")
    if model is None or model == "":
        raise RequestValidationError("model", "is required")
    if not isinstance(model, str):
        raise RequestValidationError("model", "must be a string")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise RequestValidationError("max_tokens", "is required")
    if type(max_tokens) is not int or max_tokens < 1:
        raise RequestValidationError("max_tokens", "must be an integer of at least 1")
    _check_messages(body.get("messages"))
    _check_system(body.get("system"))
    _check_type(body, "stream", bool, "a boolean")
    for key in ("temperature", "top_p"):
        if body.get(key) is not None and not tr._is_finite_number(body[key]):
            raise RequestValidationError(key, "must be a number")
    top_k = body.get("top_k")
    if top_k is not None and (type(top_k) is not int or top_k < 0):
        raise RequestValidationError("top_k", "must be a non-negative integer")
    stops = body.get("stop_sequences")
    if stops is not None:
        tr._check_str_list(stops, "stop_sequences")
    _check_tools(body.get("tools"))
    _check_choice(body.get("tool_choice"))
    _check_thinking(body.get("thinking"))
    _check_output_config(body.get("output_config"))
    _check_format(body.get("output_format"), "output_format")
    return body


def _check_thinking(thinking: object) -> None:
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in _THINKING_TYPES:
        raise RequestValidationError("thinking.type", "must be 'enabled', 'disabled' or 'adaptive'")
    budget = thinking.get("budget_tokens")
    if budget is not None and type(budget) is not int:
        raise RequestValidationError("thinking.budget_tokens", "must be an integer")
    display = thinking.get("display")
    if display is not None and not isinstance(display, str):
        raise RequestValidationError("thinking.display", "must be 'summarized' or 'omitted'")


def _check_output_config(config: object) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise RequestValidationError("output_config", "must be an object")
    effort = config.get("effort")
    # a string first: a list or an object is no key of the table (a TypeError, a 500)
    if effort is not None and (not isinstance(effort, str) or effort not in _EFFORTS):
        raise RequestValidationError("output_config.effort", f"must be one of {_EFFORT_NAMES}")
    _check_format(config.get("format"), "output_config.format")


def _check_format(fmt: object, where: str) -> None:
    """A structured output format: Anthropic's only kind is a JSON schema."""
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise RequestValidationError(f"{where}.type", "must be 'json_schema'")
    if not isinstance(fmt.get("schema"), dict):
        raise RequestValidationError(f"{where}.schema", "must be an object")


def _check_type(body: JSONDict, key: str, kind: type, what: str) -> None:
    if body.get(key) is not None and not isinstance(body[key], kind):
        raise RequestValidationError(key, f"must be {what}")


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestValidationError("messages", "must be a non-empty list")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestValidationError(where, "must be an object")
        if msg.get("role") not in _ROLES:
            raise RequestValidationError(f"{where}.role", "must be 'user', 'assistant' or 'system'")
        if msg["role"] == "system":
            _check_system(msg.get("content"), f"{where}.content")
        else:
            _check_content(msg.get("content"), f"{where}.content")


def _check_content(content: object, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise RequestValidationError(where, "must be a string or a list of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise RequestValidationError(f"{where}[{j}].type", "must be a string")
        kind = block["type"]
        if kind == "text" and not isinstance(block.get("text"), str):
            raise RequestValidationError(f"{where}[{j}].text", "must be a string")
        if kind == "image" and not isinstance(block.get("source"), dict):
            raise RequestValidationError(f"{where}[{j}].source", "must be an object")
        if kind == "tool_use" and not isinstance(block.get("name"), str):
            raise RequestValidationError(f"{where}[{j}].name", "must be a string")
        if kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise RequestValidationError(f"{where}[{j}].tool_use_id", "must be a string")
            inner = block.get("content")
            if inner is not None:
                _check_content(inner, f"{where}[{j}].content")


def _check_system(system: object, where: str = "system") -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise RequestValidationError(where, "must be a string or a list of text blocks")
    for j, block in enumerate(system):
        if not isinstance(block, dict) or not isinstance(block.get("text"), str):
            raise RequestValidationError(f"{where}[{j}].text", "must be a string")


def _check_tools(tools: object) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise RequestValidationError("tools", "must be a list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise RequestValidationError(f"tools[{i}].name", "must be a string")
        schema = tool.get("input_schema")
        if _is_custom_tool(tool) and not isinstance(schema, dict):
            raise RequestValidationError(f"tools[{i}].input_schema", "must be an object")


def _check_choice(choice: object) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in _TOOL_CHOICES:
        raise RequestValidationError("tool_choice.type", "must be one of auto, any, tool, none")
    if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
        raise RequestValidationError("tool_choice.name", "must be a string")


def _is_custom_tool(tool: JSONDict) -> bool:
    """A client tool (name, description, input_schema): Anthropic's server tools (web
    search, bash, text editor...) carry a versioned ``type`` and no schema; the backend
    cannot run them."""
    return tool.get("type") in (None, "custom")


def think_of(body: JSONDict) -> bool | None:
    """The request's ``thinking`` as Ollama's ``think``: True to reason, False not to,
    None when the client did not say (the backend's default)."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict):
        return None
    return thinking.get("type") != "disabled"


def thinking_omitted(body: JSONDict) -> bool:
    """Whether the client asked for thinking blocks without their text (``thinking.display``
    "omitted": Claude Code sends it on every request). Anthropic then sends each block with
    an empty ``thinking`` and its signature, and a stream no ``thinking_delta``: the
    reasoning is still done (and its tokens counted), only not sent."""
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("display") == OMITTED


# Anthropic's efforts as OpenAI's reasoning_effort, step for step from each API's default:
# Anthropic's is "high" (the same as no effort, its docs say; Claude Code sends it on every
# request), OpenAI's "medium". So "high" asks for nothing (the backend's default), a
# step below is "low" (the lowest every reasoning backend takes: not all take "minimal"),
# a step above "high" (the highest they all take: "xhigh" exists on a few models only,
# and an unknown effort is a 400 from the backend)
_EFFORTS = {"low": "low", "medium": "low", "high": None, "xhigh": "high", "max": "high"}
_EFFORT_NAMES = ", ".join(_EFFORTS)
# A thinking budget below this asks to think little ("low"); a larger one only allows
# more thinking (it is a limit, which no OpenAI field sets), so it asks for nothing:
# Claude Code's own, 31,999, comes with every request for a Claude model name
_LOW_BUDGET = 5_000


def reasoning_effort_of(body: JSONDict) -> str | None:
    """The request's ``output_config.effort``, or else its ``thinking.budget_tokens``, as
    OpenAI's ``reasoning_effort``; None for the backend's default: neither given, an
    effort or budget that asks for no more than that, or thinking turned off (the backend
    is then told not to reason, if the operator says how: THINK_OFF_EXTRA_BODY)."""
    thinking = body.get("thinking")
    thinking = thinking if isinstance(thinking, dict) else {}
    if thinking.get("type") == "disabled":
        return None
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    if effort is not None:
        return _EFFORTS[effort]
    budget = thinking.get("budget_tokens")
    if thinking.get("type") == "enabled" and type(budget) is int and budget < _LOW_BUDGET:
        return "low"
    return None


def messages_to_openai(body: JSONDict, backend_model: str) -> JSONDict:
    """A validated Messages request as a ``/chat/completions`` request for the backend."""
    out: JSONDict = {"model": backend_model, "messages": _openai_messages(body)}
    out["max_tokens"] = body["max_tokens"]
    if effort := reasoning_effort_of(body):
        out["reasoning_effort"] = effort
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            out[key] = body[key]  # top_k is no OpenAI field: vLLM and llama.cpp take it
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    if (fmt := _output_format(body)) is not None:
        # as Ollama's ``format`` schema goes (strict where OpenAI's strict mode takes it):
        # the SDKs' parse helpers and the AI SDK's structured output read the text as JSON
        out["response_format"] = tr._response_format(fmt["schema"])
    tools = [_openai_tool(t) for t in body.get("tools") or () if _is_custom_tool(t)]
    choice = body.get("tool_choice")
    if tools and not (isinstance(choice, dict) and choice.get("type") == "none"):
        out["tools"] = tools
        if isinstance(choice, dict):
            out["tool_choice"] = _openai_tool_choice(choice)
            if choice.get("disable_parallel_tool_use") is True:
                out["parallel_tool_calls"] = False
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _output_format(body: JSONDict) -> JSONDict | None:
    """``output_config.format``, or ``output_format``: the structured outputs beta's
    name for it, which the SDKs' beta namespaces still send."""
    config = body.get("output_config")
    fmt = config.get("format") if config is not None else None
    return fmt if fmt is not None else body.get("output_format")


def _openai_tool(tool: JSONDict) -> JSONDict:
    function: JSONDict = {"name": tool["name"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    function["parameters"] = tool.get("input_schema") or {"type": "object"}
    return {"type": "function", "function": function}


def _openai_tool_choice(choice: JSONDict) -> Any:
    kind = choice["type"]
    if kind == "tool":
        return {"type": "function", "function": {"name": choice["name"]}}
    return "required" if kind == "any" else "auto"


def _openai_messages(body: JSONDict) -> list[JSONDict]:
    out: list[JSONDict] = []
    system = _system_text(body.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for msg in body["messages"]:
        content = msg.get("content")  # (a system message's may be absent)
        if msg["role"] == "system":
            # kept where it stands, as Ollama keeps it: the conversation before it stays a
            # prefix the backend's cache can reuse
            if text := _system_text(content):
                out.append({"role": "system", "content": text})
        elif msg["role"] == "assistant":
            out.append(_assistant_message(content))
        elif isinstance(content, str):
            out.append({"role": "user", "content": content})
        else:
            out.extend(_user_messages(content))
    return out


def _system_text(system: str | list[JSONDict] | None) -> str | None:
    if isinstance(system, list):
        return "\n\n".join(block["text"] for block in system)
    return system


def _assistant_message(content: str | list[JSONDict]) -> JSONDict:
    """An assistant turn: its text, and its tool_use blocks as tool calls. Its thinking is
    dropped, as ``/api/chat`` drops it: OpenAI-compatible backends take no reasoning in
    the history."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    text = "\n".join(b["text"] for b in content if b["type"] == "text")
    calls = [
        {
            "id": block.get("id") if isinstance(block.get("id"), str) else f"call{i:05d}",
            "type": "function",
            "function": {"name": block["name"], "arguments": _arguments(block.get("input"))},
        }
        for i, block in enumerate(content)
        if block["type"] == "tool_use"
    ]
    message: JSONDict = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    elif not text:
        message["content"] = ""
    return message


def _arguments(value: object) -> str:
    return compact_json_text(value if value is not None else {})


def _user_messages(content: list[JSONDict]) -> list[JSONDict]:
    """A user turn: its tool results first, each a ``tool`` message (OpenAI wants them
    right after the assistant's calls), then the rest as one user message. A tool's
    images, which a tool message cannot hold, go in that user message."""
    tools: list[JSONDict] = []
    parts: list[JSONDict] = []
    for block in content:
        kind = block["type"]
        if kind == "tool_result":
            text, images = _tool_result(block)
            tools.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            parts += images
        elif (part := _user_part(block)) is not None:
            parts.append(part)
    if parts:
        if all(p["type"] == "text" for p in parts):
            # a line end between blocks, as vLLM joins text parts: Claude Code's blocks are
            # separate texts (a system reminder, then the prompt), never one word cut in two
            tools.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            tools.append({"role": "user", "content": parts})
    return tools


def _user_part(block: JSONDict) -> JSONDict | None:
    """A user content block as an OpenAI content part; None for what the backend cannot
    take (server tool results, search results' metadata...), dropped."""
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": block["text"]}
    if kind == "image":
        url = _image_url(block["source"])
        return {"type": "image_url", "image_url": {"url": url}} if url else None
    if kind == "document":
        return {"type": "text", "text": _document_or_note(block)}
    return None


def _image_url(source: JSONDict) -> str | None:
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        media = source.get("media_type")
        if isinstance(media, str) and media:
            return f"data:{media};base64,{source['data']}"
        return tr.image_data_url(source["data"])
    if source.get("type") == "url" and isinstance(url := source.get("url"), str):
        return url
    return None


def _document_text(block: JSONDict) -> str | None:
    """A document block's text when it is plain text; None for a PDF or a file."""
    source = block.get("source")
    if not isinstance(source, dict):
        return None
    if source.get("type") == "text" and isinstance(data := source.get("data"), str):
        return data
    if source.get("type") == "content" and isinstance(source.get("content"), str | list):
        inner = source["content"]
        if isinstance(inner, str):
            return inner
        # its blocks are not checked (validate_messages): a text that is no string is left out
        return "".join(
            b["text"] for b in inner if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    return None


def _document_or_note(block: JSONDict) -> str:
    """A document's text; for one the backend cannot read (a PDF, a file), a note saying it
    was left out. Not a 400: Claude Code keeps a PDF its Read tool returned in every later
    request of the conversation, which a refusal would end; not dropped silently either, so
    the model knows it has not seen it."""
    text = _document_text(block)
    if text is not None:
        return text
    source = block.get("source")
    media = source.get("media_type") if isinstance(source, dict) else None
    kind = f" ({media[:100]})" if isinstance(media, str) and media.isprintable() else ""
    title = block.get("title")
    named = f" '{title[:200]}'" if isinstance(title, str) and title.isprintable() else ""
    return f"[document{named}{kind} left out: this model cannot read it]"


def _tool_result(block: JSONDict) -> tuple[str, list[JSONDict]]:
    """A tool result's text (an error marked as one, the model must know the call failed)
    and its images as content parts."""
    inner = block.get("content")
    images: list[JSONDict] = []
    if isinstance(inner, list):
        texts = []
        for part in inner:
            if part["type"] == "text":
                texts.append(part["text"])
            elif part["type"] == "document":
                texts.append(_document_or_note(part))
            elif part["type"] == "image" and (url := _image_url(part["source"])):
                images.append({"type": "image_url", "image_url": {"url": url}})
        text = "\n".join(texts)
    else:
        text = inner if isinstance(inner, str) else ""
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    return text, images


# =============================================================================================
# Answers
# =============================================================================================

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def stop_reason(
    finish_reason: object, matched: object, stops: list[str] | None, has_calls: bool
) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for an OpenAI ``finish_reason``.
    A stop sequence is told only where the backend names the one it met (vLLM's
    ``stop_reason``): OpenAI's ``stop`` says nothing of which. Cut by the token limit, an
    answer is ``max_tokens`` even with calls, as from Anthropic: the last call may be half
    written, and ``tool_use`` would have the client run it."""
    if has_calls and finish_reason != "length":
        return "tool_use", None
    if finish_reason == "stop" and isinstance(matched, str) and stops and matched in stops:
        return "stop_sequence", matched
    if not isinstance(finish_reason, str):  # a backend's list or object is no key: a 500
        return "end_turn", None
    return _STOP_REASONS.get(finish_reason, "end_turn"), None


def openai_to_message(
    resp: JSONDict,
    model: str,
    message_id: str,
    *,
    show_thinking: bool = True,
    omit_thinking: bool = False,
    stops: list[str] | None = None,
) -> JSONDict:
    """A non-stream ``/chat/completions`` answer as a Messages API ``message``; with
    ``omit_thinking`` its thinking block is there without its text (:func:`thinking_omitted`)."""
    choice = tr._first_choice(resp)
    msg = choice.get("message") or {}
    content: list[JSONDict] = []
    thinking = tr._thinking(msg) if show_thinking else ""
    if thinking:
        content.append(thinking_block("" if omit_thinking else thinking))
    text = tr._text(msg.get("content")) + tr._refusal(msg)
    if text:
        content.append({"type": "text", "text": text})
    calls = tr._message_tool_calls(msg)
    content += [tool_use_block(call, i) for i, call in enumerate(calls)]
    reason, sequence = stop_reason(
        choice.get("finish_reason"), choice.get("stop_reason"), stops, bool(calls)
    )
    prompt, completion = tr._usage_counts(resp)
    usage = input_usage(prompt, cache_counts(resp.get("usage")))
    usage["output_tokens"] = completion
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage,
    }


def cache_counts(usage: object) -> tuple[int, int]:
    """The prompt tokens a backend's ``usage`` says it read from its prompt cache and wrote
    to it: OpenAI's ``prompt_tokens_details.cached_tokens`` (also vLLM's, llama.cpp's
    server's, xAI's, OpenRouter's), OpenRouter's ``cache_write_tokens`` beside it,
    DeepSeek's ``prompt_cache_hit_tokens``; (0, 0) when it says nothing."""
    if not isinstance(usage, dict):
        return 0, 0
    details = usage.get("prompt_tokens_details")
    read = written = None
    if isinstance(details, dict):
        read = whole_number(details.get("cached_tokens"))
        written = whole_number(details.get("cache_write_tokens"))
    if read is None:
        read = whole_number(usage.get("prompt_cache_hit_tokens"))
    return read or 0, written or 0


def input_usage(prompt: int, cached: tuple[int, int]) -> JSONDict:
    """A prompt's token count as Anthropic's usage splits it: ``input_tokens`` are those
    neither read from the cache nor written to it, so that the three add up to the
    backend's prompt count (what Claude Code adds up as the context's size). Counts the
    backend got wrong (more cached than the prompt) are cut to the prompt."""
    read = min(cached[0], prompt)
    written = min(cached[1], prompt - read)
    return {
        "input_tokens": prompt - read - written,
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
    }


def thinking_block(thinking: str) -> JSONDict:
    # no signature to give: the backend's reasoning is not Anthropic's, and nothing checks it
    return {"type": "thinking", "thinking": thinking, "signature": ""}


def tool_use_block(call: JSONDict, number: int) -> JSONDict:
    """An Ollama-shaped tool call (``translate.answer._ollama_tool_calls``: arguments decoded, an
    object) as a ``tool_use`` block; a call without an id gets one, for the result to name."""
    function = call["function"]
    call_id = _tool_use_id(call.get("id"), number)
    name, arguments = function["name"], function["arguments"]
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def _tool_use_id(call_id: object, number: int) -> str:
    if isinstance(call_id, str) and call_id:
        return call_id
    return f"toolu_{secrets.token_hex(8)}{number:02d}"


# =============================================================================================
# Streams
# =============================================================================================


def _text_delta(index: int, text: str) -> JSONDict:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "text_delta", "text": text},
    }


def _input_delta(index: int, partial_json: str) -> JSONDict:
    delta = {"type": "input_json_delta", "partial_json": partial_json}
    return {"type": "content_block_delta", "index": index, "delta": delta}


# a text_delta event as encode_event writes it, up to its text (a JSON string, then "}}\n")
_TEXT_HEAD = (
    'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    '"delta":{"type":"text_delta","text":'
)


class ToolInputNotJSON(tr.UntranslatableStream):
    """A tool call's arguments stopped being JSON after some of them went out as its
    ``input``: the client would run the call with what it has, so the stream ends with
    an error instead."""


@dataclass(slots=True)
class _CallStream:
    """Where the tool calls' stream stands: the call being sent (its slot in
    ``_tool_calls``), or the next one; how many of its pieces went out; its input so far
    (None: no block of it is open); text and thinking the backend wrote while a call's
    block was open (each with its kind, "text" or "thinking"), held until it closes;
    whether a call's block went out at all (the stop reason is then ``tool_use``)."""

    slot: int = 0
    taken: int = 0
    input: ObjectPrefix | None = None
    held: list[tuple[str, str]] = field(default_factory=list)
    called: bool = False


class AnthropicStreamTranslator(tr._HeldToolCalls):
    """OpenAI ``chat.completion.chunk`` dicts in, Anthropic stream events out (dicts, each
    encoded by :func:`encode_event`), for ``relay.relay_ollama``.

    ``message_start`` goes out with the first block, not at the backend's role chunk, so
    a failure before any output still gets a real status. Text and thinking are streamed
    as they come, each run a block of its own. A tool call is streamed as Anthropic
    streams one: a ``tool_use`` block once its name is known, then its arguments as the
    backend writes them (``input_json_delta``), checked to stay the start of a JSON object
    (``partial_json.ObjectPrefix``): the clients parse them as they come. Anthropic's
    blocks do not interleave, so calls go one after the other: a call's block closes once
    its object is whole and another call began (or at the end), and what a backend
    writes of later calls meanwhile is held (MAX_HELD_TOOL_CALL_BYTES), and so are text
    and thinking it writes while a call's block is open, sent after the calls. Arguments
    that never start an object (none, or no JSON) are ``{}``, as in a non-stream answer; a
    call cut by the token limit is closed where it stopped (``max_tokens``); one whose
    arguments turn into no JSON after they began to go out ends the stream with an error
    (:class:`ToolInputNotJSON`). ``finish`` closes the last block and sends
    ``message_delta`` (stop reason, usage) and ``message_stop``. With ``omit_thinking``
    (:func:`thinking_omitted`) each run of thinking is a block without its text: its
    start and its stop, no ``thinking_delta``.

    Instances keep < 30 attributes (CPython's shared-key dicts; ``feed`` is per chunk):
    what is not read per chunk goes in ``_calls``.
    """

    def __init__(
        self,
        model: str,
        message_id: str,
        *,
        start_ns: int,
        show_thinking: bool = True,
        omit_thinking: bool = False,
        stops: list[str] | None = None,
    ) -> None:
        super().__init__(start_ns)
        self.model = model
        self.message_id = message_id
        # True: thinking sent; None: its blocks sent without it; False: none. One attribute
        # tested for truth: a shown thinking chunk costs what it did
        self._show_thinking: bool | None = (
            None if show_thinking and omit_thinking else show_thinking
        )
        self._cached = (0, 0)  # the prompt's tokens read from and written to the cache
        self._stops = stops
        self._started = False
        self._finished = False
        self._blocks = 0  # blocks started so far: the next one's index
        self._open: str | None = None  # the kind of the block open now
        self._calls = _CallStream()
        self._matched: object = None  # the stop sequence the backend says it met
        self._text_head = ""  # the open text block's delta event up to its text (feed_text)

    def feed_text(self, data: str, now_ns: int) -> bytes | None:
        """``feed``, its events encoded, for one event's text when it is a chunk of text
        alone and a text block is open (most of a stream): its ``text_delta`` event as
        :func:`encode_event` writes it, without decoding the chunk (~3.9 to ~1.2 µs a
        chunk). None for any other event, which the caller decodes and passes to
        :meth:`feed`: the first text (its block opens), thinking, calls, the end."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._open != "text":
            return None
        literal = self._shapes.content(data)
        if literal is None or literal == '""':
            return None  # not text alone, or no text: read whole, as feed reads it
        self._count_token(now_ns)
        text = tr._decode_str(literal)
        try:
            return escape_line_separators((self._text_head + _encode_str(text) + "}}\n").encode())
        except UnicodeEncodeError:  # half a surrogate pair: as compact_json writes it
            return encode_event(_text_delta(self._blocks - 1, text))

    def feed(self, chunk: JSONDict, now_ns: int) -> list[JSONDict]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        content, thinking, calls, choice = self._observe(chunk, now_ns)
        events: list[JSONDict] = []
        # blocks do not interleave: text and thinking wait while a call's block is open
        if thinking:
            if self._show_thinking:
                if self._open == "tool_use":
                    self._hold_beside_call("thinking", thinking)
                else:
                    delta = {"type": "thinking_delta", "thinking": thinking}
                    self._delta(events, "thinking", delta)
            elif self._show_thinking is None:
                self._omitted_thinking(events)
        if content:
            if self._open == "tool_use":
                self._hold_beside_call("text", content)
            else:
                self._delta(events, "text", {"type": "text_delta", "text": content})
        if calls:
            for delta in calls:
                if isinstance(delta, dict):
                    self._accumulate(delta)
            self._send_calls(events)
        if choice and choice.get("finish_reason"):
            self._matched = choice.get("stop_reason")
            if self._tool_calls:
                self._end_calls(events)
        if self._calls.held and self._open != "tool_use":
            self._send_held(events)
        return events

    def finish(self, now_ns: int) -> list[JSONDict]:
        """The events that end the stream; called once, after the backend's last chunk."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        events: list[JSONDict] = []
        if self._tool_calls:  # a stream that ended without its finish_reason
            self._end_calls(events)
        if self._calls.held:
            self._send_held(events)
        self._start(events)
        self._close(events)
        reason, sequence = stop_reason(
            self.finish_reason, self._matched, self._stops, self._calls.called
        )
        output = self.completion_tokens
        usage: JSONDict = {"output_tokens": output if output is not None else self.content_chunks}
        if self.prompt_tokens is not None:
            usage.update(input_usage(self.prompt_tokens, self._cached))
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        events.append({"type": "message_delta", "delta": delta, "usage": usage})
        events.append({"type": "message_stop"})
        return events

    @property
    def finished(self) -> bool:
        return self._finished

    def _start(self, events: list[JSONDict]) -> None:
        if self._started:
            return
        self._started = True
        message: JSONDict = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**input_usage(self.prompt_tokens or 0, self._cached), "output_tokens": 0},
        }
        events.append({"type": "message_start", "message": message})

    def _open_block(self, events: list[JSONDict], kind: str, block: JSONDict) -> int:
        self._start(events)
        self._close(events)
        self._open = kind
        start = {"type": "content_block_start", "index": self._blocks, "content_block": block}
        events.append(start)
        self._blocks += 1
        return self._blocks - 1

    def _close(self, events: list[JSONDict]) -> None:
        if self._open is not None:
            if self._open == "tool_use":
                self._end_call(events)
            self._open = None
            events.append({"type": "content_block_stop", "index": self._blocks - 1})

    def _delta(self, events: list[JSONDict], kind: str, delta: JSONDict) -> None:
        if self._open != kind:
            empty = thinking_block("") if kind == "thinking" else {"type": "text", "text": ""}
            index = self._open_block(events, kind, empty)
            if kind == "text":
                self._text_head = _TEXT_HEAD % index
        events.append({"type": "content_block_delta", "index": self._blocks - 1, "delta": delta})

    def _take_usage(self, usage: object, input_key: str, output_key: str) -> None:
        if isinstance(usage, dict):  # (per chunk: the base's cost when there is none)
            super()._take_usage(usage, input_key, output_key)
            if whole_number(usage.get(input_key)) is not None:  # the prompt they part
                self._cached = cache_counts(usage)

    def _omitted_thinking(self, events: list[JSONDict]) -> None:
        """Thinking not to be sent: a block of its own once, without its text (held as an
        empty run beside a call's open block, one however many chunks)."""
        if self._open == "tool_use":
            held = self._calls.held
            if not held or held[-1] != ("thinking", ""):
                held.append(("thinking", ""))
        elif self._open != "thinking":
            self._open_block(events, "thinking", thinking_block(""))

    def _hold_beside_call(self, kind: str, text: str) -> None:
        """Text or thinking that came while a call's block is open: a call cannot close
        before its input is whole, so it waits for the calls (bounded with them).
        Thinking closed the block once: a call partly out ended the stream
        (ToolInputNotJSON), one not yet begun was {} and its arguments were lost."""
        self._hold(len(text))
        self._calls.held.append((kind, text))

    def _send_held(self, events: list[JSONDict]) -> None:
        held = self._calls.held
        for kind, run in itertools.groupby(held, key=itemgetter(0)):
            text = "".join(text for _, text in run)
            if kind == "thinking" and self._show_thinking is None:
                self._omitted_thinking(events)
            else:
                self._delta(events, kind, {"type": f"{kind}_delta", kind: text})
        held.clear()

    def _send_calls(self, events: list[JSONDict], ending: bool = False) -> None:
        """Send what can go out of the calls so far: the call being sent, then the next
        once it is whole and the backend began another; every call when ``ending``."""
        calls, stream = self._tool_calls, self._calls
        while stream.slot < len(calls):
            pending = calls[stream.slot]
            if stream.input is None:
                if not (pending.name or ending):
                    return  # the block starts with the name: its pieces wait for it
                self._open_call(events, pending)
            whole = self._send_arguments(events, pending)
            if not (ending or (whole and stream.slot + 1 < len(calls))):
                return
            self._close(events)

    def _end_calls(self, events: list[JSONDict]) -> None:
        self._send_calls(events, ending=True)
        self._drop_tool_calls()
        self._calls.slot = 0

    def _open_call(self, events: list[JSONDict], pending: tr._PendingToolCall) -> None:
        call_id = _tool_use_id(pending.id, self._blocks)
        block = {"type": "tool_use", "id": call_id, "name": pending.name, "input": {}}
        self._open_block(events, "tool_use", block)
        self._calls.input = ObjectPrefix()
        self._calls.taken = 0
        self._calls.called = True

    def _send_arguments(self, events: list[JSONDict], pending: tr._PendingToolCall) -> bool:
        """The call's pieces not yet taken, as far as they can go out; whether its object
        is whole."""
        stream = self._calls
        prefix = stream.input
        assert prefix is not None
        pieces = pending.arguments
        if stream.taken < len(pieces):
            text = prefix.take("".join(pieces[stream.taken :]))
            stream.taken = len(pieces)
            if prefix.broken and prefix.sent:
                raise ToolInputNotJSON(_NOT_JSON % pending.name)
            if text:
                events.append(_input_delta(self._blocks - 1, text))
        return prefix.whole

    def _end_call(self, events: list[JSONDict]) -> None:
        """Close the call being sent as a whole object: one the backend cut (its token
        limit) where it stopped; one left unfinished otherwise is no call to run."""
        stream = self._calls
        prefix = stream.input
        assert prefix is not None
        if prefix.sent and not prefix.whole and self.finish_reason != "length":
            raise ToolInputNotJSON(_NOT_JSON % self._tool_calls[stream.slot].name)
        if closing := prefix.closing():
            events.append(_input_delta(self._blocks - 1, closing))
        stream.slot += 1
        stream.input = None


_NOT_JSON = (
    "the backend's tool call %r broke off, or stopped being JSON, partway through its arguments"
)


# =============================================================================================
# Errors
# =============================================================================================

# How backends say a request does not fit the model's context: OpenAI ("...maximum context
# length is 8192 tokens. However, your messages resulted in 9500 tokens..."), vLLM ("...is
# 32768 tokens and your request has 1500 input tokens (32000 > 32768 - 1500)", or before
# 0.10 "However, you requested 33500 tokens (1500 in the messages, 32000 in the
# completion)"), llama.cpp's server (type exceed_context_size_error, n_prompt_tokens, n_ctx)
_CONTEXT_LIMIT = re.compile(r"maximum context length is (\d+) tokens", re.IGNORECASE)
_REQUESTED = re.compile(
    r"requested \d+ tokens \((\d+) in the messages, (\d+) in the completion\)", re.IGNORECASE
)
_INPUT = re.compile(
    r"(?:request has|messages resulted in|prompt has) (\d+) (?:input )?tokens", re.IGNORECASE
)
_MAX_TOKENS = re.compile(r"max_(?:completion_)?tokens'? is too large: (\d+)", re.IGNORECASE)
_OVERFLOW_WORDS = (
    "maximum context length",
    "context_length_exceeded",
    "exceeds the available context size",
    "prompt is too long",
)
_LLAMA_CPP_OVERFLOW = "exceed_context_size_error"


def context_overflow(message: str, body: bytes) -> str | None:
    """A backend's refusal of a request too long for the model, in the words of
    Anthropic's API, which Claude Code reads: ``prompt is too long: N tokens > M
    maximum`` starts its compaction (the numbers say by how much), and ``input length and
    `max_tokens` exceed context limit: I + O > M`` has it ask again with a ``max_tokens``
    that fits (it asks 32,000 by default, more than many local models' whole context).
    The backend's own message follows in parentheses. None for any other error."""
    counts = _llama_cpp_counts(body)
    if counts is not None:
        return _too_long(counts[0], counts[1], message)
    lowered = message.lower()
    if not any(words in lowered for words in _OVERFLOW_WORDS):
        return None
    limit = _CONTEXT_LIMIT.search(message)
    if limit is None:
        return f"prompt is too long ({message})"
    context = int(limit[1])
    completion: int | None
    if requested := _REQUESTED.search(message):
        prompt, completion = int(requested[1]), int(requested[2])
    elif found := _INPUT.search(message):
        prompt = int(found[1])
        wanted = _MAX_TOKENS.search(message)
        completion = int(wanted[1]) if wanted else None
    else:
        return f"prompt is too long ({message})"
    if completion is None or prompt >= context:
        return _too_long(prompt, context, message)
    return (
        f"input length and `max_tokens` exceed context limit: {prompt} + {completion} > "
        f"{context}, decrease input length or `max_tokens` and try again ({message})"
    )


def _too_long(prompt: int, context: int, message: str) -> str:
    return f"prompt is too long: {prompt} tokens > {context} maximum ({message})"


def _llama_cpp_counts(body: bytes) -> tuple[int, int] | None:
    """llama.cpp's server's prompt and context sizes, from its error's own fields."""
    if _LLAMA_CPP_OVERFLOW.encode() not in body:
        return None
    try:
        error = loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict) or error.get("type") != _LLAMA_CPP_OVERFLOW:
        return None
    prompt, context = error.get("n_prompt_tokens"), error.get("n_ctx")
    if type(prompt) is not int or type(context) is not int:
        return None
    return prompt, context
