// Shared by the test files. Node built-ins only, so `deno test` and `bun test`
// run the same code.
import { Buffer } from "node:buffer";
import { type ChildProcess, spawn } from "node:child_process";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { readFileSync } from "node:fs";
import process from "node:process";
import { fileURLToPath } from "node:url";
import type { BrokerStats } from "../mod.ts";
import { track } from "./harness.ts";

export const ROOT = fileURLToPath(new URL("..", import.meta.url));
/** A runtime that runs this project: its tests, and `server.ts`. */
export type Runtime = "bun" | "deno" | "node";
export const RUNTIME: Runtime = "Bun" in globalThis
  ? "bun"
  : "Deno" in globalThis
  ? "deno"
  : "node";

/** What the WHATWG "event stream" parser reports, plus comments for heartbeat tests. */
export type Parsed =
  | { type: "event"; event: string; data: string; lastEventId: string }
  | { type: "comment"; text: string };

/**
 * A line-by-line implementation of the WHATWG HTML event stream
 * interpretation (section 9.2.6), written from the spec independently of
 * mod.ts, so encoder tests are a real round trip.
 */
export class EventStreamParser {
  lastEventId = "";
  retry: number | undefined;
  #data = "";
  #type = "";
  #idBuffer = "";
  #pending = "";
  #first = true;
  #endedWithCR = false;

  /** Feeds decoded text; returns what it completed. */
  push(text: string): Parsed[] {
    if (this.#first && text.length > 0) {
      this.#first = false;
      if (text.startsWith("\uFEFF")) text = text.slice(1);
    }
    // A CR at the end of the previous chunk and an LF at the start of this
    // one are one line break.
    if (this.#endedWithCR && text.startsWith("\n")) text = text.slice(1);
    this.#endedWithCR = text.endsWith("\r");
    const out: Parsed[] = [];
    const parts = (this.#pending + text).split(/\r\n|\r|\n/);
    this.#pending = parts.pop()!;
    for (const line of parts) this.#line(line, out);
    return out;
  }

  #line(line: string, out: Parsed[]): void {
    if (line === "") return this.#dispatch(out);
    if (line.startsWith(":")) {
      out.push({ type: "comment", text: line.slice(1) });
      return;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.#type = value;
    else if (field === "data") this.#data += value + "\n";
    else if (field === "id") {
      if (!value.includes("\0")) this.#idBuffer = value;
    } else if (field === "retry") {
      if (/^[0-9]+$/.test(value)) this.retry = Number(value);
    }
  }

  #dispatch(out: Parsed[]): void {
    this.lastEventId = this.#idBuffer;
    if (this.#data === "") {
      this.#type = "";
      return;
    }
    const data = this.#data.endsWith("\n") ? this.#data.slice(0, -1) : this.#data;
    out.push({
      type: "event",
      event: this.#type || "message",
      data,
      lastEventId: this.lastEventId,
    });
    this.#data = "";
    this.#type = "";
  }
}

/** Parses a whole encoded stream. */
export function parseAll(bytes: Uint8Array): { items: Parsed[]; parser: EventStreamParser } {
  const parser = new EventStreamParser();
  return { items: parser.push(new TextDecoder().decode(bytes)), parser };
}

export type SseEvent = Extract<Parsed, { type: "event" }>;

/** Reads a live event stream item by item, as an EventSource would. */
export class EventReader {
  readonly parser = new EventStreamParser();
  #reader: ReadableStreamDefaultReader<string>;
  #queue: Parsed[] = [];

  constructor(body: ReadableStream<Uint8Array>) {
    this.#reader = body.pipeThrough(new TextDecoderStream()).getReader();
  }

  /** The next event or comment, or `null` when the stream ended cleanly. */
  async next(): Promise<Parsed | null> {
    while (this.#queue.length === 0) {
      const { done, value } = await this.#reader.read();
      if (done) return null;
      this.#queue.push(...this.parser.push(value));
    }
    return this.#queue.shift()!;
  }

  /** The next event, skipping comments; throws if the stream ends first. */
  async event(): Promise<SseEvent> {
    for (;;) {
      const item = await this.next();
      if (item === null) throw new Error("stream ended while waiting for an event");
      if (item.type === "event") return item;
    }
  }

  /** The next `count` events. */
  async events(count: number): Promise<SseEvent[]> {
    const out: SseEvent[] = [];
    while (out.length < count) out.push(await this.event());
    return out;
  }

  /** Events until one satisfies `last` (included). */
  async until(last: (event: SseEvent) => boolean): Promise<SseEvent[]> {
    const out: SseEvent[] = [];
    for (;;) {
      const event = await this.event();
      out.push(event);
      if (last(event)) return out;
    }
  }

  cancel(): Promise<void> {
    return this.#reader.cancel();
  }
}

/** Opens `url` as an event stream and checks that it is one. */
export async function subscribe(url: string, headers: HeadersInit = {}): Promise<EventReader> {
  const response = await fetch(url, { headers });
  if (response.status !== 200 || response.body === null) {
    throw new Error(`subscribe ${url}: ${response.status} ${await response.text()}`);
  }
  return new EventReader(response.body);
}

/** Publishes through the demo's HTTP route and returns the event's id. */
export async function publish(base: string, body: unknown): Promise<string> {
  const response = await fetch(new URL("/publish", base), {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const json = await response.json();
  if (response.status !== 200) throw new Error(`publish: ${response.status} ${json.error}`);
  return json.id;
}

export async function stats(base: string): Promise<BrokerStats> {
  return await (await fetch(new URL("/stats", base))).json();
}

/**
 * Orders two event ids (`<integer>-<integer>`, as both event logs make them),
 * written here apart from mod.ts so that tests check its order.
 */
export function compareIds(a: string, b: string): number {
  const [am, as] = a.split("-").map(Number);
  const [bm, bs] = b.split("-").map(Number);
  return am - bm || as - bs;
}

/** A pseudo-random number generator from a fixed seed, so a failure reproduces. */
export function seededRandom(seed: number): () => number {
  return () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
}

/**
 * Waits until `condition` holds, checking every 20 ms, for state that can only
 * be observed by asking (a server's counters). Fails after `ms`.
 */
export async function eventually(
  condition: () => boolean | Promise<boolean>,
  ms: number,
  what: string,
): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** A real `server.ts` process on a free port of 127.0.0.1. */
export interface ServerProcess {
  url: string;
  child: ChildProcess;
  output: () => string;
  exited: Promise<number | null>;
  /** Sends a signal. (Deno's `ChildProcess.kill` reports the exit as killed even when the process exits by itself.) */
  signal(name: "SIGTERM" | "SIGINT" | "SIGKILL"): void;
  stop(): Promise<number | null>;
  rssKiB(): number;
}

/** Starts `server.ts` under `runtime` (default: the one running the tests), with extra Deno flags. */
export function startServer(
  env: Record<string, string> = {},
  runtime: Runtime = RUNTIME,
  denoFlags: string[] = [],
): Promise<ServerProcess> {
  const args = scriptArgs(runtime, "server.ts", ["--allow-net", "--allow-env", ...denoFlags]);
  return startProcess(binary(runtime), args, {
    ...process.env,
    PORT: "0",
    HOSTNAME: "127.0.0.1",
    TICK_MS: "0",
    ...env,
  });
}

/**
 * Starts a server from any command (the executable, the npm package's
 * command), with exactly `env`, and waits for the URL it prints first.
 */
export function startProcess(
  command: string,
  args: string[],
  env: Record<string, string | undefined>,
  cwd = ROOT,
): Promise<ServerProcess> {
  const child = spawn(command, args, { cwd, env, stdio: ["ignore", "pipe", "pipe"] });
  let output = "";
  const untrack = track(() => child.kill("SIGKILL"));
  const exited = new Promise<number | null>((resolve) =>
    child.on("exit", (code) => {
      untrack();
      resolve(code);
    })
  );
  let stdout = "";
  return new Promise((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      stdout += chunk.toString();
      // The first line of stdout (warnings go to stderr): the URL alone, or
      // with LOG_FORMAT=json in the first entry's `url`.
      const line = stdout.split("\n")[0];
      const url = line.startsWith("{") ? JSON.parse(line).url ?? "" : line.trim();
      if (stdout.includes("\n") && /^http:\/\//.test(url)) {
        child.stdout!.off("data", onData);
        child.stdout!.on("data", (more: Buffer) => output += more.toString());
        resolve({
          url,
          child,
          output: () => output,
          exited,
          signal: (name) => process.kill(child.pid!, name),
          async stop() {
            if (child.exitCode === null) process.kill(child.pid!, "SIGTERM");
            return await exited;
          },
          rssKiB: () => rssKiB(child.pid!),
        });
      }
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", (chunk: Buffer) => output += chunk.toString());
    exited.then((code) =>
      reject(new Error(`server exited (${code}) before listening:\n${output}`))
    );
  });
}

/**
 * Runs `body` with a `server.ts` process started with `env`, then stops it
 * (also when `body` fails) and checks that it exited 0.
 */
export async function withServer<T>(
  env: Record<string, string>,
  body: (server: ServerProcess) => Promise<T>,
): Promise<T> {
  const server = await startServer(env);
  let result: T;
  try {
    result = await body(server);
  } catch (error) {
    await server.stop();
    throw error;
  }
  const code = await server.stop();
  if (code !== 0) throw new Error(`server.ts exited ${code}:\n${server.output()}`);
  return result;
}

/** The arguments that run `script` under `runtime`, with Deno's permission flags. */
export function scriptArgs(runtime: Runtime, script: string, denoFlags: string[]): string[] {
  if (runtime === "deno") return ["run", ...denoFlags, script];
  return runtime === "bun" ? ["run", script] : [script];
}

/** The runtimes' binaries, installed by `npm install` from package.json. */
export function binary(runtime: Runtime): string {
  if (runtime === RUNTIME) return process.execPath;
  return fileURLToPath(new URL(`../node_modules/.bin/${runtime}`, import.meta.url));
}

function rssKiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/VmRSS:\s+(\d+)/.exec(status)![1]);
}

/** A webhook request a receiver got: its parsed body, its exact text, its signature header. */
export interface Delivery {
  body: {
    subscription_id: string;
    wake_id: string;
    generation: number;
    streams: {
      path: string;
      link_type: string;
      acked_offset: string;
      tail_offset: string;
      has_pending: boolean;
    }[];
    callback_url: string;
    callback_token: string;
  };
  raw: string;
  signature: string;
  contentType: string;
}

/**
 * A webhook receiver on 127.0.0.1: `answer` decides each response (status
 * and JSON body), or `"hold"` to answer only when it closes.
 */
export async function webhookReceiver(
  answer: (delivery: Delivery, index: number) => [number, unknown] | "hold" = () => [200, {}],
) {
  const deliveries: Delivery[] = [];
  const waiters: (() => void)[] = [];
  const held: ServerResponse[] = [];
  let onAbort: (() => void) | undefined;
  const server = createServer((request: IncomingMessage, response: ServerResponse) => {
    const chunks: Buffer[] = [];
    request.on("data", (chunk: Buffer) => chunks.push(chunk));
    request.on("end", () => {
      const raw = Buffer.concat(chunks).toString("utf8");
      const delivery = {
        body: JSON.parse(raw),
        raw,
        signature: String(request.headers["webhook-signature"]),
        contentType: String(request.headers["content-type"]),
      };
      deliveries.push(delivery);
      for (const wake of waiters.splice(0)) wake();
      const reply = answer(delivery, deliveries.length - 1);
      if (reply === "hold") {
        held.push(response);
        request.socket.on("close", () => onAbort?.());
        return;
      }
      response.writeHead(reply[0], { "content-type": "application/json" });
      response.end(JSON.stringify(reply[1]));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const close = () => {
    for (const response of held) response.destroy();
    server.closeAllConnections();
    server.close();
  };
  const untrack = track(close);
  const { port } = server.address() as { port: number };
  return {
    url: `http://127.0.0.1:${port}/hook`,
    deliveries,
    /** Waits for delivery number `count` (1-based) and returns it. */
    async nth(count: number): Promise<Delivery> {
      while (deliveries.length < count) await new Promise<void>((wake) => waiters.push(wake));
      return deliveries[count - 1];
    },
    /** Answers the held requests now; resolves once the answers are sent. */
    answerHeld(status: number, body: unknown): Promise<void> {
      return Promise.all(
        held.splice(0).map((response) =>
          new Promise<void>((resolve) => {
            response.on("finish", () => resolve());
            response.writeHead(status, { "content-type": "application/json" });
            response.end(JSON.stringify(body));
          })
        ),
      ).then(() => {});
    },
    /** Calls `abort` when the client of a held request goes away. */
    onAbort(abort: () => void) {
      onAbort = abort;
    },
    close() {
      untrack();
      close();
    },
  };
}
