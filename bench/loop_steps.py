"""What holds the proxy's event loop under non-streamed load: ``python -m bench.loop_steps``.

The proxy (default settings, in this process, on its own trio loop) relays non-streamed
``/v1/chat/completions`` and ``/api/chat`` to nginx with the bench's fixed answer (3a),
loaded by the bench's generator in a process of its own at ``--conc`` (16: 3a's c=16). A
trio instrument times every task step twice: by the wall clock and by the loop thread's
own CPU time (``time.thread_time``), so a step that the kernel preempted (a long wall
time, a short CPU time) is told from one that held the loop. Per route and round it
prints the generator's latencies, the step and batch histograms (a batch: the steps run
between two polls for I/O), the longest steps by CPU time with their task and where each
one suspended, the garbage collections during the window, and the CPU of every task that
is no request's (the metrics publisher, the system sampler, the idle sweeps...).

The instrument costs two clock reads per step (~1-2 % of a request's CPU), so latencies
are a little above 3a's; compare ratios, not milliseconds.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from functools import partial
from typing import Any

import trio

from bench import interrupts, servers
from bench.scenarios import NONSTREAM, OLLAMA, V1, loadgen
from trioproxy.app import create_app
from trioproxy.cli import hypercorn_config
from trioproxy.config import load_settings

BOUNDS_MS = (0.25, 0.5, 1, 2, 3, 5, 8, 12, 20, 50, float("inf"))
LONG_MS = 1.0  # steps of more loop CPU than this are listed one by one
LISTED = 12


def _bucket(hist: list[int], ms: float) -> None:
    for i, bound in enumerate(BOUNDS_MS):
        if ms <= bound:
            hist[i] += 1
            return


def _labels() -> list[str]:
    lows = (0, *BOUNDS_MS[:-1])
    return [
        f"≤{b:g}" if lo == 0 else f">{lo:g}" if b == float("inf") else f"{lo:g}-{b:g}"
        for lo, b in zip(lows, BOUNDS_MS, strict=True)
    ]


class StepClock(trio.abc.Instrument):
    """Histograms of task steps (wall and loop CPU) and of batches, since ``reset``."""

    def __init__(self) -> None:
        self._wall = self._cpu = 0.0  # the step's start: not reset, a step may be running
        self.reset()

    def reset(self) -> None:
        n = len(BOUNDS_MS)
        self.wall, self.cpu, self.batches = [0] * n, [0] * n, [0] * n
        self.long: list[tuple[float, float, str, str]] = []
        self.others: dict[str, list[float]] = {}  # task name -> [steps, CPU ms, longest]
        self.gc_before = [g["collections"] for g in gc.get_stats()]
        self._batch_start: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        if self._batch_start is None:
            self._batch_start = self._wall

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        cpu = (time.thread_time() - self._cpu) * 1000
        _bucket(self.wall, (time.perf_counter() - self._wall) * 1000)
        _bucket(self.cpu, cpu)
        name = task.name
        if not name.endswith("._handle"):  # hypercorn's task of each request
            seen = self.others.setdefault(name, [0, 0.0, 0.0])
            seen[0] += 1
            seen[1] += cpu
            seen[2] = max(seen[2], cpu)
        if cpu > LONG_MS:
            frames = [
                f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_code.co_name}:{line}"
                for f, line in task.iter_await_frames()
                if "/trio/" not in f.f_code.co_filename
            ]
            self.long.append(
                (
                    cpu,
                    (time.perf_counter() - self._wall) * 1000,
                    name,
                    " < ".join(reversed(frames[-3:])),
                )
            )

    def before_io_wait(self, timeout: float) -> None:
        if self._batch_start is not None:
            _bucket(self.batches, (time.perf_counter() - self._batch_start) * 1000)
            self._batch_start = None

    def report(self) -> None:
        labels = _labels()
        for title, hist in (
            ("steps, wall", self.wall),
            ("steps, loop CPU", self.cpu),
            ("batches, wall", self.batches),
        ):
            shown = ", ".join(f"{lab} {n}" for lab, n in zip(labels, hist, strict=True) if n)
            print(f"    {title} (ms): {shown}")
        collections = [
            g["collections"] - b for g, b in zip(gc.get_stats(), self.gc_before, strict=True)
        ]
        print(f"    gc collections by generation: {collections}")
        for cpu, wall, name, where in sorted(self.long, reverse=True)[:LISTED]:
            print(f"    step {cpu:.2f} ms CPU ({wall:.2f} wall) {name} suspended at {where}")
        for name, (steps, total, longest) in sorted(self.others.items(), key=lambda kv: -kv[1][1]):
            print(f"    {name}: {steps:.0f} steps, {total:.2f} ms CPU, longest {longest:.2f} ms")


async def _measure(clock: StepClock, upstream: str, conc: int, seconds: float, rounds: int) -> None:
    from hypercorn.trio import serve

    settings = load_settings(
        environ={}, dotenv_path=None, upstream_url=upstream, host="127.0.0.1", port=0
    )
    app = create_app(settings)
    config = hypercorn_config(settings)
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        binds = await nursery.start(
            partial(serve, app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        )
        port = int(binds[0].rsplit(":", 1)[1])
        for turn in range(rounds):
            for path in (V1, OLLAMA):
                spec: dict[str, Any] = {
                    "host": "127.0.0.1",
                    "port": port,
                    "mode": "closed",
                    "requests": [NONSTREAM[path]],
                    "conc": conc,
                    "duration": 1.0,
                    "warmup": 0.3,
                }
                await trio.to_thread.run_sync(loadgen, spec)  # its connections warm
                clock.reset()
                spec |= {"duration": seconds, "warmup": 0.0}
                got = await trio.to_thread.run_sync(loadgen, spec)
                lat = got["latency_ms"]
                print(
                    f"{path} c={conc} round {turn + 1}: {got['rps']:.0f} req/s, p50 "
                    f"{lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, p99/p50 "
                    f"{lat['p99'] / lat['p50']:.2f}"
                )
                clock.report()
        stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conc", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="per route and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    interrupts.install_sigterm()
    with servers.stopped_after():
        nginx = servers.start_nginx()
        if nginx is None:
            sys.exit("nginx is not installed")
        clock = StepClock()
        interrupts.run_trio(
            _measure,
            clock,
            nginx.url + "/v1",
            args.conc,
            args.seconds,
            args.rounds,
            instruments=[clock],
        )


if __name__ == "__main__":
    main()
