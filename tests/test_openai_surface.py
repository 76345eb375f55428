"""The openai Python SDK's helpers and its less common requests through a real proxy, to a
backend that writes its JSON as vLLM and llama.cpp's server do (compact, UTF-8 as it is)
and answers what the demo backend does not: ``n`` choices, structured outputs, echoed
prompts, token-array inputs, rate-limit advice, model ids with "/" and names beyond ASCII.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import openai
import pydantic
import pytest

from .conftest import ServerProcess
from .fakes import FULL_LENGTH_VECTOR, FullLengthEmbeddings, ScriptedHandler, serving
from .test_metrics_e2e import scrape, total

SLASHED = "meta-llama/Llama-3-8B-Instruct"
ROUTER = "openrouter/auto"  # OpenRouter answers it under the model it chose
ROUTED_TO = "openai/gpt-4o-2024-08-06"
ACCENTED = "modèle-ü"  # a backend id beyond ASCII
IGNORES_STREAM = "ignores-stream"  # answers a stream request with one JSON completion
MAPPING = {"llama": SLASHED, "team/llama": SLASHED, "fr": ACCENTED}
# the backend's headers on every answer: what reaches the client is an allowlist
BACKEND_HEADERS = {
    "x-request-id": "req_backend123",
    "x-ratelimit-remaining-requests": "99",
    "x-ratelimit-limit-tokens": "1000",
    "openai-processing-ms": "42",
    "openai-organization": "org-private",
    "set-cookie": "__cf_bm=abc; path=/; HttpOnly",
    "cf-ray": "8f00-LHR",
}
MESSAGES: Any = [{"role": "user", "content": "weather?"}]
WEATHER_JSON = {"city": "Paris", "temperature": 21}


class Weather(pydantic.BaseModel):
    city: str
    temperature: int


def compact(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


class OpenAIShaped(ScriptedHandler):
    """Chat (``n``, logprobs, ``response_format`` answered with WEATHER_JSON, a tool call
    for ``tools``, usage when asked), embeddings (``dimensions`` honoured, floats
    whatever ``encoding_format`` says) and legacy completions (``echo``, ``logprobs``);
    the model ``limited`` answers 429 with the advice ``advice`` holds. ``asked`` holds
    (path, body) of every request."""

    asked: ClassVar[list[tuple[str, Any]]] = []
    advice: ClassVar[dict[str, str]] = {}

    def do_GET(self) -> None:
        type(self).asked.append((self.path, None))
        data = [{"id": name, "object": "model", "created": 1, "owned_by": "x"}
                for name in (SLASHED, ROUTER, ACCENTED, "limited", IGNORES_STREAM)]  # fmt: skip
        self.reply({"object": "list", "data": data})

    def do_POST(self) -> None:
        body = self.json_body()
        type(self).asked.append((self.path, body))
        if body["model"] == "limited":
            error = {"message": "Rate limit reached", "type": "requests", "param": None,
                     "code": "rate_limit_exceeded"}  # fmt: skip
            self.answer(429, compact({"error": error}).encode(), headers=self.advice)
            return
        model = ROUTED_TO if body["model"] == ROUTER else body["model"]
        if self.path.endswith("/chat/completions"):
            self.chat(body, model)
        elif self.path.endswith("/embeddings"):
            inputs = body["input"]
            single = isinstance(inputs, str) or isinstance(inputs[0], int)
            vector = [0.25] * body.get("dimensions", 6)
            data = [{"object": "embedding", "index": i, "embedding": vector}
                    for i in range(1 if single else len(inputs))]  # fmt: skip
            usage = {"prompt_tokens": 3, "total_tokens": 3}
            self.reply({"object": "list", "data": data, "model": model, "usage": usage})
        else:
            self.completion(body, model)

    def reply(self, payload: object) -> None:
        self.answer(200, compact(payload).encode(), headers=BACKEND_HEADERS)

    def chat(self, body: dict[str, Any], model: str) -> None:
        choices = body.get("n", 1)
        if body.get("tools"):
            pieces = ['{"city"', ': "Par', 'is", "temperature": ', "21}"]
        elif body.get("response_format"):
            text = json.dumps(WEATHER_JSON)
            pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
        else:
            pieces = ["Hel", "lo ", "thé", "re"]
        usage = {"prompt_tokens": 7, "completion_tokens": len(pieces) * choices}
        usage["total_tokens"] = 7 + usage["completion_tokens"]
        head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": model, "system_fingerprint": None}  # fmt: skip
        if not body.get("stream") or body["model"] == IGNORES_STREAM:
            message = {"role": "assistant", "content": "".join(pieces), "refusal": None}
            whole = [{"index": i, "message": message, "finish_reason": "stop", "logprobs": None}
                     for i in range(choices)]  # fmt: skip
            self.reply({**head, "object": "chat.completion", "choices": whole, "usage": usage})
            return
        events = []
        for i in range(choices):
            events.append({"index": i, "delta": {"role": "assistant", "content": ""}})
        for number, piece in enumerate(pieces):
            for i in range(choices):
                events.append({"index": i, "delta": self.delta(body, piece, number)})
                if body.get("logprobs"):
                    entry = {"token": piece, "logprob": -0.25, "bytes": list(piece.encode()),
                             "top_logprobs": []}  # fmt: skip
                    events[-1]["logprobs"] = {"content": [entry], "refusal": None}
        finish = "tool_calls" if body.get("tools") else "stop"
        events.extend({"index": i, "delta": {}, "finish_reason": finish} for i in range(choices))
        chunks = [{**head, "choices": [{"finish_reason": None, **event}]} for event in events]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**head, "choices": [], "usage": usage})
        text = "".join(f"data: {compact(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
        self.answer(200, text.encode(), "text/event-stream", headers=BACKEND_HEADERS)

    @staticmethod
    def delta(body: dict[str, Any], piece: str, number: int) -> dict[str, Any]:
        if not body.get("tools"):
            return {"content": piece}
        call: dict[str, Any] = {"index": 0, "function": {"arguments": piece}}
        if number == 0:
            name = body["tools"][0]["function"]["name"]
            call.update(id="call_1", type="function")
            call["function"]["name"] = name
        return {"tool_calls": [call]}

    def completion(self, body: dict[str, Any], model: str) -> None:
        text = (body["prompt"] if body.get("echo") else "") + " world"
        logprobs = None
        if body.get("logprobs") is not None:
            logprobs = {"tokens": [" world"], "token_logprobs": [-0.5],
                        "top_logprobs": [{" world": -0.5}], "text_offset": [5]}  # fmt: skip
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": logprobs}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        self.reply({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
                    "choices": [choice], "usage": usage})  # fmt: skip


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    with serving(OpenAIShaped) as url:
        yield url


@pytest.fixture(scope="module")
def shaped_proxy(
    backend: str,
    start_proxy: Callable[..., ServerProcess],
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    mapping: Path = tmp_path_factory.mktemp("mapping") / "models.json"
    mapping.write_text(json.dumps(MAPPING), encoding="utf-8")
    return start_proxy(backend, MODEL_MAPPING_FILE=str(mapping), MAX_RETRIES="0")


@pytest.fixture
def client(shaped_proxy: ServerProcess) -> Iterator[openai.OpenAI]:
    OpenAIShaped.asked.clear()
    with openai.OpenAI(
        base_url=f"{shaped_proxy.url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=30,
        _strict_response_validation=True,
    ) as c:
        yield c


def forwarded() -> list[str]:
    """The paths the backend was asked for, the proxy's own model-list fetches aside."""
    return [path for path, _ in OpenAIShaped.asked if not path.endswith("/models")]


def lenient(client: openai.OpenAI) -> openai.OpenAI:
    """The client without strict validation: the SDK validates the base64 vectors it asks
    for by default before it decodes them, against types that say floats."""
    other = client.with_options()
    other._strict_response_validation = False
    return other


# a name as the client gives it, and as every answer must name the model
NAMES = [("llama", "llama"), ("team/llama", "team/llama"), (SLASHED, SLASHED),
         ("fr", "fr"), (ROUTER, ROUTED_TO)]  # fmt: skip


@pytest.mark.parametrize(("name", "answered"), NAMES)
def test_structured_outputs_parse_and_the_stream_helper_under_any_name(
    client: openai.OpenAI, name: str, answered: str
) -> None:
    """``parse`` and ``stream`` with a pydantic ``response_format``: every answer names the
    client's model (a mapped one, one with "/", one mapped to an id beyond ASCII, which the
    backend writes as UTF-8) or the one the backend says answered (OpenRouter's choice)."""
    assert client.models.retrieve(name).id == name
    parsed = client.chat.completions.parse(model=name, messages=MESSAGES, response_format=Weather)
    assert parsed.model == answered
    assert parsed.choices[0].message.parsed == Weather(**WEATHER_JSON)

    with client.chat.completions.stream(
        model=name,
        messages=MESSAGES,
        response_format=Weather,
        logprobs=True,
        stream_options={"include_usage": True},
    ) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    kinds = [event.type for event in events]
    assert {"content.delta", "logprobs.content.delta"} <= set(kinds)
    assert kinds.count("content.done") == kinds.count("logprobs.content.done") == 1
    (done,) = [event for event in events if event.type == "content.done"]
    assert done.parsed == Weather(**WEATHER_JSON)  # type: ignore[union-attr]
    assert {event.chunk.model for event in events if event.type == "chunk"} == {answered}
    assert final.model == answered and final.usage is not None
    assert final.choices[0].message.parsed == Weather(**WEATHER_JSON)
    tokens = final.choices[0].logprobs.content or []  # type: ignore[union-attr]
    assert "".join(t.token for t in tokens) == json.dumps(WEATHER_JSON)

    with client.chat.completions.stream(
        model=name, messages=MESSAGES, tools=[openai.pydantic_function_tool(Weather)]
    ) as stream:
        done_calls = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    (call,) = done_calls
    assert (call.name, call.parsed_arguments) == ("Weather", Weather(**WEATHER_JSON))
    assert final.model == answered
    assert final.choices[0].message.tool_calls[0].function.parsed_arguments == call.parsed_arguments  # type: ignore[index,union-attr]


def test_n_choices_are_streamed_whole_and_usage_comes_once_when_asked(
    client: openai.OpenAI, shaped_proxy: ServerProcess
) -> None:
    """``n=3`` streamed: every choice's chunks are relayed, in order; usage comes in one
    chunk to a client that asked, in none to one that did not (the proxy adds no
    ``stream_options``); the tokens are counted once per request either way."""
    before = total(scrape(shaped_proxy.url), "trioproxy_tokens_total", type="output")
    for asked in (False, True):
        options: Any = {"stream_options": {"include_usage": True}} if asked else {}
        chunks = list(
            client.chat.completions.create(
                model="fr", messages=MESSAGES, n=3, stream=True, **options
            )
        )
        texts = {i: "" for i in range(3)}
        finishes = {}
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
        assert texts == {i: "Hello thére" for i in range(3)}
        assert finishes == {i: "stop" for i in range(3)}
        usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
        assert len(usage) == (1 if asked else 0)
        if asked:
            assert usage[0].completion_tokens == 12 and chunks[-1].choices == []
        assert {chunk.model for chunk in chunks} == {"fr"}
    _, sent = OpenAIShaped.asked[-1]
    assert sent["stream_options"] == {"include_usage": True} and sent["model"] == ACCENTED
    assert "stream_options" not in OpenAIShaped.asked[-2][1]
    # 12 content chunks without usage (one token each), then the backend's 12
    after = total(scrape(shaped_proxy.url), "trioproxy_tokens_total", type="output")
    assert after - before == 24


def test_a_backend_that_ignores_stream_gives_usage_only_to_a_client_that_asked(
    client: openai.OpenAI, shaped_proxy: ServerProcess
) -> None:
    """A backend that answers a stream request with one JSON completion: the proxy makes
    it the stream it would have sent, so its usage is a last chunk of its own (empty
    ``choices``) when the client asked for ``include_usage``, and nowhere when it did not.
    The tokens are the backend's count either way, once."""
    before = total(scrape(shaped_proxy.url), "trioproxy_tokens_total", type="output")
    for asked in (False, True):
        options: Any = {"stream_options": {"include_usage": True}} if asked else {}
        chunks = list(
            client.chat.completions.create(
                model=IGNORES_STREAM, messages=MESSAGES, n=2, stream=True, **options
            )
        )
        texts = sorted(c.delta.content or "" for chunk in chunks for c in chunk.choices)
        assert texts == ["Hello thére", "Hello thére"]
        usage = [chunk for chunk in chunks if chunk.usage is not None]
        if asked:
            assert usage == chunks[-1:] and chunks[-1].choices == []
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
            assert chunks[-1].id == chunks[0].id and chunks[-1].model == IGNORES_STREAM
        else:
            assert usage == []
    after = total(scrape(shaped_proxy.url), "trioproxy_tokens_total", type="output")
    assert after - before == 16


def test_the_backend_headers_an_sdk_sees_are_its_rate_limits_and_its_request_id(
    client: openai.OpenAI,
) -> None:
    """``with_raw_response``: the backend's rate limits and its request id (as
    ``x-upstream-request-id``) reach the client, streamed or not; its cookies, its
    organisation and its other headers do not; ``request_id`` is the proxy's id, the one
    its logs carry; the length is that of the body rewritten for the mapped name."""
    raw = client.chat.completions.with_raw_response.create(model="fr", messages=MESSAGES)
    with client.chat.completions.with_streaming_response.create(
        model="fr", messages=MESSAGES, stream=True
    ) as streamed:
        assert "".join(line for line in streamed.iter_lines()).count('"model":"fr"') == 6
        stream_headers = streamed.headers
    for headers in (raw.headers, stream_headers):
        assert headers["x-ratelimit-remaining-requests"] == "99"
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        assert headers["x-upstream-request-id"] == "req_backend123"
        assert headers["x-request-id"] != "req_backend123"
        for private in ("set-cookie", "openai-organization", "openai-processing-ms", "cf-ray"):
            assert private not in headers
    assert raw.request_id == raw.headers["x-request-id"]
    assert int(raw.headers["content-length"]) == len(raw.http_response.content)
    assert raw.parse().model == "fr"


@pytest.mark.parametrize("retry", ["true", "false"])
def test_the_sdk_retries_a_rate_limit_as_the_backend_advises(
    shaped_proxy: ServerProcess, retry: str
) -> None:
    """A 429 with ``retry-after-ms`` and ``x-should-retry`` (OpenAI's): the SDK, whose retry
    timing reads them, retries when the backend says so and not otherwise."""
    OpenAIShaped.advice = {"retry-after-ms": "5", "retry-after": "0", "x-should-retry": retry}
    OpenAIShaped.asked.clear()
    with openai.OpenAI(base_url=f"{shaped_proxy.url}/v1", api_key="x", max_retries=1) as c:
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model="limited", messages=MESSAGES)
    headers = info.value.response.headers
    assert (headers["retry-after-ms"], headers["x-should-retry"]) == ("5", retry)
    assert info.value.code == "rate_limit_exceeded"
    posts = [path for path, body in OpenAIShaped.asked if body is not None]
    assert len(posts) == (2 if retry == "true" else 1)


def test_embeddings_token_arrays_and_dimensions_reach_the_backend_as_sent(
    client: openai.OpenAI,
) -> None:
    """Token-array inputs and ``dimensions`` go to the backend as the client wrote them (the
    body is written again for the mapped name); the SDK's default, base64, is decoded from
    a backend that answers floats."""
    one = client.embeddings.create(model="llama", input=[1, 2, 3], encoding_format="float")
    many = client.embeddings.create(
        model="llama", input=[[1, 2], [3]], dimensions=2, encoding_format="float"
    )
    default = lenient(client).embeddings.create(model="llama", input=["a", "b"], dimensions=3)
    assert [d.embedding for d in one.data] == [[0.25] * 6]
    assert [d.embedding for d in many.data] == [[0.25] * 2] * 2
    assert [d.embedding for d in default.data] == [[0.25] * 3] * 2
    assert {one.model, many.model, default.model} == {"llama"}
    sent = [body for path, body in OpenAIShaped.asked if path.endswith("/embeddings")]
    assert sent == [
        {"model": SLASHED, "input": [1, 2, 3], "encoding_format": "float"},
        {"model": SLASHED, "input": [[1, 2], [3]], "dimensions": 2, "encoding_format": "float"},
        {"model": SLASHED, "input": ["a", "b"], "dimensions": 3, "encoding_format": "base64"},
    ]


def test_legacy_completions_echo_logprobs_and_suffix(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="team/llama", prompt="Hello", echo=True, logprobs=1, suffix="!", max_tokens=5
    )
    assert reply.model == "team/llama"
    assert reply.choices[0].text == "Hello world"
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == [" world"]
    assert logprobs.top_logprobs == [{" world": -0.5}]
    tokens = client.completions.create(model="team/llama", prompt=[[1, 2], [3]], max_tokens=5)
    assert tokens.choices[0].text == " world"
    sent = [body for path, body in OpenAIShaped.asked if path.endswith("/completions")]
    assert sent[0] == {"model": SLASHED, "prompt": "Hello", "echo": True, "logprobs": 1,
                       "suffix": "!", "max_tokens": 5}  # fmt: skip
    assert sent[1]["prompt"] == [[1, 2], [3]]


UNSERVED: list[tuple[str, Callable[[openai.OpenAI], object]]] = [
    ("audio.speech", lambda c: c.audio.speech.create(model="tts-1", voice="alloy", input="hi")),
    ("audio.transcriptions",
     lambda c: c.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"))),
    ("images.generate", lambda c: c.images.generate(prompt="a cat", model="dall-e-3")),
    ("files.list", lambda c: c.files.list()),
    ("batches.create", lambda c: c.batches.create(
        completion_window="24h", endpoint="/v1/chat/completions", input_file_id="file-1")),
    ("fine_tuning.jobs.list", lambda c: c.fine_tuning.jobs.list()),
    ("moderations.create", lambda c: c.moderations.create(input="hi")),
    ("vector_stores.list", lambda c: c.vector_stores.list()),
    ("conversations.create", lambda c: c.conversations.create()),
    ("chat.completions.retrieve", lambda c: c.chat.completions.retrieve("chatcmpl-1")),
]  # fmt: skip


@pytest.mark.parametrize(("api", "call"), UNSERVED, ids=[api for api, _ in UNSERVED])
def test_apis_the_proxy_does_not_serve_are_openai_404s_never_forwarded(
    client: openai.OpenAI, api: str, call: Callable[[openai.OpenAI], object]
) -> None:
    """The proxy holds the backend's key: its file, batch and fine-tuning administration is
    not the clients'. Each such call is a 404 in OpenAI's error shape, the backend never
    asked."""
    with pytest.raises(openai.NotFoundError) as info:
        call(client)
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    assert body["message"].startswith("no route for ")
    assert forwarded() == []


def test_methods_the_proxy_does_not_serve_on_its_routes_are_openai_405s(
    client: openai.OpenAI, shaped_proxy: ServerProcess
) -> None:
    """Listing stored chat completions and deleting a model are other methods on routes the
    proxy serves: a 405 that says which it takes, in OpenAI's error shape."""
    for call, allowed in (
        (lambda: client.chat.completions.list(), "POST"),
        (lambda: client.models.delete("llama"), "GET"),
    ):
        with pytest.raises(openai.APIStatusError) as info:
            call()
        assert info.value.status_code == 405
        assert allowed in info.value.response.headers["allow"]
        assert isinstance(info.value.body, dict) and "not allowed" in info.value.body["message"]
    assert forwarded() == []
    assert httpx.get(f"{shaped_proxy.url}/v1/models/{SLASHED}", timeout=5).json()["id"] == SLASHED


@pytest.fixture(scope="module")
def full_length_proxy(start_proxy: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    with serving(FullLengthEmbeddings) as url:
        yield start_proxy(url, MAX_RETRIES="0")


def test_embeddings_are_no_longer_than_the_dimensions_asked_for(
    full_length_proxy: ServerProcess,
) -> None:
    """A backend that ignores ``dimensions`` (llama.cpp's server) answers full-length
    vectors: the client gets what it asked for, cut as Ollama cuts them (the first values,
    scaled back to unit length), in floats or in the SDK's default base64. A backend that
    refuses the field for its model (OpenAI's ada-002) has its 400 relayed."""
    FullLengthEmbeddings.refuses = False
    with openai.OpenAI(base_url=f"{full_length_proxy.url}/v1", api_key="x", max_retries=0) as c:
        floats = c.embeddings.create(
            model="demo-embed", input=["a", "b"], dimensions=4, encoding_format="float"
        )
        default = c.embeddings.create(model="demo-embed", input=["a"], dimensions=2)
        whole = c.embeddings.create(
            model="demo-embed", input=["a"], dimensions=8, encoding_format="float"
        )
        unasked = c.embeddings.create(model="demo-embed", input=["a"], encoding_format="float")
        assert [d.embedding for d in floats.data] == [[0.5] * 4] * 2
        assert [d.embedding for d in default.data] == [[pytest.approx(0.5**0.5)] * 2]
        assert whole.data[0].embedding == unasked.data[0].embedding
        assert len(unasked.data[0].embedding) == len(FULL_LENGTH_VECTOR)
        FullLengthEmbeddings.refuses = True
        try:
            with pytest.raises(openai.BadRequestError) as info:
                c.embeddings.create(model="demo-embed", input=["a"], dimensions=4)
        finally:
            FullLengthEmbeddings.refuses = False
    assert "does not support specifying dimensions" in info.value.message


def test_vectors_a_backend_cut_itself_are_relayed_undecoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backend that honoured ``dimensions`` (OpenAI, vLLM) answered vectors no longer
    than asked: the answer was decoded whole to find nothing to cut, holding the event loop
    for tens of milliseconds for a large batch. Only an answer whose vectors are longer
    (llama.cpp's server ignores the field) is decoded, and cut."""
    from trioproxy import routes_openai

    def answer(length: int) -> bytes:
        vectors = [{"object": "embedding", "index": i, "embedding": [0.5] * length} for i in (0, 1)]
        return json.dumps({"object": "list", "data": vectors, "model": "m"}).encode()

    decoded: list[bytes] = []
    real_loads = routes_openai.loads

    def counting_loads(content: bytes, **kwargs: Any) -> Any:
        decoded.append(content)
        return real_loads(content, **kwargs)

    monkeypatch.setattr(routes_openai, "loads", counting_loads)
    for length in (4, 3):  # as long as asked, and shorter
        honoured = answer(length)
        assert routes_openai._embeddings_as_asked(honoured, {"dimensions": 4}) is honoured
    assert decoded == []
    cut = json.loads(routes_openai._embeddings_as_asked(answer(8), {"dimensions": 4}))
    assert [item["embedding"] for item in cut["data"]] == [[0.5] * 4] * 2
    assert len(decoded) == 1
