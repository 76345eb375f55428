"""Stream state, fed one backend event at a time: what the metrics and the stream's outcome
need (first token, finish, usage, errors), and the Ollama client's lines built from it
(tool calls held until whole, log probabilities, thinking)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring as _encode_str
from typing import Any, Literal

from trioproxy.jsonutil import (
    JSONDict,
    NestedTooDeeply,
    compact_json,
    compact_json_text,
    escape_line_separators,
    loads,
    whole_number,
)
from trioproxy.sse import DEFAULT_MAX_LINE_BYTES

from .answer import (
    FINISHED_WITH_ERROR,
    _done_reason,
    _ollama_tool_calls,
    _refusal,
    _text,
    _thinking,
    choice_logprobs,
    completion_logprobs,
    utc_timestamp,
)
from .chunks import _ContentChunks, _decode_str

# Tool-call fragments are held until the calls are whole (Ollama sends them whole): a
# backend that streams arguments for ever must not grow a worker without bound. The same
# bound as an SSE line or event.
MAX_HELD_TOOL_CALL_BYTES = DEFAULT_MAX_LINE_BYTES
_TOOL_CALL_OVERHEAD = 64  # what a call holds besides its arguments, roughly


class UntranslatableStream(ValueError):
    """The backend's stream cannot be translated further: the relay ends it with an
    error, the backend's fault."""


class StreamTooLarge(UntranslatableStream):
    """A stream asks the translator to hold more than it is willing to."""


@dataclass(slots=True)
class _PendingToolCall:
    id: str | None
    name: str
    arguments: list[str]
    # where the call goes among the others: the backend's index, then the order of starts
    order: tuple[int, int] = (0, 0)
    extra_content: JSONDict | None = None  # Gemini's thought signature rides on it


def _starts_another_call(
    pending: _PendingToolCall, call_id: Any, name: Any, arguments: Any
) -> bool:
    """Whether a delta at an index already in use begins a call of its own: it carries
    another call's id, or a function's name and arguments while the call there has whole
    arguments already (Gemini's layer sends each parallel call whole, all at index 0,
    without ids; a continuation that repeats the name comes before the arguments end)."""
    if call_id and pending.id is not None and call_id != pending.id:
        return True
    if not name or not pending.name:
        return False
    if name != pending.name:
        return True
    return bool(arguments) and _whole_object("".join(pending.arguments))


def _continues_without_index(
    latest: _PendingToolCall, call_id: Any, name: Any, function: JSONDict
) -> bool:
    """Whether a delta without ``index`` (a non-conforming backend: mistral.rs, Gemini's
    layer, some gateways) continues the latest call: it names no call, or only the
    latest one again (its id repeated on every fragment split a call's arguments into
    calls of their own, each empty); a new id or name, or a call already whole, is
    another call (Gemini's parallel calls, each whole)."""
    if not (call_id or name):
        return True
    if call_id and call_id != latest.id:
        return False
    return not _starts_another_call(latest, call_id, name, function.get("arguments"))


def _whole_object(arguments: str) -> bool:
    if not arguments.rstrip().endswith("}"):
        return False  # the common case, without decoding
    try:
        return isinstance(loads(arguments), dict)
    except ValueError:
        return False


def _delta_of(choice: JSONDict) -> JSONDict:
    """A stream chunk's choice's output: its ``delta``, a whole ``message`` (a backend's
    JSON answer as a chunk), or its ``text`` (a legacy /v1/completions chunk carries its
    text on the choice itself)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta
    message = choice.get("message")
    return message if isinstance(message, dict) else {"content": choice.get("text")}


def _has_output(delta: JSONDict) -> bool:
    """Whether a choice's delta carries output (a token): what ``_observe`` counts."""
    return bool(
        _text(delta.get("content"))
        or _refusal(delta)
        or _thinking(delta)
        or (isinstance(delta.get("tool_calls"), list) and delta["tool_calls"])
        or _other_output(delta)
    )


def _other_output(delta: JSONDict) -> bool:
    """Output besides text and tool calls: a legacy ``functions`` call, or audio
    (gpt-4o-audio streams its transcript and data there). Without it such a stream never
    had its first token, and the first-token deadline cut it however fast it flowed."""
    return bool(delta.get("function_call") or delta.get("audio"))


def _legacy_call(delta: JSONDict) -> list[JSONDict]:
    """A legacy ``function_call`` fragment (the single call of OpenAI's ``functions``, which
    some backends still answer tools with) as the fragment of a tool call at index 0: a
    streamed answer holds the call as a non-stream one does (_message_tool_calls), where
    it was dropped, and the client got an empty answer."""
    function = delta.get("function_call")
    return [{"index": 0, "function": function}] if isinstance(function, dict) else []


class _StreamStats:
    """What both stream consumers track for metrics: token timing, chunk counts, usage."""

    # whether a body that ends without the stream's last event is a broken stream
    must_end = True
    # A stream of several choices (``n``; OpenAIStreamObserver.expect_choices): the indices
    # finished so far. None for one choice, the rule: then ``finish_reason`` alone says it
    # ended. Class defaults: two more attributes on every instance took an
    # OllamaStreamTranslator to 30, and its general per-chunk path ~130 ns slower (see its
    # __init__), for a count only a /v1 passthrough stream ever needs.
    _choices = 1
    _finished_choices: set[int] | None = None

    def __init__(self, start_ns: int = 0) -> None:
        self.start_ns = start_ns
        self.first_token_ns: int | None = None
        self.last_token_ns: int | None = None
        self.content_chunks = 0
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None
        # the stream's own account of itself, for the relay: work came out (the deadline
        # for a first token no longer applies), the last event is out, the backend failed
        self.progressed = False
        self.ended = False
        self.failed = False
        self.error: object = None  # what the backend said when it failed, if anything
        # an event that is no JSON at all: the openai SDK fails on it, so a stream relayed
        # as it came is broken there, whatever else the backend sends
        self.malformed = False
        self._shapes = _ContentChunks()

    @property
    def open_choices(self) -> int:
        """How many of the choices asked for have no ``finish_reason`` yet (0 or 1 for a
        stream of one choice)."""
        if self._finished_choices is None:
            return 0 if self.finish_reason is not None else 1
        return self._choices - len(self._finished_choices)

    @property
    def usage_seen(self) -> bool:
        return self.completion_tokens is not None or self.prompt_tokens is not None

    def _event(self, data: str) -> JSONDict | None:
        """:func:`parse_chunk`, noting an event that is no JSON (``malformed``). A ``[DONE]``
        with something after it is not one: the openai SDK ends a stream at any data that
        starts so."""
        try:
            chunk = loads(data)
        except NestedTooDeeply:
            return None
        except ValueError:
            if not data.startswith("[DONE]"):
                self.malformed = True
            return None
        return chunk if isinstance(chunk, dict) else None

    def _observe(self, chunk: JSONDict, now_ns: int) -> tuple[str, str, list[Any], JSONDict]:
        """Record one chunk; return (content, thinking, tool-call deltas, choice)."""
        # Some backends repeat (cumulative) usage on every chunk: the latest wins. Groq's
        # streams carry theirs as x_groq.usage (also when asked for include_usage)
        usage = chunk.get("usage")
        if usage is None and "x_groq" in chunk:
            usage = _groq_usage(chunk)
        self._take_usage(usage, "prompt_tokens", "completion_tokens")
        if chunk.get("error"):
            # an error event in the stream: the backend gave up (OpenRouter's carries
            # choices too, with finish_reason "error")
            self._fail(chunk["error"])
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return "", "", [], {}
        choice = choices[0]
        delta = choice.get("delta")
        if not isinstance(delta, dict):  # inline (the hot path) what _delta_of does
            message = choice.get("message")
            # a legacy /v1/completions chunk carries its text on the choice itself
            delta = message if isinstance(message, dict) else {"content": choice.get("text")}
        content = _text(delta.get("content")) + _refusal(delta)
        thinking = _thinking(delta)
        calls = delta.get("tool_calls")
        calls = calls if isinstance(calls, list) else []
        if content or thinking or calls:
            self._count_token(now_ns)
        elif _other_output(delta):  # looked for only in a chunk without text or tool calls
            self._count_token(now_ns)
            calls = _legacy_call(delta)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self._finish_reason_came(finish)
        return content, thinking, calls, choice

    def _finish_reason_came(self, finish: str) -> None:
        """A choice's ``finish_reason`` came."""
        self.finish_reason = finish
        if finish == "error":
            self._fail(FINISHED_WITH_ERROR)

    def _fail(self, error: object) -> None:
        if not self.failed:  # the first account of the failure is the one that explains it
            self.failed = True
            self.error = error

    def _take_usage(self, usage: object, input_key: str, output_key: str) -> None:
        if isinstance(usage, dict):
            if (prompt := whole_number(usage.get(input_key))) is not None:
                self.prompt_tokens = prompt
            if (completion := whole_number(usage.get(output_key))) is not None:
                self.completion_tokens = completion

    def _count_token(self, now_ns: int) -> None:
        # A "content-bearing" chunk: text, reasoning, a tool-call fragment, other output.
        # Backends send about one token per chunk, so this count stands in for eval_count
        # without usage.
        self.content_chunks += 1
        if self.first_token_ns is None:
            self.first_token_ns = now_ns
            self.progressed = True
        self.last_token_ns = now_ns


def _groq_usage(chunk: JSONDict) -> object:
    extra = chunk["x_groq"]
    return extra.get("usage") if isinstance(extra, dict) else None


class OpenAIStreamObserver(_StreamStats):
    """Watches a ``/v1`` stream being relayed verbatim, for metrics only.

    Exposes ``first_token_ns``, ``last_token_ns``, ``content_chunks``, ``prompt_tokens``,
    ``completion_tokens``, ``usage_seen`` and ``finish_reason``.
    """

    def __init__(self, start_ns: int = 0) -> None:
        super().__init__(start_ns)
        # on the instance, where the per-chunk check finds it fastest (see _StreamStats)
        self._finished_choices = None

    def expect_choices(self, n: int) -> None:
        """The request asked for ``n`` choices (``n`` > 1): the stream is whole only once
        each of them has its ``finish_reason`` (or ``[DONE]`` came)."""
        self._choices = n
        self._finished_choices = set()

    def feed(self, chunk: JSONDict, now_ns: int) -> None:
        self._observe(chunk, now_ns)
        if self._finished_choices is not None:
            self._observe_choices(chunk, now_ns)

    def feed_text(self, data: str, now_ns: int) -> None:
        """``feed`` for one event's text, with the same results; a content-only chunk (most
        of a stream) is recognised without decoding it, anything else is decoded in full."""
        literal = self._shapes.content(data)
        if literal is None:
            chunk = self._event(data)
            if chunk is not None:
                self._observe(chunk, now_ns)
                if self._finished_choices is not None:
                    self._observe_choices(chunk, now_ns)
        elif literal != '""':
            self._count_token(now_ns)

    def feed_decoded(self, data: str, now_ns: int) -> None:
        """:meth:`feed_text` decoding ``data`` whatever its shape, for a large event (the
        relay's, in a JSON thread): there the content-only shortcut's regular expression
        costs more than the decoding (30 MB of text: ~90 ms, one call holding the GIL)."""
        chunk = self._event(data)
        if chunk is not None:
            self.feed(chunk, now_ns)

    def count_lone_token(self, data: bytes, clock: Callable[[], int]) -> bool:
        """:meth:`feed_text` for the relay's common read, at the bytes: whether ``data`` is
        one whole ``data:`` event (the caller knows the stream so far ends between events)
        whose chunk is content-only, with text, after the first token; then it is counted
        as ``feed_text`` counts it, at ``clock()``. False for anything else, not fed: the
        caller reads it as before. The same results as reading the event and feeding its
        text (tests/test_protocol_properties), without the framing checks, the decoding
        and the general relay's checks after (nothing but a token's count can change)."""
        if self.first_token_ns is None or self._shapes.lone_text(data) is None:
            return False
        self.content_chunks += 1  # what _count_token does once the first token is known
        self.last_token_ns = clock()
        return True

    def _observe_choices(self, chunk: JSONDict, now_ns: int) -> None:
        """A chunk of a stream that asked for several choices, after ``_observe`` took its
        first: each choice's ``finish_reason`` ends that choice, and each choice after the
        first with output is a token (NVIDIA Dynamo sends all ``n`` choices in one chunk)."""
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            if position and _has_output(_delta_of(choice)):
                self._count_token(now_ns)
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish:
                if position:  # the first one's, _observe took
                    self._finish_reason_came(finish)
                self._choice_finished(choice.get("index"), position)

    def _choice_finished(self, index: object, position: int) -> None:
        """A choice's ``finish_reason`` came (``position``: its place in its chunk, the
        index of a backend that numbers none)."""
        number = index if type(index) is int else position
        if self._finished_choices is not None and 0 <= number < self._choices:
            self._finished_choices.add(number)  # bounded: at most n indices are kept


class ResponsesStreamObserver(_StreamStats):
    """Watches a ``/v1/responses`` stream (OpenAI's Responses API) being relayed verbatim:
    every ``*.delta`` event with content is a token (text, refusal, reasoning, tool-call
    arguments); a finished output item (a hosted web search, a tool call) is progress even
    before any token; the closing ``response.completed`` (or ``.incomplete`` / ``.failed``)
    event carries ``usage`` and the status, and is the stream's last (there is no
    ``[DONE]``); ``response.failed`` and ``error`` events mean the backend failed."""

    _TEXT_DELTA = '{"type":"response.output_text.delta"'
    finish_reason: str | None  # as _StreamStats declares it (``_finish`` sets a str)
    response_id: str | None = None  # from the event that opens the stream
    response_model: str | None = None  # the same

    def feed_text(self, data: str, now_ns: int) -> None:
        # OpenAI writes "type" first: a text delta (most of a stream) needs no decoding
        if data.startswith(self._TEXT_DELTA) and '"delta":""' not in data:
            self._count_token(now_ns)
            return
        event = self._event(data)
        if event is not None:
            self.feed(event, now_ns)

    def feed(self, event: JSONDict, now_ns: int) -> None:
        kind = event.get("type")
        if not isinstance(kind, str):
            return
        if kind.endswith(".delta"):
            if event.get("delta") and kind not in _NOT_TOKENS:
                self._count_token(now_ns)
        elif kind == "response.output_item.done":
            self.progressed = True
        elif kind in _RESPONSE_ENDS:
            self.ended = True
            self.failed = kind == "response.failed"
            if self.failed:
                response = event.get("response")
                self.error = response.get("error") if isinstance(response, dict) else None
            self._finish(event.get("response"))
        elif kind == "error":
            self.ended = self.failed = True
            self.error = event.get("error") or event  # {"type": "error", "code", "message"}
        elif kind == "response.created":
            self._identify(event.get("response"))

    def _identify(self, response: object) -> None:
        """The response's id and model, from the first event that names them: the opening
        ``response.created``, else the closing event (a stream resumed with
        ``starting_after`` replays no ``response.created``; the tokens it settles go under
        the model its closing event names)."""
        if not isinstance(response, dict):
            return
        if self.response_id is None and isinstance(response.get("id"), str):
            self.response_id = response["id"]
        if self.response_model is None and isinstance(response.get("model"), str):
            self.response_model = response["model"]

    def _finish(self, response: object) -> None:
        if not isinstance(response, dict):
            return
        self._identify(response)
        self._take_usage(response.get("usage"), "input_tokens", "output_tokens")
        status = response.get("status")
        if isinstance(status, str) and status:
            self.finish_reason = status


class ReplayedResponsesObserver(ResponsesStreamObserver):
    """Watches a resumed Responses stream (``GET /v1/responses/{id}?stream=true``): the
    backend replays the events of a response whose creating request counted it. Its end,
    failures and progress are watched as for a live stream, but its deltas are not counted
    again, nor is a replayed delta a time to first token, nor its usage: the closing
    event's ``usage`` is only kept (``final_usage``), for the route to settle with the
    ledger once the stream is over (the part still owed counts: a background response, a
    stream cut before its end). Settling may be a file's rename (the workers' shared
    ledger): I/O, done by the route, never here."""

    final_usage: object = None  # the closing event's, as it came (a class default)

    def __init__(self) -> None:
        super().__init__()
        self._replayed = False

    # read-only here (the relay only reads it), a class attribute in _StreamStats
    @property
    def must_end(self) -> bool:  # type: ignore[override]
        """A replay that began before the response's last event must reach it: a body
        that ends after some events but without the closing one is cut (the client must
        not take half a response for the whole). One with no event at all began after
        the last event there is (``starting_after`` the closing one), and is whole."""
        return self._replayed

    def feed_text(self, data: str, now_ns: int) -> None:
        self._replayed = True
        super().feed_text(data, now_ns)

    def _count_token(self, now_ns: int) -> None:
        self.progressed = True

    def _take_usage(self, usage: object, input_key: str, output_key: str) -> None:
        if self.final_usage is None:  # the first closing event's: the relay stops at it
            self.final_usage = usage


_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# audio bytes, not tokens: the speech's tokens are counted by its transcript's deltas
_NOT_TOKENS = frozenset({"response.audio.delta"})


# A chunk's log probabilities ride on the line it writes; those of a chunk that writes
# none (a tool call's fragment, a role or finish chunk) on the next line. Past this many
# held, they go out on a line of their own (content ""), so a backend that streams tool
# calls with log probabilities does not grow a worker without bound.
MAX_HELD_LOGPROBS = 1024


def _ends_in_high_surrogate(text: str) -> bool:
    return "\ud800" <= text[-1:] <= "\udbff"


def _paired(text: str) -> str:
    """``text`` with each surrogate pair as the one character it spells ("\\ud83d" and
    "\\ude00" decoded apart stay two code points in a str); lone halves are kept."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def _tell_nothing() -> None:
    pass


class _HeldToolCalls(_StreamStats):
    """A stream translator that holds the backend's tool calls until they are whole, as
    Ollama sends a call (the Ollama translator; the Anthropic one, ``anthropic``): the
    pieces each call's deltas bring, bounded by MAX_HELD_TOOL_CALL_BYTES, taken whole by
    ``_take_tool_calls``."""

    def __init__(
        self, start_ns: int, on_tool_calls: Callable[[list[JSONDict]], None] | None = None
    ) -> None:
        super().__init__(start_ns)
        self._on_tool_calls = on_tool_calls
        # calls in the order they started; where each backend index is being written
        self._tool_calls: list[_PendingToolCall] = []
        self._slot_of_index: dict[int, int] = {}
        self._tool_call_bytes = 0  # held until the calls are whole: bounded

    def _accumulate(self, delta: JSONDict) -> int:
        """Take one tool-call delta; the slot of the call it belongs to (its place in
        ``_tool_calls``)."""
        index = delta.get("index")
        function = f if isinstance(f := delta.get("function"), dict) else {}
        call_id = delta.get("id")
        name = function.get("name")
        calls = self._tool_calls
        slot: int | None
        if isinstance(index, int):
            slot = self._slot_of_index.get(index)
            arguments = function.get("arguments")
            if slot is not None and _starts_another_call(calls[slot], call_id, name, arguments):
                # Parallel calls that all say index 0, told apart by their ids (Ollama's
                # own /v1, SGLang, Gemini's OpenAI layer): a new id is a new call.
                slot = None
        elif calls and _continues_without_index(calls[-1], call_id, name, function):
            slot = len(calls) - 1
        else:
            slot = None
        if slot is None:
            slot = len(calls)
            position = index if isinstance(index, int) else slot
            calls.append(_PendingToolCall(None, "", [], (position, slot)))
            self._hold(_TOOL_CALL_OVERHEAD)
            if isinstance(index, int):
                self._slot_of_index[index] = slot
        pending = calls[slot]
        if call_id and pending.id is None:
            pending.id = call_id
        if name and not pending.name:
            pending.name = name
        extra = delta.get("extra_content")
        if isinstance(extra, dict) and pending.extra_content is None:
            pending.extra_content = extra
        args = function.get("arguments")
        if isinstance(args, dict):
            # too deep to write (NestedTooDeeply): the relay ends the stream, the backend's fault
            args = compact_json_text(args)
        if isinstance(args, str):
            self._hold(len(args))
            pending.arguments.append(args)
        return slot

    def _hold(self, size: int) -> None:
        self._tool_call_bytes += size
        if self._tool_call_bytes > MAX_HELD_TOOL_CALL_BYTES:
            raise StreamTooLarge(
                f"the backend's tool calls exceed {MAX_HELD_TOOL_CALL_BYTES} bytes before they "
                "end (a backend that never finishes them?)"
            )

    def tool_calls_told_later(self) -> Callable[[], None]:
        """Until the function returned is called, whole calls are kept instead of told to
        ``on_tool_calls``, which changes what the app holds (a feed in a JSON thread must
        not): called, on the loop, it tells them, in order, and tells at once again."""
        tell = self._on_tool_calls
        if tell is None:
            return _tell_nothing
        kept: list[list[JSONDict]] = []
        self._on_tool_calls = kept.append

        def told() -> None:
            self._on_tool_calls = tell
            for calls in kept:
                tell(calls)

        return told

    def _take_tool_calls(self) -> list[JSONDict]:
        calls = [
            {
                "id": p.id,
                "function": {"name": p.name, "arguments": "".join(p.arguments)},
                "extra_content": p.extra_content,
            }
            for p in sorted(self._tool_calls, key=lambda p: p.order)
        ]
        if self._on_tool_calls is not None:
            self._on_tool_calls(calls)
        self._drop_tool_calls()
        return _ollama_tool_calls(calls)

    def _drop_tool_calls(self) -> None:
        self._tool_calls = []
        self._slot_of_index = {}
        self._tool_call_bytes = 0


class OllamaStreamTranslator(_HeldToolCalls):
    """OpenAI ``chat.completion.chunk`` dicts in, Ollama NDJSON objects out.

    ``feed`` returns the lines to emit now (often none: role-only and usage-only chunks produce
    no output). ``finish`` returns the single ``done: true`` line and may be called once.

    Tool-call fragments are accumulated per ``index`` and emitted when ``finish_reason``
    arrives, one line per call (in Ollama's order, its ``function.index`` counting them). If
    the stream ends without a finish_reason, pending calls ride on the final line's
    ``message.tool_calls`` (chat) / ``tool_calls`` (generate), so ``finish`` can still
    return exactly one object.

    With ``logprobs`` (the client asked), each chunk's ``logprobs.content`` (then
    ``.refusal``) goes out as the line's ``logprobs``, in order, each entry once (see
    MAX_HELD_LOGPROBS); those of reasoning hidden by ``think: false`` are hidden with it.

    A text that ends in the first half of a surrogate pair (a backend that cuts text by
    UTF-16 units sends an emoji as ``"\\ud83d"`` in one chunk, ``"\\ude00"`` in the next)
    keeps that half until the next piece of the same text, so each line holds whole
    characters (ollama-python reads each line on its own); the final line flushes it.

    Times are monotonic ns from the same clock as ``start_ns``; ``created_at`` is called for
    each line's wall-clock stamp.
    """

    # a generate's done line has ``context`` (a class attribute: instances keep < 30)
    done_context = True

    def __init__(
        self,
        kind: Literal["chat", "generate"],
        model: str,
        *,
        start_ns: int,
        created_at: Callable[[], object] = utc_timestamp,
        show_thinking: bool = True,
        on_tool_calls: Callable[[list[JSONDict]], None] | None = None,
        logprobs: bool = False,
    ) -> None:
        if kind not in ("chat", "generate"):
            raise ValueError(f"kind must be 'chat' or 'generate', not {kind!r}")
        # on_tool_calls: told the whole calls as the backend wrote them
        # (signatures.ThoughtSignatures)
        super().__init__(start_ns, on_tool_calls)
        self.kind = kind
        self.model = model
        # think: false hides the reasoning; its chunks are still tokens the backend made
        self._show_thinking = show_thinking
        self._created_at = created_at
        self._finished = False
        # Three attributes for what follows, no more: past 30 an instance's attributes
        # are no longer stored the fast way (CPython's shared keys), and every chunk's
        # attribute reads got slower, ~100 ns on the general path.
        # Log probabilities held for the next line (MAX_HELD_LOGPROBS); None: not asked
        self._held_logprobs: list[JSONDict] | None = [] if logprobs else None
        # the first half of a surrogate pair, until its second comes: content's, thinking's
        self._halves = ("", "")
        # finished, or something held for the next line: feed and feed_text check this one
        # attribute (they checked _finished alone before), so ordinary chunks pay nothing
        self._unusual = False
        # A content line as text around its timestamp and content, for feed_text. The dict
        # _line builds is encoded member by member with this same string encoder, so the bytes
        # are the same.
        self._text_head = '{"model":' + _encode_str(model) + ',"created_at":'
        self._text_middle = (
            ',"message":{"role":"assistant","content":' if kind == "chat" else ',"response":'
        )
        self._text_tail = '},"done":false}' if kind == "chat" else ',"done":false}'

    def _take_indexed_calls(self) -> list[JSONDict]:
        """The held calls, each saying its ``function.index`` as ``index`` beside its ``id``
        too, where OpenAI's chunks have it. Ollama's lines have no such member and its
        clients ignore it; LiteLLM's ollama_chat numbers a line's calls from 0 without it,
        so parallel calls on lines of their own all read as call 0 and ran together."""
        calls = self._take_tool_calls()
        for call in calls:
            call["index"] = call["function"]["index"]
        return calls

    # -- public API -----------------------------------------------------------------------

    def feed(self, chunk: JSONDict, now_ns: int) -> list[JSONDict]:
        if self._unusual and self._finished:
            raise RuntimeError("feed() after finish()")
        content, thinking, calls, choice = self._observe(chunk, now_ns)
        if thinking and not self._show_thinking:
            # a chunk of hidden reasoning alone: its log probabilities spell it, hidden too
            hidden = not content and not calls
            thinking = ""
        else:
            hidden = False
        # nothing held, and no text ending in the first half of a pair: as it came. Half a
        # pair is never ASCII (isascii is O(1)); other text is looked at by its last
        # character only, inline (the call for every non-ASCII chunk cost ~300 ns each)
        if self._unusual or (
            not (content.isascii() and thinking.isascii())
            and (
                (content and "\ud800" <= content[-1] <= "\udbff")
                or (thinking and "\ud800" <= thinking[-1] <= "\udbff")
            )
        ):
            content, thinking = self._whole_characters(content, thinking)
        lines: list[JSONDict] = []
        if content or thinking:
            lines.append(self._line(content, thinking))
        for delta in calls:
            if isinstance(delta, dict):
                self._accumulate(delta)
        finish = choice.get("finish_reason") if choice else None
        if finish and self._tool_calls:
            # one line per call, as Ollama writes each call once it is whole: Haystack's
            # streaming reader takes a line's calls for one call (names and arguments mixed)
            lines.extend(self._line("", "", [call]) for call in self._take_indexed_calls())
        if self._held_logprobs is not None:
            self._place_logprobs(lines, [] if hidden or not choice else choice_logprobs(choice))
        return lines

    def feed_text(self, data: str, now_ns: int) -> bytes | None:
        """``feed`` for one event's text when it is a content-only chunk: its line already
        encoded as ``compact_json`` would (``b""`` when it has none). ``None`` for any other
        event, which the caller decodes and passes to ``feed``."""
        if self._unusual:
            if self._finished:
                raise RuntimeError("feed() after finish()")
            return None  # something held for the next line: feed() attaches it
        literal = self._shapes.content(data)
        if literal is None:
            return None
        if literal == '""':
            return b""
        self._count_token(now_ns)
        return self._literal_line(literal)

    def lone_line(self, data: bytes, clock: Callable[[], int]) -> bytes | None:
        """:meth:`feed_text` for the relay's common read, at the bytes: the line of
        ``data`` when it is one whole ``data:`` event (the caller knows the stream so far
        ends between events) whose chunk is content-only, with text, after the first
        token, counted as ``feed_text`` counts it (at ``clock()``); None for anything
        else, not fed: the caller reads it as before (tests/test_protocol_properties)."""
        if self._unusual or self.first_token_ns is None:
            return None
        body = self._shapes.lone_text(data)
        if body is None:
            return None
        self.content_chunks += 1  # what _count_token does once the first token is known
        self.last_token_ns = clock()
        return self._literal_line(f'"{body}"')

    def _literal_line(self, literal: str) -> bytes:
        """The line of a content-only chunk, from its content's JSON string literal. One
        without escapes is what _encode_str writes for its text, character for character
        (it escapes nothing a literal holds raw: no quote, backslash or control
        character), so it is written as it came, not decoded and encoded again."""
        if "\\" in literal:
            literal = _encode_str(_decode_str(literal))
        created_at = self._created_at()
        if isinstance(created_at, str):  # only a str is encoded like _encode_str does
            text = (
                self._text_head
                + _encode_str(created_at)
                + self._text_middle
                + literal
                + self._text_tail
            )
            try:
                return escape_line_separators(text.encode())
            except UnicodeEncodeError:  # half a surrogate pair (an emoji cut in two)
                pass
        return self._unusual_line(_decode_str(literal), created_at)

    def finish(self, now_ns: int) -> JSONDict:
        if self._finished:
            raise RuntimeError("finish() called twice: a stream has exactly one done line")
        self._finished = self._unusual = True
        # what was held for a next line that never came: the first half of a pair alone
        # (written as its escape), log probabilities
        line = self._line(*self._halves, self._take_indexed_calls() if self._tool_calls else None)
        if self._held_logprobs:
            line["logprobs"] = self._held_logprobs
            self._held_logprobs = []
        first = self.first_token_ns if self.first_token_ns is not None else now_ns
        last = self.last_token_ns if self.last_token_ns is not None else first
        eval_count = (
            self.completion_tokens if self.completion_tokens is not None else self.content_chunks
        )
        prompt_ns, eval_ns = max(0, int(first - self.start_ns)), max(0, int(last - first))
        if eval_count and not eval_ns:
            # the tokens came at once (a backend that does not stream, a tool call alone):
            # the wait holds the generation too, as in a non-stream answer, whose whole wait
            # is eval_duration; so no client divides eval_count by a zero duration
            prompt_ns, eval_ns = 0, prompt_ns
        line.update(
            done=True,
            done_reason=_done_reason(self.finish_reason),
            total_duration=max(0, int(now_ns - self.start_ns)),
            load_duration=0,
            prompt_eval_count=self.prompt_tokens or 0,
            prompt_eval_duration=prompt_ns,
            eval_count=eval_count,
            eval_duration=eval_ns,
        )
        if self.kind == "generate" and self.done_context:
            line["context"] = []  # see openai_chat_to_ollama_generate
        return line

    @staticmethod
    def error_line(message: str) -> JSONDict:
        """The in-band error line ollama clients raise as ``ResponseError`` mid-stream."""
        return {"error": message}

    @property
    def finished(self) -> bool:
        return self._finished

    # -- internals ------------------------------------------------------------------------

    def _unusual_line(self, content: str, created_at: object) -> bytes:
        """A content-only chunk's line the fast way could not write: text with half a
        surrogate pair (escaped, and a trailing first half held for the next piece), or a
        stamp that is no str. The line's own time: the clock is not read twice for a line,
        and a time read for a line held back whole is the next line's."""
        if _ends_in_high_surrogate(content):
            self._halves, content = (content[-1], ""), content[:-1]
            self._unusual = True
            if not content:
                self._stamp_next_line(created_at)
                return b""
        return compact_json(self._line(content, "", created_at=created_at))

    def _stamp_next_line(self, stamp: object) -> None:
        clock = self._created_at

        def once() -> object:
            self._created_at = clock
            return stamp

        self._created_at = once

    def _whole_characters(self, content: str, thinking: str) -> tuple[str, str]:
        """``content`` and ``thinking`` after what was held of each, less a trailing first
        half of a surrogate pair, held for the next piece of the same text."""
        content_half, thinking_half = self._halves
        if content_half:
            content = _paired(content_half + content)
        if thinking_half:
            thinking = _paired(thinking_half + thinking)
        content_half = thinking_half = ""
        if _ends_in_high_surrogate(content):
            content_half, content = content[-1], content[:-1]
        if _ends_in_high_surrogate(thinking):
            thinking_half, thinking = thinking[-1], thinking[:-1]
        self._halves = (content_half, thinking_half)
        self._note_held()
        return content, thinking

    def _place_logprobs(self, lines: list[JSONDict], entries: list[JSONDict]) -> None:
        """``entries`` (after any held) on the first of ``lines``; held when there is none,
        up to MAX_HELD_LOGPROBS, past which they go out on a line of their own."""
        held = self._held_logprobs
        if held:  # a list: only called when the client asked
            held.extend(entries)
            entries = held
        elif not entries:
            return
        if lines or len(entries) > MAX_HELD_LOGPROBS:
            if not lines:
                lines.append(self._line("", ""))
            lines[0]["logprobs"] = entries
            entries = []
        self._held_logprobs = entries
        self._note_held()

    def _note_held(self) -> None:
        self._unusual = bool(self._finished or any(self._halves) or self._held_logprobs)

    def _line(
        self,
        content: str,
        thinking: str,
        tool_calls: list[JSONDict] | None = None,
        created_at: Any = None,
    ) -> JSONDict:
        if created_at is None:
            created_at = self._created_at()
        line: JSONDict = {"model": self.model, "created_at": created_at}
        if self.kind == "chat":
            message: JSONDict = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            line["message"] = message
        else:
            line["response"] = content
            if thinking:
                line["thinking"] = thinking
            if tool_calls:
                line["tool_calls"] = tool_calls
        line["done"] = False
        return line


class OllamaCompletionStreamTranslator(OllamaStreamTranslator):
    """Legacy text completion chunks (``choices[0].text``) in, ``/api/generate`` NDJSON out.

    The chat translator already reads a choice without a delta by its ``text``; this one
    adds the text completion's log probabilities (another shape, see
    :func:`completion_logprobs`) and never tries the chat chunk shortcut of ``feed_text``,
    which a text chunk never matches. The chat translator's own path is left as it is.
    """

    done_context = False  # Ollama's raw mode sends no context

    def __init__(
        self,
        model: str,
        *,
        start_ns: int,
        created_at: Callable[[], object] = utc_timestamp,
        top_logprobs: int | None = None,
    ) -> None:
        super().__init__(
            "generate",
            model,
            start_ns=start_ns,
            created_at=created_at,
            logprobs=top_logprobs is not None,
        )
        self._top_logprobs = top_logprobs or 0

    def feed_text(self, data: str, now_ns: int) -> bytes | None:
        return None  # decoded and passed to feed (so lone_line never knows a chunk's shape)

    def feed(self, chunk: JSONDict, now_ns: int) -> list[JSONDict]:
        if self._held_logprobs is not None:
            chunk = self._with_chat_logprobs(chunk)
        return super().feed(chunk, now_ns)

    def _with_chat_logprobs(self, chunk: JSONDict) -> JSONDict:
        """``chunk`` with its first choice's log probabilities in the chat shape (a new
        dict: the backend's is not changed)."""
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return chunk
        choice = choices[0]
        entries = completion_logprobs(choice, self._top_logprobs)
        choice = {**choice, "logprobs": {"content": entries}}
        return {**chunk, "choices": [choice, *choices[1:]]}
