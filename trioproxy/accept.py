"""Accept every connection waiting at once, not one per scheduler round.

trio's ``SocketListener.accept`` takes one connection from the listening socket's queue
and then yields to the scheduler, so ``serve_listeners`` (hypercorn's accept loop) took a
burst of N new connections in N rounds. Under load a round is a batch of every ready
task's step, so the last connection of a burst waited N batches before its handler even
started, its request sitting unread in the socket (0.3-0.4 s for a burst of 64 fresh
connections while the loop was saturated: docs/performance-history.md). asyncio's
servers take up to their backlog at each wake-up; this does the same: after the awaited
accept, what else is queued (``ACCEPT_BURST`` at most) is accepted without waiting and
handed out by the next calls without a checkpoint. Closing the listener closes the
connections still held, as closing a listening socket resets the ones in its queue.

Only where this process alone accepts on its sockets: a worker of several that share one
(hypercorn's ``--workers``, each a multiprocessing child) accepts one connection per
wait, as trio does. There a burst went whole to whichever worker woke first, and its
keep-alive connections stayed there: in bench 3h two rounds of eight served 64 clients
with one worker busy and the other idle (1.0 cores of two, half the throughput).

Importing this module patches ``trio.SocketListener`` once; the proxy's servers, the
demo backend and any other trio listener in the process take connections this way.
"""

from __future__ import annotations

import errno
import multiprocessing
import socket as stdlib_socket
from collections import deque
from typing import Any

import trio

ACCEPT_BURST = 64
"""The connections one accept takes from the queue at most (the awaited one included):
bounds how long the accept loop runs without yielding."""

# a connection reset or aborted while it waited in the queue: skipped, as trio does
_GONE = {errno.ECONNABORTED, errno.ECONNRESET, errno.EPROTO, errno.EPERM}

_QUEUED = "_trioproxy_queued"

_original_accept = trio.SocketListener.accept
_original_aclose = trio.SocketListener.aclose


async def _accept(self: trio.SocketListener) -> trio.SocketStream:
    queued: deque[trio.SocketStream] | None = getattr(self, _QUEUED, None)
    if queued:
        return queued.popleft()
    stream = await _original_accept(self)
    if _shares_its_sockets():
        return stream
    waiting = _accept_waiting(self.socket, ACCEPT_BURST - 1)
    if waiting:
        if queued is None:
            queued = deque()
            setattr(self, _QUEUED, queued)
        queued.extend(waiting)
    return stream


def _shares_its_sockets() -> bool:
    """Whether other processes may accept on this one's listening sockets: it is a
    multiprocessing child (hypercorn's workers; a single worker too, which costs it only
    the burst)."""
    return multiprocessing.parent_process() is not None


def _accept_waiting(sock: trio.socket.SocketType, limit: int) -> list[trio.SocketStream]:
    """Up to ``limit`` connections already in ``sock``'s queue, without waiting."""
    listening: stdlib_socket.socket | None = getattr(sock, "_sock", None)
    if listening is None:  # not trio's own socket type: one connection per accept
        return []
    accepted: list[trio.SocketStream] = []
    while len(accepted) < limit:
        try:
            connection, _ = listening.accept()
        except OSError as exc:
            if exc.errno in _GONE:
                continue
            # the queue is empty (BlockingIOError), or a limit reached (EMFILE): the
            # next awaited accept waits, or raises it to the accept loop
            break
        accepted.append(_stream_of(connection))
    return accepted


def _stream_of(connection: stdlib_socket.socket) -> trio.SocketStream:
    try:
        return trio.SocketStream(trio.socket.from_stdlib_socket(connection))
    except BaseException:
        connection.close()
        raise


async def _aclose(self: trio.SocketListener) -> None:
    queued: deque[trio.SocketStream] | None = getattr(self, _QUEUED, None)
    while queued:
        queued.popleft().socket.close()
    await _original_aclose(self)


def _patch(listener: Any) -> None:
    if getattr(listener.accept, "_trioproxy_patched", False):
        return
    _accept._trioproxy_patched = True  # type: ignore[attr-defined]
    listener.accept = _accept
    listener.aclose = _aclose


_patch(trio.SocketListener)
