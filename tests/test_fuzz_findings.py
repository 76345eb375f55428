"""What a fuzzing review found: client mistakes that were 500s, and backend answers of
odd shape that were 500s (or an empty answer) instead of the backend's 502. Each input is
the smallest that failed; the end-to-end test sends the backend's over real sockets."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from trioproxy import relay
from trioproxy.jsonutil import loads
from trioproxy.ledger import finished_usage, pending_id
from trioproxy.model_mapping import ModelMapper
from trioproxy.translate import (
    RequestValidationError,
    ollama_chat_to_openai,
    ollama_ps,
    openai_models_to_ollama_tags,
    validate_ollama_chat,
    validate_ollama_embed,
    validate_ollama_generate,
)

from .conftest import ServerProcess
from .fakes import ScriptedHandler, serving

StartProxy = Callable[..., ServerProcess]
HI = [{"role": "user", "content": "hi"}]


def test_an_integer_no_float_holds_in_options_is_a_400() -> None:
    huge = json.loads('{"model": "m", "options": {"temperature": 1' + "0" * 309 + "}}")
    with pytest.raises(RequestValidationError, match=r"options\.temperature"):
        validate_ollama_generate(huge)
    with pytest.raises(RequestValidationError, match=r"options\.seed"):
        validate_ollama_embed({"model": "m", "options": {"seed": 10**309}})


def test_a_think_nested_as_deep_as_json_is_read_is_a_400() -> None:
    deep = loads('{"model": "m", "think": ' + "[" * 1000 + "]" * 1000 + "}")
    with pytest.raises(RequestValidationError, match="think"):
        validate_ollama_chat(deep)


def test_a_schema_requiring_no_names_is_sent_without_strict() -> None:
    schema = {"type": "object", "additionalProperties": False, "properties": {}, "required": [[]]}
    body = validate_ollama_chat({"model": "m", "messages": HI, "format": schema})
    response_format = ollama_chat_to_openai(body, "b")["response_format"]
    assert "strict" not in response_format["json_schema"]


def test_odd_backend_values_are_no_exceptions() -> None:
    assert relay._client_status({"code": "\u00b2"}) is None  # a digit int() refuses
    assert relay._client_status({"status": "4" * 5000}) is None  # past int()'s limit
    assert relay._client_status({"code": "\u0664\u0660\u0660"}) is None  # not ASCII
    assert relay._client_status({"code": "429"}) == 429
    assert relay._client_status({"code": ["invalid_image"]}) is None  # unhashable
    assert pending_id({"id": "r", "status": [0]}) == "r" and finished_usage({"status": {}}) is None
    lone = [{"id": "\ud83d"}]  # JSON's "\ud83d": no UTF-8 spelling
    assert openai_models_to_ollama_tags(lone, ModelMapper())["models"][0]["digest"]
    assert ollama_ps(lone, ModelMapper())["models"]
    with pytest.raises(relay._NotAStream):
        relay._completion({"choices": [{"message": "x"}]})
    # a review: null is no message, and a choice with a delta keeps it
    legacy = {"choices": [{"text": "hi", "message": None}]}
    assert relay._completion(legacy) is legacy
    choice = {"delta": {"content": "hi"}, "message": None, "index": 0}
    assert relay._choice_as_delta(choice)["delta"] == {"content": "hi"}


class _OddBackend(ScriptedHandler):
    """Answers as the model's name says."""

    def do_GET(self) -> None:
        models = [{"id": name} for name in ANSWERS] + [{"id": "\ud83d"}]  # a lone surrogate
        self.answer(200, json.dumps({"object": "list", "data": models}).encode())

    def do_POST(self) -> None:
        content_type, body = ANSWERS[self.json_body()["model"]]
        self.answer(200, body, content_type)


def _events(*chunks: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)


SUPERSCRIPT_CODE = {"error": {"message": "boom", "code": "\u00b2"}}
ANSWERS = {
    "message-not-an-object": ("application/json", b'{"choices": [{"message": "x"}]}'),
    "error-code-superscript": ("text/event-stream", _events(SUPERSCRIPT_CODE)),
}


def test_odd_backend_answers_are_the_backends_502_not_ours(start_proxy: StartProxy) -> None:
    with serving(_OddBackend) as url:
        proxy = start_proxy(url, MAX_RETRIES="0")
        with httpx.Client(base_url=proxy.url, timeout=10) as client:
            for path in ("/api/tags", "/api/ps"):
                assert client.get(path).status_code == 200
            for model in ANSWERS:
                for path in ("/api/chat", "/v1/chat/completions"):
                    body = {"model": model, "messages": HI, "stream": True}
                    answer = client.post(path, json=body)
                    assert answer.status_code == 502, (model, path, answer.text)
    assert "unhandled error" not in proxy.log()
