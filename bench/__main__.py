"""``python -m bench [--quick] [--out DIR]``: run every scenario, print the targets table,
write ``results.json``, ``summary.md`` and the PNG plots into DIR."""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import time
from pathlib import Path

SCENARIOS = ("ceiling", "nonstream", "stream", "disconnect", "metrics_onoff", "scrape", "drift",
             "workers", "hold")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "trioproxy benchmark (issue 5, scenarios 3a-3i): the proxy next to the direct "
            "backend in the same run, the bare-ASGI ceiling, and every target with PASS/FAIL. "
            "Full run < 15 min, --quick < 2 min. Needs nginx for the fixed backend (falls back "
            "to the bare ASGI app and says so) and matplotlib for the plots (the 'bench' extra)."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="short cells; 3f: 10k requests or 6 s")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default bench/out/<mode>-<timestamp>)",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated subset of scenarios ({', '.join(SCENARIOS)}); for development",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=COMMAND",
        help="another proxy to measure next to trioproxy in 3a (POST /v1/chat/completions) "
        "and 3b (the stream relay), in rounds alternated with trioproxy's /v1 cells: a "
        "command line with {upstream} (the backend, .../v1) and {port} filled in; repeatable",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the bench: py-spy on the proxy under each kind of load, with a "
        "breakdown by component (needs `pip install py-spy`)",
    )
    return parser


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def _usable_out(out: Path) -> str | None:
    """Why results could not be written to ``out`` (checked before a run of minutes)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out}: {exc.strerror or exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import interrupts, report, scenarios

    interrupts.install()
    nofile = raise_nofile()  # 1,000 streams need ~2,000 fds per process; children inherit
    plan = scenarios.Plan.make(args.quick)
    mode = "quick" if args.quick else "full"
    out = args.out or Path(__file__).parent / "out" / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(SCENARIOS)
    if unknown:
        print(f"unknown scenario(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    steps = scenarios.STEPS_QUICK if args.quick else scenarios.STEPS_FULL
    if only:
        steps = [s for s in steps if s[0] == "start" or s[0] in only]
    progress = scenarios.Progress(steps, enabled=not args.no_progress)

    def log(text: str) -> None:
        print(f"\n  {text}", file=sys.stderr, flush=True)

    if args.profile:
        steps = [("start", 8)] + [(name, 10) for name, _ in scenarios.PROFILE_CASES]
        profiler = scenarios.Profiler(plan, scenarios.Progress(steps, enabled=not args.no_progress))
        profiler.log = log
        out = (
            args.out or Path(__file__).parent / "out" / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        profiler.results["out"] = str(out)
        if (problem := _usable_out(out)) is not None:
            print(problem, file=sys.stderr)
            return 2
        results = profiler.run()
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.json").write_text(json.dumps(results, indent=1, default=str))
        text = report.profile_text(results)
        (out / "profile.txt").write_text(text + "\n")
        print(text)
        print(f"\nwritten to {out}: profile.json, profile.txt, profile-*.txt (py-spy raw stacks)")
        return 0
    for item in args.compare:
        name, sep, command = item.partition("=")
        if not sep or not name or not command:
            print(f"--compare wants NAME=COMMAND, got {item!r}", file=sys.stderr)
            return 2
    if (problem := _usable_out(out)) is not None:
        print(problem, file=sys.stderr)
        return 2
    bench = scenarios.Bench(plan, progress, log=log)
    if nofile < 2500:
        bench.note(f"open-file limit is {nofile}: 3c may fail for lack of file descriptors")
    if only:
        bench.only = only
    for item in args.compare:
        name, _, command = item.partition("=")
        bench.compare[name] = command
    try:
        results = bench.run()
    except KeyboardInterrupt:  # every server is stopped by now (Bench.run's cleanup)
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 128 + signal.SIGINT
    if only:
        results["only"] = sorted(only)
    paths = report.write(results, out)
    print(report.text_table(results))
    print(f"\nwritten to {out}: " + ", ".join(p.name for p in paths))
    if results.get("compare_failed"):
        # a script comparing proxies must not read a run without one as a comparison
        names = ", ".join(results["compare_failed"])
        print(f"\ncompared proxies that did not start: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
