"""Python agent frameworks pointed at the proxy: ``openai-agents`` (its default model on
the Responses API, and its Chat Completions model) and ``pydantic-ai`` (its OpenAI chat
and Responses models, and its Ollama provider, which speaks ``/v1``).

Each run is a whole agent loop over real sockets: the model calls a function tool, the
framework runs it and sends its output back, the model answers; usage, tool call ids and
arguments, reasoning items and response ids must come through as the backend sent them.
The demo backend runs in its own process behind the proxy. The frameworks are asyncio
libraries: each test runs its agent on ``asyncio.run`` (the tests are sync functions).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.items import ReasoningItem, ToolCallItem, ToolCallOutputItem
from pydantic import BaseModel
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai import NativeOutput
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ThinkingPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.ollama import OllamaModel
from pydantic_ai.models.openai import (
    OpenAIChatModel,
    OpenAIResponsesModelSettings,
)
from pydantic_ai.models.openai import (
    OpenAIResponsesModel as PydanticResponsesModel,
)
from pydantic_ai.providers.ollama import OllamaProvider
from pydantic_ai.providers.openai import OpenAIProvider

from trioproxy.demo.script import REASONING, TOOL_RESULT_PREFIX

from .conftest import ServerProcess
from .netguard import NetworkGuard

T = TypeVar("T")
ANSWER = f"{TOOL_RESULT_PREFIX} sunny in demo"  # the demo calls the tool with city="demo"
REASONING_TOKENS = len(REASONING.split())


@pytest.fixture(autouse=True)
def local_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No tracing export (openai-agents sends its traces to OpenAI by default), no key or
    base URL from the environment, no connection off 127.0.0.1."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OLLAMA_BASE_URL", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    set_tracing_disabled(True)
    guard = NetworkGuard(monkeypatch)
    yield
    assert not guard.violations, f"network access outside 127.0.0.1: {guard.violations}"


def run(proxy: ServerProcess, agent: Callable[[openai.AsyncOpenAI], Awaitable[T]]) -> T:
    """``agent(client)`` on a fresh asyncio loop, with an AsyncOpenAI client at the proxy."""

    async def main() -> T:
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        async with client:
            return await agent(client)

    return asyncio.run(main())


def weather(city: str) -> str:
    """Current weather for a city."""
    return f"sunny in {city}"


class Person(BaseModel):
    name: str
    age: int


# ---- openai-agents -------------------------------------------------------------------------


def test_openai_agents_responses_tool_loop_keeps_ids_reasoning_and_usage(
    proxy: ServerProcess,
) -> None:
    """The default model (the Responses API), streamed and not: a reasoning item, the
    function call (its call id and arguments) answered by the tool's output, the answer;
    usage summed over both requests; the last response id chains the next run."""
    tool = function_tool(weather)

    async def agent(client: openai.AsyncOpenAI) -> list[Any]:
        model = OpenAIResponsesModel("demo-reasoner", client)
        bot = Agent(name="weather", model=model, tools=[tool])
        whole = await Runner.run(bot, "Weather in Paris?")
        streamed = Runner.run_streamed(bot, "Weather in Rome?")
        kinds = {event.type async for event in streamed.stream_events()}
        chained = await Runner.run(
            bot, "And tomorrow? [[tokens=2]]", previous_response_id=whole.last_response_id
        )
        return [whole, streamed, kinds, chained]

    whole, streamed, kinds, chained = run(proxy, agent)
    for result in (whole, streamed):
        assert result.final_output == ANSWER
        items = result.new_items
        assert [type(i) for i in items[:3]] == [ReasoningItem, ToolCallItem, ToolCallOutputItem]
        call, output = items[1].raw_item, items[2].raw_item
        assert call.name == "weather" and call.arguments == '{"city": "demo"}'
        assert call.call_id.startswith("call_") and output["call_id"] == call.call_id
        assert items[0].raw_item.content[0].text == REASONING
        usage = result.context_wrapper.usage
        assert usage.requests == 2 and usage.input_tokens > 0
        assert usage.output_tokens_details.reasoning_tokens == 2 * REASONING_TOKENS
        assert usage.output_tokens > usage.output_tokens_details.reasoning_tokens
    assert {"raw_response_event", "run_item_stream_event"} <= kinds
    assert whole.last_response_id.startswith("resp_")
    assert chained.final_output == ANSWER


def test_openai_agents_structured_output_and_handoff(proxy: ServerProcess) -> None:
    """``output_type`` on the Responses API (``text.format`` json_schema) and on Chat
    Completions (``response_format``); a handoff is a tool call to the other agent."""

    async def agent(client: openai.AsyncOpenAI) -> list[Any]:
        outputs = []
        for model in (OpenAIResponsesModel, OpenAIChatCompletionsModel):
            bot = Agent(name="who", model=model("demo-chat", client), output_type=Person)
            outputs.append((await Runner.run(bot, "Who?")).final_output)
        chat = OpenAIChatCompletionsModel("demo-chat", client)
        expert = Agent(name="expert", model=chat)
        triage = Agent(name="triage", model=chat, handoffs=[expert])
        handed = await Runner.run(triage, "Help [[tokens=2]]")
        return [*outputs, handed.last_agent.name]

    assert run(proxy, agent) == [Person(name="demo", age=1), Person(name="demo", age=1), "expert"]


def test_openai_agents_chat_completions_stream_counts_usage_when_asked(
    proxy: ServerProcess,
) -> None:
    """openai-agents asks a non-OpenAI base URL for streamed usage only with
    ``ModelSettings(include_usage=True)`` (docs/api-compatibility.md's recipe): then both
    requests of a tool loop are counted."""
    tool = function_tool(weather)

    async def agent(client: openai.AsyncOpenAI) -> Any:
        model = OpenAIChatCompletionsModel("demo-chat", client)
        settings = ModelSettings(include_usage=True)
        bot = Agent(name="chat", model=model, tools=[tool], model_settings=settings)
        streamed = Runner.run_streamed(bot, "Weather in Oslo?")
        async for _ in streamed.stream_events():
            pass
        return streamed

    streamed = run(proxy, agent)
    assert streamed.final_output == ANSWER
    usage = streamed.context_wrapper.usage
    assert usage.requests == 2 and usage.input_tokens > 0 and usage.output_tokens > 0


def test_openai_agents_errors_keep_their_status(proxy: ServerProcess) -> None:
    """A backend's rate limit is the SDK's RateLimitError (the framework does not retry it
    as a broken stream); an unknown previous response is a 404."""

    async def agent(client: openai.AsyncOpenAI) -> list[type[BaseException]]:
        raised = []
        bot = Agent(name="a", model=OpenAIResponsesModel("demo-chat", client))
        for prompt, previous in (("x [[status=429]]", None), ("x", "resp_unknown")):
            try:
                await Runner.run(bot, prompt, previous_response_id=previous)
            except openai.APIStatusError as exc:
                raised.append(type(exc))
        return raised

    assert run(proxy, agent) == [openai.RateLimitError, openai.NotFoundError]


# ---- pydantic-ai ---------------------------------------------------------------------------


def test_pydantic_ai_chat_and_ollama_provider_tool_loop(proxy: ServerProcess) -> None:
    """OpenAIChatModel and OllamaModel (the Ollama provider speaks ``/v1``), run and
    run_stream: the tool call's id comes back with its return, usage is summed."""

    async def agent(client: openai.AsyncOpenAI) -> list[Any]:
        ollama = OllamaProvider(base_url=proxy.url + "/v1")  # a client of its own
        models = [
            OpenAIChatModel("demo-reasoner", provider=OpenAIProvider(openai_client=client)),
            OllamaModel("demo-chat", provider=ollama),
        ]
        results: list[Any] = []
        async with ollama.client:
            for model in models:
                bot = PydanticAgent(model, tools=[weather])
                results.append(await bot.run("Weather in Lima?"))
                async with bot.run_stream("Weather in Quito?") as stream:
                    results.append((await stream.get_output(), stream.usage))
        return results

    reasoned, (reasoned_stream, reasoned_usage), plain, (plain_stream, plain_usage) = run(
        proxy, agent
    )
    for result in (reasoned, plain):
        assert result.output == ANSWER
        parts = [part for message in result.all_messages() for part in message.parts]
        call = next(p for p in parts if isinstance(p, ToolCallPart))
        returned = next(p for p in parts if isinstance(p, ToolReturnPart))
        assert call.args == '{"city": "demo"}' and returned.tool_call_id == call.tool_call_id
        assert result.usage.requests == 2 and result.usage.tool_calls == 1
    assert any(isinstance(p, ThinkingPart) for m in reasoned.all_messages() for p in m.parts)
    assert reasoned.usage.details["reasoning_tokens"] == 2 * REASONING_TOKENS
    assert reasoned_stream == plain_stream == ANSWER
    assert reasoned_usage.output_tokens > plain_usage.output_tokens > 0


def test_pydantic_ai_responses_model_structured_and_chained(proxy: ServerProcess) -> None:
    """OpenAIResponsesModel: the reasoning item and the function call keep their ids, a
    structured answer (tool output, and native ``text.format``), and
    ``openai_previous_response_id="auto"`` chains the tool loop's second request."""

    async def agent(client: openai.AsyncOpenAI) -> list[Any]:
        model = PydanticResponsesModel(
            "demo-reasoner", provider=OpenAIProvider(openai_client=client)
        )
        chained = OpenAIResponsesModelSettings(openai_previous_response_id="auto")
        looped = await PydanticAgent(model, tools=[weather], model_settings=chained).run("Hi?")
        native = await PydanticAgent(model, output_type=NativeOutput(Person)).run("Who?")
        async with PydanticAgent(model, output_type=Person).run_stream("Who?") as stream:
            as_tool = await stream.get_output()
        return [looped, native.output, as_tool]

    looped, native, as_tool = run(proxy, agent)
    assert looped.output == ANSWER
    first = looped.all_messages()[1].parts
    assert [type(p) for p in first] == [ThinkingPart, ToolCallPart]
    assert first[0].id.startswith("rs_") and first[1].id.startswith("fc_")
    assert looped.response.provider_response_id.startswith("resp_")
    assert native == as_tool == Person(name="demo", age=1)


def test_pydantic_ai_errors_keep_their_status_and_body(proxy: ServerProcess) -> None:
    async def agent(client: openai.AsyncOpenAI) -> list[ModelHTTPError]:
        raised = []
        for model in (OpenAIChatModel, PydanticResponsesModel):
            bot = PydanticAgent(model("demo-chat", provider=OpenAIProvider(openai_client=client)))
            try:
                await bot.run("x [[status=429]]")
            except ModelHTTPError as exc:
                raised.append(exc)
        return raised

    for error in run(proxy, agent):
        assert error.status_code == 429
        assert isinstance(error.body, dict) and error.body["code"] == "rate_limit_exceeded"
