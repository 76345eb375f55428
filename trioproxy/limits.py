"""The process's open files limit (RLIMIT_NOFILE), raised as far as it is allowed to go.

Every stream holds two file descriptors (the client's connection and the backend's), and
idle keep-alive connections (held ``KEEP_ALIVE_TIMEOUT``, 75 s) and pooled backend
connections hold one each. A login shell or a systemd unit starts a process with a soft
limit of 1024 (hard 524288 on Debian, systemd's default): about 500 concurrent streams,
then accepts back off and backend connections fail. As nginx (``worker_rlimit_nofile``)
and Go programs (since Go 1.19) do, each serving process raises its soft limit to its
hard limit, up to :data:`NOFILE_CAP`; it never fails for it.

A connection that cannot be accepted for want of descriptors waits in the listen backlog
(trio retries the accept every 0.1 s); trio logged each retry as an ERROR with a traceback,
outside the configured log format. :class:`AcceptErrorsLogged` makes them one line per
:data:`ACCEPT_LOG_INTERVAL` in the proxy's format, naming the limit.
"""

from __future__ import annotations

import errno
import logging
import resource
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("trioproxy")

NOFILE_CAP = 1 << 20  # 1,048,576: the kernel's default fs.nr_open, systemd's hard default
NOFILE_LOW = 4096
"""A limit below this is logged as a WARNING once at start (about 2,000 streams)."""
NR_OPEN = Path("/proc/sys/fs/nr_open")  # the most a limit may be, when the hard one is
ACCEPT_LOGGER = "trio.serve_listeners"
ACCEPT_LOG_INTERVAL = 10.0  # seconds between the lines about failing accepts
OUT_OF_FILES = frozenset((errno.EMFILE, errno.ENFILE))

_raised = False  # this process's limit was dealt with (once per process)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (at most :data:`NOFILE_CAP`), once per
    process, logging the outcome; the (soft, hard) limits in force after."""
    global _raised
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _raised:
        return soft, hard
    _raised = True
    want = _target(hard)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError) as exc:
            log.warning(
                "could not raise the open files limit (RLIMIT_NOFILE) from %d to %d "
                "(hard limit %s): %s",
                soft,
                want,
                _spelled(hard),
                exc,
            )
        else:
            log.info(
                "open files limit (RLIMIT_NOFILE) raised from %d to %d (hard limit %s)",
                soft,
                want,
                _spelled(hard),
            )
            soft = want
    else:
        log.debug("open files limit (RLIMIT_NOFILE) %d (hard limit %s)", soft, _spelled(hard))
    if soft < NOFILE_LOW:
        log.warning(
            "the open files limit (RLIMIT_NOFILE) is %d (hard limit %s): each stream holds "
            "2, so about %d concurrent streams; raise the hard limit (systemd LimitNOFILE=, "
            "ulimit -Hn, docker --ulimit nofile=) to at least %d",
            soft,
            _spelled(hard),
            max(soft - 32, 0) // 2,
            NOFILE_LOW,
        )
    _quiet_accept_errors(soft)
    return soft, hard


def _target(hard: int) -> int:
    """The soft limit to ask for: the hard one, capped (an unlimited hard limit lets the
    soft one go no higher than ``fs.nr_open``)."""
    cap = NOFILE_CAP
    if hard == resource.RLIM_INFINITY:
        try:
            cap = min(cap, int(NR_OPEN.read_text()))
        except (OSError, ValueError):
            pass
        return cap
    return min(hard, cap)


def _spelled(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE now (for the messages about running out)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def out_of_files(exc: BaseException) -> OSError | None:
    """The EMFILE/ENFILE error behind ``exc`` (its causes, contexts, exception groups),
    None if there is none: the proxy's own exhaustion, not the peer's fault."""
    for error in _chain(exc, depth=0):
        if isinstance(error, OSError) and error.errno in OUT_OF_FILES:
            return error
    return None


def _chain(exc: BaseException | None, depth: int) -> Iterator[BaseException]:
    # bounded: a cycle in a cause chain must not hang us
    seen = 0
    while exc is not None and seen < 8 and depth < 4:
        yield exc
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                yield from _chain(inner, depth + 1)
        exc = exc.__cause__ or exc.__context__
        seen += 1


class AcceptErrorsLogged(logging.Filter):
    """trio's lines about an accept failing for want of resources (it retries every 0.1 s,
    each line an ERROR with a traceback): one line per :data:`ACCEPT_LOG_INTERVAL`,
    without the traceback, saying how many it stands for and what the limit is."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        self._last = -float("inf")
        self._held_back = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last < ACCEPT_LOG_INTERVAL:
            self._held_back += 1
            return False
        self._last = now
        repeated = self._held_back
        self._held_back = 0
        reason = record.getMessage().split(";", 1)[0]  # "accept returned EMFILE (...)"
        # trio retries ENOMEM and ENOBUFS the same way: the limit is named only when it is
        # the one reached
        files = "EMFILE" in reason or "ENFILE" in reason
        limit = f"; open files limit (RLIMIT_NOFILE) {self._limit}" if files else ""
        record.msg = (
            "cannot accept new connections: %s%s; they wait in the listen backlog, "
            "retried every 0.1 s%s"
        )
        record.args = (
            reason,
            limit,
            f" ({repeated} more such failures since the last line)" if repeated else "",
        )
        record.exc_info = None
        record.exc_text = None
        return True


def _quiet_accept_errors(limit: int) -> None:
    """trio's accept-error lines through the proxy's handlers (its format, its secrets
    filter), rate-limited: they went to Python's last-resort handler, raw, outside
    LOG_FORMAT=json."""
    accept_log = logging.getLogger(ACCEPT_LOGGER)
    accept_log.handlers[:] = logging.getLogger("trioproxy").handlers
    accept_log.propagate = False
    for old in [f for f in accept_log.filters if isinstance(f, AcceptErrorsLogged)]:
        accept_log.removeFilter(old)
    accept_log.addFilter(AcceptErrorsLogged(limit))
