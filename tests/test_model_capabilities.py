"""What a model can do and its context window, as Ollama's clients read them: ``/api/show``'s
``capabilities`` (VS Code's Copilot Chat and Zed offer image input and thinking only when it
lists ``vision`` and ``thinking``) and ``model_info["<arch>.context_length"]``, and
``/api/ps``'s ``context_length``. Most OpenAI-compatible backends (OpenAI, vLLM, LiteLLM) list
neither, so the operator declares them in MODEL_MAPPING_FILE; llama.cpp's server lists
capabilities in Ollama's shape beside its ``data``.

The real ``ollama`` and ``openai`` clients talk to a real proxy process in front of fakes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from .conftest import ServerProcess
from .fakes import LlamaCppModels, ScriptedHandler, serving
from .test_cli_config import main_in_process, one_line

TOOLS_TEMPLATE = "{{ if .Tools }}"  # how the template of a model with "tools" begins


class ListedModels(ScriptedHandler):
    """Models as three kinds of backend list them: OpenAI's bare entry, vLLM's with its
    ``max_model_len``, OpenRouter's with image input, reasoning and ``context_length``."""

    ENTRIES: list[dict[str, Any]] = [
        {"id": "gpt-4o", "object": "model", "created": 1_700_000_000, "owned_by": "openai"},
        {"id": "qwen-vl", "object": "model", "created": 0, "owned_by": "vllm",
         "max_model_len": 32768},
        {"id": "or/reasoner", "object": "model", "created": 0, "context_length": 200000,
         "architecture": {"input_modalities": ["text", "image"], "output_modalities": ["text"]},
         "supported_parameters": ["reasoning", "tools"]},
        {"id": "plain", "object": "model", "created": 0, "owned_by": "openai"},
    ]  # fmt: skip

    def do_GET(self) -> None:
        self.answer(200, json.dumps({"object": "list", "data": self.ENTRIES}).encode())


DECLARED = {
    "model_mappings": {
        # served under its own name: no "model"
        "gpt-4o": {"capabilities": ["completion", "tools", "vision"], "context_length": 128000},
        # the backend's window, declared smaller
        "qwen": {"model": "qwen-vl", "context_length": 16384},
        # what the backend's entry says (vision, thinking, tools) is overruled
        "reasoner": {"model": "or/reasoner", "capabilities": ["completion"]},
        "plain-alias": "plain",  # the string form, beside the others
    },
    "default_model": "gpt-4o",
}


@pytest.fixture(scope="module")
def declared_proxy(
    tmp_path_factory: pytest.TempPathFactory, start_proxy: Callable[..., ServerProcess]
) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("declared") / "models.json"
    path.write_text(json.dumps(DECLARED))
    with serving(ListedModels) as url:
        yield start_proxy(url, MAX_RETRIES="0", MODEL_MAPPING_FILE=str(path))


@pytest.fixture
def client(declared_proxy: ServerProcess) -> Iterator[ollama.Client]:
    with ollama.Client(host=declared_proxy.url, timeout=30) as c:
        yield c


def test_declared_capabilities_and_window_reach_ollama_show(client: ollama.Client) -> None:
    """gpt-4o behind an OpenAI-style list showed no vision, so Copilot offered no image
    input: what the file declares is what /api/show says, by either spelling of the name."""
    for name in ("gpt-4o", "gpt-4o:latest"):
        shown = client.show(name)
        assert shown.capabilities == ["completion", "tools", "vision"]
        assert shown.modelinfo == {"general.architecture": "gpt", "gpt.context_length": 128000}
        assert shown.template is not None and shown.template.startswith(TOOLS_TEMPLATE)


def test_declared_values_win_over_the_backends_entry(client: ollama.Client) -> None:
    shown = client.show("reasoner")  # OpenRouter's entry says image input and reasoning
    assert shown.capabilities == ["completion"]
    assert shown.template == "{{ .Prompt }}"  # no .Tools: LiteLLM reads it as no tool calls
    assert shown.modelinfo is not None
    assert shown.modelinfo["reasoner.context_length"] == 200000  # not declared: the entry's
    qwen = client.show("qwen")  # vLLM's max_model_len is 32768
    assert qwen.modelinfo == {"general.architecture": "qwen", "qwen.context_length": 16384}
    assert qwen.capabilities == ["completion", "tools"]  # not declared: as before


def test_undeclared_models_are_shown_as_before(client: ollama.Client) -> None:
    for name in ("plain", "plain-alias"):
        shown = client.show(name)
        assert shown.capabilities == ["completion", "tools"]  # nothing guessed from names
        assert shown.modelinfo == {"general.architecture": "plain"}


def test_declared_window_on_api_ps(client: ollama.Client) -> None:
    windows = {m.model: m.context_length for m in client.ps().models}
    assert windows == {
        "gpt-4o:latest": 128000,
        "qwen:latest": 16384,
        "reasoner:latest": 200000,
        "plain-alias:latest": 0,
    }


def test_declared_window_in_the_openai_model_fields_the_backend_gave(
    declared_proxy: ServerProcess,
) -> None:
    with openai.OpenAI(base_url=declared_proxy.url + "/v1", api_key="x", max_retries=0) as c:
        # the fields beyond OpenAI's model object, as the SDK keeps them
        extra = {m.id: m.model_extra for m in c.models.list()}
        retrieved = c.models.retrieve("qwen").model_extra
    assert extra["qwen"] == retrieved == {"max_model_len": 16384}
    assert extra["reasoner"] is not None and extra["reasoner"]["context_length"] == 200000
    assert extra["gpt-4o"] == {}  # OpenAI's object has no such field: none is made up


def test_llama_cpps_listed_capabilities_reach_ollama_show(
    start_proxy: Callable[..., ServerProcess],
) -> None:
    """llama.cpp's server lists each model in Ollama's shape too, beside ``data``, whose
    ``capabilities`` say ``multimodal`` for a model loaded with a projector: Ollama's
    ``vision``. It was left aside, so no client offered image input."""
    with serving(LlamaCppModels) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        with ollama.Client(host=proxy.url, timeout=30) as c:
            chat, embed = c.show("demo-chat"), c.show("demo-embed")
    assert chat.capabilities == ["completion", "tools", "vision"]
    assert embed.capabilities == ["embedding"]


def test_a_declaration_wins_over_llama_cpps_list(
    tmp_path: Path, start_proxy: Callable[..., ServerProcess]
) -> None:
    path = tmp_path / "models.json"
    declared = {"capabilities": ["completion", "tools", "thinking"], "context_length": 8192}
    path.write_text(json.dumps({"demo-chat": declared}))
    with serving(LlamaCppModels) as url:
        proxy = start_proxy(url, MAX_RETRIES="0", MODEL_MAPPING_FILE=str(path))
        with ollama.Client(host=proxy.url, timeout=30) as c:
            chat = c.show("demo-chat")
            windows = {m.model: m.context_length for m in c.ps().models}
    assert chat.capabilities == ["completion", "tools", "thinking"]
    assert chat.modelinfo is not None and chat.modelinfo["demo.context_length"] == 8192
    assert windows["demo-chat:latest"] == 8192


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ({"model": "x", "capabilites": ["completion"]}, "unknown key 'capabilites'"),
        ({}, "empty object"),
        ({"model": ""}, "'model' must be a non-empty string"),
        ({"capabilities": "vision"}, "'capabilities' must be a list"),
        ({"capabilities": ["completion", "Vision"]}, "capability 'Vision' is not one of"),
        ({"capabilities": ["completion", "insert"]}, "'insert' cannot be declared"),
        ({"capabilities": ["completion", "tools", "tools"]}, "'tools' is listed twice"),
        ({"capabilities": ["vision", "tools"]}, "must list 'completion' or 'embedding'"),
        ({"capabilities": []}, "must list 'completion' or 'embedding'"),
        ({"context_length": 0}, "'context_length' must be a whole number"),
        ({"context_length": 128000.5}, "got 128000.5"),
        ({"context_length": "128k"}, "got a string"),
        ({"context_length": True}, "got a boolean"),
        ({"context_length": 2**31}, "from 1 to 2147483647"),
    ],
)
def test_a_bad_declaration_stops_the_start_naming_the_entry(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    entry: dict[str, Any],
    needle: str,
) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"model_mappings": {"fine": "x", "llama3": entry}}))
    code, err = main_in_process(
        monkeypatch,
        capsys,
        OPENAI_API_BASE_URL="http://127.0.0.1:1/v1",
        MODEL_MAPPING_FILE=str(path),
    )
    assert code == 2
    line = one_line(err)
    assert "MODEL_MAPPING_FILE" in line and "'llama3'" in line and str(path) in line
    assert needle in line
