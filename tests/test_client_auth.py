"""Client keys (``PROXY_API_KEYS``): without one, no caller spends the backend's key.

The official clients send their key as ``Authorization: Bearer``; a refusal is a 401 in the
caller's dialect, counted in the metrics, and never quotes what was sent. Probes stay open,
and the metrics endpoints too unless ``METRICS_REQUIRE_AUTH``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from trioproxy.app import create_app
from trioproxy.auth import ClientBusy, ClientKeys, Unauthorized, client_keys, parse_keys
from trioproxy.config import ConfigError, Settings, load_settings

from .conftest import ServerProcess
from .test_metrics_e2e import scrape, total

KEY = "tp-client-key-0123456789"
OTHER_KEY = "tp-second-key-9876543210"
WRONG = "sk-a-real-key-for-somewhere-else"
StartProxy = Callable[..., ServerProcess]


# ---- the rules, without sockets ------------------------------------------------------------


def test_a_key_is_required_except_for_probes_preflights_and_open_metrics() -> None:
    keys = ClientKeys([KEY, OTHER_KEY])
    for path in ("/", "/health", "/v1/health", "/ready", "/metrics", "/v1/metrics/prometheus"):
        keys.check("GET", path, None)
    keys.check("GET", "/api/version", None)  # Open WebUI asks it without its key
    keys.check("OPTIONS", "/api/chat", None)
    assert keys.check("POST", "/api/chat", f"Bearer {KEY}") == "key-1"
    assert keys.check("POST", "/api/chat", f"bearer  {OTHER_KEY} ") == "key-2"
    refused = [None, "", KEY, f"Basic {KEY}", f"Bearer {KEY[:-1]}", f"Bearer {KEY}x", "Bearer "]
    for authorization in refused:
        with pytest.raises(Unauthorized) as info:
            keys.check("POST", "/v1/chat/completions", authorization)
        assert KEY not in info.value.message and info.value.status == 401
    closed = ClientKeys([KEY], metrics_open=False)
    closed.check("GET", "/health", None)
    with pytest.raises(Unauthorized):
        closed.check("GET", "/v1/metrics/prometheus", None)
    ClientKeys([]).check("POST", "/api/chat", None)  # no keys: the proxy is open
    limited = ClientKeys([KEY], limit=2)
    limited.enter("key-1")
    limited.enter("key-1")
    with pytest.raises(ClientBusy):
        limited.enter("key-1")
    limited.leave("key-1")
    limited.enter("key-1")  # a slot came free
    limited.leave("key-1")
    limited.leave("key-1")
    assert limited.in_flight("key-1") == 0


def test_a_key_names_its_client_or_is_named_by_its_place() -> None:
    """Nothing derived from a key is shown: the open metrics must not let anyone test a
    guess against it."""
    assert client_keys([f"team-a:{KEY}", OTHER_KEY, f" ops : {KEY}x "]) == [
        ("team-a", KEY), ("key-2", OTHER_KEY), ("ops", KEY + "x")
    ]  # fmt: skip
    # not a name before the colon: the whole entry is the key
    assert client_keys([f"no/name:{KEY}"]) == [("key-1", f"no/name:{KEY}")]
    with pytest.raises(ValueError, match="two entries are named key-1"):
        client_keys([KEY, f"key-1:{OTHER_KEY}"])  # their counts would merge
    with pytest.raises(ValueError) as info:
        client_keys(["clé-secrète"])
    assert "key-1" in str(info.value) and "secr" not in str(info.value)
    keys = ClientKeys([f"team-a:{KEY}", OTHER_KEY])
    assert keys.check("GET", "/api/tags", f"Bearer {KEY}") == "team-a"
    with pytest.raises(Unauthorized):
        keys.check("GET", "/api/tags", f"Bearer team-a:{KEY}")
    settings = Settings(api_key="sk-backend", proxy_api_keys=(f"team-a:{KEY}", OTHER_KEY))
    assert settings.secrets == ("sk-backend", KEY, OTHER_KEY)
    with pytest.raises(ConfigError, match="printable ASCII"):
        load_settings({"PROXY_API_KEYS": "ünïcode-key"}, dotenv_path=None)


def test_keys_come_from_the_environment_and_a_file(tmp_path: Path) -> None:
    assert parse_keys(f" {KEY} ,, {OTHER_KEY}\n") == (KEY, OTHER_KEY)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team keys\n{OTHER_KEY}\n\n")
    environ = {"PROXY_API_KEYS": KEY, "PROXY_API_KEYS_FILE": str(keys_file)}
    settings = load_settings(environ, dotenv_path=None)
    assert settings.proxy_api_keys == (KEY, OTHER_KEY)
    assert KEY not in repr(settings)
    with pytest.raises(ConfigError, match="METRICS_REQUIRE_AUTH"):
        load_settings({"METRICS_REQUIRE_AUTH": "true"}, dotenv_path=None)
    with pytest.raises(ConfigError, match="PROXY_API_KEYS_FILE"):
        load_settings({"PROXY_API_KEYS_FILE": str(tmp_path / "missing")}, dotenv_path=None)
    keys_file.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load_settings({"PROXY_API_KEYS_FILE": str(keys_file)}, dotenv_path=None)


async def test_under_a_mount_point_probes_stay_open(demo_backend: ServerProcess) -> None:
    settings = Settings(upstream_url=demo_backend.url, proxy_api_keys=(KEY,))
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        assert (await client.get("/llm/health", root_path="/llm")).status_code == 200
        assert (await client.get("/llm/api/tags", root_path="/llm")).status_code == 401
        body = json.dumps({"model": "demo-chat", "messages": []})
        refused = await client.post("/llm/api/chat", data=body, root_path="/llm")
        assert refused.status_code == 401
        # outside the mount point: refused in the dialect of the path as sent
        outside = await client.get("/v1/models", root_path="/llm")
        assert outside.status_code == 401
        assert (await outside.get_json())["error"]["code"] == "invalid_api_key"


# ---- real clients against a real proxy -----------------------------------------------------


@pytest.fixture(scope="module")
def guarded(start_proxy: StartProxy, demo_backend: ServerProcess) -> ServerProcess:
    return start_proxy(
        demo_backend.url,
        PROXY_API_KEYS=f"team-a:{KEY},{OTHER_KEY}",
        LOG_LEVEL="DEBUG",
        ACCESS_LOG="true",
    )


def test_openai_clients_pass_with_a_key_and_are_refused_without(guarded: ServerProcess) -> None:
    base = guarded.url + "/v1"
    with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0) as client:
        reply = client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hi [[tokens=3]]"}]
        )
        assert reply.choices[0].message.content
        chunks = list(
            client.chat.completions.create(
                model="demo-chat", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
        assert chunks and [m.id for m in client.models.list()]
    with openai.OpenAI(base_url=base, api_key=WRONG, max_retries=0) as intruder:
        with pytest.raises(openai.AuthenticationError) as info:
            intruder.chat.completions.create(
                model="demo-chat", messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.code == "invalid_api_key" and WRONG not in info.value.message
        assert info.value.type == "invalid_request_error"  # as OpenAI's own API writes it
        with pytest.raises(openai.AuthenticationError):
            intruder.models.list()
        with pytest.raises(openai.AuthenticationError):
            intruder.responses.retrieve("resp_1")


def test_ollama_clients_pass_with_a_key_and_are_refused_without(guarded: ServerProcess) -> None:
    def client(authorization: str | None = None) -> ollama.Client:
        headers = {"Authorization": authorization} if authorization else None
        return ollama.Client(host=guarded.url, timeout=30, headers=headers)

    with client(f"Bearer {OTHER_KEY}") as keyed:
        reply = keyed.chat(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
        assert reply.message.content
        assert [m.model for m in keyed.list().models]
    for authorization in (None, f"Bearer {WRONG}"):
        with client(authorization) as refused:
            with pytest.raises(ollama.ResponseError) as info:
                refused.chat(model="demo-chat", messages=[{"role": "user", "content": "hi"}])
            assert info.value.status_code == 401 and WRONG not in info.value.error
            with pytest.raises(ollama.ResponseError):
                refused.list()


def test_refusals_are_counted_and_probes_and_metrics_stay_open(guarded: ServerProcess) -> None:
    with httpx.Client(base_url=guarded.url, timeout=10) as http:
        refused = http.post("/api/chat", json={"model": "demo-chat", "messages": []})
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        # the SDKs (and Claude Code, which retries a 401 for minutes otherwise) stop at once
        assert refused.headers["x-should-retry"] == "false"
        assert set(refused.json()) == {"error"}  # Ollama's dialect
        assert http.get("/").status_code == 200
        assert http.get("/health").status_code == 200
        assert http.get("/ready").status_code == 200
        assert http.get("/api/version").json()["version"]  # asked before any key is sent
        assert http.head("/api/version").status_code == 200
        assert http.get("/api/tags").status_code == 401
        assert http.options("/api/chat").status_code != 401
    samples = scrape(guarded.url)
    assert total(samples, "http_requests_total", endpoint="api_chat", status="401") >= 1
    assert KEY not in guarded.log() and WRONG not in guarded.log()


def test_metrics_can_require_a_key_too(
    start_proxy: StartProxy, demo_backend: ServerProcess, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY + "\n")
    url = start_proxy(
        demo_backend.url, PROXY_API_KEYS_FILE=str(keys_file), METRICS_REQUIRE_AUTH="true"
    ).url
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/health").status_code == 200
        for path in ("/v1/metrics/prometheus", "/metrics", "/api/metrics"):
            assert http.get(path).status_code == 401, path
        keyed = http.get("/v1/metrics/prometheus", headers={"Authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200 and "http_requests_total" in keyed.text


def test_requests_and_tokens_are_counted_per_client(guarded: ServerProcess) -> None:
    """Each key's client (named, or by its digest) gets its requests and tokens counted;
    the access log names it too, never its key."""
    unnamed = "key-2"
    before = scrape(guarded.url)
    with httpx.Client(base_url=guarded.url, timeout=10) as http:
        for key, body in ((KEY, "a [[tokens=3]]"), (OTHER_KEY, "b [[tokens=5]]")):
            chat = {"model": "demo-chat", "messages": [{"role": "user", "content": body}]}
            keyed = {"Authorization": f"Bearer {key}"}
            reply = http.post("/v1/chat/completions", json=chat, headers=keyed)
            assert reply.status_code == 200
    after = scrape(guarded.url)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("trioproxy_client_requests_total", client="team-a") == 1
    assert grew("trioproxy_client_requests_total", client=unnamed) == 1
    assert grew("trioproxy_client_tokens_total", client="team-a", type="output") == 3
    assert grew("trioproxy_client_tokens_total", client=unnamed, type="output") == 5
    clients = httpx.get(f"{guarded.url}/v1/metrics", timeout=5).json()["clients"]
    assert set(clients) == {"team-a", unnamed} and clients["team-a"]["requests"] >= 1
    assert "client=team-a" in guarded.log() and KEY not in guarded.log()


async def test_the_access_log_names_the_client_without_metrics_too(
    demo_backend: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        upstream_url=demo_backend.url,
        proxy_api_keys=(f"team-a:{KEY}",),
        metrics_enabled=False,
        access_log=True,
    )
    app = create_app(settings)
    async with app.test_app():
        with caplog.at_level(logging.INFO, logger="trioproxy.access"):
            reply = await app.test_client().get(
                "/api/tags", headers={"Authorization": f"Bearer {KEY}"}
            )
    assert reply.status_code == 200
    assert any("client=team-a" in r.getMessage() for r in caplog.records)


def test_a_client_at_its_limit_of_requests_in_flight_waits_its_turn(
    start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    """CLIENT_MAX_CONCURRENT_REQUESTS: one client's flood cannot take every slot. Past its
    limit a client gets 429 with Retry-After, in its dialect; others are served; a stream
    holds its slot until its end."""
    url = start_proxy(
        demo_backend.url,
        PROXY_API_KEYS=f"team-a:{KEY},team-b:{OTHER_KEY}",
        CLIENT_MAX_CONCURRENT_REQUESTS="1",
    ).url
    as_a = {"Authorization": f"Bearer {KEY}"}
    as_b = {"Authorization": f"Bearer {OTHER_KEY}"}
    slow = {"model": "demo-chat", "messages": [{"role": "user", "content": "[[delay=0.05]]"}]}
    quick = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=url, timeout=10) as http:
        with http.stream(
            "POST", "/v1/chat/completions", json=slow | {"stream": True}, headers=as_a
        ) as holding:
            lines = holding.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # team-a's one slot is taken until this stream ends
            refused = http.post("/v1/chat/completions", json=quick, headers=as_a)
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            ollama_refused = http.post("/api/chat", json=quick | {"stream": False}, headers=as_a)
            assert ollama_refused.status_code == 429 and set(ollama_refused.json()) == {"error"}
            assert http.post("/v1/chat/completions", json=quick, headers=as_b).status_code == 200
            assert sum(1 for _ in lines) > 20  # the held stream was served to its end
        assert http.post("/v1/chat/completions", json=quick, headers=as_a).status_code == 200
    samples = scrape(url)
    assert total(samples, "http_requests_total", status="429") == 2
    with pytest.raises(ConfigError, match="CLIENT_MAX_CONCURRENT_REQUESTS"):
        load_settings({"CLIENT_MAX_CONCURRENT_REQUESTS": "4"}, dotenv_path=None)


def test_a_client_at_its_limit_is_served_again_as_soon_as_its_stream_ends(
    start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    """The slot was freed after the bookkeeping that follows a response: a client that
    read a stream to its end and sent its next request at once could find it taken."""
    url = start_proxy(
        demo_backend.url, PROXY_API_KEYS=f"team-a:{KEY}", CLIENT_MAX_CONCURRENT_REQUESTS="1"
    ).url
    as_a = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi [[tokens=3]]"}]}
    with httpx.Client(base_url=url, timeout=10, headers=as_a) as http:
        for _ in range(40):
            with http.stream("POST", "/v1/chat/completions", json=chat | {"stream": True}) as s:
                assert s.status_code == 200
                for _ in s.iter_lines():
                    pass
            assert http.post("/api/chat", json=chat | {"stream": False}).status_code == 200
