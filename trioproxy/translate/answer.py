"""Response side: a backend's whole (non-stream) answer as the Ollama client's."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from trioproxy.jsonutil import JSONDict, loads, whole_number

from .validation import _is_finite_number, _is_number


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
