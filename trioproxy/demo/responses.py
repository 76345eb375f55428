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
from dataclasses import dataclass
from typing import Any

from . import script
from .script import BadRequest

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


def response_object(
    rid: str, model: str, tokens: tuple[str, ...], finish: str, input_tokens: int
) -> dict[str, Any]:
    """A complete Responses API ``response`` object holding the whole reply."""
    text = "".join(tokens)
    message = {
        "id": "msg_" + rid.removeprefix("resp_"),
        "type": "message",
        "status": "completed" if finish == "stop" else "incomplete",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if finish == "stop" else "incomplete",
        "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
        "model": model,
        "output": [message],
        "error": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": _usage(input_tokens, len(tokens)),
    }


def queued(response: dict[str, Any]) -> dict[str, Any]:
    """What creating a ``background`` response answers: it is queued, nothing generated yet."""
    return {**response, "status": "queued", "output": [], "usage": None, "background": True}


def stream_events(response: dict[str, Any], tokens: tuple[str, ...]) -> list[str]:
    """The Responses API's typed SSE events for a text reply, as OpenAI sends them; event
    ``n`` has ``sequence_number`` n. The first four open the reply, one delta per token
    follows, and the last four close it."""
    seq = itertools.count()
    message = response["output"][0]
    item_id = message["id"]

    def event(kind: str, **fields: Any) -> str:
        data = _dumps({"type": kind, "sequence_number": next(seq), **fields})
        return f"event: {kind}\ndata: {data}\n\n"

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    empty_item = {**message, "status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events = [
        event("response.created", response=started),
        event("response.in_progress", response=started),
        event("response.output_item.added", output_index=0, item=empty_item),
        event("response.content_part.added", part=part, **at),
    ]
    events += [event("response.output_text.delta", delta=t, logprobs=[], **at) for t in tokens]
    text = message["content"][0]["text"]
    done = "response.completed" if response["status"] == "completed" else "response.incomplete"
    events += [
        event("response.output_text.done", text=text, logprobs=[], **at),
        event("response.content_part.done", part={**part, "text": text}, **at),
        event("response.output_item.done", output_index=0, item=message),
        event(done, response=response),
    ]
    return events


OPENING_EVENTS = CLOSING_EVENTS = 4  # around the deltas in ``stream_events``


def input_items(value: Any, rid: str) -> list[dict[str, Any]]:
    """A request's ``input`` as the items ``GET /responses/{id}/input_items`` lists."""
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    if not isinstance(messages, list):
        raise BadRequest("input must be a string or an array of messages", param="input")
    items = []
    for n, message in enumerate(m for m in messages if isinstance(m, dict)):
        item_id = f"msg_{rid.removeprefix('resp_')}_in{n}"
        text = script.content_text(message.get("content"))
        role = message.get("role")
        if role == "assistant":
            content = [{"type": "output_text", "text": text, "annotations": []}]
        else:
            role = role if role in _INPUT_ROLES else "user"
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
    words = sum(script.count_words(item["content"][0]["text"]) for item in items)
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


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


@dataclass(slots=True)
class Stored:
    response: dict[str, Any]
    tokens: tuple[str, ...]
    items: list[dict[str, Any]]
    background: bool


class ResponseStore:
    """The responses created with ``store``, by id; at most ``limit``, oldest dropped first."""

    def __init__(self, limit: int = MAX_STORED) -> None:
        self._limit = limit
        self._stored: OrderedDict[str, Stored] = OrderedDict()

    def add(self, response: dict[str, Any], tokens: tuple[str, ...], body: dict[str, Any]) -> None:
        rid = response["id"]
        background = body.get("background") is True
        self._stored[rid] = Stored(response, tokens, input_items(body["input"], rid), background)
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
