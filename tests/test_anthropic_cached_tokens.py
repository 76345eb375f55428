"""A backend's cached prompt tokens through /v1/messages, read by the anthropic SDK: Anthropic's
``input_tokens`` leave out what was read from the cache (``cache_read_input_tokens``) or
written to it (``cache_creation_input_tokens``), the three adding up to the prompt; the
proxy's own token metrics still count the whole prompt, as for every other route."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import pytest

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving
from .test_anthropic_client import _total
from .test_metrics_e2e import wait_for

PROMPT, CACHED, WRITTEN = 1200, 1024, 100
# OpenAI's spelling (vLLM's, llama.cpp's server's), with OpenRouter's cache writes
USAGE = {
    "prompt_tokens": PROMPT, "completion_tokens": 2, "total_tokens": PROMPT + 2,
    "prompt_tokens_details": {"cached_tokens": CACHED, "cache_write_tokens": WRITTEN},
}  # fmt: skip


class _CachingBackend(ScriptedHandler):
    """Answers "hi" with USAGE, as a chat completion or a stream (usage in its last chunk)."""

    def do_POST(self) -> None:
        body = self.json_body()
        head = {"id": "chatcmpl-1", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "hi"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            answer = {**head, "object": "chat.completion", "choices": [choice], "usage": USAGE}
            self.answer(200, json.dumps(answer).encode())
            return
        chunk = {**head, "object": "chat.completion.chunk"}
        deltas = [({"role": "assistant", "content": "hi"}, None), ({}, "stop")]
        events = [
            {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            for delta, finish in deltas
        ]
        events.append({**chunk, "choices": [], "usage": USAGE})
        text = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
        self.answer(200, text.encode(), "text/event-stream")


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    with serving(_CachingBackend) as url:
        yield start_proxy(url, MAX_RETRIES="0")


@pytest.mark.parametrize("streamed", [False, True])
def test_cached_tokens_are_cache_reads(proxy: ServerProcess, streamed: bool) -> None:
    counted = _total(proxy.url, "trioproxy_tokens_total", api="anthropic", type="input")
    args: dict[str, Any] = {
        "model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]
    }  # fmt: skip
    with anthropic.Anthropic(
        base_url=proxy.url, api_key="x", max_retries=0, _strict_response_validation=True
    ) as sdk:
        if streamed:
            with sdk.messages.stream(**args) as stream:
                start = next(e for e in stream if e.type == "message_start")
                message = stream.get_final_message()
            # what the backend said only at the end is not known at the start
            assert start.message.usage.cache_read_input_tokens == 0
        else:
            message = sdk.messages.create(**args)
    usage = message.usage
    assert usage.input_tokens == PROMPT - CACHED - WRITTEN
    assert usage.cache_read_input_tokens == CACHED
    assert usage.cache_creation_input_tokens == WRITTEN
    assert usage.output_tokens == 2
    # the proxy's metrics: the whole prompt, not Anthropic's uncached part of it
    wait_for(
        lambda: (
            _total(proxy.url, "trioproxy_tokens_total", api="anthropic", type="input")
            == counted + PROMPT
        )
    )
