"""Fixes for hypercorn 0.18's trio worker under quart-trio, where request cancellation
leaks into connection housekeeping.

quart-trio ends every request by cancelling the request's nursery, and hypercorn runs some
connection bookkeeping from inside that cancelled scope:

1. The keep-alive idle timer restart (``TrioSingleTask.restart``) raises ``Cancelled``, so an
   idle keep-alive connection is never closed and file descriptors leak (stack notes P1).
2. Closing the connection (``TCPServer.protocol_send(Closed())``) raises ``Cancelled`` before
   the socket is closed, so a connection answered before its request body arrived (an early
   404/413/501) is neither served again nor closed: the client hangs.

Shielding both lets them finish; each is bounded by socket operations that do not block.
Importing this module applies the patches once; tests/test_server.py and
tests/test_proxy_behaviour.py assert the closes, so a version bump cannot silently undo them.
"""

from __future__ import annotations

from typing import Any

import hypercorn.trio.tcp_server as tcp_server
import hypercorn.trio.worker_context as worker_context
import trio
from hypercorn.events import Closed

_original_restart = worker_context.TrioSingleTask.restart
_original_protocol_send = tcp_server.TCPServer.protocol_send


async def _shielded_restart(self: Any, task_group: Any, action: Any) -> None:
    with trio.CancelScope(shield=True):
        await _original_restart(self, task_group, action)


async def _protocol_send(self: Any, event: Any) -> None:
    if isinstance(event, Closed):
        with trio.CancelScope(shield=True):
            await _original_protocol_send(self, event)
    else:
        await _original_protocol_send(self, event)


if not getattr(worker_context.TrioSingleTask.restart, "_trioproxy_patched", False):
    _shielded_restart._trioproxy_patched = True  # type: ignore[attr-defined]
    worker_context.TrioSingleTask.restart = _shielded_restart  # type: ignore[method-assign]
    tcp_server.TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]
