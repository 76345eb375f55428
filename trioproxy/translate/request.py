"""Request side: an Ollama client's request as the OpenAI-compatible backend's."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any

from trioproxy.jsonutil import JSONDict, compact_json_text

from .validation import _NUMERIC_OPTIONS, _THINK_LEVELS, _is_number


def think_extra_body(
    think: object, on: Mapping[str, Any], off: Mapping[str, Any]
) -> Mapping[str, Any]:
    """What to add to the backend's request for Ollama's ``think``: ``off`` for ``false``,
    ``on`` for ``true`` or a level, nothing when the client did not say. The operator
    sets them (THINK_OFF_EXTRA_BODY, THINK_ON_EXTRA_BODY): how a backend is told to reason
    or not differs by backend (vLLM and llama.cpp's server take the model's chat template
    switch, OpenAI a reasoning effort, OpenRouter a reasoning object)."""
    if think is False:
        return off
    if think is True or isinstance(think, str):
        return on
    return {}


def with_extra_body(request: JSONDict, extra: Mapping[str, Any]) -> JSONDict:
    """``request`` with what ``extra`` adds to it: the fields it does not have, and where
    both hold an object, that object's fields the same way. What the request holds wins:
    it is the client's own (a think level's ``reasoning_effort`` stays the client's)."""
    out = dict(request)
    for key, value in extra.items():
        mine = out.get(key)
        if key not in out:
            out[key] = _copied(value)
        elif isinstance(mine, dict) and isinstance(value, Mapping):
            out[key] = with_extra_body(mine, value)
    return out


def _copied(value: Any) -> Any:
    """A fresh copy of a settings value: a request must never share the settings' objects
    (a request's own changes would change every later one)."""
    if isinstance(value, Mapping):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copied(item) for item in value]
    return value


# Go's time.ParseDuration, which Ollama reads keep_alive with: "1h30m", "0.5s", "300ms"
# (each number has one way to match: "\d+\.?\d*" split a run of digits every possible way,
# and backtracking over a client's "11111111s…!" took seconds per group)
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION = re.compile(rf"[-+]?(?:{_GO_DURATION_PART.pattern})+")


def keep_alive_unloads(keep_alive: object) -> bool:
    """Whether ``keep_alive`` is zero (Ollama then unloads the model): a number of
    seconds, or a Go duration string in any spelling ("0", "0s", "0m0s", "0.0h")."""
    if _is_number(keep_alive):
        return keep_alive == 0
    if not isinstance(keep_alive, str):
        return False
    text = keep_alive.strip()
    if text in ("0", "+0", "-0"):
        return True
    if not _GO_DURATION.fullmatch(text):
        return False
    return all(float(number) == 0 for number, _ in _GO_DURATION_PART.findall(text))


def _sampling_from_options(options: object) -> JSONDict:
    """Only the fields the client set: forcing defaults would override the backend's/model's."""
    out: JSONDict = {}
    if not isinstance(options, dict):
        return out
    num_predict = options.get("num_predict")
    # -1 (unlimited), -2 (fill context) and 0 all mean "no explicit limit" for an OpenAI backend.
    if _is_number(num_predict) and int(num_predict) > 0:
        out["max_tokens"] = int(num_predict)
    for key in _NUMERIC_OPTIONS:
        value = options.get(key)
        if value is not None:
            out[key] = value
    seed = options.get("seed")
    # -1 is Ollama's default, a random seed; to an OpenAI backend it is a fixed one
    if seed is not None and int(seed) != -1:
        out["seed"] = int(seed)
    stop = options.get("stop")
    if isinstance(stop, str) and stop:
        out["stop"] = stop
    elif isinstance(stop, list) and stop:
        out["stop"] = list(stop)
    return out


def _response_format(fmt: object) -> JSONDict | None:
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        json_schema: JSONDict = {"name": "response", "schema": fmt}
        # strict mode also wants an object at the top (not an array, a string, an anyOf)
        if fmt.get("type") == "object" and "anyOf" not in fmt and _strict_compatible(fmt):
            json_schema["strict"] = True
        return {"type": "json_schema", "json_schema": json_schema}
    return None


# where a JSON schema nests other schemas
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not")


def _strict_compatible(schema: object, depth: int = 0) -> bool:
    """Whether OpenAI's strict mode accepts this schema's objects: each one closed
    (``additionalProperties: false``) and requiring all its properties. Ollama holds
    every answer to its schema; strict mode is how OpenAI does that, but it refuses a
    schema that breaks these rules (a pydantic model's, usually), which is then sent
    without ``strict`` for the backend to follow as best it can."""
    if depth > 64:
        return False
    if isinstance(schema, list):
        return all(_strict_compatible(item, depth + 1) for item in schema)
    if not isinstance(schema, dict):
        return True
    properties = schema.get("properties")
    if schema.get("type") == "object" or isinstance(properties, dict):
        if schema.get("additionalProperties") is not False:
            return False
        names = set(properties) if isinstance(properties, dict) else set()
        required = schema.get("required", [])
        # a name is a string: ``[[]]`` there is no schema strict mode takes (and no set)
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            return False
        if set(required) != names:
            return False
    for key in _SUBSCHEMA_MAPS:
        nested = schema.get(key)
        if isinstance(nested, dict) and not all(
            _strict_compatible(sub, depth + 1) for sub in nested.values()
        ):
            return False
    for key in (*_SUBSCHEMA_LISTS, *_SUBSCHEMA_ONE):
        nested = schema.get(key)
        if isinstance(nested, dict | list) and not _strict_compatible(nested, depth + 1):
            return False
    return True


def _apply_stream_fields(out: JSONDict, body: JSONDict) -> None:
    stream = body.get("stream")
    out["stream"] = True if stream is None else bool(stream)  # Ollama streams by default
    if out["stream"]:
        # Without this, OpenAI-compatible streams carry no token counts at all.
        out["stream_options"] = {"include_usage": True}


def _apply_generation_fields(out: JSONDict, body: JSONDict) -> None:
    _apply_stream_fields(out, body)
    out.update(_sampling_from_options(body.get("options")))
    response_format = _response_format(body.get("format"))
    if response_format is not None:
        out["response_format"] = response_format
    think = body.get("think")
    if isinstance(think, str) and think in _THINK_LEVELS:
        out["reasoning_effort"] = _THINK_LEVELS[think]
    if body.get("logprobs") is True:  # Ollama ignores top_logprobs without it
        out["logprobs"] = True
        top = body.get("top_logprobs")
        if top:  # 0 asks for no alternatives: the same as not asking
            out["top_logprobs"] = top


# Base64 prefixes of the image magic numbers; cheaper and more forgiving than decoding.
_IMAGE_MAGIC_B64 = (
    ("iVBORw0KGgo", "png"),
    ("/9j/", "jpeg"),
    ("R0lGOD", "gif"),
)


def _sniff_image_type(b64: str) -> str:
    for prefix, kind in _IMAGE_MAGIC_B64:
        if b64.startswith(prefix):
            return kind
    if b64.startswith("UklGR"):  # RIFF container: WEBP if bytes 8..12 say so
        try:
            head = base64.b64decode(b64[:16], validate=False)
        except (binascii.Error, ValueError):
            return "jpeg"
        if head[8:12] == b"WEBP":
            return "webp"
    return "jpeg"  # the common case for camera/photo input, and what the reference used


def _has_line_breaks(b64: str) -> bool:
    """Whether a base64 text is wrapped (``base64`` wraps at 76 columns, PEM at 64, others
    wider): Ollama's Go decoder skips line ends anywhere; a data URL must not hold them.
    Four substring scans run at memory speed (~0.75 ms for a 5 MB image), where a per-character
    test would take ~0.3 s."""
    return "\n" in b64 or "\r" in b64 or " " in b64 or "\t" in b64


def image_data_url(image: str) -> str:
    """An Ollama base64 image as a data URL; ``data:`` URLs pass through unchanged."""
    if image.startswith("data:"):
        return image
    b64 = "".join(image.split()) if _has_line_breaks(image) else image
    return f"data:image/{_sniff_image_type(b64)};base64,{b64}"


def _content_with_images(text: str, images: list[str]) -> list[JSONDict]:
    parts: list[JSONDict] = []
    if text:
        parts.append({"type": "text", "text": text})
    for image in images:
        parts.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    return parts


def _openai_tools(tools: list[Any]) -> list[JSONDict]:
    out = []
    for tool in tools:
        if isinstance(tool.get("function"), dict):
            # a function tool, whatever its type says: Ollama has no other kind, and does
            # not read the type (ollama-python sends any string); OpenAI refuses any but
            # "function" (and "custom", a tool of another shape) with a 400
            out.append({**tool, "type": "function"})
        else:  # a bare function definition: wrap it
            out.append({"type": "function", "function": tool})
    return out


def _arguments_json(args: object) -> str:
    if args is None:
        return "{}"
    if isinstance(args, str):
        return args  # already JSON text (lenient: some clients send it that way)
    return compact_json_text(args)


_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _generated_call_id(number: int) -> str:
    """``call`` and at least five base-36 digits (more only beyond 36**5 calls)."""
    digits = ""
    while number or len(digits) < 5:
        number, digit = divmod(number, 36)
        digits = _BASE36[digit] + digits
    return "call" + digits


_NINE_LETTERS_AND_DIGITS = re.compile(r"[A-Za-z0-9]{9}")
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def nine_character_id(call_id: str) -> str:
    """A tool call id as nine letters and digits, the one shape Mistral's models take: the
    id itself when it is one, else nine base-62 digits of its SHA-256, so a call and the
    result that names it still pair, and the same history gives the same request."""
    if _NINE_LETTERS_AND_DIGITS.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode("utf-8", "replace")).digest()[:8])
    digits = []
    for _ in range(9):
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(digits)


def with_nine_character_ids(payload: JSONDict) -> None:
    """A chat request's tool call ids (its assistant messages' calls and its results'
    ``tool_call_id``) as :func:`nine_character_id` writes them, in messages copied where
    one changes: a client's own ids (UUIDs from LiteLLM's or ai-sdk-ollama's Ollama
    providers) are kept as sent unless a backend refuses them."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        payload["messages"] = [_with_nine_character_ids(m) for m in messages]


def with_one_system_message(payload: JSONDict) -> None:
    """A chat request's system messages as one, first: their texts in order, a blank line
    between. For chat templates that take one system message, at the beginning (Qwen3.5's
    on: "System message must be at the beginning", as vLLM, llama.cpp's server and Ollama
    render them), or user and assistant turns alternating after it (Gemma 3's, Mistral's),
    which refuse the system messages Claude Code sends after its prompt. A request with
    none, or with one first, is left as it is."""
    systems = _systems_to_join(payload)
    if not systems:
        return
    messages = payload["messages"]
    text = "\n\n".join(t for m in systems if (t := _system_text(m.get("content"))))
    rest = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    payload["messages"] = [{"role": "system", "content": text}, *rest]


def has_system_messages_to_join(payload: JSONDict) -> bool:
    """Whether :func:`with_one_system_message` would change ``payload``: a system message
    that is not first, or more than one."""
    return bool(_systems_to_join(payload))


def _systems_to_join(payload: JSONDict) -> list[JSONDict]:
    """A chat request's system messages, unless there are none or one, first."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return []
    systems = [m for m in messages if isinstance(m, dict) and m.get("role") == "system"]
    if len(systems) == 1 and messages[0] is systems[0]:
        return []
    return systems


def _system_text(content: object) -> str:
    """A system message's text: its string, or its text parts' joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "\n\n".join(t for t in parts if isinstance(t, str) and t)
    return ""


def _with_nine_character_ids(message: object) -> object:
    if not isinstance(message, dict):
        return message
    out = message
    answered = message.get("tool_call_id")
    if isinstance(answered, str) and (short := nine_character_id(answered)) != answered:
        out = {**message, "tool_call_id": short}
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        renamed = [_call_with_nine_character_id(call) for call in calls]
        if any(new is not old for new, old in zip(renamed, calls, strict=True)):
            out = {**out, "tool_calls": renamed}
    return out


def _call_with_nine_character_id(call: object) -> object:
    if isinstance(call, dict) and isinstance(call_id := call.get("id"), str):
        if (short := nine_character_id(call_id)) != call_id:
            return {**call, "id": short}
    return call


class _ToolCallIds:
    """Ids for history tool calls, and which ``tool`` message answers which call.

    Generated ids are ``call`` and the call's number in conversation order as five base-36
    digits (``call00000``), so the same history always translates to the same request
    (backend prompt caches depend on byte-identical input). Nine letters and digits is the
    one id shape every backend accepts: Mistral's models (its API, vLLM serving them)
    refuse any other ("must be a-z, A-Z, 0-9, with a length of 9"), and ollama-python
    cannot echo the backend's own ids back (its ToolCall has no id).
    """

    def __init__(self) -> None:
        self._counter = 0
        # calls not yet answered by a tool message, by their number, in call order; and
        # their numbers by id and by name, oldest first (numbers of calls answered since
        # are skipped when met): each lookup is O(1), where a scan of the open calls per
        # tool message made a history of many calls quadratic (20,000 took 20 s)
        self._unanswered: OrderedDict[int, str] = OrderedDict()  # O(1) oldest, unlike dict
        self._by_id: dict[str, deque[int]] = {}
        self._by_name: dict[str, deque[int]] = {}
        self._last_by_name: dict[str, str] = {}
        self._last_id: str | None = None

    def register(self, call: JSONDict) -> str:
        number = self._counter
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = _generated_call_id(number)
        self._counter += 1
        name = call.get("function", {}).get("name", "")
        self._unanswered[number] = call_id
        self._by_id.setdefault(call_id, deque()).append(number)
        self._by_name.setdefault(name, deque()).append(number)
        self._last_by_name[name] = call_id
        self._last_id = call_id
        return call_id

    def answer(self, msg: JSONDict) -> str | None:
        own = msg.get("tool_call_id")
        if isinstance(own, str) and own:
            if own in self._by_id:
                self._take_oldest(self._by_id[own])
                return own
            # an id no call in the history has: the client kept a backend's id on the
            # result while the call lost it (ollama-python's ToolCall has no id), and a
            # result answering no call is refused by OpenAI-compatible backends
            paired = self._pair_without_id(msg)
            return own if paired is None else paired
        return self._pair_without_id(msg)

    def _pair_without_id(self, msg: JSONDict) -> str | None:
        name = msg.get("tool_name") or msg.get("name")
        if isinstance(name, str) and name:
            found = self._take_oldest(self._by_name.get(name))
            if found is not None:
                return found
            if name in self._last_by_name:
                return self._last_by_name[name]
        # Results without an id or name answer the oldest open call: clients send results in
        # call order, so this pairs parallel calls correctly.
        if self._unanswered:
            return self._unanswered.popitem(last=False)[1]
        return self._last_id

    def _take_oldest(self, numbers: deque[int] | None) -> str | None:
        """The oldest open call among ``numbers``, now answered; None if none is open."""
        while numbers:
            call_id = self._unanswered.pop(numbers.popleft(), None)
            if call_id is not None:
                return call_id
        return None


def _openai_messages(messages: list[JSONDict], ids: _ToolCallIds) -> list[JSONDict]:
    """Ollama's messages as OpenAI's. Ollama takes ``images`` on any message (a tool's
    answer with a screenshot); OpenAI only on a user's (a tool, system or assistant
    message with an image part is a 400 for the whole request). Those images follow in a
    user message of their own: after the message, or after the run of tool answers that
    follows it or that it is part of (an assistant's tool calls must be answered by the
    messages right after it)."""
    out: list[JSONDict] = []
    held: list[str] = []  # images of the run of tool answers so far
    for msg in messages:
        if held and msg["role"] != "tool":
            out.append(_images_message(held))
            held = []
        out.append(_convert_message(msg, ids))
        images = msg.get("images")
        if images and msg["role"] != "user":
            held.extend(images)
            if msg["role"] != "tool" and not _calls_of(msg):
                out.append(_images_message(held))
                held = []
    if held:
        out.append(_images_message(held))
    return out


def _calls_of(msg: JSONDict) -> list[JSONDict] | None:
    """A history message's tool calls: an assistant's only. Ollama takes ``tool_calls`` on
    any message, and its chat templates show an assistant's alone; OpenAI takes them from
    an assistant only (on a system, user or tool message they are a 400 for the whole
    request), so those of another role are dropped, as the model never saw them."""
    return msg.get("tool_calls") if msg["role"] == "assistant" else None


def _images_message(images: list[str]) -> JSONDict:
    return {"role": "user", "content": _content_with_images("", images)}


def _convert_message(msg: JSONDict, ids: _ToolCallIds) -> JSONDict:
    role = msg["role"]
    content = msg.get("content") or ""
    out: JSONDict = {"role": role}
    images = msg.get("images")
    calls = _calls_of(msg)
    if images and role == "user":
        out["content"] = _content_with_images(content, images)
    elif role == "assistant" and calls and not content:
        out["content"] = None  # what OpenAI clients themselves send alongside tool_calls
    else:
        out["content"] = content
    if calls:
        out["tool_calls"] = [
            {
                "id": ids.register(call),
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": _arguments_json(call["function"].get("arguments")),
                },
            }
            for call in calls
        ]
    if role == "tool":
        call_id = ids.answer(msg)
        if call_id is not None:
            out["tool_call_id"] = call_id
    name = msg.get("name")
    if isinstance(name, str) and role != "tool" and _PARTICIPANT_NAME.fullmatch(name):
        out["name"] = name
    # "thinking" is deliberately dropped: OpenAI backends do not accept reasoning in history.
    return out


# a message's participant name as OpenAI takes it: Ollama's messages have no such field
# and Ollama ignores it, so a name OpenAI would refuse ("Jane Doe": a 400 for the whole
# request) is left out rather than forwarded
_PARTICIPANT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def ollama_chat_to_openai(body: JSONDict, backend_model: str) -> JSONDict:
    """An ``/api/chat`` body (validated) as a ``/chat/completions`` request."""
    ids = _ToolCallIds()
    out: JSONDict = {
        "model": backend_model,
        "messages": _openai_messages(body.get("messages") or [], ids),
    }
    _apply_generation_fields(out, body)
    tools = body.get("tools")
    if tools:
        out["tools"] = _openai_tools(tools)
    return out


def ollama_generate_to_openai(body: JSONDict, backend_model: str) -> JSONDict:
    """An ``/api/generate`` body (validated) as a ``/chat/completions`` request.

    ``template``, ``context`` and ``keep_alive`` have no chat-completions equivalent and are
    dropped (a non-empty ``suffix`` was refused by the validation). A ``raw: true`` body
    goes to ``/completions`` instead (:func:`ollama_generate_to_completions`).
    """
    messages: list[JSONDict] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": system})
    prompt = body.get("prompt") or ""
    images = body.get("images")
    messages.append(
        {"role": "user", "content": _content_with_images(prompt, images) if images else prompt}
    )
    out: JSONDict = {"model": backend_model, "messages": messages}
    _apply_generation_fields(out, body)
    return out


def ollama_generate_to_completions(body: JSONDict, backend_model: str) -> JSONDict:
    """An ``/api/generate`` body with ``raw: true`` (validated) as a legacy ``/completions``
    request: the prompt exactly as the client wrote it (its own template and special
    tokens), which the backend continues without a chat template of its own.

    As in Ollama's raw mode, ``system``, ``template`` and ``context`` are not used (they
    only fill a template). ``think`` is not sent: ``reasoning_effort`` and the operator's
    think switches are chat fields, and a raw prompt opens or skips the model's reasoning
    itself. ``format`` goes as ``response_format``, which vLLM honours on ``/completions``
    (a backend that does not take it refuses, and says so). ``logprobs`` is the legacy
    API's integer: how many alternatives per token (``top_logprobs``, 0 for none).
    """
    # max_tokens null, not absent: the legacy API's default is 16 tokens (OpenAI's and
    # vLLM's), Ollama's is no limit; vLLM and llama.cpp's server read null as "up to the
    # context"
    out: JSONDict = {"model": backend_model, "prompt": body.get("prompt") or ""}
    _apply_stream_fields(out, body)
    out["max_tokens"] = None
    out.update(_sampling_from_options(body.get("options")))
    response_format = _response_format(body.get("format"))
    if response_format is not None:
        out["response_format"] = response_format
    if body.get("logprobs") is True:
        top = body.get("top_logprobs")
        out["logprobs"] = top if isinstance(top, int) else 0
    return out


def openai_passthrough_request(body: JSONDict, backend_model: str) -> JSONDict:
    """A ``/v1/*`` body with only ``model`` replaced by the backend's name; everything else
    (``max_completion_tokens`` included) is forwarded as the client wrote it."""
    return {**body, "model": backend_model}


def ollama_embed_to_openai(body: JSONDict, backend_model: str) -> JSONDict:
    """An ``/api/embed`` body as ``/embeddings``; always a list input, float encoding."""
    raw = body["input"]
    out: JSONDict = {
        "model": backend_model,
        "input": [raw] if isinstance(raw, str) else list(raw),
        "encoding_format": "float",
    }
    dims = body.get("dimensions")
    if dims is not None and dims > 0:  # Ollama reads 0 or less as not set (omitempty)
        out["dimensions"] = dims
    return out


def ollama_embeddings_input(body: JSONDict) -> str | list[str]:
    """What a legacy ``/api/embeddings`` body asks to embed: ``prompt``, else ``input``."""
    if body.get("prompt") is not None:
        prompt: str = body["prompt"]  # validate_ollama_embeddings: a string
        return prompt
    given = body.get("input")
    return "" if given is None else given


def ollama_embeddings_to_openai(body: JSONDict, backend_model: str) -> JSONDict:
    """A legacy ``/api/embeddings`` body as ``/embeddings``."""
    raw = ollama_embeddings_input(body)
    return {
        "model": backend_model,
        "input": [raw] if isinstance(raw, str) else list(raw),
        "encoding_format": "float",
    }
