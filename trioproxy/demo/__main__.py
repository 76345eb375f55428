"""``python -m trioproxy.demo``: run the demo backend as its own process.

Prints exactly one line, ``demo backend listening on http://HOST:PORT/v1`` (flushed, with the real
port when ``--port 0``), so a parent process can read the address from stdout. SIGINT and SIGTERM
stop it cleanly.
"""

from __future__ import annotations

import argparse
import signal
from functools import partial

import trio

from . import serve_demo
from .script import DemoSettings


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = DemoSettings()  # reads DEMO_TOKEN_DELAY
    parser = argparse.ArgumentParser(
        prog="python -m trioproxy.demo",
        description="Deterministic OpenAI-compatible demo backend (see trioproxy.demo for hooks).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18080, help="0 picks a free port")
    parser.add_argument(
        "--token-delay",
        type=float,
        default=defaults.token_delay,
        help="seconds between streamed tokens (default: $DEMO_TOKEN_DELAY or 0.02)",
    )
    parser.add_argument(
        "--first-token-delay",
        type=float,
        default=defaults.first_token_delay,
        help="seconds before the first token of each reply",
    )
    parser.add_argument(
        "--default-tokens",
        type=int,
        default=defaults.default_tokens,
        help="reply length when the request does not limit it",
    )
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    settings = DemoSettings(
        token_delay=args.token_delay,
        first_token_delay=args.first_token_delay,
        default_tokens=args.default_tokens,
    )
    # Open the receiver before serving so a signal arriving during startup is not lost.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def stop() -> None:
            async for _ in signals:
                return

        async with trio.open_nursery() as nursery:
            serve = partial(serve_demo, args.host, args.port, settings, shutdown_trigger=stop)
            base_url = await nursery.start(serve)
            print(f"demo backend listening on {base_url}", flush=True)


def main(argv: list[str] | None = None) -> None:
    trio.run(_run, _parse_args(argv))


if __name__ == "__main__":
    main()
