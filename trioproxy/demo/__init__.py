"""Built-in demo backend: a fast, deterministic, OpenAI-compatible simulated LLM server.

Used by ``trioproxy --demo`` (embedded via :func:`serve_demo`) and standalone by tests and
benchmarks::

    python -m trioproxy.demo --host 127.0.0.1 --port 0 [--token-delay 0.02]

which prints one line, ``demo backend listening on http://HOST:PORT/v1``, with the real port.

Models: ``demo-chat`` (text, tool calls, JSON mode), ``demo-reasoner`` (streams a few
``reasoning_content`` tokens first, unless ``chat_template_kwargs.enable_thinking`` is
false) and ``demo-embed`` (deterministic unit vectors). Chat completions asked for
``logprobs`` (and ``top_logprobs``, 0 to 20) carry made-up, deterministic ones for the
content's tokens, in OpenAI's shape, streamed and not; so do text completions asked for
``logprobs`` (an integer, 0 to 5), in the legacy shape (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``POST /v1/responses`` (the Responses API, answered as chat is: function ``tools`` called,
a ``function_call_output`` answered with what the tool returned, ``text.format`` JSON, a
reasoning item first from demo-reasoner; stored, with ``background``; an unknown
``previous_response_id`` is a 404), its
routes by id (``GET``/``DELETE /v1/responses/{id}``, ``?stream=true&starting_after=N``
replays the events, ``POST …/cancel``, ``GET …/input_items``), ``POST
/v1/responses/input_tokens`` and ``/v1/responses/compact``, ``GET /v1/models``,
``GET /v1/models/{id}``; test helpers ``GET /_demo/events`` (event log) and
``POST /_demo/reset`` (clears the log and the ``fail_first`` counters).

Test hooks
----------
The proxy forwards request bodies, so hooks travel inside them: write ``[[name=value]]`` or
``[[name]]`` anywhere in the content of the LAST chat message, system messages after it passed
over (the prompt for /v1/completions, the
first input for /v1/embeddings, the last input message for /v1/responses). Unknown or malformed
directives are answered with HTTP 400.

``[[tokens=N]]``
    Reply length in tokens (``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``
    still cap it).
``[[delay=S]]``
    Seconds between streamed tokens. A non-stream reply normally comes at once; with an explicit
    ``[[delay]]`` it arrives when the equivalent stream would have ended.
``[[first_delay=S]]``
    Seconds before the first token. The role chunk (and the headers) go out immediately, so the
    first byte is not the first token. Non-stream replies wait this long too.
``[[stall_after=N]]``
    Send N tokens, then go silent until the client disconnects (non-stream: never answer).
``[[drop_after=N]]``
    Send N tokens, then abort the connection without the terminating chunk (non-stream: headers
    promising the full Content-Length and half of the body, then close).
``[[status=CODE]]``
    Answer with that HTTP status (400-599) and an OpenAI error body; 429 adds ``Retry-After: 0``.
``[[fail_first=N]]`` and optionally ``[[fail_status=CODE]]`` (default 503)
    The first N requests with this exact body fail with that status; later ones succeed. The
    counter is keyed by a hash of the raw request body, so retries of one body share a count.
``[[close_connection]]``
    Add ``Connection: close`` to the response.

Errors before the response starts are always a JSON error body with a non-200 status, even for
``stream: true`` (as LiteLLM does).

Event log
---------
Every request to the four generation endpoints appends ``{"id", "path", "model", "stream",
"started", "ended", "outcome", "tokens_sent", "request_id", "body_hash"}`` (wall-clock
``time.time()`` stamps so other processes can compare). ``outcome`` is ``None`` while in flight,
then ``"completed"``, ``"disconnected"`` (the client left first; ``ended`` is when that was noticed)
or ``"error"`` (error status, ``drop_after``, server shutdown). The last 10,000 entries are kept.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import hypercorn.trio
import trio
from hypercorn.config import Config

from .app import DemoApp, create_demo_app
from .script import DemoSettings

__all__ = ["DemoApp", "DemoSettings", "create_demo_app", "demo_config", "serve_demo"]


def demo_config(host: str, port: int) -> Config:
    """Hypercorn settings for the demo: quiet, quick to shut down, normal keep-alive."""
    cfg = Config()
    bind_host = f"[{host}]" if ":" in host else host  # IPv6 literals need brackets in a bind
    cfg.bind = [f"{bind_host}:{port}"]
    cfg.keep_alive_timeout = 5
    cfg.graceful_timeout = 1  # stalled test streams would otherwise hold shutdown for 3 s
    cfg.accesslog = None
    # hypercorn's default error log prints "Running on ..." to stderr; route it through logging
    # instead so the embedding process decides what is shown.
    cfg.errorlog = logging.getLogger("trioproxy.demo")
    return cfg


async def serve_demo(
    host: str = "127.0.0.1",
    port: int = 0,
    settings: DemoSettings | None = None,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo backend until cancelled (or until *shutdown_trigger* returns).

    Reports ``http://HOST:PORT/v1`` (the real bound port) through ``task_status.started``.
    """
    app = create_demo_app(settings)
    cfg = demo_config(host, port)
    async with trio.open_nursery() as nursery:
        # the demo's ASGI types are plain dicts, hypercorn's TypedDicts of the same shapes
        serve = partial(hypercorn.trio.serve, app, cfg, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
        binds = await nursery.start(serve)
        task_status.started(f"{binds[0]}/v1")
