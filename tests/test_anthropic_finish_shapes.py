"""A backend's ``finish_reason`` of another JSON type than a string, through /v1/messages:
a stop reason as for no finish_reason at all, not a 500 (it was looked up in a dict, and
a list or an object is no key)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import anthropic
import pytest

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving


class _OddFinishReasons(ScriptedHandler):
    """Answers a chat completion whose ``finish_reason`` is the JSON the prompt spells."""

    def do_POST(self) -> None:
        body = self.json_body()
        finish = json.loads(body["messages"][-1]["content"])
        message = {"role": "assistant", "content": "hello"}
        answer = {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }  # fmt: skip
        self.answer(200, json.dumps(answer).encode())


@pytest.fixture(scope="module")
def proxy(start_proxy: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    with serving(_OddFinishReasons) as url:
        yield start_proxy(url, MAX_RETRIES="0")


@pytest.mark.parametrize("finish", [[], {}, ["stop"], {"type": "stop"}])
def test_finish_reason_not_a_string_is_a_stop_reason(proxy: ServerProcess, finish: object) -> None:
    with anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0) as sdk:
        message = sdk.messages.create(
            model="m", max_tokens=16, messages=[{"role": "user", "content": json.dumps(finish)}]
        )
    assert message.content[0].type == "text" and message.content[0].text == "hello"
    assert message.stop_reason == "end_turn"
