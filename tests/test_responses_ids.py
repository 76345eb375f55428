"""The Responses API's routes by id with other backends' ids, driven with the official openai
SDK through a proxy process to a recording fake backend. LiteLLM's ids are ``resp_`` and the
standard base64 of ``litellm:custom_llm_provider:…;model_id:…;response_id:…`` (200-odd
characters with ``+``, ``/`` and ``=``): they must reach the backend unchanged, as one path
segment, while an id that could change the backend's path or query never reaches it."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar
from urllib.parse import unquote

import httpx
import openai
import pytest

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving

StartProxy = Callable[..., ServerProcess]
PREFIX = "/v1/responses/"


def _litellm_id() -> str:
    """A 237-character id built as LiteLLM builds its ids, holding ``+``, ``/`` and ``=``."""
    head = "litellm:custom_llm_provider:openai;model_id:"
    tail = ";response_id:resp_" + "0123456789abcdef" * 3
    # "?" and ">" where base64 spells them "/" and "+"; 173 bytes leave one "=" of padding
    middle = ("?ab>cd" * 20)[: 173 - len(head) - len(tail)]
    return "resp_" + base64.b64encode((head + middle + tail).encode()).decode()


LITELLM_ID = _litellm_id()


class _Backend(ScriptedHandler):
    """Answers the routes by id, remembering each request's method and path as it came."""

    seen: ClassVar[list[tuple[str, str]]] = []

    def _segment(self) -> str:
        """The id's path segment (and what follows it), as the proxy encoded it."""
        return self.path.removeprefix(PREFIX).partition("?")[0]

    def _reply(self, payload: dict[str, Any]) -> None:
        self.seen.append((self.command, self.path))
        headers = {"x-ratelimit-remaining-requests": "7"}  # forwarded to the client
        self.answer(200, json.dumps(payload).encode(), headers=headers)

    def do_GET(self) -> None:
        if not self.path.startswith(PREFIX):  # the proxy's readiness checks: GET /models
            return self.answer(200, json.dumps({"object": "list", "data": []}).encode())
        segment = self._segment()
        if segment.endswith("/input_items"):
            items = {"object": "list", "data": [], "first_id": None, "last_id": None}
            return self._reply({**items, "has_more": False})
        self._reply(_response(unquote(segment)))

    def do_POST(self) -> None:
        self._reply(_response(unquote(self._segment().removesuffix("/cancel"))))

    def do_DELETE(self) -> None:
        self._reply({"id": unquote(self._segment()), "object": "response", "deleted": True})

    def do_HEAD(self) -> None:
        # as OpenAI's API and LiteLLM: no HEAD on these routes
        self.seen.append((self.command, self.path))
        self.answer(405, b"")


def _response(response_id: str) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "model": "m", "status": "cancelled"}


@pytest.fixture(scope="module")
def proxy(start_proxy: StartProxy) -> Iterator[ServerProcess]:
    with serving(_Backend) as url:
        yield start_proxy(url, MAX_RETRIES="0")


@pytest.fixture
def client(proxy: ServerProcess) -> Iterator[openai.OpenAI]:
    _Backend.seen.clear()
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def _encoded(response_id: str) -> str:
    """The id as one path segment, as the openai SDK spells it: "/" is "%2F"."""
    return response_id.replace("/", "%2F")


def test_a_litellm_id_reaches_the_backend_on_every_route_by_id(client: openai.OpenAI) -> None:
    assert len(LITELLM_ID) == 237 and {"+", "/", "="} <= set(LITELLM_ID)
    assert client.responses.retrieve(LITELLM_ID).id == LITELLM_ID
    assert client.responses.cancel(LITELLM_ID).id == LITELLM_ID
    client.responses.delete(LITELLM_ID)
    assert client.responses.input_items.list(LITELLM_ID, limit=2).data == []
    segment = PREFIX + _encoded(LITELLM_ID)
    assert _Backend.seen == [
        ("GET", segment),
        ("POST", segment + "/cancel"),
        ("DELETE", segment),
        ("GET", segment + "/input_items?limit=2"),
    ]


def test_an_id_with_a_raw_slash_is_the_same_id(proxy: ServerProcess) -> None:
    """A client that does not encode the id's "/" (curl, a hand-built URL) names the same
    response: the backend gets it encoded, as one segment."""
    _Backend.seen.clear()
    with httpx.Client(base_url=proxy.url + "/v1", timeout=10) as http:
        assert http.get(f"/responses/{LITELLM_ID}").json()["id"] == LITELLM_ID
        assert http.post(f"/responses/{LITELLM_ID}/cancel").json()["id"] == LITELLM_ID
    segment = PREFIX + _encoded(LITELLM_ID)
    assert _Backend.seen == [("GET", segment), ("POST", segment + "/cancel")]


def test_an_id_of_the_longest_length_reaches_the_backend(client: openai.OpenAI) -> None:
    longest = "resp_" + "A/b+" * 254 + "c="  # 1,024 characters
    assert client.responses.retrieve(longest).id == longest
    assert _Backend.seen == [("GET", PREFIX + _encoded(longest))]


@pytest.mark.parametrize(
    ("response_id", "needle"),
    [
        ("../x", "'.'"),
        ("a?b=c", "'?'"),
        ("a#b", "'#'"),
        ("a%2Fb", "'%'"),
        ("resp 1", "' '"),
        ("x" * 1025, "(1,025 characters long): at most 1,024"),
        # the app merges repeated slashes before routing: it would be another id
        ("resp_a//b", "holds '//'"),
        ("/resp_a", "begins with '/'"),
    ],
)
def test_an_id_that_could_change_the_backends_url_is_refused(
    client: openai.OpenAI, response_id: str, needle: str
) -> None:
    """Refused on every route by id with a 400 in OpenAI's shape that says what is wrong,
    and the backend never asked."""
    calls = (
        client.responses.retrieve,
        client.responses.cancel,
        client.responses.delete,
        client.responses.input_items.list,
    )
    for call in calls:
        with pytest.raises(openai.BadRequestError) as refused:
            call(response_id)
        error = refused.value.body
        assert isinstance(error, dict) and error["param"] == "response_id", error
        assert needle in error["message"], error
    assert _Backend.seen == []


def test_a_routes_suffix_is_not_taken_for_part_of_an_id(proxy: ServerProcess) -> None:
    """Now that an id may hold "/", ``GET …/cancel`` is still the wrong method for cancel
    (not a retrieve of the id "…/cancel")."""
    _Backend.seen.clear()
    with httpx.Client(base_url=proxy.url + "/v1", timeout=10) as http:
        wrong = http.get(f"/responses/{_encoded(LITELLM_ID)}/cancel")
        assert wrong.status_code == 405, wrong.text
        assert "POST" in wrong.headers["Allow"]
        wrong = http.delete(f"/responses/{_encoded(LITELLM_ID)}/input_items")
        assert wrong.status_code == 405, wrong.text
        assert "GET" in wrong.headers["Allow"]
    assert _Backend.seen == []


def test_head_asks_the_backend_with_get_and_answers_without_a_body(proxy: ServerProcess) -> None:
    """HEAD is GET without the body, on both routes by id that take GET: the backend (which
    has no HEAD on them) is asked with GET, and the client gets GET's status and headers."""
    for path in (PREFIX + "resp_1", PREFIX + "resp_1/input_items"):
        _Backend.seen.clear()
        with httpx.Client(base_url=proxy.url, timeout=10) as http:
            got = http.get(path)
            head = http.head(path)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["Content-Type"] == got.headers["Content-Type"]
        assert head.headers["Content-Length"] == str(len(got.content))
        assert head.headers["x-ratelimit-remaining-requests"] == "7"
        assert _Backend.seen == [("GET", path)] * 2


class _SlowReplay(ScriptedHandler):
    """Replays a stored response's stream slowly (``?stream=true``), noting how it ended."""

    ended: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        if "stream=true" not in self.path:  # the proxy's readiness checks: GET /models
            return self.answer(200, json.dumps({"object": "list", "data": []}).encode())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        event = b'event: response.in_progress\ndata: {"type":"response.in_progress"}\n\n'
        try:
            for _ in range(40):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n")
            self.ended.append("read to its end")
        except OSError:
            self.ended.append("closed by the proxy")


def test_head_of_a_resumed_stream_does_not_read_the_stream(start_proxy: StartProxy) -> None:
    """HEAD with ``stream=true`` started relaying the backend's replay for a body it never
    sends: recorded as a stream the client cancelled (499, bytes counted that never went
    out). It answers with GET's head and closes the backend's stream at once."""
    _SlowReplay.ended.clear()
    with serving(_SlowReplay) as url:
        proxy = start_proxy(url, MAX_RETRIES="0", ACCESS_LOG="true", LOG_LEVEL="INFO")
        started = time.monotonic()
        head = httpx.head(proxy.url + PREFIX + "resp_1?stream=true", timeout=10)
        elapsed = time.monotonic() - started
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-type"].startswith("text/event-stream")
        assert elapsed < 2, elapsed
        deadline = time.monotonic() + 5
        while not _SlowReplay.ended and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _SlowReplay.ended == ["closed by the proxy"]
    # one plain answer with no body, not a stream relayed to nobody
    (line,) = [line for line in proxy.log().splitlines() if " HEAD " in line]
    assert " 200 " in line and " 0 B" in line and "completed" not in line, line
