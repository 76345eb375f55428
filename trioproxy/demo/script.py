"""Pure, deterministic pieces of the demo backend: directives, replies, token counts, embeddings.

Nothing here does I/O or looks at the clock, so every function can be unit-tested on its own and
the same request always yields the same reply (the proxy's tests compare streamed and non-streamed
text byte for byte).

Directives are test hooks written *inside the conversation text* because the proxy forwards request
bodies untouched; see :mod:`trioproxy.demo` for the list.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

CHAT_MODELS = frozenset({"demo-chat", "demo-reasoner"})
EMBED_MODELS = frozenset({"demo-embed"})
MODEL_IDS = ("demo-chat", "demo-reasoner", "demo-embed")

EMBED_DIMENSIONS = 8
MAX_EMBED_DIMENSIONS = 4096
MAX_EMBED_INPUTS = 2048  # OpenAI's caps on one /embeddings request
MAX_EMBED_TOKENS = 300_000  # summed over its inputs (here a token is a word)

PASSAGE = (
    "Hello from the trioproxy demo backend! This friendly reply is generated one word at a time, "
    "so you can watch tokens flow through the proxy. Nothing here comes from a real model: the "
    "words are always the same, which keeps tests deterministic and benchmarks fair. If you can "
    "read this sentence, streaming works end to end. Have a wonderful day, and happy hacking!"
)
REASONING = "Let me think about a friendly answer."
TOOL_RESULT_PREFIX = "Thanks! The tool returned:"

# Compiled once at import: per-request regex compilation would show up in the benchmarks.
_DIRECTIVE_RE = re.compile(r"\[\[([a-z_]+)(?:=([^\[\]]*))?\]\]")
# A token is a word together with the whitespace before it, so "".join(tokens) rebuilds the text.
_TOKEN_RE = re.compile(r"\s*\S+")


def _env_token_delay() -> float:
    return float(os.environ.get("DEMO_TOKEN_DELAY", "0.02"))


@dataclass(slots=True)
class DemoSettings:
    """Pacing and size of the demo replies (directives in a request override them)."""

    token_delay: float = field(default_factory=_env_token_delay)  # s between streamed tokens
    first_token_delay: float = 0.0  # s before the first content token of a reply
    default_tokens: int = 24  # reply length when neither max_tokens nor [[tokens]] says otherwise


_INT_DIRECTIVES = frozenset(
    {"tokens", "stall_after", "drop_after", "status", "fail_first", "fail_status"}
)
_FLOAT_DIRECTIVES = frozenset({"delay", "first_delay"})
_FLAG_DIRECTIVES = frozenset({"close_connection"})


class BadRequest(ValueError):
    """The request cannot be answered; the app turns it into an OpenAI 400 error body."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class DirectiveError(BadRequest):
    """A `[[...]]` directive is unknown or has a bad value."""


def token_limit(body: dict[str, Any], *names: str) -> int | None:
    """The first of *names* present in *body* as a non-negative int (None when none is given)."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"{name} must be a non-negative integer", param=name)
        return value
    return None


@dataclass(slots=True)
class Directives:
    """Test hooks parsed from the request text; None means "not given"."""

    tokens: int | None = None
    delay: float | None = None
    first_delay: float | None = None
    stall_after: int | None = None
    drop_after: int | None = None
    status: int | None = None
    fail_first: int | None = None
    fail_status: int = 503
    close_connection: bool = False


_NO_DIRECTIVES = Directives()


def parse_directives(text: str) -> Directives:
    """Parse every `[[name=value]]` / `[[name]]` in *text*; raise DirectiveError on a bad one."""
    if "[[" not in text:  # the common case, and by far the cheapest check
        return _NO_DIRECTIVES
    found = Directives()
    for name, value in _DIRECTIVE_RE.findall(text):
        setattr(found, name, _directive_value(name, value))
    for name in ("status", "fail_status"):
        code = getattr(found, name)
        if code is not None and not 400 <= code <= 599:
            raise DirectiveError(f"directive [[{name}]] must be an HTTP error status (400-599)")
    return found


def _directive_value(name: str, value: str) -> int | float | bool:
    if name in _FLAG_DIRECTIVES:
        if value:
            raise DirectiveError(f"demo directive [[{name}]] takes no value")
        return True
    try:
        if name in _INT_DIRECTIVES:
            number: int | float = int(value)
        elif name in _FLOAT_DIRECTIVES:
            number = float(value)
        else:
            raise DirectiveError(f"unknown demo directive [[{name}]]")
    except ValueError as exc:
        if isinstance(exc, DirectiveError):
            raise
        raise DirectiveError(f"bad value for demo directive [[{name}={value}]]") from None
    if not 0 <= number < math.inf:  # also rejects NaN
        raise DirectiveError(f"demo directive [[{name}]] must be a finite, non-negative number")
    return number


def content_text(content: Any) -> str:
    """The text of a message `content`: a string, a list of parts, or None (tool-call turns)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def count_words(text: str) -> int:
    return len(text.split())


def prompt_tokens(messages: list[Any]) -> int:
    """Deterministic prompt size: words across all message contents."""
    return sum(count_words(content_text(m.get("content"))) for m in messages if isinstance(m, dict))


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


_PASSAGE_TOKENS: tuple[str, ...] = tuple(tokenize(PASSAGE))
REASONING_TOKENS: tuple[str, ...] = tuple(tokenize(REASONING))


@lru_cache(maxsize=256)
def passage_tokens(n: int) -> tuple[str, ...]:
    """The first *n* tokens of the passage, wrapping around (with a space) when it runs out."""
    base = _PASSAGE_TOKENS
    if n <= len(base):
        return base[:n]
    wrapped = (" " + base[0], *base[1:])
    out = list(base)
    while len(out) < n:
        out.extend(wrapped[: n - len(out)])
    return tuple(out)


@lru_cache(maxsize=256)
def passage_text_json(n: int) -> str:
    """JSON-encoded passage text of *n* tokens; cached because most requests share a length."""
    return json.dumps("".join(passage_tokens(n)))


def example_value(schema: Any) -> Any:
    """A deterministic value that satisfies a (simple) JSON-schema node."""
    if not isinstance(schema, dict):
        return None
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):  # e.g. ["string", "null"]: take the first non-null type
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return "demo"
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return True
    return None


def example_object(schema: Any) -> dict[str, Any]:
    """An object with every declared property (required ones first) filled by example_value."""
    if not isinstance(schema, dict):
        return {}
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    required = schema.get("required")
    names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
    names += [n for n in props if n not in names]
    return {name: example_value(props.get(name)) for name in names}


def split_arguments(arguments: str) -> list[str]:
    """Split a tool call's arguments string into >= 3 fragments (when it is long enough)."""
    size = max(1, math.ceil(len(arguments) / 4))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


@dataclass(slots=True)
class ToolCallPlan:
    name: str
    arguments: str


@dataclass(slots=True)
class ChatPlan:
    """Everything the app needs to answer one chat request, decided up front."""

    content: tuple[str, ...] = ()
    reasoning: tuple[str, ...] = ()
    tool_call: ToolCallPlan | None = None
    finish_reason: str = "stop"

    @property
    def completion_tokens(self) -> int:
        # reasoning tokens are completion tokens too (OpenAI counts them in both)
        if self.tool_call is not None:
            return len(split_arguments(self.tool_call.arguments)) + len(self.reasoning)
        return len(self.content) + len(self.reasoning)


def _pick_tool(tools: Any, tool_choice: Any) -> dict[str, Any] | None:
    """The function to call, honouring tool_choice ("none" or a named function)."""
    if not isinstance(tools, list) or not tools or tool_choice == "none":
        return None
    functions: list[dict[str, Any]] = [
        t["function"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)
    ]
    if isinstance(tool_choice, dict):
        named = tool_choice.get("function")
        if not isinstance(named, dict):  # OpenAI's answer to {"function": "w"}
            raise BadRequest("tool_choice.function must be an object", param="tool_choice")
        wanted = named.get("name")
        for fn in functions:
            if fn.get("name") == wanted:
                return fn
    return functions[0] if functions else None


def _json_reply(response_format: Any) -> str | None:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return json.dumps({"message": "hello from the demo backend", "ok": True})
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        obj = example_object(schema) or {"message": "hello from the demo backend"}
        return json.dumps(obj)
    return None


def _reasons(body: dict[str, Any]) -> bool:
    """demo-reasoner reasons unless told not to as vLLM, SGLang and llama.cpp's server
    tell a model with a Qwen3-style chat template: ``chat_template_kwargs.enable_thinking``
    false."""
    if body.get("model") != "demo-reasoner":
        return False
    switches = body.get("chat_template_kwargs")
    return not (isinstance(switches, dict) and switches.get("enable_thinking") is False)


def answered_message(messages: list[Any]) -> dict[str, Any]:
    """The message a reply answers: the last one, passing over system messages after it
    (Claude Code appends its environment as one after the prompt, and a model answers the
    turn such a note follows); ``{}`` when that is no object."""
    for message in reversed(messages):
        if not isinstance(message, dict):
            return {}
        if message.get("role") not in ("system", "developer"):
            return message
    return messages[-1] if messages and isinstance(messages[-1], dict) else {}


def plan_chat(
    body: dict[str, Any], messages: list[Any], directives: Directives, default_tokens: int
) -> ChatPlan:
    """Decide the reply to a chat request (see the module docstring of trioproxy.demo)."""
    reasoning = REASONING_TOKENS if _reasons(body) else ()
    last = answered_message(messages)
    if last.get("role") != "tool":
        fn = _pick_tool(body.get("tools"), body.get("tool_choice"))
        if fn is not None:
            arguments = json.dumps(example_object(fn.get("parameters")))
            call = ToolCallPlan(name=str(fn.get("name", "tool")), arguments=arguments)
            return ChatPlan(reasoning=reasoning, tool_call=call, finish_reason="tool_calls")
    limit = token_limit(body, "max_completion_tokens", "max_tokens")
    if last.get("role") == "tool":
        content = tuple(tokenize(f"{TOOL_RESULT_PREFIX} {content_text(last.get('content'))}"))
    elif (json_text := _json_reply(body.get("response_format"))) is not None:
        content = tuple(tokenize(json_text))
    else:
        wanted = directives.tokens if directives.tokens is not None else default_tokens
        if limit is not None and limit < wanted:
            return ChatPlan(passage_tokens(limit), reasoning, finish_reason="length")
        content = passage_tokens(wanted)
    if limit is not None and limit < len(content):
        return ChatPlan(content[:limit], reasoning, finish_reason="length")
    return ChatPlan(content, reasoning)


def plan_response(
    body: dict[str, Any], directives: Directives, default_tokens: int
) -> tuple[tuple[str, ...], str]:
    """Tokens and how the reply ends ("stop", or "length" when ``max_output_tokens`` cut
    it) for the Responses API endpoint."""
    return plan_completion(body, directives, default_tokens, limit_field="max_output_tokens")


def plan_completion(
    body: dict[str, Any],
    directives: Directives,
    default_tokens: int,
    limit_field: str = "max_tokens",
) -> tuple[tuple[str, ...], str]:
    """Tokens and finish_reason for the legacy /v1/completions endpoint."""
    limit = token_limit(body, limit_field)
    wanted = directives.tokens if directives.tokens is not None else default_tokens
    if limit is None or limit >= wanted:
        return passage_tokens(wanted), "stop"
    return passage_tokens(limit), "length"


MAX_TOP_LOGPROBS = 20  # OpenAI's bound
# what the demo "almost said" instead, for top_logprobs (never the token itself)
_ALTERNATIVES = (
    *(" " + word for word in "the a and to of is it that in you for with on this be are".split()),
    ",",
    ".",
    "!",
    "?",
)


def logprobs_wanted(body: dict[str, Any]) -> int | None:
    """How many alternatives per token a chat request asks for (``top_logprobs``), or None
    when it asks for no log probabilities (``logprobs`` not true), as OpenAI reads them."""
    top = body.get("top_logprobs")
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS
    ):
        raise BadRequest(
            f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}",
            param="top_logprobs",
        )
    if body.get("logprobs") is not True:
        return None
    return top or 0


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound on the legacy /completions' logprobs


def completion_logprobs_wanted(body: dict[str, Any]) -> int | None:
    """How many alternatives per token a legacy ``/completions`` request asks for (its
    ``logprobs`` is an integer), or None when it asks for none."""
    top = body.get("logprobs")
    if top is None:
        return None
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_COMPLETION_LOGPROBS:
        raise BadRequest(
            f"logprobs must be an integer between 0 and {MAX_COMPLETION_LOGPROBS}",
            param="logprobs",
        )
    return top


def completion_logprobs(
    tokens: tuple[str, ...], top: int, position: int = 0, start: int = 0
) -> dict[str, Any]:
    """A legacy text completion's made-up ``logprobs`` for ``tokens`` (the answer's from
    its ``position``-th token on, at character ``start``), the same numbers as a chat's:
    ``top_logprobs`` holds the ``top`` likeliest and, as vLLM's, the chosen token (alone
    for 0)."""
    entries = [token_logprob(tok, position + i, top) for i, tok in enumerate(tokens)]
    offsets = []
    for tok in tokens:
        offsets.append(start)
        start += len(tok)
    return {
        "tokens": list(tokens),
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": [
            {alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]}
            or {entry["token"]: entry["logprob"]}
            for entry in entries
        ],
        "text_offset": offsets,
    }


def token_logprob(token: str, position: int, top: int) -> dict[str, Any]:
    """A made-up, deterministic ``logprobs.content[]`` entry in OpenAI's shape for the
    token at ``position``: the token first among its ``top`` alternatives, each less
    likely than the last."""
    logprob = -round(((position * 37) % 97 + 1) / 100, 2)  # -0.01 .. -0.97

    def entry(text: str, value: float) -> dict[str, Any]:
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    alternatives = [entry(token, logprob)]
    others = (alt for alt in _ALTERNATIVES if alt != token)
    for rank, alt in zip(range(1, top), others, strict=False):
        alternatives.append(entry(alt, round(logprob - 1.5 * rank, 2)))
    return {**entry(token, logprob), "top_logprobs": alternatives[:top]}


def embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector derived from a hash of *text*.

    Values are rounded to float32 so the float and base64 encodings carry identical numbers.
    """
    raw: list[float] = []
    counter = 0
    # a lone surrogate (a client's "\ud83d" escape) has no UTF-8 spelling: hashed as is
    data = text.encode("utf-8", "surrogatepass")
    while len(raw) < dimensions:
        digest = hashlib.sha256(counter.to_bytes(4, "little") + data).digest()
        raw.extend(v / 2**31 - 1.0 for v in struct.unpack("<8I", digest))
        counter += 1
    raw = raw[:dimensions]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in raw))
    return list(struct.unpack(f"<{dimensions}f", packed))


def pack_float32(vector: list[float]) -> bytes:
    """Little-endian float32, the layout the openai SDK decodes for encoding_format=base64."""
    return struct.pack(f"<{len(vector)}f", *vector)
