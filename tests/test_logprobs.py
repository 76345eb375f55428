"""Ollama's ``logprobs`` / ``top_logprobs`` through the translation: the request checks and
what the backend is asked, the answer's ``choices[0].logprobs`` as Ollama's top-level
``logprobs`` (non-stream and streamed: no entry lost, none twice, in order), and the same
end to end with the real ``ollama`` client through a proxy to the demo backend (and the
``openai`` client's logprobs relayed unchanged on ``/v1``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ollama._types import ChatResponse, GenerateResponse

from trioproxy import translate as tr
from trioproxy.demo.script import REASONING_TOKENS
from trioproxy.jsonutil import compact_json
from trioproxy.translate import (
    OllamaStreamTranslator,
    RequestValidationError,
    Timings,
    openai_chat_to_ollama_chat,
    openai_chat_to_ollama_generate,
    validate_ollama_chat,
    validate_ollama_generate,
)

from .conftest import ServerProcess

STAMP = "2024-01-02T03:04:05.000000006Z"
TIMINGS = Timings(total_ns=10, prompt_eval_ns=2, eval_ns=8)


def entry(token: str, logprob: float = -0.5, top: int = 0) -> dict[str, Any]:
    """An OpenAI ``logprobs.content[]`` entry, with ``top`` alternatives."""
    alternatives = [
        {"token": f"{token}~{i}", "logprob": logprob - i, "bytes": list(f"{token}~{i}".encode())}
        for i in range(top)
    ]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": alternatives,
    }


def as_ollama(e: dict[str, Any]) -> dict[str, Any]:
    """What Ollama's answer holds for the OpenAI entry ``e`` (empty lists left out)."""
    out = {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}
    if e["top_logprobs"]:
        out["top_logprobs"] = e["top_logprobs"]
    return out


# ---- request ---------------------------------------------------------------------------------


@pytest.mark.parametrize("validate", [validate_ollama_chat, validate_ollama_generate])
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs must be between 0 and 20"),
        # Ollama checks the bound whether logprobs is asked or not
        ({"top_logprobs": 99}, "top_logprobs must be between 0 and 20"),
        ({"logprobs": True, "top_logprobs": 2.5}, "field 'top_logprobs' must be an integer"),
        ({"logprobs": True, "top_logprobs": "3"}, "field 'top_logprobs' must be an integer"),
        ({"logprobs": True, "top_logprobs": True}, "field 'top_logprobs' must be an integer"),
        ({"logprobs": "yes"}, "field 'logprobs' must be a boolean"),
        ({"logprobs": 1}, "field 'logprobs' must be a boolean"),
    ],
)
def test_logprob_fields_are_checked_as_ollama_checks_them(
    validate: Callable[[object], Any], fields: dict[str, Any], message: str
) -> None:
    body = {"model": "m", "prompt": "p", "messages": [{"role": "user", "content": "p"}], **fields}
    with pytest.raises(RequestValidationError) as caught:
        validate(body)
    assert caught.value.message == message
    assert caught.value.field in ("logprobs", "top_logprobs")


@pytest.mark.parametrize("kind", ["chat", "generate"])
@pytest.mark.parametrize(
    "fields, sent",
    [
        ({"logprobs": True, "top_logprobs": 5}, {"logprobs": True, "top_logprobs": 5}),
        ({"logprobs": True, "top_logprobs": 20}, {"logprobs": True, "top_logprobs": 20}),
        ({"logprobs": True}, {"logprobs": True}),
        ({"logprobs": True, "top_logprobs": 0}, {"logprobs": True}),
        # Ollama ignores top_logprobs without logprobs: the backend is not asked either
        ({"logprobs": False, "top_logprobs": 3}, {}),
        ({"top_logprobs": 3}, {}),
        ({}, {}),
    ],
)
def test_the_backend_is_asked_for_logprobs_only_when_the_client_is(
    kind: str, fields: dict[str, Any], sent: dict[str, Any]
) -> None:
    if kind == "chat":
        body = validate_ollama_chat(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
        )
        payload = tr.ollama_chat_to_openai(body, "b")
    else:
        body = validate_ollama_generate({"model": "m", "prompt": "hi", **fields})
        payload = tr.ollama_generate_to_openai(body, "b")
    asked = {key: payload[key] for key in ("logprobs", "top_logprobs") if key in payload}
    assert asked == sent


# ---- non-stream answers ----------------------------------------------------------------------


def completion(content: str, logprobs: object, refusal: str | None = None) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "refusal": refusal}
    choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": logprobs}
    return {"choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


@pytest.mark.parametrize("kind", ["chat", "generate"])
def test_a_completions_logprobs_become_ollamas(kind: str) -> None:
    entries = [entry("Hel", -0.25, top=2), entry("lo", -1.5)]
    resp = completion("Hello", {"content": entries, "refusal": None})
    convert = openai_chat_to_ollama_chat if kind == "chat" else openai_chat_to_ollama_generate
    out = convert(resp, "m", STAMP, TIMINGS, logprobs=True)
    assert out["logprobs"] == [as_ollama(e) for e in entries]
    assert "top_logprobs" not in out["logprobs"][1]  # none asked: left out, as by Ollama
    parsed = (ChatResponse if kind == "chat" else GenerateResponse).model_validate(out)
    assert [lp.token for lp in parsed.logprobs or []] == ["Hel", "lo"]
    assert parsed.logprobs and parsed.logprobs[0].top_logprobs
    assert [t.token for t in parsed.logprobs[0].top_logprobs] == ["Hel~0", "Hel~1"]
    # not asked for (the backend sent them anyway): not there, as from Ollama
    assert "logprobs" not in convert(resp, "m", STAMP, TIMINGS)


def test_a_refusals_logprobs_follow_the_contents_as_its_text_does() -> None:
    resp = completion("", {"content": None, "refusal": [entry("I can"), entry("not")]}, "I cannot")
    out = openai_chat_to_ollama_chat(resp, "m", STAMP, TIMINGS, logprobs=True)
    assert out["message"]["content"] == "I cannot"
    assert [e["token"] for e in out["logprobs"]] == ["I can", "not"]


def test_entries_ollamas_clients_would_refuse_are_left_out() -> None:
    """ollama-python requires a token and a number; a backend's odd entry must not break
    the whole answer (pydantic refuses it), nor reach the client as a null logprob."""
    odd = [
        "not an entry",
        {"token": None, "logprob": -1},
        {"token": "x", "logprob": "low"},
        {"token": "inf", "logprob": float("-inf"), "bytes": None, "top_logprobs": None},
        {"token": "b", "logprob": -2, "bytes": [300, "x"], "top_logprobs": [{"token": 1}]},
    ]
    out = openai_chat_to_ollama_chat(
        completion("x", {"content": odd}), "m", STAMP, TIMINGS, logprobs=True
    )
    assert out["logprobs"] == [{"token": "inf", "logprob": -9999.0}, {"token": "b", "logprob": -2}]
    ChatResponse.model_validate(json.loads(compact_json(out)))
    none = openai_chat_to_ollama_chat(completion("x", None), "m", STAMP, TIMINGS, logprobs=True)
    assert "logprobs" not in none  # omitempty, as Ollama writes it


# ---- streams ---------------------------------------------------------------------------------


def chunk(
    delta: dict[str, Any] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    refusal: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    lp = None if logprobs is None and refusal is None else {"content": logprobs, "refusal": refusal}
    choice = {"index": 0, "delta": delta or {}, "logprobs": lp, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "choices": [choice]}


def translator(
    kind: str = "chat", *, logprobs: bool = True, show_thinking: bool = True
) -> OllamaStreamTranslator:
    return OllamaStreamTranslator(
        kind,  # type: ignore[arg-type]
        "m",
        start_ns=0,
        created_at=lambda: STAMP,
        show_thinking=show_thinking,
        logprobs=logprobs,
    )


def run(t: OllamaStreamTranslator, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every line the stream writes, the done line last, as a client reads them."""
    lines = [line for now, c in enumerate(chunks, 1) for line in t.feed(c, now)]
    lines.append(t.finish(len(chunks) + 1))
    return [json.loads(compact_json(line)) for line in lines]


def tokens_out(lines: list[dict[str, Any]]) -> list[str]:
    return [e["token"] for line in lines for e in line.get("logprobs", ())]


def test_each_token_rides_on_its_own_line() -> None:
    t = translator()
    lines = run(
        t,
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}, [entry("Hel", top=3)]),
            chunk({"content": "lo"}, [entry("lo")]),
            chunk({}, finish="stop"),
        ],
    )
    assert [line["message"]["content"] for line in lines] == ["Hel", "lo", ""]
    assert [line.get("logprobs") for line in lines] == [
        [as_ollama(entry("Hel", top=3))],
        [as_ollama(entry("lo"))],
        None,
    ]
    for line in lines:
        ChatResponse.model_validate(line)


def test_logprobs_of_a_chunk_without_a_line_ride_on_the_next_one() -> None:
    """A role chunk, tool-call fragments and a finish chunk write no line of their own:
    their entries go out with the next line written (the tool call's, the done line)."""
    t = translator()
    call = {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}
    lines = run(
        t,
        [
            chunk({"role": "assistant"}, [entry("<role>")]),
            chunk({"tool_calls": [call]}, [entry("{")]),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}, [entry("}")]),
            chunk({}, [entry("<eos>")], finish="tool_calls"),
        ],
    )
    assert len(lines) == 2  # the call, whole, and the done line: as without logprobs
    assert lines[0]["message"]["tool_calls"][0]["function"]["name"] == "f"
    assert tokens_out(lines[:1]) == ["<role>", "{", "}", "<eos>"]
    tail = run(translator(), [chunk({"content": "a"}, [entry("a")]), chunk({}, [entry("z")])])
    assert tokens_out(tail) == ["a", "z"] and tail[-1]["done"] is True
    assert tail[-1]["logprobs"] == [as_ollama(entry("z"))]


def test_held_logprobs_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend streaming a long tool call with logprobs: past MAX_HELD_LOGPROBS, the
    held entries go out on a line of their own rather than piling up."""
    monkeypatch.setattr(tr.streams, "MAX_HELD_LOGPROBS", 3)
    t = translator()
    fragment = {"index": 0, "function": {"name": "f", "arguments": "x"}}
    chunks = [chunk({"tool_calls": [fragment]}, [entry(f"t{i}")]) for i in range(8)]
    lines = run(t, [*chunks, chunk({}, finish="tool_calls")])
    assert tokens_out(lines) == [f"t{i}" for i in range(8)]
    own = [line for line in lines if "logprobs" in line and not line["message"].get("tool_calls")]
    assert [len(line["logprobs"]) for line in own] == [4, 4]
    assert all(line["message"]["content"] == "" and not line["done"] for line in own)
    assert len(t._held_logprobs) == 0


def test_hidden_reasoning_hides_its_logprobs() -> None:
    """think: false hides the reasoning, whose tokens' texts would show it."""
    chunks = [
        chunk({"reasoning_content": "hmm"}, [entry("hmm")]),
        chunk({"content": "ok"}, [entry("ok")]),
    ]
    assert tokens_out(run(translator(show_thinking=False), chunks)) == ["ok"]
    shown = run(translator(), chunks)
    assert tokens_out(shown) == ["hmm", "ok"]
    assert shown[0]["message"]["thinking"] == "hmm" and shown[0]["logprobs"]


def test_refusal_logprobs_stream_too() -> None:
    lines = run(translator("generate"), [chunk({"refusal": "No."}, refusal=[entry("No.")])])
    assert lines[0]["response"] == "No." and tokens_out(lines) == ["No."]


def test_not_asked_for_none_are_written() -> None:
    t = translator(logprobs=False)
    lines = run(t, [chunk({"content": "a"}, [entry("a")]), chunk({}, [entry("b")], "stop")])
    assert tokens_out(lines) == []


def test_a_chunk_with_logprobs_null_keeps_the_fast_path() -> None:
    """Asked for logprobs, a backend that sends none writes its lines the cheap way; a
    chunk that carries some is decoded (feed_text says None) and its entries kept."""
    t = translator()
    plain = json.dumps(chunk({"content": "a"}))
    assert '"logprobs": null' in plain
    assert t.feed_text(plain, 1) is not None
    with_entries = json.dumps(chunk({"content": "b"}, [entry("b")]))
    assert t.feed_text(with_entries, 2) is None
    (line,) = t.feed(json.loads(with_entries), 2)
    assert line["logprobs"] == [as_ollama(entry("b"))]


def test_a_token_cut_inside_a_surrogate_pair_keeps_its_logprobs() -> None:
    """The first half of a pair is held for the next line; its chunk's entries go with it."""
    lines = run(
        translator(),
        [
            chunk({"content": "\ud83d"}, [entry("\\xf0\\x9f")]),
            chunk({"content": "\ude00"}, [entry("x")]),
        ],
    )
    assert lines[0]["message"]["content"] == "\U0001f600"
    assert tokens_out(lines[:1]) == ["\\xf0\\x9f", "x"]


_KINDS = ("content", "reasoning", "role", "tool", "finish", "usage", "empty", "refusal", "none")


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[str, dict[str, Any], list[str]]]:
    """Chunks of every kind the translator treats differently, each with its tokens."""
    out = []
    counter = 0
    call_started = False
    for kind in draw(st.lists(st.sampled_from(_KINDS), max_size=25)):
        n = draw(st.integers(0, 3))
        tokens = [f"t{counter + i}" for i in range(n)]
        counter += n
        entries = [entry(tok, -0.1 * (i + 1), top=i % 3) for i, tok in enumerate(tokens)]
        if kind == "content":
            c = chunk({"content": "".join(tokens) or "x"}, entries)
        elif kind == "reasoning":
            c = chunk({"reasoning_content": "r"}, entries)
        elif kind == "role":
            c = chunk({"role": "assistant", "content": ""}, entries)
        elif kind == "tool":
            delta: dict[str, Any] = {
                "index": 0,
                "function": {"arguments": "{}"[: 1 + call_started]},
            }
            if not call_started:
                delta.update(id="call_1", function={"name": "f", "arguments": "{"})
            call_started = True
            c = chunk({"tool_calls": [delta]}, entries)
        elif kind == "finish":
            c = chunk({}, entries, finish=draw(st.sampled_from(["stop", "tool_calls"])))
        elif kind == "refusal":
            c = chunk({"refusal": "no"}, None, refusal=entries)
        elif kind == "usage":
            c = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
            tokens = []
        elif kind == "empty":
            c = chunk({}, entries)
        else:  # no logprobs member at all
            c = chunk({"content": "n"})
            tokens = []
        out.append((kind, c, tokens))
    return out


@settings(max_examples=300, deadline=None)
@given(streams(), st.sampled_from(["chat", "generate"]), st.booleans())
def test_no_entry_is_lost_or_written_twice(
    stream: list[tuple[str, dict[str, Any], list[str]]], kind: str, show_thinking: bool
) -> None:
    chunks = [c for _, c, _ in stream]
    lines = run(translator(kind, show_thinking=show_thinking), chunks)
    expected = [
        tok
        for k, _, tokens in stream
        if show_thinking or k != "reasoning"  # hidden with the reasoning they spell
        for tok in tokens
    ]
    assert tokens_out(lines) == expected
    # and the lines are those written without logprobs, each with its entries added
    plain = run(translator(kind, show_thinking=show_thinking, logprobs=False), chunks)
    assert [{k: v for k, v in line.items() if k != "logprobs"} for line in lines] == plain
    model = ChatResponse if kind == "chat" else GenerateResponse
    for line in lines:
        model.model_validate(line)


# ---- end to end: the ollama client, a proxy, the demo backend --------------------------------


def marker() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture
def client(proxy: ServerProcess) -> Iterator[ollama.Client]:
    with ollama.Client(host=proxy.url, timeout=30) as c:
        yield c


def check_entries(logprobs: Any, text: str, top: int) -> list[Any]:
    """The entries spell ``text``, each with ``top`` alternatives led by itself."""
    assert logprobs, "no logprobs"
    assert "".join(lp.token for lp in logprobs) == text
    for lp in logprobs:
        assert -1.0 < lp.logprob < 0
        assert len(lp.top_logprobs or []) == top
        if top:
            assert lp.top_logprobs[0].token == lp.token
    return [lp.model_dump() for lp in logprobs]


@pytest.mark.parametrize("top", [0, 3, 20])
def test_ollama_chat_logprobs_through_the_proxy(client: ollama.Client, top: int) -> None:
    messages = [{"role": "user", "content": f"Hi [[tokens=6]] {marker()}"}]
    whole = client.chat(
        model="demo-chat", messages=messages, stream=False, logprobs=True, top_logprobs=top
    )
    entries = check_entries(whole.logprobs, whole.message.content, top)
    assert len(entries) == 6
    parts = list(
        client.chat(
            model="demo-chat", messages=messages, stream=True, logprobs=True, top_logprobs=top
        )
    )
    streamed = [lp.model_dump() for p in parts for lp in p.logprobs or ()]
    assert streamed == entries
    # one token per line, as the backend streamed them
    assert all(len(p.logprobs or ()) == 1 for p in parts if p.message.content)


def test_ollama_generate_logprobs_through_the_proxy(client: ollama.Client) -> None:
    prompt = f"Hi [[tokens=5]] {marker()}"
    whole = client.generate(
        model="demo-chat", prompt=prompt, stream=False, logprobs=True, top_logprobs=2
    )
    entries = check_entries(whole.logprobs, whole.response, 2)
    parts = list(
        client.generate(
            model="demo-chat", prompt=prompt, stream=True, logprobs=True, top_logprobs=2
        )
    )
    assert [lp.model_dump() for p in parts for lp in p.logprobs or ()] == entries
    assert "".join(p.response for p in parts) == whole.response


def test_reasoning_model_logprobs_cover_the_answer(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": f"Hi [[tokens=4]] {marker()}"}]
    parts = list(
        client.chat(
            model="demo-reasoner", messages=messages, stream=True, logprobs=True, think=True
        )
    )
    thinking = "".join(p.message.thinking or "" for p in parts)
    assert thinking == "".join(REASONING_TOKENS)
    content = "".join(p.message.content for p in parts)
    check_entries([lp for p in parts for lp in p.logprobs or ()], content, 0)


def test_without_logprobs_there_are_none(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": f"Hi [[tokens=3]] {marker()}"}]
    assert client.chat(model="demo-chat", messages=messages, stream=False).logprobs is None
    parts = list(client.chat(model="demo-chat", messages=messages, stream=True, top_logprobs=5))
    assert all(p.logprobs is None for p in parts)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
def test_a_bad_top_logprobs_is_ollamas_400(client: ollama.Client, path: str) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        if path == "/api/chat":
            client.chat(model="demo-chat", messages=[{"role": "user", "content": "x"}],
                        logprobs=True, top_logprobs=21)  # fmt: skip
        else:
            client.generate(model="demo-chat", prompt="x", logprobs=True, top_logprobs=21)
    assert caught.value.status_code == 400
    assert caught.value.error == "top_logprobs must be between 0 and 20"


def test_openai_logprobs_are_relayed_unchanged(
    proxy: ServerProcess, demo_backend: ServerProcess
) -> None:
    """/v1 passes the backend's logprobs through as they are, streamed and not."""
    messages: list[Any] = [{"role": "user", "content": f"Hi [[tokens=4]] {marker()}"}]
    asked = {"model": "demo-chat", "messages": messages, "logprobs": True, "top_logprobs": 2}
    direct = httpx.post(f"{demo_backend.url}/chat/completions", json=asked, timeout=30).json()
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="x", timeout=30) as c:
        relayed = c.chat.completions.create(**asked)
        assert relayed.choices[0].logprobs is not None
        assert relayed.choices[0].logprobs.model_dump() == direct["choices"][0]["logprobs"]
        stream = c.chat.completions.create(**asked, stream=True)
        streamed = [
            e.model_dump()
            for ch in stream
            for choice in ch.choices
            if choice.logprobs is not None
            for e in choice.logprobs.content or ()
        ]
    assert streamed == direct["choices"][0]["logprobs"]["content"]


def test_the_demo_backend_answers_logprobs_as_openai_does(demo_backend: ServerProcess) -> None:
    """Made-up but deterministic: the same request gets the same entries, streamed or not;
    each content chunk carries its own; a bad top_logprobs is OpenAI's 400."""
    url = f"{demo_backend.url}/chat/completions"
    body = {
        "model": "demo-chat",
        "messages": [{"role": "user", "content": f"Hi [[tokens=3]] {marker()}"}],
        "logprobs": True,
        "top_logprobs": 4,
    }
    with httpx.Client(timeout=30) as http:
        first = http.post(url, json=body).json()["choices"][0]["logprobs"]
        again = http.post(url, json=body).json()["choices"][0]["logprobs"]
        assert first == again and len(first["content"]) == 3
        assert all(len(e["top_logprobs"]) == 4 for e in first["content"])
        with http.stream("POST", url, json={**body, "stream": True}) as response:
            events = [
                json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")
            ]
        chunks = [e["choices"][0] for e in events if e["choices"]]
        assert chunks[0]["logprobs"] is None  # the role chunk
        with_text = [c for c in chunks if c["delta"].get("content")]
        assert [c["logprobs"]["content"][0] for c in with_text] == first["content"]
        refused = http.post(url, json={**body, "top_logprobs": 21})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "top_logprobs"
        plain = http.post(url, json={**body, "logprobs": False}).json()
        assert plain["choices"][0]["logprobs"] is None
