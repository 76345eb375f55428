"""``trioproxy --workers 2`` scraped while a separate process loads it: the kept merge of the
workers' files (:mod:`trioproxy.metrics.shared_merge`) and the kept encoding must give, at
every scrape, what prometheus_client's merge gives of the files as they are then.

So no counter goes backwards from one scrape to the next (whichever worker answers, in
either format, gzipped or not), every histogram is whole, and once the load is over the
request counters are exactly what the clients were answered, route by route and status
by status. A worker killed with SIGKILL mid-load (its uncounted batch lost:
docs/metrics.md) and started again changes none of that: nothing goes backwards, and the
requests served after it are counted exactly."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import psutil
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families as text_families

from .conftest import ServerProcess, wait_healthy
from .test_cli_config import _start_demo_proxy
from .test_process import _is_worker, _kill, _running_on, _wait_for_workers

# the load, in a process of its own: threads sending requests on new connections (so the
# kernel spreads them over the workers); prints what it was answered, by endpoint label
# and status ("broken": no answer, a worker killed under it)
LOAD = r"""
import json, sys, threading, httpx
url, rounds, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
CLOSE = {"Connection": "close"}
def chat(text, **extra):
    return {"model": "demo-chat", "messages": [{"role": "user", "content": text}], **extra}
V1 = ("v1_chat_completions", "/v1/chat/completions")
REQUESTS = [
    ("api_chat", "/api/chat", chat("hi [[tokens=3]]", stream=False)),
    ("api_chat", "/api/chat", chat("hi [[tokens=3]]")),
    ("api_chat", "/api/chat", chat("[[status=400]]")),
    ("api_generate", "/api/generate", {"model": "demo-chat", "prompt": "x [[tokens=2]]"}),
    (*V1, chat("hi [[tokens=3]]")),
    (*V1, chat("hi [[tokens=3]]", stream=True)),
    (*V1, chat("[[status=500]]")),
]
answered = {}
lock = threading.Lock()
def run():
    with httpx.Client(timeout=30, headers=CLOSE) as client:
        for _ in range(rounds):
            for endpoint, path, body in REQUESTS:
                try:
                    with client.stream("POST", url + path, json=body) as reply:
                        reply.read()
                        status = str(reply.status_code)
                except httpx.HTTPError:
                    status = "broken"
                with lock:
                    key = endpoint + " " + status
                    answered[key] = answered.get(key, 0) + 1
workers = [threading.Thread(target=run) for _ in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(json.dumps(answered))
"""

# what a scrape asks for: both formats, gzipped or not (httpx decodes the gzip)
FORMATS = (
    ("text/plain", "gzip"),
    ("application/openmetrics-text; version=1.0.0", "gzip"),
    ("text/plain", "identity"),
    ("application/openmetrics-text; version=1.0.0", "identity"),
)

# counters that are the answering worker's own, not the workers' files: they may differ
# (and so seem to go back) from one worker to the other
PER_PROCESS = ("trioproxy_process_", "trioproxy_container_", "system_", "network_", "disk_")

Key = tuple[str, frozenset[tuple[str, str]]]


def _scrape(url: str, accept: str, coding: str) -> dict[Key, float]:
    """The monotonic samples of one scrape (new connection): counters and histograms."""
    headers = {"Accept": accept, "Accept-Encoding": coding, "Connection": "close"}
    reply = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.headers.get("Content-Encoding", "identity") == coding
    openmetrics = accept.startswith("application/openmetrics-text")
    assert reply.headers["Content-Type"].startswith(accept.partition(";")[0])
    parse = om_families if openmetrics else text_families
    samples: dict[Key, float] = {}
    buckets: dict[Key, list[tuple[float, float]]] = {}
    for family in parse(reply.text):
        if family.type not in ("counter", "histogram") or family.name.startswith(PER_PROCESS):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = frozenset(sample.labels.items())
            samples[sample.name, labels] = sample.value
            if sample.name.endswith("_bucket"):
                rest = frozenset((k, v) for k, v in labels if k != "le")
                le = float(sample.labels["le"])
                buckets.setdefault((family.name, rest), []).append((le, sample.value))
    for (name, labels), series in buckets.items():  # every histogram whole
        series.sort()
        values = [value for _, value in series]
        assert values == sorted(values), (name, labels, series)
        # also of a series a worker is creating as the scrape reads its file (left out)
        assert series[-1] == (float("inf"), samples[f"{name}_count", labels]), (name, labels)
    return samples


@dataclass
class Scraper:
    """Scrapes in a thread, one format after the other, asserting each against the last."""

    url: str
    scrapes: int = 0
    errors: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # scrapes without an answer
    last: dict[Key, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def check(self, samples: dict[Key, float]) -> None:
        for key, before in self.last.items():
            now = samples.get(key)
            if now is None:
                self.errors.append(f"{key} disappeared (was {before})")
            elif now < before:
                self.errors.append(f"{key} went back from {before} to {now}")
        self.last = samples
        self.scrapes += 1

    def run(self) -> None:
        while not self.stop.is_set():
            accept, coding = FORMATS[self.scrapes % len(FORMATS)]
            try:
                self.check(_scrape(self.url, accept, coding))
            except (AssertionError, ValueError) as error:  # ValueError: not OpenMetrics
                self.errors.append(f"{accept} {coding}: {error!r}")
            except httpx.HTTPError as error:
                self.broken.append(f"{accept} {coding}: {error!r}")

    def once(self) -> dict[Key, float]:
        for accept, coding in FORMATS:
            self.check(_scrape(self.url, accept, coding))
        return self.last


@contextlib.contextmanager
def _scraping(url: str, *, killing: bool = False) -> Iterator[Scraper]:
    """A :class:`Scraper` at work meanwhile; ``killing``: a scrape the killed worker had
    taken has no answer (no error)."""
    scraper = Scraper(url)
    thread = threading.Thread(target=scraper.run, daemon=True)
    thread.start()
    try:
        yield scraper
    finally:
        scraper.stop.set()
        thread.join(timeout=60)
    assert not scraper.errors, scraper.errors[:10]
    assert killing or not scraper.broken, scraper.broken[:10]


def _load(url: str, rounds: int, threads: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", LOAD, url, str(rounds), str(threads)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _answered(load: subprocess.Popen[str]) -> Counter[tuple[str, str]]:
    out, _ = load.communicate(timeout=120)
    assert load.returncode == 0
    return Counter({tuple(k.split(" ")): n for k, n in json.loads(out).items()})


def _requests(samples: dict[Key, float]) -> Counter[tuple[str, str]]:
    counted: Counter[tuple[str, str]] = Counter()
    for (name, labels), value in samples.items():
        if name == "http_requests_total" and value:
            found = dict(labels)
            counted[found["endpoint"], found["status"]] += int(value)
    return counted


def _settled(scraper: Scraper, condition: Callable[[Counter[tuple[str, str]]], bool]) -> None:
    """Scrape (in every format) until ``condition`` holds of the request counts."""
    deadline = time.monotonic() + 20
    while not condition(_requests(scraper.once())):
        assert time.monotonic() < deadline, _requests(scraper.last)
        time.sleep(0.1)


@pytest.fixture
def proxy() -> Iterator[ServerProcess]:
    server = _start_demo_proxy(2, LOG_LEVEL="INFO")
    descendants: list[psutil.Process] = []
    try:
        _wait_for_workers(server, 2)
        wait_healthy(server.url, timeout=30)
        descendants = psutil.Process(server.process.pid).children(recursive=True)
        yield server
        descendants += psutil.Process(server.process.pid).children(recursive=True)
    finally:
        _kill([p for p in descendants if _is_worker(p)])
        server.stop()


def test_scrapes_under_load_never_go_back_and_end_exact(proxy: ServerProcess) -> None:
    url = proxy.url
    with _scraping(url) as scraper:
        answered = _answered(_load(url, rounds=8, threads=4))
        assert "broken" not in {status for _, status in answered}, answered
        assert answered["api_chat", "400"] == answered["v1_chat_completions", "500"] == 32
        _settled(scraper, lambda counted: counted == answered)
        for _ in range(3):  # and it stays so, on every worker and format
            assert _requests(scraper.once()) == answered
    assert scraper.scrapes > len(FORMATS)


def test_a_worker_killed_mid_load_makes_nothing_go_back(proxy: ServerProcess) -> None:
    url = proxy.url
    with _scraping(url, killing=True) as scraper:
        load = _load(url, rounds=12, threads=4)
        while scraper.scrapes < 3 or not _requests(scraper.last):
            assert load.poll() is None, "the load ended before the kill"
            time.sleep(0.02)
        victim = next(p for p in psutil.Process(proxy.process.pid).children(True) if _is_worker(p))
        victim.send_signal(signal.SIGKILL)
        answered = _answered(load)
        deadline = time.monotonic() + 30
        while _running_on(proxy) < 3:  # its replacement serves
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.05)
        # what the killed worker had not counted yet is lost (at most its batch): never
        # more than was answered, and nothing counted twice
        served = Counter({k: n for k, n in answered.items() if k[1] != "broken"})
        before = _requests(scraper.once())
        assert all(before[k] <= served[k] + answered[k[0], "broken"] for k in before), (
            before,
            answered,
        )
        # after the kill, every request is counted exactly, on top of what was
        time.sleep(0.6)  # the surviving worker's batch published (0.5 s at most)
        before = _requests(scraper.once())
        more = _answered(_load(url, rounds=3, threads=2))
        assert "broken" not in {status for _, status in more}, more
        _settled(scraper, lambda counted: counted == before + more)
        restarts = ("trioproxy_worker_restarts_total", frozenset({("signal", "SIGKILL")}))
        assert scraper.last[restarts] == 1
        # the killed worker's in-flight requests left with it (its live gauges removed)
        deadline = time.monotonic() + 20
        while (active := _gauge(url, "http_requests_active")) != 0:
            assert time.monotonic() < deadline, active
            time.sleep(0.1)
    assert scraper.scrapes > len(FORMATS)


def _gauge(url: str, name: str) -> float:
    """A gauge family's samples summed, as one scrape (new connection) says."""
    reply = httpx.get(f"{url}/metrics", headers={"Connection": "close"}, timeout=30)
    assert reply.status_code == 200, reply.text
    families = [f for f in text_families(reply.text) if f.name == name]
    assert families, name
    return sum(sample.value for family in families for sample in family.samples)
