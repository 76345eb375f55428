"""The official ``anthropic`` Python SDK against a real proxy on ``/v1/messages``.

The proxy translates the Messages API to the demo backend's chat completions (it runs in
its own process). What Claude Code and the SDK need: answers and streams the SDK reads
with its own types (strict response validation), tool round trips, thinking, errors in
Anthropic's shape with the statuses the SDK maps to its exception classes, client keys
sent as ``x-api-key`` or a bearer token, and the proxy's metrics for the route.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from prometheus_client.parser import text_string_to_metric_families
from pydantic import TypeAdapter

from .conftest import ServerProcess, demo_events_for
from .test_access_addresses import access_lines
from .test_metrics_e2e import wait_for

WEATHER: Any = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": f"{text} {uuid.uuid4().hex[:10]}"}]


@pytest.fixture(scope="module")
def server(demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]) -> ServerProcess:
    """A proxy of this module's own: its metrics count only these requests."""
    return start_proxy(
        demo_backend.url,
        MAX_RETRIES="0",
        THINK_OFF_EXTRA_BODY='{"chat_template_kwargs": {"enable_thinking": false}}',
        ACCESS_LOG="true",  # (its lines name the request ids the SDK reads)
    )


@pytest.fixture
def client(server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    sdk = anthropic.Anthropic(
        base_url=server.url,
        api_key="ignored",
        max_retries=0,
        timeout=30,
        _strict_response_validation=True,
    )
    yield sdk
    sdk.close()


def test_text_answer(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="demo-chat",
        max_tokens=100,
        system="You are terse.",
        messages=ask("hello [[tokens=5]]"),
        metadata={"user_id": "someone"},
    )
    assert message.id.startswith("msg_")
    assert message.model == "demo-chat"
    assert message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello from the trioproxy demo"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 5
    assert message.usage.input_tokens > 0


def test_max_tokens_cuts_the_answer(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="demo-chat", max_tokens=3, messages=ask("long [[tokens=20]]")
    )
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 3


def test_stream_text_and_final_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="demo-chat", max_tokens=100, messages=ask("stream [[tokens=5]]")
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the trioproxy demo"
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5
    assert final.usage.input_tokens > 0


def test_raw_stream_events_in_order(server: ServerProcess) -> None:
    """The events as sent: named, each one the SDK's type, in the documented order."""
    body = {
        "model": "demo-chat",
        "max_tokens": 100,
        "stream": True,
        "messages": ask("raw [[tokens=4]]"),
    }
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = []
    for chunk in text.split("\n\n"):
        if not chunk.strip():
            continue
        name, data = chunk.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(EVENTS.validate_python(event))
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1] == "content_block_start" and kinds[-3] == "content_block_stop"
    assert set(kinds[2:-3]) == {"content_block_delta"}


def test_raw_create_stream(client: anthropic.Anthropic) -> None:
    stream = client.messages.create(
        model="demo-chat", max_tokens=50, stream=True, messages=ask("[[tokens=3]]")
    )
    kinds = [event.type for event in stream]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_round_trip(client: anthropic.Anthropic, streamed: bool) -> None:
    history: list[Any] = ask("weather in Paris?")
    partial: list[str] = []  # the call's input as it was streamed

    def create(**more: Any) -> Message:
        args: dict[str, Any] = {"model": "demo-chat", "max_tokens": 200, "tools": [WEATHER]}
        if streamed:
            with client.messages.stream(**args, **more) as stream:
                partial.extend(e.partial_json for e in stream if e.type == "input_json")
                return stream.get_final_message()
        return client.messages.create(**args, **more)

    first = create(messages=history, tool_choice={"type": "any"})
    assert first.stop_reason == "tool_use"
    if streamed:  # in pieces as the backend wrote them, not whole at the end
        assert len(partial) > 1 and json.loads("".join(partial)) == {"city": "demo"}
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.input == {"city": "demo"}
    history += [
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21 C"}],
        },
    ]
    second = create(messages=history)
    assert second.stop_reason == "end_turn"
    assert second.content[0].text.startswith("Thanks! The tool returned: sunny")  # type: ignore[union-attr]


class City(pydantic.BaseModel):
    name: str
    population: int


def test_parse_structured_output(client: anthropic.Anthropic) -> None:
    """messages.parse with a pydantic model: the schema reaches the backend (the demo
    answers with an example of it), the SDK reads the answer as the model."""
    message = client.messages.parse(
        model="demo-chat", max_tokens=100, messages=ask("a city"), output_format=City
    )
    assert message.parsed_output == City(name="demo", population=1)


def test_tool_choice_none_sends_no_tools(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="demo-chat",
        max_tokens=100,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=ask("[[tokens=2]]"),
    )
    assert [block.type for block in message.content] == ["text"]


@pytest.mark.parametrize("streamed", [False, True])
def test_thinking(client: anthropic.Anthropic, streamed: bool) -> None:
    def create(**more: Any) -> Message:
        args: dict[str, Any] = {"model": "demo-reasoner", "max_tokens": 100}
        if streamed:
            with client.messages.stream(**args, **more) as stream:
                return stream.get_final_message()
        return client.messages.create(**args, **more)

    shown = create(
        messages=ask("think [[tokens=3]]"), thinking={"type": "enabled", "budget_tokens": 1024}
    )
    assert [block.type for block in shown.content] == ["thinking", "text"]
    assert shown.content[0].thinking  # type: ignore[union-attr]
    # thinking earlier in the conversation is not sent back to the backend
    history = [
        *ask("think"),
        {"role": "assistant", "content": [block.model_dump() for block in shown.content]},
        *ask("again [[tokens=2]]"),
    ]
    hidden = create(messages=history, thinking={"type": "disabled"})
    assert [block.type for block in hidden.content] == ["text"]


@pytest.mark.parametrize("kind", ["enabled", "adaptive"])
def test_thinking_display_omitted(
    server: ServerProcess, client: anthropic.Anthropic, kind: str
) -> None:
    """thinking.display "omitted" (Claude Code's on every request): the thinking block comes
    without its text, in a stream without a thinking_delta; the answer and its token
    counts are those of the thinking shown (the backend reasoned all the same)."""
    thinking: Any = {"type": kind, "display": "omitted"}
    if kind == "enabled":
        thinking["budget_tokens"] = 1024
    args: dict[str, Any] = {"model": "demo-reasoner", "max_tokens": 100, "thinking": thinking}
    text = "think [[tokens=3]]"
    whole = client.messages.create(messages=ask(text), **args)
    with client.messages.stream(messages=ask(text), **args) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    shown = client.messages.create(
        messages=ask(text), **{**args, "thinking": {**thinking, "display": "summarized"}}
    )
    assert shown.content[0].thinking  # type: ignore[union-attr]
    for message in (whole, streamed):
        assert [block.type for block in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == ""  # type: ignore[union-attr]
        assert message.content[0].signature == ""  # type: ignore[union-attr]
        assert message.content[1].text == shown.content[1].text  # type: ignore[union-attr]
        assert message.usage.output_tokens == shown.usage.output_tokens
    assert "thinking" not in {event.type for event in events}  # the SDK's thinking_delta event
    assert [e.content_block.type for e in events if e.type == "content_block_start"] == [
        "thinking",
        "text",
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "demo-chat", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        (
            {
                "model": "demo-chat",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "x"}],
                "thinking": {"type": "adaptive", "display": 1},
            },
            "thinking.display",
        ),
        ({"model": "demo-chat", "max_tokens": 10, "messages": []}, "messages"),
        ({"max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}, "model"),
        (
            {"model": "demo-chat", "max_tokens": 10, "messages": [{"role": "bot", "content": ""}]},
            "messages[0].role",
        ),
        (
            {"model": "demo-chat", "max_tokens": "10", "messages": [{"role": "user"}]},
            "max_tokens",
        ),
        (
            {
                "model": "demo-chat",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            },
            "messages[0].content[0].text",
        ),
        (  # an unhashable effort was looked up in the table of efforts: a 500
            {
                "model": "demo-chat",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "x"}],
                "output_config": {"effort": ["high"]},
            },
            "output_config.effort",
        ),
    ],
)
def test_client_mistakes_are_400s(
    client: anthropic.Anthropic, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.post("/v1/messages", body=body, cast_to=Message)
    error = caught.value.body
    assert isinstance(error, dict) and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert f"'{field}'" in error["error"]["message"]


def test_malformed_json_is_a_400(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/messages", content=b'{"model": ', timeout=5)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["type"] == "error"


@pytest.mark.parametrize(
    ("status", "exception", "kind"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
    ],
)
@pytest.mark.parametrize("streamed", [False, True])
def test_backend_errors_in_anthropic_shape(
    client: anthropic.Anthropic,
    status: int,
    exception: type[anthropic.APIStatusError],
    kind: str,
    streamed: bool,
) -> None:
    with pytest.raises(exception) as caught:
        client.messages.create(
            model="demo-chat",
            max_tokens=10,
            messages=ask(f"[[status={status}]]"),
            stream=streamed,  # type: ignore[call-overload]
        )
    assert caught.value.status_code == status
    assert caught.value.body["error"]["type"] == kind  # type: ignore[index]
    assert "simulated" in caught.value.body["error"]["message"]  # type: ignore[index]


def test_unknown_model_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="no-such-model", max_tokens=10, messages=ask("x"))
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_failure_mid_stream_raises(client: anthropic.Anthropic) -> None:
    """A backend that breaks off after a few tokens: the SDK raises at the error event,
    never reads a finished message."""
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(
            model="demo-chat", max_tokens=100, messages=ask("[[tokens=20]] [[drop_after=3]]")
        ) as stream:
            for _ in stream.text_stream:
                pass
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "mid-stream" in caught.value.body["error"]["message"]  # type: ignore[index]


def test_count_tokens_is_not_found(client: anthropic.Anthropic) -> None:
    """Not served (Ollama does not serve it either): Claude Code then estimates itself. A
    made-up count would be trusted."""
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.count_tokens(model="demo-chat", messages=ask("x"))
    assert caught.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "count_tokens" in caught.value.body["error"]["message"]  # type: ignore[index]


def test_unknown_path_below_messages_in_anthropic_shape(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/messages/batches", json={}, timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def _samples(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = httpx.get(f"{url}/v1/metrics/prometheus", timeout=5).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _total(url: str, name: str, **match: str) -> float:
    return sum(
        value
        for labels, value in _samples(url).get(name, [])
        if all(labels.get(k) == v for k, v in match.items())
    )


def test_metrics_count_the_route(server: ServerProcess, client: anthropic.Anthropic) -> None:
    labels = {"api": "anthropic", "endpoint": "v1_messages"}
    streams = _total(server.url, "trioproxy_streams_total", outcome="completed", **labels)
    tokens = _total(server.url, "trioproxy_time_to_first_token_seconds_count", **labels)
    with client.messages.stream(
        model="demo-chat", max_tokens=100, messages=ask("[[tokens=5]]")
    ) as stream:
        stream.get_final_message()
    wait_for(
        lambda: (
            _total(server.url, "trioproxy_streams_total", outcome="completed", **labels)
            == streams + 1
        )
    )
    assert _total(server.url, "trioproxy_time_to_first_token_seconds_count", **labels) == (
        tokens + 1
    )
    assert _total(server.url, "http_requests_total", status="200", **labels) >= 1


def test_client_leaving_mid_stream_is_cancelled(
    server: ServerProcess, client: anthropic.Anthropic, demo_backend: ServerProcess
) -> None:
    labels = {"api": "anthropic", "endpoint": "v1_messages"}
    before = _total(server.url, "trioproxy_streams_total", outcome="cancelled", **labels)
    text = ask("leave [[tokens=200]] [[delay=0.02]]")
    with client.messages.stream(model="demo-chat", max_tokens=300, messages=text) as stream:
        request_id = stream.response.headers["x-request-id"]
        for piece in stream.text_stream:
            if piece:
                break  # leaving the block closes the response
    wait_for(
        lambda: (
            _total(server.url, "trioproxy_streams_total", outcome="cancelled", **labels)
            == before + 1
        )
    )
    # the backend's request ended with the client's, not 200 tokens later
    wait_for(
        lambda: (
            [e["outcome"] for e in demo_events_for(demo_backend, request_id)] == ["disconnected"]
        )
    )
    assert demo_events_for(demo_backend, request_id)[0]["tokens_sent"] < 200


def proxy_id(server: ServerProcess, response: httpx.Response) -> str:
    """The proxy's id of ``response``: its X-Request-ID, which its access line names."""
    request_id = response.headers["x-request-id"]
    assert access_lines(server, request_id)
    return request_id


def test_a_message_has_the_proxys_request_id(
    server: ServerProcess, client: anthropic.Anthropic
) -> None:
    """The SDK reads a response's id from Anthropic's ``request-id`` header (and logs it,
    and users quote it): the proxy's id, which its logs have, not None."""
    raw = client.messages.with_raw_response.create(
        model="demo-chat", max_tokens=10, messages=ask("[[tokens=2]]")
    )
    request_id = proxy_id(server, raw.http_response)
    assert raw.parse()._request_id == raw.request_id == request_id


def test_a_stream_has_the_proxys_request_id(
    server: ServerProcess, client: anthropic.Anthropic
) -> None:
    with client.messages.stream(
        model="demo-chat", max_tokens=10, messages=ask("[[tokens=2]]")
    ) as stream:
        stream.get_final_message()
    assert stream.request_id == proxy_id(server, stream.response)


def _read_stream(sdk: anthropic.Anthropic, prompt: str) -> Message:
    with sdk.messages.stream(model="demo-chat", max_tokens=100, messages=ask(prompt)) as stream:
        return stream.get_final_message()


SDK_ERRORS: dict[str, Callable[[anthropic.Anthropic], object]] = {
    "the proxy's 400": lambda sdk: sdk.post(
        "/v1/messages", body={"model": "demo-chat", "messages": ask("x")}, cast_to=Message
    ),
    "the backend's 429": lambda sdk: sdk.messages.create(
        model="demo-chat", max_tokens=10, messages=ask("[[status=429]]")
    ),
    "the backend's 429 to a stream": lambda sdk: sdk.messages.create(
        model="demo-chat", max_tokens=10, messages=ask("[[status=429]]"), stream=True
    ),
    "an unknown model's 404": lambda sdk: sdk.messages.create(
        model="no-such-model", max_tokens=10, messages=ask("x")
    ),
    "a failure mid-stream": lambda sdk: _read_stream(sdk, "[[tokens=20]] [[drop_after=3]]"),
    # served through Quart, not the fast path
    "count_tokens' 404": lambda sdk: sdk.messages.count_tokens(
        model="demo-chat", messages=ask("x")
    ),
    "GET's 405": lambda sdk: sdk.get("/v1/messages", cast_to=Message),
}


@pytest.mark.parametrize("failing", SDK_ERRORS.values(), ids=SDK_ERRORS.keys())
def test_an_error_has_the_proxys_request_id(
    server: ServerProcess,
    client: anthropic.Anthropic,
    failing: Callable[[anthropic.Anthropic], object],
) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        failing(client)
    assert caught.value.request_id == proxy_id(server, caught.value.response)


@pytest.mark.parametrize(
    ("path", "anthropic_id"),
    [("/v1/messages", True), ("/v1/chat/completions", False), ("/api/chat", False)],
)
@pytest.mark.parametrize("prompt", ["hi [[tokens=2]]", "[[status=429]]"])
def test_only_the_anthropic_route_sends_request_id(
    server: ServerProcess, path: str, anthropic_id: bool, prompt: str
) -> None:
    """Anthropic's name for the id, on its route only: the openai SDKs read
    ``x-request-id``, which every answer has."""
    body = {"model": "demo-chat", "max_tokens": 10, "stream": False, "messages": ask(prompt)}
    response = httpx.post(f"{server.url}{path}", json=body, timeout=10)
    assert response.status_code == (429 if "status" in prompt else 200)
    request_id = proxy_id(server, response)
    assert response.headers.get("request-id") == (request_id if anthropic_id else None)


def test_client_keys_as_x_api_key_or_bearer(
    demo_backend: ServerProcess, start_proxy: Callable[..., ServerProcess]
) -> None:
    keyed = start_proxy(demo_backend.url, PROXY_API_KEYS="claude:sk-proxy-123")
    args: dict[str, Any] = {"model": "demo-chat", "max_tokens": 10, "messages": ask("[[tokens=2]]")}
    for sdk in (
        anthropic.Anthropic(base_url=keyed.url, api_key="sk-proxy-123", max_retries=0),
        anthropic.Anthropic(base_url=keyed.url, auth_token="sk-proxy-123", max_retries=0),
    ):
        with sdk:
            assert sdk.messages.create(**args).stop_reason == "end_turn"
    with anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            sdk.messages.create(**args)
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # refused before its body was read, with the id the SDK reads
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]
