"""STREAM_KEEPALIVE_SECONDS: SSE comments while a /v1 stream's backend is silent (a
reasoning model thinking after its role chunk), so a load balancer's idle timeout does
not cut it; never on /api (NDJSON has no comment line), never with the setting off."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import anthropic
import httpx
import openai
import pytest

from tests.conftest import ServerProcess
from tests.fakes import ScriptedHandler, serving

SILENCE = 1.5  # the backend's pause after its first chunk
KEEPALIVE = "0.5"


def _event(payload: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return _event({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                   "model": "thinker", "choices": [choice]})  # fmt: skip


_RESPONSE = {"id": "resp_1", "object": "response", "model": "thinker", "output": []}


class ThinkingBackend(ScriptedHandler):
    """Sends the role chunk (or a Responses stream's first event), is silent for SILENCE
    s, then finishes the answer."""

    def do_GET(self) -> None:
        if self.path.startswith("/v1/responses/resp_1"):  # a resumed Responses stream
            first = _event({"type": "response.created", "sequence_number": 0,
                            "response": {**_RESPONSE, "status": "in_progress"}},
                           "response.created")  # fmt: skip
            usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
            done = {**_RESPONSE, "status": "completed", "usage": usage}
            rest = _event({"type": "response.completed", "sequence_number": 1,
                           "response": done}, "response.completed")  # fmt: skip
            self._stream(first, rest)
            return
        models = {"object": "list", "data": [{"id": "thinker", "object": "model"}]}
        self.answer(200, json.dumps(models).encode())

    def do_POST(self) -> None:
        body = self.json_body()
        first = _chunk({"role": "assistant", "content": ""})
        if body["model"] == "talker":  # says something first, then thinks in silence
            first = _chunk({"role": "assistant", "content": "forty"})
            rest = _chunk({"content": "-two"}) + _chunk({}, "stop") + b"data: [DONE]\n\n"
            self._stream(first, rest)
            return
        rest = _chunk({"content": "forty-two"}) + _chunk({}, "stop") + b"data: [DONE]\n\n"
        self._stream(first, rest)

    def _stream(self, first: bytes, rest: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(first)
        self.wfile.flush()
        time.sleep(SILENCE)
        self.wfile.write(rest)
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def thinking_backend() -> Iterator[str]:
    with serving(ThinkingBackend) as url:
        yield url


@pytest.fixture(scope="module")
def kept_alive(thinking_backend: str, start_proxy: Callable[..., ServerProcess]) -> ServerProcess:
    return start_proxy(thinking_backend, STREAM_KEEPALIVE_SECONDS=KEEPALIVE)


def _raw_lines(url: str, method: str = "POST", **kwargs: object) -> list[tuple[float, bytes]]:
    """Each line of the reply's body, with when it arrived (s since the request)."""
    start = time.monotonic()
    lines = []
    with httpx.stream(method, url, timeout=10, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append((time.monotonic() - start, line.encode()))
    return lines


def _chat(url: str, path: str = "/v1/chat/completions") -> list[tuple[float, bytes]]:
    body = {"model": "thinker", "stream": True, "messages": [{"role": "user", "content": "q"}]}
    return _raw_lines(url + path, json=body)


def _comments(lines: list[tuple[float, bytes]]) -> list[float]:
    return [at for at, line in lines if line.startswith(b":")]


def test_the_openai_client_reads_a_stream_kept_alive_whole(kept_alive: ServerProcess) -> None:
    client = openai.OpenAI(base_url=kept_alive.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "q"}], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "forty-two"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_silent_backend_gets_comments_between_the_events(kept_alive: ServerProcess) -> None:
    lines = _chat(kept_alive.url)
    comments = _comments(lines)
    # 1.5 s of silence at 0.5 s: two or three (the third races the answer), never a burst
    assert 2 <= len(comments) <= 4, lines
    assert all(line == b": keep-alive" for at, line in lines if line.startswith(b":"))
    data = [line for _, line in lines if line.startswith(b"data:")]
    assert b'"role"' in data[0] and data[-1] == b"data: [DONE]"
    # only in the silence: after the role chunk, before the rest of the answer
    role_at = next(at for at, line in lines if b'"role"' in line)
    rest_at = next(at for at, line in lines if b"forty-two" in line)
    assert all(role_at < at < rest_at for at in comments)


def _chat_counts(url: str) -> tuple[float, float]:
    """The /v1/chat/completions streams finished and chunks they sent, per the metrics."""
    streams = chunks = 0.0
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if 'endpoint="v1_chat_completions"' not in line:
            continue
        if line.startswith("trioproxy_streams_total{"):
            streams += float(line.rsplit(" ", 1)[1])
        elif line.startswith("trioproxy_stream_chunks_total{"):
            chunks += float(line.rsplit(" ", 1)[1])
    return streams, chunks


def test_comments_count_as_no_chunk(kept_alive: ServerProcess) -> None:
    streams, chunks = _chat_counts(kept_alive.url)
    comments = _comments(_chat(kept_alive.url))
    for _ in range(100):  # the stream is recorded just after its last byte went out
        now_streams, now_chunks = _chat_counts(kept_alive.url)
        if now_streams > streams:
            break
        time.sleep(0.05)
    relayed = now_chunks - chunks
    # the backend's two writes (its role chunk; the rest, after the silence) are relayed
    # as they are read: two chunks, three if a read splits the rest, never the comments
    assert len(comments) >= 2 and 2 <= relayed <= 3


def test_a_resumed_responses_stream_is_kept_alive_too(kept_alive: ServerProcess) -> None:
    lines = _raw_lines(kept_alive.url + "/v1/responses/resp_1?stream=true", method="GET")
    assert 2 <= len(_comments(lines)) <= 4, lines
    assert any(b"response.completed" in line for _, line in lines)


def test_no_comment_with_the_setting_off(
    thinking_backend: str, start_proxy: Callable[..., ServerProcess]
) -> None:
    off = start_proxy(thinking_backend)
    lines = _chat(off.url)
    assert _comments(lines) == []
    assert any(b"forty-two" in line for _, line in lines)


def test_ollama_streams_never_get_one(kept_alive: ServerProcess) -> None:
    lines = _chat(kept_alive.url, "/api/chat")
    # every line is one JSON object (Ollama's clients decode each): no comment, no blank
    replies = [json.loads(line) for _, line in lines]
    assert "".join(r["message"]["content"] for r in replies) == "forty-two"
    assert replies[-1]["done"] is True


def test_a_client_that_leaves_in_a_silence_is_a_cancelled_stream(
    thinking_backend: str, start_proxy: Callable[..., ServerProcess]
) -> None:
    """The client leaves after a comment, while the keep-alive task waits to write the
    next one: the stream is the client's cancel (499), with no error or traceback."""
    proxy = start_proxy(thinking_backend, STREAM_KEEPALIVE_SECONDS="0.2", LOG_LEVEL="INFO")
    body = {"model": "thinker", "stream": True, "messages": [{"role": "user", "content": "q"}]}
    url = proxy.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=10) as response:
        for line in response.iter_lines():
            if line.startswith(":"):
                break  # a comment came: leave in the silence
    deadline = time.monotonic() + 10
    while 'status="499"' not in (metrics := httpx.get(proxy.url + "/metrics", timeout=5).text):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    time.sleep(SILENCE)  # the backend's rest arrives for nobody, the keep-alive is gone
    log = proxy.log()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert httpx.get(proxy.url + "/health", timeout=5).status_code == 200


def test_an_anthropic_stream_gets_pings_in_a_silence(kept_alive: ServerProcess) -> None:
    """/v1/messages is an event stream too: after its first events (message_start and the
    text block's start come with the first text), a silence gets Anthropic's own
    keep-alive, ``ping`` events, which the anthropic SDKs drop before the caller sees them
    and Claude Code's byte watchdog counts as traffic; no comments."""
    body = {"model": "talker", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "q"}]}  # fmt: skip
    lines = _raw_lines(kept_alive.url + "/v1/messages", json=body)
    assert _comments(lines) == [], lines
    pings = [at for at, line in lines if line == b"event: ping"]
    assert 2 <= len(pings) <= 4, lines
    assert sum(line == b'data: {"type":"ping"}' for _, line in lines) == len(pings)
    first_at = next(at for at, line in lines if b"forty" in line)
    rest_at = next(at for at, line in lines if b"-two" in line)
    assert all(first_at < at < rest_at for at in pings)
    with anthropic.Anthropic(base_url=kept_alive.url, api_key="x", max_retries=0) as sdk:
        with sdk.messages.stream(
            model="talker", max_tokens=50, messages=[{"role": "user", "content": "q"}]
        ) as stream:
            message = stream.get_final_message()
    assert message.content[0].text == "forty-two"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
