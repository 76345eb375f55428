// What vercel-ai.mjs and anthropic.mjs share: the Vercel AI SDK's calls as the tests report
// them, the report's warnings and console lines, and printing the report.

import { randomUUID } from "node:crypto";
import { basename } from "node:path";

import { APICallError, generateText, streamText, tool } from "ai";
import { z } from "zod";

// The SDK's warnings (AI_SDK_LOG_WARNINGS) and anything printed to the console: collected
// into the report, not printed (the tests want ONE line on stdout, nothing on stderr).
const warnings = [];
globalThis.AI_SDK_LOG_WARNINGS = (logged) => warnings.push(...logged.warnings);
const consoleLines = [];
for (const level of ["log", "warn", "error", "info", "debug"]) {
  console[level] = (...args) => consoleLines.push(args.map(String).join(" "));
}

// `node SCRIPT BASE_URL SCENARIO`: runs scenarios[SCENARIO] (the script reads BASE_URL, the
// proxy's, itself) and prints its report, the warnings and console lines with it.
export async function runScenario(scenarios) {
  const [baseUrl, scenario] = process.argv.slice(2);
  if (!baseUrl || !scenarios[scenario]) {
    const names = Object.keys(scenarios).join("|");
    process.stderr.write(`usage: node ${basename(process.argv[1])} BASE_URL {${names}}\n`);
    process.exit(2);
  }
  const result = await scenarios[scenario]();
  process.stdout.write(`${JSON.stringify({ ...result, warnings, console: consoleLines })}\n`);
}

// a prompt of its own: no backend cache answers it
export const prompt = (text) => `${text} ${randomUUID().slice(0, 12)}`;
export const WEATHER_INPUT = z.object({ city: z.string(), days: z.number().int() });
export const weather = (execute) =>
  tool({ description: "Current weather for a city", inputSchema: WEATHER_INPUT, execute });
export const CITY = z.object({ name: z.string(), population: z.number() });

export function errorInfo(err) {
  return {
    name: err?.name ?? null,
    message: String(err?.message ?? err),
    isAPICallError: APICallError.isInstance(err),
    statusCode: err?.statusCode ?? null,
    responseBody: err?.responseBody ?? null,
  };
}

// The value of fn(), or what the error it threw looks like (as `describe` tells it).
export async function caught(fn, describe = errorInfo) {
  try {
    return { ok: true, value: await fn() };
  } catch (err) {
    return { ok: false, ...describe(err) };
  }
}

export const usageOf = (u) => ({ input: u?.inputTokens ?? null, output: u?.outputTokens ?? null });

const callOf = (c) => ({ id: c.toolCallId, name: c.toolName, input: c.input });

// streamText whole: its parts (types in order; errors, calls and deltas in detail) and results
export async function streamed(options) {
  const result = streamText({ maxRetries: 0, onError: () => {}, ...options });
  const types = [];
  const textDeltas = [];
  const reasoningDeltas = [];
  const inputDeltas = [];
  const errors = [];
  const calls = [];
  for await (const part of result.fullStream) {
    types.push(part.type);
    if (part.type === "text-delta") textDeltas.push(part.text);
    else if (part.type === "reasoning-delta") reasoningDeltas.push(part.text);
    else if (part.type === "tool-input-delta") inputDeltas.push(part.delta);
    else if (part.type === "error") errors.push(errorInfo(part.error));
    else if (part.type === "tool-call") calls.push({ ...callOf(part), invalid: !!part.invalid });
  }
  const settled = async (promise) => caught(() => promise);
  const finish = await settled(result.finishReason);
  const usage = await settled(result.totalUsage);
  const steps = await settled(result.steps);
  return {
    types,
    textDeltas,
    text: textDeltas.join(""),
    reasoning: reasoningDeltas.join(""),
    inputDeltas,
    errors,
    calls,
    finishReason: finish.ok ? finish.value : null,
    usage: usage.ok ? usageOf(usage.value) : null,
    stepUsages: steps.ok ? steps.value.map((s) => usageOf(s.usage)) : [],
  };
}

// generateText whole, each step's finish reason, calls and text too
export async function generated(options) {
  const r = await generateText({ maxRetries: 0, ...options });
  return {
    text: r.text,
    reasoning: r.reasoningText ?? null,
    finishReason: r.finishReason,
    usage: usageOf(r.usage),
    calls: r.toolCalls.map(callOf),
    steps: r.steps.map((s) => ({
      finishReason: s.finishReason,
      calls: s.toolCalls.map(callOf),
      text: s.text,
    })),
    stepUsages: r.steps.map((s) => usageOf(s.usage)),
  };
}
