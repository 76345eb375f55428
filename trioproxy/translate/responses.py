"""A whole Responses API answer as the event stream that API would have sent for it.

A backend that ignores ``stream`` answers ``POST /v1/responses`` with one Response object
(gateways that bridge the Responses API onto providers without streaming, older vLLM and
LiteLLM, mocks). Its client asked for events (the openai SDK's ``responses.stream()``,
openai-agents, the Vercel AI SDK): it gets the events OpenAI sends, in OpenAI's order,
each piece of output whole in one delta. ``sequence_number`` counts from 0.

An output item without an ``id`` (a gateway that writes none, or writes it empty) gets
one derived from the response's id and its place (``msg_``, ``fc_``, ``rs_``... and 48 hex
digits, the API's shape): the openai SDK's stream accumulator tells items apart by type
and id, and raised on a second message or reasoning item without one ("conflicting output
identities").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from trioproxy.jsonutil import JSONDict
from trioproxy.sse import encode_sse_event

# the closing event for each finished status; the event carries the whole response.
# The API has no closing event for a cancelled response (a background one, cancelled by
# id): its stream ends as the stream of a response cut short does, with
# ``response.incomplete``, whose response says ``cancelled``. Every client then sees the
# stream end (openai-agents and the openai SDK's ``responses.stream()`` report it as
# not completed, the Vercel AI SDK finishes it), where without a closing event it was
# reported cut (an error) though nothing will follow; ``response.failed`` would make
# the client's own cancellation the backend's failure (a 502 when there is no output)
_CLOSING = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "cancelled": "response.incomplete",
    "failed": "response.failed",
}
# what a finished response holds that the opening events' snapshot does not have yet
_NOT_YET = ("usage", "error", "incomplete_details", "completed_at")


def is_response(whole: object) -> bool:
    """Whether a backend's JSON answer is a Responses API Response object."""
    return isinstance(whole, dict) and whole.get("object") == "response"


def response_as_events(response: JSONDict) -> bytes:
    """:func:`response_events`, encoded as the API sends them (``event:`` and ``data:``)."""
    return b"".join(encode_sse_event(event["type"], event) for event in response_events(response))


def response_events(response: JSONDict) -> list[JSONDict]:
    """The events of a stream that produced ``response``: ``response.created`` and
    ``response.in_progress`` (its snapshot with no output), each output item's events, then
    the closing event its ``status`` calls for (a response without one is taken as
    completed; a cancelled one closes as an incomplete one does: see ``_CLOSING``). A
    response still queued or in progress (a background one) has only its opening events:
    its stream is not over, and the relay reports it cut (the client may resume it by
    id)."""
    events = _Events()
    response = _with_item_ids(response)
    status = response.get("status") or "completed"
    closing = _CLOSING.get(status) if isinstance(status, str) else None
    opening = {**response, "status": "in_progress" if closing else status, "output": []}
    for key in _NOT_YET:
        if key in opening:
            opening[key] = None
    events.add("response.created", response=opening)
    waiting = "response.queued" if status == "queued" else "response.in_progress"
    events.add(waiting, response=opening)
    if closing is None:
        return events.out
    output = response.get("output")
    for index, item in enumerate(output if isinstance(output, list) else []):
        _item_events(events, index, item)
    events.add(closing, response=response)
    return events.out


# the prefix of an output item's id by its type, as the API spells them
_ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "reasoning": "rs",
    "custom_tool_call": "ctc",
    "web_search_call": "ws",
    "file_search_call": "fs",
    "computer_call": "cu",
    "image_generation_call": "ig",
    "code_interpreter_call": "ci",
    "mcp_call": "mcp",
}


def _with_item_ids(response: JSONDict) -> JSONDict:
    """``response`` with an id for each output item that has none (a new object then; the
    one given is not changed): the same ids for the same response id and places."""
    output = response.get("output")
    if not isinstance(output, list) or not any(map(_lacks_id, output)):
        return response
    response_id = response.get("id")
    seed = response_id if isinstance(response_id, str) else ""
    items = [
        {**item, "id": _item_id_for(seed, index, item.get("type"))} if _lacks_id(item) else item
        for index, item in enumerate(output)
    ]
    return {**response, "output": items}


def _lacks_id(item: object) -> bool:
    """An item with no id, or an empty one (which would match another's as none does)."""
    if not isinstance(item, dict):
        return False
    item_id = item.get("id")
    return not (isinstance(item_id, str) and item_id)


def _item_id_for(response_id: str, index: int, kind: object) -> str:
    prefix = _ID_PREFIXES.get(kind, "item") if isinstance(kind, str) else "item"
    digest = hashlib.sha256(f"{response_id}\x00{index}".encode(errors="surrogatepass"))
    return f"{prefix}_{digest.hexdigest()[:48]}"


class _Events:
    """The events so far, numbered as they are added."""

    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out: list[JSONDict] = []

    def add(self, kind: str, **fields: Any) -> None:
        # "type" first, as OpenAI writes it (the stream observer reads a text delta by it)
        self.out.append({"type": kind, "sequence_number": len(self.out), **fields})


def _item_events(events: _Events, index: int, item: object) -> None:
    """One output item's events: added (empty, in progress, for the kinds whose content
    streams), its content's events, done with the item as it is."""
    kind = item.get("type") if isinstance(item, dict) else None
    streamed = _STREAMED.get(kind) if isinstance(kind, str) else None
    if streamed is None or not isinstance(item, dict):  # a hosted tool's call, say: as given
        events.add("response.output_item.added", output_index=index, item=item)
    else:
        empty, write = streamed
        opened = {**item, **empty}
        if kind == "message" or "status" in item:
            opened["status"] = "in_progress"
        if kind == "reasoning" and "content" in item:
            opened["content"] = []  # its reasoning text, as its summary, still to come
        events.add("response.output_item.added", output_index=index, item=opened)
        write(_Item(events, index, _item_id(item)), item)
    events.add("response.output_item.done", output_index=index, item=item)


def _item_id(item: JSONDict) -> str:
    """What the item's events name it by: its ``id`` (a call without one: its ``call_id``)."""
    for key in ("id", "call_id"):
        if isinstance(value := item.get(key), str):
            return value
    return ""


class _Item:
    """Adds the events of one output item: each names the item and its place."""

    __slots__ = ("events", "item_id", "output_index")

    def __init__(self, events: _Events, output_index: int, item_id: str) -> None:
        self.events = events
        self.output_index = output_index
        self.item_id = item_id

    def add(self, kind: str, **fields: Any) -> None:
        self.events.add(kind, item_id=self.item_id, output_index=self.output_index, **fields)


def _message(item: _Item, message: JSONDict) -> None:
    for content_index, part in enumerate(_list(message.get("content"))):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "output_text":
            _output_text(item, content_index, part)
        elif kind == "refusal":
            _refusal(item, content_index, part)
        else:  # a part of another kind, as given
            item.add("response.content_part.added", content_index=content_index, part=part)
            item.add("response.content_part.done", content_index=content_index, part=part)


def _output_text(item: _Item, content_index: int, part: JSONDict) -> None:
    text = _str(part.get("text"))
    logprobs = _list(part.get("logprobs"))
    at = {"content_index": content_index}
    empty = {**part, "text": "", "annotations": []}
    if "logprobs" in part:
        empty["logprobs"] = []
    item.add("response.content_part.added", **at, part=empty)
    if text:
        item.add("response.output_text.delta", **at, delta=text, logprobs=logprobs)
    for number, annotation in enumerate(_list(part.get("annotations"))):
        item.add(
            "response.output_text.annotation.added",
            **at,
            annotation_index=number,
            annotation=annotation,
        )
    item.add("response.output_text.done", **at, text=text, logprobs=logprobs)
    item.add("response.content_part.done", **at, part=part)


def _refusal(item: _Item, content_index: int, part: JSONDict) -> None:
    refusal = _str(part.get("refusal"))
    at = {"content_index": content_index}
    item.add("response.content_part.added", **at, part={**part, "refusal": ""})
    if refusal:
        item.add("response.refusal.delta", **at, delta=refusal)
    item.add("response.refusal.done", **at, refusal=refusal)
    item.add("response.content_part.done", **at, part=part)


def _function_call(item: _Item, call: JSONDict) -> None:
    arguments = _str(call.get("arguments"))
    if arguments:
        item.add("response.function_call_arguments.delta", delta=arguments)
    # OpenAI's done event names the function (its OpenAPI spec requires it)
    name = _str(call.get("name"))
    item.add("response.function_call_arguments.done", arguments=arguments, name=name)


def _custom_tool_call(item: _Item, call: JSONDict) -> None:
    text = _str(call.get("input"))
    if text:
        item.add("response.custom_tool_call_input.delta", delta=text)
    item.add("response.custom_tool_call_input.done", input=text)


def _reasoning(item: _Item, reasoning: JSONDict) -> None:
    """Its summary's parts, then its reasoning text's (gpt-oss on vLLM writes the latter)."""
    summary = reasoning.get("summary")
    _text_parts(item, summary, "summary_index", "reasoning_summary_part", "reasoning_summary_text")
    _text_parts(item, reasoning.get("content"), "content_index", "content_part", "reasoning_text")


def _text_parts(item: _Item, parts: object, index_key: str, part_kind: str, text_kind: str) -> None:
    """The events of a list of parts that hold ``text``: each part added (empty), its text
    in one delta, the text done, the part done."""
    for index, part in enumerate(_list(parts)):
        text = _str(part.get("text")) if isinstance(part, dict) else ""
        at = {index_key: index}
        empty = {**part, "text": ""} if isinstance(part, dict) else part
        item.add(f"response.{part_kind}.added", **at, part=empty)
        if text:
            item.add(f"response.{text_kind}.delta", **at, delta=text)
        item.add(f"response.{text_kind}.done", **at, text=text)
        item.add(f"response.{part_kind}.done", **at, part=part)


# the item kinds whose content streams: what their added item holds instead, and the
# events of their content
_STREAMED: dict[str, tuple[JSONDict, Callable[[_Item, JSONDict], None]]] = {
    "message": ({"content": []}, _message),
    "function_call": ({"arguments": ""}, _function_call),
    "custom_tool_call": ({"input": ""}, _custom_tool_call),
    "reasoning": ({"summary": []}, _reasoning),
}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""
