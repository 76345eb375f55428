"""Backends' shapes that the demo backend does not produce, driven with the official
clients: older llama.cpp servers' ``error:`` field, a backend that ends its body a moment
after ``[DONE]`` (a remote backend's last read), and Ollama's own ``/v1`` as the backend
(it lists every model with its tag)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import httpx
import ollama
import openai
import pytest

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving
from .test_metrics_e2e import scrape, total

StartProxy = Callable[..., ServerProcess]
MODEL = "qwen2.5-7b-instruct-q4_k_m.gguf"
OLLAMA_MODEL = "llama3.2:latest"  # how Ollama's /v1/models lists a model
STRICT_TAGGED = "strict:latest"  # vLLM --served-model-name strict:latest: only that spelling
CONTEXT_ERROR = {
    "code": 400,
    "message": "the request exceeds the available context size, try increasing it",
    "type": "exceed_context_size_error",
}
DECODE_ERROR = {"code": 500, "message": "llama_decode failed", "type": "server_error"}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"delta": delta, "finish_reason": finish, "index": 0}
    body = {
        "choices": [choice],
        "created": 1,
        "id": "c",
        "model": MODEL,
        "object": "chat.completion.chunk",
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
# per scenario (the last message's content): the body's pieces, each written and flushed
# on its own, and how long the backend waits before ending the body
SCRIPTS: dict[str, tuple[list[bytes], float]] = {
    "error-first": ([b"error: " + json.dumps(CONTEXT_ERROR).encode() + b"\n\n", DONE], 0.0),
    "error-mid": (
        [
            _chunk({"role": "assistant", "content": "Hello"}),
            _chunk({"content": " wor"}),
            b"error: " + json.dumps(DECODE_ERROR).encode() + b"\n\n",
            DONE,
        ],
        0.0,
    ),
    # the error line in one read, the blank line ending its event in the next
    "error-mid-split": (
        [
            _chunk({"role": "assistant", "content": "Hello"}),
            b"error: " + json.dumps(DECODE_ERROR).encode() + b"\n",
            b"\n" + DONE,
        ],
        0.0,
    ),
    # the error line is the body's last: no blank line after it, no [DONE]
    "error-unended": (
        [
            _chunk({"role": "assistant", "content": "Hello"}),
            b"error: " + json.dumps(DECODE_ERROR).encode() + b"\n",
        ],
        0.0,
    ),
    # labelled text/plain, its first event written in pieces: a line end, then "da"
    "mislabelled-in-pieces": (
        [
            b"\n",
            _chunk({"role": "assistant", "content": "Hel"})[:2],
            _chunk({"role": "assistant", "content": "Hel"})[2:],
            _chunk({"content": "lo"}, "stop"),
            DONE,
        ],
        0.0,
    ),
    # a byte order mark (which the format allows) opens the stream, in two reads
    "byte-order-mark": (
        [
            b"\xef\xbb",
            b"\xbf" + _chunk({"role": "assistant", "content": "Hel"}),
            _chunk({"content": "lo"}, "stop"),
            DONE,
        ],
        0.0,
    ),
    # it ignored stream: true, and its JSON body starts with a read of whitespace
    "json-after-whitespace": (
        [
            b"\n ",
            json.dumps(
                {
                    "id": "c",
                    "object": "chat.completion",
                    "created": 1,
                    "model": MODEL,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "Hello"},
                        }
                    ],
                }
            ).encode(),
        ],
        0.0,
    ),
    "slow-end": ([_chunk({"content": "Hi"}), _chunk({}, "stop"), DONE], 0.2),
    # the body ends (or the connection breaks) inside an event
    "cut-mid-event": ([_chunk({"role": "assistant", "content": "Hello"}), b'data: {"id": "c'], 0),
    "broken-mid-event": ([_chunk({"role": "assistant", "content": "Hello"}), b'data: {"id'], 0),
    # a tool call without index (a non-conforming backend), its id on every fragment
    "tool-call-without-index": (
        [
            _chunk(
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": '},
                        }
                    ],
                }
            ),
            _chunk({"tool_calls": [{"id": "call_1", "function": {"arguments": '"Paris"}'}}]}),
            _chunk({}, "tool_calls"),
            DONE,
        ],
        0,
    ),
    # the answer finished, then the body ends inside its next event (the usage, say)
    "finished-then-cut": (
        [_chunk({"role": "assistant", "content": "Hello"}, "stop"), b'data: {"usage": '],
        0,
    ),
    # a whole last event without its blank line, then the body's end: no finish_reason
    "unfinished-whole": (
        [_chunk({"role": "assistant", "content": "Hel"}), _chunk({"content": "lo"})[:-1]],
        0,
    ),
    # the last event's line, then the body's end: no blank line, no [DONE]
    "no-final-blank-line": (
        [_chunk({"role": "assistant", "content": "Hel"}), _chunk({"content": "lo"}, "stop")[:-1]],
        0,
    ),
}


# streams of n=2 choices, as lists of chunks, each chunk a list of (index, text,
# finish_reason): OpenAI and vLLM send one choice per chunk, NVIDIA Dynamo all in one. None
# of these bodies ends with [DONE].
Choice = tuple[int, str, str | None]
CHOICE_SCRIPTS: dict[str, list[list[Choice]]] = {
    # choice 0 finishes, then the body ends while choice 1 is mid-answer
    "n2-cut": [[(0, "Hel", None)], [(1, "Hi", None)], [(0, "lo", "stop")], [(1, " th", None)]],
    "dynamo-n2-cut": [[(0, "Hel", None), (1, "Hi", None)], [(0, "lo", "stop"), (1, " th", None)]],
    # both finish, then the body ends
    "n2-whole": [
        [(0, "Hel", None)],
        [(1, "Hi", None)],
        [(0, "lo", "stop")],
        [(1, " th", None)],
        [(1, "ere", "length")],
    ],
}


def _choices_chunk(choices: list[Choice], legacy: bool) -> bytes:
    """One chunk of /v1/chat/completions, or of /v1/completions (``legacy``: the text on
    the choice)."""
    listed = [
        {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
        if legacy
        else {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
        for i, text, finish in choices
    ]
    kind = "text_completion" if legacy else "chat.completion.chunk"
    body = {"id": "c", "object": kind, "created": 1, "model": MODEL, "choices": listed}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class _Backend(ScriptedHandler):
    def do_GET(self) -> None:
        listed = [{"id": MODEL}, {"id": OLLAMA_MODEL}, {"id": "nomic-embed-text:latest"}]
        listed.append({"id": STRICT_TAGGED})
        self.answer(200, json.dumps({"object": "list", "data": listed}).encode())

    def do_POST(self) -> None:
        body = self.json_body()
        if self.path.endswith("/embeddings"):
            vectors = [{"object": "embedding", "index": 0, "embedding": [0.5, 0.5]}]
            self.answer(200, json.dumps({"object": "list", "data": vectors}).encode())
            return
        if body["model"] == "strict":
            error = {"message": "The model `strict` does not exist.", "code": 404}
            self.answer(404, json.dumps({"error": error}).encode())
            return
        if body["model"] in ("llama3.2", OLLAMA_MODEL, STRICT_TAGGED):
            completion = {"id": "c", "object": "chat.completion", "created": 1, "model": "x"}
            message = {"role": "assistant", "content": "hi there"}
            completion["choices"] = [{"index": 0, "finish_reason": "stop", "message": message}]
            self.answer(200, json.dumps(completion).encode())
            return
        legacy = self.path.endswith("/completions") and "prompt" in body
        scenario = body["prompt"] if legacy else body["messages"][-1]["content"]
        if scenario in CHOICE_SCRIPTS:
            assert body["n"] == 2  # relayed as the client sent it
            chunks = CHOICE_SCRIPTS[scenario]
            pieces, end_after = [_choices_chunk(chunk, legacy) for chunk in chunks], 0.0
        else:
            pieces, end_after = SCRIPTS[scenario]
        self.send_response(200)
        labels = {
            "mislabelled-in-pieces": "text/plain",
            "json-after-whitespace": "application/json",
        }
        self.send_header("Content-Type", labels.get(scenario, "text/event-stream"))
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for piece in pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
                time.sleep(0.01)  # each piece in a read of its own
            time.sleep(end_after)
            if scenario.startswith("broken-"):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # no end of the chunked body
                return
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the proxy gave up on the body


@pytest.fixture(scope="module")
def shaped(start_proxy: StartProxy) -> Iterator[ServerProcess]:
    with serving(_Backend) as url:
        yield start_proxy(url, MAX_RETRIES="0", ACCESS_LOG="true")


@pytest.fixture
def ollama_client(shaped: ServerProcess) -> Iterator[ollama.Client]:
    client = ollama.Client(host=shaped.url, timeout=10)
    yield client
    client.close()


@pytest.fixture
def openai_client(shaped: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=shaped.url + "/v1", api_key="x", max_retries=0, _strict_response_validation=True
    ) as client:
        yield client


def _ask(scenario: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": scenario}]


def _streams(url: str, outcome: str, api: str) -> float:
    return total(scrape(url), "trioproxy_streams_total", outcome=outcome, api=api)


def _settled(read: Callable[[], float], expected: float) -> float:
    """The value once the request's record is in (it lands after the response ends)."""
    deadline = time.monotonic() + 5
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def test_an_error_field_as_the_first_event_is_the_backends_status(
    ollama_client: ollama.Client, openai_client: openai.OpenAI
) -> None:
    """llama.cpp's server before October 2025 wrote a failure as ``error: {json}``, then
    ``[DONE]``: it used to reach Ollama clients as an empty, finished answer."""
    with pytest.raises(ollama.ResponseError) as refused:
        list(ollama_client.chat(MODEL, _ask("error-first"), stream=True))
    assert refused.value.status_code == 400
    assert "exceeds the available context size" in refused.value.error
    chat = openai_client.chat.completions
    with pytest.raises(openai.BadRequestError, match="exceeds the available context"):
        list(chat.create(model=MODEL, messages=_ask("error-first"), stream=True))


def test_an_error_field_mid_stream_fails_the_stream_for_both_apis(
    shaped: ServerProcess, ollama_client: ollama.Client, openai_client: openai.OpenAI
) -> None:
    before = {api: _streams(shaped.url, "error", api) for api in ("ollama", "openai")}
    lines: list[str] = []
    with pytest.raises(ollama.ResponseError, match="llama_decode failed"):
        for part in ollama_client.chat(MODEL, _ask("error-mid"), stream=True):
            lines.append(part.message.content or "")
    assert "".join(lines) == "Hello wor"
    chat = openai_client.chat.completions
    with pytest.raises(openai.APIError, match="llama_decode failed"):
        list(chat.create(model=MODEL, messages=_ask("error-mid"), stream=True))
    for api in ("ollama", "openai"):
        # the openai SDK closes the response at the error: the stream failed, it was not
        # cancelled by the client
        assert _settled(lambda a=api: _streams(shaped.url, "error", a), before[api] + 1) == (
            before[api] + 1
        )


@pytest.mark.parametrize("scenario", ["error-mid-split", "error-unended"])
def test_an_error_field_whose_event_ends_in_a_later_read_still_fails_the_openai_stream(
    openai_client: openai.OpenAI, scenario: str
) -> None:
    """The ``error:`` line is rewritten as a ``data:`` line (the openai SDK ignores other
    fields): it was rewritten in the read that completed its event only, so the line
    itself, held back from an earlier read (or completed at the body's end), was relayed
    as it came, and the client took the cut answer for a whole one."""
    texts: list[str] = []
    with pytest.raises(openai.APIError, match="llama_decode failed"):
        for chunk in openai_client.chat.completions.create(
            model=MODEL, messages=_ask(scenario), stream=True
        ):
            texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts) == "Hello"


@pytest.mark.parametrize(
    "scenario", ["mislabelled-in-pieces", "json-after-whitespace", "byte-order-mark"]
)
def test_a_body_whose_first_reads_are_too_short_to_tell_is_read_as_what_it_is(
    ollama_client: ollama.Client, openai_client: openai.OpenAI, scenario: str
) -> None:
    """Whether the backend's body is an event stream or one JSON answer was told from its
    first read alone: a read of a line end, or of "da", made a stream labelled text/plain
    a 502 ("not an event stream"), and a JSON body after a read of whitespace an empty
    answer cut short. A byte order mark opening the stream was relayed: the openai SDK
    reads it as part of the first field's name, and lost the first event ("Hel")."""
    parts = list(ollama_client.chat(MODEL, _ask(scenario), stream=True))
    assert "".join(part.message.content or "" for part in parts) == "Hello"
    assert parts[-1].done and parts[-1].done_reason == "stop"
    chunks = list(
        openai_client.chat.completions.create(model=MODEL, messages=_ask(scenario), stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize("scenario", ["cut-mid-event", "broken-mid-event"])
def test_a_stream_broken_off_inside_an_event_ends_with_a_readable_error(
    openai_client: openai.OpenAI, scenario: str
) -> None:
    """The proxy relayed the half event, then its error event right after it: glued
    together, they were one event the openai SDK could not parse (JSONDecodeError instead
    of the proxy's APIError). Only whole events are relayed."""
    texts: list[str] = []
    with pytest.raises(openai.APIError) as failed:
        for chunk in openai_client.chat.completions.create(
            model=MODEL, messages=_ask(scenario), stream=True
        ):
            texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts) == "Hello"
    expected = "ended before its last event" if scenario.startswith("cut") else "broke mid-stream"
    assert expected in failed.value.message


@pytest.mark.parametrize(
    ("scenario", "said"),
    [
        ("finished-then-cut", "ended inside an event"),
        ("unfinished-whole", "ended before its last event"),
    ],
)
def test_a_body_ending_after_or_inside_a_last_event_ends_with_the_proxys_error(
    openai_client: openai.OpenAI, ollama_client: ollama.Client, scenario: str, said: str
) -> None:
    """At the body's end the event held back (no blank line yet) was relayed only when the
    stream had no error: after a finish_reason, an event cut off by the body's end reached
    the openai SDK, which failed on it with a JSONDecodeError; without one, a whole last
    event was dropped before the proxy's error (Ollama clients got its text)."""
    texts: list[str] = []
    with pytest.raises(openai.APIError, match=said):
        for chunk in openai_client.chat.completions.create(
            model=MODEL, messages=_ask(scenario), stream=True
        ):
            texts.append(chunk.choices[0].delta.content or "")
    assert "".join(texts) == "Hello"
    parts: list[str] = []
    if scenario == "unfinished-whole":
        with pytest.raises(ollama.ResponseError, match=said):
            for part in ollama_client.chat(MODEL, _ask(scenario), stream=True):
                parts.append(part.message.content or "")
    else:  # the cut event is no chunk: skipped, as Ollama clients get a valid line either way
        parts = [
            p.message.content or "" for p in ollama_client.chat(MODEL, _ask(scenario), stream=True)
        ]
    assert "".join(parts) == "Hello"


def test_a_tool_call_without_index_reaches_an_ollama_client_whole(
    ollama_client: ollama.Client,
) -> None:
    """Each fragment that repeated the call's id was a call of its own: the client got
    two calls, ``weather`` and a nameless one, both with empty arguments."""
    calls = [
        call
        for part in ollama_client.chat(MODEL, _ask("tool-call-without-index"), stream=True)
        for call in part.message.tool_calls or []
    ]
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("weather", {"city": "Paris"})
    ]


def test_a_last_event_without_its_blank_line_reaches_both_sdks(
    openai_client: openai.OpenAI, ollama_client: ollama.Client
) -> None:
    """It holds the finish_reason: the proxy dropped it and called a finished answer
    broken (both SDKs raised). The openai SDK dispatches an event at its blank line only,
    so the proxy completes the event."""
    chat = openai_client.chat.completions
    chunks = list(chat.create(model=MODEL, messages=_ask("no-final-blank-line"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
    assert chunks[-1].choices[0].finish_reason == "stop"
    parts = list(ollama_client.chat(MODEL, messages=_ask("no-final-blank-line"), stream=True))
    assert "".join(part.message.content or "" for part in parts) == "Hello"
    assert parts[-1].done and parts[-1].done_reason == "stop"


def test_a_stream_the_client_closes_at_its_end_is_completed(
    shaped: ServerProcess, openai_client: openai.OpenAI
) -> None:
    """The openai SDK closes the response at ``[DONE]``, ollama-js at the done line; the
    proxy was still reading the backend's end and counted these streams as cancelled."""
    before = {api: _streams(shaped.url, "completed", api) for api in ("ollama", "openai")}
    chat = openai_client.chat.completions
    chunks = list(chat.create(model=MODEL, messages=_ask("slow-end"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi"
    body = {"model": MODEL, "messages": _ask("slow-end")}
    with httpx.stream("POST", shaped.url + "/api/chat", json=body, timeout=10) as response:
        for line in response.iter_lines():
            if json.loads(line)["done"]:
                break  # and close, as ollama-js does
    for api in ("ollama", "openai"):
        assert _settled(lambda a=api: _streams(shaped.url, "completed", a), before[api] + 1) == (
            before[api] + 1
        )
    assert _streams(shaped.url, "cancelled", "openai") == 0
    assert _streams(shaped.url, "cancelled", "ollama") == 0


def test_a_name_without_its_tag_finds_the_model_an_ollama_backend_lists_with_it(
    ollama_client: ollama.Client,
) -> None:
    """``ollama run llama3.2`` asks ``/api/show`` first: it was a 404 because the backend
    (Ollama's own /v1) lists ``llama3.2:latest``."""
    assert ollama_client.show("llama3.2").modelinfo is not None
    assert ollama_client.generate("llama3.2", "").done_reason == "load"
    answer = ollama_client.chat("llama3.2", _ask("hello"), stream=False)
    assert answer.message.content == "hi there" and answer.model == "llama3.2"
    assert ollama_client.embed("nomic-embed-text", ["x"]).embeddings == [[0.5, 0.5]]
    assert "llama3.2:latest" in [m.model for m in ollama_client.list().models]
    assert ollama_client.chat("llama3.2:latest", _ask("hello")).model == "llama3.2:latest"


def test_a_model_the_backend_lists_with_its_latest_tag_is_asked_for_with_it(
    openai_client: openai.OpenAI, ollama_client: ollama.Client
) -> None:
    """Ollama's rule (NAME:latest is NAME) dropped the tag on the way to the backend, so a
    model the backend lists, and takes, only as ``strict:latest`` (vLLM's
    --served-model-name) was listed by the proxy and then a 404 for OpenAI clients and
    for Open WebUI, which sends the tag."""
    assert STRICT_TAGGED in [m.id for m in openai_client.models.list()]
    answer = openai_client.chat.completions.create(model=STRICT_TAGGED, messages=_ask("hi"))  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "hi there"
    assert ollama_client.chat(STRICT_TAGGED, _ask("hi")).message.content == "hi there"


def test_both_spellings_of_a_name_are_one_metrics_label(
    shaped: ServerProcess, ollama_client: ollama.Client
) -> None:
    def chats(model: str) -> float:
        return total(scrape(shaped.url), "http_requests_total", model=model, endpoint="api_chat")

    before = chats("llama3.2")
    ollama_client.chat("llama3.2:latest", _ask("hello"))
    ollama_client.chat("llama3.2", _ask("hello"))
    assert _settled(lambda: chats("llama3.2"), before + 2) == before + 2
    samples = scrape(shaped.url)
    models = {labels.get("model") for series in samples.values() for labels, _ in series}
    assert "llama3.2" in models and "llama3.2:latest" not in models


class _Azure(ScriptedHandler):
    """Answers anything, remembering the paths it was asked for."""

    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.answer(200, json.dumps({"object": "list", "data": [{"id": "gpt4o"}]}).encode())

    def do_POST(self) -> None:
        self.json_body()
        self.paths.append(self.path)
        message = {"role": "assistant", "content": "ok"}
        choice = {"index": 0, "finish_reason": "stop", "message": message}
        completion = {"id": "c", "object": "chat.completion", "created": 1, "model": "gpt4o"}
        self.answer(200, json.dumps({**completion, "choices": [choice]}).encode())


def test_a_query_in_the_base_url_goes_with_every_backend_request(
    start_proxy: StartProxy,
) -> None:
    """Azure OpenAI's deployments need ``?api-version=``: it used to be dropped."""
    with serving(_Azure) as url:
        base = url.removesuffix("/v1") + "/openai/deployments/gpt4o?api-version=2024-10-21"
        proxy = start_proxy(base, MAX_RETRIES="0")
        body = {"model": "gpt4o", "messages": _ask("hi")}
        assert httpx.post(proxy.url + "/v1/chat/completions", json=body).status_code == 200
        assert httpx.get(proxy.url + "/api/tags").json()["models"]
    # (the readiness checks' GET /models included)
    assert set(_Azure.paths) == {
        "/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21",
        "/openai/deployments/gpt4o/models?api-version=2024-10-21",
    }


class _AbsurdNumbersBackend(ScriptedHandler):
    """Writes its counts and times as ``number`` says, in JSON's text: ``1e400``
    (infinite once read), ``NaN``, an integer of 400 digits, -5."""

    number: ClassVar[str] = "1e400"

    def _write(self, body: Any, content_type: str = "application/json") -> None:
        text = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answer(200, text.replace(b'"NUMBER"', self.number.encode()), content_type)

    def do_GET(self) -> None:
        entry = {"id": "m", "object": "model", "created": "NUMBER", "max_model_len": "NUMBER"}
        self._write({"object": "list", "data": [entry]})

    def do_POST(self) -> None:
        body = self.json_body()
        usage = {"prompt_tokens": "NUMBER", "completion_tokens": "NUMBER"}
        if self.path.endswith("/embeddings"):
            data = [{"object": "embedding", "index": 0, "embedding": [0.5]}]
            self._write({"object": "list", "model": "m", "data": data, "usage": usage})
        elif body.get("stream"):
            usage_event = {"id": "c", "object": "chat.completion.chunk", "choices": []}
            usage_event["usage"] = usage
            events = [_chunk({"role": "assistant", "content": "Hi"}), _chunk({}, "stop")]
            events += [b"data: " + json.dumps(usage_event).encode() + b"\n\n", DONE]
            self._write(b"".join(events), "text/event-stream")
        else:
            message = {"role": "assistant", "content": "Hi"}
            choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
            answer = {"id": "c", "object": "chat.completion", "created": 1, "model": "m"}
            timings = {"prompt_ms": "NUMBER", "predicted_ms": "NUMBER"}  # llama.cpp's
            self._write({**answer, "choices": choices, "usage": usage, "timings": timings})


@pytest.mark.parametrize("number", ["1e400", "NaN", "-Infinity", "1" + "0" * 400, "-5"])
def test_absurd_numbers_from_the_backend_are_no_counts_and_no_500(
    start_proxy: StartProxy, number: str
) -> None:
    """A review (mypy's ``int(object)``): a usage count or ``created`` of ``1e400`` or
    ``NaN`` made int() raise, and one of 400 digits the metrics store: a 500 on
    /v1/models, /api/chat and /api/embed, and streams of both APIs cut off by the metrics
    that observe them."""
    _AbsurdNumbersBackend.number = number
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with serving(_AbsurdNumbersBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        with ollama.Client(host=proxy.url, timeout=10) as client:
            _absurd_numbers_ollama(client, chat["messages"])
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
            assert sdk.models.list().data[0].created == 0
            parts = list(
                sdk.chat.completions.create(model="m", messages=chat["messages"], stream=True)
            )
            assert parts[0].choices[0].delta.content == "Hi"
            sdk.chat.completions.create(model="m", messages=chat["messages"])
        samples = scrape(proxy.url)
    assert total(samples, "http_requests_total", status="500") == 0
    # no reported count is counted; the two streams' chunks are, as when none is reported
    assert total(samples, "trioproxy_tokens_total", type="input") == 0
    assert total(samples, "trioproxy_tokens_total", type="output") == 2
    assert "Error in ASGI" not in proxy.log() and "Traceback" not in proxy.log()


def _absurd_numbers_ollama(client: ollama.Client, messages: Any) -> None:
    answer = client.chat(model="m", messages=messages)
    assert answer.message.content == "Hi" and answer.eval_count == 0
    assert answer.prompt_eval_duration == 0 and answer.eval_duration >= 0  # measured
    streamed = list(client.chat(model="m", messages=messages, stream=True))
    assert streamed[-1].done and streamed[-1].prompt_eval_count == 0
    assert client.embed(model="m", input="x").embeddings == [[0.5]]
    assert client.show("m").modelinfo is not None


class _RefusesEmptyInputs(ScriptedHandler):
    """OpenAI's answer to an empty string among the inputs of a batch."""

    def do_POST(self) -> None:
        body = self.json_body()
        if "too long" in body["input"]:
            error = {"message": "This model's maximum context length is 8192 tokens"}
            self.answer(400, json.dumps({"error": error}).encode())
            return
        if "" in body["input"]:
            error = {"message": "'$.input' is invalid. Please check the API reference.",
                     "type": "invalid_request_error", "param": None, "code": None}  # fmt: skip
            self.answer(400, json.dumps({"error": error}).encode())
            return
        data = [{"object": "embedding", "index": i, "embedding": [0.5]} for i in range(3)]
        self.answer(200, json.dumps({"object": "list", "data": data}).encode())


def test_a_refusal_of_empty_inputs_says_so(start_proxy: StartProxy) -> None:
    """Ollama embeds an empty string among its inputs (a document without text, as
    Haystack's document embedder sends one); OpenAI refuses the batch in words that name
    nothing. The Ollama client's error says what the backend took exception to."""
    with serving(_RefusesEmptyInputs) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        with ollama.Client(host=proxy.url, timeout=10) as client:
            with pytest.raises(ollama.ResponseError) as refused:
                client.embed(model="m", input=["a", "", "c", ""])
            assert refused.value.status_code == 400
            assert "'$.input' is invalid" in refused.value.error
            assert "2 of the inputs are empty strings" in refused.value.error
            with pytest.raises(ollama.ResponseError) as refused:  # a refusal of another kind
                client.embed(model="m", input=["too long", ""])
            assert "empty" not in refused.value.error
            assert client.embed(model="m", input=["a", "b", "c"]).embeddings == [[0.5]] * 3


def _n_choices(
    proxy: ServerProcess, endpoint: str, scenario: str, texts: dict[int, str]
) -> dict[int, str]:
    """Streams ``scenario`` with n=2 from ``endpoint``; each choice's text goes into
    ``texts`` as it comes (the stream may raise), and each finish_reason is returned."""
    finishes: dict[int, str] = {}
    # the SDK's strict validation refuses the legacy chunks OpenAI itself sends (a
    # finish_reason null mid-stream is no Literal it knows): strict for chat only
    with openai.OpenAI(
        base_url=proxy.url + "/v1",
        api_key="x",
        max_retries=0,
        _strict_response_validation=endpoint == "chat",
    ) as client:
        if endpoint == "chat":
            _chat_choices(client, scenario, texts, finishes)
        else:
            _legacy_choices(client, scenario, texts, finishes)
    return finishes


def _chat_choices(
    client: openai.OpenAI, scenario: str, texts: dict[int, str], finishes: dict[int, str]
) -> None:
    for chunk in client.chat.completions.create(
        model=MODEL, messages=_ask(scenario), n=2, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason


def _legacy_choices(
    client: openai.OpenAI, scenario: str, texts: dict[int, str], finishes: dict[int, str]
) -> None:
    for completion in client.completions.create(model=MODEL, prompt=scenario, n=2, stream=True):
        for legacy in completion.choices:
            texts[legacy.index] = texts.get(legacy.index, "") + legacy.text
            if legacy.finish_reason:
                finishes[legacy.index] = legacy.finish_reason


def _access_lines(proxy: ServerProcess, path: str) -> list[str]:
    return [line for line in proxy.log().splitlines() if f" POST {path} " in line]


@pytest.mark.parametrize("scenario", ["n2-cut", "dynamo-n2-cut"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_stream_of_two_choices_cut_after_the_first_finished_is_an_error(
    shaped: ServerProcess, endpoint: str, scenario: str
) -> None:
    """``n=2``: the body ended after choice 0's finish_reason while choice 1 was mid-answer
    (no [DONE]). Choice 0's finish_reason passed for the stream's: the client took choice
    1's half for its whole answer, and the metrics and the access log said completed. The
    client now gets the proxy's error; the stream is an error (502 in the metrics, its 200
    and "(error)" in the access log)."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    before = {o: _streams(shaped.url, o, "openai") for o in ("error", "completed")}
    logged = len(_access_lines(shaped, path))
    texts: dict[int, str] = {}
    with pytest.raises(openai.APIError, match="1 of the choices asked for without a finish"):
        _n_choices(shaped, endpoint, scenario, texts)
    assert texts == {0: "Hello", 1: "Hi th"}  # all the backend sent, then the error
    errors = _settled(lambda: _streams(shaped.url, "error", "openai"), before["error"] + 1)
    assert errors == before["error"] + 1
    assert _streams(shaped.url, "completed", "openai") == before["completed"]
    deadline = time.monotonic() + 5
    while len(lines := _access_lines(shaped, path)) == logged and time.monotonic() < deadline:
        time.sleep(0.02)
    # the 200 the client got, and the stream's end: an error
    assert f" {path} 200 " in lines[-1] and lines[-1].endswith("(error)"), lines[-1]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_stream_of_two_choices_that_both_finished_is_completed_without_done(
    shaped: ServerProcess, endpoint: str
) -> None:
    before = _streams(shaped.url, "completed", "openai")
    texts: dict[int, str] = {}
    finishes = _n_choices(shaped, endpoint, "n2-whole", texts)
    assert texts == {0: "Hello", 1: "Hi there"}
    assert finishes == {0: "stop", 1: "length"}
    assert _settled(lambda: _streams(shaped.url, "completed", "openai"), before + 1) == before + 1
