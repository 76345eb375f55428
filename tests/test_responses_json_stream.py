"""A backend that answers a streamed ``POST /v1/responses`` with one Response object (it
ignores ``stream``: gateways bridging the Responses API onto providers without streaming,
older vLLM and LiteLLM, mocks): the client gets the event stream the Responses API would
have sent for it. The translation alone, each event checked against the openai SDK's own
models; then the official SDK through a proxy process, and the metrics."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, get_args

import httpx
import openai
import pydantic
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from openai.types.responses import ResponseStreamEvent

from trioproxy.sse import SSEParser
from trioproxy.translate import is_response, response_as_events, response_events

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving
from .test_metrics_e2e import scrape, total
from .test_responses_streams import RESPONSES_CUT

StartProxy = Callable[..., ServerProcess]
# each event's own model, by its type (the union has no discriminator pydantic reads: a
# mistake in one event would be reported against every model of the union)
EVENT_MODELS: dict[str, type[pydantic.BaseModel]] = {
    get_args(model.model_fields["type"].annotation)[0]: model
    for model in get_args(get_args(ResponseStreamEvent)[0])
}

CLIENT_MODEL = "team-model"  # as the client names it
BACKEND_MODEL = "org/backend-model"  # as the mapping sends it to the backend
USAGE = {
    "input_tokens": 11,
    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    "output_tokens": 7,
    "output_tokens_details": {"reasoning_tokens": 3},
    "total_tokens": 18,
}
CITATION = {"type": "url_citation", "start_index": 0, "end_index": 5, "title": "T",
            "url": "https://example.com/"}  # fmt: skip


def message(text: str, annotations: list[Any] | None = None) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": annotations or [],
            "logprobs": []}  # fmt: skip
    return {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
            "content": [part]}  # fmt: skip


REFUSAL = {"type": "message", "id": "msg_r", "status": "completed", "role": "assistant",
           "content": [{"type": "refusal", "refusal": "I cannot help with that."}]}  # fmt: skip
CALL = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "weather",
        "arguments": '{"city":"Paris"}', "status": "completed"}  # fmt: skip
REASONING = {"type": "reasoning", "id": "rs_1", "status": "completed",
             "summary": [{"type": "summary_text", "text": "The user greets."},
                         {"type": "summary_text", "text": "Greet back."}]}  # fmt: skip
SEARCH = {"type": "web_search_call", "id": "ws_1", "status": "completed",
          "action": {"type": "search", "query": "weather Paris"}}  # fmt: skip


def response(
    output: list[Any], status: str = "completed", model: str = BACKEND_MODEL, **fields: Any
) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1_700_000_000,
            "status": status, "error": None, "incomplete_details": None, "model": model,
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": USAGE, **fields}  # fmt: skip


INCOMPLETE = response(
    [message("Hello, wor")], "incomplete", incomplete_details={"reason": "max_output_tokens"}
)
FAILED = {"code": "server_error", "message": "the model crashed"}


# the closing event of each finished status (the API has none for a cancelled response)
CLOSING_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                  "failed": "response.failed", "cancelled": "response.incomplete"}  # fmt: skip


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


# ---- the translation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "whole",
    [
        response([message("Hello there", [CITATION])]),
        response([REASONING, message("Hi"), CALL, SEARCH, REFUSAL]),
        response([{**REASONING, "content": [{"type": "reasoning_text", "text": "hmm"}]}]),
        INCOMPLETE,
        response([message("Hel")], "failed", error=FAILED, usage=None),
        response([], "queued", usage=None, background=True),
        response([message("Hel")], "cancelled", usage=None, background=True),
        response([], "cancelled", usage=None, background=True),
    ],
)
def test_every_event_is_one_the_openai_sdk_reads(whole: dict[str, Any]) -> None:
    before = copy.deepcopy(whole)
    events = response_events(whole)
    assert whole == before  # nothing in it changed: the closing event carries it
    for event in events:
        EVENT_MODELS[event["type"]].model_validate(event)  # raises on a missing field
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    waiting = "queued" if whole["status"] == "queued" else "in_progress"
    assert kinds(events)[:2] == ["response.created", f"response.{waiting}"]
    opening = events[0]["response"]
    assert opening["output"] == [] and opening["usage"] is None
    assert opening["status"] == waiting
    if whole["status"] != "queued":
        closing = CLOSING_EVENTS[whole["status"]]
        assert events[-1] == {"type": closing, "sequence_number": len(events) - 1,
                              "response": whole}  # fmt: skip


def test_a_message_streams_its_text_whole_in_one_delta() -> None:
    events = response_events(response([message("Hello there", [CITATION])]))
    assert kinds(events) == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.annotation.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed",
    ]  # fmt: skip
    added, part, delta, annotation, done = events[2:7]
    assert added["item"]["content"] == [] and added["item"]["status"] == "in_progress"
    assert part["part"] == {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    assert delta["delta"] == "Hello there" and delta["item_id"] == "msg_1"
    assert (delta["output_index"], delta["content_index"]) == (0, 0)
    assert annotation["annotation"] == CITATION and annotation["annotation_index"] == 0
    assert done["text"] == "Hello there"
    assert events[8]["item"] == message("Hello there", [CITATION])


def test_calls_reasoning_and_refusals_stream_as_the_api_streams_them() -> None:
    events = response_events(response([REASONING, CALL, SEARCH, REFUSAL]))
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_kind.setdefault(event["type"], []).append(event)
    summaries = by_kind["response.reasoning_summary_text.delta"]
    assert [(e["summary_index"], e["delta"]) for e in summaries] == [
        (0, "The user greets."), (1, "Greet back.")]  # fmt: skip
    assert [e["item"]["summary"] for e in by_kind["response.output_item.added"][:1]] == [[]]
    (arguments,) = by_kind["response.function_call_arguments.delta"]
    assert arguments["delta"] == CALL["arguments"] and arguments["item_id"] == "fc_1"
    assert arguments["output_index"] == 1
    (done,) = by_kind["response.function_call_arguments.done"]
    # OpenAI's event names the function too (its OpenAPI spec requires it: clients
    # generated from it, Rust's and .NET's, refuse the event without)
    assert (done["arguments"], done["name"]) == (CALL["arguments"], "weather")
    assert by_kind["response.output_item.added"][1]["item"]["arguments"] == ""
    # a hosted tool's call: added and done as it is, nothing between
    assert by_kind["response.output_item.added"][2]["item"] == SEARCH
    assert by_kind["response.refusal.delta"][0]["delta"] == "I cannot help with that."
    assert by_kind["response.refusal.done"][0]["output_index"] == 3
    assert [e["item"] for e in by_kind["response.output_item.done"]] == [
        REASONING, CALL, SEARCH, REFUSAL]  # fmt: skip


def test_a_response_still_queued_has_only_its_opening_events() -> None:
    """A background response answered as queued: its stream is not over (the relay
    reports it cut, and the client may resume it by id)."""
    events = response_events(response([], "queued", usage=None, background=True))
    assert kinds(events) == ["response.created", "response.queued"]


def test_the_events_are_sse_with_their_names() -> None:
    whole = response([message("Hi")])
    parsed = SSEParser().feed(response_as_events(whole))
    assert [(e.event, json.loads(e.data)) for e in parsed] == [
        (e["type"], e) for e in response_events(whole)
    ]


def test_only_a_response_object_is_a_response() -> None:
    assert is_response(response([]))
    assert not is_response({"error": {"message": "x"}})
    assert not is_response({"object": "chat.completion", "choices": []})
    assert not is_response([response([])])


# ---- through the proxy, with the openai SDK ------------------------------------------------

_ANSWERS: dict[str, dict[str, Any]] = {
    "text": response([message("Hello there", [CITATION])]),
    "call": response([CALL]),
    "call-without-id": response([{k: v for k, v in CALL.items() if k != "id"}]),
    "reasoning": response([REASONING, message("Hi")]),
    "cut-short": INCOMPLETE,
    "failed": response([], "failed", error=FAILED, usage=None),
    "failed-midway": response([message("Hel")], "failed", error=FAILED, usage=None),
    "queued": response([], "queued", usage=None, background=True),
    "cancelled": response([message("Hel")], "cancelled", usage=None, background=True),
    "cancelled-at-once": response([], "cancelled", usage=None, background=True),
    "too-long": response([], "failed", usage=None,
                         error={"code": "context_length_exceeded", "message": "too long"}),
    "no-ids": response([{k: v for k, v in item.items() if k != "id"} for item in
                        (REASONING, message("Hello"), REASONING, message(" there"), CALL)]),
    # ids written empty, as one with none (the SDK's accumulator would match them alike)
    "empty-ids": response([{**item, "id": ""} for item in
                           (REASONING, message("Hello"), REASONING, message(" there"), CALL)]),
}  # fmt: skip


class JSONResponses(ScriptedHandler):
    """Answers every ``POST /responses`` (streamed or not) with its model's Response
    object (``_ANSWERS``, as the backend names its model, with an id of its own: the
    proxy's ledger keeps what it owes per id), and ``GET /responses/resp_{kind}`` with
    that one completed; ``error-json`` is a 200 holding an error, not a Response."""

    asked: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        if "/responses/resp_" in self.path:  # retrieved: finished, with its usage
            kind = self.path.rsplit("/resp_", 1)[1]
            finished = {**_answer(kind, BACKEND_MODEL), "status": "completed", "usage": USAGE}
            self.answer(200, json.dumps(finished).encode())
            return
        listed = [{"id": BACKEND_MODEL, "object": "model", "created": 1, "owned_by": "x"}]
        self.answer(200, json.dumps({"object": "list", "data": listed}).encode())

    def do_POST(self) -> None:
        body = self.json_body()
        type(self).asked.append(body)
        kind = body.get("metadata", {}).get("kind", "text")
        if kind == "error-json":
            body_out = {"error": {"message": "quota exceeded", "type": "insufficient_quota"}}
            self.answer(200, json.dumps(body_out).encode())
            return
        self.answer(200, json.dumps(_answer(kind, body["model"])).encode())


def _answer(kind: str, model: str) -> dict[str, Any]:
    return {**_ANSWERS[kind], "model": model, "id": f"resp_{kind}"}


@pytest.fixture(scope="module")
def proxy(start_proxy: StartProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    mapping: Path = tmp_path_factory.mktemp("mapping") / "models.json"
    mapping.write_text(json.dumps({CLIENT_MODEL: BACKEND_MODEL}), encoding="utf-8")
    with serving(JSONResponses) as url:
        yield start_proxy(url, MODEL_MAPPING_FILE=str(mapping), MAX_RETRIES="0").url


@pytest.fixture
def client(proxy: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy + "/v1", api_key="x", max_retries=0, timeout=30) as sdk:
        yield sdk


def _stream(client: openai.OpenAI, kind: str) -> list[Any]:
    return list(
        client.responses.create(
            model=CLIENT_MODEL, input="hi", stream=True, metadata={"kind": kind}
        )
    )


def _as_client_sees(kind: str) -> dict[str, Any]:
    return _answer(kind, CLIENT_MODEL)


def test_the_sdks_stream_gets_the_events_and_the_response_the_backend_answered(
    client: openai.OpenAI,
) -> None:
    events = _stream(client, "text")
    assert [e.type for e in events] == kinds(response_events(_ANSWERS["text"]))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert JSONResponses.asked[-1]["stream"] is True
    assert JSONResponses.asked[-1]["model"] == BACKEND_MODEL
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["Hello there"]
    last = events[-1]
    assert last.type == "response.completed"
    assert last.response.model_dump(exclude_none=True) == pydantic.TypeAdapter(
        openai.types.responses.Response
    ).validate_python(_as_client_sees("text")).model_dump(exclude_none=True)
    assert {e.response.model for e in events if hasattr(e, "response")} == {CLIENT_MODEL}


def test_the_sdks_stream_helper_gets_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=CLIENT_MODEL, input="hi",
                                 metadata={"kind": "reasoning"}) as stream:  # fmt: skip
        summaries = [e.delta for e in stream if e.type == "response.reasoning_summary_text.delta"]
        final = stream.get_final_response()
    assert summaries == ["The user greets.", "Greet back."]
    assert final.output_text == "Hi" and final.model == CLIENT_MODEL
    assert final.usage is not None and final.usage.output_tokens == 7
    assert final.output[0].type == "reasoning"
    assert [s.text for s in final.output[0].summary] == ["The user greets.", "Greet back."]


@pytest.mark.parametrize("kind", ["no-ids", "empty-ids"])
def test_items_without_ids_stream_to_the_sdks_stream_helper(
    client: openai.OpenAI, kind: str
) -> None:
    """Two messages and two reasoning items without ``id`` (a gateway that writes none,
    or writes it empty): the SDK's accumulator tells items apart by type and id, and
    raised "conflicting output identities" at the second of a kind; each gets an id of
    the API's shape."""
    with client.responses.stream(model=CLIENT_MODEL, input="hi",
                                 metadata={"kind": kind}) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == "Hello there"
    ids = [item.id for item in final.output]
    assert [i.split("_")[0] for i in ids] == ["rs", "msg", "rs", "msg", "fc"]
    assert len(set(ids)) == 5 and all(len(i.split("_")[1]) == 48 for i in ids)
    added = [e.item.id for e in events if e.type == "response.output_item.added"]
    deltas = [e.item_id for e in events if e.type == "response.output_text.delta"]
    assert added == ids and deltas == [ids[1], ids[3]]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_item_ids_are_derived_from_the_response_id_and_place() -> None:
    """The same response gives the same ids (a client that reads it twice sees the same
    items); another response, other ids; an item with its own id keeps it, and the
    response given is not changed."""
    whole = _answer("no-ids", BACKEND_MODEL)
    before = copy.deepcopy(whole)

    def item_ids(answer: dict[str, Any]) -> list[str]:
        return [item["id"] for item in response_events(answer)[-1]["response"]["output"]]

    first = item_ids(whole)
    assert whole == before
    assert item_ids(whole) == first
    assert set(item_ids({**whole, "id": "resp_other"})).isdisjoint(first)
    with_one = {**whole, "output": [message("Hi"), *whole["output"][1:]]}
    assert item_ids(with_one) == ["msg_1", *first[1:]]


def test_a_function_call_streams_its_arguments(client: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]
    with client.responses.stream(model=CLIENT_MODEL, input="hi", tools=tools,
                                 metadata={"kind": "call"}) as stream:  # fmt: skip
        arguments = [e for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert [(e.delta, e.snapshot) for e in arguments] == [(CALL["arguments"], CALL["arguments"])]
    (call,) = final.output
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == ("call_1", "weather", CALL["arguments"])


@pytest.mark.parametrize("kind", ["call", "call-without-id"])
def test_langchain_gets_the_arguments_once(proxy: str, kind: str) -> None:
    """langchain-openai (1.8.1 on) adds to an item's streamed argument deltas what its
    ``function_call_arguments.done`` holds past them, matching the events by ``item_id``
    (the added item's ``id``): the events made of a whole call name it alike throughout,
    its ``call_id`` when it has no ``id``, so the arguments arrive once."""
    with httpx.Client(timeout=30) as http:
        llm = ChatOpenAI(model=CLIENT_MODEL, base_url=proxy + "/v1", api_key="x",  # type: ignore[arg-type]
                         use_responses_api=True, max_retries=0, http_client=http,
                         extra_body={"metadata": {"kind": kind}})  # fmt: skip
        chunks = list(llm.stream("hi"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert isinstance(total, AIMessageChunk)
    (call,) = total.tool_calls
    assert (call["name"], call["args"], call["id"]) == ("weather", {"city": "Paris"}, "call_1")
    assert total.invalid_tool_calls == []


def test_an_incomplete_response_ends_with_its_incomplete_event(client: openai.OpenAI) -> None:
    events = _stream(client, "cut-short")
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
        "Hello, wor"
    )


def test_a_response_that_failed_midway_ends_with_its_failed_event(proxy: str) -> None:
    before = _outcomes(proxy)
    with openai.OpenAI(base_url=proxy + "/v1", api_key="x", max_retries=0) as sdk:
        events = list(sdk.responses.create(model=CLIENT_MODEL, input="hi", stream=True,
                                           metadata={"kind": "failed-midway"}))  # fmt: skip
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None
    assert events[-1].response.error.message == "the model crashed"
    _wait_for(lambda: _outcomes(proxy).get("error", 0) == before.get("error", 0) + 1)


@pytest.mark.parametrize(("kind", "status"), [("failed", 502), ("too-long", 400)])
def test_a_response_that_failed_before_any_output_gets_a_real_status(
    client: openai.OpenAI, kind: str, status: int
) -> None:
    """As a stream whose first read is its failure: nothing was sent, so the client gets
    a status (a 4xx for its own mistake, one the SDK does not retry)."""
    with pytest.raises(openai.APIStatusError) as failed:
        _stream(client, kind)
    assert failed.value.status_code == status


@pytest.mark.parametrize("kind", ["cancelled", "cancelled-at-once"])
def test_a_cancelled_response_ends_with_the_incomplete_event(proxy: str, kind: str) -> None:
    """A background response cancelled by id, answered to a stream: the API has no closing
    event for it, so it ends as a response cut short does (``response.incomplete``, its
    response ``cancelled``), a whole stream rather than one reported cut; with no output
    too (it is no failure of the backend's: no 502). Counted as a completed stream."""
    before = _outcomes(proxy)
    with openai.OpenAI(base_url=proxy + "/v1", api_key="x", max_retries=0) as sdk:
        events = list(sdk.responses.create(model=CLIENT_MODEL, input="hi", stream=True,
                                           background=True, metadata={"kind": kind}))  # fmt: skip
        with sdk.responses.stream(model=CLIENT_MODEL, input="hi", background=True,
                                  metadata={"kind": kind}) as stream:  # fmt: skip
            helper_events = list(stream)
            # the SDK's final response is a completed one's (as for an incomplete response)
            with pytest.raises(RuntimeError, match=r"response\.completed"):
                stream.get_final_response()
    for event in events:
        EVENT_MODELS[event.type].model_validate(event.model_dump())
    expected = kinds(response_events(_ANSWERS[kind]))
    assert [e.type for e in events] == [e.type for e in helper_events] == expected
    assert expected[-1] == "response.incomplete"
    assert events[-1].response.status == "cancelled"
    assert events[-1].response.model == CLIENT_MODEL
    text = "".join(e.delta for e in helper_events if e.type == "response.output_text.delta")
    assert text == ("Hel" if kind == "cancelled" else "")
    _wait_for(lambda: _outcomes(proxy).get("completed", 0) == before.get("completed", 0) + 2)


def test_json_that_is_no_response_is_still_a_502(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError, match="quota exceeded") as failed:
        _stream(client, "error-json")
    assert failed.value.status_code == 502


def test_the_stream_is_counted_once_with_the_backends_usage(proxy: str) -> None:
    """A completed stream on v1_responses, its first token timed, the backend's usage
    counted once: the ledger owes nothing for it, so a later retrieve counts nothing."""
    before, outcomes = scrape(proxy), _outcomes(proxy)
    with openai.OpenAI(base_url=proxy + "/v1", api_key="x", max_retries=0) as sdk:
        list(sdk.responses.create(model=CLIENT_MODEL, input="hi", stream=True))
        _wait_for(lambda: _outcomes(proxy).get("completed", 0) == outcomes.get("completed", 0) + 1)
        sdk.responses.retrieve("resp_text")
    after = scrape(proxy)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("trioproxy_tokens_total", type="input") == USAGE["input_tokens"]
    assert grew("trioproxy_tokens_total", type="output") == USAGE["output_tokens"]
    assert grew("trioproxy_time_to_first_token_seconds_count", endpoint="v1_responses") == 1
    assert grew("trioproxy_streams_total", endpoint="v1_responses") == 1


def _outcomes(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for labels, value in scrape(url).get("trioproxy_streams_total", []):
        if labels.get("endpoint") == "v1_responses":
            counts[labels["outcome"]] = counts.get(labels["outcome"], 0.0) + value
    return counts


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_plain_http_client_sees_event_lines(proxy: str) -> None:
    body = {"model": CLIENT_MODEL, "input": "hi", "stream": True}
    with httpx.stream("POST", proxy + "/v1/responses", json=body, timeout=10) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines() if line]
    assert lines[0] == "event: response.created"
    assert lines[-2] == "event: response.completed"


def test_a_queued_background_response_is_a_cut_stream_its_poll_counts(proxy: str) -> None:
    """A background response answered still queued: its opening events, then the stream
    is reported cut (it is not over: the client may resume it by id); its usage is owed,
    and counted once, by the poll that finds it finished."""
    before = scrape(proxy)
    with openai.OpenAI(base_url=proxy + "/v1", api_key="x", max_retries=0) as sdk:
        events: list[Any] = []
        stream = sdk.responses.create(
            model=CLIENT_MODEL,
            input="hi",
            stream=True,
            background=True,
            metadata={"kind": "queued"},
        )
        with pytest.raises(openai.APIError, match="ended before its last event") as cut:
            events.extend(stream)
        assert RESPONSES_CUT in str(cut.value)  # no finish_reason, no [DONE] in this API
        assert [e.type for e in events] == ["response.created", "response.queued"]
        assert events[0].response.id == "resp_queued"
        _wait_for(lambda: _outcomes(proxy).get("error", 0) > 0)
        sdk.responses.retrieve("resp_queued")
        sdk.responses.retrieve("resp_queued")
    after = scrape(proxy)
    grew = total(after, "trioproxy_tokens_total", type="input") - total(
        before, "trioproxy_tokens_total", type="input"
    )
    assert grew == USAGE["input_tokens"]


# ---- at MAX_RESPONSE_BYTES ----------------------------------------------------------------

LIMIT = 64 * 1024  # the proxy's MAX_RESPONSE_BYTES below


def _padded(answer: dict[str, Any], size: int, pad: Callable[[dict[str, Any], str], None]) -> bytes:
    """``answer`` as compact JSON of exactly ``size`` bytes, ``pad`` putting the text that
    makes it so in its place."""
    pad(answer, "")
    short = len(json.dumps(answer, separators=(",", ":")))
    pad(answer, "x" * (size - short))
    body = json.dumps(answer, separators=(",", ":")).encode()
    assert len(body) == size
    return body


def _response_text(answer: dict[str, Any], text: str) -> None:
    answer["output"][0]["content"][0]["text"] = text


def _chat_text(answer: dict[str, Any], text: str) -> None:
    answer["choices"][0]["message"]["content"] = text


class SizedAnswers(ScriptedHandler):
    """Answers every ``POST /responses`` and ``/chat/completions`` (a stream asked for or
    not) with one JSON body of exactly ``pad_to`` bytes (the request's own field, else
    the class's: ``/api/chat`` passes no field of its own)."""

    pad_to: ClassVar[int] = 1000

    def do_POST(self) -> None:
        asked = self.json_body()
        asked.setdefault("pad_to", self.pad_to)
        if self.path.endswith("/responses"):
            answer = response([message("")], model=asked["model"])
            body = _padded(answer, asked["pad_to"], _response_text)
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": ""},
                      "finish_reason": "stop"}  # fmt: skip
            answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                      "model": asked["model"], "choices": [choice]}  # fmt: skip
            body = _padded(answer, asked["pad_to"], _chat_text)
        self.answer(200, body)


@pytest.fixture(scope="module")
def limited(start_proxy: StartProxy) -> Iterator[openai.OpenAI]:
    with serving(SizedAnswers) as url:
        proxy_url = start_proxy(url, MAX_RESPONSE_BYTES=str(LIMIT), MAX_RETRIES="0").url
        with openai.OpenAI(base_url=proxy_url + "/v1", api_key="x", max_retries=0) as sdk:
            yield sdk


def test_a_response_of_the_largest_size_accepted_streams_whole(limited: openai.OpenAI) -> None:
    """A JSON body of exactly MAX_RESPONSE_BYTES is accepted, so are the events built from
    it: the closing one holds the whole response in its framing, some 60 bytes longer
    (it was refused by the relay's own event limit: a 502)."""
    events = list(limited.responses.create(model=BACKEND_MODEL, input="hi", stream=True,
                                           extra_body={"pad_to": LIMIT}))  # fmt: skip
    assert events[-1].type == "response.completed"
    for event in events:
        EVENT_MODELS[event.type].model_validate(event.model_dump())
    with limited.responses.stream(model=BACKEND_MODEL, input="hi",
                                  extra_body={"pad_to": LIMIT}) as stream:  # fmt: skip
        final = stream.get_final_response()
    assert len(final.output_text) > 60_000 and set(final.output_text) == {"x"}


def test_a_completion_of_the_largest_size_accepted_streams_whole(limited: openai.OpenAI) -> None:
    """The same for a chat completion: its one chunk holds the whole message, a few bytes
    longer as a chunk (``chat.completion.chunk``) and an event."""
    chunks = list(
        limited.chat.completions.create(
            model=BACKEND_MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"pad_to": LIMIT},
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert len(text) > 60_000 and set(text) == {"x"}
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kind", ["responses", "chat"])
def test_a_json_answer_one_byte_past_the_limit_is_a_502(limited: openai.OpenAI, kind: str) -> None:
    with pytest.raises(openai.APIStatusError, match="MAX_RESPONSE_BYTES") as refused:
        if kind == "responses":
            list(limited.responses.create(model=BACKEND_MODEL, input="hi", stream=True,
                                          extra_body={"pad_to": LIMIT + 1}))  # fmt: skip
        else:
            list(limited.chat.completions.create(model=BACKEND_MODEL, stream=True,
                 messages=[{"role": "user", "content": "hi"}],
                 extra_body={"pad_to": LIMIT + 1}))  # fmt: skip
    assert refused.value.status_code == 502
