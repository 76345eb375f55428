"""Logging: every line about a request carries its request id; secrets never get out.

The request id lives in a context variable set once per request by the connection
adapter, so every log call made while serving it (handlers, relay, upstream) sees it.
hypercorn's own lines (logger ``hypercorn.error``) and the program's notices on stderr
come out in the same format, so ``LOG_FORMAT=json`` means every line is JSON.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from .metrics.labels import MESSAGE_LIMIT, clipped, loggable_text

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestContextFilter(logging.Filter):
    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s and len(s) >= 4)

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        if self._secrets:
            message = record.getMessage()
            cleaned = message
            for secret in self._secrets:
                cleaned = cleaned.replace(secret, "***")
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
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


def configured_handler() -> logging.Handler:
    """A stderr handler in the configured format that scrubs the configured secrets.
    Named in ``hypercorn_log_config`` as a factory, so it takes no arguments."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter(_secrets))
    handler.setFormatter(JsonFormatter() if _format == "json" else TextFormatter(TEXT_FORMAT))
    return handler


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
    print(line, file=sys.stderr, flush=True)
