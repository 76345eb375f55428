"""The Ollama API (``/`` and ``/api/*``), translated to the OpenAI-compatible backend.

``FAST_ROUTES`` (chat, generate, embed, embeddings) are served by ``fastpath`` for
``POST``; the Quart routes for the same paths make other methods a 405 and serve
in-process test clients the same handlers.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Awaitable, Callable, Generator
from contextlib import contextmanager
from typing import Any, Literal, NoReturn, TypeVar

import trio
from quart import Blueprint, Response, request

from . import translate as tr
from .app import body_left_unread, current_call, quart_route
from .catalog import backend_name_for, list_answer, listed_entry
from .config import Settings
from .errors import (
    BadUpstreamResponse,
    NotFound,
    ProxyError,
    UpstreamStatusError,
    error_body_for,
    shown_name,
)
from .exchange import JSON, Call, Handler, Reply
from .forward import (
    NO_DIMENSIONS,
    NO_STREAM_OPTIONS,
    FieldQuirk,
    as_the_backend_takes,
    call_chat,
    call_json,
    extra_body_quirk,
    for_backend,
    from_backend,
    json_object,
    note_model,
    note_usage,
    open_chat_stream,
    open_stream,
    validated,
)
from .json_threads import OFF_LOOP_BYTES, off_loop
from .jsonutil import WHOLE_NUMBER_LIMIT
from .relay import NDJSON, STREAM_HEADERS, StreamEnd, dumps, relay_ollama
from .signatures import ThoughtSignatures
from .upstream import UpstreamResult

blueprint = Blueprint("ollama", __name__)
T = TypeVar("T")

OLLAMA_VERSION = "0.12.0"
MODEL_MANAGEMENT = (
    "model management is not available through trioproxy: the OpenAI-compatible backend "
    "manages its own models"
)


def _json(payload: Any, status: int = 200) -> Response:
    return Response(dumps(payload), status=status, content_type=JSON)


def _json_bytes(body: bytes) -> Response:
    return Response(body, content_type=JSON)


def _json_reply(payload: Any) -> Reply:
    return Reply(200, dumps(payload))


@blueprint.route("/", methods=["GET", "HEAD"])
async def root() -> Response:
    return Response("Ollama is running", content_type="text/plain; charset=utf-8")


@blueprint.route("/api/version", methods=["GET", "HEAD"])
async def version() -> Response:
    return _json({"version": OLLAMA_VERSION})


@blueprint.route("/api/tags", methods=["GET", "HEAD"])
@blueprint.route("/api/models", methods=["GET", "HEAD"])  # aliases the replaced proxy served
@blueprint.route("/v1/tags", methods=["GET", "HEAD"])
async def tags() -> Response:
    call = await current_call()
    return _json_bytes(await list_answer(call, tr.openai_models_to_ollama_tags))


@blueprint.get("/api/ps")
async def ps() -> Response:
    call = await current_call()
    # written once per list as of the epoch; each poll gets its own expiry (catalog.split)
    template = await list_answer(call, tr.ollama_ps_template)
    parts = call.app.catalog.split(template)  # type: ignore[attr-defined]
    return _json_bytes(tr.ollama_ps_joined(parts))


@blueprint.post("/api/show")
async def show() -> Response:
    call = await current_call()
    body = await json_object(call)
    name = _named_model(body)
    note_model(call.state, name)
    entry = await listed_entry(call, name)
    if entry is None:
        raise NotFound(f"model '{shown_name(name)}' not found")
    backend_id = entry.get("id")
    catalog = call.app.catalog  # type: ignore[attr-defined]
    listed = catalog.capabilities(backend_id) if isinstance(backend_id, str) else ()
    return _json(
        tr.ollama_show(name, entry, listed=listed, declared=call.app.mapper.declared(name))
    )


@blueprint.post("/api/pull")
async def pull() -> Response:
    """Apps make sure of a model by pulling it before they use it (ollama's pull example,
    @langchain/ollama's ``checkOrPullModel``, start-up scripts). The backend serves its own
    models: one it lists is there, and the pull succeeds as Ollama's does for a model
    already pulled; one it does not list cannot be had through the proxy (404)."""
    call = await current_call()
    body = await json_object(call)
    name = _named_model(body)
    stream = body.get("stream")
    if stream is None:  # absent or null: Ollama's *bool, which streams by default
        stream = True
    elif not isinstance(stream, bool):
        raise ProxyError("field 'stream' must be a boolean", 400, param="stream")
    note_model(call.state, name)
    if await listed_entry(call, name) is None:
        raise NotFound(f"model '{shown_name(name)}' not found: {NOT_PULLED}")
    progress = tr.ollama_pull_progress()
    if not stream:  # Ollama answers the last progress line alone
        return _json(progress[-1])
    lines = b"".join(dumps(line) + b"\n" for line in progress)
    return Response(lines, content_type=NDJSON)


NOT_PULLED = (
    "trioproxy does not pull models; the backend serves the models it lists (GET /api/tags)"
)


def _named_model(body: dict[str, Any]) -> str:
    """The model a model-management body names: ``model``, or ``name`` (Ollama's legacy
    key, which ollama-js still sends for pull, push and delete)."""
    name = body.get("model") or body.get("name")
    if not name:
        raise ProxyError("field 'model' is required", 400, param="model")
    if not isinstance(name, str):
        raise ProxyError("field 'model' must be a string", 400, param="model")
    return name


async def chat(call: Call) -> Reply:
    body = await json_object(call)
    body = validated(tr.validate_ollama_chat, body)
    if not body.get("messages"):
        return await _load_reply(call, "chat", body)
    return await _generate_or_chat(call, "chat", body, tr.ollama_chat_to_openai)


async def generate(call: Call) -> Reply:
    body = await json_object(call)
    body = validated(tr.validate_ollama_generate, body)
    if not body.get("prompt"):  # images or not, as Ollama answers it
        return await _load_reply(call, "generate", body)
    if body.get("raw") is True:
        return await _raw_generate(call, body)
    return await _generate_or_chat(call, "generate", body, tr.ollama_generate_to_openai)


async def _load_reply(call: Call, kind: Literal["chat", "generate"], body: dict[str, Any]) -> Reply:
    """Ollama answers an empty prompt (or chat) by loading the model, or with keep_alive 0
    by unloading it; clients use it to warm up. The backend manages loading, so answer at
    once, for a model the backend has: an unknown one is a 404, as Ollama's."""
    name = body["model"]
    note_model(call.state, name)
    await _require_known_model(call, name)
    keep_alive = body.get("keep_alive")
    reply: dict[str, Any] = {"model": name, "created_at": tr.utc_timestamp()}
    if kind == "chat":
        reply["message"] = {"role": "assistant", "content": ""}
    else:
        reply["response"] = ""
    reply["done"] = True
    reply["done_reason"] = "unload" if tr.keep_alive_unloads(keep_alive) else "load"
    return _json_reply(reply)


async def _require_known_model(call: Call, name: str) -> None:
    """For answers given without asking the backend to generate: the model must be one
    the backend lists, as Ollama checks its own."""
    if await listed_entry(call, name) is None:
        raise NotFound(_not_found_message(name))


def _not_found_message(name: str) -> str:
    """Ollama's answer for a model it does not have, on its generation and embedding
    endpoints (``/api/show`` words it ``model 'x' not found``)."""
    return f'model "{shown_name(name)}" not found, try pulling it first'


async def _generate_or_chat(
    call: Call, kind: Literal["chat", "generate"], body: dict[str, Any], to_openai: Any
) -> Reply:
    app = call.app
    state = call.state
    client_model = body["model"]
    note_model(state, client_model)
    backend_model = await backend_name_for(call, client_model)
    payload = for_backend(to_openai, body, backend_model)
    signatures: ThoughtSignatures = app.thought_signatures  # type: ignore[attr-defined]
    conversation = signatures.attach(
        backend_model, payload["messages"], client=state.client, tools=payload.get("tools")
    )
    think = body.get("think")
    payload, switch = with_think_switch(app.settings, think, payload)
    # think: false hides the reasoning, whatever the backend does with THINK_OFF_EXTRA_BODY
    # (or without one: OpenAI-compatible backends have no portable way to be told not to
    # reason; reasoning_effort "none" is a 400 on most models)
    show_thinking = think is not False
    logprobs = body.get("logprobs") is True  # as the backend was asked (ollama_*_to_openai)
    start_ns = time.perf_counter_ns()
    if not payload.get("stream"):
        with _model_not_found_as_ollama(client_model, backend_model):
            resp, result = await as_taken(call, payload, switch, call_chat)
        timings = _timings(start_ns, resp, result)
        convert = functools.partial(
            tr.openai_chat_to_ollama_chat if kind == "chat" else tr.openai_chat_to_ollama_generate,
            show_thinking=show_thinking,
            logprobs=logprobs,
        )
        remember = functools.partial(
            signatures.remembering_answer, conversation, backend_model, resp
        )
        created_at = tr.utc_timestamp()
        return await answer_reply(
            call, result, convert, resp, client_model, created_at, timings, remember=remember
        )
    with _model_not_found_as_ollama(client_model, backend_model):
        result = await as_taken(call, payload, switch, open_chat_stream)
    translator = tr.OllamaStreamTranslator(
        kind,
        client_model,
        start_ns=start_ns,
        show_thinking=show_thinking,
        on_tool_calls=functools.partial(signatures.remember, conversation, backend_model),
        logprobs=logprobs,
    )
    return _ndjson_stream(call, result, translator)


def _ndjson_stream(
    call: Call, result: UpstreamResult, translator: tr.OllamaStreamTranslator
) -> Reply:
    """The backend's open stream, relayed to the client as Ollama's NDJSON lines."""
    app, metric = call.app, call.state.metric
    chunks = relay_ollama(
        result.response,
        translator,
        settings=app.settings,
        metric=metric,
        sent_at=result.started,  # the first-token deadline counts from here
        collector=app.collector,
        end=(end := StreamEnd()),
    )
    return Reply(200, chunks, NDJSON, dict(STREAM_HEADERS), end=end)


# Where raw prompts go: the legacy text completions endpoint applies no chat template
COMPLETIONS_PATH = "/completions"
RAW_NOT_SERVED = (
    "the backend does not serve raw prompts (raw: true): its /completions endpoint is not "
    "there (a chat-only backend); send the prompt without raw to have the backend apply "
    "the model's chat template"
)

_BACKEND_SAID_CHARS = 300  # of the backend's own 404 message (a whole HTML page, at worst)


async def _raw_generate(call: Call, body: dict[str, Any]) -> Reply:
    """``/api/generate`` with ``raw: true``: the prompt, which the client templated itself,
    to the backend's legacy ``/completions`` as it is. ``/chat/completions`` would wrap it
    in the model's chat template a second time, and the model would answer a prompt it
    was never meant to read. See ``tr.ollama_generate_to_completions`` for the fields."""
    state = call.state
    client_model = body["model"]
    note_model(state, client_model)
    backend_model = await backend_name_for(call, client_model)
    payload = for_backend(tr.ollama_generate_to_completions, body, backend_model)
    top_logprobs = payload.get("logprobs")  # None: not asked
    start_ns = time.perf_counter_ns()
    if not payload["stream"]:
        with _raw_prompts_served(), _model_not_found_as_ollama(client_model, backend_model):
            resp, result = await call_json(call, COMPLETIONS_PATH, payload)
        timings = _timings(start_ns, resp, result)
        convert = tr.openai_completion_to_ollama_generate
        return await answer_reply(
            call, result, convert, resp, client_model, tr.utc_timestamp(), timings, top_logprobs
        )
    send = functools.partial(open_stream, call, COMPLETIONS_PATH)
    with _raw_prompts_served(), _model_not_found_as_ollama(client_model, backend_model):
        result = await as_the_backend_takes(call, payload, NO_STREAM_OPTIONS, send)
    translator = tr.OllamaCompletionStreamTranslator(
        client_model, start_ns=start_ns, top_logprobs=top_logprobs
    )
    return _ndjson_stream(call, result, translator)


@contextmanager
def _raw_prompts_served() -> Generator[None, None, None]:
    """A backend without ``/completions`` (chat-only: OpenAI's chat models, gateways in
    front of chat APIs) answers it 404: the client is told that raw prompts are not served
    there, in Ollama's dialect, not with a bare 404 that reads like a missing model. A 501:
    this deployment does not do it, as for model management."""
    try:
        yield
    except UpstreamStatusError as error:
        if error.status == 404:
            said = error.message[:_BACKEND_SAID_CHARS]
            raise ProxyError(f"{RAW_NOT_SERVED} (the backend answered 404: {said})", 501) from None
        raise


def with_think_switch(
    settings: Settings, think: object, payload: tr.JSONDict
) -> tuple[tr.JSONDict, FieldQuirk | None]:
    """``payload`` with the extra body the operator set for the client's ``think``, and
    the fields it added as a quirk (None when it added none): a model that refuses them
    is asked again without them."""
    extra = tr.think_extra_body(think, settings.think_on_extra_body, settings.think_off_extra_body)
    if not extra:
        return payload, None
    added = tuple(name for name in extra if name not in payload)
    setting = "THINK_OFF_EXTRA_BODY" if think is False else "THINK_ON_EXTRA_BODY"
    switched = tr.with_extra_body(payload, extra)
    return switched, extra_body_quirk(setting, added) if added else None


async def as_taken(
    call: Call, payload: tr.JSONDict, quirk: FieldQuirk | None, send: Callable[..., Awaitable[T]]
) -> T:
    """``send(call, payload)``, through ``quirk`` when there is one."""
    if quirk is None:
        return await send(call, payload)
    return await as_the_backend_takes(call, payload, quirk, functools.partial(send, call))


def _timings(start_ns: int, resp: Any, result: Any) -> tr.Timings:
    total = time.perf_counter_ns() - start_ns
    upstream_ns = int((time.perf_counter() - result.started) * 1e9)
    prompt_ns = 0
    eval_ns = upstream_ns
    backend_timings = resp.get("timings") if isinstance(resp, dict) else None
    if isinstance(backend_timings, dict):  # llama.cpp's server reports its own
        prompt = _backend_ns(backend_timings.get("prompt_ms", 0))
        predicted = _backend_ns(backend_timings.get("predicted_ms", 0))
        if prompt is not None and predicted is not None:
            prompt_ns, eval_ns = prompt, predicted
    return tr.Timings(total_ns=total, prompt_eval_ns=prompt_ns, eval_ns=eval_ns)


def _backend_ns(milliseconds: object) -> int | None:
    """A duration a backend reported in milliseconds, in nanoseconds; None for none that
    can be (not a number, NaN, negative, 1e400: a 500 once, or a negative duration)."""
    try:
        value = float(milliseconds)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of 400 digits
        return None
    nanoseconds = value * 1e6
    return int(nanoseconds) if 0.0 <= nanoseconds < WHOLE_NUMBER_LIMIT else None


async def embed(call: Call) -> Reply:
    body = await json_object(call)
    body = validated(tr.validate_ollama_embed, body)
    note_model(call.state, body["model"])
    if body.get("input") in (None, "", []):
        # Ollama answers "nothing to embed" with no vectors (vector stores send empty
        # batches); OpenAI backends reject an empty input
        await _require_known_model(call, body["model"])
        return _json_reply({"model": body["model"], "embeddings": []})
    start_ns = time.perf_counter_ns()
    backend_model = await backend_name_for(call, body["model"])
    payload = tr.ollama_embed_to_openai(body, backend_model)
    resp, answered = await _embed_in_batches(call, payload, body["model"])
    note_usage(call.state, resp)
    elapsed = time.perf_counter_ns() - start_ns
    timings = tr.Timings(total_ns=elapsed, prompt_eval_ns=elapsed, eval_ns=0)
    convert = tr.openai_embeddings_to_ollama_embed
    dimensions = body.get("dimensions") or 0
    out = from_backend(call, convert, resp, body["model"], timings, dimensions)
    return _json_reply(out) if answered <= OFF_LOOP_BYTES else await _json_reply_in_thread(out)


async def embeddings(call: Call) -> Reply:
    body = await json_object(call)
    body = validated(tr.validate_ollama_embeddings, body)
    note_model(call.state, body["model"])
    if tr.ollama_embeddings_input(body) in ("", []):  # Ollama: an empty prompt loads the model
        await _require_known_model(call, body["model"])
        return _json_reply({"embedding": []})
    backend_model = await backend_name_for(call, body["model"])
    payload = tr.ollama_embeddings_to_openai(body, backend_model)
    resp, answered = await _embed_in_batches(call, payload, body["model"])
    note_usage(call.state, resp)
    out = from_backend(call, tr.openai_embeddings_to_ollama_embeddings, resp)
    return _json_reply(out) if answered <= OFF_LOOP_BYTES else await _json_reply_in_thread(out)


async def answer_reply(
    call: Call,
    result: UpstreamResult,
    translate: Callable[..., Any],
    *args: Any,
    remember: Callable[[], Callable[[], None]] | None = None,
) -> Reply:
    """``Reply(200, dumps(from_backend(call, translate, *args)))`` for a chat or generate
    answer (``args[0]``, the backend's, whose usage the metrics count), on the loop, or,
    when it came in a body over OFF_LOOP_BYTES, in a JSON thread
    (:func:`answer_reply_in_thread`). ``remember``: the answer's thought signatures found
    (pure), then kept. The backend's tool call arguments, read up to 1,024 levels deep, may
    be too deep to write again (jsonutil): the backend's fault too, a 502."""
    if len(result.response.content) > OFF_LOOP_BYTES:
        # counted before the hop: a client that leaves during it, or an answer that fails
        # to translate, still counts its tokens
        note_usage(call.state, args[0])
        return await answer_reply_in_thread(call, translate, *args, remember=remember)
    if remember is not None:
        remember()()
    out = from_backend(call, translate, *args)
    note_usage(call.state, args[0])
    return Reply(200, from_backend(call, dumps, out))


async def answer_reply_in_thread(
    call: Call,
    translate: Callable[..., Any],
    *args: Any,
    remember: Callable[[], Callable[[], None]] | None = None,
) -> Reply:
    """``Reply(200, dumps(from_backend(call, translate, *args)))`` for a chat or generate
    answer that came in a body over OFF_LOOP_BYTES (a long text, logprobs of thousands of
    tokens, large tool call arguments): translated and encoded in one JSON thread hop, as
    it was decoded, and waited for (``args`` hold the request's own answer object). A
    failure of either is the backend's 502 as there, counted here on the loop (the metrics
    are not the thread's to touch). ``remember`` (pure: the answer's thought signatures
    found, ``ThoughtSignatures.remembering_answer``) runs in the same hop, and what it
    returns (which holds them) on the loop after it."""
    try:
        body, keep = await off_loop(_translated_json, translate, args, remember)
    except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
        return from_backend(call, _raise, exc)  # NestedTooDeeply (a ValueError) included
    if keep is not None:
        keep()
    return Reply(200, body)


def _translated_json(
    translate: Callable[..., Any],
    args: tuple[Any, ...],
    remember: Callable[[], Callable[[], None]] | None,
) -> tuple[bytes, Callable[[], None] | None]:
    """``translate(*args)`` encoded, and what ``remember`` returns: pure, for a JSON thread."""
    keep = remember() if remember is not None else None
    return dumps(translate(*args)), keep


def _raise(exc: BaseException) -> NoReturn:
    raise exc


async def _json_reply_in_thread(payload: Any) -> Reply:
    """:func:`_json_reply` for the translation of an answer over OFF_LOOP_BYTES (about as
    large), encoded in a JSON thread; waited for by a client that leaves: ``payload`` is
    the request's own object."""
    return Reply(200, await off_loop(dumps, payload))


# batches of one request asked for at once: a large ingest is cut into many (see
# tr.embed_batches), and one after another they took as many backend round trips
EMBED_BATCHES_AT_ONCE = 4


async def _embed_in_batches(
    call: Call, payload: tr.JSONDict, model: str
) -> tuple[tr.JSONDict, int]:
    """The backend's ``/embeddings`` answer for every input of ``payload``, asked for in
    batches OpenAI takes (Ollama takes any number; LangChain's ``embed_documents`` sends
    every text at once), up to EMBED_BATCHES_AT_ONCE at a time, joined in input order,
    and the bytes the backend answered them in. A batch answered with another number of
    vectors than it had inputs is a 502: the clients pair texts and vectors by position."""
    batches = tr.embed_batches(payload)
    with _model_not_found_as_ollama(model, payload["model"]):
        answers, answered = await _ask_each(call, batches)
    for batch, resp in zip(batches, answers, strict=True):
        got, sent = from_backend(call, tr.embedding_count, resp), len(batch["input"])
        if got != sent:
            call.app.collector.upstream_error("protocol")
            raise BadUpstreamResponse(f"the backend returned {got} embeddings for {sent} inputs")
    return tr.joined_embeddings(answers), answered


def _note_empty_inputs(error: UpstreamStatusError, batch: tr.JSONDict) -> None:
    """OpenAI refuses a batch holding an empty string in words that name nothing ("'$.input'
    is invalid"); Ollama embeds it. Such a refusal says so."""
    inputs = batch["input"]
    empty = sum(1 for item in inputs if item == "") if isinstance(inputs, list) else 0
    if error.status == 400 and empty and "$.input" in error.message:
        error.message += (
            f" ({empty} of the inputs are empty strings: Ollama embeds them, OpenAI's API "
            "refuses them)"
        )


async def _ask_each(call: Call, batches: list[tr.JSONDict]) -> tuple[list[tr.JSONDict], int]:
    """The backend's answers to ``batches``, in their order, and their bytes together; its
    time is from the first one's start to the last one's end. A refusal of one batch of
    several says which inputs it held (the backend's message counts from the start of the
    batch: OpenAI's "input[3]") and stops the others: the first failure is the answer.
    Together the answers are bounded as one answer is (MAX_RESPONSE_BYTES): they are all
    held until the last one is in."""
    if len(batches) == 1:
        try:
            resp, result = await _ask_embeddings(call, batches[0])
        except UpstreamStatusError as error:
            _note_empty_inputs(error, batches[0])
            raise
        return [resp], len(result.response.content)
    answers: list[tr.JSONDict | None] = [None] * len(batches)
    failures: list[ProxyError] = []
    held, limit = 0, call.app.settings.max_response_bytes
    limiter = trio.CapacityLimiter(EMBED_BATCHES_AT_ONCE)
    started = time.perf_counter()

    async def ask(index: int) -> None:
        nonlocal held
        try:
            async with limiter:
                resp, result = await _ask_embeddings(call, batches[index])
            if failures:  # answered as another failed: its answer is no longer wanted
                return
            held += len(result.response.content)
            if held > limit:
                call.app.collector.upstream_error("protocol")
                raise BadUpstreamResponse(
                    f"the backend's answers to {len(batches)} batches of inputs are larger "
                    f"than {limit} bytes together (MAX_RESPONSE_BYTES)"
                )
        except ProxyError as error:
            if isinstance(error, UpstreamStatusError):
                _note_empty_inputs(error, batches[index])
                error.message = f"{_which_inputs(batches, index)}: {error.message}"
            failures.append(error)
            nursery.cancel_scope.cancel()
            return
        answers[index] = resp

    async with trio.open_nursery() as nursery:
        for index in range(len(batches)):
            nursery.start_soon(ask, index)
    if failures:
        raise failures[0]
    if call.state.metric is not None:
        call.state.metric.upstream_ms = (time.perf_counter() - started) * 1000.0
    return [resp for resp in answers if resp is not None], held


async def _ask_embeddings(call: Call, batch: tr.JSONDict) -> tuple[Any, UpstreamResult]:
    """The backend's ``/embeddings`` answer to ``batch``; a model that refuses
    ``dimensions`` is asked without it (its vectors are then cut as Ollama cuts them)."""
    send = functools.partial(call_json, call, "/embeddings")
    return await as_the_backend_takes(call, batch, NO_DIMENSIONS, send)


def _which_inputs(batches: list[tr.JSONDict], index: int) -> str:
    first = sum(len(batch["input"]) for batch in batches[:index])
    last = first + len(batches[index]["input"]) - 1
    total = sum(len(batch["input"]) for batch in batches)
    return f"inputs {first}-{last} of {total} (batch {index + 1} of {len(batches)})"


@contextmanager
def _model_not_found_as_ollama(
    client_model: str, backend_model: str
) -> Generator[None, None, None]:
    """A backend's "no such model" 404 in Ollama's words, naming the model the client
    asked for (under a mapping, not the backend's name for it). Tools match Ollama's
    wording; a 404 about anything else keeps the backend's message."""
    try:
        yield
    except UpstreamStatusError as error:
        if error.status == 404 and _is_about_the_model(error, backend_model):
            raise ProxyError(_not_found_message(client_model), 404, param="model") from None
        raise


_MODEL_WORD = re.compile(r"\bmodel\b", re.IGNORECASE)


def _is_about_the_model(error: UpstreamStatusError, backend_model: str) -> bool:
    """OpenAI's ``model_not_found`` code, or a message about a model that names ours as a
    whole word (vLLM: "The model `x` does not exist."); not a 404 for a missing route
    whose page happens to contain the name."""
    if b"model_not_found" in error.body:
        return True
    message = error.message
    if not backend_model or not _MODEL_WORD.search(message):
        return False
    return _names_as_a_word(message, backend_model)


def _names_as_a_word(text: str, name: str) -> bool:
    """Whether ``name`` occurs in ``text`` not as part of a longer name. A search, not a
    pattern built from the name: compiling a client's 20 MB name held the worker 10 s."""
    at = text.find(name)
    while at >= 0:
        end = at + len(name)
        before = text[at - 1] if at else " "
        after = text[end] if end < len(text) else " "
        if not _is_name_char(before) and not _is_name_char(after):
            return True
        at = text.find(name, at + 1)
    return False


def _is_name_char(char: str) -> bool:
    return char.isalnum() or char in "_./:-"


FAST_ROUTES: dict[str, Handler] = {
    "/api/chat": chat,
    "/api/generate": generate,
    "/api/embed": embed,
    "/api/embeddings": embeddings,
}
for _path, _handler in FAST_ROUTES.items():
    quart_route(blueprint, _path, _handler)


@blueprint.route("/api/push", methods=["POST"])
@blueprint.route("/api/create", methods=["POST"])
@blueprint.route("/api/copy", methods=["POST"])
@blueprint.route("/api/delete", methods=["DELETE"])
@blueprint.route("/api/blobs/<path:digest>", methods=["POST", "HEAD"])
async def model_management(digest: str | None = None) -> Response:
    body = error_body_for(request.path, MODEL_MANAGEMENT, 501)
    response = Response(body, status=501, content_type="application/json")
    if await body_left_unread(501):  # else the next request on the connection found it closed
        response.headers["Connection"] = "close"
    return response
