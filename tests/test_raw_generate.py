"""``/api/generate`` with ``raw: true``: the client templated the prompt itself, so it goes
to the backend's legacy ``/completions`` as written (``/chat/completions`` would template
it a second time). The translation both ways (pure), then the official ``ollama`` client
through a real proxy: to the demo backend, to a fake that records what it was sent, to a
chat-only backend (404 on ``/completions``), and what the metrics count."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import httpx
import ollama
import pytest

from trioproxy import translate as tr
from trioproxy.demo.script import count_words, passage_tokens

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving
from .test_metrics_e2e import scrape, total

# a prompt in a model's own chat template, special tokens and all (ChatML)
TEMPLATED = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n"
)
STAMP = "2026-01-01T00:00:00.000000000Z"


def raw_body(**fields: Any) -> dict[str, Any]:
    return tr.validate_ollama_generate({"model": "m", "prompt": TEMPLATED, "raw": True, **fields})


# --- request translation --------------------------------------------------------------------


def test_a_raw_prompt_becomes_a_text_completion_of_the_prompt_as_written() -> None:
    """The prompt as the client wrote it; Ollama's options as the legacy API's fields;
    ``system``, ``template`` and ``context`` unused (Ollama's raw mode only fills a
    template with them); no ``think`` (chat fields); ``format`` as ``response_format``;
    ``logprobs`` as the legacy API's integer."""
    body = raw_body(
        system="You are a pirate.",
        template="{{ .Prompt }}",
        context=[1, 2, 3],
        think="high",
        format="json",
        logprobs=True,
        top_logprobs=3,
        options={"num_predict": 64, "temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["\n"]},
    )
    assert tr.ollama_generate_to_completions(body, "backend-m") == {
        "model": "backend-m",
        "prompt": TEMPLATED,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n"],
        "response_format": {"type": "json_object"},
        "logprobs": 3,
    }


def test_without_num_predict_the_limit_is_null_not_the_legacy_default_of_16() -> None:
    """Ollama's default is no limit; the legacy API's (OpenAI's, vLLM's) is 16 tokens when
    ``max_tokens`` is left out, so null is sent (vLLM: up to the context)."""
    out = tr.ollama_generate_to_completions(raw_body(stream=False, logprobs=True), "m")
    assert out == {"model": "m", "prompt": TEMPLATED, "stream": False, "max_tokens": None,
                   "logprobs": 0}  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"raw": "yes"}, "field 'raw' must be a boolean"),
        ({"raw": True, "images": ["iVBORw0KGgo="]}, "images cannot be sent with raw: true"),
    ],
)
def test_what_a_raw_request_cannot_be(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(tr.RequestValidationError) as caught:
        tr.validate_ollama_generate({"model": "m", "prompt": "x", **fields})
    assert problem in str(caught.value)


# --- response translation -------------------------------------------------------------------


def legacy_logprobs(*tokens: tuple[str, float, dict[str, float]]) -> dict[str, Any]:
    return {
        "tokens": [t for t, _, _ in tokens],
        "token_logprobs": [v for _, v, _ in tokens],
        "top_logprobs": [alts for _, _, alts in tokens],
        "text_offset": list(range(len(tokens))),
    }


def test_a_text_completion_becomes_a_generate_answer() -> None:
    resp = {
        "object": "text_completion",
        "choices": [{"index": 0, "text": " Ahoy!", "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }
    timings = tr.Timings(total_ns=9, prompt_eval_ns=0, eval_ns=8)
    assert tr.openai_completion_to_ollama_generate(resp, "m", STAMP, timings) == {
        "model": "m",
        "created_at": STAMP,
        "response": " Ahoy!",
        "done": True,
        "done_reason": "length",
        "total_duration": 9,
        "load_duration": 0,
        "prompt_eval_count": 12,
        "prompt_eval_duration": 0,
        "eval_count": 3,
        "eval_duration": 8,
    }


def test_text_completion_logprobs_become_ollamas_with_the_top_alternatives_only() -> None:
    """One ``{token: logprob}`` object per token becomes the likeliest ``top`` entries, in
    order (vLLM adds the chosen token when it is not among them); a token whose logprob
    is null (an echoed prompt's first) is left out."""
    choice = {
        "text": " a b",
        "logprobs": legacy_logprobs(
            ("<s>", None, None),  # type: ignore[arg-type]
            (" a", -0.5, {" x": -2.0, " b": -0.1, " a": -0.5}),
            (" b", -3.0, {" c": -1.0, " d": -1.5, " b": -3.0}),
        ),
    }
    assert tr.completion_logprobs(choice, 2) == [
        {"token": " a", "logprob": -0.5, "top_logprobs": [
            {"token": " b", "logprob": -0.1}, {"token": " a", "logprob": -0.5}]},
        {"token": " b", "logprob": -3.0, "top_logprobs": [
            {"token": " c", "logprob": -1.0}, {"token": " d", "logprob": -1.5}]},
    ]  # fmt: skip
    assert tr.completion_logprobs(choice, 0) == [
        {"token": " a", "logprob": -0.5},
        {"token": " b", "logprob": -3.0},
    ]
    resp = {"choices": [choice | {"finish_reason": "stop"}]}
    timings = tr.Timings(total_ns=1, prompt_eval_ns=0, eval_ns=1)
    answer = tr.openai_completion_to_ollama_generate(resp, "m", STAMP, timings, 0)
    assert answer["logprobs"] == tr.completion_logprobs(choice, 0)
    assert "logprobs" not in tr.openai_completion_to_ollama_generate(resp, "m", STAMP, timings)


def text_chunk(text: str, finish: str | None = None, logprobs: Any = None) -> str:
    choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [choice]})


def feed_all(translator: tr.OllamaStreamTranslator, events: list[str]) -> list[dict[str, Any]]:
    """What the relay does with each event's text: ``feed_text``, else decode and ``feed``."""
    lines: list[dict[str, Any]] = []
    for now, text in enumerate(events, start=10):
        line = translator.feed_text(text, now)
        if line is None:
            chunk = tr.read_chunk(text)
            assert chunk is not None
            lines += translator.feed(chunk, now)
        elif line:
            lines.append(json.loads(line))
    return [*lines, translator.finish(100)]


def test_a_text_completion_stream_becomes_generate_lines() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    events = [
        text_chunk("Ah"),
        text_chunk("oy"),
        text_chunk("!"),
        text_chunk("", "stop"),
        json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [], "usage": usage}),
    ]
    translator = tr.OllamaCompletionStreamTranslator("m", start_ns=0, created_at=lambda: STAMP)
    lines = feed_all(translator, events)
    line = {"model": "m", "created_at": STAMP, "done": False}
    assert lines[:-1] == [line | {"response": text} for text in ("Ah", "oy", "!")]
    assert lines[-1] == {
        "model": "m",
        "created_at": STAMP,
        "response": "",
        "done": True,
        "done_reason": "stop",
        "total_duration": 100,
        "load_duration": 0,
        "prompt_eval_count": 12,
        "prompt_eval_duration": 10,  # the first token's wait
        "eval_count": 3,
        "eval_duration": 2,
    }
    assert (translator.first_token_ns, translator.content_chunks) == (10, 3)


def test_a_text_completion_streams_logprobs_ride_on_their_lines() -> None:
    events = [
        text_chunk(" a", logprobs=legacy_logprobs((" a", -0.5, {" a": -0.5, " z": -4.0}))),
        text_chunk(" b", logprobs=legacy_logprobs((" b", -1.0, {" y": -0.2, " b": -1.0}))),
        text_chunk("", "length"),
    ]
    translator = tr.OllamaCompletionStreamTranslator(
        "m", start_ns=0, created_at=lambda: STAMP, top_logprobs=1
    )
    lines = feed_all(translator, events)
    assert [line.get("logprobs") for line in lines] == [
        [{"token": " a", "logprob": -0.5, "top_logprobs": [{"token": " a", "logprob": -0.5}]}],
        [{"token": " b", "logprob": -1.0, "top_logprobs": [{"token": " y", "logprob": -0.2}]}],
        None,
    ]
    assert lines[-1]["done_reason"] == "length"


# --- through a real proxy -------------------------------------------------------------------

PASSAGE = "".join(passage_tokens(5))


@pytest.fixture
def client() -> Iterator[Callable[[ServerProcess], ollama.Client]]:
    made: list[ollama.Client] = []

    def make(proxy: ServerProcess) -> ollama.Client:
        made.append(ollama.Client(host=proxy.url, timeout=30))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_the_ollama_client_gets_a_raw_answer_from_the_demos_text_completions(
    proxy: ServerProcess,
    client: Callable[[ServerProcess], ollama.Client],
    demo_events: Callable[[], list[dict]],
) -> None:
    before = len(demo_events())
    ollama_client = client(proxy)
    prompt = TEMPLATED + "[[tokens=5]]"
    whole = ollama_client.generate(model="demo-chat", prompt=prompt, raw=True)
    parts = list(ollama_client.generate(model="demo-chat", prompt=prompt, raw=True, stream=True))
    assert whole.response == PASSAGE and whole.done_reason == "stop"
    words = count_words(prompt)  # the demo's count of the prompt's tokens
    assert (whole.eval_count, whole.prompt_eval_count) == (5, words)
    assert "".join(part.response for part in parts) == PASSAGE
    assert [part.done for part in parts] == [False] * 5 + [True]
    assert (parts[-1].eval_count, parts[-1].prompt_eval_count) == (5, words)
    assert [(e["path"], e["stream"]) for e in demo_events()[before:]] == [
        ("/v1/completions", False),
        ("/v1/completions", True),
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_raw_logprobs_reach_the_ollama_client(
    proxy: ServerProcess,
    client: Callable[[ServerProcess], ollama.Client],
    demo_events: Callable[[], list[dict]],
    stream: bool,
) -> None:
    """The text completion's log probabilities (the demo's legacy shape) as Ollama's."""
    before = len(demo_events())
    answer = client(proxy).generate(
        model="demo-chat", prompt="x [[tokens=3]]", raw=True, stream=stream,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    parts = list(answer) if stream else [answer]
    entries = [entry for part in parts for entry in part.logprobs or ()]
    assert [entry.token for entry in entries] == list(passage_tokens(3))
    for entry in entries:
        assert entry.top_logprobs is not None and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob > entry.top_logprobs[1].logprob
    assert [e["path"] for e in demo_events()[before:]] == ["/v1/completions"]


class _CompletionsBackend(ScriptedHandler):
    """A backend that serves ``/completions`` only, and records every request."""

    seen: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_POST(self) -> None:
        request = self.json_body()
        self.seen.append((self.path, request))
        if self.path != "/v1/completions":
            self.answer(404, b'{"detail":"Not Found"}')
            return
        usage = {"prompt_tokens": 21, "completion_tokens": 2, "total_tokens": 23}
        if not request.get("stream"):
            choice = {"index": 0, "text": "Hi!", "finish_reason": "stop", "logprobs": None}
            self.answer(200, json.dumps({"choices": [choice], "usage": usage}).encode())
            return
        events = [text_chunk("Hi"), text_chunk("!"), text_chunk("", "stop")]
        events.append(json.dumps({"choices": [], "usage": usage}))
        body = "".join(f"data: {event}\n\n" for event in events) + "data: [DONE]\n\n"
        self.answer(200, body.encode(), "text/event-stream")


def test_the_backend_is_sent_the_prompt_unchanged_on_completions(
    start_proxy: Callable[..., ServerProcess], client: Callable[[ServerProcess], ollama.Client]
) -> None:
    _CompletionsBackend.seen.clear()
    with serving(_CompletionsBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        ollama_client = client(proxy)
        fields: dict[str, Any] = {"system": "ignored in raw mode", "options": {"num_predict": 9}}
        whole = ollama_client.generate(model="m", prompt=TEMPLATED, raw=True, **fields)
        parts = list(
            ollama_client.generate(model="m", prompt=TEMPLATED, raw=True, stream=True, **fields)
        )
        schema = {"type": "object", "properties": {"a": {"type": "string"}}}
        ollama_client.generate(model="m", prompt=TEMPLATED, raw=True, format=schema)
    assert whole.response == "Hi!" and (whole.prompt_eval_count, whole.eval_count) == (21, 2)
    assert "".join(p.response for p in parts) == "Hi!" and parts[-1].eval_count == 2
    paths = [path for path, _ in _CompletionsBackend.seen]
    assert paths == ["/v1/completions"] * 3
    sent = [request for _, request in _CompletionsBackend.seen]
    assert sent[0] == {"model": "m", "prompt": TEMPLATED, "stream": False, "max_tokens": 9}
    assert sent[1] == sent[0] | {"stream": True, "stream_options": {"include_usage": True}}
    assert sent[2]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }


class _ChatOnlyBackend(ScriptedHandler):
    """A chat-only backend: ``/completions`` is not there (FastAPI's 404)."""

    def do_POST(self) -> None:
        self.json_body()
        self.answer(404, b'{"detail":"Not Found"}')


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_only_backend_is_said_not_to_serve_raw_prompts(
    start_proxy: Callable[..., ServerProcess],
    client: Callable[[ServerProcess], ollama.Client],
    stream: bool,
) -> None:
    with serving(_ChatOnlyBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        with pytest.raises(ollama.ResponseError) as caught:
            answer = client(proxy).generate(model="m", prompt=TEMPLATED, raw=True, stream=stream)
            list(answer) if stream else None
    assert caught.value.status_code == 501
    assert caught.value.error.startswith("the backend does not serve raw prompts (raw: true)")
    assert "the backend answered 404: Not Found" in caught.value.error


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_the_backend_does_not_have_is_still_ollamas_404(
    proxy: ServerProcess, client: Callable[[ServerProcess], ollama.Client], stream: bool
) -> None:
    """The backend's 404 about the model (the demo's ``model_not_found``) is not taken for
    a missing ``/completions``."""
    with pytest.raises(ollama.ResponseError) as caught:
        answer = client(proxy).generate(model="no-such-model", prompt="x", raw=True, stream=stream)
        list(answer) if stream else None
    assert caught.value.status_code == 404
    assert caught.value.error == 'model "no-such-model" not found, try pulling it first'


def test_raw_streams_are_measured_as_chat_streams_are(
    demo_backend: ServerProcess,
    start_proxy: Callable[..., ServerProcess],
    demo_events: Callable[[], list[dict]],
) -> None:
    """Tokens from the backend's usage, a time to first token, the stream's outcome."""
    url = start_proxy(demo_backend.url, MAX_RETRIES="0").url
    before = len(demo_events())
    body = {"model": "demo-chat", "prompt": "go [[tokens=6]]", "raw": True}
    with httpx.Client(base_url=url, timeout=10) as http:
        whole = http.post("/api/generate", json=body | {"stream": False}).json()
        lines = http.post("/api/generate", json=body).text.strip().splitlines()
    final = json.loads(lines[-1])
    assert final["done"] is True and final["eval_count"] == whole["eval_count"] == 6
    samples = scrape(url)
    assert total(samples, "http_requests_total", endpoint="api_generate", status="200") == 2
    assert total(samples, "trioproxy_streams_total", outcome="completed") == 1
    assert total(samples, "trioproxy_tokens_total", type="output") == 12
    prompt = whole["prompt_eval_count"] + final["prompt_eval_count"]
    assert prompt > 0 and total(samples, "trioproxy_tokens_total", type="input") == prompt
    assert total(samples, "trioproxy_tokens_estimated_total") == 0
    assert total(samples, "trioproxy_time_to_first_token_seconds_count") == 1
    assert [e["path"] for e in demo_events()[before:]] == ["/v1/completions"] * 2
