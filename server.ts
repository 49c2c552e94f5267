/**
 * The demo server: a broker, a ticker that publishes the time, the broker's
 * HTTP routes and a small live page. The same file runs on both runtimes:
 *
 *     deno run --allow-net --allow-env server.ts
 *     bun run server.ts
 *
 * Configured by the environment (see README.md). The first line printed is
 * the URL it listens on. SIGINT and SIGTERM end every stream, then exit 0.
 *
 * @module
 */
import { Broker, createHandler, type FetchServer, tokenAuth } from "./mod.ts";
import { renderPage } from "./page.ts";

type Handler = (request: Request, server?: FetchServer) => Response | Promise<Response>;

/** What this file needs of a runtime: its environment, a listener, signals and exit. */
interface Runtime {
  env(name: string): string | undefined;
  serve(handler: Handler, port: number, hostname: string): { port: number; stop(): Promise<void> };
  onSignal(signal: "SIGINT" | "SIGTERM", listener: () => void): void;
  exit(code: number): never;
}

// Minimal shapes of the two runtimes' globals, so `deno check` needs no Bun types.
interface BunGlobal {
  env: Record<string, string | undefined>;
  serve(options: {
    port: number;
    hostname: string;
    fetch: Handler;
    error?: (error: Error) => Response;
  }): { port: number; stop(force?: boolean): Promise<void> };
}
interface ProcessGlobal {
  on(signal: string, listener: () => void): void;
  exit(code: number): never;
}

function currentRuntime(): Runtime {
  const { Bun, process } = globalThis as { Bun?: BunGlobal; process?: ProcessGlobal };
  // Bun first: it also defines some Deno-compatible globals in some setups.
  if (Bun !== undefined && process !== undefined) {
    return {
      env: (name) => Bun.env[name],
      serve(handler, port, hostname) {
        // No `export default { fetch }` in this file: Bun would start a second
        // server from it. We call Bun.serve ourselves, once.
        const server = Bun.serve({ port, hostname, fetch: handler, error: internalError });
        return { port: server.port, stop: () => server.stop() };
      },
      onSignal: (signal, listener) => process.on(signal, listener),
      exit: (code) => process.exit(code),
    };
  }
  if (typeof Deno !== "undefined") {
    return {
      env: (name) => Deno.env.get(name),
      serve(handler, port, hostname) {
        const server = Deno.serve(
          { port, hostname, onListen() {}, onError: internalError },
          (request) => handler(request),
        );
        return { port: server.addr.port, stop: () => server.shutdown() };
      },
      onSignal: (signal, listener) => Deno.addSignalListener(signal, listener),
      exit: (code) => Deno.exit(code),
    };
  }
  throw new Error("server.ts runs on Deno or Bun; import mod.ts on other runtimes");
}

function internalError(error: unknown): Response {
  console.error("error:", error instanceof Error ? error.message : error);
  return Response.json({ error: "internal error" }, { status: 500 });
}

/** Reads a non-negative integer setting, or stops with a one-line reason. */
function integer(runtime: Runtime, name: string, fallback: number): number {
  const text = runtime.env(name);
  if (text === undefined || text === "") return fallback;
  const value = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(value)) {
    console.error(`error: ${name} must be a non-negative integer, got ${JSON.stringify(text)}`);
    runtime.exit(1);
  }
  return value;
}

const runtime = currentRuntime();
const port = integer(runtime, "PORT", 8000);
const hostname = runtime.env("HOSTNAME") || "127.0.0.1";
const tickMs = integer(runtime, "TICK_MS", 1000);
const retryMs = integer(runtime, "RETRY_MS", 2000);
const publishToken = runtime.env("PUBLISH_TOKEN");

const broker = new Broker({
  history: integer(runtime, "HISTORY", 1000),
  historyBytes: integer(runtime, "HISTORY_BYTES", 0) || Infinity,
  heartbeat: integer(runtime, "HEARTBEAT_MS", 15_000),
  retry: retryMs,
  maxQueueBytes: integer(runtime, "MAX_QUEUE_BYTES", 1 << 20),
  maxClients: integer(runtime, "MAX_CLIENTS", 0) || Infinity,
  maxTopics: integer(runtime, "MAX_TOPICS", 32),
});
const corsOrigin = runtime.env("CORS_ORIGIN") || "*";
const handleBroker = createHandler(broker, {
  maxBodyBytes: integer(runtime, "MAX_BODY", 65536),
  authorize: tokenAuth({
    publish: publishToken,
    subscribe: runtime.env("SUBSCRIBE_TOKEN"),
  }),
  allowOrigin: corsOrigin === "*" ? "*" : corsOrigin.split(",").map((origin) => origin.trim()),
});

const page = renderPage({ retryMs, publishToken: Boolean(publishToken) });
const handler: Handler = (request, server) => {
  if (new URL(request.url).pathname === "/") {
    if (request.method !== "GET" && request.method !== "HEAD") {
      return Response.json({ error: "use GET" }, { status: 405, headers: { allow: "GET" } });
    }
    return new Response(page, { headers: { "content-type": "text/html; charset=utf-8" } });
  }
  return handleBroker(request, server);
};

const server = runtime.serve(handler, port, hostname);
const host = hostname.includes(":") ? `[${hostname}]` : hostname;
console.log(`http://${host}:${server.port}/`);

const ticker = tickMs > 0
  ? setInterval(() => {
    broker.publish({ event: "tick", data: new Date().toISOString() }, { topic: "time" })
      .catch((error) => console.error("error: tick not published:", error.message));
  }, tickMs)
  : undefined;

let stopping = false;
async function shutdown(signal: string): Promise<void> {
  if (stopping) return;
  stopping = true;
  console.log(`${signal}: closing ${broker.stats().clients} streams`);
  clearInterval(ticker);
  // Streams first: both runtimes' graceful stop waits for open responses.
  broker.close();
  // A client that stopped reading never lets its stream finish: don't wait forever.
  const deadline = new Promise((resolve) => setTimeout(resolve, 2000));
  await Promise.race([server.stop(), deadline]);
  runtime.exit(0);
}
runtime.onSignal("SIGINT", () => shutdown("SIGINT"));
runtime.onSignal("SIGTERM", () => shutdown("SIGTERM"));
