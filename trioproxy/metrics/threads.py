"""The worker threads the metrics read in, apart from everyone else's.

``trio.to_thread.run_sync`` borrows from one limiter of 40 threads per run by default,
shared with the backend connections' name resolutions (``getaddrinfo`` runs in a thread
for every new connection to a backend named by host name). A burst of new connections
under a slow resolver held all 40 (measured: 168 connections at 2 s per resolution kept
``GET /v1/metrics`` of a 6,000-request window waiting 5.9 s for a thread), so a scrape or
a health check timed out for want of a thread. The metrics borrow from a limiter of their
own instead: :data:`METRICS_THREADS` threads, beside trio's 40, and their reads (at most two
renderings of a kind, two window copies) never take a thread from a resolution either.
The workers' shared Responses API ledger writes in them too (``shared_ledger``): a queued
background answer waits for its entry.
"""

from __future__ import annotations

import trio
from trio.lowlevel import RunVar

METRICS_THREADS = 4

_limiter: RunVar[trio.CapacityLimiter] = RunVar("trioproxy_metrics_threads")


def metrics_threads() -> trio.CapacityLimiter:
    """This run's limiter for the metrics' worker threads."""
    try:
        return _limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(METRICS_THREADS)
        _limiter.set(limiter)
        return limiter
