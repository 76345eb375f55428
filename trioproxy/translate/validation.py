"""A client's body checked before anything is built from it: a client mistake is a
:class:`RequestValidationError` (its 400), never an error further in."""

from __future__ import annotations

import math
from json.encoder import encode_basestring as _encode_str
from typing import TypeGuard

from trioproxy.jsonutil import JSONDict

# Ollama's think levels as OpenAI's reasoning_effort. "max" is "high": the highest effort
# every reasoning backend accepts (OpenAI's "xhigh" exists on a few models only, and an
# unknown effort is a 400 from the backend). Booleans carry no effort and are not sent.
_THINK_LEVELS = {"low": "low", "medium": "medium", "high": "high", "max": "high"}


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
