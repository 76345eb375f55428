"""What the primary series are made of: each family's label names, the histograms'
bucket bounds, and the fixed sets of some label values (upstream failure reasons, the
reasons a stream had no first token).

Both the code that declares and updates the series (:mod:`.series`) and the code that
reads them back into totals (:func:`.derived.aggregate`) go by these, so they live
apart from both: neither of those modules imports the other for them.
"""

from __future__ import annotations

from . import store

LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    20,
    40,
    80,
    160,
    320,
    640,
    1280,
)
FIRST_BYTE_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,  # STREAM_FIRST_TOKEN_TIMEOUT's default: a first token that came just in time
)
# OpenTelemetry's gen_ai.server.time_per_output_token buckets, with three below 10 ms for
# the fast local models (vLLM, llama.cpp) a proxy like this one fronts
TOKEN_GAP_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
OVERHEAD_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1,
)

UPSTREAM_REASONS: tuple[str, ...] = (
    "connect",
    "timeout",
    "status_4xx",
    "status_429",  # the backend's rate limit: not the client's mistake, nor a failure of it
    "status_5xx",
    "protocol",
    "other",
)

# why a Responses API WebSocket closed: its client closed it (or went away), it idled
# past WEBSOCKET_IDLE_TIMEOUT, the proxy stopped, a message was over MAX_REQUEST_BYTES
# (1009), it sent messages faster than they were answered (1008), a fault in the proxy
WEBSOCKET_CLOSE_REASONS: tuple[str, ...] = (
    "client",
    "idle",
    "shutdown",
    "too_big",
    "flood",
    "error",
)

REQUEST_LABELS = ("api", "endpoint", "method", "model", "status")
DURATION_LABELS = ("api", "endpoint", "model")
# whether the request was a stream ("true"/"false"): a stream is timed to its last token,
# so a latency alert on plain requests needs to leave streams out
REQUEST_DURATION_LABELS = (*DURATION_LABELS, "stream")
STREAM_LABELS = ("api", "endpoint", "model", "outcome")
NO_TOKEN_LABELS = ("api", "endpoint", "model", "reason")
NO_TOKEN_REASONS = store.NO_TOKEN_REASONS  # the window's filtered summaries use them too
FLOW_LABELS = ("api", "endpoint")
TOKEN_LABELS = ("api", "model", "type")
