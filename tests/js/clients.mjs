// Drive the proxy with the real JavaScript client libraries (see tests/test_js_clients.py).
//
//   node tests/js/clients.mjs http://127.0.0.1:PORT SCENARIO
//
// Runs one scenario and prints ONE JSON object with what the library returned. Errors that a
// scenario expects are caught and reported in that object; anything else is a crash (stack on
// stderr, exit code 1). Prompts carry the demo backend's [[...]] directives (trioproxy/demo).

import { randomUUID } from "node:crypto";

import { ChatOllama, OllamaEmbeddings } from "@langchain/ollama";
import { HumanMessage, ToolMessage } from "@langchain/core/messages";
import { Ollama } from "ollama";
import OpenAI from "openai";

const [baseUrl, scenario] = process.argv.slice(2);

const WEATHER_TOOL = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Current weather for a city",
    parameters: {
      type: "object",
      properties: { city: { type: "string" }, days: { type: "integer" } },
      required: ["city"],
    },
  },
};

const marker = () => randomUUID().slice(0, 12);
const user = (text) => [{ role: "user", content: `${text} ${marker()}` }];
const ollama = (headers) => new Ollama({ host: baseUrl, headers });
const openai = () =>
  new OpenAI({ baseURL: `${baseUrl}/v1`, apiKey: "unused", maxRetries: 0, timeout: 30_000 });

// Everything but the message/response text: done, done_reason, durations, counts, model ...
function meta(part) {
  const { message, response, thinking, context, ...rest } = part;
  return rest;
}

function errorInfo(err) {
  return {
    name: err?.name ?? null,
    constructor: err?.constructor?.name ?? null,
    message: String(err?.message ?? err),
    status: err?.status ?? err?.status_code ?? null,
    error: err?.error ?? null,
  };
}

// The value of fn(), or what the error it threw looks like (plus details(err), if given).
async function caught(fn, details = () => ({})) {
  try {
    return { ok: true, value: await fn() };
  } catch (err) {
    return { ok: false, ...errorInfo(err), ...details(err) };
  }
}

async function collect(stream) {
  const parts = [];
  for await (const part of stream) parts.push(part);
  return parts;
}

// ---- ollama-js -----------------------------------------------------------------------------

async function ollamaChat() {
  const reply = await ollama().chat({ model: "demo-chat", messages: user("Hi [[tokens=5]]") });
  return { message: reply.message, meta: meta(reply) };
}

async function ollamaChatStream() {
  const stream = await ollama().chat({
    model: "demo-chat",
    messages: user("Hi [[tokens=5]]"),
    stream: true,
  });
  const parts = await collect(stream);
  return {
    roles: parts.map((p) => p.message?.role ?? null),
    contents: parts.map((p) => p.message?.content ?? null),
    dones: parts.map((p) => p.done),
    final: meta(parts.at(-1)),
  };
}

async function ollamaGenerate() {
  const reply = await ollama().generate({
    model: "demo-chat",
    prompt: `Hi [[tokens=4]] ${marker()}`,
  });
  return { response: reply.response, meta: meta(reply) };
}

async function ollamaGenerateStream() {
  const stream = await ollama().generate({
    model: "demo-chat",
    prompt: `Hi [[tokens=4]] ${marker()}`,
    stream: true,
  });
  const parts = await collect(stream);
  return {
    responses: parts.map((p) => p.response ?? null),
    dones: parts.map((p) => p.done),
    final: meta(parts.at(-1)),
  };
}

async function ollamaEmbed() {
  const client = ollama();
  const one = await client.embed({ model: "demo-embed", input: "hello world" });
  const many = await client.embed({
    model: "demo-embed",
    input: ["alpha", "beta gamma", "hello world"],
  });
  return { one, many };
}

async function ollamaEmbedDimensions() {
  const client = ollama();
  const input = ["alpha", "beta gamma"];
  return {
    four: await client.embed({ model: "demo-embed", input, dimensions: 4 }),
    again: await client.embed({ model: "demo-embed", input, dimensions: 4 }),
  };
}

async function ollamaEmbeddings() {
  const client = ollama();
  const legacy = await client.embeddings({ model: "demo-embed", prompt: "hello world" });
  const modern = await client.embed({ model: "demo-embed", input: "hello world" });
  return { embedding: legacy.embedding, embed: modern.embeddings[0] };
}

async function ollamaList() {
  return await ollama().list();
}

async function ollamaShow() {
  const client = ollama();
  return {
    chat: await client.show({ model: "demo-chat" }),
    embed: await client.show({ model: "demo-embed" }),
  };
}

async function ollamaPs() {
  return await ollama().ps();
}

async function ollamaVersion() {
  return await ollama().version();
}

async function ollamaPull() {
  const client = ollama();
  const model = "no-such-model";
  // @langchain/ollama's checkOrPullModel pulls a model /api/tags does not list under the
  // name it was given (here spelled with Ollama's default namespace), logging the progress
  const logged = [];
  const log = console.log;
  console.log = (...args) => logged.push(args);
  let reply;
  try {
    reply = await chatModel({ model: "library/demo-chat", checkOrPullModel: true }).invoke(
      `Hi [[tokens=3]] ${marker()}`,
    );
  } finally {
    console.log = log;
  }
  return {
    streamed: await collect(await client.pull({ model: "demo-chat", stream: true })),
    whole: await client.pull({ model: "Demo-Chat:latest" }),
    unknown: await caught(() => client.pull({ model })),
    unknownStream: await caught(async () => collect(await client.pull({ model, stream: true }))),
    langchain: { content: reply.content, logged: logged.flat() },
  };
}

async function ollamaTools() {
  const client = ollama();
  const messages = user("Weather in Paris?");
  const stream = await client.chat({
    model: "demo-chat",
    messages,
    tools: [WEATHER_TOOL],
    stream: true,
  });
  const parts = await collect(stream);
  const withCalls = parts.filter((p) => p.message?.tool_calls?.length);
  const whole = await client.chat({ model: "demo-chat", messages, tools: [WEATHER_TOOL] });
  // Send the result back, the way an agent loop does: the model answers with text.
  const follow = await client.chat({
    model: "demo-chat",
    tools: [WEATHER_TOOL],
    messages: [
      ...messages,
      whole.message,
      { role: "tool", content: "sunny, 22 C", tool_name: "get_weather" },
    ],
  });
  return {
    stream: {
      chunksWithCalls: withCalls.length,
      toolCalls: withCalls.flatMap((p) => p.message.tool_calls),
      argumentsType: typeof withCalls[0]?.message.tool_calls[0]?.function?.arguments,
      callChunkDone: withCalls[0]?.done ?? null,
      final: meta(parts.at(-1)),
    },
    nonStream: { toolCalls: whole.message.tool_calls ?? null, meta: meta(whole) },
    followUp: { content: follow.message.content, toolCalls: follow.message.tool_calls ?? null },
  };
}

async function ollamaUnknownModel() {
  const client = ollama();
  const model = "no-such-model";
  const hi = [{ role: "user", content: "hi" }];
  return {
    chat: await caught(() => client.chat({ model, messages: hi })),
    chatStream: await caught(async () =>
      collect(await client.chat({ model, messages: hi, stream: true })),
    ),
    generate: await caught(() => client.generate({ model, prompt: "hi" })),
    show: await caught(() => client.show({ model })),
    embed: await caught(() => client.embed({ model, input: "hi" })),
  };
}

async function ollamaAbort() {
  // A long, slow reply (100 tokens, 50 ms apart): abort it after two chunks.
  const requestId = randomUUID();
  const slow = ollama({ "X-Request-ID": requestId });
  const stream = await slow.chat({
    model: "demo-chat",
    messages: user("Long story [[tokens=100]] [[delay=0.05]]"),
    stream: true,
  });
  const received = [];
  const error = await caught(async () => {
    for await (const part of stream) {
      received.push(part.message.content);
      if (received.length === 2) stream.abort();
    }
  });
  // The client-wide abort() cancels every ongoing stream of that client the same way.
  const second = await slow.chat({
    model: "demo-chat",
    messages: user("Another [[tokens=100]] [[delay=0.05]]"),
    stream: true,
  });
  const secondReceived = [];
  const secondError = await caught(async () => {
    for await (const part of second) {
      secondReceived.push(part.message.content);
      slow.abort();
    }
  });
  // The same client still works afterwards.
  const after = await slow.chat({ model: "demo-chat", messages: user("Again [[tokens=3]]") });
  return {
    requestId,
    received,
    error,
    secondReceived,
    secondError,
    after: { content: after.message.content, done: after.done },
  };
}

async function ollamaMidStreamError() {
  // The backend drops the connection after 3 tokens: the text so far, then an error.
  const stream = await ollama().chat({
    model: "demo-chat",
    messages: user("Hi [[drop_after=3]]"),
    stream: true,
  });
  const received = [];
  const error = await caught(async () => {
    for await (const part of stream) received.push(part.message.content);
  });
  return { received, error };
}

async function ollamaThink() {
  const client = ollama();
  const messages = user("Think first [[tokens=4]]");
  const whole = await client.chat({ model: "demo-reasoner", messages, think: true });
  const parts = await collect(
    await client.chat({ model: "demo-reasoner", messages, think: true, stream: true }),
  );
  return {
    whole: whole.message,
    streamThinking: parts.map((p) => p.message.thinking ?? "").join(""),
    streamContent: parts.map((p) => p.message.content ?? "").join(""),
    // No chunk may mix the two: thinking tokens come first, separately.
    mixedChunks: parts.filter((p) => p.message.thinking && p.message.content).length,
    final: meta(parts.at(-1)),
  };
}

// ---- @langchain/ollama ---------------------------------------------------------------------

const chatModel = (fields = {}) => new ChatOllama({ model: "demo-chat", baseUrl, ...fields });

async function langchainInvoke() {
  const reply = await chatModel().invoke(`Hi [[tokens=5]] ${marker()}`);
  return {
    content: reply.content,
    usage: reply.usage_metadata ?? null,
    doneReason: reply.response_metadata?.done_reason ?? null,
    toolCalls: reply.tool_calls,
  };
}

async function langchainStream() {
  const chunks = [];
  for await (const chunk of await chatModel().stream(`Hi [[tokens=5]] ${marker()}`)) {
    chunks.push(chunk);
  }
  const usage = chunks.map((c) => c.usage_metadata).filter(Boolean);
  return {
    contents: chunks.map((c) => c.content),
    usage: usage.at(-1) ?? null,
    usageChunks: usage.length,
  };
}

async function langchainTools() {
  const model = chatModel().bindTools([WEATHER_TOOL]);
  const question = new HumanMessage(`What is the weather in Paris? ${marker()}`);
  const call = await model.invoke([question]);
  const [first] = call.tool_calls;
  const answer = await model.invoke([
    question,
    call,
    new ToolMessage({ content: "rain", tool_call_id: first.id, name: first.name }),
  ]);
  return {
    toolCalls: call.tool_calls,
    invalidToolCalls: call.invalid_tool_calls,
    argsType: typeof first?.args,
    answer: answer.content,
    answerToolCalls: answer.tool_calls,
  };
}

async function langchainThink() {
  const reply = await chatModel({ model: "demo-reasoner", think: true }).invoke(
    `Think first [[tokens=4]] ${marker()}`,
  );
  return { content: reply.content, reasoning: reply.additional_kwargs?.reasoning_content ?? null };
}

async function langchainEmbeddings() {
  const embeddings = new OllamaEmbeddings({ model: "demo-embed", baseUrl });
  return {
    query: await embeddings.embedQuery("hello world"),
    documents: await embeddings.embedDocuments(["alpha", "beta gamma", "hello world"]),
  };
}

// ---- openai (JS) ---------------------------------------------------------------------------

async function openaiChat() {
  const reply = await openai().chat.completions.create({
    model: "demo-chat",
    messages: user("Hello [[tokens=5]]"),
  });
  return reply;
}

async function openaiChatStream() {
  const stream = await openai().chat.completions.create({
    model: "demo-chat",
    messages: user("Hello [[tokens=5]]"),
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = await collect(stream);
  return {
    ids: [...new Set(chunks.map((c) => c.id))],
    content: chunks.map((c) => c.choices[0]?.delta?.content ?? "").join(""),
    finishReasons: chunks.map((c) => c.choices[0]?.finish_reason ?? null).filter(Boolean),
    usageChunks: chunks.filter((c) => c.usage).length,
    last: chunks.at(-1),
  };
}

async function openaiResponses() {
  // The Responses API, whole and streamed (the SDK's own stream helper)
  const whole = await openai().responses.create({
    model: "demo-chat",
    input: "Hello [[tokens=5]]",
  });
  const stream = openai().responses.stream({
    model: "demo-chat",
    input: user("Hello [[tokens=5]]"),
  });
  const deltas = [];
  stream.on("response.output_text.delta", (event) => deltas.push(event.delta));
  const final = await stream.finalResponse();
  return {
    text: whole.output_text,
    status: whole.status,
    usage: whole.usage,
    deltas,
    finalText: final.output_text,
    finalUsage: final.usage,
  };
}

async function openaiResponsesSocket() {
  // The Responses API's WebSocket mode (ResponsesWS, on the ws package): two turns on one
  // connection, the second continuing the first, then an event that is no turn. Imported
  // here: the other scenarios do not need the ws package
  const { ResponsesWS } = await import("openai/resources/responses/ws");
  const socket = new ResponsesWS(openai());
  const turns = [];
  let deltas = [];
  let error = null;
  socket.send({ type: "response.create", model: "demo-chat", input: "Hello [[tokens=3]]" });
  for await (const item of socket.stream()) {
    if (item.type === "error") {
      // the server's error event, as the SDK hands it over (a WebSocketError)
      const event = item.error.error;
      error = { status: event?.status, code: event?.error.code, type: event?.error.type };
      break;
    }
    if (item.type !== "message") continue;
    const event = item.message;
    if (event.type === "response.output_text.delta") deltas.push(event.delta);
    if (event.type !== "response.completed") continue;
    const { id, status, usage } = event.response;
    turns.push({ id, status, outputTokens: usage.output_tokens, deltas });
    deltas = [];
    if (turns.length === 1) {
      const more = { type: "response.create", model: "demo-chat", input: "More [[tokens=2]]" };
      socket.send({ ...more, previous_response_id: id });
    } else {
      socket.sendRaw("{not json");
    }
  }
  socket.close();
  return { turns, error };
}

async function openaiTools() {
  // The SDK's own stream helper reassembles the argument fragments.
  const runner = openai().chat.completions.stream({
    model: "demo-chat",
    messages: user("Weather in Paris?"),
    tools: [WEATHER_TOOL],
  });
  let argumentDeltas = 0;
  runner.on("tool_calls.function.arguments.delta", () => argumentDeltas++);
  const final = await runner.finalChatCompletion();
  const choice = final.choices[0];
  return {
    finishReason: choice.finish_reason,
    toolCalls: choice.message.tool_calls,
    argumentDeltas,
  };
}

async function openaiEmbeddings() {
  const client = openai();
  const input = ["hello world", "second text"];
  // The SDK asks for base64 by default and decodes it itself.
  const base64 = await client.embeddings.create({ model: "demo-embed", input });
  const float = await client.embeddings.create({
    model: "demo-embed",
    input,
    encoding_format: "float",
  });
  return {
    base64: base64.data.map((d) => d.embedding),
    float: float.data.map((d) => d.embedding),
    indexes: base64.data.map((d) => d.index),
    usage: base64.usage,
  };
}

async function openaiModels() {
  const models = [];
  for await (const model of openai().models.list()) models.push(model);
  return { models };
}

async function openaiError() {
  const client = openai();
  const model = "no-such-model";
  const hi = [{ role: "user", content: "hi" }];
  const attempt = (fn) =>
    caught(fn, (err) => ({
      isAPIError: err instanceof OpenAI.APIError,
      isNotFoundError: err instanceof OpenAI.NotFoundError,
      type: err.type ?? null,
    }));
  return {
    chat: await attempt(() => client.chat.completions.create({ model, messages: hi })),
    chatStream: await attempt(async () =>
      collect(await client.chat.completions.create({ model, messages: hi, stream: true })),
    ),
    embeddings: await attempt(() => client.embeddings.create({ model, input: "hi" })),
  };
}

async function openaiAbort() {
  // Slow replies (100 tokens, 50 ms apart), each left early in another way the SDK offers;
  // then the same client (its keep-alive connections) asks again.
  const requestId = randomUUID();
  const client = new OpenAI({
    baseURL: `${baseUrl}/v1`,
    apiKey: "unused",
    maxRetries: 0,
    defaultHeaders: { "X-Request-ID": requestId },
  });
  const slow = (text) => user(`${text} [[tokens=100]] [[delay=0.05]]`);
  const abortDetails = (err) => ({ isUserAbort: err instanceof OpenAI.APIUserAbortError });
  const received = {};
  const controllerAbort = await caught(async () => {
    const stream = await client.chat.completions.create({
      model: "demo-chat",
      messages: slow("One"),
      stream: true,
    });
    received.controllerAbort = 0;
    for await (const chunk of stream) {
      if (++received.controllerAbort === 3) stream.controller.abort();
    }
  }, abortDetails);
  const breakOut = await caught(async () => {
    const stream = await client.chat.completions.create({
      model: "demo-chat",
      messages: slow("Two"),
      stream: true,
    });
    received.breakOut = 0;
    for await (const chunk of stream) if (++received.breakOut === 3) break; // the SDK aborts
  });
  const responsesAbort = await caught(async () => {
    const stream = client.responses.stream({ model: "demo-chat", input: slow("Three") });
    received.responsesAbort = 0;
    stream.on("response.output_text.delta", () => {
      if (++received.responsesAbort === 2) stream.abort();
    });
    await stream.finalResponse();
  }, abortDetails);
  const controller = new AbortController();
  setTimeout(() => controller.abort(), 300);
  const signalAbort = await caught(
    () =>
      client.chat.completions.create(
        { model: "demo-chat", messages: slow("Four") },
        { signal: controller.signal },
      ),
    abortDetails,
  );
  const timedOut = await caught(
    () => client.chat.completions.create({ model: "demo-chat", messages: slow("Five") }, { timeout: 300 }),
    (err) => ({ isTimeout: err instanceof OpenAI.APIConnectionTimeoutError }),
  );
  const after = await client.chat.completions.create({
    model: "demo-chat",
    messages: user("Again [[tokens=3]]"),
  });
  return {
    requestId,
    received,
    controllerAbort,
    breakOut,
    responsesAbort,
    signalAbort,
    timedOut,
    after: after.choices[0].message.content,
  };
}

// ---- a body over the proxy's MAX_REQUEST_BYTES (1 MiB in the test) ----------------------------

async function bodyTooLarge() {
  const ol = ollama();
  const oa = openai();
  const big = [{ role: "user", content: "x".repeat(32 * 1024 * 1024) }];
  const times = async (fn) => {
    const results = [];
    for (let i = 0; i < 3; i++) results.push(await caught(fn));
    return results;
  };
  const ollamaChat = await times(() => ol.chat({ model: "demo-chat", messages: big }));
  const ollamaChatStream = await times(async () =>
    collect(await ol.chat({ model: "demo-chat", messages: big, stream: true })),
  );
  const openaiChat = await times(() =>
    oa.chat.completions.create({ model: "demo-chat", messages: big }),
  );
  const openaiEmbeddings = await times(() =>
    oa.embeddings.create({ model: "demo-embed", input: big[0].content }),
  );
  const after = await ol.chat({ model: "demo-chat", messages: user("Hi [[tokens=2]]") });
  const brief = (results) => results.map(({ value, ...rest }) => rest);
  return {
    ollamaChat: brief(ollamaChat),
    ollamaChatStream: brief(ollamaChatStream),
    openaiChat: brief(openaiChat),
    openaiEmbeddings: brief(openaiEmbeddings),
    after: after.message.content,
  };
}

// ---- a proxy with PROXY_API_KEYS (the test's key: "right-key-0123456789") -------------------

async function authFailure() {
  const key = "right-key-0123456789";
  const withKey = (k) => ({
    ollama: new Ollama({ host: baseUrl, headers: k ? { Authorization: `Bearer ${k}` } : {} }),
    openai: new OpenAI({
      baseURL: `${baseUrl}/v1`,
      apiKey: k ?? "unused",
      maxRetries: 0,
      defaultHeaders: k ? {} : { Authorization: null }, // the SDK's way to send no key
    }),
  });
  const asOpenAI = (err) => ({
    isAuthenticationError: err instanceof OpenAI.AuthenticationError,
    code: err.code ?? null,
  });
  const tries = async (clients, content) => {
    const messages = [{ role: "user", content }];
    return {
      ollamaChat: await caught(() => clients.ollama.chat({ model: "demo-chat", messages })),
      ollamaStream: await caught(async () =>
        collect(await clients.ollama.chat({ model: "demo-chat", messages, stream: true })),
      ),
      openaiChat: await caught(
        () => clients.openai.chat.completions.create({ model: "demo-chat", messages }),
        asOpenAI,
      ),
      openaiEmbeddings: await caught(
        () => clients.openai.embeddings.create({ model: "demo-embed", input: content }),
        asOpenAI,
      ),
    };
  };
  const brief = (results) =>
    Object.fromEntries(Object.entries(results).map(([k, { value, ...rest }]) => [k, rest]));
  const right = withKey(key);
  return {
    missing: brief(await tries(withKey(null), "hi")),
    wrong: brief(await tries(withKey("wrong-key"), "hi")),
    // a body the client is still writing when the 401 comes (under the size limit)
    wrongLargeBody: brief(await tries(withKey("wrong-key"), "x".repeat(32 * 1024 * 1024))),
    right: {
      chat: (await right.ollama.chat({ model: "demo-chat", messages: user("Hi [[tokens=2]]") }))
        .message.content,
      openai: (
        await right.openai.chat.completions.create({
          model: "demo-chat",
          messages: user("Hi [[tokens=2]]"),
        })
      ).choices[0].message.content,
    },
  };
}

// --------------------------------------------------------------------------------------------

const SCENARIOS = {
  "ollama-chat": ollamaChat,
  "ollama-chat-stream": ollamaChatStream,
  "ollama-generate": ollamaGenerate,
  "ollama-generate-stream": ollamaGenerateStream,
  "ollama-embed": ollamaEmbed,
  "ollama-embeddings": ollamaEmbeddings,
  "ollama-embed-dimensions": ollamaEmbedDimensions,
  "ollama-list": ollamaList,
  "ollama-show": ollamaShow,
  "ollama-ps": ollamaPs,
  "ollama-version": ollamaVersion,
  "ollama-tools": ollamaTools,
  "ollama-pull": ollamaPull,
  "ollama-unknown-model": ollamaUnknownModel,
  "ollama-abort": ollamaAbort,
  "ollama-mid-stream-error": ollamaMidStreamError,
  "ollama-think": ollamaThink,
  "langchain-invoke": langchainInvoke,
  "langchain-stream": langchainStream,
  "langchain-tools": langchainTools,
  "langchain-think": langchainThink,
  "langchain-embeddings": langchainEmbeddings,
  "openai-chat": openaiChat,
  "openai-chat-stream": openaiChatStream,
  "openai-responses": openaiResponses,
  "openai-responses-socket": openaiResponsesSocket,
  "openai-tools": openaiTools,
  "openai-embeddings": openaiEmbeddings,
  "openai-models": openaiModels,
  "openai-error": openaiError,
  "openai-abort": openaiAbort,
  "body-too-large": bodyTooLarge,
  "auth-failure": authFailure,
};

if (!baseUrl || !SCENARIOS[scenario]) {
  console.error(`usage: node clients.mjs BASE_URL {${Object.keys(SCENARIOS).join("|")}}`);
  process.exit(2);
}
console.log(JSON.stringify(await SCENARIOS[scenario]()));
