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
  serve(handler: Handler, address: Address): { port: number; stop(): Promise<void> };
  onSignal(signal: "SIGINT" | "SIGTERM", listener: () => void): void;
  exit(code: number): never;
}

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
}

/** The runtime this program runs on. */
export function currentRuntime(): Runtime {
  const { Bun, process } = globalThis as { Bun?: BunGlobal; process?: ProcessGlobal };
  // Bun first: it also defines some Deno-compatible globals in some setups.
  if (Bun !== undefined && process !== undefined) {
    return {
      env: (name) => Bun.env[name],
      serve(handler, address) {
        // No `export default { fetch }` in the entry file: Bun would start a
        // second server from it. Bun.serve is called here, once.
        const server = Bun.serve({ ...address, fetch: handler, error: internalError });
        return { port: server.port, stop: () => server.stop() };
      },
      onSignal: (signal, listener) => process.on(signal, listener),
      exit: (code) => process.exit(code),
    };
  }
  if (typeof Deno !== "undefined") {
    return {
      env: (name) => Deno.env.get(name),
      serve(handler, address) {
        const server = Deno.serve(
          { ...address, onListen() {}, onError: internalError },
          (request) => handler(request),
        );
        return { port: server.addr.port, stop: () => server.shutdown() };
      },
      onSignal: (signal, listener) => Deno.addSignalListener(signal, listener),
      exit: (code) => Deno.exit(code),
    };
  }
  throw new Error("this program runs on Deno or Bun; import mod.ts on other runtimes");
}

function internalError(error: unknown): Response {
  console.error("error:", error instanceof Error ? error.message : error);
  return Response.json({ error: "internal error" }, { status: 500 });
}

/** Reads a non-negative integer setting, or stops with a one-line reason. */
export function integerSetting(runtime: Runtime, name: string, fallback: number): number {
  const text = runtime.env(name);
  if (text === undefined || text === "") return fallback;
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value)) {
    console.error(`error: ${name} must be a non-negative integer, got ${JSON.stringify(text)}`);
    runtime.exit(1);
  }
  return value;
}
