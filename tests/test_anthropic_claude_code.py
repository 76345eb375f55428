"""``/v1/messages`` against what Claude Code really sends and reads, through a proxy process
in front of a scripted backend (its chat completions streams and errors as a test writes
them), driven with the anthropic SDK.

Claude Code's requests (built from captured ones: its system prompt as text blocks with
``cache_control``, dozens of tools with JSON Schema of their own, ``thinking``,
``metadata``, ``context_management``, history with thinking, redacted thinking, tool
results holding images, server tools) must be accepted and translated, the fields nothing
reads ignored; its stream parser wants the events in Anthropic's order, whatever order the
backend's chunks come in; its retries read the status and ``retry-after``; its context
handling reads the wording of a context overflow.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import anthropic
import httpx
import pytest
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving
from .test_anthropic_client import _total
from .test_metrics_e2e import wait_for

StartProxy = Callable[..., ServerProcess]
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
    "rkJggg=="
)

# -- the backend's side ---------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [choice],
        **more,
    }


def call_delta(
    index: int, *, id: str | None = None, name: str | None = None, args: str = ""
) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {"arguments": args}}
    if id is not None:
        call |= {"id": id, "type": "function"}
        call["function"]["name"] = name
    return {"tool_calls": [call]}


USAGE = {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129}
ROLE = chunk({"role": "assistant", "content": ""})
LAST_USAGE = {**chunk({}), "choices": [], "usage": USAGE}  # include_usage's own chunk

# each model's stream, chunk by chunk
STREAMS: dict[str, list[dict[str, Any]]] = {
    "parallel-calls": [
        ROLE,
        chunk(call_delta(0, id="call_a", name="Read", args='{"file_pa')),
        chunk(call_delta(1, id="call_b", name="Bash", args='{"comm')),
        chunk(call_delta(0, args='th": "/x.py"}')),
        chunk(call_delta(1, args='and": "ls -la"}')),
        chunk({}, "tool_calls"),
        LAST_USAGE,
    ],
    "text-then-call": [
        ROLE,
        chunk({"content": "Let me look."}),
        chunk(call_delta(0, id="call_1", name="Read", args='{"file_path": "/y"}')),
        chunk({}, "tool_calls"),
        LAST_USAGE,
    ],
    "think-text-call": [
        ROLE,
        chunk({"reasoning_content": "The user wants "}),
        chunk({"reasoning_content": "a listing."}),
        chunk({"content": "Listing."}),
        # llama.cpp and some vLLM versions give calls without an id
        chunk(call_delta(0, id="", name="Bash", args='{"command": "ls"}')),
        chunk(call_delta(1, id="", name="Bash", args='{"command": "pwd"}')),
        chunk({}, "tool_calls"),
        LAST_USAGE,
    ],
    "empty": [ROLE, chunk({}, "stop"), LAST_USAGE],
    "cut-mid-call": [
        ROLE,
        chunk(call_delta(0, id="call_1", name="Write", args='{"file_path": "/z", "cont')),
        chunk({}, "length"),
        LAST_USAGE,
    ],
    # a call whose arguments end before its object does, though the backend says done
    "unfinished-call": [
        ROLE,
        chunk(call_delta(0, id="call_1", name="Write", args='{"file_path": "/z", "cont')),
        chunk({}, "tool_calls"),
        LAST_USAGE,
    ],
    "usage-in-finish": [
        ROLE,
        chunk({"content": "Hi"}),
        chunk({}, "stop", usage=USAGE),
    ],
    # broken off after a token: no finish_reason, no [DONE] (see Backend)
    "broken": [ROLE, chunk({"content": "Hi"})],
    "no-usage": [ROLE, chunk({"content": "Hi"}), chunk({"content": " there"}), chunk({}, "stop")],
    "quota": [ROLE, chunk({"content": "ok"}), chunk({}, "length"), LAST_USAGE],
}

# each model's error: status, the backend's body, headers
ERRORS: dict[str, tuple[int, dict[str, Any], dict[str, str]]] = {
    "limited": (
        429,
        {"error": {"message": "rate limited", "type": "rate_limit_error", "code": None}},
        {"retry-after": "7", "x-should-retry": "true"},
    ),
    "overloaded": (503, {"error": {"message": "no capacity", "type": "server_error"}}, {}),
    # OpenAI's own wording and code
    "too-long-openai": (
        400,
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens. However, "
                "your messages resulted in 9500 tokens. Please reduce the length of the "
                "messages.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
        {},
    ),
    # vLLM's, when the prompt and max_tokens together do not fit (Claude Code asks 32000)
    "too-long-vllm-max-tokens": (
        400,
        {
            "object": "error",
            "message": "'max_tokens' or 'max_completion_tokens' is too large: "
            "32000. This model's maximum context length is 32768 tokens and your request has "
            "1500 input tokens (32000 > 32768 - 1500). None",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        {},
    ),
    # vLLM's older wording, the same case
    "too-long-vllm-old": (
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 32768 tokens. "
            "However, you requested 33500 tokens (1500 in the messages, 32000 in the "
            "completion). Please reduce the length of the messages or completion.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        {},
    ),
    # vLLM's when the prompt alone is too long
    "too-long-vllm-input": (
        400,
        {
            "object": "error",
            "message": "This model's maximum context length is 32768 tokens. "
            "However, your request has 40000 input tokens. Please reduce the length of the "
            "input messages. None",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        {},
    ),
    # llama.cpp's server
    "too-long-llamacpp": (
        400,
        {
            "error": {
                "code": 400,
                "message": "the request exceeds the available context size, try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": 40000,
                "n_ctx": 32768,
            }
        },
        {},
    ),
}


# a model that refuses reasoning_effort as OpenAI's API refuses it for a model that does
# not reason
NO_EFFORT = "gpt-4.1-mini"
EFFORT_REFUSED = {
    "error": {
        "message": "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
        "type": "invalid_request_error",
        "param": "reasoning_effort",
        "code": "unsupported_parameter",
    }
}


# the backend's head on every answer, as OpenAI's API sends it: the proxy passes on its
# rate limits and its request id (as x-upstream-request-id), nothing else of it
BACKEND_HEADERS = {
    "x-request-id": "req_backend_7",
    "x-ratelimit-remaining-tokens": "8000",
    "openai-organization": "org-private",
    "set-cookie": "__cf_bm=abc; path=/; HttpOnly",
}


class Backend(ScriptedHandler):
    """Chat completions by model name: a stream of STREAMS, an error of ERRORS, else a
    short non-stream answer, with BACKEND_HEADERS. ``asked`` holds the bodies it was sent."""

    asked: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        names = [*STREAMS, *ERRORS, "qwen3-coder", "qwen3-small", NO_EFFORT]
        self.answer(
            200, json.dumps({"object": "list", "data": [{"id": n} for n in names]}).encode()
        )

    def do_POST(self) -> None:
        body = self.json_body()
        self.asked.append(body)
        model = body["model"]
        if model == NO_EFFORT and "reasoning_effort" in body:
            self.answer(400, json.dumps(EFFORT_REFUSED).encode())
        elif model in ERRORS:
            status, error, headers = ERRORS[model]
            self.answer(status, json.dumps(error).encode(), headers=headers)
        elif model in STREAMS and body.get("stream"):
            events = "".join(f"data: {json.dumps(c)}\n\n" for c in STREAMS[model])
            if model != "broken":
                events += "data: [DONE]\n\n"
            self.answer(200, events.encode(), "text/event-stream", headers=BACKEND_HEADERS)
        else:
            message = {"role": "assistant", "content": f"answer from {model}"}
            answer = {
                "id": "x",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": USAGE,
            }
            self.answer(200, json.dumps(answer).encode(), headers=BACKEND_HEADERS)


@pytest.fixture(scope="module")
def server(
    start_proxy: StartProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    # the names Claude Code sends for its main and its small, fast model, as an operator maps them
    mapping = tmp_path_factory.mktemp("mapping") / "models.json"
    mapping.write_text(
        json.dumps(
            {
                "claude-sonnet-4-5-20250929": "qwen3-coder",
                "claude-haiku-4-5-20251001": "qwen3-small",
                "claude-3-5-haiku-20241022": "qwen3-small",
            }
        )
    )
    with serving(Backend) as url:
        yield start_proxy(url, MAX_RETRIES="0", ACCESS_LOG="true", MODEL_MAPPING_FILE=str(mapping))


@pytest.fixture
def client(server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    Backend.asked.clear()
    with anthropic.Anthropic(
        base_url=server.url, api_key="x", max_retries=0, _strict_response_validation=True
    ) as sdk:
        yield sdk


# -- what Claude Code sends -----------------------------------------------------------------

# the headers Claude Code sends with every request (its SDK adds the x-stainless-* ones)
CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
    "fine-grained-tool-streaming-2025-05-14,context-management-2025-06-27",
    "anthropic-dangerous-direct-browser-access": "true",
    "x-app": "cli",
    "user-agent": "claude-cli/2.0.14 (external, cli)",
    "x-stainless-retry-count": "0",
    "x-stainless-timeout": "600",
}

SCHEMA = "http://json-schema.org/draft-07/schema#"


def tool(name: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "description": f"{name}: " + "A long description of what the tool does. " * 40,
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
            "$schema": SCHEMA,
        },
    }


TOOLS: list[dict[str, Any]] = [
    tool(
        "Bash",
        {
            "command": {"type": "string"},
            "timeout": {"type": "number"},
            "run_in_background": {"type": "boolean"},
        },
        ["command"],
    ),
    tool("Read", {"file_path": {"type": "string"}, "offset": {"type": "number"}}, ["file_path"]),
    tool(
        "WebFetch",
        {"url": {"type": "string", "format": "uri"}, "prompt": {"type": "string"}},
        ["url", "prompt"],
    ),
    tool(
        "TodoWrite",
        {
            "todos": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "content": {"type": "string", "minLength": 1},
                        "status": {
                            "type": "string",
                            "enum": ["pending", "in_progress", "completed"],
                        },
                    },
                    "required": ["content", "status"],
                    "additionalProperties": False,
                },
            }
        },
        ["todos"],
    ),
    *(tool(f"mcp__server__tool_{i}", {"q": {"type": "string"}}, ["q"]) for i in range(20)),
    {
        **tool("Write", {"file_path": {"type": "string"}}, ["file_path"]),
        "type": "custom",
        "cache_control": {"type": "ephemeral"},
    },
    {"type": "web_search_20250305", "name": "web_search", "max_uses": 8},  # a server tool
]

HISTORY: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [
            {
                "type": "text",
                "text": "<system-reminder>\nAs you answer, use this context.\n</system-reminder>",
            },
            {
                "type": "text",
                "text": "fix the failing test",
                "cache_control": {"type": "ephemeral"},
            },
        ],
    },
    {
        "role": "assistant",
        "content": [
            {
                "type": "thinking",
                "thinking": "Look at the test first.",
                "signature": "EqQBCkYIBxgC",
            },
            {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT"},
            {"type": "text", "text": "Reading the test and running it."},
            {
                "type": "tool_use",
                "id": "toolu_01A",
                "name": "Read",
                "input": {"file_path": "/t.py"},
            },
            {"type": "tool_use", "id": "toolu_01B", "name": "Bash", "input": {"command": "pytest"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_01A",
                "content": [{"type": "text", "text": "     1\tdef test(): assert f() == 2"}],
            },
            {
                "type": "tool_result",
                "tool_use_id": "toolu_01B",
                "is_error": True,
                "content": [
                    {"type": "text", "text": "1 failed"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                ],
            },
            {
                "type": "text",
                "text": "<system-reminder>todo list is empty</system-reminder>",
                "cache_control": {"type": "ephemeral"},
            },
        ],
    },
    {
        "role": "assistant",
        "content": [
            {
                "type": "server_tool_use",
                "id": "srvtoolu_1",
                "name": "web_search",
                "input": {"query": "pytest"},
            },
            {
                "type": "web_search_tool_result",
                "tool_use_id": "srvtoolu_1",
                "content": [
                    {
                        "type": "web_search_result",
                        "url": "https://docs.pytest.org",
                        "title": "pytest",
                        "encrypted_content": "Eq0",
                        "page_age": None,
                    }
                ],
            },
            {
                "type": "text",
                "text": "f returns 1.",
                "citations": [
                    {
                        "type": "web_search_result_location",
                        "url": "https://docs.pytest.org",
                        "title": "pytest",
                        "encrypted_index": "Eo8",
                        "cited_text": "assert",
                    }
                ],
            },
        ],
    },
    {"role": "user", "content": "go on"},
]


def claude_code_request(model: str = "claude-sonnet-4-5-20250929", **more: Any) -> dict[str, Any]:
    """A main-loop request of Claude Code 2.x, as captured, its prompts shortened."""
    return {
        "model": model,
        "messages": HISTORY,
        "system": [
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {
                "type": "text",
                "text": "You are an interactive CLI tool that helps users with "
                "software engineering tasks." * 50,
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "tools": TOOLS,
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": False},
        "metadata": {"user_id": "user_0f3c_account__session_8e1b"},
        "max_tokens": 32000,
        "temperature": 1,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "service_tier": "auto",
        "stream": True,
        **more,
    }


def post(
    server: ServerProcess, body: dict[str, Any], path: str = "/v1/messages?beta=true"
) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=CLAUDE_CODE_HEADERS, timeout=10)


def events_of(response: httpx.Response) -> list[dict[str, Any]]:
    """The named events of a stream, each checked against the SDK's types."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        EVENTS.validate_python(event)
        events.append(event)
    return events


def check_order(events: list[dict[str, Any]]) -> None:
    """Anthropic's order, which Claude Code's own stream reader relies on: message_start
    first (with its usage), blocks indexed 0, 1, 2... each started, given its deltas and
    stopped before the next starts, then message_delta (stop reason, output tokens) and
    message_stop; a tool_use block's input JSON whole once joined; tool ids unique."""
    kinds = [event["type"] for event in events]
    assert kinds[0] == "message_start", kinds
    assert isinstance(events[0]["message"]["usage"]["input_tokens"], int)
    assert kinds[-2:] == ["message_delta", "message_stop"], kinds
    assert events[-2]["delta"]["stop_reason"] is not None
    assert isinstance(events[-2]["usage"]["output_tokens"], int)
    open_index, next_index, ids = None, 0, []
    partial: dict[int, str] = {}
    for event in events[1:-2]:
        if event["type"] == "content_block_start":
            assert open_index is None and event["index"] == next_index, kinds
            open_index, next_index = event["index"], next_index + 1
            if event["content_block"]["type"] == "tool_use":
                ids.append(event["content_block"]["id"])
                partial[event["index"]] = ""
        elif event["type"] == "content_block_delta":
            assert event["index"] == open_index, kinds
            if event["delta"]["type"] == "input_json_delta":
                partial[event["index"]] += event["delta"]["partial_json"]
        else:
            assert event == {"type": "content_block_stop", "index": open_index}, kinds
            open_index = None
    assert open_index is None
    assert all(isinstance(json.loads(text), dict) for text in partial.values())
    assert len(set(ids)) == len(ids) and all(ids)


# -- requests -------------------------------------------------------------------------------


def test_a_main_loop_request_is_accepted_and_translated(server: ServerProcess) -> None:
    Backend.asked.clear()
    response = post(server, claude_code_request(model="text-then-call"))
    assert response.status_code == 200, response.text
    check_order(events_of(response))
    (sent,) = Backend.asked
    # what nothing reads is left out; what the backend takes is there
    for field in ("metadata", "context_management", "service_tier", "thinking", "system"):
        assert field not in sent
    # its thinking budget, 31,999 tokens, allows much and asks for nothing
    assert "reasoning_effort" not in sent
    assert sent["max_tokens"] == 32000 and sent["temperature"] == 1
    assert [t["function"]["name"] for t in sent["tools"]] == [t["name"] for t in TOOLS[:-1]]
    assert sent["tools"][2]["function"]["parameters"]["properties"]["url"]["format"] == "uri"
    assert "parallel_tool_calls" not in sent and sent["tool_choice"] == "auto"
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "user", "assistant", "user"]
    system, first_user, calls = sent["messages"][:3]
    assert system["content"].startswith(
        "You are Claude Code, Anthropic's official CLI for Claude.\n\n"
    )
    # two text blocks stay two lines, not one glued word ("</system-reminder>fix")
    assert first_user["content"].endswith("</system-reminder>\nfix the failing test")
    assert calls == {
        "role": "assistant",
        "content": "Reading the test and running it.",
        "tool_calls": [
            {
                "id": "toolu_01A",
                "type": "function",
                "function": {"name": "Read", "arguments": '{"file_path":"/t.py"}'},
            },
            {
                "id": "toolu_01B",
                "type": "function",
                "function": {"name": "Bash", "arguments": '{"command":"pytest"}'},
            },
        ],
    }
    assert sent["messages"][4] == {
        "role": "tool",
        "tool_call_id": "toolu_01B",
        "content": "Error: 1 failed",
    }
    image, reminder = sent["messages"][5]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert reminder["text"] == "<system-reminder>todo list is empty</system-reminder>"
    assert sent["messages"][6] == {"role": "assistant", "content": "f returns 1."}


@pytest.mark.parametrize("model", ["claude-haiku-4-5-20251001", "claude-3-5-haiku-20241022"])
def test_the_small_models_requests_go_to_the_mapped_model(
    client: anthropic.Anthropic, model: str
) -> None:
    """Claude Code's quota check (max_tokens 1) and title generation use its small, fast
    model under Anthropic's names: the operator's mapping sends them to a backend model,
    and the answer names the model as the client asked for it."""
    quota = client.messages.create(
        model=model,
        max_tokens=1,
        messages=[{"role": "user", "content": "quota"}],
        metadata={"user_id": "u"},
        extra_headers=CLAUDE_CODE_HEADERS,
    )
    title = client.messages.create(
        model=model,
        max_tokens=512,
        extra_body={"temperature": 0},
        system=[{"type": "text", "text": "Summarize this coding conversation in a title."}],
        messages=[{"role": "user", "content": "fix the failing test"}],
        extra_headers=CLAUDE_CODE_HEADERS,
    )
    assert quota.model == title.model == model
    assert title.content[0].text == "answer from qwen3-small"  # type: ignore[union-attr]
    assert [body["model"] for body in Backend.asked] == ["qwen3-small"] * 2
    assert Backend.asked[0]["max_tokens"] == 1


def test_count_tokens_with_claude_codes_query_is_not_found(server: ServerProcess) -> None:
    body = {"model": "claude-sonnet-4-5-20250929", "messages": HISTORY, "tools": TOOLS}
    response = post(server, body, "/v1/messages/count_tokens?beta=true")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


# -- streams --------------------------------------------------------------------------------


def stream(server: ServerProcess, model: str) -> tuple[list[dict[str, Any]], Any]:
    """The raw events of a stream for ``model`` (checked), and the message the SDK's own
    accumulator builds from the same stream."""
    response = post(server, claude_code_request(model=model))
    assert response.status_code == 200, response.text
    events = events_of(response)
    check_order(events)
    body = claude_code_request(model=model)
    # what this SDK's signature does not name goes as Claude Code's own SDK sends it
    extra = {key: body.pop(key) for key in ("temperature", "context_management", "service_tier")}
    del body["stream"]
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0) as sdk:
        with sdk.messages.stream(
            **body, extra_body=extra, extra_headers=CLAUDE_CODE_HEADERS
        ) as running:
            final = running.get_final_message()
    return events, final


def test_parallel_calls_interleaved_by_the_backend(server: ServerProcess) -> None:
    _, final = stream(server, "parallel-calls")
    calls = [(b.type, b.id, b.name, b.input) for b in final.content]
    assert calls == [
        ("tool_use", "call_a", "Read", {"file_path": "/x.py"}),
        ("tool_use", "call_b", "Bash", {"command": "ls -la"}),
    ]
    assert final.stop_reason == "tool_use"
    assert final.usage.input_tokens == 120 and final.usage.output_tokens == 9


def test_text_then_call(server: ServerProcess) -> None:
    _, final = stream(server, "text-then-call")
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Let me look."
    assert final.stop_reason == "tool_use"


def test_thinking_text_and_calls_without_ids(server: ServerProcess) -> None:
    """Calls the backend gave no id get one each, unique, as Claude Code keys the results
    by it; and ids are not reused from one answer to the next."""
    events, final = stream(server, "think-text-call")
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert final.content[0].thinking == "The user wants a listing."
    assert [b.input for b in final.content[2:]] == [{"command": "ls"}, {"command": "pwd"}]
    ids = [b.id for b in final.content[2:]]
    again = [
        e["content_block"]["id"]
        for e in events
        if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use"
    ]
    assert all(i.startswith("toolu_") for i in ids + again)
    assert len(set(ids + again)) == 4


def test_an_empty_answer_is_still_a_whole_message(server: ServerProcess) -> None:
    events, final = stream(server, "empty")
    assert [e["type"] for e in events] == ["message_start", "message_delta", "message_stop"]
    assert final.content == [] and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 9


def test_max_tokens_reached_mid_call_says_max_tokens(server: ServerProcess) -> None:
    """Cut in the middle of writing a call's arguments: Anthropic says ``max_tokens`` (the
    call is incomplete), never ``tool_use``, which would have Claude Code run the tool with
    arguments it never got."""
    _, final = stream(server, "cut-mid-call")
    assert final.stop_reason == "max_tokens"


def test_a_call_left_unfinished_after_part_went_out_is_an_error(server: ServerProcess) -> None:
    """Its block is open and part of its input is out: closing it would have Claude Code
    run Write with half its arguments. The stream ends with an error instead (a 502 when
    the backend's whole stream came in one read, before anything went out)."""
    response = post(server, claude_code_request(model="unfinished-call"))
    if response.status_code == 200:
        events = events_of(response)
        partial = [
            e["delta"]["partial_json"] for e in events if "partial_json" in e.get("delta", {})
        ]
        assert partial == ['{"file_path":"/z"']  # what went out as it came: the key waits
        error = events[-1]
    else:
        assert response.status_code == 502, response.text
        error = response.json()
    assert error["type"] == "error" and "partway through its arguments" in error["error"]["message"]


@pytest.mark.parametrize(
    ("model", "input_tokens", "output_tokens"),
    [("usage-in-finish", 120, 9), ("no-usage", 0, 2), ("quota", 120, 9)],
)
def test_usage_wherever_it_comes(
    server: ServerProcess, model: str, input_tokens: int, output_tokens: int
) -> None:
    _, final = stream(server, model)
    assert final.usage.input_tokens == input_tokens
    assert final.usage.output_tokens == output_tokens


# -- errors ---------------------------------------------------------------------------------


def test_rate_limit_passes_the_backends_retry_advice(client: anthropic.Anthropic) -> None:
    """The SDK (and Claude Code) retry a 429 after ``retry-after``; the backend's advice
    reaches them on /v1/messages as on /v1."""
    for streamed in (False, True):
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.create(
                model="limited",
                max_tokens=10,
                messages=[{"role": "user", "content": "x"}],
                stream=streamed,  # type: ignore[call-overload]
            )
        headers = caught.value.response.headers
        assert headers["retry-after"] == "7" and headers["x-should-retry"] == "true"
        assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_an_answer_passes_the_backends_rate_limits_and_request_id(
    client: anthropic.Anthropic,
) -> None:
    """The backend's rate limits and request id reach the SDK on /v1/messages as on every
    /v1 route, streamed or not; its account and cookies do not."""
    ask: dict[str, Any] = {"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    raw = client.messages.with_raw_response.create(model="qwen3-coder", **ask)
    assert raw.parse().content[0].text == "answer from qwen3-coder"  # type: ignore[union-attr]
    with client.messages.with_streaming_response.create(
        model="usage-in-finish", stream=True, **ask
    ) as streamed:
        assert "event: message_stop" in list(streamed.iter_lines())
    for headers in (raw.headers, streamed.headers):
        assert headers["x-ratelimit-remaining-tokens"] == "8000"
        assert headers["x-upstream-request-id"] == "req_backend_7"
        assert headers["x-request-id"] not in ("", "req_backend_7")
        assert "x-proxy-overhead-ms" in headers
        assert "openai-organization" not in headers and "set-cookie" not in headers


def test_overloaded_backend_is_an_overloaded_error(client: anthropic.Anthropic) -> None:
    """503 ``overloaded_error``: the status and type Claude Code retries (any 5xx, and the
    type by name even where a stream lost the status)."""
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(
            model="overloaded", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 503
    assert caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


# Claude Code's own readings of a 400 (its services/api): the words of a prompt too long,
# which start its compaction, and of a max_tokens that does not fit, after which it asks
# again with a max_tokens that does
PROMPT_TOO_LONG = re.compile(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", re.I)
MAX_TOKENS_OVERFLOW = re.compile(
    r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)"
)


@pytest.mark.parametrize(
    ("model", "reading"),
    [
        ("too-long-openai", ("prompt", 9500, 8192)),
        ("too-long-vllm-input", ("prompt", 40000, 32768)),
        ("too-long-llamacpp", ("prompt", 40000, 32768)),
        ("too-long-vllm-max-tokens", ("max_tokens", 1500, 32000, 32768)),
        ("too-long-vllm-old", ("max_tokens", 1500, 32000, 32768)),
    ],
)
@pytest.mark.parametrize("streamed", [False, True])
def test_context_overflow_in_claude_codes_words(
    client: anthropic.Anthropic, model: str, reading: tuple[Any, ...], streamed: bool
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=model,
            max_tokens=1000,
            messages=[{"role": "user", "content": "x"}],
            stream=streamed,  # type: ignore[call-overload]
        )
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    if reading[0] == "prompt":
        match = PROMPT_TOO_LONG.search(error["message"])
        assert match is not None, error
        assert (int(match[1]), int(match[2])) == reading[1:]
    else:
        match = MAX_TOKENS_OVERFLOW.search(error["message"])
        assert match is not None, error
        assert tuple(int(n) for n in match.groups()) == reading[1:]


def test_a_bad_key_is_an_authentication_error(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    keyed = start_proxy(demo_backend.url, PROXY_API_KEYS="cc:sk-cc-123")
    body = {"model": "demo-chat", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    for headers in ({"x-api-key": "wrong"}, {"authorization": "Bearer wrong"}, {}):
        response = httpx.post(
            f"{keyed.url}/v1/messages?beta=true",
            json=body,
            headers={**CLAUDE_CODE_HEADERS, **headers},
            timeout=5,
        )
        assert response.status_code == 401
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "authentication_error"
    response = httpx.post(
        f"{keyed.url}/v1/messages/count_tokens?beta=true",
        json=body,
        headers={**CLAUDE_CODE_HEADERS, "x-api-key": "sk-cc-123"},
        timeout=5,
    )
    assert response.status_code == 404


def test_a_body_too_large_is_request_too_large(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    small = start_proxy(demo_backend.url, MAX_REQUEST_BYTES="2048")
    response = post(small, claude_code_request())
    assert response.status_code == 413
    assert response.json() == {
        "type": "error",
        "error": {"type": "request_too_large", "message": response.json()["error"]["message"]},
    }


# -- logs and metrics -----------------------------------------------------------------------


def access_line(server: ServerProcess, request_id: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if "trioproxy.access" in line and f"[{request_id}]" in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}")


@pytest.mark.parametrize(("streamed", "end"), [(True, " (completed)"), (False, "")])
def test_access_line(server: ServerProcess, streamed: bool, end: str) -> None:
    request_id = f"cc-access-{streamed}"
    body = claude_code_request(model="usage-in-finish", stream=streamed)
    response = httpx.post(
        f"{server.url}/v1/messages?beta=true",
        json=body,
        timeout=10,
        headers={**CLAUDE_CODE_HEADERS, "x-request-id": request_id},
    )
    assert response.status_code == 200
    line = access_line(server, request_id)
    # with Claude Code's query: which requests came from it
    pattern = r"POST /v1/messages\?beta=true 200 [0-9.]+ ms \d+ B" + re.escape(end)
    assert re.search(pattern, line), line


def test_metrics_of_streams_and_answers(server: ServerProcess) -> None:
    """Tokens from the backend's usage (wherever in the stream it came), the first token's
    time for a stream, and each stream's outcome, under api="anthropic"."""
    url, labels = server.url, {"api": "anthropic"}

    def counts() -> tuple[float, ...]:
        return (
            _total(url, "trioproxy_tokens_total", type="input", **labels),
            _total(url, "trioproxy_tokens_total", type="output", **labels),
            _total(url, "trioproxy_time_to_first_token_seconds_count", **labels),
            _total(url, "trioproxy_streams_total", outcome="completed", **labels),
            _total(url, "trioproxy_streams_total", outcome="error", **labels),
        )

    before = counts()
    for streamed in (True, False):
        body = claude_code_request(model="usage-in-finish", stream=streamed)
        assert post(server, body).status_code == 200
    broken = post(server, claude_code_request(model="broken"))
    assert broken.text.endswith("\n\n") and "\nevent: error\n" in broken.text
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0) as sdk:
        with pytest.raises(anthropic.APIStatusError) as caught:  # at the error event
            for _ in sdk.messages.create(
                model="broken", max_tokens=10, messages=HISTORY, stream=True
            ):
                pass
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    # the stream's 120 + 9, the answer's 120 + 9, the broken stream's 1 chunk (twice:
    # the raw request and the SDK's) counted as a token each
    expected = (240, 20, 3, 1, 2)
    wait_for(lambda: tuple(a - b for a, b in zip(counts(), before, strict=True)) == expected)


def test_the_effort_goes_as_reasoning_effort_unless_the_model_refuses_it(
    server: ServerProcess,
) -> None:
    """Claude Code sends an effort with every request: a model that refuses
    reasoning_effort is asked again without it, and from then on goes without."""
    body = claude_code_request(model=NO_EFFORT, stream=False, output_config={"effort": "max"})
    Backend.asked.clear()
    for _ in range(2):
        response = post(server, body)
        assert response.status_code == 200, response.text
        assert response.json()["content"][0]["text"] == f"answer from {NO_EFFORT}"
    efforts = [sent.get("reasoning_effort") for sent in Backend.asked]
    assert efforts == ["high", None, None]
