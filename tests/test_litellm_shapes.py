"""What the LiteLLM Python SDK (1.110) needs of the proxy's answers, pinned on the raw lines.

Many users put LiteLLM in front of "an Ollama": its ``ollama_chat/`` provider reads
/api/chat, ``ollama/`` reads /api/generate and /api/embed. Its Ollama parsers index each
line's members directly (a line without ``message`` is a KeyError) and number a line's tool
calls by their place unless a call says its ``index``; these tests read the proxy's answers
as those parsers do. LiteLLM itself (about 200 MB installed, boto3 and tokenizers beside it)
is no test dependency: it was driven against the proxy when these were written, and its own
faults are in docs/api-compatibility.md ("LiteLLM (Python SDK)").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from trioproxy.demo.script import REASONING

from .conftest import ServerProcess
from .fakes import serving
from .test_js_vercel_ai import CALLS, USAGE, ToolsBackend
from .test_translate import litellm_reads

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def tools_proxy(start_proxy: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    with serving(ToolsBackend) as url:
        yield start_proxy(url, MAX_RETRIES="0")


def ndjson(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = httpx.post(url + path, json={**body, "stream": True}, timeout=10)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def test_parallel_streamed_tool_calls_stay_two_calls(tools_proxy: ServerProcess) -> None:
    """Two calls the backend streams interleaved: LiteLLM's ollama_chat read them as one
    call (both said nothing but their place in a line of their own, 0), its arguments
    '{..Paris..}{..Rome..}', and failed the next turn on them ("Extra data")."""
    body = {"model": "tools", "messages": [{"role": "user", "content": "w"}]}
    lines = ndjson(tools_proxy.url, "/api/chat", {**body, "tools": [WEATHER_TOOL]})
    assert all("message" in line and "done" in line for line in lines)
    assert litellm_reads(lines) == [
        {"name": "get_weather", "arguments": json.dumps(arguments)} for arguments in CALLS.values()
    ]
    calls = [c for line in lines for c in line["message"].get("tool_calls") or []]
    assert [c["id"] for c in calls] == list(CALLS)
    done = lines[-1]
    assert done["done"] is True and done["done_reason"] == "stop"
    assert (done["prompt_eval_count"], done["eval_count"]) == (
        USAGE["prompt_tokens"],
        USAGE["completion_tokens"],
    )


def test_every_line_has_what_litellm_indexes(proxy: ServerProcess) -> None:
    """ollama_chat reads ``chunk["message"]`` and ``chunk["done"]`` of every line, ollama
    ``chunk["response"]`` of every line not done, both the done line's counts as ints (the
    usage), reasoning from ``thinking``; its embeddings read ``embeddings`` and
    ``prompt_eval_count``."""
    ask = "hi [[tokens=3]]"
    chat = ndjson(
        proxy.url,
        "/api/chat",
        {"model": "demo-reasoner", "messages": [{"role": "user", "content": ask}]},
    )
    assert all(isinstance(line["message"], dict) and "done" in line for line in chat)
    assert "".join(line["message"].get("thinking", "") for line in chat) == REASONING
    generate = ndjson(proxy.url, "/api/generate", {"model": "demo-reasoner", "prompt": ask})
    assert all(isinstance(line["response"], str) for line in generate if not line["done"])
    for done in (chat[-1], generate[-1]):
        assert done["done"] is True
        assert isinstance(done["prompt_eval_count"], int)
        assert isinstance(done["eval_count"], int)
    embed = httpx.post(proxy.url + "/api/embed", json={"model": "demo-embed", "input": ["a"]})
    assert len(embed.json()["embeddings"]) == 1
    assert isinstance(embed.json()["prompt_eval_count"], int)
