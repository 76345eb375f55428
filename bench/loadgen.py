"""The load generator: HTTP/1.1 keep-alive over raw non-blocking sockets and one epoll loop.

Runs as its own process (``python -m bench.loadgen SPEC_JSON``, or the spec on stdin) and
prints one JSON object with its results on stdout. Only the standard library is imported,
so it starts in ~30 ms and spends a few microseconds of Python per response.

Why not wrk or httpx: httpx costs ~0.3 ms of CPU per request (stack notes 4), the same
order as the proxy under test, and would share the proxy's two cores; wrk is cheap but
speaks neither "hold 1,000 streams open", "count SSE events / NDJSON lines", "close after
N chunks and note the wall-clock time" nor is it on the CI machine. One generator for every
scenario also keeps the proxy and direct figures comparable, and its own ceiling is
measured in every run (scenario ``loadgen_ceiling``: this generator against nginx).

Modes (``spec["mode"]``):

``closed``
    ``conc`` connections, each sending the next request as soon as the previous response
    is complete (closed loop). ``warmup`` s unrecorded, then ``duration`` s (or ``count``
    completions) recorded. With ``stream`` the responses are streams: chunks are counted
    (``chunk``: "sse" events or "ndjson" lines, after de-chunking) and the time to the first
    response byte (TTFB) and to the first body byte (TTFC) is recorded per stream.
``hold``
    Open ``streams`` long streams (ramped at ``ramp_per_s``), wait until every one has sent
    its first body byte, then time ``probe_count`` fresh requests on another connection;
    the same probe runs once before the streams open (``idle``). Hold ``hold_seconds``
    more, then close every stream; one that ended or failed before that is an error.
``disconnect``
    ``count`` streams, ``conc`` at a time, each on a fresh connection with its own
    ``X-Request-ID``: read ``after_chunks`` chunks, note ``time.time()``, close the socket.

Shared options: ``watch_pids`` (CPU time from ``/proc/PID/stat`` at the edges of the
recorded window, RSS sampled every ``rss_interval`` s), ``probe`` (a sequential request
on its own connection every ``interval`` s during the recorded window; latencies apart).
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import sys
import time

perf = time.perf_counter
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def build_request(host: str, port: int, req: dict) -> bytes:
    method = req.get("method", "POST")
    body = req.get("body", "")
    if not isinstance(body, bytes | bytearray):
        body = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    lines = [f"{method} {req['path']} HTTP/1.1", f"Host: {host}:{port}"]
    for name, value in (req.get("headers") or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + bytes(body)


# --------------------------------------------------------------------------- process stats


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


def _safe(fn, pid: int, default=None):
    try:
        return fn(pid)
    except (OSError, ValueError, IndexError):
        return default


# --------------------------------------------------------------------------- one connection


class Conn:
    """A keep-alive client connection that reads one response at a time.

    ``owner`` gets ``on_head(conn)``, ``on_events(conn, n)`` (streams only) and
    ``on_done(conn, ok)``; it sends the next request itself."""

    __slots__ = (
        "bad",
        "buf",
        "carry",
        "chunked",
        "close_after",
        "events",
        "expect",
        "fd",
        "first_body",
        "first_byte",
        "need",
        "owner",
        "remaining",
        "seen",
        "sep",
        "sock",
        "status",
        "t0",
        "tag",
    )

    def __init__(self, addr: tuple[str, int], owner, sep: bytes | None) -> None:
        sock = socket.create_connection(addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.owner = owner
        self.sep = sep
        self.tag = None
        self.expect = b""  # what a 2xx body must hold to count as an answer (set per send)
        self._reset()

    def _reset(self) -> None:
        self.buf = b""
        self.status = 0
        self.remaining = -1  # body bytes still expected (content-length), -1 = headers pending
        self.chunked = False
        self.need = 0  # bytes left in the current chunk (data + CRLF)
        self.carry = b""
        self.events = 0
        self.first_byte = 0.0
        self.first_body = 0.0
        self.close_after = False
        self.bad = False
        self.seen = b""  # the body's last bytes until ``expect`` is found; None after

    def send(self, data: bytes, now: float) -> None:
        self._reset()
        self.t0 = now
        self.sock.sendall(data)  # requests are small: never blocks on an idle connection

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.owner.on_done(self, False)
            return
        if not self.first_byte:
            self.first_byte = perf()
        if self.remaining < 0:
            buf = self.buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            head = buf[:end].lower()
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.status = 0
            self.close_after = b"\r\nconnection: close" in head
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                self.remaining = int(head[i + 17 : j if j > 0 else len(head)])
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.chunked = True
                self.remaining = 0
            else:
                self.remaining = 1 << 62  # read to EOF
            self.owner.on_head(self)
            data = buf[end + 4 :]
            self.buf = b""
            if not data and (self.remaining == 0 and not self.chunked):
                self.owner.on_done(self, True)
                return
        if self.chunked:
            self._dechunk(data)
        else:
            n = len(data)
            if n and self.sep is not None:
                self._payload(data)
            elif n and self.seen is not None and self.expect:
                self._look(data)
            self.remaining -= n
            if self.remaining <= 0:
                self.owner.on_done(self, True)

    def answered(self) -> bool:
        """Whether the body held what the request's answer must (a 2xx without it, an
        empty ``{}`` say, is no answer: a proxy that never asked the backend is no fast
        proxy)."""
        return not self.expect or self.seen is None

    def _look(self, piece: bytes) -> None:
        joined = self.seen + piece
        if self.expect in joined:
            self.seen = None
        else:
            self.seen = joined[-len(self.expect) :]

    def _payload(self, piece: bytes) -> None:
        if self.seen is not None and self.expect:
            self._look(piece)
        if not self.first_body:
            self.first_body = perf()
        if b'"error"' in piece:
            self.bad = True  # an in-band error line or event
        sep = self.sep
        if sep is None:
            return
        if len(sep) == 1:
            n = piece.count(sep)
        else:
            joined = self.carry + piece
            n = joined.count(sep)
            self.carry = joined[-1:]
        if n:
            self.events += n
            self.owner.on_events(self, n)

    def _dechunk(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        size_ = len(buf)
        while pos < size_:
            need = self.need
            if need:
                take = min(need, size_ - pos)
                data_end = pos + min(take, max(need - 2, 0))
                if data_end > pos:
                    self._payload(buf[pos:data_end])
                self.need = need - take
                pos += take
                continue
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(buf[pos:nl].split(b";", 1)[0], 16)
            if size == 0:
                if size_ < nl + 4:
                    break  # wait for the final CRLF
                self.buf = b""
                self.owner.on_done(self, True)
                return
            self.need = size + 2
            pos = nl + 2
        self.buf = buf[pos:]


# --------------------------------------------------------------------------- the loop


class Loop:
    def __init__(self) -> None:
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}

    def add(self, conn: Conn) -> None:
        self.conns[conn.fd] = conn
        self.ep.register(conn.fd, select.EPOLLIN)

    def drop(self, conn: Conn) -> None:
        if self.conns.pop(conn.fd, None) is not None:
            try:
                self.ep.unregister(conn.fd)
            except (OSError, ValueError):
                pass
        conn.close()

    def poll(self, timeout: float) -> None:
        conns = self.conns
        for fd, _ in self.ep.poll(max(0.0, timeout)):
            conn = conns.get(fd)
            if conn is not None:
                conn.on_readable()


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in qs} | {"mean": None, "max": None, "n": 0}
    s = sorted(values)
    n = len(s)
    out: dict[str, float | None] = {}
    for q in qs:
        # linear interpolation between closest ranks
        k = (n - 1) * q / 100.0
        lo = int(k)
        hi = min(lo + 1, n - 1)
        out[f"p{q}"] = s[lo] + (s[hi] - s[lo]) * (k - lo)
    out["mean"] = sum(s) / n
    out["max"] = s[-1]
    out["min"] = s[0]
    out["n"] = n
    return out


class Watch:
    """CPU and RSS of the watched processes; RSS sampled on a timer from the loop."""

    def __init__(self, pids: list[int], interval: float) -> None:
        self.pids = pids
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.next_at = 0.0
        self.origin = perf()

    def cpu(self) -> float:
        return sum(_safe(cpu_seconds, p, 0.0) for p in self.pids)

    def rss(self) -> int:
        return sum(_safe(rss_bytes, p, 0) for p in self.pids)

    def tick(self, now: float) -> float:
        if not self.pids:
            return 1e9
        if now >= self.next_at:
            self.samples.append((round(now - self.origin, 3), self.rss()))
            self.next_at = now + self.interval
        return self.next_at - now


class Probe:
    """Sequential requests on their own connection, one every ``interval`` s."""

    def __init__(self, loop: Loop, addr, data: bytes, interval: float) -> None:
        self.loop = loop
        self.addr = addr
        self.data = data
        self.interval = interval
        self.lat: list[float] = []
        self.errors = 0
        self.active = False
        self.busy = False
        self.next_at = 0.0
        self.conn = Conn(addr, self, None)
        loop.add(self.conn)

    def tick(self, now: float) -> float:
        if not self.active:
            return 1e9
        if not self.busy and now >= self.next_at:
            self.busy = True
            self.conn.send(self.data, now)
        return max(0.0, self.next_at - now) if not self.busy else 1e9

    def on_head(self, conn: Conn) -> None:
        pass

    def on_events(self, conn: Conn, n: int) -> None:
        pass

    def on_done(self, conn: Conn, ok: bool) -> None:
        now = perf()
        self.busy = False
        self.next_at = now + self.interval
        if ok and 200 <= conn.status < 300:
            self.lat.append((now - conn.t0) * 1000.0)
        else:
            self.errors += 1
        if not ok or conn.close_after:
            self.loop.drop(conn)
            self.conn = Conn(self.addr, self, None)
            self.loop.add(self.conn)

    def close(self) -> None:
        self.loop.drop(self.conn)


# --------------------------------------------------------------------------- closed loop


class Closed:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.addr = (spec["host"], spec["port"])
        host, port = self.addr
        self.reqs = [build_request(host, port, r) for r in spec["requests"]]
        self.expects = [r.get("expect", "").encode() for r in spec["requests"]]
        self.stream = bool(spec.get("stream"))
        self.sep = {"sse": b"\n\n", "ndjson": b"\n"}.get(spec.get("chunk", ""), None)
        if self.stream and self.sep is None:
            self.sep = b"\n\n"
        self.loop = Loop()
        self.recording = False
        self.stopping = False
        self.lat: list[float] = []
        self.ttfb: list[float] = []
        self.ttfc: list[float] = []
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self.done = 0
        self.events = 0
        self.next_req = 0
        self.count = spec.get("count")

    def _fire(self, conn: Conn, now: float) -> None:
        conn.tag = self.recording
        i = self.next_req % len(self.reqs)
        self.next_req += 1
        conn.send(self.reqs[i], now)
        conn.expect = self.expects[i]

    def on_head(self, conn: Conn) -> None:
        pass

    def on_events(self, conn: Conn, n: int) -> None:
        if self.recording:
            self.events += n

    def on_done(self, conn: Conn, ok: bool) -> None:
        now = perf()
        if ok and self.recording:
            st = conn.status
            if 200 <= st < 300 and not conn.answered():
                key = f"{st} without {conn.expect.decode()}"
                self.errors += 1
                self.statuses[key] = self.statuses.get(key, 0) + 1
            elif 200 <= st < 300:
                if conn.tag:  # started inside the recorded window
                    self.lat.append((now - conn.t0) * 1000.0)
                    if self.stream:
                        self.ttfb.append((conn.first_byte - conn.t0) * 1000.0)
                        if conn.first_body:
                            self.ttfc.append((conn.first_body - conn.t0) * 1000.0)
                self.done += 1
            else:
                self.errors += 1
                self.statuses[st] = self.statuses.get(st, 0) + 1
        elif not ok and self.recording:
            self.errors += 1
        if self.stopping:
            return
        if not ok or conn.close_after:
            self.loop.drop(conn)
            try:
                conn = Conn(self.addr, self, self.sep)
            except OSError:
                self.errors += 1
                return
            self.loop.add(conn)
        self._fire(conn, now)
        if self.count and (self.done >= self.count or self.errors >= self.count):
            self.stopping = True  # as many failures as wanted answers: it will not get there

    def run(self) -> dict:
        spec = self.spec
        conc = int(spec["conc"])
        warmup = float(spec.get("warmup", 0.5))
        duration = float(spec.get("duration", 5.0))
        watch = Watch(spec.get("watch_pids") or [], float(spec.get("rss_interval", 0.5)))
        probe = None
        if spec.get("probe"):
            p = spec["probe"]
            probe = Probe(
                self.loop, self.addr, build_request(*self.addr, p), p.get("interval", 0.1)
            )
        conns = [Conn(self.addr, self, self.sep) for _ in range(conc)]
        start = perf()
        for c in conns:
            self.loop.add(c)
            self._fire(c, start)
        rec_at = start + warmup
        # a counted run ends at its count, or at `duration` if one is given first
        end_at = rec_at + duration if duration or not self.count else float("inf")
        cpu0 = cpu1 = 0.0
        t_rec = t_end = 0.0
        loop = self.loop
        while True:
            now = perf()
            if not self.recording and now >= rec_at:
                self.recording = True
                t_rec = now
                cpu0 = watch.cpu()
                for c in loop.conns.values():
                    c.tag = False  # in flight across the edge: counted, not timed
                if probe:
                    probe.active = True
                    probe.next_at = now
            if self.recording and (now >= end_at or self.stopping):
                t_end = now
                cpu1 = watch.cpu()
                break
            wait = min(watch.tick(now), probe.tick(now) if probe else 1e9, 0.05)
            if not self.recording:
                wait = min(wait, rec_at - now)
            else:
                wait = min(wait, end_at - now)
            loop.poll(wait)
        elapsed = t_end - t_rec
        # a request still without a byte of its answer after the whole window (a proxy
        # that holds it) failed, though the cell ended before it could
        unanswered = sum(1 for c in loop.conns.values() if not c.first_byte and c.t0 <= t_rec)
        self.errors += unanswered
        for c in list(loop.conns.values()):
            loop.drop(c)
        result = {
            "mode": "closed",
            "conc": conc,
            "seconds": elapsed,
            "completed": self.done,
            "rps": self.done / elapsed if elapsed > 0 else 0.0,
            "errors": self.errors,
            "unanswered": unanswered,
            "error_statuses": {str(k): v for k, v in self.statuses.items()},
            "latency_ms": percentiles(self.lat),
        }
        if self.stream:
            result["ttfb_ms"] = percentiles(self.ttfb)
            result["ttfc_ms"] = percentiles(self.ttfc)
            result["chunks"] = self.events
            result["chunks_per_s"] = self.events / elapsed if elapsed > 0 else 0.0
        if watch.pids:
            result["cpu_s"] = cpu1 - cpu0
            result["cpu_frac"] = (cpu1 - cpu0) / elapsed if elapsed > 0 else 0.0
            result["rss_samples"] = watch.samples
            result["rss_end"] = watch.rss()
        if probe:
            result["probe_ms"] = percentiles(probe.lat)
            result["probe_errors"] = probe.errors
            probe.close()
        return result


# --------------------------------------------------------------------------- hold streams


class Hold:
    """Hold many streams open, time fresh requests next to them, then walk away from all.

    An error is a stream that got a non-200 status, an in-band error, no first chunk, or
    that ended (or broke) before the generator closed it; plus failed connects."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.addr = (spec["host"], spec["port"])
        self.stream_req = build_request(*self.addr, spec["stream_request"])
        self.probe_req = build_request(*self.addr, spec["probe"])
        self.loop = Loop()
        self.streams: list[Conn] = []
        self.first_seen = 0
        self.ended_early = 0
        self.connect_errors = 0
        self.events = 0
        self.error_statuses: dict[int, int] = {}
        self.probe_errors = 0

    def on_head(self, conn: Conn) -> None:
        if conn.status != 200:
            self.error_statuses[conn.status] = self.error_statuses.get(conn.status, 0) + 1

    def on_events(self, conn: Conn, n: int) -> None:
        if conn.events == n:
            self.first_seen += 1
        self.events += n

    def on_done(self, conn: Conn, ok: bool) -> None:
        self.ended_early += 1
        conn.tag = "ended"
        self.loop.drop(conn)

    def _probe(self, n: int, watch: Watch) -> list[float]:
        probe = Probe(self.loop, self.addr, self.probe_req, self.spec.get("probe_interval", 0.02))
        probe.active = True
        probe.next_at = perf()
        while len(probe.lat) + probe.errors < n:
            now = perf()
            self.loop.poll(min(probe.tick(now), watch.tick(now), 0.05))
        probe.close()
        self.probe_errors += probe.errors
        return probe.lat

    def _wait(self, seconds: float, watch: Watch, until=None) -> None:
        deadline = perf() + seconds
        while perf() < deadline and not (until and until()):
            now = perf()
            self.loop.poll(min(0.05, watch.tick(now), max(0.0, deadline - now)))

    def run(self) -> dict:
        spec = self.spec
        n = int(spec["streams"])
        ramp = float(spec.get("ramp_per_s", 500))
        watch = Watch(spec.get("watch_pids") or [], float(spec.get("rss_interval", 0.5)))
        sep = {"sse": b"\n\n", "ndjson": b"\n"}[spec.get("chunk", "sse")]
        probes = int(spec.get("probe_count", 50))
        rss_idle = watch.rss()
        idle = self._probe(probes, watch)
        t0 = perf()
        opened = 0
        while opened < n:
            now = perf()
            due = min(n, int((now - t0) * ramp) + 1)
            while opened < due:
                opened += 1
                try:
                    c = Conn(self.addr, self, sep)
                except OSError:
                    self.connect_errors += 1
                    continue
                self.loop.add(c)
                c.send(self.stream_req, now)
                self.streams.append(c)
            self.loop.poll(min(0.005, watch.tick(now)))
        t_sent = perf() - t0
        self._wait(
            float(spec.get("first_chunk_timeout", 60)),
            watch,
            until=lambda: self.first_seen + self.ended_early >= len(self.streams),
        )
        t_all_open = perf() - t0
        open_at_probe = len(self.loop.conns)
        rss_open = watch.rss()
        busy = self._probe(probes, watch)
        rss_open = max(rss_open, watch.rss())
        self._wait(float(spec.get("hold_seconds", 5)), watch)
        rss_open = max(rss_open, max((s[1] for s in watch.samples), default=0))
        no_first = sum(1 for c in self.streams if not c.events and c.tag != "ended")
        in_band = sum(1 for c in self.streams if c.bad)
        still_open = sum(1 for c in self.streams if c.tag != "ended")
        t_close = perf()
        for c in list(self.loop.conns.values()):
            self.loop.drop(c)
        bad_status = sum(self.error_statuses.values())
        errors = self.connect_errors + self.ended_early + no_first + in_band + bad_status
        # the proxy's memory once every client is gone
        self._wait(float(spec.get("after_seconds", 2)), watch)
        return {
            "mode": "hold",
            "streams": n,
            "sent_after_s": t_sent,
            "all_open_after_s": t_all_open,
            "open_during_probe": open_at_probe,
            "still_open_at_close": still_open,
            "held_s": t_close - t0,
            "errors": errors,
            "connect_errors": self.connect_errors,
            "ended_early": self.ended_early,
            "no_first_chunk": no_first,
            "in_band_errors": in_band,
            "error_statuses": {str(k): v for k, v in self.error_statuses.items()},
            "probe_errors": self.probe_errors,
            "chunks": self.events,
            "idle_ms": percentiles(idle),
            "busy_ms": percentiles(busy),
            "rss_idle": rss_idle,
            "rss_open": rss_open,
            "rss_after_close": watch.rss(),
            "rss_samples": watch.samples,
        }


# --------------------------------------------------------------------------- disconnects


class Disconnect:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.addr = (spec["host"], spec["port"])
        self.loop = Loop()
        self.after = int(spec.get("after_chunks", 3))
        self.sep = {"sse": b"\n\n", "ndjson": b"\n"}[spec.get("chunk", "sse")]
        self.closed: list[dict] = []
        self.errors = 0
        self.inflight = 0

    def on_head(self, conn: Conn) -> None:
        pass

    def on_events(self, conn: Conn, n: int) -> None:
        if conn.events >= self.after and conn.tag is not None:
            wall = time.time()
            self.loop.drop(conn)
            self.closed.append({"request_id": conn.tag, "closed_at": wall})
            conn.tag = None
            self.inflight -= 1

    def on_done(self, conn: Conn, ok: bool) -> None:
        # the stream ended (or broke) before we could walk away: not a disconnect sample
        if conn.tag is not None:
            self.errors += 1
            self.inflight -= 1
            conn.tag = None
        self.loop.drop(conn)

    def run(self) -> dict:
        spec = self.spec
        total = int(spec["count"])
        conc = int(spec.get("conc", 8))
        prefix = spec.get("id_prefix", "bench-disc")
        req = dict(spec["request"])
        started = 0
        t0 = perf()
        deadline = t0 + float(spec.get("timeout", 120))
        while (started < total or self.inflight > 0) and perf() < deadline:
            while started < total and self.inflight < conc:
                rid = f"{prefix}-{started}"
                headers = dict(req.get("headers") or {})
                headers["X-Request-ID"] = rid
                data = build_request(*self.addr, {**req, "headers": headers})
                c = Conn(self.addr, self, self.sep)
                c.tag = rid
                self.loop.add(c)
                c.send(data, perf())
                started += 1
                self.inflight += 1
            self.loop.poll(0.05)
        for c in list(self.loop.conns.values()):
            self.loop.drop(c)
        return {
            "mode": "disconnect",
            "count": total,
            "closed": self.closed,
            "errors": self.errors,
            "seconds": perf() - t0,
        }


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            return soft
    return want


def run(spec: dict) -> dict:
    raise_nofile()
    mode = spec.get("mode", "closed")
    runner = {"closed": Closed, "hold": Hold, "disconnect": Disconnect}[mode](spec)
    t_cpu = time.process_time()
    result = runner.run()
    result["loadgen_cpu_s"] = time.process_time() - t_cpu
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    raw = argv[0] if argv else sys.stdin.read()
    spec = json.loads(raw)
    result = run(spec)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
