// The ceiling: the simplest correct broker. A set of stream controllers; each
// publish is encoded once and the same chunk is enqueued to every client. No
// ids to resume from, no history, topics, heartbeats or slow-client limits.
import { listen } from "./listen.ts";

const encoder = new TextEncoder();
const clients = new Set<ReadableStreamDefaultController<Uint8Array>>();
const hello = encoder.encode("retry: 2000\n\n");
let seq = 0;

listen(async (request) => {
  const { pathname } = new URL(request.url);
  if (pathname === "/events") {
    let controller: ReadableStreamDefaultController<Uint8Array>;
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        controller = c;
        clients.add(c);
        c.enqueue(hello);
      },
      cancel() {
        clients.delete(controller);
      },
    });
    return new Response(body, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-store" },
    });
  }
  if (pathname === "/publish" && request.method === "POST") {
    const data = (await request.text()).split(/\r\n|\r|\n/).join("\ndata: ");
    const id = ++seq;
    const chunk = encoder.encode(`id: ${id}\ndata: ${data}\n\n`);
    for (const client of clients) client.enqueue(chunk);
    return Response.json({ id: String(id) });
  }
  if (pathname === "/stats") return Response.json({ clients: clients.size });
  return new Response("not found", { status: 404 });
});
