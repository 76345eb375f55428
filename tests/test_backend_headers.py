"""OPENAI_API_KEY_HEADER and UPSTREAM_HEADERS: the backend key in the header the backend
wants it in (Azure OpenAI's classic deployments take ``api-key: KEY``), and fixed extra
headers (OpenRouter's attribution, a gateway's token) on every backend request, the
readiness check's too. Their credentials are secrets as the key is. The settings'
checks in process and through the CLI, then the real ``openai`` and ``ollama`` clients
through a proxy to a backend that records (or quotes) the headers it got."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import ollama
import openai
import pytest

from trioproxy.config import ConfigError, Settings, header_secrets, load_settings, redact_url
from trioproxy.upstream import UpstreamPool

from .conftest import ServerProcess, base_env
from .fakes import ScriptedHandler, serving
from .test_cli_config import main_in_process, one_line, run_cli

StartProxy = Callable[..., ServerProcess]

KEY = "azure-key-0123456789abcdef"
GATEWAY_TOKEN = "cfut_GatewayToken0123456789"
EXTRA = {
    "X-Title": "trioproxy tests",
    "HTTP-Referer": "https://example.test/app",
    "cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}",
    "User-Agent": "acme-gateway-client/1.0",
}
MESSAGES = [{"role": "user", "content": "hi"}]
URL = "http://127.0.0.1:9/v1"


def _settings(**env: str) -> Settings:
    return load_settings({"OPENAI_API_BASE_URL": URL, **env}, dotenv_path=None)


# ---- the settings ----------------------------------------------------------------------


def test_the_key_goes_bare_in_the_header_named_and_extra_headers_go_along() -> None:
    settings = _settings(
        OPENAI_API_KEY=KEY, OPENAI_API_KEY_HEADER=" api-key ", UPSTREAM_HEADERS=json.dumps(EXTRA)
    )
    headers = UpstreamPool(settings)._default_headers
    assert headers["api-key"] == KEY and "authorization" not in headers
    assert {name: headers[name] for name in EXTRA} == EXTRA
    assert headers.get_list("user-agent") == ["acme-gateway-client/1.0"]  # replaced, not added


def test_by_default_the_key_is_a_bearer_token_and_any_case_of_authorization_is_that() -> None:
    for named in ("", "authorization", "AUTHORIZATION"):
        headers = UpstreamPool(_settings(OPENAI_API_KEY=KEY, OPENAI_API_KEY_HEADER=named))
        assert headers._default_headers["authorization"] == f"Bearer {KEY}"
        assert "api-key" not in headers._default_headers


def test_url_credentials_still_go_as_basic_auth_when_the_key_has_a_header_of_its_own() -> None:
    settings = load_settings(
        {
            "OPENAI_API_BASE_URL": "http://user:pass-word-1234@127.0.0.1:9/v1",
            "OPENAI_API_KEY": KEY,
            "OPENAI_API_KEY_HEADER": "api-key",
        },
        dotenv_path=None,
    )
    credentials = settings.credential_headers()
    assert credentials["api-key"] == KEY
    assert credentials["Authorization"].startswith("Basic ")


def test_every_value_but_a_public_headers_is_a_secret_and_of_a_scheme_the_token_alone() -> None:
    """A review: only values of headers whose names looked like a credential's were
    secrets, so a gateway's key in ``X-Custom-Gateway`` (a name an operator chose) was
    logged and relayed as the backend quoted it. Now every value is, but those of the
    headers known to be public (an app's title and URL, OpenAI's organisation)."""
    given = {
        "api-key": "k" * 20,
        "X-Auth-Token": "t" * 20,
        "Cookie": "session=abcdef0123456789",
        "cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}",
        "X-Custom-Gateway": "sk-live-CustomGateway0123",
        "X-Gateway": "Bearer gw-BearerToken0123",  # a known scheme: its token
        "X-Tenant": "acme corporation",  # "acme" is no scheme: the whole value
        "X-Title": "My Application Name",
        "HTTP-Referer": "https://example.test/app",
        "OpenAI-Organization": "org-0123456789abcdef",
        "openai-project": "proj_0123456789abcdef",
    }
    assert header_secrets(given) == (
        "k" * 20,
        "t" * 20,
        "session=abcdef0123456789",
        GATEWAY_TOKEN,
        "sk-live-CustomGateway0123",
        "gw-BearerToken0123",
        "acme corporation",
    )
    secrets = _settings(UPSTREAM_HEADERS=json.dumps(given)).backend_secrets
    assert {GATEWAY_TOKEN.encode(), b"sk-live-CustomGateway0123"} <= set(secrets.replies)
    public = (b"example.test", b"Application", b"org-", b"proj_")
    assert not any(word in secret for secret in secrets.replies for word in public)


def test_headers_given_as_python_values_are_checked_too() -> None:
    settings = load_settings(
        {}, dotenv_path=None, upstream_url=URL, upstream_headers={"X-Title": "  mine "}
    )
    assert settings.upstream_headers == {"X-Title": "mine"}
    with pytest.raises(ConfigError, match="'Host' is set by the HTTP client"):
        load_settings({}, dotenv_path=None, upstream_url=URL, upstream_headers={"Host": "h"})
    with pytest.raises(ConfigError, match="OPENAI_API_KEY_HEADER"):
        load_settings({}, dotenv_path=None, upstream_url=URL, api_key_header="a b")


SECRET_VALUE = "sk-DoNotShow-0123"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"UPSTREAM_HEADERS": "X-Title: mine"}, "invalid UPSTREAM_HEADERS: not JSON"),
        ({"UPSTREAM_HEADERS": '["X-Title"]'}, "expected a JSON object"),
        ({"UPSTREAM_HEADERS": '{"X-Title": 1}'}, "the value of 'X-Title' is not a JSON string"),
        ({"UPSTREAM_HEADERS": '{"X-Title": ""}'}, "the value of 'X-Title' is empty"),
        ({"UPSTREAM_HEADERS": '{"X-A": "1", "x-a": "2"}'}, "'x-a' is given twice"),
        (
            {"UPSTREAM_HEADERS": json.dumps({f"api-key: {SECRET_VALUE}": "x"})},
            "the name of header 1 is not an HTTP header name: character 8",
        ),
        (
            {"UPSTREAM_HEADERS": json.dumps({"api-key": f"{SECRET_VALUE}\r\nX-Evil: 1"})},
            "the value of 'api-key' holds a line end at character 18 (not shown)",
        ),
        (
            {"UPSTREAM_HEADERS": json.dumps({"api-key": f"{SECRET_VALUE}é"})},
            "holds a character that is not printable ASCII at character 18 (not shown)",
        ),
        ({"UPSTREAM_HEADERS": '{"Host": "h"}'}, "'Host' is set by the HTTP client"),
        ({"UPSTREAM_HEADERS": '{"content-length": "1"}'}, "set by the HTTP client"),
        ({"UPSTREAM_HEADERS": '{"Transfer-Encoding": "chunked"}'}, "set by the HTTP client"),
        ({"UPSTREAM_HEADERS": '{"Connection": "close"}'}, "a hop-by-hop header"),
        ({"UPSTREAM_HEADERS": '{"Proxy-Authorization": "x"}'}, "for a proxy on the way"),
        ({"UPSTREAM_HEADERS": '{"Content-Type": "text/plain"}'}, "set by trioproxy"),
        ({"UPSTREAM_HEADERS": '{"X-Request-ID": "1"}'}, "set by trioproxy"),
        ({"UPSTREAM_HEADERS": '{"traceparent": "1"}'}, "the client's trace context"),
        ({"UPSTREAM_HEADERS": '{"Accept-Encoding": "br"}'}, "what it decodes"),
        (
            {"UPSTREAM_HEADERS": '{"authorization": "x"}', "OPENAI_API_KEY": "sk-1"},
            "'authorization': OPENAI_API_KEY is sent in it",
        ),
        (
            {
                "UPSTREAM_HEADERS": '{"API-KEY": "x"}',
                "OPENAI_API_KEY": "sk-1",
                "OPENAI_API_KEY_HEADER": "api-key",
            },
            "'API-KEY': OPENAI_API_KEY is sent in it",
        ),
        (
            {
                "UPSTREAM_HEADERS": '{"Authorization": "x"}',
                "OPENAI_API_BASE_URL": "http://u:p@127.0.0.1:9/v1",
            },
            "the credentials in OPENAI_API_BASE_URL are sent in it",
        ),
        (
            {"UPSTREAM_HEADERS": json.dumps({f"X-{i}": "v" for i in range(33)})},
            "more than 32 headers",
        ),
        ({"UPSTREAM_HEADERS": json.dumps({"X-Big": "v" * 9000})}, "more than 8192 bytes"),
        ({"OPENAI_API_KEY_HEADER": "api key"}, "invalid OPENAI_API_KEY_HEADER: the name is not"),
        (
            {"OPENAI_API_KEY_HEADER": "Content-Type"},
            "invalid OPENAI_API_KEY_HEADER: 'Content-Type'",
        ),
        ({"OPENAI_API_KEY_HEADER": "Host"}, "invalid OPENAI_API_KEY_HEADER: 'Host'"),
    ],
)
def test_a_bad_header_setting_stops_the_program_saying_why_never_quoting_a_value(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    says: str,
) -> None:
    code, err = main_in_process(monkeypatch, capsys, **{"OPENAI_API_BASE_URL": URL, **env})
    assert code == 2
    line = one_line(err)
    assert says in line, line
    assert SECRET_VALUE not in line and "DoNotShow" not in line


def test_the_command_line_exits_2_for_a_bad_header(tmp_path: Path) -> None:
    env = base_env(OPENAI_API_BASE_URL=URL, UPSTREAM_HEADERS='{"Connection": "close"}')
    result = run_cli("--env-file", "", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "invalid UPSTREAM_HEADERS: 'Connection' is a hop-by-hop header" in result.stderr


# ---- through a proxy, with the real clients ----------------------------------------------


def _chat_events(content: str) -> bytes:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": content}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    common = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = b"".join(b"data: " + json.dumps({**common, **c}).encode() + b"\n\n" for c in chunks)
    return events + b"data: [DONE]\n\n"


def _chat_reply(content: str) -> bytes:
    message = {"role": "assistant", "content": content}
    choice = {"index": 0, "finish_reason": "stop", "message": message}
    reply = {"id": "c", "object": "chat.completion", "created": 1, "model": "m"}
    return json.dumps({**reply, "choices": [choice]}).encode()


class _Recording(ScriptedHandler):
    """An Azure-like backend that records the method, path and headers of every request."""

    seen: ClassVar[list[tuple[str, str, dict[str, str]]]] = []

    def _record(self) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.seen.append((self.command, self.path, headers))

    def do_GET(self) -> None:
        self._record()
        self.answer(200, json.dumps({"object": "list", "data": [{"id": "m"}]}).encode())

    def do_POST(self) -> None:
        self._record()
        body = self.json_body()
        if "/embeddings?" in self.path:
            vectors = [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}]
            usage = {"prompt_tokens": 1, "total_tokens": 1}
            reply = {"object": "list", "data": vectors, "model": "m", "usage": usage}
            self.answer(200, json.dumps(reply).encode())
        elif body.get("stream"):
            self.answer(200, _chat_events("ok"), "text/event-stream")
        else:
            self.answer(200, _chat_reply("ok"))


@pytest.fixture
def azure_like() -> Iterator[str]:
    """The recording backend's URL as an Azure OpenAI deployment's."""
    _Recording.seen.clear()
    with serving(_Recording) as url:
        root = url.removesuffix("/v1")
        yield f"{root}/openai/deployments/gpt?api-version=2024-10-21"


def test_the_key_and_the_extra_headers_reach_the_backend_on_every_request(
    start_proxy: StartProxy, azure_like: str
) -> None:
    proxy = start_proxy(
        azure_like,
        OPENAI_API_KEY=KEY,
        OPENAI_API_KEY_HEADER="api-key",
        UPSTREAM_HEADERS=json.dumps(EXTRA),
        MAX_RETRIES="0",
    )
    # before any client request: whatever reached the backend was the readiness check
    assert httpx.get(f"{proxy.url}/ready", timeout=10).status_code == 200
    checks = len(_Recording.seen)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="client", max_retries=0) as client:
        assert client.chat.completions.create(model="m", messages=MESSAGES).choices
        streamed = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == "ok"
        assert client.embeddings.create(model="m", input="hi").data[0].embedding == [0.5, 0.25]
    with ollama.Client(host=proxy.url) as local:
        assert local.chat(model="m", messages=MESSAGES).message.content == "ok"
        parts = local.chat(model="m", messages=MESSAGES, stream=True)
        assert "".join(part.message.content or "" for part in parts) == "ok"
        assert local.embed(model="m", input="hi").embeddings == [[0.5, 0.25]]
    seen = _Recording.seen
    assert checks >= 1 and all(
        method == "GET" and path.startswith("/openai/deployments/gpt/models?")
        for method, path, _ in seen[:checks]
    ), seen[:checks]
    paths = [path.partition("?")[0].rsplit("/", 1)[-1] for _, path, _ in seen[checks:]]
    assert paths.count("completions") == 4 and paths.count("embeddings") == 2, paths
    for method, path, headers in seen:
        assert "api-version=2024-10-21" in path
        assert headers["api-key"] == KEY, (method, path)
        assert "authorization" not in headers, (method, path)
        for name, value in EXTRA.items():
            assert headers.get(name.lower()) == value, (method, path, name)


class _Quoting(ScriptedHandler):
    """Quotes the credentials it got (the ``api-key`` and the gateway's token) in
    everything it says, and the app's title, which is no secret."""

    def _quote(self) -> str:
        gateway = self.headers.get("cf-aig-authorization", "")
        return f"key {self.headers.get('api-key')} via {gateway} for {self.headers.get('X-Title')}"

    def do_GET(self) -> None:  # the readiness check fails, quoting them
        error = {"message": f"models broken: {self._quote()}"}
        self.answer(500, json.dumps({"error": error}).encode())

    def do_POST(self) -> None:
        body = self.json_body()
        quote = self._quote()
        echo = {"x-ratelimit-echo": self.headers.get("api-key", "")}
        if body.get("model") == "refuse":
            error = {"message": f"Access denied: {quote}", "type": "invalid_request_error"}
            self.answer(401, json.dumps({"error": error}).encode(), headers=echo)
        elif body.get("stream"):
            payload = _chat_events(quote)
            cut = payload.index(KEY.encode()) + 7  # two reads, the cut inside the key
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            time.sleep(0.05)
            self.wfile.write(payload[cut:])
        else:
            self.answer(200, _chat_reply(quote), headers=echo)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_credentials_in_other_headers_are_masked_for_clients_and_scrubbed_from_the_log(
    start_proxy: StartProxy, log_format: str
) -> None:
    masked = "key *** via Bearer *** for trioproxy tests"
    with serving(_Quoting) as url:
        proxy = start_proxy(
            url,
            OPENAI_API_KEY=KEY,
            OPENAI_API_KEY_HEADER="api-key",
            UPSTREAM_HEADERS=json.dumps(EXTRA),
            MAX_RETRIES="0",
            LOG_LEVEL="DEBUG",
            LOG_FORMAT=log_format,
            READY_CHECK_INTERVAL="0.2",
        )
        shown: list[str] = []
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key="c", max_retries=0) as client:
            answer = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
            shown.append(f"{answer.headers} {answer.text}")
            assert answer.parse().choices[0].message.content == masked
            streamed = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed) == masked
            with pytest.raises(openai.AuthenticationError) as refused:
                client.chat.completions.create(model="refuse", messages=MESSAGES)
            assert refused.value.message == f"Error code: 401 - Access denied: {masked}"
            shown.append(f"{refused.value.response.headers} {refused.value.response.text}")
        with ollama.Client(host=proxy.url) as local:
            assert local.chat(model="m", messages=MESSAGES).message.content == masked
            parts = local.chat(model="m", messages=MESSAGES, stream=True)
            assert "".join(part.message.content or "" for part in parts) == masked
            with pytest.raises(ollama.ResponseError) as failed:
                local.chat(model="refuse", messages=MESSAGES)
            assert failed.value.status_code == 401
            shown.append(failed.value.error)
        time.sleep(0.5)  # a readiness check has failed by now
        ready = httpx.get(f"{proxy.url}/ready", timeout=10)
        shown.append(ready.text)
        time.sleep(0.2)  # the last log lines reach the pipe
    log = proxy.log()
    assert f"models broken: {masked}" in ready.text
    assert f"Access denied: {masked}" in log
    for secret in (KEY, GATEWAY_TOKEN):
        leaks = [text for text in shown if secret in text]
        assert not leaks, f"{secret} reached a client: {leaks[0][:400]}"
        assert secret not in log, next(line for line in log.splitlines() if secret in line)


CUSTOM = "sk-live-CustomGateway0123"  # a gateway's key in a header named as it likes
HELICONE = "sk-helicone-0123456789ab"
ECHOED = {"X-Custom-Gateway": CUSTOM, "Helicone-Auth": f"Bearer {HELICONE}", "X-Title": "mine"}


def _u_escaped(text: str) -> str:
    return "".join(f"\\u{ord(char):04x}" for char in text)


class _EchoingGateway(ScriptedHandler):
    """A gateway that echoes the headers it got: its 401 quotes them as the JSON it
    logged (a JSON document in the error's message string, its values ``\\u``-escaped,
    so escaped twice in the body); its answers and streams name them plainly."""

    def _echo(self) -> str:
        names = ("authorization", "x-custom-gateway", "helicone-auth", "x-title")
        return ", ".join(f"{name}={self.headers.get(name)}" for name in names)

    def do_GET(self) -> None:
        self.answer(200, json.dumps({"object": "list", "data": [{"id": "m"}]}).encode())

    def do_POST(self) -> None:
        body = self.json_body()
        if body.get("model") == "refuse":
            got = {name.lower(): _u_escaped(value) for name, value in self.headers.items()}
            inner = "{" + ", ".join(f'"{n}": "{v}"' for n, v in got.items()) + "}"
            error = {"message": inner, "type": "invalid_request_error"}
            self.answer(401, json.dumps({"error": error}).encode())
        elif body.get("stream"):
            self.answer(200, _chat_events(self._echo()), "text/event-stream")
        else:
            self.answer(200, _chat_reply(self._echo()))


def _readings(text: str) -> list[str]:
    """``text`` as whoever reads it may decode it: as is, percent-decoded (once or twice),
    and with JSON's ``\\u`` escapes decoded (once or twice)."""
    from urllib.parse import unquote

    def unescaped(t: str) -> str:
        return t.encode("latin-1", "backslashreplace").decode("unicode_escape", "ignore")

    return [
        text,
        unquote(text),
        unquote(unquote(text)),
        unescaped(text),
        unescaped(unescaped(text)),
    ]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_gateway_credential_in_a_header_of_any_name_never_leaks(
    start_proxy: StartProxy, log_format: str
) -> None:
    """A review: a credential in an UPSTREAM_HEADERS header whose name did not look like
    a credential's (``X-Custom-Gateway``) was relayed as a backend echoed it, and logged;
    a key JSON-escaped twice in an error body (a gateway quoting the JSON it got) went out
    as it came; a key percent-encoded in a path the access log wrote (``%2D``, written
    ``%252D`` in a path kept as sent) was logged."""
    with serving(_EchoingGateway) as url:
        proxy = start_proxy(
            url,
            OPENAI_API_KEY=KEY,
            UPSTREAM_HEADERS=json.dumps(ECHOED),
            MAX_RETRIES="0",
            LOG_LEVEL="DEBUG",
            LOG_FORMAT=log_format,
            ACCESS_LOG="true",
        )
        shown: list[str] = []
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for model, stream in (("m", False), ("m", True), ("refuse", False)):
                for path in ("/v1/chat/completions", "/api/chat"):
                    body = {"model": model, "stream": stream, "messages": MESSAGES}
                    answer = client.post(path, json=body)
                    shown.append(f"{path} {model} {stream}: {answer.headers} {answer.text}")
            # the key in paths (what comes back quotes the client's own path: not checked)
            encoded = "".join(f"%{ord(char):02X}" for char in CUSTOM)
            for path in (f"/v1/models/{encoded}", f"/v1/x%2Fy/{encoded}", f"/{encoded}"):
                assert client.get(path).status_code == 404
        time.sleep(0.2)  # the last log lines reach the pipe
    log = proxy.log()
    echoed = "authorization=Bearer ***, x-custom-gateway=***, helicone-auth=Bearer ***, "
    assert echoed + "x-title=mine" in "".join(shown)  # a public header's value is no secret
    refused = next(text for text in shown if "refuse" in text and "/v1/" in text)
    assert '\\"x-custom-gateway\\": \\"***\\"' in refused, refused  # masked whole
    assert "/v1/x%252Fy/***" in log  # the access line of a path kept as sent
    for secret in (KEY, CUSTOM, HELICONE):
        for text in (*shown, log):
            assert not any(secret in reading for reading in _readings(text)), text[:600]


def test_a_credential_in_the_backend_urls_query_is_a_secret() -> None:
    """A review: a backend URL carrying its key in the query (``?key=…``, Google's API
    keys; ``?sig=…``, an Azure SAS) had it in the startup line (``serving; backend …``)
    and in every error quoting the URL. Now such a value is a secret, as written and
    decoded; ``api-version`` stays shown."""
    url = "http://h/v1beta/openai?api-version=2024-10-21&key=AIzaSy-Secret%2Fvalue0123&sig=ab%2Bc"
    settings = load_settings({"OPENAI_API_BASE_URL": url}, dotenv_path=None)
    shown = redact_url(url)
    assert settings.backend_secrets.scrub(shown) == (
        "http://h/v1beta/openai?api-version=2024-10-21&key=***&sig=***"
    )
    assert b"AIzaSy-Secret/value0123" in settings.backend_secrets.replies
