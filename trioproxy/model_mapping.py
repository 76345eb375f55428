"""Client-facing model names <-> backend model names.

Clients ask for Ollama-style names ("llama3:8b"); the backend may call the same model
"meta-llama/Meta-Llama-3-8B-Instruct". The mapping is an exact, case-sensitive lookup; names
without an entry pass through unchanged in both directions, so an empty mapper is the identity.

One rule of Ollama's comes on top: a name without a tag means ``NAME:latest``, and the two
spellings are one model. Ollama clients rely on it (Open WebUI adds ``:latest`` to every
name without a tag before it looks the model up in ``/api/tags``), while OpenAI-compatible
backends list their ids without tags. So Ollama's lists show every name with its tag
(:func:`with_default_tag`), and a name ending in ``:latest`` that the mapping does not name
goes to the backend without it (unless the backend lists it with the tag: see
``catalog.backend_name_for``). And Ollama finds a model whatever the case of its name, and
without its default registry and namespace (``library/x``): a name the backend does not list
as spelled goes as the backend lists it when it lists exactly one such (:func:`ollama_key`).
"""

from __future__ import annotations

import json
import os
from collections.abc import ItemsView, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DECLARABLE_CAPABILITIES",
    "DEFAULT_TAG",
    "DeclaredModel",
    "MappingFile",
    "MappingFileError",
    "ModelMapper",
    "load_mapping_file",
    "ollama_key",
    "read_mapping_file",
    "same_model",
    "with_default_tag",
]

DEFAULT_TAG = ":latest"


def _has_tag(name: str) -> bool:
    return ":" in name.rpartition("/")[2]  # "host:5000/model" has none


def with_default_tag(name: str) -> str:
    """Ollama's full spelling of a model name: one without a tag is ``NAME:latest``."""
    return name if _has_tag(name) else name + DEFAULT_TAG


# Ollama's defaults for a name's registry and namespace (its types/model ParseName):
# "library/x" and "registry.ollama.ai/library/x" are "x"
_OLLAMA_DEFAULT_PREFIXES = ("registry.ollama.ai/library/", "library/")


def ollama_key(name: str) -> str:
    """A model name as Ollama compares names: case aside (Go's ``strings.EqualFold``;
    ``lower`` agrees with it on ASCII names, and ``casefold`` would not even on some
    others: it makes "ß" "ss"), its default registry and namespace aside, ``NAME`` as
    ``NAME:latest``."""
    folded = name.lower()
    for prefix in _OLLAMA_DEFAULT_PREFIXES:
        if folded.startswith(prefix) and len(folded) > len(prefix):
            folded = folded[len(prefix) :]
            break
    return with_default_tag(folded)


def same_model(listed: str, wanted: str) -> bool:
    """Whether two names are one model by Ollama's rule (``NAME`` is ``NAME:latest``)."""
    return listed == wanted or with_default_tag(listed) == with_default_tag(wanted)


class MappingFileError(ValueError):
    """The model mapping file is missing, unreadable or malformed."""


# Ollama's capabilities (its types/model Capability) that an operator may declare. Not
# "insert": trioproxy refuses a suffix (chat completions have no fill-in-the-middle), and a
# client told the model inserts would send one with every request.
DECLARABLE_CAPABILITIES = ("completion", "tools", "vision", "embedding", "thinking")

# the largest context window a file may declare: a 32-bit int, as clients and backends keep it
# (llama.cpp's n_ctx); the largest windows served are some 10 million tokens
MAX_CONTEXT_LENGTH = 2**31 - 1


@dataclass(frozen=True, slots=True)
class DeclaredModel:
    """What the mapping file declares of a client's model name; ``None`` leaves a fact to the
    backend's list. ``capabilities`` is the whole list ``/api/show`` gives."""

    capabilities: tuple[str, ...] | None = None
    context_length: int | None = None


@dataclass(frozen=True, slots=True)
class MappingFile:
    """A mapping file read: client name -> backend name (file order), and what it declares of
    client names (some of which it may not map: a model served under its own name)."""

    mapping: dict[str, str]
    declared: dict[str, DeclaredModel]


class ModelMapper:
    """Forward (client -> backend) and reverse (backend -> client) model-name lookup.

    Many client names may map to one backend name. The reverse lookup then returns the
    **first** of them in mapping (file) order: that is stable and lets an operator choose the
    name responses carry by listing it first. :meth:`clients_for` returns all of them.
    """

    __slots__ = ("_declared", "_forward", "_reverse")

    def __init__(
        self,
        mapping: Mapping[str, str] | None = None,
        declared: Mapping[str, DeclaredModel] | None = None,
    ) -> None:
        self._forward: dict[str, str] = dict(mapping or {})
        self._reverse: dict[str, list[str]] = {}
        for client, backend in self._forward.items():
            self._reverse.setdefault(backend, []).append(client)
        self._declared: dict[str, DeclaredModel] = dict(declared or {})

    def to_backend(self, name: str) -> str:
        mapped = self._forward.get(name)
        if mapped is not None:
            return mapped
        if name.endswith(DEFAULT_TAG) and len(name) > len(DEFAULT_TAG):
            bare = name[: -len(DEFAULT_TAG)]
            return self._forward.get(bare, bare)
        if self._forward and not _has_tag(name):
            return self._forward.get(name + DEFAULT_TAG, name)
        return name

    def maps(self, name: str) -> bool:
        """Whether the mapping names this client name (as :meth:`to_backend` reads it)."""
        if name in self._forward:
            return True
        if name.endswith(DEFAULT_TAG) and len(name) > len(DEFAULT_TAG):
            return name[: -len(DEFAULT_TAG)] in self._forward
        return not _has_tag(name) and name + DEFAULT_TAG in self._forward

    def drops_tag(self, name: str) -> bool:
        """Whether :meth:`to_backend` takes ``:latest`` off a name the mapping does not
        name under either spelling."""
        if not name.endswith(DEFAULT_TAG) or len(name) == len(DEFAULT_TAG):
            return False
        return name not in self._forward and name[: -len(DEFAULT_TAG)] not in self._forward

    def declared(self, name: str) -> DeclaredModel | None:
        """What the file declares of a client name, found as :meth:`to_backend` finds its
        entry (exactly, ``NAME`` as ``NAME:latest``); None if it declares nothing. Read by
        the model routes (show, ps, the model lists), never on a request's path."""
        declared = self._declared
        if not declared:
            return None
        found = declared.get(name)
        if found is not None:
            return found
        if name.endswith(DEFAULT_TAG) and len(name) > len(DEFAULT_TAG):
            return declared.get(name[: -len(DEFAULT_TAG)])
        return None if _has_tag(name) else declared.get(name + DEFAULT_TAG)

    def to_client(self, name: str) -> str:
        clients = self._reverse.get(name)
        return clients[0] if clients else name

    def clients_for(self, backend_name: str) -> list[str]:
        """Every client name mapped to ``backend_name``, in file order (empty if unmapped)."""
        return list(self._reverse.get(backend_name, ()))

    def items(self) -> ItemsView[str, str]:
        return self._forward.items()

    def __len__(self) -> int:
        return len(self._forward)

    def __contains__(self, client_name: object) -> bool:
        return client_name in self._forward

    def __repr__(self) -> str:
        return f"ModelMapper({self._forward!r})"


def load_mapping_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """The client name -> backend name mapping of a file (:func:`read_mapping_file`)."""
    return read_mapping_file(path).mapping


def read_mapping_file(path: str | os.PathLike[str]) -> MappingFile:
    """Read a JSON mapping file.

    Two shapes are accepted:

    * flat: ``{"llama3": "meta-llama/Meta-Llama-3-8B-Instruct", ...}``
    * nested: ``{"model_mappings": {...}, "default_model": ..., ...}``; keys other than
      ``model_mappings`` are ignored.

    An entry's value is the backend's name, or an object that may name it (``model``; left
    out, the client's name goes to the backend as it is) and declare ``capabilities`` and
    ``context_length``: ``{"llama3": {"model": "gpt-4o-mini", "capabilities": ["completion",
    "tools", "vision"], "context_length": 128000}}``.

    Names must be non-empty strings, and duplicate keys are rejected (JSON parsers silently keep
    the last one, which would hide a mistake in the file); so is anything else an entry says
    that trioproxy would not use as written (an unknown key or capability, a window that is no
    whole number), with the entry named.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise MappingFileError(f"model mapping file {os.fspath(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MappingFileError(
            f"cannot read model mapping file {os.fspath(path)!r}: {exc}"
        ) from None
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise MappingFileError(
            f"model mapping file {os.fspath(path)!r} is not valid JSON: "
            f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except _DuplicateKey as exc:
        raise MappingFileError(
            f"model mapping file {os.fspath(path)!r} has duplicate key {exc.args[0]!r}"
        ) from None
    return _mapping_from_document(doc, os.fspath(path))


class _DuplicateKey(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _mapping_from_document(doc: object, where: str) -> MappingFile:
    if not isinstance(doc, dict):
        raise MappingFileError(
            f"model mapping file {where!r} must contain a JSON object, got {_json_type(doc)}"
        )
    if "model_mappings" in doc:
        entries = doc["model_mappings"]
        if not isinstance(entries, dict):
            raise MappingFileError(
                f"'model_mappings' in {where!r} must be an object, got {_json_type(entries)}"
            )
    else:
        entries = doc
    mapping: dict[str, str] = {}
    declared: dict[str, DeclaredModel] = {}
    for client, value in entries.items():
        if not client:
            raise MappingFileError(f"model mapping file {where!r} has an empty model name")
        if isinstance(value, dict):
            backend, facts = _extended_entry(value, f"model mapping for {client!r} in {where!r}")
            if backend is not None:
                mapping[client] = backend
            if facts is not None:
                declared[client] = facts
        elif isinstance(value, str) and value:
            mapping[client] = value
        else:
            raise MappingFileError(
                f"model mapping for {client!r} in {where!r} must be a non-empty string "
                f"(the backend's name) or an object, got {_json_type(value)}"
            )
    return MappingFile(mapping, declared)


_ENTRY_KEYS = ("model", "capabilities", "context_length")


def _extended_entry(entry: dict[str, Any], what: str) -> tuple[str | None, DeclaredModel | None]:
    """An entry given as an object: the backend's name (None: the client's own) and what it
    declares (None: nothing)."""
    unknown = [key for key in entry if key not in _ENTRY_KEYS]
    if unknown:
        raise MappingFileError(
            f"{what} has an unknown key {unknown[0]!r} (it may have {', '.join(_ENTRY_KEYS)})"
        )
    if not entry:
        raise MappingFileError(f"{what} is an empty object: give {', '.join(_ENTRY_KEYS)}")
    backend = entry.get("model")
    if "model" in entry and (not isinstance(backend, str) or not backend):
        raise MappingFileError(
            f"{what}: 'model' must be a non-empty string (the backend's name), "
            f"got {_json_type(backend)}"
        )
    capabilities = (
        _declared_capabilities(entry["capabilities"], what) if "capabilities" in entry else None
    )
    context = (
        _declared_context(entry["context_length"], what) if "context_length" in entry else None
    )
    facts = None
    if capabilities is not None or context is not None:
        facts = DeclaredModel(capabilities, context)
    return backend, facts


def _declared_capabilities(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise MappingFileError(
            f"{what}: 'capabilities' must be a list of Ollama's capabilities "
            f"({', '.join(DECLARABLE_CAPABILITIES)}), got {_json_type(value)}"
        )
    for capability in value:
        if capability == "insert":
            raise MappingFileError(
                f"{what}: 'insert' cannot be declared: trioproxy answers a suffix "
                "(fill-in-the-middle) with an error, as chat completions have no way to ask "
                "for it"
            )
        if capability not in DECLARABLE_CAPABILITIES:
            shown = repr(capability) if isinstance(capability, str) else _json_type(capability)
            raise MappingFileError(
                f"{what}: capability {shown} is not one of Ollama's "
                f"({', '.join(DECLARABLE_CAPABILITIES)})"
            )
        if value.count(capability) > 1:
            raise MappingFileError(f"{what}: capability {capability!r} is listed twice")
    if "completion" not in value and "embedding" not in value:
        raise MappingFileError(
            f"{what}: 'capabilities' must list 'completion' or 'embedding' (it is the whole "
            "list /api/show gives, and every model generates or embeds)"
        )
    return tuple(value)


def _declared_context(value: object, what: str) -> int:
    if type(value) is not int or not 0 < value <= MAX_CONTEXT_LENGTH:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        shown = repr(value) if number else _json_type(value)
        raise MappingFileError(
            f"{what}: 'context_length' must be a whole number of tokens from 1 to "
            f"{MAX_CONTEXT_LENGTH}, got {shown}"
        )
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
