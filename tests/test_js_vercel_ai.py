"""The Vercel AI SDK (npm ``ai`` 7.0.173) against a real proxy process, with its providers:
``@ai-sdk/openai-compatible`` 3.0.92 (chat completions on /v1), ``@ai-sdk/openai`` 4.0.118
(the Responses API, its default, and chat completions), and two Ollama providers on
/api/chat: ``ollama-ai-provider-v2`` 4.0.1 (its own NDJSON parsing) and ``ai-sdk-ollama``
4.3.0 (built on ollama-js).

The SDK validates every chunk with zod schemas: a chunk whose shape it refuses becomes an
``error`` stream part (a ``TypeValidationError`` instead of the message), so these tests
look at the parts as well as at the results. Each scenario of tests/js/vercel-ai.mjs runs
one provider whole in one node process (test_js_clients' runner and node modules), against
the demo backend, or against ``ToolsBackend`` for what the demo does not do (parallel tool
calls, reasoning beside them, Responses API function calls).

What the SDK's providers get wrong on their own (against Ollama too) is in
docs/api-compatibility.md ("The Vercel AI SDK"); the tests pin it where it shows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from trioproxy.demo.script import REASONING, TOOL_RESULT_PREFIX

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving
from .test_js_clients import (
    JS_DIR,
    UNKNOWN,
    WEATHER_ARGS,
    Result,
    RunScenario,
    node_modules,  # noqa: F401  (a fixture)
    scenario_runner,
    text,
    tokens,
    vector,
)

SCRIPT = JS_DIR / "vercel-ai.mjs"
OPENAI_UNKNOWN = f"The model `{UNKNOWN}` does not exist or you do not have access to it."
OLLAMA_UNKNOWN = f'model "{UNKNOWN}" not found, try pulling it first'
BROKEN = "the backend connection broke mid-stream: RemoteProtocolError"
EMBEDDED = ("alpha", "beta gamma", "hello world")


@pytest.fixture(scope="module")
def run(node_modules: Path, proxy: ServerProcess) -> RunScenario:  # noqa: F811
    return scenario_runner(proxy.url, SCRIPT)


def stream_of_text(out: Result, n: int, *, reasoning: str = "") -> None:
    """A streamText whole: a delta per token, the finish reason, the usage, no error."""
    assert out["errors"] == []
    assert out["textDeltas"] == tokens(n)
    assert out["reasoning"] == reasoning
    assert out["finishReason"] == "stop"
    assert out["usage"]["output"] == n + (7 if reasoning else 0)  # the demo's reasoning
    assert out["usage"]["input"] > 0
    assert out["types"][-2:] == ["finish-step", "finish"]


def generated_text(out: Result, n: int) -> None:
    assert out["text"] == text(n)
    assert out["finishReason"] == "stop"
    assert out["usage"]["output"] == n and out["usage"]["input"] > 0


def one_tool_call(out: Result) -> None:
    (call,) = out["calls"]
    assert (call["name"], call["input"]) == ("get_weather", WEATHER_ARGS)
    assert call["id"]
    assert out["finishReason"] == "tool-calls"
    assert out["usage"]["output"] > 0


def round_trip(out: Result) -> None:
    """A tool call, its result sent back, the model's answer to the result."""
    first, second = out["steps"]
    assert first["finishReason"] == "tool-calls"
    (call,) = first["calls"]
    assert call["input"] == WEATHER_ARGS
    assert second == {
        "finishReason": "stop",
        "calls": [],
        "text": f"{TOOL_RESULT_PREFIX} sunny in demo",
    }


def embedded(out: Result) -> None:
    assert out["one"] == vector("hello world")
    assert out["many"] == [vector(t) for t in EMBEDDED]
    assert out["oneUsage"] == {"tokens": 2}


def api_call_error(result: Result, status: int, message: str) -> None:
    assert result["name"] == "AI_APICallError", result
    assert result["isAPICallError"] is True
    assert result["statusCode"] == status
    assert result["message"] == message


def quiet(out: Result) -> None:
    """Nothing the SDK had to warn about, nothing a provider printed."""
    assert out["warnings"] == [] and out["console"] == []


# ---- @ai-sdk/openai-compatible -------------------------------------------------------------


def test_openai_compatible_provider(run: RunScenario) -> None:
    out = run("openai-compatible")
    generated_text(out["generate"], 5)
    stream_of_text(out["stream"], 5)
    stream_of_text(out["reasoning"], 3, reasoning=REASONING)  # reasoning_content, streamed
    one_tool_call(out["toolStream"])
    assert out["toolStream"]["types"].count("tool-input-delta") >= 3  # fragments, reassembled
    one_tool_call(out["toolGenerate"])
    round_trip(out["toolRoundTrip"])
    # response_format json_schema: the demo fills in the schema's properties
    assert out["output"] == out["object"] == {"name": "demo", "population": 1}
    embedded(out["embed"])
    unknown = out["unknownModel"]
    api_call_error(unknown["generate"], 404, OPENAI_UNKNOWN)
    (error,) = unknown["stream"]["errors"]
    api_call_error(error, 404, OPENAI_UNKNOWN)
    # a backend that breaks off: the text so far, then the proxy's error event, read as one
    broken = out["midStream"]
    assert broken["textDeltas"] == tokens(3)
    assert [(e["name"], e["message"]) for e in broken["errors"]] == [
        ("AI_StreamProviderError", BROKEN)
    ]
    assert broken["finishReason"] == "error"
    assert [w["setting"] for w in out["warnings"]] == ["generateObject"]  # deprecated in 7
    assert out["console"] == []


# ---- @ai-sdk/openai ------------------------------------------------------------------------


def test_openai_provider_responses_api_and_chat(run: RunScenario) -> None:
    out = run("openai")
    generated_text(out["responsesGenerate"], 5)
    stream_of_text(out["responsesStream"], 5)
    unknown = out["responsesUnknownModel"]
    api_call_error(unknown["generate"], 404, OPENAI_UNKNOWN)
    (error,) = unknown["stream"]["errors"]
    api_call_error(error, 404, OPENAI_UNKNOWN)
    generated_text(out["chatGenerate"], 5)
    stream_of_text(out["chatStream"], 5)
    reasoned = out["chatReasoning"]  # openai.chat reads no reasoning_content: counted only
    assert reasoned["text"] == text(3) and reasoned["usage"]["output"] == 3 + 7
    one_tool_call(out["chatToolStream"])
    round_trip(out["chatToolRoundTrip"])
    # A stream the backend breaks off: the text so far, then the proxy's error event, in
    # the Responses API's own shape on a Responses stream (chat completions' {"error": ...}
    # failed the SDK's schema there: a TypeValidationError quoting the schema, not the
    # proxy's message).
    for name in ("responsesMidStream", "chatMidStream"):
        broken = out[name]
        assert broken["textDeltas"] == tokens(3), name
        assert [e["message"] for e in broken["errors"]] == [BROKEN], (name, broken["errors"])
        assert broken["finishReason"] == "error", name
    embedded(out["embed"])
    quiet(out)


# ---- Ollama providers on /api/chat ---------------------------------------------------------


@pytest.mark.parametrize("provider", ["ollama-v2", "ai-sdk-ollama"])
def test_ollama_providers(run: RunScenario, provider: str) -> None:
    out = run(provider)
    generated_text(out["generate"], 5)
    stream_of_text(out["stream"], 5)
    # the SDK's reasoning setting: "high" is think (ollama-ai-provider-v2: true, with a
    # warning that it has no levels; ai-sdk-ollama: "high"), "none" is think: false
    for name in ("think", "thinkStream"):
        assert out[name]["reasoning"] == REASONING, name
        assert out[name]["text"] == text(3), name
    assert out["noThink"]["reasoning"] is None and out["noThink"]["text"] == text(3)
    one_tool_call(out["toolStream"])
    round_trip(out["toolRoundTrip"])
    assert out["output"] == {"name": "demo", "population": 1}  # format: a JSON schema
    embedded(out["embed"])
    unknown = out["unknownModel"]
    errors = [unknown["generate"], *unknown["stream"]["errors"]]
    assert len(errors) == 2
    if provider == "ai-sdk-ollama":
        assert out["console"] == []
        # maxOutputTokens is num_predict: cut, and said so
        assert out["short"]["text"] == text(2) and out["short"]["finishReason"] == "length"
        for error in errors:  # ollama-js's ResponseError, as OllamaError
            assert (error["name"], error["message"]) == ("OllamaError", OLLAMA_UNKNOWN)
        assert out["warnings"] == []
        return
    # ollama-ai-provider-v2's own faults (Ollama answers the same): it sends maxOutputTokens
    # as a top-level max_output_tokens that Ollama ignores (no num_predict) ...
    assert out["short"]["text"] == text(9) and out["short"]["finishReason"] == "stop"
    # ... and reads Ollama's error body ({"error": "..."}) as OpenAI's, so the message is
    # the status text; the body keeps Ollama's message
    for error in errors:
        api_call_error(error, 404, "Not Found")
        assert json.loads(error["responseBody"]) == {"error": OLLAMA_UNKNOWN}
    thinking = (
        'Ollama only supports on/off thinking; reasoning effort "high" was mapped to think=true'
    )
    assert [w["message"] for w in out["warnings"] if w["type"] == "other"] == [thinking] * 2
    # Its completion model (/api/generate) requires `context` on the done line, as Ollama
    # sends it ...
    completion = out["completion"]
    assert completion["ok"] is True, completion
    generated_text(completion["value"], 4)
    # ... and, streamed, on every line, which Ollama does not send: it drops every line
    # but the last (with a console error each), and the text is lost
    lost = out["completionStream"]
    assert lost["text"] == "" and lost["finishReason"] == "stop" and lost["errors"] == []
    assert len(out["console"]) == 4
    assert all(line.startswith("Failed to parse NDJSON line") for line in out["console"])


# ---- parallel tool calls from a scripted backend -------------------------------------------


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tools",
            "choices": [choice]}  # fmt: skip


def _call(index: int, args: str, id: str | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if id is not None:
        call |= {"id": id, "type": "function"}
        call["function"]["name"] = "get_weather"
    return {"tool_calls": [call]}


# two calls interleaved, their arguments in fragments, after reasoning and text
CALLS = {"call_paris": {"city": "Paris", "days": 2}, "call_rome": {"city": "Rome", "days": 3}}
USAGE = {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}
PARALLEL = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"reasoning_content": "Two cities."}),
    _chunk({"content": "Checking."}),
    _chunk(_call(0, '{"city": "Pa', "call_paris")),
    _chunk(_call(1, '{"city": "Ro', "call_rome")),
    _chunk(_call(0, 'ris", "days": 2}')),
    _chunk(_call(1, 'me", "days": 3}')),
    _chunk({}, "tool_calls"),
    {**_chunk({}), "choices": [], "usage": USAGE},
]
ANSWER = "Done."


def _function_call(index: int, call_id: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{index}", "call_id": call_id,
            "name": "get_weather", "arguments": arguments, "status": status}  # fmt: skip


def _response(status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    usage = {"input_tokens": 12, "output_tokens": 9, "total_tokens": 21,
             "input_tokens_details": {"cached_tokens": 0},
             "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
    return {"id": "resp_1", "object": "response", "created_at": 1, "model": "tools",
            "status": status, "output": output, "usage": usage}  # fmt: skip


def _responses_events() -> list[dict[str, Any]]:
    """The Responses API's stream of two function calls, as OpenAI writes it."""
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": _response("in_progress", [])}
    ]
    items = []
    for index, (call_id, args) in enumerate(CALLS.items()):
        arguments = json.dumps(args)
        half = len(arguments) // 2
        item = _function_call(index, call_id, arguments, "completed")
        items.append(item)
        events += [
            {"type": "response.output_item.added", "output_index": index,
             "item": _function_call(index, call_id, "", "in_progress")},
            *({"type": "response.function_call_arguments.delta", "item_id": f"fc_{index}",
               "output_index": index, "delta": part}
              for part in (arguments[:half], arguments[half:])),
            {"type": "response.function_call_arguments.done", "item_id": f"fc_{index}",
             "output_index": index, "arguments": arguments},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]  # fmt: skip
    events.append({"type": "response.completed", "response": _response("completed", items)})
    return [{**event, "sequence_number": n} for n, event in enumerate(events)]


def _answered(body: dict[str, Any]) -> bool:
    """The request carries the tools' results: the model answers them."""
    last = (body.get("messages") or body.get("input") or [{}])[-1]
    return last.get("role") == "tool" or last.get("type") == "function_call_output"


def _pairs(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The ids of the calls in a request's history, and of the calls its results answer."""
    if "input" in body:  # the Responses API's items
        items = body["input"]
        calls = [i["call_id"] for i in items if i.get("type") == "function_call"]
        return calls, [i["call_id"] for i in items if i.get("type") == "function_call_output"]
    messages = body["messages"]
    calls = [c["id"] for m in messages for c in m.get("tool_calls") or []]
    return calls, [m["tool_call_id"] for m in messages if m["role"] == "tool"]


# the model the Responses API answers with one JSON response, streamed or not
JSON_ONLY = "tools-json"


class ToolsBackend(ScriptedHandler):
    """Model ``tools``: asked with tools, two parallel calls (chat completions: streamed
    interleaved after reasoning and text, or whole; Responses API: function calls); asked
    with their results, ANSWER. ``tools-json`` (JSON_ONLY) the same, but its Responses
    API streams are one JSON response (a backend that ignores ``stream``). ``asked`` holds
    the bodies (path, body)."""

    asked: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_GET(self) -> None:
        self.answer(200, b'{"object": "list", "data": [{"id": "tools"}]}')

    def do_POST(self) -> None:
        body = self.json_body()
        self.asked.append((self.path, body))
        if self.path.endswith("/responses"):
            self._responses(body)
        elif _answered(body):
            self._completion({"role": "assistant", "content": ANSWER}, "stop")
        elif body.get("stream"):
            self._events([*PARALLEL, "[DONE]"])
        else:
            calls = [{"id": call_id, "type": "function",
                      "function": {"name": "get_weather", "arguments": json.dumps(args)}}
                     for call_id, args in CALLS.items()]  # fmt: skip
            message = {"role": "assistant", "content": "Checking.",
                       "reasoning_content": "Two cities.", "tool_calls": calls}  # fmt: skip
            self._completion(message, "tool_calls")

    def _responses(self, body: dict[str, Any]) -> None:
        if _answered(body):
            part = {"type": "output_text", "text": ANSWER, "annotations": []}
            message = {"type": "message", "id": "msg_1", "role": "assistant",
                       "status": "completed", "content": [part]}  # fmt: skip
            self.answer(200, json.dumps(_response("completed", [message])).encode())
        elif body.get("stream") and body["model"] != JSON_ONLY:
            self._events(_responses_events())
        else:
            self.answer(200, json.dumps(_responses_events()[-1]["response"]).encode())

    def _completion(self, message: dict[str, Any], finish: str) -> None:
        choice = {"index": 0, "message": message, "finish_reason": finish}
        answer = {"id": "x", "object": "chat.completion", "created": 1, "model": "tools",
                  "choices": [choice], "usage": USAGE}  # fmt: skip
        self.answer(200, json.dumps(answer).encode())

    def _events(self, events: list[Any]) -> None:
        data = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
        self.answer(200, data.encode(), "text/event-stream")


@pytest.fixture(scope="module")
def tools_proxy(
    node_modules: Path,  # noqa: F811
    start_proxy: Callable[..., ServerProcess],
) -> Iterator[ServerProcess]:
    with serving(ToolsBackend) as url:
        yield start_proxy(url, MAX_RETRIES="0")


def test_parallel_tool_calls_in_every_provider(tools_proxy: ServerProcess) -> None:
    """Two calls the backend streams interleaved, in fragments, after reasoning and text:
    every provider gets both, whole, with the backend's ids (ai-sdk-ollama makes its own),
    the finish reason and the usage; their results go back paired with their calls. The
    Responses API's provider too when the backend answers its stream with one JSON
    response (the proxy streams it as that API's events)."""
    ToolsBackend.asked.clear()
    out = scenario_runner(tools_proxy.url, SCRIPT)("parallel-tools")
    quiet(out)
    providers = ("compatible", "openaiChat", "openaiResponses", "openaiResponsesJson",
                 "ollamaV2", "aiSdkOllama")  # fmt: skip
    for provider in providers:
        stream = out[provider]["stream"]
        assert stream["errors"] == [], provider
        assert [c["input"] for c in stream["calls"]] == list(CALLS.values()), provider
        assert not any(c["invalid"] for c in stream["calls"]), provider
        assert stream["finishReason"] == "tool-calls", provider
        assert stream["usage"] == {"input": 12, "output": 9}, provider
        trip = out[provider]["roundTrip"]
        assert trip["ok"] is True, (provider, trip)
        value = trip["value"]
        assert [c["input"] for c in value["calls"]] == list(CALLS.values()), provider
        assert value["firstFinish"] == "tool-calls", provider
        assert value["text"] == ANSWER, provider
        if provider != "aiSdkOllama":  # it makes its own ids (Ollama's calls may have none)
            assert [c["id"] for c in stream["calls"]] == list(CALLS), provider
            assert [c["id"] for c in value["calls"]] == list(CALLS), provider
    # each provider sent the results back, each answering its call, in order
    answers = [_pairs(body) for _, body in ToolsBackend.asked if _answered(body)]
    assert len(answers) == len(providers)
    for calls, results in answers:
        assert len(calls) == 2 and results == calls
    # reasoning beside the calls reaches the providers that read it
    assert out["compatible"]["stream"]["reasoning"] == "Two cities."
    assert out["aiSdkOllama"]["stream"]["reasoning"] == "Two cities."
    assert out["ollamaV2"]["stream"]["reasoning"] == ""  # it sends think: false by default
    assert out["compatible"]["stream"]["text"] == "Checking."
