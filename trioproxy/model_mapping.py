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
from typing import Any

__all__ = [
    "DEFAULT_TAG",
    "MappingFileError",
    "ModelMapper",
    "load_mapping_file",
    "ollama_key",
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


class ModelMapper:
    """Forward (client -> backend) and reverse (backend -> client) model-name lookup.

    Many client names may map to one backend name. The reverse lookup then returns the
    **first** of them in mapping (file) order: that is stable and lets an operator choose the
    name responses carry by listing it first. :meth:`clients_for` returns all of them.
    """

    __slots__ = ("_forward", "_reverse")

    def __init__(self, mapping: Mapping[str, str] | None = None) -> None:
        self._forward: dict[str, str] = dict(mapping or {})
        self._reverse: dict[str, list[str]] = {}
        for client, backend in self._forward.items():
            self._reverse.setdefault(backend, []).append(client)

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
    """Read a JSON mapping file.

    Two shapes are accepted:

    * flat: ``{"llama3": "meta-llama/Meta-Llama-3-8B-Instruct", ...}``
    * nested: ``{"model_mappings": {...}, "default_model": ..., ...}``; keys other than
      ``model_mappings`` are ignored.

    Names must be non-empty strings, and duplicate keys are rejected (JSON parsers silently keep
    the last one, which would hide a mistake in the file).
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


def _mapping_from_document(doc: object, where: str) -> dict[str, str]:
    if not isinstance(doc, dict):
        raise MappingFileError(
            f"model mapping file {where!r} must contain a JSON object, got {_json_type(doc)}"
        )
    if "model_mappings" in doc:
        mapping = doc["model_mappings"]
        if not isinstance(mapping, dict):
            raise MappingFileError(
                f"'model_mappings' in {where!r} must be an object, got {_json_type(mapping)}"
            )
    else:
        mapping = doc
    for client, backend in mapping.items():
        if not client:
            raise MappingFileError(f"model mapping file {where!r} has an empty model name")
        if not isinstance(backend, str) or not backend:
            raise MappingFileError(
                f"model mapping for {client!r} in {where!r} must be a non-empty string, "
                f"got {_json_type(backend)}"
            )
    return dict(mapping)


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
