"""The benchmark's machinery works (fast: the real bench is ``python -m bench``, not a test).

- the load generator, as its own process, against the demo backend for ~1 s: sane numbers
  for a closed loop, for streams (chunks, time to first byte) and for disconnects (the
  demo's event log sees every close);
- ``python -m bench --help``;
- the report renders a table from partial results without inventing figures;
- the stack's relay floors (bench/relay_floor.py) pass a stream through whole;
- without nginx the bench falls back to the bare ASGI app as the fixed backend and says so.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from bench import report, scenarios, servers
from bench.loadgen import percentiles


@pytest.fixture(scope="module")
def demo():
    server = servers.start_demo(token_delay=0.002)
    yield server
    server.stop()


def run_loadgen(spec: dict) -> dict:
    return scenarios.loadgen(spec, timeout=60)


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        capture_output=True,
        text=True,
        cwd=servers.ROOT,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--out" in out.stdout


def test_closed_loop_against_demo(demo: servers.Server) -> None:
    result = run_loadgen(
        {
            "host": demo.host,
            "port": demo.port,
            "conc": 4,
            "warmup": 0.2,
            "duration": 1.0,
            "requests": [scenarios.NONSTREAM[scenarios.V1]],
            "watch_pids": [demo.pid],
        }
    )
    assert result["errors"] == 0
    assert 0.9 < result["seconds"] < 1.5
    assert result["completed"] > 50  # the demo answers ~1k/s; anything alive passes
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"] < 1000
    assert result["rps"] == pytest.approx(result["completed"] / result["seconds"])
    assert 0 < result["cpu_s"] < 3 and result["rss_end"] > 10 * 1024 * 1024


def test_a_counted_run_ends_at_its_count_or_its_duration_first(demo: servers.Server) -> None:
    """3f counts requests; a quick run caps them by time too (it must stay under 2 minutes
    on a slow machine): a count out of reach ends at the duration, one within it at the
    count."""
    base = {
        "host": demo.host,
        "port": demo.port,
        "conc": 2,
        "warmup": 0.0,
        "requests": [scenarios.NONSTREAM[scenarios.V1]],
    }
    capped = run_loadgen({**base, "count": 10_000_000, "duration": 0.5})
    assert capped["errors"] == 0
    assert 0.4 < capped["seconds"] < 1.5
    assert 0 < capped["completed"] < 10_000_000
    counted = run_loadgen({**base, "count": 40, "duration": 0})
    assert counted["errors"] == 0
    assert 40 <= counted["completed"] <= 42  # those in flight at the count may finish too


def test_streams_count_chunks(demo: servers.Server) -> None:
    req = scenarios.chat_request(
        scenarios.V1, stream=True, directives="[[tokens=20]][[delay=0.002]]"
    )
    result = run_loadgen(
        {
            "host": demo.host,
            "port": demo.port,
            "conc": 4,
            "warmup": 0.1,
            "duration": 1.0,
            "stream": True,
            "chunk": "sse",
            "requests": [req],
        }
    )
    assert result["errors"] == 0
    assert result["completed"] > 4
    # role chunk + 20 tokens + finish + [DONE] (+ usage): ~23 events per stream
    per_stream = result["chunks"] / max(result["completed"], 1)
    assert 15 < per_stream < 40
    assert 0 < result["ttfb_ms"]["p50"] <= result["latency_ms"]["p50"]


@pytest.mark.parametrize("raw", [False, True], ids=["httpx", "raw"])
def test_relay_floor_passes_streams_through(demo: servers.Server, raw: bool) -> None:
    floor = servers.start_relay_floor(demo.url, raw=raw)
    try:
        req = scenarios.chat_request(
            scenarios.V1, stream=True, directives="[[tokens=7]][[delay=0.001]]"
        )
        reply = urllib.request.urlopen(
            urllib.request.Request(floor.url + scenarios.V1, data=req["body"].encode()),
            timeout=10,
        ).read()
        events = [line for line in reply.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"
        content = "".join(
            choice["delta"].get("content") or ""
            for event in events[:-1]
            for choice in json.loads(event[6:])["choices"]
        )
        assert len(content.split()) == 7
        result = run_loadgen(
            {
                "host": floor.host,
                "port": floor.port,
                "conc": 4,
                "warmup": 0.1,
                "duration": 0.5,
                "stream": True,
                "chunk": "sse",
                "requests": [req],
                "watch_pids": [floor.pid],
            }
        )
        assert result["errors"] == 0 and result["completed"] > 4
        assert result["chunks"] > 5 * result["completed"] and result["cpu_s"] > 0
    finally:
        floor.stop()


def test_disconnects_reach_the_backend(demo: servers.Server) -> None:
    base = demo.url
    urllib.request.urlopen(urllib.request.Request(base + "/_demo/reset", data=b"", method="POST"))
    req = scenarios.chat_request(
        scenarios.V1, stream=True, directives="[[tokens=500]][[delay=0.01]]"
    )
    result = run_loadgen(
        {
            "host": demo.host,
            "port": demo.port,
            "mode": "disconnect",
            "request": req,
            "count": 5,
            "conc": 5,
            "after_chunks": 2,
            "chunk": "sse",
            "id_prefix": "smoke",
        }
    )
    assert result["errors"] == 0 and len(result["closed"]) == 5
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        events = json.loads(urllib.request.urlopen(base + "/_demo/events").read())["events"]
        seen = {e["request_id"]: e for e in events if e["outcome"] == "disconnected"}
        if all(c["request_id"] in seen for c in result["closed"]):
            break
        time.sleep(0.05)
    for c in result["closed"]:
        delta = seen[c["request_id"]]["ended"] - c["closed_at"]
        assert -0.05 < delta < 2.0


def test_a_compared_proxy_is_started_in_front_of_the_stream_backend(
    demo: servers.Server,
) -> None:
    """--compare NAME=COMMAND: the command gets {upstream} and {port}; for 3b it is started
    again in front of the demo backend and measured like trioproxy's /v1 relay."""
    command = f"{sys.executable} -m trioproxy --host 127.0.0.1 --port {{port}} "
    command += "--upstream {upstream} --env-file ''"
    plan = scenarios.Plan.make(quick=True)
    progress = scenarios.Progress([("start", 1)], enabled=False)
    bench = scenarios.Bench(plan, progress, compare={"copy": command, "broken": "false {port}"})
    bench.demo = demo
    started = bench._compared_relays()
    try:
        assert list(started) == ["copy"]
        assert any("could not start broken" in note for note in bench.notes)
        req = scenarios.chat_request(scenarios.V1, stream=True, directives="[[tokens=4]]")
        copy = started["copy"]
        reply = urllib.request.urlopen(
            urllib.request.Request(copy.url + scenarios.V1, data=req["body"].encode()),
            timeout=10,
        ).read()
        assert reply.rstrip().endswith(b"data: [DONE]")
    finally:
        for server in started.values():
            server.stop()


def test_the_scrape_probe_asks_for_what_prometheus_gets() -> None:
    """The scrape scenario measures what an operator's Prometheus is answered: gzipped
    OpenMetrics, negotiated from Prometheus' own default Accept."""
    from trioproxy.metrics.exposition import exposition_format

    headers = scenarios.SCRAPER_HEADERS
    assert headers["Accept-Encoding"] == "gzip"
    assert headers["User-Agent"].startswith("Prometheus/")
    _, content_type = exposition_format(headers["Accept"])
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")


def test_the_workers_scrape_fill_sends_every_model_on_every_route() -> None:
    """bench.scrape_workers fills the label series a busy proxy has: each model on each
    route, plain, streamed and refused, each on a connection of its own (so every worker
    of the proxy gets some)."""
    from bench.scrape_workers import ROUTES, fill_requests

    requests = fill_requests(3)
    assert len(requests) == 3 * len(ROUTES) * 3
    bodies = [json.loads(r["body"]) for r in requests]
    assert {(r["path"], b["model"]) for r, b in zip(requests, bodies, strict=True)} == {
        (route, f"bench-model-{i:03d}") for route in ROUTES for i in range(3)
    }
    assert all(r["headers"] == {"Connection": "close"} for r in requests)


def test_percentiles() -> None:
    stats = percentiles([float(i) for i in range(1, 101)])
    assert stats["p50"] == pytest.approx(50.5) and stats["max"] == 100.0 and stats["n"] == 100
    assert percentiles([])["p50"] is None


def test_report_with_partial_results() -> None:
    table = report.text_table({"mode": "quick", "scenarios": {}, "notes": ["hello"]})
    assert "n/a" in table and "PASS" not in table and "note: hello" in table
    assert len(report.target_rows({})) >= 19


def test_falls_back_to_bare_asgi_without_nginx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "nginx_path", lambda: None)
    plan = scenarios.Plan.make(quick=True)
    progress = scenarios.Progress([("start", 1), ("ceiling", 1)], enabled=False)
    bench = scenarios.Bench(plan, progress, only={"ceiling"})
    results = bench.run()
    assert "FALLBACK" in results["servers"]["fixed_backend"]
    assert any("nginx is not installed" in n for n in results["notes"])
    ceiling = results["scenarios"]["ceiling"]
    assert ceiling["c64"]["errors"] == 0 and ceiling["c64"]["rps"] > 50
    assert "FALLBACK" in report.text_table(results)


def test_a_server_started_through_a_wrapper_is_stopped_whole() -> None:
    """A compared proxy given as ``sh -c '...; true'`` runs as the wrapper's child: stopping
    only the wrapper left it running (and the bench waited forever on its pipe)."""
    code = "import time; print('listening on http://127.0.0.1:9', flush=True); time.sleep(600)"
    child = f'{sys.executable} -c "{code}"'
    server = servers._spawn("wrapped", ["sh", "-c", f"{child}; true"], servers.clean_env())
    inner = psutil.Process(server.pid).children(recursive=True)
    assert inner, "the wrapper's child is running"
    stopper = threading.Thread(target=server.stop, daemon=True)  # it used to hang
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "stop() returned"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in inner)


def test_a_launched_server_is_ready_once_it_answers(demo: servers.Server) -> None:
    """``launch_*`` returns with the process started and nothing waited for; ``ready()``
    waits until it answers, once."""
    floor = servers.launch_relay_floor(demo.url)
    try:
        assert floor.alive() and floor.pending is not None
        assert floor.ready() is floor and floor.pending is None
        with urllib.request.urlopen(floor.url + "/", timeout=10) as answer:
            assert answer.status < 500
        assert floor.ready() is floor  # at once now
    finally:
        floor.stop()


def test_a_launched_server_that_never_answers_is_stopped_by_its_wait() -> None:
    code = "import time; time.sleep(600)"  # never names its address
    server = servers._launch("silent", [sys.executable, "-c", code], servers.clean_env(),
                             timeout=0.5)  # fmt: skip
    with pytest.raises(RuntimeError, match="silent did not start"):
        server.ready()
    assert not server.alive()


def test_a_stopped_server_is_not_signalled_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose start failed is stopped there and again by the run's cleanup; by then
    its process group's id may be another's."""
    server = servers._launch("idle", [sys.executable, "-c", "import time; time.sleep(600)"],
                             servers.clean_env(), wait_line=False)  # fmt: skip
    server.stop()
    assert not server.alive()
    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(servers, "_signal_group", lambda group, sig: signalled.append((group, sig)))
    server.stop()
    assert signalled == []


def test_failed_requests_are_shown_and_fail_their_target() -> None:
    """The generator leaves failed requests out of rates and latencies: a proxy answering
    503 to most of the load must not look fast, nor a target pass on what worked."""
    failing = {"rps": 0.0, "latency_ms": {"p50": None, "p99": None}, "errors": 40,
               "error_statuses": {"401": 40}}  # fmt: skip
    half = {"rps": 900.0, "latency_ms": {"p50": 0.9, "p99": 1.5}, "errors": 12,
            "error_statuses": {"503": 10}}  # fmt: skip
    direct = {"rps": 9000.0, "latency_ms": {"p50": 0.1, "p99": 0.2}, "errors": 0}
    results = {
        "mode": "quick",
        "servers": {"compared": {"other": "cmd"}},
        "scenarios": {"nonstream": {
            "cells": {"direct": {1: direct}, scenarios.V1: {1: half}, "other": {1: failing}},
            "added": {scenarios.V1: {1: {"p50": 0.8, "p99": 1.3}}},
        }},
    }  # fmt: skip
    table = report.text_table(results)
    assert "other: 0/s p50 — p99 — (+40 FAILED: 401: 40)" in table
    assert "(+12 FAILED: 503: 10, no answer: 2)" in table
    (row,) = [r for r in report.target_rows(results)
              if r.figure == f"added latency c=1 p50, {scenarios.V1}"]  # fmt: skip
    assert row.ok is False and "12 FAILED requests" in row.measured


class _Impostor(BaseHTTPRequestHandler):
    """A "proxy" that answers 200 without asking any backend, or never answers."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.holds:  # type: ignore[attr-defined]
            time.sleep(5)
            return
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("holds", [False, True])
def test_answers_that_are_none_count_as_failures(holds: bool) -> None:
    """An empty 200 is no answer to a chat request, and a request held past the end of
    the cell failed: both showed as a quiet "0/s" or as fast successes."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    server.daemon_threads = True
    server.holds = holds  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_loadgen({
            "host": "127.0.0.1", "port": server.server_address[1], "conc": 3,
            "warmup": 0.1, "duration": 0.5, "requests": [scenarios.NONSTREAM[scenarios.V1]],
        })  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert result["completed"] == 0
    if holds:
        assert result["errors"] == result["unanswered"] == 3
    else:
        assert result["errors"] > 10
        assert result["error_statuses"] == {'200 without "choices"': result["errors"]}
    assert "FAILED" in report._cell_text("impostor", result)


def test_an_unusable_out_folder_is_refused_before_the_run(tmp_path: Path) -> None:
    a_file = tmp_path / "results"
    a_file.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(a_file)],
        capture_output=True, text=True, cwd=servers.ROOT, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2 and "--out" in out.stderr


def test_sigterm_stops_every_server_the_bench_started(tmp_path: Path) -> None:
    """timeout(1), a CI cancel and docker stop send SIGTERM: the bench stops what it
    started, as on Ctrl-C."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--only", "ceiling", "--no-progress",
         "--out", str(tmp_path / "out")],
        cwd=servers.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        children: list[psutil.Process] = []
        while time.monotonic() < deadline and len(children) < 3:
            time.sleep(0.2)
            children = [c for c in psutil.Process(bench.pid).children()
                        if "bench.loadgen" not in " ".join(_cmdline(c))]  # fmt: skip
        assert len(children) >= 3, "servers started"
        bench.send_signal(signal.SIGTERM)
        time.sleep(0.01)  # a second signal must not cut the cleanup short
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if bench.poll() is None:
            bench.kill()
        bench.wait(timeout=30)  # reaped here, not warned about in a later test


@pytest.mark.parametrize(
    "tool",
    [
        ["bench.request_instructions", "--requests", "10000000", "--warmup", "0"],
        ["bench.chunk_instructions", "--streams", "100000", "--warmup", "0"],
    ],
    ids=["request_instructions", "chunk_instructions"],
)
def test_sigterm_stops_a_dev_tools_backend(tool: list[str]) -> None:
    """The in-process tools' backends (nginx, the demo: sessions of their own) outlived
    a SIGTERM, which ended the tool at once without its cleanup. Now it cancels the run,
    stops the backend and exits 143."""
    process = subprocess.Popen(
        [sys.executable, "-m", *tool],
        cwd=servers.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not children:
            time.sleep(0.1)
            children = psutil.Process(process.pid).children(recursive=True)
        assert children, "the backend started"
        time.sleep(1.5)  # into the trio run: the proxy serving, the requests going
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        process.send_signal(signal.SIGTERM)
        time.sleep(0.01)  # a second signal must not cut the cleanup short
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, [_cmdline(p) for p in alive]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()
        for stray in children:  # none must outlive the test, whatever failed
            with contextlib.suppress(psutil.NoSuchProcess):
                stray.kill()


# The bench, run with a SIGTERM sent to itself the moment the stream proxy's log reader
# starts: inside the launch, after the process exists and before the bench had it in its
# list. On the way out it waits until each process it spawned has ended or listens (a
# stray that dies writing its first line into the closed pipe would not be seen), then
# prints their pids.
_SIGTERM_MID_LAUNCH = """
import os, signal, subprocess, sys, threading, time
import psutil
from bench.__main__ import main

spawned = []
popen_init, thread_start = subprocess.Popen.__init__, threading.Thread.start

def recording_init(self, *args, **kwargs):
    popen_init(self, *args, **kwargs)
    spawned.append(self.pid)

def start_then_terminated(self):
    thread_start(self)
    if self.name == "bench-proxy-stream-log":
        os.kill(os.getpid(), signal.SIGTERM)

def settled(pid):
    try:
        process = psutil.Process(pid)
        return process.status() == psutil.STATUS_ZOMBIE or any(
            c.status == psutil.CONN_LISTEN for c in process.net_connections("tcp"))
    except psutil.NoSuchProcess:
        return True

subprocess.Popen.__init__ = recording_init
threading.Thread.start = start_then_terminated
try:
    main(sys.argv[1:])
finally:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(settled(pid) for pid in spawned):
        time.sleep(0.05)
    print(*spawned, flush=True)
"""


def test_a_sigterm_while_a_server_is_launched_stops_it_too(tmp_path: Path) -> None:
    """A signal raised inside a launch (Popen, the log reader's start) used to leave that
    server, a session of its own, running after the bench: a stray proxy or demo holding
    a port and a core. Now the signal waits until the bench knows the server."""
    out = subprocess.run(
        [sys.executable, "-c", _SIGTERM_MID_LAUNCH, "--quick", "--only", "ceiling",
         "--no-progress", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=servers.ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-2000:]
    pids = [int(pid) for pid in out.stdout.split()]
    assert len(pids) >= 4, out.stdout  # nginx or the bare app, the demo, proxies
    spawned = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            spawned.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(spawned, timeout=5)
    for process in alive:  # a stray must not outlive the test either
        process.kill()
    assert not alive, [_cmdline(p) for p in alive]


def _cmdline(process: psutil.Process) -> list[str]:
    """Its command line; none for a child that ended meanwhile (a zombie until reaped:
    the bench's load generator between its rounds)."""
    try:
        return process.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return []


def test_a_compared_proxy_that_does_not_start_fails_the_run(tmp_path: Path) -> None:
    """The note was on stdout only: summary.md said nothing and the exit code was 0, so a
    script reading either took a run without the comparison for one."""
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "ceiling", "--no-progress",
         "--out", str(tmp_path), "--compare", "typo=/nonexistent/proxy --port {port}"],
        capture_output=True, text=True, cwd=servers.ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-2000:]
    assert "compared proxies that did not start: typo" in out.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "note: could not start typo for comparison" in summary
    assert "targets met" in summary


def test_loop_steps_tells_a_held_loop_from_a_preempted_one() -> None:
    """bench.loop_steps times each task step by the wall clock and by the loop thread's
    CPU: a step that computes is listed as holding the loop, one whose thread was off the
    CPU (a blocking sleep stands in for the kernel's preemption) is long only by the wall
    clock."""
    import trio

    from bench.loop_steps import BOUNDS_MS, StepClock

    def bucket_of(ms: float) -> int:
        return next(i for i, bound in enumerate(BOUNDS_MS) if ms <= bound)

    async def computes() -> None:
        end = time.thread_time() + 0.004
        while time.thread_time() < end:
            pass
        await trio.lowlevel.checkpoint()

    def blocked() -> None:  # the thread off the CPU inside a step, as when preempted
        time.sleep(0.006)

    async def off_cpu() -> None:
        blocked()
        await trio.lowlevel.checkpoint()

    clock = StepClock()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(computes, name="computes")
            nursery.start_soon(off_cpu, name="off_cpu")

    trio.run(main, instruments=[clock])
    # other steps may be preempted on a busy machine, so only these two are pinned
    assert sum(clock.cpu[bucket_of(4.0) :]) >= 1
    assert sum(clock.wall[bucket_of(6.0) :]) >= 1
    long = [name for _, _, name, _ in clock.long]
    assert "computes" in long
    assert "off_cpu" not in long
    assert clock.others["computes"][2] >= 4.0
    assert clock.others["off_cpu"][2] < 1.0
    assert sum(clock.batches) >= 1


@pytest.mark.parametrize(
    ("module", "args", "said"),
    [
        ("bench.chunk_instructions",
         ["--tokens", "3", "--streams", "2", "--warmup", "1", "--delay", "0.002", "--pad-to", "3"],
         "v1 2 streams of 3 tokens"),
        ("bench.request_instructions",
         ["--requests", "40", "--warmup", "8", "--concurrency", "4", "--metrics", "off",
          "--route", "ollama"],
         "ollama 40 requests at concurrency 4, metrics off"),
    ],
)  # fmt: skip
def test_the_in_process_harnesses_serve_what_they_count(
    tmp_path: Path, module: str, args: list[str], said: str
) -> None:
    """The harnesses run under valgrind by hand: each serves its requests through the
    proxy in process (a failed one raises) and writes its profile when asked."""
    profile = tmp_path / "profile"
    out = subprocess.run(
        [sys.executable, "-m", module, *args, "--profile", str(profile)],
        capture_output=True, text=True, cwd=servers.ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert said in out.stdout
    import pstats

    assert pstats.Stats(str(profile)).total_calls > 0
