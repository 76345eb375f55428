"""Thin trio adapters between the backend's SSE stream and the client.

The protocol work (SSE parsing, OpenAI -> Ollama translation, tool-call accumulation,
usage) is done by the sans-I/O classes in ``sse`` and ``translate``; this module only
moves bytes, enforces the first-token and idle-gap deadlines, and fills in the stream
measurements. Errors after the first byte end the stream with one in-band error line.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import httpx
import trio

from .anthropic import EVENT_STREAM as ANTHROPIC_EVENT_STREAM
from .anthropic import error_event as anthropic_error_event
from .config import Settings
from .errors import (
    ProxyError,
    UpstreamStatusError,
    UpstreamTimeout,
    bounded,
    scrub,
    upstream_error_message,
)
from .hypercorn_patches import write_cut
from .json_threads import OFF_LOOP_BYTES, by_size, joined, off_loop
from .jsonutil import NestedTooDeeply, compact_json, loads
from .metrics import MetricsCollector, RequestMetrics
from .netstream import DirectTCPStream, body_reader
from .sse import (
    ERROR_FIELD_EVENT,
    SSE_DONE,
    SSE_DONE_BYTES,
    SSEEvent,
    SSEParser,
    SSEProtocolError,
    SSETooLarge,
    encode_sse,
    error_fields_as_data,
    openai_error_event,
    responses_error_event,
)
from .translate import (
    FINISHED_WITH_ERROR,
    OllamaStreamTranslator,
    OpenAIStreamObserver,
    ResponsesStreamObserver,
    UntranslatableStream,
    is_response,
    read_chunk,
    response_as_events,
)
from .upstream import MAX_ERROR_BODY, forwarded_headers

log = logging.getLogger("trioproxy.relay")

NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class TokenStats(Protocol):
    """The measurements ``_record_tokens`` reads: every stream consumer keeps them."""

    first_token_ns: int | None
    last_token_ns: int | None
    content_chunks: int
    prompt_tokens: int | None
    completion_tokens: int | None


class StreamObserver(TokenStats, Protocol):
    progressed: bool  # past the first-token deadline: output (or other work) came
    ended: bool  # the stream's last event is out (Responses streams have no [DONE])
    failed: bool  # the backend reported a failure in the stream
    finish_reason: str | None  # the stream's own, once it told one
    error: object  # what the backend said when it failed, if anything
    malformed: bool  # an event came that is no JSON at all

    @property
    def must_end(self) -> bool: ...  # a body ending before the stream's last event is broken

    @property
    def open_choices(self) -> int: ...  # choices asked for (``n``) without a finish_reason

    def feed_text(self, data: str, now_ns: int) -> None: ...


class StreamTranslator(TokenStats, Protocol):
    """What ``relay_ollama`` drives: ``translate.OllamaStreamTranslator``, or
    ``anthropic.AnthropicStreamTranslator``."""

    finish_reason: str | None

    def feed_text(self, data: str, now_ns: int) -> bytes | None: ...

    def feed(self, chunk: dict[str, Any], now_ns: int) -> list[dict[str, Any]]: ...

    def finish(self, now_ns: int) -> Any: ...

    def tool_calls_told_later(self) -> Callable[[], None]: ...


dumps = compact_json


class StreamTimeout(Exception):
    pass


# After the backend's last event, how long to wait for the end of its response. Reading to
# the end lets httpx hand the connection back to its pool (a half-read response costs a
# fresh connection next time) and lets every generator in httpx's read chain finish.
DRAIN_SECONDS = 0.25


class StreamEnd:
    """Set by a relay once the stream's last line (its done line, ``[DONE]`` or its error
    line) is out. What the relay does after (reading the rest of the backend's body) is
    housekeeping that a shutdown may cut without telling the client anything.
    ``responses``: the stream is the Responses API's, whose error event is its own."""

    __slots__ = ("reached", "relayed", "responses")

    def __init__(self) -> None:
        self.reached = False
        self.responses = False  # set by the route that knows (no keyword: 35 ns, not 100)
        # the last chunk carrying a ``sequence_number`` that a relay gave the client, once
        # it stopped: where the numbering of a Responses stream's events got to
        # (:func:`next_sequence_number`); a chunk after it that carries none (an SSE
        # comment, a backend's keep-alive) does not reset the count to 0
        self.relayed = b""


class _Reader:
    """The backend's body, read by read, under the stream deadlines: the first token must
    arrive within ``first_token`` s of the request going to the backend (``sent_at``, a
    ``perf_counter`` time: the first attempt's, the wait for the headers included; not the
    request's arrival, or a client's slow upload would be the backend's timeout); after
    that, no gap between backend reads may exceed ``idle`` s.

    A cancel scope of our own around every read costs 6-20 µs per chunk, and the backend
    stream already bounds every read by its read timeout (without a scope per read:
    ``netstream.ReadDeadlines``). So the idle limit becomes the body's read timeout (set
    here, after the headers: the wait for those is bounded by the first-token timeout alone,
    see ``UpstreamPool._attempt``). Until the first token the first-token deadline alone
    applies (a reasoning model may think in silence for minutes after its first event): the
    connection's read timeout is held at that deadline
    (``netstream.DirectTCPStream.hold_read_timeout``) until :meth:`saw_token`, and
    :meth:`release` gives it back however the stream ends; only a stream that cannot hold
    it (not ours: a test's mock) has a scope of our own around its reads until then.

    Methods, not an async generator: one generator layer less per chunk, and no cancel scope
    can ever be held open across the relay's ``yield``. Once the read timeout is the only
    limit (``direct``), a relay awaits ``next_part`` itself, one coroutine less per chunk
    (1 400 machine instructions), and reports what stopped it as :meth:`broke` says.
    """

    __slots__ = (
        "_by_transport",
        "_held",
        "_line_since",
        "_stream",
        "direct",
        "first_token_at",
        "idle",
        "next_part",
        "token_seen",
    )

    def __init__(self, response: httpx.Response, settings: Settings, sent_at: float) -> None:
        already = time.perf_counter() - sent_at
        self.first_token_at = trio.current_time() + settings.stream_first_token_timeout - already
        self.idle = settings.stream_idle_timeout
        self.token_seen = False
        self._by_transport = _idle_as_read_timeout(response, self.idle)
        # the next read has no deadline but the body's read timeout, the idle limit
        self.direct = False
        stream = response.extensions.get("network_stream")
        self._held: DirectTCPStream | None = None
        if self._by_transport and isinstance(stream, DirectTCPStream):
            stream.hold_read_timeout(self.first_token_at)
            self._held = stream
        self._stream = self._held  # the connection's stream, also after the first token
        self.next_part = body_reader(response)
        self._line_since: float | None = None

    async def read(self) -> bytes | None:
        """The next chunk of the body, ``None`` at its end; raises StreamTimeout."""
        if self.direct:  # most reads: the read timeout is the limit
            try:
                return await self.next_part()
            except httpx.ReadTimeout:
                raise StreamTimeout(self.describe(by_transport=True)) from None
        if self._held is not None:
            # the first token's deadline is the held read timeout's: no cancel scope
            # (about 50 000 machine instructions per read before the first token)
            try:
                return await self.next_part()
            except httpx.ReadTimeout:
                raise StreamTimeout(self.describe()) from None
        deadline = self._deadline()
        try:
            if deadline == math.inf:
                return await self.next_part()
            with trio.CancelScope(deadline=deadline) as scope:
                chunk = await self.next_part()
        except httpx.ReadTimeout:
            if not self._by_transport:
                raise  # not our idle limit: a transport failure like any other
            raise StreamTimeout(self.describe(by_transport=True)) from None
        if scope.cancelled_caught:
            raise StreamTimeout(self.describe())
        return chunk

    def line_dragging(self, reads: int) -> None:
        """The last ``reads`` reads in a row ended no line (the caller asks only after the
        first token): a backend sending a few bytes at a time would never let the read
        timeout, the idle limit, run out. So a line still unended ``idle`` s after the
        first of those reads is the same silence (raises StreamTimeout). Keep-alive
        comments end their lines."""
        now = trio.current_time()
        if reads == 1 or self._line_since is None:
            self._line_since = now  # a line goes on past a read: timed from here
        elif now - self._line_since > self.idle:
            raise StreamTimeout(
                f"the backend sent no whole line for {self.idle:g} s (STREAM_IDLE_TIMEOUT)"
            )

    def saw_token(self) -> None:
        """The first token (or other progress) came: the idle limit applies from now on."""
        self.token_seen = True
        self.direct = self._by_transport
        self.release()

    def broke(self, exc: Exception) -> Exception:
        """What stopped a relay's reading, as it reports it: the read timeout of a read
        it awaited itself (``direct``) is the idle limit, as :meth:`read` raises it (no
        other read timeout can come then: reads are all the I/O there is after the first)."""
        if self.direct and isinstance(exc, httpx.ReadTimeout):
            return StreamTimeout(self.describe(by_transport=True))
        return exc

    def release(self) -> None:
        """Give the connection its read timeout back (it goes back to the pool)."""
        if self._held is not None:
            self._held.release_read_timeout(self.first_token_at)
            self._held = None

    async def drain(self) -> None:
        """Read the rest of the body, briefly (see DRAIN_SECONDS); failures don't matter now."""
        stream = self._stream
        if stream is not None:
            # the bound as the held read timeout (at most the idle limit, as before): no
            # cancel scope (about 50 000 machine instructions per stream). The hold ends
            # with the response (netstream._response_closed), before its connection is
            # pooled again, and here however the drain ends
            until = trio.current_time() + min(DRAIN_SECONDS, self.idle)
            stream.hold_read_timeout(until)
            try:
                while await self.next_part() is not None:
                    pass
            except httpx.HTTPError:
                pass
            finally:
                stream.release_read_timeout(until)
            return
        with trio.move_on_after(DRAIN_SECONDS):
            try:
                while await self.next_part() is not None:
                    pass
            except httpx.HTTPError:
                pass

    def describe(self, *, by_transport: bool = False) -> str:
        """Which limit a stream ran into: the read timeout is the idle limit."""
        if self.token_seen or by_transport:
            return f"the backend sent nothing for {self.idle:g} s (STREAM_IDLE_TIMEOUT)"
        return "the backend produced no token in time (STREAM_FIRST_TOKEN_TIMEOUT)"

    def _deadline(self) -> float:
        """Our own deadline for the next read; ``inf`` when the read timeout covers it."""
        if self.token_seen:
            return math.inf if self._by_transport else trio.current_time() + self.idle
        idle_at = trio.current_time() + self.idle
        if self._by_transport:
            return self.first_token_at if self.first_token_at < idle_at else math.inf
        return min(idle_at, self.first_token_at)


def _idle_as_read_timeout(response: httpx.Response, idle: float) -> bool:
    """Make ``idle`` the read timeout of the body still to be read; whether it could be.

    httpcore looks the read timeout up in the request's ``timeout`` extension when the body
    iteration starts, which is after this. Streams are sent with no read timeout (``None``);
    a response without a request or with another read timeout keeps our own deadlines. The
    timeouts are replaced, not changed in place, in case the dict is shared between requests.
    """
    try:
        extensions = response.request.extensions
    except RuntimeError:  # a Response built without a request
        return False
    timeouts = extensions.get("timeout")
    if not isinstance(timeouts, dict):
        return False
    if timeouts.get("read") is None:
        extensions["timeout"] = {**timeouts, "read": idle}
        return True
    return timeouts.get("read") == idle


def _record_tokens(metric: RequestMetrics | None, observer: TokenStats) -> None:
    if metric is None:
        return
    if observer.first_token_ns is not None and metric.first_token_time_ms is None:
        metric.first_token_time_ms = (observer.first_token_ns / 1e9 - metric.start) * 1000.0
    if observer.last_token_ns is not None:
        metric.last_token_time_ms = (observer.last_token_ns / 1e9 - metric.start) * 1000.0
    metric.token_chunks = observer.content_chunks
    metric.input_tokens = observer.prompt_tokens
    if observer.completion_tokens is not None:
        metric.output_tokens = observer.completion_tokens
    else:
        metric.output_tokens = observer.content_chunks
        metric.tokens_counted = True


def _finish_upstream(metric: RequestMetrics | None) -> None:
    if metric is not None:
        metric.upstream_ms = metric.elapsed_ms()


async def relay_ollama(
    response: httpx.Response,
    translator: StreamTranslator,
    *,
    settings: Settings,
    metric: RequestMetrics | None,
    sent_at: float,
    collector: MetricsCollector,
    end: StreamEnd | None = None,
    encode: Callable[[Any], bytes] = dumps,
    error_line: Callable[[str], bytes] | None = None,
) -> AsyncIterator[bytes]:
    """Backend SSE -> Ollama NDJSON, one output chunk per backend read.

    A backend that answers the stream request with one JSON completion (it ignored
    ``stream``) is translated as a stream of that one chunk; a stream that stops before
    its end (no ``finish_reason``, no ``[DONE]``) is an error, not a finished answer.

    Another translated dialect (the Anthropic Messages API's events) comes through the
    same loop with its own ``translator``, its ``encode`` for what it gives (a line each,
    joined with line ends; its ``finish`` may give a list of them) and its
    ``error_line`` for a stream that ends early (NDJSON's ``{"error": ...}`` line by
    default)."""
    parser = SSEParser(settings.max_response_bytes)  # an event as large as an answer
    reader = _Reader(response, settings, sent_at)
    error: str | None = None
    done = first = False
    sent = timed_out = False
    next_part = reader.next_part  # awaited directly once the read timeout is the limit
    # a chat stream's common read, a token's chunk, translated from its bytes
    lone_line = translator.lone_line if isinstance(translator, OllamaStreamTranslator) else None
    clock = time.perf_counter_ns
    try:
        while True:
            data = await (next_part() if reader.direct else reader.read())
            if (
                lone_line is not None
                and data is not None
                and len(data) < parser.lone_room
                and len(data) <= OFF_LOOP_BYTES
                and (line := lone_line(data, clock)) is not None
            ):
                if line:  # (none: half a surrogate pair held for the next piece)
                    yield line + b"\n"  # (see OllamaStreamTranslator.lone_line)
                    sent = True
                continue
            lines: list[bytes] = []
            if data is None:
                # a last event without its blank line was still meant (it may hold the
                # finish_reason and the usage)
                events = parser.close()
            else:
                if not first:
                    first = True
                    data = await _telling_start(reader, data, response)
                    if _opens_json(data):
                        raw = await _rest_of_body(reader, data, settings.max_response_bytes)
                        # bytes in, a new object out: abandoned to a client that leaves
                        whole = await by_size(len(raw), _decoded, raw, abandon_on_cancel=True)
                        lines += map(encode, _completion_as_chunk(whole, translator))
                        done = True
                    elif not _looks_like_events(response, data):
                        raise _NotAStream(_not_a_stream(response))
                if done:
                    events = []
                elif (lone := parser.lone_event(data)) is not None:  # the common read
                    events = [SSEEvent(lone)]
                else:
                    events = parser.feed(data)
                if parser.reads_in_line and reader.token_seen:
                    reader.line_dragging(parser.reads_in_line)
            for event in events:
                text = event.data
                if text == SSE_DONE:
                    done = True
                    break
                now_ns = time.perf_counter_ns()
                if len(text) > OFF_LOOP_BYTES:  # one large event: in a JSON thread
                    failed, out = await _translated_apart(translator, text, now_ns, encode)
                    if failed is not None:
                        error = _reported(failed, sent or bool(lines), settings)
                        break
                    lines += out
                elif (line := translator.feed_text(text, now_ns)) is None:  # the common chunk
                    chunk = read_chunk(text)
                    if chunk is None:
                        continue
                    if _reports_failure(chunk):  # its text is not part of the answer
                        error = _reported(chunk, sent or bool(lines), settings)
                        break
                    lines += map(encode, translator.feed(chunk, now_ns))
                elif line:
                    lines.append(line)
                if not reader.token_seen and translator.first_token_ns is not None:
                    reader.saw_token()
            if lines:
                yield b"\n".join(lines) + b"\n"
                sent = True
            if done or error:
                break
            if data is None:
                if translator.finish_reason is None:
                    raise _Unfinished()
                break
    except (
        StreamTimeout,
        httpx.HTTPError,
        SSEProtocolError,
        UntranslatableStream,
        _Unfinished,
        _NotAStream,
        NestedTooDeeply,  # an event, or what it becomes for Ollama's clients
    ) as exc:
        broke = reader.broke(exc)
        error = _stream_broke(broke, metric, collector, settings)
        timed_out = isinstance(broke, StreamTimeout)
    except _FailedAtOnce as failure:
        raise _refused(failure.error, metric, settings, response) from None
    finally:
        reader.release()
        _finish_upstream(metric)
        _record_tokens(metric, translator)
    if error is None:
        try:  # the done line carries tool calls whose arguments may be too deep to write
            last = _encoded_end(translator.finish(time.perf_counter_ns()), encode)
        except (NestedTooDeeply, UntranslatableStream) as exc:
            error = _stream_broke(exc, metric, collector, settings)
    if error is not None:
        _set_outcome(metric, "error")
        if not sent:
            raise _failed_before_the_first_byte(error, timed_out, metric)
        log.warning("stream ended early: %s", error)
        _reached(end)
        yield ndjson_error(error) if error_line is None else error_line(error)
    else:
        _reached(end)
        yield last
        # the done line is out: a client that leaves now (ollama-js stops reading at it)
        # has the whole answer, whatever happens to the drain below
        _end_written(metric)
    if done or error is not None:
        await reader.drain()


def _reported(chunk: dict[str, Any], answered: bool, settings: Settings) -> str:
    """The error of a chunk that reports the backend's failure, for the stream's error
    line; :class:`_FailedAtOnce` when nothing was ``answered`` yet."""
    failure = chunk.get("error") or FINISHED_WITH_ERROR
    if not answered:
        raise _FailedAtOnce(failure)
    return scrub(_error_text(failure), settings.backend_secrets)


async def _translated_apart(
    translator: StreamTranslator, text: str, now_ns: int, encode: Callable[[Any], bytes]
) -> tuple[dict[str, Any] | None, list[bytes]]:
    """One event over OFF_LOOP_BYTES (a whole answer in one chunk, a tool call's
    arguments, thousands of log probabilities) decoded, translated and encoded in a JSON
    thread, as a large non-stream answer is: the chunk if it reports a failure (not fed),
    else the lines it gives. Waited for (the translator is the stream's own: no thread
    may touch it after the relay moved on); the whole tool calls it completes are told
    afterwards, here on the loop."""
    told = translator.tool_calls_told_later()
    try:
        return await off_loop(_translated, translator, text, now_ns, encode)
    finally:
        told()


def _translated(
    translator: StreamTranslator, text: str, now_ns: int, encode: Callable[[Any], bytes]
) -> tuple[dict[str, Any] | None, list[bytes]]:
    """What relay_ollama does with an event on the loop, for :func:`_translated_apart`
    (the content-only shortcut left out: its regular expression costs more than the
    decoding of a large event)."""
    chunk = read_chunk(text)
    if chunk is None:
        return None, []
    if _reports_failure(chunk):
        return chunk, []
    return None, [encode(out) for out in translator.feed(chunk, now_ns)]


def _encoded_end(out: Any, encode: Callable[[Any], bytes]) -> bytes:
    """A translator's last output (one object, or a list of them), encoded and ended."""
    if isinstance(out, list):
        return b"\n".join(map(encode, out)) + b"\n"
    return encode(out) + b"\n"


async def relay_openai(
    response: httpx.Response,
    observer: StreamObserver,
    *,
    settings: Settings,
    metric: RequestMetrics | None,
    sent_at: float,
    collector: MetricsCollector,
    rewrite_model: Callable[[bytes], bytes] | None = None,
    end: StreamEnd | None = None,
    on_finish: Callable[[], None] | None = None,
    stream_options: object = None,
) -> AsyncIterator[bytes]:
    """Backend SSE -> client SSE, relayed read by read; events are only observed.
    ``on_finish`` runs once the backend's stream is over (however it ended).
    ``stream_options`` is the client's: read only if the backend answers with one JSON
    completion, which is then streamed with its usage where the client asked for it.

    Whole events only: a read that ends inside an event keeps that event's start until the
    read that ends it, so a backend that breaks off mid-event never leaves half an event
    before the proxy's error event (the openai SDK would fail to parse the two glued
    together), and a mapped model name split between two reads is rewritten whole. The
    SSE parser bounds an event, so what is held is bounded too. A read of whole events,
    the usual one, is passed on as it came.

    Once the stream's last event is out (``[DONE]``, or the Responses API's closing event),
    the rest of the backend's body is only drained, briefly: a backend that keeps the body
    open after it must not turn a finished stream into a timed-out one."""
    # an event as large as an answer; the client decodes what is relayed strictly
    parser = SSEParser(settings.max_response_bytes, strict_utf8=True)
    reader = _Reader(response, settings, sent_at)
    error: str | None = None
    sent = timed_out = finished = first = failure_logged = False
    # an ``error:`` event came: its line is rewritten in what is relayed next, which holds
    # the whole line (only whole events are relayed), wherever the reads cut it
    error_field = False
    held = _HeldEvent()
    held_whole = False
    # the last chunk given to the client that carries a sequence number: only a Responses
    # stream's error event reads it (a chat stream pays a bool test per chunk, no search)
    relayed = b""
    numbered = _responses(end)
    # a chat stream's common read, a token's chunk, fed from its bytes (None: not chat's)
    lone_token = observer.count_lone_token if isinstance(observer, OpenAIStreamObserver) else None
    clock = time.perf_counter_ns
    next_part = reader.next_part  # awaited directly once the read timeout is the limit
    try:
        while (data := await (next_part() if reader.direct else reader.read())) is not None:
            if not first:
                first = True
                data = await _telling_start(reader, data, response)
                if _opens_json(data):
                    data, usage = await _json_body_as_events(
                        reader, data, settings.max_response_bytes, end, stream_options
                    )
                    if usage is not None:  # counted, sent to the client or not
                        observer.feed_text(usage, time.perf_counter_ns())
                    # the body was within the limit, so are the events built from it: one
                    # event holds it whole, longer by its framing (and by the JSON written
                    # again: U+2028 escaped, 1e2 as 100.0)
                    limit = max(settings.max_response_bytes, len(data))
                    parser = SSEParser(limit, strict_utf8=True)
                elif not _looks_like_events(response, data):
                    raise _NotAStream(_not_a_stream(response))
            if lone_token is not None and len(data) < parser.lone_room and lone_token(data, clock):
                pass  # the common read: a token's chunk, counted (see count_lone_token)
            else:
                if (text := parser.lone_event(data)) is not None:  # the common read
                    if text == SSE_DONE:
                        finished = True
                    elif len(text) > OFF_LOOP_BYTES:  # one large event: in a JSON thread
                        await _observed_apart(observer, text, time.perf_counter_ns())
                    else:
                        observer.feed_text(text, time.perf_counter_ns())
                else:
                    for event in parser.feed(data):
                        if event.data != SSE_DONE:
                            if len(event.data) > OFF_LOOP_BYTES:
                                await _observed_apart(observer, event.data, time.perf_counter_ns())
                            else:
                                observer.feed_text(event.data, time.perf_counter_ns())
                            if event.event == ERROR_FIELD_EVENT:  # llama.cpp before 2025-10
                                error_field = True
                        else:
                            finished = True
                    if parser.reads_in_line and reader.token_seen:
                        reader.line_dragging(parser.reads_in_line)
                if observer.malformed:
                    # not relayed: the client's SDK would fail on it with a JSON error of its
                    # own (what came before it in this read is lost with it)
                    raise SSEProtocolError("the backend sent an event that is not JSON")
                if observer.failed:
                    if not sent and observer.first_token_ns is None:
                        raise _FailedAtOnce(observer.error)  # its first word was the failure
                    # the client learns of it with this read and may leave at once (the openai
                    # SDK raises and closes): the outcome must not wait for the end
                    _set_outcome(metric, "error")
                    if not failure_logged:
                        failure_logged = True
                        failure = _error_text(observer.error or FINISHED_WITH_ERROR)
                        log.warning(
                            "stream failed: the backend reported: %s",
                            scrub(failure, settings.backend_secrets),
                        )
                if observer.progressed and not reader.token_seen:
                    reader.saw_token()
                finished = finished or observer.ended
                if finished:
                    _reached(end)
                # (a lone event was read between events: nothing is held, nothing is left)
                if text is None and (held or parser.mid_event):
                    data = held.whole_events(data, parser.mid_event)
                    if not data:
                        continue
            if error_field:
                data = error_fields_as_data(data)
                error_field = False
            if rewrite_model is not None:
                data = rewrite_model(data)
            if numbered and data.find(_SEQUENCE_KEY) >= 0:  # 70 ns; `in` costs 130
                relayed = data  # before: a chunk cut while sent counts as sent (numbers rise)
            yield data
            sent = True
            if finished:
                break
        else:
            for event in parser.close():  # a last event without its blank line: still meant
                if event.data == SSE_DONE:
                    finished = True
                elif len(event.data) > OFF_LOOP_BYTES:
                    await _observed_apart(observer, event.data, time.perf_counter_ns())
                    error_field = error_field or event.event == ERROR_FIELD_EVENT
                else:
                    observer.feed_text(event.data, time.perf_counter_ns())
                    error_field = error_field or event.event == ERROR_FIELD_EVENT
            # what is held is relayed, before the error if there is one, unless the body
            # ended inside its event (the openai SDK could not read what is there)
            held_whole = not observer.malformed
            if _unfinished(observer):
                raise _Unfinished(_unfinished_message(observer))
            if not held_whole:
                raise _Unfinished("the backend's stream ended inside an event")
    except (StreamTimeout, httpx.HTTPError, SSEProtocolError, _Unfinished, _NotAStream) as exc:
        broke = reader.broke(exc)
        error = _stream_broke(broke, metric, collector, settings)
        timed_out = isinstance(broke, StreamTimeout)
    except _FailedAtOnce as failure:
        raise _refused(failure.error, metric, settings, response) from None
    finally:
        reader.release()
        _finish_upstream(metric)
        _record_tokens(metric, observer)
        if on_finish is not None:
            on_finish()
        if end is not None:  # for an error event written after it (a shutdown's)
            end.relayed = relayed
    if held and held_whole:  # a last event without its blank line, completed
        last = held.completed()  # or the openai SDK would never dispatch it
        if error_field:
            last = error_fields_as_data(last)
        last = rewrite_model(last) if rewrite_model is not None else last
        if end is not None and numbered and last.find(_SEQUENCE_KEY) >= 0:
            relayed = end.relayed = last
        yield last
        sent = True
    if error is not None or observer.failed:  # a reported failure is relayed as it came
        _set_outcome(metric, "error")
    if error is not None:
        if not sent:
            raise _failed_before_the_first_byte(error, timed_out, metric)
        log.warning("stream ended early: %s", error)
        code = "stream_timeout" if metric and metric.stream_outcome == "timeout" else None
        _reached(end)
        if _responses(end):
            yield responses_error_event(
                error, "api_error", code, None, next_sequence_number(relayed)
            )
        else:
            yield openai_error_event(error, "api_error", code)
    if finished:
        # [DONE] is out: the openai SDK closes the response at it, and the stream counts
        # as completed though the drain below is cut short
        _end_written(metric)
        await reader.drain()


async def _observed_apart(observer: StreamObserver, text: str, now_ns: int) -> None:
    """One event over OFF_LOOP_BYTES of a stream relayed as it came (a whole answer in one
    chunk, thousands of log probabilities, a Responses API image) observed in a JSON
    thread: its decoding and the freeing of what was decoded leave the loop, which gets
    its turns between them. Waited for, in order (the observer is the stream's own: no
    thread may touch it after the relay moved on)."""
    await off_loop(_observed, observer, text, now_ns)


def _observed(observer: StreamObserver, text: str, now_ns: int) -> None:
    """What the relay does with an event on the loop, for :func:`_observed_apart` (a chat
    chunk decoded without trying the content-only shortcut: see ``feed_decoded``)."""
    if isinstance(observer, OpenAIStreamObserver):
        observer.feed_decoded(text, now_ns)
    else:
        observer.feed_text(text, now_ns)


class _Unfinished(Exception):
    """The backend's body ended before its stream did."""

    DEFAULT = "the backend's stream ended before its last event (no finish_reason, no [DONE])"
    # the Responses API has neither: its stream ends with its closing event
    RESPONSES = (
        "the backend's stream ended before its last event (no response.completed, "
        "response.incomplete or response.failed event)"
    )

    def __init__(self, message: str = DEFAULT) -> None:
        super().__init__(message)


def _unfinished(observer: StreamObserver) -> bool:
    """Whether a relayed stream whose body is over (without ``[DONE]``) still lacks its
    end: a choice without its finish_reason (of ``n`` asked for, every one needs its
    own: a body cut after the first choice finished, while another ran on, is no whole
    answer), no closing event, and no failure the backend reported (relayed as it came)."""
    if not observer.must_end or observer.failed or observer.ended:
        return False
    return observer.open_choices > 0


def _unfinished_message(observer: StreamObserver) -> str:
    if isinstance(observer, ResponsesStreamObserver):
        return _Unfinished.RESPONSES
    if observer.finish_reason is None:
        return _Unfinished.DEFAULT
    return (
        f"the backend's stream ended before its last event ({observer.open_choices} of the "
        "choices asked for without a finish_reason, no [DONE])"
    )


class _FailedAtOnce(Exception):
    """The backend's first event reported a failure: nothing was sent, so the client can
    still get a real status for it."""

    def __init__(self, error: object) -> None:
        super().__init__("the backend failed the stream before its first event")
        self.error = error


def _refused(
    error: object, metric: RequestMetrics | None, settings: Settings, response: httpx.Response
) -> ProxyError:
    """The client's error for a stream the backend failed at once: a mistake of the
    client's that the backend found in the stream (OpenAI's ``invalid_request_error``, a
    4xx code: a context too long, a rate limit) is that 4xx, like the same mistake found
    before the stream; anything else is a 502. A 4xx is a refused request, not a stream."""
    text = _error_text(error) if error else "the backend failed the stream"
    message = scrub(text, settings.backend_secrets)
    status = _client_status(error)
    headers = forwarded_headers(response.headers, settings.backend_secrets)  # a retry-after, say
    if status is None:
        _set_outcome(metric, "error")
        if metric is not None:
            metric.answered_plainly = True
        return ProxyError(message, 502, code="upstream_error", headers=headers)
    if metric is not None:
        metric.streaming = False
    # the backend's own error object, as a status error's body would be: an OpenAI client
    # gets it as written (type, param, code); an Ollama client gets its message
    body = _error_body(error)
    return UpstreamStatusError(
        message, status, body=body, content_type="application/json", headers=headers
    )


def _error_body(error: object) -> bytes:
    """The backend's ``error`` object as a status error's body; none (the proxy's own body
    from the message then) for anything else, or for an object too deep to write again."""
    if not isinstance(error, dict):
        return b""
    try:
        body = compact_json({"error": error})
    except NestedTooDeeply:
        return b""
    # no larger than a status error's body is read: the proxy's own body, its message
    # bounded, for a larger one (an event's may be hundreds of MB)
    return body if len(body) <= MAX_ERROR_BODY else b""


def _client_status(error: object) -> int | None:
    if not isinstance(error, dict):
        return None
    for key in ("status", "code"):
        value = error.get(key)
        # LiteLLM writes "400"; only ASCII digits, and few ("²" is a digit int() refuses,
        # 5,000 of them are past its limit: each was a 500)
        if isinstance(value, str) and len(value) == 3 and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, int) and 400 <= value < 500:
            return value
    code = error.get("code")  # a list or an object there: unhashable, no code
    if error.get("type") == "invalid_request_error" or (
        isinstance(code, str) and code in _CLIENT_FAILURES
    ):
        return 400
    if error.get("code") in ("rate_limit_exceeded", "insufficient_quota"):
        return 429
    return None


# The Responses API's failure codes that put the request at fault (its prompt, or an image
# it sent or named): ``response.failed``'s ``error.code`` (whose ``type`` may be null) and
# an ``error`` event's ``code`` (that event has no error type: its ``type`` is "error").
# Such a failure as the stream's first event was a 502, which the openai SDK retries as
# any 5xx: the same mistake sent twice more, and counted as the backend's failure.
_CLIENT_FAILURES = frozenset(
    {
        "context_length_exceeded",
        "invalid_prompt",
        "invalid_image",
        "invalid_image_format",
        "invalid_base64_image",
        "invalid_image_url",
        "invalid_image_mode",
        "image_too_large",
        "image_too_small",
        "image_file_too_large",
        "image_parse_error",
        "image_content_policy_violation",
        "unsupported_image_media_type",
        "empty_image_file",
        "failed_to_download_image",
        "image_file_not_found",
    }
)


def _reports_failure(chunk: dict[str, Any]) -> bool:
    """An error event (``{"error": ...}``), also one that carries choices, as OpenRouter's
    mid-stream error does, or a choice finished with ``finish_reason: "error"``."""
    if chunk.get("error"):
        return True
    choices = chunk.get("choices")
    return (
        isinstance(choices, list)
        and bool(choices)
        and isinstance(choices[0], dict)
        and choices[0].get("finish_reason") == "error"
    )


def _error_text(error: object) -> str:
    """The message of a backend's ``error`` member: an object's ``message``, or the text."""
    if isinstance(error, dict):
        error = error.get("message") or error
    try:
        return str(error)
    except RecursionError:  # the repr of a list or dict recurses, as deep as the JSON read
        return "the backend reported an error nested too deeply to be shown"


class _NotAStream(Exception):
    """The backend answered a stream request with a JSON body that is not a completion."""


# how many bytes of the body's start are joined, at most, to tell what it is (few: a
# backend sending whitespace a byte at a time costs the joining its square)
_MAX_UNTOLD_START = 1024


_BOM = b"\xef\xbb\xbf"


async def _telling_start(reader: _Reader, data: bytes, response: httpx.Response) -> bytes:
    """The body's first read, joined with the next ones while they are too few bytes to
    tell an event stream from a JSON body, when its content type does not say: whitespace
    only, or the start of a field name (the ``da`` of ``data:``). A backend that writes
    its first event in pieces (or a line end first) and labels its stream wrong was
    refused as no event stream, and one whose JSON body came after a read of whitespace
    was read as an empty stream.

    A leading byte order mark is left out: the event stream format allows one, but the
    openai SDK reads it as part of the first field's name, and lost that event."""
    while (
        _undecided(data, response)
        and len(data) < _MAX_UNTOLD_START
        and (more := await reader.read()) is not None
    ):
        data += more
    # (a body of a byte order mark alone is kept: a first read is never empty)
    return data[len(_BOM) :] if data.startswith(_BOM) and len(data) > len(_BOM) else data


def _undecided(data: bytes, response: httpx.Response) -> bool:
    if len(data) <= len(_BOM) and _BOM.startswith(data):
        return True  # a byte order mark, in pieces or whole: what comes after it is told
    start = data.removeprefix(_BOM).lstrip()
    if not any(len(start) < len(field) and field.startswith(start) for field in _EVENT_LINE_STARTS):
        return False
    # a stream labelled as one is relayed as it comes: line ends sent to keep the
    # connection alive before the first event reach the client then
    return "event-stream" not in response.headers.get("content-type", "")


def _opens_json(data: bytes) -> bool:
    """Whether the body's start (:func:`_telling_start`) opens a JSON object: an event
    stream's lines start with a field name (``data:``), a comment (``:``) or a line end,
    never ``{``."""
    return data.lstrip()[:1] == b"{"


# how an event stream's first line starts when its content type does not say what it is
_EVENT_LINE_STARTS = (b"data:", b":", b"event:", b"id:", b"retry:")


def _looks_like_events(response: httpx.Response, first: bytes) -> bool:
    """Whether a body that starts with ``first`` (:func:`_telling_start`) is an event
    stream: its content type says so, or its first line reads like one (for backends
    that mislabel it)."""
    if "event-stream" in response.headers.get("content-type", ""):
        return True
    return first.lstrip().startswith(_EVENT_LINE_STARTS)


def _not_a_stream(response: httpx.Response) -> str:
    content_type = response.headers.get("content-type", "") or "no content type"
    return f"the backend answered the stream with {content_type[:80]}, not an event stream"


async def _rest_of_body(reader: _Reader, first: bytes, limit: int) -> bytes:
    """The whole body that began with ``first``; bounded like a non-stream answer
    (MAX_RESPONSE_BYTES), joined in a thread past 1 MiB (:func:`joined`)."""
    parts, size = [first], len(first)
    while (more := await reader.read()) is not None:
        size += len(more)
        if size > limit:
            raise _NotAStream(
                f"the backend answered the stream with a JSON body over {limit} bytes "
                "(MAX_RESPONSE_BYTES)"
            )
        parts.append(more)
    return await joined(parts, size)


def _decoded(raw: bytes) -> Any:
    """A JSON body answered to a stream, decoded (in a JSON thread when large)."""
    try:
        return loads(raw)
    except ValueError:
        raise _NotAStream("the backend answered the stream with a body that is not JSON") from None


def _completion(whole: Any) -> dict[str, Any]:
    """The completion a JSON answer holds; raises _NotAStream for anything else (the
    backend's ``error`` is the message then)."""
    if isinstance(whole, dict):
        choices = whole.get("choices")
        if isinstance(choices, list) and any(map(_is_choice, choices)):
            if _reports_failure(whole):  # a failed completion is no answer to stream
                reported = _error_text(whole.get("error") or FINISHED_WITH_ERROR)
                raise _NotAStream(f"the backend reported an error: {reported}")
            return whole
        if whole.get("error"):
            reported = _error_text(whole["error"])
            raise _NotAStream(f"the backend reported an error: {reported}")
    raise _NotAStream("the backend answered the stream with JSON that is not a completion")


def _is_choice(choice: object) -> bool:
    """A completion's choice: an object whose ``message``, if it has one, is an object
    (``"message": "x"`` was a 500 on /v1 and an empty answer on /api; null is none)."""
    if not isinstance(choice, dict):
        return False
    message = choice.get("message")
    return message is None or isinstance(message, dict)


def _completion_as_chunk(whole: Any, translator: StreamTranslator) -> list[dict[str, Any]]:
    """A backend's JSON completion (it ignored ``stream``) as the lines of its one chunk."""
    return translator.feed(_completion(whole), time.perf_counter_ns())


async def _json_body_as_events(
    reader: _Reader, first: bytes, limit: int, end: StreamEnd | None, stream_options: object
) -> tuple[bytes, str | None]:
    """The JSON body that began with ``first`` (:func:`_rest_of_body`) as the events it
    stands for and the usage to count (:func:`_answer_as_events`), decoded and written in
    a JSON thread when it is large; bytes in, bytes out: abandoned to a client that
    leaves."""
    raw = await _rest_of_body(reader, first, limit)
    responses, usage_asked = _responses(end), _asks_usage(stream_options)
    return await by_size(
        len(raw), _body_as_events, raw, responses, usage_asked, abandon_on_cancel=True
    )


def _body_as_events(raw: bytes, responses: bool, usage_asked: bool) -> tuple[bytes, str | None]:
    """:func:`_answer_as_events` of a JSON body answered to a stream: a pure function of
    bytes, for a JSON thread when the body is large."""
    return _answer_as_events(_decoded(raw), responses, usage_asked)


def _answer_as_events(whole: Any, responses: bool, usage_asked: bool) -> tuple[bytes, str | None]:
    """A backend's JSON answer to a stream request as the events it would have sent, and
    the usage to count beside them (:func:`_completion_as_events`). On a Responses API
    stream (``responses``) a Response object becomes that API's events: the relay then
    observes them as it observes a live stream's (the time to first token at its first
    delta, the usage of its closing event, a failure as the closing event says); any
    other answer is read as a completion (raises _NotAStream for what is none)."""
    as_response = responses and is_response(whole)
    try:
        if as_response:
            return response_as_events(whole), None
        return _completion_as_events(whole, usage_asked)
    except NestedTooDeeply:  # read, but nested too deeply to be written again
        kind = "response" if as_response else "completion"
        raise _NotAStream(
            f"the backend answered the stream with a {kind} nested too deeply"
        ) from None


def _completion_as_events(whole: Any, usage_asked: bool) -> tuple[bytes, str | None]:
    """A backend's JSON completion (it ignored ``stream``) as the event stream it would
    have sent: one chunk holding the whole message, a chunk with its ``usage`` and no
    choices if the client asked for one (``include_usage``: the openai SDK's stream
    reads it from the last chunk, and a client that did not ask gets none), then
    ``[DONE]``; and the usage as an event's text, for the metrics."""
    completion = _completion(whole)
    choices = completion["choices"]
    chunk = {key: value for key, value in completion.items() if key != "usage"}
    if completion.get("object") == "chat.completion" or any(
        isinstance(choice, dict) and "message" in choice for choice in choices
    ):
        chunk["object"] = "chat.completion.chunk"
        chunk["choices"] = [_choice_as_delta(choice) for choice in choices if _is_choice(choice)]
    # else a legacy text completion: its chunks have the same shape
    events = encode_sse(chunk)
    usage = completion.get("usage")
    if usage is None:
        return events + SSE_DONE_BYTES, None
    if usage_asked:
        head = {key: chunk[key] for key in _CHUNK_HEAD if key in chunk}
        events += encode_sse({**head, "choices": [], "usage": usage})
    return events + SSE_DONE_BYTES, compact_json({"usage": usage}).decode()


# what every chunk of a stream repeats, its usage chunk too
_CHUNK_HEAD = ("id", "object", "created", "model", "system_fingerprint")


def _asks_usage(stream_options: object) -> bool:
    return isinstance(stream_options, dict) and stream_options.get("include_usage") is True


def _choice_as_delta(choice: dict[str, Any]) -> dict[str, Any]:
    """A completion's choice as a chunk's: its message as the delta, and each tool call
    numbered (a delta's tool calls need their ``index``; a message's have none)."""
    message = choice.get("message")
    if not isinstance(message, dict):  # a choice with a delta already, and message null
        message = choice.get("delta")
    delta = dict(message) if isinstance(message, dict) else {}
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        delta["tool_calls"] = [
            {**call, "index": i} if isinstance(call, dict) else call for i, call in enumerate(calls)
        ]
    out = {key: value for key, value in choice.items() if key != "message"}
    out["delta"] = delta
    return out


def _reached(end: StreamEnd | None) -> None:
    if end is not None:
        end.reached = True


# a blank line after a line end, in every spelling the parser reads (LF, CRLF, CR)
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r")
# what completes an event cut off after its last byte: the blank line (and the line end)
_EVENT_END_FOR = defaultdict(lambda: b"\n\n", {b"\n": b"\n", b"\r": b"\r"})


class _HeldEvent:
    """The start of an event not ended yet, held back (only whole events are relayed).
    Kept as the reads it came in, and each read searched alone for an event's end: an
    event of many reads costs linear time (joining and searching everything held at each
    read cost 50 s of CPU for a 64 MB event)."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def __bool__(self) -> bool:
        return bool(self._parts)

    def whole_events(self, data: bytes, mid_event: bool) -> bytes:
        """What is held and ``data``, up to the end of the last whole event; the rest is
        held. ``mid_event``: whether the stream so far ends inside an event."""
        if not mid_event:
            return self._release(data)
        # an event's end is at most 4 bytes: one may begin in the last bytes held
        tail = self._parts[-1][-3:] if self._parts else b""
        window = tail + data
        ends = [at + len(end) for end in _EVENT_ENDS if (at := window.rfind(end)) >= 0]
        cut = max(ends) - len(tail) if ends else 0
        if cut <= 0:
            self._parts.append(data)
            return b""
        out = self._release(data[:cut])
        if cut < len(data):
            self._parts.append(data[cut:])
        return out

    def completed(self) -> bytes:
        """What is held, ended as an event (the blank line the backend left out)."""
        held = self._release(b"")
        return held + _EVENT_END_FOR[held[-1:]]

    def _release(self, data: bytes) -> bytes:
        if not self._parts:
            return data
        self._parts.append(data)
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def _failed_before_the_first_byte(
    message: str, timed_out: bool, metric: RequestMetrics | None
) -> ProxyError:
    """Nothing was sent yet (``exchange.primed`` waits for the first chunk), so the client
    gets a real status: 504 for a deadline, 502 for anything else the backend did."""
    if metric is not None:
        metric.answered_plainly = True
    if timed_out:
        return UpstreamTimeout(message, code="stream_timeout")
    return ProxyError(message, 502, code="upstream_error")


def ndjson_error(message: str) -> bytes:
    """The line ollama clients raise as ``ResponseError`` mid-stream."""
    return dumps({"error": bounded(message)}) + b"\n"


def in_band_error(
    content_type: str,
    message: str,
    *,
    code: str | None = None,
    responses: bool = False,
    sequence_number: int = 0,
) -> bytes | None:
    """The line that ends a stream of this content type early, in its dialect: what
    ollama clients raise as ``ResponseError``, the openai SDK as ``APIError`` (on a
    Responses API stream, ``responses``, that API's error event, which the openai SDK
    raises on too, numbered ``sequence_number``)."""
    if content_type == NDJSON:
        return ndjson_error(message)
    if content_type == ANTHROPIC_EVENT_STREAM:  # the anthropic SDK raises on its error event
        return anthropic_error_event(message, 503 if code == "service_unavailable" else 500)
    if content_type == EVENT_STREAM:
        if responses:
            return responses_error_event(message, "api_error", code, None, sequence_number)
        return openai_error_event(message, "api_error", code)
    return None


def in_band_failure(
    content_type: str, status: int, body: bytes, *, responses: bool = False
) -> bytes | None:
    """A failure reply (``status``, its JSON body in the caller's dialect) as the event
    that ends a stream of ``content_type`` already started (``STREAM_KEEPALIVE_SECONDS``
    started it before the backend's first event): an error object the SDKs read is kept
    whole (its type and code: a rate limit stays one), re-encoded on one line (on a
    Responses API stream, ``responses``, as that API's error event); any other body
    becomes :func:`in_band_error` of its message."""
    try:
        payload: Any = loads(body)
    except ValueError:
        payload = None
    inner = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        if content_type == ANTHROPIC_EVENT_STREAM and payload.get("type") == "error":
            return b"event: error\ndata: " + compact_json(payload) + b"\n\n"
        if content_type == EVENT_STREAM and responses:
            kind = inner.get("type")
            kind = kind if isinstance(kind, str) and kind else "api_error"
            return responses_error_event(
                inner["message"], kind, inner.get("code"), inner.get("param")
            )
        if content_type == EVENT_STREAM:
            return encode_sse(payload)
    message = upstream_error_message(body, status)
    if content_type == ANTHROPIC_EVENT_STREAM:
        return anthropic_error_event(message, status)
    return in_band_error(content_type, message, responses=responses)


def stream_end_error(content_type: str, end: object, message: str, code: str) -> bytes | None:
    """:func:`in_band_error` for a stream whose reply has ``end`` (a :class:`StreamEnd`,
    which says whether the stream is the Responses API's, and what its relay gave the
    client last: its error event comes next in the numbering)."""
    if not _responses(end):
        return in_band_error(content_type, message, code=code)
    number = next_sequence_number(end.relayed)  # type: ignore[attr-defined]
    return in_band_error(content_type, message, code=code, responses=True, sequence_number=number)


def _responses(end: object) -> bool:
    return isinstance(end, StreamEnd) and end.responses


_SEQUENCE_KEY = b'"sequence_number"'
_SEQUENCE_VALUE = re.compile(rb'"sequence_number"[ \t\r\n]*:[ \t\r\n]*(\d{1,18})')


def next_sequence_number(relayed: bytes) -> int:
    """The ``sequence_number`` after the last one in ``relayed`` (the last chunk of a
    Responses stream given to the client that carries one: whole events, its last event's
    number last), for the proxy's own ``error`` event, so that the numbers keep rising as
    the API's do; 0 when it holds none (nothing relayed yet, a backend that numbers
    nothing). Read once, when the stream is cut: per chunk the relay only tests whether
    the key is there. The key can only be a key there: inside a JSON string its quotes
    are escaped."""
    at = relayed.rfind(_SEQUENCE_KEY)
    found = _SEQUENCE_VALUE.match(relayed, at) if at >= 0 else None
    return int(found.group(1)) + 1 if found else 0


def _stream_broke(
    exc: Exception, metric: RequestMetrics | None, collector: MetricsCollector, settings: Settings
) -> str:
    """Count why a stream stopped before its end; the message for the client."""
    if isinstance(exc, StreamTimeout):
        _set_outcome(metric, "timeout")
        collector.upstream_error("timeout")
        return str(exc)
    collector.upstream_error("protocol")
    if isinstance(exc, _Unfinished | _NotAStream | UntranslatableStream):
        return scrub(str(exc), settings.backend_secrets)
    if isinstance(exc, NestedTooDeeply):
        return f"the backend sent an event {exc}"
    if isinstance(exc, SSETooLarge):  # an event or line past MAX_RESPONSE_BYTES
        return f"the backend's stream could not be relayed: {exc} (MAX_RESPONSE_BYTES)"
    if isinstance(exc, SSEProtocolError):  # not UTF-8, an event that is not JSON
        return f"the backend's stream could not be relayed: {exc}"
    return f"the backend connection broke mid-stream: {type(exc).__name__}"


def _end_written(metric: RequestMetrics | None) -> None:
    """The stream's last line was handed to the server, whose send has returned (the relay
    runs on in the task that sent it): the stream completed if the client's socket took
    the line whole. The send returns normally also when it did not (a client gone, one
    that made no room within CLIENT_WRITE_TIMEOUT, a write the shutdown's grace period
    ended: ``write_cut``); the request's end then counts the stream as its client's
    leaving (cancelled, 499) or the shutdown's cut (error, 503), not as completed. Bytes
    the kernel took are as far as a server can know: they may still never be read."""
    if not write_cut.get():
        _set_outcome(metric, "completed")


def _set_outcome(metric: RequestMetrics | None, outcome: str) -> None:
    if metric is not None and metric.stream_outcome is None:
        metric.stream_outcome = outcome
