"""The record of one request: what the proxy fills in and the collector consumes.

Plain data plus a few helpers for stream measurements; no I/O, no web framework.
Times are taken from ``time.perf_counter()`` (monotonic); ``timestamp`` is wall-clock
UTC seconds at request start, for display and time-range filters only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    # -- the guide's public fields (RequestMetrics(endpoint=..., method=..., ...)) --
    endpoint: str
    method: str
    status_code: int = 0
    duration_ms: float = 0.0
    request_size: int = 0
    response_size: int = 0
    model: str = ""
    error: str | None = None
    timestamp: float = field(default_factory=time.time)
    streaming: bool = False
    # -- what the proxy adds --
    api: str = ""
    client: str = ""  # the client's name, with PROXY_API_KEYS
    start: float = field(default_factory=time.perf_counter)
    upstream_ms: float | None = None  # backend latency: request sent -> response complete
    upstream_first_byte_ms: float | None = None  # request sent -> the backend's headers
    # a stream's own time in the proxy: before the backend was asked, and from its headers
    # to the proxy's (the wait for the first token is the model's, not the proxy's)
    overhead_ms: float | None = None
    body_wait_ms: float = 0.0  # request start -> its body read: the client's time, not ours
    # -- streaming (measured to the last byte) --
    first_byte_time_ms: float | None = None  # request start -> first body byte sent
    first_token_time_ms: float | None = None  # request start -> first generated content
    last_token_time_ms: float | None = None  # request start -> last generated content
    token_chunks: int = 0  # chunks with generated content seen (about one token each)
    replayed: bool = False  # a stream replaying a response generated before (no TTFT)
    last_byte_time_ms: float | None = None
    total_chunks: int = 0
    stream_bytes: int = 0
    stream_outcome: str | None = None  # completed | cancelled | timeout | error
    stream_cancelled: bool = False
    stream_timeout: bool = False
    # a stream request answered with a plain error reply before its stream began: a
    # stream by its outcome, but that reply is no stream traffic (bytes, chunks, TTFB)
    answered_plainly: bool = False
    # -- tokens --
    input_tokens: int | None = None
    output_tokens: int | None = None
    tokens_counted: bool = False  # True when output tokens were counted from chunks, not usage
    # the status when a stream's first body byte went out: what the response started with,
    # kept when a break rewrites status_code later (a shutdown's 503), so the model label
    # still follows the backend's acceptance; 0 before any byte (and for non-streams)
    started_status: int = 0

    def elapsed_ms(self, now: float | None = None) -> float:
        return ((time.perf_counter() if now is None else now) - self.start) * 1000.0

    def add_chunk(self, size: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        at_ms = (now - self.start) * 1000.0
        if self.first_byte_time_ms is None:
            self.first_byte_time_ms = at_ms
            self.started_status = self.status_code
        self.last_byte_time_ms = at_ms
        self.total_chunks += 1
        self.stream_bytes += size

    def mark_first_token(self, now: float | None = None) -> None:
        if self.first_token_time_ms is None:
            self.first_token_time_ms = self.elapsed_ms(now)

    def finish(self, now: float | None = None) -> None:
        """Set ``duration_ms`` (only if not already set by the caller)."""
        if not self.duration_ms:
            self.duration_ms = self.elapsed_ms(now)

    def transfer_ms(self) -> float:
        """How long a stream's bytes flowed: first token -> last byte. From the first
        token, not the first byte: an OpenAI stream's first byte (its role chunk) goes out
        before the model's first token, so a slow first token (its own metric) would
        read as slow streaming on one API and not on the other. A stream without a token
        (or replayed) spans first byte -> last byte; one whose span is 0 (a single
        chunk) request start -> last byte, so its bytes never come with zero time."""
        last = self.last_byte_time_ms
        if not self.stream_bytes or last is None:
            return 0.0
        for start in (self.first_token_time_ms, self.first_byte_time_ms, 0.0):
            if start is not None and last > start:
                return last - start
        return 0.0

    @property
    def throughput_bytes_per_second(self) -> float:
        """Bytes over :meth:`transfer_ms`; never 0 for a stream that sent bytes."""
        span_ms = self.transfer_ms()
        return self.stream_bytes / (span_ms / 1000.0) if span_ms > 0 else 0.0

    @property
    def avg_chunk_size(self) -> float:
        return self.stream_bytes / self.total_chunks if self.total_chunks else 0.0
