"""Scenarios 3a-3i of issue 5, each proxy figure next to the direct-backend figure of the same run.

Everything here orchestrates: servers come from :mod:`bench.servers`, load from the
generator process (:mod:`bench.loadgen`, started once per measured cell), and the figures
go into one results dict that :mod:`bench.report` turns into the table, JSON and plots.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import interrupts, servers
from .report import WORKERS_BUSY_CORES
from .rounds import median, merge_rounds, paired_ratios, ratio, rotated_orders, run_rounds
from .servers import ROOT, Server

# --------------------------------------------------------------------------- request bodies

MESSAGES = [{"role": "user", "content": "Say hello to the benchmark."}]
OPENAI_BODY = {"model": "demo-chat", "messages": MESSAGES}
OLLAMA_BODY = {"model": "demo-chat", "messages": MESSAGES, "stream": False}
V1 = "/v1/chat/completions"
OLLAMA = "/api/chat"
PROM = "/v1/metrics/prometheus"
# the scrape scenario sends what Prometheus sends on every scrape by default, so it measures
# the answer operators get: OpenMetrics first, gzip. Captured from Debian's Prometheus 2.42.0
# (no protobuf feature flag) scraping a listener; 3.x's default scrape_protocols ask for the
# same formats in the same order, with escaping=allow-utf-8 (which 2.x leaves out, so it
# gets escaping=underscores). The timeout header is the default scrape_timeout's (10 s).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,"
    "application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
SCRAPER_HEADERS = {
    "User-Agent": "Prometheus/2.42.0",
    "Accept": PROMETHEUS_ACCEPT,
    "Accept-Encoding": "gzip",
    "X-Prometheus-Scrape-Timeout-Seconds": "10",
}


def chat_request(path: str, *, stream: bool = False, directives: str = "") -> dict[str, Any]:
    content = "Say hello to the benchmark." + (" " + directives if directives else "")
    body: dict[str, Any] = {
        "model": "demo-chat",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }
    return {"method": "POST", "path": path, "body": json.dumps(body)}


# "expect": what a 2xx body must hold to count as an answer
NONSTREAM = {
    V1: {"method": "POST", "path": V1, "body": json.dumps(OPENAI_BODY), "expect": '"choices"'},
    OLLAMA: {
        "method": "POST",
        "path": OLLAMA,
        "body": json.dumps(OLLAMA_BODY),
        "expect": '"message"',
    },
}


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    quick: bool
    cell: float  # recorded seconds per closed-loop cell
    warmup: float
    concs: tuple[int, ...] = (1, 4, 16, 32, 64)
    stream_cell: float = 6.0
    stream_conc: int = 32
    stream_tokens: int = 100
    stream_delay: float = 0.01
    ttfb_cell: float = 3.0
    disconnects: int = 200
    hold_streams: int = 1000
    hold_seconds: float = 10.0  # after all are open and the probe ran
    hold_delay: float = 1.0
    rounds: int = 4  # 1 vs 2 workers, alternated
    round_cell: float = 4.0
    workers_warmup: float = 1.0  # each side's pools and caches, before its rounds
    # metrics on/off: fresh twin pairs, each measured in alternated rounds. Identical twins
    # differ by 1-3 % here even with one hash seed, so pairs count more than rounds: 12
    # pairs bring the median's error to about 1 %, against a 3 % target
    onoff_pairs: int = 12
    onoff_rounds: int = 3
    onoff_cell: float = 2.0
    drift_requests: int = 100_000
    drift_seconds: float = 0.0  # 0: as long as the requests take
    drift_warmup: float = 2.0
    drift_conc: int = 16
    drift_settle: float = 1.0  # quiet before each RSS reading
    scrape_cell: float = 15.0
    scrape_conc: int = 4
    # --compare: trioproxy's /v1 cell and each compared proxy's, in alternated rounds
    # (3a: the cell's 5 s in 4 rounds; 3b: the relay's 6 s in 4 rounds)
    compare_rounds: int = 4
    compare_cell: float = 1.25
    compare_stream_cell: float = 1.5

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if not quick:
            return cls(quick=False, cell=5.0, warmup=1.0)
        return cls(
            quick=True,
            cell=0.8,
            warmup=0.3,
            stream_cell=1.0,
            ttfb_cell=0.8,
            disconnects=40,
            hold_seconds=1.0,
            rounds=2,
            round_cell=1.0,
            workers_warmup=0.5,
            onoff_pairs=2,
            onoff_rounds=2,
            onoff_cell=1.0,
            # at most 10k requests, and no more than 6 s of them: the quick run stays
            # under 2 minutes on a machine ~2x slower than a normal one
            drift_requests=10_000,
            drift_seconds=6.0,
            drift_warmup=1.0,
            drift_settle=0.5,
            scrape_cell=2.5,
            # 4 rounds of 0.5 s rather than 1 s split: a spread of two rounds says little,
            # and an odd number lets one side lead more often
            compare_rounds=4,
            compare_cell=0.5,
            compare_stream_cell=0.5,
        )


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line stderr bar; a ticker thread moves it inside long steps by their estimate."""

    def __init__(self, steps: list[tuple[str, float]], stream=None, enabled: bool = True) -> None:
        self.estimates = dict(steps)
        self.total = sum(self.estimates.values()) or 1.0
        self.done = 0.0
        self.label = ""
        self.step_est = 0.0
        self.step_t0 = time.monotonic()
        self.t0 = time.monotonic()
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream is not None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, daemon=True, name="bench-progress")
            self._thread.start()

    def begin(self, name: str, label: str | None = None) -> None:
        with self._lock:
            self.label = label or name
            self.step_est = self.estimates.get(name, 1.0)
            self.step_t0 = time.monotonic()
        self.draw(force=True)

    def end(self) -> None:
        with self._lock:
            self.done += self.step_est
            self.step_est = 0.0
        self.draw(force=True)

    def _tick(self) -> None:
        while not self._stop.wait(0.5 if self.tty else 10.0):
            self.draw()

    def draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            inside = min(time.monotonic() - self.step_t0, self.step_est * 0.95)
            frac = min(1.0, (self.done + inside) / self.total)
            label = self.label
        width = 30
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        elapsed = time.monotonic() - self.t0
        line = f"[{bar}] {frac * 100:5.1f}%  {elapsed:5.0f} s  {label[:60]}"
        if self.tty:
            self.stream.write("\r" + line.ljust(110))
        elif force:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- helpers


def loadgen(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run one generator process with *spec*; its JSON result."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def target_of(server: Server) -> dict[str, Any]:
    return {"host": server.host, "port": server.port}


def closed(
    server: Server,
    requests: list[dict[str, Any]],
    conc: int,
    *,
    duration: float,
    warmup: float,
    watch: list[int] | None = None,
    keep_samples: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    spec = {
        **target_of(server),
        "mode": "closed",
        "requests": requests,
        "conc": conc,
        "duration": duration,
        "warmup": warmup,
        "watch_pids": watch or [],
        **extra,
    }
    # a counted run ends after `count` answers (or as many failures); the limit only stops
    # a generator that hangs
    limit = (duration + warmup) * 3 + 60 if not extra.get("count") else 900.0
    result = loadgen(spec, timeout=limit)
    if not keep_samples:
        result.pop("rss_samples", None)
    return result


def http_json(url: str, method: str = "GET", data: bytes | None = None) -> Any:
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def rss_of(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def p(result: dict[str, Any], key: str, q: str) -> float | None:
    block = result.get(key) or {}
    return block.get(q)


def sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _cpu_busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle, sum(fields[:8])


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("trioproxy", "trio", "quart", "quart-trio", "hypercorn", "httpx", "httpcore",
                 "h11", "psutil", "prometheus-client", "matplotlib"):  # fmt: skip
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    nginx = servers.nginx_path()
    commit = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            or None
        )
    except OSError:
        pass
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        mem = None
    return {
        "cpu_model": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "versions": versions,
        "nginx": servers._version([nginx, "-v"]) if nginx else None,
        "loadavg_before": list(os.getloadavg()),
        "git_commit": commit,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


# --------------------------------------------------------------------------- the bench


STEPS_FULL = [
    ("start", 8),
    ("ceiling", 14),
    ("nonstream", 130),
    ("stream", 59),
    ("disconnect", 15),
    ("metrics_onoff", 225),
    ("scrape", 22),
    ("drift", 160),
    ("workers", 45),
    ("hold", 40),
]
STEPS_QUICK = [
    ("start", 8),
    ("ceiling", 3),
    ("nonstream", 24),
    ("stream", 13),
    ("disconnect", 5),
    ("metrics_onoff", 16),
    ("scrape", 4),
    ("drift", 10),
    ("workers", 8),
    ("hold", 14),
]


@dataclass
class Bench:
    plan: Plan
    progress: Progress
    log: Any = None  # callable(str) for notes as they happen
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: list[Server] = field(default_factory=list)
    only: set[str] = field(default_factory=set)
    compare: dict[str, str] = field(default_factory=dict)  # name -> command line
    others: dict[str, Server] = field(default_factory=dict)
    unstarted: set[str] = field(default_factory=set)  # compared proxies that did not start

    # -- plumbing ---------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.notes.append(text)
        if self.log:
            self.log(text)

    def start(self, server: Server) -> Server:
        """``server``, to be stopped by stop_all (in the list already if launched while
        the run tracks its servers)."""
        if server not in self.started:
            self.started.append(server)
        return server

    def _check_log(self, server: Server) -> None:
        text = server.log()
        if "Traceback" in text or " ERROR " in text:
            tail = text[-600:].replace("\n", " | ")
            self.note(f"{server.name} logged errors during the run (tail: {tail})")

    def stop(self, server: Server | None) -> None:
        if server is None:
            return
        server.stop()
        self._check_log(server)
        if server in self.started:
            self.started.remove(server)

    def stop_all(self) -> None:
        """Stop every server, deaf to a second Ctrl-C or SIGTERM meanwhile: each server is
        a process group of its own, so one left behind by an interrupted cleanup would
        outlive the bench."""
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in interrupts.STOPS}
        try:
            for server in reversed(self.started):
                try:
                    server.stop()
                    self._check_log(server)
                except Exception:
                    pass
            self.started.clear()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def step(self, name: str, fn, label: str | None = None) -> None:
        self.progress.begin(name, label)
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:  # one broken scenario must not lose the others
            self.results.setdefault("scenarios", {})[name] = {
                "error": f"{type(exc).__name__}: {exc}"
            }
            self.note(f"scenario {name} failed: {type(exc).__name__}: {exc}")
        finally:
            self.results.setdefault("step_seconds", {})[name] = round(time.monotonic() - t0, 1)
            self.progress.end()

    def put(self, name: str, value: dict[str, Any]) -> None:
        self.results.setdefault("scenarios", {})[name] = value

    # -- run --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        busy0, _ = _cpu_busy_jiffies()
        self_cpu0 = _own_cpu()
        self.results["machine"] = machine_info()
        self.results["mode"] = "quick" if self.plan.quick else "full"
        self.results["plan"] = self.plan.__dict__.copy()
        self.progress.start()
        with servers.tracked(self.started):
            try:
                self.step("start", self._start_servers, "starting nginx, demo, bare ASGI, proxies")
                for name, fn, label in (
                    ("ceiling", self.s_ceiling, "generator ceiling (direct to the backend)"),
                    ("nonstream", self.s_nonstream, "3a/3i non-streaming, c=1..64"),
                    ("stream", self.s_stream, "3b streaming relay"),
                    ("disconnect", self.s_disconnect, "3d client disconnect"),
                    ("metrics_onoff", self.s_metrics_onoff, "3e metrics on vs off"),
                    ("scrape", self.s_scrape, "3g scrape under load"),
                    ("drift", self.s_drift, f"3f RSS drift, {self.plan.drift_requests} requests"),
                    ("workers", self.s_workers, "3h 1 vs 2 workers"),
                    ("hold", self.s_hold, f"3c {self.plan.hold_streams} open streams"),
                ):
                    if self.fixed is not None and (not self.only or name in self.only):
                        self.step(name, fn, label)
            finally:
                self.stop_all()
                self.progress.close()
        busy1, _ = _cpu_busy_jiffies()
        elapsed = time.monotonic() - t0
        ours = _own_cpu() - self_cpu0
        tck = os.sysconf("SC_CLK_TCK")
        busy_s = (busy1 - busy0) / tck
        machine = self.results["machine"]
        machine["loadavg_after"] = list(os.getloadavg())
        machine["busy_cores_avg"] = round(busy_s / elapsed, 3)
        machine["bench_cores_avg"] = round(ours / elapsed, 3)
        machine["other_cores_avg"] = round(max(0.0, busy_s - ours) / elapsed, 3)
        self.results["duration_s"] = round(elapsed, 1)
        self.results["notes"] = self.notes
        self.results["compare_failed"] = sorted(self.unstarted)
        return self.results

    # -- servers ----------------------------------------------------------------------

    fixed: Server | None = None
    fixed_kind: str = ""
    bare: Server | None = None
    demo: Server | None = None
    proxy: Server | None = None  # -> fixed backend, metrics on (the main subject)
    proxy_stream: Server | None = None  # -> demo backend

    def _start_servers(self) -> None:
        try:
            self.fixed = self.start(servers.start_nginx()) if servers.nginx_path() else None
        except RuntimeError as exc:
            self.note(f"nginx did not start ({exc}); using the bare ASGI app instead")
            self.fixed = None
        # launched side by side, each known to stop_all from its first moment; the stream
        # proxy's backend, the demo, names its address once it answers
        self.demo = self.start(servers.launch_demo(token_delay=0.005))
        self.bare = self.start(servers.launch_bare_asgi())
        # the same app on hypercorn with trioproxy's patches: shown next to the ceiling so
        # the share of the proxy's gain that comes from the server layer is visible
        self.bare_patched = self.start(servers.launch_bare_asgi(with_trioproxy_patches=True))
        if self.fixed is None:
            self.fixed = self.bare.ready()
            self.fixed_kind = "bare-asgi (nginx not installed: FALLBACK)"
            self.note(
                "nginx is not installed: the fixed backend is the bare ASGI app, which is "
                "~30x slower than nginx; direct figures are those of the bare app"
            )
        else:
            self.fixed_kind = self.fixed.note or "nginx"
        self.proxy = self.start(servers.launch_proxy(self.fixed.url + "/v1", name="proxy"))
        self.demo.ready()
        self.proxy_stream = self.start(
            servers.launch_proxy(self.demo.url + "/v1", name="proxy-stream")
        )
        # compared proxies start alongside (LiteLLM's takes 10-30 s)
        launched = self._launch_compared(self.fixed.url + "/v1")
        servers.ready_all([self.bare, self.bare_patched, self.proxy, self.proxy_stream])
        for name, server in launched.items():
            ready = self._ready_compared(server)
            if isinstance(ready, Exception):
                self.unstarted.add(name)
                self.note(f"could not start {name} for comparison: {ready}")
            else:
                self.others[name] = ready
        self.results["servers"] = {
            "fixed_backend": self.fixed_kind,
            "demo_backend": "trioproxy.demo (hypercorn trio worker)",
            "proxy": "python -m trioproxy (1 worker, default settings)",
            "compared": dict(self.compare),
        }

    # -- generator ceiling ------------------------------------------------------------

    def s_ceiling(self) -> None:
        plan = self.plan
        out = {}
        for conc in (1, 64):
            r = closed(self.fixed, [NONSTREAM[V1]], conc, duration=plan.cell, warmup=plan.warmup)
            out[f"c{conc}"] = r
        out["backend"] = self.fixed_kind
        self.put("ceiling", out)

    # -- 3a + 3i ----------------------------------------------------------------------

    def s_nonstream(self) -> None:
        plan = self.plan
        rows: dict[str, dict[str, Any]] = {"direct": {}, "bare_asgi": {}, V1: {}, OLLAMA: {}}
        paired: dict[str, dict[int, Any]] = {}  # compared proxy -> c -> trioproxy / it
        watch = [self.proxy.pid]
        for conc in plan.concs:
            kw = {"duration": plan.cell, "warmup": plan.warmup}
            rows["direct"][conc] = closed(self.fixed, [NONSTREAM[V1]], conc, **kw)
            rows["bare_asgi"][conc] = closed(
                self.bare, [NONSTREAM[V1]], conc, watch=[self.bare.pid], **kw
            )
            if conc == 32:
                patched = self.bare_patched
                rows["bare_asgi_patched"] = {
                    conc: closed(patched, [NONSTREAM[V1]], conc, watch=[patched.pid], **kw)
                }
            if not self.others:
                for path in (V1, OLLAMA):
                    rows[path][conc] = closed(
                        self.proxy, [NONSTREAM[path]], conc, watch=watch, **kw
                    )
                continue
            rows[OLLAMA][conc] = closed(self.proxy, [NONSTREAM[OLLAMA]], conc, watch=watch, **kw)
            cells, orders = self._nonstream_rounds(conc)
            for name, cell in cells.items():
                rows.setdefault(name, {})[conc] = cell
            for name in self.others:
                pair = paired_ratios(cells[V1], cells[name]) | {"orders": orders}
                paired.setdefault(name, {})[conc] = pair
        added: dict[str, dict[int, dict[str, float | None]]] = {}
        for path in (V1, OLLAMA, *self.others):
            added[path] = {}
            for conc in plan.concs:
                r, d = rows[path][conc], rows["direct"][conc]
                added[path][conc] = {
                    "p50": sub(p(r, "latency_ms", "p50"), p(d, "latency_ms", "p50")),
                    "p99": sub(p(r, "latency_ms", "p99"), p(d, "latency_ms", "p99")),
                    "rps": r["rps"],
                    # a cell of rounds has the median of its rounds' CPU per request
                    "cpu_ms_per_req": r.get("cpu_ms_per_req")
                    or (
                        (r["cpu_s"] / r["completed"] * 1000)
                        if r["completed"] and "cpu_s" in r
                        else None
                    ),
                }
        out = {"cells": _str_keys(rows), "added": _str_keys(added)}
        if self.others:
            out["paired"] = _str_keys(paired)
            out["rounds"] = plan.compare_rounds
        self.put("nonstream", out)

    def _nonstream_rounds(self, conc: int) -> tuple[dict[str, Any], list[list[str]]]:
        """trioproxy's /v1 cell and each compared proxy's at ``conc``, in alternated
        rounds; each one's cell merged over its rounds, and the orders they ran in."""
        plan = self.plan
        servers_ = {V1: self.proxy, **self.others}

        def measure(name: str, i: int) -> dict[str, Any]:
            server = servers_[name]
            # later rounds only reopen connections: the servers are warm already
            warmup = plan.warmup if i == 0 else min(plan.warmup, 0.3)
            watch = [server.pid] if name == V1 else server.pids()
            return closed(server, [NONSTREAM[V1]], conc, duration=plan.compare_cell,
                          warmup=warmup, watch=watch)  # fmt: skip

        orders = rotated_orders(list(servers_), plan.compare_rounds)
        by_round = run_rounds(orders, measure)
        return {name: merge_rounds(cells) for name, cells in by_round.items()}, orders

    # -- 3b ---------------------------------------------------------------------------

    def s_stream(self) -> None:
        plan = self.plan
        directives = f"[[tokens={plan.stream_tokens}]][[delay={plan.stream_delay}]]"
        direct_req = chat_request(V1, stream=True, directives=directives)
        reqs = {
            "direct": (self.demo, direct_req, "sse", [self.demo.pid]),
            V1: (self.proxy_stream, direct_req, "sse", [self.proxy_stream.pid]),
            OLLAMA: (
                self.proxy_stream,
                chat_request(OLLAMA, stream=True, directives=directives),
                "ndjson",
                [self.proxy_stream.pid],
            ),
        }
        out: dict[str, Any] = {"tokens": plan.stream_tokens, "token_delay_s": plan.stream_delay}
        # time to first byte with one stream at a time (nothing else in the way)
        ttfb = {}
        one = "[[tokens=5]][[delay=0.001]]"
        for name, (server, req, chunk, _) in reqs.items():
            path = req["path"]
            r = closed(
                server,
                [chat_request(path, stream=True, directives=one)],
                1,
                duration=plan.ttfb_cell,
                warmup=plan.warmup,
                stream=True,
                chunk=chunk,
            )
            ttfb[name] = r
        # relay rate and CPU per chunk with stream_conc streams; next to the proxy, the
        # stack's floor for a relay (bench/relay_floor.py): hypercorn and httpx with nothing
        # between them, and hypercorn over a raw socket
        floors = {
            "floor_httpx": self.start(servers.launch_relay_floor(self.demo.url)),
            "floor_raw": self.start(servers.launch_relay_floor(self.demo.url, raw=True)),
        }
        compared = self._compared_relays()  # launched and waited for as the floors start
        servers.ready_all(list(floors.values()))
        floors.update(compared)
        for name, server in floors.items():
            # a compared proxy may run workers or sit behind a wrapper: its whole tree
            watch = server.pids() if name in compared else [server.pid]
            reqs[name] = (server, direct_req, "sse", watch)
        relay: dict[str, Any] = {}
        try:
            self._relay_cells(reqs, relay, alternated=(V1, *compared) if compared else ())
        finally:
            for server in floors.values():
                server.stop()
        if compared:
            out["paired"] = {name: paired_ratios(relay[V1], relay[name]) for name in compared}
            out["rounds"] = plan.compare_rounds
        added = {}
        for path in (V1, OLLAMA):
            added[path] = {
                "ttfb_p50": sub(
                    p(ttfb[path], "ttfb_ms", "p50"), p(ttfb["direct"], "ttfb_ms", "p50")
                ),
                "ttfb_p99": sub(
                    p(ttfb[path], "ttfb_ms", "p99"), p(ttfb["direct"], "ttfb_ms", "p99")
                ),
                "ttfc_p50": sub(
                    p(ttfb[path], "ttfc_ms", "p50"), p(ttfb["direct"], "ttfc_ms", "p50")
                ),
                "ttfc_p99": sub(
                    p(ttfb[path], "ttfc_ms", "p99"), p(ttfb["direct"], "ttfc_ms", "p99")
                ),
                "ttfb_p50_loaded": sub(
                    p(relay[path], "ttfb_ms", "p50"), p(relay["direct"], "ttfb_ms", "p50")
                ),
                "cpu_us_per_chunk": relay[path]["cpu_us_per_chunk"],
                "chunks_per_s": relay[path]["chunks_per_s"],
            }
        out.update({"ttfb_c1": ttfb, "relay": relay, "added": added})
        self.put("stream", out)

    def _compared_relays(self) -> dict[str, Any]:
        """The proxies given with --compare, each started again in front of the demo
        backend, so their /v1 stream relay is measured like trioproxy's."""
        started = {}
        for name, server in self._launch_compared(self.demo.url + "/v1").items():
            ready = self._ready_compared(server)
            if isinstance(ready, Exception):
                self.note(f"could not start {name} for the stream relay: {ready}")
            else:
                started[name] = ready
        return started

    def _launch_compared(self, upstream: str) -> dict[str, Server | Exception]:
        """Every compared proxy that has not failed to start before, launched in front of
        ``upstream`` (or the exception its launch raised: no such program, say)."""
        launched: dict[str, Server | Exception] = {}
        for name, command in self.compare.items():
            if name in self.unstarted:
                continue  # it did not start for 3a: not another minute of waiting
            try:
                launched[name] = self.start(servers.launch_external(name, command, upstream))
            except Exception as exc:
                launched[name] = exc
        return launched

    def _ready_compared(self, launched: Server | Exception) -> Server | Exception:
        """The launched compared proxy once it answers, or why it did not start (then it
        is stopped, by its wait, and forgotten)."""
        if isinstance(launched, Exception):
            return launched
        try:
            return launched.ready()
        except Exception as exc:
            self.started.remove(launched)
            return exc

    def _relay_cells(
        self, reqs: dict[str, Any], relay: dict[str, Any], alternated: tuple[str, ...] = ()
    ) -> None:
        """One cell per relay; those named in ``alternated`` (trioproxy's /v1 and the
        compared proxies) in alternated rounds instead, each merged over its rounds."""
        plan = self.plan

        def measure(name: str, duration: float) -> dict[str, Any]:
            server, req, chunk, watch = reqs[name]
            # a full warm-up every round: the streams of a fresh generator start together
            r = closed(server, [req], plan.stream_conc, duration=duration,
                       warmup=max(plan.warmup, 1.0), stream=True, chunk=chunk,
                       watch=watch)  # fmt: skip
            r["cpu_us_per_chunk"] = r["cpu_s"] / r["chunks"] * 1e6 if r.get("chunks") else None
            return r

        cells = {name: measure(name, plan.stream_cell) for name in reqs if name not in alternated}
        if alternated:
            orders = rotated_orders(alternated, plan.compare_rounds)
            by_round = run_rounds(orders, lambda name, _: measure(name, plan.compare_stream_cell))
            cells.update({name: merge_rounds(rounds) for name, rounds in by_round.items()})
        relay.update((name, cells[name]) for name in reqs)  # in the order of reqs, as before

    # -- 3d ---------------------------------------------------------------------------

    def s_disconnect(self) -> None:
        plan = self.plan
        base = self.demo.url
        directives = "[[tokens=2000]][[delay=0.02]]"
        cases = {
            "direct": (self.demo, chat_request(V1, stream=True, directives=directives), "sse"),
            V1: (self.proxy_stream, chat_request(V1, stream=True, directives=directives), "sse"),
            OLLAMA: (
                self.proxy_stream,
                chat_request(OLLAMA, stream=True, directives=directives),
                "ndjson",
            ),
        }
        out: dict[str, Any] = {}
        for name, (server, req, chunk) in cases.items():
            http_json(base + "/_demo/reset", method="POST", data=b"")
            prefix = f"bench-{name.strip('/').replace('/', '-')}-{int(time.time() * 1000)}"
            r = loadgen(
                {
                    **target_of(server),
                    "mode": "disconnect",
                    "request": req,
                    "count": plan.disconnects,
                    "conc": 10,
                    "after_chunks": 3,
                    "chunk": chunk,
                    "id_prefix": prefix,
                },
                timeout=300,
            )
            time.sleep(0.5)  # let the last closes reach the backend
            events = {
                e["request_id"]: e
                for e in http_json(base + "/_demo/events")["events"]
                if e.get("request_id")
            }
            deltas = []
            not_closed = 0
            for closed_ in r["closed"]:
                e = events.get(closed_["request_id"])
                if not e or e.get("outcome") != "disconnected" or e.get("ended") is None:
                    not_closed += 1
                    continue
                deltas.append((e["ended"] - closed_["closed_at"]) * 1000.0)
            from .loadgen import percentiles

            out[name] = {
                "samples": len(r["closed"]),
                "backend_closed_ms": percentiles(deltas),
                "not_closed": not_closed,
                "stream_errors": r["errors"],
            }
        self.put("disconnect", out)

    # -- 3e ---------------------------------------------------------------------------

    def s_metrics_onoff(self) -> None:
        # Fresh twins that differ only in METRICS_ENABLED. The shared proxy is not one of
        # them: it has served every earlier scenario, and a process that served minutes of
        # load measured slower than a fresh twin with the same settings. Two fresh twins
        # with *identical* settings measured up to 9 % apart too (A/A test; hash seeds and
        # memory layout differ per process; docs/performance.md). So the twins of a pair
        # share one PYTHONHASHSEED, every pair has another, the pairs take turns at which
        # twin starts first, and the ratio is the median over all pairs' rounds.
        plan = self.plan
        upstream = self.fixed.url + "/v1"
        reqs = [NONSTREAM[V1], NONSTREAM[OLLAMA]]
        rounds = []
        for pair in range(plan.onoff_pairs):
            off_env = {"METRICS_ENABLED": "false"}
            twins: list[tuple[str, dict[str, str]]] = [("on", {}), ("off", off_env)]
            if pair % 2:
                twins.reverse()
            seed = str(pair + 1)
            procs = {}
            try:
                for name, env in twins:  # launched in this order, started side by side
                    proxy = servers.launch_proxy(
                        upstream, name=f"proxy-metrics-{name}", PYTHONHASHSEED=seed, **env
                    )
                    procs[name] = self.start(proxy)
                servers.ready_all(list(procs.values()))
                for i in range(plan.onoff_rounds):
                    order = ["on", "off"] if (pair + i) % 2 == 0 else ["off", "on"]
                    row: dict[str, Any] = {"pair": pair}
                    # later rounds only reopen connections: the twins are warm already
                    warmup = plan.warmup if i == 0 else min(plan.warmup, 0.3)
                    for name in order:
                        server = procs[name]
                        r = closed(server, reqs, 32, duration=plan.onoff_cell, warmup=warmup,
                                   watch=[server.pid])  # fmt: skip
                        row[name] = {
                            "rps": r["rps"],
                            "cpu_ms_per_req": r["cpu_s"] / r["completed"] * 1000
                            if r["completed"]
                            else None,
                            "p50": p(r, "latency_ms", "p50"),
                            "p99": p(r, "latency_ms", "p99"),
                            "errors": r["errors"],
                        }
                    rounds.append(row)
            finally:
                for server in procs.values():
                    self.stop(server)
        on_rps = median([r["on"]["rps"] for r in rounds])
        off_rps = median([r["off"]["rps"] for r in rounds])
        on_cpu = median([r["on"]["cpu_ms_per_req"] for r in rounds])
        off_cpu = median([r["off"]["cpu_ms_per_req"] for r in rounds])
        self.put(
            "metrics_onoff",
            {
                "conc": 32,
                "pairs": plan.onoff_pairs,
                "rounds": rounds,
                "rps_on": on_rps,
                "rps_off": off_rps,
                # the paired design's figure: the median of on/off over rounds measured
                # back to back on twins of one pair
                "throughput_ratio": median(
                    [ratio(r["on"]["rps"], r["off"]["rps"]) for r in rounds]
                ),
                "ratio_of_medians": ratio(on_rps, off_rps),
                # the throughput ratio implied by CPU per request, paired the same way
                "cpu_ratio": median(
                    [ratio(r["off"]["cpu_ms_per_req"], r["on"]["cpu_ms_per_req"]) for r in rounds]
                ),
                "cpu_ms_per_req_on": on_cpu,
                "cpu_ms_per_req_off": off_cpu,
                "paired_ratios": [ratio(r["on"]["rps"], r["off"]["rps"]) for r in rounds],
            },
        )

    # -- 3g ---------------------------------------------------------------------------

    def s_scrape(self) -> None:
        plan = self.plan
        summary = {}
        try:
            summary = http_json(self.proxy.url + "/v1/metrics")
        except Exception as exc:
            self.note(f"could not read /v1/metrics before the scrape test: {exc}")
        done_before = _window_size(summary)
        probe = {"method": "GET", "path": PROM, "interval": 0.05, "headers": SCRAPER_HEADERS}
        idle = closed(self.proxy, [], 0, duration=max(1.0, plan.scrape_cell / 3),
                      warmup=0.1, probe=probe)  # fmt: skip
        loaded = closed(
            self.proxy,
            [NONSTREAM[V1], NONSTREAM[OLLAMA]],
            plan.scrape_conc,
            duration=plan.scrape_cell,
            warmup=plan.warmup,
            probe=probe,
        )
        size = sent = 0
        try:
            with urllib.request.urlopen(self.proxy.url + PROM, timeout=10) as resp:
                size = len(resp.read())
            scrape = urllib.request.Request(self.proxy.url + PROM, headers=SCRAPER_HEADERS)
            with urllib.request.urlopen(scrape, timeout=10) as resp:
                sent = len(resp.read())  # urllib does not decode: the bytes on the wire
        except Exception:
            pass
        self.put(
            "scrape",
            {
                "requests_before": done_before,
                "window_full": bool(done_before and done_before >= 1000),
                "exposition_bytes": size,
                "scrape_bytes_sent": sent,
                "idle_ms": idle.get("probe_ms"),
                "load_conc": plan.scrape_conc,
                "load_rps": loaded["rps"],
                "load_latency_ms": loaded["latency_ms"],
                "under_load_ms": loaded.get("probe_ms"),
                "probe_errors": (idle.get("probe_errors") or 0) + (loaded.get("probe_errors") or 0),
            },
        )

    # -- 3f ---------------------------------------------------------------------------

    def s_drift(self) -> None:
        plan = self.plan
        pid = self.proxy.pid
        # warm-up: the earlier scenarios already sent tens of thousands of requests
        closed(self.proxy, [NONSTREAM[V1], NONSTREAM[OLLAMA]], plan.drift_conc,
               duration=plan.drift_warmup, warmup=0.2)  # fmt: skip
        time.sleep(plan.drift_settle)
        before = rss_of([pid])
        r = closed(
            self.proxy,
            [NONSTREAM[V1], NONSTREAM[OLLAMA]],
            plan.drift_conc,
            duration=plan.drift_seconds,
            warmup=0.0,
            count=plan.drift_requests,
            watch=[pid],
            rss_interval=0.5,
            keep_samples=True,
        )
        time.sleep(plan.drift_settle)
        after = rss_of([pid])
        self.put(
            "drift",
            {
                "requests": r["completed"],
                "quick_mode_reduced": plan.quick,
                "conc": plan.drift_conc,
                "rps": r["rps"],
                "errors": r["errors"],
                "rss_before": before,
                "rss_after": after,
                "drift_bytes": after - before,
                "rss_samples": r.get("rss_samples", []),
            },
        )

    # -- 3h ---------------------------------------------------------------------------

    def s_workers(self) -> None:
        plan = self.plan
        # both sides fresh: the shared proxy has served every earlier scenario, and an aged
        # process measured slower than a fresh one (see 3e), which would flatter the ratio
        one = self.start(servers.launch_proxy(self.fixed.url + "/v1", name="proxy-1w"))
        two = self.start(servers.launch_proxy(self.fixed.url + "/v1", workers=2, name="proxy-2w"))
        reqs = [NONSTREAM[V1], NONSTREAM[OLLAMA]]
        rounds = []
        try:
            servers.ready_all([one, two])
            workers = two.worker_pids()
            for server in (one, two):  # warm-up: every worker's pools and caches
                closed(server, reqs, 64, duration=plan.workers_warmup, warmup=0.5)
            for i in range(plan.rounds):
                order = [("1", one, [one.pid]), ("2", two, workers)]
                if i % 2:
                    order.reverse()
                row = {}
                for name, server, watch in order:
                    r = closed(server, reqs, 64, duration=plan.round_cell, warmup=plan.warmup,
                               watch=watch)  # fmt: skip
                    row[name] = {
                        "rps": r["rps"],
                        "cpu_cores": r.get("cpu_frac"),
                        "p50": p(r, "latency_ms", "p50"),
                        "p99": p(r, "latency_ms", "p99"),
                        "errors": r["errors"],
                    }
                rounds.append(row)
        finally:
            self.stop(two)
            self.stop(one)
        one_rps = median([r["1"]["rps"] for r in rounds])
        two_rps = median([r["2"]["rps"] for r in rounds])
        two_cores = median([r["2"]["cpu_cores"] or 0.0 for r in rounds])
        if two_cores < WORKERS_BUSY_CORES:
            self.note(
                f"3h: the 2 workers got {two_cores:.2f} cores of CPU between them: another "
                "process held the second core, so the ratio measures the machine, not the proxy"
            )
        self.put(
            "workers",
            {
                "conc": 64,
                "rounds": rounds,
                "rps_1": one_rps,
                "rps_2": two_rps,
                "ratio": ratio(two_rps, one_rps),
                "cores_2": two_cores,
                "worker_pids": len(workers),
            },
        )

    # -- 3c ---------------------------------------------------------------------------

    def s_hold(self) -> None:
        plan = self.plan
        fresh = self.start(servers.start_proxy(self.demo.url + "/v1", name="proxy-hold"))
        try:
            # streams far longer than the test: the generator closes them itself
            directives = f"[[tokens=100000]][[delay={plan.hold_delay}]]"
            # a few requests so the idle probe is not the first request ever
            closed(fresh, [NONSTREAM[OLLAMA]], 1, duration=0.5, warmup=0.2)
            r = loadgen(
                {
                    **target_of(fresh),
                    "mode": "hold",
                    "streams": plan.hold_streams,
                    "ramp_per_s": 400,
                    "stream_request": chat_request(OLLAMA, stream=True, directives=directives),
                    "chunk": "ndjson",
                    "probe": NONSTREAM[OLLAMA],
                    "probe_count": 50 if plan.quick else 100,
                    "probe_interval": 0.02,
                    "watch_pids": [fresh.pid],
                    "rss_interval": 0.25,
                    "hold_seconds": plan.hold_seconds,
                    "first_chunk_timeout": 60,
                },
                timeout=plan.hold_seconds + 240,
            )
        finally:
            self.stop(fresh)
        r["token_delay_s"] = plan.hold_delay
        r["latency_ratio_p50"] = ratio(p(r, "busy_ms", "p50"), p(r, "idle_ms", "p50"))
        r["latency_ratio_p99"] = ratio(p(r, "busy_ms", "p99"), p(r, "idle_ms", "p99"))
        self.put("hold", r)


def _own_cpu() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _window_size(summary: Any) -> int | None:
    """Best effort: how many requests the metrics window holds (for the report)."""
    if not isinstance(summary, dict):
        return None
    for key in ("total_requests", "requests", "window_requests", "count"):
        value = summary.get(key)
        if isinstance(value, int):
            return value
    for value in summary.values():
        if isinstance(value, dict):
            found = _window_size(value)
            if found is not None:
                return found
    return None


def _str_keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _str_keys(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- profiling


PROFILE_CASES = (
    ("nonstream_v1", "non-stream /v1/chat/completions, c=16"),
    ("nonstream_ollama", "non-stream /api/chat, c=16"),
    ("stream_v1", "stream /v1/chat/completions (relayed), 32 streams"),
    ("stream_ollama", "stream /api/chat (translated), 32 streams"),
    ("scrape", "GET /v1/metrics/prometheus in gzip back to back, full window"),
)


def py_spy_path() -> str | None:
    import shutil

    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler(Bench):
    """``python -m bench --profile``: py-spy on the proxy under each kind of load.

    Writes the raw folded stacks per case and a breakdown by layer (see
    :func:`bench.report.profile_breakdown`), with CPU time per request or chunk so the
    percentages turn into microseconds."""

    seconds: float = 8.0

    def run(self) -> dict[str, Any]:
        spy = py_spy_path()
        self.results["machine"] = machine_info()
        self.results["mode"] = "profile"
        if spy is None:
            self.note("py-spy is not installed (.venv/bin/pip install py-spy): nothing profiled")
            self.results["notes"] = self.notes
            return self.results
        self.progress.start()
        with servers.tracked(self.started):
            try:
                self.step("start", self._start_servers, "starting servers")
                for name, label in PROFILE_CASES:
                    self.step(name, lambda n=name: self._profile(spy, n), label)
            finally:
                self.stop_all()
                self.progress.close()
        self.results["notes"] = self.notes
        return self.results

    def _profile(self, spy: str, name: str) -> None:
        plan = self.plan
        stream_dir = f"[[tokens={plan.stream_tokens}]][[delay={plan.stream_delay}]]"
        if name.startswith("nonstream"):
            server = self.proxy
            path = V1 if name.endswith("v1") else OLLAMA
            spec = {"requests": [NONSTREAM[path]], "conc": 16}
        elif name.startswith("stream"):
            server = self.proxy_stream
            path = V1 if name.endswith("v1") else OLLAMA
            spec = {
                "requests": [chat_request(path, stream=True, directives=stream_dir)],
                "conc": plan.stream_conc,
                "stream": True,
                "chunk": "sse" if path == V1 else "ndjson",
            }
        else:
            server = self.proxy
            closed(server, [NONSTREAM[V1]], 16, duration=1.5, warmup=0.2)  # fill the window
            scrape = {"method": "GET", "path": PROM, "headers": SCRAPER_HEADERS}
            spec = {"requests": [scrape], "conc": 1}
        out_dir = Path(self.results.get("out", "/tmp"))
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / f"profile-{name}.txt"
        full = {
            **target_of(server),
            "mode": "closed",
            "duration": self.seconds + 1.0,
            "warmup": 1.0,
            "watch_pids": [server.pid],
            **spec,
        }
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        gen = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert gen.stdin is not None
        gen.stdin.write(json.dumps(full))
        gen.stdin.close()
        time.sleep(1.3)
        spy_out = subprocess.run(
            [spy, "record", "--pid", str(server.pid), "--duration", str(int(self.seconds)),
             "--rate", "200", "--format", "raw", "--output", str(raw)],
            capture_output=True,
            text=True,
        )  # fmt: skip
        assert gen.stdout is not None
        result = json.loads(gen.stdout.read())
        gen.wait()
        if spy_out.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed: {spy_out.stderr[-500:]}")
        from .report import profile_breakdown

        units = result.get("chunks") or result["completed"]
        self.put(
            name,
            {
                "raw": str(raw),
                "rps": result["rps"],
                "chunks_per_s": result.get("chunks_per_s"),
                "cpu_us_per_unit": result["cpu_s"] / units * 1e6 if units else None,
                "unit": "chunk" if result.get("chunks") else "request",
                "breakdown": profile_breakdown(raw),
            },
        )
