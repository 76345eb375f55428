"""Metrics against a real server with a scripted workload whose ground truth is known.

The proxy and the demo backend run as their own processes; the client is httpx over real
sockets. After the workload, the exposition (parsed with prometheus_client's parser) and the
JSON must report exactly what was done.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import ServerProcess, wait_healthy
from .fakes import ScriptedHandler, serving


def scrape(url: str, accept: str | None = None) -> dict[str, list[tuple[dict[str, str], float]]]:
    headers = {"Accept": accept} if accept else {}
    response = httpx.get(f"{url}/v1/metrics/prometheus", headers=headers, timeout=5)
    assert response.status_code == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples: dict, name: str, **match: str) -> float:
    return sum(
        value
        for labels, value in samples.get(name, [])
        if all(labels.get(k) == v for k, v in match.items())
    )


def chat(text: str, *, stream: bool) -> dict:
    return {
        "model": "demo-chat",
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    }


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def metered_proxy(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> ServerProcess:
    return start_proxy(
        demo_backend.url,
        MAX_RETRIES="0",
        STREAM_IDLE_TIMEOUT="0.5",
        SYSTEM_METRICS_INTERVAL="0.5",
    )


def test_scripted_workload_is_reported_exactly(metered_proxy: ServerProcess) -> None:
    url = metered_proxy.url
    expected_input = 0
    expected_output = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        # 4 non-streaming Ollama chats: usage is known from their own responses
        for _ in range(4):
            body = client.post("/api/chat", json=chat("count [[tokens=4]]", stream=False)).json()
            expected_input += body["prompt_eval_count"]
            expected_output += body["eval_count"]
        # 3 streamed Ollama chats, completed
        for _ in range(3):
            lines = client.post("/api/chat", json=chat("stream [[tokens=5]]", stream=True))
            final = json.loads(lines.text.strip().splitlines()[-1])
            assert final["done"] is True
            expected_input += final["prompt_eval_count"]
            expected_output += final["eval_count"]
        # 2 streamed OpenAI chats with usage, completed
        for _ in range(2):
            payload = chat("relay [[tokens=6]]", stream=True)
            payload["stream_options"] = {"include_usage": True}
            text = client.post("/v1/chat/completions", json=payload).text
            usage = [
                json.loads(line[6:])["usage"]
                for line in text.splitlines()
                if line.startswith("data: {") and '"usage":{' in line
            ][-1]
            expected_input += usage["prompt_tokens"]
            expected_output += usage["completion_tokens"]
        # 2 backend errors, 1 unknown model (a client error)
        for _ in range(2):
            assert (
                client.post("/api/chat", json=chat("[[status=500]]", stream=False)).status_code
                == 500
            )
        unknown = chat("x", stream=False) | {"model": "no-such-model"}
        assert client.post("/api/chat", json=unknown).status_code == 404
        # 2 streams stopped by the idle timeout after 2 tokens each (counted, not usage)
        for _ in range(2):
            text = client.post("/api/chat", json=chat("[[stall_after=2]]", stream=True)).text
            assert '"error"' in text.strip().splitlines()[-1]
            expected_output += 2
    # 2 client disconnects mid-stream
    for _ in range(2):
        with httpx.Client(base_url=url, timeout=10) as client:
            payload = chat("long [[tokens=2000]] [[delay=0.01]]", stream=True)
            with client.stream("POST", "/api/chat", json=payload) as response:
                lines = response.iter_lines()
                next(lines)
                next(lines)

    def cancelled_recorded() -> bool:
        return total(scrape(url), "trioproxy_streams_total", outcome="cancelled") == 2

    wait_for(cancelled_recorded)
    samples = scrape(url)

    assert total(samples, "http_requests_total") == 4 + 3 + 2 + 2 + 1 + 2 + 2
    assert total(samples, "http_requests_total", status="200") == 9
    assert total(samples, "http_requests_total", status="500") == 2
    assert total(samples, "http_requests_total", status="404") == 1
    assert total(samples, "http_requests_total", status="504") == 2
    assert total(samples, "http_requests_total", status="499") == 2
    assert total(samples, "http_requests_total", endpoint="api_chat") == 14
    assert total(samples, "http_requests_total", endpoint="v1_chat_completions") == 2
    assert total(samples, "trioproxy_streams_total", outcome="completed") == 5
    assert total(samples, "trioproxy_streams_total", outcome="timeout") == 2
    assert total(samples, "trioproxy_streams_total", outcome="cancelled") == 2
    assert total(samples, "http_streaming_requests_total") == 9
    assert total(samples, "http_streaming_cancelled_total") == 2
    assert total(samples, "http_streaming_timeout_total") == 2
    assert total(samples, "trioproxy_tokens_total", type="input") == expected_input
    # cancelled streams add the tokens they carried before the cut: at least 2 each
    assert total(samples, "trioproxy_tokens_total", type="output") >= expected_output + 4
    assert total(samples, "http_request_duration_seconds_count") == 16
    assert total(samples, "trioproxy_time_to_first_token_seconds_count") >= 7
    # every stream here had a first token; those with two or more have a time per token
    # (the demo backend's 5 ms pace, 10 ms for the ones cut short)
    assert total(samples, "trioproxy_streams_without_first_token_total") == 0
    gaps = total(samples, "trioproxy_time_per_output_token_seconds_count")
    assert 7 <= gaps <= total(samples, "trioproxy_time_to_first_token_seconds_count")
    mean_gap = total(samples, "trioproxy_time_per_output_token_seconds_sum") / gaps
    assert 0.004 <= mean_gap < 0.05
    # cancelled requests count neither as success nor as error: 9 ok, 4 errors (2 x 500,
    # 2 timeouts), 1 client error, out of 14 non-cancelled
    assert total(samples, "http_request_success_rate") == pytest.approx(9 / 14)
    assert total(samples, "http_request_error_rate") == pytest.approx(4 / 14)

    summary = httpx.get(f"{url}/v1/metrics", timeout=5).json()
    assert summary["total_requests"] == 16
    assert summary["cancelled_requests"] == 2
    assert summary["success_rate"] == pytest.approx(9 / 14)
    assert summary["streaming"]["cancelled_streams"] == 2
    assert summary["streaming"]["timeout_streams"] == 2
    assert summary["tokens"]["input"] == expected_input

    # the monitoring plane is not traffic: scraping did not change the count
    assert total(scrape(url), "http_requests_total") == 16


def test_model_management_refusals_do_not_degrade_health(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """``ollama push`` against the proxy gets 501 (the backend owns its models): counted
    under its status, as a client error, never as a failure of the service."""
    url = start_proxy(demo_backend.url).url
    assert httpx.post(f"{url}/api/chat", json=chat("hi", stream=False), timeout=10).is_success
    for _ in range(3):
        assert httpx.post(f"{url}/api/push", json={"model": "llama3"}).status_code == 501
    health = httpx.get(f"{url}/v1/metrics/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert health.json()["error_rate"] == 0.0
    assert health.json()["client_error_rate"] == 0.75
    samples = scrape(url)
    assert total(samples, "http_requests_total", status="501") == 3
    assert total(samples, "http_request_errors_per_endpoint_total") == 0


def test_live_exposition_passes_promtool(metered_proxy: ServerProcess) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI (.ci/run installs Debian's prometheus)")
        pytest.skip("promtool not installed")
    httpx.post(f"{metered_proxy.url}/api/chat", json=chat("lint [[tokens=2]]", stream=True))
    text = httpx.get(f"{metered_proxy.url}/v1/metrics/prometheus", timeout=5).text
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""


def test_openmetrics_when_the_scraper_asks(metered_proxy: ServerProcess) -> None:
    response = httpx.get(
        f"{metered_proxy.url}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=5,
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    plain = httpx.get(f"{metered_proxy.url}/metrics", timeout=5)
    assert plain.headers["content-type"].startswith("text/plain")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_workers_report_the_totals_of_both(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    port = _free_port()
    env = {"OPENAI_API_BASE_URL": demo_backend.url}
    server = _start_workers(port, env, start_proxy)
    url = f"http://127.0.0.1:{port}"
    pids: set[str] = set()
    for _ in range(200):
        # a fresh connection per request, so the kernel spreads them over both workers
        with httpx.Client(timeout=10, headers={"Connection": "close"}) as client:
            response = client.get(f"{url}/api/version")
            assert response.status_code == 200
    previous = 0.0
    for _ in range(10):
        with httpx.Client(timeout=10, headers={"Connection": "close"}) as client:
            text = client.get(f"{url}/v1/metrics/prometheus").text
            pids.add(client.get(f"{url}/v1/metrics").json().get("window", {}).get("pid", "?"))
        samples: dict[str, float] = defaultdict(float)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name] += sample.value
        assert samples["http_requests_total"] == 200
        assert samples["http_requests_total"] >= previous
        previous = samples["http_requests_total"]
    server.stop()


def _but_the_masters(described: list[str]) -> list[str]:
    """The workers' HELP/TYPE lines without the family only their master counts (killed
    workers replaced, which one process has no master to do), checked to be there."""
    master = "trioproxy_worker_restarts_total"
    assert f"# TYPE {master} counter" in described
    return [line for line in described if master not in line]


def test_fresh_workers_describe_the_families_one_process_does(
    start_proxy: Callable[..., ServerProcess],
) -> None:
    """``--workers 2`` left out HELP/TYPE of every labelled family without samples (16 on
    a fresh proxy; the client families for good without PROXY_API_KEYS) where one process
    describes them all from the start: the same scrape before and after traffic."""
    down = "http://127.0.0.1:9/v1"  # nothing listens: no backend is needed here
    single = start_proxy(down).url
    port = _free_port()
    workers = _start_workers(port, {"OPENAI_API_BASE_URL": down}, start_proxy)
    url = f"http://127.0.0.1:{port}"

    def described(base: str) -> list[str]:
        with httpx.Client(timeout=10, headers={"Connection": "close"}) as client:
            text = client.get(f"{base}/metrics").text
        return sorted(ln for ln in text.splitlines() if ln.startswith(("# HELP", "# TYPE")))

    try:
        # trioproxy_backend_up is described once a readiness check has a result (absent
        # before: an unknown state is no outage); each process checks as it starts
        deadline = time.monotonic() + 10
        for base in (single, url):
            while "# TYPE trioproxy_backend_up gauge" not in described(base):
                assert time.monotonic() < deadline, f"no readiness result at {base}"
                time.sleep(0.05)
        for _ in range(4):  # a fresh connection each: the kernel spreads them over workers
            assert _but_the_masters(described(url)) == described(single)
        for base in (single, url, url):
            with httpx.Client(timeout=10, headers={"Connection": "close"}) as client:
                assert client.get(f"{base}/nope").status_code == 404
        for _ in range(4):
            assert _but_the_masters(described(url)) == described(single)
    finally:
        workers.stop()


def _start_workers(
    port: int, env: dict[str, str], start_proxy: Callable[..., ServerProcess]
) -> ServerProcess:
    from .conftest import _spawn, base_env

    server = _spawn(
        [
            "-m", "trioproxy", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "2", "--env-file", "",
        ],
        base_env(**env),
    )  # fmt: skip
    wait_healthy(f"http://127.0.0.1:{port}", timeout=30)
    return server


def test_responses_api_tokens_and_first_token_are_measured(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """/v1/responses speaks other events than chat completions: its tokens, usage and
    time to first token are read from them (a stream, and a reply as a whole)."""
    url = start_proxy(demo_backend.url, MAX_RETRIES="0").url
    body = {"model": "demo-chat", "input": "hello [[tokens=7]] [[first_delay=0.05]]"}
    with httpx.Client(base_url=url, timeout=10) as client:
        whole = client.post("/v1/responses", json=body).json()
        streamed = client.post("/v1/responses", json=body | {"stream": True})
    prompt = whole["usage"]["input_tokens"]
    assert prompt > 0 and whole["usage"]["output_tokens"] == 7
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert "event: response.completed" in streamed.text
    samples = scrape(url)
    assert total(samples, "http_requests_total", endpoint="v1_responses", status="200") == 2
    assert total(samples, "trioproxy_streams_total", outcome="completed") == 1
    assert total(samples, "trioproxy_tokens_total", type="input") == 2 * prompt
    assert total(samples, "trioproxy_tokens_total", type="output") == 14
    ttft = [v for labels, v in samples["trioproxy_time_to_first_token_seconds_sum"]]
    assert total(samples, "trioproxy_time_to_first_token_seconds_count") == 1
    assert 0.05 <= sum(ttft) < 2.0


def test_responses_read_again_are_not_counted_again(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """A stored response retrieved, or its stream resumed, was generated (and counted) by
    the request that created it: those requests are counted, its tokens are not again, and
    a replayed delta is no time to first token."""
    url = start_proxy(demo_backend.url, MAX_RETRIES="0").url
    body = {"model": "demo-chat", "input": "hello [[tokens=4]]", "stream": True}
    with httpx.Client(base_url=url, timeout=10) as client:
        streamed = client.post("/v1/responses", json=body)
        created = json.loads(sse_data(streamed.text)[0])["response"]
        wait_for(lambda: total(scrape(url), "trioproxy_streams_total") == 1)
        before = scrape(url)
        whole = client.get(f"/v1/responses/{created['id']}")
        resumed = client.get(f"/v1/responses/{created['id']}", params={"stream": "true"})
        items = client.get(f"/v1/responses/{created['id']}/input_items")
    assert whole.status_code == resumed.status_code == items.status_code == 200
    assert resumed.headers["content-type"].startswith("text/event-stream")
    assert "event: response.completed" in resumed.text
    wait_for(lambda: total(scrape(url), "trioproxy_streams_total") == 2)
    after = scrape(url)
    for name in ("trioproxy_tokens_total", "trioproxy_time_to_first_token_seconds_count"):
        assert total(after, name) == total(before, name) > 0, name
    assert total(after, "http_requests_total", endpoint="v1_response", status="200") == 3
    assert total(after, "trioproxy_streams_total", outcome="completed") == 2


def test_streams_without_a_first_token_are_counted_by_why(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """A time-to-first-token histogram leaves out the streams that never had one: they are
    counted by reason, so a rise in cancelled-before-output or timeouts shows."""
    url = start_proxy(demo_backend.url, MAX_RETRIES="0", STREAM_FIRST_TOKEN_TIMEOUT="0.3").url
    with httpx.Client(base_url=url, timeout=10) as client:
        late = client.post("/api/chat", json=chat("[[first_delay=2]]", stream=True))
        assert late.status_code == 504
        broken = client.post("/v1/chat/completions", json=chat("[[drop_after=0]]", stream=True))
        assert '"error"' in broken.text
        payload = chat("[[first_delay=0.25]]", stream=True)
        with client.stream("POST", "/v1/chat/completions", json=payload) as response:
            next(response.iter_lines())  # the role chunk: headers are out, no token yet

    def counted() -> dict[str, float]:
        samples = scrape(url)["trioproxy_streams_without_first_token_total"]
        return {labels["reason"]: value for labels, value in samples if value}

    wait_for(lambda: sum(counted().values()) == 3)
    assert counted() == {"timeout": 1, "error": 1, "cancelled": 1}
    summary = httpx.get(f"{url}/v1/metrics", timeout=5).json()["streaming"]
    assert summary["streams_without_first_token"] == {
        "no_output": 0, "cancelled": 1, "timeout": 1, "error": 1
    }  # fmt: skip


def test_responses_whose_usage_comes_later_are_counted_once_when_it_does(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """A background response answers "queued" without usage, and a stream cut before its
    end counted only what it carried: the usage a later poll (or resumed stream) brings
    counts then, the rest only, once."""
    url = start_proxy(demo_backend.url, MAX_RETRIES="0").url

    def tokens() -> tuple[float, float]:
        samples = scrape(url)
        return (
            total(samples, "trioproxy_tokens_total", type="input"),
            total(samples, "trioproxy_tokens_total", type="output"),
        )

    with httpx.Client(base_url=url, timeout=10) as client:
        body = {"model": "demo-chat", "input": "one two three [[tokens=7]]", "background": True}
        queued = client.post("/v1/responses", json=body).json()
        assert queued["status"] == "queued" and tokens() == (0, 0)
        done = client.get(f"/v1/responses/{queued['id']}").json()
        expected = (done["usage"]["input_tokens"], 7)
        wait_for(lambda: tokens() == expected)
        client.get(f"/v1/responses/{queued['id']}")  # polled again: nothing more
        time.sleep(0.2)
        assert tokens() == expected

    # a stream cut after a few tokens, then resumed to its end
    payload = {"model": "demo-chat", "input": "cut [[tokens=40]] [[delay=0.01]]", "stream": True}
    with httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", "/v1/responses", json=payload) as response:
            lines = response.iter_lines()
            created = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            # two text deltas reached us, so the proxy has counted them (a fixed number of
            # lines could all precede the first delta, and then nothing was counted)
            deltas = 0
            while deltas < 2:
                deltas += '"response.output_text.delta"' in next(lines)
    wait_for(lambda: total(scrape(url), "trioproxy_streams_total", outcome="cancelled") == 1)
    cut_input, cut_output = tokens()
    assert cut_input == expected[0] and expected[1] < cut_output < expected[1] + 40
    with httpx.Client(base_url=url, timeout=10) as client:
        resumed = client.get(f"/v1/responses/{created['response']['id']}?stream=true")
        usage = json.loads(sse_data(resumed.text)[-1])["response"]["usage"]
    wait_for(lambda: tokens() == (expected[0] + usage["input_tokens"], expected[1] + 40))


def test_tokens_a_stream_resumed_after_its_start_settles_go_under_its_model(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """A stream resumed with ``starting_after`` (as the openai SDK resumes one) replays no
    ``response.created``: the tokens it settles for a cut stream were counted under
    ``model=""``. Its closing event names the model."""
    url = start_proxy(demo_backend.url, MAX_RETRIES="0").url
    payload = {"model": "demo-chat", "input": "cut [[tokens=30]] [[delay=0.01]]", "stream": True}
    with httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", "/v1/responses", json=payload) as response:
            lines = response.iter_lines()
            created = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            while '"response.output_text.delta"' not in next(lines):
                pass
        wait_for(lambda: total(scrape(url), "trioproxy_streams_total", outcome="cancelled") == 1)
        resumed = client.get(
            f"/v1/responses/{created['response']['id']}",
            params={"stream": "true", "starting_after": "10"},
        )
    assert '"type":"response.created"' not in resumed.text
    usage = json.loads(sse_data(resumed.text)[-1])["response"]["usage"]
    wait_for(lambda: total(scrape(url), "trioproxy_tokens_total", type="input") > 0)
    samples = scrape(url)
    assert total(samples, "trioproxy_tokens_total", model="") == 0
    counted = {
        kind: total(samples, "trioproxy_tokens_total", model="demo-chat", type=kind)
        for kind in ("input", "output")
    }
    assert counted == {"input": usage["input_tokens"], "output": 30}


HOST_COUNTERS = (
    "network_bytes_sent_total",
    "network_bytes_recv_total",
    "disk_read_bytes_total",
    "disk_write_bytes_total",
    # the container's (cgroup's), read at scrape time too; 0 where there is none
    "trioproxy_container_cpu_usage_seconds_total",
)


def test_host_counters_never_go_down_whichever_worker_answers(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    """Each worker exposed its own psutil sample as the host counters: scrapes answered
    alternately by two workers went back and forth (103650276396 then 103650266526 bytes
    sent), which Prometheus reads as counter resets. The workers sample out of step, and
    every scrape moves the loopback counters in between."""
    port = _free_port()
    env = {"OPENAI_API_BASE_URL": demo_backend.url, "SYSTEM_METRICS_INTERVAL": "0.3"}
    server = _start_workers(port, env, start_proxy)
    url = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    previous = dict.fromkeys(HOST_COUNTERS, 0.0)
    previous_json = 0
    try:
        for attempt in range(300):
            if len(pids) == 2 and attempt >= 80:
                break
            # a fresh connection per scrape, so the kernel spreads them over both workers
            with httpx.Client(timeout=10, headers={"Connection": "close"}) as client:
                samples = scrape(url)
                summary = client.get(f"{url}/v1/metrics").json()
            pids.add(summary["window"]["pid"])
            for name in HOST_COUNTERS:
                value = total(samples, name)
                assert value >= previous[name], (name, previous[name], value)
                previous[name] = value
            sent = summary["system"]["network_io"]["bytes_sent"]
            assert sent >= previous_json, (previous_json, sent)
            previous_json = sent
        assert len(pids) == 2, "one worker answered every scrape: nothing was compared"
    finally:
        server.stop()


def test_system_metrics_disabled_are_absent_from_the_exposition(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    url = start_proxy(demo_backend.url, SYSTEM_METRICS_ENABLED="false").url
    samples = scrape(url)
    for name in (
        "system_cpu_usage_percent", "system_memory_usage_percent", *HOST_COUNTERS,
        "trioproxy_process_resident_memory_bytes", "trioproxy_process_cpu_seconds_total",
    ):  # fmt: skip
        assert name not in samples, name
    assert "system_uptime_seconds" in samples
    system = httpx.get(f"{url}/v1/metrics", timeout=5).json()["system"]
    assert system["cpu_usage_percent"] is None and system["process"]["rss_bytes"] is None
    assert system["sampler"]["enabled"] is False
    assert httpx.get(f"{url}/v1/metrics/health", timeout=5).status_code == 200


def _hypercorn(port: int, **env: str) -> subprocess.Popen[str]:
    """``hypercorn --worker-class trio --workers 2 'trioproxy.app:create_app()'``, as
    docs/configuration.md shows it, with settings from the environment only."""
    from .conftest import ROOT, base_env

    return subprocess.Popen(
        [
            sys.executable, "-m", "hypercorn", "--worker-class", "trio", "--workers", "2",
            "--bind", f"127.0.0.1:{port}", "trioproxy.app:create_app()",
        ],
        cwd=ROOT, env=base_env(TRIOPROXY_ENV_FILE="", **env), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _stop(process: subprocess.Popen[str]) -> str:
    process.terminate()
    try:
        output, _ = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def test_plain_hypercorn_workers_without_a_shared_directory_are_warned_about(
    demo_backend: ServerProcess,
) -> None:
    port = _free_port()
    process = _hypercorn(port, OPENAI_API_BASE_URL=demo_backend.url, LOG_LEVEL="WARNING")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
    reader.start()

    def warnings() -> list[str]:
        return [line for line in list(lines) if "PROMETHEUS_MULTIPROC_DIR" in line]

    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=30)
        # the second worker may start later than the first answers (a loaded machine)
        wait_for(lambda: len(warnings()) >= 2, timeout=30)
    finally:
        process.terminate()
        process.wait(timeout=15)
        reader.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()
    output = "".join(lines)
    assert len(warnings()) == 2, output  # one per worker
    assert all("hypercorn runs 2 workers" in line for line in warnings())


def test_plain_hypercorn_workers_with_a_shared_directory_agree(
    demo_backend: ServerProcess, tmp_path: Path
) -> None:
    """The documented fix: an empty PROMETHEUS_MULTIPROC_DIR; then no warning, and every
    scrape has every worker's requests."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _hypercorn(
        port,
        OPENAI_API_BASE_URL=demo_backend.url,
        LOG_LEVEL="WARNING",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )
    try:
        wait_healthy(url, timeout=30)
        for _ in range(40):
            with httpx.Client(timeout=10, headers={"Connection": "close"}) as client:
                assert client.get(f"{url}/api/version").status_code == 200
        wait_for(lambda: total(scrape(url), "http_requests_total") == 40)
        for _ in range(10):
            with httpx.Client(timeout=10, headers={"Connection": "close"}) as client:
                text = client.get(f"{url}/metrics").text
            counted = sum(
                s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.name == "http_requests_total"
            )
            assert counted == 40
    finally:
        output = _stop(process)
    assert "PROMETHEUS_MULTIPROC_DIR" not in output, output


class _SlowHeadersBackend(ScriptedHandler):
    """Model ``slow``: the headers come after 3 s; ``limited``: 429 at once; ``broken``:
    500 at once; ``unsupported``: 501 at once; any GET: 500 at once."""

    def do_POST(self) -> None:
        model = self.json_body()["model"]
        if model == "slow":
            time.sleep(3)
        status = {"limited": 429, "broken": 500, "unsupported": 501}.get(model, 200)
        if status == 200:
            self.answer(200, b"data: [DONE]\n\n", "text/event-stream")
        else:
            self.answer(status, b'{"error": {"message": "no"}}')

    def do_GET(self) -> None:
        self.answer(500, b'{"error": {"message": "down"}}')


def test_streams_that_fail_before_the_backends_headers_are_streams_too(
    start_proxy: Callable[..., ServerProcess],
) -> None:
    """A stream request that times out waiting for the backend's headers is a timed-out
    stream without a first token, whichever side of the headers the backend stalled on; a
    client that gives up waiting cancelled a stream; a backend 500 failed one. A backend
    429 refused the request (not a stream) and is counted as the backend's rate limit."""
    with serving(_SlowHeadersBackend) as backend:
        url = start_proxy(backend, MAX_RETRIES="0", STREAM_FIRST_TOKEN_TIMEOUT="0.5").url
        body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.post("/api/chat", json=body).status_code == 504
            assert client.post("/v1/chat/completions", json=body).status_code == 504
            for model, status in (("limited", 429), ("broken", 500), ("unsupported", 501)):
                answer = client.post("/v1/chat/completions", json={**body, "model": model})
                assert answer.status_code == status
            # a resumed Responses stream replays a response counted before: never a stream
            # without a first token, even when it fails before the backend answers
            assert client.get("/v1/responses/resp_1?stream=true").status_code == 500
        with pytest.raises(httpx.ReadTimeout):  # the client gives up before the 0.5 s
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.2)

        def streams() -> dict[str, float]:
            return _by_label(scrape(url)["trioproxy_streams_total"], "outcome")

        wait_for(lambda: sum(streams().values()) == 5)
        assert streams() == {"timeout": 2, "error": 2, "cancelled": 1}
        samples = scrape(url)
        # their error replies are no stream traffic: the throughput stays undefined
        assert total(samples, "trioproxy_stream_bytes_total") == 0
        assert total(samples, "trioproxy_time_to_first_byte_seconds_count") == 0
        (throughput,) = [v for _, v in samples["http_streaming_throughput_bytes_per_second"]]
        assert throughput != throughput  # NaN
        assert total(samples, "http_streaming_timeout_total") == 2
        no_token = _by_label(samples["trioproxy_streams_without_first_token_total"], "reason")
        assert no_token == {"timeout": 2, "error": 1, "cancelled": 1}
        assert total(samples, "trioproxy_upstream_errors_total", reason="status_429") == 1
        # the 501: a route the backend lacks, a client's mistake here too
        assert total(samples, "trioproxy_upstream_errors_total", reason="status_4xx") == 1
        assert total(samples, "trioproxy_upstream_errors_total", reason="timeout") == 2


def _by_label(samples: list[tuple[dict[str, str], float]], label: str) -> dict[str, float]:
    """The samples' values summed by one label's value (zeros left out)."""
    out: dict[str, float] = defaultdict(float)
    for labels, value in samples:
        if value:
            out[labels[label]] += value
    return dict(out)


def test_a_backend_501_is_the_clients_mistake_in_the_upstream_errors_too(
    metered_proxy: ServerProcess,
) -> None:
    """The request metrics count a 501 as a client error; counted as status_5xx it fired
    the UpstreamErrors alert (which leaves status_4xx and status_429 out)."""
    before = scrape(metered_proxy.url)
    for _ in range(3):
        answer = httpx.post(
            f"{metered_proxy.url}/v1/chat/completions", json=chat("[[status=501]]", stream=False)
        )
        assert answer.status_code == 501
    after = scrape(metered_proxy.url)

    def added(reason: str) -> float:
        name = "trioproxy_upstream_errors_total"
        return total(after, name, reason=reason) - total(before, name, reason=reason)

    assert (added("status_4xx"), added("status_5xx")) == (3, 0)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", chat("[[first_delay=0.4]] [[tokens=2]]", stream=True)),
        ("/api/generate", {"model": "demo-chat", "prompt": "[[first_delay=0.4]] [[tokens=2]]"}),
        (
            "/v1/completions",
            {"model": "demo-chat", "prompt": "[[first_delay=0.4]] [[tokens=2]]", "stream": True},
        ),
        ("/v1/chat/completions", chat("[[first_delay=0.4]] [[tokens=2]]", stream=True)),
    ],
)
def test_a_streams_overhead_leaves_out_the_wait_for_its_first_token(
    metered_proxy: ServerProcess, path: str, body: dict
) -> None:
    """The wait for the model's first token was counted as the proxy's own time on the
    routes whose first bytes wait for content (Ollama's, the legacy completions)."""
    url = metered_proxy.url
    before = scrape(url)
    with httpx.stream("POST", url + path, json=body, timeout=10) as response:
        header = float(response.headers["x-proxy-overhead-ms"])
        assert response.read()
    wait_for(
        lambda: (
            total(scrape(url), "trioproxy_overhead_seconds_count")
            > total(before, "trioproxy_overhead_seconds_count")
        )
    )
    after = scrape(url)

    def added(name: str) -> float:
        return total(after, name) - total(before, name)

    assert added("trioproxy_overhead_seconds_count") == 1
    assert added("trioproxy_time_to_first_token_seconds_sum") >= 0.4
    assert added("trioproxy_overhead_seconds_sum") == pytest.approx(header / 1000, abs=1e-6)
    assert added("trioproxy_overhead_seconds_sum") < 0.2
