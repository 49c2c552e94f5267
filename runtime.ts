/**
 * What the demo and the benchmark servers need of a runtime (its
 * environment, one listener, signals and exit) on Deno, Bun and Node,
 * chosen at run time so the same file runs unchanged on each. On Node it
 * serves `Request` and `Response` over `node:http`. Not part of the library:
 * `mod.ts` needs none of it.
 *
 * @module
 */
import type { ServerResponse } from "node:http";
import { DIRECT_WRITE, type DirectSink, type DirectWrite, type FetchServer } from "./mod.ts";

/**
 * What a handler learns of the server besides the request: Bun's server
 * itself, and the same two methods on Deno and Node.
 */
export interface Server extends FetchServer {
  /** The address the request came from (the last hop: a proxy's, behind one). */
  requestIP?(request: Request): { address: string } | null;
}

/** A fetch handler; Bun passes its server as the second argument. */
export type Handler = (request: Request, server?: Server) => Response | Promise<Response>;

/** Where to listen; `reusePort` lets several processes share the port (Linux). */
export interface Address {
  port: number;
  hostname: string;
  reusePort?: boolean;
}

/** The runtime's services this project uses. */
export interface Runtime {
  env(name: string): string | undefined;
  /** The names of every variable of the environment. */
  envNames(): string[];
  /** Listens; rejects with a {@linkcode ListenError} when it cannot. */
  serve(handler: Handler, address: Address): Promise<Listener>;
  onSignal(signal: "SIGINT" | "SIGTERM", listener: () => void): void;
  exit(code: number): never;
  /** The process's resident memory, in bytes. */
  residentMemory(): number;
  /** The id of the parent process: it changes when the parent is gone. */
  parentPid(): number;
}

/** A server that listens: its port, and how to stop it (open responses first end). */
export interface Listener {
  port: number;
  stop(): Promise<void>;
}

/** Why a server could not listen, in words, with the address it tried. */
export class ListenError extends Error {
  constructor(address: Address, cause: unknown) {
    const { code, message } = cause as { code?: string; message?: string };
    const host = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
    super(`cannot listen on ${host}:${address.port}: ${LISTEN_ERRORS[code!] ?? message}`);
    this.name = "ListenError";
  }
}

/** The reasons both runtimes give, under their shared error codes. */
const LISTEN_ERRORS: Record<string, string> = {
  EADDRINUSE: "the address is already in use",
  EADDRNOTAVAIL: "the address is not available on this machine",
  EACCES: "permission denied",
};

// Minimal shapes of the two runtimes' globals, so `deno check` needs no Bun types.
interface BunGlobal {
  env: Record<string, string | undefined>;
  serve(
    options: Address & {
      fetch: Handler;
      error?: (error: Error) => Response;
      /** Seconds a connection may be idle. */
      idleTimeout?: number;
    },
  ): { port: number; stop(force?: boolean): Promise<void> };
}
interface ProcessGlobal {
  env: Record<string, string | undefined>;
  on(signal: string, listener: () => void): void;
  exit(code: number): never;
  memoryUsage: { rss(): number };
  ppid: number;
}

/** The runtime this program runs on; also reads `LOG_FORMAT` for {@linkcode log}. */
export function currentRuntime(): Runtime {
  const runtime = detectRuntime();
  const format = runtime.env("LOG_FORMAT") || "text";
  if (format !== "text" && format !== "json") {
    log("error", `LOG_FORMAT must be "text" or "json", got ${JSON.stringify(format)}`);
    runtime.exit(1);
  }
  jsonLogs = format === "json";
  return runtime;
}

function detectRuntime(): Runtime {
  const { Bun, process } = globalThis as { Bun?: BunGlobal; process?: ProcessGlobal };
  // Bun first: it also defines some Deno-compatible globals in some setups.
  // Stryker disable next-line ConditionalExpression: Bun always has process; the check is for types
  if (Bun !== undefined && process !== undefined) {
    return {
      env: (name) => Bun.env[name],
      envNames: () => Object.keys(Bun.env),
      // No `export default { fetch }` in the entry file: Bun would start a
      // second server from it. Bun.serve is called here, once.
      // An idle keep-alive connection is kept 65 s rather than Bun's 10 s (see serveNode).
      serve: (handler, address) =>
        listening(
          address,
          () => Bun.serve({ ...address, fetch: handler, error: internalError, idleTimeout: 65 }),
        )
          .then((server) => ({ port: server.port, stop: () => server.stop() })),
      onSignal: (signal, listener) => process.on(signal, listener),
      exit: (code) => process.exit(code),
      residentMemory: () => process.memoryUsage.rss(),
      parentPid: () => process.ppid,
    };
  }
  if (typeof Deno !== "undefined") {
    return {
      env: (name) => Deno.env.get(name),
      envNames: () => Object.keys(Deno.env.toObject()),
      serve: (handler, address) =>
        listening(address, () => {
          // Deno ends the process (exit 70) on an unstable option without its flag:
          // refuse first, with a reason. Its unstable network APIs exist only with the flag.
          if (address.reusePort && !("listenDatagram" in Deno)) {
            throw { message: "sharing the port on Deno needs --unstable-net" };
          }
          return Deno.serve(
            { ...address, onListen() {}, onError: internalError },
            (request, info) =>
              handler(request, { requestIP: () => ({ address: info.remoteAddr.hostname }) }),
          );
        }).then((server) => ({ port: server.addr.port, stop: () => server.shutdown() })),
      onSignal: (signal, listener) => Deno.addSignalListener(signal, listener),
      exit: (code) => Deno.exit(code),
      residentMemory: () => Deno.memoryUsage().rss,
      parentPid: () => Deno.ppid,
    };
  }
  // Stryker disable next-line ConditionalExpression: reached on Node only, which has process
  if (process !== undefined) {
    return {
      env: (name) => process.env[name],
      envNames: () => Object.keys(process.env),
      serve: serveNode,
      onSignal: (signal, listener) => process.on(signal, listener),
      exit: (code) => process.exit(code),
      residentMemory: () => process.memoryUsage.rss(),
      parentPid: () => process.ppid,
    };
  }
  // Stryker disable next-line StringLiteral: reached on no runtime the tests run on
  throw new Error("this program runs on Deno, Bun or Node; import mod.ts on other runtimes");
}

/**
 * Serves a fetch handler over `node:http`. Each request becomes a `Request`
 * whose signal aborts when the client goes away; a response body is written
 * as the client reads it (a client that stops reading stops the reads of the
 * body, so the broker's queue, not Node's, holds what waits for it, and its
 * limit applies). Node's own timeouts leave a quiet stream alone: the
 * socket has no idle timeout, and `requestTimeout` and `headersTimeout` end
 * once a request has arrived. An idle keep-alive connection is kept 65 s
 * rather than Node's 5 s: a load balancer reuses a connection it holds for
 * up to 60 s (AWS's default), and one the server has just closed fails.
 */
async function serveNode(handler: Handler, address: Address): Promise<Listener> {
  const { createServer } = await import("node:http");
  const { Readable } = await import("node:stream");
  const { setImmediate: nextTurn } = await import("node:timers/promises");
  const WAITING = Symbol("waiting");
  const server = createServer(async (incoming, outgoing) => {
    const aborted = new AbortController();
    // "close" comes when the response is done or the connection is gone.
    outgoing.on("close", () => aborted.abort());
    const headers = new Headers();
    for (let i = 0; i < incoming.rawHeaders.length; i += 2) {
      headers.append(incoming.rawHeaders[i], incoming.rawHeaders[i + 1]);
    }
    const hasBody = incoming.method !== "GET" && incoming.method !== "HEAD";
    let url: URL;
    try {
      url = new URL(`http://${headers.get("host") ?? "localhost"}${incoming.url}`);
    } catch {
      // Said to the client only: a log line per such request would let anyone flood the log.
      const body = JSON.stringify({ error: "malformed Host header or request target" });
      outgoing.writeHead(400, {
        "content-type": "application/json",
        "content-length": String(body.length), // ASCII
        connection: "close",
      });
      return void outgoing.end(body);
    }
    let response: Response;
    try {
      const init: RequestInit & { duplex?: "half" } = {
        method: incoming.method,
        headers,
        body: hasBody ? Readable.toWeb(incoming) as ReadableStream<Uint8Array> : undefined,
        signal: aborted.signal,
        duplex: "half", // a streamed request body needs it
      };
      // Stryker disable next-line StringLiteral: undefined only once the socket is gone
      const remote = { address: incoming.socket.remoteAddress ?? "" };
      response = await handler(new Request(url, init), { requestIP: () => remote });
    } catch (error) {
      response = internalError(error);
    }
    const head: string[] = [];
    response.headers.forEach((value, name) => {
      if (name !== "set-cookie") head.push(name, value);
    });
    for (const cookie of response.headers.getSetCookie()) head.push("set-cookie", cookie);
    if (response.body === null || incoming.method === "HEAD" || outgoing.destroyed) {
      response.body?.cancel().catch(() => {});
      return void outgoing.writeHead(response.status, head).end();
    }
    const direct = (response.body as { [DIRECT_WRITE]?: DirectWrite })[DIRECT_WRITE];
    let sink: NodeSink | undefined;
    const reader = response.body.getReader();
    outgoing.on("close", () => reader.cancel().catch(() => {}));
    try {
      // What the body has ready within this turn of the event loop: all of a
      // JSON or text answer, which then goes with a Content-Length (as from
      // Node's own servers, and simple clients need it), or the start of a
      // stream, whose head then goes at once and the rest chunked.
      const ready: Uint8Array[] = [];
      let readyBytes = 0;
      let next: Promise<ReadableStreamReadResult<Uint8Array>> | undefined = reader.read();
      // Stryker disable next-line EqualityOperator: at exactly 64 KiB, one chunk more goes with the head
      while (readyBytes <= 64 * 1024) {
        const result = await Promise.race([next!, nextTurn(WAITING)]);
        if (result === WAITING) break;
        next = undefined;
        if (result.done) break;
        ready.push(result.value);
        readyBytes += result.value.byteLength;
        next = reader.read();
      }
      if (next === undefined && !response.headers.has("content-length")) {
        head.push("content-length", String(readyBytes));
      }
      outgoing.writeHead(response.status, head);
      for (const chunk of ready) outgoing.write(chunk);
      while (next !== undefined) {
        // A broker's stream, once its first bytes are out, writes to the
        // socket itself: no promise per chunk (latency as bare node:http's).
        // Not a response waiting behind another on its connection: Node
        // would hold all it is sent, past any limit, until its turn.
        if (
          direct !== undefined && outgoing.socket !== null &&
          direct.attach(sink ??= new NodeSink(outgoing))
        ) {
          outgoing.on("drain", () => direct.pull());
          // The body now only ends or errors, when the stream does.
          return void next.catch(() => {});
        }
        const { done, value } = await next;
        if (done) break;
        if (!outgoing.write(value)) {
          // Wait until the client has taken it, or has gone; then drop both
          // listeners, so a long stream does not collect one per wait.
          await new Promise<void>((resolve) => {
            const done = () => {
              // Stryker disable next-line StringLiteral: a listener left behind costs memory only
              outgoing.off("drain", done).off("close", done);
              resolve();
            };
            // Stryker disable next-line StringLiteral: a client gone mid-wait is cancelled by the close listener above; this one frees the wait
            outgoing.on("drain", done).on("close", done);
          });
        }
        next = reader.read();
      }
      outgoing.end();
    } catch {
      outgoing.destroy(); // the body failed (a slow client cut, say): the client sees an error
    }
  });
  server.keepAliveTimeout = 65_000;
  await new Promise<void>((resolve, reject) => {
    server.once("error", (error) => reject(new ListenError(address, error)));
    server.listen(
      { port: address.port, host: address.hostname, reusePort: address.reusePort },
      resolve,
    );
  });
  return {
    port: (server.address() as { port: number }).port,
    stop: () =>
      new Promise((resolve) => {
        // Keep-alive connections go as soon as their responses are done.
        const sweep = setInterval(() => server.closeIdleConnections(), 20);
        server.close(() => {
          // Stryker disable next-line CallExpression: a sweep left running only keeps a stopped process's loop busy
          clearInterval(sweep);
          resolve();
        });
      }),
  };
}

/** A `node:http` response as a broker's {@linkcode DirectSink}. */
class NodeSink implements DirectSink {
  readonly #outgoing: ServerResponse;

  constructor(outgoing: ServerResponse) {
    this.#outgoing = outgoing;
  }

  write(chunk: Uint8Array): void {
    // A client gone is removed by the close listener; until then, writes go nowhere.
    if (!this.#outgoing.writableEnded && !this.#outgoing.destroyed) this.#outgoing.write(chunk);
  }

  queued(): number {
    // Below Node's high-water mark the socket takes the bytes without
    // waiting, and a "drain" follows only a write past it.
    return this.#outgoing.writableNeedDrain ? this.#outgoing.writableLength : 0;
  }

  end(): void {
    if (!this.#outgoing.destroyed) this.#outgoing.end();
  }

  destroy(): void {
    this.#outgoing.destroy();
  }
}

/** Starts a server, turning the runtime's error into a {@linkcode ListenError}. */
function listening<T>(address: Address, start: () => T): Promise<T> {
  return new Promise<T>((resolve) => resolve(start())).catch((error) => {
    throw new ListenError(address, error);
  });
}

function internalError(error: unknown): Response {
  log("error", `request failed: ${error instanceof Error ? error.message : error}`);
  return Response.json({ error: "internal error" }, { status: 500 });
}

/** `LOG_FORMAT=json`, read by {@linkcode currentRuntime}. */
let jsonLogs = false;

/**
 * Writes one log line: readable text by default (`error: ` or `warning: ` before those),
 * or with `LOG_FORMAT=json` one JSON object (`time`, `level`, `message`,
 * then `fields`). Errors and warnings go to stderr, the rest to stdout. Callers never
 * pass request data: no token, cookie or query string reaches the log.
 */
export function log(
  level: "info" | "warning" | "error",
  message: string,
  fields: Record<string, unknown> = {},
): void {
  const write = level === "info" ? console.log : console.error;
  if (jsonLogs) {
    write(JSON.stringify({ time: new Date().toISOString(), level, message, ...fields }));
    return;
  }
  const details = Object.entries(fields).map(([name, value]) => ` ${name}=${value}`).join("");
  write(`${level === "info" ? "" : `${level}: `}${message}${details}`);
}

/** A setting the program cannot start with; the message is the reason, in one line. */
export class SettingError extends Error {
  override name = "SettingError";
}

/** Reads a non-negative integer setting; throws a {@linkcode SettingError} for anything else. */
export function integerSetting(runtime: Runtime, name: string, fallback: number): number {
  const text = runtime.env(name);
  if (text === undefined || text === "") return fallback;
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value)) {
    throw new SettingError(`${name} must be a non-negative integer, got ${JSON.stringify(text)}`);
  }
  return value;
}

/**
 * What a deployment likely meant by the variables this program does not
 * read: one of `known` a typing slip away (at most two letters wrong), or
 * with a known prefix (`JWT_`, `REDIS_`, ...). One line each, naming the
 * likely one.
 */
export function unknownSettings(runtime: Runtime, known: ReadonlySet<string>): string[] {
  const prefixes = new Set([...known].map((name) => name.split("_")[0] + "_"));
  const lines: string[] = [];
  for (const name of runtime.envNames().sort()) {
    if (known.has(name)) continue;
    let likely: string | undefined;
    let nearest = Infinity;
    for (const candidate of known) {
      const distance = editDistance(name, candidate);
      if (distance < nearest) [nearest, likely] = [distance, candidate];
    }
    const prefixed = name.includes("_") && prefixes.has(name.split("_")[0] + "_");
    if (nearest <= 2 || prefixed) {
      lines.push(
        `${name} is not a setting of this server${nearest <= 2 ? `: did you mean ${likely}?` : ""}`,
      );
    }
  }
  return lines;
}

/** How many single-letter insertions, deletions and substitutions turn `a` into `b`. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(
        previous[j] + 1,
        current[j - 1] + 1,
        previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
    previous = current;
  }
  return previous[b.length];
}
