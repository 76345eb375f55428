"""The process tree of ``--workers N``, as a supervisor sees it: real processes on 127.0.0.1.

trioproxy runs hypercorn's multi-process server as a child (its master, and the master's
workers). Whatever happens to one side, the other must not carry on as if nothing did: a
killed worker is replaced, and workers killed faster than that make trioproxy fail (so
systemd's ``Restart=on-failure`` restarts it), a trioproxy that is killed takes the worker
server down (so the port is free for the restart); and ``LOG_FORMAT=json`` holds for every
line any of them writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trioproxy.metrics.archive import ARCHIVED_KINDS
from trioproxy.respawn import RESPAWN_LIMIT

from .conftest import ServerProcess, wait_healthy
from .test_cli_config import _start_demo_proxy, _stream_in_thread, chat


def _running_on(server: ServerProcess) -> int:
    """How many hypercorn servers said they serve the proxy's address (hypercorn logs
    "Running on URL" once a worker accepts connections)."""
    return sum(f"Running on {server.url} " in line for line in server.output)


def _wait_for_workers(server: ServerProcess, workers: int) -> list[psutil.Process]:
    """The worker processes, once all of them serve (needs LOG_LEVEL=INFO). With one
    worker, the process serving is trioproxy's own."""
    deadline = time.monotonic() + 30
    while _running_on(server) < workers:
        assert time.monotonic() < deadline, server.log()
        assert server.process.poll() is None, server.log()
        time.sleep(0.05)
    tree = psutil.Process(server.process.pid).children(recursive=True)
    found = [p for p in tree if "spawn_main" in " ".join(p.cmdline())]
    assert len(found) == (workers if workers > 1 else 0), [p.cmdline() for p in tree]
    return found or [psutil.Process(server.process.pid)]


def _gone(process: psutil.Process) -> bool:
    try:
        # a zombie is gone for our purposes: whoever adopted it has yet to reap it
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _kill(processes: list[psutil.Process]) -> None:
    """What a failed test left running. Before ``server.stop()``: an orphaned worker holds
    the output pipe open, and closing it under the reading thread would block."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def test_a_killed_worker_is_started_again_while_the_others_serve_on() -> None:
    """hypercorn stopped every worker when one was killed (the OOM killer's SIGKILL),
    dropping the other workers' streams: now a new worker takes its place, and the
    server goes on (and stops cleanly when asked)."""
    server = _start_demo_proxy(2, LOG_LEVEL="INFO")
    port = int(server.url.rsplit(":", 1)[1])
    descendants: list[psutil.Process] = []
    try:
        workers = _wait_for_workers(server, 2)
        descendants = psutil.Process(server.process.pid).children(recursive=True)
        # there from the start, at 0: increase() over the window of the first kill sees it
        assert _worker_restarts(server.url) == {"SIGKILL": 0.0}
        thread, lines = _stream_in_thread(server.url, tokens=30, delay=0.05)
        deadline = time.monotonic() + 10
        while not (serving := [w for w in workers if _serves_a_client(w, port)]):
            assert time.monotonic() < deadline, "no worker took the stream"
            time.sleep(0.02)
        victim = next(w for w in workers if w is not serving[0])
        victim.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _running_on(server) < 3:  # the new worker serves
            assert time.monotonic() < deadline, server.log()
            assert server.process.poll() is None, server.log()
            time.sleep(0.05)
        tree = psutil.Process(server.process.pid).children(recursive=True)
        workers = [p for p in tree if _is_worker(p)]
        assert len(workers) == 2 and victim.pid not in {p.pid for p in workers}
        descendants += tree
        for _ in range(6):  # a new connection each: both workers answer some
            assert chat(server.url).status_code == 200
        # counted by the master: both workers, the new one too, report it
        answered: set[int] = set()
        deadline = time.monotonic() + 20
        while len(answered) < 2:
            assert time.monotonic() < deadline, f"only worker {answered} answered"
            pid, restarts = _worker_restarts_from(server.url, workers)
            assert restarts == {"SIGKILL": 1.0}, pid
            answered.add(pid)
        thread.join(timeout=15)  # the other worker's stream went on to its end
        assert lines and json.loads(lines[-1])["done"] is True, lines[-3:]
        log = server.log()
        assert f"worker {victim.pid} was killed by SIGKILL; starting another" in log
        assert "Traceback" not in log
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) == 0, server.log()
    finally:
        _kill(descendants)
        server.stop()


def _chats_counted(url: str) -> float:
    """http_requests_total of /api/chat, as one scrape (a new connection) says."""
    reply = httpx.get(f"{url}/metrics", timeout=10)
    assert reply.status_code == 200, reply.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(reply.text)
        if family.name == "http_requests"
        for sample in family.samples
        if sample.name == "http_requests_total" and sample.labels["endpoint"] == "api_chat"
    )


def test_killed_workers_files_are_folded_in_and_their_counts_kept() -> None:
    """Workers killed again and again (each replaced): their counter and histogram files
    were kept beside the live workers' for the proxy's life, and every scrape merged
    more of them. Now a scrape folds them into one archive per type: the directory holds
    the live processes' files and the archives, and the totals never move."""
    server = _start_demo_proxy(2, LOG_LEVEL="INFO")
    descendants: list[psutil.Process] = []
    try:
        workers = _wait_for_workers(server, 2)
        descendants = psutil.Process(server.process.pid).children(recursive=True)
        directory = Path(workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
        sent, killed = 0, []
        for kills in range(1, 4):
            for _ in range(4):
                assert chat(server.url).status_code == 200
                sent += 1
            deadline = time.monotonic() + 10
            while _chats_counted(server.url) != sent:  # counted by whichever worker
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.05)
            killed.append(workers[0].pid)
            workers[0].send_signal(signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _running_on(server) < 2 + kills:  # the new worker serves
                assert time.monotonic() < deadline, server.log()
                assert server.process.poll() is None, server.log()
                time.sleep(0.05)
            tree = psutil.Process(server.process.pid).children(recursive=True)
            descendants += tree
            workers = [p for p in tree if _is_worker(p)]
            for _ in range(4):  # scrapes on new connections: each worker answers some
                assert _chats_counted(server.url) == sent
        names = {p.name for p in directory.glob("*.db")}
        assert not {n for n in names if n.rpartition("_")[2][:-3] in map(str, killed)}, names
        # each live worker's counter, histogram and two live gauge files, the master's
        # counter, and the archives
        assert len(names) <= 2 * 4 + 1 + len(ARCHIVED_KINDS), sorted(names)
        assert {"counter_archive.db", "histogram_archive.db"} <= names
        assert "Traceback" not in server.log()
    finally:
        _kill(descendants)
        server.stop()


def _worker_restarts(url: str) -> dict[str, float]:
    """trioproxy_worker_restarts_total by signal, as one scrape (a new connection) says."""
    reply = httpx.get(f"{url}/metrics", timeout=10)
    assert reply.status_code == 200, reply.text
    return _restarts_in(reply.text)


def _worker_restarts_from(url: str, workers: list[psutil.Process]) -> tuple[int, dict[str, float]]:
    """:func:`_worker_restarts` and the pid of the worker that answered: the one holding
    the scrape's connection, kept open until it is found."""
    with httpx.Client(timeout=10) as client:
        reply = client.get(f"{url}/metrics")
        assert reply.status_code == 200, reply.text
        _, port = reply.extensions["network_stream"].get_extra_info("client_addr")
        holders = [
            w.pid
            for w in workers
            if any(c.raddr and c.raddr.port == port for c in w.net_connections("tcp"))
        ]
    assert len(holders) == 1, holders
    return holders[0], _restarts_in(reply.text)


def _restarts_in(exposition: str) -> dict[str, float]:
    return {
        sample.labels["signal"]: sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "trioproxy_worker_restarts"
        for sample in family.samples
    }


def _is_worker(process: psutil.Process) -> bool:
    try:
        return "spawn_main" in " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie not yet reaped
        return False


def _serves_a_client(worker: psutil.Process, port: int) -> bool:
    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
        for c in worker.net_connections("tcp")
    )


def test_workers_killed_faster_than_they_can_be_replaced_make_trioproxy_exit_with_a_failure() -> (
    None
):
    """Past the respawn budget (a worker killed as soon as it starts), hypercorn stops the
    server as before; trioproxy did not ask it to, so it says so and exits 1 for its
    supervisor to restart it."""
    server = _start_demo_proxy(2, LOG_LEVEL="INFO")
    descendants: list[psutil.Process] = []
    try:
        _wait_for_workers(server, 2)
        killed: set[int] = set()
        deadline = time.monotonic() + 30
        while server.process.poll() is None:
            assert time.monotonic() < deadline, server.log()
            tree = psutil.Process(server.process.pid).children(recursive=True)
            descendants += [p for p in tree if p not in descendants]
            for worker in (p for p in tree if _is_worker(p)):
                if worker.pid not in killed:
                    killed.add(worker.pid)
                    worker.send_signal(signal.SIGKILL)
            time.sleep(0.02)
        code = server.process.wait(timeout=15)
        server.reader.join(timeout=5)  # type: ignore[union-attr]
        log = server.log()
        assert code == 1, log
        assert log.count("was killed by SIGKILL; starting another") == RESPAWN_LIMIT
        assert f"more than {RESPAWN_LIMIT} killed workers within" in log
        last = log.strip().splitlines()[-1]
        assert last.startswith("trioproxy: error: the worker server stopped without being asked")
        assert "Traceback" not in log
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in descendants):  # nothing of it is left behind
            assert time.monotonic() < deadline, [p for p in descendants if not _gone(p)]
            time.sleep(0.05)
    finally:
        _kill(descendants)
        server.stop()


def test_killing_trioproxy_takes_its_worker_server_down() -> None:
    """SIGKILL leaves trioproxy no chance to stop its child: the child notices by itself.
    Else its workers keep the port, answering /health while every request fails (the demo
    backend died with trioproxy), and a restart cannot bind."""
    server = _start_demo_proxy(2, LOG_LEVEL="INFO", GRACEFUL_TIMEOUT="1")
    port = int(server.url.rsplit(":", 1)[1])
    descendants: list[psutil.Process] = []
    try:
        _wait_for_workers(server, 2)
        descendants = psutil.Process(server.process.pid).children(recursive=True)
        assert len(descendants) >= 3  # hypercorn's master and two workers
        server.process.kill()
        server.process.wait(timeout=5)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in descendants):
            assert time.monotonic() < deadline, [p.cmdline() for p in descendants if not _gone(p)]
            time.sleep(0.05)
        assert _port_is_free(port)
    finally:
        _kill(descendants)
        server.stop()


def test_the_worker_server_outlives_the_thread_that_started_it() -> None:
    """trio starts the child from a worker thread that exits after 10 s idle: whatever ties
    the child to trioproxy must not mistake that for trioproxy's death (PR_SET_PDEATHSIG
    would, and take the server down after 10 s)."""
    server = _start_demo_proxy(2)
    try:
        wait_healthy(server.url, timeout=30)
        time.sleep(11)
        assert server.process.poll() is None
        assert chat(server.url).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_log_format_json_means_every_line_is_json(workers: int) -> None:
    """hypercorn's own lines ("Running on ...", in every worker) and trioproxy's notices
    ("listening on", "demo backend at") included."""
    server = _start_demo_proxy(workers, LOG_FORMAT="json", LOG_LEVEL="INFO", ACCESS_LOG="true")
    try:
        _wait_for_workers(server, workers)
        assert chat(server.url).status_code == 200
        assert httpx.get(server.url + "/no/such/path", timeout=5).status_code == 404
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
        server.reader.join(timeout=5)  # type: ignore[union-attr]
    finally:
        server.stop()
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{server.log()}")
    messages = {(e["logger"], e["message"]) for e in entries}
    assert ("hypercorn.error", f"Running on {server.url} (CTRL + C to quit)") in messages
    assert any(re.fullmatch(r"demo backend at http://\S+/v1", m) for _, m in messages)
    listening = f"listening on {server.url}"
    assert any(logger == "trioproxy" and listening in m for logger, m in messages)
    assert any(e["logger"] == "trioproxy.access" for e in entries)


def test_workers_get_the_settings_of_an_env_file_that_can_be_read_once(tmp_path: Path) -> None:
    """A decrypted secret handed over as a pipe (``--env-file <(sops -d …)``) is read once,
    by trioproxy: its workers must get what it set, not read nothing and run open."""
    from .conftest import _spawn, base_env

    fifo = tmp_path / "secrets.env"
    os.mkfifo(fifo)
    writer = threading.Thread(
        target=lambda: fifo.write_text("PROXY_API_KEYS=tp-piped-key-0123456789\n"), daemon=True
    )
    writer.start()
    args = ["-m", "trioproxy", "--demo", "--host", "127.0.0.1", "--port", "0",
            "--workers", "2", "--env-file", str(fifo)]  # fmt: skip
    server = _spawn(args, base_env(DEMO_TOKEN_DELAY="0.01", LOG_LEVEL="INFO"), timeout=30)
    try:
        _wait_for_workers(server, 2)
        for _ in range(6):  # new connections: both workers answer some
            assert chat(server.url).status_code == 401
        keyed = {"Authorization": "Bearer tp-piped-key-0123456789"}
        body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(server.url + "/api/chat", json={**body, "stream": False},
                            headers=keyed, timeout=10)  # fmt: skip
        assert answer.status_code == 200
    finally:
        server.stop()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except TimeoutError:
        return False  # queued in a backlog nobody accepts from
    return False


def _busy_connections(port: int, workers: list[psutil.Process]) -> list[socket.socket]:
    """Connections each holding a request whose body is still coming, until every worker
    holds one: all of them drain (hypercorn's master closed its sockets as soon as an idle
    worker had exited)."""
    busy: list[socket.socket] = []
    while not all(
        any(c.laddr.port == port and c.status == "ESTABLISHED" for c in w.net_connections())
        for w in workers
    ):
        assert len(busy) < 50, "the connections all went to one worker"
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        busy.append(sock)
        sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.05)
    return busy


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_new_connections_are_refused_while_the_workers_drain(how: str) -> None:
    """hypercorn's master kept its copy of the listening socket until its workers exited:
    while they drained requests in flight, new connections were accepted by the kernel and
    hung in the backlog instead of being refused, so that a load balancer or client would
    try elsewhere. Also when trioproxy itself is killed."""
    server = _start_demo_proxy(2, LOG_LEVEL="INFO", GRACEFUL_TIMEOUT="20")
    port = int(server.url.rsplit(":", 1)[1])
    descendants: list[psutil.Process] = []
    busy: list[socket.socket] = []
    try:
        workers = _wait_for_workers(server, 2)
        descendants = psutil.Process(server.process.pid).children(recursive=True)
        busy = _busy_connections(port, workers)
        server.process.send_signal(getattr(signal, how))
        deadline = time.monotonic() + 3
        while not _refused(port):
            assert time.monotonic() < deadline, "new connections still accepted"
            time.sleep(0.05)
        assert not any(_gone(w) for w in workers)  # refused during the drain
    finally:
        for sock in busy:
            sock.close()
        _kill(descendants)
        server.stop()


def test_a_stop_signal_as_the_workers_start_is_a_clean_stop() -> None:
    """trioproxy printed its "listening" line before it watched for signals: a SIGTERM
    sent on reading that line (a supervisor stopping a service it just started) ended it
    by the signal's default (exit -15) instead of a drain and exit 0."""
    for _ in range(3):
        server = _start_demo_proxy(2)
        try:
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=30) == 0, server.log()
        finally:
            server.stop()


# loaded by the started interpreter (PYTHONPATH): it marks when the program's imports are
# under way and draws them out, so the signal lands in the middle of them
_SLOW_IMPORTS = """
import importlib.abc, os, sys, time


class _Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "trioproxy.cli":
            open(os.environ["IMPORTS_UNDER_WAY"], "w").close()
            time.sleep(0.5)
        return None


sys.meta_path.insert(0, _Slow())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("command", ["module", "script"])
def test_a_stop_signal_while_the_program_starts_is_a_clean_stop(
    signum: int, command: str, tmp_path: Path
) -> None:
    """Importing the program takes a few tenths of a second: a SIGTERM then ended it by
    the signal's default (exit -15), a SIGINT as a KeyboardInterrupt traceback."""
    import subprocess
    import sys

    from .conftest import ROOT, base_env

    (tmp_path / "sitecustomize.py").write_text(_SLOW_IMPORTS)
    mark = tmp_path / "imports-under-way"
    start = (
        [sys.executable, "-m", "trioproxy"]
        if command == "module"
        else [str(Path(sys.executable).parent / "trioproxy")]
    )
    process = subprocess.Popen(
        [*start, "--demo", "--host", "127.0.0.1", "--port", "0", "--env-file", ""],
        cwd=ROOT,
        env=base_env(PYTHONPATH=str(tmp_path), IMPORTS_UNDER_WAY=str(mark)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not mark.exists():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.002)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "Traceback" not in output, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_sigusr1_from_anyone_but_the_master_leaves_the_workers_serving() -> None:
    """The master of --workers tells its workers with SIGUSR1 that a second stop signal
    came; the same signal from an operator (logrotate sends USR1) turned a worker into one
    that answered every request with a 503 while /health said 200, and ended the master."""
    from .conftest import _spawn, base_env

    args = ["-m", "trioproxy", "--demo", "--host", "127.0.0.1", "--port", "0",
            "--workers", "2", "--env-file", ""]  # fmt: skip
    server = _spawn(args, base_env(DEMO_TOKEN_DELAY="0.01", LOG_LEVEL="INFO"), timeout=30)
    try:
        workers = _wait_for_workers(server, 2)
        for process in [psutil.Process(server.process.pid), *workers]:
            process.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        assert server.process.poll() is None, server.log()
        for _ in range(8):  # new connections: both workers answer some
            assert chat(server.url).status_code == 200
        assert server.log().count("SIGUSR1 ignored") == 2
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_a_sigusr1_leaves_a_single_process_serving() -> None:
    """As with --workers, where the master ignores it: by its default it ended the proxy."""
    from .conftest import _spawn, base_env

    args = ["-m", "trioproxy", "--demo", "--host", "127.0.0.1", "--port", "0", "--env-file", ""]
    server = _spawn(args, base_env(), timeout=30)
    try:
        server.process.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        assert server.process.poll() is None, server.log()
        assert chat(server.url).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_held_stop_signals_end_the_process_once_the_run_is_over() -> None:
    """Once the signal watcher is done, a later stop signal is not silently dropped (a
    third Ctrl-C during the stop was): where it would have ended the process it ends it
    at once with exit 0, the clean-up being over (by its default, a script repeating its
    kill got 143 or a KeyboardInterrupt traceback, depending on when its last signal
    came); a handler of the embedding program's own is given back."""
    from trioproxy import _entry

    def own(signum: int, frame: object) -> None:
        pass

    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, own)
        for stop_signal in before:
            _entry._before[stop_signal] = signal.signal(stop_signal, _entry._hold)
        _entry.stop_holding()
        assert signal.getsignal(signal.SIGHUP) is _entry._exit_now
        assert signal.getsignal(signal.SIGINT) is _entry._exit_now
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        for stop_signal, handler in before.items():
            signal.signal(stop_signal, handler)


def test_a_stop_signal_after_the_run_exits_zero() -> None:
    """The process as it is once the run is over, its last stop signal arriving then."""
    code = (
        "import os, signal, sys, time\n"
        "from trioproxy import _entry\n"
        "for s in _entry.STOP_SIGNALS:\n"
        "    _entry._before[s] = signal.signal(s, _entry._hold)\n"
        "_entry.stop_holding()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True)
    assert done.returncode == 0, done.stderr


def test_a_stop_signal_as_the_interpreter_finishes_keeps_the_exit_status() -> None:
    """Past the exit handlers, Python sets each signal with a Python handler back to its
    default while it finishes (module teardown, here slowed down): a stop signal then
    ended the process by that default (-15; under load the third signal of a stop
    sometimes came that late) instead of its exit status."""
    code = (
        "import os, signal, sys, time\n"
        "from trioproxy import _entry\n"
        "_entry.hold_stop_signals()\n"
        "_entry.stop_holding()\n"
        "class Slow:\n"
        "    def __del__(self, write=os.write, sleep=time.sleep):\n"
        "        write(1, b'finishing\\n')\n"
        "        sleep(3)\n"
        "slow = Slow()\n"
        "sys.exit(3)\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"finishing\n"
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=30) == 3
        finally:
            child.kill()


def test_a_stop_signal_as_a_failed_run_ends_does_not_hide_the_failure() -> None:
    """A run that failed (its port taken) exits 1 with the line saying why, also when a
    stop signal arrives as that line is written: ending such a process at once with exit
    0, as after a clean stop, told a supervisor it had stopped cleanly, and lost the line."""
    code = (
        "import os, signal, socket, sys\n"
        "busy = socket.socket()\n"
        "busy.bind(('127.0.0.1', 0))\n"
        "busy.listen()\n"
        "port = str(busy.getsockname()[1])\n"
        "sys.argv = ['trioproxy', '--env-file', '', '--upstream', 'http://127.0.0.1:9/v1',\n"
        "            '--port', port]\n"
        "from trioproxy import _entry, cli\n"
        "told = cli.notice\n"
        "def notice(message, *args, **kwargs):\n"
        "    if 'error' in message:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)  # a supervisor's stop, just then\n"
        "    return told(message, *args, **kwargs)\n"
        "cli.notice = notice\n"
        "sys.exit(_entry.main())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True)
    assert done.returncode == 1, done.stderr
    assert b"cannot listen on 127.0.0.1:" in done.stderr, done.stderr


def test_a_killed_masters_run_directory_is_removed_by_the_next(tmp_path: Path) -> None:
    """An operator review: SIGKILL of a ``--workers`` master left its run directory in
    /tmp, which under Kubernetes (an emptyDir outliving container restarts) a crash-looping
    pod fills. The next master removes it; a live master's directory stays."""
    first = _start_demo_proxy(2, LOG_LEVEL="INFO", GRACEFUL_TIMEOUT="1", TMPDIR=str(tmp_path))
    descendants: list[psutil.Process] = []
    try:
        _wait_for_workers(first, 2)
        descendants = psutil.Process(first.process.pid).children(recursive=True)
        (left,) = tmp_path.glob("trioproxy-*")
        first.process.kill()
        first.process.wait(timeout=5)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in descendants):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert left.is_dir()  # nothing could remove it
    finally:
        _kill(descendants)
        first.stop()
    second = _start_demo_proxy(2, LOG_LEVEL="INFO", TMPDIR=str(tmp_path))
    third = None
    try:
        _wait_for_workers(second, 2)
        assert not left.exists()
        (live,) = tmp_path.glob("trioproxy-*")
        third = _start_demo_proxy(2, LOG_LEVEL="INFO", TMPDIR=str(tmp_path))
        _wait_for_workers(third, 2)
        assert live.is_dir() and len(list(tmp_path.glob("trioproxy-*"))) == 2
    finally:
        for server in (second, third):
            if server is not None:
                server.stop()
    assert list(tmp_path.glob("trioproxy-*")) == []  # each stopped master removed its own


def test_stale_run_directories_are_only_those_whose_lock_is_free(tmp_path: Path) -> None:
    import fcntl

    from trioproxy.rundir import LOCK_FILE, remove_stale

    free, held, lockless = (tmp_path / f"trioproxy-{n}" for n in ("a", "b", "c"))
    for directory in (free, held, lockless):
        directory.mkdir()
    other = tmp_path / "unrelated"
    other.mkdir()
    (free / LOCK_FILE).touch()
    (other / LOCK_FILE).touch()
    (held / LOCK_FILE).touch()
    with open(held / LOCK_FILE) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert remove_stale(tmp_path) == 1
    assert not free.exists() and held.is_dir() and lockless.is_dir() and other.is_dir()


def test_a_live_masters_run_directory_is_kept_by_systemd_tmpfiles(tmp_path: Path) -> None:
    """systemd-tmpfiles removes what in /tmp nobody read, wrote or changed for 10 days
    (Fedora's, RHEL's, Arch's tmp.conf). It skips a directory a process holds a BSD lock
    on, with all below it, but not a locked file in it: it took a live master's lock file
    (whose directory no master would then remove after a crash) and the metrics files of
    a proxy nobody scraped for that long (their counts gone from the next scrape)."""
    tmpfiles = shutil.which("systemd-tmpfiles")
    if tmpfiles is None:
        pytest.skip("systemd-tmpfiles not installed")
    server = _start_demo_proxy(2, LOG_LEVEL="INFO", TMPDIR=str(tmp_path))
    try:
        _wait_for_workers(server, 2)
        with httpx.Client(timeout=10) as client:
            assert client.get(f"{server.url}/api/version").status_code == 200
        (run_dir,) = tmp_path.glob("trioproxy-*")
        kept = sorted(run_dir.rglob("*"))
        assert run_dir / "master.lock" in kept and list(run_dir.glob("metrics/counter_*.db"))
        long_ago = time.time() - 30 * 86400
        for entry in [run_dir, *kept]:
            os.utime(entry, (long_ago, long_ago))
        config = tmp_path / "tmp.conf"
        # aged by access and modification times (a test cannot age the change time)
        config.write_text(f"d {tmp_path} 1777 - - amAM:10d\n")
        cleaned = subprocess.run([tmpfiles, "--clean", str(config)], capture_output=True)
        assert cleaned.returncode == 0, cleaned.stderr
        assert [entry for entry in kept if not entry.exists()] == []
        with httpx.Client(timeout=10) as client:
            text = client.get(f"{server.url}/metrics").text
        assert 'http_requests_total{api="ollama",endpoint="api_version"' in text
    finally:
        server.stop()
