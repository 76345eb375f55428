"""Logging: every line about a request carries its request id; secrets never get out.

The request id lives in a context variable set once per request by the connection
adapter, so every log call made while serving it (handlers, relay, upstream) sees it.
hypercorn's own lines (logger ``hypercorn.error``) and the program's notices on stderr
come out in the same format, so ``LOG_FORMAT=json`` means every line is JSON.
"""

from __future__ import annotations

import atexit
import contextvars
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import TextIO

from .metrics.labels import MESSAGE_LIMIT, clipped, loggable_text

REMOTE_ADDR_FIELD = "remote_addr"
"""An access line's client address (``extra=``), a field of its own in JSON lines."""

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestContextFilter(logging.Filter):
    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s and len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        if self._secrets:
            message = record.getMessage()
            cleaned = self._scrubbed(message)
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
        return text


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
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _json_message(message: str) -> str:
    """``message`` cut as a text line's is, to ``MESSAGE_LIMIT`` bytes as JSON writes it: a
    control character takes 6 there (``\\u001b``), a quote 2."""
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
        record.message = clipped(loggable_text(record.message))
        return super().formatMessage(record)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
HYPERCORN_LOGGER = "hypercorn.error"  # hypercorn's startup and error lines
ACCESS_LOGGER = "trioproxy.access"  # its lines only when ACCESS_LOG=true
NOTICE_PREFIX = "trioproxy: "

# What the last configure_logging() chose, for the handlers built later in the same
# process (hypercorn's, in a --workers worker) and for notices.
_format = "text"
_secrets: tuple[str, ...] = ()


def configure_logging(
    level: str = "INFO", fmt: str = "text", secrets: tuple[str, ...] = ()
) -> None:
    global _format, _secrets
    _format, _secrets = fmt, secrets
    handler = configured_handler()
    for name in ("trioproxy", HYPERCORN_LOGGER):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    # ACCESS_LOG=true asks for its lines whatever LOG_LEVEL says (they are INFO): with
    # LOG_LEVEL=WARNING, to keep the rest quiet, it wrote none, without a word
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)


def configured_handler() -> logging.Handler:
    """A stderr handler in the configured format that scrubs the configured secrets.
    Named in ``hypercorn_log_config`` as a factory, so it takes no arguments."""
    handler = BackgroundStreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter(_secrets))
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


def _new_writer_after_fork() -> None:
    global _writer
    _writer = LineWriter()  # the parent's thread is not in the child


os.register_at_fork(after_in_child=_new_writer_after_fork)


class BackgroundStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
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
