// The peer: a broker built the way Hono's docs show SSE, with `streamSSE`.
// Each client's stream waits on its own queue and writes with writeSSE.
import { Hono } from "hono";
import { type SSEMessage, streamSSE } from "hono/streaming";
import { listen } from "./listen.ts";

interface Client {
  queue: SSEMessage[];
  wake?: () => void;
}

const clients = new Set<Client>();
let seq = 0;
const app = new Hono();

app.get("/events", (c) =>
  streamSSE(c, async (stream) => {
    const client: Client = { queue: [] };
    clients.add(client);
    stream.onAbort(() => {
      clients.delete(client);
      client.wake?.();
    });
    await stream.write("retry: 2000\n\n");
    while (!stream.aborted) {
      if (client.queue.length === 0) await new Promise<void>((wake) => client.wake = wake);
      for (const message of client.queue.splice(0)) await stream.writeSSE(message);
    }
  }));

app.post("/publish", async (c) => {
  const message = { id: String(++seq), data: await c.req.text() };
  for (const client of clients) {
    client.queue.push(message);
    client.wake?.();
    client.wake = undefined;
  }
  return c.json({ id: message.id });
});

app.get("/stats", (c) => c.json({ clients: clients.size }));

listen((request) => app.fetch(request));
