"""Repeated log lines: a backend down at hundreds of requests a second wrote hundreds of
identical WARNING lines a second per worker, drowning the line that mattered. A line
identical to one written within ``LOG_REPEAT_WINDOW_SECONDS`` is counted instead, and the
count comes out with the message (``... (49 identical lines suppressed in the last 2 s)``).

Unit tests drive ``logs.RepeatedLines`` with a clock and a timer of their own (no sleeps);
the end-to-end ones point a real proxy at a dead port.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import ollama
import pytest

from trioproxy import logs
from trioproxy.config import ConfigError, load_settings
from trioproxy.logs import (
    ACCESS_LOGGER,
    MESSAGE_LIMIT,
    TEXT_FORMAT,
    JsonFormatter,
    RepeatedLines,
    RequestContextFilter,
    TextFormatter,
    request_id_var,
)
from trioproxy.routes_ops import ReadinessChecker

from .conftest import ServerProcess, _spawn, base_env, closed_port_url, wait_healthy

StartProxy = Callable[..., ServerProcess]
WINDOW = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Timers:
    """The timers a suppressor asks for, fired by the test when it says."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, action: Callable[[], None]) -> None:
        self.pending.append((self.clock.now + delay, action))

    def fire_due(self) -> int:
        due = [entry for entry in self.pending if entry[0] <= self.clock.now]
        self.pending = [entry for entry in self.pending if entry[0] > self.clock.now]
        for _, action in due:
            action()
        return len(due)


class Setup:
    def __init__(self, fmt: str = "text", secrets: tuple[str, ...] = (), keys: int = 128):
        self.stream = io.StringIO()
        self.clock = Clock()
        self.timers = Timers(self.clock)
        self.handler = logging.StreamHandler(self.stream)
        self.handler.addFilter(RequestContextFilter(secrets))
        self.repeats = RepeatedLines(
            self.handler, WINDOW, clock=self.clock, schedule=self.timers, keys=keys
        )
        self.handler.addFilter(self.repeats)
        formatter = JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT)
        self.handler.setFormatter(formatter)

    def log(
        self,
        msg: str,
        *args: object,
        level: int = logging.WARNING,
        name: str = "trioproxy",
        request_id: str = "-",
        exc_info: Any = None,
    ) -> None:
        record = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
        token = request_id_var.set(request_id)
        try:
            self.handler.handle(record)
        finally:
            request_id_var.reset(token)

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def later(self, seconds: float) -> None:
        self.clock.now += seconds


@pytest.fixture
def setup() -> Setup:
    return Setup()


FAILED = "backend request failed: cannot connect to %s (connection refused)"


def test_a_line_repeated_within_the_window_is_written_once_then_with_its_count(
    setup: Setup,
) -> None:
    for i in range(50):
        setup.log(FAILED, "127.0.0.1:9", request_id=f"r{i}")
        setup.later(0.1)  # 50 in 5 s
    (first,) = setup.lines()
    assert first.endswith("WARNING trioproxy [r0] " + FAILED % "127.0.0.1:9")
    setup.later(6.0)  # the window is over: the next one is written, with the count
    setup.log(FAILED, "127.0.0.1:9", request_id="r50")
    assert setup.lines()[1].endswith(
        "[r50] " + FAILED % "127.0.0.1:9" + " (49 identical lines suppressed in the last 11 s)"
    )
    setup.log(FAILED, "127.0.0.1:9", request_id="r51")  # a new window began with it
    assert len(setup.lines()) == 2


def test_distinct_lines_are_never_held_back(setup: Setup) -> None:
    """Identical is the line as written: the same format with other arguments, the same
    message from another logger or at another level, is another line."""
    setup.log(FAILED, "127.0.0.1:9")
    setup.log(FAILED, "127.0.0.1:10")
    setup.log(FAILED, "127.0.0.1:9", name="trioproxy.relay")
    setup.log(FAILED, "127.0.0.1:9", level=logging.ERROR)
    setup.log("stream ended early: %s", "timeout")
    setup.log("stream ended early: %s", "connection reset")
    assert len(setup.lines()) == 6
    setup.log(FAILED, "127.0.0.1:9")  # ... and the same one again is held back
    assert len(setup.lines()) == 6


def test_access_lines_and_debug_lines_are_all_written(setup: Setup) -> None:
    """An access line per request is ACCESS_LOG's promise (identical ones: a client
    polling /api/tags); DEBUG is asked for to follow requests line by line."""
    for _ in range(5):
        setup.log("127.0.0.1 GET /api/tags 200 0.4 ms 12 B", level=logging.INFO, name=ACCESS_LOGGER)
        setup.log("cleanup failed", level=logging.DEBUG)
        setup.log("backend answered %d: %s", 429, "slow down", level=logging.INFO)
    lines = setup.lines()
    assert sum("trioproxy.access" in line for line in lines) == 5
    assert sum("cleanup failed" in line for line in lines) == 5
    # INFO lines of the proxy's own are counted: a backend's 429 to every request is a flood
    assert sum("backend answered 429" in line for line in lines) == 1


def test_the_count_comes_out_at_the_end_of_the_window_if_the_line_never_recurs(
    setup: Setup,
) -> None:
    """The outage is over and the line never comes again: the timer writes the count one
    window after the line, with no request's id (it stands for many)."""
    for _ in range(20):
        setup.log(FAILED, "127.0.0.1:9", request_id="r")
        setup.later(0.01)
    assert len(setup.lines()) == 1
    assert len(setup.timers.pending) == 1  # one timer, not one per line held back
    setup.clock.now = setup.timers.pending[0][0] + 0.001
    assert setup.timers.fire_due() == 1
    assert setup.lines()[1].endswith(
        "WARNING trioproxy [-] "
        + FAILED % "127.0.0.1:9"
        + " (19 identical lines suppressed in the last 10 s)"
    )
    assert not setup.timers.pending  # nothing more to write: no timer
    setup.later(WINDOW)  # ...and a window with nothing more is not a line of "0"
    setup.log("another line")
    assert setup.lines()[2].endswith("another line")


def test_a_flood_is_one_line_per_window_and_every_line_is_counted(setup: Setup) -> None:
    """200 lines a second for a minute: one line per window, whether the timer or the next
    line writes the count, and the lines written and the counts add up to what came."""
    sent = 0
    for _ in range(60 * 200):
        setup.log(FAILED, "127.0.0.1:9", request_id=f"r{sent}")
        sent += 1
        setup.later(1 / 200)
        setup.timers.fire_due()
    setup.later(WINDOW)
    setup.timers.fire_due()
    lines = setup.lines()
    assert 6 <= len(lines) <= 8
    counts = [int(m[1]) for line in lines if (m := re.search(r"\((\d+) identical", line))]
    written = len(lines) - len(counts)
    assert written + sum(counts) == sent


def test_exit_writes_the_counts_still_held(setup: Setup) -> None:
    setup.log(FAILED, "127.0.0.1:9")
    setup.later(2.5)
    setup.log(FAILED, "127.0.0.1:9")
    setup.log("a line written once")
    logs.flush_repeats()  # what the exit runs, for every handler
    lines = setup.lines()
    assert len(lines) == 3
    assert lines[2].endswith(" (1 identical line suppressed in the last 2.5 s)")
    logs.flush_repeats()
    assert len(setup.lines()) == 3  # written once


def test_a_forked_child_writes_none_of_its_parents_counts(setup: Setup) -> None:
    """The parent's counts are the parent's to write: a forked child that exits normally
    (and runs the exit's flush) wrote them a second time, and a timer armed in the parent
    (a thread the child does not have) kept the child from arming its own."""
    setup.log(FAILED, "127.0.0.1:9")
    setup.log(FAILED, "127.0.0.1:9")  # a count held, a timer armed
    assert len(setup.lines()) == 1 and setup.repeats._armed < float("inf")
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child's report goes through the pipe)
        try:
            logs.flush_repeats()
            report = f"{len(setup.lines())} {setup.repeats._armed}"
            os.write(writing, report.encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        report = pipe.read()
    os.waitpid(child, 0)
    assert report == "1 inf"
    setup.repeats.flush()  # the parent's, still the parent's
    assert setup.lines()[1].endswith("(1 identical line suppressed in the last 0 s)")


def test_memory_is_bounded_and_a_forgotten_line_keeps_its_count() -> None:
    setup = Setup(keys=4)
    setup.log("line %d", 0)
    setup.log("line %d", 0)  # held back: a count to write
    for n in range(1, 20):
        setup.log("line %d", n)
        assert len(setup.repeats._recent) <= 4
    lines = setup.lines()
    # line 0 was forgotten for newer ones: its count was written then, not lost
    assert any(
        line.endswith("line 0 (1 identical line suppressed in the last 0 s)") for line in lines
    )
    assert len(lines) == 1 + 1 + 19


def test_a_traceback_is_part_of_the_line(setup: Setup) -> None:
    """The same message over another exception is another line; over the same one, a
    repeat (its traceback not written again)."""

    def failure(text: str) -> Any:
        try:
            raise ValueError(text)
        except ValueError:
            import sys

            return sys.exc_info()

    setup.log("unhandled error while serving POST /api/chat", exc_info=failure("a"))
    setup.log("unhandled error while serving POST /api/chat", exc_info=failure("b"))
    setup.log("unhandled error while serving POST /api/chat", exc_info=failure("b"))
    text = setup.stream.getvalue()
    assert text.count("ValueError: a") == 1 and text.count("ValueError: b") == 1


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_count_is_never_what_a_long_line_loses(fmt: str) -> None:
    """A message is cut at MESSAGE_LIMIT bytes: the note comes after the cut, in both
    formats, and a JSON line has the count as a number too."""
    setup = Setup(fmt)
    long = "backend answered 500: " + "x" * (3 * MESSAGE_LIMIT)
    for _ in range(3):
        setup.log(long)
    setup.later(WINDOW)
    setup.log(long, request_id="again")
    setup.clock.now += 1.0
    setup.log(long)
    setup.log(long)
    setup.repeats.flush()
    lines = setup.lines()
    assert len(lines) == 3
    note = re.compile(r"\.\.\. \[\d+ more bytes\] \((\d) identical lines? suppressed")
    if fmt == "json":
        entries = [json.loads(line) for line in lines]
        assert [e.get("suppressed") for e in entries] == [None, 2, 2]
        assert [e["request_id"] for e in entries] == ["-", "again", "-"]
        messages = [e["message"] for e in entries]
    else:
        messages = lines
    assert [m[1] for line in messages[1:] if (m := note.search(line))] == ["2", "2"]
    assert all(len(line.encode()) < 4096 for line in lines)  # one pipe write each


def test_a_change_of_the_backends_state_is_written_every_time(setup: Setup) -> None:
    """The reachability lines are written on a change only, so each says what the state
    is from then on: a backend flapping (a check fails, a request gets through, the next
    check fails, READY_CHECK_INTERVAL=2) had its second "not reachable" held back, and the
    log's last word was "reachable again" while it was down (the count came a window
    later, after, or before, the next change's)."""
    checker = ReadinessChecker(load_settings({}, dotenv_path=None))
    ready_log = logging.getLogger("trioproxy.ready")
    saved = ready_log.handlers[:], ready_log.propagate, ready_log.level
    ready_log.handlers[:], ready_log.propagate = [setup.handler], False
    ready_log.setLevel(logging.INFO)
    try:
        for _ in range(2):
            checker._record(False, "connection refused")
            setup.later(1.0)
            checker._record(True, None)
            setup.later(1.0)
        checker._record(False, "connection refused")
    finally:
        ready_log.handlers[:], ready_log.propagate, _ = saved
        ready_log.setLevel(saved[2])
    said = [line.split("] ", 1)[1] for line in setup.lines()]
    down, up = "the backend is not reachable: connection refused", "the backend is reachable again"
    assert said == [down, up, down, up, down]
    assert not setup.timers.pending  # no count held for a line of these


def test_a_call_whose_arguments_do_not_fit_its_format_still_does_not_raise(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """logging reports such a call on stderr from the handler; raised in the caller, it
    would have failed the request that logged it."""
    setup.log("backend answered %d", "not a number")
    assert "--- Logging error ---" in capsys.readouterr().err
    setup.log("backend answered %d", 502)
    assert setup.lines()[-1].endswith("backend answered 502")


def test_the_secrets_are_scrubbed_before_lines_are_compared_and_kept() -> None:
    setup = Setup(secrets=("sk-backend-secret-1234",))
    for _ in range(3):
        setup.log("the backend said: bad key %s", "sk-backend-secret-1234")
    setup.later(WINDOW)
    setup.timers.fire_due()
    text = setup.stream.getvalue()
    assert "sk-backend-secret" not in text
    assert text.count("bad key ***") == 2 and "(2 identical lines suppressed" in text


def test_a_window_given_as_a_value_is_checked_as_the_variable_is() -> None:
    with pytest.raises(ConfigError, match="invalid LOG_REPEAT_WINDOW_SECONDS: expected a number"):
        load_settings({}, dotenv_path=None, log_repeat_window_seconds=-1.0)


def test_a_window_of_0_writes_every_line() -> None:
    settings = load_settings({"LOG_REPEAT_WINDOW_SECONDS": "0"}, dotenv_path=None)
    assert settings.log_repeat_window_seconds == 0
    assert load_settings({}, dotenv_path=None).log_repeat_window_seconds == 10
    saved = logs._repeat_window
    logs._repeat_window = 0
    try:
        handler = logs.configured_handler()
    finally:
        logs._repeat_window = saved
    assert not any(isinstance(f, RepeatedLines) for f in handler.filters)
    assert any(isinstance(f, RepeatedLines) for f in logs.configured_handler().filters)


# ---- a real proxy with its backend down ------------------------------------------------------

REQUESTS = 50
CONNECT_FAILED = re.compile(
    r" WARNING trioproxy \[(?P<id>[^\]]+)\] backend request failed: cannot connect to "
    r"127\.0\.0\.1:\d+ \(connection refused\)(?: \((?P<count>\d+) identical lines? suppressed"
    r" in the last [\d.]+ s\))?$"
)


def _chat_while_down(url: str, requests: int = REQUESTS) -> None:
    for i in range(requests):
        client = ollama.Client(host=url, timeout=10, headers={"X-Request-ID": f"outage-{i}"})
        try:
            with pytest.raises(ollama.ResponseError) as caught:
                client.chat(model="m", messages=[{"role": "user", "content": "hi"}])
        finally:
            client.close()
        assert caught.value.status_code == 502


def _accounted(found: list[tuple[str, int | None]]) -> int:
    """The requests the lines stand for: a request's own line (a summary's id is ``-``)
    and the count it carries."""
    return sum((request_id != "-") + (count or 0) for request_id, count in found)


def _failures(log: str, fmt: str = "text") -> list[tuple[str, int | None]]:
    """Each line about the failed connects: (request id, count of lines it stands for)."""
    found: list[tuple[str, int | None]] = []
    for line in log.splitlines():
        if fmt == "json":
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            text = f" {entry['level']} {entry['logger']} [{entry['request_id']}] {entry['message']}"
            if (match := CONNECT_FAILED.search(text)) is not None:
                assert entry.get("suppressed") == (int(match["count"]) if match["count"] else None)
        else:
            match = CONNECT_FAILED.search(line)
        if match is not None:
            found.append((match["id"], int(match["count"]) if match["count"] else None))
    return found


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_dead_backend_is_one_warning_not_one_per_request(
    start_proxy: StartProxy, fmt: str
) -> None:
    """50 requests to a dead backend within the window: one WARNING (the first request's),
    every access line, and at exit the count of the 49 lines held back."""
    proxy = start_proxy(
        closed_port_url(),
        MAX_RETRIES="0",
        LOG_FORMAT=fmt,
        ACCESS_LOG="true",
        LOG_REPEAT_WINDOW_SECONDS="600",  # no machine is that slow: one window for all
    )
    _chat_while_down(proxy.url)
    proxy.stop()
    log = proxy.log()
    assert _failures(log, fmt) == [("outage-0", None), ("-", REQUESTS - 1)], log
    assert log.count("POST /api/chat 502") == REQUESTS  # access lines are never held back


def test_the_count_comes_out_after_the_window_while_the_proxy_runs(
    start_proxy: StartProxy,
) -> None:
    """The outage ends and the line never comes again: its count is written one window
    later anyway, by the proxy still running, not only at exit."""
    proxy = start_proxy(closed_port_url(), MAX_RETRIES="0", LOG_REPEAT_WINDOW_SECONDS="1")
    _chat_while_down(proxy.url)
    deadline = time.monotonic() + 20
    while True:  # however the 50 fell into windows, every one is accounted for
        found = _failures(proxy.log())
        counted = _accounted(found)
        if counted >= REQUESTS:
            break
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.05)
    time.sleep(1.5)  # a window more: a count still due is written by then
    found = _failures(proxy.log())
    # the proxy's own readiness probe may fail the same way once or twice meanwhile (its
    # line or its share of a count); nothing is counted twice, nothing lost
    assert REQUESTS <= _accounted(found) <= REQUESTS + 2, proxy.log()
    assert proxy.process.poll() is None
    # a count on a line of its own (id "-"), written while no request came: the timer's
    assert any(request_id == "-" for request_id, _ in found) and len(found) < REQUESTS, found


@pytest.fixture
def workers_proxy() -> Iterator[ServerProcess]:
    args = ["-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
            "--env-file", ""]  # fmt: skip
    env = base_env(
        OPENAI_API_BASE_URL=closed_port_url(), MAX_RETRIES="0", LOG_REPEAT_WINDOW_SECONDS="600"
    )
    server = _spawn(args, env, timeout=30)
    try:
        wait_healthy(server.url)
        yield server
    finally:
        server.stop()


def test_each_worker_counts_its_own_and_writes_its_count_at_exit(
    workers_proxy: ServerProcess,
) -> None:
    _chat_while_down(workers_proxy.url)
    workers_proxy.stop()
    found = _failures(workers_proxy.log())
    assert 1 <= len(found) <= 4, found  # a line and its count, a worker at most
    assert 1 <= sum(request_id != "-" for request_id, _ in found) <= 2, found
    assert _accounted(found) == REQUESTS, found
