"""The demo backend's Responses API: response objects, their typed stream events, and the
store behind the routes by id (retrieve, resume a stream, delete, cancel, input items),
with input-token counting and compaction. Pure data; the ASGI side is in ``app``.

Every response created with ``store`` (OpenAI's default) is kept, the oldest dropped first
past ``MAX_STORED``: a test backend that runs for hours must not grow without limit.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import script
from .script import BadRequest, ChatPlan

MAX_STORED = 256
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_INPUT_ROLES = frozenset({"user", "system", "developer"})


def input_texts(value: Any) -> list[str]:
    """The texts of a Responses API ``input``: a string, or messages whose content is a
    string or a list of ``input_text`` parts."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value:
        texts = [
            script.content_text(item.get("content")) for item in value if isinstance(item, dict)
        ]
        if texts:
            return texts
    raise BadRequest("input must be a non-empty string or array of messages", param="input")


def count_input_tokens(body: dict[str, Any]) -> int:
    """The demo's token count of a request's ``instructions`` and ``input`` (words)."""
    texts = input_texts(body.get("input"))
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        texts.append(instructions)
    return sum(script.count_words(text) for text in texts)


def plan(body: dict[str, Any], directives: script.Directives, default_tokens: int) -> ChatPlan:
    """The reply to a Responses request, decided as a chat request's (``script.plan_chat``):
    its function ``tools`` and ``tool_choice``, its ``text.format`` (JSON), its
    ``max_output_tokens`` and its last input item (a ``function_call_output`` as a tool
    message: the demo answers with what the tool returned)."""
    limit = script.token_limit(body, "max_output_tokens")
    chat: dict[str, Any] = {
        "model": body.get("model"),
        "chat_template_kwargs": body.get("chat_template_kwargs"),
        "tools": _chat_tools(body.get("tools")),
        "tool_choice": _chat_tool_choice(body.get("tool_choice")),
        "response_format": _response_format(body.get("text")),
        "max_completion_tokens": limit,
    }
    return script.plan_chat(chat, [_last_message(body.get("input"))], directives, default_tokens)


def _chat_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        return []
    return [
        {"type": "function", "function": tool}
        for tool in tools
        if isinstance(tool, dict) and tool.get("type") == "function"
    ]


def _chat_tool_choice(choice: Any) -> Any:
    """``{"type": "function", "name": N}`` as chat's; the strings as they are; any other
    object (``allowed_tools``, a hosted tool) leaves the choice to the demo."""
    if isinstance(choice, dict):
        name = choice.get("name")
        return {"type": "function", "function": {"name": name}} if name else "auto"
    return choice


def _response_format(text: Any) -> dict[str, Any] | None:
    form = text.get("format") if isinstance(text, dict) else None
    if not isinstance(form, dict):
        return None
    if form.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"schema": form.get("schema")}}
    return form  # json_object, or text (no JSON)


def _last_message(value: Any) -> dict[str, Any]:
    if not isinstance(value, list):
        return {"role": "user", "content": value}
    last = value[-1] if value and isinstance(value[-1], dict) else {}
    if last.get("type") == "function_call_output":
        output = last.get("output")
        text = output if isinstance(output, str) else script.content_text(output)
        return {"role": "tool", "content": text}
    return {"role": last.get("role", "user"), "content": last.get("content")}


def response_object(rid: str, model: str, reply: ChatPlan, input_tokens: int) -> dict[str, Any]:
    """A complete Responses API ``response`` object holding the whole reply: a reasoning
    item first when the model reasons, then a function call or a message."""
    finish = reply.finish_reason
    status = "incomplete" if finish == "length" else "completed"
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "incomplete_details": None if finish != "length" else {"reason": "max_output_tokens"},
        "model": model,
        "output": _output_items(rid.removeprefix("resp_"), reply, status),
        "error": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": _usage(input_tokens, _output_tokens(reply), len(reply.reasoning)),
    }


def _output_items(suffix: str, reply: ChatPlan, status: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if reply.reasoning:
        text = "".join(reply.reasoning)
        items.append(
            {
                "id": "rs_" + suffix,
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": text}],
                "status": "completed",
            }
        )
    call = reply.tool_call
    if call is not None:
        items.append(
            {
                "id": "fc_" + suffix,
                "type": "function_call",
                "status": "completed",
                "call_id": "call_" + suffix,
                "name": call.name,
                "arguments": call.arguments,
            }
        )
        return items
    text = "".join(reply.content)
    items.append(
        {
            "id": "msg_" + suffix,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
    )
    return items


def _output_tokens(reply: ChatPlan) -> int:
    if reply.tool_call is not None:
        return len(reply.reasoning) + len(script.split_arguments(reply.tool_call.arguments))
    return len(reply.reasoning) + len(reply.content)


def queued(response: dict[str, Any]) -> dict[str, Any]:
    """What creating a ``background`` response answers: it is queued, nothing generated yet."""
    return {**response, "status": "queued", "output": [], "usage": None, "background": True}


def stream_parts(response: dict[str, Any]) -> list[tuple[str, bool]]:
    """The Responses API's typed SSE events for ``response``, as OpenAI sends them, each
    with whether it is a delta (a token: the demo paces those); event ``n`` has
    ``sequence_number`` n. Every output item is opened, its deltas follow (one per token,
    as the demo tokenizes its text), and it is closed; the closing ``response.completed``
    (or ``.incomplete``) is the last."""
    seq = itertools.count()
    parts: list[tuple[str, bool]] = []

    def event(kind: str, paced: bool = False, **fields: Any) -> None:
        data = _dumps({"type": kind, "sequence_number": next(seq), **fields})
        parts.append((f"event: {kind}\ndata: {data}\n\n", paced))

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    event("response.created", response=started)
    event("response.in_progress", response=started)
    for index, item in enumerate(response["output"]):
        if item["type"] == "function_call":
            _function_call_events(event, index, item)
        else:
            _content_events(event, index, item)
    done = "response.completed" if response["status"] == "completed" else "response.incomplete"
    event(done, response=response)
    return parts


def stream_events(response: dict[str, Any]) -> list[str]:
    """The events of ``stream_parts``, as a replay sends them."""
    return [text for text, _ in stream_parts(response)]


_EventSink = Callable[..., None]


def _function_call_events(event: _EventSink, index: int, item: dict[str, Any]) -> None:
    at = {"item_id": item["id"], "output_index": index}
    event("response.output_item.added", output_index=index,
          item={**item, "arguments": "", "status": "in_progress"})  # fmt: skip
    for fragment in script.split_arguments(item["arguments"]):
        event("response.function_call_arguments.delta", True, delta=fragment, **at)
    event("response.function_call_arguments.done", arguments=item["arguments"],
          name=item["name"], **at)  # fmt: skip
    event("response.output_item.done", output_index=index, item=item)


def _content_events(event: _EventSink, index: int, item: dict[str, Any]) -> None:
    """A message's text, or a reasoning item's text, one delta per token."""
    full = item["content"][0]
    kind = full["type"]  # output_text, or reasoning_text
    part = {**full, "text": ""}
    extra: dict[str, Any] = {"logprobs": []} if kind == "output_text" else {}
    at = {"item_id": item["id"], "output_index": index, "content_index": 0}
    event("response.output_item.added", output_index=index,
          item={**item, "status": "in_progress", "content": []})  # fmt: skip
    event("response.content_part.added", part=part, **at)
    for token in script.tokenize(full["text"]):
        event(f"response.{kind}.delta", True, delta=token, **extra, **at)
    event(f"response.{kind}.done", text=full["text"], **extra, **at)
    event("response.content_part.done", part=full, **at)
    event("response.output_item.done", output_index=index, item=item)


def input_items(value: Any, rid: str) -> list[dict[str, Any]]:
    """A request's ``input`` as the items ``GET /responses/{id}/input_items`` lists."""
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    if not isinstance(messages, list):
        raise BadRequest("input must be a string or an array of messages", param="input")
    items = []
    for n, message in enumerate(m for m in messages if isinstance(m, dict)):
        item_id = f"msg_{rid.removeprefix('resp_')}_in{n}"
        if message.get("type", "message") != "message":
            # function calls, their outputs, reasoning: listed as the items they are
            items.append({"id": item_id, "status": "completed", **message})
            continue
        text = script.content_text(message.get("content"))
        role = message.get("role")
        if role == "assistant":
            content = [{"type": "output_text", "text": text, "annotations": []}]
        else:
            role = role if isinstance(role, str) and role in _INPUT_ROLES else "user"
            content = [{"type": "input_text", "text": text}]
        items.append(
            {
                "id": item_id,
                "type": "message",
                "role": role,
                "content": content,
                "status": "completed",
            }
        )
    return items


def item_page(items: list[dict[str, Any]], query: dict[str, list[str]]) -> dict[str, Any]:
    """One page of input items, as OpenAI lists them (``order`` asc or desc, ``after`` an
    item id, ``limit`` 1-100, default 20)."""
    if query.get("order", ["desc"])[0] == "desc":
        items = items[::-1]
    after = query.get("after", [None])[0]
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    try:
        limit = min(max(int(query.get("limit", ["20"])[0]), 1), 100)
    except ValueError:
        raise BadRequest("limit must be an integer", param="limit") from None
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def compacted(rid: str, body: dict[str, Any], earlier: Stored | None) -> dict[str, Any]:
    """``POST /responses/compact``: one opaque compaction item standing for the
    conversation so far (OpenAI may keep user messages before it; the SDK's types admit
    only output items, so the demo keeps none)."""
    items = list(earlier.items) if earlier is not None else []
    if body.get("input") is not None:
        items += input_items(body["input"], rid)
    words = sum(script.count_words(item["content"][0]["text"]) for item in items if "role" in item)
    compaction = {
        "id": "cmp_" + rid.removeprefix("resp_"),
        "type": "compaction",
        "encrypted_content": f"demo-compaction:{len(items)}-items",
    }
    return {
        "id": rid,
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [compaction],
        "usage": _usage(words, 1),
    }


def _usage(input_tokens: int, output_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


@dataclass(slots=True)
class Stored:
    response: dict[str, Any]
    items: list[dict[str, Any]]
    background: bool


class ResponseStore:
    """The responses created with ``store``, by id; at most ``limit``, oldest dropped first."""

    def __init__(self, limit: int = MAX_STORED) -> None:
        self._limit = limit
        self._stored: OrderedDict[str, Stored] = OrderedDict()

    def add(self, response: dict[str, Any], body: dict[str, Any]) -> None:
        rid = response["id"]
        background = body.get("background") is True
        self._stored[rid] = Stored(response, input_items(body["input"], rid), background)
        while len(self._stored) > self._limit:
            self._stored.popitem(last=False)

    def get(self, rid: str) -> Stored | None:
        return self._stored.get(rid)

    def delete(self, rid: str) -> bool:
        return self._stored.pop(rid, None) is not None

    def clear(self) -> None:
        self._stored.clear()

    def __len__(self) -> int:
        return len(self._stored)
