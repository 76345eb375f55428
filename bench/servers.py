"""Start and stop the benchmark's processes: nginx, the demo backend, the bare-ASGI app, proxies.

Every server is its own process on 127.0.0.1, started with the bench's interpreter (nginx
excepted) in a session of its own, and stopped with SIGTERM to that whole process group
(SIGKILL after 10 s): a proxy started through a wrapper (``sh -c``, ``env``) or one that
starts workers leaves nothing behind. A reader thread drains the merged stdout/stderr so a
chatty server can never block on a full pipe; ``Server.log()`` returns it.

``launch_*`` spawns a server and returns at once, ``Server.ready()`` waits until it answers:
servers launched together start side by side (a proxy's start is ~1 s of imports).
``start_*`` is both in one. Inside :func:`tracked`, every server is in the caller's list,
to be stopped, from the moment its process exists: a Ctrl-C or SIGTERM in between is held
back until it is (``bench.interrupts``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import interrupts
from .bare_asgi import FIXED_BODY

ROOT = Path(__file__).resolve().parent.parent
LISTEN_LINE = re.compile(r"listening on (http://[0-9.]+:\d+)")
NGINX_CONF = Path(__file__).with_name("nginx.conf")

_tracking: list[Server] | None = None  # where tracked() puts each server launched


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str  # base URL without a path ("http://127.0.0.1:PORT")
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None
    tmpdir: str | None = None
    note: str = ""
    # what ready() still has to wait for: set by launch_*, None once it answered
    pending: Callable[[], None] | None = None
    stopped: bool = False  # its group is not signalled again: the id may be another's by then

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1].rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The process and its descendants (hypercorn ``-w N`` runs workers as children)."""
        try:
            import psutil

            proc = psutil.Process(self.process.pid)
            return [proc.pid] + [c.pid for c in proc.children(recursive=True)]
        except Exception:
            return [self.process.pid]

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the leaves of the process tree, except
        multiprocessing's resource tracker (a helper, not a worker)."""
        try:
            import psutil

            proc = psutil.Process(self.process.pid)
            children = proc.children(recursive=True)
            leaves = [c.pid for c in children if not c.children() and not _is_helper(c)]
            return leaves or [proc.pid]
        except Exception:
            return [self.process.pid]

    def alive(self) -> bool:
        return self.process.poll() is None

    def ready(self) -> Server:
        """Wait until a launched server answers; it is stopped if it never does, or if
        the wait is interrupted. At once for a server that answered already."""
        wait, self.pending = self.pending, None
        if wait is not None:
            try:
                wait()
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after 10 s; once
        (a server whose start failed is stopped there, and again by the run's cleanup)."""
        if self.stopped:
            return
        group = self.process.pid  # its own session: the group is everything it started
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + 10
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(group, signal.SIGKILL)
        self.process.wait()
        if self.reader is not None:
            self.reader.join(timeout=5)
        # closing the pipe while the reader still reads it would wait for the reader's lock
        if self.process.stdout is not None and (self.reader is None or not self.reader.is_alive()):
            with contextlib.suppress(OSError):
                self.process.stdout.close()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        self.stopped = True  # at the end: an interrupted stop is done again by the cleanup

    def log(self) -> str:
        return "".join(self.output)


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _is_helper(proc: object) -> bool:
    try:
        return "resource_tracker" in " ".join(proc.cmdline())  # type: ignore[attr-defined]
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The bench's environment without anything that would configure a proxy by accident."""
    prefixes = ("OPENAI_", "PROXY_", "METRICS_", "SYSTEM_METRICS_", "UPSTREAM_", "WORKERS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("LOG_LEVEL", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _spawn(name: str, argv: list[str], env: dict[str, str], **options: Any) -> Server:
    """:func:`_launch` (``options`` are its own), ready: with ``wait_line``, its default,
    once it wrote the line that names its address."""
    return _launch(name, argv, env, **options).ready()


def _launch(
    name: str,
    argv: list[str],
    env: dict[str, str],
    *,
    wait_line: bool = True,
    url: str | None = None,
    timeout: float = 30.0,
    tmpdir: str | None = None,
    cwd: str | Path = ROOT,
) -> Server:
    """The server's process, started; with ``wait_line`` its ``ready()`` waits for the line
    that names its address (and takes the URL from it)."""
    output: list[str] = []
    found = threading.Event()
    box: list[str] = []
    with interrupts.deferred():
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,  # a process group of its own, stopped as a whole
        )
        reader = threading.Thread(
            target=_pump, args=(process, output, found, box), daemon=True, name=f"bench-{name}-log"
        )
        reader.start()
        server = Server(name, process, url or "", output, reader, tmpdir)
        if _tracking is not None:
            _tracking.append(server)

    def listening() -> None:
        if not (found.wait(timeout) and box):
            raise RuntimeError(f"{name} did not start: {argv}\n{''.join(output)[-3000:]}")
        if not server.url:
            server.url = box[0]

    if wait_line:
        server.pending = listening
    return server


def _pump(
    process: subprocess.Popen, output: list[str], found: threading.Event, box: list[str]
) -> None:
    """Drain the server's output; the first listening line's URL goes into ``box``."""
    assert process.stdout is not None
    for line in process.stdout:
        if len(output) < 5000:
            output.append(line)
        m = LISTEN_LINE.search(line)
        if m and not found.is_set() and "demo backend at" not in line:
            box.append(m.group(1))
            found.set()
    found.set()


@contextlib.contextmanager
def tracked(into: list[Server]) -> Iterator[list[Server]]:
    """Within, every server launched is appended to ``into`` as its process starts, no
    signal between: the caller's cleanup stops what it lists, even a server whose launch
    a Ctrl-C interrupted."""
    global _tracking
    before, _tracking = _tracking, into
    try:
        yield into
    finally:
        _tracking = before


@contextlib.contextmanager
def stopped_after() -> Iterator[list[Server]]:
    """Every server launched within is stopped on the way out, however the block ends (a
    SIGTERM too, after ``interrupts.install_sigterm``), a signal meanwhile held until the
    stops are done: the cleanup of the bench's development tools."""
    launched: list[Server] = []
    try:
        with tracked(launched):
            yield launched
    finally:
        with interrupts.deferred():
            for server in reversed(launched):
                server.stop()


def _then(server: Server, step: Callable[[], None]) -> Server:
    """``step`` added to what the launched ``server``'s ``ready()`` waits for."""
    before = server.pending

    def both() -> None:
        if before is not None:
            before()
        step()

    server.pending = both
    return server


def wait_http(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # it answers (404 on "/" is an answer)
                return
            last = exc
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer in {timeout} s: {last}")


def _await_http(server: Server, url: str, timeout: float) -> None:
    """``wait_http`` for a server just started; it is stopped if it never answers, or if
    the wait is interrupted (nobody else knows of it yet)."""
    try:
        wait_http(url, timeout, server.process)
    except BaseException:
        server.stop()
        raise


def nginx_path() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


def start_nginx() -> Server | None:
    """nginx with bench/nginx.conf answering the fixed chat completion; None if not installed."""
    binary = nginx_path()
    if binary is None:
        return None
    tmpdir = tempfile.mkdtemp(prefix="trioproxy-bench-nginx-")
    port = free_port()
    conf = (
        NGINX_CONF.read_text()
        .replace("@PREFIX@", tmpdir)
        .replace("@PORT@", str(port))
        .replace("@BODY@", FIXED_BODY.decode())
    )
    conf_path = Path(tmpdir, "nginx.conf")
    conf_path.write_text(conf)
    url = f"http://127.0.0.1:{port}"
    server = _spawn(
        "nginx",
        [binary, "-p", tmpdir, "-e", f"{tmpdir}/error.log", "-c", str(conf_path)],
        clean_env(),
        wait_line=False,
        url=url,
        tmpdir=tmpdir,
    )
    try:
        _await_http(server, url + "/v1/models", 15)
    except RuntimeError as exc:
        raise RuntimeError(f"nginx did not start: {exc}\n{server.log()[-2000:]}") from None
    server.note = _version([binary, "-v"])
    return server


def start_bare_asgi(*, with_trioproxy_patches: bool = False) -> Server:
    return launch_bare_asgi(with_trioproxy_patches=with_trioproxy_patches).ready()


def launch_bare_asgi(*, with_trioproxy_patches: bool = False) -> Server:
    argv = [sys.executable, "-m", "bench.bare_asgi"]
    if with_trioproxy_patches:
        argv.append("--with-trioproxy-patches")
    return _answering(_launch("bare-asgi", argv, clean_env()), "/v1/models", 15)


def start_demo(token_delay: float = 0.005) -> Server:
    return launch_demo(token_delay).ready()


def launch_demo(token_delay: float = 0.005) -> Server:
    argv = [sys.executable, "-m", "trioproxy.demo", "--host", "127.0.0.1", "--port", "0",
            "--token-delay", str(token_delay)]  # fmt: skip
    return _answering(_launch("demo", argv, clean_env()), "/v1/models", 15)


def _answering(server: Server, path: str, timeout: float) -> Server:
    """The launched ``server`` is ready once ``path`` answers (after its listening line,
    which names its URL)."""
    return _then(server, lambda: wait_http(server.url + path, timeout, server.process))


def start_proxy(upstream: str, *, workers: int = 1, name: str = "proxy", **env: str) -> Server:
    """``python -m trioproxy`` against *upstream* (a base URL ending in /v1), default settings
    except what *env* sets."""
    return launch_proxy(upstream, workers=workers, name=name, **env).ready()


def launch_proxy(upstream: str, *, workers: int = 1, name: str = "proxy", **env: str) -> Server:
    """:func:`start_proxy` without the wait: call ``ready()`` on it."""
    argv = [
        sys.executable,
        "-m",
        "trioproxy",
        "--host",
        "127.0.0.1",
        "--upstream",
        upstream,
        "--env-file",
        "",  # read no env file
    ]
    url = None
    if workers > 1:
        # the multi-worker line echoes the requested port, so choose a real one
        port = free_port()
        argv += ["--port", str(port), "--workers", str(workers)]
        url = f"http://127.0.0.1:{port}"
    else:
        argv += ["--port", "0"]
    server = _answering(_launch(name, argv, clean_env(**env), url=url), "/health", 30)
    if workers > 1:
        # every worker must be up before it is measured: wait for the process tree
        def every_worker() -> None:
            deadline = time.monotonic() + 20
            while len(server.worker_pids()) < workers and time.monotonic() < deadline:
                time.sleep(0.1)

        _then(server, every_worker)
    return server


def ready_all(launched: list[Server]) -> list[Server]:
    """Each launched server, ready (see :meth:`Server.ready`), in their order."""
    return [server.ready() for server in launched]


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception:
        return ""


def start_external(name: str, command: str, upstream: str) -> Server:
    """Another proxy to compare, started from a command line with ``{upstream}`` (the
    fixed backend's base URL, ending in /v1) and ``{port}`` filled in; it must serve
    ``POST /v1/chat/completions`` on 127.0.0.1:{port}."""
    return launch_external(name, command, upstream).ready()


def launch_external(name: str, command: str, upstream: str) -> Server:
    """:func:`start_external` without the wait: call ``ready()`` on it."""
    port = free_port()
    argv = [
        a.replace("{upstream}", upstream).replace("{port}", str(port)) for a in shlex.split(command)
    ]
    url = f"http://127.0.0.1:{port}"
    server = _launch(name, argv, clean_env(), wait_line=False, url=url)

    def answering() -> None:
        try:
            wait_http(url + "/", EXTERNAL_START_SECONDS, server.process)
        except RuntimeError as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n{server.log()[-2000:]}") from None

    server.pending = answering
    return server


# LiteLLM's proxy takes 10-30 s to import and start on a 2-core machine
EXTERNAL_START_SECONDS = 60.0


def start_relay_floor(upstream: str, *, raw: bool = False) -> Server:
    """``bench.relay_floor`` in front of *upstream* (a base URL without /v1)."""
    return launch_relay_floor(upstream, raw=raw).ready()


def launch_relay_floor(upstream: str, *, raw: bool = False) -> Server:
    argv = [sys.executable, "-m", "bench.relay_floor", "--upstream", upstream]
    if raw:
        argv.append("--raw")
    server = _launch("relay-floor-raw" if raw else "relay-floor", argv, clean_env())
    return _answering(server, "/", 15)
