"""The monitoring kit against a real Prometheus scraping a real trioproxy.

Starts ``python -m trioproxy --demo`` and Debian's ``prometheus`` (temp data dir, 127.0.0.1,
1 s scrape and evaluation interval) with the shipped ``deploy/prometheus/prometheus.yml`` and
``alerts.yml`` (only the target, the intervals and the Alertmanager address changed), drives
traffic with known ground truth (successes on both APIs, streamed and not; an unknown model;
backend 500s; a retried backend 503; client-cancelled streams; streams stopped by the idle
timeout; a stream the backend breaks), polls Prometheus' HTTP API until the series are there,
then runs every dashboard query and every alert expression through ``/api/v1/query``. Prometheus
asks for gzip on every scrape: the access log shows it got the exposition gzipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .fakes import V2_FILES, make_tree, v2_mount

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "trioproxy.json"
DOCKERFILE = ROOT / "Dockerfile"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
JOB = "trioproxy"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("trioproxy.cli") is None, reason="trioproxy.cli is not there yet"
    ),
]


# Ground truth of the traffic below, sent in two rounds. The first round creates every
# series; the second increments them after Prometheus has seen them, as on a long-running
# proxy (a counter that first appears already at N shows no increase to rate()).
@dataclass(frozen=True)
class Traffic:
    completed_streams: int  # half Ollama, half OpenAI
    cancelled: int  # streams the client closes after the first line
    timeouts: int  # streams the backend stalls; STREAM_IDLE_TIMEOUT=1 stops them (<= 2)
    dropped: int  # streams the backend aborts mid-way (502)
    backend_500: int  # backend answers 500
    unknown_model: int  # backend answers 404


ROUNDS = (
    Traffic(completed_streams=2, cancelled=1, timeouts=2, dropped=1, backend_500=2,
            unknown_model=1),
    Traffic(completed_streams=6, cancelled=8, timeouts=2, dropped=1, backend_500=4,
            unknown_model=1),
)  # fmt: skip


def expected_totals(rounds: tuple[Traffic, ...]) -> dict[str, float]:
    def n(field: str) -> float:
        return float(sum(getattr(r, field) for r in rounds))

    return {
        f'trioproxy_streams_total{{job="{JOB}",outcome="completed"}}': n("completed_streams"),
        f'trioproxy_streams_total{{job="{JOB}",outcome="cancelled"}}': n("cancelled"),
        f'trioproxy_streams_total{{job="{JOB}",outcome="timeout"}}': n("timeouts"),
        f'trioproxy_streams_total{{job="{JOB}",outcome="error"}}': n("dropped"),
        f'http_requests_total{{job="{JOB}",status="499"}}': n("cancelled"),
        f'http_requests_total{{job="{JOB}",status="504"}}': n("timeouts"),
        f'http_requests_total{{job="{JOB}",status="502"}}': n("dropped"),
        f'http_requests_total{{job="{JOB}",status="500"}}': n("backend_500"),
        f'http_requests_total{{job="{JOB}",status="404"}}': n("unknown_model"),
    }


# Dashboard queries that may legitimately return nothing for this traffic: every other panel
# of the dashboard must show data after the traffic below. The count of killed workers
# started again is --workers N's (its master's); this proxy is one process, as the image
# runs it (test_process.py scrapes the series from a --workers 2 proxy that lost a worker,
# and alerts_test.yml tests WorkersKilled).
DASHBOARD_MAY_BE_EMPTY: set[str] = {"Workers killed and started again (last hour) [A]"}
ALERTS_WITHOUT_DATA_IN_ONE_PROCESS = {"WorkersKilled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, procs: list[subprocess.Popen[bytes]]
) -> Any:
    """Poll `check` until it returns something truthy; fail early if a process died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args[0]} exited with {p.returncode} while waiting for {what}")
        try:
            last = check()
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def dump_logs(directory: Path) -> None:
    for path in ("proxy.log", "prometheus.log", "alertmanager.log"):
        if (directory / path).exists():
            text = (directory / path).read_text(errors="replace")
            sys.stderr.write(f"--- {path} (tail)\n{text[-4000:]}\n")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def grafana_to_promql(expr: str) -> str:
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("${job}", JOB)
        .replace("$job", JOB)
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
    )


# A comparison with a number that ends an expression or a parenthesised part, or comes
# before a set operator: `... > 0.05`, `(...) > 0.25 and ...`, `... >= 10`.
_THRESHOLD = re.compile(
    r"\s*(?:>=|<=|==|!=|>|<)\s*[0-9][0-9.e+-]*(?=\s*(?:\band\b|\bor\b|\bunless\b|\)|$))"
)


def value_side(expr: str) -> str:
    """An alert expression without its threshold comparisons: what the alert measures."""
    return _THRESHOLD.sub("", expr.strip())


class PromAPI:
    alertmanager: str | None = None

    def __init__(self, base: str) -> None:
        self.base = base
        self.client = httpx.Client(timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.client.post(f"{self.base}/api/v1/query", data={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (
            f"query failed: {expr}\n{r.status_code} {body}"
        )
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, PromAPI, list[subprocess.Popen[bytes]]]]:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (CI installs Debian's prometheus package)")
        pytest.skip("prometheus is not installed")

    alertmanager = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    proxy_port, prom_port, am_port = free_port(), free_port(), free_port()
    # a container with limits, its memory near the limit: this machine's may have none,
    # and every container panel and alert must have data
    cgroup = make_tree(
        tmp_path / "cgroup",
        "0::/\n",
        v2_mount(),
        # 570 MiB used, 100 MiB of it inactive cache: 92 % of the 512 MiB limit
        {"/sys/fs/cgroup": {**V2_FILES, "memory.current": str(570 * 1024**2)}},
    )
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "STREAM_IDLE_TIMEOUT": "1",
        "SYSTEM_METRICS_INTERVAL": "1",
        "MAX_RETRIES": "1",
        "RETRY_BACKOFF": "0.05",
        "LOG_LEVEL": "WARNING",
        "ACCESS_LOG": "true",  # the bytes of each scrape Prometheus received
        "SYSTEM_METRICS_FS_ROOT": str(cgroup),
    }
    for name in ("OPENAI_API_BASE_URL", "OPENAI_API_KEY", "PROXY_HOST", "PROXY_PORT"):
        env.pop(name, None)

    # The shipped configuration, pointed at this proxy and sped up.
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{proxy_port}"]}]
    if alertmanager:
        cfg["alerting"]["alertmanagers"] = [
            {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}
        ]
    else:
        cfg.pop("alerting")
    shipped = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert job["metrics_path"] == shipped["scrape_configs"][0]["metrics_path"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copy(PROM_DIR / "alerts.yml", tmp_path / "alerts.yml")

    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    api = PromAPI(f"http://127.0.0.1:{prom_port}")
    api.alertmanager = f"http://127.0.0.1:{am_port}" if alertmanager else None
    try:
        proxy_log = (tmp_path / "proxy.log").open("wb")
        logs.append(proxy_log)
        proxy_cmd = [sys.executable, "-m", "trioproxy", "--demo"]
        proxy_cmd += ["--host", "127.0.0.1", "--port", str(proxy_port)]
        procs.append(
            subprocess.Popen(
                proxy_cmd,
                cwd=tmp_path,
                env=env,
                stdout=proxy_log,
                stderr=subprocess.STDOUT,
            )
        )
        prom_log = (tmp_path / "prometheus.log").open("wb")
        logs.append(prom_log)
        procs.append(
            subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                cwd=tmp_path,
                stdout=prom_log,
                stderr=subprocess.STDOUT,
            )
        )
        if alertmanager:
            am_log = (tmp_path / "alertmanager.log").open("wb")
            logs.append(am_log)
            procs.append(
                subprocess.Popen(
                    [
                        alertmanager,
                        f"--config.file={ALERTMANAGER_CONFIG}",
                        f"--storage.path={tmp_path / 'am-data'}",
                        f"--web.listen-address=127.0.0.1:{am_port}",
                        "--cluster.listen-address=",
                    ],
                    cwd=tmp_path,
                    stdout=am_log,
                    stderr=subprocess.STDOUT,
                )
            )
        try:
            with httpx.Client(timeout=2) as probe:
                wait_for(
                    "the proxy's /health",
                    lambda: probe.get(f"{proxy_url}/health").status_code == 200,
                    30,
                    procs,
                )
        except BaseException:
            dump_logs(tmp_path)
            raise
        yield proxy_url, api, procs
    finally:
        api.close()
        for p in procs:
            stop(p)
        for f in logs:
            f.close()


def drive_traffic(proxy: str, t: Traffic) -> None:
    def chat(content: str, *, model: str = "demo-chat", stream: bool, api: str) -> dict[str, Any]:
        messages = [{"role": "user", "content": f"{content} ({uuid.uuid4().hex[:8]})"}]
        if api == "ollama":
            return {
                "url": f"{proxy}/api/chat",
                "json": {"model": model, "messages": messages, "stream": stream},
            }
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return {"url": f"{proxy}/v1/chat/completions", "json": body}

    with httpx.Client(timeout=httpx.Timeout(15, connect=5)) as client:

        def full(req: dict[str, Any]) -> int:
            with client.stream("POST", **req) as r:
                for _ in r.iter_bytes():
                    pass
                return r.status_code

        def cancel(req: dict[str, Any]) -> None:
            with client.stream("POST", **req) as r:
                assert r.status_code == 200
                for _ in r.iter_lines():
                    break  # got the first line: hang up mid-stream

        jobs: list[Callable[[], Any]] = []
        # Streams that stall (idle timeout) and break (backend drop) run in the background.
        for api in ("ollama", "openai")[: t.timeouts]:
            jobs.append(
                lambda a=api: full(chat("[[tokens=5]] [[stall_after=2]]", stream=True, api=a))
            )
        for _ in range(t.dropped):
            jobs.append(
                lambda: full(chat("[[tokens=8]] [[drop_after=3]]", stream=True, api="openai"))
            )
        with ThreadPoolExecutor(max_workers=4) as pool:
            background = [pool.submit(j) for j in jobs]
            statuses = []
            for i in range(t.completed_streams):
                api = "ollama" if i % 2 == 0 else "openai"
                statuses.append(full(chat("[[tokens=4]]", stream=True, api=api)))
            for api in ("ollama", "openai"):
                statuses.append(full(chat("[[tokens=4]]", stream=False, api=api)))
            assert statuses == [200] * len(statuses), statuses
            for i in range(t.cancelled):
                api = "ollama" if i % 2 == 0 else "openai"
                cancel(chat("[[tokens=400]] [[delay=0.05]]", stream=True, api=api))
            for i in range(t.backend_500):
                api = "ollama" if i % 2 == 0 else "openai"
                assert full(chat("[[status=500]]", stream=False, api=api)) == 500
            # Unknown model: the backend's 404 comes back as a 404.
            for _ in range(t.unknown_model):
                assert full(chat("hi", model="no-such-model", stream=False, api="ollama")) == 404
            # A 503 the proxy retries once, then succeeds.
            assert full(chat("[[fail_first=1]] [[tokens=2]]", stream=False, api="openai")) == 200
            assert (
                client.post(
                    f"{proxy}/api/embed", json={"model": "demo-embed", "input": ["a", "b"]}
                ).status_code
                == 200
            )
            assert (
                client.post(
                    f"{proxy}/v1/embeddings", json={"model": "demo-embed", "input": "a"}
                ).status_code
                == 200
            )
            assert client.get(f"{proxy}/api/tags").status_code == 200
            assert client.get(f"{proxy}/v1/models").status_code == 200
            for f in background:
                f.result(timeout=20)


def dashboard_queries() -> dict[str, str]:
    dash = json.loads(DASHBOARD.read_text())
    return {
        f"{p['title']} [{t['refId']}]": grafana_to_promql(t["expr"])
        for p in dash["panels"]
        for t in p["targets"]
    }


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_dashboard_and_alerts_against_real_prometheus(
    stack: tuple[str, PromAPI, list[subprocess.Popen[bytes]]], tmp_path: Path
) -> None:
    try:
        check_stack(*stack)
        check_scrapes_were_gzipped(stack[0], tmp_path / "proxy.log")
    except BaseException:
        dump_logs(tmp_path)  # shown by pytest with the failure
        raise


def check_scrapes_were_gzipped(proxy: str, proxy_log: Path) -> None:
    """Prometheus sends ``Accept-Encoding: gzip`` on every scrape and read every answer
    above (up, the exact totals): the answers it got, as the access log counts their
    bytes, were the exposition gzipped, a fraction of it."""
    path = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["scrape_configs"][0][
        "metrics_path"
    ]
    line = re.compile(rf" GET {re.escape(path)} 200 [0-9.]+ ms ([0-9]+) B")
    scrapes = [int(n) for n in line.findall(proxy_log.read_text(errors="replace"))]
    assert len(scrapes) >= 3, "the access log shows Prometheus' scrapes"
    plain = httpx.get(f"{proxy}{path}", headers={"Accept-Encoding": "identity"}, timeout=10)
    assert plain.status_code == 200 and "Content-Encoding" not in plain.headers
    # the last scrapes, of an exposition the traffic filled as much as this one
    assert max(scrapes[-3:]) * 4 < len(plain.content), (scrapes, len(plain.content))


def check_stack(proxy: str, prom: PromAPI, procs: list[subprocess.Popen[bytes]]) -> None:

    # Prometheus is up and has scraped the proxy once (the first scrape takes seconds).
    wait_for(
        "Prometheus to be ready",
        lambda: prom.client.get(f"{prom.base}/-/ready").is_success,
        30,
        procs,
    )
    wait_for(f'up{{job="{JOB}"}} == 1', lambda: prom.scalar(f'up{{job="{JOB}"}}') == 1, 30, procs)

    # The HEALTHCHECK of the Dockerfile passes against the real proxy.
    hc = re.search(r"HEALTHCHECK .*?CMD (\[.*\])", DOCKERFILE.read_text().replace("\\\n", " "))
    assert hc is not None
    cmd = json.loads(hc.group(1))
    port = proxy.rsplit(":", 1)[1]
    check = subprocess.run(
        [sys.executable, *cmd[1:]],
        env={**os.environ, "PROXY_PORT": port},
        capture_output=True,
        timeout=10,
    )
    assert check.returncode == 0, check.stderr

    def totals(expected: dict[str, float]) -> dict[str, float]:
        return {e: prom.scalar(f"sum({e})") or 0.0 for e in expected}

    def last_scrape() -> float:
        return float(prom.query(f'timestamp(up{{job="{JOB}"}})')[0]["value"][1])

    for i in range(len(ROUNDS)):
        drive_traffic(proxy, ROUNDS[i])
        expected = expected_totals(ROUNDS[: i + 1])
        wait_for(
            f"round {i + 1} of the traffic in Prometheus",
            lambda expected=expected: (
                all(v >= expected[e] for e, v in totals(expected).items())
                and prom.query(f'trioproxy_upstream_retries_total{{job="{JOB}"}} > 0')
            ),
            30,
            procs,
        )
        assert totals(expected) == expected, "Prometheus sees exactly the traffic sent"
    # A scrape after the traffic ended, and the system sampler's figures.
    seen = last_scrape()
    wait_for("another scrape", lambda: last_scrape() >= seen + 1, 10, procs)
    wait_for(
        "system metrics", lambda: prom.query(f'system_cpu_usage_percent{{job="{JOB}"}}'), 10, procs
    )

    # Every dashboard query runs without error, and shows data.
    empty = []
    for name, expr in dashboard_queries().items():
        if not prom.query(expr) and name not in DASHBOARD_MAY_BE_EMPTY:
            empty.append(f"{name}: {expr}")
    assert not empty, "dashboard panels without data:\n" + "\n".join(empty)

    # Every alert expression runs without error; its value side (before the threshold) has
    # data; the alerts this traffic must trigger do, and ServiceDown does not.
    triggered = {
        "HighErrorRate",
        "StreamTimeouts",
        "HighStreamCancellationRate",
        "ContainerMemoryNearLimit",
    }
    for rule in alert_rules():
        result = prom.query(rule["expr"])
        if rule["alert"] in ALERTS_WITHOUT_DATA_IN_ONE_PROCESS:
            assert not result and not prom.query(value_side(rule["expr"])), rule["alert"]
            continue
        assert prom.query(value_side(rule["expr"])), f"{rule['alert']}: no data"
        if rule["alert"] in triggered:
            assert result, (
                f"{rule['alert']} should be true for this traffic; it measures "
                f"{prom.query(value_side(rule['expr']))}"
            )
        if rule["alert"] == "ServiceDown":
            assert not result

    # Prometheus itself evaluates the shipped rules without error, and the triggered alerts
    # go pending (their `for:` keeps them from firing within this test).
    def rules_state() -> dict[str, dict[str, Any]]:
        groups = prom.client.get(f"{prom.base}/api/v1/rules").json()["data"]["groups"]
        return {r["name"]: r for g in groups for r in g["rules"]}

    def triggered_pending() -> dict[str, dict[str, Any]] | None:
        state = rules_state()
        ok = all(state[a]["state"] in ("pending", "firing") for a in triggered)
        return state if ok else None

    state = wait_for("the triggered alerts to go pending", triggered_pending, 15, procs)
    assert {r["alert"] for r in alert_rules()} <= set(state)
    bad = {n: r.get("lastError") for n, r in state.items() if r["health"] != "ok"}
    assert not bad, bad
    assert state["ServiceDown"]["state"] == "inactive"

    # The shipped Alertmanager configuration, in a real Alertmanager that Prometheus found,
    # routes a critical alert to the pager receiver and a warning to the default one.
    if prom.alertmanager is None:
        return
    am = prom.alertmanager
    active = wait_for(
        "Prometheus to discover the Alertmanager",
        lambda: prom.client.get(f"{prom.base}/api/v1/alertmanagers").json()["data"][
            "activeAlertmanagers"
        ],
        15,
        procs,
    )
    assert active[0]["url"].startswith(am)
    alerts = [
        {"labels": {"alertname": "ServiceDown", "severity": "critical", "job": JOB,
                    "instance": "p0:11434"}},
        {"labels": {"alertname": "HighErrorRate", "severity": "warning", "job": JOB}},
    ]  # fmt: skip
    assert prom.client.post(f"{am}/api/v2/alerts", json=alerts).status_code == 200

    def receivers() -> dict[str, str] | None:
        groups = prom.client.get(f"{am}/api/v2/alerts/groups").json()
        got = {a["labels"]["alertname"]: g["receiver"]["name"] for g in groups for a in g["alerts"]}
        return got if {"ServiceDown", "HighErrorRate"} <= set(got) else None

    got = wait_for("the Alertmanager to group the alerts", receivers, 10, procs)
    assert got["ServiceDown"] == "team-pager" and got["HighErrorRate"] == "team-default"
