// Where the memory of an idle stream goes: `node bench/idle-memory.mjs`.
// One server, three ways to hold a connection (IDLE_MODE):
// - "pending": the handler never answers (the connection and the request alone);
// - "stream": a 200 with a ReadableStream body that stays open (the ceiling's);
// - "bytes": the same with a byte stream (`type: "bytes"`);
// - "broker": `Broker.subscribe` of mod.ts.
// GET /memory answers the process's memory figures (process.memoryUsage()).
import process from "node:process";
import { Broker } from "../../mod.ts";
import { listen } from "./listen.ts";

const mode = process.env.IDLE_MODE ?? "stream";
const broker = new Broker({ heartbeat: 3_600_000 });
const never = new Promise<Response>(() => {});
let open = 0;

listen((request) => {
  const { pathname } = new URL(request.url);
  if (pathname === "/memory") {
    // A full collection first: Deno and Node with --expose-gc, Bun always.
    (globalThis as { gc?: () => void }).gc?.();
    (globalThis as { Bun?: { gc(force: boolean): void } }).Bun?.gc(true);
    return Response.json({ ...process.memoryUsage(), open });
  }
  if (pathname === "/stats") return Response.json({ clients: open });
  open++;
  request.signal.addEventListener("abort", () => open--);
  if (mode === "pending") return never;
  if (mode === "broker") return broker.subscribe(request);
  const hello = new TextEncoder().encode("retry: 2000\n\n");
  const body = mode === "bytes"
    ? new ReadableStream({
      type: "bytes",
      start(controller) {
        controller.enqueue(hello);
      },
    })
    : new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(hello);
      },
    }, { highWaterMark: 0 });
  return new Response(body, { headers: { "content-type": "text/event-stream" } });
});
