"""``trioproxy`` / ``python -m trioproxy``: parse flags, then serve.

One worker is served in this process. ``--workers N`` runs hypercorn's multi-process
server as a child, with prometheus_client's multiprocess mode pointed at a fresh
directory so every scrape reports the totals of all workers. ``--demo`` starts the
built-in backend in this process tree, in its own nursery, before the proxy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from . import __version__
from .config import ENV_FILE_VARIABLE, WORKER_VARIABLE, ConfigError, Settings, load_settings
from .logs import configure_logging

LISTEN_BACKLOG = 100  # hypercorn's default; it calls listen() again with its own


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioproxy",
        description="Ollama- and OpenAI-compatible proxy for any OpenAI-compatible backend.",
    )
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; env PROXY_HOST)")
    parser.add_argument("--port", type=int, help="port to bind (default 11434; env PROXY_PORT)")
    parser.add_argument("--workers", type=int, help="worker processes (default 1; env WORKERS)")
    parser.add_argument("--upstream", help="backend base URL (env OPENAI_API_BASE_URL)")
    parser.add_argument(
        "--demo", action="store_true", help="serve the built-in simulated backend (no API key)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (env LOG_LEVEL)")
    parser.add_argument("--env-file", default=".env", help="dotenv file to read (default .env)")
    parser.add_argument("--version", action="version", version=f"trioproxy {__version__}")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "upstream_url": args.upstream,
        "log_level": args.log_level.upper() if args.log_level else None,
        "demo": True if args.demo else None,
    }
    settings = load_settings(dotenv_path=args.env_file, **overrides)
    if not settings.demo:
        settings.require_upstream()
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"trioproxy: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, settings.secrets)
    try:
        _run(settings)
    except KeyboardInterrupt:
        pass
    except (WorkersFailed, ListenFailed) as exc:
        print(f"trioproxy: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(settings: Settings) -> None:
    try:
        trio.run(serve, settings)
    except* (WorkersFailed, ListenFailed) as group:
        raise group.exceptions[0] from None
    except* KeyboardInterrupt:
        raise KeyboardInterrupt from None  # Ctrl-C before the signal watcher took over


async def serve(settings: Settings) -> None:
    async with trio.open_nursery() as nursery:
        if settings.demo:
            from .demo import DemoSettings, serve_demo

            demo_url = await nursery.start(
                partial(
                    serve_demo,
                    "127.0.0.1",
                    0,
                    DemoSettings(token_delay=settings.demo_token_delay),
                )
            )
            settings = settings.with_overrides(upstream_url=demo_url)
            print(f"trioproxy: demo backend at {demo_url}", file=sys.stderr, flush=True)
        if settings.workers == 1:
            await serve_in_process(settings)
        else:
            await serve_workers(settings)
        nursery.cancel_scope.cancel()


async def watch_signals(
    drain: Callable[[], None],
    stop_now: Callable[[], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGTERM or SIGINT: ``drain`` (requests in flight get ``GRACEFUL_TIMEOUT``); a second
    one: ``stop_now``. Runs until cancelled, so a second Ctrl-C is never a traceback."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        draining = False
        async for _ in signals:
            if draining:
                print("trioproxy: stopping now (second signal)", file=sys.stderr, flush=True)
                stop_now()
                return
            draining = True
            drain()


async def serve_in_process(settings: Settings) -> None:
    from hypercorn.trio import serve as hypercorn_serve

    from .app import create_app

    listener = listen(settings.host, settings.port)
    app = create_app(settings)
    config = hypercorn_config(settings)
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns the socket from here
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        await nursery.start(watch_signals, stop.set, nursery.cancel_scope.cancel)
        async with trio.open_nursery() as server:
            binds = await server.start(
                partial(hypercorn_serve, app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
            )
            # the real address, so ``--port 0`` is usable by tests and supervisors
            print(
                f"trioproxy {__version__} listening on {binds[0]}",
                file=sys.stderr,
                flush=True,
            )
        nursery.cancel_scope.cancel()  # served: stop watching for signals
    # hypercorn has returned: after_serving ran and the pool is closed


def hypercorn_config(settings: Settings) -> object:
    from hypercorn.config import Config

    config = Config()
    config.bind = [_bind(settings.host, settings.port)]
    config.keep_alive_timeout = settings.keep_alive_timeout
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = None
    config.read_timeout = None  # a read timeout would cut long streams (stack notes 3d)
    if settings.tls_certfile:
        config.certfile = settings.tls_certfile
        config.keyfile = settings.tls_keyfile
        config.alpn_protocols = list(ALPN_PROTOCOLS)
    return config


# HTTP/1.1 only, also over TLS: hypercorn's HTTP/2 is not what the proxy's streaming,
# disconnect and shutdown handling (and hypercorn_patches) are built and tested on
ALPN_PROTOCOLS = ("http/1.1",)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound here rather than by hypercorn: a port in use is
    one clear line instead of a traceback, and with ``--port 0`` the real port is known
    before any worker starts."""
    # the address family follows the host's spelling, as hypercorn's own binding does
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ListenFailed(f"cannot listen on {_bind(host, port)}: {reason}") from None
    sock.listen(LISTEN_BACKLOG)  # connections queue from now on, before any worker runs
    sock.set_inheritable(True)
    return sock


class ListenFailed(Exception):
    pass


async def serve_workers(settings: Settings) -> None:
    """Run ``hypercorn -w N`` as a child on a socket bound here; SIGTERM/SIGINT to us stops
    it cleanly."""
    listener = listen(settings.host, settings.port)
    host, port = listener.getsockname()[:2]
    scheme = "https" if settings.tls_certfile else "http"
    run_dir = Path(tempfile.mkdtemp(prefix="trioproxy-"))
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    env = dict(os.environ)
    env.update(_child_env(settings))
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    command = [
        sys.executable, "-m", "hypercorn",
        "--worker-class", "trio",
        "--workers", str(settings.workers),
        "--bind", f"fd://{listener.fileno()}",
        # hypercorn's flags take whole seconds; its config file keeps 2.5 as 2.5
        "--config", str(_timeouts_file(run_dir / "hypercorn.toml", settings)),
        "--log-level", settings.log_level,
        "trioproxy.app:create_app()",
    ]  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    env=env,
                    check=False,
                    pass_fds=(listener.fileno(),),
                    # its own process group: a signal to ours (systemd, a terminal) must not
                    # reach the workers directly, or they stop without draining
                    start_new_session=True,
                )
            )
            listener.close()  # the child has its own copy
            print(
                f"trioproxy {__version__} listening on {scheme}://{_bind(host, port)} "
                f"with {settings.workers} workers",
                file=sys.stderr,
                flush=True,
            )

            killed = False

            def stop_now() -> None:
                nonlocal killed
                killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)

            await nursery.start(
                watch_signals, partial(process.send_signal, signal.SIGTERM), stop_now
            )
            returncode = await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    if returncode not in (0, -signal.SIGTERM) and not killed:
        raise WorkersFailed(returncode)


def _timeouts_file(path: Path, settings: Settings) -> Path:
    """hypercorn's TOML config for the workers: the timeouts, and TLS if configured."""
    lines = [
        f"keep_alive_timeout = {settings.keep_alive_timeout!r}",
        f"graceful_timeout = {settings.graceful_timeout!r}",
    ]
    if settings.tls_certfile:
        # a JSON string is a TOML basic string
        lines += [
            f"certfile = {json.dumps(settings.tls_certfile)}",
            f"keyfile = {json.dumps(settings.tls_keyfile)}",
            f"alpn_protocols = {json.dumps(list(ALPN_PROTOCOLS))}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


class WorkersFailed(Exception):
    def __init__(self, returncode: int) -> None:
        super().__init__(f"the worker server exited with status {returncode}")
        self.returncode = returncode


def _child_env(settings: Settings) -> dict[str, str]:
    """What the workers' ``create_app()`` must see besides our environment: the settings
    given as flags, and the same dotenv file (none when the file does not exist)."""
    env_file = settings.env_file
    env = {
        "OPENAI_API_BASE_URL": settings.upstream_url or "",
        "LOG_LEVEL": settings.log_level,
        "WORKERS": "1",
        WORKER_VARIABLE: "1",
        ENV_FILE_VARIABLE: str(Path(env_file).resolve()) if env_file else "",
    }
    if settings.api_key:
        env["OPENAI_API_KEY"] = settings.api_key
    return env


if __name__ == "__main__":
    raise SystemExit(main())
