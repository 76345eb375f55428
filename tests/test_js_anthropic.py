"""The JavaScript clients of the Anthropic Messages API (``/v1/messages``) against a real proxy
process: the official SDK ``@anthropic-ai/sdk`` 1.16.0 and the Vercel AI SDK's provider
``@ai-sdk/anthropic`` 4.0.105 (with ``ai`` 7.0.173), which JS tools point at Ollama-compatible
servers as they point them at Anthropic.

tests/js/anthropic.mjs drives both in one node process (scenario ``demo``) against the demo
backend, and prints what they returned, every answer's usage as they read it included; the
tests check the report, and the proxy's metrics against that usage. Scenario ``parallel-tools``
drives both against test_js_vercel_ai's ``ToolsBackend`` (reasoning, text and two calls the
backend interleaves). The runner and the node modules are test_js_clients'.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from trioproxy.demo.script import REASONING, TOOL_RESULT_PREFIX

from .conftest import ServerProcess
from .test_js_clients import (
    JS_DIR,
    WEATHER_ARGS,
    Result,
    node_modules,  # noqa: F401  (a fixture)
    scenario_runner,
    text,
    tokens,
)
from .test_js_vercel_ai import (
    ANSWER,
    BROKEN,
    CALLS,
    OPENAI_UNKNOWN,
    ToolsBackend,
    _answered,
    _pairs,
    tools_proxy,  # noqa: F401  (a fixture: a proxy of this module's own, on ToolsBackend)
)
from .test_metrics_e2e import scrape, total, wait_for

SCRIPT = JS_DIR / "anthropic.mjs"
ROUTE = {"api": "anthropic", "endpoint": "v1_messages"}
CITY = {"name": "demo", "population": 1}  # the demo's answer to the scripts' city schema


@pytest.fixture(scope="module")
def server(
    node_modules: Path,  # noqa: F811
    demo_backend: ServerProcess,
    start_proxy: Callable[..., ServerProcess],
) -> ServerProcess:
    """A proxy of this module's own: its metrics count only the script's requests."""
    return start_proxy(demo_backend.url, MAX_RETRIES="0")


@pytest.fixture(scope="module")
def report(server: ServerProcess) -> Result:
    return scenario_runner(server.url, SCRIPT)("demo")


@pytest.fixture(scope="module")
def sdk(report: Result) -> Result:
    return report["sdk"]


@pytest.fixture(scope="module")
def ai_sdk(report: Result) -> Result:
    return report["aiSdk"]


def assert_message(
    message: Result, text_: str, *, stop: str = "end_turn", model: str = "demo-chat"
) -> None:
    assert message["id"].startswith("msg_")
    assert (message["type"], message["role"], message["model"]) == ("message", "assistant", model)
    assert message["content"] == [{"type": "text", "text": text_}]
    assert (message["stop_reason"], message["stop_sequence"]) == (stop, None)
    assert message["usage"]["input_tokens"] > 0


def sdk_error(result: Result, constructor: str, status: int | None, kind: str) -> str:
    """The SDK's typed error, with the status and Anthropic's error body; its message."""
    assert result["ok"] is False, result
    assert (result["constructor"], result["isAPIError"]) == (constructor, True), result
    assert result["status"] == status
    # the id the SDK read (request-id, Anthropic's name), the proxy's X-Request-ID
    assert result["requestID"] and result["requestID"] == result["proxyRequestID"], result
    body = result["error"]
    assert body["type"] == "error" and body["error"]["type"] == kind
    message: str = body["error"]["message"]
    return message


# ---- @anthropic-ai/sdk ---------------------------------------------------------------------


def test_sdk_create(sdk: Result) -> None:
    assert_message(sdk["create"], text(5))
    assert sdk["create"]["usage"]["output_tokens"] == 5
    # a system prompt as text blocks (with cache_control, dropped) as well as a string
    assert_message(sdk["systemBlocks"], text(2))
    assert sdk["systemBlocks"]["usage"] == sdk["create"]["usage"] | {"output_tokens": 2}
    assert_message(sdk["maxTokens"], text(3), stop="max_tokens")


def test_sdk_reads_the_proxys_request_ids(sdk: Result) -> None:
    """A message's ``_request_id``, the raw response's and a stream's ``request_id`` (the
    errors' ``requestID``: ``sdk_error``): the proxy's X-Request-ID, not undefined."""
    ids = sdk["requestIds"]
    assert ids["proxy"] and ids["message"] == ids["response"] == ids["proxy"], ids
    assert ids["streamProxy"] and ids["stream"] == ids["streamProxy"], ids


def test_sdk_stream_text_events_and_final_message(sdk: Result) -> None:
    stream = sdk["stream"]
    assert stream["textDeltas"] == tokens(5)  # `text` events, token by token
    assert stream["textSnapshotsGrow"] is True
    events = stream["events"]
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[2:-3] == ["content_block_delta"] * 5
    final = stream["final"]
    assert_message(final, text(5))
    assert final["usage"] == sdk["create"]["usage"]  # the same prompt, streamed or not
    # messages.create with stream: true, iterated raw
    assert sdk["rawEvents"][0] == "message_start" and sdk["rawEvents"][-1] == "message_stop"


def test_sdk_thinking(sdk: Result) -> None:
    final = sdk["thinking"]["final"]
    assert final["content"] == [
        {"type": "thinking", "thinking": REASONING, "signature": ""},
        {"type": "text", "text": text(3)},
    ]
    assert sdk["thinking"]["textDeltas"] == tokens(3)


@pytest.mark.parametrize("name", ["toolRoundTrip", "toolStreamRoundTrip"])
def test_sdk_tool_round_trip(sdk: Result, name: str) -> None:
    first, second = sdk[name]["first"], sdk[name]["second"]
    (call,) = first["final"]["content"]
    assert call["type"] == "tool_use" and call["name"] == "get_weather"
    assert call["input"] == WEATHER_ARGS and call["id"]
    assert first["final"]["stop_reason"] == "tool_use"
    if name == "toolStreamRoundTrip":
        # input_json deltas in pieces, each parsed by the SDK as it came
        pieces = first["inputJson"]
        assert len(pieces) > 1 and "".join(pieces) == '{"city":"demo","days":1}'
        assert first["inputSnapshots"][-1] == WEATHER_ARGS
    assert_message(second["final"], f"{TOOL_RESULT_PREFIX} sunny, 21 C")


@pytest.mark.parametrize("name", ["toolRunner", "toolRunnerStream"])
def test_sdk_beta_tool_runner(sdk: Result, name: str) -> None:
    """The SDK's tool runner (the beta namespace: /v1/messages?beta=true) runs the tool and
    asks again until the model answers."""
    call, answer = sdk[name]
    assert [(b["type"], b["name"], b["input"]) for b in call] == [
        ("tool_use", "get_weather", {"city": "demo"})
    ]
    assert answer == [{"type": "text", "text": f"{TOOL_RESULT_PREFIX} sunny in demo"}]


def test_sdk_parse_structured_output(sdk: Result) -> None:
    """messages.parse with a zod output format: output_config.format reaches the backend as
    response_format, and the SDK reads the JSON it answers (it was dropped: prose, which the
    SDK failed to parse)."""
    assert sdk["parse"] == {"ok": True, "value": CITY}


def test_sdk_errors_are_typed(sdk: Result) -> None:
    for name in ("unknownModel", "unknownModelStream"):
        assert sdk_error(sdk[name], "NotFoundError", 404, "not_found_error") == OPENAI_UNKNOWN
    message = sdk_error(sdk["badRequest"], "BadRequestError", 400, "invalid_request_error")
    assert "'max_tokens'" in message
    message = sdk_error(sdk["rateLimited"], "RateLimitError", 429, "rate_limit_error")
    assert "simulated HTTP 429" in message
    # a failure after the stream began: the error event, raised (no status: the 200 was sent)
    assert sdk_error(sdk["midStream"], "APIError", None, "api_error") == BROKEN
    message = sdk_error(sdk["countTokens"], "NotFoundError", 404, "not_found_error")
    assert "count_tokens" in message


# ---- @ai-sdk/anthropic ---------------------------------------------------------------------


def test_ai_sdk_generate_text(ai_sdk: Result) -> None:
    out = ai_sdk["generate"]  # with a system prompt
    assert (out["text"], out["finishReason"]) == (text(5), "stop")
    assert out["usage"]["output"] == 5 and out["usage"]["input"] > 0
    # without maxOutputTokens the provider sends 4,096 for a model it does not know, and warns
    assert ai_sdk["generateDefaultLimit"]["text"] == text(2)


def test_ai_sdk_stream_text(ai_sdk: Result) -> None:
    out = ai_sdk["stream"]
    assert out["errors"] == []
    assert out["textDeltas"] == tokens(5)
    assert out["finishReason"] == "stop"
    assert out["usage"]["output"] == 5 and out["usage"]["input"] > 0
    assert out["types"][-2:] == ["finish-step", "finish"]
    reasoned = ai_sdk["reasoning"]  # the SDK's reasoning setting: thinking enabled
    assert (reasoned["reasoning"], "".join(reasoned["textDeltas"])) == (REASONING, text(3))
    assert reasoned["usage"]["output"] == 3 + 7  # the demo's reasoning counts


def test_ai_sdk_tool_calls(ai_sdk: Result) -> None:
    streamed = ai_sdk["toolStream"]
    assert streamed["errors"] == []
    (call,) = streamed["calls"]
    assert (call["name"], call["input"]) == ("get_weather", WEATHER_ARGS)
    assert len(streamed["inputDeltas"]) > 1  # input_json_delta pieces, reassembled
    assert streamed["finishReason"] == "tool-calls"
    first, second = ai_sdk["toolRoundTrip"]["steps"]
    assert first["finishReason"] == "tool-calls"
    assert [c["input"] for c in first["calls"]] == [WEATHER_ARGS]
    answer = f"{TOOL_RESULT_PREFIX} sunny in demo"
    assert second == {"finishReason": "stop", "calls": [], "text": answer}
    # streamed, both steps
    trip = ai_sdk["toolStreamRoundTrip"]
    assert trip["errors"] == [] and "".join(trip["textDeltas"]) == answer
    assert trip["finishReason"] == "stop"


@pytest.mark.parametrize("mode", ["outputJsonTool", "outputFormat"])
def test_ai_sdk_structured_output(ai_sdk: Result, mode: str) -> None:
    """Output.object by the provider's JSON tool, or by output_config.format."""
    assert ai_sdk[mode] == {"ok": True, "value": CITY}


def test_ai_sdk_errors(ai_sdk: Result) -> None:
    unknown = ai_sdk["unknownModel"]
    for error in (unknown["generate"], *unknown["stream"]["errors"]):
        assert error["name"] == "AI_APICallError" and error["isAPICallError"] is True
        assert (error["statusCode"], error["message"]) == (404, OPENAI_UNKNOWN)
    assert len(unknown["stream"]["errors"]) == 1
    broken = ai_sdk["midStream"]
    assert broken["textDeltas"] == tokens(3)
    assert [(e["name"], e["message"]) for e in broken["errors"]] == [
        ("AI_StreamProviderError", BROKEN)
    ]
    assert broken["finishReason"] == "error"


def test_nothing_printed_and_one_warning(report: Result) -> None:
    (warning,) = report["warnings"]  # generateDefaultLimit's
    assert warning["feature"] == "maxOutputTokens"
    assert report["console"] == []


# ---- the proxy's metrics -------------------------------------------------------------------


def test_metrics_count_what_the_clients_read(server: ServerProcess, report: Result) -> None:
    """Every answer both clients read is a request on the route, and its usage the tokens
    counted (the metrics hold only this module's requests)."""
    usages = report["usages"]
    answered = len(usages)

    def counted() -> dict[str, float]:
        samples = scrape(server.url)
        return {
            status: total(samples, "http_requests_total", status=status, **ROUTE)
            for status in ("200", "400", "404", "429", "502")
        }

    # the two streams broken after their 200 count as 502s, what their clients got
    expected = {"200": answered, "400": 1, "404": 4, "429": 1, "502": 2}
    # (a stream's request is counted as it ends, maybe after the client read it)
    wait_for(lambda: sum(counted().values()) >= sum(expected.values()))
    assert counted() == expected
    samples = scrape(server.url)
    read = {kind: sum(u[kind] for u in usages) for kind in ("input", "output")}
    # the broken streams had no usage: their output counted from what they carried
    read["output"] += 2 * 3
    assert {
        kind: total(samples, "trioproxy_tokens_total", api="anthropic", type=kind)
        for kind in ("input", "output")
    } == read


# ---- parallel tool calls from a scripted backend -------------------------------------------


def test_parallel_tool_calls(tools_proxy: ServerProcess) -> None:  # noqa: F811
    """Two calls the backend streams interleaved, in fragments, after reasoning and text:
    both clients read a thinking block, a text block and the two calls whole, one block
    after the other, with the backend's ids, and send the results back paired."""
    ToolsBackend.asked.clear()
    out = scenario_runner(tools_proxy.url, SCRIPT)("parallel-tools")
    assert out["warnings"] == [] and out["console"] == []
    final = out["sdk"]["stream"]["final"]
    assert final["content"] == [
        {"type": "thinking", "thinking": "Two cities.", "signature": ""},
        {"type": "text", "text": "Checking."},
        *(
            {"type": "tool_use", "id": call_id, "name": "get_weather", "input": args}
            for call_id, args in CALLS.items()
        ),
    ]
    assert final["stop_reason"] == "tool_use"
    assert final["usage"] == {
        "input_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 9,
    }
    assert out["sdk"]["stream"]["inputSnapshots"][-1] == CALLS["call_rome"]
    assert out["sdk"]["answer"]["content"] == [{"type": "text", "text": ANSWER}]

    stream = out["aiSdk"]["stream"]
    assert stream["errors"] == []
    assert (stream["reasoning"], stream["textDeltas"]) == ("Two cities.", ["Checking."])
    assert [(c["id"], c["input"]) for c in stream["calls"]] == list(CALLS.items())
    assert stream["finishReason"] == "tool-calls"
    assert stream["usage"] == {"input": 12, "output": 9}
    trip = out["aiSdk"]["roundTrip"]
    assert trip["ok"] is True, trip
    assert trip["value"]["text"] == ANSWER
    assert [c["id"] for c in trip["value"]["steps"][0]["calls"]] == list(CALLS)

    answers = [_pairs(body) for _, body in ToolsBackend.asked if _answered(body)]
    assert answers == [(list(CALLS), list(CALLS))] * 2
