"""Large JSON decoded and encoded in a worker thread, so that the event loop keeps serving.

A worker serves every request and stream on one trio loop, and decoding or encoding JSON
holds it: a client's 10 MB body of one base64 image held it 50-60 ms (counted for values,
searched for long integers, decoded; on /api/* encoded again for the backend), a backend's
answer of 2,048 embeddings of 1,024 floats (40 MB) 350-450 ms (checked, decoded, encoded
for the client), and every other stream of the worker stood still meanwhile. Past
:data:`OFF_LOOP_BYTES` that work runs in a thread (:func:`off_loop`); below, on the loop
as before (a small body pays a size comparison).

A thread does not free the loop during one call into C: orjson, ``bytes.count`` and
``bytes.translate`` hold the GIL throughout. The loop gets its turns between them (the
thread hands the GIL over once it runs Python code again and the loop has waited
``sys.getswitchinterval()``, 5 ms), so its longest stall falls from the sum of the steps
to about the longest single one: measured with ``python -m bench.loop_stall``
(docs/performance-history.md), 50-60 ms to 20-30 ms for the 10 MB body, 350-450 ms to 160-240 ms
for the 40 MB answer, whose decoding alone is one orjson call of 120-230 ms.

One such thread at a time (:data:`JSON_THREADS`), from a limiter of its own (not trio's
default one, which the backend connections' name resolutions use): with the GIL a second
would not finish the work sooner, and it is one more holder the loop waits behind (three
clients at once: the loop's longest stall 44 ms with two threads, 28-34 ms with one, for
10 MB bodies). A request waiting for it waits without holding the loop, first come first
served; measured again with a 300 KB body beside 40 MB answers, a second thread made no
difference beyond the noise (docs/performance-history.md): what the waiting request waits for is
mostly the other's one long orjson call, which holds the GIL for every thread.

A body read in parts is joined before any of that (:func:`joined`): past 1 MiB in a thread
too, from trio's own pool, since ``bytes.join`` lets go of the GIL while it copies (a
40 MB answer's join held the loop 24-40 ms).

Cancellation: a function whose arguments are all immutable (bytes in, a new object or
bytes out) is abandoned to a client that leaves (``abandon_on_cancel``): the request ends
at once, the thread finishes in the background touching nothing of anyone's, and its
result is dropped; the limiter's token stays borrowed until the thread is done, so the
bound holds. One that reads an object the request holds (an encoder's payload) is waited
for, so that no thread reads it after the request has moved on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio
from trio.lowlevel import RunVar

T = TypeVar("T")

# Below this, on the loop: 256 KiB cost it 0.25 ms (a body of base64, checked and decoded)
# to 0.6 ms (an answer of floats, decoded and encoded), about what a small request costs
# the worker; a thread's round trip costs 0.09 ms, 0.055 ms of it the loop's (measured on
# 2 shared cores). Above it the stall grows with the size; below it a thread would save
# the loop little more than the round trip costs.
OFF_LOOP_BYTES = 256 * 1024
JSON_THREADS = 1

_limiter: RunVar[trio.CapacityLimiter] = RunVar("trioproxy_json_threads")


def json_threads() -> trio.CapacityLimiter:
    """This run's limiter for the JSON threads (one per trio run: pytest runs many)."""
    try:
        return _limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(JSON_THREADS)
        _limiter.set(limiter)
        return limiter


async def off_loop(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
    """``fn(*args)`` in a JSON thread; its exception, if any, raised here. ``fn`` must not
    touch shared state (the metrics, the app's caches): it runs beside the loop.
    ``abandon_on_cancel`` only for a function of immutable arguments (bytes, str)."""
    return await trio.to_thread.run_sync(
        fn, *args, limiter=json_threads(), abandon_on_cancel=abandon_on_cancel
    )


async def by_size(
    size: int, fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False
) -> T:
    """``fn(*args)`` for JSON of ``size`` bytes: here, on the loop, up to OFF_LOOP_BYTES
    (a size comparison and a coroutine, ~55 ns); past it in a JSON thread (:func:`off_loop`,
    whose rules ``fn`` and ``abandon_on_cancel`` follow)."""
    if size <= OFF_LOOP_BYTES:
        return fn(*args)
    return await off_loop(fn, *args, abandon_on_cancel=abandon_on_cancel)


# CPython's bytes.join lets go of the GIL while it copies a result of 1 MiB or more from
# parts that are all bytes (GIL_THRESHOLD in Objects/stringlib/join.h): past that a
# thread's join holds the loop for nothing (max tick 1.1 ms beside a thread joining
# 40 MB over and over), where on the loop 10 MB took 0.7-2.8 ms and 40 MB 24-40 ms (most
# of it the kernel's faulting in of the new object's pages); below, 0.1 ms or less.
JOIN_OFF_LOOP_BYTES = 1 << 20


async def joined(parts: list[bytes], size: int) -> bytes:
    """A body read in ``parts`` (``size`` bytes in all) as one: past JOIN_OFF_LOOP_BYTES
    joined in a thread from trio's own pool, not a JSON thread (holding no GIL, it keeps
    neither the loop nor the JSON work waiting, and waits for neither), abandoned to a
    request that is cancelled (the parts are its own and never changed again)."""
    if len(parts) == 1:
        return parts[0]
    if size < JOIN_OFF_LOOP_BYTES:
        return b"".join(parts)
    return await trio.to_thread.run_sync(b"".join, parts, abandon_on_cancel=True)
