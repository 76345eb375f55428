"""Bounded label values: every metric label comes from a fixed set or collapses to ``other``;
and client-supplied text made safe for log lines."""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes

log = logging.getLogger("trioproxy.metrics")

OTHER = "other"

# (method-agnostic) path -> endpoint label.  Route templates only, never raw paths.
ROUTE_LABELS: dict[str, str] = {
    "/": "root",
    "/api/version": "api_version",
    "/api/tags": "api_tags",
    "/api/models": "api_tags",
    "/v1/tags": "api_tags",
    "/api/show": "api_show",
    "/api/ps": "api_ps",
    "/api/generate": "api_generate",
    "/api/chat": "api_chat",
    "/api/embed": "api_embed",
    "/api/embeddings": "api_embeddings",
    "/api/pull": "api_model_management",
    "/api/push": "api_model_management",
    "/api/create": "api_model_management",
    "/api/copy": "api_model_management",
    "/api/delete": "api_model_management",
    "/v1/chat/completions": "v1_chat_completions",
    "/v1/completions": "v1_completions",
    "/v1/embeddings": "v1_embeddings",
    "/v1/responses": "v1_responses",
    "/v1/responses/input_tokens": "v1_responses_input_tokens",
    "/v1/responses/compact": "v1_responses_compact",
    "/v1/messages": "v1_messages",  # the Anthropic Messages API
    "/v1/messages/count_tokens": "v1_messages_count_tokens",
    "/v1/models": "v1_models",
    "/v1/version": "v1_version",
}

ENDPOINT_LABELS: frozenset[str] = frozenset(
    {*ROUTE_LABELS.values(), "v1_model", "v1_response", "api_blobs", OTHER}
)

# Requests to these paths are the monitoring plane itself; they are never recorded,
# so scrapes and probes cannot fill the window or skew the rates.
UNTRACKED_PATHS: frozenset[str] = frozenset(
    {
        "/health",
        "/v1/health",
        "/ready",
        "/metrics",
        "/v1/metrics",
        "/v1/metrics/prometheus",
        "/v1/metrics/health",
        "/api/metrics",
        "/api/metrics/prometheus",
        "/api/metrics/health",
    }
)

METHOD_LABELS: frozenset[str] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"}
)

API_LABELS: frozenset[str] = frozenset({"ollama", "openai", "anthropic", OTHER})

STREAM_OUTCOMES: tuple[str, ...] = ("completed", "cancelled", "timeout", "error")

# Status recorded for requests that ended abnormally after the response headers went out.
STATUS_CLIENT_CLOSED = 499  # nginx's convention for "client closed request"
STATUS_STREAM_TIMEOUT = 504
STATUS_STREAM_UPSTREAM_ERROR = 502


def endpoint_label(path_or_label: str) -> str:
    """Map a request path (or an already-valid label) to a bounded endpoint label."""
    if path_or_label in ENDPOINT_LABELS:
        return path_or_label
    label = ROUTE_LABELS.get(path_or_label)
    if label is not None:
        return label
    if path_or_label.startswith("/v1/models/"):
        return "v1_model"
    if path_or_label.startswith("/v1/responses/"):
        return "v1_response"  # a response by id: retrieve, delete, cancel, input items
    if path_or_label.startswith("/api/blobs/"):
        return "api_blobs"
    return OTHER


def api_label(path: str) -> str:
    if path.startswith("/api/") or path == "/":
        return "ollama"
    if path.startswith("/v1/"):
        return "anthropic" if ROUTE_LABELS.get(path, "").startswith("v1_messages") else "openai"
    return OTHER


def method_label(method: str) -> str:
    method = method.upper()
    return method if method in METHOD_LABELS else OTHER


class ModelLabels:
    """Hands out model label values from a budget of ``limit`` distinct names.

    A model earns its own label the first time a request for it succeeds (so random
    names in failing requests never grow the series count); past the budget, and for
    models that never succeeded, the label is ``other``.

    With ``shared_dir`` (the multiprocess directory of ``--workers N``) the budget and the
    names are the proxy's, not the process's: a name one worker admits is labelled so on
    every worker (else a model's failures on another worker would count as ``other``).
    Names are read from the directory only when a name not known here is labelled (once
    per request kind, the collector caches kinds) and in :meth:`refresh`, never per
    request."""

    def __init__(self, limit: int = 50, shared_dir: str | None = None) -> None:
        self._limit = limit
        self._known: set[str] = set()
        self._shared = SharedModelNames(shared_dir, limit) if shared_dir else None

    def label(self, model: str | None, *, succeeded: bool) -> str:
        if not model:
            return ""
        if model in self._known:
            return model
        if self._shared is not None:
            self.refresh()  # another worker may have admitted it
            if model in self._known:
                return model
        if succeeded and self._admit(model):
            return model
        return OTHER

    @property
    def size(self) -> int:
        """How many models have their own label (grows only)."""
        return len(self._known)

    def allow(self, model: str) -> None:
        """Pre-register a model (e.g. from the mapping file or the backend's model list)."""
        if model and model not in self._known:
            self._admit(model)

    def refresh(self) -> None:
        """Learn the names other workers admitted since the last look (cheap: one failed
        ``open`` when there are none)."""
        if self._shared is not None:
            self._known.update(self._shared.read_new())

    def _admit(self, model: str) -> bool:
        if len(self._known) >= self._limit or not _plausible_model_name(model):
            return False
        shared = self._shared
        if shared is None:
            self._known.add(model)
            return True
        try:
            while shared.take(model):
                read = shared.slots_read
                self._known.update(shared.read_new())
                if model in self._known:
                    return True
                if shared.slots_read == read:  # the slot could not be read (no file
                    return False  # descriptor left, say): "other" this time, not a loop
        except OSError as error:
            if error.errno in _FOR_NOW:  # out of descriptors for a moment: "other" this time
                return False
            # an unwritable directory: the budget stays per process
            log.warning("metrics: model labels not shared between workers: %s", error)
            self._shared = None
            return self._admit(model)
        return False


# failures that pass: the shared names are still there once descriptors are free again
_FOR_NOW = frozenset((errno.EMFILE, errno.ENFILE))


class SharedModelNames:
    """The model names admitted by all workers: one file per slot of the budget in the
    multiprocess directory, ``model_label_<n>`` holding the name, taken in order. A slot
    is taken with a hard link of a file already written, so it either does not exist or
    holds its whole name; two workers taking the same slot: one gets it, the other reads
    it and tries the next. The files end in no ``.db``: the scrape's merge ignores them."""

    __slots__ = ("_dir", "_limit", "_read", "_warned")

    def __init__(self, directory: str, limit: int) -> None:
        self._dir = directory
        self._limit = limit
        self._read = 0  # slots read so far: every slot below it is taken
        self._warned = False  # a failure to read is logged once, not every half second

    def _slot(self, n: int) -> str:
        return os.path.join(self._dir, f"model_label_{n}")

    @property
    def slots_read(self) -> int:
        return self._read

    def read_new(self) -> list[str]:
        """The names in the slots taken since the last call. Never raises: it runs in the
        metrics publisher, which a failure would end for the worker's life; a slot that
        cannot be read now (out of file descriptors) is read at a later call."""
        names: list[str] = []
        while self._read < self._limit:
            try:
                with open(self._slot(self._read), "rb") as f:
                    names.append(f.read().decode("utf-8", "replace"))
            except FileNotFoundError:
                break
            except OSError as error:
                if not self._warned:
                    self._warned = True
                    log.warning("metrics: cannot read the shared model labels now: %s", error)
                break
            self._read += 1
        return names

    def take(self, model: str) -> bool:
        """Try to take the first slot not read yet for ``model``; False when the budget
        is spent. Whoever took it, :meth:`read_new` reads it next."""
        if self._read >= self._limit:
            return False
        draft = os.path.join(self._dir, f".model_label_draft_{os.getpid()}")
        with open(draft, "wb") as f:
            f.write(model.encode("utf-8"))
        try:
            os.link(draft, self._slot(self._read))
        except FileExistsError:
            pass  # another worker took it first
        finally:
            os.remove(draft)
        return True


def _plausible_model_name(model: str) -> bool:
    return 0 < len(model) <= 128 and model.isprintable()


# --------------------------------------------------------------------------- text for log lines

# what a path needs no escaping for: the characters a URL path may carry as they are
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/_.~:@!$&'()*+,;=-]*")
_PATH_SAFE = "/:@!$&'()*+,;="


def loggable_path(path: str) -> str:
    """``path`` (decoded by the server) for a log line, percent-encoded again where it
    needs it: a client's ``%0a`` must not end the line and start a forged one, nor a
    ``%20`` add fields to it. ``%`` itself is encoded too, so the line is unambiguous.
    The common path is returned as it is (one regex match)."""
    if _PLAIN_PATH.fullmatch(path):
        return path
    # backslashreplace: a path the server decoded with surrogates must not raise here
    return quote(path, safe=_PATH_SAFE, errors="backslashreplace")


# a query's characters that need no escaping in a log line (it comes as sent: its own
# escapes, % included, stay as they are)
_PLAIN_QUERY = re.compile(rb"[A-Za-z0-9/_.~:@!$&'()*+,;=?%-]*")
_QUERY_SAFE = "/:@!$&'()*+,;=?%"
# a query parameter whose name says it holds a credential (?key=, ?api_key=, ?token=,
# ?access_token=, ?sig=, ?X-Amz-Signature=, ?password=, ?pass=, ?session=, ?code=): its
# value is never logged. The names config.py reads as credentials in the backend's URL,
# and more. Other secrets the proxy knows (the backend's key, the client keys) are
# scrubbed from every line
_CREDENTIAL_NAME = re.compile(
    rb"key|token|secret|pass|auth|sig|credential|cookie|session|^code$", re.IGNORECASE
)
MASKED = b"***"


def loggable_query(query: bytes) -> str:
    """A request's query string (as sent) for its access line: the values of parameters
    named as credentials masked, percent-encoded where it holds anything but plain URL
    characters (as :func:`loggable_path`), so it stays one line and one field. Names are
    read only in what the line can show (its first PATH_LIMIT characters: the rest is
    cut), so a 16 KiB query of ``a=1;`` costs no more than a short one to mask."""
    out: list[bytes] = []
    at = size = 0
    while size < PATH_LIMIT:
        end = query.find(b"&", at)
        if end < 0:
            end = len(query)
        param = _masked_param(query[at:end], PATH_LIMIT - size)
        out.append(param)
        size += len(param) + 1
        at = end + 1
        if at > len(query):
            break
    else:  # past what the line shows (encoding only lengthens it): cut, never read
        out.append(query[at:])
    text = b"&".join(out)
    if _PLAIN_QUERY.fullmatch(text):
        return text.decode("ascii")
    return quote_from_bytes(text, safe=_QUERY_SAFE)


def _masked_param(param: bytes, shown: int) -> bytes:
    """One ``&``-separated parameter, its value masked from the first credential name
    on: the parameter's own, or one after a ``;`` (a separator some servers still read,
    ``a=1;key=…``), whose value runs to the next ``&`` for the servers that do not. A name
    starting past ``shown`` bytes is not read: its value is past the line's end."""
    at = 0
    while at < shown and (equals := param.find(b"=", at)) >= 0:
        # pieces without "=" before it: the name is the last one's (each byte read once)
        at = param.rfind(b";", at, equals) + 1 or at
        if equals + 1 < len(param) and _CREDENTIAL_NAME.search(unquote_to_bytes(param[at:equals])):
            return param[: equals + 1] + MASKED
        at = param.find(b";", equals) + 1
        if not at:
            break
    return param


# A log line is written whole by one write(), and a pipe (the stderr of a container, which the
# workers of --workers N share) takes one whole only up to PIPE_BUF, 4096 bytes: a longer
# line can be torn by another process's. A message is cut at 2048 bytes (nginx cuts its error
# lines there), which leaves room for the time, level, logger and request id.
MESSAGE_LIMIT = 2048
PATH_LIMIT = 1024  # of an access line: the status and the rest come after it
METHOD_LIMIT = 32


def clipped(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` cut to ``limit`` bytes of UTF-8, saying how many more there were: a 1 MB
    model name a backend quotes back, or a path, must not make a 1 MB log line."""
    if len(text) <= limit // 4:  # no character takes more than 4 bytes
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    end = _cut_at(data, limit)
    more = len(data) - end
    note = _cut_note(text)
    if note is not None:  # cut before (scrubbed_head): its count goes on in this one's
        start = len(data) - len(note[0])  # the note is ASCII
        if end >= start:
            return text  # it fits but for the note, which no limit counts
        more = start - end + int(note[1])
    kept = data[:end].decode("utf-8", "surrogatepass")
    return f"{kept}... [{more} more bytes]"


# the note a cut ends a text with, and the most characters it takes
_CUT_NOTE = re.compile(r"\.\.\. \[(\d{1,20}) more bytes\]\Z")
_CUT_NOTE_CHARS = 40


def _cut_note(text: str) -> re.Match[str] | None:
    return _CUT_NOTE.search(text, max(0, len(text) - _CUT_NOTE_CHARS))


def scrubbed_head(text: str, scrub: Callable[[str], str], margin: int, keep: int) -> str:
    """``scrub(text)``, in the time of ``keep`` characters however long ``text`` is (a
    backend's error event may take MAX_RESPONSE_BYTES; scrubbing 10 MB of it held the loop
    15-370 ms): a longer text is cut before it is scrubbed, ``margin`` characters past
    ``keep``, then ``margin`` characters earlier, so no part of a secret the first cut
    split is kept (``margin``: at least the longest spelling of a secret), with the note
    of a cut, whose count a later cut (:func:`clipped`) carries on. Pure."""
    if len(text) <= keep + margin:
        return scrub(text)
    head = scrub(text[: keep + margin])
    cut = max(len(head) - margin, 0)
    if 0 < cut < len(head) and head[cut] == "*":  # never in a *** mask, unless it starts
        cut = len(head[:cut].rstrip("*")) or cut
    note = _cut_note(text)
    start, end = keep + margin, len(text) if note is None else note.start()
    # the bytes cut off (an ASCII text's without copying it)
    more = end - start if text.isascii() else len(text[start:end].encode("utf-8", "surrogatepass"))
    more += len(head[cut:].encode("utf-8", "surrogatepass"))
    if note is not None:
        more += int(note[1])
    return f"{head[:cut]}... [{more} more bytes]"


_STAR = ord("*")


def _cut_at(data: bytes, limit: int) -> int:
    """Where ``data``, longer than ``limit`` bytes, is cut: at ``limit`` or before it, never
    inside a character, nor inside a run of ``*`` (the ``***`` a secret is masked with:
    ``**`` would look like text the backend sent), unless the run starts the text."""
    end = limit
    while end and data[end] & 0xC0 == 0x80:  # not inside a character: cut before it
        end -= 1
    if end and data[end - 1] == _STAR and data[end] == _STAR:
        run = end - 1
        while run and data[run - 1] == _STAR:
            run -= 1
        end = run or end
    return end


def loggable_text(text: str) -> str:
    """Free text (an error message) for a log line: non-printable characters escaped
    (``\\n``, ``\\x1b``), so it stays on its line."""
    if text.isprintable():
        return text
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")
