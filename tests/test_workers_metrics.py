"""``trioproxy --workers 2`` as a user runs it, with real processes on 127.0.0.1: every figure
a scrape or the JSON reports is the proxy's, whichever worker answers.

One ``--workers 2`` proxy and one single-process proxy (the reference) serve the same scripted
workload against the demo backend: plain and streamed requests on ``/api`` and ``/v1``, with
the real ``ollama`` and ``openai`` clients, some cancelled by the client, some failing at the
backend before or during the answer. Each request has a connection of its own, so the
kernel spreads them over both workers.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ServerProcess, _spawn, base_env, wait_healthy
from .test_metrics_e2e import sse_data

ROUNDS = 3  # of the workload: each kind of request this many times
CLOSE = {"Connection": "close"}  # a new connection per request: the kernel picks a worker


def _fresh() -> httpx.Client:
    return httpx.Client(timeout=30, headers=CLOSE)


# ----------------------------------------------------------------------------- the workload


def _ollama(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=30, headers=CLOSE)


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, http_client=_fresh()
    )


def _say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _workload(url: str) -> Counter[tuple[str, str]]:
    """Send the scripted requests; the number sent by (endpoint label, status recorded)."""
    sent: Counter[tuple[str, str]] = Counter()
    for _ in range(ROUNDS):
        _ollama(url).chat("demo-chat", _say("hi [[tokens=5]]"))
        sent["api_chat", "200"] += 1
        for _part in _ollama(url).chat("demo-chat", _say("hi [[tokens=5]]"), stream=True):
            pass
        sent["api_chat", "200"] += 1
        with _openai(url) as client:
            client.chat.completions.create(model="demo-chat", messages=_say("hi [[tokens=4]]"))
        sent["v1_chat_completions", "200"] += 1
        with _openai(url) as client:
            stream = client.chat.completions.create(
                model="demo-chat",
                messages=_say("hi [[tokens=4]]"),
                stream=True,
                stream_options={"include_usage": True},
            )
            for _chunk in stream:
                pass
        sent["v1_chat_completions", "200"] += 1
        # the client leaves a stream that stalls after its first tokens: 499
        with _openai(url) as client:
            stream = client.chat.completions.create(
                model="demo-chat", messages=_say("hi [[stall_after=2]]"), stream=True
            )
            tokens = 0
            for chunk in stream:  # the two tokens sent before the stall: nothing else comes
                tokens += bool(chunk.choices and chunk.choices[0].delta.content)
                if tokens == 2:
                    break
            stream.close()
        sent["v1_chat_completions", "499"] += 1
        parts = _ollama(url).generate("demo-chat", "x [[stall_after=1]]", stream=True)
        next(parts)
        parts.close()
        sent["api_generate", "499"] += 1
        # the backend fails before answering (a 500 and a 503 passed on as they are) ...
        with _openai(url) as client, pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="demo-chat", messages=_say("[[status=500]]"))
        sent["v1_chat_completions", "500"] += 1
        with pytest.raises(ollama.ResponseError):
            _ollama(url).chat("demo-chat", _say("hi [[status=503]]"))
        sent["api_chat", "503"] += 1
        # ... or breaks a stream after two tokens: 502
        with _openai(url) as client, pytest.raises(openai.APIError):
            stream = client.chat.completions.create(
                model="demo-chat", messages=_say("hi [[drop_after=2]]"), stream=True
            )
            for _chunk in stream:
                pass
        sent["v1_chat_completions", "502"] += 1
        with pytest.raises(ollama.ResponseError):  # refused before the stream starts
            for _part in _ollama(url).chat("demo-chat", _say("[[status=400]]"), stream=True):
                pass
        sent["api_chat", "400"] += 1
    return sent


# ----------------------------------------------------------------------------- reading figures


@dataclass
class Scrape:
    """One scrape, parsed: every sample by (name, labels), and the JSON of /v1/metrics
    read on a connection of its own (possibly from the other worker)."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]
    text: str
    summary: dict[str, Any]

    def total(self, name: str, **match: str) -> float:
        return sum(
            value
            for (sample, labels), value in self.samples.items()
            if sample == name and all((k, v) in labels for k, v in match.items())
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (sample, labels), value in self.samples.items():
            if sample == name:
                out[dict(labels)[label]] += value
        return dict(out)


def _scrape(url: str) -> Scrape:
    with _fresh() as client:
        response = client.get(f"{url}/metrics")
    assert response.status_code == 200
    # httpx asks for gzip, as Prometheus does, and decodes it: every figure below is read
    # from a gzip answer of whichever worker served it
    assert response.headers["Content-Encoding"] == "gzip"
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
            types[sample.name] = family.type
    with _fresh() as client:
        summary = client.get(f"{url}/v1/metrics").json()
    return Scrape(samples, types, response.text, summary)


def _wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# what depends on timing (durations, rates, averages, the host and the process) or on the
# connections the scrapes themselves hold; every other sample is a count of the workload
_TIMED = (
    "system_",
    "network_",
    "disk_",
    "trioproxy_process_",
    "trioproxy_container_",  # the machine's cgroup, read at each scrape
    "trioproxy_connections_open",
    "http_request_duration_p",
    "http_request_duration_per_endpoint",
    "http_streaming_first_byte",
    "http_streaming_throughput",
    "http_streaming_avg_chunk_size",
    "trioproxy_stream_bytes",  # Ollama's chunks carry timestamps and durations
)


def _counts(scrape: Scrape) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples that count the workload: every counter and gauge but the timed ones,
    and of the histograms their counts (their sums and lower buckets are durations)."""
    out = {}
    for (name, labels), value in scrape.samples.items():
        if name.startswith(_TIMED) or name.endswith(("_seconds_total", "_sum", "_bucket")):
            continue
        out[name, labels] = value
    return out


# ----------------------------------------------------------------------------- the proxies


@dataclass
class Served:
    workers: str  # the --workers 2 proxy's URL
    single: str  # the single-process proxy's URL
    sent: Counter[tuple[str, str]]


_PROXY = ["-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", "--env-file", ""]


@contextlib.contextmanager
def _two_workers(demo_backend: ServerProcess) -> Iterator[ServerProcess]:
    server = _spawn([*_PROXY, "--workers", "2"], _env(demo_backend), timeout=30)
    try:
        wait_healthy(server.url, timeout=30)
        yield server
    finally:
        server.stop()


def _env(demo_backend: ServerProcess) -> dict[str, str]:
    return base_env(OPENAI_API_BASE_URL=demo_backend.url, MAX_RETRIES="0")


@pytest.fixture(scope="module")
def served(demo_backend: ServerProcess) -> Iterator[Served]:
    """The workload served by both proxies (the tests using it only read figures)."""
    with _two_workers(demo_backend) as workers:
        single = _spawn(_PROXY, _env(demo_backend))
        try:
            wait_healthy(single.url)
            sent = _workload(workers.url)
            assert _workload(single.url) == sent
            expected = sum(sent.values())
            for url in (workers.url, single.url):  # every record published
                _wait_for(lambda u=url: _scrape(u).total("http_requests_total") == expected)
            yield Served(workers.url, single.url, sent)
        finally:
            single.stop()


def _scrapes_from_both_workers(url: str, at_least: int = 6) -> list[Scrape]:
    """Scrapes on new connections until both workers answered some (the JSON's pid says
    which); at least ``at_least``."""
    scrapes: list[Scrape] = []
    deadline = time.monotonic() + 20
    while len(scrapes) < at_least or len({s.summary["window"]["pid"] for s in scrapes}) < 2:
        assert time.monotonic() < deadline, "one worker answered every scrape"
        scrapes.append(_scrape(url))
    return scrapes


# ----------------------------------------------------------------------------- the tests


def test_every_scrape_has_the_exact_totals_whichever_worker_answers(served: Served) -> None:
    sent = served.sent
    requests = sum(sent.values())
    streams = 5 * ROUNDS  # 2 completed, 2 cancelled, 1 broken a round (the 400 is none)
    by_status: Counter[str] = Counter()
    for (_, status), n in sent.items():
        by_status[status] += n
    windows: dict[int, int] = {}
    for scrape in _scrapes_from_both_workers(served.workers):
        assert scrape.by("http_requests_total", "status") == by_status
        for (endpoint, status), n in sent.items():
            assert scrape.total("http_requests_total", endpoint=endpoint, status=status) == n
        assert scrape.total("http_request_duration_seconds_count") == requests
        assert scrape.total("trioproxy_overhead_seconds_count") > 0
        outcomes = scrape.by("trioproxy_streams_total", "outcome")
        assert {k: v for k, v in outcomes.items() if v} == {
            "completed": 2 * ROUNDS,
            "cancelled": 2 * ROUNDS,
            "error": ROUNDS,
        }
        assert scrape.total("trioproxy_time_to_first_byte_seconds_count") == streams
        # every stream is in the time to first token or says why it has none
        assert (
            scrape.total("trioproxy_time_to_first_token_seconds_count")
            + scrape.total("trioproxy_streams_without_first_token_total")
            == streams
        )
        _assert_histograms_whole(scrape)
        assert scrape.total("http_requests_active") == 0
        summary = scrape.summary
        assert summary["total_requests"] == requests
        assert summary["successful_requests"] == by_status["200"]
        assert summary["cancelled_requests"] == by_status["499"]
        assert summary["client_errors"] == by_status["400"]
        assert summary["failed_requests"] == by_status["500"] + by_status["502"] + by_status["503"]
        assert summary["streaming"]["total_streaming_requests"] == streams
        tokens = summary["tokens"]
        assert tokens["input"] == scrape.total("trioproxy_tokens_total", type="input") > 0
        assert tokens["output"] == scrape.total("trioproxy_tokens_total", type="output") > 0
        windows[summary["window"]["pid"]] = summary["window"]["size"]
    # each worker's window holds the requests it served: together, every request once
    assert len(windows) == 2 and sum(windows.values()) == requests, windows
    assert all(windows.values()), windows  # both workers served some


def _assert_histograms_whole(scrape: Scrape) -> None:
    """Every histogram series: its +Inf bucket is its count, its buckets never fall."""
    buckets: dict[tuple[str, frozenset[tuple[str, str]]], list[tuple[float, float]]]
    buckets = defaultdict(list)
    for (name, labels), value in scrape.samples.items():
        if name.endswith("_bucket") and scrape.types[name] == "histogram":
            rest = frozenset((k, v) for k, v in labels if k != "le")
            buckets[name.removesuffix("_bucket"), rest].append((float(dict(labels)["le"]), value))
    assert buckets
    for (family, labels), series in buckets.items():
        series.sort()
        values = [value for _, value in series]
        assert values == sorted(values), (family, labels)
        assert series[-1] == (float("inf"), scrape.samples[f"{family}_count", labels])


RESTARTS = "trioproxy_worker_restarts_total"


def test_two_workers_count_what_one_process_counts(served: Served) -> None:
    """Every count-like sample (each label set of each counter, gauge and histogram count,
    tokens and upstream errors included) is the single process's, on every scrape; and
    the workers' scrapes have the master's count of replaced workers at 0, which one
    process (no master) does not have."""
    reference = _counts(_scrape(served.single))
    assert len(reference) > 50
    assert not any(name == RESTARTS for name, _ in reference)
    for scrape in _scrapes_from_both_workers(served.workers, at_least=4):
        counted = _counts(scrape)
        # the master's count of killed workers replaced: only --workers has one, and none
        # was killed
        assert counted.pop((RESTARTS, frozenset({("signal", "SIGKILL")}))) == 0
        differing = {
            key: (counted.get(key), reference.get(key))
            for key in counted.keys() | reference.keys()
            if counted.get(key) != reference.get(key)
        }
        assert not differing, differing


def test_promtool_accepts_the_workers_exposition(served: Served) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    for scrape in _scrapes_from_both_workers(served.workers, at_least=2):
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=scrape.text.encode(), capture_output=True
        )
        assert lint.returncode == 0 and lint.stdout == lint.stderr == b"", lint


def _worker_pids(server: ServerProcess) -> list[int]:
    """The worker processes of a ``--workers`` proxy (its grandchildren that serve)."""
    tree = psutil.Process(server.process.pid).children(recursive=True)
    return [p.pid for p in tree if "spawn_main" in " ".join(p.cmdline())]


def _holding(pid: int, port: int) -> int:
    """Client connections to ``port`` that worker ``pid`` holds."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def _all_counted(scrape: Scrape, streams: int) -> bool:
    return (
        scrape.total("http_requests_active") == streams
        and scrape.total("trioproxy_connections_open") >= streams
    )


def test_in_flight_gauges_are_the_sum_over_the_workers(demo_backend: ServerProcess) -> None:
    """Streams held open on both workers: every scrape, whichever worker answers, counts
    all of them in flight (each worker publishes its count within half a second); once
    they end, none. A proxy of its own: these streams must not change the others' totals."""
    body = {"model": "demo-chat", "stream": True, "messages": _say("x [[stall_after=1]]")}
    clients: list[httpx.Client] = []
    held: list[tuple[httpx.Response, Iterator[str]]] = []
    with _two_workers(demo_backend) as server:
        url, port = server.url, int(server.url.rsplit(":", 1)[1])
        workers = _worker_pids(server)
        assert len(workers) == 2
        try:
            # until each worker holds some (the kernel picks the worker of a connection)
            while len(held) < 4 or not all(_holding(pid, port) for pid in workers):
                assert len(held) < 40, "one worker took every connection"
                client = _fresh()
                clients.append(client)
                request = client.build_request("POST", f"{url}/v1/chat/completions", json=body)
                response = client.send(request, stream=True)
                lines = response.iter_lines()
                next(lines)  # the stream is running (kept: a dropped iterator closes it)
                held.append((response, lines))
            streams = len(held)
            # the connection counts reach the other worker's scrapes when their worker
            # publishes (every half second), the in-flight gauge at once: wait for both
            _wait_for(lambda: _all_counted(_scrape(url), streams))
            for scrape in _scrapes_from_both_workers(url, at_least=4):
                assert scrape.total("http_requests_active") == streams
                assert scrape.summary["active_requests"] == streams
                assert scrape.total("trioproxy_connections_open") >= streams
        finally:
            for response, _ in held:
                response.close()
            for client in clients:
                client.close()
        _wait_for(lambda: _scrape(url).total("http_requests_active") == 0)
        for scrape in _scrapes_from_both_workers(url, at_least=4):
            assert scrape.total("http_requests_active") == 0
            assert scrape.summary["active_requests"] == 0
            assert scrape.total("trioproxy_streams_total", outcome="cancelled") == streams


def test_one_process_keeps_its_metrics_to_itself_with_an_inherited_multiprocess_dir(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """``PROMETHEUS_MULTIPROC_DIR`` is what LiteLLM's docs have its users set for its
    workers. A single-process ``trioproxy`` that inherited it wrote its series into that
    directory and reported the sum of every file there: a second proxy on the host that
    served nothing reported the first one's requests (counted twice in a fleet's sum),
    and one restarted on the same directory carried on from the last run's counts (an
    older version's ``trioproxy_build_info`` with them). One process has nothing to share:
    it ignores the directory, and says so."""
    shared = tmp_path / "prometheus_multiproc"
    shared.mkdir()
    first = start_proxy(demo_backend.url, PROMETHEUS_MULTIPROC_DIR=str(shared))
    for _ in range(3):
        with _fresh() as client:
            assert client.get(f"{first.url}/api/version").status_code == 200
    assert _scrape(first.url).total("http_requests_total") == 3
    second = start_proxy(demo_backend.url, PROMETHEUS_MULTIPROC_DIR=str(shared))
    assert _scrape(second.url).total("http_requests_total") == 0
    assert _scrape(first.url).total("http_requests_total") == 3
    assert list(shared.iterdir()) == []
    first.stop()
    second.stop()
    assert "PROMETHEUS_MULTIPROC_DIR" in first.log() and str(shared) in first.log()


def _one_client_per_worker(url: str, clients: list[httpx.Client]) -> tuple[httpx.Client, ...]:
    """Two kept-alive clients whose connections two different workers serve (each
    scrape's JSON names its worker's pid); every client opened is added to ``clients``."""
    by_worker: dict[int, httpx.Client] = {}
    while len(by_worker) < 2:
        assert len(clients) < 40, "one worker took every connection"
        client = httpx.Client(base_url=url, timeout=30)
        clients.append(client)
        by_worker.setdefault(client.get("/v1/metrics").json()["window"]["pid"], client)
    return tuple(by_worker.values())


def test_tokens_a_response_owes_are_counted_once_by_whichever_worker_settles_them(
    demo_backend: ServerProcess,
) -> None:
    """The Responses API's ledger is the workers': a background response created through
    one worker and polled through the other, and a stream cut on one and resumed on the
    other, count their tokens once, on every scrape. A ledger per worker counted nothing
    for them (the creating worker's ledger was never asked)."""
    clients: list[httpx.Client] = []
    with _two_workers(demo_backend) as server:
        url = server.url

        def tokens() -> list[tuple[float, float]]:
            return [
                (
                    scrape.total("trioproxy_tokens_total", type="input"),
                    scrape.total("trioproxy_tokens_total", type="output"),
                )
                for scrape in _scrapes_from_both_workers(url, at_least=2)
            ]

        try:
            creator, poller = _one_client_per_worker(url, clients)
            body = {"model": "demo-chat", "input": "one two three [[tokens=7]]", "background": True}
            queued = creator.post("/v1/responses", json=body).json()
            assert queued["status"] == "queued"
            done = poller.get(f"/v1/responses/{queued['id']}").json()
            assert done["status"] == "completed"
            counted = (done["usage"]["input_tokens"], 7)
            _wait_for(lambda: set(tokens()) == {counted})
            for client in (creator, poller):  # polled again on both: nothing more
                assert client.get(f"/v1/responses/{queued['id']}").status_code == 200
            assert creator.post(f"/v1/responses/{queued['id']}/cancel").status_code == 200

            # a stream the backend drops after some tokens (the proxy's error event ends
            # it, the connection stays), resumed to its end through the other worker
            cut = {"model": "demo-chat", "input": "cut [[tokens=40]] [[drop_after=6]]"}
            streamed = creator.post("/v1/responses", json={**cut, "stream": True}).text
            created = json.loads(sse_data(streamed)[0])["response"]
            assert '"error"' in sse_data(streamed)[-1]
            resumed_usage: dict[str, int] = {}

            def resumed() -> bool:  # the ledger is written in a thread as the stream ends
                replay = poller.get(f"/v1/responses/{created['id']}", params={"stream": "true"})
                resumed_usage.update(json.loads(sse_data(replay.text)[-1])["response"]["usage"])
                return tokens()[0][1] == counted[1] + 40

            _wait_for(resumed)
            whole = (counted[0] + resumed_usage["input_tokens"], counted[1] + 40)
            _wait_for(lambda: set(tokens()) == {whole})
            assert creator.get(f"/v1/responses/{created['id']}").status_code == 200
            time.sleep(0.6)  # both workers have published (every 0.5 s): nothing more
            assert set(tokens()) == {whole}
        finally:
            for client in clients:
                client.close()
