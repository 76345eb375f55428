# ruff: noqa: RUF001  (the report writes ranges with an en dash)
"""``python -m bench --compare`` measures trioproxy's /v1 cell and each compared proxy's in
alternated rounds (3a and 3b), so a drift of the machine's speed does not decide the
comparison; the figure is the median of the rounds, shown with their spread and the paired
ratio of each round. Pure: the generator is replaced by a recorder, no servers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from bench import report, rounds, scenarios
from bench.scenarios import OLLAMA, V1


def test_each_round_rotates_the_order() -> None:
    assert rounds.rotated_orders(["a", "b"], 4) == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    three = rounds.rotated_orders(("a", "b", "c"), 3)
    assert three == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):  # each name leads, sits in the middle and ends once
        assert sorted(order[position] for order in three) == ["a", "b", "c"]
    assert rounds.rotated_orders([], 4) == []


def test_rounds_run_in_the_given_orders() -> None:
    calls: list[tuple[str, int]] = []

    def measure(name: str, i: int) -> dict[str, Any]:
        calls.append((name, i))
        return {"rps": float(len(calls))}

    cells = rounds.run_rounds(rounds.rotated_orders(["a", "b"], 3), measure)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert [c["rps"] for c in cells["a"]] == [1.0, 4.0, 5.0]
    assert [c["rps"] for c in cells["b"]] == [2.0, 3.0, 6.0]


def cell(rps: float, p50: float, p99: float, *, cpu_s: float = 1.0, errors: int = 0,
         statuses: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
    completed = int(rps)
    return {
        "mode": "closed",
        "conc": 4,
        "seconds": 1.0,
        "completed": completed,
        "rps": rps,
        "errors": errors,
        "unanswered": 0,
        "error_statuses": statuses or {},
        "latency_ms": {
            "p50": p50,
            "p90": p50,
            "p99": p99,
            "mean": p50,
            "max": p99 * 2,
            "n": completed,
        },
        "cpu_s": cpu_s,
        "cpu_frac": cpu_s,
    }


def test_a_merged_cell_is_the_median_of_its_rounds_with_their_spread() -> None:
    merged = rounds.merge_rounds(
        [
            cell(1000, 1.0, 3.0, cpu_s=0.5),
            cell(800, 1.4, 2.0, cpu_s=0.6, errors=2, statuses={"503": 2}),
            cell(900, 1.2, 9.0, cpu_s=0.45, errors=1, statuses={"503": 1}),
        ]
    )
    assert merged["rps"] == 900 and merged["cpu_frac"] == 0.5
    assert merged["latency_ms"]["p50"] == 1.2 and merged["latency_ms"]["p99"] == 3.0
    assert merged["latency_ms"]["max"] == 18.0 and merged["latency_ms"]["n"] == 2700
    # counts add up: a failure in any round stays visible (and fails its target)
    assert merged["completed"] == 2700 and merged["errors"] == 3
    assert merged["error_statuses"] == {"503": 3}
    # CPU per request: the median of the rounds' (0.5, 0.75, 0.5 ms), not of the seconds
    assert merged["cpu_ms_per_req"] == pytest.approx(0.5)
    assert [r["rps"] for r in merged["rounds"]] == [1000, 800, 900]
    assert merged["spread"]["rps"] == [800, 1000]
    assert merged["spread"]["p99"] == [2.0, 9.0]
    assert merged["spread"]["cpu_ms_per_req"] == pytest.approx([0.5, 0.75])


def test_a_merged_stream_cell_has_the_median_cpu_per_chunk() -> None:
    cells = []
    for chunks, cpu in ((3000, 0.3), (3300, 0.297), (2000, 0.4)):
        c = cell(30, 1000.0, 1100.0, cpu_s=cpu) | {"chunks": chunks, "chunks_per_s": chunks}
        c["ttfb_ms"] = {"p50": 1.0, "p99": 2.0}
        cells.append(c)
    merged = rounds.merge_rounds(cells)
    assert merged["chunks"] == 8300 and merged["chunks_per_s"] == 3000
    assert merged["cpu_us_per_chunk"] == pytest.approx(100.0)  # of 100, 90 and 200 µs
    assert merged["spread"]["cpu_us_per_chunk"] == pytest.approx([90.0, 200.0])
    assert merged["ttfb_ms"] == {"p50": 1.0, "p99": 2.0}


def test_paired_ratios_are_taken_round_by_round() -> None:
    ours = rounds.merge_rounds([cell(1000, 1.0, 2.0), cell(600, 2.0, 4.0), cell(900, 1.0, 2.0)])
    theirs = rounds.merge_rounds([cell(500, 2.0, 2.0), cell(500, 2.0, 2.0), cell(600, 1.0, 1.0)])
    pair = rounds.paired_ratios(ours, theirs)
    assert pair["rounds"] == 3
    assert pair["rps"]["per_round"] == pytest.approx([2.0, 1.2, 1.5])
    assert pair["rps"]["median"] == pytest.approx(1.5)
    assert (pair["rps"]["min"], pair["rps"]["max"]) == pytest.approx((1.2, 2.0))
    assert pair["p50"]["per_round"] == pytest.approx([0.5, 1.0, 1.0])
    assert pair["p99"]["per_round"] == pytest.approx([1.0, 2.0, 2.0])


# --------------------------------------------------------------------------- the scenarios


@dataclass(eq=False)
class FakeServer:
    name: str
    pid: int
    url: str = "http://127.0.0.1:9"

    def pids(self) -> list[int]:
        return [self.pid]


class Recorder:
    """Stands in for ``scenarios.closed``: notes each cell and answers with a figure that
    grows with every call, so medians and orders can be checked."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, server: FakeServer, requests: list[dict[str, Any]], conc: int, *,
                 duration: float, warmup: float, watch: list[int] | None = None,
                 **extra: Any) -> dict[str, Any]:  # fmt: skip
        n = len(self.calls) + 1
        self.calls.append({"server": server.name, "path": requests[0]["path"], "conc": conc,
                           "duration": duration, "warmup": warmup, "watch": watch})  # fmt: skip
        result = cell(100.0 * n, float(n), 2.0 * n, cpu_s=0.01 * n)
        if extra.get("stream"):
            result |= {"chunks": 1000 * n, "chunks_per_s": 1000.0 * n}
        return result

    def cells(self, conc: int | None = None) -> list[tuple[str, str]]:
        return [(c["server"], c["path"]) for c in self.calls if conc in (None, c["conc"])]


def fake_bench(monkeypatch: pytest.MonkeyPatch, others: tuple[str, ...]) -> tuple[Any, Recorder]:
    recorder = Recorder()
    monkeypatch.setattr(scenarios, "closed", recorder)
    plan = scenarios.Plan.make(quick=False)
    bench = scenarios.Bench(plan, scenarios.Progress([], enabled=False))
    for i, name in enumerate(("fixed", "bare", "bare_patched", "proxy", "proxy_stream")):
        setattr(bench, name, FakeServer(name, 100 + i))
    for i, name in enumerate(others):
        bench.compare[name] = "cmd"
        bench.others[name] = FakeServer(name, 200 + i)
    return bench, recorder


def test_without_compare_3a_runs_its_cells_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    bench, recorder = fake_bench(monkeypatch, ())
    bench.s_nonstream()
    assert recorder.cells(1) == [("fixed", V1), ("bare", V1), ("proxy", V1), ("proxy", OLLAMA)]
    assert recorder.cells(32) == [("fixed", V1), ("bare", V1), ("bare_patched", V1),
                                  ("proxy", V1), ("proxy", OLLAMA)]  # fmt: skip
    assert {c["duration"] for c in recorder.calls} == {bench.plan.cell}
    assert {c["warmup"] for c in recorder.calls} == {bench.plan.warmup}
    ns = bench.results["scenarios"]["nonstream"]
    assert "paired" not in ns and "rounds" not in ns["cells"][V1]["1"]


def test_with_compare_3a_alternates_trioproxy_and_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench, recorder = fake_bench(monkeypatch, ("copy", "other"))
    plan = bench.plan
    bench.s_nonstream()
    cells = recorder.cells(16)
    assert cells[:3] == [("fixed", V1), ("bare", V1), ("proxy", OLLAMA)]
    alternated = [server for server, _ in cells[3:]]
    assert alternated == [
        "proxy", "copy", "other",
        "copy", "other", "proxy",
        "other", "proxy", "copy",
        "proxy", "copy", "other",
    ]  # fmt: skip
    timed = [c for c in recorder.calls if c["conc"] == 16][3:]
    assert {c["duration"] for c in timed} == {plan.compare_cell}
    assert plan.compare_rounds * plan.compare_cell == plan.cell  # the same time per cell
    # the first round warms up as a single cell does; later ones only reopen connections
    assert [c["warmup"] for c in timed[:3]] == [plan.warmup] * 3
    assert {c["warmup"] for c in timed[3:]} == {0.3}
    ns = bench.results["scenarios"]["nonstream"]
    ours, theirs = ns["cells"][V1]["16"], ns["cells"]["copy"]["16"]
    # each round's figure is the cell the recorder answered for trioproxy in that round
    nth = [i + 1 for i, c in enumerate(recorder.calls) if c["conc"] == 16 and c["server"] == "proxy"
           and c["path"] == V1]  # fmt: skip
    assert [r["rps"] for r in ours["rounds"]] == [100.0 * n for n in nth]
    assert ours["rps"] == rounds.median([r["rps"] for r in ours["rounds"]])
    assert len(ours["rounds"]) == len(theirs["rounds"]) == plan.compare_rounds
    pair = ns["paired"]["copy"]["16"]
    assert pair["rps"]["per_round"] == [
        a["rps"] / b["rps"] for a, b in zip(ours["rounds"], theirs["rounds"], strict=True)
    ]
    assert pair["orders"][1] == ["copy", "other", V1]
    assert ns["rounds"] == plan.compare_rounds
    # the keys the report and the plots read are all there
    assert ns["added"]["copy"]["16"]["cpu_ms_per_req"] == theirs["cpu_ms_per_req"]
    assert list(ns["cells"]) == ["direct", "bare_asgi", V1, OLLAMA, "copy", "other",
                                 "bare_asgi_patched"]  # fmt: skip


def relay_reqs(names: list[str]) -> dict[str, Any]:
    req = scenarios.chat_request(V1, stream=True)
    return {name: (FakeServer(name, 300 + i), req, "sse", [300 + i])
            for i, name in enumerate(names)}  # fmt: skip


def test_the_stream_relay_alternates_only_when_comparing(monkeypatch: pytest.MonkeyPatch) -> None:
    bench, recorder = fake_bench(monkeypatch, ())
    plan = bench.plan
    names = ["direct", V1, OLLAMA, "floor_httpx", "floor_raw"]
    relay: dict[str, Any] = {}
    bench._relay_cells(relay_reqs(names), relay)
    assert [c["server"] for c in recorder.calls] == names
    assert {c["duration"] for c in recorder.calls} == {plan.stream_cell}

    bench, recorder = fake_bench(monkeypatch, ("copy",))
    relay = {}
    bench._relay_cells(relay_reqs([*names, "copy"]), relay, alternated=(V1, "copy"))
    served = [c["server"] for c in recorder.calls]
    assert served[:4] == ["direct", OLLAMA, "floor_httpx", "floor_raw"]
    assert served[4:] == [V1, "copy", "copy", V1, V1, "copy", "copy", V1]
    assert {c["duration"] for c in recorder.calls[4:]} == {plan.compare_stream_cell}
    assert plan.compare_rounds * plan.compare_stream_cell == plan.stream_cell
    assert list(relay) == [*names, "copy"]  # the report's and the plot's order
    assert relay[V1]["cpu_us_per_chunk"] == rounds.median(
        [r["cpu_us_per_chunk"] for r in relay[V1]["rounds"]]
    )
    assert "rounds" not in relay["direct"]


def test_the_report_shows_the_rounds_spread_and_paired_ratios() -> None:
    ours = rounds.merge_rounds([cell(1000, 1.0, 2.0), cell(600, 2.0, 4.0), cell(900, 1.0, 2.0)])
    theirs = rounds.merge_rounds([cell(500, 2.0, 2.0), cell(500, 2.0, 2.0), cell(600, 1.0, 1.0)])
    relay_ours = rounds.merge_rounds(
        [cell(30, 900.0, 1000.0, cpu_s=0.3) | {"chunks": n, "chunks_per_s": n}
         for n in (3000, 3300, 3200)]
    )  # fmt: skip
    relay_theirs = rounds.merge_rounds(
        [cell(30, 900.0, 1000.0, cpu_s=0.6) | {"chunks": n, "chunks_per_s": n}
         for n in (3000, 3300, 3200)]
    )  # fmt: skip
    results = {
        "mode": "quick",
        "servers": {"compared": {"copy": "cmd"}},
        "scenarios": {
            "nonstream": {
                "cells": {
                    "direct": {"1": cell(9000, 0.1, 0.2)},
                    V1: {"1": ours},
                    "copy": {"1": theirs},
                },
                "paired": {"copy": {"1": rounds.paired_ratios(ours, theirs)}},
            },
            "stream": {
                "relay": {V1: relay_ours, "copy": relay_theirs},
                "paired": {"copy": rounds.paired_ratios(relay_ours, relay_theirs)},
            },
        },
    }
    table = report.text_table(results)
    assert (
        f"{V1}: 900/s p50 1.00 p99 2.00, median of 3 rounds (600–1000/s, p50 1.00–2.00, "
        "p99 2.00–4.00)" in table
    )
    assert (
        "non-stream c=1: trioproxy /v1 ÷ copy, 3 alternated rounds: req/s 1.50 (1.20–2.00)"
        "; p50 1.00 (0.50–1.00); p99 2.00 (1.00–2.00)" in table
    )
    assert "copy: 3200 chunks/s, 188 µs CPU/chunk, median of 3 rounds (3000–3300 chunks/s" in table
    assert "stream relay: trioproxy /v1 ÷ copy, 3 alternated rounds: chunks/s 1.00 (1.00–1.00)" in (
        table
    )
    assert "CPU/chunk 0.50 (0.50–0.50) (median (min–max) of the rounds' ratios)" in table
    assert "alternated rounds" in report.markdown_table(results)


# --------------------------------------------------------------------------- the starts


@dataclass(eq=False)
class LaunchedServer(FakeServer):
    """A server as ``servers.launch_proxy`` returns it: its wait for readiness, its stop
    and its launch noted in one list, in order."""

    events: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""

    def ready(self) -> LaunchedServer:
        self.events.append(("ready", self.name))
        return self

    def stop(self) -> None:
        self.events.append(("stop", self.name))

    def log(self) -> str:
        return ""

    def worker_pids(self) -> list[int]:
        return [self.pid]


class Launches:
    """Stands in for ``servers.launch_proxy``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, upstream: str, *, workers: int = 1, name: str = "proxy",
                 **env: str) -> LaunchedServer:  # fmt: skip
        self.events.append(("launch", name))
        return LaunchedServer(name, 300 + len(self.events), events=self.events)


def test_the_metrics_twins_start_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both twins of a pair are launched before either is waited for (a proxy's start is
    ~1 s of imports: the quick run's 2-minute budget), the first launched taking turns."""
    bench, _ = fake_bench(monkeypatch, ())
    launches = Launches()
    monkeypatch.setattr(scenarios.servers, "launch_proxy", launches)
    bench.s_metrics_onoff()
    on, off = "proxy-metrics-on", "proxy-metrics-off"
    pairs = [launches.events[i : i + 6] for i in range(0, len(launches.events), 6)]
    assert len(pairs) == bench.plan.onoff_pairs
    for index, pair in enumerate(pairs):
        first, second = (on, off) if index % 2 == 0 else (off, on)
        assert pair[:4] == [("launch", first), ("launch", second),
                            ("ready", first), ("ready", second)]  # fmt: skip
        assert sorted(pair[4:]) == [("stop", off), ("stop", on)]


def test_the_one_and_two_worker_proxies_start_side_by_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench, recorder = fake_bench(monkeypatch, ())
    launches = Launches()
    monkeypatch.setattr(scenarios.servers, "launch_proxy", launches)
    bench.s_workers()
    assert launches.events[:4] == [("launch", "proxy-1w"), ("launch", "proxy-2w"),
                                   ("ready", "proxy-1w"), ("ready", "proxy-2w")]  # fmt: skip
    warmups = recorder.calls[:2]
    assert [c["duration"] for c in warmups] == [bench.plan.workers_warmup] * 2


def test_compared_proxies_start_alongside_the_bench_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A compared proxy (LiteLLM's takes 10-30 s to start) is launched before the bench's
    own servers are waited for, and one whose launch fails is a note, not a failed step."""
    events: list[tuple[str, str]] = []

    def launcher(kind: str) -> Any:
        def launch(*args: Any, name: str | None = None, **kwargs: Any) -> LaunchedServer:
            events.append(("launch", name or kind))
            return LaunchedServer(name or kind, 400 + len(events), events=events)

        return launch

    def external(name: str, command: str, upstream: str) -> LaunchedServer:
        if command == "missing":
            raise FileNotFoundError(command)
        return launcher(name)()

    monkeypatch.setattr(scenarios.servers, "nginx_path", lambda: "/usr/sbin/nginx")
    monkeypatch.setattr(scenarios.servers, "start_nginx", launcher("nginx"))
    for kind in ("demo", "bare_asgi", "proxy"):
        monkeypatch.setattr(scenarios.servers, f"launch_{kind}", launcher(kind))
    monkeypatch.setattr(scenarios.servers, "launch_external", external)
    compare = {"other": "cmd", "typo": "missing"}
    bench = scenarios.Bench(scenarios.Plan.make(quick=True),
                            scenarios.Progress([], enabled=False), compare=compare)  # fmt: skip
    bench._start_servers()
    assert events.index(("launch", "other")) < events.index(("ready", "proxy"))
    assert ("ready", "other") in events and list(bench.others) == ["other"]
    assert bench.unstarted == {"typo"}
    assert any("could not start typo for comparison" in note for note in bench.notes)
