"""Model mapping: lookups both ways and the two mapping-file shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trioproxy.model_mapping import (
    DeclaredModel,
    MappingFileError,
    ModelMapper,
    load_mapping_file,
    ollama_key,
    read_mapping_file,
    same_model,
    with_default_tag,
)


def test_empty_mapper_is_identity() -> None:
    m = ModelMapper()
    assert m.to_backend("llama3") == "llama3"
    assert m.to_client("llama3") == "llama3"
    assert len(m) == 0
    assert list(m.items()) == []


def test_forward_and_reverse() -> None:
    m = ModelMapper({"llama3": "meta/Llama-3-8B", "qwen": "Qwen/Qwen2.5"})
    assert m.to_backend("llama3") == "meta/Llama-3-8B"
    assert m.to_backend("LLAMA3") == "LLAMA3"  # exact, case-sensitive
    assert m.to_backend("other") == "other"
    assert m.to_client("Qwen/Qwen2.5") == "qwen"
    assert m.to_client("unknown/backend") == "unknown/backend"
    assert len(m) == 2
    assert dict(m.items()) == {"llama3": "meta/Llama-3-8B", "qwen": "Qwen/Qwen2.5"}
    assert "llama3" in m and "meta/Llama-3-8B" not in m


def test_many_to_one_first_in_file_order_wins() -> None:
    m = ModelMapper({"b-name": "backend", "a-name": "backend"})
    assert m.to_client("backend") == "b-name"
    assert m.clients_for("backend") == ["b-name", "a-name"]
    assert m.clients_for("nothing") == []


def _write(tmp_path: Path, content: str) -> Path:
    p = tmp_path / "map.json"
    p.write_text(content, encoding="utf-8")
    return p


def test_load_flat(tmp_path: Path) -> None:
    p = _write(tmp_path, json.dumps({"llama3": "meta/Llama-3-8B", "é": "x"}))
    assert load_mapping_file(p) == {"llama3": "meta/Llama-3-8B", "é": "x"}
    assert load_mapping_file(str(p)) == {"llama3": "meta/Llama-3-8B", "é": "x"}


def test_load_nested_ignores_other_keys(tmp_path: Path) -> None:
    doc = {"model_mappings": {"a": "A", "b": "B"}, "default_model": "a", "version": 2}
    p = _write(tmp_path, json.dumps(doc))
    mapping = load_mapping_file(p)
    assert mapping == {"a": "A", "b": "B"}
    assert list(mapping) == ["a", "b"]  # file order preserved for reverse lookups


def test_load_extended_entries_in_either_shape(tmp_path: Path) -> None:
    """An entry may be an object that names the backend's model and declares what the
    model can do and its window; without "model" the name goes to the backend as it is."""
    entries = {
        "llama3": {"model": "gpt-4o-mini", "capabilities": ["completion", "tools", "vision"],
                   "context_length": 128000},
        "gpt-4o": {"capabilities": ["completion", "tools", "vision", "thinking"]},
        "qwen": {"model": "Qwen/Qwen2.5", "context_length": 32768},
        "renamed": {"model": "backend-name"},
        "nomic": {"capabilities": ["embedding"]},
        "old": "old-backend",
    }  # fmt: skip
    for doc in (entries, {"model_mappings": entries, "default_model": "llama3"}):
        read = read_mapping_file(_write(tmp_path, json.dumps(doc)))
        assert read.mapping == {
            "llama3": "gpt-4o-mini",
            "qwen": "Qwen/Qwen2.5",
            "renamed": "backend-name",
            "old": "old-backend",
        }
        assert read.declared == {
            "llama3": DeclaredModel(("completion", "tools", "vision"), 128000),
            "gpt-4o": DeclaredModel(("completion", "tools", "vision", "thinking"), None),
            "qwen": DeclaredModel(None, 32768),
            "nomic": DeclaredModel(("embedding",), None),
        }
        assert list(read.declared) == ["llama3", "gpt-4o", "qwen", "nomic"]  # file order
        assert load_mapping_file(_write(tmp_path, json.dumps(doc))) == read.mapping


def test_declared_facts_are_found_as_mapped_names_are() -> None:
    """NAME is NAME:latest, as for the mapping; otherwise exact (case-sensitive)."""
    llama = DeclaredModel(("completion", "tools", "vision"), 8192)
    tagged = DeclaredModel(None, 4096)
    m = ModelMapper({"llama3": "x"}, {"llama3": llama, "qwen:7b": tagged, "phi:latest": llama})
    assert m.declared("llama3") is m.declared("llama3:latest") is llama
    assert m.declared("phi") is m.declared("phi:latest") is llama
    assert m.declared("qwen:7b") is tagged
    assert m.declared("qwen") is None and m.declared("qwen:latest") is None
    assert m.declared("LLAMA3") is None and m.declared("llama3:8b") is None
    assert m.declared(":latest") is None
    assert ModelMapper({"a": "b"}).declared("a") is None  # a plain mapping declares nothing
    assert m.to_backend("qwen:7b") == "qwen:7b"  # a declaration maps nothing


def test_load_empty_object(tmp_path: Path) -> None:
    assert load_mapping_file(_write(tmp_path, "{}")) == {}


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must contain a JSON object"),
        ('"x"', "must contain a JSON object"),
        ('{"a": 1}', "'a'"),
        ('{"a": null}', "'a'"),
        ('{"a": ""}', "non-empty"),
        ('{"": "x"}', "empty model name"),
        ('{"model_mappings": [1]}', "'model_mappings'"),
        ('{"model_mappings": {"a": {"b": "c"}}}', "'a'"),
        ('{"a": "x", "a": "y"}', "duplicate key 'a'"),
    ],
)
def test_load_errors(tmp_path: Path, content: str, needle: str) -> None:
    with pytest.raises(MappingFileError, match=needle):
        load_mapping_file(_write(tmp_path, content))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MappingFileError, match="does not exist"):
        load_mapping_file(tmp_path / "nope.json")


def test_unreadable_path(tmp_path: Path) -> None:
    with pytest.raises(MappingFileError, match="cannot read"):
        load_mapping_file(tmp_path)  # a directory


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "map.json"
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(MappingFileError, match="cannot read"):
        load_mapping_file(p)


def test_error_is_value_error() -> None:
    assert issubclass(MappingFileError, ValueError)


def test_ollamas_default_tag_names_the_same_model() -> None:
    assert with_default_tag("llama3") == "llama3:latest"
    assert with_default_tag("qwen2.5:7b") == "qwen2.5:7b"
    assert with_default_tag("hf.co/org/model") == "hf.co/org/model:latest"
    assert with_default_tag("localhost:5000/org/model") == "localhost:5000/org/model:latest"
    assert same_model("llama3.2:latest", "llama3.2") and same_model("gpt-4o", "gpt-4o:latest")
    assert not same_model("llama3.2:1b", "llama3.2")


def test_ollamas_key_folds_case_default_prefixes_and_tag() -> None:
    same = ["llama3", "Llama3:Latest", "library/LLAMA3", "registry.ollama.ai/library/llama3"]
    assert {ollama_key(name) for name in same} == {"llama3:latest"}
    assert ollama_key("Qwen/Qwen2.5-7B-Instruct") == "qwen/qwen2.5-7b-instruct:latest"
    assert ollama_key("llama3:8B") == "llama3:8b" != ollama_key("llama3")
    assert ollama_key("library/") == "library/:latest"  # nothing left to name: kept
    assert ollama_key("myorg/llama3") != ollama_key("llama3")  # another namespace
    assert ollama_key("STRASSE") != ollama_key("straße")  # Go's EqualFold: simple folding


def test_a_latest_tag_the_mapping_does_not_name_goes_to_the_backend_without_it() -> None:
    """Open WebUI sends NAME:latest for every name it listed without a tag."""
    bare = ModelMapper()
    assert bare.to_backend("gpt-4o-mini:latest") == "gpt-4o-mini"
    assert bare.to_backend("gpt-4o-mini") == "gpt-4o-mini"
    assert bare.to_backend(":latest") == ":latest"
    mapped = ModelMapper({"llama3": "meta/Llama-3-8B", "phi:latest": "microsoft/phi-4"})
    assert mapped.to_backend("llama3:latest") == "meta/Llama-3-8B"
    assert mapped.to_backend("phi") == "microsoft/phi-4"
    assert mapped.to_backend("phi:latest") == "microsoft/phi-4"
    assert mapped.to_backend("qwen:7b") == "qwen:7b"


def test_a_spelling_two_listed_ids_share_is_not_guessed() -> None:
    from trioproxy.catalog import _by_key

    by_key = _by_key(frozenset({"Foo", "foo", "library/bar", "Qwen/Qwen2.5"}))
    assert "foo:latest" not in by_key  # "FOO" could be either: the backend decides
    assert by_key["bar:latest"] == "library/bar"
    assert by_key["qwen/qwen2.5:latest"] == "Qwen/Qwen2.5"


def test_maps_reads_a_name_as_to_backend_does() -> None:
    mapper = ModelMapper({"llama3": "meta/Llama-3-8B", "phi:latest": "microsoft/phi-4"})
    assert mapper.maps("llama3") and mapper.maps("llama3:latest")
    assert mapper.maps("phi") and mapper.maps("phi:latest")
    assert not mapper.maps("meta/Llama-3-8B")  # a target is no client name
    assert not mapper.maps("qwen") and not mapper.maps("phi:3b")
    assert not ModelMapper().maps("x")


async def test_a_list_the_readiness_check_fetched_is_kept_masked_and_only_if_a_list() -> None:
    import trio

    from trioproxy.catalog import TAKEN_LIST_BYTES, ModelCatalog, model_list
    from trioproxy.errors import BackendSecrets

    secrets = BackendSecrets.of("sk-backend-secret-123456")
    catalog = ModelCatalog()
    asked = trio.current_time()
    for not_a_list in (b"<html>", b'{"error": "busy"}', b'{"data": 5}', b"[]", b""):
        await catalog.take(not_a_list, secrets, asked)
        assert catalog.spelling("foo") == "foo" and not catalog.lists_now("foo")
    listing = {"data": [{"id": "Foo", "owned_by": "sk-backend-secret-123456"}, {"x": 1}]}
    await catalog.take(json.dumps(listing).encode(), secrets, asked)
    assert catalog.spelling("foo") == "Foo" and catalog.lists_now("Foo")
    assert catalog.entry("FOO:latest") == {"id": "Foo", "owned_by": "***"}
    # a review: a slow check's answer put an older list back over a newer one
    await catalog.take(json.dumps({"data": [{"id": "Old"}]}).encode(), secrets, asked - 1)
    assert catalog.lists_now("Foo") and not catalog.lists_now("Old")
    old = model_list(b'{"data": [{"id": "Old"}]}', secrets)
    assert old is not None
    catalog._keep(old, asked - 1)  # nor a request's fetch asked for earlier
    assert catalog.lists_now("Foo") and not catalog.lists_now("Old")
    huge = json.dumps({"data": [{"id": "Big", "pad": "x" * TAKEN_LIST_BYTES}]}).encode()
    await catalog.take(huge, secrets, asked + 1)  # a probe would wait for it: left to a route
    assert not catalog.lists_now("Big")
