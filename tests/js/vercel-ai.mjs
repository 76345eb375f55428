// Drive the proxy with the Vercel AI SDK (`ai`) and its providers (see tests/test_js_vercel_ai.py).
//
//   node tests/js/vercel-ai.mjs http://127.0.0.1:PORT SCENARIO
//
// As clients.mjs: one scenario per run, ONE JSON object printed with what the SDK returned
// (the helpers, ai-sdk.mjs, shared with anthropic.mjs).
// A scenario covers one provider (or one backend) whole, so the whole module is a few node
// processes. The SDK reports what it could not parse or refused as an "error" stream part or
// a thrown error, both caught and reported; its warnings (AI_SDK_LOG_WARNINGS) and anything a
// provider prints to the console are collected into the report too, not printed.

import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { Output, embed, embedMany, generateObject, generateText, stepCountIs } from "ai";
import { createOllama as createSdkOllama } from "ai-sdk-ollama";
import { createOllama as createOllamaV2 } from "ollama-ai-provider-v2";

import {
  CITY,
  caught,
  generated,
  prompt,
  runScenario,
  streamed,
  usageOf,
  weather,
} from "./ai-sdk.mjs";

const [baseUrl] = process.argv.slice(2);

// Two steps: the tool call, its result sent back, the model's answer to it.
async function toolRoundTrip(model) {
  const r = await generateText({
    model,
    maxRetries: 0,
    prompt: prompt("What is the weather in Paris?"),
    tools: { get_weather: weather(async ({ city }) => `sunny in ${city}`) },
    stopWhen: stepCountIs(2),
  });
  return {
    steps: r.steps.map((s) => ({
      finishReason: s.finishReason,
      calls: s.toolCalls.map((c) => ({ id: c.toolCallId, name: c.toolName, input: c.input })),
      text: s.text,
    })),
    text: r.text,
    usage: usageOf(r.totalUsage),
  };
}

// Structured output: generateText with Output.object (generateObject is deprecated in 7)
const structured = async (model) =>
  (
    await generateText({
      model,
      maxRetries: 0,
      output: Output.object({ schema: CITY }),
      prompt: prompt("A city"),
    })
  ).output;

const unknownModel = async (provider) => ({
  generate: await caught(() =>
    generateText({ model: provider("no-such-model"), prompt: "hi", maxRetries: 0 }),
  ),
  stream: await streamed({ model: provider("no-such-model"), prompt: "hi" }),
});

// ---- @ai-sdk/openai-compatible on /v1/chat/completions --------------------------------------

async function openaiCompatible() {
  const provider = createOpenAICompatible({
    name: "trioproxy",
    baseURL: `${baseUrl}/v1`,
    includeUsage: true, // stream_options.include_usage: usage at the end of a stream
    supportsStructuredOutputs: true, // response_format json_schema for objects
  });
  const chat = provider("demo-chat");
  const tools = { get_weather: weather() };
  return {
    generate: await generated({ model: chat, prompt: prompt("Hi [[tokens=5]]") }),
    stream: await streamed({ model: chat, prompt: prompt("Hi [[tokens=5]]") }),
    reasoning: await streamed({
      model: provider("demo-reasoner"),
      prompt: prompt("Think [[tokens=3]]"),
    }),
    toolStream: await streamed({ model: chat, prompt: prompt("Weather in Paris?"), tools }),
    toolGenerate: await generated({ model: chat, prompt: prompt("Weather in Paris?"), tools }),
    toolRoundTrip: await toolRoundTrip(chat),
    output: await structured(chat),
    object: (
      await generateObject({ model: chat, maxRetries: 0, schema: CITY, prompt: prompt("A city") })
    ).object,
    embed: await embedding(provider.embeddingModel("demo-embed")),
    unknownModel: await unknownModel(provider),
    midStream: await streamed({ model: chat, prompt: prompt("Hi [[tokens=9]] [[drop_after=3]]") }),
  };
}

async function embedding(model) {
  const one = await embed({ model, value: "hello world", maxRetries: 0 });
  const many = await embedMany({
    model,
    values: ["alpha", "beta gamma", "hello world"],
    maxRetries: 0,
  });
  return { one: one.embedding, oneUsage: one.usage, many: many.embeddings, manyUsage: many.usage };
}

// ---- @ai-sdk/openai: the Responses API (its default) and chat completions -------------------

async function openaiProvider() {
  const provider = createOpenAI({ baseURL: `${baseUrl}/v1`, apiKey: "unused" });
  const responses = provider("demo-chat");
  const chat = provider.chat("demo-chat");
  return {
    responsesGenerate: await generated({ model: responses, prompt: prompt("Hi [[tokens=5]]") }),
    responsesStream: await streamed({ model: responses, prompt: prompt("Hi [[tokens=5]]") }),
    responsesUnknownModel: await unknownModel(provider),
    responsesMidStream: await streamed({
      model: responses,
      prompt: prompt("Hi [[tokens=9]] [[drop_after=3]]"),
    }),
    chatGenerate: await generated({ model: chat, prompt: prompt("Hi [[tokens=5]]") }),
    chatStream: await streamed({ model: chat, prompt: prompt("Hi [[tokens=5]]") }),
    chatReasoning: await generated({
      model: provider.chat("demo-reasoner"),
      prompt: prompt("Think [[tokens=3]]"),
    }),
    chatToolStream: await streamed({
      model: chat,
      prompt: prompt("Weather in Paris?"),
      tools: { get_weather: weather() },
    }),
    chatToolRoundTrip: await toolRoundTrip(chat),
    chatMidStream: await streamed({
      model: chat,
      prompt: prompt("Hi [[tokens=9]] [[drop_after=3]]"),
    }),
    embed: await embedding(provider.embedding("demo-embed")),
  };
}

// ---- Ollama providers on /api/chat and /api/embed -------------------------------------------

const OLLAMA_PROVIDERS = {
  // its own NDJSON parsing, validated with zod; baseURL ends in /api
  v2: () => createOllamaV2({ baseURL: `${baseUrl}/api` }),
  // built on ollama-js; baseURL is the host
  sdk: () => createSdkOllama({ baseURL: baseUrl }),
};

async function ollamaProvider(name) {
  const provider = OLLAMA_PROVIDERS[name]();
  const chat = provider("demo-chat");
  const reasoner = provider("demo-reasoner");
  // the AI SDK's own reasoning setting: v2 sends think true/false, ai-sdk-ollama a level
  const think = (reasoning) => ({
    model: reasoner,
    prompt: prompt("Think [[tokens=3]]"),
    reasoning,
  });
  return {
    generate: await generated({ model: chat, prompt: prompt("Hi [[tokens=5]]") }),
    stream: await streamed({ model: chat, prompt: prompt("Hi [[tokens=5]]") }),
    think: await generated(think("high")),
    thinkStream: await streamed(think("high")),
    noThink: await generated(think("none")),
    // ai-sdk-ollama sends maxOutputTokens as num_predict (v2: see the test)
    short: await generated({ model: chat, prompt: prompt("Hi [[tokens=9]]"), maxOutputTokens: 2 }),
    toolStream: await streamed({
      model: chat,
      prompt: prompt("Weather in Paris?"),
      tools: { get_weather: weather() },
    }),
    toolRoundTrip: await toolRoundTrip(chat),
    output: await structured(chat),
    embed: await embedding(provider.embeddingModel("demo-embed")),
    unknownModel: await unknownModel(provider),
    ...(name === "v2" && (await v2Completion(provider))),
  };
}

// ollama-ai-provider-v2's completion model: /api/generate
async function v2Completion(provider) {
  const model = provider.completion("demo-chat");
  return {
    completion: await caught(() => generated({ model, prompt: prompt("Hi [[tokens=4]]") })),
    completionStream: await streamed({ model, prompt: prompt("Hi [[tokens=4]]") }),
  };
}

// ---- a scripted backend's parallel tool calls (test_js_vercel_ai.ToolsBackend) ---------------

async function parallelTools() {
  const compatible = createOpenAICompatible({
    name: "trioproxy",
    baseURL: `${baseUrl}/v1`,
    includeUsage: true,
  });
  const openai = createOpenAI({ baseURL: `${baseUrl}/v1`, apiKey: "unused" });
  const models = {
    compatible: compatible("tools"),
    openaiChat: openai.chat("tools"),
    openaiResponses: openai("tools"),
    // the same backend answering the Responses API with one JSON response, streamed or not
    openaiResponsesJson: openai("tools-json"),
    ollamaV2: OLLAMA_PROVIDERS.v2()("tools"),
    aiSdkOllama: OLLAMA_PROVIDERS.sdk()("tools"),
  };
  const out = {};
  for (const [name, model] of Object.entries(models)) {
    const tools = {
      get_weather: weather(async ({ city, days }) => `sunny in ${city} for ${days} days`),
    };
    const ask = prompt("Weather in Paris and Rome?");
    out[name] = {
      stream: await streamed({ model, prompt: ask, tools, stopWhen: stepCountIs(1) }),
      roundTrip: await caught(async () => {
        const r = await generateText({
          model,
          maxRetries: 0,
          prompt: ask,
          tools,
          stopWhen: stepCountIs(2),
        });
        return {
          calls: r.steps[0].toolCalls.map((c) => ({ id: c.toolCallId, input: c.input })),
          firstFinish: r.steps[0].finishReason,
          reasoning: r.steps[0].reasoningText ?? null,
          text: r.text,
          usage: usageOf(r.totalUsage),
        };
      }),
    };
  }
  return out;
}

// --------------------------------------------------------------------------------------------

const SCENARIOS = {
  "openai-compatible": openaiCompatible,
  openai: openaiProvider,
  "ollama-v2": () => ollamaProvider("v2"),
  "ai-sdk-ollama": () => ollamaProvider("sdk"),
  "parallel-tools": parallelTools,
};

await runScenario(SCENARIOS);
