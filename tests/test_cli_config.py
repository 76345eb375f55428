"""The command line and configuration, as a user meets them: real subprocesses.

``python -m trioproxy`` / the ``trioproxy`` console script / ``hypercorn ... create_app()``,
configured by flags, the environment and a ``.env`` file; startup errors; and the upstream API
key never leaking into a response or a log line.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from trioproxy import __version__
from trioproxy.config import (
    ENV_NAMES,
    ConfigError,
    basic_credential,
    load_settings,
    redact_url,
    url_credentials,
)

from .conftest import ROOT, ServerProcess, base_env, closed_port_url, wait_healthy
from .fakes import QuietHTTPServer, socks5_proxy

StartProxy = Callable[..., ServerProcess]
BIN = Path(sys.executable).parent
SECRET = "sk-secret-XYZ123"


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, program: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = program or [sys.executable, "-m", "trioproxy"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=env if env is not None else base_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def main_in_process(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
    **env: str,
) -> tuple[int, str]:
    """``trioproxy.cli.main`` in this process (fast) for settings that fail validation, which
    happens before anything is served; returns (exit code, stderr). Settings that pass
    fail the test at once rather than serve."""
    from trioproxy import cli

    def must_not_serve(settings: object) -> None:
        raise AssertionError(f"accepted, would serve: {settings!r}")

    monkeypatch.setattr(cli, "_run", must_not_serve)
    for name in list(os.environ):
        if name.startswith(("OPENAI_", "PROXY_", "TRIOPROXY_")) or name in ENV_NAMES:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = cli.main(["--env-file", "", *args])
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def one_line(stderr: str) -> str:
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, f"expected exactly one line on stderr, got: {stderr!r}"
    return lines[0]


def chat(url: str, text: str = "hi [[tokens=3]]", **extra: object) -> httpx.Response:
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": text}], **extra}
    return httpx.post(url + "/api/chat", json={"stream": False, **body}, timeout=10)


# ---- startup errors ------------------------------------------------------------------------


@pytest.mark.parametrize("program", ["module", "console-script"])
def test_no_upstream_exits_2_with_one_line(tmp_path: Path, program: str) -> None:
    command = [str(BIN / "trioproxy")] if program == "console-script" else None
    result = run_cli("--env-file", "", cwd=tmp_path, program=command)
    assert result.returncode == 2
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert "OPENAI_API_BASE_URL" in line
    assert "--demo" in line


def test_empty_upstream_is_like_none(tmp_path: Path) -> None:
    result = run_cli(cwd=tmp_path, env=base_env(OPENAI_API_BASE_URL=""))
    assert result.returncode == 2
    assert "OPENAI_API_BASE_URL" in one_line(result.stderr)


def test_bad_upstream_url_subprocess(tmp_path: Path) -> None:
    url = "ftp://example.com/v1"
    result = run_cli(cwd=tmp_path, env=base_env(OPENAI_API_BASE_URL=url))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "OPENAI_API_BASE_URL" in line and url in line


@pytest.mark.parametrize(
    "url", ["ftp://example.com/v1", "not a url", "http://", "http://127.0.0.1:99999/v1"]
)
def test_bad_upstream_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    code, err = main_in_process(monkeypatch, capsys, OPENAI_API_BASE_URL=url)
    assert code == 2
    line = one_line(err)
    assert "OPENAI_API_BASE_URL" in line and url in line
    # the same through the flag
    code, err = main_in_process(monkeypatch, capsys, "--upstream", url)
    assert code == 2
    assert url in one_line(err)


def test_bad_mapping_file_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    env = base_env(OPENAI_API_BASE_URL="http://127.0.0.1:1/v1", MODEL_MAPPING_FILE=str(path))
    result = run_cli(cwd=tmp_path, env=env)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "MODEL_MAPPING_FILE" in line and str(path) in line


@pytest.mark.parametrize("problem", ["missing", "directory", "not-json", "not-object", "bad-value"])
def test_bad_mapping_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    problem: str,
) -> None:
    path = tmp_path / "mapping.json"
    if problem == "directory":
        path.mkdir()
    elif problem == "not-json":
        path.write_text("{llama3: demo-chat")
    elif problem == "not-object":
        path.write_text('["llama3"]')
    elif problem == "bad-value":
        path.write_text('{"llama3": 3}')
    code, err = main_in_process(
        monkeypatch,
        capsys,
        OPENAI_API_BASE_URL="http://127.0.0.1:1/v1",
        MODEL_MAPPING_FILE=str(path),
    )
    assert code == 2
    line = one_line(err)
    assert "MODEL_MAPPING_FILE" in line and str(path) in line


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_RETRIES", "-1"),
        ("MAX_RETRIES", "many"),
        ("MAX_RETRIES", "11"),
        # a typo's extra zeros: a clear refusal, not a fork bomb or gigabytes preallocated
        ("WORKERS", "100000"),
        ("METRICS_MAX_REQUESTS", "1000000000000"),
        ("UPSTREAM_CLIENTS", "1000000"),
        ("METRICS_MODEL_LABELS", "100000"),
        ("REQUEST_TIMEOUT", "0"),
        ("STREAM_IDLE_TIMEOUT", "abc"),
        ("PROXY_PORT", "99999"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_REPEAT_WINDOW_SECONDS", "-1"),
        ("LOG_REPEAT_WINDOW_SECONDS", "10s"),
        ("LOG_REPEAT_WINDOW_SECONDS", "nan"),
        ("LOG_REPEAT_WINDOW_SECONDS", "86400"),  # a count held back for a day
        ("MAX_REQUEST_BYTES", "0"),
        ("RETRY_BACKOFF", "-1"),
        ("RETRY_BACKOFF_MAX", "inf"),
        ("DEMO_TOKEN_DELAY", "-0.1"),
        ("HEALTH_ERROR_RATE_DEGRADED", "abc"),
        ("HEALTH_ERROR_RATE_UNHEALTHY", "1.5"),
        ("HEALTH_P95_DEGRADED_SECONDS", "-1"),
        ("HEALTH_MIN_REQUESTS", "0"),
        ("THINK_OFF_EXTRA_BODY", "{chat_template_kwargs: 1}"),  # not JSON
        ("THINK_OFF_EXTRA_BODY", '["reasoning_effort", "minimal"]'),  # no object
        ("THINK_ON_EXTRA_BODY", '{"stream": false}'),  # the proxy's own field
        ("THINK_ON_EXTRA_BODY", '{"model": "other"}'),
        ("THINK_OFF_EXTRA_BODY", '{"temperature": NaN}'),  # Python's, not JSON: sent as null
        ("THINK_OFF_EXTRA_BODY", '{"x": -Infinity}'),
        ("THINK_OFF_EXTRA_BODY", '{"a": ' * 600 + "1" + "}" * 600),  # a 500 on every request
    ],
)
def test_invalid_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    code, err = main_in_process(
        monkeypatch, capsys, OPENAI_API_BASE_URL="http://127.0.0.1:1/v1", **{name: value}
    )
    assert code == 2
    assert name in one_line(err)


def test_think_extra_bodies_are_json_objects_checked_however_given() -> None:
    settings = load_settings(
        {
            "THINK_OFF_EXTRA_BODY": ' {"chat_template_kwargs": {"enable_thinking": false}} ',
            "THINK_ON_EXTRA_BODY": "",
        },
        dotenv_path=None,
    )
    assert settings.think_off_extra_body == {"chat_template_kwargs": {"enable_thinking": False}}
    assert settings.think_on_extra_body == {}
    with pytest.raises(ConfigError, match="THINK_ON_EXTRA_BODY: messages"):
        load_settings({}, dotenv_path=None, think_on_extra_body={"messages": []})
    with pytest.raises(ConfigError, match="THINK_OFF_EXTRA_BODY: expected a JSON object"):
        load_settings({}, dotenv_path=None, think_off_extra_body=["x"])
    for odd in ({"t": math.nan}, {"at": {1: "x"}}, {"when": object()}, {"deep": _nested(40)}):
        with pytest.raises(ConfigError, match="THINK_OFF_EXTRA_BODY: "):
            load_settings({}, dotenv_path=None, think_off_extra_body=odd)
    fine = {"deep": _nested(30), "list": [1, 2.5, True, None, "x"]}
    assert load_settings({}, dotenv_path=None, think_off_extra_body=fine).think_off_extra_body
    # 32 levels of objects as documented; a value inside the last one is no level (a
    # review: it was counted, so 32 objects were refused)
    thirty_two: Any = 1
    for _ in range(32):
        thirty_two = {"a": thirty_two}
    assert load_settings({}, dotenv_path=None, think_off_extra_body=thirty_two)
    with pytest.raises(ConfigError, match="deeper than 32 levels"):
        load_settings({}, dotenv_path=None, think_off_extra_body={"a": thirty_two})
    with pytest.raises(ConfigError, match="deeper than 32 levels"):
        load_settings({}, dotenv_path=None, think_off_extra_body={"a": [thirty_two["a"]]})


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_a_ca_bundle_that_does_not_load_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """It failed the app's start after the proxy said it listens: a traceback that never
    named the variable, and with --workers a restart loop for a supervisor."""
    for bundle in (tmp_path / "missing.pem", tmp_path / "not-pem.pem"):
        if bundle.name == "not-pem.pem":
            bundle.write_text("no certificate here\n")
        line = _refused_at_start(monkeypatch, capsys, SSL_CERT_FILE=str(bundle))
        assert f"SSL_CERT_FILE={bundle}" in line


def test_a_proxy_url_httpx_cannot_use_is_one_line_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _refused_at_start(monkeypatch, capsys, ALL_PROXY="ftp://user:hunter2pw@proxy.example:21")
    assert "ALL_PROXY (ftp://...)" in line and "http://, https://, socks5://" in line
    assert "hunter2pw" not in line
    # a password with an unencoded "/" breaks the URL where a redaction would miss it:
    # httpx's InvalidURL quoted it, in a traceback
    line = _refused_at_start(
        monkeypatch, capsys, https_proxy="http://admin:Sup3rS3cret/x9@proxy.example:3128"
    )
    assert "https_proxy (http://...)" in line and "does not parse" in line
    assert "Sup3rS3cret" not in line
    # written without a scheme (curl's way), the whole URL read as one
    line = _refused_at_start(monkeypatch, capsys, HTTP_PROXY="alice:pa/ss@127.0.0.1:3128")
    assert "HTTP_PROXY (no scheme)" in line and "pa/ss" not in line


def _refused_at_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], **env: str
) -> str:
    """The one line of a start refused for ``env`` (exit 2); stderr holds nothing else."""
    code, err = main_in_process(
        monkeypatch, capsys, OPENAI_API_BASE_URL="http://127.0.0.1:1/v1", **env
    )
    assert code == 2
    return one_line(err)


def test_a_socks_proxy_in_the_environment_is_used(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    """ALL_PROXY=socks5://... (an SSH tunnel's, often set shell-wide) stopped the proxy at
    its start: httpx needs socksio for it."""
    with socks5_proxy() as (url, targets):
        proxy = start_proxy(demo_backend.url, ALL_PROXY=url, NO_PROXY="")
        body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}
        reply = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 200
        backend_port = int(demo_backend.url.rsplit(":", 1)[1].split("/")[0])
        assert ("127.0.0.1", backend_port) in targets


def test_a_proxy_that_cannot_be_reached_is_named_as_the_proxy(
    demo_backend: ServerProcess, start_proxy: StartProxy
) -> None:
    """The failure to connect named the proxy's address as if it were the backend's."""
    dead = closed_port_url().removesuffix("/v1").replace("http://", "http://scout:Hunt3rPw@")
    proxy = start_proxy(demo_backend.url, HTTP_PROXY=dead, NO_PROXY="", MAX_RETRIES="0")
    body = {"model": "demo-chat", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(proxy.url + "/api/chat", json=body, timeout=30)
    assert answer.status_code == 502
    error = answer.json()["error"]
    shown = dead.replace("scout:Hunt3rPw", "***")
    assert error.endswith(f"(connecting through the proxy {shown} from the environment)")
    assert "Hunt3rPw" not in error


def test_degraded_error_rate_above_unhealthy_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = main_in_process(
        monkeypatch,
        capsys,
        OPENAI_API_BASE_URL="http://127.0.0.1:1/v1",
        HEALTH_ERROR_RATE_DEGRADED="0.5",
        HEALTH_ERROR_RATE_UNHEALTHY="0.2",
    )
    assert code == 2
    assert "HEALTH_ERROR_RATE_DEGRADED" in one_line(err)


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--port", "70000", "--port"),
        ("--port", "-5", "--port"),
        ("--port", "eighty", "--port"),
        ("--log-level", "verbose", "--log-level"),
        ("--workers", "0", "--workers"),
        ("--workers", "many", "--workers"),
        ("--host", "", "--host"),
        ("--host", "  ", "--host"),
        ("--upstream", "ftp://example.com/v1", "OPENAI_API_BASE_URL"),
    ],
)
def test_flags_are_checked_like_their_environment_variables(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flag: str,
    value: str,
    named: str,
) -> None:
    """A flag's value goes through the parser of the variable it stands for: exit 2 and
    one line naming the flag, never a traceback (--port 70000 was an OverflowError)."""
    code, err = main_in_process(
        monkeypatch, capsys, flag, value, OPENAI_API_BASE_URL="http://127.0.0.1:1/v1"
    )
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"trioproxy: error: invalid {named}"), line


def test_flag_values_are_normalised_like_the_environment(tmp_path: Path) -> None:
    from trioproxy import cli

    args = cli.build_parser().parse_args(
        ["--port", "0", "--log-level", "debug", "--workers", "2", "--host", " ::1 ",
         "--upstream", "http://127.0.0.1:1", "--env-file", ""]
    )  # fmt: skip
    settings = cli.settings_from_args(args)
    assert (settings.port, settings.log_level, settings.workers) == (0, "DEBUG", 2)
    assert (settings.host, settings.upstream_url) == ("::1", "http://127.0.0.1:1/v1")


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_proxy_host_is_refused_not_every_interface(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """The socket API reads an empty address as every interface: a template variable left
    empty would quietly serve an open proxy to the network."""
    code, err = main_in_process(
        monkeypatch, capsys, OPENAI_API_BASE_URL="http://127.0.0.1:1/v1", PROXY_HOST=value
    )
    assert code == 2
    assert one_line(err).startswith("trioproxy: error: invalid PROXY_HOST: empty")
    with pytest.raises(ConfigError, match="PROXY_HOST"):
        load_settings({}, dotenv_path=None, host=value)  # given already parsed, too
    assert load_settings({}, dotenv_path=None).host == "127.0.0.1"  # unset: loopback


@pytest.mark.parametrize("problem", ["missing", "directory"])
def test_an_env_file_named_on_the_command_line_must_exist(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    problem: str,
) -> None:
    """A mistyped path must not silently drop what the file says (PROXY_API_KEYS, say)."""
    path = tmp_path / "proxy.env"
    if problem == "directory":
        path.mkdir()
    code, err = main_in_process(
        monkeypatch, capsys, "--env-file", str(path), OPENAI_API_BASE_URL="http://127.0.0.1:1/v1"
    )
    assert code == 2
    line = one_line(err)
    assert "env file" in line and str(path) in line
    assert "--env-file ''" in line  # how to say "none"


@pytest.mark.parametrize(
    "line",
    [
        "PROXY_API_KEYS: sk-client-secret",
        'PROXY_API_KEYS="sk-client',
        "PROXY_API_KEYS",  # a review: the key of an earlier line (sk-client-...) dropped
        "PROXY_API_KEYS=${TRIOPROXY_TEST_UNSET_VARIABLE}",  # expands to "": no keys
    ],
)
def test_an_env_file_line_that_is_no_setting_stops_the_program(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    line: str,
) -> None:
    """A review: dotenv skipped such a line with a plain-text warning (in a JSON log), and
    the proxy served without the client keys it held."""
    path = tmp_path / "proxy.env"
    path.write_text(f"PROXY_API_KEYS=sk-client-key-1\nLOG_FORMAT=json\n{line}\nOTHER_TOOL\n")
    code, err = main_in_process(
        monkeypatch, capsys, "--env-file", str(path), OPENAI_API_BASE_URL="http://127.0.0.1:1/v1"
    )
    assert code == 2
    message = one_line(err)
    assert "line 3" in message and str(path) in message and "sk-client" not in message


def test_an_empty_expansion_stops_the_program_only_if_the_file_gives_the_setting(
    tmp_path: Path,
) -> None:
    """A review: PROXY_API_KEYS=${UNSET} in a template .env stopped a proxy whose
    environment gave the keys (the environment wins over the file), and an empty default
    said on purpose (${KEY:-}) was refused."""
    path = tmp_path / ".env"
    path.write_text(
        "PROXY_API_KEYS=${TRIOPROXY_TEST_UNSET}\nOPENAI_API_KEY=${TRIOPROXY_TEST_UNSET:-}\n"
        "OPENAI_API_BASE_URL=http://127.0.0.1:1/v1\n"
    )
    with pytest.raises(ConfigError, match=r"PROXY_API_KEYS from a variable .* \(line 1\)"):
        load_settings({}, dotenv_path=path)
    rescued = load_settings({"PROXY_API_KEYS": "sk-from-the-environment"}, dotenv_path=path)
    assert rescued.proxy_api_keys and not rescued.api_key


def test_an_env_file_named_by_trioproxy_env_file_must_exist(tmp_path: Path) -> None:
    """``create_app()`` under plain hypercorn (and in the workers) reads TRIOPROXY_ENV_FILE."""
    path = tmp_path / "typo.env"
    env = base_env(OPENAI_API_BASE_URL="http://127.0.0.1:1/v1", TRIOPROXY_ENV_FILE=str(path))
    result = subprocess.run(
        [sys.executable, "-c", "from trioproxy.app import create_app; create_app()"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    assert f"ConfigError: cannot read the env file {str(path)!r}" in result.stderr


def test_env_file_empty_reads_none_and_a_missing_default_is_fine(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("OPENAI_API_BASE_URL=http://127.0.0.1:1/v1\n")
    result = run_cli("--env-file", "", cwd=tmp_path)
    assert result.returncode == 2
    assert "no backend configured" in one_line(result.stderr)  # the .env was not read
    (tmp_path / ".env").unlink()
    (tmp_path / ".env").mkdir()  # a virtualenv named .env is no env file
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2
    assert "no backend configured" in one_line(result.stderr)


def test_a_startup_error_is_a_json_line_when_json_is_asked_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = main_in_process(monkeypatch, capsys, "--port", "99999", LOG_FORMAT="json")
    assert code == 2
    entry = json.loads(one_line(err))
    assert entry["level"] == "ERROR" and entry["logger"] == "trioproxy"
    assert entry["message"].startswith("invalid --port")


@pytest.mark.parametrize(
    ("url", "shown", "secrets"),
    [
        ("http://user:s3cretpw@127.0.0.1:8000/v1", "http://***@127.0.0.1:8000/v1", ("s3cretpw",)),
        ("https://tok%40en99@host/v1", "https://***@host/v1", ("tok%40en99", "tok@en99")),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1", ()),
        ("not a url", "not a url", ()),
    ],
)
def test_backend_url_credentials_are_masked(url: str, shown: str, secrets: tuple[str]) -> None:
    assert redact_url(url) == shown
    assert url_credentials(url) == secrets


def test_backend_url_credentials_never_reach_an_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "http://user:s3cretpw@127.0.0.1:99999/v1"
    code, err = main_in_process(monkeypatch, capsys, OPENAI_API_BASE_URL=url)
    assert code == 2
    line = one_line(err)
    assert "s3cretpw" not in line and "http://***@127.0.0.1:99999/v1" in line


@pytest.mark.parametrize(
    "url",
    [
        "http://svcuser:Pa55/w0rd@127.0.0.1:26100/v1",  # "Pa55" read as a bad port
        "http://svcuser:Pa55#w0rd@127.0.0.1:26100/v1",
        "http://svcuser:Pa55?w0rd@127.0.0.1:26100/v1",
        "http://svcuser:8080/w0rd@127.0.0.1:26100/v1",  # a valid URL to host svcuser
        "http://127.0.0.1:26100/v1/w0rd@x",  # ambiguous with the one above: "@" is %40
    ],
)
def test_a_password_with_an_unencoded_delimiter_is_never_shown(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    """The userinfo ends, by the RFC, at the first "/", "?" or "#": the password's rest was
    printed in the error (and, with "8080/...", in the "serving; backend" line of a proxy
    asking host "svcuser")."""
    assert "w0rd" not in redact_url(url)
    code, err = main_in_process(monkeypatch, capsys, OPENAI_API_BASE_URL=url)
    assert code == 2
    line = one_line(err)
    assert "invalid OPENAI_API_BASE_URL (not shown): an '@' after the host" in line
    assert "%2F" in line and "w0rd" not in line and "Pa55" not in line
    if "Pa55/" in url:  # encoded, it is a password like any other
        encoded = load_settings({"OPENAI_API_BASE_URL": url.replace("Pa55/", "Pa55%2F")}, None)
        assert basic_credential(encoded.upstream_url or "") == "c3ZjdXNlcjpQYTU1L3cwcmQ="


def test_backend_url_credentials_never_reach_the_log(demo_backend: ServerProcess) -> None:
    from .conftest import _spawn

    upstream = demo_backend.url.replace("http://", "http://user:s3cretpw@")
    server = _spawn(
        ["-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", "--env-file", "",
         "--upstream", upstream],
        base_env(LOG_LEVEL="DEBUG", MAX_RETRIES="0"),
    )  # fmt: skip
    try:
        wait_healthy(server.url)
        assert chat(server.url).status_code == 200
        assert chat(server.url, "[[status=500]]").status_code == 500
    finally:
        server.stop()
    log = server.log()
    assert "serving; backend http://***@127.0.0.1:" in log
    assert "s3cretpw" not in log


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("sk-backend-SECRET\n0123456789", "a line end at character 18"),
        ("sk-backend-SECRET\r\n", None),  # a CRLF file's line end is only trimmed
        ("sk-backend-SECRET\t0123456789", "a control character at character 18"),
        ("sk-backend-SECRETé0123456789", "a non-ASCII character at character 18"),
    ],
)
def test_a_backend_key_no_http_header_can_hold_stops_the_program(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], key: str, kind: str | None
) -> None:
    """h11 refused such a key in the header at the first request and quoted it escaped
    (past the scrubbing) to every client, /ready and the log; httpx could not encode a
    non-ASCII one and the proxy crashed after saying it listened. Refused before serving,
    without quoting it."""
    url = "http://127.0.0.1:9/v1"
    if kind is None:
        assert load_settings({"OPENAI_API_KEY": key}, dotenv_path=None).api_key == key.strip()
        return
    code, err = main_in_process(monkeypatch, capsys, OPENAI_API_BASE_URL=url, OPENAI_API_KEY=key)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"trioproxy: error: invalid OPENAI_API_KEY: {kind} (not shown)")
    assert "SECRET" not in line and "0123" not in line
    with pytest.raises(ConfigError, match=kind):  # given already parsed (create_app(...))
        load_settings({}, dotenv_path=None, upstream_url=url, api_key=key)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line(tmp_path: Path, workers: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "--port", str(port), "--workers", workers, "--upstream", "http://127.0.0.1:1/v1",
            "--env-file", "", cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"trioproxy: error: cannot listen on 127.0.0.1:{port}")


def test_version(tmp_path: Path) -> None:
    for command in ([str(BIN / "trioproxy")], [sys.executable, "-m", "trioproxy"]):
        result = run_cli("--version", cwd=tmp_path, program=command)
        assert result.returncode == 0
        assert result.stdout.strip() == f"trioproxy {__version__}"


def test_help_lists_the_flags(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--workers", "--upstream", "--demo", "--env-file"):
        assert flag in result.stdout


# ---- serving -------------------------------------------------------------------------------


def test_demo_mode_serves(start_proxy: StartProxy) -> None:
    server = start_proxy(None, "--demo", DEMO_TOKEN_DELAY="0.001")
    assert "demo backend at http://127.0.0.1:" in server.log()
    reply = chat(server.url)
    assert reply.status_code == 200, reply.text
    assert reply.json()["message"]["content"] == "Hello from the"
    streamed = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert streamed.json()["choices"][0]["message"]["content"].startswith("Hello")
    names = [m["name"] for m in httpx.get(server.url + "/api/tags").json()["models"]]
    assert {"demo-chat:latest", "demo-embed:latest"} <= set(names)
    embed = httpx.post(server.url + "/api/embed", json={"model": "demo-embed", "input": "x"})
    assert len(embed.json()["embeddings"][0]) == 8


def test_env_file_is_read(
    tmp_path: Path, start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    env_file = tmp_path / "proxy.env"
    env_file.write_text(f"# comment\nOPENAI_API_BASE_URL={demo_backend.url}\nMAX_RETRIES=0\n")
    server = start_proxy(None, "--env-file", str(env_file))
    assert chat(server.url).status_code == 200
    # MAX_RETRIES=0 from the file: a backend 503 comes straight back after one attempt
    assert chat(server.url, f"[[fail_first=1]] {time.time()}").status_code == 503


def test_health_thresholds_come_from_the_env_file(
    tmp_path: Path, start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    env_file = tmp_path / "proxy.env"
    env_file.write_text(
        f"OPENAI_API_BASE_URL={demo_backend.url}\n"
        "HEALTH_ERROR_RATE_DEGRADED=0.01\nHEALTH_MIN_REQUESTS=3\n"
    )
    server = start_proxy(None, "--env-file", str(env_file))
    thresholds = httpx.get(server.url + "/v1/metrics/health", timeout=5).json()["thresholds"]
    assert thresholds["error_rate_degraded"] == 0.01
    assert thresholds["min_requests"] == 3
    assert thresholds["error_rate_unhealthy"] == 0.25  # not in the file: the default


def test_workers_read_the_env_file_and_report_the_real_port(
    tmp_path: Path, demo_backend: ServerProcess
) -> None:
    from .conftest import _spawn

    env_file = tmp_path / "workers.env"
    env_file.write_text(
        f"OPENAI_API_BASE_URL={demo_backend.url}\nMETRICS_MAX_REQUESTS=7\nHEALTH_MIN_REQUESTS=3\n"
    )
    server = _spawn(
        [
            "-m", "trioproxy", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
            "--env-file", str(env_file),
        ],
        base_env(),
    )  # fmt: skip
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.url)
        assert not server.url.endswith(":0")
        wait_healthy(server.url, timeout=30)
        for _ in range(10):  # fresh connections, so both workers are likely asked
            with httpx.Client(timeout=5, headers={"Connection": "close"}) as client:
                window = client.get(server.url + "/v1/metrics").json()["window"]
                health = client.get(server.url + "/v1/metrics/health").json()
            assert window["max_size"] == 7
            assert health["thresholds"]["min_requests"] == 3
    finally:
        server.stop()


def test_precedence_flag_over_env_over_env_file(
    tmp_path: Path, start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    env_file = tmp_path / "proxy.env"
    env_file.write_text(f"OPENAI_API_BASE_URL={closed_port_url()}\n")
    # the environment beats the file
    server = start_proxy(demo_backend.url, "--env-file", str(env_file))
    assert chat(server.url).status_code == 200
    # the flag beats the environment
    server = start_proxy(closed_port_url(), "--upstream", demo_backend.url)
    assert chat(server.url).status_code == 200


def _spawn_in(cwd: Path, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start ``args`` in *cwd*; return the process and the first URL it reports."""
    process = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    found: list[str] = []
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"(?:listening on|Running on) (http://[0-9.]+:\d+)", line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(20) or not found:
        process.kill()
        process.wait()
        raise AssertionError(f"{args} did not start: {''.join(lines)}")
    return process, found[0]


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def test_dotenv_in_working_directory_and_proxy_port(
    tmp_path: Path, demo_backend: ServerProcess
) -> None:
    """Without --env-file, ``.env`` in the working directory is read (PROXY_PORT included)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / ".env").write_text(
        f"OPENAI_API_BASE_URL={demo_backend.url}\nPROXY_HOST=127.0.0.1\nPROXY_PORT={port}\n"
    )
    process, url = _spawn_in(tmp_path, [sys.executable, "-m", "trioproxy"], base_env())
    try:
        assert url == f"http://127.0.0.1:{port}"
        wait_healthy(url)
        assert chat(url).status_code == 200
    finally:
        _stop(process)


def test_hypercorn_serves_create_app(tmp_path: Path, demo_backend: ServerProcess) -> None:
    env = base_env(OPENAI_API_BASE_URL=demo_backend.url)
    command = [
        str(BIN / "hypercorn"),
        "--worker-class", "trio",
        "--bind", "127.0.0.1:0",
        "trioproxy.app:create_app()",
    ]  # fmt: skip
    process, url = _spawn_in(ROOT, command, env)
    try:
        wait_healthy(url)
        assert httpx.get(url + "/").text == "Ollama is running"
        reply = chat(url)
        assert reply.status_code == 200, reply.text
        assert reply.json()["message"]["content"] == "Hello from the"
        stream = httpx.post(
            url + "/api/chat",
            json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert stream.headers["content-type"] == "application/x-ndjson"
        assert json.loads(stream.text.splitlines()[-1])["done"] is True
    finally:
        _stop(process)


def test_hypercorn_without_upstream_says_what_to_set(tmp_path: Path) -> None:
    command = [str(BIN / "hypercorn"), "--worker-class", "trio", "trioproxy.app:create_app()"]
    result = subprocess.run(
        command, cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=30
    )
    # hypercorn itself exits 0 when the app factory raises (its choice, not ours); what the
    # user needs is the message naming the setting, and no server left running.
    assert "OPENAI_API_BASE_URL" in result.stdout + result.stderr
    assert "ConfigError: no backend configured" in result.stdout + result.stderr


# ---- the API key never leaks ---------------------------------------------------------------


class _EchoingBackend(BaseHTTPRequestHandler):
    """A hostile backend that puts the caller's bearer token in everything it says."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_in_two(self, payload: bytes, cut: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[:cut])
        time.sleep(0.05)  # the proxy reads the first part on its own
        self.wfile.write(payload[cut:])

    def _key(self) -> str:
        return self.headers.get("Authorization", "").removeprefix("Bearer ")

    def do_GET(self) -> None:
        message = f"Incorrect API key provided: {self._key()}"
        self._send(401, json.dumps({"error": {"message": message, "type": "auth"}}).encode())

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        if b"plain-text" in body:
            self._send(500, f"upstream crashed, key={self._key()}".encode(), "text/plain")
        elif b"echo-key" in body:  # a success that quotes the key in the generated text
            text = f"key={self._key()}"
            if json.loads(body).get("stream"):
                chunk = {"choices": [{"index": 0, "delta": {"content": text}}]}
                payload = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode()
                if b"echo-key-split" in body:  # two writes, the cut inside the key
                    self._send_in_two(payload, payload.index(b"key=") + 4 + len(self._key()) // 2)
                else:
                    self._send(200, payload, "text/event-stream")
            else:
                message = {"role": "assistant", "content": text}
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                self._send(
                    200, json.dumps({"object": "chat.completion", "choices": [choice]}).encode()
                )
        elif b"mid-stream" in body:
            chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
            error = {"error": {"message": f"key {self._key()} was revoked", "type": "auth"}}
            payload = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:
            message = f"Incorrect API key provided: {self._key()}"
            error = {"error": {"message": message, "type": "invalid_request_error"}}
            self._send(401, json.dumps(error).encode())


@pytest.fixture(scope="module")
def echoing_backend() -> Iterator[str]:
    server = QuietHTTPServer(("127.0.0.1", 0), _EchoingBackend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _exercise(url: str, texts: list[str]) -> list[str]:
    """Every kind of request on both dialects; returns everything the client saw."""
    seen: list[str] = []
    with httpx.Client(base_url=url, timeout=20) as client:
        for text in texts:
            messages = [{"role": "user", "content": text}]
            for stream in (False, True):
                body = {"model": "demo-chat", "messages": messages, "stream": stream}
                for path in ("/api/chat", "/v1/chat/completions"):
                    response = client.post(path, json=body)
                    seen.append(str(response.headers) + response.text)
            response = client.post("/api/generate", json={"model": "demo-chat", "prompt": text})
            seen.append(str(response.headers) + response.text)
        for method, path, payload in [
            ("GET", "/api/tags", None),
            ("GET", "/api/ps", None),
            ("POST", "/api/show", {"model": "demo-chat"}),
            ("GET", "/v1/models", None),
            ("GET", "/v1/models/demo-chat", None),
            ("POST", "/api/embed", {"model": "demo-embed", "input": "x"}),
            ("POST", "/v1/embeddings", {"model": "demo-embed", "input": "x"}),
            ("GET", "/ready", None),
            ("GET", "/metrics", None),
            ("GET", "/v1/metrics", None),
        ]:
            response = client.request(method, path, json=payload)
            seen.append(str(response.headers) + response.text)
    return seen


@pytest.mark.parametrize("backend", ["closed-port", "demo-with-errors", "echoing"])
def test_api_key_never_leaks(
    start_proxy: StartProxy,
    demo_backend: ServerProcess,
    echoing_backend: str,
    backend: str,
) -> None:
    upstream = {
        "closed-port": closed_port_url(),
        "demo-with-errors": demo_backend.url,
        "echoing": echoing_backend,
    }[backend]
    server = start_proxy(
        upstream, OPENAI_API_KEY=SECRET, LOG_LEVEL="DEBUG", MAX_RETRIES="1", RETRY_BACKOFF="0.01"
    )
    texts = ["[[status=401]]", "[[status=500]]", "[[drop_after=1]]", "hi [[tokens=2]]"]
    if backend == "echoing":
        texts = ["plain", "plain-text"]
    seen = _exercise(server.url, texts)
    time.sleep(0.2)  # let the last log lines reach the pipe
    log = server.log()
    assert log.strip(), "expected some log output at DEBUG"
    leaks = [text for text in seen if SECRET in text]
    assert not leaks, f"the API key reached a client: {leaks[0][:500]}"
    assert SECRET not in log, "the API key reached the log: " + next(
        line for line in log.splitlines() if SECRET in line
    )
    if backend == "echoing":
        # the backend's message still gets through, with the key masked
        assert any("Incorrect API key provided: ***" in text for text in seen)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_api_key_never_leaks_from_a_mid_stream_error(
    start_proxy: StartProxy, echoing_backend: str, path: str
) -> None:
    """A backend error event after the stream started, quoting the key. On /api/* the proxy
    translates it into the final ``{"error": ...}`` line; on /v1/* it relays the SSE bytes.

    Known failure on /v1 (reported): relay_openai passes backend bytes through untouched, so an
    in-band error quoting the key reaches the client (the /api/* case is scrubbed)."""
    server = start_proxy(echoing_backend, OPENAI_API_KEY=SECRET, MAX_RETRIES="0")
    body = {"model": "m", "messages": [{"role": "user", "content": "mid-stream"}], "stream": True}
    response = httpx.post(server.url + path, json=body, timeout=10)
    assert response.status_code == 200
    assert "was revoked" in response.text
    assert SECRET not in response.text, response.text
    assert SECRET not in server.log()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/chat/completions"])
def test_api_key_quoted_in_generated_text_is_masked(
    start_proxy: StartProxy, echoing_backend: str, path: str, stream: bool
) -> None:
    server = start_proxy(echoing_backend, OPENAI_API_KEY=SECRET, MAX_RETRIES="0")
    if path == "/api/generate":
        body: dict[str, object] = {"model": "m", "prompt": "echo-key", "stream": stream}
    else:
        body = {"model": "m", "messages": [{"role": "user", "content": "echo-key"}]}
        body["stream"] = stream
    response = httpx.post(server.url + path, json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert "key=***" in response.text
    assert SECRET not in response.text


def test_api_key_split_across_two_backend_reads_is_masked(
    start_proxy: StartProxy, echoing_backend: str
) -> None:
    """On /v1 the backend's reads are relayed as they come (/api/* streams are rebuilt
    from whole events, so a split never reaches them)."""
    path = "/v1/chat/completions"
    server = start_proxy(echoing_backend, OPENAI_API_KEY=SECRET, MAX_RETRIES="0")
    body = {"model": "m", "messages": [{"role": "user", "content": "echo-key-split"}],
            "stream": True}  # fmt: skip
    response = httpx.post(server.url + path, json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert "key=***" in response.text
    assert SECRET not in response.text
    assert SECRET[: len(SECRET) // 2] not in response.text  # no half of it either


def test_api_key_is_sent_to_the_backend(start_proxy: StartProxy, echoing_backend: str) -> None:
    """The key is used (the echoing backend quotes it back; the proxy masks it)."""
    server = start_proxy(echoing_backend, OPENAI_API_KEY=SECRET, MAX_RETRIES="0")
    response = chat(server.url, "plain")
    assert response.status_code == 401
    assert response.json()["error"] == "Incorrect API key provided: ***"
    without = start_proxy(echoing_backend, MAX_RETRIES="0")
    assert chat(without.url, "plain").json()["error"] == "Incorrect API key provided: "


# ---- stopping --------------------------------------------------------------------------------


def _stream_in_thread(url: str, tokens: int, delay: float) -> tuple[threading.Thread, list[str]]:
    """Read an /api/chat stream in a thread; the lines (or the error) land in the list."""
    lines: list[str] = []

    def read() -> None:
        text = f"hi [[tokens={tokens}]] [[delay={delay}]]"
        body = {"model": "demo-chat", "messages": [{"role": "user", "content": text}]}
        try:
            with httpx.stream("POST", url + "/api/chat", json=body, timeout=30) as response:
                lines.extend(response.iter_lines())
        except httpx.HTTPError as exc:
            lines.append(f"broken: {exc!r}")

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, lines


def _start_demo_proxy(workers: int, **env: str) -> ServerProcess:
    from .conftest import _spawn

    args = ["-m", "trioproxy", "--demo", "--host", "127.0.0.1", "--port", "0",
            "--workers", str(workers), "--env-file", ""]  # fmt: skip
    return _spawn(args, base_env(DEMO_TOKEN_DELAY="0.01", **env), timeout=30)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_lets_a_stream_in_flight_finish(workers: int) -> None:
    """With two workers, hypercorn's master sends SIGTERM to a busy worker as soon as the
    idle one has exited; the workers ignore it and drain like a single process does."""
    server = _start_demo_proxy(workers)
    try:
        import socket

        host, port = server.url.removeprefix("http://").split(":")
        socket.create_connection((host, int(port)), timeout=2).close()  # listening already
        wait_healthy(server.url, timeout=30)
        thread, lines = _stream_in_thread(server.url, tokens=20, delay=0.1)
        time.sleep(0.6)  # the stream is under way
        server.process.send_signal(signal.SIGTERM)
        thread.join(timeout=15)
        assert server.process.wait(timeout=15) == 0
        assert lines and json.loads(lines[-1])["done"] is True, lines[-3:]
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_signal_stops_at_once(workers: int) -> None:
    server = _start_demo_proxy(workers, GRACEFUL_TIMEOUT="30", ACCESS_LOG="true", LOG_LEVEL="INFO")
    try:
        wait_healthy(server.url, timeout=30)
        thread, _ = _stream_in_thread(server.url, tokens=300, delay=0.1)
        time.sleep(0.6)
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        code = server.process.wait(timeout=15)
        assert time.monotonic() - started < 10  # not the 30 s drain
        thread.join(timeout=5)
        server.reader.join(timeout=5)  # type: ignore[union-attr]
        log = server.log()
        assert code == 0, log
        assert "stopping now (second signal)" in log
        assert "Traceback" not in log
        if workers == 1:  # (two workers are killed as a group: no line to write)
            # the proxy cut the stream after its 200, its client did not leave: an error,
            # the 503 the metrics count (not 499), as the line says
            (line,) = [line for line in log.splitlines() if "POST /api/chat" in line]
            assert " 200 " in line and line.endswith("(error: 503)"), line
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_third_signal_does_not_cut_the_clean_up_short(
    tmp_path: Path, workers: int, signum: signal.Signals
) -> None:
    """Stopping now takes under a second; a third signal in that time (Ctrl-C pressed
    again, a script repeating its kill) ended the process by the signal's default, or a
    KeyboardInterrupt inside trio, before it cleaned up: exit 143, and with --workers the
    run directory left behind and the workers left to their lifeline."""
    server = _start_demo_proxy(workers, GRACEFUL_TIMEOUT="30", TMPDIR=str(tmp_path))
    try:
        wait_healthy(server.url, timeout=30)
        thread, _ = _stream_in_thread(server.url, tokens=300, delay=0.1)
        time.sleep(0.6)
        for _ in range(3):
            server.process.send_signal(signum)
            time.sleep(0.05)
        code = server.process.wait(timeout=15)
        thread.join(timeout=5)
        server.reader.join(timeout=5)  # type: ignore[union-attr]
        log = server.log()
        assert code == 0, log
        assert "Traceback" not in log and "abandoned" not in log, log
        assert list(tmp_path.iterdir()) == []  # the run directory of --workers removed
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_streams_longer_than_the_grace_period_end_in_band(workers: int) -> None:
    """hypercorn would cut them mid-chunk when GRACEFUL_TIMEOUT runs out; they end a
    little before, with one error line in their dialect and a proper end of response."""
    server = _start_demo_proxy(workers, GRACEFUL_TIMEOUT="1.5")
    try:
        wait_healthy(server.url, timeout=30)
        thread, lines = _stream_in_thread(server.url, tokens=100, delay=0.1)
        time.sleep(0.6)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        thread.join(timeout=15)
        assert server.process.wait(timeout=15) == 0
        assert time.monotonic() - started < 5  # not the 10 s the stream would take
        assert not any(line.startswith("broken") for line in lines), lines[-2:]
        last = json.loads(lines[-1])
        assert set(last) == {"error"} and "shutting down" in last["error"]
    finally:
        server.stop()


# ---- access log ------------------------------------------------------------------------------


def test_access_log_is_one_line_per_request_when_asked_for(
    start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    server = start_proxy(
        demo_backend.url, ACCESS_LOG="true", LOG_LEVEL="INFO", LOG_FORMAT="json",
        OPENAI_API_KEY=SECRET,
    )  # fmt: skip
    chat_reply = httpx.post(
        server.url + "/api/chat",
        json={"model": "demo-chat", "messages": [{"role": "user", "content": "hi [[tokens=3]]"}]},
        headers={"X-Request-ID": "access-1"},
        timeout=10,
    )
    assert chat_reply.status_code == 200
    assert httpx.get(server.url + "/no/such/path", headers={"X-Request-ID": "access-2"}).is_error
    time.sleep(0.3)  # let the lines reach the pipe
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = {e["request_id"]: e["message"] for e in lines if e["logger"] == "trioproxy.access"}
    assert re.fullmatch(
        r"127\.0\.0\.1 POST /api/chat 200 [0-9.]+ ms \d+ B \(completed\)", access["access-1"]
    )
    assert re.fullmatch(r"127\.0\.0\.1 GET /no/such/path 404 [0-9.]+ ms \d+ B", access["access-2"])
    assert SECRET not in server.log()
    quiet = start_proxy(demo_backend.url, LOG_LEVEL="INFO", LOG_FORMAT="json")
    assert httpx.get(quiet.url + "/api/tags").status_code == 200
    time.sleep(0.3)
    assert "trioproxy.access" not in quiet.log()


def test_past_max_concurrent_requests_a_request_is_refused_at_once(
    start_proxy: StartProxy, demo_backend: ServerProcess
) -> None:
    """With one request in flight and a limit of one, the next gets 503 + Retry-After in
    its dialect without waiting; once the first is done, requests are served again."""
    server = start_proxy(demo_backend.url, MAX_CONCURRENT_REQUESTS="1")
    thread, lines = _stream_in_thread(server.url, tokens=30, delay=0.05)
    time.sleep(0.5)  # the stream (1.5 s) is in flight
    quick = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    for path in ("/api/chat", "/v1/chat/completions"):
        refused = httpx.post(server.url + path, json=quick, timeout=5)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert "MAX_CONCURRENT_REQUESTS" in (error if path == "/api/chat" else error["message"])
    thread.join(timeout=10)
    assert json.loads(lines[-1])["done"] is True
    assert httpx.post(server.url + "/api/chat", json=quick, timeout=5).status_code == 200
    assert "MAX_CONCURRENT_REQUESTS" not in server.log()  # counted, not logged per refusal


def test_the_container_probe_knocks_where_the_proxy_listens() -> None:
    from trioproxy.probe import health_url

    def url(**env: str) -> str:
        return health_url(load_settings(environ=env, dotenv_path=None))

    assert url() == "http://127.0.0.1:11434/health"
    assert url(PROXY_HOST="0.0.0.0", PROXY_PORT="8080") == "http://127.0.0.1:8080/health"
    assert url(PROXY_HOST="::") == "http://127.0.0.1:11434/health"  # dual stack
    assert url(PROXY_HOST="[::1]") == "http://[::1]:11434/health"
    # a zone as Python's http.client passes it to getaddrinfo ("%25" it would not decode)
    assert url(PROXY_HOST="fe80::1%lo") == "http://[fe80::1%lo]:11434/health"
    assert url(PROXY_HOST="10.1.2.3") == "http://10.1.2.3:11434/health"
    from dataclasses import replace

    tls = replace(load_settings({}, dotenv_path=None), tls_certfile="/c.pem")
    assert health_url(tls) == "https://127.0.0.1:11434/health"


def test_a_flag_rescues_a_bad_value_in_the_environment() -> None:
    """Flags take precedence over the environment, so a bad value there that a flag
    replaces is not an error."""
    settings = load_settings({"PROXY_PORT": "80000"}, dotenv_path=None, port=8080)
    assert settings.port == 8080
    with pytest.raises(ConfigError, match="PROXY_PORT"):
        load_settings({"PROXY_PORT": "80000"}, dotenv_path=None)


def test_idle_client_connections_outlive_a_load_balancers_idle_timeout() -> None:
    """hypercorn's 5 s keep-alive closed idle connections before the clients and load
    balancers that pool them do (httpx 5 s, aiohttp 15 s, an AWS load balancer and
    nginx's upstream keepalive 60 s): a request sent as the proxy closed failed (a 502
    from the load balancer, "Server disconnected" in Python clients)."""
    from trioproxy.cli import hypercorn_config

    config = hypercorn_config(load_settings({}, dotenv_path=None))
    assert config.keep_alive_timeout > 60
    assert (
        hypercorn_config(
            load_settings({"KEEP_ALIVE_TIMEOUT": "5"}, dotenv_path=None)
        ).keep_alive_timeout
        == 5
    )
