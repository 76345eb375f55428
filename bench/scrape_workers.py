"""What a scrape costs with ``--workers N``: ``python -m bench.scrape_workers``.

With ``--workers N`` every scrape reads the workers' shared files (docs/metrics.md, "Several
workers"), where one process reads its own series. This compares, in one run and in
alternated rounds (the machine is shared: only figures of the same run compare), proxies
with 1 and N workers (``--workers 1,2,4``) against the fixed backend (the bare ASGI app,
200 for any model and path), each filled with the same label series first: ``--models``
model names (50: the default label budget) on every route, plain and streamed, answered
and refused (a 400 for a body the proxy rejects). ``--baseline DIR`` adds the same proxies
run from another checkout (``git clone -q REPO DIR && git -C DIR checkout COMMIT``), for
old code against new.

Per proxy and round: ``GET /v1/metrics/prometheus`` with Prometheus' headers (3g's probe,
every 50 ms on its own connection) while c=4 chat requests run (its p50/p99, and the
requests' p99: a scrape that holds a worker's event loop delays them), and the proxy's CPU
(all its processes, ``/proc``) per scrape for ``--idle-scrapes`` scrapes one after the
other with nothing else running. Prints one JSON object per proxy: the medians of the
rounds and every round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from typing import Any

from . import interrupts, servers
from .scenarios import NONSTREAM, OLLAMA, PROM, SCRAPER_HEADERS, V1, closed
from .servers import Server

# the routes the fill sends every model to; the fixed backend answers each with one chat
# completion, so some of them end in the proxy's 502 (a backend answer it cannot
# translate): more statuses, as a busy proxy has
ROUTES = (
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/responses",
)
CLOSE = {"Connection": "close"}  # a connection per request: the kernel spreads the workers


def _body(route: str, model: str, stream: bool) -> dict[str, Any]:
    text = "Say hello to the benchmark."
    if route in ("/api/embed", "/v1/embeddings"):
        return {"model": model, "input": text}
    if route in ("/api/generate", "/v1/completions"):
        return {"model": model, "prompt": text, "stream": stream}
    if route == "/v1/responses":
        return {"model": model, "input": text, "stream": stream}
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }
    if route == "/v1/messages":
        body["max_tokens"] = 16
    return body


def fill_requests(models: int) -> list[dict[str, Any]]:
    """Every model on every route, plain and streamed, and a refused one (a 400)."""
    out = []
    for i in range(models):
        model = f"bench-model-{i:03d}"
        for route in ROUTES:
            for stream in (False, True):
                body = json.dumps(_body(route, model, stream))
                out.append({"method": "POST", "path": route, "body": body, "headers": CLOSE})
            refused = json.dumps({"model": model, "messages": "not a list", "prompt": 1})
            out.append({"method": "POST", "path": route, "body": refused, "headers": CLOSE})
    return out


def start(upstream: str, workers: int, source: str | None) -> Server:
    """A proxy with ``workers`` workers, from ``source`` (another checkout) when given."""
    if source is None:
        return servers.start_proxy(upstream, workers=workers, name=f"proxy-{workers}w")
    argv = [sys.executable, "-m", "trioproxy", "--host", "127.0.0.1", "--upstream"]
    argv += [upstream, "--env-file", ""]
    port = servers.free_port()
    argv += ["--port", str(port)] + (["--workers", str(workers)] if workers > 1 else [])
    url = f"http://127.0.0.1:{port}"
    # run from the checkout: python -m and -c (hypercorn's master with --workers, whose
    # workers inherit its path) put the working directory first on sys.path
    env = servers.clean_env(PYTHONPATH=source)
    server = servers._spawn(f"base-{workers}w", argv, env, url=url, cwd=source)
    servers._await_http(server, url + "/health", 30)
    deadline = time.monotonic() + 20
    while len(server.worker_pids()) < workers and time.monotonic() < deadline:
        time.sleep(0.1)
    return server


def fill(server: Server, models: int, repeats: int) -> dict[str, Any]:
    reqs = fill_requests(models)
    r = closed(server, reqs, 8, duration=0, warmup=0.0, count=len(reqs) * repeats)
    with urllib.request.urlopen(server.url + PROM, timeout=60) as resp:
        body = resp.read()
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {"fill_requests": r["completed"] + r["errors"], "samples": samples, "bytes": len(body)}


def idle_cpu_per_scrape(server: Server, scrapes: int) -> float:
    """The proxy's CPU (ms, every process) per scrape, one scrape after the other."""
    from .loadgen import cpu_seconds

    pids = server.pids()
    request = urllib.request.Request(server.url + PROM, headers=SCRAPER_HEADERS)
    before = sum(cpu_seconds(p) for p in pids)
    for _ in range(scrapes):
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()
    return (sum(cpu_seconds(p) for p in pids) - before) * 1000.0 / scrapes


def measure(server: Server, cell: float, idle_scrapes: int) -> dict[str, Any]:
    probe = {"method": "GET", "path": PROM, "interval": 0.05, "headers": SCRAPER_HEADERS}
    loaded = closed(
        server, [NONSTREAM[V1], NONSTREAM[OLLAMA]], 4, duration=cell, warmup=0.5, probe=probe
    )
    scrape = loaded.get("probe_ms") or {}
    return {
        "scrape_p50": scrape.get("p50"),
        "scrape_p99": scrape.get("p99"),
        "scrapes": scrape.get("n"),
        "requests_p99": loaded["latency_ms"].get("p99"),
        "rps": loaded["rps"],
        "probe_errors": loaded.get("probe_errors"),
        "idle_cpu_ms_per_scrape": idle_cpu_per_scrape(server, idle_scrapes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="of the fill's requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cell", type=float, default=4.0, help="seconds under load per round")
    parser.add_argument("--idle-scrapes", type=int, default=10)
    parser.add_argument("--baseline", help="another checkout, run beside this one")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    sources: list[tuple[str, str | None]] = [("new", None)]
    if args.baseline:
        sources.insert(0, ("old", args.baseline))
    interrupts.install_sigterm()
    proxies: dict[str, Server] = {}
    with servers.stopped_after():  # a SIGTERM (timeout, a CI cancel) stops them too
        backend = servers.start_bare_asgi()
        for tag, source in sources:
            for n in counts:
                proxies[f"{tag}-{n}w"] = start(backend.url + "/v1", n, source)
        filled = {name: fill(s, args.models, args.repeats) for name, s in proxies.items()}
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in proxies}
        for i in range(args.rounds):
            order = list(proxies)
            if i % 2:
                order.reverse()
            for name in order:
                rounds[name].append(measure(proxies[name], args.cell, args.idle_scrapes))
    for name, rows in rounds.items():
        keys = [k for k in rows[0] if isinstance(rows[0][k], int | float)]
        medians = {k: statistics.median(r[k] for r in rows if r[k] is not None) for k in keys}
        print(json.dumps({"proxy": name, **filled[name], **medians, "rounds": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
