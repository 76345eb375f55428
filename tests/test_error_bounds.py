"""A backend's error message of hundreds of KB, end to end: every error the proxy writes
itself (a 502 or a refusal in each dialect, a stream's in-band error line or event) and
every log line holds its start, what the backend said, and is bounded (MESSAGE_BYTES);
the backend's key quoted all over the message is scrubbed before the cut, so no part of
it leaks where the cut falls inside one."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from trioproxy.errors import MESSAGE_BYTES, BackendSecrets, bounded

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving
from .test_metrics_e2e import wait_for

StartProxy = Callable[..., ServerProcess]

KEY = "sk-bound-Z7q0Xw3mP9rT5vL2nH8cJ4"
START = "model overloaded: "
# the key repeated well past the cut, wherever a prefix puts it, then 800 KB of filler
BIG = START + f"key={KEY}; " * 400 + "y" * 800_000
SHOWN = START + "key=***; key=***;"  # what the client reads first
BOUND = MESSAGE_BYTES + 1024  # a body or line: the message and its JSON around it
_MODEL = re.compile(rb'"model"\s*:\s*"([^"]*)"')
_STREAM = re.compile(rb'"stream"\s*:\s*true')
FIRST_CHUNK = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


# per model: what the backend answers a stream request with (an event stream)
STREAMS = {
    # the first event a failure that is the client's (a 400): refused with that status
    "refused": _event({"error": {"message": BIG, "type": "invalid_request_error", "code": 400}}),
    # the first event a failure of the backend's: a 502
    "failed": _event({"error": {"message": BIG}}),
    # a token, then the failure: the stream's in-band error
    "midway": _event(FIRST_CHUNK) + _event({"error": {"message": BIG}}),
}
# per model: a reply to a request not streamed (status, body)
REPLIES = {
    # a status error's body is read up to 64 KiB: a message that fits
    "status": (429, json.dumps({"error": {"message": BIG[:60_000]}}).encode()),
    # 200 with an error: the proxy's own 502
    "ok-error": (200, json.dumps({"error": {"message": BIG}}).encode()),
    # not JSON: its text is the message, the key across where it was once cut (500)
    "plain": (400, ("bad request: " + "x" * 477 + f"{KEY} " * 200).encode()),
}


class _Backend(ScriptedHandler):
    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        found = _MODEL.search(raw)
        model = found[1].decode() if found else ""
        if _STREAM.search(raw) and model in STREAMS:
            self.answer(200, STREAMS[model], "text/event-stream")
        else:
            status, body = REPLIES[model]
            self.answer(status, body, "text/plain" if model == "plain" else "application/json")


@pytest.fixture(scope="module")
def proxy(start_proxy: StartProxy) -> Iterator[ServerProcess]:
    with serving(_Backend) as url:
        yield start_proxy(url, MAX_RETRIES="0", OPENAI_API_KEY=KEY, LOG_LEVEL="INFO")


def _body(path: str, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": stream}
    body["messages"] = [{"role": "user", "content": "hi"}]
    if path == "/v1/messages":
        body["max_tokens"] = 16
    return body


def _message(path: str, payload: dict[str, Any]) -> str:
    """The error's message, in the dialect of ``path``."""
    if path == "/v1/messages":
        assert payload["type"] == "error", payload
        return str(payload["error"]["message"])
    if path.startswith("/v1/"):
        return str(payload["error"]["message"])
    assert isinstance(payload["error"], str), payload
    return payload["error"]


def _assert_told(message: str) -> None:
    """The backend's words at the start, the cut said, and no piece of the key."""
    assert SHOWN in message[:200], message[:200]
    assert re.search(r"\.\.\. \[\d+ more bytes\]$", message), message[-80:]
    assert KEY[:4] not in message
    assert not message.removesuffix(message[message.rindex("...") :]).endswith("**")


def _assert_logged(proxy: ServerProcess) -> None:
    """Lines that quote the backend are bounded too (each a single write to a pipe)."""
    # written by the handler's thread after the answer: waited for
    wait_for(lambda: any(START in line for line in proxy.output))
    lines = [line for line in proxy.output if START in line]
    for line in lines:
        assert len(line.encode()) <= 4096, len(line.encode())
        assert KEY[:4] not in line


PATHS = ["/api/chat", "/v1/chat/completions", "/v1/messages"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("model", ["refused", "failed"])
def test_a_stream_refused_at_once_answers_the_message_bounded(
    proxy: ServerProcess, path: str, model: str
) -> None:
    response = httpx.post(proxy.url + path, json=_body(path, model, True), timeout=20)
    assert response.status_code == (400 if model == "refused" else 502)
    assert len(response.content) <= BOUND, len(response.content)
    _assert_told(_message(path, response.json()))
    _assert_logged(proxy)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/messages"])
def test_a_translated_streams_in_band_error_is_bounded(proxy: ServerProcess, path: str) -> None:
    """The line or event the proxy writes to end the stream (on /v1/chat/completions the
    backend's own event is relayed as it came)."""
    response = httpx.post(proxy.url + path, json=_body(path, "midway", True), timeout=20)
    assert response.status_code == 200
    assert len(response.content) <= 2 * BOUND, len(response.content)
    lines = [line for line in response.text.splitlines() if '"error"' in line]
    assert len(lines) == 1, response.text[:500]
    payload = json.loads(lines[0].removeprefix("data: "))
    _assert_told(_message(path, payload))
    _assert_logged(proxy)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/messages"])
def test_a_status_errors_message_is_bounded(proxy: ServerProcess, path: str) -> None:
    response = httpx.post(proxy.url + path, json=_body(path, "status", False), timeout=20)
    assert response.status_code == 429
    assert len(response.content) <= BOUND, len(response.content)
    _assert_told(_message(path, response.json()))
    _assert_logged(proxy)


def test_a_v1_status_error_body_is_relayed_as_the_backend_wrote_it(proxy: ServerProcess) -> None:
    """The backend's own error object, read up to 64 KiB, is the client's (its type, code
    and message as the backend gave them), the key scrubbed."""
    path = "/v1/chat/completions"
    response = httpx.post(proxy.url + path, json=_body(path, "status", False), timeout=20)
    assert response.status_code == 429
    assert response.json()["error"]["message"] == BIG[:60_000].replace(KEY, "***")


@pytest.mark.parametrize("path", ["/api/chat", "/v1/messages"])
def test_an_error_in_a_200_answer_is_bounded(proxy: ServerProcess, path: str) -> None:
    """A translated answer (a /v1/chat/completions one is relayed as it came)."""
    response = httpx.post(proxy.url + path, json=_body(path, "ok-error", False), timeout=20)
    assert response.status_code == 502
    assert len(response.content) <= BOUND, len(response.content)
    message = _message(path, response.json())
    assert message.startswith("the backend reported an error: " + SHOWN), message[:200]
    _assert_told(message)


@pytest.mark.parametrize("offset", range(len(KEY) + 8))
def test_a_key_across_the_cut_is_scrubbed_whole(offset: int) -> None:
    """Scrubbed, then cut: wherever the cut falls in the key (or in its ``***``), no
    character of it is shown, and the ``***`` is never cut in two."""
    secrets = BackendSecrets.of(KEY)
    text = "a" * (MESSAGE_BYTES - 64 - offset) + KEY + "b" * MESSAGE_BYTES
    shown = bounded(secrets.scrub(text))
    assert len(shown.encode()) <= MESSAGE_BYTES
    kept = shown[: shown.rindex("... [")]
    assert KEY[:1] not in kept.strip("a")
    assert kept.endswith(("a", "***", "b"))


def test_a_cut_is_never_inside_a_character() -> None:
    text = "é" * MESSAGE_BYTES
    shown = bounded(text)
    assert len(shown.encode()) <= MESSAGE_BYTES
    assert shown.startswith("é" * 100)
    assert bounded(shown) is shown  # cut once, never again


@pytest.mark.parametrize("path", PATHS)
def test_a_text_error_body_is_scrubbed_before_it_is_cut(proxy: ServerProcess, path: str) -> None:
    """A body that is not JSON is its own message: cut (at MESSAGE_BYTES) only after the
    key is scrubbed from it, so a key across the cut shows no part of it."""
    response = httpx.post(proxy.url + path, json=_body(path, "plain", False), timeout=20)
    assert response.status_code == 400
    assert len(response.content) <= BOUND, len(response.content)
    message = _message(path, response.json())
    assert message.startswith("bad request: xxx"), message[:100]
    assert KEY[:4] not in message
    assert "x*** ***" in message


# a message of MBs (an error event may take MAX_RESPONSE_BYTES): scrubbed in its first
# part only, so the loop is not held for the whole of it, and no part of a key shown

HUGE = 10_000_000


class _Counted(BackendSecrets):
    """The key's secrets, the characters each scrub was given noted."""

    def __init__(self, key: str, seen: list[int]) -> None:
        super().__init__(BackendSecrets.of(key).texts, BackendSecrets.of(key).replies)
        object.__setattr__(self, "seen", seen)

    def scrub(self, text: str) -> str:
        self.seen.append(len(text))  # type: ignore[attr-defined]
        return super().scrub(text)


@pytest.mark.parametrize("offset", [0, 1, 7, len(KEY) - 1, 2 * len(KEY) + 3])
def test_a_huge_message_is_scrubbed_in_its_first_part_only(offset: int) -> None:
    """The message is cut before it is scrubbed, past a margin, and again after: every
    key in what is kept is scrubbed, a key the first cut split is not kept in part, and
    the note counts every byte cut off."""
    from trioproxy.errors import SCRUBBED_WHOLE, scrub

    seen: list[int] = []
    secrets = _Counted(KEY, seen)
    # keys packed up to and across the first cut, wherever it falls in one
    start = "k=" + f"{KEY};" * ((SCRUBBED_WHOLE + secrets.margin) // (len(KEY) + 1) + 2)
    text = "a" * offset + start + "y" * HUGE
    shown = scrub(text, secrets)
    assert max(seen) < 2 * SCRUBBED_WHOLE  # not the 10 MB
    assert KEY[:4] not in shown and KEY[-4:] not in shown
    assert not re.search(r"[^*]\*{1,2}\.\.\. \[", shown)  # no *** cut in two
    kept, more = re.fullmatch(r"(.*)\.\.\. \[(\d+) more bytes\]", shown, re.S).groups()  # type: ignore[union-attr]
    assert text.replace(KEY, "***").startswith(kept)
    assert len(kept) + int(more) == len(text.replace(KEY, "***")) or int(more) > HUGE
    message = bounded(shown)  # then cut to what is shown: the count goes on
    assert len(message.encode()) <= MESSAGE_BYTES
    told = int(re.search(r"\[(\d+) more bytes\]$", message)[1])  # type: ignore[index]
    assert told > HUGE and told <= len(text)


def test_a_huge_log_message_is_scrubbed_and_escaped_in_its_first_part_only() -> None:
    """The log filter (the secrets of a line) and the formatters (its line ends escaped,
    its length measured) work on the message's first part: a 10 MB message held the loop
    50-450 ms before its line was cut at MESSAGE_LIMIT."""
    import logging

    from trioproxy.logs import JsonFormatter, RequestContextFilter, TextFormatter

    seen: list[int] = []

    class Filter(RequestContextFilter):
        def _scrubbed(self, text: str) -> str:
            seen.append(len(text))
            return super()._scrubbed(text)

    text = f"start {KEY} %2F\n" + "y" * HUGE
    record = logging.LogRecord("x", logging.WARNING, "f", 1, "failed: %s", (text,), None)
    Filter((KEY,)).filter(record)
    assert max(seen) < 100_000
    for formatter in (TextFormatter("%(message)s"), JsonFormatter()):
        line = formatter.format(record)
        assert len(line.encode()) <= 4096 and KEY[:4] not in line
        told = int(re.search(r"\[(\d+) more bytes\]", line)[1])  # type: ignore[index]
        assert HUGE - 4096 < told <= len(text)


def test_a_message_cut_before_is_bounded_with_its_note() -> None:
    """A message :func:`scrub` cut (its note at the end) whose text fits but for the
    note: still cut within MESSAGE_BYTES, the note counting both cuts."""
    body = "a" * (MESSAGE_BYTES - 16)
    shown = bounded(body + "... [100 more bytes]")
    assert len(shown.encode()) <= MESSAGE_BYTES
    kept = shown[: shown.rindex("... [")]
    assert shown == kept + f"... [{len(body) - len(kept) + 100} more bytes]"
