"""Credentials in OPENAI_API_BASE_URL (``http://user:password@host/v1``) are secrets like
OPENAI_API_KEY: a backend that quotes the ``Authorization: Basic …`` it received must not
hand them to a client (error bodies relayed or rebuilt, answers, streams, headers, the
unauthenticated /ready) or to the log, in either log format."""

from __future__ import annotations

import base64
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler

import httpx
import pytest

from .conftest import ServerProcess
from .fakes import QuietHTTPServer

StartProxy = Callable[..., ServerProcess]

USER, PASSWORD = "svcuser", "Sup3rSecretPass"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
MESSAGES = [{"role": "user", "content": "x"}]
LEAKS = (PASSWORD, BASIC.rstrip("="))  # the base64 without its padding holds it all too


class _QuotingBackend(BaseHTTPRequestHandler):
    """Quotes the Authorization header it got in everything it says."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []  # the Authorization headers received

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _auth(self) -> str:
        auth = self.headers.get("Authorization", "")
        self.seen.append(auth)
        return auth

    def _send(self, status: int, payload: object, content_type: str = "application/json") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-ratelimit-echo", self.headers.get("Authorization", ""))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # the readiness check's GET /models fails, quoting it
        self._send(500, {"error": {"message": f"models broken; you sent {self._auth()}"}})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        auth = self._auth()
        if request.get("model") == "refuse":
            error = {"message": f"bad credentials: {auth}", "type": "invalid_request_error"}
            self._send(401, {"error": error})
        elif request.get("model") == "plain":
            self._send(400, f"you sent {auth}".encode(), "text/plain")
        elif request.get("stream"):
            chunk = {"choices": [{"index": 0, "delta": {"content": f"you sent {auth}"}}]}
            payload = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
            cut = payload.index(b"Basic ") + 10  # two reads, the cut inside the credential
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            time.sleep(0.05)
            self.wfile.write(payload[cut:])
        else:
            message = {"role": "assistant", "content": f"you sent {auth}"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            self._send(200, {"object": "chat.completion", "choices": [choice]})


@pytest.fixture(scope="module")
def quoting_backend() -> Iterator[str]:
    server = QuietHTTPServer(("127.0.0.1", 0), _QuotingBackend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_url_credentials_never_leak(
    start_proxy: StartProxy, quoting_backend: str, log_format: str
) -> None:
    _QuotingBackend.seen.clear()
    server = start_proxy(
        f"http://{USER}:{PASSWORD}@{quoting_backend}/v1",
        LOG_FORMAT=log_format,
        LOG_LEVEL="DEBUG",
        MAX_RETRIES="0",
        READY_CHECK_INTERVAL="0.2",
    )
    seen: list[str] = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for model in ("refuse", "plain", "answer"):
            for stream in (False, True):
                body = {"model": model, "stream": stream, "messages": MESSAGES}
                for path in ("/v1/chat/completions", "/api/chat"):
                    answer = client.post(path, json=body)
                    seen.append(f"{path} {model} {stream}: {answer.headers} {answer.text}")
        time.sleep(0.5)  # a readiness check has failed by now
        ready = client.get("/ready")
        seen.append(f"/ready: {ready.text}")
    time.sleep(0.2)  # the last log lines reach the pipe
    log = server.log()

    assert f"Basic {BASIC}" in _QuotingBackend.seen  # the credential was sent
    assert "models broken; you sent Basic ***" in ready.text  # /ready quotes the failure
    assert any("bad credentials: Basic ***" in text for text in seen)  # relayed, masked
    assert any("you sent Basic ***" in text for text in seen if "answer True" in text)
    for secret in LEAKS:
        leaks = [text for text in seen if secret in text]
        assert not leaks, f"{secret} reached a client: {leaks[0][:400]}"
        assert secret not in log, next(line for line in log.splitlines() if secret in line)
    assert "backend answered 401: bad credentials: Basic ***" in log


class _ListingBackend(_QuotingBackend):
    """Lists its models quoting the Authorization it got: in ``owned_by`` and in an id."""

    def do_GET(self) -> None:
        auth = self._auth()
        models = [
            {"id": "m", "object": "model", "owned_by": f"whoever sent {auth}"},
            {"id": f"tuned-for-{auth}", "object": "model", "owned_by": "us"},
        ]
        if self.path.startswith("/v1/responses/"):  # names the model by what it was sent
            token = auth.removeprefix("Bearer ")
            response = {"id": "resp_1", "object": "response", "status": "completed"}
            self._send(200, {**response, "model": token, "output": []})
            return
        self._send(200, {"object": "list", "data": models})


def test_a_model_list_that_quotes_the_credentials_is_masked(start_proxy: StartProxy) -> None:
    """A review: /v1/models, /v1/models/{id} and /api/tags listed what the backend's model
    list quoted of our key or URL credentials, unmasked (replies to chat were masked); a
    second found a model named by a polled response (``GET /v1/responses/{id}``) made a
    metrics label, unmasked."""
    server = QuietHTTPServer(("127.0.0.1", 0), _ListingBackend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = "sk-backendSECRET-0123456789"
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        proxy = start_proxy(f"http://{USER}:{PASSWORD}@{address}/v1", OPENAI_API_KEY=key)
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            answers = [
                client.get("/v1/models"),
                client.get("/v1/models/m"),
                client.get("/api/tags"),
                client.get("/api/ps"),
                client.post("/api/show", json={"model": "m"}),
            ]
            polled = client.get("/v1/responses/resp_1")
            metrics = [client.get(path).text for path in ("/metrics", "/v1/metrics")]
    finally:
        server.shutdown()
        server.server_close()
    assert polled.status_code == 200 and polled.json()["model"] == "***", polled.text
    for text in metrics:  # a model the backend named became a label: masked there too
        assert key not in text
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
    assert "whoever sent Bearer ***" in answers[0].text
    assert "whoever sent Bearer ***" in answers[1].text
    assert "tuned-for-Bearer ***" in answers[2].text
    for answer in answers:
        for secret in (key, *LEAKS):
            assert secret not in answer.text, answer.text


def test_a_placeholder_key_does_not_mangle_a_model_label(start_proxy: StartProxy) -> None:
    """A review: scrubbing backend-named model labels of every key of 4+ characters made
    ``ollama/llama3`` (key ``ollama``, as local setups use) a second label ``***/llama3``.
    Labels are masked as replies are: keys of 12 characters or more."""
    server = QuietHTTPServer(("127.0.0.1", 0), _ListingBackend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        proxy = start_proxy(url, OPENAI_API_KEY="ollama")
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            assert client.get("/v1/responses/resp_1").status_code == 200  # names "ollama"
            metrics = client.get("/metrics").text
    finally:
        server.shutdown()
        server.server_close()
    assert 'model="ollama"' in metrics and "***" not in metrics


def _escaped(text: str, every: int = 1) -> str:
    """``text`` as a JSON encoder may write it: every ``every``-th character as its
    ``\\u`` escape, in upper-case hex when the character's place is odd."""
    return "".join(
        (f"\\u{ord(c):04X}" if i % 2 else f"\\u{ord(c):04x}") if i % every == 0 else c
        for i, c in enumerate(text)
    )


class _EscapingBackend(_QuotingBackend):
    """Quotes the key it was sent in ``\\u`` escapes: valid JSON that a client decodes to
    the key. The stream comes in reads cut inside the escapes."""

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        key = self._auth().removeprefix("Bearer ")
        if request.get("model") == "refuse":
            message = f'{{"message": "Incorrect API key provided: {_escaped(key)}"}}'
            self._send(401, f'{{"error": {message}}}'.encode())
        elif request.get("stream"):
            content = f'{{"content": "key {_escaped(key, 3)} and {_escaped(key)}"}}'
            event = f'{{"choices": [{{"index": 0, "delta": {content}}}]}}'
            payload = f"data: {event}\n\ndata: [DONE]\n\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            start = payload.index(b"\\u")
            for a, b in itertools.pairwise([0, start + 2, start + 9, start + 40, len(payload)]):
                self.wfile.write(payload[a:b])
                self.wfile.flush()
                time.sleep(0.05)
        else:
            content = f"key {_escaped(key, 2)} at https:\\/\\/{_escaped(key)}"
            message = f'{{"role": "assistant", "content": "{content}"}}'
            choice = f'{{"index": 0, "message": {message}, "finish_reason": "stop"}}'
            self._send(200, f'{{"object": "chat.completion", "choices": [{choice}]}}'.encode())


def test_a_key_spelled_in_json_escapes_is_masked(start_proxy: StartProxy) -> None:
    """A review: a backend that wrote our key in ``\\u`` escapes (all or some of its
    characters, hex in either case) had it relayed on /v1 unmasked, in an answer, in a
    stream and in an error: valid JSON that the client decodes to the key."""
    server = QuietHTTPServer(("127.0.0.1", 0), _EscapingBackend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = "sk-backendSECRET-0123456789"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        proxy = start_proxy(url, OPENAI_API_KEY=key, MAX_RETRIES="0")
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            answers = {
                model: client.post(
                    "/v1/chat/completions",
                    json={"model": model, "stream": stream, "messages": MESSAGES},
                )
                for model, stream in (("answer", False), ("answer-stream", True), ("refuse", False))
            }
    finally:
        server.shutdown()
        server.server_close()
    answer, stream, refusal = answers.values()
    events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: {")]
    decoded = {  # what the client reads: all three at once, to show each that leaks
        "answer": (answer.status_code, answer.json()["choices"][0]["message"]["content"]),
        "stream": [json.loads(event)["choices"][0]["delta"]["content"] for event in events],
        "refusal": (refusal.status_code, refusal.json()["error"]["message"]),
    }
    assert decoded == {
        "answer": (200, "key *** at https://***"),
        "stream": ["key *** and ***"],
        "refusal": (401, "Incorrect API key provided: ***"),
    }
