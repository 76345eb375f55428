"""Relayed streams in process, for counting what one token's chunk costs.

The proxy is served by hypercorn in this process (trioproxy's patches applied, as
``trioproxy`` serves one worker) and a raw HTTP/1.1 client in the same trio run asks it for
``--streams`` streams of ``--tokens`` tokens, one after another over one keep-alive
connection; the demo backend runs in its own process (``--delay`` seconds between tokens,
so each token is a read of its own). Everything of the proxy's per chunk is in this
process: trio's scheduler, the backend read (``netstream``, h11's client side), the relay,
the ASGI send, hypercorn's send path and h11's server side, the socket write.

Run it twice under valgrind with different token counts and subtract: the difference over
the tokens added is the cost of a token's chunk, the rest (start-up, warm-up, a stream's
setup, and with ``--pad-to`` what the proxy does per second) cancels out::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=cg.3 \\
        python -m bench.chunk_instructions --tokens 3
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=cg.23 \\
        python -m bench.chunk_instructions --tokens 23
    callgrind_annotate --inclusive=yes cg.23 / cg.3

``--profile FILE`` writes a cProfile of the measured streams instead (no valgrind needed):
call counts per token are the difference of two runs' counts over the tokens added.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from functools import partial

import trio

from bench.servers import start_demo

ROUTES = {"v1": "/v1/chat/completions", "ollama": "/api/chat"}


def _request(path: str, tokens: int, first_delay: float) -> bytes:
    directives = f"[[tokens={tokens}]]" + (
        f" [[first_delay={first_delay:g}]]" if first_delay else ""
    )
    body = json.dumps(
        {
            "model": "demo-chat",
            "messages": [{"role": "user", "content": f"Say hello. {directives}"}],
            "stream": True,
        }
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _stream(sock: trio.SocketStream, request: bytes) -> int:
    """One stream, read to its last chunk (the chunked body's end); returns the reads."""
    await sock.send_all(request)
    tail = b""
    reads = 0
    while not tail.endswith(b"\r\n0\r\n\r\n"):
        data = await sock.receive_some(65536)
        if not data:
            raise RuntimeError("the proxy closed the connection mid-stream")
        if not reads and not data.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"not a stream: {data[:300]!r}")
        reads += 1
        tail = (tail + data)[-16:]
    return reads


def _system_calls() -> tuple[int, int]:
    """This process's read and write system calls so far (Linux): the proxy's reads of the
    backend and writes to the client are one a token unless the backend's writes coalesced."""
    with open("/proc/self/io") as io:
        counts = dict(line.split(": ") for line in io.read().splitlines())
    return int(counts["syscr"]), int(counts["syscw"])


async def _main(args: argparse.Namespace, upstream: str) -> None:
    from hypercorn.trio import serve

    from trioproxy.app import create_app
    from trioproxy.cli import hypercorn_config
    from trioproxy.config import Settings

    # no system sampler or readiness checks: periodic work that is no stream's
    settings = Settings(
        upstream_url=upstream,
        host="127.0.0.1",
        port=0,
        access_log=False,
        system_metrics_enabled=False,
        ready_check_interval=3600.0,
    )
    app = create_app(settings)
    config = hypercorn_config(settings)
    config.bind = ["127.0.0.1:0"]
    stop = trio.Event()
    # every run as long as one of --pad-to tokens: what the proxy does per second whatever
    # it relays (the metrics' publisher, timers) then cancels out of the difference
    pad = max(0, args.pad_to - args.tokens) * args.delay
    request = _request(ROUTES[args.route], args.tokens, pad)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        sock = await trio.open_tcp_stream(host, int(port))
        for _ in range(args.warmup):
            await _stream(sock, request)
        # as the proxy does after start-up (app.py): no full collection re-scans imports
        gc.collect()
        gc.freeze()
        profiler = None
        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        reads = 0
        calls = _system_calls()
        for _ in range(args.streams):
            reads += await _stream(sock, request)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        read_calls, write_calls = (
            after - before for after, before in zip(_system_calls(), calls, strict=True)
        )
        await sock.aclose()
        print(
            f"{args.route} {args.streams} streams of {args.tokens} tokens: the client's reads"
            f" {reads}, the process's read / write system calls {read_calls} / {write_calls}"
        )
        stop.set()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", choices=sorted(ROUTES), default="v1")
    parser.add_argument("--tokens", type=int, default=3)
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.01, help="seconds between tokens")
    parser.add_argument(
        "--pad-to", type=int, default=23, help="wait before the first token as if this many"
    )
    parser.add_argument("--profile", help="write a cProfile of the measured streams here")
    args = parser.parse_args(argv)
    demo = start_demo(token_delay=args.delay)
    try:
        trio.run(_main, args, demo.url + "/v1")
    finally:
        demo.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
