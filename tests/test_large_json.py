"""Large JSON is decoded and encoded in a worker thread, so the event loop keeps serving.

Past ``OFF_LOOP_BYTES`` (256 KiB) a client's body is checked and decoded, a payload the
proxy writes from it encoded, a backend's answer decoded and its translation encoded in a
JSON thread (``trioproxy.json_threads``); smaller ones on the loop, as before. Most tests
here serve the proxy in this process (hypercorn on a real socket on 127.0.0.1, the demo
backend in its own process) so that they can watch which thread did the work; the
dialect tests use the ``proxy`` fixture's process. No wall-clock timing is asserted: a
held decode waits on an event that only a loop that kept serving can set.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from types import SimpleNamespace
from typing import Any, ClassVar

import httpx
import pytest
import trio
from hypercorn.trio import serve
from prometheus_client.parser import text_string_to_metric_families

from bench.loop_stall import model_list_body
from trioproxy import (
    catalog,
    errors,
    forward,
    hypercorn_patches,
    relay,
    routes_anthropic,
    routes_ollama,
    routes_openai,
    signatures,
)
from trioproxy import translate as tr
from trioproxy.app import create_app
from trioproxy.cli import hypercorn_config
from trioproxy.config import Settings
from trioproxy.errors import MASKED_AT_ONCE_BYTES, BackendSecrets, BadUpstreamResponse
from trioproxy.json_threads import JOIN_OFF_LOOP_BYTES, OFF_LOOP_BYTES, json_threads
from trioproxy.jsonutil import compact_json, top_level_member
from trioproxy.ledger import ResponsesLedger
from trioproxy.model_mapping import ModelMapper

from .conftest import ServerProcess
from .fakes import FULL_LENGTH_VECTOR, FullLengthEmbeddings, ScriptedHandler, serving
from .test_responses_json_stream import SizedAnswers

LARGE_IMAGE = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3000).decode()
assert len(LARGE_IMAGE) > 2 * OFF_LOOP_BYTES  # a 1 MB body: checked, decoded in a thread
# an answer of 64 vectors of 2,048 floats: ~2.5 MB, past the threshold
LARGE_EMBED = {"input": [f"text {i}" for i in range(64)], "dimensions": 2048}
# a held thread waits at most this long before it goes on by itself: on code that decodes
# on the loop, what releases it can never run, and the test fails instead of hanging
HOLD_SECONDS = 5.0


@asynccontextmanager
async def serving_proxy(upstream: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The proxy in this process and this trio run, on a real socket; a client for it."""
    # an earlier one's shutdown ended every write of the process by its run's clock (the
    # program serves once per process): this one's writes start without that end
    hypercorn_patches._writes_end_at = math.inf
    app = create_app(Settings(upstream_url=upstream, host="127.0.0.1", port=0, **settings))
    config = hypercorn_config(app.settings)
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        try:
            async with httpx.AsyncClient(base_url=binds[0], timeout=30) as client:
                yield client
        finally:
            stop.set()


class Watched:
    """A function of a module, replaced by one that notes, for each call, the size of what
    it was given and whether it ran on the event loop's (the main) thread."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        module: Any,
        name: str,
        skip: Callable[[Any], bool] | None = None,
    ) -> None:
        self.calls: list[tuple[int, bool]] = []
        original = getattr(module, name)

        def watched(first: Any, *args: Any, **kwargs: Any) -> Any:
            on_loop = threading.current_thread() is threading.main_thread()
            if skip is None or not skip(first):
                self.calls.append((_size(first), on_loop))
            return original(first, *args, **kwargs)

        monkeypatch.setattr(module, name, watched)

    def take(self) -> list[tuple[int, bool]]:
        calls, self.calls = self.calls, []
        return calls


def _a_model_list(value: Any) -> bool:
    """Whether ``value`` is the backend's model list, which the readiness check decodes
    when it likes (``json_answer`` reads it as it reads every answer)."""
    return isinstance(value, bytes) and b'"object":"model"' in value[:200]


def _size(value: Any) -> int:
    """Bytes of JSON text, or about those of a payload written as JSON."""
    if isinstance(value, bytes | str):
        return len(value)
    return len(json.dumps(value, separators=(",", ":")))


def _chat(path: str, image: str | None) -> dict[str, Any]:
    """A non-stream chat in ``path``'s dialect, with ``image`` (base64) if given."""
    if path.startswith("/api/"):
        message: dict[str, Any] = {"role": "user", "content": "what is this?"}
        if image is not None:
            message["images"] = [image]
    else:
        content: list[dict[str, Any]] = [{"type": "text", "text": "what is this?"}]
        if image is not None:
            url = "data:image/png;base64," + image
            content.append({"type": "image_url", "image_url": {"url": url}})
        message = {"role": "user", "content": content}
    return {"model": "demo-chat", "stream": False, "messages": [message]}


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_a_large_body_is_decoded_in_a_thread_a_small_one_on_the_loop(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    decoded = Watched(monkeypatch, forward, "_decoded")
    encoded = Watched(monkeypatch, forward, "encode")
    async with serving_proxy(demo_backend.url) as client:
        small = await client.post(path, json=_chat(path, None))
        assert small.status_code == 200, small.text
        assert decoded.take() == [(len(small.request.content), True)]
        # /api/chat writes the backend's request from the client's: on the loop too
        assert all(on_loop for _, on_loop in encoded.take())

        large = await client.post(path, json=_chat(path, LARGE_IMAGE))
        assert large.status_code == 200, large.text
        assert decoded.take() == [(len(large.request.content), False)]
        written = encoded.take()
        if path.startswith("/api/"):  # its image goes to the backend in a request ~1 MB too
            assert [on_loop for _, on_loop in written] == [False]
            assert written[0][0] > OFF_LOOP_BYTES
        else:  # forwarded as it came: nothing to write
            assert written == []


async def test_a_large_embeddings_answer_is_decoded_and_encoded_in_a_thread(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/api/embed``: the backend's answer decoded, its translation encoded for the
    client, each in a thread when the answer is large, on the loop when it is small."""
    answers = Watched(monkeypatch, forward, "json_answer", skip=_a_model_list)
    replies = Watched(monkeypatch, routes_ollama, "dumps")
    async with serving_proxy(demo_backend.url) as client:
        small = await client.post("/api/embed", json={"model": "demo-embed", "input": "hi"})
        assert small.status_code == 200, small.text
        assert [on_loop for _, on_loop in answers.take()] == [True]
        assert [on_loop for _, on_loop in replies.take()] == [True]

        large = await client.post("/api/embed", json={"model": "demo-embed", **LARGE_EMBED})
        assert large.status_code == 200, large.text
        assert len(large.json()["embeddings"]) == 64
        assert len(large.json()["embeddings"][0]) == 2048
        ((answer_bytes, on_loop),) = answers.take()
        assert answer_bytes > OFF_LOOP_BYTES and not on_loop
        ((reply_bytes, on_loop),) = replies.take()
        assert reply_bytes > OFF_LOOP_BYTES and not on_loop


# the translation each answers with, by the route (and ``raw``) asked
TRANSLATIONS = {
    ("/api/chat", False): "openai_chat_to_ollama_chat",
    ("/api/generate", False): "openai_chat_to_ollama_generate",
    ("/api/generate", True): "openai_completion_to_ollama_generate",
}


@pytest.mark.parametrize(("path", "raw"), list(TRANSLATIONS))
async def test_a_large_chat_answer_is_decoded_translated_and_encoded_in_a_thread(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch, path: str, raw: bool
) -> None:
    """A non-stream ``/api/chat`` or ``/api/generate`` answer over the threshold (logprobs
    with 20 alternatives for 400 tokens, 5 for 8,000): decoded, translated to Ollama's shape
    and encoded for the client in a thread, as embeddings are (the translation ran on the
    loop: 0.2 s of it for a 30 MB answer's logprobs); a short answer on the loop."""
    answers = Watched(monkeypatch, forward, "json_answer", skip=_a_model_list)
    translated = Watched(monkeypatch, tr, TRANSLATIONS[path, raw])
    replies = Watched(monkeypatch, routes_ollama, "dumps")
    async with serving_proxy(demo_backend.url) as client:
        top = 5 if raw else 20  # a legacy completion's limit
        for tokens, large in ((3, False), (400 if top == 20 else 8000, True)):
            asked: dict[str, Any] = {"model": "demo-chat", "stream": False, "logprobs": True}
            asked["top_logprobs"] = top
            prompt = f"say something [[tokens={tokens}]]"
            if path == "/api/chat":
                asked["messages"] = [{"role": "user", "content": prompt}]
            else:
                asked["prompt"] = prompt
                asked["raw"] = raw
            response = await client.post(path, json=asked)
            assert response.status_code == 200, response.text
            assert len(response.json()["logprobs"]) == tokens
            assert len(response.json()["logprobs"][0]["top_logprobs"]) == top
            ((answer_bytes, answer_on_loop),) = answers.take()
            ((_, translated_on_loop),) = translated.take()
            ((reply_bytes, reply_on_loop),) = replies.take()
            assert (answer_bytes > OFF_LOOP_BYTES) is large is (not answer_on_loop)
            assert translated_on_loop is not large
            assert (reply_bytes > OFF_LOOP_BYTES) is large is (not reply_on_loop)


async def test_a_large_messages_answer_is_translated_and_encoded_in_a_thread(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Anthropic Messages API's non-stream answer (``/v1/messages``), the same way: a
    long text's answer translated to a ``message`` and encoded in a thread, a short one's
    on the loop."""
    translated = Watched(monkeypatch, routes_anthropic.an, "openai_to_message")
    async with serving_proxy(demo_backend.url) as client:
        for tokens, large in ((3, False), (60_000, True)):
            message = {"role": "user", "content": f"hi [[tokens={tokens}]]"}
            asked = {"model": "demo-chat", "max_tokens": 100_000, "messages": [message]}
            response = await client.post("/v1/messages", json=asked)
            assert response.status_code == 200, response.text
            assert (len(response.content) > OFF_LOOP_BYTES) is large
            assert response.json()["usage"]["output_tokens"] == tokens
            assert [on_loop for _, on_loop in translated.take()] == [not large]


async def test_a_large_answer_too_deep_to_write_again_is_the_backends_502() -> None:
    """Encoded in a thread, an answer that cannot be written (tool call arguments nested
    deeper than the encoders write) is the backend's 502, counted as a protocol error on
    the loop, as it is when encoded there."""
    errors: list[str] = []
    collector = SimpleNamespace(upstream_error=errors.append)
    call: Any = SimpleNamespace(app=SimpleNamespace(collector=collector))
    deep: Any = "bottom"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(BadUpstreamResponse, match="nested too deeply"):
        await routes_ollama.answer_reply_in_thread(call, dict, {"message": {"content": deep}})
    assert errors == ["protocol"]
    reply = await routes_ollama.answer_reply_in_thread(call, dict, {"done": True})
    assert (reply.status, reply.body) == (200, b'{"done":true}')


async def test_a_large_answer_of_another_shape_translated_in_a_thread_is_the_backends_502() -> None:
    """A translation that fails in the thread (a completion without choices) is the
    backend's 502 and a protocol error counted on the loop, as on the loop."""
    errors: list[str] = []
    collector = SimpleNamespace(upstream_error=errors.append)
    call: Any = SimpleNamespace(app=SimpleNamespace(collector=collector))
    timings = tr.Timings(total_ns=1, prompt_eval_ns=0, eval_ns=1)
    translate = tr.openai_chat_to_ollama_chat
    with pytest.raises(BadUpstreamResponse, match="unexpected shape"):
        await routes_ollama.answer_reply_in_thread(call, translate, {}, "m", "t", timings)
    assert errors == ["protocol"]


async def test_a_large_openai_answer_rewritten_for_the_client_is_rewritten_in_a_thread(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/v1/embeddings`` for a mapped model: the answer is decoded to rename its model and
    encoded again, in a thread when it is large."""
    renamed = Watched(monkeypatch, routes_openai, "_rewrite_model_json")
    mapping = {"client-embed": "demo-embed"}
    async with serving_proxy(demo_backend.url, model_mapping=mapping) as client:
        small = await client.post("/v1/embeddings", json={"model": "client-embed", "input": "x"})
        assert small.status_code == 200, small.text
        assert small.json()["model"] == "client-embed"
        assert [on_loop for _, on_loop in renamed.take()] == [True]

        large = await client.post("/v1/embeddings", json={"model": "client-embed", **LARGE_EMBED})
        assert large.status_code == 200, large.text
        assert large.json()["model"] == "client-embed"
        assert len(large.json()["data"]) == 64
        ((answer_bytes, on_loop),) = renamed.take()
        assert answer_bytes > OFF_LOOP_BYTES and not on_loop


async def test_a_large_embeddings_answer_converted_for_the_client_is_converted_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/v1/embeddings`` asking for base64 of a backend that writes floats (llama.cpp's
    server): the answer is decoded to encode its vectors, in a thread when it is large."""
    decoded = Watched(monkeypatch, routes_openai, "loads")
    inputs = [f"text {i}" for i in range(1500)]  # ~350 KB of floats
    with serving(FullLengthEmbeddings) as backend:
        async with serving_proxy(backend) as client:
            for batch, decoded_on_loop in ((inputs[:1], True), (inputs, False)):
                asked = {"model": "demo-embed", "input": batch, "encoding_format": "base64"}
                response = await client.post("/v1/embeddings", json=asked)
                assert response.status_code == 200, response.text
                data = response.json()["data"]
                assert len(data) == len(batch)
                vector = struct.unpack("<8f", base64.b64decode(data[-1]["embedding"]))
                assert vector == pytest.approx(FULL_LENGTH_VECTOR)
                ((answer_bytes, on_loop),) = decoded.take()
                assert on_loop is decoded_on_loop
                assert (answer_bytes > OFF_LOOP_BYTES) is not decoded_on_loop


async def test_a_large_stored_response_read_back_is_decoded_in_a_thread(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Responses API answer read by id is decoded (its usage settled, its model named
    for the client): in a thread when it is large (the input items of a long input here;
    an image generated in base64 elsewhere), on the loop when it is small."""
    decoded = Watched(monkeypatch, routes_openai, "loads")
    async with serving_proxy(demo_backend.url) as client:
        long_input = "x" * (2 * OFF_LOOP_BYTES)
        created = await client.post(
            "/v1/responses", json={"model": "demo-chat", "input": long_input}
        )
        assert created.status_code == 200, created.text
        response_id = created.json()["id"]
        decoded.take()
        read = await client.get(f"/v1/responses/{response_id}")
        assert read.status_code == 200, read.text
        assert [on_loop for _, on_loop in decoded.take()] == [True]
        items = await client.get(f"/v1/responses/{response_id}/input_items")
        assert items.status_code == 200, items.text
        assert long_input in items.text
        ((answer_bytes, on_loop),) = decoded.take()
        assert answer_bytes > OFF_LOOP_BYTES and not on_loop


# ---- the backend's model list ---------------------------------------------------------------


def _listing(body: bytes) -> type[ScriptedHandler]:
    """A backend whose ``GET /v1/models`` answers ``body`` (its class attribute ``body``,
    which a test may change); 404 elsewhere."""

    class Listing(ScriptedHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self.answer(200, type(self).body)
            else:
                self.answer(404, b'{"error": "not found"}')

    Listing.body = body  # type: ignore[attr-defined]
    return Listing


async def _after_the_readiness_check(client: httpx.AsyncClient) -> None:
    """Once the worker's first readiness check is done (a probe waits for the one running),
    which reads the backend's model list too: a route's fetch may not race it."""
    assert (await client.get("/ready")).status_code == 200


LIST_ROUTES = {
    "/api/tags": "openai_models_to_ollama_tags",
    "/api/ps": "ollama_ps_template",
    "/v1/models": "openai_model_list",
}


# 300 models as OpenRouter lists them: ~790 KB, past the threshold; 20 of them ~54 KB
@pytest.mark.parametrize("models", [300, 20])
async def test_a_large_model_list_is_read_and_answered_from_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, models: int
) -> None:
    """The backend's list is masked and decoded, and what ``/api/tags``, ``/api/ps`` and
    ``/v1/models`` answer from it built and encoded, in a JSON thread when the list came in
    a body over the threshold, on the loop when it is small; the answers are the bytes
    the routes wrote on the loop before."""
    body = model_list_body(models)
    large = len(body) > OFF_LOOP_BYTES
    read = Watched(monkeypatch, catalog, "model_list")
    built = {path: Watched(monkeypatch, tr, name) for path, name in LIST_ROUTES.items()}
    entries = json.loads(body)["data"]
    mapping = {"client-model": entries[1]["id"]}
    with serving(_listing(body)) as backend:
        async with serving_proxy(backend, model_mapping=mapping) as client:
            await _after_the_readiness_check(client)  # its list read: the routes' is the same
            answers = {path: await client.get(path) for path in LIST_ROUTES}
    assert read.take() == [(len(body), not large)]
    for path, watched in built.items():
        assert answers[path].status_code == 200, answers[path].text
        ((_, on_loop),) = watched.take()
        assert on_loop is not large, path
    mapper = ModelMapper(mapping)
    expected = {
        path: compact_json(getattr(tr, name)(entries, mapper)) for path, name in LIST_ROUTES.items()
    }
    assert answers["/v1/models"].content == expected["/v1/models"]
    assert answers["/api/tags"].content == expected["/api/tags"]
    ps = answers["/api/ps"].json()
    expires = ps["models"][0]["expires_at"]  # five minutes from now
    now = _rfc3339_ns(expires) - 5 * 60 * 10**9
    assert answers["/api/ps"].content == compact_json(tr.ollama_ps(entries, mapper, now_ns=now))
    assert len(ps["models"]) == models
    assert ps["models"][1]["name"] == "client-model:latest"  # the mapped one, as named


async def test_a_model_list_fetched_again_as_it_was_is_not_read_nor_answered_from_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Polls fetch the list again every few seconds (here at each request); lists change
    rarely, and the same bytes as the list held are not decoded again (a 2 MB list held
    the loop ~6 ms each time, mostly in one call of orjson that no thread interrupts), nor
    are ``/v1/models``, ``/api/tags`` and ``/api/ps`` written again from it (``/api/ps``
    was, each time, for its expiry: 2.4 ms for 760 models; now each request's expiry goes
    into the answer written once). A list that changed is read again, and answered from."""
    monkeypatch.setattr(catalog, "CACHE_SECONDS", 0.0)
    listing = _listing(model_list_body(300))
    read = Watched(monkeypatch, catalog, "model_list")
    built = {path: Watched(monkeypatch, tr, name) for path, name in LIST_ROUTES.items()}
    with serving(listing) as backend:
        async with serving_proxy(backend) as client:
            await _after_the_readiness_check(client)
            first = {path: await client.get(path) for path in LIST_ROUTES}
            assert [on_loop for _, on_loop in read.take()] == [False]
            for path, response in first.items():
                assert response.status_code == 200, response.text
                assert [on_loop for _, on_loop in built[path].take()] == [False]
            expiries = [_ps_expiry(first["/api/ps"])]
            for _ in range(3):
                for path in ("/api/tags", "/v1/models"):
                    assert (await client.get(path)).content == first[path].content
                before = time.time_ns()
                ps = await client.get("/api/ps")
                after = time.time_ns()
                expiries.append(_ps_expiry(ps))
                assert before <= _rfc3339_ns(expiries[-1]) - 5 * 60 * 10**9 <= after
                assert ps.content == first["/api/ps"].content.replace(
                    expiries[0].encode(), expiries[-1].encode()
                )
            assert read.take() == []
            assert all(built[path].take() == [] for path in LIST_ROUTES)
            listing.body = changed = model_list_body(301)  # type: ignore[attr-defined]
            again = {path: await client.get(path) for path in LIST_ROUTES}
            assert read.take() == [(len(changed), False)]
            for path, response in again.items():
                assert len(response.json()["data" if path == "/v1/models" else "models"]) == 301
                assert [on_loop for _, on_loop in built[path].take()] == [False]


def _ps_expiry(response: httpx.Response) -> str:
    """The one ``expires_at`` of every model an ``/api/ps`` answer lists."""
    (expires,) = {entry["expires_at"] for entry in response.json()["models"]}
    return str(expires)


def _rfc3339_ns(stamp: str) -> int:
    """Nanoseconds since the epoch of ``2024-05-01T12:00:00.123456789Z``."""
    seconds, fraction = stamp.removesuffix("Z").split(".")
    whole = datetime.strptime(seconds, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return int(whole.timestamp()) * 10**9 + int(fraction)


@pytest.mark.parametrize("models", [300, 20])
async def test_the_readiness_checks_model_list_is_read_in_a_thread_when_large(
    monkeypatch: pytest.MonkeyPatch, models: int
) -> None:
    """The list a readiness check gets is masked and decoded in a JSON thread when it is
    large (it was decoded on the loop, up to TAKEN_LIST_BYTES of 4 MB), on the loop when
    small."""
    secret = "sk-backend-secret-123456"
    listed = json.loads(model_list_body(models))
    listed["data"][0]["owned_by"] = secret
    body = json.dumps(listed).encode()
    read = Watched(monkeypatch, catalog, "model_list")
    held = catalog.ModelCatalog()
    await held.take(body, BackendSecrets.of(secret), trio.current_time())
    assert read.take() == [(len(body), len(body) <= OFF_LOOP_BYTES)]
    first = listed["data"][0]["id"]
    assert held.lists_now(first)
    assert held.entry(first) == {**listed["data"][0], "owned_by": "***"}


class QueuedResponses(ScriptedHandler):
    """A backend that queues every Responses API request sent with ``background``: its
    answer repeats the request's instructions, as OpenAI's does (kept in ``answers``)."""

    answers: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        asked = self.json_body()
        queued = {
            "id": f"resp_{len(self.answers)}",
            "object": "response",
            "status": "queued",
            "background": True,
            "model": asked["model"],
            "instructions": asked.get("instructions"),
            "output": [],
            "usage": None,
        }
        self.answers.append(json.dumps(queued).encode())
        self.answer(200, self.answers[-1])


@pytest.mark.parametrize("instructions", ["x" * (2 * OFF_LOOP_BYTES), "be brief"])
async def test_a_large_queued_background_response_is_read_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, instructions: str
) -> None:
    """A queued background response is read for its id (its usage is owed: a later poll
    counts it): in a JSON thread when the answer is large (it repeats the instructions), on
    the loop when it is small. The client gets the backend's bytes as they came."""
    owed: list[str] = []
    monkeypatch.setattr(
        ResponsesLedger, "owe", lambda self, response_id, counted: owed.append(response_id)
    )
    read = Watched(monkeypatch, routes_openai, "_json_object")
    asked = {"model": "demo-chat", "input": "hi", "background": True, "instructions": instructions}
    with serving(QueuedResponses) as backend:
        async with serving_proxy(backend) as client:
            queued = await client.post("/v1/responses", json=asked)
    assert queued.status_code == 200, queued.text
    assert queued.content == QueuedResponses.answers[-1]
    assert owed == [queued.json()["id"]]
    large = len(queued.content) > OFF_LOOP_BYTES
    assert read.take() == [(len(queued.content), not large)]


# ---- bodies read in parts, joined --------------------------------------------------------


class KeptBodies(ScriptedHandler):
    """A backend that keeps each chat request's body as it got it and answers a completion
    of ``answer_chars`` characters (``received``, ``sent``: the bodies)."""

    answer_chars: ClassVar[int] = 10
    received: ClassVar[list[bytes]] = []
    sent: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        self.received.append(self.rfile.read(int(self.headers["Content-Length"])))
        message = {"role": "assistant", "content": "y" * self.answer_chars}
        answer = {
            "id": "chatcmpl-kept",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "demo-chat",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
        self.sent.append(json.dumps(answer).encode())
        self.answer(200, self.sent[-1])


def _joins_in_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the joins of bodies handed to a worker thread from now on."""
    handed: list[int] = []
    run_sync = trio.to_thread.run_sync

    async def counted(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__name__", None) == "join" and getattr(fn, "__self__", None) == b"":
            handed.append(sum(map(len, args[0])))
        return await run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return handed


@pytest.mark.parametrize("large", [True, False])
async def test_a_large_body_read_in_parts_is_joined_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, large: bool
) -> None:
    """A client's body and a backend's answer over JOIN_OFF_LOOP_BYTES, read in parts,
    are joined in a thread (on the loop, a 40 MB join held it 24-40 ms); smaller ones on
    the loop. Both arrive as they were sent: here a chat forwarded and answered as it
    came."""
    size = 2 * JOIN_OFF_LOOP_BYTES if large else 1000
    image = base64.b64encode(bytes(range(256)) * (size // 340)).decode()
    monkeypatch.setattr(KeptBodies, "answer_chars", size)
    monkeypatch.setattr(KeptBodies, "received", [])
    monkeypatch.setattr(KeptBodies, "sent", [])
    handed = _joins_in_threads(monkeypatch)
    with serving(KeptBodies) as backend:
        async with serving_proxy(backend) as client:
            response = await client.post("/v1/chat/completions", json=_chat("/v1/x", image))
    assert response.status_code == 200, response.text
    assert KeptBodies.received == [response.request.content]
    assert KeptBodies.sent == [response.content]
    expected = [len(response.request.content), len(response.content)] if large else []
    assert handed == expected


class HeldDecoding:
    """``forward._decoded`` held, for a body over the threshold, until :attr:`release` is
    set (at most HOLD_SECONDS); notes whether it was released (True) or went on by itself
    (False). :attr:`entered` is set when a held decoding starts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released: list[bool] = []
        self.finished = threading.Event()
        original = forward._decoded

        def held(raw: bytes, *, lenient: bool) -> Any:
            if len(raw) > OFF_LOOP_BYTES:
                self.entered.set()
                self.released.append(self.release.wait(HOLD_SECONDS))
                try:
                    return original(raw, lenient=lenient)
                finally:
                    self.finished.set()
            return original(raw, lenient=lenient)

        monkeypatch.setattr(forward, "_decoded", held)

    async def wait_entered(self) -> None:
        assert await trio.to_thread.run_sync(self.entered.wait, 2 * HOLD_SECONDS)


async def test_a_stream_flows_to_its_end_while_a_large_body_is_being_decoded(
    demo_backend: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 MB body's decoding is held until a stream on the same worker has been read to
    its last line: on the loop, it would hold every stream with it (and go on only after
    HOLD_SECONDS, unreleased)."""
    held = HeldDecoding(monkeypatch)
    answers: list[httpx.Response] = []
    async with serving_proxy(demo_backend.url) as client:

        async def large_request() -> None:
            answers.append(await client.post("/api/chat", json=_chat("/api/chat", LARGE_IMAGE)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(large_request)
            await held.wait_entered()
            stream = {
                "model": "demo-chat",
                "messages": [{"role": "user", "content": "count [[tokens=20]]"}],
            }
            lines = []
            async with client.stream("POST", "/api/chat", json=stream) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    lines.append(json.loads(line))
            held.release.set()
        assert held.released == [True]
        assert lines[-1]["done"] is True and len(lines) == 21
    assert [answer.status_code for answer in answers] == [200]


def _requests_with_status(text: str, status: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "http_requests_total" and sample.labels.get("status") == status
    )


async def test_a_client_that_leaves_mid_decode_is_let_go_and_the_backend_never_asked(
    demo_backend: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
    demo_events: Callable[[], list[dict]],
) -> None:
    """The decoding of a body is abandoned to a client that leaves: its request ends (a
    499) while the thread still runs, the thread's token stays borrowed until it is done
    (the bound holds), and its result goes nowhere: no backend request."""
    held = HeldDecoding(monkeypatch)
    request_id = "left-mid-decode-" + uuid.uuid4().hex
    body = json.dumps(_chat("/api/chat", LARGE_IMAGE)).encode()
    async with serving_proxy(demo_backend.url) as client:
        await _leave_while_held(client, held, "/api/chat", body, request_id)
        # the client's next request is served as ever
        assert (await client.post("/api/chat", json=_chat("/api/chat", None))).status_code == 200
    assert not [event for event in demo_events() if event.get("request_id") == request_id]


async def _leave_while_held(
    client: httpx.AsyncClient,
    held: HeldDecoding | HeldLookup,
    path: str,
    body: bytes,
    request_id: str = "left",
) -> None:
    """A client that sends ``body`` to ``path`` and leaves once ``held``'s thread work has
    started: its request is counted a 499 while that thread still runs and keeps its
    token (the bound holds); released, the thread returns the token."""
    port = int(str(client.base_url).rstrip("/").rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    await stream.send_all(head.encode() + body)
    await held.wait_entered()
    await stream.aclose()
    with trio.fail_after(HOLD_SECONDS):  # seen while the thread is still held
        while True:
            scraped = await client.get("/v1/metrics/prometheus")
            if _requests_with_status(scraped.text, "499") == 1:
                break
            await trio.sleep(0.02)
    assert not held.finished.is_set()
    assert json_threads().borrowed_tokens == 1
    held.release.set()
    with trio.fail_after(HOLD_SECONDS):  # returned by the thread: there is no event
        while json_threads().borrowed_tokens:  # noqa: ASYNC110
            await trio.sleep(0.01)
    assert held.released == [True]
    assert held.finished.is_set()


# ---- errors of large bodies, in the caller's dialect (the proxy's own process) -------------


def _assert_error(response: httpx.Response, path: str, status: int, needle: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str)
        assert needle in error
    else:
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert needle in error["message"]


PADDING = "x" * (2 * OFF_LOOP_BYTES)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/api/embed"])
def test_invalid_json_in_a_large_body_is_a_400_in_the_callers_dialect(
    proxy: ServerProcess, path: str
) -> None:
    body = '{"model": "demo-chat", "messages": [], "pad": "' + PADDING + '", }'
    response = httpx.post(proxy.url + path, content=body, timeout=30)
    _assert_error(response, path, 400, "invalid JSON in request body")


@pytest.mark.parametrize("path", ["/api/chat", "/v1/embeddings"])
def test_a_large_body_that_is_no_json_object_is_a_400_in_the_callers_dialect(
    proxy: ServerProcess, path: str
) -> None:
    response = httpx.post(proxy.url + path, json=[PADDING], timeout=30)
    _assert_error(response, path, 400, "request body must be a JSON object")


@pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions"])
def test_a_large_body_nested_too_deeply_is_a_400_in_the_callers_dialect(
    proxy: ServerProcess, path: str
) -> None:
    """Past the depth a decoder reads, whether the loop or a thread decodes it."""
    nested = "[" * 200_000 + "]" * 200_000
    body = '{"model": "demo-chat", "prompt": "hi", "messages": ' + nested + "}"
    assert len(body) > OFF_LOOP_BYTES
    response = httpx.post(proxy.url + path, content=body, timeout=30)
    _assert_error(response, path, 400, "nested too deeply")


def test_a_large_body_that_is_not_utf8_is_read_leniently_on_api_only(
    proxy: ServerProcess,
) -> None:
    """Ollama's decoder reads bytes that are not UTF-8 as U+FFFD, the OpenAI API refuses
    them: so too for a body decoded in a thread."""
    text = b"caf\xe9 " + PADDING.encode()
    api = b'{"model": "demo-chat", "stream": false, "messages": [{"role": "user", "content": "'
    response = httpx.post(proxy.url + "/api/chat", content=api + text + b'"}]}', timeout=30)
    assert response.status_code == 200, response.text
    v1 = b'{"model": "demo-chat", "messages": [{"role": "user", "content": "'
    response = httpx.post(
        proxy.url + "/v1/chat/completions", content=v1 + text + b'"}]}', timeout=30
    )
    _assert_error(response, "/v1/chat/completions", 400, "invalid JSON in request body")


LIMIT = 4 * OFF_LOOP_BYTES


@pytest.fixture(scope="module")
def limited_proxy(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> ServerProcess:
    return start_proxy(demo_backend.url, MAX_REQUEST_BYTES=str(LIMIT))


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_the_body_limit_is_as_before_for_bodies_decoded_in_a_thread(
    limited_proxy: ServerProcess, path: str
) -> None:
    """MAX_REQUEST_BYTES still refuses a larger body before it is read (413, in dialect),
    and one under it but over the threshold is served."""
    image = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * OFF_LOOP_BYTES)).decode()
    fits = httpx.post(limited_proxy.url + path, json=_chat(path, image), timeout=30)
    assert fits.status_code == 200, fits.text
    assert OFF_LOOP_BYTES < len(fits.request.content) <= LIMIT
    too_large = _chat(path, image + "A" * LIMIT)
    response = httpx.post(limited_proxy.url + path, json=too_large, timeout=30)
    _assert_error(response, path, 413, f"larger than the limit of {LIMIT} bytes")


# ---- the usage of a large answer relayed as it came -------------------------------------


class UsageFirstEmbeddings(ScriptedHandler):
    """Embeds each input as a vector of ``dimensions`` floats (8 if not asked) and writes
    its answer as llama.cpp's server does, ``usage`` before the embeddings: ``{"model",
    "object", "usage", "data"}``; its prompt tokens are 3 per input."""

    def do_GET(self) -> None:
        self.answer(200, b'{"object": "list", "data": [{"id": "demo-embed"}]}')

    def do_POST(self) -> None:
        asked = self.json_body()
        vector = [0.001 * (i % 997) - 0.5 for i in range(asked.get("dimensions") or 8)]
        data = [{"embedding": vector, "index": index, "object": "embedding"}
                for index, _ in enumerate(asked["input"])]  # fmt: skip
        tokens = 3 * len(data)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        answer = {"model": asked["model"], "object": "list", "usage": usage, "data": data}
        self.answer(200, json.dumps(answer, separators=(",", ":")).encode())


def _embed(inputs: int, dimensions: int = 8) -> dict[str, Any]:
    return {"model": "demo-embed", "input": [f"text {i}" for i in range(inputs)],
            "dimensions": dimensions}  # fmt: skip


# 300 vectors of 1,024 floats: ~2 MB, its usage in its first 100 bytes
LARGE_USAGE_FIRST = _embed(300, 1024)


def _input_tokens(exposition: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == "trioproxy_tokens_total" and sample.labels.get("type") == "input"
    )


async def test_a_large_answers_usage_written_before_its_data_is_read_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/v1/embeddings`` relayed as it came: its usage, which llama.cpp's server writes
    before the vectors, was read by decoding the whole answer on the loop (a 32 MB one
    held it 60-330 ms); now a large answer's lookup goes to a JSON thread when its last
    256 KiB do not hold the key, and reads only the member there. A small one is read on
    the loop as before; both are counted."""
    looked_up = Watched(monkeypatch, routes_openai, "top_level_member")
    with serving(UsageFirstEmbeddings) as backend:
        async with serving_proxy(backend) as client:
            before = _input_tokens((await client.get("/v1/metrics/prometheus")).text)
            small = await client.post("/v1/embeddings", json=_embed(2))
            assert small.status_code == 200, small.text
            assert looked_up.take() == [(len(small.content), True)]
            large = await client.post("/v1/embeddings", json=LARGE_USAGE_FIRST)
            assert large.status_code == 200, large.text
            assert len(large.content) > 4 * OFF_LOOP_BYTES
            assert large.content.index(b'"usage"') < 100
            assert looked_up.take() == [(len(large.content), False)]
            after = _input_tokens((await client.get("/v1/metrics/prometheus")).text)
    assert after - before == 3 * 2 + 3 * 300


async def test_a_large_answers_usage_at_its_end_is_read_on_the_loop_from_its_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where most backends write it, after the content: read from the answer's last
    256 KiB on the loop, no thread (its round trip, and the wait behind another request's
    JSON work, would cost more than decoding the tail)."""
    looked_up = Watched(monkeypatch, routes_openai, "top_level_member")
    handed = Watched(monkeypatch, routes_openai, "member_near_the_end")
    monkeypatch.setattr(KeptBodies, "answer_chars", 2 * OFF_LOOP_BYTES)
    monkeypatch.setattr(KeptBodies, "sent", [])
    with serving(KeptBodies) as backend:
        async with serving_proxy(backend) as client:
            response = await client.post("/v1/chat/completions", json=_chat("/v1/x", None))
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["total_tokens"] == 5
    assert looked_up.take() == []
    assert handed.take() == [(len(response.content), True)]


class HeldLookup:
    """``routes_openai.top_level_member`` held, for a body over the threshold, until
    :attr:`release` is set (at most HOLD_SECONDS); notes whether it was released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.released: list[bool] = []
        self.finished = threading.Event()
        original = top_level_member

        def held(body: bytes, key: str) -> Any:
            if len(body) > OFF_LOOP_BYTES:
                self.entered.set()
                self.released.append(self.release.wait(HOLD_SECONDS))
                try:
                    return original(body, key)
                finally:
                    self.finished.set()
            return original(body, key)

        monkeypatch.setattr(routes_openai, "top_level_member", held)

    async def wait_entered(self) -> None:
        assert await trio.to_thread.run_sync(self.entered.wait, 2 * HOLD_SECONDS)


async def test_requests_are_served_while_a_large_answers_usage_is_looked_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The usage lookup of a large answer is held until three small requests on the same
    worker have been answered: on the loop, it would hold them all (and go on only after
    HOLD_SECONDS, unreleased)."""
    held = HeldLookup(monkeypatch)
    answers: list[httpx.Response] = []
    with serving(UsageFirstEmbeddings) as backend:
        async with serving_proxy(backend) as client:

            async def large_request() -> None:
                answers.append(await client.post("/v1/embeddings", json=LARGE_USAGE_FIRST))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(large_request)
                await held.wait_entered()
                for _ in range(3):
                    small = await client.post("/v1/embeddings", json=_embed(1))
                    assert small.status_code == 200, small.text
                held.release.set()
    assert held.released == [True]
    assert [answer.status_code for answer in answers] == [200]


async def test_a_client_that_leaves_mid_usage_lookup_is_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lookup is abandoned to a client that leaves: its request ends (a 499) while
    the thread still runs, the thread's token stays borrowed until it is done, and its
    result goes nowhere; the next request is served as ever."""
    held = HeldLookup(monkeypatch)
    body = json.dumps(LARGE_USAGE_FIRST).encode()
    with serving(UsageFirstEmbeddings) as backend:
        async with serving_proxy(backend) as client:
            await _leave_while_held(client, held, "/v1/embeddings", body)
            assert (await client.post("/v1/embeddings", json=_embed(1))).status_code == 200


# ---- a JSON answer to a stream request ----------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/chat/completions", "/api/chat"])
async def test_a_large_json_answer_to_a_stream_is_decoded_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A backend that answers a stream request with one JSON body (it ignored ``stream``):
    the body is decoded, and the events built from it written, in a JSON thread when it is
    large (it was decoded on the loop, up to MAX_RESPONSE_BYTES), on the loop when small;
    the client gets the whole text either way."""
    decoded = Watched(monkeypatch, relay, "_decoded")
    if path == "/v1/responses":
        asked: dict[str, Any] = {"model": "demo-chat", "input": "hi", "stream": True}
    else:
        asked = {"model": "demo-chat", "stream": True,
                 "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    with serving(SizedAnswers) as backend:
        async with serving_proxy(backend) as client:
            for size in (2000, 2 * OFF_LOOP_BYTES):
                monkeypatch.setattr(SizedAnswers, "pad_to", size)
                async with client.stream("POST", path, json=asked) as got:
                    assert got.status_code == 200
                    text = (await got.aread()).decode()
                assert "x" * (size - 1000) in text
                assert decoded.take() == [(size, size <= OFF_LOOP_BYTES)]


# ---- an answer that ends where its connection does -------------------------------------


class EndedByClose(ScriptedHandler):
    """Answers a chat completion of ``chars`` characters with neither Content-Length nor
    chunked framing (the body ends where the connection does); ``"cut"`` in the model's
    name cuts it just after a ``}``."""

    chars: ClassVar[int] = 10

    def do_POST(self) -> None:
        asked = self.json_body()
        message = {"role": "assistant", "content": "y" * self.chars, "extra": {"a": 1}}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        answer = {"id": "c", "object": "chat.completion", "model": asked["model"],
                  "choices": [choice]}  # fmt: skip
        body = json.dumps(answer).encode()
        if "cut" in asked["model"]:
            body = body[: body.rindex(b"}", 0, -3) + 1]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("chars", [10, 2 * OFF_LOOP_BYTES])
async def test_a_large_answer_ended_by_its_connection_is_decoded_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, chars: int
) -> None:
    """Only decoding a body that ended with its connection whole tells whether it was cut:
    in a JSON thread when it is large (it was on the loop, however large), on the loop
    when small; a cut one is the backend's 502 either way."""
    decoded = Watched(monkeypatch, forward, "_decodes_whole")
    monkeypatch.setattr(EndedByClose, "chars", chars)
    asked = {"messages": [{"role": "user", "content": "hi"}]}
    with serving(EndedByClose) as backend:
        async with serving_proxy(backend) as client:
            whole = await client.post("/v1/chat/completions", json={**asked, "model": "m"})
            assert whole.status_code == 200, whole.text
            assert whole.json()["choices"][0]["message"]["content"] == "y" * chars
            assert decoded.take() == [(len(whole.content), chars < OFF_LOOP_BYTES)]
            cut = await client.post("/v1/chat/completions", json={**asked, "model": "cut"})
            assert cut.status_code == 502, cut.text
            assert "not a JSON object" in cut.json()["error"]["message"]
            assert [on_loop for _, on_loop in decoded.take()] == [chars < OFF_LOOP_BYTES]


# a call's arguments that make its answer large: a file a model writes, say
LARGE_ARGUMENTS = {"path": "notes.txt", "content": "a line of text\n" * 40_000}


class _SigningBackend(ScriptedHandler):
    """A Gemini 3-like backend: answers with a signed call to ``write``, of
    LARGE_ARGUMENTS when the prompt says "large"; records the signatures sent back."""

    received: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        self.answer(200, b'{"object": "list", "data": [{"id": "gemini-3-pro"}]}')

    def do_POST(self) -> None:
        body = self.json_body()
        sent = [c for m in body["messages"] for c in m.get("tool_calls") or []]
        type(self).received += [c.get("extra_content", {}).get("google", {}).get(
            "thought_signature") for c in sent]  # fmt: skip
        arguments = LARGE_ARGUMENTS if "large" in body["messages"][0]["content"] else {"a": 1}
        call = {"id": "fc-1", "type": "function", "extra_content": {"google": {
            "thought_signature": "sig-" + body["messages"][0]["content"]}},
            "function": {"name": "write", "arguments": json.dumps(arguments)}}  # fmt: skip
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
        self.answer(200, json.dumps({"id": "x", "object": "chat.completion",
                                     "choices": [choice]}).encode())  # fmt: skip


async def test_a_large_answers_thought_signatures_are_found_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/api/chat keeps Gemini's thought signature of each call it answers, found again by
    its arguments, which it writes again with sorted keys and hashes: for a call of MBs of
    arguments that held the loop. In a large answer's JSON thread hop now, a small answer's
    on the loop, and the signature comes back on the next turn either way."""
    _SigningBackend.received = []
    hashed = Watched(monkeypatch, signatures, "_keys")
    tools = [{"type": "function", "function": {"name": "write", "parameters": {}}}]
    with serving(_SigningBackend) as url:
        async with serving_proxy(url, max_retries=0) as client:
            for prompt, large in (("small", False), ("large", True)):
                asked = {"model": "gemini-3-pro", "stream": False, "tools": tools,
                         "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
                response = await client.post("/api/chat", json=asked)
                assert response.status_code == 200, response.text
                assert (len(response.content) > OFF_LOOP_BYTES) is large
                ((_, on_loop),) = hashed.take()
                assert on_loop is not large
                # the next turn: the call as an Ollama client sends it back, without its id
                message = response.json()["message"]
                call = {"function": message["tool_calls"][0]["function"]}
                asked["messages"] += [
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": "done"},
                ]
                response = await client.post("/api/chat", json=asked)
                assert response.status_code == 200, response.text
                assert _SigningBackend.received[-1] == f"sig-{prompt}"
                hashed.take()


# ---- the backend's key masked in a large answer -----------------------------------------------

ECHOED_KEY = "sk-proj-echoed-by-the-backend-0123456789"


class _KeyEchoingBackend(ScriptedHandler):
    """Answers every chat with ~1 MB of text that quotes the proxy's key twice, written as
    Python's JSON writes it (every character past ASCII as a ``\\u`` escape: the slowest
    body to search for the key's spellings)."""

    TEXT = f"café au lait, {ECHOED_KEY}, " + "un café noir. " * 70_000 + ECHOED_KEY

    def do_GET(self) -> None:
        if not self.path.startswith("/v1/responses/"):
            self.answer(404, b'{"error": "not found"}')
            return
        # a stored response retrieved by its id (a route Quart serves, not the fast path)
        part = {"type": "output_text", "text": self.TEXT, "annotations": []}
        item = {"type": "message", "id": "msg_1", "role": "assistant", "content": [part]}
        answer = {"id": "resp_1", "object": "response", "status": "completed", "model": "m",
                  "output": [item]}  # fmt: skip
        self.answer(200, json.dumps(answer).encode())

    def do_POST(self) -> None:
        self.json_body()
        message = {"role": "assistant", "content": self.TEXT}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        answer = {"id": "x", "object": "chat.completion", "choices": [choice]}
        self.answer(200, json.dumps(answer).encode())


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses/resp_1"])
async def test_a_large_answer_is_masked_in_pieces_while_the_loop_serves(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """A non-stream answer that quotes the backend's key gets it masked whole, as before,
    but a large one in pieces with other tasks run between them: one search of the whole
    body held the loop (a 30 MB answer 30-40 ms, 300 ms with ``\\u`` escapes), and no
    thread would have let go of it during that one call into C."""
    searches: list[tuple[int, int]] = []  # (bytes searched, loop turns taken by then)
    turns = 0
    search = errors._boundary_matches

    def watched(pattern: Any, data: Any, pos: int, end: int) -> Any:
        if isinstance(data, bytes) and len(data) > 1000:  # not a log line's scrub
            searches.append((len(data) - pos, turns))
        return search(pattern, data, pos, end)

    async def turning() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    monkeypatch.setattr(errors, "_boundary_matches", watched)
    with serving(_KeyEchoingBackend) as url:
        async with serving_proxy(url, api_key=ECHOED_KEY) as client:
            asked = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(turning)
                if path.startswith("/v1/responses/"):  # served by Quart (app.served)
                    response = await client.get(path)
                else:
                    response = await client.post(path, json=asked)
                nursery.cancel_scope.cancel()
    assert response.status_code == 200, response.text
    if path.startswith("/v1/responses/"):
        content = response.json()["output"][0]["content"][0]["text"]
    else:
        content = response.json()["choices"][0]["message"]["content"]
    assert ECHOED_KEY not in response.text and content.count("***") == 2
    assert content.startswith("café au lait, ***, un café noir.") and content.endswith(". ***")
    assert len(response.content) > 16 * MASKED_AT_ONCE_BYTES
    assert searches, "the answer was not searched for the key's escaped spellings"
    assert max(size for size, _ in searches) <= 2 * MASKED_AT_ONCE_BYTES
    assert searches[-1][1] > searches[0][1] + 8  # the loop served between the pieces
