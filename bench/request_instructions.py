"""Non-streaming requests in process, for counting what one request costs with metrics on
or off.

The proxy is served by hypercorn in this process (trioproxy's patches applied, as
``trioproxy`` serves one worker) and ``--concurrency`` raw HTTP/1.1 clients in the same
trio run, each on its own keep-alive connection, ask it for ``--requests`` chat completions
in all; the fixed-response backend (nginx, as in bench 3a and 3e; the demo backend where
nginx is not installed) runs in its own process. At concurrency 32, as in 3e, the
proxy's records are counted in batches as they are under that load.

Run it under valgrind with two request counts and subtract: the difference over the
requests added is the cost of one request, start-up and warm-up cancel out; then the same
with ``--metrics off``::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=cg.2k \\
        python -m bench.request_instructions --requests 2000
    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=cg.6k \\
        python -m bench.request_instructions --requests 6000
    callgrind_annotate --inclusive=yes cg.6k / cg.2k

``--profile FILE`` writes a cProfile of the measured requests instead (no valgrind needed).
"""

from __future__ import annotations

import argparse
from functools import partial

import trio

from bench.in_process import ROUTES, measured, raw_post, run_against, serving_proxy
from bench.servers import Server, start_demo, start_nginx


def _request(path: str) -> bytes:
    messages = [{"role": "user", "content": "Say hello."}]
    return raw_post(path, {"model": "demo-chat", "messages": messages, "stream": False})


async def _exchange(sock: trio.SocketStream, request: bytes) -> None:
    """One request and its whole response (a content-length body: no stream)."""
    await sock.send_all(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += await _received(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"not a 200: {data[:300]!r}")
    length = _content_length(head)
    while len(body) < length:
        body += await _received(sock)


async def _received(sock: trio.SocketStream) -> bytes:
    data = await sock.receive_some(65536)
    if not data:
        raise RuntimeError("the proxy closed the connection")
    return data


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise RuntimeError(f"no content-length: {head[:300]!r}")


async def _client(address: tuple[str, int], request: bytes, count: int) -> None:
    sock = await trio.open_tcp_stream(*address)
    async with sock:
        for _ in range(count):
            await _exchange(sock, request)


async def _load(address: tuple[str, int], request: bytes, total: int, clients: int) -> None:
    """*total* requests over *clients* connections, all in flight together."""
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            share = total // clients + (1 if index < total % clients else 0)
            if share:
                nursery.start_soon(_client, address, request, share)


async def _main(args: argparse.Namespace, upstream: str) -> None:
    request = _request(ROUTES[args.route])
    async with serving_proxy(upstream, metrics_enabled=args.metrics == "on") as address:
        await _load(address, request, args.warmup, args.concurrency)
        with measured(args.profile):
            await _load(address, request, args.requests, args.concurrency)
        print(
            f"{args.route} {args.requests} requests at concurrency {args.concurrency},"
            f" metrics {args.metrics}"
        )


def _backend() -> Server:
    return start_nginx() or start_demo()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", choices=sorted(ROUTES), default="v1")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--metrics", choices=("on", "off"), default="on")
    parser.add_argument("--profile", help="write a cProfile of the measured requests here")
    args = parser.parse_args(argv)
    run_against(_backend, partial(_main, args))


if __name__ == "__main__":
    main()
