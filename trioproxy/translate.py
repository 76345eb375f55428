"""Ollama API <-> OpenAI API translation, sans-I/O.

Everything here is a pure function or a small state machine fed parsed JSON: no sockets, no
trio, no clock reads except the optional default in :func:`utc_timestamp`. The routes call
``validate_*`` on the client body, ``*_to_openai`` to build the backend request, and the
response-side functions (or :class:`OllamaStreamTranslator` for streams) to build what the
client receives.

Rules follow the translation checklist in the API reference notes: send only the sampling
fields the client set, never emit ``null`` content, integer-nanosecond durations, tool-call
arguments as objects for Ollama clients and JSON strings for OpenAI backends.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import math
import re
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring as _encode_str
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

from trioproxy.jsonutil import (
    NestedTooDeeply,
    compact_json,
    compact_json_text,
    escape_line_separators,
    loads,
    whole_number,
)
from trioproxy.ledger import ResponsesLedger
from trioproxy.model_mapping import DeclaredModel, ModelMapper, with_default_tag
from trioproxy.sse import DEFAULT_MAX_LINE_BYTES

if TYPE_CHECKING:  # json's C scanner: there at run time, left out of typeshed

    def scanstring(s: str, end: int, strict: bool = True) -> tuple[str, int]: ...

else:
    from json.decoder import scanstring

__all__ = [
    "OllamaStreamTranslator",
    "OpenAIStreamObserver",
    "RequestValidationError",
    "Timings",
    "image_data_url",
    "is_embedding_model",
    "listed_capabilities",
    "model_family",
    "ollama_chat_to_openai",
    "ollama_embed_to_openai",
    "ollama_embeddings_to_openai",
    "ollama_generate_to_openai",
    "ollama_ps",
    "ollama_show",
    "openai_chat_to_ollama_chat",
    "openai_chat_to_ollama_generate",
    "openai_embeddings_to_ollama_embed",
    "openai_embeddings_to_ollama_embeddings",
    "openai_model_entry",
    "openai_model_list",
    "openai_models_to_ollama_tags",
    "openai_passthrough_request",
    "parse_chunk",
    "parse_tool_arguments",
    "read_chunk",
    "utc_timestamp",
    "validate_ollama_chat",
    "validate_ollama_embed",
    "validate_ollama_embeddings",
    "validate_ollama_generate",
    "validate_openai_body",
]

JSONDict = dict[str, Any]

# =============================================================================================
# Validation
# =============================================================================================


class RequestValidationError(ValueError):
    """A client request body the proxy will not forward; maps to HTTP 400.

    ``field`` is the offending field's path (``"messages[1].role"``) or ``None`` for the body
    as a whole; ``message`` (also ``str(exc)``) is a full sentence naming it, e.g.
    ``"field 'model' is required"``.
    """

    def __init__(self, field: str | None, problem: str, *, sentence: str | None = None) -> None:
        self.field = field
        if sentence is not None:  # Ollama's own words, which clients may match
            self.message = sentence
        else:
            self.message = f"field '{field}' {problem}" if field is not None else problem
        super().__init__(self.message)


def _require_object(body: object) -> JSONDict:
    if not isinstance(body, dict):
        raise RequestValidationError(None, "request body must be a JSON object")
    return body


def _require_model(body: JSONDict) -> None:
    model = body.get("model")
    if model is None or model == "":
        raise RequestValidationError("model", "is required")
    if not isinstance(model, str):
        raise RequestValidationError("model", "must be a string")


def _check_optional(body: JSONDict, key: str, types: type | tuple[type, ...], what: str) -> None:
    value = body.get(key)
    # bool is an int subclass: never let True pass as a number.
    if value is not None and (
        not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types))
    ):
        raise RequestValidationError(key, f"must be {what}")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _check_str_list(value: object, field: str) -> None:
    if not isinstance(value, list):
        raise RequestValidationError(field, "must be a list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise RequestValidationError(f"{field}[{i}]", "must be a string")


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite_number(value: object) -> TypeGuard[int | float]:
    """A number a float holds, as Ollama's Go decoder reads one (an integer of 309
    digits is none: ``math.isfinite`` raised OverflowError, a 500)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# Options we translate; others (top_k, num_ctx, mirostat, ...) are accepted and ignored.
_NUMERIC_OPTIONS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")


_INT64_LIMIT = 2**63  # Ollama reads num_predict and seed as Go ints


def _check_options(body: JSONDict) -> None:
    options = body.get("options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise RequestValidationError("options", "must be an object")
    for key in _NUMERIC_OPTIONS:
        value = options.get(key)
        # NaN, Infinity and 1e400 (infinite once read) are no numbers to Ollama's Go
        # decoder either; forwarded, they became null: the backend's default, silently
        if value is not None and not _is_finite_number(value):
            raise RequestValidationError(f"options.{key}", "must be a finite number")
    for key in ("num_predict", "seed"):
        value = options.get(key)
        # a fraction is dropped, as Ollama's Go decoder drops it (10.5 -> 10)
        if value is not None and not (_is_finite_number(value) and abs(value) < _INT64_LIMIT):
            raise RequestValidationError(f"options.{key}", "must be a 64-bit integer")
    stop = options.get("stop")
    if stop is not None and not isinstance(stop, str):
        _check_str_list(stop, "options.stop")


def _check_common_generation(body: JSONDict) -> None:
    _check_optional(body, "stream", bool, "a boolean")
    _check_options(body)
    fmt = body.get("format")
    if fmt is not None and not isinstance(fmt, str | dict):
        raise RequestValidationError("format", 'must be "json" or a JSON schema object')
    if isinstance(fmt, str) and fmt not in ("", "json"):
        raise RequestValidationError("format", 'must be "json" or a JSON schema object')
    think = body.get("think")
    # only a string names a level (str() of a list 1,000 levels deep: a RecursionError)
    if (
        think is not None
        and not isinstance(think, bool)
        and not (isinstance(think, str) and think in _THINK_LEVELS)
    ):
        raise RequestValidationError(
            "think", 'must be a boolean or "low", "medium", "high" or "max"'
        )
    images = body.get("images")
    if images is not None:
        _check_str_list(images, "images")
    _check_logprobs(body)


# Ollama's bound on top_logprobs (and OpenAI's), checked whether logprobs is asked or not
MAX_TOP_LOGPROBS = 20


def _check_logprobs(body: JSONDict) -> None:
    _check_optional(body, "logprobs", bool, "a boolean")
    top = body.get("top_logprobs")
    if top is None:
        return
    if not isinstance(top, int) or isinstance(top, bool):  # a Go int: 2.5 and "2" are refused
        raise RequestValidationError("top_logprobs", "must be an integer")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestValidationError(
            "top_logprobs", "", sentence=f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"
        )


def _check_tools(tools: object) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise RequestValidationError("tools", "must be a list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise RequestValidationError(f"tools[{i}]", "must be an object")
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestValidationError(f"tools[{i}].function.name", "must be a string")


def _check_message(msg: object, i: int) -> None:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise RequestValidationError(where, "must be an object")
    if not isinstance(msg.get("role"), str) or not msg["role"]:
        raise RequestValidationError(f"{where}.role", "must be a non-empty string")
    # Missing/null content is accepted for every role: Ollama itself treats it as "".
    if msg.get("content") is not None and not isinstance(msg["content"], str):
        raise RequestValidationError(f"{where}.content", "must be a string")
    images = msg.get("images")
    if images is not None:
        _check_str_list(images, f"{where}.images")
    for key in ("tool_name", "tool_call_id"):
        if msg.get(key) is not None and not isinstance(msg[key], str):
            raise RequestValidationError(f"{where}.{key}", "must be a string")
    calls = msg.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise RequestValidationError(f"{where}.tool_calls", "must be a list")
    for j, call in enumerate(calls):
        cwhere = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RequestValidationError(f"{cwhere}.function", "must be an object")
        if not isinstance(function.get("name"), str):
            raise RequestValidationError(f"{cwhere}.function.name", "must be a string")
        args = function.get("arguments")
        if args is not None and not isinstance(args, dict | str):
            raise RequestValidationError(f"{cwhere}.function.arguments", "must be an object")


def validate_ollama_chat(body: object) -> JSONDict:
    """Check an ``/api/chat`` body; return it with its roles in lower case, as Ollama reads
    them ("User" is "user"). Missing ``messages`` is allowed (Ollama treats it as a
    model-load request) and translates to an empty list."""
    body = _require_object(body)
    _require_model(body)
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            raise RequestValidationError("messages", "must be a list")
        for i, msg in enumerate(messages):
            _check_message(msg, i)
            if not msg["role"].islower():
                msg["role"] = msg["role"].lower()
    _check_common_generation(body)
    _check_tools(body.get("tools"))
    return body


def validate_ollama_generate(body: object) -> JSONDict:
    """Check an ``/api/generate`` body; return it unchanged (missing prompt means "")."""
    body = _require_object(body)
    _require_model(body)
    for key in ("prompt", "system", "suffix"):
        _check_optional(body, key, str, "a string")
    _check_optional(body, "raw", bool, "a boolean")
    if body.get("raw") is True and body.get("images"):
        # a raw prompt goes to /completions, which no backend takes images on; dropped,
        # the model would answer about images it never saw
        raise RequestValidationError(
            "images",
            "",
            sentence="images cannot be sent with raw: true: a raw prompt goes to the "
            "backend's /completions endpoint, which takes text only",
        )
    if body.get("suffix"):
        # fill-in-the-middle has no chat-completions equivalent: dropping the suffix would
        # answer a code-completion tool with text that ignores it. Ollama refuses a model
        # without the insert capability this way, and /api/show lists no "insert"
        raise RequestValidationError(
            "suffix", "", sentence=f"{_encode_str(body['model'])} does not support insert"
        )
    _check_common_generation(body)
    return body


def validate_ollama_embed(body: object) -> JSONDict:
    """Check an ``/api/embed`` body: ``input`` is a string or a list of strings, or absent
    (nothing to embed, as an empty one)."""
    body = _require_object(body)
    _require_model(body)
    if body.get("input") is not None and not isinstance(body["input"], str):
        _check_str_list(body["input"], "input")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
        raise RequestValidationError("dimensions", "must be an integer")
    _check_optional(body, "truncate", bool, "a boolean")
    _check_options(body)
    return body


def validate_ollama_embeddings(body: object) -> JSONDict:
    """Check a legacy ``/api/embeddings`` body: ``prompt`` string (``input`` also accepted,
    as a string or a list of strings). Neither is an empty prompt, as to Ollama: the
    official clients leave ``prompt`` out when it is None."""
    body = _require_object(body)
    _require_model(body)
    if body.get("prompt") is not None:
        _check_optional(body, "prompt", str, "a string")
    elif body.get("input") is not None:
        if not isinstance(body["input"], str):
            _check_str_list(body["input"], "input")
    _check_options(body)
    return body


def validate_openai_body(body: object, *, require_model: bool = True) -> JSONDict:
    """Minimal checks on a ``/v1/*`` body before pass-through; the backend validates the rest."""
    body = _require_object(body)
    if require_model or "model" in body:
        _require_model(body)
    _check_optional(body, "stream", bool, "a boolean")
    return body


# =============================================================================================
# Request side: Ollama client -> OpenAI backend
# =============================================================================================

# Ollama's think levels as OpenAI's reasoning_effort. "max" is "high": the highest effort
# every reasoning backend accepts (OpenAI's "xhigh" exists on a few models only, and an
# unknown effort is a 400 from the backend). Booleans carry no effort and are not sent.
_THINK_LEVELS = {"low": "low", "medium": "medium", "high": "high", "max": "high"}


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


# =============================================================================================
# Response side: OpenAI backend -> Ollama client
# =============================================================================================


def utc_timestamp(now_ns: int | None = None) -> str:
    """RFC 3339 UTC with nanoseconds, e.g. ``2024-05-01T12:00:00.123456789Z``.

    Takes wall-clock ns since the epoch (``time.time_ns()`` by default): built from a real UTC
    clock, never by appending ``Z`` to local time.
    """
    if now_ns is None:
        now_ns = time.time_ns()
    seconds, frac = divmod(now_ns, 1_000_000_000)
    return f"{_utc_second(seconds)}.{frac:09d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(seconds: int) -> str:
    # a stream stamps every line; the date part changes once a second
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _rfc3339_seconds(unix_seconds: object) -> str:
    """``created`` (Unix seconds) as RFC 3339; the epoch when absent or unusable."""
    if not _is_number(unix_seconds):
        unix_seconds = 0
    try:
        dt = datetime.fromtimestamp(int(unix_seconds), UTC)
    except (OverflowError, OSError, ValueError):
        dt = datetime.fromtimestamp(0, UTC)
    # isoformat writes every year in four digits, as RFC 3339 has it: strftime's "%Y" wrote
    # the year 999 as "999", which ollama-python refuses, and with it the whole model list
    return dt.isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class Timings:
    """Measured durations of one backend call, integer nanoseconds."""

    total_ns: int
    prompt_eval_ns: int
    eval_ns: int


def _done_reason(finish_reason: object) -> str:
    # Ollama's own are stop/length, and a finished tool call is a normal stop there; an
    # answer cut by the backend's content filter says so (clients read done_reason as any
    # string), or a cut answer would read as a finished one
    if finish_reason in ("stop", "length", "content_filter"):
        return finish_reason
    return "stop"


def _int(value: object) -> int:
    return whole_number(value) or 0


def _usage_counts(resp: JSONDict) -> tuple[int, int]:
    usage = resp.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))


def _text(content: object) -> str:
    """Message content as a string: null -> "", content-part lists joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            _text_of(p) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _refusal(obj: JSONDict) -> str:
    """A model's refusal (OpenAI's structured outputs answer with it instead of content):
    Ollama has no field for it, and it is the model's answer, so it is shown as content."""
    value = obj.get("refusal")
    return value if isinstance(value, str) else ""


# what a stream or completion that ended with finish_reason "error" and no error member says
FINISHED_WITH_ERROR = 'the backend ended the answer with finish_reason "error"'


def _thinking(obj: JSONDict) -> str:
    # vLLM/DeepSeek say reasoning_content; Ollama's own OpenAI layer says reasoning;
    # Mistral's reasoning models (Magistral) send it as content parts of type "thinking"
    value = obj.get("reasoning_content") or obj.get("reasoning")
    thinking = value if isinstance(value, str) else ""
    content = obj.get("content")
    if type(content) is list:
        thinking += "".join(_thinking_part(p) for p in content if isinstance(p, dict))
    return thinking


def _thinking_part(part: JSONDict) -> str:
    """A ``{"type": "thinking", "thinking": [{"type": "text", "text": ...}]}`` content part's
    text (Mistral's; its ``thinking`` a string too, to be lenient)."""
    if part.get("type") != "thinking":
        return ""
    inner = part.get("thinking")
    if isinstance(inner, str):
        return inner
    if isinstance(inner, list):
        return "".join(_text_of(p) for p in inner)
    return ""


def _text_of(part: object) -> str:
    text = part.get("text") if isinstance(part, dict) else None
    return text if isinstance(text, str) else ""


def parse_tool_arguments(args: object) -> JSONDict:
    """OpenAI's JSON-string arguments as the object Ollama clients require.

    Text that is not a JSON object becomes ``{}``: Ollama clients reject a string outright
    (pydantic ``dict_type``), and a truncated call is better surfaced as empty arguments than as
    a stream-breaking error.
    """
    if isinstance(args, dict):
        return args
    if isinstance(args, str) and args.strip():
        try:
            parsed = loads(args)
        except ValueError:
            return {}
        if isinstance(parsed, dict):
            return parsed
    return {}


def _ollama_tool_calls(calls: Iterable[JSONDict]) -> list[JSONDict]:
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") or {}
        entry: JSONDict = {
            "function": {
                "index": i,
                "name": function.get("name") or "",
                "arguments": parse_tool_arguments(function.get("arguments")),
            }
        }
        if call.get("id"):
            # Not required by Ollama clients, but lets them echo it back so our request side
            # can pair the tool result with the call.
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _final_fields(resp: JSONDict, finish_reason: object, timings: Timings) -> JSONDict:
    prompt_tokens, completion_tokens = _usage_counts(resp)
    return {
        "done": True,
        "done_reason": _done_reason(finish_reason),
        "total_duration": int(timings.total_ns),
        "load_duration": 0,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": int(timings.prompt_eval_ns),
        "eval_count": completion_tokens,
        "eval_duration": int(timings.eval_ns),
    }


# OpenAI's stand-in for a log probability too small to write (-inf is no JSON number, and
# ollama-python refuses the null a JSON encoder writes for it)
_UNLIKELY_LOGPROB = -9999.0


def _token_logprob(entry: object) -> JSONDict | None:
    """One OpenAI ``{token, logprob, bytes}`` as Ollama's ``TokenLogprob``; None for an
    entry its clients would refuse (no token text, no number)."""
    if not isinstance(entry, dict):
        return None
    token, logprob = entry.get("token"), entry.get("logprob")
    if not isinstance(token, str) or not _is_number(logprob):
        return None
    out: JSONDict = {
        "token": token,
        "logprob": logprob if _is_finite_number(logprob) else _UNLIKELY_LOGPROB,
    }
    raw = entry.get("bytes")
    # Ollama omits empty bytes (omitempty); its Go client reads them as bytes, 0 to 255
    if isinstance(raw, list) and raw and all(type(b) is int and 0 <= b < 256 for b in raw):
        out["bytes"] = raw
    return out


def _ollama_logprob(entry: object) -> JSONDict | None:
    """One ``logprobs.content[]`` entry as Ollama's ``Logprob``: its alternatives under
    ``top_logprobs``, left out when there are none, as Ollama leaves them out."""
    out = _token_logprob(entry)
    if out is None:
        return None
    top = entry.get("top_logprobs")  # type: ignore[attr-defined]  # a dict: _token_logprob
    if isinstance(top, list):
        alternatives = [alt for alt in map(_token_logprob, top) if alt is not None]
        if alternatives:
            out["top_logprobs"] = alternatives
    return out


def choice_logprobs(choice: JSONDict) -> list[JSONDict]:
    """A choice's log probabilities (``choices[i].logprobs``) as Ollama's ``logprobs``:
    the content's tokens, then the refusal's (a refusal is shown as content, after it)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    out: list[JSONDict] = []
    for key in ("content", "refusal"):
        entries = logprobs.get(key)
        if isinstance(entries, list):
            out.extend(entry for entry in map(_ollama_logprob, entries) if entry is not None)
    return out


def _first_choice(resp: JSONDict) -> JSONDict:
    """A completion's first choice; ValueError when it has none (not an empty answer)."""
    choices = resp.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    raise ValueError("a completion without choices")


def openai_chat_to_ollama_chat(
    resp: JSONDict,
    model: str,
    created_at: str,
    timings: Timings,
    *,
    show_thinking: bool = True,
    logprobs: bool = False,
) -> JSONDict:
    """A non-stream ``/chat/completions`` response as an ``/api/chat`` response; its
    reasoning as ``thinking`` unless the client said ``think: false``; its log
    probabilities as ``logprobs`` when the client asked for them."""
    choice = _first_choice(resp)
    msg = choice.get("message") or {}
    content = _text(msg.get("content")) + _refusal(msg)
    message: JSONDict = {"role": "assistant", "content": content}
    thinking = _thinking(msg) if show_thinking else ""
    if thinking:
        message["thinking"] = thinking
    calls = _message_tool_calls(msg)
    if calls:
        message["tool_calls"] = calls
    out: JSONDict = {"model": model, "created_at": created_at, "message": message}
    if logprobs and (entries := choice_logprobs(choice)):
        out["logprobs"] = entries
    out.update(_final_fields(resp, choice.get("finish_reason"), timings))
    return out


def openai_chat_to_ollama_generate(
    resp: JSONDict,
    model: str,
    created_at: str,
    timings: Timings,
    *,
    show_thinking: bool = True,
    logprobs: bool = False,
) -> JSONDict:
    """A non-stream ``/chat/completions`` response as an ``/api/generate`` response; its
    reasoning as ``thinking`` unless the client said ``think: false``; its log
    probabilities as ``logprobs`` when the client asked for them."""
    choice = _first_choice(resp)
    msg = choice.get("message") or {}
    out: JSONDict = {
        "model": model,
        "created_at": created_at,
        "response": _text(msg.get("content")) + _refusal(msg),
    }
    thinking = _thinking(msg) if show_thinking else ""
    if thinking:
        out["thinking"] = thinking
    calls = _message_tool_calls(msg)
    if calls:  # as the streamed /api/generate carries them: at the top level
        out["tool_calls"] = calls
    if logprobs and (entries := choice_logprobs(choice)):
        out["logprobs"] = entries
    out.update(_final_fields(resp, choice.get("finish_reason"), timings))
    # Ollama's done line of a generate (but a raw one) always has ``context``, the
    # conversation's token ids for the client to send back as memory; some clients require
    # it (ollama-ai-provider-v2's completion model refuses a done line without it). The
    # proxy has no tokenizer, and drops a ``context`` sent back: an empty one.
    out["context"] = []
    return out


def openai_completion_to_ollama_generate(
    resp: JSONDict,
    model: str,
    created_at: str,
    timings: Timings,
    top_logprobs: int | None = None,
) -> JSONDict:
    """A non-stream legacy ``/completions`` response (``choices[0].text``) as an
    ``/api/generate`` response; its log probabilities as ``logprobs`` when the client
    asked for them (``top_logprobs`` not None: that many alternatives per token)."""
    choice = _first_choice(resp)
    out: JSONDict = {
        "model": model,
        "created_at": created_at,
        "response": _text(choice.get("text")),
    }
    if top_logprobs is not None and (entries := completion_logprobs(choice, top_logprobs)):
        out["logprobs"] = entries
    out.update(_final_fields(resp, choice.get("finish_reason"), timings))
    return out


def completion_logprobs(choice: JSONDict, top: int) -> list[JSONDict]:
    """A text completion choice's ``logprobs`` (``tokens``, ``token_logprobs`` and
    ``top_logprobs``, one ``{token: logprob}`` object per token) as Ollama's entries, each
    with at most ``top`` alternatives, the likeliest first (vLLM adds the chosen token to
    them when it is not among the likeliest; Ollama gives exactly the top ones)."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list):
        return []
    tops = logprobs.get("top_logprobs")
    tops = tops if isinstance(tops, list) else []
    out: list[JSONDict] = []
    for i, (token, value) in enumerate(zip(tokens, values, strict=False)):
        entry = _token_logprob({"token": token, "logprob": value})
        if entry is None:  # null: a token without one (the prompt's first, echoed)
            continue
        if top and i < len(tops) and isinstance(tops[i], dict):
            alternatives = [
                alt
                for alt in (_token_logprob({"token": t, "logprob": v}) for t, v in tops[i].items())
                if alt is not None
            ]
            alternatives.sort(key=lambda alt: alt["logprob"], reverse=True)
            if alternatives:
                entry["top_logprobs"] = alternatives[:top]
        out.append(entry)
    return out


def _message_tool_calls(msg: JSONDict) -> list[JSONDict]:
    """A response message's tool calls in Ollama's form (also the legacy single call)."""
    calls = msg.get("tool_calls")
    if not calls and isinstance(msg.get("function_call"), dict):  # legacy single-call form
        calls = [{"function": msg["function_call"]}]
    if not isinstance(calls, list):
        return []
    return _ollama_tool_calls(c for c in calls if isinstance(c, dict))


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


# The content-only chunk, recognised without json.loads. Nearly every event of a chat stream is
#   {"id":..,"object":..,"created":..,"model":..,"choices":[{"index":0,
#    "delta":{"content":"tok"},"logprobs":null,"finish_reason":null}]}
# and the stream consumers need only its content. The grammar below is a subset of JSON (a
# match is always what json.loads would accept) in which every member the consumers read is
# either absent, present once, or only ever null; so a match means: no usage, no finish_reason,
# no reasoning, no tool calls, and choices[0].delta.content is the captured string (or absent).
# Anything else (a second choice, nested values in other members, escaped member names, ...)
# does not match and is decoded in full, so the results are always exact. tests/test_translate
# compares both ways on generated streams.
_WS = r"[ \t\n\r]*"  # JSON whitespace exactly (\s also matches other characters)
_STR = r'"(?:[^"\\\x00-\x1f]++|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*+"'
_NUM = r"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?"  # [0-9]: \d is Unicode
_SCALAR = rf"(?:{_STR}|{_NUM}|null|true|false)"
_SEP = rf"{_WS},{_WS}"


def _member(name: str, value: str) -> str:
    return name + _WS + ":" + _WS + value


def _other_member(read: str) -> str:
    """A scalar member named none of ``read``; the name has no escapes, so it is literal."""
    return _member(r'"(?!(?:' + read + r')")[^"\\\x00-\x1f]++"', _SCALAR)


def _around(member: str, required: str) -> str:
    """``required`` with any number of ``member`` before and after it, comma-separated."""
    return rf"(?:{member}{_SEP})*+{required}(?:{_SEP}{member})*+"


def _obj(body: str) -> str:
    return r"\{" + _WS + body + _WS + r"\}"


_DELTA_MEMBER = "(?:{}|{})".format(
    _other_member("content|reasoning_content|reasoning|tool_calls|refusal"),
    _member('"(?:reasoning_content|reasoning|tool_calls|refusal)"', "null"),
)
_CHOICE_MEMBER = "(?:{}|{})".format(
    _other_member("delta|message|finish_reason"), _member('"finish_reason"', "null")
)
_TOP_MEMBER = "(?:{}|{})".format(
    _other_member("choices|usage|error"), _member('"(?:usage|error)"', "null")
)
_DELTA = _obj(
    "(?:"
    + _around(_DELTA_MEMBER, _member('"content"', f"(?:(?P<content>{_STR})|null)"))
    + f"|(?:{_DELTA_MEMBER}(?:{_SEP}{_DELTA_MEMBER})*+)?)"
)
_CHOICE = _obj(_around(_CHOICE_MEMBER, _member('"delta"', f"(?P<delta>{_DELTA})")))
_CONTENT_CHUNK = re.compile(
    _WS
    + _obj(_around(_TOP_MEMBER, _member('"choices"', r"\[" + _WS + _CHOICE + _WS + r"\]")))
    + _WS
)
_CONTENT_DELTA = re.compile(_DELTA)


def _decode_str(literal: str) -> str:
    """A JSON string literal matched by _STR, decoded (by json's own C scanner)."""
    return scanstring(literal, 1)[0]


# Full-chunk attempts that may fail in a row before a stream is taken to have another shape.
_MAX_SHAPE_MISSES = 8


class _ContentChunks:
    """Finds content-only chunks in event texts (see the grammar above).

    Every chunk of a stream repeats the text around its delta (id, created, model, the choice's
    other members), so after one full match only the delta is matched while the text before and
    after it stays the same. That is exact as well: swapping one JSON value (the delta object)
    for another keeps a JSON document's structure everywhere else.
    """

    __slots__ = ("_head", "_misses", "_tail")

    def __init__(self) -> None:
        self._head: str | None = None
        self._tail = ""
        self._misses = 0

    def content(self, data: str) -> str | None:
        """The content's JSON string literal (``'""'`` when absent or null) if ``data`` is a
        content-only chunk; ``None`` if it must be decoded in full."""
        head = self._head
        if head is not None and data.startswith(head) and data.endswith(self._tail):
            match = _CONTENT_DELTA.fullmatch(data, len(head), len(data) - len(self._tail))
            if match is not None:
                return match["content"] or '""'
        if self._misses >= _MAX_SHAPE_MISSES:
            return None
        match = _CONTENT_CHUNK.fullmatch(data)
        if match is None:
            self._misses += 1
            return None
        self._misses = 0
        self._head, self._tail = data[: match.start("delta")], data[match.end("delta") :]
        return match["content"] or '""'


def parse_chunk(data: str) -> JSONDict | None:
    """One event's JSON object; ``None`` for anything else (ignored, as keep-alive noise),
    an event too deep to read included: the observers only watch a stream relayed as it
    came, which its client may well read."""
    try:
        return read_chunk(data)
    except NestedTooDeeply:
        return None


def read_chunk(data: str) -> JSONDict | None:
    """:func:`parse_chunk`, but an event too deep to read raises :class:`NestedTooDeeply`:
    for a stream translated to Ollama's, it may hold the answer, so it is not noise."""
    try:
        chunk = loads(data)
    except NestedTooDeeply:
        raise
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


# Tool-call fragments are held until the calls are whole (Ollama sends them whole): a
# backend that streams arguments for ever must not grow a worker without bound. The same
# bound as an SSE line or event.
MAX_HELD_TOOL_CALL_BYTES = DEFAULT_MAX_LINE_BYTES
_TOOL_CALL_OVERHEAD = 64  # what a call holds besides its arguments, roughly


class UntranslatableStream(ValueError):
    """The backend's stream cannot be translated further: the relay ends it with an
    error, the backend's fault."""


class StreamTooLarge(UntranslatableStream):
    """A stream asks the translator to hold more than it is willing to."""


@dataclass(slots=True)
class _PendingToolCall:
    id: str | None
    name: str
    arguments: list[str]
    # where the call goes among the others: the backend's index, then the order of starts
    order: tuple[int, int] = (0, 0)
    extra_content: JSONDict | None = None  # Gemini's thought signature rides on it


def _starts_another_call(
    pending: _PendingToolCall, call_id: Any, name: Any, arguments: Any
) -> bool:
    """Whether a delta at an index already in use begins a call of its own: it carries
    another call's id, or a function's name and arguments while the call there has whole
    arguments already (Gemini's layer sends each parallel call whole, all at index 0,
    without ids; a continuation that repeats the name comes before the arguments end)."""
    if call_id and pending.id is not None and call_id != pending.id:
        return True
    if not name or not pending.name:
        return False
    if name != pending.name:
        return True
    return bool(arguments) and _whole_object("".join(pending.arguments))


def _continues_without_index(
    latest: _PendingToolCall, call_id: Any, name: Any, function: JSONDict
) -> bool:
    """Whether a delta without ``index`` (a non-conforming backend: mistral.rs, Gemini's
    layer, some gateways) continues the latest call: it names no call, or only the
    latest one again (its id repeated on every fragment split a call's arguments into
    calls of their own, each empty); a new id or name, or a call already whole, is
    another call (Gemini's parallel calls, each whole)."""
    if not (call_id or name):
        return True
    if call_id and call_id != latest.id:
        return False
    return not _starts_another_call(latest, call_id, name, function.get("arguments"))


def _whole_object(arguments: str) -> bool:
    if not arguments.rstrip().endswith("}"):
        return False  # the common case, without decoding
    try:
        return isinstance(loads(arguments), dict)
    except ValueError:
        return False


def _delta_of(choice: JSONDict) -> JSONDict:
    """A stream chunk's choice's output: its ``delta``, a whole ``message`` (a backend's
    JSON answer as a chunk), or its ``text`` (a legacy /v1/completions chunk carries its
    text on the choice itself)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta
    message = choice.get("message")
    return message if isinstance(message, dict) else {"content": choice.get("text")}


def _has_output(delta: JSONDict) -> bool:
    """Whether a choice's delta carries output (a token): what ``_observe`` counts."""
    return bool(
        _text(delta.get("content"))
        or _refusal(delta)
        or _thinking(delta)
        or (isinstance(delta.get("tool_calls"), list) and delta["tool_calls"])
        or _other_output(delta)
    )


def _other_output(delta: JSONDict) -> bool:
    """Output besides text and tool calls: a legacy ``functions`` call, or audio
    (gpt-4o-audio streams its transcript and data there). Without it such a stream never
    had its first token, and the first-token deadline cut it however fast it flowed."""
    return bool(delta.get("function_call") or delta.get("audio"))


def _legacy_call(delta: JSONDict) -> list[JSONDict]:
    """A legacy ``function_call`` fragment (the single call of OpenAI's ``functions``, which
    some backends still answer tools with) as the fragment of a tool call at index 0: a
    streamed answer holds the call as a non-stream one does (_message_tool_calls), where
    it was dropped, and the client got an empty answer."""
    function = delta.get("function_call")
    return [{"index": 0, "function": function}] if isinstance(function, dict) else []


class _StreamStats:
    """What both stream consumers track for metrics: token timing, chunk counts, usage."""

    # whether a body that ends without the stream's last event is a broken stream
    must_end = True
    # A stream of several choices (``n``; OpenAIStreamObserver.expect_choices): the indices
    # finished so far. None for one choice, the rule: then ``finish_reason`` alone says it
    # ended. Class defaults: two more attributes on every instance took an
    # OllamaStreamTranslator to 30, and its general per-chunk path ~130 ns slower (see its
    # __init__), for a count only a /v1 passthrough stream ever needs.
    _choices = 1
    _finished_choices: set[int] | None = None

    def __init__(self, start_ns: int = 0) -> None:
        self.start_ns = start_ns
        self.first_token_ns: int | None = None
        self.last_token_ns: int | None = None
        self.content_chunks = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None
        # the stream's own account of itself, for the relay: work came out (the deadline
        # for a first token no longer applies), the last event is out, the backend failed
        self.progressed = False
        self.ended = False
        self.failed = False
        self.error: object = None  # what the backend said when it failed, if anything
        # an event that is no JSON at all: the openai SDK fails on it, so a stream relayed
        # as it came is broken there, whatever else the backend sends
        self.malformed = False
        self._shapes = _ContentChunks()

    @property
    def open_choices(self) -> int:
        """How many of the choices asked for have no ``finish_reason`` yet (0 or 1 for a
        stream of one choice)."""
        if self._finished_choices is None:
            return 0 if self.finish_reason is not None else 1
        return self._choices - len(self._finished_choices)

    @property
    def usage_seen(self) -> bool:
        return self.completion_tokens is not None or self.prompt_tokens is not None

    def _event(self, data: str) -> JSONDict | None:
        """:func:`parse_chunk`, noting an event that is no JSON (``malformed``). A ``[DONE]``
        with something after it is not one: the openai SDK ends a stream at any data that
        starts so."""
        try:
            chunk = loads(data)
        except NestedTooDeeply:
            return None
        except ValueError:
            if not data.startswith("[DONE]"):
                self.malformed = True
            return None
        return chunk if isinstance(chunk, dict) else None

    def _observe(self, chunk: JSONDict, now_ns: int) -> tuple[str, str, list[Any], JSONDict]:
        """Record one chunk; return (content, thinking, tool-call deltas, choice)."""
        # Some backends repeat (cumulative) usage on every chunk: the latest wins. Groq's
        # streams carry theirs as x_groq.usage (also when asked for include_usage)
        usage = chunk.get("usage")
        if usage is None and "x_groq" in chunk:
            usage = _groq_usage(chunk)
        self._take_usage(usage, "prompt_tokens", "completion_tokens")
        if chunk.get("error"):
            # an error event in the stream: the backend gave up (OpenRouter's carries
            # choices too, with finish_reason "error")
            self._fail(chunk["error"])
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return "", "", [], {}
        choice = choices[0]
        delta = choice.get("delta")
        if not isinstance(delta, dict):  # inline (the hot path) what _delta_of does
            message = choice.get("message")
            # a legacy /v1/completions chunk carries its text on the choice itself
            delta = message if isinstance(message, dict) else {"content": choice.get("text")}
        content = _text(delta.get("content")) + _refusal(delta)
        thinking = _thinking(delta)
        calls = delta.get("tool_calls")
        calls = calls if isinstance(calls, list) else []
        if content or thinking or calls:
            self._count_token(now_ns)
        elif _other_output(delta):  # looked for only in a chunk without text or tool calls
            self._count_token(now_ns)
            calls = _legacy_call(delta)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self._finish_reason_came(finish)
        return content, thinking, calls, choice

    def _finish_reason_came(self, finish: str) -> None:
        """A choice's ``finish_reason`` came."""
        self.finish_reason = finish
        if finish == "error":
            self._fail(FINISHED_WITH_ERROR)

    def _fail(self, error: object) -> None:
        if not self.failed:  # the first account of the failure is the one that explains it
            self.failed = True
            self.error = error

    def _take_usage(self, usage: object, input_key: str, output_key: str) -> None:
        if isinstance(usage, dict):
            if (prompt := whole_number(usage.get(input_key))) is not None:
                self.prompt_tokens = prompt
            if (completion := whole_number(usage.get(output_key))) is not None:
                self.completion_tokens = completion

    def _count_token(self, now_ns: int) -> None:
        # A "content-bearing" chunk: text, reasoning, a tool-call fragment, other output.
        # Backends send about one token per chunk, so this count stands in for eval_count
        # without usage.
        self.content_chunks += 1
        if self.first_token_ns is None:
            self.first_token_ns = now_ns
            self.progressed = True
        self.last_token_ns = now_ns


def _groq_usage(chunk: JSONDict) -> object:
    extra = chunk["x_groq"]
    return extra.get("usage") if isinstance(extra, dict) else None


class OpenAIStreamObserver(_StreamStats):
    """Watches a ``/v1`` stream being relayed verbatim, for metrics only.

    Exposes ``first_token_ns``, ``last_token_ns``, ``content_chunks``, ``prompt_tokens``,
    ``completion_tokens``, ``usage_seen`` and ``finish_reason``.
    """

    def __init__(self, start_ns: int = 0) -> None:
        super().__init__(start_ns)
        # on the instance, where the per-chunk check finds it fastest (see _StreamStats)
        self._finished_choices = None

    def expect_choices(self, n: int) -> None:
        """The request asked for ``n`` choices (``n`` > 1): the stream is whole only once
        each of them has its ``finish_reason`` (or ``[DONE]`` came)."""
        self._choices = n
        self._finished_choices = set()

    def feed(self, chunk: JSONDict, now_ns: int) -> None:
        self._observe(chunk, now_ns)
        if self._finished_choices is not None:
            self._observe_choices(chunk, now_ns)

    def feed_text(self, data: str, now_ns: int) -> None:
        """``feed`` for one event's text, with the same results; a content-only chunk (most
        of a stream) is recognised without decoding it, anything else is decoded in full."""
        literal = self._shapes.content(data)
        if literal is None:
            chunk = self._event(data)
            if chunk is not None:
                self._observe(chunk, now_ns)
                if self._finished_choices is not None:
                    self._observe_choices(chunk, now_ns)
        elif literal != '""':
            self._count_token(now_ns)

    def _observe_choices(self, chunk: JSONDict, now_ns: int) -> None:
        """A chunk of a stream that asked for several choices, after ``_observe`` took its
        first: each choice's ``finish_reason`` ends that choice, and each choice after the
        first with output is a token (NVIDIA Dynamo sends all ``n`` choices in one chunk)."""
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            if position and _has_output(_delta_of(choice)):
                self._count_token(now_ns)
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish:
                if position:  # the first one's, _observe took
                    self._finish_reason_came(finish)
                self._choice_finished(choice.get("index"), position)

    def _choice_finished(self, index: object, position: int) -> None:
        """A choice's ``finish_reason`` came (``position``: its place in its chunk, the
        index of a backend that numbers none)."""
        number = index if type(index) is int else position
        if self._finished_choices is not None and 0 <= number < self._choices:
            self._finished_choices.add(number)  # bounded: at most n indices are kept


class ResponsesStreamObserver(_StreamStats):
    """Watches a ``/v1/responses`` stream (OpenAI's Responses API) being relayed verbatim:
    every ``*.delta`` event with content is a token (text, refusal, reasoning, tool-call
    arguments); a finished output item (a hosted web search, a tool call) is progress even
    before any token; the closing ``response.completed`` (or ``.incomplete`` / ``.failed``)
    event carries ``usage`` and the status, and is the stream's last (there is no
    ``[DONE]``); ``response.failed`` and ``error`` events mean the backend failed."""

    _TEXT_DELTA = '{"type":"response.output_text.delta"'
    finish_reason: str | None  # as _StreamStats declares it (``_finish`` sets a str)
    response_id: str | None = None  # from the event that opens the stream
    response_model: str | None = None  # the same

    def feed_text(self, data: str, now_ns: int) -> None:
        # OpenAI writes "type" first: a text delta (most of a stream) needs no decoding
        if data.startswith(self._TEXT_DELTA) and '"delta":""' not in data:
            self._count_token(now_ns)
            return
        event = self._event(data)
        if event is not None:
            self.feed(event, now_ns)

    def feed(self, event: JSONDict, now_ns: int) -> None:
        kind = event.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta"):
            if event.get("delta") and kind not in _NOT_TOKENS:
                self._count_token(now_ns)
        elif kind == "response.output_item.done":
            self.progressed = True
        elif kind in _RESPONSE_ENDS:
            self.ended = True
            self.failed = kind == "response.failed"
            if self.failed:
                response = event.get("response")
                self.error = response.get("error") if isinstance(response, dict) else None
            self._finish(event.get("response"))
        elif kind == "error":
            self.ended = self.failed = True
            self.error = event.get("error") or event  # {"type": "error", "code", "message"}
        elif kind == "response.created":
            self._identify(event.get("response"))

    def _identify(self, response: object) -> None:
        """The response's id and model, from the first event that names them: the opening
        ``response.created``, else the closing event (a stream resumed with
        ``starting_after`` replays no ``response.created``; the tokens it settles go under
        the model its closing event names)."""
        if not isinstance(response, dict):
            return
        if self.response_id is None and isinstance(response.get("id"), str):
            self.response_id = response["id"]
        if self.response_model is None and isinstance(response.get("model"), str):
            self.response_model = response["model"]

    def _finish(self, response: object) -> None:
        if not isinstance(response, dict):
            return
        self._identify(response)
        self._take_usage(response.get("usage"), "input_tokens", "output_tokens")
        status = response.get("status")
        if isinstance(status, str) and status:
            self.finish_reason = status


class ReplayedResponsesObserver(ResponsesStreamObserver):
    """Watches a resumed Responses stream (``GET /v1/responses/{id}?stream=true``): the
    backend replays the events of a response whose creating request counted it. Its end,
    failures and progress are watched as for a live stream, but its deltas are not counted
    again, nor is a replayed delta a time to first token. Only usage the ``ledger`` says
    is still owed for ``response_id`` (a background response, a stream cut before its end)
    counts, the rest only, settled in the ledger the moment the closing event arrives, so
    a poll at the same time cannot count it too (``settled``)."""

    def __init__(self, ledger: ResponsesLedger | None = None, response_id: str = "") -> None:
        super().__init__()
        self._ledger = ledger
        self._owed_id = response_id
        self.settled = False
        self._replayed = False

    # read-only here (the relay only reads it), a class attribute in _StreamStats
    @property
    def must_end(self) -> bool:  # type: ignore[override]
        """A replay that began before the response's last event must reach it: a body
        that ends after some events but without the closing one is cut (the client must
        not take half a response for the whole). One with no event at all began after
        the last event there is (``starting_after`` the closing one), and is whole."""
        return self._replayed

    # as _StreamStats declares them (``_take_usage`` sets ints)
    prompt_tokens: int | None
    completion_tokens: int | None

    def feed_text(self, data: str, now_ns: int) -> None:
        self._replayed = True
        super().feed_text(data, now_ns)

    def _count_token(self, now_ns: int) -> None:
        self.progressed = True

    def _take_usage(self, usage: object, input_key: str, output_key: str) -> None:
        if self._ledger is None or self.settled:
            return
        rest = self._ledger.settle(self._owed_id, usage)
        if rest is not None:
            self.prompt_tokens, self.completion_tokens = rest
            self.settled = True


_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# audio bytes, not tokens: the speech's tokens are counted by its transcript's deltas
_NOT_TOKENS = frozenset({"response.audio.delta"})


# A chunk's log probabilities ride on the line it writes; those of a chunk that writes
# none (a tool call's fragment, a role or finish chunk) on the next line. Past this many
# held, they go out on a line of their own (content ""), so a backend that streams tool
# calls with log probabilities does not grow a worker without bound.
MAX_HELD_LOGPROBS = 1024


def _ends_in_high_surrogate(text: str) -> bool:
    return "\ud800" <= text[-1:] <= "\udbff"


def _paired(text: str) -> str:
    """``text`` with each surrogate pair as the one character it spells ("\\ud83d" and
    "\\ude00" decoded apart stay two code points in a str); lone halves are kept."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


class _HeldToolCalls(_StreamStats):
    """A stream translator that holds the backend's tool calls until they are whole, as
    Ollama sends a call (the Ollama translator; the Anthropic one, ``anthropic``): the
    pieces each call's deltas bring, bounded by MAX_HELD_TOOL_CALL_BYTES, taken whole by
    ``_take_tool_calls``."""

    def __init__(
        self, start_ns: int, on_tool_calls: Callable[[list[JSONDict]], None] | None = None
    ) -> None:
        super().__init__(start_ns)
        self._on_tool_calls = on_tool_calls
        # calls in the order they started; where each backend index is being written
        self._tool_calls: list[_PendingToolCall] = []
        self._slot_of_index: dict[int, int] = {}
        self._tool_call_bytes = 0  # held until the calls are whole: bounded

    def _accumulate(self, delta: JSONDict) -> int:
        """Take one tool-call delta; the slot of the call it belongs to (its place in
        ``_tool_calls``)."""
        index = delta.get("index")
        function = f if isinstance(f := delta.get("function"), dict) else {}
        call_id = delta.get("id")
        name = function.get("name")
        calls = self._tool_calls
        slot: int | None
        if isinstance(index, int):
            slot = self._slot_of_index.get(index)
            arguments = function.get("arguments")
            if slot is not None and _starts_another_call(calls[slot], call_id, name, arguments):
                # Parallel calls that all say index 0, told apart by their ids (Ollama's
                # own /v1, SGLang, Gemini's OpenAI layer): a new id is a new call.
                slot = None
        elif calls and _continues_without_index(calls[-1], call_id, name, function):
            slot = len(calls) - 1
        else:
            slot = None
        if slot is None:
            slot = len(calls)
            position = index if isinstance(index, int) else slot
            calls.append(_PendingToolCall(None, "", [], (position, slot)))
            self._hold(_TOOL_CALL_OVERHEAD)
            if isinstance(index, int):
                self._slot_of_index[index] = slot
        pending = calls[slot]
        if call_id and pending.id is None:
            pending.id = call_id
        if name and not pending.name:
            pending.name = name
        extra = delta.get("extra_content")
        if isinstance(extra, dict) and pending.extra_content is None:
            pending.extra_content = extra
        args = function.get("arguments")
        if isinstance(args, dict):
            # too deep to write (NestedTooDeeply): the relay ends the stream, the backend's fault
            args = compact_json_text(args)
        if isinstance(args, str):
            self._hold(len(args))
            pending.arguments.append(args)
        return slot

    def _hold(self, size: int) -> None:
        self._tool_call_bytes += size
        if self._tool_call_bytes > MAX_HELD_TOOL_CALL_BYTES:
            raise StreamTooLarge(
                f"the backend's tool calls exceed {MAX_HELD_TOOL_CALL_BYTES} bytes before they "
                "end (a backend that never finishes them?)"
            )

    def _take_tool_calls(self) -> list[JSONDict]:
        calls = [
            {
                "id": p.id,
                "function": {"name": p.name, "arguments": "".join(p.arguments)},
                "extra_content": p.extra_content,
            }
            for p in sorted(self._tool_calls, key=lambda p: p.order)
        ]
        if self._on_tool_calls is not None:
            self._on_tool_calls(calls)
        self._drop_tool_calls()
        return _ollama_tool_calls(calls)

    def _drop_tool_calls(self) -> None:
        self._tool_calls = []
        self._slot_of_index = {}
        self._tool_call_bytes = 0


class OllamaStreamTranslator(_HeldToolCalls):
    """OpenAI ``chat.completion.chunk`` dicts in, Ollama NDJSON objects out.

    ``feed`` returns the lines to emit now (often none: role-only and usage-only chunks produce
    no output). ``finish`` returns the single ``done: true`` line and may be called once.

    Tool-call fragments are accumulated per ``index`` and emitted when ``finish_reason``
    arrives, one line per call (in Ollama's order, its ``function.index`` counting them). If
    the stream ends without a finish_reason, pending calls ride on the final line's
    ``message.tool_calls`` (chat) / ``tool_calls`` (generate), so ``finish`` can still
    return exactly one object.

    With ``logprobs`` (the client asked), each chunk's ``logprobs.content`` (then
    ``.refusal``) goes out as the line's ``logprobs``, in order, each entry once (see
    MAX_HELD_LOGPROBS); those of reasoning hidden by ``think: false`` are hidden with it.

    A text that ends in the first half of a surrogate pair (a backend that cuts text by
    UTF-16 units sends an emoji as ``"\\ud83d"`` in one chunk, ``"\\ude00"`` in the next)
    keeps that half until the next piece of the same text, so each line holds whole
    characters (ollama-python reads each line on its own); the final line flushes it.

    Times are monotonic ns from the same clock as ``start_ns``; ``created_at`` is called for
    each line's wall-clock stamp.
    """

    # a generate's done line has ``context`` (a class attribute: instances keep < 30)
    done_context = True

    def __init__(
        self,
        kind: Literal["chat", "generate"],
        model: str,
        *,
        start_ns: int,
        created_at: Callable[[], object] = utc_timestamp,
        show_thinking: bool = True,
        on_tool_calls: Callable[[list[JSONDict]], None] | None = None,
        logprobs: bool = False,
    ) -> None:
        if kind not in ("chat", "generate"):
            raise ValueError(f"kind must be 'chat' or 'generate', not {kind!r}")
        # on_tool_calls: told the whole calls as the backend wrote them
        # (signatures.ThoughtSignatures)
        super().__init__(start_ns, on_tool_calls)
        self.kind = kind
        self.model = model
        # think: false hides the reasoning; its chunks are still tokens the backend made
        self._show_thinking = show_thinking
        self._created_at = created_at
        self._finished = False
        # Three attributes for what follows, no more: past 30 an instance's attributes
        # are no longer stored the fast way (CPython's shared keys), and every chunk's
        # attribute reads got slower, ~100 ns on the general path.
        # Log probabilities held for the next line (MAX_HELD_LOGPROBS); None: not asked
        self._held_logprobs: list[JSONDict] | None = [] if logprobs else None
        # the first half of a surrogate pair, until its second comes: content's, thinking's
        self._halves = ("", "")
        # finished, or something held for the next line: feed and feed_text check this one
        # attribute (they checked _finished alone before), so ordinary chunks pay nothing
        self._unusual = False
        # A content line as text around its timestamp and content, for feed_text. The dict
        # _line builds is encoded member by member with this same string encoder, so the bytes
        # are the same.
        self._text_head = '{"model":' + _encode_str(model) + ',"created_at":'
        self._text_middle = (
            ',"message":{"role":"assistant","content":' if kind == "chat" else ',"response":'
        )
        self._text_tail = '},"done":false}' if kind == "chat" else ',"done":false}'

    def _take_indexed_calls(self) -> list[JSONDict]:
        """The held calls, each saying its ``function.index`` as ``index`` beside its ``id``
        too, where OpenAI's chunks have it. Ollama's lines have no such member and its
        clients ignore it; LiteLLM's ollama_chat numbers a line's calls from 0 without it,
        so parallel calls on lines of their own all read as call 0 and ran together."""
        calls = self._take_tool_calls()
        for call in calls:
            call["index"] = call["function"]["index"]
        return calls

    # -- public API -----------------------------------------------------------------------

    def feed(self, chunk: JSONDict, now_ns: int) -> list[JSONDict]:
        if self._unusual and self._finished:
            raise RuntimeError("feed() after finish()")
        content, thinking, calls, choice = self._observe(chunk, now_ns)
        if thinking and not self._show_thinking:
            # a chunk of hidden reasoning alone: its log probabilities spell it, hidden too
            hidden = not content and not calls
            thinking = ""
        else:
            hidden = False
        # nothing held, and no text ending in the first half of a pair: as it came. Half a
        # pair is never ASCII (isascii is O(1)); other text is looked at by its last
        # character only, inline (the call for every non-ASCII chunk cost ~300 ns each)
        if self._unusual or (
            not (content.isascii() and thinking.isascii())
            and (
                (content and "\ud800" <= content[-1] <= "\udbff")
                or (thinking and "\ud800" <= thinking[-1] <= "\udbff")
            )
        ):
            content, thinking = self._whole_characters(content, thinking)
        lines: list[JSONDict] = []
        if content or thinking:
            lines.append(self._line(content, thinking))
        for delta in calls:
            if isinstance(delta, dict):
                self._accumulate(delta)
        finish = choice.get("finish_reason") if choice else None
        if finish and self._tool_calls:
            # one line per call, as Ollama writes each call once it is whole: Haystack's
            # streaming reader takes a line's calls for one call (names and arguments mixed)
            lines.extend(self._line("", "", [call]) for call in self._take_indexed_calls())
        if self._held_logprobs is not None:
            self._place_logprobs(lines, [] if hidden or not choice else choice_logprobs(choice))
        return lines

    def feed_text(self, data: str, now_ns: int) -> bytes | None:
        """``feed`` for one event's text when it is a content-only chunk: its line already
        encoded as ``compact_json`` would (``b""`` when it has none). ``None`` for any other
        event, which the caller decodes and passes to ``feed``."""
        if self._unusual:
            if self._finished:
                raise RuntimeError("feed() after finish()")
            return None  # something held for the next line: feed() attaches it
        literal = self._shapes.content(data)
        if literal is None:
            return None
        if literal == '""':
            return b""
        self._count_token(now_ns)
        content = _decode_str(literal)
        created_at = self._created_at()
        if isinstance(created_at, str):  # only a str is encoded like _encode_str does
            text = (
                self._text_head
                + _encode_str(created_at)
                + self._text_middle
                + _encode_str(content)
                + self._text_tail
            )
            try:
                return escape_line_separators(text.encode())
            except UnicodeEncodeError:  # half a surrogate pair (an emoji cut in two)
                pass
        return self._unusual_line(content, created_at)

    def finish(self, now_ns: int) -> JSONDict:
        if self._finished:
            raise RuntimeError("finish() called twice: a stream has exactly one done line")
        self._finished = self._unusual = True
        # what was held for a next line that never came: the first half of a pair alone
        # (written as its escape), log probabilities
        line = self._line(*self._halves, self._take_indexed_calls() if self._tool_calls else None)
        if self._held_logprobs:
            line["logprobs"] = self._held_logprobs
            self._held_logprobs = []
        first = self.first_token_ns if self.first_token_ns is not None else now_ns
        last = self.last_token_ns if self.last_token_ns is not None else first
        eval_count = (
            self.completion_tokens if self.completion_tokens is not None else self.content_chunks
        )
        prompt_ns, eval_ns = max(0, int(first - self.start_ns)), max(0, int(last - first))
        if eval_count and not eval_ns:
            # the tokens came at once (a backend that does not stream, a tool call alone):
            # the wait holds the generation too, as in a non-stream answer, whose whole wait
            # is eval_duration; so no client divides eval_count by a zero duration
            prompt_ns, eval_ns = 0, prompt_ns
        line.update(
            done=True,
            done_reason=_done_reason(self.finish_reason),
            total_duration=max(0, int(now_ns - self.start_ns)),
            load_duration=0,
            prompt_eval_count=self.prompt_tokens or 0,
            prompt_eval_duration=prompt_ns,
            eval_count=eval_count,
            eval_duration=eval_ns,
        )
        if self.kind == "generate" and self.done_context:
            line["context"] = []  # see openai_chat_to_ollama_generate
        return line

    @staticmethod
    def error_line(message: str) -> JSONDict:
        """The in-band error line ollama clients raise as ``ResponseError`` mid-stream."""
        return {"error": message}

    @property
    def finished(self) -> bool:
        return self._finished

    # -- internals ------------------------------------------------------------------------

    def _unusual_line(self, content: str, created_at: object) -> bytes:
        """A content-only chunk's line the fast way could not write: text with half a
        surrogate pair (escaped, and a trailing first half held for the next piece), or a
        stamp that is no str. The line's own time: the clock is not read twice for a line,
        and a time read for a line held back whole is the next line's."""
        if _ends_in_high_surrogate(content):
            self._halves, content = (content[-1], ""), content[:-1]
            self._unusual = True
            if not content:
                self._stamp_next_line(created_at)
                return b""
        return compact_json(self._line(content, "", created_at=created_at))

    def _stamp_next_line(self, stamp: object) -> None:
        clock = self._created_at

        def once() -> object:
            self._created_at = clock
            return stamp

        self._created_at = once

    def _whole_characters(self, content: str, thinking: str) -> tuple[str, str]:
        """``content`` and ``thinking`` after what was held of each, less a trailing first
        half of a surrogate pair, held for the next piece of the same text."""
        content_half, thinking_half = self._halves
        if content_half:
            content = _paired(content_half + content)
        if thinking_half:
            thinking = _paired(thinking_half + thinking)
        content_half = thinking_half = ""
        if _ends_in_high_surrogate(content):
            content_half, content = content[-1], content[:-1]
        if _ends_in_high_surrogate(thinking):
            thinking_half, thinking = thinking[-1], thinking[:-1]
        self._halves = (content_half, thinking_half)
        self._note_held()
        return content, thinking

    def _place_logprobs(self, lines: list[JSONDict], entries: list[JSONDict]) -> None:
        """``entries`` (after any held) on the first of ``lines``; held when there is none,
        up to MAX_HELD_LOGPROBS, past which they go out on a line of their own."""
        held = self._held_logprobs
        if held:  # a list: only called when the client asked
            held.extend(entries)
            entries = held
        elif not entries:
            return
        if lines or len(entries) > MAX_HELD_LOGPROBS:
            if not lines:
                lines.append(self._line("", ""))
            lines[0]["logprobs"] = entries
            entries = []
        self._held_logprobs = entries
        self._note_held()

    def _note_held(self) -> None:
        self._unusual = bool(self._finished or any(self._halves) or self._held_logprobs)

    def _line(
        self,
        content: str,
        thinking: str,
        tool_calls: list[JSONDict] | None = None,
        created_at: Any = None,
    ) -> JSONDict:
        if created_at is None:
            created_at = self._created_at()
        line: JSONDict = {"model": self.model, "created_at": created_at}
        if self.kind == "chat":
            message: JSONDict = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            line["message"] = message
        else:
            line["response"] = content
            if thinking:
                line["thinking"] = thinking
            if tool_calls:
                line["tool_calls"] = tool_calls
        line["done"] = False
        return line


class OllamaCompletionStreamTranslator(OllamaStreamTranslator):
    """Legacy text completion chunks (``choices[0].text``) in, ``/api/generate`` NDJSON out.

    The chat translator already reads a choice without a delta by its ``text``; this one
    adds the text completion's log probabilities (another shape, see
    :func:`completion_logprobs`) and never tries the chat chunk shortcut of ``feed_text``,
    which a text chunk never matches. The chat translator's own path is left as it is.
    """

    done_context = False  # Ollama's raw mode sends no context

    def __init__(
        self,
        model: str,
        *,
        start_ns: int,
        created_at: Callable[[], object] = utc_timestamp,
        top_logprobs: int | None = None,
    ) -> None:
        super().__init__(
            "generate",
            model,
            start_ns=start_ns,
            created_at=created_at,
            logprobs=top_logprobs is not None,
        )
        self._top_logprobs = top_logprobs or 0

    def feed_text(self, data: str, now_ns: int) -> bytes | None:
        return None  # decoded and passed to feed

    def feed(self, chunk: JSONDict, now_ns: int) -> list[JSONDict]:
        if self._held_logprobs is not None:
            chunk = self._with_chat_logprobs(chunk)
        return super().feed(chunk, now_ns)

    def _with_chat_logprobs(self, chunk: JSONDict) -> JSONDict:
        """``chunk`` with its first choice's log probabilities in the chat shape (a new
        dict: the backend's is not changed)."""
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return chunk
        choice = choices[0]
        entries = completion_logprobs(choice, self._top_logprobs)
        choice = {**choice, "logprobs": {"content": entries}}
        return {**chunk, "choices": [choice, *choices[1:]]}


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def _vector(embedding: object) -> list[float]:
    if isinstance(embedding, list):
        return embedding
    if isinstance(embedding, str):
        # A backend that ignored encoding_format=float: base64 of little-endian float32.
        raw = base64.b64decode(embedding)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw[: len(raw) - len(raw) % 4]))
    return []


def _embedding_items(resp: JSONDict) -> list[JSONDict]:
    """The ``data`` items of an ``/embeddings`` answer, in input order."""
    data = resp.get("data")
    if not isinstance(data, list):
        return []
    items = [d for d in data if isinstance(d, dict)]
    items.sort(key=lambda d: i if isinstance(i := d.get("index"), int) else 0)
    return items


def _vectors(resp: JSONDict) -> list[list[float]]:
    return [_vector(d.get("embedding")) for d in _embedding_items(resp)]


# OpenAI's caps on one /embeddings request: 2,048 inputs, and 300,000 tokens summed over
# them (a RAG ingest of 2,048 chunks of 1,000 characters is about 500,000); Ollama's
# /api/embed has neither
EMBED_BATCH_INPUTS = 2048
EMBED_BATCH_TOKENS = 300_000


def embed_batches(
    payload: JSONDict, size: int = EMBED_BATCH_INPUTS, tokens: int = EMBED_BATCH_TOKENS
) -> list[JSONDict]:
    """An ``/embeddings`` payload (list ``input``) as requests of at most ``size`` inputs
    and at most ``tokens`` tokens each, in order (an input larger than ``tokens`` alone
    in its request: the backend judges it).

    Without the backend's tokenizer, a text's tokens are bounded by its UTF-8 bytes (a
    token of OpenAI's byte-level BPE, as of any tokenizer with byte fallback, is at least
    one byte), plus one: so a batch is never refused for its size, at the price of more
    batches than needed (about four times as many for English text)."""
    inputs = payload["input"]
    batches: list[list[Any]] = [[]]
    held = 0
    for item in inputs:
        bound = _token_bound(item)
        if batches[-1] and (len(batches[-1]) == size or held + bound > tokens):
            batches.append([])
            held = 0
        batches[-1].append(item)
        held += bound
    if len(batches) == 1:
        return [payload]
    return [{**payload, "input": batch} for batch in batches]


def _token_bound(item: Any) -> int:
    """At least the tokens of one embedding input: a text or a list of token ids."""
    if isinstance(item, str):
        return (len(item) if item.isascii() else len(item.encode(errors="replace"))) + 1
    return len(item) + 1 if isinstance(item, list) else 1


def embedding_count(resp: JSONDict) -> int:
    return len(_embedding_items(resp))


def joined_embeddings(answers: list[JSONDict]) -> JSONDict:
    """The answers to :func:`embed_batches`' requests as one ``/embeddings`` answer: every
    vector in input order, renumbered, and the usage summed."""
    if len(answers) == 1:
        return answers[0]
    data = [
        {**item, "index": index}
        for index, item in enumerate(item for resp in answers for item in _embedding_items(resp))
    ]
    prompt = sum(_usage_counts(resp)[0] for resp in answers)
    usage = {"prompt_tokens": prompt, "total_tokens": prompt}
    return {**answers[0], "data": data, "usage": usage}


def openai_embeddings_to_ollama_embed(
    resp: JSONDict, model: str, timings: Timings, dimensions: int = 0
) -> JSONDict:
    """``/embeddings`` response as ``/api/embed``: every vector, in input order, and no
    longer than ``dimensions`` (when positive) as Ollama cuts them."""
    prompt_tokens, _ = _usage_counts(resp)
    vectors = _vectors(resp)
    if dimensions > 0:
        vectors = [cut_to_dimensions(vector, dimensions) for vector in vectors]
    return {
        "model": model,
        "embeddings": vectors,
        "total_duration": int(timings.total_ns),
        "load_duration": 0,
        "prompt_eval_count": prompt_tokens,
    }


def cut_to_dimensions(vector: list[float], dimensions: int) -> list[float]:
    """Ollama's ``dimensions``: a vector longer than that keeps its first ``dimensions``
    values, scaled back to unit length (as Ollama's normalize, whose floor on the norm
    keeps a zero vector zero); a backend that honoured the field answered no longer one,
    and one that ignores it (llama.cpp's server) or refused it answered its full length."""
    if len(vector) <= dimensions:
        return vector
    kept = vector[:dimensions]
    try:
        scale = 1.0 / max(math.sqrt(math.fsum(value * value for value in kept)), 1e-12)
    except (TypeError, OverflowError):  # not numbers, or too large to square: as they came
        return kept
    return [value * scale for value in kept]


def openai_embeddings_to_ollama_embeddings(resp: JSONDict) -> JSONDict:
    """``/embeddings`` response as legacy ``/api/embeddings``: ``{"embedding": [...]}``.

    The legacy API embeds one prompt. When the request carried a list ``input`` (accepted by
    :func:`validate_ollama_embeddings`) the other vectors are not dropped silently: they are all
    returned under ``"embeddings"`` as well, which legacy clients ignore.
    """
    vectors = _vectors(resp)
    out: JSONDict = {"embedding": vectors[0] if vectors else []}
    if len(vectors) > 1:
        out["embeddings"] = vectors
    return out


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

# Checked in order, so "codellama" is found before "llama".
_KNOWN_FAMILIES = (
    "codellama",
    "llama",
    "mistral",
    "mixtral",
    "qwen",
    "gemma",
    "phi",
    "deepseek",
    "gpt",
    "claude",
    "command",
    "falcon",
    "granite",
    "starcoder",
    "nomic",
    "bert",
    "olmo",
)


def model_family(model_id: str) -> str:
    """A best-effort family name for ``details.family``: a known family found in the id, else
    the leading letters of its last path segment, else ``"unknown"``."""
    name = model_id.rsplit("/", 1)[-1].lower()
    for family in _KNOWN_FAMILIES:
        if family in name:
            return family
    letters = ""
    for ch in name:
        if not ch.isalpha():
            break
        letters += ch
    return letters or "unknown"


def is_embedding_model(name: str) -> bool:
    """Heuristic: OpenAI ``/models`` does not say what a model can do, but embedding models
    are conventionally named with "embed" (text-embedding-3-small, nomic-embed-text, bge-m3
    is the usual exception)."""
    return "embed" in name.lower()


def _details(backend_id: str, entry: JSONDict) -> JSONDict:
    family = model_family(backend_id)
    parameters = whole_number(_gguf_meta(entry).get("n_params"))
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": _parameter_size(parameters) if parameters else "",
        "quantization_level": "",
    }


def _gguf_meta(entry: JSONDict) -> JSONDict:
    """The GGUF metadata llama.cpp's server lists under a /models entry's ``meta``
    (``n_ctx_train``, ``n_embd``, ``n_params``, ``size``); empty for other backends."""
    meta = entry.get("meta")
    return meta if isinstance(meta, dict) else {}


def _parameter_size(count: int) -> str:
    """A parameter count as Ollama writes ``details.parameter_size`` ("8.0B", "137M"); a
    count that rounds up to a thousand of its unit is written in the next (999.96 million
    is "1.0B", not "1000M")."""
    for position, (scale, suffix, digits) in enumerate(_PARAMETER_UNITS):
        if count >= scale:
            value = round(count / scale, digits)
            if value >= 1000 and position > 0:
                scale, suffix, digits = _PARAMETER_UNITS[position - 1]
                value = round(count / scale, digits)
            return f"{value:.{digits}f}{suffix}"
    return str(count)


_PARAMETER_UNITS = ((10**12, "T", 1), (10**9, "B", 1), (10**6, "M", 0), (10**3, "K", 0))


def _digest(backend_id: str) -> str:
    # bare hex, as Ollama lists its digests (the "sha256:" prefix is its blobs' spelling)
    # a lone surrogate (JSON's "\ud83d") has no UTF-8: its code point's bytes stand in
    return hashlib.sha256(backend_id.encode(errors="surrogatepass")).hexdigest()


def _listed(
    models: Iterable[object], mapper: ModelMapper, *, tagged: bool = False
) -> list[tuple[str, JSONDict]]:
    """(client name, backend entry) pairs: each backend model under every client name mapped
    to it (file order), or under its own id when unmapped; duplicates dropped. ``tagged``
    (Ollama's lists) spells each name with its tag, as Ollama does (``NAME:latest``)."""
    out: list[tuple[str, JSONDict]] = []
    seen: set[str] = set()
    for entry in models:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        names = mapper.clients_for(entry["id"]) or [entry["id"]]
        for name in map(with_default_tag, names) if tagged else names:
            if name not in seen:
                seen.add(name)
                out.append((name, entry))
    return out


def _tag_entry(name: str, entry: JSONDict) -> JSONDict:
    backend_id = entry["id"]
    return {
        "name": name,
        "model": name,
        "modified_at": _rfc3339_seconds(entry.get("created")),
        "size": whole_number(_gguf_meta(entry).get("size")) or 0,  # the model file's bytes
        "digest": _digest(backend_id),
        "details": _details(backend_id, entry),
    }


def openai_models_to_ollama_tags(models: list[JSONDict], mapper: ModelMapper) -> JSONDict:
    """Backend ``/models`` ``data`` as ``/api/tags``."""
    listed = _listed(models, mapper, tagged=True)
    return {"models": [_tag_entry(name, entry) for name, entry in listed]}


def ollama_show(
    model_name: str,
    backend_entry: JSONDict | None,
    *,
    embedding: bool | None = None,
    listed: Sequence[str] = (),
    declared: DeclaredModel | None = None,
) -> JSONDict:
    """A synthetic ``/api/show`` response for ``model_name`` (the client-facing name).

    What the mapping file ``declared`` of the name wins; else the capabilities come from the
    backend's entry and those its list gave beside it (``listed``: :func:`listed_capabilities`),
    with ``embedding=None`` deciding by :func:`is_embedding_model` on the name and backend id.
    """
    backend_id = backend_entry.get("id", model_name) if backend_entry else model_name
    if not isinstance(backend_id, str):
        backend_id = model_name
    entry = backend_entry or {}
    if declared is not None and declared.capabilities is not None:
        capabilities = list(declared.capabilities)
    else:
        if embedding is None:
            embedding = (
                is_embedding_model(model_name)
                or is_embedding_model(backend_id)
                or ("embedding" in listed and "completion" not in listed)
            )
        capabilities = ["embedding"] if embedding else _capabilities(entry, listed)
    details = _details(backend_id, entry)
    context = declared.context_length if declared is not None else None
    return {
        "modelfile": f"# Served by trioproxy from backend model {backend_id}\nFROM {backend_id}\n",
        "parameters": "",
        "template": _TOOLS_TEMPLATE if "tools" in capabilities else _PROMPT_TEMPLATE,
        "details": details,
        # ollama-python requires this key to exist (ShowResponse alias without default)
        "model_info": _model_info(details["family"], entry, context),
        "capabilities": capabilities,
        "modified_at": _rfc3339_seconds(entry.get("created")),
    }


# The backend applies the model's own template; these say what Ollama's would. Ollama
# lists "tools" for a template that reads .Tools, and clients go by the template alone
# (LiteLLM's supports_function_calling looks for "tools" in it).
_PROMPT_TEMPLATE = "{{ .Prompt }}"
_TOOLS_TEMPLATE = "{{ if .Tools }}{{ .Tools }}\n{{ end }}{{ .Prompt }}"


def _model_info(family: str, entry: JSONDict, declared_context: int | None = None) -> JSONDict:
    """``model_info`` with the keys Ollama reads from a model's GGUF that the backend's
    entry gives: its context window (where Zed, Continue and VS Code's Copilot read it; the
    one the mapping file declares first), and from llama.cpp's server the trained context,
    embedding length and parameter count."""
    info: JSONDict = {"general.architecture": family}
    meta = _gguf_meta(entry)
    if parameters := whole_number(meta.get("n_params")):
        info["general.parameter_count"] = parameters
    context = declared_context or _context_length(entry) or whole_number(meta.get("n_ctx_train"))
    if context:
        info[f"{family}.context_length"] = context
    if embedding := whole_number(meta.get("n_embd")):
        info[f"{family}.embedding_length"] = embedding
    return info


def _context_length(entry: JSONDict) -> int:
    """The context window a backend's /models entry gives; 0 for none (or nonsense: a
    huge number decodes as infinity)."""
    for key in _CONTEXT_KEYS:
        if length := whole_number(entry.get(key)):
            return length
    return 0


def _capabilities(entry: JSONDict, listed: Sequence[str] = ()) -> list[str]:
    """A generation model's capabilities: completion and tools, plus what the backend's
    entry says beyond them (OpenRouter's input modalities and supported parameters) or
    its list gives beside it (``listed``: llama.cpp's server's)."""
    out = ["completion", "tools"]
    architecture = entry.get("architecture")
    modalities = architecture.get("input_modalities") if isinstance(architecture, dict) else None
    if (isinstance(modalities, list) and "image" in modalities) or "vision" in listed:
        out.append("vision")
    parameters = entry.get("supported_parameters")
    if (isinstance(parameters, list) and "reasoning" in parameters) or "thinking" in listed:
        out.append("thinking")
    return out


# Ollama's capabilities a backend may list, as Ollama names them: "insert" is left out, as
# trioproxy refuses a suffix; llama.cpp's server says "multimodal" for a model loaded with a
# projector for images (its /api/show fakes Ollama's the same way), Ollama's "vision"
_LISTED_CAPABILITIES = {
    "completion": "completion",
    "tools": "tools",
    "vision": "vision",
    "multimodal": "vision",
    "embedding": "embedding",
    "thinking": "thinking",
}


def listed_capabilities(payload: object) -> dict[str, tuple[str, ...]]:
    """Ollama's capabilities a backend's ``GET /models`` answer gives beside its ``data``,
    by model id: llama.cpp's server lists each model in Ollama's shape too, under
    ``models`` (``name`` and ``model`` its id), with ``capabilities``. Empty for backends
    that send ``data`` alone; anything not a known capability is left out."""
    models = payload.get("models") if isinstance(payload, dict) else None
    if not isinstance(models, list):
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for model in models:
        if not isinstance(model, dict) or not isinstance(model.get("capabilities"), list):
            continue
        name = model.get("model")
        name = name if isinstance(name, str) and name else model.get("name")
        if not isinstance(name, str) or not name:
            continue
        named = (
            _LISTED_CAPABILITIES.get(c) if isinstance(c, str) else None
            for c in model["capabilities"]
        )
        out[name] = tuple(dict.fromkeys(c for c in named if c is not None))
    return out


# Context-window fields some backends add to /models entries (vLLM, llama.cpp, LiteLLM).
_CONTEXT_KEYS = ("context_length", "max_model_len", "context_window", "max_context_length")

# What Ollama reports for a model loaded with the default keep_alive.
_PS_KEEP_ALIVE_NS = 5 * 60 * 1_000_000_000


def ollama_ps(
    models: list[JSONDict], mapper: ModelMapper, *, now_ns: int | None = None
) -> JSONDict:
    """``/api/ps``: every backend model counts as loaded (the backend serves them all), with
    ``expires_at`` = now + Ollama's default keep-alive of 5 minutes."""
    if now_ns is None:
        now_ns = time.time_ns()
    expires = utc_timestamp(now_ns + _PS_KEEP_ALIVE_NS)
    out = []
    for name, entry in _listed(models, mapper, tagged=True):
        declared = mapper.declared(name)
        context = (
            (declared and declared.context_length)
            or _context_length(entry)
            # llama.cpp's server: the window it serves (n_ctx), which may be below the
            # model's trained one (n_ctx_train, what /api/show reports)
            or whole_number(_gguf_meta(entry).get("n_ctx"))
            or 0
        )
        out.append(
            {
                "name": name,
                "model": name,
                "size": 0,
                "digest": _digest(entry["id"]),
                "details": _details(entry["id"], entry),
                "expires_at": expires,
                "size_vram": 0,
                "context_length": context,
            }
        )
    return {"models": out}


def ollama_pull_progress() -> list[JSONDict]:
    """``/api/pull``'s progress lines for a model the backend serves: Ollama's first and
    last (its lines between count the bytes of layers it downloads; there are none).
    ollama-js ends a pull stream at ``status: "success"`` and throws without it."""
    return [{"status": "pulling manifest"}, {"status": "success"}]


def openai_model_entry(
    client_name: str,
    backend_entry: JSONDict | None = None,
    declared: DeclaredModel | None = None,
) -> JSONDict:
    """One OpenAI model object under its client-facing id, with the backend's other
    fields (vLLM's ``max_model_len``, OpenRouter's ``context_length``, pricing: what
    clients size their prompts by; a context window the mapping file ``declared`` in
    those the entry has). ``created`` is always an int (strict SDK validation rejects
    entries without it, as llama-cpp-python's lack it)."""
    entry = backend_entry or {}
    owned_by = entry.get("owned_by")
    backend_id = entry.get("id")
    out = {
        # a field naming the backend's id (vLLM's "root") would undo a model mapping
        **{key: value for key, value in entry.items() if value != backend_id},
        "id": client_name,
        "object": "model",
        "created": _int(entry.get("created")),
        "owned_by": owned_by if isinstance(owned_by, str) and owned_by else "trioproxy",
    }
    if declared is not None and declared.context_length is not None:
        for key in _CONTEXT_KEYS:  # OpenAI's model object has none: no field is added
            if key in out:
                out[key] = declared.context_length
    return out


def openai_model_list(models: list[JSONDict], mapper: ModelMapper) -> JSONDict:
    """Backend ``/models`` ``data`` as a client-facing OpenAI list."""
    return {
        "object": "list",
        "data": [
            openai_model_entry(name, entry, mapper.declared(name))
            for name, entry in _listed(models, mapper)
        ],
    }
