"""The Anthropic Messages API (``/v1/messages``), translated to the OpenAI-compatible backend.

What Ollama serves since v0.14 for Claude Code and the anthropic SDKs
(``ANTHROPIC_BASE_URL=http://host:11434``). ``FAST_ROUTES`` is served by ``fastpath`` for
``POST``, as the other proxy routes are; the translation is ``anthropic``'s (pure), the
stream goes through ``relay.relay_ollama`` with Anthropic's events. Errors are in
Anthropic's shape by the path (``errors.error_body_for``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

from quart import Blueprint

from . import anthropic as an
from .app import quart_route
from .catalog import backend_name_for
from .errors import NotFound, UpstreamStatusError
from .exchange import Call, Handler, Reply
from .forward import (
    FieldQuirk,
    as_the_backend_takes,
    call_chat,
    for_backend,
    json_object,
    note_model,
    open_chat_stream,
    optional_field,
    validated,
)
from .keepalive import stream_opening
from .relay import STREAM_HEADERS, StreamEnd, relay_ollama
from .routes_ollama import answer_reply, as_taken, with_think_switch
from .upstream import UpstreamResult, forwarded_headers

blueprint = Blueprint("anthropic", __name__)
T = TypeVar("T")


# top_k is no OpenAI field: vLLM and llama.cpp's server take it, OpenAI's API refuses it
NO_TOP_K = optional_field("top_k")
# reasoning_effort (the client's effort, or a small thinking budget): refused by models
# that do not reason on OpenAI's API and by some gateways
NO_REASONING_EFFORT = optional_field("reasoning_effort")


async def messages(call: Call) -> Reply:
    body = validated(an.validate_messages, await json_object(call))
    state = call.state
    client_model = body["model"]
    note_model(state, client_model)
    backend_model = await backend_name_for(call, client_model)
    payload = for_backend(an.messages_to_openai, body, backend_model)
    # Anthropic's thinking switch is Ollama's think: the operator's THINK_*_EXTRA_BODY
    think = an.think_of(body)
    payload, switch = with_think_switch(call.app.settings, think, payload)
    show_thinking = think is not False
    omit_thinking = an.thinking_omitted(body)
    stops = body.get("stop_sequences") or None
    message_id = an.new_message_id()
    if not payload.get("stream"):
        resp, result = await _sent(call, payload, switch, call_chat)
        convert = functools.partial(
            an.openai_to_message,
            show_thinking=show_thinking,
            omit_thinking=omit_thinking,
            stops=stops,
        )
        reply = await answer_reply(call, result, convert, resp, client_model, message_id)
        reply.headers = _backend_headers(call, result)
        return reply
    start_ns = time.perf_counter_ns()
    # only pings if the response starts before the backend's first event: message_start
    # carries the prompt's token count, which comes with the backend's answer
    stream_opening(state, an.EVENT_STREAM)
    result = await _sent(call, payload, switch, open_chat_stream)
    translator = an.AnthropicStreamTranslator(
        client_model,
        message_id,
        start_ns=start_ns,
        show_thinking=show_thinking,
        omit_thinking=omit_thinking,
        stops=stops,
    )
    app = call.app
    chunks = relay_ollama(
        result.response,
        translator,
        settings=app.settings,
        metric=state.metric,
        sent_at=result.started,  # the first-token deadline counts from here
        collector=app.collector,
        end=(end := StreamEnd()),
        encode=an.encode_event,
        error_line=an.error_event,
    )
    # Anthropic's ping events in a silence (keepalive.beat_for: thinking the backend does
    # not stream, later tool calls held): Claude Code's byte watchdog and load balancers
    # count them as traffic
    keepalive = app.settings.stream_keepalive_seconds
    headers = {**_backend_headers(call, result), **STREAM_HEADERS}
    return Reply(200, chunks, an.EVENT_STREAM, headers, end=end, keepalive=keepalive)


def _backend_headers(call: Call, result: UpstreamResult) -> dict[str, str]:
    """What the other ``/v1`` routes pass on of the backend's head: its retry advice, its
    rate limits (``x-ratelimit-*``: Anthropic's own are ``anthropic-ratelimit-*``, so no
    client reads these as Anthropic's) and its request id as ``x-upstream-request-id``."""
    return forwarded_headers(result.response.headers, call.app.settings.backend_secrets)


async def _sent(
    call: Call,
    payload: dict[str, Any],
    switch: FieldQuirk | None,
    send: Callable[[Call, dict[str, Any]], Awaitable[T]],
) -> T:
    """``send(call, payload)`` as the backend takes it: without the think switch's fields,
    ``reasoning_effort`` or ``top_k`` for a model that refuses them."""

    async def without_top_k_if_refused(sent: dict[str, Any]) -> T:
        return await as_the_backend_takes(call, sent, NO_TOP_K, functools.partial(send, call))

    async def without_effort_if_refused(call: Call, sent: dict[str, Any]) -> T:
        return await as_the_backend_takes(call, sent, NO_REASONING_EFFORT, without_top_k_if_refused)

    try:
        return await as_taken(call, payload, switch, without_effort_if_refused)
    except UpstreamStatusError as error:
        worded = an.context_overflow(error.message, error.body) if error.status < 500 else None
        if worded is None:
            raise
        # Claude Code compacts, or lowers max_tokens, on Anthropic's words for this
        raise UpstreamStatusError(worded, error.status, headers=error.headers) from None


COUNT_TOKENS_NOT_SERVED = (
    "token counting (/v1/messages/count_tokens) is not served: the OpenAI-compatible backend "
    "has no such endpoint, and an estimate without the model's tokenizer would be worse "
    "than the client's own (Claude Code estimates locally when this is not found)"
)


async def count_tokens() -> NoReturn:
    # not 200 with a made-up count: a client trusts it (Claude Code would never compact)
    raise NotFound(COUNT_TOKENS_NOT_SERVED)


blueprint.add_url_rule("/v1/messages/count_tokens", view_func=count_tokens, methods=["POST"])

FAST_ROUTES: dict[str, Handler] = {"/v1/messages": messages}
for _path, _handler in FAST_ROUTES.items():
    quart_route(blueprint, _path, _handler)
