"""Gemini's thought signatures across an Ollama client's tool loop: the sans-I/O store, the
stream translator that feeds it, and the loop driven by ollama-python against a backend
that refuses a tool call without its signature, as Gemini 3 does."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

import ollama
import pytest

from trioproxy.signatures import STAND_IN_SIGNATURE, ThoughtSignatures
from trioproxy.translate import OllamaStreamTranslator

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving

StartProxy = Callable[..., ServerProcess]
WEATHER_ARGS = '{"city": "Paris", "unit": "C"}'


def _call(call_id: str | None, name: str, arguments: str, signature: str | None) -> dict:
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        call["id"] = call_id
    if signature is not None:
        call["extra_content"] = {"google": {"thought_signature": signature}}
    return call


def _signature(call: dict) -> str | None:
    return call.get("extra_content", {}).get("google", {}).get("thought_signature")


def _history(*calls: dict, question: str = "weather?") -> list[dict]:
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": list(calls)},
        {"role": "tool", "content": "sunny", "tool_call_id": "call00000"},
    ]


def _answered(store: ThoughtSignatures, model: str, question: str, *calls: dict) -> None:
    """The first turn: the request (its conversation), then the backend's signed calls."""
    conversation = store.attach(model, [{"role": "user", "content": question}], tools=TOOLS)
    store.remember(conversation, model, calls)


TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]


GEMINI = "gemini-3-pro-preview"


def test_a_signature_comes_back_by_id_or_by_function_and_arguments() -> None:
    store = ThoughtSignatures()
    signed, unsigned = (
        _call("fc-1", "weather", WEATHER_ARGS, "sig-A"),
        _call("fc-2", "t", "{}", None),
    )
    _answered(store, GEMINI, "weather?", signed, unsigned)
    by_id = _history(_call("fc-1", "weather", "{}", None))
    store.attach(GEMINI, by_id)
    assert _signature(by_id[1]["tool_calls"][0]) == "sig-A"
    # ollama-python keeps no id: the proxy's generated one, the arguments written again
    by_content = _history(_call("call00000", "weather", '{"unit":"C","city":"Paris"}', None))
    store.attach(GEMINI, by_content)
    assert _signature(by_content[1]["tool_calls"][0]) == "sig-A"
    kept = _history(_call("call00000", "weather", WEATHER_ARGS, "the-clients-own"))
    store.attach(GEMINI, kept)
    assert _signature(kept[1]["tool_calls"][0]) == "the-clients-own"


def test_a_signature_is_found_only_in_its_own_turn_model_and_client() -> None:
    """A review: two clients making the same call got each other's signature (the
    model's encrypted reasoning), and a model that sent none got the field."""
    store = ThoughtSignatures()
    _answered(store, GEMINI, "weather in Paris?", _call(None, "weather", WEATHER_ARGS, "sig-A"))
    _answered(store, GEMINI, "Paris, please", _call(None, "weather", WEATHER_ARGS, "sig-B"))
    for question, signature in (("weather in Paris?", "sig-A"), ("Paris, please", "sig-B")):
        history = _history(_call(None, "weather", WEATHER_ARGS, None), question=question)
        store.attach(GEMINI, history)
        assert _signature(history[1]["tool_calls"][0]) == signature
    other = _history(_call(None, "weather", WEATHER_ARGS, None), question="weather in Paris?")
    assert store.attach("mistral-large", other) is None
    assert "extra_content" not in other[1]["tool_calls"][0]  # not every backend's field
    named = ThoughtSignatures()
    first = [{"role": "user", "content": "weather?"}]
    named.remember(named.attach(GEMINI, first, client="alice", tools=TOOLS), GEMINI,
                   [_call(None, "weather", WEATHER_ARGS, "sig-alice")])  # fmt: skip
    for client, signature in (("alice", "sig-alice"), ("bob", STAND_IN_SIGNATURE)):
        history = _history(_call(None, "weather", WEATHER_ARGS, None))
        named.attach(GEMINI, history, client=client)
        assert _signature(history[1]["tool_calls"][0]) == signature


def test_one_lost_signature_or_a_new_system_prompt_costs_no_other() -> None:
    """A review: the key was the history with signatures put back, so one forgotten call
    (the first, the least recently used) changed the keys of every later one; and a system
    prompt that changed between turns (a date in it) lost every signature."""
    store = ThoughtSignatures()
    history: list[Any] = [
        {"role": "system", "content": "Today is Monday."},
        {"role": "user", "content": "plan my day"},
    ]
    for n in range(3):
        sent_now = json.loads(json.dumps(history))  # as each request translates it anew
        conversation = store.attach(GEMINI, sent_now, tools=TOOLS)
        store.remember(conversation, GEMINI, [_call(None, f"f{n}", "{}", f"sig-{n}")])
        history += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call(None, f"f{n}", "{}", None)],
            },
            {"role": "tool", "content": "done", "tool_call_id": "call00000"},
        ]
    (lost,) = [key for key, signature in store._held.items() if signature == "sig-0"]
    store._held.pop(lost)  # the first call's signature is forgotten
    history[0] = {"role": "system", "content": "Today is Tuesday."}
    sent = json.loads(json.dumps(history))
    store.attach(GEMINI, sent)
    signed = [_signature(m["tool_calls"][0]) for m in sent if m.get("tool_calls")]
    assert signed == [STAND_IN_SIGNATURE, "sig-1", "sig-2"]


def test_a_tool_answers_images_start_no_turn() -> None:
    """A review: the user message the proxy makes of a tool answer's images started a
    turn, so two steps that saw the same screenshot and made the same call shared a key:
    the later step's signature went back on the earlier call."""
    store = ThoughtSignatures()
    screenshot = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    history: list[Any] = [{"role": "user", "content": "click until done"}]
    for n in range(3):
        sent_now = json.loads(json.dumps(history))
        conversation = store.attach(GEMINI, sent_now, tools=TOOLS)
        store.remember(conversation, GEMINI, [_call(None, "click", "{}", f"sig-{n}")])
        history += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [_call(None, "click", "{}", None)],
            },
            {"role": "tool", "content": "clicked", "tool_call_id": "call00000"},
            screenshot,
        ]
    sent = json.loads(json.dumps(history))
    store.attach(GEMINI, sent)
    signed = [_signature(m["tool_calls"][0]) for m in sent if m.get("tool_calls")]
    assert signed == ["sig-0", "sig-1", "sig-2"]


def test_an_unknown_call_gets_the_stand_in_only_where_signatures_are_wanted() -> None:
    elsewhere = ThoughtSignatures("api.openai.com")
    plain = _history(_call(None, "weather", WEATHER_ARGS, None))
    elsewhere.attach("gpt-4o", plain)
    assert "extra_content" not in plain[1]["tool_calls"][0]
    for host, model in (
        ("generativelanguage.googleapis.com", "gemini-2.5-flash"),
        ("us-central1-aiplatform.googleapis.com", "google/gemini-2.5-pro"),
        ("openrouter.ai", "google/gemini-3-pro-preview"),  # a fresh worker, a gateway
    ):
        first, second = _call(None, "a", "{}", None), _call(None, "b", "{}", None)
        ThoughtSignatures(host).attach(model, _history(first, second))
        assert _signature(first) == STAND_IN_SIGNATURE and _signature(second) is None
    assert not ThoughtSignatures("googleapis.com.evil.example").wants("gpt-4o")
    learned = ThoughtSignatures("127.0.0.1")
    learned.remember(None, "my-model", [_call("x", "a", "{}", "sig")])  # it sends them
    unknown = _history(_call(None, "other", "{}", None))
    learned.attach("my-model", unknown)
    assert _signature(unknown[1]["tool_calls"][0]) == STAND_IN_SIGNATURE
    assert learned.attach("your-model", _history(_call(None, "o", "{}", None))) is None


def test_signatures_and_their_keys_are_held_within_their_byte_budget() -> None:
    """A review: keys held the whole arguments, uncounted (192 MiB for a 4 MiB budget)."""
    store = ThoughtSignatures(max_bytes=10_000)
    for n in range(50):
        big = json.dumps({"n": n, "text": "x" * 100_000})
        _answered(store, GEMINI, f"q{n}", _call(f"id-{n}", "write_file", big, "s" * 100))
        assert store.held_bytes <= 10_000
    assert 0 < len(store) <= 2 * 50
    recent = _history(_call("id-49", "write_file", "{}", None), question="q49")
    store.attach(GEMINI, recent)
    assert _signature(recent[1]["tool_calls"][0]) == "s" * 100
    old = _history(_call("id-0", "write_file", "{}", None), question="q0")
    store.attach(GEMINI, old)
    assert _signature(old[1]["tool_calls"][0]) == STAND_IN_SIGNATURE


def test_the_stream_translator_hands_on_whole_calls_with_their_extra_content() -> None:
    seen: list[list[dict]] = []
    translator = OllamaStreamTranslator("chat", "m", start_ns=0, on_tool_calls=seen.append)
    delta = _call("fc-1", "weather", WEATHER_ARGS, "sig-A") | {"index": 0}
    chunk = {"choices": [{"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None}]}
    translator.feed(chunk, 10)
    (line,) = translator.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, 20)
    assert "extra_content" not in line["message"]["tool_calls"][0]  # Ollama has no such field
    ((call,),) = seen
    assert _signature(call) == "sig-A" and call["function"]["arguments"] == WEATHER_ARGS


class _GeminiLikeBackend(ScriptedHandler):
    """Answers a chat with a signed tool call; refuses a history whose tool calls lack
    their signatures (Gemini 3's 400), and records the signatures it got back."""

    received: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        self.answer(200, b'{"object": "list", "data": [{"id": "gemini-3-pro"}]}')

    def do_POST(self) -> None:
        body = self.json_body()
        for message in body["messages"]:
            for call in message.get("tool_calls") or []:
                type(self).received.append(_signature(call))
                if _signature(call) is None:
                    error = {"code": 400, "message": "Function call is missing a thought_signature"}
                    self.answer(400, json.dumps([{"error": error}]).encode())
                    return
        if body["messages"][-1]["role"] == "tool":
            message = {"role": "assistant", "content": "It is sunny."}
            self._reply(body, message, {"content": "It is sunny."})
            return
        call = _call("function-call-1", "weather", WEATHER_ARGS, "c2lnbmF0dXJl")
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        self._reply(body, message, {"tool_calls": [call | {"index": 0}]})

    def _reply(self, body: dict, message: dict, delta: dict) -> None:
        if not body.get("stream"):
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            self.answer(200, json.dumps({"id": "x", "object": "chat.completion",
                                         "choices": [choice]}).encode())  # fmt: skip
            return
        events = [
            {"id": "x", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
            {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        self.answer(200, data + b"data: [DONE]\n\n", "text/event-stream")


@pytest.mark.parametrize("stream", [False, True])
def test_an_ollama_clients_tool_loop_brings_geminis_signature_back(
    start_proxy: StartProxy, stream: bool
) -> None:
    """A review: Gemini 3 refuses a tool call sent back without the thought signature it
    came with, and Ollama's tool calls have no field to carry it (ollama-python keeps only
    the function): every second turn of a tool loop through /api/chat was a 400."""
    _GeminiLikeBackend.received = []
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    with serving(_GeminiLikeBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        with ollama.Client(host=proxy.url, timeout=10) as client:
            messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
            answer = _chat(client, messages, tools, stream)
            assert answer.tool_calls and answer.tool_calls[0].function.name == "weather"
            messages += [answer, {"role": "tool", "content": "sunny", "tool_name": "weather"}]
            assert _chat(client, messages, tools, stream).content == "It is sunny."
    assert _GeminiLikeBackend.received == ["c2lnbmF0dXJl"]


def _chat(client: ollama.Client, messages: list[Any], tools: list, stream: bool) -> Any:
    if not stream:
        return client.chat(model="gemini-3-pro", messages=messages, tools=tools).message
    parts = list(client.chat(model="gemini-3-pro", messages=messages, tools=tools, stream=True))
    message = parts[0].message
    for part in parts[1:]:
        message.content = (message.content or "") + (part.message.content or "")
        message.tool_calls = message.tool_calls or part.message.tool_calls
    return message
