/**
 * What the demo and the benchmark servers need of a runtime (its
 * environment, one listener, signals and exit) on Deno and on Bun, chosen at
 * run time so the same file runs unchanged on both. Not part of the library:
 * `mod.ts` needs none of it.
 *
 * @module
 */
import type { FetchServer } from "./mod.ts";

/** A fetch handler; Bun passes its server as the second argument. */
export type Handler = (request: Request, server?: FetchServer) => Response | Promise<Response>;

/** Where to listen; `reusePort` lets several processes share the port (Linux). */
export interface Address {
  port: number;
  hostname: string;
  reusePort?: boolean;
}

/** The runtime's services this project uses. */
export interface Runtime {
  env(name: string): string | undefined;
  /** Listens; throws a {@linkcode ListenError} when it cannot. */
  serve(handler: Handler, address: Address): { port: number; stop(): Promise<void> };
  onSignal(signal: "SIGINT" | "SIGTERM", listener: () => void): void;
  exit(code: number): never;
  /** The process's resident memory, in bytes. */
  residentMemory(): number;
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
    },
  ): { port: number; stop(force?: boolean): Promise<void> };
}
interface ProcessGlobal {
  on(signal: string, listener: () => void): void;
  exit(code: number): never;
  memoryUsage: { rss(): number };
}

/** The runtime this program runs on; also reads `LOG_FORMAT` for {@linkcode log}. */
export function currentRuntime(): Runtime {
  const runtime = detectRuntime();
  const format = runtime.env("LOG_FORMAT") || "text";
  if (format !== "text" && format !== "json") {
    log("error", `LOG_FORMAT must be "text" or "json", got ${JSON.stringify(format)}`);
    runtime.exit(1);
  }
  logFormat = format === "json" ? "json" : "text";
  return runtime;
}

function detectRuntime(): Runtime {
  const { Bun, process } = globalThis as { Bun?: BunGlobal; process?: ProcessGlobal };
  // Bun first: it also defines some Deno-compatible globals in some setups.
  if (Bun !== undefined && process !== undefined) {
    return {
      env: (name) => Bun.env[name],
      serve(handler, address) {
        // No `export default { fetch }` in the entry file: Bun would start a
        // second server from it. Bun.serve is called here, once.
        const server = listening(
          address,
          () => Bun.serve({ ...address, fetch: handler, error: internalError }),
        );
        return { port: server.port, stop: () => server.stop() };
      },
      onSignal: (signal, listener) => process.on(signal, listener),
      exit: (code) => process.exit(code),
      residentMemory: () => process.memoryUsage.rss(),
    };
  }
  if (typeof Deno !== "undefined") {
    return {
      env: (name) => Deno.env.get(name),
      serve(handler, address) {
        const server = listening(address, () =>
          Deno.serve(
            { ...address, onListen() {}, onError: internalError },
            (request) => handler(request),
          ));
        return { port: server.addr.port, stop: () => server.shutdown() };
      },
      onSignal: (signal, listener) => Deno.addSignalListener(signal, listener),
      exit: (code) => Deno.exit(code),
      residentMemory: () => Deno.memoryUsage().rss,
    };
  }
  throw new Error("this program runs on Deno or Bun; import mod.ts on other runtimes");
}

/** Starts a server, turning the runtime's error into a {@linkcode ListenError}. */
function listening<T>(address: Address, start: () => T): T {
  try {
    return start();
  } catch (error) {
    throw new ListenError(address, error);
  }
}

function internalError(error: unknown): Response {
  log("error", `request failed: ${error instanceof Error ? error.message : error}`);
  return Response.json({ error: "internal error" }, { status: 500 });
}

let logFormat: "text" | "json" = "text";

/**
 * Writes one log line: readable text by default (`error: ` before errors),
 * or with `LOG_FORMAT=json` one JSON object (`time`, `level`, `message`,
 * then `fields`). Errors go to stderr, the rest to stdout. Callers never
 * pass request data: no token, cookie or query string reaches the log.
 */
export function log(
  level: "info" | "error",
  message: string,
  fields: Record<string, unknown> = {},
): void {
  const write = level === "error" ? console.error : console.log;
  if (logFormat === "json") {
    write(JSON.stringify({ time: new Date().toISOString(), level, message, ...fields }));
    return;
  }
  const details = Object.entries(fields).map(([name, value]) => ` ${name}=${value}`).join("");
  write(`${level === "error" ? "error: " : ""}${message}${details}`);
}

/** Reads a non-negative integer setting, or stops with a one-line reason. */
export function integerSetting(runtime: Runtime, name: string, fallback: number): number {
  const text = runtime.env(name);
  if (text === undefined || text === "") return fallback;
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value)) {
    log("error", `${name} must be a non-negative integer, got ${JSON.stringify(text)}`);
    runtime.exit(1);
  }
  return value;
}
