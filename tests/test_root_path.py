"""``ROOT_PATH`` / ``--root-path``: the ``trioproxy`` command serves every route below a
mount point, as ``hypercorn --root-path`` does, for a front proxy or an ingress that
forwards the prefix instead of stripping it. The real clients reach it with the prefix in
their base URL; the container probe knocks below it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import ollama
import openai
import pytest

from trioproxy.config import ConfigError, parse_setting

from .conftest import ROOT, ServerProcess, _spawn, base_env, wait_healthy

FLAGS = ("--host", "127.0.0.1", "--port", "0", "--env-file", "")
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def mounted(demo_backend: ServerProcess) -> Iterator[ServerProcess]:
    env = base_env(OPENAI_API_BASE_URL=demo_backend.url, DEMO_TOKEN_DELAY="0")
    server = _spawn(["-m", "trioproxy", *FLAGS, "--root-path", "/llm/"], env)
    try:
        wait_healthy(server.url + "/llm")
        yield server
    finally:
        server.stop()


def test_the_clients_reach_the_proxy_below_its_mount_point(mounted: ServerProcess) -> None:
    base = mounted.url + "/llm"
    with ollama.Client(host=base) as local:
        assert local.chat(model="demo-chat", messages=HI).message.content
        assert "".join(part.message.content or "" for part in local.chat(
            model="demo-chat", messages=HI, stream=True
        ))  # fmt: skip
        assert any(model.model for model in local.list().models)
    with openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0) as chat:
        answer = chat.chat.completions.create(model="demo-chat", messages=HI)  # type: ignore[arg-type]
        assert answer.choices[0].message.content
    metrics = httpx.get(base + "/metrics", timeout=10).text
    assert 'endpoint="api_chat"' in metrics and 'endpoint="v1_chat_completions"' in metrics
    # the startup line names the base URL to give clients, the mount point included
    assert f"listening on {base}\n" in mounted.log()


def test_every_worker_serves_below_the_mount_point(demo_backend: ServerProcess) -> None:
    env = base_env(OPENAI_API_BASE_URL=demo_backend.url, ROOT_PATH="/llm")
    server = _spawn(["-m", "trioproxy", *FLAGS, "--workers", "2"], env)
    try:
        wait_healthy(server.url + "/llm")
        assert f"listening on {server.url}/llm with 2 workers" in server.log()
        for _ in range(4):  # a new connection each: both workers answer some
            reply = httpx.post(
                server.url + "/llm/api/chat",
                json={"model": "demo-chat", "messages": HI, "stream": False},
                timeout=10,
            )
            assert reply.status_code == 200, reply.text
            assert httpx.get(server.url + "/api/tags", timeout=10).status_code == 404
    finally:
        server.stop()


def test_outside_the_mount_point_is_a_404_that_names_it(mounted: ServerProcess) -> None:
    outside = httpx.post(
        mounted.url + "/api/chat", json={"model": "demo-chat", "messages": HI}, timeout=10
    )
    assert outside.status_code == 404
    assert "the proxy is served below /llm/" in outside.json()["error"]
    assert httpx.get(mounted.url + "/health", timeout=10).status_code == 404


def _probe(port: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PROXY_", "TLS_"))}
    environment.pop("ROOT_PATH", None)
    environment.update(PROXY_PORT=port, PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "trioproxy.probe"],
        cwd="/",  # no .env to read
        env=environment,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_the_container_probe_knocks_below_the_mount_point(mounted: ServerProcess) -> None:
    port = mounted.url.rsplit(":", 1)[1]
    assert _probe(port, ROOT_PATH="/llm").returncode == 0
    missed = _probe(port)  # /health is outside the mount point: 404
    assert missed.returncode == 1 and "/health" in missed.stderr


@pytest.mark.parametrize(
    ("given", "path"),
    [("/llm", "/llm"), ("/llm/", "/llm"), ("/", ""), ("", ""), ("/a/b-c", "/a/b-c")],
)
def test_a_root_path_is_read_without_its_trailing_slash(given: str, path: str) -> None:
    assert parse_setting("ROOT_PATH", given) == ("root_path", path)


@pytest.mark.parametrize("given", ["llm", "/llm?x=1", "/llm#a", "/l%2Fm", "/a//b", "/a/../b", "/ü"])
def test_a_root_path_that_no_request_path_could_match_stops_the_program(given: str) -> None:
    with pytest.raises(ConfigError, match="expected a path such as /llm"):
        parse_setting("ROOT_PATH", given)
