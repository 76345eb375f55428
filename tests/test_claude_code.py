"""Claude Code, the real CLI (``@anthropic-ai/claude-code``, pinned in
tests/claude_code/package-lock.json), in print mode against a real proxy and the demo backend.

Claude Code is what ``/v1/messages`` is for (``ANTHROPIC_BASE_URL`` pointed at an Ollama
port). Its requests are not the SDK examples': a system prompt in blocks with
``cache_control``, two dozen tools with JSON Schema 2020-12 input schemas, system messages
in the middle of the conversation, ``thinking: adaptive``, ``context_management``,
``output_config``, ``?beta=true`` on the path. These tests run it as a user would
(``claude -p PROMPT --output-format json``) and check what it reports and what the
proxy counted.

The CLI is a native binary installed with ``npm ci --ignore-scripts`` (no install script of
the package runs); without npm, or on a platform the package has no binary for, the module
is skipped. It is kept off the network: its home is a temporary directory and its
non-essential traffic (telemetry, updates) is switched off.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ServerProcess, install_lock, npm_ci
from .test_anthropic_client import _total
from .test_metrics_e2e import wait_for

PACKAGE_DIR = Path(__file__).resolve().parent / "claude_code"
NPM = shutil.which("npm")
# the package's binary for this machine (its optional dependencies, one per platform)
PLATFORM_PACKAGE = {
    ("Linux", "x86_64"): "claude-code-linux-x64",
    ("Linux", "aarch64"): "claude-code-linux-arm64",
}.get((platform.system(), platform.machine()))

if NPM is None or PLATFORM_PACKAGE is None:
    pytest.skip(
        "Claude Code's tests need npm and a Linux x64/arm64 machine",
        allow_module_level=True,
    )

LABELS = {"api": "anthropic", "endpoint": "v1_messages"}


def _installed_is_pinned() -> bool:
    """Whether the platform package installed is the version package-lock.json pins (a
    checkout whose lockfile moved on keeps the old binary otherwise)."""
    name = f"node_modules/@anthropic-ai/{PLATFORM_PACKAGE}"
    try:
        pinned = json.loads((PACKAGE_DIR / "package-lock.json").read_text())["packages"][name]
        installed = json.loads((PACKAGE_DIR / name / "package.json").read_text())
        return bool(installed["version"] == pinned["version"])
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def claude() -> Path:
    """The CLI's binary, installed from the lockfile if missing or not the version pinned."""
    binary = PACKAGE_DIR / "node_modules" / "@anthropic-ai" / str(PLATFORM_PACKAGE) / "claude"
    with install_lock(PACKAGE_DIR):
        if not binary.is_file() or not _installed_is_pinned():
            npm_ci(PACKAGE_DIR, "--ignore-scripts", timeout=600)
    assert binary.is_file(), f"npm ci installed no {binary}"
    return binary


@pytest.fixture(scope="module")
def server(demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]) -> ServerProcess:
    """A proxy of this module's own, with client keys: its metrics count only these runs."""
    return start_proxy(demo_backend.url, MAX_RETRIES="0", PROXY_API_KEYS="claude:sk-proxy-cc")


def run_claude(
    claude: Path, home: Path, url: str, prompt: str, model: str, tools: str, **auth: str
) -> dict[str, Any]:
    """``claude -p PROMPT --model MODEL --tools TOOLS`` against *url*; the JSON result it
    printed."""
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": url,
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        **auth,
    }
    done = subprocess.run(
        [str(claude), "-p", prompt, "--output-format", "json", "--model", model, "--tools", tools],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, report
    result: dict[str, Any] = json.loads(lines[-1])
    result["_report"] = report
    return result


@pytest.fixture
def ask(claude: Path, server: ServerProcess, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """``ask(prompt, model="demo-chat", tools="", **auth)``: Claude Code's result."""

    def run(prompt: str, model: str = "demo-chat", tools: str = "", **auth: str) -> dict[str, Any]:
        return run_claude(claude, tmp_path / "home", server.url, prompt, model, tools, **auth)

    return run


def test_a_tool_round_trip(ask: Callable[..., dict[str, Any]], server: ServerProcess) -> None:
    """The demo calls the one tool it is offered (Read, with arguments Claude Code refuses),
    Claude Code answers with the tool's error, the demo thanks it: two requests, two
    streams, each relayed whole."""
    completed = _total(server.url, "trioproxy_streams_total", outcome="completed", **LABELS)
    result = ask("read something", tools="Read", ANTHROPIC_AUTH_TOKEN="sk-proxy-cc")
    assert result["is_error"] is False, result["_report"]
    assert result["num_turns"] == 2, result["_report"]
    assert result["result"].startswith("Thanks! The tool returned:"), result["_report"]
    assert result["stop_reason"] == "end_turn"
    assert result["usage"]["output_tokens"] > 0 and result["usage"]["input_tokens"] > 0
    wait_for(
        lambda: (
            _total(server.url, "trioproxy_streams_total", outcome="completed", **LABELS)
            == completed + 2
        )
    )


def test_text_with_the_key_as_x_api_key(ask: Callable[..., dict[str, Any]]) -> None:
    result = ask("hello [[tokens=6]]", ANTHROPIC_API_KEY="sk-proxy-cc")
    assert result["is_error"] is False, result["_report"]
    assert result["result"] == "Hello from the trioproxy demo backend!", result["_report"]
    assert result["usage"]["output_tokens"] == 6


def test_what_claude_code_reports_for_refusals(ask: Callable[..., dict[str, Any]]) -> None:
    """A wrong key and a model the backend does not serve reach Claude Code as the
    statuses it explains to its user (not as a broken stream)."""
    wrong_key = ask("hello", ANTHROPIC_AUTH_TOKEN="sk-wrong")
    assert wrong_key["is_error"] is True
    assert wrong_key["api_error_status"] == 401, wrong_key["_report"]
    unknown = ask("hello", "no-such-model", ANTHROPIC_AUTH_TOKEN="sk-proxy-cc")
    assert unknown["is_error"] is True
    assert unknown["api_error_status"] == 404, unknown["_report"]
    assert "no-such-model" in unknown["result"]


def test_a_stream_started_with_pings_before_message_start(
    claude: Path,
    demo_backend: ServerProcess,
    start_proxy: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    """STREAM_KEEPALIVE_SECONDS and a model slow to its first token: the response starts
    with Anthropic's pings, before message_start (which comes with the first block).
    Anthropic's API sends its first ping after the first content_block_start, but its
    documented flow allows pings anywhere, and Claude Code (its SDK drops pings before
    they reach its accumulator, as the Python SDK does) reads the answer whole."""
    proxy = start_proxy(demo_backend.url, MAX_RETRIES="0", STREAM_KEEPALIVE_SECONDS="0.2")
    prompt = "hello [[tokens=6]] [[first_delay=1]]"
    body = {"model": "demo-chat", "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    with httpx.stream("POST", f"{proxy.url}/v1/messages", json=body, timeout=10) as response:
        names = [line for line in response.iter_lines() if line.startswith("event:")]
    start = names.index("event: message_start")
    assert start >= 1 and set(names[:start]) == {"event: ping"}, names
    home = tmp_path / "home"
    result = run_claude(
        claude, home, proxy.url, prompt, "demo-chat", "", ANTHROPIC_AUTH_TOKEN="any"
    )
    assert result["is_error"] is False, result["_report"]
    assert result["result"] == "Hello from the trioproxy demo backend!", result["_report"]
    assert result["usage"]["output_tokens"] == 6
