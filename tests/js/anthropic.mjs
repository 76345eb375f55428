// Drive the proxy's Anthropic Messages API (/v1/messages) with the JavaScript clients JS tools
// use on it (see tests/test_js_anthropic.py): the official SDK (@anthropic-ai/sdk) and the
// Vercel AI SDK's provider (@ai-sdk/anthropic).
//
//   node tests/js/anthropic.mjs http://127.0.0.1:PORT SCENARIO
//
// As vercel-ai.mjs (whose helpers, ai-sdk.mjs, it shares): a scenario prints ONE JSON object
// with what the clients returned; the errors it expects are caught and reported, the AI SDK's
// warnings and anything printed to the console are collected into the report. Scenario
// `demo` runs both clients against the demo backend (its [[...]] directives in the prompts)
// and reports every answer's usage as the client read it (`usages`), for the test to find in
// the proxy's metrics; `parallel-tools` runs both against test_js_vercel_ai's ToolsBackend.

import { createAnthropic } from "@ai-sdk/anthropic";
import Anthropic from "@anthropic-ai/sdk";
import { betaZodTool } from "@anthropic-ai/sdk/helpers/beta/zod";
import { zodOutputFormat } from "@anthropic-ai/sdk/helpers/zod";
import { Output, generateText, stepCountIs } from "ai";
import { z } from "zod";

import {
  CITY,
  caught,
  generated,
  prompt,
  runScenario,
  streamed,
  weather,
} from "./ai-sdk.mjs";

const [baseUrl] = process.argv.slice(2);
const user = (text) => [{ role: "user", content: prompt(text) }];

// every answer's usage as the client read it: {input, output}
const usages = [];
const counted = (input, output) => {
  if (input != null || output != null) usages.push({ input, output });
};
// the AI SDK's calls, their steps' usage counted
const stepsCounted = (result) => {
  for (const { input, output } of result.stepUsages) counted(input, output);
  return result;
};
const generatedCounted = async (options) => stepsCounted(await generated(options));
const streamedCounted = async (options) => stepsCounted(await streamed(options));

// ---- @anthropic-ai/sdk ----------------------------------------------------------------------

const WEATHER = {
  name: "get_weather",
  description: "Current weather for a city",
  input_schema: {
    type: "object",
    properties: { city: { type: "string" }, days: { type: "integer" } },
    required: ["city"],
  },
};

// the SDK's error classes, and Anthropic's error body
const sdkCaught = (fn) =>
  caught(fn, (err) => ({
    constructor: err?.constructor?.name ?? null,
    isAPIError: err instanceof Anthropic.APIError,
    message: String(err?.message ?? err),
    status: err?.status ?? null,
    error: err?.error ?? null,
    // the id the SDK read (Anthropic's request-id header), and the proxy's X-Request-ID
    requestID: err?.requestID ?? null,
    proxyRequestID: err?.headers?.get("x-request-id") ?? null,
  }));

function message(m) {
  counted(m.usage.input_tokens, m.usage.output_tokens);
  return {
    id: m.id,
    type: m.type,
    role: m.role,
    model: m.model,
    content: m.content,
    stop_reason: m.stop_reason,
    stop_sequence: m.stop_sequence,
    usage: m.usage,
  };
}

// messages.stream whole: its events, its text and input_json deltas, its final message
async function sdkStream(client, params) {
  const stream = client.messages.stream(params);
  const events = [];
  const textDeltas = [];
  const textSnapshots = [];
  const inputJson = [];
  const inputSnapshots = [];
  stream.on("streamEvent", (event) => events.push(event.type));
  stream.on("text", (delta, snapshot) => {
    textDeltas.push(delta);
    textSnapshots.push(snapshot);
  });
  stream.on("inputJson", (partial, snapshot) => {
    inputJson.push(partial);
    inputSnapshots.push(snapshot);
  });
  const final = await stream.finalMessage();
  return {
    events,
    textDeltas,
    textSnapshotsGrow: textSnapshots.every((s, i) => s === textDeltas.slice(0, i + 1).join("")),
    inputJson,
    inputSnapshots,
    final: message(final),
  };
}

async function sdkToolRoundTrip(client, stream) {
  const history = user("Weather in Paris?");
  const args = { model: "demo-chat", max_tokens: 200, tools: [WEATHER] };
  const ask = async (params) =>
    stream
      ? await sdkStream(client, { ...args, ...params })
      : { final: message(await client.messages.create({ ...args, ...params })) };
  const first = await ask({ messages: history, tool_choice: { type: "any" } });
  const call = first.final.content.find((block) => block.type === "tool_use");
  history.push(
    { role: "assistant", content: first.final.content },
    {
      role: "user",
      content: [{ type: "tool_result", tool_use_id: call.id, content: "sunny, 21 C" }],
    },
  );
  const second = await ask({ messages: history });
  return { first, second };
}

// messages.parse with a zod output format: the text as JSON, checked against the schema
async function sdkParse(client) {
  const parsed = await client.messages.parse({
    model: "demo-chat",
    max_tokens: 100,
    messages: user("A city"),
    output_config: { format: zodOutputFormat(CITY) },
  });
  message(parsed);
  return parsed.parsed_output;
}

// The beta tool runner (/v1/messages?beta=true): it runs the tools and asks again until the
// model answers without a call; streamed, every turn is a stream
async function sdkToolRunner(client, stream) {
  const city = betaZodTool({
    name: "get_weather",
    description: "Current weather for a city",
    inputSchema: z.object({ city: z.string() }),
    run: async ({ city }) => `sunny in ${city}`,
  });
  const runner = client.beta.messages.toolRunner({
    model: "demo-chat",
    max_tokens: 100,
    messages: user("Weather in Paris?"),
    tools: [city],
    stream,
  });
  const turns = [];
  for await (const turn of runner) {
    const final = stream ? await turn.finalMessage() : turn;
    turns.push(message(final).content);
  }
  return turns;
}

async function anthropicSdk() {
  const client = new Anthropic({
    baseURL: baseUrl,
    apiKey: "unused",
    maxRetries: 0,
    timeout: 30_000,
  });
  const create = (params) =>
    client.messages.create({ model: "demo-chat", max_tokens: 100, ...params });
  const raw = await create({ stream: true, messages: user("Hi [[tokens=3]]") });
  const rawEvents = [];
  let rawUsage = {}; // message_start's, updated by message_delta's
  for await (const event of raw) {
    rawEvents.push(event.type);
    if (event.type === "message_start") rawUsage = event.message.usage;
    if (event.type === "message_delta") rawUsage = { ...rawUsage, ...event.usage };
  }
  counted(rawUsage.input_tokens, rawUsage.output_tokens);
  // the ids the SDK reads from request-id, beside the proxy's X-Request-ID
  const created = await create({ messages: user("Hi [[tokens=2]]") }).withResponse();
  message(created.data);
  const streamed = client.messages.stream({
    model: "demo-chat",
    max_tokens: 10,
    messages: user("Hi [[tokens=2]]"),
  });
  message(await streamed.finalMessage());
  const requestIds = {
    message: created.data._request_id ?? null,
    response: created.request_id ?? null,
    proxy: created.response.headers.get("x-request-id"),
    stream: streamed.request_id ?? null,
    streamProxy: (await streamed.withResponse()).response.headers.get("x-request-id"),
  };
  return {
    requestIds,
    create: message(await create({ system: "You are terse.", messages: user("Hi [[tokens=5]]") })),
    systemBlocks: message(
      await create({
        system: [{ type: "text", text: "You are terse.", cache_control: { type: "ephemeral" } }],
        messages: user("Hi [[tokens=2]]"),
      }),
    ),
    maxTokens: message(await create({ max_tokens: 3, messages: user("Hi [[tokens=9]]") })),
    stream: await sdkStream(client, {
      model: "demo-chat",
      max_tokens: 100,
      system: "You are terse.",
      messages: user("Hi [[tokens=5]]"),
    }),
    rawEvents,
    thinking: await sdkStream(client, {
      model: "demo-reasoner",
      max_tokens: 100,
      thinking: { type: "enabled", budget_tokens: 1024 },
      messages: user("Think [[tokens=3]]"),
    }),
    toolRoundTrip: await sdkToolRoundTrip(client, false),
    toolStreamRoundTrip: await sdkToolRoundTrip(client, true),
    toolRunner: await sdkToolRunner(client, false),
    toolRunnerStream: await sdkToolRunner(client, true),
    parse: await sdkCaught(() => sdkParse(client)),
    unknownModel: await sdkCaught(() => create({ model: "no-such-model", messages: user("Hi") })),
    unknownModelStream: await sdkCaught(() =>
      client.messages
        .stream({ model: "no-such-model", max_tokens: 10, messages: user("Hi") })
        .finalMessage(),
    ),
    badRequest: await sdkCaught(() => create({ max_tokens: 0, messages: user("Hi") })),
    rateLimited: await sdkCaught(() => create({ messages: user("Hi [[status=429]]") })),
    midStream: await sdkCaught(() =>
      sdkStream(client, {
        model: "demo-chat",
        max_tokens: 100,
        messages: user("Hi [[tokens=9]] [[drop_after=3]]"),
      }),
    ),
    countTokens: await sdkCaught(() =>
      client.messages.countTokens({ model: "demo-chat", messages: user("Hi") }),
    ),
  };
}

// ---- @ai-sdk/anthropic ----------------------------------------------------------------------

// Output.object: by the provider's JSON tool (its default for a model it does not know), or
// by Anthropic's output_config.format (providerOptions structuredOutputMode "outputFormat")
async function aiSdkOutput(model, structuredOutputMode) {
  const r = await generateText({
    model,
    maxRetries: 0,
    maxOutputTokens: 100,
    output: Output.object({ schema: CITY }),
    prompt: prompt("A city"),
    providerOptions: { anthropic: { structuredOutputMode } },
  });
  for (const step of r.steps) counted(step.usage.inputTokens, step.usage.outputTokens);
  return r.output;
}

async function aiSdkAnthropic() {
  const provider = createAnthropic({ baseURL: `${baseUrl}/v1`, apiKey: "unused" });
  const chat = provider("demo-chat");
  const unknown = provider("no-such-model");
  const tools = { get_weather: weather(async ({ city }) => `sunny in ${city}`) };
  // the provider limits a model it does not know to 4,096 tokens, with a warning, unless told
  const maxOutputTokens = 1000;
  const ask = (text, more) => ({ model: chat, maxOutputTokens, prompt: prompt(text), ...more });
  return {
    generate: await generatedCounted(ask("Hi [[tokens=5]]", { system: "You are terse." })),
    generateDefaultLimit: await generatedCounted(
      ask("Hi [[tokens=2]]", { maxOutputTokens: undefined }),
    ),
    stream: await streamedCounted(ask("Hi [[tokens=5]]")),
    reasoning: await streamedCounted(
      ask("Think [[tokens=3]]", { model: provider("demo-reasoner"), reasoning: "high" }),
    ),
    toolStream: await streamedCounted(ask("Weather?", { tools, stopWhen: stepCountIs(1) })),
    toolRoundTrip: await generatedCounted(ask("Weather?", { tools, stopWhen: stepCountIs(2) })),
    toolStreamRoundTrip: await streamedCounted(
      ask("Weather?", { tools, stopWhen: stepCountIs(2) }),
    ),
    outputJsonTool: await caught(() => aiSdkOutput(chat, "auto")),
    outputFormat: await caught(() => aiSdkOutput(chat, "outputFormat")),
    unknownModel: {
      generate: await caught(() => generatedCounted(ask("Hi", { model: unknown }))),
      stream: await streamedCounted(ask("Hi", { model: unknown })),
    },
    midStream: await streamedCounted(ask("Hi [[tokens=9]] [[drop_after=3]]")),
  };
}

// ---- a scripted backend's parallel tool calls (test_js_vercel_ai.ToolsBackend) ---------------

// Its model "tools" streams reasoning, text and two calls interleaved in fragments; asked with
// their results it answers. Each client: the calls streamed, then the round trip.
async function parallelTools() {
  const client = new Anthropic({ baseURL: baseUrl, apiKey: "unused", maxRetries: 0 });
  const ask = prompt("Weather in Paris and Rome?");
  const params = { model: "tools", max_tokens: 200, tools: [WEATHER] };
  const sdk = await sdkStream(client, { ...params, messages: [{ role: "user", content: ask }] });
  const results = sdk.final.content
    .filter((block) => block.type === "tool_use")
    .map((call) => ({
      type: "tool_result",
      tool_use_id: call.id,
      content: `sunny in ${call.input.city}`,
    }));
  const history = [
    { role: "user", content: ask },
    { role: "assistant", content: sdk.final.content },
    { role: "user", content: results },
  ];
  const sdkAnswer = message(await client.messages.create({ ...params, messages: history }));

  const model = createAnthropic({ baseURL: `${baseUrl}/v1`, apiKey: "unused" })("tools");
  const tools = {
    get_weather: weather(async ({ city, days }) => `sunny in ${city} for ${days} days`),
  };
  const options = {
    model,
    prompt: prompt("Weather in Paris and Rome?"),
    tools,
    maxOutputTokens: 200,
  };
  return {
    sdk: { stream: sdk, answer: sdkAnswer },
    aiSdk: {
      stream: await streamed({ ...options, stopWhen: stepCountIs(1) }),
      roundTrip: await caught(() => generated({ ...options, stopWhen: stepCountIs(2) })),
    },
  };
}

// --------------------------------------------------------------------------------------------

await runScenario({
  // both clients against the demo backend, one after the other (one node process)
  demo: async () => ({ sdk: await anthropicSdk(), aiSdk: await aiSdkAnthropic(), usages }),
  "parallel-tools": parallelTools,
});
