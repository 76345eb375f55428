"""JSON too deep for the proxy's codecs, and bodies that are not quite one JSON object,
end to end: a client's deep body is the client's 400, a backend's deep answer the
backend's 502, in the caller's dialect, whichever of the two is deep (a deep client
body once made the proxy blame the client for a backend's deep answer).

The fake backend answers by the request's model name (read from the raw bytes: the
request itself may be too deep for the standard library to decode)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving

StartProxy = Callable[..., ServerProcess]


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


COMPLETION = {
    "id": "c",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
CHUNKS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
]
DEEP_ANSWER = nested(2000).encode()
# per model: the 2xx body the backend answers with, whatever the request
ANSWERS: dict[str, bytes] = {
    "deep": DEEP_ANSWER,
    "bom": b"\xef\xbb\xbf" + json.dumps(COMPLETION).encode(),
    "ndjson": b'{"a":1}\n{"b":2}\n',
    # read (1,024 levels), not written again (~900): a stream's one chunk cannot hold it
    "deep-readable": json.dumps({**COMPLETION, "x": "@"})
    .encode()
    .replace(b'"@"', nested(1010).encode()),
}


def _tool_call_event(arguments: str) -> bytes:
    """A chunk calling ``f`` with ``arguments`` (JSON text: a string or an object)."""
    call = '{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":%s}}'
    delta = '{"role":"assistant","tool_calls":[%s]}' % (call % arguments)
    return b'data: {"choices":[{"index":0,"delta":%s}]}\n\n' % delta.encode()


def _events(*first: bytes, finish: str = "stop") -> bytes:
    """An event stream: ``first``, then the chunks of a finished answer."""
    chunks = [*CHUNKS[:-1], {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}]
    rest = b"".join(b"data: %s\n\n" % json.dumps(c).encode() for c in chunks)
    return b"".join(first) + rest + b"data: [DONE]\n\n"


# arguments as JSON text: read (1,024 levels), not written again (~900)
DEEP_ARGUMENTS = json.dumps(nested(1010))
# per model: the event stream the backend answers a stream request with
STREAMS_OF: dict[str, bytes] = {
    "deep-event": _events(b'data: {"choices":[],"x":%s}\n\n' % DEEP_ANSWER),
    "deep-args": _events(_tool_call_event(DEEP_ARGUMENTS), finish="tool_calls"),
    "deep-args-object": _events(_tool_call_event(nested(1010)), finish="tool_calls"),
    # an older llama.cpp server's error field, and an error object without a message
    "deep-error-field": b'error: {"code":500,"message":"boom","x":%s}\n\n' % nested(1010).encode(),
    "deep-error-event": b'data: {"error":{"code":400,"x":%s}}\n\n' % nested(1010).encode(),
}
DEEP_CALL = {"id": "t", "type": "function", "function": {"name": "f", "arguments": nested(1010)}}
_MODEL = re.compile(rb'"model"\s*:\s*"([^"]*)"')
_STREAM = re.compile(rb'"stream"\s*:\s*true')


class _Backend(ScriptedHandler):
    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        found = _MODEL.search(raw)
        model = found[1].decode() if found else ""
        if model == "deep-error":
            self.answer(500, DEEP_ANSWER)
        elif model in ANSWERS:
            self.answer(200, ANSWERS[model])
        elif _STREAM.search(raw):
            self.answer(200, STREAMS_OF.get(model, _events()), "text/event-stream")
        elif model == "deep-args":
            completion = json.loads(json.dumps(COMPLETION))
            completion["choices"][0]["message"]["tool_calls"] = [DEEP_CALL]
            self.answer(200, json.dumps(completion).encode())
        else:
            self.answer(200, json.dumps(COMPLETION).encode())


@pytest.fixture(scope="module")
def proxy(start_proxy: StartProxy) -> Iterator[ServerProcess]:
    with serving(_Backend) as url:
        yield start_proxy(url, MAX_RETRIES="0")


def _post(proxy: ServerProcess, path: str, body: str | bytes) -> httpx.Response:
    return httpx.post(
        proxy.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=20
    )


def _chat(model: str, stream: bool, extra: str = "") -> str:
    """A chat request in either dialect (the same fields serve both), ``extra`` members
    spliced in as raw JSON text."""
    messages = '[{"role": "user", "content": "hi"}]'
    return f'{{"model": "{model}", "stream": {json.dumps(stream)}, "messages": {messages}{extra}}}'


def _error_message(response: httpx.Response, path: str) -> str:
    """The error's message, asserting the dialect of ``path``."""
    body = response.json()
    assert set(body) == {"error"}, body
    if path.startswith("/v1/"):
        error = body["error"]
        assert {"message", "type", "param", "code"} <= set(error), body
        return str(error["message"])
    assert isinstance(body["error"], str), body
    return body["error"]


PATHS = ["/api/chat", "/v1/chat/completions"]
STREAMS = [False, True]
EVERY_CHAT = [(path, stream) for path in PATHS for stream in STREAMS]
# a /v1 answer not asked to stream is relayed as bytes, undecoded: see
# test_a_deep_v1_answer_is_relayed_as_it_came
DECODED = [chat for chat in EVERY_CHAT if chat != ("/v1/chat/completions", False)]


@pytest.mark.parametrize(("path", "stream"), DECODED)
@pytest.mark.parametrize("client_depth", [0, 300])
def test_a_backends_deep_answer_is_a_502_in_dialect(
    proxy: ServerProcess, path: str, stream: bool, client_depth: int
) -> None:
    """2,000 levels: orjson stops at 1,024 and the standard library's recursion fails.
    That was a 500, or the client's 400 when the client's own body was over 200 levels
    deep."""
    extra = f', "metadata": {nested(client_depth)}' if client_depth else ""
    response = _post(proxy, path, _chat("deep", stream, extra))
    assert response.status_code == 502, response.text
    assert "JSON" in _error_message(response, path)


def test_a_json_answer_to_a_stream_too_deep_to_write_again_is_a_502(
    proxy: ServerProcess,
) -> None:
    """A backend that answers a /v1 stream request with one completion (it ignored
    ``stream``) nested 1,010 levels deep: read, but its chunk, which holds it, cannot be
    written for the client. That escaped the relay (a 500). (``/api/chat`` translates
    the fields it knows, and answers.)"""
    path = "/v1/chat/completions"
    response = _post(proxy, path, _chat("deep-readable", True))
    assert response.status_code == 502, response.text
    assert "nested too deeply" in _error_message(response, path)


def test_a_deep_v1_answer_is_relayed_as_it_came(proxy: ServerProcess) -> None:
    """/v1 relays a 2xx body as bytes, checked by its ends only (decoding every body to
    know its depth would undo that): the proxy itself never fails on it."""
    response = _post(proxy, "/v1/chat/completions", _chat("deep", False))
    assert response.status_code == 200
    assert response.content == DEEP_ANSWER


@pytest.mark.parametrize("path", PATHS)
def test_a_backends_deep_error_body_keeps_its_status_in_dialect(
    proxy: ServerProcess, path: str
) -> None:
    """The message is read out of a backend's error body: a deep one made that a 500
    of our own (a traceback in the log) rather than the backend's error."""
    response = _post(proxy, path, _chat("deep-error", False, f', "metadata": {nested(300)}'))
    assert response.status_code == 500, response.text
    assert "internal error in trioproxy" not in _error_message(response, path)


@pytest.mark.parametrize(
    ("model", "stream", "words"),
    [
        ("deep-event", True, "nested too deeply to be read"),
        ("deep-args", True, "nested too deeply to be written"),
        ("deep-args-object", True, "nested too deeply to be written"),
        ("deep-args", False, "nested too deeply to be written"),
    ],
)
def test_a_backends_deep_event_or_tool_call_is_a_502_for_an_ollama_client(
    proxy: ServerProcess, model: str, stream: bool, words: str
) -> None:
    """An event too deep to read was dropped as keep-alive noise (or a RecursionError);
    a tool call's arguments, read as JSON for Ollama's clients (1,010 levels), could not
    be written again: a 500, or a stream broken without a word."""
    response = _post(proxy, "/api/chat", _chat(model, stream))
    assert response.status_code == 502, response.text
    assert words in _error_message(response, "/api/chat")


@pytest.mark.parametrize("model", ["deep-event", "deep-args", "deep-args-object"])
def test_a_backends_deep_event_is_relayed_to_an_openai_client(
    proxy: ServerProcess, model: str
) -> None:
    """/v1 streams are relayed as they came; the proxy only watches them."""
    response = _post(proxy, "/v1/chat/completions", _chat(model, True))
    assert response.status_code == 200, response.text
    assert response.content == STREAMS_OF[model]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("model", "status", "words"),
    [("deep-error-field", 502, "boom"), ("deep-error-event", 400, "nested too deeply")],
)
def test_a_backends_deep_error_in_a_stream_keeps_its_status_in_dialect(
    proxy: ServerProcess, path: str, model: str, status: int, words: str
) -> None:
    """The error object read from the stream (1,010 levels) could not be written again
    for the client, nor shown as text: a 500, or a /v1 stream cut without a word."""
    response = _post(proxy, path, _chat(model, True))
    assert response.status_code == status, response.text
    assert words in _error_message(response, path)


@pytest.mark.parametrize(("path", "stream"), EVERY_CHAT)
@pytest.mark.parametrize("depth", [300, 2000])
def test_a_clients_deep_body_is_forwarded_or_its_400_never_a_500(
    proxy: ServerProcess, path: str, stream: bool, depth: int
) -> None:
    """300 levels are read and written again; 2,000 cannot be read."""
    response = _post(proxy, path, _chat("ok", stream, f', "metadata": {nested(depth)}'))
    if depth == 300:
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    assert "nested too deeply" in _error_message(response, path)


LATIN = '"caf\xe9"'  # é: one byte that is not UTF-8 when the body is sent as Latin-1
OLLAMA_DEEP_PARTS = [
    # the format becomes a JSON schema in the payload, written by forward.encode
    ', "format": %s',
    # a tool call's arguments become JSON text while the request is translated
    ', "tools": [], "messages": [{"role": "assistant", "content": "", "tool_calls":'
    ' [{"function": {"name": "f", "arguments": %s}}]}]',
]


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("part", OLLAMA_DEEP_PARTS)
@pytest.mark.parametrize("not_utf8", [False, True])
def test_an_ollama_body_read_but_too_deep_to_write_is_a_400(
    proxy: ServerProcess, stream: bool, part: str, not_utf8: bool
) -> None:
    """1,010 levels: read (orjson reads 1,024) but not written again for the backend (the
    standard library writes about 900). With a byte that is not UTF-8 (read as U+FFFD on
    /api/*, as Ollama reads it) this was a 500: the old check re-read the body strictly."""
    body = _chat("ok", stream).removesuffix("}") + part % nested(1010, LATIN) + "}"
    raw = body.encode("latin-1") if not_utf8 else body.encode()
    # the later "messages" member wins, as in every JSON decoder the proxy uses
    response = _post(proxy, "/api/chat", raw)
    assert response.status_code == 400, response.text
    assert "nested too deeply to be forwarded" in _error_message(response, "/api/chat")


@pytest.mark.parametrize("depth", [300, 2000])
def test_a_deep_ollama_body_with_bytes_that_are_not_utf8_is_no_500(
    proxy: ServerProcess, depth: int
) -> None:
    body = _chat("ok", False, f', "metadata": {nested(depth, LATIN)}')
    response = _post(proxy, "/api/chat", body.encode("latin-1"))
    assert response.status_code == (200 if depth == 300 else 400), response.text


def test_a_body_with_a_byte_order_mark_reaches_the_openai_sdk(proxy: ServerProcess) -> None:
    """The openai SDK reads a body with a UTF-8 BOM (``json.loads`` on bytes skips it):
    the proxy's check by the body's ends must not make it a 502."""
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as client:
        answer = client.chat.completions.create(
            model="bom", messages=[{"role": "user", "content": "hi"}]
        )
    assert answer.choices[0].message.content == "hi"


def test_ndjson_is_not_passed_off_as_one_json_object(proxy: ServerProcess) -> None:
    response = _post(proxy, "/v1/chat/completions", _chat("ndjson", False))
    assert response.status_code == 502, response.text
    assert "not a JSON object" in _error_message(response, "/v1/chat/completions")


def _checked(content: bytes) -> bool:
    from types import SimpleNamespace

    from trioproxy.errors import BadUpstreamResponse
    from trioproxy.forward import require_json_object

    call: Any = SimpleNamespace(app=SimpleNamespace(collector=SimpleNamespace(upstream_error=id)))
    try:
        require_json_object(call, content)
    except BadUpstreamResponse:
        return False
    return True


@pytest.mark.parametrize(
    ("content", "passes"),
    [
        (b'\xef\xbb\xbf{"a": 1}', True),
        (b'\xef\xbb\xbf {"a": 1}\n', True),
        (b"\xef\xbb\xbf", False),
        (b'{\n  "a": {\n    "b": 1\n  },\n  "c": {}\n}\n', True),  # pretty-printed
        (b'{"a": "}\\n{"}', True),  # an escaped line break inside a string
        (b'{"a":1}\n{"b":2}', False),
        (b'{"a":1}\r\n\r\n  {"b":2}\n', False),
        (b'{"a":1} \n{"b":2}', False),
        # the first line break is looked for within 64 KiB only: the check stays cheap
        (b'{"a":"' + b"x" * 70_000 + b'"}\n{"b":2}', True),
    ],
)
def test_a_relayed_body_is_checked_by_its_ends_and_first_line_break(
    content: bytes, passes: bool
) -> None:
    assert _checked(content) is passes
