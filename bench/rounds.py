"""Alternated rounds for a same-run comparison (3a and 3b with ``--compare``): pure.

The machine's speed drifts by 10-50 % over minutes, so cells measured one after another
favour whoever runs in a fast stretch. Instead each compared cell is split into rounds,
the rounds take turns (the order rotated every round), the figure is the median of the
rounds, and next to it go every round's values, their spread and the paired ratio of
each round, so a reader sees whether a difference is larger than the noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# a merged cell's figures: the median of the rounds' (rates), their sum (counts), or,
# for a latency block, the median of each quantile
_MEDIANS = ("rps", "chunks_per_s", "cpu_frac")
_SUMS = ("completed", "errors", "unanswered", "chunks", "cpu_s", "seconds", "loadgen_cpu_s")
_QUANTILE_BLOCKS = ("latency_ms", "ttfb_ms", "ttfc_ms")
# the figures of one round, and those whose ratio is paired round by round
PAIRED = ("rps", "p50", "p99", "cpu_ms_per_req", "chunks_per_s", "cpu_us_per_chunk")


def median(values: list[float | None]) -> float | None:
    s = sorted(v for v in values if v is not None)
    if not s:
        return None
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def rotated_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Round i measures the names rotated by i places: each leads in turn, and two names
    run AB BA AB BA, so a drift within the run hits both alike."""
    n = len(names)
    if not n:
        return []
    return [[*names[i % n :], *names[: i % n]] for i in range(rounds)]


def run_rounds(
    orders: list[list[str]], measure: Callable[[str, int], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """Call ``measure(name, round_index)`` in the given orders; each name's cells by round."""
    cells: dict[str, list[dict[str, Any]]] = {}
    for i, order in enumerate(orders):
        for name in order:
            cells.setdefault(name, []).append(measure(name, i))
    return cells


def round_figures(cell: dict[str, Any]) -> dict[str, Any]:
    """The figures of one round's cell that the comparison reads."""
    lat = cell.get("latency_ms") or {}
    out: dict[str, Any] = {
        "rps": cell.get("rps"),
        "p50": lat.get("p50"),
        "p99": lat.get("p99"),
        "errors": int(cell.get("errors") or 0),
    }
    cpu, completed = cell.get("cpu_s"), cell.get("completed")
    if cpu is not None:
        out["cpu_ms_per_req"] = cpu / completed * 1000 if completed else None
    if "chunks" in cell:
        chunks = cell["chunks"]
        out["chunks_per_s"] = cell.get("chunks_per_s")
        out["cpu_us_per_chunk"] = cpu / chunks * 1e6 if cpu is not None and chunks else None
    return out


def _spread(values: list[float | None]) -> list[float] | None:
    present = [v for v in values if v is not None]
    return [min(present), max(present)] if present else None


def merge_rounds(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell with the shape of a generator result (so the report and plots read it as
    before): rates and latency quantiles are the median of the rounds, counts their sum.
    Added: ``rounds`` (each round's figures, in the order measured) and ``spread``
    (min and max over the rounds of every figure)."""
    merged = dict(cells[-1])  # mode, conc and whatever else the generator says
    for key in _MEDIANS:
        if key in merged:
            merged[key] = median([c.get(key) for c in cells])
    for key in _SUMS:
        if key in merged:
            merged[key] = sum(c.get(key) or 0 for c in cells)
    statuses: dict[str, int] = {}
    for c in cells:
        for status, count in (c.get("error_statuses") or {}).items():
            statuses[status] = statuses.get(status, 0) + count
    merged["error_statuses"] = statuses
    for block in _QUANTILE_BLOCKS:
        if block in merged:
            merged[block] = _merge_quantiles([c.get(block) or {} for c in cells])
    figures = [round_figures(c) for c in cells]
    for key in ("cpu_ms_per_req", "cpu_us_per_chunk"):
        if key in figures[-1]:
            merged[key] = median([f.get(key) for f in figures])
    merged["rounds"] = figures
    merged["spread"] = {
        key: spread
        for key in PAIRED
        if key in figures[-1] and (spread := _spread([f.get(key) for f in figures]))
    }
    return merged


def _merge_quantiles(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in blocks[-1]:
        values = [b.get(key) for b in blocks]
        if key == "n":
            out[key] = sum(v or 0 for v in values)
        elif key == "max":
            out[key] = max((v for v in values if v is not None), default=None)
        else:
            out[key] = median(values)
    return out


def paired_ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Per figure: ours / theirs round by round (the rounds ran back to back), their median,
    min and max. No verdict: with 3-4 rounds, all of them on one side of 1 happens by
    chance once in 4-8 comparisons of identical proxies, so the range is what to read."""
    pairs = list(zip(ours.get("rounds") or [], theirs.get("rounds") or [], strict=False))
    out: dict[str, Any] = {"rounds": len(pairs)}
    for key in PAIRED:
        per_round = [ratio(a.get(key), b.get(key)) for a, b in pairs]
        present = [r for r in per_round if r is not None]
        if not present:
            continue
        out[key] = {
            "per_round": per_round,
            "median": median(present),
            "min": min(present),
            "max": max(present),
        }
    return out
