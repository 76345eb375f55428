"""The backend connection pool and the retry policy.

One pool per worker, sharded over several httpx clients, each carrying one request at a
time while there are enough of them (``ShardPicker``). One httpx client shared by
concurrent requests slows down sharply: httpcore scans every pooled connection (a
readability syscall each) whenever a request is assigned (stack notes P4), and it hands
an idle HTTP/1.1 connection to every request that asks before the first one has started
on it; all but one then fail with ``ConnectionNotAvailable`` and go round again
(encode/httpcore#822, #1110). At 64 concurrent requests over 8 round-robin clients, 54 %
of requests went round at least once and the slowest 1 % four times, which tripled the
p99 (docs/performance-history.md). Retries happen only before anything reached the client:
``send`` returns once the backend's headers (streams) or whole body (non-streams) are in
hand, and a caller never calls it again for the same client request once it has sent
bytes, so a stream is never replayed.

Requests go straight to the transport that serves the backend's URL (httpx's connection
pool, with any ``HTTPS_PROXY`` from the environment already applied), not through
``AsyncClient.send``: the client layers add nothing a proxy wants (redirects are not
followed, auth is a fixed header) and one is harmful: a shared cookie jar would carry a
``Set-Cookie`` from one user's reply into every later user's request. Skipping them also
skips ~10 % of the CPU per request (URL merge, cookie extraction; docs/performance-history.md).
"""

from __future__ import annotations

import email.utils
import functools
import logging
import math
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import httpx
import trio
from httpx._utils import get_environment_proxies

from . import netstream
from .config import ConfigError, Settings, redact_url
from .errors import (
    BackendSecrets,
    BadUpstreamResponse,
    OutOfFiles,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
    scrub,
    upstream_error_message,
)
from .json_threads import joined
from .limits import open_files_limit, out_of_files

if TYPE_CHECKING:
    from .keepalive import EarlyStart

log = logging.getLogger("trioproxy.upstream")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
KEEPALIVE_EXPIRY = 4.0  # seconds an idle backend connection is kept (and swept after)
MAX_ERROR_BODY = 64 * 1024
ERROR_BODY_SECONDS = 5.0
# What a backend says about retrying and its rate limits, for the client: the openai SDK
# obeys x-should-retry first and prefers retry-after-ms to retry-after; x-ratelimit-*
# (OpenAI, OpenRouter, Azure, LiteLLM) is what clients pace themselves by.
FORWARDED_RESPONSE_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")
FORWARDED_HEADER_PREFIX = "x-ratelimit-"
MAX_FORWARDED_HEADERS = 16


def forwarded_headers(headers: httpx.Headers, secrets: BackendSecrets) -> dict[str, str]:
    """The backend's retry and rate-limit headers (bounded in number), to pass on; a
    backend that echoes our credentials in one does not hand them to the client."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        if name in FORWARDED_RESPONSE_HEADERS or name.startswith(FORWARDED_HEADER_PREFIX):
            out[name] = scrub(value, secrets)
        elif name == "x-request-id":
            # the backend's id for the call (OpenAI's req_..., which its support asks
            # for), beside the proxy's own X-Request-ID
            out[UPSTREAM_REQUEST_ID] = scrub(value, secrets)[:MAX_UPSTREAM_ID_CHARS]
        else:
            continue
        if len(out) == MAX_FORWARDED_HEADERS:
            break
    return out


UPSTREAM_REQUEST_ID = "x-upstream-request-id"
MAX_UPSTREAM_ID_CHARS = 200


_FIXED_PATHS = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/responses",
        "/responses/input_tokens",
        "/responses/compact",
        "/models",
    }
)


# what ``request`` sets per request (and httpx per body): a default header of one of these
# names would be replaced, so such defaults leave requests to httpx (``_quick_head``)
_PER_REQUEST_HEADERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"x-request-id",
        b"content-type",
        b"traceparent",
        b"tracestate",
    }
)


class UpstreamObserver(Protocol):
    def upstream_error(self, reason: str) -> None: ...
    def upstream_retry(self, reason: str) -> None: ...


class _NullObserver:
    def upstream_error(self, reason: str) -> None:
        pass

    def upstream_retry(self, reason: str) -> None:
        pass


class ShardPicker:
    """Which httpx client carries the next request: an idle one if any, the one that became
    idle last (so a quiet proxy keeps reusing one warm connection and the others' expire),
    else the least busy. Plain bookkeeping, no I/O: ``acquire`` when a request starts,
    ``release`` once its response is closed."""

    __slots__ = ("_busy", "_idle")

    def __init__(self, shards: int) -> None:
        self._busy = [0] * shards
        self._idle = list(range(shards - 1, -1, -1))  # a stack: shard 0 on top

    def acquire(self) -> int:
        if self._idle:
            shard = self._idle.pop()
        else:
            busy = self._busy
            shard = busy.index(min(busy))
        self._busy[shard] += 1
        return shard

    def release(self, shard: int) -> None:
        self._busy[shard] -= 1
        if self._busy[shard] == 0:
            self._idle.append(shard)

    def in_flight(self) -> list[int]:
        return list(self._busy)


@dataclass(slots=True)
class UpstreamResult:
    response: httpx.Response
    started: float  # perf_counter when the first attempt was sent
    headers_at: float  # perf_counter when the backend's headers arrived
    attempts: int
    release: Callable[[], None] | None = None  # hands the client back (streams, at close)

    @property
    def first_byte_ms(self) -> float:
        return (self.headers_at - self.started) * 1000.0

    async def aclose(self) -> None:
        """Close the response and hand its client back; safe to call more than once."""
        try:
            await self.response.aclose()
        finally:
            release, self.release = self.release, None
            if release is not None:
                release()


_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")


def check_client_environment(settings: Settings) -> None:
    """Build what the backend clients are built from (the CA certificates, the proxies
    in the environment) once before serving: a mistake there is a ConfigError naming the
    variable, not a traceback from the app's start after the proxy said it listens."""
    _client(_tls_context(settings))


def _tls_context(settings: Settings) -> ssl.SSLContext:
    try:
        return httpx.create_ssl_context(verify=not settings.disable_ssl_verification)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        given = [f"{name}={os.environ[name]}" for name in _CA_VARIABLES if os.environ.get(name)]
        where = f" ({', '.join(given)})" if given else ""
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot load the CA certificates{where}: {reason}") from None


def _client(tls: ssl.SSLContext, **options: Any) -> httpx.AsyncClient:
    try:
        return httpx.AsyncClient(verify=tls, **options)
    except (httpx.InvalidURL, ValueError, ImportError) as exc:
        # httpx quotes the proxy URL, and a password with an unencoded "/" or "#" breaks
        # it where redacting it would miss: only the variables and their schemes are named
        given = [
            f"{variable} ({_scheme_of(value)})"
            for name in _PROXY_VARIABLES
            for variable in (name, name.lower())
            if (value := os.environ.get(variable))
        ]
        why = (
            "its URL does not parse (in a user name or password, '/', '?', '#' and '@' "
            "must be percent-encoded)"
            if isinstance(exc, httpx.InvalidURL)
            else "httpx takes http://, https://, socks5:// and socks5h:// proxy URLs"
        )
        named = ", ".join(given) or "none found"
        raise ConfigError(f"a proxy in the environment cannot be used: {named}: {why}") from None


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _scheme_of(url: str) -> str:
    """What a proxy URL may show of itself in an error: its scheme (a URL written without
    one, "user:password@host", would otherwise be shown whole)."""
    found = _SCHEME.match(url)
    return f"{found[0]}..." if found else "no scheme"


def _proxy_for(client: httpx.AsyncClient, url: httpx.URL) -> str | None:
    """The proxy (from HTTP_PROXY, HTTPS_PROXY, ALL_PROXY) through which ``client``
    reaches ``url``, credentials shown as ``***``; None when it connects directly."""
    chosen = client._transport_for_url(url)
    proxies = get_environment_proxies()
    for pattern, transport in client._mounts.items():
        if transport is chosen and (proxy := proxies.get(pattern.pattern)):
            return redact_url(proxy)
    return None


class UpstreamPool:
    def __init__(
        self,
        settings: Settings,
        observer: UpstreamObserver | None = None,
        *,
        transport_factory: Callable[[], httpx.AsyncBaseTransport] | None = None,
    ) -> None:
        base_url = settings.require_upstream()
        self._settings = settings
        self._observer = observer or _NullObserver()
        self._secrets = settings.backend_secrets
        shards = max(1, settings.upstream_clients)
        keepalive = max(1, math.ceil(settings.upstream_max_keepalive / shards))
        base, _, query = base_url.partition("?")
        url = httpx.URL(base + "/")
        # sent with every request: Azure OpenAI's deployments need their ?api-version=
        self._base_params = httpx.QueryParams(query) if query else None
        self._base_url = url.copy_with(username=None, password=None)
        headers = httpx.Headers(
            {"Accept": "*/*", "Accept-Encoding": "gzip, deflate", "User-Agent": "trioproxy"}
        )
        headers.update(settings.credential_headers())
        # the operator's (UPSTREAM_HEADERS), in any case: may replace User-Agent or Accept
        headers.update(settings.upstream_headers)
        self._default_headers = headers
        # one TLS context for all clients: each would otherwise load the CA bundle again
        tls = _tls_context(settings)
        # The clients only hold the connection pools (limits, TLS, environment proxies):
        # requests are built here and handed to their transports.
        self._clients = [
            _client(
                tls,
                limits=httpx.Limits(
                    max_connections=None,
                    max_keepalive_connections=keepalive,
                    # below hypercorn's 5 s keep-alive so we never reuse a socket the
                    # server is about to close (stack notes P13)
                    keepalive_expiry=KEEPALIVE_EXPIRY,
                ),
                transport=transport_factory() if transport_factory else None,
            )
            for _ in range(shards)
        ]
        self._transports = [client._transport_for_url(self._base_url) for client in self._clients]
        # failures to connect are the proxy's, not the backend's, when there is one
        self._proxy = _proxy_for(self._clients[0], self._base_url)
        # run by the app (``read_deadlines.run``); until then reads time themselves
        self.read_deadlines = netstream.ReadDeadlines()
        for transport in self._transports:
            netstream.install(transport, self.read_deadlines)
        self._urls: dict[str, httpx.URL] = {}
        self._timeouts = httpx.Timeout(
            settings.request_timeout, connect=settings.connect_timeout, pool=None
        ).as_dict()
        self._picker = ShardPicker(shards)
        self._head = self._quick_head()
        # the backend has answered since the start: its host name resolved then, so a
        # name the resolver now says does not exist is passing (does_not_resolve)
        self._reached = False

    @property
    def base_url(self) -> str:
        params = f"?{self._base_params}" if self._base_params is not None else ""
        return str(self._base_url) + params

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._base_url.join(path.lstrip("/"))
            if self._base_params is not None:
                url = url.copy_merge_params(self._base_params)
            # our routes' fixed paths only: a path with an id or a query is not worth keeping
            if path in _FIXED_PATHS:
                self._urls[path] = url
        return url

    async def sweep_idle(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Close the clients' idle connections past their keep-alive (or closed by the
        backend), every ``KEEPALIVE_EXPIRY`` s. httpcore does so only when that client's
        pool gets its next request: after a burst, a client the traffic no longer reached
        kept its share of UPSTREAM_MAX_KEEPALIVE sockets open (those the backend closed,
        in CLOSE-WAIT) until traffic came back to it. Run by the app's nursery."""
        task_status.started()
        while True:
            await trio.sleep(KEEPALIVE_EXPIRY)
            for transport in self._transports:
                await _sweep(transport)

    def set_observer(self, observer: UpstreamObserver) -> None:
        self._observer = observer

    def in_flight(self) -> list[int]:
        """Requests in flight per client (for tests and diagnostics)."""
        return self._picker.in_flight()

    def _build(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], stream: bool
    ) -> httpx.Request:
        timeouts = _stream_timeouts(self._settings) if stream else self._timeouts
        head = self._head
        if body and head is not None and path in _FIXED_PATHS:
            # what httpx builds below, without its header merging (a third of a request's
            # own CPU in the pool): the same headers in the same order (_quick_head)
            raw = [*head, (b"Content-Length", b"%d" % len(body))]
            raw += [
                (name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()
            ]
            quick = httpx.Request(
                method,
                self._url(path),
                headers=raw,
                stream=httpx.ByteStream(body),
                extensions={"timeout": timeouts},
            )
            quick._content = body  # as httpx's read() of a body given whole leaves it
            return quick
        req = httpx.Request(
            method,
            self._url(path),
            headers=self._default_headers,
            content=body,
            extensions={"timeout": timeouts},
        )
        req.headers.update(headers)
        return req

    def _quick_head(self) -> list[tuple[bytes, bytes]] | None:
        """The headers httpx gives a request with a body to one of our fixed paths before
        its Content-Length and our own per-request headers (``_build``), read off a
        request httpx builds here: None (httpx builds every request) when the operator's
        headers hold one that httpx or ``request`` would have set or replaced."""
        # the fixed paths are below the base URL: the same Host
        sample = httpx.Request("POST", self._base_url, headers=self._default_headers, content=b"{}")
        raw = sample.headers.raw
        *head, length = raw
        if (
            length != (b"Content-Length", b"2")
            or {name.lower() for name, _ in head} & _PER_REQUEST_HEADERS
        ):
            return None
        return head

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        request_id: str | None = None,
        client_retries: bool = False,
        trace: dict[str, str] | None = None,
        stream: bool = False,
        header_timeout: float | None = None,
        early: EarlyStart | None = None,
    ) -> UpstreamResult:
        """Send with retries. Non-streams come back fully read; streams after the headers.

        ``trace``: the client's W3C trace context headers, sent on.
        Raises UpstreamStatusError for a backend error status (body read, bounded),
        UpstreamUnavailable / UpstreamTimeout for transport failures.
        ``header_timeout`` bounds the wait for a streamed response's headers, over all the
        attempts together: it is the stream's first-token deadline, which a retry does not
        restart (a backend failing after most of it, twice, had each retry wait it whole,
        and a retry started after it ran out sent the backend a request only to cut its
        answer at once). A retry that could not start before it runs out is not made: the
        client gets the last failure, as when the attempts are spent. A client that
        retries by itself (``client_retries``) gets the failure at once: its retries, with
        the waits it chooses within its own timeout, would multiply with the proxy's (an
        SDK's 3 attempts times 4 = 12 backend calls). Only a pooled connection the backend
        had closed is tried again for it: that failure is the pool's, not the backend's
        answer. Nor is a stream's whose response started before the backend answered
        (``early``, STREAM_KEEPALIVE_SECONDS): that client has its 200 and cannot retry.
        """
        headers = {"X-Request-ID": request_id} if request_id else {}
        if trace is not None:  # the client's trace context (exchange.trace_context)
            headers.update(trace)
        if body is not None:
            headers["Content-Type"] = "application/json"
        started = time.perf_counter()
        headers_by = trio.current_time() + header_timeout if header_timeout else math.inf
        attempt = 0
        while True:
            attempt += 1
            req = self._build(method, path, body, headers, stream)
            shard = self._picker.acquire()
            try:
                response, headers_at = await self._attempt(
                    self._transports[shard], req, stream, header_timeout, headers_by
                )
            except _Retryable as retry:
                self._picker.release(shard)
                backoff = self._backoff(attempt, retry.reason, retry.retry_after)
                if (
                    attempt > self._settings.max_retries
                    or (
                        client_retries
                        and not _stale_connection(retry, attempt)
                        and not (early is not None and early.committed)
                    )
                    or trio.current_time() + backoff >= headers_by
                ):
                    self._observer.upstream_error(retry.reason)
                    raise retry.final from None
                self._observer.upstream_retry(retry.reason)
                await trio.sleep(backoff)
                continue
            except BaseException:
                self._picker.release(shard)
                raise
            if not stream:
                self._picker.release(shard)
                return UpstreamResult(response, started, headers_at, attempt)
            return UpstreamResult(
                response,
                started,
                headers_at,
                attempt,
                functools.partial(self._picker.release, shard),
            )

    async def _attempt(
        self,
        transport: httpx.AsyncBaseTransport,
        req: httpx.Request,
        stream: bool,
        header_timeout: float | None,
        headers_by: float,
    ) -> tuple[httpx.Response, float]:
        sent_at = time.perf_counter()
        try:
            # a plain scope, not trio.fail_at: its generator context manager cost ~11k
            # machine instructions per stream
            with trio.CancelScope(deadline=headers_by) if header_timeout else _NO_DEADLINE as scope:
                response = await transport.handle_async_request(req)
                response.request = req
        except httpx.HTTPError as exc:
            stale = _on_a_stale_connection(exc, time.perf_counter() - sent_at)
            raise self._transport_failure(exc, stale=stale) from None
        if scope is not None and scope.cancelled_caught:
            self._observer.upstream_error("timeout")
            raise UpstreamTimeout(
                f"the backend did not start answering within {header_timeout:g} s "
                "(STREAM_FIRST_TOKEN_TIMEOUT)"
            )
        headers_at = time.perf_counter()
        self._reached = True
        if response.status_code >= 400:
            if response.status_code > MAX_HTTP_STATUS:
                await self._refuse_status(response)
            await self._raise_for_status(response)
        if response.status_code >= 300:
            await self._refuse_redirect(response)
        if not stream:
            try:
                await self._read_whole(response)
            except httpx.HTTPError as exc:
                raise self._transport_failure(exc, body_started=True) from None
            finally:
                await response.aclose()
        return response, headers_at

    async def _read_whole(self, response: httpx.Response) -> None:
        """``response.aread()``, bounded by MAX_RESPONSE_BYTES (decoded): a backend body
        that never ends, or a small gzip body that unpacks to gigabytes, is a 502, not a
        worker that runs out of memory."""
        limit = self._settings.max_response_bytes
        # httpx bounds each read, not the body: one that trickles a byte at a time would
        # hold the request (and its slot) for ever. A clock read per read, not a cancel
        # scope per request: the bound is this plus at most one read's timeout.
        timeout = self._settings.request_timeout
        deadline = time.perf_counter() + timeout
        parts: list[bytes] = []
        size = 0
        next_part = netstream.body_reader(response)
        while (part := await next_part()) is not None:
            if time.perf_counter() > deadline:
                self._observer.upstream_error("timeout")
                raise UpstreamTimeout(
                    f"the backend's response did not complete within {timeout:g} s "
                    "(REQUEST_TIMEOUT)"
                )
            size += len(part)
            if size > limit:
                self._observer.upstream_error("protocol")
                raise BadUpstreamResponse(
                    f"the backend's response is larger than {limit} bytes (MAX_RESPONSE_BYTES)"
                )
            parts.append(part)
        # what aread() keeps: response.content works as after it
        response._content = parts[0] if len(parts) == 1 else await joined(parts, size)

    def _transport_failure(
        self, exc: httpx.HTTPError, *, body_started: bool = False, stale: bool = False
    ) -> Exception:
        """The exception to raise for a transport error: retryable ones are wrapped. Once
        the response has started, nothing is retried: the backend did the work already."""
        if isinstance(exc, httpx.ConnectError) and (exhausted := out_of_files(exc)):
            # the proxy's own exhaustion: neither retried nor counted against the backend
            return OutOfFiles(exhausted, open_files_limit())
        unavailable = UpstreamUnavailable(self._describe(exc))
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            if not self._reached and does_not_resolve(exc):
                # a configuration error, not a passing one: asked again, the resolver gives
                # the same answer (after the backoff that kept the client waiting). Once
                # the name resolved, its absence passes: a backend container restarting
                # (Docker's DNS), a headless Kubernetes service without a ready pod
                # (NXDOMAIN both), macOS without a network (EAI_NONAME there)
                self._observer.upstream_error("connect")
                return unavailable
            return _Retryable("connect", unavailable)
        if body_started and not isinstance(exc, httpx.TimeoutException):
            # a body cut (reset, closed early) or unreadable (corrupt gzip): a broken
            # answer, as the same failure of a stream is counted
            self._observer.upstream_error("protocol")
            return unavailable
        if stale:
            # a pooled connection the backend had already closed (llama.cpp's server
            # closes after every streamed reply): safe to retry, nothing was sent back
            return _Retryable("protocol", unavailable)
        if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
            # the backend broke off while it had the request: it may have worked on it
            # (a generation, a background response), so it is not asked again
            self._observer.upstream_error("protocol")
            return unavailable
        if isinstance(exc, httpx.TimeoutException):
            self._observer.upstream_error("timeout")
            return UpstreamTimeout(self._describe(exc))
        self._observer.upstream_error("other")
        return unavailable

    async def _raise_for_status(self, response: httpx.Response) -> None:
        body = b""
        try:
            # a stream's reads have no timeout of their own: an error body that stalls
            # must not hold the request (the status says enough without it)
            with trio.move_on_after(min(ERROR_BODY_SECONDS, self._settings.request_timeout)):
                body = await _read_bounded(response, MAX_ERROR_BODY)
        except httpx.HTTPError:
            pass
        finally:
            await response.aclose()
        status = response.status_code
        message = scrub(upstream_error_message(body, status), self._secrets)
        forwarded = forwarded_headers(response.headers, self._secrets)
        error = UpstreamStatusError(
            message,
            status,
            body=body,
            content_type=response.headers.get("content-type", ""),
            headers=forwarded,
        )
        # a backend that says a retry would not help (the openai SDK's own rule) is believed
        if status in RETRY_STATUSES and response.headers.get("x-should-retry") != "false":
            retry_after = _retry_after_seconds(response.headers)
            if retry_after is None or retry_after <= self._settings.retry_backoff_max:
                raise _Retryable(_status_reason(status), error, retry_after)
        self._observer.upstream_error(_status_reason(status))
        raise error

    async def _refuse_status(self, response: httpx.Response) -> NoReturn:
        """h11 reads any three digits as a status; past 599 HTTP defines none, and passed
        on it would reach the client unchanged and the metrics as no status class."""
        await response.aclose()
        self._observer.upstream_error("protocol")
        raise BadUpstreamResponse(
            f"the backend answered with status {response.status_code}, which HTTP does not define"
        )

    async def _refuse_redirect(self, response: httpx.Response) -> NoReturn:
        """A backend redirect is not followed (a request would silently go elsewhere, with
        the backend key) nor passed on (the client would leave the proxy): it is a 502
        that names where the backend points, so the base URL can be corrected."""
        await response.aclose()
        try:
            target = response.request.url.join(response.headers.get("location", ""))
            named = str(target.copy_with(query=None, fragment=None, username=None, password=None))
        except (httpx.InvalidURL, UnicodeError):
            named = "an address that is not a valid URL"
        self._observer.upstream_error("protocol")
        raise BadUpstreamResponse(
            scrub(
                f"the backend redirects ({response.status_code}) to {named}; redirects are "
                "not followed: set OPENAI_API_BASE_URL to the backend's address",
                self._secrets,
            )
        )

    def _backoff(self, attempt: int, reason: str, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        if reason == "protocol" and attempt == 1:
            return 0.0  # a stale pooled connection: the fresh one should just work
        base = self._settings.retry_backoff * (2.0 ** (attempt - 1))
        capped = min(self._settings.retry_backoff_max, base)
        return capped * random.uniform(0.5, 1.0)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, httpx.ConnectTimeout):
            # its own words are trio's ("cancelled due to deadline", or a nursery's)
            detail = (
                f"no connection to the backend (TCP and TLS) within "
                f"{self._settings.connect_timeout:g} s (CONNECT_TIMEOUT)"
            )
        elif isinstance(exc, httpx.ReadTimeout):
            # its own words say "the read timeout": which setting, and how long, is what
            # an operator has to know (only non-streaming requests read with one here)
            detail = (
                f"no data from the backend within {self._settings.request_timeout:g} s "
                "(REQUEST_TIMEOUT)"
            )
        elif isinstance(exc, httpx.WriteTimeout):
            # a backend that stopped taking the request (its body): trio's words again.
            # Only non-streams write with a timeout (a stream's wait is its first token's)
            detail = (
                f"the backend took none of the request for {self._settings.request_timeout:g} s "
                "(REQUEST_TIMEOUT)"
            )
        elif self._proxy is None and isinstance(exc, httpx.ConnectError):
            detail = connect_failure(exc, self._base_url) or failure_detail(exc)
        else:
            detail = failure_detail(exc)
        if self._proxy is not None and isinstance(
            exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.ProxyError
        ):
            detail += f" (connecting through the proxy {self._proxy} from the environment)"
        return scrub(f"backend request failed: {detail}", self._secrets)


async def _sweep(transport: object) -> None:
    """What httpcore's pool does to its connections whenever a request comes or goes."""
    pool = netstream.pool_of(transport)
    if pool is None or not pool._connections:
        return
    with pool._optional_thread_lock:
        closing = pool._assign_requests_to_connections()
    await pool._close_connections(closing)


def connect_failure(exc: BaseException, url: httpx.URL) -> str | None:
    """Why a connection to the backend at ``url`` failed, naming it: its host name that
    does not resolve, or each address tried and why (trio says only "all attempts to
    connect to HOST:PORT failed"); None when the cause is neither (a TLS handshake)."""
    where = f"{_host_in_url(url.host)}:{url.port or (443 if url.scheme == 'https' else 80)}"
    for cause in _causes(exc):
        if isinstance(cause, socket.gaierror):
            reason = cause.strerror or str(cause)
            return f"cannot resolve the backend's host name {url.host!r} ({reason})"
        if isinstance(cause, BaseExceptionGroup):
            attempts = [_refusal(attempt) for attempt in cause.exceptions]
            if [address for address, _ in attempts] == [url.host]:  # the one address given
                return f"cannot connect to {where} ({attempts[0][1]})"
            tried = "; ".join(f"{address or '?'}: {reason}" for address, reason in attempts)
            return f"cannot connect to {where} ({tried})"
    return None


# getaddrinfo's answers that say the name has no address, and will not have one when asked
# again: no such name (NXDOMAIN), a name with no address (of the family asked for); and
# arguments the resolver refuses. EAI_AGAIN ("Temporary failure in name resolution": a DNS
# server that did not answer or failed, SERVFAIL) and the rest (EAI_FAIL, EAI_SYSTEM,
# EAI_MEMORY) may pass, and are retried as any failure to connect.
_NO_SUCH_NAME = frozenset(
    getattr(socket, name)
    for name in (
        "EAI_NONAME",
        "EAI_NODATA",
        "EAI_ADDRFAMILY",
        "EAI_SERVICE",
        "EAI_FAMILY",
        "EAI_SOCKTYPE",
        "EAI_BADFLAGS",
    )
    if hasattr(socket, name)  # EAI_NODATA, EAI_ADDRFAMILY: glibc's, not every platform's
)


def does_not_resolve(exc: BaseException) -> bool:
    """Whether a failure to connect is a host name that has no address (the backend's,
    or that of the proxy from the environment): a name the resolver says does not
    exist, not one it could not look up this time (:data:`_NO_SUCH_NAME`). Final only
    until the backend first answered (``UpstreamPool._reached``)."""
    return any(
        isinstance(cause, socket.gaierror) and cause.errno in _NO_SUCH_NAME
        for cause in _causes(exc)
    )


def _causes(exc: BaseException) -> Iterator[BaseException]:
    cause: BaseException | None = exc
    for _ in range(6):  # a cycle in a cause chain must not hang us
        if cause is None:
            return
        yield cause
        cause = cause.__cause__ or cause.__context__


# trio's words for one address that failed: "Error connecting to ('::1', 80, 0, 0): ..."
_ATTEMPT = re.compile(r"Error connecting to \('([^']*)', (\d+)[^)]*\): (.*)", re.DOTALL)


def _refusal(attempt: BaseException) -> tuple[str, str]:
    """The address one attempt went to ("" if unknown) and why it failed."""
    words = (attempt.strerror if isinstance(attempt, OSError) else None) or str(attempt)
    if found := _ATTEMPT.fullmatch(words):
        address, _, reason = found.groups()
        return address, reason.lower()
    return "", words


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def failure_detail(exc: BaseException) -> str:
    """What went wrong, in words: the exception's message or, when it has none, the first
    cause that has one. httpx's ConnectError over trio says nothing; a failed TLS
    handshake's reason (``certificate verify failed: self-signed certificate``, a server
    that does not speak TLS) is in its cause's cause, and it is what tells an operator
    to set SSL_CERT_FILE or fix the URL's scheme."""
    cause: BaseException | None = exc
    for _ in range(6):  # a cycle in a cause chain must not hang us
        if cause is None:
            break
        if text := str(cause):
            return text if cause is exc else f"{type(exc).__name__}: {text}"
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__


def _status_reason(status: int) -> str:
    if status == 429:
        return "status_429"
    # 501: the backend lacks what the client asked for, the client's mistake here as in
    # the request metrics; the UpstreamErrors alert must not fire on it
    return "status_5xx" if status >= 500 and status != 501 else "status_4xx"


MAX_HTTP_STATUS = 599  # RFC 9110 15: status codes are 100-599
# how soon a request on a reused connection must fail for the failure to be the backend's
# close of that idle connection crossing it (an EOF or a reset within a round trip), not
# the backend giving up on the request after working on it
STALE_FAILURE_SECONDS = 1.0


def _on_a_stale_connection(exc: httpx.HTTPError, elapsed: float) -> bool:
    """Whether a failure before any answer is the pool's stale connection: the request
    could not be written whole (the backend cannot have answered it), or it went out on
    a connection that had served a response before and broke at once."""
    if isinstance(exc, httpx.WriteError):
        return True
    if not isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return False
    return netstream.wrote_on_reused.get() and elapsed < STALE_FAILURE_SECONDS


class _Retryable(Exception):
    def __init__(self, reason: str, final: Exception, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.final = final
        self.retry_after = retry_after


class _NoDeadline:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_DEADLINE = _NoDeadline()


def _stream_timeouts(settings: Settings) -> dict[str, float | None]:
    # No read or write timeout until the headers: sending the request and waiting for its
    # answer are bounded by the first-token timeout alone (header_timeout), since a backend
    # may load a model first (a write timeout of 60 s of its own cut a backend that took the
    # body slowly before the first-token timeout, in trio's words). The relay then makes
    # STREAM_IDLE_TIMEOUT the read timeout of the body (relay._idle_as_read_timeout).
    return {"connect": settings.connect_timeout, "read": None, "write": None, "pool": None}


async def _read_bounded(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    next_part = netstream.body_reader(response)
    while size < limit and (chunk := await next_part()) is not None:
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit]


def _stale_connection(retry: _Retryable, attempt: int) -> bool:
    return retry.reason == "protocol" and attempt == 1


def _retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The wait a backend asks for: ``retry-after-ms`` first (OpenAI's, finer), as the
    openai SDK reads them, then ``retry-after`` in seconds or as an HTTP date."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            waited = float(milliseconds) / 1000.0
        except ValueError:
            pass
        else:
            if math.isfinite(waited):
                return max(0.0, waited)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = parsed.timestamp() - time.time()
    return max(0.0, seconds)
