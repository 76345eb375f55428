"""Responses API streams from a scripted backend, driven with the official openai SDK
through a proxy process: how a stream the backend fails reaches the client."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest

from trioproxy.sse import SSEParser

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving

# what a cut Responses stream's error says it lacked: that API's closing events, not chat's
# finish_reason and [DONE]
RESPONSES_CUT = "(no response.completed, response.incomplete or response.failed event)"

StartProxy = Callable[..., ServerProcess]


def _event(kind: str, sequence: int, **fields: Any) -> str:
    data = json.dumps({"type": kind, "sequence_number": sequence, **fields})
    return f"event: {kind}\ndata: {data}\n\n"


def _response(status: str, **fields: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "model": "m", "status": status,
            "output": [], "usage": None, **fields}  # fmt: skip


# what each model's stream is: all in one write, so its failure is the first read
_STREAMS = {
    # a response.failed whose error names no type (OpenAI's "type" may be null)
    "bad-image": _event("response.created", 0, response=_response("in_progress"))
    + _event(
        "response.failed",
        1,
        response=_response(
            "failed", error={"code": "invalid_image_url", "message": "cannot fetch the image"}
        ),
    ),
    # an error event: its "type" is the event's, "error", not an error type
    "too-long": _event(
        "error", 0, code="context_length_exceeded", message="input too long", param="input"
    ),
    "overloaded": _event("response.created", 0, response=_response("in_progress"))
    + _event(
        "response.failed",
        1,
        response=_response("failed", error={"code": "server_error", "message": "overloaded"}),
    ),
}


class _Backend(ScriptedHandler):
    asked: ClassVar[list[str]] = []

    def do_GET(self) -> None:  # the proxy's readiness checks: GET /models
        self.answer(200, json.dumps({"object": "list", "data": []}).encode())

    def do_POST(self) -> None:
        model = self.json_body()["model"]
        self.asked.append(model)
        self.answer(200, _STREAMS[model].encode(), content_type="text/event-stream")


@pytest.fixture(scope="module")
def client(start_proxy: StartProxy) -> Iterator[openai.OpenAI]:
    with serving(_Backend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        # the SDK's own retries on: a 5xx would be asked again
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=2) as sdk:
            yield sdk


@pytest.mark.parametrize(
    ("model", "status"), [("bad-image", 400), ("too-long", 400), ("overloaded", 502)]
)
def test_a_responses_stream_failed_at_once_for_the_clients_mistake_is_a_4xx(
    client: openai.OpenAI, model: str, status: int
) -> None:
    """A Responses stream whose first read is the failure gets a real status: the client's
    mistake by the Responses API's failure codes (an invalid image, a prompt too long) is
    a 400 the SDK does not retry, not a 502 it sends twice more."""
    _Backend.asked.clear()
    with pytest.raises(openai.APIStatusError) as failed:
        for _ in client.responses.create(model=model, input="hi", stream=True):
            pass
    assert failed.value.status_code == status, failed.value
    assert _Backend.asked == [model] * (1 if status < 500 else 3)


# a stored response's stream, replayed after starting_after (the backend's replay of
# "resp_cut" stops after its first delta)
_REPLAY = [
    _event("response.created", 0, response=_response("in_progress")),
    _event(
        "response.output_text.delta",
        1,
        item_id="msg_1",
        output_index=0,
        content_index=0,
        delta="Hello",
        logprobs=[],
    ),
    _event(
        "response.completed",
        2,
        response=_response("completed", usage={"input_tokens": 1, "output_tokens": 1}),
    ),
]


class _Replays(ScriptedHandler):
    def do_GET(self) -> None:
        if "stream=true" not in self.path:  # the proxy's readiness checks: GET /models
            return self.answer(200, json.dumps({"object": "list", "data": []}).encode())
        query = parse_qs(urlsplit(self.path).query)
        after = int(query.get("starting_after", ["-1"])[0])
        events = _REPLAY[after + 1 :]
        if "resp_cut" in self.path:
            events = events[:-1]
        self.answer(200, "".join(events).encode(), content_type="text/event-stream")


@pytest.fixture(scope="module")
def replays(start_proxy: StartProxy) -> Iterator[openai.OpenAI]:
    with serving(_Replays) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
            yield sdk


def test_a_resumed_stream_cut_before_its_closing_event_is_reported_cut(
    replays: openai.OpenAI,
) -> None:
    """A resumed stream is over only when its closing event says so, as a live one: a
    backend body that ends after some events but before it is a cut stream (the openai
    SDK raises), while a replay that begins after the last event (no event at all) is a
    whole one."""
    whole = [event.type for event in replays.responses.retrieve("resp_1", stream=True)]
    assert whole[-1] == "response.completed"
    after_the_end = replays.responses.retrieve("resp_1", stream=True, starting_after=2)
    assert list(after_the_end) == []
    types: list[str] = []
    with pytest.raises(openai.APIError, match="ended before its last event") as cut:
        for event in replays.responses.retrieve("resp_cut", stream=True, starting_after=0):
            types.append(event.type)
    assert types == ["response.output_text.delta"]
    assert RESPONSES_CUT in str(cut.value)  # in the Responses API's words, not chat's


def test_the_error_event_of_a_cut_stream_is_numbered_after_its_last_event(
    replays: openai.OpenAI,
) -> None:
    """The proxy's error event is numbered after the last event it relayed, as the API
    numbers every event of a stream (it said 0 after a replay that began at 1)."""
    url = f"{replays.base_url}responses/resp_cut?stream=true&starting_after=0"
    with httpx.stream("GET", url, timeout=10) as response:
        body = response.read()
    events = [(e.event, json.loads(e.data)["sequence_number"]) for e in SSEParser().feed(body)]
    assert events == [("response.output_text.delta", 1), ("error", 2)]
