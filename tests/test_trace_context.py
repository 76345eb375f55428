"""W3C Trace Context: a client's ``traceparent`` (and its ``tracestate``) go on to the
backend, so a trace that reaches the proxy goes on in a backend that traces. Pure checks
of what is passed on, then the real ``openai`` and ``ollama`` clients through a proxy to a
backend that records the headers it got."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import ClassVar

import httpx
import ollama
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioproxy.exchange import MAX_TRACESTATE_CHARS, trace_context

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def test_a_valid_traceparent_goes_on_with_its_tracestate() -> None:
    assert trace_context([PARENT], [STATE]) == {"traceparent": PARENT, "tracestate": STATE}
    assert trace_context([PARENT], []) == {"traceparent": PARENT}
    # a later version may add fields after version 00's four
    later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes"
    assert trace_context([later], []) == {"traceparent": later}


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # 00 has four fields
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
        PARENT + "\n",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-" + "x" * 300,
    ],
)
def test_a_broken_traceparent_is_not_passed_on_and_takes_its_tracestate_along(
    traceparent: str,
) -> None:
    assert trace_context([traceparent], [STATE]) is None


def test_a_tracestate_too_long_or_unprintable_is_left_out() -> None:
    assert trace_context([PARENT], ["a=" + "b" * MAX_TRACESTATE_CHARS]) == {"traceparent": PARENT}
    assert trace_context([PARENT], ["a=b\r\nX-Injected: 1"]) == {"traceparent": PARENT}
    # a byte past ASCII arrives as latin-1 text: printable, but not a header httpx sends
    assert trace_context([PARENT], ["a=\xe9"]) == {"traceparent": PARENT}


def test_repeated_headers_follow_the_specification() -> None:
    """Two traceparents are as broken as a malformed one; tracestate's copies are one
    list, combined as HTTP combines a list header (and bounded as a whole)."""
    assert trace_context([PARENT, PARENT], [STATE]) is None
    halves = STATE.split(",")
    assert trace_context([PARENT], halves) == {"traceparent": PARENT, "tracestate": STATE}
    long_half = "a=" + "b" * (MAX_TRACESTATE_CHARS // 2)
    assert trace_context([PARENT], [long_half, long_half]) == {"traceparent": PARENT}


@given(st.text(max_size=80), st.text(max_size=600))
def test_whatever_a_client_sends_only_a_valid_header_goes_on(parent: str, state: str) -> None:
    trace = trace_context([parent], [state])
    if trace is not None:
        assert trace["traceparent"] == parent and parent.isprintable()
        assert set(trace) <= {"traceparent", "tracestate"}
        assert all(len(value) <= MAX_TRACESTATE_CHARS for value in trace.values())
        assert all(value.isascii() for value in trace.values())  # what httpx can send


class _Recording(ScriptedHandler):
    """A chat backend that remembers the trace headers of each chat request."""

    seen: ClassVar[list[dict[str, str | None]]] = []

    def do_GET(self) -> None:
        if "/responses/" in self.path:
            self.seen.append(
                {name: self.headers.get(name) for name in ("traceparent", "tracestate")}
            )
            answer = {"id": "resp_1", "object": "response", "model": "m", "status": "completed"}
            self.answer(200, json.dumps(answer).encode())
            return
        self.answer(200, json.dumps({"object": "list", "data": [{"id": "m"}]}).encode())

    def do_POST(self) -> None:
        body = self.json_body()
        self.seen.append({name: self.headers.get(name) for name in ("traceparent", "tracestate")})
        if body.get("stream"):
            chunks = [
                {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            ]
            events = b"".join(
                b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                        "model": "m", **chunk}).encode() + b"\n\n"
                for chunk in chunks
            ) + b"data: [DONE]\n\n"  # fmt: skip
            self.answer(200, events, "text/event-stream")
            return
        message = {"role": "assistant", "content": "ok"}
        choice = {"index": 0, "finish_reason": "stop", "message": message}
        reply = {"id": "c", "object": "chat.completion", "created": 1, "model": "m"}
        self.answer(200, json.dumps({**reply, "choices": [choice]}).encode())


def test_the_clients_trace_reaches_the_backend(start_proxy: Callable[..., ServerProcess]) -> None:
    traced = {"traceparent": PARENT, "tracestate": STATE}
    _Recording.seen.clear()
    messages = [{"role": "user", "content": "hi"}]
    broken = {"traceparent": "00-zz", "tracestate": STATE}
    with serving(_Recording) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0) as chat:
            chat.chat.completions.create(model="m", messages=messages, extra_headers=traced)
            list(chat.chat.completions.create(model="m", messages=messages, stream=True,
                                              extra_headers=traced))  # fmt: skip
        with ollama.Client(host=proxy.url, headers=traced) as local:
            local.chat(model="m", messages=messages)
            list(local.chat(model="m", messages=messages, stream=True))
        for headers in ({}, broken):  # none given; a broken one, not passed on
            with ollama.Client(host=proxy.url, headers=headers) as other:
                other.chat(model="m", messages=messages)
    assert _Recording.seen == [dict(traced)] * 4 + [{"traceparent": None, "tracestate": None}] * 2


def test_repeated_trace_headers_reach_the_backend_as_the_specification_says(
    start_proxy: Callable[..., ServerProcess],
) -> None:
    """Both paths read every copy of the headers: the POSTs' fast path, and Quart's routes
    (a GET of a stored response, which asks the backend)."""
    _Recording.seen.clear()
    congo, rojo = STATE.split(",")
    split_state = [("traceparent", PARENT), ("tracestate", congo), ("tracestate", rojo)]
    twice = [("traceparent", PARENT), ("traceparent", PARENT), ("tracestate", STATE)]
    messages = [{"role": "user", "content": "hi"}]
    with serving(_Recording) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        for headers in (split_state, twice):
            for path, body in (
                ("/v1/chat/completions", {"model": "m", "messages": messages}),
                ("/api/chat", {"model": "m", "messages": messages, "stream": False}),
            ):
                reply = httpx.post(proxy.url + path, json=body, headers=headers, timeout=10)
                assert reply.status_code == 200, reply.text
            reply = httpx.get(proxy.url + "/v1/responses/resp_1", headers=headers, timeout=10)
            assert reply.status_code == 200, reply.text
    untraced = {"traceparent": None, "tracestate": None}
    assert _Recording.seen == [{"traceparent": PARENT, "tracestate": STATE}] * 3 + [untraced] * 3


def test_a_tracestate_past_ascii_is_dropped_not_a_500(
    start_proxy: Callable[..., ServerProcess],
) -> None:
    """A client's header bytes past ASCII (latin-1 text to the proxy) would fail the
    backend request as it is encoded: the trace goes on without that tracestate."""
    _Recording.seen.clear()
    headers = {"traceparent": PARENT.encode(), "tracestate": b"a=\xe9"}
    messages = [{"role": "user", "content": "hi"}]
    with serving(_Recording) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        for path, body in (
            ("/v1/chat/completions", {"model": "m", "messages": messages}),
            ("/api/chat", {"model": "m", "messages": messages, "stream": False}),
        ):
            reply = httpx.post(proxy.url + path, json=body, headers=headers, timeout=10)
            assert reply.status_code == 200, reply.text
    assert _Recording.seen == [{"traceparent": PARENT, "tracestate": None}] * 2
