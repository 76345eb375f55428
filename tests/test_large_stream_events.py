"""One large event in a translated stream (a whole answer in one chunk, a tool call's
arguments) does not hold the event loop: ``/api/chat`` and ``/v1/messages`` decode,
translate and encode it in the JSON thread, in order, and the client gets what the
translator gives on the loop. A relayed ``/v1`` stream passes such an event on as it came,
counted. No wall-clock timing is asserted: the loop's freedom is shown by a thread held
until the loop has served another client's stream to its end.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, ClassVar

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trioproxy import errors, relay
from trioproxy import translate as tr
from trioproxy.anthropic import AnthropicStreamTranslator, encode_event
from trioproxy.errors import MASKED_AT_ONCE_BYTES, ProxyError
from trioproxy.json_threads import OFF_LOOP_BYTES
from trioproxy.jsonutil import compact_json

from .fakes import ScriptedHandler, serving
from .test_large_json import HOLD_SECONDS, serving_proxy
from .test_relay import DONE, ROLE, Script, last_error, ollama, run_relay, token

BIG = 3 * OFF_LOOP_BYTES  # past the threshold, a few MB at most
# text with what makes finding a string's end hard: escaped quotes, a string that ends in
# an escaped backslash, line ends, non-ASCII
_TEXT = 'say "hi" to C:\\\\ then\n go on — ünïcode '


def _long(chars: int = BIG) -> str:
    return (_TEXT * (chars // len(_TEXT) + 1))[:chars]


def _chunk(delta: dict[str, Any], finish: str | None = None, **top: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1,
            "model": "demo-chat", "choices": [choice], **top}  # fmt: skip


def _tool_delta(arguments: str) -> dict[str, Any]:
    function = {"name": "write_file", "arguments": arguments}
    return {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": function}]}


# JSON in JSON, with quotes and backslashes in its text
ARGUMENTS = json.dumps(
    {"path": "C:\\dir\\", "content": _long().replace('"', "'"), "more": ['a"b\\', "c"]}
)


# ---- through the proxy: real sockets -----------------------------------------------------


def _sse(events: list[Any]) -> bytes:
    return b"".join(b"data: " + compact_json(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


LARGE_STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": _long()}),
    _chunk({"content": " and more"}),
    _chunk(_tool_delta(ARGUMENTS)),
    _chunk({}, "tool_calls"),
    {**_chunk({}), "choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 34}},
]
SMALL_STREAM = [_chunk({"content": f"w{i} "}) for i in range(5)] + [_chunk({}, "stop")]


class LargeEvents(ScriptedHandler):
    """Streams LARGE_STREAM to a model named ``large``, SMALL_STREAM to any other."""

    bodies: ClassVar[list[bytes]] = []

    def do_GET(self) -> None:
        self.answer(200, b'{"object": "list", "data": [{"id": "large"}, {"id": "small"}]}')

    def do_POST(self) -> None:
        asked = self.json_body()
        body = _sse(LARGE_STREAM if asked["model"] == "large" else SMALL_STREAM)
        type(self).bodies.append(body)
        self.answer(200, body, "text/event-stream")


def _tokens(exposition: str) -> dict[str, float]:
    counted: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "trioproxy_tokens_total":
                kind = sample.labels["type"]
                counted[kind] = counted.get(kind, 0) + sample.value
    return counted


async def test_a_relayed_stream_with_large_events_is_relayed_as_it_came_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/v1/chat/completions``: the client gets the backend's bytes; the tokens are
    counted."""
    monkeypatch.setattr(LargeEvents, "bodies", [])
    asked = {"model": "large", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with serving(LargeEvents) as backend:
        async with serving_proxy(backend) as client:
            before = _tokens((await client.get("/v1/metrics/prometheus")).text)
            async with client.stream("POST", "/v1/chat/completions", json=asked) as response:
                assert response.status_code == 200
                body = await response.aread()
            after = _tokens((await client.get("/v1/metrics/prometheus")).text)
    assert body == LargeEvents.bodies[-1]
    assert after["input"] - before.get("input", 0) == 21
    assert after["output"] - before.get("output", 0) == 34


class HeldInThread:
    """``relay.<name>`` (a large event's work in the JSON thread: ``_translated``,
    ``_observed``) held until :attr:`release` is set (at most HOLD_SECONDS)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released: list[bool] = []
        self.threads: list[bool] = []  # whether each call ran on the loop's thread
        original = getattr(relay, name)

        def held(*args: Any) -> Any:
            self.threads.append(threading.current_thread() is threading.main_thread())
            self.entered.set()
            self.released.append(self.release.wait(HOLD_SECONDS))
            return original(*args)

        monkeypatch.setattr(relay, name, held)


async def _large_while_another_flows(
    client: Any, path: str, asked: dict[str, Any], held: HeldInThread
) -> bytes:
    """The body of a stream of large events on ``path``, whose work ``held`` holds in
    the JSON thread until another client's stream (``/api/chat`` of the small model) has
    been read to its end."""
    bodies: list[bytes] = []
    small = {"model": "small", "messages": asked["messages"], "stream": True}

    async def large() -> None:
        async with client.stream("POST", path, json=asked) as response:
            assert response.status_code == 200
            bodies.append(await response.aread())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(large)
        assert await trio.to_thread.run_sync(held.entered.wait, 2 * HOLD_SECONDS)
        other = await client.post("/api/chat", json=small)
        assert other.status_code == 200, other.text
        assert json.loads(other.text.splitlines()[-1])["done"] is True
        held.release.set()
    return bodies[0]


def _expected(path: str, events: list[Any]) -> list[Any]:
    """What the translator gives for ``events``, each decoded and fed on this thread."""
    if path == "/api/chat":
        translator: Any = tr.OllamaStreamTranslator("chat", "large", start_ns=0)
    else:
        translator = AnthropicStreamTranslator("large", "msg_x", start_ns=0)
    out: list[Any] = []
    for event in events:
        out += translator.feed(event, 1)
    end = translator.finish(2)
    return out + (end if isinstance(end, list) else [end])


def _comparable(path: str, item: Any) -> Any:
    """A line or event without what differs from run to run (times, ids)."""
    if isinstance(item, dict):
        return {key: _comparable(path, value) for key, value in item.items()
                if key not in ("created_at", "id") and not key.endswith("_duration")}  # fmt: skip
    return item


@pytest.mark.parametrize("path", ["/api/chat", "/v1/messages"])
async def test_a_large_event_is_translated_in_a_thread_while_other_streams_flow(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A translated stream's large events are decoded, translated and encoded in the JSON
    thread: held there until another client's stream on the same worker has been read to
    its end (on the loop, that stream could not move, and the hold would run out), and
    the client gets what the translator gives on the loop, in order."""
    held = HeldInThread(monkeypatch, "_translated")
    messages = [{"role": "user", "content": "hi"}]
    asked: dict[str, Any] = {"model": "large", "messages": messages, "stream": True}
    if path == "/v1/messages":
        asked["max_tokens"] = 100
    bodies: list[bytes] = []
    with serving(LargeEvents) as backend:
        async with serving_proxy(backend) as client:
            bodies.append(await _large_while_another_flows(client, path, asked, held))
    assert held.released == [True, True]  # the content chunk and the tool call's
    assert held.threads == [False, False]
    if path == "/api/chat":
        got = [json.loads(line) for line in bodies[0].splitlines()]
    else:
        got = [
            json.loads(line[6:]) for line in bodies[0].splitlines() if line.startswith(b"data: ")
        ]
    expected = [json.loads(compact_json(item)) for item in _expected(path, LARGE_STREAM)]
    if path == "/v1/messages":  # as the relay encodes them
        expected = [json.loads(encode_event(item).split(b"data: ")[1]) for item in expected]
    assert [_comparable(path, item) for item in got] == [
        _comparable(path, item) for item in expected
    ]


async def test_a_relayed_large_event_is_observed_in_a_thread_while_other_streams_flow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/v1/chat/completions``: a large event is relayed as it came but decoded for the
    metrics (its tokens, usage, finish) in the JSON thread: held there until another
    client's stream on the same worker has been read to its end (on the loop, that stream
    could not move, and the hold would run out). The client gets the backend's bytes, and
    the stream is counted as on the loop."""
    monkeypatch.setattr(LargeEvents, "bodies", [])
    held = HeldInThread(monkeypatch, "_observed")
    messages = [{"role": "user", "content": "hi"}]
    asked = {"model": "large", "stream": True, "messages": messages}
    bodies: list[bytes] = []
    with serving(LargeEvents) as backend:
        async with serving_proxy(backend) as client:
            before = _tokens((await client.get("/v1/metrics/prometheus")).text)

            path = "/v1/chat/completions"
            bodies.append(await _large_while_another_flows(client, path, asked, held))
            after = _tokens((await client.get("/v1/metrics/prometheus")).text)
            outcomes = (await client.get("/v1/metrics/prometheus")).text
    assert held.released == [True, True]  # the content chunk and the tool call's
    assert held.threads == [False, False]
    assert bodies[0] == LargeEvents.bodies[0]
    assert after["input"] - before.get("input", 0) == 21
    # the small stream's tokens besides (no usage: one per content chunk)
    assert after["output"] - before.get("output", 0) == 34 + 5
    assert 'outcome="completed"' in outcomes and 'outcome="error"' not in outcomes


async def test_a_relayed_large_event_gives_the_observer_what_the_loop_gives() -> None:
    """The relay's account of a stream whose events are large (a content chunk, a tool
    call's arguments, a failure's message): the same relayed bytes, tokens, first token,
    finish reason, usage and failure as each event fed to an observer on the loop."""
    failure = json.dumps({"error": {"message": "too long: " + "x" * BIG}}).encode()
    script: Script = [(0, ROLE)]
    script += [(0, b"data: " + compact_json(event) + b"\n\n") for event in LARGE_STREAM]
    script += [(0, b"data: " + failure + b"\n\n"), (0, DONE)]
    expected = tr.OpenAIStreamObserver()
    for _, event in script:
        if event != DONE:
            expected.feed_text(event[6:-2].decode(), 1)
    observed: list[Watched] = []

    class Watched(tr.OpenAIStreamObserver):
        """Notes where each large event is fed."""

        def __init__(self) -> None:
            super().__init__()
            self.large_on_loop: list[bool] = []

        def _note(self, data: str) -> None:
            if len(data) > OFF_LOOP_BYTES:
                on_loop = threading.current_thread() is threading.main_thread()
                self.large_on_loop.append(on_loop)

        def feed_text(self, data: str, now_ns: int) -> None:
            self._note(data)
            super().feed_text(data, now_ns)

        def feed_decoded(self, data: str, now_ns: int) -> None:
            self._note(data)
            super().feed_decoded(data, now_ns)

    def relayed(response: Any, settings: Any, collector: Any) -> Any:
        observer = Watched()
        observed.append(observer)
        return relay.relay_openai(
            response, observer, settings=settings, metric=None, sent_at=time.perf_counter(),
            collector=collector,
        )  # fmt: skip

    out, _, _ = await run_relay(script, relayed)
    got = observed[0]
    assert got.large_on_loop == [False, False, False]  # content, tool call, failure
    assert out == b"".join(event for _, event in script)
    assert got.content_chunks == expected.content_chunks == 3
    assert got.first_token_ns is not None
    assert (got.prompt_tokens, got.completion_tokens) == (21, 34)
    assert got.finish_reason == expected.finish_reason == "tool_calls"
    assert got.failed and expected.failed and got.error == expected.error


# ---- the relay's own account: what the loop would have given -----------------------------


def _large_error(at_first: bool) -> Script:
    """A stream whose backend reports its failure in an event past OFF_LOOP_BYTES (a
    message quoting a whole prompt), first or after a token."""
    failure = json.dumps({"error": {"message": "prompt too long: " + "x" * BIG}}).encode()
    script: Script = [(0, ROLE)] if at_first else [(0, ROLE), (0, token("a"))]
    return [*script, (0, b"data: " + failure + b"\n\n"), (0, DONE)]


async def _relayed_or_refused(script: Script) -> tuple[bytes, str]:
    """What the relay sent, or how it refused the request (its start: it is long)."""
    out, refused = b"", ""
    try:
        out, _, _ = await run_relay(script, ollama)
    except* ProxyError as group:
        error = group.exceptions[0]
        refused = f"{type(error).__name__}: {str(error)[:40]}"
    return out, refused


@pytest.mark.parametrize("at_first", [True, False])
async def test_a_large_event_reporting_a_failure_ends_the_stream_as_a_small_one_does(
    monkeypatch: pytest.MonkeyPatch, at_first: bool
) -> None:
    """A backend's failure reported in one large event (read in the JSON thread) is not fed
    to the translator: the request is refused with the backend's error when nothing was
    sent yet, else the stream ends with it in its error line, as on the loop."""
    script = _large_error(at_first)
    apart = await _relayed_or_refused(script)
    monkeypatch.setattr(relay, "OFF_LOOP_BYTES", 100 * BIG)  # the same event on the loop
    assert apart == await _relayed_or_refused(script)
    out, refused = apart
    if at_first:
        assert refused.startswith("ProxyError: prompt too long: xxx"), refused
    else:
        assert last_error(out).startswith("prompt too long: xxx")
        assert json.loads(out.splitlines()[0])["message"]["content"] == "a"


async def test_whole_tool_calls_a_large_event_completes_are_told_on_the_loop_after_it() -> None:
    """The whole calls a translator completes with a large event (fed in the JSON thread)
    reach ``on_tool_calls`` (the thought-signature cache, which the app holds) on the
    loop's thread, once the event's work is done, in order, and later ones at once."""
    told: list[tuple[str, bool]] = []

    def on_tool_calls(calls: list[dict[str, Any]]) -> None:
        for call in calls:
            on_loop = threading.current_thread() is threading.main_thread()
            told.append((call["function"]["name"], on_loop))

    def calling(response: Any, settings: Any, collector: Any) -> Any:
        translator = tr.OllamaStreamTranslator(
            "chat", "m", start_ns=0, created_at=lambda: "T", on_tool_calls=on_tool_calls
        )
        return relay.relay_ollama(
            response, translator, settings=settings, metric=None, sent_at=time.perf_counter(),
            collector=collector,
        )  # fmt: skip

    def call(name: str, arguments: str, index: int) -> bytes:
        """A whole call in one event, finished in it (as a backend that does not stream
        its calls writes them): its event completes it."""
        function = {"name": name, "arguments": arguments}
        delta = {"tool_calls": [{"index": index, "id": f"call_{name}", "function": function}]}
        return b"data: " + compact_json(_chunk(delta, "tool_calls")) + b"\n\n"

    script: Script = [(0, ROLE), (0, call("large", ARGUMENTS, 0))]
    script += [(0, call("small", "{}", 1)), (0, DONE)]
    out, _, _ = await run_relay(script, calling)
    lines = [json.loads(line) for line in out.splitlines()]
    sent = [c["function"]["name"] for line in lines for c in line["message"].get("tool_calls", ())]
    assert sent == ["large", "small"]
    assert told == [("large", True), ("small", True)]


STREAM_KEY = "sk-stream-key-0123456789abcdef"


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_a_large_event_with_escapes_is_masked_in_pieces(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """With a backend key (every real deployment), what a stream sends is searched for
    its spellings: a large event holding backslashes (a tool call's arguments, JSON in
    JSON) was searched in one call on the loop (17 MB: 28-44 ms, after its translation
    had left the loop), now in pieces of MASKED_AT_ONCE_BYTES; the client gets the same
    bytes."""
    searched: list[int] = []
    search = errors._boundary_matches

    def watched(pattern: Any, data: Any, pos: int, end: int) -> Any:
        if isinstance(data, bytes):
            searched.append(end - pos)
        return search(pattern, data, pos, end)

    messages = [{"role": "user", "content": "hi"}]
    asked = {"model": "large", "messages": messages, "stream": True}
    bodies: list[bytes] = []
    with serving(LargeEvents) as backend:
        async with serving_proxy(backend, api_key=STREAM_KEY) as client:
            for masked_in_pieces in (False, True):
                searched.clear()
                with monkeypatch.context() as patch:
                    if masked_in_pieces:
                        patch.setattr(errors, "_boundary_matches", watched)
                    async with client.stream("POST", path, json=asked) as response:
                        assert response.status_code == 200
                        bodies.append(await response.aread())
    assert searched and max(searched) <= 2 * MASKED_AT_ONCE_BYTES, max(searched)
    if path == "/v1/chat/completions":
        assert bodies[1] == LargeEvents.bodies[-1]
    else:  # the same lines as without the watch (the times aside)
        lines = [[_comparable(path, json.loads(line)) for line in b.splitlines()] for b in bodies]
        assert lines[0] == lines[1] and len(lines[0]) > 3


async def test_a_relayed_large_responses_event_is_observed_in_a_thread_as_on_the_loop() -> None:
    """``/v1/responses``: its closing event carries the whole response (an image in
    base64: several MB); observed in the JSON thread, it ends the stream with its usage
    and status as on the loop."""
    image = "A" * BIG
    completed = {
        "type": "response.completed",
        "response": {
            "id": "resp_1", "model": "m", "status": "completed",
            "output": [{"type": "image_generation_call", "result": image}],
            "usage": {"input_tokens": 5, "output_tokens": 7},
        },
    }  # fmt: skip
    delta = {"type": "response.output_text.delta", "delta": "hi"}
    script: Script = [
        (0, b"data: " + compact_json(event) + b"\n\n") for event in (delta, completed)
    ]
    on_loop: list[bool] = []

    class Watched(tr.ResponsesStreamObserver):
        def feed_text(self, data: str, now_ns: int) -> None:
            if len(data) > OFF_LOOP_BYTES:
                on_loop.append(threading.current_thread() is threading.main_thread())
            super().feed_text(data, now_ns)

    observed: list[Watched] = []

    def relayed(response: Any, settings: Any, collector: Any) -> Any:
        observer = Watched()
        observed.append(observer)
        end = relay.StreamEnd()
        end.responses = True
        return relay.relay_openai(
            response, observer, settings=settings, metric=None, sent_at=time.perf_counter(),
            collector=collector, end=end,
        )  # fmt: skip

    out, _, _ = await run_relay(script, relayed)
    got = observed[0]
    assert on_loop == [False]
    assert out == b"".join(event for _, event in script)
    assert got.ended and not got.failed
    assert (got.prompt_tokens, got.completion_tokens) == (5, 7)
    assert (got.finish_reason, got.response_id, got.content_chunks) == ("completed", "resp_1", 1)
