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
from functools import partial

import trio

from bench.in_process import ROUTES, measured, raw_post, run_against, serving_proxy
from bench.servers import start_demo


def _request(path: str, tokens: int, first_delay: float) -> bytes:
    directives = f"[[tokens={tokens}]]" + (
        f" [[first_delay={first_delay:g}]]" if first_delay else ""
    )
    return raw_post(
        path,
        {
            "model": "demo-chat",
            "messages": [{"role": "user", "content": f"Say hello. {directives}"}],
            "stream": True,
        },
    )


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
    # every run as long as one of --pad-to tokens: what the proxy does per second whatever
    # it relays (the metrics' publisher, timers) then cancels out of the difference
    pad = max(0, args.pad_to - args.tokens) * args.delay
    request = _request(ROUTES[args.route], args.tokens, pad)
    async with serving_proxy(upstream) as address:
        sock = await trio.open_tcp_stream(*address)
        for _ in range(args.warmup):
            await _stream(sock, request)
        reads = 0
        with measured(args.profile):
            calls = _system_calls()
            for _ in range(args.streams):
                reads += await _stream(sock, request)
            read_calls, write_calls = (
                after - before for after, before in zip(_system_calls(), calls, strict=True)
            )
        await sock.aclose()
        print(
            f"{args.route} {args.streams} streams of {args.tokens} tokens: the client's reads"
            f" {reads}, the process's read / write system calls {read_calls} / {write_calls}"
        )


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
    run_against(partial(start_demo, token_delay=args.delay), partial(_main, args))


if __name__ == "__main__":
    main()
