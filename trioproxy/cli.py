"""``trioproxy`` / ``python -m trioproxy``: parse flags, then serve.

One worker is served in this process. ``--workers N`` runs hypercorn's multi-process
server as a child, with prometheus_client's multiprocess mode pointed at a fresh
directory so every scrape reports the totals of all workers; the child stops when this
process is gone, and this process exits non-zero when the child stops unasked.
``--demo`` starts the built-in backend in this process tree, in its own nursery, before
the proxy.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import __version__
from ._entry import STOP_SIGNALS, stop_holding, take_held
from .config import (
    DEFAULT_ENV_FILE,
    ENV_FILE_VARIABLE,
    STOP_NOW_FILE_VARIABLE,
    STOP_NOW_SECONDS,
    STOP_NOW_SIGNAL,
    WORKER_VARIABLE,
    ConfigError,
    Settings,
    load_settings,
    parse_setting,
    read_environment,
)
from .logs import HYPERCORN_LOGGER, configure_logging, hypercorn_log_config, notice
from .respawn import RespawnBudget, respawn_killed_workers
from .rundir import new_run_dir
from .upstream import check_client_environment

if TYPE_CHECKING:
    from hypercorn.config import Config

LISTEN_BACKLOG = 100  # hypercorn's default; it calls listen() again with its own


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioproxy",
        description="Ollama- and OpenAI-compatible proxy for any OpenAI-compatible backend.",
    )
    # values stay strings here: config parses and checks them as their environment variables
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; env PROXY_HOST)")
    parser.add_argument("--port", help="port to bind (default 11434; env PROXY_PORT)")
    parser.add_argument("--workers", help="worker processes (default 1; env WORKERS)")
    parser.add_argument(
        "--root-path", help="serve every route below this path, e.g. /llm (env ROOT_PATH)"
    )
    parser.add_argument("--upstream", help="backend base URL (env OPENAI_API_BASE_URL)")
    parser.add_argument(
        "--demo", action="store_true", help="serve the built-in simulated backend (no API key)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR, CRITICAL (env LOG_LEVEL)")
    parser.add_argument(
        "--env-file",
        help="dotenv file to read; it must exist ('' for none; default .env if present)",
    )
    parser.add_argument("--version", action="version", version=f"trioproxy {__version__}")
    return parser


# flag -> the environment variable it stands for
FLAGS = {
    "host": "PROXY_HOST",
    "port": "PROXY_PORT",
    "workers": "WORKERS",
    "root_path": "ROOT_PATH",
    "upstream": "OPENAI_API_BASE_URL",
    "log_level": "LOG_LEVEL",
}


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {"demo": True if args.demo else None}
    for dest, name in FLAGS.items():
        raw = getattr(args, dest)
        if raw is not None:
            attr, value = parse_setting(name, raw, "--" + dest.replace("_", "-"))
            overrides[attr] = value
    path, required = _env_file(args)
    settings = load_settings(dotenv_path=path, env_file_required=required, **overrides)
    if not settings.demo:
        settings.require_upstream()
    check_client_environment(settings)
    return settings


def _env_file(args: argparse.Namespace) -> tuple[str | None, bool]:
    """The dotenv file to read and whether it must exist: a file named on the command
    line must; the default ``.env`` is read if present; ``--env-file ''`` reads none."""
    if args.env_file is None:
        return DEFAULT_ENV_FILE, False
    return (args.env_file, True) if args.env_file else (None, False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        notice(f"trioproxy: error: {exc}", "ERROR", fmt=_log_format_hint(args))
        return 2
    configure_logging(
        settings.log_level,
        settings.log_format,
        settings.secrets,
        settings.log_repeat_window_seconds,
    )
    try:
        _run(settings)
    except KeyboardInterrupt:
        pass
    except (WorkersFailed, ListenFailed) as exc:
        notice(f"trioproxy: error: {exc}", "ERROR")
        return 1
    return 0


def _log_format_hint(args: argparse.Namespace) -> str:
    """LOG_FORMAT as far as it can be read when the settings are invalid: the line saying
    so is JSON too where JSON was asked for."""
    try:
        raw = read_environment(None, *_env_file(args)).get("LOG_FORMAT", "")
    except ConfigError:  # the env file is what failed
        raw = os.environ.get("LOG_FORMAT", "")
    return "json" if raw.strip().lower() == "json" else "text"


def _run(settings: Settings) -> None:
    stopped_cleanly = False
    try:
        trio.run(serve, settings)
        stopped_cleanly = True
    except* (WorkersFailed, ListenFailed) as group:
        raise group.exceptions[0] from None
    except* KeyboardInterrupt:
        stopped_cleanly = True
        raise KeyboardInterrupt from None  # Ctrl-C before the signal watcher took over
    finally:
        # held until the run is over (its clean-up included); from here a stop signal
        # ends a clean stop at once (exit 0). After a failure it stays held: the process
        # is about to exit 1 with the line saying why, which an exit 0 would lose
        if stopped_cleanly:
            stop_holding()


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
            notice(f"trioproxy: demo backend at {demo_url}")
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
    """SIGTERM, SIGINT or SIGHUP: ``drain`` (requests in flight get ``GRACEFUL_TIMEOUT``);
    a second one: ``stop_now``; later ones are noted only: stopping now takes less than a
    second, and a signal's default in that time would end this process before it cleaned
    up (the workers of ``--workers`` left to their lifeline, the run directory behind).
    Runs until cancelled, so a second Ctrl-C is never a traceback. SIGHUP (a closed
    terminal or SSH session; a reload, to some supervisors) killed the process by default,
    streams and all: there is no reload, so it drains. Signals held while the program
    started (``_entry``) count as the first ones."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        seen = 0
        for _ in take_held():
            seen += 1
            _act_on(seen, drain, stop_now)
        async for _ in signals:
            seen += 1
            _act_on(seen, drain, stop_now)


def _act_on(seen: int, drain: Callable[[], None], stop_now: Callable[[], None]) -> None:
    """Act on the ``seen``-th stop signal."""
    if seen == 1:
        drain()
    elif seen == 2:
        notice("trioproxy: stopping now (second signal)", "WARNING")
        stop_now()
    else:
        notice("trioproxy: already stopping now", "WARNING")


async def serve_in_process(settings: Settings) -> None:
    from hypercorn.trio import serve as hypercorn_serve

    from .app import answer_all_and_stop, create_app

    listener = listen(settings.host, settings.port)
    _keep_metrics_in_process()
    app = create_app(settings)
    # as with --workers: the second-signal word of a master (there is none here), so an
    # operator's SIGUSR1 (logrotate's, say) must not end the proxy by its default
    signal.signal(STOP_NOW_SIGNAL, signal.SIG_IGN)
    config = hypercorn_config(settings)
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns the socket from here
    async with trio.open_nursery() as nursery:
        stop = trio.Event()

        def stop_now() -> None:
            # hypercorn, cancelled, answers a request still waiting with an empty 500: it
            # gets its 503 in its dialect first (a stream its in-band end), written within
            # a moment, and whatever is still running then is cut
            answer_all_and_stop(app)
            nursery.cancel_scope.deadline = trio.current_time() + STOP_NOW_SECONDS

        await nursery.start(watch_signals, stop.set, stop_now)
        async with trio.open_nursery() as server:
            binds = await server.start(
                partial(hypercorn_serve, app, config, shutdown_trigger=stop.wait)
            )
            # the real address, so ``--port 0`` is usable by tests and supervisors (not
            # when a signal held at start-up already stops it)
            if not stop.is_set():
                # below the mount point: the base URL a client is to be given
                notice(f"trioproxy {__version__} listening on {binds[0]}{settings.root_path}")
        nursery.cancel_scope.cancel()  # served: stop watching for signals
    # hypercorn has returned: after_serving ran and the pool is closed


def _keep_metrics_in_process() -> None:
    """One process keeps its metrics in memory: an inherited ``PROMETHEUS_MULTIPROC_DIR``
    (LiteLLM's docs have its users set one for its workers) would make it write its
    series there and report the sum of every file there, so another proxy using the same
    directory would report its requests too (counted twice in a fleet's sum), and a
    restart would carry on from the last run's counts. ``--workers N`` sets its own."""
    from .metrics.multiprocess import MULTIPROC_ENV

    inherited = os.environ.pop(MULTIPROC_ENV, None)
    if inherited:
        logging.getLogger("trioproxy.metrics").warning(
            "metrics: %s=%s is ignored: one process keeps its metrics in memory (the "
            "files there would mix in the counts of every other process using them); "
            "trioproxy --workers N shares them between its workers itself",
            MULTIPROC_ENV,
            inherited,
        )


def hypercorn_config(settings: Settings) -> Config:
    from hypercorn.config import Config

    config = Config()
    config.bind = [_bind(settings.host, settings.port)]
    config.keep_alive_timeout = settings.keep_alive_timeout
    # a Responses API WebSocket message (a response.create) is a request body: past the
    # limit hypercorn closes the connection with 1009 (message too big)
    config.websocket_max_message_size = settings.max_request_bytes
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = None
    config.root_path = settings.root_path
    # hypercorn's lines through our handler (configure_logging set it up), in LOG_FORMAT
    config.errorlog = logging.getLogger(HYPERCORN_LOGGER)
    config.read_timeout = None  # a read timeout would cut long streams (stack notes 3d)
    if settings.tls_certfile:
        config.ssl_handshake_timeout = tls_handshake_timeout(settings)
        config.certfile = settings.tls_certfile
        config.keyfile = settings.tls_keyfile
        config.alpn_protocols = list(ALPN_PROTOCOLS)
    return config


def tls_handshake_timeout(settings: Settings) -> float:
    """A connection that has not finished its TLS handshake is an idle one: hypercorn
    held it 60 s, so a few hundred sockets that never start one held as many connections
    that long (KEEP_ALIVE_TIMEOUT, between 3 s, for distant clients, and 10 s)."""
    return max(3.0, min(settings.keep_alive_timeout, 10.0))


# HTTP/1.1 only, also over TLS: hypercorn's HTTP/2 is not what the proxy's streaming,
# disconnect and shutdown handling (and hypercorn_patches) are built and tested on
ALPN_PROTOCOLS = ("http/1.1",)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound here rather than by hypercorn: a port in use is
    one clear line instead of a traceback, and with ``--port 0`` the real port is known
    before any worker starts."""
    sock: socket.socket | None = None
    try:
        family, address = _bind_target(host, port)
        # IPv6 may be off (a container without it): that too is one line, not a traceback
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and _every_address(host):
            # "::" is every address, IPv4 too (as Ollama, a Go server, takes it), not
            # only IPv6's where the system's default is v6-only (net.ipv6.bindv6only=1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        if sock is not None:
            sock.close()
        reason = exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror):
            reason = f"cannot resolve the host name ({reason})"
        raise ListenFailed(f"cannot listen on {_bind(host, port)}: {reason}") from None
    sock.listen(LISTEN_BACKLOG)  # connections queue from now on, before any worker runs
    sock.set_inheritable(True)
    return sock


def _bind_target(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The family and socket address ``host`` is bound at. An address as written (the
    family follows its spelling, as hypercorn's own binding does); a host name's first
    IPv4 address, or its first IPv6 one when it has none, as Go's ``net.Listen``
    (Ollama's) binds one address of a name: bound as IPv4, a name with IPv6 addresses
    only (``ip6-localhost``, a host in an IPv6-only network) could not be bound at all.
    A name that does not resolve raises ``socket.gaierror`` (an ``OSError``)."""
    if _is_address(host):
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for family in (socket.AF_INET, socket.AF_INET6):
        for each_family, _, _, _, address in found:
            if each_family == family:
                return family, address
    raise OSError(errno.EAFNOSUPPORT, "the host name has no IPv4 or IPv6 address")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _every_address(host: str) -> bool:
    try:
        return ipaddress.IPv6Address(host).is_unspecified
    except ValueError:
        return False


class ListenFailed(Exception):
    pass


async def serve_workers(settings: Settings) -> None:
    """Run ``hypercorn -w N`` as a child on a socket bound here. A stop signal to us
    (``STOP_SIGNALS``) stops it cleanly; it stops when this process is gone, however it
    went (``hypercorn_child``); and when it stops without being asked, this process exits
    non-zero (``ServerStopped``) so that a supervisor restarts it."""
    listener = listen(settings.host, settings.port)
    host, port = listener.getsockname()[:2]
    scheme = "https" if settings.tls_certfile else "http"
    run_dir = new_run_dir()
    metrics_dir = run_dir / "metrics"
    metrics_dir.mkdir()
    env = dict(os.environ)
    env.update(_child_env(settings))
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    stop_now_file = run_dir / "stop-now"
    env[STOP_NOW_FILE_VARIABLE] = str(stop_now_file)
    # the child reads EOF on its end once ours is closed: when this process exits, even
    # by SIGKILL (we never write to it)
    lifeline, our_end = os.pipe()
    command = [
        sys.executable, "-c", HYPERCORN_CHILD,
        str(lifeline), repr(settings.graceful_timeout + CHILD_STOP_MARGIN),
        "--worker-class", "trio",
        "--workers", str(settings.workers),
        "--bind", f"fd://{listener.fileno()}",
        # hypercorn's flags take whole seconds; its config file keeps 2.5 as 2.5
        "--config", str(_timeouts_file(run_dir / "hypercorn.toml", settings)),
        "--log-config", f"json:{_log_config_file(run_dir / 'logging.json', settings)}",
        "--log-level", settings.log_level,
        "trioproxy.app:create_app()",
    ]  # fmt: skip
    asked = killed = False  # whether we signalled it to stop; to stop at once
    process: trio.Process | None = None

    def drain() -> None:
        nonlocal asked
        asked = True
        if process is not None:
            process.send_signal(signal.SIGTERM)

    def stop_now() -> None:
        nonlocal asked, killed
        asked = killed = True
        if process is not None:
            # the workers answer what waits with its 503 (a stream its in-band end) first
            stop_now_file.touch()
            _kill_group(process.pid, STOP_NOW_SIGNAL)
            nursery.start_soon(_kill_group_after, process.pid, STOP_NOW_SECONDS + 0.25)

    # its default would end this process, leaving the workers to stop by the lifeline and
    # the run directory behind; to the workers it is the master's word (STOP_NOW_SIGNAL)
    signal.signal(STOP_NOW_SIGNAL, signal.SIG_IGN)
    try:
        async with trio.open_nursery() as nursery:
            # signals are ours before the child exists: one arriving as it starts (or as
            # the line below is read) must drain it, not end this process by default
            await nursery.start(watch_signals, drain, stop_now)
            process = await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    env=env,
                    check=False,
                    pass_fds=(listener.fileno(), lifeline),
                    # its own process group: a signal to ours (systemd, a terminal) must not
                    # reach the workers directly, or they stop without draining
                    start_new_session=True,
                )
            )
            listener.close()  # the child has its own copy
            if asked:  # before it could serve, or set its own handlers: nothing to drain
                killed = True
                _kill_group(process.pid)
            else:
                notice(
                    f"trioproxy {__version__} listening on "
                    f"{scheme}://{_bind(host, port)}{settings.root_path} "
                    f"with {settings.workers} workers"
                )
            returncode = await process.wait()
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        os.close(lifeline)
        os.close(our_end)  # if the child still runs (we are being cancelled), it stops
        shutil.rmtree(run_dir, ignore_errors=True)
    failed = returncode not in (0, -signal.SIGTERM) and not killed
    # a worker left without its master would keep the port (the master may have been
    # stopped before it set its handlers): after a drain there is nothing left to kill
    _kill_group(process.pid)
    if not asked:
        raise ServerStopped(returncode)
    if failed:
        raise WorkersFailed(returncode)


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    # the child leads its own process group (start_new_session), its workers in it
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def _kill_group_after(pgid: int, seconds: float) -> None:
    await trio.sleep(seconds)
    _kill_group(pgid)


HYPERCORN_CHILD = "from trioproxy.cli import hypercorn_child; hypercorn_child()"
CHILD_STOP_MARGIN = 5.0
"""Seconds past GRACEFUL_TIMEOUT that a child whose parent is gone gets to stop."""


def hypercorn_child() -> None:
    """The child of ``--workers N``: ``hypercorn ARGS`` after two arguments of ours, the
    lifeline's file descriptor and how long stopping may take.

    hypercorn's master does not notice when trioproxy is gone; its workers would keep the
    port, answering /health while requests fail (the demo backend went with trioproxy),
    and block a restart. A thread waits for EOF on the lifeline, which comes when
    trioproxy has exited in any way. (PR_SET_PDEATHSIG would not do: trio starts the
    child from a worker thread, whose exit after 10 s idle counts as the parent's death.)"""
    lifeline, deadline = int(sys.argv[1]), float(sys.argv[2])
    # hypercorn's master and the workers it spawns (which inherit this) until the app in
    # each has its handler: the signal must not end them
    signal.signal(STOP_NOW_SIGNAL, signal.SIG_IGN)
    watcher = threading.Thread(target=_stop_with_parent, args=(lifeline, deadline), daemon=True)
    watcher.start()
    respawns = RespawnBudget()
    respawn_killed_workers(respawns)
    _close_listeners_when_stopping(respawns)
    from hypercorn.__main__ import main as hypercorn_main

    sys.exit(hypercorn_main(sys.argv[3:]))


def _close_listeners_when_stopping(respawns: RespawnBudget) -> None:
    """hypercorn's master keeps its copies of the listening sockets until its workers have
    exited (it would need them to start a worker again), so while they drained, new
    connections queued in the backlog and hung instead of being refused (a load balancer
    or client then tries another instance). The handler it installs for SIGTERM and SIGINT
    (the start of its stop, also when trioproxy is gone) now closes them first; each worker
    closes its own copy when it stops accepting. From then on, no killed worker is started
    again (``respawns``)."""
    import hypercorn.run as hypercorn_run
    from hypercorn.config import Config, Sockets

    listeners: list[socket.socket] = []
    create_sockets = Config.create_sockets

    def create_and_keep(self: Config) -> Sockets:
        sockets = create_sockets(self)
        listeners.extend(sockets.secure_sockets + sockets.insecure_sockets)
        return sockets

    Config.create_sockets = create_and_keep  # type: ignore[method-assign]
    # a patch of the module hypercorn.run imported (its signal.signal calls come here)
    hypercorn_run.signal = _ListenersClosedOnStop(listeners, respawns)  # type: ignore[attr-defined, assignment]


class _ListenersClosedOnStop:
    """The ``signal`` module as hypercorn.run sees it, but for the handler it installs for
    SIGTERM and SIGINT, which closes ``listeners`` before it runs."""

    def __init__(self, listeners: list[socket.socket], respawns: RespawnBudget) -> None:
        self._listeners = listeners
        self._respawns = respawns

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    def signal(self, signum: int, handler: Any) -> Any:
        if signum in (signal.SIGTERM, signal.SIGINT) and callable(handler):
            handler = partial(_close_then, self._listeners, self._respawns, handler)
        return signal.signal(signum, handler)


def _close_then(
    listeners: list[socket.socket],
    respawns: RespawnBudget,
    handler: Callable[..., object],
    *args: Any,
) -> None:
    respawns.stopping = True
    for listener in listeners:
        listener.close()
    handler(*args)


def _stop_with_parent(lifeline: int, deadline: float) -> None:
    with contextlib.suppress(OSError):
        os.read(lifeline, 1)  # returns at EOF: trioproxy is gone
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        # hypercorn's handler is in place: its workers drain, as on our own SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(deadline)
    # not serving yet (SIGTERM would end the master alone, leaving the workers it may
    # just have started), or still here after the deadline: the whole group at once
    os.killpg(0, signal.SIGKILL)


def _log_config_file(path: Path, settings: Settings) -> Path:
    """hypercorn's logging config for the workers: its lines in our format."""
    path.write_text(json.dumps(hypercorn_log_config(settings.log_level)))
    return path


def _timeouts_file(path: Path, settings: Settings) -> Path:
    """hypercorn's TOML config for the workers: the timeouts, the mount point, and TLS if
    configured."""
    lines = [
        f"keep_alive_timeout = {settings.keep_alive_timeout!r}",
        f"graceful_timeout = {settings.graceful_timeout!r}",
        f"root_path = {json.dumps(settings.root_path)}",
    ]
    if settings.tls_certfile:
        # a JSON string is a TOML basic string
        lines += [
            f"ssl_handshake_timeout = {tls_handshake_timeout(settings)!r}",
            f"certfile = {json.dumps(settings.tls_certfile)}",
            f"keyfile = {json.dumps(settings.tls_keyfile)}",
            f"alpn_protocols = {json.dumps(list(ALPN_PROTOCOLS))}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


class WorkersFailed(Exception):
    def __init__(self, returncode: int, message: str | None = None) -> None:
        super().__init__(message or f"the worker server exited with status {returncode}")
        self.returncode = returncode


class ServerStopped(WorkersFailed):
    """The worker server stopped although nobody asked it to: a worker died, say. hypercorn
    then stops the others and may exit 0 (the status of the last worker it joined); this
    process must fail anyway, or ``Restart=on-failure`` never restarts it."""

    def __init__(self, returncode: int) -> None:
        super().__init__(
            returncode,
            f"the worker server stopped without being asked (exit status {returncode}; "
            "a worker died?); exiting with status 1 so that a supervisor restarts trioproxy",
        )


def _child_env(settings: Settings) -> dict[str, str]:
    """What the workers' ``create_app()`` must see besides our environment: the settings
    given as flags, and what the dotenv file set, as read here (a pipe or a /dev/fd path,
    a decrypted secret, cannot be read a second time), under our environment as here."""
    env = {
        name: value for name, value in settings.env_file_values.items() if name not in os.environ
    }
    env.update({
        "OPENAI_API_BASE_URL": settings.upstream_url or "",
        "LOG_LEVEL": settings.log_level,
        "WORKERS": "1",
        WORKER_VARIABLE: "1",
        ENV_FILE_VARIABLE: "",  # read none: its settings are in the environment above
    })  # fmt: skip
    if settings.api_key:
        env["OPENAI_API_KEY"] = settings.api_key
    return env


if __name__ == "__main__":
    raise SystemExit(main())
