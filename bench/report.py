# ruff: noqa: E501, RUF001  (a formatting module: long f-strings, multiplication and minus signs)
"""Turn the results dict into the targets table (text and Markdown), the JSON file and the plots."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

V1 = "/v1/chat/completions"
OLLAMA = "/api/chat"
# 3h: two workers under c=64 use both cores (about 1.9 here); below this they could not
WORKERS_BUSY_CORES = 1.5
MB = 1024 * 1024


@dataclass
class Row:
    figure: str
    target: str
    measured: str
    ok: bool | None  # None: not measured (scenario failed)
    direct: str = ""  # the direct-backend figure of the same run, for context

    @property
    def verdict(self) -> str:
        return "n/a" if self.ok is None else ("PASS" if self.ok else "FAIL")


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k if k in d else str(k))
    return d


def _ms(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f} ms"


_RELAY_LABELS = {
    "direct": "direct\n(demo)",
    V1: "proxy\n" + V1,
    OLLAMA: "proxy\n" + OLLAMA,
    "floor_httpx": "floor\nhypercorn\n+httpx",
    "floor_raw": "floor\nhypercorn\n+raw",
}


def _chunk_reference(stream: dict[str, Any]) -> str:
    """The backend's own CPU per chunk, and the stack's relay floor in the same run."""

    def cpu(name: str) -> str:
        value = _get(stream, "relay", name, "cpu_us_per_chunk")
        return "—" if value is None else f"{value:.0f}"

    return (
        f"backend {cpu('direct')} µs/chunk; stack floor: hypercorn+httpx "
        f"{cpu('floor_httpx')} µs, hypercorn+raw socket {cpu('floor_raw')} µs"
    )


def _check(value: float | None, limit: float, *, at_least: bool = False) -> bool | None:
    if value is None:
        return None
    return value >= limit if at_least else value <= limit


def target_rows(results: dict[str, Any]) -> list[Row]:
    sc = results.get("scenarios", {})
    rows: list[Row] = []
    ns = sc.get("nonstream", {})
    cells = ns.get("cells", {})
    for path in (V1, OLLAMA):
        a1 = _get(ns, "added", path, 1) or {}
        d1 = _get(cells, "direct", 1, "latency_ms") or {}
        r1 = _get(cells, path, 1, "latency_ms") or {}
        rows.append(
            Row(
                f"added latency c=1 p50, {path}",
                "≤ 1.0 ms",
                _ms(a1.get("p50"), 3) + f" (proxy {_ms(r1.get('p50'), 3)})",
                _check(a1.get("p50"), 1.0),
                f"direct {_ms(d1.get('p50'), 3)}",
            )
        )
        rows.append(
            Row(
                f"added latency c=1 p99, {path}",
                "≤ 3 ms",
                _ms(a1.get("p99"), 3) + f" (proxy {_ms(r1.get('p99'), 3)})",
                _check(a1.get("p99"), 3.0),
                f"direct {_ms(d1.get('p99'), 3)}",
            )
        )
    for path in (V1, OLLAMA):
        a16 = _get(ns, "added", path, 16) or {}
        d16 = _get(cells, "direct", 16, "latency_ms") or {}
        rows.append(
            Row(
                f"added p99 c=16, {path}",
                "≤ 20 ms",
                _ms(a16.get("p99"), 1) + f" (p50 +{_ms(a16.get('p50'), 1)})",
                _check(a16.get("p99"), 20.0),
                f"direct p99 {_ms(d16.get('p99'), 3)}",
            )
        )
    bare32 = _get(cells, "bare_asgi", 32, "rps")
    for path in (V1, OLLAMA):
        r32 = _get(cells, path, 32, "rps")
        share = r32 / bare32 if r32 and bare32 else None
        rows.append(
            Row(
                f"throughput c=32 vs bare ASGI (3i), {path}",
                "≥ 45 %",
                "—" if share is None else f"{share * 100:.1f} % ({r32:.0f} / {bare32:.0f} req/s)",
                _check(share, 0.45, at_least=True),
                f"direct {(_get(cells, 'direct', 32, 'rps') or 0):.0f} req/s",
            )
        )
    w = sc.get("workers", {})
    rows.append(
        Row(
            "2 workers vs 1 (c=64)",
            "≥ 1.7×",
            "—"
            if not w.get("ratio")
            else f"{w['ratio']:.2f}× ({w['rps_2']:.0f} vs {w['rps_1']:.0f} req/s)"
            + _busy(w.get("cores_2")),
            _check(w.get("ratio"), 1.7, at_least=True),
        )
    )
    st = sc.get("stream", {})
    for path, label in ((V1, "relayed"), (OLLAMA, "translated")):
        cpu = _get(st, "added", path, "cpu_us_per_chunk")
        rate = _get(st, "added", path, "chunks_per_s")
        rows.append(
            Row(
                f"proxy CPU per stream chunk, {path} ({label})",
                "≤ 50 µs",
                "—" if cpu is None else f"{cpu:.0f} µs ({rate:.0f} chunks/s)",
                _check(cpu, 50.0),
                _chunk_reference(st),
            )
        )
    h = sc.get("hold", {})
    n = h.get("streams", 1000)
    rows.append(
        Row(
            f"{n} open streams: proxy RSS",
            "≤ 200 MB",
            "—"
            if not h.get("rss_open")
            else f"{h['rss_open'] / MB:.0f} MB (idle {h['rss_idle'] / MB:.0f} MB)",
            _check(h["rss_open"] / MB if h.get("rss_open") else None, 200.0),
        )
    )
    errors = None
    if "errors" in h:
        errors = h["errors"] + h.get("probe_errors", 0)
    rows.append(
        Row(
            f"{n} open streams: errors",
            "0",
            "—"
            if errors is None
            else f"{errors} ({h.get('still_open_at_close', 0)} still open when closed by the client)",
            None if errors is None else errors == 0,
        )
    )
    lr = h.get("latency_ratio_p50")
    rows.append(
        Row(
            f"{n} open streams: fresh request vs idle (p50)",
            "≤ 2×",
            "—"
            if lr is None
            else f"{lr:.2f}× ({_ms(_get(h, 'busy_ms', 'p50'))} vs {_ms(_get(h, 'idle_ms', 'p50'))})",
            _check(lr, 2.0),
        )
    )
    dc = sc.get("disconnect", {})
    for path in (V1, OLLAMA):
        p99 = _get(dc, path, "backend_closed_ms", "p99")
        nc = _get(dc, path, "not_closed")
        rows.append(
            Row(
                f"disconnect → backend closed p99, {path}",
                "≤ 20 ms",
                "—"
                if p99 is None
                else f"{p99:.1f} ms (p50 {_get(dc, path, 'backend_closed_ms', 'p50'):.1f}; {nc} not closed)",
                None if p99 is None else (p99 <= 20.0 and not nc),
                "direct p99 " + _ms(_get(dc, "direct", "backend_closed_ms", "p99"), 1),
            )
        )
    mo = sc.get("metrics_onoff", {})
    tr = mo.get("throughput_ratio")
    rows.append(
        Row(
            "metrics on vs off, throughput",
            "≥ 97 %",
            "—"
            if tr is None
            else f"{tr * 100:.1f} % (CPU/request implies {(mo.get('cpu_ratio') or 0) * 100:.1f} %;"
            f" {mo.get('pairs', 1)} twin pairs)",
            _check(tr, 0.97, at_least=True),
        )
    )
    dr = sc.get("drift", {})
    drift = dr.get("drift_bytes")
    rows.append(
        Row(
            "RSS drift after {} requests{}".format(
                f"{dr.get('requests', 0):,}",
                " (QUICK: not 100k)" if dr.get("quick_mode_reduced") else "",
            ),
            "≤ 10 MB",
            "—"
            if drift is None
            else f"{drift / MB:+.1f} MB ({dr['rss_before'] / MB:.0f} → {dr['rss_after'] / MB:.0f} MB)",
            _check(drift / MB if drift is not None else None, 10.0),
        )
    )
    sp = sc.get("scrape", {})
    sp99 = _get(sp, "under_load_ms", "p99")
    rows.append(
        Row(
            f"scrape under load (c={sp.get('load_conc', '?')}) p99",
            "≤ 10 ms",
            "—"
            if sp99 is None
            else f"{sp99:.1f} ms (p50 {_get(sp, 'under_load_ms', 'p50'):.1f}; idle p99 {_get(sp, 'idle_ms', 'p99'):.1f})",
            _check(sp99, 10.0),
            "requests at that load p99 " + _ms(_get(sp, "load_latency_ms", "p99"), 1),
        )
    )
    return [_with_errors(row, _errors_behind(row.figure, sc)) for row in rows]


def _errors_behind(figure: str, sc: dict[str, Any]) -> int:
    """Failed requests in the cells a target row's figure comes from: the generator leaves
    them out of the rates and latencies, so a figure could pass on the answers that
    worked while the rest failed."""
    cells = _get(sc, "nonstream", "cells") or {}
    for path in (V1, OLLAMA):
        if not figure.endswith(path) and f", {path} (" not in figure:
            continue
        for prefix, conc in (("added latency c=1", 1), ("added p99 c=16", 16),
                             ("throughput c=32", 32)):  # fmt: skip
            if figure.startswith(prefix):
                return int(_get(cells, path, conc, "errors") or 0)
        if figure.startswith("proxy CPU per stream chunk"):
            return int(_get(sc, "stream", "relay", path, "errors") or 0)
    if figure.startswith("2 workers"):
        rounds = _get(sc, "workers", "rounds") or []
        return sum(int(side.get("errors") or 0) for row in rounds for side in row.values())
    if figure.startswith("RSS drift"):
        return int(_get(sc, "drift", "errors") or 0)
    return 0


def _with_errors(row: Row, errors: int) -> Row:
    if not errors:
        return row
    return Row(row.figure, row.target, f"{row.measured}; {errors} FAILED requests", False,
               row.direct)  # fmt: skip


def info_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    sc = results.get("scenarios", {})
    out: list[tuple[str, str]] = []
    ce = sc.get("ceiling", {})
    if ce.get("c64"):
        out.append(
            (
                "load generator ceiling (direct to {}, c=64 / c=1)".format(ce.get("backend", "?")),
                f"{ce['c64']['rps']:.0f} req/s / {ce['c1']['rps']:.0f} req/s "
                f"(p50 {_num(_get(ce, 'c1', 'latency_ms', 'p50'), 3)} ms)",
            )
        )
    ns = sc.get("nonstream", {})
    for conc in (1, 4, 16, 32, 64):
        parts = []
        for name in ("direct", "bare_asgi", "bare_asgi_patched", V1, OLLAMA, *_others(results)):
            cell = _get(ns, "cells", name, conc)
            if cell:
                parts.append(_cell_text(name, cell))
        if parts:
            out.append((f"non-stream c={conc}", "; ".join(parts)))
        for other, pairs in (_get(ns, "paired") or {}).items():
            pair = _get(pairs, conc)
            if pair:
                out.append(_paired_row(f"non-stream c={conc}", other, pair))
    st = sc.get("stream", {})
    for path in (V1, OLLAMA):
        a = _get(st, "added", path)
        if a:
            out.append(
                (
                    f"stream {path}: added TTFB / first chunk (c=1)",
                    f"TTFB p50 {a['ttfb_p50']:+.2f} ms p99 {a['ttfb_p99']:+.2f} ms; "
                    f"first chunk p50 {a['ttfc_p50']:+.2f} ms p99 {a['ttfc_p99']:+.2f} ms",
                )
            )
    relay = _get(st, "relay")
    if relay:
        out.append(
            (
                f"stream relay, {results.get('plan', {}).get('stream_conc')} streams",
                "; ".join(f"{k}: {_relay_figure(v)}" for k, v in relay.items()),
            )
        )
    for other, pair in (_get(st, "paired") or {}).items():
        out.append(_paired_row("stream relay", other, pair))
    h = sc.get("hold", {})
    if h.get("all_open_after_s") is not None:
        out.append(
            (
                f"{h.get('streams')} streams",
                f"all open after {h['all_open_after_s']:.1f} s; {h.get('open_during_probe')} open during the probe; "
                f"token every {h.get('token_delay_s')} s; fresh p99 {_ms(_get(h, 'busy_ms', 'p99'))} vs idle {_ms(_get(h, 'idle_ms', 'p99'))}",
            )
        )
    m = results.get("machine", {})
    if m:
        out.append(
            (
                "machine",
                f"{m.get('cpu_model')}, {m.get('cores')} cores, Python {m.get('python')}; "
                f"load avg before {m.get('loadavg_before', [0])[0]:.2f}; other processes used "
                f"{m.get('other_cores_avg', 0):.2f} cores on average during the run",
            )
        )
    return out


def _num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


_PAIRED_LABELS = {"rps": "req/s", "p50": "p50", "p99": "p99", "cpu_ms_per_req": "CPU/request",
                  "chunks_per_s": "chunks/s", "cpu_us_per_chunk": "CPU/chunk"}  # fmt: skip
_CELL_PAIRED = ("rps", "p50", "p99", "cpu_ms_per_req")
_STREAM_PAIRED = ("chunks_per_s", "cpu_us_per_chunk")


def _paired_row(figure: str, other: str, pair: dict[str, Any]) -> tuple[str, str]:
    """trioproxy / the other proxy, round by round: the median and the range of the
    rounds' ratios, so a difference within the noise reads as one."""
    keys = _STREAM_PAIRED if "chunks_per_s" in pair else _CELL_PAIRED
    parts = []
    for key in keys:
        r = pair.get(key)
        if not r:
            continue
        parts.append(f"{_PAIRED_LABELS[key]} {r['median']:.2f} ({r['min']:.2f}–{r['max']:.2f})")
    label = f"{figure}: trioproxy /v1 ÷ {other}, {pair.get('rounds')} alternated rounds"
    return label, "; ".join(parts) + " (median (min–max) of the rounds' ratios)"


def _rounds_text(cell: dict[str, Any], figures: tuple[tuple[str, str, str, int], ...]) -> str:
    """', median of N rounds (each figure's range)' for a cell measured in rounds."""
    rounds = len(cell.get("rounds") or [])
    if not rounds:
        return ""
    spread = cell.get("spread") or {}
    ranges = [
        f"{label}{spread[key][0]:.{digits}f}–{spread[key][1]:.{digits}f}{unit}"
        for key, label, unit, digits in figures
        if key in spread
    ]
    return f", median of {rounds} rounds ({', '.join(ranges)})"


_CELL_RANGES = (("rps", "", "/s", 0), ("p50", "p50 ", "", 2), ("p99", "p99 ", "", 2))
_RELAY_RANGES = (("chunks_per_s", "", " chunks/s", 0), ("cpu_us_per_chunk", "", " µs", 0))


def _cell_text(name: str, cell: dict[str, Any]) -> str:
    """One cell of the generator: the rate and latencies of the answers that worked, and
    how many failed, by status (a proxy that refused half the load must not look fast)."""
    lat = cell.get("latency_ms") or {}
    text = (
        f"{name}: {cell.get('rps', 0):.0f}/s p50 {_num(lat.get('p50'))} p99 {_num(lat.get('p99'))}"
    )
    text += _rounds_text(cell, _CELL_RANGES)
    errors = int(cell.get("errors") or 0)
    if errors:
        statuses = cell.get("error_statuses") or {}
        by_status = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
        failed = errors - sum(statuses.values())
        if failed:
            by_status += (", " if by_status else "") + f"no answer: {failed}"
        text += f" (+{errors} FAILED: {by_status})"
    return text


def _others(results: dict[str, Any]) -> list[str]:
    return list((results.get("servers") or {}).get("compared") or {})


def text_table(results: dict[str, Any]) -> str:
    rows = target_rows(results)
    w1 = max(len(r.figure) for r in rows)
    w2 = max(len(r.target) for r in rows)
    w3 = max(len(r.measured) for r in rows)
    lines = [
        f"{'figure'.ljust(w1)}  {'target'.ljust(w2)}  {'measured'.ljust(w3)}  verdict  same-run direct"
    ]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(
            f"{r.figure.ljust(w1)}  {r.target.ljust(w2)}  {r.measured.ljust(w3)}  {r.verdict:7s}  {r.direct}"
        )
    lines.append(_run_line(results, rows))
    for k, v in info_rows(results):
        lines.append(f"  {k}: {v}")
    for note in results.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _busy(cores: float | None) -> str:
    if cores is None or cores >= WORKERS_BUSY_CORES:
        return ""
    return f"; the 2 workers got only {cores:.2f} cores: the machine was busy"


def _run_line(results: dict[str, Any], rows: list[Row]) -> str:
    mode = results.get("mode")
    line = f"{_tally(rows)}  ({mode} run, {results.get('duration_s')} s)"
    if mode == "quick":
        line += " — quick cells are short: verdicts near a threshold are indicative only"
    return line


def _tally(rows: list[Row]) -> str:
    passed = sum(1 for r in rows if r.ok)
    unmeasured = sum(1 for r in rows if r.ok is None)
    text = f"{passed}/{len(rows)} targets met"
    if unmeasured:
        text += f" ({unmeasured} not measured in this run: n/a)"
    return text


def markdown_table(results: dict[str, Any]) -> str:
    rows = target_rows(results)
    out = [
        "| figure | target | measured | verdict | direct backend, same run |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(f"| {r.figure} | {r.target} | {r.measured} | **{r.verdict}** | {r.direct} |")
    out.append("")
    out.append(_run_line(results, rows))
    out.append("")
    out.append("| other figures | |")
    out.append("|---|---|")
    for k, v in info_rows(results):
        out.append(f"| {k} | {v} |")
    notes = results.get("notes") or []
    if notes:
        out.append("")
        out += [f"- note: {note}" for note in notes]
    return "\n".join(out)


def write(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    results["targets"] = [r.__dict__ | {"verdict": r.verdict} for r in target_rows(results)]
    paths = [out / "results.json", out / "summary.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=str))
    paths[1].write_text(markdown_table(results) + "\n")
    paths += plots(results, out)
    return paths


# --------------------------------------------------------------------------- plots


def _relay_figure(cell: dict[str, Any]) -> str:
    cpu = cell.get("cpu_us_per_chunk")
    per_chunk = f", {cpu:.0f} µs CPU/chunk" if cpu is not None else ""
    failed = f" (+{cell['errors']} FAILED streams)" if cell.get("errors") else ""
    rounds = _rounds_text(cell, _RELAY_RANGES)
    return f"{cell.get('chunks_per_s', 0):.0f} chunks/s{per_chunk}{rounds}{failed}"


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results.setdefault("notes", []).append(
            "matplotlib is not installed: no plots (pip install -e '.[bench]')"
        )
        return []
    made: list[Path] = []
    sc = results.get("scenarios", {})
    style = {"direct": ("direct backend", "k"), "bare_asgi": ("bare ASGI (3i)", "tab:gray"),
             V1: ("proxy " + V1, "tab:blue"), OLLAMA: ("proxy " + OLLAMA, "tab:orange"),
             "floor_httpx": ("floor", "tab:green"), "floor_raw": ("floor", "tab:olive")}  # fmt: skip
    spare = iter(("tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:cyan"))
    for name in _others(results):  # compared proxies: colours no other line has
        style.setdefault(name, (name, next(spare, None)))

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=72)
        plt.close(fig)
        made.append(path)

    cells = _get(sc, "nonstream", "cells")
    if cells:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for name, (label, color) in style.items():
            series = cells.get(name) or {}
            concs = sorted(int(c) for c in series)
            if not concs:
                continue
            p50 = [series[str(c)]["latency_ms"]["p50"] for c in concs]
            p99 = [series[str(c)]["latency_ms"]["p99"] for c in concs]
            rps = [series[str(c)]["rps"] for c in concs]
            axes[0].plot(concs, p50, "o-", color=color, label=label)
            axes[0].plot(concs, p99, "x--", color=color, alpha=0.7)
            if name != "direct":
                axes[1].plot(concs, rps, "o-", color=color, label=label)
                for c in concs:  # a cell measured in rounds: each round's rate
                    each = [r.get("rps") or 0 for r in series[str(c)].get("rounds") or []]
                    axes[1].plot([c] * len(each), each, ".", color=color, ms=3)
        added = _get(sc, "nonstream", "added") or {}
        for path in (V1, OLLAMA, *_others(results)):  # the compared proxies' too
            series = added.get(path) or {}
            concs = sorted(int(c) for c in series)
            axes[2].plot(
                concs,
                [max(0.01, series[str(c)]["p50"] or 0.01) for c in concs],
                "o-",
                color=style[path][1],
                label=f"{path} p50",
            )
            axes[2].plot(
                concs,
                [max(0.01, series[str(c)]["p99"] or 0.01) for c in concs],
                "x--",
                color=style[path][1],
                label=f"{path} p99",
            )
        axes[0].set(xscale="log", yscale="log", xlabel="concurrency", ylabel="latency ms (o p50, x p99)",
                    title="latency vs concurrency")  # fmt: skip
        axes[1].set(
            xscale="log", xlabel="concurrency", ylabel="req/s", title="throughput (direct omitted)"
        )
        axes[2].set(
            xscale="log",
            yscale="log",
            xlabel="concurrency",
            ylabel="ms (clipped at 0.01)",
            title="added latency (proxy − direct)",
        )
        axes[2].axhline(1.0, color="green", lw=0.8, ls=":", label="1 ms (c=1 p50 target)")
        axes[2].axhline(20.0, color="red", lw=0.8, ls=":", label="20 ms (c=16 p99 target)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.set_xticks([1, 4, 16, 32, 64], ["1", "4", "16", "32", "64"])
        axes[0].legend(fontsize=7)
        axes[2].legend(fontsize=7)
        save(fig, "latency_vs_concurrency.png")

    w = sc.get("workers")
    if w and w.get("rounds"):
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        bare32 = _get(cells, "bare_asgi", 32, "rps") if cells else None
        labels = ["1 worker", "2 workers"]
        vals = [w["rps_1"], w["rps_2"]]
        ax.bar(labels, vals, color=["tab:blue", "tab:green"])
        for i, key in enumerate(("1", "2")):
            ax.plot([i] * len(w["rounds"]), [r[key]["rps"] for r in w["rounds"]], "k.", ms=5)
        if bare32:
            ax.axhline(
                bare32,
                color="tab:gray",
                ls="--",
                lw=1,
                label=f"bare ASGI 1 worker, c=32 ({bare32:.0f})",
            )
            ax.legend(fontsize=7)
        ax.set(
            ylabel="req/s (c=64, mixed /v1 + /api/chat)",
            title=f"throughput vs workers: {w['ratio']:.2f}×",
        )
        ax.grid(axis="y", alpha=0.3)
        save(fig, "throughput_vs_workers.png")

    relay = _get(sc, "stream", "relay")
    if relay:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        names = list(relay)
        labels = [_RELAY_LABELS.get(n, n) for n in names]
        colors = [style.get(n, ("", "k"))[1] for n in names]
        axes[0].bar(labels, [relay[n]["chunks_per_s"] for n in names], color=colors)
        axes[0].set(ylabel="chunks/s received", title="chunk relay rate")
        axes[1].bar(labels, [relay[n].get("cpu_us_per_chunk") or 0 for n in names], color=colors)
        for i, n in enumerate(names):  # a relay measured in rounds: each round's figure
            rounds = relay[n].get("rounds") or []
            for ax, key in zip(axes, ("chunks_per_s", "cpu_us_per_chunk"), strict=True):
                ax.plot([i] * len(rounds), [r.get(key) or 0 for r in rounds], "k.", ms=4)
        axes[1].axhline(50, color="red", ls=":", lw=1, label="target 50 µs (proxy)")
        axes[1].set(ylabel="CPU µs per chunk", title="CPU per chunk (direct = backend's own)")
        axes[1].legend(fontsize=7)
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="y", alpha=0.3)
        save(fig, "chunk_relay.png")

    drift = sc.get("drift", {}).get("rss_samples")
    hold = sc.get("hold", {}).get("rss_samples")
    if drift or hold:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        if drift:
            axes[0].plot([s[0] for s in drift], [s[1] / MB for s in drift], "-", color="tab:blue")
            axes[0].set(xlabel="s", ylabel="proxy RSS MB",
                        title=f"RSS during {sc['drift'].get('requests', 0):,} requests")  # fmt: skip
        if hold:
            axes[1].plot([s[0] for s in hold], [s[1] / MB for s in hold], "-", color="tab:orange")
            axes[1].axhline(200, color="red", ls=":", lw=1, label="target 200 MB")
            axes[1].set(xlabel="s", ylabel="proxy RSS MB",
                        title=f"RSS: {sc['hold'].get('streams')} streams opened, held, closed")  # fmt: skip
            axes[1].legend(fontsize=7)
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
        save(fig, "rss_over_time.png")
    return made


def copy_plots(paths: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if p.suffix == ".png":
            shutil.copy2(p, dest / p.name)


# --------------------------------------------------------------------------- profiles

_OWNERS = (
    ("trioproxy/cli.py", None),  # the root of every stack: not an owner
    ("trioproxy/__main__.py", None),
    ("trioproxy/metrics/", "trioproxy.metrics"),
    # our patches replace parts of hypercorn's per-request path: that work is the server's;
    # netstream replaces httpcore's socket stream: that work is the client's
    ("trioproxy/hypercorn_patches.py", "hypercorn (server side HTTP)"),
    ("trioproxy/netstream.py", "httpx + httpcore (client side HTTP)"),
    ("prometheus_client/", "prometheus_client"),
    ("trioproxy/", "trioproxy (app, routes, translate, relay, upstream)"),
    ("quart_trio/", "Quart + quart-trio + Werkzeug"),
    ("quart/", "Quart + quart-trio + Werkzeug"),
    ("werkzeug/", "Quart + quart-trio + Werkzeug"),
    ("flask/", "Quart + quart-trio + Werkzeug"),
    ("hypercorn/", "hypercorn (server side HTTP)"),
    ("httpx/", "httpx + httpcore (client side HTTP)"),
    ("httpcore/", "httpx + httpcore (client side HTTP)"),
)
_LEAF = (
    ("trio/_socket.py", "socket syscalls (send/recv via trio)"),
    ("trio/", "trio (scheduler, cancel scopes, locks)"),
    ("<attrs generated methods trio", "trio (scheduler, cancel scopes, locks)"),
    ("outcome/", "trio (scheduler, cancel scopes, locks)"),
    ("h11/", "h11 (HTTP/1.1 parsing, both sides)"),
    ("json/", "json"),
    ("logging/", "logging"),
    ("contextlib.py", "contextlib"),
    ("trioproxy/metrics/", "trioproxy.metrics"),
    # our patches replace parts of hypercorn's per-request path: that work is the server's;
    # netstream replaces httpcore's socket stream: that work is the client's
    ("trioproxy/hypercorn_patches.py", "hypercorn (server side HTTP)"),
    ("trioproxy/netstream.py", "httpx + httpcore"),
    ("prometheus_client/", "prometheus_client"),
    ("trioproxy/", "trioproxy"),
    ("quart", "Quart + quart-trio + Werkzeug"),
    ("werkzeug/", "Quart + quart-trio + Werkzeug"),
    ("hypercorn/", "hypercorn"),
    ("httpx/", "httpx + httpcore"),
    ("httpcore/", "httpx + httpcore"),
)


def _frame_file(frame: str) -> str:
    i = frame.rfind(" (")
    return frame[i + 2 :] if i >= 0 else frame


def _classify(frame: str, table) -> str | None:
    f = _frame_file(frame)
    for key, label in table:
        if key in f:
            return label
    return None


_ROOTS = ("trioproxy/cli.py", "trioproxy/__main__.py", "<frozen runpy>")


def profile_breakdown(raw_path: Path, top: int = 15) -> dict[str, Any]:
    """Summarise py-spy ``--format raw`` output (folded stacks).

    ``by_owner``: each sample goes to the innermost frame that belongs to a component
    (hypercorn, Quart, httpx, trioproxy, its metrics); frames of shared libraries (trio, h11,
    json, the stdlib) count for the component that called them. Samples with no such frame
    are the trio scheduler itself. ``by_leaf``: where the CPU literally was (self time)."""
    owner: dict[str, int] = {}
    leaf: dict[str, int] = {}
    funcs: dict[str, int] = {}
    own_incl: dict[str, int] = {}
    total = 0
    for line in Path(raw_path).read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        total += n
        who = None
        for frame in reversed(frames):
            if any(r in frame for r in _ROOTS):
                who = None
                break
            who = _classify(frame, _OWNERS)
            if who:
                break
        who = who or "trio scheduler (no component on the stack)"
        owner[who] = owner.get(who, 0) + n
        last = frames[-1]
        cat = _classify(last, _LEAF) or _frame_file(last).split("/")[-1].split(":")[0] or "?"
        leaf[cat] = leaf.get(cat, 0) + n
        funcs[last] = funcs.get(last, 0) + n
        seen = set()
        for frame in frames:
            if "trioproxy/" in frame and not any(r in frame for r in _ROOTS):
                key = frame.rsplit(":", 1)[0] + ")" if ":" in frame else frame
                if key not in seen:
                    seen.add(key)
                    own_incl[key] = own_incl.get(key, 0) + n

    def pct(d: dict[str, int], k: int | None = None) -> list[tuple[str, float]]:
        items = sorted(d.items(), key=lambda kv: -kv[1])
        return [(name, round(100.0 * v / total, 1)) for name, v in items[:k]] if total else []

    return {
        "samples": total,
        "by_owner": pct(owner),
        "by_leaf": pct(leaf, 12),
        "top_self": pct(funcs, top),
        "trioproxy_inclusive": pct(own_incl, top),
    }


def profile_text(results: dict[str, Any]) -> str:
    lines = []
    for name, data in results.get("scenarios", {}).items():
        if not isinstance(data, dict) or "breakdown" not in data:
            if isinstance(data, dict) and "error" in data:
                lines.append(f"{name}: ERROR {data['error']}")
            continue
        b = data["breakdown"]
        unit = data.get("unit", "request")
        per = data.get("cpu_us_per_unit") or 0.0
        lines.append(
            f"\n== {name}: {data['rps']:.0f} req/s, {per:.0f} µs CPU per {unit} "
            f"({b['samples']} samples; py-spy sampling adds a little)"
        )
        lines.append("  by component (innermost owner on the stack), % and µs per " + unit)
        for k, v in b["by_owner"]:
            lines.append(f"    {v:5.1f} %  {per * v / 100:7.0f} µs  {k}")
        lines.append("  by leaf (self time)")
        for k, v in b["by_leaf"]:
            lines.append(f"    {v:5.1f} %  {k}")
        lines.append("  top self functions")
        for k, v in b["top_self"][:10]:
            lines.append(f"    {v:5.1f} %  {k[:120]}")
        lines.append("  trioproxy functions, inclusive")
        for k, v in b["trioproxy_inclusive"][:10]:
            lines.append(f"    {v:5.1f} %  {k[:120]}")
    return "\n".join(lines)
