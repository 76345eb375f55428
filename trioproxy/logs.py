"""Logging: every line about a request carries its request id; secrets never get out.

The request id lives in a context variable set once per request by the connection
adapter, so every log call made while serving it (handlers, relay, upstream) sees it.
hypercorn's own lines (logger ``hypercorn.error``) and the program's notices on stderr
come out in the same format, so ``LOG_FORMAT=json`` means every line is JSON. A line
repeated within ``LOG_REPEAT_WINDOW_SECONDS`` is written once, and then how many times it
came (:class:`RepeatedLines`): a backend down at hundreds of requests a second is a line
per window, not hundreds a second.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, TextIO

from .metrics.labels import MESSAGE_LIMIT, clipped, loggable_text, scrubbed_head

REMOTE_ADDR_FIELD = "remote_addr"
"""An access line's client address (``extra=``), a field of its own in JSON lines."""

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def fresh_request_id() -> str:
    """A new request id, of the form ``exchange.new_state`` gives a request that brought
    none (uuid4's entropy in hex): for the answers given before any request state exists
    (a refusal by the server, a connection past MAX_CONNECTIONS). The hot path inlines it."""
    return os.urandom(16).hex()


# whole, so none ends in a line end ("$" matches before a final "\n"): it is written on
# every log line of its request and sent back as a header
REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_for(sent: str | None) -> str:
    """The id of a request that sent ``sent`` as its X-Request-ID: that one if it is fit
    for a log line and a header, else a fresh one (as ``exchange.new_state``, which
    inlines it)."""
    if sent and REQUEST_ID_OK.fullmatch(sent):
        return sent
    return fresh_request_id()


def scope_request_id(scope: Any) -> str:
    """:func:`request_id_for` the first X-Request-ID header of an ASGI scope (as the app's
    routes read it), for an answer given outside the app's handling of the request."""
    for key, value in scope.get("headers", ()):
        if key.lower() == b"x-request-id":
            return request_id_for(bytes(value).decode("latin-1"))
    return fresh_request_id()


# the characters of a message scrubbed, escaped or measured whole: a longer one is cut
# first (the line shows MESSAGE_LIMIT bytes of it), with the note of a cut
_SCRUBBED_WHOLE = 8 * MESSAGE_LIMIT


class RequestContextFilter(logging.Filter):
    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s and len(s) >= 4)
        self._encoded = percent_spellings(self._secrets) if self._secrets else None
        # the most characters a secret's spelling takes: a character's UTF-8 bytes, each
        # as %25XX (the percent spellings), at most 20
        self._margin = 20 * max(map(len, self._secrets), default=0)

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        if self._secrets:
            message = record.getMessage()
            # a long message (a backend's error of MBs) cut before it is scrubbed: the
            # line shows MESSAGE_LIMIT bytes of it, and scrubbing it whole, and then
            # escaping it, held the loop 50-450 ms per 10 MB
            cleaned = scrubbed_head(message, self._scrubbed, self._margin, _SCRUBBED_WHOLE)
            if cleaned != message:
                record.msg, record.args = cleaned, None
            if record.exc_info and record.exc_text is None:
                # a traceback is log lines too, and an exception's text may quote what it
                # was given (a backend's answer, a URL): formatted here, once, scrubbed
                record.exc_text = self._scrubbed(_PLAIN.formatException(record.exc_info))
        return True

    def _scrubbed(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        if self._encoded is not None and "%" in text:
            # a path a client sent, as an access line writes it: a secret in it may be
            # percent-encoded, and a "%" is written as "%25" (so "%2D" as "%252D")
            text = self._encoded.sub("***", text)
        return text


@functools.lru_cache(maxsize=8)
def percent_spellings(secrets: tuple[str, ...]) -> re.Pattern[str]:
    """Every spelling of ``secrets`` in a URL path: each character as itself or as its
    ``%XX`` (hex in either case), and that ``%`` as ``%25`` again, mixed anyhow (a client
    may encode any character, and an access line writes a path kept as sent with its
    ``%`` encoded). Longest first, as the plain ones are replaced. Built once per
    secrets (a notice builds its filter each time)."""
    return re.compile("|".join(_percent_source(s) for s in sorted(secrets, key=len, reverse=True)))


def _percent_source(secret: str) -> str:
    return "".join(f"(?:{'|'.join(_percent_forms(char))})" for char in secret)


def _percent_forms(char: str) -> list[str]:
    hexes = [f"{byte:02x}" for byte in char.encode("utf-8", "surrogatepass")]
    # either case: "%2d" and "%2D" decode alike
    either = "".join(f"%(?:25)?{_either_case(h[0])}{_either_case(h[1])}" for h in hexes)
    return [either, re.escape(char)]


def _either_case(digit: str) -> str:
    return f"[{digit}{digit.upper()}]" if digit.isalpha() else digit


_PLAIN = logging.Formatter()  # formats a traceback as every formatter here does


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": _json_message(record.getMessage()),
            "request_id": getattr(record, "request_id", "-"),
        }
        address = getattr(record, REMOTE_ADDR_FIELD, None)
        if address is not None:  # an access line's: the client's address, to filter by
            entry[REMOTE_ADDR_FIELD] = address
        repeats = getattr(record, REPEATS_FIELD, None)
        if repeats is not None:  # it stands for lines not written: how many, to sum them
            entry["message"] += _repeats_note(*repeats)
            entry[SUPPRESSED_FIELD] = repeats[0]
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _json_message(message: str) -> str:
    """``message`` cut as a text line's is, to ``MESSAGE_LIMIT`` bytes as JSON writes it: a
    control character takes 6 there (``\\u001b``), a quote 2."""
    message = scrubbed_head(message, str, 0, _SCRUBBED_WHOLE)  # measured in its first part
    limit = MESSAGE_LIMIT
    while len(message) > MESSAGE_LIMIT // 6:  # else it fits however it is written
        cut = clipped(message, limit)
        size = len(json.dumps(cut, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if size <= MESSAGE_LIMIT + 64 or limit <= 64:  # (the cut's note is not counted)
            return cut
        limit = limit * MESSAGE_LIMIT // size  # as many bytes fewer as it had too many
    return message


class TextFormatter(logging.Formatter):
    """One record, one line: a message holding a line end (a backend's error text that
    echoes a client's input, say) has it escaped, so no text can forge a line of its own,
    and is cut at ``MESSAGE_LIMIT`` bytes; a traceback still follows on its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clipped(scrubbed_head(record.message, loggable_text, 0, _SCRUBBED_WHOLE))
        repeats = getattr(record, REPEATS_FIELD, None)
        if repeats is not None:  # after the cut: the count is never what is cut off
            record.message += _repeats_note(*repeats)
        return super().formatMessage(record)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
HYPERCORN_LOGGER = "hypercorn.error"  # hypercorn's startup and error lines
ACCESS_LOGGER = "trioproxy.access"  # its lines only when ACCESS_LOG=true
NOTICE_PREFIX = "trioproxy: "


# -- repeated lines ------------------------------------------------------------------------

REPEAT_WINDOW = 10.0
"""Seconds within which a line identical to one written is counted, not written
(``LOG_REPEAT_WINDOW_SECONDS``' default; 0: every line is written)."""
REPEAT_KEYS = 128
"""Lines a handler remembers as recently written; past it the oldest is forgotten (its
count written first), so memory stays bounded whatever the lines."""
REPEATS_FIELD = "repeats"
"""On a record that stands for lines not written: (how many, over how many seconds)."""
SUPPRESSED_FIELD = "suppressed"
"""A JSON line's count of the identical lines it stands for (``repeats``), to sum them."""
_EVERY_TIME_FIELD = "every_time"
EVERY_TIME = {_EVERY_TIME_FIELD: True}
"""``extra=`` of a line written every time, never counted: one logged on a change of state
only (the backend reachable again, then not), whose order with its opposite is what it
says; held back, the last such line written would name the state before."""
_KEY_CHARS = MESSAGE_LIMIT  # of a text kept in a key as it is; past it, its length and hash
_NOTE_ROOM = 64  # bytes a summary leaves of a cut message for its "... [N more bytes]"

Schedule = Callable[[float, Callable[[], None]], None]
"""Calls its action once, after a delay in seconds, from another thread."""


def _start_timer(delay: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(delay, action)
    timer.name = "log-repeats"
    timer.daemon = True  # a count still to write must not keep the process alive (exit writes it)
    timer.start()


class _Seen:
    """A line written recently: when its window began, how many identical lines came
    since, and what a summary line repeats of it."""

    __slots__ = ("levelname", "message", "since", "suppressed")

    def __init__(self, since: float, levelname: str, message: str) -> None:
        self.since = since
        self.suppressed = 0
        self.levelname = levelname
        self.message = message


class RepeatedLines(logging.Filter):
    """A handler's filter (after the secrets are scrubbed, so what it keeps is scrubbed):
    a line identical to one written less than ``window`` seconds before is counted, not
    written. Identical: the same logger, level and message as written (the arguments
    formatted in) and the same traceback, so distinct lines are never held back (a
    format's different arguments are different lines). The count is written with the
    message, ``... (523 identical lines suppressed in the last 10 s)``, by whichever comes
    first: the line's next occurrence after the window (the line itself, with the note),
    the window's end (a timer thread: a summary line, request id ``-``), the line being
    forgotten for newer ones (``keys``), or the process's exit (:func:`flush_repeats`).
    A flood is one line per window; a count waits at most one window.

    Never counted: access lines (one per request is what ``ACCESS_LOG`` promises; they
    have a handler of their own without this filter, and are let through here too),
    DEBUG lines (asked for to follow requests line by line) and lines logged with
    ``extra=EVERY_TIME`` (a change of state). Per handler, so per process:
    each worker of ``--workers N`` counts its own. A request that logs nothing pays
    nothing; a line pays a key and a dict lookup (under a microsecond), and one held back
    saves its formatting and its write.
    """

    def __init__(
        self,
        handler: logging.Handler,
        window: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = _start_timer,
        keys: int = REPEAT_KEYS,
    ) -> None:
        super().__init__()
        self._handler = handler
        self._window = window
        self._clock = clock
        self._schedule = schedule
        self._keys = keys
        self._recent: OrderedDict[tuple[object, ...], _Seen] = OrderedDict()  # oldest first
        self._armed = math.inf  # when the earliest timer armed will fire
        # reentrant, as logging's own handler locks: a signal handler may log while the
        # thread it interrupted holds it
        self._lock = threading.RLock()
        _suppressors.add(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or record.name == ACCESS_LOGGER:
            return True
        if _EVERY_TIME_FIELD in record.__dict__:
            return True
        try:
            message = record.getMessage()
            traceback = _traceback(record)
        except Exception:  # a call whose arguments do not fit its format: the handler's
            return True  # emit reports it as logging does, it must not raise in the caller
        key = (record.name, record.levelno, _key_text(message), _key_text(traceback))
        with self._lock:
            now = self._clock()
            seen = self._recent.get(key)
            if seen is None:
                self._remember(key, _Seen(now, record.levelname, _kept(message)), now)
                return True
            if now - seen.since < self._window:
                seen.suppressed += 1
                self._arm(seen.since + self._window, now)
                return False
            if seen.suppressed:
                setattr(record, REPEATS_FIELD, (seen.suppressed, now - seen.since))
            self._restart(key, seen, now)
            return True

    def flush(self) -> None:
        """Write the counts of every line with identical lines not written yet (at exit)."""
        with self._lock:
            self._sweep(self._clock(), everything=True)

    def reset(self) -> None:
        """Forget everything (a forked child: its parent's lines and timers are not its)."""
        self._recent = OrderedDict()
        self._armed = math.inf
        self._lock = threading.RLock()

    def _remember(self, key: tuple[object, ...], seen: _Seen, now: float) -> None:
        while len(self._recent) >= self._keys:
            old_key, old = self._recent.popitem(last=False)
            if old.suppressed:  # its count is written, not lost with it
                self._write_summary(old_key, old, now)
        self._recent[key] = seen

    def _restart(self, key: tuple[object, ...], seen: _Seen, now: float) -> None:
        seen.since, seen.suppressed = now, 0
        self._recent.move_to_end(key)

    def _arm(self, due: float, now: float) -> None:
        if due >= self._armed:
            return  # a timer fires by then already
        self._armed = due
        try:
            self._schedule(max(due - now, 0.0), self._on_timer)
        except RuntimeError:  # no new thread (the interpreter is exiting): exit writes it
            self._armed = math.inf

    def _on_timer(self) -> None:
        with self._lock:
            now = self._clock()
            self._armed = math.inf
            due = self._sweep(now)
            if due < math.inf:
                self._arm(due, now)

    def _sweep(self, now: float, everything: bool = False) -> float:
        """Write the counts of the lines whose window is over and forget those with none;
        the end of the earliest window still holding a count (inf: none)."""
        next_due = math.inf
        for key, seen in list(self._recent.items()):
            due = seen.since + self._window
            if due > now and not everything:
                if seen.suppressed:
                    next_due = min(next_due, due)
            elif seen.suppressed:
                self._write_summary(key, seen, now)
                self._restart(key, seen, now)  # a flood goes on: one line per window
            else:
                del self._recent[key]  # its window is over and nothing came: forgotten
        return next_due

    def _write_summary(self, key: tuple[object, ...], seen: _Seen, now: float) -> None:
        name, levelno = key[0], key[1]
        record = logging.makeLogRecord(
            {"name": name, "levelno": levelno, "levelname": seen.levelname, "msg": seen.message}
        )
        record.request_id = "-"  # about many requests, not one
        setattr(record, REPEATS_FIELD, (seen.suppressed, now - seen.since))
        # straight to the handler: its filters saw (and scrubbed) the line already
        self._handler.acquire()
        try:
            self._handler.emit(record)
        finally:
            self._handler.release()


_suppressors: weakref.WeakSet[RepeatedLines] = weakref.WeakSet()


def flush_repeats() -> None:
    """Every handler's counts not written yet, written (at exit: a count would be lost)."""
    for suppressor in list(_suppressors):
        suppressor.flush()


def _key_text(text: str | None) -> object:
    """``text`` as a line's key holds it: a long one by its start, length and hash, so a
    backend's 1 MB error text is not kept ``REPEAT_KEYS`` times."""
    if text is None or len(text) <= _KEY_CHARS:
        return text
    return (text[:_KEY_CHARS], len(text), hash(text))


def _traceback(record: logging.LogRecord) -> str | None:
    """A record's traceback as its line will show it; formatted once, here, where the
    formatter would (so a line written pays nothing more)."""
    if record.exc_info and not record.exc_text:
        record.exc_text = _PLAIN.formatException(record.exc_info)
    return record.exc_text


def _kept(message: str) -> str:
    """What a summary line repeats of a message: the message, or, where its line cut it,
    as much as leaves room for the cut's note in a line (the count after it is never cut)."""
    cut = clipped(message)
    return message if cut is message else clipped(message, MESSAGE_LIMIT - _NOTE_ROOM)


def _repeats_note(count: int, seconds: float) -> str:
    lines = "line" if count == 1 else "lines"
    shown = f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.2g}"
    return f" ({count} identical {lines} suppressed in the last {shown} s)"


# What the last configure_logging() chose, for the handlers built later in the same
# process (hypercorn's, in a --workers worker) and for notices.
_format = "text"
_secrets: tuple[str, ...] = ()
_repeat_window = REPEAT_WINDOW


def configure_logging(
    level: str = "INFO",
    fmt: str = "text",
    secrets: tuple[str, ...] = (),
    repeat_window: float = REPEAT_WINDOW,
) -> None:
    global _format, _secrets, _repeat_window
    _format, _secrets, _repeat_window = fmt, secrets, repeat_window
    handler = configured_handler()
    for name in ("trioproxy", HYPERCORN_LOGGER):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    access = logging.getLogger(ACCESS_LOGGER)
    # ACCESS_LOG=true asks for its lines whatever LOG_LEVEL says (they are INFO): with
    # LOG_LEVEL=WARNING, to keep the rest quiet, it wrote none, without a word
    access.setLevel(logging.INFO)
    # a handler of their own, which counts no repeats: one line per request is their
    # promise, and a line per request pays for no filter it does not need
    access.handlers[:] = [configured_handler(count_repeats=False)]
    access.propagate = False


def configured_handler(count_repeats: bool = True) -> logging.Handler:
    """A stderr handler in the configured format that scrubs the configured secrets and,
    with ``count_repeats``, writes a line repeated within the configured window once.
    Named in ``hypercorn_log_config`` as a factory, so it needs no arguments."""
    handler = BackgroundStreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter(_secrets))
    if count_repeats and _repeat_window > 0:
        # after the scrubbing: what it compares and keeps is scrubbed
        handler.addFilter(RepeatedLines(handler, _repeat_window))
    handler.setFormatter(JsonFormatter() if _format == "json" else TextFormatter(TEXT_FORMAT))
    return handler


# Lines waiting for stderr, at most (in characters): past it, lines are dropped and counted.
BACKLOG_LIMIT = 1 << 20
EXIT_WAIT = 1.0  # seconds the lines still waiting get at exit
PIPE_BUF = 4096  # the longest write a pipe takes whole (never torn by another worker's)


class LineWriter:
    """Writes log lines to their stream from a thread of its own, whole lines per write.

    A write to stderr blocks while nobody reads it (a pipe whose reader is slow or stuck:
    a log shipper, a ``| tee``, a parent that never reads): written from the event loop,
    one such line stopped every request, ``/health`` and the stop signals with it. Lines
    wait here instead, up to ``BACKLOG_LIMIT``; past it they are dropped and counted, and
    a warning saying how many stands where they would have. A log is worth less than the
    requests it is about (HAProxy drops its lines likewise)."""

    def __init__(self) -> None:
        self._lines: deque[tuple[TextIO, str]] = deque()
        self._waiting = 0  # characters in _lines
        self._dropped = 0
        self._dropped_from: TextIO = sys.stderr
        self._writing = False
        self._stuck = False  # a drain gave up, and nothing got out since
        # reentrant, as logging's own handler locks: a signal handler may log while the
        # thread it interrupted holds it
        self._changed = threading.Condition(threading.RLock())
        self._thread: threading.Thread | None = None

    def write(self, stream: TextIO, line: str) -> None:
        with self._changed:
            if self._waiting + len(line) > BACKLOG_LIMIT:
                self._dropped += 1
                self._dropped_from = stream
            else:
                if self._dropped:  # said where they would have been
                    self._put(stream, _dropped_line(self._dropped))
                    self._dropped = 0
                self._put(stream, line)
            if self._thread is None:
                # a daemon: a stream that takes nothing must not keep the process alive
                self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
                self._thread.start()
            self._changed.notify()

    def _put(self, stream: TextIO, line: str) -> None:
        self._lines.append((stream, line))
        self._waiting += len(line)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._lines and not self._dropped:
                    self._changed.wait()
                if self._lines:
                    stream, line = self._take()
                else:  # lines were dropped, and none came since
                    stream, line = self._dropped_from, _dropped_line(self._dropped)
                    self._dropped = 0
                self._writing = True
            try:
                stream.write(line)
                stream.flush()
                self._stuck = False
            except (OSError, ValueError):
                pass  # stderr closed or gone: nowhere to say so
            finally:
                with self._changed:
                    self._writing = False
                    self._changed.notify_all()

    def _take(self) -> tuple[TextIO, str]:
        """The first line waiting and those after it for the same stream that one write
        takes whole with it (up to PIPE_BUF bytes): while the event loop keeps the GIL,
        this thread gets it about once per switch interval (5 ms), a write each time."""
        stream, line = self._lines.popleft()
        taken, size = [line], len(line.encode("utf-8", "surrogatepass"))
        while self._lines and self._lines[0][0] is stream:
            more = len(self._lines[0][1].encode("utf-8", "surrogatepass"))
            if size + more > PIPE_BUF:
                break
            taken.append(self._lines.popleft()[1])
            size += more
        text = "".join(taken)
        self._waiting -= len(text)
        return stream, text

    def drain(self, timeout: float = EXIT_WAIT) -> bool:
        """Wait until the lines waiting are written, for at most ``timeout`` seconds; not
        at all while a stream that took nothing in the last drain still takes nothing (at
        exit, every handler is flushed: one wait, not one per handler)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._lines or self._dropped or self._writing:
                left = deadline - time.monotonic()
                if left <= 0.0 or self._stuck:
                    self._stuck = True
                    return False
                self._changed.wait(left)
        return True


def _dropped_line(count: int) -> str:
    record = logging.makeLogRecord({"name": "trioproxy", "levelname": "WARNING"})
    record.levelno, record.request_id = logging.WARNING, "-"
    record.msg = f"{count} log lines dropped: stderr was not read fast enough"
    formatter = JsonFormatter() if _format == "json" else TextFormatter(TEXT_FORMAT)
    return formatter.format(record) + "\n"


_writer = LineWriter()
atexit.register(lambda: _writer.drain())
atexit.register(flush_repeats)  # (exit handlers run last first: the counts, then the drain)


def _new_writer_after_fork() -> None:
    global _writer
    _writer = LineWriter()  # the parent's thread is not in the child
    for suppressor in list(_suppressors):
        suppressor.reset()  # the parent's counts are the parent's to write


os.register_at_fork(after_in_child=_new_writer_after_fork)


class BackgroundStreamHandler(logging.StreamHandler[TextIO]):
    """A ``StreamHandler`` whose lines are written by the process's :class:`LineWriter`:
    logging never blocks the event loop."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        _writer.write(self.stream, line)

    def flush(self) -> None:
        _writer.drain()  # (logging.shutdown() flushes every handler at exit)


def hypercorn_log_config(level: str) -> dict[str, object]:
    """hypercorn's ``logconfig`` (dictConfig) for the workers of ``--workers N``: its lines
    through our handler. hypercorn applies it in each worker after the app factory ran
    ``configure_logging``, so the handler has that worker's format and secrets. Loggers it
    does not name (ours) are left as they are."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"trioproxy": {"()": f"{__name__}.configured_handler"}},
        "loggers": {
            HYPERCORN_LOGGER: {"handlers": ["trioproxy"], "level": level, "propagate": False}
        },
    }


def notice(line: str, level: str = "INFO", fmt: str | None = None) -> None:
    """One line on stderr whatever the log level: what an operator must always see (where
    the proxy listens, why it stops). Text: the line as given. JSON: one object like every
    log line, without the ``trioproxy: [error: ]`` prefix. ``fmt`` for the errors found before
    logging is configured."""
    record = logging.makeLogRecord(
        {"name": "trioproxy", "levelname": level, "levelno": logging.getLevelName(level)}
    )
    record.msg = line
    RequestContextFilter(_secrets).filter(record)  # the secrets scrubbed, as on log lines
    line = record.getMessage()
    if (fmt or _format) == "json":
        record.msg = line.removeprefix(NOTICE_PREFIX).removeprefix("error: ")  # in "level"
        line = JsonFormatter().format(record)
    # after the log lines before it, and written (or given up on) before it returns: the
    # program may stop next
    _writer.write(sys.stderr, line + "\n")
    _writer.drain()
