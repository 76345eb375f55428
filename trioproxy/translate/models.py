"""Models: the backend's model list as Ollama's (``/api/tags``, ``/api/show``, ``/api/ps``)
and OpenAI's (``/v1/models``)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence

from trioproxy.jsonutil import JSONDict, whole_number
from trioproxy.model_mapping import DeclaredModel, ModelMapper, with_default_tag

from .answer import _int, _rfc3339_seconds, utc_timestamp

# Checked in order, so "codellama" is found before "llama".
_KNOWN_FAMILIES = (
    "codellama",
    "llama",
    "mistral",
    "mixtral",
    "qwen",
    "gemma",
    "phi",
    "deepseek",
    "gpt",
    "claude",
    "command",
    "falcon",
    "granite",
    "starcoder",
    "nomic",
    "bert",
    "olmo",
)


def model_family(model_id: str) -> str:
    """A best-effort family name for ``details.family``: a known family found in the id, else
    the leading letters of its last path segment, else ``"unknown"``."""
    name = model_id.rsplit("/", 1)[-1].lower()
    for family in _KNOWN_FAMILIES:
        if family in name:
            return family
    letters = ""
    for ch in name:
        if not ch.isalpha():
            break
        letters += ch
    return letters or "unknown"


def is_embedding_model(name: str) -> bool:
    """Heuristic: OpenAI ``/models`` does not say what a model can do, but embedding models
    are conventionally named with "embed" (text-embedding-3-small, nomic-embed-text, bge-m3
    is the usual exception)."""
    return "embed" in name.lower()


def _details(backend_id: str, entry: JSONDict) -> JSONDict:
    family = model_family(backend_id)
    parameters = whole_number(_gguf_meta(entry).get("n_params"))
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": _parameter_size(parameters) if parameters else "",
        "quantization_level": "",
    }


def _gguf_meta(entry: JSONDict) -> JSONDict:
    """The GGUF metadata llama.cpp's server lists under a /models entry's ``meta``
    (``n_ctx_train``, ``n_embd``, ``n_params``, ``size``); empty for other backends."""
    meta = entry.get("meta")
    return meta if isinstance(meta, dict) else {}


def _parameter_size(count: int) -> str:
    """A parameter count as Ollama writes ``details.parameter_size`` ("8.0B", "137M"); a
    count that rounds up to a thousand of its unit is written in the next (999.96 million
    is "1.0B", not "1000M")."""
    for position, (scale, suffix, digits) in enumerate(_PARAMETER_UNITS):
        if count >= scale:
            value = round(count / scale, digits)
            if value >= 1000 and position > 0:
                scale, suffix, digits = _PARAMETER_UNITS[position - 1]
                value = round(count / scale, digits)
            return f"{value:.{digits}f}{suffix}"
    return str(count)


_PARAMETER_UNITS = ((10**12, "T", 1), (10**9, "B", 1), (10**6, "M", 0), (10**3, "K", 0))


def _digest(backend_id: str) -> str:
    # bare hex, as Ollama lists its digests (the "sha256:" prefix is its blobs' spelling)
    # a lone surrogate (JSON's "\ud83d") has no UTF-8: its code point's bytes stand in
    return hashlib.sha256(backend_id.encode(errors="surrogatepass")).hexdigest()


def _listed(
    models: Iterable[object], mapper: ModelMapper, *, tagged: bool = False
) -> list[tuple[str, JSONDict]]:
    """(client name, backend entry) pairs: each backend model under every client name mapped
    to it (file order), or under its own id when unmapped; duplicates dropped. ``tagged``
    (Ollama's lists) spells each name with its tag, as Ollama does (``NAME:latest``)."""
    out: list[tuple[str, JSONDict]] = []
    seen: set[str] = set()
    for entry in models:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        names = mapper.clients_for(entry["id"]) or [entry["id"]]
        for name in map(with_default_tag, names) if tagged else names:
            if name not in seen:
                seen.add(name)
                out.append((name, entry))
    return out


def _tag_entry(name: str, entry: JSONDict) -> JSONDict:
    backend_id = entry["id"]
    return {
        "name": name,
        "model": name,
        "modified_at": _rfc3339_seconds(entry.get("created")),
        "size": whole_number(_gguf_meta(entry).get("size")) or 0,  # the model file's bytes
        "digest": _digest(backend_id),
        "details": _details(backend_id, entry),
    }


def openai_models_to_ollama_tags(models: list[JSONDict], mapper: ModelMapper) -> JSONDict:
    """Backend ``/models`` ``data`` as ``/api/tags``."""
    listed = _listed(models, mapper, tagged=True)
    return {"models": [_tag_entry(name, entry) for name, entry in listed]}


def ollama_show(
    model_name: str,
    backend_entry: JSONDict | None,
    *,
    embedding: bool | None = None,
    listed: Sequence[str] = (),
    declared: DeclaredModel | None = None,
) -> JSONDict:
    """A synthetic ``/api/show`` response for ``model_name`` (the client-facing name).

    What the mapping file ``declared`` of the name wins; else the capabilities come from the
    backend's entry and those its list gave beside it (``listed``: :func:`listed_capabilities`),
    with ``embedding=None`` deciding by :func:`is_embedding_model` on the name and backend id.
    """
    backend_id = backend_entry.get("id", model_name) if backend_entry else model_name
    if not isinstance(backend_id, str):
        backend_id = model_name
    entry = backend_entry or {}
    if declared is not None and declared.capabilities is not None:
        capabilities = list(declared.capabilities)
    else:
        if embedding is None:
            embedding = (
                is_embedding_model(model_name)
                or is_embedding_model(backend_id)
                or ("embedding" in listed and "completion" not in listed)
            )
        capabilities = ["embedding"] if embedding else _capabilities(entry, listed)
    details = _details(backend_id, entry)
    context = declared.context_length if declared is not None else None
    return {
        "modelfile": f"# Served by trioproxy from backend model {backend_id}\nFROM {backend_id}\n",
        "parameters": "",
        "template": _TOOLS_TEMPLATE if "tools" in capabilities else _PROMPT_TEMPLATE,
        "details": details,
        # ollama-python requires this key to exist (ShowResponse alias without default)
        "model_info": _model_info(details["family"], entry, context),
        "capabilities": capabilities,
        "modified_at": _rfc3339_seconds(entry.get("created")),
    }


# The backend applies the model's own template; these say what Ollama's would. Ollama
# lists "tools" for a template that reads .Tools, and clients go by the template alone
# (LiteLLM's supports_function_calling looks for "tools" in it).
_PROMPT_TEMPLATE = "{{ .Prompt }}"
_TOOLS_TEMPLATE = "{{ if .Tools }}{{ .Tools }}\n{{ end }}{{ .Prompt }}"


def _model_info(family: str, entry: JSONDict, declared_context: int | None = None) -> JSONDict:
    """``model_info`` with the keys Ollama reads from a model's GGUF that the backend's
    entry gives: its context window (where Zed, Continue and VS Code's Copilot read it; the
    one the mapping file declares first), and from llama.cpp's server the trained context,
    embedding length and parameter count."""
    info: JSONDict = {"general.architecture": family}
    meta = _gguf_meta(entry)
    if parameters := whole_number(meta.get("n_params")):
        info["general.parameter_count"] = parameters
    context = declared_context or _context_length(entry) or whole_number(meta.get("n_ctx_train"))
    if context:
        info[f"{family}.context_length"] = context
    if embedding := whole_number(meta.get("n_embd")):
        info[f"{family}.embedding_length"] = embedding
    return info


def _context_length(entry: JSONDict) -> int:
    """The context window a backend's /models entry gives; 0 for none (or nonsense: a
    huge number decodes as infinity)."""
    for key in _CONTEXT_KEYS:
        if length := whole_number(entry.get(key)):
            return length
    return 0


def _capabilities(entry: JSONDict, listed: Sequence[str] = ()) -> list[str]:
    """A generation model's capabilities: completion and tools, plus what the backend's
    entry says beyond them (OpenRouter's input modalities and supported parameters) or
    its list gives beside it (``listed``: llama.cpp's server's)."""
    out = ["completion", "tools"]
    architecture = entry.get("architecture")
    modalities = architecture.get("input_modalities") if isinstance(architecture, dict) else None
    if (isinstance(modalities, list) and "image" in modalities) or "vision" in listed:
        out.append("vision")
    parameters = entry.get("supported_parameters")
    if (isinstance(parameters, list) and "reasoning" in parameters) or "thinking" in listed:
        out.append("thinking")
    return out


# Ollama's capabilities a backend may list, as Ollama names them: "insert" is left out, as
# trioproxy refuses a suffix; llama.cpp's server says "multimodal" for a model loaded with a
# projector for images (its /api/show fakes Ollama's the same way), Ollama's "vision"
_LISTED_CAPABILITIES = {
    "completion": "completion",
    "tools": "tools",
    "vision": "vision",
    "multimodal": "vision",
    "embedding": "embedding",
    "thinking": "thinking",
}


def listed_capabilities(payload: object) -> dict[str, tuple[str, ...]]:
    """Ollama's capabilities a backend's ``GET /models`` answer gives beside its ``data``,
    by model id: llama.cpp's server lists each model in Ollama's shape too, under
    ``models`` (``name`` and ``model`` its id), with ``capabilities``. Empty for backends
    that send ``data`` alone; anything not a known capability is left out."""
    models = payload.get("models") if isinstance(payload, dict) else None
    if not isinstance(models, list):
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for model in models:
        if not isinstance(model, dict) or not isinstance(model.get("capabilities"), list):
            continue
        name = model.get("model")
        name = name if isinstance(name, str) and name else model.get("name")
        if not isinstance(name, str) or not name:
            continue
        named = (
            _LISTED_CAPABILITIES.get(c) if isinstance(c, str) else None
            for c in model["capabilities"]
        )
        out[name] = tuple(dict.fromkeys(c for c in named if c is not None))
    return out


# Context-window fields some backends add to /models entries (vLLM, llama.cpp, LiteLLM).
_CONTEXT_KEYS = ("context_length", "max_model_len", "context_window", "max_context_length")

# What Ollama reports for a model loaded with the default keep_alive.
_PS_KEEP_ALIVE_NS = 5 * 60 * 1_000_000_000


def ollama_ps(
    models: list[JSONDict], mapper: ModelMapper, *, now_ns: int | None = None
) -> JSONDict:
    """``/api/ps``: every backend model counts as loaded (the backend serves them all), with
    ``expires_at`` = now + Ollama's default keep-alive of 5 minutes."""
    if now_ns is None:
        now_ns = time.time_ns()
    expires = utc_timestamp(now_ns + _PS_KEEP_ALIVE_NS)
    out = []
    for name, entry in _listed(models, mapper, tagged=True):
        declared = mapper.declared(name)
        context = (
            (declared and declared.context_length)
            or _context_length(entry)
            # llama.cpp's server: the window it serves (n_ctx), which may be below the
            # model's trained one (n_ctx_train, what /api/show reports)
            or whole_number(_gguf_meta(entry).get("n_ctx"))
            or 0
        )
        out.append(
            {
                "name": name,
                "model": name,
                "size": 0,
                "digest": _digest(entry["id"]),
                "details": _details(entry["id"], entry),
                "expires_at": expires,
                "size_vram": 0,
                "context_length": context,
            }
        )
    return {"models": out}


# /api/ps is written once per list as of the epoch, split where each model's expiry goes,
# and joined with each request's: for 760 models building and encoding the answer cost
# 2.4 ms a poll, the join 6 µs (bytes.replace 150 µs). The key and its quotes make the
# spot unambiguous: inside a JSON string a quote is escaped, so no name can spell it.
def _expiry(now_ns: int) -> bytes:
    return b'"expires_at":"' + utc_timestamp(now_ns + _PS_KEEP_ALIVE_NS).encode() + b'"'


_TEMPLATE_EXPIRY = _expiry(0)


def ollama_ps_template(models: list[JSONDict], mapper: ModelMapper) -> JSONDict:
    """:func:`ollama_ps` as of the epoch: encoded once per list, then split
    (:func:`ollama_ps_parts`) and given each request's time (:func:`ollama_ps_joined`)."""
    return ollama_ps(models, mapper, now_ns=0)


def ollama_ps_parts(template: bytes) -> list[bytes]:
    """The encoded :func:`ollama_ps_template` cut where each ``expires_at`` goes."""
    return template.split(_TEMPLATE_EXPIRY)


def ollama_ps_joined(parts: list[bytes], now_ns: int | None = None) -> bytes:
    """The answer :func:`ollama_ps` encodes at ``now_ns`` (now by default), from
    :func:`ollama_ps_parts`: the same bytes."""
    return _expiry(time.time_ns() if now_ns is None else now_ns).join(parts)


def ollama_pull_progress() -> list[JSONDict]:
    """``/api/pull``'s progress lines for a model the backend serves: Ollama's first and
    last (its lines between count the bytes of layers it downloads; there are none).
    ollama-js ends a pull stream at ``status: "success"`` and throws without it."""
    return [{"status": "pulling manifest"}, {"status": "success"}]


def openai_model_entry(
    client_name: str,
    backend_entry: JSONDict | None = None,
    declared: DeclaredModel | None = None,
) -> JSONDict:
    """One OpenAI model object under its client-facing id, with the backend's other
    fields (vLLM's ``max_model_len``, OpenRouter's ``context_length``, pricing: what
    clients size their prompts by; a context window the mapping file ``declared`` in
    those the entry has). ``created`` is always an int (strict SDK validation rejects
    entries without it, as llama-cpp-python's lack it)."""
    entry = backend_entry or {}
    owned_by = entry.get("owned_by")
    backend_id = entry.get("id")
    out = {
        # a field naming the backend's id (vLLM's "root") would undo a model mapping
        **{key: value for key, value in entry.items() if value != backend_id},
        "id": client_name,
        "object": "model",
        "created": _int(entry.get("created")),
        "owned_by": owned_by if isinstance(owned_by, str) and owned_by else "trioproxy",
    }
    if declared is not None and declared.context_length is not None:
        for key in _CONTEXT_KEYS:  # OpenAI's model object has none: no field is added
            if key in out:
                out[key] = declared.context_length
    return out


def openai_model_list(models: list[JSONDict], mapper: ModelMapper) -> JSONDict:
    """Backend ``/models`` ``data`` as a client-facing OpenAI list."""
    return {
        "object": "list",
        "data": [
            openai_model_entry(name, entry, mapper.declared(name))
            for name, entry in _listed(models, mapper)
        ],
    }
