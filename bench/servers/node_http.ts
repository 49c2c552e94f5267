// Node's own ceiling: ceiling.ts written against node:http directly, with no
// Request, Response or web stream in between: each publish is encoded once
// and written to every client's socket. Measures what the web-standard layer
// (runtime.ts's adapter) costs on Node.
import { createServer, type ServerResponse } from "node:http";
import { Buffer } from "node:buffer";
import process from "node:process";

const encoder = new TextEncoder();
const clients = new Set<ServerResponse>();
let seq = 0;

const server = createServer((request, response) => {
  const { pathname } = new URL(request.url!, "http://x");
  if (pathname === "/events") {
    response.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-store" });
    response.write("retry: 2000\n\n");
    clients.add(response);
    response.on("close", () => clients.delete(response));
    return;
  }
  if (pathname === "/publish" && request.method === "POST") {
    let body = "";
    request.setEncoding("utf8");
    request.on("data", (chunk) => body += chunk);
    request.on("end", () => {
      const id = ++seq;
      const chunk = encoder.encode(
        `id: ${id}\ndata: ${body.split(/\r\n|\r|\n/).join("\ndata: ")}\n\n`,
      );
      for (const client of clients) client.write(chunk);
      json(response, `{"id":"${id}"}`);
    });
    return;
  }
  if (pathname === "/stats") {
    json(response, JSON.stringify({ clients: clients.size }));
    return;
  }
  response.writeHead(404).end("not found");
});
function json(response: ServerResponse, body: string): void {
  response.writeHead(200, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(body),
  }).end(body);
}

// Streams stay open for as long as the client wants.
server.requestTimeout = 0;
server.keepAliveTimeout = 0;
server.listen(Number(process.env.PORT ?? 0), "127.0.0.1", () => {
  const address = server.address();
  console.log(`http://127.0.0.1:${typeof address === "object" && address?.port}/`);
});
for (const signal of ["SIGINT", "SIGTERM"] as const) process.on(signal, () => process.exit(0));
