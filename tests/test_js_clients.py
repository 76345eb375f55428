"""The real JavaScript clients against a real proxy process: ``ollama`` (ollama-js) 0.6.4,
``@langchain/ollama`` 1.3.0 and ``openai`` 7.59.0, the versions the API reference
(/work/shared/reference/ollama-and-openai-apis.md, sections 2.1-2.5) was verified with.

Each test runs ``node tests/js/clients.mjs PROXY_URL SCENARIO``; the script drives the library over
real sockets and prints one JSON object with what the library returned, which the test checks.
The proxy (``proxy`` fixture) forwards to the demo backend, whose replies are deterministic:
``[[tokens=N]]`` in a prompt asks for the first N tokens of ``script.PASSAGE``.

The node modules are pinned in tests/js/package-lock.json and installed with ``npm ci`` when
tests/js/node_modules is missing or does not match the lockfile. Without node/npm the module is
skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from trioproxy.demo.script import (
    EMBED_DIMENSIONS,
    REASONING,
    TOOL_RESULT_PREFIX,
    embedding,
    passage_tokens,
)

from .conftest import ServerProcess, demo_events_for, install_lock, npm_ci
from .fakes import (
    LLAMA_CPP_META,
    FullLengthEmbeddings,
    LlamaCppModels,
    ScriptedHandler,
    serving,
)
from .test_metrics_e2e import scrape, total

JS_DIR = Path(__file__).resolve().parent / "js"
SCRIPT = JS_DIR / "clients.mjs"
NODE = shutil.which("node")
NPM = shutil.which("npm")

if NODE is None or NPM is None:
    pytest.skip(
        "node and npm are needed to run the JavaScript client tests (tests/js); "
        f"not on PATH: {', '.join(n for n, p in (('node', NODE), ('npm', NPM)) if p is None)}",
        allow_module_level=True,
    )

DEMO_MODELS = {"demo-chat", "demo-reasoner", "demo-embed"}
# as Ollama's lists spell them (NAME:latest); OpenAI's list keeps the backend's ids
OLLAMA_LISTED = {f"{name}:latest" for name in DEMO_MODELS}
DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
COUNTS = ("prompt_eval_count", "eval_count")
WEATHER_ARGS = {"city": "demo", "days": 1}  # what the demo fills in for clients.mjs's tool
UNKNOWN = "no-such-model"

Result = dict[str, Any]
RunScenario = Callable[[str], Result]


def text(n: int) -> str:
    """The demo's reply to a prompt with ``[[tokens=n]]``."""
    return "".join(passage_tokens(n))


def tokens(n: int) -> list[str]:
    return list(passage_tokens(n))


def vector(text: str) -> list[float]:
    return embedding(text, EMBED_DIMENSIONS)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def assert_final(meta: Result, *, model: str = "demo-chat", eval_count: int | None = None) -> None:
    """The done line of /api/chat and /api/generate as a client saw it."""
    assert meta["done"] is True
    assert meta["done_reason"] == "stop"
    assert meta["model"] == model
    assert isinstance(meta["created_at"], str)
    for name in (*DURATIONS, *COUNTS):
        assert is_int(meta[name]), (name, meta[name])
    assert meta["prompt_eval_count"] > 0
    assert meta["total_duration"] > 0
    if eval_count is not None:
        assert meta["eval_count"] == eval_count


def assert_one_done_at_end(dones: list[bool]) -> None:
    assert dones, "empty stream"
    assert dones.count(True) == 1, dones
    assert dones[-1] is True


# ---- running the script --------------------------------------------------------------------


def _installed_matches_lockfile() -> bool:
    """node_modules holds exactly the package versions package-lock.json pins (npm keeps a copy
    of what it installed in node_modules/.package-lock.json)."""
    installed = JS_DIR / "node_modules" / ".package-lock.json"
    if not installed.is_file():
        return False

    def versions(lockfile: Path) -> dict[str, str]:
        packages = json.loads(lockfile.read_text())["packages"]
        return {
            k: v.get("version", "") for k, v in packages.items() if k.startswith("node_modules/")
        }

    try:
        return versions(installed) == versions(JS_DIR / "package-lock.json")
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/js/node_modules, installed from the lockfile with ``npm ci`` if missing or stale."""
    assert NODE is not None and NPM is not None
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=True)
    major = int(re.match(r"v(\d+)", version.stdout.strip()).group(1))  # type: ignore[union-attr]
    assert major >= 20, f"the JS client tests need node >= 20, found {version.stdout.strip()}"
    with install_lock(JS_DIR):
        if not _installed_matches_lockfile():
            npm_ci(JS_DIR, timeout=300)
            assert _installed_matches_lockfile(), "npm ci installed other versions than pinned"
    return JS_DIR / "node_modules"


@pytest.fixture(scope="module")
def run(node_modules: Path, proxy: ServerProcess) -> RunScenario:
    """``run(scenario)``: the JSON object clients.mjs printed for that scenario."""
    return scenario_runner(proxy.url)


def scenario_runner(url: str, script: Path = SCRIPT) -> RunScenario:
    """Run the scenarios of *script* (clients.mjs, or another in tests/js that prints its
    report the same way) against the proxy at *url*."""
    assert NODE is not None

    def run_scenario(scenario: str) -> Result:
        done = subprocess.run(
            [NODE, str(script), url, scenario],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=60,
        )
        report = f"scenario {scenario}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        assert done.returncode == 0, report
        # The libraries log to the console when they meet something they cannot parse
        # (ollama-js: console.warn("invalid json: ...") for a bad NDJSON line).
        lines = done.stdout.strip().splitlines()
        assert len(lines) == 1, report
        warnings = [line for line in done.stderr.splitlines() if line.strip()]
        assert not warnings, report
        result: Result = json.loads(lines[0])
        return result

    return run_scenario


# ---- ollama-js: chat and generate ----------------------------------------------------------


def test_ollama_chat(run: RunScenario) -> None:
    out = run("ollama-chat")
    assert out["message"] == {"role": "assistant", "content": text(5)}
    assert_final(out["meta"], eval_count=5)


def test_ollama_chat_stream(run: RunScenario) -> None:
    out = run("ollama-chat-stream")
    assert_one_done_at_end(out["dones"])
    assert set(out["roles"]) == {"assistant"}  # message.role on every line
    assert "".join(c or "" for c in out["contents"]) == text(5)
    assert [c for c in out["contents"] if c] == tokens(5)  # token by token, not buffered
    assert_final(out["final"], eval_count=5)


def test_ollama_generate(run: RunScenario) -> None:
    out = run("ollama-generate")
    assert out["response"] == text(4)
    assert_final(out["meta"], eval_count=4)


def test_ollama_generate_stream(run: RunScenario) -> None:
    out = run("ollama-generate-stream")
    assert_one_done_at_end(out["dones"])
    assert [r for r in out["responses"] if r] == tokens(4)
    assert_final(out["final"], eval_count=4)


def test_ollama_think_with_reasoning_model(run: RunScenario) -> None:
    out = run("ollama-think")
    assert out["whole"] == {"role": "assistant", "content": text(4), "thinking": REASONING}
    assert out["streamThinking"] == REASONING
    assert out["streamContent"] == text(4)
    assert out["mixedChunks"] == 0
    assert_final(out["final"], model="demo-reasoner")


def test_ollama_tool_calls(run: RunScenario) -> None:
    out = run("ollama-tools")
    stream = out["stream"]
    assert stream["chunksWithCalls"] == 1, "the tool call must arrive as ONE chunk"
    (call,) = stream["toolCalls"]
    assert call["function"]["name"] == "get_weather"
    assert stream["argumentsType"] == "object"
    assert call["function"]["arguments"] == WEATHER_ARGS
    assert stream["callChunkDone"] is False  # the call line comes before the done line
    assert_final(stream["final"])

    (call,) = out["nonStream"]["toolCalls"]
    assert call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"] == WEATHER_ARGS
    assert_final(out["nonStream"]["meta"])

    assert out["followUp"] == {
        "content": f"{TOOL_RESULT_PREFIX} sunny, 22 C",
        "toolCalls": None,
    }


# ---- ollama-js: embeddings -----------------------------------------------------------------


def test_ollama_embed(run: RunScenario) -> None:
    out = run("ollama-embed")
    one, many = out["one"], out["many"]
    assert one["model"] == "demo-embed"
    assert one["embeddings"] == [vector("hello world")]
    assert one["prompt_eval_count"] == 2
    assert is_int(one["total_duration"]) and is_int(one["load_duration"])
    # All vectors, in order.
    assert many["embeddings"] == [vector(t) for t in ("alpha", "beta gamma", "hello world")]
    assert all(len(v) == EMBED_DIMENSIONS for v in many["embeddings"])


@pytest.mark.parametrize("refuses", [False, True])
def test_ollama_embed_dimensions_from_a_backend_without_them(
    node_modules: Path, start_proxy: Callable[..., ServerProcess], refuses: bool
) -> None:
    """As many dimensions as asked for, at unit length, as Ollama cuts them, from a
    backend that ignores ``dimensions`` (llama.cpp's server) or refuses it (OpenAI, vLLM
    for a model without it; asked again without it)."""
    FullLengthEmbeddings.refuses, FullLengthEmbeddings.asked = refuses, []
    with serving(FullLengthEmbeddings) as url:
        out = scenario_runner(start_proxy(url, MAX_RETRIES="0").url)("ollama-embed-dimensions")
    for answer in (out["four"], out["again"]):
        assert len(answer["embeddings"]) == 2
        for vector in answer["embeddings"]:
            assert vector == pytest.approx([0.5] * 4)
    sent = [body.get("dimensions") for body in FullLengthEmbeddings.asked]
    assert sent == ([4, None, None] if refuses else [4, 4])


def test_ollama_legacy_embeddings(run: RunScenario) -> None:
    out = run("ollama-embeddings")
    assert out["embedding"] == vector("hello world")
    assert out["embed"] == out["embedding"]


# ---- ollama-js: model info -----------------------------------------------------------------


def test_ollama_list(run: RunScenario) -> None:
    models = run("ollama-list")["models"]
    assert OLLAMA_LISTED <= {m["model"] for m in models}
    assert OLLAMA_LISTED <= {m["name"] for m in models}  # @langchain/ollama looks for `name`
    for entry in models:
        assert isinstance(entry["modified_at"], str)
        assert isinstance(entry["details"], dict)
        assert is_int(entry["size"])


def test_ollama_show(run: RunScenario) -> None:
    out = run("ollama-show")
    chat, embed = out["chat"], out["embed"]
    assert "model_info" in chat
    assert {"completion", "tools"} <= set(chat["capabilities"])
    assert isinstance(chat["details"], dict)
    assert "embedding" in embed["capabilities"]


def test_ollama_show_and_list_from_llama_cpps_server(
    node_modules: Path, start_proxy: Callable[..., ServerProcess]
) -> None:
    """What llama.cpp's server lists under ``meta`` (LLAMA_CPP_META) reaches ollama-js
    where Ollama puts it: the trained context and embedding length in ``model_info``,
    the parameter count there and in ``details``, the file size on ``/api/tags``; and
    what it lists in Ollama's shape beside them (a projector: "multimodal") is "vision"."""
    with serving(LlamaCppModels) as url:
        run_here = scenario_runner(start_proxy(url, MAX_RETRIES="0").url)
        shown, listed = run_here("ollama-show"), run_here("ollama-list")["models"]
    for name, out in (("demo-chat", shown["chat"]), ("demo-embed", shown["embed"])):
        meta = LLAMA_CPP_META[name]
        assert out["model_info"] == {
            "general.architecture": "demo",
            "general.parameter_count": meta["n_params"],
            "demo.context_length": meta["n_ctx_train"],
            "demo.embedding_length": meta["n_embd"],
        }
    assert shown["chat"]["details"]["parameter_size"] == "8.0B"
    assert shown["chat"]["capabilities"] == ["completion", "tools", "vision"]
    assert shown["embed"]["capabilities"] == ["embedding"]
    sizes = {entry["model"]: entry["size"] for entry in listed}
    assert sizes == {f"{name}:latest": meta["size"] for name, meta in LLAMA_CPP_META.items()}


def test_declared_capabilities_and_window_reach_ollama_js(
    node_modules: Path,
    tmp_path: Path,
    demo_backend: ServerProcess,
    start_proxy: Callable[..., ServerProcess],
) -> None:
    """The demo lists bare ids, as OpenAI and vLLM do: what MODEL_MAPPING_FILE declares of
    a name is what ollama-js reads (Copilot and Zed offer image input and thinking only
    when ``capabilities`` says so, and size prompts by ``model_info``'s window)."""
    path = tmp_path / "models.json"
    declared = {
        "demo-chat": {"capabilities": ["completion", "tools", "vision", "thinking"],
                      "context_length": 65536},
        "demo-embed": {"capabilities": ["embedding"], "context_length": 512},
    }  # fmt: skip
    path.write_text(json.dumps({"model_mappings": declared}))
    run_here = scenario_runner(start_proxy(demo_backend.url, MODEL_MAPPING_FILE=str(path)).url)
    shown, running = run_here("ollama-show"), run_here("ollama-ps")["models"]
    assert shown["chat"]["capabilities"] == ["completion", "tools", "vision", "thinking"]
    assert shown["chat"]["model_info"]["demo.context_length"] == 65536
    assert shown["embed"]["capabilities"] == ["embedding"]
    assert shown["embed"]["model_info"]["demo.context_length"] == 512
    windows = {entry["model"]: entry["context_length"] for entry in running}
    assert windows == {
        "demo-chat:latest": 65536,
        "demo-embed:latest": 512,
        "demo-reasoner:latest": 0,
    }


def test_ollama_ps(run: RunScenario) -> None:
    models = run("ollama-ps")["models"]
    assert "demo-chat:latest" in {m["model"] for m in models}
    for entry in models:
        assert isinstance(entry["expires_at"], str)
        assert is_int(entry["size_vram"])


def test_ollama_version(run: RunScenario) -> None:
    out = run("ollama-version")
    assert re.fullmatch(r"\d+\.\d+\.\d+", out["version"]), out


def test_ollama_pull(run: RunScenario) -> None:
    """A pull makes sure of a model before use: for one the backend serves it succeeds
    (ollama-js ends the stream at ``status: "success"``), by Ollama's name rules; one it
    does not serve is a 404 ResponseError."""
    out = run("ollama-pull")
    assert out["streamed"] == [{"status": "pulling manifest"}, {"status": "success"}]
    assert out["whole"] == {"status": "success"}
    for call in ("unknown", "unknownStream"):
        result = out[call]
        assert result["ok"] is False and result["name"] == "ResponseError", result
        assert result["status"] == 404, result
        assert result["error"].startswith(f"model '{UNKNOWN}' not found"), result
    assert out["langchain"]["content"] == text(3)
    assert {"status": "success"} in out["langchain"]["logged"]  # it pulled, then chatted


# ---- ollama-js: errors and aborts ----------------------------------------------------------


def test_ollama_unknown_model_is_404(run: RunScenario) -> None:
    out = run("ollama-unknown-model")
    assert set(out) == {"chat", "chatStream", "generate", "show", "embed"}
    for call, result in out.items():
        assert result["ok"] is False, call
        assert result["name"] == "ResponseError", (call, result)
        assert result["status"] == 404, (call, result)
        # An Ollama-style string error, not OpenAI's {"message": ...} object.
        assert isinstance(result["error"], str), (call, result)
        assert UNKNOWN in result["message"], (call, result)


def test_ollama_mid_stream_error(run: RunScenario) -> None:
    """The backend breaks after 3 tokens: ollama-js yields them, then throws the proxy's in-band
    error line (not "Did not receive done ...", which would mean the stream just stopped)."""
    out = run("ollama-mid-stream-error")
    assert out["received"] == tokens(3)
    assert out["error"]["ok"] is False
    assert "mid-stream" in out["error"]["message"]


def _outcomes(demo_backend: ServerProcess, request_id: str, count: int) -> list[dict[str, Any]]:
    """The demo's events for *request_id* once *count* of them have ended (the proxy notices a
    client that left asynchronously)."""
    deadline = time.monotonic() + 5
    while True:
        events = sorted(demo_events_for(demo_backend, request_id), key=lambda e: e["id"])
        if len(events) >= count and all(e["outcome"] is not None for e in events):
            return events
        if time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_ollama_abort_then_fresh_request(run: RunScenario, demo_backend: ServerProcess) -> None:
    out = run("ollama-abort")
    # AbortableAsyncIterator.abort() after two chunks, then Ollama.abort() (the whole client)
    # after one: iteration stops with an AbortError. (Tokens are 50 ms apart; a line or two
    # may already sit in the client's buffer when it aborts, hence only the prefix is exact.)
    assert out["received"][:2] == tokens(2) and len(out["received"]) < 5
    assert out["error"]["name"] == "AbortError"
    assert out["secondReceived"][:1] == tokens(1) and len(out["secondReceived"]) < 5
    assert out["secondError"]["name"] == "AbortError"
    # ... and the same client still gets a complete answer.
    assert out["after"] == {"content": text(3), "done": True}

    # The proxy cancelled both upstream streams instead of draining 100 slow tokens.
    events = _outcomes(demo_backend, out["requestId"], 3)
    assert [e["outcome"] for e in events] == ["disconnected", "disconnected", "completed"]
    assert all(e["tokens_sent"] < 100 for e in events[:2])


# ---- @langchain/ollama ---------------------------------------------------------------------


def test_langchain_invoke(run: RunScenario) -> None:
    out = run("langchain-invoke")
    assert out["content"] == text(5)
    assert out["doneReason"] == "stop"
    assert out["toolCalls"] == []
    # ChatOllama SUMS prompt_eval_count / eval_count over every chunk, so counts on any line but
    # the done line would inflate these. The prompt "Hi [[tokens=5]] <marker>" is 3 words.
    usage = out["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (3, 5, 8)


def test_langchain_stream(run: RunScenario) -> None:
    out = run("langchain-stream")
    assert "".join(out["contents"]) == text(5)
    assert [c for c in out["contents"] if c] == tokens(5)
    assert out["usageChunks"] == 1
    assert out["usage"] == {"input_tokens": 3, "output_tokens": 5, "total_tokens": 8}


def test_langchain_bind_tools(run: RunScenario) -> None:
    out = run("langchain-tools")
    assert out["invalidToolCalls"] == []
    (call,) = out["toolCalls"]
    assert call["name"] == "get_weather"
    assert out["argsType"] == "object"
    assert call["args"] == WEATHER_ARGS
    assert call["type"] == "tool_call"
    # The ToolMessage went back through the proxy and the model answered with text.
    assert out["answer"] == f"{TOOL_RESULT_PREFIX} rain"
    assert out["answerToolCalls"] == []


def test_langchain_think(run: RunScenario) -> None:
    out = run("langchain-think")
    assert out == {"content": text(4), "reasoning": REASONING}


def test_langchain_embeddings(run: RunScenario) -> None:
    out = run("langchain-embeddings")
    assert out["query"] == vector("hello world")
    assert out["documents"] == [vector(t) for t in ("alpha", "beta gamma", "hello world")]


# ---- openai (JS) on /v1 --------------------------------------------------------------------


def test_openai_chat(run: RunScenario) -> None:
    out = run("openai-chat")
    assert out["object"] == "chat.completion"
    assert out["model"] == "demo-chat"
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == text(5)
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 5
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 5


def test_openai_responses_api(run: RunScenario) -> None:
    out = run("openai-responses")
    assert out["text"] == text(5) and out["status"] == "completed"
    assert out["usage"]["output_tokens"] == 5
    assert out["deltas"] == tokens(5)  # one event per token, in order
    assert out["finalText"] == text(5)
    assert out["finalUsage"]["output_tokens"] == 5


def test_openai_responses_websocket(run: RunScenario) -> None:
    """The SDK's ResponsesWS (the Responses API's WebSocket mode): turns on one
    connection, a continuation, and an error event for a message that is no turn."""
    out = run("openai-responses-socket")
    first, second = out["turns"]
    assert first["deltas"] == tokens(3) and first["outputTokens"] == 3
    assert second["deltas"] == tokens(2) and second["status"] == "completed"
    assert out["error"] == {"status": 400, "code": "invalid_json", "type": "invalid_request_error"}


def test_openai_chat_stream_include_usage(run: RunScenario) -> None:
    out = run("openai-chat-stream")
    assert len(out["ids"]) == 1
    assert out["content"] == text(5)
    assert out["finishReasons"] == ["stop"]
    assert out["usageChunks"] == 1
    last = out["last"]  # the usage chunk comes last, with no choices
    assert last["object"] == "chat.completion.chunk"
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 5
    assert last["usage"]["prompt_tokens"] > 0


def test_openai_tool_call_stream(run: RunScenario) -> None:
    out = run("openai-tools")
    assert out["finishReason"] == "tool_calls"
    assert out["argumentDeltas"] >= 3  # really fragmented, reassembled by the SDK
    (call,) = out["toolCalls"]
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == WEATHER_ARGS


def test_openai_embeddings_base64_and_float(run: RunScenario) -> None:
    out = run("openai-embeddings")
    expected = [vector("hello world"), vector("second text")]
    assert out["float"] == expected
    assert out["base64"] == expected  # the SDK's default: base64 of float32, decoded client-side
    assert out["indexes"] == [0, 1]
    assert out["usage"]["prompt_tokens"] > 0


class _FloatsOnly(ScriptedHandler):
    """An embeddings backend that ignores ``encoding_format``: floats, whatever is asked."""

    def do_GET(self) -> None:
        model = {"id": "demo-embed", "object": "model", "created": 0, "owned_by": "x"}
        self.answer(200, json.dumps({"object": "list", "data": [model]}).encode())

    def do_POST(self) -> None:
        body = self.json_body()
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": vector(text)}
            for i, text in enumerate(inputs)
        ]
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        answer = {"object": "list", "data": data, "model": body["model"], "usage": usage}
        self.answer(200, json.dumps(answer).encode())


@pytest.fixture(scope="module")
def run_floats_only(
    node_modules: Path, start_proxy: Callable[..., ServerProcess]
) -> Iterator[RunScenario]:
    with serving(_FloatsOnly) as url:
        yield scenario_runner(start_proxy(url).url)


def test_openai_embeddings_from_a_backend_that_ignores_base64(
    run_floats_only: RunScenario,
) -> None:
    """The SDK asks for base64 by default and decodes whatever comes as base64: a
    backend's floats would become vectors of zeros without an error. The proxy encodes
    them as asked."""
    out = run_floats_only("openai-embeddings")
    expected = [vector("hello world"), vector("second text")]
    assert out["float"] == expected
    assert out["base64"] == expected
    assert out["indexes"] == [0, 1]


def test_openai_models(run: RunScenario) -> None:
    models = run("openai-models")["models"]
    assert DEMO_MODELS <= {m["id"] for m in models}
    for entry in models:
        assert entry["object"] == "model"
        assert is_int(entry["created"])
        assert isinstance(entry["owned_by"], str)


def test_openai_unknown_model_is_api_error_404(run: RunScenario) -> None:
    out = run("openai-error")
    assert set(out) == {"chat", "chatStream", "embeddings"}
    for call, result in out.items():
        assert result["ok"] is False, call
        assert result["isAPIError"] is True, (call, result)
        assert result["isNotFoundError"] is True, (call, result)
        assert result["status"] == 404, (call, result)
        # OpenAI's error format: {"error": {"message", "type", ...}}, parsed by the SDK.
        assert isinstance(result["error"], dict), (call, result)
        assert UNKNOWN in result["error"]["message"], (call, result)
        assert isinstance(result["type"], str), (call, result)
        assert UNKNOWN in result["message"], (call, result)


# ---- a body over MAX_REQUEST_BYTES ---------------------------------------------------------

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def run_small_limit(
    node_modules: Path, demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> RunScenario:
    return scenario_runner(start_proxy(demo_backend.url, MAX_REQUEST_BYTES=str(LIMIT)).url)


def test_a_body_over_the_limit_is_a_413_in_each_library(run_small_limit: RunScenario) -> None:
    """Node's fetch writes a 32 MiB body whole before it reads the answer: the proxy's 413
    reaches the library (not "fetch failed", EPIPE, from a connection reset under the
    write), and the next request of the same client works."""
    out = run_small_limit("body-too-large")
    for call in ("ollamaChat", "ollamaChatStream", "openaiChat", "openaiEmbeddings"):
        for result in out[call]:
            assert result["ok"] is False, (call, result)
            assert result["status"] == 413, (call, result)
            assert str(LIMIT) in result["message"], (call, result)
    assert out["after"] == text(2)


# ---- PROXY_API_KEYS ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_with_keys(
    node_modules: Path, demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> RunScenario:
    proxy = start_proxy(demo_backend.url, PROXY_API_KEYS="right-key-0123456789")
    return scenario_runner(proxy.url)


def test_a_missing_or_wrong_key_is_a_401_in_each_library(run_with_keys: RunScenario) -> None:
    """Also with a large body the client is still writing when the 401 comes: it reads
    the 401 (the openai SDK got an APIConnectionError from the reset connection, and
    would have retried it twice, uploading the body each time)."""
    out = run_with_keys("auth-failure")
    for case in ("missing", "wrong", "wrongLargeBody"):
        for call, result in out[case].items():
            assert result["ok"] is False, (case, call, result)
            assert result["status"] == 401, (case, call, result)
            if call.startswith("ollama"):
                assert result["name"] == "ResponseError", (case, call, result)
                assert isinstance(result["error"], str), (case, call, result)
            else:
                assert result["isAuthenticationError"] is True, (case, call, result)
                assert result["code"] == "invalid_api_key", (case, call, result)
    assert "missing" in out["missing"]["ollamaChat"]["message"]
    assert out["right"] == {"chat": text(2), "openai": text(2)}


# ---- openai (JS): leaving a reply early ----------------------------------------------------


@pytest.fixture(scope="module")
def abort_proxy(
    node_modules: Path, demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> ServerProcess:
    """A proxy of its own: its metrics count this module's aborted requests only."""
    return start_proxy(demo_backend.url)


def _cancel_counts(proxy: ServerProcess) -> dict[str, float]:
    samples = scrape(proxy.url)
    summary = httpx.get(f"{proxy.url}/v1/metrics", timeout=5).json()
    return {
        "streams_cancelled": total(samples, "trioproxy_streams_total", outcome="cancelled"),
        "streams_error": total(samples, "trioproxy_streams_total", outcome="error"),
        "requests_499": total(samples, "http_requests_total", status="499"),
        "requests_5xx": sum(
            total(samples, "http_requests_total", status=str(code)) for code in (500, 502, 504)
        ),
        "json_cancelled_streams": summary["streaming"]["cancelled_streams"],
        "json_error_streams": summary["streaming"]["error_streams"],
        "json_cancelled_requests": summary["cancelled_requests"],
        "json_failed_requests": summary["failed_requests"],
    }


def test_openai_aborts_close_the_backend_stream_and_count_as_cancelled(
    abort_proxy: ServerProcess, demo_backend: ServerProcess
) -> None:
    """stream.controller.abort(), a break out of the loop, the Responses helper's abort(),
    an AbortSignal and the SDK's own timeout: each ends the backend request at once, counts
    as cancelled (a 499, never an error) in both metrics formats, and the same client's
    next request works."""
    out = scenario_runner(abort_proxy.url)("openai-abort")
    # the SDK ends the loop quietly after stream.controller.abort() and after a break
    assert out["controllerAbort"]["ok"] is True, out["controllerAbort"]
    assert out["breakOut"]["ok"] is True, out["breakOut"]
    assert out["responsesAbort"]["isUserAbort"] is True, out["responsesAbort"]
    assert out["signalAbort"]["isUserAbort"] is True, out["signalAbort"]
    assert out["timedOut"]["isTimeout"] is True, out["timedOut"]
    assert all(count < 10 for count in out["received"].values()), out["received"]
    assert out["after"] == text(3)

    events = _outcomes(demo_backend, out["requestId"], 6)
    assert [e["outcome"] for e in events] == ["disconnected"] * 5 + ["completed"], events
    assert all(e["tokens_sent"] < 100 for e in events[:5])

    expected = {
        "streams_cancelled": 3,
        "streams_error": 0,
        "requests_499": 5,
        "requests_5xx": 0,
        "json_cancelled_streams": 3,
        "json_error_streams": 0,
        "json_cancelled_requests": 5,
        "json_failed_requests": 0,
    }
    deadline = time.monotonic() + 5  # the proxy notices a client that left asynchronously
    while (counts := _cancel_counts(abort_proxy)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counts == expected
