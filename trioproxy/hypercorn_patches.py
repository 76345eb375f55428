"""Fix for hypercorn 0.18's trio worker under quart-trio: keep-alive idle timer never starts.

hypercorn delivers ``http.disconnect`` inside the final ``send()``; quart-trio then cancels
the request nursery, and the idle-timer restart that follows raises ``Cancelled`` — so an
idle keep-alive connection is never closed and file descriptors leak (stack notes P1).
Shielding the restart lets the timer start. Importing this module applies the patch once;
``tests/test_server.py`` asserts the idle close so a version bump cannot silently undo it.
"""

from __future__ import annotations

from typing import Any

import hypercorn.trio.worker_context as worker_context
import trio

_original_restart = worker_context.TrioSingleTask.restart


async def _shielded_restart(self: Any, task_group: Any, action: Any) -> None:
    with trio.CancelScope(shield=True):
        await _original_restart(self, task_group, action)


if not getattr(worker_context.TrioSingleTask.restart, "_trioproxy_patched", False):
    _shielded_restart._trioproxy_patched = True  # type: ignore[attr-defined]
    worker_context.TrioSingleTask.restart = _shielded_restart  # type: ignore[method-assign]
